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

use super::store::{Claim, Claimed, NextDue, Saved, Store, StoreError, RETRY_MAX, RETRY_MIN, WAKE};
use super::{commit, CAS_TRIES};
use crate::backend::Backend;
use crate::clock::Clock;
use crate::metrics as m;
use crate::rate::TokenBucket;
use crate::scheduler::policy::{Decision, PollPolicy};
use crate::scheduler::{seed, unit_jitter, Limits, SchedulerStats};
use futures::StreamExt;
use std::sync::atomic::Ordering;
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
    pub store: Store,
    pub backend: Backend,
    pub policy: Arc<PollPolicy>,
    pub limits: Limits,
    pub clock: Clock,
    pub stats: Arc<SchedulerStats>,
    /// The task service's request timeout: a poll never outlives its lease.
    pub backend_timeout: Duration,
}

impl Worker {
    pub fn lease_ms(&self) -> u64 {
        self.backend_timeout.as_millis() as u64 + LEASE_MARGIN_MS
    }

    /// Runs until `shutdown` turns true, then lets the polls in flight finish.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let wake = Arc::new(Notify::new());
        let wake_task = tokio::spawn(wake_on_new_tasks(
            self.store.clone(),
            wake.clone(),
            shutdown.clone(),
        ));
        let lease_ms = self.lease_ms();
        let max_in_flight = self.limits.max_in_flight.max(1);
        let mut bucket = (self.limits.max_polls_per_s > 0).then(|| {
            TokenBucket::new(
                self.limits.max_polls_per_s,
                self.limits.max_polls_per_s / 10,
            )
        });
        let started = Instant::now();
        let mut rng = seed();
        // The polls in flight share the worker.
        let this = Arc::new(self);
        let mut in_flight: JoinSet<()> = JoinSet::new();
        let mut retry = RETRY_MIN;
        let mut depth_read = Instant::now();
        loop {
            while in_flight.try_join_next().is_some() {}
            if depth_read.elapsed() >= m::UPKEEP_INTERVAL {
                depth_read = Instant::now();
                if let Ok(depth) = this.store.queue_len().await {
                    metrics::gauge!(m::REDIS_QUEUE_DEPTH).set(depth as f64);
                }
            }
            let free = max_in_flight.saturating_sub(in_flight.len());
            let mut sleep = MAX_SLEEP;
            if free > 0 {
                let now = this.clock.now_ms();
                let batch = free.min(CLAIM_BATCH);
                match this.store.claim(now, batch, now + lease_ms).await {
                    Ok(Claimed { due, next_due }) => {
                        retry = RETRY_MIN;
                        let full = due.len() == batch;
                        for claim in due {
                            let Claim { ref id, due_ms, .. } = claim;
                            if let Some(bucket) = &mut bucket {
                                let at = started.elapsed().as_secs_f64() * 1000.0;
                                if let Err(wait) = bucket.take(at) {
                                    this.stats.deferred.fetch_add(1, Ordering::Relaxed);
                                    let later = now + wait.as_millis() as u64;
                                    if let Err(e) = this.store.defer(id, later).await {
                                        redis_error("defer", &e);
                                    }
                                    continue;
                                }
                            }
                            let lateness = Duration::from_millis(now.saturating_sub(due_ms));
                            this.stats.polls.fetch_add(1, Ordering::Relaxed);
                            this.stats.lateness.record(lateness);
                            this.stats.lateness_seconds.record(lateness.as_secs_f64());
                            let jitter = unit_jitter(&mut rng);
                            in_flight.spawn(poll(this.clone(), claim, jitter));
                        }
                        if full {
                            continue;
                        }
                        sleep = next_due.map_or(MAX_SLEEP, |due| {
                            Duration::from_millis(due.saturating_sub(this.clock.now_ms()))
                                .min(MAX_SLEEP)
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

/// One claimed poll: read the task, ask the task service, save the outcome
/// (retrying when a `cancel` changed the task meanwhile). A failure to
/// reach Redis leaves the claim to run out; the task comes due again then.
async fn poll(ctx: Arc<Worker>, claim: Claim, jitter: f64) {
    let policy = &ctx.policy;
    let Claim { id, due_ms, stored } = claim;
    let mut stored = match stored {
        Ok(Some(stored)) => stored,
        Ok(None) => return drop_gone(&ctx, &id).await,
        Err(e) => return redis_error("load", &e),
    };
    let answer = if stored.tracked.task.state.is_final() {
        None
    } else {
        let began = Instant::now();
        let answer = ctx.backend.status(&stored.backend_id).await;
        ctx.stats.poll_seconds.record(began.elapsed().as_secs_f64());
        if let Err(e) = &answer {
            ctx.stats.poll_errors.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::BACKEND_ERRORS, "kind" => e.kind()).increment(1);
        }
        Some(answer)
    };
    for _ in 0..CAS_TRIES {
        let loaded_seq = stored.tracked.task.seq;
        let now = ctx.clock.now_ms();
        let step = match &answer {
            _ if stored.tracked.task.state.is_final() => crate::hub::transition::Step {
                next: None,
                decision: policy.after_success(true),
            },
            Some(Ok(status)) => stored.tracked.on_status(status, policy, now, jitter),
            Some(Err(e)) => stored.tracked.on_error(e, policy, now),
            None => unreachable!("a live task always has an answer"),
        };
        let changed = commit(&mut stored.tracked, step.next);
        let next = match step.decision {
            Decision::Poll(d) => NextDue::At(now + d.as_millis() as u64),
            Decision::Tick(i) => NextDue::At((due_ms + i.as_millis() as u64).max(now)),
            Decision::Expire(_) | Decision::GiveUp | Decision::Drop => NextDue::Final,
        };
        let retention_s = policy.retention_ms / 1000;
        match ctx
            .store
            .save(&stored, loaded_seq, changed, next, retention_s)
            .await
        {
            Ok(Saved::Conflict) => {
                metrics::counter!(m::REDIS_CAS_CONFLICTS).increment(1);
                match ctx.store.load(&id).await {
                    Ok(Some(again)) => stored = again,
                    Ok(None) => return drop_gone(&ctx, &id).await,
                    Err(e) => return redis_error("load", &e),
                }
            }
            Ok(Saved::Done | Saved::Gone) => return,
            Err(e) => return redis_error("save", &e),
        }
    }
}

/// A queued id whose task is gone (forgotten, or expired): out of the queue.
async fn drop_gone(ctx: &Worker, id: &str) {
    if let Err(e) = ctx.store.remove_due(id).await {
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
