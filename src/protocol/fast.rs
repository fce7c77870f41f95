//! The fast path of request decoding: the common requests (`lock`, `unlock`, `read`, `write`,
//! `delete`, `ping`, `session`, `cancel`) decoded in one pass over the text, without building the
//! `serde_json::Value` tree of the whole object (an `IndexMap` and a `String` per field).
//!
//! **Invariant: [`decode_fast`] returns `Some(request)` only when the reference decoder
//! ([`super::reference_decode_frame`]) returns `Ok(request)` for the same text.** Whenever it
//! cannot decode a frame, or meets anything unusual (an escaped command name, a wrong type, an
//! invalid key list, another command), it gives up with `None` and the reference decoder
//! decides; so every error keeps its sentence and the precedence of its checks, and this module
//! only ever needs to be right on success. The tests check the invariant on generated frames.
//!
//! How success stays the reference's:
//! - Every field is read by the same `serde_json` deserializer, at the same depth, as the
//!   reference reads it into a `Value`: a field this path reads succeeds only if the reference's
//!   `Value` of it would, so a frame this path accepts is one the reference parses.
//! - `id`, `values`, `value` and unknown fields are read as `Value`s, exactly as the reference
//!   reads them (numbers exact under `arbitrary_precision`, nesting limit included).
//! - `command`, `mode`, `hold_lock` and `timeout_ms` are read as a [`Scalar`] (a borrowed string,
//!   a boolean, `null`, or a number checked as `Number::as_u64` checks it), `keys` as a list of
//!   borrowed strings; any other shape fails the read, and the frame goes to the reference.
//! - A repeated field keeps its last occurrence, as the reference's `Map` does; each occurrence
//!   is read (and validated) as it comes.
//! - A top-level field named with serde_json's private prefix makes this path give up: the
//!   reference's `Value` reads an object whose first name is `$serde_json::private::Number` as a
//!   number and, with the `raw_value` feature (which axum turns on for the whole build),
//!   `$serde_json::private::RawValue` as embedded JSON text. Nested deeper, such objects are read
//!   as `Value`s by both paths, or fail a [`Scalar`] read.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Number, Value};

use super::{all_distinct, Command, Limits, Request, MAX_KEY_BYTES};
use crate::lock::{Key, LockMode};

/// The prefix of serde_json's private field names (the magic key through which, under
/// `arbitrary_precision`, a number travels as a one-entry map).
const PRIVATE_PREFIX: &str = "$serde_json::private::";

/// The key of that one-entry map: its value is the number's text.
const NUMBER_TOKEN: &str = "$serde_json::private::Number";

/// Decodes a common, valid request, or gives up with `None` (see the module's invariant).
pub(super) fn decode_fast(text: &str, limits: Limits) -> Option<Request> {
    let fields: Fields<'_> = serde_json::from_str(text).ok()?;
    let timeout = match fields.timeout_ms {
        None | Some(Scalar::Null) => None,
        Some(Scalar::Number(Some(ms))) => Some(Duration::from_millis(ms)),
        Some(_) => return None,
    };
    let Some(Scalar::Str(name)) = &fields.command else {
        return None;
    };
    let command = match name.as_ref() {
        "lock" => Command::Lock {
            keys: keys(fields.keys.as_deref(), limits)?,
            mode: mode(fields.mode.as_ref())?,
        },
        "unlock" => Command::Unlock {
            keys: keys(fields.keys.as_deref(), limits)?,
        },
        "read" => Command::Read {
            keys: keys(fields.keys.as_deref(), limits)?,
            hold_lock: hold_lock(fields.hold_lock.as_ref())?,
        },
        "write" => {
            let keys = keys(fields.keys.as_deref(), limits)?;
            let hold_lock = hold_lock(fields.hold_lock.as_ref())?;
            Command::Write {
                values: write_values(fields.values, fields.value, keys.len())?,
                keys,
                hold_lock,
            }
        }
        "delete" => Command::Delete {
            keys: keys(fields.keys.as_deref(), limits)?,
            hold_lock: hold_lock(fields.hold_lock.as_ref())?,
        },
        "ping" => Command::Ping,
        "session" => Command::Session,
        "cancel" => Command::Cancel,
        _ => return None,
    };
    Some(Request {
        id: fields.id,
        timeout,
        command,
    })
}

/// `keys`: present, non-empty, within the limit, each key non-empty, at most [`MAX_KEY_BYTES`],
/// and distinct; `None` (give up) otherwise.
fn keys(keys: Option<&[Cow<'_, str>]>, limits: Limits) -> Option<Vec<Key>> {
    let keys = keys?;
    let fits = |key: &Cow<'_, str>| !key.is_empty() && key.len() <= MAX_KEY_BYTES;
    if keys.is_empty()
        || keys.len() > limits.max_keys_per_request
        || !keys.iter().all(fits)
        || !all_distinct(keys, |key| key.as_ref())
    {
        return None;
    }
    Some(keys.iter().map(|key| Key::from(key.as_ref())).collect())
}

/// `mode`: absent or `null` (write), `"write"` or `"read"`.
fn mode(mode: Option<&Scalar<'_>>) -> Option<LockMode> {
    match mode {
        None | Some(Scalar::Null) => Some(LockMode::Exclusive),
        Some(Scalar::Str(mode)) if mode == "write" => Some(LockMode::Exclusive),
        Some(Scalar::Str(mode)) if mode == "read" => Some(LockMode::Shared),
        Some(_) => None,
    }
}

/// `hold_lock`: absent or `null` (false), or a boolean.
fn hold_lock(hold: Option<&Scalar<'_>>) -> Option<bool> {
    match hold {
        None | Some(Scalar::Null) => Some(false),
        Some(Scalar::Bool(hold)) => Some(*hold),
        Some(_) => None,
    }
}

/// The values of a write, in the reference's two forms (`values`, or the original `value`), one
/// per key.
fn write_values(
    values: Option<Value>,
    value: Option<Value>,
    key_count: usize,
) -> Option<Vec<Value>> {
    let values = match (values, value) {
        (Some(Value::Array(values)), None) => values,
        (None, Some(value)) if key_count == 1 => vec![value],
        (None, Some(Value::Array(values))) => values,
        _ => return None,
    };
    (values.len() == key_count).then_some(values)
}

/// The fields of a request object this path reads; each the last occurrence.
#[derive(Default)]
struct Fields<'a> {
    /// `command`.
    command: Option<Scalar<'a>>,
    /// `keys`, when it is an array of strings.
    keys: Option<Vec<Cow<'a, str>>>,
    /// `mode`.
    mode: Option<Scalar<'a>>,
    /// `timeout_ms`.
    timeout_ms: Option<Scalar<'a>>,
    /// `hold_lock`.
    hold_lock: Option<Scalar<'a>>,
    /// `id`, as the reference reads it.
    id: Option<Value>,
    /// `values`, as the reference reads it.
    values: Option<Value>,
    /// `value`, as the reference reads it.
    value: Option<Value>,
}

/// A field name of the request object.
enum Name {
    /// `command`.
    Command,
    /// `keys`.
    Keys,
    /// `mode`.
    Mode,
    /// `timeout_ms`.
    TimeoutMs,
    /// `hold_lock`.
    HoldLock,
    /// `id`.
    Id,
    /// `values`.
    Values,
    /// `value`.
    Value,
    /// A name the fast path does not read (its value is still read as a `Value`).
    Other,
    /// A name with serde_json's private prefix: give up.
    Private,
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        /// Classifies a field name, borrowed or unescaped, without allocating.
        struct NameVisitor;
        impl Visitor<'_> for NameVisitor {
            type Value = Name;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, name: &str) -> Result<Name, E> {
                Ok(match name {
                    "command" => Name::Command,
                    "keys" => Name::Keys,
                    "mode" => Name::Mode,
                    "timeout_ms" => Name::TimeoutMs,
                    "hold_lock" => Name::HoldLock,
                    "id" => Name::Id,
                    "values" => Name::Values,
                    "value" => Name::Value,
                    other if other.starts_with(PRIVATE_PREFIX) => Name::Private,
                    _ => Name::Other,
                })
            }
        }
        deserializer.deserialize_identifier(NameVisitor)
    }
}

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        /// Reads the top-level object field by field.
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a request object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
                let mut fields = Fields::default();
                while let Some(name) = map.next_key::<Name>()? {
                    match name {
                        Name::Command => fields.command = Some(map.next_value()?),
                        Name::Keys => fields.keys = Some(map.next_value::<KeyList<'de>>()?.0),
                        Name::Mode => fields.mode = Some(map.next_value()?),
                        Name::TimeoutMs => fields.timeout_ms = Some(map.next_value()?),
                        Name::HoldLock => fields.hold_lock = Some(map.next_value()?),
                        Name::Id => fields.id = Some(map.next_value()?),
                        Name::Values => fields.values = Some(map.next_value()?),
                        Name::Value => fields.value = Some(map.next_value()?),
                        Name::Other => {
                            map.next_value::<Value>()?;
                        }
                        Name::Private => return Err(de::Error::custom("a private field name")),
                    }
                }
                Ok(fields)
            }
        }
        deserializer.deserialize_map(FieldsVisitor)
    }
}

/// A string, a boolean, `null` or a number: what `command`, `mode`, `hold_lock` and
/// `timeout_ms` may be. Any other JSON fails the read.
enum Scalar<'a> {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// Borrowed from the frame unless it had escapes.
    Str(Cow<'a, str>),
    /// A number: `Some` when `Number::as_u64` gives one (a non-negative integer that fits).
    Number(Option<u64>),
}

impl<'de> Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        /// Reads one scalar.
        struct ScalarVisitor;
        impl<'de> Visitor<'de> for ScalarVisitor {
            type Value = Scalar<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, a boolean, null or a number")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Null)
            }
            fn visit_bool<E: de::Error>(self, value: bool) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Bool(value))
            }
            /// An integer that fits a `u64` (the reference's `Number` of it reads back the same).
            fn visit_u64<E: de::Error>(self, value: u64) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Number(Some(value)))
            }
            /// A negative integer that fits an `i64`: `as_u64` of its `Number` is `None`.
            fn visit_i64<E: de::Error>(self, value: i64) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Number(u64::try_from(value).ok()))
            }
            fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Str(Cow::Borrowed(text)))
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Str(Cow::Owned(text.to_owned())))
            }
            fn visit_string<E: de::Error>(self, text: String) -> Result<Scalar<'de>, E> {
                Ok(Scalar::Str(Cow::Owned(text)))
            }
            /// Under `arbitrary_precision` any other number arrives as the one-entry map
            /// `{NUMBER_TOKEN: "<its text>"}`; the reference's `Value` parses that text with
            /// `Number::from_str`, and `as_u64` reads it, so this does the same. (An object that
            /// spells out that map in the frame is read the same way by both.)
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scalar<'de>, A::Error> {
                match map.next_key::<Scalar<'de>>()? {
                    Some(Scalar::Str(key)) if key == NUMBER_TOKEN => {
                        let Scalar::Str(text) = map.next_value::<Scalar<'de>>()? else {
                            return Err(de::Error::custom("a number's text"));
                        };
                        let number: Number = text.parse().map_err(de::Error::custom)?;
                        Ok(Scalar::Number(number.as_u64()))
                    }
                    _ => Err(de::Error::custom("not a scalar")),
                }
            }
        }
        deserializer.deserialize_any(ScalarVisitor)
    }
}

/// `keys` when it is an array of strings, each borrowed from the frame unless it had escapes.
struct KeyList<'a>(Vec<Cow<'a, str>>);

impl<'de> Deserialize<'de> for KeyList<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        /// Reads the array.
        struct KeyListVisitor;
        impl<'de> Visitor<'de> for KeyListVisitor {
            type Value = KeyList<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of strings")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<KeyList<'de>, A::Error> {
                let mut keys = Vec::with_capacity(seq.size_hint().unwrap_or(1).min(64));
                while let Some(key) = seq.next_element::<Scalar<'de>>()? {
                    let Scalar::Str(key) = key else {
                        return Err(de::Error::custom("a key must be a string"));
                    };
                    keys.push(key);
                }
                Ok(KeyList(keys))
            }
        }
        deserializer.deserialize_any(KeyListVisitor)
    }
}

#[cfg(test)]
mod tests {
    //! The fast path against the reference decoder: on every frame, it gives up or agrees.

    use super::*;

    use proptest::prelude::*;

    use crate::protocol::{decode_frame, reference_decode_frame, Undecoded};

    const LIMITS: Limits = Limits {
        max_keys_per_request: 4,
    };

    /// `fast(text)` gave up or equals the reference's request.
    fn assert_fast_agrees(text: &str) -> Result<(), TestCaseError> {
        if let Some(fast) = decode_fast(text, LIMITS) {
            match reference_decode_frame(text, LIMITS) {
                Ok(reference) => prop_assert_eq!(fast, reference, "{}", text),
                Err(undecoded) => {
                    return Err(TestCaseError::fail(format!(
                        "fast accepted {text} as {fast:?}; the reference says {}",
                        undecoded.error
                    )))
                }
            }
        }
        Ok(())
    }

    /// What an answer is made of: the request, or the id, command, code and sentence.
    fn outcome(decoded: Result<Request, Undecoded>) -> Result<Request, String> {
        decoded.map_err(|undecoded| {
            format!(
                "{:?} {:?} {} {}",
                undecoded.id,
                undecoded.command,
                undecoded.error.code(),
                undecoded.error
            )
        })
    }

    /// Nested arrays `depth` deep.
    fn nested(depth: usize) -> String {
        format!("{}{}", "[".repeat(depth), "]".repeat(depth))
    }

    /// Field names as a frame may spell them: plain, escaped, unknown, private.
    fn arb_name() -> impl Strategy<Value = String> {
        prop::sample::select(vec![
            r#""command""#,
            r#""keys""#,
            r#""k\u0065ys""#,
            r#""mode""#,
            r#""timeout_ms""#,
            r#""hold_lock""#,
            r#""id""#,
            r#""values""#,
            r#""value""#,
            r#""extra""#,
            r#""$serde_json::private::Number""#,
            r#""$serde_json::private::RawValue""#,
        ])
        .prop_map(str::to_owned)
    }

    /// Values for any field: right and wrong types, odd numbers, escapes, nesting near the limit.
    fn arb_field_value() -> impl Strategy<Value = String> {
        let fixed = prop::sample::select(vec![
            r#""lock""#,
            r#""unlock""#,
            r#""read""#,
            r#""write""#,
            r#""delete""#,
            r#""ping""#,
            r#""session""#,
            r#""cancel""#,
            r#""locks""#,
            r#""dance""#,
            r#""lo\u0063k""#,
            r#"["k17"]"#,
            r#"["a","b"]"#,
            r#"[]"#,
            r#"["a","a"]"#,
            r#"[""]"#,
            r#"["a\"b","\u006b"]"#,
            r#"["a","b","c","d","e"]"#,
            r#"[1]"#,
            r#"[["a"]]"#,
            r#""a""#,
            r#"null"#,
            r#"true"#,
            r#"false"#,
            r#"0"#,
            r#"10000"#,
            r#"1.0"#,
            r#"1e3"#,
            r#"-1"#,
            r#"-0"#,
            r#"18446744073709551615"#,
            r#"18446744073709551616"#,
            r#"123456789012345678901234567890"#,
            r#""5""#,
            r#"{"$serde_json::private::Number":"7"}"#,
            r#"{"$serde_json::private::Number":"05"}"#,
            r#"{"$serde_json::private::Number":"abc"}"#,
            r#"{"$serde_json::private::RawValue":"5"}"#,
            r#"{"a":[1,{"b":null}],"c":1.50}"#,
            r#"[1,2]"#,
            r#"[{"a":1.0}]"#,
            r#""\ud800""#,
            r#""\u00e9\n""#,
        ])
        .prop_map(str::to_owned);
        prop_oneof![
            8 => fixed,
            1 => (125usize..129).prop_map(nested),
            1 => "[a-z]{1,3}".prop_map(|key| format!(r#"["{key}"]"#)),
        ]
    }

    /// A frame: a command with fields mostly of the right shape (each optional field present or
    /// not), a few fields of any shape, all in random order; or fields of any shape alone.
    fn arb_frame() -> impl Strategy<Value = String> {
        let pick = |values: &[&'static str]| prop::sample::select(values.to_vec());
        let command = pick(&[
            "lock", "unlock", "read", "write", "delete", "ping", "session", "cancel", "hello",
            "locks",
        ]);
        let good = (
            pick(&[
                r#"["k17"]"#,
                r#"["a","b"]"#,
                r#"["a\"b","\u006b"]"#,
                r#"["a","b","c","d"]"#,
                r#"["é"]"#,
            ]),
            pick(&[r#""read""#, r#""write""#, "null"]),
            pick(&["0", "10000", "null", "18446744073709551615"]),
            pick(&["true", "false", "null"]),
            pick(&[
                "42",
                "-5",
                r#""x""#,
                "1.0",
                "1e3",
                "123456789012345678901234567890",
                r#"{"n":[1,{"m":null}]}"#,
                "null",
            ]),
            pick(&["[1]", r#"[1,{"a":2.50}]"#, "[null]"]),
            pick(&["5", "[1,2]", r#"{"a":1}"#]),
        );
        let present = prop::collection::vec(any::<bool>(), 7);
        let noise = prop::collection::vec((arb_name(), arb_field_value()), 0..3);
        let common = (command, good, present, noise)
            .prop_flat_map(|(command, good, present, noise)| {
                let (keys, mode, timeout, hold, id, values, value) = good;
                let optional = [
                    ("keys", keys),
                    ("mode", mode),
                    ("timeout_ms", timeout),
                    ("hold_lock", hold),
                    ("id", id),
                    ("values", values),
                    ("value", value),
                ];
                let mut entries = vec![format!(r#""command":"{command}""#)];
                for ((name, value), present) in optional.into_iter().zip(present) {
                    // Keys are nearly always there: most commands need them.
                    if present || name == "keys" {
                        entries.push(format!(r#""{name}":{value}"#));
                    }
                }
                entries.extend(
                    noise
                        .into_iter()
                        .map(|(name, value)| format!("{name}:{value}")),
                );
                Just(entries).prop_shuffle()
            })
            .prop_map(|entries| format!("{{{}}}", entries.join(",")));
        let anything = (
            prop::collection::vec((arb_name(), arb_field_value()), 0..7),
            any::<bool>(),
        )
            .prop_map(|(fields, trailing)| {
                let entries: Vec<String> = fields
                    .into_iter()
                    .map(|(name, value)| format!("{name}:{value}"))
                    .collect();
                format!(
                    "{{{}}}{}",
                    entries.join(" , "),
                    if trailing { " x" } else { "" }
                )
            });
        prop_oneof![4 => common, 1 => anything]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// The module's invariant: the fast path gives up or decodes what the reference decodes.
        #[test]
        fn the_fast_path_gives_up_or_agrees_with_the_reference(frame in arb_frame()) {
            assert_fast_agrees(&frame)?;
        }

        /// Whichever path decides, `decode_frame` answers as the reference does: the same
        /// request, or the same id, command, code and sentence.
        #[test]
        fn decode_frame_answers_as_the_reference_decoder(frame in arb_frame()) {
            prop_assert_eq!(
                outcome(decode_frame(&frame, LIMITS)),
                outcome(reference_decode_frame(&frame, LIMITS))
            );
        }
    }

    #[test]
    fn the_fast_path_accepts_the_common_requests() {
        let frames = [
            r#"{"command":"lock","keys":["k17"],"mode":"write","timeout_ms":10000,"id":42}"#,
            r#"{"command":"lock","keys":["a","b"],"mode":"read"}"#,
            r#"{"id":"x","keys":["k\u0031"],"command":"unlock"}"#,
            r#"{"command":"read","keys":["a"],"hold_lock":true,"id":{"n":[1.0,1e3]}}"#,
            r#"{"command":"write","keys":["a","b"],"values":[1,{"x":123456789012345678901234567890}]}"#,
            r#"{"command":"write","keys":["a"],"value":[1,2]}"#,
            r#"{"command":"write","keys":["a","b"],"value":[1,2]}"#,
            r#"{"command":"delete","keys":["a"],"hold_lock":false,"extra":{"nested":[1]}}"#,
            r#"{"command":"ping","id":123456789012345678901234567890}"#,
            r#"{"command":"session"}"#,
            r#"{"command":"cancel","timeout_ms":null}"#,
            r#"{"command":"lock","keys":["a"],"keys":["b"]}"#,
        ];
        for frame in frames {
            assert!(decode_fast(frame, LIMITS).is_some(), "gave up on {frame}");
            assert_fast_agrees(frame).expect("agrees");
        }
    }

    #[test]
    fn a_repeated_field_keeps_its_last_occurrence_on_both_paths() {
        let frame = r#"{"command":"lock","keys":["a"],"id":1,"keys":["b"],"id":2,"mode":"read"}"#;
        let request = decode_fast(frame, LIMITS).expect("decoded");
        assert_eq!(request.id, Some(Value::from(2)));
        assert_eq!(
            request.command,
            Command::Lock {
                keys: vec![Key::from("b")],
                mode: LockMode::Shared
            }
        );
        assert_fast_agrees(frame).expect("agrees");
    }

    #[test]
    fn the_fast_path_agrees_at_the_nesting_limit() {
        for depth in 120..132 {
            let deep = nested(depth);
            for frame in [
                format!(r#"{{"command":"ping","extra":{deep}}}"#),
                format!(r#"{{"command":"ping","id":{deep}}}"#),
                format!(r#"{{"command":"write","keys":["a"],"values":[{deep}]}}"#),
            ] {
                assert_fast_agrees(&frame).expect("agrees");
                assert_eq!(
                    outcome(decode_frame(&frame, LIMITS)),
                    outcome(reference_decode_frame(&frame, LIMITS))
                );
            }
        }
    }

    #[test]
    fn serde_jsons_private_names_send_the_frame_to_the_reference() {
        // The reference's `Value` reads an object whose first name is the number token as a
        // number: a top-level one is then not an object, a nested one must hold a number.
        for frame in [
            r#"{"$serde_json::private::Number":"5","command":"ping"}"#,
            r#"{"command":"ping","extra":{"$serde_json::private::Number":"abc"}}"#,
            r#"{"command":"ping","extra":{"$serde_json::private::Number":"5","x":1}}"#,
            r#"{"command":"lock","keys":["a"],"timeout_ms":{"$serde_json::private::Number":"05"}}"#,
            r#"{"$serde_json::private::RawValue":"{\"command\":\"ping\"}"}"#,
            r#"{"command":"lock","keys":["a"],"mode":{"$serde_json::private::RawValue":"\"read\""}}"#,
        ] {
            assert_fast_agrees(frame).expect("agrees");
        }
        // Both paths read a nested raw-value object as the `Value` of its text (`raw_value` is on).
        let embedded = r#"{"command":"ping","id":{"$serde_json::private::RawValue":"7"}}"#;
        let request = decode_fast(embedded, LIMITS).expect("decoded");
        assert_eq!(request.id, Some(Value::from(7)));
        assert_fast_agrees(embedded).expect("agrees");
        assert!(decode_fast(
            r#"{"$serde_json::private::Number":"5","command":"ping"}"#,
            LIMITS
        )
        .is_none());
    }

    #[test]
    fn invalid_strings_anywhere_send_the_frame_to_the_reference() {
        for frame in [
            r#"{"command":"ping","extra":"\ud800"}"#,
            r#"{"command":"ping","id":"\udc00"}"#,
            r#"{"command":"lock","keys":["\ud800"]}"#,
            r#"{"command":"lock","keys":["a"],"mode":"\ud800"}"#,
        ] {
            assert!(decode_fast(frame, LIMITS).is_none(), "{frame}");
            assert!(reference_decode_frame(frame, LIMITS).is_err(), "{frame}");
        }
    }
}
