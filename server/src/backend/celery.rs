//! The Celery adapter: taskwire speaks Celery's own wire formats to its
//! Redis broker and Redis result backend (docs/celery.md), with no Python
//! in between. A start is a protocol-2 task message pushed on the queue, a
//! poll reads `celery-task-meta-<id>`, a cancel is the `revoke` broadcast.
//!
//! Polls are batched: every `status()` queues its id to one batcher task,
//! which reads all that are waiting with one `MGET`.

use super::time::iso8601_ms as parse_iso8601_ms;
use super::BackendError;
use crate::clock::Clock;
use crate::task_api::Status;
use app::protocol::{ErrorCode, TaskState};
use base64::Engine as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

/// Most ids read by one `MGET`.
pub const MAX_BATCH: usize = 512;
/// Polls waiting for the batcher; a caller beyond this waits to enqueue
/// (inside its own timeout).
pub const STATUS_QUEUE_LEN: usize = 8_192;
/// Tasks whose first sight of their current `(state, done)` is remembered
/// (for `changed_at_ms`); the oldest goes when it is full.
pub const MAX_SEEN: usize = 100_000;
/// Longest `kwargsrepr` in a task message (Celery's `kwargsrepr_maxsize`).
const KWARGSREPR_MAX_CHARS: usize = 1_024;
/// Celery's default `control_exchange` (`celery`) plus `.pidbox`.
pub const PIDBOX_EXCHANGE: &str = "celery.pidbox";
/// `expires` of a broadcast, as `celery.app.control` sets it (its default
/// `timeout`); workers ignore it, only reply collectors read it.
const BROADCAST_EXPIRES_S: f64 = 1.0;
/// The result backend's key of a task (Celery's `task_keyprefix`).
pub const META_PREFIX: &str = "celery-task-meta-";

/// A Celery deployment: its broker, result backend and queue. Cheap to
/// clone; the last clone dropped stops the batcher.
#[derive(Clone)]
pub struct CeleryBackend {
    inner: Arc<Inner>,
    terminate_on_cancel: bool,
    /// Times `changed_at_ms` of non-final states (final ones carry
    /// Celery's `date_done`).
    clock: Clock,
}

struct Inner {
    broker: ConnectionManager,
    /// The fanout prefix is `/{db}.`: kombu's Redis transport puts the
    /// broker's database number into broadcast channel names.
    broker_db: i64,
    queue: String,
    timeout: Duration,
    origin: String,
    polls: mpsc::Sender<Lookup>,
    seen: Mutex<Seen>,
    /// The Lamport clock header of broadcasts.
    clock: AtomicU64,
    round_trips: Arc<AtomicU64>,
}

/// One queued poll: the key's raw value goes back on `reply`.
struct Lookup {
    id: String,
    reply: oneshot::Sender<Result<Option<Vec<u8>>, BackendError>>,
}

impl CeleryBackend {
    /// Connects lazily (never blocks here): the server starts while Redis
    /// is down, and every call fails within `timeout` until it is back.
    /// Must be called inside a tokio runtime (the batcher is spawned on it).
    pub fn new(
        broker: &str,
        result_backend: &str,
        queue: &str,
        timeout: Duration,
    ) -> Result<Self, BackendError> {
        if queue.is_empty() {
            return Err(BackendError::Protocol(
                "the Celery queue name is empty".into(),
            ));
        }
        let (broker_client, broker_db) = client(broker, "broker")?;
        let (results_client, _) = client(result_backend, "result backend")?;
        let broker = manager(broker_client, timeout)?;
        let results = manager(results_client, timeout)?;
        let (polls, rx) = mpsc::channel(STATUS_QUEUE_LEN);
        let round_trips = Arc::new(AtomicU64::new(0));
        tokio::spawn(batcher(rx, results, timeout, round_trips.clone()));
        Ok(CeleryBackend {
            inner: Arc::new(Inner {
                broker,
                broker_db,
                queue: queue.to_string(),
                timeout,
                origin: format!("taskwire-{}", std::process::id()),
                polls,
                seen: Mutex::new(Seen::default()),
                clock: AtomicU64::new(0),
                round_trips,
            }),
            terminate_on_cancel: false,
            clock: Clock::new(),
        })
    }

    /// The server's clock (so paused-time tests drive `changed_at_ms` too).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Whether a cancel also kills a running task (`revoke(terminate=True)`,
    /// prefork pools only; see docs/celery.md). Default: no.
    pub fn with_terminate_on_cancel(mut self, terminate: bool) -> Self {
        self.terminate_on_cancel = terminate;
        self
    }

    /// Result-backend round trips (one per `MGET`) since start.
    pub fn round_trips(&self) -> u64 {
        self.inner.round_trips.load(Ordering::Relaxed)
    }

    /// Sends `celery_task` with `params` as its keyword arguments; taskwire's
    /// `task_id` becomes the Celery task id, and is returned.
    pub async fn start(
        &self,
        task_id: &str,
        celery_task: &str,
        params: &Value,
    ) -> Result<String, BackendError> {
        let kwargs = kwargs(params)?;
        if celery_task.is_empty() {
            return Err(BackendError::Rejected {
                code: ErrorCode::UnknownKind,
                message: "no Celery task name".into(),
            });
        }
        let message = task_message(&TaskMessage {
            task_id,
            task: celery_task,
            kwargs: &kwargs,
            queue: &self.inner.queue,
            origin: &self.inner.origin,
            delivery_tag: &delivery_tag(),
        });
        let mut c = self.inner.broker.clone();
        let mut push = redis::cmd("LPUSH");
        push.arg(&self.inner.queue).arg(message);
        with_timeout(self.inner.timeout, push.query_async::<i64>(&mut c)).await?;
        Ok(task_id.to_string())
    }

    /// The task's state in the result backend, read in the batcher's next
    /// `MGET`.
    pub async fn status(&self, id: &str) -> Result<Status, BackendError> {
        let raw = self.lookup(id).await?;
        let reading = parse_meta(raw.as_deref())?;
        let now = self.clock.now_ms();
        let mut seen = self.inner.seen.lock().unwrap_or_else(|p| p.into_inner());
        Ok(seen.status(id, reading, now))
    }

    async fn lookup(&self, id: &str) -> Result<Option<Vec<u8>>, BackendError> {
        let (reply, answer) = oneshot::channel();
        let ask = async {
            self.inner
                .polls
                .send(Lookup {
                    id: id.to_string(),
                    reply,
                })
                .await
                .map_err(|_| stopped())?;
            answer.await.map_err(|_| stopped())?
        };
        tokio::time::timeout(self.inner.timeout, ask)
            .await
            .unwrap_or_else(|_| Err(redis_timeout()))
    }

    /// Celery's `revoke`, broadcast to every worker; then the status as it
    /// reads now (the worker marks a queued task REVOKED a moment later).
    pub async fn cancel(&self, id: &str) -> Result<Status, BackendError> {
        let clock = self.inner.clock.fetch_add(1, Ordering::Relaxed) + 1;
        let message = revoke_message(&Revoke {
            task_id: id,
            terminate: self.terminate_on_cancel,
            clock,
            // Wall time: it is compared with the workers' clocks.
            expires_s: wall_ms() as f64 / 1000.0 + BROADCAST_EXPIRES_S,
            delivery_tag: &delivery_tag(),
        });
        let mut c = self.inner.broker.clone();
        let mut publish = redis::cmd("PUBLISH");
        publish
            .arg(pidbox_channel(self.inner.broker_db))
            .arg(message);
        let workers = with_timeout(self.inner.timeout, publish.query_async::<i64>(&mut c)).await?;
        if workers == 0 {
            tracing::warn!(
                task = id,
                "no Celery worker listens for control commands: the revoke is lost"
            );
        }
        self.status(id).await
    }
}

fn client(url: &str, what: &str) -> Result<(redis::Client, i64), BackendError> {
    if !url.starts_with("redis://") {
        return Err(BackendError::Protocol(format!(
            "the Celery {what} `{url}` is not a redis:// URL"
        )));
    }
    let client = redis::Client::open(url).map_err(|e| {
        BackendError::Protocol(format!("the Celery {what} `{url}` is not usable: {e}"))
    })?;
    let db = client.get_connection_info().redis_settings().db();
    Ok((client, db))
}

fn manager(client: redis::Client, timeout: Duration) -> Result<ConnectionManager, BackendError> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout.min(Duration::from_millis(500))))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    ConnectionManager::new_lazy_with_config(client, config).map_err(redis_error)
}

/// Answers queued polls, as many per `MGET` as are waiting (up to
/// [`MAX_BATCH`]). One `MGET` at a time: the polls that arrive meanwhile
/// make the next batch. Ends when the last sender (the backend) is gone.
async fn batcher(
    mut rx: mpsc::Receiver<Lookup>,
    mut conn: ConnectionManager,
    timeout: Duration,
    round_trips: Arc<AtomicU64>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // A caller that gave up (timed out) needs no answer.
        batch.retain(|l| !l.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let mut mget = redis::cmd("MGET");
        for l in &batch {
            mget.arg(meta_key(&l.id));
        }
        round_trips.fetch_add(1, Ordering::Relaxed);
        let values =
            with_timeout(timeout, mget.query_async::<Vec<Option<Vec<u8>>>>(&mut conn)).await;
        match values {
            Ok(values) if values.len() == batch.len() => {
                for (l, v) in batch.drain(..).zip(values) {
                    let _ = l.reply.send(Ok(v));
                }
            }
            Ok(values) => {
                let e = BackendError::Protocol(format!(
                    "MGET of {} keys answered {} values",
                    batch.len(),
                    values.len()
                ));
                for l in batch.drain(..) {
                    let _ = l.reply.send(Err(e.clone()));
                }
            }
            Err(e) => {
                for l in batch.drain(..) {
                    let _ = l.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

async fn with_timeout<T>(
    timeout: Duration,
    f: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, BackendError> {
    match tokio::time::timeout(timeout, f).await {
        Ok(r) => r.map_err(redis_error),
        Err(_) => Err(redis_timeout()),
    }
}

fn redis_error(e: redis::RedisError) -> BackendError {
    use redis::ErrorKind;
    match e.kind() {
        // Redis answered, but not what a list or a string key gives:
        // misconfiguration (e.g. the queue key is not a list), not an outage.
        ErrorKind::Server(redis::ServerErrorKind::ResponseError)
        | ErrorKind::UnexpectedReturnType
        | ErrorKind::Parse => BackendError::Protocol(format!("Redis: {e}")),
        _ if e.is_timeout() => redis_timeout(),
        _ => BackendError::unavailable("redis", format!("Redis: {e}")),
    }
}

fn redis_timeout() -> BackendError {
    BackendError::unavailable("redis", "Redis timed out")
}

fn stopped() -> BackendError {
    BackendError::unavailable("redis", "the Celery status batcher has stopped")
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub fn meta_key(id: &str) -> String {
    format!("{META_PREFIX}{id}")
}

/// kombu's Redis transport publishes a fanout message to
/// `<keyprefix_fanout><exchange>`, with `keyprefix_fanout = "/{db}."`.
pub fn pidbox_channel(broker_db: i64) -> String {
    format!("/{broker_db}.{PIDBOX_EXCHANGE}")
}

/// `params` as keyword arguments: an object, or null for none.
fn kwargs(params: &Value) -> Result<serde_json::Map<String, Value>, BackendError> {
    match params {
        Value::Null => Ok(serde_json::Map::new()),
        Value::Object(m) => Ok(m.clone()),
        other => Err(BackendError::Rejected {
            code: ErrorCode::InvalidParams,
            message: format!(
                "params become the Celery task's keyword arguments: an object, not {}",
                json_kind(other)
            ),
        }),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A unique `delivery_tag` (kombu uses a uuid4; so do we).
fn delivery_tag() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the OS random source works");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// What goes into one task message.
struct TaskMessage<'a> {
    task_id: &'a str,
    task: &'a str,
    kwargs: &'a serde_json::Map<String, Value>,
    queue: &'a str,
    origin: &'a str,
    delivery_tag: &'a str,
}

/// A protocol-2 task message with a JSON body, as kombu's Redis transport
/// stores it in the queue (celery/app/amqp.py `as_task_v2`, then kombu's
/// `prepare_message` and `_inplace_augment_message`).
fn task_message(m: &TaskMessage) -> String {
    let body = json!([
        [],
        m.kwargs,
        {"callbacks": null, "errbacks": null, "chain": null, "chord": null}
    ]);
    let kwargsrepr = truncate_chars(&Value::Object(m.kwargs.clone()).to_string());
    json!({
        "body": base64::engine::general_purpose::STANDARD.encode(body.to_string()),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": m.task,
            "id": m.task_id,
            "shadow": null,
            "eta": null,
            "expires": null,
            "group": null,
            "group_index": null,
            "retries": 0,
            "timelimit": [null, null],
            "root_id": m.task_id,
            "parent_id": null,
            "argsrepr": "()",
            "kwargsrepr": kwargsrepr,
            "origin": m.origin,
            "ignore_result": false,
            "replaced_task_nesting": 0,
            "stamped_headers": null,
            "stamps": {},
        },
        "properties": {
            "correlation_id": m.task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": m.queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": m.delivery_tag,
        },
    })
    .to_string()
}

fn truncate_chars(s: &str) -> String {
    match s.char_indices().nth(KWARGSREPR_MAX_CHARS) {
        Some((at, _)) => format!("{}...", &s[..at]),
        None => s.to_string(),
    }
}

/// What goes into one revoke broadcast.
struct Revoke<'a> {
    task_id: &'a str,
    terminate: bool,
    clock: u64,
    expires_s: f64,
    delivery_tag: &'a str,
}

/// `Control.revoke(task_id, terminate=..., signal="SIGTERM")` as kombu's
/// pidbox `_publish` sends it over the `celery.pidbox` fanout exchange.
fn revoke_message(r: &Revoke) -> String {
    let body = json!({
        "method": "revoke",
        "arguments": {"task_id": r.task_id, "terminate": r.terminate, "signal": "SIGTERM"},
        "destination": null,
        "pattern": null,
        "matcher": null,
    });
    json!({
        "body": base64::engine::general_purpose::STANDARD.encode(body.to_string()),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"clock": r.clock, "expires": r.expires_s},
        "properties": {
            "delivery_mode": 2,
            "delivery_info": {"exchange": PIDBOX_EXCHANGE, "routing_key": ""},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": r.delivery_tag,
        },
    })
    .to_string()
}

/// A result-backend record, read: everything of a [`Status`] but the id
/// and `changed_at_ms`.
#[derive(Clone, Debug, PartialEq)]
pub struct Reading {
    pub state: TaskState,
    pub done: u64,
    pub total: Option<u64>,
    pub message: Option<String>,
    pub result: Option<Value>,
    pub error: Option<String>,
    /// `date_done` (final states only), Unix ms.
    pub done_at_ms: Option<u64>,
}

impl Reading {
    fn new(state: TaskState) -> Self {
        Reading {
            state,
            done: 0,
            total: None,
            message: None,
            result: None,
            error: None,
            done_at_ms: None,
        }
    }
}

/// Maps `celery-task-meta-<id>` (absent: `None`) to a [`Reading`].
pub fn parse_meta(raw: Option<&[u8]>) -> Result<Reading, BackendError> {
    let Some(raw) = raw else {
        // Celery cannot tell a queued task from an unknown one either.
        return Ok(Reading::new(TaskState::Queued));
    };
    let meta: Value = serde_json::from_slice(raw)
        .map_err(|e| BackendError::Protocol(format!("result meta is not JSON: {e}")))?;
    let status = meta
        .get("status")
        .and_then(Value::as_str)
        .ok_or_else(|| BackendError::Protocol("result meta without a `status`".into()))?;
    let result = meta.get("result").cloned().unwrap_or(Value::Null);
    let done_at_ms = match meta.get("date_done") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(parse_iso8601_ms(s).ok_or_else(|| {
            BackendError::Protocol(format!("result meta: `date_done` `{s}` is not ISO 8601"))
        })?),
        Some(other) => {
            return Err(BackendError::Protocol(format!(
                "result meta: `date_done` is {}",
                json_kind(other)
            )))
        }
    };
    let mut r = match status {
        "PENDING" | "RECEIVED" => Reading::new(TaskState::Queued),
        "STARTED" => Reading::new(TaskState::Running),
        "PROGRESS" => progress(&result)?,
        "RETRY" => Reading {
            message: Some(format!("retrying after {}", exception_text(&result))),
            ..Reading::new(TaskState::Running)
        },
        "SUCCESS" => Reading {
            result: Some(result),
            ..Reading::new(TaskState::Succeeded)
        },
        "FAILURE" | "REJECTED" => Reading {
            error: Some(exception_text(&result)),
            ..Reading::new(TaskState::Failed)
        },
        "REVOKED" => Reading::new(TaskState::Cancelled),
        other => {
            return Err(BackendError::Protocol(format!(
                "Celery state `{other}` is not one taskwire knows \
                 (PENDING, STARTED, PROGRESS, RETRY, SUCCESS, FAILURE, REVOKED)"
            )))
        }
    };
    r.done_at_ms = done_at_ms;
    Ok(r)
}

/// The celery-progress convention: `result` is `{current, total, description?}`.
fn progress(meta: &Value) -> Result<Reading, BackendError> {
    let count = |key: &str| -> Result<Option<u64>, BackendError> {
        match meta.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0)
                .map(|f| Some(f as u64))
                .ok_or_else(|| {
                    BackendError::Protocol(format!(
                        "PROGRESS meta: `{key}` is not a non-negative number: {v}"
                    ))
                }),
        }
    };
    if !meta.is_object() {
        return Err(BackendError::Protocol(format!(
            "PROGRESS meta is {}, not {{current, total}}",
            json_kind(meta)
        )));
    }
    let total = count("total")?.filter(|&t| t > 0);
    let current = count("current")?
        .ok_or_else(|| BackendError::Protocol("PROGRESS meta without `current`".into()))?;
    Ok(Reading {
        done: total.map_or(current, |t| current.min(t)),
        total,
        message: meta
            .get("description")
            .and_then(Value::as_str)
            .map(str::to_string),
        ..Reading::new(TaskState::Running)
    })
}

/// `"ExcType: message"` from Celery's serialised exception
/// (`{exc_type, exc_message, exc_module}`, `exc_message` being its args).
fn exception_text(result: &Value) -> String {
    let Some(exc_type) = result.get("exc_type").and_then(Value::as_str) else {
        return match result {
            Value::Null => "the task failed".to_string(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
    };
    let message = match result.get("exc_message") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(args)) => args
            .iter()
            .map(|a| a.as_str().map_or_else(|| a.to_string(), str::to_string))
            .collect::<Vec<_>>()
            .join(", "),
        Some(other) => other.to_string(),
    };
    if message.is_empty() {
        exc_type.to_string()
    } else {
        format!("{exc_type}: {message}")
    }
}

/// What was first seen of each live task: since when its current
/// `(state, done)` holds, and its last progress (a final Celery record
/// carries none). Bounded by [`MAX_SEEN`]; a task's entry goes when it is
/// read final.
#[derive(Default)]
pub struct Seen {
    tasks: HashMap<String, SeenTask>,
}

#[derive(Clone, Copy, Debug)]
struct SeenTask {
    state: TaskState,
    done: u64,
    total: Option<u64>,
    since_ms: u64,
}

impl Seen {
    /// The [`Status`] of `reading`, with a `changed_at_ms` that stays put
    /// while `(state, done)` does.
    pub fn status(&mut self, id: &str, reading: Reading, now_ms: u64) -> Status {
        let Reading {
            state,
            mut done,
            mut total,
            message,
            result,
            error,
            done_at_ms,
        } = reading;
        let changed_at_ms = if state.is_final() {
            let last = self.tasks.remove(id);
            if let Some(last) = last {
                // A final record has no progress: keep the last seen, and a
                // success is the whole of it.
                total = last.total;
                done = match (state, last.total) {
                    (TaskState::Succeeded, Some(t)) => t,
                    _ => last.done,
                };
            }
            done_at_ms.unwrap_or_else(|| last.map_or(now_ms, |l| l.since_ms))
        } else {
            match self.tasks.get_mut(id) {
                Some(t) if t.state == state && t.done == done => {
                    t.total = total;
                    t.since_ms
                }
                Some(t) => {
                    *t = SeenTask {
                        state,
                        done,
                        total,
                        since_ms: now_ms,
                    };
                    now_ms
                }
                None => {
                    if self.tasks.len() >= MAX_SEEN {
                        self.evict_oldest();
                    }
                    self.tasks.insert(
                        id.to_string(),
                        SeenTask {
                            state,
                            done,
                            total,
                            since_ms: now_ms,
                        },
                    );
                    now_ms
                }
            }
        };
        Status {
            id: id.to_string(),
            state,
            done,
            total,
            message,
            result,
            error,
            changed_at_ms,
        }
    }

    /// A scan, only when full: tasks that are never polled to the end
    /// (forgotten) would otherwise stay for good.
    fn evict_oldest(&mut self) {
        if let Some(id) = self
            .tasks
            .iter()
            .min_by_key(|(_, t)| t.since_ms)
            .map(|(id, _)| id.clone())
        {
            self.tasks.remove(&id);
        }
    }

    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64_json(s: &str) -> Value {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s)
            .expect("base64");
        serde_json::from_slice(&bytes).expect("JSON")
    }

    #[test]
    fn task_message_is_protocol_2_with_a_base64_json_body() {
        let kwargs = json!({"n": 3}).as_object().unwrap().clone();
        let m: Value = serde_json::from_str(&task_message(&TaskMessage {
            task_id: "abc-123",
            task: "tasks.count",
            kwargs: &kwargs,
            queue: "tw-q",
            origin: "taskwire-1",
            delivery_tag: "tag-1",
        }))
        .unwrap();
        assert_eq!(m["content-type"], "application/json");
        assert_eq!(m["content-encoding"], "utf-8");
        assert_eq!(
            b64_json(m["body"].as_str().unwrap()),
            json!([[], {"n": 3}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}])
        );
        let h = &m["headers"];
        assert_eq!(h["lang"], "py");
        assert_eq!(h["task"], "tasks.count");
        assert_eq!(h["id"], "abc-123");
        assert_eq!(h["root_id"], "abc-123");
        assert_eq!(h["parent_id"], Value::Null);
        assert_eq!(h["group"], Value::Null);
        assert_eq!(h["retries"], 0);
        assert_eq!(h["eta"], Value::Null);
        assert_eq!(h["expires"], Value::Null);
        assert_eq!(h["timelimit"], json!([null, null]));
        assert_eq!(h["argsrepr"], "()");
        assert_eq!(h["kwargsrepr"], r#"{"n":3}"#);
        assert_eq!(h["ignore_result"], false);
        let p = &m["properties"];
        assert_eq!(p["correlation_id"], "abc-123");
        assert_eq!(p["reply_to"], "");
        assert_eq!(p["delivery_mode"], 2);
        assert_eq!(
            p["delivery_info"],
            json!({"exchange": "", "routing_key": "tw-q"})
        );
        assert_eq!(p["priority"], 0);
        assert_eq!(p["body_encoding"], "base64");
        assert_eq!(p["delivery_tag"], "tag-1");
    }

    #[test]
    fn a_long_kwargsrepr_is_cut() {
        let long = "é".repeat(5_000);
        let cut = truncate_chars(&long);
        assert_eq!(cut.chars().count(), KWARGSREPR_MAX_CHARS + 3);
        assert_eq!(truncate_chars("{}"), "{}");
    }

    #[test]
    fn params_must_be_an_object_or_null() {
        assert!(kwargs(&Value::Null).unwrap().is_empty());
        assert_eq!(kwargs(&json!({"a": 1})).unwrap()["a"], 1);
        for bad in [json!([1]), json!(3), json!("x"), json!(true)] {
            assert!(matches!(
                kwargs(&bad),
                Err(BackendError::Rejected {
                    code: ErrorCode::InvalidParams,
                    ..
                })
            ));
        }
    }

    #[test]
    fn revoke_is_a_pidbox_broadcast() {
        let m: Value = serde_json::from_str(&revoke_message(&Revoke {
            task_id: "abc-123",
            terminate: true,
            clock: 7,
            expires_s: 1_700_000_001.5,
            delivery_tag: "tag-2",
        }))
        .unwrap();
        assert_eq!(
            b64_json(m["body"].as_str().unwrap()),
            json!({
                "method": "revoke",
                "arguments": {"task_id": "abc-123", "terminate": true, "signal": "SIGTERM"},
                "destination": null, "pattern": null, "matcher": null,
            })
        );
        assert_eq!(
            m["headers"],
            json!({"clock": 7, "expires": 1_700_000_001.5})
        );
        assert_eq!(
            m["properties"]["delivery_info"],
            json!({"exchange": "celery.pidbox", "routing_key": ""})
        );
        assert_eq!(m["properties"]["body_encoding"], "base64");
        assert_eq!(pidbox_channel(0), "/0.celery.pidbox");
        assert_eq!(pidbox_channel(3), "/3.celery.pidbox");
    }

    #[test]
    fn delivery_tags_are_uuid4_and_unique() {
        let (a, b) = (delivery_tag(), delivery_tag());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }

    fn read(meta: Value) -> Result<Reading, BackendError> {
        parse_meta(Some(meta.to_string().as_bytes()))
    }

    #[test]
    fn states_map_to_taskwire_states() {
        assert_eq!(parse_meta(None).unwrap(), Reading::new(TaskState::Queued));
        assert_eq!(
            read(json!({"status": "PENDING", "result": null})).unwrap(),
            Reading::new(TaskState::Queued)
        );
        let started = read(json!({
            "status": "STARTED", "result": {"pid": 1, "hostname": "w@h"},
            "traceback": null, "children": [], "date_done": null, "task_id": "t"
        }))
        .unwrap();
        assert_eq!(started, Reading::new(TaskState::Running));

        let p = read(json!({
            "status": "PROGRESS",
            "result": {"current": 2, "total": 4, "description": "counted 2"},
            "date_done": null
        }))
        .unwrap();
        assert_eq!((p.state, p.done, p.total), (TaskState::Running, 2, Some(4)));
        assert_eq!(p.message.as_deref(), Some("counted 2"));

        let s = read(json!({
            "status": "SUCCESS", "result": {"n": 4},
            "date_done": "2026-12-03T09:26:16.945409+00:00"
        }))
        .unwrap();
        assert_eq!(s.state, TaskState::Succeeded);
        assert_eq!(s.result, Some(json!({"n": 4})));
        assert_eq!(s.done_at_ms, Some(1_796_289_976_945));

        let f = read(json!({
            "status": "FAILURE",
            "result": {"exc_type": "ValueError", "exc_message": ["cannot do it: boom"], "exc_module": "builtins"},
            "traceback": "Traceback ...", "date_done": "2026-12-03T09:26:16.981715+00:00"
        }))
        .unwrap();
        assert_eq!(f.state, TaskState::Failed);
        assert_eq!(f.error.as_deref(), Some("ValueError: cannot do it: boom"));

        let r = read(json!({
            "status": "REVOKED",
            "result": {"exc_type": "TaskRevokedError", "exc_message": ["revoked"], "exc_module": "celery.exceptions"},
            "date_done": "2026-12-03T09:26:19.755848+00:00"
        }))
        .unwrap();
        assert_eq!(r.state, TaskState::Cancelled);

        let retry = read(json!({
            "status": "RETRY",
            "result": {"exc_type": "Retry", "exc_message": ["again"]}
        }))
        .unwrap();
        assert_eq!(retry.state, TaskState::Running);
    }

    #[test]
    fn exceptions_read_as_type_and_message() {
        let t = |v: Value| exception_text(&v);
        assert_eq!(
            t(json!({"exc_type": "KeyError", "exc_message": ["k", 2]})),
            "KeyError: k, 2"
        );
        assert_eq!(t(json!({"exc_type": "Boom", "exc_message": []})), "Boom");
        assert_eq!(
            t(json!({"exc_type": "Boom", "exc_message": "text"})),
            "Boom: text"
        );
        assert_eq!(t(json!("plain")), "plain");
        assert_eq!(t(Value::Null), "the task failed");
    }

    #[test]
    fn out_of_contract_meta_is_a_protocol_error() {
        let bad = [
            json!({"status": "CHEWING", "result": null}),
            json!({"result": 1}),
            json!({"status": "PROGRESS", "result": 3}),
            json!({"status": "PROGRESS", "result": {"total": 3}}),
            json!({"status": "PROGRESS", "result": {"current": -1, "total": 3}}),
            json!({"status": "SUCCESS", "result": 1, "date_done": "yesterday"}),
        ];
        for meta in bad {
            assert!(
                matches!(read(meta.clone()), Err(BackendError::Protocol(_))),
                "{meta}"
            );
        }
        assert!(matches!(
            parse_meta(Some(b"not json")),
            Err(BackendError::Protocol(_))
        ));
        let e = read(json!({"status": "CHEWING"})).unwrap_err().to_string();
        assert!(e.contains("CHEWING"), "{e}");
    }

    #[test]
    fn progress_is_clamped_and_total_optional() {
        let p = read(json!({"status": "PROGRESS", "result": {"current": 9, "total": 4}})).unwrap();
        assert_eq!((p.done, p.total), (4, Some(4)));
        let p = read(json!({"status": "PROGRESS", "result": {"current": 2.7}})).unwrap();
        assert_eq!((p.done, p.total), (2, None));
        let p = read(json!({"status": "PROGRESS", "result": {"current": 1, "total": 0}})).unwrap();
        assert_eq!((p.done, p.total), (1, None));
    }

    #[test]
    fn dates_parse_to_unix_ms() {
        assert_eq!(parse_iso8601_ms("1970-01-01T00:00:00"), Some(0));
        assert_eq!(parse_iso8601_ms("1970-01-01T00:00:01.5Z"), Some(1_500));
        assert_eq!(
            parse_iso8601_ms("2026-12-03T09:26:16.945409+00:00"),
            Some(1_796_289_976_945)
        );
        assert_eq!(
            parse_iso8601_ms("2026-12-03T11:26:16.945+02:00"),
            Some(1_796_289_976_945)
        );
        assert_eq!(
            parse_iso8601_ms("2026-12-03 04:26:16-0500"),
            Some(1_796_289_976_000)
        );
        assert_eq!(
            parse_iso8601_ms("2000-02-29T00:00:00Z"),
            Some(951_782_400_000)
        );
        for bad in [
            "",
            "2026-12-03",
            "2026-13-03T00:00:00",
            "2026-12-03T24:00:00",
            "2026-12-03T00:00:00.",
            "2026-12-03T00:00:00+1",
            "2026-12-03T00:00:00 UTC",
            "1969-12-31T23:59:59Z",
            "20x6-12-03T00:00:00",
        ] {
            assert_eq!(parse_iso8601_ms(bad), None, "{bad}");
        }
    }

    fn progress_reading(done: u64, total: u64) -> Reading {
        Reading {
            done,
            total: Some(total),
            ..Reading::new(TaskState::Running)
        }
    }

    #[test]
    fn changed_at_stays_while_state_and_done_do() {
        let mut seen = Seen::default();
        let q = seen.status("t", Reading::new(TaskState::Queued), 1_000);
        assert_eq!(q.changed_at_ms, 1_000);
        let q = seen.status("t", Reading::new(TaskState::Queued), 2_000);
        assert_eq!(q.changed_at_ms, 1_000);
        assert_eq!(
            seen.status("t", progress_reading(1, 4), 3_000)
                .changed_at_ms,
            3_000
        );
        assert_eq!(
            seen.status("t", progress_reading(1, 4), 4_000)
                .changed_at_ms,
            3_000
        );
        assert_eq!(
            seen.status("t", progress_reading(2, 4), 5_000)
                .changed_at_ms,
            5_000
        );
        assert_eq!(seen.len(), 1);
        let done = seen.status(
            "t",
            Reading {
                result: Some(json!(4)),
                done_at_ms: Some(5_500),
                ..Reading::new(TaskState::Succeeded)
            },
            6_000,
        );
        assert_eq!(
            (done.done, done.total, done.changed_at_ms),
            (4, Some(4), 5_500)
        );
        assert!(seen.is_empty(), "a final task is forgotten");
    }

    #[test]
    fn a_failure_keeps_the_last_progress() {
        let mut seen = Seen::default();
        seen.status("t", progress_reading(3, 10), 1_000);
        let failed = seen.status(
            "t",
            Reading {
                error: Some("E".into()),
                ..Reading::new(TaskState::Failed)
            },
            2_000,
        );
        assert_eq!(
            (failed.done, failed.total, failed.changed_at_ms),
            (3, Some(10), 1_000)
        );
    }

    #[test]
    fn seen_is_bounded() {
        let mut seen = Seen::default();
        for i in 0..MAX_SEEN as u64 + 10 {
            seen.status(&format!("t{i}"), Reading::new(TaskState::Queued), i);
        }
        assert_eq!(seen.len(), MAX_SEEN);
        // The oldest went first.
        assert!(!seen.tasks.contains_key("t0"));
        assert!(seen.tasks.contains_key(&format!("t{}", MAX_SEEN + 9)));
    }
}
