//! Over the wire: who is connected and who may do what. Session names (`?name=`, `hello`), the
//! `sessions` listing, the names and hold times in `locks` and deadlock answers, `kill` by an
//! administrator, and the `--token` / `--admin-token` checks before the upgrade.

mod wire;

use std::net::SocketAddr;

use clap::Parser;
use futures_util::StreamExt;
use locksmith::auth::Secret;
use locksmith::config::Config;
use locksmith::lock::{LockMode, SessionId};
use locksmith::server::{refuse_open_exposure, ServerSettings};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;
use wire::{connect_with, http_get, refused_status, settings, start, BOUND};

const TOKEN: &str = "s3cret-token";
const ADMIN: &str = "r00t-token";

fn secret(text: &str) -> Option<Secret> {
    Some(text.parse().expect("a token"))
}

/// Settings with an admin token (and no client token).
fn with_admin() -> ServerSettings {
    ServerSettings {
        admin_token: secret(ADMIN),
        ..settings()
    }
}

fn entry<'a>(sessions: &'a Value, session: &str) -> &'a Value {
    sessions["sessions"]
        .as_array()
        .expect("sessions array")
        .iter()
        .find(|s| s["session"] == json!(session))
        .unwrap_or_else(|| panic!("{session} not listed in {sessions}"))
}

// ---- names ---------------------------------------------------------------------------------

#[tokio::test]
async fn hello_answers_the_session_and_version_and_names_the_session() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    let plain = a.ok(json!({"command": "hello", "id": 1})).await;
    assert_eq!(plain["session"], json!(a.session));
    assert_eq!(plain["version"], json!(env!("CARGO_PKG_VERSION")));
    assert_eq!(plain["id"], json!(1));
    assert!(plain.get("name").is_none(), "no name set yet: {plain}");

    let named = a.ok(json!({"command": "hello", "name": "backup"})).await;
    assert_eq!(named["name"], json!("backup"));
    let renamed = a.ok(json!({"command": "hello", "name": "restore"})).await;
    assert_eq!(renamed["name"], json!("restore"));
    let unchanged = a.ok(json!({"command": "hello"})).await;
    assert_eq!(unchanged["name"], json!("restore"));
    server.stop().await;
}

#[tokio::test]
async fn an_invalid_name_is_a_bad_request_and_on_the_url_a_400_before_the_upgrade() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    let long = "n".repeat(129);
    for name in [json!(""), json!(long), json!("tab\there"), json!(7)] {
        a.fails(json!({"command": "hello", "name": name}), "bad_request")
            .await;
    }
    let hello = a.ok(json!({"command": "hello"})).await;
    assert!(hello.get("name").is_none(), "nothing was named: {hello}");
    for query in ["?name=", "?name=a%07b", &format!("?name={long}")] {
        let refused = connect_with(&format!("{}{query}", server.url()), None).await;
        assert_eq!(refused_status(refused), 400, "{query}");
    }
    let mut b = server.connect_as("?name=caf%C3%A9%20backup", None).await;
    let hello = b.ok(json!({"command": "hello"})).await;
    assert_eq!(hello["name"], json!("café backup"));
    server.stop().await;
}

#[tokio::test]
async fn sessions_lists_every_open_session_sorted_with_name_peer_held_and_waiting_for() {
    let server = start(settings()).await;
    let mut a = server.connect_as("?name=backup", None).await;
    let mut b = server.connect().await;
    let mut querier = server.connect().await;
    a.lock(&["k1", "k2", "k3"], "write").await;
    b.send(json!({"command": "lock", "keys": ["k1"]})).await;
    server.wait_queued(&b.session, "k1").await;

    let sessions = querier.ok(json!({"command": "sessions"})).await;
    let ids: Vec<&str> = sessions["sessions"]
        .as_array()
        .expect("sessions array")
        .iter()
        .map(|s| s["session"].as_str().expect("session id"))
        .collect();
    let mut sorted = vec![
        a.session.as_str(),
        b.session.as_str(),
        querier.session.as_str(),
    ];
    sorted.sort();
    assert_eq!(ids, sorted, "every open session, sorted by id");

    let listed_a = entry(&sessions, &a.session);
    assert_eq!(listed_a["name"], json!("backup"));
    assert_eq!(listed_a["held"], json!(3));
    assert_eq!(listed_a["waiting_for"], Value::Null);
    assert!(listed_a["connected_ms"].is_u64(), "{listed_a}");
    let peer = listed_a["peer"].as_str().expect("peer");
    assert!(peer.starts_with("127.0.0.1:"), "{peer}");

    let listed_b = entry(&sessions, &b.session);
    assert!(listed_b.get("name").is_none(), "{listed_b}");
    assert_eq!(listed_b["held"], json!(0));
    assert_eq!(listed_b["waiting_for"], json!("k1"));

    b.close().await;
    wire::wait_until("the closed session leaves the listing", || {
        server.locks().session_count() == 2
    })
    .await;
    let sessions = querier.ok(json!({"command": "sessions"})).await;
    assert_eq!(sessions["sessions"].as_array().expect("array").len(), 2);
    server.stop().await;
}

#[tokio::test]
async fn locks_shows_how_long_each_key_is_held_and_the_names_of_holders_and_waiters() {
    let server = start(settings()).await;
    let mut a = server.connect_as("?name=backup", None).await;
    let mut b = server.connect().await;
    let mut c = server.connect().await;
    a.lock(&["k"], "write").await;
    c.lock(&["u"], "write").await;
    b.ok(json!({"command": "hello", "name": "reader"})).await;
    b.send(json!({"command": "lock", "keys": ["k"], "mode": "read"}))
        .await;
    server.wait_queued(&b.session, "k").await;

    let first = c.locks().await;
    let second = c.locks().await;
    let k = &second["locks"][0];
    assert_eq!(k["key"], json!("k"));
    assert_eq!(k["holders"][0]["name"], json!("backup"));
    assert_eq!(k["waiters"][0]["name"], json!("reader"));
    let (before, after) = (
        first["locks"][0]["holders"][0]["held_ms"].as_u64(),
        k["holders"][0]["held_ms"].as_u64(),
    );
    assert!(before.is_some() && after >= before, "{first} then {second}");
    let u = &second["locks"][1];
    assert_eq!(u["key"], json!("u"));
    assert!(u["holders"][0]["held_ms"].is_u64(), "{u}");
    assert!(u["holders"][0].get("name").is_none(), "unnamed: {u}");
    server.stop().await;
}

#[tokio::test]
async fn locks_and_sessions_list_at_most_their_limit_and_say_how_many_more() {
    let server = start(settings()).await;
    let mut holder = server.connect().await;
    // 1500 keys in one session: over the default limit of 1000.
    let keys: Vec<String> = (0..1500).map(|n| format!("k{n:04}")).collect();
    for chunk in keys.chunks(750) {
        holder.ok(json!({"command": "lock", "keys": chunk})).await;
    }
    let mut waiters = Vec::new();
    for _ in 0..3 {
        let mut waiter = server.connect().await;
        waiter
            .send(json!({"command": "lock", "keys": ["k0000"]}))
            .await;
        server.wait_queued(&waiter.session, "k0000").await;
        waiters.push(waiter);
    }
    let mut querier = server.connect().await;

    let all = querier.locks().await;
    let listed = all["locks"].as_array().expect("locks");
    assert_eq!(listed.len(), 1000, "the default limit");
    assert_eq!(listed[0]["key"], json!("k0000"));
    assert_eq!(
        listed[999]["key"],
        json!("k0999"),
        "the first keys in key order"
    );
    assert_eq!(all["more"], json!(500));

    let page = querier
        .ok(json!({"command": "locks", "prefix": "k000", "limit": 2}))
        .await;
    let listed: Vec<&Value> = page["locks"]
        .as_array()
        .expect("locks")
        .iter()
        .map(|k| &k["key"])
        .collect();
    assert_eq!(listed, vec![&json!("k0000"), &json!("k0001")]);
    assert_eq!(page["more"], json!(8));
    // Three exclusive waiters on k0000: 3 + 2 + 1 = 6 edges, 2 listed.
    assert_eq!(page["waits_for"].as_array().expect("edges").len(), 2);
    assert_eq!(page["waits_for_more"], json!(4));

    let sessions = querier.ok(json!({"command": "sessions", "limit": 2})).await;
    assert_eq!(sessions["sessions"].as_array().expect("sessions").len(), 2);
    assert_eq!(sessions["more"], json!(3), "5 open, 2 listed");
    for limit in [json!(0), json!(100_001), json!("10")] {
        querier
            .fails(json!({"command": "locks", "limit": limit}), "bad_request")
            .await;
        querier
            .fails(
                json!({"command": "sessions", "limit": limit}),
                "bad_request",
            )
            .await;
    }
    server.stop().await;
}

#[tokio::test]
async fn locks_with_a_prefix_lists_only_those_keys_and_the_edges_among_them() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    let mut c = server.connect().await;
    a.lock(&["job/1", "job/2", "other"], "write").await;
    b.send(json!({"command": "lock", "keys": ["other"]})).await;
    c.send(json!({"command": "lock", "keys": ["job/1"]})).await;
    server.wait_queued(&b.session, "other").await;
    server.wait_queued(&c.session, "job/1").await;

    let mut querier = server.connect().await;
    let locks = querier
        .ok(json!({"command": "locks", "prefix": "job/"}))
        .await;
    let keys: Vec<&Value> = locks["locks"]
        .as_array()
        .expect("locks")
        .iter()
        .map(|k| &k["key"])
        .collect();
    assert_eq!(keys, vec![&json!("job/1"), &json!("job/2")]);
    assert_eq!(
        locks["waits_for"],
        json!([{"waiter": c.session, "waits_for": a.session}])
    );
    let all = querier.locks().await;
    assert_eq!(all["locks"].as_array().expect("locks").len(), 3);
    querier
        .fails(json!({"command": "locks", "prefix": 5}), "bad_request")
        .await;
    server.stop().await;
}

#[tokio::test]
async fn a_deadlock_answer_names_the_members_that_have_a_name() {
    let server = start(settings()).await;
    let mut a = server.connect_as("?name=alpha", None).await;
    let mut b = server.connect().await;
    a.lock(&["k1"], "write").await;
    b.lock(&["k2"], "write").await;
    a.send(json!({"command": "lock", "keys": ["k2"]})).await;
    server.wait_queued(&a.session, "k2").await;

    let refused = b
        .fails(json!({"command": "lock", "keys": ["k1"]}), "deadlock")
        .await;
    assert_eq!(
        refused["cycle"],
        json!([
            {"session": b.session, "waiting_for_key": "k1"},
            {"session": a.session, "waiting_for_key": "k2", "name": "alpha"},
        ])
    );
    assert_eq!(
        refused["error"],
        json!(format!(
            "deadlock: session {} waits for key k1 -> session {} (alpha) waits for key k2",
            b.session, a.session
        ))
    );
    server.stop().await;
}

// ---- kill ----------------------------------------------------------------------------------

#[tokio::test]
async fn kill_releases_the_targets_locks_at_once_answers_its_requests_killed_and_closes_it_1008() {
    let server = start(with_admin()).await;
    let mut target = server.connect().await;
    let mut holder = server.connect().await;
    let mut waiter = server.connect().await;
    let mut admin = server.connect_as("", Some(ADMIN)).await;
    target.lock(&["k1", "k2"], "write").await;
    holder.lock(&["k3"], "write").await;
    waiter
        .send(json!({"command": "lock", "keys": ["k1"], "id": "w"}))
        .await;
    server.wait_queued(&waiter.session, "k1").await;
    // The target waits for k3, with a ping queued behind its wait.
    target
        .send(json!({"command": "lock", "keys": ["k3"], "id": 1}))
        .await;
    target.send(json!({"command": "ping", "id": 2})).await;
    server.wait_queued(&target.session, "k3").await;

    let killed = admin
        .ok(json!({"command": "kill", "session": target.session}))
        .await;
    assert_eq!(killed, json!({"success": true}));
    // Answered after the release: the target is gone from the table already.
    let snapshot = server.snapshot();
    assert!(
        !wire::mentions(&snapshot, &target.session),
        "the kill released everything: {snapshot:?}"
    );
    let granted = waiter.recv().await;
    assert_eq!(granted["success"], json!(true), "{granted}");
    assert_eq!(granted["id"], json!("w"));

    // The request in progress is answered `killed`; so is the ping queued behind it if the
    // server had read it before the kill (a frame still unread when the socket closes gets no
    // answer); then the close.
    let mut answers = Vec::new();
    let close = loop {
        let frame = tokio::time::timeout(BOUND, target.ws.next())
            .await
            .expect("a frame in time");
        match frame {
            Some(Ok(Message::Text(text))) => {
                answers.push(serde_json::from_str::<Value>(text.as_str()).expect("JSON"))
            }
            Some(Ok(Message::Close(Some(frame)))) => {
                break (u16::from(frame.code), frame.reason.to_string())
            }
            other => panic!("expected answers then a close frame, got {other:?}"),
        }
    };
    assert!(matches!(answers.len(), 1 | 2), "{answers:?}");
    for (answer, id) in answers.iter().zip([1, 2]) {
        assert_eq!(answer["code"], json!("killed"), "{answer}");
        assert_eq!(answer["id"], json!(id), "{answer}");
        assert_eq!(answer["error"], json!("killed by an administrator"));
    }
    assert_eq!(close, (1008, "killed by an administrator".to_owned()));
    wire::wait_until("the killed session leaves the listing", || {
        server.locks().session_count() == 3
    })
    .await;
    let sessions = admin.ok(json!({"command": "sessions"})).await;
    assert!(
        sessions["sessions"]
            .as_array()
            .expect("array")
            .iter()
            .all(|s| s["session"] != json!(target.session)),
        "{sessions}"
    );
    wire::assert_no_server_panics();
    server.stop().await;
}

#[tokio::test]
async fn kill_without_the_admin_token_is_forbidden_and_without_one_configured_always() {
    let server = start(with_admin()).await;
    let mut target = server.connect().await;
    let mut plain = server.connect().await;
    let mut wrong = server.connect_as("", Some("guess")).await;
    for client in [&mut plain, &mut wrong] {
        client
            .fails(
                json!({"command": "kill", "session": target.session}),
                "forbidden",
            )
            .await;
    }
    target.ping().await;
    server.stop().await;

    let open = start(settings()).await;
    let mut target = open.connect().await;
    let mut claims_admin = open.connect_as(&format!("?token={ADMIN}"), None).await;
    claims_admin
        .fails(
            json!({"command": "kill", "session": target.session}),
            "forbidden",
        )
        .await;
    target.ping().await;
    open.stop().await;
}

#[tokio::test]
async fn kill_of_a_session_that_is_not_open_is_not_found_and_of_a_non_uuid_a_bad_request() {
    let server = start(with_admin()).await;
    let mut admin = server.connect_as(&format!("?token={ADMIN}"), None).await;
    let nobody = "00000000-0000-4000-8000-000000000000";
    let answer = admin
        .fails(json!({"command": "kill", "session": nobody}), "not_found")
        .await;
    assert!(
        answer["error"].as_str().is_some_and(|e| e.contains(nobody)),
        "{answer}"
    );
    admin
        .fails(json!({"command": "kill", "session": "bob"}), "bad_request")
        .await;
    admin.fails(json!({"command": "kill"}), "bad_request").await;
    server.stop().await;
}

/// The story: a kill used to close the target's lock-manager session at once, even while the
/// target's write was inside its commit. Another session then took the key and wrote it, and the
/// killed write landed afterwards, under that session's exclusive lock.
#[tokio::test]
async fn a_kill_during_a_commit_releases_the_keys_only_after_the_commit() {
    let store = wire::GatedStore::new();
    let gate = std::sync::Arc::clone(&store.gate);
    let entered = std::sync::Arc::clone(&store.entered);
    let server = wire::start_with_store(with_admin(), std::sync::Arc::new(store)).await;
    let mut target = server.connect().await;
    let mut other = server.connect().await;
    let mut admin = server.connect_as("", Some(ADMIN)).await;
    target
        .send(json!({"command": "write", "keys": ["k"], "value": "killed-writer", "id": 1}))
        .await;
    wire::wait_until("the write is inside its commit", || {
        entered.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    admin
        .send(json!({"command": "kill", "session": target.session, "id": "kill"}))
        .await;
    let registry = server.registry().clone();
    let killed: SessionId = SessionId(target.session.parse().expect("a uuid"));
    wire::wait_until("the kill reached the target", || registry.is_killed(killed)).await;
    // The commit is still held at the gate: the key must still be the target's.
    assert_eq!(
        wire::holders(&server.snapshot(), "k"),
        vec![(target.session.clone(), LockMode::Exclusive)],
        "released while the write was being committed"
    );
    other
        .send(json!({"command": "lock", "keys": ["k"], "id": "other"}))
        .await;
    server.wait_queued(&other.session, "k").await;
    gate.add_permits(1);
    assert_eq!(
        admin.recv().await,
        json!({"success": true, "id": "kill"}),
        "answered once the target is released"
    );
    let answer = target.recv().await;
    assert_eq!(answer["code"], json!("killed"), "{answer}");
    assert_eq!(target.close_frame().await.0, 1008);
    assert_eq!(other.recv().await["success"], json!(true));
    let read = other
        .ok(json!({"command": "read", "keys": ["k"], "hold_lock": true}))
        .await;
    assert_eq!(
        read["values"]["k"],
        json!("killed-writer"),
        "committed before the release"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_kill_releases_a_target_that_stopped_reading_its_answers() {
    let server = start(with_admin()).await;
    let mut target = server.connect().await;
    let mut admin = server.connect_as("", Some(ADMIN)).await;
    let value = "x".repeat(512 * 1024);
    let keys: Vec<String> = (0..64).map(|n| format!("b{n}")).collect();
    for key in &keys {
        target
            .ok(json!({"command": "write", "keys": [key], "value": value}))
            .await;
    }
    target.lock(&["t"], "write").await;
    // One 32 MiB answer, more than the socket buffers hold, that the target never reads: once
    // its first bytes arrive, the server is stuck sending the rest.
    target
        .send(json!({"command": "read", "keys": keys, "id": "big"}))
        .await;
    let MaybeTlsStream::Plain(tcp) = target.ws.get_ref() else {
        panic!("a plain TCP connection");
    };
    tokio::time::timeout(BOUND, tcp.peek(&mut [0u8; 1]))
        .await
        .expect("the answer starts arriving")
        .expect("peek");
    let answer = admin
        .request(json!({"command": "kill", "session": target.session}))
        .await;
    assert_eq!(answer, json!({"success": true}));
    assert!(
        wire::holders(&server.snapshot(), "t").is_empty(),
        "released before the kill was answered"
    );
    server.stop().await;
}

#[tokio::test]
async fn an_admin_may_kill_its_own_session() {
    let server = start(with_admin()).await;
    let mut admin = server.connect_as("", Some(ADMIN)).await;
    admin.lock(&["k"], "write").await;
    let answer = admin
        .request(json!({"command": "kill", "session": admin.session, "id": 1}))
        .await;
    assert_eq!(answer, json!({"success": true, "id": 1}));
    assert_eq!(admin.close_frame().await.0, 1008);
    server.wait_idle().await;
    server.stop().await;
}

// ---- tokens --------------------------------------------------------------------------------

#[tokio::test]
async fn with_a_token_a_request_without_it_is_refused_401_before_the_upgrade_but_healthz_is_open() {
    let server = start(ServerSettings {
        token: secret(TOKEN),
        admin_token: secret(ADMIN),
        ..settings()
    })
    .await;
    let url = server.url();
    assert_eq!(refused_status(connect_with(&url, None).await), 401);
    assert_eq!(refused_status(connect_with(&url, Some("wrong")).await), 401);
    assert_eq!(
        refused_status(connect_with(&format!("{url}?token=wrong"), None).await),
        401
    );
    let refused = http_get(server.addr, "/ws").await;
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    assert!(refused.contains("unauthorized: "), "{refused}");
    assert!(!refused.contains(TOKEN), "{refused}");
    assert!(http_get(server.addr, "/other")
        .await
        .starts_with("HTTP/1.1 401"));
    let health = http_get(server.addr, "/healthz").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert_eq!(
        server.locks().session_count(),
        0,
        "no refused client got a session"
    );
    server.stop().await;
}

#[tokio::test]
async fn the_token_is_accepted_as_a_bearer_header_or_on_the_url_and_so_is_the_admin_token() {
    let server = start(ServerSettings {
        token: secret(TOKEN),
        admin_token: secret(ADMIN),
        ..settings()
    })
    .await;
    let mut by_header = server.connect_as("", Some(TOKEN)).await;
    let mut by_query = server
        .connect_as(&format!("?name=q&token={TOKEN}"), None)
        .await;
    let mut admin = server.connect_as(&format!("?token={ADMIN}"), None).await;
    by_header.ping().await;
    let hello = by_query.ok(json!({"command": "hello"})).await;
    assert_eq!(hello["name"], json!("q"));
    // Only the admin token makes an admin.
    by_header
        .fails(
            json!({"command": "kill", "session": by_query.session}),
            "forbidden",
        )
        .await;
    admin
        .ok(json!({"command": "kill", "session": by_query.session}))
        .await;
    server.stop().await;
}

#[test]
fn a_non_loopback_address_without_a_token_is_refused_unless_insecure_no_auth() {
    let config = |args: &[&str]| {
        let mut argv = vec!["locksmith"];
        argv.extend_from_slice(args);
        Config::try_parse_from(argv).expect("flags parse")
    };
    let addr = |text: &str| -> SocketAddr { text.parse().expect("an address") };
    let open = [addr("127.0.0.1:8008"), addr("0.0.0.0:8008")];
    let refused = refuse_open_exposure(&config(&[]), &open)
        .expect_err("an open address without a token is refused");
    let message = refused.to_string();
    assert!(
        message.contains("0.0.0.0:8008") && message.contains("--token"),
        "{message}"
    );
    assert!(refuse_open_exposure(&config(&["--token", "t"]), &open).is_ok());
    assert!(refuse_open_exposure(&config(&["--insecure-no-auth"]), &[addr("[::]:8008")]).is_ok());
    assert!(
        refuse_open_exposure(&config(&[]), &[addr("127.0.0.1:8008"), addr("[::1]:8008")]).is_ok(),
        "loopback needs no token"
    );
}
