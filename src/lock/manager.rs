//! The async lock manager: a cheap, cloneable handle around the [`LockTable`] behind one std
//! `Mutex`, plus the session handle.
//!
//! The mutex is never held across an `.await`: a call locks, runs the table to completion
//! (microseconds), unlocks, then wakes the callers whose waiting requests concluded. A waiting
//! `acquire` awaits a `oneshot` outside the lock and, once woken (or at its deadline), locks again
//! to collect its outcome from the table. Because the outcome is collected under the lock, a
//! grant and a timeout can never both happen: whichever the table saw first wins.
//!
//! Cancellation safety: a waiting `acquire` owns a [`PendingRequest`] guard. If the future is
//! dropped before it collected its outcome, the guard withdraws the request from the table,
//! releasing whatever it had acquired (even a grant that had just arrived), so nothing leaks.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;
use tokio::time::Instant;

use locksmith_lock::{
    Acquired, BusiestKeys, Effects, FencingToken, Gauges, Grant, Key, LockError, LockMode,
    LockTable, Now, SessionId, Snapshot, Taken,
};
use uuid::Uuid;

/// The manager's map of wakers, hashed like the table's maps.
type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Default of [`LockManagerConfig::max_keys_per_session`] (and of `--max-locks-per-session`):
/// 100,000 held keys cost a session about 37 MB.
pub const DEFAULT_MAX_KEYS_PER_SESSION: usize = 100_000;

/// Settings of a [`LockManager`].
#[derive(Clone, Debug)]
pub struct LockManagerConfig {
    /// Largest number of distinct keys one `acquire` may name (`InvalidRequest` above it).
    pub max_keys_per_request: usize,
    /// Largest number of keys one session may hold: a request that would take it over is
    /// refused with `TooManyLocks` before anything is taken. It bounds what one client can make
    /// the server keep.
    pub max_keys_per_session: usize,
}

impl Default for LockManagerConfig {
    fn default() -> Self {
        LockManagerConfig {
            max_keys_per_request: 1024,
            max_keys_per_session: DEFAULT_MAX_KEYS_PER_SESSION,
        }
    }
}

/// The lock manager. Cloning it is cheap; all clones share one table.
#[derive(Clone)]
pub struct LockManager {
    shared: Arc<Mutex<State>>,
}

/// Everything behind the mutex.
struct State {
    table: LockTable,
    /// How to wake the caller of each waiting request.
    wakers: FastMap<SessionId, oneshot::Sender<()>>,
}

impl State {
    /// Takes the wakers of every request a table call concluded; the caller sends them after
    /// unlocking.
    fn wakers_of(&mut self, effects: Effects) -> Wakers {
        let mut wakers = Vec::new();
        for session in effects.concluded {
            if let Some(waker) = self.wakers.remove(&session) {
                wakers.push(waker);
            }
        }
        Wakers(wakers)
    }
}

/// Wakers to send once the mutex is released.
struct Wakers(Vec<oneshot::Sender<()>>);

impl Wakers {
    fn wake(self) {
        for waker in self.0 {
            // The receiver may be gone (its future was dropped); its guard cleans up.
            let _ = waker.send(());
        }
    }
}

impl LockManager {
    /// A manager with an empty table.
    pub fn new(config: LockManagerConfig) -> Self {
        LockManager {
            shared: Arc::new(Mutex::new(State {
                table: LockTable::new(config.max_keys_per_request)
                    .with_max_keys_per_session(config.max_keys_per_session),
                wakers: FastMap::default(),
            })),
        }
    }

    /// Makes every later fencing token larger than `floor` (see
    /// [`LockTable::raise_token_floor`]).
    pub fn raise_token_floor(&self, floor: u64) {
        self.lock().table.raise_token_floor(floor);
    }

    /// Opens a session with a random (v4) id. Dropping the returned handle closes it.
    pub fn open_session(&self) -> Session {
        let mut state = self.lock();
        let id = loop {
            let id = SessionId(Uuid::new_v4());
            // A collision of random v4 ids is astronomically unlikely; draw again if it happens.
            if state.table.open_session(id).is_ok() {
                break id;
            }
        };
        drop(state);
        Session {
            id,
            manager: self.clone(),
        }
    }

    /// Acquires `keys` (deduplicated, in sorted order) in `mode`, waiting until `deadline`
    /// (`None`: no limit; a deadline not in the future: a try-lock that never waits).
    ///
    /// # Errors
    /// `Deadlock` if waiting would close a cycle (never for a try-lock), `Timeout` at the
    /// deadline, `SessionClosed`, `Cancelled` if the session called `release_all` meanwhile,
    /// `InvalidRequest` for an empty or oversized key list or a second concurrent request of the
    /// same session. On every error the session holds exactly what it held before.
    pub async fn acquire(
        &self,
        session: &Session,
        keys: &[Key],
        mode: LockMode,
        deadline: Option<Instant>,
    ) -> Result<Grant, LockError> {
        // The clock is read only when the deadline needs it; otherwise the table reads it if
        // the request queues.
        let (now, may_wait) = match deadline {
            Some(deadline) => {
                let now = Instant::now();
                (Now::from(now.into_std()), deadline > now)
            }
            None => (Now::lazy(std_now), true),
        };
        let (started, wakers) = {
            let mut state = self.lock();
            let (started, effects) = state.table.acquire(session.id, keys, mode, now, may_wait);
            let started = match started {
                Ok(Acquired::Waiting) => {
                    let (tx, rx) = oneshot::channel();
                    state.wakers.insert(session.id, tx);
                    Ok(Some(rx))
                }
                Ok(Acquired::Granted(grant)) => Err(Ok(grant)),
                Err(error) => Err(Err(error)),
            };
            (started, state.wakers_of(effects))
        };
        wakers.wake();
        let receiver = match started {
            Ok(Some(receiver)) => receiver,
            Ok(None) => return Err(LockError::SessionClosed),
            Err(outcome) => return outcome,
        };
        PendingRequest {
            manager: self,
            session: session.id,
            receiver,
            armed: true,
        }
        .wait(deadline)
        .await
    }

    /// Releases `keys`.
    ///
    /// # Errors
    /// `NotHeld` (nothing is released) if the session does not hold one of them;
    /// `SessionClosed`; `InvalidRequest` for an empty list or while a request of the session is
    /// in progress.
    pub fn release(&self, session: &Session, keys: &[Key]) -> Result<(), LockError> {
        self.with_table(|table| table.release(session.id, keys, Now::lazy(std_now)))
    }

    /// Turns the session's exclusive locks on `keys` back into shared ones (keeping their
    /// tokens); shared ones stay shared. Waiters that become compatible are granted.
    ///
    /// # Errors
    /// As [`LockManager::release`].
    pub fn downgrade(&self, session: &Session, keys: &[Key]) -> Result<(), LockError> {
        self.with_table(|table| table.downgrade(session.id, keys, Now::lazy(std_now)))
    }

    /// Gives back what one request took ([`Grant::taken`]): releases the keys it acquired and
    /// downgrades the keys it upgraded, in one call.
    ///
    /// # Errors
    /// As [`LockManager::release`].
    pub fn give_back(&self, session: &Session, taken: &Taken) -> Result<(), LockError> {
        self.with_table(|table| table.give_back(session.id, taken, Now::lazy(std_now)))
    }

    /// Releases every lock of the session and withdraws its waiting request, if any (that
    /// request fails with `Cancelled`). Does nothing on a closed session.
    pub fn release_all(&self, session: &Session) {
        let _closed = self.with_table(|table| table.release_all(session.id, Now::lazy(std_now)));
    }

    /// Closes the session with this id, wherever its handle is: its waiting request fails with
    /// `SessionClosed`, its locks are released. Returns false if it was not open.
    pub fn close_session(&self, id: SessionId) -> bool {
        self.with_table(|table| table.close_session(id, Now::lazy(std_now)))
    }

    /// Withdraws the session's request if it is waiting for a key: the request is rolled back
    /// and its caller gets `Cancelled`. A request past its wait (granted, failed) or none at all
    /// is left alone. Returns whether a request was withdrawn.
    pub fn withdraw_wait(&self, session: &Session) -> bool {
        self.with_table(|table| table.withdraw_wait(session.id, Now::lazy(std_now)))
    }

    /// For each of `ids`, in order: how many keys it holds and the key it waits on (`None` for a
    /// session that is not open). One critical section.
    pub fn session_summaries(&self, ids: &[SessionId]) -> Vec<Option<(usize, Option<Key>)>> {
        let state = self.lock();
        ids.iter()
            .map(|&id| state.table.session_summary(id))
            .collect()
    }

    /// The mode and fencing token under which the session holds `key`, if it does.
    pub fn held_mode(&self, session: &Session, key: &Key) -> Option<(LockMode, FencingToken)> {
        self.lock().table.held_mode(session.id, key)
    }

    /// Every key the session holds, sorted.
    pub fn held_keys(&self, session: &Session) -> Vec<Key> {
        self.lock().table.held_keys(session.id)
    }

    /// Every key the session holds, sorted, with the fencing token it holds it under.
    pub fn held_tokens(&self, session: &Session) -> Vec<(Key, FencingToken)> {
        let state = self.lock();
        state
            .table
            .held_keys(session.id)
            .into_iter()
            .filter_map(|key| {
                let (_, token) = state.table.held_mode(session.id, &key)?;
                Some((key, token))
            })
            .collect()
    }

    /// What the table holds now, counted for monitoring ([`LockTable::gauges`]). One critical
    /// section of O(keys + holders + waiters): for a metrics scrape, not for every request.
    pub fn gauges(&self) -> Gauges {
        self.lock().table.gauges(std_now())
    }

    /// The number of open sessions.
    pub fn session_count(&self) -> usize {
        self.lock().table.session_count()
    }

    /// A consistent picture of every held or awaited key and of the waits-for edges.
    ///
    /// Only the holders and queues are copied under the lock; the waits-for edges (O(q²) for q
    /// exclusive waiters on one key) are derived after releasing it, so a snapshot never holds up
    /// other keys for longer than copying the queues takes.
    pub fn snapshot(&self) -> Snapshot {
        let keys = self.lock().table.keys_snapshot();
        Snapshot::from_keys(keys)
    }

    /// As [`LockManager::snapshot`], for the first `limit` keys (in key order) that start with
    /// `prefix`, and how many more keys start with it. The waits-for edges are derived from the
    /// keys listed alone, after the lock is released.
    pub fn snapshot_page(&self, prefix: &str, limit: usize) -> (Snapshot, usize) {
        let (keys, more) = self.lock().table.keys_snapshot_page(prefix, limit);
        (Snapshot::from_keys(keys), more)
    }

    /// The busiest keys and the table's gauges at `now`, taken together under one lock, for a
    /// live view (see [`LockTable::busiest_keys`] and [`LockTable::gauges`]).
    pub fn busiest_keys(&self, limit: usize, now: Instant) -> (BusiestKeys, Gauges) {
        let state = self.lock();
        (
            state.table.busiest_keys(limit),
            state.table.gauges(now.into_std()),
        )
    }

    /// Runs `f` on the table under the lock, then wakes the requests it concluded.
    fn with_table<T>(&self, f: impl FnOnce(&mut LockTable) -> (T, Effects)) -> T {
        let (result, wakers) = {
            let mut state = self.lock();
            let (result, effects) = f(&mut state.table);
            (result, state.wakers_of(effects))
        };
        wakers.wake();
        result
    }

    /// Locks the state. A panic while the lock was held cannot leave the table half-updated in a
    /// way that matters more than stopping would, so a poisoned lock is used as is.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn std_now() -> std::time::Instant {
    Instant::now().into_std()
}

/// A request waiting in the table, owned by the `acquire` future. Dropping it before the outcome
/// was collected withdraws the request (see the module documentation).
struct PendingRequest<'a> {
    manager: &'a LockManager,
    session: SessionId,
    receiver: oneshot::Receiver<()>,
    /// False once the outcome has been collected.
    armed: bool,
}

impl PendingRequest<'_> {
    async fn wait(mut self, deadline: Option<Instant>) -> Result<Grant, LockError> {
        loop {
            let woken = match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, &mut self.receiver)
                    .await
                    .is_ok(),
                None => {
                    let _ = (&mut self.receiver).await;
                    true
                }
            };
            let mut state = self.manager.lock();
            let (outcome, effects) = if woken {
                (state.table.take_outcome(self.session), Effects::default())
            } else {
                let (outcome, effects) = state.table.expire(self.session, Now::lazy(std_now));
                (Some(outcome), effects)
            };
            match outcome {
                Some(outcome) => {
                    self.armed = false;
                    // At a deadline the waker was never sent: drop it with the request.
                    state.wakers.remove(&self.session);
                    let wakers = state.wakers_of(effects);
                    drop(state);
                    wakers.wake();
                    return outcome;
                }
                None => {
                    // Woken without an outcome (the waker was lost): wait again.
                    let (tx, rx) = oneshot::channel();
                    state.wakers.insert(self.session, tx);
                    self.receiver = rx;
                }
            }
        }
    }
}

impl Drop for PendingRequest<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // One critical section: the waker of this request goes with the request, so it can never
        // be mistaken for the waker of a later request of the same session.
        let wakers = {
            let mut state = self.manager.lock();
            state.wakers.remove(&self.session);
            let effects = state.table.cancel(self.session, Now::lazy(std_now));
            state.wakers_of(effects)
        };
        wakers.wake();
    }
}

/// A session: the owner of locks. Dropping it closes it (releasing everything it holds and
/// withdrawing what it waits for).
pub struct Session {
    id: SessionId,
    manager: LockManager,
}

impl Session {
    /// The session's id (a random v4 uuid).
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// Closes the session now (the same as dropping it).
    pub fn close(self) {}
}

impl Drop for Session {
    fn drop(&mut self) {
        self.manager.close_session(self.id);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_request_that_times_out_leaves_no_waker_behind() {
        // A: X(k1); B: X(k1) with a 10 ms deadline: B times out. Its waker was never sent (no call
        // concluded B's request), and it must not stay in the map for the life of the process.
        let manager = LockManager::new(LockManagerConfig::default());
        let (a, b) = (manager.open_session(), manager.open_session());
        let k1 = [Key::from("k1")];
        manager
            .acquire(&a, &k1, LockMode::Exclusive, None)
            .await
            .expect("k1 is free");
        let deadline = Instant::now() + Duration::from_millis(10);
        let waited = manager
            .acquire(&b, &k1, LockMode::Exclusive, Some(deadline))
            .await;
        assert_eq!(waited, Err(LockError::Timeout { key: k1[0].clone() }));
        assert!(manager.lock().wakers.is_empty());
    }
}
