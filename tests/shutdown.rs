//! Shutdown with a client that stopped reading: the server is stuck sending it a large answer,
//! and the shutdown must still end within `--shutdown-timeout`, cutting that connection, instead
//! of waiting for the whole idle timeout (a stop grace of 10 s under Docker or 30 s under
//! Kubernetes would otherwise end in a SIGKILL).

mod binary;
mod wire;

use std::time::{Duration, Instant};

use binary::{locksmith, ServerProcess};
use locksmith::server::ServerSettings;
use serde_json::json;
use tokio_tungstenite::MaybeTlsStream;
use wire::{settings, start, Client, BOUND};

/// Connects to `url`, takes a lock, and asks for one 32 MiB answer (more than the socket
/// buffers hold) that it never reads. Returns once the answer has started arriving: from then on
/// the server is stuck sending the rest.
async fn a_client_that_stopped_reading(url: &str) -> Client {
    let mut client = Client::connect(url).await;
    client.learn_session().await;
    let value = "x".repeat(512 * 1024);
    let keys: Vec<String> = (0..64).map(|n| format!("b{n}")).collect();
    for key in &keys {
        client
            .ok(json!({"command": "write", "keys": [key], "value": value}))
            .await;
    }
    client.lock(&["t"], "write").await;
    client
        .send(json!({"command": "read", "keys": keys, "id": "big"}))
        .await;
    let MaybeTlsStream::Plain(tcp) = client.ws.get_ref() else {
        panic!("a plain TCP connection");
    };
    tokio::time::timeout(BOUND, tcp.peek(&mut [0u8; 1]))
        .await
        .expect("the answer starts arriving")
        .expect("peek");
    client
}

#[tokio::test]
async fn sigterm_with_a_client_that_stopped_reading_exits_0_within_the_shutdown_timeout() {
    // Story: the server waited for the client to take its answer for the whole idle timeout
    // (59 s by default) before it exited, so every graceful stop became a SIGKILL.
    let mut command = locksmith();
    command.args([
        "--in-memory",
        "--shutdown-timeout",
        "1s",
        "--idle-timeout",
        "60s",
    ]);
    let server = ServerProcess::start(command);
    let client = a_client_that_stopped_reading(&server.url()).await;
    let within = Duration::from_secs(1) + Duration::from_secs(5);
    let ended = server.terminate(within);
    assert_eq!(ended.status.code(), Some(0), "{ended:#?}");
    assert!(
        ended.took >= Duration::from_secs(1),
        "it waited for the shutdown timeout first: {ended:#?}"
    );
    assert!(
        ended
            .log
            .iter()
            .any(|line| line.contains("shutdown: 1 connection cut after 1s")),
        "{ended:#?}"
    );
    assert!(
        ended.log.iter().any(|line| line.contains("stopped")),
        "{ended:#?}"
    );
    drop(client);
}

#[tokio::test]
async fn shutdown_cuts_a_connection_that_stopped_reading_at_the_shutdown_timeout() {
    let server = start(ServerSettings {
        shutdown_timeout: Duration::from_millis(300),
        idle_timeout: Some(Duration::from_secs(60)),
        ..settings()
    })
    .await;
    let locks = server.locks().clone();
    let client = a_client_that_stopped_reading(&server.url()).await;
    let started = Instant::now();
    let cut = server.stop().await;
    let took = started.elapsed();
    assert_eq!(cut, 1, "the connection that stopped reading was cut");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(300) + BOUND / 2,
        "took {took:?}"
    );
    assert_eq!(locks.session_count(), 0, "its session was released");
    assert!(locks.snapshot().is_empty(), "its lock was released");
    drop(client);
}

#[tokio::test]
async fn a_shutdown_without_stuck_clients_cuts_nothing() {
    let server = start(ServerSettings {
        shutdown_timeout: Duration::from_secs(30),
        ..settings()
    })
    .await;
    let mut client = server.connect().await;
    client.lock(&["k"], "write").await;
    let started = Instant::now();
    assert_eq!(server.stop().await, 0);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "did not wait for the timeout"
    );
    assert_eq!(client.close_code().await, Some(1001));
}
