//! Starting the `locksmith` binary: flags and environment variables a new user writes, and
//! what the binary says when it refuses them. Each test runs the binary as a child process (the
//! environment is per process) on loopback through `tests/binary`, and waits for it a bounded
//! time.

mod binary;

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

use binary::{finish, locksmith, ServerProcess};

/// The binary (clean `LOCKSMITH_*` environment) with its values in `data_dir`.
fn keeping_data_in(data_dir: &Path) -> Command {
    let mut command = locksmith();
    command.arg("--data-dir").arg(data_dir);
    command
}

#[test]
fn a_lock_timeout_without_a_unit_stops_the_start_with_a_hint() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut command = keeping_data_in(dir.path());
    command.args(["--listen", "127.0.0.1:0", "--lock-timeout", "5"]);
    let refused = finish(command);
    assert_eq!(refused.status.code(), Some(2), "a usage error: {refused:?}");
    assert!(
        refused
            .stderr
            .contains("a duration needs a unit: 5s or 5ms?"),
        "message: {}",
        refused.stderr
    );
}

#[test]
fn in_memory_from_the_environment_accepts_yes_and_one() {
    for yes in ["yes", "1", "On", "TRUE"] {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut command = keeping_data_in(dir.path());
        command.env("LOCKSMITH_IN_MEMORY", yes);
        let server = ServerProcess::start(command);
        assert!(
            server.log.iter().any(|l| l.contains("kept in memory only")),
            "LOCKSMITH_IN_MEMORY={yes}: {:?}",
            server.log
        );
    }
}

#[test]
fn in_memory_from_the_environment_accepts_no_and_zero() {
    for no in ["no", "0", "off", "False"] {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut command = keeping_data_in(dir.path());
        command.env("LOCKSMITH_IN_MEMORY", no);
        let server = ServerProcess::start(command);
        assert!(
            server.log.iter().any(|l| l.contains("stored durably")),
            "LOCKSMITH_IN_MEMORY={no}: {:?}",
            server.log
        );
    }
}

#[test]
fn in_memory_from_the_environment_refuses_a_non_boolean() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut command = keeping_data_in(dir.path());
    command
        .args(["--listen", "127.0.0.1:0"])
        .env("LOCKSMITH_IN_MEMORY", "maybe");
    let refused = finish(command);
    assert_eq!(refused.status.code(), Some(2), "a usage error: {refused:?}");
    assert!(
        refused.stderr.contains("maybe"),
        "message: {}",
        refused.stderr
    );
}

#[test]
fn insecure_no_auth_from_the_environment_accepts_one() {
    // It was a plain flag, whose variable took only `true`/`false`: `=1` stopped the start.
    let mut command = locksmith();
    command
        .arg("--in-memory")
        .env("LOCKSMITH_INSECURE_NO_AUTH", "1");
    let server = ServerProcess::start(command);
    assert!(
        server.log.iter().any(|l| l.contains("listening on")),
        "{:?}",
        server.log
    );
}

#[test]
fn a_busy_default_address_stops_the_binary_naming_it() {
    let other_program = TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = other_program.local_addr().expect("local address");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut command = keeping_data_in(dir.path());
    command.args(["--in-memory", "--listen", &format!(":{}", busy.port())]);
    let refused = finish(command);
    assert_eq!(
        refused.status.code(),
        Some(1),
        "a start-up failure: {refused:?}"
    );
    assert!(
        refused.stderr.contains(&format!("cannot listen on {busy}")),
        "message: {}",
        refused.stderr
    );
}

#[test]
fn log_format_json_writes_one_json_object_per_line_with_the_events_fields() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut command = keeping_data_in(dir.path());
    command.args(["--log-format", "json"]);
    let server = ServerProcess::start(command);
    assert!(!server.log.is_empty(), "the start-up lines");
    for line in &server.log {
        let event: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line}"));
        assert!(event["timestamp"].is_string(), "{line}");
        assert!(event["level"].is_string(), "{line}");
        assert!(event["fields"]["message"].is_string(), "{line}");
    }
    assert!(
        server
            .log
            .iter()
            .any(|l| l.contains("stored durably") || l.contains("listening")),
        "{:?}",
        server.log
    );
}
