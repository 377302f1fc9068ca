//! The memory engine (the default): one process holds every session and
//! task in its [`Table`] and polls them from its own delay queue
//! ([`queue`]). Its half of the engine interface: what [`super::Engine`]
//! asks of whichever engine runs.

pub mod queue;
pub mod table;

use super::admission::{Refusal, StartLimits};
use super::fanout::Fanout;
use super::pipeline::{Committed, Limits, PollCtx, TaskStore};
use crate::task::{Step, Tracked};
use app::protocol::Task;
use queue::{Queue, QueueHandle};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
pub use table::Table;

#[derive(Clone)]
pub struct MemoryEngine {
    pub table: Table,
    pub queue: QueueHandle,
    retention: Duration,
}

impl MemoryEngine {
    /// The engine and its delay queue, for the caller to run.
    pub fn new(
        fanout: Fanout,
        ctx: Arc<PollCtx>,
        limits: &Limits,
        retention: Duration,
    ) -> (MemoryEngine, Queue) {
        let table = Table::new(fanout);
        let (queue, handle) = Queue::new(table.clone(), ctx, limits, retention);
        let engine = MemoryEngine {
            table,
            queue: handle,
            retention,
        };
        (engine, queue)
    }

    pub fn resolve_session(&self, token: Option<&str>) -> (Arc<str>, bool) {
        self.table.resolve_session(token)
    }

    pub fn session_tasks(&self, session: &str) -> Vec<(Task, Arc<str>)> {
        self.table.session_tasks(session)
    }

    pub fn admit(&self, session: &str, limits: StartLimits, now_ms: u64) -> Result<(), Refusal> {
        self.table.admit(session, limits, now_ms)
    }

    pub fn start_done(&self, session: &str) {
        self.table.start_done(session)
    }

    /// Records a task the task service accepted; its first poll is due now.
    pub async fn create(&self, session: &Arc<str>, task: &Task, backend_id: &str) {
        let id = self.table.insert(session, task, backend_id);
        self.queue.poll(id, Duration::ZERO).await;
    }

    pub fn lookup(&self, session: &str, task_id: &str) -> Option<(Task, Arc<str>)> {
        self.table.lookup(session, task_id)
    }

    pub async fn forget(&self, session: &str, task_id: &str) -> bool {
        let (forgot, empty) = self.table.forget(session, task_id);
        if let Some(session) = empty {
            self.queue.expire_session(session, self.retention).await;
        }
        forgot
    }

    /// The last connection of `session` closed.
    pub async fn disconnected(&self, session: &Arc<str>) {
        if self.table.is_empty_session(session) {
            self.queue
                .expire_session(session.clone(), self.retention)
                .await;
        }
    }

    pub async fn commit(
        &self,
        id: &str,
        step: impl FnMut(&mut Tracked, u64) -> Step + Send,
    ) -> Result<Option<Committed>, Infallible> {
        self.table.commit(id, None, None, step).await
    }
}
