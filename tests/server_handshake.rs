//! Over the wire: the handshake deadline (`--handshake-timeout`). A TCP connection that has not
//! completed its WebSocket upgrade (or its plain HTTP request) that long after it was accepted
//! is closed; a WebSocket, once upgraded, is not bound by it.
//!
//! Story: a TCP connection that sent nothing, or an upgrade request that never finished, was
//! held forever: 2000 of them stayed open for 154 s, and with the open-file limit at 1024, 1100
//! of them made the server refuse every real client until some were closed.

mod wire;

use std::time::Duration;

use locksmith::server::ServerSettings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wire::{http_get, settings, start, BOUND};

/// Short, so the test waits little; the bound on each wait is [`BOUND`].
const HANDSHAKE: Duration = Duration::from_millis(200);

fn with_handshake_deadline() -> ServerSettings {
    ServerSettings {
        handshake_timeout: Some(HANDSHAKE),
        ..settings()
    }
}

/// Reads until the server closes the connection (end of file, or a reset), within [`BOUND`];
/// returns what the server sent before.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let closed = tokio::time::timeout(BOUND, async {
        let mut buffer = [0u8; 1024];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the server kept the connection open for {BOUND:?}"
    );
    received
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_at_the_handshake_deadline() {
    let server = start(with_handshake_deadline()).await;
    let mut silent = TcpStream::connect(server.addr).await.expect("connect");
    let received = read_until_closed(&mut silent).await;
    assert!(received.is_empty(), "{received:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_connection_that_sends_half_an_upgrade_request_is_closed_at_the_handshake_deadline() {
    let server = start(with_handshake_deadline()).await;
    let mut stalled = TcpStream::connect(server.addr).await.expect("connect");
    stalled
        .write_all(b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n")
        .await
        .expect("write half a request");
    let received = read_until_closed(&mut stalled).await;
    assert!(
        received.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&received)
    );
    server.stop().await;
}

#[tokio::test]
async fn a_websocket_upgraded_in_time_outlives_the_handshake_deadline() {
    let server = start(with_handshake_deadline()).await;
    let mut client = server.connect().await;
    // Accepted after the client: once it is closed, the client's deadline has passed too.
    let mut silent = TcpStream::connect(server.addr).await.expect("connect");
    read_until_closed(&mut silent).await;
    client.lock(&["k"], "write").await;
    assert!(http_get(server.addr, "/healthz").await.ends_with("ok"));
    server.stop().await;
}

#[tokio::test]
async fn every_accepted_connection_counts_and_one_over_the_cap_is_closed_at_once() {
    // One WebSocket and one connection in its handshake at most; the silent connection below
    // would otherwise sit there for the whole (here: a minute's) handshake deadline.
    let server = start(ServerSettings {
        max_connections: 1,
        handshake_reserve: 1,
        handshake_timeout: Some(Duration::from_secs(60)),
        ..settings()
    })
    .await;
    let mut admitted = server.connect().await;
    let silent = TcpStream::connect(server.addr).await.expect("connect");
    // Both slots are taken, the silent connection's before the upgrade: a third connection is
    // closed without an answer, long before any deadline.
    let mut over = TcpStream::connect(server.addr).await.expect("connect");
    let received = read_until_closed(&mut over).await;
    assert!(received.is_empty(), "{received:?}");
    admitted.ping().await;

    // The silent connection leaves: its slot frees, and the next client over the WebSocket
    // limit is told `server_busy` instead. The slot is freed when the server has seen the close;
    // try until then.
    drop(silent);
    let deadline = tokio::time::Instant::now() + BOUND;
    let mut refused = loop {
        if let Ok(ws) = wire::connect_with(&server.url(), None).await {
            break wire::Client {
                ws,
                session: String::new(),
            };
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no slot freed after a connection left"
        );
        tokio::task::yield_now().await;
    };
    let answer = refused.recv().await;
    assert_eq!(answer["code"], serde_json::json!("server_busy"), "{answer}");
    assert_eq!(refused.close_code().await, Some(1013));
    admitted.ping().await;
    server.stop().await;
}
