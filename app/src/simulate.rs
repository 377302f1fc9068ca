//! The simulator's task kind as both ends know it: its name and the bounds
//! of its params, written once. The page checks its form against them; the
//! server's simulator (`server/src/sim/spec.rs`) enforces them.

use crate::kinds::ParamsError;
use serde_json::Value;

/// The one kind the simulator runs.
pub const KIND_SIMULATE: &str = "simulate";
/// The longest `duration_ms` the simulator takes (one day).
pub const MAX_DURATION_MS: u64 = 86_400_000;
/// The most `steps` the simulator takes.
pub const MAX_STEPS: u64 = 1_000_000_000;

/// What the `simulate` schema ([`crate::kinds::simulate_kind`]) cannot say:
/// `fail_at` is a step, so at most `steps`. The page checks it on top of
/// the schema before sending.
pub fn simulate_rules(params: &Value) -> Result<(), ParamsError> {
    let get = |k: &str| params.get(k).and_then(Value::as_u64);
    match (get("fail_at"), get("steps")) {
        (Some(f), Some(steps)) if f > steps => Err(ParamsError {
            field: Some("fail_at".into()),
            message: "fail at must be empty or a step from 0 to steps".into(),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::simulate_kind;
    use serde_json::json;

    fn check(p: Value) -> Result<(), Option<String>> {
        let schema = simulate_kind().params.unwrap();
        schema
            .check(&p)
            .and_then(|_| simulate_rules(&p))
            .map_err(|e| e.field)
    }

    #[test]
    fn form_params_are_checked_before_sending() {
        assert!(check(json!({"duration_ms": 1000, "steps": 10})).is_ok());
        assert!(check(json!({"duration_ms": 1000, "steps": 10, "fail_at": 5})).is_ok());
        assert!(check(json!({"duration_ms": 1000, "steps": 10, "fail_at": 10})).is_ok());
        let field = |p| check(p).unwrap_err();
        assert_eq!(
            field(json!({"duration_ms": 0, "steps": 10})).as_deref(),
            Some("duration_ms")
        );
        assert_eq!(
            field(json!({"duration_ms": 1000, "steps": "x"})).as_deref(),
            Some("steps")
        );
        assert_eq!(
            field(json!({"duration_ms": 1000, "steps": 10, "fail_at": 11})).as_deref(),
            Some("fail_at")
        );
    }

    #[test]
    fn the_bounds_are_inclusive() {
        assert!(check(json!({"duration_ms": MAX_DURATION_MS, "steps": 1})).is_ok());
        assert!(check(json!({"duration_ms": MAX_DURATION_MS + 1, "steps": 1})).is_err());
        assert!(check(json!({"duration_ms": 1, "steps": MAX_STEPS})).is_ok());
        assert!(check(json!({"duration_ms": 1, "steps": MAX_STEPS + 1})).is_err());
    }
}
