//! Over the wire: bad input gets a clear error (or a clean refusal), never a panic, and the server
//! keeps serving — the same connection where the protocol says it stays open, and always a fresh
//! client.

mod wire;

use futures_util::{SinkExt, StreamExt};
use locksmith::server::ServerSettings;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;
use wire::{settings, start, Client, Server};

/// The server still serves a fresh client, and nothing has panicked.
async fn still_serving(server: &Server) {
    let mut fresh = server.connect().await;
    fresh.ping().await;
    fresh
        .ok(json!({"command": "write", "keys": ["probe"], "value": true}))
        .await;
    wire::assert_no_server_panics();
}

/// Sends `text` and expects `code`, with the connection still usable afterwards.
async fn rejected(client: &mut Client, text: &str, code: &str) -> Value {
    client.send_text(text).await;
    let answer = client.recv().await;
    assert_eq!(answer["success"], json!(false), "{text} -> {answer}");
    assert_eq!(answer["code"], json!(code), "{text} -> {answer}");
    assert!(
        answer["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{text} -> {answer}"
    );
    client.ping().await;
    answer
}

#[tokio::test]
async fn malformed_json_is_a_bad_request_and_the_connection_stays_open() {
    let server = start(settings()).await;
    let mut client = server.connect().await;
    for text in [
        "",
        " ",
        "{",
        "{\"command\":",
        "{\"command\":\"ping\"",
        "{\"command\":\"ping\"}}",
        "{'command':'ping'}",
        "command=ping",
        "\u{0}\u{1}\u{2}",
        "[1,2,3]",
        "\"ping\"",
        "42",
        "null",
        "true",
        "{\"command\":\"ping\",\"command\":\"lock\"",
    ] {
        rejected(&mut client, text, "bad_request").await;
    }
    // Nesting deep enough to overflow a naive recursive parser.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    rejected(&mut client, &deep, "bad_request").await;
    let deep_id = format!(
        r#"{{"command":"ping","id":{}{}}}"#,
        "{\"a\":".repeat(50_000),
        "}".repeat(50_000)
    );
    rejected(&mut client, &deep_id, "bad_request").await;
    assert!(server.snapshot().is_empty());
    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn wrong_types_are_bad_requests_that_echo_the_id() {
    let server = start(settings()).await;
    let mut client = server.connect().await;
    for request in [
        json!({"command": 5, "id": 1}),
        json!({"command": null, "id": 1}),
        json!({"command": ["lock"], "id": 1}),
        json!({"command": "lock", "keys": "k", "id": 1}),
        json!({"command": "lock", "keys": {"k": 1}, "id": 1}),
        json!({"command": "lock", "keys": [1, 2], "id": 1}),
        json!({"command": "lock", "keys": [["k"]], "id": 1}),
        json!({"command": "lock", "keys": ["k"], "mode": "exclusive", "id": 1}),
        json!({"command": "lock", "keys": ["k"], "mode": 1, "id": 1}),
        json!({"command": "read", "keys": ["k"], "hold_lock": "yes", "id": 1}),
        json!({"command": "read", "keys": ["k"], "hold_lock": 1, "id": 1}),
        json!({"command": "lock", "keys": ["k"], "timeout_ms": -1, "id": 1}),
        json!({"command": "lock", "keys": ["k"], "timeout_ms": 1.5, "id": 1}),
        json!({"command": "lock", "keys": ["k"], "timeout_ms": "100", "id": 1}),
        json!({"command": "write", "keys": ["k"], "values": "v", "id": 1}),
        json!({"command": "write", "keys": ["a", "b"], "value": "v", "id": 1}),
    ] {
        let answer = rejected(&mut client, &request.to_string(), "bad_request").await;
        assert_eq!(answer["id"], json!(1), "{request} -> {answer}");
    }
    assert!(server.snapshot().is_empty(), "{:?}", server.snapshot());
    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn missing_fields_are_bad_requests() {
    let server = start(settings()).await;
    let mut client = server.connect().await;
    for request in [
        json!({}),
        json!({"keys": ["k"]}),
        json!({"command": "lock"}),
        json!({"command": "unlock"}),
        json!({"command": "read"}),
        json!({"command": "write", "keys": ["k"]}),
        json!({"command": "write", "values": [1]}),
    ] {
        rejected(&mut client, &request.to_string(), "bad_request").await;
    }
    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn unknown_commands_answer_unknown_command() {
    let server = start(settings()).await;
    let mut client = server.connect().await;
    for command in ["dance", "LOCK", "Ping", "", "unlock_all", "lock "] {
        let request = json!({"command": command, "keys": ["k"], "id": command});
        let answer = rejected(&mut client, &request.to_string(), "unknown_command").await;
        assert_eq!(answer["id"], json!(command));
    }
    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn a_binary_frame_is_a_bad_request_and_the_connection_stays_open() {
    let server = start(settings()).await;
    let mut client = server.connect().await;
    for payload in [
        br#"{"command":"ping"}"#.to_vec(),
        vec![0xff, 0xfe, 0x00],
        Vec::new(),
    ] {
        client
            .ws
            .send(Message::binary(payload))
            .await
            .expect("send binary");
        let answer = client.recv().await;
        assert_eq!(answer["code"], json!("bad_request"), "{answer}");
        client.ping().await;
    }
    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn an_oversized_frame_is_answered_too_large_then_closed_with_1009() {
    let server = start(ServerSettings {
        max_message_bytes: 1024,
        ..settings()
    })
    .await;
    let mut holder = server.connect().await;
    holder.lock(&["held"], "write").await;
    let holder_session = holder.session.clone();

    // Just under the limit is fine.
    let padding = "x".repeat(900);
    holder.ok(json!({"command": "ping", "pad": padding})).await;

    let big = json!({"command": "write", "keys": ["k"], "value": "v".repeat(4096)});
    holder.send(big).await;
    let answer = holder.recv().await;
    assert_eq!(answer["code"], json!("too_large"), "{answer}");
    assert_eq!(holder.close_code().await, Some(1009));
    // The closed connection's locks are released.
    server
        .wait_for("the oversized sender's locks are released", |s| {
            !wire::mentions(s, &holder_session)
        })
        .await;

    // Also as a binary frame.
    let mut binary = server.connect().await;
    binary
        .ws
        .send(Message::binary(vec![0u8; 4096]))
        .await
        .expect("send");
    assert_eq!(binary.recv().await["code"], json!("too_large"));
    assert_eq!(binary.close_code().await, Some(1009));

    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn a_message_over_the_limit_in_small_fragments_is_answered_too_large_then_closed_with_1009() {
    let server = start(ServerSettings {
        max_message_bytes: 1024,
        ..settings()
    })
    .await;
    let mut client = server.connect().await;
    // Five fragments of 400 bytes: each frame is under the limit, the message is not.
    for i in 0..5 {
        let opcode = if i == 0 {
            OpCode::Data(Data::Text)
        } else {
            OpCode::Data(Data::Continue)
        };
        let frame = Frame::message(vec![b' '; 400], opcode, i == 4);
        if client.ws.send(Message::Frame(frame)).await.is_err() {
            break; // the server may close before the last fragment
        }
    }
    assert_eq!(client.recv().await["code"], json!("too_large"));
    assert_eq!(client.close_code().await, Some(1009));
    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn a_text_frame_that_is_not_utf8_is_answered_bad_request_then_closed_with_1007() {
    let server = start(settings()).await;
    let mut client = server.connect().await;
    let session = client.session.clone();
    client.lock(&["k"], "write").await;
    let frame = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    client
        .ws
        .send(Message::Frame(frame))
        .await
        .expect("send a raw frame");
    let answer = client.recv().await;
    assert_eq!(answer["code"], json!("bad_request"), "{answer}");
    // RFC 6455 (8.1): invalid UTF-8 in a text frame fails the connection, close code 1007.
    assert_eq!(client.close_code().await, Some(1007));
    server
        .wait_for("the closed connection's lock is released", |s| {
            !wire::mentions(s, &session)
        })
        .await;
    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn bytes_that_break_the_websocket_framing_are_closed_with_1002() {
    let server = start(settings()).await;
    for bytes in [
        // An unmasked text frame (a client must mask).
        vec![0x81, 0x02, b'h', b'i'],
        // Reserved bits set.
        vec![0xf1, 0x80, 0, 0, 0, 0],
        // A reserved opcode.
        vec![0x83, 0x80, 0, 0, 0, 0],
        // A fragmented control frame (ping without FIN).
        vec![0x09, 0x80, 0, 0, 0, 0],
    ] {
        let mut client = server.connect().await;
        let session = client.session.clone();
        client.lock(&["k"], "write").await;
        let stream = match client.ws.get_mut() {
            tokio_tungstenite::MaybeTlsStream::Plain(stream) => stream,
            _ => unreachable!("plain TCP"),
        };
        stream.write_all(&bytes).await.expect("write raw bytes");
        assert_eq!(client.close_code().await, Some(1002), "{bytes:?}");
        server
            .wait_for("the closed connection's lock is released", |s| {
                !wire::mentions(s, &session)
            })
            .await;
    }
    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn empty_duplicate_and_overlong_keys_are_bad_requests() {
    let server = start(settings()).await;
    let mut client = server.connect().await;
    let overlong = "k".repeat(locksmith::protocol::MAX_KEY_BYTES + 1);
    for request in [
        json!({"command": "lock", "keys": []}),
        json!({"command": "lock", "keys": [""]}),
        json!({"command": "lock", "keys": ["a", ""]}),
        json!({"command": "lock", "keys": ["a", "b", "a"]}),
        json!({"command": "read", "keys": ["a", "a"]}),
        json!({"command": "write", "keys": ["a", "a"], "values": [1, 2]}),
        json!({"command": "unlock", "keys": []}),
        json!({"command": "lock", "keys": [overlong]}),
    ] {
        rejected(&mut client, &request.to_string(), "bad_request").await;
    }
    // The longest allowed key is fine.
    let longest = "k".repeat(locksmith::protocol::MAX_KEY_BYTES);
    client
        .ok(json!({"command": "lock", "keys": [longest]}))
        .await;
    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn too_many_keys_answers_too_many_keys() {
    let server = start(ServerSettings {
        max_keys_per_request: 8,
        ..settings()
    })
    .await;
    let mut holder = server.connect().await;
    holder.lock(&["k0"], "write").await;
    let mut client = server.connect().await;
    let nine: Vec<String> = (0..9).map(|i| format!("k{i}")).collect();
    let eight: Vec<String> = (1..9).map(|i| format!("k{i}")).collect();
    for request in [
        json!({"command": "lock", "keys": nine, "id": "l"}),
        json!({"command": "read", "keys": nine, "id": "r"}),
        json!({"command": "unlock", "keys": nine, "id": "u"}),
        json!({"command": "write", "keys": nine, "values": vec![0; 9], "id": "w"}),
    ] {
        let answer = rejected(&mut client, &request.to_string(), "too_many_keys").await;
        assert_eq!(answer["id"], request["id"]);
    }
    assert!(
        !wire::mentions(&server.snapshot(), &client.session),
        "no lock was taken"
    );
    client.ok(json!({"command": "lock", "keys": eight})).await;
    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn garbage_on_the_raw_socket_is_refused_cleanly() {
    let server = start(settings()).await;
    // Not HTTP at all.
    let mut raw = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    raw.write_all(b"\x16\x03\x01\x00\xa5garbage\r\n\r\n")
        .await
        .expect("write");
    drop(raw);
    // A half-sent handshake.
    let mut raw = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    raw.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        .await
        .expect("write");
    drop(raw);
    // A WebSocket connection whose client then writes bytes that are not valid frames.
    let mut client = server.connect().await;
    let session = client.session.clone();
    client.lock(&["k"], "write").await;
    let stream = match client.ws.get_mut() {
        tokio_tungstenite::MaybeTlsStream::Plain(stream) => stream,
        _ => unreachable!("plain TCP"),
    };
    stream.write_all(&[0xff; 32]).await.expect("write");
    server
        .wait_for("the broken connection's locks are released", |s| {
            !wire::mentions(s, &session)
        })
        .await;
    // Plain HTTP on the WebSocket path without an upgrade is an HTTP error, not a crash.
    let response = wire::http_get(server.addr, "/ws").await;
    assert!(response.starts_with("HTTP/1.1 4"), "{response}");
    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn thousands_of_connections_opening_and_closing_leave_the_server_serving() {
    let server = start(settings()).await;
    let url = server.url();
    let mut keeper = server.connect().await;
    keeper.lock(&["kept"], "write").await;
    for batch in 0..20 {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..100 {
            let url = url.clone();
            tasks.spawn(async move {
                let mut client = Client::connect(&url).await;
                match i % 4 {
                    // Closes cleanly after a request.
                    0 => {
                        client.ping().await;
                        client.close().await;
                    }
                    // Vanishes after a request.
                    1 => {
                        client
                            .ok(json!({"command": "lock", "keys": [format!("c{i}")]}))
                            .await;
                        drop(client);
                    }
                    // Vanishes with a request in flight.
                    2 => {
                        client
                            .send(json!({"command": "lock", "keys": ["kept"]}))
                            .await;
                        drop(client);
                    }
                    // Vanishes without a word.
                    _ => drop(client),
                }
            });
        }
        while let Some(result) = tasks.join_next().await {
            result.unwrap_or_else(|e| panic!("batch {batch}: {e}"));
        }
    }
    // Every one of them is gone; only the keeper remains, still holding its lock.
    wire::wait_until("only the keeper's session is left", || {
        server.locks().session_count() == 1
    })
    .await;
    server
        .wait_for("only the keeper's lock is left", |s| {
            s.keys.len() == 1 && s.waits_for.is_empty()
        })
        .await;
    keeper.ping().await;
    keeper.unlock(&["kept"]).await;
    still_serving(&server).await;
    drop(keeper);
    server.wait_idle().await;
    // The stream of the keeper is gone too; nothing else to read.
    server.stop().await;
}

#[tokio::test]
async fn more_pipelined_requests_than_the_server_queues_close_the_connection_with_1008() {
    let server = start(settings()).await;
    let mut holder = server.connect().await;
    holder.lock(&["k"], "write").await;
    let mut flood = server.connect().await;
    let session = flood.session.clone();
    // The first request waits, so everything behind it stays queued on the server.
    flood
        .send(json!({"command": "lock", "keys": ["k"], "id": "head"}))
        .await;
    server.wait_queued(&session, "k").await;
    let limit = locksmith::connection::MAX_PIPELINED;
    for i in 0..limit + 100 {
        let frame = Message::text(json!({"command": "ping", "id": i}).to_string());
        if flood.ws.feed(frame).await.is_err() {
            break;
        }
    }
    let _ = flood.ws.flush().await;
    assert_eq!(flood.close_code().await, Some(1008));
    // Its waiting request was withdrawn: the holder's unlock leaves k free.
    server
        .wait_for("the flooding session is gone", |s| {
            !wire::mentions(s, &session)
        })
        .await;
    holder.unlock(&["k"]).await;
    assert!(server.snapshot().is_empty(), "{:?}", server.snapshot());
    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_floods_requests_without_reading_is_served_or_cut_off_cleanly() {
    let server = start(settings()).await;
    let mut flood = server.connect().await;
    let session = flood.session.clone();
    // More requests than the server queues per connection, sent without reading any answer.
    let mut sent = 0;
    for i in 0..5000u32 {
        let frame = Message::text(json!({"command": "ping", "id": i}).to_string());
        match tokio::time::timeout(wire::BOUND, flood.ws.feed(frame)).await {
            Ok(Ok(())) => sent += 1,
            _ => break,
        }
    }
    let _ = tokio::time::timeout(wire::BOUND, flood.ws.flush()).await;
    assert!(sent > 0);
    // Whatever the server did (answered in order, or closed with a policy code), the answers it
    // sent are in order and it still serves others.
    let mut next_id = 0u32;
    let ended = tokio::time::timeout(wire::BOUND, async {
        while let Some(Ok(message)) = flood.ws.next().await {
            match message {
                Message::Text(text) => {
                    let answer: Value = serde_json::from_str(text.as_str()).expect("JSON");
                    assert_eq!(answer["id"], json!(next_id), "{answer}");
                    next_id += 1;
                    if next_id == sent {
                        return;
                    }
                }
                Message::Close(frame) => {
                    let code = frame.map(|f| u16::from(f.code));
                    assert_eq!(code, Some(1008), "a flood is cut off with a policy close");
                    return;
                }
                _ => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the flood was neither answered nor closed");
    drop(flood);
    wire::wait_until("the flooding session is gone after its client left", || {
        !wire::mentions(&server.snapshot(), &session)
    })
    .await;
    still_serving(&server).await;
    server.stop().await;
}
