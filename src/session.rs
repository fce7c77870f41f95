//! One client session: carries out decoded requests against the lock manager and the store.
//!
//! A `ClientSession` owns a lock-manager [`Session`](crate::lock::Session); dropping it (the
//! connection ended, however it ended) releases every lock the client held and withdraws the
//! request it was waiting on. It knows nothing of WebSockets: the connection layer feeds it
//! [`Request`]s and sends back what it returns.
//!
//! `read` and `write` take the locks they need, use the store, and then give back exactly the
//! locks they added, as the grant lists them ([`Taken`]): keys the session held before keep the
//! mode they had (a write upgrades a shared key and downgrades it again afterwards), so a request
//! without `hold_lock` leaves the session's locks as it found them, whether it succeeds or fails.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::lock::{Grant, Key, LockError, LockManager, LockMode, Session, SessionId, Taken};
use crate::protocol::{Command, Reply, Request, ServiceError};
use crate::store::Store;

/// What a session needs from the server.
#[derive(Clone)]
pub struct SessionContext {
    /// The shared lock manager.
    pub locks: LockManager,
    /// The shared value store.
    pub store: Arc<dyn Store>,
    /// Wait limit of requests that do not give `timeout_ms`.
    pub default_timeout: Duration,
}

/// One client's session. See the module documentation.
pub struct ClientSession {
    context: SessionContext,
    session: Session,
}

impl ClientSession {
    /// Opens a session in the lock manager.
    pub fn open(context: SessionContext) -> Self {
        let session = context.locks.open_session();
        ClientSession { context, session }
    }

    /// The session id (also the lock manager's).
    pub fn id(&self) -> SessionId {
        self.session.id()
    }

    /// Carries out one request.
    ///
    /// # Errors
    /// The [`ServiceError`] to answer with; an error never leaves a partial effect.
    pub async fn execute(&self, request: &Request) -> Result<Reply, ServiceError> {
        let deadline =
            tokio::time::Instant::now() + request.timeout.unwrap_or(self.context.default_timeout);
        match &request.command {
            Command::Lock { keys, mode } => {
                let grant = self.acquire(keys, *mode, deadline).await?;
                Ok(Reply::Tokens(grant.tokens))
            }
            Command::Unlock { keys } => {
                self.context.locks.release(&self.session, keys)?;
                Ok(Reply::Done)
            }
            Command::Read { keys, hold_lock } => self.read(keys, *hold_lock, deadline).await,
            Command::Write {
                keys,
                values,
                hold_lock,
            } => self.write(keys, values, *hold_lock, deadline).await,
            Command::Ping => Ok(Reply::Done),
            Command::Locks => Ok(Reply::Locks {
                snapshot: self.context.locks.snapshot(),
                taken_at: tokio::time::Instant::now().into_std(),
                sessions: self.context.locks.session_count(),
            }),
            Command::Session => Ok(Reply::Session(self.id())),
        }
    }

    async fn read(
        &self,
        keys: &[Key],
        hold_lock: bool,
        deadline: tokio::time::Instant,
    ) -> Result<Reply, ServiceError> {
        let grant = self.acquire(keys, LockMode::Shared, deadline).await?;
        let names: Vec<&str> = keys.iter().map(Key::as_str).collect();
        let read = self.context.store.read(&names);
        if !hold_lock || read.is_err() {
            self.give_back(&grant.taken);
        }
        let values = read?;
        Ok(Reply::Values(keys.iter().cloned().zip(values).collect()))
    }

    async fn write(
        &self,
        keys: &[Key],
        values: &[Value],
        hold_lock: bool,
        deadline: tokio::time::Instant,
    ) -> Result<Reply, ServiceError> {
        let grant = self.acquire(keys, LockMode::Exclusive, deadline).await?;
        let entries = keys
            .iter()
            .map(|k| k.to_string())
            .zip(values.iter().cloned())
            .collect();
        let written = self.context.store.write(entries).await;
        if !hold_lock || written.is_err() {
            self.give_back(&grant.taken);
        }
        if let Err(error) = &written {
            tracing::warn!(session = %self.id(), %error, "write failed");
        }
        written?;
        Ok(Reply::Written(grant.tokens))
    }

    /// Acquires through the lock manager, logging deadlocks.
    async fn acquire(
        &self,
        keys: &[Key],
        mode: LockMode,
        deadline: tokio::time::Instant,
    ) -> Result<Grant, ServiceError> {
        let result = self
            .context
            .locks
            .acquire(&self.session, keys, mode, Some(deadline))
            .await;
        if let Err(LockError::Deadlock { cycle }) = &result {
            let cycle: Vec<String> = cycle
                .iter()
                .map(|m| format!("{} waits for {}", m.session, m.waiting_for_key))
                .collect();
            tracing::info!(session = %self.id(), cycle = ?cycle, "deadlock: request refused");
        }
        Ok(result?)
    }

    /// Gives back what a request took. Those keys are held by construction (the session runs one
    /// request at a time), so this cannot fail with `NotHeld`; an error here would only mean the
    /// session is already closed, in which case there is nothing left to give back.
    fn give_back(&self, taken: &Taken) {
        let _ = self.context.locks.give_back(&self.session, taken);
    }
}
