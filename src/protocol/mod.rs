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
//!
//! Layout: [`fast`] decodes the common requests in one pass, without a `Value` tree; a frame it
//! does not accept goes to the reference decoder here (the whole frame read into a `Value`),
//! which decides every error. [`encode`] writes answers straight into their `String`.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use uuid::Uuid;

mod encode;
mod fast;

pub use encode::{encode_error, encode_reply};

use crate::auth::Secret;
use crate::lock::{CycleMember, FencingToken, Key, LockError, LockMode, SessionId, Snapshot};
use crate::store::{KeysPage, StoreError};

/// Longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;

/// Longest session name accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 128;

/// Keys a `keys` page lists when the request gives no `limit`.
pub const DEFAULT_KEYS_LIMIT: usize = 1000;

/// Most keys one `keys` page may list.
pub const MAX_KEYS_LIMIT: usize = 10_000;

/// Keys a `locks` answer, and sessions a `sessions` answer, list when the request gives no
/// `limit`: one answer stays small (about 200 KB) whatever the size of the table.
pub const DEFAULT_LIST_LIMIT: usize = 1000;

/// Most keys a `locks` answer, or sessions a `sessions` answer, may list.
pub const MAX_LIST_LIMIT: usize = 100_000;

/// The reason of the close frame (code 1001) that ends every connection at shutdown. The idle
/// timeout also closes with 1001, but leaves a resumable session suspended; a client tells the
/// two apart by this reason.
pub const SHUTDOWN_CLOSE_REASON: &str = "server shutting down";

/// The reason of the close frame (code 1008) that ends a connection whose session was resumed
/// on another connection.
pub const TAKEN_OVER_CLOSE_REASON: &str = "session resumed on another connection";

/// The server's version, in the `hello` answer.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

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
    /// Like `Write`, but removes the keys (under the same exclusive locks).
    Delete { keys: Vec<Key>, hold_lock: bool },
    /// Liveness check.
    Ping,
    /// The lock table snapshot: the first `limit` keys (in key order) starting with `prefix`.
    Locks { prefix: String, limit: usize },
    /// This connection's session id.
    Session,
    /// Names the session (when `name` is given), sets its grace period (when `grace` is
    /// given: zero makes it non-resumable), and answers its id, the server's version and, for a
    /// resumable session, its grace and resume secret.
    Hello {
        name: Option<String>,
        grace: Option<Duration>,
    },
    /// Makes this connection the connection of `session`, a resumable session whose connection
    /// dropped (or is about to be taken over), if `secret` is its resume secret. The connection
    /// layer carries it out, since it changes the connection's session.
    Resume { session: SessionId, secret: Secret },
    /// The first `limit` open sessions, by id.
    Sessions { limit: usize },
    /// A page of the keys that have a value: starting with `prefix`, after `after`, at most
    /// `limit`. Takes no locks.
    Keys {
        prefix: String,
        after: Option<String>,
        limit: usize,
    },
    /// Withdraws this session's lock wait. Carried out when its frame arrives, not in turn.
    Cancel,
    /// Ends another session (admin connections only).
    Kill { session: SessionId },
}

impl Command {
    /// Which command this is, without its fields.
    pub fn kind(&self) -> CommandKind {
        match self {
            Command::Lock { .. } => CommandKind::Lock,
            Command::Unlock { .. } => CommandKind::Unlock,
            Command::Read { .. } => CommandKind::Read,
            Command::Write { .. } => CommandKind::Write,
            Command::Delete { .. } => CommandKind::Delete,
            Command::Ping => CommandKind::Ping,
            Command::Locks { .. } => CommandKind::Locks,
            Command::Session => CommandKind::Session,
            Command::Hello { .. } => CommandKind::Hello,
            Command::Resume { .. } => CommandKind::Resume,
            Command::Sessions { .. } => CommandKind::Sessions,
            Command::Keys { .. } => CommandKind::Keys,
            Command::Cancel => CommandKind::Cancel,
            Command::Kill { .. } => CommandKind::Kill,
        }
    }
}

/// The commands by name only: what the metrics label a request with. The set is fixed, so a
/// recorder can keep one slot per kind (`kind as usize`). Each variant is the [`Command`] of
/// the same name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CommandKind {
    Lock,
    Unlock,
    Read,
    Write,
    Delete,
    Ping,
    Locks,
    Session,
    Hello,
    Resume,
    Sessions,
    Keys,
    Cancel,
    Kill,
}

impl CommandKind {
    /// Every kind, in declaration order (`ALL[k as usize] == k`).
    pub const ALL: [CommandKind; 14] = [
        CommandKind::Lock,
        CommandKind::Unlock,
        CommandKind::Read,
        CommandKind::Write,
        CommandKind::Delete,
        CommandKind::Ping,
        CommandKind::Locks,
        CommandKind::Session,
        CommandKind::Hello,
        CommandKind::Resume,
        CommandKind::Sessions,
        CommandKind::Keys,
        CommandKind::Cancel,
        CommandKind::Kill,
    ];

    /// The `command` field that names it.
    pub fn name(self) -> &'static str {
        match self {
            CommandKind::Lock => "lock",
            CommandKind::Unlock => "unlock",
            CommandKind::Read => "read",
            CommandKind::Write => "write",
            CommandKind::Delete => "delete",
            CommandKind::Ping => "ping",
            CommandKind::Locks => "locks",
            CommandKind::Session => "session",
            CommandKind::Hello => "hello",
            CommandKind::Resume => "resume",
            CommandKind::Sessions => "sessions",
            CommandKind::Keys => "keys",
            CommandKind::Cancel => "cancel",
            CommandKind::Kill => "kill",
        }
    }

    /// The kind a `command` field names, if it names one.
    pub fn from_name(name: &str) -> Option<Self> {
        CommandKind::ALL
            .into_iter()
            .find(|kind| kind.name() == name)
    }
}

/// A frame that could not be decoded into a [`Request`]: what is known of it, and why.
#[derive(Debug)]
pub struct Undecoded {
    /// The request's `id`, if it could be read (an error answer echoes it).
    pub id: Option<Value>,
    /// The command it names, if its `command` field names one (`None`: not even that could be
    /// read, or the command is unknown).
    pub command: Option<CommandKind>,
    /// The error to answer with.
    pub error: ServiceError,
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
    /// A deadlock, with the names of the cycle's members that have one (the lock manager knows
    /// no names; the session adds them).
    #[error("deadlock: {}", describe_named_cycle(cycle))]
    Deadlock {
        /// The cycle, starting with the requester.
        cycle: Vec<NamedMember>,
    },
    /// An administrator killed this session: the request was not carried out (or its effect
    /// was undone with the session's locks).
    #[error("killed by an administrator")]
    Killed,
    /// The connection may not do this (e.g. `kill` without the admin token).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// What the request names does not exist (e.g. `kill` of a session that is not open).
    #[error("not found: {0}")]
    NotFound(String),
    /// `resume` named a session that is not open: its grace ran out, it was released or
    /// killed, it never existed, or the server restarted (locks are not persistent).
    #[error("session expired: {0}")]
    SessionExpired(String),
    /// This session was resumed on another connection; this connection no longer serves it.
    #[error("taken over: the session was resumed on another connection")]
    TakenOver,
}

/// A member of a deadlock cycle with its session's name, if it has one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedMember {
    /// The member as the lock manager reported it.
    pub member: CycleMember,
    /// Its session's name (`hello` or `?name=`), if set.
    pub name: Option<String>,
}

fn describe_named_cycle(cycle: &[NamedMember]) -> String {
    cycle
        .iter()
        .map(|m| match &m.name {
            Some(name) => format!(
                "session {} ({name}) waits for key {}",
                m.member.session, m.member.waiting_for_key
            ),
            None => format!(
                "session {} waits for key {}",
                m.member.session, m.member.waiting_for_key
            ),
        })
        .collect::<Vec<_>>()
        .join(" -> ")
}

/// One open session, as `sessions` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionInfo {
    /// Its id.
    pub session: SessionId,
    /// Its name, if set.
    pub name: Option<String>,
    /// The client's address.
    pub peer: std::net::SocketAddr,
    /// How long it has been connected, in milliseconds.
    pub connected_ms: u64,
    /// How many keys it holds.
    pub held: usize,
    /// The key its request waits on, if it waits.
    pub waiting_for: Option<Key>,
    /// How long it has been suspended (its connection dropped; it may be resumed), in
    /// milliseconds; `None` while it is connected.
    pub suspended_ms: Option<u64>,
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
            ServiceError::Deadlock { .. } => "deadlock",
            ServiceError::Killed => "killed",
            ServiceError::Forbidden(_) => "forbidden",
            ServiceError::NotFound(_) => "not_found",
            ServiceError::SessionExpired(_) => "session_expired",
            ServiceError::TakenOver => "taken_over",
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
        /// When it was taken (to report how long each waiter has waited and each holder held).
        taken_at: Instant,
        /// Open sessions.
        sessions: usize,
        /// The names of the sessions that have one.
        names: HashMap<SessionId, String>,
        /// When each suspended session was suspended (see [`crate::suspension`]).
        suspended: HashMap<SessionId, Instant>,
        /// Keys that matched but were not listed (over the `limit`).
        more: usize,
        /// Most waits-for edges to list (the request's `limit`).
        limit: usize,
    },
    /// The answer to `hello` and `resume`: the session id, its name if set, the server's
    /// version, the grace and resume secret of a resumable session, and (after `resume`) the
    /// keys it holds.
    Hello {
        /// The session id.
        session: SessionId,
        /// Its name, if set.
        name: Option<String>,
        /// Its grace period and resume secret, if it is resumable.
        resumable: Option<(Duration, Secret)>,
        /// After `resume`: every key the session holds, with its fencing token.
        held: Option<Vec<(Key, FencingToken)>>,
    },
    /// Open sessions, sorted by id.
    Sessions {
        /// The first ones, up to the request's `limit`.
        sessions: Vec<SessionInfo>,
        /// Open sessions not listed.
        more: usize,
    },
    /// Keys deleted, with the fencing tokens of the exclusive locks they were deleted under, and
    /// how many of them had a value.
    Deleted {
        /// The tokens, sorted by key.
        tokens: Vec<(Key, FencingToken)>,
        /// How many of the keys had a value.
        deleted: usize,
    },
    /// A page of keys.
    Keys(KeysPage),
    /// The answer to `cancel`: whether a waiting request was withdrawn.
    Cancelled(bool),
}

impl Reply {
    /// How many holders and waiters the answer lists (0 but for `locks`): what its encoding
    /// costs grows with it.
    pub fn listed_entries(&self) -> usize {
        match self {
            Reply::Locks { snapshot, .. } => snapshot
                .keys
                .iter()
                .map(|key| key.holders.len() + key.queue.len())
                .sum(),
            _ => 0,
        }
    }
}

/// Decodes one text frame.
///
/// # Errors
/// The `ServiceError` to answer with, plus the request's `id` if one could be read (so even an
/// error answer echoes it).
pub fn decode(text: &str, limits: Limits) -> Result<Request, (Option<Value>, ServiceError)> {
    decode_frame(text, limits).map_err(|undecoded| (undecoded.id, undecoded.error))
}

/// Decodes one text frame, as [`decode`], saying on error which command the frame named (for
/// the metrics).
///
/// # Errors
/// [`Undecoded`]: the error to answer with, and the `id` and command if they could be read.
pub fn decode_frame(text: &str, limits: Limits) -> Result<Request, Undecoded> {
    match fast::decode_fast(text, limits) {
        Some(request) => Ok(request),
        None => reference_decode_frame(text, limits),
    }
}

/// The reference decoder: the whole frame read into a `serde_json::Value`, then checked field
/// by field. It decides every frame the fast path gives up on, hence every error and its
/// sentence; the fast path must agree with it on every frame it accepts.
fn reference_decode_frame(text: &str, limits: Limits) -> Result<Request, Undecoded> {
    let unreadable = |error| Undecoded {
        id: None,
        command: None,
        error,
    };
    let value: Value = serde_json::from_str(text)
        .map_err(|e| unreadable(ServiceError::bad(format!("invalid JSON: {e}"))))?;
    let Value::Object(object) = value else {
        return Err(unreadable(ServiceError::bad(
            "a request must be a JSON object",
        )));
    };
    decode_object(&object, limits).map_err(|error| Undecoded {
        id: object.get("id").cloned(),
        command: match object.get("command") {
            Some(Value::String(name)) => CommandKind::from_name(name),
            _ => None,
        },
        error,
    })
}

fn decode_object(object: &Map<String, Value>, limits: Limits) -> Result<Request, ServiceError> {
    let command = match object.get("command") {
        Some(Value::String(command)) => command.as_str(),
        Some(_) => return Err(ServiceError::bad("`command` must be a string")),
        None => return Err(ServiceError::bad("missing field `command`")),
    };
    let timeout = optional_millis(object, "timeout_ms")?;
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
        "delete" => Command::Delete {
            keys: keys(object, limits)?,
            hold_lock: hold_lock(object)?,
        },
        "ping" => Command::Ping,
        "locks" => Command::Locks {
            prefix: optional_string(object, "prefix")?.unwrap_or_default(),
            limit: limit(object, DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT)?,
        },
        "session" => Command::Session,
        "hello" => Command::Hello {
            name: optional_string(object, "name")?
                .map(|name| valid_name(&name).map(|()| name))
                .transpose()?,
            grace: optional_millis(object, "grace_ms")?,
        },
        "resume" => Command::Resume {
            session: session_id(object)?,
            secret: match optional_string(object, "secret")? {
                Some(secret) => Secret::client_token(secret),
                None => return Err(ServiceError::bad("missing field `secret`")),
            },
        },
        "sessions" => Command::Sessions {
            limit: limit(object, DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT)?,
        },
        "keys" => Command::Keys {
            prefix: optional_string(object, "prefix")?.unwrap_or_default(),
            after: optional_string(object, "after")?,
            limit: keys_limit(object)?,
        },
        "cancel" => Command::Cancel,
        "kill" => Command::Kill {
            session: session_id(object)?,
        },
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

/// True when no two items have the same key: compared pairwise for a few items (no hashing),
/// through a foldhash set above that.
fn all_distinct<'a, T>(items: &'a [T], key: impl Fn(&'a T) -> &'a str) -> bool {
    /// Up to this many items, the quadratic comparison is cheaper than hashing.
    const FEW: usize = 16;
    if items.len() <= FEW {
        items
            .iter()
            .enumerate()
            .all(|(at, item)| items[..at].iter().all(|earlier| key(earlier) != key(item)))
    } else {
        let mut seen =
            HashSet::with_capacity_and_hasher(items.len(), foldhash::fast::RandomState::default());
        items.iter().all(|item| seen.insert(key(item)))
    }
}

/// Is `name` a valid session name: 1..=[`MAX_NAME_BYTES`] bytes without control characters?
///
/// # Errors
/// `bad_request` saying what is wrong.
pub fn valid_name(name: &str) -> Result<(), ServiceError> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(ServiceError::bad(format!(
            "a session name must be 1 to {MAX_NAME_BYTES} bytes"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(ServiceError::bad(
            "a session name must not contain control characters",
        ));
    }
    Ok(())
}

/// An optional string field (`null` counts as absent).
fn optional_string(
    object: &Map<String, Value>,
    field: &str,
) -> Result<Option<String>, ServiceError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(_) => Err(ServiceError::bad(format!("`{field}` must be a string"))),
    }
}

/// A duration in whole milliseconds: a non-negative integer, or absent.
fn optional_millis(
    object: &Map<String, Value>,
    field: &str,
) -> Result<Option<Duration>, ServiceError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => match value.as_u64() {
            Some(ms) => Ok(Some(Duration::from_millis(ms))),
            None => Err(ServiceError::bad(format!(
                "`{field}` must be a non-negative integer"
            ))),
        },
    }
}

/// `limit` of `keys`: 1..=[`MAX_KEYS_LIMIT`], default [`DEFAULT_KEYS_LIMIT`].
fn keys_limit(object: &Map<String, Value>) -> Result<usize, ServiceError> {
    limit(object, DEFAULT_KEYS_LIMIT, MAX_KEYS_LIMIT)
}

/// `limit`: an integer from 1 to `max`, `default` when absent.
fn limit(object: &Map<String, Value>, default: usize, max: usize) -> Result<usize, ServiceError> {
    let limit = match object.get("limit") {
        None | Some(Value::Null) => return Ok(default),
        Some(value) => value.as_u64(),
    };
    match limit.and_then(|limit| usize::try_from(limit).ok()) {
        Some(limit) if (1..=max).contains(&limit) => Ok(limit),
        _ => Err(ServiceError::bad(format!(
            "`limit` must be an integer from 1 to {max}"
        ))),
    }
}

/// `session` of `kill`: a session id (a uuid string).
fn session_id(object: &Map<String, Value>) -> Result<SessionId, ServiceError> {
    match object.get("session") {
        Some(Value::String(text)) => Uuid::parse_str(text)
            .map(SessionId)
            .map_err(|_| ServiceError::bad(format!("`session` is not a session id: {text:?}"))),
        Some(_) => Err(ServiceError::bad("`session` must be a session id string")),
        None => Err(ServiceError::bad("missing field `session`")),
    }
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
        (None, None) => return Err(ServiceError::bad("missing field `values` (or `value`)")),
    };
    if values.len() != key_count {
        return Err(ServiceError::bad(format!(
            "{key_count} keys but {} values",
            values.len()
        )));
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
    fn every_variant_has_its_documented_code() {
        let member = CycleMember {
            session: SessionId::from_u128(1),
            waiting_for_key: "k".into(),
        };
        let cases = [
            (ServiceError::bad("x"), "bad_request"),
            (ServiceError::UnknownCommand("x".into()), "unknown_command"),
            (ServiceError::TooLarge { limit: 1 }, "too_large"),
            (
                ServiceError::TooManyKeys { count: 2, limit: 1 },
                "too_many_keys",
            ),
            (ServiceError::ServerBusy, "server_busy"),
            (ServiceError::ShuttingDown, "shutting_down"),
            (ServiceError::Lock(LockError::Cancelled), "cancelled"),
            (
                ServiceError::Lock(LockError::TooManyLocks {
                    held: 3,
                    requested: 1,
                    limit: 3,
                }),
                "too_many_locks",
            ),
            (
                ServiceError::Lock(LockError::InvalidRequest { reason: "x".into() }),
                "bad_request",
            ),
            (
                ServiceError::Storage(StoreError::Storage("x".into())),
                "storage_error",
            ),
            (
                ServiceError::Deadlock {
                    cycle: vec![NamedMember { member, name: None }],
                },
                "deadlock",
            ),
            (ServiceError::Killed, "killed"),
            (ServiceError::Forbidden("x".into()), "forbidden"),
            (ServiceError::NotFound("x".into()), "not_found"),
            (ServiceError::SessionExpired("x".into()), "session_expired"),
            (ServiceError::TakenOver, "taken_over"),
        ];
        for (error, code) in cases {
            assert_eq!(error.code(), code, "{error}");
        }
    }

    #[test]
    fn a_deadlock_sentence_names_the_members_that_have_a_name() {
        let member = |n: u128, key: &str| CycleMember {
            session: SessionId::from_u128(n),
            waiting_for_key: key.into(),
        };
        let error = ServiceError::Deadlock {
            cycle: vec![
                NamedMember {
                    member: member(1, "k1"),
                    name: Some("backup".into()),
                },
                NamedMember {
                    member: member(2, "k2"),
                    name: None,
                },
            ],
        };
        let text = encode_error(None, &error);
        let value: Value = serde_json::from_str(&text).expect("json");
        let (one, two) = (SessionId::from_u128(1), SessionId::from_u128(2));
        assert_eq!(
            value["error"],
            json!(format!(
                "deadlock: session {one} (backup) waits for key k1 -> session {two} waits for key k2"
            ))
        );
        assert_eq!(value["cycle"][0]["name"], json!("backup"));
        assert!(value["cycle"][1].get("name").is_none());
    }

    #[test]
    fn names_must_be_1_to_128_bytes_without_control_characters() {
        assert!(valid_name("backup").is_ok());
        assert!(valid_name(&"é".repeat(64)).is_ok());
        assert!(valid_name("").is_err());
        assert!(valid_name(&"n".repeat(MAX_NAME_BYTES + 1)).is_err());
        assert!(valid_name("a\nb").is_err());
        assert_eq!(
            decode_code(r#"{"command":"hello","name":"a\u0007"}"#),
            "bad_request"
        );
        assert_eq!(
            decode_code(r#"{"command":"hello","name":5}"#),
            "bad_request"
        );
    }

    #[test]
    fn grace_ms_is_a_non_negative_integer_and_resume_needs_a_session_and_a_secret() {
        let hello = decode_ok(r#"{"command":"hello","grace_ms":1500}"#);
        assert_eq!(
            hello.command,
            Command::Hello {
                name: None,
                grace: Some(Duration::from_millis(1500))
            }
        );
        assert_eq!(
            decode_code(r#"{"command":"hello","grace_ms":-1}"#),
            "bad_request"
        );
        assert_eq!(
            decode_code(r#"{"command":"hello","grace_ms":"5s"}"#),
            "bad_request"
        );
        let id = "67e55044-10b1-426f-9247-bb680e5fe0c8";
        let resume = decode_ok(&format!(
            r#"{{"command":"resume","session":"{id}","secret":"00ff"}}"#
        ));
        assert_eq!(
            resume.command,
            Command::Resume {
                session: SessionId(Uuid::parse_str(id).unwrap()),
                secret: Secret::client_token("00ff".into())
            }
        );
        assert_eq!(
            decode_code(&format!(r#"{{"command":"resume","session":"{id}"}}"#)),
            "bad_request"
        );
        assert_eq!(
            decode_code(r#"{"command":"resume","secret":"00ff"}"#),
            "bad_request"
        );
    }

    #[test]
    fn a_resume_secret_is_neither_in_a_requests_debug_nor_in_a_hello_without_grace() {
        let id = "67e55044-10b1-426f-9247-bb680e5fe0c8";
        let resume = decode_ok(&format!(
            r#"{{"command":"resume","session":"{id}","secret":"5ec7e7"}}"#
        ));
        assert!(!format!("{resume:?}").contains("5ec7e7"));
        let session = SessionId::from_u128(1);
        let plain = encode_reply(
            None,
            &Reply::Hello {
                session,
                name: None,
                resumable: None,
                held: None,
            },
        );
        let plain: Value = serde_json::from_str(&plain).unwrap();
        assert_eq!(plain["grace_ms"], json!(0));
        assert!(plain.get("resume_secret").is_none() && plain.get("tokens").is_none());
        let resumed = encode_reply(
            None,
            &Reply::Hello {
                session,
                name: None,
                resumable: Some((
                    Duration::from_secs(10),
                    Secret::client_token("5ec7e7".into()),
                )),
                held: Some(vec![(Key::from("k"), FencingToken(7))]),
            },
        );
        let resumed: Value = serde_json::from_str(&resumed).unwrap();
        assert_eq!(resumed["grace_ms"], json!(10_000));
        assert_eq!(resumed["resume_secret"], json!("5ec7e7"));
        assert_eq!(resumed["tokens"], json!({"k": 7}));
    }

    #[test]
    fn keys_limit_defaults_to_1000_and_may_not_exceed_10000() {
        let request = decode_ok(r#"{"command":"keys"}"#);
        assert_eq!(
            request.command,
            Command::Keys {
                prefix: String::new(),
                after: None,
                limit: DEFAULT_KEYS_LIMIT
            }
        );
        assert!(decode(r#"{"command":"keys","limit":10000}"#, LIMITS).is_ok());
        assert_eq!(
            decode_code(r#"{"command":"keys","limit":10001}"#),
            "bad_request"
        );
        assert_eq!(
            decode_code(r#"{"command":"keys","limit":0}"#),
            "bad_request"
        );
    }

    #[test]
    fn kill_needs_a_session_id() {
        assert_eq!(
            decode_code(r#"{"command":"kill","session":"nope"}"#),
            "bad_request"
        );
        assert_eq!(decode_code(r#"{"command":"kill"}"#), "bad_request");
    }

    #[test]
    fn a_write_without_values_names_both_forms() {
        let Err((_, error)) = decode(r#"{"command":"write","keys":["a"]}"#, LIMITS) else {
            panic!("decoded");
        };
        assert_eq!(
            error.to_string(),
            "bad request: missing field `values` (or `value`)"
        );
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

        /// The same for the commands of issue 9 and their fields: no panic, every rejection has
        /// a code, and an accepted one respects its limits.
        #[test]
        fn decoder_survives_arbitrary_json_in_the_issue_9_commands(value in arbitrary_json(), command in prop::sample::select(vec!["delete", "keys", "hello", "locks", "sessions", "cancel", "kill", "resume"])) {
            let mut object = Map::new();
            object.insert("command".into(), Value::String(command.into()));
            for field in ["keys", "hold_lock", "prefix", "after", "limit", "name", "session", "grace_ms", "secret"] {
                object.insert(field.into(), value.clone());
            }
            match decode(&Value::Object(object).to_string(), LIMITS) {
                Ok(request) => match request.command {
                    Command::Keys { limit, .. } => prop_assert!((1..=MAX_KEYS_LIMIT).contains(&limit)),
                    Command::Hello { name: Some(name), .. } => prop_assert!(valid_name(&name).is_ok()),
                    Command::Delete { keys, .. } => prop_assert!(!keys.is_empty()),
                    _ => {}
                },
                Err((_, error)) => prop_assert!(!error.code().is_empty()),
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

    #[test]
    fn every_command_kind_is_named_as_the_decoder_reads_it() {
        // The metrics label requests with these names; a kind whose name the decoder did not
        // know would never be seen.
        for kind in CommandKind::ALL {
            assert_eq!(CommandKind::ALL[kind as usize], kind);
            assert_eq!(CommandKind::from_name(kind.name()), Some(kind));
            let text = json!({"command": kind.name()}).to_string();
            match decode_frame(&text, LIMITS) {
                Ok(request) => assert_eq!(request.command.kind(), kind),
                Err(undecoded) => assert_eq!(undecoded.command, Some(kind), "{text}"),
            }
        }
        let unknown = decode_frame(r#"{"command":"dance"}"#, LIMITS).expect_err("unknown");
        assert_eq!(unknown.command, None);
    }
}
