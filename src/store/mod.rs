//! Where values live. The server reads and writes values only through the [`Store`] trait, under
//! the locks the session holds; the store itself knows nothing of locks or sessions.
//!
//! - [`memory`]: values in a process-local map (lost on exit); `--in-memory`.
//! - [`durable`]: values in an embedded redb database, group-committed; the default.
//!
//! Contract every implementation keeps: a `write` of several keys is atomic (a reader sees all of
//! its values or none), and when `write` returns `Err` nothing of it was applied.

pub mod durable;
pub mod memory;

use futures_util::future::BoxFuture;
use serde_json::Value;

pub use durable::RedbStore;
pub use memory::MemoryStore;

/// A failure of the value store.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The storage backend failed (disk full, permission denied, I/O error, ...); nothing of the
    /// failed operation was applied.
    #[error("storage error: {0}")]
    Storage(String),
}

impl StoreError {
    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::Storage(_) => "storage_error",
        }
    }
}

/// A key-value store of JSON values.
pub trait Store: Send + Sync + 'static {
    /// The values of `keys`, in order; `None` for a key never written.
    ///
    /// # Errors
    /// `StoreError::Storage` if the backend cannot be read.
    fn read(&self, keys: &[&str]) -> Result<Vec<Option<Value>>, StoreError>;

    /// Sets every `(key, value)` pair, atomically: all of them or none. Resolves once the write
    /// is as durable as the store promises.
    ///
    /// # Errors
    /// `StoreError::Storage` if the backend failed; then nothing was written.
    fn write(&self, entries: Vec<(String, Value)>) -> BoxFuture<'_, Result<(), StoreError>>;
}
