//! A typed async client for Locksmith's WebSocket protocol.
//!
//! One [`Client`] is one connection, and so one session: its locks are released when it is
//! closed or dropped, or when the connection breaks. A client built with a
//! [`grace`](ClientBuilder::grace) is a resumable session instead: when its connection breaks,
//! the server keeps the session (and its locks) for the grace, and the client reconnects and
//! resumes it; the calls in flight at the break still fail with
//! [`ClientError::ConnectionLost`], and only when the session cannot be resumed does every call
//! fail with [`ClientError::SessionExpired`]. Calls take `&self` and may run concurrently
//! on one client (their requests are pipelined and each answer is matched to its call by `id`),
//! but the server carries out one request of a session at a time, in order.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! # let server = locksmith::server::start(vec![listener], Default::default(),
//! #     std::sync::Arc::new(locksmith::store::MemoryStore::new()))?;
//! # let url = format!("ws://{}/ws", server.local_addrs()[0]);
//! use locksmith::client::Client;
//! use locksmith::lock::LockMode;
//! use serde_json::json;
//!
//! let client = Client::builder(&url).name("nightly-report").connect().await?;
//! // Take two keys exclusively (sorted, all-or-nothing); every key gets a fencing token.
//! let grant = client.lock(&["invoice/7", "ledger"], LockMode::Exclusive, None).await?;
//! assert!(grant.tokens["ledger"] > 0);
//! // Write under the locks we hold, keeping them (`hold_lock`), then read back.
//! client.write(&[("ledger", json!({"balance": 12}))], true).await?;
//! assert_eq!(client.read(&["ledger"], true).await?["ledger"], json!({"balance": 12}));
//! client.unlock(&["invoice/7", "ledger"]).await?;
//! client.close().await;
//! # server.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! Errors mirror the server's codes ([`ClientError::code`]); a deadlock carries its cycle:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! # let server = locksmith::server::start(vec![listener], Default::default(),
//! #     std::sync::Arc::new(locksmith::store::MemoryStore::new()))?;
//! # let url = format!("ws://{}/ws", server.local_addrs()[0]);
//! use std::time::Duration;
//! use locksmith::client::{Client, ClientError};
//! use locksmith::lock::LockMode::Exclusive;
//!
//! let (a, b) = (Client::connect(&url).await?, Client::connect(&url).await?);
//! a.lock(&["k1"], Exclusive, None).await?;
//! b.lock(&["k2"], Exclusive, None).await?;
//! // A zero timeout is a try-lock: answered at once.
//! let busy = a.lock(&["k2"], Exclusive, Some(Duration::ZERO)).await;
//! assert!(matches!(busy, Err(ClientError::Timeout { ref key, .. }) if key == "k2"));
//! // a waits for k2 (held by b) ...
//! let waiting = tokio::spawn(async move { a.lock(&["k2"], Exclusive, None).await });
//! # while b.locks(None).await?.waits_for.is_empty() { tokio::task::yield_now().await; }
//! // ... so b asking for k1 would close a cycle: refused at once, with the cycle.
//! match b.lock(&["k1"], Exclusive, None).await {
//!     Err(ClientError::Deadlock { cycle, .. }) => assert_eq!(cycle.len(), 2),
//!     other => panic!("expected a deadlock, got {other:?}"),
//! }
//! b.unlock(&["k2"]).await?;
//! assert!(waiting.await?.is_ok());
//! # server.shutdown().await;
//! # Ok(())
//! # }
//! ```

mod answers;
mod driver;
mod error;
mod resume;

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::WaitForCancellationFuture;

pub use answers::{
    Deleted, Grant, Hello, HolderView, KeyView, KeysPage, LockTableView, SessionView, Values,
    WaiterView, WaitsForEdge,
};
pub use error::{ClientError, CycleMember};

use crate::auth::Secret;
use crate::lock::LockMode;
use driver::{Ending, Order, Socket};
use resume::ResumeWatch;

/// The URL clients connect to when none is given.
pub const DEFAULT_URL: &str = "ws://localhost:8008/ws";

/// How often a quiet connection is pinged by default; after three intervals without a word from
/// the server the connection counts as lost.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(5);

/// Read buffer of a client's socket (tungstenite's default is 128 KiB per connection).
const READ_BUFFER_BYTES: usize = 4 * 1024;

/// How to connect: the URL plus the optional token, session name, keepalive and grace. Its
/// `Debug` shows neither the token nor a `?token=` on the URL.
#[derive(Clone)]
pub struct ClientBuilder {
    /// `ws://host:port/ws`. It may carry `?token=`, so messages show [`redact_url`]'s version.
    url: String,
    /// Sent as `Authorization: Bearer <token>` when the server requires one.
    token: Option<Secret>,
    /// The session's name, shown in `locks`, `sessions` and deadlock cycles.
    name: Option<String>,
    /// Ping interval of a quiet connection (`None`: never ping; a dead server is then noticed
    /// only when the operating system gives up on the connection).
    keepalive: Option<Duration>,
    /// How long the server is asked to keep the session after its connection is lost, so that
    /// the client can resume it (`None`: a session ends with its connection).
    grace: Option<Duration>,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("url", &redact_url(&self.url))
            .field("token", &self.token)
            .field("name", &self.name)
            .field("keepalive", &self.keepalive)
            .field("grace", &self.grace)
            .finish()
    }
}

impl ClientBuilder {
    /// The token the server requires (`--token`), or the admin token for admin commands.
    pub fn token(self, token: impl Into<String>) -> Self {
        self.secret_token(Secret::client_token(token.into()))
    }

    /// [`token`](Self::token), for a token already kept as a [`Secret`].
    pub(crate) fn secret_token(mut self, token: Secret) -> Self {
        self.token = Some(token);
        self
    }

    /// Names the session.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets (or, with `None`, turns off) the keepalive ping interval.
    pub fn keepalive(mut self, interval: Option<Duration>) -> Self {
        self.keepalive = interval;
        self
    }

    /// Makes the session resumable: the server is asked to keep it, with its locks, for
    /// `grace` after its connection is lost (it may grant less: see [`Client::grace`]). The
    /// client then reconnects (50 ms apart at first, doubling up to 1 s) and resumes the
    /// session; calls made meanwhile wait and are sent once it is resumed. Calls in flight when
    /// the connection broke still fail with [`ClientError::ConnectionLost`] (they may or may
    /// not have been carried out) and are never sent again. When the server no longer has the
    /// session, or the grace has passed since the server was last heard from, every call fails
    /// with [`ClientError::SessionExpired`] and [`Client::lost`] resolves. A session the server
    /// ended itself (taken over, killed, shut down, closed for cause) is not resumed: the client
    /// then ends as one without grace.
    ///
    /// While the session is resumable, a quiet connection is pinged at least four times per
    /// grace, so that a silent one is noticed while there is time left to resume.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = Some(grace);
        self
    }

    /// Connects and opens the session (`hello`, with the name and grace if they were given).
    ///
    /// # Errors
    /// [`ClientError::Connect`] if the server cannot be reached or the handshake fails,
    /// [`ClientError::Unauthorized`] if the token is missing or wrong,
    /// [`ClientError::ServerBusy`] if the server is at its connection limit.
    pub async fn connect(self) -> Result<Client, ClientError> {
        let socket = self.dial().await?;
        let (orders, inbox) = mpsc::unbounded_channel();
        let ending = Ending::default();
        let watch = ResumeWatch::default();
        tokio::spawn(driver::drive(
            socket,
            inbox,
            ending.clone(),
            self.keepalive,
            self.clone(),
            watch.clone(),
        ));
        let mut client = Client {
            orders,
            ending,
            hello: Hello::default(),
            watch,
        };
        let mut hello = json!({"command": "hello"});
        if let Some(name) = &self.name {
            hello["name"] = json!(name);
        }
        if let Some(grace) = self.grace {
            hello["grace_ms"] = json!(u64::try_from(grace.as_millis()).unwrap_or(u64::MAX));
        }
        client.hello = match client.typed(hello).await {
            // A server from before `hello`: the session id is all it can tell, and the session
            // stays unnamed.
            Err(ClientError::UnknownCommand(_)) => {
                let answer = client.request(json!({"command": "session"})).await?;
                Hello {
                    session: answer["session"].as_str().unwrap_or_default().to_owned(),
                    ..Hello::default()
                }
            }
            other => other?,
        };
        Ok(client)
    }

    /// Opens a WebSocket to the server, with the token.
    ///
    /// # Errors
    /// As [`connect`](Self::connect).
    pub(crate) async fn dial(&self) -> Result<Socket, ClientError> {
        let connect_error = |reason: String| ClientError::Connect {
            url: redact_url(&self.url),
            reason,
        };
        let mut request = self
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| connect_error(e.to_string()))?;
        if let Some(token) = &self.token {
            let value = HeaderValue::from_str(&format!("Bearer {}", token.reveal()))
                .map_err(|_| connect_error("the token is not a valid header value".into()))?;
            request.headers_mut().insert("authorization", value);
        }
        // Small buffers (answers are small; a large one grows the buffer while it is read), so a
        // process can hold thousands of clients; no Nagle delay for pipelined requests.
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER_BYTES)
            .write_buffer_size(0);
        let connecting = tokio_tungstenite::connect_async_with_config(request, Some(config), true);
        let (socket, _) = match connecting.await {
            Ok(connected) => connected,
            Err(tokio_tungstenite::tungstenite::Error::Http(response))
                if response.status() == StatusCode::UNAUTHORIZED =>
            {
                return Err(ClientError::Unauthorized)
            }
            Err(error) => return Err(connect_error(error.to_string())),
        };
        Ok(socket)
    }
}

/// One connection to a Locksmith server, and its session. See the module documentation.
pub struct Client {
    /// Calls for the driver task, which owns the socket.
    orders: mpsc::UnboundedSender<Order>,
    /// Whether and why the connection ended.
    ending: Ending,
    /// Who the server says this session is.
    hello: Hello,
    /// The granted grace and the resumes so far, kept up to date by the driver.
    watch: ResumeWatch,
}

impl Client {
    /// How to connect to `url`, with options.
    pub fn builder(url: &str) -> ClientBuilder {
        ClientBuilder {
            url: url.to_owned(),
            token: None,
            name: None,
            keepalive: Some(DEFAULT_KEEPALIVE),
            grace: None,
        }
    }

    /// Connects to `url` with no token and no name.
    ///
    /// # Errors
    /// As [`ClientBuilder::connect`].
    pub async fn connect(url: &str) -> Result<Client, ClientError> {
        Client::builder(url).connect().await
    }

    /// This session's id.
    pub fn session_id(&self) -> &str {
        &self.hello.session
    }

    /// This session's name, if it has one.
    pub fn name(&self) -> Option<&str> {
        self.hello.name.as_deref()
    }

    /// The grace the server granted this session, while it is resumable (see
    /// [`ClientBuilder::grace`]); `None` for a session that ends with its connection.
    pub fn grace(&self) -> Option<Duration> {
        self.watch.grace()
    }

    /// How many times the session has been resumed on a new connection.
    pub fn resumes(&self) -> u64 {
        self.watch.resumes()
    }

    /// Resolves when the session has ended, with the reason: for a client without a grace, when
    /// the connection has ended (closed by either side, broken, or silent past the keepalive);
    /// for a resumable one, when it is closed or could not be resumed
    /// ([`ClientError::SessionExpired`]). From then on every lock of the session is released by
    /// the server, and every call fails.
    pub async fn lost(&self) -> ClientError {
        let ended: WaitForCancellationFuture<'_> = self.ending.ended.cancelled();
        ended.await;
        self.ending.error()
    }

    /// Whether the session has ended (see [`lost`](Self::lost)).
    pub fn is_lost(&self) -> bool {
        self.ending.ended.is_cancelled()
    }

    /// Sends any request (a JSON object; its `id` is set by the client) and returns the whole
    /// answer when it succeeded. The typed methods are built on this.
    ///
    /// # Errors
    /// The error answer as a [`ClientError`], or [`ClientError::ConnectionLost`].
    pub async fn request(&self, request: Value) -> Result<Value, ClientError> {
        let Value::Object(request) = request else {
            return Err(ClientError::BadRequest(
                "a request must be a JSON object".into(),
            ));
        };
        if self.is_lost() {
            // The driver may still be saying goodbye to the server; don't queue behind that.
            return Err(self.ending.error());
        }
        let (answer, answered) = oneshot::channel();
        if self.orders.send(Order::Call { request, answer }).is_err() {
            return Err(self.ending.error());
        }
        match answered.await {
            Ok(result) => result,
            Err(_) => Err(self.ending.error()),
        }
    }

    async fn typed<T: DeserializeOwned>(&self, request: Value) -> Result<T, ClientError> {
        let answer = self.request(request).await?;
        serde_json::from_value(answer).map_err(|e| ClientError::UnexpectedAnswer(e.to_string()))
    }

    /// Takes `keys` in `mode` and keeps them: all of them, in sorted order, or none. Waits at
    /// most `timeout` (`None`: the server's `--lock-timeout`; zero: a try-lock).
    ///
    /// Bound the wait with `timeout`, not by dropping the future: a call whose future is dropped
    /// is still carried out by the server (it may be granted later, and the locks are then held
    /// until `unlock` or the end of the connection). To give up a wait from elsewhere, call
    /// [`cancel`](Self::cancel) — but it withdraws this call only if the call is already waiting
    /// for a lock when the cancel reaches the server. A call still queued behind another call of
    /// this client (pipelined from another task) is not withdrawn: the cancel answers `false`
    /// and the call runs later as usual. `timeout` has no such gap.
    ///
    /// # Errors
    /// `Deadlock`, `Timeout`, `Cancelled`, `BadRequest`, ... as the server answers.
    pub async fn lock(
        &self,
        keys: &[impl AsRef<str>],
        mode: LockMode,
        timeout: Option<Duration>,
    ) -> Result<Grant, ClientError> {
        let mut request =
            json!({"command": "lock", "keys": key_list(keys), "mode": mode_name(mode)});
        if let Some(timeout) = timeout {
            request["timeout_ms"] = json!(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        }
        self.typed(request).await
    }

    /// Releases `keys` (all of them, or none if one is not held).
    ///
    /// # Errors
    /// `NotHeld` naming the keys this session does not hold.
    pub async fn unlock(&self, keys: &[impl AsRef<str>]) -> Result<(), ClientError> {
        self.request(json!({"command": "unlock", "keys": key_list(keys)}))
            .await
            .map(drop)
    }

    /// Reads `keys` under shared locks, keeping the locks if `hold_lock`. A key never written
    /// reads as `null`.
    ///
    /// # Errors
    /// As [`lock`](Self::lock), and `Storage`.
    pub async fn read(
        &self,
        keys: &[impl AsRef<str>],
        hold_lock: bool,
    ) -> Result<Values, ClientError> {
        let answer = self
            .request(json!({"command": "read", "keys": key_list(keys), "hold_lock": hold_lock}))
            .await?;
        serde_json::from_value(answer["values"].clone())
            .map_err(|e| ClientError::UnexpectedAnswer(e.to_string()))
    }

    /// Writes every `(key, value)` atomically under exclusive locks, keeping the locks if
    /// `hold_lock`. Returns the fencing tokens the values were written under.
    ///
    /// # Errors
    /// As [`lock`](Self::lock), and `Storage` (then nothing was written).
    pub async fn write(
        &self,
        entries: &[(impl AsRef<str>, Value)],
        hold_lock: bool,
    ) -> Result<Grant, ClientError> {
        let keys: Vec<&str> = entries.iter().map(|(k, _)| k.as_ref()).collect();
        let values: Vec<&Value> = entries.iter().map(|(_, v)| v).collect();
        self.typed(
            json!({"command": "write", "keys": keys, "values": values, "hold_lock": hold_lock}),
        )
        .await
    }

    /// Deletes `keys` atomically under exclusive locks, keeping the locks if `hold_lock`.
    ///
    /// # Errors
    /// As [`write`](Self::write).
    pub async fn delete(
        &self,
        keys: &[impl AsRef<str>],
        hold_lock: bool,
    ) -> Result<Deleted, ClientError> {
        self.typed(json!({"command": "delete", "keys": key_list(keys), "hold_lock": hold_lock}))
            .await
    }

    /// One page of the keys that have a value and start with `prefix`, in byte order, after
    /// `after`, at most `limit` (`None`: the server's default).
    ///
    /// # Errors
    /// `BadRequest` for a limit over the server's maximum.
    pub async fn keys(
        &self,
        prefix: &str,
        limit: Option<usize>,
        after: Option<&str>,
    ) -> Result<KeysPage, ClientError> {
        let mut request = json!({"command": "keys", "prefix": prefix});
        if let Some(limit) = limit {
            request["limit"] = json!(limit);
        }
        if let Some(after) = after {
            request["after"] = json!(after);
        }
        self.typed(request).await
    }

    /// The lock table: the keys held or waited for (only those starting with `prefix`, if one
    /// is given), and who waits for whom — the first 1000 keys and edges, as the server lists
    /// by default; [`LockTableView::more`] says how many keys were left out. See
    /// [`locks_page`](Self::locks_page) for another limit.
    ///
    /// # Errors
    /// [`ClientError::ConnectionLost`] and the like.
    pub async fn locks(&self, prefix: Option<&str>) -> Result<LockTableView, ClientError> {
        self.locks_page(prefix, None).await
    }

    /// As [`locks`](Self::locks), listing at most `limit` keys and edges (the server allows up
    /// to 100,000).
    ///
    /// # Errors
    /// `BadRequest` for a limit the server does not allow.
    pub async fn locks_page(
        &self,
        prefix: Option<&str>,
        limit: Option<usize>,
    ) -> Result<LockTableView, ClientError> {
        let mut request = json!({"command": "locks"});
        if let Some(prefix) = prefix {
            request["prefix"] = json!(prefix);
        }
        if let Some(limit) = limit {
            request["limit"] = json!(limit);
        }
        self.typed(request).await
    }

    /// The open sessions (the first 1000 by id, as the server lists by default): name, peer
    /// address, connected for, keys held, key waited for.
    ///
    /// # Errors
    /// [`ClientError::ConnectionLost`] and the like.
    pub async fn sessions(&self) -> Result<Vec<SessionView>, ClientError> {
        let answer = self.request(json!({"command": "sessions"})).await?;
        serde_json::from_value(answer["sessions"].clone())
            .map_err(|e| ClientError::UnexpectedAnswer(e.to_string()))
    }

    /// Withdraws this session's lock wait, if it has one (that call then fails with
    /// [`ClientError::Cancelled`]). Returns whether a wait was withdrawn.
    ///
    /// The server decides when the cancel's frame arrives (it does not wait its turn): it
    /// withdraws only the request that is waiting for a lock at that moment. A `lock`, `read`,
    /// `write` or `delete` sent earlier but still queued behind another request of this session
    /// has not started waiting, so it is not withdrawn — the cancel answers `false` and that
    /// call runs later as usual; nor is a request past its lock wait (a write waiting for its
    /// commit). To bound a wait whatever is ahead of it, give the call a `timeout`.
    ///
    /// # Errors
    /// [`ClientError::ConnectionLost`] and the like.
    pub async fn cancel(&self) -> Result<bool, ClientError> {
        let answer = self.request(json!({"command": "cancel"})).await?;
        Ok(answer["cancelled"] == Value::Bool(true))
    }

    /// Ends another session (an admin command: connect with the admin token): its locks are
    /// released, its waiting request answered `killed`, its connection closed.
    ///
    /// # Errors
    /// `Forbidden` without the admin token, `NotFound` for no such session.
    pub async fn kill(&self, session: &str) -> Result<(), ClientError> {
        self.request(json!({"command": "kill", "session": session}))
            .await
            .map(drop)
    }

    /// Checks that the connection is alive and served.
    ///
    /// # Errors
    /// [`ClientError::ConnectionLost`] and the like.
    pub async fn ping(&self) -> Result<(), ClientError> {
        self.request(json!({"command": "ping"})).await.map(drop)
    }

    /// Says hello, naming (or renaming) the session if `name` is given; returns who it is.
    ///
    /// # Errors
    /// `BadRequest` for an invalid name.
    pub async fn hello(&self, name: Option<&str>) -> Result<Hello, ClientError> {
        let mut request = json!({"command": "hello"});
        if let Some(name) = name {
            request["name"] = json!(name);
        }
        self.typed(request).await
    }

    /// Closes the connection cleanly; the server releases every lock of the session. A
    /// resumable client closed while it reconnects stops trying; the server then releases the
    /// session when its grace ends.
    pub async fn close(self) {
        let (done, closed) = oneshot::channel();
        if self.orders.send(Order::Close { done }).is_ok() {
            let _ = closed.await;
        }
    }
}

/// `url` as it may be shown in a message: the value of every `token` query parameter (the name
/// percent-decoded, as the server reads it) replaced by `<hidden>`; the rest as given.
pub fn redact_url(url: &str) -> String {
    let (before_fragment, fragment) = url.split_at(url.find('#').unwrap_or(url.len()));
    let Some((base, query)) = before_fragment.split_once('?') else {
        return url.to_owned();
    };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| {
            let name = pair.split_once('=').map_or(pair, |(name, _)| name);
            if percent_decoded(name) == b"token" {
                format!("{name}=<hidden>")
            } else {
                pair.to_owned()
            }
        })
        .collect();
    format!("{base}?{}{fragment}", query.join("&"))
}

/// A query-string component decoded as a server decodes it: `+` is a space, `%XX` a byte.
fn percent_decoded(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 3)
            .filter(|_| bytes[i] == b'%')
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
        match (escaped, bytes[i]) {
            (Some(byte), _) => {
                out.push(byte);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, byte) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    out
}

fn key_list(keys: &[impl AsRef<str>]) -> Vec<&str> {
    keys.iter().map(AsRef::as_ref).collect()
}

/// The wire name of a lock mode.
pub fn mode_name(mode: LockMode) -> &'static str {
    match mode {
        LockMode::Shared => "read",
        LockMode::Exclusive => "write",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_on_the_url_is_hidden_in_messages_and_nothing_else_is() {
        assert_eq!(
            redact_url("ws://h:1/ws?name=job&token=SUPERSECRET&x=1"),
            "ws://h:1/ws?name=job&token=<hidden>&x=1"
        );
        assert_eq!(
            redact_url("ws://h/ws?token=a&token=b#frag"),
            "ws://h/ws?token=<hidden>&token=<hidden>#frag"
        );
        // The server decodes the parameter's name, so `tok%65n` is a token too.
        assert_eq!(
            redact_url("ws://h/ws?tok%65n=SUPERSECRET"),
            "ws://h/ws?tok%65n=<hidden>"
        );
        assert_eq!(redact_url("ws://h/ws?token"), "ws://h/ws?token=<hidden>");
        assert_eq!(
            redact_url("ws://h/ws?tokens=1&name=token"),
            "ws://h/ws?tokens=1&name=token"
        );
        assert_eq!(redact_url("ws://h/ws"), "ws://h/ws");
    }

    #[test]
    fn a_builders_debug_shows_neither_its_token_nor_one_on_its_url() {
        let builder = Client::builder("ws://127.0.0.1:1/ws?token=SUPERSECRET").token("ALSOSECRET");
        let shown = format!("{builder:?}");
        assert!(!shown.contains("SUPERSECRET"), "{shown}");
        assert!(!shown.contains("ALSOSECRET"), "{shown}");
        assert!(shown.contains("token=<hidden>"), "{shown}");
    }

    #[test]
    fn modes_have_their_wire_names() {
        assert_eq!(mode_name(LockMode::Shared), "read");
        assert_eq!(mode_name(LockMode::Exclusive), "write");
    }
}
