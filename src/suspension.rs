//! Suspended sessions: resumable sessions whose connection dropped, kept — with their locks —
//! for their grace period, until a `resume` attaches them to a new connection or the grace runs
//! out and they are released as a closed connection's session is.
//!
//! A suspended session waits for nothing (its connection withdrew its lock wait before parking
//! it), so it adds no waits-for edge; it only holds. Each parked session has a timer task; the
//! timer and `unpark` race under one mutex, and a parked entry carries a generation so that a
//! timer that lost the race can never release a later suspension of the same session.
//!
//! A session is dropped (released) outside the mutex: dropping it takes the registry's and the
//! lock manager's mutexes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::AbortHandle;

use crate::lock::SessionId;
use crate::session::ClientSession;

/// The suspended sessions. Cloning it is cheap; all clones share one set.
#[derive(Clone)]
pub struct Suspensions {
    shared: Arc<Shared>,
}

struct Shared {
    /// Every suspended session by id.
    parked: Mutex<HashMap<SessionId, Parked>>,
    /// Most sessions suspended at once; a session whose connection drops beyond it is released
    /// at once (suspended sessions hold no connection, so `--max-connections` does not bound
    /// them).
    limit: usize,
    /// Notified whenever a session is parked or attached to a new connection: a `resume`
    /// waiting for a takeover checks again (the session it wants may now be parked, or attached
    /// to another resuming connection, which it then takes over in turn).
    changed: Notify,
    /// Generations of parked entries.
    next_generation: AtomicU64,
    /// What happened so far, for the logs, tests and metrics.
    counts: Counts,
}

/// One suspended session.
struct Parked {
    /// The session, with its locks, its registration and its lock-manager session.
    session: ClientSession,
    /// Which suspension of this session this is (see the module documentation).
    generation: u64,
    /// The grace timer.
    timer: AbortHandle,
}

/// Counters of suspensions since the server started.
#[derive(Default)]
struct Counts {
    suspended: AtomicU64,
    resumed: AtomicU64,
    expired: AtomicU64,
    refused_over_limit: AtomicU64,
    withdrawn_waits: AtomicU64,
}

/// A copy of the counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SuspensionCounts {
    /// Sessions suspended.
    pub suspended: u64,
    /// Suspended sessions resumed by a new connection (takeovers included).
    pub resumed: u64,
    /// Suspended sessions released at the end of their grace.
    pub expired: u64,
    /// Sessions released at once because [`Suspensions`]' limit was reached.
    pub refused_over_limit: u64,
    /// Lock waits withdrawn because the waiting session's connection dropped and it was
    /// suspended.
    pub withdrawn_waits: u64,
}

impl Suspensions {
    /// An empty set that keeps at most `limit` sessions suspended at once.
    pub fn new(limit: usize) -> Self {
        Suspensions {
            shared: Arc::new(Shared {
                parked: Mutex::new(HashMap::new()),
                limit,
                changed: Notify::new(),
                next_generation: AtomicU64::new(0),
                counts: Counts::default(),
            }),
        }
    }

    /// Suspends `session` for `grace`: its locks stay held until [`unpark`](Self::unpark) takes
    /// it or the grace runs out. A killed session, or one over the limit, is released instead —
    /// except a `handover` (a takeover: a `resume` is waiting for it), which the limit does not
    /// refuse, since it is not a new suspension but a session changing connections. `withdrew_wait`
    /// says whether its connection withdrew a lock wait on the way (counted). Returns whether it
    /// was suspended.
    pub fn park(
        &self,
        session: ClientSession,
        grace: Duration,
        withdrew_wait: bool,
        handover: bool,
    ) -> bool {
        let id = session.id();
        let mut parked = self.parked();
        // Checked under the mutex that `release` takes after the kill is signalled: either the
        // kill's `release` finds the session here, or this sees the kill.
        if session.killed().is_cancelled() {
            drop(parked);
            drop(session);
            return false;
        }
        if parked.len() >= self.shared.limit && !handover {
            drop(parked);
            self.shared
                .counts
                .refused_over_limit
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(session = %id, limit = self.shared.limit, "too many suspended sessions: released instead of suspended");
            drop(session);
            return false;
        }
        let generation = self.shared.next_generation.fetch_add(1, Ordering::Relaxed);
        let expiry = self.clone();
        let timer = tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            expiry.expire(id, generation);
        })
        .abort_handle();
        session.mark_suspended();
        parked.insert(
            id,
            Parked {
                session,
                generation,
                timer,
            },
        );
        drop(parked);
        self.shared.counts.suspended.fetch_add(1, Ordering::Relaxed);
        if withdrew_wait {
            self.shared
                .counts
                .withdrawn_waits
                .fetch_add(1, Ordering::Relaxed);
        }
        self.shared.changed.notify_waiters();
        true
    }

    /// Takes suspended session `id` back, stopping its grace timer.
    pub fn unpark(&self, id: SessionId) -> Option<ClientSession> {
        let parked = self.parked().remove(&id)?;
        parked.timer.abort();
        self.shared.counts.resumed.fetch_add(1, Ordering::Relaxed);
        Some(parked.session)
    }

    /// Releases suspended session `id` now (`kill`). Returns whether it was suspended.
    pub fn release(&self, id: SessionId) -> bool {
        let parked = self.parked().remove(&id);
        match parked {
            Some(parked) => {
                parked.timer.abort();
                drop(parked.session);
                true
            }
            None => false,
        }
    }

    /// Releases every suspended session (shutdown: locks do not outlive the server).
    pub fn release_all(&self) {
        let parked: Vec<Parked> = self.parked().drain().map(|(_, parked)| parked).collect();
        for parked in parked {
            parked.timer.abort();
        }
    }

    /// Resolves when some session is parked or attached after this call. To wait for a
    /// particular change without missing it, create this before checking and await it after,
    /// pinned and enabled ([`Notify::notified`] registers on its first poll).
    pub fn changes(&self) -> tokio::sync::futures::Notified<'_> {
        self.shared.changed.notified()
    }

    /// Tells the waiting `resume`s that a session was attached to a new connection.
    pub fn attached(&self) {
        self.shared.changed.notify_waiters();
    }

    /// How many sessions are suspended.
    pub fn len(&self) -> usize {
        self.parked().len()
    }

    /// Is no session suspended?
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The counters so far.
    pub fn counts(&self) -> SuspensionCounts {
        let counts = &self.shared.counts;
        SuspensionCounts {
            suspended: counts.suspended.load(Ordering::Relaxed),
            resumed: counts.resumed.load(Ordering::Relaxed),
            expired: counts.expired.load(Ordering::Relaxed),
            refused_over_limit: counts.refused_over_limit.load(Ordering::Relaxed),
            withdrawn_waits: counts.withdrawn_waits.load(Ordering::Relaxed),
        }
    }

    /// The grace timer of suspension `generation` of `id` ran out: releases the session unless
    /// it was resumed (or suspended again) meanwhile.
    fn expire(&self, id: SessionId, generation: u64) {
        let mut parked = self.parked();
        if parked.get(&id).map(|p| p.generation) != Some(generation) {
            return;
        }
        let expired = parked.remove(&id);
        drop(parked);
        if let Some(expired) = expired {
            self.shared.counts.expired.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(session = %id, "suspended session expired: its grace ran out; releasing its locks");
            drop(expired.session);
        }
    }

    /// Locks the map. A panic while it was held cannot leave an entry half-written, so a
    /// poisoned lock is used as is.
    fn parked(&self) -> MutexGuard<'_, HashMap<SessionId, Parked>> {
        self.shared
            .parked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Mutex;

    use super::*;
    use crate::lock::{LockManager, LockManagerConfig};
    use crate::log_limit::LogLimit;
    use crate::registry::Registry;
    use crate::session::{Client, SessionContext};
    use crate::store::MemoryStore;

    fn context(suspensions: &Suspensions) -> SessionContext {
        let locks = LockManager::new(LockManagerConfig::default());
        SessionContext {
            metrics: crate::metrics::Metrics::new(crate::metrics::Sources {
                locks: locks.clone(),
                suspensions: suspensions.clone(),
                commits: None,
            }),
            locks,
            store: Arc::new(MemoryStore::new()),
            default_timeout: Duration::from_secs(1),
            registry: Registry::new(),
            deadlock_log: Arc::new(Mutex::new(LogLimit::new(Duration::from_secs(1)))),
            suspensions: suspensions.clone(),
            deadlocks: Default::default(),
            max_session_grace: Duration::from_secs(30),
        }
    }

    fn client() -> Client {
        Client {
            peer: SocketAddr::from(([127, 0, 0, 1], 4000)),
            name: None,
            admin: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_grace_timer_that_lost_to_a_resume_never_releases_a_later_suspension() {
        let suspensions = Suspensions::new(10);
        let context = context(&suspensions);
        let session = ClientSession::open(context.clone(), client());
        let id = session.id();
        assert!(suspensions.park(session, Duration::from_millis(100), false, false));
        let first = suspensions.parked()[&id].generation;
        let session = suspensions.unpark(id).expect("parked");
        assert!(suspensions.park(session, Duration::from_secs(10), true, false));
        // The first suspension's timer, had it fired after losing the race, finds a later
        // generation and leaves the session alone.
        suspensions.expire(id, first);
        assert_eq!(suspensions.len(), 1);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(suspensions.len(), 1, "the first timer was stopped");
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(suspensions.is_empty(), "the second grace ran out");
        assert_eq!(
            context.locks.session_count(),
            0,
            "and the session was released"
        );
        let counts = suspensions.counts();
        assert_eq!(
            (
                counts.suspended,
                counts.resumed,
                counts.expired,
                counts.withdrawn_waits
            ),
            (2, 1, 1, 1)
        );
    }

    #[tokio::test]
    async fn over_the_limit_or_killed_a_dropped_session_is_released_instead() {
        let suspensions = Suspensions::new(1);
        let context = context(&suspensions);
        let first = ClientSession::open(context.clone(), client());
        assert!(suspensions.park(first, Duration::from_secs(60), false, false));
        let second = ClientSession::open(context.clone(), client());
        assert!(!suspensions.park(second, Duration::from_secs(60), false, false));
        assert_eq!(suspensions.counts().refused_over_limit, 1);
        suspensions.release_all();
        let killed = ClientSession::open(context.clone(), client());
        context.registry.kill(killed.id());
        assert!(!suspensions.park(killed, Duration::from_secs(60), false, false));
        assert!(suspensions.is_empty());
        assert_eq!(context.locks.session_count(), 0);
    }
}
