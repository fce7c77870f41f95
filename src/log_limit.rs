//! A rate limit for a log line that can come in storms (deadlocks under load, requests refused
//! for their token): at most one line per interval, and the next line written says how many were
//! suppressed meanwhile. Time is passed in, so it is tested without sleeping.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// How often the deadlock line may be written.
pub const DEADLOCK_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// How often the line about a request refused for its token (HTTP 401) may be written.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// One rate-limited log line. See the module documentation.
#[derive(Debug)]
pub struct LogLimit {
    /// At most one line per this long.
    interval: Duration,
    /// When the last line was written (`None`: never).
    last: Option<Instant>,
    /// Lines suppressed since the last one written.
    suppressed: u64,
}

impl LogLimit {
    /// A limit of one line per `interval`.
    pub fn new(interval: Duration) -> Self {
        LogLimit {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// May a line be written at `now`? `Some(n)`: yes, and `n` lines were suppressed since the
    /// last one (say so in the line); `None`: no (it is counted).
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        let due = self
            .last
            .is_none_or(|last| now.saturating_duration_since(last) >= self.interval);
        if !due {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Runs `log` with the number of lines left out since the last one, unless `limit` says a line
/// was written less than its interval ago.
pub fn log_limited(limit: &Mutex<LogLimit>, log: impl FnOnce(u64)) {
    let allowed = limit
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .allow(tokio::time::Instant::now());
    if let Some(suppressed) = allowed {
        log(suppressed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_one_line_per_interval_and_the_next_counts_the_suppressed() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut limit = LogLimit::new(Duration::from_secs(1));
        assert_eq!(limit.allow(at(0)), Some(0));
        assert_eq!(limit.allow(at(10)), None);
        assert_eq!(limit.allow(at(500)), None);
        assert_eq!(limit.allow(at(999)), None);
        assert_eq!(limit.allow(at(1000)), Some(3));
        assert_eq!(limit.allow(at(1500)), None);
        assert_eq!(limit.allow(at(5000)), Some(1));
        assert_eq!(limit.allow(at(6000)), Some(0));
    }
}
