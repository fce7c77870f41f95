//! Command-line and environment configuration (clap). Every flag can also be set through the
//! environment variable named in its help.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// The addresses served when no `--listen` is given: loopback port 8008 on IPv4 and IPv6, so
/// `ws://localhost:8008/ws` works whichever address `localhost` resolves to.
pub const DEFAULT_LISTEN: [&str; 2] = ["127.0.0.1:8008", "[::1]:8008"];

/// Locksmith: a deadlock-aware lock manager service over WebSocket.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
pub struct Config {
    /// Address to listen on (repeatable). Default: 127.0.0.1:8008 and [::1]:8008 (the IPv6 one
    /// is skipped with a warning where IPv6 is unavailable).
    #[arg(long = "listen", env = "LOCKSMITH_LISTEN", value_delimiter = ',')]
    pub listen: Vec<SocketAddr>,

    /// Default wait limit of lock/read/write requests that give no `timeout_ms`
    /// (e.g. `30s`, `500ms`, `2m`).
    #[arg(long, env = "LOCKSMITH_LOCK_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub lock_timeout: Duration,

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

    /// A connection from which nothing (not even a pong to the server's pings) arrives for this
    /// long is closed and its locks released. `0s` disables the keepalive.
    #[arg(long, env = "LOCKSMITH_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// A browser `Origin` allowed to connect (repeatable). Upgrades that carry any other Origin
    /// are refused with 403; clients that send no Origin are accepted.
    #[arg(
        long = "allowed-origin",
        env = "LOCKSMITH_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,

    /// Directory of the durable value store (created if missing; holds `locksmith.redb`).
    #[arg(long, env = "LOCKSMITH_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Keep values in memory only (lost on exit) instead of in the durable store.
    #[arg(long, env = "LOCKSMITH_IN_MEMORY")]
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

    /// Listen on a non-loopback address without `--token` (only on a network you trust).
    #[arg(long, env = "LOCKSMITH_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
}

/// Parses `250ms`, `30s`, `2m`, or a bare number of milliseconds.
///
/// # Errors
/// A message naming the accepted forms.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: use e.g. 500ms, 30s or 2m"))?;
    match unit {
        "" | "ms" => Ok(Duration::from_millis(number)),
        "s" => Ok(Duration::from_secs(number)),
        "m" => Ok(Duration::from_secs(number.saturating_mul(60))),
        _ => Err(format!("invalid duration unit in {text:?}: use ms, s or m")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_ms_s_m_and_bare_milliseconds() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("15"), Ok(Duration::from_millis(15)));
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn defaults_need_no_flags() {
        let config = Config::try_parse_from(["locksmith"]).expect("defaults parse");
        assert!(config.listen.is_empty());
        assert_eq!(config.lock_timeout, Duration::from_secs(30));
        assert_eq!(config.data_dir, PathBuf::from("./data"));
        assert!(!config.in_memory);
    }
}
