//! The embedded adapter: the simulator in this process, its answers turned
//! into the same [`BackendError`]s the HTTP adapter gives.

use super::{BackendError, Status};
use crate::sim::{SimError, Simulator};
use app::protocol::ErrorCode;

pub(super) fn start(
    sim: &Simulator,
    kind: &str,
    params: &serde_json::Value,
    now_ms: u64,
) -> Result<String, BackendError> {
    sim.start(kind, params, now_ms).map_err(|e| match e {
        SimError::UnknownKind(_) => BackendError::Rejected {
            code: ErrorCode::UnknownKind,
            message: e.to_string(),
        },
        SimError::InvalidParams(_) => BackendError::Rejected {
            code: ErrorCode::InvalidParams,
            message: e.to_string(),
        },
        SimError::Full => BackendError::unavailable("full", e.to_string()),
    })
}

pub(super) fn status(sim: &Simulator, id: &str, now_ms: u64) -> Result<Status, BackendError> {
    sim.status(id, now_ms).ok_or(BackendError::NotFound)
}

pub(super) fn cancel(sim: &Simulator, id: &str, now_ms: u64) -> Result<Status, BackendError> {
    sim.cancel(id, now_ms).ok_or(BackendError::NotFound)
}
