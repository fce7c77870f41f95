//! Encoding answers: a [`Reply`] or a [`ServiceError`] written straight into the answer's
//! `String` through borrowed, derived `Serialize` views, with no `serde_json::Map` or `Value`
//! built on the way.
//!
//! The bytes are those of the former encoder, which built a `Map` (insertion order, thanks to
//! `preserve_order`) and called `to_string`: `success` first, then the answer's fields in a fixed
//! order, `id` last; strings escaped by serde_json; numbers (and `id`, `values`, exact under
//! `arbitrary_precision`) written by serde_json. The test module keeps that encoder as
//! `reference_encode_reply`/`reference_encode_error` and checks every variant against it.
//!
//! The one place where a `Map` differed from a plain list of entries is an object keyed by data
//! (`tokens`, `values`) that names a key twice: a `Map` keeps one entry, at the first key's place,
//! with the last value. The session never builds such a reply (keys are distinct), but should one
//! come, [`KeyedObject`] writes what the `Map` wrote.

use std::collections::HashMap;
use std::fmt::Display;
use std::time::{Duration, Instant};

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::Value;

use super::{all_distinct, NamedMember, Reply, ServiceError, SessionInfo, VERSION};
use crate::lock::{
    CycleMember, FencingToken, HolderSnapshot, Key, KeySnapshot, LockError, LockMode, SessionId,
    Snapshot, WaiterSnapshot,
};

/// Encodes a successful reply.
pub fn encode_reply(id: Option<&Value>, reply: &Reply) -> String {
    match reply {
        Reply::Done => answer(true, Empty {}, id),
        Reply::Tokens(tokens) | Reply::Written(tokens) => answer(
            true,
            TokensBody {
                tokens: KeyedObject(tokens),
            },
            id,
        ),
        Reply::Values(values) => answer(
            true,
            ValuesBody {
                values: KeyedObject(values),
            },
            id,
        ),
        Reply::Session(session) => answer(
            true,
            SessionBody {
                session: IdView(session),
            },
            id,
        ),
        Reply::Locks {
            snapshot,
            taken_at,
            sessions,
            names,
            suspended,
            more,
            limit,
        } => {
            let table = TableView {
                snapshot,
                taken_at: *taken_at,
                names,
                suspended,
            };
            let body = LocksBody {
                locks: Seq(&table),
                more: *more,
                waits_for: Edges(&snapshot.waits_for[..(*limit).min(snapshot.waits_for.len())]),
                waits_for_more: snapshot.waits_for.len().saturating_sub(*limit),
                sessions: *sessions,
            };
            // About 170 bytes per holder (a key of ten-odd bytes, a session id, a token and a
            // time), so a big answer grows its buffer once or twice rather than twenty times.
            answer_sized(true, body, id, 64 + reply.listed_entries() * 170)
        }
        Reply::Hello {
            session,
            name,
            resumable,
            held,
        } => {
            let body = HelloBody {
                session: IdView(session),
                name: name.as_deref(),
                version: VERSION,
                grace_ms: resumable
                    .as_ref()
                    .map_or(0, |(grace, _)| duration_millis(*grace)),
                // The one place a resume secret is written: to its own session's client.
                resume_secret: resumable.as_ref().map(|(_, secret)| secret.reveal()),
                tokens: held.as_deref().map(KeyedObject),
            };
            answer(true, body, id)
        }
        Reply::Sessions { sessions, more } => answer(
            true,
            SessionsBody {
                sessions: Seq(sessions.as_slice()),
                more: *more,
            },
            id,
        ),
        Reply::Deleted { tokens, deleted } => answer(
            true,
            DeletedBody {
                tokens: KeyedObject(tokens),
                deleted: *deleted,
            },
            id,
        ),
        Reply::Keys(page) => {
            let next = match (page.more, page.keys.last()) {
                (true, Some(last)) => Some(last.as_str()),
                _ => None,
            };
            answer(
                true,
                KeysBody {
                    keys: &page.keys,
                    next,
                },
                id,
            )
        }
        Reply::Cancelled(cancelled) => answer(
            true,
            CancelledBody {
                cancelled: *cancelled,
            },
            id,
        ),
    }
}

/// Encodes an error answer: `success: false`, a human `error`, the stable `code`, and the
/// details some codes carry (`cycle` for `deadlock`, `keys` for `not_held`, `key` for `timeout`,
/// `held`, `requested` and `limit` for `too_many_locks`).
pub fn encode_error(id: Option<&Value>, error: &ServiceError) -> String {
    let mut body = ErrorBody {
        error: Shown(error),
        code: error.code(),
        cycle: None,
        keys: None,
        key: None,
        held: None,
        requested: None,
        limit: None,
    };
    match error {
        // The session names the members (`ServiceError::Deadlock`); a deadlock that reaches
        // here without names is encoded the same way, without names.
        ServiceError::Lock(LockError::Deadlock { cycle }) => {
            body.cycle = Some(Cycle::Unnamed(cycle))
        }
        ServiceError::Deadlock { cycle } => body.cycle = Some(Cycle::Named(cycle)),
        ServiceError::Lock(LockError::NotHeld { keys }) => body.keys = Some(Seq(keys.as_slice())),
        ServiceError::Lock(LockError::Timeout { key }) => body.key = Some(key.as_str()),
        ServiceError::Lock(LockError::TooManyLocks {
            held,
            requested,
            limit,
        }) => {
            body.held = Some(*held);
            body.requested = Some(*requested);
            body.limit = Some(*limit);
        }
        _ => {}
    }
    answer(false, body, id)
}

/// The whole answer: `success`, the body's fields, then `id` when the request had one.
#[derive(Serialize)]
struct Answer<'a, B> {
    /// True for a reply, false for an error.
    success: bool,
    /// The fields of the reply or error.
    #[serde(flatten)]
    body: B,
    /// The request's `id`, echoed as it came.
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
}

/// Serialises the answer into a `String`.
fn answer<B: Serialize>(success: bool, body: B, id: Option<&Value>) -> String {
    answer_sized(success, body, id, 128)
}

/// Serialises the answer into a `String` that starts with room for `capacity` bytes.
fn answer_sized<B: Serialize>(
    success: bool,
    body: B,
    id: Option<&Value>,
    capacity: usize,
) -> String {
    let answer = Answer { success, body, id };
    let mut bytes = Vec::with_capacity(capacity);
    // serde_json fails only on a map key that is not a string or on a writer's I/O error; the
    // views have string keys only and a `Vec` never fails, and it writes UTF-8 only. The
    // fallback is still an answer.
    serde_json::to_writer(&mut bytes, &answer)
        .map_err(|error| error.to_string())
        .and_then(|()| String::from_utf8(bytes).map_err(|error| error.to_string()))
        .unwrap_or_else(|error| {
            let error =
                ServiceError::BadRequest(format!("the answer could not be encoded: {error}"));
            format!(
                r#"{{"success":false,"error":{},"code":"{}"}}"#,
                Value::String(error.to_string()),
                error.code()
            )
        })
}

/// A value written through its `Display` (escaped as a JSON string), without a `String` first:
/// session ids, addresses, error sentences.
struct Shown<'a, T>(&'a T);

impl<T: Display> Serialize for Shown<'_, T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self.0)
    }
}

/// A session id as a JSON string, written from a stack buffer: through `Display` it went the
/// formatting machinery's slow path, a tenth of a 10,000-key `locks` answer's time.
struct IdView<'a>(&'a SessionId);

impl Serialize for IdView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut buffer = uuid::Uuid::encode_buffer();
        serializer.serialize_str(self.0 .0.hyphenated().encode_lower(&mut buffer))
    }
}

/// A JSON array of the views of a slice's items (see [`AsView`]).
struct Seq<'a, T: ?Sized>(&'a T);

/// How one list item is shown in an answer.
trait AsView {
    /// The view written for it.
    type View<'v>: Serialize
    where
        Self: 'v;
    /// The view.
    fn view(&self) -> Self::View<'_>;
}

impl<T: AsView> Serialize for Seq<'_, [T]> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(AsView::view))
    }
}

impl AsView for Key {
    type View<'v> = &'v str;
    fn view(&self) -> &str {
        self.as_str()
    }
}

/// An entry of an object keyed by data: the key, and what is written for its value.
trait Keyed {
    /// The key.
    fn key(&self) -> &str;
    /// Writes the value as the map's next value.
    fn value<M: SerializeMap>(&self, map: &mut M) -> Result<(), M::Error>;
}

impl Keyed for (Key, FencingToken) {
    fn key(&self) -> &str {
        self.0.as_str()
    }
    fn value<M: SerializeMap>(&self, map: &mut M) -> Result<(), M::Error> {
        map.serialize_value(&self.1 .0)
    }
}

impl Keyed for (Key, Option<Value>) {
    fn key(&self) -> &str {
        self.0.as_str()
    }
    /// `null` for a key never written.
    fn value<M: SerializeMap>(&self, map: &mut M) -> Result<(), M::Error> {
        map.serialize_value(&self.1)
    }
}

/// A JSON object with one entry per item, keyed by the item's key: `tokens`, `values`.
struct KeyedObject<'a, T>(&'a [T]);

impl<T: Keyed> Serialize for KeyedObject<'_, T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let entries = self.0;
        let mut map = serializer.serialize_map(Some(entries.len()))?;
        if all_distinct(entries, Keyed::key) {
            for entry in entries {
                map.serialize_key(entry.key())?;
                entry.value(&mut map)?;
            }
        } else {
            // As the former `Map` did: one entry per key, at its first place, its last value.
            let mut last: HashMap<&str, usize, foldhash::fast::RandomState> = HashMap::default();
            for (at, entry) in entries.iter().enumerate() {
                last.insert(entry.key(), at);
            }
            for entry in entries {
                if let Some(last_at) = last.remove(entry.key()) {
                    map.serialize_key(entry.key())?;
                    entries[last_at].value(&mut map)?;
                }
            }
        }
        map.end()
    }
}

/// `{}`'s fields: none (`Reply::Done`).
#[derive(Serialize)]
struct Empty {}

/// A lock grant or a write.
#[derive(Serialize)]
struct TokensBody<'a> {
    /// Key → fencing token.
    tokens: KeyedObject<'a, (Key, FencingToken)>,
}

/// Values read.
#[derive(Serialize)]
struct ValuesBody<'a> {
    /// Key → value, `null` for a key never written.
    values: KeyedObject<'a, (Key, Option<Value>)>,
}

/// The connection's session.
#[derive(Serialize)]
struct SessionBody<'a> {
    /// Its id.
    session: IdView<'a>,
}

/// The answer to `hello` and `resume`.
#[derive(Serialize)]
struct HelloBody<'a> {
    /// The session id.
    session: IdView<'a>,
    /// Its name, if set.
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    /// The server's version.
    version: &'static str,
    /// The grace period; 0 for a session that is not resumable.
    grace_ms: u64,
    /// The resume secret of a resumable session.
    #[serde(skip_serializing_if = "Option::is_none")]
    resume_secret: Option<&'a str>,
    /// After `resume`: the keys held, with their tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens: Option<KeyedObject<'a, (Key, FencingToken)>>,
}

/// Open sessions.
#[derive(Serialize)]
struct SessionsBody<'a> {
    /// The sessions listed.
    sessions: Seq<'a, [SessionInfo]>,
    /// Open sessions not listed.
    more: usize,
}

/// One session of `sessions`.
#[derive(Serialize)]
struct SessionView<'a> {
    /// Its id.
    session: IdView<'a>,
    /// Its name, if set.
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    /// The client's address.
    peer: Shown<'a, std::net::SocketAddr>,
    /// How long it has been connected.
    connected_ms: u64,
    /// How many keys it holds.
    held: usize,
    /// The key it waits for, `null` when it does not wait.
    waiting_for: Option<&'a str>,
    /// `"connected"` or `"suspended"`.
    state: &'static str,
    /// How long it has been suspended, only when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    suspended_ms: Option<u64>,
}

impl AsView for SessionInfo {
    type View<'v> = SessionView<'v>;
    fn view(&self) -> SessionView<'_> {
        SessionView {
            session: IdView(&self.session),
            name: self.name.as_deref(),
            peer: Shown(&self.peer),
            connected_ms: self.connected_ms,
            held: self.held,
            waiting_for: self.waiting_for.as_ref().map(Key::as_str),
            state: if self.suspended_ms.is_some() {
                "suspended"
            } else {
                "connected"
            },
            suspended_ms: self.suspended_ms,
        }
    }
}

/// Keys deleted.
#[derive(Serialize)]
struct DeletedBody<'a> {
    /// Key → fencing token.
    tokens: KeyedObject<'a, (Key, FencingToken)>,
    /// How many of them had a value.
    deleted: usize,
}

/// A page of keys.
#[derive(Serialize)]
struct KeysBody<'a> {
    /// The keys.
    keys: &'a [String],
    /// The last key when more follow (the next page's `after`), else `null`.
    next: Option<&'a str>,
}

/// The answer to `cancel`.
#[derive(Serialize)]
struct CancelledBody {
    /// Whether a waiting request was withdrawn.
    cancelled: bool,
}

/// The lock table, with what its entries need to say about sessions. Written key by key as the
/// answer is serialised: the cost is linear in the keys, holders, waiters and edges listed.
struct TableView<'a> {
    /// The snapshot (already cut to the request's `limit` of keys).
    snapshot: &'a Snapshot,
    /// When it was taken: how long each holder has held and each waiter waited.
    taken_at: Instant,
    /// Session names.
    names: &'a HashMap<SessionId, String>,
    /// When each suspended session was suspended.
    suspended: &'a HashMap<SessionId, Instant>,
}

/// The `locks` answer.
#[derive(Serialize)]
struct LocksBody<'a> {
    /// One entry per key.
    locks: Seq<'a, TableView<'a>>,
    /// Keys that matched but were not listed.
    more: usize,
    /// The first `limit` waits-for edges.
    waits_for: Edges<'a>,
    /// Edges not listed.
    waits_for_more: usize,
    /// Open sessions.
    sessions: usize,
}

impl Serialize for Seq<'_, TableView<'_>> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let table = self.0;
        serializer.collect_seq(table.snapshot.keys.iter().map(|key| KeyView { table, key }))
    }
}

/// One key of `locks`: `{"key", "holders", "waiters"}`.
struct KeyView<'a> {
    /// The table (for names and times).
    table: &'a TableView<'a>,
    /// The key.
    key: &'a KeySnapshot,
}

impl Serialize for KeyView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        /// The derived shape of a key's entry.
        #[derive(Serialize)]
        struct Entry<'a, H, W> {
            /// The key.
            key: &'a str,
            /// Its holders, in grant order.
            holders: H,
            /// Its queue, head first.
            waiters: W,
        }
        let table = self.table;
        Entry {
            key: self.key.key.as_str(),
            holders: Iter(|| self.key.holders.iter().map(|h| table.holder(h))),
            waiters: Iter(|| self.key.queue.iter().map(|w| table.waiter(w))),
        }
        .serialize(serializer)
    }
}

/// A JSON array of what a closure's iterator yields.
struct Iter<F>(F);

impl<F, I> Serialize for Iter<F>
where
    F: Fn() -> I,
    I: Iterator,
    I::Item: Serialize,
{
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq((self.0)())
    }
}

/// A holder of `locks`.
#[derive(Serialize)]
struct HolderView<'a> {
    /// The session.
    session: IdView<'a>,
    /// `"read"` or `"write"`.
    mode: &'static str,
    /// The fencing token of its grant.
    token: u64,
    /// How long it has held the key.
    held_ms: u64,
    /// How long its session has been suspended, only when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    suspended_ms: Option<u64>,
    /// Its session's name, if set.
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
}

/// A waiter of `locks`.
#[derive(Serialize)]
struct WaiterView<'a> {
    /// The session.
    session: IdView<'a>,
    /// `"read"` or `"write"`.
    mode: &'static str,
    /// True for a conversion from shared to exclusive.
    upgrade: bool,
    /// How long it has waited.
    waiting_ms: u64,
    /// Its session's name, if set.
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
}

impl<'a> TableView<'a> {
    fn holder(&self, holder: &'a HolderSnapshot) -> HolderView<'a> {
        HolderView {
            session: IdView(&holder.session),
            mode: mode_name(holder.mode),
            token: holder.token.0,
            held_ms: millis_between(holder.since, self.taken_at),
            suspended_ms: self
                .suspended
                .get(&holder.session)
                .map(|since| millis_between(*since, self.taken_at)),
            name: self.names.get(&holder.session).map(String::as_str),
        }
    }

    fn waiter(&self, waiter: &'a WaiterSnapshot) -> WaiterView<'a> {
        WaiterView {
            session: IdView(&waiter.session),
            mode: mode_name(waiter.mode),
            upgrade: waiter.upgrade,
            waiting_ms: millis_between(waiter.since, self.taken_at),
            name: self.names.get(&waiter.session).map(String::as_str),
        }
    }
}

/// The listed waits-for edges, `[{"waiter", "waits_for"}, ...]`.
struct Edges<'a>(&'a [(SessionId, SessionId)]);

impl Serialize for Edges<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        /// One edge.
        #[derive(Serialize)]
        struct Edge<'a> {
            /// The waiting session.
            waiter: IdView<'a>,
            /// The session it waits for.
            waits_for: IdView<'a>,
        }
        serializer.collect_seq(self.0.iter().map(|(waiter, holder)| Edge {
            waiter: IdView(waiter),
            waits_for: IdView(holder),
        }))
    }
}

/// An error answer's fields after `success`.
#[derive(Serialize)]
struct ErrorBody<'a> {
    /// The human sentence.
    error: Shown<'a, ServiceError>,
    /// The stable code.
    code: &'static str,
    /// A deadlock's cycle.
    #[serde(skip_serializing_if = "Option::is_none")]
    cycle: Option<Cycle<'a>>,
    /// `not_held`: the keys not held.
    #[serde(skip_serializing_if = "Option::is_none")]
    keys: Option<Seq<'a, [Key]>>,
    /// `timeout`: the key waited for.
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    /// `too_many_locks`: keys held.
    #[serde(skip_serializing_if = "Option::is_none")]
    held: Option<usize>,
    /// `too_many_locks`: keys requested and not held yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    requested: Option<usize>,
    /// `too_many_locks`: the limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<usize>,
}

/// A deadlock cycle, `[{"session", "waiting_for_key", "name"?}, ...]`, as the session names it
/// or, without names, as the lock manager reported it.
enum Cycle<'a> {
    /// With the names of the members that have one.
    Named(&'a [NamedMember]),
    /// Without names.
    Unnamed(&'a [CycleMember]),
}

/// One member of a cycle.
#[derive(Serialize)]
struct MemberView<'a> {
    /// The waiting session.
    session: IdView<'a>,
    /// The key it waits for.
    waiting_for_key: &'a str,
    /// Its name, if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
}

fn member_view<'a>(member: &'a CycleMember, name: Option<&'a str>) -> MemberView<'a> {
    MemberView {
        session: IdView(&member.session),
        waiting_for_key: member.waiting_for_key.as_str(),
        name,
    }
}

impl Serialize for Cycle<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Cycle::Named(cycle) => serializer.collect_seq(
                cycle
                    .iter()
                    .map(|m| member_view(&m.member, m.name.as_deref())),
            ),
            Cycle::Unnamed(cycle) => {
                serializer.collect_seq(cycle.iter().map(|member| member_view(member, None)))
            }
        }
    }
}

fn mode_name(mode: LockMode) -> &'static str {
    match mode {
        LockMode::Shared => "read",
        LockMode::Exclusive => "write",
    }
}

fn millis_between(earlier: Instant, later: Instant) -> u64 {
    duration_millis(later.saturating_duration_since(earlier))
}

fn duration_millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    //! The new encoders against the former `Map`-based ones, kept here as the reference.

    use super::*;

    use std::net::SocketAddr;

    use proptest::prelude::*;
    use serde_json::{json, Map};

    use crate::auth::Secret;
    use crate::lock::WaiterSnapshot;
    use crate::store::{KeysPage, StoreError};

    /// The former encoder of a successful reply: a `Map` in insertion order, then `to_string`.
    fn reference_encode_reply(id: Option<&Value>, reply: &Reply) -> String {
        let mut object = Map::new();
        object.insert("success".into(), Value::Bool(true));
        match reply {
            Reply::Done => {}
            Reply::Tokens(tokens) => {
                object.insert("tokens".into(), tokens_object(tokens));
            }
            Reply::Values(values) => {
                let values: Map<String, Value> = values
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone().unwrap_or(Value::Null)))
                    .collect();
                object.insert("values".into(), Value::Object(values));
            }
            Reply::Written(tokens) => {
                object.insert("tokens".into(), tokens_object(tokens));
            }
            Reply::Session(session) => {
                object.insert("session".into(), Value::String(session.to_string()));
            }
            Reply::Locks {
                snapshot,
                taken_at,
                sessions,
                names,
                suspended,
                more,
                limit,
            } => {
                object.insert(
                    "locks".into(),
                    locks_array(snapshot, *taken_at, names, suspended),
                );
                object.insert("more".into(), json!(more));
                let edges: Vec<Value> = snapshot
                    .waits_for
                    .iter()
                    .take(*limit)
                    .map(|(waiter, holder)| {
                        json!({"waiter": waiter.to_string(), "waits_for": holder.to_string()})
                    })
                    .collect();
                object.insert("waits_for".into(), Value::Array(edges));
                object.insert(
                    "waits_for_more".into(),
                    json!(snapshot.waits_for.len().saturating_sub(*limit)),
                );
                object.insert("sessions".into(), json!(sessions));
            }
            Reply::Hello {
                session,
                name,
                resumable,
                held,
            } => {
                object.insert("session".into(), Value::String(session.to_string()));
                if let Some(name) = name {
                    object.insert("name".into(), Value::String(name.clone()));
                }
                object.insert("version".into(), Value::String(VERSION.into()));
                match resumable {
                    Some((grace, secret)) => {
                        object.insert("grace_ms".into(), json!(duration_millis(*grace)));
                        // The one place a resume secret is written: to its own session's client.
                        object.insert(
                            "resume_secret".into(),
                            Value::String(secret.reveal().into()),
                        );
                    }
                    None => {
                        object.insert("grace_ms".into(), json!(0));
                    }
                }
                if let Some(held) = held {
                    object.insert("tokens".into(), tokens_object(held));
                }
            }
            Reply::Sessions { sessions, more } => {
                let sessions = sessions.iter().map(session_object).collect();
                object.insert("sessions".into(), Value::Array(sessions));
                object.insert("more".into(), json!(more));
            }
            Reply::Deleted { tokens, deleted } => {
                object.insert("tokens".into(), tokens_object(tokens));
                object.insert("deleted".into(), json!(deleted));
            }
            Reply::Keys(page) => {
                let keys = page.keys.iter().map(|k| Value::String(k.clone())).collect();
                object.insert("keys".into(), Value::Array(keys));
                let next = match (page.more, page.keys.last()) {
                    (true, Some(last)) => Value::String(last.clone()),
                    _ => Value::Null,
                };
                object.insert("next".into(), next);
            }
            Reply::Cancelled(cancelled) => {
                object.insert("cancelled".into(), Value::Bool(*cancelled));
            }
        }
        finish(object, id)
    }

    fn session_object(info: &SessionInfo) -> Value {
        let mut object = Map::new();
        object.insert("session".into(), Value::String(info.session.to_string()));
        if let Some(name) = &info.name {
            object.insert("name".into(), Value::String(name.clone()));
        }
        object.insert("peer".into(), Value::String(info.peer.to_string()));
        object.insert("connected_ms".into(), json!(info.connected_ms));
        object.insert("held".into(), json!(info.held));
        let waiting = info
            .waiting_for
            .as_ref()
            .map_or(Value::Null, |k| Value::String(k.to_string()));
        object.insert("waiting_for".into(), waiting);
        let state = if info.suspended_ms.is_some() {
            "suspended"
        } else {
            "connected"
        };
        object.insert("state".into(), Value::String(state.into()));
        if let Some(suspended_ms) = info.suspended_ms {
            object.insert("suspended_ms".into(), json!(suspended_ms));
        }
        Value::Object(object)
    }

    /// The former encoder of an error answer: `success: false`, a human `error`, the stable `code`, and the
    /// details some codes carry (`cycle` for `deadlock`, `keys` for `not_held`, `key` for `timeout`,
    /// `held`, `requested` and `limit` for `too_many_locks`).
    fn reference_encode_error(id: Option<&Value>, error: &ServiceError) -> String {
        let mut object = Map::new();
        object.insert("success".into(), Value::Bool(false));
        object.insert("error".into(), Value::String(error.to_string()));
        object.insert("code".into(), Value::String(error.code().into()));
        match error {
            // The session names the members (`ServiceError::Deadlock`); a deadlock that reaches
            // here without names is encoded the same way.
            ServiceError::Lock(LockError::Deadlock { cycle }) => {
                let unnamed: Vec<NamedMember> = cycle
                    .iter()
                    .map(|member| NamedMember {
                        member: member.clone(),
                        name: None,
                    })
                    .collect();
                object.insert("cycle".into(), named_cycle_array(&unnamed));
            }
            ServiceError::Deadlock { cycle } => {
                object.insert("cycle".into(), named_cycle_array(cycle));
            }
            ServiceError::Lock(LockError::NotHeld { keys }) => {
                let keys = keys.iter().map(|k| Value::String(k.to_string())).collect();
                object.insert("keys".into(), Value::Array(keys));
            }
            ServiceError::Lock(LockError::Timeout { key }) => {
                object.insert("key".into(), Value::String(key.to_string()));
            }
            ServiceError::Lock(LockError::TooManyLocks {
                held,
                requested,
                limit,
            }) => {
                object.insert("held".into(), json!(held));
                object.insert("requested".into(), json!(requested));
                object.insert("limit".into(), json!(limit));
            }
            _ => {}
        }
        finish(object, id)
    }

    /// The `cycle` of a deadlock answer: `[{"session": .., "waiting_for_key": .., "name": ..}, ...]`,
    /// `name` only for members that have one.
    fn named_cycle_array(cycle: &[NamedMember]) -> Value {
        Value::Array(
            cycle
                .iter()
                .map(|m| {
                    let mut member = json!({
                        "session": m.member.session.to_string(),
                        "waiting_for_key": m.member.waiting_for_key.as_str(),
                    });
                    if let (Some(name), Value::Object(fields)) = (&m.name, &mut member) {
                        fields.insert("name".into(), Value::String(name.clone()));
                    }
                    member
                })
                .collect(),
        )
    }

    fn tokens_object(tokens: &[(Key, FencingToken)]) -> Value {
        Value::Object(
            tokens
                .iter()
                .map(|(k, t)| (k.to_string(), json!(t.0)))
                .collect(),
        )
    }

    /// Adds `"name"` to a holder or waiter object when its session has one.
    fn with_name(
        mut entry: Value,
        session: SessionId,
        names: &HashMap<SessionId, String>,
    ) -> Value {
        if let (Some(name), Value::Object(fields)) = (names.get(&session), &mut entry) {
            fields.insert("name".into(), Value::String(name.clone()));
        }
        entry
    }

    fn locks_array(
        snapshot: &Snapshot,
        taken_at: Instant,
        names: &HashMap<SessionId, String>,
        suspended: &HashMap<SessionId, Instant>,
    ) -> Value {
        Value::Array(
            snapshot
                .keys
                .iter()
                .map(|key| {
                    let holders: Vec<Value> = key
                        .holders
                        .iter()
                        .map(|h| {
                            let mut holder = json!({
                                "session": h.session.to_string(),
                                "mode": mode_name(h.mode),
                                "token": h.token.0,
                                "held_ms": millis_between(h.since, taken_at),
                            });
                            if let (Some(since), Value::Object(fields)) =
                                (suspended.get(&h.session), &mut holder)
                            {
                                fields.insert(
                                    "suspended_ms".into(),
                                    json!(millis_between(*since, taken_at)),
                                );
                            }
                            with_name(holder, h.session, names)
                        })
                        .collect();
                    let waiters: Vec<Value> = key
                        .queue
                        .iter()
                        .map(|w| {
                            let waiter = json!({
                                "session": w.session.to_string(),
                                "mode": mode_name(w.mode),
                                "upgrade": w.upgrade,
                                "waiting_ms": millis_between(w.since, taken_at),
                            });
                            with_name(waiter, w.session, names)
                        })
                        .collect();
                    json!({"key": key.key.as_str(), "holders": holders, "waiters": waiters})
                })
                .collect(),
        )
    }

    fn finish(mut object: Map<String, Value>, id: Option<&Value>) -> String {
        if let Some(id) = id {
            object.insert("id".into(), id.clone());
        }
        Value::Object(object).to_string()
    }

    /// Ids of every shape a request may carry, including exact numbers `Value` keeps as text.
    fn arb_id() -> impl Strategy<Value = Option<Value>> {
        let exact = prop::sample::select(vec![
            "42",
            "-7",
            "1.0",
            "1e3",
            "123456789012345678901234567890",
            "0.1000000000000000000001",
            r#""x\"\\\u0001é""#,
            r#"{"b":[1,{"a":null}],"a":true}"#,
            "null",
        ])
        .prop_map(|text| serde_json::from_str::<Value>(text).ok());
        prop_oneof![Just(None), exact, any::<i64>().prop_map(|n| Some(json!(n)))]
    }

    /// Keys from a small alphabet (so lists repeat keys), with characters JSON must escape.
    fn arb_key() -> impl Strategy<Value = Key> {
        "[ab\"\\\\\u{1}é]{1,3}".prop_map(Key::from)
    }

    fn arb_tokens() -> impl Strategy<Value = Vec<(Key, FencingToken)>> {
        prop::collection::vec((arb_key(), any::<u64>().prop_map(FencingToken)), 0..20)
    }

    fn arb_session() -> impl Strategy<Value = SessionId> {
        (1u128..6).prop_map(SessionId::from_u128)
    }

    fn arb_value() -> impl Strategy<Value = Option<Value>> {
        prop_oneof![
            Just(None),
            Just(Some(Value::Null)),
            prop::sample::select(vec![
                "1.0",
                "1e400",
                "98765432109876543210",
                "[1,\"\\n\"]",
                "{\"z\":1,\"a\":2}"
            ])
            .prop_map(|text| serde_json::from_str::<Value>(text).ok()),
            "[a-z\"]{0,4}".prop_map(|text| Some(Value::String(text))),
        ]
    }

    fn arb_snapshot_reply() -> impl Strategy<Value = Reply> {
        let holder = (arb_session(), any::<bool>(), any::<u64>(), 0u64..2000);
        let waiter = (arb_session(), any::<bool>(), any::<bool>(), 0u64..2000);
        let key = (
            arb_key(),
            prop::collection::vec(holder, 0..3),
            prop::collection::vec(waiter, 0..3),
        );
        (
            prop::collection::vec(key, 0..5),
            prop::collection::vec((arb_session(), arb_session()), 0..6),
            prop::collection::vec((arb_session(), "[a-z\"é]{0,4}"), 0..4),
            prop::collection::vec((arb_session(), 0u64..2000), 0..3),
            (0usize..10, 0usize..8, 0usize..10, 0u64..2000),
        )
            .prop_map(
                |(keys, edges, names, suspended, (sessions, limit, more, taken))| {
                    let base = Instant::now();
                    let at = |ms: u64| base + Duration::from_millis(ms);
                    let mode = |write: bool| {
                        if write {
                            LockMode::Exclusive
                        } else {
                            LockMode::Shared
                        }
                    };
                    let keys = keys
                        .into_iter()
                        .map(|(key, holders, queue)| KeySnapshot {
                            key,
                            holders: holders
                                .into_iter()
                                .map(|(session, write, token, since)| HolderSnapshot {
                                    session,
                                    mode: mode(write),
                                    token: FencingToken(token),
                                    since: at(since),
                                })
                                .collect(),
                            queue: queue
                                .into_iter()
                                .map(|(session, write, upgrade, since)| WaiterSnapshot {
                                    session,
                                    mode: mode(write),
                                    upgrade,
                                    since: at(since),
                                })
                                .collect(),
                        })
                        .collect();
                    Reply::Locks {
                        snapshot: Snapshot {
                            keys,
                            waits_for: edges,
                        },
                        taken_at: at(taken),
                        sessions,
                        names: names.into_iter().collect(),
                        suspended: suspended
                            .into_iter()
                            .map(|(s, since)| (s, at(since)))
                            .collect(),
                        more,
                        limit,
                    }
                },
            )
    }

    fn arb_session_info() -> impl Strategy<Value = SessionInfo> {
        (
            arb_session(),
            prop::option::of("[a-z\"]{1,4}"),
            any::<u64>(),
            any::<usize>(),
            prop::option::of(arb_key()),
            prop::option::of(any::<u64>()),
        )
            .prop_map(
                |(session, name, connected_ms, held, waiting_for, suspended_ms)| SessionInfo {
                    session,
                    name,
                    peer: SocketAddr::from(([127, 0, 0, 1], 4000)),
                    connected_ms,
                    held,
                    waiting_for,
                    suspended_ms,
                },
            )
    }

    fn arb_reply() -> impl Strategy<Value = Reply> {
        prop_oneof![
            Just(()).prop_map(|()| Reply::Done),
            arb_tokens().prop_map(Reply::Tokens),
            arb_tokens().prop_map(Reply::Written),
            prop::collection::vec((arb_key(), arb_value()), 0..6).prop_map(Reply::Values),
            arb_session().prop_map(Reply::Session),
            arb_snapshot_reply(),
            (
                arb_session(),
                prop::option::of("[a-z\"é]{1,4}"),
                prop::option::of((any::<u64>(), "[0-9a-f]{0,8}")),
                prop::option::of(arb_tokens()),
            )
                .prop_map(|(session, name, resumable, held)| Reply::Hello {
                    session,
                    name,
                    resumable: resumable.map(|(ms, secret)| {
                        (Duration::from_millis(ms), Secret::client_token(secret))
                    }),
                    held,
                }),
            (
                prop::collection::vec(arb_session_info(), 0..4),
                any::<usize>()
            )
                .prop_map(|(sessions, more)| Reply::Sessions { sessions, more }),
            (arb_tokens(), any::<usize>())
                .prop_map(|(tokens, deleted)| Reply::Deleted { tokens, deleted }),
            (prop::collection::vec("[a-z\"]{1,3}", 0..4), any::<bool>())
                .prop_map(|(keys, more)| Reply::Keys(KeysPage { keys, more })),
            any::<bool>().prop_map(Reply::Cancelled),
        ]
    }

    fn arb_member() -> impl Strategy<Value = NamedMember> {
        (arb_session(), arb_key(), prop::option::of("[a-z\"é]{1,4}")).prop_map(
            |(session, key, name)| NamedMember {
                member: CycleMember {
                    session,
                    waiting_for_key: key,
                },
                name,
            },
        )
    }

    fn arb_error() -> impl Strategy<Value = ServiceError> {
        let text = "[a-z\"\\\\\n]{0,4}";
        prop_oneof![
            text.prop_map(ServiceError::BadRequest),
            text.prop_map(ServiceError::UnknownCommand),
            any::<usize>().prop_map(|limit| ServiceError::TooLarge { limit }),
            (any::<usize>(), any::<usize>())
                .prop_map(|(count, limit)| ServiceError::TooManyKeys { count, limit }),
            Just(()).prop_map(|()| ServiceError::ServerBusy),
            Just(()).prop_map(|()| ServiceError::ShuttingDown),
            prop::collection::vec(arb_member(), 0..4).prop_map(|cycle| ServiceError::Lock(
                LockError::Deadlock {
                    cycle: cycle.into_iter().map(|m| m.member).collect()
                }
            )),
            arb_key().prop_map(|key| ServiceError::Lock(LockError::Timeout { key })),
            prop::collection::vec(arb_key(), 0..4)
                .prop_map(|keys| ServiceError::Lock(LockError::NotHeld { keys })),
            Just(()).prop_map(|()| ServiceError::Lock(LockError::SessionClosed)),
            Just(()).prop_map(|()| ServiceError::Lock(LockError::Cancelled)),
            (any::<usize>(), any::<usize>(), any::<usize>()).prop_map(
                |(held, requested, limit)| ServiceError::Lock(LockError::TooManyLocks {
                    held,
                    requested,
                    limit
                })
            ),
            text.prop_map(|reason| ServiceError::Lock(LockError::InvalidRequest { reason })),
            text.prop_map(|e| ServiceError::Storage(StoreError::Storage(e))),
            prop::collection::vec(arb_member(), 0..4)
                .prop_map(|cycle| ServiceError::Deadlock { cycle }),
            Just(()).prop_map(|()| ServiceError::Killed),
            text.prop_map(ServiceError::Forbidden),
            text.prop_map(ServiceError::NotFound),
            text.prop_map(ServiceError::SessionExpired),
            Just(()).prop_map(|()| ServiceError::TakenOver),
        ]
    }

    proptest! {
        /// Every reply, with or without an id, is written byte for byte as the `Map` wrote it.
        #[test]
        fn every_reply_is_encoded_byte_for_byte_as_the_map_encoder_did(reply in arb_reply(), id in arb_id()) {
            prop_assert_eq!(encode_reply(id.as_ref(), &reply), reference_encode_reply(id.as_ref(), &reply));
        }

        /// Every error, with or without an id, is written byte for byte as the `Map` wrote it.
        #[test]
        fn every_error_is_encoded_byte_for_byte_as_the_map_encoder_did(error in arb_error(), id in arb_id()) {
            prop_assert_eq!(encode_error(id.as_ref(), &error), reference_encode_error(id.as_ref(), &error));
        }
    }

    #[test]
    fn a_repeated_key_keeps_its_first_place_and_its_last_value_as_the_map_did() {
        let tokens = vec![
            (Key::from("b"), FencingToken(1)),
            (Key::from("a"), FencingToken(2)),
            (Key::from("b"), FencingToken(3)),
        ];
        let many: Vec<(Key, FencingToken)> = (0..40)
            .map(|i| (Key::from(format!("k{}", i % 7)), FencingToken(i)))
            .collect();
        for tokens in [tokens, many] {
            let reply = Reply::Tokens(tokens);
            assert_eq!(
                encode_reply(None, &reply),
                reference_encode_reply(None, &reply)
            );
        }
        assert_eq!(
            encode_reply(
                None,
                &Reply::Tokens(vec![
                    (Key::from("b"), FencingToken(1)),
                    (Key::from("a"), FencingToken(2)),
                    (Key::from("b"), FencingToken(3)),
                ])
            ),
            r#"{"success":true,"tokens":{"b":3,"a":2}}"#
        );
    }

    #[test]
    fn a_one_key_grant_reads_success_tokens_then_id() {
        let reply = Reply::Tokens(vec![(Key::from("k17"), FencingToken(1234))]);
        assert_eq!(
            encode_reply(Some(&json!(42)), &reply),
            r#"{"success":true,"tokens":{"k17":1234},"id":42}"#
        );
    }

    #[test]
    fn locks_lists_only_the_first_limit_edges_and_counts_the_rest() {
        let one = SessionId::from_u128(1);
        let two = SessionId::from_u128(2);
        let now = Instant::now();
        for limit in [0, 1, 2, 5] {
            let reply = Reply::Locks {
                snapshot: Snapshot {
                    keys: Vec::new(),
                    waits_for: vec![(one, two), (two, one)],
                },
                taken_at: now,
                sessions: 2,
                names: HashMap::new(),
                suspended: HashMap::new(),
                more: 0,
                limit,
            };
            let text = encode_reply(None, &reply);
            assert_eq!(text, reference_encode_reply(None, &reply));
            let value: Value = serde_json::from_str(&text).expect("json");
            assert_eq!(
                value["waits_for"].as_array().map(Vec::len),
                Some(limit.min(2))
            );
            assert_eq!(value["waits_for_more"], json!(2usize.saturating_sub(limit)));
        }
    }
}
