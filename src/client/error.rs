//! The client's error type: one variant per wire error code, plus the failures of the connection
//! itself. [`ClientError::code`] gives back the wire code, so a program can match either on the
//! variant or on the same string the server sent.

use serde::Deserialize;

/// One member of a deadlock cycle, as the server reports it: a session and the key it waits for.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct CycleMember {
    /// The waiting session's id.
    pub session: String,
    /// The session's name, if it gave one.
    #[serde(default)]
    pub name: Option<String>,
    /// The key it is queued on.
    pub waiting_for_key: String,
}

/// Why a client call failed.
///
/// The variants from [`Deadlock`](Self::Deadlock) on mirror the server's error codes one to one;
/// the first four are about the connection, which the server never names.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached, or the WebSocket handshake failed.
    #[error("could not connect to {url}: {reason}")]
    Connect {
        /// Where the client tried to connect.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The server requires a token and the one given (or none) was refused (HTTP 401).
    #[error("the server refused the connection: a valid token is required (HTTP 401)")]
    Unauthorized,
    /// The connection ended before the answer arrived. The request may or may not have been
    /// carried out. Without a grace ([`ClientBuilder::grace`](super::ClientBuilder::grace))
    /// every lock of the session is released by the server; with one, the session is suspended
    /// and the client resumes it, and later calls go on as usual.
    #[error("connection to the server lost: {reason}")]
    ConnectionLost {
        /// How it ended, as far as the client saw it.
        reason: String,
    },
    /// The server sent something this client cannot read.
    #[error("unexpected answer from the server: {0}")]
    UnexpectedAnswer(String),
    /// `deadlock`: waiting would have closed a cycle; the request was refused.
    #[error("{message}")]
    Deadlock {
        /// The server's sentence.
        message: String,
        /// The cycle, starting with this session.
        cycle: Vec<CycleMember>,
    },
    /// `timeout`: the wait limit passed, or a try-lock found the key taken.
    #[error("{message}")]
    Timeout {
        /// The server's sentence.
        message: String,
        /// The key the request was waiting for.
        key: String,
    },
    /// `not_held`: an unlock named keys this session does not hold; nothing was released.
    #[error("{message}")]
    NotHeld {
        /// The server's sentence.
        message: String,
        /// The keys not held.
        keys: Vec<String>,
    },
    /// `cancelled`: the waiting request was withdrawn by a `cancel`.
    #[error("{0}")]
    Cancelled(String),
    /// `killed`: an administrator ended this session.
    #[error("{0}")]
    Killed(String),
    /// `forbidden`: an admin command without the admin token.
    #[error("{0}")]
    Forbidden(String),
    /// `not_found`: the named session does not exist.
    #[error("{0}")]
    NotFound(String),
    /// `bad_request`: the request was malformed.
    #[error("{0}")]
    BadRequest(String),
    /// `unknown_command`: the server does not know the command (an older server).
    #[error("{0}")]
    UnknownCommand(String),
    /// `too_large`: the request frame was over the server's size limit.
    #[error("{0}")]
    TooLarge(String),
    /// `too_many_keys`: the request named more keys than the server allows.
    #[error("{0}")]
    TooManyKeys(String),
    /// `too_many_locks`: granting the request would have made this session hold more keys than
    /// the server allows (`--max-locks-per-session`); nothing was taken.
    #[error("{message}")]
    TooManyLocks {
        /// The server's sentence.
        message: String,
        /// Most keys one session may hold.
        limit: usize,
    },
    /// `server_busy`: the server is at its connection limit.
    #[error("{0}")]
    ServerBusy(String),
    /// `shutting_down`: the server is stopping.
    #[error("{0}")]
    ShuttingDown(String),
    /// `storage_error`: the value store failed; nothing was written.
    #[error("{0}")]
    Storage(String),
    /// `session_closed`: the session is closed.
    #[error("{0}")]
    SessionClosed(String),
    /// `session_expired`: a resumable session's connection was lost and the session could not
    /// be resumed (the server no longer has it, or its grace passed with no word from the
    /// server). Every lock of the session is released by the server.
    #[error("{0}")]
    SessionExpired(String),
    /// `taken_over`: the session was resumed on another connection, which now owns it.
    #[error("{0}")]
    TakenOver(String),
    /// A code this client does not know (a newer server).
    #[error("{message}")]
    Other {
        /// The wire code.
        code: String,
        /// The server's sentence.
        message: String,
    },
}

impl ClientError {
    /// The stable code: the server's wire code for server errors, and `connect`,
    /// `unauthorized`, `connection_lost`, `unexpected_answer` for the connection's own failures.
    pub fn code(&self) -> &str {
        match self {
            ClientError::Connect { .. } => "connect",
            ClientError::Unauthorized => "unauthorized",
            ClientError::ConnectionLost { .. } => "connection_lost",
            ClientError::UnexpectedAnswer(_) => "unexpected_answer",
            ClientError::Deadlock { .. } => "deadlock",
            ClientError::Timeout { .. } => "timeout",
            ClientError::NotHeld { .. } => "not_held",
            ClientError::Cancelled(_) => "cancelled",
            ClientError::Killed(_) => "killed",
            ClientError::Forbidden(_) => "forbidden",
            ClientError::NotFound(_) => "not_found",
            ClientError::BadRequest(_) => "bad_request",
            ClientError::UnknownCommand(_) => "unknown_command",
            ClientError::TooLarge(_) => "too_large",
            ClientError::TooManyKeys(_) => "too_many_keys",
            ClientError::TooManyLocks { .. } => "too_many_locks",
            ClientError::ServerBusy(_) => "server_busy",
            ClientError::ShuttingDown(_) => "shutting_down",
            ClientError::Storage(_) => "storage_error",
            ClientError::SessionClosed(_) => "session_closed",
            ClientError::SessionExpired(_) => "session_expired",
            ClientError::TakenOver(_) => "taken_over",
            ClientError::Other { code, .. } => code,
        }
    }

    /// The error an answer with `"success": false` stands for.
    pub(crate) fn from_answer(answer: &serde_json::Value) -> ClientError {
        let message = answer["error"].as_str().unwrap_or("").to_owned();
        let code = answer["code"].as_str().unwrap_or("");
        match code {
            "deadlock" => ClientError::Deadlock {
                cycle: serde_json::from_value(answer["cycle"].clone()).unwrap_or_default(),
                message,
            },
            "timeout" => ClientError::Timeout {
                key: answer["key"].as_str().unwrap_or("").to_owned(),
                message,
            },
            "not_held" => ClientError::NotHeld {
                keys: serde_json::from_value(answer["keys"].clone()).unwrap_or_default(),
                message,
            },
            "cancelled" => ClientError::Cancelled(message),
            "killed" => ClientError::Killed(message),
            "forbidden" => ClientError::Forbidden(message),
            "not_found" => ClientError::NotFound(message),
            "bad_request" => ClientError::BadRequest(message),
            "unknown_command" => ClientError::UnknownCommand(message),
            "too_large" => ClientError::TooLarge(message),
            "too_many_keys" => ClientError::TooManyKeys(message),
            "too_many_locks" => ClientError::TooManyLocks {
                limit: answer["limit"].as_u64().unwrap_or(0) as usize,
                message,
            },
            "server_busy" => ClientError::ServerBusy(message),
            "shutting_down" => ClientError::ShuttingDown(message),
            "storage_error" => ClientError::Storage(message),
            "session_closed" => ClientError::SessionClosed(message),
            "session_expired" => ClientError::SessionExpired(message),
            "taken_over" => ClientError::TakenOver(message),
            other => ClientError::Other {
                code: other.to_owned(),
                message,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_wire_code_maps_to_a_variant_that_gives_the_same_code_back() {
        for code in [
            "deadlock",
            "timeout",
            "not_held",
            "cancelled",
            "killed",
            "forbidden",
            "not_found",
            "bad_request",
            "unknown_command",
            "too_large",
            "too_many_keys",
            "too_many_locks",
            "server_busy",
            "shutting_down",
            "storage_error",
            "session_closed",
            "session_expired",
            "taken_over",
            "from_a_newer_server",
        ] {
            let error = ClientError::from_answer(
                &json!({"success": false, "code": code, "error": "it failed"}),
            );
            assert_eq!(error.code(), code);
            assert_eq!(error.to_string(), "it failed");
        }
    }

    #[test]
    fn a_too_many_locks_error_carries_the_limit() {
        let error = ClientError::from_answer(&json!({
            "success": false, "code": "too_many_locks", "error": "too many locks: ...",
            "held": 3, "requested": 1, "limit": 3
        }));
        assert!(
            matches!(error, ClientError::TooManyLocks { limit: 3, .. }),
            "{error:?}"
        );
    }

    #[test]
    fn a_deadlock_error_carries_its_cycle_with_names() {
        let error = ClientError::from_answer(&json!({
            "success": false, "code": "deadlock", "error": "deadlock: ...",
            "cycle": [{"session": "a", "name": "job", "waiting_for_key": "k1"},
                      {"session": "b", "waiting_for_key": "k2"}]
        }));
        let ClientError::Deadlock { cycle, .. } = error else {
            panic!("not a deadlock: {error:?}");
        };
        assert_eq!(cycle.len(), 2);
        assert_eq!(cycle[0].name.as_deref(), Some("job"));
        assert_eq!(cycle[1].name, None);
        assert_eq!(cycle[1].waiting_for_key, "k2");
    }
}
