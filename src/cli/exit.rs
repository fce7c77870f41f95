//! The command-line client's exit statuses, and the one-line error it prints.
//!
//! `locksmith lock -- CMD` exits with CMD's own status when CMD ran (128 + N when a signal N
//! ended it, as shells report it). Its own failures, and those of every other client command,
//! have distinct statuses, like `flock -E`: a script can tell "the lock was busy" from "the
//! server is down" from "the command failed".

use std::process::ExitCode;

use super::escape_controls;
use crate::client::ClientError;

/// Exit status: the command line is wrong (clap's own status for usage errors).
pub const BAD_USAGE: u8 = 2;
/// Exit status: the server could not be reached, refused the token, or is at its limit.
pub const CANNOT_CONNECT: u8 = 10;
/// Exit status: the locks were not granted within the timeout (or, with `--timeout 0`, a key
/// was taken).
pub const TIMEOUT: u8 = 11;
/// Exit status: waiting for the locks would have closed a deadlock cycle.
pub const DEADLOCK: u8 = 12;
/// Exit status: the connection to the server was lost while CMD ran, so the locks were gone;
/// CMD was terminated (or, with `--on-lost=ignore`, ran to its end).
pub const LOCK_LOST: u8 = 13;
/// Exit status: the server refused the request for another reason (the error code says which).
pub const REFUSED: u8 = 14;
/// Exit status: CMD exists but could not be run (as in shells).
pub const CANNOT_RUN: u8 = 126;
/// Exit status: CMD was not found (as in shells).
pub const NOT_FOUND: u8 = 127;

/// A failure of a client command: what to print and how to exit.
#[derive(Debug)]
pub struct Failure {
    /// The exit status.
    pub status: u8,
    /// The stable code printed first (a wire code, or one of the client's own).
    pub code: String,
    /// The sentence for humans.
    pub message: String,
}

impl Failure {
    /// A failure with its own status, code and message.
    pub fn new(status: u8, code: &str, message: impl Into<String>) -> Self {
        Failure {
            status,
            code: code.to_owned(),
            message: message.into(),
        }
    }

    /// A usage error found after parsing (e.g. a value that is not JSON).
    pub fn usage(message: impl Into<String>) -> Self {
        Failure::new(BAD_USAGE, "bad_usage", message)
    }

    /// Prints the one-line error on stderr and gives the exit code.
    pub fn report(&self) -> ExitCode {
        eprintln!("{}", self.line());
        ExitCode::from(self.status)
    }

    /// `locksmith: <code>: <sentence>`, with control characters escaped: the server's sentence
    /// may name other clients' keys and sessions (a deadlock's cycle).
    pub fn line(&self) -> String {
        format!(
            "locksmith: {}: {}",
            escape_controls(&self.code),
            escape_controls(&self.message)
        )
    }
}

impl From<ClientError> for Failure {
    fn from(error: ClientError) -> Self {
        let status = match &error {
            ClientError::Connect { .. }
            | ClientError::Unauthorized
            | ClientError::ServerBusy(_)
            | ClientError::ConnectionLost { .. }
            | ClientError::ShuttingDown(_) => CANNOT_CONNECT,
            ClientError::Timeout { .. } => TIMEOUT,
            ClientError::Deadlock { .. } => DEADLOCK,
            _ => REFUSED,
        };
        Failure::new(status, error.code(), error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_failure_has_its_own_exit_status() {
        let statuses = [
            Failure::from(ClientError::Unauthorized).status,
            Failure::from(ClientError::Timeout {
                message: String::new(),
                key: "k".into(),
            })
            .status,
            Failure::from(ClientError::Deadlock {
                message: String::new(),
                cycle: vec![],
            })
            .status,
            Failure::from(ClientError::Forbidden(String::new())).status,
            BAD_USAGE,
            LOCK_LOST,
        ];
        let mut distinct = statuses.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), statuses.len(), "{statuses:?}");
        assert_eq!(
            statuses[..4],
            [CANNOT_CONNECT, TIMEOUT, DEADLOCK, REFUSED],
            "the documented statuses"
        );
    }

    #[test]
    fn the_error_line_escapes_control_characters_from_the_server() {
        let failure = Failure::from(ClientError::Timeout {
            message: "timed out waiting for key k\u{1b}[2J".into(),
            key: "k\u{1b}[2J".into(),
        });
        assert_eq!(
            failure.line(),
            "locksmith: timeout: timed out waiting for key k\\u{1b}[2J"
        );
    }

    #[test]
    fn the_printed_code_is_the_wire_code() {
        let failure = Failure::from(ClientError::NotFound("no session abc".into()));
        assert_eq!(failure.code, "not_found");
        assert_eq!(failure.message, "no session abc");
    }
}
