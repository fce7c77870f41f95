//! Hot keys: the pure [`LockTable`] under heavy contention, checked after every step.
//!
//! A case opens 40–200 sessions and applies 300–1500 random operations to them: acquire 1–3 keys
//! shared or exclusive (waiting, or as a try-lock), upgrade a key held shared, collect the outcome
//! of a concluded request, release some held keys (sometimes naming one not held), downgrade,
//! `release_all`, let a request's deadline pass (`expire`), drop its caller (`cancel`), call while
//! a request is in flight (`InvalidRequest`), close a session, open a new one. Three quarters of the
//! keys requested are one of two hot keys, so their queues grow to dozens of waiters, often about a
//! hundred, and deadlocks are common; the other quarter are six cold keys. Every call gets the same
//! fixed `now`.
//!
//! There is no reference model of the whole table here (that is `tests/lock_model.rs`, at small
//! scale). Instead, after every step the snapshot is checked on its own and against what the test
//! knows of each session:
//!
//! - rule 1: the holders of every key are pairwise compatible;
//! - rules 2 and 6: the first waiter of every queue cannot be granted, every queued session has a
//!   waits-for edge, waiters that stay keep their order with newcomers behind them, and nobody is
//!   granted a key past a waiter ahead of it that keeps waiting;
//! - rule 3: at most one upgrade waiter per key, first in the queue, holding the key shared;
//! - rule 5: the snapshot's edges are exactly rule 5 recomputed here from holders and queues, and
//!   the graph has no cycle (so no deadlock was missed);
//! - rule 10: a token seen for the first time is above every token seen before on its key, and a
//!   token never names two different grants;
//! - rules 4, 9, 12 (bookkeeping): a session holds exactly what its answered calls granted it, plus
//!   the keys of its request in flight taken so far, in sorted order (all or nothing once the
//!   request concluded); a request in flight waits in exactly one queue until it is listed in some
//!   call's `Effects::concluded`, and not after; a closed session appears nowhere.
//!
//! An `acquire` is predicted from the snapshot taken just before it (what it takes at once does not
//! depend on anybody else's progress): granted, try-lock timeout, waiting or deadlock, and the whole
//! table after it except the values of new tokens. A deadlock is predicted exactly when rule 5's
//! graph, with the requester's keys taken so far and its would-be edges (at the tail, or as an
//! upgrade at the head), has a cycle through the requester, and the reported cycle must be one of
//! that graph's: starting with the requester, no session twice, each member waiting on the key it is
//! named with and having an edge to the next. A deadlock of a continuation (a request granted a key
//! by somebody else's call, going on to its next key) happens in the middle of a call, which cannot
//! be observed; its cycle is checked as far as the states before and after the call allow: its
//! shape, the victim on a later key of its request than before the call, every other member on a
//! key of its request between the ones it waited on before and after the call, and each member's
//! successor holding or awaiting that member's key before or after the call (or concluded by it).
//!
//! `PROPTEST_CASES` sets the number of cases (default 24, about 6 s in `--release`). Failures are
//! persisted in `proptest-regressions/lock_hot_keys.txt`.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::mem;
use std::rc::Rc;
use std::time::Instant;

use locksmith::lock::{
    Acquired, CycleMember, Effects, FencingToken, Key, LockError, LockMode, LockTable, SessionId,
    Snapshot, Taken,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::FileFailurePersistence;

use LockMode::{Exclusive, Shared};

/// Keys `k0`..`k7`; index order is key order.
const KEY_COUNT: usize = 8;
/// The two keys almost everybody fights over.
const HOT_KEYS: [usize; 2] = [2, 5];
/// The others.
const COLD_KEYS: [usize; 6] = [0, 1, 3, 4, 6, 7];
/// Sessions open at the start of a case.
const MIN_SESSIONS: usize = 40;
/// ... at most; also the most that may be open at once.
const MAX_SESSIONS: usize = 200;
/// Operations in a case.
const MIN_OPS: usize = 300;
const MAX_OPS: usize = 1500;
/// Cases of the property test unless `PROPTEST_CASES` says otherwise.
const DEFAULT_CASES: u32 = 24;

// ----- operations -----------------------------------------------------------------------------

/// One step of a case. `who` picks the session: the first, from index `who` on (cyclically), for
/// which the step means something; a step that fits nobody is skipped.
#[derive(Clone, Debug)]
enum Op {
    /// A session that may make a request (it first collects the outcome of its concluded request,
    /// if any) acquires `keys` (indices, maybe repeated) in `mode`; a try-lock unless `may_wait`.
    Acquire {
        who: usize,
        keys: Vec<usize>,
        mode: LockMode,
        may_wait: bool,
    },
    /// A session holding a key shared asks for it exclusively (an upgrade), with `extra` another
    /// key; a try-lock unless `may_wait`.
    Upgrade {
        who: usize,
        pick: usize,
        extra: Option<usize>,
        may_wait: bool,
    },
    /// A session whose request concluded collects its outcome.
    Collect { who: usize },
    /// A session that may make a request releases some of its keys (`picks` index them); with
    /// `stray`, it also names a key it does not hold: `NotHeld`, and nothing is released.
    Release {
        who: usize,
        picks: Vec<usize>,
        stray: bool,
    },
    /// A session holding an exclusive lock downgrades some of its keys.
    Downgrade { who: usize, picks: Vec<usize> },
    /// A session releases everything, withdrawing its request in flight (`Cancelled`).
    ReleaseAll { who: usize },
    /// The deadline of a request in flight passes; with `concluded`, preferably of one that
    /// concluded already (then `expire` answers its outcome).
    Expire { who: usize, concluded: bool },
    /// The caller of a request in flight goes away; with `concluded`, preferably of one that
    /// concluded already (a grant not yet collected is given back).
    Cancel { who: usize, concluded: bool },
    /// A session with a request in flight calls `acquire` (0), `release` (1) or `downgrade` (2):
    /// `InvalidRequest`, and nothing changes.
    Misuse { who: usize, call: u8 },
    /// A session is closed.
    Close { who: usize },
    /// A new session is opened (if fewer than `MAX_SESSIONS` are open).
    Open,
}

fn key_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => prop::sample::select(HOT_KEYS.to_vec()),
        1 => prop::sample::select(COLD_KEYS.to_vec()),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let who = 0..1000usize;
    let mode = prop_oneof![Just(Shared), Just(Exclusive)];
    let picks = vec(0..KEY_COUNT, 1..=2);
    prop_oneof![
        16 => (who.clone(), vec(key_strategy(), 1..=3), mode, prop::bool::weighted(0.85))
            .prop_map(|(who, keys, mode, may_wait)| Op::Acquire { who, keys, mode, may_wait }),
        4 => (who.clone(), 0..KEY_COUNT, prop::option::of(key_strategy()), prop::bool::weighted(0.85))
            .prop_map(|(who, pick, extra, may_wait)| Op::Upgrade { who, pick, extra, may_wait }),
        4 => who.clone().prop_map(|who| Op::Collect { who }),
        5 => (who.clone(), picks.clone(), prop::bool::weighted(0.1))
            .prop_map(|(who, picks, stray)| Op::Release { who, picks, stray }),
        1 => (who.clone(), picks).prop_map(|(who, picks)| Op::Downgrade { who, picks }),
        1 => who.clone().prop_map(|who| Op::ReleaseAll { who }),
        2 => (who.clone(), prop::bool::weighted(0.2))
            .prop_map(|(who, concluded)| Op::Expire { who, concluded }),
        1 => (who.clone(), prop::bool::weighted(0.3))
            .prop_map(|(who, concluded)| Op::Cancel { who, concluded }),
        1 => (who.clone(), 0..3u8).prop_map(|(who, call)| Op::Misuse { who, call }),
        1 => who.prop_map(|who| Op::Close { who }),
        1 => Just(Op::Open),
    ]
}

fn case_strategy() -> impl Strategy<Value = (usize, Vec<Op>)> {
    (
        MIN_SESSIONS..=MAX_SESSIONS,
        vec(op_strategy(), MIN_OPS..=MAX_OPS),
    )
}

// ----- the table as the test reasons about it -------------------------------------------------

fn compatible(a: LockMode, b: LockMode) -> bool {
    a == Shared && b == Shared
}

/// One key: holders `(session, mode, token)` in grant order (token `None`: one the table is about
/// to hand out) and queue `(session, mode, upgrade)`, head first.
#[derive(Clone, Debug, Default, PartialEq)]
struct KeyLayout {
    holders: Vec<(SessionId, LockMode, Option<FencingToken>)>,
    queue: Vec<(SessionId, LockMode, bool)>,
}

impl KeyLayout {
    fn holder(&self, session: SessionId) -> Option<(LockMode, Option<FencingToken>)> {
        self.holders
            .iter()
            .find(|h| h.0 == session)
            .map(|&(_, mode, token)| (mode, token))
    }
}

/// Every held or awaited key.
type Layout = BTreeMap<Key, KeyLayout>;

fn layout_of(snapshot: &Snapshot) -> Layout {
    snapshot
        .keys
        .iter()
        .map(|entry| {
            let layout = KeyLayout {
                holders: entry
                    .holders
                    .iter()
                    .map(|h| (h.session, h.mode, Some(h.token)))
                    .collect(),
                queue: entry
                    .queue
                    .iter()
                    .map(|w| (w.session, w.mode, w.upgrade))
                    .collect(),
            };
            (entry.key.clone(), layout)
        })
        .collect()
}

/// Rule 5, recomputed: a waiter waits for every other holder whose mode conflicts with the mode
/// it asks for, and for every other waiter ahead of it asking for a conflicting mode. Sorted.
fn rule5_edges(layout: &Layout) -> Vec<(SessionId, SessionId)> {
    let mut edges = Vec::new();
    for entry in layout.values() {
        for (position, &(waiter, wants, _)) in entry.queue.iter().enumerate() {
            for &(holder, holds, _) in &entry.holders {
                if holder != waiter && !compatible(wants, holds) {
                    edges.push((waiter, holder));
                }
            }
            for &(ahead, asks, _) in &entry.queue[..position] {
                if ahead != waiter && !compatible(wants, asks) {
                    edges.push((waiter, ahead));
                }
            }
        }
    }
    edges.sort_unstable();
    edges.dedup();
    edges
}

/// Could the first waiter of a key be granted now? An upgrade when its session is the only
/// holder; a shared request when nobody holds the key exclusively; an exclusive one when nobody
/// holds it.
fn grantable(
    (session, mode, upgrade): (SessionId, LockMode, bool),
    holders: &[(SessionId, LockMode, Option<FencingToken>)],
) -> bool {
    if upgrade {
        return holders.len() == 1 && holders[0].0 == session;
    }
    match mode {
        Shared => holders.iter().all(|h| h.1 == Shared),
        Exclusive => holders.is_empty(),
    }
}

/// A waits-for graph.
struct Graph {
    next: HashMap<SessionId, Vec<SessionId>>,
}

impl Graph {
    fn new(edges: &[(SessionId, SessionId)]) -> Self {
        let mut next: HashMap<SessionId, Vec<SessionId>> = HashMap::new();
        for &(from, to) in edges {
            next.entry(from).or_default().push(to);
        }
        Graph { next }
    }

    fn has_edge(&self, from: SessionId, to: SessionId) -> bool {
        self.next.get(&from).is_some_and(|n| n.contains(&to))
    }

    /// Is there a path of one edge or more from `start` back to itself?
    fn on_a_cycle(&self, start: SessionId) -> bool {
        let mut seen = HashSet::new();
        let mut stack = vec![start];
        while let Some(node) = stack.pop() {
            for &to in self.next.get(&node).into_iter().flatten() {
                if to == start {
                    return true;
                }
                if seen.insert(to) {
                    stack.push(to);
                }
            }
        }
        false
    }

    /// No cycle at all (Kahn: peel off nodes nobody waits for until none are left).
    fn is_acyclic(&self) -> bool {
        let mut waited_for: HashMap<SessionId, usize> = HashMap::new();
        for (&from, targets) in &self.next {
            waited_for.entry(from).or_default();
            for &to in targets {
                *waited_for.entry(to).or_default() += 1;
            }
        }
        let mut free: VecDeque<SessionId> = waited_for
            .iter()
            .filter(|(_, &n)| n == 0)
            .map(|(&s, _)| s)
            .collect();
        let mut peeled = 0;
        while let Some(node) = free.pop_front() {
            peeled += 1;
            for to in self.next.get(&node).into_iter().flatten() {
                let n = waited_for.get_mut(to).expect("every target is counted");
                *n -= 1;
                if *n == 0 {
                    free.push_back(*to);
                }
            }
        }
        peeled == waited_for.len()
    }
}

/// A few differences between two sorted edge lists, for a failure message.
fn edge_differences(
    real: &[(SessionId, SessionId)],
    expected: &[(SessionId, SessionId)],
) -> String {
    let real_set: HashSet<_> = real.iter().collect();
    let expected_set: HashSet<_> = expected.iter().collect();
    let extra: Vec<_> = real
        .iter()
        .filter(|e| !expected_set.contains(e))
        .take(5)
        .collect();
    let missing: Vec<_> = expected
        .iter()
        .filter(|e| !real_set.contains(e))
        .take(5)
        .collect();
    format!("not in rule 5: {extra:?}; missing: {missing:?}")
}

/// Holders pairwise compatible (rule 1); at most one upgrade waiter, first, holding the key shared,
/// and no holder queued as a new request (rule 3); the first waiter cannot be granted and every
/// waiter has an edge (rules 2, 6); the edges are rule 5's and have no cycle (rules 5, 7).
fn check_invariants(step: usize, snapshot: &Snapshot, layout: &Layout) {
    for (key, entry) in layout {
        assert!(
            !entry.holders.is_empty() || !entry.queue.is_empty(),
            "step {step}: {key} is listed with neither holders nor waiters"
        );
        for (i, a) in entry.holders.iter().enumerate() {
            for b in &entry.holders[i + 1..] {
                assert_ne!(a.0, b.0, "step {step}: {key} held twice by {}", a.0);
                assert!(
                    compatible(a.1, b.1),
                    "step {step}: conflicting holders of {key}: {a:?} and {b:?}"
                );
            }
        }
        let upgrades = entry.queue.iter().filter(|w| w.2).count();
        assert!(
            upgrades <= 1,
            "step {step}: {upgrades} upgrade waiters on {key}"
        );
        if upgrades == 1 {
            assert!(
                entry.queue[0].2,
                "step {step}: the upgrade waiter of {key} is not first in its queue"
            );
        }
        for &(session, mode, upgrade) in &entry.queue {
            let held = entry.holder(session).map(|h| h.0);
            if upgrade {
                assert_eq!(mode, Exclusive, "step {step}: upgrade to shared on {key}");
                assert_eq!(
                    held,
                    Some(Shared),
                    "step {step}: upgrade waiter {session} on {key} does not hold it shared"
                );
            } else {
                assert_eq!(
                    held, None,
                    "step {step}: holder {session} of {key} queued as a new request"
                );
            }
        }
        if let Some(&head) = entry.queue.first() {
            assert!(
                !grantable(head, &entry.holders),
                "step {step}: the first waiter of {key}, {head:?}, could be granted (holders \
                 {:?})",
                entry.holders
            );
        }
    }
    let expected = rule5_edges(layout);
    assert!(
        snapshot.waits_for == expected,
        "step {step}: waits-for edges are not rule 5's: {}",
        edge_differences(&snapshot.waits_for, &expected)
    );
    let idle = common::idle_waiters(snapshot);
    assert!(
        idle.is_empty(),
        "step {step}: waiters without a waits-for edge: {idle:?}"
    );
    assert!(
        Graph::new(&snapshot.waits_for).is_acyclic(),
        "step {step}: the waits-for graph has a cycle"
    );
}

/// Rule 2 across one step: waiters that stay in a queue keep their order and every newcomer is
/// behind them; a waiter that got the key in this step had nobody ahead of it still waiting.
fn check_fifo(step: usize, before: &Layout, after: &Layout) {
    for (key, now) in after {
        let Some(then) = before.get(key) else {
            continue;
        };
        let position: HashMap<SessionId, usize> = then
            .queue
            .iter()
            .filter(|w| !w.2)
            .enumerate()
            .map(|(i, w)| (w.0, i))
            .collect();
        let mut last = None;
        let mut newcomer = None;
        for w in now.queue.iter().filter(|w| !w.2) {
            match position.get(&w.0) {
                Some(&p) => {
                    assert!(
                        newcomer.is_none(),
                        "step {step}: {} queued on {key} before this step is now behind \
                         newcomer {newcomer:?}",
                        w.0
                    );
                    assert!(
                        last < Some(p),
                        "step {step}: waiters of {key} changed their order"
                    );
                    last = Some(p);
                }
                None => newcomer = Some(w.0),
            }
        }
        let still_waiting: HashSet<SessionId> = now.queue.iter().map(|w| w.0).collect();
        for (i, &(session, mode, _)) in then.queue.iter().enumerate() {
            let got_it = now.holder(session).is_some_and(|(held, _)| held >= mode);
            if !got_it {
                continue;
            }
            if let Some(ahead) = then.queue[..i]
                .iter()
                .find(|w| still_waiting.contains(&w.0))
            {
                panic!(
                    "step {step}: {session} was granted {key} past {}, which was ahead of it and \
                     still waits",
                    ahead.0
                );
            }
        }
    }
}

// ----- what the test knows of each session ----------------------------------------------------

/// Where the waiters were around a call that concluded requests, to judge a continuation's
/// deadlock later, when its outcome is collected.
struct CallContext {
    /// The key each session waited on just before the call.
    before: HashMap<SessionId, Key>,
    /// The key each session waits on just after it.
    after: HashMap<SessionId, Key>,
    /// The keys of the request of each session that waited before the call.
    requests: HashMap<SessionId, Vec<Key>>,
    /// Every `(session, key)` where the session held or awaited the key, before or after the call.
    touched: HashSet<(SessionId, Key)>,
    /// The requests the call concluded.
    concluded: HashSet<SessionId>,
}

/// A request in flight.
struct InFlight {
    /// Its keys, sorted and deduplicated.
    keys: Vec<Key>,
    mode: LockMode,
    /// Set when a call lists the session in `Effects::concluded` (the first such call).
    concluded: Option<Rc<CallContext>>,
    /// `release_all` was called while it was in flight: it cannot end granted.
    released_all: bool,
}

struct SessionModel {
    id: SessionId,
    open: bool,
    /// What the session holds according to the answers it got; while a request is in flight,
    /// what it held before it.
    held: BTreeMap<Key, (LockMode, FencingToken)>,
    request: Option<InFlight>,
}

impl SessionModel {
    /// Open, and no request in flight other than one that concluded (collected first).
    fn may_request(&self) -> bool {
        self.open
            && self
                .request
                .as_ref()
                .is_none_or(|request| request.concluded.is_some())
    }

    fn in_flight(&self) -> bool {
        self.open && self.request.is_some()
    }
}

/// How often each kind of thing happened, to show that the generated cases are not vacuous.
#[derive(Debug, Default)]
struct Stats {
    longest_hot_queue: usize,
    /// Sum over steps of the length of both hot queues (divided by steps: the mean).
    hot_queue_sum: usize,
    steps: usize,
    granted_at_once: usize,
    waits: usize,
    upgrade_waits: usize,
    try_lock_timeouts: usize,
    deadlocks_at_once: usize,
    deadlocks_of_continuations: usize,
    grants_collected: usize,
    cancelled_collected: usize,
    expired_waiting: usize,
    expired_after_conclusion: usize,
    cancelled_waiting: usize,
    cancelled_after_conclusion: usize,
    release_all_while_waiting: usize,
    releases: usize,
    not_held: usize,
    downgrades: usize,
    misuses: usize,
    closed_while_waiting: usize,
    opened: usize,
}

/// What an `acquire` must do, predicted from the table just before it.
enum Expected {
    Granted {
        tokens: Vec<(Key, Option<FencingToken>)>,
        taken: Taken,
        after: Layout,
    },
    Timeout(Key),
    Waiting {
        after: Layout,
        upgrade: bool,
    },
    Deadlock {
        key: Key,
        /// The table at the moment of the search: the requester's keys taken so far and the
        /// requester queued.
        at_search: Layout,
        graph: Graph,
    },
}

impl Expected {
    fn describe(&self) -> String {
        match self {
            Expected::Granted { tokens, .. } => format!("granted {tokens:?}"),
            Expected::Timeout(key) => format!("timeout on {key}"),
            Expected::Waiting { .. } => "waiting".to_string(),
            Expected::Deadlock { key, .. } => format!("deadlock waiting on {key}"),
        }
    }
}

// ----- the harness ----------------------------------------------------------------------------

struct Harness {
    table: LockTable,
    now: Instant,
    keys: Vec<Key>,
    /// Every session ever opened; the one with id `from_u128(i)` is at index `i`.
    sessions: Vec<SessionModel>,
    /// The table after the last step, and the same as a layout.
    snapshot: Snapshot,
    layout: Layout,
    /// The highest token seen on each key.
    max_token: HashMap<Key, u64>,
    /// The grant each token seen belongs to: its key and session.
    token_grant: HashMap<u64, (Key, SessionId)>,
    /// Tokens seen for the first time in the current step.
    fresh_tokens: HashSet<u64>,
    step: usize,
    stats: Stats,
}

fn index(id: SessionId) -> usize {
    usize::try_from(id.0.as_u128()).expect("a small session number")
}

impl Harness {
    fn new(sessions: usize) -> Self {
        let mut harness = Harness {
            table: LockTable::new(KEY_COUNT),
            now: Instant::now(),
            keys: (0..KEY_COUNT).map(|k| Key::from(format!("k{k}"))).collect(),
            sessions: Vec::new(),
            snapshot: Snapshot::default(),
            layout: Layout::new(),
            max_token: HashMap::new(),
            token_grant: HashMap::new(),
            fresh_tokens: HashSet::new(),
            step: 0,
            stats: Stats::default(),
        };
        for _ in 0..sessions {
            harness.open_new();
        }
        harness
    }

    fn run(mut self, ops: &[Op]) -> Stats {
        let _ = self.finish_step(&Effects::default());
        for op in ops {
            self.step += 1;
            self.apply(op);
        }
        self.close_everything();
        self.stats
    }

    /// The first session from `who` on that `fits`.
    fn pick(&self, who: usize, fits: impl Fn(&SessionModel) -> bool) -> Option<usize> {
        let n = self.sessions.len();
        (0..n)
            .map(|i| (who + i) % n)
            .find(|&i| fits(&self.sessions[i]))
    }

    /// A session with a request in flight; with `concluded`, one whose request concluded if there
    /// is one.
    fn pick_in_flight(&self, who: usize, concluded: bool) -> Option<usize> {
        let has_concluded =
            |m: &SessionModel| m.open && m.request.as_ref().is_some_and(|r| r.concluded.is_some());
        concluded
            .then(|| self.pick(who, has_concluded))
            .flatten()
            .or_else(|| self.pick(who, SessionModel::in_flight))
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Acquire {
                who,
                ref keys,
                mode,
                may_wait,
            } => {
                if let Some(s) = self.pick(who, SessionModel::may_request) {
                    self.collect_if_concluded(s);
                    let names = keys.iter().map(|&k| self.keys[k].clone()).collect();
                    self.acquire(s, names, mode, may_wait);
                }
            }
            Op::Upgrade {
                who,
                pick,
                extra,
                may_wait,
            } => {
                let holds_shared = |m: &SessionModel| {
                    m.may_request() && m.held.values().any(|&(mode, _)| mode == Shared)
                };
                if let Some(s) = self.pick(who, holds_shared) {
                    self.collect_if_concluded(s);
                    let shared: Vec<Key> = self.sessions[s]
                        .held
                        .iter()
                        .filter(|(_, &(mode, _))| mode == Shared)
                        .map(|(key, _)| key.clone())
                        .collect();
                    if !shared.is_empty() {
                        let mut names = vec![shared[pick % shared.len()].clone()];
                        names.extend(extra.map(|k| self.keys[k].clone()));
                        self.acquire(s, names, Exclusive, may_wait);
                    }
                }
            }
            Op::Collect { who } => {
                let concluded = |m: &SessionModel| {
                    m.open && m.request.as_ref().is_some_and(|r| r.concluded.is_some())
                };
                if let Some(s) = self.pick(who, concluded) {
                    self.collect(s);
                }
            }
            Op::Release {
                who,
                ref picks,
                stray,
            } => {
                let holds_something = |m: &SessionModel| {
                    m.may_request() && (!m.held.is_empty() || m.request.is_some())
                };
                if let Some(s) = self.pick(who, holds_something) {
                    self.release(s, picks, stray.then_some(who));
                }
            }
            Op::Downgrade { who, ref picks } => {
                let holds_exclusive = |m: &SessionModel| {
                    m.may_request() && m.held.values().any(|&(mode, _)| mode == Exclusive)
                };
                if let Some(s) = self.pick(who, holds_exclusive) {
                    self.downgrade(s, picks);
                }
            }
            Op::ReleaseAll { who } => {
                if let Some(s) = self.pick(who, |m| m.open) {
                    self.release_all(s);
                }
            }
            Op::Expire { who, concluded } => {
                if let Some(s) = self.pick_in_flight(who, concluded) {
                    self.expire(s);
                }
            }
            Op::Cancel { who, concluded } => {
                if let Some(s) = self.pick_in_flight(who, concluded) {
                    self.cancel(s);
                }
            }
            Op::Misuse { who, call } => {
                if let Some(s) = self.pick(who, SessionModel::in_flight) {
                    self.misuse(s, call);
                }
            }
            Op::Close { who } => {
                if let Some(s) = self.pick(who, |m| m.open) {
                    self.close(s);
                }
            }
            Op::Open => {
                if self.sessions.iter().filter(|m| m.open).count() < MAX_SESSIONS {
                    self.open_new();
                    let _ = self.finish_step(&Effects::default());
                }
            }
        }
    }

    // ----- the operations -----------------------------------------------------------------

    fn open_new(&mut self) {
        let id = SessionId::from_u128(self.sessions.len() as u128);
        assert_eq!(self.table.open_session(id), Ok(()));
        assert!(
            matches!(
                self.table.open_session(id),
                Err(LockError::InvalidRequest { .. })
            ),
            "a session id already open was opened again"
        );
        self.sessions.push(SessionModel {
            id,
            open: true,
            held: BTreeMap::new(),
            request: None,
        });
        self.stats.opened += 1;
    }

    /// Session `s`, which has no request in flight, acquires `names` (maybe repeated, unsorted).
    fn acquire(&mut self, s: usize, names: Vec<Key>, mode: LockMode, may_wait: bool) {
        let step = self.step;
        let id = self.sessions[s].id;
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        let expected = self.predict(id, &sorted, mode, may_wait);
        let (answer, effects) = self.table.acquire(id, &names, mode, self.now, may_wait);
        assert!(
            effects.concluded.is_empty(),
            "step {step}: an acquire concluded other requests: {:?}",
            effects.concluded
        );
        match (expected, answer) {
            (
                Expected::Granted {
                    tokens,
                    taken,
                    after,
                },
                Ok(Acquired::Granted(grant)),
            ) => {
                let granted: Vec<&Key> = grant.tokens.iter().map(|(k, _)| k).collect();
                let asked: Vec<&Key> = tokens.iter().map(|(k, _)| k).collect();
                assert_eq!(granted, asked, "step {step}: keys of {id}'s grant");
                for ((key, expected), (_, token)) in tokens.iter().zip(&grant.tokens) {
                    if let Some(expected) = expected {
                        assert_eq!(
                            expected, token,
                            "step {step}: {id} already held {key}: the grant must carry its token"
                        );
                    }
                }
                assert_eq!(grant.taken, taken, "step {step}: what {id}'s grant took");
                let held = &mut self.sessions[s].held;
                for (key, token) in &grant.tokens {
                    let mode = held.get(key).map_or(mode, |&(old, _)| old.max(mode));
                    held.insert(key.clone(), (mode, *token));
                }
                let _ = self.finish_step(&effects);
                self.check_predicted(&after);
                self.stats.granted_at_once += 1;
            }
            (Expected::Timeout(expected), Err(LockError::Timeout { key })) => {
                assert_eq!(key, expected, "step {step}: the key {id}'s try-lock names");
                let (before, _) = self.finish_step(&effects);
                assert!(
                    before == self.snapshot,
                    "step {step}: a try-lock that timed out left a trace"
                );
                self.stats.try_lock_timeouts += 1;
            }
            (Expected::Waiting { after, upgrade }, Ok(Acquired::Waiting)) => {
                self.sessions[s].request = Some(InFlight {
                    keys: sorted,
                    mode,
                    concluded: None,
                    released_all: false,
                });
                let _ = self.finish_step(&effects);
                self.check_predicted(&after);
                self.stats.waits += 1;
                if upgrade {
                    self.stats.upgrade_waits += 1;
                }
            }
            (
                Expected::Deadlock {
                    key,
                    at_search,
                    graph,
                },
                Err(LockError::Deadlock { cycle }),
            ) => {
                check_cycle_at_search(step, id, &key, &cycle, &at_search, &graph);
                let (before, _) = self.finish_step(&effects);
                assert!(
                    before == self.snapshot,
                    "step {step}: the deadlock victim {id} did not leave the table as it was"
                );
                self.stats.deadlocks_at_once += 1;
            }
            (expected, answer) => panic!(
                "step {step}: {id} acquires {sorted:?} {mode:?} (may wait: {may_wait}): expected \
                 {}, the table answered {answer:?}",
                expected.describe()
            ),
        }
    }

    /// What `acquire` by `id` of `keys` (sorted, deduplicated) must do, from the table now. Rules 2
    /// and 3 decide each key in turn; the first key that cannot be had at once is a timeout for a
    /// try-lock, otherwise the requester queues there (an upgrade after any upgrade already
    /// queued, a new request at the tail) and it is a deadlock exactly when rule 5's graph then has
    /// a cycle through the requester.
    fn predict(&self, id: SessionId, keys: &[Key], mode: LockMode, may_wait: bool) -> Expected {
        let mut state = self.layout.clone();
        let mut tokens = Vec::new();
        let mut taken = Taken::default();
        for key in keys {
            let entry = state.entry(key.clone()).or_default();
            let own = entry.holders.iter().position(|h| h.0 == id);
            let upgrade = match own {
                Some(i) => {
                    let (_, held, token) = entry.holders[i];
                    if held >= mode {
                        tokens.push((key.clone(), token));
                        continue;
                    }
                    if entry.holders.len() == 1 {
                        entry.holders[i] = (id, mode, None);
                        taken.upgraded.push(key.clone());
                        tokens.push((key.clone(), None));
                        continue;
                    }
                    true
                }
                None => {
                    let free = entry.queue.is_empty()
                        && entry.holders.iter().all(|h| compatible(mode, h.1));
                    if free {
                        entry.holders.push((id, mode, None));
                        taken.acquired.push(key.clone());
                        tokens.push((key.clone(), None));
                        continue;
                    }
                    false
                }
            };
            if !may_wait {
                return Expected::Timeout(key.clone());
            }
            let position = if upgrade {
                entry.queue.iter().take_while(|w| w.2).count()
            } else {
                entry.queue.len()
            };
            entry.queue.insert(position, (id, mode, upgrade));
            let graph = Graph::new(&rule5_edges(&state));
            if graph.on_a_cycle(id) {
                return Expected::Deadlock {
                    key: key.clone(),
                    at_search: state,
                    graph,
                };
            }
            return Expected::Waiting {
                after: state,
                upgrade,
            };
        }
        Expected::Granted {
            tokens,
            taken,
            after: state,
        }
    }

    /// The table after the step is the predicted one; tokens the prediction left open are new.
    fn check_predicted(&self, predicted: &Layout) {
        let step = self.step;
        let predicted: Vec<(&Key, &KeyLayout)> = predicted
            .iter()
            .filter(|(_, e)| !e.holders.is_empty() || !e.queue.is_empty())
            .collect();
        let real: Vec<(&Key, &KeyLayout)> = self.layout.iter().collect();
        assert_eq!(
            predicted.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            real.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            "step {step}: keys in the table after an acquire"
        );
        for ((key, expected), (_, real)) in predicted.iter().zip(&real) {
            assert_eq!(
                expected.queue, real.queue,
                "step {step}: queue of {key} after an acquire"
            );
            assert_eq!(
                expected.holders.len(),
                real.holders.len(),
                "step {step}: holders of {key} after an acquire: expected {:?}, real {:?}",
                expected.holders,
                real.holders
            );
            for (e, r) in expected.holders.iter().zip(&real.holders) {
                let token = r.2.expect("tokens in the snapshot");
                let same = e.0 == r.0
                    && e.1 == r.1
                    && e.2
                        .map_or(self.fresh_tokens.contains(&token.0), |t| t == token);
                assert!(
                    same,
                    "step {step}: holders of {key} after an acquire: expected {:?}, real {:?}",
                    expected.holders, real.holders
                );
            }
        }
    }

    fn collect_if_concluded(&mut self, s: usize) {
        let concluded = self.sessions[s]
            .request
            .as_ref()
            .is_some_and(|r| r.concluded.is_some());
        if concluded {
            self.collect(s);
        }
    }

    fn collect(&mut self, s: usize) {
        let id = self.sessions[s].id;
        let Some(outcome) = self.table.take_outcome(id) else {
            panic!(
                "step {}: {id} was listed as concluded but take_outcome finds it still waiting",
                self.step
            );
        };
        self.check_outcome(s, outcome);
    }

    /// The outcome of session `s`'s request, collected (by `take_outcome` or `expire`) after it
    /// concluded: a grant of every key it asked for, held now as granted; or a failure after which
    /// the session holds what it held before the request (rule 4).
    fn check_outcome(&mut self, s: usize, outcome: Result<locksmith::lock::Grant, LockError>) {
        let step = self.step;
        let id = self.sessions[s].id;
        let request = self.sessions[s]
            .request
            .take()
            .expect("only a request in flight has an outcome");
        match outcome {
            Ok(grant) => {
                assert!(
                    !request.released_all,
                    "step {step}: {id}'s request was granted although release_all withdrew it"
                );
                let granted: Vec<&Key> = grant.tokens.iter().map(|(k, _)| k).collect();
                let asked: Vec<&Key> = request.keys.iter().collect();
                assert_eq!(granted, asked, "step {step}: keys of {id}'s grant");
                let mut taken = Taken::default();
                let mut now_held = Vec::new();
                for (key, token) in &grant.tokens {
                    let before = self.sessions[s].held.get(key).copied();
                    let mode = match before {
                        None => {
                            taken.acquired.push(key.clone());
                            request.mode
                        }
                        Some((held, held_token)) if held >= request.mode => {
                            assert_eq!(
                                held_token, *token,
                                "step {step}: {id} already held {key}: its grant must carry that \
                                 token"
                            );
                            held
                        }
                        Some(_) => {
                            taken.upgraded.push(key.clone());
                            Exclusive
                        }
                    };
                    let real = self.layout.get(key).and_then(|e| e.holder(id));
                    assert_eq!(
                        real,
                        Some((mode, Some(*token))),
                        "step {step}: {id} was granted {key} {mode:?} with token {token}"
                    );
                    now_held.push((key.clone(), (mode, *token)));
                }
                assert_eq!(grant.taken, taken, "step {step}: what {id}'s grant took");
                self.sessions[s].held.extend(now_held);
                self.stats.grants_collected += 1;
            }
            Err(error) => {
                let holds = self.holdings_of(id);
                assert_eq!(
                    holds, self.sessions[s].held,
                    "step {step}: after its request failed with {error:?}, {id} holds other locks \
                     than before it"
                );
                match error {
                    LockError::Deadlock { cycle } => {
                        self.check_continuation_cycle(id, &request, &cycle);
                        self.stats.deadlocks_of_continuations += 1;
                    }
                    LockError::Cancelled => {
                        assert!(
                            request.released_all,
                            "step {step}: {id}'s request was cancelled without release_all"
                        );
                        self.stats.cancelled_collected += 1;
                    }
                    other => panic!("step {step}: {id}'s request ended with {other:?}"),
                }
            }
        }
    }

    /// Rule 5 for a deadlock found while a continuation ran inside somebody else's call: the cycle
    /// starts with the victim on a key of its request past the one it waited on before the call,
    /// names no session twice, and every other member waited before the call and is named with a
    /// key of its request it could have reached meanwhile (no earlier than the one it waited on
    /// before, no later than the one it waits on after).
    fn check_continuation_cycle(
        &self,
        victim: SessionId,
        request: &InFlight,
        cycle: &[CycleMember],
    ) {
        let step = self.step;
        check_cycle_shape(step, victim, cycle);
        let context = request
            .concluded
            .as_ref()
            .expect("a collected request concluded");
        let first = &cycle[0].waiting_for_key;
        let waited = context.before.get(&victim).unwrap_or_else(|| {
            panic!("step {step}: {victim} was not waiting before the call that concluded it")
        });
        assert!(
            request.keys.contains(first) && first > waited,
            "step {step}: continuation {victim} waited on {waited} and deadlocked on {first}, not \
             a later key of its request {:?}",
            request.keys
        );
        for member in &cycle[1..] {
            let (session, key) = (member.session, &member.waiting_for_key);
            let before = context.before.get(&session).unwrap_or_else(|| {
                panic!(
                    "step {step}: cycle {cycle:?} names {session}, which did not wait before the \
                     call"
                )
            });
            let keys = &context.requests[&session];
            assert!(
                keys.contains(key) && key >= before,
                "step {step}: cycle member {session} waited on {before} before the call, cannot \
                 have waited on {key} (request {keys:?})"
            );
            if let Some(after) = context.after.get(&session) {
                assert!(
                    after >= key,
                    "step {step}: cycle member {session} waits on {after} after the call, cannot \
                     have waited on {key} in it"
                );
            }
        }
        // Each member waits for the next as a holder or a waiter of its key. A session that
        // concluded in the call (the victim at least) may have held the key only in it; any other
        // held or awaited it before or after the call.
        for (i, member) in cycle.iter().enumerate() {
            let next = cycle[(i + 1) % cycle.len()].session;
            let key = &member.waiting_for_key;
            assert!(
                context.concluded.contains(&next) || context.touched.contains(&(next, key.clone())),
                "step {step}: cycle {cycle:?} has {} wait for {next} on {key}, which neither held \
                 nor awaited it around the call",
                member.session
            );
        }
    }

    fn release(&mut self, s: usize, picks: &[usize], stray: Option<usize>) {
        self.collect_if_concluded(s);
        let step = self.step;
        let id = self.sessions[s].id;
        let held: Vec<Key> = self.sessions[s].held.keys().cloned().collect();
        let mut names: Vec<Key> = if held.is_empty() {
            Vec::new()
        } else {
            picks
                .iter()
                .map(|&p| held[p % held.len()].clone())
                .collect()
        };
        let stray = stray.and_then(|from| {
            (0..KEY_COUNT)
                .map(|i| self.keys[(from + i) % KEY_COUNT].clone())
                .find(|k| !held.contains(k))
        });
        names.extend(stray.clone());
        if names.is_empty() {
            return;
        }
        let (answer, effects) = self.table.release(id, &names, self.now);
        match stray {
            Some(stray) => {
                assert_eq!(
                    answer,
                    Err(LockError::NotHeld { keys: vec![stray] }),
                    "step {step}: {id} releases {names:?}"
                );
                assert!(effects.concluded.is_empty());
                let (before, _) = self.finish_step(&effects);
                assert!(
                    before == self.snapshot,
                    "step {step}: a release that failed with not_held changed the table"
                );
                self.stats.not_held += 1;
            }
            None => {
                assert_eq!(answer, Ok(()), "step {step}: {id} releases {names:?}");
                for key in &names {
                    self.sessions[s].held.remove(key);
                }
                let _ = self.finish_step(&effects);
                self.stats.releases += 1;
            }
        }
    }

    fn downgrade(&mut self, s: usize, picks: &[usize]) {
        self.collect_if_concluded(s);
        let step = self.step;
        let id = self.sessions[s].id;
        let held: Vec<Key> = self.sessions[s].held.keys().cloned().collect();
        if held.is_empty() {
            return;
        }
        let names: Vec<Key> = picks
            .iter()
            .map(|&p| held[p % held.len()].clone())
            .collect();
        let (answer, effects) = self.table.downgrade(id, &names, self.now);
        assert_eq!(answer, Ok(()), "step {step}: {id} downgrades {names:?}");
        for key in &names {
            if let Some(entry) = self.sessions[s].held.get_mut(key) {
                entry.0 = Shared;
            }
        }
        let _ = self.finish_step(&effects);
        self.stats.downgrades += 1;
    }

    fn release_all(&mut self, s: usize) {
        let step = self.step;
        let id = self.sessions[s].id;
        let waiting = self.sessions[s]
            .request
            .as_ref()
            .is_some_and(|r| r.concluded.is_none());
        let (answer, effects) = self.table.release_all(id, self.now);
        assert_eq!(answer, Ok(()), "step {step}: release_all by {id}");
        self.sessions[s].held.clear();
        if let Some(request) = self.sessions[s].request.as_mut() {
            request.released_all = true;
        }
        let _ = self.finish_step(&effects);
        if waiting {
            assert!(
                effects.concluded.contains(&id),
                "step {step}: release_all withdrew {id}'s waiting request without listing it as \
                 concluded"
            );
            self.stats.release_all_while_waiting += 1;
        }
    }

    fn expire(&mut self, s: usize) {
        let step = self.step;
        let id = self.sessions[s].id;
        let concluded = self.sessions[s]
            .request
            .as_ref()
            .is_some_and(|r| r.concluded.is_some());
        let waiting_on = self.waiting_key(id);
        let (answer, effects) = self.table.expire(id, self.now);
        if concluded {
            assert!(effects.concluded.is_empty());
            self.check_outcome(s, answer);
            let (before, _) = self.finish_step(&effects);
            assert!(
                before == self.snapshot,
                "step {step}: expire of a concluded request changed the table"
            );
            self.stats.expired_after_conclusion += 1;
        } else {
            let key = waiting_on.unwrap_or_else(|| {
                panic!("step {step}: {id}'s request has not concluded and is in no queue")
            });
            assert_eq!(
                answer,
                Err(LockError::Timeout { key }),
                "step {step}: expire of {id}'s request"
            );
            self.sessions[s].request = None;
            let _ = self.finish_step(&effects);
            assert!(
                !effects.concluded.contains(&id),
                "step {step}: the expired request of {id} is also listed as concluded"
            );
            self.stats.expired_waiting += 1;
        }
    }

    fn cancel(&mut self, s: usize) {
        let step = self.step;
        let id = self.sessions[s].id;
        let concluded = self.sessions[s]
            .request
            .as_ref()
            .is_some_and(|r| r.concluded.is_some());
        let effects = self.table.cancel(id, self.now);
        self.sessions[s].request = None;
        let _ = self.finish_step(&effects);
        assert!(
            !effects.concluded.contains(&id),
            "step {step}: the cancelled request of {id} is listed as concluded"
        );
        if concluded {
            self.stats.cancelled_after_conclusion += 1;
        } else {
            self.stats.cancelled_waiting += 1;
        }
    }

    fn misuse(&mut self, s: usize, call: u8) {
        let step = self.step;
        let id = self.sessions[s].id;
        let some_key = self.sessions[s]
            .held
            .keys()
            .next()
            .cloned()
            .unwrap_or_else(|| self.keys[HOT_KEYS[0]].clone());
        let (answer, effects) = match call {
            0 => {
                let (answer, effects) =
                    self.table
                        .acquire(id, &[some_key], Exclusive, self.now, true);
                (answer.map(|_| ()), effects)
            }
            1 => self.table.release(id, &[some_key], self.now),
            _ => self.table.downgrade(id, &[some_key], self.now),
        };
        assert!(
            matches!(answer, Err(LockError::InvalidRequest { .. })),
            "step {step}: call {call} by {id} while its request is in flight answered {answer:?}"
        );
        assert!(effects.concluded.is_empty());
        let (before, _) = self.finish_step(&effects);
        assert!(
            before == self.snapshot,
            "step {step}: an invalid call changed the table"
        );
        self.stats.misuses += 1;
    }

    fn close(&mut self, s: usize) {
        let step = self.step;
        let id = self.sessions[s].id;
        let waiting = self.sessions[s]
            .request
            .as_ref()
            .is_some_and(|r| r.concluded.is_none());
        let (closed, effects) = self.table.close_session(id, self.now);
        assert!(
            closed,
            "step {step}: close_session({id}) of an open session"
        );
        let model = &mut self.sessions[s];
        model.open = false;
        model.held.clear();
        model.request = None;
        let _ = self.finish_step(&effects);
        if waiting {
            assert!(
                effects.concluded.contains(&id),
                "step {step}: closing {id} withdrew its waiting request without listing it"
            );
            self.stats.closed_while_waiting += 1;
        }
        // Every later call on the session answers `SessionClosed` and changes nothing.
        assert!(!self.table.is_open(id));
        assert_eq!(
            self.table.close_session(id, self.now),
            (false, Effects::default())
        );
        assert_eq!(
            self.table.take_outcome(id),
            Some(Err(LockError::SessionClosed))
        );
        let (answer, effects) = self.table.acquire(
            id,
            &[self.keys[HOT_KEYS[1]].clone()],
            Shared,
            self.now,
            true,
        );
        assert_eq!(answer, Err(LockError::SessionClosed));
        assert_eq!(effects, Effects::default());
        assert_eq!(
            self.table.release_all(id, self.now),
            (Err(LockError::SessionClosed), Effects::default())
        );
        assert!(self.table.held_keys(id).is_empty());
    }

    fn close_everything(&mut self) {
        for s in 0..self.sessions.len() {
            if self.sessions[s].open {
                self.step += 1;
                self.close(s);
            }
        }
        let snapshot = self.table.snapshot();
        assert!(
            snapshot.is_empty(),
            "locks left after every session closed: {snapshot:?}"
        );
        assert_eq!(self.table.session_count(), 0);
    }

    // ----- after every step ---------------------------------------------------------------

    /// Takes the snapshot after a step and checks everything; returns the snapshot and layout of
    /// before the step.
    fn finish_step(&mut self, effects: &Effects) -> (Snapshot, Layout) {
        let snapshot = self.table.snapshot();
        let layout = layout_of(&snapshot);
        let before = mem::replace(&mut self.snapshot, snapshot);
        let before_layout = mem::replace(&mut self.layout, layout);
        check_invariants(self.step, &self.snapshot, &self.layout);
        check_fifo(self.step, &before_layout, &self.layout);
        self.note_concluded(effects, &before_layout);
        self.check_tokens();
        self.check_sessions();
        for &k in &HOT_KEYS {
            let length = self.layout.get(&self.keys[k]).map_or(0, |e| e.queue.len());
            self.stats.longest_hot_queue = self.stats.longest_hot_queue.max(length);
            self.stats.hot_queue_sum += length;
        }
        self.stats.steps += 1;
        (before, before_layout)
    }

    /// Marks the requests listed in `effects` as concluded, with where everybody waited around
    /// the call.
    fn note_concluded(&mut self, effects: &Effects, before_layout: &Layout) {
        if effects.concluded.is_empty() {
            return;
        }
        let waiting = |layout: &Layout| -> HashMap<SessionId, Key> {
            layout
                .iter()
                .flat_map(|(key, e)| e.queue.iter().map(move |w| (w.0, key.clone())))
                .collect()
        };
        let before = waiting(before_layout);
        let requests = before
            .keys()
            .filter_map(|&id| {
                let request = self.sessions[index(id)].request.as_ref()?;
                Some((id, request.keys.clone()))
            })
            .collect();
        let touched = [before_layout, &self.layout]
            .into_iter()
            .flat_map(|layout| layout.iter())
            .flat_map(|(key, e)| {
                let holders = e.holders.iter().map(|h| h.0);
                let waiters = e.queue.iter().map(|w| w.0);
                holders.chain(waiters).map(move |s| (s, key.clone()))
            })
            .collect();
        let context = Rc::new(CallContext {
            after: waiting(&self.layout),
            before,
            requests,
            touched,
            concluded: effects.concluded.iter().copied().collect(),
        });
        for &id in &effects.concluded {
            let model = &mut self.sessions[index(id)];
            if !model.open {
                continue;
            }
            let Some(request) = model.request.as_mut() else {
                panic!(
                    "step {}: {id} is listed as concluded but has no request in flight",
                    self.step
                );
            };
            request.concluded.get_or_insert_with(|| context.clone());
        }
    }

    /// Rule 10: a token seen for the first time is above every token seen before on its key; a
    /// token seen again belongs to the same key and session (a holder keeping its lock, or an
    /// upgrade rolled back to its shared token).
    fn check_tokens(&mut self) {
        let step = self.step;
        let mut fresh = Vec::new();
        for (key, entry) in &self.layout {
            for &(session, _, token) in &entry.holders {
                let token = token.expect("tokens in the snapshot").0;
                match self.token_grant.get(&token) {
                    Some((k, owner)) => assert!(
                        k == key && *owner == session,
                        "step {step}: token {token} of {session} on {key} was seen before for \
                         {owner} on {k}"
                    ),
                    None => fresh.push((token, key.clone(), session)),
                }
            }
        }
        fresh.sort_unstable();
        self.fresh_tokens.clear();
        for (token, key, session) in fresh {
            if let Some(&highest) = self.max_token.get(&key) {
                assert!(
                    token > highest,
                    "step {step}: new token {token} on {key} is not above {highest}"
                );
            }
            self.max_token.insert(key.clone(), token);
            assert!(
                self.token_grant.insert(token, (key, session)).is_none(),
                "step {step}: token {token} handed out twice"
            );
            self.fresh_tokens.insert(token);
        }
    }

    /// Bookkeeping: everybody in the table is open; each open session holds what its answers say
    /// and waits exactly while its request is in flight and not concluded.
    fn check_sessions(&mut self) {
        let step = self.step;
        let mut holdings: HashMap<SessionId, BTreeMap<Key, (LockMode, FencingToken)>> =
            HashMap::new();
        let mut queued: HashMap<SessionId, (Key, LockMode, bool)> = HashMap::new();
        for (key, entry) in &self.layout {
            for &(session, mode, token) in &entry.holders {
                let token = token.expect("tokens in the snapshot");
                holdings
                    .entry(session)
                    .or_default()
                    .insert(key.clone(), (mode, token));
            }
            for &(session, mode, upgrade) in &entry.queue {
                let twice = queued.insert(session, (key.clone(), mode, upgrade));
                assert!(
                    twice.is_none(),
                    "step {step}: {session} is queued on {key} and on {:?}",
                    twice.map(|t| t.0)
                );
            }
        }
        let in_edges = self.snapshot.waits_for.iter().flat_map(|&(a, b)| [a, b]);
        for session in holdings
            .keys()
            .chain(queued.keys())
            .copied()
            .chain(in_edges)
        {
            assert!(
                self.sessions[index(session)].open,
                "step {step}: closed session {session} is still in the table"
            );
        }
        let empty = BTreeMap::new();
        let mut open = 0;
        let mut still_waiting = Vec::new();
        for model in self.sessions.iter().filter(|m| m.open) {
            open += 1;
            let id = model.id;
            let holds = holdings.get(&id).unwrap_or(&empty);
            assert!(self.table.is_open(id), "step {step}: {id} is not open");
            let held_keys: Vec<&Key> = holds.keys().collect();
            assert_eq!(
                self.table.held_keys(id).iter().collect::<Vec<_>>(),
                held_keys,
                "step {step}: held_keys({id})"
            );
            let queued = queued.get(&id);
            let Some(request) = &model.request else {
                assert!(
                    queued.is_none(),
                    "step {step}: {id} is queued without a request"
                );
                assert_eq!(
                    holds, &model.held,
                    "step {step}: {id} holds other locks than it was granted"
                );
                continue;
            };
            if request.released_all {
                assert!(
                    queued.is_none() && holds.is_empty(),
                    "step {step}: {id} still holds or waits after release_all"
                );
                continue;
            }
            // Keys outside the request are as the session's answers say.
            for key in holds.keys().chain(model.held.keys()) {
                if !request.keys.contains(key) {
                    assert_eq!(
                        holds.get(key),
                        model.held.get(key),
                        "step {step}: {id} holds {key}, outside its request, other than granted"
                    );
                }
            }
            // A key of the request is either as before it, or taken by it.
            let as_before = |key: &Key| holds.get(key) == model.held.get(key);
            let taken = |key: &Key| {
                let before = model.held.get(key);
                let mode = before.map_or(request.mode, |&(m, _)| m.max(request.mode));
                match (holds.get(key), before) {
                    (Some(&(m, _)), _) if m != mode => false,
                    (Some(&(_, t)), Some(&(m, old))) => (m >= request.mode) == (t == old),
                    (Some(_), None) => true,
                    (None, _) => false,
                }
            };
            match (request.concluded.is_some(), queued) {
                (true, Some(q)) => panic!(
                    "step {step}: {id}'s request was listed as concluded but still waits on {:?}",
                    q.0
                ),
                (false, None) => {
                    panic!("step {step}: {id}'s request has not concluded but waits in no queue")
                }
                (false, Some((key, mode, upgrade))) => {
                    assert!(
                        request.keys.contains(key) && *mode == request.mode,
                        "step {step}: {id} waits on {key} {mode:?}, not part of its request"
                    );
                    let holds_shared = model.held.get(key).is_some_and(|h| h.0 == Shared);
                    assert_eq!(
                        *upgrade,
                        holds_shared && request.mode == Exclusive,
                        "step {step}: upgrade flag of {id} on {key}"
                    );
                    for k in &request.keys {
                        let ok = if k < key { taken(k) } else { as_before(k) };
                        assert!(
                            ok,
                            "step {step}: {id} waits on {key}; it holds {k} as {:?} (before the \
                             request {:?})",
                            holds.get(k),
                            model.held.get(k)
                        );
                    }
                    still_waiting.push(id);
                }
                (true, None) => {
                    assert!(
                        request.keys.iter().all(as_before) || request.keys.iter().all(taken),
                        "step {step}: {id}'s concluded request took only some of its keys: holds \
                         {holds:?}, held before {:?}, request {:?}",
                        model.held,
                        request.keys
                    );
                }
            }
        }
        assert_eq!(
            self.table.session_count(),
            open,
            "step {step}: session count"
        );
        for id in still_waiting {
            assert!(
                self.table.take_outcome(id).is_none(),
                "step {step}: {id}'s request concluded without being listed in the effects"
            );
        }
    }

    fn holdings_of(&self, id: SessionId) -> BTreeMap<Key, (LockMode, FencingToken)> {
        self.layout
            .iter()
            .filter_map(|(key, e)| {
                let (mode, token) = e.holder(id)?;
                Some((key.clone(), (mode, token.expect("tokens in the snapshot"))))
            })
            .collect()
    }

    fn waiting_key(&self, id: SessionId) -> Option<Key> {
        self.layout
            .iter()
            .find(|(_, e)| e.queue.iter().any(|w| w.0 == id))
            .map(|(key, _)| key.clone())
    }
}

/// A deadlock cycle starts with the victim, has at least two members and names no session twice.
fn check_cycle_shape(step: usize, victim: SessionId, cycle: &[CycleMember]) {
    assert!(
        cycle.len() >= 2,
        "step {step}: deadlock cycle too short: {cycle:?}"
    );
    assert_eq!(
        cycle[0].session, victim,
        "step {step}: the cycle must start with the victim: {cycle:?}"
    );
    let distinct: HashSet<SessionId> = cycle.iter().map(|m| m.session).collect();
    assert_eq!(
        distinct.len(),
        cycle.len(),
        "step {step}: the cycle names a session twice: {cycle:?}"
    );
}

/// Rule 5 for a deadlock answered by `acquire`: the cycle is one of rule 5's graph at the moment
/// of the search, starting with the requester on the key it would wait on, each member waiting on
/// the key it is named with and waiting for the next, the last for the first.
fn check_cycle_at_search(
    step: usize,
    victim: SessionId,
    key: &Key,
    cycle: &[CycleMember],
    at_search: &Layout,
    graph: &Graph,
) {
    check_cycle_shape(step, victim, cycle);
    assert_eq!(
        &cycle[0].waiting_for_key, key,
        "step {step}: the victim {victim} is named with the wrong key: {cycle:?}"
    );
    for (i, member) in cycle.iter().enumerate() {
        let waits = at_search
            .get(&member.waiting_for_key)
            .is_some_and(|e| e.queue.iter().any(|w| w.0 == member.session));
        assert!(
            waits,
            "step {step}: cycle member {} does not wait on {}: {cycle:?}",
            member.session, member.waiting_for_key
        );
        let next = cycle[(i + 1) % cycle.len()].session;
        assert!(
            graph.has_edge(member.session, next),
            "step {step}: the cycle uses {} -> {next}, which is not an edge of rule 5: {cycle:?}",
            member.session
        );
    }
}

// ----- the tests ------------------------------------------------------------------------------

/// A case takes about a quarter of a second, so shrinking a failure of up to 1500 operations is
/// bounded by time (two minutes) rather than by proptest's automatic 4 × cases iterations;
/// `PROPTEST_MAX_SHRINK_TIME` and `PROPTEST_MAX_SHRINK_ITERS` still override both.
fn config() -> ProptestConfig {
    let defaults = ProptestConfig::default();
    ProptestConfig {
        cases: common::proptest_cases(DEFAULT_CASES),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/proptest-regressions/lock_hot_keys.txt"
        )))),
        max_shrink_time: match defaults.max_shrink_time {
            0 => 120_000,
            set => set,
        },
        max_shrink_iters: match defaults.max_shrink_iters {
            u32::MAX => 100_000,
            set => set,
        },
        ..defaults
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn random_operations_on_hot_keys_keep_every_invariant((sessions, ops) in case_strategy()) {
        Harness::new(sessions).run(&ops);
    }
}

/// The generated cases are not vacuous: four cases from a fixed seed build a queue of more than 60
/// waiters on a hot key and reach every kind of outcome the property test checks.
#[test]
fn generated_cases_build_long_hot_queues_and_reach_every_outcome() {
    let mut runner = common::deterministic_runner();
    let strategy = case_strategy();
    let mut all = Vec::new();
    for _ in 0..4 {
        let (sessions, ops) = strategy.new_tree(&mut runner).expect("a case").current();
        all.push(Harness::new(sessions).run(&ops));
    }
    eprintln!("{all:#?}");
    let longest = all.iter().map(|s| s.longest_hot_queue).max().unwrap_or(0);
    assert!(longest > 60, "the longest hot queue had {longest} waiters");
    let total = |f: fn(&Stats) -> usize| all.iter().map(f).sum::<usize>();
    let counts = [
        ("granted at once", total(|s| s.granted_at_once)),
        ("waits", total(|s| s.waits)),
        ("upgrade waits", total(|s| s.upgrade_waits)),
        ("try-lock timeouts", total(|s| s.try_lock_timeouts)),
        ("deadlocks at once", total(|s| s.deadlocks_at_once)),
        (
            "deadlocks of continuations",
            total(|s| s.deadlocks_of_continuations),
        ),
        ("grants collected", total(|s| s.grants_collected)),
        ("cancelled collected", total(|s| s.cancelled_collected)),
        ("expired waiting", total(|s| s.expired_waiting)),
        (
            "expired after conclusion",
            total(|s| s.expired_after_conclusion),
        ),
        ("cancelled waiting", total(|s| s.cancelled_waiting)),
        (
            "cancelled after conclusion",
            total(|s| s.cancelled_after_conclusion),
        ),
        (
            "release_all while waiting",
            total(|s| s.release_all_while_waiting),
        ),
        ("releases", total(|s| s.releases)),
        ("not held", total(|s| s.not_held)),
        ("downgrades", total(|s| s.downgrades)),
        ("misuses", total(|s| s.misuses)),
        ("closed while waiting", total(|s| s.closed_while_waiting)),
    ];
    for (what, count) in counts {
        assert!(count > 0, "no case saw {what}");
    }
}
