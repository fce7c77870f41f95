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
pub use table::{Acquired, LockTable};
pub use types::{FencingToken, Grant, Key, LockMode, SessionId};
