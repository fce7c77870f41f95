//! The lock table: the pure, synchronous core of the lock manager.
//!
//! It owns, for every key, the holders and the FIFO queue of waiters; for every session, the keys
//! it holds and its one in-flight request; and the waits-for graph ([`super::waits_for`]). It has
//! no clock of its own, no channels and no tokio: every call gets its `now` (a time, or a clock to
//! read if it needs the time), runs to completion and leaves the
//! table consistent. The async shell ([`super::manager`]) wraps it in a mutex and wakes the
//! callers listed by [`LockTable::take_concluded`].
//!
//! A multi-key request is a small state machine kept in the session: the keys (sorted,
//! deduplicated), how far it got, and an undo log (keys newly acquired, keys upgraded with the
//! shared token to restore). When a waiting request is granted its key as a side effect of some
//! other session's call, the table continues that request on its next keys right away, so a
//! request is only ever waiting on one key, and all progress is decided inside the table.
//!
//! Invariants, true whenever no call is running:
//! - holders of a key are pairwise compatible;
//! - the head of every queue cannot be granted (it conflicts with a holder other than itself), so
//!   no waiter is left waiting for a key nobody blocks;
//! - conversions (upgrades) are queued ahead of every new request;
//! - every waiter has exactly the waits-for edges of rule 5 in `docs/semantics.md`, and the graph
//!   is acyclic: a request that would close a cycle fails with `Deadlock` and is rolled back.

use std::collections::VecDeque;
use std::mem;
use std::time::Instant;

use super::error::{CycleMember, LockError};
use super::snapshot::{HolderSnapshot, KeySnapshot, Snapshot, WaiterSnapshot};
use super::types::{FencingToken, Grant, Key, LockMode, SessionId};
use super::waits_for::{SessionNode, WaitsForGraph};
use super::{FastMap, FastSet};

/// The time of a call, as the table needs it: only to stamp a waiter's `since`. Either given
/// (tests, deterministic) or read from a clock the first time it is needed, so calls that never
/// queue anything never read the clock.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    reading: Option<Instant>,
    clock: fn() -> Instant,
}

impl Now {
    /// A time read from `clock` on first use.
    pub fn lazy(clock: fn() -> Instant) -> Self {
        Now {
            reading: None,
            clock,
        }
    }

    fn get(&mut self) -> Instant {
        *self.reading.get_or_insert_with(self.clock)
    }
}

impl From<Instant> for Now {
    fn from(instant: Instant) -> Self {
        Now {
            reading: Some(instant),
            clock: Instant::now,
        }
    }
}

/// What a call to [`LockTable::acquire`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Acquired {
    /// Every key was granted at once.
    Granted(Grant),
    /// The request is queued; its outcome will be listed by [`LockTable::take_concluded`].
    Waiting,
}

/// The per-key state: who holds it and who waits for it.
#[derive(Default)]
struct KeyState {
    /// Sessions holding the key, in grant order. Pairwise compatible.
    holders: Vec<Holder>,
    /// Sessions waiting for the key, head first; conversions before new requests.
    queue: VecDeque<Waiter>,
    /// The waiters' edges must be recomputed from scratch when the key is next re-examined
    /// (after the rare changes that are not a holder or a waiter simply leaving: a holder
    /// downgraded or an upgrade undone, a conversion withdrawn).
    edges_stale: bool,
}

struct Holder {
    session: SessionId,
    node: SessionNode,
    mode: LockMode,
    token: FencingToken,
}

struct Waiter {
    session: SessionId,
    node: SessionNode,
    mode: LockMode,
    /// The waiter already holds the key shared and waits to hold it exclusively.
    conversion: bool,
    since: Instant,
}

struct SessionState {
    /// The session's node in the waits-for graph.
    node: SessionNode,
    /// Every key this session holds (the mode and token are in the key's holder list).
    held: FastSet<Key>,
    /// The request in flight, if any (at most one per session).
    request: Option<Request>,
}

/// A multi-key acquisition in progress, with what is needed to undo it.
struct Request {
    /// Keys to acquire, sorted and deduplicated.
    keys: Vec<Key>,
    mode: LockMode,
    /// Index in `keys` of the next key to acquire.
    next: usize,
    /// Tokens of the keys granted so far, in key order.
    tokens: Vec<(Key, FencingToken)>,
    /// Keys this request acquired that the session did not hold before: released on rollback.
    acquired: Vec<Key>,
    /// Keys this request upgraded from shared, with the shared token: restored on rollback.
    upgraded: Vec<(Key, FencingToken)>,
    phase: Phase,
}

enum Phase {
    /// Being advanced by the current call.
    Running,
    /// Queued on `key` (which is `keys[next]`).
    Waiting { key: Key },
    /// Concluded while its caller was waiting; the caller collects the outcome with
    /// [`LockTable::take_outcome`]. An `Ok` outcome keeps its undo log until then, so a caller
    /// that went away in between can still be rolled back by [`LockTable::cancel`].
    Finished(Result<Grant, LockError>),
}

/// The result of trying to take one key at once.
enum Attempt {
    /// The session already holds the key in the requested mode or a stronger one.
    AlreadyHeld(FencingToken),
    /// The key was free for this mode and is now held.
    Acquired(FencingToken),
    /// The session was the only holder of the key shared and now holds it exclusive; `old` is
    /// the shared token, restored if the request is rolled back.
    Upgraded {
        token: FencingToken,
        old: FencingToken,
    },
    /// The request must queue (as a conversion when the session holds the key shared).
    MustWait { conversion: bool },
}

/// The lock table. See the module documentation.
pub struct LockTable {
    keys: FastMap<Key, KeyState>,
    sessions: FastMap<SessionId, SessionState>,
    graph: WaitsForGraph,
    /// The last fencing token handed out.
    last_token: u64,
    /// Largest number of distinct keys one request may name.
    max_keys_per_request: usize,
    /// Sessions whose waiting request concluded (or whose session closed) since the last
    /// [`LockTable::take_concluded`].
    concluded: Vec<SessionId>,
    /// Keys whose holders or queue changed and whose queue must be re-examined.
    dirty: Vec<Key>,
    /// Sessions that were granted the key they waited for and must go on with their request.
    ready: VecDeque<SessionId>,
    /// Reused buffer for the targets of one waiter's edges.
    targets: Vec<SessionNode>,
}

impl LockTable {
    /// An empty table that accepts requests of up to `max_keys_per_request` distinct keys.
    pub fn new(max_keys_per_request: usize) -> Self {
        LockTable {
            keys: FastMap::default(),
            sessions: FastMap::default(),
            graph: WaitsForGraph::default(),
            last_token: 0,
            max_keys_per_request,
            concluded: Vec::new(),
            dirty: Vec::new(),
            ready: VecDeque::new(),
            targets: Vec::new(),
        }
    }

    /// Makes every later fencing token larger than `floor` (no effect if tokens already are).
    /// A server seeds this at start so that tokens keep increasing across restarts.
    pub fn raise_token_floor(&mut self, floor: u64) {
        self.last_token = self.last_token.max(floor);
    }

    /// Registers a new session with a random id.
    pub fn open_session(&mut self) -> SessionId {
        let id = SessionId::new_random();
        let node = self.graph.add_session(id);
        self.sessions.insert(
            id,
            SessionState {
                node,
                held: FastSet::default(),
                request: None,
            },
        );
        id
    }

    /// Is `session` open?
    pub fn is_open(&self, session: SessionId) -> bool {
        self.sessions.contains_key(&session)
    }

    /// Closes `session`: its in-flight request is withdrawn (its caller, if waiting, is listed as
    /// concluded and will find the session closed), every lock it holds is released and the
    /// waiters behind it are re-examined. Returns false if the session was not open.
    pub fn close_session(&mut self, session: SessionId, now: impl Into<Now>) -> bool {
        let Some(state) = self.sessions.get(&session) else {
            return false;
        };
        if let Some(request) = &state.request {
            if !matches!(request.phase, Phase::Finished(Err(_))) {
                self.rollback(session);
            }
            self.concluded.push(session);
        }
        self.release_everything(session);
        if let Some(state) = self.sessions.remove(&session) {
            self.graph.remove_session(state.node);
        }
        self.settle(&mut now.into());
        true
    }

    /// Starts a request for `keys` (deduplicated, taken in sorted order) in `mode`.
    ///
    /// Keys are granted one by one; on the first that cannot be granted at once the request
    /// waits there if `may_wait`, and otherwise fails with `Timeout` (a try-lock).
    ///
    /// # Errors
    /// `SessionClosed` if the session is not open; `InvalidRequest` for no keys, too many keys, or
    /// another request of this session in progress; `Deadlock` if waiting would close a cycle;
    /// `Timeout` for a try-lock that would wait. On error the session holds exactly what it held
    /// before.
    pub fn acquire(
        &mut self,
        session: SessionId,
        keys: &[Key],
        mode: LockMode,
        now: impl Into<Now>,
        may_wait: bool,
    ) -> Result<Acquired, LockError> {
        let mut now = now.into();
        let mut sorted = keys.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.is_empty() {
            return Err(LockError::invalid("a request must name at least one key"));
        }
        if sorted.len() > self.max_keys_per_request {
            return Err(LockError::invalid(format!(
                "a request may name at most {} keys, this one names {}",
                self.max_keys_per_request,
                sorted.len()
            )));
        }
        let state = self
            .sessions
            .get_mut(&session)
            .ok_or(LockError::SessionClosed)?;
        if state.request.is_some() {
            return Err(LockError::invalid(
                "another request of this session is still in progress",
            ));
        }
        state.request = Some(Request {
            keys: sorted,
            mode,
            next: 0,
            tokens: Vec::new(),
            acquired: Vec::new(),
            upgraded: Vec::new(),
            phase: Phase::Running,
        });
        let outcome = self.advance(session, &mut now, may_wait);
        if !matches!(outcome, Ok(None)) {
            self.clear_request(session);
        }
        self.settle(&mut now);
        match outcome {
            Ok(Some(grant)) => Ok(Acquired::Granted(grant)),
            Ok(None) => Ok(Acquired::Waiting),
            Err(error) => Err(error),
        }
    }

    /// Collects the outcome of `session`'s request after it was listed as concluded. Returns
    /// `None` if the request is still waiting.
    pub fn take_outcome(&mut self, session: SessionId) -> Option<Result<Grant, LockError>> {
        let Some(state) = self.sessions.get_mut(&session) else {
            return Some(Err(LockError::SessionClosed));
        };
        match state.request.as_ref().map(|r| &r.phase) {
            Some(Phase::Finished(_)) => match state.request.take().map(|r| r.phase) {
                Some(Phase::Finished(outcome)) => Some(outcome),
                _ => None,
            },
            Some(_) => None,
            None => Some(Err(LockError::SessionClosed)),
        }
    }

    /// The deadline of `session`'s request passed: if it already concluded, its outcome is
    /// returned as is; otherwise it is withdrawn and rolled back, and the result is `Timeout`
    /// naming the key it was waiting for.
    pub fn expire(&mut self, session: SessionId, now: impl Into<Now>) -> Result<Grant, LockError> {
        if let Some(outcome) = self.take_outcome(session) {
            return outcome;
        }
        let key = self.waiting_key(session);
        self.rollback(session);
        self.clear_request(session);
        self.settle(&mut now.into());
        match key {
            Some(key) => Err(LockError::Timeout { key }),
            None => Err(LockError::SessionClosed),
        }
    }

    /// The caller of `session`'s request went away (its future was dropped): the request is
    /// withdrawn and everything it acquired is released, even if it had just been granted.
    pub fn cancel(&mut self, session: SessionId, now: impl Into<Now>) {
        let Some(request) = self.sessions.get(&session).and_then(|s| s.request.as_ref()) else {
            return;
        };
        if !matches!(request.phase, Phase::Finished(Err(_))) {
            self.rollback(session);
        }
        self.clear_request(session);
        self.settle(&mut now.into());
    }

    /// Releases `keys`.
    ///
    /// # Errors
    /// `NotHeld` (listing them) if the session does not hold some of the keys, and then nothing
    /// is released; `SessionClosed`; `InvalidRequest` for an empty list or while a request of
    /// the session is in progress.
    pub fn release(
        &mut self,
        session: SessionId,
        keys: &[Key],
        now: impl Into<Now>,
    ) -> Result<(), LockError> {
        for key in self.held_by(session, keys)? {
            self.remove_holder(session, &key);
        }
        self.settle(&mut now.into());
        Ok(())
    }

    /// Turns the session's exclusive locks on `keys` into shared ones, keeping their fencing
    /// tokens (no new grant happens); keys already held shared stay as they are. Waiters that
    /// become compatible are granted at once.
    ///
    /// # Errors
    /// As [`LockTable::release`]: `NotHeld` (and nothing changes) if a key is not held,
    /// `SessionClosed`, `InvalidRequest`.
    pub fn downgrade(
        &mut self,
        session: SessionId,
        keys: &[Key],
        now: impl Into<Now>,
    ) -> Result<(), LockError> {
        for key in self.held_by(session, keys)? {
            if let Some(holder) = self
                .keys
                .get_mut(&key)
                .and_then(|e| e.holders.iter_mut().find(|h| h.session == session))
            {
                if holder.mode == LockMode::Exclusive {
                    holder.mode = LockMode::Shared;
                    self.mark_edges_stale(&key);
                    self.dirty.push(key);
                }
            }
        }
        self.settle(&mut now.into());
        Ok(())
    }

    /// Checks that `session` may change its locks on `keys` now and holds every one of them;
    /// returns them sorted and deduplicated.
    fn held_by(&self, session: SessionId, keys: &[Key]) -> Result<Vec<Key>, LockError> {
        let state = self
            .sessions
            .get(&session)
            .ok_or(LockError::SessionClosed)?;
        if keys.is_empty() {
            return Err(LockError::invalid(
                "a release or downgrade must name at least one key",
            ));
        }
        if state.request.is_some() {
            return Err(LockError::invalid(
                "cannot release or downgrade while a request of this session is in progress",
            ));
        }
        let mut sorted = keys.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let not_held: Vec<Key> = sorted
            .iter()
            .filter(|k| !state.held.contains(*k))
            .cloned()
            .collect();
        if !not_held.is_empty() {
            return Err(LockError::NotHeld { keys: not_held });
        }
        Ok(sorted)
    }

    /// Releases every lock of `session`. A request still in progress is withdrawn first (its
    /// caller gets `Cancelled`).
    ///
    /// # Errors
    /// `SessionClosed` if the session is not open.
    pub fn release_all(
        &mut self,
        session: SessionId,
        now: impl Into<Now>,
    ) -> Result<(), LockError> {
        let state = self
            .sessions
            .get(&session)
            .ok_or(LockError::SessionClosed)?;
        if let Some(request) = &state.request {
            if !matches!(request.phase, Phase::Finished(Err(_))) {
                self.rollback(session);
                if let Some(request) = self.request_mut(session) {
                    request.phase = Phase::Finished(Err(LockError::Cancelled));
                }
                self.concluded.push(session);
            }
        }
        self.release_everything(session);
        self.settle(&mut now.into());
        Ok(())
    }

    /// The mode and token under which `session` holds `key`, if it does.
    pub fn held_mode(&self, session: SessionId, key: &Key) -> Option<(LockMode, FencingToken)> {
        self.keys
            .get(key)?
            .holders
            .iter()
            .find(|h| h.session == session)
            .map(|h| (h.mode, h.token))
    }

    /// Every key `session` holds, sorted.
    pub fn held_keys(&self, session: SessionId) -> Vec<Key> {
        let mut keys: Vec<Key> = self
            .sessions
            .get(&session)
            .map(|s| s.held.iter().cloned().collect())
            .unwrap_or_default();
        keys.sort_unstable();
        keys
    }

    /// Sessions whose waiting request concluded since the last call; their callers must be woken
    /// to collect the outcome with [`LockTable::take_outcome`].
    pub fn take_concluded(&mut self) -> Vec<SessionId> {
        mem::take(&mut self.concluded)
    }

    /// The number of open sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// A consistent picture of every held or awaited key and of the waits-for edges.
    pub fn snapshot(&self) -> Snapshot {
        let mut keys: Vec<KeySnapshot> = self
            .keys
            .iter()
            .map(|(key, state)| KeySnapshot {
                key: key.clone(),
                holders: state
                    .holders
                    .iter()
                    .map(|h| HolderSnapshot {
                        session: h.session,
                        mode: h.mode,
                        token: h.token,
                    })
                    .collect(),
                queue: state
                    .queue
                    .iter()
                    .map(|w| WaiterSnapshot {
                        session: w.session,
                        mode: w.mode,
                        upgrade: w.conversion,
                        since: w.since,
                    })
                    .collect(),
            })
            .collect();
        keys.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        let mut waits_for = self.graph.edges();
        waits_for.sort_unstable();
        Snapshot { keys, waits_for }
    }

    // ----- request progress -------------------------------------------------------------------

    /// Takes the request's keys from `next` on, one by one. `Ok(Some)` when all are granted,
    /// `Ok(None)` when it waits, `Err` after rolling the request back.
    fn advance(
        &mut self,
        session: SessionId,
        now: &mut Now,
        may_wait: bool,
    ) -> Result<Option<Grant>, LockError> {
        loop {
            let Some(state) = self.sessions.get_mut(&session) else {
                return Err(LockError::SessionClosed);
            };
            let node = state.node;
            let Some(request) = state.request.as_mut() else {
                return Err(LockError::SessionClosed);
            };
            let Some(key) = request.keys.get(request.next).cloned() else {
                return Ok(Some(Grant {
                    tokens: mem::take(&mut request.tokens),
                }));
            };
            let mode = request.mode;
            let entry = self.keys.entry(key.clone()).or_default();
            let (token, refresh) =
                match take_at_once(entry, session, node, mode, &mut self.last_token) {
                    Attempt::AlreadyHeld(token) => (token, false),
                    Attempt::Acquired(token) => {
                        state.held.insert(key.clone());
                        request.acquired.push(key.clone());
                        (token, false)
                    }
                    Attempt::Upgraded { token, old } => {
                        request.upgraded.push((key.clone(), old));
                        // Shared waiters now conflict with this holder.
                        (token, !entry.queue.is_empty())
                    }
                    Attempt::MustWait { conversion } => {
                        let failure = if may_wait {
                            self.wait(session, key, mode, conversion, now).err()
                        } else {
                            Some(LockError::Timeout { key })
                        };
                        return match failure {
                            None => Ok(None),
                            Some(error) => {
                                self.rollback(session);
                                Err(error)
                            }
                        };
                    }
                };
            request.tokens.push((key.clone(), token));
            request.next += 1;
            if refresh {
                self.refresh_edges(&key);
            }
        }
    }

    /// Queues `session` on `key`, gives it its waits-for edges and checks for a cycle through it.
    /// On a cycle the waiter is taken out again and the error names the cycle.
    fn wait(
        &mut self,
        session: SessionId,
        key: Key,
        mode: LockMode,
        conversion: bool,
        now: &mut Now,
    ) -> Result<(), LockError> {
        let Some(node) = self.sessions.get(&session).map(|s| s.node) else {
            return Err(LockError::SessionClosed);
        };
        let waiter = Waiter {
            session,
            node,
            mode,
            conversion,
            since: now.get(),
        };
        let entry = self.keys.entry(key.clone()).or_default();
        if conversion {
            let position = entry
                .queue
                .iter()
                .position(|w| !w.conversion)
                .unwrap_or(entry.queue.len());
            entry.queue.insert(position, waiter);
            // Waiters behind the conversion now wait for it too.
            self.refresh_edges(&key);
        } else {
            entry.queue.push_back(waiter);
            let position = entry.queue.len() - 1;
            self.set_edges_of(&key, position);
        }
        if let Some(request) = self.request_mut(session) {
            request.phase = Phase::Waiting { key: key.clone() };
        }
        let Some(cycle) = self.graph.cycle_through(node) else {
            return Ok(());
        };
        let cycle = cycle
            .into_iter()
            .filter_map(|n| {
                let member = self.graph.session(n)?;
                let waiting_for_key = self.waiting_key(member)?;
                Some(CycleMember {
                    session: member,
                    waiting_for_key,
                })
            })
            .collect();
        // The requester is the victim: out of the queue and the graph. Its rollback (by the
        // caller) re-examines the key.
        self.remove_waiter(session, node, &key);
        if let Some(request) = self.request_mut(session) {
            request.phase = Phase::Running;
        }
        self.dirty.push(key);
        Err(LockError::Deadlock { cycle })
    }

    /// Undoes everything `session`'s request did: leaves its queue, releases keys it acquired,
    /// restores upgraded keys to shared with their old token. The request stays (with an empty
    /// undo log) so the caller can record an outcome or drop it.
    fn rollback(&mut self, session: SessionId) {
        let Some(state) = self.sessions.get_mut(&session) else {
            return;
        };
        let node = state.node;
        let Some(request) = state.request.as_mut() else {
            return;
        };
        let acquired = mem::take(&mut request.acquired);
        let upgraded = mem::take(&mut request.upgraded);
        let phase = mem::replace(&mut request.phase, Phase::Running);
        request.tokens.clear();
        request.next = 0;
        if let Phase::Waiting { key } = phase {
            self.remove_waiter(session, node, &key);
            self.dirty.push(key);
        }
        for key in acquired {
            self.remove_holder(session, &key);
        }
        for (key, token) in upgraded {
            if let Some(holder) = self
                .keys
                .get_mut(&key)
                .and_then(|e| e.holders.iter_mut().find(|h| h.session == session))
            {
                holder.mode = LockMode::Shared;
                holder.token = token;
            }
            self.mark_edges_stale(&key);
            self.dirty.push(key);
        }
    }

    // ----- re-examining queues ----------------------------------------------------------------

    /// Re-examines dirty keys (granting what can be granted) and continues the requests that
    /// were granted their key, until nothing changes. Keys are re-examined before any request
    /// continues, so every cycle check sees exact edges.
    fn settle(&mut self, now: &mut Now) {
        loop {
            while let Some(key) = self.dirty.pop() {
                self.grant_waiters(&key);
            }
            let Some(session) = self.ready.pop_front() else {
                return;
            };
            let outcome = self.advance(session, now, true);
            match outcome {
                Ok(None) => {}
                Ok(Some(grant)) => self.finish(session, Ok(grant)),
                Err(error) => self.finish(session, Err(error)),
            }
        }
    }

    /// Records the outcome of a request that concluded while its caller waited.
    fn finish(&mut self, session: SessionId, outcome: Result<Grant, LockError>) {
        if let Some(request) = self.request_mut(session) {
            request.phase = Phase::Finished(outcome);
            self.concluded.push(session);
        }
    }

    /// Grants the head of `key`'s queue while it is compatible with the holders (FIFO: stops at
    /// the first that is not), then recomputes the edges of the waiters left. Granted sessions
    /// are queued to continue their request. Drops the key's entry once nobody holds or awaits it.
    fn grant_waiters(&mut self, key: &Key) {
        let Some(entry) = self.keys.get_mut(key) else {
            return;
        };
        while let Some(head) = entry.queue.front() {
            let grantable = entry
                .holders
                .iter()
                .all(|h| h.session == head.session || head.mode.is_compatible_with(h.mode));
            if !grantable {
                break;
            }
            let Some(waiter) = entry.queue.pop_front() else {
                break;
            };
            self.last_token += 1;
            let token = FencingToken(self.last_token);
            let Some(state) = self.sessions.get_mut(&waiter.session) else {
                continue;
            };
            let Some(request) = state.request.as_mut() else {
                continue;
            };
            if waiter.conversion {
                if let Some(holder) = entry
                    .holders
                    .iter_mut()
                    .find(|h| h.session == waiter.session)
                {
                    let old = mem::replace(&mut holder.token, token);
                    holder.mode = waiter.mode;
                    request.upgraded.push((key.clone(), old));
                }
            } else {
                entry.holders.push(Holder {
                    session: waiter.session,
                    node: waiter.node,
                    mode: waiter.mode,
                    token,
                });
                state.held.insert(key.clone());
                request.acquired.push(key.clone());
            }
            request.tokens.push((key.clone(), token));
            request.next += 1;
            request.phase = Phase::Running;
            self.graph.clear_waits(waiter.node);
            self.ready.push_back(waiter.session);
        }
        // A granted waiter keeps the edges the waiters behind it had to it: it now holds the
        // mode it was queued for, which conflicts with them exactly as before.
        if entry.holders.is_empty() && entry.queue.is_empty() {
            self.keys.remove(key);
        } else if mem::take(&mut entry.edges_stale) {
            self.refresh_edges(key);
        }
    }

    /// Recomputes the edges of every waiter of `key`.
    fn refresh_edges(&mut self, key: &Key) {
        let len = self.keys.get(key).map_or(0, |e| e.queue.len());
        for position in 0..len {
            self.set_edges_of(key, position);
        }
    }

    /// Sets the edges of the waiter at `position` in `key`'s queue (rule 5): to every other holder
    /// whose mode conflicts with the requested one, and to every other waiter ahead of it whose
    /// requested mode conflicts with it.
    fn set_edges_of(&mut self, key: &Key, position: usize) {
        let Some(entry) = self.keys.get(key) else {
            return;
        };
        let Some(waiter) = entry.queue.get(position) else {
            return;
        };
        self.targets.clear();
        let conflicts = |session: SessionId, mode: LockMode| {
            session != waiter.session && !waiter.mode.is_compatible_with(mode)
        };
        self.targets.extend(
            entry
                .holders
                .iter()
                .filter(|h| conflicts(h.session, h.mode))
                .map(|h| h.node),
        );
        self.targets.extend(
            entry
                .queue
                .range(..position)
                .filter(|w| conflicts(w.session, w.mode))
                .map(|w| w.node),
        );
        self.graph.set_waits_for(waiter.node, &self.targets);
    }

    // ----- small helpers ----------------------------------------------------------------------

    /// Removes `session` from `key`'s holders and marks the key for re-examination.
    fn remove_holder(&mut self, session: SessionId, key: &Key) {
        let node = self.keys.get_mut(key).and_then(|entry| {
            let index = entry.holders.iter().position(|h| h.session == session)?;
            Some(entry.holders.remove(index).node)
        });
        if let Some(node) = node {
            self.drop_edges_into(node, key);
        }
        if let Some(state) = self.sessions.get_mut(&session) {
            state.held.remove(key);
        }
        self.dirty.push(key.clone());
    }

    /// Takes `session` out of `key`'s queue and the graph. The waiters behind a plain waiter lose
    /// their edges to it; behind a conversion (whose session still holds the key shared) their
    /// edges are recomputed when the key is re-examined.
    fn remove_waiter(&mut self, session: SessionId, node: SessionNode, key: &Key) {
        let mut conversion = false;
        if let Some(entry) = self.keys.get_mut(key) {
            if let Some(index) = entry.queue.iter().position(|w| w.session == session) {
                conversion = entry.queue.remove(index).is_some_and(|w| w.conversion);
            }
        }
        self.graph.clear_waits(node);
        if conversion {
            self.mark_edges_stale(key);
        } else {
            self.drop_edges_into(node, key);
        }
    }

    /// Removes the edges that waiters of `key` have to `target`: `target` no longer holds the
    /// key nor waits for it. (A waiter's edges all come from the one key it waits on, so edges
    /// of waiters on other keys stay.)
    fn drop_edges_into(&mut self, target: SessionNode, key: &Key) {
        let sessions = &self.sessions;
        self.graph.remove_edges_into(target, |source| {
            sessions
                .get(&source)
                .and_then(|s| s.request.as_ref())
                .is_some_and(|r| matches!(&r.phase, Phase::Waiting { key: k } if k == key))
        });
    }

    fn mark_edges_stale(&mut self, key: &Key) {
        if let Some(entry) = self.keys.get_mut(key) {
            entry.edges_stale = true;
        }
    }

    /// Releases every key `session` holds, in key order.
    fn release_everything(&mut self, session: SessionId) {
        for key in self.held_keys(session) {
            self.remove_holder(session, &key);
        }
    }

    fn request_mut(&mut self, session: SessionId) -> Option<&mut Request> {
        self.sessions.get_mut(&session)?.request.as_mut()
    }

    fn clear_request(&mut self, session: SessionId) {
        if let Some(state) = self.sessions.get_mut(&session) {
            state.request = None;
        }
    }

    /// The key `session` is queued on, if it is waiting.
    fn waiting_key(&self, session: SessionId) -> Option<Key> {
        match &self.sessions.get(&session)?.request.as_ref()?.phase {
            Phase::Waiting { key } => Some(key.clone()),
            _ => None,
        }
    }
}

/// Grants the key whose state is `entry` to `session` at once if the rules allow it: a mode it
/// already holds, an upgrade when it is the only holder, or a new lock when the mode is compatible
/// with every holder and nobody is queued (no barging).
fn take_at_once(
    entry: &mut KeyState,
    session: SessionId,
    node: SessionNode,
    mode: LockMode,
    last_token: &mut u64,
) -> Attempt {
    let only_holder = entry.holders.len() == 1;
    if let Some(held) = entry.holders.iter_mut().find(|h| h.session == session) {
        if held.mode >= mode {
            return Attempt::AlreadyHeld(held.token);
        }
        // An upgrade: at once if nobody else holds the key, else first in the queue.
        if !only_holder {
            return Attempt::MustWait { conversion: true };
        }
        *last_token += 1;
        let token = FencingToken(*last_token);
        let old = mem::replace(&mut held.token, token);
        held.mode = mode;
        return Attempt::Upgraded { token, old };
    }
    let free = entry.queue.is_empty()
        && entry
            .holders
            .iter()
            .all(|h| mode.is_compatible_with(h.mode));
    if !free {
        return Attempt::MustWait { conversion: false };
    }
    *last_token += 1;
    let token = FencingToken(*last_token);
    entry.holders.push(Holder {
        session,
        node,
        mode,
        token,
    });
    Attempt::Acquired(token)
}
