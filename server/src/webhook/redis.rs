//! Deliveries in Redis, shared by every taskwire process:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `{tw:hooks}` | hash | task id → webhook URL (registered, not yet final) |
//! | `{tw:hooks}:pending` | hash | delivery id → [`Delivery`] JSON |
//! | `{tw:hooks}:due` | sorted set | delivery id by next attempt (Unix ms), or by lease end while a process sends it |
//!
//! The three share one hash tag, so the scripts run on a Redis Cluster too
//! (one slot). The names of earlier versions (`tw:hooks`, ...) are renamed
//! to these when a process opens a single Redis that still has them.
//!
//! A final state takes the registration and queues the delivery in one
//! script (`lua/enqueue.lua`), so exactly one process queues it; a process
//! claims due deliveries under a lease (`lua/claim.lua`), so two never send
//! one at once, and a dead one's claims come due again.

use super::store::{Claimed, Delivery, Enqueued};
use super::WebhookError;
use crate::engine::redis::conn::{self, Conn};
use redis::Script;
use std::sync::LazyLock;

pub const HOOKS: &str = "{tw:hooks}";
pub const PENDING: &str = "{tw:hooks}:pending";
pub const DUE: &str = "{tw:hooks}:due";
/// The names of versions before the hash tag, renamed on open.
const OLD: [(&str, &str); 3] = [
    ("tw:hooks", HOOKS),
    ("tw:hooks:pending", PENDING),
    ("tw:hooks:due", DUE),
];

static ENQUEUE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/enqueue.lua")));
static CLAIM: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/claim.lua")));

pub struct RedisQueue {
    conn: Conn,
    max_queue: usize,
    /// How long a claim holds a delivery: longer than one attempt.
    lease_ms: u64,
}

impl RedisQueue {
    /// Connects lazily, like the engine's store: start-up does not wait
    /// for Redis, and calls fail fast while it is away.
    pub async fn open(
        url: &str,
        max_queue: usize,
        lease_ms: u64,
    ) -> Result<RedisQueue, WebhookError> {
        let target = conn::open(url)?;
        let conn = target.conn;
        if !target.cluster {
            // Best effort: a Redis that is down has nothing to rename now.
            let mut c = conn.clone();
            for (old, new) in OLD {
                let _: Result<i64, _> = redis::cmd("RENAMENX")
                    .arg(old)
                    .arg(new)
                    .query_async(&mut c)
                    .await;
            }
        }
        Ok(RedisQueue {
            conn,
            max_queue,
            lease_ms,
        })
    }

    pub async fn register(&self, task_id: &str, url: &str) -> Result<(), WebhookError> {
        let mut c = self.conn.clone();
        redis::cmd("HSET")
            .arg(HOOKS)
            .arg(task_id)
            .arg(url)
            .query_async::<()>(&mut c)
            .await?;
        Ok(())
    }

    pub async fn take_and_enqueue(
        &self,
        task_id: &str,
        make: impl FnOnce(String) -> Delivery,
    ) -> Result<Enqueued, WebhookError> {
        let mut c = self.conn.clone();
        // One HGET for the common case (no webhook); the script then takes
        // the registration atomically.
        let url: Option<String> = redis::cmd("HGET")
            .arg(HOOKS)
            .arg(task_id)
            .query_async(&mut c)
            .await?;
        let Some(url) = url else {
            return Ok(Enqueued::NoHook);
        };
        let d = make(url);
        let json = serde_json::to_string(&d).expect("a delivery always serialises");
        let verdict: i64 = ENQUEUE
            .key(HOOKS)
            .key(PENDING)
            .key(DUE)
            .arg(task_id)
            .arg(&d.id)
            .arg(json)
            .arg(d.due_ms)
            .arg(self.max_queue)
            .invoke_async(&mut c)
            .await?;
        Ok(match verdict {
            1 => Enqueued::Queued,
            0 => Enqueued::NoHook,
            _ => Enqueued::Full,
        })
    }

    pub async fn claim(&self, now_ms: u64, max: usize) -> Result<Claimed, WebhookError> {
        let mut c = self.conn.clone();
        let mut flat: Vec<String> = CLAIM
            .key(PENDING)
            .key(DUE)
            .arg(now_ms)
            .arg(max)
            .arg(now_ms + self.lease_ms)
            .invoke_async(&mut c)
            .await?;
        let depth = flat.pop().and_then(|s| s.parse().ok()).unwrap_or(0);
        let next_due_ms = flat
            .pop()
            .and_then(|s| s.parse::<f64>().ok())
            .map(|f| f.max(0.0) as u64);
        let mut due = Vec::with_capacity(flat.len());
        for json in flat {
            match serde_json::from_str::<Delivery>(&json) {
                Ok(d) => due.push(d),
                // Left leased: it comes due again, and is logged again, at
                // each lease's end; never sent half-read.
                Err(e) => tracing::error!(error = %e, "an unreadable webhook delivery in Redis"),
            }
        }
        Ok(Claimed {
            due,
            next_due_ms,
            depth,
        })
    }

    pub async fn done(&self, d: &Delivery) -> Result<(), WebhookError> {
        let mut c = self.conn.clone();
        redis::pipe()
            .atomic()
            .hdel(PENDING, &d.id)
            .ignore()
            .zrem(DUE, &d.id)
            .ignore()
            .query_async::<()>(&mut c)
            .await?;
        Ok(())
    }

    pub async fn retry(&self, d: &Delivery) -> Result<(), WebhookError> {
        let json = serde_json::to_string(d).expect("a delivery always serialises");
        let mut c = self.conn.clone();
        redis::pipe()
            .atomic()
            .hset(PENDING, &d.id, json)
            .ignore()
            .zadd(DUE, &d.id, d.due_ms)
            .ignore()
            .query_async::<()>(&mut c)
            .await?;
        Ok(())
    }

    pub async fn depth(&self) -> Result<usize, WebhookError> {
        let mut c = self.conn.clone();
        Ok(redis::cmd("HLEN").arg(PENDING).query_async(&mut c).await?)
    }
}
