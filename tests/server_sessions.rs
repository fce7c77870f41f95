//! Over the wire: a connection is a session. When it ends — cleanly, abruptly, by the idle
//! timeout, or by the server's shutdown — its locks are released and its waiting request is
//! withdrawn at once. The connection cap refuses extra clients with `server_busy` and frees a slot
//! when a client leaves.

mod wire;

use std::time::Duration;

use locksmith::lock::LockMode;
use locksmith::server::ServerSettings;
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use wire::{holders, settings, start, Client, BOUND};

/// Far below the waiter's own timeout (a minute): the grant must come from the disconnect.
const AT_ONCE: Duration = Duration::from_secs(5);

#[tokio::test]
async fn a_client_that_closes_while_holding_hands_the_lock_to_the_waiter_at_once() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    a.lock(&["k"], "write").await;
    b.send(json!({"command": "lock", "keys": ["k"], "timeout_ms": 60_000}))
        .await;
    server.wait_queued(&b.session, "k").await;

    a.close().await;
    let granted = b.recv_within(AT_ONCE).await;
    assert_eq!(granted["success"], json!(true), "{granted}");
    assert_eq!(
        holders(&server.snapshot(), "k"),
        vec![(b.session.clone(), LockMode::Exclusive)]
    );
    server.stop().await;
}

#[tokio::test]
async fn a_client_whose_socket_is_dropped_while_holding_hands_the_lock_to_the_waiter_at_once() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    a.lock(&["k1", "k2"], "write").await;
    b.send(json!({"command": "lock", "keys": ["k1", "k2"], "mode": "read", "timeout_ms": 60_000}))
        .await;
    server.wait_queued(&b.session, "k1").await;

    // No close frame: the TCP connection just goes away (like a killed process).
    drop(a);
    let granted = b.recv_within(AT_ONCE).await;
    assert_eq!(granted["success"], json!(true), "{granted}");
    let snapshot = server.snapshot();
    assert_eq!(
        holders(&snapshot, "k2"),
        vec![(b.session.clone(), LockMode::Shared)]
    );
    server.stop().await;
}

#[tokio::test]
async fn a_client_closing_cleanly_gets_its_close_frame_echoed_and_its_locks_released() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    a.lock(&["k"], "write").await;
    let session = a.session.clone();
    a.ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .await
    .expect("send a close frame");
    // The closing handshake completes: the server answers with a close frame of its own.
    let echoed = tokio::time::timeout(BOUND, futures_util::StreamExt::next(&mut a.ws))
        .await
        .expect("an answer in time");
    assert!(
        matches!(echoed, Some(Ok(Message::Close(_)))),
        "expected the close frame echoed, got {echoed:?}"
    );
    server
        .wait_for("the closed session's lock is released", |s| {
            !wire::mentions(s, &session)
        })
        .await;
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_disconnects_while_waiting_is_withdrawn_and_never_gets_the_lock() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    a.lock(&["k"], "write").await;
    b.send(json!({"command": "lock", "keys": ["k"], "timeout_ms": 60_000}))
        .await;
    server.wait_queued(&b.session, "k").await;
    let gone = b.session.clone();

    drop(b);
    server
        .wait_for("the withdrawn waiter leaves the queue", |s| {
            !wire::mentions(s, &gone)
        })
        .await;
    wire::wait_until("the waiter's session is closed", || {
        server.locks().session_count() == 1
    })
    .await;

    a.unlock(&["k"]).await;
    let snapshot = server.snapshot();
    assert!(
        snapshot.is_empty(),
        "nobody holds k after its holder let go: {snapshot:?}"
    );
    // A later client gets it at once.
    let mut c = server.connect().await;
    c.ok(json!({"command": "lock", "keys": ["k"], "timeout_ms": 0}))
        .await;
    assert_eq!(
        holders(&server.snapshot(), "k"),
        vec![(c.session.clone(), LockMode::Exclusive)]
    );
    server.stop().await;
}

#[tokio::test]
async fn a_waiter_that_disconnects_does_not_hold_up_the_waiters_behind_it() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    let mut c = server.connect().await;
    a.lock(&["k"], "write").await;
    b.send(json!({"command": "lock", "keys": ["k"]})).await;
    server.wait_queued(&b.session, "k").await;
    c.send(json!({"command": "lock", "keys": ["k"], "id": "c"}))
        .await;
    server.wait_queued(&c.session, "k").await;

    b.close().await;
    a.unlock(&["k"]).await;
    let granted = c.recv_within(AT_ONCE).await;
    assert_eq!(granted["id"], json!("c"));
    assert_eq!(granted["success"], json!(true), "{granted}");
    server.stop().await;
}

#[tokio::test]
async fn an_unresponsive_client_is_closed_by_the_idle_timeout_and_its_locks_released() {
    let server = start(ServerSettings {
        idle_timeout: Some(Duration::from_secs(1)),
        ..settings()
    })
    .await;
    // `silent` takes a lock and then never reads again, so it never answers the server's pings:
    // from the server's side it looks like a half-open connection.
    let mut silent = server.connect().await;
    silent.lock(&["k"], "write").await;
    let silent_session = silent.session.clone();

    // `live` keeps reading (tungstenite answers pings while reading) and must stay connected.
    let mut live = server.connect().await;
    let live_session = live.session.clone();
    let reader = tokio::spawn(async move {
        // The server pings after half the idle timeout of silence; three pings answered span
        // more than a whole idle timeout.
        let mut pings = 0;
        while pings < 3 {
            let frame = tokio::time::timeout(BOUND, futures_util::StreamExt::next(&mut live.ws))
                .await
                .expect("the server pings a silent client");
            match frame {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Ping(_))) => pings += 1,
                other => panic!("a reading client must not be closed: {other:?}"),
            }
        }
        live
    });

    server
        .wait_for("the silent client's lock is released", |s| {
            !wire::mentions(s, &silent_session)
        })
        .await;
    let mut live = reader.await.expect("reader task");
    // The live client is still served, and it is the only session left.
    live.ping().await;
    assert_eq!(live.learn_session().await, live_session);
    let mut other = server.connect().await;
    other
        .ok(json!({"command": "lock", "keys": ["k"], "timeout_ms": 0}))
        .await;
    wire::wait_until("the silent session is closed", || {
        server.locks().session_count() == 2
    })
    .await;
    drop(silent);
    server.stop().await;
}

/// Reads `client` in the background (answering the server's pings, as any reading client
/// does) until `stop` fires; returns the client and how many pings it saw. Any other frame is a
/// failure: the client expects no answer and no close meanwhile.
fn keep_reading(
    mut client: Client,
    mut stop: tokio::sync::oneshot::Receiver<()>,
    pings_seen: tokio::sync::mpsc::UnboundedSender<()>,
) -> tokio::task::JoinHandle<Client> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut stop => return client,
                frame = futures_util::StreamExt::next(&mut client.ws) => match frame {
                    Some(Ok(tokio_tungstenite::tungstenite::Message::Ping(_))) => {
                        let _ = pings_seen.send(());
                    }
                    other => panic!("expected only pings while waiting, got {other:?}"),
                },
            }
        }
    })
}

#[tokio::test]
async fn a_client_waiting_longer_than_the_idle_timeout_stays_queued_while_it_answers_pings() {
    let server = start(ServerSettings {
        idle_timeout: Some(Duration::from_secs(1)),
        ..settings()
    })
    .await;
    let mut holder = server.connect().await;
    holder.lock(&["k"], "write").await;
    let mut waiter = server.connect().await;
    waiter
        .send(json!({"command": "lock", "keys": ["k"], "id": "w"}))
        .await;
    server.wait_queued(&waiter.session, "k").await;
    let waiter_session = waiter.session.clone();

    let (stop_holder, holder_stop) = tokio::sync::oneshot::channel();
    let (stop_waiter, waiter_stop) = tokio::sync::oneshot::channel();
    let (holder_pings, _holder_pinged) = tokio::sync::mpsc::unbounded_channel();
    let (waiter_pings, mut waiter_pinged) = tokio::sync::mpsc::unbounded_channel();
    let holder_task = keep_reading(holder, holder_stop, holder_pings);
    let waiter_task = keep_reading(waiter, waiter_stop, waiter_pings);
    // Three pings to the waiter span more than a whole idle timeout of waiting.
    for _ in 0..3 {
        tokio::time::timeout(BOUND, waiter_pinged.recv())
            .await
            .expect("the server pings a waiting client")
            .expect("reader alive");
    }
    assert!(
        wire::queued(&server.snapshot(), &waiter_session, "k"),
        "still queued after more than the idle timeout"
    );
    stop_holder.send(()).expect("holder reader");
    stop_waiter.send(()).expect("waiter reader");
    let mut holder = holder_task.await.expect("holder reader task");
    let mut waiter = waiter_task.await.expect("waiter reader task");
    holder.unlock(&["k"]).await;
    let granted = waiter.recv().await;
    assert_eq!(granted["id"], json!("w"));
    assert_eq!(granted["success"], json!(true), "{granted}");
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_with_answers_pending_is_closed_by_the_idle_timeout() {
    let server = start(ServerSettings {
        idle_timeout: Some(Duration::from_secs(1)),
        ..settings()
    })
    .await;
    let mut a = server.connect().await;
    a.lock(&["held"], "write").await;
    a.ok(json!({"command": "write", "keys": ["big"], "value": "x".repeat(512 * 1024)}))
        .await;
    // Far more answer bytes (about 100 MB) than the socket buffers hold; the client reads none.
    for i in 0..200 {
        a.send(json!({"command": "read", "keys": ["big"], "id": i}))
            .await;
    }
    let session = a.session.clone();
    server
        .wait_for("the stalled client's lock is released", |s| {
            !wire::mentions(s, &session)
        })
        .await;
    let mut b = server.connect().await;
    b.ok(json!({"command": "lock", "keys": ["held"], "timeout_ms": 0}))
        .await;
    drop(a);
    server.stop().await;
}

#[tokio::test]
async fn over_max_connections_a_client_gets_server_busy_then_close_1013_and_a_slot_frees_up() {
    let server = start(ServerSettings {
        max_connections: 2,
        ..settings()
    })
    .await;
    let mut a = server.connect().await;
    let mut b = server.connect().await;

    let mut refused = Client::connect(&server.url()).await;
    let answer = refused.recv().await;
    assert_eq!(answer["success"], json!(false), "{answer}");
    assert_eq!(answer["code"], json!("server_busy"), "{answer}");
    assert_eq!(refused.close_code().await, Some(1013));
    a.ping().await;
    b.ping().await;

    a.close().await;
    // The slot is freed when the server has finished with the closed connection; try until then.
    let deadline = tokio::time::Instant::now() + BOUND;
    let mut admitted = loop {
        let mut client = Client::connect(&server.url()).await;
        let answer = client.request(json!({"command": "ping"})).await;
        if answer["success"] == json!(true) {
            break client;
        }
        assert_eq!(answer["code"], json!("server_busy"), "{answer}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "no slot freed after a client left"
        );
        tokio::task::yield_now().await;
    };
    admitted.learn_session().await;
    admitted.lock(&["k"], "write").await;
    b.ping().await;
    server.stop().await;
}

#[tokio::test]
async fn shutdown_answers_waiting_and_queued_requests_shutting_down_and_closes_with_1001() {
    let server = start(settings()).await;
    let mut holder = server.connect().await;
    let mut waiter = server.connect().await;
    let mut idle = server.connect().await;
    holder.lock(&["k"], "write").await;
    waiter
        .send(json!({"command": "lock", "keys": ["k"], "id": "waiting"}))
        .await;
    waiter
        .send(json!({"command": "ping", "id": "queued"}))
        .await;
    server.wait_queued(&waiter.session, "k").await;
    let url = server.url();
    server.stop().await;

    // The waiting request is answered `shutting_down`; so is the ping queued behind it if the
    // server had read it off the socket (it may not have: nothing tells the client when), and
    // then the socket is closed with 1001.
    let frames = frames_until_close(&mut waiter).await;
    let (close, answers) = frames.split_last().expect("at least the close frame");
    assert_eq!(close, &Frame::Close(Some(1001)), "{frames:?}");
    assert!(
        (1..=2).contains(&answers.len()),
        "the waiting request is answered: {frames:?}"
    );
    for (answer, id) in answers.iter().zip(["waiting", "queued"]) {
        let Frame::Answer(answer) = answer else {
            panic!("{frames:?}")
        };
        assert_eq!(answer["code"], json!("shutting_down"), "{answer}");
        assert_eq!(answer["id"], json!(id), "{answer}");
    }
    assert_eq!(holder.close_code().await, Some(1001));
    assert_eq!(idle.close_code().await, Some(1001));
    // Nothing listens any more.
    let refused = tokio::time::timeout(BOUND, tokio_tungstenite::connect_async(url.as_str()))
        .await
        .expect("an answer in time");
    assert!(refused.is_err(), "a stopped server accepted a connection");
}

#[derive(Debug, PartialEq)]
enum Frame {
    Answer(serde_json::Value),
    Close(Option<u16>),
}

/// Every answer up to and including the close frame (pings and pongs skipped), within [`BOUND`].
async fn frames_until_close(client: &mut Client) -> Vec<Frame> {
    use tokio_tungstenite::tungstenite::Message;
    let mut frames = Vec::new();
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        let next = tokio::time::timeout_at(deadline, futures_util::StreamExt::next(&mut client.ws))
            .await
            .unwrap_or_else(|_| panic!("no close frame in time after {frames:?}"));
        match next {
            Some(Ok(Message::Text(text))) => frames.push(Frame::Answer(
                serde_json::from_str(text.as_str()).expect("JSON answer"),
            )),
            Some(Ok(Message::Close(frame))) => {
                frames.push(Frame::Close(frame.map(|f| u16::from(f.code))));
                return frames;
            }
            Some(Ok(_)) => {}
            other => {
                panic!("the connection ended without a close frame: {other:?} after {frames:?}")
            }
        }
    }
}

#[tokio::test]
async fn shutdown_is_not_held_up_by_a_client_that_sent_half_an_http_request() {
    use tokio::io::AsyncWriteExt;
    let server = start(settings()).await;
    // Accepted before the WebSocket client below (the listener accepts in order), then stalls.
    let mut stalled = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    stalled
        .write_all(b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n")
        .await
        .expect("write half a request");
    let mut client = server.connect().await;
    client.lock(&["k"], "write").await;

    // `stop` fails the test if the shutdown takes longer than its bound.
    server.stop().await;
    assert_eq!(client.close_code().await, Some(1001));
    drop(stalled);
}
