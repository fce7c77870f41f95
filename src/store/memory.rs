//! The in-memory store: an ordered map behind a mutex. Values are lost when the process exits.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use futures_util::future::BoxFuture;
use serde_json::Value;

use super::{page_of, KeysPage, Store, StoreError};

/// Values in a `BTreeMap` (ordered, for `keys`); a multi-key write takes the mutex once, so it is
/// atomic.
#[derive(Default)]
pub struct MemoryStore {
    values: Mutex<BTreeMap<String, Value>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn values(&self) -> MutexGuard<'_, BTreeMap<String, Value>> {
        self.values.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Store for MemoryStore {
    fn read(&self, keys: &[&str]) -> Result<Vec<Option<Value>>, StoreError> {
        let values = self.values();
        Ok(keys.iter().map(|k| values.get(*k).cloned()).collect())
    }

    fn apply(
        &self,
        changes: Vec<(String, Option<Value>)>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let mut values = self.values();
        for (key, value) in changes {
            match value {
                Some(value) => values.insert(key, value),
                None => values.remove(&key),
            };
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn keys(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<KeysPage, StoreError> {
        Ok(page_of(&self.values(), prefix, after, limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn unwritten_keys_read_as_none_and_writes_read_back() {
        let store = MemoryStore::new();
        assert_eq!(store.read(&["a"]).expect("read"), vec![None]);
        store
            .write(vec![("a".into(), json!(1)), ("b".into(), json!("x"))])
            .await
            .expect("write");
        assert_eq!(
            store.read(&["b", "a", "c"]).expect("read"),
            vec![Some(json!("x")), Some(json!(1)), None]
        );
    }

    #[tokio::test]
    async fn an_apply_sets_and_deletes_together() {
        let store = MemoryStore::new();
        store
            .write(vec![("a".into(), json!(1)), ("b".into(), json!(2))])
            .await
            .expect("write");
        store
            .apply(vec![("a".into(), None), ("c".into(), Some(json!(3)))])
            .await
            .expect("write");
        assert_eq!(
            store.read(&["a", "b", "c"]).expect("read"),
            vec![None, Some(json!(2)), Some(json!(3))]
        );
        assert_eq!(store.keys("", None, 10).expect("keys").keys, vec!["b", "c"]);
    }
}
