//! Starting the `locksmith` binary: flags and environment variables a new user writes, and
//! what the binary says when it refuses them. Each test runs the binary as a child process (the
//! environment is per process) on loopback, and waits for it a bounded time.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Longest the binary may take to start or to refuse to.
const PATIENCE: Duration = Duration::from_secs(20);

/// The binary with a clean `LOCKSMITH_*` environment and its values in `data_dir`.
fn locksmith(data_dir: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_locksmith"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("LOCKSMITH_") {
            command.env_remove(name);
        }
    }
    command
        .arg("--data-dir")
        .arg(data_dir)
        .env("RUST_LOG", "info");
    command
}

/// Runs `command` until it exits (it must refuse to start); returns its status and stderr.
fn run_to_exit(mut command: Command) -> (ExitStatus, String) {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn locksmith");
    let stderr = child.stderr.take().expect("piped stderr");
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(std::io::read_to_string(stderr).unwrap_or_default());
    });
    let Ok(text) = finished.recv_timeout(PATIENCE) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("locksmith did not exit");
    };
    (child.wait().expect("exit status"), text)
}

/// A server process, killed on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `command` and returns the log lines it printed up to the one that says where it
/// listens (the server is then killed).
fn log_until_listening(mut command: Command) -> Vec<String> {
    let mut child = Running(
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn locksmith"),
    );
    let stdout = child.0.stdout.take().expect("piped stdout");
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let mut log = Vec::new();
    loop {
        let line = received
            .recv_timeout(PATIENCE)
            .expect("the server says where it listens");
        let listening = line.contains("listening on ws://");
        log.push(line);
        if listening {
            return log;
        }
    }
}

#[test]
fn a_lock_timeout_without_a_unit_stops_the_start_with_a_hint() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut command = locksmith(dir.path());
    command.args(["--listen", "127.0.0.1:0", "--lock-timeout", "5"]);
    let (status, stderr) = run_to_exit(command);
    assert_eq!(status.code(), Some(2), "a usage error: {stderr}");
    assert!(
        stderr.contains("a duration needs a unit: 5s or 5ms?"),
        "message: {stderr}"
    );
}

#[test]
fn in_memory_from_the_environment_accepts_yes_and_one() {
    for yes in ["yes", "1", "On", "TRUE"] {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut command = locksmith(dir.path());
        command
            .args(["--listen", "127.0.0.1:0"])
            .env("LOCKSMITH_IN_MEMORY", yes);
        let log = log_until_listening(command);
        assert!(
            log.iter().any(|l| l.contains("kept in memory only")),
            "LOCKSMITH_IN_MEMORY={yes}: {log:?}"
        );
    }
}

#[test]
fn in_memory_from_the_environment_accepts_no_and_zero() {
    for no in ["no", "0", "off", "False"] {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut command = locksmith(dir.path());
        command
            .args(["--listen", "127.0.0.1:0"])
            .env("LOCKSMITH_IN_MEMORY", no);
        let log = log_until_listening(command);
        assert!(
            log.iter().any(|l| l.contains("stored durably")),
            "LOCKSMITH_IN_MEMORY={no}: {log:?}"
        );
    }
}

#[test]
fn in_memory_from_the_environment_refuses_a_non_boolean() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut command = locksmith(dir.path());
    command
        .args(["--listen", "127.0.0.1:0"])
        .env("LOCKSMITH_IN_MEMORY", "maybe");
    let (status, stderr) = run_to_exit(command);
    assert_eq!(status.code(), Some(2), "a usage error: {stderr}");
    assert!(stderr.contains("maybe"), "message: {stderr}");
}

#[test]
fn a_busy_default_address_stops_the_binary_naming_it() {
    let other_program = TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = other_program.local_addr().expect("local address");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut command = locksmith(dir.path());
    command.args(["--in-memory", "--listen", &format!(":{}", busy.port())]);
    let (status, stderr) = run_to_exit(command);
    assert_eq!(status.code(), Some(1), "a start-up failure: {stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {busy}")),
        "message: {stderr}"
    );
}
