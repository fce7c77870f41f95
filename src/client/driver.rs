//! The task that owns a client's WebSocket: it numbers each call, sends it, matches every answer
//! to its call by that number (`id`), pings a quiet connection, and when the connection ends,
//! fails every call still waiting and says why.
//!
//! Calls are matched by `id`, not by order, so any number of them may be in flight at once
//! (pipelining); the server answers them in order anyway, except a `cancel`, which is answered
//! as soon as it arrives.
//!
//! A resumable session (one whose `hello` answer carried a resume secret) outlives its
//! connection: when the connection breaks, the calls in flight still fail, and then the driver
//! reconnects and resumes the session (see [`resume`](super::resume)) instead of ending.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Map, Value};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use super::resume::{self, Reconnected, ResumeWatch, Resumption, Waiting};
use super::{ClientBuilder, ClientError};
use crate::protocol;

/// The client's socket.
pub(crate) type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long closing waits for the server's close frame.
const CLOSE_LIMIT: Duration = Duration::from_secs(5);

/// The answer to one call: the whole answer object when it succeeded.
pub(crate) type Answer = Result<Value, ClientError>;

/// What a [`Client`](super::Client) asks of its driver.
pub(crate) enum Order {
    /// Send this request (the driver adds the `id`) and answer on the channel.
    Call {
        request: Map<String, Value>,
        answer: oneshot::Sender<Answer>,
    },
    /// Close the connection cleanly; acknowledge when done.
    Close { done: oneshot::Sender<()> },
}

/// How the connection ended, shared between the driver and the client handles.
#[derive(Clone, Default)]
pub(crate) struct Ending {
    /// Cancelled once the connection has ended.
    pub ended: CancellationToken,
    /// Why it ended; set before `ended` is cancelled.
    reason: Arc<Mutex<Option<ClientError>>>,
}

impl Ending {
    /// The error calls get once the connection has ended.
    pub(crate) fn error(&self) -> ClientError {
        self.reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_else(|| ClientError::ConnectionLost {
                reason: "the connection ended".into(),
            })
    }

    fn end(&self, error: ClientError) {
        *self.reason.lock().unwrap_or_else(PoisonError::into_inner) = Some(error);
        self.ended.cancel();
    }
}

/// Runs the session until it ends: the client closes it, every client handle is dropped, or its
/// connection ends — the server closes it, it breaks, or (with `keepalive`) nothing arrives for
/// three intervals. A resumable session's connection that ends is replaced by a new one
/// (dialled with `dialer`) on which the session is resumed; the session then ends only when it
/// cannot be resumed. `watch` tells the client handles about resumes.
pub(crate) async fn drive(
    socket: Socket,
    mut orders: mpsc::UnboundedReceiver<Order>,
    ending: Ending,
    keepalive: Option<Duration>,
    dialer: ClientBuilder,
    watch: ResumeWatch,
) {
    let mut link = Link {
        socket,
        pending: HashMap::new(),
        next_id: 1,
        last_heard: Instant::now(),
        resumption: None,
        watch,
    };
    let mut waiting: VecDeque<Waiting> = VecDeque::new();
    // The session's error, the client's close to acknowledge, and whether the connection is
    // still there to be closed politely.
    let (error, closed_by_client, open) = loop {
        let ended = link.serve(&mut orders, &mut waiting, keepalive).await;
        link.fail_pending(&ended.error);
        let resumption = match (&ended.how, &link.resumption) {
            (How::Broken, Some(resumption)) => resumption.clone(),
            _ => {
                let closed_by_client = match ended.how {
                    How::ClosedByClient(done) => Some(done),
                    _ => None,
                };
                break (ended.error, closed_by_client, true);
            }
        };
        let reconnected = resume::reconnect(
            &dialer,
            &resumption,
            link.last_heard,
            &mut link.next_id,
            &mut orders,
            &mut waiting,
            &link.watch,
        )
        .await;
        match reconnected {
            Reconnected::Resumed { socket, answer } => {
                link.socket = *socket;
                link.last_heard = Instant::now();
                link.learn_resumption(&answer);
            }
            Reconnected::GaveUp(error) => break (error, None, false),
            Reconnected::ClosedByClient(done) => {
                break (lost("closed by the client".into()), Some(done), false)
            }
            Reconnected::Dropped => {
                break (lost("every client handle was dropped".into()), None, false)
            }
        }
    };
    ending.end(error.clone());
    link.fail_pending(&error);
    for (_, caller) in waiting.drain(..) {
        let _ = caller.send(Err(error.clone()));
    }
    // Close politely whoever ended it; the server releases the session's locks either way.
    if open {
        link.close_politely().await;
    }
    if let Some(done) = closed_by_client {
        let _ = done.send(());
    }
}

/// One call sent and not yet answered.
struct Pending {
    /// Where its answer goes.
    answer: oneshot::Sender<Answer>,
    /// Whether it is a `hello`, whose answer says whether the session is resumable.
    hello: bool,
}

/// How one connection ended.
enum How {
    /// It broke, went silent, or the server closed it with 1001 (its idle timeout): a
    /// resumable session is resumed.
    Broken,
    /// It ended for good: the server ended the session (taken over, killed, shut down, closed
    /// for cause), or sent something unreadable.
    Final,
    /// The client closed it; acknowledge on the channel once done.
    ClosedByClient(oneshot::Sender<()>),
    /// Every client handle was dropped.
    Dropped,
}

/// One connection's end: how, and the error its calls in flight get.
struct Ended {
    how: How,
    error: ClientError,
}

/// The driver's state: the current connection and the calls on it.
struct Link {
    /// The current connection.
    socket: Socket,
    /// Calls sent on `socket` and not yet answered, by `id`.
    pending: HashMap<u64, Pending>,
    /// The `id` of the next request; never reused, not even across connections.
    next_id: u64,
    /// When the server last sent a frame: a resumable session's grace counts from here.
    last_heard: Instant,
    /// How to resume the session, while it is resumable.
    resumption: Option<Resumption>,
    /// What the client handles see of it.
    watch: ResumeWatch,
}

impl Link {
    /// Serves the current connection until it ends: first sends the calls that waited for it,
    /// then sends calls and matches answers, pinging a quiet connection.
    async fn serve(
        &mut self,
        orders: &mut mpsc::UnboundedReceiver<Order>,
        waiting: &mut VecDeque<Waiting>,
        keepalive: Option<Duration>,
    ) -> Ended {
        while let Some((request, answer)) = waiting.pop_front() {
            if let Err(error) = self.send(request, answer).await {
                return Ended {
                    how: How::Broken,
                    error,
                };
            }
        }
        // An error answer that names no call (`server_busy` before a close, `too_large`): the
        // calls still waiting fail with it rather than with a bare "connection lost".
        let mut unsolicited: Option<ClientError> = None;
        // Whether the server said it ended the session (`shutting_down`, `killed`,
        // `taken_over`): then the connection's end is the session's end.
        let mut released = false;
        let mut last_poke = self.last_heard;
        loop {
            let interval = self.keepalive_interval(keepalive);
            let poke = async {
                match interval {
                    Some(interval) => tokio::time::sleep_until(last_poke + interval).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                order = orders.recv() => match order {
                    Some(Order::Call { request, answer }) => {
                        if let Err(error) = self.send(request, answer).await {
                            return Ended { how: How::Broken, error };
                        }
                    }
                    Some(Order::Close { done }) => {
                        return Ended {
                            how: How::ClosedByClient(done),
                            error: lost("closed by the client".into()),
                        };
                    }
                    None => {
                        return Ended {
                            how: How::Dropped,
                            error: lost("every client handle was dropped".into()),
                        };
                    }
                },
                frame = self.socket.next() => {
                    self.last_heard = Instant::now();
                    last_poke = self.last_heard;
                    // `released`: the server has ended the session itself, so it is not resumed.
                    let ended = |unsolicited: Option<ClientError>, reason: String, released: bool| Ended {
                        how: if released { How::Final } else { How::Broken },
                        error: unsolicited.unwrap_or_else(|| lost(reason)),
                    };
                    match frame {
                        Some(Ok(Message::Text(text))) => {
                            let answer: Value = match serde_json::from_str(text.as_str()) {
                                Ok(answer) => answer,
                                Err(error) => {
                                    return Ended {
                                        how: How::Final,
                                        error: ClientError::UnexpectedAnswer(format!("not JSON: {error}")),
                                    };
                                }
                            };
                            if let Some(error) = self.answer(answer, &mut released) {
                                unsolicited = Some(error);
                            }
                        }
                        Some(Ok(Message::Close(frame))) => {
                            let reason = match frame {
                                Some(frame) => {
                                    let code = u16::from(frame.code);
                                    if code == POLICY && frame.reason == protocol::TAKEN_OVER_CLOSE_REASON {
                                        unsolicited = Some(ClientError::TakenOver(frame.reason.to_string()));
                                    }
                                    let shutdown = code == GOING_AWAY && frame.reason == protocol::SHUTDOWN_CLOSE_REASON;
                                    // Only the idle timeout (1001, with another reason than a
                                    // shutdown's) leaves the session suspended; a shutdown, a
                                    // kill, a takeover or a connection closed for cause releases
                                    // it.
                                    released |= code != GOING_AWAY || shutdown;
                                    format!("the server closed the connection ({code}: {})", frame.reason)
                                }
                                None => "the server closed the connection".into(),
                            };
                            return ended(unsolicited, reason, released);
                        }
                        Some(Ok(_)) => {}
                        Some(Err(error)) => return ended(unsolicited, error.to_string(), released),
                        None => return ended(unsolicited, "the connection ended".into(), released),
                    }
                }
                () = poke => {
                    let Some(interval) = interval else { continue };
                    if self.last_heard.elapsed() >= interval * 3 {
                        return Ended {
                            how: How::Broken,
                            error: lost(format!("nothing heard from the server for {:?}", interval * 3)),
                        };
                    }
                    if let Err(error) = self.socket.send(Message::Ping(Default::default())).await {
                        return Ended {
                            how: How::Broken,
                            error: lost(format!("keepalive ping failed: {error}")),
                        };
                    }
                    last_poke = Instant::now();
                }
            }
        }
    }

    /// The ping interval: `keepalive`, and for a resumable session at most a quarter of its
    /// grace, so that a silent connection is noticed while the session can still be resumed.
    fn keepalive_interval(&self, keepalive: Option<Duration>) -> Option<Duration> {
        let keepalive = keepalive?;
        Some(match &self.resumption {
            Some(resumption) => keepalive.min(resumption.grace / 4),
            None => keepalive,
        })
    }

    /// Numbers `request`, sends it and remembers its caller. If sending fails, the caller is
    /// answered with the error, which is returned.
    async fn send(
        &mut self,
        mut request: Map<String, Value>,
        answer: oneshot::Sender<Answer>,
    ) -> Result<(), ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let hello = request.get("command").and_then(Value::as_str) == Some("hello");
        request.insert("id".into(), Value::from(id));
        let text = Value::Object(request).to_string();
        if let Err(error) = self.socket.send(Message::text(text)).await {
            let error = lost(format!("sending failed: {error}"));
            let _ = answer.send(Err(error.clone()));
            return Err(error);
        }
        self.pending.insert(id, Pending { answer, hello });
        Ok(())
    }

    /// Passes `answer` to its call. Returns the error of an error answer that names no call, or
    /// `taken_over` (which every call still in flight gets too). Sets `released` when the
    /// answer says the server ended the session.
    fn answer(&mut self, answer: Value, released: &mut bool) -> Option<ClientError> {
        let succeeded = answer["success"] == Value::Bool(true);
        let error = (!succeeded).then(|| ClientError::from_answer(&answer));
        if let Some(
            ClientError::ShuttingDown(_) | ClientError::Killed(_) | ClientError::TakenOver(_),
        ) = error
        {
            *released = true;
        }
        let call = answer
            .get("id")
            .and_then(Value::as_u64)
            .and_then(|id| self.pending.remove(&id));
        let Some(call) = call else {
            return error;
        };
        let result = match error {
            None => {
                if call.hello {
                    self.learn_resumption(&answer);
                }
                Ok(answer)
            }
            Some(error @ ClientError::TakenOver(_)) => {
                let _ = call.answer.send(Err(error.clone()));
                return Some(error);
            }
            Some(error) => Err(error),
        };
        // The caller may have stopped waiting; nothing to do then.
        let _ = call.answer.send(result);
        None
    }

    /// Takes in what a successful `hello` or `resume` answer says about resuming.
    fn learn_resumption(&mut self, answer: &Value) {
        self.resumption = Resumption::from_answer(answer);
        self.watch.set(self.resumption.as_ref());
    }

    /// Fails every call in flight with `error`.
    fn fail_pending(&mut self, error: &ClientError) {
        for (_, call) in self.pending.drain() {
            let _ = call.answer.send(Err(error.clone()));
        }
    }

    /// Closes the connection with a close frame, so that the server releases the session at
    /// once (resumable or not), waiting at most [`CLOSE_LIMIT`] for the server's close frame.
    async fn close_politely(&mut self) {
        let _ = tokio::time::timeout(CLOSE_LIMIT, async {
            let _ = self.socket.close(None).await;
            while let Some(Ok(_)) = self.socket.next().await {}
        })
        .await;
    }
}

/// The close code of a connection the server ended by policy: a kill, a session taken over, too
/// many pipelined requests.
const POLICY: u16 = 1008;
/// The close code of the server's idle timeout (which suspends a resumable session) and of its
/// shutdown (which does not).
const GOING_AWAY: u16 = 1001;

fn lost(reason: String) -> ClientError {
    ClientError::ConnectionLost { reason }
}
