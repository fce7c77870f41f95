//! Helpers shared by the integration tests. Each test binary includes this module with `mod
//! common;` and uses only part of it.
#![allow(dead_code)]

use std::future::Future;

use futures_util::FutureExt;
use locksmith::lock::{Key, LockManager, LockManagerConfig, LockMode, SessionId, Snapshot};

/// A manager with the default configuration.
pub fn manager() -> LockManager {
    LockManager::new(LockManagerConfig::default())
}

/// A key from a string.
pub fn key(name: &str) -> Key {
    Key::from(name)
}

/// Keys from strings, in the order given.
pub fn keys(names: &[&str]) -> Vec<Key> {
    names.iter().map(|n| Key::from(*n)).collect()
}

/// Polls `future` once with a no-op waker: `Some(output)` if it finished, `None` if it is pending.
/// Polling an `acquire` future once runs its whole synchronous part, so afterwards the request is
/// either decided or queued in the table.
pub fn poll_once<F: Future + Unpin>(future: &mut F) -> Option<F::Output> {
    future.now_or_never()
}

/// The sessions queued on `key`, head first, with the mode each asked for.
pub fn queue_of(snapshot: &Snapshot, key: &Key) -> Vec<(SessionId, LockMode)> {
    snapshot
        .key(key)
        .map(|k| k.queue.iter().map(|w| (w.session, w.mode)).collect())
        .unwrap_or_default()
}

/// The sessions holding `key`, in grant order, with their modes.
pub fn holders_of(snapshot: &Snapshot, key: &Key) -> Vec<(SessionId, LockMode)> {
    snapshot
        .key(key)
        .map(|k| k.holders.iter().map(|h| (h.session, h.mode)).collect())
        .unwrap_or_default()
}

/// Is `session` queued on `key` in the manager right now?
pub fn is_queued(manager: &LockManager, session: SessionId, key: &Key) -> bool {
    queue_of(&manager.snapshot(), key)
        .iter()
        .any(|(s, _)| *s == session)
}

/// The sessions `session` waits for, according to the snapshot's waits-for edges, sorted.
pub fn waits_for_of(snapshot: &Snapshot, session: SessionId) -> Vec<SessionId> {
    let mut targets: Vec<SessionId> = snapshot
        .waits_for
        .iter()
        .filter(|(from, _)| *from == session)
        .map(|(_, to)| *to)
        .collect();
    targets.sort_unstable();
    targets
}

/// `ids` sorted, to compare with [`waits_for_of`].
pub fn sorted(mut ids: Vec<SessionId>) -> Vec<SessionId> {
    ids.sort_unstable();
    ids
}

/// Yields to the runtime until `condition` holds, for at most `max_yields` turns; panics with
/// `what` otherwise. A bounded wait on an event that does not depend on the clock, so it also works
/// under `tokio::time::pause()`.
pub async fn yield_until(what: &str, max_yields: usize, mut condition: impl FnMut() -> bool) {
    for _ in 0..max_yields {
        if condition() {
            return;
        }
        tokio::task::yield_now().await;
    }
    assert!(condition(), "gave up waiting until {what}");
}

/// Rule 6's invariant, seen from outside: every queued session waits for somebody (has at least
/// one waits-for edge), so no waiter is left waiting for a key that nobody blocks. Returns the
/// waiters that break it.
pub fn idle_waiters(snapshot: &Snapshot) -> Vec<(SessionId, Key)> {
    snapshot
        .keys
        .iter()
        .flat_map(|k| k.queue.iter().map(move |w| (w.session, k.key.clone())))
        .filter(|(session, _)| !snapshot.waits_for.iter().any(|(from, _)| from == session))
        .collect()
}

/// The number of cases a property test runs: `PROPTEST_CASES` if set, else `default`.
pub fn proptest_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A proptest runner with a fixed seed, to generate the same cases on every run (the coverage
/// tests that check generated cases are not vacuous).
pub fn deterministic_runner() -> proptest::test_runner::TestRunner {
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    TestRunner::new_with_rng(
        Config::default(),
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    )
}
