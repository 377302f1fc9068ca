//! Reading a status answer through the configured pointers: the contract
//! state, progress, texts and when it changed. Pure: no I/O, no clock.

use super::spec::FieldsSpec;
use crate::backend::time::rfc3339_ms;
use app::protocol::TaskState;
use serde_json::Value;
use std::collections::HashMap;

/// A status as read from the answer; `changed_at_ms` is None when the
/// answer does not say (the caller stamps it).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Read {
    pub state: TaskState,
    pub done: u64,
    pub total: Option<u64>,
    pub message: Option<String>,
    pub result: Option<Value>,
    pub error: Option<String>,
    pub changed_at_ms: Option<u64>,
}

/// The value at an optional pointer; JSON `null` counts as absent.
fn at<'b, 'p>(body: &'b Value, pointer: &'p Option<String>) -> Option<(&'p str, &'b Value)> {
    let p = pointer.as_deref()?;
    body.pointer(p).filter(|v| !v.is_null()).map(|v| (p, v))
}

/// Whether the answer carries a state at all (a cancel answer may not).
pub(crate) fn has_state(fields: &FieldsSpec, body: &Value) -> bool {
    at(body, &fields.state).is_some() || at(body, &fields.done_flag).is_some()
}

pub(crate) fn read(
    fields: &FieldsSpec,
    states: &HashMap<String, TaskState>,
    body: &Value,
) -> Result<Read, String> {
    let mapped = match at(body, &fields.state) {
        Some((pointer, value)) => Some(map_state(states, pointer, value)?),
        None if fields.done_flag.is_none() => {
            let pointer = fields.state.as_deref().unwrap_or_default();
            return Err(format!("no state at `{pointer}` in the status answer"));
        }
        None => None,
    };
    let error = at(body, &fields.error).map(|(_, v)| error_text(v));
    let finished = at(body, &fields.done_flag)
        .map(|(pointer, value)| {
            value
                .as_bool()
                .ok_or_else(|| format!("`{pointer}` should be true or false, got {}", short(value)))
        })
        .transpose()?;
    // Without done_flag, `mapped` is always Some (checked above); with it,
    // an absent flag is false (AIP-151: proto3 JSON leaves `done: false` out).
    let state = match (mapped, finished) {
        (Some(s), Some(true)) if s.is_final() => s,
        (Some(s), None | Some(false)) => s,
        (_, Some(true)) if error.is_some() => TaskState::Failed,
        (_, Some(true)) => TaskState::Succeeded,
        (None, None | Some(false)) => TaskState::Running,
    };

    let (done, total) = match at(body, &fields.percent) {
        Some((pointer, value)) => {
            let pct = number(value)
                .filter(|p| (0.0..=100.0).contains(p))
                .ok_or_else(|| {
                    format!(
                        "`{pointer}` should be a percent from 0 to 100, got {}",
                        short(value)
                    )
                })?;
            (pct.round() as u64, Some(100))
        }
        None => (
            at(body, &fields.done)
                .map(|(p, v)| count(p, v))
                .transpose()?
                .unwrap_or(0),
            at(body, &fields.total)
                .map(|(p, v)| count(p, v))
                .transpose()?,
        ),
    };

    let changed_at_ms = at(body, &fields.changed_at)
        .map(|(pointer, value)| {
            timestamp_ms(value).ok_or_else(|| {
                format!(
                    "`{pointer}` should be an RFC 3339 time or Unix epoch ms, got {}",
                    short(value)
                )
            })
        })
        .transpose()?;

    Ok(Read {
        state,
        done,
        total,
        message: at(body, &fields.message).map(|(_, v)| text(v)),
        result: (state == TaskState::Succeeded)
            .then(|| at(body, &fields.result).map(|(_, v)| v.clone()))
            .flatten(),
        error: error.filter(|_| state == TaskState::Failed),
        changed_at_ms,
    })
}

fn map_state(
    states: &HashMap<String, TaskState>,
    pointer: &str,
    value: &Value,
) -> Result<TaskState, String> {
    let key = match value {
        Value::String(s) => s.clone(),
        Value::Number(_) | Value::Bool(_) => value.to_string(),
        _ => {
            return Err(format!(
                "the state at `{pointer}` is not a string: {}",
                short(value)
            ))
        }
    };
    let found = if states.is_empty() {
        TaskState::ALL.into_iter().find(|s| s.as_str() == key)
    } else {
        states.get(&key).copied()
    };
    found.ok_or_else(|| {
        let mut known: Vec<&str> = states.keys().map(String::as_str).collect();
        known.sort_unstable();
        if known.is_empty() {
            known = TaskState::ALL.map(|s| s.as_str()).to_vec();
        }
        format!(
            "unknown state `{}` at `{pointer}` (backend.states maps: {})",
            short_str(&key),
            known.join(", ")
        )
    })
}

/// A non-negative integer, as a JSON number or a numeric string (Google
/// APIs send int64 as strings).
fn count(pointer: &str, value: &Value) -> Result<u64, String> {
    let n = match value {
        Value::Number(n) => n.as_u64().or_else(|| integral(n.as_f64()?)),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    n.ok_or_else(|| {
        format!(
            "`{pointer}` should be a non-negative integer, got {}",
            short(value)
        )
    })
}

fn integral(f: f64) -> Option<u64> {
    (f >= 0.0 && f.fract() == 0.0 && f < u64::MAX as f64).then_some(f as u64)
}

fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|f| f.is_finite()),
        _ => None,
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// An error is a string, or an object whose `message` is the text (AIP-193
/// `{code, message}`), or else shown as JSON.
fn error_text(value: &Value) -> String {
    match value.get("message").and_then(Value::as_str) {
        Some(m) => m.to_string(),
        None => text(value),
    }
}

/// A value as shown in an error message, cut short.
fn short(value: &Value) -> String {
    short_str(&value.to_string())
}

fn short_str(s: &str) -> String {
    const MAX_CHARS: usize = 80;
    if s.chars().count() <= MAX_CHARS {
        s.to_string()
    } else {
        s.chars().take(MAX_CHARS).chain("…".chars()).collect()
    }
}

/// Unix epoch ms from a number (or numeric string) of ms, or an RFC 3339
/// string.
pub(crate) fn timestamp_ms(value: &Value) -> Option<u64> {
    match value {
        Value::Number(n) => n.as_u64().or_else(|| {
            let f = n.as_f64()?;
            (f >= 0.0 && f < u64::MAX as f64).then_some(f as u64)
        }),
        Value::String(s) => s
            .trim()
            .parse::<u64>()
            .ok()
            .or_else(|| rfc3339_ms(s.trim())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn jobs_fields() -> FieldsSpec {
        let s = |v: &str| Some(v.to_string());
        FieldsSpec {
            state: s("/metadata/state"),
            done: s("/metadata/done"),
            total: s("/metadata/total"),
            message: s("/metadata/message"),
            result: s("/response"),
            error: s("/error/message"),
            changed_at: s("/metadata/update_time"),
            ..FieldsSpec::default()
        }
    }

    fn states() -> HashMap<String, TaskState> {
        [
            ("PENDING", TaskState::Queued),
            ("RUNNING", TaskState::Running),
            ("SUCCEEDED", TaskState::Succeeded),
            ("FAILED", TaskState::Failed),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    #[test]
    fn a_full_answer_reads_every_field() {
        let body = json!({"metadata": {"state": "RUNNING", "done": "4", "total": 10,
            "message": "step 4", "update_time": "2025-11-29T07:06:42.5+01:00"}});
        let r = read(&jobs_fields(), &states(), &body).unwrap();
        assert_eq!(
            r,
            Read {
                state: TaskState::Running,
                done: 4,
                total: Some(10),
                message: Some("step 4".into()),
                result: None,
                error: None,
                changed_at_ms: Some(rfc3339_ms("2025-11-29T06:06:42.500Z").unwrap()),
            }
        );
    }

    #[test]
    fn absent_and_null_optional_fields_are_none() {
        let body = json!({"metadata": {"state": "SUCCEEDED", "total": null}});
        let r = read(&jobs_fields(), &states(), &body).unwrap();
        assert_eq!(
            (r.done, r.total, r.message, r.result, r.changed_at_ms),
            (0, None, None, None, None)
        );
    }

    #[test]
    fn out_of_contract_answers_name_the_pointer_or_value() {
        let f = jobs_fields();
        let cases = [
            (json!({"metadata": {}}), "no state at `/metadata/state`"),
            (json!([1]), "no state at `/metadata/state`"),
            (json!({"metadata": {"state": "PAUSED"}}), "unknown state `PAUSED` at `/metadata/state` (backend.states maps: FAILED, PENDING, RUNNING, SUCCEEDED)"),
            (json!({"metadata": {"state": {"x": 1}}}), "the state at `/metadata/state` is not a string"),
            (json!({"metadata": {"state": "RUNNING", "done": -1}}), "`/metadata/done` should be a non-negative integer, got -1"),
            (json!({"metadata": {"state": "RUNNING", "done": 1.5}}), "`/metadata/done` should be a non-negative integer"),
            (json!({"metadata": {"state": "RUNNING", "total": "ten"}}), "`/metadata/total` should be a non-negative integer, got \"ten\""),
            (json!({"metadata": {"state": "RUNNING", "update_time": "yesterday"}}), "`/metadata/update_time` should be an RFC 3339 time"),
        ];
        for (body, expected) in cases {
            let e = read(&f, &states(), &body).unwrap_err();
            assert!(e.starts_with(expected), "{expected} vs {e}");
        }
    }

    #[test]
    fn result_and_error_belong_to_their_final_state() {
        let f = jobs_fields();
        let body = json!({"metadata": {"state": "FAILED"}, "error": {"message": "disk full"}, "response": 1});
        let r = read(&f, &states(), &body).unwrap();
        assert_eq!((r.error.as_deref(), r.result), (Some("disk full"), None));
        let body = json!({"metadata": {"state": "SUCCEEDED"}, "response": {"rows": 3}});
        let r = read(&f, &states(), &body).unwrap();
        assert_eq!(r.result, Some(json!({"rows": 3})));
        assert_eq!(error_text(&json!({"code": 3})), "{\"code\":3}");
    }

    #[test]
    fn a_done_flag_decides_finished() {
        let s = |v: &str| Some(v.to_string());
        let f = FieldsSpec {
            done_flag: s("/done"),
            percent: s("/metadata/progressPercent"),
            result: s("/response"),
            error: s("/error"),
            ..FieldsSpec::default()
        };
        let none = HashMap::new();
        let r = read(&f, &none, &json!({"name": "operations/1"})).unwrap();
        assert_eq!((r.state, r.done, r.total), (TaskState::Running, 0, None));
        let r = read(
            &f,
            &none,
            &json!({"done": false, "metadata": {"progressPercent": 42.6}}),
        )
        .unwrap();
        assert_eq!(
            (r.state, r.done, r.total),
            (TaskState::Running, 43, Some(100))
        );
        let r = read(&f, &none, &json!({"done": true, "response": {"ok": 1}})).unwrap();
        assert_eq!(
            (r.state, r.result),
            (TaskState::Succeeded, Some(json!({"ok": 1})))
        );
        let r = read(
            &f,
            &none,
            &json!({"done": true, "error": {"code": 3, "message": "bad input"}}),
        )
        .unwrap();
        assert_eq!(
            (r.state, r.error.as_deref()),
            (TaskState::Failed, Some("bad input"))
        );
        let e = read(&f, &none, &json!({"done": "yes"})).unwrap_err();
        assert!(e.starts_with("`/done` should be true or false"), "{e}");
        let e = read(&f, &none, &json!({"metadata": {"progressPercent": 101}})).unwrap_err();
        assert!(
            e.starts_with("`/metadata/progressPercent` should be a percent"),
            "{e}"
        );

        // A mapped state refines it: a final one wins, a live one holds while not done.
        let f = FieldsSpec {
            state: s("/metadata/state"),
            ..f
        };
        let map: HashMap<_, _> = [
            ("CANCELLED".to_string(), TaskState::Cancelled),
            ("QUEUED".to_string(), TaskState::Queued),
        ]
        .into();
        let r = read(
            &f,
            &map,
            &json!({"done": true, "error": {"code": 1}, "metadata": {"state": "CANCELLED"}}),
        )
        .unwrap();
        assert_eq!(r.state, TaskState::Cancelled);
        let r = read(&f, &map, &json!({"metadata": {"state": "QUEUED"}})).unwrap();
        assert_eq!(r.state, TaskState::Queued);
        let r = read(
            &f,
            &map,
            &json!({"done": true, "metadata": {"state": "QUEUED"}}),
        )
        .unwrap();
        assert_eq!(r.state, TaskState::Succeeded);
    }

    #[test]
    fn without_a_states_map_values_are_contract_states() {
        let f = FieldsSpec {
            state: Some("/state".into()),
            ..FieldsSpec::default()
        };
        let r = read(&f, &HashMap::new(), &json!({"state": "cancelled"})).unwrap();
        assert_eq!(r.state, TaskState::Cancelled);
        assert!(read(&f, &HashMap::new(), &json!({"state": "RUNNING"})).is_err());
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(rfc3339_ms("2025-11-29T06:06:42Z"), Some(1_764_396_402_000));
        assert_eq!(
            rfc3339_ms("2025-11-29T07:06:42.123456789+01:00"),
            Some(1_764_396_402_123)
        );
        assert_eq!(
            rfc3339_ms("2025-11-29t01:06:42.1-05:00"),
            Some(1_764_396_402_100)
        );
        assert_eq!(rfc3339_ms("2024-02-29 00:00:00z"), Some(1_709_164_800_000));
        for bad in [
            "2025-02-29T00:00:00Z",
            "2025-11-29T06:06:42",
            "2025-11-29",
            "1969-12-31T23:59:59Z",
            "2025-11-29T06:06:42.Z",
            "2025-13-01T00:00:00Z",
            "2025-11-29T06:06:42+0100",
        ] {
            assert_eq!(rfc3339_ms(bad), None, "{bad}");
        }
        assert_eq!(
            timestamp_ms(&json!(1_764_396_402_000u64)),
            Some(1_764_396_402_000)
        );
        assert_eq!(
            timestamp_ms(&json!("1764396402000")),
            Some(1_764_396_402_000)
        );
        assert_eq!(timestamp_ms(&json!(-5)), None);
        assert_eq!(timestamp_ms(&json!(true)), None);
    }
}
