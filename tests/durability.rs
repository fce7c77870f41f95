//! Durable values: what a write answered `success` promises across restarts and crashes, how
//! storage failures are answered, and when the server refuses to start.
//!
//! The crash test runs the real `locksmith` binary and kills it with SIGKILL; the others start the
//! server in-process on a random loopback port.

use std::fmt;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use locksmith::server::{self, RunningServer, ServerSettings};
use locksmith::store::{RedbStore, Store};
use rand::Rng;
use redb::backends::InMemoryBackend;
use redb::StorageBackend;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Bound on every single wait in these tests.
const PATIENCE: Duration = Duration::from_secs(20);

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A minimal JSON client.
struct Client {
    socket: Socket,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let (socket, _) = tokio::time::timeout(
            PATIENCE,
            tokio_tungstenite::connect_async(format!("ws://{addr}/ws")),
        )
        .await
        .expect("connect in time")
        .expect("connect");
        Client { socket }
    }

    /// Sends a request and returns the answer, or `None` if the connection broke.
    async fn try_request(&mut self, request: Value) -> Option<Value> {
        self.socket
            .send(Message::text(request.to_string()))
            .await
            .ok()?;
        loop {
            match tokio::time::timeout(PATIENCE, self.socket.next())
                .await
                .expect("an answer in time")
            {
                Some(Ok(Message::Text(text))) => {
                    return Some(serde_json::from_str(text.as_str()).expect("JSON answer"))
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                _ => return None,
            }
        }
    }

    async fn request(&mut self, request: Value) -> Value {
        self.try_request(request.clone())
            .await
            .unwrap_or_else(|| panic!("no answer to {request}"))
    }
}

async fn start_in_process(store: Arc<dyn Store>) -> RunningServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    server::start(vec![listener], ServerSettings::default(), store).expect("start")
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
    let mut client = Client::connect(server.local_addrs()[0]).await;
    let writes = [
        json!({"command": "write", "keys": ["a"], "values": [1]}),
        json!({"command": "write", "keys": ["b"], "value": {"nested": [1, 2]}}),
        json!({"command": "write", "keys": ["c", "d"], "value": ["x", null]}),
        json!({"command": "write", "keys": ["e", "f", "g"], "values": [true, 2.5, "z"]}),
    ];
    for write in writes {
        assert_eq!(client.request(write).await["success"], json!(true));
    }
    drop(client);
    stop_in_process(server, store).await;

    let store = Arc::new(RedbStore::open(dir.path()).expect("reopen"));
    let server = start_in_process(store.clone()).await;
    let mut client = Client::connect(server.local_addrs()[0]).await;
    let read = client
        .request(json!({"command": "read", "keys": ["a", "b", "c", "d", "e", "f", "g", "never"]}))
        .await;
    assert_eq!(
        read["values"],
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
    let mut client = Client::connect(server.local_addrs()[0]).await;
    let locked = client
        .request(json!({"command": "write", "keys": ["k"], "values": [1], "hold_lock": true}))
        .await;
    assert_eq!(locked["success"], json!(true));
    stop_in_process(server, store).await;

    let store = Arc::new(RedbStore::open(dir.path()).expect("reopen"));
    let server = start_in_process(store.clone()).await;
    let mut client = Client::connect(server.local_addrs()[0]).await;
    assert_eq!(
        client.request(json!({"command": "locks"})).await["locks"],
        json!([])
    );
    let relock = client
        .request(json!({"command": "lock", "keys": ["k"], "timeout_ms": 0}))
        .await;
    assert_eq!(relock["success"], json!(true), "{relock}");
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
    let mut client = Client::connect(server.local_addrs()[0]).await;
    let first = client
        .request(json!({"command": "write", "keys": ["a", "b"], "values": [1, 1]}))
        .await;
    assert_eq!(first["success"], json!(true));

    disk.failing.store(true, Ordering::SeqCst);
    for attempt in 0..2 {
        let failed = client
            .request(
                json!({"command": "write", "keys": ["a", "b"], "values": [2, 2], "id": attempt}),
            )
            .await;
        assert_eq!(failed["success"], json!(false), "{failed}");
        assert_eq!(failed["code"], json!("storage_error"), "{failed}");
        assert_eq!(failed["id"], json!(attempt));
    }
    let read = client
        .request(json!({"command": "read", "keys": ["a", "b"]}))
        .await;
    assert_eq!(read["values"], json!({"a": 1, "b": 1}), "nothing changed");
    let locks = client.request(json!({"command": "locks"})).await;
    assert_eq!(
        locks["locks"],
        json!([]),
        "the failed write gave its locks back"
    );
    let lock = client
        .request(json!({"command": "lock", "keys": ["c"], "timeout_ms": 0}))
        .await;
    assert_eq!(lock["success"], json!(true), "locks keep working: {lock}");
    assert_eq!(
        client
            .request(json!({"command": "unlock", "keys": ["c"]}))
            .await["success"],
        json!(true)
    );

    disk.failing.store(false, Ordering::SeqCst);
    let healed = client
        .request(json!({"command": "write", "keys": ["a", "b"], "values": [3, 3]}))
        .await;
    assert_eq!(healed["success"], json!(true), "writes resume: {healed}");
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

/// A `locksmith` process serving on a random loopback port with `--data-dir dir`.
struct ServerProcess {
    child: Child,
    addr: SocketAddr,
}

impl ServerProcess {
    fn start(dir: &Path) -> ServerProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_locksmith"))
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn locksmith");
        let stdout = child.stdout.take().expect("piped stdout");
        let (lines, listening) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        let addr = loop {
            let line = listening
                .recv_timeout(PATIENCE)
                .expect("the server says where it listens");
            if let Some(rest) = line.split("listening on ws://").nth(1) {
                let addr = rest.trim_end_matches("/ws").trim();
                break addr.parse().expect("a socket address");
            }
        };
        ServerProcess { child, addr }
    }

    /// Kills the server with SIGKILL and reaps it (what `Drop` does).
    fn kill(self) {
        drop(self);
    }
}

impl Drop for ServerProcess {
    /// Kills the server whatever happens to the test, so a failing assertion never leaves a
    /// server process behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
async fn write_until_killed(
    addr: SocketAddr,
    prefix: String,
    acks: Arc<AtomicU64>,
    max_token: Arc<AtomicU64>,
) -> [Ledger; 2] {
    let mut ledgers = [Ledger::default(); 2];
    let mut client = Client::connect(addr).await;
    for n in 1u64.. {
        let multi = n % 2 == 0;
        let (ledger, request) = if multi {
            let keys = [
                format!("{prefix}-a"),
                format!("{prefix}-b"),
                format!("{prefix}-c"),
            ];
            (
                &mut ledgers[0],
                json!({"command": "write", "keys": keys, "values": [n, n, n]}),
            )
        } else {
            (
                &mut ledgers[1],
                json!({"command": "write", "keys": [format!("{prefix}-s")], "value": n}),
            )
        };
        ledger.sent = n;
        match client.try_request(request).await {
            Some(answer) if answer["success"] == json!(true) => {
                ledger.acked = n;
                for token in answer["tokens"]
                    .as_object()
                    .into_iter()
                    .flat_map(|t| t.values())
                {
                    max_token.fetch_max(token.as_u64().unwrap_or(0), Ordering::SeqCst);
                }
                acks.fetch_add(1, Ordering::SeqCst);
            }
            Some(answer) => panic!("a write failed while the server was up: {answer}"),
            None => break,
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
        let server = ServerProcess::start(dir.path());
        let acks = Arc::new(AtomicU64::new(0));
        let max_token = Arc::new(AtomicU64::new(0));
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let prefix = format!("i{iteration}w{w}");
                let acks = acks.clone();
                let max_token = max_token.clone();
                let addr = server.addr;
                tokio::spawn(async move {
                    (
                        prefix.clone(),
                        write_until_killed(addr, prefix, acks, max_token).await,
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
        let server = ServerProcess::start(dir.path());
        let mut reader = Client::connect(server.addr).await;
        for (prefix, [multi, single]) in &history {
            let keys = ["a", "b", "c", "s"].map(|k| format!("{prefix}-{k}"));
            let answer = reader
                .request(json!({"command": "read", "keys": keys}))
                .await;
            let values: Vec<Value> = keys.iter().map(|k| answer["values"][k].clone()).collect();
            check_ledger(&values[..3], *multi, &format!("{prefix} three-key write"));
            check_ledger(&values[3..], *single, &format!("{prefix} single-key write"));
        }
        // Fencing tokens keep increasing across the restart (rule 10).
        let fresh = reader
            .request(json!({"command": "lock", "keys": [format!("token-probe-{iteration}")]}))
            .await;
        let fresh = fresh["tokens"][format!("token-probe-{iteration}")]
            .as_u64()
            .unwrap_or(0);
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

fn run_to_exit(dir: &Path) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_locksmith"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn locksmith");
    let (done, finished) = mpsc::channel();
    let stderr = child.stderr.take().expect("piped stderr");
    std::thread::spawn(move || {
        let text = std::io::read_to_string(stderr).unwrap_or_default();
        let _ = done.send(text);
    });
    let text = match finished.recv_timeout(PATIENCE) {
        Ok(text) => text,
        Err(_) => {
            let _ = child.kill();
            panic!("the server did not exit on a database it must refuse");
        }
    };
    (child.wait().expect("exit status"), text)
}

#[test]
fn refuses_to_start_over_a_corrupt_database_and_leaves_it_untouched() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join(locksmith::store::durable::DATABASE_FILE);
    let garbage: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(&file, &garbage).expect("write garbage");
    let (status, stderr) = run_to_exit(dir.path());
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
    let first = ServerProcess::start(dir.path());
    let (status, stderr) = run_to_exit(dir.path());
    first.kill();
    assert!(!status.success(), "exit status {status}");
    assert!(
        stderr.contains("in use by another process"),
        "message: {stderr}"
    );
}
