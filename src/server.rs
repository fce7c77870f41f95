//! The server: listeners, the HTTP routes (`/ws`, `/healthz`), the connection limit, the
//! `Origin` check, and graceful shutdown.
//!
//! Each listener runs an axum server. A WebSocket upgrade on `/ws` is refused with 403 when it
//! carries an `Origin` header that is not allowed (so a web page cannot drive a local Locksmith
//! through the user's browser); clients that send no `Origin` are accepted. A permit of the
//! connection semaphore is taken before the upgrade and held by the connection task; without a
//! permit the client gets one `server_busy` answer and a close.
//!
//! Tokens ([`crate::auth`]): with `--token`, every route but `/healthz` first checks the token
//! the request presents and answers 401 without it, before any upgrade; the admin token makes the
//! connection an admin connection. `?name=` on the upgrade URL names the session (400 if the name
//! is invalid). Request URLs are never logged: they may carry `?token=`.
//!
//! Shutdown: cancelling the token stops the listeners; every connection task sees it, answers
//! `shutting_down` and closes its socket; [`RunningServer::shutdown`] returns once every
//! connection task has finished. axum's own graceful shutdown does not wait for upgraded
//! WebSockets, hence the `TaskTracker`.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Extension;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{self, Access, Secret, Tokens};
use crate::config::{Config, ListenAddr, DEFAULT_LISTEN, LOOPBACK};
use crate::connection::{self, ConnectionSettings};
use crate::lock::{LockManager, LockManagerConfig};
use crate::log_limit::{LogLimit, DEADLOCK_LOG_INTERVAL};
use crate::protocol::{self, Limits};
use crate::registry::Registry;
use crate::session::{Client, SessionContext};
use crate::store::Store;

/// Read buffer of one WebSocket. Requests are small; a large one grows the buffer while it is
/// read. tungstenite's default (128 KiB per connection) would dominate the memory of idle
/// connections.
const READ_BUFFER_BYTES: usize = 4 * 1024;

/// How long [`RunningServer::shutdown`] waits for plain HTTP connections (a `/healthz` call, an
/// upgrade request still being received) to finish. axum's graceful shutdown waits for every
/// one of them, however long a client takes to send its request.
pub const HTTP_SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// What the server needs to know, independent of how it was configured.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// Wait limit of requests without `timeout_ms`.
    pub lock_timeout: Duration,
    /// Most simultaneous WebSocket connections.
    pub max_connections: usize,
    /// Largest request frame in bytes.
    pub max_message_bytes: usize,
    /// Most keys per request.
    pub max_keys_per_request: usize,
    /// Silence after which a connection is closed (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// `Origin` values allowed to connect.
    pub allowed_origins: Vec<String>,
    /// Every fencing token handed out is larger than this. The binary passes its start time in
    /// microseconds since the Unix epoch, so tokens keep increasing across restarts.
    pub token_floor: u64,
    /// Token every request but `/healthz` must present (`None`: none needed).
    pub token: Option<Secret>,
    /// Token that makes a connection an admin connection (may `kill`).
    pub admin_token: Option<Secret>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            lock_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            max_message_bytes: 1024 * 1024,
            max_keys_per_request: 1024,
            idle_timeout: Some(Duration::from_secs(60)),
            allowed_origins: Vec::new(),
            token_floor: 0,
            token: None,
            admin_token: None,
        }
    }
}

impl From<&Config> for ServerSettings {
    fn from(config: &Config) -> Self {
        ServerSettings {
            lock_timeout: config.lock_timeout,
            max_connections: config.max_connections,
            max_message_bytes: config.max_message_bytes,
            max_keys_per_request: config.max_keys_per_request,
            idle_timeout: (!config.idle_timeout.is_zero()).then_some(config.idle_timeout),
            allowed_origins: config.allowed_origins.clone(),
            token_floor: 0,
            token: config.token.clone(),
            admin_token: config.admin_token.clone(),
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
    shutdown: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    tracker: TaskTracker,
}

/// A server that is running. Dropping it does not stop it; call [`RunningServer::shutdown`].
pub struct RunningServer {
    addrs: Vec<SocketAddr>,
    locks: LockManager,
    /// The directory of open sessions, for diagnostics and tests.
    registry: Registry,
    shutdown: CancellationToken,
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

/// Why the server cannot listen where it was asked to.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// A host name could not be resolved.
    #[error("cannot listen on {listen}: cannot resolve the name: {source}")]
    Resolve {
        /// The `--listen` value with the name.
        listen: ListenAddr,
        /// What the resolver said.
        source: io::Error,
    },
    /// A host name resolved to no address at all.
    #[error("cannot listen on {listen}: the name resolves to no address")]
    NoAddress {
        /// The `--listen` value with the name.
        listen: ListenAddr,
    },
    /// An address could not be bound: in use, not on this host, not permitted, …
    #[error("cannot listen on {addr}: {source}{}", in_use_hint(source))]
    Listen {
        /// The address that could not be bound.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
}

/// The advice appended to a bind error when another program holds the address.
fn in_use_hint(error: &io::Error) -> &'static str {
    if error.kind() == io::ErrorKind::AddrInUse {
        "; is another program (or another Locksmith) listening there? Choose another address with --listen"
    } else {
        ""
    }
}

/// Binds every address of `listen`, or of [`DEFAULT_LISTEN`] (`:8008`: 127.0.0.1 and [::1] on
/// port 8008) if `listen` is empty. A host name stands for every address it resolves to, a bare
/// port for the [`LOOPBACK`](crate::config::LOOPBACK) addresses on that port; an address that two
/// values share is bound once.
///
/// Every address must be bound, or the start fails: if `127.0.0.1:8008` is taken by another
/// program, serving on `[::1]:8008` alone would let `ws://localhost:8008` reach that program. The
/// one exception is an IPv6 address that came from a host name or a bare port on a host without
/// IPv6 ([`is_unavailable_ipv6`]): it is skipped with a warning, as long as the value that named
/// it still gets at least one address. An address written out (`[::1]:8008`) is never skipped.
///
/// # Errors
/// The first name that cannot be resolved or address that cannot be bound, naming it.
pub async fn bind(listen: &[ListenAddr]) -> Result<Vec<TcpListener>, BindError> {
    let listen = if listen.is_empty() {
        std::slice::from_ref(&DEFAULT_LISTEN)
    } else {
        listen
    };
    let mut bound: Vec<SocketAddr> = Vec::new();
    let mut listeners = Vec::new();
    for value in listen {
        let (addrs, may_skip_ipv6) = resolve(value).await?;
        let mut skipped = None;
        let mut bound_here = 0usize;
        for addr in addrs {
            if bound.contains(&addr) {
                bound_here += 1;
                continue;
            }
            match TcpListener::bind(addr).await {
                Ok(listener) => {
                    bound.push(addr);
                    listeners.push(listener);
                    bound_here += 1;
                }
                Err(error) if may_skip_ipv6 && is_unavailable_ipv6(addr, &error) => {
                    tracing::warn!(%addr, %error, "IPv6 is not available on this host; not listening on {addr}");
                    skipped = Some(BindError::Listen {
                        addr,
                        source: error,
                    });
                }
                Err(error) => {
                    return Err(BindError::Listen {
                        addr,
                        source: error,
                    })
                }
            }
        }
        if let (0, Some(error)) = (bound_here, skipped) {
            return Err(error);
        }
    }
    Ok(listeners)
}

/// The socket addresses `value` stands for, and whether an IPv6 one among them may be skipped
/// where IPv6 is unavailable (for a name or a bare port, not for an address written out).
async fn resolve(value: &ListenAddr) -> Result<(Vec<SocketAddr>, bool), BindError> {
    match value {
        ListenAddr::Socket(addr) => Ok((vec![*addr], false)),
        ListenAddr::Port(port) => Ok((
            LOOPBACK
                .iter()
                .map(|ip| SocketAddr::new(*ip, *port))
                .collect(),
            true,
        )),
        ListenAddr::Host { name, port } => {
            let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), *port))
                .await
                .map_err(|source| BindError::Resolve {
                    listen: value.clone(),
                    source,
                })?
                .collect();
            // A resolver may list an address once per socket type.
            let mut seen = Vec::with_capacity(addrs.len());
            addrs.retain(|addr| {
                let first = !seen.contains(addr);
                seen.push(*addr);
                first
            });
            if addrs.is_empty() {
                return Err(BindError::NoAddress {
                    listen: value.clone(),
                });
            }
            Ok((addrs, true))
        }
    }
}

/// Does binding `addr` fail with `error` only because this host has no IPv6? True for an IPv6
/// address and `EADDRNOTAVAIL` (the address is not on this host: IPv6 disabled) or
/// `EAFNOSUPPORT` (no IPv6 in the kernel). Every other failure, above all `EADDRINUSE`, says
/// something the user must hear, so it stops the start.
pub fn is_unavailable_ipv6(addr: SocketAddr, error: &io::Error) -> bool {
    addr.is_ipv6()
        && (error.kind() == io::ErrorKind::AddrNotAvailable || is_family_unsupported(error))
}

/// Is `error` `EAFNOSUPPORT` (address family not supported)? std has no `ErrorKind` for it.
fn is_family_unsupported(error: &io::Error) -> bool {
    #[cfg(unix)]
    {
        error.raw_os_error() == Some(libc::EAFNOSUPPORT)
    }
    #[cfg(not(unix))]
    {
        let _ = error;
        false
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
    });
    locks.raise_token_floor(settings.token_floor);
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let registry = Registry::new();
    let state = Arc::new(AppState {
        context: SessionContext {
            locks: locks.clone(),
            store,
            default_timeout: settings.lock_timeout,
            registry: registry.clone(),
            deadlock_log: Arc::new(std::sync::Mutex::new(LogLimit::new(DEADLOCK_LOG_INTERVAL))),
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
        shutdown: shutdown.clone(),
        tracker: tracker.clone(),
    });
    // Routes added before the layer need the token; `/healthz`, added after, does not.
    let app = Router::new()
        .route("/ws", get(upgrade))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found") })
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state);
    let mut addrs = Vec::with_capacity(listeners.len());
    let mut tasks = JoinSet::new();
    for listener in listeners {
        addrs.push(listener.local_addr()?);
        let service = app
            .clone()
            .into_make_service_with_connect_info::<SocketAddr>();
        let stop = shutdown.clone().cancelled_owned();
        // TCP_NODELAY: answers are small frames written back to back (pipelined answers, an
        // error answer followed by a close frame). With Nagle's algorithm a frame written while
        // the previous one is unacknowledged is held back; if the connection is then dropped
        // with unread input (an oversized frame), the kernel resets it and the held-back close
        // frame is lost.
        let listener = listener.tap_io(|tcp| {
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::debug!(%error, "cannot set TCP_NODELAY");
            }
        });
        tasks.spawn(async move {
            axum::serve(listener, service)
                .with_graceful_shutdown(stop)
                .await
        });
    }
    Ok(RunningServer {
        addrs,
        locks,
        registry,
        shutdown,
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

    /// A token that starts the shutdown when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Shuts down: stops accepting, answers waiting requests `shutting_down`, closes every
    /// connection, and returns once all of them have finished.
    ///
    /// HTTP connections that are not WebSockets (yet) get [`HTTP_SHUTDOWN_GRACE`] to finish;
    /// after that they are abandoned, so a client that sent half a request and stalled cannot
    /// hold the shutdown up.
    pub async fn shutdown(mut self) {
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
        if tokio::time::timeout(HTTP_SHUTDOWN_GRACE, listeners)
            .await
            .is_err()
        {
            tracing::warn!(
                "HTTP connections still unfinished after {HTTP_SHUTDOWN_GRACE:?}; abandoning them"
            );
            self.listeners.abort_all();
        }
        self.tracker.close();
        self.tracker.wait().await;
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
            // The path only: the query may carry a token.
            tracing::warn!(%peer, path = request.uri().path(), reason = ?refusal, "refused a request without the right token");
            (StatusCode::UNAUTHORIZED, refusal.to_string()).into_response()
        }
    }
}

async fn upgrade(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(access): Extension<Access>,
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
    if let Some(origin) = headers.get(header::ORIGIN) {
        let allowed = origin
            .to_str()
            .is_ok_and(|o| state.allowed_origins.iter().any(|a| a == o));
        if !allowed {
            tracing::warn!(%peer, ?origin, "refused a WebSocket upgrade from a foreign Origin");
            return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
        }
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
                    tracing::warn!(%peer, "connection limit reached; refusing");
                    connection::refuse_busy(socket).await
                }
            }
        })
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn ipv6() -> SocketAddr {
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 8008))
    }

    fn ipv4() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 8008))
    }

    #[test]
    fn ipv6_that_is_not_on_this_host_may_be_skipped() {
        let not_here = io::Error::from_raw_os_error(libc::EADDRNOTAVAIL);
        let no_family = io::Error::from_raw_os_error(libc::EAFNOSUPPORT);
        assert!(is_unavailable_ipv6(ipv6(), &not_here));
        assert!(is_unavailable_ipv6(ipv6(), &no_family));
    }

    #[test]
    fn a_busy_address_is_never_skipped() {
        let in_use = io::Error::from_raw_os_error(libc::EADDRINUSE);
        assert!(!is_unavailable_ipv6(ipv6(), &in_use));
        assert!(!is_unavailable_ipv6(ipv4(), &in_use));
    }

    #[test]
    fn ipv4_and_other_errors_are_never_skipped() {
        let not_here = io::Error::from_raw_os_error(libc::EADDRNOTAVAIL);
        assert!(!is_unavailable_ipv6(ipv4(), &not_here));
        let denied = io::Error::from_raw_os_error(libc::EACCES);
        assert!(!is_unavailable_ipv6(ipv6(), &denied));
        let other = io::Error::other("something else");
        assert!(!is_unavailable_ipv6(ipv6(), &other));
    }
}
