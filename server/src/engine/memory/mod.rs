//! The memory engine (the default): one process holds every session and
//! task in its [`Table`], polls them from its own delay queue ([`queue`])
//! and keeps them on disk ([`durable`]; not with `--ephemeral`). Its half
//! of the engine interface: what [`super::Engine`] asks of whichever engine
//! runs.

pub mod durable;
pub mod queue;
pub mod table;

use super::admission::{Refusal, StartLimits};
use super::backends::Backends;
use super::fanout::Fanout;
use super::pipeline::{Committed, Limits, PollCtx, TaskStore};
use crate::task::{Step, Tracked};
use app::protocol::Task;
use durable::{Durable, DurableError};
use queue::{Queue, QueueHandle};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
pub use table::Table;

/// A delay queue per backend over one table.
fn queues(
    table: &Table,
    backends: &Backends,
    retention: Duration,
) -> (Vec<Queue>, Vec<QueueHandle>) {
    backends
        .slots()
        .iter()
        .map(|slot| Queue::new(table.clone(), slot.ctx.clone(), &slot.limits, retention))
        .unzip()
}

#[derive(Clone)]
pub struct MemoryEngine {
    pub table: Table,
    /// One delay queue per backend, in the backends' order.
    queues: Arc<[QueueHandle]>,
    backends: Backends,
    retention: Duration,
    /// `None` with `--ephemeral`.
    durable: Option<Durable>,
}

impl MemoryEngine {
    /// The engine (everything in memory only) and its delay queue, for the
    /// caller to run.
    pub fn new(
        fanout: Fanout,
        ctx: Arc<PollCtx>,
        limits: &Limits,
        retention: Duration,
    ) -> (MemoryEngine, Queue) {
        let backends = Backends::single(ctx, limits.clone());
        let (engine, mut queues) = MemoryEngine::with_backends(fanout, &backends, retention);
        (engine, queues.remove(0))
    }

    /// The engine over several backends (everything in memory only) and
    /// its delay queues, one per backend, for the caller to run.
    pub fn with_backends(
        fanout: Fanout,
        backends: &Backends,
        retention: Duration,
    ) -> (MemoryEngine, Vec<Queue>) {
        let table = Table::new(fanout, false);
        let (queues, handles) = queues(&table, backends, retention);
        let engine = MemoryEngine {
            table,
            queues: handles.into(),
            backends: backends.clone(),
            retention,
            durable: None,
        };
        (engine, queues)
    }

    /// The first backend's queue (session expiries go there too).
    pub fn queue(&self) -> &QueueHandle {
        &self.queues[0]
    }

    /// The queue that polls a task of `backend_id` (as stored).
    fn queue_of(&self, backend_id: &str) -> &QueueHandle {
        &self.queues[self.backends.slot_of(backend_id)]
    }

    /// The durable engine over the file in `data_dir`: what it holds is
    /// loaded, every live task due for a poll at once, every finished one
    /// expiring at the end of its retention. A damaged file is an error.
    pub async fn open(
        fanout: Fanout,
        backends: &Backends,
        retention: Duration,
        data_dir: &std::path::Path,
    ) -> Result<(MemoryEngine, Vec<Queue>), DurableError> {
        let (db, path) = durable::open(data_dir)?;
        let records = durable::load(&db, &path)?;
        let now_ms = backends.slot(0).ctx.clock.now_ms();
        let table = Table::new(fanout, true);
        let (mut queues, handles) = queues(&table, backends, retention);
        let durable = Durable::start(db, table.clone());
        let engine = MemoryEngine {
            table,
            queues: handles.into(),
            backends: backends.clone(),
            retention,
            durable: Some(durable),
        };
        let (mut live, mut finished) = (0, 0);
        for record in &records {
            let id = engine.table.restore(record);
            let slot = backends.slot_of(&record.backend_id);
            let queue = &mut queues[slot];
            if record.task.state.is_final() {
                finished += 1;
                let ends_ms = record.task.updated_ms + retention.as_millis() as u64;
                let left = Duration::from_millis(ends_ms.saturating_sub(now_ms));
                queue.preload_expiry(id, left);
            } else {
                live += 1;
                let task = &record.task;
                let params = task
                    .params
                    .as_ref()
                    .map_or(serde_json::Value::Null, |p| p.value());
                backends.slot(slot).ctx.backend.restore(
                    &record.backend_id,
                    &task.kind,
                    &params,
                    task.created_ms,
                );
                queue.preload_poll(id, Duration::ZERO);
            }
        }
        tracing::info!(live, finished, file = %path.display(), "durable store loaded");
        Ok((engine, queues))
    }

    /// The session a cookie names, or a new one. A new session is forgotten
    /// one retention later unless a task or a connection holds it by then,
    /// so page views leave nothing behind.
    pub async fn resolve_session(&self, token: Option<&str>) -> (Arc<str>, bool) {
        let (session, is_new) = self.table.resolve_session(token);
        if is_new {
            self.queue()
                .expire_session(session.clone(), self.retention)
                .await;
        }
        (session, is_new)
    }

    /// An owner's session (server API), made when missing; like a new
    /// cookie session, forgotten one retention later unless a task holds it.
    pub async fn open_session(&self, session: &Arc<str>) {
        if self.table.open_session(session) {
            self.queue()
                .expire_session(session.clone(), self.retention)
                .await;
        }
    }

    /// Writes what is not on disk yet and stops the writer (at shutdown).
    pub async fn close(&self) {
        if let Some(durable) = &self.durable {
            durable.close().await;
        }
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

    /// Records a task the task service accepted (on disk, synced, when
    /// durable: it may be acknowledged then); its first poll is due now.
    pub async fn create(
        &self,
        session: &Arc<str>,
        task: &Task,
        backend_id: &str,
    ) -> Result<(), DurableError> {
        let id = self.table.insert(session, task, backend_id);
        if let Some(durable) = &self.durable {
            if let Err(e) = durable.flush().await {
                // Never acknowledged: not kept either.
                self.table.discard(&id);
                return Err(e);
            }
        }
        self.queue_of(backend_id).poll(id, Duration::ZERO).await;
        Ok(())
    }

    pub fn lookup(&self, session: &str, task_id: &str) -> Option<(Task, Arc<str>)> {
        self.table.lookup(session, task_id)
    }

    pub async fn forget(&self, session: &str, task_id: &str) -> bool {
        let (forgot, empty) = self.table.forget(session, task_id);
        if let Some(session) = empty {
            self.queue().expire_session(session, self.retention).await;
        }
        forgot
    }

    /// The last connection of `session` closed.
    pub async fn disconnected(&self, session: &Arc<str>) {
        if self.table.is_empty_session(session) {
            self.queue()
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
