//! The poll engine: one delay queue holds the next due poll of every live
//! task (and the expiry of every finished one, and the metrics upkeep). No
//! interval and no sleep per task: the queue wakes when the earliest entry
//! is due, the due poll runs on a bounded pool, and its outcome decides the
//! task's next entry.

pub mod policy;

use crate::backend::Backend;
use crate::hub::Hub;
use crate::metrics as m;
use crate::rate::TokenBucket;
use futures::StreamExt;
use policy::{Decision, PollPolicy};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::time::{delay_queue, DelayQueue};

/// Commands waiting for the scheduler; senders wait when it is full.
const COMMAND_QUEUE_LEN: usize = 4096;

/// An entry of the delay queue.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Job {
    Poll(Arc<str>),
    ExpireTask(Arc<str>),
    ExpireSession(Arc<str>),
    /// Copy counters into the metrics registry, drain histograms.
    Upkeep,
}

enum Command {
    Schedule(Job, Duration),
    Snapshot(oneshot::Sender<Snapshot>),
}

/// What the scheduler holds, for the "one entry per live task" invariant.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Tasks with a poll waiting in the queue.
    pub queued: Vec<Arc<str>>,
    /// Tasks whose poll is running.
    pub in_flight: Vec<Arc<str>>,
    /// Finished tasks waiting for their expiry.
    pub expiring: usize,
}

/// Bounds of the poll engine.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Polls running at once; beyond, due polls wait in the queue.
    pub max_in_flight: usize,
    /// Polls started per second (0: no cap); beyond, due polls are moved later.
    pub max_polls_per_s: u64,
}

/// Cheap handle used by the WebSocket side to add work to the queue.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::Sender<Command>,
    stats: Arc<SchedulerStats>,
}

/// Counters of the poll engine, in atomics so the hot path stays cheap.
pub struct SchedulerStats {
    pub polls: AtomicU64,
    pub poll_errors: AtomicU64,
    pub deferred: AtomicU64,
    pub queue_depth: AtomicU64,
    pub in_flight: AtomicU64,
    /// Due → fired, of every poll.
    pub lateness: m::MicrosHistogram,
    /// Registry handles, looked up once (a lookup per poll costs a hash).
    pub(crate) lateness_seconds: metrics::Histogram,
    pub(crate) poll_seconds: metrics::Histogram,
}

impl Default for SchedulerStats {
    fn default() -> Self {
        SchedulerStats {
            polls: AtomicU64::new(0),
            poll_errors: AtomicU64::new(0),
            deferred: AtomicU64::new(0),
            queue_depth: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            lateness: m::MicrosHistogram::default(),
            lateness_seconds: metrics::histogram!(m::POLL_LATENESS_SECONDS),
            poll_seconds: metrics::histogram!(m::POLL_SECONDS),
        }
    }
}

impl SchedulerHandle {
    /// Polls `task` after `delay` (0: at once). Call once per new task.
    pub async fn poll(&self, task: Arc<str>, delay: Duration) {
        let _ = self
            .tx
            .send(Command::Schedule(Job::Poll(task), delay))
            .await;
    }

    /// Forgets a finished task after `delay` (the Redis engine's mirror).
    pub async fn expire_task(&self, task: Arc<str>, delay: Duration) {
        let _ = self
            .tx
            .send(Command::Schedule(Job::ExpireTask(task), delay))
            .await;
    }

    /// Forgets `session` after `delay` if it still has no task and no connection.
    pub async fn expire_session(&self, session: Arc<str>, delay: Duration) {
        let _ = self
            .tx
            .send(Command::Schedule(Job::ExpireSession(session), delay))
            .await;
    }

    /// What the queue holds right now.
    pub async fn snapshot(&self) -> Option<Snapshot> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::Snapshot(tx)).await.ok()?;
        rx.await.ok()
    }

    pub fn stats(&self) -> &SchedulerStats {
        &self.stats
    }

    /// The counters, shared (the Redis worker counts its polls in them).
    pub fn shared_stats(&self) -> Arc<SchedulerStats> {
        self.stats.clone()
    }
}

/// A finished poll: the task, what to do next, and when the poll was due.
type PollResult = (Arc<str>, Decision, Instant);

pub struct Scheduler {
    hub: Hub,
    backend: Backend,
    policy: Arc<PollPolicy>,
    limits: Limits,
    bucket: Option<TokenBucket>,
    rx: mpsc::Receiver<Command>,
    stats: Arc<SchedulerStats>,
    queue: DelayQueue<Job>,
    /// The queue key of each job, so a task never has two entries.
    keys: HashMap<Job, delay_queue::Key>,
    /// Tasks whose poll is running: never polled twice at once.
    running: HashSet<Arc<str>>,
    started: Instant,
    /// xorshift64 state for cadence jitter (no need for a crypto RNG).
    rng: u64,
}

impl Scheduler {
    pub fn new(
        hub: Hub,
        backend: Backend,
        policy: PollPolicy,
        limits: Limits,
    ) -> (Scheduler, SchedulerHandle) {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE_LEN);
        // The recorder first: handles taken before it would go nowhere.
        let metrics_on = m::handle().is_some();
        let stats = Arc::new(SchedulerStats::default());
        let bucket = (limits.max_polls_per_s > 0).then(|| {
            // A tenth of a second's worth may go at once.
            TokenBucket::new(limits.max_polls_per_s, limits.max_polls_per_s / 10)
        });
        let mut scheduler = Scheduler {
            hub,
            backend,
            policy: Arc::new(policy),
            limits: Limits {
                max_in_flight: limits.max_in_flight.max(1),
                ..limits
            },
            bucket,
            rx,
            stats: stats.clone(),
            queue: DelayQueue::new(),
            keys: HashMap::new(),
            running: HashSet::new(),
            started: Instant::now(),
            rng: seed(),
        };
        if metrics_on {
            scheduler.schedule(Job::Upkeep, m::UPKEEP_INTERVAL);
        }
        (scheduler, SchedulerHandle { tx, stats })
    }

    /// Inserts or moves a job: one entry per job, ever.
    fn schedule(&mut self, job: Job, delay: Duration) {
        self.schedule_at(job, Instant::now() + delay);
    }

    fn schedule_at(&mut self, job: Job, when: Instant) {
        if let Some(key) = self.keys.get(&job) {
            self.queue.reset_at(key, when);
        } else {
            let key = self.queue.insert_at(job.clone(), when);
            self.keys.insert(job, key);
        }
    }

    /// Runs until `shutdown` turns true, then lets the polls in flight finish.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut in_flight: JoinSet<PollResult> = JoinSet::new();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                    if let Ok((task, decision, due)) = done {
                        self.after_poll(task, decision, Some(due));
                    }
                }
                cmd = self.rx.recv() => match cmd {
                    Some(Command::Schedule(job, delay)) => self.schedule(job, delay),
                    Some(Command::Snapshot(reply)) => { let _ = reply.send(self.snapshot()); }
                    None => break,
                },
                // A full pool leaves due polls waiting in the queue itself.
                Some(expired) = self.queue.next(), if in_flight.len() < self.limits.max_in_flight => {
                    let due = expired.deadline();
                    let job = expired.into_inner();
                    self.keys.remove(&job);
                    self.fire(job, due, &mut in_flight);
                }
            }
        }
        while let Some(done) = in_flight.join_next().await {
            if let Ok((task, decision, due)) = done {
                self.after_poll(task, decision, Some(due));
            }
        }
    }

    fn fire(&mut self, job: Job, due: Instant, in_flight: &mut JoinSet<PollResult>) {
        match job {
            Job::Poll(task) => self.fire_poll(task, due, in_flight),
            Job::ExpireTask(task) => {
                if let Some(session) = self.hub.expire_task(&task) {
                    let delay = Duration::from_millis(self.policy.retention_ms);
                    self.schedule(Job::ExpireSession(session), delay);
                }
            }
            Job::ExpireSession(session) => self.hub.expire_session(&session),
            Job::Upkeep => {
                self.upkeep(in_flight.len());
                self.schedule(Job::Upkeep, m::UPKEEP_INTERVAL);
            }
        }
    }

    fn fire_poll(&mut self, task: Arc<str>, due: Instant, in_flight: &mut JoinSet<PollResult>) {
        let lateness = Instant::now().saturating_duration_since(due);
        if self.running.contains(&task) {
            // Cannot happen (a task's entry is re-made only after its poll),
            // but a second poll at once must never go out.
            return;
        }
        let Some(backend_id) = self.hub.poll_target(&task) else {
            // Final (cancelled meanwhile) or gone: expire or forget.
            if self.hub.is_final(&task) == Some(true) {
                self.after_poll(task, self.policy.after_success(true), None);
            }
            return;
        };
        if let Some(bucket) = &mut self.bucket {
            let now_ms = self.started.elapsed().as_secs_f64() * 1000.0;
            if let Err(wait) = bucket.take(now_ms) {
                self.stats.deferred.fetch_add(1, Ordering::Relaxed);
                self.schedule(Job::Poll(task), wait);
                return;
            }
        }
        self.stats.polls.fetch_add(1, Ordering::Relaxed);
        self.stats.lateness_seconds.record(lateness.as_secs_f64());
        self.stats.lateness.record(lateness);
        self.running.insert(task.clone());
        let hub = self.hub.clone();
        let backend = self.backend.clone();
        let policy = self.policy.clone();
        let stats = self.stats.clone();
        let jitter = self.jitter();
        in_flight.spawn(async move {
            let decision =
                poll_once(&hub, &backend, &policy, &stats, &task, &backend_id, jitter).await;
            (task, decision, due)
        });
    }

    /// Uniform in [0, 1).
    fn jitter(&mut self) -> f64 {
        unit_jitter(&mut self.rng)
    }

    fn after_poll(&mut self, task: Arc<str>, decision: Decision, due: Option<Instant>) {
        self.running.remove(&task);
        match decision {
            Decision::Poll(delay) => self.schedule(Job::Poll(task), delay),
            Decision::Tick(interval) => {
                let next = due.map_or_else(Instant::now, |d| d + interval);
                self.schedule_at(Job::Poll(task), next.max(Instant::now()));
            }
            Decision::Expire(delay) => self.schedule(Job::ExpireTask(task), delay),
            Decision::GiveUp | Decision::Drop => {}
        }
    }

    fn snapshot(&self) -> Snapshot {
        let mut snap = Snapshot {
            in_flight: self.running.iter().cloned().collect(),
            ..Snapshot::default()
        };
        for job in self.keys.keys() {
            match job {
                Job::Poll(t) => snap.queued.push(t.clone()),
                Job::ExpireTask(_) => snap.expiring += 1,
                _ => {}
            }
        }
        snap
    }

    fn upkeep(&self, in_flight: usize) {
        let counts = self.hub.counts();
        metrics::gauge!(m::LIVE_TASKS).set(counts.live_tasks as f64);
        metrics::gauge!(m::TASKS).set(counts.tasks as f64);
        metrics::gauge!(m::SESSIONS).set(counts.sessions as f64);
        metrics::gauge!(m::QUEUE_DEPTH).set(self.queue.len() as f64);
        metrics::gauge!(m::POLLS_IN_FLIGHT).set(in_flight as f64);
        metrics::counter!(m::POLLS).absolute(self.stats.polls.load(Ordering::Relaxed));
        metrics::counter!(m::POLLS_DEFERRED).absolute(self.stats.deferred.load(Ordering::Relaxed));
        metrics::counter!(m::UPDATES_COALESCED)
            .absolute(crate::hub::outbox::COALESCED_TOTAL.load(Ordering::Relaxed));
        if let Some(h) = m::handle() {
            h.run_upkeep();
        }
    }
}

/// One poll of one task, its outcome applied to the hub.
async fn poll_once(
    hub: &Hub,
    backend: &Backend,
    policy: &PollPolicy,
    stats: &SchedulerStats,
    task: &str,
    backend_id: &str,
    jitter: f64,
) -> Decision {
    let began = Instant::now();
    let result = backend.status(backend_id).await;
    stats.poll_seconds.record(began.elapsed().as_secs_f64());
    match result {
        Ok(status) => hub.apply_status(task, &status, policy, jitter),
        Err(e) => {
            stats.poll_errors.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::BACKEND_ERRORS, "kind" => e.kind()).increment(1);
            hub.apply_error(task, &e, policy)
        }
    }
}

/// A seed for [`unit_jitter`] (never 0).
pub(crate) fn seed() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b) | 1
}

/// Uniform in [0, 1), for cadence jitter (xorshift64: no need for a
/// crypto RNG).
pub(crate) fn unit_jitter(rng: &mut u64) -> f64 {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    (*rng >> 11) as f64 / (1u64 << 53) as f64
}
