//! Property tests of `ClientMsg::parse`: whatever a client sends, parsing
//! never panics and answers as `docs/protocol.md` (section 1) says: the
//! message, or a `bad_request` whose `ref` is the frame's own when that
//! `ref` was a valid string, else `null`.
//!
//! Each property runs 2,000 cases; `PROPTEST_CASES=N` overrides that (see
//! `docs/fuzzing.md` for the long run).

// proptest is a native-only dev-dependency: nothing here builds for wasm.
#![cfg(not(target_arch = "wasm32"))]

use app::protocol::{ClientMsg, ErrorCode, Rejection};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{Map, Value};

/// Cases per property: 2,000 unless `PROPTEST_CASES` says otherwise.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.trim().parse().ok())
        .unwrap_or(2_000);
    ProptestConfig {
        cases,
        // A failure prints its minimal input; no regression files in the tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------
// The oracle: what the contract says a decoded JSON value must parse to.
// ---------------------------------------------------------------------------

/// Longest valid `ref`, in chars (contract: "≤64 chars").
const REF_CHARS: usize = 64;
/// Task ids and kinds are 1 to 128 bytes (docs/protocol.md).
const ID_BYTES: std::ops::RangeInclusive<usize> = 1..=128;

/// The message `v` must parse to, or the `ref` its `bad_request` must carry.
fn expected(v: &Value) -> Result<ClientMsg, Option<String>> {
    // "one object per frame": anything else is refused, and has no ref.
    let Value::Object(o) = v else {
        return Err(None);
    };
    // A ref that is not a string, or is too long, is itself invalid: ref null.
    let reference = match o.get("ref") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.chars().count() <= REF_CHARS => Some(s.clone()),
        Some(_) => return Err(None),
    };
    let id = |field: &str| match o.get(field) {
        Some(Value::String(s)) if ID_BYTES.contains(&s.len()) => Some(s.clone()),
        _ => None,
    };
    let msg = match o.get("type").and_then(Value::as_str) {
        Some("start") => match (&reference, id("kind"), o.get("params")) {
            // `start` needs a ref, a kind and an object of params.
            (Some(r), Some(kind), Some(params @ Value::Object(_))) => Some(ClientMsg::Start {
                reference: r.clone(),
                kind,
                params: params.clone(),
            }),
            _ => None,
        },
        Some("subscribe") => id("task").map(|task| ClientMsg::Subscribe { task }),
        Some("unsubscribe") => id("task").map(|task| ClientMsg::Unsubscribe { task }),
        Some("cancel") => id("task").map(|task| ClientMsg::Cancel {
            reference: reference.clone(),
            task,
        }),
        // Extension (docs/protocol.md): drop a finished task, no reply.
        Some("forget") => id("task").map(|task| ClientMsg::Forget { task }),
        // Since 1.1: a watch token's connection replaces its token.
        Some("refresh") => match o.get("token") {
            Some(Value::String(t)) if (1..=2048).contains(&t.len()) => {
                Some(ClientMsg::Refresh { token: t.clone() })
            }
            _ => None,
        },
        // Missing or non-string `type`, or a type no one knows.
        _ => None,
    };
    msg.ok_or(reference)
}

/// Whether `a` and `b` are the same JSON, except that a float may differ by a
/// few ULP. serde_json is built without its `float_roundtrip` feature, so its
/// float parsing is not exact: a float in `params` can drift by an ULP or two
/// on each parse (see `float_params_round_trip_exactly` below and
/// docs/fuzzing.md). Integers, strings and structure must be identical.
fn same_but_float_drift(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() && y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            x == y
                || (x.is_sign_positive() == y.is_sign_positive()
                    && x.to_bits().abs_diff(y.to_bits()) <= 4)
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_but_float_drift(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((kx, x), (ky, y))| kx == ky && same_but_float_drift(x, y))
        }
        _ => a == b,
    }
}

fn round_trips(msg: &ClientMsg, again: &ClientMsg) -> bool {
    match (msg, again) {
        (
            ClientMsg::Start {
                reference: r1,
                kind: k1,
                params: p1,
            },
            ClientMsg::Start {
                reference: r2,
                kind: k2,
                params: p2,
            },
        ) => r1 == r2 && k1 == k2 && same_but_float_drift(p1, p2),
        _ => msg == again,
    }
}

/// Checks what `parse(text)` answered against the oracle, and the round trip.
fn check(text: &str) -> Result<(), TestCaseError> {
    let got = ClientMsg::parse(text);
    let want = match serde_json::from_str::<Value>(text) {
        Ok(v) => expected(&v),
        Err(_) => Err(None), // malformed JSON: bad_request, ref null
    };
    match (got, want) {
        (Ok(msg), Ok(want)) => {
            prop_assert_eq!(&msg, &want, "input: {}", text);
            // Re-serialising the message and parsing it again gives it back.
            let json = msg.to_json();
            let again = ClientMsg::parse(&json);
            prop_assert!(
                matches!(&again, Ok(again) if round_trips(&msg, again)),
                "round trip of {} via {}: {:?} became {:?}",
                text,
                json,
                msg,
                again
            );
        }
        (Err(r), Err(want_ref)) => check_rejection(text, &r, want_ref.as_deref())?,
        (got, want) => prop_assert!(
            false,
            "input: {}\nexpected: {:?}\nactual: {:?}",
            text,
            want,
            got
        ),
    }
    Ok(())
}

fn check_rejection(text: &str, r: &Rejection, want_ref: Option<&str>) -> Result<(), TestCaseError> {
    prop_assert_eq!(r.code, ErrorCode::BadRequest, "input: {}", text);
    prop_assert_eq!(r.reference.as_deref(), want_ref, "input: {}", text);
    if let Some(reference) = &r.reference {
        prop_assert!(reference.chars().count() <= REF_CHARS);
    }
    prop_assert!(!r.message.is_empty(), "input: {}", text);
    Ok(())
}

// ---------------------------------------------------------------------------
// Strategies.
// ---------------------------------------------------------------------------

const TYPES: [&str; 6] = [
    "start",
    "subscribe",
    "unsubscribe",
    "cancel",
    "forget",
    "refresh",
];
const KEYS: [&str; 6] = ["type", "ref", "task", "kind", "params", "token"];

/// Strings a client might send: protocol words, short ASCII, any Unicode,
/// and multi-byte text (so char and byte limits differ).
fn any_text(max_chars: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        2 => prop::sample::select(&TYPES[..]).prop_map(String::from),
        1 => prop::sample::select(&KEYS[..]).prop_map(String::from),
        3 => vec(prop::char::range('a', 'z'), 0..=max_chars).prop_map(String::from_iter),
        3 => vec(any::<char>(), 0..=max_chars).prop_map(String::from_iter),
        2 => vec(prop_oneof![Just('x'), Just('é'), Just('€'), Just('𝄞')], 0..=max_chars)
            .prop_map(String::from_iter),
    ]
}

fn json_number() -> impl Strategy<Value = Value> {
    use prop::num::f64::{NEGATIVE, NORMAL, POSITIVE, SUBNORMAL, ZERO};
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (POSITIVE | NEGATIVE | NORMAL | SUBNORMAL | ZERO).prop_map(Value::from),
        (-1000i32..1000).prop_map(|n| Value::from(f64::from(n) / 8.0)),
    ]
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        json_number(),
        any_text(20).prop_map(Value::String),
    ]
}

fn json_key() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => prop::sample::select(&KEYS[..]).prop_map(String::from),
        1 => any_text(8),
    ]
}

/// Any JSON value, at most 4 levels deep and about 64 nodes.
fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..8).prop_map(Value::Array),
            vec((json_key(), inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn json_object() -> impl Strategy<Value = Value> {
    vec((any_text(8), json_value()), 0..4)
        .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>()))
}

/// A field of a message-shaped object: `None` when the field is missing.
type Field = Option<Value>;

fn type_field() -> impl Strategy<Value = Field> {
    prop_oneof![
        6 => prop::sample::select(&TYPES[..]).prop_map(|t| Some(Value::from(t))),
        2 => Just(Some(Value::from("start"))), // the one that needs the most fields
        1 => any_text(12).prop_map(|t| Some(Value::from(t))), // garbage
        1 => prop::sample::select(&["Start", "START", " start", "start ", ""][..])
            .prop_map(|t| Some(Value::from(t))),
        1 => json_value().prop_map(Some),
        1 => Just(None),
    ]
}

fn ref_field() -> impl Strategy<Value = Field> {
    prop_oneof![
        4 => any_text(80).prop_map(|r| Some(Value::String(r))),
        2 => (60usize..=68).prop_map(|n| Some(Value::String("é".repeat(n)))),
        1 => json_number().prop_map(Some),
        1 => Just(Some(Value::Null)),
        2 => Just(None),
        1 => json_value().prop_map(Some),
    ]
}

/// `task` or `kind`: around the 1..=128-byte limit, or not a string at all.
fn id_field() -> impl Strategy<Value = Field> {
    prop_oneof![
        4 => any_text(12).prop_map(|s| Some(Value::String(s))),
        2 => vec(prop_oneof![Just('t'), Just('é')], 60..=135)
            .prop_map(|s| Some(Value::String(String::from_iter(s)))),
        1 => (120usize..=135).prop_map(|n| Some(Value::String("t".repeat(n)))),
        1 => Just(Some(Value::String(String::new()))),
        1 => json_number().prop_map(Some),
        1 => Just(Some(Value::Null)),
        2 => Just(None),
        1 => json_value().prop_map(Some),
    ]
}

fn params_field() -> impl Strategy<Value = Field> {
    prop_oneof![
        5 => json_object().prop_map(Some),
        1 => json_value().prop_map(Some),
        1 => Just(Some(Value::Null)),
        2 => Just(None),
    ]
}

/// One object, as text: the six protocol fields (each maybe missing), a few
/// unknown ones, in any order, sometimes with a key twice.
fn message_text() -> impl Strategy<Value = String> {
    (
        type_field(),
        ref_field(),
        id_field(),
        id_field(),
        params_field(),
        id_field(),
        vec((json_key(), json_value()), 0..3),
        vec(any::<u16>(), 9), // the order of the fields
    )
        .prop_map(|(ty, reference, task, kind, params, token, extra, order)| {
            let mut fields: Vec<(String, Value)> = extra;
            for (k, v) in [
                ("type", ty),
                ("ref", reference),
                ("task", task),
                ("kind", kind),
                ("params", params),
                ("token", token),
            ] {
                if let Some(v) = v {
                    fields.push((k.to_string(), v));
                }
            }
            let mut fields: Vec<_> = order.into_iter().zip(fields).collect();
            fields.sort_by_key(|&(key, _)| key);
            let body: Vec<String> = fields
                .iter()
                .map(|(_, (k, v))| format!("{}:{}", Value::from(k.as_str()), v))
                .collect();
            format!("{{{}}}", body.join(","))
        })
}

/// Near-JSON: protocol tokens and JSON punctuation in any order.
fn json_token_soup() -> impl Strategy<Value = String> {
    const TOKENS: [&str; 31] = [
        "{",
        "}",
        "[",
        "]",
        ":",
        ",",
        "\"",
        "\\",
        " ",
        "\"type\"",
        "\"ref\"",
        "\"task\"",
        "\"kind\"",
        "\"params\"",
        "\"start\"",
        "\"subscribe\"",
        "\"unsubscribe\"",
        "\"cancel\"",
        "\"forget\"",
        "null",
        "true",
        "false",
        "0",
        "-1",
        "1e999",
        "-0.0",
        "\"\\u0000\"",
        "\"\\ud800\"",
        "\"é\"",
        "{}",
        "\"t1\"",
    ];
    vec(prop::sample::select(&TOKENS[..]), 0..40).prop_map(|t| t.concat())
}

/// A message-shaped object with one edit: cut, a span deleted, a char inserted.
fn mutated_message() -> impl Strategy<Value = String> {
    (
        message_text(),
        any::<prop::sample::Index>(),
        any::<prop::sample::Index>(),
        any::<char>(),
        0..3u8,
    )
        .prop_map(|(text, a, b, c, edit)| {
            let chars: Vec<char> = text.chars().collect();
            let (i, j) = (a.index(chars.len() + 1), b.index(chars.len() + 1));
            let (lo, hi) = (i.min(j), i.max(j));
            let out: Vec<char> = match edit {
                0 => chars[..lo].to_vec(),
                1 => [&chars[..lo], &chars[hi..]].concat(),
                _ => [&chars[..lo], &[c], &chars[lo..]].concat(),
            };
            String::from_iter(out)
        })
}

/// Deeply nested arrays or objects (serde_json stops at 128 levels).
fn deep_nesting() -> impl Strategy<Value = String> {
    (0usize..400, any::<bool>(), any::<bool>()).prop_map(|(depth, arrays, closed)| {
        let (open, close) = if arrays {
            ("[", "]")
        } else {
            ("{\"type\":", "}")
        };
        let mut s = open.repeat(depth);
        s.push('1');
        if closed {
            s.push_str(&close.repeat(depth));
        }
        s
    })
}

/// Arbitrary text: any Unicode, any bytes made UTF-8 lossily, near-JSON.
fn arbitrary_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        vec(any::<u8>(), 0..256).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        json_token_soup(),
        mutated_message(),
        deep_nesting(),
    ]
}

// ---------------------------------------------------------------------------
// The properties.
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// Any text at all: no panic; a refusal is `bad_request` with the ref the
    /// oracle derives (null unless the text was an object with a valid ref).
    #[test]
    fn arbitrary_text_never_panics_and_is_bad_request(text in arbitrary_text()) {
        check(&text)?;
    }

    /// Any JSON value (bounded depth and size): the contract's answer, and a
    /// parsed message survives re-serialising.
    #[test]
    fn arbitrary_json_answers_as_the_contract_says(v in json_value()) {
        check(&v.to_string())?;
    }

    /// Objects shaped like messages, fields missing, mistyped, too long, in
    /// any order: the contract's answer, refusals carrying a valid ref.
    #[test]
    fn message_shaped_objects_answer_as_the_contract_says(text in message_text()) {
        check(&text)?;
    }
}

/// Exact round trip of float `params`: the workspace enables serde_json's
/// `float_roundtrip` (without it,
/// `{"type":"start","ref":"r","kind":"k","params":{"x":5.757928280591281e152}}`
/// parsed to `5.757928280591282e152`, then to `5.7579282805912825e152`).
#[test]
fn float_params_round_trip_exactly() {
    use prop::num::f64::{NEGATIVE, NORMAL, POSITIVE, SUBNORMAL, ZERO};
    let mut runner = proptest::test_runner::TestRunner::new(config());
    runner
        .run(&(POSITIVE | NEGATIVE | NORMAL | SUBNORMAL | ZERO), |x| {
            let msg = ClientMsg::Start {
                reference: "r".into(),
                kind: "k".into(),
                params: serde_json::json!({ "x": x }),
            };
            prop_assert_eq!(ClientMsg::parse(&msg.to_json()), Ok(msg));
            Ok(())
        })
        .unwrap();
}

/// The oracle itself agrees with the contract's own examples.
#[test]
fn the_oracle_accepts_the_contract_examples() {
    for text in [
        r#"{"type":"start","ref":"r1","kind":"simulate","params":{"duration_ms":1000,"steps":10,"fail_at":null}}"#,
        r#"{"type":"subscribe","task":"t1"}"#,
        r#"{"type":"unsubscribe","task":"t1"}"#,
        r#"{"type":"cancel","ref":"r2","task":"t1"}"#,
        r#"{"type":"cancel","task":"t1"}"#,
    ] {
        let v: Value = serde_json::from_str(text).unwrap();
        assert!(expected(&v).is_ok(), "{text}");
        check(text).unwrap();
    }
    let v: Value = serde_json::from_str(r#"{"type":"explode","ref":"a"}"#).unwrap();
    assert_eq!(expected(&v), Err(Some("a".into())));
}

/// The strategies reach every outcome (each at least 0.25% of the time): each kind of
/// message parsed, and refusals with and without a ref.
#[test]
fn the_generators_reach_every_outcome() {
    use proptest::strategy::ValueTree;
    use std::collections::BTreeMap;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut counts: BTreeMap<&str, BTreeMap<&str, u32>> = BTreeMap::new();
    let samples = 2_000;
    let strategies: [(&str, BoxedStrategy<String>); 3] = [
        ("text", arbitrary_text().boxed()),
        ("json", json_value().prop_map(|v| v.to_string()).boxed()),
        ("message", message_text().boxed()),
    ];
    for (name, strategy) in &strategies {
        let c = counts.entry(name).or_default();
        for _ in 0..samples {
            let text = strategy.new_tree(&mut runner).unwrap().current();
            let class = match ClientMsg::parse(&text) {
                Ok(ClientMsg::Start { .. }) => "start",
                Ok(ClientMsg::Subscribe { .. }) => "subscribe",
                Ok(ClientMsg::Unsubscribe { .. }) => "unsubscribe",
                Ok(ClientMsg::Cancel {
                    reference: Some(_), ..
                }) => "cancel with ref",
                Ok(ClientMsg::Cancel { .. }) => "cancel",
                Ok(ClientMsg::Forget { .. }) => "forget",
                Ok(ClientMsg::Refresh { .. }) => "refresh",
                Err(Rejection {
                    reference: Some(_), ..
                }) => "refused with ref",
                Err(_) => "refused, ref null",
            };
            *c.entry(class).or_default() += 1;
        }
    }
    println!("{counts:#?}");
    let message = &counts["message"];
    for class in [
        "start",
        "subscribe",
        "unsubscribe",
        "cancel with ref",
        "cancel",
        "forget",
        "refresh",
        "refused with ref",
        "refused, ref null",
    ] {
        let n = message.get(class).copied().unwrap_or(0);
        assert!(n >= samples / 400, "{class}: {n} of {samples}: {message:?}");
    }
}
