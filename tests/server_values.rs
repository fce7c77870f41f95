//! Over the wire: removing values (`delete`) and listing them (`keys`).

mod wire;

use serde_json::{json, Value};
use wire::{holders, settings, start};

#[tokio::test]
async fn delete_removes_the_keys_and_counts_those_that_had_a_value() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    a.ok(json!({"command": "write", "keys": ["a", "b"], "values": [1, 2]}))
        .await;
    let deleted = a
        .ok(json!({"command": "delete", "keys": ["a", "never"], "id": 7}))
        .await;
    assert_eq!(deleted["deleted"], json!(1), "{deleted}");
    assert_eq!(deleted["id"], json!(7));
    let tokens = deleted["tokens"].as_object().expect("tokens");
    assert!(
        tokens["a"].is_u64() && tokens["never"].is_u64(),
        "{deleted}"
    );

    let mut b = server.connect().await;
    let read = b.ok(json!({"command": "read", "keys": ["a", "b"]})).await;
    assert_eq!(read["values"], json!({"a": null, "b": 2}));
    let again = b.ok(json!({"command": "delete", "keys": ["a"]})).await;
    assert_eq!(again["deleted"], json!(0));
    assert!(server.snapshot().is_empty(), "delete gave its locks back");
    server.stop().await;
}

#[tokio::test]
async fn delete_takes_exclusive_locks_and_gives_back_only_what_it_took_unless_hold_lock() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    // A holds r shared: the delete upgrades it, and afterwards r is shared again.
    a.lock(&["r"], "read").await;
    a.ok(json!({"command": "delete", "keys": ["r", "x"]})).await;
    let snapshot = server.snapshot();
    assert_eq!(
        holders(&snapshot, "r"),
        vec![(a.session.clone(), locksmith::lock::LockMode::Shared)]
    );
    assert!(holders(&snapshot, "x").is_empty(), "{snapshot:?}");

    a.ok(json!({"command": "delete", "keys": ["y"], "hold_lock": true}))
        .await;
    assert_eq!(
        holders(&server.snapshot(), "y"),
        vec![(a.session.clone(), locksmith::lock::LockMode::Exclusive)]
    );
    // A delete waits for the exclusive lock like a write does.
    b.fails(
        json!({"command": "delete", "keys": ["y"], "timeout_ms": 0}),
        "timeout",
    )
    .await;
    server.stop().await;
}

#[tokio::test]
async fn keys_pages_through_the_keys_that_have_a_value_in_byte_order() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    let names = [
        "job/e", "job/a", "job/c", "job/b", "job/d", "jobs", "other", "job/gone",
    ];
    for name in names {
        a.ok(json!({"command": "write", "keys": [name], "value": 1}))
            .await;
    }
    a.ok(json!({"command": "delete", "keys": ["job/gone"]}))
        .await;

    let page = |prefix: &str, after: Value, limit: u64| json!({"command": "keys", "prefix": prefix, "after": after, "limit": limit});
    let first = a.ok(page("job/", Value::Null, 2)).await;
    assert_eq!(first["keys"], json!(["job/a", "job/b"]));
    assert_eq!(first["next"], json!("job/b"));
    let second = a.ok(page("job/", first["next"].clone(), 2)).await;
    assert_eq!(second["keys"], json!(["job/c", "job/d"]));
    let last = a.ok(page("job/", second["next"].clone(), 2)).await;
    assert_eq!(last["keys"], json!(["job/e"]));
    assert_eq!(last["next"], Value::Null, "no more keys: {last}");

    let exact = a.ok(page("job/", json!("job/b"), 3)).await;
    assert_eq!(exact["keys"], json!(["job/c", "job/d", "job/e"]));
    assert_eq!(exact["next"], Value::Null, "{exact}");

    let all = a.ok(json!({"command": "keys"})).await;
    assert_eq!(
        all["keys"],
        json!(["job/a", "job/b", "job/c", "job/d", "job/e", "jobs", "other"])
    );
    assert_eq!(all["next"], Value::Null);
    assert!(server.snapshot().is_empty(), "keys takes no locks");
    server.stop().await;
}

#[tokio::test]
async fn keys_with_a_limit_over_ten_thousand_or_of_zero_is_a_bad_request() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    a.fails(json!({"command": "keys", "limit": 10_001}), "bad_request")
        .await;
    a.fails(json!({"command": "keys", "limit": 0}), "bad_request")
        .await;
    a.fails(json!({"command": "keys", "prefix": ["x"]}), "bad_request")
        .await;
    a.ok(json!({"command": "keys", "limit": 10_000})).await;
    server.stop().await;
}

#[tokio::test]
async fn a_write_without_values_says_which_fields_it_takes() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    let answer = a
        .fails(json!({"command": "write", "keys": ["k"]}), "bad_request")
        .await;
    assert_eq!(
        answer["error"],
        json!("bad request: missing field `values` (or `value`)")
    );
    server.stop().await;
}
