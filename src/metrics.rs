//! The server's Prometheus metrics, served on `/metrics` in the Prometheus text format (0.0.4).
//!
//! Each server has its own [`prometheus_client`] `Registry` (no global recorder), so servers
//! started side by side in one process — the tests — count separately. [`Metrics`] is a cheap
//! `Clone` handle around it, handed to whoever records: the connection (requests), the session
//! (lock waits and their outcomes, sessions opened), the accept loop and the routes (connections
//! refused); the durable store records its commits in a [`CommitMetrics`] of its own, which the
//! server registers.
//!
//! Two kinds of metric:
//! - **Recorded** as things happen: counters and histograms. The hot path pays one atomic add
//!   per counter and one short uncontended mutex per histogram observation, never a label lookup:
//!   the per-label handles are kept in arrays indexed by [`CommandKind`] and by the position of
//!   the error code in [`CODES`], filled on first use (so the exposition lists only the
//!   combinations seen).
//! - **Read at scrape time** by a collector ([`Live`]): the gauges of the lock table
//!   ([`LockManager::gauges`], one pass over the table under its mutex), the suspended sessions
//!   and the suspension counters. Nothing is kept up to date for them between scrapes.
//!
//! The metric names, their labels and meaning are listed in the README (`## Observe`).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::lock::{LockError, LockManager};
use crate::protocol::CommandKind;
use crate::suspension::Suspensions;

/// The `Content-Type` of `/metrics`: the Prometheus text format, version 0.0.4. (Not
/// OpenMetrics: there a counter's family is named without `_total`, so the counter
/// `locksmith_sessions_suspended_total` and the gauge `locksmith_sessions_suspended` would be
/// two families of one name.)
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Every code a request is answered with: `ok`, then every wire error code
/// ([`ServiceError::code`](crate::protocol::ServiceError::code)). A code missing here is still
/// counted, through a label lookup.
pub const CODES: [&str; 20] = [
    "ok",
    "bad_request",
    "unknown_command",
    "too_large",
    "too_many_keys",
    "server_busy",
    "shutting_down",
    "deadlock",
    "timeout",
    "not_held",
    "session_closed",
    "cancelled",
    "too_many_locks",
    "invalid_request",
    "storage_error",
    "killed",
    "forbidden",
    "not_found",
    "session_expired",
    "taken_over",
];

/// The `command` label of a frame whose command could not be read (not JSON, no `command`,
/// an unknown one, a binary frame, a frame over the size limit).
pub const INVALID_COMMAND: &str = "invalid";

/// Upper bounds of the request and lock-wait histograms, in seconds: 50 µs to 30 s.
const LATENCY_BUCKETS: [f64; 18] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Upper bounds of the commit-duration histogram, in seconds: 100 µs to 10 s.
const COMMIT_BUCKETS: [f64; 14] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0,
];

/// Why a connection (or a plain HTTP request) was refused: the `reason` label of
/// `locksmith_connections_refused_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Over `--max-connections` (answered `server_busy`), or over the TCP connections the
    /// accept loop allows (closed at accept).
    Busy,
    /// No token, or a wrong one (HTTP 401).
    Unauthorized,
    /// A WebSocket upgrade from an `Origin` not allowed (HTTP 403).
    Origin,
    /// The upgrade (or plain HTTP request) was not complete within `--handshake-timeout`.
    HandshakeTimeout,
    /// Accepted and closed at once: the process was out of file descriptors.
    OutOfDescriptors,
}

impl Refusal {
    /// Every reason, in declaration order.
    const ALL: [Refusal; 5] = [
        Refusal::Busy,
        Refusal::Unauthorized,
        Refusal::Origin,
        Refusal::HandshakeTimeout,
        Refusal::OutOfDescriptors,
    ];

    /// The label value.
    fn label(self) -> &'static str {
        match self {
            Refusal::Busy => "busy",
            Refusal::Unauthorized => "unauthorized",
            Refusal::Origin => "origin",
            Refusal::HandshakeTimeout => "handshake_timeout",
            Refusal::OutOfDescriptors => "out_of_descriptors",
        }
    }
}

/// Labels of a request counter: `command`, `code`.
type RequestLabels = [(&'static str, &'static str); 2];
/// Labels with one pair (`command`, or `reason`).
type OneLabel = [(&'static str, &'static str); 1];
/// How a histogram family makes a new histogram.
type NewHistogram = fn() -> Histogram;

/// The server's metrics. Cloning it is cheap; all clones record into one registry.
#[derive(Clone)]
pub struct Metrics {
    shared: Arc<Shared>,
}

/// Everything behind the handle.
struct Shared {
    /// What `/metrics` encodes: every metric below, the store's and the [`Live`] collector.
    registry: Registry,
    /// `locksmith_requests_total{command, code}`: the family, for the exposition and for codes
    /// not in [`CODES`].
    requests: Family<RequestLabels, Counter>,
    /// The handles of `requests`, one per known command (then `invalid`) and code, made on first
    /// use: recording a request looks nothing up.
    request_slots: Vec<[OnceLock<Counter>; CODES.len()]>,
    /// `locksmith_request_duration_seconds{command}`: the family.
    durations: Family<OneLabel, Histogram, NewHistogram>,
    /// Its handles, one per known command, then `invalid`.
    duration_slots: Vec<OnceLock<Histogram>>,
    /// `locksmith_lock_wait_seconds`: time in the lock manager's acquire.
    lock_wait: Histogram,
    /// `locksmith_connections_refused_total{reason}`, indexed like [`Refusal::ALL`].
    refused: [Counter; Refusal::ALL.len()],
    /// `locksmith_grants_total`: lock requests granted (`lock`, `read`, `write`, `delete`).
    grants: Counter,
    /// `locksmith_deadlocks_total`: requests refused because waiting would close a cycle.
    deadlocks: Counter,
    /// `locksmith_lock_timeouts_total`: requests whose lock wait reached its deadline.
    lock_timeouts: Counter,
    /// `locksmith_cancellations_total`: lock waits withdrawn by their session (`cancel`, or a
    /// release of the session) and answered `cancelled`.
    cancellations: Counter,
    /// `locksmith_sessions_opened_total`: one per WebSocket connection served.
    sessions_opened: Counter,
}

/// Where the scrape-time metrics are read from.
pub struct Sources {
    /// The lock table's gauges.
    pub locks: LockManager,
    /// Suspended sessions and the suspension counters.
    pub suspensions: Suspensions,
    /// The store's commit metrics (`None`: a store that does not commit, such as the in-memory
    /// one; the commit metrics are then listed at zero).
    pub commits: Option<CommitMetrics>,
}

impl Metrics {
    /// A registry with every metric, the scrape-time ones read from `sources`.
    pub fn new(sources: Sources) -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "locksmith_requests",
            "Requests answered, by command (\"invalid\" when the frame named none) and answer code (\"ok\" or the wire error code)",
            requests.clone(),
        );
        let durations: Family<OneLabel, Histogram, NewHistogram> =
            Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS));
        registry.register_with_unit(
            "locksmith_request_duration",
            "Time from a request's decoding to its answer, by command (queueing behind the connection's earlier requests included)",
            Unit::Seconds,
            durations.clone(),
        );
        let lock_wait = Histogram::new(LATENCY_BUCKETS);
        registry.register_with_unit(
            "locksmith_lock_wait",
            "Time lock, read, write and delete requests spent in the lock manager's acquire (granted or not)",
            Unit::Seconds,
            lock_wait.clone(),
        );
        let refused_family = Family::<OneLabel, Counter>::default();
        let refused = Refusal::ALL
            .map(|reason| refused_family.get_or_create_owned(&[("reason", reason.label())]));
        registry.register(
            "locksmith_connections_refused",
            "Connections or HTTP requests refused, by reason",
            refused_family,
        );
        let mut counter = |name: &str, help: &str| {
            let counter = Counter::default();
            registry.register(name, help, counter.clone());
            counter
        };
        let grants = counter(
            "locksmith_grants",
            "Lock requests granted (lock, read, write, delete)",
        );
        let deadlocks = counter(
            "locksmith_deadlocks",
            "Lock requests refused because waiting would have closed a deadlock cycle",
        );
        let lock_timeouts = counter(
            "locksmith_lock_timeouts",
            "Lock requests whose wait reached its deadline (try-locks included)",
        );
        let cancellations = counter(
            "locksmith_cancellations",
            "Lock waits withdrawn by their own session and answered cancelled",
        );
        let sessions_opened = counter(
            "locksmith_sessions_opened",
            "Sessions opened (one per WebSocket connection served)",
        );
        sources.commits.unwrap_or_default().register(&mut registry);
        registry.register_collector(Box::new(Live {
            locks: sources.locks,
            suspensions: sources.suspensions,
        }));
        let slots = CommandKind::ALL.len() + 1;
        Metrics {
            shared: Arc::new(Shared {
                registry,
                requests,
                request_slots: (0..slots).map(|_| Default::default()).collect(),
                durations,
                duration_slots: (0..slots).map(|_| OnceLock::new()).collect(),
                lock_wait,
                refused,
                grants,
                deadlocks,
                lock_timeouts,
                cancellations,
                sessions_opened,
            }),
        }
    }

    /// The exposition, in the Prometheus text format ([`CONTENT_TYPE`]).
    ///
    /// # Errors
    /// Only if encoding fails, which writing to a `String` does not.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.shared.registry)?;
        Ok(text)
    }

    /// One request answered with `code` (`"ok"` or its error's wire code), `elapsed` after it
    /// was decoded. `command` is `None` for a frame that named no known command.
    pub fn request(&self, command: Option<CommandKind>, code: &'static str, elapsed: Duration) {
        let shared = &*self.shared;
        let slot = command.map_or(CommandKind::ALL.len(), |kind| kind as usize);
        let name = command.map_or(INVALID_COMMAND, CommandKind::name);
        match CODES.iter().position(|known| *known == code) {
            Some(index) => shared.request_slots[slot][index]
                .get_or_init(|| {
                    shared
                        .requests
                        .get_or_create_owned(&[("command", name), ("code", code)])
                })
                .inc(),
            None => shared
                .requests
                .get_or_create(&[("command", name), ("code", code)])
                .inc(),
        };
        shared.duration_slots[slot]
            .get_or_init(|| shared.durations.get_or_create_owned(&[("command", name)]))
            .observe(elapsed.as_secs_f64());
    }

    /// One lock acquire of a request ended after `waited`, with `outcome` (granted, or why
    /// not): the lock-wait histogram and the grant, deadlock, timeout and cancellation counters.
    pub fn lock_acquired<T>(&self, waited: Duration, outcome: &Result<T, LockError>) {
        let shared = &*self.shared;
        shared.lock_wait.observe(waited.as_secs_f64());
        match outcome {
            Ok(_) => shared.grants.inc(),
            Err(LockError::Deadlock { .. }) => shared.deadlocks.inc(),
            Err(LockError::Timeout { .. }) => shared.lock_timeouts.inc(),
            Err(LockError::Cancelled) => shared.cancellations.inc(),
            Err(_) => return,
        };
    }

    /// A session was opened.
    pub fn session_opened(&self) {
        self.shared.sessions_opened.inc();
    }

    /// A connection or HTTP request was refused for `reason`.
    pub fn refused(&self, reason: Refusal) {
        self.shared.refused[reason as usize].inc();
    }
}

/// The durable store's commit metrics, recorded by its writer thread. Cloning it is cheap; the
/// server registers the clones in its registry.
#[derive(Clone, Debug)]
pub struct CommitMetrics {
    /// `locksmith_store_commits_total`: group commits that succeeded.
    pub commits: Counter,
    /// `locksmith_storage_errors_total`: group commits that failed (every write of the batch is
    /// answered `storage_error`), a failed reopen of the database included.
    pub errors: Counter,
    /// `locksmith_store_commit_duration_seconds`: the time of one group commit, fsync included.
    pub duration: Histogram,
    /// `locksmith_store_commit_batch_size`: writes per group commit.
    pub batch_size: Histogram,
}

impl Default for CommitMetrics {
    fn default() -> Self {
        CommitMetrics {
            commits: Counter::default(),
            errors: Counter::default(),
            duration: Histogram::new(COMMIT_BUCKETS),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
        }
    }
}

impl CommitMetrics {
    /// One group commit of `writes` writes took `elapsed` and succeeded or not.
    pub fn commit(&self, writes: usize, elapsed: Duration, succeeded: bool) {
        if succeeded {
            self.commits.inc();
        } else {
            self.errors.inc();
        }
        self.duration.observe(elapsed.as_secs_f64());
        self.batch_size.observe(writes as f64);
    }

    fn register(self, registry: &mut Registry) {
        registry.register(
            "locksmith_store_commits",
            "Group commits of the durable store that succeeded",
            self.commits,
        );
        registry.register(
            "locksmith_storage_errors",
            "Group commits of the durable store that failed (their writes answered storage_error)",
            self.errors,
        );
        registry.register_with_unit(
            "locksmith_store_commit_duration",
            "Time of one group commit of the durable store, fsync included",
            Unit::Seconds,
            self.duration,
        );
        registry.register(
            "locksmith_store_commit_batch_size",
            "Writes per group commit of the durable store",
            self.batch_size,
        );
    }
}

/// The metrics read at scrape time: the lock table's gauges, the suspended sessions, and the
/// suspension counters.
struct Live {
    /// The lock table's gauges ([`LockManager::gauges`]).
    locks: LockManager,
    /// How many sessions are suspended, and the suspension counters.
    suspensions: Suspensions,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live").finish_non_exhaustive()
    }
}

impl Collector for Live {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauges = self.locks.gauges();
        let counts = self.suspensions.counts();
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        let gauge = |encoder: &mut DescriptorEncoder, name, help, value: i64| {
            let metric = ConstGauge::new(value);
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
        };
        gauge(
            &mut encoder,
            "locksmith_sessions",
            "Open sessions, suspended ones included.",
            count(gauges.sessions),
        )?;
        gauge(
            &mut encoder,
            "locksmith_sessions_suspended",
            "Sessions whose connection dropped, kept with their locks for their grace.",
            count(self.suspensions.len()),
        )?;
        {
            let mut held = encoder.encode_descriptor(
                "locksmith_locks_held",
                "Locks held, by mode (read: shared, write: exclusive).",
                None,
                MetricType::Gauge,
            )?;
            for (mode, n) in [
                ("read", gauges.held_shared),
                ("write", gauges.held_exclusive),
            ] {
                ConstGauge::new(count(n)).encode(held.encode_family(&[("mode", mode)])?)?;
            }
        }
        gauge(
            &mut encoder,
            "locksmith_waiting_requests",
            "Requests waiting for a lock.",
            count(gauges.waiting),
        )?;
        gauge(
            &mut encoder,
            "locksmith_keys_with_waiters",
            "Keys with at least one request waiting for them.",
            count(gauges.keys_with_waiters),
        )?;
        let longest = ConstGauge::new(gauges.longest_wait.as_secs_f64());
        longest.encode(encoder.encode_descriptor(
            "locksmith_longest_wait",
            "How long the request waiting longest for a lock has waited so far (0 when none waits).",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?)?;
        for (name, help, value) in [
            (
                "locksmith_sessions_suspended",
                "Sessions suspended because their connection dropped.",
                counts.suspended,
            ),
            (
                "locksmith_sessions_resumed",
                "Suspended sessions resumed by a new connection.",
                counts.resumed,
            ),
            (
                "locksmith_sessions_expired",
                "Suspended sessions released at the end of their grace.",
                counts.expired,
            ),
        ] {
            let metric = ConstCounter::new(value);
            metric.encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::{Key, LockManagerConfig};
    use crate::protocol::ServiceError;
    use crate::store::StoreError;

    #[test]
    fn every_wire_error_code_has_a_slot() {
        // A code missing from CODES would still be counted, but through a label lookup on every
        // request that gets it.
        let key = || Key::from("k");
        let errors = [
            ServiceError::BadRequest(String::new()),
            ServiceError::UnknownCommand(String::new()),
            ServiceError::TooLarge { limit: 1 },
            ServiceError::TooManyKeys { count: 2, limit: 1 },
            ServiceError::ServerBusy,
            ServiceError::ShuttingDown,
            ServiceError::Lock(LockError::Deadlock { cycle: Vec::new() }),
            ServiceError::Lock(LockError::Timeout { key: key() }),
            ServiceError::Lock(LockError::NotHeld { keys: vec![key()] }),
            ServiceError::Lock(LockError::SessionClosed),
            ServiceError::Lock(LockError::Cancelled),
            ServiceError::Lock(LockError::TooManyLocks {
                held: 1,
                requested: 1,
                limit: 1,
            }),
            ServiceError::Lock(LockError::InvalidRequest {
                reason: String::new(),
            }),
            ServiceError::Storage(StoreError::Storage(String::new())),
            ServiceError::Deadlock { cycle: Vec::new() },
            ServiceError::Killed,
            ServiceError::Forbidden(String::new()),
            ServiceError::NotFound(String::new()),
            ServiceError::SessionExpired(String::new()),
            ServiceError::TakenOver,
        ];
        for error in &errors {
            assert!(
                CODES.contains(&error.code()),
                "{} has no slot",
                error.code()
            );
        }
        // And the lock core's own code for an invalid request, which the service maps to
        // bad_request.
        assert!(CODES.contains(&"invalid_request"));
    }

    #[test]
    fn a_request_is_counted_under_its_command_and_code_and_an_unknown_code_too() {
        let locks = LockManager::new(LockManagerConfig::default());
        let metrics = Metrics::new(Sources {
            locks,
            suspensions: Suspensions::new(1),
            commits: None,
        });
        let tiny = Duration::from_micros(10);
        metrics.request(Some(CommandKind::Lock), "ok", tiny);
        metrics.request(Some(CommandKind::Lock), "ok", tiny);
        metrics.request(None, "bad_request", tiny);
        metrics.request(Some(CommandKind::Ping), "not_a_code", tiny);
        let text = metrics.encode().expect("encode");
        for line in [
            "locksmith_requests_total{command=\"lock\",code=\"ok\"} 2",
            "locksmith_requests_total{command=\"invalid\",code=\"bad_request\"} 1",
            "locksmith_requests_total{command=\"ping\",code=\"not_a_code\"} 1",
            "locksmith_request_duration_seconds_count{command=\"lock\"} 2",
            "locksmith_request_duration_seconds_bucket{command=\"invalid\",le=\"5e-05\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line} in\n{text}");
        }
    }
}
