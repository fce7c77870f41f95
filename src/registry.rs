//! The directory of open sessions: for each session id, what the server knows about its client
//! that the lock manager does not — its name, its peer address, when it connected, whether it
//! presented the admin token — and the handle `kill` uses to end its connection.
//!
//! A connection registers its session when it opens and the [`Registration`] guard removes it
//! when the connection ends, however it ends. The map sits behind a std `Mutex`: every critical
//! section is a map operation or a copy of it (never an `.await`), and it is never held while the
//! lock manager's mutex is taken, or the other way round.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::lock::SessionId;

/// The directory. Cloning it is cheap; all clones share one map.
#[derive(Clone, Default)]
pub struct Registry {
    /// Every open session's entry.
    entries: Arc<Mutex<HashMap<SessionId, Entry>>>,
}

/// What the registry knows of one session.
struct Entry {
    /// The name the client gave (`?name=` or `hello`), if any: for `sessions`, `locks` and
    /// deadlock answers, so people can tell sessions apart.
    name: Option<String>,
    /// The client's address, for `sessions`.
    peer: SocketAddr,
    /// When the connection opened, for `sessions`' `connected_ms`.
    connected_at: Instant,
    /// The connection presented the admin token: it may `kill`.
    admin: bool,
    /// Cancelled by `kill`: the connection watches it, answers `killed` and closes.
    kill: CancellationToken,
    /// Cancelled when the entry goes, after the session's locks are released: what `kill`
    /// waits for before it answers.
    gone: CancellationToken,
}

/// One open session as [`Registry::list`] shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// The session id.
    pub session: SessionId,
    /// Its name, if set.
    pub name: Option<String>,
    /// The client's address.
    pub peer: SocketAddr,
    /// When it connected.
    pub connected_at: Instant,
}

/// A session's place in the registry; dropping it removes the entry.
pub struct Registration {
    /// Where the entry is.
    registry: Registry,
    /// Whose entry it is.
    session: SessionId,
    /// The entry's kill handle, which the connection watches.
    kill: CancellationToken,
    /// Cancelled when this registration is dropped.
    gone: CancellationToken,
}

impl Registration {
    /// Cancelled when an administrator kills this session.
    pub fn killed(&self) -> &CancellationToken {
        &self.kill
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.entries().remove(&self.session);
        self.gone.cancel();
    }
}

impl Registry {
    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers session `session` of a client at `peer`, connected now.
    pub fn register(
        &self,
        session: SessionId,
        peer: SocketAddr,
        name: Option<String>,
        admin: bool,
    ) -> Registration {
        let kill = CancellationToken::new();
        let gone = CancellationToken::new();
        self.entries().insert(
            session,
            Entry {
                name,
                peer,
                connected_at: Instant::now(),
                admin,
                kill: kill.clone(),
                gone: gone.clone(),
            },
        );
        Registration {
            registry: self.clone(),
            session,
            kill,
            gone,
        }
    }

    /// Gives `session` a name (replacing the one it had).
    pub fn set_name(&self, session: SessionId, name: String) {
        if let Some(entry) = self.entries().get_mut(&session) {
            entry.name = Some(name);
        }
    }

    /// The name of `session`, if it has one.
    pub fn name(&self, session: SessionId) -> Option<String> {
        self.entries().get(&session)?.name.clone()
    }

    /// The names of every session that has one.
    pub fn names(&self) -> HashMap<SessionId, String> {
        self.entries()
            .iter()
            .filter_map(|(id, entry)| Some((*id, entry.name.clone()?)))
            .collect()
    }

    /// Did `session`'s connection present the admin token?
    pub fn is_admin(&self, session: SessionId) -> bool {
        self.entries().get(&session).is_some_and(|e| e.admin)
    }

    /// Every open session, sorted by id.
    pub fn list(&self) -> Vec<Listed> {
        let mut listed: Vec<Listed> = self
            .entries()
            .iter()
            .map(|(id, entry)| Listed {
                session: *id,
                name: entry.name.clone(),
                peer: entry.peer,
                connected_at: entry.connected_at,
            })
            .collect();
        listed.sort_unstable_by_key(|l| l.session);
        listed
    }

    /// Tells `session`'s connection that it is killed; it then releases the session (see
    /// `connection`). Returns what is cancelled once the session is gone (its locks released),
    /// or `None` if no such session is open.
    pub fn kill(&self, session: SessionId) -> Option<CancellationToken> {
        let entry = self.entries();
        let entry = entry.get(&session)?;
        entry.kill.cancel();
        Some(entry.gone.clone())
    }

    /// Has `session` been killed (and is it still closing)? For diagnostics and tests.
    pub fn is_killed(&self, session: SessionId) -> bool {
        self.entries()
            .get(&session)
            .is_some_and(|entry| entry.kill.is_cancelled())
    }

    /// Locks the map. A panic while it was held cannot leave an entry half-written, so a
    /// poisoned lock is used as is.
    fn entries(&self) -> MutexGuard<'_, HashMap<SessionId, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 4000))
    }

    #[tokio::test]
    async fn an_entry_lives_as_long_as_its_registration() {
        let registry = Registry::new();
        let (a, b) = (SessionId::from_u128(2), SessionId::from_u128(1));
        let first = registry.register(a, peer(), Some("backup".into()), false);
        let second = registry.register(b, peer(), None, true);
        let ids: Vec<SessionId> = registry.list().iter().map(|l| l.session).collect();
        assert_eq!(ids, vec![b, a], "sorted by id");
        assert_eq!(registry.names(), HashMap::from([(a, "backup".to_owned())]));
        assert!(registry.is_admin(b) && !registry.is_admin(a));
        drop(first);
        assert_eq!(registry.list().len(), 1);
        assert_eq!(registry.name(a), None);
        drop(second);
        assert!(registry.list().is_empty());
    }

    #[tokio::test]
    async fn kill_cancels_the_sessions_handle_and_gone_follows_its_registration() {
        let registry = Registry::new();
        let a = SessionId::from_u128(1);
        let registration = registry.register(a, peer(), None, false);
        assert!(!registration.killed().is_cancelled());
        assert!(registry.kill(SessionId::from_u128(9)).is_none());
        let gone = registry.kill(a).expect("a is open");
        assert!(registration.killed().is_cancelled() && registry.is_killed(a));
        assert!(!gone.is_cancelled(), "gone only when the registration goes");
        drop(registration);
        assert!(gone.is_cancelled());
    }

    #[tokio::test]
    async fn hello_replaces_the_name() {
        let registry = Registry::new();
        let a = SessionId::from_u128(1);
        let _registration = registry.register(a, peer(), Some("one".into()), false);
        registry.set_name(a, "two".into());
        assert_eq!(registry.name(a), Some("two".into()));
    }
}
