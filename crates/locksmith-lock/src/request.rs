//! One request in flight: the keys it asks for (sorted, deduplicated), how far it got, where it
//! is in its life, and the undo log that makes it all-or-nothing.
//!
//! A request takes its keys one by one in key order. Each key it gets is recorded with how it got
//! it (already held, newly acquired, upgraded from shared), so that a failure can put back exactly
//! what the session held before (rule 4) and a success can tell the caller what it added
//! ([`Taken`]).

use std::mem;

use crate::error::LockError;
use crate::types::{FencingToken, Grant, Key, LockMode, Taken};
use crate::{KeySlot, WaiterSlot};

/// A multi-key acquisition in progress.
pub(crate) struct Request {
    /// Keys to acquire, sorted and deduplicated.
    pub keys: Vec<Key>,
    /// The mode asked for every key.
    pub mode: LockMode,
    /// Index in `keys` of the next key to take.
    pub next: usize,
    /// Tokens of the keys taken so far, in key order: the grant's `tokens`.
    tokens: Vec<(Key, FencingToken)>,
    /// Keys this request acquired that the session did not hold before: released on rollback.
    acquired: Vec<Key>,
    /// Keys this request upgraded from shared, with the shared token: restored on rollback.
    upgraded: Vec<(Key, FencingToken)>,
    /// Where the request is in its life.
    pub phase: Phase,
}

/// Where a request is in its life.
pub(crate) enum Phase {
    /// Being advanced by the current call (or granted its key and about to continue).
    Running,
    /// Queued on `key`, as the queue entry `waiter`.
    Waiting { key: KeySlot, waiter: WaiterSlot },
    /// Concluded while its caller was waiting; the caller collects the outcome. A granted request
    /// keeps its undo log until then, so a caller that went away in between can still be rolled
    /// back.
    Finished(Result<Grant, LockError>),
}

/// What a rollback must put back: the undo log, emptied out of the request.
pub(crate) struct Undo {
    /// The key and queue entry to leave, if the request was waiting.
    pub waiting: Option<(KeySlot, WaiterSlot)>,
    /// Keys to release, in the order they were acquired (key order).
    pub acquired: Vec<Key>,
    /// Keys to turn back to shared with their old token, in key order.
    pub upgraded: Vec<(Key, FencingToken)>,
}

impl Request {
    /// A request for `keys` (already sorted and deduplicated) in `mode`, at its first key.
    pub fn new(keys: Vec<Key>, mode: LockMode) -> Self {
        Request {
            keys,
            mode,
            next: 0,
            tokens: Vec::new(),
            acquired: Vec::new(),
            upgraded: Vec::new(),
            phase: Phase::Running,
        }
    }

    /// The next key to take, or `None` when every key is taken.
    pub fn next_key(&self) -> Option<&Key> {
        self.keys.get(self.next)
    }

    /// The next key was already held in the requested mode or a stronger one: nothing to undo.
    pub fn took_held(&mut self, key: Key, token: FencingToken) {
        self.took(key, token);
    }

    /// The next key was newly acquired.
    pub fn took_acquired(&mut self, key: Key, token: FencingToken) {
        self.acquired.push(key.clone());
        self.took(key, token);
    }

    /// The next key, held shared under `old`, was upgraded to exclusive under `token`.
    pub fn took_upgraded(&mut self, key: Key, token: FencingToken, old: FencingToken) {
        self.upgraded.push((key.clone(), old));
        self.took(key, token);
    }

    fn took(&mut self, key: Key, token: FencingToken) {
        self.tokens.push((key, token));
        self.next += 1;
        self.phase = Phase::Running;
    }

    /// Has the request concluded with an error (so it holds nothing that needs undoing)?
    pub fn has_failed(&self) -> bool {
        matches!(self.phase, Phase::Finished(Err(_)))
    }

    /// The grant of a request that took every key, consuming it.
    pub fn into_grant(self) -> Grant {
        Grant {
            tokens: self.tokens,
            taken: Taken {
                acquired: self.acquired,
                upgraded: self.upgraded.into_iter().map(|(key, _)| key).collect(),
            },
        }
    }

    /// The grant of a request that took every key while its caller waited. The undo log stays
    /// until the caller collects the grant (see [`Phase::Finished`]).
    pub fn grant_keeping_undo(&mut self) -> Grant {
        Grant {
            tokens: mem::take(&mut self.tokens),
            taken: Taken {
                acquired: self.acquired.clone(),
                upgraded: self.upgraded.iter().map(|(key, _)| key.clone()).collect(),
            },
        }
    }

    /// Empties the undo log and puts the request back at its first key, `Running`.
    pub fn take_undo(&mut self) -> Undo {
        let waiting = match mem::replace(&mut self.phase, Phase::Running) {
            Phase::Waiting { key, waiter } => Some((key, waiter)),
            _ => None,
        };
        self.tokens.clear();
        self.next = 0;
        Undo {
            waiting,
            acquired: mem::take(&mut self.acquired),
            upgraded: mem::take(&mut self.upgraded),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> Key {
        Key::from(name)
    }

    #[test]
    fn a_grant_lists_every_key_but_takes_only_what_was_added() {
        // k1 already held, k2 acquired, k3 upgraded from shared token 3.
        let mut request = Request::new(vec![key("k1"), key("k2"), key("k3")], LockMode::Exclusive);
        request.took_held(key("k1"), FencingToken(1));
        request.took_acquired(key("k2"), FencingToken(7));
        request.took_upgraded(key("k3"), FencingToken(8), FencingToken(3));
        assert_eq!(request.next_key(), None);
        let grant = request.into_grant();
        assert_eq!(
            grant.tokens,
            vec![
                (key("k1"), FencingToken(1)),
                (key("k2"), FencingToken(7)),
                (key("k3"), FencingToken(8))
            ]
        );
        assert_eq!(grant.taken.acquired, vec![key("k2")]);
        assert_eq!(grant.taken.upgraded, vec![key("k3")]);
    }

    #[test]
    fn a_grant_made_while_the_caller_waited_keeps_the_undo_log() {
        let mut request = Request::new(vec![key("k1"), key("k2")], LockMode::Exclusive);
        request.took_acquired(key("k1"), FencingToken(4));
        request.took_upgraded(key("k2"), FencingToken(5), FencingToken(2));
        let grant = request.grant_keeping_undo();
        assert_eq!(grant.taken.acquired, vec![key("k1")]);
        let undo = request.take_undo();
        assert_eq!(undo.acquired, vec![key("k1")]);
        assert_eq!(undo.upgraded, vec![(key("k2"), FencingToken(2))]);
        assert_eq!(request.next_key(), Some(&key("k1")));
    }

    #[test]
    fn undo_of_a_waiting_request_names_its_queue_entry_and_restarts_it() {
        let mut request = Request::new(vec![key("k1"), key("k2")], LockMode::Shared);
        request.took_acquired(key("k1"), FencingToken(4));
        request.phase = Phase::Waiting { key: 3, waiter: 9 };
        let undo = request.take_undo();
        assert_eq!(undo.waiting, Some((3, 9)));
        assert_eq!(undo.acquired, vec![key("k1")]);
        assert!(matches!(request.phase, Phase::Running));
        assert_eq!(request.next, 0);
    }
}
