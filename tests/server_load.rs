//! The load test over the wire: 1000 concurrent clients, each doing 50 random operations
//! (lock/unlock/read/write, random modes and `hold_lock`, over 100 keys, with 50–500 ms
//! timeouts). It checks that
//! - every request gets its answer (in order, within a bound),
//! - the only errors are `deadlock` and `timeout` (each client tracks what it holds, so it never
//!   unlocks what it does not hold), and a failed request changes nothing,
//! - mutual exclusion holds: a client holding a key exclusively writes a unique value and reads it
//!   back unchanged, again and again, until it unlocks the key,
//! - the server's view of each session's locks matches what the client believes it holds,
//! - at the end nothing is held (`locks` is empty), and once everyone disconnects the lock table
//!   is empty and no session is left.
//!
//! The test raises its own open-file limit. Run it in release:
//! `cargo test --release --test server_load`. `LOAD_SEED=<n>` replays one set of operation
//! sequences (the scheduling still varies).

mod wire;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use locksmith::lock::{LockManager, LockMode};
use locksmith::server::ServerSettings;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use wire::{settings, start, Client};

const CLIENTS: usize = 1000;
const OPS_PER_CLIENT: usize = 50;
const KEYS: usize = 100;
/// A client holding this many keys unlocks before it takes more, so keys keep moving.
const MOST_HELD: usize = 4;
/// No answer may take longer than this. Requests wait at most 500 ms for locks; the rest is
/// slack for a small, busy machine.
const ANSWER_BOUND: Duration = Duration::from_secs(30);

#[derive(Default, Debug)]
struct Totals {
    ops: u64,
    requests: u64,
    deadlocks: u64,
    timeouts: u64,
    exclusion_checks: u64,
}

impl Totals {
    fn add(&mut self, other: &Totals) {
        self.ops += other.ops;
        self.requests += other.requests;
        self.deadlocks += other.deadlocks;
        self.timeouts += other.timeouts;
        self.exclusion_checks += other.exclusion_checks;
    }
}

/// One load client: its connection, what it believes it holds, and the values it wrote under
/// exclusive locks it still holds.
struct Worker {
    client: Client,
    id: usize,
    rng: StdRng,
    locks: LockManager,
    next_id: u64,
    next_value: u64,
    /// Keys held, with their mode.
    held: BTreeMap<String, LockMode>,
    /// For keys held exclusively since this client last wrote them: the value written.
    written: BTreeMap<String, Value>,
    totals: Totals,
}

impl Worker {
    /// Sends `request` with a fresh id and returns its answer, checking the id (answers come in
    /// order) and that every error is `deadlock` or `timeout`. `Err(code)` for those.
    async fn call(&mut self, mut request: Value) -> Result<Value, String> {
        let id = self.next_id;
        self.next_id += 1;
        request["id"] = json!(id);
        self.client.send(request.clone()).await;
        self.totals.requests += 1;
        let answer = self.client.recv_within(ANSWER_BOUND).await;
        assert_eq!(
            answer["id"],
            json!(id),
            "client {}: {request} -> {answer}",
            self.id
        );
        if answer["success"] == json!(true) {
            return Ok(answer);
        }
        let code = answer["code"].as_str().unwrap_or_default().to_owned();
        match code.as_str() {
            "deadlock" => self.totals.deadlocks += 1,
            "timeout" => self.totals.timeouts += 1,
            _ => panic!(
                "client {}: only deadlock and timeout may fail: {request} -> {answer}",
                self.id
            ),
        }
        Err(code)
    }

    fn random_keys(&mut self) -> Vec<String> {
        let count = self.rng.random_range(1..=3);
        rand::seq::index::sample(&mut self.rng, KEYS, count)
            .into_iter()
            .map(|k| format!("key{k}"))
            .collect()
    }

    fn timeout_ms(&mut self) -> u64 {
        self.rng.random_range(50..=500)
    }

    fn hold(&mut self, keys: &[String], mode: LockMode) {
        for key in keys {
            let held = self.held.entry(key.clone()).or_insert(mode);
            *held = (*held).max(mode);
        }
    }

    /// Reads `keys` (all held) without waiting, and checks the values written under exclusive
    /// locks are still there: nobody else wrote while this client held them.
    async fn check_exclusion(&mut self, keys: &[String]) {
        let answer = self
            .call(json!({"command": "read", "keys": keys, "timeout_ms": 0}))
            .await
            .unwrap_or_else(|code| {
                panic!(
                    "client {}: reading held keys {keys:?} must not wait: {code}",
                    self.id
                )
            });
        self.check_values(&answer);
    }

    fn check_values(&mut self, answer: &Value) {
        for (key, value) in answer["values"].as_object().expect("values") {
            if let Some(expected) = self.written.get(key) {
                self.totals.exclusion_checks += 1;
                assert_eq!(
                    value, expected,
                    "client {}: key {key} changed while held exclusively",
                    self.id
                );
            }
        }
    }

    /// The server's view of this session's locks equals what the client believes.
    fn check_server_view(&self) {
        let snapshot = self.locks.snapshot();
        let mut seen = BTreeMap::new();
        for entry in &snapshot.keys {
            for holder in &entry.holders {
                if holder.session.to_string() == self.client.session {
                    seen.insert(entry.key.to_string(), holder.mode);
                }
            }
            assert!(
                !entry
                    .queue
                    .iter()
                    .any(|w| w.session.to_string() == self.client.session),
                "client {}: queued on {} between requests",
                self.id,
                entry.key
            );
        }
        assert_eq!(
            seen, self.held,
            "client {}: server view of its locks",
            self.id
        );
    }

    async fn unlock(&mut self, keys: Vec<String>) {
        let exclusive: Vec<String> = keys
            .iter()
            .filter(|k| self.written.contains_key(*k))
            .cloned()
            .collect();
        if !exclusive.is_empty() {
            self.check_exclusion(&exclusive).await;
        }
        let answer = self.call(json!({"command": "unlock", "keys": keys})).await;
        assert!(answer.is_ok(), "client {}: unlock of held keys", self.id);
        for key in &keys {
            self.held.remove(key);
            self.written.remove(key);
        }
    }

    async fn random_op(&mut self) {
        self.totals.ops += 1;
        let mut kind = self.rng.random_range(0..4);
        if self.held.len() >= MOST_HELD {
            kind = 1;
        }
        match kind {
            0 => {
                let keys = self.random_keys();
                let mode = if self.rng.random_bool(0.5) {
                    LockMode::Shared
                } else {
                    LockMode::Exclusive
                };
                let name = if mode == LockMode::Shared {
                    "read"
                } else {
                    "write"
                };
                let timeout = self.timeout_ms();
                let request =
                    json!({"command": "lock", "keys": keys, "mode": name, "timeout_ms": timeout});
                if self.call(request).await.is_ok() {
                    self.hold(&keys, mode);
                }
            }
            1 if !self.held.is_empty() => {
                let held: Vec<String> = self.held.keys().cloned().collect();
                let count = self.rng.random_range(1..=held.len());
                let keys: Vec<String> = rand::seq::index::sample(&mut self.rng, held.len(), count)
                    .into_iter()
                    .map(|i| held[i].clone())
                    .collect();
                self.unlock(keys).await;
            }
            1 | 2 => {
                let keys = self.random_keys();
                let hold_lock = self.rng.random_bool(0.5);
                let timeout = self.timeout_ms();
                let request = json!({"command": "read", "keys": keys, "hold_lock": hold_lock, "timeout_ms": timeout});
                if let Ok(answer) = self.call(request).await {
                    self.check_values(&answer);
                    if hold_lock {
                        self.hold(&keys, LockMode::Shared);
                    }
                }
            }
            _ => {
                let keys = self.random_keys();
                let hold_lock = self.rng.random_bool(0.5);
                let timeout = self.timeout_ms();
                let values: Vec<Value> = keys
                    .iter()
                    .map(|_| {
                        self.next_value += 1;
                        json!(format!("client{}-{}", self.id, self.next_value))
                    })
                    .collect();
                let request = json!({"command": "write", "keys": keys, "values": values, "hold_lock": hold_lock, "timeout_ms": timeout});
                if self.call(request).await.is_ok() {
                    if hold_lock {
                        self.hold(&keys, LockMode::Exclusive);
                    }
                    // Keys still held exclusively after the write: remember what was written and
                    // read it back at once.
                    let exclusive: Vec<String> = keys
                        .iter()
                        .zip(&values)
                        .filter(|(k, _)| self.held.get(*k) == Some(&LockMode::Exclusive))
                        .map(|(k, v)| {
                            self.written.insert(k.clone(), v.clone());
                            k.clone()
                        })
                        .collect();
                    if !exclusive.is_empty() {
                        self.check_exclusion(&exclusive).await;
                    }
                }
            }
        }
        if self.totals.ops.is_multiple_of(10) {
            self.check_server_view();
        }
    }

    async fn run(mut self) -> (Client, Totals) {
        for _ in 0..OPS_PER_CLIENT {
            self.random_op().await;
        }
        self.check_server_view();
        let held: Vec<String> = self.held.keys().cloned().collect();
        if !held.is_empty() {
            self.unlock(held).await;
        }
        self.check_server_view();
        (self.client, self.totals)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_doing_random_operations_are_all_answered_exclusion_holds_and_nothing_is_left_held(
) {
    let limit = rlimit::increase_nofile_limit(u64::MAX).expect("raise the open-file limit");
    // Each client is two sockets in this process (client and server side), plus slack.
    assert!(
        limit >= (2 * CLIENTS + 200) as u64,
        "open-file limit {limit} is too low for {CLIENTS} clients"
    );
    let seed: u64 = std::env::var("LOAD_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x10c5_5417);
    eprintln!("load test seed: {seed} (LOAD_SEED to replay)");

    let server = start(ServerSettings {
        lock_timeout: Duration::from_secs(10),
        max_connections: 2 * CLIENTS,
        ..settings()
    })
    .await;
    let started = Instant::now();

    // Connect everyone first (a few dozen handshakes at a time, so the listen backlog never
    // overflows), then start them together.
    let url = server.url();
    let connecting = Arc::new(Semaphore::new(64));
    let mut connects = tokio::task::JoinSet::new();
    for i in 0..CLIENTS {
        let url = url.clone();
        let connecting = connecting.clone();
        connects.spawn(async move {
            let _permit = connecting.acquire().await.expect("semaphore");
            let mut client = Client::connect(&url).await;
            client.learn_session().await;
            (i, client)
        });
    }
    let mut clients: Vec<(usize, Client)> = Vec::with_capacity(CLIENTS);
    while let Some(result) = connects.join_next().await {
        clients.push(result.expect("connect task"));
    }
    assert_eq!(server.locks().session_count(), CLIENTS);
    let connected = started.elapsed();

    let start_line = Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let mut workers = tokio::task::JoinSet::new();
    for (i, client) in clients {
        let worker = Worker {
            client,
            id: i,
            rng: StdRng::seed_from_u64(seed.wrapping_add(i as u64)),
            locks: server.locks().clone(),
            next_id: 0,
            next_value: 0,
            held: BTreeMap::new(),
            written: BTreeMap::new(),
            totals: Totals::default(),
        };
        let start_line = start_line.clone();
        workers.spawn(async move {
            start_line.wait().await;
            worker.run().await
        });
    }
    let mut totals = Totals::default();
    let mut clients = Vec::with_capacity(CLIENTS);
    while let Some(result) = workers.join_next().await {
        let (client, worker_totals) = result.unwrap_or_else(|e| panic!("a client failed: {e}"));
        totals.add(&worker_totals);
        clients.push(client);
    }
    let ran = started.elapsed();

    // Everyone has unlocked what it held, and everyone is still connected.
    let locks = clients[0].locks().await;
    assert_eq!(locks["locks"], json!([]), "nothing is held at the end");
    assert_eq!(locks["waits_for"], json!([]));
    assert_eq!(locks["sessions"], json!(CLIENTS));
    assert_eq!(totals.ops, (CLIENTS * OPS_PER_CLIENT) as u64);

    drop(clients);
    server.wait_idle().await;
    wire::assert_no_server_panics();
    eprintln!(
        "load test: {CLIENTS} clients, {} ops, {} requests, {} deadlocks, {} timeouts, \
         {} exclusion checks; connected in {connected:.2?}, ran in {:.2?}, total {:.2?}",
        totals.ops,
        totals.requests,
        totals.deadlocks,
        totals.timeouts,
        totals.exclusion_checks,
        ran - connected,
        started.elapsed()
    );
    assert!(totals.exclusion_checks > 0, "the exclusion check ran");
    server.stop().await;
}
