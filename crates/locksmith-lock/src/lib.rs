//! Locksmith's lock core: shared/exclusive locks on string keys, FIFO queues, sorted
//! all-or-nothing multi-key requests, fencing tokens, and exact, immediate deadlock detection.
//!
//! It is pure and deterministic: no threads, no clock of its own, no randomness, no I/O. The
//! caller chooses session ids and passes the time of each call; every call runs to completion and
//! returns what it changed for others ([`Effects`]: the waiting requests it concluded, whose
//! callers must be woken). The same sequence of calls always gives the same answers, which is
//! what the model test, the benchmarks and the async manager in the server build on.
//!
//! Layout:
//! - [`types`]: keys, modes, session ids, fencing tokens, grants and what a grant took.
//! - [`error`]: [`LockError`] and its stable codes.
//! - [`now`]: the time of a call, given or read lazily from the caller's clock.
//! - `request`: one request in flight: its state machine and undo log.
//! - `key_state`: one key's holders and queue, and the rules for granting it.
//! - `waits_for`: the deadlock detector: is there a cycle through a session that starts to wait?
//! - [`table`]: the [`LockTable`], which ties them together and is the public entry point.
//! - [`snapshot`]: a point-in-time picture of the table.
//!
//! The rules are stated in `docs/semantics.md` at the repository root, each with its tests.

pub mod error;
mod key_state;
pub mod now;
mod request;
pub mod snapshot;
pub mod table;
pub mod types;
mod waits_for;

pub use error::{CycleMember, LockError};
pub use now::Now;
pub use snapshot::{HolderSnapshot, KeySnapshot, Snapshot, WaiterSnapshot};
pub use table::{Acquired, BusiestKeys, Effects, Footprint, Gauges, LockTable};
pub use types::{FencingToken, Grant, Key, LockMode, SessionId, Taken};

/// The hash maps of the lock table: foldhash instead of SipHash (about a third of the cost of an
/// uncontended acquire+release was hashing). Its seed is random per process, so keys chosen by
/// clients cannot be crafted to collide; iteration order never decides anything in the table.
type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// The hash sets of the lock table, hashed like [`FastMap`].
type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// Index of an open session in the table's session slab.
type SessionSlot = usize;
/// Index of a held or awaited key in the table's key slab.
type KeySlot = usize;
/// Index of a queue entry in the table's waiter slab.
type WaiterSlot = usize;
