//! The engine: where sessions and tasks live and how changes reach the
//! connections. One interface, two implementations, chosen at start-up
//! (like centrifuge's broker):
//!
//! - **memory** (default): the [`Hub`] holds everything; the scheduler's
//!   delay queue polls.
//! - **Redis** (`--redis URL`): Redis holds sessions, tasks and the delay
//!   queue ([`store`]); workers claim due polls from it ([`worker`]); each
//!   web process mirrors, in its hub, the sessions connected to it and
//!   follows their changes over pub/sub ([`listener`]).
//!
//! The WebSocket and page code call only [`Engine`].

pub mod listener;
pub mod store;
pub mod worker;

use crate::backend::{BackendError, Status};
use crate::clock::Clock;
use crate::hub::transition::{Tracked, LOST_TASK};
use crate::hub::{CancelTarget, Conn, Hub, NotFound};
use crate::scheduler::policy::PollPolicy;
use crate::scheduler::SchedulerHandle;
use app::protocol::{ErrorCode, Task};
use std::sync::Arc;
use std::time::Duration;
use store::{NextDue, Saved, Store, StoreError};

/// How often a compare-and-set of a task is retried when another writer
/// changed it first.
pub const CAS_TRIES: usize = 5;

#[derive(Clone)]
pub struct Engine {
    hub: Hub,
    scheduler: SchedulerHandle,
    policy: Arc<PollPolicy>,
    clock: Clock,
    store: Option<Store>,
}

/// An admitted start, to hand back to [`Engine::start_done`].
pub struct StartTicket {
    nonce: Option<String>,
}

impl Engine {
    /// The memory engine when `store` is `None`; else the Redis engine's
    /// web side, and `hub` must be a [`Hub::mirror`].
    pub fn new(
        hub: Hub,
        scheduler: SchedulerHandle,
        policy: Arc<PollPolicy>,
        clock: Clock,
        store: Option<Store>,
    ) -> Self {
        Engine {
            hub,
            scheduler,
            policy,
            clock,
            store,
        }
    }

    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    pub fn store(&self) -> Option<&Store> {
        self.store.as_ref()
    }

    /// The session a cookie names, or a new one when it is missing,
    /// malformed or unknown. Returns the token and whether it is new.
    pub async fn resolve_session(
        &self,
        token: Option<&str>,
    ) -> Result<(Arc<str>, bool), StoreError> {
        let Some(store) = &self.store else {
            return Ok(self.hub.resolve_session(token));
        };
        if let Some(t) = token.filter(|t| crate::hub::is_token(t)) {
            if store.session_exists(t).await? {
                return Ok((t.into(), false));
            }
        }
        let token = crate::hub::random_hex(16);
        store.create_session(&token, self.clock.now_ms()).await?;
        Ok((token.into(), true))
    }

    /// A session's tasks, oldest first (for the page's first render).
    pub async fn session_tasks(&self, session: &str) -> Vec<Task> {
        let Some(store) = &self.store else {
            return self.hub.session_tasks(session);
        };
        match store.session_tasks(session).await {
            Ok(tasks) => tasks.into_iter().map(|(t, _)| t).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "page rendered without the session's tasks");
                Vec::new()
            }
        }
    }

    /// Registers a connection, queues its `welcome` and subscribes it to
    /// every task of its session. With Redis, the session's tasks are read
    /// first; changes that arrive meanwhile are kept (the session is held),
    /// and whichever of the two is newer wins.
    pub async fn connect(&self, session: Arc<str>) -> Result<Conn, StoreError> {
        let Some(store) = &self.store else {
            return Ok(self.hub.connect(session));
        };
        self.hub.hold(&session);
        let loaded = store.session_tasks(&session).await;
        let result = loaded.map(|tasks| {
            for (task, backend_id) in tasks {
                self.hub.apply_remote(&session, Some(&backend_id), task);
            }
            self.hub.connect(session.clone())
        });
        self.hub.unhold(&session);
        result
    }

    /// Forgets a connection and its subscriptions.
    pub async fn disconnect(&self, conn: &Conn, retention: Duration) {
        if let Some(session) = self.hub.disconnect(conn) {
            self.scheduler.expire_session(session, retention).await;
        }
    }

    /// Admits one `start` (per-session limits, across every web process
    /// with Redis), or says why not.
    pub async fn admit_start(
        &self,
        conn: &Conn,
        per_min: u64,
        max_live: u64,
    ) -> Result<StartTicket, (ErrorCode, String)> {
        let Some(store) = &self.store else {
            return self
                .hub
                .admit_start(conn, per_min, max_live)
                .map(|()| StartTicket { nonce: None })
                .map_err(|why| (ErrorCode::TooManyTasks, why));
        };
        let nonce = crate::hub::random_hex(8);
        match store
            .admit_start(
                &conn.session,
                &nonce,
                self.clock.now_ms(),
                per_min,
                max_live,
            )
            .await
        {
            Ok(None) => Ok(StartTicket { nonce: Some(nonce) }),
            Ok(Some(why)) => Err((ErrorCode::TooManyTasks, why)),
            Err(e) => Err((ErrorCode::BackendUnavailable, e.to_string())),
        }
    }

    /// An admitted start got its answer (task created, or refused).
    pub async fn start_done(&self, conn: &Conn, ticket: StartTicket) {
        match (&self.store, ticket.nonce) {
            (Some(store), Some(nonce)) => {
                if let Err(e) = store.start_done(&conn.session, &nonce).await {
                    // Stale pending starts stop counting after a minute.
                    tracing::warn!(error = %e, "could not release a pending start");
                }
            }
            _ => self.hub.start_done(conn),
        }
    }

    /// Records a task the task service accepted: `accepted` to `conn`,
    /// which is subscribed, and its first poll due at once.
    pub async fn create_task(
        &self,
        conn: &Conn,
        reference: String,
        kind: &str,
        params: Option<serde_json::Value>,
        backend_id: &str,
    ) -> Result<(), StoreError> {
        let task = self.hub.new_task(kind, params);
        match &self.store {
            None => {
                let id = self.hub.insert_task(conn, reference, task, backend_id);
                self.scheduler.poll(id, Duration::ZERO).await;
            }
            Some(store) => {
                store.create_task(&conn.session, &task, backend_id).await?;
                self.hub.insert_task(conn, reference, task, backend_id);
            }
        }
        Ok(())
    }

    /// With Redis, a task of `conn`'s session that this process has not
    /// seen yet (started on another process a moment ago) is read from
    /// Redis. Whether the hub has it now.
    async fn fetch(&self, conn: &Conn, task_id: &str) -> bool {
        let Some(store) = &self.store else {
            return false;
        };
        match store.load(task_id).await {
            Ok(Some(stored)) if *stored.session == *conn.session => {
                self.hub.apply_remote(
                    &stored.session,
                    Some(&stored.backend_id),
                    stored.tracked.task,
                );
                true
            }
            Ok(_) => false,
            Err(e) => {
                tracing::warn!(error = %e, "could not read a task from Redis");
                false
            }
        }
    }

    /// Subscribes `conn` to a task of its session and queues its state.
    pub async fn subscribe(&self, conn: &Conn, task_id: &str) -> Result<(), NotFound> {
        match self.hub.subscribe(conn, task_id) {
            Err(NotFound) if self.fetch(conn, task_id).await => self.hub.subscribe(conn, task_id),
            other => other,
        }
    }

    pub fn unsubscribe(&self, conn: &Conn, task_id: &str) {
        self.hub.unsubscribe(conn, task_id);
    }

    pub async fn cancel_target(
        &self,
        conn: &Conn,
        task_id: &str,
    ) -> Result<CancelTarget, NotFound> {
        match self.hub.cancel_target(conn, task_id) {
            Err(NotFound) if self.fetch(conn, task_id).await => {
                self.hub.cancel_target(conn, task_id)
            }
            other => other,
        }
    }

    /// Applies what the task service answered to a `cancel` (a status, or
    /// `404`), then queues the task's state to `conn` if it does not get
    /// it as a subscriber.
    pub async fn apply_cancel(
        &self,
        conn: &Conn,
        task_id: &str,
        answer: Result<Status, BackendError>,
    ) -> Result<(), StoreError> {
        let policy = &self.policy;
        let Some(store) = &self.store else {
            match answer {
                Ok(status) => {
                    self.hub.apply_status(task_id, &status, policy, 0.0);
                }
                Err(_) => {
                    self.hub.fail(task_id, LOST_TASK.into(), policy);
                }
            }
            self.hub.send_state_to(conn, task_id);
            return Ok(());
        };
        for _ in 0..CAS_TRIES {
            let Some(mut stored) = store.load(task_id).await? else {
                break;
            };
            let loaded_seq = stored.tracked.task.seq;
            let now = self.clock.now_ms();
            let step = match &answer {
                Ok(status) => stored.tracked.on_status(status, policy, now, 0.0),
                Err(_) => stored.tracked.fail(LOST_TASK.into(), policy, now),
            };
            let changed = commit(&mut stored.tracked, step.next);
            let next = if stored.tracked.task.state.is_final() {
                NextDue::Final
            } else {
                NextDue::Keep
            };
            let saved = store
                .save(
                    &stored,
                    loaded_seq,
                    changed,
                    next,
                    policy.retention_ms / 1000,
                )
                .await?;
            if saved == Saved::Conflict {
                continue;
            }
            if changed {
                self.hub.apply_remote(
                    &stored.session,
                    Some(&stored.backend_id),
                    stored.tracked.task,
                );
            }
            break;
        }
        self.hub.send_state_to(conn, task_id);
        Ok(())
    }

    /// `forget`: drops a finished task of `conn`'s session.
    pub async fn forget(&self, conn: &Conn, task_id: &str, retention: Duration) {
        let Some(store) = &self.store else {
            if let Some(session) = self.hub.forget(conn, task_id) {
                self.scheduler.expire_session(session, retention).await;
            }
            return;
        };
        match store.forget(&conn.session, task_id).await {
            Ok(true) => self.hub.forget_remote(&conn.session, task_id),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "could not forget a task"),
        }
    }
}

/// Commits a step's new state, if any. Whether there was one.
pub fn commit(tracked: &mut Tracked, next: Option<Task>) -> bool {
    match next {
        Some(next) => {
            tracked.commit(next);
            true
        }
        None => false,
    }
}
