//! Over the wire: every command, the error codes a well-formed request can earn, `id` echo, both
//! write forms, `hold_lock`, try-locks, pipelining, the `locks` snapshot, `/healthz` and the
//! `Origin` check. The real server runs in-process on a random loopback port; clients are
//! tokio-tungstenite WebSockets.

mod wire;

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use locksmith::lock::LockMode;
use locksmith::server::ServerSettings;
use locksmith::store::{KeysPage, Store, StoreError};
use serde_json::{json, Value};
use wire::{holders, settings, start, wire_holders, Client, BOUND};

/// A bound for answers that must come "at once", far below the server's 60 s default lock
/// timeout: if the server waited instead, the test would fail rather than pass slowly.
const AT_ONCE: Duration = Duration::from_secs(5);

#[tokio::test]
async fn ping_answers_success_and_echoes_any_json_id() {
    let server = start(settings()).await;
    let mut client = server.connect().await;
    for id in [
        json!(7),
        json!(-1.5),
        json!("req-1"),
        json!({"trace": [1, "two", null]}),
        json!([1, 2]),
        json!(null),
    ] {
        let answer = client.ok(json!({"command": "ping", "id": id})).await;
        assert_eq!(answer["id"], id, "{answer}");
    }
    let answer = client.ok(json!({"command": "ping"})).await;
    assert!(
        answer.get("id").is_none(),
        "no id asked, none echoed: {answer}"
    );
    server.stop().await;
}

#[tokio::test]
async fn error_answers_echo_the_id_too() {
    let server = start(settings()).await;
    let mut holder = server.connect().await;
    holder.lock(&["busy"], "write").await;
    let mut client = server.connect().await;

    let id = json!({"n": 1});
    let answer = client
        .fails(json!({"command": "dance", "id": id}), "unknown_command")
        .await;
    assert_eq!(answer["id"], id);

    let answer = client
        .fails(
            json!({"command": "lock", "keys": "a", "id": "s"}),
            "bad_request",
        )
        .await;
    assert_eq!(answer["id"], json!("s"));

    let answer = client
        .fails(
            json!({"command": "unlock", "keys": ["a"], "id": 42}),
            "not_held",
        )
        .await;
    assert_eq!(answer["id"], json!(42));

    let answer = client
        .fails(
            json!({"command": "lock", "keys": ["busy"], "timeout_ms": 0, "id": [3]}),
            "timeout",
        )
        .await;
    assert_eq!(answer["id"], json!([3]));
    server.stop().await;
}

#[tokio::test]
async fn session_command_names_a_distinct_uuid_per_connection() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    let b = server.connect().await;
    assert!(uuid::Uuid::parse_str(&a.session).is_ok(), "{}", a.session);
    assert!(uuid::Uuid::parse_str(&b.session).is_ok(), "{}", b.session);
    assert_ne!(a.session, b.session);
    // The same connection always gets the same id, and it is the id the lock table uses.
    assert_eq!(a.learn_session().await, a.session);
    a.lock(&["k"], "write").await;
    assert_eq!(
        holders(&server.snapshot(), "k"),
        vec![(a.session.clone(), LockMode::Exclusive)]
    );
    server.stop().await;
}

#[tokio::test]
async fn lock_grants_a_fencing_token_per_key_and_unlock_releases_them() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    let first = a.lock(&["b", "a"], "write").await;
    let tokens = first["tokens"].as_object().expect("tokens object");
    assert_eq!(tokens.len(), 2, "{first}");
    let token_a = tokens["a"].as_u64().expect("numeric token");
    assert!(tokens["b"].as_u64().is_some(), "{first}");
    assert_eq!(
        holders(&server.snapshot(), "a"),
        vec![(a.session.clone(), LockMode::Exclusive)]
    );

    a.unlock(&["a", "b"]).await;
    assert!(server.snapshot().is_empty(), "{:?}", server.snapshot());

    let again = a.lock(&["a"], "write").await;
    assert!(
        again["tokens"]["a"].as_u64().expect("token") > token_a,
        "tokens of a key increase: {first} then {again}"
    );
    server.stop().await;
}

#[tokio::test]
async fn lock_without_mode_takes_a_write_lock() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    a.ok(json!({"command": "lock", "keys": ["k"]})).await;
    let locks = a.locks().await;
    assert_eq!(
        wire_holders(&locks, "k"),
        vec![(a.session.clone(), "write".to_owned())]
    );
    let mut b = server.connect().await;
    b.fails(
        json!({"command": "lock", "keys": ["k"], "mode": "read", "timeout_ms": 0}),
        "timeout",
    )
    .await;
    server.stop().await;
}

#[tokio::test]
async fn read_locks_are_shared_and_exclude_writers() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    let mut c = server.connect().await;
    a.lock(&["k"], "read").await;
    b.lock(&["k"], "read").await;
    let locks = c.locks().await;
    let mut modes = wire_holders(&locks, "k");
    modes.sort();
    let mut expected = vec![
        (a.session.clone(), "read".to_owned()),
        (b.session.clone(), "read".to_owned()),
    ];
    expected.sort();
    assert_eq!(modes, expected);
    c.fails(
        json!({"command": "lock", "keys": ["k"], "mode": "write", "timeout_ms": 0}),
        "timeout",
    )
    .await;
    server.stop().await;
}

#[tokio::test]
async fn unlock_of_a_key_not_held_answers_not_held_naming_it_and_releases_nothing() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    a.lock(&["a"], "write").await;
    b.lock(&["theirs"], "write").await;

    let answer = a
        .fails(
            json!({"command": "unlock", "keys": ["c", "a", "b", "theirs"]}),
            "not_held",
        )
        .await;
    assert_eq!(answer["keys"], json!(["b", "c", "theirs"]), "{answer}");
    let snapshot = server.snapshot();
    assert_eq!(
        holders(&snapshot, "a"),
        vec![(a.session.clone(), LockMode::Exclusive)],
        "the held key was not released"
    );
    assert_eq!(
        holders(&snapshot, "theirs"),
        vec![(b.session.clone(), LockMode::Exclusive)],
        "another session's key was not released"
    );
    a.unlock(&["a"]).await;
    server.stop().await;
}

#[tokio::test]
async fn read_answers_null_for_keys_never_written() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    let answer = a
        .ok(json!({"command": "read", "keys": ["never", "nor"]}))
        .await;
    assert_eq!(answer["values"], json!({"never": null, "nor": null}));
    server.stop().await;
}

#[tokio::test]
async fn write_with_values_writes_every_key_and_answers_tokens() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    let answer = a
        .ok(json!({"command": "write", "keys": ["x", "y"], "values": [1, {"deep": ["v"]}]}))
        .await;
    let tokens = answer["tokens"].as_object().expect("tokens");
    assert!(tokens["x"].is_u64() && tokens["y"].is_u64(), "{answer}");
    let mut b = server.connect().await;
    let read = b.ok(json!({"command": "read", "keys": ["y", "x"]})).await;
    assert_eq!(read["values"], json!({"x": 1, "y": {"deep": ["v"]}}));
    server.stop().await;
}

#[tokio::test]
async fn write_accepts_the_original_value_form_for_one_key() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    a.ok(json!({"command": "write", "keys": ["list"], "value": [1, 2]}))
        .await;
    a.ok(json!({"command": "write", "keys": ["text"], "value": "hello"}))
        .await;
    let read = a
        .ok(json!({"command": "read", "keys": ["list", "text"]}))
        .await;
    assert_eq!(read["values"], json!({"list": [1, 2], "text": "hello"}));
    server.stop().await;
}

#[tokio::test]
async fn write_accepts_the_original_value_form_for_several_keys() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    a.ok(json!({"command": "write", "keys": ["a", "b"], "value": [1, "two"]}))
        .await;
    let read = a.ok(json!({"command": "read", "keys": ["a", "b"]})).await;
    assert_eq!(read["values"], json!({"a": 1, "b": "two"}));
    server.stop().await;
}

#[tokio::test]
async fn a_write_with_a_count_mismatch_is_a_bad_request_that_writes_and_locks_nothing() {
    let server = start(settings()).await;
    // Another session holds `a` exclusively: a server that took locks before checking the
    // counts would wait here (the default lock timeout is a minute) instead of answering.
    let mut other = server.connect().await;
    other.lock(&["a"], "write").await;
    let mut client = server.connect().await;
    for request in [
        json!({"command": "write", "keys": ["a", "b"], "values": [1]}),
        json!({"command": "write", "keys": ["a", "b"], "values": [1, 2, 3]}),
        json!({"command": "write", "keys": ["a", "b"], "values": []}),
        json!({"command": "write", "keys": ["a", "b"], "value": 5}),
        json!({"command": "write", "keys": ["a", "b"], "value": [5]}),
        json!({"command": "write", "keys": ["a", "b"], "value": [5, 6, 7]}),
        json!({"command": "write", "keys": ["b"], "values": [1, 2]}),
        json!({"command": "write", "keys": ["b"], "values": [1], "value": 1}),
        json!({"command": "write", "keys": ["b"]}),
    ] {
        client.send(request.clone()).await;
        let answer = client.recv_within(AT_ONCE).await;
        assert_eq!(
            answer["code"],
            json!("bad_request"),
            "{request} -> {answer}"
        );
        let snapshot = server.snapshot();
        assert!(
            !wire::mentions(&snapshot, &client.session),
            "{request} left a lock or a wait: {snapshot:?}"
        );
    }
    other.unlock(&["a"]).await;
    let read = client
        .ok(json!({"command": "read", "keys": ["a", "b"]}))
        .await;
    assert_eq!(
        read["values"],
        json!({"a": null, "b": null}),
        "nothing written"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_lock_that_times_out_names_the_key_and_keeps_nothing() {
    let server = start(settings()).await;
    let mut holder = server.connect().await;
    holder.lock(&["k"], "write").await;
    let mut client = server.connect().await;
    let answer = client
        .fails(
            json!({"command": "lock", "keys": ["j", "k"], "timeout_ms": 100}),
            "timeout",
        )
        .await;
    assert_eq!(answer["key"], json!("k"), "{answer}");
    assert!(!wire::mentions(&server.snapshot(), &client.session));
    server.stop().await;
}

#[tokio::test]
async fn a_request_without_timeout_ms_waits_for_the_servers_lock_timeout() {
    let server = start(locksmith::server::ServerSettings {
        lock_timeout: Duration::from_millis(200),
        ..settings()
    })
    .await;
    let mut holder = server.connect().await;
    holder.lock(&["k"], "write").await;
    let mut client = server.connect().await;
    for request in [
        json!({"command": "lock", "keys": ["k"]}),
        json!({"command": "read", "keys": ["k"]}),
        json!({"command": "write", "keys": ["k"], "value": 1}),
    ] {
        let answer = client.fails(request, "timeout").await;
        assert_eq!(answer["key"], json!("k"));
    }
    server.stop().await;
}

#[tokio::test]
async fn keys_and_values_may_be_any_unicode() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    let keys = ["ключ", "🔒", "a b\tc\"\\", "键/子键"];
    a.ok(json!({"command": "write", "keys": keys, "values": ["значение", {"🔑": [1, "二"]}, null, "\u{0}"]}))
        .await;
    let read = a.ok(json!({"command": "read", "keys": keys})).await;
    assert_eq!(read["values"]["ключ"], json!("значение"));
    assert_eq!(read["values"]["🔒"], json!({"🔑": [1, "二"]}));
    assert_eq!(read["values"]["键/子键"], json!("\u{0}"));
    let granted = a.lock(&keys, "write").await;
    assert_eq!(granted["tokens"].as_object().expect("tokens").len(), 4);
    a.unlock(&keys).await;
    server.stop().await;
}

#[tokio::test]
async fn the_largest_timeout_ms_waits_and_is_granted_when_the_key_frees() {
    let server = start(settings()).await;
    let mut holder = server.connect().await;
    holder.lock(&["k"], "write").await;
    let mut client = server.connect().await;
    for request in [
        json!({"command": "lock", "keys": ["k"], "timeout_ms": u64::MAX, "id": 1}),
        json!({"command": "read", "keys": ["k"], "timeout_ms": u64::MAX, "id": 2}),
        json!({"command": "write", "keys": ["k"], "value": 1, "timeout_ms": u64::MAX, "id": 3}),
    ] {
        client.send(request).await;
    }
    server.wait_queued(&client.session, "k").await;
    holder.unlock(&["k"]).await;
    for id in 1..=3 {
        let answer = client.recv().await;
        assert_eq!(answer["id"], json!(id), "{answer}");
        assert_eq!(answer["success"], json!(true), "{answer}");
    }
    wire::assert_no_server_panics();
    server.stop().await;
}

#[tokio::test]
async fn a_three_key_lock_that_times_out_on_its_last_key_leaves_the_first_two_free() {
    let server = start(settings()).await;
    let mut c = server.connect().await;
    c.lock(&["k3"], "write").await;
    let mut a = server.connect().await;
    let answer = a
        .fails(
            json!({"command": "lock", "keys": ["k1", "k2", "k3"], "timeout_ms": 200}),
            "timeout",
        )
        .await;
    assert_eq!(answer["key"], json!("k3"), "{answer}");
    let snapshot = server.snapshot();
    assert!(holders(&snapshot, "k1").is_empty(), "{snapshot:?}");
    assert!(holders(&snapshot, "k2").is_empty(), "{snapshot:?}");
    // Another client gets both at once, without waiting.
    let mut b = server.connect().await;
    b.ok(json!({"command": "lock", "keys": ["k1", "k2"], "timeout_ms": 0}))
        .await;
    server.stop().await;
}

#[tokio::test]
async fn reading_keys_the_session_already_holds_does_not_wait_behind_queued_writers() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    a.ok(json!({"command": "write", "keys": ["s", "x"], "values": ["vs", "vx"]}))
        .await;
    a.lock(&["s"], "read").await;
    a.lock(&["x"], "write").await;
    // Writers queue behind a on both keys.
    let mut b = server.connect().await;
    let mut c = server.connect().await;
    b.send(json!({"command": "lock", "keys": ["s"], "mode": "write"}))
        .await;
    c.send(json!({"command": "lock", "keys": ["x"], "mode": "write"}))
        .await;
    server.wait_queued(&b.session, "s").await;
    server.wait_queued(&c.session, "x").await;

    let read = a
        .ok(json!({"command": "read", "keys": ["s", "x"], "timeout_ms": 0}))
        .await;
    assert_eq!(read["values"], json!({"s": "vs", "x": "vx"}));
    // ... and the read without hold_lock left a's locks as they were.
    let snapshot = server.snapshot();
    assert_eq!(
        holders(&snapshot, "s"),
        vec![(a.session.clone(), LockMode::Shared)]
    );
    assert_eq!(
        holders(&snapshot, "x"),
        vec![(a.session.clone(), LockMode::Exclusive)]
    );
    a.unlock(&["s", "x"]).await;
    b.recv().await;
    c.recv().await;
    server.stop().await;
}

#[tokio::test]
async fn a_write_without_hold_lock_leaves_a_shared_lock_shared() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    a.lock(&["k"], "read").await;
    a.ok(json!({"command": "write", "keys": ["k"], "values": ["v"]}))
        .await;
    assert_eq!(
        holders(&server.snapshot(), "k"),
        vec![(a.session.clone(), LockMode::Shared)],
        "back to shared after the write"
    );
    let locks = a.locks().await;
    assert_eq!(
        wire_holders(&locks, "k"),
        vec![(a.session.clone(), "read".to_owned())]
    );
    // Shared indeed: another reader gets it at once, a writer does not.
    let mut b = server.connect().await;
    let read = b
        .ok(json!({"command": "read", "keys": ["k"], "timeout_ms": 0}))
        .await;
    assert_eq!(read["values"], json!({"k": "v"}));
    b.fails(
        json!({"command": "write", "keys": ["k"], "values": [1], "timeout_ms": 0}),
        "timeout",
    )
    .await;
    server.stop().await;
}

#[tokio::test]
async fn read_and_write_without_hold_lock_give_back_exactly_what_they_took() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    a.lock(&["held"], "write").await;
    a.ok(json!({"command": "read", "keys": ["held", "free1"]}))
        .await;
    a.ok(json!({"command": "write", "keys": ["held", "free2"], "values": [1, 2]}))
        .await;
    a.ok(json!({"command": "write", "keys": ["free3"], "value": 3, "hold_lock": false}))
        .await;
    let snapshot = server.snapshot();
    assert_eq!(
        holders(&snapshot, "held"),
        vec![(a.session.clone(), LockMode::Exclusive)],
        "the lock held before is kept, in its mode"
    );
    for key in ["free1", "free2", "free3"] {
        assert!(holders(&snapshot, key).is_empty(), "{key}: {snapshot:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn hold_lock_true_keeps_the_locks_read_and_write_took() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    a.ok(json!({"command": "read", "keys": ["r"], "hold_lock": true}))
        .await;
    a.ok(json!({"command": "write", "keys": ["w"], "values": [1], "hold_lock": true}))
        .await;
    // A shared lock upgraded by a held write stays exclusive.
    a.lock(&["u"], "read").await;
    a.ok(json!({"command": "write", "keys": ["u"], "value": 2, "hold_lock": true}))
        .await;
    let snapshot = server.snapshot();
    assert_eq!(
        holders(&snapshot, "r"),
        vec![(a.session.clone(), LockMode::Shared)]
    );
    assert_eq!(
        holders(&snapshot, "w"),
        vec![(a.session.clone(), LockMode::Exclusive)]
    );
    assert_eq!(
        holders(&snapshot, "u"),
        vec![(a.session.clone(), LockMode::Exclusive)]
    );
    a.unlock(&["r", "w", "u"]).await;
    assert!(server.snapshot().is_empty());
    server.stop().await;
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    for i in 0..200u64 {
        let request = match i % 5 {
            0 => json!({"command": "ping", "id": i}),
            1 => json!({"command": "write", "keys": [format!("k{i}")], "value": i, "id": i}),
            2 => json!({"command": "read", "keys": [format!("k{}", i - 1)], "id": i}),
            3 => json!({"command": "dance", "id": i}),
            _ => json!({"command": "locks", "id": i}),
        };
        a.send(request).await;
    }
    for i in 0..200u64 {
        let answer = a.recv().await;
        assert_eq!(answer["id"], json!(i), "answer out of order: {answer}");
        if i % 5 == 2 {
            assert_eq!(answer["values"][format!("k{}", i - 1)], json!(i - 1));
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn requests_pipelined_behind_a_waiting_lock_are_answered_after_it() {
    let server = start(settings()).await;
    let mut holder = server.connect().await;
    holder.lock(&["k"], "write").await;
    let mut a = server.connect().await;
    a.send(json!({"command": "lock", "keys": ["k"], "id": 1}))
        .await;
    a.send(json!({"command": "ping", "id": 2})).await;
    a.send(json!({"command": "nope", "id": 3})).await;
    server.wait_queued(&a.session, "k").await;
    holder.unlock(&["k"]).await;
    let answers = [a.recv().await, a.recv().await, a.recv().await];
    let ids: Vec<&Value> = answers.iter().map(|answer| &answer["id"]).collect();
    assert_eq!(ids, [&json!(1), &json!(2), &json!(3)], "{answers:?}");
    assert_eq!(answers[0]["success"], json!(true));
    assert_eq!(answers[2]["code"], json!("unknown_command"));
    server.stop().await;
}

#[tokio::test]
async fn locks_answer_lists_holders_waiters_edges_and_sessions() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    let mut d = server.connect().await;
    let mut querier = server.connect().await;
    let granted = a.lock(&["k"], "write").await;
    let token = granted["tokens"]["k"].clone();
    a.lock(&["u"], "read").await;
    d.lock(&["u"], "read").await;
    b.send(json!({"command": "lock", "keys": ["k"], "mode": "read"}))
        .await;
    d.send(json!({"command": "lock", "keys": ["u"], "mode": "write"}))
        .await;
    server.wait_queued(&b.session, "k").await;
    server.wait_queued(&d.session, "u").await;

    let locks = querier.locks().await;
    assert_eq!(locks["sessions"], json!(4), "{locks}");
    let entries = locks["locks"].as_array().expect("locks array");
    assert_eq!(entries.len(), 2, "{locks}");

    let k = &entries[0];
    assert_eq!(k["key"], json!("k"));
    // Issue 9 added `held_ms` to every holder; the fields this test checked stay as they were.
    let held_ms = k["holders"][0]["held_ms"].clone();
    assert!(held_ms.is_u64(), "{k}");
    assert_eq!(
        k["holders"],
        json!([{"session": a.session, "mode": "write", "token": token, "held_ms": held_ms}])
    );
    let waiters = k["waiters"].as_array().expect("waiters");
    assert_eq!(waiters.len(), 1, "{k}");
    assert_eq!(waiters[0]["session"], json!(b.session));
    assert_eq!(waiters[0]["mode"], json!("read"));
    assert_eq!(waiters[0]["upgrade"], json!(false));
    assert!(waiters[0]["waiting_ms"].is_u64(), "{k}");

    let u = &entries[1];
    assert_eq!(u["key"], json!("u"));
    assert_eq!(u["holders"].as_array().expect("holders").len(), 2, "{u}");
    assert_eq!(u["waiters"][0]["session"], json!(d.session));
    assert_eq!(u["waiters"][0]["mode"], json!("write"));
    assert_eq!(u["waiters"][0]["upgrade"], json!(true));

    let mut edges: Vec<(String, String)> = locks["waits_for"]
        .as_array()
        .expect("waits_for array")
        .iter()
        .map(|e| {
            (
                e["waiter"].as_str().expect("waiter").to_owned(),
                e["waits_for"].as_str().expect("waits_for").to_owned(),
            )
        })
        .collect();
    edges.sort();
    let mut expected = vec![
        (b.session.clone(), a.session.clone()),
        (d.session.clone(), a.session.clone()),
    ];
    expected.sort();
    assert_eq!(edges, expected);

    a.unlock(&["k", "u"]).await;
    b.recv().await;
    d.recv().await;
    server.stop().await;
}

#[tokio::test]
async fn locks_answer_of_an_idle_server_is_empty() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    let locks = a.locks().await;
    assert_eq!(locks["locks"], json!([]));
    assert_eq!(locks["waits_for"], json!([]));
    assert_eq!(locks["sessions"], json!(1));
    server.stop().await;
}

#[tokio::test]
async fn healthz_answers_200_ok() {
    let server = start(settings()).await;
    let response = wire::http_get(server.addr, "/healthz").await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("ok"), "{response}");
    server.stop().await;
}

#[tokio::test]
async fn a_foreign_origin_is_refused_with_403_while_no_origin_or_an_allowed_one_connects() {
    let server = start(locksmith::server::ServerSettings {
        allowed_origins: vec!["https://app.example".to_owned()],
        ..settings()
    })
    .await;
    match wire::connect_with_origin(&server.url(), "https://evil.example").await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 403)
        }
        Err(other) => panic!("expected an HTTP 403, got {other}"),
        Ok(_) => panic!("a foreign Origin was accepted"),
    }
    assert_eq!(server.locks().session_count(), 0, "no session was opened");

    let ws = wire::connect_with_origin(&server.url(), "https://app.example")
        .await
        .expect("an allowed Origin connects");
    let mut allowed = Client {
        ws,
        session: String::new(),
    };
    allowed.ping().await;
    let mut no_origin = server.connect().await;
    no_origin.ping().await;
    server.stop().await;
}

/// A store whose every operation fails, to check the `storage_error` answer.
struct BrokenStore;

impl Store for BrokenStore {
    fn read(&self, _keys: &[&str]) -> Result<Vec<Option<Value>>, StoreError> {
        Err(StoreError::Storage("disk on fire".into()))
    }

    fn apply(
        &self,
        _changes: Vec<(String, Option<Value>)>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async { Err(StoreError::Storage("disk on fire".into())) })
    }

    fn keys(
        &self,
        _prefix: &str,
        _after: Option<&str>,
        _limit: usize,
    ) -> Result<KeysPage, StoreError> {
        Err(StoreError::Storage("disk on fire".into()))
    }
}

#[tokio::test]
async fn a_failing_store_answers_storage_error_and_gives_the_locks_back() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let running =
        locksmith::server::start(vec![listener], settings(), Arc::new(BrokenStore)).expect("start");
    let url = format!("ws://{}/ws", running.local_addrs()[0]);
    let mut a = Client::connect(&url).await;
    let held_before = a
        .ok(json!({"command": "lock", "keys": ["r"], "mode": "read"}))
        .await;
    assert!(held_before["tokens"]["r"].is_u64());
    for request in [
        json!({"command": "write", "keys": ["w", "r"], "values": [1, 2], "hold_lock": true}),
        json!({"command": "read", "keys": ["x", "r"], "hold_lock": true}),
    ] {
        let answer = a.request(request.clone()).await;
        assert_eq!(
            answer["code"],
            json!("storage_error"),
            "{request} -> {answer}"
        );
        let snapshot = running.lock_manager().snapshot();
        assert_eq!(snapshot.keys.len(), 1, "only r stays held: {snapshot:?}");
        assert_eq!(snapshot.keys[0].key.as_str(), "r");
        assert_eq!(snapshot.keys[0].holders[0].mode, LockMode::Shared);
    }
    tokio::time::timeout(BOUND, running.shutdown())
        .await
        .expect("shutdown in time");
}

#[tokio::test]
async fn a_lock_over_max_locks_per_session_answers_too_many_locks_and_takes_nothing() {
    let server = start(ServerSettings {
        max_locks_per_session: 3,
        ..settings()
    })
    .await;
    let mut client = server.connect().await;
    client.lock(&["k1", "k2"], "write").await;
    client.lock(&["k3"], "read").await;
    let answer = client
        .fails(
            json!({"command": "lock", "keys": ["k3", "k4"], "id": 4}),
            "too_many_locks",
        )
        .await;
    assert_eq!(answer["limit"], json!(3), "{answer}");
    assert_eq!(answer["held"], json!(3), "{answer}");
    assert_eq!(answer["requested"], json!(1), "{answer}");
    assert_eq!(answer["id"], json!(4), "{answer}");
    let snapshot = server.snapshot();
    let mine = |key: &str| holders(&snapshot, key);
    assert_eq!(
        mine("k1"),
        vec![(client.session.clone(), LockMode::Exclusive)]
    );
    assert_eq!(
        mine("k2"),
        vec![(client.session.clone(), LockMode::Exclusive)]
    );
    assert_eq!(mine("k3"), vec![(client.session.clone(), LockMode::Shared)]);
    assert_eq!(snapshot.keys.len(), 3, "k4 was not taken: {snapshot:?}");
    // A read of a fourth key is refused the same way; keys already held may be read.
    client
        .fails(json!({"command": "read", "keys": ["k4"]}), "too_many_locks")
        .await;
    client
        .ok(json!({"command": "read", "keys": ["k1", "k3"]}))
        .await;
    server.stop().await;
}
