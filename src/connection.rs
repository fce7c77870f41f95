//! One WebSocket connection: frames in, requests carried out in order, responses out.
//!
//! The loop keeps reading the socket while a request is being carried out (a lock may wait for a
//! long time): that is how a client that disconnects while waiting is noticed at once — its
//! request future is dropped, which withdraws it from the lock manager, and the session is closed,
//! which releases its locks. Requests that arrive meanwhile are queued (up to
//! [`MAX_PIPELINED`]) and answered in order.
//!
//! Keepalive: when `idle_timeout` is set, the server pings a connection that has been silent for
//! half of it and closes one that has been silent for all of it (a half-open connection never
//! answers); a send the client does not take within the idle timeout (it stopped reading) ends
//! the connection too, so the session's locks are released either way.
//!
//! `cancel` does not wait its turn: it is decoded and carried out when its frame arrives. If it
//! withdraws the request in progress (waiting for a lock), its answer is sent right after that
//! request's `cancelled` answer, ahead of the requests queued behind; otherwise it is answered
//! in turn.
//!
//! Shutdown: the request in progress and every queued one are answered `shutting_down`, then
//! the socket is closed with code 1001 (going away). Kill: an administrator's `kill` has already
//! released the session's locks; the request in progress and every queued one are answered
//! `killed`, then the socket is closed with code 1008.
//!
//! Metrics: every answered request is counted once, with its command and answer code, and timed
//! from its decoding (the arrival of its frame) to its answer being sent
//! ([`Metrics::request`]); that includes the answers of a shutdown, a kill or a takeover, and
//! frames that could not be decoded (command `invalid` when not even the command could be read).
//!
//! Frames the server cannot take end the connection with the matching close code: over the size
//! limit 1009 (after a `too_large` answer), a text frame that is not UTF-8 1007 (after a
//! `bad_request` answer), broken WebSocket framing 1002.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::{FutureExt, SinkExt};
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cancel_latch::CancelLatch;
use crate::lock::LockError;
use crate::metrics::Metrics;
use crate::protocol::{
    self, Command, CommandKind, Limits, Reply, Request, ServiceError, Undecoded,
};
use crate::session::{Client, ClientSession, SessionContext};

/// Most requests a client may send ahead of their answers; more close the connection (1008).
pub const MAX_PIPELINED: usize = 1024;

/// Longest the final answer and close frame may take to send when no idle timeout is set (with
/// one, the idle timeout bounds every send).
const CLOSE_SEND_LIMIT: Duration = Duration::from_secs(10);

/// WebSocket close codes used by the server.
mod close_code {
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// Per-connection settings.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionSettings {
    /// Request limits checked by the decoder.
    pub limits: Limits,
    /// Largest frame accepted, in bytes.
    pub max_message_bytes: usize,
    /// Silence after which the connection is closed (`None`: never).
    pub idle_timeout: Option<Duration>,
}

/// A frame waiting for its turn, decoded when it arrived.
enum Incoming {
    /// A request to carry out, or the error to answer it with (and its id and command, if they
    /// could be read); `at` is when it was decoded (for the request's duration).
    Decoded {
        decoded: Result<Request, Undecoded>,
        at: Instant,
    },
    /// A request already carried out (a `cancel` that withdrew nothing, already counted): its
    /// answer, to send in turn.
    Answered(String),
}

impl Incoming {
    /// A frame decoded now.
    fn decode(text: &str, limits: Limits) -> Self {
        Incoming::Decoded {
            decoded: protocol::decode_frame(text, limits),
            at: Instant::now(),
        }
    }
}

/// The command of a decoded frame, if known (`None`: the metrics' `invalid`).
fn command_of(decoded: &Result<Request, Undecoded>) -> Option<CommandKind> {
    match decoded {
        Ok(request) => Some(request.command.kind()),
        Err(undecoded) => undecoded.command,
    }
}

/// The code a request is answered with, for the metrics.
fn code_of<T>(result: &Result<T, ServiceError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(error) => error.code(),
    }
}

/// Carrying out one request.
type RequestFuture<'a> = Pin<Box<dyn Future<Output = Result<Reply, ServiceError>> + Send + 'a>>;

/// The request being carried out.
struct InFlight<'a> {
    /// Its id, to echo.
    id: Option<Value>,
    /// Its command (for the metrics).
    command: CommandKind,
    /// When it was decoded (for the metrics).
    at: Instant,
    /// Carrying it out.
    future: RequestFuture<'a>,
}

/// Why a connection ended, for the log.
#[derive(Debug)]
enum Ending {
    ClientClosed,
    Broken(String),
    TooLarge,
    NotUtf8,
    ProtocolViolation(String),
    TooManyPipelined,
    Idle,
    Shutdown,
    Killed,
    /// A `resume` on another connection took the session over.
    TakenOver,
    /// The next request is a `resume` (not an ending: [`serve`] carries it out and goes on).
    Resume {
        id: Option<Value>,
        at: Instant,
        target: crate::lock::SessionId,
        secret: crate::auth::Secret,
    },
}

/// Serves one upgraded connection until it ends. The session (and with it every lock the client
/// held) is released — or, for a resumable session whose connection dropped, suspended — before
/// this returns.
///
/// However the connection ends, its request in progress settles first ([`settle`]): a lock
/// wait is withdrawn, and a write already being committed finishes, so its keys are never
/// released while its values may still land. Then the session is released (or suspended, or
/// handed over), and only then are the last answers of a shutdown, a kill or a takeover sent: a
/// client that does not read cannot hold the release up.
///
/// A `resume` is carried out here, between two runs of the request loop: it swaps the
/// connection's own, still empty session for the resumed one; the requests queued behind it are
/// then carried out for the resumed session.
pub async fn serve(
    mut socket: WebSocket,
    client: Client,
    context: SessionContext,
    settings: ConnectionSettings,
    shutdown: CancellationToken,
) {
    let peer: SocketAddr = client.peer;
    let metrics = context.metrics.clone();
    let mut session = ClientSession::open(context, client.clone());
    tracing::debug!(session = %session.id(), %peer, "connection opened");
    let mut served = 0u64;
    let mut queued = VecDeque::new();
    // A resume's answer that a kill or takeover kept from being sent: sent with the last words.
    let mut unsent = Vec::new();
    let mut ended = None;
    loop {
        let mut owed = Owed {
            queued: std::mem::take(&mut queued),
            after_in_flight: std::mem::take(&mut unsent),
            ..Owed::default()
        };
        let ending = match ended.take() {
            Some(ending) => ending,
            None => {
                run(
                    &mut socket,
                    &session,
                    &mut owed,
                    settings,
                    &shutdown,
                    &mut served,
                    &metrics,
                )
                .await
            }
        };
        if let Ending::Resume {
            id,
            at,
            target,
            secret,
        } = ending
        {
            // The loop stops for a resume only with nothing in flight.
            queued = std::mem::take(&mut owed.queued);
            drop(owed);
            served += 1;
            let resumed = tokio::select! {
                resumed = session.resume(target, &secret) => resumed,
                () = shutdown.cancelled() => Err(ServiceError::ShuttingDown),
            };
            let code = match &resumed {
                Ok(_) => "ok",
                Err(error) => error.code(),
            };
            let text = match resumed {
                Ok(mut resumed) => {
                    resumed.attach(&client);
                    let reply = resumed.resumed_reply();
                    let own = std::mem::replace(&mut session, resumed);
                    tracing::debug!(session = %target, %peer, replaced = %own.id(), "session resumed");
                    drop(own);
                    protocol::encode_reply(id.as_ref(), &reply)
                }
                Err(error) => protocol::encode_error(id.as_ref(), &error),
            };
            // A kill or takeover of the resumed session stops this send like any other.
            let mut stops = Stops::of(&session);
            let sent = send_unless_stopped(
                &mut socket,
                text,
                settings.idle_timeout,
                &mut stops,
                &mut unsent,
            )
            .await;
            metrics.request(Some(CommandKind::Resume), code, at.elapsed());
            if let Err(ending) = sent {
                ended = Some(ending);
            }
            continue;
        }
        let id = session.id();
        let withdrew_wait = settle(&session, &mut owed).await;
        // A shutdown's own last words are not interrupted by the shutdown; a kill's and a
        // takeover's are.
        let (farewell, interrupt) = match ending {
            Ending::Shutdown => (
                Some(owed.farewell(
                    &ServiceError::ShuttingDown,
                    close_code::GOING_AWAY,
                    protocol::SHUTDOWN_CLOSE_REASON,
                    &metrics,
                )),
                CancellationToken::new(),
            ),
            Ending::Killed => (
                Some(owed.farewell(
                    &ServiceError::Killed,
                    close_code::POLICY,
                    "killed by an administrator",
                    &metrics,
                )),
                shutdown.clone(),
            ),
            Ending::TakenOver => (
                Some(owed.farewell(
                    &ServiceError::TakenOver,
                    close_code::POLICY,
                    protocol::TAKEN_OVER_CLOSE_REASON,
                    &metrics,
                )),
                shutdown.clone(),
            ),
            _ => {
                drop(owed);
                (None, CancellationToken::new())
            }
        };
        // A connection that dropped, or went silent, may come back: a resumable session is
        // suspended. One the client closed, or the server closed for cause, is released.
        if matches!(ending, Ending::Broken(_) | Ending::Idle | Ending::TakenOver) {
            let handover = matches!(ending, Ending::TakenOver);
            if let Some(grace) = session.suspend_or_release(withdrew_wait, handover) {
                tracing::debug!(session = %id, %peer, ?grace, withdrew_wait, "session suspended");
            }
        } else {
            drop(session);
        }
        if let Some(farewell) = farewell {
            let close_limit = settings.idle_timeout.unwrap_or(CLOSE_SEND_LIMIT);
            farewell.send(&mut socket, close_limit, &interrupt).await;
        }
        match &ending {
            Ending::Broken(error) => {
                tracing::warn!(session = %id, %peer, served, error = %error, "connection broken")
            }
            Ending::ProtocolViolation(error) => {
                tracing::warn!(session = %id, %peer, served, error = %error, "WebSocket protocol violation")
            }
            _ => {
                tracing::debug!(session = %id, %peer, served, reason = ?ending, "connection closed")
            }
        }
        return;
    }
}

/// Longest a connection that ends waits for its request in progress to settle before the
/// session is released. A commit takes milliseconds; a store that hangs longer is abandoned.
const SETTLE_LIMIT: Duration = Duration::from_secs(10);

/// Lets the request in progress finish before the session is released: its lock wait is
/// withdrawn (it then fails at once), and a write past its wait completes its commit. Returns
/// whether a lock wait was withdrawn.
async fn settle(session: &ClientSession, owed: &mut Owed<'_>) -> bool {
    let Some(in_flight) = owed.in_flight.as_mut() else {
        return false;
    };
    let withdrew = session.cancel_wait();
    if tokio::time::timeout(SETTLE_LIMIT, &mut in_flight.future)
        .await
        .is_err()
    {
        tracing::warn!(session = %session.id(), "a request did not settle in {SETTLE_LIMIT:?}; abandoning it");
    }
    withdrew
}

/// What the connection still owes its client: the request in progress and those waiting for
/// their turn.
#[derive(Default)]
struct Owed<'a> {
    /// The request being carried out.
    in_flight: Option<InFlight<'a>>,
    /// Answers of `cancel`s that withdrew the request in flight: sent right after its answer.
    after_in_flight: Vec<String>,
    /// Requests waiting for their turn, decoded when they arrived.
    queued: VecDeque<Incoming>,
}

impl Owed<'_> {
    /// The answers owed when the connection ends early (shutdown, kill): `error` for the request
    /// in flight, then the answers of `cancel`s that withdrew it, then, in order, `error` for
    /// every queued request (a queued request already carried out keeps its answer); then the
    /// close frame. Each request answered `error` is counted in `metrics` (as answered now:
    /// the answers go out right after, as far as the client takes them).
    fn farewell(
        self,
        error: &ServiceError,
        code: u16,
        reason: &'static str,
        metrics: &Metrics,
    ) -> Farewell {
        let mut answers: Vec<String> = self
            .in_flight
            .map(|in_flight| {
                metrics.request(
                    Some(in_flight.command),
                    error.code(),
                    in_flight.at.elapsed(),
                );
                protocol::encode_error(in_flight.id.as_ref(), error)
            })
            .into_iter()
            .collect();
        answers.extend(self.after_in_flight);
        answers.extend(self.queued.into_iter().map(|incoming| match incoming {
            Incoming::Answered(text) => text,
            Incoming::Decoded { decoded, at } => {
                metrics.request(command_of(&decoded), error.code(), at.elapsed());
                let id = match decoded {
                    Ok(request) => request.id,
                    Err(undecoded) => undecoded.id,
                };
                protocol::encode_error(id.as_ref(), error)
            }
        }));
        Farewell {
            answers,
            code,
            reason,
        }
    }
}

/// The last words of a connection ended by the server: answers, then a close frame.
struct Farewell {
    /// Every answer still owed, in request order.
    answers: Vec<String>,
    /// The close code (1001 shutdown, 1008 kill).
    code: u16,
    /// The close frame's reason, for the client's logs.
    reason: &'static str,
}

impl Farewell {
    /// Sends it, all of it within `limit` (a client that does not read gets what fits); stops
    /// at the first send that fails, or when `interrupt` is cancelled (a killed connection's
    /// last words do not hold up the server's shutdown).
    async fn send(self, socket: &mut WebSocket, limit: Duration, interrupt: &CancellationToken) {
        let said = tokio::time::timeout(limit, async {
            for text in self.answers {
                if send(socket, Message::Text(text.into()), None)
                    .await
                    .is_err()
                {
                    return;
                }
            }
            close(socket, self.code, self.reason, limit).await;
        });
        let said = tokio::select! {
            said = said => said,
            () = interrupt.cancelled() => return,
        };
        if said.is_err() {
            tracing::debug!("the client did not take the connection's last answers in time");
        }
    }
}

/// Refuses a connection over the limit: one `server_busy` answer, then close (1013).
pub async fn refuse_busy(mut socket: WebSocket) {
    let text = protocol::encode_error(None, &ServiceError::ServerBusy);
    let _ = send(
        &mut socket,
        Message::Text(text.into()),
        Some(CLOSE_SEND_LIMIT),
    )
    .await;
    close(
        &mut socket,
        close_code::TRY_AGAIN_LATER,
        "server busy",
        CLOSE_SEND_LIMIT,
    )
    .await;
}

/// The connection's loop: reads frames, starts requests in turn, sends their answers. Returns
/// why it ended; what it still owes is left in `owed`.
async fn run<'a>(
    socket: &mut WebSocket,
    session: &'a ClientSession,
    owed: &mut Owed<'a>,
    settings: ConnectionSettings,
    shutdown: &CancellationToken,
    served: &mut u64,
    metrics: &Metrics,
) -> Ending {
    let Owed {
        in_flight,
        after_in_flight,
        queued,
    } = owed;
    // Checked on every turn of the loop: latched, so a check costs an atomic load, not the
    // tokens' mutexes (see `cancel_latch`).
    let mut stops = Stops::of(session);
    let mut shutdown = CancelLatch::new(shutdown);
    let mut last_heard = Instant::now();
    // Last time we heard from the client or pinged it: the keepalive acts after `tick` of this.
    let mut last_poke = last_heard;
    let tick = settings
        .idle_timeout
        .map(|idle| (idle / 2).max(Duration::from_millis(10)));
    // Set once and moved only when it fires, not on every frame: a frame just moves
    // `last_poke`, and a timer that fires before `last_poke + tick` is set again for then.
    let idle_timer = tokio::time::sleep_until(last_poke + tick.unwrap_or_default());
    tokio::pin!(idle_timer);
    // A client that takes nothing we send for a whole idle timeout has stopped reading: without
    // this bound the loop would wait in `send` forever and the session would keep its locks.
    let send_limit = settings.idle_timeout;
    let close_limit = settings.idle_timeout.unwrap_or(CLOSE_SEND_LIMIT);
    loop {
        // Start the next request, answering at once the ones that fail to decode. A killed or
        // detached session starts nothing more.
        while in_flight.is_none() && !stops.any() {
            let Some(next) = queued.pop_front() else {
                break;
            };
            let (decoded, at) = match next {
                Incoming::Decoded { decoded, at } => (decoded, at),
                Incoming::Answered(text) => {
                    *served += 1;
                    if let Err(ending) =
                        send_unless_stopped(socket, text, send_limit, &mut stops, after_in_flight)
                            .await
                    {
                        return ending;
                    }
                    continue;
                }
            };
            match decoded {
                Ok(Request {
                    id,
                    command:
                        Command::Resume {
                            session: target,
                            secret,
                        },
                    ..
                }) => {
                    return Ending::Resume {
                        id,
                        at,
                        target,
                        secret,
                    }
                }
                Ok(request) => {
                    let id = request.id.clone();
                    let command = request.command.kind();
                    let mut future: RequestFuture<'a> =
                        Box::pin(async move { session.execute(&request).await });
                    // Most requests are decided at once (a free lock, an unlock): polled here
                    // with the connection's own waker, such a request is answered without
                    // another turn of the loop. One that must wait goes in flight. During a
                    // shutdown the loop's `select!` decides, as for any request.
                    if !shutdown.is_cancelled() {
                        let polled = std::future::poll_fn(|context| {
                            Poll::Ready(future.as_mut().poll(context))
                        })
                        .await;
                        if let Poll::Ready(result) = polled {
                            *served += 1;
                            let finished = Finished {
                                id,
                                command,
                                at,
                                result,
                            };
                            if let Err(ending) = answer(
                                socket,
                                finished,
                                send_limit,
                                &mut stops,
                                after_in_flight,
                                metrics,
                            )
                            .await
                            {
                                return ending;
                            }
                            continue;
                        }
                    }
                    *in_flight = Some(InFlight {
                        id,
                        command,
                        at,
                        future,
                    });
                }
                Err(Undecoded { id, command, error }) => {
                    *served += 1;
                    tracing::debug!(session = %session.id(), code = error.code(), "bad request");
                    let text = protocol::encode_error(id.as_ref(), &error);
                    let sent =
                        send_unless_stopped(socket, text, send_limit, &mut stops, after_in_flight)
                            .await;
                    metrics.request(command, error.code(), at.elapsed());
                    if let Err(ending) = sent {
                        return ending;
                    }
                }
            }
        }
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ending::Shutdown,
            result = async { match in_flight.as_mut() { Some(in_flight) => (&mut in_flight.future).await, None => std::future::pending().await } }, if in_flight.is_some() => {
                let Some(InFlight { id, command, at, .. }) = in_flight.take() else { continue };
                *served += 1;
                let finished = Finished { id, command, at, result };
                if let Err(ending) = answer(socket, finished, send_limit, &mut stops, after_in_flight, metrics).await {
                    return ending;
                }
            }
            ending = stops.stopped() => {
                // Requests the client sent before the kill (or takeover) and that are already
                // readable count as queued: they are answered `killed` (`taken_over`) too, not
                // dropped unanswered.
                while let Some(Some(Ok(Message::Text(text)))) = socket.recv().now_or_never() {
                    queued.push_back(Incoming::decode(text.as_str(), settings.limits));
                }
                return ending;
            }
            frame = socket.recv() => {
                last_heard = Instant::now();
                last_poke = last_heard;
                match frame {
                    None => return Ending::ClientClosed,
                    Some(Ok(Message::Close(_))) => {
                        // tungstenite has queued the echo of the client's close frame; flush it,
                        // or the client sees a reset instead of a completed closing handshake.
                        let _ = tokio::time::timeout(close_limit, SinkExt::flush(socket)).await;
                        return Ending::ClientClosed;
                    }
                    Some(Ok(Message::Text(text))) => {
                        if queued.len() >= MAX_PIPELINED {
                            close(socket, close_code::POLICY, "too many pipelined requests", close_limit).await;
                            return Ending::TooManyPipelined;
                        }
                        let decoded = protocol::decode_frame(text.as_str(), settings.limits);
                        match decoded {
                            Ok(Request { command: Command::Cancel, id, .. }) => {
                                let withdrawn = in_flight.is_some() && session.cancel_wait();
                                let answer = protocol::encode_reply(id.as_ref(), &Reply::Cancelled(withdrawn));
                                metrics.request(Some(CommandKind::Cancel), "ok", last_heard.elapsed());
                                if withdrawn {
                                    after_in_flight.push(answer);
                                } else {
                                    queued.push_back(Incoming::Answered(answer));
                                }
                            }
                            decoded => queued.push_back(Incoming::Decoded { decoded, at: last_heard }),
                        }
                    }
                    Some(Ok(Message::Binary(_))) => queued.push_back(Incoming::Decoded {
                        decoded: Err(Undecoded {
                            id: None,
                            command: None,
                            error: ServiceError::BadRequest("binary frames are not supported: send JSON in a text frame".into()),
                        }),
                        at: last_heard,
                    }),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Err(error)) => match classify(&error) {
                        ReadError::TooLarge => {
                            let too_large = ServiceError::TooLarge { limit: settings.max_message_bytes };
                            let text = protocol::encode_error(None, &too_large);
                            let _ = send(socket, Message::Text(text.into()), Some(close_limit)).await;
                            metrics.request(None, too_large.code(), last_heard.elapsed());
                            close(socket, close_code::TOO_BIG, "message too large", close_limit).await;
                            return Ending::TooLarge;
                        }
                        ReadError::NotUtf8 => {
                            let not_utf8 = ServiceError::BadRequest("a text frame must be valid UTF-8".into());
                            let text = protocol::encode_error(None, &not_utf8);
                            let _ = send(socket, Message::Text(text.into()), Some(close_limit)).await;
                            metrics.request(None, not_utf8.code(), last_heard.elapsed());
                            close(socket, close_code::INVALID_DATA, "text frame is not valid UTF-8", close_limit).await;
                            return Ending::NotUtf8;
                        }
                        ReadError::Protocol => {
                            close(socket, close_code::PROTOCOL_ERROR, "WebSocket protocol violation", close_limit).await;
                            return Ending::ProtocolViolation(error.to_string());
                        }
                        ReadError::Broken => return Ending::Broken(error.to_string()),
                    },
                }
            }
            () = &mut idle_timer, if tick.is_some() => {
                let (Some(idle), Some(tick)) = (settings.idle_timeout, tick) else { continue };
                let due = last_poke + tick;
                if due > Instant::now() {
                    // Heard from the client (or pinged it) since the timer was set.
                    idle_timer.as_mut().reset(due);
                    continue;
                }
                if last_heard.elapsed() >= idle {
                    close(socket, close_code::GOING_AWAY, "idle timeout", close_limit).await;
                    return Ending::Idle;
                }
                let ping = tokio::select! {
                    biased;
                    ending = stops.stopped() => return ending,
                    sent = send(socket, Message::Ping(Default::default()), send_limit) => sent,
                };
                if let Err(error) = ping {
                    return Ending::Broken(format!("ping failed: {error}"));
                }
                last_poke = Instant::now();
                idle_timer.as_mut().reset(last_poke + tick);
            }
        }
    }
}

/// A request carried out, to answer.
struct Finished {
    /// Its id, to echo.
    id: Option<Value>,
    /// Its command (for the metrics).
    command: CommandKind,
    /// When it was decoded (for the metrics).
    at: Instant,
    /// Its outcome.
    result: Result<Reply, ServiceError>,
}

/// Sends the answer of a request carried out — then the answers of the `cancel`s that withdrew
/// it, if it was waiting — and counts it in the metrics.
///
/// # Errors
/// The ending, if a kill, a takeover or a broken socket stopped the sending; the answers not yet
/// sent are left in `after_in_flight`, for the connection's last words.
async fn answer(
    socket: &mut WebSocket,
    finished: Finished,
    send_limit: Option<Duration>,
    stops: &mut Stops,
    after_in_flight: &mut Vec<String>,
    metrics: &Metrics,
) -> Result<(), Ending> {
    let Finished {
        id,
        command,
        at,
        result,
    } = finished;
    // The kill closed the session under the request (the kill's last resort): say why it
    // failed.
    let result = match result {
        Err(ServiceError::Lock(LockError::SessionClosed)) if stops.killed.is_cancelled() => {
            Err(ServiceError::Killed)
        }
        other => other,
    };
    let code = code_of(&result);
    let text = encode_answer(id, result).await;
    let cancels = std::mem::take(after_in_flight);
    let sent = send_unless_stopped(socket, text, send_limit, stops, after_in_flight).await;
    metrics.request(Some(command), code, at.elapsed());
    let mut cancels = cancels.into_iter();
    if let Err(ending) = sent {
        after_in_flight.extend(cancels);
        return Err(ending);
    }
    while let Some(text) = cancels.next() {
        if let Err(ending) =
            send_unless_stopped(socket, text, send_limit, stops, after_in_flight).await
        {
            after_in_flight.extend(cancels);
            return Err(ending);
        }
    }
    Ok(())
}

/// A `locks` answer listing more holders and waiters than this is encoded on a blocking thread:
/// it takes milliseconds (about 0.3 µs per entry), which the other connections served by this
/// thread would otherwise wait out.
const ENCODE_ELSEWHERE_ENTRIES: usize = 500;

/// Encodes an answer — a big `locks` answer on a blocking thread (see
/// [`ENCODE_ELSEWHERE_ENTRIES`]), or here if the blocking pool does not run it (at shutdown).
/// A panic there (none is known) is carried on here, as if the encoding had run here.
async fn encode_answer(id: Option<Value>, result: Result<Reply, ServiceError>) -> String {
    fn encode(id: Option<&Value>, result: &Result<Reply, ServiceError>) -> String {
        match result {
            Ok(reply) => protocol::encode_reply(id, reply),
            Err(error) => protocol::encode_error(id, error),
        }
    }
    let big = matches!(&result, Ok(reply) if reply.listed_entries() > ENCODE_ELSEWHERE_ENTRIES);
    if !big {
        return encode(id.as_ref(), &result);
    }
    let answer = Arc::new((id, result));
    let shared = Arc::clone(&answer);
    match tokio::task::spawn_blocking(move || encode(shared.0.as_ref(), &shared.1)).await {
        Ok(text) => text,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(_) => encode(answer.0.as_ref(), &answer.1),
    }
}

/// What stops a connection from serving its session any further: an administrator's `kill`,
/// or a `resume` of the session on another connection.
struct Stops {
    /// The session's kill token.
    killed: CancelLatch,
    /// The session's takeover token.
    detached: CancelLatch,
}

impl Stops {
    /// The stops of `session`.
    fn of(session: &ClientSession) -> Self {
        Stops {
            killed: CancelLatch::new(session.killed()),
            detached: CancelLatch::new(session.detached()),
        }
    }

    /// Has either happened?
    fn any(&mut self) -> bool {
        self.killed.is_cancelled() || self.detached.is_cancelled()
    }

    /// Resolves with the ending once either happens (a kill first, if both have).
    async fn stopped(&mut self) -> Ending {
        tokio::select! {
            biased;
            () = self.killed.cancelled() => Ending::Killed,
            () = self.detached.cancelled() => Ending::TakenOver,
        }
    }
}

/// Sends one answer like [`send`], but gives up as soon as the session is killed or taken
/// over: a client that stops reading must not hold up the release a `kill` waits for, nor the
/// hand-over a `resume` waits for. An answer not yet started when that is seen goes to
/// `unsent`, to be sent with the connection's last words.
///
/// # Errors
/// The ending: `Killed`, `TakenOver`, or `Broken` if the send failed.
async fn send_unless_stopped(
    socket: &mut WebSocket,
    text: String,
    limit: Option<Duration>,
    stops: &mut Stops,
    unsent: &mut Vec<String>,
) -> Result<(), Ending> {
    if stops.any() {
        unsent.push(text);
        return Err(stops.stopped().await);
    }
    tokio::select! {
        biased;
        ending = stops.stopped() => Err(ending),
        sent = send(socket, Message::Text(text.into()), limit) => sent.map_err(Ending::Broken),
    }
}

/// What a read error says about the client.
enum ReadError {
    /// A frame or message over the size limit: answer `too_large`, close 1009.
    TooLarge,
    /// A text frame that is not UTF-8. RFC 6455 (8.1) requires failing the connection: answer
    /// `bad_request`, close 1007.
    NotUtf8,
    /// Bytes that break the WebSocket framing (unmasked frame, reserved bits, bad opcode, ...):
    /// close 1002, so the client learns why instead of seeing the connection simply vanish.
    Protocol,
    /// The connection broke (reset, end of stream without a close frame, I/O error).
    Broken,
}

fn classify(error: &axum::Error) -> ReadError {
    use std::error::Error as _;
    use tokio_tungstenite::tungstenite::error::ProtocolError;
    use tokio_tungstenite::tungstenite::Error as WsError;
    let mut source: Option<&(dyn std::error::Error + 'static)> = error.source();
    while let Some(inner) = source {
        match inner.downcast_ref::<WsError>() {
            Some(WsError::Capacity(_)) => return ReadError::TooLarge,
            Some(WsError::Utf8(_)) => return ReadError::NotUtf8,
            Some(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => {
                return ReadError::Broken
            }
            Some(WsError::Protocol(_)) => return ReadError::Protocol,
            Some(_) => return ReadError::Broken,
            None => source = inner.source(),
        }
    }
    ReadError::Broken
}

/// Sends one message, within `limit` if one is given.
///
/// A send the socket takes at once — nearly every one — sets no timer: the limit is armed only
/// when the first try is pending (a timer costs a clock read and the runtime's timer state on
/// every answer otherwise).
///
/// # Errors
/// Why it was not sent: the socket failed, or the client did not take it within `limit`.
async fn send(
    socket: &mut WebSocket,
    message: Message,
    limit: Option<Duration>,
) -> Result<(), String> {
    let mut sending = std::pin::pin!(socket.send(message));
    if let Some(sent) = sending.as_mut().now_or_never() {
        return sent.map_err(|error| error.to_string());
    }
    let sent = match limit {
        Some(limit) => tokio::time::timeout(limit, sending).await.map_err(|_| {
            format!("the client stopped reading: a send did not complete in {limit:?}")
        })?,
        None => sending.await,
    };
    sent.map_err(|error| error.to_string())
}

/// Sends a close frame (within `limit`); the caller then drops the socket.
async fn close(socket: &mut WebSocket, code: u16, reason: &'static str, limit: Duration) {
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    };
    let _ = send(socket, Message::Close(Some(frame)), Some(limit)).await;
}
