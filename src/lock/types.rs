//! Domain types shared by every part of the lock manager: keys, lock modes, session ids, fencing
//! tokens and the grant a successful request returns.
//!
//! These are plain values with no behaviour beyond comparison; the rules that combine them live in
//! [`super::table`].

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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub Uuid);

impl SessionId {
    /// A fresh random (v4) session id.
    pub fn new_random() -> Self {
        SessionId(Uuid::new_v4())
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
/// the fencing token under which the session now holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// `(key, token)` pairs sorted by key.
    pub tokens: Vec<(Key, FencingToken)>,
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
