//! Concurrent stress tests of the lock manager on a multi-threaded runtime.
//!
//! `hundreds_of_random_sessions_keep_mutual_exclusion_and_leave_nothing_locked`: hundreds of
//! tasks, each with its own session and a seeded random plan, acquire 1–3 of 16 keys (sometimes
//! keys they already hold, which makes upgrades) in a random mode, release some keys, release
//! all, and sometimes close their session while holding locks. Waits come in four kinds:
//! try-locks, deadlines of 1–20 ms, no deadline with the caller giving up after 1–20 ms (the
//! future is dropped: rule 9), and no deadline at all. The last kind makes the run a liveness
//! check: a task waiting without a deadline only ends its wait by a grant or a `Deadlock`, so a
//! lost wake-up, a waiter left behind a free key, or an undetected cycle hangs it and the run
//! hits its time limit.
//!
//! Mutual exclusion is checked independently of the manager's own bookkeeping: per key, atomic
//! counters of readers and writers are incremented right after every grant and decremented right
//! before every release, and every grant asserts that a writer sees no reader and no other
//! writer, and a reader sees no writer. An exclusive grant's fencing token must exceed every
//! token seen before on its key. After every call the session must hold exactly what the task
//! believes it holds, in the modes it believes (a failed or abandoned request leaves nothing
//! behind, rule 4).
//!
//! `Deadlock` and `Timeout` are the only errors allowed (plus `NotHeld` where the task asks for
//! it). At the end every session is closed, the snapshot is empty, and no task hung: the whole
//! run is bounded by a timeout that fails the test. The counts of grants, upgrades, deadlocks,
//! timeouts and abandoned requests are printed and each must be non-zero, so the test is not
//! vacuous (typical run on 2 cores: ~1.3 s, ~1500 grants, ~30 upgrades, ~1000 deadlocks, ~1000
//! try-lock and ~2800 wait timeouts, ~950 abandoned requests).
//!
//! `a_hot_key_beside_cold_keys_keeps_exclusion_and_nothing_hangs`: one hot key among 100. 400
//! tasks hammer it (mostly exclusive, some shared, some together with a cold key, so that a
//! request sometimes holds a cold key while it queues on the hot one), waiting in five ways:
//! try-locks, deadlines of 0.1–5 ms, futures dropped by a `timeout` or by losing a `select!` after
//! a few scheduler turns (rule 9), and no deadline at all. Meanwhile 16 tasks take random cold
//! keys without a deadline. The same exclusion and fencing checks run on every grant. No session
//! holds a lock across requests and every request takes its keys in sorted order, so no deadlock
//! is possible and `Timeout` is the only error allowed. At the end no task hung (the run has the
//! same time limit), every cold-key round was granted, every hot-key request was granted, timed
//! out or dropped and left nothing held, the snapshot is empty, two or more readers held the hot
//! key together at some point, and each kind of grant, timeout and dropped request happened
//! (typical run on 2 cores: ~0.25 s; on the hot key ~45000 exclusive, ~14000 shared and ~10000
//! hot-and-cold grants; 20000 cold grants; ~10000 try-lock and ~5000 wait timeouts; ~1700
//! futures dropped by a timeout and ~15000 by a select).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use locksmith::lock::{Grant, Key, LockError, LockManager, LockManagerConfig, LockMode, Session};
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

const TASKS: usize = 300;
const KEYS: usize = 16;
const OPS_PER_TASK: usize = 40;
/// The whole run must end well within this; hitting it means some task hung.
const RUN_LIMIT: Duration = Duration::from_secs(60);

fn key_name(k: usize) -> Key {
    Key::from(format!("key-{k:02}"))
}

fn key_index(key: &Key) -> usize {
    key.as_str()
        .strip_prefix("key-")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected key {key:?}"))
}

/// The independent record of who holds what, kept by the tasks themselves.
#[derive(Default)]
struct KeyCounters {
    readers: AtomicI64,
    writers: AtomicI64,
    /// Highest fencing token seen on the key.
    highest_token: AtomicU64,
}

#[derive(Default)]
struct Stats {
    requests_granted: AtomicU64,
    upgrades: AtomicU64,
    deadlocks: AtomicU64,
    try_lock_timeouts: AtomicU64,
    wait_timeouts: AtomicU64,
    abandoned: AtomicU64,
    not_held: AtomicU64,
    sessions_closed_holding: AtomicU64,
}

struct Shared {
    manager: LockManager,
    keys: Vec<KeyCounters>,
    stats: Stats,
}

impl Shared {
    /// Records that this task now holds `k` in `mode` (having held it in `before`), and checks
    /// mutual exclusion and the fencing token.
    fn granted(&self, k: usize, mode: LockMode, before: Option<LockMode>, token: u64) {
        let counters = &self.keys[k];
        match (before, mode) {
            (Some(LockMode::Exclusive), _) | (Some(LockMode::Shared), LockMode::Shared) => {}
            (None, LockMode::Shared) => {
                counters.readers.fetch_add(1, SeqCst);
                let writers = counters.writers.load(SeqCst);
                assert_eq!(writers, 0, "a reader of key {k} sees {writers} writers");
                counters.highest_token.fetch_max(token, SeqCst);
            }
            (None, LockMode::Exclusive) | (Some(LockMode::Shared), LockMode::Exclusive) => {
                if before.is_some() {
                    counters.readers.fetch_sub(1, SeqCst);
                    self.stats.upgrades.fetch_add(1, SeqCst);
                }
                let writers = counters.writers.fetch_add(1, SeqCst) + 1;
                let readers = counters.readers.load(SeqCst);
                assert_eq!(
                    (writers, readers),
                    (1, 0),
                    "a writer of key {k} sees {writers} writers and {readers} readers"
                );
                let highest = counters.highest_token.fetch_max(token, SeqCst);
                assert!(
                    highest < token,
                    "exclusive grant of key {k} with token {token}, but {highest} was handed out before"
                );
            }
        }
    }

    /// Records that this task is about to release `k`, held in `mode`.
    fn releasing(&self, k: usize, mode: LockMode) {
        let counters = &self.keys[k];
        match mode {
            LockMode::Shared => counters.readers.fetch_sub(1, SeqCst),
            LockMode::Exclusive => counters.writers.fetch_sub(1, SeqCst),
        };
    }
}

/// One task: a session and what it believes it holds.
struct Worker {
    shared: Arc<Shared>,
    session: Session,
    held: BTreeMap<usize, LockMode>,
    rng: StdRng,
}

impl Worker {
    async fn run(mut self) {
        for _ in 0..OPS_PER_TASK {
            // Tasks that hold nothing mostly acquire; tasks that hold keys mostly let go, so keys
            // change hands often, and sometimes ask for more while holding (hold and wait), which
            // is what makes deadlocks.
            let holding = !self.held.is_empty();
            match self.rng.random_range(0..100) {
                0..30 => self.acquire().await,
                30..70 if !holding => self.acquire().await,
                30..60 => self.release(),
                60..90 => self.release_all(),
                90..93 => self.reopen(),
                _ => {}
            }
            if !self.held.is_empty() && self.rng.random_bool(0.3) {
                // Work while holding: keeps keys busy long enough for waits to time out.
                let work = self.rng.random_range(0..=5);
                tokio::time::sleep(Duration::from_millis(work)).await;
            } else {
                tokio::task::yield_now().await;
            }
        }
        self.release_all();
        self.session.close();
    }

    async fn acquire(&mut self) {
        let count = self.rng.random_range(1..=3);
        let held: Vec<usize> = self.held.keys().copied().collect();
        let mut keys: Vec<usize> = if !held.is_empty() && self.rng.random_bool(0.3) {
            // Ask again for keys already held (an upgrade if asked exclusive), plus maybe more.
            let mut keys: Vec<usize> = sample(&mut self.rng, held.len(), count.min(held.len()))
                .into_iter()
                .map(|i| held[i])
                .collect();
            if self.rng.random_bool(0.5) {
                keys.push(self.rng.random_range(0..KEYS));
            }
            keys
        } else {
            sample(&mut self.rng, KEYS, count).into_vec()
        };
        keys.sort_unstable();
        keys.dedup();
        let names: Vec<Key> = keys.iter().map(|&k| key_name(k)).collect();
        let mode = if self.rng.random_bool(0.6) {
            LockMode::Shared
        } else {
            LockMode::Exclusive
        };
        let shared = Arc::clone(&self.shared);
        let manager = &shared.manager;
        let stats = &shared.stats;
        let now = Instant::now();
        let kind = self.rng.random_range(0..100);
        let wait_ms = self.rng.random_range(1..=20);
        let outcome = match kind {
            // A try-lock.
            0..15 => Some(
                manager
                    .acquire(&self.session, &names, mode, Some(now))
                    .await,
            ),
            // No deadline, but the caller gives up and drops the future.
            15..30 => tokio::time::timeout(
                Duration::from_millis(wait_ms),
                manager.acquire(&self.session, &names, mode, None),
            )
            .await
            .ok(),
            // No deadline at all: only a grant or a deadlock ends the wait, so a missed wake-up
            // or an undetected cycle hangs the task and fails the run.
            30..55 => Some(manager.acquire(&self.session, &names, mode, None).await),
            _ => Some(
                manager
                    .acquire(
                        &self.session,
                        &names,
                        mode,
                        Some(now + Duration::from_millis(wait_ms)),
                    )
                    .await,
            ),
        };
        match outcome {
            Some(Ok(grant)) => {
                let granted: Vec<usize> = grant.tokens.iter().map(|(k, _)| key_index(k)).collect();
                assert_eq!(
                    granted, keys,
                    "a grant must name exactly the requested keys"
                );
                stats.requests_granted.fetch_add(1, SeqCst);
                for (key, token) in &grant.tokens {
                    let k = key_index(key);
                    let before = self.held.get(&k).copied();
                    shared.granted(k, mode, before, token.0);
                    let now_held = before.map_or(mode, |b| b.max(mode));
                    self.held.insert(k, now_held);
                }
            }
            Some(Err(LockError::Deadlock { cycle })) => {
                assert!(
                    cycle.len() >= 2,
                    "a deadlock cycle has at least two members"
                );
                assert_eq!(
                    cycle[0].session,
                    self.session.id(),
                    "the victim is the first member of the cycle"
                );
                stats.deadlocks.fetch_add(1, SeqCst);
            }
            Some(Err(LockError::Timeout { .. })) if kind < 15 => {
                stats.try_lock_timeouts.fetch_add(1, SeqCst);
            }
            Some(Err(LockError::Timeout { .. })) => {
                stats.wait_timeouts.fetch_add(1, SeqCst);
            }
            Some(Err(other)) => panic!("unexpected error from acquire: {other:?}"),
            None => {
                stats.abandoned.fetch_add(1, SeqCst);
            }
        }
        self.check_held();
    }

    fn release(&mut self) {
        let stats = &self.shared.stats;
        let manager = &self.shared.manager;
        let held: Vec<usize> = self.held.keys().copied().collect();
        let stray = (0..KEYS).find(|k| !self.held.contains_key(k));
        if held.is_empty() && self.rng.random_bool(0.9) {
            return;
        }
        if held.is_empty() || self.rng.random_bool(0.1) {
            // Releasing a key not held: `NotHeld`, and nothing is released.
            let Some(stray) = stray else { return };
            let mut keys: Vec<Key> = held.iter().map(|&k| key_name(k)).collect();
            keys.push(key_name(stray));
            match manager.release(&self.session, &keys) {
                Err(LockError::NotHeld { keys }) => {
                    assert_eq!(keys, vec![key_name(stray)], "NotHeld names the stray key");
                    stats.not_held.fetch_add(1, SeqCst);
                }
                other => panic!("release of a key not held returned {other:?}"),
            }
        } else {
            let count = self.rng.random_range(1..=held.len());
            let chosen: Vec<usize> = sample(&mut self.rng, held.len(), count)
                .into_iter()
                .map(|i| held[i])
                .collect();
            for &k in &chosen {
                let mode = self.held.remove(&k).expect("chosen among held keys");
                self.shared.releasing(k, mode);
            }
            let keys: Vec<Key> = chosen.iter().map(|&k| key_name(k)).collect();
            if let Err(error) = manager.release(&self.session, &keys) {
                panic!("release of held keys failed: {error:?}");
            }
        }
        self.check_held();
    }

    fn release_all(&mut self) {
        self.forget_all();
        self.shared.manager.release_all(&self.session);
        self.check_held();
    }

    /// Closes the session while it holds its locks (closing releases them) and opens a new one.
    fn reopen(&mut self) {
        if !self.held.is_empty() {
            self.shared
                .stats
                .sessions_closed_holding
                .fetch_add(1, SeqCst);
        }
        self.forget_all();
        let fresh = self.shared.manager.open_session();
        drop(std::mem::replace(&mut self.session, fresh));
    }

    fn forget_all(&mut self) {
        for (k, mode) in std::mem::take(&mut self.held) {
            self.shared.releasing(k, mode);
        }
    }

    /// The session holds exactly what the task believes, in the modes it believes.
    fn check_held(&self) {
        let manager = &self.shared.manager;
        let actual: Vec<usize> = manager
            .held_keys(&self.session)
            .iter()
            .map(key_index)
            .collect();
        let expected: Vec<usize> = self.held.keys().copied().collect();
        assert_eq!(actual, expected, "keys held by the session");
        for (&k, &mode) in &self.held {
            let held = manager.held_mode(&self.session, &key_name(k)).map(|h| h.0);
            assert_eq!(held, Some(mode), "mode of key {k}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_random_sessions_keep_mutual_exclusion_and_leave_nothing_locked() {
    let shared = Arc::new(Shared {
        manager: LockManager::new(LockManagerConfig::default()),
        keys: (0..KEYS).map(|_| KeyCounters::default()).collect(),
        stats: Stats::default(),
    });
    let started = std::time::Instant::now();
    let mut tasks = Vec::with_capacity(TASKS);
    for task in 0..TASKS {
        let session = shared.manager.open_session();
        let worker = Worker {
            shared: Arc::clone(&shared),
            session,
            held: BTreeMap::new(),
            rng: StdRng::seed_from_u64(0x5eed_0000 + task as u64),
        };
        tasks.push(tokio::spawn(worker.run()));
    }
    let all = async {
        for task in tasks {
            task.await.expect("a task failed its checks");
        }
    };
    tokio::time::timeout(RUN_LIMIT, all)
        .await
        .expect("some task hung: the run did not finish in time");

    let stats = &shared.stats;
    let count = |c: &AtomicU64| c.load(SeqCst);
    eprintln!(
        "{TASKS} tasks x {OPS_PER_TASK} ops in {:?}: {} requests granted ({} upgrades), {} deadlocks, \
         {} try-lock timeouts, {} wait timeouts, {} abandoned (future dropped), {} not_held, \
         {} sessions closed while holding",
        started.elapsed(),
        count(&stats.requests_granted),
        count(&stats.upgrades),
        count(&stats.deadlocks),
        count(&stats.try_lock_timeouts),
        count(&stats.wait_timeouts),
        count(&stats.abandoned),
        count(&stats.not_held),
        count(&stats.sessions_closed_holding),
    );

    let manager = &shared.manager;
    let snapshot = manager.snapshot();
    assert!(snapshot.is_empty(), "locks left over: {snapshot:?}");
    assert_eq!(manager.session_count(), 0, "sessions left open");
    for (k, counters) in shared.keys.iter().enumerate() {
        assert_eq!(counters.readers.load(SeqCst), 0, "readers left on key {k}");
        assert_eq!(counters.writers.load(SeqCst), 0, "writers left on key {k}");
    }
    for (name, counter) in [
        ("granted requests", &stats.requests_granted),
        ("upgrades", &stats.upgrades),
        ("deadlocks", &stats.deadlocks),
        ("try-lock timeouts", &stats.try_lock_timeouts),
        ("wait timeouts", &stats.wait_timeouts),
        ("abandoned requests", &stats.abandoned),
    ] {
        assert!(
            count(counter) > 0,
            "no {name} happened: the run proves little"
        );
    }
}

/// The hot-key test's keys are `key-00` to `key-99`; `key-50` is the hot one. A request for the
/// hot key and a cold one takes them in sorted order, so with a cold key below 50 it holds the
/// cold key while it queues on the hot one, and with one above 50 the other way round.
const HOT_KEY: usize = 50;
const HOT_COLD_KEYS: usize = 100;
const HOT_TASKS: usize = 400;
const HOT_ROUNDS: usize = 250;
const COLD_TASKS: usize = 16;
const COLD_ROUNDS: usize = 1250;

/// What the hot-key test counts.
#[derive(Default)]
struct HotColdStats {
    hot_exclusive_grants: AtomicU64,
    hot_shared_grants: AtomicU64,
    /// Grants of a request for the hot key and a cold one.
    hot_and_cold_grants: AtomicU64,
    cold_grants: AtomicU64,
    try_lock_timeouts: AtomicU64,
    wait_timeouts: AtomicU64,
    /// Requests whose future was dropped mid-wait (rule 9) by a `timeout`...
    abandoned_by_timeout: AtomicU64,
    /// ... and by losing a `select!`.
    abandoned_by_select: AtomicU64,
    /// The most readers seen holding the hot key together.
    most_hot_readers: AtomicI64,
}

/// Everything the hot-key test's tasks share.
struct HotColdRun {
    /// The manager and the independent exclusion checker (`Shared::stats` is not used).
    shared: Shared,
    stats: HotColdStats,
}

impl HotColdRun {
    /// Checks a grant of `keys` (sorted) in `mode` to a session that held nothing before, holds
    /// the keys for a few scheduler turns, and lets go of them in one of the three ways the
    /// manager offers.
    async fn hold_then_release(
        &self,
        session: &Session,
        keys: &[usize],
        mode: LockMode,
        grant: Grant,
        rng: &mut StdRng,
    ) {
        let manager = &self.shared.manager;
        let names: Vec<Key> = keys.iter().map(|&k| key_name(k)).collect();
        let granted: Vec<&Key> = grant.tokens.iter().map(|(k, _)| k).collect();
        assert_eq!(
            granted,
            names.iter().collect::<Vec<_>>(),
            "a grant must name exactly the requested keys"
        );
        assert_eq!(
            grant.taken.acquired, names,
            "a session holding nothing acquires every key it asks for"
        );
        for (key, token) in &grant.tokens {
            self.shared.granted(key_index(key), mode, None, token.0);
        }
        if mode == LockMode::Shared && keys.contains(&HOT_KEY) {
            let readers = self.shared.keys[HOT_KEY].readers.load(SeqCst);
            self.stats.most_hot_readers.fetch_max(readers, SeqCst);
        }
        for _ in 0..rng.random_range(0..=3) {
            tokio::task::yield_now().await;
        }
        for &k in keys {
            self.shared.releasing(k, mode);
        }
        match rng.random_range(0..3) {
            0 => manager
                .release(session, &names)
                .unwrap_or_else(|e| panic!("release of granted keys failed: {e:?}")),
            1 => manager
                .give_back(session, &grant.taken)
                .unwrap_or_else(|e| panic!("give_back of a grant failed: {e:?}")),
            _ => manager.release_all(session),
        }
        assert!(
            manager.held_keys(session).is_empty(),
            "the session still holds keys after letting go"
        );
    }
}

fn random_cold_key(rng: &mut StdRng) -> usize {
    let k = rng.random_range(0..HOT_COLD_KEYS - 1);
    if k >= HOT_KEY {
        k + 1
    } else {
        k
    }
}

/// Completes after `turns` turns of the scheduler.
async fn yield_turns(turns: usize) {
    for _ in 0..turns {
        tokio::task::yield_now().await;
    }
}

/// One task hammering the hot key: each round asks for it (65 % exclusive, 20 % shared, 15 %
/// together with a cold key), waiting in one of five ways, and lets go of whatever it got.
/// Nothing is held from one round to the next.
async fn hammer_the_hot_key(run: Arc<HotColdRun>, mut rng: StdRng) {
    let manager = &run.shared.manager;
    let stats = &run.stats;
    let session = manager.open_session();
    for _ in 0..HOT_ROUNDS {
        let (keys, mode) = match rng.random_range(0..100) {
            0..65 => (vec![HOT_KEY], LockMode::Exclusive),
            65..85 => (vec![HOT_KEY], LockMode::Shared),
            _ => {
                let mut keys = vec![HOT_KEY, random_cold_key(&mut rng)];
                keys.sort_unstable();
                let mode = if rng.random_bool(0.7) {
                    LockMode::Exclusive
                } else {
                    LockMode::Shared
                };
                (keys, mode)
            }
        };
        let names: Vec<Key> = keys.iter().map(|&k| key_name(k)).collect();
        // Short enough that waits behind the hot key's queue often run out, so expiries race
        // with grants (rule 8); tokio's timer rounds them up to whole milliseconds.
        let wait = Duration::from_micros(rng.random_range(100..=5_000));
        let now = Instant::now();
        let kind = rng.random_range(0..100);
        let outcome = match kind {
            // A try-lock.
            0..10 => Some(manager.acquire(&session, &names, mode, Some(now)).await),
            // A deadline.
            10..55 => Some(
                manager
                    .acquire(&session, &names, mode, Some(now + wait))
                    .await,
            ),
            // No deadline, but the caller gives up after `wait` and drops the future.
            55..70 => tokio::time::timeout(wait, manager.acquire(&session, &names, mode, None))
                .await
                .ok(),
            // A deadline, but the caller gives up after a few scheduler turns, often while a
            // grant is on its way: the future is dropped mid-wait whatever the clock says.
            70..85 => {
                let turns = rng.random_range(1..=20);
                tokio::select! {
                    outcome = manager.acquire(&session, &names, mode, Some(now + wait)) => {
                        Some(outcome)
                    }
                    () = yield_turns(turns) => None,
                }
            }
            // No deadline at all: only a grant ends the wait, so a lost wake-up hangs the task.
            _ => Some(manager.acquire(&session, &names, mode, None).await),
        };
        match outcome {
            Some(Ok(grant)) => {
                let class = match (keys.len(), mode) {
                    (2, _) => &stats.hot_and_cold_grants,
                    (_, LockMode::Exclusive) => &stats.hot_exclusive_grants,
                    (_, LockMode::Shared) => &stats.hot_shared_grants,
                };
                class.fetch_add(1, SeqCst);
                run.hold_then_release(&session, &keys, mode, grant, &mut rng)
                    .await;
            }
            Some(Err(LockError::Timeout { key })) => {
                assert!(
                    names.contains(&key),
                    "timeout names {key:?}, which {names:?} does not contain"
                );
                let counter = if kind < 10 {
                    &stats.try_lock_timeouts
                } else {
                    &stats.wait_timeouts
                };
                counter.fetch_add(1, SeqCst);
            }
            Some(Err(other)) => panic!("unexpected error from acquire of {names:?}: {other:?}"),
            None if kind < 70 => {
                stats.abandoned_by_timeout.fetch_add(1, SeqCst);
            }
            None => {
                stats.abandoned_by_select.fetch_add(1, SeqCst);
            }
        }
        assert!(
            manager.held_keys(&session).is_empty(),
            "a failed or abandoned request left locks behind (rules 4 and 9)"
        );
        tokio::task::yield_now().await;
    }
    session.close();
}

/// One task using cold keys only: each round asks for one or two random cold keys in a random
/// mode with no deadline, so every round must end in a grant. Returns the rounds granted.
async fn use_cold_keys(run: Arc<HotColdRun>, mut rng: StdRng) -> usize {
    let manager = &run.shared.manager;
    let session = manager.open_session();
    let mut granted = 0;
    for _ in 0..COLD_ROUNDS {
        let count = rng.random_range(1..=2);
        let mut keys: Vec<usize> = (0..count).map(|_| random_cold_key(&mut rng)).collect();
        keys.sort_unstable();
        keys.dedup();
        let names: Vec<Key> = keys.iter().map(|&k| key_name(k)).collect();
        let mode = if rng.random_bool(0.5) {
            LockMode::Exclusive
        } else {
            LockMode::Shared
        };
        match manager.acquire(&session, &names, mode, None).await {
            Ok(grant) => {
                run.stats.cold_grants.fetch_add(1, SeqCst);
                run.hold_then_release(&session, &keys, mode, grant, &mut rng)
                    .await;
                granted += 1;
            }
            Err(error) => panic!("cold request for {names:?} failed: {error:?}"),
        }
        tokio::task::yield_now().await;
    }
    session.close();
    granted
}

/// One hot key beside cold ones (see the module documentation).
///
/// Deadlocks cannot happen here, so none is allowed: no session holds a lock from before its
/// request, and every request takes its keys in sorted order. A session waiting on key `k` then
/// holds only keys below `k`, so a holder edge leads to a session waiting on a higher key, and a
/// waiter edge to one queued ahead on the same key; following edges, the key never goes down and,
/// on one key, the queue position strictly goes forward, so no path comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_beside_cold_keys_keeps_exclusion_and_nothing_hangs() {
    let run = Arc::new(HotColdRun {
        shared: Shared {
            manager: LockManager::new(LockManagerConfig::default()),
            keys: (0..HOT_COLD_KEYS).map(|_| KeyCounters::default()).collect(),
            stats: Stats::default(),
        },
        stats: HotColdStats::default(),
    });
    let started = std::time::Instant::now();
    // Interleave the spawns so the cold tasks start among the hot ones, not after them.
    let mut hot = Vec::with_capacity(HOT_TASKS);
    let mut cold = Vec::with_capacity(COLD_TASKS);
    for task in 0..HOT_TASKS {
        let rng = StdRng::seed_from_u64(0x4070_0000 + task as u64);
        hot.push(tokio::spawn(hammer_the_hot_key(Arc::clone(&run), rng)));
        if task % (HOT_TASKS / COLD_TASKS) == 0 && cold.len() < COLD_TASKS {
            let rng = StdRng::seed_from_u64(0xc01d_0000 + task as u64);
            cold.push(tokio::spawn(use_cold_keys(Arc::clone(&run), rng)));
        }
    }
    assert_eq!(cold.len(), COLD_TASKS);
    let all = async {
        let mut cold_rounds = Vec::with_capacity(COLD_TASKS);
        for task in cold {
            cold_rounds.push(task.await.expect("a cold-key task failed its checks"));
        }
        let cold_done = started.elapsed();
        for task in hot {
            task.await.expect("a hot-key task failed its checks");
        }
        (cold_rounds, cold_done)
    };
    let (cold_rounds, cold_done) = tokio::time::timeout(RUN_LIMIT, all)
        .await
        .expect("some task hung: the run did not finish in time");

    let stats = &run.stats;
    let count = |c: &AtomicU64| c.load(SeqCst);
    eprintln!(
        "{HOT_TASKS} hot-key tasks x {HOT_ROUNDS} rounds and {COLD_TASKS} cold-key tasks x \
         {COLD_ROUNDS} rounds in {:?} (cold ones done after {cold_done:?}): hot key granted {} exclusive, {} shared (at most {} \
         readers together), {} with a cold key; {} cold grants; {} try-lock timeouts, {} wait \
         timeouts, {} + {} abandoned (future dropped by a timeout + by a select)",
        started.elapsed(),
        count(&stats.hot_exclusive_grants),
        count(&stats.hot_shared_grants),
        stats.most_hot_readers.load(SeqCst),
        count(&stats.hot_and_cold_grants),
        count(&stats.cold_grants),
        count(&stats.try_lock_timeouts),
        count(&stats.wait_timeouts),
        count(&stats.abandoned_by_timeout),
        count(&stats.abandoned_by_select),
    );

    assert_eq!(
        cold_rounds,
        vec![COLD_ROUNDS; COLD_TASKS],
        "every cold-key task is granted every round"
    );
    let hot_requests = count(&stats.hot_exclusive_grants)
        + count(&stats.hot_shared_grants)
        + count(&stats.hot_and_cold_grants)
        + count(&stats.try_lock_timeouts)
        + count(&stats.wait_timeouts)
        + count(&stats.abandoned_by_timeout)
        + count(&stats.abandoned_by_select);
    assert_eq!(
        hot_requests,
        (HOT_TASKS * HOT_ROUNDS) as u64,
        "every hot-key request ends in a grant, a timeout or being dropped"
    );
    let manager = &run.shared.manager;
    let snapshot = manager.snapshot();
    assert!(snapshot.keys.is_empty(), "locks left over: {snapshot:?}");
    assert!(
        snapshot.is_empty(),
        "waits-for edges left over: {snapshot:?}"
    );
    assert_eq!(manager.session_count(), 0, "sessions left open");
    for (k, counters) in run.shared.keys.iter().enumerate() {
        assert_eq!(counters.readers.load(SeqCst), 0, "readers left on key {k}");
        assert_eq!(counters.writers.load(SeqCst), 0, "writers left on key {k}");
    }
    for (name, counter) in [
        (
            "exclusive grants of the hot key",
            &stats.hot_exclusive_grants,
        ),
        ("shared grants of the hot key", &stats.hot_shared_grants),
        (
            "grants of the hot key with a cold one",
            &stats.hot_and_cold_grants,
        ),
        ("try-lock timeouts", &stats.try_lock_timeouts),
        ("wait timeouts", &stats.wait_timeouts),
        ("requests dropped by a timeout", &stats.abandoned_by_timeout),
        ("requests dropped by a select", &stats.abandoned_by_select),
    ] {
        assert!(
            count(counter) > 0,
            "no {name} happened: the run proves little"
        );
    }
    assert!(
        stats.most_hot_readers.load(SeqCst) >= 2,
        "no two readers ever held the hot key together: the run proves little"
    );
}
