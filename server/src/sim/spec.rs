//! What a `simulate` task is: its params, validated as the contract states,
//! and the pure arithmetic of where it stands at an instant.

use app::protocol::TaskState;
use serde_json::{Map, Value};

/// The one kind the simulator knows.
pub const KIND_SIMULATE: &str = "simulate";
/// Longest `duration_ms` a `simulate` task may ask for (one day).
pub const MAX_DURATION_MS: u64 = 86_400_000;
/// Most `steps` a `simulate` task may ask for.
pub const MAX_STEPS: u64 = 1_000_000_000;

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
