//! The lock manager: the async shell around the pure lock core.
//!
//! Layout (pure core, async shell):
//! - the core is the `locksmith-lock` crate (`crates/locksmith-lock`): the synchronous,
//!   deterministic [`LockTable`] with its types, errors, snapshot and deadlock search. Everything
//!   it exports is re-exported here.
//! - [`manager`]: the async [`LockManager`] (one mutex around the table, wakers, deadlines) and
//!   the [`Session`] handle.
//!
//! It knows nothing of WebSockets, JSON or stored values. The rules it implements are stated in
//! `docs/semantics.md`, each with the test that checks it.

pub mod manager;

pub use locksmith_lock::{
    Acquired, BusiestKeys, CycleMember, Effects, FencingToken, Gauges, Grant, HolderSnapshot, Key,
    KeySnapshot, LockError, LockMode, LockTable, Now, SessionId, Snapshot, Taken, WaiterSnapshot,
};
pub use manager::{LockManager, LockManagerConfig, Session, DEFAULT_MAX_KEYS_PER_SESSION};
