//! The last deadlocks the server refused, for the live page: each cycle as it was, with the
//! names its members had, and the count since the server started.
//!
//! A session records its deadlock when its request is refused; the live view reads the record.
//! The history keeps the last [`KEPT`] only, so a storm of deadlocks costs a bounded amount of
//! memory (and one short critical section per deadlock).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use crate::protocol::NamedMember;

/// How many deadlocks the history keeps.
pub const KEPT: usize = 10;

/// One refused deadlock.
#[derive(Clone, Debug)]
pub struct Deadlock {
    /// When it was refused.
    pub at: SystemTime,
    /// The cycle, starting with the refused requester (the victim), each member with the key
    /// it waited for and its name, if it had one.
    pub cycle: Vec<NamedMember>,
}

/// The history. Cloning it is cheap; all clones share one record.
#[derive(Clone, Default)]
pub struct DeadlockHistory {
    shared: Arc<Mutex<Record>>,
}

#[derive(Default)]
struct Record {
    /// The last [`KEPT`], newest first.
    last: VecDeque<Deadlock>,
    /// Deadlocks refused since the server started.
    total: u64,
}

impl DeadlockHistory {
    /// Records a refused deadlock.
    pub fn record(&self, cycle: Vec<NamedMember>) {
        let mut record = self.record_guard();
        record.total += 1;
        if record.last.len() == KEPT {
            record.last.pop_back();
        }
        record.last.push_front(Deadlock {
            at: SystemTime::now(),
            cycle,
        });
    }

    /// The last deadlocks (newest first) and how many there have been in all.
    pub fn recent(&self) -> (Vec<Deadlock>, u64) {
        let record = self.record_guard();
        (record.last.iter().cloned().collect(), record.total)
    }

    /// Locks the record. A panic while it was held cannot leave it half-written, so a poisoned
    /// lock is used as is.
    fn record_guard(&self) -> MutexGuard<'_, Record> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::{CycleMember, Key, SessionId};

    fn cycle(n: u128) -> Vec<NamedMember> {
        vec![NamedMember {
            member: CycleMember {
                session: SessionId::from_u128(n),
                waiting_for_key: Key::from("k"),
            },
            name: None,
        }]
    }

    #[test]
    fn the_history_keeps_the_last_ten_newest_first_and_counts_them_all() {
        let history = DeadlockHistory::default();
        for n in 0..25 {
            history.record(cycle(n));
        }
        let (last, total) = history.recent();
        assert_eq!(total, 25);
        let sessions: Vec<SessionId> = last.iter().map(|d| d.cycle[0].member.session).collect();
        let expected: Vec<SessionId> = (15..25).rev().map(SessionId::from_u128).collect();
        assert_eq!(sessions, expected);
    }
}
