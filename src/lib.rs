//! Locksmith: a deadlock-aware lock manager service.
//!
//! Layout (calls go down the list, never up):
//! - [`server`]: listeners, routes, connection limit, Origin check, graceful shutdown.
//! - [`accept`]: the accept loop: a slot per TCP connection, the handshake deadline, running out
//!   of file descriptors.
//! - [`listen`]: the `--listen` addresses resolved and bound before the server starts.
//! - [`connection`]: one WebSocket: frames in, responses out, in order; keepalive.
//! - [`protocol`]: the JSON request/response format and its validation (no I/O).
//! - [`session`]: one client session: carries out requests with the lock manager and the store.
//! - [`registry`]: the directory of open sessions (names, peers, admin flag, the kill handle).
//! - [`lock`]: the lock manager (lock table, queues, waits-for graph, deadlock detection). Knows
//!   nothing of the network.
//! - [`store`]: where values live, behind the [`store::Store`] trait.
//! - [`config`]: command-line and environment configuration.
//! - [`auth`]: the `--token` / `--admin-token` checks (constant time; tokens never logged).
//! - [`log_limit`]: a rate limit for log lines that come in storms (deadlocks, refused tokens).
//! - [`metrics`]: the Prometheus metrics of `/metrics` (one registry per server).
//! - [`client`]: the typed async client of the protocol (the other side of the wire).
//! - [`cli`]: the `locksmith` command line: `serve` and the client commands, built on [`client`].

pub mod accept;
pub mod auth;
pub mod cancel_latch;
pub mod cli;
pub mod client;
pub mod config;
pub mod connection;
pub mod deadlocks;
pub mod listen;
pub mod live;
pub mod lock;
pub mod log_limit;
pub mod metrics;
pub mod protocol;
pub mod registry;
pub mod server;
pub mod session;
pub mod store;
pub mod suspension;
