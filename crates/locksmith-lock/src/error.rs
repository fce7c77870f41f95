//! The lock manager's error type. Every variant has a stable machine-readable code
//! ([`LockError::code`]) that the server puts on the wire; the `Display` text is for humans and
//! may change.

use crate::types::{Key, SessionId};

/// One member of a deadlock cycle: a session and the key it is waiting for. In
/// [`LockError::Deadlock`] the members are listed in waits-for order: each one waits for a lock
/// that the next one holds or is queued ahead of it for, and the last waits for the first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CycleMember {
    /// The waiting session.
    pub session: SessionId,
    /// The key that session is queued on.
    pub waiting_for_key: Key,
}

/// Why a lock-manager call failed. A failed `acquire` never leaves a partial effect: the session
/// holds exactly what it held before the call.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    /// Waiting would close a cycle in the waits-for graph. The requester is the victim; the cycle
    /// starts with the requester and the key it asked for.
    #[error("deadlock: {}", describe_cycle(cycle))]
    Deadlock {
        /// The sessions of the cycle, starting with the requester.
        cycle: Vec<CycleMember>,
    },
    /// The request's deadline passed before every key was granted (or, for a try-lock, a key was
    /// not free at once).
    #[error("timed out waiting for key {key}")]
    Timeout {
        /// The key the request was waiting for when its deadline passed.
        key: Key,
    },
    /// `release` named keys the session does not hold; nothing was released.
    #[error("keys not held by this session: {}", describe_keys(keys))]
    NotHeld {
        /// Every requested key the session does not hold, sorted.
        keys: Vec<Key>,
    },
    /// The session was closed (or never belonged to this manager).
    #[error("session is closed")]
    SessionClosed,
    /// The waiting request was withdrawn: the session called `release_all`, or withdrew its
    /// wait ([`crate::LockTable::withdraw_wait`], the server's `cancel`).
    #[error("request cancelled: withdrawn by its session while it waited")]
    Cancelled,
    /// Granting the request would make the session hold more than `limit` keys: it holds `held`
    /// and the request names `requested` keys it does not hold yet. Checked before anything is
    /// taken, so nothing changed.
    #[error(
        "too many locks: the session holds {held} keys and asks for {requested} more, the limit is {limit}"
    )]
    TooManyLocks {
        /// Keys the session holds.
        held: usize,
        /// Keys of the request the session does not hold yet.
        requested: usize,
        /// Most keys one session may hold.
        limit: usize,
    },
    /// The request itself is malformed or not allowed now (no keys, too many keys, another request
    /// of the same session still in progress).
    #[error("invalid request: {reason}")]
    InvalidRequest {
        /// What is wrong with it.
        reason: String,
    },
}

impl LockError {
    /// The stable machine-readable code of this error, as sent on the wire.
    pub fn code(&self) -> &'static str {
        match self {
            LockError::Deadlock { .. } => "deadlock",
            LockError::Timeout { .. } => "timeout",
            LockError::NotHeld { .. } => "not_held",
            LockError::SessionClosed => "session_closed",
            LockError::Cancelled => "cancelled",
            LockError::TooManyLocks { .. } => "too_many_locks",
            LockError::InvalidRequest { .. } => "invalid_request",
        }
    }

    pub(crate) fn invalid(reason: impl Into<String>) -> Self {
        LockError::InvalidRequest {
            reason: reason.into(),
        }
    }
}

fn describe_cycle(cycle: &[CycleMember]) -> String {
    cycle
        .iter()
        .map(|m| format!("session {} waits for key {}", m.session, m.waiting_for_key))
        .collect::<Vec<_>>()
        .join(" -> ")
}

fn describe_keys(keys: &[Key]) -> String {
    keys.iter().map(Key::as_str).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_has_its_documented_code() {
        let cases = [
            (LockError::Deadlock { cycle: vec![] }, "deadlock"),
            (LockError::Timeout { key: "k".into() }, "timeout"),
            (LockError::NotHeld { keys: vec![] }, "not_held"),
            (LockError::SessionClosed, "session_closed"),
            (LockError::Cancelled, "cancelled"),
            (
                LockError::TooManyLocks {
                    held: 3,
                    requested: 1,
                    limit: 3,
                },
                "too_many_locks",
            ),
            (LockError::invalid("x"), "invalid_request"),
        ];
        for (error, code) in cases {
            assert_eq!(error.code(), code, "{error}");
        }
    }
}
