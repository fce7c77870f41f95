//! A cheap watch on a [`CancellationToken`], for a loop that checks it on every turn.
//!
//! `tokio_util`'s token answers `is_cancelled` under a mutex, and a fresh `cancelled()` future
//! registers with the token's `Notify` (and unregisters when dropped) under another. A
//! connection's request loop used to do both for three tokens (shutdown, kill, takeover) several
//! times per request; the shutdown token is shared by every connection, so those mutexes were
//! contended between the worker threads (BENCHMARKS.md, issue 8: 3.4 % of the server's CPU at
//! 50 clients, over 6 % at 1,000).
//!
//! A [`CancelLatch`] polls the token's `cancelled()` future once, with a waker of its own (a
//! [`Relay`]) that raises a flag and wakes the task that last waited on the latch. From then on
//! a check is one atomic swap, and the token is looked at again only when the flag says its
//! future was woken — which happens only when the token is cancelled. Once cancelled, the latch
//! stays so, as the token does.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// A latched view of one [`CancellationToken`]. See the module documentation.
pub struct CancelLatch {
    /// The token's own future, registered with its `Notify` on the first check and kept
    /// registered, so cancelling the token wakes `relay`.
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Set by the token's wake-up; wakes whoever waits on the latch.
    relay: Arc<Relay>,
    /// `relay` as a waker, made once: the token's future keeps it and never needs to replace it.
    relay_waker: Waker,
    /// What the latch knows so far.
    state: State,
}

/// What a [`CancelLatch`] knows about its token.
#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// Never checked: the token's future is not registered yet.
    Unchecked,
    /// Not cancelled when last checked; the token's future is registered.
    Waiting,
    /// Cancelled (for good).
    Cancelled,
}

/// The waker the token's future is polled with: it records the wake-up and passes it on.
struct Relay {
    /// The token's future was woken since the latch last looked.
    woken: AtomicBool,
    /// The task waiting in [`CancelLatch::cancelled`], if any.
    task: AtomicWaker,
}

impl Wake for Relay {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl CancelLatch {
    /// A latch on `token`. Nothing is registered until the first check.
    pub fn new(token: &CancellationToken) -> Self {
        let relay = Arc::new(Relay {
            woken: AtomicBool::new(false),
            task: AtomicWaker::new(),
        });
        CancelLatch {
            cancelled: Box::pin(token.clone().cancelled_owned()),
            relay_waker: Waker::from(Arc::clone(&relay)),
            relay,
            state: State::Unchecked,
        }
    }

    /// Is the token cancelled? After the first call, an atomic swap unless the token fired.
    pub fn is_cancelled(&mut self) -> bool {
        match self.state {
            State::Cancelled => true,
            State::Waiting if !self.relay.woken.swap(false, Ordering::AcqRel) => false,
            State::Waiting | State::Unchecked => {
                let mut context = Context::from_waker(&self.relay_waker);
                self.state = match self.cancelled.as_mut().poll(&mut context) {
                    Poll::Ready(()) => State::Cancelled,
                    Poll::Pending => State::Waiting,
                };
                self.state == State::Cancelled
            }
        }
    }

    /// Resolves once the token is cancelled (at once if it already is).
    pub fn cancelled(&mut self) -> impl Future<Output = ()> + '_ {
        poll_fn(|context| {
            // Registered before the check: a cancellation after the check still wakes us.
            self.relay.task.register(context.waker());
            if self.is_cancelled() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;

    /// Bounds every wait in these tests: a latch that misses its wake-up fails, not hangs.
    const LIMIT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn a_latch_reports_a_cancellation_made_before_its_first_check() {
        let token = CancellationToken::new();
        token.cancel();
        let mut latch = CancelLatch::new(&token);
        assert!(latch.is_cancelled());
        tokio::time::timeout(LIMIT, latch.cancelled())
            .await
            .expect("an already cancelled latch resolves at once");
    }

    #[tokio::test]
    async fn a_latch_stays_uncancelled_until_its_token_is_cancelled_then_stays_cancelled() {
        let token = CancellationToken::new();
        let mut latch = CancelLatch::new(&token);
        for _ in 0..3 {
            assert!(!latch.is_cancelled());
        }
        token.cancel();
        assert!(latch.is_cancelled());
        assert!(latch.is_cancelled(), "cancelled for good");
    }

    #[tokio::test]
    async fn a_task_waiting_on_a_latch_is_woken_by_a_cancellation_from_another_task() {
        let token = CancellationToken::new();
        let mut latch = CancelLatch::new(&token);
        assert!(!latch.is_cancelled());
        let canceller = token.clone();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let waiter = tokio::spawn(async move {
            let waiting = latch.cancelled();
            tokio::pin!(waiting);
            // Polled once (registered, pending) before the cancellation is allowed to happen.
            assert!(futures_util::poll!(waiting.as_mut()).is_pending());
            let _ = ready_tx.send(());
            tokio::time::timeout(LIMIT, waiting).await.is_ok()
        });
        ready_rx.await.expect("the waiter registered");
        canceller.cancel();
        assert!(
            waiter.await.expect("the waiter ran"),
            "woken by the cancellation"
        );
    }

    #[tokio::test]
    async fn a_latch_on_a_child_token_sees_its_parent_cancelled() {
        let parent = CancellationToken::new();
        let mut latch = CancelLatch::new(&parent.child_token());
        assert!(!latch.is_cancelled());
        parent.cancel();
        tokio::time::timeout(LIMIT, latch.cancelled())
            .await
            .expect("the parent's cancellation reaches the child's latch");
    }
}
