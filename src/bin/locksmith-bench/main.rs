//! `locksmith-bench`: a load generator for a running Locksmith server.
//!
//! It opens `--clients` WebSocket connections, runs one `--mix` of requests on each for
//! `--duration` (after a `--warmup` whose requests are not counted) and prints the throughput in
//! round trips per second and the latency of each kind of request (p50/p99/p999/max, measured
//! from sending a request to receiving its answer, on the client). Each client sends one request
//! and waits for its answer before sending the next (no pipelining).
//!
//! Mixes:
//! - `lock-unlock`: lock one random key (write mode), unlock it. Each of the two is one round
//!   trip; the throughput counts round trips (a lock+unlock pair is two) and also prints pairs/s.
//! - `read`, `write`: one single-key `read` / `write` (without `hold_lock`) per round trip.
//! - `mixed`: each step is a lock+unlock pair, a read or a write, chosen uniformly.
//! - `deadlock`: clients work in pairs (A, B) on two keys of their own, plus one control
//!   connection per pair. A locks k1, B locks k2, A requests k2 and the control connection polls
//!   `locks` until A is queued on k2; then B requests k1, which closes the cycle, and the time
//!   from sending that request to receiving its `deadlock` answer is measured. B then unlocks k2,
//!   A gets it and unlocks both, and the round starts again.
//! - `blip`: resumable sessions through a network blip; see the `blip` module.
//! - `locks`: one connection sends `locks` back to back on a table of `--held-keys` held keys
//!   (10,000 by default); with `--server-pid`, the server's CPU per answer. See the `locks`
//!   module, which also holds `--held-keys` and the `--poll-locks` poller for the request mixes
//!   (`lock-unlock`, `read`, `write`, `mixed`): the same big table, and one more connection
//!   polling `locks` at a fixed rate while the clients run.
//! - `idle`: opens the connections, pings once on each, then stays idle (still answering the
//!   server's keepalive pings) for the duration and reports how many are still open. With
//!   `--server-pid` it reads the server's `VmRSS` before and after, for the memory per connection.
//!
//! Keys: every key the generator touches starts with `--key-prefix` (`locksmith-bench/` by
//! default: `locksmith-bench/k0`, …, `locksmith-bench/deadlock-0-1`, …), so it stays out of a
//! user's own keys. Before a mix that writes (`write`, `mixed`) it asks the server for a key under
//! that prefix (`{"command":"keys","prefix":…,"limit":1}`) and refuses to run if there is one (an
//! earlier run's, or the user's), or if the server is too old to answer, unless `--overwrite`.
//!
//! Every connection is a [`locksmith::client::Client`] without keepalive (the generator adds no
//! traffic of its own), and every call waits at most the stall limit (`--lock-timeout` + 10 s).
//! Requests carry the `id` the client matches answers by; otherwise they are the ones the
//! figures in BENCHMARKS.md were measured with (`read` and `write` go through
//! `Client::request`, as the typed methods send no `timeout_ms`).
//!
//! Nothing the network can do panics the generator: failures are counted and printed.

mod blip;
mod locks;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use locksmith::client::{Client, ClientError, LockTableView};
use locksmith::config::parse_duration;
use locksmith::lock::LockMode::Exclusive;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use serde_json::Value;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Load generator for a Locksmith server.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
struct Args {
    /// WebSocket URL of the server.
    #[arg(long, default_value = "ws://127.0.0.1:8008/ws")]
    url: String,

    /// Client connections (for `deadlock`: two per pair, plus one control connection per pair).
    #[arg(long, default_value_t = 50)]
    clients: usize,

    /// How long to run the mix, after the warmup (`idle`: how long to stay idle).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,

    /// Time run before measuring; its requests are not counted.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,

    /// Number of distinct keys the clients pick from (uniformly).
    #[arg(long, default_value_t = 1000)]
    keys: usize,

    /// What each client does.
    #[arg(long, value_enum, default_value_t = Mix::LockUnlock)]
    mix: Mix,

    /// Time a client keeps a lock between `lock` and `unlock`.
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    hold: Duration,

    /// `timeout_ms` sent with every lock/read/write request.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    lock_timeout: Duration,

    /// Size in bytes of the string value of each write.
    #[arg(long, default_value_t = 16)]
    value_bytes: usize,

    /// Connections opened at the same time while connecting.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,

    /// Worker threads of the generator (1: a single-threaded runtime; default: one per core).
    /// On loopback the generator shares the cores with the server.
    #[arg(long)]
    threads: Option<usize>,

    /// PID of the server process: its `VmRSS` is read from /proc before and after connecting
    /// (idle mix) to report the memory per connection.
    #[arg(long)]
    server_pid: Option<u32>,

    /// Start of every key the generator uses, so that it never touches a user's own keys.
    #[arg(long, default_value = DEFAULT_KEY_PREFIX, value_parser = parse_key_prefix)]
    key_prefix: String,

    /// Keys held (as `<prefix>held/<i>`, in `lock` requests of at most 1000 keys) by extra
    /// connections for the whole run, so that the lock table is big: for the `locks` mix
    /// (default 10,000) and the request mixes (default none).
    #[arg(long)]
    held_keys: Option<usize>,

    /// `limit` of every `locks` request of the `locks` mix and of `--poll-locks`.
    #[arg(long, default_value_t = 10_000, value_parser = parse_locks_limit)]
    locks_limit: usize,

    /// With a request mix: one more connection sends `locks` this many times a second (same
    /// prefix and `--locks-limit`) while the clients run.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    poll_locks: Option<u32>,

    /// Run a mix that writes even if the server's store already holds keys under
    /// `--key-prefix`, or if the server is too old to say: those values are overwritten.
    #[arg(long)]
    overwrite: bool,
}

/// Where the generator's keys live unless `--key-prefix` says otherwise.
const DEFAULT_KEY_PREFIX: &str = "locksmith-bench/";

/// Longest `--key-prefix`: keys are at most 1024 bytes, and the generator appends up to ~40.
const MAX_KEY_PREFIX_BYTES: usize = 900;

/// Checks a `--key-prefix`: it may hold no character that JSON would escape. (The prefix was once
/// pasted into JSON text; requests are now built as JSON values, but the flag still accepts
/// exactly what it accepted then.)
fn parse_key_prefix(text: &str) -> Result<String, String> {
    if text.len() > MAX_KEY_PREFIX_BYTES {
        return Err(format!(
            "a key prefix may have at most {MAX_KEY_PREFIX_BYTES} bytes"
        ));
    }
    if text
        .chars()
        .any(|c| c == '"' || c == '\\' || c.is_control())
    {
        return Err(
            "a key prefix may not contain quotes, backslashes or control characters".into(),
        );
    }
    Ok(text.to_owned())
}

/// Checks a `--locks-limit`: the server answers `bad_request` outside 1..=100,000.
fn parse_locks_limit(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(limit @ 1..=100_000) => Ok(limit),
        _ => Err("a locks limit is an integer from 1 to 100000".into()),
    }
}

/// The `n`th key of the request mixes.
fn bench_key(prefix: &str, n: usize) -> String {
    format!("{prefix}k{n}")
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Mix {
    LockUnlock,
    Read,
    Write,
    Mixed,
    Deadlock,
    Blip,
    Idle,
    Locks,
}

impl Mix {
    /// Does this mix write values (and so could overwrite someone's)? The others only lock and
    /// read.
    fn writes(self) -> bool {
        matches!(self, Mix::Write | Mix::Mixed)
    }
}

/// Why a connection could not go on (each ends the client that saw it).
#[derive(Debug)]
enum Failure {
    /// The connection could not be opened (or its `hello` was refused).
    Connect(String),
    /// The connection ended (closed by the server, broken), or an answer could not be read:
    /// the library's sentence.
    Lost(String),
    /// No answer within the stall limit.
    Stalled,
    /// An answer the mix did not expect at this point (e.g. no deadlock where one must be).
    Unexpected(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "connect failed: {e}"),
            Failure::Lost(e) => write!(f, "{e}"),
            Failure::Stalled => write!(f, "no answer within the stall limit"),
            Failure::Unexpected(e) => write!(f, "unexpected answer: {e}"),
        }
    }
}

/// Splits what a call returned: the server's answer, success or the error it answered, is `Ok`
/// (the mix counts it and goes on); a connection that ended or an answer that could not be
/// read is a [`Failure`].
fn answered<T>(result: Result<T, ClientError>) -> Result<Result<T, ClientError>, Failure> {
    match result {
        Err(error @ (ClientError::ConnectionLost { .. } | ClientError::UnexpectedAnswer(_))) => {
            Err(Failure::Lost(error.to_string()))
        }
        Err(ClientError::Connect { reason, .. }) => Err(Failure::Connect(reason)),
        Err(ClientError::Unauthorized) => {
            Err(Failure::Connect(ClientError::Unauthorized.to_string()))
        }
        answer => Ok(answer),
    }
}

/// One connection of the generator: a library client, and how long any of its calls may take.
struct Conn {
    client: Client,
    /// How long to wait for an answer before giving up on the connection.
    stall: Duration,
}

impl Conn {
    /// Connects (the library says `hello`), within the stall limit. No keepalive: the generator
    /// adds no traffic of its own (the client's driver still answers the server's pings).
    async fn open(url: &str, stall: Duration) -> Result<Conn, Failure> {
        let connecting = Client::builder(url).keepalive(None).connect();
        match tokio::time::timeout(stall, connecting).await {
            Ok(Ok(client)) => Ok(Conn { client, stall }),
            Ok(Err(ClientError::Connect { reason, .. })) => Err(Failure::Connect(reason)),
            Ok(Err(error)) => Err(Failure::Connect(error.to_string())),
            Err(_) => Err(Failure::Connect("timed out".into())),
        }
    }

    /// Runs one call of this connection's client within the stall limit; returns the server's
    /// answer (or error answer) and the round-trip time, from just before the request is sent
    /// (the call's first poll) to its parsed answer.
    async fn timed<T>(
        &self,
        call: impl Future<Output = Result<T, ClientError>>,
    ) -> Result<(Result<T, ClientError>, Duration), Failure> {
        let sent = Instant::now();
        let result = tokio::time::timeout(self.stall, call)
            .await
            .map_err(|_| Failure::Stalled)?;
        let elapsed = sent.elapsed();
        Ok((answered(result)?, elapsed))
    }

    /// Like [`Conn::timed`] but insists on success (`what` names the step in the failure).
    async fn ok<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<T, ClientError>>,
    ) -> Result<(T, Duration), Failure> {
        match self.timed(call).await? {
            (Ok(answer), elapsed) => Ok((answer, elapsed)),
            (Err(error), _) => Err(Failure::Unexpected(format!("{what}: {}", error.code()))),
        }
    }

    /// Closes the connection, waiting at most a second.
    async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.client.close()).await;
    }
}

/// What one client measured.
#[derive(Default)]
struct Stats {
    /// Round-trip times in microseconds of successful answers, per kind of request.
    latencies: BTreeMap<&'static str, Vec<u32>>,
    /// Round trips completed in the measured window (successful or not).
    round_trips: u64,
    /// Error answers and failures, by description.
    errors: BTreeMap<String, u64>,
    /// When the last measured round trip ended.
    last_end: Option<Instant>,
}

impl Stats {
    fn merge(&mut self, other: Stats) {
        for (op, mut samples) in other.latencies {
            self.latencies.entry(op).or_default().append(&mut samples);
        }
        self.round_trips += other.round_trips;
        for (error, count) in other.errors {
            *self.errors.entry(error).or_default() += count;
        }
        self.last_end = self.last_end.max(other.last_end);
    }

    fn error(&mut self, what: String) {
        *self.errors.entry(what).or_default() += 1;
    }

    fn record(&mut self, op: &'static str, elapsed: Duration) {
        let micros = u32::try_from(elapsed.as_micros()).unwrap_or(u32::MAX);
        self.latencies.entry(op).or_default().push(micros);
    }
}

/// The measured window shared by the clients of a run.
#[derive(Clone, Copy)]
struct Window {
    /// Requests started before this are warmup.
    measure_from: Instant,
    /// No request is started after this.
    end: Instant,
}

/// A client of a request/response mix, with its random source.
struct Worker {
    conn: Conn,
    rng: StdRng,
    args: Arc<Args>,
    stats: Stats,
    /// The value of every write.
    value: Value,
}

impl Worker {
    fn key(&mut self) -> String {
        let n = self.rng.random_range(0..self.args.keys.max(1));
        bench_key(&self.args.key_prefix, n)
    }

    fn timeout_ms(&self) -> u64 {
        u64::try_from(self.args.lock_timeout.as_millis()).unwrap_or(u64::MAX)
    }

    /// Counts one round trip's outcome (and records its time) if `measure`; `true` on success,
    /// `false` on an error answer (counted).
    fn count<T>(
        &mut self,
        op: &'static str,
        (answer, elapsed): (Result<T, ClientError>, Duration),
        measure: bool,
    ) -> bool {
        if measure {
            self.stats.round_trips += 1;
            self.stats.last_end = Some(Instant::now());
        }
        match answer {
            Ok(_) => {
                if measure {
                    self.stats.record(op, elapsed);
                }
                true
            }
            Err(error) => {
                self.stats.error(format!("{op}: {}", error.code()));
                false
            }
        }
    }

    async fn lock_unlock(&mut self, measure: bool) -> Result<(), Failure> {
        let key = self.key();
        let timeout = Some(self.args.lock_timeout);
        let locked = self
            .conn
            .timed(self.conn.client.lock(&[&key], Exclusive, timeout))
            .await?;
        if !self.count("lock", locked, measure) {
            return Ok(());
        }
        if !self.args.hold.is_zero() {
            tokio::time::sleep(self.args.hold).await;
        }
        let unlocked = self.conn.timed(self.conn.client.unlock(&[&key])).await?;
        if !self.count("unlock", unlocked, measure) {
            // The lock would stay held for the rest of the run and skew it: stop this client.
            return Err(Failure::Unexpected("unlock refused".into()));
        }
        Ok(())
    }

    // `read` and `write` go through `Client::request`: the typed methods send no `timeout_ms`,
    // and the requests must stay the ones the figures in BENCHMARKS.md were measured with.

    async fn read(&mut self, measure: bool) -> Result<(), Failure> {
        let key = self.key();
        let request = json!({"command": "read", "keys": [key], "timeout_ms": self.timeout_ms()});
        let answer = self.conn.timed(self.conn.client.request(request)).await?;
        self.count("read", answer, measure);
        Ok(())
    }

    async fn write(&mut self, measure: bool) -> Result<(), Failure> {
        let key = self.key();
        let request = json!({
            "command": "write", "keys": [key], "values": [self.value], "timeout_ms": self.timeout_ms()
        });
        let answer = self.conn.timed(self.conn.client.request(request)).await?;
        self.count("write", answer, measure);
        Ok(())
    }

    async fn run(mut self, window: Window) -> (Stats, Option<Conn>) {
        loop {
            let now = Instant::now();
            if now >= window.end {
                return (self.stats, Some(self.conn));
            }
            let measure = now >= window.measure_from;
            let step = match self.args.mix {
                Mix::LockUnlock => self.lock_unlock(measure).await,
                Mix::Read => self.read(measure).await,
                Mix::Write => self.write(measure).await,
                Mix::Mixed => match self.rng.random_range(0..3u8) {
                    0 => self.lock_unlock(measure).await,
                    1 => self.read(measure).await,
                    _ => self.write(measure).await,
                },
                Mix::Deadlock | Mix::Blip | Mix::Idle | Mix::Locks => {
                    return (self.stats, Some(self.conn))
                }
            };
            if let Err(failure) = step {
                self.stats.error(failure.to_string());
                return (self.stats, None);
            }
        }
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match args.threads {
        Some(0 | 1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Some(threads) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build(),
        None => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("locksmith-bench: cannot start the runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("locksmith-bench: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    if args.clients == 0 {
        return Err("--clients must be at least 1".into());
    }
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if (limit as usize) < args.clients + 64 => eprintln!(
            "warning: the open-file limit is {limit}, too low for {} clients",
            args.clients
        ),
        Ok(_) => {}
        Err(error) => eprintln!("warning: cannot raise the open-file limit: {error}"),
    }
    println!(
        "locksmith-bench: mix={} clients={} keys={} duration={:?} warmup={:?} hold={:?} threads={} url={}",
        args.mix
            .to_possible_value()
            .map_or_else(|| format!("{:?}", args.mix), |v| v.get_name().to_owned()),
        args.clients,
        args.keys,
        args.duration,
        args.warmup,
        args.hold,
        args.threads
            .map_or_else(|| "one per core".to_owned(), |t| t.to_string()),
        args.url
    );
    let is_request_mix = matches!(
        args.mix,
        Mix::LockUnlock | Mix::Read | Mix::Write | Mix::Mixed
    );
    if args.poll_locks.is_some() && !is_request_mix {
        return Err(
            "--poll-locks goes with a request mix (lock-unlock, read, write, mixed)".into(),
        );
    }
    if args.held_keys.is_some() && !is_request_mix && args.mix != Mix::Locks {
        return Err("--held-keys goes with the locks mix or a request mix".into());
    }
    if args.mix.writes() {
        if args.overwrite {
            println!(
                "--overwrite: values under {:?} may be overwritten",
                args.key_prefix
            );
        } else {
            check_prefix_is_free(&args).await?;
        }
    }
    let args = Arc::new(args);
    match args.mix {
        Mix::Idle => idle(args).await,
        Mix::Deadlock => deadlock(args).await,
        Mix::Blip => blip::blip(args).await,
        Mix::Locks => locks::locks_mix(args).await,
        _ => request_mix(args).await,
    }
}

/// Asks the server whether its store holds a key under `--key-prefix`; `Err` (refusing the run)
/// if it does, or if the server cannot say.
async fn check_prefix_is_free(args: &Args) -> Result<(), String> {
    let request = json!({"command": "keys", "prefix": args.key_prefix, "limit": 1});
    // A raw request, not `Client::keys`: a successful answer without a `keys` list must refuse
    // the run, and the typed page would read it as empty.
    let answer = async {
        let conn = Conn::open(&args.url, stall_limit(args)).await?;
        let (answer, _) = conn.timed(conn.client.request(request)).await?;
        conn.close().await;
        Ok::<_, Failure>(answer)
    }
    .await
    .map_err(|failure| format!("cannot ask the server for keys under the prefix: {failure}"))?;
    prefix_verdict(&answer, &args.key_prefix)?;
    println!("no keys under {:?} in the store: ok", args.key_prefix);
    Ok(())
}

/// What a `keys` answer (asked for one key under `prefix`) says about running a mix that
/// writes there: `Ok` only for a successful answer with no key.
fn prefix_verdict(answer: &Result<Value, ClientError>, prefix: &str) -> Result<(), String> {
    const HOW: &str =
        "pass --overwrite to write over them anyway, or --key-prefix to use other keys";
    let answer = match answer {
        Ok(answer) => answer,
        Err(ClientError::UnknownCommand(_)) => {
            return Err(format!(
                "the server is too old to check whether its store holds keys under {prefix:?} \
                 (it has no `keys` command), and this mix writes: pass --overwrite to run anyway"
            ))
        }
        Err(error) => {
            return Err(format!(
            "cannot check whether the store holds keys under {prefix:?}: the server answered {} \
                 ({error}); pass --overwrite to run anyway",
            error.code()
        ))
        }
    };
    match answer.get("keys").and_then(Value::as_array) {
        Some(keys) => match keys.first() {
            None => Ok(()),
            Some(first) => Err(format!(
                "the server's store already holds keys under {prefix:?} (e.g. {first}), perhaps \
                 from an earlier run, and this mix would overwrite them: {HOW}"
            )),
        },
        None => Err(format!(
            "cannot check whether the store holds keys under {prefix:?}: the answer has no \
             `keys` list; pass --overwrite to run anyway"
        )),
    }
}

/// Stall limit of a request: its lock timeout plus slack.
fn stall_limit(args: &Args) -> Duration {
    args.lock_timeout + Duration::from_secs(10)
}

/// Opens `count` connections, at most `--connect-concurrency` at a time. Returns the clients
/// (in no particular order) and the failures.
async fn connect_all(args: &Arc<Args>, count: usize) -> (Vec<Conn>, Stats) {
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let mut tasks = JoinSet::new();
    for _ in 0..count {
        let gate = gate.clone();
        let args = args.clone();
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await;
            let conn = Conn::open(&args.url, stall_limit(&args)).await?;
            conn.ok("ping", conn.client.ping()).await?;
            Ok::<Conn, Failure>(conn)
        });
    }
    let mut clients = Vec::with_capacity(count);
    let mut stats = Stats::default();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(client)) => clients.push(client),
            Ok(Err(failure)) => stats.error(failure.to_string()),
            Err(error) => stats.error(format!("client task failed: {error}")),
        }
    }
    println!(
        "connected {}/{count} clients in {:.2}s",
        clients.len(),
        started.elapsed().as_secs_f64()
    );
    (clients, stats)
}

/// A request mix, on a table of `--held-keys` held keys if asked, with the `--poll-locks` poller
/// if asked.
async fn request_mix(args: Arc<Args>) -> Result<(), String> {
    let held = args.held_keys.unwrap_or(0);
    let holder = match held {
        0 => None,
        _ => Some(locks::Holder::take(&args, held).await?),
    };
    let outcome = request_mix_on(&args, held).await;
    if let Some(holder) = holder {
        holder.release().await;
    }
    check_lock_table(&args).await;
    outcome
}

async fn request_mix_on(args: &Arc<Args>, held: usize) -> Result<(), String> {
    let poller = match args.poll_locks {
        Some(rate) => Some((rate, locks::Poller::open(args, rate, held).await?)),
        None => None,
    };
    let (clients, mut stats) = connect_all(args, args.clients).await;
    if clients.is_empty() {
        print_errors(&stats);
        return Err("no client could connect".into());
    }
    let value = Value::String("x".repeat(args.value_bytes));
    let start = Instant::now();
    let window = Window {
        measure_from: start + args.warmup,
        end: start + args.warmup + args.duration,
    };
    let mut seeds = StdRng::from_os_rng();
    let mut tasks = JoinSet::new();
    for client in clients {
        let worker = Worker {
            conn: client,
            rng: StdRng::from_rng(&mut seeds),
            args: args.clone(),
            stats: Stats::default(),
            value: value.clone(),
        };
        tasks.spawn(worker.run(window));
    }
    let polling = poller.map(|(rate, poller)| (rate, tokio::spawn(poller.run(window))));
    // The server's CPU over the measured window: read at its start and end (timing, not
    // synchronisation: the clients run on regardless).
    let mut cpu = (None, None);
    if let Some(pid) = args.server_pid {
        tokio::time::sleep_until(window.measure_from).await;
        cpu.0 = read_cpu_time(pid);
        tokio::time::sleep_until(window.end).await;
        cpu.1 = read_cpu_time(pid);
    }
    let mut survivors = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((client_stats, client)) => {
                stats.merge(client_stats);
                survivors.extend(client);
            }
            Err(error) => stats.error(format!("client task failed: {error}")),
        }
    }
    let elapsed = stats.last_end.map_or(Duration::ZERO, |end| {
        end.saturating_duration_since(window.measure_from)
    });
    print_throughput(args, &stats, elapsed);
    if let Some(pid) = args.server_pid {
        locks::print_server_cpu(pid, cpu.0, cpu.1, "round trip", stats.round_trips);
    }
    let mut poll_failure = None;
    if let Some((rate, polling)) = polling {
        match polling.await {
            Ok(polled) => {
                polled.print(args, rate);
                poll_failure = polled.failure;
                for (op, mut samples) in polled.stats.latencies {
                    stats.latencies.entry(op).or_default().append(&mut samples);
                }
            }
            Err(error) => poll_failure = Some(format!("the poller's task failed: {error}")),
        }
    }
    print_latencies(&stats);
    print_errors(&stats);
    println!(
        "clients still connected at the end: {}/{}",
        survivors.len(),
        args.clients
    );
    close_all(survivors).await;
    match poll_failure {
        Some(failure) => Err(format!("the poller stopped: {failure}")),
        None => Ok(()),
    }
}

/// One pair of the deadlock mix, with its control connection.
struct Pair {
    a: Conn,
    b: Conn,
    control: Conn,
    k1: String,
    k2: String,
    /// `timeout_ms` of every lock request.
    lock_timeout: Option<Duration>,
}

impl Pair {
    async fn open(args: &Args, index: usize) -> Result<Pair, Failure> {
        let stall = stall_limit(args);
        let a = Conn::open(&args.url, stall).await?;
        let b = Conn::open(&args.url, stall).await?;
        let control = Conn::open(&args.url, stall).await?;
        Ok(Pair {
            a,
            b,
            control,
            k1: format!("{}deadlock-{index}-1", args.key_prefix),
            k2: format!("{}deadlock-{index}-2", args.key_prefix),
            lock_timeout: Some(args.lock_timeout),
        })
    }

    /// Is A queued on k2 in this lock table?
    fn a_is_queued(&self, table: &LockTableView) -> bool {
        let a_session = self.a.client.session_id();
        table.locks.iter().any(|entry| {
            entry.key == self.k2 && entry.waiters.iter().any(|w| w.session == a_session)
        })
    }

    /// One round. Pushes the round-trip time of each step onto `samples`: `deadlock` is the
    /// time from sending B's cycle-closing request to its answer; `lock`, `locks` (the control
    /// connection's polls) and `unlock` are the other steps, for comparison under the same load.
    async fn round(&self, samples: &mut Vec<(&'static str, Duration)>) -> Result<(), Failure> {
        let (a, b, control) = (&self.a, &self.b, &self.control);
        let (k1, k2) = (self.k1.as_str(), self.k2.as_str());
        let timeout = self.lock_timeout;
        samples.push((
            "lock",
            a.ok("A lock k1", a.client.lock(&[k1], Exclusive, timeout))
                .await?
                .1,
        ));
        samples.push((
            "lock",
            b.ok("B lock k2", b.client.lock(&[k2], Exclusive, timeout))
                .await?
                .1,
        ));
        // A requests k2 and waits: polled once, the request goes out now; its answer comes
        // after B gives k2 up, and is awaited below.
        let only_k2 = [k2];
        let a_waits = a.client.lock(&only_k2, Exclusive, timeout);
        tokio::pin!(a_waits);
        if let Poll::Ready(early) = futures_util::poll!(a_waits.as_mut()) {
            return Err(Failure::Unexpected(match answered(early)? {
                Ok(_) => "A's request for k2 was granted while B held it".into(),
                Err(error) => format!("A's request for k2 answered {}", error.code()),
            }));
        }
        let queued_by = Instant::now() + a.stall;
        loop {
            let (table, elapsed) = control.ok("locks", control.client.locks(None)).await?;
            samples.push(("locks", elapsed));
            if self.a_is_queued(&table) {
                break;
            }
            if Instant::now() >= queued_by {
                return Err(Failure::Unexpected("A never showed as queued on k2".into()));
            }
            tokio::task::yield_now().await;
        }
        // B closes the cycle: B holds k2 and waits for k1, A holds k1 and waits for k2.
        let (answer, elapsed) = b.timed(b.client.lock(&[k1], Exclusive, timeout)).await?;
        match answer {
            Err(ClientError::Deadlock { .. }) => {}
            Ok(_) => {
                return Err(Failure::Unexpected(
                    "B's cycle-closing request answered success".into(),
                ))
            }
            Err(error) => {
                return Err(Failure::Unexpected(format!(
                    "B's cycle-closing request answered {}",
                    error.code()
                )))
            }
        }
        samples.push(("deadlock", elapsed));
        samples.push((
            "unlock",
            b.ok("B unlock k2", b.client.unlock(&[k2])).await?.1,
        ));
        let granted = tokio::time::timeout(a.stall, a_waits)
            .await
            .map_err(|_| Failure::Stalled)?;
        if let Err(error) = answered(granted)? {
            return Err(Failure::Unexpected(format!(
                "A's request for k2 answered {}",
                error.code()
            )));
        }
        samples.push((
            "unlock",
            a.ok("A unlock", a.client.unlock(&[k1, k2])).await?.1,
        ));
        Ok(())
    }
}

async fn deadlock(args: Arc<Args>) -> Result<(), String> {
    let pairs = (args.clients / 2).max(1);
    let started = Instant::now();
    let mut opening = JoinSet::new();
    for index in 0..pairs {
        let args = args.clone();
        opening.spawn(async move { Pair::open(&args, index).await });
    }
    let mut stats = Stats::default();
    let mut ready = Vec::with_capacity(pairs);
    while let Some(joined) = opening.join_next().await {
        match joined {
            Ok(Ok(pair)) => ready.push(pair),
            Ok(Err(failure)) => stats.error(failure.to_string()),
            Err(error) => stats.error(format!("pair task failed: {error}")),
        }
    }
    println!(
        "opened {}/{pairs} pairs (3 connections each) in {:.2}s",
        ready.len(),
        started.elapsed().as_secs_f64()
    );
    if ready.is_empty() {
        print_errors(&stats);
        return Err("no pair could connect".into());
    }
    let start = Instant::now();
    let window = Window {
        measure_from: start + args.warmup,
        end: start + args.warmup + args.duration,
    };
    let mut tasks = JoinSet::new();
    for pair in ready {
        tasks.spawn(async move {
            let mut stats = Stats::default();
            let mut samples = Vec::new();
            loop {
                let now = Instant::now();
                if now >= window.end {
                    break;
                }
                samples.clear();
                let outcome = pair.round(&mut samples).await;
                if now >= window.measure_from {
                    for (op, elapsed) in samples.drain(..) {
                        stats.record(op, elapsed);
                    }
                }
                match outcome {
                    Ok(()) if now >= window.measure_from => {
                        stats.round_trips += 1;
                        stats.last_end = Some(Instant::now());
                    }
                    Ok(()) => {}
                    Err(failure) => {
                        stats.error(failure.to_string());
                        return (stats, None);
                    }
                }
            }
            (stats, Some(pair))
        });
    }
    let mut survivors = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((pair_stats, pair)) => {
                stats.merge(pair_stats);
                if let Some(pair) = pair {
                    survivors.extend([pair.a, pair.b, pair.control]);
                }
            }
            Err(error) => stats.error(format!("pair task failed: {error}")),
        }
    }
    let elapsed = stats.last_end.map_or(Duration::ZERO, |end| {
        end.saturating_duration_since(window.measure_from)
    });
    let secs = elapsed.as_secs_f64().max(f64::EPSILON);
    let round_trips: usize = stats.latencies.values().map(Vec::len).sum();
    println!(
        "deadlock rounds: {} in {:.2}s = {:.0} rounds/s ({:.0} round trips/s in all)",
        stats.round_trips,
        secs,
        stats.round_trips as f64 / secs,
        round_trips as f64 / secs
    );
    println!(
        "deadlock = from sending the request that closes the cycle to receiving its `deadlock` answer;"
    );
    println!(
        "lock, locks (polls of the control connection), unlock = the other steps of the rounds"
    );
    print_latencies(&stats);
    print_errors(&stats);
    check_lock_table(&args).await;
    close_all(survivors).await;
    Ok(())
}

async fn idle(args: Arc<Args>) -> Result<(), String> {
    let before = args.server_pid.and_then(read_rss_kib);
    if let Some(kib) = before {
        println!("server VmRSS before: {kib} KiB");
    }
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let stop = CancellationToken::new();
    let (opened_tx, mut opened_rx) = mpsc::unbounded_channel::<Result<(), String>>();
    let mut tasks = JoinSet::new();
    for _ in 0..args.clients {
        let (gate, args, stop, opened) =
            (gate.clone(), args.clone(), stop.clone(), opened_tx.clone());
        tasks.spawn(async move {
            let permit = gate.acquire_owned().await;
            let connected = async {
                let conn = Conn::open(&args.url, stall_limit(&args)).await?;
                conn.ok("ping", conn.client.ping()).await?;
                Ok::<Conn, Failure>(conn)
            }
            .await;
            drop(permit);
            let conn = match connected {
                Ok(conn) => conn,
                Err(failure) => {
                    // Counted by the main task from this message, not again at the end.
                    let _ = opened.send(Err(failure.to_string()));
                    return None;
                }
            };
            let _ = opened.send(Ok(()));
            // The main task counts senders out: this one has reported.
            drop(opened);
            // The client's driver keeps reading, which answers the server's keepalive pings.
            let lost = tokio::select! {
                () = stop.cancelled() => None,
                lost = conn.client.lost() => Some(lost),
            };
            match lost {
                None => Some(Ok(conn)),
                Some(error) => Some(Err(Failure::Lost(error.to_string()))),
            }
        });
    }
    drop(opened_tx);
    let mut stats = Stats::default();
    let mut opened = 0usize;
    while let Some(result) = opened_rx.recv().await {
        match result {
            Ok(()) => opened += 1,
            Err(failure) => stats.error(failure),
        }
    }
    println!(
        "opened {opened}/{} connections (one ping each) in {:.2}s",
        args.clients,
        started.elapsed().as_secs_f64()
    );
    let after_open = args.server_pid.and_then(read_rss_kib);
    print_rss("after opening", before, after_open, opened);
    tokio::time::sleep(args.duration).await;
    let after_idle = args.server_pid.and_then(read_rss_kib);
    print_rss(
        &format!("after {:?} idle", args.duration),
        before,
        after_idle,
        opened,
    );
    stop.cancel();
    let mut open = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Some(Ok(client))) => open.push(client),
            Ok(Some(Err(failure))) => stats.error(format!("while idle: {failure}")),
            // Failed to open: already counted.
            Ok(None) => {}
            Err(error) => stats.error(format!("client task failed: {error}")),
        }
    }
    println!(
        "still open after {:?} idle: {}/{}",
        args.duration,
        open.len(),
        args.clients
    );
    print_errors(&stats);
    close_all(open).await;
    Ok(())
}

fn print_rss(when: &str, before: Option<u64>, after: Option<u64>, connections: usize) {
    if let (Some(before), Some(after)) = (before, after) {
        let per = (after.saturating_sub(before)) as f64 / connections.max(1) as f64;
        println!(
            "server VmRSS {when}: {after} KiB; ({after} - {before}) / {connections} = {per:.1} KiB per connection"
        );
    }
}

/// `VmRSS` of a process in KiB, from /proc (Linux).
fn read_rss_kib(pid: u32) -> Option<u64> {
    let status = match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Ok(status) => status,
        Err(error) => {
            eprintln!("warning: cannot read /proc/{pid}/status: {error}");
            return None;
        }
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU time (utime + stime, all threads) a process has used, from /proc (Linux).
fn read_cpu_time(pid: u32) -> Option<Duration> {
    let stat = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat,
        Err(error) => {
            eprintln!("warning: cannot read /proc/{pid}/stat: {error}");
            return None;
        }
    };
    let ticks = cpu_ticks(&stat);
    if ticks.is_none() {
        eprintln!("warning: cannot read utime/stime from /proc/{pid}/stat");
    }
    let hz = clock_ticks_per_second();
    ticks.map(|ticks| Duration::from_secs_f64(ticks as f64 / hz as f64))
}

/// The unit of the times in /proc (`USER_HZ`, 100 on nearly every Linux).
#[cfg(unix)]
fn clock_ticks_per_second() -> u64 {
    // SAFETY: `sysconf` only reads a value of the C library; no memory is passed.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).ok().filter(|&hz| hz > 0).unwrap_or(100)
}

/// The unit of the times in /proc (which only Linux has).
#[cfg(not(unix))]
fn clock_ticks_per_second() -> u64 {
    100
}

/// utime + stime (fields 14 and 15) of a /proc/PID/stat line. The command name (field 2) is in
/// parentheses and may hold spaces and parentheses, so the fields are counted after the last `)`.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Asks the server, on a fresh connection, whether any lock is still held or queued.
async fn check_lock_table(args: &Args) {
    let outcome = async {
        let conn = Conn::open(&args.url, Duration::from_secs(10)).await?;
        let (table, _) = conn.ok("locks", conn.client.locks(None)).await?;
        conn.close().await;
        Ok::<LockTableView, Failure>(table)
    }
    .await;
    match outcome {
        Ok(table) => {
            let entries = table.locks.len();
            let sessions = table.sessions;
            println!(
                "lock table after the run: {entries} keys held or queued ({})",
                if entries == 0 { "ok" } else { "NOT EMPTY" }
            );
            println!("server sessions open at that moment: {sessions}");
        }
        Err(failure) => println!("lock table after the run: cannot ask: {failure}"),
    }
}

async fn close_all(conns: Vec<Conn>) {
    let mut tasks = JoinSet::new();
    for conn in conns {
        tasks.spawn(conn.close());
    }
    while tasks.join_next().await.is_some() {}
}

fn print_throughput(args: &Args, stats: &Stats, elapsed: Duration) {
    let secs = elapsed.as_secs_f64().max(f64::EPSILON);
    let rate = stats.round_trips as f64 / secs;
    print!(
        "round trips: {} in {:.2}s = {:.0} round trips/s",
        stats.round_trips, secs, rate
    );
    if args.mix == Mix::LockUnlock {
        print!(" (= {:.0} lock+unlock pairs/s)", rate / 2.0);
    }
    println!();
}

/// The `q` quantile (nearest rank) of sorted samples.
fn quantile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn print_latencies(stats: &Stats) {
    println!(
        "{:<10} {:>9} {:>9} {:>9} {:>9} {:>9}   (latency in µs, successful answers)",
        "request", "count", "p50", "p99", "p999", "max"
    );
    for (op, samples) in &stats.latencies {
        let mut sorted = samples.clone();
        sorted.sort_unstable();
        println!(
            "{:<10} {:>9} {:>9} {:>9} {:>9} {:>9}",
            op,
            sorted.len(),
            quantile(&sorted, 0.50),
            quantile(&sorted, 0.99),
            quantile(&sorted, 0.999),
            sorted.last().copied().unwrap_or(0)
        );
    }
}

fn print_errors(stats: &Stats) {
    if stats.errors.is_empty() {
        println!("errors: none");
        return;
    }
    let total: u64 = stats.errors.values().sum();
    println!("errors: {total}");
    let mut sorted: Vec<(&String, &u64)> = stats.errors.iter().collect();
    sorted.sort_by(|a, b| b.1.cmp(a.1));
    for (error, count) in sorted {
        println!("  {count:>9}  {error}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_utime_plus_stime_counted_after_the_command_name() {
        let stat = "4242 (lock smith) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 9 0 100";
        assert_eq!(cpu_ticks(stat), Some(300));
        assert_eq!(cpu_ticks("garbage"), None);
    }

    #[test]
    fn the_locks_mix_and_its_options_parse() {
        let args = Args::try_parse_from(["locksmith-bench", "--mix", "locks"]).expect("defaults");
        assert_eq!(args.mix, Mix::Locks);
        assert_eq!(args.held_keys, None);
        assert_eq!(args.locks_limit, 10_000);
        assert!(!args.mix.writes());
        let args = Args::try_parse_from([
            "locksmith-bench",
            "--held-keys",
            "10000",
            "--poll-locks",
            "100",
        ])
        .expect("valid arguments");
        assert_eq!((args.held_keys, args.poll_locks), (Some(10_000), Some(100)));
        for bad in [
            ["--locks-limit", "0"],
            ["--locks-limit", "100001"],
            ["--poll-locks", "0"],
        ] {
            assert!(Args::try_parse_from(["locksmith-bench", bad[0], bad[1]]).is_err());
        }
    }

    #[test]
    fn quantile_is_the_nearest_rank() {
        let samples: Vec<u32> = (1..=1000).collect();
        assert_eq!(quantile(&samples, 0.5), 500);
        assert_eq!(quantile(&samples, 0.99), 990);
        assert_eq!(quantile(&samples, 0.999), 999);
        assert_eq!(quantile(&[7], 0.999), 7);
        assert_eq!(quantile(&[], 0.5), 0);
    }

    #[test]
    fn idle_mix_and_durations_parse_from_the_command_line() {
        let args = Args::try_parse_from([
            "locksmith-bench",
            "--mix",
            "idle",
            "--clients",
            "10000",
            "--duration",
            "2m",
        ])
        .expect("valid arguments");
        assert_eq!(args.mix, Mix::Idle);
        assert_eq!(args.clients, 10_000);
        assert_eq!(args.duration, Duration::from_secs(120));
    }

    #[test]
    fn keys_live_under_the_bench_prefix_by_default() {
        let args = Args::try_parse_from(["locksmith-bench"]).expect("defaults");
        assert_eq!(args.key_prefix, "locksmith-bench/");
        assert!(!args.overwrite);
        assert_eq!(bench_key(&args.key_prefix, 7), "locksmith-bench/k7");
        let args =
            Args::try_parse_from(["locksmith-bench", "--key-prefix", "mine:", "--overwrite"])
                .expect("valid arguments");
        assert_eq!(bench_key(&args.key_prefix, 0), "mine:k0");
        assert!(args.overwrite);
    }

    #[test]
    fn a_key_prefix_that_json_would_escape_is_refused() {
        for prefix in ["a\"b", "a\\b", "a\nb"] {
            assert!(
                Args::try_parse_from(["locksmith-bench", "--key-prefix", prefix]).is_err(),
                "{prefix:?}"
            );
        }
    }

    #[test]
    fn only_the_write_and_mixed_mixes_need_the_prefix_check() {
        let writing: Vec<Mix> = Mix::value_variants()
            .iter()
            .copied()
            .filter(|mix| mix.writes())
            .collect();
        assert_eq!(writing, vec![Mix::Write, Mix::Mixed]);
    }

    #[test]
    fn no_key_under_the_prefix_lets_the_run_go() {
        let empty = Ok(json!({"success": true, "keys": [], "next": null}));
        assert_eq!(prefix_verdict(&empty, "locksmith-bench/"), Ok(()));
    }

    #[test]
    fn a_key_under_the_prefix_refuses_the_run() {
        let taken = Ok(json!({"success": true, "keys": ["locksmith-bench/k3"], "next": "x"}));
        let refusal = prefix_verdict(&taken, "locksmith-bench/").expect_err("refused");
        assert!(refusal.contains("\"locksmith-bench/k3\""), "{refusal}");
        assert!(refusal.contains("--overwrite"), "{refusal}");
    }

    #[test]
    fn a_server_without_the_keys_command_refuses_the_run_as_too_old() {
        let old = Err(ClientError::UnknownCommand(
            "unknown command \"keys\"".into(),
        ));
        let refusal = prefix_verdict(&old, "locksmith-bench/").expect_err("refused");
        assert!(refusal.contains("too old"), "{refusal}");
        assert!(refusal.contains("--overwrite"), "{refusal}");
    }

    #[test]
    fn any_other_answer_to_keys_refuses_the_run() {
        let failed = Err(ClientError::BadRequest("no".into()));
        assert!(prefix_verdict(&failed, "p/").is_err());
        let odd = Ok(json!({"success": true}));
        assert!(prefix_verdict(&odd, "p/").is_err());
    }
}
