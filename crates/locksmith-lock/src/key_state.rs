//! One key: who holds it, who waits for it, and the rules that decide when a request gets it.
//!
//! The holders are a short list in grant order. The queue is a doubly linked list threaded through
//! the table's waiter slab, so a waiter leaves it in O(1) from anywhere (timeout, cancellation,
//! disconnect, deadlock victim) and the head is granted in O(1). A conversion (a holder of the
//! shared lock waiting to hold it exclusively) has its own slot ahead of the list: there is at most
//! one, because a second one always closes a cycle with the first (each waits for the other's
//! shared lock, rule 3) and is refused.
//!
//! Invariants, true whenever no table call is running:
//! - holders are pairwise compatible: one exclusive holder, or any number of shared ones;
//! - the first waiter (the conversion, else the head of the list) cannot be granted;
//! - a key with no holder and no waiter is not in the table.
//!
//! Nothing here looks at the whole queue except the snapshot: granting, leaving and the deadlock
//! search only ever touch the front of the queue and the holders.

use std::time::Instant;

use slab::Slab;

use crate::now::Now;
use crate::types::{FencingToken, Key, LockMode};
use crate::{SessionSlot, WaiterSlot};

/// A session holding the key.
pub(crate) struct Holder {
    /// The holding session.
    pub session: SessionSlot,
    /// The mode it holds.
    pub mode: LockMode,
    /// The fencing token of its grant.
    pub token: FencingToken,
    /// When it was granted the key (an upgrade keeps it: the session has held the key since
    /// then), so diagnostics can say how long a lock has been held.
    pub since: Instant,
}

/// A queue entry: a session waiting for one key.
pub(crate) struct Waiter {
    /// The waiting session.
    pub session: SessionSlot,
    /// The mode it asked for.
    pub mode: LockMode,
    /// The session holds the key shared and waits to hold it exclusively.
    pub conversion: bool,
    /// When it started waiting (for the snapshot).
    pub since: Instant,
    /// The entry ahead of it in its key's list (`None` at the head, and for a conversion).
    prev: Option<WaiterSlot>,
    /// The entry behind it in its key's list (`None` at the tail, and for a conversion).
    next: Option<WaiterSlot>,
}

impl Waiter {
    /// A queue entry, not yet linked into a queue.
    pub fn new(session: SessionSlot, mode: LockMode, conversion: bool, since: Instant) -> Self {
        Waiter {
            session,
            mode,
            conversion,
            since,
            prev: None,
            next: None,
        }
    }
}

/// What taking a key at once gave.
pub(crate) enum Attempt {
    /// The session already holds the key in the requested mode or a stronger one.
    AlreadyHeld(FencingToken),
    /// The key was free for this mode and is now held.
    Acquired(FencingToken),
    /// The session was the only holder of the key shared and now holds it exclusively; `old` is
    /// the shared token, restored if the request is rolled back.
    Upgraded {
        token: FencingToken,
        old: FencingToken,
    },
    /// The request must queue: as a conversion when the session holds the key shared.
    MustWait { conversion: bool },
}

/// One key's holders and queue.
pub(crate) struct KeyState {
    /// The key's name (to report it, and to remove the key from the table's index).
    pub name: Key,
    /// Sessions holding the key, in grant order. Pairwise compatible.
    pub holders: Vec<Holder>,
    /// The queued conversion, if any: it comes before every entry of the list.
    pub conversion: Option<WaiterSlot>,
    /// Head of the list of new requests (FIFO).
    head: Option<WaiterSlot>,
    /// Tail of the list of new requests.
    tail: Option<WaiterSlot>,
    /// The key is in the table's list of keys to re-examine (so it is listed once).
    pub dirty: bool,
}

impl KeyState {
    /// A key nobody holds or waits for yet.
    pub fn new(name: Key) -> Self {
        KeyState {
            name,
            holders: Vec::new(),
            conversion: None,
            head: None,
            tail: None,
            dirty: false,
        }
    }

    /// The holder entry of `session`, if it holds the key.
    pub fn holder(&self, session: SessionSlot) -> Option<&Holder> {
        self.holders.iter().find(|h| h.session == session)
    }

    /// The holder entry of `session`, mutably.
    pub fn holder_mut(&mut self, session: SessionSlot) -> Option<&mut Holder> {
        self.holders.iter_mut().find(|h| h.session == session)
    }

    /// Removes `session` from the holders (nothing if it does not hold the key).
    pub fn remove_holder(&mut self, session: SessionSlot) {
        if let Some(index) = self.holders.iter().position(|h| h.session == session) {
            self.holders.remove(index);
        }
    }

    /// Is the key held exclusively? (Then its holder is its only holder.)
    pub fn held_exclusive(&self) -> bool {
        self.holders
            .first()
            .is_some_and(|h| h.mode == LockMode::Exclusive)
    }

    /// Does anybody wait for the key?
    pub fn has_waiters(&self) -> bool {
        self.conversion.is_some() || self.head.is_some()
    }

    /// Does anybody but the queue entry `own` wait for the key?
    pub fn has_waiters_besides(&self, own: Option<WaiterSlot>) -> bool {
        self.head.is_some() || self.conversion.is_some_and(|c| Some(c) != own)
    }

    /// Nobody holds the key and nobody waits for it: it can leave the table.
    pub fn is_idle(&self) -> bool {
        self.holders.is_empty() && !self.has_waiters()
    }

    /// The first waiter: the conversion if there is one, else the head of the list.
    pub fn first_waiter(&self) -> Option<WaiterSlot> {
        self.conversion.or(self.head)
    }

    /// Could `waiter` (the first waiter) be granted now? A conversion when its session is the
    /// only holder; a new request when it is compatible with every holder.
    pub fn can_grant(&self, waiter: &Waiter) -> bool {
        if waiter.conversion {
            return self.holders.len() == 1 && self.holders[0].session == waiter.session;
        }
        self.holders_admit(waiter.mode)
    }

    /// Is `mode` compatible with every holder (the holders being pairwise compatible, that is:
    /// shared beside no exclusive holder, exclusive beside nobody)?
    fn holders_admit(&self, mode: LockMode) -> bool {
        match mode {
            LockMode::Shared => !self.held_exclusive(),
            LockMode::Exclusive => self.holders.is_empty(),
        }
    }

    /// Rules 2 and 3: grants the key to `session` at once if it may have it without queueing — a
    /// mode it already holds (or weaker), an upgrade when it is the only holder, or a new lock
    /// compatible with every holder when nobody waits (no barging). `last_token` is the table's
    /// token counter.
    pub fn take_at_once(
        &mut self,
        session: SessionSlot,
        mode: LockMode,
        last_token: &mut u64,
        now: &mut Now,
    ) -> Attempt {
        let only_holder = self.holders.len() == 1;
        if let Some(held) = self.holder_mut(session) {
            if held.mode >= mode {
                return Attempt::AlreadyHeld(held.token);
            }
            if !only_holder {
                return Attempt::MustWait { conversion: true };
            }
            *last_token += 1;
            let token = FencingToken(*last_token);
            let old = std::mem::replace(&mut held.token, token);
            held.mode = mode;
            return Attempt::Upgraded { token, old };
        }
        let free = !self.has_waiters() && self.holders_admit(mode);
        if !free {
            return Attempt::MustWait { conversion: false };
        }
        *last_token += 1;
        let token = FencingToken(*last_token);
        self.holders.push(Holder {
            session,
            mode,
            token,
            since: now.get(),
        });
        Attempt::Acquired(token)
    }

    /// Puts the entry `slot` of `waiters` in the queue: a conversion in its slot (which must be
    /// free), a new request at the tail.
    pub fn enqueue(&mut self, waiters: &mut Slab<Waiter>, slot: WaiterSlot) {
        let Some(waiter) = waiters.get_mut(slot) else {
            return;
        };
        if waiter.conversion {
            self.conversion = Some(slot);
            return;
        }
        waiter.prev = self.tail;
        waiter.next = None;
        match self.tail.and_then(|tail| waiters.get_mut(tail)) {
            Some(tail) => tail.next = Some(slot),
            None => self.head = Some(slot),
        }
        self.tail = Some(slot);
    }

    /// Takes the entry `slot` out of the queue and the slab, wherever it is: O(1).
    pub fn dequeue(&mut self, waiters: &mut Slab<Waiter>, slot: WaiterSlot) -> Option<Waiter> {
        let waiter = waiters.try_remove(slot)?;
        if waiter.conversion {
            if self.conversion == Some(slot) {
                self.conversion = None;
            }
            return Some(waiter);
        }
        match waiter.prev.and_then(|prev| waiters.get_mut(prev)) {
            Some(prev) => prev.next = waiter.next,
            None => self.head = waiter.next,
        }
        match waiter.next.and_then(|next| waiters.get_mut(next)) {
            Some(next) => next.prev = waiter.prev,
            None => self.tail = waiter.prev,
        }
        Some(waiter)
    }

    /// The queue entries, first waiter first. O(queue length): for the snapshot only.
    pub fn queue<'a>(&self, waiters: &'a Slab<Waiter>) -> impl Iterator<Item = &'a Waiter> + 'a {
        let conversion = self.conversion.and_then(|slot| waiters.get(slot));
        let mut next = self.head;
        let list = std::iter::from_fn(move || {
            let waiter = waiters.get(next?)?;
            next = waiter.next;
            Some(waiter)
        });
        conversion.into_iter().chain(list)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use LockMode::{Exclusive, Shared};

    fn key_with_holders(holders: &[(SessionSlot, LockMode)]) -> KeyState {
        let mut key = KeyState::new(Key::from("k1"));
        for &(session, mode) in holders {
            key.holders.push(Holder {
                session,
                mode,
                token: FencingToken(1),
                since: Instant::now(),
            });
        }
        key
    }

    fn queue_sessions(key: &KeyState, waiters: &Slab<Waiter>) -> Vec<SessionSlot> {
        key.queue(waiters).map(|w| w.session).collect()
    }

    fn wait(key: &mut KeyState, waiters: &mut Slab<Waiter>, session: SessionSlot) -> WaiterSlot {
        let conversion = key.holder(session).is_some();
        let slot = waiters.insert(Waiter::new(session, Exclusive, conversion, Instant::now()));
        key.enqueue(waiters, slot);
        slot
    }

    #[test]
    fn a_waiter_leaves_the_queue_from_the_head_the_middle_or_the_tail() {
        // A holds k1; B, C, D, E wait in that order.
        let mut waiters = Slab::new();
        let mut key = key_with_holders(&[(0, Exclusive)]);
        let slots: Vec<WaiterSlot> = (1..=4).map(|s| wait(&mut key, &mut waiters, s)).collect();
        assert_eq!(queue_sessions(&key, &waiters), vec![1, 2, 3, 4]);
        key.dequeue(&mut waiters, slots[1]); // C, from the middle
        assert_eq!(queue_sessions(&key, &waiters), vec![1, 3, 4]);
        key.dequeue(&mut waiters, slots[0]); // B, the head
        assert_eq!(queue_sessions(&key, &waiters), vec![3, 4]);
        key.dequeue(&mut waiters, slots[3]); // E, the tail
        assert_eq!(queue_sessions(&key, &waiters), vec![3]);
        let d = wait(&mut key, &mut waiters, 5);
        assert_eq!(queue_sessions(&key, &waiters), vec![3, 5]);
        key.dequeue(&mut waiters, slots[2]);
        key.dequeue(&mut waiters, d);
        assert!(!key.has_waiters());
        assert!(waiters.is_empty());
    }

    #[test]
    fn a_conversion_comes_before_every_new_request() {
        // A and B hold k1 shared; C waits X; A asks X (a conversion).
        let mut waiters = Slab::new();
        let mut key = key_with_holders(&[(0, Shared), (1, Shared)]);
        wait(&mut key, &mut waiters, 2);
        let conversion = wait(&mut key, &mut waiters, 0);
        assert_eq!(queue_sessions(&key, &waiters), vec![0, 2]);
        assert_eq!(key.first_waiter(), Some(conversion));
        // The conversion waits for B's shared lock; once B is gone it can be granted.
        assert!(!key.can_grant(&waiters[conversion]));
        key.remove_holder(1);
        assert!(key.can_grant(&waiters[conversion]));
    }

    #[test]
    fn shared_waiters_can_be_granted_beside_shared_holders_only() {
        let waiter = Waiter::new(9, Shared, false, Instant::now());
        assert!(key_with_holders(&[(0, Shared), (1, Shared)]).can_grant(&waiter));
        assert!(!key_with_holders(&[(0, Exclusive)]).can_grant(&waiter));
        let writer = Waiter::new(9, Exclusive, false, Instant::now());
        assert!(!key_with_holders(&[(0, Shared)]).can_grant(&writer));
        assert!(key_with_holders(&[]).can_grant(&writer));
    }

    #[test]
    fn nobody_barges_past_a_waiter_even_when_compatible() {
        // A holds k1 shared, B waits X: C's shared request must queue.
        let mut waiters = Slab::new();
        let mut key = key_with_holders(&[(0, Shared)]);
        wait(&mut key, &mut waiters, 1);
        let mut tokens = 1;
        assert!(matches!(
            key.take_at_once(2, Shared, &mut tokens, &mut Now::from(Instant::now())),
            Attempt::MustWait { conversion: false }
        ));
        // A re-request of what A holds is granted at once, behind B or not.
        assert!(matches!(
            key.take_at_once(0, Shared, &mut tokens, &mut Now::from(Instant::now())),
            Attempt::AlreadyHeld(FencingToken(1))
        ));
    }

    #[test]
    fn the_only_shared_holder_upgrades_at_once_with_a_new_token() {
        let mut key = key_with_holders(&[(0, Shared)]);
        let mut tokens = 5;
        assert!(matches!(
            key.take_at_once(0, Exclusive, &mut tokens, &mut Now::from(Instant::now())),
            Attempt::Upgraded {
                token: FencingToken(6),
                old: FencingToken(1)
            }
        ));
        assert!(key.held_exclusive());
    }
}
