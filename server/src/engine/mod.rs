//! The engine: where sessions and tasks live and how their changes reach
//! the connections. The WebSocket, the page (and later the HTTP API) call
//! only [`Engine`], for everything: sessions, connect, start, cancel,
//! subscribe, forget, snapshots. Nothing outside `engine/` knows which
//! implementation runs:
//!
//! - [`memory`] (default): one process holds everything and polls from its
//!   own delay queue.
//! - [`redis`] (`--redis URL`): Redis holds the truth and the delay queue,
//!   shared by web and worker processes.
//!
//! Why an enum and not a trait object: the two implementations are known
//! at compile time and chosen once at start-up; an enum dispatches async
//! methods without boxing every future, and the flows that do not depend
//! on the implementation (start, cancel, connect — below) are written once
//! here, around the few calls that do. Both share the [`fanout`], the poll
//! [`pipeline`] and the [`admission`] rule.

pub mod admission;
pub mod backends;
pub mod fanout;
pub mod finals;
pub mod hash;
pub mod memory;
pub mod pipeline;
pub mod redis;

use crate::backend::{route, Backend, BackendError};
use crate::clock::Clock;
use crate::task::policy::PollPolicy;
use crate::task::{new_task, LOST_TASK};
use admission::{Refusal, StartLimits};
use app::protocol::{ErrorCode, Task};
use backends::Backends;
use fanout::{CloseReason, Conn, Fanout, NotFound, View};
use memory::MemoryEngine;
use redis::store::StoreError;
use redis::RedisEngine;
use std::sync::Arc;

/// The engine: shared parts plus the implementation. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    fanout: Fanout,
    backends: Backends,
    clock: Clock,
    imp: Imp,
    /// Webhooks, when configured (contract section 4).
    hooks: Option<crate::webhook::Webhooks>,
}

/// Which engine runs: chosen once, by `Application::build`.
#[derive(Clone)]
pub enum Imp {
    Memory(MemoryEngine),
    Redis(RedisEngine),
}

/// A request the engine refused: the protocol's error code and a message
/// for the client (the caller adds the `ref`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub code: ErrorCode,
    pub message: String,
}

impl Refused {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refused {
            code,
            message: message.into(),
        }
    }
}

impl From<Refusal> for Refused {
    fn from(r: Refusal) -> Self {
        Refused::new(ErrorCode::TooManyTasks, r.to_string())
    }
}

impl From<StoreError> for Refused {
    fn from(e: StoreError) -> Self {
        Refused::new(ErrorCode::BackendUnavailable, e.to_string())
    }
}

impl From<BackendError> for Refused {
    fn from(e: BackendError) -> Self {
        let code = match &e {
            BackendError::Rejected { code, .. } => *code,
            BackendError::Unavailable { .. } => ErrorCode::BackendUnavailable,
            BackendError::NotFound | BackendError::Protocol(_) => ErrorCode::Internal,
        };
        if code == ErrorCode::Internal {
            tracing::warn!(error = %e, "task service answered out of contract");
        }
        Refused::new(code, e.to_string())
    }
}

/// An admitted start, to hand to [`Engine::start`] or [`Engine::release`].
pub struct StartTicket(Option<redis::Nonce>);

/// What `cancel` must do next.
pub enum CancelTarget {
    /// The task is already final: its state was queued to the caller.
    AlreadyFinal,
    /// Ask the task service to cancel this (backend) id.
    Backend(Arc<str>),
}

/// The engine's sizes, for tests and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Sessions held (memory: all; Redis: those connected here).
    pub sessions: usize,
    pub tasks: usize,
    pub live_tasks: usize,
    pub connections: usize,
    pub subscriptions: usize,
    /// Frames waiting in all outboxes (bounded by subscriptions + replies).
    pub pending_frames: usize,
}

impl Engine {
    /// The engine over `imp`, which owns the truth; `fanout` must be the
    /// one `imp` commits into.
    pub fn new(
        fanout: Fanout,
        imp: Imp,
        backend: Backend,
        policy: Arc<PollPolicy>,
        clock: Clock,
    ) -> Self {
        let ctx = Arc::new(pipeline::PollCtx {
            backend,
            policy,
            clock,
            stats: Arc::default(),
        });
        let limits = pipeline::Limits {
            max_in_flight: 1,
            max_polls_per_s: 0,
        };
        Engine::with_backends(fanout, imp, Backends::single(ctx, limits), clock)
    }

    /// The engine over `imp` brokering for `backends` (the ones `imp`'s
    /// queues poll).
    pub fn with_backends(fanout: Fanout, imp: Imp, backends: Backends, clock: Clock) -> Self {
        Engine {
            fanout,
            backends,
            clock,
            imp,
            hooks: None,
        }
    }

    /// Turns webhooks on: tasks may name one (or their kind does), and
    /// every final state committed goes to it.
    pub fn set_webhooks(&mut self, hooks: crate::webhook::Webhooks) {
        match &self.imp {
            Imp::Memory(m) => m.table.finals.set(hooks.clone()),
            Imp::Redis(r) => r.finals.set(hooks.clone()),
        }
        self.hooks = Some(hooks);
    }

    /// The webhooks, when configured (to close them at shutdown).
    pub fn webhooks(&self) -> Option<&crate::webhook::Webhooks> {
        self.hooks.as_ref()
    }

    /// The kinds a client may start (empty: any, to the one backend).
    pub fn kinds(&self) -> Vec<app::kinds::KindInfo> {
        self.backends.kinds()
    }

    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// The engine's clock (a copy: for long-lived tasks that only need the time).
    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// The memory engine, when that is the one running (for tests).
    pub fn as_memory(&self) -> Option<&MemoryEngine> {
        match &self.imp {
            Imp::Memory(m) => Some(m),
            Imp::Redis(_) => None,
        }
    }

    /// The session a cookie names, or a new one when it is missing,
    /// malformed or unknown. Returns the token and whether it is new.
    pub async fn resolve_session(
        &self,
        token: Option<&str>,
    ) -> Result<(Arc<str>, bool), StoreError> {
        match &self.imp {
            Imp::Memory(m) => Ok(m.resolve_session(token).await),
            Imp::Redis(r) => r.resolve_session(token).await,
        }
    }

    /// A session's tasks, oldest first, with their task-service ids.
    async fn load_session(&self, session: &str) -> Result<Vec<Task>, StoreError> {
        Ok(match &self.imp {
            Imp::Memory(m) => m
                .session_tasks(session)
                .into_iter()
                .map(|(t, _)| t)
                .collect(),
            Imp::Redis(r) => r
                .session_tasks(session)
                .await?
                .into_iter()
                .map(|(t, _)| t)
                .collect(),
        })
    }

    /// A session's tasks, oldest first (for the page's first render).
    pub async fn session_tasks(&self, session: &str) -> Vec<Task> {
        self.load_session(session).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "page rendered without the session's tasks");
            Vec::new()
        })
    }

    /// Registers a connection, queues its `welcome` and subscribes it to
    /// every task of its session that `view` sees (and to the session's
    /// future tasks, unless it watches one task). The session is held in
    /// the fanout while its tasks are read, so changes that arrive meanwhile
    /// are kept, and whichever of the two is newer wins.
    pub async fn connect(&self, session: Arc<str>, view: View) -> Result<Conn, StoreError> {
        self.fanout.hold(&session);
        let loaded = self.load_session(&session).await;
        let result = loaded.map(|tasks| {
            for task in &tasks {
                self.fanout.apply(&session, task);
            }
            self.fanout.connect(session.clone(), view)
        });
        self.fanout.unhold(&session);
        result
    }

    /// Forgets a connection and its subscriptions.
    pub async fn disconnect(&self, conn: &Conn) {
        let last = self.fanout.disconnect(conn);
        if let (true, Imp::Memory(m)) = (last, &self.imp) {
            m.disconnected(&conn.session).await;
        }
    }

    /// Whether a task may have `url` as its webhook.
    pub fn check_webhook(&self, url: &str) -> Result<(), String> {
        match &self.hooks {
            Some(hooks) => hooks.check_url(url),
            None => Err("this server has no [webhooks] allow-list".into()),
        }
    }

    /// An owner's session (tasks started over the server API): made here
    /// when new, so the per-session limits count its starts from the first
    /// one; forgotten one retention after its last task, like any session.
    pub async fn open_owner(&self, session: &Arc<str>) {
        if let Imp::Memory(m) = &self.imp {
            m.open_session(session).await;
        }
    }

    /// Admits one `start` of `session` (per-session limits, across every
    /// web process with Redis), or says why not.
    pub async fn admit_start(
        &self,
        session: &str,
        limits: StartLimits,
    ) -> Result<StartTicket, Refused> {
        let now = self.clock.now_ms();
        match &self.imp {
            Imp::Memory(m) => {
                m.admit(session, limits, now)?;
                Ok(StartTicket(None))
            }
            Imp::Redis(r) => Ok(StartTicket(Some(r.admit(session, limits, now).await??))),
        }
    }

    /// An admitted start that will not go ahead.
    pub async fn release(&self, session: &str, ticket: StartTicket) {
        match (&self.imp, ticket.0) {
            (Imp::Redis(r), Some(nonce)) => r.start_done(session, nonce).await,
            (Imp::Memory(m), _) => m.start_done(session),
            (Imp::Redis(_), None) => {}
        }
    }

    /// Starts a task on the task service and records it: `accepted` goes to
    /// `conn`, which is subscribed, as is every other connection of the
    /// session; its first poll is due at once.
    pub async fn start(
        &self,
        conn: &Conn,
        ticket: StartTicket,
        reference: String,
        kind: &str,
        params: serde_json::Value,
    ) -> Result<(), Refused> {
        let result = self.start_task(&conn.session, kind, params, None).await;
        self.release(&conn.session, ticket).await;
        self.fanout.accepted(conn, reference, &result?);
        Ok(())
    }

    /// [`Engine::start`] on behalf of `session` without a connection (the
    /// server API): the task as accepted; the session's connections (owner
    /// tokens) are subscribed to it.
    pub async fn start_for(
        &self,
        session: &Arc<str>,
        ticket: StartTicket,
        kind: &str,
        params: serde_json::Value,
        webhook: Option<&str>,
    ) -> Result<Task, Refused> {
        let result = self.start_task(session, kind, params, webhook).await;
        self.release(session, ticket).await;
        let task = result?;
        self.fanout.apply(session, &task);
        Ok(task)
    }

    /// Asks the kind's backend to start a task and records it for
    /// `session`. A task the store cannot record is cancelled again (nobody
    /// would ever see it).
    async fn start_task(
        &self,
        session: &Arc<str>,
        kind: &str,
        params: serde_json::Value,
        webhook: Option<&str>,
    ) -> Result<Task, Refused> {
        let target = self.backends.target(kind)?;
        if let Some(schema) = target.schema {
            schema.check(&params).map_err(|e| {
                let message = match &e.field {
                    Some(field) => format!("{field}: {}", e.message),
                    None => e.message.clone(),
                };
                Refused::new(ErrorCode::InvalidParams, message)
            })?;
        }
        let slot = self.backends.slot(target.slot);
        let task = new_task(session, kind, Some(params.clone()), self.clock.now_ms());
        // The webhook is known before the task can end (its first poll is due
        // as soon as it is recorded).
        if let Some(url) = webhook.or(target.webhook) {
            let hooks = self.hooks.as_ref().ok_or_else(|| {
                Refused::new(
                    ErrorCode::InvalidParams,
                    "webhook: this server has no [webhooks] allow-list",
                )
            })?;
            hooks.register(&task.id, url).await.map_err(|e| match e {
                crate::webhook::WebhookError::Url(why) => {
                    Refused::new(ErrorCode::InvalidParams, format!("webhook: {why}"))
                }
                other => Refused::new(ErrorCode::BackendUnavailable, other.to_string()),
            })?;
        }
        let remote_id = slot
            .ctx
            .backend
            .start(&task.id, target.remote, &params)
            .await?;
        let backend_id = route(&slot.name, &remote_id);
        let created = match &self.imp {
            Imp::Memory(m) => m
                .create(session, &task, &backend_id)
                .await
                .map_err(|e| e.to_string()),
            Imp::Redis(r) => r
                .create(session, &task, &backend_id)
                .await
                .map_err(|e| e.to_string()),
        };
        if let Err(e) = created {
            tracing::warn!(error = %e, "a started task could not be recorded");
            let _ = slot.ctx.backend.cancel(&backend_id).await;
            return Err(Refused::new(ErrorCode::BackendUnavailable, e));
        }
        Ok(task)
    }

    /// A task of `session` from the engine's truth, put into the fanout (it
    /// may have been started on another process a moment ago).
    async fn lookup(&self, session: &str, task_id: &str) -> Option<(Task, Arc<str>)> {
        let found = match &self.imp {
            Imp::Memory(m) => m.lookup(session, task_id),
            Imp::Redis(r) => match r.lookup(session, task_id).await {
                Ok(found) => found.map(|(t, b)| (t, b.into())),
                Err(e) => {
                    tracing::warn!(error = %e, "could not read a task from Redis");
                    None
                }
            },
        };
        if let Some((task, _)) = &found {
            self.fanout.apply(session, task);
        }
        found
    }

    /// A task of `session` (the server API's `GET`).
    pub async fn task_of(&self, session: &str, task_id: &str) -> Option<Task> {
        self.lookup(session, task_id).await.map(|(task, _)| task)
    }

    /// The session a task belongs to, if it exists (the server API checks
    /// it is one of the caller's owners).
    pub async fn session_of(&self, task_id: &str) -> Result<Option<Arc<str>>, StoreError> {
        Ok(match &self.imp {
            Imp::Memory(m) => m.table.session_of(task_id),
            Imp::Redis(r) => r.store.session_of(task_id).await?.map(Into::into),
        })
    }

    /// Every task of `session` still known, newest first (the server API's list).
    pub async fn tasks_of(&self, session: &str) -> Result<Vec<Task>, StoreError> {
        let mut tasks = self.load_session(session).await?;
        tasks.reverse();
        Ok(tasks)
    }

    /// Subscribes `conn` to a task it may see and queues its state.
    pub async fn subscribe(&self, conn: &Conn, task_id: &str) -> Result<(), NotFound> {
        if !conn.view.sees(task_id) {
            return Err(NotFound);
        }
        match self.fanout.subscribe(conn, task_id) {
            Err(NotFound) if self.lookup(&conn.session, task_id).await.is_some() => {
                self.fanout.subscribe(conn, task_id)
            }
            other => other,
        }
    }

    pub fn unsubscribe(&self, conn: &Conn, task_id: &str) {
        self.fanout.unsubscribe(conn, task_id);
    }

    /// Looks a task up for `cancel`. A task already final has its state
    /// queued to the caller right away.
    pub async fn cancel_target(
        &self,
        conn: &Conn,
        task_id: &str,
    ) -> Result<CancelTarget, NotFound> {
        if !conn.view.sees(task_id) {
            return Err(NotFound);
        }
        let (task, backend_id) = self.lookup(&conn.session, task_id).await.ok_or(NotFound)?;
        if task.state.is_final() {
            self.fanout.send_state_to(conn, task_id, false);
            Ok(CancelTarget::AlreadyFinal)
        } else {
            Ok(CancelTarget::Backend(backend_id))
        }
    }

    /// Asks the task service to cancel a task and applies its answer (a
    /// status, or `404`: the task is lost) like a poll's; the task's state
    /// then goes to `conn` if it does not get it as a subscriber.
    pub async fn cancel(
        &self,
        conn: &Conn,
        task_id: &str,
        backend_id: &str,
    ) -> Result<(), Refused> {
        self.cancel_backend(&conn.session, task_id, backend_id)
            .await?;
        self.fanout.send_state_to(conn, task_id, true);
        Ok(())
    }

    /// Cancels a task of `session` without a connection (the server API):
    /// its state after the task service answered; a finished task as it is.
    pub async fn cancel_for(&self, session: &str, task_id: &str) -> Result<Task, Refused> {
        let not_found = || Refused::new(ErrorCode::NotFound, format!("no task `{task_id}`"));
        let (task, backend_id) = self.lookup(session, task_id).await.ok_or_else(not_found)?;
        if task.state.is_final() {
            return Ok(task);
        }
        match self.cancel_backend(session, task_id, &backend_id).await? {
            Some(changed) => Ok(changed),
            None => Ok(self.task_of(session, task_id).await.unwrap_or(task)),
        }
    }

    /// Asks the task service to cancel and commits its answer: the new
    /// state, if it changed.
    async fn cancel_backend(
        &self,
        session: &str,
        task_id: &str,
        backend_id: &str,
    ) -> Result<Option<Task>, Refused> {
        let slot = self.backends.slot(self.backends.slot_of(backend_id));
        let answer = match slot.ctx.backend.cancel(backend_id).await {
            Ok(status) => Some(status),
            Err(BackendError::NotFound) => None,
            Err(e) => return Err(e.into()),
        };
        let step = cancel_step(&answer, &slot.ctx.policy);
        let changed = match &self.imp {
            Imp::Memory(m) => m
                .commit(task_id, step)
                .await
                .ok()
                .flatten()
                .and_then(|c| c.changed),
            // The partition's owner commits it; shown here at once.
            Imp::Redis(r) => r.cancel(session, task_id, answer.clone(), step).await?,
        };
        if let Some(task) = &changed {
            self.fanout.apply(session, task);
        }
        Ok(changed)
    }

    /// `forget`: drops a finished task of `conn`'s session.
    pub async fn forget(&self, conn: &Conn, task_id: &str) {
        let forgot = match &self.imp {
            Imp::Memory(m) => m.forget(&conn.session, task_id).await,
            Imp::Redis(r) => r.forget(&conn.session, task_id).await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "could not forget a task");
                false
            }),
        };
        if forgot {
            self.fanout.forget(&conn.session, task_id);
        }
    }

    /// Puts away what must outlive the process (the durable store's last
    /// checkpoint), once the polls have stopped.
    pub async fn close(&self) {
        if let Imp::Memory(m) = &self.imp {
            m.close().await;
        }
    }

    /// Tells every connection to close with `reason` (server shutdown).
    pub fn close_all(&self, reason: CloseReason) {
        self.fanout.close_all(reason);
    }

    pub fn counts(&self) -> Counts {
        let f = self.fanout.counts();
        let (sessions, tasks, live_tasks) = match &self.imp {
            Imp::Memory(m) => m.table.counts(),
            Imp::Redis(_) => {
                let (tasks, live) = self.fanout.task_counts();
                (f.sessions, tasks, live)
            }
        };
        Counts {
            sessions,
            tasks,
            live_tasks,
            connections: f.connections,
            subscriptions: f.subscriptions,
            pending_frames: f.pending_frames,
        }
    }
}

/// The transition a `cancel` commits: the task service's answer to it
/// applied like a poll's, or, when it does not know the task (`None`), the
/// task lost. The same on a web process (memory engine) and on a
/// partition's owner (Redis engine).
pub fn cancel_step<'a>(
    answer: &'a Option<crate::task_api::Status>,
    policy: &'a crate::task::policy::PollPolicy,
) -> impl FnMut(&mut crate::task::Tracked, u64) -> crate::task::Step + Send + 'a {
    move |tracked, now| match answer {
        Some(status) => tracked.on_status(status, policy, now, 0.0),
        None => tracked.fail(LOST_TASK.into(), policy, now),
    }
}
