//! The `locksmith` command-line client, run as the built binary against a server: `lock -- CMD`
//! holds the locks exactly while CMD runs, passes CMD's status through, and has its own exit
//! status for each of its own failures; the data and admin commands print what they promise.
//!
//! Most tests run the server in-process (so they can look at its lock table); the one that kills
//! the server runs it as a process too.

mod binary;
mod fake;
mod proxy;
mod wire;

use std::process::Stdio;
use std::time::Duration;

use locksmith::client::{Client, ClientError};
use locksmith::lock::LockMode::Exclusive;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use wire::{connect_client, holders, settings, start, BOUND};

/// Exit statuses documented in the README (and `src/cli/exit.rs`).
const CANNOT_CONNECT: i32 = 10;
const TIMEOUT: i32 = 11;
const DEADLOCK: i32 = 12;
const LOCK_LOST: i32 = 13;
const NOT_FOUND: i32 = 127;
const BAD_USAGE: i32 = 2;

/// `locksmith ARGS` as a client of the server at `url`.
fn cli(url: &str, args: &[&str]) -> Command {
    let mut command = binary::locksmith();
    command.env("LOCKSMITH_URL", url).args(args);
    let mut command = Command::from(command);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Runs `locksmith ARGS` to its end: (status code, stdout, stderr).
async fn run(url: &str, args: &[&str]) -> (i32, String, String) {
    let output = tokio::time::timeout(BOUND, cli(url, args).output())
        .await
        .expect("locksmith exits in time")
        .expect("run locksmith");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Waits for `child` to exit; its status code.
async fn exit_code(child: &mut Child) -> i32 {
    tokio::time::timeout(BOUND, child.wait())
        .await
        .expect("locksmith exits in time")
        .expect("wait")
        .code()
        .unwrap_or(-1)
}

/// The next line `child` printed.
async fn next_line(lines: &mut Lines<BufReader<ChildStdout>>) -> String {
    tokio::time::timeout(BOUND, lines.next_line())
        .await
        .expect("a line in time")
        .expect("read")
        .expect("a line before the end")
}

fn stdout_lines(child: &mut Child) -> Lines<BufReader<ChildStdout>> {
    BufReader::new(child.stdout.take().expect("piped stdout")).lines()
}

#[tokio::test]
async fn lock_holds_the_lock_exactly_while_the_command_runs() {
    // CMD prints "finished" and then still runs (it waits for a second line): a release that
    // came with CMD's last output instead of its exit would show as the key let go here.
    let server = start(settings()).await;
    let url = server.url();
    let mut first = cli(
        &url,
        &[
            "lock",
            "job",
            "--",
            "sh",
            "-c",
            "echo started; read a; echo finished; read b",
        ],
    )
    .stdin(Stdio::piped())
    .spawn()
    .expect("spawn");
    let mut first_out = stdout_lines(&mut first);
    assert_eq!(next_line(&mut first_out).await, "started");
    assert_eq!(
        holders(&server.snapshot(), "job").len(),
        1,
        "held while CMD runs"
    );

    let probe = connect_client(&url).await;
    let busy = probe.lock(&["job"], Exclusive, Some(Duration::ZERO)).await;
    assert!(matches!(busy, Err(ClientError::Timeout { .. })), "{busy:?}");

    let mut second = cli(&url, &["lock", "job", "--", "echo", "second ran"])
        .spawn()
        .expect("spawn");
    server
        .wait_for("the second lock queued behind the first", |s| {
            s.key(&"job".into()).is_some_and(|k| k.queue.len() == 1)
        })
        .await;

    let mut stdin = first.stdin.take().expect("piped stdin");
    stdin.write_all(b"one\n").await.expect("first line");
    assert_eq!(next_line(&mut first_out).await, "finished");
    // CMD is blocked reading its second line: it has printed everything but not exited.
    let snapshot = server.snapshot();
    assert_eq!(
        holders(&snapshot, "job").len(),
        1,
        "still held after CMD's last line, while it runs"
    );
    assert!(
        snapshot
            .key(&"job".into())
            .is_some_and(|k| k.queue.len() == 1),
        "the second lock still waits"
    );

    stdin.write_all(b"two\n").await.expect("second line");
    assert_eq!(exit_code(&mut first).await, 0);
    let mut second_out = stdout_lines(&mut second);
    assert_eq!(
        next_line(&mut second_out).await,
        "second ran",
        "released once CMD exited"
    );
    assert_eq!(exit_code(&mut second).await, 0);
    probe.close().await;
    server.wait_idle().await;
    server.stop().await;
}

#[tokio::test]
async fn lock_passes_tokens_and_session_to_the_command_and_exits_with_its_status() {
    let server = start(settings()).await;
    let script = r#"echo "$LOCKSMITH_TOKENS"; echo "$LOCKSMITH_SESSION"; exit 7"#;
    let (status, stdout, stderr) =
        run(&server.url(), &["lock", "b", "a", "--", "sh", "-c", script]).await;
    assert_eq!(status, 7, "CMD's own status: {stderr}");
    let mut lines = stdout.lines();
    let tokens: serde_json::Value =
        serde_json::from_str(lines.next().expect("tokens line")).expect("tokens are JSON");
    assert!(
        tokens["a"].as_u64().is_some() && tokens["b"].as_u64().is_some(),
        "{tokens}"
    );
    let session = lines.next().expect("session line");
    assert!(uuid::Uuid::parse_str(session).is_ok(), "{session:?}");
    server.wait_idle().await;
    server.stop().await;
}

#[tokio::test]
async fn lock_that_is_not_granted_in_time_exits_11_without_running_the_command() {
    let server = start(settings()).await;
    let holder = connect_client(&server.url()).await;
    holder.lock(&["job"], Exclusive, None).await.expect("lock");
    for timeout in ["0s", "100ms"] {
        let (status, stdout, stderr) = run(
            &server.url(),
            &["lock", "--timeout", timeout, "job", "--", "echo", "ran"],
        )
        .await;
        assert_eq!(status, TIMEOUT, "--timeout {timeout}: {stderr}");
        assert_eq!(stdout, "", "CMD must not run");
        assert!(stderr.starts_with("locksmith: timeout: "), "{stderr}");
    }
    server.stop().await;
}

#[tokio::test]
async fn lock_refused_as_the_victim_of_a_deadlock_exits_12() {
    // The CLI waits for k1 (held by z), then x takes k2 and queues for k1 behind the CLI. When z
    // lets k1 go, the CLI is granted k1 and goes on to k2, held by x, which waits for the CLI:
    // the continuing request closes the cycle and is its victim.
    let server = start(settings()).await;
    let url = server.url();
    let z = connect_client(&url).await;
    let x = std::sync::Arc::new(connect_client(&url).await);
    z.lock(&["k1"], Exclusive, None).await.expect("z takes k1");
    let mut cli_lock = cli(&url, &["lock", "k1", "k2", "--", "echo", "ran"])
        .spawn()
        .expect("spawn");
    server
        .wait_for("the CLI queued on k1", |s| {
            s.key(&"k1".into()).is_some_and(|k| k.queue.len() == 1)
        })
        .await;
    x.lock(&["k2"], Exclusive, None).await.expect("x takes k2");
    let x_waits = {
        let x = x.clone();
        tokio::spawn(async move { x.lock(&["k1"], Exclusive, None).await })
    };
    server.wait_queued(x.session_id(), "k1").await;
    z.unlock(&["k1"]).await.expect("z lets k1 go");
    assert_eq!(exit_code(&mut cli_lock).await, DEADLOCK);
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(
        &mut cli_lock.stderr.take().expect("stderr"),
        &mut stderr,
    )
    .await
    .expect("read stderr");
    assert!(stderr.starts_with("locksmith: deadlock: "), "{stderr}");
    let granted = tokio::time::timeout(BOUND, x_waits).await.expect("in time");
    assert!(
        granted.expect("task").is_ok(),
        "x gets k1 once the CLI backed off"
    );
    server.stop().await;
}

#[tokio::test]
async fn lock_whose_server_dies_terminates_the_command_and_exits_13() {
    let mut server_command = binary::locksmith();
    server_command.arg("--in-memory");
    let server = binary::ServerProcess::start(server_command);
    let script = "sleep 60 >/dev/null 2>&1 & p=$!; \
                  trap 'kill $p; echo terminated; exit 0' TERM; echo started; wait $p";
    let mut child = cli(&server.url(), &["lock", "job", "--", "sh", "-c", script])
        .spawn()
        .expect("spawn");
    let mut out = stdout_lines(&mut child);
    assert_eq!(next_line(&mut out).await, "started");
    server.kill();
    assert_eq!(next_line(&mut out).await, "terminated", "CMD got SIGTERM");
    assert_eq!(exit_code(&mut child).await, LOCK_LOST);
}

#[tokio::test]
async fn interrupting_lock_passes_the_signal_to_the_command_then_releases_the_lock() {
    let server = start(settings()).await;
    let script = "sleep 60 >/dev/null 2>&1 & p=$!; \
                  trap 'kill $p; echo interrupted; exit 130' INT; echo started; wait $p";
    let mut child = cli(&server.url(), &["lock", "job", "--", "sh", "-c", script])
        .spawn()
        .expect("spawn");
    let mut out = stdout_lines(&mut child);
    assert_eq!(next_line(&mut out).await, "started");
    send_signal(&child, nix::sys::signal::Signal::SIGINT);
    assert_eq!(next_line(&mut out).await, "interrupted");
    assert_eq!(exit_code(&mut child).await, 130, "CMD's status");
    server.wait_idle().await;
    server.stop().await;
}

/// Sends `signal` to the `locksmith` process `child`.
fn send_signal(child: &Child, signal: nix::sys::signal::Signal) {
    let pid = i32::try_from(child.id().expect("running")).expect("pid");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).expect("send the signal");
}

#[tokio::test]
async fn a_signal_while_lock_waits_gives_up_the_wait_without_running_the_command() {
    // The handlers used to be installed only after CMD was spawned: a SIGTERM before that ended
    // `locksmith` by the default action (no message, no clean close). Now they exist before the
    // wait, and a signal during it gives the wait up: CMD never runs, the exit status is 128 + N.
    let server = start(settings()).await;
    let holder = connect_client(&server.url()).await;
    holder.lock(&["job"], Exclusive, None).await.expect("lock");
    let mut waiting = cli(&server.url(), &["lock", "job", "--", "echo", "ran"])
        .spawn()
        .expect("spawn");
    server
        .wait_for("the CLI queued on job", |s| {
            s.key(&"job".into()).is_some_and(|k| k.queue.len() == 1)
        })
        .await;
    send_signal(&waiting, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(exit_code(&mut waiting).await, 128 + 15, "128 + SIGTERM");
    let mut stdout = String::new();
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(
        &mut waiting.stdout.take().expect("stdout"),
        &mut stdout,
    )
    .await
    .expect("read stdout");
    tokio::io::AsyncReadExt::read_to_string(
        &mut waiting.stderr.take().expect("stderr"),
        &mut stderr,
    )
    .await
    .expect("read stderr");
    assert_eq!(stdout, "", "CMD must not run");
    assert!(stderr.starts_with("locksmith: interrupted: "), "{stderr}");
    server
        .wait_for("the wait withdrawn", |s| {
            s.key(&"job".into()).is_some_and(|k| k.queue.is_empty())
        })
        .await;
    holder.close().await;
    server.wait_idle().await;
    server.stop().await;
}

#[tokio::test]
async fn a_sigterm_sent_as_soon_as_the_command_starts_is_passed_on_to_it() {
    // CMD signals `locksmith` (its parent) first thing: the handlers must already be there, or
    // `locksmith` dies, the server releases the lock, and CMD runs on unlocked and orphaned.
    let server = start(settings()).await;
    let script = "sleep 60 >/dev/null 2>&1 & p=$!; \
                  trap 'kill $p; echo passed on; exit 3' TERM; kill -TERM $PPID; wait $p";
    let mut child = cli(&server.url(), &["lock", "job", "--", "sh", "-c", script])
        .spawn()
        .expect("spawn");
    let mut out = stdout_lines(&mut child);
    assert_eq!(next_line(&mut out).await, "passed on");
    assert_eq!(exit_code(&mut child).await, 3, "CMD's status");
    server.wait_idle().await;
    server.stop().await;
}

#[tokio::test]
async fn lock_without_a_server_exits_10() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("ws://{}/ws", listener.local_addr().expect("addr"));
    drop(listener);
    let (status, stdout, stderr) = run(&url, &["lock", "job", "--", "echo", "ran"]).await;
    assert_eq!(status, CANNOT_CONNECT, "{stderr}");
    assert_eq!(stdout, "");
    assert!(stderr.starts_with("locksmith: connect: "), "{stderr}");
}

#[tokio::test]
async fn a_connect_error_does_not_print_a_token_on_the_url() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!(
        "ws://{}/ws?token=SUPERSECRET",
        listener.local_addr().expect("addr")
    );
    drop(listener);
    let (status, _, stderr) = run(&url, &["get", "k"]).await;
    assert_eq!(status, CANNOT_CONNECT, "{stderr}");
    assert!(stderr.starts_with("locksmith: connect: "), "{stderr}");
    assert!(!stderr.contains("SUPERSECRET"), "{stderr}");
    assert!(stderr.contains("token=<hidden>"), "{stderr}");
}

#[tokio::test]
async fn client_commands_do_not_read_the_servers_environment() {
    // The server's flags were parsed for every command, so a server setting the server itself
    // would refuse (a duration without a unit) stopped `locksmith get` with a usage error.
    let server = start(settings()).await;
    let mut get = cli(&server.url(), &["get", "k"]);
    get.env("LOCKSMITH_LOCK_TIMEOUT", "5")
        .env("LOCKSMITH_INSECURE_NO_AUTH", "maybe")
        .env("LOCKSMITH_LISTEN", "not an address");
    let output = tokio::time::timeout(BOUND, get.output())
        .await
        .expect("in time")
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "null\n");
    server.wait_idle().await;
    server.stop().await;
}

#[tokio::test]
async fn a_command_that_does_not_exist_exits_127_and_releases_the_lock() {
    let server = start(settings()).await;
    let (status, _, stderr) = run(
        &server.url(),
        &["lock", "job", "--", "/nonexistent/command"],
    )
    .await;
    assert_eq!(status, NOT_FOUND, "{stderr}");
    server.wait_idle().await;
    server.stop().await;
}

#[tokio::test]
async fn bad_usage_exits_2() {
    let server = start(settings()).await;
    let (status, _, stderr) = run(&server.url(), &["lock", "job"]).await;
    assert_eq!(status, BAD_USAGE, "no command after --: {stderr}");
    let (status, _, stderr) = run(&server.url(), &["set", "k", "not json"]).await;
    assert_eq!(status, BAD_USAGE, "{stderr}");
    assert!(
        stderr.contains("--string"),
        "the message says what to do: {stderr}"
    );
    server.stop().await;
}

#[tokio::test]
async fn set_get_del_and_keys_round_trip_through_the_server() {
    let server = start(settings()).await;
    let url = server.url();
    assert_eq!(run(&url, &["set", "cfg/limit", "42"]).await.0, 0);
    assert_eq!(
        run(&url, &["set", "cfg/motd", "--string", "hello all"])
            .await
            .0,
        0
    );
    assert_eq!(run(&url, &["set", "other", r#"{"a":[1,2]}"#]).await.0, 0);

    let (status, stdout, _) = run(&url, &["get", "cfg/motd"]).await;
    assert_eq!(
        (status, stdout.as_str()),
        (0, "hello all\n"),
        "a string as its text"
    );
    let (_, stdout, _) = run(&url, &["get", "cfg/limit", "never", "other"]).await;
    assert_eq!(stdout, "cfg/limit\t42\nnever\tnull\nother\t{\"a\":[1,2]}\n");
    let (_, stdout, _) = run(&url, &["get", "--json", "cfg/limit", "cfg/motd"]).await;
    let values: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(
        values,
        serde_json::json!({"cfg/limit": 42, "cfg/motd": "hello all"})
    );

    let (_, stdout, _) = run(&url, &["keys", "cfg/"]).await;
    assert_eq!(stdout, "cfg/limit\ncfg/motd\n");
    let (_, stdout, _) = run(&url, &["keys"]).await;
    assert_eq!(stdout, "cfg/limit\ncfg/motd\nother\n");

    let (status, stdout, _) = run(&url, &["del", "cfg/motd", "never"]).await;
    assert_eq!(
        (status, stdout.as_str()),
        (0, "1\n"),
        "one of the two had a value"
    );
    let (_, stdout, _) = run(&url, &["keys", "--json", "cfg/"]).await;
    assert_eq!(stdout.trim(), r#"["cfg/limit"]"#);
    server.wait_idle().await;
    server.stop().await;
}

#[tokio::test]
async fn get_waits_for_a_writer_as_the_read_command_does() {
    let server = start(settings()).await;
    let holder = connect_client(&server.url()).await;
    holder.lock(&["k"], Exclusive, None).await.expect("lock");
    let mut get = cli(&server.url(), &["get", "k"]).spawn().expect("spawn");
    server
        .wait_for("get queued behind the writer", |s| {
            s.key(&"k".into()).is_some_and(|k| k.queue.len() == 1)
        })
        .await;
    holder
        .write(&[("k", serde_json::json!("v"))], true)
        .await
        .expect("write");
    holder.unlock(&["k"]).await.expect("unlock");
    let mut out = stdout_lines(&mut get);
    assert_eq!(next_line(&mut out).await, "v");
    assert_eq!(exit_code(&mut get).await, 0);
    server.stop().await;
}

#[tokio::test]
async fn locks_and_sessions_show_names_addresses_and_what_each_holds_or_waits_for() {
    let server = start(settings()).await;
    let url = server.url();
    let holder = tokio::time::timeout(BOUND, Client::builder(&url).name("backup").connect())
        .await
        .expect("in time")
        .expect("connect");
    holder
        .lock(&["job/a"], Exclusive, None)
        .await
        .expect("lock");
    let mut waiting = cli(&url, &["lock", "job/a", "--", "true"])
        .spawn()
        .expect("spawn");
    server
        .wait_for("the CLI queued on job/a", |s| {
            s.key(&"job/a".into()).is_some_and(|k| k.queue.len() == 1)
        })
        .await;

    let (status, table, stderr) = run(&url, &["locks", "job/"]).await;
    assert_eq!(status, 0, "{stderr}");
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("KEY"), "{table}");
    let short_id = &holder.session_id()[..8];
    assert!(
        lines[1].starts_with("job/a")
            && lines[1].contains("held")
            && lines[1].contains("backup (127.0.0.1:")
            && lines[1].contains(short_id),
        "{table}"
    );
    assert!(
        lines[2].contains("waiting") && lines[2].contains("true (127.0.0.1:"),
        "the waiter is named after its command: {table}"
    );
    assert!(table.contains("WAITS FOR\ntrue ("), "{table}");

    let (_, json, _) = run(&url, &["locks", "--json"]).await;
    let view: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(view["locks"][0]["holders"][0]["name"], "backup");

    let (status, table, _) = run(&url, &["sessions"]).await;
    assert_eq!(status, 0);
    let backup = table
        .lines()
        .find(|l| l.contains("backup"))
        .unwrap_or_else(|| panic!("no backup line: {table}"));
    assert!(
        backup.starts_with(short_id) && backup.contains("127.0.0.1:"),
        "{backup}"
    );
    let waiter = table
        .lines()
        .find(|l| l.contains(" true "))
        .unwrap_or_else(|| panic!("no line for the waiting CLI: {table}"));
    assert!(
        waiter.trim_end().ends_with("job/a"),
        "waiting for job/a: {waiter}"
    );

    holder.close().await;
    assert_eq!(exit_code(&mut waiting).await, 0);
    server.stop().await;
}

fn with_tokens() -> locksmith::server::ServerSettings {
    locksmith::server::ServerSettings {
        token: Some("user-token".parse().expect("token")),
        admin_token: Some("admin-token".parse().expect("token")),
        ..settings()
    }
}

#[tokio::test]
async fn a_server_with_a_token_refuses_the_cli_without_it_and_serves_it_with_it() {
    let server = start(with_tokens()).await;
    let url = server.url();
    let (status, _, stderr) = run(&url, &["get", "k"]).await;
    assert_eq!(status, CANNOT_CONNECT, "{stderr}");
    assert!(stderr.starts_with("locksmith: unauthorized: "), "{stderr}");
    let (status, _, stderr) = run(&url, &["get", "--token", "wrong", "k"]).await;
    assert_eq!(status, CANNOT_CONNECT, "{stderr}");
    let (status, stdout, stderr) = run(&url, &["get", "--token", "user-token", "k"]).await;
    assert_eq!((status, stdout.as_str()), (0, "null\n"), "{stderr}");
    let mut from_env = cli(&url, &["get", "k"]);
    from_env.env("LOCKSMITH_TOKEN", "user-token");
    let output = tokio::time::timeout(BOUND, from_env.output())
        .await
        .expect("in time")
        .expect("run");
    assert_eq!(output.status.code(), Some(0), "LOCKSMITH_TOKEN is read");
    server.stop().await;
}

#[tokio::test]
async fn kill_ends_a_session_named_by_id_prefix_or_name_and_needs_the_admin_token() {
    let server = start(with_tokens()).await;
    let url = server.url();
    let victim = tokio::time::timeout(
        BOUND,
        Client::builder(&url)
            .token("user-token")
            .name("stuck-job")
            .connect(),
    )
    .await
    .expect("in time")
    .expect("connect");
    victim.lock(&["k"], Exclusive, None).await.expect("lock");

    let (status, _, stderr) = run(&url, &["kill", "--token", "user-token", "stuck-job"]).await;
    assert_eq!(status, 14, "refused: {stderr}");
    assert!(stderr.starts_with("locksmith: forbidden: "), "{stderr}");
    let (status, _, stderr) = run(&url, &["kill", "--token", "admin-token", "nobody"]).await;
    assert_eq!(status, 14, "{stderr}");
    assert!(stderr.starts_with("locksmith: not_found: "), "{stderr}");

    let (status, stdout, stderr) =
        run(&url, &["kill", "--token", "admin-token", "stuck-job"]).await;
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(stdout, format!("killed {}\n", victim.session_id()));
    assert!(
        holders(&server.snapshot(), "k").is_empty(),
        "released by the kill"
    );
    tokio::time::timeout(BOUND, victim.lost())
        .await
        .expect("the victim's connection is closed");

    let second = tokio::time::timeout(BOUND, Client::builder(&url).token("user-token").connect())
        .await
        .expect("in time")
        .expect("connect");
    let prefix = &second.session_id()[..8];
    let (status, _, stderr) = run(&url, &["kill", "--token", "admin-token", prefix]).await;
    assert_eq!(status, 0, "by id prefix: {stderr}");
    tokio::time::timeout(BOUND, second.lost())
        .await
        .expect("closed");
    server.stop().await;
}

#[tokio::test]
async fn a_reader_that_stops_early_ends_the_output_quietly() {
    let server = start(settings()).await;
    let writer = connect_client(&server.url()).await;
    for batch in 0..8 {
        let entries: Vec<(String, serde_json::Value)> = (0..1000)
            .map(|n| {
                (
                    format!("a-rather-long-key-name/{batch}/{n:04}"),
                    serde_json::json!(n),
                )
            })
            .collect();
        writer.write(&entries, false).await.expect("write");
    }
    // About 270 KB of keys: far more than a pipe holds, so the reader's early close is felt.
    let mut keys = cli(&server.url(), &["keys"]).spawn().expect("spawn");
    let mut out = stdout_lines(&mut keys);
    assert!(next_line(&mut out)
        .await
        .starts_with("a-rather-long-key-name/0/"));
    drop(out);
    assert_eq!(exit_code(&mut keys).await, 0);
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut keys.stderr.take().expect("stderr"), &mut stderr)
        .await
        .expect("read stderr");
    assert_eq!(stderr, "", "no panic, no message");
    server.stop().await;
}

#[tokio::test]
async fn lock_with_grace_keeps_the_command_running_through_a_blip_that_ends_in_a_resume() {
    let (url, listener) = fake::fake_server().await;
    let script = "echo started; read line; echo \"done $line\"";
    let mut command = cli(
        &url,
        &["lock", "--grace", "10s", "job", "--", "sh", "-c", script],
    );
    let mut child = command.stdin(Stdio::piped()).spawn().expect("spawn");
    let mut ws = fake::accept(&listener).await;
    let hello = fake::next_request(&mut ws).await;
    assert_eq!(hello["grace_ms"], 10_000, "{hello}");
    fake::answer(&mut ws, &hello, fake::resumable_hello(10_000)).await;
    let lock = fake::next_request(&mut ws).await;
    assert_eq!(lock["command"], "lock", "{lock}");
    fake::answer(&mut ws, &lock, serde_json::json!({"tokens": {"job": 1}})).await;
    let mut out = stdout_lines(&mut child);
    assert_eq!(next_line(&mut out).await, "started");
    // The connection breaks (no close frame) while CMD runs; the client resumes the session.
    drop(ws);
    let mut ws = fake::accept(&listener).await;
    let resume = fake::resume_request(&mut ws).await;
    fake::answer_resume(&mut ws, &resume).await;
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin.write_all(b"go\n").await.expect("write");
    assert_eq!(next_line(&mut out).await, "done go", "CMD ran on");
    fake::closed_by_client(ws).await;
    assert_eq!(exit_code(&mut child).await, 0, "CMD's status, not 13");
}

#[tokio::test]
async fn lock_with_grace_terminates_the_command_when_the_session_expires_and_exits_13() {
    let (url, listener) = fake::fake_server().await;
    let script = "sleep 60 >/dev/null 2>&1 & p=$!; \
                  trap 'kill $p; echo terminated; exit 0' TERM; echo started; wait $p";
    let mut child = cli(
        &url,
        &["lock", "--grace", "10s", "job", "--", "sh", "-c", script],
    )
    .spawn()
    .expect("spawn");
    let mut ws = fake::accept(&listener).await;
    let hello = fake::next_request(&mut ws).await;
    // The server grants a short grace, and then is gone for longer.
    fake::answer(&mut ws, &hello, fake::resumable_hello(300)).await;
    let lock = fake::next_request(&mut ws).await;
    fake::answer(&mut ws, &lock, serde_json::json!({"tokens": {"job": 1}})).await;
    let mut out = stdout_lines(&mut child);
    assert_eq!(next_line(&mut out).await, "started");
    drop(listener);
    drop(ws);
    assert_eq!(next_line(&mut out).await, "terminated", "CMD got SIGTERM");
    assert_eq!(exit_code(&mut child).await, LOCK_LOST);
}

#[tokio::test]
async fn lock_with_grace_keeps_the_command_running_and_the_lock_held_through_a_cut_to_the_real_server(
) {
    let server = start(settings()).await;
    let proxy = proxy::Proxy::start(server.addr).await;
    let script = "echo $LOCKSMITH_SESSION; read line; echo \"done $line\"";
    let mut command = cli(
        &proxy.url(),
        &["lock", "--grace", "10s", "job", "--", "sh", "-c", script],
    );
    let mut child = command.stdin(Stdio::piped()).spawn().expect("spawn");
    let mut out = stdout_lines(&mut child);
    let session = next_line(&mut out).await;
    // The network breaks and stays down until the server has suspended the session ...
    proxy.refuse(true);
    assert_eq!(proxy.cut(), 1);
    server.wait_suspended(&session).await;
    // ... then comes back: `locksmith` resumes the session, which still holds the lock.
    proxy.refuse(false);
    let registry = server.registry().clone();
    wire::wait_until("the session resumed", || {
        !registry
            .suspended()
            .keys()
            .any(|id| id.to_string() == session)
    })
    .await;
    assert_eq!(
        holders(&server.snapshot(), "job"),
        [(session.clone(), Exclusive)]
    );
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin.write_all(b"go\n").await.expect("write");
    assert_eq!(next_line(&mut out).await, "done go", "CMD ran on");
    assert_eq!(exit_code(&mut child).await, 0, "CMD's status, not 13");
    server.wait_idle().await;
    server.stop().await;
}
