//! Accepting TCP connections: the accept loop of each listener and the serving of one HTTP/1
//! connection until it is upgraded to a WebSocket.
//!
//! Everything here protects the server from connections that never become WebSockets: every
//! accepted connection holds a slot until it closes (so the connection cap cannot be bypassed
//! before the upgrade), a connection that has not upgraded within the handshake deadline is
//! closed, and when the process runs out of file descriptors a spare one is given up to refuse
//! the waiting client at once, and the loop pauses instead of spinning.

use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower_service::Service;

use crate::log_limit::{log_limited, LogLimit, REFUSAL_LOG_INTERVAL};
use crate::metrics::{Metrics, Refusal};

/// The first pause of the accept loop when the process is out of file descriptors (or the
/// kernel out of memory for sockets); it doubles with every failure in a row, up to
/// [`ACCEPT_BACKOFF_MAX`].
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);

/// The longest pause of the accept loop; see [`ACCEPT_BACKOFF_MIN`].
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Serves one listener until `shutdown` is cancelled: accepts connections and serves each in a
/// task of its own, as HTTP/1 with upgrades, under the handshake deadline ([`serve_http`]).
///
/// On shutdown it stops accepting, asks every connection to finish the request it is serving
/// (an idle one closes at once), and returns when they have: the WebSockets they upgraded to run
/// in tasks of their own (the `TaskTracker`), and are not waited for here. Aborting this task
/// ([`RunningServer::shutdown`](crate::server::RunningServer::shutdown) does after
/// [`HTTP_SHUTDOWN_GRACE`](crate::server::HTTP_SHUTDOWN_GRACE)) drops the connections too.
///
/// Every accepted connection takes a permit of `tcp_slots` ([`TcpSlot`]) and holds it until its
/// socket closes, through its upgrade; without a free permit it is closed at once, so clients
/// that never upgrade cannot get around `--max-connections`, and a client over the limit learns
/// it at once instead of waiting in the listen backlog.
///
/// An accept that fails for want of file descriptors or memory (`EMFILE`, `ENFILE`, `ENOBUFS`,
/// `ENOMEM`) closes the spare descriptor ([`spare_descriptor`]), accepts the waiting connection,
/// closes it and opens the spare again, so a client at the limit is refused at once instead of
/// hanging in the listen backlog. If that refuses nothing or the spare cannot be had back, the
/// accept is retried after a pause that doubles from [`ACCEPT_BACKOFF_MIN`] to
/// [`ACCEPT_BACKOFF_MAX`], so the loop does not spin while the process is out of descriptors;
/// other failures concern one connection only, and the next is accepted at once.
pub(crate) async fn serve_listener(
    listener: TcpListener,
    app: Router,
    tcp_slots: Arc<Semaphore>,
    handshake_timeout: Option<Duration>,
    shutdown: CancellationToken,
    metrics: Metrics,
) -> io::Result<()> {
    let mut connections = JoinSet::new();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let accept_log = Mutex::new(LogLimit::new(REFUSAL_LOG_INTERVAL));
    let full_log = Mutex::new(LogLimit::new(REFUSAL_LOG_INTERVAL));
    let mut spare = spare_descriptor();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => {
                backoff = ACCEPT_BACKOFF_MIN;
                accepted
            }
            Err(error) if is_out_of_resources(&error) => {
                log_limited(&accept_log, |suppressed| {
                    tracing::warn!(
                        %error,
                        suppressed,
                        "cannot accept a connection; refusing it (is the open-file limit too low for --max-connections?)"
                    );
                });
                // The spare descriptor makes room to take the waiting client off the backlog
                // and close its connection: it learns at once instead of hanging there. Each
                // round refuses a connection, so it cannot spin; without one, pause.
                let refused = spare.take().is_some()
                    && matches!(
                        tokio::time::timeout(Duration::ZERO, listener.accept()).await,
                        Ok(Ok(_))
                    );
                spare = spare_descriptor();
                if refused {
                    metrics.refused(Refusal::OutOfDescriptors);
                }
                if refused && spare.is_some() {
                    continue;
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
            Err(error) => {
                tracing::debug!(%error, "accept failed");
                continue;
            }
        };
        let Ok(slot) = tcp_slots.clone().try_acquire_owned() else {
            metrics.refused(Refusal::Busy);
            log_limited(&full_log, |suppressed| {
                tracing::warn!(
                    %peer,
                    suppressed,
                    "too many open connections (--max-connections and the handshake reserve); closing a new one"
                );
            });
            drop(tcp);
            continue;
        };
        // TCP_NODELAY: answers are small frames written back to back (pipelined answers, an
        // error answer followed by a close frame). With Nagle's algorithm a frame written while
        // the previous one is unacknowledged is held back; if the connection is then dropped
        // with unread input (an oversized frame), the kernel resets it and the held-back close
        // frame is lost.
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        connections.spawn(serve_http(
            tcp,
            peer,
            TcpSlot {
                _permit: Arc::new(slot),
            },
            app.clone(),
            handshake_timeout,
            shutdown.clone(),
            metrics.clone(),
        ));
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// One accepted TCP connection's permit of the listener's `tcp_slots`: held by the connection
/// task and, through the request's extensions, by the WebSocket it is upgraded to, so it is
/// returned when the last of them ends.
#[derive(Clone)]
pub(crate) struct TcpSlot {
    _permit: Arc<OwnedSemaphorePermit>,
}

/// A file descriptor kept open for the moment the process has none left: closing it lets the
/// accept loop accept one more connection, to close it (see [`serve_listener`]). `None` if
/// even this cannot be opened.
fn spare_descriptor() -> Option<std::fs::File> {
    std::fs::File::open(if cfg!(windows) { "NUL" } else { "/dev/null" }).ok()
}

/// Is `error`, from `accept`, the process or the kernel running out of file descriptors or
/// socket memory, which lasts until connections close, rather than a failure of one connection?
fn is_out_of_resources(error: &io::Error) -> bool {
    #[cfg(unix)]
    {
        matches!(
            error.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        )
    }
    #[cfg(not(unix))]
    {
        error.kind() == io::ErrorKind::OutOfMemory
    }
}

/// Serves one TCP connection as HTTP/1 until it ends, is upgraded (the WebSocket then runs in a
/// task of its own), or `handshake_timeout` has passed since it was accepted: then it is closed,
/// whatever it was doing, so a client that sends nothing, or half a request, cannot hold a
/// socket (and a file descriptor) for longer. A client using keep-alive for `/healthz` therefore
/// reconnects at the latest every `handshake_timeout`. On `shutdown` the request being served
/// is finished, and the connection closed.
async fn serve_http(
    tcp: TcpStream,
    peer: SocketAddr,
    slot: TcpSlot,
    app: Router,
    handshake_timeout: Option<Duration>,
    shutdown: CancellationToken,
    metrics: Metrics,
) {
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        request.extensions_mut().insert(slot.clone());
        app.clone().call(request)
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(tcp), service)
        .with_upgrades();
    let mut connection = pin!(connection);
    let deadline = async {
        match handshake_timeout {
            Some(timeout) => tokio::time::sleep(timeout).await,
            None => std::future::pending().await,
        }
    };
    let mut deadline = pin!(deadline);
    let mut stopping = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%peer, %error, "HTTP connection failed");
                }
                return;
            }
            () = &mut deadline => {
                metrics.refused(Refusal::HandshakeTimeout);
                tracing::debug!(%peer, "handshake timeout: closing the connection");
                return;
            }
            () = shutdown.cancelled(), if !stopping => {
                stopping = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_pauses_only_for_a_shortage_of_descriptors_or_memory() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(is_out_of_resources(&io::Error::from_raw_os_error(errno)));
        }
        for errno in [libc::ECONNABORTED, libc::ECONNRESET, libc::EPERM] {
            assert!(!is_out_of_resources(&io::Error::from_raw_os_error(errno)));
        }
    }
}
