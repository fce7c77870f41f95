//! Scenario tests for every lock rule of `docs/semantics.md`, against the public `LockManager` API
//! (the pure `LockTable` has its own literal tests in `crates/locksmith-lock`). Each test is named
//! after the rule it checks; the document names the tests.
//!
//! Waiting is observed without sleeps. An `acquire` future is polled by hand ([`poll_once`]): one
//! poll runs its synchronous part, so afterwards the request is either decided or queued in the
//! table, and nothing about it changes until another call on the manager or the next poll. A
//! request that should be decided by another session's call is polled again after that call and
//! must then be ready. Deadlines are real (`tokio`'s `test-util` clock is not enabled in this
//! crate) but short, and a request can only time out when it is polled, so the state between two
//! polls is exact; the wait for a deadline is itself bounded by `tokio::time::timeout`.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use common::{
    holders_of, idle_waiters, is_queued, key, keys, manager, poll_once, queue_of, sorted,
    waits_for_of, yield_until,
};
use locksmith::lock::{
    FencingToken, Grant, Key, LockError, LockManager, LockManagerConfig, LockMode, Session,
    SessionId,
};
use tokio::time::Instant;
use LockMode::{Exclusive as X, Shared as S};

// ----- helpers ------------------------------------------------------------------------------

/// An `acquire` in progress, polled by hand.
type Acquire<'a> = Pin<Box<dyn Future<Output = Result<Grant, LockError>> + 'a>>;

/// Creates (without polling) a request of `session` for `names` in `mode`.
fn start<'a>(
    manager: &'a LockManager,
    session: &'a Session,
    names: &[&str],
    mode: LockMode,
    deadline: Option<Instant>,
) -> Acquire<'a> {
    let keys = keys(names);
    Box::pin(async move { manager.acquire(session, &keys, mode, deadline).await })
}

/// A request (no deadline) that must wait: polls it once and checks it is still pending.
fn waiting<'a>(
    manager: &'a LockManager,
    session: &'a Session,
    names: &[&str],
    mode: LockMode,
) -> Acquire<'a> {
    waiting_until(manager, session, names, mode, None)
}

/// A request with a deadline that must wait.
fn waiting_until<'a>(
    manager: &'a LockManager,
    session: &'a Session,
    names: &[&str],
    mode: LockMode,
    deadline: Option<Instant>,
) -> Acquire<'a> {
    let mut request = start(manager, session, names, mode, deadline);
    if let Some(outcome) = poll_once(&mut request) {
        panic!("expected {names:?} in {mode:?} to wait, got {outcome:?}");
    }
    request
}

/// A request (no deadline) that must be decided at once, without waiting.
fn at_once(
    manager: &LockManager,
    session: &Session,
    names: &[&str],
    mode: LockMode,
) -> Result<Grant, LockError> {
    let mut request = start(manager, session, names, mode, None);
    poll_once(&mut request)
        .unwrap_or_else(|| panic!("expected {names:?} in {mode:?} to be decided at once"))
}

/// A request that must be granted at once.
fn granted(manager: &LockManager, session: &Session, names: &[&str], mode: LockMode) -> Grant {
    at_once(manager, session, names, mode)
        .unwrap_or_else(|e| panic!("expected {names:?} in {mode:?} to be granted, got {e}"))
}

/// A try-lock: a request whose deadline is now.
fn try_lock(
    manager: &LockManager,
    session: &Session,
    names: &[&str],
    mode: LockMode,
) -> Result<Grant, LockError> {
    let mut request = start(manager, session, names, mode, Some(Instant::now()));
    poll_once(&mut request).expect("a try-lock never waits")
}

/// The outcome of a waiting request that must have been decided by now.
fn decided(request: &mut Acquire<'_>) -> Result<Grant, LockError> {
    poll_once(request).expect("expected the waiting request to be decided by now")
}

/// Asserts that a waiting request is still waiting.
fn assert_waiting(request: &mut Acquire<'_>, what: &str) {
    if let Some(outcome) = poll_once(request) {
        panic!("expected {what} to be still waiting, got {outcome:?}");
    }
}

/// Awaits a waiting request until it concludes (e.g. at its deadline), bounded.
async fn concluded(request: &mut Acquire<'_>) -> Result<Grant, LockError> {
    tokio::time::timeout(Duration::from_secs(10), request)
        .await
        .expect("the request concluded within 10 s")
}

/// A deadline `ms` milliseconds from now.
fn in_ms(ms: u64) -> Option<Instant> {
    Some(Instant::now() + Duration::from_millis(ms))
}

/// The token of `name` in a grant.
fn token(grant: &Grant, name: &str) -> FencingToken {
    grant.token(&key(name)).expect("the key is in the grant")
}

/// The cycle of a `Deadlock` error as `(session, key)` pairs.
fn cycle(error: LockError) -> Vec<(SessionId, Key)> {
    match error {
        LockError::Deadlock { cycle } => cycle
            .into_iter()
            .map(|m| (m.session, m.waiting_for_key))
            .collect(),
        other => panic!("expected a deadlock, got {other:?}"),
    }
}

/// Asserts that the error is a timeout on `name`.
fn assert_timeout(outcome: Result<Grant, LockError>, name: &str) {
    match outcome {
        Err(LockError::Timeout { key: k }) => assert_eq!(k, key(name)),
        other => panic!("expected a timeout on {name}, got {other:?}"),
    }
}

/// Asserts the rule-6 invariant on the manager's current snapshot.
fn assert_no_idle_waiter(manager: &LockManager) {
    let snapshot = manager.snapshot();
    assert_eq!(idle_waiters(&snapshot), vec![], "{snapshot:#?}");
}

fn held(manager: &LockManager, session: &Session, name: &str) -> Option<(LockMode, FencingToken)> {
    manager.held_mode(session, &key(name))
}

// ----- rule 1: modes ------------------------------------------------------------------------

#[tokio::test]
async fn shared_locks_are_compatible_with_each_other() {
    let m = manager();
    let (a, b, c) = (m.open_session(), m.open_session(), m.open_session());
    granted(&m, &a, &["k1"], S);
    granted(&m, &b, &["k1"], S);
    granted(&m, &c, &["k1"], S);
    let snapshot = m.snapshot();
    assert_eq!(
        holders_of(&snapshot, &key("k1")),
        vec![(a.id(), S), (b.id(), S), (c.id(), S)]
    );
    assert!(snapshot.waits_for.is_empty());
}

#[tokio::test]
async fn exclusive_lock_is_compatible_with_nothing() {
    let m = manager();
    let (a, b, c, d, e) = (
        m.open_session(),
        m.open_session(),
        m.open_session(),
        m.open_session(),
        m.open_session(),
    );
    // X held: both S and X wait.
    granted(&m, &a, &["k1"], X);
    let _b = waiting(&m, &b, &["k1"], S);
    let _c = waiting(&m, &c, &["k1"], X);
    // S held: X waits.
    granted(&m, &d, &["k2"], S);
    let _e = waiting(&m, &e, &["k2"], X);
    let snapshot = m.snapshot();
    assert_eq!(holders_of(&snapshot, &key("k1")), vec![(a.id(), X)]);
    assert_eq!(holders_of(&snapshot, &key("k2")), vec![(d.id(), S)]);
}

// ----- rule 2: holders and a FIFO queue, no barging -----------------------------------------

#[tokio::test]
async fn queued_writer_blocks_later_reader() {
    let m = manager();
    let (a, b, c) = (m.open_session(), m.open_session(), m.open_session());
    granted(&m, &a, &["k1"], S);
    let mut b_x = waiting(&m, &b, &["k1"], X);
    // C's S is compatible with A's S, but B is queued ahead: C must not barge.
    let mut c_s = waiting(&m, &c, &["k1"], S);
    assert_eq!(
        queue_of(&m.snapshot(), &key("k1")),
        vec![(b.id(), X), (c.id(), S)]
    );
    m.release(&a, &keys(&["k1"])).unwrap();
    decided(&mut b_x).unwrap();
    assert_waiting(&mut c_s, "the reader behind the writer");
    m.release(&b, &keys(&["k1"])).unwrap();
    decided(&mut c_s).unwrap();
    assert_eq!(held(&m, &c, "k1").map(|h| h.0), Some(S));
}

#[tokio::test]
async fn waiters_are_granted_in_fifo_order() {
    let m = manager();
    let sessions: Vec<Session> = (0..4).map(|_| m.open_session()).collect();
    granted(&m, &sessions[0], &["k1"], X);
    let mut requests: Vec<Acquire<'_>> = sessions[1..]
        .iter()
        .map(|s| waiting(&m, s, &["k1"], X))
        .collect();
    for (i, session) in sessions.iter().enumerate().take(3) {
        m.release(session, &keys(&["k1"])).unwrap();
        decided(&mut requests[i]).unwrap();
        for later in &mut requests[i + 1..] {
            assert_waiting(later, "a waiter queued later");
        }
    }
}

#[tokio::test]
async fn shared_waiters_at_the_head_are_granted_together() {
    let m = manager();
    let s: Vec<Session> = (0..5).map(|_| m.open_session()).collect();
    granted(&m, &s[0], &["k1"], X);
    let mut r1 = waiting(&m, &s[1], &["k1"], S);
    let mut r2 = waiting(&m, &s[2], &["k1"], S);
    let mut w3 = waiting(&m, &s[3], &["k1"], X);
    let mut r4 = waiting(&m, &s[4], &["k1"], S);
    m.release(&s[0], &keys(&["k1"])).unwrap();
    decided(&mut r1).unwrap();
    decided(&mut r2).unwrap();
    // The grant stops at the first waiter that conflicts; the reader behind it keeps its place.
    assert_waiting(&mut w3, "the writer");
    assert_waiting(&mut r4, "the reader behind the writer");
    assert_no_idle_waiter(&m);
}

#[tokio::test]
async fn stream_of_readers_cannot_starve_a_waiting_writer() {
    let m = manager();
    let a = m.open_session();
    let w = m.open_session();
    let readers: Vec<Session> = (0..5).map(|_| m.open_session()).collect();
    granted(&m, &a, &["k1"], S);
    let mut writer = waiting(&m, &w, &["k1"], X);
    let mut reads: Vec<Acquire<'_>> = readers.iter().map(|r| waiting(&m, r, &["k1"], S)).collect();
    m.release(&a, &keys(&["k1"])).unwrap();
    decided(&mut writer).unwrap();
    for read in &mut reads {
        assert_waiting(read, "a reader behind the writer");
    }
    m.release(&w, &keys(&["k1"])).unwrap();
    for read in &mut reads {
        decided(read).unwrap();
    }
    assert_eq!(holders_of(&m.snapshot(), &key("k1")).len(), 5);
}

// ----- rule 3: re-requests, weaker modes, upgrades ------------------------------------------

#[tokio::test]
async fn reacquiring_a_held_mode_changes_nothing() {
    let m = manager();
    let a = m.open_session();
    let first_s = token(&granted(&m, &a, &["k1"], S), "k1");
    let first_x = token(&granted(&m, &a, &["k2"], X), "k2");
    let before = m.snapshot();
    assert_eq!(token(&granted(&m, &a, &["k1"], S), "k1"), first_s);
    assert_eq!(token(&granted(&m, &a, &["k2"], X), "k2"), first_x);
    assert_eq!(m.snapshot(), before);
    // No counting: one release frees the key.
    m.release(&a, &keys(&["k1", "k2"])).unwrap();
    assert!(m.held_keys(&a).is_empty());
    assert_eq!(
        m.release(&a, &keys(&["k1"])),
        Err(LockError::NotHeld {
            keys: keys(&["k1"])
        })
    );
}

#[tokio::test]
async fn reacquiring_a_held_mode_is_granted_even_behind_a_queue() {
    let m = manager();
    let (a, b) = (m.open_session(), m.open_session());
    let first = token(&granted(&m, &a, &["k1"], S), "k1");
    let mut b_x = waiting(&m, &b, &["k1"], X);
    assert_eq!(token(&granted(&m, &a, &["k1"], S), "k1"), first);
    assert_waiting(&mut b_x, "the writer");
}

#[tokio::test]
async fn requesting_shared_while_holding_exclusive_keeps_the_exclusive_lock() {
    let m = manager();
    let (a, b) = (m.open_session(), m.open_session());
    let first = token(&granted(&m, &a, &["k1"], X), "k1");
    // A weaker mode: granted at once with the existing token. There is no downgrade.
    assert_eq!(token(&granted(&m, &a, &["k1"], S), "k1"), first);
    assert_eq!(held(&m, &a, "k1"), Some((X, first)));
    let _b_s = waiting(&m, &b, &["k1"], S);
}

#[tokio::test]
async fn downgrading_by_release_and_reacquire_goes_behind_the_queue() {
    let m = manager();
    let (a, b) = (m.open_session(), m.open_session());
    granted(&m, &a, &["k1"], X);
    let mut b_x = waiting(&m, &b, &["k1"], X);
    m.release(&a, &keys(&["k1"])).unwrap();
    decided(&mut b_x).unwrap();
    let _a_s = waiting(&m, &a, &["k1"], S);
    assert!(m.held_keys(&a).is_empty());
}

#[tokio::test]
async fn downgrade_turns_exclusive_into_shared_keeping_the_token_and_grants_readers_at_the_head() {
    let m = manager();
    let s: Vec<Session> = (0..5).map(|_| m.open_session()).collect();
    let id = |i: usize| s[i].id();
    let exclusive = token(&granted(&m, &s[0], &["k1"], X), "k1");
    let mut b_s = waiting(&m, &s[1], &["k1"], S);
    let mut c_s = waiting(&m, &s[2], &["k1"], S);
    let mut d_x = waiting(&m, &s[3], &["k1"], X);
    let mut e_s = waiting(&m, &s[4], &["k1"], S);
    m.downgrade(&s[0], &keys(&["k1"])).unwrap();
    assert_eq!(held(&m, &s[0], "k1"), Some((S, exclusive)));
    // The readers at the head join the downgraded holder; FIFO still holds behind the writer.
    decided(&mut b_s).unwrap();
    decided(&mut c_s).unwrap();
    assert_waiting(&mut d_x, "the writer");
    assert_waiting(&mut e_s, "the reader behind the writer");
    let snapshot = m.snapshot();
    assert_eq!(
        waits_for_of(&snapshot, id(3)),
        sorted(vec![id(0), id(1), id(2)])
    );
    assert_eq!(waits_for_of(&snapshot, id(4)), vec![id(3)]);
}

#[tokio::test]
async fn downgrade_of_a_shared_or_unheld_key_changes_nothing() {
    let m = manager();
    let (a, b) = (m.open_session(), m.open_session());
    granted(&m, &a, &["k1"], X);
    granted(&m, &a, &["k2"], S);
    granted(&m, &b, &["k3"], X);
    let before = m.snapshot();
    m.downgrade(&a, &keys(&["k2"])).unwrap();
    assert_eq!(m.snapshot(), before);
    // Validated first, like a release: a key not held changes nothing, not even the others.
    assert_eq!(
        m.downgrade(&a, &keys(&["k1", "k3"])),
        Err(LockError::NotHeld {
            keys: keys(&["k3"])
        })
    );
    assert_eq!(m.snapshot(), before);
}

#[tokio::test]
async fn downgrade_while_own_request_is_in_flight_is_invalid() {
    let m = manager();
    let (a, b) = (m.open_session(), m.open_session());
    granted(&m, &a, &["k1"], X);
    granted(&m, &b, &["k2"], X);
    let _a_k2 = waiting(&m, &a, &["k2"], X);
    let error = m.downgrade(&a, &keys(&["k1"])).unwrap_err();
    assert_eq!(error.code(), "invalid_request");
    assert_eq!(held(&m, &a, "k1").map(|h| h.0), Some(X));
}

#[tokio::test]
async fn upgrade_by_sole_holder_is_granted_at_once() {
    let m = manager();
    let (a, b, c) = (m.open_session(), m.open_session(), m.open_session());
    let shared = token(&granted(&m, &a, &["k1"], S), "k1");
    // Even with others queued: a sole holder's conversion does not wait.
    let mut b_x = waiting(&m, &b, &["k1"], X);
    let _c_s = waiting(&m, &c, &["k1"], S);
    let exclusive = token(&granted(&m, &a, &["k1"], X), "k1");
    assert!(
        exclusive > shared,
        "an upgrade is a new grant with a new token"
    );
    assert_eq!(held(&m, &a, "k1"), Some((X, exclusive)));
    assert_waiting(&mut b_x, "the writer");
    // The reader queued behind the writer now also conflicts with the holder.
    let snapshot = m.snapshot();
    assert_eq!(
        waits_for_of(&snapshot, c.id()),
        sorted(vec![a.id(), b.id()])
    );
}

#[tokio::test]
async fn upgrade_waits_at_head_of_queue_ahead_of_new_requests() {
    let m = manager();
    let (a, b, c) = (m.open_session(), m.open_session(), m.open_session());
    granted(&m, &a, &["k1"], S);
    granted(&m, &b, &["k1"], S);
    let mut c_x = waiting(&m, &c, &["k1"], X);
    let mut a_up = waiting(&m, &a, &["k1"], X);
    let snapshot = m.snapshot();
    let queue = &snapshot.key(&key("k1")).unwrap().queue;
    assert_eq!(queue[0].session, a.id());
    assert!(queue[0].upgrade);
    assert_eq!(queue[1].session, c.id());
    assert!(!queue[1].upgrade);
    m.release(&b, &keys(&["k1"])).unwrap();
    decided(&mut a_up).unwrap();
    assert_eq!(held(&m, &a, "k1").map(|h| h.0), Some(X));
    assert_waiting(&mut c_x, "the new request behind the conversion");
    m.release(&a, &keys(&["k1"])).unwrap();
    decided(&mut c_x).unwrap();
}

#[tokio::test]
async fn upgrade_by_two_readers_is_a_deadlock() {
    let m = manager();
    let (a, b) = (m.open_session(), m.open_session());
    granted(&m, &a, &["k1"], S);
    let b_token = token(&granted(&m, &b, &["k1"], S), "k1");
    let mut a_up = waiting(&m, &a, &["k1"], X);
    let error = at_once(&m, &b, &["k1"], X).unwrap_err();
    assert_eq!(error.code(), "deadlock");
    assert_eq!(cycle(error), vec![(b.id(), key("k1")), (a.id(), key("k1"))]);
    // The victim keeps its shared lock as it was; the other upgrade keeps waiting.
    assert_eq!(held(&m, &b, "k1"), Some((S, b_token)));
    assert_waiting(&mut a_up, "the surviving upgrade");
    m.release(&b, &keys(&["k1"])).unwrap();
    decided(&mut a_up).unwrap();
    assert_eq!(held(&m, &a, "k1").map(|h| h.0), Some(X));
}

#[tokio::test]
async fn upgrade_does_not_wait_for_its_own_shared_lock() {
    let m = manager();
    let (a, b) = (m.open_session(), m.open_session());
    granted(&m, &a, &["k1"], S);
    granted(&m, &b, &["k1"], S);
    let mut a_up = waiting(&m, &a, &["k1"], X);
    assert_eq!(m.snapshot().waits_for, vec![(a.id(), b.id())]);
    m.release(&b, &keys(&["k1"])).unwrap();
    decided(&mut a_up).unwrap();
}

// ----- rule 4: sorted, all-or-nothing multi-key requests ------------------------------------

#[tokio::test]
async fn multi_key_request_is_deduplicated_and_granted_in_sorted_order() {
    let m = manager();
    let a = m.open_session();
    let grant = granted(&m, &a, &["k3", "k1", "k2", "k1"], X);
    let granted_keys: Vec<Key> = grant.tokens.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(granted_keys, keys(&["k1", "k2", "k3"]));
    // Taken one by one in key order, so the tokens increase in key order too.
    assert!(grant.tokens.windows(2).all(|w| w[0].1 < w[1].1));
}

#[tokio::test]
async fn multi_key_request_waits_on_its_keys_one_by_one_in_sorted_order() {
    let m = manager();
    let (a, b, c) = (m.open_session(), m.open_session(), m.open_session());
    granted(&m, &b, &["k1"], X);
    granted(&m, &c, &["k3"], X);
    let mut a_all = waiting(&m, &a, &["k3", "k2", "k1"], X);
    // Waits on the first key in sorted order, holding nothing yet.
    assert!(is_queued(&m, a.id(), &key("k1")));
    assert!(!is_queued(&m, a.id(), &key("k3")));
    assert!(m.held_keys(&a).is_empty());
    m.release(&b, &keys(&["k1"])).unwrap();
    // Granted k1, took the free k2 at once, now waits on k3.
    assert_waiting(&mut a_all, "the request on its last key");
    assert_eq!(m.held_keys(&a), keys(&["k1", "k2"]));
    assert!(is_queued(&m, a.id(), &key("k3")));
    m.release(&c, &keys(&["k3"])).unwrap();
    let grant = decided(&mut a_all).unwrap();
    assert_eq!(grant.tokens.len(), 3);
    assert_eq!(m.held_keys(&a), keys(&["k1", "k2", "k3"]));
}

#[tokio::test]
async fn three_key_request_failing_on_last_key_releases_the_first_two() {
    let m = manager();
    let (a, b, c) = (m.open_session(), m.open_session(), m.open_session());
    granted(&m, &b, &["k3"], X);
    let mut a_all = waiting_until(&m, &a, &["k1", "k2", "k3"], X, in_ms(20));
    assert_eq!(m.held_keys(&a), keys(&["k1", "k2"]));
    assert_timeout(concluded(&mut a_all).await, "k3");
    assert!(m.held_keys(&a).is_empty());
    assert!(!is_queued(&m, a.id(), &key("k3")));
    // The first two keys are free again.
    granted(&m, &c, &["k1", "k2"], X);
}

#[tokio::test]
async fn three_key_request_that_deadlocks_on_last_key_releases_the_first_two() {
    let m = manager();
    let (a, b) = (m.open_session(), m.open_session());
    let k0 = token(&granted(&m, &a, &["k0"], X), "k0");
    granted(&m, &b, &["k3"], X);
    let mut b_k0 = waiting(&m, &b, &["k0"], X);
    let error = at_once(&m, &a, &["k1", "k2", "k3"], X).unwrap_err();
    assert_eq!(cycle(error), vec![(a.id(), key("k3")), (b.id(), key("k0"))]);
    // What A held before the request is exactly as it was; what the request took is released.
    assert_eq!(m.held_keys(&a), keys(&["k0"]));
    assert_eq!(held(&m, &a, "k0"), Some((X, k0)));
    assert!(m.snapshot().key(&key("k1")).is_none());
    assert!(m.snapshot().key(&key("k2")).is_none());
    assert_waiting(&mut b_k0, "the survivor");
}

#[tokio::test]
async fn failed_upgrade_reverts_to_shared_with_old_token() {
    let m = manager();
    let (a, c) = (m.open_session(), m.open_session());
    let k1 = token(&granted(&m, &a, &["k1"], S), "k1");
    let k2 = token(&granted(&m, &a, &["k2"], S), "k2");
    granted(&m, &c, &["k2"], S);
    let mut a_up = waiting_until(&m, &a, &["k1", "k2"], X, in_ms(20));
    // k1 was upgraded at once (A is its only holder); k2 waits as a conversion.
    let upgraded = held(&m, &a, "k1").unwrap();
    assert_eq!(upgraded.0, X);
    assert!(upgraded.1 > k1);
    assert_timeout(concluded(&mut a_up).await, "k2");
    assert_eq!(held(&m, &a, "k1"), Some((S, k1)));
    assert_eq!(held(&m, &a, "k2"), Some((S, k2)));
    assert!(m.snapshot().waits_for.is_empty());
}

#[tokio::test]
async fn failed_request_leaves_the_locks_held_before_it_as_they_were() {
    let m = manager();
    let (a, b) = (m.open_session(), m.open_session());
    let k1 = token(&granted(&m, &a, &["k1"], X), "k1");
    let k2 = token(&granted(&m, &a, &["k2"], S), "k2");
    granted(&m, &b, &["k3"], X);
    // k1: already held; k2: upgraded at once; k3: busy, and a try-lock cannot wait.
    assert_timeout(try_lock(&m, &a, &["k1", "k2", "k3"], X), "k3");
    assert_eq!(held(&m, &a, "k1"), Some((X, k1)));
    assert_eq!(held(&m, &a, "k2"), Some((S, k2)));
    assert_eq!(m.held_keys(&a), keys(&["k1", "k2"]));
}

// ----- rule 5: waits-for edges and the victim -----------------------------------------------

#[tokio::test]
async fn waits_for_edges_go_to_conflicting_holders_and_waiters_ahead_only() {
    let m = manager();
    let s: Vec<Session> = (0..5).map(|_| m.open_session()).collect();
    let id = |i: usize| s[i].id();
    granted(&m, &s[0], &["k1"], S);
    granted(&m, &s[1], &["k1"], S);
    let _c = waiting(&m, &s[2], &["k1"], X);
    let _d = waiting(&m, &s[3], &["k1"], S);
    let _e = waiting(&m, &s[4], &["k1"], X);
    let snapshot = m.snapshot();
    // C (X): both shared holders. Nothing to the waiters behind it.
    assert_eq!(waits_for_of(&snapshot, id(2)), sorted(vec![id(0), id(1)]));
    // D (S): not the compatible holders; the conflicting writer ahead.
    assert_eq!(waits_for_of(&snapshot, id(3)), vec![id(2)]);
    // E (X): every holder and every waiter ahead.
    assert_eq!(
        waits_for_of(&snapshot, id(4)),
        sorted(vec![id(0), id(1), id(2), id(3)])
    );
    assert!(waits_for_of(&snapshot, id(0)).is_empty());
    assert!(snapshot.waits_for.iter().all(|(from, to)| from != to));
}

#[tokio::test]
async fn deadlock_error_names_every_member_of_the_cycle_with_the_key_it_waits_on() {
    let m = manager();
    let (a, b, c) = (m.open_session(), m.open_session(), m.open_session());
    granted(&m, &a, &["k1"], X);
    granted(&m, &b, &["k2"], X);
    granted(&m, &c, &["k3"], X);
    let _a = waiting(&m, &a, &["k2"], X);
    let _b = waiting(&m, &b, &["k3"], X);
    let error = at_once(&m, &c, &["k1"], X).unwrap_err();
    assert_eq!(error.code(), "deadlock");
    // Waits-for order, starting with the requester (the victim).
    assert_eq!(
        cycle(error),
        vec![
            (c.id(), key("k1")),
            (a.id(), key("k2")),
            (b.id(), key("k3"))
        ]
    );
}

#[tokio::test]
async fn deadlock_is_reported_when_the_request_would_wait_not_after_a_delay() {
    let m = manager();
    let (a, b) = (m.open_session(), m.open_session());
    granted(&m, &a, &["k1"], X);
    granted(&m, &b, &["k2"], X);
    let _a = waiting(&m, &a, &["k2"], X);
    // Decided on the first poll: no timer, no detection delay.
    let mut request = start(&m, &b, &["k1"], X, None);
    let outcome = poll_once(&mut request).expect("decided on the first poll");
    assert_eq!(outcome.unwrap_err().code(), "deadlock");
}

#[tokio::test]
async fn survivors_of_a_cycle_keep_waiting_and_are_granted_when_the_victim_releases() {
    let m = manager();
    let (a, b, c) = (m.open_session(), m.open_session(), m.open_session());
    granted(&m, &a, &["k1"], X);
    granted(&m, &b, &["k2"], X);
    granted(&m, &c, &["k3"], X);
    let mut a_k2 = waiting(&m, &a, &["k2"], X);
    let mut b_k3 = waiting(&m, &b, &["k3"], X);
    at_once(&m, &c, &["k1"], X).unwrap_err();
    // The victim left the queue and the graph; the survivors still wait.
    let snapshot = m.snapshot();
    assert!(!is_queued(&m, c.id(), &key("k1")));
    assert!(waits_for_of(&snapshot, c.id()).is_empty());
    assert_eq!(
        snapshot.waits_for,
        sorted_edges(vec![(a.id(), b.id()), (b.id(), c.id())])
    );
    assert_waiting(&mut a_k2, "A");
    assert_waiting(&mut b_k3, "B");
    m.release_all(&c);
    decided(&mut b_k3).unwrap();
    assert_waiting(&mut a_k2, "A");
    m.release_all(&b);
    decided(&mut a_k2).unwrap();
}

fn sorted_edges(mut edges: Vec<(SessionId, SessionId)>) -> Vec<(SessionId, SessionId)> {
    edges.sort_unstable();
    edges
}

#[tokio::test]
async fn continuation_that_would_close_a_cycle_is_the_victim() {
    let m = manager();
    let (a, b, c) = (m.open_session(), m.open_session(), m.open_session());
    granted(&m, &a, &["k1"], X);
    granted(&m, &c, &["k2"], X);
    // B waits for k1 on its way to k2; C queues for k1 behind B.
    let mut b_both = waiting(&m, &b, &["k1", "k2"], X);
    let mut c_k1 = waiting(&m, &c, &["k1"], X);
    // A leaves: B is granted k1 and continues to k2, held by C, which waits for B's k1.
    m.release_all(&a);
    let error = decided(&mut b_both).unwrap_err();
    assert_eq!(cycle(error), vec![(b.id(), key("k2")), (c.id(), key("k1"))]);
    // B's partial grant was rolled back, so C gets k1.
    decided(&mut c_k1).unwrap();
    assert!(m.held_keys(&b).is_empty());
}

// ----- rule 6: the queued-waiter trap, and edges when a waiter leaves -----------------------

#[tokio::test]
async fn reader_behind_queued_writer_closes_cycle_without_holder_edge() {
    let m = manager();
    let (a, b, c) = (m.open_session(), m.open_session(), m.open_session());
    granted(&m, &a, &["k1"], S);
    let mut b_x = waiting(&m, &b, &["k1"], X);
    granted(&m, &c, &["k2"], X);
    // C's S is compatible with holder A, but C is queued behind writer B: C waits for B only.
    let mut c_s = waiting(&m, &c, &["k1"], S);
    assert_eq!(waits_for_of(&m.snapshot(), c.id()), vec![b.id()]);
    // A -> C -> B -> A.
    let error = at_once(&m, &a, &["k2"], S).unwrap_err();
    assert_eq!(
        cycle(error),
        vec![
            (a.id(), key("k2")),
            (c.id(), key("k1")),
            (b.id(), key("k1"))
        ]
    );
    assert_waiting(&mut b_x, "B");
    assert_waiting(&mut c_s, "C");
    m.release_all(&a);
    decided(&mut b_x).unwrap();
    assert_eq!(waits_for_of(&m.snapshot(), c.id()), vec![b.id()]);
    m.release_all(&b);
    decided(&mut c_s).unwrap();
}

#[tokio::test]
async fn reader_behind_queued_writer_waits_for_a_holder_that_upgraded_at_once() {
    let m = manager();
    let (a, b, c) = (m.open_session(), m.open_session(), m.open_session());
    granted(&m, &a, &["k1"], S);
    let _b_x = waiting(&m, &b, &["k1"], X);
    granted(&m, &c, &["k2"], X);
    let _c_s = waiting(&m, &c, &["k1"], S);
    // A, the only holder, upgrades at once: C's S now conflicts with A's X too.
    granted(&m, &a, &["k1"], X);
    assert_eq!(
        waits_for_of(&m.snapshot(), c.id()),
        sorted(vec![a.id(), b.id()])
    );
    let error = at_once(&m, &a, &["k2"], S).unwrap_err();
    assert_eq!(cycle(error)[0], (a.id(), key("k2")));
}

#[tokio::test]
async fn edges_follow_a_waiter_ahead_that_is_granted() {
    let m = manager();
    let (a, b, c) = (m.open_session(), m.open_session(), m.open_session());
    granted(&m, &a, &["k1"], X);
    let mut b_s = waiting(&m, &b, &["k1"], S);
    let _c_x = waiting(&m, &c, &["k1"], X);
    assert_eq!(
        waits_for_of(&m.snapshot(), c.id()),
        sorted(vec![a.id(), b.id()])
    );
    m.release_all(&a);
    decided(&mut b_s).unwrap();
    // B moved from the queue to the holders; C now waits for B the holder, and A is gone.
    assert_eq!(m.snapshot().waits_for, vec![(c.id(), b.id())]);
}

#[tokio::test]
async fn cancelled_waiter_lets_compatible_waiters_behind_be_granted() {
    let m = manager();
    let (a, b, c) = (m.open_session(), m.open_session(), m.open_session());
    granted(&m, &a, &["k1"], S);
    let b_x = waiting(&m, &b, &["k1"], X);
    let mut c_s = waiting(&m, &c, &["k1"], S);
    drop(b_x);
    // Nobody blocks C any more: it is granted by the cancellation itself.
    decided(&mut c_s).unwrap();
    assert_eq!(
        holders_of(&m.snapshot(), &key("k1")),
        vec![(a.id(), S), (c.id(), S)]
    );
    assert!(m.snapshot().waits_for.is_empty());
}

#[tokio::test]
async fn deadlock_victim_leaving_the_queue_recomputes_the_edges_behind_it() {
    let m = manager();
    let (a, b, d) = (m.open_session(), m.open_session(), m.open_session());
    granted(&m, &a, &["k1"], S);
    granted(&m, &b, &["k1"], S);
    let mut a_up = waiting(&m, &a, &["k1"], X);
    // D's S is compatible with both holders but queued behind A's conversion.
    let mut d_s = waiting(&m, &d, &["k1"], S);
    assert_eq!(waits_for_of(&m.snapshot(), d.id()), vec![a.id()]);
    // B's conversion is queued ahead of D, giving D an edge to B, then fails as the victim: D
    // must be left waiting for A only.
    at_once(&m, &b, &["k1"], X).unwrap_err();
    assert_eq!(waits_for_of(&m.snapshot(), d.id()), vec![a.id()]);
    assert_no_idle_waiter(&m);
    m.release_all(&b);
    decided(&mut a_up).unwrap();
    assert_waiting(&mut d_s, "D");
    m.release_all(&a);
    decided(&mut d_s).unwrap();
}

// ----- rule 7: no false positives, exact search ---------------------------------------------

#[tokio::test]
async fn no_false_deadlock_on_a_long_chain() {
    // S0 waits for S1 waits for ... waits for S999: far deeper than any depth limit.
    const N: usize = 1000;
    let m = manager();
    let s: Vec<Session> = (0..N).map(|_| m.open_session()).collect();
    let name = |i: usize| format!("k{i:04}");
    for (i, session) in s.iter().enumerate() {
        granted(&m, session, &[name(i).as_str()], X);
    }
    let mut requests = Vec::new();
    for i in (0..N - 1).rev() {
        requests.push(waiting(&m, &s[i], &[name(i + 1).as_str()], X));
    }
    // One more waiter at the far end of the chain.
    let t = m.open_session();
    let t_request = waiting(&m, &t, &[name(0).as_str()], X);
    assert_eq!(m.snapshot().waits_for.len(), N);
    assert_no_idle_waiter(&m);
    drop(t_request);
    // Closing the chain is a real cycle through all N sessions, and it is found.
    let error = at_once(&m, &s[N - 1], &[name(0).as_str()], X).unwrap_err();
    let members = cycle(error);
    assert_eq!(members.len(), N);
    assert_eq!(members[0], (s[N - 1].id(), key(&name(0))));
    assert_eq!(members[1], (s[0].id(), key(&name(1))));
    for request in &mut requests {
        assert_waiting(request, "a chain member");
    }
}

#[tokio::test]
async fn no_false_deadlock_when_wait_paths_converge() {
    // A -> B, A -> C, B -> D, C -> D, C -> B: many paths, no cycle.
    let m = manager();
    let (a, b, c, d) = (
        m.open_session(),
        m.open_session(),
        m.open_session(),
        m.open_session(),
    );
    granted(&m, &b, &["ka"], S);
    granted(&m, &c, &["ka"], S);
    granted(&m, &d, &["kd"], X);
    let mut b_d = waiting(&m, &b, &["kd"], X);
    let mut c_d = waiting(&m, &c, &["kd"], X);
    let mut a_a = waiting(&m, &a, &["ka"], X);
    assert_eq!(
        waits_for_of(&m.snapshot(), a.id()),
        sorted(vec![b.id(), c.id()])
    );
    m.release_all(&d);
    decided(&mut b_d).unwrap();
    m.release_all(&b);
    decided(&mut c_d).unwrap();
    m.release_all(&c);
    decided(&mut a_a).unwrap();
}

#[tokio::test]
async fn try_lock_never_reports_deadlock() {
    let m = manager();
    let (a, b) = (m.open_session(), m.open_session());
    granted(&m, &a, &["k1"], X);
    granted(&m, &b, &["k2"], X);
    let _a = waiting(&m, &a, &["k2"], X);
    // Waiting would close a cycle, but a try-lock does not wait.
    assert_timeout(try_lock(&m, &b, &["k1"], X), "k1");
    let past = Instant::now() - Duration::from_millis(1);
    let mut request = start(&m, &b, &["k1"], X, Some(past));
    assert_timeout(poll_once(&mut request).expect("never waits"), "k1");
}

#[tokio::test]
async fn no_deadlock_once_a_cycle_member_has_timed_out() {
    let m = manager();
    let (a, b) = (m.open_session(), m.open_session());
    granted(&m, &a, &["k1"], X);
    granted(&m, &b, &["k2"], X);
    let mut a_k2 = waiting_until(&m, &a, &["k2"], X, in_ms(10));
    assert_timeout(concluded(&mut a_k2).await, "k2");
    // The edge A -> B left with A's request: B simply waits.
    let mut b_k1 = waiting(&m, &b, &["k1"], X);
    m.release_all(&a);
    decided(&mut b_k1).unwrap();
}

// ----- rule 8: timeouts and try-lock --------------------------------------------------------

#[tokio::test]
async fn timeout_fails_with_the_key_waited_on_and_leaves_queue_and_graph() {
    let m = manager();
    let (a, b) = (m.open_session(), m.open_session());
    granted(&m, &a, &["k1"], X);
    let mut b_x = waiting_until(&m, &b, &["k1"], X, in_ms(10));
    let outcome = concluded(&mut b_x).await;
    assert_eq!(outcome.as_ref().unwrap_err().code(), "timeout");
    assert_timeout(outcome, "k1");
    let snapshot = m.snapshot();
    assert!(queue_of(&snapshot, &key("k1")).is_empty());
    assert!(snapshot.waits_for.is_empty());
}

#[tokio::test]
async fn timeout_lets_waiters_behind_be_granted() {
    let m = manager();
    let (a, b) = (m.open_session(), m.open_session());
    let c = Arc::new(m.open_session());
    granted(&m, &a, &["k1"], S);
    // The writer is polled by hand, so it cannot time out before the reader is queued.
    let mut writer = waiting_until(&m, &b, &["k1"], X, in_ms(20));
    // The reader is a task on the runtime, woken by the manager as the server's will be.
    let reader = tokio::spawn({
        let (m, c) = (m.clone(), c.clone());
        async move { m.acquire(&c, &keys(&["k1"]), S, None).await }
    });
    yield_until("the reader is queued", 10_000, || {
        is_queued(&m, c.id(), &key("k1"))
    })
    .await;
    assert_timeout(concluded(&mut writer).await, "k1");
    // The reader was blocked by the writer only; the writer's timeout grants it.
    let outcome = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("the reader is granted")
        .expect("the reader task does not panic");
    outcome.unwrap();
    assert_eq!(
        holders_of(&m.snapshot(), &key("k1")),
        vec![(a.id(), S), (c.id(), S)]
    );
}

#[tokio::test]
async fn request_granted_before_its_deadline_keeps_its_grant() {
    let m = manager();
    let (a, b) = (m.open_session(), m.open_session());
    granted(&m, &a, &["k1"], X);
    let deadline = in_ms(20);
    let mut b_x = waiting_until(&m, &b, &["k1"], X, deadline);
    m.release_all(&a);
    // Let the deadline pass (this sleep is the scenario, not a synchronisation), then collect:
    // the grant came first and stands.
    tokio::time::sleep_until(deadline.unwrap()).await;
    decided(&mut b_x).unwrap();
    assert_eq!(held(&m, &b, "k1").map(|h| h.0), Some(X));
}

#[tokio::test]
async fn try_lock_is_granted_at_once_when_the_key_is_free() {
    let m = manager();
    let (a, b) = (m.open_session(), m.open_session());
    try_lock(&m, &a, &["k1", "k2"], S).unwrap();
    try_lock(&m, &b, &["k1"], S).unwrap();
    assert_eq!(m.held_keys(&a), keys(&["k1", "k2"]));
}

#[tokio::test]
async fn try_lock_times_out_at_once_instead_of_waiting() {
    let m = manager();
    let (a, b, c) = (m.open_session(), m.open_session(), m.open_session());
    granted(&m, &a, &["k1"], S);
    assert_timeout(try_lock(&m, &b, &["k1"], X), "k1");
    let _b_x = waiting(&m, &b, &["k1"], X);
    // Compatible with the holder, but a writer is queued: no barging for a try-lock either.
    let before = m.snapshot();
    assert_timeout(try_lock(&m, &c, &["k0", "k1"], S), "k1");
    assert_eq!(m.snapshot(), before, "a try-lock leaves no trace");
}

// ----- rule 9: cancellation safety ----------------------------------------------------------

#[tokio::test]
async fn dropping_a_waiting_acquire_withdraws_it_and_releases_partial_grants() {
    let m = manager();
    let (a, b, c) = (m.open_session(), m.open_session(), m.open_session());
    granted(&m, &b, &["k3"], X);
    let a_all = waiting(&m, &a, &["k1", "k2", "k3"], X);
    assert_eq!(m.held_keys(&a), keys(&["k1", "k2"]));
    drop(a_all);
    assert!(m.held_keys(&a).is_empty());
    let snapshot = m.snapshot();
    assert!(queue_of(&snapshot, &key("k3")).is_empty());
    assert!(snapshot.waits_for.is_empty());
    granted(&m, &c, &["k1", "k2"], X);
    // The session itself is still usable.
    granted(&m, &a, &["k4"], X);
}

#[tokio::test]
async fn dropping_an_acquire_that_was_granted_but_not_collected_releases_the_grant() {
    let m = manager();
    let (a, b, c) = (m.open_session(), m.open_session(), m.open_session());
    granted(&m, &a, &["k1"], X);
    let b_x = waiting(&m, &b, &["k1"], X);
    let mut c_x = waiting(&m, &c, &["k1"], X);
    m.release_all(&a);
    assert_eq!(held(&m, &b, "k1").map(|h| h.0), Some(X));
    // B's caller goes away before it sees the grant: the grant must not leak.
    drop(b_x);
    assert!(m.held_keys(&b).is_empty());
    decided(&mut c_x).unwrap();
}

#[tokio::test]
async fn dropping_a_waiting_upgrade_reverts_it_to_shared() {
    let m = manager();
    let (a, b) = (m.open_session(), m.open_session());
    let shared = token(&granted(&m, &a, &["k1"], S), "k1");
    granted(&m, &b, &["k1"], S);
    let a_up = waiting(&m, &a, &["k1"], X);
    drop(a_up);
    assert_eq!(held(&m, &a, "k1"), Some((S, shared)));
    assert!(m.snapshot().waits_for.is_empty());
}

#[tokio::test]
async fn aborting_the_task_of_a_waiting_acquire_withdraws_it() {
    let m = manager();
    let (a, c) = (m.open_session(), m.open_session());
    let b = Arc::new(m.open_session());
    granted(&m, &a, &["k2"], X);
    let task = tokio::spawn({
        let (m, b) = (m.clone(), b.clone());
        async move { m.acquire(&b, &keys(&["k1", "k2"]), X, None).await }
    });
    yield_until("B is queued", 10_000, || is_queued(&m, b.id(), &key("k2"))).await;
    assert_eq!(m.held_keys(&b), keys(&["k1"]));
    task.abort();
    let joined = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap();
    assert!(joined.unwrap_err().is_cancelled());
    assert!(m.held_keys(&b).is_empty());
    assert!(!is_queued(&m, b.id(), &key("k2")));
    granted(&m, &c, &["k1"], X);
}

// ----- rule 10: fencing tokens --------------------------------------------------------------

#[tokio::test]
async fn fencing_tokens_start_above_the_token_floor_and_never_go_back() {
    // A server raises the floor to its start time, so a later run's tokens are larger.
    let m = manager();
    let a = m.open_session();
    let first = m
        .acquire(&a, &keys(&["k1"]), LockMode::Exclusive, None)
        .await
        .expect("free key");
    m.release(&a, &keys(&["k1"])).expect("held");
    m.raise_token_floor(1_000_000);
    let raised = m
        .acquire(&a, &keys(&["k1"]), LockMode::Exclusive, None)
        .await
        .expect("free key");
    m.release(&a, &keys(&["k1"])).expect("held");
    m.raise_token_floor(5);
    let after_lower_floor = m
        .acquire(&a, &keys(&["k1"]), LockMode::Exclusive, None)
        .await
        .expect("free key");
    let token = |g: &locksmith::lock::Grant| g.token(&key("k1")).expect("token").0;
    assert!(token(&first) < 1_000_000);
    assert_eq!(token(&raised), 1_000_001);
    assert_eq!(
        token(&after_lower_floor),
        1_000_002,
        "a lower floor changes nothing"
    );
}

#[tokio::test]
async fn fencing_tokens_of_a_key_strictly_increase() {
    let m = manager();
    let (a, b, c) = (m.open_session(), m.open_session(), m.open_session());
    let mut tokens = Vec::new();
    // At once, exclusive.
    tokens.push(token(&granted(&m, &a, &["k1"], X), "k1"));
    // Two readers granted from the queue together.
    let mut b_s = waiting(&m, &b, &["k1"], S);
    let mut c_s = waiting(&m, &c, &["k1"], S);
    m.release_all(&a);
    tokens.push(token(&decided(&mut b_s).unwrap(), "k1"));
    tokens.push(token(&decided(&mut c_s).unwrap(), "k1"));
    // An upgrade from the queue, then one at once by the sole holder.
    let mut b_up = waiting(&m, &b, &["k1"], X);
    m.release_all(&c);
    tokens.push(token(&decided(&mut b_up).unwrap(), "k1"));
    m.release_all(&b);
    granted(&m, &c, &["k1"], S);
    tokens.push(token(&granted(&m, &c, &["k1"], X), "k1"));
    // Grants of other keys in between do not matter.
    granted(&m, &a, &["k0", "k2"], X);
    m.release_all(&c);
    tokens.push(token(&granted(&m, &a, &["k1"], S), "k1"));
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens of k1 in grant order: {tokens:?}"
    );
}

// ----- rule 11: release validation ----------------------------------------------------------

#[tokio::test]
async fn release_of_unheld_key_releases_nothing() {
    let m = manager();
    let (a, b) = (m.open_session(), m.open_session());
    granted(&m, &a, &["k1", "k2"], X);
    granted(&m, &b, &["k9"], X);
    let error = m
        .release(&a, &keys(&["k9", "k1", "k0", "k2", "k0"]))
        .unwrap_err();
    assert_eq!(error.code(), "not_held");
    // Every missing key, sorted and deduplicated; a key held by someone else is not held.
    assert_eq!(
        error,
        LockError::NotHeld {
            keys: keys(&["k0", "k9"])
        }
    );
    assert_eq!(m.held_keys(&a), keys(&["k1", "k2"]));
    assert_eq!(m.held_keys(&b), keys(&["k9"]));
}

#[tokio::test]
async fn release_of_an_empty_key_list_is_invalid() {
    let m = manager();
    let a = m.open_session();
    granted(&m, &a, &["k1"], X);
    assert_eq!(m.release(&a, &[]).unwrap_err().code(), "invalid_request");
    assert_eq!(m.held_keys(&a), keys(&["k1"]));
}

// ----- sessions -----------------------------------------------------------------------------

#[tokio::test]
async fn closing_a_session_releases_its_locks_and_withdraws_its_wait() {
    let m = manager();
    let (a, b, c) = (m.open_session(), m.open_session(), m.open_session());
    granted(&m, &a, &["k1"], X);
    granted(&m, &b, &["k2"], X);
    let mut a_k2 = waiting(&m, &a, &["k2"], X);
    let mut c_k1 = waiting(&m, &c, &["k1"], X);
    assert_eq!(m.session_count(), 3);
    assert!(m.close_session(a.id()));
    assert_eq!(decided(&mut a_k2), Err(LockError::SessionClosed));
    decided(&mut c_k1).unwrap();
    let snapshot = m.snapshot();
    assert!(!is_queued(&m, a.id(), &key("k2")));
    assert!(snapshot.waits_for.is_empty());
    assert_eq!(m.session_count(), 2);
    // A closed session can do nothing more.
    assert!(!m.close_session(a.id()));
    assert_eq!(
        at_once(&m, &a, &["k3"], X).unwrap_err().code(),
        "session_closed"
    );
    assert_eq!(m.release(&a, &keys(&["k1"])), Err(LockError::SessionClosed));
}

#[tokio::test]
async fn dropping_a_session_releases_its_locks() {
    let m = manager();
    let (a, b) = (m.open_session(), m.open_session());
    granted(&m, &a, &["k1", "k2"], X);
    let mut b_x = waiting(&m, &b, &["k2"], X);
    drop(a);
    decided(&mut b_x).unwrap();
    assert!(m.snapshot().key(&key("k1")).is_none());
    assert_eq!(m.session_count(), 1);
}

#[tokio::test]
async fn a_session_has_one_request_in_flight_at_a_time() {
    let m = manager();
    let (a, b) = (m.open_session(), m.open_session());
    granted(&m, &b, &["k1"], X);
    let mut first = waiting(&m, &a, &["k1"], X);
    let second = at_once(&m, &a, &["k2"], X).unwrap_err();
    assert_eq!(second.code(), "invalid_request");
    assert!(m.snapshot().key(&key("k2")).is_none());
    m.release_all(&b);
    decided(&mut first).unwrap();
}

#[tokio::test]
async fn release_while_own_request_is_in_flight_is_invalid() {
    let m = manager();
    let (a, b) = (m.open_session(), m.open_session());
    granted(&m, &a, &["k2"], X);
    granted(&m, &b, &["k1"], X);
    let _a_k1 = waiting(&m, &a, &["k1"], X);
    let error = m.release(&a, &keys(&["k2"])).unwrap_err();
    assert_eq!(error.code(), "invalid_request");
    assert_eq!(m.held_keys(&a), keys(&["k2"]));
}

#[tokio::test]
async fn release_all_withdraws_the_waiting_request_with_cancelled() {
    let m = manager();
    let (a, b, c) = (m.open_session(), m.open_session(), m.open_session());
    granted(&m, &a, &["k9"], X);
    granted(&m, &b, &["k2"], X);
    let mut a_req = waiting(&m, &a, &["k1", "k2"], X);
    assert_eq!(m.held_keys(&a), keys(&["k1", "k9"]));
    m.release_all(&a);
    let error = decided(&mut a_req).unwrap_err();
    assert_eq!(error, LockError::Cancelled);
    assert_eq!(error.code(), "cancelled");
    assert!(m.held_keys(&a).is_empty());
    assert!(m.snapshot().waits_for.is_empty());
    granted(&m, &c, &["k1", "k9"], X);
}

#[tokio::test]
async fn release_all_cancels_a_grant_not_yet_collected() {
    let m = manager();
    let (a, b, c) = (m.open_session(), m.open_session(), m.open_session());
    granted(&m, &a, &["k1"], X);
    let mut b_x = waiting(&m, &b, &["k1"], X);
    let mut c_x = waiting(&m, &c, &["k1"], X);
    m.release_all(&a);
    // B was granted in the table, but its caller has not seen it yet.
    m.release_all(&b);
    assert_eq!(decided(&mut b_x), Err(LockError::Cancelled));
    assert!(m.held_keys(&b).is_empty());
    decided(&mut c_x).unwrap();
}

#[tokio::test]
async fn empty_and_oversized_requests_are_invalid() {
    let m = LockManager::new(LockManagerConfig {
        max_keys_per_request: 3,
        ..LockManagerConfig::default()
    });
    let a = m.open_session();
    assert_eq!(
        at_once(&m, &a, &[], X).unwrap_err().code(),
        "invalid_request"
    );
    assert_eq!(
        at_once(&m, &a, &["k1", "k2", "k3", "k4"], X)
            .unwrap_err()
            .code(),
        "invalid_request"
    );
    // The limit counts distinct keys.
    granted(&m, &a, &["k1", "k2", "k3", "k1"], X);
}
