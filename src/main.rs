//! The `locksmith` binary. Without a command (or with `serve`) it parses the server's
//! configuration, starts the server, and shuts it down gracefully on SIGINT or SIGTERM; the other
//! commands are the command-line client ([`locksmith::cli`]), parsed without the server's flags
//! and environment variables.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use locksmith::cli::{Cli, CliCommand, ClientCli, ClientCommand};
use locksmith::config::{Config, LogFormat};
use locksmith::listen;
use locksmith::server::{self, ServerSettings};
use locksmith::store::{MemoryStore, RedbStore, Store};
use tracing_subscriber::EnvFilter;

/// The allocator of the server and the command-line client: it keeps freed memory for reuse
/// where glibc's returned big buffers to the kernel after every `locks` answer (Cargo.toml).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // A client command is parsed without the server's flags, so that the server's environment
    // variables (say a `LOCKSMITH_LOCK_TIMEOUT` the server would refuse) never stop a client.
    let first = std::env::args_os().nth(1);
    if first
        .as_deref()
        .and_then(std::ffi::OsStr::to_str)
        .is_some_and(ClientCommand::has_subcommand)
    {
        return run_client(ClientCli::parse().command);
    }
    let cli = Cli::parse();
    let config = match cli.command {
        None => cli.serve,
        Some(CliCommand::Serve(config)) => config,
        Some(CliCommand::Client(command)) => return run_client(command),
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::stdout().is_terminal())
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_current_span(false)
            .init(),
    }
    let runtime = match build_runtime(config.threads) {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("locksmith: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(config));
    // Dropping the runtime drops every task still there (connections cut at the shutdown
    // timeout, HTTP connections abandoned) and with them the last handles on the store: a
    // durable store's writer thread finishes its queued jobs and the database is closed before
    // the process exits.
    drop(runtime);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            eprintln!("locksmith: {error}");
            ExitCode::FAILURE
        }
    }
}

/// The server's runtime: a single-threaded one for `--threads 1` (the default), else a
/// multi-threaded one with that many workers.
fn build_runtime(threads: std::num::NonZeroUsize) -> std::io::Result<tokio::runtime::Runtime> {
    match threads.get() {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        threads => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build(),
    }
}

/// Runs a client command. It is one connection: one thread starts faster than a pool of them.
fn run_client(command: ClientCommand) -> ExitCode {
    match build_runtime(std::num::NonZeroUsize::MIN) {
        Ok(runtime) => runtime.block_on(locksmith::cli::run(command)),
        Err(error) => {
            eprintln!("locksmith: cannot start the runtime: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    raise_open_file_limit();
    let listeners = listen::bind(&config.listen).await?;
    let bound = listeners
        .iter()
        .map(tokio::net::TcpListener::local_addr)
        .collect::<Result<Vec<_>, _>>()?;
    server::refuse_open_exposure(&config, &bound)?;
    let store: Arc<dyn Store> = if config.in_memory {
        tracing::info!("values are kept in memory only (--in-memory): they are lost on exit");
        Arc::new(MemoryStore::new())
    } else {
        let store = RedbStore::open(&config.data_dir)?;
        tracing::info!(data_dir = %config.data_dir.display(), "values are stored durably");
        Arc::new(store)
    };
    let settings = ServerSettings {
        token_floor: start_time_micros(),
        ..ServerSettings::from(&config)
    };
    let server = server::start(listeners, settings, store)?;
    for addr in server.local_addrs() {
        tracing::info!("listening on ws://{addr}/ws");
    }
    shutdown_signal().await?;
    tracing::info!("shutting down");
    server.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// Microseconds since the Unix epoch: the fencing-token floor of this run. Locks are not
/// persistent, but their tokens must keep increasing across restarts; a run that starts later
/// starts its tokens higher (as long as the previous run granted fewer than one lock per
/// microsecond on average and the clock did not go back).
fn start_time_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Each connection is a file descriptor: raise the soft limit to the hard one.
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(error) => tracing::warn!(%error, "cannot raise the open-file limit"),
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result,
            _ = terminate.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}
