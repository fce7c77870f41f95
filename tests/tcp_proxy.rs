//! The test proxy itself (`tests/proxy/mod.rs`), over plain TCP on loopback: it forwards bytes
//! both ways, `cut` resets both sides of every connection, `stall` holds bytes back until
//! `unstall`, `refuse` resets new connections while existing ones keep working, and dropping it
//! ends its connections. The upstream is a listener whose connections each test accepts itself,
//! so that it sees both ends of every connection.

mod proxy;

use std::time::Duration;

use proxy::{Proxy, BOUND};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long a test watches for bytes (or a connection) that must not arrive. Absence cannot be
/// awaited; this is only how long the test looks.
const QUIET: Duration = Duration::from_millis(300);

/// An upstream server on loopback, and a proxy to it.
async fn upstream_and_proxy() -> (TcpListener, Proxy) {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = Proxy::start(upstream.local_addr().unwrap()).await;
    (upstream, proxy)
}

/// Connects through the proxy; returns the client's side and the upstream's side.
async fn connect(proxy: &Proxy, upstream: &TcpListener) -> (TcpStream, TcpStream) {
    let client = tokio::time::timeout(BOUND, TcpStream::connect(proxy.addr()))
        .await
        .expect("connect to the proxy within the bound")
        .expect("connect to the proxy");
    let (server, _) = tokio::time::timeout(BOUND, upstream.accept())
        .await
        .expect("the proxy connects upstream within the bound")
        .expect("accept upstream");
    (client, server)
}

/// Sends `bytes` on `from`, and checks that `to` receives exactly them within the bound.
async fn passes(from: &mut TcpStream, to: &mut TcpStream, bytes: &[u8]) {
    from.write_all(bytes).await.unwrap();
    let mut received = vec![0; bytes.len()];
    tokio::time::timeout(BOUND, to.read_exact(&mut received))
        .await
        .expect("the bytes arrive within the bound")
        .expect("read the bytes");
    assert_eq!(received, bytes);
}

/// Checks that nothing arrives on `stream` for [`QUIET`], and that it has not ended either.
async fn quiet(stream: &mut TcpStream, side: &str) {
    let mut buf = [0; 64];
    if let Ok(read) = tokio::time::timeout(QUIET, stream.read(&mut buf)).await {
        panic!("the {side} side should see nothing, but its read gave {read:?}");
    }
}

/// Reads `stream` once, within the bound, expecting its end rather than bytes.
async fn read_end(stream: &mut TcpStream, side: &str) -> std::io::Result<usize> {
    let mut buf = [0; 64];
    match tokio::time::timeout(BOUND, stream.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => panic!("the {side} side should see its end, but got {n} bytes"),
        Ok(read) => read,
        Err(_) => panic!("the {side} side did not see its end within {BOUND:?}"),
    }
}

/// Checks that `stream` sees a clean end of file within the bound.
async fn end_of_file(stream: &mut TcpStream, side: &str) {
    let read = read_end(stream, side).await;
    assert!(
        matches!(read, Ok(0)),
        "the {side} side should see end of file, not {read:?}"
    );
}

/// Checks that `stream` sees a reset within the bound: the connection ended abruptly, as when a
/// network path fails (a plain "end of file or error" would do for a test of a client; the
/// proxy does reset, so its own tests say so).
async fn reset(stream: &mut TcpStream, side: &str) {
    let read = read_end(stream, side).await;
    assert!(
        matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the {side} side should see a reset, not {read:?}"
    );
}

#[tokio::test]
async fn bytes_pass_through_both_ways() {
    let (upstream, proxy) = upstream_and_proxy().await;
    let (mut client, mut server) = connect(&proxy, &upstream).await;
    passes(&mut client, &mut server, b"to the server").await;
    passes(&mut server, &mut client, b"to the client").await;
    // More than one chunk of the proxy's buffer, both ways.
    let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    passes(&mut client, &mut server, &big).await;
    passes(&mut server, &mut client, &big).await;
    assert_eq!((proxy.live(), proxy.accepted()), (1, 1));
}

#[tokio::test]
async fn a_clean_close_passes_through_as_end_of_file() {
    let (upstream, proxy) = upstream_and_proxy().await;
    let (mut client, mut server) = connect(&proxy, &upstream).await;
    client.shutdown().await.unwrap();
    end_of_file(&mut server, "upstream").await;
    // Half-closed: the other direction still flows.
    passes(&mut server, &mut client, b"last words").await;
    drop(server);
    end_of_file(&mut client, "client").await;
    proxy.wait_live(0).await;
}

#[tokio::test]
async fn cut_ends_both_sides_and_new_connections_still_work() {
    let (upstream, proxy) = upstream_and_proxy().await;
    let (mut client, mut server) = connect(&proxy, &upstream).await;
    passes(&mut client, &mut server, b"before").await;

    assert_eq!(proxy.cut(), 1);
    reset(&mut client, "client").await;
    reset(&mut server, "upstream").await;
    assert_eq!(proxy.live(), 0);

    let (mut client, mut server) = connect(&proxy, &upstream).await;
    passes(&mut client, &mut server, b"after").await;
    passes(&mut server, &mut client, b"after").await;
    assert_eq!((proxy.live(), proxy.accepted()), (1, 2));
}

#[tokio::test]
async fn stall_holds_bytes_back_both_ways_until_unstall() {
    let (upstream, proxy) = upstream_and_proxy().await;
    let (mut client, mut server) = connect(&proxy, &upstream).await;
    passes(&mut client, &mut server, b"before").await;

    proxy.stall();
    client.write_all(b"held up").await.unwrap();
    server.write_all(b"held down").await.unwrap();
    quiet(&mut server, "upstream").await;
    quiet(&mut client, "client").await;
    assert_eq!(proxy.live(), 1, "a stalled connection stays open");

    proxy.unstall();
    let mut up = [0; 7];
    let mut down = [0; 9];
    tokio::time::timeout(BOUND, server.read_exact(&mut up))
        .await
        .expect("delivered within the bound after unstall")
        .unwrap();
    tokio::time::timeout(BOUND, client.read_exact(&mut down))
        .await
        .expect("delivered within the bound after unstall")
        .unwrap();
    assert_eq!((&up[..], &down[..]), (&b"held up"[..], &b"held down"[..]));
}

#[tokio::test]
async fn stall_leaves_new_connections_flowing_and_cut_ends_the_stalled_one() {
    let (upstream, proxy) = upstream_and_proxy().await;
    let (mut stalled_client, mut stalled_server) = connect(&proxy, &upstream).await;
    proxy.stall();

    // A client reconnecting while its old path hangs gets through.
    let (mut client, mut server) = connect(&proxy, &upstream).await;
    passes(&mut client, &mut server, b"reconnected").await;
    passes(&mut server, &mut client, b"welcome back").await;

    stalled_client.write_all(b"lost").await.unwrap();
    quiet(&mut stalled_server, "stalled upstream").await;
    assert_eq!(proxy.cut(), 2);
    reset(&mut stalled_client, "stalled client").await;
    reset(&mut stalled_server, "stalled upstream").await;
    reset(&mut client, "client").await;
    reset(&mut server, "upstream").await;
}

#[tokio::test]
async fn refuse_ends_new_connections_at_once_and_keeps_existing_ones() {
    let (upstream, proxy) = upstream_and_proxy().await;
    let (mut client, mut server) = connect(&proxy, &upstream).await;

    proxy.refuse(true);
    // The kernel may complete the TCP handshake before the proxy accepts and resets.
    if let Ok(Ok(mut refused)) = tokio::time::timeout(BOUND, TcpStream::connect(proxy.addr())).await
    {
        reset(&mut refused, "refused client").await;
    }
    let reached = tokio::time::timeout(QUIET, upstream.accept()).await;
    assert!(
        reached.is_err(),
        "a refused connection must not reach upstream"
    );
    passes(&mut client, &mut server, b"still here").await;
    passes(&mut server, &mut client, b"still here").await;
    assert_eq!((proxy.live(), proxy.accepted()), (1, 1));

    proxy.refuse(false);
    let (mut again, mut server_again) = connect(&proxy, &upstream).await;
    passes(&mut again, &mut server_again, b"let in").await;
    assert_eq!(proxy.accepted(), 2);
}

#[tokio::test]
async fn dropping_the_proxy_ends_its_connections() {
    let (upstream, proxy) = upstream_and_proxy().await;
    let (mut client, mut server) = connect(&proxy, &upstream).await;
    let addr = proxy.addr();
    drop(proxy);
    reset(&mut client, "client").await;
    reset(&mut server, "upstream").await;
    // Nothing listens any more: a new connection fails or ends at once.
    if let Ok(Ok(mut late)) = tokio::time::timeout(BOUND, TcpStream::connect(addr)).await {
        reset(&mut late, "late client").await;
    }
}
