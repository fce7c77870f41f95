//! A consistent, point-in-time picture of the lock table: every locked or awaited key with its
//! holders and its queue, and the waits-for edges. Produced by [`crate::LockTable::snapshot`] for
//! diagnostics (the server exposes it) and by the tests to compare the table with a model.

use std::time::Instant;

use crate::types::{FencingToken, Key, LockMode, SessionId};

/// The whole table at one instant. Keys are sorted; edges are sorted.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// Every key that has a holder or a waiter, sorted by key.
    pub keys: Vec<KeySnapshot>,
    /// Every waits-for edge `(waiter, waited_for)` of rule 5, sorted. The table does not store
    /// them: they are derived from the holders and queues when the snapshot is taken.
    pub waits_for: Vec<(SessionId, SessionId)>,
}

impl Snapshot {
    /// True when no key is held or awaited.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.waits_for.is_empty()
    }

    /// The entry of `key`, if it is held or awaited.
    pub fn key(&self, key: &Key) -> Option<&KeySnapshot> {
        self.keys.iter().find(|k| &k.key == key)
    }
}

/// One key's holders and queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySnapshot {
    /// The key.
    pub key: Key,
    /// The sessions holding it, in the order they were granted.
    pub holders: Vec<HolderSnapshot>,
    /// The sessions waiting for it, head first.
    pub queue: Vec<WaiterSnapshot>,
}

/// A session holding a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HolderSnapshot {
    /// The holder.
    pub session: SessionId,
    /// The mode it holds.
    pub mode: LockMode,
    /// The fencing token of its grant.
    pub token: FencingToken,
}

/// A session queued for a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaiterSnapshot {
    /// The waiter.
    pub session: SessionId,
    /// The mode it asked for.
    pub mode: LockMode,
    /// True for a conversion (the waiter holds the key shared and asked for exclusive).
    pub upgrade: bool,
    /// When it started waiting for this key.
    pub since: Instant,
}
