//! Property-based fuzzing of the event decoders on stable Rust: whatever the bytes, JSON,
//! NDJSON and Arrow IPC bodies decode to events or to a clear error, never a panic; a
//! valid body with one byte changed is still an answer, never a crash. Every input that
//! ever failed here stays below as a regression case.

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{Field, Schema};
use ledgerlake_ingest::validate::{BodyFormat, event_to_json, parse_body};
use ledgerlake_lakehouse::events::EventKind;
use ledgerlake_lakehouse::pricing::{MAX_INFERENCE_TOKENS, MAX_PRICE_PER_1K};
use proptest::prelude::*;
use serde_json::{Value, json};

use crate::common::demo;

const FORMATS: [BodyFormat; 3] = [BodyFormat::JsonArray, BodyFormat::Ndjson, BodyFormat::ArrowStream];

/// Decodes `body` in every format; the answer must be a value, whatever it is.
fn decode_all(body: &[u8]) {
    for format in FORMATS {
        for kind in [None, Some(EventKind::FeeCharged)] {
            match parse_body(format, body, kind) {
                Ok(items) => {
                    for (_, item) in items {
                        if let Err(e) = item {
                            assert!(!e.message.is_empty(), "an item error says what is wrong");
                        }
                    }
                }
                Err(e) => assert!(!e.to_string().is_empty()),
            }
        }
    }
}

/// Valid bodies of every kind, as the demo workload writes them (signed once).
fn valid_json_lines() -> Vec<String> {
    static LINES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    LINES.get_or_init(|| demo(60, 5).into_iter().map(|(_, e)| event_to_json(&e).to_string()).collect()).clone()
}

fn arrow_stream(columns: Vec<(&str, ArrayRef)>) -> Vec<u8> {
    let schema = Arc::new(Schema::new(columns.iter().map(|(n, a)| Field::new(*n, a.data_type().clone(), true)).collect::<Vec<_>>()));
    let batch = RecordBatch::try_new(schema.clone(), columns.into_iter().map(|(_, a)| a).collect()).unwrap();
    let mut out = Vec::new();
    let mut writer = arrow::ipc::writer::StreamWriter::try_new(&mut out, &schema).unwrap();
    writer.write(&batch).unwrap();
    writer.finish().unwrap();
    drop(writer);
    out
}

fn valid_arrow() -> Vec<u8> {
    let s = |v: &str| Arc::new(StringArray::from(vec![v])) as ArrayRef;
    arrow_stream(vec![
        ("kind", s("fee.charged")),
        ("event_id", s("f1")),
        ("event_time", s("2026-11-24T10:00:00Z")),
        ("inference_id", s("i1")),
        ("model_id", s("m1")),
        ("payer", s("key_1")),
        ("amount", s("1000")),
    ])
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        "[ -~]{0,40}".prop_map(Value::String),
        prop_oneof![Just("fee.charged"), Just("datanet.created"), Just("contribution.submitted"), Just("model.registered")]
            .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("kind".to_owned()),
                    Just("event_id".to_owned()),
                    Just("amount".to_owned()),
                    Just("event_time".to_owned()),
                    Just("datanet_id".to_owned()),
                    Just("signature".to_owned()),
                    "[a-z_]{1,12}"
                ],
                inner,
                0..8
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
        decode_all(&body);
    }

    #[test]
    fn arbitrary_json_never_panics(values in prop::collection::vec(json_value(), 0..6)) {
        decode_all(&serde_json::to_vec(&values).unwrap());
        let ndjson: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        decode_all(ndjson.join("\n").as_bytes());
    }

    /// Valid events with one field replaced by any JSON value.
    #[test]
    fn valid_events_with_a_field_replaced_never_panic(line in 0usize..60, field in 0usize..16, value in json_value()) {
        let lines = valid_json_lines();
        let mut event: serde_json::Map<String, Value> = serde_json::from_str(&lines[line % lines.len()]).unwrap();
        let key = event.keys().nth(field % event.len()).unwrap().clone();
        event.insert(key, value);
        decode_all(Value::Object(event).to_string().as_bytes());
    }

    #[test]
    fn valid_bodies_with_bytes_changed_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        for mut body in [valid_json_lines().join("\n").into_bytes(), valid_arrow()] {
            for (at, byte) in &edits {
                let i = at.index(body.len());
                body[i] = *byte;
            }
            decode_all(&body);
            decode_all(&body[..cut.index(body.len() + 1)]);
        }
    }

    /// Prices up to the limit are accepted; one base unit more is refused, naming the field.
    #[test]
    fn registration_prices_are_accepted_exactly_up_to_the_limit(price in 0..=MAX_PRICE_PER_1K) {
        let event = |p: u128| json!([{"kind": "model.registered", "event_id": "r1", "event_time": "2026-11-24T10:00:00Z",
            "model_id": "m1", "builder": "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed", "base_model": "b", "adapter_uri": "a",
            "price_per_1k_input": p.to_string(), "price_per_1k_output": "1"}]);
        let ok = parse_body(BodyFormat::JsonArray, event(price).to_string().as_bytes(), None).unwrap();
        prop_assert!(ok[0].1.is_ok());
        let over = parse_body(BodyFormat::JsonArray, event(MAX_PRICE_PER_1K + 1 + price % 1000).to_string().as_bytes(), None).unwrap();
        let e = over[0].1.as_ref().unwrap_err();
        prop_assert_eq!(e.field.as_str(), "price_per_1k_input");
    }
}

#[test]
fn an_inference_longer_than_the_fee_rule_allows_is_refused() {
    let event = |prompt: u64, completion: u64| {
        json!([{"kind": "inference.completed", "event_id": "i1", "event_time": "2026-11-24T10:00:00Z", "inference_id": "i1",
                "model_id": "m1", "caller": "k", "prompt_tokens": prompt, "completion_tokens": completion,
                "output_sha256": "0".repeat(64), "latency_ms": 1}])
    };
    let parse = |v: Value| parse_body(BodyFormat::JsonArray, v.to_string().as_bytes(), None).unwrap().remove(0).1;
    assert!(parse(event(MAX_INFERENCE_TOKENS - 1, 1)).is_ok());
    let e = parse(event(MAX_INFERENCE_TOKENS, 1)).unwrap_err();
    assert_eq!(e.field, "completion_tokens");
    assert!(e.message.contains("16777217 tokens"), "{}", e.message);
}

#[test]
fn arrow_streams_with_wrong_column_types_are_item_errors() {
    // A `kind` column of integers, and an amount column of floats.
    let body = arrow_stream(vec![("kind", Arc::new(arrow::array::Int64Array::from(vec![1])) as ArrayRef)]);
    decode_all(&body);
    let body = arrow_stream(vec![
        ("kind", Arc::new(StringArray::from(vec!["fee.charged"])) as ArrayRef),
        ("amount", Arc::new(arrow::array::Float64Array::from(vec![1.5])) as ArrayRef),
    ]);
    let items = parse_body(BodyFormat::ArrowStream, &body, None);
    assert!(matches!(&items, Ok(items) if items.iter().all(|(_, i)| i.is_err())) || items.is_err());
}
