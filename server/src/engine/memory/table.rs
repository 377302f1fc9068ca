//! The memory engine's task table: every session, its tasks with what the
//! poll pipeline remembers of them, and each session's start window. The
//! truth of the memory engine; every committed change is applied to the
//! [`Fanout`] under the table's lock, so changes reach it in `seq` order.

use super::durable::{Batch, Record, RecordRef};
use crate::engine::admission::{Refusal, StartLimits, StartWindow};
use crate::engine::fanout::Fanout;
use crate::engine::finals::Finals;
use crate::engine::hash::{Map, Set};
use crate::engine::pipeline::{next_due, Committed, TaskStore};
use crate::task::id::{is_session_token, new_session_token};
use crate::task::{Step, Tracked};
use app::protocol::Task;
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

/// Records a checkpoint serialises per hold of the lock ([`Table::serialise`]).
pub const CHECKPOINT_CHUNK: usize = 256;

/// Cheap to clone; all clones share one table.
#[derive(Clone)]
pub struct Table {
    /// A `std::sync::Mutex`: every operation is a few map lookups and never
    /// awaits. Lock order: the table, then the fanout (never the reverse).
    state: Arc<Mutex<State>>,
    fanout: Fanout,
    /// Told of every final state committed here (webhooks).
    pub finals: Finals,
}

#[derive(Default)]
struct State {
    sessions: Map<Arc<str>, SessionRec>,
    /// Boxed: a `TaskRec` is 296 bytes, and a map keeps its values in its
    /// buckets, an eighth to a half of them empty (it grows by doubling).
    tasks: Map<Arc<str>, Box<TaskRec>>,
    /// Durable: tasks changed (or gone) since the last write to disk.
    dirty: Option<Set<Arc<str>>>,
}

#[derive(Default)]
struct SessionRec {
    /// The session's tasks, oldest first.
    tasks: Vec<Arc<str>>,
    starts: StartWindow,
}

struct TaskRec {
    tr: Tracked,
    session: Arc<str>,
    backend_id: Arc<str>,
}

/// What a due poll finds.
pub enum PollTarget {
    Gone,
    Final,
    Live(Arc<str>),
}

impl Table {
    /// A table; with `durable`, it remembers which tasks changed since
    /// they were last taken for the disk ([`Table::take_dirty`]).
    pub fn new(fanout: Fanout, durable: bool) -> Self {
        let state = State {
            dirty: durable.then(Set::default),
            ..State::default()
        };
        Table {
            state: Arc::new(Mutex::new(state)),
            fanout,
            finals: Finals::default(),
        }
    }

    /// Tasks changed (or gone) since the last call, for a checkpoint to
    /// write with [`Table::serialise`].
    pub fn take_dirty(&self) -> Vec<Arc<str>> {
        match self.lock().dirty.as_mut() {
            Some(dirty) => dirty.drain().collect(),
            None => Vec::new(),
        }
    }

    /// `ids`' records serialised into `batch` (cleared first; `None`: gone),
    /// under one hold of the lock, so no copy of a task is made: the
    /// checkpoint takes [`CHECKPOINT_CHUNK`] ids at a time and reuses the
    /// buffer, so polls are not held up long and the buffer stays one
    /// chunk's size. A task changed after its chunk is dirty again for the
    /// next checkpoint.
    pub fn serialise(&self, ids: &[Arc<str>], batch: &mut Batch) {
        batch.bytes.clear();
        batch.entries.clear();
        let s = self.lock();
        for id in ids {
            let range = s.tasks.get(id).map(|t| {
                let start = batch.bytes.len();
                let record = RecordRef {
                    session: &t.session,
                    backend_id: &t.backend_id,
                    task: &t.tr.task,
                    track: t.tr.track,
                };
                serde_json::to_writer(&mut batch.bytes, &record)
                    .expect("a record always serialises");
                start..batch.bytes.len()
            });
            batch.entries.push((id.clone(), range));
        }
    }

    /// Marks tasks to be written again (a write failed).
    pub fn mark_dirty(&self, ids: impl IntoIterator<Item = Arc<str>>) {
        if let Some(dirty) = self.lock().dirty.as_mut() {
            dirty.extend(ids);
        }
    }

    /// A task read back from the disk at start-up.
    pub fn restore(&self, record: &Record) -> Arc<str> {
        let session: Arc<str> = record.session.as_str().into();
        let mut s = self.lock();
        add(&mut s, &session, record.tracked(), &record.backend_id)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The session a cookie names, or a new one when it is missing, malformed
    /// or unknown (never someone else's). Returns the token and whether it is new.
    pub fn resolve_session(&self, token: Option<&str>) -> (Arc<str>, bool) {
        let mut s = self.lock();
        if let Some(t) = token.filter(|t| is_session_token(t)) {
            if let Some((k, _)) = s.sessions.get_key_value(t) {
                return (k.clone(), false);
            }
        }
        let token: Arc<str> = new_session_token().into();
        s.sessions.insert(token.clone(), SessionRec::default());
        (token, true)
    }

    /// A session's tasks with their task-service ids, oldest first.
    /// A session the server names (an owner's, from the server API), made
    /// when missing. Whether it is new.
    pub fn open_session(&self, session: &Arc<str>) -> bool {
        let mut s = self.lock();
        if s.sessions.contains_key(session) {
            return false;
        }
        s.sessions.insert(session.clone(), SessionRec::default());
        true
    }

    pub fn session_tasks(&self, session: &str) -> Vec<(Task, Arc<str>)> {
        let s = self.lock();
        s.sessions.get(session).map_or_else(Vec::new, |e| {
            e.tasks
                .iter()
                .filter_map(|id| s.tasks.get(id))
                .map(|t| (t.tr.task.clone(), t.backend_id.clone()))
                .collect()
        })
    }

    /// Admits one start of `session` (see [`StartWindow::admit`]).
    pub fn admit(&self, session: &str, limits: StartLimits, now_ms: u64) -> Result<(), Refusal> {
        let mut guard = self.lock();
        let s = &mut *guard;
        let Some(entry) = s.sessions.get_mut(session) else {
            // Forgotten meanwhile (it had nothing): nothing counts against it.
            return Ok(());
        };
        let live = entry
            .tasks
            .iter()
            .filter(|id| {
                s.tasks
                    .get(*id)
                    .is_some_and(|t| !t.tr.task.state.is_final())
            })
            .count() as u64;
        entry.starts.admit(limits, now_ms, live)
    }

    pub fn start_done(&self, session: &str) {
        if let Some(e) = self.lock().sessions.get_mut(session) {
            e.starts.done();
        }
    }

    /// Records a task the task service accepted.
    pub fn insert(&self, session: &Arc<str>, task: &Task, backend_id: &str) -> Arc<str> {
        let mut s = self.lock();
        let id = add(&mut s, session, Tracked::new(task.clone()), backend_id);
        if let Some(dirty) = s.dirty.as_mut() {
            dirty.insert(id.clone());
        }
        id
    }

    /// Drops a task that was never acknowledged (its write failed).
    pub fn discard(&self, task_id: &str) {
        let mut guard = self.lock();
        let s = &mut *guard;
        if let Some((id, t)) = s.tasks.remove_entry(task_id) {
            if let Some(e) = s.sessions.get_mut(&t.session) {
                e.tasks.retain(|x| **x != *task_id);
            }
            if let Some(dirty) = s.dirty.as_mut() {
                dirty.insert(id);
            }
        }
    }

    /// A task of `session` and its task-service id.
    pub fn lookup(&self, session: &str, task_id: &str) -> Option<(Task, Arc<str>)> {
        let s = self.lock();
        let t = s.tasks.get(task_id).filter(|t| &*t.session == session)?;
        Some((t.tr.task.clone(), t.backend_id.clone()))
    }

    /// The session a task belongs to.
    pub fn session_of(&self, task_id: &str) -> Option<Arc<str>> {
        self.lock().tasks.get(task_id).map(|t| t.session.clone())
    }

    pub fn poll_target(&self, task_id: &str) -> PollTarget {
        match self.lock().tasks.get(task_id) {
            None => PollTarget::Gone,
            Some(t) if t.tr.task.state.is_final() => PollTarget::Final,
            Some(t) => PollTarget::Live(t.backend_id.clone()),
        }
    }

    /// Forgets a finished task (also from the fanout). Returns its session
    /// when that is left with no task, for the caller to schedule the
    /// session's expiry.
    pub fn expire_task(&self, task_id: &str) -> Option<Arc<str>> {
        let mut guard = self.lock();
        let s = &mut *guard;
        if !s.tasks.get(task_id)?.tr.task.state.is_final() {
            return None;
        }
        let (id, t) = s.tasks.remove_entry(task_id)?;
        self.fanout.forget(&t.session, task_id);
        if let Some(dirty) = s.dirty.as_mut() {
            dirty.insert(id);
        }
        let entry = s.sessions.get_mut(&t.session)?;
        entry.tasks.retain(|id| &**id != task_id);
        entry.tasks.is_empty().then_some(t.session)
    }

    /// `forget`: drops a finished task of `session` now. Whether it did,
    /// and the session when that is left with no task.
    pub fn forget(&self, session: &str, task_id: &str) -> (bool, Option<Arc<str>>) {
        let owned = self
            .lock()
            .tasks
            .get(task_id)
            .is_some_and(|t| &*t.session == session && t.tr.task.state.is_final());
        if owned {
            (true, self.expire_task(task_id))
        } else {
            (false, None)
        }
    }

    /// Whether `session` has no task (then it may expire).
    pub fn is_empty_session(&self, session: &str) -> bool {
        self.lock()
            .sessions
            .get(session)
            .is_some_and(|e| e.tasks.is_empty())
    }

    /// Forgets a session that has had no task and no connection since its
    /// expiry was scheduled.
    pub fn expire_session(&self, session: &str) {
        let mut s = self.lock();
        let unused = s.sessions.get(session).is_some_and(|e| e.tasks.is_empty());
        if unused && !self.fanout.is_connected(session) {
            s.sessions.remove(session);
        }
    }

    /// (sessions, tasks, live tasks)
    pub fn counts(&self) -> (usize, usize, usize) {
        let s = self.lock();
        let live = s
            .tasks
            .values()
            .filter(|t| !t.tr.task.state.is_final())
            .count();
        (s.sessions.len(), s.tasks.len(), live)
    }

    /// The ids of every task not yet final (for invariant checks).
    pub fn live_task_ids(&self) -> Vec<Arc<str>> {
        let s = self.lock();
        s.tasks
            .iter()
            .filter(|(_, t)| !t.tr.task.state.is_final())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// A copy of one task, whoever owns it (for tests).
    pub fn task(&self, task_id: &str) -> Option<Task> {
        self.lock().tasks.get(task_id).map(|t| t.tr.task.clone())
    }

    /// Runs `step` on a task and commits it, fanning the change out.
    fn transition(
        &self,
        task_id: &str,
        due_ms: Option<u64>,
        now_ms: u64,
        mut step: impl FnMut(&mut Tracked, u64) -> Step,
    ) -> Option<Committed> {
        let mut guard = self.lock();
        let s = &mut *guard;
        let t = s.tasks.get_mut(task_id)?;
        let outcome = step(&mut t.tr, now_ms);
        let changed = outcome.next.is_some();
        if let Some(task) = outcome.next {
            t.tr.commit(task);
            self.fanout.apply(&t.session, &t.tr.task);
            if t.tr.task.state.is_final() {
                self.finals.reached(&t.tr.task);
            }
        }
        // A session's tasks share a phase: polled together, their updates
        // go to the client in one write (fixed cadence).
        let phase = u64::from(crate::task::id::hash32(&t.session));
        let next = next_due(outcome.decision, &t.tr, due_ms, now_ms, Some(phase));
        if let (true, Some(dirty)) = (changed, s.dirty.as_mut()) {
            if let Some((id, _)) = s.tasks.get_key_value(task_id) {
                dirty.insert(id.clone());
            }
        }
        Some(Committed {
            next,
            changed: None,
        })
    }
}

/// A task into the table, last of its session's.
fn add(s: &mut State, session: &Arc<str>, tr: Tracked, backend_id: &str) -> Arc<str> {
    let id: Arc<str> = tr.task.id.as_str().into();
    s.sessions
        .entry(session.clone())
        .or_default()
        .tasks
        .push(id.clone());
    s.tasks.insert(
        id.clone(),
        Box::new(TaskRec {
            tr,
            session: session.clone(),
            backend_id: backend_id.into(),
        }),
    );
    id
}

impl TaskStore for Table {
    type Error = Infallible;
    type Loaded = ();

    fn commit<F>(
        &self,
        id: &str,
        _first: Option<()>,
        due_ms: Option<u64>,
        step: F,
    ) -> impl Future<Output = Result<Option<Committed>, Infallible>> + Send
    where
        F: FnMut(&mut Tracked, u64) -> Step + Send,
    {
        let now_ms = self.fanout.now_ms();
        let result = self.transition(id, due_ms, now_ms, step);
        std::future::ready(Ok(result))
    }
}
