//! The `blip` mix: what a network blip costs resumable sessions.
//!
//! `--clients` connections each ask for a grace period (`hello` with `grace_ms`) and lock a key
//! of their own. Then every socket is dropped at once without a close frame — to the server, a
//! network blip — and the generator waits, polling `sessions` on a control connection, until the
//! server shows them all suspended. Then every session reconnects and sends `resume`, at most
//! `--connect-concurrency` at a time, and checks it got its lock back with the same fencing
//! token. It prints the latency of a fresh connection (`connect` + `hello`) beside that of a
//! resume (`connect` + `resume`), the time to resume them all, and with `--server-pid` the
//! server's memory with the sessions connected and with them suspended.
//!
//! These connections are raw WebSockets, not [`locksmith::client::Client`]s: the library closes
//! politely (a close frame), which the server takes as a goodbye and answers by releasing.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::{print_latencies, print_rss, read_rss_kib, stall_limit, Args, Conn, Stats};

/// The grace every session asks for: longer than any run (the server may cap it).
const GRACE_MS: u64 = 30_000;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One raw connection and the time limit of each of its answers.
struct Raw {
    ws: Ws,
    stall: Duration,
}

impl Raw {
    async fn connect(url: &str, stall: Duration) -> Result<Raw, String> {
        match tokio::time::timeout(stall, tokio_tungstenite::connect_async(url)).await {
            Ok(Ok((ws, _))) => Ok(Raw { ws, stall }),
            Ok(Err(error)) => Err(format!("connect: {error}")),
            Err(_) => Err("connect: timed out".into()),
        }
    }

    /// Sends `request` and returns its successful answer.
    async fn ok(&mut self, request: Value) -> Result<Value, String> {
        let answer = tokio::time::timeout(self.stall, async {
            self.ws
                .send(Message::text(request.to_string()))
                .await
                .map_err(|e| format!("send: {e}"))?;
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Text(text))) => {
                        return serde_json::from_str::<Value>(text.as_str())
                            .map_err(|e| format!("an answer that is not JSON: {e}"))
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    other => return Err(format!("the connection ended: {other:?}")),
                }
            }
        })
        .await
        .map_err(|_| "no answer in time".to_owned())??;
        if answer["success"] == json!(true) {
            Ok(answer)
        } else {
            Err(format!("refused: {}", answer["code"]))
        }
    }
}

/// A session to resume: its id, its secret, its key and the token it holds the key under.
struct Held {
    session: String,
    secret: String,
    key: String,
    token: Value,
}

pub async fn blip(args: Arc<Args>) -> Result<(), String> {
    let stall = stall_limit(&args);
    let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let rss_start = args.server_pid.and_then(read_rss_kib);
    let mut stats = Stats::default();

    // Open: connect + hello (measured), then lock a key of its own.
    let mut tasks = JoinSet::new();
    for index in 0..args.clients {
        let (gate, args) = (gate.clone(), args.clone());
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await;
            let started = Instant::now();
            let mut raw = Raw::connect(&args.url, stall).await?;
            let hello = raw
                .ok(json!({"command": "hello", "grace_ms": GRACE_MS}))
                .await?;
            let opened = started.elapsed();
            let key = format!("{}blip-{index}", args.key_prefix);
            let granted = raw.ok(json!({"command": "lock", "keys": [key]})).await?;
            let held = Held {
                session: hello["session"].as_str().unwrap_or_default().to_owned(),
                secret: hello["resume_secret"]
                    .as_str()
                    .ok_or("the server gave no resume secret (too old, or --max-session-grace 0s)")?
                    .to_owned(),
                token: granted["tokens"][&key].clone(),
                key,
            };
            Ok::<_, String>((raw, held, opened))
        });
    }
    let mut open = Vec::with_capacity(args.clients);
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok((raw, held, opened))) => {
                stats.record("connect+hello", opened);
                open.push((raw, held));
            }
            Ok(Err(failure)) => stats.error(failure),
            Err(error) => stats.error(format!("client task failed: {error}")),
        }
    }
    let count = open.len();
    println!(
        "{count}/{} sessions opened, each holding one lock",
        args.clients
    );
    if count == 0 {
        crate::print_errors(&stats);
        return Err("no session could be opened".into());
    }
    let rss_connected = args.server_pid.and_then(read_rss_kib);
    print_rss(
        "with the sessions connected",
        rss_start,
        rss_connected,
        count,
    );

    // The blip: every socket dropped at once, without a close frame.
    let control = Conn::open(&args.url, stall)
        .await
        .map_err(|f| f.to_string())?;
    let dropped_at = Instant::now();
    let held: Vec<Held> = open.into_iter().map(|(_raw, held)| held).collect();
    let suspended = loop {
        let sessions = control
            .client
            .request(json!({"command": "sessions", "limit": 100_000}))
            .await
            .map_err(|e| format!("sessions: {e}"))?;
        let suspended = sessions["sessions"].as_array().map_or(0, |s| {
            s.iter()
                .filter(|s| s["state"] == json!("suspended"))
                .count()
        });
        if suspended >= count || dropped_at.elapsed() > stall {
            break suspended;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    println!(
        "{suspended}/{count} sessions suspended {:.1} ms after their sockets were dropped (polled every 5 ms)",
        dropped_at.elapsed().as_secs_f64() * 1e3
    );
    let rss_suspended = args.server_pid.and_then(read_rss_kib);
    print_rss(
        "with the sessions suspended",
        rss_start,
        rss_suspended,
        count,
    );

    // Resume every session at once (up to the connect concurrency).
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for held in held {
        let (gate, args) = (gate.clone(), args.clone());
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await;
            let started = Instant::now();
            let mut raw = Raw::connect(&args.url, stall).await?;
            let resumed = raw
                .ok(json!({"command": "resume", "session": held.session, "secret": held.secret}))
                .await?;
            let took = started.elapsed();
            if resumed["tokens"][&held.key] != held.token {
                return Err(format!(
                    "resume of {} did not give back {} with token {}: {resumed}",
                    held.session, held.key, held.token
                ));
            }
            Ok::<_, String>((raw, held.key, took))
        });
    }
    let mut resumed = Vec::with_capacity(count);
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok((raw, key, took))) => {
                stats.record("resume", took);
                resumed.push((raw, key));
            }
            Ok(Err(failure)) => stats.error(failure),
            Err(error) => stats.error(format!("client task failed: {error}")),
        }
    }
    println!(
        "{}/{count} sessions resumed with their lock and token in {:.1} ms",
        resumed.len(),
        started.elapsed().as_secs_f64() * 1e3
    );
    println!(
        "connect+hello = a fresh connection; resume = connect + resume of a suspended session"
    );
    print_latencies(&stats);
    crate::print_errors(&stats);

    // Clean up: unlock and close politely, which ends each session.
    let mut tasks = JoinSet::new();
    for (mut raw, key) in resumed {
        tasks.spawn(async move {
            let _ = raw.ok(json!({"command": "unlock", "keys": [key]})).await;
            let _ = tokio::time::timeout(raw.stall, raw.ws.close(None)).await;
        });
    }
    while tasks.join_next().await.is_some() {}
    control.close().await;
    Ok(())
}
