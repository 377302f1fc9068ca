//! The Redis engine's poll worker: claims due polls from the shared delay
//! queues (a sorted set per backend scored by due time, [`super::keys::due`]),
//! polls the task service, and saves each outcome by compare-and-set, which
//! publishes the change and queues the task's next poll.
//!
//! One claim loop per backend, each with that backend's permits, rate cap
//! and poll context, like the memory engine's queue per backend: a backend
//! that is slow or down fills only its own permits and its own queue, and
//! never delays another backend's claims. A loop that claims a task of
//! another backend (the backends were reordered or renamed) moves it to
//! that backend's queue instead of polling it.
//!
//! A claim moves the entry to the end of a short lease ([`LEASE_MS`]),
//! atomically, so exactly one worker has a task at a time. The live worker
//! renews the leases of the polls it runs every [`RENEW_EVERY`] (however
//! long the task service takes), and drops a poll whose lease it could not
//! keep, so no two workers ever poll one task at once; when a worker dies
//! its leases run out within [`LEASE_MS`] and another worker takes them:
//! its tasks are polled again within about 2 s.
//!
//! Lease scores end in `.5` ([`lease_score`]), due times are whole
//! milliseconds: renewal moves an entry only while it still holds the
//! worker's own lease, never a due time a save has set meanwhile.
//!
//! No loop spins: after a claim it sleeps until the earliest due time the
//! claim read (at least [`CLAIM_TICK`], so polls due close together go in
//! one claim; at most [`MAX_SLEEP`]), or until a new task of its backend
//! wakes it (`tw:wake` names the queue), a lease needs renewing, or a poll
//! of its own finishes while its pool was full.

use super::keys::WAKE;
use super::store::{Claim, Claimed, Store, StoreError, RETRY_MAX, RETRY_MIN};
use super::RedisEngine;
use crate::engine::backends::Backends;
use crate::engine::pipeline::{Pipeline, PollCtx};
use crate::metrics as m;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

/// The longest a worker sleeps without looking at the queue (a lost wake-up
/// costs at most this).
pub const MAX_SLEEP: Duration = Duration::from_millis(500);
/// Claims per round trip, at most.
const CLAIM_BATCH: usize = 256;
/// The shortest sleep between two claims that emptied the due polls: the
/// polls due meanwhile go in the next claim, together (a claim per poll
/// would cost Redis a script call each). A poll may be this much late.
pub const CLAIM_TICK: Duration = Duration::from_millis(5);
/// How long a claim is the worker's without renewal.
pub const LEASE_MS: u64 = 1_500;
/// How often the worker renews the leases of its polls in flight.
pub const RENEW_EVERY: Duration = Duration::from_millis(LEASE_MS / 3);

/// The score of a lease ending at `until_ms`: never a whole millisecond,
/// so never equal to a due time.
pub fn lease_score(until_ms: u64) -> f64 {
    until_ms as f64 + 0.5
}

/// The polls a worker is running, with the lease each holds.
#[derive(Default)]
struct Leases {
    held: HashMap<String, (f64, AbortHandle)>,
}

impl Leases {
    /// Renews every lease; drops the polls whose lease is no longer theirs
    /// (saved already, or lost) or may run out before the next try.
    async fn renew(&mut self, store: &Store, due: &str, now_ms: u64) {
        if self.held.is_empty() {
            return;
        }
        let new = lease_score(now_ms + LEASE_MS);
        let batch: Vec<(&str, f64, f64)> = self
            .held
            .iter()
            .map(|(id, (held, _))| (id.as_str(), *held, new))
            .collect();
        match store.renew(due, &batch).await {
            Ok(flags) => {
                let ids: Vec<String> = batch.iter().map(|(id, ..)| id.to_string()).collect();
                for (id, renewed) in ids.into_iter().zip(flags) {
                    if renewed {
                        if let Some(entry) = self.held.get_mut(&id) {
                            entry.0 = new;
                        }
                    } else if let Some((_, poll)) = self.held.remove(&id) {
                        // Saved (it is finishing) or taken by another
                        // worker after a lapse: either way not ours.
                        poll.abort();
                    }
                }
            }
            Err(e) => {
                redis_error("renew", &e);
                // Unrenewed, a lease that ends before the next try may be
                // claimed elsewhere: stop those polls now.
                let cutoff = (now_ms + RENEW_EVERY.as_millis() as u64) as f64;
                self.held.retain(|_, (held, poll)| {
                    let keep = *held > cutoff;
                    if !keep {
                        poll.abort();
                    }
                    keep
                });
            }
        }
    }
}

/// The worker role's poller: a claim loop per backend.
pub struct Worker {
    pub engine: RedisEngine,
    pub backends: Backends,
}

impl Worker {
    /// Runs until `shutdown` turns true, then lets the polls in flight finish.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let store = self.engine.store.clone();
        let dues = self.engine.dues().to_vec();
        let wakes: Vec<Arc<Notify>> = dues.iter().map(|_| Arc::new(Notify::new())).collect();
        let wake_task = tokio::spawn(wake_on_new_tasks(
            store,
            dues.iter().cloned().zip(wakes.iter().cloned()).collect(),
            shutdown.clone(),
        ));
        let mut loops = JoinSet::new();
        for (slot, (due, wake)) in dues.into_iter().zip(wakes).enumerate() {
            let claims = ClaimLoop {
                engine: self.engine.clone(),
                backends: self.backends.clone(),
                slot,
                due: due.into(),
                wake,
            };
            loops.spawn(claims.run(shutdown.clone()));
        }
        while loops.join_next().await.is_some() {}
        wake_task.abort();
    }
}

/// One backend's claims: its queue, its permits, its rate cap, its leases.
struct ClaimLoop {
    engine: RedisEngine,
    backends: Backends,
    /// The backend's index.
    slot: usize,
    /// Its delay queue.
    due: Arc<str>,
    wake: Arc<Notify>,
}

impl ClaimLoop {
    async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let store = self.engine.store.clone();
        let slot = self.backends.slot(self.slot);
        let max_in_flight = slot.limits.max_in_flight.max(1);
        let mut pipeline = Pipeline::new(slot.ctx.clone(), &slot.limits);
        let backend = ::metrics::Label::new("backend", slot.name.to_string());
        let clock = slot.ctx.clock;
        let due_key = self.due.clone();
        let due = &*due_key;
        let engine = self.engine;
        let mut in_flight: JoinSet<String> = JoinSet::new();
        let mut leases = Leases::default();
        let mut renewed = Instant::now();
        let mut retry = RETRY_MIN;
        let mut depth_read = Instant::now();
        loop {
            while let Some(done) = in_flight.try_join_next() {
                if let Ok(id) = done {
                    leases.held.remove(&id);
                }
            }
            if renewed.elapsed() >= RENEW_EVERY {
                renewed = Instant::now();
                leases.renew(&store, due, clock.now_ms()).await;
            }
            if depth_read.elapsed() >= m::UPKEEP_INTERVAL {
                depth_read = Instant::now();
                if let Ok(depth) = store.queue_len(due).await {
                    metrics::gauge!(m::REDIS_QUEUE_DEPTH, vec![backend.clone()]).set(depth as f64);
                }
            }
            let free = max_in_flight.saturating_sub(in_flight.len());
            let mut sleep = MAX_SLEEP;
            if free > 0 {
                let now = clock.now_ms();
                let batch = free.min(CLAIM_BATCH);
                let lease = lease_score(now + LEASE_MS);
                match store.claim(due, now, batch, lease).await {
                    Ok(Claimed {
                        due: claims,
                        next_due,
                    }) => {
                        retry = RETRY_MIN;
                        let full = claims.len() == batch;
                        for claim in claims {
                            if let Ok(Some(stored)) = &claim.stored {
                                let owner = self.backends.slot_of(&stored.backend_id);
                                if owner != self.slot {
                                    let to = engine.dues()[owner].as_str();
                                    let moved =
                                        store.relocate(due, to, &claim.id, lease, claim.due_ms);
                                    if let Err(e) = moved.await {
                                        redis_error("relocate", &e);
                                    }
                                    continue;
                                }
                            }
                            let jitter = match pipeline.admit(claim.due_ms) {
                                Ok(jitter) => jitter,
                                Err(wait) => {
                                    let later = now + wait.as_millis() as u64;
                                    if let Err(e) = store.defer(due, &claim.id, later).await {
                                        redis_error("defer", &e);
                                    }
                                    continue;
                                }
                            };
                            let id = claim.id.clone();
                            let running = in_flight.spawn(poll(
                                engine.clone(),
                                pipeline.ctx().clone(),
                                due_key.clone(),
                                claim,
                                jitter,
                            ));
                            leases.held.insert(id, (lease, running));
                        }
                        if full {
                            continue;
                        }
                        sleep = next_due.map_or(MAX_SLEEP, |due| {
                            Duration::from_millis(due.saturating_sub(clock.now_ms()))
                                .clamp(CLAIM_TICK, MAX_SLEEP)
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
            if !leases.held.is_empty() {
                sleep = sleep.min(RENEW_EVERY.saturating_sub(renewed.elapsed()));
            }
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
                Some(done) = in_flight.join_next(), if free == 0 => {
                    if let Ok(id) = done {
                        leases.held.remove(&id);
                    }
                }
            }
        }
        // Let the polls in flight finish, their leases kept meanwhile.
        loop {
            tokio::select! {
                done = in_flight.join_next() => match done {
                    Some(Ok(id)) => { leases.held.remove(&id); }
                    Some(Err(_)) => {}
                    None => break,
                },
                _ = tokio::time::sleep(RENEW_EVERY.saturating_sub(renewed.elapsed())) => {
                    renewed = Instant::now();
                    leases.renew(&store, due, clock.now_ms()).await;
                }
            }
        }
    }
}

/// One claimed poll through the pipeline, committed by compare-and-set
/// from the state the claim read. A failure to reach Redis leaves the claim
/// to run out; the task comes due again then.
async fn poll(
    engine: RedisEngine,
    ctx: Arc<PollCtx>,
    due: Arc<str>,
    claim: Claim,
    jitter: f64,
) -> String {
    let Claim { id, due_ms, stored } = claim;
    let stored = match stored {
        Ok(Some(stored)) => stored,
        Ok(None) => {
            drop_gone(&engine.store, &due, &id).await;
            return id;
        }
        Err(e) => {
            redis_error("load", &e);
            return id;
        }
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
    id
}

/// A queued id whose task is gone (forgotten, or expired): out of the queue.
async fn drop_gone(store: &Store, due: &str, id: &str) {
    if let Err(e) = store.remove_due(due, id).await {
        redis_error("remove", &e);
    }
}

fn redis_error(op: &'static str, e: &StoreError) {
    tracing::warn!(error = %e, op, "Redis call failed");
    metrics::counter!(m::REDIS_ERRORS, "op" => op).increment(1);
}

/// Wakes the claim loop of a task's backend whenever a task is created (its
/// first poll is due at once): each message names a delay queue (`dues`:
/// queue → its loop's wake-up); any other message (a task id, from a
/// version with one queue) wakes every loop. Resubscribes after Redis
/// comes back.
async fn wake_on_new_tasks(
    store: Store,
    dues: HashMap<String, Arc<Notify>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let wake_all = || dues.values().for_each(|w| w.notify_one());
    let mut retry = RETRY_MIN;
    loop {
        match store.subscribe(WAKE).await {
            Ok(mut pubsub) => {
                retry = RETRY_MIN;
                // Whatever was created while unsubscribed is due now.
                wake_all();
                let mut messages = pubsub.on_message();
                loop {
                    tokio::select! {
                        _ = shutdown.changed() => return,
                        msg = messages.next() => match msg {
                            Some(msg) => {
                                let queue = std::str::from_utf8(msg.get_payload_bytes()).ok();
                                match queue.and_then(|q| dues.get(q)) {
                                    Some(wake) => wake.notify_one(),
                                    None => wake_all(),
                                }
                            }
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
