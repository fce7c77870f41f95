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
        assert_eq!(config.lock_timeout, Duration::from_secs(30));
        assert_eq!(config.data_dir, PathBuf::from("./data"));
        assert!(!config.in_memory);
    }
}
