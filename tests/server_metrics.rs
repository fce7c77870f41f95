//! `/metrics`: after known activity the counters have exactly the values it implies and the
//! gauges describe the lock table as it stands; the route needs the token like `/ws`; refusals
//! are counted by reason; the durable store's commits and the suspensions are counted.

mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use locksmith::server::ServerSettings;
use locksmith::store::RedbStore;
use serde_json::json;
use wire::{http_get_with, settings, start, start_with_store, wait_until_async};

/// One scrape: the status, the content type and every sample, `name{labels}` → value.
struct Scrape {
    status: u16,
    content_type: String,
    text: String,
    samples: HashMap<String, f64>,
}

impl Scrape {
    /// The value of the sample `series` (`name` or `name{label="value",...}`, labels in the order
    /// the server writes them); panics if there is none.
    fn value(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("no sample {series} in\n{}", self.text))
    }

    /// Whether a `# HELP` line names `name`.
    fn has_help(&self, name: &str) -> bool {
        self.text
            .lines()
            .any(|line| line.starts_with(&format!("# HELP {name} ")))
    }
}

/// GETs `/metrics` (with `bearer` as the token) and parses the text format simply: one sample
/// per line that is not a comment, `series value`.
async fn scrape_with(addr: SocketAddr, bearer: Option<&str>) -> Scrape {
    let response = http_get_with(addr, "/metrics", bearer).await;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("an HTTP response: {response}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a status line: {head}"));
    let content_type = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_default();
    let samples = body
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect();
    Scrape {
        status,
        content_type,
        text: body.to_owned(),
        samples,
    }
}

async fn scrape(addr: SocketAddr) -> Scrape {
    scrape_with(addr, None).await
}

fn requests(command: &str, code: &str) -> String {
    format!("locksmith_requests_total{{command=\"{command}\",code=\"{code}\"}}")
}

#[tokio::test]
async fn counters_and_gauges_have_the_exact_values_the_activity_implies() {
    let server = start(settings()).await;
    // Each connect asks `session` once: 3 × session ok, 3 sessions opened.
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    let mut c = server.connect().await;
    // Two locks and an unlock.
    a.lock(&["k1"], "write").await;
    a.lock(&["k2"], "read").await;
    a.unlock(&["k2"]).await;
    // A try-lock that times out.
    b.fails(
        json!({"command": "lock", "keys": ["k1"], "timeout_ms": 0}),
        "timeout",
    )
    .await;
    // A deadlock: B holds k3, A waits for it, B asks for A's k1 and is refused.
    b.lock(&["k3"], "write").await;
    a.send(json!({"command": "lock", "keys": ["k3"], "id": "a-waits"}))
        .await;
    server.wait_queued(&a.session, "k3").await;
    b.fails(json!({"command": "lock", "keys": ["k1"]}), "deadlock")
        .await;
    // Bad requests: a known command with a missing field, no JSON, an unknown command.
    c.fails(json!({"command": "lock"}), "bad_request").await;
    c.send_text("not json").await;
    assert_eq!(c.recv().await["code"], json!("bad_request"));
    c.fails(json!({"command": "dance"}), "unknown_command")
        .await;

    let scraped = scrape(server.addr).await;
    assert_eq!(scraped.status, 200, "{}", scraped.text);
    assert_eq!(
        scraped.content_type,
        "text/plain; version=0.0.4; charset=utf-8"
    );
    for (series, expected) in [
        (requests("session", "ok"), 3.0),
        (requests("lock", "ok"), 3.0),
        (requests("unlock", "ok"), 1.0),
        (requests("lock", "timeout"), 1.0),
        (requests("lock", "deadlock"), 1.0),
        (requests("lock", "bad_request"), 1.0),
        (requests("invalid", "bad_request"), 1.0),
        (requests("invalid", "unknown_command"), 1.0),
        ("locksmith_grants_total".into(), 3.0),
        ("locksmith_deadlocks_total".into(), 1.0),
        ("locksmith_lock_timeouts_total".into(), 1.0),
        ("locksmith_cancellations_total".into(), 0.0),
        ("locksmith_sessions_opened_total".into(), 3.0),
        ("locksmith_sessions".into(), 3.0),
        ("locksmith_sessions_suspended".into(), 0.0),
        ("locksmith_locks_held{mode=\"write\"}".into(), 2.0),
        ("locksmith_locks_held{mode=\"read\"}".into(), 0.0),
        ("locksmith_waiting_requests".into(), 1.0),
        ("locksmith_keys_with_waiters".into(), 1.0),
        // Lock waits that ended: 3 grants, the timeout, the deadlock (A's is still waiting; the
        // bad request never reached the lock manager).
        ("locksmith_lock_wait_seconds_count".into(), 5.0),
        (
            "locksmith_request_duration_seconds_count{command=\"lock\"}".into(),
            6.0,
        ),
        (
            "locksmith_request_duration_seconds_bucket{command=\"lock\",le=\"+Inf\"}".into(),
            6.0,
        ),
    ] {
        assert_eq!(scraped.value(&series), expected, "{series}");
    }
    // A's request has waited since before the scrape.
    assert!(scraped.value("locksmith_longest_wait_seconds") > 0.0);
    // The A's lock request in flight is not counted yet: nothing with code ok beyond the three.
    assert!(!scraped.samples.contains_key(&requests("lock", "cancelled")));

    // A withdraws its wait: the waiter is gone, the cancellation counted.
    a.send(json!({"command": "cancel", "id": "c"})).await;
    assert_eq!(a.recv().await["code"], json!("cancelled"));
    assert_eq!(a.recv().await["cancelled"], json!(true));
    let scraped = scrape(server.addr).await;
    for (series, expected) in [
        (requests("lock", "cancelled"), 1.0),
        (requests("cancel", "ok"), 1.0),
        ("locksmith_cancellations_total".into(), 1.0),
        ("locksmith_waiting_requests".into(), 0.0),
        ("locksmith_keys_with_waiters".into(), 0.0),
        ("locksmith_longest_wait_seconds".into(), 0.0),
        ("locksmith_lock_wait_seconds_count".into(), 6.0),
    ] {
        assert_eq!(scraped.value(&series), expected, "{series}");
    }
    server.stop().await;
}

#[tokio::test]
async fn every_metric_has_help_text_and_histograms_have_buckets() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    a.lock(&["k"], "write").await;
    let scraped = scrape(server.addr).await;
    for name in [
        "locksmith_requests_total",
        "locksmith_request_duration_seconds",
        "locksmith_lock_wait_seconds",
        "locksmith_connections_refused_total",
        "locksmith_grants_total",
        "locksmith_deadlocks_total",
        "locksmith_lock_timeouts_total",
        "locksmith_cancellations_total",
        "locksmith_sessions_opened_total",
        "locksmith_sessions_suspended_total",
        "locksmith_sessions_resumed_total",
        "locksmith_sessions_expired_total",
        "locksmith_storage_errors_total",
        "locksmith_store_commits_total",
        "locksmith_store_commit_duration_seconds",
        "locksmith_store_commit_batch_size",
        "locksmith_sessions",
        "locksmith_sessions_suspended",
        "locksmith_locks_held",
        "locksmith_waiting_requests",
        "locksmith_keys_with_waiters",
        "locksmith_longest_wait_seconds",
    ] {
        assert!(
            scraped.has_help(name),
            "no HELP for {name} in\n{}",
            scraped.text
        );
    }
    // Cumulative buckets from 50 µs up, ending in +Inf with the count.
    let bucket = |le: &str| {
        scraped.value(&format!(
            "locksmith_request_duration_seconds_bucket{{command=\"lock\",le=\"{le}\"}}"
        ))
    };
    assert!(bucket("5e-05") <= bucket("0.001"), "{}", scraped.text);
    assert!(bucket("0.001") <= bucket("+Inf"));
    assert_eq!(bucket("+Inf"), 1.0);
    assert_eq!(
        scraped.value("locksmith_lock_wait_seconds_bucket{le=\"30\"}"),
        1.0
    );
    assert_eq!(
        scraped.value("locksmith_store_commit_batch_size_bucket{le=\"4096\"}"),
        0.0
    );
    // Every refusal reason is listed, at zero so far.
    for reason in [
        "busy",
        "unauthorized",
        "origin",
        "handshake_timeout",
        "out_of_descriptors",
    ] {
        assert_eq!(
            scraped.value(&format!(
                "locksmith_connections_refused_total{{reason=\"{reason}\"}}"
            )),
            0.0
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn metrics_need_the_token_when_one_is_set() {
    let server = start(ServerSettings {
        token: Some("s3cret".parse().expect("token")),
        ..settings()
    })
    .await;
    let refused = scrape(server.addr).await;
    assert_eq!(refused.status, 401);
    let wrong = scrape_with(server.addr, Some("guess")).await;
    assert_eq!(wrong.status, 401);
    let scraped = scrape_with(server.addr, Some("s3cret")).await;
    assert_eq!(scraped.status, 200);
    assert_eq!(
        scraped.value("locksmith_connections_refused_total{reason=\"unauthorized\"}"),
        2.0
    );
    server.stop().await;
}

#[tokio::test]
async fn refused_connections_are_counted_by_reason() {
    let server = start(ServerSettings {
        max_connections: 1,
        handshake_timeout: Some(Duration::from_millis(500)),
        ..settings()
    })
    .await;
    // A foreign Origin.
    let refused = wire::connect_with_origin(&server.url(), "https://evil.example").await;
    assert_eq!(wire::refused_status(refused), 403);
    // Over --max-connections: one server_busy answer.
    let mut first = server.connect().await;
    let mut second = wire::Client::connect(&server.url()).await;
    assert_eq!(second.recv().await["code"], json!("server_busy"));
    drop(second);
    first.ping().await;
    // A TCP connection that never sends its request. (A connection above that lingers past the
    // deadline would be counted too, hence "at least".)
    let silent = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let addr = server.addr;
    wait_until_async("the handshake timeout counted", || async move {
        let scraped = scrape(addr).await;
        scraped.value("locksmith_connections_refused_total{reason=\"handshake_timeout\"}") >= 1.0
    })
    .await;
    drop(silent);
    let scraped = scrape(server.addr).await;
    for (reason, expected) in [("origin", 1.0), ("busy", 1.0), ("unauthorized", 0.0)] {
        assert_eq!(
            scraped.value(&format!(
                "locksmith_connections_refused_total{{reason=\"{reason}\"}}"
            )),
            expected,
            "{reason}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn the_durable_stores_commits_are_counted_with_their_batch_sizes() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = Arc::new(RedbStore::open(dir.path()).expect("open the store"));
    let server = start_with_store(settings(), store).await;
    let mut a = server.connect().await;
    a.ok(json!({"command": "write", "keys": ["x"], "values": [1]}))
        .await;
    a.ok(json!({"command": "delete", "keys": ["x"]})).await;
    let scraped = scrape(server.addr).await;
    for (series, expected) in [
        ("locksmith_store_commits_total", 2.0),
        ("locksmith_storage_errors_total", 0.0),
        ("locksmith_store_commit_duration_seconds_count", 2.0),
        // One write per commit: the two requests came one after the other.
        ("locksmith_store_commit_batch_size_count", 2.0),
        ("locksmith_store_commit_batch_size_sum", 2.0),
        ("locksmith_store_commit_batch_size_bucket{le=\"1\"}", 2.0),
    ] {
        assert_eq!(scraped.value(series), expected, "{series}");
    }
    server.stop().await;
}

#[tokio::test]
async fn suspended_and_resumed_sessions_are_counted() {
    let server = start(settings()).await;
    let mut a = server.connect().await;
    let secret = a.ask_grace(60_000).await;
    a.lock(&["k"], "write").await;
    let session = a.session.clone();
    drop(a);
    server.wait_suspended(&session).await;
    let scraped = scrape(server.addr).await;
    for (series, expected) in [
        ("locksmith_sessions_suspended", 1.0),
        ("locksmith_sessions_suspended_total", 1.0),
        ("locksmith_sessions_resumed_total", 0.0),
        ("locksmith_locks_held{mode=\"write\"}", 1.0),
    ] {
        assert_eq!(scraped.value(series), expected, "{series}");
    }
    let mut back = server.connect().await;
    assert_eq!(back.resume(&session, &secret).await["success"], json!(true));
    let scraped = scrape(server.addr).await;
    for (series, expected) in [
        ("locksmith_sessions_suspended", 0.0),
        ("locksmith_sessions_resumed_total", 1.0),
        ("locksmith_sessions_expired_total", 0.0),
        (requests("resume", "ok").as_str(), 1.0),
        // Two connections, one session each; the second's own session went at the resume.
        ("locksmith_sessions_opened_total", 2.0),
        ("locksmith_sessions", 1.0),
    ] {
        assert_eq!(scraped.value(series), expected, "{series}");
    }
    server.stop().await;
}
