//! Command-line and environment configuration (clap). Every flag can also be set through the
//! environment variable named in its help.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Parser};

use crate::lock::DEFAULT_MAX_KEYS_PER_SESSION;

/// The port served when no `--listen` is given.
pub const DEFAULT_PORT: u16 = 8008;

/// The addresses a bare port (`--listen :8008`, or no `--listen` at all) stands for: loopback on
/// IPv4 and IPv6, so `ws://localhost:8008/ws` works whichever address `localhost` resolves to.
pub const LOOPBACK: [IpAddr; 2] = [
    IpAddr::V4(Ipv4Addr::LOCALHOST),
    IpAddr::V6(Ipv6Addr::LOCALHOST),
];

/// What is served when no `--listen` is given: the loopback addresses on [`DEFAULT_PORT`].
pub const DEFAULT_LISTEN: ListenAddr = ListenAddr::Port(DEFAULT_PORT);

/// How log lines are written (`--log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, with the event's fields.
    Json,
}

/// Locksmith: a deadlock-aware lock manager service over WebSocket.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
pub struct Config {
    /// Address to listen on (repeatable): `127.0.0.1:8008`, `[::1]:8008`, a host name with a
    /// port (`localhost:8008`: every address it resolves to), or a bare port (`:8008` or `8008`:
    /// 127.0.0.1 and [::1] on that port). Default: `:8008`. The IPv6 address of a host name or a
    /// bare port is skipped with a warning where IPv6 is unavailable; every other address that
    /// cannot be bound stops the start.
    #[arg(long = "listen", env = "LOCKSMITH_LISTEN", value_delimiter = ',')]
    pub listen: Vec<ListenAddr>,

    /// Default wait limit of lock/read/write requests that give no `timeout_ms`
    /// (e.g. `30s`, `500ms`, `2m`).
    #[arg(long, env = "LOCKSMITH_LOCK_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub lock_timeout: Duration,

    /// Log lines as `text` (for people) or `json` (one object per line, for log shippers). The
    /// level is set with `RUST_LOG` (default `info`).
    #[arg(long, env = "LOCKSMITH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Most simultaneous client connections; more are refused with `server_busy`.
    #[arg(long, env = "LOCKSMITH_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,

    /// Largest request frame, in bytes; a larger one is answered `too_large` and the connection
    /// is closed (close code 1009).
    #[arg(long, env = "LOCKSMITH_MAX_MESSAGE_BYTES", default_value_t = 1024 * 1024)]
    pub max_message_bytes: usize,

    /// Most keys one request may name (`too_many_keys` above it).
    #[arg(long, env = "LOCKSMITH_MAX_KEYS_PER_REQUEST", default_value_t = 1024)]
    pub max_keys_per_request: usize,

    /// Most keys one session may hold at once; a request that would take it over is answered
    /// `too_many_locks` and takes nothing.
    #[arg(long, env = "LOCKSMITH_MAX_LOCKS_PER_SESSION", default_value_t = DEFAULT_MAX_KEYS_PER_SESSION)]
    pub max_locks_per_session: usize,

    /// A connection from which nothing (not even a pong to the server's pings) arrives for this
    /// long is closed and its locks released. `0s` disables the keepalive.
    #[arg(long, env = "LOCKSMITH_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// A TCP connection that has not completed its WebSocket upgrade (or its plain HTTP
    /// requests, such as `/healthz`) this long after it was accepted is closed, so a client
    /// that sends nothing, or half a request, cannot hold a socket. `0s` disables the deadline.
    #[arg(long, env = "LOCKSMITH_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// On SIGTERM or SIGINT, how long connections get to take their last answers
    /// (`shutting_down`) and close; those still open after it are closed without waiting for
    /// the client, and the process exits. Keep it below the stop grace of whatever stops the
    /// server (Docker: 10 s, Kubernetes: 30 s).
    #[arg(long, env = "LOCKSMITH_SHUTDOWN_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Longest grace period a session may ask for (`hello` with `grace_ms`): how long a
    /// resumable session keeps its locks after its connection drops, waiting to be resumed.
    /// Longer requests get this; 0 makes no session resumable.
    #[arg(long, env = "LOCKSMITH_MAX_SESSION_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub max_session_grace: Duration,

    /// A browser `Origin` allowed to connect (repeatable). Upgrades that carry any other Origin
    /// are refused with 403; clients that send no Origin are accepted.
    #[arg(
        long = "allowed-origin",
        env = "LOCKSMITH_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,

    /// Threads that serve the connections. With 1 (the default) the server runs on a single
    /// thread, as Redis does: the cheapest per request, since no request wakes another thread.
    /// More spread the connections' work (WebSocket framing, JSON) over cores, at about a tenth
    /// more CPU per request; the lock table stays one critical section whatever the count. Big
    /// `locks` answers and the durable store's commits run on threads of their own either way;
    /// what runs inside the lock table's critical section (a snapshot, closing a session that
    /// holds many locks) holds every lock request up whatever the count, and with one thread
    /// the other requests too.
    #[arg(long, env = "LOCKSMITH_THREADS", default_value = "1")]
    pub threads: std::num::NonZeroUsize,

    /// Directory of the durable value store (created if missing; holds `locksmith.redb`).
    #[arg(long, env = "LOCKSMITH_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Keep values in memory only (lost on exit) instead of in the durable store. A bare flag,
    /// or a boolean: `true`/`false`, `yes`/`no`, `on`/`off`, `1`/`0` (any case), also as the
    /// value of the environment variable.
    #[arg(
        long,
        env = "LOCKSMITH_IN_MEMORY",
        action = ArgAction::Set,
        num_args = 0..=1,
        default_value = "false",
        default_missing_value = "true",
        value_parser = BoolishValueParser::new()
    )]
    pub in_memory: bool,

    /// Token every client must present (`Authorization: Bearer <token>` or `?token=`) to use
    /// the server; `/healthz` stays open. Without it, anyone who can reach the port can take
    /// locks and read and write values.
    #[arg(long, env = "LOCKSMITH_TOKEN", hide_env_values = true)]
    pub token: Option<crate::auth::Secret>,

    /// Token that makes a connection an admin connection (it may `kill` sessions); also
    /// accepted where `--token` is needed. Without it, `kill` is always forbidden.
    #[arg(long, env = "LOCKSMITH_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<crate::auth::Secret>,

    /// Listen on a non-loopback address without `--token` (only on a network you trust). A bare
    /// flag, or a boolean as for `--in-memory`, also as the value of the environment variable.
    #[arg(
        long,
        env = "LOCKSMITH_INSECURE_NO_AUTH",
        action = ArgAction::Set,
        num_args = 0..=1,
        default_value = "false",
        default_missing_value = "true",
        value_parser = BoolishValueParser::new()
    )]
    pub insecure_no_auth: bool,
}

/// One `--listen` value, as written; [`crate::listen::bind`] resolves it at start-up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// An IP address and port (`127.0.0.1:8008`, `[::1]:8008`): exactly that address.
    Socket(SocketAddr),
    /// A host name and port (`localhost:8008`): every address the name resolves to.
    Host {
        /// The name, resolved when the server starts.
        name: String,
        /// The port, on every address of the name.
        port: u16,
    },
    /// A bare port (`:8008`, `8008`): the [`LOOPBACK`] addresses on it.
    Port(u16),
}

/// Why a `--listen` value is not an address.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ListenAddrError {
    /// No `:port` at the end.
    #[error("{0:?} has no port: write e.g. {0}:8008")]
    NoPort(String),
    /// The port is not a number from 0 to 65535.
    #[error("invalid port {port:?} in {text:?}: use a number from 0 to 65535")]
    BadPort {
        /// The whole value.
        text: String,
        /// What stood after the last `:`.
        port: String,
    },
    /// An IPv6 address without brackets, or a host part that is no name.
    #[error("invalid host {host:?} in {text:?}: write an IPv6 address in brackets ([::1]:8008), an IPv4 address (127.0.0.1:8008) or a host name (localhost:8008)")]
    BadHost {
        /// The whole value.
        text: String,
        /// What stood before the port.
        host: String,
    },
}

impl FromStr for ListenAddr {
    type Err = ListenAddrError;

    fn from_str(text: &str) -> Result<ListenAddr, ListenAddrError> {
        let text = text.trim();
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(ListenAddr::Socket(addr));
        }
        let parse_port = |port: &str| {
            port.parse::<u16>().map_err(|_| ListenAddrError::BadPort {
                text: text.to_owned(),
                port: port.to_owned(),
            })
        };
        let Some((host, port)) = text.rsplit_once(':') else {
            return if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
                parse_port(text).map(ListenAddr::Port)
            } else {
                Err(ListenAddrError::NoPort(text.to_owned()))
            };
        };
        if host.is_empty() {
            return parse_port(port).map(ListenAddr::Port);
        }
        let is_name = host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
        if !is_name {
            return Err(ListenAddrError::BadHost {
                text: text.to_owned(),
                host: host.to_owned(),
            });
        }
        Ok(ListenAddr::Host {
            name: host.to_owned(),
            port: parse_port(port)?,
        })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Socket(addr) => write!(f, "{addr}"),
            ListenAddr::Host { name, port } => write!(f, "{name}:{port}"),
            ListenAddr::Port(port) => write!(f, ":{port}"),
        }
    }
}

/// Parses a duration: a number, optionally with a fraction, and a unit: `ms`, `s`, `m` or `h`
/// (`500ms`, `1.5s`, `0.25s`, `2m`, `1h`). A bare `0` is accepted too (zero is zero in every
/// unit); any other number without a unit is refused, because `--lock-timeout 5` would otherwise
/// be read as 5 ms by someone who meant 5 s. Fractions finer than a nanosecond are dropped.
///
/// # Errors
/// A message for the user: for a number without a unit, `a duration needs a unit: 5s or 5ms?`;
/// otherwise one naming the accepted forms.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let Some(number) = Decimal::parse(number) else {
        return Err(format!(
            "invalid duration {text:?}: use a number and a unit, e.g. 500ms, 1.5s, 2m or 1h"
        ));
    };
    let nanos_per_unit: u128 = match unit {
        "" if number.is_zero() => return Ok(Duration::ZERO),
        "" => return Err(format!("a duration needs a unit: {text}s or {text}ms?")),
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60 * 1_000_000_000,
        "h" => 3_600 * 1_000_000_000,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in duration {text:?}: use ms, s, m or h (e.g. 500ms, 1.5s)"
            ))
        }
    };
    number
        .times(nanos_per_unit)
        .and_then(|nanos| {
            let secs = u64::try_from(nanos / 1_000_000_000).ok()?;
            // The remainder of a division by 10^9 is below 10^9, so it fits.
            let subsec = u32::try_from(nanos % 1_000_000_000).ok()?;
            Some(Duration::new(secs, subsec))
        })
        .ok_or_else(|| format!("duration {text:?} is too long"))
}

/// A non-negative decimal number as written (`12`, `1.5`, `0.25`), kept exact: the digits
/// without the point, and how many of them follow the point.
struct Decimal {
    /// Every digit, the point removed (`1.5` is 15).
    digits: u128,
    /// Digits after the point (`1.5` has 1); at most [`Decimal::MAX_FRACTION_DIGITS`].
    fraction_digits: u32,
}

impl Decimal {
    /// Nine digits of fraction are nanoseconds of a second and microseconds of an hour; further
    /// digits are dropped so that the product in [`Decimal::times`] cannot overflow.
    const MAX_FRACTION_DIGITS: usize = 9;

    /// `digits` or `digits.digits`; `None` for anything else (an empty side, a sign, two points,
    /// more digits than a duration can use).
    fn parse(text: &str) -> Option<Decimal> {
        let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        let (whole, fraction) = match text.split_once('.') {
            Some((whole, fraction)) if all_digits(fraction) => (whole, fraction),
            Some(_) => return None,
            None => (text, ""),
        };
        if !all_digits(whole) || whole.len() > 20 {
            return None;
        }
        let fraction = &fraction[..fraction.len().min(Self::MAX_FRACTION_DIGITS)];
        let digits = format!("{whole}{fraction}").parse().ok()?;
        let fraction_digits = u32::try_from(fraction.len()).ok()?;
        Some(Decimal {
            digits,
            fraction_digits,
        })
    }

    fn is_zero(&self) -> bool {
        self.digits == 0
    }

    /// `self * factor`, rounded down to a whole number; `None` on overflow.
    fn times(&self, factor: u128) -> Option<u128> {
        Some(self.digits.checked_mul(factor)? / 10u128.pow(self.fraction_digits))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_ms_s_m_h_and_fractions() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0.25s"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("0.1s"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("2.5ms"), Ok(Duration::from_micros(2500)));
        assert_eq!(parse_duration("0.5h"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration(" 5s "), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("0ms"), Ok(Duration::ZERO));
    }

    #[test]
    fn a_duration_without_a_unit_is_rejected_with_a_hint() {
        assert_eq!(
            parse_duration("5"),
            Err("a duration needs a unit: 5s or 5ms?".to_owned())
        );
        assert_eq!(
            parse_duration("1.5"),
            Err("a duration needs a unit: 1.5s or 1.5ms?".to_owned())
        );
    }

    #[test]
    fn a_bare_zero_is_accepted_as_no_time() {
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0.0"), Ok(Duration::ZERO));
    }

    #[test]
    fn malformed_durations_are_rejected() {
        for text in [
            "", "s", "-1s", "+1s", "1..5s", ".5s", "5.s", "1.2.3s", "5 s", "5d",
        ] {
            assert!(parse_duration(text).is_err(), "{text:?} was accepted");
        }
        assert!(parse_duration("5d")
            .unwrap_err()
            .contains("use ms, s, m or h"));
        assert!(parse_duration("99999999999999999999h")
            .unwrap_err()
            .contains("too long"));
    }

    #[test]
    fn a_duration_flag_without_a_unit_fails_to_parse_with_the_hint() {
        let error = Config::try_parse_from(["locksmith", "--lock-timeout", "5"])
            .expect_err("5 without a unit");
        assert!(error.to_string().contains("5s or 5ms?"), "message: {error}");
    }

    #[test]
    fn defaults_need_no_flags() {
        let config = Config::try_parse_from(["locksmith"]).expect("defaults parse");
        assert!(config.listen.is_empty());
        assert_eq!(config.idle_timeout, Duration::from_secs(60));
        assert_eq!(config.handshake_timeout, Duration::from_secs(10));
        assert_eq!(config.lock_timeout, Duration::from_secs(30));
        assert_eq!(config.shutdown_timeout, Duration::from_secs(5));
        assert_eq!(config.max_session_grace, Duration::from_secs(30));
        assert_eq!(config.log_format, LogFormat::Text);
        assert_eq!(config.data_dir, PathBuf::from("./data"));
        assert!(!config.in_memory);
        assert_eq!(config.max_locks_per_session, 100_000);
        assert_eq!(
            config.threads.get(),
            1,
            "a single-threaded server by default"
        );
        let config = Config::try_parse_from(["locksmith", "--max-locks-per-session", "3"])
            .expect("a limit parses");
        assert_eq!(config.max_locks_per_session, 3);
    }

    #[test]
    fn listen_accepts_ip_addresses_host_names_and_bare_ports() {
        let parse = |text: &str| text.parse::<ListenAddr>();
        assert_eq!(
            parse("127.0.0.1:8008"),
            Ok(ListenAddr::Socket(SocketAddr::from(([127, 0, 0, 1], 8008))))
        );
        assert_eq!(
            parse("[::1]:9000"),
            Ok(ListenAddr::Socket(SocketAddr::from((
                Ipv6Addr::LOCALHOST,
                9000
            ))))
        );
        assert_eq!(
            parse("localhost:8008"),
            Ok(ListenAddr::Host {
                name: "localhost".into(),
                port: 8008
            })
        );
        assert_eq!(
            parse("db-1.example.org:0"),
            Ok(ListenAddr::Host {
                name: "db-1.example.org".into(),
                port: 0
            })
        );
        assert_eq!(parse(":8008"), Ok(ListenAddr::Port(8008)));
        assert_eq!(parse("8008"), Ok(ListenAddr::Port(8008)));
    }

    #[test]
    fn listen_values_without_a_usable_port_or_host_are_rejected() {
        let parse = |text: &str| text.parse::<ListenAddr>();
        assert!(matches!(
            parse("localhost"),
            Err(ListenAddrError::NoPort(_))
        ));
        assert!(matches!(parse(""), Err(ListenAddrError::NoPort(_))));
        assert!(matches!(
            parse("localhost:"),
            Err(ListenAddrError::BadPort { .. })
        ));
        assert!(matches!(
            parse(":99999"),
            Err(ListenAddrError::BadPort { .. })
        ));
        assert!(matches!(
            parse("99999"),
            Err(ListenAddrError::BadPort { .. })
        ));
        assert!(matches!(
            parse("::1:8008"),
            Err(ListenAddrError::BadHost { .. })
        ));
        assert!(matches!(
            parse("[::1]"),
            Err(ListenAddrError::BadHost { .. })
        ));
        assert!(matches!(
            parse("a b:80"),
            Err(ListenAddrError::BadHost { .. })
        ));
    }

    #[test]
    fn listen_addresses_print_as_written() {
        for text in ["127.0.0.1:8008", "[::1]:8008", "localhost:8008", ":8008"] {
            let addr: ListenAddr = text.parse().expect("valid");
            assert_eq!(addr.to_string(), text);
        }
    }

    #[test]
    fn listen_flags_repeat_and_the_variable_is_comma_separated() {
        let config = Config::try_parse_from([
            "locksmith",
            "--listen",
            "localhost:8008,:9000",
            "--listen",
            "[::1]:1",
        ])
        .expect("valid addresses");
        assert_eq!(
            config.listen,
            vec![
                ListenAddr::Host {
                    name: "localhost".into(),
                    port: 8008
                },
                ListenAddr::Port(9000),
                ListenAddr::Socket(SocketAddr::from((Ipv6Addr::LOCALHOST, 1))),
            ]
        );
    }

    #[test]
    fn in_memory_and_insecure_no_auth_are_bare_flags_or_booleans_in_any_usual_spelling() {
        type Field = fn(&Config) -> bool;
        let flags: [(&str, Field); 2] = [
            ("--in-memory", |config| config.in_memory),
            ("--insecure-no-auth", |config| config.insecure_no_auth),
        ];
        for (flag, field) in flags {
            let parse = |args: &[&str]| {
                Config::try_parse_from(std::iter::once("locksmith").chain(args.iter().copied()))
                    .map(|config| field(&config))
            };
            assert_eq!(parse(&[]).ok(), Some(false), "{flag}");
            assert_eq!(parse(&[flag]).ok(), Some(true), "{flag}");
            assert_eq!(parse(&[flag, "--data-dir", "x"]).ok(), Some(true), "{flag}");
            for yes in ["1", "true", "TRUE", "yes", "Yes", "on", "y"] {
                assert_eq!(
                    parse(&[&format!("{flag}={yes}")]).ok(),
                    Some(true),
                    "{flag}={yes}"
                );
            }
            for no in ["0", "false", "False", "no", "NO", "off", "n"] {
                assert_eq!(
                    parse(&[&format!("{flag}={no}")]).ok(),
                    Some(false),
                    "{flag}={no}"
                );
            }
            assert_eq!(parse(&[flag, "no"]).ok(), Some(false), "{flag} no");
            assert!(parse(&[&format!("{flag}=maybe")]).is_err(), "{flag}=maybe");
        }
    }
}
