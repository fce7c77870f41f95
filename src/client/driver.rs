//! The task that owns a client's WebSocket: it numbers each call, sends it, matches every answer
//! to its call by that number (`id`), pings a quiet connection, and when the connection ends,
//! fails every call still waiting and says why.
//!
//! Calls are matched by `id`, not by order, so any number of them may be in flight at once
//! (pipelining); the server answers them in order anyway, except a `cancel`, which is answered
//! as soon as it arrives.

use std::collections::HashMap;
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

use super::ClientError;

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

/// Runs the connection until it ends: the client closes it, every client handle is dropped, the
/// server closes it, it breaks, or (with `keepalive`) nothing arrives for three intervals.
pub(crate) async fn drive(
    mut socket: Socket,
    mut orders: mpsc::UnboundedReceiver<Order>,
    ending: Ending,
    keepalive: Option<Duration>,
) {
    let mut pending: HashMap<u64, oneshot::Sender<Answer>> = HashMap::new();
    let mut next_id: u64 = 1;
    // An error answer that names no call (`server_busy` before a close, `too_large`): the
    // calls still waiting fail with it rather than with a bare "connection lost".
    let mut unsolicited: Option<ClientError> = None;
    let mut last_heard = Instant::now();
    let mut last_poke = last_heard;
    let mut closed_by_client: Option<oneshot::Sender<()>> = None;
    let error = loop {
        let poke = async {
            match keepalive {
                Some(interval) => tokio::time::sleep_until(last_poke + interval).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            order = orders.recv() => match order {
                Some(Order::Call { mut request, answer }) => {
                    let id = next_id;
                    next_id += 1;
                    request.insert("id".into(), Value::from(id));
                    let text = Value::Object(request).to_string();
                    if let Err(error) = socket.send(Message::text(text)).await {
                        let error = lost(format!("sending failed: {error}"));
                        let _ = answer.send(Err(error.clone()));
                        break error;
                    }
                    pending.insert(id, answer);
                }
                Some(Order::Close { done }) => {
                    closed_by_client = Some(done);
                    break lost("closed by the client".into());
                }
                None => break lost("every client handle was dropped".into()),
            },
            frame = socket.next() => {
                last_heard = Instant::now();
                last_poke = last_heard;
                match frame {
                    Some(Ok(Message::Text(text))) => {
                        let answer: Value = match serde_json::from_str(text.as_str()) {
                            Ok(answer) => answer,
                            Err(error) => break ClientError::UnexpectedAnswer(format!("not JSON: {error}")),
                        };
                        match answer.get("id").and_then(Value::as_u64).and_then(|id| pending.remove(&id)) {
                            Some(caller) => {
                                let result = if answer["success"] == Value::Bool(true) {
                                    Ok(answer)
                                } else {
                                    Err(ClientError::from_answer(&answer))
                                };
                                // The caller may have stopped waiting; nothing to do then.
                                let _ = caller.send(result);
                            }
                            None if answer["success"] == Value::Bool(false) => {
                                unsolicited = Some(ClientError::from_answer(&answer));
                            }
                            None => {}
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        let reason = match frame {
                            Some(frame) => format!(
                                "the server closed the connection ({}: {})",
                                u16::from(frame.code),
                                frame.reason
                            ),
                            None => "the server closed the connection".into(),
                        };
                        break unsolicited.take().unwrap_or(lost(reason));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(error)) => break unsolicited.take().unwrap_or(lost(error.to_string())),
                    None => break unsolicited.take().unwrap_or(lost("the connection ended".into())),
                }
            }
            () = poke => {
                let Some(interval) = keepalive else { continue };
                if last_heard.elapsed() >= interval * 3 {
                    break lost(format!("nothing heard from the server for {:?}", interval * 3));
                }
                if let Err(error) = socket.send(Message::Ping(Default::default())).await {
                    break lost(format!("keepalive ping failed: {error}"));
                }
                last_poke = Instant::now();
            }
        }
    };
    ending.end(error.clone());
    for (_, caller) in pending.drain() {
        let _ = caller.send(Err(error.clone()));
    }
    // Close politely whoever ended it; the server releases the session's locks either way.
    let _ = tokio::time::timeout(CLOSE_LIMIT, async {
        let _ = socket.close(None).await;
        while let Some(Ok(_)) = socket.next().await {}
    })
    .await;
    if let Some(done) = closed_by_client {
        let _ = done.send(());
    }
}

fn lost(reason: String) -> ClientError {
    ClientError::ConnectionLost { reason }
}
