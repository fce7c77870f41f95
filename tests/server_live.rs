//! The live view over the wire (README "Observe"): the WebSocket at `/live` pushes the busiest
//! keys with their holders and queues, the waits-for edges between them, the last deadlocks and
//! the headline numbers; the page at `/` is served under the same rules as `/ws`.

mod wire;

use futures_util::StreamExt;
use locksmith::auth::Secret;
use locksmith::server::ServerSettings;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use wire::{connect_with, connect_with_headers, http_get, settings, start, Client, Ws, BOUND};

/// Reads snapshots from a live socket until one satisfies `wanted` (within [`BOUND`]); returns it.
async fn snapshot_where(live: &mut Ws, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let found = tokio::time::timeout(BOUND, async {
        while let Some(frame) = live.next().await {
            if let Ok(Message::Text(text)) = frame {
                let snapshot: Value = serde_json::from_str(text.as_str()).expect("JSON");
                if wanted(&snapshot) {
                    return Some(snapshot);
                }
                last = snapshot;
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(snapshot)) => snapshot,
        _ => panic!("no snapshot where {what} within {BOUND:?}; the last was {last}"),
    }
}

async fn live(server: &wire::Server) -> Ws {
    connect_with(&format!("ws://{}/live", server.addr), None)
        .await
        .expect("the live socket opens")
}

async fn named(server: &wire::Server, name: &str) -> Client {
    let mut client = Client::connect(&format!("{}?name={name}", server.url())).await;
    client.learn_session().await;
    client
}

fn key<'a>(snapshot: &'a Value, name: &str) -> &'a Value {
    snapshot["keys"]
        .as_array()
        .and_then(|keys| keys.iter().find(|k| k["key"] == json!(name)))
        .unwrap_or(&Value::Null)
}

#[tokio::test]
async fn the_live_view_shows_holders_queues_edges_and_headline_numbers_as_they_change() {
    let server = start(settings()).await;
    let mut view = live(&server).await;
    let first = snapshot_where(&mut view, "anything", |_| true).await;
    assert_eq!(first["sessions"], json!(0), "{first}");
    assert_eq!(first["keys"], json!([]));

    let mut a = named(&server, "A").await;
    let mut b = named(&server, "B").await;
    a.lock(&["k1"], "write").await;
    b.lock(&["k2"], "read").await;
    b.send(json!({"command": "lock", "keys": ["k1"], "id": 1}))
        .await;
    server.wait_queued(&b.session, "k1").await;

    let snapshot = snapshot_where(&mut view, "B waits for A on k1", |s| {
        s["edges"] == json!([{"waiter": b.session, "holder": a.session, "key": "k1"}])
    })
    .await;
    assert!(snapshot["seq"].as_u64() > first["seq"].as_u64());
    assert_eq!(
        (
            &snapshot["sessions"],
            &snapshot["locks_held"],
            &snapshot["waiters"],
            &snapshot["keys_with_waiters"]
        ),
        (&json!(2), &json!(2), &json!(1), &json!(1))
    );
    // The waited-on key first, with its holder and its queue, names and modes.
    assert_eq!(snapshot["keys"][0]["key"], json!("k1"));
    let k1 = key(&snapshot, "k1");
    assert_eq!(k1["holders"][0]["session"], json!(a.session));
    assert_eq!(k1["holders"][0]["name"], json!("A"));
    assert_eq!(k1["holders"][0]["mode"], json!("write"));
    assert!(k1["holders"][0]["held_ms"].is_u64());
    assert_eq!(k1["waiters"][0]["name"], json!("B"));
    assert!(k1["waiters"][0]["waiting_ms"].is_u64());
    assert_eq!(key(&snapshot, "k2")["holders"][0]["mode"], json!("read"));
    assert_eq!(snapshot["more_keys"], json!(0));

    a.unlock(&["k1"]).await;
    assert_eq!(b.recv().await["id"], json!(1));
    let snapshot = snapshot_where(&mut view, "no edge left", |s| {
        s["edges"] == json!([]) && s["waiters"] == json!(0)
    })
    .await;
    assert_eq!(key(&snapshot, "k1")["holders"][0]["name"], json!("B"));
}

#[tokio::test]
async fn a_deadlock_shows_in_the_live_view_as_its_cycle_with_the_refused_request_as_victim() {
    let server = start(settings()).await;
    let mut view = live(&server).await;
    let mut a = named(&server, "A").await;
    let mut b = named(&server, "B").await;
    a.lock(&["k1"], "write").await;
    b.lock(&["k2"], "write").await;
    a.send(json!({"command": "lock", "keys": ["k2"], "id": 1}))
        .await;
    server.wait_queued(&a.session, "k2").await;
    b.fails(json!({"command": "lock", "keys": ["k1"]}), "deadlock")
        .await;

    let snapshot = snapshot_where(&mut view, "a deadlock", |s| {
        s["deadlocks_total"] == json!(1)
    })
    .await;
    let deadlock = &snapshot["deadlocks"][0];
    assert_eq!(deadlock["victim"], json!(b.session));
    assert_eq!(
        deadlock["cycle"],
        json!([
            {"session": b.session, "name": "B", "key": "k1"},
            {"session": a.session, "name": "A", "key": "k2"},
        ])
    );
    assert!(deadlock["at_ms"].as_u64() > Some(1_700_000_000_000));
}

#[tokio::test]
async fn the_live_view_lists_at_most_50_keys_and_counts_the_others() {
    let server = start(settings()).await;
    let mut holder = server.connect().await;
    let keys: Vec<String> = (0..120).map(|n| format!("k{n:03}")).collect();
    for chunk in keys.chunks(40) {
        holder.ok(json!({"command": "lock", "keys": chunk})).await;
    }
    let mut view = live(&server).await;
    let snapshot = snapshot_where(&mut view, "120 keys held", |s| {
        s["locks_held"] == json!(120)
    })
    .await;
    assert_eq!(snapshot["keys"].as_array().map(Vec::len), Some(50));
    assert_eq!(snapshot["more_keys"], json!(70));
}

#[tokio::test]
async fn the_page_is_served_with_its_assets_and_needs_the_token_when_one_is_set() {
    let server = start(settings()).await;
    let page = http_get(server.addr, "/").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("text/html"), "{page}");
    assert!(page.contains("<svg id=\"graph\""), "{page}");
    for (path, kind) in [("/live.js", "text/javascript"), ("/live.css", "text/css")] {
        let asset = http_get(server.addr, path).await;
        assert!(
            asset.starts_with("HTTP/1.1 200") && asset.contains(kind),
            "{asset}"
        );
    }

    const TOKEN: &str = "page-token-31";
    let guarded = start(ServerSettings {
        token: Some(TOKEN.parse::<Secret>().expect("a token")),
        ..settings()
    })
    .await;
    assert!(http_get(guarded.addr, "/")
        .await
        .starts_with("HTTP/1.1 401"));
    let page = http_get(guarded.addr, &format!("/?token={TOKEN}")).await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    // The script and style hold no data and need no token.
    assert!(http_get(guarded.addr, "/live.js")
        .await
        .starts_with("HTTP/1.1 200"));
    let refused = connect_with(&format!("ws://{}/live", guarded.addr), None).await;
    assert!(refused.is_err());
    let mut view = connect_with(&format!("ws://{}/live", guarded.addr), Some(TOKEN))
        .await
        .expect("with the token");
    snapshot_where(&mut view, "anything", |_| true).await;
}

#[tokio::test]
async fn the_pages_own_origin_may_open_the_sockets_and_a_foreign_or_rebound_one_may_not() {
    let server = start(settings()).await;
    let host = server.addr.to_string();
    let own = format!("http://{host}");
    for path in ["/live", "/ws"] {
        let url = format!("ws://{host}{path}");
        assert!(
            connect_with_headers(&url, &[("origin", &own)])
                .await
                .is_ok(),
            "the page's own origin on {path}"
        );
        let foreign = connect_with_headers(&url, &[("origin", "http://evil.example")]).await;
        assert_eq!(wire::refused_status(foreign), 403, "{path}");
        // DNS rebinding: a foreign page whose own name resolves to this server has the same
        // origin as the Host it sends. Only `localhost` and IP addresses count as the page's own.
        let rebound = connect_with_headers(
            &url,
            &[
                ("host", "evil.example:8008"),
                ("origin", "http://evil.example:8008"),
            ],
        )
        .await;
        assert_eq!(wire::refused_status(rebound), 403, "{path}");
    }
    let localhost = connect_with_headers(
        &format!("ws://{host}/live"),
        &[
            ("host", "localhost:8008"),
            ("origin", "http://localhost:8008"),
        ],
    )
    .await;
    assert!(localhost.is_ok());
}
