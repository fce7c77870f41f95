//! Locksmith: a deadlock-aware lock manager service.
//!
//! Layout:
//! - [`lock`]: the lock manager (lock table, queues, waits-for graph, deadlock detection, the
//!   async manager and session handle). Knows nothing of the network.

pub mod lock;
