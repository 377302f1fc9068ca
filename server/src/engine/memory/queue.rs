//! The memory engine's delay queue: the next due poll of every live task and
//! the expiry of every finished task and empty session, in one
//! `DelayQueue`. No interval and no sleep per task: the queue wakes when the
//! earliest entry is due, the due poll runs through the pipeline on a
//! bounded pool, and the committed outcome decides the task's next entry.
//!
//! The polls run inside the queue's own task, not one spawned task each:
//! the request, the transition and the fan-out of every poll of a due batch
//! happen in that task, woken once when a batch of answers arrives (a
//! pipelined connection hands its answers over together), so a poll costs
//! no spawn and no wake of its own.

use super::table::{PollTarget, Table};
use crate::engine::hash::{Map, Set};
use crate::engine::pipeline::{Limits, Pipeline, PollCtx};
use crate::task::policy::NextDue;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::time::{delay_queue, DelayQueue};

/// Commands waiting for the queue; senders wait when it is full.
const COMMAND_QUEUE_LEN: usize = 4096;

/// An entry of the delay queue.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Job {
    Poll(Arc<str>),
    ExpireTask(Arc<str>),
    ExpireSession(Arc<str>),
}

enum Command {
    Schedule(Job, Duration),
    Snapshot(oneshot::Sender<Snapshot>),
}

/// What the queue holds, for the "one entry per live task" invariant.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Tasks with a poll waiting in the queue.
    pub queued: Vec<Arc<str>>,
    /// Tasks whose poll is running.
    pub in_flight: Vec<Arc<str>>,
    /// Finished tasks waiting for their expiry.
    pub expiring: usize,
    /// The table's live tasks at the same instant (the polls commit in the
    /// queue's task, so the two agree unless an entry is lost or doubled).
    pub live: Vec<Arc<str>>,
}

/// Cheap handle to add work to the queue.
#[derive(Clone)]
pub struct QueueHandle {
    tx: mpsc::Sender<Command>,
}

impl QueueHandle {
    /// Polls `task` after `delay` (0: at once). Call once per new task.
    pub async fn poll(&self, task: Arc<str>, delay: Duration) {
        let _ = self
            .tx
            .send(Command::Schedule(Job::Poll(task), delay))
            .await;
    }

    /// Forgets a finished task after `delay`.
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
}

/// A finished poll: the task, where it goes next, and when it was due.
type PollResult = (Arc<str>, NextDue, Instant);

/// The polls running, driven by the queue's task itself.
type Running = FuturesUnordered<Pin<Box<dyn Future<Output = PollResult> + Send>>>;

pub struct Queue {
    table: Table,
    pipeline: Pipeline,
    max_in_flight: usize,
    retention: Duration,
    rx: mpsc::Receiver<Command>,
    queue: DelayQueue<Job>,
    /// The queue key of each job, so a task never has two entries.
    keys: Map<Job, delay_queue::Key>,
    /// Tasks whose poll is running: never polled twice at once.
    running: Set<Arc<str>>,
}

impl Queue {
    pub fn new(
        table: Table,
        ctx: Arc<PollCtx>,
        limits: &Limits,
        retention: Duration,
    ) -> (Queue, QueueHandle) {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE_LEN);
        let queue = Queue {
            table,
            pipeline: Pipeline::new(ctx, limits),
            max_in_flight: limits.max_in_flight.max(1),
            retention,
            rx,
            queue: DelayQueue::new(),
            keys: Map::default(),
            running: Set::default(),
        };
        (queue, QueueHandle { tx })
    }

    /// Before the queue runs (start-up, from the durable store): `task`'s
    /// poll, due after `delay`. Straight into the queue, not through the
    /// bounded command channel, which nobody drains yet.
    pub fn preload_poll(&mut self, task: Arc<str>, delay: Duration) {
        self.schedule(Job::Poll(task), delay);
    }

    /// Before the queue runs: a finished task's expiry after `delay`.
    pub fn preload_expiry(&mut self, task: Arc<str>, delay: Duration) {
        self.schedule(Job::ExpireTask(task), delay);
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
        let mut in_flight = Running::new();
        loop {
            let stats = &self.pipeline.ctx().stats;
            stats
                .queue_depth
                .store(self.queue.len() as u64, Ordering::Relaxed);
            stats
                .in_flight
                .store(in_flight.len() as u64, Ordering::Relaxed);
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                Some((task, next, due)) = in_flight.next(), if !in_flight.is_empty() => {
                    self.after_poll(task, next, due);
                }
                cmd = self.rx.recv() => match cmd {
                    Some(Command::Schedule(job, delay)) => self.schedule(job, delay),
                    Some(Command::Snapshot(reply)) => { let _ = reply.send(self.snapshot()); }
                    None => break,
                },
                // A full pool leaves due polls waiting in the queue itself.
                Some(expired) = self.queue.next(), if in_flight.len() < self.max_in_flight => {
                    let due = expired.deadline();
                    let job = expired.into_inner();
                    self.keys.remove(&job);
                    self.fire(job, due, &mut in_flight);
                }
            }
        }
        while let Some((task, next, due)) = in_flight.next().await {
            self.after_poll(task, next, due);
        }
    }

    fn fire(&mut self, job: Job, due: Instant, in_flight: &mut Running) {
        match job {
            Job::Poll(task) => self.fire_poll(task, due, in_flight),
            Job::ExpireTask(task) => {
                if let Some(session) = self.table.expire_task(&task) {
                    self.schedule(Job::ExpireSession(session), self.retention);
                }
            }
            Job::ExpireSession(session) => self.table.expire_session(&session),
        }
    }

    fn fire_poll(&mut self, task: Arc<str>, due: Instant, in_flight: &mut Running) {
        if self.running.contains(&task) {
            // Cannot happen (a task's entry is re-made only after its poll),
            // but a second poll at once must never go out.
            return;
        }
        let backend_id = match self.table.poll_target(&task) {
            PollTarget::Live(backend_id) => backend_id,
            // Cancelled meanwhile: its expiry.
            PollTarget::Final => return self.after_poll(task, NextDue::Final, due),
            PollTarget::Gone => return,
        };
        let ctx = self.pipeline.ctx().clone();
        let lateness_ms = Instant::now().saturating_duration_since(due).as_millis() as u64;
        let due_ms = ctx.clock.now_ms().saturating_sub(lateness_ms);
        let jitter = match self.pipeline.admit(due_ms) {
            Ok(jitter) => jitter,
            Err(wait) => return self.schedule(Job::Poll(task), wait),
        };
        self.running.insert(task.clone());
        let table = self.table.clone();
        in_flight.push(Box::pin(async move {
            let poll = ctx.poll(&table, &task, None, Some(&backend_id), due_ms, jitter);
            // A bug in one poll must not stop the queue that runs them all:
            // the task is polled again after an interval.
            let next = match AssertUnwindSafe(poll).catch_unwind().await {
                Ok(Ok(Some(c))) => c.next,
                Ok(Ok(None) | Err(_)) => NextDue::Keep,
                Err(_) => {
                    tracing::error!(task = %task, "a poll panicked; polled again after an interval");
                    NextDue::At(ctx.clock.now_ms() + ctx.policy.poll_interval_ms)
                }
            };
            (task, next, due)
        }));
    }

    fn after_poll(&mut self, task: Arc<str>, next: NextDue, _due: Instant) {
        self.running.remove(&task);
        match next {
            NextDue::At(ms) => {
                let now_ms = self.pipeline.ctx().clock.now_ms();
                let delay = Duration::from_millis(ms.saturating_sub(now_ms));
                self.schedule(Job::Poll(task), delay);
            }
            NextDue::Final => self.schedule(Job::ExpireTask(task), self.retention),
            // Gone.
            NextDue::Keep => {}
        }
    }

    fn snapshot(&self) -> Snapshot {
        let mut snap = Snapshot {
            in_flight: self.running.iter().cloned().collect(),
            live: self.table.live_task_ids(),
            ..Snapshot::default()
        };
        for job in self.keys.keys() {
            match job {
                Job::Poll(t) => snap.queued.push(t.clone()),
                Job::ExpireTask(_) => snap.expiring += 1,
                Job::ExpireSession(_) => {}
            }
        }
        snap
    }
}
