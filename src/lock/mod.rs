//! The lock manager: shared/exclusive locks on string keys, FIFO queues, sorted all-or-nothing
//! multi-key requests, fencing tokens, and deadlock detection on a waits-for graph.
//!
//! Layout (pure core, async shell):
//! - [`types`]: keys, modes, session ids, tokens, grants.
//! - [`error`]: [`LockError`] and its stable codes.
//! - [`waits_for`]: the waits-for graph and the exact cycle search (the deadlock detector).
//! - [`table`]: the synchronous lock table: holders, queues, requests, the rules.
//! - [`snapshot`]: a point-in-time picture of the table.
//! - [`manager`]: the async [`LockManager`] and the [`Session`] handle.
//!
//! It knows nothing of WebSockets, JSON or stored values. The rules it implements are stated in
//! `docs/semantics.md`, each with the test that checks it.

pub mod error;
pub mod manager;
pub mod snapshot;
pub mod table;
pub mod types;
pub mod waits_for;

pub use error::{CycleMember, LockError};
pub use manager::{LockManager, LockManagerConfig, Session};
pub use snapshot::{HolderSnapshot, KeySnapshot, Snapshot, WaiterSnapshot};
pub use table::{Acquired, LockTable, Now};
pub use types::{FencingToken, Grant, Key, LockMode, SessionId};

/// The hash maps of the lock table: foldhash instead of SipHash (about a third of the cost of an
/// uncontended acquire+release was hashing). Its seed is random per process, so keys chosen by
/// clients cannot be crafted to collide.
type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
