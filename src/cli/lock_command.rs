//! `locksmith lock KEY... -- CMD`: run a command while holding locks, like `flock(1)` or
//! `etcdctl lock`.
//!
//! The locks are taken first (sorted, all-or-nothing, within `--timeout`); then CMD runs with
//! `LOCKSMITH_TOKENS` (a JSON object key → fencing token) and `LOCKSMITH_SESSION` in its
//! environment; when CMD exits the locks are released and `locksmith` exits with CMD's status.
//!
//! The locks belong to the session, which is the connection unless `--grace` is given. If the
//! session ends while CMD runs, the server has released the locks and another client may already
//! hold them, so by default CMD is sent SIGTERM, then SIGKILL after `--kill-after`, and the exit
//! status is [`LOCK_LOST`]; `--on-lost=ignore` lets CMD run on (with a warning) and exits with its
//! status. With `--grace D` the session outlives a lost connection by up to D: the client
//! reconnects and resumes it, and CMD runs on through the blip; only when the session cannot be
//! resumed (expired) is CMD terminated as above.
//!
//! Signals: the handlers for SIGTERM, SIGINT, SIGHUP and SIGQUIT are installed before the locks
//! are taken, so none of these signals ends `locksmith` by its default action while CMD may run.
//! One that arrives while `locksmith` connects or waits for the locks gives up the wait: CMD is
//! not run and the exit status is 128 + N. Once CMD runs, SIGTERM, and SIGINT/SIGHUP/SIGQUIT that
//! did not come from the terminal, are passed on to CMD (so is one that arrived between the grant
//! and CMD's start); the locks are released once CMD has exited. A Ctrl-C typed at the terminal
//! already reaches CMD directly (it runs in the same process group), so it is not sent a second
//! time.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use clap::{Args, ValueEnum};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};

use super::exit::{Failure, CANNOT_RUN, LOCK_LOST, NOT_FOUND};
use super::ServerOptions;
use crate::client::ClientError;
use crate::config::parse_duration;
use crate::lock::LockMode;

/// What to do with CMD when the connection, and with it the locks, is lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnLost {
    /// SIGTERM, then SIGKILL after `--kill-after`; exit status 13.
    Terminate,
    /// Let CMD run on; print a warning; exit with CMD's status.
    Ignore,
}

/// `locksmith lock`.
#[derive(Args, Debug)]
pub struct LockArgs {
    /// Take shared (read) locks instead of exclusive (write) ones.
    #[arg(long)]
    pub read: bool,
    /// How long to wait for the locks (`10s`, `1.5m`; `0s` = fail at once if one is taken).
    /// Default: the server's `--lock-timeout`.
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// What to do with CMD if the connection to the server is lost while it runs.
    #[arg(long, value_enum, default_value = "terminate")]
    pub on_lost: OnLost,
    /// Keep the locks through a lost connection for up to this long (`10s`; the server may grant
    /// less, up to its `--max-session-grace`): the client reconnects and resumes the session, and
    /// CMD runs on. Default: the locks end with the connection.
    #[arg(long, value_parser = parse_duration)]
    pub grace: Option<Duration>,
    /// After SIGTERM, how long CMD has before SIGKILL.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub kill_after: Duration,
    /// The session's name (default: CMD's file name).
    #[arg(long)]
    pub name: Option<String>,
    /// The keys to lock.
    #[arg(required = true, value_name = "KEY")]
    pub keys: Vec<String>,
    /// The command to run while the locks are held, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
    #[command(flatten)]
    pub server: ServerOptions,
}

/// Runs `locksmith lock`; the exit status to leave with.
///
/// # Errors
/// A [`Failure`] when the locks could not be taken or CMD could not be started.
pub async fn run(args: LockArgs) -> Result<u8, Failure> {
    let (program, program_args) = args
        .command
        .split_first()
        .ok_or_else(|| Failure::usage("no command given after --"))?;
    let name = args.name.clone().unwrap_or_else(|| {
        std::path::Path::new(program)
            .file_name()
            .map_or_else(|| "locksmith lock".into(), |n| n.to_string_lossy().into())
    });
    // The handlers exist before the locks are taken: a signal from now on is ours to handle
    // (never the default action, which would end `locksmith` and so release the locks while CMD
    // ran on). Until CMD runs, a signal gives up the wait; after, it is passed on to CMD.
    let mut signals = Signals::new()?;
    let mut builder = args.server.builder().name(&name);
    if let Some(grace) = args.grace {
        builder = builder.grace(grace);
    }
    let client = tokio::select! {
        client = builder.connect() => client?,
        signal = signals.next_any() => return Err(interrupted(signal)),
    };
    if args.grace.is_some() && client.grace().is_none() {
        eprintln!(
            "locksmith: warning: the server grants no grace; the locks end with the connection"
        );
    }
    let mode = if args.read {
        LockMode::Shared
    } else {
        LockMode::Exclusive
    };
    let grant = tokio::select! {
        grant = client.lock(&args.keys, mode, args.timeout) => grant,
        signal = signals.next_any() => {
            // Closing the connection withdraws the wait (or releases a grant that raced it).
            client.close().await;
            return Err(interrupted(signal));
        }
    };
    let grant = match grant {
        Ok(grant) => grant,
        Err(error) => {
            client.close().await;
            return Err(error.into());
        }
    };
    let tokens = serde_json::to_string(&grant.tokens).unwrap_or_else(|_| "{}".into());
    let mut child = match Command::new(program)
        .args(program_args)
        .env("LOCKSMITH_TOKENS", tokens)
        .env("LOCKSMITH_SESSION", client.session_id())
        .spawn()
    {
        Ok(child) => child,
        Err(error) => {
            client.close().await;
            let status = if error.kind() == std::io::ErrorKind::NotFound {
                NOT_FOUND
            } else {
                CANNOT_RUN
            };
            return Err(Failure::new(
                status,
                "cannot_run",
                format!("cannot run {}: {error}", program.to_string_lossy()),
            ));
        }
    };
    let outcome = supervise(&mut child, &client, &args, signals).await;
    client.close().await;
    outcome
}

/// Waits for CMD, passing signals on and acting on a lost connection.
async fn supervise(
    child: &mut Child,
    client: &crate::client::Client,
    args: &LockArgs,
    mut signals: Signals,
) -> Result<u8, Failure> {
    let mut lost_reason: Option<ClientError> = None;
    loop {
        tokio::select! {
            status = child.wait() => {
                let status = status.map_err(|e| Failure::new(CANNOT_RUN, "cannot_run", format!("waiting for the command failed: {e}")))?;
                return Ok(match lost_reason {
                    Some(_) if args.on_lost == OnLost::Terminate => LOCK_LOST,
                    _ => exit_status(status),
                });
            }
            reason = client.lost(), if lost_reason.is_none() => {
                eprintln!("locksmith: lock_lost: {reason}; the server has released the locks");
                lost_reason = Some(reason);
                if args.on_lost == OnLost::Terminate {
                    return terminate(child, args.kill_after).await;
                }
            }
            signal = signals.next() => forward(child, signal),
        }
    }
}

/// SIGTERM, then SIGKILL after `grace`; the exit status says the lock was lost.
async fn terminate(child: &mut Child, grace: Duration) -> Result<u8, Failure> {
    eprintln!("locksmith: terminating the command (SIGTERM, SIGKILL after {grace:?})");
    forward(child, Signal::SIGTERM);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
    Ok(LOCK_LOST)
}

/// Sends `signal` to CMD if it is still running.
fn forward(child: &Child, signal: Signal) {
    if let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) {
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

/// `locksmith lock` was sent `signal` before CMD ran: CMD is never run, and the exit status is
/// what a shell reports for a process that `signal` ended (128 + N).
fn interrupted(signal: Signal) -> Failure {
    Failure::new(
        u8::try_from(128 + signal as i32).unwrap_or(255),
        "interrupted",
        format!("{signal} while waiting for the locks; the command was not run"),
    )
}

/// CMD's status as a shell reports it: its exit code, or 128 + the signal that ended it.
fn exit_status(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(1),
        (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(255),
        (None, None) => 1,
    }
}

/// The signals `locksmith lock` catches so that it can release the locks after CMD ends.
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self, Failure> {
        let install = |kind: SignalKind| {
            signal(kind).map_err(|e| {
                Failure::new(
                    CANNOT_RUN,
                    "cannot_run",
                    format!("cannot handle signals: {e}"),
                )
            })
        };
        Ok(Signals {
            terminate: install(SignalKind::terminate())?,
            interrupt: install(SignalKind::interrupt())?,
            hangup: install(SignalKind::hangup())?,
            quit: install(SignalKind::quit())?,
        })
    }

    /// The next signal, wherever it came from (before CMD runs, every one of them is for us).
    async fn next_any(&mut self) -> Signal {
        tokio::select! {
            _ = self.terminate.recv() => Signal::SIGTERM,
            _ = self.interrupt.recv() => Signal::SIGINT,
            _ = self.hangup.recv() => Signal::SIGHUP,
            _ = self.quit.recv() => Signal::SIGQUIT,
        }
    }

    /// The next signal to pass on to CMD. Terminal-generated ones (Ctrl-C, Ctrl-\, hangup)
    /// already reached CMD when we are in the terminal's foreground process group, so they are
    /// skipped then.
    async fn next(&mut self) -> Signal {
        loop {
            let signal = self.next_any().await;
            let terminal_kind = signal != Signal::SIGTERM;
            if !(terminal_kind && in_terminal_foreground()) {
                return signal;
            }
        }
    }
}

/// Whether this process is in the foreground process group of the terminal on stdin.
fn in_terminal_foreground() -> bool {
    let stdin = std::io::stdin();
    nix::unistd::tcgetpgrp(&stdin).is_ok_and(|group| group == nix::unistd::getpgrp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmd_status_is_reported_as_a_shell_would() {
        assert_eq!(exit_status(ExitStatus::from_raw(0)), 0);
        assert_eq!(exit_status(ExitStatus::from_raw(3 << 8)), 3);
        // Killed by SIGTERM (15): 128 + 15.
        assert_eq!(exit_status(ExitStatus::from_raw(15)), 143);
    }
}
