//! Over the wire: deadlocks are answered `deadlock` with the whole cycle, the victim keeps what it
//! held, and once the victim lets go the survivor's request completes. Try-locks never deadlock.

mod wire;

use std::time::Duration;

use locksmith::lock::LockMode;
use serde_json::{json, Value};
use wire::{holders, settings, start, Client};

/// `(session, waiting_for_key)` pairs of a deadlock answer's cycle, in order.
fn cycle(answer: &Value) -> Vec<(String, String)> {
    answer["cycle"]
        .as_array()
        .unwrap_or_else(|| panic!("a deadlock answer carries a cycle: {answer}"))
        .iter()
        .map(|m| {
            (
                m["session"].as_str().expect("session").to_owned(),
                m["waiting_for_key"].as_str().expect("key").to_owned(),
            )
        })
        .collect()
}

fn member(client: &Client, key: &str) -> (String, String) {
    (client.session.clone(), key.to_owned())
}

#[tokio::test]
async fn two_sessions_crossing_two_keys_deadlock_and_the_survivor_completes() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    a.lock(&["k1"], "write").await;
    b.lock(&["k2"], "write").await;
    a.send(json!({"command": "lock", "keys": ["k2"], "id": "a"}))
        .await;
    server.wait_queued(&a.session, "k2").await;

    let answer = b
        .fails(
            json!({"command": "lock", "keys": ["k1"], "id": "b"}),
            "deadlock",
        )
        .await;
    assert_eq!(answer["id"], json!("b"));
    assert_eq!(
        cycle(&answer),
        vec![member(&b, "k1"), member(&a, "k2")],
        "the cycle starts with the requester: {answer}"
    );
    // The victim keeps what it held; the survivor is still waiting.
    let snapshot = server.snapshot();
    assert_eq!(
        holders(&snapshot, "k2"),
        vec![(b.session.clone(), LockMode::Exclusive)]
    );
    assert!(wire::queued(&snapshot, &a.session, "k2"));

    b.unlock(&["k2"]).await;
    let granted = a.recv().await;
    assert_eq!(granted["success"], json!(true), "{granted}");
    assert_eq!(granted["id"], json!("a"));
    assert!(granted["tokens"]["k2"].is_u64(), "{granted}");
    server.stop().await;
}

#[tokio::test]
async fn two_readers_both_upgrading_deadlock_and_the_survivor_upgrades() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    a.lock(&["k"], "read").await;
    b.lock(&["k"], "read").await;
    a.send(json!({"command": "lock", "keys": ["k"], "mode": "write"}))
        .await;
    server.wait_queued(&a.session, "k").await;

    let answer = b
        .fails(
            json!({"command": "write", "keys": ["k"], "values": ["b"]}),
            "deadlock",
        )
        .await;
    assert_eq!(cycle(&answer), vec![member(&b, "k"), member(&a, "k")]);
    // The victim still holds its shared lock (a failed upgrade leaves it as it was).
    let snapshot = server.snapshot();
    let mut shared = holders(&snapshot, "k");
    shared.sort();
    let mut expected = vec![
        (a.session.clone(), LockMode::Shared),
        (b.session.clone(), LockMode::Shared),
    ];
    expected.sort();
    assert_eq!(shared, expected);

    b.unlock(&["k"]).await;
    let granted = a.recv().await;
    assert_eq!(granted["success"], json!(true), "{granted}");
    assert_eq!(
        holders(&server.snapshot(), "k"),
        vec![(a.session.clone(), LockMode::Exclusive)]
    );
    // Nothing was written by the refused write.
    let read = a.ok(json!({"command": "read", "keys": ["k"]})).await;
    assert_eq!(read["values"], json!({"k": null}));
    server.stop().await;
}

/// The trap: C's shared request on k1 is compatible with A's shared lock, yet C waits behind B's
/// queued exclusive request (FIFO). A detector that only looked at holders would miss the cycle
/// A -> C -> B -> A.
#[tokio::test]
async fn a_reader_queued_behind_a_writer_closes_a_cycle_through_the_queue() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    let mut c = server.connect().await;
    a.lock(&["k1"], "read").await;
    b.send(json!({"command": "lock", "keys": ["k1"], "mode": "write", "id": "b"}))
        .await;
    server.wait_queued(&b.session, "k1").await;
    c.lock(&["k2"], "write").await;
    c.send(json!({"command": "lock", "keys": ["k1"], "mode": "read", "id": "c"}))
        .await;
    server.wait_queued(&c.session, "k1").await;

    let answer = a
        .fails(
            json!({"command": "lock", "keys": ["k2"], "mode": "read"}),
            "deadlock",
        )
        .await;
    assert_eq!(
        cycle(&answer),
        vec![member(&a, "k2"), member(&c, "k1"), member(&b, "k1")],
        "{answer}"
    );

    // The victim lets go: B gets k1, then (after B) C gets its shared lock.
    a.unlock(&["k1"]).await;
    let granted_b = b.recv().await;
    assert_eq!(granted_b["id"], json!("b"));
    assert_eq!(granted_b["success"], json!(true), "{granted_b}");
    assert!(wire::queued(&server.snapshot(), &c.session, "k1"));
    b.unlock(&["k1"]).await;
    let granted_c = c.recv().await;
    assert_eq!(granted_c["id"], json!("c"));
    assert_eq!(granted_c["success"], json!(true), "{granted_c}");
    server.stop().await;
}

#[tokio::test]
async fn a_try_lock_that_would_close_a_cycle_answers_timeout_at_once_not_deadlock() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    a.lock(&["k1"], "write").await;
    b.lock(&["k2"], "write").await;
    a.send(json!({"command": "lock", "keys": ["k2"]})).await;
    server.wait_queued(&a.session, "k2").await;

    // The server's default lock timeout is a minute: only an immediate answer passes.
    for request in [
        json!({"command": "lock", "keys": ["k1"], "timeout_ms": 0}),
        json!({"command": "read", "keys": ["k1"], "timeout_ms": 0}),
        json!({"command": "write", "keys": ["k1"], "values": [1], "timeout_ms": 0}),
    ] {
        b.send(request.clone()).await;
        let answer = b.recv_within(Duration::from_secs(5)).await;
        assert_eq!(answer["code"], json!("timeout"), "{request} -> {answer}");
        assert_eq!(answer["key"], json!("k1"), "{answer}");
    }
    // Nothing changed: b holds k2, a still waits for it.
    let snapshot = server.snapshot();
    assert_eq!(
        holders(&snapshot, "k2"),
        vec![(b.session.clone(), LockMode::Exclusive)]
    );
    assert!(wire::queued(&snapshot, &a.session, "k2"));
    b.unlock(&["k2"]).await;
    assert_eq!(a.recv().await["success"], json!(true));
    server.stop().await;
}

#[tokio::test]
async fn a_deadlocked_session_may_go_on_and_every_lock_is_released_at_the_end() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    a.lock(&["k1"], "write").await;
    b.lock(&["k2"], "write").await;
    a.send(json!({"command": "lock", "keys": ["k2"]})).await;
    server.wait_queued(&a.session, "k2").await;
    b.fails(json!({"command": "lock", "keys": ["k1"]}), "deadlock")
        .await;
    // The victim's connection stays open and usable.
    b.ping().await;
    b.ok(json!({"command": "write", "keys": ["other"], "value": 1}))
        .await;
    b.unlock(&["k2"]).await;
    assert_eq!(a.recv().await["success"], json!(true));
    a.unlock(&["k1", "k2"]).await;
    assert!(server.snapshot().is_empty(), "{:?}", server.snapshot());
    server.stop().await;
}
