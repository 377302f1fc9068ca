//! The task-service API's JSON bodies (docs/protocol.md, "The task-service
//! API"), shared by the simulator that serves them and every adapter.

use app::protocol::TaskState;
use serde::{Deserialize, Serialize};

/// `POST /tasks` request body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StartRequest {
    pub kind: String,
    #[serde(default)]
    pub params: serde_json::Value,
}

/// `201` answer to `POST /tasks`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StartResponse {
    pub id: String,
}

/// `400` answer to `POST /tasks`: `code` is `unknown_kind` or `invalid_params`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RejectBody {
    pub code: RejectCode,
    pub error: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectCode {
    UnknownKind,
    InvalidParams,
}

/// A task's status as the task service reports it (`GET`/`DELETE /tasks/{id}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub id: String,
    pub state: TaskState,
    pub done: u64,
    pub total: Option<u64>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub result: Option<serde_json::Value>,
    #[serde(default)]
    pub error: Option<String>,
    /// When the current state (including `done`) began, Unix epoch ms.
    pub changed_at_ms: u64,
}
