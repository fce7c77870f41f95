//! Criterion benchmarks of the lock manager (issue 2, section 5). Figures and the command that
//! reproduces them are in `BENCHMARKS.md`.
//!
//! Run with `cargo bench --bench lock_manager` (a filter, e.g. `-- uncontended`, runs a subset).
//!
//! What each group measures:
//! - `uncontended`: one exclusive key acquired and released by one session, through the async
//!   `LockManager` (its future driven by `FutureExt::now_or_never`: an uncontended acquire is
//!   decided under the mutex and never waits, so no executor is needed) and through the pure
//!   `LockTable` alone. Throughput: pairs per second.
//! - `sorted_8_keys`: one request naming 8 keys out of order (the table sorts and deduplicates
//!   them), then the release of the 8.
//! - `contended`: 64 tasks on a 2-worker tokio runtime over 16 keys, random modes, each doing a
//!   fixed number of acquire/yield/release rounds with a deadline; the time for the whole batch.
//! - `wait_and_cycle_check`: on a `LockTable` already holding 1k or 10k waiting sessions (a
//!   random forest, or one long chain, or all queued on one hot key), one new request that must
//!   wait (enqueue, cycle search) and its withdrawal (`cancel`); and one request that closes a
//!   cycle (`Deadlock`).
//! - `handoff`: one key with 10 to 10,000 exclusive waiters; the holder releases it, the head of
//!   the queue is granted, and the old holder queues again at the tail (so the queue length stays
//!   the same): the cost of one handoff as the queue grows.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures_util::FutureExt;
use locksmith::lock::{
    Acquired, Key, LockError, LockManager, LockManagerConfig, LockMode, LockTable, SessionId,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Every `LockTable` built here accepts requests this large.
const MAX_KEYS: usize = 1024;

/// Graph sizes (number of waiting sessions) for the growth benchmarks.
const SIZES: [usize; 2] = [1_000, 10_000];

fn key(i: usize) -> Key {
    Key::from(format!("k{i:05}"))
}

/// Opens `n` sessions with ids counted from `first`.
fn open_sessions(table: &mut LockTable, first: usize, n: usize) -> Vec<SessionId> {
    (first..first + n)
        .map(|i| {
            let id = SessionId::from_u128(i as u128);
            table.open_session(id).expect("a fresh id");
            id
        })
        .collect()
}

/// `acquire` on the table, its effects dropped (nobody waits in these set-ups but the sessions
/// the benchmark drives itself).
fn table_acquire(
    table: &mut LockTable,
    id: SessionId,
    keys: &[Key],
    mode: LockMode,
    now: Instant,
) -> Result<Acquired, LockError> {
    table.acquire(id, keys, mode, now, true).0
}

// ----- a) uncontended acquire + release -----------------------------------------------------

fn uncontended(c: &mut Criterion) {
    let mut group = c.benchmark_group("uncontended");
    group.throughput(Throughput::Elements(1));

    let manager = LockManager::new(LockManagerConfig::default());
    let session = manager.open_session();
    let keys = [Key::from("orders/42")];
    group.bench_function("manager_acquire_release_1_key", |b| {
        b.iter(|| {
            let grant = manager
                .acquire(&session, black_box(&keys), LockMode::Exclusive, None)
                .now_or_never()
                .expect("an uncontended acquire never waits")
                .expect("an uncontended acquire is granted");
            black_box(grant);
            manager
                .release(&session, black_box(&keys))
                .expect("the key is held");
        })
    });

    let mut table = LockTable::new(MAX_KEYS);
    let id = open_sessions(&mut table, 0, 1)[0];
    let now = Instant::now();
    group.bench_function("table_acquire_release_1_key", |b| {
        b.iter(|| {
            let acquired =
                table_acquire(&mut table, id, black_box(&keys), LockMode::Exclusive, now)
                    .expect("an uncontended acquire is granted");
            black_box(acquired);
            let (released, _) = table.release(id, black_box(&keys), now);
            released.expect("the key is held");
        })
    });
    group.finish();
}

// ----- b) a sorted 8-key request ----------------------------------------------------------------

fn sorted_8_keys(c: &mut Criterion) {
    let mut group = c.benchmark_group("sorted_8_keys");
    group.throughput(Throughput::Elements(1));
    // Given out of order: the table sorts them before taking them one by one.
    let keys: Vec<Key> = [7, 3, 5, 0, 6, 1, 4, 2].into_iter().map(key).collect();

    let manager = LockManager::new(LockManagerConfig::default());
    let session = manager.open_session();
    group.bench_function("manager_acquire_release_8_keys", |b| {
        b.iter(|| {
            let grant = manager
                .acquire(&session, black_box(&keys), LockMode::Exclusive, None)
                .now_or_never()
                .expect("an uncontended acquire never waits")
                .expect("an uncontended acquire is granted");
            black_box(grant);
            manager
                .release(&session, black_box(&keys))
                .expect("the keys are held");
        })
    });

    let mut table = LockTable::new(MAX_KEYS);
    let id = open_sessions(&mut table, 0, 1)[0];
    let now = Instant::now();
    group.bench_function("table_acquire_release_8_keys", |b| {
        b.iter(|| {
            let acquired =
                table_acquire(&mut table, id, black_box(&keys), LockMode::Exclusive, now)
                    .expect("an uncontended acquire is granted");
            black_box(acquired);
            let (released, _) = table.release(id, black_box(&keys), now);
            released.expect("the keys are held");
        })
    });
    group.finish();
}

// ----- c) contended mix -------------------------------------------------------------------------

const TASKS: usize = 64;
const CONTENDED_KEYS: usize = 16;
const ROUNDS_PER_TASK: usize = 200;

/// Requests made by the contended benchmark, and those that timed out (expected: none); both
/// reported at the end.
static CONTENDED_REQUESTS: AtomicU64 = AtomicU64::new(0);
static CONTENDED_TIMEOUTS: AtomicU64 = AtomicU64::new(0);

/// One task of the contended mix: `ROUNDS_PER_TASK` times, acquire one random key in a random
/// mode (deadline 1 s), yield while holding it (so the other tasks on this worker run and queue
/// up behind it), release it.
async fn contended_task(manager: LockManager, keys: Vec<Key>, seed: u64) {
    let session = manager.open_session();
    let mut rng = SmallRng::seed_from_u64(seed);
    for _ in 0..ROUNDS_PER_TASK {
        let key = [keys[rng.random_range(0..keys.len())].clone()];
        let mode = if rng.random_bool(0.5) {
            LockMode::Shared
        } else {
            LockMode::Exclusive
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        CONTENDED_REQUESTS.fetch_add(1, Ordering::Relaxed);
        match manager.acquire(&session, &key, mode, Some(deadline)).await {
            Ok(grant) => {
                black_box(grant);
                tokio::task::yield_now().await;
                manager.release(&session, &key).expect("the key is held");
            }
            Err(LockError::Timeout { .. }) => {
                CONTENDED_TIMEOUTS.fetch_add(1, Ordering::Relaxed);
            }
            Err(other) => panic!("single-key requests cannot fail with {other:?}"),
        }
    }
}

fn contended(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let keys: Vec<Key> = (0..CONTENDED_KEYS).map(key).collect();
    let mut group = c.benchmark_group("contended");
    group.throughput(Throughput::Elements((TASKS * ROUNDS_PER_TASK) as u64));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(8));
    group.bench_function("64_tasks_16_keys_200_rounds_each", |b| {
        b.to_async(&runtime).iter_custom(|iters| {
            let keys = keys.clone();
            async move {
                let mut total = Duration::ZERO;
                for iteration in 0..iters {
                    let manager = LockManager::new(LockManagerConfig::default());
                    let start = Instant::now();
                    let tasks: Vec<_> = (0..TASKS)
                        .map(|t| {
                            let seed = iteration * TASKS as u64 + t as u64;
                            tokio::spawn(contended_task(manager.clone(), keys.clone(), seed))
                        })
                        .collect();
                    for task in tasks {
                        task.await.expect("a contended task panicked");
                    }
                    total += start.elapsed();
                    assert!(
                        manager.snapshot().keys.is_empty(),
                        "every lock is free at the end"
                    );
                }
                total
            }
        })
    });
    group.finish();
    let requests = CONTENDED_REQUESTS.load(Ordering::Relaxed);
    if requests > 0 {
        eprintln!(
            "contended: {} of {requests} requests timed out (deadline 1 s)",
            CONTENDED_TIMEOUTS.load(Ordering::Relaxed)
        );
    }
}

// ----- d) wait + cycle check as the graph grows --------------------------------------------------

/// A table with `waiting + 1` sessions; session `i` holds `key(i)` exclusively.
fn holders(waiting: usize, now: Instant) -> (LockTable, Vec<SessionId>) {
    let mut table = LockTable::new(MAX_KEYS);
    let sessions = open_sessions(&mut table, 0, waiting + 1);
    for (i, &s) in sessions.iter().enumerate() {
        let acquired = table_acquire(&mut table, s, &[key(i)], LockMode::Exclusive, now);
        assert!(matches!(acquired, Ok(Acquired::Granted(_))));
    }
    (table, sessions)
}

/// A random forest (a random recursive tree): session 0 holds `key(0)` and runs; every session
/// `i >= 1` holds `key(i)` and waits for `key(p)` with `p` uniform in `0..i`, so it waits for the
/// holder `p` and for the earlier waiters on `key(p)`. Depth is about ln(waiting).
fn random_forest(waiting: usize, now: Instant) -> (LockTable, Vec<SessionId>) {
    let (mut table, sessions) = holders(waiting, now);
    let mut rng = SmallRng::seed_from_u64(7);
    for (i, &session) in sessions.iter().enumerate().skip(1) {
        let parent = rng.random_range(0..i);
        let acquired = table_acquire(
            &mut table,
            session,
            &[key(parent)],
            LockMode::Exclusive,
            now,
        );
        assert!(matches!(acquired, Ok(Acquired::Waiting)));
    }
    (table, sessions)
}

/// A chain: session `i` holds `key(i)` and waits for `key(i + 1)`, for `i` in `0..waiting`;
/// the last session holds its key and runs. Built from the tail so each check is short.
fn chain(waiting: usize, now: Instant) -> (LockTable, Vec<SessionId>) {
    let (mut table, sessions) = holders(waiting, now);
    for (i, &session) in sessions.iter().enumerate().take(waiting) {
        let acquired = table_acquire(&mut table, session, &[key(i + 1)], LockMode::Exclusive, now);
        assert!(matches!(acquired, Ok(Acquired::Waiting)));
    }
    (table, sessions)
}

/// Opens two sessions with ids from `first`: the first takes `key` and the second queues for it,
/// so the first is waited for and its requests are searched. Returns the first.
fn waited_for_probe(table: &mut LockTable, first: usize, key: Key, now: Instant) -> SessionId {
    let probe = open_sessions(table, first, 2);
    let acquired = table_acquire(
        table,
        probe[0],
        std::slice::from_ref(&key),
        LockMode::Exclusive,
        now,
    );
    assert!(matches!(acquired, Ok(Acquired::Granted(_))));
    let acquired = table_acquire(table, probe[1], &[key], LockMode::Exclusive, now);
    assert!(matches!(acquired, Ok(Acquired::Waiting)));
    probe[0]
}

/// One hot key: session 0 holds `key(0)` exclusively and `waiting` sessions holding nothing are
/// queued for it. Returns the table, the holder and the waiters.
fn hot_key(waiting: usize, now: Instant) -> (LockTable, SessionId, Vec<SessionId>) {
    let mut table = LockTable::new(MAX_KEYS);
    let sessions = open_sessions(&mut table, 0, waiting + 1);
    let acquired = table_acquire(&mut table, sessions[0], &[key(0)], LockMode::Exclusive, now);
    assert!(matches!(acquired, Ok(Acquired::Granted(_))));
    for &session in &sessions[1..] {
        let acquired = table_acquire(&mut table, session, &[key(0)], LockMode::Exclusive, now);
        assert!(matches!(acquired, Ok(Acquired::Waiting)));
    }
    (table, sessions[0], sessions[1..].to_vec())
}

/// Measures a request of `requester` for each key of `targets` in turn (cycling) that must wait,
/// then its withdrawal.
fn bench_wait_cancel(
    b: &mut criterion::Bencher<'_>,
    table: &mut LockTable,
    requester: SessionId,
    targets: &[[Key; 1]],
    now: Instant,
) {
    for target in targets {
        let acquired = table_acquire(table, requester, target, LockMode::Exclusive, now);
        assert!(matches!(acquired, Ok(Acquired::Waiting)));
        let _ = table.cancel(requester, now);
    }
    let mut next = targets.iter().cycle();
    b.iter(|| {
        let target = next.next().expect("targets is not empty");
        let acquired = table_acquire(
            table,
            requester,
            black_box(target),
            LockMode::Exclusive,
            now,
        );
        black_box(acquired.is_ok());
        let _ = table.cancel(requester, now);
    })
}

/// Measures a request of `requester` for each key of `targets` in turn that closes a cycle: it
/// fails with `Deadlock` at once and leaves the table as it was.
fn bench_deadlock(
    b: &mut criterion::Bencher<'_>,
    table: &mut LockTable,
    requester: SessionId,
    targets: &[[Key; 1]],
    now: Instant,
) {
    for target in targets {
        let acquired = table_acquire(table, requester, target, LockMode::Exclusive, now);
        assert!(matches!(acquired, Err(LockError::Deadlock { .. })));
    }
    let mut next = targets.iter().cycle();
    b.iter(|| {
        let target = next.next().expect("targets is not empty");
        black_box(table_acquire(
            table,
            requester,
            black_box(target),
            LockMode::Exclusive,
            now,
        ))
    })
}

fn wait_and_cycle_check(c: &mut Criterion) {
    let mut group = c.benchmark_group("wait_and_cycle_check");
    let now = Instant::now();
    for waiting in SIZES {
        // Random forest: a session holding a key somebody waits for requests a random key (its
        // holder and, from it, every ancestor up to the root are reachable).
        let (mut table, sessions) = random_forest(waiting, now);
        let probe = waited_for_probe(&mut table, waiting + 1, key(waiting + 1), now);
        let mut rng = SmallRng::seed_from_u64(11);
        let targets: Vec<[Key; 1]> = (0..1024)
            .map(|_| [key(rng.random_range(0..=waiting))])
            .collect();
        group.bench_function(
            BenchmarkId::new("random_forest_wait_cancel", waiting),
            |b| bench_wait_cancel(b, &mut table, probe, &targets, now),
        );
        // The root requests a key of a random waiting session: every waiting session leads back
        // to the root, so this closes a cycle.
        let targets: Vec<[Key; 1]> = (0..1024)
            .map(|_| [key(rng.random_range(1..=waiting))])
            .collect();
        group.bench_function(BenchmarkId::new("random_forest_deadlock", waiting), |b| {
            bench_deadlock(b, &mut table, sessions[0], &targets, now)
        });
        drop(table);

        // Long chain s0 -> s1 -> ... -> sN.
        let (mut table, sessions) = chain(waiting, now);
        // Waiting on the head: the whole chain is reachable, the search visits all of it (the
        // probe is waited for, so it is searched).
        let probe = waited_for_probe(&mut table, waiting + 1, key(waiting + 1), now);
        group.bench_function(
            BenchmarkId::new("chain_wait_on_head_cancel", waiting),
            |b| bench_wait_cancel(b, &mut table, probe, &[[key(0)]], now),
        );
        // Waiting on the tail (the running session): one node reachable, however long the chain.
        group.bench_function(
            BenchmarkId::new("chain_wait_on_tail_cancel", waiting),
            |b| bench_wait_cancel(b, &mut table, probe, &[[key(waiting)]], now),
        );
        // The tail requests the head's key: a cycle through all N + 1 sessions.
        group.bench_function(BenchmarkId::new("chain_closing_deadlock", waiting), |b| {
            bench_deadlock(b, &mut table, sessions[waiting], &[[key(0)]], now)
        });
        drop(table);

        // One hot key with `waiting` sessions queued on it.
        let (mut table, holder, _) = hot_key(waiting, now);
        let loner = open_sessions(&mut table, waiting + 1, 1)[0];
        // A session holding nothing joins the tail: nobody can wait for it, no search.
        group.bench_function(BenchmarkId::new("hot_key_tail_wait_cancel", waiting), |b| {
            bench_wait_cancel(b, &mut table, loner, &[[key(0)]], now)
        });
        // A session holding a key somebody waits for joins the tail: searched (the hot key's
        // holder is reachable; its queue is not scanned).
        let probe = waited_for_probe(&mut table, waiting + 2, key(1), now);
        group.bench_function(
            BenchmarkId::new("hot_key_searched_wait_cancel", waiting),
            |b| bench_wait_cancel(b, &mut table, probe, &[[key(0)]], now),
        );
        // The hot key's holder requests a key held by a session queued behind `waiting` others
        // on the hot key: a two-session cycle, found without scanning the queue.
        let acquired = table_acquire(&mut table, probe, &[key(0)], LockMode::Exclusive, now);
        assert!(matches!(acquired, Ok(Acquired::Waiting)));
        group.bench_function(BenchmarkId::new("hot_key_deadlock", waiting), |b| {
            bench_deadlock(b, &mut table, holder, &[[key(1)]], now)
        });
    }
    group.finish();
}

// ----- e) one handoff as the queue grows ------------------------------------------------------------

fn handoff(c: &mut Criterion) {
    let mut group = c.benchmark_group("handoff");
    let now = Instant::now();
    for waiting in [10, 100, 1_000, 10_000] {
        let (mut table, mut holder, _) = hot_key(waiting, now);
        let hot = [key(0)];
        group.bench_function(BenchmarkId::new("exclusive_waiters", waiting), |b| {
            b.iter(|| {
                let (released, effects) = table.release(holder, black_box(&hot), now);
                released.expect("the holder holds the hot key");
                let next = effects.concluded[0];
                let grant = table.take_outcome(next);
                black_box(grant);
                let requeued = table_acquire(&mut table, holder, &hot, LockMode::Exclusive, now);
                debug_assert!(matches!(requeued, Ok(Acquired::Waiting)));
                holder = next;
            })
        });
    }
    group.finish();
}

// ----- f) the live view ----------------------------------------------------------------------

/// What one update of the live page costs the table: `busiest_keys(50)` and `gauges`, as the live
/// view takes them under one lock, over a table where each of `held` sessions holds one key and
/// every hundredth session also waits for its neighbour's.
fn live_view(c: &mut Criterion) {
    let mut group = c.benchmark_group("live_view");
    for held in [1_000usize, 10_000, 100_000] {
        let now = Instant::now();
        let (mut table, sessions) = holders(held - 1, now);
        for i in (1..held).step_by(100) {
            let acquired = table_acquire(
                &mut table,
                sessions[i],
                &[key(i - 1)],
                LockMode::Exclusive,
                now,
            );
            assert!(matches!(acquired, Ok(Acquired::Waiting)));
        }
        group.throughput(Throughput::Elements(held as u64));
        group.bench_function(BenchmarkId::new("busiest_50_keys_and_gauges", held), |b| {
            b.iter(|| std::hint::black_box((table.busiest_keys(50), table.gauges(now))))
        });
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50)
}

criterion_group! {
    name = benches;
    config = config();
    targets = uncontended, sorted_8_keys, contended, wait_and_cycle_check, handoff, live_view
}
criterion_main!(benches);
