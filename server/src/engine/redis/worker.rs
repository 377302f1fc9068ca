//! The Redis engine's poll worker. The task space is split into
//! [`PARTITIONS`] partitions ([`keys::partition_of`]); each worker owns
//! whole partitions and keeps their tasks and delay queues in its own
//! memory — one queue per backend, with that backend's permits, rate cap
//! and poll context, like the memory engine — so a poll costs Redis only
//! its write (plain pipelined commands, batched by the store), no claim, no
//! read and no script; a poll that changed nothing costs Redis nothing.
//!
//! **Ownership.** Every worker keeps a heartbeat in `tw:workers` (it is
//! live until [`LEASE_MS`] after its last one) and, every [`RENEW_EVERY`],
//! reads the live workers and assigns partition `p` to the `p mod W`-th of
//! them (sorted by id): every worker computes the same assignment. It
//! renews the leases (`{tw:p}:owner`, [`LEASE_MS`]) of the partitions
//! assigned to it, releases the others (after dropping their polls), and
//! takes the free ones assigned to it (`SET NX PX`). Taking a partition
//! reads its live tasks from Redis (the live set, then the tasks), each due
//! within the next [`TAKEOVER_SPREAD`] — where the last owner left them is
//! not kept anywhere but in its memory, so nothing is written per poll for
//! it.
//!
//! **New tasks** go into their partition's inbox (`{tw:p}:new`) and wake
//! the owner (`tw:wake` names the partition); the owner takes them from the
//! inbox at once, and looks at every inbox it owns on each ownership round
//! in case a wake-up was lost (and every 30 s compares each live set with
//! its memory, in case an inbox entry was).
//!
//! **Cancels** from web processes come through the partition's cancel
//! inbox (`{tw:p}:cancels`, with the task service's answer) and the same
//! wake-up; the owner applies each to its copy like a poll's answer (after
//! the poll in flight, if there is one), so the owner is the only writer
//! of its live tasks and `seq` rises by one per change.
//!
//! **Safety.** A worker whose lease renewal fails, or that finds its lease
//! taken, drops the partition at once (its polls aborted); without a
//! renewal for half a lease ([`DROP_AFTER`]) it drops it too, half a
//! second before the lease can lapse, so no two workers poll or write a
//! partition at once as long as a worker is not frozen for longer than that
//! between deciding to write and writing (a write has no compare-and-set
//! behind it: that is the price of a poll without a script).
//!
//! **Failover.** A killed worker's heartbeat and leases run out within
//! [`LEASE_MS`]; the next round of another worker (at most [`RENEW_EVERY`]
//! later) takes its partitions: its tasks are polled again within about
//! 1.5 s (plus the task service's answer time). A worker stopping cleanly releases its partitions and leaves the
//! list at once.

use super::keys::{PARTITIONS, WAKE};
use super::store::{CancelReq, Store, StoreError, Stored, RETRY_MAX, RETRY_MIN};
use super::RedisEngine;
use crate::engine::backends::Backends;
use crate::engine::cancel_step;
use crate::engine::pipeline::{Committed, Pipeline, PollCtx, TaskStore};
use crate::metrics as m;
use crate::task::id::random_hex;
use crate::task::policy::NextDue;
use crate::task::{Step, Tracked};
use futures::StreamExt;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

/// The longest a worker sleeps without looking at its queues.
pub const MAX_SLEEP: Duration = Duration::from_millis(500);
/// How long a worker's heartbeat and its partition leases last unrenewed.
pub const LEASE_MS: u64 = 1_000;
/// How often a worker renews its heartbeat and leases and rebalances.
pub const RENEW_EVERY: Duration = Duration::from_millis(LEASE_MS / 4);
/// A partition not renewed for this long is dropped: half a lease before
/// the lease can lapse and another worker take it.
const DROP_AFTER: Duration = Duration::from_millis(LEASE_MS / 2);
/// The polls of a partition just taken are spread over this much.
const TAKEOVER_SPREAD: Duration = Duration::from_millis(100);
/// Tasks read per round trip when a partition is taken.
const READ_BATCH: usize = 256;
/// The shortest time between two reads of the inboxes: new tasks wait at
/// most this long for their first poll.
const INBOX_TICK: Duration = Duration::from_millis(5);
/// Every this many rounds (30 s) the owner compares each partition's live
/// set with its memory and reads what it misses (a new task whose inbox
/// entry was lost).
const SWEEP_EVERY_ROUNDS: u64 = 120;

/// The worker role's poller.
pub struct Worker {
    pub engine: RedisEngine,
    pub backends: Backends,
}

impl Worker {
    /// Runs until `shutdown` turns true, then lets the polls in flight
    /// finish and hands its partitions back.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let store = self.engine.store.clone();
        if let Err(e) = store.check_partitions().await {
            // A Redis that is down is waited for; one written with another
            // partition count is not ours to poll.
            if let StoreError::Corrupt(_) = e {
                tracing::error!(error = %e, "the worker does not poll");
                return;
            }
        }
        let inboxes = Arc::new(Inboxes::default());
        let wake_task = tokio::spawn(wake_on_new_tasks(
            store.clone(),
            inboxes.clone(),
            shutdown.clone(),
        ));
        let slots = self.backends.slots();
        let mut owner = Owner {
            id: format!("w-{}", random_hex(8)),
            store,
            engine: self.engine.clone(),
            backends: self.backends.clone(),
            parts: HashMap::new(),
            epochs: vec![0; PARTITIONS as usize],
            tasks: HashMap::new(),
            queues: slots.iter().map(|_| BTreeSet::new()).collect(),
            pipelines: slots
                .iter()
                .map(|s| Pipeline::new(s.ctx.clone(), &s.limits))
                .collect(),
            running: vec![0; slots.len()],
            in_flight: JoinSet::new(),
            polls: HashMap::new(),
            inboxes,
            reload: Vec::new(),
        };
        owner.run(shutdown).await;
        wake_task.abort();
    }
}

/// Which partitions' inboxes may hold new tasks, set by the wake-ups.
struct Inboxes {
    dirty: Vec<AtomicBool>,
    wake: Notify,
}

impl Default for Inboxes {
    fn default() -> Self {
        Inboxes {
            dirty: (0..PARTITIONS).map(|_| AtomicBool::new(true)).collect(),
            wake: Notify::new(),
        }
    }
}

impl Inboxes {
    fn mark(&self, part: Option<u16>) {
        match part.filter(|p| *p < PARTITIONS) {
            Some(p) => self.dirty[p as usize].store(true, Ordering::Relaxed),
            None => self
                .dirty
                .iter()
                .for_each(|d| d.store(true, Ordering::Relaxed)),
        }
        self.wake.notify_one();
    }

    /// Whether any inbox may hold something.
    fn any(&self) -> bool {
        self.dirty.iter().any(|d| d.load(Ordering::Relaxed))
    }

    fn take(&self, part: u16) -> bool {
        self.dirty[part as usize].swap(false, Ordering::Relaxed)
    }
}

/// A task of an owned partition.
struct Entry {
    part: u16,
    /// Its backend's index.
    slot: usize,
    /// The task as last saved; `None` while its poll runs.
    stored: Option<Stored>,
    /// When it is due, while queued.
    due: u64,
    /// Cancels that came while its poll ran, applied when it is back.
    cancels: Vec<CancelReq>,
}

/// An owned partition.
struct Part {
    /// The last successful renewal of its lease.
    renewed: Instant,
}

/// A poll that finished.
struct Done {
    id: Arc<str>,
    part: u16,
    slot: usize,
    /// The partition's epoch when the poll started: a poll of a partition
    /// dropped meanwhile is not ours to go on with.
    epoch: u64,
    outcome: Result<Option<(Stored, NextDue)>, StoreError>,
}

struct Owner {
    id: String,
    store: Store,
    engine: RedisEngine,
    backends: Backends,
    parts: HashMap<u16, Part>,
    /// Bumped whenever a partition is dropped.
    epochs: Vec<u64>,
    tasks: HashMap<Arc<str>, Entry>,
    /// Each backend's delay queue: `(due ms, task id)`.
    queues: Vec<BTreeSet<(u64, Arc<str>)>>,
    pipelines: Vec<Pipeline>,
    /// Polls in flight per backend.
    running: Vec<usize>,
    in_flight: JoinSet<Done>,
    polls: HashMap<Arc<str>, AbortHandle>,
    inboxes: Arc<Inboxes>,
    /// Tasks whose save failed: read again from Redis.
    reload: Vec<(u16, Arc<str>)>,
}

impl Owner {
    async fn run(&mut self, mut shutdown: watch::Receiver<bool>) {
        let clock = self.backends.slot(0).ctx.clock;
        let mut round = Instant::now() - RENEW_EVERY;
        let mut rounds = 0u64;
        // When the inboxes may be read next, and the backoff after a
        // failed read (Redis away: no retry every tick).
        let mut inbox_next = Instant::now();
        let mut inbox_retry = RETRY_MIN;
        let mut retry = RETRY_MIN;
        loop {
            while let Some(done) = self.in_flight.try_join_next() {
                if let Ok(done) = done {
                    self.finish(done, clock.now_ms());
                }
            }
            if round.elapsed() >= RENEW_EVERY {
                round = Instant::now();
                match self.rebalance(clock.now_ms()).await {
                    Ok(()) => retry = RETRY_MIN,
                    Err(e) => {
                        redis_error("rebalance", &e);
                        // Try again sooner, backing off while Redis is away.
                        round = Instant::now() - RENEW_EVERY + retry;
                        retry = (retry * 2).min(RETRY_MAX);
                    }
                }
                self.inboxes.mark(None);
                rounds += 1;
                if rounds.is_multiple_of(SWEEP_EVERY_ROUNDS) {
                    self.sweep(clock.now_ms()).await;
                }
                self.report();
            }
            // New tasks and cancels, taken at most every INBOX_TICK: a burst
            // of starts costs one LPOP and one read per partition per tick.
            if Instant::now() >= inbox_next && self.inboxes.any() {
                let read_at = Instant::now();
                if self.take_new(clock.now_ms()).await {
                    inbox_next = read_at + INBOX_TICK;
                    inbox_retry = RETRY_MIN;
                } else {
                    inbox_next = Instant::now() + inbox_retry;
                    inbox_retry = (inbox_retry * 2).min(RETRY_MAX);
                }
            }
            let now = clock.now_ms();
            self.dispatch(now);
            let mut sleep = MAX_SLEEP.min(RENEW_EVERY.saturating_sub(round.elapsed()));
            if self.inboxes.any() {
                sleep = sleep.min(inbox_next.saturating_duration_since(Instant::now()));
            }
            // A backend with every permit in use waits for a poll to end
            // (`join_next` below), not for its due polls.
            for (slot, q) in self.queues.iter().enumerate() {
                let max = self.backends.slot(slot).limits.max_in_flight.max(1);
                if let (Some((due, _)), true) = (q.first(), self.running[slot] < max) {
                    sleep = sleep.min(Duration::from_millis(due.saturating_sub(now)));
                }
            }
            if sleep.is_zero() {
                continue;
            }
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = self.inboxes.wake.notified() => {}
                _ = tokio::time::sleep(sleep.max(Duration::from_millis(1))) => {}
                Some(done) = self.in_flight.join_next() => {
                    if let Ok(done) = done {
                        self.finish(done, clock.now_ms());
                    }
                }
            }
        }
        // Let the polls in flight finish, the leases kept meanwhile.
        loop {
            tokio::select! {
                done = self.in_flight.join_next() => match done {
                    Some(Ok(done)) => self.finish(done, clock.now_ms()),
                    Some(Err(_)) => {}
                    None => break,
                },
                _ = tokio::time::sleep(RENEW_EVERY.saturating_sub(round.elapsed())) => {
                    round = Instant::now();
                    // Stopping: keep what is ours until the polls end.
                    self.renew(|_| false).await;
                }
            }
        }
        let parts: Vec<u16> = self.parts.keys().copied().collect();
        for p in parts {
            self.drop_part(p);
            if let Err(e) = self.store.lease(p, &self.id, LEASE_MS, true).await {
                redis_error("release", &e);
            }
        }
        if let Err(e) = self.store.leave(&self.id).await {
            redis_error("leave", &e);
        }
    }

    /// One ownership round: heartbeat, then renew, release and take
    /// partitions by the assignment every worker computes alike.
    async fn rebalance(&mut self, now_ms: u64) -> Result<(), StoreError> {
        let workers = self
            .store
            .heartbeat(&self.id, now_ms, now_ms + LEASE_MS)
            .await?;
        let me = workers.iter().position(|w| *w == self.id);
        let assigned = |p: u16| match me {
            Some(i) => p as usize % workers.len() == i,
            None => false,
        };
        // Renew (or hand back) what is ours.
        self.renew(|p| !assigned(p)).await;
        // Take the free partitions assigned here.
        let wanted: Vec<u16> = (0..PARTITIONS)
            .filter(|p| assigned(*p) && !self.parts.contains_key(p))
            .collect();
        for p in wanted {
            if self.store.take(p, &self.id, LEASE_MS).await? {
                self.parts.insert(
                    p,
                    Part {
                        renewed: Instant::now(),
                    },
                );
                if let Err(e) = self.load_part(p, now_ms).await {
                    redis_error("take", &e);
                    self.drop_part(p);
                    let _ = self.store.lease(p, &self.id, LEASE_MS, true).await;
                }
            }
        }
        Ok(())
    }

    /// Renews the lease of every partition owned here, all at once, or
    /// hands back those `release` names; drops a partition whose lease is
    /// no longer its, or may run out before the next try.
    async fn renew(&mut self, release: impl Fn(u16) -> bool) {
        let owned: Vec<u16> = self.parts.keys().copied().collect();
        let store = &self.store;
        let id = &self.id;
        let release = &release;
        let answers = futures::future::join_all(owned.iter().map(|&p| async move {
            let release = release(p);
            (p, release, store.lease(p, id, LEASE_MS, release).await)
        }))
        .await;
        for (p, release, answer) in answers {
            match answer {
                Ok(true) if !release => {
                    if let Some(part) = self.parts.get_mut(&p) {
                        part.renewed = Instant::now();
                    }
                }
                Ok(_) => self.drop_part(p),
                Err(e) => {
                    redis_error("lease", &e);
                    self.drop_if_stale(p);
                }
            }
        }
    }

    /// Drops `p` if its lease may run out before the next renewal.
    fn drop_if_stale(&mut self, p: u16) {
        let limit = DROP_AFTER;
        if self
            .parts
            .get(&p)
            .is_some_and(|part| part.renewed.elapsed() >= limit)
        {
            self.drop_part(p);
        }
    }

    /// Forgets partition `p` here: its tasks out of the queues, its polls
    /// stopped.
    fn drop_part(&mut self, p: u16) {
        if self.parts.remove(&p).is_none() {
            return;
        }
        self.epochs[p as usize] += 1;
        let queues = &mut self.queues;
        let polls = &mut self.polls;
        let running = &mut self.running;
        self.tasks.retain(|id, entry| {
            if entry.part != p {
                return true;
            }
            if entry.stored.is_some() {
                queues[entry.slot].remove(&(entry.due, id.clone()));
            } else if let Some(poll) = polls.remove(id) {
                poll.abort();
                running[entry.slot] = running[entry.slot].saturating_sub(1);
            }
            false
        });
        self.reload.retain(|(part, _)| *part != p);
    }

    /// Reads a partition just taken: its live tasks, due within the next
    /// [`TAKEOVER_SPREAD`] (spread a little; the backends' permits and rate
    /// caps bound the burst) — after a worker died, they have waited long
    /// enough.
    async fn load_part(&mut self, p: u16, now_ms: u64) -> Result<(), StoreError> {
        // The live set has every task the inbox could name.
        self.store.clear_new(p).await?;
        let ids = self.store.live_ids(p).await?;
        let spread = TAKEOVER_SPREAD.as_millis() as u64;
        for chunk in ids.chunks(READ_BATCH) {
            let read = self.store.read(p, chunk).await?;
            for (i, (id, stored)) in chunk.iter().zip(read).enumerate() {
                let due = now_ms + (i as u64 * 7919) % spread.max(1);
                self.admit(p, id, stored, due).await;
            }
        }
        // Cancels waiting for an owner: applied now.
        self.inboxes.mark(Some(p));
        Ok(())
    }

    /// Reads the live tasks of every owned partition that are not here.
    async fn sweep(&mut self, now_ms: u64) {
        let owned: Vec<u16> = self.parts.keys().copied().collect();
        for p in owned {
            match self.store.live_ids(p).await {
                Ok(ids) => {
                    let missing: Vec<String> = ids
                        .into_iter()
                        .filter(|id| !self.tasks.contains_key(id.as_str()))
                        .collect();
                    for chunk in missing.chunks(READ_BATCH) {
                        self.read_into(p, chunk, now_ms).await;
                    }
                }
                Err(e) => redis_error("sweep", &e),
            }
        }
    }

    /// Takes the new tasks of every owned partition whose inbox was marked,
    /// and the tasks to read again. False at the first failed Redis call:
    /// that partition and those not reached yet stay marked, for a retry
    /// after a backoff.
    async fn take_new(&mut self, now_ms: u64) -> bool {
        for p in 0..PARTITIONS {
            // A mark of a partition owned elsewhere is cleared too.
            if !self.inboxes.take(p) || !self.parts.contains_key(&p) {
                continue;
            }
            loop {
                let ids = match self.store.take_new(p, READ_BATCH).await {
                    Ok(ids) => ids,
                    Err(e) => {
                        redis_error("inbox", &e);
                        self.inboxes.mark(Some(p));
                        return false;
                    }
                };
                let fresh: Vec<String> = ids
                    .into_iter()
                    .filter(|id| !self.tasks.contains_key(id.as_str()))
                    .collect();
                let more = fresh.len() == READ_BATCH;
                self.read_into(p, &fresh, now_ms).await;
                if !more {
                    break;
                }
            }
            match self.store.take_cancels(p, READ_BATCH).await {
                Ok(cancels) => {
                    for req in cancels {
                        self.cancel(p, req, now_ms).await;
                    }
                }
                Err(e) => {
                    redis_error("cancels", &e);
                    self.inboxes.mark(Some(p));
                    return false;
                }
            }
        }
        let reload = std::mem::take(&mut self.reload);
        for (p, id) in reload {
            if self.parts.contains_key(&p) && !self.tasks.contains_key(&id) {
                self.read_into(p, &[id.to_string()], now_ms).await;
            }
        }
        true
    }

    /// Reads `ids` of partition `p` into the queues, due at `due_ms`.
    async fn read_into(&mut self, p: u16, ids: &[String], due_ms: u64) {
        if ids.is_empty() {
            return;
        }
        match self.store.read(p, ids).await {
            Ok(read) => {
                for (id, stored) in ids.iter().zip(read) {
                    self.admit(p, id, stored, due_ms).await;
                }
            }
            Err(e) => {
                redis_error("read", &e);
                self.reload
                    .extend(ids.iter().map(|id| (p, Arc::<str>::from(id.as_str()))));
            }
        }
    }

    /// Queues a task read from Redis; a gone or final one leaves the
    /// partition's live set instead.
    async fn admit(
        &mut self,
        p: u16,
        id: &str,
        stored: Result<Option<Stored>, StoreError>,
        due_ms: u64,
    ) {
        match stored {
            Ok(Some(stored)) if !stored.tracked.task.state.is_final() => {
                let id: Arc<str> = id.into();
                let slot = self.backends.slot_of(&stored.backend_id);
                self.queues[slot].insert((due_ms, id.clone()));
                self.tasks.insert(
                    id,
                    Entry {
                        part: p,
                        slot,
                        stored: Some(stored),
                        due: due_ms,
                        cancels: Vec::new(),
                    },
                );
            }
            Ok(_) => {
                if let Err(e) = self.store.drop_live(p, id).await {
                    redis_error("drop", &e);
                }
            }
            Err(e) => redis_error("load", &e),
        }
    }

    /// Starts the due polls each backend has permits for.
    fn dispatch(&mut self, now_ms: u64) {
        for slot in 0..self.queues.len() {
            let max = self.backends.slot(slot).limits.max_in_flight.max(1);
            while self.running[slot] < max {
                let Some((due, id)) = self.queues[slot].first().cloned() else {
                    break;
                };
                if due > now_ms {
                    break;
                }
                self.queues[slot].pop_first();
                let Some(entry) = self.tasks.get_mut(&id) else {
                    continue;
                };
                let jitter = match self.pipelines[slot].admit(due) {
                    Ok(jitter) => jitter,
                    Err(wait) => {
                        // Over the backend's rate cap: later.
                        entry.due = now_ms + (wait.as_millis() as u64).max(1);
                        self.queues[slot].insert((entry.due, id));
                        continue;
                    }
                };
                let Some(stored) = entry.stored.take() else {
                    continue;
                };
                let done = Done {
                    id: id.clone(),
                    part: entry.part,
                    slot,
                    epoch: self.epochs[entry.part as usize],
                    outcome: Ok(None),
                };
                let ctx = self.pipelines[slot].ctx().clone();
                let engine = self.engine.clone();
                let handle = self.in_flight.spawn(async move {
                    Done {
                        outcome: poll(engine, ctx, stored, due, jitter).await,
                        ..done
                    }
                });
                self.polls.insert(id, handle);
                self.running[slot] += 1;
            }
        }
    }

    /// A poll (or a cancel) finished: the task back into its queue at its
    /// next due time, or out when final or gone; a cancel that came
    /// meanwhile is applied now.
    fn finish(&mut self, done: Done, now_ms: u64) {
        if done.epoch != self.epochs[done.part as usize] {
            // Its partition was dropped (and its count with it).
            return;
        }
        self.polls.remove(&done.id);
        self.running[done.slot] = self.running[done.slot].saturating_sub(1);
        let Some(entry) = self.tasks.get_mut(&done.id) else {
            return;
        };
        let (stored, due) = match done.outcome {
            Ok(Some((stored, NextDue::At(ms)))) => (stored, ms),
            // A cancel that left the task running: its poll stays due.
            Ok(Some((stored, NextDue::Keep))) => (stored, entry.due.max(now_ms)),
            Ok(Some((_, NextDue::Final))) | Ok(None) => {
                self.tasks.remove(&done.id);
                return;
            }
            Err(e) => {
                redis_error("write", &e);
                // Redis may or may not have it: read it back.
                self.tasks.remove(&done.id);
                self.reload.push((done.part, done.id));
                return;
            }
        };
        entry.stored = Some(stored);
        entry.due = due;
        self.queues[entry.slot].insert((due, done.id.clone()));
        if !entry.cancels.is_empty() {
            let req = entry.cancels.remove(0);
            self.spawn_cancel(done.id, req);
        }
    }

    /// A cancel from a web process for a task of partition `p`: applied to
    /// the task here (read from Redis if it is not here yet); dropped if
    /// the task is gone or already final.
    async fn cancel(&mut self, p: u16, req: CancelReq, now_ms: u64) {
        let id: Arc<str> = req.id.as_str().into();
        if !self.tasks.contains_key(&id) {
            self.read_into(p, std::slice::from_ref(&req.id), now_ms)
                .await;
        }
        if self.tasks.contains_key(&id) {
            self.spawn_cancel(id, req);
        }
    }

    /// Runs a cancel's transition on a queued task (or, while its poll
    /// runs, keeps it for when the poll is done).
    fn spawn_cancel(&mut self, id: Arc<str>, req: CancelReq) {
        let Some(entry) = self.tasks.get_mut(&id) else {
            return;
        };
        let Some(stored) = entry.stored.take() else {
            entry.cancels.push(req);
            return;
        };
        self.queues[entry.slot].remove(&(entry.due, id.clone()));
        let (slot, part) = (entry.slot, entry.part);
        let done = Done {
            id: id.clone(),
            part,
            slot,
            epoch: self.epochs[part as usize],
            outcome: Ok(None),
        };
        let ctx = self.pipelines[slot].ctx().clone();
        let engine = self.engine.clone();
        let handle = self.in_flight.spawn(async move {
            let step = cancel_step(&req.status, &ctx.policy);
            let outcome = engine
                .commit_owned(stored, None, step)
                .await
                .map(|(committed, stored)| Some((stored, committed.next)));
            Done { outcome, ..done }
        });
        self.polls.insert(id, handle);
        self.running[slot] += 1;
    }

    fn report(&self) {
        metrics::gauge!(m::REDIS_PARTITIONS).set(self.parts.len() as f64);
        for (slot, q) in self.queues.iter().enumerate() {
            let name = self.backends.slot(slot).name.to_string();
            metrics::gauge!(m::REDIS_QUEUE_DEPTH, "backend" => name).set(q.len() as f64);
        }
    }
}

/// The commit of a poll of an owned task: on its copy here, written to
/// Redis, and kept for the next poll.
struct Owned<'a> {
    engine: &'a RedisEngine,
    saved: Mutex<Option<Stored>>,
}

impl TaskStore for Owned<'_> {
    type Error = StoreError;
    type Loaded = Stored;

    async fn commit<F>(
        &self,
        _id: &str,
        first: Option<Stored>,
        due_ms: Option<u64>,
        step: F,
    ) -> Result<Option<Committed>, StoreError>
    where
        F: FnMut(&mut Tracked, u64) -> Step + Send,
    {
        let Some(first) = first else {
            return Ok(None);
        };
        let (committed, stored) = self.engine.commit_owned(first, due_ms, step).await?;
        if let Ok(mut slot) = self.saved.lock() {
            *slot = Some(stored);
        }
        Ok(Some(committed))
    }
}

/// One poll of an owned task through the pipeline: the task as saved and
/// where its next poll goes (`None`: gone).
async fn poll(
    engine: RedisEngine,
    ctx: Arc<PollCtx>,
    stored: Stored,
    due_ms: u64,
    jitter: f64,
) -> Result<Option<(Stored, NextDue)>, StoreError> {
    let id = stored.tracked.task.id.clone();
    let backend_id = (!stored.tracked.task.state.is_final()).then(|| stored.backend_id.clone());
    let owned = Owned {
        engine: &engine,
        saved: Mutex::new(None),
    };
    let committed = ctx
        .poll(
            &owned,
            &id,
            Some(stored),
            backend_id.as_deref(),
            due_ms,
            jitter,
        )
        .await?;
    let saved = owned.saved.into_inner().ok().flatten();
    Ok(committed.zip(saved).map(|(c, stored)| (stored, c.next)))
}

fn redis_error(op: &'static str, e: &StoreError) {
    tracing::warn!(error = %e, op, "Redis call failed");
    metrics::counter!(m::REDIS_ERRORS, "op" => op).increment(1);
}

/// Marks a partition's inbox when a task is created in it (the message is
/// the partition's number); every inbox after (re)subscribing, since what
/// was published meanwhile is lost.
async fn wake_on_new_tasks(
    store: Store,
    inboxes: Arc<Inboxes>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut retry = RETRY_MIN;
    loop {
        match store.subscribe(WAKE).await {
            Ok(mut pubsub) => {
                retry = RETRY_MIN;
                inboxes.mark(None);
                let mut messages = pubsub.on_message();
                loop {
                    tokio::select! {
                        _ = shutdown.changed() => return,
                        msg = messages.next() => match msg {
                            Some(msg) => {
                                let part = std::str::from_utf8(msg.get_payload_bytes())
                                    .ok()
                                    .and_then(|p| p.parse().ok());
                                inboxes.mark(part);
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
