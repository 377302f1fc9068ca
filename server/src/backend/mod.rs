//! Backend adapters: how taskwire talks to the task service (contract
//! section 2). Two implementations behind one enum, chosen at start-up: the
//! simulator in this process, or any service over HTTP.

mod http;
pub mod types;

use crate::clock::Clock;
use crate::sim::{SimError, Simulator};
use app::protocol::ErrorCode;
use std::sync::Arc;
use std::time::Duration;
pub use types::Status;

/// What went wrong talking to the task service; each variant is something
/// the caller acts on differently.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// `400`: the task service refused the task (`unknown_kind` / `invalid_params`).
    #[error("{message}")]
    Rejected { code: ErrorCode, message: String },
    /// `404`: the task service does not know this task.
    #[error("the task service does not know this task")]
    NotFound,
    /// Timeout, refused connection, `5xx`, `429`: try again later.
    #[error("the task service is unavailable: {reason}")]
    Unavailable {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The task service answered something the contract does not allow.
    #[error("the task service answered out of contract: {0}")]
    Protocol(String),
}

impl BackendError {
    fn unavailable(reason: impl Into<String>) -> Self {
        BackendError::Unavailable {
            reason: reason.into(),
            retry_after: None,
        }
    }
}

#[derive(Clone)]
pub enum Backend {
    Embedded { sim: Arc<Simulator>, clock: Clock },
    Http(http::HttpBackend),
}

impl Backend {
    pub fn embedded(sim: Arc<Simulator>, clock: Clock) -> Self {
        Backend::Embedded { sim, clock }
    }

    pub fn http(base_url: &str, timeout: Duration) -> Result<Self, BackendError> {
        Ok(Backend::Http(http::HttpBackend::new(base_url, timeout)?))
    }

    /// Starts a task; returns the task service's id for it.
    pub async fn start(
        &self,
        kind: &str,
        params: &serde_json::Value,
    ) -> Result<String, BackendError> {
        match self {
            Backend::Embedded { sim, clock } => {
                sim.start(kind, params, clock.now_ms())
                    .map_err(|e| match e {
                        SimError::UnknownKind(_) => BackendError::Rejected {
                            code: ErrorCode::UnknownKind,
                            message: e.to_string(),
                        },
                        SimError::InvalidParams(_) => BackendError::Rejected {
                            code: ErrorCode::InvalidParams,
                            message: e.to_string(),
                        },
                        SimError::Full => BackendError::unavailable(e.to_string()),
                    })
            }
            Backend::Http(h) => h.start(kind, params).await,
        }
    }

    pub async fn status(&self, id: &str) -> Result<Status, BackendError> {
        match self {
            Backend::Embedded { sim, clock } => {
                sim.status(id, clock.now_ms()).ok_or(BackendError::NotFound)
            }
            Backend::Http(h) => h.status(id).await,
        }
    }

    pub async fn cancel(&self, id: &str) -> Result<Status, BackendError> {
        match self {
            Backend::Embedded { sim, clock } => {
                sim.cancel(id, clock.now_ms()).ok_or(BackendError::NotFound)
            }
            Backend::Http(h) => h.cancel(id).await,
        }
    }
}
