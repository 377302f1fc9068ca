//! The simulator's task kind as both ends know it: its name and the bounds
//! of its params, written once. The page checks its form against them; the
//! server's simulator (`server/src/sim/spec.rs`) enforces them.

use crate::page::FormError;

/// The one kind the simulator runs.
pub const KIND_SIMULATE: &str = "simulate";
/// The longest `duration_ms` the simulator takes (one day).
pub const MAX_DURATION_MS: u64 = 86_400_000;
/// The most `steps` the simulator takes.
pub const MAX_STEPS: u64 = 1_000_000_000;

/// The `simulate` params the form describes, or what is wrong with them.
pub fn simulate_params(
    duration_ms: &str,
    steps: &str,
    fail_at: &str,
) -> Result<serde_json::Value, FormError> {
    let err = |field, text: &str| FormError {
        field: Some(field),
        text: text.to_string(),
    };
    let duration_ms: u64 = duration_ms
        .trim()
        .parse()
        .ok()
        .filter(|d| (1..=MAX_DURATION_MS).contains(d))
        .ok_or_else(|| {
            err(
                "duration_ms",
                &format!("duration must be a whole number of milliseconds, 1 to {MAX_DURATION_MS}"),
            )
        })?;
    let steps: u64 = steps
        .trim()
        .parse()
        .ok()
        .filter(|s| (1..=MAX_STEPS).contains(s))
        .ok_or_else(|| {
            err(
                "steps",
                &format!("steps must be a whole number, 1 to {MAX_STEPS}"),
            )
        })?;
    let fail_at = match fail_at.trim() {
        "" => None,
        f => Some(
            f.parse::<u64>()
                .ok()
                .filter(|f| *f <= steps)
                .ok_or_else(|| err("fail_at", "fail at must be empty or a step from 0 to steps"))?,
        ),
    };
    Ok(serde_json::json!({ "duration_ms": duration_ms, "steps": steps, "fail_at": fail_at }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_params_are_checked_before_sending() {
        assert_eq!(
            simulate_params("1000", "10", "").unwrap(),
            serde_json::json!({"duration_ms": 1000, "steps": 10, "fail_at": null})
        );
        assert_eq!(simulate_params("1000", "10", "5").unwrap()["fail_at"], 5);
        assert_eq!(
            simulate_params("0", "10", "").unwrap_err().field,
            Some("duration_ms")
        );
        assert_eq!(
            simulate_params("1000", "x", "").unwrap_err().field,
            Some("steps")
        );
        assert_eq!(
            simulate_params("1000", "10", "11").unwrap_err().field,
            Some("fail_at")
        );
    }

    #[test]
    fn the_bounds_are_inclusive() {
        let max = MAX_DURATION_MS.to_string();
        assert!(simulate_params(&max, "1", "").is_ok());
        let over = (MAX_DURATION_MS + 1).to_string();
        assert!(simulate_params(&over, "1", "").is_err());
        assert!(simulate_params("1", &MAX_STEPS.to_string(), "").is_ok());
        assert!(simulate_params("1", &(MAX_STEPS + 1).to_string(), "").is_err());
    }
}
