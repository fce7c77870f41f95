//! What the server writes to its log: never a token, never a resume secret, never a request URL,
//! and no flood of lines
//! when a client keeps sending requests without the right token.
//!
//! Each test installs a subscriber at TRACE level that writes into a buffer, for this thread only
//! (`tracing::subscriber::set_default`). `#[tokio::test]` runs on a current-thread runtime, so the
//! in-process server started inside the test logs through it; each test first checks that lines
//! it expects are there, so an assertion that something is absent cannot pass by capturing
//! nothing. Only `tracing` events are captured, not `log` records: the test's own WebSocket
//! client (tungstenite) logs its requests, token and all, through `log` at trace level.

mod wire;

use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use locksmith::auth::Secret;
use locksmith::server::ServerSettings;
use serde_json::json;
use tokio::time::Instant;
use tracing::subscriber::DefaultGuard;
use wire::{connect_with, http_get, refused_status, settings, start};

const TOKEN: &str = "tok-right-7f3a9c";
const ADMIN: &str = "tok-admin-52e1b8";
const WRONG_IN_HEADER: &str = "tok-wrong-header-c41d";
const WRONG_IN_QUERY: &str = "tok-wrong-query-9be0";

/// The line written for a request refused for its token.
const REFUSAL: &str = "refused a request without the right token";

/// Longest the flood test may take; it must last past the one-second log interval.
const PATIENCE: Duration = Duration::from_secs(60);

/// Settings with a client token and an admin token.
fn with_tokens() -> ServerSettings {
    let secret = |text: &str| Some(text.parse::<Secret>().expect("a token"));
    ServerSettings {
        token: secret(TOKEN),
        admin_token: secret(ADMIN),
        ..settings()
    }
}

/// What this thread's subscriber has written, until the guard is dropped.
struct Log {
    buffer: Arc<Mutex<Vec<u8>>>,
    _guard: DefaultGuard,
}

/// One handle on the buffer, given to the subscriber as its writer.
struct Writer(Arc<Mutex<Vec<u8>>>);

impl io::Write for Writer {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Log {
    /// Captures every event at every level on this thread from now on.
    fn capture() -> Log {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || Writer(writer.clone()))
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        Log {
            buffer,
            _guard: guard,
        }
    }

    /// Everything written so far.
    fn text(&self) -> String {
        let bytes = self.buffer.lock().unwrap_or_else(PoisonError::into_inner);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The lines about refused requests written so far.
    fn refusals(&self) -> Vec<String> {
        self.text()
            .lines()
            .filter(|line| line.contains(REFUSAL))
            .map(str::to_owned)
            .collect()
    }
}

/// The `suppressed=N` field of a log line (0 when absent).
fn suppressed(line: &str) -> u64 {
    line.split_once("suppressed=").map_or(0, |(_, rest)| {
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().expect("a count")
    })
}

#[tokio::test]
async fn tokens_and_request_urls_never_reach_the_log() {
    let log = Log::capture();
    let server = start(with_tokens()).await;
    let url = server.url();

    // Refused: a wrong token in the header and another in the query (this one is logged; the
    // rest fall within the same second), then each alone, then none at all.
    let both = connect_with(
        &format!("{url}?token={WRONG_IN_QUERY}"),
        Some(WRONG_IN_HEADER),
    )
    .await;
    assert_eq!(refused_status(both), 401);
    let query = connect_with(&format!("{url}?name=q&token={WRONG_IN_QUERY}"), None).await;
    assert_eq!(refused_status(query), 401);
    assert_eq!(
        refused_status(connect_with(&url, Some(WRONG_IN_HEADER)).await),
        401
    );
    assert_eq!(refused_status(connect_with(&url, None).await), 401);
    let elsewhere = http_get(server.addr, &format!("/elsewhere?token={WRONG_IN_QUERY}")).await;
    assert!(elsewhere.starts_with("HTTP/1.1 401"), "{elsewhere}");

    // Accepted: the token in the header (with a wrong one on the URL, which the header
    // overrides), the token on the URL, the admin token both ways.
    let mut by_header = server
        .connect_as(
            &format!("?name=by-header&token={WRONG_IN_QUERY}"),
            Some(TOKEN),
        )
        .await;
    let mut by_query = server
        .connect_as(&format!("?name=by-query&token={TOKEN}"), None)
        .await;
    let mut admin = server.connect_as("?name=admin", Some(ADMIN)).await;
    let mut admin_by_query = server.connect_as(&format!("?token={ADMIN}"), None).await;

    by_header.lock(&["k"], "write").await;
    by_query
        .ok(json!({"command": "write", "keys": ["v"], "values": [1]}))
        .await;
    by_query
        .fails(json!({"command": "dance"}), "unknown_command")
        .await;
    admin_by_query.ok(json!({"command": "sessions"})).await;
    // A resumable session: its secret goes out in `hello` and comes back in `resume`, once
    // wrong and once right, after a blip.
    let mut resumable = server.connect_as(&format!("?token={TOKEN}"), None).await;
    let resume_secret = resumable.ask_grace(10_000).await;
    let resumed_session = resumable.session.clone();
    drop(resumable);
    server.wait_suspended(&resumed_session).await;
    let mut back = server.connect_as(&format!("?token={TOKEN}"), None).await;
    let wrong_secret = "5ec7e75ec7e75ec7e75ec7e75ec7e7aa";
    back.fails(
        json!({"command": "resume", "session": resumed_session, "secret": wrong_secret}),
        "forbidden",
    )
    .await;
    back.ok(json!({"command": "resume", "session": resumed_session, "secret": resume_secret}))
        .await;
    back.close().await;
    admin
        .ok(json!({"command": "kill", "session": by_header.session}))
        .await;
    assert_eq!(by_header.close_code().await, Some(1008));
    by_query.close().await;
    admin_by_query.close().await;
    admin.close().await;
    server.stop().await;

    let text = log.text();
    // The capture works, at warn, info and debug.
    assert!(text.contains(REFUSAL), "{text}");
    assert!(
        text.contains("session killed by an administrator"),
        "{text}"
    );
    assert!(text.contains("connection opened"), "{text}");
    assert!(text.contains("connection closed"), "{text}");
    assert!(text.contains("resume refused: wrong secret"), "{text}");
    assert!(text.contains("session resumed"), "{text}");
    for secret in [
        TOKEN,
        ADMIN,
        WRONG_IN_HEADER,
        WRONG_IN_QUERY,
        &resume_secret,
        wrong_secret,
    ] {
        assert!(!text.contains(secret), "{secret} logged:\n{text}");
    }
    assert!(!text.contains("?token"), "a request URL logged:\n{text}");
    assert!(!text.contains("?name"), "a request URL logged:\n{text}");
    wire::assert_no_server_panics();
}

#[tokio::test]
async fn a_flood_of_refused_requests_writes_about_one_log_line_a_second_and_counts_the_rest() {
    // Story: every 401 was logged at warn, so one client with a wrong token wrote a log line per
    // request, as fast as it could send them.
    let log = Log::capture();
    let server = start(with_tokens()).await;
    let started = Instant::now();
    let mut sent = 0u64;
    // At least 1000 requests, then on until one writes a line that counts the ones left out
    // since the last line: then every request sent is accounted for.
    loop {
        assert!(
            started.elapsed() < PATIENCE,
            "no second refusal line after {sent} requests in {PATIENCE:?}"
        );
        let before = log.refusals().len();
        let path = format!("/ws?token={WRONG_IN_QUERY}");
        let response = http_get(server.addr, &path).await;
        assert!(response.starts_with("HTTP/1.1 401"), "{response}");
        sent += 1;
        let lines = log.refusals();
        assert!(
            lines.len() as u64 <= started.elapsed().as_secs() + 1,
            "{} lines for {sent} requests in {:?}",
            lines.len(),
            started.elapsed()
        );
        let wrote_a_count = lines.len() > before && lines.last().is_some_and(|l| suppressed(l) > 0);
        if sent >= 1000 && wrote_a_count {
            break;
        }
    }
    let elapsed = started.elapsed();
    server.stop().await;

    let lines = log.refusals();
    // One line per whole second elapsed, and one more for the first.
    let most = elapsed.as_secs() + 1;
    assert!(
        (2..=most).contains(&(lines.len() as u64)),
        "{} lines for {sent} requests in {elapsed:?}:\n{lines:#?}",
        lines.len()
    );
    let counted: u64 = lines.iter().map(|line| suppressed(line)).sum();
    assert_eq!(
        lines.len() as u64 + counted,
        sent,
        "every refusal is either logged or counted in a later line:\n{lines:#?}"
    );
    let text = log.text();
    assert!(!text.contains(WRONG_IN_QUERY), "a token logged:\n{text}");
    wire::assert_no_server_panics();
}
