//! Where values live. The server reads and writes values only through the [`Store`] trait, under
//! the locks the session holds; the store itself knows nothing of locks or sessions.
//!
//! - [`memory`]: values in a process-local map (lost on exit); `--in-memory`.
//! - [`durable`]: values in an embedded redb database, group-committed; the default.
//!
//! Contract every implementation keeps: an `apply` of several changes (sets and deletes) is
//! atomic (a reader sees all of it or none of it), and when it returns `Err` nothing of it was
//! applied. Values are kept in key order, so [`Store::keys`] pages through them in
//! O(log n + page).

pub mod durable;
pub mod memory;

use std::collections::BTreeMap;
use std::ops::Bound;

use futures_util::future::BoxFuture;
use serde_json::Value;

use crate::metrics::CommitMetrics;

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

    /// Applies every change, atomically: all of them or none. `(key, Some(value))` sets the key,
    /// `(key, None)` deletes it (a later read gives `None`). Resolves once the change is as
    /// durable as the store promises (for the durable store: committed, with an fsync, in one
    /// group commit with the changes that arrived together).
    ///
    /// # Errors
    /// `StoreError::Storage` if the backend failed; then nothing was changed.
    fn apply(&self, changes: Vec<(String, Option<Value>)>)
        -> BoxFuture<'_, Result<(), StoreError>>;

    /// Sets every `(key, value)` pair, atomically: [`apply`](Self::apply) without deletes.
    ///
    /// # Errors
    /// As [`apply`](Self::apply).
    fn write(&self, entries: Vec<(String, Value)>) -> BoxFuture<'_, Result<(), StoreError>> {
        self.apply(entries.into_iter().map(|(k, v)| (k, Some(v))).collect())
    }

    /// The keys that have a value, start with `prefix` and come after `after` (exclusive), in
    /// byte order, at most `limit` of them; `more` says whether further keys match. A listing of
    /// the committed values at one moment.
    ///
    /// # Errors
    /// `StoreError::Storage` if the backend cannot be read.
    fn keys(&self, prefix: &str, after: Option<&str>, limit: usize)
        -> Result<KeysPage, StoreError>;

    /// The metrics of its commits, for a store that commits (the durable one); the server
    /// registers them with its own.
    fn commit_metrics(&self) -> Option<CommitMetrics> {
        None
    }
}

/// One page of [`Store::keys`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeysPage {
    /// The keys, in byte order.
    pub keys: Vec<String>,
    /// True when more keys match after the last one listed.
    pub more: bool,
}

/// The page of `values`' keys that start with `prefix`, after `after`, at most `limit`: a range
/// scan of the ordered map, O(log n + limit). Shared by both stores.
pub fn page_of<V>(
    values: &BTreeMap<String, V>,
    prefix: &str,
    after: Option<&str>,
    limit: usize,
) -> KeysPage {
    let start = match after {
        Some(after) if after >= prefix => Bound::Excluded(after),
        _ => Bound::Included(prefix),
    };
    let mut matching = values
        .range::<str, _>((start, Bound::Unbounded))
        .map(|(key, _)| key)
        .take_while(|key| key.starts_with(prefix));
    let keys: Vec<String> = matching.by_ref().take(limit).cloned().collect();
    let more = matching.next().is_some();
    KeysPage { keys, more }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_lists_keys_with_the_prefix_after_the_cursor_in_byte_order() {
        let values: BTreeMap<String, ()> = ["a", "job/a", "job/b", "job/c", "job0", "jobs"]
            .into_iter()
            .map(|k| (k.to_owned(), ()))
            .collect();
        let page = page_of(&values, "job/", None, 2);
        assert_eq!(page.keys, vec!["job/a", "job/b"]);
        assert!(page.more);
        let page = page_of(&values, "job/", Some("job/b"), 2);
        assert_eq!(page.keys, vec!["job/c"]);
        assert!(!page.more);
        // A cursor before the prefix starts at the prefix; one past it lists nothing.
        assert_eq!(page_of(&values, "job/", Some("a"), 10).keys.len(), 3);
        assert!(page_of(&values, "job/", Some("z"), 10).keys.is_empty());
        assert_eq!(page_of(&values, "", None, 100).keys.len(), 6);
    }
}
