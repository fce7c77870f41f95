//! A small TCP proxy on loopback for the over-the-wire tests that need a bad network: a client
//! connects to the server through it, and the test cuts every connection (a network blip: both
//! sides see a reset), stalls them (a half-dead path: both sockets stay open, no error on either
//! side, the bytes just stop flowing until it unstalls), or refuses new ones (an unreachable
//! server). Each test file that needs it includes this module with `mod proxy;` and uses only
//! part of it.
//!
//! One task accepts; one task per connection forwards both directions, chunk by chunk, and waits
//! before each read and each write while its connection is stalled. Every wait offered here is
//! bounded.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How long [`Proxy::wait_live`] and [`Proxy::wait_accepted`] wait before failing the test.
pub const BOUND: Duration = Duration::from_secs(10);

/// The connections of a proxy, in a `watch` so that a test can wait for a change.
#[derive(Default)]
struct Conns {
    /// The connections being forwarded.
    live: HashMap<u64, Conn>,
    /// Connections accepted (and not refused) so far; also the next connection's id.
    accepted: usize,
}

/// What the proxy holds of one connection being forwarded.
struct Conn {
    /// Cancelled to cut it.
    cut: CancellationToken,
    /// True while it is stalled.
    stalled: watch::Sender<bool>,
}

/// A TCP proxy from `127.0.0.1:<random port>` to one upstream address. Dropping it stops the
/// accept task and ends every connection (with a reset).
pub struct Proxy {
    addr: SocketAddr,
    conns: Arc<watch::Sender<Conns>>,
    refusing: Arc<AtomicBool>,
    /// Cancelled on drop; every connection's token is a child of it.
    stop: CancellationToken,
}

impl Proxy {
    /// Listens on 127.0.0.1:0 and forwards every accepted connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let proxy = Proxy {
            addr,
            conns: Arc::new(watch::Sender::new(Conns::default())),
            refusing: Arc::new(AtomicBool::new(false)),
            stop: CancellationToken::new(),
        };
        tokio::spawn(accept_loop(
            listener,
            upstream,
            proxy.conns.clone(),
            proxy.refusing.clone(),
            proxy.stop.clone(),
        ));
        proxy
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The WebSocket URL of the server, through the proxy.
    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Ends every current connection abruptly on both sides (`SO_LINGER` 0, then close: a
    /// reset), and returns how many were cut. New connections are still accepted afterwards.
    /// The resets are sent by the connection tasks, just after this returns.
    pub fn cut(&self) -> usize {
        let mut cut = 0;
        self.conns.send_modify(|conns| {
            for (_, conn) in conns.live.drain() {
                conn.cut.cancel();
                cut += 1;
            }
        });
        cut
    }

    /// Stops forwarding on every current connection, in both directions, while keeping both
    /// sockets open: a half-dead path. Bytes sent meanwhile are held back (in the kernel's
    /// buffers, or one chunk in the proxy) until [`Proxy::unstall`] or [`Proxy::cut`]. A chunk
    /// whose write had already begun may still arrive. New connections are not stalled, so a
    /// client can reconnect through the proxy while its old connection hangs.
    pub fn stall(&self) {
        self.set_stalled(true);
    }

    /// Forwards again on every current connection, starting with what was held back.
    pub fn unstall(&self) {
        self.set_stalled(false);
    }

    fn set_stalled(&self, stalled: bool) {
        for conn in self.conns.borrow().live.values() {
            conn.stalled.send_replace(stalled);
        }
    }

    /// While refusing, new connections are accepted and reset at once, like a server that is
    /// unreachable (they do not count in [`Proxy::accepted`]); existing ones are untouched.
    pub fn refuse(&self, refusing: bool) {
        self.refusing.store(refusing, Ordering::SeqCst);
    }

    /// Connections currently being forwarded (including one still connecting upstream).
    pub fn live(&self) -> usize {
        self.conns.borrow().live.len()
    }

    /// Total connections accepted (and forwarded) so far.
    pub fn accepted(&self) -> usize {
        self.conns.borrow().accepted
    }

    /// Waits until exactly `n` connections are live, within [`BOUND`]; fails the test otherwise.
    pub async fn wait_live(&self, n: usize) {
        self.wait_for(
            |conns| conns.live.len() == n,
            &format!("{n} live connection(s)"),
        )
        .await;
    }

    /// Waits until at least `n` connections have been accepted, within [`BOUND`]; fails the test
    /// otherwise.
    pub async fn wait_accepted(&self, n: usize) {
        self.wait_for(
            |conns| conns.accepted >= n,
            &format!("{n} accepted connection(s)"),
        )
        .await;
    }

    async fn wait_for(&self, done: impl FnMut(&Conns) -> bool, what: &str) {
        let mut conns = self.conns.subscribe();
        let reached = tokio::time::timeout(BOUND, async {
            // The sender lives as long as `self`: `wait_for` cannot fail.
            conns.wait_for(done).await.is_ok()
        })
        .await;
        assert!(
            reached == Ok(true),
            "the proxy did not reach {what} within {BOUND:?} (live {}, accepted {})",
            self.live(),
            self.accepted()
        );
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Accepts until `stop`: resets each new connection while refusing, else registers it and
/// spawns its forwarding task.
async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    conns: Arc<watch::Sender<Conns>>,
    refusing: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        // An accept error (such as running out of descriptors) concerns that one connection.
        let Ok((client, _)) = accepted else { continue };
        if refusing.load(Ordering::SeqCst) {
            reset(client);
            continue;
        }
        // Registered before the task starts, so that once the upstream side sees the connection
        // (or the client sees any byte from it), `live` counts it and `cut` reaches it.
        let token = stop.child_token();
        let (stalled, stalled_rx) = watch::channel(false);
        let mut id = 0;
        conns.send_modify(|conns| {
            id = conns.accepted as u64;
            conns.accepted += 1;
            let cut = token.clone();
            conns.live.insert(id, Conn { cut, stalled });
        });
        let conns = conns.clone();
        tokio::spawn(async move {
            // Not raced against `token`: a cut while connecting must still reset the upstream
            // side, which may already have accepted the connection. On loopback this is quick.
            let connected = tokio::time::timeout(BOUND, TcpStream::connect(upstream)).await;
            match connected {
                Ok(Ok(server)) => forward(client, server, stalled_rx, &token).await,
                _ => reset(client),
            }
            conns.send_modify(|conns| {
                conns.live.remove(&id);
            });
        });
    }
}

/// Forwards both directions until both have ended (each end passed on as a FIN), or until one
/// fails or `token` is cancelled: then both sides are reset.
async fn forward(
    mut client: TcpStream,
    mut server: TcpStream,
    stalled: watch::Receiver<bool>,
    token: &CancellationToken,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let ended_cleanly = {
        let (client_in, client_out) = client.split();
        let (server_in, server_out) = server.split();
        tokio::select! {
            _ = token.cancelled() => false,
            both = async {
                tokio::try_join!(
                    pump(client_in, server_out, stalled.clone()),
                    pump(server_in, client_out, stalled),
                )
            } => both.is_ok(),
        }
    };
    if !ended_cleanly {
        reset(client);
        reset(server);
    }
}

/// Copies `from` to `to` chunk by chunk, waiting while stalled before each read and before
/// passing on each chunk (or the end of file, as a shutdown of `to`).
async fn pump(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    mut stalled: watch::Receiver<bool>,
) -> io::Result<()> {
    let mut buf = vec![0; 16 * 1024];
    loop {
        flowing(&mut stalled).await?;
        let n = from.read(&mut buf).await?;
        flowing(&mut stalled).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
    }
}

/// Returns once the connection is not stalled.
async fn flowing(stalled: &mut watch::Receiver<bool>) -> io::Result<()> {
    match stalled.wait_for(|stalled| !stalled).await {
        Ok(_) => Ok(()),
        // The proxy forgot the connection: it was cut, or the proxy dropped.
        Err(_) => Err(io::Error::other("the connection was cut")),
    }
}

/// Closes `stream` with a reset rather than a FIN.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}
