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
    /// The snapshot of these keys (sorted by key), with the waits-for edges of rule 5 derived
    /// from their holders and queues: each waiter waits for every other holder whose mode
    /// conflicts with its request and for every other waiter ahead of it whose request conflicts
    /// with it. O(edges).
    pub fn from_keys(keys: Vec<KeySnapshot>) -> Self {
        let mut waits_for: Vec<(SessionId, SessionId)> =
            keys.iter().flat_map(|k| k.rule5_edges()).collect();
        waits_for.sort_unstable();
        waits_for.dedup();
        Snapshot { keys, waits_for }
    }

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

impl KeySnapshot {
    /// Rule 5's edges of this key's waiters.
    fn rule5_edges(&self) -> impl Iterator<Item = (SessionId, SessionId)> + '_ {
        self.queue
            .iter()
            .enumerate()
            .flat_map(move |(position, waiter)| {
                let conflicts = move |session: SessionId, mode: LockMode| {
                    session != waiter.session && !waiter.mode.is_compatible_with(mode)
                };
                let holders = self
                    .holders
                    .iter()
                    .filter(move |h| conflicts(h.session, h.mode))
                    .map(move |h| (waiter.session, h.session));
                let ahead = self.queue[..position]
                    .iter()
                    .filter(move |w| conflicts(w.session, w.mode))
                    .map(move |w| (waiter.session, w.session));
                holders.chain(ahead)
            })
    }
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
    /// When it was granted the key (kept through an upgrade or a downgrade), so a diagnostic can
    /// say how long the key has been held.
    pub since: Instant,
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
