//! The directory of open sessions: for each session id, what the server knows about its client
//! that the lock manager does not — its name, its peer address, when it connected, whether it
//! presented the admin token, whether it may be resumed (its grace and resume secret) and whether
//! it is suspended — and the handles `kill` and `resume` use to end its connection.
//!
//! A connection registers its session when it opens and the [`Registration`] guard removes it
//! when the connection ends, however it ends. The map sits behind a std `Mutex`: every critical
//! section is a map operation or a copy of it (never an `.await`), and it is never held while the
//! lock manager's mutex is taken, or the other way round.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::auth::Secret;
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
    /// Set when the client asked for a grace period: the session outlives a dropped connection
    /// by that long, and a new connection presenting the secret may resume it.
    resumable: Option<Resumable>,
    /// When its connection dropped, while it is suspended (`None` while connected).
    suspended_at: Option<Instant>,
    /// Cancelled by a `resume` from another connection: the current connection hands the
    /// session over and closes. A new token for each connection the session is attached to.
    detach: CancellationToken,
}

/// What makes a session resumable.
#[derive(Clone, Debug)]
pub struct Resumable {
    /// How long the session outlives a dropped connection.
    pub grace: Duration,
    /// What a `resume` must present: 128 random bits, hex. Drawn once per session.
    pub secret: Secret,
}

/// Why a `resume` cannot have the session it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimRefused {
    /// No such session is open.
    NotOpen,
    /// The session never asked for a grace period.
    NotResumable,
    /// The secret presented is not the session's.
    WrongSecret,
}

/// A `resume`'s rightful claim on a session, as [`Registry::claim`] grants it.
pub struct Claim {
    /// Cancels the session's current connection, if it has one (takeover).
    pub detach: Option<CancellationToken>,
    /// Cancelled when the session ends (released, killed, expired).
    pub gone: CancellationToken,
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
    /// When it was suspended, if it is.
    pub suspended_at: Option<Instant>,
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
    /// The current connection's detach handle (see [`Entry::detach`]).
    detach: CancellationToken,
}

impl Registration {
    /// Cancelled when an administrator kills this session.
    pub fn killed(&self) -> &CancellationToken {
        &self.kill
    }

    /// Cancelled when a `resume` on another connection takes this session over.
    pub fn detached(&self) -> &CancellationToken {
        &self.detach
    }

    /// Marks the session suspended, from now: its connection dropped.
    pub fn suspend(&self) {
        if let Some(entry) = self.registry.entries().get_mut(&self.session) {
            entry.suspended_at = Some(Instant::now());
        }
    }

    /// Attaches the session to a new connection (after `resume`): connected again, from `peer`,
    /// with the new connection's admin flag, and a fresh detach handle.
    pub fn attach(&mut self, peer: SocketAddr, admin: bool) {
        self.detach = CancellationToken::new();
        if let Some(entry) = self.registry.entries().get_mut(&self.session) {
            entry.peer = peer;
            entry.admin = admin;
            entry.suspended_at = None;
            entry.detach = self.detach.clone();
        }
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
        let detach = CancellationToken::new();
        self.entries().insert(
            session,
            Entry {
                name,
                peer,
                connected_at: Instant::now(),
                admin,
                kill: kill.clone(),
                gone: gone.clone(),
                resumable: None,
                suspended_at: None,
                detach: detach.clone(),
            },
        );
        Registration {
            registry: self.clone(),
            session,
            kill,
            gone,
            detach,
        }
    }

    /// Sets `session`'s grace period: zero makes it non-resumable. Its secret is drawn the first
    /// time and kept. Returns what the session is now, or `None` if it is not resumable.
    pub fn set_grace(&self, session: SessionId, grace: Duration) -> Option<Resumable> {
        let mut entries = self.entries();
        let entry = entries.get_mut(&session)?;
        if grace.is_zero() {
            entry.resumable = None;
            return None;
        }
        let secret = match &entry.resumable {
            Some(resumable) => resumable.secret.clone(),
            None => new_secret(),
        };
        let resumable = Resumable { grace, secret };
        entry.resumable = Some(resumable.clone());
        Some(resumable)
    }

    /// `session`'s grace and secret, if it is resumable.
    pub fn resumable(&self, session: SessionId) -> Option<Resumable> {
        self.entries().get(&session)?.resumable.clone()
    }

    /// Checks a `resume` of `session` with `secret` (in constant time). A refused claim changes
    /// nothing.
    ///
    /// # Errors
    /// Why the claim is refused.
    pub fn claim(&self, session: SessionId, secret: &Secret) -> Result<Claim, ClaimRefused> {
        let entries = self.entries();
        let entry = entries.get(&session).ok_or(ClaimRefused::NotOpen)?;
        // Killed: on its way out, however long its release takes.
        if entry.kill.is_cancelled() {
            return Err(ClaimRefused::NotOpen);
        }
        let resumable = entry.resumable.as_ref().ok_or(ClaimRefused::NotResumable)?;
        if !resumable.secret.matches(secret.reveal()) {
            return Err(ClaimRefused::WrongSecret);
        }
        Ok(Claim {
            detach: entry.suspended_at.is_none().then(|| entry.detach.clone()),
            gone: entry.gone.clone(),
        })
    }

    /// When each suspended session was suspended.
    pub fn suspended(&self) -> HashMap<SessionId, Instant> {
        self.entries()
            .iter()
            .filter_map(|(id, entry)| Some((*id, entry.suspended_at?)))
            .collect()
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
                suspended_at: entry.suspended_at,
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

/// A resume secret: 128 bits from the thread's cryptographically secure generator, as 32 hex
/// digits.
fn new_secret() -> Secret {
    Secret::client_token(format!("{:032x}", rand::random::<u128>()))
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

    #[tokio::test]
    async fn a_resume_secret_is_drawn_once_and_a_claim_is_refused_for_the_right_reason() {
        let registry = Registry::new();
        let a = SessionId::from_u128(1);
        let mut registration = registry.register(a, peer(), None, false);
        let secret = |s: &str| Secret::client_token(s.to_owned());
        assert_eq!(
            registry.claim(a, &secret("x")).err(),
            Some(ClaimRefused::NotResumable)
        );
        assert_eq!(
            registry.claim(SessionId::from_u128(9), &secret("x")).err(),
            Some(ClaimRefused::NotOpen)
        );
        let first = registry
            .set_grace(a, Duration::from_secs(5))
            .expect("resumable");
        assert_eq!(first.secret.reveal().len(), 32);
        let second = registry
            .set_grace(a, Duration::from_secs(1))
            .expect("resumable");
        assert_eq!(second.secret, first.secret, "drawn once");
        assert_eq!(second.grace, Duration::from_secs(1));
        assert_eq!(
            registry.claim(a, &secret("0")).err(),
            Some(ClaimRefused::WrongSecret)
        );
        // Connected: the claim carries the connection's detach handle (takeover).
        let claim = registry.claim(a, &first.secret).expect("the right secret");
        let detach = claim.detach.expect("connected");
        detach.cancel();
        assert!(registration.detached().is_cancelled());
        // Suspended: nothing to detach. Attached again: a fresh handle.
        registration.suspend();
        assert!(registry.suspended().contains_key(&a));
        let claim = registry.claim(a, &first.secret).expect("the right secret");
        assert!(claim.detach.is_none());
        registration.attach(peer(), false);
        assert!(!registration.detached().is_cancelled());
        assert!(registry.suspended().is_empty());
        assert!(registry.set_grace(a, Duration::ZERO).is_none());
        assert_eq!(
            registry.claim(a, &first.secret).err(),
            Some(ClaimRefused::NotResumable)
        );
    }

    #[tokio::test]
    async fn a_killed_session_cannot_be_claimed_even_while_its_release_is_under_way() {
        let registry = Registry::new();
        let a = SessionId::from_u128(1);
        let _registration = registry.register(a, peer(), None, false);
        let resumable = registry
            .set_grace(a, Duration::from_secs(5))
            .expect("resumable");
        registry.kill(a).expect("open");
        assert_eq!(
            registry.claim(a, &resumable.secret).err(),
            Some(ClaimRefused::NotOpen)
        );
    }
}
