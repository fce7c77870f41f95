//! A store gives back what it was given: every JSON value is read back exactly as written —
//! every digit of every number (no float or integer rounding), strings, and the order of object
//! members — through the protocol's decoder and encoder, the in-memory store, and the durable
//! store across a reopen; and so is a request's `id` echo.
//!
//! The story: values went through `f64`, so `0.42451918914251396` came back as
//! `0.4245191891425139` (315 of 2,000 random doubles changed) and integers above 2^64 came back
//! as rounded floats. serde_json's `arbitrary_precision` keeps a number's digits and
//! `preserve_order` the members' order.
//!
//! The documents are generated as trees and rendered to text here, independently of serde_json's
//! number handling, so a rounding anywhere on the way shows as a difference in the text.

mod common;
mod wire;

use std::sync::Arc;

use locksmith::protocol::{self, Command, Limits, Reply};
use locksmith::store::{MemoryStore, RedbStore, Store};
use proptest::prelude::*;
use serde_json::{json, Value};
use wire::{settings, start, BOUND};

/// A JSON document as the test builds it: numbers are kept as the literal text written.
#[derive(Clone, Debug)]
enum Doc {
    Null,
    Bool(bool),
    Number(String),
    Text(String),
    Array(Vec<Doc>),
    Object(Vec<(String, Doc)>),
}

impl Doc {
    /// The JSON text, written the way serde_json writes the same value back: numbers as given
    /// (the generator only makes literals in that form), strings escaped by serde_json.
    fn render(&self) -> String {
        match self {
            Doc::Null => "null".into(),
            Doc::Bool(b) => b.to_string(),
            Doc::Number(literal) => literal.clone(),
            Doc::Text(text) => Value::String(text.clone()).to_string(),
            Doc::Array(items) => {
                let items: Vec<String> = items.iter().map(Doc::render).collect();
                format!("[{}]", items.join(","))
            }
            Doc::Object(members) => {
                let members: Vec<String> = members
                    .iter()
                    .map(|(k, v)| format!("{}:{}", Value::String(k.clone()), v.render()))
                    .collect();
                format!("{{{}}}", members.join(","))
            }
        }
    }
}

/// Number literals in the form a JSON writer gives back unchanged: long integers (beyond
/// 2^64), long decimals (beyond f64's 17 digits), `-0.0`, and exponents with a sign.
fn number() -> impl Strategy<Value = String> {
    let digits = |min: usize, max: usize| {
        proptest::string::string_regex(&format!("[0-9]{{{min},{max}}}")).expect("regex")
    };
    let integer = (any::<bool>(), "[1-9]", digits(0, 40)).prop_map(|(negative, first, rest)| {
        format!("{}{first}{rest}", if negative { "-" } else { "" })
    });
    let decimal =
        (any::<bool>(), digits(1, 3), digits(1, 30)).prop_map(|(negative, whole, fraction)| {
            let whole = whole.trim_start_matches('0');
            let whole = if whole.is_empty() { "0" } else { whole };
            format!("{}{whole}.{fraction}", if negative { "-" } else { "" })
        });
    let exponent = ("[1-9]", digits(0, 20), any::<bool>(), 1u32..400).prop_map(
        |(first, rest, negative, power)| {
            let fraction = if rest.is_empty() {
                String::new()
            } else {
                format!(".{rest}")
            };
            format!(
                "{first}{fraction}e{}{power}",
                if negative { "-" } else { "+" }
            )
        },
    );
    prop_oneof![
        integer,
        decimal,
        exponent,
        Just("-0.0".to_owned()),
        Just("0".to_owned()),
        Just("1e+308".to_owned()),
        Just("0.42451918914251396".to_owned()),
        Just("18446744073709551616".to_owned()),
    ]
}

/// Text with escapes, quotes, control characters and characters outside the BMP.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z]{0,8}",
        any::<String>(),
        Just("quote \" backslash \\ tab \t newline \n nul \u{0} é 😀".to_owned()),
    ]
}

fn doc() -> impl Strategy<Value = Doc> {
    let leaf = prop_oneof![
        Just(Doc::Null),
        any::<bool>().prop_map(Doc::Bool),
        number().prop_map(Doc::Number),
        text().prop_map(Doc::Text),
    ];
    leaf.prop_recursive(8, 64, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Doc::Array),
            // Distinct member names in a shuffled order: the order must survive.
            proptest::collection::btree_map("[a-z]{1,6}", inner, 0..6).prop_shuffle_members(),
        ]
    })
}

/// Object members in an order other than sorted.
trait ShuffleMembers {
    fn prop_shuffle_members(self) -> BoxedStrategy<Doc>;
}

impl<S> ShuffleMembers for S
where
    S: Strategy<Value = std::collections::BTreeMap<String, Doc>> + 'static,
{
    fn prop_shuffle_members(self) -> BoxedStrategy<Doc> {
        self.prop_map(|members| members.into_iter().collect::<Vec<_>>())
            .prop_shuffle()
            .prop_map(Doc::Object)
            .boxed()
    }
}

const LIMITS: Limits = Limits {
    max_keys_per_request: 1024,
};

/// The value a `write` request carrying `text` decodes to.
fn decoded_value(text: &str) -> Value {
    let request = format!(r#"{{"command":"write","keys":["k"],"value":{text}}}"#);
    match protocol::decode(&request, LIMITS)
        .expect("a valid write")
        .command
    {
        Command::Write { mut values, .. } => values.remove(0),
        other => panic!("decoded as {other:?}"),
    }
}

/// The value in the `read` answer the server would send for `value`.
fn encoded_value(value: Value) -> String {
    let answer = protocol::encode_reply(None, &Reply::Values(vec![("k".into(), Some(value))]));
    let answer: Value = serde_json::from_str(&answer).expect("an answer is JSON");
    answer["values"]["k"].to_string()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(common::proptest_cases(256)))]

    /// Decoding a write and encoding the read answer changes no digit, character or order.
    #[test]
    fn the_protocol_carries_every_value_unchanged(doc in doc()) {
        let text = doc.render();
        prop_assert_eq!(encoded_value(decoded_value(&text)), text);
    }
}

proptest! {
    // Each case opens, writes (an fsync) and reopens a database: fewer cases, more values each.
    #![proptest_config(ProptestConfig::with_cases(common::proptest_cases(32)))]

    /// Both stores give back exactly what they were given, the durable one also after a reopen.
    #[test]
    fn the_stores_give_back_every_value_unchanged(docs in proptest::collection::vec(doc(), 1..12)) {
        let texts: Vec<String> = docs.iter().map(Doc::render).collect();
        let changes: Vec<(String, Option<Value>)> = texts
            .iter()
            .enumerate()
            .map(|(n, text)| (format!("k{n}"), Some(decoded_value(text))))
            .collect();
        let keys: Vec<String> = changes.iter().map(|(k, _)| k.clone()).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let read_back = |store: &dyn Store| -> Vec<String> {
            store
                .read(&keys)
                .expect("read")
                .into_iter()
                .map(|v| v.expect("written").to_string())
                .collect()
        };
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");

        let memory = MemoryStore::new();
        runtime.block_on(memory.apply(changes.clone())).expect("apply");
        prop_assert_eq!(&read_back(&memory), &texts);

        let dir = tempfile::tempdir().expect("a temporary directory");
        {
            let durable = RedbStore::open(dir.path()).expect("open");
            runtime.block_on(durable.apply(changes)).expect("apply");
            prop_assert_eq!(&read_back(&durable), &texts);
        }
        let reopened = RedbStore::open(dir.path()).expect("reopen");
        prop_assert_eq!(&read_back(&reopened), &texts);
    }
}

#[tokio::test]
async fn a_value_and_an_id_come_back_with_every_digit_over_the_wire() {
    let server = start(settings()).await;
    let mut client = server.connect().await;
    let value = r#"{"f":0.42451918914251396,"big":123456789012345678901234567890,"z":-0.0,"e":1e+308,"b":[1.50]}"#;
    client
        .send_text(&format!(
            r#"{{"command":"write","keys":["k"],"value":{value},"id":0.42451918914251396}}"#
        ))
        .await;
    let written = tokio::time::timeout(BOUND, client.recv())
        .await
        .expect("in time");
    assert_eq!(written["id"].to_string(), "0.42451918914251396");
    client
        .send_text(r#"{"command":"read","keys":["k"],"id":18446744073709551616123}"#)
        .await;
    let read = client.recv().await;
    assert_eq!(read["values"]["k"].to_string(), value);
    assert_eq!(read["id"].to_string(), "18446744073709551616123");
    server.stop().await;
}

#[test]
fn values_written_before_exact_numbers_stay_readable() {
    // The database holds each value as JSON text; a file written by the previous release reads
    // back as the same JSON.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join(locksmith::store::durable::DATABASE_FILE);
    {
        let database = redb::Database::create(&file).expect("create");
        let table: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("values");
        let transaction = database.begin_write().expect("begin");
        {
            let mut values = transaction.open_table(table).expect("table");
            values
                .insert(
                    "old",
                    br#"{"a":[1,2.5,"x"],"f":0.4245191891425139}"#.as_slice(),
                )
                .expect("insert");
        }
        transaction.commit().expect("commit");
    }
    let store = Arc::new(RedbStore::open(dir.path()).expect("open a file of the previous release"));
    let read = store.read(&["old"]).expect("read");
    assert_eq!(
        read,
        vec![Some(json!({"a": [1, 2.5, "x"], "f": 0.4245191891425139}))]
    );
}
