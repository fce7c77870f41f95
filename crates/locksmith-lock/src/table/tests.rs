//! Literal scenarios of the lock table: the order in which a call's effects happen, what a grant
//! takes and gives back, the per-session limit on held keys, and queues of thousands (handoff,
//! leaving, the rule-6 trap, upgrades).

use std::time::{Duration, Instant};

use super::*;

use LockMode::{Exclusive as X, Shared as S};

/// A table with `n` open sessions, ids 0..n.
fn table_with(n: usize) -> (LockTable, Vec<SessionId>) {
    let mut table = LockTable::new(16);
    let ids: Vec<SessionId> = (0..n as u128).map(SessionId::from_u128).collect();
    for &id in &ids {
        table.open_session(id).expect("fresh ids");
    }
    (table, ids)
}

fn keys(names: &[&str]) -> Vec<Key> {
    names.iter().map(|n| Key::from(*n)).collect()
}

fn at(start: Instant, ms: u64) -> Instant {
    start + Duration::from_millis(ms)
}

/// Acquires and expects a grant at once.
fn granted(table: &mut LockTable, id: SessionId, names: &[&str], mode: LockMode) -> Grant {
    let (acquired, effects) = table.acquire(id, &keys(names), mode, Instant::now(), true);
    assert_eq!(effects, Effects::default());
    match acquired {
        Ok(Acquired::Granted(grant)) => grant,
        other => panic!("{id} expected a grant of {names:?}, got {other:?}"),
    }
}

/// Acquires and expects the request to wait.
fn waits(table: &mut LockTable, id: SessionId, names: &[&str], mode: LockMode) {
    let (acquired, _) = table.acquire(id, &keys(names), mode, Instant::now(), true);
    assert_eq!(
        acquired,
        Ok(Acquired::Waiting),
        "{id} should wait for {names:?}"
    );
}

fn queue_of(table: &LockTable, name: &str) -> Vec<(SessionId, LockMode)> {
    table
        .key_snapshot(&Key::from(name))
        .map(|k| k.queue.iter().map(|w| (w.session, w.mode)).collect())
        .unwrap_or_default()
}

fn holders_of(table: &LockTable, name: &str) -> Vec<(SessionId, LockMode)> {
    table
        .key_snapshot(&Key::from(name))
        .map(|k| k.holders.iter().map(|h| (h.session, h.mode)).collect())
        .unwrap_or_default()
}

fn member(session: SessionId, key: &str) -> CycleMember {
    CycleMember {
        session,
        waiting_for_key: Key::from(key),
    }
}

#[test]
fn waiters_granted_together_continue_their_requests_in_queue_order() {
    // H: X(k1)   E: S(k2)   F: X(k2) waits
    // B: S(k1, k2) waits on k1   C: S(k1, k2) waits on k1
    // H releases k1: B and C are granted k1 together and continue in that order, so they queue
    // on k2 behind F in the order they queued on k1.
    let (mut table, ids) = table_with(5);
    let (h, e, f, b, c) = (ids[0], ids[1], ids[2], ids[3], ids[4]);
    granted(&mut table, h, &["k1"], X);
    granted(&mut table, e, &["k2"], S);
    waits(&mut table, f, &["k2"], X);
    waits(&mut table, b, &["k1", "k2"], S);
    waits(&mut table, c, &["k1", "k2"], S);
    let (released, effects) = table.release(h, &keys(&["k1"]), Instant::now());
    assert_eq!(released, Ok(()));
    assert_eq!(holders_of(&table, "k1"), vec![(b, S), (c, S)]);
    assert_eq!(queue_of(&table, "k2"), vec![(f, X), (b, S), (c, S)]);
    assert!(effects.concluded.is_empty(), "B and C still wait");
}

#[test]
fn keys_freed_by_one_call_are_re_examined_in_the_order_it_freed_them() {
    // A: X(k1, k2)   B: X(k3)   C: X(k4)
    // B: X(k1, k4) waits on k1     C: X(k2, k3) waits on k2
    // A releases k2 and k1 (one call, freed in key order): k1 is re-examined first, so B is
    // granted first and continues first (it waits on k4, held by C, which is not waiting yet);
    // then C continues to k3, held by B, which waits for C: C closes the cycle and is the
    // victim. B keeps waiting for k4.
    let (mut table, ids) = table_with(3);
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    granted(&mut table, a, &["k1", "k2"], X);
    granted(&mut table, b, &["k3"], X);
    granted(&mut table, c, &["k4"], X);
    waits(&mut table, b, &["k1", "k4"], X);
    waits(&mut table, c, &["k2", "k3"], X);
    let (released, effects) = table.release(a, &keys(&["k2", "k1"]), Instant::now());
    assert_eq!(released, Ok(()));
    assert_eq!(effects.concluded, vec![c]);
    assert_eq!(
        table.take_outcome(c),
        Some(Err(LockError::Deadlock {
            cycle: vec![member(c, "k3"), member(b, "k4")]
        }))
    );
    assert_eq!(table.take_outcome(b), None, "B still waits");
    assert_eq!(queue_of(&table, "k4"), vec![(b, X)]);
    // C's rollback gave k2 back; it keeps k4, which it held before its request.
    assert_eq!(holders_of(&table, "k2"), vec![]);
    assert_eq!(table.held_keys(c), keys(&["k4"]));
}

#[test]
fn effects_list_exactly_the_waiting_requests_a_call_concluded() {
    // A: X(k1); B and C wait; A releases: only B is granted and listed.
    let (mut table, ids) = table_with(3);
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    granted(&mut table, a, &["k1"], X);
    waits(&mut table, b, &["k1"], X);
    waits(&mut table, c, &["k1"], X);
    let (_, effects) = table.release(a, &keys(&["k1"]), Instant::now());
    assert_eq!(effects.concluded, vec![b]);
    let grant = table.take_outcome(b).expect("concluded").expect("granted");
    assert_eq!(grant.taken.acquired, keys(&["k1"]));
    // Closing C's session concludes its waiting request too.
    let (closed, effects) = table.close_session(c, Instant::now());
    assert!(closed);
    assert_eq!(effects.concluded, vec![c]);
}

#[test]
fn give_back_returns_exactly_what_the_request_took() {
    // A: S(k1) token t1, X(k3)
    // A: X(k1, k2, k3): k1 upgraded at once, k2 acquired, k3 already held.
    // give_back: k2 released, k1 downgraded keeping the exclusive token, k3 untouched.
    let (mut table, ids) = table_with(2);
    let (a, b) = (ids[0], ids[1]);
    granted(&mut table, a, &["k1"], S);
    let k3 = granted(&mut table, a, &["k3"], X).tokens[0].1;
    let grant = granted(&mut table, a, &["k1", "k2", "k3"], X);
    assert_eq!(grant.taken.acquired, keys(&["k2"]));
    assert_eq!(grant.taken.upgraded, keys(&["k1"]));
    let upgraded_token = grant.tokens[0].1;
    waits(&mut table, b, &["k2"], S);
    let (given, effects) = table.give_back(a, &grant.taken, Instant::now());
    assert_eq!(given, Ok(()));
    assert_eq!(effects.concluded, vec![b], "B is granted the released k2");
    assert_eq!(
        table.held_mode(a, &Key::from("k1")),
        Some((S, upgraded_token))
    );
    assert_eq!(table.held_mode(a, &Key::from("k2")), None);
    assert_eq!(table.held_mode(a, &Key::from("k3")), Some((X, k3)));
}

#[test]
fn give_back_of_keys_no_longer_held_changes_nothing() {
    let (mut table, ids) = table_with(1);
    let a = ids[0];
    let grant = granted(&mut table, a, &["k1", "k2"], X);
    let (released, _) = table.release(a, &keys(&["k2"]), Instant::now());
    assert_eq!(released, Ok(()));
    let (given, _) = table.give_back(a, &grant.taken, Instant::now());
    assert_eq!(
        given,
        Err(LockError::NotHeld {
            keys: keys(&["k2"])
        })
    );
    assert_eq!(table.held_keys(a), keys(&["k1"]));
}

#[test]
fn a_handoff_on_a_queue_of_ten_thousand_grants_the_head_and_keeps_the_order() {
    // H: X(k1); W0..W9999 wait X(k1). H releases: W0 is granted and listed alone; the other
    // 9,999 keep their order. H queues again at the tail.
    let n = 10_000;
    let (mut table, ids) = table_with(n + 1);
    let (h, waiters) = (ids[0], &ids[1..]);
    granted(&mut table, h, &["k1"], X);
    for &w in waiters {
        waits(&mut table, w, &["k1"], X);
    }
    let (_, effects) = table.release(h, &keys(&["k1"]), Instant::now());
    assert_eq!(effects.concluded, vec![waiters[0]]);
    assert!(table.take_outcome(waiters[0]).expect("concluded").is_ok());
    waits(&mut table, h, &["k1"], X);
    let queue: Vec<SessionId> = queue_of(&table, "k1").into_iter().map(|(s, _)| s).collect();
    assert_eq!(queue.len(), n);
    assert_eq!(&queue[..n - 1], &waiters[1..]);
    assert_eq!(queue[n - 1], h);
}

#[test]
fn five_thousand_waiters_timing_out_at_once_leave_the_queue_in_order_and_then_the_key() {
    // H: X(k1); 5,000 sessions wait X(k1) with the same deadline, and all expire: every other
    // one first (the rest keep their order), then the rest. Then H releases and the key is gone.
    let n = 5_000;
    let (mut table, ids) = table_with(n + 1);
    let start = Instant::now();
    let (h, waiters) = (ids[0], &ids[1..]);
    granted(&mut table, h, &["k1"], X);
    for &w in waiters {
        let (acquired, _) = table.acquire(w, &keys(&["k1"]), X, at(start, 1), true);
        assert_eq!(acquired, Ok(Acquired::Waiting));
    }
    for &w in waiters.iter().step_by(2) {
        let (expired, effects) = table.expire(w, at(start, 20));
        assert_eq!(
            expired,
            Err(LockError::Timeout {
                key: Key::from("k1")
            })
        );
        assert!(effects.concluded.is_empty(), "nobody behind can be granted");
    }
    let rest: Vec<SessionId> = waiters.iter().skip(1).step_by(2).copied().collect();
    let queue: Vec<SessionId> = queue_of(&table, "k1").into_iter().map(|(s, _)| s).collect();
    assert_eq!(queue, rest);
    for &w in &rest {
        let (expired, _) = table.expire(w, at(start, 20));
        assert!(matches!(expired, Err(LockError::Timeout { .. })));
    }
    assert!(queue_of(&table, "k1").is_empty());
    let (_, effects) = table.release(h, &keys(&["k1"]), at(start, 21));
    assert!(effects.concluded.is_empty());
    assert!(table.snapshot().is_empty());
}

#[test]
fn the_queued_waiter_trap_is_found_with_a_thousand_waiters_between_the_cycle_members() {
    // Rule 6 with a crowd: A: S(k1); B: X(k1) waits (B → A); 1,000 readers queue S(k1) behind B;
    // C: X(k2), then C: S(k1) waits at the tail (C → B only). A: S(k2) closes A → C → B → A.
    let n = 1_000;
    let (mut table, ids) = table_with(n + 3);
    let (a, b, c, crowd) = (ids[0], ids[1], ids[2], &ids[3..]);
    granted(&mut table, a, &["k1"], S);
    waits(&mut table, b, &["k1"], X);
    for &r in crowd {
        waits(&mut table, r, &["k1"], S);
    }
    granted(&mut table, c, &["k2"], X);
    waits(&mut table, c, &["k1"], S);
    let (acquired, effects) = table.acquire(a, &keys(&["k2"]), S, Instant::now(), true);
    assert_eq!(
        acquired,
        Err(LockError::Deadlock {
            cycle: vec![member(a, "k2"), member(c, "k1"), member(b, "k1")]
        })
    );
    assert!(effects.concluded.is_empty());
    // Everybody else keeps waiting; when A releases k1, B is granted and the crowd waits for B.
    let (_, effects) = table.release(a, &keys(&["k1"]), Instant::now());
    assert_eq!(effects.concluded, vec![b]);
    assert_eq!(queue_of(&table, "k1").len(), n + 1);
}

#[test]
fn an_upgrade_with_a_thousand_readers_queued_waits_at_the_head_and_is_granted_first() {
    // A: S(k1)   B: S(k1)   W: X(k1) waits   1,000 readers S(k1) wait behind W.
    // A: X(k1) is a conversion: it waits at the head, ahead of W and the readers (A → B).
    // B: X(k1) would be a second conversion: deadlock [B on k1, A on k1]; B keeps S(k1).
    // B releases k1: A's upgrade is granted first; W and the readers keep waiting, in order.
    let n = 1_000;
    let (mut table, ids) = table_with(n + 3);
    let (a, b, w, readers) = (ids[0], ids[1], ids[2], &ids[3..]);
    granted(&mut table, a, &["k1"], S);
    granted(&mut table, b, &["k1"], S);
    waits(&mut table, w, &["k1"], X);
    for &r in readers {
        waits(&mut table, r, &["k1"], S);
    }
    waits(&mut table, a, &["k1"], X);
    let queue = queue_of(&table, "k1");
    assert_eq!(queue[0], (a, X));
    assert_eq!(queue[1], (w, X));
    assert_eq!(queue.len(), n + 2);
    let (acquired, _) = table.acquire(b, &keys(&["k1"]), X, Instant::now(), true);
    assert_eq!(
        acquired,
        Err(LockError::Deadlock {
            cycle: vec![member(b, "k1"), member(a, "k1")]
        })
    );
    assert_eq!(holders_of(&table, "k1"), vec![(a, S), (b, S)]);
    let (_, effects) = table.release(b, &keys(&["k1"]), Instant::now());
    assert_eq!(effects.concluded, vec![a]);
    assert_eq!(holders_of(&table, "k1"), vec![(a, X)]);
    let queue = queue_of(&table, "k1");
    assert_eq!(queue[0], (w, X));
    assert_eq!(queue.len(), n + 1);
}

#[test]
fn a_conversion_waits_for_the_other_shared_holders_and_the_waiters_behind_wait_for_it() {
    // A: S(k1)   B: S(k1)   C: X(k1) waits (C → A, C → B)   D: S(k1) waits (D → C)
    // A: X(k1) converts at the head: A → B only; C and D now also wait for A's request.
    let (mut table, ids) = table_with(4);
    let (a, b, c, d) = (ids[0], ids[1], ids[2], ids[3]);
    granted(&mut table, a, &["k1"], S);
    granted(&mut table, b, &["k1"], S);
    waits(&mut table, c, &["k1"], X);
    waits(&mut table, d, &["k1"], S);
    waits(&mut table, a, &["k1"], X);
    let mut expected = vec![(a, b), (c, a), (c, b), (d, a), (d, c)];
    expected.sort_unstable();
    assert_eq!(table.snapshot().waits_for, expected);
    assert_eq!(queue_of(&table, "k1"), vec![(a, X), (c, X), (d, S)]);
}

#[test]
fn a_session_id_already_open_is_refused() {
    let (mut table, ids) = table_with(1);
    assert!(matches!(
        table.open_session(ids[0]),
        Err(LockError::InvalidRequest { .. })
    ));
    assert_eq!(table.session_count(), 1);
}

#[test]
fn a_cycle_through_a_waiter_met_twice_is_cut_to_a_simple_cycle() {
    // The walk 0 -> 1 -> 2 -> 3 -> 1 -> 4 (-> 0) meets 1 twice: the loop 1 -> 2 -> 3 -> 1 goes.
    assert_eq!(simple_cycle(vec![0, 1, 2, 3, 1, 4]), vec![0, 1, 4]);
    // A walk that comes back to its start early ends there.
    assert_eq!(simple_cycle(vec![0, 1, 0, 2]), vec![0, 1]);
    assert_eq!(simple_cycle(vec![5, 6, 7]), vec![5, 6, 7]);
}

#[test]
fn a_failed_request_frees_the_key_it_waited_on_before_the_keys_it_took() {
    // H: S(k5)   B: X(k6)   C: X(k7)
    // A: X(k1, k5) takes k1, waits on k5 (for H)
    // B: S(k5, k7) waits on k5 behind A      C: X(k1, k6) waits on k1 (for A)
    // A's deadline passes: its rollback frees k5 (the key it waited on) first, then k1 (the key
    // it took), although k1 comes first in key order. So B is granted S(k5) and continues first
    // (it waits on k7, held by C, which is not waiting yet); then C is granted k1, continues to
    // k6, held by B, which waits for C: C is the victim. In key order it would have been B.
    let (mut table, ids) = table_with(4);
    let (h, a, b, c) = (ids[0], ids[1], ids[2], ids[3]);
    let start = Instant::now();
    granted(&mut table, h, &["k5"], S);
    granted(&mut table, b, &["k6"], X);
    granted(&mut table, c, &["k7"], X);
    let (acquired, _) = table.acquire(a, &keys(&["k1", "k5"]), X, at(start, 1), true);
    assert_eq!(acquired, Ok(Acquired::Waiting));
    waits(&mut table, b, &["k5", "k7"], S);
    waits(&mut table, c, &["k1", "k6"], X);
    let (expired, effects) = table.expire(a, at(start, 20));
    assert_eq!(
        expired,
        Err(LockError::Timeout {
            key: Key::from("k5")
        })
    );
    assert_eq!(effects.concluded, vec![c]);
    assert_eq!(
        table.take_outcome(c),
        Some(Err(LockError::Deadlock {
            cycle: vec![member(c, "k6"), member(b, "k7")]
        }))
    );
    assert_eq!(holders_of(&table, "k5"), vec![(h, S), (b, S)]);
    assert_eq!(queue_of(&table, "k7"), vec![(b, S)]);
    assert_eq!(holders_of(&table, "k1"), vec![]);
}

#[test]
fn a_holder_carries_the_time_it_was_granted_the_key_through_an_upgrade_and_a_handoff() {
    // A: S(k1) at t=0, upgraded at t=5: still held since t=0. B: X(k1) waits at t=10;
    // A releases at t=30: B holds since t=30.
    let (mut table, ids) = table_with(2);
    let (a, b) = (ids[0], ids[1]);
    let start = Instant::now();
    let k1 = keys(&["k1"]);
    let since = |table: &LockTable| -> Vec<(SessionId, Instant)> {
        table
            .key_snapshot(&Key::from("k1"))
            .map(|k| k.holders.iter().map(|h| (h.session, h.since)).collect())
            .unwrap_or_default()
    };
    let _ = table.acquire(a, &k1, S, at(start, 0), true);
    let _ = table.acquire(a, &k1, X, at(start, 5), true);
    assert_eq!(since(&table), vec![(a, at(start, 0))]);
    let (waiting, _) = table.acquire(b, &k1, X, at(start, 10), true);
    assert_eq!(waiting, Ok(Acquired::Waiting));
    let (released, effects) = table.release(a, &k1, at(start, 30));
    assert_eq!(released, Ok(()));
    assert_eq!(effects.concluded, vec![b]);
    assert_eq!(since(&table), vec![(b, at(start, 30))]);
}

#[test]
fn withdrawing_a_wait_rolls_the_request_back_and_fails_it_with_cancelled() {
    // A: X(k2). B: X(k1, k2) takes k1 and waits on k2. B withdraws: k1 is free again, B's
    // outcome is `Cancelled`, and a second withdrawal finds nothing to withdraw.
    let (mut table, ids) = table_with(2);
    let (a, b) = (ids[0], ids[1]);
    granted(&mut table, a, &["k2"], X);
    waits(&mut table, b, &["k1", "k2"], X);
    assert_eq!(holders_of(&table, "k1"), vec![(b, X)]);
    assert_eq!(table.session_summary(b), Some((1, Some(Key::from("k2")))));

    let (withdrawn, effects) = table.withdraw_wait(b, Instant::now());
    assert!(withdrawn);
    assert_eq!(effects.concluded, vec![b]);
    assert_eq!(table.take_outcome(b), Some(Err(LockError::Cancelled)));
    assert_eq!(holders_of(&table, "k1"), vec![]);
    assert_eq!(queue_of(&table, "k2"), vec![]);
    assert_eq!(table.session_summary(b), Some((0, None)));
    assert!(!table.withdraw_wait(b, Instant::now()).0);
}

#[test]
fn a_request_granted_but_not_yet_collected_is_not_withdrawn() {
    let (mut table, ids) = table_with(2);
    let (a, b) = (ids[0], ids[1]);
    granted(&mut table, a, &["k1"], X);
    waits(&mut table, b, &["k1"], X);
    let _ = table.release(a, &keys(&["k1"]), Instant::now());
    let (withdrawn, effects) = table.withdraw_wait(b, Instant::now());
    assert!(!withdrawn);
    assert_eq!(effects, Effects::default());
    assert!(matches!(table.take_outcome(b), Some(Ok(_))));
    assert_eq!(holders_of(&table, "k1"), vec![(b, X)]);
}

#[test]
fn a_prefix_snapshot_lists_only_the_keys_that_start_with_it() {
    let (mut table, ids) = table_with(1);
    granted(&mut table, ids[0], &["job/a", "job/b", "jobs", "other"], X);
    let (listed, more) = table.keys_snapshot_page("job/", 100);
    let names: Vec<String> = listed.iter().map(|k| k.key.to_string()).collect();
    assert_eq!(names, vec!["job/a", "job/b"]);
    assert_eq!(more, 0);
    assert_eq!(table.keys_snapshot_page("", 100).0.len(), 4);
}

#[test]
fn a_snapshot_page_lists_the_first_keys_in_order_and_counts_the_rest() {
    let (mut table, ids) = table_with(1);
    let names: Vec<String> = (0..50).rev().map(|n| format!("k{n:02}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    granted(&mut table, ids[0], &names[..16], X);
    granted(&mut table, ids[0], &names[16..32], X);
    granted(&mut table, ids[0], &names[32..48], X);
    granted(&mut table, ids[0], &names[48..], X);
    let (listed, more) = table.keys_snapshot_page("k", 5);
    let listed: Vec<String> = listed.iter().map(|k| k.key.to_string()).collect();
    assert_eq!(listed, vec!["k00", "k01", "k02", "k03", "k04"]);
    assert_eq!(more, 45);
    let (listed, more) = table.keys_snapshot_page("k4", 5);
    assert_eq!((listed.len(), more), (5, 5));
}

#[test]
fn a_burst_of_a_thousand_waiters_on_one_key_repeated_three_times_leaves_nothing_behind() {
    // The story: with stored edges, each repetition of the same burst cost more CPU and left the
    // process bigger. Three bursts of 1000 exclusive waiters on one key, each handed the key in
    // turn and then closed, some of them timing out or closing while they wait.
    let mut table = LockTable::new(16);
    let start = Instant::now();
    for burst in 0..3u128 {
        let ids: Vec<SessionId> = (0..1000)
            .map(|n| SessionId::from_u128(burst * 1000 + n))
            .collect();
        for &id in &ids {
            table.open_session(id).expect("fresh ids");
        }
        granted(&mut table, ids[0], &["hot"], X);
        for &id in &ids[1..] {
            waits(&mut table, id, &["hot"], X);
        }
        // Every tenth waiter times out, every tenth (offset) closes while it waits.
        for &id in ids[1..].iter().step_by(10) {
            let (answer, _) = table.expire(id, at(start, 1));
            assert!(
                matches!(answer, Err(LockError::Timeout { .. })),
                "{id} was waiting: {answer:?}"
            );
        }
        for &id in ids[2..].iter().step_by(10) {
            let _ = table.close_session(id, at(start, 2));
        }
        // Hand the key down the queue until nobody waits.
        let mut holder = ids[0];
        loop {
            let (released, effects) = table.release(holder, &keys(&["hot"]), at(start, 3));
            released.expect("the holder holds it");
            let _ = table.close_session(holder, at(start, 3));
            let Some(&next) = effects.concluded.first() else {
                break;
            };
            assert!(table.take_outcome(next).expect("concluded").is_ok());
            holder = next;
        }
        for &id in &ids {
            let _ = table.close_session(id, at(start, 4));
        }
        assert_eq!(
            table.footprint(),
            Footprint::default(),
            "after burst {burst}"
        );
        assert!(table.snapshot().is_empty());
    }
}

/// A table with `n` open sessions, ids 0..n, whose sessions may hold at most `limit` keys each.
fn table_with_session_limit(n: usize, limit: usize) -> (LockTable, Vec<SessionId>) {
    let (table, ids) = table_with(n);
    (table.with_max_keys_per_session(limit), ids)
}

/// Acquires, expects `TooManyLocks`, and checks that nothing changed: every key's holders and
/// queue, and the keys the session holds.
fn refused_over_the_limit(
    table: &mut LockTable,
    id: SessionId,
    names: &[&str],
    mode: LockMode,
) -> LockError {
    let before = (table.keys_snapshot(), table.held_keys(id));
    let (acquired, effects) = table.acquire(id, &keys(names), mode, Instant::now(), true);
    assert_eq!(effects, Effects::default());
    let error = match acquired {
        Err(error @ LockError::TooManyLocks { .. }) => error,
        other => panic!("{id} expected too_many_locks for {names:?}, got {other:?}"),
    };
    assert_eq!(error.code(), "too_many_locks");
    assert_eq!((table.keys_snapshot(), table.held_keys(id)), before);
    error
}

#[test]
fn a_session_may_hold_exactly_its_limit_and_one_key_more_is_refused_changing_nothing() {
    // Limit 3.   A: X(k1, k2)   A: S(k3)   A holds 3: at the limit, granted.
    // A: X(k4) -> too_many_locks (held 3, requested 1); A still holds k1, k2, k3.
    let (mut table, ids) = table_with_session_limit(3, 3);
    let (a, b) = (ids[0], ids[1]);
    granted(&mut table, a, &["k1", "k2"], X);
    granted(&mut table, a, &["k3"], S);
    assert_eq!(table.held_keys(a), keys(&["k1", "k2", "k3"]));
    // Another session queued on one of A's keys stays where it is.
    waits(&mut table, b, &["k1"], X);
    let error = refused_over_the_limit(&mut table, a, &["k4"], X);
    assert_eq!(
        error,
        LockError::TooManyLocks {
            held: 3,
            requested: 1,
            limit: 3
        }
    );
    assert_eq!(queue_of(&table, "k1"), vec![(b, X)]);
    assert_eq!(table.key_snapshot(&Key::from("k4")), None);
    // The limit is per session: C may take keys of its own.
    let c = ids[2];
    granted(&mut table, c, &["k4", "k5", "k6"], X);
}

#[test]
fn keys_already_held_in_any_mode_do_not_count_again() {
    // Limit 3.   A: S(k1, k2, k3)
    // A: S(k1, k2, k3) again, A: X(k1, k2, k3) (upgrades), A: S(k2): all granted, A holds 3.
    // A: X(k3, k4) -> too_many_locks (held 3, requested 1: only k4 is new).
    let (mut table, ids) = table_with_session_limit(1, 3);
    let a = ids[0];
    granted(&mut table, a, &["k1", "k2", "k3"], S);
    granted(&mut table, a, &["k1", "k2", "k3"], S);
    granted(&mut table, a, &["k3", "k2", "k1"], X);
    granted(&mut table, a, &["k2"], S);
    assert_eq!(table.held_keys(a), keys(&["k1", "k2", "k3"]));
    let error = refused_over_the_limit(&mut table, a, &["k3", "k4"], X);
    assert_eq!(
        error,
        LockError::TooManyLocks {
            held: 3,
            requested: 1,
            limit: 3
        }
    );
}

#[test]
fn a_multi_key_request_partly_over_the_limit_fails_whole() {
    // Limit 3.   A: X(k2)   B: S(k3)   C: X(k2) waits behind A
    // A: X(k1, k2, k3, k4): k2 is held, three are new, 1 + 3 > 3 -> too_many_locks; nothing is
    // taken (k1 and k4 stay free, k3 stays B's alone), C still waits on k2.
    let (mut table, ids) = table_with_session_limit(3, 3);
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    granted(&mut table, a, &["k2"], X);
    granted(&mut table, b, &["k3"], S);
    waits(&mut table, c, &["k2"], X);
    let error = refused_over_the_limit(&mut table, a, &["k1", "k2", "k3", "k4"], X);
    assert_eq!(
        error,
        LockError::TooManyLocks {
            held: 1,
            requested: 3,
            limit: 3
        }
    );
    assert_eq!(table.held_keys(a), keys(&["k2"]));
    assert_eq!(holders_of(&table, "k3"), vec![(b, S)]);
    assert_eq!(queue_of(&table, "k2"), vec![(c, X)]);
    // Within the limit the same session's request is taken as usual.
    granted(&mut table, a, &["k1", "k2", "k4"], X);
}

#[test]
fn a_request_checked_at_the_limit_up_front_may_wait_and_continue() {
    // Limit 3.   B: X(k2)   A: X(k1, k2, k3) takes k1, waits on k2 (counted whole: 0 + 3 <= 3)
    // B releases k2: A continues, is granted k2 and k3, and holds exactly its limit.
    let (mut table, ids) = table_with_session_limit(2, 3);
    let (a, b) = (ids[0], ids[1]);
    granted(&mut table, b, &["k2"], X);
    waits(&mut table, a, &["k1", "k2", "k3"], X);
    let (released, effects) = table.release(b, &keys(&["k2"]), Instant::now());
    assert_eq!(released, Ok(()));
    assert_eq!(effects.concluded, vec![a]);
    let grant = table.take_outcome(a).expect("concluded").expect("granted");
    assert_eq!(grant.taken.acquired, keys(&["k1", "k2", "k3"]));
    assert_eq!(table.held_keys(a), keys(&["k1", "k2", "k3"]));
}

#[test]
fn the_busiest_keys_are_the_waited_on_longest_first_then_the_longest_held_and_the_rest_counted() {
    let (mut table, ids) = table_with(4);
    let start = Instant::now();
    let take = |table: &mut LockTable, id, name: &str, ms| {
        let (acquired, _) = table.acquire(id, &keys(&[name]), X, at(start, ms), true);
        acquired.expect("valid")
    };
    // Held since 0, 10, 20 ms; "b" waited on since 30 ms, "c" since 40 ms.
    assert!(matches!(
        take(&mut table, ids[0], "a", 0),
        Acquired::Granted(_)
    ));
    assert!(matches!(
        take(&mut table, ids[0], "b", 10),
        Acquired::Granted(_)
    ));
    assert!(matches!(
        take(&mut table, ids[1], "c", 20),
        Acquired::Granted(_)
    ));
    assert_eq!(take(&mut table, ids[2], "c", 30), Acquired::Waiting);
    assert_eq!(take(&mut table, ids[3], "b", 40), Acquired::Waiting);
    let names = |listed: &[KeySnapshot]| -> Vec<String> {
        listed.iter().map(|k| k.key.to_string()).collect()
    };
    let busiest = table.busiest_keys(10);
    assert_eq!(names(&busiest.keys), vec!["c", "b", "a"]);
    assert_eq!(busiest.more, 0);
    assert_eq!(busiest.keys[0].queue[0].session, ids[2], "with its queue");
    let busiest = table.busiest_keys(2);
    assert_eq!(names(&busiest.keys), vec!["c", "b"]);
    assert_eq!(busiest.more, 1);
}

#[test]
fn gauges_count_locks_by_mode_waiters_and_the_longest_wait() {
    // t=0    A: X(k1)        B: S(k2)   C: S(k2)
    // t=10   D: X(k1) waits behind A
    // t=30   E: X(k2) waits behind B and C;  F: X(k1) waits behind D
    // at t=100: 3 locks (1 write, 2 read), 3 waiting requests on 2 keys, and D has waited 90 ms.
    let (mut table, ids) = table_with(6);
    let (a, b, c, d, e, f) = (ids[0], ids[1], ids[2], ids[3], ids[4], ids[5]);
    let start = Instant::now();
    assert_eq!(
        table.gauges(start),
        Gauges {
            sessions: 6,
            ..Gauges::default()
        }
    );
    for (id, name, mode) in [(a, "k1", X), (b, "k2", S), (c, "k2", S)] {
        let (acquired, _) = table.acquire(id, &keys(&[name]), mode, start, true);
        assert!(matches!(acquired, Ok(Acquired::Granted(_))));
    }
    for (id, name, ms) in [(d, "k1", 10), (e, "k2", 30), (f, "k1", 30)] {
        let (acquired, _) = table.acquire(id, &keys(&[name]), X, at(start, ms), true);
        assert_eq!(acquired, Ok(Acquired::Waiting));
    }
    assert_eq!(
        table.gauges(at(start, 100)),
        Gauges {
            sessions: 6,
            held_shared: 2,
            held_exclusive: 1,
            waiting: 3,
            keys_with_waiters: 2,
            longest_wait: Duration::from_millis(90),
        }
    );
    // A releases k1: D holds it, F waits on; the longest wait is now E's (since t=30).
    let (released, _) = table.release(a, &keys(&["k1"]), at(start, 100));
    assert_eq!(released, Ok(()));
    let gauges = table.gauges(at(start, 100));
    assert_eq!((gauges.held_exclusive, gauges.held_shared), (1, 2));
    assert_eq!((gauges.waiting, gauges.keys_with_waiters), (2, 2));
    assert_eq!(gauges.longest_wait, Duration::from_millis(70));
}
