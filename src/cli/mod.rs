//! The `locksmith` command line: `serve` (the default when no command is given) runs the server;
//! the other commands are clients of a running server, built on [`crate::client`].
//!
//! Output is plain text for people, or JSON with `--json` for scripts. A failure is one line on
//! stderr, `locksmith: <code>: <sentence>`, and a distinct exit status ([`exit`]).

pub mod exit;
mod lock_command;
mod tables;

use std::borrow::Cow;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use crate::auth::Secret;
use crate::client::{redact_url, Client, ClientBuilder, ClientError, DEFAULT_URL};
use crate::config::{parse_duration, Config};
use exit::Failure;
pub use lock_command::LockArgs;

/// Locksmith: a deadlock-aware lock manager service over WebSocket. Without a command, runs the
/// server.
#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// What to do; the server when absent.
    #[command(subcommand)]
    pub command: Option<CliCommand>,
    /// The server's flags, when no command is given (`locksmith --listen ...`).
    #[command(flatten)]
    pub serve: Config,
}

/// The commands: the server, and the clients.
#[derive(Subcommand, Debug)]
pub enum CliCommand {
    /// Run the server (what `locksmith` does without a command).
    Serve(Config),
    /// A client command.
    #[command(flatten)]
    Client(ClientCommand),
}

/// The command line of a client command alone: `locksmith get ...` is parsed with this, not with
/// [`Cli`], so the server's flags and environment variables (`LOCKSMITH_LOCK_TIMEOUT`, ...) are
/// never read for it, and a value the server would refuse cannot stop a client.
#[derive(Parser, Debug)]
#[command(name = "locksmith", version, about)]
pub struct ClientCli {
    /// The client command.
    #[command(subcommand)]
    pub command: ClientCommand,
}

/// The client commands: each connects to a running server.
#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Run a command while holding locks: `locksmith lock KEY... -- CMD [ARGS...]`.
    Lock(LockArgs),
    /// Print the values of keys (reads under shared locks, as the `read` command does).
    Get(GetArgs),
    /// Set a key's value (under an exclusive lock, as the `write` command does).
    Set(SetArgs),
    /// Delete keys (under exclusive locks); prints how many had a value.
    Del(DelArgs),
    /// List the keys that have a value, optionally only those starting with PREFIX.
    Keys(KeysArgs),
    /// Show who holds and who waits for which key, and who waits for whom.
    Locks(LocksArgs),
    /// Show the open sessions.
    Sessions(SessionsArgs),
    /// End another session: release its locks, answer its waiting request `killed`, close its
    /// connection (needs the admin token).
    Kill(KillArgs),
}

/// Where the server is and how to authenticate; every client command takes these. Its `Debug`
/// shows neither the token nor a `?token=` on the URL.
#[derive(Args, Clone)]
pub struct ServerOptions {
    /// The server's WebSocket URL.
    #[arg(
        long = "server",
        env = "LOCKSMITH_URL",
        default_value = DEFAULT_URL,
        // It may carry `?token=`: `--help` must not print the variable's value.
        hide_env_values = true
    )]
    pub url: String,
    /// The token the server requires (`--token` there), or its admin token for `kill`.
    #[arg(long, env = "LOCKSMITH_TOKEN", hide_env_values = true)]
    pub token: Option<Secret>,
}

impl std::fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerOptions")
            .field("url", &redact_url(&self.url))
            .field("token", &self.token)
            .finish()
    }
}

impl ServerOptions {
    /// Connects, naming the session `name`.
    ///
    /// # Errors
    /// The connection's failure.
    pub async fn connect(&self, name: Option<&str>) -> Result<Client, ClientError> {
        let mut builder = self.builder();
        if let Some(name) = name {
            builder = builder.name(name);
        }
        builder.connect().await
    }

    /// How to connect: the URL and the token, for a caller that sets more options.
    pub fn builder(&self) -> ClientBuilder {
        let builder = Client::builder(&self.url);
        match &self.token {
            Some(token) => builder.secret_token(token.clone()),
            None => builder,
        }
    }
}

/// `locksmith get`.
#[derive(Args, Debug)]
pub struct GetArgs {
    /// The keys to read.
    #[arg(required = true, value_name = "KEY")]
    pub keys: Vec<String>,
    /// Print one JSON object key → value.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: ServerOptions,
}

/// `locksmith set`.
#[derive(Args, Debug)]
pub struct SetArgs {
    /// The key.
    pub key: String,
    /// The value, as JSON (`42`, `'"text"'`, `'{"a":1}'`), or any text with `--string`.
    pub value: String,
    /// Store VALUE as a JSON string, as given.
    #[arg(long)]
    pub string: bool,
    /// Print the answer (with the fencing token) as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: ServerOptions,
}

/// `locksmith del`.
#[derive(Args, Debug)]
pub struct DelArgs {
    /// The keys to delete.
    #[arg(required = true, value_name = "KEY")]
    pub keys: Vec<String>,
    /// Print the answer as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: ServerOptions,
}

/// `locksmith keys`.
#[derive(Args, Debug)]
pub struct KeysArgs {
    /// Only keys starting with this.
    #[arg(default_value = "")]
    pub prefix: String,
    /// Print a JSON array.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: ServerOptions,
}

/// `locksmith locks`.
#[derive(Args, Debug)]
pub struct LocksArgs {
    /// Only keys starting with this.
    pub prefix: Option<String>,
    /// List at most this many keys and edges (the server's default: 1000; at most 100,000).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Print the server's answer as JSON.
    #[arg(long)]
    pub json: bool,
    /// Redraw every INTERVAL until interrupted.
    #[arg(long, value_name = "INTERVAL", num_args = 0..=1, default_missing_value = "1s", value_parser = parse_duration)]
    pub watch: Option<Duration>,
    #[command(flatten)]
    pub server: ServerOptions,
}

/// `locksmith sessions`.
#[derive(Args, Debug)]
pub struct SessionsArgs {
    /// Print the server's answer as JSON.
    #[arg(long)]
    pub json: bool,
    /// Redraw every INTERVAL until interrupted.
    #[arg(long, value_name = "INTERVAL", num_args = 0..=1, default_missing_value = "1s", value_parser = parse_duration)]
    pub watch: Option<Duration>,
    #[command(flatten)]
    pub server: ServerOptions,
}

/// `locksmith kill`.
#[derive(Args, Debug)]
pub struct KillArgs {
    /// The session: its id, a unique prefix of it (as `locks` and `sessions` show), or its name
    /// if exactly one session has that name.
    pub session: String,
    #[command(flatten)]
    pub server: ServerOptions,
}

/// Runs a client command; the exit code.
pub async fn run(command: ClientCommand) -> ExitCode {
    let result = match command {
        ClientCommand::Lock(args) => lock_command::run(args).await,
        ClientCommand::Get(args) => get(args).await,
        ClientCommand::Set(args) => set(args).await,
        ClientCommand::Del(args) => del(args).await,
        ClientCommand::Keys(args) => keys(args).await,
        ClientCommand::Locks(args) => locks(args).await,
        ClientCommand::Sessions(args) => sessions(args).await,
        ClientCommand::Kill(args) => kill(args).await,
    };
    match result {
        Ok(status) => ExitCode::from(status),
        Err(failure) => failure.report(),
    }
}

/// The name client commands give their session, so `locks` shows where a lock came from.
const CLI_NAME: &str = "locksmith-cli";

async fn get(args: GetArgs) -> Result<u8, Failure> {
    let client = args.server.connect(Some(CLI_NAME)).await?;
    let values = client.read(&args.keys, false).await?;
    client.close().await;
    if args.json {
        emit(&format!(
            "{}\n",
            Value::Object(values.into_iter().collect())
        ));
    } else {
        emit(&values_text(&args.keys, &values));
    }
    Ok(0)
}

/// `get`'s plain output: the value alone for one key, else one `key<TAB>value` line per key. Key
/// names are escaped ([`escape_controls`]); values are printed as stored (a string as its text,
/// control characters included: `get` is how a script reads a value back).
fn values_text(keys: &[String], values: &crate::client::Values) -> String {
    let value = |key: &String| plain(values.get(key).unwrap_or(&Value::Null));
    match keys {
        [key] => format!("{}\n", value(key)),
        keys => keys
            .iter()
            .map(|key| format!("{}\t{}\n", escape_controls(key), value(key)))
            .collect(),
    }
}

/// Text from the server (a key, a name) made safe for a terminal: every control character
/// (`char::is_control`: ESC, CR, BEL, the C1 controls, ...) as its Rust escape (`\u{1b}`, `\r`),
/// so that no client can put escape sequences into another user's terminal through a key or a
/// name. Everything else is left as it is.
pub(crate) fn escape_controls(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(
        text.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

/// A value for a terminal: a string as its text, anything else as JSON.
fn plain(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

async fn set(args: SetArgs) -> Result<u8, Failure> {
    let value = if args.string {
        Value::String(args.value.clone())
    } else {
        serde_json::from_str(&args.value).map_err(|e| {
            Failure::usage(format!(
                "VALUE is not JSON ({e}); quote a string as '\"text\"' or pass --string"
            ))
        })?
    };
    let client = args.server.connect(Some(CLI_NAME)).await?;
    let grant = client.write(&[(&args.key, value)], false).await?;
    client.close().await;
    if args.json {
        emit(&format!(
            "{}\n",
            serde_json::json!({"tokens": grant.tokens})
        ));
    } else {
        emit("OK\n");
    }
    Ok(0)
}

async fn del(args: DelArgs) -> Result<u8, Failure> {
    let client = args.server.connect(Some(CLI_NAME)).await?;
    let deleted = client.delete(&args.keys, false).await?;
    client.close().await;
    if args.json {
        emit(&format!(
            "{}\n",
            serde_json::to_string(&deleted).unwrap_or_default()
        ));
    } else {
        emit(&format!("{}\n", deleted.deleted));
    }
    Ok(0)
}

async fn keys(args: KeysArgs) -> Result<u8, Failure> {
    let client = args.server.connect(Some(CLI_NAME)).await?;
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = client.keys(&args.prefix, None, after.as_deref()).await?;
        if args.json {
            all.extend(page.keys);
        } else {
            for key in &page.keys {
                emit(&format!("{}\n", escape_controls(key)));
            }
        }
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    client.close().await;
    if args.json {
        emit(&format!("{}\n", Value::from(all)));
    }
    Ok(0)
}

async fn locks(args: LocksArgs) -> Result<u8, Failure> {
    let client = args.server.connect(Some(CLI_NAME)).await?;
    loop {
        let view = client
            .locks_page(args.prefix.as_deref(), args.limit)
            .await?;
        let text = if args.json {
            format!("{}\n", serde_json::to_string(&view).unwrap_or_default())
        } else {
            let sessions = match client.sessions().await {
                // A server from before `sessions`: the table shows ids without peers.
                Err(ClientError::UnknownCommand(_)) => Vec::new(),
                other => other?,
            };
            tables::locks_table(&view, &sessions)
        };
        if !show(&text, args.watch).await {
            break;
        }
    }
    client.close().await;
    Ok(0)
}

async fn sessions(args: SessionsArgs) -> Result<u8, Failure> {
    let client = args.server.connect(Some(CLI_NAME)).await?;
    loop {
        let sessions = client.sessions().await?;
        let text = if args.json {
            format!("{}\n", serde_json::to_string(&sessions).unwrap_or_default())
        } else {
            tables::sessions_table(&sessions)
        };
        if !show(&text, args.watch).await {
            break;
        }
    }
    client.close().await;
    Ok(0)
}

/// Writes `text` to stdout. A reader that went away (`locksmith keys | head`) ends the command
/// quietly with status 0, as it ends `cat`; any other failure to write ends it with status 1.
fn emit(text: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if let Err(error) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("locksmith: output: cannot write to stdout: {error}");
        std::process::exit(1);
    }
}

/// Prints `text`; with `--watch`, clears the screen first and waits for the next round.
/// Whether there is a next round.
async fn show(text: &str, watch: Option<Duration>) -> bool {
    match watch {
        None => {
            emit(text);
            false
        }
        Some(interval) => {
            emit(&format!("\x1b[2J\x1b[H{text}"));
            tokio::time::sleep(interval).await;
            true
        }
    }
}

async fn kill(args: KillArgs) -> Result<u8, Failure> {
    let client = args.server.connect(Some(CLI_NAME)).await?;
    let sessions = client.sessions().await?;
    let target = resolve_session(&args.session, &sessions, client.session_id())?;
    client.kill(&target).await?;
    client.close().await;
    emit(&format!("killed {target}\n"));
    Ok(0)
}

/// The full id of the one session `given` names, among the sessions other than the CLI's own
/// (`own`): an exact id wins; otherwise the sessions whose id starts with `given` and those named
/// `given` together must be exactly one. A name that is also a prefix of another session's id
/// ("db", "cafe") is ambiguous rather than read as either.
fn resolve_session(
    given: &str,
    sessions: &[crate::client::SessionView],
    own: &str,
) -> Result<String, Failure> {
    let others = || sessions.iter().filter(|s| s.session != own);
    if let Some(exact) = others().find(|s| s.session == given) {
        return Ok(exact.session.clone());
    }
    let matches: Vec<&crate::client::SessionView> = others()
        .filter(|s| s.session.starts_with(given) || s.name.as_deref() == Some(given))
        .collect();
    match matches.as_slice() {
        [one] => Ok(one.session.clone()),
        [] => Err(Failure::from(ClientError::NotFound(format!(
            "no open session has the id, id prefix or name {given:?}"
        )))),
        many => Err(Failure::usage(format!(
            "{given:?} names {} sessions by id prefix or name ({}); give more of the id",
            many.len(),
            many.iter()
                .map(|s| match &s.name {
                    Some(name) => format!("{} ({})", s.session, escape_controls(name)),
                    None => s.session.clone(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::SessionView;

    fn session(id: &str, name: Option<&str>) -> SessionView {
        SessionView {
            session: id.into(),
            name: name.map(Into::into),
            ..SessionView::default()
        }
    }

    #[test]
    fn plain_output_escapes_control_characters_in_key_names_but_prints_values_as_stored() {
        assert_eq!(escape_controls("job/a"), "job/a");
        assert_eq!(
            escape_controls("evil\u{1b}]0;owned\u{7}\r\n\u{9b}2J\tü"),
            "evil\\u{1b}]0;owned\\u{7}\\r\\n\\u{9b}2J\\tü"
        );
        let keys = vec!["a\u{1b}[2J".to_owned(), "b".to_owned()];
        let values: crate::client::Values = [
            ("a\u{1b}[2J".to_owned(), Value::String("x\u{1b}[1m".into())),
            ("b".to_owned(), serde_json::json!(1)),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            values_text(&keys, &values),
            "a\\u{1b}[2J\tx\u{1b}[1m\nb\t1\n",
            "the key escaped, the string value as stored"
        );
        assert_eq!(values_text(&keys[..1], &values), "x\u{1b}[1m\n");
    }

    /// The CLI's own session in the tests' lists.
    const OWN: &str = "cafe0000-0";

    #[test]
    fn kill_accepts_an_id_a_unique_prefix_or_a_unique_name() {
        let sessions = [
            session("5f2e1c3a-1", Some("backup")),
            session("5f2e9999-2", Some("report")),
            session("0b6b0f0e-3", Some("report")),
        ];
        let resolve = |given| resolve_session(given, &sessions, OWN);
        assert_eq!(resolve("5f2e1c3a-1").ok(), Some("5f2e1c3a-1".into()));
        assert_eq!(resolve("0b6b").ok(), Some("0b6b0f0e-3".into()));
        assert_eq!(resolve("backup").ok(), Some("5f2e1c3a-1".into()));
        let ambiguous = resolve("5f2e").expect_err("two ids start so");
        assert_eq!(ambiguous.status, exit::BAD_USAGE);
        let two_names = resolve("report").expect_err("two sessions so named");
        assert_eq!(two_names.status, exit::BAD_USAGE);
        let none = resolve("nobody").expect_err("no such session");
        assert_eq!(none.code, "not_found");
    }

    #[test]
    fn kill_calls_a_name_that_also_prefixes_another_sessions_id_ambiguous_but_an_exact_id_wins() {
        // "db" is a session's name and the start of another's id: it used to pick the id.
        let sessions = [
            session("db12aaaa-1", None),
            session("0b6b0f0e-2", Some("db")),
            session("0b6b0f0e-3", Some("0b6b0f0e-2")),
        ];
        let resolve = |given| resolve_session(given, &sessions, OWN);
        let ambiguous = resolve("db").expect_err("a name and an id prefix");
        assert_eq!(ambiguous.status, exit::BAD_USAGE);
        assert!(
            ambiguous.message.contains("db12aaaa-1")
                && ambiguous.message.contains("0b6b0f0e-2 (db)"),
            "lists both: {}",
            ambiguous.message
        );
        // An exact id beats a session that has that text as its name.
        assert_eq!(resolve("0b6b0f0e-2").ok(), Some("0b6b0f0e-2".into()));
        // A name and an id prefix of the same session are one match.
        let one = [session("cafe1234-1", Some("cafe"))];
        assert_eq!(
            resolve_session("cafe", &one, OWN).ok(),
            Some("cafe1234-1".into())
        );
    }

    #[test]
    fn kill_never_picks_the_clis_own_session() {
        let sessions = [
            session(OWN, Some("locksmith-cli")),
            session("cafe1234-1", Some("job")),
        ];
        let resolve = |given| resolve_session(given, &sessions, OWN);
        assert_eq!(
            resolve("cafe").ok(),
            Some("cafe1234-1".into()),
            "the own id prefix is no rival"
        );
        assert_eq!(resolve(OWN).expect_err("its own id").code, "not_found");
        assert_eq!(
            resolve("locksmith-cli").expect_err("its own name").code,
            "not_found"
        );
    }

    #[test]
    fn server_options_debug_shows_neither_the_token_nor_one_on_the_url() {
        let options = ServerOptions {
            url: "ws://127.0.0.1:1/ws?token=SUPERSECRET".into(),
            token: Some("ALSOSECRET".parse().expect("a token")),
        };
        let shown = format!("{options:?}");
        assert!(!shown.contains("SUPERSECRET"), "{shown}");
        assert!(!shown.contains("ALSOSECRET"), "{shown}");
    }

    #[test]
    fn no_command_means_the_server_and_serve_is_the_explicit_form() {
        let cli = Cli::try_parse_from(["locksmith", "--in-memory"]).expect("server flags parse");
        assert!(cli.command.is_none());
        assert!(cli.serve.in_memory);
        let cli = Cli::try_parse_from(["locksmith", "serve", "--in-memory"]).expect("serve");
        assert!(matches!(cli.command, Some(CliCommand::Serve(config)) if config.in_memory));
    }

    #[test]
    fn the_help_lists_every_command_and_each_client_command_parses_without_the_server() {
        use clap::CommandFactory;
        let help = Cli::command().render_help().to_string();
        let client = ClientCli::command();
        let client_commands: Vec<&str> = client.get_subcommands().map(|c| c.get_name()).collect();
        assert_eq!(
            client_commands,
            ["lock", "get", "set", "del", "keys", "locks", "sessions", "kill"]
        );
        for name in std::iter::once("serve").chain(client_commands.iter().copied()) {
            assert!(
                help.contains(&format!("  {name} ")),
                "{name} missing: {help}"
            );
        }
        for name in &client_commands {
            assert!(ClientCommand::has_subcommand(name), "{name}");
        }
        assert!(!ClientCommand::has_subcommand("serve"));
        // A client command line is not a server one: no server flag is accepted with it.
        assert!(ClientCli::try_parse_from(["locksmith", "get", "k"]).is_ok());
        assert!(
            ClientCli::try_parse_from(["locksmith", "get", "--lock-timeout", "5s", "k"]).is_err()
        );
    }

    #[test]
    fn lock_takes_keys_then_the_command_after_a_double_dash() {
        let cli = ClientCli::try_parse_from([
            "locksmith",
            "lock",
            "--read",
            "--timeout",
            "10s",
            "--grace",
            "1.5s",
            "a",
            "b",
            "--",
            "echo",
            "--x",
        ])
        .expect("lock parses");
        let ClientCommand::Lock(args) = cli.command else {
            panic!("not lock");
        };
        assert!(args.read);
        assert_eq!(args.keys, ["a", "b"]);
        assert_eq!(args.command, ["echo", "--x"]);
        assert_eq!(args.timeout, Some(Duration::from_secs(10)));
        assert_eq!(args.grace, Some(Duration::from_millis(1500)));
        assert!(ClientCli::try_parse_from(["locksmith", "lock", "a"]).is_err());
        assert!(
            ClientCli::try_parse_from(["locksmith", "lock", "--grace", "10", "a", "--", "x"])
                .is_err(),
            "a duration needs its unit"
        );
    }
}
