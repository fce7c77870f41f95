//! The lock table: the public entry point of the core.
//!
//! It owns the keys ([`crate::key_state`]: holders and queues), the sessions with their one
//! request in flight ([`crate::request`]: state machine and undo log), and the deadlock search
//! ([`crate::waits_for`]). Every call runs to completion, leaves the table consistent and returns
//! its [`Effects`]; nothing happens between calls.
//!
//! **Progress inside the table.** When a call frees a key, the key's queue is re-examined and the
//! waiters at its head that can now have it are granted. A granted request goes on with its next
//! keys right away, inside the same call, so a request only ever waits on one key and all progress
//! is decided here. The order is a rule (rule 4b of `docs/semantics.md`): keys are re-examined in
//! the order the call changed them, and granted requests continue one at a time in the order they
//! were granted, every key changed meanwhile being re-examined before the next one continues.
//!
//! **Cost.** Granting the head of a queue, leaving a queue from anywhere and a deadlock check
//! never scan a queue: a handoff costs O(1) plus O(g) for g shared waiters granted together,
//! whatever the queue length. A request that holds nothing and joins the tail of a queue cannot
//! close a cycle (nobody waits for it), so it is not searched at all.
//!
//! Invariants, true whenever no call is running: those of [`crate::key_state`] for every key; a
//! session is in at most one queue, the one its request's phase names; there is no cycle of
//! waiting sessions.

use std::collections::VecDeque;
use std::mem;
use std::time::{Duration, Instant};

use slab::Slab;

use crate::error::{CycleMember, LockError};
use crate::key_state::{Attempt, Holder, KeyState, Waiter};
use crate::now::Now;
use crate::request::{Phase, Request};
use crate::snapshot::{HolderSnapshot, KeySnapshot, Snapshot, WaiterSnapshot};
use crate::types::{FencingToken, Grant, Key, LockMode, SessionId, Taken};
use crate::waits_for::{CycleSearch, WaitGraph};
use crate::{FastMap, FastSet, KeySlot, SessionSlot, WaiterSlot};

/// Largest number of held keys `may_be_waited_for` looks at before it searches anyway.
const PRECHECK_KEYS: usize = 16;

/// What a call to [`LockTable::acquire`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Acquired {
    /// Every key was granted at once.
    Granted(Grant),
    /// The request is queued. When it concludes (granted, or failed), its session is listed in
    /// the [`Effects`] of the call that concluded it, and its outcome is collected with
    /// [`LockTable::take_outcome`].
    Waiting,
}

/// What a call did besides answering its own caller: the waiting requests it concluded. The
/// caller of each must be woken to collect its outcome with [`LockTable::take_outcome`].
#[derive(Debug, Default, PartialEq, Eq)]
#[must_use = "the callers of the concluded requests must be woken"]
pub struct Effects {
    /// Sessions whose waiting request concluded (granted, failed, or withdrawn because the
    /// session was closed), in the order they concluded.
    pub concluded: Vec<SessionId>,
}

/// A session and its request.
struct SessionState {
    /// The caller's id for it.
    id: SessionId,
    /// Every key the session holds (its mode and token are in the key's holders). A set, so a
    /// session holding many keys gives each back in O(1).
    held: FastSet<KeySlot>,
    /// The request in flight, if any: at most one per session.
    request: Option<Request>,
}

/// What [`LockTable::busiest_keys`] shows: the busiest keys, and how many others there are.
#[derive(Clone, Debug, Default)]
pub struct BusiestKeys {
    /// The keys listed, busiest first, with their holders and queues.
    pub keys: Vec<KeySnapshot>,
    /// Keys held or awaited that are not listed.
    pub more: usize,
}

/// How much the table holds: what a burst must give back when it is over. Every count is zero
/// for a table with no open session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Footprint {
    /// Keys held or waited for, and their index entries.
    pub keys: usize,
    /// Entries of the key index (always `keys`).
    pub key_index: usize,
    /// Open sessions, and their index entries.
    pub sessions: usize,
    /// Entries of the session index (always `sessions`).
    pub session_index: usize,
    /// Queue entries over all keys.
    pub waiters: usize,
    /// Keys still to re-examine, sessions still to continue, requests concluded but not yet
    /// reported: work a call left behind (none, between calls).
    pub pending: usize,
}

/// What the table holds at one moment, counted for monitoring ([`LockTable::gauges`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Open sessions.
    pub sessions: usize,
    /// Shared (read) locks held, over all keys.
    pub held_shared: usize,
    /// Exclusive (write) locks held, over all keys.
    pub held_exclusive: usize,
    /// Requests waiting for a key (each waits in exactly one queue).
    pub waiting: usize,
    /// Keys with at least one waiter.
    pub keys_with_waiters: usize,
    /// How long the request that has waited longest has waited so far (zero when none waits).
    pub longest_wait: Duration,
}

/// The lock table. See the module documentation.
pub struct LockTable {
    /// Where each held or awaited key is in `keys`.
    key_index: FastMap<Key, KeySlot>,
    /// Every held or awaited key.
    keys: Slab<KeyState>,
    /// Where each open session is in `sessions`.
    session_index: FastMap<SessionId, SessionSlot>,
    /// Every open session.
    sessions: Slab<SessionState>,
    /// The queue entries of every key (each key links its own).
    waiters: Slab<Waiter>,
    /// The deadlock search and its scratch space.
    search: CycleSearch,
    /// The last fencing token handed out.
    last_token: u64,
    /// Largest number of distinct keys one request may name.
    max_keys_per_request: usize,
    /// Largest number of keys one session may hold (`usize::MAX` unless set).
    max_keys_per_session: usize,
    /// The effects of the current call.
    effects: Effects,
    /// Keys whose holders or queue changed and that must be re-examined, in the order they
    /// changed.
    dirty: VecDeque<KeySlot>,
    /// Sessions granted the key they waited for, to continue their request, in grant order.
    ready: VecDeque<SessionSlot>,
    /// Reused list of the keys a release or downgrade changes (see `held_by`).
    held_scratch: Vec<KeySlot>,
}

/// The table as the deadlock search sees it.
struct View<'a> {
    keys: &'a Slab<KeyState>,
    sessions: &'a Slab<SessionState>,
}

impl WaitGraph for View<'_> {
    fn waits_on(&self, session: SessionSlot) -> Option<KeySlot> {
        match self.sessions.get(session)?.request.as_ref()?.phase {
            Phase::Waiting { key, .. } => Some(key),
            _ => None,
        }
    }

    fn holders(&self, key: KeySlot) -> impl Iterator<Item = SessionSlot> + '_ {
        self.keys
            .get(key)
            .into_iter()
            .flat_map(|k| k.holders.iter().map(|h| h.session))
    }

    fn bounds(&self) -> (usize, usize) {
        (self.sessions.capacity(), self.keys.capacity())
    }
}

impl LockTable {
    /// An empty table that accepts requests of up to `max_keys_per_request` distinct keys, and
    /// no limit on how many keys a session holds (see
    /// [`LockTable::with_max_keys_per_session`]).
    pub fn new(max_keys_per_request: usize) -> Self {
        LockTable {
            key_index: FastMap::default(),
            keys: Slab::new(),
            session_index: FastMap::default(),
            sessions: Slab::new(),
            waiters: Slab::new(),
            search: CycleSearch::default(),
            last_token: 0,
            max_keys_per_request,
            max_keys_per_session: usize::MAX,
            effects: Effects::default(),
            dirty: VecDeque::new(),
            ready: VecDeque::new(),
            held_scratch: Vec::new(),
        }
    }

    /// The same table, refusing with `TooManyLocks` any request that would make one session hold
    /// more than `limit` keys.
    pub fn with_max_keys_per_session(mut self, limit: usize) -> Self {
        self.max_keys_per_session = limit;
        self
    }

    /// Makes every later fencing token larger than `floor` (no effect if tokens already are).
    /// A server seeds this at start so that tokens keep increasing across restarts.
    pub fn raise_token_floor(&mut self, floor: u64) {
        self.last_token = self.last_token.max(floor);
    }

    /// Opens a session with the caller's `id`.
    ///
    /// # Errors
    /// `InvalidRequest` if a session with this id is already open.
    pub fn open_session(&mut self, id: SessionId) -> Result<(), LockError> {
        if self.session_index.contains_key(&id) {
            return Err(LockError::invalid("a session with this id is already open"));
        }
        let slot = self.sessions.insert(SessionState {
            id,
            held: FastSet::default(),
            request: None,
        });
        self.session_index.insert(id, slot);
        Ok(())
    }

    /// Is the session `id` open?
    pub fn is_open(&self, id: SessionId) -> bool {
        self.session_index.contains_key(&id)
    }

    /// Closes the session `id`: its request in flight is withdrawn (its caller, if waiting, is
    /// listed in the effects and will find the session closed), every lock it holds is released
    /// and the waiters behind it are re-examined. Returns false if the session was not open.
    pub fn close_session(&mut self, id: SessionId, now: impl Into<Now>) -> (bool, Effects) {
        let Some(slot) = self.slot(id) else {
            return (false, Effects::default());
        };
        if let Some(request) = &self.sessions[slot].request {
            if !request.has_failed() {
                self.rollback(slot);
            }
            self.effects.concluded.push(id);
        }
        self.release_everything(slot);
        self.sessions.remove(slot);
        self.session_index.remove(&id);
        (true, self.finish_call(&mut now.into()))
    }

    /// Starts a request of session `id` for `keys` (deduplicated, taken in sorted order) in
    /// `mode`.
    ///
    /// Keys are taken one by one; on the first that cannot be had at once the request waits
    /// there if `may_wait`, and otherwise fails with `Timeout` (a try-lock).
    ///
    /// # Errors
    /// `SessionClosed` if the session is not open; `InvalidRequest` for no keys, too many keys, or
    /// another request of this session in flight; `TooManyLocks` if the keys the session holds
    /// plus the request's keys it does not hold yet would exceed the per-session limit (checked
    /// before anything is taken); `Deadlock` if waiting would close a cycle;
    /// `Timeout` for a try-lock that would wait. On error the session holds exactly what it held
    /// before.
    pub fn acquire(
        &mut self,
        id: SessionId,
        keys: &[Key],
        mode: LockMode,
        now: impl Into<Now>,
        may_wait: bool,
    ) -> (Result<Acquired, LockError>, Effects) {
        let mut now = now.into();
        let result = self.start(id, keys, mode, &mut now, may_wait);
        (result, self.finish_call(&mut now))
    }

    /// Collects the outcome of session `id`'s request once it concluded. Returns `None` while the
    /// request still waits.
    pub fn take_outcome(&mut self, id: SessionId) -> Option<Result<Grant, LockError>> {
        let Some(state) = self.slot(id).and_then(|slot| self.sessions.get_mut(slot)) else {
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

    /// The deadline of session `id`'s request passed: if it already concluded, its outcome is
    /// returned as is; otherwise it is withdrawn and rolled back, and the result is `Timeout`
    /// naming the key it was waiting for.
    pub fn expire(
        &mut self,
        id: SessionId,
        now: impl Into<Now>,
    ) -> (Result<Grant, LockError>, Effects) {
        if let Some(outcome) = self.take_outcome(id) {
            return (outcome, Effects::default());
        }
        let waiting_key = self.slot(id).and_then(|slot| self.waiting_key(slot));
        if let Some(slot) = self.slot(id) {
            self.rollback(slot);
            self.sessions[slot].request = None;
        }
        let result = match waiting_key {
            Some(key) => Err(LockError::Timeout { key }),
            None => Err(LockError::SessionClosed),
        };
        (result, self.finish_call(&mut now.into()))
    }

    /// The caller of session `id`'s request went away: the request is withdrawn and everything
    /// it acquired is given back, even if it had just been granted.
    pub fn cancel(&mut self, id: SessionId, now: impl Into<Now>) -> Effects {
        let Some(slot) = self.slot(id) else {
            return Effects::default();
        };
        let Some(request) = &self.sessions[slot].request else {
            return Effects::default();
        };
        if !request.has_failed() {
            self.rollback(slot);
        }
        self.sessions[slot].request = None;
        self.finish_call(&mut now.into())
    }

    /// Releases `keys`.
    ///
    /// # Errors
    /// `NotHeld` (listing them) if the session does not hold some of the keys, and then nothing
    /// is released; `SessionClosed`; `InvalidRequest` for an empty list or while a request of the
    /// session is in flight.
    pub fn release(
        &mut self,
        id: SessionId,
        keys: &[Key],
        now: impl Into<Now>,
    ) -> (Result<(), LockError>, Effects) {
        self.change_held(id, keys, now.into(), Self::remove_holder)
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
        id: SessionId,
        keys: &[Key],
        now: impl Into<Now>,
    ) -> (Result<(), LockError>, Effects) {
        self.change_held(id, keys, now.into(), Self::downgrade_held)
    }

    /// Validates `keys` as held by session `id` (see [`LockTable::release`]), then applies
    /// `change` to each, in key order.
    fn change_held(
        &mut self,
        id: SessionId,
        keys: &[Key],
        mut now: Now,
        change: fn(&mut Self, SessionSlot, KeySlot),
    ) -> (Result<(), LockError>, Effects) {
        let result = self.held_by(id, keys).map(|slot| {
            let held = mem::take(&mut self.held_scratch);
            for &key in &held {
                change(self, slot, key);
            }
            self.held_scratch = held;
        });
        (result, self.finish_call(&mut now))
    }

    /// Gives back what one request took ([`Grant::taken`]): releases the keys it acquired, then
    /// downgrades the keys it upgraded, so the session's locks are as before the request (an
    /// upgraded key keeps its exclusive token, as every downgrade does). One call, one
    /// re-examination.
    ///
    /// # Errors
    /// As [`LockTable::release`], for the keys of `taken` together; nothing changes on error.
    pub fn give_back(
        &mut self,
        id: SessionId,
        taken: &Taken,
        now: impl Into<Now>,
    ) -> (Result<(), LockError>, Effects) {
        if taken.is_empty() {
            // Nothing to give back; the same answers as `release` for a closed session or one
            // with a request in flight.
            let result = match self.slot(id) {
                None => Err(LockError::SessionClosed),
                Some(slot) if self.sessions[slot].request.is_some() => Err(LockError::invalid(
                    "cannot give back while a request of this session is in progress",
                )),
                Some(_) => Ok(()),
            };
            return (result, Effects::default());
        }
        let named: Vec<Key> = taken
            .acquired
            .iter()
            .chain(&taken.upgraded)
            .cloned()
            .collect();
        let result = self.held_by(id, &named).map(|slot| {
            for key in &taken.acquired {
                if let Some(&key) = self.key_index.get(key) {
                    self.remove_holder(slot, key);
                }
            }
            for key in &taken.upgraded {
                if let Some(&key) = self.key_index.get(key) {
                    self.downgrade_held(slot, key);
                }
            }
        });
        (result, self.finish_call(&mut now.into()))
    }

    /// Releases every lock of session `id`. A request still in flight is withdrawn first (its
    /// caller gets `Cancelled`).
    ///
    /// # Errors
    /// `SessionClosed` if the session is not open.
    pub fn release_all(
        &mut self,
        id: SessionId,
        now: impl Into<Now>,
    ) -> (Result<(), LockError>, Effects) {
        let Some(slot) = self.slot(id) else {
            return (Err(LockError::SessionClosed), Effects::default());
        };
        let withdraw = self.sessions[slot]
            .request
            .as_ref()
            .is_some_and(|r| !r.has_failed());
        if withdraw {
            self.rollback(slot);
            if let Some(request) = self.sessions[slot].request.as_mut() {
                request.phase = Phase::Finished(Err(LockError::Cancelled));
            }
            self.effects.concluded.push(id);
        }
        self.release_everything(slot);
        (Ok(()), self.finish_call(&mut now.into()))
    }

    /// Withdraws session `id`'s request if it is waiting for a key: it is rolled back (the
    /// session's locks are as before it) and fails with `Cancelled`, and its session is listed in
    /// the effects so its caller collects that outcome. A request that is not waiting (none, or
    /// one already granted or failed but not yet collected) is left alone. Returns whether a
    /// request was withdrawn.
    pub fn withdraw_wait(&mut self, id: SessionId, now: impl Into<Now>) -> (bool, Effects) {
        let Some(slot) = self.slot(id) else {
            return (false, Effects::default());
        };
        if self.waiting_key_slot(slot).is_none() {
            return (false, Effects::default());
        }
        self.rollback(slot);
        if let Some(request) = self.sessions[slot].request.as_mut() {
            request.phase = Phase::Finished(Err(LockError::Cancelled));
        }
        self.effects.concluded.push(id);
        (true, self.finish_call(&mut now.into()))
    }

    /// How many keys session `id` holds and the key its request waits on, if it waits (`None`
    /// if the session is not open). O(1).
    pub fn session_summary(&self, id: SessionId) -> Option<(usize, Option<Key>)> {
        let slot = self.slot(id)?;
        Some((self.sessions[slot].held.len(), self.waiting_key(slot)))
    }

    /// The mode and token under which session `id` holds `key`, if it does.
    pub fn held_mode(&self, id: SessionId, key: &Key) -> Option<(LockMode, FencingToken)> {
        let slot = self.slot(id)?;
        let holder = self.keys.get(*self.key_index.get(key)?)?.holder(slot)?;
        Some((holder.mode, holder.token))
    }

    /// Every key session `id` holds, sorted.
    pub fn held_keys(&self, id: SessionId) -> Vec<Key> {
        let Some(state) = self.slot(id).and_then(|slot| self.sessions.get(slot)) else {
            return Vec::new();
        };
        let mut keys: Vec<Key> = state
            .held
            .iter()
            .filter_map(|&k| self.keys.get(k).map(|k| k.name.clone()))
            .collect();
        keys.sort_unstable();
        keys
    }

    /// The number of open sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// What the table holds at `now`, counted for monitoring (see [`Gauges`]): a metrics scrape
    /// calls it. A wait's length is measured from when it joined its current queue (a multi-key
    /// request that waited on an earlier key starts again at the next one).
    ///
    /// Cost: O(keys + holders + waiters), one pass over the key slab (holders of each key, and
    /// whether it has waiters) and one over the waiter slab (the oldest `since`); it allocates
    /// nothing. A caller holding a lock around the table holds it for that long, so call it at
    /// scrape intervals, never per request.
    pub fn gauges(&self, now: Instant) -> Gauges {
        let mut gauges = Gauges {
            sessions: self.sessions.len(),
            waiting: self.waiters.len(),
            ..Gauges::default()
        };
        for (_, state) in &self.keys {
            for holder in &state.holders {
                match holder.mode {
                    LockMode::Shared => gauges.held_shared += 1,
                    LockMode::Exclusive => gauges.held_exclusive += 1,
                }
            }
            if state.has_waiters() {
                gauges.keys_with_waiters += 1;
            }
        }
        if let Some(oldest) = self.waiters.iter().map(|(_, waiter)| waiter.since).min() {
            gauges.longest_wait = now.saturating_duration_since(oldest);
        }
        gauges
    }

    /// What the table holds right now (see [`Footprint`]).
    pub fn footprint(&self) -> Footprint {
        Footprint {
            keys: self.keys.len(),
            key_index: self.key_index.len(),
            sessions: self.sessions.len(),
            session_index: self.session_index.len(),
            waiters: self.waiters.len(),
            pending: self.dirty.len() + self.ready.len() + self.effects.concluded.len(),
        }
    }

    /// A consistent picture of every held or awaited key and of the waits-for edges of rule 5.
    ///
    /// The edges are derived from the queues ([`Snapshot::from_keys`]), so a snapshot costs
    /// O(edges): q exclusive waiters on one key wait for q(q-1)/2 others. It is a diagnostic;
    /// nothing else pays it. A caller holding a lock around the table should take
    /// [`LockTable::keys_snapshot`] under it and derive the edges after releasing it.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot::from_keys(self.keys_snapshot())
    }

    /// Every held or awaited key with its holders and queue, sorted by key, without the edges:
    /// O(holders + queue entries).
    pub fn keys_snapshot(&self) -> Vec<KeySnapshot> {
        let mut keys: Vec<KeySnapshot> = self
            .keys
            .iter()
            .map(|(_, state)| self.key_snapshot_of(state))
            .collect();
        keys.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        keys
    }

    /// As [`LockTable::keys_snapshot`], for the first `limit` keys (in key order) that start
    /// with `prefix`, and how many more keys start with it. Only the keys listed are copied:
    /// O(keys) to find them, O(limit log limit + their holders and queue entries) to copy them.
    pub fn keys_snapshot_page(&self, prefix: &str, limit: usize) -> (Vec<KeySnapshot>, usize) {
        let mut matching: Vec<&KeyState> = self
            .keys
            .iter()
            .map(|(_, state)| state)
            .filter(|state| state.name.as_str().starts_with(prefix))
            .collect();
        let more = matching.len().saturating_sub(limit);
        if more > 0 {
            matching.select_nth_unstable_by(limit, |a, b| a.name.cmp(&b.name));
            matching.truncate(limit);
        }
        matching.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        let keys = matching
            .into_iter()
            .map(|state| self.key_snapshot_of(state))
            .collect();
        (keys, more)
    }

    /// What a live view of the table shows first: at most `limit` keys — those with waiters,
    /// the longest current wait first, then the others, the longest held first — with their
    /// holders and queues, and how many other keys are held or awaited. O(keys + holders + queue
    /// entries) to rank, O(limit log limit + what is listed) to sort and copy; nothing is copied
    /// for the keys left out. The table's totals are [`LockTable::gauges`].
    pub fn busiest_keys(&self, limit: usize) -> BusiestKeys {
        // (has no waiter, since when, key): ascending puts waited-on keys first, oldest first.
        let mut ranked: Vec<(bool, Instant, &KeyState)> = self
            .keys
            .iter()
            .filter_map(|(_, state)| {
                let oldest_wait = state.queue(&self.waiters).map(|w| w.since).min();
                let rank = match oldest_wait {
                    Some(since) => (false, since),
                    None => (true, state.holders.iter().map(|h| h.since).min()?),
                };
                Some((rank.0, rank.1, state))
            })
            .collect();
        let order = |a: &(bool, Instant, &KeyState), b: &(bool, Instant, &KeyState)| {
            (a.0, a.1)
                .cmp(&(b.0, b.1))
                .then_with(|| a.2.name.cmp(&b.2.name))
        };
        let more = ranked.len().saturating_sub(limit);
        if more > 0 {
            ranked.select_nth_unstable_by(limit, order);
            ranked.truncate(limit);
        }
        ranked.sort_unstable_by(order);
        let keys = ranked
            .into_iter()
            .map(|(_, _, state)| self.key_snapshot_of(state))
            .collect();
        BusiestKeys { keys, more }
    }

    /// The holders and queue of one key (`None` if nobody holds or awaits it): O(holders +
    /// queue), without the edges.
    pub fn key_snapshot(&self, key: &Key) -> Option<KeySnapshot> {
        let state = self.keys.get(*self.key_index.get(key)?)?;
        Some(self.key_snapshot_of(state))
    }

    fn key_snapshot_of(&self, state: &KeyState) -> KeySnapshot {
        KeySnapshot {
            key: state.name.clone(),
            holders: state
                .holders
                .iter()
                .filter_map(|h| {
                    Some(HolderSnapshot {
                        session: self.sessions.get(h.session)?.id,
                        mode: h.mode,
                        token: h.token,
                        since: h.since,
                    })
                })
                .collect(),
            queue: state
                .queue(&self.waiters)
                .filter_map(|w| {
                    Some(WaiterSnapshot {
                        session: self.sessions.get(w.session)?.id,
                        mode: w.mode,
                        upgrade: w.conversion,
                        since: w.since,
                    })
                })
                .collect(),
        }
    }

    // ----- request progress -------------------------------------------------------------------

    /// Validates and starts a request, and answers it if it does not wait.
    fn start(
        &mut self,
        id: SessionId,
        keys: &[Key],
        mode: LockMode,
        now: &mut Now,
        may_wait: bool,
    ) -> Result<Acquired, LockError> {
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
        let slot = self.slot(id).ok_or(LockError::SessionClosed)?;
        let state = &mut self.sessions[slot];
        if state.request.is_some() {
            return Err(LockError::invalid(
                "another request of this session is still in progress",
            ));
        }
        self.check_session_limit(slot, &sorted)?;
        let state = &mut self.sessions[slot];
        state.request = Some(Request::new(sorted, mode));
        let outcome = self.advance(slot, now, may_wait);
        if matches!(outcome, Ok(false)) {
            return Ok(Acquired::Waiting);
        }
        let request = self.sessions[slot].request.take();
        match (outcome, request) {
            (Ok(_), Some(request)) => Ok(Acquired::Granted(request.into_grant())),
            (Ok(_), None) => Err(LockError::SessionClosed),
            (Err(error), _) => Err(error),
        }
    }

    /// Takes the request's keys from `next` on, one by one. `Ok(true)` when every key is taken,
    /// `Ok(false)` when it waits, `Err` after rolling the request back.
    fn advance(
        &mut self,
        slot: SessionSlot,
        now: &mut Now,
        may_wait: bool,
    ) -> Result<bool, LockError> {
        loop {
            let Some(request) = self
                .sessions
                .get(slot)
                .and_then(|state| state.request.as_ref())
            else {
                return Err(LockError::SessionClosed);
            };
            let Some(key) = request.next_key().cloned() else {
                return Ok(true);
            };
            let mode = request.mode;
            let key_slot = self.key_slot_or_insert(&key);
            let attempt = self.keys[key_slot].take_at_once(slot, mode, &mut self.last_token, now);
            let state = &mut self.sessions[slot];
            let Some(request) = state.request.as_mut() else {
                return Err(LockError::SessionClosed);
            };
            match attempt {
                Attempt::AlreadyHeld(token) => request.took_held(key, token),
                Attempt::Acquired(token) => {
                    state.held.insert(key_slot);
                    request.took_acquired(key, token);
                }
                Attempt::Upgraded { token, old } => request.took_upgraded(key, token, old),
                Attempt::MustWait { conversion } => {
                    let waited = if may_wait {
                        self.wait(slot, key_slot, mode, conversion, now)
                    } else {
                        Err(LockError::Timeout { key })
                    };
                    if waited.is_err() {
                        self.rollback(slot);
                    }
                    return waited.map(|()| false);
                }
            }
        }
    }

    /// Queues session `slot` on `key` and checks for a cycle through it. On a cycle the entry is
    /// taken out again and the error names the cycle; the caller rolls the request back.
    fn wait(
        &mut self,
        slot: SessionSlot,
        key: KeySlot,
        mode: LockMode,
        conversion: bool,
        now: &mut Now,
    ) -> Result<(), LockError> {
        if conversion {
            if let Some(other) = self.keys[key].conversion.map(|w| self.waiters[w].session) {
                // Rule 3: two upgrades of one key each wait for the other's shared lock.
                return Err(LockError::Deadlock {
                    cycle: vec![self.member(slot, key), self.member(other, key)],
                });
            }
        }
        let waiter = self
            .waiters
            .insert(Waiter::new(slot, mode, conversion, now.get()));
        self.keys[key].enqueue(&mut self.waiters, waiter);
        if let Some(request) = self.sessions[slot].request.as_mut() {
            request.phase = Phase::Waiting { key, waiter };
        }
        if !self.may_be_waited_for(slot) {
            return Ok(());
        }
        let view = View {
            keys: &self.keys,
            sessions: &self.sessions,
        };
        let Some(cycle) = self.search.cycle_through(&view, slot) else {
            return Ok(());
        };
        let cycle = self.describe_cycle(&cycle);
        // The requester is the victim: out of the queue (its rollback does the rest).
        self.leave_queue(slot);
        Err(LockError::Deadlock { cycle })
    }

    /// Would granting `keys` (sorted, deduplicated) make session `slot` hold more than
    /// `max_keys_per_session` keys? Keys it already holds, in any mode, do not count again. The
    /// whole request is counted up front, and while it is in flight the session takes nothing
    /// else (one request per session), so its continuations cannot go over the limit either.
    /// Costs one comparison unless the session is near the limit; then O(keys).
    fn check_session_limit(&self, slot: SessionSlot, keys: &[Key]) -> Result<(), LockError> {
        let held = &self.sessions[slot].held;
        let limit = self.max_keys_per_session;
        if held.len().saturating_add(keys.len()) <= limit {
            return Ok(());
        }
        let requested = keys
            .iter()
            .filter(|key| self.key_index.get(*key).is_none_or(|k| !held.contains(k)))
            .count();
        if held.len() + requested <= limit {
            return Ok(());
        }
        Err(LockError::TooManyLocks {
            held: held.len(),
            requested,
            limit,
        })
    }

    /// Could anybody be waiting for session `slot`? Only a waiter on a key it holds (behind it,
    /// for the key it converts on). A session with no such waiter cannot close a cycle by waiting.
    /// Looks at no more than [`PRECHECK_KEYS`] keys: a session holding more is simply searched
    /// (the search's cost does not depend on how many keys the requester holds).
    fn may_be_waited_for(&self, slot: SessionSlot) -> bool {
        let session = &self.sessions[slot];
        if session.held.len() > PRECHECK_KEYS {
            return true;
        }
        let own_entry = match session.request.as_ref().map(|r| &r.phase) {
            Some(Phase::Waiting { waiter, .. }) => Some(*waiter),
            _ => None,
        };
        session.held.iter().any(|&k| {
            self.keys
                .get(k)
                .is_some_and(|state| state.has_waiters_besides(own_entry))
        })
    }

    /// The cycle found by the search (sessions, each waiting on a key the next holds) as rule 5's
    /// edges: a shared waiter does not wait for a shared holder directly but through the first
    /// waiter of the key, which is then listed between them.
    fn describe_cycle(&self, hops: &[SessionSlot]) -> Vec<CycleMember> {
        let mut walk: Vec<SessionSlot> = Vec::with_capacity(hops.len() + 1);
        let mut went_through = false;
        for (i, &from) in hops.iter().enumerate() {
            walk.push(from);
            if let Some(between) = self.waits_through(from, to_of(hops, i)) {
                walk.push(between);
                went_through = true;
            }
        }
        // Only a waiter listed between two hops can already be in the walk.
        if went_through {
            walk = simple_cycle(walk);
        }
        walk.into_iter()
            .filter_map(|s| {
                let key = self.waiting_key_slot(s)?;
                Some(self.member(s, key))
            })
            .collect()
    }

    /// `from` waits on a key `to` holds: `None` if that is a rule-5 edge, else the waiter through
    /// which `from` waits for `to` (the key's first waiter, which conflicts with both).
    fn waits_through(&self, from: SessionSlot, to: SessionSlot) -> Option<SessionSlot> {
        let key = self.waiting_key_slot(from)?;
        let state = self.keys.get(key)?;
        let from_mode = self.request_mode(from)?;
        let to_mode = state.holder(to)?.mode;
        let converting = state.conversion.map(|w| self.waiters[w].session);
        let direct = !from_mode.is_compatible_with(to_mode) || converting == Some(to);
        if direct {
            return None;
        }
        let first = self.waiters.get(state.first_waiter()?)?;
        (first.session != from && first.mode == LockMode::Exclusive).then_some(first.session)
    }

    /// Undoes everything session `slot`'s request did: leaves its queue, releases keys it
    /// acquired, restores upgraded keys to shared with their old token. The request stays (at its
    /// first key, `Running`, with an empty undo log) so the caller can record an outcome or drop
    /// it. Keys are marked for re-examination in that order: the awaited key, the acquired keys,
    /// the upgraded keys.
    fn rollback(&mut self, slot: SessionSlot) {
        let Some(undo) = self
            .sessions
            .get_mut(slot)
            .and_then(|s| s.request.as_mut())
            .map(Request::take_undo)
        else {
            return;
        };
        if let Some((key, waiter)) = undo.waiting {
            self.dequeue(key, waiter);
        }
        for key in undo.acquired {
            if let Some(&key) = self.key_index.get(&key) {
                self.remove_holder(slot, key);
            }
        }
        for (key, token) in undo.upgraded {
            if let Some(&key) = self.key_index.get(&key) {
                if let Some(holder) = self.keys[key].holder_mut(slot) {
                    holder.mode = LockMode::Shared;
                    holder.token = token;
                }
                self.mark_dirty(key);
            }
        }
    }

    // ----- re-examining queues ----------------------------------------------------------------

    /// Settles the table (see the module documentation) and hands out the call's effects.
    fn finish_call(&mut self, now: &mut Now) -> Effects {
        loop {
            while let Some(key) = self.dirty.pop_front() {
                self.grant_waiters(key, now);
            }
            let Some(slot) = self.ready.pop_front() else {
                break;
            };
            let outcome = match self.advance(slot, now, true) {
                Ok(false) => continue,
                Ok(true) => match self.sessions[slot].request.as_mut() {
                    Some(request) => Ok(request.grant_keeping_undo()),
                    None => continue,
                },
                Err(error) => Err(error),
            };
            if let Some(request) = self.sessions[slot].request.as_mut() {
                request.phase = Phase::Finished(outcome);
                self.effects.concluded.push(self.sessions[slot].id);
            }
        }
        mem::take(&mut self.effects)
    }

    /// Grants the first waiters of `key` while they can be granted (FIFO: stops at the first
    /// that cannot), and lists the granted sessions to continue. Drops the key once nobody holds
    /// or awaits it.
    fn grant_waiters(&mut self, key: KeySlot, now: &mut Now) {
        let Some(state) = self.keys.get_mut(key) else {
            return;
        };
        state.dirty = false;
        while let Some(first) = state.first_waiter() {
            if !self
                .waiters
                .get(first)
                .is_some_and(|waiter| state.can_grant(waiter))
            {
                break;
            }
            let Some(waiter) = state.dequeue(&mut self.waiters, first) else {
                break;
            };
            let Some(session) = self.sessions.get_mut(waiter.session) else {
                continue;
            };
            let Some(request) = session.request.as_mut() else {
                continue;
            };
            self.last_token += 1;
            let token = FencingToken(self.last_token);
            if waiter.conversion {
                if let Some(holder) = state.holder_mut(waiter.session) {
                    let old = mem::replace(&mut holder.token, token);
                    holder.mode = LockMode::Exclusive;
                    request.took_upgraded(state.name.clone(), token, old);
                }
            } else {
                state.holders.push(Holder {
                    session: waiter.session,
                    mode: waiter.mode,
                    token,
                    since: now.get(),
                });
                session.held.insert(key);
                request.took_acquired(state.name.clone(), token);
            }
            self.ready.push_back(waiter.session);
        }
        if state.is_idle() {
            let name = state.name.clone();
            self.key_index.remove(&name);
            self.keys.remove(key);
        }
    }

    // ----- small helpers ----------------------------------------------------------------------

    fn slot(&self, id: SessionId) -> Option<SessionSlot> {
        self.session_index.get(&id).copied()
    }

    fn key_slot_or_insert(&mut self, key: &Key) -> KeySlot {
        if let Some(&slot) = self.key_index.get(key) {
            return slot;
        }
        let slot = self.keys.insert(KeyState::new(key.clone()));
        self.key_index.insert(key.clone(), slot);
        slot
    }

    /// Lists `key` for re-examination (once).
    fn mark_dirty(&mut self, key: KeySlot) {
        if let Some(state) = self.keys.get_mut(key) {
            if !state.dirty {
                state.dirty = true;
                self.dirty.push_back(key);
            }
        }
    }

    /// Removes session `slot` from `key`'s holders and marks the key for re-examination.
    fn remove_holder(&mut self, slot: SessionSlot, key: KeySlot) {
        if let Some(state) = self.keys.get_mut(key) {
            state.remove_holder(slot);
        }
        if let Some(session) = self.sessions.get_mut(slot) {
            session.held.remove(&key);
        }
        self.mark_dirty(key);
    }

    /// Turns session `slot`'s exclusive lock on `key` into a shared one, keeping its token.
    fn downgrade_held(&mut self, slot: SessionSlot, key: KeySlot) {
        let downgraded = self
            .keys
            .get_mut(key)
            .and_then(|state| state.holder_mut(slot))
            .filter(|holder| holder.mode == LockMode::Exclusive)
            .map(|holder| holder.mode = LockMode::Shared)
            .is_some();
        if downgraded {
            self.mark_dirty(key);
        }
    }

    /// Takes the queue entry `waiter` out of `key`'s queue and marks the key.
    fn dequeue(&mut self, key: KeySlot, waiter: WaiterSlot) {
        if let Some(state) = self.keys.get_mut(key) {
            state.dequeue(&mut self.waiters, waiter);
        }
        self.mark_dirty(key);
    }

    /// Takes session `slot` out of the queue it waits in (the deadlock victim), keeping its
    /// request `Running` for the rollback.
    fn leave_queue(&mut self, slot: SessionSlot) {
        let Some(request) = self.sessions.get_mut(slot).and_then(|s| s.request.as_mut()) else {
            return;
        };
        if let Phase::Waiting { key, waiter } = mem::replace(&mut request.phase, Phase::Running) {
            self.dequeue(key, waiter);
        }
    }

    /// Releases every key session `slot` holds, in key order.
    fn release_everything(&mut self, slot: SessionSlot) {
        let Some(session) = self.sessions.get(slot) else {
            return;
        };
        let mut held: Vec<(Key, KeySlot)> = session
            .held
            .iter()
            .filter_map(|&k| Some((self.keys.get(k)?.name.clone(), k)))
            .collect();
        held.sort_unstable();
        for (_, key) in held {
            self.remove_holder(slot, key);
        }
    }

    /// Checks that session `id` may change its locks on `keys` now and holds every one of them.
    /// Returns the session, and leaves the keys' slots (in key order, deduplicated) in
    /// `held_scratch`, so the common one-key release allocates nothing.
    fn held_by(&mut self, id: SessionId, keys: &[Key]) -> Result<SessionSlot, LockError> {
        let slot = self.slot(id).ok_or(LockError::SessionClosed)?;
        if keys.is_empty() {
            return Err(LockError::invalid(
                "a release or downgrade must name at least one key",
            ));
        }
        if self.sessions[slot].request.is_some() {
            return Err(LockError::invalid(
                "cannot release or downgrade while a request of this session is in progress",
            ));
        }
        let copy;
        let sorted: &[Key] = if keys.windows(2).all(|pair| pair[0] < pair[1]) {
            keys
        } else {
            let mut sorted = keys.to_vec();
            sorted.sort_unstable();
            sorted.dedup();
            copy = sorted;
            &copy
        };
        self.held_scratch.clear();
        let mut not_held = Vec::new();
        for key in sorted {
            match self.key_index.get(key) {
                Some(&k) if self.keys[k].holder(slot).is_some() => self.held_scratch.push(k),
                _ => not_held.push(key.clone()),
            }
        }
        if !not_held.is_empty() {
            return Err(LockError::NotHeld { keys: not_held });
        }
        Ok(slot)
    }

    /// The key session `slot` waits on, if it waits.
    fn waiting_key_slot(&self, slot: SessionSlot) -> Option<KeySlot> {
        match self.sessions.get(slot)?.request.as_ref()?.phase {
            Phase::Waiting { key, .. } => Some(key),
            _ => None,
        }
    }

    /// The name of the key session `slot` waits on, if it waits.
    fn waiting_key(&self, slot: SessionSlot) -> Option<Key> {
        Some(self.keys.get(self.waiting_key_slot(slot)?)?.name.clone())
    }

    /// The mode session `slot`'s request asks for.
    fn request_mode(&self, slot: SessionSlot) -> Option<LockMode> {
        Some(self.sessions.get(slot)?.request.as_ref()?.mode)
    }

    /// A member of a deadlock cycle: session `slot` waiting for `key`.
    fn member(&self, slot: SessionSlot, key: KeySlot) -> CycleMember {
        CycleMember {
            session: self.sessions[slot].id,
            waiting_for_key: self.keys[key].name.clone(),
        }
    }
}

#[cfg(test)]
mod tests;

/// The hop after hop `i` of a cycle (the last one goes back to the first).
fn to_of(hops: &[SessionSlot], i: usize) -> SessionSlot {
    hops[(i + 1) % hops.len()]
}

/// A closed walk made simple: where a session comes back, the loop since its first visit is cut
/// (what followed the repeat still waits for the one after it); where the first session comes
/// back, the cycle ends there. Defensive: the search expands each key once, so the waiters
/// listed between hops are distinct and never hops themselves, and the walk is already simple;
/// this keeps the error a simple cycle even if that reasoning is ever broken.
fn simple_cycle(walk: Vec<SessionSlot>) -> Vec<SessionSlot> {
    let mut members: Vec<SessionSlot> = Vec::with_capacity(walk.len());
    let mut position: FastMap<SessionSlot, usize> = FastMap::default();
    for session in walk {
        match position.get(&session) {
            Some(0) => break,
            Some(&index) => {
                for cut in members.drain(index + 1..) {
                    position.remove(&cut);
                }
            }
            None => {
                position.insert(session, members.len());
                members.push(session);
            }
        }
    }
    members
}
