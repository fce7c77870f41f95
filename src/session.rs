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
//! `delete` is a write that removes its keys.
//!
//! The session is also registered in the server's [`Registry`] (its name, peer, admin flag,
//! grace), which `hello`, `sessions`, `locks`, deadlock answers and `kill` read; its
//! [`Registration`] goes with it.
//!
//! A resumable session (one that asked for a grace period) outlives its connection: when the
//! connection drops, the connection parks it in [`Suspensions`], and [`ClientSession::resume`]
//! hands it to the next connection that presents its secret.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::auth::Secret;
use crate::deadlocks::DeadlockHistory;
use crate::lock::{Grant, Key, LockError, LockManager, LockMode, Session, SessionId, Taken};
use crate::log_limit::LogLimit;
use crate::metrics::Metrics;
use crate::protocol::{Command, NamedMember, Reply, Request, ServiceError, SessionInfo};
use crate::registry::{ClaimRefused, Registration, Registry, Resumable};
use crate::store::Store;
use crate::suspension::Suspensions;

/// Longest an administrator's `kill` waits for the target's connection to release the session
/// before closing it in the lock manager itself.
pub const KILL_RELEASE_LIMIT: Duration = Duration::from_secs(10);

/// Longest a `resume` waits for the connection it takes a session over from to hand the session
/// over. That connection first lets its request in progress settle (at most 10 s, see
/// `connection`), so this is a little longer.
pub const TAKEOVER_LIMIT: Duration = Duration::from_secs(15);

/// What a session needs from the server.
#[derive(Clone)]
pub struct SessionContext {
    /// The shared lock manager.
    pub locks: LockManager,
    /// The shared value store.
    pub store: Arc<dyn Store>,
    /// Wait limit of requests that do not give `timeout_ms`.
    pub default_timeout: Duration,
    /// The directory of open sessions (names, peers, admin flags, kill handles).
    pub registry: Registry,
    /// Keeps deadlock log lines to about one a second under a storm of them.
    pub deadlock_log: Arc<Mutex<LogLimit>>,
    /// Resumable sessions whose connection dropped.
    pub suspensions: Suspensions,
    /// The last deadlocks refused, for the live page.
    pub deadlocks: DeadlockHistory,
    /// Longest grace period a session may ask for (`--max-session-grace`); longer requests get
    /// this.
    pub max_session_grace: Duration,
    /// The server's metrics: the connection records its requests, the session its lock waits
    /// and sessions opened.
    pub metrics: Metrics,
}

/// Who the client of a new session is, as the connection learned it before the upgrade.
#[derive(Clone, Debug)]
pub struct Client {
    /// Its address.
    pub peer: SocketAddr,
    /// The name it gave on the URL (`?name=`), already validated.
    pub name: Option<String>,
    /// It presented the admin token.
    pub admin: bool,
}

/// One client's session. See the module documentation.
pub struct ClientSession {
    context: SessionContext,
    /// The lock-manager session: dropping it releases every lock. Declared before
    /// `registration`, so the locks are released before the registry entry goes, which is what
    /// an administrator's `kill` waits for. (`sessions` skips an entry whose lock-manager
    /// session is already closed.)
    session: Session,
    /// Removes the registry entry when the session ends.
    registration: Registration,
}

impl ClientSession {
    /// Opens a session in the lock manager and registers it.
    pub fn open(context: SessionContext, client: Client) -> Self {
        let session = context.locks.open_session();
        context.metrics.session_opened();
        let registration =
            context
                .registry
                .register(session.id(), client.peer, client.name, client.admin);
        ClientSession {
            context,
            session,
            registration,
        }
    }

    /// Cancelled when an administrator kills this session (its locks are already released
    /// then); the connection answers `killed` and closes.
    pub fn killed(&self) -> &CancellationToken {
        self.registration.killed()
    }

    /// Cancelled when a `resume` on another connection takes this session over; the connection
    /// then hands the session over and closes.
    pub fn detached(&self) -> &CancellationToken {
        self.registration.detached()
    }

    /// Its grace period and resume secret, if it asked for a grace period.
    pub fn resumable(&self) -> Option<Resumable> {
        self.context.registry.resumable(self.id())
    }

    /// Marks it suspended in the registry (its connection dropped).
    pub fn mark_suspended(&self) {
        self.registration.suspend();
    }

    /// Its connection dropped (or, with `handover`, a `resume` took it over): a resumable
    /// session is suspended — parked with its locks for its grace period — and its grace
    /// returned; any other session (or one that cannot be parked: killed, or too many suspended
    /// unless it is a handover) is released. `withdrew_wait` says whether the connection
    /// withdrew its lock wait.
    pub fn suspend_or_release(self, withdrew_wait: bool, handover: bool) -> Option<Duration> {
        let resumable = self.resumable()?;
        let suspensions = self.context.suspensions.clone();
        suspensions
            .park(self, resumable.grace, withdrew_wait, handover)
            .then_some(resumable.grace)
    }

    /// Attaches it to a new connection from `client` after a `resume`.
    pub fn attach(&mut self, client: &Client) {
        self.registration.attach(client.peer, client.admin);
        self.context.suspensions.attached();
    }

    /// The answer to a `resume` that attached this session: as `hello`'s, plus every key it holds
    /// with its token.
    pub fn resumed_reply(&self) -> Reply {
        Reply::Hello {
            session: self.id(),
            name: self.context.registry.name(self.id()),
            resumable: self.resumable().map(|r| (r.grace, r.secret)),
            held: Some(self.context.locks.held_tokens(&self.session)),
        }
    }

    /// Carries out `resume` of session `target` with `secret` for this connection, whose own
    /// session (`self`) must hold nothing and wait for nothing. Returns the resumed session,
    /// which the connection adopts in place of its own. A suspended session is taken at once; a
    /// connected one is taken over: its connection is told to hand it over (see
    /// [`detached`](Self::detached)) and this waits for it, at most [`TAKEOVER_LIMIT`].
    ///
    /// # Errors
    /// `session_expired` if `target` is not open, `forbidden` for a wrong secret or a session
    /// that never asked for a grace period (the session is not disturbed), `bad_request` if this
    /// connection already holds or waits for locks, `not_found` if the takeover did not complete
    /// in time.
    pub async fn resume(
        &self,
        target: SessionId,
        secret: &Secret,
    ) -> Result<ClientSession, ServiceError> {
        if target == self.id() {
            return Err(ServiceError::BadRequest(format!(
                "this connection already is session {target}"
            )));
        }
        let own = self.context.locks.session_summaries(&[self.id()]).pop();
        if let Some(Some((held, waiting_for))) = own {
            if held > 0 || waiting_for.is_some() {
                return Err(ServiceError::BadRequest(
                    "resume must come before this connection takes any lock".into(),
                ));
            }
        }
        let deadline = tokio::time::Instant::now() + TAKEOVER_LIMIT;
        loop {
            let changes = self.context.suspensions.changes();
            tokio::pin!(changes);
            changes.as_mut().enable();
            // Checked on every round: a concurrent resume may have attached the session to
            // another connection since, which this one then takes over in turn.
            let claim = match self.context.registry.claim(target, secret) {
                Ok(claim) => claim,
                Err(ClaimRefused::NotOpen) => return Err(expired(target)),
                Err(ClaimRefused::NotResumable) => {
                    return Err(ServiceError::Forbidden(format!(
                        "session {target} did not ask for a grace period: it cannot be resumed"
                    )))
                }
                Err(ClaimRefused::WrongSecret) => {
                    tracing::info!(session = %target, "resume refused: wrong secret");
                    return Err(ServiceError::Forbidden(format!(
                        "wrong resume secret for session {target}"
                    )));
                }
            };
            if let Some(session) = self.context.suspensions.unpark(target) {
                return Ok(session);
            }
            if let Some(detach) = claim.detach {
                detach.cancel();
            }
            tokio::select! {
                () = changes => {}
                () = claim.gone.cancelled() => return Err(expired(target)),
                () = tokio::time::sleep_until(deadline) => {
                    return Err(ServiceError::NotFound(format!(
                        "session {target} was not handed over by its connection within {TAKEOVER_LIMIT:?}; try again"
                    )))
                }
            }
        }
    }

    /// Withdraws this session's request if it is waiting for a lock (it then fails with
    /// `cancelled`). Returns whether one was withdrawn. For `cancel`, which does not wait its
    /// turn.
    pub fn cancel_wait(&self) -> bool {
        self.context.locks.withdraw_wait(&self.session)
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
        let now = tokio::time::Instant::now();
        let started = Started {
            at: now,
            deadline: now + request.timeout.unwrap_or(self.context.default_timeout),
        };
        match &request.command {
            Command::Lock { keys, mode } => {
                let grant = self.acquire(keys, *mode, started).await?;
                Ok(Reply::Tokens(grant.tokens))
            }
            Command::Unlock { keys } => {
                self.context.locks.release(&self.session, keys)?;
                Ok(Reply::Done)
            }
            Command::Read { keys, hold_lock } => self.read(keys, *hold_lock, started).await,
            Command::Write {
                keys,
                values,
                hold_lock,
            } => self.write(keys, values, *hold_lock, started).await,
            Command::Delete { keys, hold_lock } => self.delete(keys, *hold_lock, started).await,
            Command::Ping => Ok(Reply::Done),
            Command::Locks { prefix, limit } => {
                let (snapshot, more) = self.context.locks.snapshot_page(prefix, *limit);
                Ok(Reply::Locks {
                    snapshot,
                    taken_at: tokio::time::Instant::now().into_std(),
                    sessions: self.context.locks.session_count(),
                    names: self.context.registry.names(),
                    suspended: self
                        .context
                        .registry
                        .suspended()
                        .into_iter()
                        .map(|(id, at)| (id, at.into_std()))
                        .collect(),
                    more,
                    limit: *limit,
                })
            }
            Command::Session => Ok(Reply::Session(self.id())),
            Command::Hello { name, grace } => {
                if let Some(name) = name {
                    self.context.registry.set_name(self.id(), name.clone());
                }
                let resumable = match grace {
                    Some(grace) => self
                        .context
                        .registry
                        .set_grace(self.id(), (*grace).min(self.context.max_session_grace)),
                    None => self.resumable(),
                };
                Ok(Reply::Hello {
                    session: self.id(),
                    name: self.context.registry.name(self.id()),
                    resumable: resumable.map(|r| (r.grace, r.secret)),
                    held: None,
                })
            }
            // The connection carries `resume` out itself, since it changes the connection's
            // session (see `connection`); it never reaches here.
            Command::Resume { .. } => Err(ServiceError::BadRequest(
                "resume is carried out by the connection".into(),
            )),
            Command::Sessions { limit } => {
                let (sessions, more) = self.sessions(*limit);
                Ok(Reply::Sessions { sessions, more })
            }
            Command::Keys {
                prefix,
                after,
                limit,
            } => Ok(Reply::Keys(self.context.store.keys(
                prefix,
                after.as_deref(),
                *limit,
            )?)),
            // The connection carries `cancel` out when its frame arrives; run in turn, it finds
            // no request of this session waiting (this one is the request in progress).
            Command::Cancel => Ok(Reply::Cancelled(false)),
            Command::Kill { session } => self.kill(*session).await,
        }
    }

    /// The first `limit` open sessions (by id) with what each holds and waits for, and how many
    /// more are open.
    fn sessions(&self, limit: usize) -> (Vec<SessionInfo>, usize) {
        let mut listed = self.context.registry.list();
        let more = listed.len().saturating_sub(limit);
        listed.truncate(limit);
        let ids: Vec<SessionId> = listed.iter().map(|l| l.session).collect();
        let summaries = self.context.locks.session_summaries(&ids);
        let now = tokio::time::Instant::now();
        let sessions = listed
            .into_iter()
            .zip(summaries)
            // A session whose lock-manager session is gone is closing (killed): not listed.
            .filter_map(|(listed, summary)| {
                let (held, waiting_for) = summary?;
                Some(SessionInfo {
                    session: listed.session,
                    name: listed.name,
                    peer: listed.peer,
                    connected_ms: u64::try_from(
                        now.saturating_duration_since(listed.connected_at)
                            .as_millis(),
                    )
                    .unwrap_or(u64::MAX),
                    held,
                    waiting_for,
                    suspended_ms: listed.suspended_at.map(|at| {
                        u64::try_from(now.saturating_duration_since(at).as_millis())
                            .unwrap_or(u64::MAX)
                    }),
                })
            })
            .collect();
        (sessions, more)
    }

    /// Kills session `target` (admin connections only). The target's connection is told; it
    /// withdraws the target's lock wait, lets a write already being committed finish (so its
    /// keys are never released while its values may still land), and releases the session. This
    /// answers once that is done — without waiting for the target's socket, which the
    /// connection stops writing to when killed. If the release takes longer than
    /// [`KILL_RELEASE_LIMIT`] (a store that hangs), the session is closed here.
    async fn kill(&self, target: SessionId) -> Result<Reply, ServiceError> {
        if !self.context.registry.is_admin(self.id()) {
            return Err(ServiceError::Forbidden(
                "kill needs a connection that presented the admin token (--admin-token)".into(),
            ));
        }
        let Some(gone) = self.context.registry.kill(target) else {
            return Err(ServiceError::NotFound(format!("no open session {target}")));
        };
        tracing::info!(admin = %self.id(), session = %target, "session killed by an administrator");
        // A suspended session has no connection to release it: release it here. (One being
        // parked right now sees the kill and is released instead; see `Suspensions::park`.)
        self.context.suspensions.release(target);
        // Killing itself, the session is released after this answer; waiting here would wait
        // for this very request.
        if target != self.id()
            && tokio::time::timeout(KILL_RELEASE_LIMIT, gone.cancelled())
                .await
                .is_err()
        {
            tracing::warn!(session = %target, "a killed session was not released in time; closing it");
            self.context.locks.close_session(target);
        }
        Ok(Reply::Done)
    }

    async fn delete(
        &self,
        keys: &[Key],
        hold_lock: bool,
        started: Started,
    ) -> Result<Reply, ServiceError> {
        let grant = self.acquire(keys, LockMode::Exclusive, started).await?;
        // Under the exclusive locks nobody else can change these keys: what is read here is
        // what the delete removes.
        let names: Vec<&str> = keys.iter().map(Key::as_str).collect();
        let deleted = match self.context.store.read(&names) {
            Ok(values) => values.iter().flatten().count(),
            Err(error) => {
                self.give_back(&grant.taken);
                return Err(error.into());
            }
        };
        let entries = keys.iter().map(|k| (k.to_string(), None)).collect();
        let written = self.context.store.apply(entries).await;
        if !hold_lock || written.is_err() {
            self.give_back(&grant.taken);
        }
        if let Err(error) = &written {
            tracing::warn!(session = %self.id(), %error, "delete failed");
        }
        written?;
        Ok(Reply::Deleted {
            tokens: grant.tokens,
            deleted,
        })
    }

    async fn read(
        &self,
        keys: &[Key],
        hold_lock: bool,
        started: Started,
    ) -> Result<Reply, ServiceError> {
        let grant = self.acquire(keys, LockMode::Shared, started).await?;
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
        started: Started,
    ) -> Result<Reply, ServiceError> {
        let grant = self.acquire(keys, LockMode::Exclusive, started).await?;
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
        started: Started,
    ) -> Result<Grant, ServiceError> {
        let result = self
            .context
            .locks
            .acquire(&self.session, keys, mode, Some(started.deadline))
            .await;
        self.context
            .metrics
            .lock_acquired(started.at.elapsed(), &result);
        match result {
            Ok(grant) => Ok(grant),
            Err(LockError::Deadlock { cycle }) => {
                let cycle: Vec<NamedMember> = cycle
                    .into_iter()
                    .map(|member| NamedMember {
                        name: self.context.registry.name(member.session),
                        member,
                    })
                    .collect();
                self.log_deadlock(&cycle);
                self.context.deadlocks.record(cycle.clone());
                Err(ServiceError::Deadlock { cycle })
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Logs a deadlock at `info`, at most about once a second; the next line written says how
    /// many were left out.
    fn log_deadlock(&self, cycle: &[NamedMember]) {
        let allowed = self
            .context
            .deadlock_log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .allow(tokio::time::Instant::now());
        let Some(suppressed) = allowed else {
            return;
        };
        let cycle: Vec<String> = cycle
            .iter()
            .map(|m| {
                let name = m
                    .name
                    .as_deref()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default();
                format!(
                    "{}{name} waits for {}",
                    m.member.session, m.member.waiting_for_key
                )
            })
            .collect();
        if suppressed == 0 {
            tracing::info!(session = %self.id(), cycle = ?cycle, "deadlock: request refused");
        } else {
            tracing::info!(
                session = %self.id(),
                cycle = ?cycle,
                suppressed,
                "deadlock: request refused ({suppressed} more since the last line, not logged)"
            );
        }
    }

    /// Gives back what a request took. Those keys are held by construction (the session runs one
    /// request at a time), so this cannot fail with `NotHeld`; an error here would only mean the
    /// session is already closed, in which case there is nothing left to give back.
    fn give_back(&self, taken: &Taken) {
        let _ = self.context.locks.give_back(&self.session, taken);
    }
}

/// When a request that may take locks started, and its wait limit.
#[derive(Clone, Copy)]
struct Started {
    /// When it started (the lock wait is measured from here: the request's clock reading,
    /// reused).
    at: tokio::time::Instant,
    /// When its lock wait ends.
    deadline: tokio::time::Instant,
}

/// `session_expired` for `target`.
fn expired(target: SessionId) -> ServiceError {
    ServiceError::SessionExpired(format!(
        "session {target} is not open: its grace ran out, it was released or killed, or the server restarted"
    ))
}
