//! Resumable sessions, the client side (issue 11; docs/semantics.md C1): a client built with a
//! grace reconnects after a lost connection and resumes its session, and gives the session up
//! only when the server no longer has it or the grace has passed.
//!
//! Most tests play the server themselves, step by step, on a loopback listener (`tests/fake`):
//! they accept the client's connections, read its requests and answer them (`hello` with a
//! resume secret, `resume`, `lock`, `ping`), and break the connection by dropping it (no close
//! frame, as when a network path dies). So the client is checked against the wire contract
//! alone. The last ones run the real server in-process, reached through a TCP proxy
//! (`tests/proxy`) whose connections the test cuts.

mod fake;
mod proxy;
mod wire;

use std::time::Duration;

use fake::{
    accept, answer, answer_resume, fake_server, next_request, refuse, resume_request, Ws, BOUND,
};
use futures_util::{poll, StreamExt};
use locksmith::client::{Client, ClientError};
use locksmith::lock::LockMode::Exclusive;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

/// A client asking for `grace` (or none), connected to the fake server, which answers its
/// `hello` as session `s-1`, resumable with [`SECRET`] for `granted_ms` (if `Some`). Returns
/// the client, the server's side of the connection, and the `hello` it received.
async fn connected(
    url: &str,
    listener: &TcpListener,
    grace: Option<Duration>,
    granted_ms: Option<u64>,
) -> (Client, Ws, Value) {
    let mut builder = Client::builder(url).keepalive(None);
    if let Some(grace) = grace {
        builder = builder.grace(grace);
    }
    let connecting = tokio::spawn(builder.connect());
    let mut ws = accept(listener).await;
    let hello = next_request(&mut ws).await;
    let fields = match granted_ms {
        Some(granted_ms) => fake::resumable_hello(granted_ms),
        None => json!({"session": "s-1", "version": "0.1.0"}),
    };
    answer(&mut ws, &hello, fields).await;
    let client = tokio::time::timeout(BOUND, connecting)
        .await
        .expect("connected in time")
        .expect("task")
        .expect("connect");
    (client, ws, hello)
}

#[tokio::test]
async fn a_call_in_flight_at_a_break_fails_connection_lost_and_the_next_call_is_served_after_a_resume(
) {
    let (url, listener) = fake_server().await;
    let (client, mut ws, hello) =
        connected(&url, &listener, Some(Duration::from_secs(10)), Some(5000)).await;
    assert_eq!(hello["grace_ms"], 10_000, "the grace is asked for: {hello}");
    assert_eq!(
        client.grace(),
        Some(Duration::from_millis(5000)),
        "the grace granted, not the one asked for"
    );
    let client = std::sync::Arc::new(client);
    let in_flight = {
        let client = client.clone();
        tokio::spawn(async move { client.lock(&["k"], Exclusive, None).await })
    };
    let lock = next_request(&mut ws).await;
    assert_eq!(lock["command"], "lock");
    drop(ws);
    let failed = tokio::time::timeout(BOUND, in_flight)
        .await
        .expect("in time")
        .expect("task");
    assert_eq!(
        failed.expect_err("never answered").code(),
        "connection_lost"
    );

    let mut ws = accept(&listener).await;
    let resume = resume_request(&mut ws).await;
    answer_resume(&mut ws, &resume).await;
    let next = {
        let client = client.clone();
        tokio::spawn(async move { client.lock(&["k2"], Exclusive, None).await })
    };
    let lock = next_request(&mut ws).await;
    assert_eq!(
        (&lock["command"], &lock["keys"]),
        (&json!("lock"), &json!(["k2"])),
        "the next call, not the failed one again"
    );
    answer(&mut ws, &lock, json!({"tokens": {"k2": 2}})).await;
    let grant = tokio::time::timeout(BOUND, next)
        .await
        .expect("in time")
        .expect("task")
        .expect("granted after the resume");
    assert_eq!(grant.tokens["k2"], 2);
    assert_eq!(client.resumes(), 1);
    assert!(!client.is_lost());
}

#[tokio::test]
async fn calls_made_while_reconnecting_wait_for_the_resume_and_are_then_answered() {
    let (url, listener) = fake_server().await;
    let (client, ws, _) =
        connected(&url, &listener, Some(Duration::from_secs(10)), Some(10_000)).await;
    drop(ws);
    let mut ws = accept(&listener).await;
    let resume = resume_request(&mut ws).await;
    // The resume is not answered yet: the client is reconnecting. Two calls made now...
    let first = client.lock(&["a"], Exclusive, None);
    let second = client.ping();
    tokio::pin!(first, second);
    assert!(poll!(&mut first).is_pending());
    assert!(poll!(&mut second).is_pending());
    // ... are not sent before the resume is answered. (A call sent early would show up here; this
    // short look cannot prove its absence, but the order of what follows is checked too.)
    let early = tokio::time::timeout(Duration::from_millis(100), ws.next()).await;
    assert!(
        early.is_err(),
        "a call was sent before the resume: {early:?}"
    );
    answer_resume(&mut ws, &resume).await;
    let lock = next_request(&mut ws).await;
    assert_eq!(lock["command"], "lock");
    answer(&mut ws, &lock, json!({"tokens": {"a": 3}})).await;
    let ping = next_request(&mut ws).await;
    assert_eq!(ping["command"], "ping");
    answer(&mut ws, &ping, json!({})).await;
    let grant = tokio::time::timeout(BOUND, first)
        .await
        .expect("in time")
        .expect("granted");
    assert_eq!(grant.tokens["a"], 3);
    tokio::time::timeout(BOUND, second)
        .await
        .expect("in time")
        .expect("pinged");
    assert_eq!(client.resumes(), 1);
}

#[tokio::test]
async fn a_resume_answered_session_expired_fails_every_waiting_and_later_call_and_ends_the_client()
{
    let (url, listener) = fake_server().await;
    let (client, ws, _) =
        connected(&url, &listener, Some(Duration::from_secs(10)), Some(10_000)).await;
    drop(ws);
    let mut ws = accept(&listener).await;
    let resume = resume_request(&mut ws).await;
    let waiting = client.lock(&["a"], Exclusive, None);
    tokio::pin!(waiting);
    assert!(poll!(&mut waiting).is_pending());
    refuse(&mut ws, &resume, "session_expired").await;
    let failed = tokio::time::timeout(BOUND, waiting)
        .await
        .expect("in time")
        .expect_err("the session is gone");
    assert!(
        matches!(failed, ClientError::SessionExpired(_)),
        "{failed:?}"
    );
    let lost = given_up(&client).await;
    assert_eq!(lost.code(), "session_expired", "{lost}");
    assert!(client.is_lost());
}

#[tokio::test]
async fn with_no_server_reachable_for_longer_than_the_grace_the_session_expires() {
    let (url, listener) = fake_server().await;
    let (client, ws, _) =
        connected(&url, &listener, Some(Duration::from_secs(10)), Some(300)).await;
    // The server is gone: every reconnect attempt is refused.
    drop(listener);
    drop(ws);
    let lost = given_up(&client).await;
    assert!(matches!(lost, ClientError::SessionExpired(_)), "{lost:?}");
    assert!(lost.to_string().contains("grace"), "{lost}");
}

#[tokio::test]
async fn a_client_without_grace_does_not_reconnect() {
    let (url, listener) = fake_server().await;
    let (client, mut ws, hello) = connected(&url, &listener, None, None).await;
    assert!(hello.get("grace_ms").is_none(), "no grace asked: {hello}");
    assert_eq!(client.grace(), None);
    let client = std::sync::Arc::new(client);
    let in_flight = {
        let client = client.clone();
        tokio::spawn(async move { client.ping().await })
    };
    next_request(&mut ws).await;
    drop(ws);
    let failed = tokio::time::timeout(BOUND, in_flight)
        .await
        .expect("in time")
        .expect("task");
    assert_eq!(failed.expect_err("lost").code(), "connection_lost");
    let lost = given_up(&client).await;
    assert_eq!(lost.code(), "connection_lost");
    // A later call fails at once: nothing waits for a reconnect.
    assert!(
        futures_util::FutureExt::now_or_never(listener.accept()).is_none(),
        "the client connected again"
    );
}

#[tokio::test]
async fn a_session_taken_over_by_another_connection_is_not_taken_back() {
    let (url, listener) = fake_server().await;
    let (client, mut ws, _) =
        connected(&url, &listener, Some(Duration::from_secs(10)), Some(10_000)).await;
    let client = std::sync::Arc::new(client);
    let in_flight = {
        let client = client.clone();
        tokio::spawn(async move { client.lock(&["k"], Exclusive, None).await })
    };
    let lock = next_request(&mut ws).await;
    refuse(&mut ws, &lock, "taken_over").await;
    ws.close(Some(CloseFrame {
        code: CloseCode::Policy,
        reason: "session resumed on another connection".into(),
    }))
    .await
    .expect("close");
    let failed = tokio::time::timeout(BOUND, in_flight)
        .await
        .expect("in time")
        .expect("task");
    assert_eq!(failed.expect_err("taken over").code(), "taken_over");
    let lost = given_up(&client).await;
    assert_eq!(lost.code(), "taken_over", "{lost}");
}

#[tokio::test]
async fn a_session_the_server_ends_with_a_close_frame_is_not_resumed() {
    // Only the idle timeout's close (1001) leaves a session suspended; a kill, a takeover or a
    // connection closed for cause (here 1008) releases it, so resuming it would be pointless.
    let (url, listener) = fake_server().await;
    let (client, mut ws, _) =
        connected(&url, &listener, Some(Duration::from_secs(10)), Some(10_000)).await;
    ws.close(Some(CloseFrame {
        code: CloseCode::Policy,
        reason: "too many pipelined requests".into(),
    }))
    .await
    .expect("close");
    let lost = given_up(&client).await;
    assert_eq!(lost.code(), "connection_lost", "{lost}");
    assert!(lost.to_string().contains("1008"), "{lost}");
    assert!(
        futures_util::FutureExt::now_or_never(listener.accept()).is_none(),
        "the client connected again"
    );
}

#[tokio::test]
async fn a_resumable_client_keeps_its_session_and_locks_through_cut_connections_to_the_real_server()
{
    let server = wire::start(wire::settings()).await;
    let proxy = proxy::Proxy::start(server.addr).await;
    let client = resumable_client(&proxy.url(), Duration::from_secs(10)).await;
    assert_eq!(client.grace(), Some(Duration::from_secs(10)));
    let session = client.session_id().to_owned();
    let grant = client.lock(&["k"], Exclusive, None).await.expect("lock");
    let rival = std::sync::Arc::new(wire::connect_client(&server.url()).await);
    let waiting = {
        let rival = rival.clone();
        tokio::spawn(async move { rival.lock(&["k"], Exclusive, None).await })
    };
    server.wait_queued(rival.session_id(), "k").await;
    for blip in 1..=2 {
        assert_eq!(proxy.cut(), 1, "the client's one connection");
        wire::wait_until("the client resumed", || client.resumes() == blip).await;
        assert!(!client.is_lost());
        // The same session still holds k, and the rival still waits for it.
        let snapshot = server.snapshot();
        assert_eq!(
            wire::holders(&snapshot, "k"),
            [(session.clone(), Exclusive)]
        );
        assert!(wire::queued(&snapshot, rival.session_id(), "k"));
    }
    client
        .ping()
        .await
        .expect("served on the resumed connection");
    client
        .unlock(&["k"])
        .await
        .expect("the resumed session unlocks k");
    let granted = tokio::time::timeout(BOUND, waiting)
        .await
        .expect("in time")
        .expect("task")
        .expect("the rival gets k");
    assert!(granted.tokens["k"] > grant.tokens["k"]);
    server.stop().await;
}

#[tokio::test]
async fn a_resumable_client_cut_off_from_the_real_server_past_its_grace_expires_and_its_locks_go() {
    let server = wire::start(wire::settings()).await;
    let proxy = proxy::Proxy::start(server.addr).await;
    let client = resumable_client(&proxy.url(), Duration::from_millis(300)).await;
    client.lock(&["k"], Exclusive, None).await.expect("lock");
    proxy.refuse(true);
    assert_eq!(proxy.cut(), 1);
    let lost = given_up(&client).await;
    assert_eq!(lost.code(), "session_expired", "{lost}");
    let rival = wire::connect_client(&server.url()).await;
    tokio::time::timeout(BOUND, rival.lock(&["k"], Exclusive, None))
        .await
        .expect("in time")
        .expect("the server released k at the end of the grace");
    server.stop().await;
}

/// Waits for `client` to give its session up and checks that it stays given up: a later call
/// fails at once with the same code, and the client never resumed. Returns what `lost()` gave.
async fn given_up(client: &Client) -> ClientError {
    let lost = tokio::time::timeout(BOUND, client.lost())
        .await
        .expect("lost resolves in time");
    let later = tokio::time::timeout(BOUND, client.ping())
        .await
        .expect("in time")
        .expect_err("no more calls");
    assert_eq!(later.code(), lost.code());
    assert_eq!(client.resumes(), 0);
    lost
}

#[tokio::test]
async fn a_resumable_client_gives_its_session_up_at_once_when_the_server_shuts_down() {
    // A shutdown releases every session; its close (1001, "server shutting down") must not be
    // taken for the idle timeout's, after which the session would still be resumable.
    let server = wire::start(wire::settings()).await;
    let client = resumable_client(&server.url(), Duration::from_secs(60)).await;
    client.lock(&["k"], Exclusive, None).await.expect("lock");
    server.stop().await;
    // Long before the 60 s grace (BOUND is 10 s): the client does not keep trying.
    let lost = given_up(&client).await;
    assert_eq!(lost.code(), "connection_lost", "{lost}");
    assert!(lost.to_string().contains("shutting down"), "{lost}");
}

/// A client of the library at `url` that asks for `grace`, connected within [`BOUND`].
async fn resumable_client(url: &str, grace: Duration) -> Client {
    tokio::time::timeout(BOUND, Client::builder(url).grace(grace).connect())
        .await
        .expect("in time")
        .expect("connect")
}
