//! Domain types shared by every part of the lock manager: keys, lock modes, session ids, fencing
//! tokens and the grant a successful request returns.
//!
//! These are plain values with no behaviour beyond comparison; the rules that combine them live in
//! [`crate::table`].

use std::fmt;
use std::sync::Arc;

use uuid::Uuid;

/// The name of a lockable resource. Cheap to clone (`Arc<str>`): a key is copied into holder
/// lists, queues, undo logs and snapshots, and none of them should allocate.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(Arc<str>);

impl Key {
    /// The key as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Key {
    fn from(value: &str) -> Self {
        Key(Arc::from(value))
    }
}

impl From<String> for Key {
    fn from(value: String) -> Self {
        Key(Arc::from(value))
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a key is locked.
///
/// `Shared` (read) is compatible with `Shared`; `Exclusive` (write) is compatible with nothing.
/// The derived order (`Shared < Exclusive`) is "strength": holding a mode satisfies any request
/// for a mode that is not stronger.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LockMode {
    /// Read lock: any number of sessions may hold it together.
    Shared,
    /// Write lock: one session holds it and nobody else holds the key in any mode.
    Exclusive,
}

impl LockMode {
    /// The compatibility matrix: only two shared locks may be held together.
    pub fn is_compatible_with(self, other: LockMode) -> bool {
        self == LockMode::Shared && other == LockMode::Shared
    }
}

/// Identifies one session (one client connection, or one user of the library) for its lifetime.
/// The caller chooses it (the server uses random v4 uuids); the table never mints one, so a run
/// can be replayed exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub Uuid);

impl SessionId {
    /// The session id made of the number `n` (tests, benchmarks, replays).
    pub fn from_u128(n: u128) -> Self {
        SessionId(Uuid::from_u128(n))
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// A number handed out with every grant. Tokens of one key strictly increase over time (they come
/// from one counter shared by all keys), so a resource guarded by the lock can remember the
/// highest token it has seen and reject a write carrying an older one from a stale holder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FencingToken(pub u64);

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// The answer to a successful `acquire`: every requested key (deduplicated, in sorted order) with
/// the fencing token under which the session now holds it, and what the request added to the
/// session's locks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// `(key, token)` pairs sorted by key.
    pub tokens: Vec<(Key, FencingToken)>,
    /// What this request changed, so that a caller that does not keep the locks (the server's
    /// `read` and `write` without `hold_lock`) can give back exactly that with
    /// `LockTable::give_back`.
    pub taken: Taken,
}

/// The locks one request added to its session: keys it did not hold before, and keys it held
/// shared and upgraded. Keys the session already held in the requested mode (or a stronger one)
/// are in neither list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Taken {
    /// Keys newly acquired, in key order: giving back releases them.
    pub acquired: Vec<Key>,
    /// Keys upgraded from shared to exclusive, in key order: giving back downgrades them to
    /// shared (keeping the exclusive token, as every downgrade does).
    pub upgraded: Vec<Key>,
}

impl Taken {
    /// True when the request added nothing.
    pub fn is_empty(&self) -> bool {
        self.acquired.is_empty() && self.upgraded.is_empty()
    }
}

impl Grant {
    /// The token of `key`, if `key` was part of the request.
    pub fn token(&self, key: &Key) -> Option<FencingToken> {
        self.tokens
            .binary_search_by(|(k, _)| k.cmp(key))
            .ok()
            .map(|i| self.tokens[i].1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compatibility_matrix_allows_only_shared_with_shared() {
        use LockMode::*;
        assert!(Shared.is_compatible_with(Shared));
        assert!(!Shared.is_compatible_with(Exclusive));
        assert!(!Exclusive.is_compatible_with(Shared));
        assert!(!Exclusive.is_compatible_with(Exclusive));
    }

    #[test]
    fn exclusive_is_stronger_than_shared() {
        assert!(LockMode::Exclusive > LockMode::Shared);
    }
}
