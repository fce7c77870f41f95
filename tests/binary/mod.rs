//! Helpers shared by the tests that run the real `locksmith` binary as a child process: a clean
//! command line, a server process on a random loopback port (killed on drop), and running a
//! command to its end within a bound. Each such test file includes this module with
//! `mod binary;` and uses only part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Longest the binary may take to start, to answer, or to exit.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The binary, with every `LOCKSMITH_*` variable of the test's environment removed (so a
/// developer's own settings cannot change a test) and `RUST_LOG=info`.
pub fn locksmith() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_locksmith"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("LOCKSMITH_") {
            command.env_remove(name);
        }
    }
    command.env("RUST_LOG", "info");
    command
}

/// What a finished command printed, and how it ended.
#[derive(Debug)]
pub struct Finished {
    /// Its exit status.
    pub status: ExitStatus,
    /// Everything it wrote to stdout.
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

/// Runs `command` (stdin closed) until it exits, within [`PATIENCE`]; kills it and fails the test
/// if it does not.
pub fn finish(mut command: Command) -> Finished {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn locksmith");
    let stdout = read_in_background(child.stdout.take().expect("piped stdout"));
    let stderr = read_in_background(child.stderr.take().expect("piped stderr"));
    let stdout = stdout.recv_timeout(PATIENCE);
    let stderr = stderr.recv_timeout(PATIENCE);
    let (Ok(stdout), Ok(stderr)) = (stdout, stderr) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("locksmith did not exit within {PATIENCE:?}");
    };
    let status = child.wait().expect("exit status");
    Finished {
        status,
        stdout,
        stderr,
    }
}

fn read_in_background(stream: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(std::io::read_to_string(stream).unwrap_or_default());
    });
    finished
}

/// A `locksmith` server process on a random loopback port, killed (SIGKILL) on drop.
pub struct ServerProcess {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its log lines up to and including the one that says where it listens.
    pub log: Vec<String>,
    /// Its later log lines, as it writes them; disconnected once it has exited.
    later: mpsc::Receiver<String>,
}

/// How a server process ended after [`ServerProcess::terminate`].
#[derive(Debug)]
pub struct Terminated {
    /// Its exit status.
    pub status: ExitStatus,
    /// From the signal to its end of output (its exit).
    pub took: Duration,
    /// Every log line it wrote after the start-up lines.
    pub log: Vec<String>,
}

impl ServerProcess {
    /// Starts the binary with `args` plus `--listen 127.0.0.1:0` and waits until it says where
    /// it listens.
    pub fn start(mut command: Command) -> ServerProcess {
        let mut child = command
            .args(["--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn locksmith");
        let stdout = child.stdout.take().expect("piped stdout");
        let (lines, received) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        let mut log = Vec::new();
        let addr = loop {
            let Ok(line) = received.recv_timeout(PATIENCE) else {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the server did not say where it listens: {log:?}");
            };
            let addr = line
                .split("listening on ws://")
                .nth(1)
                // Up to the path: the line may go on (a JSON log line does).
                .and_then(|rest| rest.split("/ws").next())
                .map(|addr| addr.trim().to_owned());
            log.push(line);
            if let Some(addr) = addr {
                break addr.parse().expect("a socket address");
            }
        };
        ServerProcess {
            child,
            addr,
            log,
            later: received,
        }
    }

    /// Sends it SIGTERM and waits, at most `within`, until it exits. Fails the test (and kills
    /// it) if it does not exit in time.
    pub fn terminate(mut self, within: Duration) -> Terminated {
        let pid = i32::try_from(self.child.id()).expect("a pid");
        let sent = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("send SIGTERM");
        let deadline = sent + within;
        let mut log = Vec::new();
        // Its stdout ends when it exits.
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.later.recv_timeout(left) {
                Ok(line) => log.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("the server did not exit within {within:?} of SIGTERM: {log:#?}")
                }
            }
        }
        let took = sent.elapsed();
        let status = self.child.wait().expect("exit status");
        Terminated { status, took, log }
    }

    /// Its WebSocket URL.
    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Kills it with SIGKILL and reaps it (what `Drop` does).
    pub fn kill(self) {
        drop(self);
    }
}

impl Drop for ServerProcess {
    /// Kills the server whatever happens to the test, so a failing assertion never leaves a
    /// server process behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
