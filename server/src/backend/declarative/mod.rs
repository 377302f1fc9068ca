//! The declarative HTTP adapter: any JSON job API, described in
//! configuration ([`HttpSpec`]; docs/http-adapter.md), spoken over the
//! same lean client as the task-service adapter.
//!
//! [`spec`] resolves and checks the configuration, [`template`] fills in
//! paths and bodies, [`status`] reads answers; this file does the requests
//! and keeps `changed_at` stable for APIs that do not report it.

mod spec;
mod status;
mod template;

pub use spec::{FieldsSpec, HttpSpec, RequestSpec, StartSpec, PRESETS};

use super::client::{unexpected, Answer, Client};
use super::BackendError;
use crate::clock::Clock;
use crate::task_api::Status;
use app::protocol::{ErrorCode, TaskState};
use bytes::Bytes;
use hyper::StatusCode;
use serde_json::Value;
use spec::{Call, Resolved};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use template::Vars;

/// Tasks whose first sight of their current progress is remembered (for
/// APIs without `changed_at`); past this, an arbitrary entry is dropped
/// (that task's `changed_at` moves once).
pub const MAX_STAMPED_TASKS: usize = 100_000;
/// Longest text taken from a refusal's body for the user.
const MAX_REJECT_CHARS: usize = 300;

/// A backend described by an [`HttpSpec`]. Cheap to clone.
#[derive(Clone)]
pub struct DeclarativeBackend {
    inner: Arc<Inner>,
    clock: Clock,
}

struct Inner {
    /// For messages: the backend's name, or its URL until told.
    name: String,
    client: Client,
    spec: Resolved,
    stamps: Stamps,
}

impl DeclarativeBackend {
    /// Checks the spec (as [`HttpSpec::validate`]; an error is
    /// [`BackendError::Protocol`] naming the key) and sets up the
    /// connection pool; no request is made.
    pub fn new(spec: &HttpSpec, timeout: Duration) -> Result<Self, BackendError> {
        let spec = spec.resolve().map_err(BackendError::Protocol)?;
        Ok(DeclarativeBackend {
            inner: Arc::new(Inner {
                name: spec.url.clone(),
                client: Client::new(&spec.url, timeout)?,
                spec,
                stamps: Stamps::default(),
            }),
            clock: Clock::new(),
        })
    }

    /// Its `GET`s pipelined ([`Client::set_pipeline`]); before any clone.
    pub fn with_pipeline(mut self, depth: usize, max_in_flight: usize) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.client.set_pipeline(depth, max_in_flight);
        }
        self
    }

    /// The name messages use (the `[[backend]]` table's `name`).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.name = name.into();
        }
        self
    }

    /// The clock `changed_at` stamps come from (the server's, so paused
    /// time in tests moves them).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Starts a job; returns the backend's id for it (at `start.id`).
    pub async fn start(&self, kind: &str, params: &Value) -> Result<String, BackendError> {
        let vars = Vars {
            kind: Some(kind),
            params: Some(params),
            id: None,
        };
        let spec = &self.inner.spec;
        let answer = self.send(&spec.start, vars).await?;
        match answer.status {
            s if s.is_success() => {
                let body = json("the start answer", &answer)?;
                let pointer = &spec.start_id;
                match body.pointer(pointer) {
                    Some(Value::String(id)) if !id.is_empty() => Ok(id.clone()),
                    Some(Value::Number(n)) => Ok(n.to_string()),
                    _ => Err(BackendError::Protocol(format!(
                        "the start answer has no id (a string) at `{pointer}`"
                    ))),
                }
            }
            StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => {
                Err(BackendError::Rejected {
                    code: ErrorCode::InvalidParams,
                    message: reject_message(&answer),
                })
            }
            _ => Err(other("start", &answer)),
        }
    }

    pub async fn status(&self, id: &str) -> Result<Status, BackendError> {
        let answer = self.send(&self.inner.spec.status, id_vars(id)).await?;
        match answer.status {
            s if s.is_success() => {
                let body = json("the status answer", &answer)?;
                self.to_status(id, &body)
            }
            StatusCode::NOT_FOUND => Err(BackendError::NotFound),
            _ => Err(other("status", &answer)),
        }
    }

    /// Cancels a job. The answer is read as a status when it carries a
    /// state; otherwise the status is polled once.
    pub async fn cancel(&self, id: &str) -> Result<Status, BackendError> {
        let Some(call) = &self.inner.spec.cancel else {
            return Err(BackendError::Rejected {
                code: ErrorCode::BadRequest,
                message: format!(
                    "backend `{}` has no cancel (no `cancel` in its configuration)",
                    self.inner.name
                ),
            });
        };
        let answer = self.send(call, id_vars(id)).await?;
        match answer.status {
            s if s.is_success() => {
                let body: Option<Value> = serde_json::from_slice(&answer.body).ok();
                match body {
                    Some(body) if status::has_state(&self.inner.spec.fields, &body) => {
                        self.to_status(id, &body)
                    }
                    _ => self.status(id).await,
                }
            }
            StatusCode::NOT_FOUND => Err(BackendError::NotFound),
            _ => Err(other("cancel", &answer)),
        }
    }

    async fn send(&self, call: &Call, vars: Vars<'_>) -> Result<Answer, BackendError> {
        let inner = &*self.inner;
        let mut path = inner.client.prefix.clone();
        path.push_str(&call.path.render(vars));
        let body = match &call.body {
            Some(template) => Some(Bytes::from(
                serde_json::to_vec(&template::fill(template, vars)).map_err(|e| {
                    BackendError::Protocol(format!("cannot encode the request: {e}"))
                })?,
            )),
            None => None,
        };
        inner
            .client
            .request(call.method.clone(), &path, &inner.spec.headers, body)
            .await
    }

    fn to_status(&self, id: &str, body: &Value) -> Result<Status, BackendError> {
        let spec = &self.inner.spec;
        let read =
            status::read(&spec.fields, &spec.states, body).map_err(BackendError::Protocol)?;
        let changed_at_ms = match read.changed_at_ms {
            Some(t) => t,
            None => self.inner.stamps.stamp(
                id,
                (read.state, read.done, read.total),
                self.clock.now_ms(),
            ),
        };
        Ok(Status {
            id: id.to_string(),
            state: read.state,
            done: read.done,
            total: read.total,
            message: read.message,
            result: read.result,
            error: read.error,
            changed_at_ms,
        })
    }
}

fn id_vars(id: &str) -> Vars<'_> {
    Vars {
        id: Some(id),
        ..Vars::default()
    }
}

fn json(what: &str, answer: &Answer) -> Result<Value, BackendError> {
    serde_json::from_slice(&answer.body)
        .map_err(|e| BackendError::Protocol(format!("{what} is not JSON: {e}")))
}

/// 429/5xx are "try later" (with `Retry-After`); the rest is out of contract.
fn other(call: &str, answer: &Answer) -> BackendError {
    match unexpected(answer) {
        BackendError::Protocol(m) => BackendError::Protocol(format!("{call}: {m}")),
        e => e,
    }
}

/// The reason a refusal gives, from the usual places in a JSON error body
/// (AIP-193 `error.message`, `message`, `error`, RFC 9457 `detail`), else
/// its text.
fn reject_message(answer: &Answer) -> String {
    let from_json = serde_json::from_slice::<Value>(&answer.body)
        .ok()
        .and_then(|v| {
            ["/error/message", "/message", "/error", "/detail", "/title"]
                .iter()
                .find_map(|p| v.pointer(p).and_then(Value::as_str).map(str::to_string))
        });
    let text =
        from_json.unwrap_or_else(|| String::from_utf8_lossy(&answer.body).trim().to_string());
    if text.is_empty() {
        format!("the backend refused the task ({})", answer.status)
    } else if text.chars().count() > MAX_REJECT_CHARS {
        text.chars()
            .take(MAX_REJECT_CHARS)
            .chain("…".chars())
            .collect()
    } else {
        text
    }
}

/// When each task's current `(state, done, total)` was first seen: an
/// unchanged poll keeps its `changed_at`, so the engine does not read it
/// as progress.
#[derive(Default)]
struct Stamps {
    // A std Mutex: held for one map operation, never across an await.
    seen: Mutex<HashMap<String, (Progress, u64)>>,
}

type Progress = (TaskState, u64, Option<u64>);

impl Stamps {
    fn stamp(&self, id: &str, progress: Progress, now_ms: u64) -> u64 {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let at = match seen.get(id) {
            Some((p, at)) if *p == progress => *at,
            _ => now_ms,
        };
        if progress.0.is_final() {
            // A final task is not polled again.
            seen.remove(id);
        } else {
            if seen.len() >= MAX_STAMPED_TASKS && !seen.contains_key(id) {
                if let Some(victim) = seen.keys().next().cloned() {
                    seen.remove(&victim);
                }
            }
            seen.insert(id.to_string(), (progress, at));
        }
        at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_hold_while_nothing_changes() {
        let s = Stamps::default();
        let running = |done| (TaskState::Running, done, Some(10));
        assert_eq!(s.stamp("a", running(1), 100), 100);
        assert_eq!(s.stamp("a", running(1), 200), 100);
        assert_eq!(s.stamp("b", running(1), 250), 250);
        assert_eq!(s.stamp("a", running(2), 300), 300);
        assert_eq!(s.stamp("a", running(2), 400), 300);
        assert_eq!(s.stamp("a", (TaskState::Succeeded, 10, Some(10)), 500), 500);
        assert!(
            !s.seen.lock().unwrap().contains_key("a"),
            "dropped when final"
        );
        assert_eq!(s.seen.lock().unwrap().len(), 1);
    }

    #[test]
    fn stamps_are_bounded() {
        let s = Stamps::default();
        for i in 0..MAX_STAMPED_TASKS + 10 {
            s.stamp(&i.to_string(), (TaskState::Running, 0, None), 1);
        }
        assert_eq!(s.seen.lock().unwrap().len(), MAX_STAMPED_TASKS);
    }

    #[test]
    fn refusals_say_why() {
        let answer = |body: &'static str| Answer {
            status: StatusCode::BAD_REQUEST,
            retry_after: None,
            body: Bytes::from_static(body.as_bytes()),
        };
        assert_eq!(
            reject_message(&answer(
                r#"{"error":{"code":400,"message":"n must be > 0"}}"#
            )),
            "n must be > 0"
        );
        assert_eq!(reject_message(&answer(r#"{"detail":"bad n"}"#)), "bad n");
        assert_eq!(reject_message(&answer("plain words\n")), "plain words");
        assert_eq!(
            reject_message(&answer("")),
            "the backend refused the task (400 Bad Request)"
        );
    }
}
