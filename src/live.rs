//! The live view behind the page at `/`: who holds and who waits for the busiest keys, the
//! waits-for edges between them, the last deadlocks, and a few headline numbers, pushed over a
//! WebSocket at `/live` to whoever watches.
//!
//! Each watcher's socket has its own loop: every [`PUSH_INTERVAL`] it builds the view and sends
//! it if it changed (and at least every [`HEARTBEAT`]). Nothing is built when nobody watches. On
//! a huge table, where a view takes milliseconds to build, the loop waits 40 times that between
//! views (see [`MUTEX_SHARE`]). A
//! view is bounded whatever the table holds: the [`LIVE_KEYS`] busiest keys (waited-on first,
//! the longest wait first, then the longest held), how many more there are, and the edges among
//! the keys listed. Building it takes the lock manager's mutex once, for two passes over the
//! keys (see [`LockTable::busiest_keys`](crate::lock::LockTable::busiest_keys) and
//! [`LockTable::gauges`](crate::lock::LockTable::gauges)).
//!
//! The snapshot's JSON is documented in README.md ("Observe"); the page's files are in
//! `static/` and are served from the binary.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::ws::{Message, WebSocket};
use serde_json::{json, Map, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::deadlocks::Deadlock;
use crate::lock::{KeySnapshot, LockMode, SessionId};
use crate::session::SessionContext;

/// Most keys one view lists.
pub const LIVE_KEYS: usize = 50;

/// How often a watcher's view is rebuilt (and sent, if it changed): at most 4 updates a second.
pub const PUSH_INTERVAL: Duration = Duration::from_millis(250);

/// How many times longer than building a view the wait until the next one is, at least: views
/// take at most about 1/40 (2.5 %) of the lock manager's time, however big the table.
const MUTEX_SHARE: u32 = 40;

/// Longest time between two updates, changed or not: the page knows its stream is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// The window of `deadlocks_per_s`.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// Longest a send may take before the watcher counts as gone (it stopped reading).
const SEND_LIMIT: Duration = Duration::from_secs(10);

/// The page and its assets, served from the binary.
pub mod assets {
    /// `GET /`.
    pub const PAGE: &str = include_str!("../static/live.html");
    /// `GET /live.js`.
    pub const SCRIPT: &str = include_str!("../static/live.js");
    /// `GET /live.css`.
    pub const STYLE: &str = include_str!("../static/live.css");
}

/// Serves one watcher until it closes its socket, stops reading, or the server shuts down.
pub async fn serve(mut socket: WebSocket, context: SessionContext, shutdown: CancellationToken) {
    let mut rate = DeadlockRate::default();
    let mut last_sent: Option<(Value, Instant)> = None;
    let mut seq = 0u64;
    let mut next = Instant::now();
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            frame = socket.recv() => match frame {
                // The page sends nothing; anything but a close is ignored.
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => continue,
            },
            () = tokio::time::sleep_until(next) => {}
        }
        let now = Instant::now();
        let view = view(&context, &mut rate, now);
        // A huge table makes a view slow to build, under the lock manager's mutex: then views
        // are built less often, so that building them takes at most 1/MUTEX_SHARE of the time.
        next = now + PUSH_INTERVAL.max(now.elapsed() * MUTEX_SHARE);
        let due = match &last_sent {
            None => true,
            Some((last, at)) => *last != view || now.duration_since(*at) >= HEARTBEAT,
        };
        if !due {
            continue;
        }
        seq += 1;
        let mut message = view.clone();
        message["seq"] = json!(seq);
        let sent = tokio::time::timeout(
            SEND_LIMIT,
            socket.send(Message::Text(message.to_string().into())),
        )
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            return;
        }
        last_sent = Some((view, now));
    }
    let _ = tokio::time::timeout(SEND_LIMIT, socket.send(Message::Close(None))).await;
}

/// The deadlock rate over the last [`RATE_WINDOW`], from the totals this watcher has seen.
#[derive(Default)]
struct DeadlockRate {
    /// (when, total deadlocks then), oldest first, reaching back at most the window.
    samples: VecDeque<(Instant, u64)>,
}

impl DeadlockRate {
    /// Records `total` at `now` and returns the deadlocks per second since the oldest sample in
    /// the window (0 until a second has passed).
    fn per_second(&mut self, now: Instant, total: u64) -> f64 {
        self.samples.push_back((now, total));
        while self
            .samples
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > RATE_WINDOW)
        {
            self.samples.pop_front();
        }
        let Some(&(since, then)) = self.samples.front() else {
            return 0.0;
        };
        let elapsed = now.duration_since(since).as_secs_f64();
        if elapsed < 1.0 {
            return 0.0;
        }
        // Rounded to a hundredth, so that a view that did not change compares equal.
        ((total.saturating_sub(then)) as f64 / elapsed * 100.0).round() / 100.0
    }
}

/// The view, without its `seq`.
fn view(context: &SessionContext, rate: &mut DeadlockRate, now: Instant) -> Value {
    let (busiest, gauges) = context.locks.busiest_keys(LIVE_KEYS, now);
    let names = context.registry.names();
    let suspended = context.registry.suspended().len();
    let (deadlocks, total) = context.deadlocks.recent();
    let taken_at = now.into_std();
    let keys: Vec<Value> = busiest
        .keys
        .iter()
        .map(|key| key_view(key, taken_at, &names))
        .collect();
    json!({
        "sessions": gauges.sessions,
        "suspended": suspended,
        "locks_held": gauges.held_shared + gauges.held_exclusive,
        "waiters": gauges.waiting,
        "keys_with_waiters": gauges.keys_with_waiters,
        "deadlocks_total": total,
        "deadlocks_per_s": rate.per_second(now, total),
        "keys": keys,
        "more_keys": busiest.more,
        "edges": edges(&busiest.keys),
        "deadlocks": deadlocks.iter().map(deadlock_view).collect::<Vec<_>>(),
    })
}

/// One listed key: its holders and its queue, in order.
fn key_view(
    key: &KeySnapshot,
    taken_at: std::time::Instant,
    names: &HashMap<SessionId, String>,
) -> Value {
    let millis = |since: std::time::Instant| {
        u64::try_from(taken_at.saturating_duration_since(since).as_millis()).unwrap_or(u64::MAX)
    };
    let holders: Vec<Value> = key
        .holders
        .iter()
        .map(|h| {
            let mut entry = member(h.session, h.mode, names);
            entry.insert("held_ms".into(), json!(millis(h.since)));
            Value::Object(entry)
        })
        .collect();
    let waiters: Vec<Value> = key
        .queue
        .iter()
        .map(|w| {
            let mut entry = member(w.session, w.mode, names);
            entry.insert("waiting_ms".into(), json!(millis(w.since)));
            Value::Object(entry)
        })
        .collect();
    let longest_wait = key.queue.iter().map(|w| millis(w.since)).max().unwrap_or(0);
    json!({
        "key": key.key.as_str(),
        "holders": holders,
        "waiters": waiters,
        "longest_wait_ms": longest_wait,
    })
}

/// A holder or waiter: its session, its name if it has one, its mode.
fn member(
    session: SessionId,
    mode: LockMode,
    names: &HashMap<SessionId, String>,
) -> Map<String, Value> {
    let mut entry = Map::new();
    entry.insert("session".into(), json!(session.to_string()));
    if let Some(name) = names.get(&session) {
        entry.insert("name".into(), json!(name));
    }
    let mode = match mode {
        LockMode::Shared => "read",
        LockMode::Exclusive => "write",
    };
    entry.insert("mode".into(), json!(mode));
    entry
}

/// Who waits for whom among the listed keys: each waiter to each holder of the key it waits
/// for (not to the waiters ahead of it: the table shows the queue's order), labelled with the
/// key. A session waiting to upgrade a key it holds has no edge to itself.
fn edges(keys: &[KeySnapshot]) -> Vec<Value> {
    let mut edges = Vec::new();
    for key in keys {
        for waiter in &key.queue {
            for holder in key.holders.iter().filter(|h| h.session != waiter.session) {
                edges.push(json!({
                    "waiter": waiter.session.to_string(),
                    "holder": holder.session.to_string(),
                    "key": key.key.as_str(),
                }));
            }
        }
    }
    edges
}

/// One of the last deadlocks: when, its victim, its cycle.
fn deadlock_view(deadlock: &Deadlock) -> Value {
    let at_ms = unix_ms(deadlock.at);
    let cycle: Vec<Value> = deadlock
        .cycle
        .iter()
        .map(|m| {
            let mut entry = Map::new();
            entry.insert("session".into(), json!(m.member.session.to_string()));
            if let Some(name) = &m.name {
                entry.insert("name".into(), json!(name));
            }
            entry.insert("key".into(), json!(m.member.waiting_for_key.as_str()));
            Value::Object(entry)
        })
        .collect();
    let victim = deadlock.cycle.first().map(|m| m.member.session.to_string());
    json!({"at_ms": at_ms, "victim": victim, "cycle": cycle})
}

/// Milliseconds since the Unix epoch.
fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadlock_rate_is_over_the_last_ten_seconds_and_zero_before_one() {
        let mut rate = DeadlockRate::default();
        let start = Instant::now();
        assert_eq!(rate.per_second(start, 0), 0.0);
        assert_eq!(rate.per_second(start + Duration::from_millis(500), 5), 0.0);
        assert_eq!(rate.per_second(start + Duration::from_secs(2), 10), 5.0);
        // 20 s later the window holds only the samples of the last 10 s.
        rate.per_second(start + Duration::from_secs(12), 10);
        assert_eq!(rate.per_second(start + Duration::from_secs(22), 30), 2.0);
    }
}
