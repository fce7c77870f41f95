//! Durable values: what a write answered `success` promises across restarts and crashes, how
//! storage failures are answered, and when the server refuses to start.
//!
//! The crash test runs the real `locksmith` binary (through `tests/binary`) and kills it with
//! SIGKILL; the others start the server in-process on a random loopback port. The clients are the
//! client library's, so a write that fails tells a broken connection
//! ([`ClientError::ConnectionLost`]) from a refusal by a server that is up.

mod binary;

use std::fmt;
use std::future::Future;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use binary::{finish, locksmith, ServerProcess, PATIENCE};
use locksmith::client::{Client, ClientError, Grant};
use locksmith::lock::LockMode::Exclusive;
use locksmith::server::{self, RunningServer, ServerSettings};
use locksmith::store::{RedbStore, Store};
use rand::Rng;
use redb::backends::InMemoryBackend;
use redb::StorageBackend;
use serde_json::{json, Value};

/// `call`, which must finish within [`PATIENCE`].
async fn within<T>(call: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, call)
        .await
        .expect("an answer in time")
}

/// A library client connected to `url`.
async fn connect(url: &str) -> Client {
    within(Client::connect(url)).await.expect("connect")
}

async fn start_in_process(store: Arc<dyn Store>) -> RunningServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    server::start(vec![listener], ServerSettings::default(), store).expect("start")
}

/// The URL of a server running in this process.
fn url_of(server: &RunningServer) -> String {
    format!("ws://{}/ws", server.local_addrs()[0])
}

/// Shuts the server down and waits until the store is no longer shared, then drops it (which
/// closes the database file, so it can be opened again).
async fn stop_in_process(server: RunningServer, store: Arc<RedbStore>) {
    server.shutdown().await;
    let mut store = store;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match Arc::try_unwrap(store) {
            Ok(store) => {
                drop(store);
                return;
            }
            Err(shared) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the server kept its store after shutdown"
                );
                store = shared;
                tokio::task::yield_now().await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_survive_a_restart_on_the_same_directory_in_every_write_form() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(RedbStore::open(dir.path()).expect("open"));
    let server = start_in_process(store.clone()).await;
    let client = connect(&url_of(&server)).await;
    // Raw requests: the typed `write` sends only the `values` form.
    let writes = [
        json!({"command": "write", "keys": ["a"], "values": [1]}),
        json!({"command": "write", "keys": ["b"], "value": {"nested": [1, 2]}}),
        json!({"command": "write", "keys": ["c", "d"], "value": ["x", null]}),
        json!({"command": "write", "keys": ["e", "f", "g"], "values": [true, 2.5, "z"]}),
    ];
    for write in writes {
        let answer = within(client.request(write.clone())).await;
        assert!(answer.is_ok(), "{write}: {answer:?}");
    }
    drop(client);
    stop_in_process(server, store).await;

    let store = Arc::new(RedbStore::open(dir.path()).expect("reopen"));
    let server = start_in_process(store.clone()).await;
    let client = connect(&url_of(&server)).await;
    let read = within(client.read(&["a", "b", "c", "d", "e", "f", "g", "never"], false))
        .await
        .expect("read");
    assert_eq!(
        json!(read),
        json!({"a": 1, "b": {"nested": [1, 2]}, "c": "x", "d": null, "e": true, "f": 2.5,
               "g": "z", "never": null})
    );
    drop(client);
    stop_in_process(server, store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_are_not_persistent_across_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(RedbStore::open(dir.path()).expect("open"));
    let server = start_in_process(store.clone()).await;
    let client = connect(&url_of(&server)).await;
    within(client.write(&[("k", json!(1))], true))
        .await
        .expect("write keeping the lock");
    stop_in_process(server, store).await;

    let store = Arc::new(RedbStore::open(dir.path()).expect("reopen"));
    let server = start_in_process(store.clone()).await;
    let client = connect(&url_of(&server)).await;
    let table = within(client.locks(None)).await.expect("locks");
    assert_eq!(table.locks, vec![]);
    let relock = within(client.lock(&["k"], Exclusive, Some(Duration::ZERO))).await;
    assert!(relock.is_ok(), "{relock:?}");
    drop(client);
    stop_in_process(server, store).await;
}

// ----- storage failures --------------------------------------------------------------------

/// An in-memory redb backend whose writes and syncs fail while `failing` is set; reads always
/// work. Clones share the same bytes, so a reopened database sees what was committed.
#[derive(Clone)]
struct FlakyDisk {
    bytes: Arc<InMemoryBackend>,
    failing: Arc<AtomicBool>,
}

impl fmt::Debug for FlakyDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FlakyDisk")
    }
}

impl FlakyDisk {
    fn check(&self) -> std::io::Result<()> {
        if self.failing.load(Ordering::SeqCst) {
            Err(std::io::Error::other("injected I/O failure"))
        } else {
            Ok(())
        }
    }
}

impl StorageBackend for FlakyDisk {
    fn len(&self) -> std::io::Result<u64> {
        self.bytes.len()
    }
    fn read(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        self.bytes.read(offset, len)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.check()?;
        self.bytes.set_len(len)
    }
    fn sync_data(&self, eventual: bool) -> std::io::Result<()> {
        self.check()?;
        self.bytes.sync_data(eventual)
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.check()?;
        self.bytes.write(offset, data)
    }
}

fn store_on(disk: &FlakyDisk) -> RedbStore {
    let disk = disk.clone();
    RedbStore::open_with(
        "flaky disk",
        Box::new(move || redb::Builder::new().create_with_backend(disk.clone())),
    )
    .expect("open on the flaky disk")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_commit_answers_storage_error_changes_nothing_and_reads_and_locks_go_on() {
    let disk = FlakyDisk {
        bytes: Arc::new(InMemoryBackend::new()),
        failing: Arc::new(AtomicBool::new(false)),
    };
    let store = Arc::new(store_on(&disk));
    let server = start_in_process(store.clone()).await;
    let client = connect(&url_of(&server)).await;
    within(client.write(&[("a", json!(1)), ("b", json!(1))], false))
        .await
        .expect("first write");

    disk.failing.store(true, Ordering::SeqCst);
    for _ in 0..2 {
        // The client matches answers by `id`: an error answer without its request's `id` would
        // never reach this call, and `within` would fail.
        let failed = within(client.write(&[("a", json!(2)), ("b", json!(2))], false)).await;
        assert!(
            matches!(failed, Err(ClientError::Storage(_))),
            "storage_error expected: {failed:?}"
        );
    }
    let read = within(client.read(&["a", "b"], false)).await.expect("read");
    assert_eq!(json!(read), json!({"a": 1, "b": 1}), "nothing changed");
    let table = within(client.locks(None)).await.expect("locks");
    assert_eq!(table.locks, vec![], "the failed write gave its locks back");
    let lock = within(client.lock(&["c"], Exclusive, Some(Duration::ZERO))).await;
    assert!(lock.is_ok(), "locks keep working: {lock:?}");
    within(client.unlock(&["c"])).await.expect("unlock");

    disk.failing.store(false, Ordering::SeqCst);
    let healed = within(client.write(&[("a", json!(3)), ("b", json!(3))], false)).await;
    assert!(healed.is_ok(), "writes resume: {healed:?}");
    drop(client);
    stop_in_process(server, store).await;

    let reopened = store_on(&disk);
    assert_eq!(
        reopened.read(&["a", "b"]).expect("read"),
        vec![Some(json!(3)), Some(json!(3))],
        "the write after recovery is durable, the failed ones never happened"
    );
}

// ----- the real binary: crashes and refusals to start --------------------------------------

/// The binary serving the values kept in `dir`.
fn serving(dir: &Path) -> Command {
    let mut command = locksmith();
    command.arg("--data-dir").arg(dir);
    command
}

/// What one writer client knows about its own writes: the last sequence number acknowledged
/// and the last one sent (sent may be one ahead: in flight when the server died).
#[derive(Default, Clone, Copy)]
struct Ledger {
    acked: u64,
    sent: u64,
}

/// Writes in a loop until the connection breaks: alternately a three-key write of `n` to
/// `{prefix}-a/b/c` and a single-key write (original `value` form) of `n` to `{prefix}-s`.
/// Any other failure of a write (a refusal while the server is up) fails the test.
async fn write_until_killed(
    url: String,
    prefix: String,
    acks: Arc<AtomicU64>,
    max_token: Arc<AtomicU64>,
) -> [Ledger; 2] {
    let mut ledgers = [Ledger::default(); 2];
    let client = connect(&url).await;
    for n in 1u64.. {
        let multi = n % 2 == 0;
        let ledger = &mut ledgers[usize::from(!multi)];
        ledger.sent = n;
        let written: Result<Grant, ClientError> = if multi {
            let entries = ["a", "b", "c"].map(|k| (format!("{prefix}-{k}"), json!(n)));
            within(client.write(&entries, false)).await
        } else {
            // Raw: the typed `write` sends only the `values` form.
            let request = json!({"command": "write", "keys": [format!("{prefix}-s")], "value": n});
            within(client.request(request))
                .await
                .map(|answer| serde_json::from_value(answer).expect("a grant"))
        };
        match written {
            Ok(grant) => {
                ledger.acked = n;
                for token in grant.tokens.values() {
                    max_token.fetch_max(*token, Ordering::SeqCst);
                }
                acks.fetch_add(1, Ordering::SeqCst);
            }
            // The server was killed: what this writer runs until.
            Err(ClientError::ConnectionLost { .. }) => break,
            Err(refused) => panic!("a write failed while the server was up: {refused:?}"),
        }
    }
    ledgers
}

/// Checks one key group after a restart: the value is the last acknowledged write or the one in
/// flight, never older; `values` all equal (no multi-key write is half visible).
fn check_ledger(values: &[Value], ledger: Ledger, what: &str) {
    let first = &values[0];
    assert!(
        values.iter().all(|v| v == first),
        "{what}: a multi-key write is half visible: {values:?}"
    );
    let found = first.as_u64().unwrap_or(0);
    assert!(
        found >= ledger.acked && found <= ledger.sent,
        "{what}: found {found}, but {} was acknowledged and {} sent",
        ledger.acked,
        ledger.sent
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_survives_sigkill_and_no_multi_key_write_is_half_visible() {
    let iterations: usize = std::env::var("LOCKSMITH_CRASH_ITERATIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(5);
    const WRITERS: usize = 4;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut history: Vec<(String, [Ledger; 2])> = Vec::new();
    for iteration in 0..iterations {
        let server = ServerProcess::start(serving(dir.path()));
        let acks = Arc::new(AtomicU64::new(0));
        let max_token = Arc::new(AtomicU64::new(0));
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let prefix = format!("i{iteration}w{w}");
                let acks = acks.clone();
                let max_token = max_token.clone();
                let url = server.url();
                tokio::spawn(async move {
                    (
                        prefix.clone(),
                        write_until_killed(url, prefix, acks, max_token).await,
                    )
                })
            })
            .collect();
        // Kill at a random moment: after a random number of acknowledged writes.
        let kill_after = rand::rng().random_range(10..300);
        let waited = tokio::time::timeout(PATIENCE, async {
            while acks.load(Ordering::SeqCst) < kill_after {
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(waited.is_ok(), "writers made no progress");
        server.kill();
        for writer in writers {
            history.push(writer.await.expect("writer task"));
        }

        // Restart and check every write of every iteration so far.
        let server = ServerProcess::start(serving(dir.path()));
        let reader = connect(&server.url()).await;
        for (prefix, [multi, single]) in &history {
            let keys = ["a", "b", "c", "s"].map(|k| format!("{prefix}-{k}"));
            let read = within(reader.read(&keys, false)).await.expect("read");
            let values: Vec<Value> = keys.iter().map(|k| read[k].clone()).collect();
            check_ledger(&values[..3], *multi, &format!("{prefix} three-key write"));
            check_ledger(&values[3..], *single, &format!("{prefix} single-key write"));
        }
        // Fencing tokens keep increasing across the restart (rule 10).
        let probe = format!("token-probe-{iteration}");
        let grant = within(reader.lock(&[&probe], Exclusive, None))
            .await
            .expect("lock");
        let fresh = grant.tokens[&probe];
        let before = max_token.load(Ordering::SeqCst);
        assert!(
            fresh > before,
            "token {fresh} after the restart, {before} before it"
        );
        drop(reader);
        server.kill();
    }
    assert!(history
        .iter()
        .any(|(_, [multi, single])| multi.acked + single.acked > 0));
}

/// Starts the binary on `dir`, which it must refuse; returns its exit status and stderr.
fn refused_start(dir: &Path) -> (std::process::ExitStatus, String) {
    let mut command = serving(dir);
    command.args(["--listen", "127.0.0.1:0"]);
    let finished = finish(command);
    (finished.status, finished.stderr)
}

#[test]
fn refuses_to_start_over_a_corrupt_database_and_leaves_it_untouched() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join(locksmith::store::durable::DATABASE_FILE);
    let garbage: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(&file, &garbage).expect("write garbage");
    let (status, stderr) = refused_start(dir.path());
    assert!(!status.success(), "exit status {status}");
    assert!(stderr.contains("corrupt"), "message: {stderr}");
    assert_eq!(
        std::fs::read(&file).expect("read back"),
        garbage,
        "the file was modified"
    );
}

#[test]
fn refuses_to_start_on_a_data_directory_in_use() {
    let dir = tempfile::tempdir().expect("temp dir");
    let first = ServerProcess::start(serving(dir.path()));
    let (status, stderr) = refused_start(dir.path());
    first.kill();
    assert!(!status.success(), "exit status {status}");
    assert!(
        stderr.contains("in use by another process"),
        "message: {stderr}"
    );
}
