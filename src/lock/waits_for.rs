//! The waits-for graph and the deadlock detector.
//!
//! Nodes are sessions; an edge `a -> b` means "session `a` is waiting for a lock that `b` holds in a
//! conflicting mode, or that `b` is queued for ahead of `a` in a conflicting mode". The lock table
//! ([`super::table`]) decides which edges exist; this module only stores them (in a petgraph
//! `StableDiGraph`, so node indices survive removals) and answers one question exactly: is there a
//! path from a session back to itself?
//!
//! Invariant kept by the lock table: outside a call, the stored graph is acyclic. A cycle can only
//! be closed when a session starts to wait (it gains out-edges), so the table checks
//! [`WaitsForGraph::cycle_through`] for that session right after setting its edges and, if a cycle
//! exists, takes the edges out again and fails the request. The search is an iterative depth-first
//! search with no depth limit: it never gives up and guesses "deadlock".

use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::{EdgeRef, NodeIndexable};
use petgraph::Direction;

use super::types::SessionId;

/// A node of the waits-for graph: one open session.
pub type SessionNode = NodeIndex<u32>;

/// The waits-for graph plus the scratch space its search reuses (so a check allocates nothing once
/// warmed up).
#[derive(Default)]
pub struct WaitsForGraph {
    /// One node per open session, weighted with its id; edges carry no data.
    graph: StableDiGraph<SessionId, ()>,
    /// `visited[n] == epoch` marks node `n` as seen by the current search.
    visited: Vec<u32>,
    /// The node from which the current search first reached `n` (valid where `visited[n] == epoch`).
    parent: Vec<SessionNode>,
    /// Incremented per search, so `visited` never needs clearing.
    epoch: u32,
    /// The depth-first search stack, kept to reuse its allocation.
    stack: Vec<SessionNode>,
    /// Scratch space of `set_waits_for`: the wanted targets and the edges to remove.
    wanted: Vec<SessionNode>,
    stale: Vec<petgraph::stable_graph::EdgeIndex<u32>>,
}

impl WaitsForGraph {
    /// Adds a session with no edges.
    pub fn add_session(&mut self, session: SessionId) -> SessionNode {
        self.graph.add_node(session)
    }

    /// Removes a session and every edge into or out of it.
    pub fn remove_session(&mut self, node: SessionNode) {
        self.graph.remove_node(node);
    }

    /// Replaces the out-edges of `waiter` by edges to `targets` (duplicates and `waiter` itself are
    /// ignored: a session never waits for itself).
    pub fn set_waits_for(&mut self, waiter: SessionNode, targets: &[SessionNode]) {
        self.wanted.clear();
        self.wanted
            .extend(targets.iter().copied().filter(|&t| t != waiter));
        self.wanted.sort_unstable();
        self.wanted.dedup();
        // Remove the edges no longer wanted; what is left of `wanted` afterwards is new.
        self.stale.clear();
        for edge in self.graph.edges_directed(waiter, Direction::Outgoing) {
            match self.wanted.binary_search(&edge.target()) {
                Ok(index) => {
                    self.wanted.remove(index);
                }
                Err(_) => self.stale.push(edge.id()),
            }
        }
        for &edge in &self.stale {
            self.graph.remove_edge(edge);
        }
        for &target in &self.wanted {
            self.graph.add_edge(waiter, target, ());
        }
    }

    /// Removes the edges into `target` whose waiter `from` accepts.
    pub fn remove_edges_into(
        &mut self,
        target: SessionNode,
        mut from: impl FnMut(SessionId) -> bool,
    ) {
        self.stale.clear();
        for edge in self.graph.edges_directed(target, Direction::Incoming) {
            if from(self.graph[edge.source()]) {
                self.stale.push(edge.id());
            }
        }
        for &edge in &self.stale {
            self.graph.remove_edge(edge);
        }
    }

    /// Removes every out-edge of `waiter`: it is no longer waiting.
    pub fn clear_waits(&mut self, waiter: SessionNode) {
        while let Some(edge) = self
            .graph
            .edges_directed(waiter, Direction::Outgoing)
            .next()
            .map(|e| e.id())
        {
            self.graph.remove_edge(edge);
        }
    }

    /// Does `waiter` have any out-edge?
    pub fn is_waiting(&self, waiter: SessionNode) -> bool {
        self.graph.neighbors(waiter).next().is_some()
    }

    /// The sessions `waiter` waits for.
    pub fn waits_for(&self, waiter: SessionNode) -> impl Iterator<Item = SessionNode> + '_ {
        self.graph.neighbors(waiter)
    }

    /// The session id of a node.
    pub fn session(&self, node: SessionNode) -> Option<SessionId> {
        self.graph.node_weight(node).copied()
    }

    /// Every edge as `(waiter, waited-for)` session ids.
    pub fn edges(&self) -> Vec<(SessionId, SessionId)> {
        self.graph
            .edge_indices()
            .filter_map(|e| {
                let (a, b) = self.graph.edge_endpoints(e)?;
                Some((self.graph[a], self.graph[b]))
            })
            .collect()
    }

    /// Finds a cycle through `start`, if there is one: the nodes of the cycle in edge order,
    /// starting with `start` (the last node has an edge back to `start`).
    ///
    /// Exact and iterative: it visits every node reachable from `start` at most once, so the cost
    /// is linear in the part of the graph reachable from `start`, and no depth makes it give up.
    pub fn cycle_through(&mut self, start: SessionNode) -> Option<Vec<SessionNode>> {
        let bound = self.graph.node_bound();
        if self.visited.len() < bound {
            self.visited.resize(bound, 0);
            self.parent.resize(bound, start);
        }
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.visited.iter_mut().for_each(|v| *v = 0);
            self.epoch = 1;
        }
        let epoch = self.epoch;
        self.stack.clear();
        self.visited[start.index()] = epoch;
        self.stack.push(start);
        while let Some(node) = self.stack.pop() {
            for next in self.graph.neighbors(node) {
                if next == start {
                    return Some(self.path_to(start, node));
                }
                if self.visited[next.index()] != epoch {
                    self.visited[next.index()] = epoch;
                    self.parent[next.index()] = node;
                    self.stack.push(next);
                }
            }
        }
        None
    }

    /// The path `start -> ... -> last` recorded in `parent` by the search that just ran.
    fn path_to(&self, start: SessionNode, last: SessionNode) -> Vec<SessionNode> {
        let mut path = vec![last];
        let mut node = last;
        while node != start {
            node = self.parent[node.index()];
            path.push(node);
        }
        path.reverse();
        path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph_with(n: usize) -> (WaitsForGraph, Vec<SessionNode>) {
        let mut graph = WaitsForGraph::default();
        let nodes = (0..n)
            .map(|_| graph.add_session(SessionId::new_random()))
            .collect();
        (graph, nodes)
    }

    #[test]
    fn three_session_ring_is_found_from_each_member_in_edge_order() {
        // 0 -> 1 -> 2 -> 0
        let (mut g, n) = graph_with(3);
        g.set_waits_for(n[0], &[n[1]]);
        g.set_waits_for(n[1], &[n[2]]);
        g.set_waits_for(n[2], &[n[0]]);
        assert_eq!(g.cycle_through(n[0]), Some(vec![n[0], n[1], n[2]]));
        assert_eq!(g.cycle_through(n[1]), Some(vec![n[1], n[2], n[0]]));
    }

    #[test]
    fn chain_without_back_edge_is_not_a_cycle() {
        // 0 -> 1 -> 2, 0 -> 2
        let (mut g, n) = graph_with(3);
        g.set_waits_for(n[0], &[n[1], n[2]]);
        g.set_waits_for(n[1], &[n[2]]);
        assert_eq!(g.cycle_through(n[0]), None);
        assert_eq!(g.cycle_through(n[2]), None);
    }

    #[test]
    fn cycle_not_through_start_is_not_reported_for_start() {
        // 0 -> 1 -> 2 -> 1
        let (mut g, n) = graph_with(3);
        g.set_waits_for(n[0], &[n[1]]);
        g.set_waits_for(n[1], &[n[2]]);
        g.set_waits_for(n[2], &[n[1]]);
        assert_eq!(g.cycle_through(n[0]), None);
    }

    #[test]
    fn self_edges_are_never_stored() {
        let (mut g, n) = graph_with(1);
        g.set_waits_for(n[0], &[n[0]]);
        assert!(!g.is_waiting(n[0]));
        assert_eq!(g.cycle_through(n[0]), None);
    }

    #[test]
    fn a_hundred_thousand_long_chain_closed_at_the_end_is_found() {
        // 0 -> 1 -> ... -> 99_999 -> 0: no depth limit, no recursion.
        let (mut g, n) = graph_with(100_000);
        for w in n.windows(2) {
            g.set_waits_for(w[0], &[w[1]]);
        }
        assert_eq!(g.cycle_through(n[0]), None);
        g.set_waits_for(n[99_999], &[n[0]]);
        let cycle = g.cycle_through(n[0]).expect("the ring is a cycle");
        assert_eq!(cycle.len(), 100_000);
        assert_eq!(cycle[0], n[0]);
        assert_eq!(cycle[99_999], n[99_999]);
    }

    #[test]
    fn clearing_edges_breaks_the_cycle() {
        let (mut g, n) = graph_with(2);
        g.set_waits_for(n[0], &[n[1]]);
        g.set_waits_for(n[1], &[n[0]]);
        g.clear_waits(n[1]);
        assert_eq!(g.cycle_through(n[0]), None);
        assert_eq!(g.edges().len(), 1);
    }

    #[test]
    fn removing_a_session_removes_its_edges_both_ways() {
        let (mut g, n) = graph_with(3);
        g.set_waits_for(n[0], &[n[1]]);
        g.set_waits_for(n[1], &[n[2]]);
        g.remove_session(n[1]);
        assert!(g.edges().is_empty());
        assert!(!g.is_waiting(n[0]));
    }
}
