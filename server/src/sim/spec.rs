//! What a `simulate` task is: its params, validated as the contract states,
//! and the pure arithmetic of where it stands at an instant.

use app::protocol::TaskState;
use serde_json::{Map, Value};

/// The kind and its bounds, written once in `app` (the page checks its form
/// against the same numbers).
pub use app::simulate::{KIND_SIMULATE, MAX_DURATION_MS, MAX_STEPS};

/// Why a task could not be started.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    #[error("unknown kind `{0}`: the simulator knows only `simulate`")]
    UnknownKind(String),
    #[error("invalid params: {0}")]
    InvalidParams(String),
    #[error("the simulator holds as many tasks as it may; retry later")]
    Full,
}

/// The validated params of a `simulate` task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimSpec {
    pub duration_ms: u64,
    pub steps: u64,
    pub fail_at: Option<u64>,
}

impl SimSpec {
    /// Validates `simulate` params exactly as the contract states: an object
    /// with `duration_ms` and `steps` (integers in range) and an optional
    /// `fail_at` (integer in `0..=steps`, or null); nothing else.
    pub fn from_params(params: &Value) -> Result<SimSpec, SimError> {
        let Value::Object(map) = params else {
            return Err(invalid(format!(
                "`params` must be a JSON object, got {}",
                describe(params)
            )));
        };
        if let Some(key) = map
            .keys()
            .find(|k| !matches!(k.as_str(), "duration_ms" | "steps" | "fail_at"))
        {
            return Err(invalid(format!(
                "unknown key `{key}` (allowed: `duration_ms`, `steps`, `fail_at`)"
            )));
        }
        let duration_ms = required(map, "duration_ms", MAX_DURATION_MS)?;
        let steps = required(map, "steps", MAX_STEPS)?;
        let fail_at = match map.get("fail_at") {
            None | Some(Value::Null) => None,
            Some(value) => match value.as_u64() {
                Some(n) if n <= steps => Some(n),
                _ => {
                    return Err(invalid(format!(
                        "`fail_at` must be null or an integer from 0 to `steps` ({steps}), got {}",
                        describe(value)
                    )))
                }
            },
        };
        Ok(SimSpec {
            duration_ms,
            steps,
            fail_at,
        })
    }

    /// `done` after `elapsed_ms`: `floor(steps * elapsed / duration)`, capped.
    pub(crate) fn done_after(&self, elapsed_ms: u64) -> u64 {
        let done = u128::from(self.steps) * u128::from(elapsed_ms) / u128::from(self.duration_ms);
        // Capped at `steps`, so it fits in a u64.
        done.min(u128::from(self.steps)) as u64
    }

    /// The first ms after the start at which `done` is reached:
    /// `ceil(done * duration / steps)`. At most `duration_ms` for `done <= steps`.
    fn first_ms_of(&self, done: u64) -> u64 {
        let steps = u128::from(self.steps);
        let ms = (u128::from(done) * u128::from(self.duration_ms)).div_ceil(steps);
        ms as u64
    }

    /// Ms after the start at which the task finishes by itself (fails or succeeds).
    pub fn natural_end_ms(&self) -> u64 {
        match self.fail_at {
            Some(fail_at) => self.first_ms_of(fail_at).min(self.duration_ms),
            None => self.duration_ms,
        }
    }
}

fn invalid(message: impl Into<String>) -> SimError {
    SimError::InvalidParams(message.into())
}

fn required(map: &Map<String, Value>, field: &str, max: u64) -> Result<u64, SimError> {
    let Some(value) = map.get(field) else {
        return Err(invalid(format!(
            "missing `{field}` (an integer from 1 to {max})"
        )));
    };
    match value.as_u64() {
        Some(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(invalid(format!(
            "`{field}` must be an integer from 1 to {max}, got {}",
            describe(value)
        ))),
    }
}

/// A short description of a rejected value: numbers as written, anything
/// else by its type, so an error message never echoes a huge body.
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(_) => "a string".into(),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// Where a task stands at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    pub state: TaskState,
    pub done: u64,
    /// When this state (including `done`) began, epoch ms.
    pub changed_at_ms: u64,
}

/// The contract's arithmetic, pure: where a task started at `start_ms` stands
/// at `now_ms`. A `now_ms` before the start counts as the start.
///
/// With `fail_at` set the task fails at the first ms at which
/// `done >= fail_at`, keeping the `done` it had then (more than `fail_at`
/// when `steps > duration_ms`); failure wins over success when
/// `fail_at == steps`.
pub fn progress_at(spec: &SimSpec, start_ms: u64, now_ms: u64) -> Progress {
    let elapsed_ms = now_ms.saturating_sub(start_ms);
    let at = |done: u64| start_ms.saturating_add(spec.first_ms_of(done));
    if let Some(fail_at) = spec.fail_at {
        let fail_ms = spec.first_ms_of(fail_at);
        if elapsed_ms >= fail_ms {
            let done = spec.done_after(fail_ms);
            return Progress {
                state: TaskState::Failed,
                done,
                changed_at_ms: at(done),
            };
        }
    }
    let done = spec.done_after(elapsed_ms);
    let state = if done == spec.steps {
        TaskState::Succeeded
    } else {
        TaskState::Running
    };
    Progress {
        state,
        done,
        changed_at_ms: at(done),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) const T0: u64 = 1_700_000_000_000;

    pub(crate) fn spec(duration_ms: u64, steps: u64, fail_at: Option<u64>) -> SimSpec {
        SimSpec {
            duration_ms,
            steps,
            fail_at,
        }
    }

    pub(crate) fn at(spec: &SimSpec, elapsed_ms: u64) -> (TaskState, u64, u64) {
        let p = progress_at(spec, T0, T0 + elapsed_ms);
        (p.state, p.done, p.changed_at_ms - T0)
    }

    use TaskState::{Failed, Running, Succeeded};

    pub(crate) fn params(duration_ms: u64, steps: u64) -> Value {
        json!({ "duration_ms": duration_ms, "steps": steps })
    }

    pub(crate) fn invalid_message(params: Value) -> String {
        match SimSpec::from_params(&params) {
            Err(SimError::InvalidParams(m)) => m,
            other => panic!("expected invalid params for {params}, got {other:?}"),
        }
    }

    // ---- arithmetic ----

    #[test]
    fn progress_steps_divide_duration() {
        let s = spec(1000, 10, None);
        assert_eq!(at(&s, 0), (Running, 0, 0));
        assert_eq!(at(&s, 99), (Running, 0, 0));
        assert_eq!(at(&s, 100), (Running, 1, 100)); // exact step boundary
        assert_eq!(at(&s, 150), (Running, 1, 100)); // mid-step
        assert_eq!(at(&s, 500), (Running, 5, 500));
        assert_eq!(at(&s, 999), (Running, 9, 900));
        assert_eq!(at(&s, 1000), (Succeeded, 10, 1000)); // end
        assert_eq!(at(&s, 1001), (Succeeded, 10, 1000)); // after end
        assert_eq!(at(&s, 10_000_000), (Succeeded, 10, 1000));
    }

    #[test]
    fn progress_fewer_steps_than_ms_rounds_changed_at_up() {
        let s = spec(1000, 3, None);
        assert_eq!(at(&s, 333), (Running, 0, 0));
        // 1 step needs 333.33 ms: first reached at ms 334.
        assert_eq!(at(&s, 334), (Running, 1, 334));
        assert_eq!(at(&s, 666), (Running, 1, 334));
        assert_eq!(at(&s, 667), (Running, 2, 667));
        assert_eq!(at(&s, 999), (Running, 2, 667));
        assert_eq!(at(&s, 1000), (Succeeded, 3, 1000));
    }

    #[test]
    fn progress_more_steps_than_ms_jumps() {
        let s = spec(10, 25, None);
        assert_eq!(at(&s, 0), (Running, 0, 0));
        assert_eq!(at(&s, 1), (Running, 2, 1));
        assert_eq!(at(&s, 2), (Running, 5, 2));
        assert_eq!(at(&s, 3), (Running, 7, 3));
        assert_eq!(at(&s, 9), (Running, 22, 9));
        assert_eq!(at(&s, 10), (Succeeded, 25, 10));
    }

    #[test]
    fn progress_single_step_and_single_ms() {
        assert_eq!(at(&spec(1, 1, None), 0), (Running, 0, 0));
        assert_eq!(at(&spec(1, 1, None), 1), (Succeeded, 1, 1));
        assert_eq!(at(&spec(1, MAX_STEPS, None), 0), (Running, 0, 0));
        assert_eq!(at(&spec(1, MAX_STEPS, None), 1), (Succeeded, MAX_STEPS, 1));
    }

    #[test]
    fn progress_before_start_counts_as_start() {
        let s = spec(1000, 10, None);
        let p = progress_at(&s, T0, T0 - 5000);
        assert_eq!(
            p,
            Progress {
                state: Running,
                done: 0,
                changed_at_ms: T0
            }
        );
        let f = spec(1000, 10, Some(0));
        let p = progress_at(&f, T0, 0);
        assert_eq!(
            p,
            Progress {
                state: Failed,
                done: 0,
                changed_at_ms: T0
            }
        );
    }

    #[test]
    fn progress_extremes_do_not_overflow() {
        let s = spec(MAX_DURATION_MS, MAX_STEPS, None);
        assert_eq!(
            at(&s, MAX_DURATION_MS / 2),
            (Running, MAX_STEPS / 2, MAX_DURATION_MS / 2)
        );
        let p = progress_at(&s, 0, u64::MAX);
        assert_eq!(
            p,
            Progress {
                state: Succeeded,
                done: MAX_STEPS,
                changed_at_ms: MAX_DURATION_MS
            }
        );
        // 10 ms before the end of time: 115 steps, first reached at ceil(9.936) = 10 ms.
        let p = progress_at(&s, u64::MAX - 10, u64::MAX);
        assert_eq!(
            p,
            Progress {
                state: Running,
                done: 115,
                changed_at_ms: u64::MAX
            }
        );
        // The end would lie past u64::MAX: it saturates instead of wrapping.
        let p = progress_at(&spec(1000, 1, Some(1)), u64::MAX - 10, u64::MAX);
        assert_eq!(
            p,
            Progress {
                state: Running,
                done: 0,
                changed_at_ms: u64::MAX - 10
            }
        );
        assert_eq!(spec(1000, 1, None).done_after(u64::MAX), 1);
    }

    #[test]
    fn fail_at_zero_fails_at_once() {
        let s = spec(1000, 10, Some(0));
        assert_eq!(at(&s, 0), (Failed, 0, 0));
        assert_eq!(at(&s, 5000), (Failed, 0, 0));
    }

    #[test]
    fn fail_at_mid_run_keeps_done() {
        let s = spec(1000, 10, Some(4));
        assert_eq!(at(&s, 0), (Running, 0, 0));
        assert_eq!(at(&s, 399), (Running, 3, 300));
        assert_eq!(at(&s, 400), (Failed, 4, 400));
        assert_eq!(at(&s, 401), (Failed, 4, 400));
        assert_eq!(at(&s, 1000), (Failed, 4, 400));
        assert_eq!(at(&s, 99_999), (Failed, 4, 400));
    }

    #[test]
    fn fail_at_rounds_up_like_done() {
        let s = spec(1000, 3, Some(2));
        assert_eq!(at(&s, 666), (Running, 1, 334));
        assert_eq!(at(&s, 667), (Failed, 2, 667));
    }

    #[test]
    fn fail_at_with_more_steps_than_ms_keeps_done_past_fail_at() {
        // fail_at 6 is first reached at ceil(6*10/25) = 3 ms, where done is 7.
        let s = spec(10, 25, Some(6));
        assert_eq!(at(&s, 2), (Running, 5, 2));
        assert_eq!(at(&s, 3), (Failed, 7, 3));
        assert_eq!(at(&s, 100), (Failed, 7, 3));
    }

    #[test]
    fn fail_at_steps_fails_instead_of_succeeding() {
        let s = spec(1000, 10, Some(10));
        assert_eq!(at(&s, 999), (Running, 9, 900));
        assert_eq!(at(&s, 1000), (Failed, 10, 1000));
        assert_eq!(at(&s, 2000), (Failed, 10, 1000));
    }

    #[test]
    fn natural_end() {
        assert_eq!(spec(1000, 10, None).natural_end_ms(), 1000);
        assert_eq!(spec(1000, 10, Some(4)).natural_end_ms(), 400);
        assert_eq!(spec(1000, 10, Some(10)).natural_end_ms(), 1000);
        assert_eq!(spec(1000, 10, Some(0)).natural_end_ms(), 0);
        assert_eq!(spec(10, 25, Some(6)).natural_end_ms(), 3);
    }

    // ---- the simulator ----

    #[test]
    fn params_valid() {
        assert_eq!(
            SimSpec::from_params(&params(1000, 10)),
            Ok(spec(1000, 10, None))
        );
        let p = json!({ "duration_ms": 1000, "steps": 10, "fail_at": null });
        assert_eq!(SimSpec::from_params(&p), Ok(spec(1000, 10, None)));
        for fail_at in [0, 5, 10] {
            let p = json!({ "duration_ms": 1000, "steps": 10, "fail_at": fail_at });
            assert_eq!(SimSpec::from_params(&p), Ok(spec(1000, 10, Some(fail_at))));
        }
        assert_eq!(SimSpec::from_params(&params(1, 1)), Ok(spec(1, 1, None)));
        assert_eq!(
            SimSpec::from_params(&params(MAX_DURATION_MS, MAX_STEPS)),
            Ok(spec(86_400_000, 1_000_000_000, None))
        );
    }

    #[test]
    fn params_not_an_object() {
        for p in [json!(null), json!([]), json!(5), json!("x"), json!(true)] {
            let m = invalid_message(p);
            assert!(m.contains("`params` must be a JSON object"), "{m}");
        }
    }

    #[test]
    fn params_missing_fields() {
        let m = invalid_message(json!({}));
        assert!(m.contains("missing `duration_ms`"), "{m}");
        let m = invalid_message(json!({ "duration_ms": 10 }));
        assert!(m.contains("missing `steps`"), "{m}");
        let m = invalid_message(json!({ "steps": 10 }));
        assert!(m.contains("missing `duration_ms`"), "{m}");
    }

    #[test]
    fn params_unknown_key() {
        let m = invalid_message(json!({ "duration_ms": 10, "steps": 10, "speed": 2 }));
        assert!(m.contains("unknown key `speed`"), "{m}");
        let m = invalid_message(json!({ "duration": 10, "steps": 10 }));
        assert!(m.contains("unknown key `duration`"), "{m}");
    }

    #[test]
    fn params_duration_out_of_range_or_not_integer() {
        for bad in [
            json!(0),
            json!(86_400_001),
            json!(-1),
            json!(1.5),
            json!(10.0),
            json!(1e20),
            json!("10"),
            json!(true),
            json!(null),
            json!([10]),
            json!({ "ms": 10 }),
            json!(u64::MAX),
        ] {
            let m = invalid_message(json!({ "duration_ms": bad, "steps": 10 }));
            assert!(
                m.contains("`duration_ms` must be an integer from 1 to 86400000"),
                "{bad}: {m}"
            );
        }
    }

    #[test]
    fn params_steps_out_of_range_or_not_integer() {
        for bad in [
            json!(0),
            json!(1_000_000_001),
            json!(-5),
            json!(2.5),
            json!("10"),
            json!(false),
            json!(null),
        ] {
            let m = invalid_message(json!({ "duration_ms": 10, "steps": bad }));
            assert!(
                m.contains("`steps` must be an integer from 1 to 1000000000"),
                "{bad}: {m}"
            );
        }
    }

    #[test]
    fn params_fail_at_out_of_range_or_not_integer() {
        for bad in [
            json!(11),
            json!(-1),
            json!(1.5),
            json!("3"),
            json!(true),
            json!([]),
        ] {
            let m = invalid_message(json!({ "duration_ms": 10, "steps": 10, "fail_at": bad }));
            assert!(
                m.contains("`fail_at` must be null or an integer from 0 to `steps` (10)"),
                "{bad}: {m}"
            );
        }
    }

    #[test]
    fn params_messages_show_numbers_not_bodies() {
        let m = invalid_message(json!({ "duration_ms": 1.5, "steps": 10 }));
        assert!(m.ends_with("got 1.5"), "{m}");
        let m = invalid_message(json!({ "duration_ms": "x".repeat(10_000), "steps": 10 }));
        assert!(m.ends_with("got a string"), "{m}");
    }

    #[test]
    fn error_display() {
        assert_eq!(
            SimError::UnknownKind("x".into()).to_string(),
            "unknown kind `x`: the simulator knows only `simulate`"
        );
        assert_eq!(
            SimError::InvalidParams("m".into()).to_string(),
            "invalid params: m"
        );
    }

    // ---- bounds ----
}
