//! Over the wire: `cancel` withdraws the session's lock wait as soon as its frame arrives, and
//! the answers keep their order: the withdrawn request's `cancelled`, then the cancel's own
//! answer, then the requests queued behind.

mod wire;

use std::sync::Arc;

use serde_json::{json, Value};
use wire::{settings, start, Client};

#[tokio::test]
async fn cancel_withdraws_the_waiting_request_which_is_answered_cancelled_and_then_the_cancel() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    a.lock(&["k2"], "write").await;
    // B takes k1, then waits for k2.
    b.send(json!({"command": "lock", "keys": ["k1", "k2"], "id": 1}))
        .await;
    server.wait_queued(&b.session, "k2").await;

    b.send(json!({"command": "cancel", "id": 9})).await;
    let withdrawn = b.recv().await;
    assert_eq!(withdrawn["code"], json!("cancelled"), "{withdrawn}");
    assert_eq!(withdrawn["id"], json!(1));
    let cancel = b.recv().await;
    assert_eq!(cancel, json!({"success": true, "cancelled": true, "id": 9}));
    // Withdrawn whole: k1, which the request had taken, is free again.
    let snapshot = server.snapshot();
    assert!(!wire::mentions(&snapshot, &b.session), "{snapshot:?}");
    b.ping().await;
    server.stop().await;
}

#[tokio::test]
async fn the_cancels_answer_comes_ahead_of_requests_queued_behind_the_withdrawn_one_which_then_run()
{
    let server = start(settings()).await;
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    a.lock(&["k"], "write").await;
    b.send(json!({"command": "lock", "keys": ["k"], "id": 1}))
        .await;
    server.wait_queued(&b.session, "k").await;
    b.send(json!({"command": "ping", "id": 2})).await;
    b.send(json!({"command": "write", "keys": ["other"], "value": 5, "id": 3}))
        .await;
    b.send(json!({"command": "cancel", "id": 4})).await;

    let ids: Vec<Value> = collect(&mut b, 4)
        .await
        .iter()
        .map(|a| a["id"].clone())
        .collect();
    assert_eq!(ids, vec![json!(1), json!(4), json!(2), json!(3)]);
    let read = b.ok(json!({"command": "read", "keys": ["other"]})).await;
    assert_eq!(read["values"], json!({"other": 5}), "the queued write ran");
    server.stop().await;
}

#[tokio::test]
async fn a_cancel_with_nothing_waiting_answers_false_in_turn() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    a.lock(&["k"], "write").await;
    let idle = a.request(json!({"command": "cancel", "id": "c"})).await;
    assert_eq!(
        idle,
        json!({"success": true, "cancelled": false, "id": "c"})
    );
    // A held lock is not a wait: cancel leaves it alone.
    assert!(wire::mentions(&server.snapshot(), &a.session));
    // Behind a request that does not wait (here a pipelined ping), the cancel comes in turn.
    a.send(json!({"command": "ping", "id": 1})).await;
    a.send(json!({"command": "cancel", "id": 2})).await;
    let answers = collect(&mut a, 2).await;
    assert_eq!(answers[0], json!({"success": true, "id": 1}));
    assert_eq!(
        answers[1],
        json!({"success": true, "cancelled": false, "id": 2})
    );
    server.stop().await;
}

#[tokio::test]
async fn a_write_past_its_lock_wait_is_not_withdrawn() {
    let store = wire::GatedStore::new();
    let gate = Arc::clone(&store.gate);
    let entered = Arc::clone(&store.entered);
    let server = wire::start_with_store(settings(), Arc::new(store)).await;
    let mut a = server.connect().await;
    a.send(json!({"command": "write", "keys": ["k"], "value": 1, "id": 1}))
        .await;
    // The write holds its lock while it waits inside the store's commit.
    wire::wait_until("the write reached the store", || {
        entered.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    a.send(json!({"command": "cancel", "id": 2})).await;
    gate.add_permits(1);
    let answers = collect(&mut a, 2).await;
    assert_eq!(answers[0]["success"], json!(true), "{answers:?}");
    assert_eq!(
        answers[1],
        json!({"success": true, "cancelled": false, "id": 2})
    );
    server.stop().await;
}

async fn collect(client: &mut Client, n: usize) -> Vec<Value> {
    let mut answers = Vec::with_capacity(n);
    for _ in 0..n {
        answers.push(client.recv().await);
    }
    answers
}
