//! Criterion benchmarks of the wire protocol: what one request costs to decode and one answer to
//! encode, on the server's request path.
//!
//! Run with `cargo bench --bench protocol -- --warm-up-time 1 --measurement-time 3`.
//!
//! What each group measures:
//! - `decode`: one typical lock frame (`{"command":"lock","keys":["k17"],...,"id":42}`) through
//!   `decode_frame`.
//! - `encode`: a one-key token grant through `encode_reply`, an error answer through
//!   `encode_error`, and a `locks` answer listing 1,000 and 10,000 keys (one named holder each,
//!   a waiter on every tenth key, the waits-for edges that follow).

use std::collections::HashMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use locksmith::lock::{
    FencingToken, HolderSnapshot, Key, KeySnapshot, LockError, LockMode, SessionId, Snapshot,
    WaiterSnapshot,
};
use locksmith::protocol::{decode_frame, encode_error, encode_reply, Limits, Reply, ServiceError};
use serde_json::Value;

const LIMITS: Limits = Limits {
    max_keys_per_request: 1024,
};

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    let frame = r#"{"command":"lock","keys":["k17"],"mode":"write","timeout_ms":10000,"id":42}"#;
    group.throughput(Throughput::Elements(1));
    group.bench_function("lock_frame", |b| {
        b.iter(|| decode_frame(black_box(frame), LIMITS).is_ok())
    });
    group.finish();
}

/// A `locks` answer over `n` keys: key `i` held by session `i % 500` (even sessions named), and
/// every tenth key awaited by session `i % 500 + 1` in write mode.
fn locks_reply(n: usize) -> Reply {
    let taken_at = Instant::now();
    let since = taken_at
        .checked_sub(Duration::from_millis(5))
        .unwrap_or(taken_at);
    let session = |i: usize| SessionId::from_u128((i % 500) as u128 + 1);
    let keys = (0..n)
        .map(|i| KeySnapshot {
            key: Key::from(format!("key-{i:06}")),
            holders: vec![HolderSnapshot {
                session: session(i),
                mode: LockMode::Exclusive,
                token: FencingToken(i as u64 + 1),
                since,
            }],
            queue: if i % 10 == 0 {
                vec![WaiterSnapshot {
                    session: session(i + 1),
                    mode: LockMode::Exclusive,
                    upgrade: false,
                    since,
                }]
            } else {
                Vec::new()
            },
        })
        .collect();
    let names = (0..500)
        .filter(|i| i % 2 == 0)
        .map(|i| (session(i), format!("worker-{i}")))
        .collect();
    Reply::Locks {
        snapshot: Snapshot::from_keys(keys),
        taken_at,
        sessions: 500,
        names,
        suspended: HashMap::new(),
        more: 0,
        limit: n,
    }
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    let id = Value::from(42);
    let tokens = Reply::Tokens(vec![(Key::from("k17"), FencingToken(1234))]);
    group.throughput(Throughput::Elements(1));
    group.bench_function("one_key_tokens", |b| {
        b.iter(|| encode_reply(Some(black_box(&id)), black_box(&tokens)))
    });
    let timeout = ServiceError::Lock(LockError::Timeout {
        key: Key::from("k17"),
    });
    group.bench_function("timeout_error", |b| {
        b.iter(|| encode_error(Some(black_box(&id)), black_box(&timeout)))
    });
    for n in [1_000, 10_000] {
        let reply = locks_reply(n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new("locks_keys", n), &reply, |b, reply| {
            b.iter(|| encode_reply(Some(&id), black_box(reply)).len())
        });
    }
    group.finish();
}

criterion_group!(benches, decode, encode);
criterion_main!(benches);
