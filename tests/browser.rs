//! The live page (`GET /`) in a real browser: headless Chromium, driven over WebDriver, watches
//! the server while clients over the wire build a wait chain, close a deadlock and let go. The
//! page's DOM is read by the names the page promises to keep (ids, classes and data attributes:
//! `#seq`, `#sessions`, `svg#graph g.node[data-session]`, `g.edge[data-waiter][data-holder]
//! [data-key]`, `table#keys tr[data-key]`, `ol#deadlocks li.deadlock[data-victim]`, ...), so
//! these checks hold whatever the page looks like.
//!
//! A blank or stale page cannot pass: every step waits for the page to show what the server
//! holds *now* (nodes, edges and rows naming the real session ids, the headline counts), and
//! `#seq`, the number of the snapshot shown, must have gone up since the step before. The last
//! step, an empty graph, also needs the headline to read 0 sessions at a later `#seq`, which a
//! page that stopped updating (or never started) does not show.
//!
//! Needs `chromium` and `chromium-driver` (Debian; `.ci/run` installs them when missing); fails,
//! saying so, without them. `LOCKSMITH_SKIP_BROWSER_TEST=1` skips it on purpose, loudly.
//! Screenshots of each step: `target/browser/{1-wait-chain,2-deadlock,3-empty}.png`.

mod headless;
mod wire;

use std::collections::BTreeSet;

use headless::Browser;
use serde::Deserialize;
use serde_json::json;

/// Reads, in one go (so that no re-render can fall between two reads), what the page shows:
/// the contract's elements and attributes, as JSON.
const READ_PAGE: &str = r#"
const all = (selector, root) => Array.from((root || document).querySelectorAll(selector));
const text = (id) => {
  const e = document.getElementById(id);
  return e ? e.textContent.trim() : null;
};
const sessions = (cell) =>
  cell ? all("span.entry[data-session]", cell).map((s) => s.getAttribute("data-session")) : [];
return {
  stream: document.body.getAttribute("data-stream"),
  seq: text("seq"),
  sessions: text("sessions"),
  locks: text("locks"),
  waiters: text("waiters"),
  nodes: all("svg#graph g.node[data-session]").map((g) => ({
    session: g.getAttribute("data-session"),
    text: (g.querySelector("text") || { textContent: "" }).textContent.trim(),
  })),
  edges: all("svg#graph g.edge").map((g) => ({
    waiter: g.getAttribute("data-waiter"),
    holder: g.getAttribute("data-holder"),
    key: g.getAttribute("data-key"),
  })),
  rows: all("table#keys tbody tr[data-key]").map((row) => ({
    key: row.getAttribute("data-key"),
    holders: sessions(row.querySelector("td.holders")),
    waiters: sessions(row.querySelector("td.waiters")),
  })),
  deadlocks: all("ol#deadlocks li.deadlock").map((li) => ({
    victim: li.getAttribute("data-victim"),
    members: all(".member[data-session]", li).map((m) => ({
      session: m.getAttribute("data-session"),
      victim: m.classList.contains("victim"),
    })),
  })),
};
"#;

/// What the page shows (see [`READ_PAGE`]).
#[derive(Debug, Deserialize)]
struct Page {
    /// `body[data-stream]`: "live" while the page's socket is open.
    stream: Option<String>,
    /// `#seq`: the number of the snapshot shown.
    seq: Option<String>,
    /// The headline numbers, as shown.
    sessions: Option<String>,
    locks: Option<String>,
    waiters: Option<String>,
    nodes: Vec<Node>,
    edges: Vec<Edge>,
    rows: Vec<Row>,
    deadlocks: Vec<Deadlock>,
}

/// A `g.node` of the graph.
#[derive(Debug, Deserialize)]
struct Node {
    session: Option<String>,
    text: String,
}

/// A `g.edge` of the graph.
#[derive(Debug, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
struct Edge {
    waiter: Option<String>,
    holder: Option<String>,
    key: Option<String>,
}

/// A row of the keys table, with the sessions in its holders and waiters cells.
#[derive(Debug, Deserialize)]
struct Row {
    key: Option<String>,
    holders: Vec<String>,
    waiters: Vec<String>,
}

/// An entry of the deadlocks list.
#[derive(Debug, Deserialize)]
struct Deadlock {
    victim: Option<String>,
    members: Vec<Member>,
}

/// A `.member` of a deadlock entry.
#[derive(Debug, Deserialize)]
struct Member {
    session: Option<String>,
    victim: bool,
}

impl Page {
    /// `#seq` as a number (0 when it is not one).
    fn seq(&self) -> u64 {
        self.seq
            .as_deref()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    /// The headline is live and reads `sessions`, `locks` held and `waiters`, at a `#seq` above
    /// `after`.
    fn headline(&self, sessions: u32, locks: u32, waiters: u32, after: u64) -> Result<(), String> {
        expect(
            self.stream.as_deref() == Some("live"),
            "body[data-stream=live]",
        )?;
        expect(self.seq() > after, &format!("#seq above {after}"))?;
        let shown = (
            self.sessions.as_deref(),
            self.locks.as_deref(),
            self.waiters.as_deref(),
        );
        let want = (sessions.to_string(), locks.to_string(), waiters.to_string());
        expect(
            shown == (Some(&*want.0), Some(&*want.1), Some(&*want.2)),
            &format!("#sessions {sessions}, #locks {locks}, #waiters {waiters}"),
        )
    }

    /// The graph's nodes are exactly `want`, as (session, label) pairs.
    fn nodes_are(&self, want: &[(&str, &str)]) -> Result<(), String> {
        let shown: BTreeSet<(String, String)> = self
            .nodes
            .iter()
            .map(|n| (n.session.clone().unwrap_or_default(), n.text.clone()))
            .collect();
        let want: BTreeSet<(String, String)> = want
            .iter()
            .map(|(s, t)| (s.to_string(), t.to_string()))
            .collect();
        expect(
            shown == want && self.nodes.len() == want.len(),
            &format!("the nodes {want:?}"),
        )
    }

    /// The graph's edges are exactly `want`, as (waiter, holder, key).
    fn edges_are(&self, want: &[(&str, &str, &str)]) -> Result<(), String> {
        let mut shown: Vec<&Edge> = self.edges.iter().collect();
        shown.sort();
        let mut want: Vec<Edge> = want
            .iter()
            .map(|(w, h, k)| Edge {
                waiter: Some(w.to_string()),
                holder: Some(h.to_string()),
                key: Some(k.to_string()),
            })
            .collect();
        want.sort();
        expect(
            shown.into_iter().eq(want.iter()),
            &format!("the edges {want:?}"),
        )
    }

    /// The keys table has exactly the rows `want`, as (key, holders, waiters).
    fn rows_are(&self, want: &[(&str, &[&str], &[&str])]) -> Result<(), String> {
        expect(
            self.rows.len() == want.len(),
            &format!("{} rows in the keys table", want.len()),
        )?;
        for (key, holders, waiters) in want {
            let row = self
                .rows
                .iter()
                .find(|r| r.key.as_deref() == Some(key))
                .ok_or_else(|| format!("expected a row tr[data-key={key}]"))?;
            expect(
                row.holders == *holders && row.waiters == *waiters,
                &format!("row {key}: holders {holders:?}, waiters {waiters:?}"),
            )?;
        }
        Ok(())
    }

    /// The deadlocks list holds exactly one entry: `victim` refused, `members` in its cycle.
    fn one_deadlock(&self, victim: &str, members: &[&str]) -> Result<(), String> {
        let [deadlock] = &self.deadlocks[..] else {
            return Err(format!(
                "expected one li.deadlock, the page shows {}",
                self.deadlocks.len()
            ));
        };
        expect(
            deadlock.victim.as_deref() == Some(victim),
            &format!("li.deadlock[data-victim={victim}]"),
        )?;
        let shown: BTreeSet<&str> = deadlock
            .members
            .iter()
            .filter_map(|m| m.session.as_deref())
            .collect();
        expect(
            shown == members.iter().copied().collect() && deadlock.members.len() == members.len(),
            &format!("the members {members:?}"),
        )?;
        let marked: Vec<&str> = deadlock
            .members
            .iter()
            .filter(|m| m.victim)
            .filter_map(|m| m.session.as_deref())
            .collect();
        expect(
            marked == [victim],
            &format!("only the member {victim} has class victim"),
        )
    }
}

/// `Ok` if `holds`, else "expected <what>".
fn expect(holds: bool, what: &str) -> Result<(), String> {
    if holds {
        Ok(())
    } else {
        Err(format!("expected {what}"))
    }
}

/// Waits (bounded) until the page shows what `check` wants, and returns what it showed.
async fn page_shows(
    browser: &Browser,
    step: &str,
    mut check: impl FnMut(&Page) -> Result<(), String>,
) -> Page {
    let state = browser
        .wait_until(step, READ_PAGE, |state| {
            let page: Page = serde_json::from_value(state.clone())
                .map_err(|e| format!("the page's state does not read as expected: {e}"))?;
            check(&page)
        })
        .await;
    serde_json::from_value(state).expect("read before")
}

/// Connects a raw client named `name` and learns its session id.
async fn connect_named(server: &wire::Server, name: &str) -> wire::Client {
    let mut client = wire::Client::connect(&format!("{}?name={name}", server.url())).await;
    client.learn_session().await;
    client
}

/// Sends a write `lock` on `key` without awaiting its answer (it will wait).
async fn request_lock(client: &mut wire::Client, key: &str) {
    client
        .send(json!({"command": "lock", "keys": [key], "mode": "write"}))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_page_shows_the_wait_chain_then_the_deadlock_with_its_victim_then_empties() {
    if headless::skipped() {
        return;
    }
    let server = wire::start(wire::settings()).await;
    let browser = Browser::open().await;
    browser
        .open_page(
            &format!("http://{}/", server.addr),
            r#"body[data-stream="live"]"#,
        )
        .await;

    // 1. A wait chain: C -> B -> A (C waits for k2, held by B, who waits for k1, held by A).
    let mut a = connect_named(&server, "A").await;
    let mut b = connect_named(&server, "B").await;
    let mut c = connect_named(&server, "C").await;
    let (ia, ib, ic) = (a.session.clone(), b.session.clone(), c.session.clone());
    a.lock(&["k1"], "write").await;
    b.lock(&["k2"], "write").await;
    request_lock(&mut b, "k1").await;
    server.wait_queued(&ib, "k1").await;
    c.lock(&["k3"], "write").await;
    request_lock(&mut c, "k2").await;
    server.wait_queued(&ic, "k2").await;

    let chain = page_shows(&browser, "the wait chain", |page| {
        page.headline(3, 3, 2, 0)?;
        page.nodes_are(&[(&ia, "A"), (&ib, "B"), (&ic, "C")])?;
        page.edges_are(&[(&ib, &ia, "k1"), (&ic, &ib, "k2")])?;
        page.rows_are(&[
            ("k1", &[&ia], &[&ib]),
            ("k2", &[&ib], &[&ic]),
            ("k3", &[&ic], &[]),
        ])?;
        expect(page.deadlocks.is_empty(), "no deadlock yet")
    })
    .await;
    browser.screenshot("1-wait-chain.png").await;

    // 2. A asks for k3, held by C: A -> C -> B -> A would be a cycle, so A is refused, the victim.
    a.fails(
        json!({"command": "lock", "keys": ["k3"], "mode": "write"}),
        "deadlock",
    )
    .await;
    let deadlock = page_shows(&browser, "the deadlock", |page| {
        page.headline(3, 3, 2, chain.seq())?;
        page.one_deadlock(&ia, &[&ia, &ib, &ic])?;
        // The refused request left no edge: the chain is as before.
        page.nodes_are(&[(&ia, "A"), (&ib, "B"), (&ic, "C")])?;
        page.edges_are(&[(&ib, &ia, "k1"), (&ic, &ib, "k2")])
    })
    .await;
    browser.screenshot("2-deadlock.png").await;

    // 3. Everything is released, the chain unwinding from A; then the clients leave.
    a.unlock(&["k1"]).await;
    let granted = b.recv().await;
    assert_eq!(granted["success"], json!(true), "B gets k1: {granted}");
    b.unlock(&["k1", "k2"]).await;
    let granted = c.recv().await;
    assert_eq!(granted["success"], json!(true), "C gets k2: {granted}");
    c.unlock(&["k2", "k3"]).await;
    server
        .wait_for("an empty lock table", |snapshot| snapshot.is_empty())
        .await;
    a.close().await;
    b.close().await;
    c.close().await;
    server.wait_idle().await;

    page_shows(&browser, "an empty graph", |page| {
        page.headline(0, 0, 0, deadlock.seq())?;
        expect(page.nodes.is_empty(), "no node")?;
        expect(page.edges.is_empty(), "no edge")?;
        expect(page.rows.is_empty(), "no row in the keys table")?;
        // The history stays.
        page.one_deadlock(&ia, &[&ia, &ib, &ic])
    })
    .await;
    browser.screenshot("3-empty.png").await;

    browser.close().await;
    server.stop().await;
    wire::assert_no_server_panics();
}
