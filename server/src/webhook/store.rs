//! Where registrations and pending deliveries live: [`DeliveryStore`] as
//! the integrator names it, and [`Backing`], the one interface the
//! delivery loop uses over the in-process queue (`local.rs`, memory or a
//! redb file) and Redis (`redis.rs`).

use super::local::Local;
use super::redis::RedisQueue;
use super::WebhookError;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Where registrations and pending deliveries are kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeliveryStore {
    /// In this process only: a restart loses them.
    Memory,
    /// A redb file of its own in this directory ([`super::local::FILE_NAME`]).
    File(PathBuf),
    /// Redis at this URL, shared by every process (claims under a lease).
    Redis(String),
}

/// One delivery, as stored: the body is fixed when it is queued, so every
/// attempt sends the same bytes under the same id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    /// `X-Taskwire-Delivery`.
    pub id: String,
    pub task_id: String,
    pub url: String,
    /// `{"type":"task","task":Task}`.
    pub body: String,
    pub created_ms: u64,
    /// Set by the first attempt; the give-up time counts from it.
    #[serde(default)]
    pub first_attempt_ms: Option<u64>,
    /// Failed attempts so far.
    #[serde(default)]
    pub failures: u32,
    /// When the next attempt is due (Unix ms).
    pub due_ms: u64,
}

/// What `on_final` found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enqueued {
    /// The task has no webhook (or it was already taken).
    NoHook,
    Queued,
    /// The queue holds `max_queue` deliveries: this one is dropped.
    Full,
}

/// Deliveries due now, taken by this process.
pub struct Claimed {
    pub due: Vec<Delivery>,
    /// The earliest due time left in the queue (Unix ms).
    pub next_due_ms: Option<u64>,
    /// Deliveries waiting or in flight.
    pub depth: usize,
}

pub enum Backing {
    Local(Local),
    Redis(RedisQueue),
}

impl Backing {
    pub async fn open(
        store: DeliveryStore,
        max_queue: usize,
        lease_ms: u64,
    ) -> Result<Backing, WebhookError> {
        Ok(match store {
            DeliveryStore::Memory => Backing::Local(Local::memory(max_queue)),
            DeliveryStore::File(dir) => Backing::Local(Local::open(&dir, max_queue).await?),
            DeliveryStore::Redis(url) => {
                Backing::Redis(RedisQueue::open(&url, max_queue, lease_ms).await?)
            }
        })
    }

    pub async fn register(&self, task_id: &str, url: &str) -> Result<(), WebhookError> {
        match self {
            Backing::Local(l) => l.register(task_id, url).await,
            Backing::Redis(r) => r.register(task_id, url).await,
        }
    }

    /// Takes the task's registration (once) and queues `make(url)`.
    pub async fn take_and_enqueue(
        &self,
        task_id: &str,
        make: impl FnOnce(String) -> Delivery,
    ) -> Result<Enqueued, WebhookError> {
        match self {
            Backing::Local(l) => l.take_and_enqueue(task_id, make).await,
            Backing::Redis(r) => r.take_and_enqueue(task_id, make).await,
        }
    }

    /// Up to `max` deliveries due by `now_ms`, now this process's to send.
    pub async fn claim(&self, now_ms: u64, max: usize) -> Result<Claimed, WebhookError> {
        match self {
            Backing::Local(l) => Ok(l.claim(now_ms, max)),
            Backing::Redis(r) => r.claim(now_ms, max).await,
        }
    }

    /// Delivered or given up: forget it.
    pub async fn done(&self, d: &Delivery) -> Result<(), WebhookError> {
        match self {
            Backing::Local(l) => l.done(d).await,
            Backing::Redis(r) => r.done(d).await,
        }
    }

    /// Failed, to be tried again at `d.due_ms`.
    pub async fn retry(&self, d: &Delivery) -> Result<(), WebhookError> {
        match self {
            Backing::Local(l) => l.retry(d).await,
            Backing::Redis(r) => r.retry(d).await,
        }
    }

    /// Deliveries waiting or in flight.
    pub async fn depth(&self) -> Result<usize, WebhookError> {
        match self {
            Backing::Local(l) => Ok(l.depth()),
            Backing::Redis(r) => r.depth().await,
        }
    }

    /// Whether other processes may queue deliveries this one must find
    /// without being told (see `REDIS_RESCAN`).
    pub fn shared(&self) -> bool {
        matches!(self, Backing::Redis(_))
    }

    pub fn close(&self) {
        if let Backing::Local(l) = self {
            l.close();
        }
    }
}
