//! The poll pipeline, written once for both engines: a due poll → the rate
//! cap → ask the task service → the pure transition ([`crate::task`]) →
//! commit. The engines differ only in where a due poll comes from (the
//! memory delay queue, or claims on Redis's) and how a result is committed
//! ([`TaskStore`]: under the table's lock, or by compare-and-set in Redis).

use crate::backend::{Backend, BackendError, Status};
use crate::clock::Clock;
use crate::metrics as m;
use crate::rate::TokenBucket;
use crate::task::jitter::Jitter;
use crate::task::policy::{Decision, NextDue, PollPolicy};
use crate::task::{Step, Tracked};
use app::protocol::Task;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Bounds of polling.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Polls running at once; beyond, due polls wait in the queue.
    pub max_in_flight: usize,
    /// Polls started per second (0: no cap); beyond, due polls are moved later.
    pub max_polls_per_s: u64,
}

/// Counters of polling, in atomics so the hot path stays cheap.
pub struct PollStats {
    /// The backend polled (the `backend` label of its metrics).
    pub backend: Arc<str>,
    pub polls: AtomicU64,
    pub poll_errors: AtomicU64,
    pub deferred: AtomicU64,
    /// Entries in this process's delay queue (memory engine).
    pub queue_depth: AtomicU64,
    pub in_flight: AtomicU64,
    /// Due → fired, of every poll.
    pub lateness: m::MicrosHistogram,
    /// Registry handles, looked up once (a lookup per poll costs a hash).
    lateness_seconds: metrics::Histogram,
    poll_seconds: metrics::Histogram,
}

impl Default for PollStats {
    fn default() -> Self {
        PollStats::for_backend("default")
    }
}

impl PollStats {
    /// The counters of the backend named `backend`.
    pub fn for_backend(backend: &str) -> Self {
        let label = backend.to_string();
        PollStats {
            backend: backend.into(),
            polls: AtomicU64::new(0),
            poll_errors: AtomicU64::new(0),
            deferred: AtomicU64::new(0),
            queue_depth: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            lateness: m::MicrosHistogram::default(),
            lateness_seconds: metrics::histogram!(m::POLL_LATENESS_SECONDS, "backend" => label.clone()),
            poll_seconds: metrics::histogram!(m::POLL_SECONDS, "backend" => label),
        }
    }
}

/// What every poll in flight shares.
pub struct PollCtx {
    pub backend: Backend,
    pub policy: Arc<PollPolicy>,
    pub clock: Clock,
    pub stats: Arc<PollStats>,
}

/// What a commit did.
#[derive(Clone, Debug, PartialEq)]
pub struct Committed {
    /// Where the task's next poll goes.
    pub next: NextDue,
    /// The new state, when it changed and the store did not fan it out
    /// itself (the Redis store: its listener would show it a moment later).
    pub changed: Option<Task>,
}

/// How a transition is committed: the one thing (beside where due polls
/// come from) in which the two engines differ.
pub trait TaskStore {
    type Error: std::fmt::Display + Send;
    /// A task's state as its due poll already read it (Redis: the claim
    /// reads it in the same round trip), to start from.
    type Loaded: Send;

    /// Runs `step` on the task's current state at the current time and
    /// commits what it decides; the Redis store runs it again on the newer
    /// state when another writer got there first. `due_ms` is when the poll
    /// was due (`None`: not a poll, e.g. a `cancel`: the queue entry stays
    /// unless the task turned final). `Ok(None)`: the task is gone.
    fn commit<F>(
        &self,
        id: &str,
        first: Option<Self::Loaded>,
        due_ms: Option<u64>,
        step: F,
    ) -> impl Future<Output = Result<Option<Committed>, Self::Error>> + Send
    where
        F: FnMut(&mut Tracked, u64) -> Step + Send;
}

/// Where the task goes after a step that decided `decision` was committed
/// (into `tracked`) at `now_ms`; `phase` as [`Decision::next_due`]'s.
pub fn next_due(
    decision: Decision,
    tracked: &Tracked,
    due_ms: Option<u64>,
    now_ms: u64,
    phase: Option<u64>,
) -> NextDue {
    match due_ms {
        Some(due_ms) => decision.next_due(due_ms, now_ms, phase),
        None if tracked.task.state.is_final() => NextDue::Final,
        None => NextDue::Keep,
    }
}

/// The firing side of the pipeline: the polls-per-second cap, the counters
/// and the jitter. One per firing loop (a memory queue, a Redis worker).
pub struct Pipeline {
    ctx: Arc<PollCtx>,
    bucket: Option<TokenBucket>,
    started: Instant,
    jitter: Jitter,
}

impl Pipeline {
    pub fn new(ctx: Arc<PollCtx>, limits: &Limits) -> Self {
        let bucket = (limits.max_polls_per_s > 0).then(|| {
            // A tenth of a second's worth may go at once.
            TokenBucket::new(limits.max_polls_per_s, limits.max_polls_per_s / 10)
        });
        Pipeline {
            ctx,
            bucket,
            started: Instant::now(),
            jitter: Jitter::new(),
        }
    }

    pub fn ctx(&self) -> &Arc<PollCtx> {
        &self.ctx
    }

    /// A poll due at `due_ms` may go now: its jitter; or the rate cap
    /// defers it by the returned wait.
    pub fn admit(&mut self, due_ms: u64) -> Result<f64, Duration> {
        if let Some(bucket) = &mut self.bucket {
            if let Err(wait) = bucket.take(self.started.elapsed().as_secs_f64() * 1000.0) {
                self.ctx.stats.deferred.fetch_add(1, Ordering::Relaxed);
                return Err(wait);
            }
        }
        let stats = &self.ctx.stats;
        let lateness = Duration::from_millis(self.ctx.clock.now_ms().saturating_sub(due_ms));
        stats.polls.fetch_add(1, Ordering::Relaxed);
        stats.lateness_seconds.record(lateness.as_secs_f64());
        stats.lateness.record(lateness);
        Ok(self.jitter.unit())
    }
}

impl PollCtx {
    /// Asks the task service for a task's status, timed and counted.
    pub async fn ask(&self, backend_id: &str) -> Result<Status, BackendError> {
        let began = Instant::now();
        let answer = self.backend.status(backend_id).await;
        self.stats
            .poll_seconds
            .record(began.elapsed().as_secs_f64());
        if let Err(e) = &answer {
            self.stats.poll_errors.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::BACKEND_ERRORS, "kind" => e.kind(), "backend" => self.stats.backend.to_string())
                .increment(1);
        }
        answer
    }

    /// One poll, whole: ask (unless the task is already final, `backend_id`
    /// `None`), then commit the transition of the answer.
    pub async fn poll<S: TaskStore>(
        &self,
        store: &S,
        id: &str,
        first: Option<S::Loaded>,
        backend_id: Option<&str>,
        due_ms: u64,
        jitter: f64,
    ) -> Result<Option<Committed>, S::Error> {
        let answer = match backend_id {
            Some(b) => Some(self.ask(b).await),
            None => None,
        };
        let policy = &self.policy;
        store
            .commit(id, first, Some(due_ms), |tracked, now| match &answer {
                _ if tracked.task.state.is_final() => Step {
                    next: None,
                    decision: policy.after_success(true),
                },
                Some(Ok(status)) => tracked.on_status(status, policy, now, jitter),
                Some(Err(e)) => tracked.on_error(&e.poll_error(), policy, now),
                // Read as final when claimed: cannot be live now.
                None => Step {
                    next: None,
                    decision: policy.after_success(true),
                },
            })
            .await
    }
}
