//! The Redis engine (`--redis URL`): Redis (one server or a Redis Cluster,
//! [`conn`]) holds sessions and tasks ([`store`], [`keys`], `lua/`), split
//! into partitions by session, shared by any number of processes. Workers
//! own whole partitions and keep their delay queues in memory ([`worker`]);
//! each web process follows the changes of the sessions connected to it
//! over pub/sub ([`listener`]) into its fanout. Its half of the engine
//! interface: what [`super::Engine`] asks of whichever engine runs.

pub mod conn;
pub mod keys;
pub mod listener;
pub mod store;
pub mod worker;

use super::admission::{Refusal, StartLimits};
use super::backends::Backends;
use super::pipeline::{next_due, Committed};
use crate::clock::Clock;
use crate::metrics as m;
use crate::task::id::{is_session_token, new_session_token, random_hex};
use crate::task::{Step, Tracked};
use app::protocol::Task;
use std::sync::Arc;
use store::{Saved, Store, StoreError, Stored};

/// How often a compare-and-set of a task is tried when other writers keep
/// changing it first.
pub const CAS_TRIES: usize = 5;

#[derive(Clone)]
pub struct RedisEngine {
    pub store: Store,
    clock: Clock,
    /// How long a final task stays in Redis.
    retention_s: u64,
    /// Told of every final state committed here (webhooks).
    pub finals: super::finals::Finals,
}

/// An admitted start, to release once the task service answered.
pub struct Nonce(String);

impl RedisEngine {
    pub fn new(store: Store, clock: Clock, retention_s: u64, _backends: &Backends) -> Self {
        RedisEngine {
            store,
            clock,
            retention_s,
            finals: Default::default(),
        }
    }

    pub async fn resolve_session(
        &self,
        token: Option<&str>,
    ) -> Result<(Arc<str>, bool), StoreError> {
        if let Some(t) = token.filter(|t| is_session_token(t)) {
            if self.store.session_exists(t).await? {
                return Ok((t.into(), false));
            }
        }
        let token = new_session_token();
        self.store
            .create_session(&token, self.clock.now_ms())
            .await?;
        Ok((token.into(), true))
    }

    pub async fn session_tasks(&self, session: &str) -> Result<Vec<(Task, String)>, StoreError> {
        self.store.session_tasks(session).await
    }

    pub async fn admit(
        &self,
        session: &str,
        limits: StartLimits,
        now_ms: u64,
    ) -> Result<Result<Nonce, Refusal>, StoreError> {
        let nonce = random_hex(8);
        let verdict = self
            .store
            .admit_start(session, &nonce, now_ms, limits)
            .await?;
        Ok(verdict.map(|()| Nonce(nonce)))
    }

    pub async fn start_done(&self, session: &str, nonce: Nonce) {
        if let Err(e) = self.store.start_done(session, &nonce.0).await {
            // Stale pending starts stop counting after a minute.
            tracing::warn!(error = %e, "could not release a pending start");
        }
    }

    pub async fn create(
        &self,
        session: &str,
        task: &Task,
        backend_id: &str,
    ) -> Result<(), StoreError> {
        self.store.create_task(session, task, backend_id).await
    }

    /// A task of `session` and its task-service id.
    pub async fn lookup(
        &self,
        session: &str,
        task_id: &str,
    ) -> Result<Option<(Task, String)>, StoreError> {
        Ok(self
            .store
            .load(session, task_id)
            .await?
            .map(|stored| (stored.tracked.task, stored.backend_id)))
    }

    pub async fn forget(&self, session: &str, task_id: &str) -> Result<bool, StoreError> {
        self.store.forget(session, task_id).await
    }

    /// Commits `step` on task `id` of `session` now, not as a poll (a
    /// `cancel`): compare-and-set on its `seq`. `Ok(None)`: gone.
    pub async fn commit_in(
        &self,
        session: &str,
        id: &str,
        step: impl FnMut(&mut Tracked, u64) -> Step + Send,
    ) -> Result<Option<Committed>, StoreError> {
        Ok(self
            .commit_stored(session, id, None, None, step)
            .await?
            .map(|(committed, _)| committed))
    }

    /// Runs `step` on task `id` of `session` (from `first` when the caller
    /// read it already) and saves what it decides by compare-and-set on the
    /// task's `seq`, running it again on the newer state when another
    /// writer got there first (at most [`CAS_TRIES`] times, then
    /// [`StoreError::Contended`]). What was committed, and the task as
    /// saved; `None`: the task is gone.
    pub async fn commit_stored(
        &self,
        session: &str,
        id: &str,
        first: Option<Stored>,
        due_ms: Option<u64>,
        mut step: impl FnMut(&mut Tracked, u64) -> Step + Send,
    ) -> Result<Option<(Committed, Stored)>, StoreError> {
        let mut stored = match first {
            Some(stored) => stored,
            None => match self.store.load(session, id).await? {
                Some(stored) => stored,
                None => return Ok(None),
            },
        };
        for _ in 0..CAS_TRIES {
            let loaded_seq = stored.tracked.task.seq;
            let loaded_track = stored.tracked.track;
            let now = self.clock.now_ms();
            let outcome = step(&mut stored.tracked, now);
            let changed = outcome.next.is_some();
            if let Some(next) = outcome.next {
                stored.tracked.commit(next);
            }
            let next = next_due(outcome.decision, &stored.tracked, due_ms, now);
            match self
                .store
                .save(&stored, loaded_seq, loaded_track, next, self.retention_s)
                .await?
            {
                Saved::Done => {
                    if changed && stored.tracked.task.state.is_final() {
                        self.finals.reached(&stored.tracked.task);
                    }
                    let committed = Committed {
                        next,
                        changed: changed.then(|| stored.tracked.task.clone()),
                    };
                    return Ok(Some((committed, stored)));
                }
                Saved::Gone => return Ok(None),
                Saved::Conflict => {
                    metrics::counter!(m::REDIS_CAS_CONFLICTS).increment(1);
                    match self.store.load(session, id).await? {
                        Some(again) => stored = again,
                        None => return Ok(None),
                    }
                }
            }
        }
        // Still contended: the caller reads it again (the owner's poll) or
        // says so (a cancel).
        Err(StoreError::Contended)
    }
}
