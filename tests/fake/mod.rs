//! A hand-written Locksmith server for tests that must control the wire exactly (issue 11's
//! resumable sessions): a loopback listener the test accepts on, reads requests from and answers
//! by hand, step by step, with every wait bounded. It plays the protocol as documented, not the
//! real server's code, so a client can be checked apart from the server's support.
#![allow(dead_code)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// How long any single expected event may take before the test fails.
pub const BOUND: Duration = Duration::from_secs(10);

/// The resume secret the fake server hands out.
pub const SECRET: &str = "0123456789abcdef0123456789abcdef";

/// The fake server's side of one connection.
pub type Ws = WebSocketStream<TcpStream>;

/// A listener on a loopback port for the fake server, and its WebSocket URL.
pub async fn fake_server() -> (String, TcpListener) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    (format!("ws://{addr}/ws"), listener)
}

/// Accepts the client's next connection.
pub async fn accept(listener: &TcpListener) -> Ws {
    let (stream, _) = tokio::time::timeout(BOUND, listener.accept())
        .await
        .expect("the client connects in time")
        .expect("accept");
    tokio_tungstenite::accept_async(stream)
        .await
        .expect("handshake")
}

/// The client's next request.
pub async fn next_request(ws: &mut Ws) -> Value {
    let reading = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    return serde_json::from_str(text.as_str()).expect("JSON")
                }
                Some(Ok(_)) => {}
                other => panic!("the client went away: {other:?}"),
            }
        }
    };
    tokio::time::timeout(BOUND, reading)
        .await
        .expect("a request in time")
}

/// Answers `request` successfully with `fields`.
pub async fn answer(ws: &mut Ws, request: &Value, mut fields: Value) {
    fields["id"] = request["id"].clone();
    fields["success"] = json!(true);
    ws.send(Message::text(fields.to_string()))
        .await
        .expect("answer");
}

/// Answers `request` with the error `code`.
pub async fn refuse(ws: &mut Ws, request: &Value, code: &str) {
    let refusal = json!({"id": request["id"], "success": false, "code": code, "error": code});
    ws.send(Message::text(refusal.to_string()))
        .await
        .expect("answer");
}

/// The fields of a `hello` answer for session `s-1`, resumable with [`SECRET`] for
/// `granted_ms`.
pub fn resumable_hello(granted_ms: u64) -> Value {
    json!({"session": "s-1", "version": "0.1.0", "grace_ms": granted_ms, "resume_secret": SECRET})
}

/// The client's first request on its new connection, checked to be a `resume` of `s-1` with
/// [`SECRET`].
pub async fn resume_request(ws: &mut Ws) -> Value {
    let resume = next_request(ws).await;
    assert_eq!(resume["command"], "resume", "{resume}");
    assert_eq!(resume["session"], "s-1");
    assert_eq!(resume["secret"], SECRET);
    resume
}

pub async fn answer_resume(ws: &mut Ws, resume: &Value) {
    let fields = json!({"session": "s-1", "version": "0.1.0", "grace_ms": 5000,
                        "resume_secret": SECRET, "tokens": {"k": 1}});
    answer(ws, resume, fields).await;
}

/// Waits for the client to close the connection with a close frame (an explicit goodbye),
/// answers it and drops the connection, as a server does.
pub async fn closed_by_client(mut ws: Ws) {
    let reading = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) => {
                    // Sends the reply tungstenite queued, completing the closing handshake.
                    let _ = ws.close(None).await;
                    return;
                }
                None => return,
                Some(Ok(Message::Text(text))) => panic!("a request instead of a close: {text}"),
                Some(Ok(_)) => {}
                Some(Err(error)) => panic!("the connection broke instead of closing: {error}"),
            }
        }
    };
    tokio::time::timeout(BOUND, reading)
        .await
        .expect("closed in time");
}
