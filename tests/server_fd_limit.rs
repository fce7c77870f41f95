//! Over the wire, in a process of its own (the open-file limit is per process): at the
//! open-file limit a client is refused at once (its connection closed) or served, never left
//! hanging in the listen backlog.
//!
//! Story: with the open-file limit at 1024, 1100 idle connections made every `accept` fail with
//! `Too many open files`; real clients waited in the backlog until some were closed.
#![cfg(target_os = "linux")]

mod wire;

use std::time::Duration;

use locksmith::server::ServerSettings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use wire::{settings, start, BOUND};

/// Connections the test opens beyond the descriptors it leaves the process.
const OVER: usize = 10;

/// Descriptors left free under the lowered limit.
const HEADROOM: u64 = 20;

fn open_descriptors() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .count() as u64
}

#[tokio::test]
async fn at_the_open_file_limit_a_client_is_refused_at_once_not_left_hanging() {
    // The connection cap is far away: only the descriptors run out.
    let server = start(ServerSettings {
        max_connections: 10_000,
        handshake_timeout: Some(Duration::from_secs(60)),
        ..settings()
    })
    .await;
    // Client sockets are made before the limit is lowered: only the server's side of each
    // connection needs a new descriptor.
    let count = HEADROOM as usize + OVER;
    let mut sockets: Vec<TcpSocket> = (0..=count)
        .map(|_| TcpSocket::new_v4().expect("a client socket"))
        .collect();
    let real = sockets.pop().expect("one socket for the real client");
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).expect("getrlimit");
    rlimit::setrlimit(
        rlimit::Resource::NOFILE,
        open_descriptors() + HEADROOM,
        hard,
    )
    .expect("lower the open-file limit");

    let mut idle = Vec::new();
    for socket in sockets {
        idle.push(socket.connect(server.addr).await.expect("connect"));
    }
    let mut real = real.connect(server.addr).await.expect("connect");
    let answered = tokio::time::timeout(BOUND, async {
        // A write may fail on a connection the server has already closed.
        let _ = real
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await;
        let mut response = Vec::new();
        let _ = real.read_to_end(&mut response).await;
        response
    })
    .await;
    rlimit::setrlimit(rlimit::Resource::NOFILE, soft, hard).expect("restore the limit");
    let response = answered.expect("the real client was left hanging at the open-file limit");
    let response = String::from_utf8_lossy(&response);
    assert!(
        response.is_empty() || response.ends_with("ok"),
        "neither refused nor served: {response:?}"
    );
    drop(idle);
    server.stop().await;
}
