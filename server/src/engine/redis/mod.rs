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
use crate::task::id::{is_session_token, new_session_token, random_hex};
use crate::task::{Step, Tracked};
use app::protocol::Task;
use std::sync::Arc;
use store::{Store, StoreError, Stored};

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

    /// A poll's (or a cancel's) `step` on a task of a partition this
    /// process owns: run on its copy, committed there, and written to Redis
    /// when it changed something (`Store::write`: the owner is the only
    /// writer of its live tasks, so no compare-and-set). What was
    /// committed, and the task as it now is.
    pub async fn commit_owned(
        &self,
        mut stored: Stored,
        due_ms: Option<u64>,
        mut step: impl FnMut(&mut Tracked, u64) -> Step + Send,
    ) -> Result<(Committed, Stored), StoreError> {
        let loaded_track = stored.tracked.track;
        let now = self.clock.now_ms();
        let outcome = step(&mut stored.tracked, now);
        let changed = outcome.next.is_some();
        if let Some(next) = outcome.next {
            stored.tracked.commit(next);
        }
        let next = next_due(
            outcome.decision,
            &stored.tracked,
            due_ms,
            now,
            Some(u64::from(crate::task::id::hash32(&stored.session))),
        );
        let track_changed = stored.tracked.track != loaded_track;
        self.store
            .write(&stored, changed, track_changed, self.retention_s)
            .await?;
        if changed && stored.tracked.task.state.is_final() {
            self.finals.reached(&stored.tracked.task);
        }
        let committed = Committed {
            next,
            changed: changed.then(|| stored.tracked.task.clone()),
        };
        Ok((committed, stored))
    }

    /// A web process's `cancel` of task `id` of `session`, with the task
    /// service's answer `status` (`None`: it does not know the task): handed
    /// to the partition's owner, which applies `step` to its copy. The state
    /// it will most likely commit (the step on the state in Redis now), for
    /// the caller to show; `None` when the task is gone or the step changes
    /// nothing.
    pub async fn cancel(
        &self,
        session: &str,
        id: &str,
        status: Option<crate::task_api::Status>,
        mut step: impl FnMut(&mut Tracked, u64) -> Step + Send,
    ) -> Result<Option<Task>, StoreError> {
        let Some(mut stored) = self.store.load(session, id).await? else {
            return Ok(None);
        };
        self.store
            .push_cancel(
                session,
                &store::CancelReq {
                    id: id.to_string(),
                    status,
                },
            )
            .await?;
        let outcome = step(&mut stored.tracked, self.clock.now_ms());
        Ok(outcome.next.map(|next| {
            stored.tracked.commit(next);
            stored.tracked.task
        }))
    }
}
