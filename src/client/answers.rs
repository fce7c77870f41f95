//! What the server answers, as typed values: grants with their fencing tokens, pages of keys,
//! the lock table and the sessions. Fields the server adds later are ignored, so an older client
//! keeps working against a newer server.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Locks granted: the fencing token of every key, which strictly increases per key. Pass it to
/// whatever the lock protects, so a request from a holder that has since lost the lock can be
/// refused there.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Grant {
    /// Key → fencing token.
    #[serde(default)]
    pub tokens: BTreeMap<String, u64>,
}

/// Values read: key → value, `null` for a key never written.
pub type Values = BTreeMap<String, Value>;

/// The answer to `delete`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Deleted {
    /// The fencing tokens of the exclusive locks the keys were deleted under.
    #[serde(default)]
    pub tokens: BTreeMap<String, u64>,
    /// How many of the keys had a value.
    #[serde(default)]
    pub deleted: u64,
}

/// One page of `keys`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct KeysPage {
    /// Keys with a value, in byte order.
    #[serde(default)]
    pub keys: Vec<String>,
    /// Where the next page starts (pass it as `after`); `None` on the last page.
    #[serde(default)]
    pub next: Option<String>,
}

/// The answer to `hello`: who this connection is to the server.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Hello {
    /// The session id.
    pub session: String,
    /// The session's name, if it has one.
    #[serde(default)]
    pub name: Option<String>,
    /// The server's version.
    #[serde(default)]
    pub version: Option<String>,
}

/// The lock table, as `locks` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct LockTableView {
    /// Keys that are held or waited for.
    #[serde(default)]
    pub locks: Vec<KeyView>,
    /// Keys that matched but were not listed (over the request's `limit`).
    #[serde(default)]
    pub more: u64,
    /// Who waits for whom (derived from the keys listed).
    #[serde(default)]
    pub waits_for: Vec<WaitsForEdge>,
    /// Edges not listed (over the request's `limit`).
    #[serde(default)]
    pub waits_for_more: u64,
    /// Open sessions.
    #[serde(default)]
    pub sessions: u64,
}

/// One key of the lock table.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct KeyView {
    /// The key.
    pub key: String,
    /// Sessions holding it.
    #[serde(default)]
    pub holders: Vec<HolderView>,
    /// Sessions waiting for it, in queue order.
    #[serde(default)]
    pub waiters: Vec<WaiterView>,
}

/// A holder of a key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct HolderView {
    /// The session id.
    pub session: String,
    /// The session's name, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `"read"` or `"write"`.
    pub mode: String,
    /// The fencing token of the grant.
    #[serde(default)]
    pub token: u64,
    /// How long it has held the key, in milliseconds (absent from servers before names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_ms: Option<u64>,
}

/// A waiter of a key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct WaiterView {
    /// The session id.
    pub session: String,
    /// The session's name, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `"read"` or `"write"`.
    pub mode: String,
    /// Whether it asks to upgrade a shared lock it holds.
    #[serde(default)]
    pub upgrade: bool,
    /// How long it has waited, in milliseconds.
    #[serde(default)]
    pub waiting_ms: u64,
}

/// One edge of the waits-for graph.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct WaitsForEdge {
    /// The waiting session.
    pub waiter: String,
    /// The session it waits for.
    pub waits_for: String,
}

/// One open session, as `sessions` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct SessionView {
    /// The session id.
    pub session: String,
    /// Its name, if it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The client's address.
    #[serde(default)]
    pub peer: String,
    /// How long it has been connected, in milliseconds.
    #[serde(default)]
    pub connected_ms: u64,
    /// How many keys it holds.
    #[serde(default)]
    pub held: u64,
    /// The key its request waits for, if it is waiting.
    #[serde(default)]
    pub waiting_for: Option<String>,
}
