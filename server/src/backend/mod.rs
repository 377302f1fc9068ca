//! Backend adapters: how taskwire talks to a backend. Four implementations
//! behind one enum, chosen per backend at start-up: the simulator in this
//! process ([`embedded`]), the task-service API of docs/protocol.md over
//! HTTP ([`http`]), any JSON job API described in configuration
//! ([`declarative`]), and a Celery deployment's Redis broker and result
//! backend ([`celery`]). Both HTTP adapters share one lean client
//! ([`client`]).

pub mod celery;
pub(crate) mod client;
pub mod declarative;
mod embedded;
mod http;
mod pipeline;
pub mod time;
pub(crate) mod tls;

use crate::clock::Clock;
use crate::sim::Simulator;
use crate::task::PollError;
pub use crate::task_api::Status;
use app::protocol::ErrorCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
        /// One word for metrics: `timeout`, `refused`, `http_5xx`, `http_429`, ...
        kind: &'static str,
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The task service answered something the contract does not allow.
    #[error("the task service answered out of contract: {0}")]
    Protocol(String),
}

impl BackendError {
    pub(crate) fn unavailable(kind: &'static str, reason: impl Into<String>) -> Self {
        BackendError::Unavailable {
            kind,
            reason: reason.into(),
            retry_after: None,
        }
    }

    /// What a failed poll means for the task (see [`crate::task::Tracked::on_error`]).
    pub fn poll_error(&self) -> PollError {
        match self {
            BackendError::NotFound => PollError::Lost,
            BackendError::Unavailable {
                reason,
                retry_after,
                ..
            } => PollError::Unreachable {
                reason: reason.clone(),
                retry_after: *retry_after,
            },
            other => PollError::Unreachable {
                reason: other.to_string(),
                retry_after: None,
            },
        }
    }

    /// One word for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            BackendError::Rejected { .. } => "rejected",
            BackendError::NotFound => "not_found",
            BackendError::Unavailable { kind, .. } => kind,
            BackendError::Protocol(_) => "protocol",
        }
    }
}

/// Between a backend's name and its own id for a task, in the id taskwire
/// stores (an id a backend makes never holds it).
const ROUTE_SEP: char = '\u{1f}';

/// What taskwire stores as a task's backend id: which backend, and that
/// backend's own id for it.
pub fn route(backend: &str, remote_id: &str) -> String {
    format!("{backend}{ROUTE_SEP}{remote_id}")
}

/// A stored backend id → (the backend's name, its own id). Ids stored
/// before there were several backends have no name: the first backend's.
pub fn split_route(stored: &str) -> (Option<&str>, &str) {
    match stored.split_once(ROUTE_SEP) {
        Some((name, id)) => (Some(name), id),
        None => (None, stored),
    }
}

/// While the task service is down, a `start` fails at once instead of
/// waiting for a timeout; one try per this interval goes through as a probe.
pub const START_PROBE_INTERVAL_MS: u64 = 1_000;

/// What the last requests said of the task service's reachability.
#[derive(Default)]
struct Health {
    /// 0 while reachable; else when it was first seen down (Unix ms).
    down_since_ms: AtomicU64,
    last_probe_ms: AtomicU64,
}

/// The task service, as one adapter plus what is known of its health.
#[derive(Clone)]
pub struct Backend {
    adapter: Adapter,
    clock: Clock,
    health: Arc<Health>,
}

#[derive(Clone)]
enum Adapter {
    Embedded(Arc<Simulator>),
    Http(http::HttpBackend),
    Declarative(declarative::DeclarativeBackend),
    Celery(celery::CeleryBackend),
}

impl Backend {
    pub fn embedded(sim: Arc<Simulator>, clock: Clock) -> Self {
        Backend {
            adapter: Adapter::Embedded(sim),
            clock,
            health: Arc::default(),
        }
    }

    /// The task-service API over HTTP; at most `max_idle` idle keep-alive
    /// connections kept (the backend's `max_concurrent_polls`).
    pub fn http(
        base_url: &str,
        timeout: Duration,
        max_idle: usize,
        clock: Clock,
    ) -> Result<Self, BackendError> {
        Ok(Backend {
            adapter: Adapter::Http(http::HttpBackend::new(base_url, timeout, max_idle)?),
            clock,
            health: Arc::default(),
        })
    }

    /// The polls of an HTTP backend pipelined, `tuning.pipeline_depth` per
    /// connection at a time (below 2: not), over as many connections as
    /// its `max_concurrent_polls` needs; no change to other adapters.
    pub fn with_pipeline(mut self, tuning: &crate::config::file::Tuning) -> Self {
        let depth = usize::try_from(tuning.pipeline_depth).unwrap_or(usize::MAX);
        let in_flight = usize::try_from(tuning.max_concurrent_polls).unwrap_or(usize::MAX);
        self.adapter = match self.adapter {
            Adapter::Http(b) => Adapter::Http(b.with_pipeline(depth, in_flight)),
            Adapter::Declarative(b) => Adapter::Declarative(b.with_pipeline(depth, in_flight)),
            other => other,
        };
        self
    }

    /// Any JSON job API, described by `spec` (docs/http-adapter.md); a
    /// mistake in the spec is an error naming its key.
    pub fn declarative(
        name: &str,
        spec: &serde_json::Value,
        timeout: Duration,
        clock: Clock,
    ) -> Result<Self, String> {
        let spec: declarative::HttpSpec =
            serde_json::from_value(spec.clone()).map_err(|e| e.to_string())?;
        spec.validate()?;
        let adapter = declarative::DeclarativeBackend::new(&spec, timeout)
            .map_err(|e| e.to_string())?
            .with_name(name)
            .with_clock(clock);
        Ok(Backend {
            adapter: Adapter::Declarative(adapter),
            clock,
            health: Arc::default(),
        })
    }

    /// A Celery deployment on Redis (docs/celery.md). Spawns the adapter's
    /// batcher: call it inside the runtime.
    pub fn celery(
        broker: &str,
        result_backend: &str,
        queue: &str,
        terminate_on_cancel: bool,
        timeout: Duration,
        clock: Clock,
    ) -> Result<Self, BackendError> {
        let adapter = celery::CeleryBackend::new(broker, result_backend, queue, timeout)?
            .with_terminate_on_cancel(terminate_on_cancel)
            .with_clock(clock);
        Ok(Backend {
            adapter: Adapter::Celery(adapter),
            clock,
            health: Arc::default(),
        })
    }

    /// Notes what a request said of reachability.
    fn observe<T>(&self, result: &Result<T, BackendError>) {
        match result {
            Err(BackendError::Unavailable { .. }) => {
                let _ = self.health.down_since_ms.compare_exchange(
                    0,
                    self.clock.now_ms().max(1),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
            _ => self.health.down_since_ms.store(0, Ordering::Relaxed),
        }
    }

    /// Since when the task service has been unreachable, if it is.
    pub fn down_since_ms(&self) -> Option<u64> {
        Some(self.health.down_since_ms.load(Ordering::Relaxed)).filter(|&t| t != 0)
    }

    /// Starts a task; returns the task service's id for it. While the
    /// service is known to be down this fails at once, but for one probe
    /// per [`START_PROBE_INTERVAL_MS`].
    /// `task_id` is taskwire's own id for the task (an adapter may use it
    /// as the backend's, e.g. Celery's task id); `kind` is what the backend
    /// is asked to run.
    pub async fn start(
        &self,
        task_id: &str,
        kind: &str,
        params: &serde_json::Value,
    ) -> Result<String, BackendError> {
        if let Some(since) = self.down_since_ms() {
            let now = self.clock.now_ms();
            let last = self.health.last_probe_ms.load(Ordering::Relaxed);
            if now.saturating_sub(last) < START_PROBE_INTERVAL_MS
                || self
                    .health
                    .last_probe_ms
                    .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
            {
                return Err(BackendError::unavailable(
                    "down",
                    format!(
                        "unreachable for {} s; try again later",
                        now.saturating_sub(since) / 1000
                    ),
                ));
            }
        }
        let result = self.start_now(task_id, kind, params).await;
        self.observe(&result);
        result
    }

    async fn start_now(
        &self,
        task_id: &str,
        kind: &str,
        params: &serde_json::Value,
    ) -> Result<String, BackendError> {
        match &self.adapter {
            Adapter::Embedded(sim) => embedded::start(sim, kind, params, self.clock.now_ms()),
            Adapter::Http(h) => h.start(kind, params).await,
            Adapter::Declarative(d) => d.start(kind, params).await,
            Adapter::Celery(c) => c.start(task_id, kind, params).await,
        }
    }

    /// After a restart, for a task started before it: the embedded
    /// simulator takes it back (its memory died with the process); a task
    /// service over HTTP kept its own, so nothing is done.
    pub fn restore(&self, id: &str, kind: &str, params: &serde_json::Value, start_ms: u64) {
        let id = split_route(id).1;
        if let Adapter::Embedded(sim) = &self.adapter {
            if let Err(e) = sim.restore(id, kind, params, start_ms) {
                tracing::warn!(task = id, error = %e, "the simulator could not take a task back");
            }
        }
    }

    pub async fn status(&self, id: &str) -> Result<Status, BackendError> {
        let id = split_route(id).1;
        let result = match &self.adapter {
            Adapter::Embedded(sim) => embedded::status(sim, id, self.clock.now_ms()),
            Adapter::Http(h) => h.status(id).await,
            Adapter::Declarative(d) => d.status(id).await,
            Adapter::Celery(c) => c.status(id).await,
        };
        self.observe(&result);
        result
    }

    pub async fn cancel(&self, id: &str) -> Result<Status, BackendError> {
        let id = split_route(id).1;
        let result = match &self.adapter {
            Adapter::Embedded(sim) => embedded::cancel(sim, id, self.clock.now_ms()),
            Adapter::Http(h) => h.cancel(id).await,
            Adapter::Declarative(d) => d.cancel(id).await,
            Adapter::Celery(c) => c.cancel(id).await,
        };
        self.observe(&result);
        result
    }
}
