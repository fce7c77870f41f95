//! What a `locks` request costs on a big lock table, and what a client polling it does to the
//! others (issue 8).
//!
//! - [`Holder`]: before a run, `--held-keys` keys (`<prefix>held/0`, …; never a key of the
//!   request mixes, which are `<prefix>k<n>`) are locked in batches of [`HELD_BATCH`] keys per
//!   `lock` request, on as many connections as a session may hold them on, and kept until the
//!   run ends: the table the `locks` answers list.
//! - The `locks` mix ([`locks_mix`]): one connection sends `locks` (`"prefix"`: `--key-prefix`,
//!   `"limit"`: `--locks-limit`) back to back. It prints the answers per second, their size in
//!   bytes, their latency, and with `--server-pid` the server's CPU time (utime + stime, all
//!   threads) over the measured window divided by the answers.
//! - The poller ([`Poller`]): with `--poll-locks RATE`, a request mix gets one more connection
//!   that sends the same `locks` request RATE times a second (a tokio interval that delays
//!   missed ticks, so a slow answer never causes a burst) while the clients run.
//!
//! Every answer is checked: it must parse as a lock table and list the keys the holder keeps
//! (all of them, or `--locks-limit` and a `more` for the rest); anything else ends the run with
//! an error, since the figures would not be about the table the run claims.
//!
//! The `locks` connections are raw WebSockets, not [`locksmith::client::Client`]s: the size in
//! bytes is that of the frame the server sent, and the latency ends when the frame has arrived,
//! before the generator parses it (parsing a multi-megabyte answer is the generator's cost, not
//! the server's).
//! That parse still takes CPU (a 10,000-key answer is about 1.7 MB): on a machine where the
//! generator and the server share the cores, it is CPU the other clients of the generator do
//! not get, which a `--poll-locks` A/B should keep in mind.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use locksmith::client::LockTableView;
use locksmith::lock::LockMode::Exclusive;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::{
    check_lock_table, close_all, print_errors, print_latencies, read_cpu_time, stall_limit, Args,
    Conn, Stats, Window,
};

/// Keys held when the `locks` mix is run without `--held-keys`: issue 8's big table.
pub const DEFAULT_HELD_KEYS: usize = 10_000;

/// Keys per `lock` request of the holder: under the server's default `--max-keys-per-request`
/// (1024).
pub const HELD_BATCH: usize = 1000;

/// Keys one holder session takes: the server's default `--max-locks-per-session`.
const HELD_PER_SESSION: usize = 100_000;

/// The `i`th key the holder keeps.
pub fn held_key(prefix: &str, i: usize) -> String {
    format!("{prefix}held/{i}")
}

/// The connections that keep the `--held-keys` keys locked for the run.
pub struct Holder {
    /// Each connection with the keys it holds (released by [`Holder::release`]).
    sessions: Vec<(Conn, Vec<String>)>,
}

impl Holder {
    /// Locks `count` keys under `args.key_prefix` (as try-locks: a key someone else holds fails
    /// the run at once instead of waiting).
    ///
    /// # Errors
    /// A sentence naming the connection or the `lock` request that failed.
    pub async fn take(args: &Args, count: usize) -> Result<Holder, String> {
        let started = Instant::now();
        let mut holder = Holder {
            sessions: Vec::new(),
        };
        let mut requests = 0usize;
        for first in (0..count).step_by(HELD_PER_SESSION) {
            let conn = match Conn::open(&args.url, stall_limit(args)).await {
                Ok(conn) => conn,
                Err(failure) => {
                    holder.release().await;
                    return Err(format!("the holder cannot connect: {failure}"));
                }
            };
            let last = count.min(first + HELD_PER_SESSION);
            let keys: Vec<String> = (first..last)
                .map(|i| held_key(&args.key_prefix, i))
                .collect();
            holder.sessions.push((conn, Vec::with_capacity(keys.len())));
            for batch in keys.chunks(HELD_BATCH) {
                let Some((conn, held)) = holder.sessions.last_mut() else {
                    break;
                };
                let locked = conn
                    .ok(
                        "the holder's lock",
                        conn.client.lock(batch, Exclusive, Some(Duration::ZERO)),
                    )
                    .await;
                if let Err(failure) = locked {
                    let at = batch.first().map_or("", String::as_str);
                    holder.release().await;
                    return Err(format!(
                        "the holder cannot lock {} keys from {at:?}: {failure} (is a key under \
                         the prefix held by someone else, or is --max-locks-per-session or \
                         --max-keys-per-request lower than the defaults?)",
                        batch.len()
                    ));
                }
                held.extend_from_slice(batch);
                requests += 1;
            }
        }
        println!(
            "holding {count} keys ({:?}…) on {} connection(s), taken by {requests} lock \
             requests of at most {HELD_BATCH} keys in {:.2}s",
            held_key(&args.key_prefix, 0),
            holder.sessions.len(),
            started.elapsed().as_secs_f64()
        );
        Ok(holder)
    }

    /// Unlocks every held key (so the table is empty when the run checks it), then closes the
    /// connections. A failed unlock is reported; closing releases the keys anyway.
    pub async fn release(self) {
        let mut conns = Vec::with_capacity(self.sessions.len());
        for (conn, held) in self.sessions {
            for batch in held.chunks(HELD_BATCH) {
                if let Err(failure) = conn
                    .ok("the holder's unlock", conn.client.unlock(batch))
                    .await
                {
                    eprintln!("warning: {failure}; closing the holder's connection instead");
                    break;
                }
            }
            conns.push(conn);
        }
        close_all(conns).await;
    }
}

/// What a `locks` answer must list for the run to mean what it says.
#[derive(Clone, Copy, Debug)]
pub struct Expect {
    /// Keys the holder keeps (all match the prefix).
    held: usize,
    /// Keys held by others under the prefix at most (the request mix's clients: one each).
    others: usize,
    /// The request's `limit`.
    limit: usize,
}

impl Expect {
    /// Checks one answer: the keys listed and `more` must add up to the held keys (plus at most
    /// `others`), and as many must be listed as the limit allows.
    fn check(&self, table: &LockTableView) -> Result<(), String> {
        let listed = table.locks.len();
        let total = u64::try_from(listed).unwrap_or(u64::MAX) + table.more;
        let (low, high) = (self.held, self.held + self.others);
        let in_range = (low as u64..=high as u64).contains(&total);
        if !in_range || listed < self.limit.min(low) || listed > self.limit {
            return Err(format!(
                "a `locks` answer listed {listed} keys with more = {}, expected {} listed and \
                 {low}..={high} in all (limit {})",
                table.more,
                self.limit.min(low),
                self.limit
            ));
        }
        Ok(())
    }
}

/// The poller parses and checks the first answer and one in this many after it.
const POLL_CHECK_EVERY: u32 = 20;

/// How every successful `locks` answer begins (the server writes `success` first).
const LOCKS_ANSWER_START: &str = r#"{"success":true,"locks":["#;

/// One `locks` answer, as received.
struct Answer {
    /// Size of the answer frame in bytes.
    bytes: usize,
    /// From sending the request to receiving the whole answer frame.
    elapsed: Duration,
    /// Keys listed (`None`: the answer was not parsed).
    listed: Option<usize>,
}

/// A raw WebSocket that sends one fixed `locks` request.
struct LocksConn {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The request, encoded once.
    request: String,
    /// How long an answer may take.
    stall: Duration,
    /// What every answer must list.
    expect: Expect,
}

impl LocksConn {
    async fn open(args: &Args, expect: Expect) -> Result<LocksConn, String> {
        let stall = stall_limit(args);
        let (ws, _) = tokio::time::timeout(stall, tokio_tungstenite::connect_async(&args.url))
            .await
            .map_err(|_| "the `locks` connection: connect timed out".to_owned())?
            .map_err(|e| format!("the `locks` connection: connect: {e}"))?;
        let request = json!({"command": "locks", "prefix": args.key_prefix, "limit": expect.limit})
            .to_string();
        Ok(LocksConn {
            ws,
            request,
            stall,
            expect,
        })
    }

    /// Sends the request, times its answer, then parses and checks it.
    async fn ask(&mut self) -> Result<Answer, String> {
        self.ask_checking(true).await
    }

    /// Sends the request and times its answer; with `check`, parses and checks it as [`ask`]
    /// does, otherwise only that it is a successful `locks` answer (its opening bytes). The
    /// poller checks one answer in [`POLL_CHECK_EVERY`]: parsing a 170 KB answer 100 times a
    /// second would take the generator a tenth of a core, from the cores the server shares.
    async fn ask_checking(&mut self, check: bool) -> Result<Answer, String> {
        let sent = Instant::now();
        let text = tokio::time::timeout(self.stall, async {
            self.ws
                .send(Message::text(self.request.as_str()))
                .await
                .map_err(|e| format!("the `locks` connection: send: {e}"))?;
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Text(text))) => return Ok(text),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    other => return Err(format!("the `locks` connection ended: {other:?}")),
                }
            }
        })
        .await
        .map_err(|_| "no `locks` answer within the stall limit".to_owned())??;
        let elapsed = sent.elapsed();
        if !check && text.as_str().starts_with(LOCKS_ANSWER_START) {
            return Ok(Answer {
                bytes: text.len(),
                elapsed,
                listed: None,
            });
        }
        let answer: Value = serde_json::from_str(text.as_str())
            .map_err(|e| format!("a `locks` answer that is not JSON: {e}"))?;
        if answer.get("success") != Some(&Value::Bool(true)) {
            return Err(format!(
                "`locks` refused: {} {}",
                answer["code"], answer["error"]
            ));
        }
        let table: LockTableView = serde_json::from_value(answer)
            .map_err(|e| format!("a `locks` answer that is not a lock table: {e}"))?;
        self.expect.check(&table)?;
        Ok(Answer {
            bytes: text.len(),
            elapsed,
            listed: Some(table.locks.len()),
        })
    }

    async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.ws.close(None)).await;
    }
}

/// Sizes of the answers seen (they vary while other clients lock and unlock).
#[derive(Default)]
struct Sizes {
    /// Smallest and largest answer in bytes.
    bytes: Option<(usize, usize)>,
    /// Smallest and largest number of keys listed.
    listed: Option<(usize, usize)>,
}

impl Sizes {
    fn add(&mut self, answer: &Answer) {
        let widen = |range: Option<(usize, usize)>, n: usize| {
            Some(range.map_or((n, n), |(low, high)| (low.min(n), high.max(n))))
        };
        self.bytes = widen(self.bytes, answer.bytes);
        if let Some(listed) = answer.listed {
            self.listed = widen(self.listed, listed);
        }
    }

    fn describe(&self) -> String {
        let range = |range: Option<(usize, usize)>| match range {
            None => "-".to_owned(),
            Some((low, high)) if low == high => low.to_string(),
            Some((low, high)) => format!("{low}..{high}"),
        };
        format!(
            "{} bytes, {} keys listed",
            range(self.bytes),
            range(self.listed)
        )
    }
}

/// Prints the server's CPU time over a measured window, and what it comes to per request.
pub fn print_server_cpu(
    pid: u32,
    before: Option<Duration>,
    after: Option<Duration>,
    what: &str,
    n: u64,
) {
    if let (Some(before), Some(after)) = (before, after) {
        let cpu = after.saturating_sub(before);
        let per = cpu.as_secs_f64() * 1e3 / n.max(1) as f64;
        println!(
            "server CPU (utime+stime of pid {pid}) over the measured window: {:.2}s = {per:.3} ms per {what} ({n})",
            cpu.as_secs_f64()
        );
    }
}

/// The `locks` mix: see the module documentation.
///
/// # Errors
/// The holder could not take its keys, or a `locks` answer was missing or wrong.
pub async fn locks_mix(args: Arc<Args>) -> Result<(), String> {
    let held = args.held_keys.unwrap_or(DEFAULT_HELD_KEYS);
    let expect = Expect {
        held,
        others: 0,
        limit: args.locks_limit,
    };
    let holder = Holder::take(&args, held).await?;
    let outcome = async {
        let mut conn = LocksConn::open(&args, expect).await?;
        let outcome = measure_locks(&args, &mut conn).await;
        conn.close().await;
        outcome
    }
    .await;
    holder.release().await;
    check_lock_table(&args).await;
    outcome
}

/// Sends `locks` back to back over the warmup and the measured window, then prints.
async fn measure_locks(args: &Args, conn: &mut LocksConn) -> Result<(), String> {
    let start = Instant::now();
    let window = Window {
        measure_from: start + args.warmup,
        end: start + args.warmup + args.duration,
    };
    while Instant::now() < window.measure_from {
        conn.ask().await?;
    }
    let cpu_before = args.server_pid.and_then(read_cpu_time);
    let measured_from = Instant::now();
    let mut stats = Stats::default();
    let mut sizes = Sizes::default();
    while Instant::now() < window.end {
        let answer = conn.ask().await?;
        stats.record("locks", answer.elapsed);
        stats.round_trips += 1;
        sizes.add(&answer);
    }
    let cpu_after = args.server_pid.and_then(read_cpu_time);
    let secs = measured_from.elapsed().as_secs_f64().max(f64::EPSILON);
    println!(
        "locks answers: {} in {secs:.2}s = {:.0} answers/s (prefix {:?}, limit {}, one connection, back to back)",
        stats.round_trips,
        stats.round_trips as f64 / secs,
        args.key_prefix,
        args.locks_limit
    );
    println!("locks answer: {}", sizes.describe());
    if let Some(pid) = args.server_pid {
        print_server_cpu(
            pid,
            cpu_before,
            cpu_after,
            "locks answer",
            stats.round_trips,
        );
    }
    print_latencies(&stats);
    print_errors(&stats);
    Ok(())
}

/// The `--poll-locks` connection of a request mix.
pub struct Poller {
    conn: LocksConn,
    /// Requests per second.
    rate: u32,
}

/// What the poller saw.
pub struct Polled {
    /// The latencies of the polls answered in the measured window (as `locks-poll`).
    pub stats: Stats,
    /// Why the poller stopped early, if it did.
    pub failure: Option<String>,
    /// The answers' sizes.
    sizes: Sizes,
}

impl Poller {
    /// Opens the poller's connection; its answers must list the `held` keys, plus at most one
    /// key per client.
    ///
    /// # Errors
    /// The connection could not be opened.
    pub async fn open(args: &Args, rate: u32, held: usize) -> Result<Poller, String> {
        let expect = Expect {
            held,
            others: args.clients,
            limit: args.locks_limit,
        };
        Ok(Poller {
            conn: LocksConn::open(args, expect).await?,
            rate,
        })
    }

    /// Polls from the start of `window` to its end, `rate` times a second (a slow answer delays
    /// the next ticks instead of bunching them).
    pub async fn run(mut self, window: Window) -> Polled {
        let mut polled = Polled {
            stats: Stats::default(),
            failure: None,
            sizes: Sizes::default(),
        };
        let period = Duration::from_secs_f64(1.0 / f64::from(self.rate.max(1)));
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut checked = 0u32;
        loop {
            interval.tick().await;
            let now = Instant::now();
            if now >= window.end {
                break;
            }
            let check = checked.is_multiple_of(POLL_CHECK_EVERY);
            checked += 1;
            match self.conn.ask_checking(check).await {
                Ok(answer) if now >= window.measure_from => {
                    polled.stats.record("locks-poll", answer.elapsed);
                    polled.sizes.add(&answer);
                }
                Ok(_) => {}
                Err(failure) => {
                    polled.failure = Some(failure);
                    break;
                }
            }
        }
        self.conn.close().await;
        polled
    }
}

impl Polled {
    /// Prints the poller's line (its latencies go in the mix's table).
    pub fn print(&self, args: &Args, rate: u32) {
        let answered = self.stats.latencies.values().map(Vec::len).sum::<usize>();
        let secs = args.duration.as_secs_f64().max(f64::EPSILON);
        println!(
            "poller: {answered} `locks` polls answered in the measured window = {:.1}/s (asked for {rate}/s; prefix {:?}, limit {}); {}",
            answered as f64 / secs,
            args.key_prefix,
            args.locks_limit,
            self.sizes.describe()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use locksmith::client::KeyView;

    fn table(listed: usize, more: u64) -> LockTableView {
        LockTableView {
            locks: vec![KeyView::default(); listed],
            more,
            ..LockTableView::default()
        }
    }

    #[test]
    fn held_keys_never_collide_with_the_request_mixes_keys() {
        assert_eq!(held_key("p/", 3), "p/held/3");
        assert!(crate::bench_key("p/", 3).starts_with("p/k"));
        assert!(!held_key("p/", 3).starts_with("p/k"));
    }

    #[test]
    fn an_answer_must_list_every_held_key_up_to_the_limit() {
        let exact = Expect {
            held: 10_000,
            others: 0,
            limit: 10_000,
        };
        assert!(exact.check(&table(10_000, 0)).is_ok());
        assert!(exact.check(&table(9_999, 0)).is_err());
        assert!(exact.check(&table(9_999, 1)).is_err());
        let limited = Expect {
            limit: 1000,
            ..exact
        };
        assert!(limited.check(&table(1000, 9_000)).is_ok());
        assert!(limited.check(&table(1000, 8_000)).is_err());
        let busy = Expect {
            others: 50,
            ..exact
        };
        assert!(busy.check(&table(10_000, 30)).is_ok());
        assert!(busy.check(&table(10_000, 51)).is_err());
    }
}
