//! The wire protocol: JSON requests in, JSON responses out. Pure data, no I/O.
//!
//! A request is one JSON object per text frame, `{"command": ..., ...}`; the response is one JSON
//! object with `"success": true` and the command's fields, or `"success": false` with a human
//! `"error"` sentence and a stable machine `"code"`. The format is compatible with the original
//! Python server (`keys`, `values`/`value`, `hold_lock`, `success`, `values`, `error`); the
//! additions (`code`, `id`, `tokens`, `timeout_ms`, `mode`, ...) are optional.
//!
//! [`decode`] validates everything a request can get wrong (types, missing fields, empty or
//! duplicate keys, key count and length, value counts) before anything is locked, so an invalid
//! request never has a partial effect.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::lock::{CycleMember, FencingToken, Key, LockError, LockMode, SessionId, Snapshot};
use crate::store::StoreError;

/// Longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;

/// What `decode` needs to know about the server's limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most keys one request may name.
    pub max_keys_per_request: usize,
}

/// A decoded request: the command plus the optional fields every command accepts.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// Echoed in the response, whatever JSON it is.
    pub id: Option<Value>,
    /// Wait limit for commands that take locks; `None` means the server default; zero is a
    /// try-lock.
    pub timeout: Option<Duration>,
    /// What to do.
    pub command: Command,
}

/// The commands.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// Take `keys` in `mode` and keep them.
    Lock { keys: Vec<Key>, mode: LockMode },
    /// Release `keys`.
    Unlock { keys: Vec<Key> },
    /// Read `keys` under shared locks; keep the locks if `hold_lock`.
    Read { keys: Vec<Key>, hold_lock: bool },
    /// Write `values[i]` to `keys[i]` atomically under exclusive locks; keep them if `hold_lock`.
    Write {
        keys: Vec<Key>,
        values: Vec<Value>,
        hold_lock: bool,
    },
    /// Liveness check.
    Ping,
    /// The lock table snapshot.
    Locks,
    /// This connection's session id.
    Session,
}

/// Why a request failed, as sent on the wire. Every variant has a stable [`code`](Self::code).
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request is not valid JSON or has a missing/ill-typed/inconsistent field.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The `command` is not one this server knows.
    #[error("unknown command {0:?}")]
    UnknownCommand(String),
    /// The frame is larger than `--max-message-bytes`.
    #[error("message too large: the limit is {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The request names more keys than `--max-keys-per-request`.
    #[error("too many keys: {count} named, the limit is {limit}")]
    TooManyKeys {
        /// Keys named.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// The server is at its connection limit.
    #[error("server busy: connection limit reached, try again later")]
    ServerBusy,
    /// The server is shutting down; the request was not carried out.
    #[error("server is shutting down")]
    ShuttingDown,
    /// The lock manager refused (deadlock, timeout, not held, ...).
    #[error(transparent)]
    Lock(#[from] LockError),
    /// The value store failed; nothing was written.
    #[error(transparent)]
    Storage(#[from] StoreError),
}

impl ServiceError {
    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ServiceError::BadRequest(_) => "bad_request",
            ServiceError::UnknownCommand(_) => "unknown_command",
            ServiceError::TooLarge { .. } => "too_large",
            ServiceError::TooManyKeys { .. } => "too_many_keys",
            ServiceError::ServerBusy => "server_busy",
            ServiceError::ShuttingDown => "shutting_down",
            // A lock-level invalid request is the client's fault, like any bad request.
            ServiceError::Lock(LockError::InvalidRequest { .. }) => "bad_request",
            ServiceError::Lock(error) => error.code(),
            ServiceError::Storage(error) => error.code(),
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        ServiceError::BadRequest(message.into())
    }
}

/// A successful answer, before encoding.
#[derive(Debug)]
pub enum Reply {
    /// `{"success": true}`.
    Done,
    /// A lock grant: the fencing token of every key.
    Tokens(Vec<(Key, FencingToken)>),
    /// Values read, `null` for keys never written.
    Values(Vec<(Key, Option<Value>)>),
    /// Values written, with the fencing tokens of the exclusive locks they were written under.
    Written(Vec<(Key, FencingToken)>),
    /// The session id of the connection.
    Session(SessionId),
    /// The lock table, taken at `taken_at`.
    Locks {
        /// The snapshot.
        snapshot: Snapshot,
        /// When it was taken (to report how long each waiter has waited).
        taken_at: Instant,
        /// Open sessions.
        sessions: usize,
    },
}

/// Decodes one text frame.
///
/// # Errors
/// The `ServiceError` to answer with, plus the request's `id` if one could be read (so even an
/// error answer echoes it).
pub fn decode(text: &str, limits: Limits) -> Result<Request, (Option<Value>, ServiceError)> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| (None, ServiceError::bad(format!("invalid JSON: {e}"))))?;
    let Value::Object(object) = value else {
        return Err((None, ServiceError::bad("a request must be a JSON object")));
    };
    let id = object.get("id").cloned();
    decode_object(&object, limits).map_err(|e| (id.clone(), e))
}

fn decode_object(object: &Map<String, Value>, limits: Limits) -> Result<Request, ServiceError> {
    let command = match object.get("command") {
        Some(Value::String(command)) => command.as_str(),
        Some(_) => return Err(ServiceError::bad("`command` must be a string")),
        None => return Err(ServiceError::bad("missing field `command`")),
    };
    let timeout = match object.get("timeout_ms") {
        None | Some(Value::Null) => None,
        Some(value) => match value.as_u64() {
            Some(ms) => Some(Duration::from_millis(ms)),
            None => {
                return Err(ServiceError::bad(
                    "`timeout_ms` must be a non-negative integer",
                ))
            }
        },
    };
    let command = match command {
        "lock" => Command::Lock {
            keys: keys(object, limits)?,
            mode: mode(object)?,
        },
        "unlock" => Command::Unlock {
            keys: keys(object, limits)?,
        },
        "read" => Command::Read {
            keys: keys(object, limits)?,
            hold_lock: hold_lock(object)?,
        },
        "write" => {
            let keys = keys(object, limits)?;
            let values = write_values(object, keys.len())?;
            Command::Write {
                keys,
                values,
                hold_lock: hold_lock(object)?,
            }
        }
        "ping" => Command::Ping,
        "locks" => Command::Locks,
        "session" => Command::Session,
        other => return Err(ServiceError::UnknownCommand(other.to_owned())),
    };
    Ok(Request {
        id: object.get("id").cloned(),
        timeout,
        command,
    })
}

/// `keys`: a non-empty array of distinct, non-empty strings of at most [`MAX_KEY_BYTES`] bytes,
/// no more than the limit.
fn keys(object: &Map<String, Value>, limits: Limits) -> Result<Vec<Key>, ServiceError> {
    let array = match object.get("keys") {
        Some(Value::Array(array)) => array,
        Some(_) => return Err(ServiceError::bad("`keys` must be an array of strings")),
        None => return Err(ServiceError::bad("missing field `keys`")),
    };
    if array.is_empty() {
        return Err(ServiceError::bad("`keys` must not be empty"));
    }
    if array.len() > limits.max_keys_per_request {
        return Err(ServiceError::TooManyKeys {
            count: array.len(),
            limit: limits.max_keys_per_request,
        });
    }
    let mut seen = HashSet::with_capacity(array.len());
    let mut keys = Vec::with_capacity(array.len());
    for item in array {
        let Value::String(key) = item else {
            return Err(ServiceError::bad("`keys` must be an array of strings"));
        };
        if key.is_empty() {
            return Err(ServiceError::bad("a key must not be the empty string"));
        }
        if key.len() > MAX_KEY_BYTES {
            return Err(ServiceError::bad(format!(
                "a key must be at most {MAX_KEY_BYTES} bytes"
            )));
        }
        if !seen.insert(key.as_str()) {
            return Err(ServiceError::bad(format!("duplicate key {key:?}")));
        }
        keys.push(Key::from(key.as_str()));
    }
    Ok(keys)
}

/// `mode`: `"read"` or `"write"`, default `"write"`.
fn mode(object: &Map<String, Value>) -> Result<LockMode, ServiceError> {
    match object.get("mode") {
        None | Some(Value::Null) => Ok(LockMode::Exclusive),
        Some(Value::String(mode)) if mode == "write" => Ok(LockMode::Exclusive),
        Some(Value::String(mode)) if mode == "read" => Ok(LockMode::Shared),
        Some(_) => Err(ServiceError::bad("`mode` must be \"read\" or \"write\"")),
    }
}

/// `hold_lock`: a boolean, default false.
fn hold_lock(object: &Map<String, Value>) -> Result<bool, ServiceError> {
    match object.get("hold_lock") {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(hold)) => Ok(*hold),
        Some(_) => Err(ServiceError::bad("`hold_lock` must be a boolean")),
    }
}

/// The values of a write: `"values": [..]` with one per key, or the original server's `"value"`:
/// the value itself for one key, an array of one value per key for several.
fn write_values(object: &Map<String, Value>, key_count: usize) -> Result<Vec<Value>, ServiceError> {
    let values = match (object.get("values"), object.get("value")) {
        (Some(_), Some(_)) => {
            return Err(ServiceError::bad(
                "give either `values` or `value`, not both",
            ))
        }
        (Some(Value::Array(values)), None) => values.clone(),
        (Some(_), None) => return Err(ServiceError::bad("`values` must be an array")),
        (None, Some(value)) if key_count == 1 => vec![value.clone()],
        (None, Some(Value::Array(values))) => values.clone(),
        (None, Some(_)) => {
            return Err(ServiceError::bad(
                "with several keys, `value` must be an array of one value per key",
            ))
        }
        (None, None) => return Err(ServiceError::bad("missing field `values`")),
    };
    if values.len() != key_count {
        return Err(ServiceError::bad(format!(
            "{key_count} keys but {} values",
            values.len()
        )));
    }
    Ok(values)
}

/// Encodes a successful reply.
pub fn encode_reply(id: Option<&Value>, reply: &Reply) -> String {
    let mut object = Map::new();
    object.insert("success".into(), Value::Bool(true));
    match reply {
        Reply::Done => {}
        Reply::Tokens(tokens) => {
            object.insert("tokens".into(), tokens_object(tokens));
        }
        Reply::Values(values) => {
            let values: Map<String, Value> = values
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone().unwrap_or(Value::Null)))
                .collect();
            object.insert("values".into(), Value::Object(values));
        }
        Reply::Written(tokens) => {
            object.insert("tokens".into(), tokens_object(tokens));
        }
        Reply::Session(session) => {
            object.insert("session".into(), Value::String(session.to_string()));
        }
        Reply::Locks {
            snapshot,
            taken_at,
            sessions,
        } => {
            object.insert("locks".into(), locks_array(snapshot, *taken_at));
            let edges: Vec<Value> = snapshot
                .waits_for
                .iter()
                .map(|(waiter, holder)| {
                    json!({"waiter": waiter.to_string(), "waits_for": holder.to_string()})
                })
                .collect();
            object.insert("waits_for".into(), Value::Array(edges));
            object.insert("sessions".into(), json!(sessions));
        }
    }
    finish(object, id)
}

/// Encodes an error answer: `success: false`, a human `error`, the stable `code`, and the
/// details some codes carry (`cycle` for `deadlock`, `keys` for `not_held`, `key` for `timeout`).
pub fn encode_error(id: Option<&Value>, error: &ServiceError) -> String {
    let mut object = Map::new();
    object.insert("success".into(), Value::Bool(false));
    object.insert("error".into(), Value::String(error.to_string()));
    object.insert("code".into(), Value::String(error.code().into()));
    match error {
        ServiceError::Lock(LockError::Deadlock { cycle }) => {
            object.insert("cycle".into(), cycle_array(cycle));
        }
        ServiceError::Lock(LockError::NotHeld { keys }) => {
            let keys = keys.iter().map(|k| Value::String(k.to_string())).collect();
            object.insert("keys".into(), Value::Array(keys));
        }
        ServiceError::Lock(LockError::Timeout { key }) => {
            object.insert("key".into(), Value::String(key.to_string()));
        }
        _ => {}
    }
    finish(object, id)
}

/// The `cycle` of a deadlock answer: `[{"session": .., "waiting_for_key": ..}, ...]`.
pub fn cycle_array(cycle: &[CycleMember]) -> Value {
    Value::Array(
        cycle
            .iter()
            .map(|m| {
                json!({"session": m.session.to_string(), "waiting_for_key": m.waiting_for_key.as_str()})
            })
            .collect(),
    )
}

fn tokens_object(tokens: &[(Key, FencingToken)]) -> Value {
    Value::Object(
        tokens
            .iter()
            .map(|(k, t)| (k.to_string(), json!(t.0)))
            .collect(),
    )
}

fn mode_name(mode: LockMode) -> &'static str {
    match mode {
        LockMode::Shared => "read",
        LockMode::Exclusive => "write",
    }
}

fn locks_array(snapshot: &Snapshot, taken_at: Instant) -> Value {
    Value::Array(
        snapshot
            .keys
            .iter()
            .map(|key| {
                let holders: Vec<Value> = key
                    .holders
                    .iter()
                    .map(|h| {
                        json!({"session": h.session.to_string(), "mode": mode_name(h.mode), "token": h.token.0})
                    })
                    .collect();
                let waiters: Vec<Value> = key
                    .queue
                    .iter()
                    .map(|w| {
                        json!({
                            "session": w.session.to_string(),
                            "mode": mode_name(w.mode),
                            "upgrade": w.upgrade,
                            "waiting_ms": taken_at.saturating_duration_since(w.since).as_millis() as u64,
                        })
                    })
                    .collect();
                json!({"key": key.key.as_str(), "holders": holders, "waiters": waiters})
            })
            .collect(),
    )
}

fn finish(mut object: Map<String, Value>, id: Option<&Value>) -> String {
    if let Some(id) = id {
        object.insert("id".into(), id.clone());
    }
    Value::Object(object).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: Limits = Limits {
        max_keys_per_request: 4,
    };

    fn decode_ok(text: &str) -> Request {
        decode(text, LIMITS).expect("valid request")
    }

    fn decode_code(text: &str) -> &'static str {
        match decode(text, LIMITS) {
            Ok(request) => panic!("{text} decoded as {request:?}"),
            Err((_, error)) => error.code(),
        }
    }

    #[test]
    fn lock_without_mode_means_write() {
        let request = decode_ok(r#"{"command":"lock","keys":["a"]}"#);
        assert_eq!(
            request.command,
            Command::Lock {
                keys: vec!["a".into()],
                mode: LockMode::Exclusive
            }
        );
    }

    #[test]
    fn write_accepts_the_original_single_value_form() {
        let request = decode_ok(r#"{"command":"write","keys":["a"],"value":[1,2]}"#);
        assert_eq!(
            request.command,
            Command::Write {
                keys: vec!["a".into()],
                values: vec![json!([1, 2])],
                hold_lock: false
            }
        );
    }

    #[test]
    fn write_accepts_the_original_multi_value_form() {
        let request = decode_ok(r#"{"command":"write","keys":["a","b"],"value":[1,"x"]}"#);
        let Command::Write { values, .. } = request.command else {
            panic!("not a write");
        };
        assert_eq!(values, vec![json!(1), json!("x")]);
    }

    #[test]
    fn write_with_mismatched_value_count_is_a_bad_request() {
        assert_eq!(
            decode_code(r#"{"command":"write","keys":["a","b"],"values":[1]}"#),
            "bad_request"
        );
        assert_eq!(
            decode_code(r#"{"command":"write","keys":["a","b"],"value":5}"#),
            "bad_request"
        );
    }

    #[test]
    fn empty_duplicate_and_oversized_keys_are_bad_requests() {
        assert_eq!(
            decode_code(r#"{"command":"lock","keys":[]}"#),
            "bad_request"
        );
        assert_eq!(
            decode_code(r#"{"command":"lock","keys":[""]}"#),
            "bad_request"
        );
        assert_eq!(
            decode_code(r#"{"command":"lock","keys":["a","a"]}"#),
            "bad_request"
        );
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        assert_eq!(
            decode_code(&format!(r#"{{"command":"lock","keys":["{long}"]}}"#)),
            "bad_request"
        );
    }

    #[test]
    fn too_many_keys_has_its_own_code() {
        assert_eq!(
            decode_code(r#"{"command":"lock","keys":["a","b","c","d","e"]}"#),
            "too_many_keys"
        );
    }

    #[test]
    fn unknown_command_has_its_own_code_and_keeps_the_id() {
        let Err((id, error)) = decode(r#"{"command":"dance","id":7}"#, LIMITS) else {
            panic!("decoded");
        };
        assert_eq!(error.code(), "unknown_command");
        assert_eq!(id, Some(json!(7)));
    }

    #[test]
    fn timeout_ms_must_be_a_non_negative_integer() {
        assert_eq!(
            decode_code(r#"{"command":"lock","keys":["a"],"timeout_ms":-1}"#),
            "bad_request"
        );
        let request = decode_ok(r#"{"command":"lock","keys":["a"],"timeout_ms":0}"#);
        assert_eq!(request.timeout, Some(Duration::ZERO));
    }

    #[test]
    fn error_answers_carry_success_false_error_and_code() {
        let text = encode_error(Some(&json!("x")), &ServiceError::ShuttingDown);
        let value: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(value["success"], json!(false));
        assert_eq!(value["code"], json!("shutting_down"));
        assert_eq!(value["id"], json!("x"));
        assert!(value["error"].as_str().is_some_and(|e| !e.is_empty()));
    }

    proptest! {
        /// The decoder never panics, whatever bytes arrive, and every rejection has a code.
        #[test]
        fn decoder_survives_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let text = String::from_utf8_lossy(&bytes);
            if let Err((_, error)) = decode(&text, LIMITS) {
                prop_assert!(!error.code().is_empty());
            }
        }

        /// The decoder never panics on arbitrary JSON, including near-miss requests.
        #[test]
        fn decoder_survives_arbitrary_json(value in arbitrary_json(), command in prop::sample::select(vec!["lock", "unlock", "read", "write", "ping", "x"])) {
            let mut object = Map::new();
            object.insert("command".into(), Value::String(command.into()));
            object.insert("keys".into(), value.clone());
            object.insert("values".into(), value.clone());
            object.insert("mode".into(), value.clone());
            object.insert("hold_lock".into(), value.clone());
            object.insert("timeout_ms".into(), value.clone());
            for text in [value.to_string(), Value::Object(object).to_string()] {
                match decode(&text, LIMITS) {
                    Ok(request) => {
                        let empty_keys = matches!(&request.command, Command::Lock { keys, .. } if keys.is_empty());
                        prop_assert!(!empty_keys);
                    }
                    Err((_, error)) => prop_assert!(!error.code().is_empty()),
                }
            }
        }
    }

    fn arbitrary_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|n| json!(n)),
            "[a-z]{0,3}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::vec(("[a-z]{1,3}", inner), 0..4)
                    .prop_map(|entries| Value::Object(entries.into_iter().collect())),
            ]
        })
    }
}
