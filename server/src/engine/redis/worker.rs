//! The Redis engine's poll worker: claims due polls from the shared delay
//! queue (`tw:due`, a sorted set scored by due time), polls the task
//! service, and saves each outcome by compare-and-set, which publishes the
//! change and queues the task's next poll.
//!
//! A claim moves the entry to the end of a lease (the backend timeout plus
//! a margin), atomically, so exactly one worker has a task at a time; when
//! a worker dies its claims come due again after the lease and another
//! worker takes them. No worker spins: after a claim it sleeps until the
//! earliest due time the claim read (at most [`MAX_SLEEP`]), or until a new
//! task wakes it (`tw:wake`), or a poll of its own finishes while its pool
//! was full.

use super::keys::WAKE;
use super::store::{Claim, Claimed, Store, StoreError, RETRY_MAX, RETRY_MIN};
use super::RedisEngine;
use crate::engine::pipeline::{Limits, Pipeline, PollCtx};
use crate::metrics as m;
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// The longest a worker sleeps without looking at the queue (a lost wake-up
/// costs at most this).
pub const MAX_SLEEP: Duration = Duration::from_millis(500);
/// Claims per round trip, at most.
const CLAIM_BATCH: usize = 256;
/// Beyond the backend timeout, how long a claim stays the worker's.
const LEASE_MARGIN_MS: u64 = 2_000;

pub struct Worker {
    pub engine: RedisEngine,
    pub ctx: Arc<PollCtx>,
    pub limits: Limits,
    /// The task service's request timeout: a poll never outlives its lease.
    pub backend_timeout: Duration,
}

impl Worker {
    pub fn lease_ms(&self) -> u64 {
        self.backend_timeout.as_millis() as u64 + LEASE_MARGIN_MS
    }

    /// Runs until `shutdown` turns true, then lets the polls in flight finish.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let store = self.engine.store.clone();
        let wake = Arc::new(Notify::new());
        let wake_task = tokio::spawn(wake_on_new_tasks(
            store.clone(),
            wake.clone(),
            shutdown.clone(),
        ));
        let lease_ms = self.lease_ms();
        let max_in_flight = self.limits.max_in_flight.max(1);
        let mut pipeline = Pipeline::new(self.ctx.clone(), &self.limits);
        let clock = self.ctx.clock;
        let engine = self.engine;
        let mut in_flight: JoinSet<()> = JoinSet::new();
        let mut retry = RETRY_MIN;
        let mut depth_read = Instant::now();
        loop {
            while in_flight.try_join_next().is_some() {}
            if depth_read.elapsed() >= m::UPKEEP_INTERVAL {
                depth_read = Instant::now();
                if let Ok(depth) = store.queue_len().await {
                    metrics::gauge!(m::REDIS_QUEUE_DEPTH).set(depth as f64);
                }
            }
            let free = max_in_flight.saturating_sub(in_flight.len());
            let mut sleep = MAX_SLEEP;
            if free > 0 {
                let now = clock.now_ms();
                let batch = free.min(CLAIM_BATCH);
                match store.claim(now, batch, now + lease_ms).await {
                    Ok(Claimed { due, next_due }) => {
                        retry = RETRY_MIN;
                        let full = due.len() == batch;
                        for claim in due {
                            let jitter = match pipeline.admit(claim.due_ms) {
                                Ok(jitter) => jitter,
                                Err(wait) => {
                                    let later = now + wait.as_millis() as u64;
                                    if let Err(e) = store.defer(&claim.id, later).await {
                                        redis_error("defer", &e);
                                    }
                                    continue;
                                }
                            };
                            in_flight.spawn(poll(
                                engine.clone(),
                                pipeline.ctx().clone(),
                                claim,
                                jitter,
                            ));
                        }
                        if full {
                            continue;
                        }
                        sleep = next_due.map_or(MAX_SLEEP, |due| {
                            Duration::from_millis(due.saturating_sub(clock.now_ms())).min(MAX_SLEEP)
                        });
                    }
                    Err(e) => {
                        redis_error("claim", &e);
                        sleep = retry;
                        retry = (retry * 2).min(RETRY_MAX);
                    }
                }
            }
            if sleep.is_zero() {
                continue;
            }
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
                Some(_) = in_flight.join_next(), if free == 0 => {}
            }
        }
        while in_flight.join_next().await.is_some() {}
        wake_task.abort();
    }
}

/// One claimed poll through the pipeline, committed by compare-and-set
/// from the state the claim read. A failure to reach Redis leaves the claim
/// to run out; the task comes due again then.
async fn poll(engine: RedisEngine, ctx: Arc<PollCtx>, claim: Claim, jitter: f64) {
    let Claim { id, due_ms, stored } = claim;
    let stored = match stored {
        Ok(Some(stored)) => stored,
        Ok(None) => return drop_gone(&engine.store, &id).await,
        Err(e) => return redis_error("load", &e),
    };
    let backend_id = (!stored.tracked.task.state.is_final()).then(|| stored.backend_id.clone());
    let polled = ctx
        .poll(
            &engine,
            &id,
            Some(stored),
            backend_id.as_deref(),
            due_ms,
            jitter,
        )
        .await;
    if let Err(e) = polled {
        redis_error("save", &e);
    }
}

/// A queued id whose task is gone (forgotten, or expired): out of the queue.
async fn drop_gone(store: &Store, id: &str) {
    if let Err(e) = store.remove_due(id).await {
        redis_error("remove", &e);
    }
}

fn redis_error(op: &'static str, e: &StoreError) {
    tracing::warn!(error = %e, op, "Redis call failed");
    metrics::counter!(m::REDIS_ERRORS, "op" => op).increment(1);
}

/// Wakes the claim loop whenever a task is created (its first poll is due
/// at once), resubscribing after Redis comes back.
async fn wake_on_new_tasks(store: Store, wake: Arc<Notify>, mut shutdown: watch::Receiver<bool>) {
    let mut retry = RETRY_MIN;
    loop {
        match store.subscribe(WAKE).await {
            Ok(mut pubsub) => {
                retry = RETRY_MIN;
                // Whatever was created while unsubscribed is due now.
                wake.notify_one();
                let mut messages = pubsub.on_message();
                loop {
                    tokio::select! {
                        _ = shutdown.changed() => return,
                        msg = messages.next() => match msg {
                            Some(_) => wake.notify_one(),
                            None => break,
                        },
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot subscribe to {WAKE}"),
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(retry) => {}
        }
        retry = (retry * 2).min(RETRY_MAX);
    }
}
