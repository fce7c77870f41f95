//! The durable store: values in an embedded redb database, written by one thread that
//! group-commits.
//!
//! Writes: every `write` becomes a job on a bounded channel. One writer thread takes the first
//! job and every other job already queued (up to [`MAX_BATCH`]), applies them all in one redb
//! write transaction, commits it with `Durability::Immediate` (one fsync), and only then answers
//! each job. While one batch is being committed the next one accumulates, so the more writers
//! there are, the more writes share an fsync. A multi-key write is inside one transaction, so it
//! is all-or-nothing across crashes. If the commit fails, every job of the batch is answered
//! `storage_error` and nothing of the batch is visible.
//!
//! A write mixes sets and deletes (`None`): a delete removes the key in the same transaction, so
//! it is as durable and as atomic as a set.
//!
//! Reads: every committed value is also kept in memory (an ordered map, so `keys` pages through
//! it by range; loaded at start-up, updated after each
//! successful commit, a batch at a time under one lock), and reads are answered from there. So a
//! read never blocks on the disk, sees multi-key writes whole, and keeps working when the disk
//! does not. The database is the durable copy; the mirror costs memory in proportion to the data.
//!
//! After an I/O error redb refuses every further operation on that `Database` until it is
//! reopened, so the writer thread then closes and reopens it (redb repairs it from its last
//! commit); if that fails, it tries again before the next batch. Meanwhile writes answer
//! `storage_error`; reads and locks keep working.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::thread::JoinHandle;

use futures_util::future::BoxFuture;
use redb::{Database, DatabaseError, Durability, ReadableTable, TableDefinition};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::{page_of, KeysPage, Store, StoreError};
use crate::metrics::CommitMetrics;

/// Key → value as JSON text.
const VALUES: TableDefinition<&str, &[u8]> = TableDefinition::new("values");

/// The database file inside the data directory.
pub const DATABASE_FILE: &str = "locksmith.redb";

/// Most write jobs committed together.
pub const MAX_BATCH: usize = 4096;

/// Write jobs that may wait for the writer thread before `write` itself waits.
const QUEUE_DEPTH: usize = 16 * 1024;

/// Opens (or reopens) the database: by path in production, through a test backend in tests.
pub type Opener = Box<dyn Fn() -> Result<Database, DatabaseError> + Send + Sync>;

/// Why the store could not be opened at start-up. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The data directory cannot be created or used.
    #[error("cannot use the data directory {path}: {source}")]
    Directory {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Another process has the database open.
    #[error(
        "the database {path} is in use by another process (is another locksmith server running \
         with this data directory?)"
    )]
    InUse {
        /// The database file.
        path: PathBuf,
    },
    /// The file exists but is not a readable redb database.
    #[error(
        "cannot open the database {path}: {source}. It may be corrupt or not a locksmith \
         database; locksmith will not start over it. Move it away or restore a backup."
    )]
    Unreadable {
        /// The database file.
        path: PathBuf,
        /// redb's error.
        source: DatabaseError,
    },
    /// The database opened but its values table cannot be created or read.
    #[error("cannot prepare the database {path}: {message}")]
    Prepare {
        /// The database file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
}

/// One `write` waiting for the writer thread.
struct WriteJob {
    /// `Some` sets the key, `None` deletes it.
    entries: Vec<(String, Option<Value>)>,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// Every committed value, answered to readers.
type Mirror = RwLock<BTreeMap<String, Value>>;

/// The redb-backed store. Dropping it stops the writer thread and closes the database.
pub struct RedbStore {
    name: String,
    /// What the writer thread records of its commits.
    metrics: CommitMetrics,
    committed: Arc<Mirror>,
    jobs: Option<mpsc::Sender<WriteJob>>,
    writer: Option<JoinHandle<()>>,
}

impl fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbStore")
            .field("database", &self.name)
            .finish()
    }
}

impl RedbStore {
    /// Opens (creating if needed) the database `locksmith.redb` in `data_dir` and loads its
    /// values.
    ///
    /// # Errors
    /// An [`OpenError`] whose message says what is wrong: the directory is unusable, the
    /// database is in use by another process, or the file is not a readable database. It never
    /// starts afresh over an existing file.
    pub fn open(data_dir: &Path) -> Result<Self, OpenError> {
        std::fs::create_dir_all(data_dir).map_err(|source| OpenError::Directory {
            path: data_dir.to_owned(),
            source,
        })?;
        let path = data_dir.join(DATABASE_FILE);
        let opener_path = path.clone();
        Self::open_with(
            &path.display().to_string(),
            Box::new(move || Database::create(&opener_path)),
        )
        .map_err(|error| match error {
            OpenError::Unreadable {
                source: DatabaseError::DatabaseAlreadyOpen,
                ..
            } => OpenError::InUse { path: path.clone() },
            other => other,
        })
    }

    /// Opens the database with `opener` (also used to reopen it after an I/O error) and loads
    /// its values. `name` names the database in messages.
    ///
    /// # Errors
    /// As [`RedbStore::open`].
    pub fn open_with(name: &str, opener: Opener) -> Result<Self, OpenError> {
        let path = || PathBuf::from(name);
        let database = opener().map_err(|source| OpenError::Unreadable {
            path: path(),
            source,
        })?;
        let values = load(&database).map_err(|message| OpenError::Prepare {
            path: path(),
            message,
        })?;
        let committed = Arc::new(RwLock::new(values));
        let (jobs, queue) = mpsc::channel(QUEUE_DEPTH);
        let metrics = CommitMetrics::default();
        let mut writer = Writer {
            metrics: metrics.clone(),
            name: name.to_owned(),
            database: Some(database),
            opener,
            committed: Arc::clone(&committed),
        };
        let writer = std::thread::Builder::new()
            .name("locksmith-writer".into())
            .spawn(move || writer.run(queue))
            .map_err(|e| OpenError::Prepare {
                path: path(),
                message: format!("cannot start the writer thread: {e}"),
            })?;
        Ok(RedbStore {
            name: name.to_owned(),
            metrics,
            committed,
            jobs: Some(jobs),
            writer: Some(writer),
        })
    }
}

impl Store for RedbStore {
    fn read(&self, keys: &[&str]) -> Result<Vec<Option<Value>>, StoreError> {
        let committed = self
            .committed
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(keys.iter().map(|k| committed.get(*k).cloned()).collect())
    }

    fn keys(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<KeysPage, StoreError> {
        let committed = self
            .committed
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(page_of(&committed, prefix, after, limit))
    }

    fn apply(
        &self,
        entries: Vec<(String, Option<Value>)>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let (done, answer) = oneshot::channel();
            let jobs = self.jobs.as_ref().ok_or_else(writer_gone)?;
            jobs.send(WriteJob { entries, done })
                .await
                .map_err(|_| writer_gone())?;
            answer.await.map_err(|_| writer_gone())?
        })
    }

    fn commit_metrics(&self) -> Option<CommitMetrics> {
        Some(self.metrics.clone())
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        // Closing the channel ends the writer loop once it has answered every queued job; the
        // database is closed when the thread ends.
        self.jobs.take();
        if let Some(writer) = self.writer.take() {
            if writer.join().is_err() {
                tracing::warn!(database = %self.name, "the writer thread panicked");
            }
        }
    }
}

/// Creates the values table if needed and reads every value.
fn load(database: &Database) -> Result<BTreeMap<String, Value>, String> {
    let transaction = database.begin_write().map_err(|e| e.to_string())?;
    transaction.open_table(VALUES).map_err(|e| e.to_string())?;
    transaction.commit().map_err(|e| e.to_string())?;
    let transaction = database.begin_read().map_err(|e| e.to_string())?;
    let table = transaction.open_table(VALUES).map_err(|e| e.to_string())?;
    let mut values = BTreeMap::new();
    for entry in table.iter().map_err(|e| e.to_string())? {
        let (key, value) = entry.map_err(|e| e.to_string())?;
        let value: Value = serde_json::from_slice(value.value())
            .map_err(|e| format!("the stored value of {:?} is not JSON: {e}", key.value()))?;
        values.insert(key.value().to_owned(), value);
    }
    Ok(values)
}

/// The writer thread's state: it alone touches the database after start-up.
struct Writer {
    name: String,
    /// `None` after a failed reopen; reopened before the next batch.
    database: Option<Database>,
    opener: Opener,
    committed: Arc<Mirror>,
    /// Every group commit is recorded here: its duration, its size, and whether it failed.
    metrics: CommitMetrics,
}

impl Writer {
    /// Batches queued jobs into one transaction each, until the store is dropped.
    fn run(&mut self, mut queue: mpsc::Receiver<WriteJob>) {
        let mut batch = Vec::new();
        while let Some(first) = queue.blocking_recv() {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            let started = std::time::Instant::now();
            let outcome = self.commit(&batch);
            let elapsed = started.elapsed();
            self.metrics.commit(batch.len(), elapsed, outcome.is_ok());
            tracing::trace!(
                jobs = batch.len(),
                micros = elapsed.as_micros() as u64,
                "group commit"
            );
            match &outcome {
                Ok(()) => {
                    let mut committed = self
                        .committed
                        .write()
                        .unwrap_or_else(PoisonError::into_inner);
                    for job in &batch {
                        for (key, value) in &job.entries {
                            match value {
                                Some(value) => committed.insert(key.clone(), value.clone()),
                                None => committed.remove(key),
                            };
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(database = %self.name, %error, jobs = batch.len(), "commit failed");
                    // redb refuses every operation after an I/O error: start afresh from disk.
                    self.database = None;
                }
            }
            for job in batch.drain(..) {
                // The writer may have gone away (its connection closed); nothing to answer then.
                let _ = job.done.send(outcome.clone());
            }
        }
    }

    /// Applies every job of the batch in one durable transaction.
    fn commit(&mut self, batch: &[WriteJob]) -> Result<(), StoreError> {
        if self.database.is_none() {
            let database = (self.opener)().map_err(|e| {
                StoreError::Storage(format!("cannot reopen the database {}: {e}", self.name))
            })?;
            tracing::warn!(database = %self.name, "reopened the database after an I/O error");
            self.database = Some(database);
        }
        let Some(database) = &self.database else {
            return Err(writer_gone());
        };
        let mut transaction = database.begin_write().map_err(storage)?;
        transaction.set_durability(Durability::Immediate);
        {
            let mut table = transaction.open_table(VALUES).map_err(storage)?;
            for job in batch {
                for (key, value) in &job.entries {
                    match value {
                        Some(value) => {
                            let bytes = value.to_string();
                            table
                                .insert(key.as_str(), bytes.as_bytes())
                                .map_err(storage)?;
                        }
                        None => {
                            table.remove(key.as_str()).map_err(storage)?;
                        }
                    }
                }
            }
        }
        transaction.commit().map_err(storage)
    }
}

fn storage(error: impl fmt::Display) -> StoreError {
    StoreError::Storage(error.to_string())
}

fn writer_gone() -> StoreError {
    StoreError::Storage("the store is shut down".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn a_delete_is_committed_with_the_sets_of_its_write_and_survives_a_reopen() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        {
            let store = RedbStore::open(dir.path()).expect("open");
            store
                .write(vec![("a".into(), json!(1)), ("b".into(), json!(2))])
                .await
                .expect("write");
            store
                .apply(vec![("a".into(), None), ("c".into(), Some(json!(3)))])
                .await
                .expect("write");
            assert_eq!(store.keys("", None, 10).expect("keys").keys, vec!["b", "c"]);
        }
        let store = RedbStore::open(dir.path()).expect("reopen");
        assert_eq!(
            store.read(&["a", "b", "c"]).expect("read"),
            vec![None, Some(json!(2)), Some(json!(3))]
        );
    }
}
