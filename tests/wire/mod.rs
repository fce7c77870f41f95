//! Helpers shared by the over-the-wire tests: start the real server in-process on a random
//! loopback port, connect tokio-tungstenite clients, send JSON requests and await their answers,
//! all with bounded waits. Each `tests/server_*.rs` file includes this module with `mod wire;`
//! and uses only part of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use locksmith::lock::{LockManager, LockMode, Snapshot};
use locksmith::server::{RunningServer, ServerSettings};
use locksmith::store::{KeysPage, MemoryStore, Store, StoreError};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single expected event may take before the test fails. Generous: the machine
/// is small and the tests run in parallel; a correct server answers in microseconds.
pub const BOUND: Duration = Duration::from_secs(10);

/// A client's WebSocket.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Settings for most tests: a long default lock timeout (so a request that should be answered at
/// once is never answered by a timeout instead) and no keepalive.
pub fn settings() -> ServerSettings {
    ServerSettings {
        lock_timeout: Duration::from_secs(60),
        idle_timeout: None,
        ..ServerSettings::default()
    }
}

/// A server running in this process.
pub struct Server {
    running: RunningServer,
    /// Where it listens.
    pub addr: SocketAddr,
}

/// Starts a server on `127.0.0.1:0` with `settings` and an empty in-memory store.
pub async fn start(settings: ServerSettings) -> Server {
    start_with_store(settings, Arc::new(MemoryStore::new())).await
}

/// Starts a server on `127.0.0.1:0` with `settings` and `store`.
pub async fn start_with_store(settings: ServerSettings, store: Arc<dyn Store>) -> Server {
    watch_for_panics();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let running =
        locksmith::server::start(vec![listener], settings, store).expect("start the server");
    let addr = running.local_addrs()[0];
    Server { running, addr }
}

/// A memory store whose changes wait for a permit of `gate`: a write can be held inside its
/// commit. `entered` counts the changes that have reached the store.
pub struct GatedStore {
    inner: MemoryStore,
    /// One permit lets one change through.
    pub gate: Arc<tokio::sync::Semaphore>,
    /// Changes that have reached the store (before the gate).
    pub entered: Arc<AtomicUsize>,
}

impl GatedStore {
    /// An empty store with a closed gate.
    pub fn new() -> Self {
        GatedStore {
            inner: MemoryStore::new(),
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
            entered: Arc::new(AtomicUsize::new(0)),
        }
    }
}

impl Store for GatedStore {
    fn read(&self, keys: &[&str]) -> Result<Vec<Option<Value>>, StoreError> {
        self.inner.read(keys)
    }

    fn apply(
        &self,
        changes: Vec<(String, Option<Value>)>,
    ) -> futures_util::future::BoxFuture<'_, Result<(), StoreError>> {
        self.entered.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            let _permit = self.gate.acquire().await;
            self.inner.apply(changes).await
        })
    }

    fn keys(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<KeysPage, StoreError> {
        self.inner.keys(prefix, after, limit)
    }
}

impl Server {
    /// The WebSocket URL.
    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// The server's lock manager, to inspect the lock table directly.
    pub fn locks(&self) -> &LockManager {
        self.running.lock_manager()
    }

    /// The server's directory of open sessions.
    pub fn registry(&self) -> &locksmith::registry::Registry {
        self.running.registry()
    }

    /// The server's suspended sessions.
    pub fn suspensions(&self) -> &locksmith::suspension::Suspensions {
        self.running.suspensions()
    }

    /// Waits until `session` is suspended (its connection dropped; it keeps its locks).
    pub async fn wait_suspended(&self, session: &str) {
        let registry = self.registry().clone();
        wait_until(&format!("session {session} suspended"), move || {
            registry
                .suspended()
                .keys()
                .any(|id| id.to_string() == session)
        })
        .await;
    }

    /// A snapshot of the lock table.
    pub fn snapshot(&self) -> Snapshot {
        self.locks().snapshot()
    }

    /// Connects a client (no `Origin` header) and learns its session id.
    pub async fn connect(&self) -> Client {
        let mut client = Client::connect(&self.url()).await;
        client.learn_session().await;
        client
    }

    /// Shuts the server down, within [`BOUND`]; returns how many connections it had to cut.
    pub async fn stop(self) -> usize {
        tokio::time::timeout(BOUND, self.running.shutdown())
            .await
            .expect("the server shuts down in time")
    }

    /// Waits until `condition` holds for the lock table (polled every few milliseconds, at most
    /// [`BOUND`]).
    pub async fn wait_for(&self, what: &str, mut condition: impl FnMut(&Snapshot) -> bool) {
        let locks = self.locks().clone();
        wait_until(what, move || condition(&locks.snapshot())).await;
    }

    /// Waits until `session` is queued on `key`.
    pub async fn wait_queued(&self, session: &str, key: &str) {
        self.wait_for(&format!("session {session} queued on {key}"), |s| {
            queued(s, session, key)
        })
        .await;
    }

    /// Waits until the lock table is empty and no session is open.
    pub async fn wait_idle(&self) {
        let locks = self.locks().clone();
        wait_until("no lock and no session left", move || {
            locks.snapshot().is_empty() && locks.session_count() == 0
        })
        .await;
    }
}

/// Connects a client of the library (`locksmith::client::Client`, not this module's raw
/// [`Client`]) to `url`, within [`BOUND`].
pub async fn connect_client(url: &str) -> locksmith::client::Client {
    tokio::time::timeout(BOUND, locksmith::client::Client::connect(url))
        .await
        .expect("connect in time")
        .expect("connect")
}

/// Polls `condition` every few milliseconds until it holds; panics after [`BOUND`].
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + BOUND;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// As [`wait_until`], for a condition that must await (such as a scrape of `/metrics`):
/// polled every 20 ms; panics after [`BOUND`].
pub async fn wait_until_async<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + BOUND;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Is `session` queued on `key` in `snapshot`?
pub fn queued(snapshot: &Snapshot, session: &str, key: &str) -> bool {
    snapshot
        .keys
        .iter()
        .filter(|k| k.key.as_str() == key)
        .flat_map(|k| &k.queue)
        .any(|w| w.session.to_string() == session)
}

/// The holders of `key` in `snapshot`: `(session, mode)` in grant order.
pub fn holders(snapshot: &Snapshot, key: &str) -> Vec<(String, LockMode)> {
    snapshot
        .keys
        .iter()
        .filter(|k| k.key.as_str() == key)
        .flat_map(|k| &k.holders)
        .map(|h| (h.session.to_string(), h.mode))
        .collect()
}

/// Does `session` appear anywhere in `snapshot` (holder, waiter, or waits-for edge)?
pub fn mentions(snapshot: &Snapshot, session: &str) -> bool {
    snapshot.keys.iter().any(|k| {
        k.holders.iter().any(|h| h.session.to_string() == session)
            || k.queue.iter().any(|w| w.session.to_string() == session)
    }) || snapshot
        .waits_for
        .iter()
        .any(|(a, b)| a.to_string() == session || b.to_string() == session)
}

/// One WebSocket client.
pub struct Client {
    /// The socket, for tests that need raw frames.
    pub ws: Ws,
    /// The session id the server gave this connection (after [`Client::learn_session`]).
    pub session: String,
}

impl Client {
    /// Connects to `url` without learning the session id.
    pub async fn connect(url: &str) -> Client {
        let (ws, _) = tokio::time::timeout(BOUND, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect in time")
            .expect("WebSocket handshake");
        Client {
            ws,
            session: String::new(),
        }
    }

    /// Asks the server for this connection's session id and remembers it.
    pub async fn learn_session(&mut self) -> String {
        let answer = self.request(json!({"command": "session"})).await;
        assert_eq!(answer["success"], json!(true), "{answer}");
        self.session = answer["session"]
            .as_str()
            .expect("session is a string")
            .to_owned();
        self.session.clone()
    }

    /// Sends `request` as a text frame.
    pub async fn send(&mut self, request: Value) {
        self.send_text(&request.to_string()).await;
    }

    /// Sends a raw text frame.
    pub async fn send_text(&mut self, text: &str) {
        tokio::time::timeout(BOUND, self.ws.send(Message::text(text.to_owned())))
            .await
            .expect("send in time")
            .expect("send a text frame");
    }

    /// The next answer (a text frame of JSON), skipping pings and pongs; within `bound`.
    pub async fn recv_within(&mut self, bound: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no answer within {bound:?}"));
            match frame {
                Some(Ok(Message::Text(text))) => {
                    return serde_json::from_str(text.as_str()).expect("answer is JSON")
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected a text answer, got {other:?}"),
            }
        }
    }

    /// The next frame other than a ping or pong, as it came, within [`BOUND`].
    pub async fn recv_frame(
        &mut self,
    ) -> Option<Result<Message, tokio_tungstenite::tungstenite::Error>> {
        let deadline = tokio::time::Instant::now() + BOUND;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("a frame in time");
            if !matches!(frame, Some(Ok(Message::Ping(_) | Message::Pong(_)))) {
                return frame;
            }
        }
    }

    /// The next answer, within [`BOUND`].
    pub async fn recv(&mut self) -> Value {
        self.recv_within(BOUND).await
    }

    /// Sends `request` and awaits its answer.
    pub async fn request(&mut self, request: Value) -> Value {
        self.send(request).await;
        self.recv().await
    }

    /// Sends `request`, awaits its answer and checks it succeeded.
    pub async fn ok(&mut self, request: Value) -> Value {
        let answer = self.request(request.clone()).await;
        assert_eq!(answer["success"], json!(true), "{request} -> {answer}");
        answer
    }

    /// Sends `request`, awaits its answer and checks it failed with `code`.
    pub async fn fails(&mut self, request: Value, code: &str) -> Value {
        let answer = self.request(request.clone()).await;
        assert_eq!(answer["success"], json!(false), "{request} -> {answer}");
        assert_eq!(answer["code"], json!(code), "{request} -> {answer}");
        assert!(
            answer["error"].as_str().is_some_and(|e| !e.is_empty()),
            "an error answer carries a human sentence: {answer}"
        );
        answer
    }

    /// `lock` in `mode` ("read"/"write") and check it succeeded.
    pub async fn lock(&mut self, keys: &[&str], mode: &str) -> Value {
        self.ok(json!({"command": "lock", "keys": keys, "mode": mode}))
            .await
    }

    /// `unlock` and check it succeeded.
    pub async fn unlock(&mut self, keys: &[&str]) {
        self.ok(json!({"command": "unlock", "keys": keys})).await;
    }

    /// `ping` and check it succeeded: the connection is alive and served.
    pub async fn ping(&mut self) {
        self.ok(json!({"command": "ping"})).await;
    }

    /// The `locks` answer.
    pub async fn locks(&mut self) -> Value {
        self.ok(json!({"command": "locks"})).await
    }

    /// Reads frames until a close frame arrives (answers are skipped) and returns its code;
    /// `None` if the connection ended without one. Within [`BOUND`].
    pub async fn close_code(&mut self) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + BOUND;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("the connection is closed in time");
            match frame {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                None | Some(Err(_)) => return None,
            }
        }
    }

    /// Reads until the close frame (an answer before it fails the test) and returns its code and
    /// reason, within [`BOUND`].
    pub async fn close_frame(&mut self) -> (u16, String) {
        let deadline = tokio::time::Instant::now() + BOUND;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("a close frame in time");
            match frame {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return (u16::from(frame.code), frame.reason.to_string())
                }
                Some(Ok(Message::Text(text))) => {
                    panic!("unexpected answer before the close: {text}")
                }
                Some(Ok(_)) => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    /// Makes this connection's session resumable with a grace of `grace_ms` (`hello`); returns
    /// its resume secret.
    pub async fn ask_grace(&mut self, grace_ms: u64) -> String {
        let answer = self
            .ok(json!({"command": "hello", "grace_ms": grace_ms}))
            .await;
        answer["resume_secret"]
            .as_str()
            .unwrap_or_else(|| panic!("a resume secret in {answer}"))
            .to_owned()
    }

    /// Sends `resume` of `session` with `secret` and returns the answer (on success this
    /// connection's session becomes `session`).
    pub async fn resume(&mut self, session: &str, secret: &str) -> Value {
        let answer = self
            .request(json!({"command": "resume", "session": session, "secret": secret}))
            .await;
        if answer["success"] == json!(true) {
            self.session = session.to_owned();
        }
        answer
    }

    /// Closes the connection cleanly (close frame, then waits for the server's reply).
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(BOUND, self.ws.close(None::<CloseFrame>)).await;
        let _ = tokio::time::timeout(BOUND, async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

/// Connects to `url` with an `Origin` header; the handshake result.
pub async fn connect_with_origin(
    url: &str,
    origin: &str,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    connect_with_headers(url, &[("origin", origin)]).await
}

/// Connects to `url` with extra request headers (`Origin`, `Host`, ...); the handshake result.
pub async fn connect_with_headers(
    url: &str,
    headers: &[(&'static str, &str)],
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let mut request = url.into_client_request().expect("a valid request");
    for (name, value) in headers {
        request
            .headers_mut()
            .insert(*name, HeaderValue::from_str(value).expect("header"));
    }
    tokio::time::timeout(BOUND, tokio_tungstenite::connect_async(request))
        .await
        .expect("handshake in time")
        .map(|(ws, _)| ws)
}

/// Sends a raw HTTP/1.1 GET and returns the whole response (status line, headers, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    http_get_with(addr, path, None).await
}

/// As [`http_get`], with an `Authorization: Bearer <bearer>` header if given.
pub async fn http_get_with(addr: SocketAddr, path: &str, bearer: Option<&str>) -> String {
    let authorization = bearer
        .map(|token| format!("Authorization: Bearer {token}\r\n"))
        .unwrap_or_default();
    tokio::time::timeout(BOUND, async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{authorization}Connection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.expect("read");
        String::from_utf8_lossy(&response).into_owned()
    })
    .await
    .expect("HTTP answer in time")
}

/// The keys of a `locks` answer that have a holder, with their holders' `(session, mode)`.
pub fn wire_holders(locks: &Value, key: &str) -> Vec<(String, String)> {
    locks["locks"]
        .as_array()
        .expect("locks is an array")
        .iter()
        .filter(|entry| entry["key"] == json!(key))
        .flat_map(|entry| entry["holders"].as_array().expect("holders").iter())
        .map(|h| {
            (
                h["session"].as_str().expect("session").to_owned(),
                h["mode"].as_str().expect("mode").to_owned(),
            )
        })
        .collect()
}

// ---- panics -------------------------------------------------------------------------------------

static PANIC_HOOK: Once = Once::new();
static SERVER_PANICS: AtomicUsize = AtomicUsize::new(0);
static PANIC_MESSAGES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Installs (once) a panic hook that counts panics raised outside the test files, i.e. in the
/// server or the libraries it runs on. A panic inside a connection task would otherwise be
/// swallowed by tokio and go unnoticed.
pub fn watch_for_panics() {
    PANIC_HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_tests = info
                .location()
                .is_some_and(|l| l.file().starts_with("tests/") || l.file().starts_with("tests\\"));
            if !in_tests {
                SERVER_PANICS.fetch_add(1, Ordering::SeqCst);
                if let Ok(mut messages) = PANIC_MESSAGES.lock() {
                    messages.push(info.to_string());
                }
            }
            default(info);
        }));
    });
}

/// Asserts that no panic has happened outside the test files since the process started.
pub fn assert_no_server_panics() {
    let count = SERVER_PANICS.load(Ordering::SeqCst);
    let messages = PANIC_MESSAGES.lock().map(|m| m.clone()).unwrap_or_default();
    assert_eq!(count, 0, "panics outside the tests: {messages:?}");
}

// ---- names, tokens: connecting with a URL query or an Authorization header ------------------

/// Connects to `url` (which may carry a query such as `?name=x&token=y`) with an
/// `Authorization: Bearer <bearer>` header if given; the handshake result.
pub async fn connect_with(
    url: &str,
    bearer: Option<&str>,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let mut request = url.into_client_request().expect("a valid request");
    if let Some(token) = bearer {
        request.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
        );
    }
    tokio::time::timeout(BOUND, tokio_tungstenite::connect_async(request))
        .await
        .expect("handshake in time")
        .map(|(ws, _)| ws)
}

/// The HTTP status of a refused handshake (panics if the handshake succeeded).
pub fn refused_status(handshake: Result<Ws, tokio_tungstenite::tungstenite::Error>) -> u16 {
    match handshake {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
        Ok(_) => panic!("expected an HTTP refusal, the handshake succeeded"),
    }
}

impl Server {
    /// Connects a client with `query` appended to the URL (e.g. `?name=backup`) and an optional
    /// bearer token, and learns its session id; panics if the handshake is refused.
    pub async fn connect_as(&self, query: &str, bearer: Option<&str>) -> Client {
        let ws = connect_with(&format!("{}{query}", self.url()), bearer)
            .await
            .expect("WebSocket handshake");
        let mut client = Client {
            ws,
            session: String::new(),
        };
        client.learn_session().await;
        client
    }
}
