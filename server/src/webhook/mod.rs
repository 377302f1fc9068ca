//! Webhooks: when a task that has one reaches a final state, POST
//! `{"type":"task","task":Task}` to its URL, signed, retried with backoff
//! and full jitter until the give-up time, at least once
//! (docs/webhooks.md; the contract: protocol.md §4).
//!
//! - `allow.rs`: the SSRF guard (URL prefixes, compared parsed).
//! - `sign.rs`: `X-Taskwire-Signature`. `backoff.rs`: when to try again.
//! - `store.rs`: where registrations and deliveries live — `local.rs`
//!   (memory, or a redb file of its own) or `redis.rs` (shared, leased).
//! - here: the handle the engine calls, and the one delivery loop: it
//!   sleeps until the earliest due delivery (one queue, no timer per
//!   delivery) or until woken, and sends at most `max_in_flight` at once.

pub mod allow;
pub mod backoff;
mod local;
mod redis;
pub mod settings;
pub mod sign;
mod store;

pub use local::FILE_NAME;
pub use settings::WebhookSettings;
pub use store::{Delivery, DeliveryStore};

use crate::backend::client::Client;
use crate::backend::BackendError;
use crate::clock::Clock;
use crate::metrics as m;
use crate::task::jitter::Jitter;
use allow::{AllowList, Scheme};
use app::protocol::{Task, TaskMsgRef};
use backoff::{Next, Schedule};
use bytes::Bytes;
use hyper::header::{HeaderName, HeaderValue, USER_AGENT};
use hyper::Method;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::{Backing, Enqueued};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

pub const DELIVERY_HEADER: &str = "x-taskwire-delivery";
pub const TIMESTAMP_HEADER: &str = "x-taskwire-timestamp";
pub const SIGNATURE_HEADER: &str = "x-taskwire-signature";

/// With Redis, another process may queue a delivery (or die holding a
/// lease) without this one hearing of it: the loop looks again at least
/// this often. In memory and in the file, every change comes through this
/// process, so the loop sleeps until the next due time, however far.
const REDIS_RESCAN: Duration = Duration::from_secs(5);
/// A claim's lease beyond one attempt's timeout: time to record the outcome.
const LEASE_SLACK_MS: u64 = 10_000;
/// After a failed claim (Redis away), the loop tries again after this.
const STORE_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("bad [webhooks] settings: {0}")]
    Settings(String),
    #[error("webhook refused: {0}")]
    Url(String),
    #[error("cannot create the data directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the webhook file {path}: {source} (a damaged file is never replaced silently: move it away to start empty)")]
    Open { path: PathBuf, source: redb::Error },
    #[error("the webhook file {path} holds a delivery it cannot read ({id}): {source}")]
    Corrupt {
        path: PathBuf,
        id: String,
        source: serde_json::Error,
    },
    #[error("the webhook store failed: {0}")]
    Store(String),
    #[error("the webhook store (Redis) is unreachable: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("webhooks are closed")]
    Closed,
}

/// The webhook handle (cheap to clone); its delivery loop runs in the
/// background until [`Webhooks::close`].
#[derive(Clone)]
pub struct Webhooks {
    inner: Arc<Inner>,
}

struct Inner {
    secret: Vec<u8>,
    allow: AllowList,
    schedule: Schedule,
    max_in_flight: usize,
    /// One keep-alive pool per allowed `http://` origin, by `host:port`
    /// (bounded by the allow-list).
    clients: HashMap<String, Client>,
    backing: Backing,
    clock: Clock,
    jitter: Mutex<Jitter>,
    /// Wakes the loop: a delivery was queued, or an attempt finished.
    wake: Notify,
    stop: watch::Sender<bool>,
    running: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Webhooks {
    /// Checks the settings, opens the store (loading what a file holds)
    /// and starts the delivery loop.
    pub async fn start(
        settings: WebhookSettings,
        store: DeliveryStore,
        clock: Clock,
    ) -> Result<Webhooks, WebhookError> {
        settings.validate().map_err(WebhookError::Settings)?;
        let allow = AllowList::parse(&settings.allow).map_err(WebhookError::Settings)?;
        let timeout = Duration::from_millis(settings.timeout_ms);
        // One client (a keep-alive pool) per origin the allow-list names;
        // https ones over rustls, trusting Mozilla's roots and `ca_file`.
        let https = allow
            .prefixes()
            .iter()
            .any(|p| p.url().scheme == Scheme::Https);
        let tls = if https {
            Some(
                crate::backend::tls::connector(settings.ca_file.as_deref())
                    .map_err(|e| WebhookError::Settings(format!("ca_file: {e}")))?,
            )
        } else {
            None
        };
        let mut clients = HashMap::new();
        for prefix in allow.prefixes() {
            let url = prefix.url();
            let origin = origin_of(url);
            let client = Client::with_tls(&origin, timeout, tls.as_ref())
                .map_err(|e| WebhookError::Settings(e.to_string()))?;
            clients.insert(origin, client);
        }
        let lease_ms = settings.timeout_ms + LEASE_SLACK_MS;
        let backing = Backing::open(store, settings.max_queue, lease_ms).await?;
        let (stop, stopped) = watch::channel(false);
        let inner = Arc::new(Inner {
            secret: settings.secret.into_bytes(),
            allow,
            schedule: Schedule {
                initial_ms: settings.retry_initial_ms,
                max_ms: settings.retry_max_ms,
                give_up_ms: settings.give_up_s.saturating_mul(1000),
            },
            max_in_flight: settings.max_in_flight,
            clients,
            backing,
            clock,
            jitter: Mutex::new(Jitter::new()),
            wake: Notify::new(),
            stop,
            running: tokio::sync::Mutex::new(None),
        });
        let task = tokio::spawn(run(inner.clone(), stopped));
        *inner.running.lock().await = Some(task);
        Ok(Webhooks { inner })
    }

    /// Whether a webhook URL is allowed; the error says why not (for
    /// `invalid_params`).
    pub fn check_url(&self, url: &str) -> Result<(), String> {
        self.inner.allow.check(url).map(|_| ())
    }

    /// Records that `task_id` has a webhook (durably where the store is),
    /// after [`Webhooks::check_url`]. A second call replaces the URL.
    pub async fn register(&self, task_id: &str, url: &str) -> Result<(), WebhookError> {
        self.check_url(url).map_err(WebhookError::Url)?;
        self.inner.backing.register(task_id, url).await
    }

    /// Called for every final state committed: if the task has a webhook,
    /// its registration is taken (once) and a delivery queued. A task
    /// without one costs a map lookup (a Redis `HGET` with Redis). Errors
    /// are logged and counted, not returned: the task's state stands.
    pub async fn on_final(&self, task: &Task) {
        if !task.state.is_final() {
            return;
        }
        let inner = &self.inner;
        let now = inner.clock.now_ms();
        let make = |url: String| Delivery {
            id: delivery_id(),
            task_id: task.id.clone(),
            url,
            body: serde_json::to_string(&TaskMsgRef { task }).expect("a Task always serialises"),
            created_ms: now,
            first_attempt_ms: None,
            failures: 0,
            due_ms: now,
        };
        match inner.backing.take_and_enqueue(&task.id, make).await {
            Ok(Enqueued::NoHook) => {}
            Ok(Enqueued::Queued) => inner.wake.notify_one(),
            Ok(Enqueued::Full) => {
                metrics::counter!(m::WEBHOOK_DELIVERIES, "outcome" => "refused").increment(1);
                tracing::error!(task = %task.id, "webhook queue full (webhooks.max_queue): delivery dropped");
            }
            Err(e) => {
                metrics::counter!(m::WEBHOOK_DELIVERIES, "outcome" => "store_error").increment(1);
                tracing::error!(task = %task.id, error = %e, "cannot queue a webhook delivery");
                // With a file that failed to write, the delivery is queued
                // in memory all the same.
                inner.wake.notify_one();
            }
        }
    }

    /// Deliveries waiting or in flight.
    pub async fn pending(&self) -> Result<usize, WebhookError> {
        self.inner.backing.depth().await
    }

    /// Stops the loop: no new attempt starts, those in flight finish (each
    /// within `timeout_ms`) and are recorded, then the file is released.
    /// What is still queued stays in the file or in Redis for the next start.
    pub async fn close(&self) {
        let _ = self.inner.stop.send(true);
        if let Some(task) = self.inner.running.lock().await.take() {
            let _ = task.await;
        }
        self.inner.backing.close();
    }
}

/// 128 random bits, hex.
fn delivery_id() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the OS random source works");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The delivery loop.
async fn run(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let mut in_flight = JoinSet::new();
    loop {
        let free = inner.max_in_flight.saturating_sub(in_flight.len());
        let mut wait = if inner.backing.shared() {
            Some(REDIS_RESCAN)
        } else {
            None
        };
        if free > 0 {
            let now = inner.clock.now_ms();
            match inner.backing.claim(now, free).await {
                Ok(claimed) => {
                    metrics::gauge!(m::WEBHOOK_QUEUE_DEPTH).set(claimed.depth as f64);
                    let full = claimed.due.len() == free;
                    for d in claimed.due {
                        in_flight.spawn(attempt(inner.clone(), d));
                    }
                    if let Some(at) = claimed.next_due_ms.filter(|_| !full) {
                        let d = Duration::from_millis(at.saturating_sub(now));
                        wait = Some(wait.map_or(d, |w| w.min(d)));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "claiming webhook deliveries failed");
                    wait = Some(STORE_RETRY);
                }
            }
        }
        let sleep = async {
            match wait {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = inner.wake.notified() => {}
            _ = sleep => {}
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
        }
    }
    // Each attempt ends within the timeout and records its outcome.
    while in_flight.join_next().await.is_some() {}
}

/// One attempt of `d`, its outcome recorded.
async fn attempt(inner: Arc<Inner>, mut d: Delivery) {
    let now = inner.clock.now_ms();
    let first = *d.first_attempt_ms.get_or_insert(now);
    let result = post(&inner, &d).await;
    let failure = match result {
        Ok(status) if (200..300).contains(&status) => None,
        Ok(status) => Some((status_kind(status), format!("answered {status}"))),
        Err(BackendError::Unavailable { kind, reason, .. }) => Some((kind, reason)),
        Err(e) => Some(("protocol", e.to_string())),
    };
    let recorded = match failure {
        None => {
            metrics::counter!(m::WEBHOOK_DELIVERIES, "outcome" => "delivered").increment(1);
            inner.backing.done(&d).await
        }
        Some((kind, reason)) => {
            metrics::counter!(m::WEBHOOK_FAILURES, "kind" => kind).increment(1);
            d.failures += 1;
            let unit = inner
                .jitter
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .unit();
            match inner
                .schedule
                .next(first, inner.clock.now_ms(), d.failures, unit)
            {
                Next::RetryAt(at) => {
                    tracing::info!(delivery = %d.id, task = %d.task_id, failures = d.failures,
                        reason = %reason, retry_in_ms = at.saturating_sub(now), "webhook attempt failed");
                    metrics::counter!(m::WEBHOOK_RETRIES).increment(1);
                    d.due_ms = at;
                    inner.backing.retry(&d).await
                }
                Next::GiveUp => {
                    tracing::warn!(delivery = %d.id, task = %d.task_id, failures = d.failures,
                        reason = %reason, "webhook given up (webhooks.give_up_s)");
                    metrics::counter!(m::WEBHOOK_DELIVERIES, "outcome" => "gave_up").increment(1);
                    inner.backing.done(&d).await
                }
            }
        }
    };
    if let Err(e) = recorded {
        // Memory still has it; with Redis its lease ends and it is sent
        // again: at least once either way.
        tracing::error!(delivery = %d.id, error = %e, "recording a webhook attempt failed");
    }
    inner.wake.notify_one();
}

/// `scheme://host:port` of a URL: what its client is kept under.
fn origin_of(url: &allow::Url) -> String {
    let scheme = match url.scheme {
        Scheme::Http => "http",
        Scheme::Https => "https",
    };
    format!("{scheme}://{}", url.authority())
}

/// The POST; the answer's status.
async fn post(inner: &Inner, d: &Delivery) -> Result<u16, BackendError> {
    // Checked again: the allow-list may have changed since the delivery
    // was queued (a restart with a new configuration).
    let url = inner
        .allow
        .check(&d.url)
        .map_err(|e| BackendError::Protocol(format!("no longer allowed: {e}")))?;
    let client = inner
        .clients
        .get(&origin_of(&url))
        .ok_or_else(|| BackendError::Protocol("no client for this origin".into()))?;
    let ts = inner.clock.now_ms();
    let signature = sign::signature(&inner.secret, ts, d.body.as_bytes());
    let header = |v: &str| HeaderValue::from_str(v).expect("ids, digits and hex are header-safe");
    let headers = [
        (HeaderName::from_static(DELIVERY_HEADER), header(&d.id)),
        (
            HeaderName::from_static(TIMESTAMP_HEADER),
            header(&ts.to_string()),
        ),
        (
            HeaderName::from_static(SIGNATURE_HEADER),
            header(&signature),
        ),
        (
            USER_AGENT,
            HeaderValue::from_static(concat!("taskwire/", env!("CARGO_PKG_VERSION"))),
        ),
    ];
    let answer = client
        .request(
            Method::POST,
            &url.path_and_query(),
            &headers,
            Some(Bytes::from(d.body.clone())),
        )
        .await?;
    Ok(answer.status.as_u16())
}

fn status_kind(status: u16) -> &'static str {
    match status {
        300..=399 => "http_3xx",
        400..=499 => "http_4xx",
        500..=599 => "http_5xx",
        _ => "http_other",
    }
}
