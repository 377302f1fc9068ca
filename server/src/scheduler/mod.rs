//! The poll engine: one delay queue holds the next due poll of every live
//! task (and the expiry of every finished one). No interval and no sleep per
//! task: the queue wakes when the earliest entry is due, the due poll runs on
//! a bounded pool, and its outcome decides the task's next entry.

pub mod policy;

use crate::backend::{Backend, BackendError};
use crate::hub::Hub;
use futures::StreamExt;
use policy::{Decision, PollPolicy};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::time::{delay_queue, DelayQueue};

/// Commands waiting for the scheduler; senders wait when it is full.
const COMMAND_QUEUE_LEN: usize = 4096;

/// An entry of the delay queue.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Job {
    Poll(Arc<str>),
    ExpireTask(Arc<str>),
    ExpireSession(Arc<str>),
}

#[derive(Debug)]
enum Command {
    Schedule(Job, Duration),
}

/// Cheap handle used by the WebSocket side to add work to the queue.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::Sender<Command>,
    stats: Arc<SchedulerStats>,
}

/// Counters of the poll engine.
#[derive(Default, Debug)]
pub struct SchedulerStats {
    pub polls: AtomicU64,
    pub poll_errors: AtomicU64,
    pub queue_depth: AtomicU64,
}

impl SchedulerHandle {
    /// Polls `task` after `delay` (0: at once). Call once per new task.
    pub async fn poll(&self, task: Arc<str>, delay: Duration) {
        let _ = self
            .tx
            .send(Command::Schedule(Job::Poll(task), delay))
            .await;
    }

    /// Forgets `session` after `delay` if it still has no task and no connection.
    pub async fn expire_session(&self, session: Arc<str>, delay: Duration) {
        let _ = self
            .tx
            .send(Command::Schedule(Job::ExpireSession(session), delay))
            .await;
    }

    pub fn stats(&self) -> &SchedulerStats {
        &self.stats
    }
}

pub struct Scheduler {
    hub: Hub,
    backend: Backend,
    policy: Arc<PollPolicy>,
    max_in_flight: usize,
    rx: mpsc::Receiver<Command>,
    stats: Arc<SchedulerStats>,
    queue: DelayQueue<Job>,
    /// The queue key of each job, so a task never has two entries.
    keys: HashMap<Job, delay_queue::Key>,
    /// xorshift64 state for cadence jitter (no need for a crypto RNG).
    rng: u64,
}

impl Scheduler {
    pub fn new(
        hub: Hub,
        backend: Backend,
        policy: PollPolicy,
        max_in_flight: usize,
    ) -> (Scheduler, SchedulerHandle) {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE_LEN);
        let stats = Arc::new(SchedulerStats::default());
        let scheduler = Scheduler {
            hub,
            backend,
            policy: Arc::new(policy),
            max_in_flight: max_in_flight.max(1),
            rx,
            stats: stats.clone(),
            queue: DelayQueue::new(),
            keys: HashMap::new(),
            rng: seed(),
        };
        (scheduler, SchedulerHandle { tx, stats })
    }

    /// Inserts or moves a job: one entry per job, ever.
    fn schedule(&mut self, job: Job, delay: Duration) {
        if let Some(key) = self.keys.get(&job) {
            self.queue.reset(key, delay);
        } else {
            let key = self.queue.insert(job.clone(), delay);
            self.keys.insert(job, key);
        }
        self.stats
            .queue_depth
            .store(self.queue.len() as u64, Ordering::Relaxed);
    }

    /// Runs until `shutdown` turns true, then lets the polls in flight finish.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut in_flight: JoinSet<(Arc<str>, Decision)> = JoinSet::new();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                    if let Ok((task, decision)) = done {
                        self.after_poll(task, decision);
                    }
                }
                cmd = self.rx.recv() => match cmd {
                    Some(Command::Schedule(job, delay)) => self.schedule(job, delay),
                    None => break,
                },
                // A full pool leaves due polls waiting in the queue itself.
                Some(expired) = self.queue.next(), if in_flight.len() < self.max_in_flight => {
                    let job = expired.into_inner();
                    self.keys.remove(&job);
                    self.stats.queue_depth.store(self.queue.len() as u64, Ordering::Relaxed);
                    self.fire(job, &mut in_flight);
                }
            }
        }
        while let Some(done) = in_flight.join_next().await {
            if let Ok((task, decision)) = done {
                self.after_poll(task, decision);
            }
        }
    }

    fn fire(&mut self, job: Job, in_flight: &mut JoinSet<(Arc<str>, Decision)>) {
        match job {
            Job::Poll(task) => {
                let Some(backend_id) = self.hub.poll_target(&task) else {
                    // Final (cancelled meanwhile) or gone: expire or forget.
                    if self.hub.is_final(&task) == Some(true) {
                        self.after_poll(task, self.policy.after_success(true));
                    }
                    return;
                };
                self.stats.polls.fetch_add(1, Ordering::Relaxed);
                let hub = self.hub.clone();
                let backend = self.backend.clone();
                let policy = self.policy.clone();
                let stats = self.stats.clone();
                let jitter = self.jitter();
                in_flight.spawn(async move {
                    let decision =
                        poll_once(&hub, &backend, &policy, &stats, &task, &backend_id, jitter)
                            .await;
                    (task, decision)
                });
            }
            Job::ExpireTask(task) => {
                if let Some(session) = self.hub.expire_task(&task) {
                    let delay = Duration::from_millis(self.policy.retention_ms);
                    self.schedule(Job::ExpireSession(session), delay);
                }
            }
            Job::ExpireSession(session) => self.hub.expire_session(&session),
        }
    }

    /// Uniform in [0, 1).
    fn jitter(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    fn after_poll(&mut self, task: Arc<str>, decision: Decision) {
        match decision {
            Decision::Poll(delay) => self.schedule(Job::Poll(task), delay),
            Decision::Expire(delay) => self.schedule(Job::ExpireTask(task), delay),
            Decision::GiveUp | Decision::Drop => {}
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
    match backend.status(backend_id).await {
        Ok(status) => hub.apply_status(task, &status, policy, jitter),
        Err(BackendError::NotFound) => hub.fail(
            task,
            "the task service no longer knows this task".into(),
            policy,
        ),
        Err(e) => {
            stats.poll_errors.fetch_add(1, Ordering::Relaxed);
            let (reason, retry_after) = match &e {
                BackendError::Unavailable {
                    reason,
                    retry_after,
                } => (reason.clone(), *retry_after),
                other => (other.to_string(), None),
            };
            match hub.apply_outage(task, &reason, retry_after, policy) {
                Decision::GiveUp => hub.fail(
                    task,
                    format!(
                        "the task service was unreachable for {} s ({reason}); gave up",
                        policy.give_up_ms / 1000
                    ),
                    policy,
                ),
                d => d,
            }
        }
    }
}

fn seed() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b) | 1
}
