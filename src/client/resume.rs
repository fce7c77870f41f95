//! Resuming a session on a new connection (issue 11): what it takes ([`Resumption`], learned
//! from the server's `hello` and `resume` answers), how long to wait between tries
//! ([`Backoff`]), and the reconnect loop itself ([`reconnect`]).
//!
//! Invariants:
//! - `resume` is the first request on a new connection; no call is sent on it before the
//!   resume succeeded. Calls made meanwhile wait in order and go out after it.
//! - A call that was in flight on the lost connection is never sent again: the driver has
//!   already failed it with `connection_lost` before the reconnect starts.
//! - The session is given up (`session_expired`) when the server says it no longer has it
//!   (or refuses the secret), or when its grace has passed since the last frame the server
//!   sent: by then the server has released its locks, so the client must not pretend otherwise.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::driver::{Answer, Order, Socket};
use super::{ClientBuilder, ClientError};
use crate::auth::Secret;

/// First pause between two reconnect attempts.
const FIRST_DELAY: Duration = Duration::from_millis(50);
/// Longest pause between two reconnect attempts.
const MAX_DELAY: Duration = Duration::from_secs(1);
/// Longest one attempt may take (connect, handshake, `resume` answered): a connect whose SYN is
/// lost in a broken network would otherwise wait for the operating system's timeout (minutes),
/// past the grace, even if the network came back a moment later.
const ATTEMPT_LIMIT: Duration = Duration::from_secs(2);

/// What it takes to resume this client's session, as the server last told it.
#[derive(Clone, Debug)]
pub(crate) struct Resumption {
    /// The session's id.
    pub session: String,
    /// The resume secret (its `Debug` hides it).
    secret: Secret,
    /// How long the server keeps the session after its connection is lost.
    pub grace: Duration,
}

impl Resumption {
    /// What a successful `hello` or `resume` answer says: `Some` while the session is
    /// resumable (the answer carries a `resume_secret` and a non-zero `grace_ms`).
    pub(crate) fn from_answer(answer: &Value) -> Option<Resumption> {
        let secret = answer["resume_secret"].as_str()?;
        let grace_ms = answer["grace_ms"].as_u64().filter(|&ms| ms > 0)?;
        Some(Resumption {
            session: answer["session"].as_str()?.to_owned(),
            secret: Secret::client_token(secret.to_owned()),
            grace: Duration::from_millis(grace_ms),
        })
    }

    /// The `resume` request, numbered `id`.
    fn request(&self, id: u64) -> Value {
        json!({"id": id, "command": "resume", "session": self.session, "secret": self.secret.reveal()})
    }
}

/// What the client handles can see of the resumes: shared with the driver.
#[derive(Clone, Default)]
pub(crate) struct ResumeWatch {
    /// Resumes that succeeded so far.
    resumes: Arc<AtomicU64>,
    /// The granted grace in milliseconds; 0 while the session is not resumable.
    grace_ms: Arc<AtomicU64>,
}

impl ResumeWatch {
    /// How many times the session was resumed on a new connection.
    pub(crate) fn resumes(&self) -> u64 {
        self.resumes.load(Ordering::Relaxed)
    }

    /// The grace the server granted, while the session is resumable.
    pub(crate) fn grace(&self) -> Option<Duration> {
        match self.grace_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// Records what the server now says about resuming.
    pub(crate) fn set(&self, resumption: Option<&Resumption>) {
        let ms = resumption.map_or(0, |r| {
            u64::try_from(r.grace.as_millis()).unwrap_or(u64::MAX)
        });
        self.grace_ms.store(ms, Ordering::Relaxed);
    }

    fn count_resume(&self) {
        self.resumes.fetch_add(1, Ordering::Relaxed);
    }
}

/// The pauses between reconnect attempts: 50 ms, doubling up to 1 s, each shortened by a
/// random part of up to a quarter so that many clients cut off at once do not return in step.
#[derive(Debug)]
pub(crate) struct Backoff {
    /// The pause before jitter for the next attempt.
    next: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Backoff {
        Backoff { next: FIRST_DELAY }
    }

    /// The next pause; `jitter` in `[0, 1)` picks how much of the quarter is taken off.
    pub(crate) fn delay(&mut self, jitter: f64) -> Duration {
        let base = self.next;
        self.next = (base * 2).min(MAX_DELAY);
        base.mul_f64(1.0 - 0.25 * jitter.clamp(0.0, 1.0))
    }
}

/// A call made while the client reconnects: sent once the session is resumed.
pub(crate) type Waiting = (Map<String, Value>, oneshot::Sender<Answer>);

/// How a reconnect ended.
pub(crate) enum Reconnected {
    /// The session is back, on `socket` (boxed: a socket is large); the server's answer to
    /// `resume` is `answer`.
    Resumed { socket: Box<Socket>, answer: Value },
    /// The session is gone; every waiting and later call fails with this error.
    GaveUp(ClientError),
    /// The client asked to close meanwhile; acknowledge on `done` once the rest is failed.
    ClosedByClient(oneshot::Sender<()>),
    /// Every client handle was dropped meanwhile.
    Dropped,
}

/// Why waiting for something while reconnecting stopped early.
enum Interrupted {
    Deadline,
    ClosedByClient(oneshot::Sender<()>),
    Dropped,
}

/// Reconnects to the server of `dialer` and resumes the session of `resumption`, trying with
/// [`Backoff`] until the server answers or the grace, counted from `last_heard` (the last frame
/// the server sent), has passed. Calls arriving on `orders` meanwhile are put in `waiting`.
/// `next_id` numbers the `resume` request.
pub(crate) async fn reconnect(
    dialer: &ClientBuilder,
    resumption: &Resumption,
    last_heard: Instant,
    next_id: &mut u64,
    orders: &mut mpsc::UnboundedReceiver<Order>,
    waiting: &mut VecDeque<Waiting>,
    watch: &ResumeWatch,
) -> Reconnected {
    let deadline = last_heard + resumption.grace;
    let expired = || {
        Reconnected::GaveUp(ClientError::SessionExpired(format!(
            "no word from the server for the session's grace ({:?}); it has released the \
             session's locks",
            resumption.grace
        )))
    };
    let interrupted = |why: Interrupted| match why {
        Interrupted::Deadline => expired(),
        Interrupted::ClosedByClient(done) => Reconnected::ClosedByClient(done),
        Interrupted::Dropped => Reconnected::Dropped,
    };
    if Instant::now() >= deadline {
        return expired();
    }
    let mut backoff = Backoff::new();
    loop {
        let id = *next_id;
        *next_id += 1;
        let attempt = tokio::time::timeout(ATTEMPT_LIMIT, attempt(dialer, resumption, id));
        match taking_orders(attempt, deadline, orders, waiting).await {
            Err(why) => return interrupted(why),
            Ok(Ok(Attempt::Resumed { socket, answer })) => {
                watch.count_resume();
                return Reconnected::Resumed { socket, answer };
            }
            Ok(Ok(Attempt::Refused(error))) => return Reconnected::GaveUp(error),
            Ok(Ok(Attempt::Failed) | Err(_)) => {}
        }
        let pause = backoff.delay(rand::random::<f64>());
        if let Err(why) = taking_orders(tokio::time::sleep(pause), deadline, orders, waiting).await
        {
            return interrupted(why);
        }
    }
}

/// Runs `work` to its end unless `deadline` passes first or the client closes or goes away;
/// meanwhile every call arriving on `orders` is put in `waiting`.
async fn taking_orders<F: Future>(
    work: F,
    deadline: Instant,
    orders: &mut mpsc::UnboundedReceiver<Order>,
    waiting: &mut VecDeque<Waiting>,
) -> Result<F::Output, Interrupted> {
    tokio::pin!(work);
    loop {
        tokio::select! {
            done = &mut work => return Ok(done),
            () = tokio::time::sleep_until(deadline) => return Err(Interrupted::Deadline),
            order = orders.recv() => match order {
                Some(Order::Call { request, answer }) => waiting.push_back((request, answer)),
                Some(Order::Close { done }) => return Err(Interrupted::ClosedByClient(done)),
                None => return Err(Interrupted::Dropped),
            },
        }
    }
}

/// How one reconnect attempt ended.
enum Attempt {
    Resumed {
        socket: Box<Socket>,
        answer: Value,
    },
    /// The server will not resume the session: give up.
    Refused(ClientError),
    /// No answer (unreachable, busy, the connection broke): try again.
    Failed,
}

/// Connects once and asks to resume.
async fn attempt(dialer: &ClientBuilder, resumption: &Resumption, id: u64) -> Attempt {
    let Ok(mut socket) = dialer.dial().await else {
        return Attempt::Failed;
    };
    if socket
        .send(Message::text(resumption.request(id).to_string()))
        .await
        .is_err()
    {
        return Attempt::Failed;
    }
    while let Some(Ok(frame)) = socket.next().await {
        let Message::Text(text) = frame else { continue };
        let Ok(answer) = serde_json::from_str::<Value>(text.as_str()) else {
            return Attempt::Failed;
        };
        if answer["success"] == Value::Bool(true) && answer["id"].as_u64() == Some(id) {
            return Attempt::Resumed {
                socket: Box::new(socket),
                answer,
            };
        }
        if answer["success"] == Value::Bool(false) {
            return match ClientError::from_answer(&answer) {
                // The session is gone, or this client may not have it: no retry changes that.
                ClientError::SessionExpired(message)
                | ClientError::Forbidden(message)
                | ClientError::BadRequest(message)
                | ClientError::UnknownCommand(message) => {
                    Attempt::Refused(ClientError::SessionExpired(format!(
                        "the session cannot be resumed: {message}"
                    )))
                }
                // `server_busy`, `shutting_down`: maybe the next connection.
                _ => Attempt::Failed,
            };
        }
    }
    Attempt::Failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_at_50_ms_doubles_and_stops_at_1_s() {
        let mut backoff = Backoff::new();
        let pauses: Vec<u128> = (0..8).map(|_| backoff.delay(0.0).as_millis()).collect();
        assert_eq!(pauses, [50, 100, 200, 400, 800, 1000, 1000, 1000]);
    }

    #[test]
    fn backoff_jitter_takes_off_at_most_a_quarter() {
        let mut backoff = Backoff::new();
        assert_eq!(backoff.delay(0.999_999).as_micros(), 37_500);
        assert_eq!(backoff.delay(0.5).as_micros(), 87_500);
        assert_eq!(backoff.delay(7.0), Duration::from_millis(150), "clamped");
    }

    #[test]
    fn a_session_is_resumable_only_with_a_secret_and_a_grace() {
        let resumable = json!({"session": "s", "grace_ms": 10, "resume_secret": "ab"});
        let resumption = Resumption::from_answer(&resumable).expect("resumable");
        assert_eq!(resumption.grace, Duration::from_millis(10));
        assert_eq!(
            resumption.request(4),
            json!({"id": 4, "command": "resume", "session": "s", "secret": "ab"})
        );
        assert!(
            !format!("{resumption:?}").contains("ab\""),
            "{resumption:?}"
        );
        assert!(Resumption::from_answer(&json!({"session": "s", "grace_ms": 0})).is_none());
        assert!(Resumption::from_answer(&json!({"session": "s"})).is_none());
    }
}
