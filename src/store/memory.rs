//! The in-memory store: a map behind a mutex. Values are lost when the process exits.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use futures_util::future::BoxFuture;
use serde_json::Value;

use super::{Store, StoreError};

/// Values in a `HashMap`; a multi-key write takes the mutex once, so it is atomic.
#[derive(Default)]
pub struct MemoryStore {
    values: Mutex<HashMap<String, Value>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn values(&self) -> MutexGuard<'_, HashMap<String, Value>> {
        self.values.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Store for MemoryStore {
    fn read(&self, keys: &[&str]) -> Result<Vec<Option<Value>>, StoreError> {
        let values = self.values();
        Ok(keys.iter().map(|k| values.get(*k).cloned()).collect())
    }

    fn write(&self, entries: Vec<(String, Value)>) -> BoxFuture<'_, Result<(), StoreError>> {
        let mut values = self.values();
        values.extend(entries);
        Box::pin(std::future::ready(Ok(())))
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
}
