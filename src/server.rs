//! The server: serving on listeners already bound ([`crate::listen`] binds them), the HTTP routes
//! (`/ws`, `/healthz`, `/metrics`), the connection limit, the `Origin` check, and graceful shutdown.
//!
//! Each listener runs an accept loop of our own ([`serve_listener`]) that serves every
//! connection as HTTP/1 with the axum router. A connection must complete its WebSocket upgrade
//! (or its plain HTTP requests) within the handshake timeout of its accept, or it is closed
//! ([`serve_http`]); the accept loop pauses, with doubling pauses, when the process is out of
//! file descriptors instead of spinning. A WebSocket upgrade on `/ws` is refused with 403 when it
//! carries an `Origin` header that is not allowed (so a web page cannot drive a local Locksmith
//! through the user's browser); clients that send no `Origin` are accepted. A permit of the
//! connection semaphore is taken before the upgrade and held by the connection task; without a
//! permit the client gets one `server_busy` answer and a close.
//!
//! Tokens ([`crate::auth`]): with `--token`, every route but `/healthz` first checks the token
//! the request presents and answers 401 without it, before any upgrade; the admin token makes the
//! connection an admin connection. `?name=` on the upgrade URL names the session (400 if the name
//! is invalid). Request URLs are never logged: they may carry `?token=`. Refusals are logged at
//! most about once a second ([`REFUSAL_LOG_INTERVAL`]), so a client cannot flood the log.
//!
//! Shutdown: cancelling the token stops the listeners; every connection task sees it, answers
//! `shutting_down` and closes its socket; [`RunningServer::shutdown`] returns once every
//! connection task has finished, or, at the latest, after the shutdown timeout: the connections
//! still open then (a client that stopped reading while the server was sending it answers) are
//! cut, that is closed without waiting for the client. The accept loop's graceful shutdown does
//! not wait for upgraded WebSockets (they run in tasks of their own), hence the `TaskTracker`.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Extension;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accept::{serve_listener, TcpSlot};
use crate::auth::{self, Access, Secret, Tokens, Unauthorized};
use crate::cancel_latch::CancelLatch;
use crate::config::Config;
use crate::connection::{self, ConnectionSettings};
use crate::deadlocks::DeadlockHistory;
use crate::live;
use crate::lock::{LockManager, LockManagerConfig, DEFAULT_MAX_KEYS_PER_SESSION};
use crate::log_limit::{log_limited, LogLimit, DEADLOCK_LOG_INTERVAL, REFUSAL_LOG_INTERVAL};
use crate::metrics::{self, Metrics, Refusal, Sources};
use crate::protocol::{self, Limits};
use crate::registry::Registry;
use crate::session::{Client, SessionContext};
use crate::store::Store;
use crate::suspension::Suspensions;

/// Read buffer of one WebSocket, and the most tungstenite reads from the socket at a time.
/// Requests are small; a large one grows the buffer while it is read, in reads of this size.
/// tungstenite zeroes up to this much of the buffer before every read, so it is kept small:
/// at 1,000 clients, 4 KiB cost the server a fifth more CPU per request than 1 KiB
/// (BENCHMARKS.md, issue 8), and tungstenite's default (128 KiB per connection) would dominate
/// the memory of idle connections.
const READ_BUFFER_BYTES: usize = 1024;

/// How long [`RunningServer::shutdown`] waits for plain HTTP connections (a `/healthz` call, an
/// upgrade request still being received) to finish. The accept loop's graceful shutdown waits
/// for every one of them, up to its handshake timeout.
pub const HTTP_SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// How long [`RunningServer::shutdown`] waits, once it has cut the connections left at the
/// shutdown timeout, for their tasks to drop them. Dropping a connection takes microseconds
/// (its socket is closed, its session's locks released); this only bounds a task that is not
/// polled in time.
const CUT_GRACE: Duration = Duration::from_secs(1);

/// The default of `--handshake-timeout`: how long a TCP connection may take to complete its
/// WebSocket upgrade (or its plain HTTP requests).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How many TCP connections beyond `--max-connections` may be open at once (in their handshake,
/// or being refused with `server_busy`); see [`ServerSettings::handshake_reserve`].
pub const DEFAULT_HANDSHAKE_RESERVE: usize = 128;

/// What the server needs to know, independent of how it was configured.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// Wait limit of requests without `timeout_ms`.
    pub lock_timeout: Duration,
    /// Most simultaneous WebSocket connections.
    pub max_connections: usize,
    /// How many TCP connections beyond `max_connections` may be open at once: connections in
    /// their handshake, or being refused with `server_busy`. Every accepted TCP connection takes
    /// one of the `max_connections + handshake_reserve` slots until it closes; without a free
    /// one it is closed at once.
    pub handshake_reserve: usize,
    /// Largest request frame in bytes.
    pub max_message_bytes: usize,
    /// Most keys per request.
    pub max_keys_per_request: usize,
    /// Most keys one session may hold (`too_many_locks` above it).
    pub max_locks_per_session: usize,
    /// Silence after which a connection is closed (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// How long a TCP connection may take, from its accept, to complete its WebSocket upgrade
    /// or its plain HTTP requests (`/healthz`) before it is closed (`None`: forever).
    pub handshake_timeout: Option<Duration>,
    /// How long [`RunningServer::shutdown`] waits for connections to finish before it closes
    /// the remaining ones without waiting for their clients.
    pub shutdown_timeout: Duration,
    /// `Origin` values allowed to connect.
    pub allowed_origins: Vec<String>,
    /// Every fencing token handed out is larger than this. The binary passes its start time in
    /// microseconds since the Unix epoch, so tokens keep increasing across restarts.
    pub token_floor: u64,
    /// Token every request but `/healthz` must present (`None`: none needed).
    pub token: Option<Secret>,
    /// Token that makes a connection an admin connection (may `kill`).
    pub admin_token: Option<Secret>,
    /// Longest grace period a session may ask for (zero: no session is resumable).
    pub max_session_grace: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            lock_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            handshake_reserve: DEFAULT_HANDSHAKE_RESERVE,
            max_message_bytes: 1024 * 1024,
            max_keys_per_request: 1024,
            max_locks_per_session: DEFAULT_MAX_KEYS_PER_SESSION,
            idle_timeout: Some(Duration::from_secs(60)),
            handshake_timeout: Some(DEFAULT_HANDSHAKE_TIMEOUT),
            shutdown_timeout: Duration::from_secs(5),
            allowed_origins: Vec::new(),
            token_floor: 0,
            token: None,
            admin_token: None,
            max_session_grace: Duration::from_secs(30),
        }
    }
}

impl From<&Config> for ServerSettings {
    fn from(config: &Config) -> Self {
        ServerSettings {
            lock_timeout: config.lock_timeout,
            max_connections: config.max_connections,
            handshake_reserve: DEFAULT_HANDSHAKE_RESERVE,
            max_message_bytes: config.max_message_bytes,
            max_keys_per_request: config.max_keys_per_request,
            max_locks_per_session: config.max_locks_per_session,
            idle_timeout: (!config.idle_timeout.is_zero()).then_some(config.idle_timeout),
            handshake_timeout: (!config.handshake_timeout.is_zero())
                .then_some(config.handshake_timeout),
            shutdown_timeout: config.shutdown_timeout,
            allowed_origins: config.allowed_origins.clone(),
            token_floor: 0,
            token: config.token.clone(),
            admin_token: config.admin_token.clone(),
            max_session_grace: config.max_session_grace,
        }
    }
}

/// State shared by every request handler.
struct AppState {
    context: SessionContext,
    connection: ConnectionSettings,
    /// One permit per open WebSocket connection.
    connections: Arc<Semaphore>,
    allowed_origins: Vec<String>,
    /// The tokens checked before every route but `/healthz`.
    tokens: Tokens,
    /// Keeps the lines about requests refused for their token to about one a second: a client
    /// sending request after request without the right token would otherwise write one each.
    refusal_log: Mutex<LogLimit>,
    /// The same for upgrades refused for a foreign `Origin` (a header the client chooses).
    origin_log: Mutex<LogLimit>,
    /// The same for connections refused at `--max-connections`.
    busy_log: Mutex<LogLimit>,
    shutdown: CancellationToken,
    /// Cancelled at the shutdown timeout: every connection task still running drops its
    /// connection at once.
    cut: CancellationToken,
    /// Connections dropped because of `cut`.
    cut_count: Arc<AtomicUsize>,
    /// Every connection task, so shutdown can wait for them.
    tracker: TaskTracker,
    /// The server's metrics: `/metrics` encodes them; the routes count their refusals in them.
    metrics: Metrics,
}

/// A server that is running. Dropping it does not stop it; call [`RunningServer::shutdown`].
pub struct RunningServer {
    addrs: Vec<SocketAddr>,
    locks: LockManager,
    /// The directory of open sessions, for diagnostics and tests.
    registry: Registry,
    /// Suspended sessions: released at shutdown (locks do not outlive the server).
    suspensions: Suspensions,
    shutdown: CancellationToken,
    shutdown_timeout: Duration,
    cut: CancellationToken,
    cut_count: Arc<AtomicUsize>,
    tracker: TaskTracker,
    listeners: JoinSet<io::Result<()>>,
}

/// Why the server refuses to start on the addresses it was given.
#[derive(Debug, thiserror::Error)]
#[error(
    "refusing to listen on {addr} without --token: anyone who can reach it could take and \
     release locks and read, write and delete values. Set --token (or LOCKSMITH_TOKEN), listen \
     on a loopback address, or pass --insecure-no-auth if the network is trusted"
)]
pub struct OpenExposure {
    /// The first non-loopback address.
    pub addr: SocketAddr,
}

/// Refuses a configuration that would serve a non-loopback address to anyone: no `--token` and
/// no `--insecure-no-auth`. It looks at the addresses actually bound, so a host name is judged by
/// what it resolved to (`localhost` is loopback, `0.0.0.0` is not).
///
/// # Errors
/// [`OpenExposure`] naming the first non-loopback address.
pub fn refuse_open_exposure(config: &Config, bound: &[SocketAddr]) -> Result<(), OpenExposure> {
    if config.token.is_some() || config.insecure_no_auth {
        return Ok(());
    }
    match bound.iter().find(|addr| !addr.ip().is_loopback()) {
        Some(&addr) => Err(OpenExposure { addr }),
        None => Ok(()),
    }
}

/// Starts serving on `listeners` with values in `store`.
///
/// # Errors
/// If a listener's local address cannot be read.
pub fn start(
    listeners: Vec<TcpListener>,
    settings: ServerSettings,
    store: Arc<dyn Store>,
) -> io::Result<RunningServer> {
    let locks = LockManager::new(LockManagerConfig {
        max_keys_per_request: settings.max_keys_per_request,
        max_keys_per_session: settings.max_locks_per_session,
    });
    locks.raise_token_floor(settings.token_floor);
    let shutdown = CancellationToken::new();
    let cut = CancellationToken::new();
    let cut_count = Arc::new(AtomicUsize::new(0));
    let tracker = TaskTracker::new();
    let registry = Registry::new();
    // Suspended sessions hold no connection; as many may wait to be resumed as may be connected.
    let suspensions = Suspensions::new(settings.max_connections);
    let metrics = Metrics::new(Sources {
        locks: locks.clone(),
        suspensions: suspensions.clone(),
        commits: store.commit_metrics(),
    });
    let state = Arc::new(AppState {
        context: SessionContext {
            locks: locks.clone(),
            store,
            default_timeout: settings.lock_timeout,
            registry: registry.clone(),
            deadlock_log: Arc::new(Mutex::new(LogLimit::new(DEADLOCK_LOG_INTERVAL))),
            suspensions: suspensions.clone(),
            deadlocks: DeadlockHistory::default(),
            max_session_grace: settings.max_session_grace,
            metrics: metrics.clone(),
        },
        connection: ConnectionSettings {
            limits: Limits {
                max_keys_per_request: settings.max_keys_per_request,
            },
            max_message_bytes: settings.max_message_bytes,
            idle_timeout: settings.idle_timeout,
        },
        connections: Arc::new(Semaphore::new(settings.max_connections)),
        allowed_origins: settings.allowed_origins.clone(),
        tokens: Tokens {
            token: settings.token.clone(),
            admin_token: settings.admin_token.clone(),
        },
        refusal_log: Mutex::new(LogLimit::new(REFUSAL_LOG_INTERVAL)),
        origin_log: Mutex::new(LogLimit::new(REFUSAL_LOG_INTERVAL)),
        busy_log: Mutex::new(LogLimit::new(REFUSAL_LOG_INTERVAL)),
        shutdown: shutdown.clone(),
        cut: cut.clone(),
        cut_count: cut_count.clone(),
        tracker: tracker.clone(),
        metrics: metrics.clone(),
    });
    // Routes added before the layer need the token; `/healthz`, added after, does not.
    let app = Router::new()
        .route("/ws", get(upgrade))
        .route("/", get(live_page))
        .route("/live", get(live_upgrade))
        .route("/metrics", get(scrape))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found") })
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .route("/healthz", get(|| async { "ok" }))
        // The page's script and style hold no data: like `/healthz`, no token.
        .route(
            "/live.js",
            get(|| asset("text/javascript; charset=utf-8", live::assets::SCRIPT)),
        )
        .route(
            "/live.css",
            get(|| asset("text/css; charset=utf-8", live::assets::STYLE)),
        )
        .with_state(state);
    let mut addrs = Vec::with_capacity(listeners.len());
    let mut tasks = JoinSet::new();
    let tcp_slots = Arc::new(Semaphore::new(
        settings
            .max_connections
            .saturating_add(settings.handshake_reserve)
            .min(Semaphore::MAX_PERMITS),
    ));
    for listener in listeners {
        addrs.push(listener.local_addr()?);
        tasks.spawn(serve_listener(
            listener,
            app.clone(),
            tcp_slots.clone(),
            settings.handshake_timeout,
            shutdown.clone(),
            metrics.clone(),
        ));
    }
    Ok(RunningServer {
        addrs,
        locks,
        registry,
        suspensions,
        shutdown,
        shutdown_timeout: settings.shutdown_timeout,
        cut,
        cut_count,
        tracker,
        listeners: tasks,
    })
}

impl RunningServer {
    /// The addresses actually bound (useful with port 0).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The server's lock manager (for diagnostics and tests).
    pub fn lock_manager(&self) -> &LockManager {
        &self.locks
    }

    /// The directory of open sessions (for diagnostics and tests).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The suspended sessions (for diagnostics and tests).
    pub fn suspensions(&self) -> &Suspensions {
        &self.suspensions
    }

    /// A token that starts the shutdown when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Shuts down: stops accepting, answers waiting requests `shutting_down`, closes every
    /// connection, and returns once all of them have finished, or once the shutdown timeout
    /// ([`ServerSettings::shutdown_timeout`]) has passed. The connections still open then are
    /// cut: dropped without waiting for their clients (a client that stopped reading would
    /// otherwise hold the shutdown up for a whole idle timeout), which releases their sessions.
    /// A write being committed for one of them still lands in the store or is never
    /// acknowledged. Returns how many connections were cut (and logs it at `warn`).
    ///
    /// HTTP connections that are not WebSockets (yet) get [`HTTP_SHUTDOWN_GRACE`] (at most the
    /// shutdown timeout) to finish; after that they are abandoned, so a client that sent half a
    /// request and stalled cannot hold the shutdown up.
    pub async fn shutdown(mut self) -> usize {
        let timeout = self.shutdown_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        self.shutdown.cancel();
        let listeners = async {
            while let Some(result) = self.listeners.join_next().await {
                match result {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => tracing::warn!(%error, "listener failed"),
                    Err(error) => tracing::warn!(%error, "listener task failed"),
                }
            }
        };
        let http_grace = HTTP_SHUTDOWN_GRACE.min(timeout);
        if tokio::time::timeout(http_grace, listeners).await.is_err() {
            tracing::warn!(
                "HTTP connections still unfinished after {http_grace:?}; abandoning them"
            );
            self.listeners.abort_all();
        }
        self.tracker.close();
        let finished = tokio::time::timeout_at(deadline, self.tracker.wait())
            .await
            .is_ok();
        // Every connection is answered `shutting_down` and its session released, not suspended;
        // the sessions suspended before go now.
        self.suspensions.release_all();
        if finished {
            return 0;
        }
        self.cut.cancel();
        if tokio::time::timeout(CUT_GRACE, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = self.tracker.len(),
                "shutdown: connection tasks still running {CUT_GRACE:?} after they were cut"
            );
        }
        self.suspensions.release_all();
        let cut = self.cut_count.load(Ordering::Relaxed);
        let noun = if cut == 1 {
            "connection"
        } else {
            "connections"
        };
        tracing::warn!(
            cut,
            "shutdown: {cut} {noun} cut after {timeout:?}: their clients did not take their \
             last answers in time"
        );
        cut
    }
}

/// Checks the request's token (401 without the right one) and passes on what it may do.
async fn require_token(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut request: Request,
    next: Next,
) -> Response {
    match state.tokens.check(request.headers(), request.uri()) {
        Ok(access) => {
            request.extensions_mut().insert(access);
            next.run(request).await
        }
        Err(refusal) => {
            state.metrics.refused(Refusal::Unauthorized);
            log_refusal(
                &state.refusal_log,
                tokio::time::Instant::now(),
                peer,
                request.uri().path(),
                refusal,
            );
            (StatusCode::UNAUTHORIZED, refusal.to_string()).into_response()
        }
    }
}

/// Logs a request refused for its token at `warn`, unless `limit` says a line was written less
/// than [`REFUSAL_LOG_INTERVAL`] before `now`; the next line written says how many were left out.
/// It names the path only, never the query (it may carry a token), and never a token.
fn log_refusal(
    limit: &Mutex<LogLimit>,
    now: tokio::time::Instant,
    peer: SocketAddr,
    path: &str,
    refusal: Unauthorized,
) {
    let allowed = limit
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .allow(now);
    let Some(suppressed) = allowed else {
        return;
    };
    if suppressed == 0 {
        tracing::warn!(%peer, path, reason = ?refusal, "refused a request without the right token");
    } else {
        tracing::warn!(
            %peer,
            path,
            reason = ?refusal,
            suppressed,
            "refused a request without the right token ({suppressed} more since the last line, not logged)"
        );
    }
}

/// `/metrics`: the exposition of the server's metrics, in the Prometheus text format.
async fn scrape(State(state): State<Arc<AppState>>) -> Response {
    match state.metrics.encode() {
        Ok(text) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response(),
        Err(error) => {
            tracing::warn!(%error, "cannot encode the metrics");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot encode the metrics",
            )
                .into_response()
        }
    }
}

async fn upgrade(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(access): Extension<Access>,
    Extension(slot): Extension<TcpSlot>,
    uri: Uri,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if state.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    let name = auth::query_parameter(&uri, "name");
    if let Some(name) = &name {
        if let Err(error) = protocol::valid_name(name) {
            return (StatusCode::BAD_REQUEST, error.to_string()).into_response();
        }
    }
    let client = Client {
        peer,
        name,
        admin: access.admin,
    };
    if let Some(refused) = origin_refusal(&state, peer, &headers) {
        return refused;
    }
    let permit = state.connections.clone().try_acquire_owned();
    let limit = state.connection.max_message_bytes;
    let task = state.tracker.token();
    upgrade
        .max_message_size(limit)
        .max_frame_size(limit)
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .on_upgrade(move |socket| async move {
            let _task = task;
            let _slot = slot;
            // Polled on every wake of the connection: latched (see `cancel_latch`).
            let mut cut = CancelLatch::new(&state.cut);
            let connection = async {
                match permit {
                    Ok(_permit) => {
                        connection::serve(
                            socket,
                            client,
                            state.context.clone(),
                            state.connection,
                            state.shutdown.clone(),
                        )
                        .await
                    }
                    Err(_) => {
                        state.metrics.refused(Refusal::Busy);
                        log_limited(&state.busy_log, |suppressed| {
                            tracing::warn!(%peer, suppressed, "connection limit reached; refusing");
                        });
                        connection::refuse_busy(socket).await
                    }
                }
            };
            // At the shutdown timeout the connection is dropped where it stands: its socket is
            // closed and its session released (a write already handed to the store still
            // completes there; its answer is never sent).
            tokio::select! {
                biased;
                () = connection => {}
                () = cut.cancelled() => {
                    state.cut_count.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, "connection cut at the shutdown timeout");
                }
            }
        })
}

/// The refusal (403) of an upgrade whose `Origin` is foreign: neither listed with
/// `--allowed-origin` nor the server's own page's. `None` lets it through, as for a client that
/// sends no `Origin` (not a browser).
fn origin_refusal(state: &AppState, peer: SocketAddr, headers: &HeaderMap) -> Option<Response> {
    let origin = headers.get(header::ORIGIN)?;
    let allowed = origin.to_str().is_ok_and(|origin| {
        state.allowed_origins.iter().any(|a| a == origin) || is_own_page(origin, headers)
    });
    if allowed {
        return None;
    }
    state.metrics.refused(Refusal::Origin);
    log_limited(&state.origin_log, |suppressed| {
        tracing::warn!(%peer, ?origin, suppressed, "refused a WebSocket upgrade from a foreign Origin");
    });
    Some((StatusCode::FORBIDDEN, "origin not allowed").into_response())
}

/// Is `origin` this server's own page, the live page at `/`? That is, `http(s)://` and the very
/// `Host` the request was sent to, where that host is `localhost` or an IP address. A domain
/// name is not trusted this way: with DNS rebinding, a foreign page can get its own domain to
/// resolve to this server, and would then count as the same origin; such names must be listed
/// with `--allowed-origin`.
fn is_own_page(origin: &str, headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let same = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .is_some_and(|rest| rest == host);
    let authority: Option<axum::http::uri::Authority> = host.parse().ok();
    let literal = authority.is_some_and(|a| {
        let name = a.host().trim_start_matches('[').trim_end_matches(']');
        name == "localhost" || name.parse::<std::net::IpAddr>().is_ok()
    });
    same && literal
}

/// A static asset of the live page.
async fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `GET /`: the live page.
async fn live_page() -> Response {
    asset("text/html; charset=utf-8", live::assets::PAGE).await
}

/// `GET /live`: the live page's WebSocket, which pushes the live view (see `live`). It counts
/// as a connection (`--max-connections`) and ends at shutdown like the others.
async fn live_upgrade(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(slot): Extension<TcpSlot>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if state.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    if let Some(refused) = origin_refusal(&state, peer, &headers) {
        return refused;
    }
    let Ok(permit) = state.connections.clone().try_acquire_owned() else {
        state.metrics.refused(Refusal::Busy);
        return (StatusCode::SERVICE_UNAVAILABLE, "connection limit reached").into_response();
    };
    let task = state.tracker.token();
    upgrade
        .read_buffer_size(READ_BUFFER_BYTES)
        .max_message_size(READ_BUFFER_BYTES)
        .on_upgrade(move |socket| async move {
            let (_task, _slot, _permit) = (task, slot, permit);
            tokio::select! {
                () = live::serve(socket, state.context.clone(), state.shutdown.clone()) => {}
                () = state.cut.cancelled() => {}
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log destination the test can read: what a subscriber writes lands in the buffer.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn lines(&self) -> Vec<String> {
            let bytes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            String::from_utf8_lossy(&bytes)
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    #[cfg(unix)]
    #[test]
    fn refused_requests_are_logged_once_a_second_and_the_next_line_counts_the_left_out() {
        // Story: every 401 was logged at warn, so one client with a wrong token could write a
        // log line per request, as fast as it could send them.
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE)
            .finish();
        let limit = Mutex::new(LogLimit::new(REFUSAL_LOG_INTERVAL));
        let peer = SocketAddr::from(([127, 0, 0, 1], 40_000));
        let start = tokio::time::Instant::now();
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..1000 {
                log_refusal(&limit, start, peer, "/ws", Unauthorized::Wrong);
            }
            let later = start + REFUSAL_LOG_INTERVAL;
            log_refusal(&limit, later, peer, "/ws", Unauthorized::Missing);
        });
        let lines = captured.lines();
        assert_eq!(lines.len(), 2, "{lines:#?}");
        for line in &lines {
            assert!(line.contains(" WARN "), "{line}");
            assert!(
                line.contains("refused a request without the right token"),
                "{line}"
            );
            assert!(line.contains("peer=127.0.0.1:40000"), "{line}");
        }
        assert!(!lines[0].contains("suppressed"), "{}", lines[0]);
        assert!(lines[0].contains("reason=Wrong"), "{}", lines[0]);
        assert!(
            lines[1].contains("999 more since the last line"),
            "{}",
            lines[1]
        );
        assert!(lines[1].contains("suppressed=999"), "{}", lines[1]);
        assert!(lines[1].contains("reason=Missing"), "{}", lines[1]);
    }
}
