//! The deadlock detector: is there a cycle through a session that has just started to wait?
//!
//! Rule 5 of `docs/semantics.md` defines the waits-for graph on sessions: a waiter waits for the
//! holders of its key whose mode conflicts with its request and for the waiters queued ahead of
//! it whose request conflicts with it. Storing those edges costs q²/2 for q exclusive waiters on
//! one key, and every grant rewrites O(q) of them. Nothing is stored here instead: the search
//! runs over the lock table itself, on a smaller graph with the same cycles.
//!
//! **The reduced graph.** A session `w` waiting on key `k` has an edge to every *holder* of `k`
//! other than itself, and to nothing else. Why this has exactly the cycles of rule 5's graph,
//! given the table's invariant that the first waiter of every queue cannot be granted:
//! - A waiter's rule-5 edges all point into its own key: to holders of `k` or to waiters of `k`.
//!   Waiters of `k` point only into `k` too, so a path from `w` leaves `k` only through a holder.
//! - From `w`, rule 5 reaches every holder of `k` but `w` itself (and some waiters of `k`, which
//!   lead nowhere else): directly if `w` asks exclusive or
//!   a holder holds exclusive; otherwise every holder is shared and `w` is a shared waiter that
//!   could not be granted, so the first waiter of `k` is a conversion or an exclusive request
//!   queued ahead of `w`, and that one conflicts with `w` and with every holder.
//! - A path can come back to the requester `r` through the queue of `r`'s key only from a waiter
//!   behind `r`, and somebody is queued behind `r` only when `r` is a conversion, which holds its
//!   key: then that waiter reaches `r` as a holder in the reduced graph too.
//!
//! So the search visits sessions and keys: from a waiting session to its key, from a key to its
//! holders, each at most once per search (marks stamped with a search number in flat arrays, so
//! nothing is cleared between searches). No queue is ever scanned. The table turns the cycle it
//! finds back into rule-5 edges for the error message (a hop from a shared waiter to a shared
//! holder goes through the first waiter of the key).
//!
//! The invariant this needs holds at every search, also inside a call: the table re-examines every
//! key a call changed (granting what can be granted) before any request goes on to wait, and
//! taking a key at once or joining a queue cannot make a first waiter grantable.
//!
//! Invariant kept by the table: outside a call, there is no cycle. A cycle can only be closed
//! when a session starts to wait, so the table searches from that session before letting it wait
//! and, if a cycle exists, refuses the request. The search is an exact, iterative depth-first
//! search with no depth limit: it never gives up and guesses "deadlock".

use crate::{KeySlot, SessionSlot};

/// What the search needs to know about the table.
pub(crate) trait WaitGraph {
    /// The key `session` is queued on, if it waits.
    fn waits_on(&self, session: SessionSlot) -> Option<KeySlot>;
    /// The sessions holding `key`.
    fn holders(&self, key: KeySlot) -> impl Iterator<Item = SessionSlot> + '_;
    /// Bounds of the session and key indices (every index is below them).
    fn bounds(&self) -> (usize, usize);
}

/// The search's reusable state, so a search allocates nothing once warmed up.
#[derive(Default)]
pub(crate) struct CycleSearch {
    /// `session_mark[s] == round`: session `s` was reached by the current search.
    session_mark: Vec<u32>,
    /// `key_mark[k] == round`: the holders of key `k` were pushed by the current search.
    key_mark: Vec<u32>,
    /// The session from which the current search first reached `s` (valid where marked).
    parent: Vec<SessionSlot>,
    /// The current search's number; bumped per search, so marks never need clearing.
    round: u32,
    /// The depth-first stack.
    stack: Vec<SessionSlot>,
}

impl CycleSearch {
    /// A cycle through `start` in the reduced graph, if there is one: the sessions in waits-for
    /// order, starting with `start`; each one waits on a key the next one holds, and the last
    /// waits on a key `start` holds. `None` if `start` does not wait or no cycle goes through it.
    pub fn cycle_through<G: WaitGraph>(
        &mut self,
        graph: &G,
        start: SessionSlot,
    ) -> Option<Vec<SessionSlot>> {
        let start_key = graph.waits_on(start)?;
        // A conversion: `start` holds the key it waits on.
        let start_converts = graph.holders(start_key).any(|h| h == start);
        self.begin(graph.bounds());
        let round = self.round;
        self.session_mark[start] = round;
        self.stack.clear();
        self.stack.push(start);
        while let Some(waiter) = self.stack.pop() {
            let Some(key) = graph.waits_on(waiter) else {
                continue;
            };
            if self.key_mark[key] == round {
                // The holders of `key` were pushed already, all but the session that got there
                // first. That can only matter if it was `start`, holding its own key (a
                // conversion): then `waiter` waits for `start`. (In the lock table this needs a
                // cycle that existed before `start` waited, which the table never lets happen,
                // but the search answers for any graph.)
                if key == start_key && start_converts {
                    return Some(self.path_to(start, waiter));
                }
                continue;
            }
            self.key_mark[key] = round;
            for holder in graph.holders(key) {
                if holder == waiter {
                    continue;
                }
                if holder == start {
                    return Some(self.path_to(start, waiter));
                }
                if self.session_mark[holder] != round {
                    self.session_mark[holder] = round;
                    self.parent[holder] = waiter;
                    self.stack.push(holder);
                }
            }
        }
        None
    }

    /// Starts a new search over indices below `bounds`.
    fn begin(&mut self, (sessions, keys): (usize, usize)) {
        if self.session_mark.len() < sessions {
            self.session_mark.resize(sessions, 0);
            self.parent.resize(sessions, 0);
        }
        if self.key_mark.len() < keys {
            self.key_mark.resize(keys, 0);
        }
        self.round = self.round.wrapping_add(1);
        if self.round == 0 {
            self.session_mark.iter_mut().for_each(|m| *m = 0);
            self.key_mark.iter_mut().for_each(|m| *m = 0);
            self.round = 1;
        }
    }

    /// The path `start -> ... -> last` recorded by the search that just ran.
    fn path_to(&self, start: SessionSlot, last: SessionSlot) -> Vec<SessionSlot> {
        let mut path = vec![last];
        let mut node = last;
        while node != start {
            node = self.parent[node];
            path.push(node);
        }
        path.reverse();
        path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table reduced to what the search sees: who waits on which key, who holds which key.
    #[derive(Default)]
    struct Table {
        waits_on: Vec<Option<KeySlot>>,
        holders: Vec<Vec<SessionSlot>>,
    }

    impl Table {
        fn new(sessions: usize, keys: usize) -> Self {
            Table {
                waits_on: vec![None; sessions],
                holders: vec![Vec::new(); keys],
            }
        }
        fn hold(&mut self, session: SessionSlot, key: KeySlot) -> &mut Self {
            self.holders[key].push(session);
            self
        }
        fn wait(&mut self, session: SessionSlot, key: KeySlot) -> &mut Self {
            self.waits_on[session] = Some(key);
            self
        }
    }

    impl WaitGraph for Table {
        fn waits_on(&self, session: SessionSlot) -> Option<KeySlot> {
            self.waits_on[session]
        }
        fn holders(&self, key: KeySlot) -> impl Iterator<Item = SessionSlot> + '_ {
            self.holders[key].iter().copied()
        }
        fn bounds(&self) -> (usize, usize) {
            (self.waits_on.len(), self.holders.len())
        }
    }

    #[test]
    fn three_session_ring_is_found_from_each_member_in_waits_for_order() {
        // 0 holds k0, 1 holds k1, 2 holds k2; 0 waits k1, 1 waits k2, 2 waits k0: 0 -> 1 -> 2 -> 0
        let mut t = Table::new(3, 3);
        t.hold(0, 0).hold(1, 1).hold(2, 2);
        t.wait(0, 1).wait(1, 2).wait(2, 0);
        let mut search = CycleSearch::default();
        assert_eq!(search.cycle_through(&t, 0), Some(vec![0, 1, 2]));
        assert_eq!(search.cycle_through(&t, 1), Some(vec![1, 2, 0]));
    }

    #[test]
    fn chain_without_back_edge_is_not_a_cycle() {
        // 0 -> 1 -> 2 (2 runs), and 0 -> 2 through a second holder of k1
        let mut t = Table::new(3, 3);
        t.hold(1, 1).hold(2, 1).hold(2, 2);
        t.wait(0, 1).wait(1, 2);
        let mut search = CycleSearch::default();
        assert_eq!(search.cycle_through(&t, 0), None);
        assert_eq!(search.cycle_through(&t, 2), None);
    }

    #[test]
    fn cycle_not_through_start_is_not_reported_for_start() {
        // 0 -> 1 -> 2 -> 1
        let mut t = Table::new(3, 3);
        t.hold(1, 1).hold(2, 2);
        t.wait(0, 1).wait(1, 2).wait(2, 1);
        assert_eq!(CycleSearch::default().cycle_through(&t, 0), None);
    }

    #[test]
    fn a_conversion_does_not_wait_for_its_own_shared_lock() {
        // 0 and 1 hold k0 shared; 0 waits on k0 to upgrade: 0 -> 1 only, and 1 runs.
        let mut t = Table::new(2, 1);
        t.hold(0, 0).hold(1, 0).wait(0, 0);
        assert_eq!(CycleSearch::default().cycle_through(&t, 0), None);
    }

    #[test]
    fn a_waiter_behind_a_conversion_closes_a_cycle_through_it() {
        // 0 and 1 hold k0 shared; 2 holds k1 and waits on k0 (behind, for 0 and 1); 1 waits on k1
        // (for 2); 0 converts on k0: 0 -> 1 -> 2 -> 0 (2 is behind 0 and waits for it).
        let mut t = Table::new(3, 2);
        t.hold(0, 0).hold(1, 0).hold(2, 1);
        t.wait(2, 0).wait(1, 1).wait(0, 0);
        assert_eq!(
            CycleSearch::default().cycle_through(&t, 0),
            Some(vec![0, 1, 2])
        );
    }

    #[test]
    fn a_session_that_does_not_wait_has_no_cycle() {
        let mut t = Table::new(2, 1);
        t.hold(0, 0).wait(1, 0);
        assert_eq!(CycleSearch::default().cycle_through(&t, 0), None);
    }

    #[test]
    fn a_hundred_thousand_long_chain_closed_at_the_end_is_found() {
        // i holds k_i and waits on k_{i+1}; no depth limit, no recursion.
        let n = 100_000;
        let mut t = Table::new(n, n);
        for i in 0..n {
            t.hold(i, i);
        }
        for i in 0..n - 1 {
            t.wait(i, i + 1);
        }
        let mut search = CycleSearch::default();
        assert_eq!(search.cycle_through(&t, 0), None);
        t.wait(n - 1, 0);
        let cycle = search.cycle_through(&t, 0).expect("the ring is a cycle");
        assert_eq!(cycle.len(), n);
        assert_eq!(cycle[0], 0);
        assert_eq!(cycle[n - 1], n - 1);
    }

    #[test]
    fn converging_paths_visit_each_key_once_and_find_no_cycle() {
        // 1 and 2 hold k0; 0 waits on k0 (for 1 and 2); 1 and 2 wait on k1 held by 3.
        let mut t = Table::new(4, 2);
        t.hold(1, 0).hold(2, 0).hold(3, 1);
        t.wait(0, 0).wait(1, 1).wait(2, 1);
        assert_eq!(CycleSearch::default().cycle_through(&t, 0), None);
    }
}
