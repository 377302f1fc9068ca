//! The hub: sessions, their tasks, and which connections watch which task.
//! Every change to a task goes through here, gets the next `seq`, is
//! serialised once and fans out to the task's subscribers' outboxes.

pub mod outbox;
pub mod transition;

use crate::backend::BackendError;
use crate::backend::Status;
use crate::clock::Clock;
use crate::scheduler::policy::{Decision, PollPolicy};
use app::protocol::{ServerMsg, Task, TaskMsgRef, TaskState, PROTOCOL_VERSION};
use axum::extract::ws::Utf8Bytes;
pub use outbox::{CloseReason, Next, Outbox};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use transition::{Step, Tracked};

pub type ConnId = u64;

/// Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    /// One lock for sessions, tasks and subscriptions: every operation is a
    /// few map lookups and never awaits, so a `std::sync::Mutex` is cheaper
    /// than anything async and keeps "snapshot + subscribe" atomic.
    state: Mutex<State>,
    clock: Clock,
    next_conn: AtomicU64,
    /// The Redis engine's web side: the hub mirrors only the sessions that
    /// have a connection here (and their tasks), and lets go of a session
    /// when its last connection closes. Redis holds the truth.
    mirror: bool,
}

#[derive(Default)]
struct State {
    sessions: HashMap<Arc<str>, SessionEntry>,
    tasks: HashMap<Arc<str>, TaskEntry>,
    conns: HashMap<ConnId, Arc<Outbox>>,
}

#[derive(Default)]
struct SessionEntry {
    /// The session's tasks, oldest first.
    tasks: Vec<Arc<str>>,
    conns: u32,
    /// When its recent `start`s were admitted (ms), at most the per-minute cap.
    recent_starts: VecDeque<u64>,
    /// Starts admitted and still waiting on the task service.
    starts_pending: u32,
    /// Mirror mode: connections being set up (loading from Redis).
    held: u32,
}

struct TaskEntry {
    /// `task.id`, shared with the outboxes that key their updates by it.
    id: Arc<str>,
    /// The state and what the poll engine remembers of it.
    tr: Tracked,
    /// `{"type":"task",...}` of the current state, serialised once.
    frame: Utf8Bytes,
    session: Arc<str>,
    backend_id: Arc<str>,
    subscribers: Vec<(ConnId, Arc<Outbox>)>,
}

/// One WebSocket connection as the hub knows it.
pub struct Conn {
    pub id: ConnId,
    pub session: Arc<str>,
    pub outbox: Arc<Outbox>,
    /// When the peer last sent anything, pongs included (Unix ms).
    pub last_seen_ms: AtomicU64,
}

/// The hub's sizes, for tests and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HubCounts {
    pub sessions: usize,
    pub tasks: usize,
    pub live_tasks: usize,
    pub connections: usize,
    pub subscriptions: usize,
    /// Frames waiting in all outboxes (bounded by subscriptions + replies).
    pub pending_frames: usize,
}

/// The task id was not found *in this session* (whether it exists elsewhere
/// is never revealed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotFound;

/// What `cancel` must do next.
pub enum CancelTarget {
    /// The task is already final: its state was queued to the caller.
    AlreadyFinal,
    /// Ask the task service to cancel this (backend) id.
    Backend(Arc<str>),
}

fn task_frame(task: &Task) -> Utf8Bytes {
    Utf8Bytes::from(serde_json::to_string(&TaskMsgRef { task }).expect("a Task always serialises"))
}

pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    // The OS random source failing is not something a request can cause.
    getrandom::fill(&mut buf).expect("the OS random source works");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// A well-formed session token: 32 lowercase hex chars (128 random bits).
pub fn is_token(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Hub {
    pub fn new(clock: Clock) -> Self {
        Self::build(clock, false)
    }

    /// A hub that mirrors Redis for this process's connections.
    pub fn mirror(clock: Clock) -> Self {
        Self::build(clock, true)
    }

    fn build(clock: Clock, mirror: bool) -> Self {
        Hub {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                clock,
                next_conn: AtomicU64::new(1),
                mirror,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn now_ms(&self) -> u64 {
        self.inner.clock.now_ms()
    }

    /// The session a cookie names, or a new one when it is missing, malformed
    /// or unknown (never someone else's). Returns the token and whether it is new.
    pub fn resolve_session(&self, token: Option<&str>) -> (Arc<str>, bool) {
        let mut s = self.lock();
        if let Some(t) = token.filter(|t| is_token(t)) {
            if let Some((k, _)) = s.sessions.get_key_value(t) {
                return (k.clone(), false);
            }
        }
        let token: Arc<str> = random_hex(16).into();
        s.sessions.insert(token.clone(), SessionEntry::default());
        (token, true)
    }

    /// Registers a connection of `session`, queues its `welcome` (every task
    /// of the session) and subscribes it to all of them, atomically, so no
    /// update falls between the snapshot and the subscription.
    pub fn connect(&self, session: Arc<str>) -> Conn {
        let id = self.inner.next_conn.fetch_add(1, Ordering::Relaxed);
        let outbox = Outbox::new();
        let mut guard = self.lock();
        let s = &mut *guard;
        let entry = s.sessions.entry(session.clone()).or_default();
        entry.conns += 1;
        let mut tasks = Vec::with_capacity(entry.tasks.len());
        for tid in &entry.tasks {
            if let Some(t) = s.tasks.get_mut(tid) {
                t.subscribers.push((id, outbox.clone()));
                tasks.push(t.tr.task.clone());
            }
        }
        s.conns.insert(id, outbox.clone());
        let welcome = ServerMsg::Welcome {
            protocol: PROTOCOL_VERSION,
            session: session.to_string(),
            tasks,
        };
        outbox.push_reply(welcome.to_json().into());
        Conn {
            id,
            session,
            outbox,
            last_seen_ms: AtomicU64::new(self.now_ms()),
        }
    }

    /// Admits one `start` of `conn`'s session, or says which limit it hits:
    /// at most `per_min` starts a minute and `max_live` tasks not yet final
    /// (starts still waiting on the task service count). An admitted start
    /// must be followed by [`Hub::start_done`].
    pub fn admit_start(&self, conn: &Conn, per_min: u64, max_live: u64) -> Result<(), String> {
        let now = self.now_ms();
        let mut guard = self.lock();
        let s = &mut *guard;
        let Some(entry) = s.sessions.get_mut(&conn.session) else {
            return Err("unknown session".into());
        };
        while entry
            .recent_starts
            .front()
            .is_some_and(|&t| now.saturating_sub(t) >= 60_000)
        {
            entry.recent_starts.pop_front();
        }
        if entry.recent_starts.len() as u64 >= per_min {
            return Err(format!("at most {per_min} tasks may be started per minute"));
        }
        let live = entry
            .tasks
            .iter()
            .filter(|id| {
                s.tasks
                    .get(*id)
                    .is_some_and(|t| !t.tr.task.state.is_final())
            })
            .count() as u64
            + entry.starts_pending as u64;
        if live >= max_live {
            return Err(format!(
                "at most {max_live} tasks may run at once in a session"
            ));
        }
        entry.recent_starts.push_back(now);
        entry.starts_pending += 1;
        Ok(())
    }

    /// An admitted start got its answer (task created, or refused).
    pub fn start_done(&self, conn: &Conn) {
        if let Some(e) = self.lock().sessions.get_mut(&conn.session) {
            e.starts_pending = e.starts_pending.saturating_sub(1);
        }
    }

    /// Forgets a connection and its subscriptions. Returns the session when
    /// it is left with no task and no connection, for the caller to schedule
    /// its expiry.
    pub fn disconnect(&self, conn: &Conn) -> Option<Arc<str>> {
        conn.outbox.close(CloseReason::Gone);
        let mut guard = self.lock();
        let s = &mut *guard;
        s.conns.remove(&conn.id);
        let entry = s.sessions.get_mut(&conn.session)?;
        entry.conns = entry.conns.saturating_sub(1);
        for tid in &entry.tasks {
            if let Some(t) = s.tasks.get_mut(tid) {
                t.subscribers.retain(|(c, _)| *c != conn.id);
            }
        }
        if self.inner.mirror {
            release_if_unused(s, &conn.session);
            return None;
        }
        (entry.conns == 0 && entry.tasks.is_empty()).then(|| conn.session.clone())
    }

    /// Records a task the task service accepted, queues `accepted` to the
    /// starting connection and subscribes it. Returns the new task's id.
    pub fn create_task(
        &self,
        conn: &Conn,
        reference: String,
        kind: &str,
        params: Option<serde_json::Value>,
        backend_id: &str,
    ) -> Arc<str> {
        let task = self.new_task(kind, params);
        self.insert_task(conn, reference, task, backend_id)
    }

    /// A new task's first state (`queued`, `seq` 0) under a fresh id.
    pub fn new_task(&self, kind: &str, params: Option<serde_json::Value>) -> Task {
        let now = self.now_ms();
        Task {
            id: format!("t{}", random_hex(12)),
            kind: kind.to_string(),
            state: TaskState::Queued,
            done: 0,
            total: None,
            message: None,
            result: None,
            error: None,
            seq: 0,
            created_ms: now,
            updated_ms: now,
            params,
        }
    }

    /// Adds a new task to `conn`'s session (unless a change from Redis put
    /// it there first), queues `accepted` to `conn` and subscribes it.
    pub fn insert_task(
        &self,
        conn: &Conn,
        reference: String,
        task: Task,
        backend_id: &str,
    ) -> Arc<str> {
        let accepted = ServerMsg::Accepted {
            reference,
            task: task.clone(),
        };
        let mut guard = self.lock();
        let s = &mut *guard;
        conn.outbox.push_reply(accepted.to_json().into());
        if let Some((id, t)) = s.tasks.get_key_value_mut_compat(&task.id) {
            if !t.subscribers.iter().any(|(c, _)| *c == conn.id) {
                t.subscribers.push((conn.id, conn.outbox.clone()));
            }
            return id;
        }
        let id: Arc<str> = task.id.as_str().into();
        s.sessions
            .entry(conn.session.clone())
            .or_default()
            .tasks
            .push(id.clone());
        s.tasks.insert(
            id.clone(),
            TaskEntry {
                id: id.clone(),
                frame: task_frame(&task),
                tr: Tracked::new(task),
                session: conn.session.clone(),
                backend_id: backend_id.into(),
                subscribers: vec![(conn.id, conn.outbox.clone())],
            },
        );
        id
    }

    /// Mirror mode: a connection of `session` is being set up; changes
    /// from Redis to its tasks are kept from now on.
    pub fn hold(&self, session: &Arc<str>) {
        self.lock()
            .sessions
            .entry(session.clone())
            .or_default()
            .held += 1;
    }

    /// Mirror mode: the set-up [`Hub::hold`] began is over.
    pub fn unhold(&self, session: &str) {
        let mut guard = self.lock();
        let s = &mut *guard;
        if let Some(e) = s.sessions.get_mut(session) {
            e.held = e.held.saturating_sub(1);
        }
        release_if_unused(s, session);
    }

    /// The sessions this process mirrors (to read again from Redis after
    /// its subscription to changes was lost).
    pub fn sessions(&self) -> Vec<Arc<str>> {
        self.lock().sessions.keys().cloned().collect()
    }

    /// Mirror mode: a task's state as Redis has it. Kept only for a session
    /// mirrored here, and only when newer than what is here (a lost or late
    /// message can never move a task back). Returns whether it was applied.
    pub fn apply_remote(&self, session: &str, backend_id: Option<&str>, task: Task) -> bool {
        let mut guard = self.lock();
        let s = &mut *guard;
        let Some((session, entry)) = s.sessions.get_key_value_mut_compat(session) else {
            return false;
        };
        if let Some(t) = s.tasks.get_mut(task.id.as_str()) {
            if task.seq <= t.tr.task.seq {
                return false;
            }
            t.tr.task = task;
            publish(t);
            return true;
        }
        let id: Arc<str> = task.id.as_str().into();
        entry.tasks.push(id.clone());
        s.tasks.insert(
            id.clone(),
            TaskEntry {
                id,
                frame: task_frame(&task),
                tr: Tracked::new(task),
                session,
                backend_id: backend_id.unwrap_or_default().into(),
                subscribers: Vec::new(),
            },
        );
        true
    }

    /// The `seq` this hub holds for a task, if it holds the task.
    pub fn seq_of(&self, task_id: &str) -> Option<u64> {
        self.lock().tasks.get(task_id).map(|t| t.tr.task.seq)
    }

    /// Mirror mode: a task was forgotten (on this or another process).
    pub fn forget_remote(&self, session: &str, task_id: &str) {
        let mut guard = self.lock();
        let s = &mut *guard;
        if s.tasks.get(task_id).is_some_and(|t| &*t.session == session) {
            s.tasks.remove(task_id);
            if let Some(e) = s.sessions.get_mut(session) {
                e.tasks.retain(|id| &**id != task_id);
            }
        }
    }

    /// Subscribes `conn` to a task of its session and queues the current state.
    pub fn subscribe(&self, conn: &Conn, task_id: &str) -> Result<(), NotFound> {
        let mut s = self.lock();
        let t = s
            .tasks
            .get_mut(task_id)
            .filter(|t| t.session == conn.session)
            .ok_or(NotFound)?;
        if !t.subscribers.iter().any(|(c, _)| *c == conn.id) {
            t.subscribers.push((conn.id, conn.outbox.clone()));
        }
        conn.outbox
            .push_update(&t.id, t.tr.task.seq, t.frame.clone());
        Ok(())
    }

    /// Stops sending a task's updates to `conn`. Unknown tasks are ignored
    /// (`unsubscribe` has no reply).
    pub fn unsubscribe(&self, conn: &Conn, task_id: &str) {
        let mut s = self.lock();
        if let Some(t) = s
            .tasks
            .get_mut(task_id)
            .filter(|t| t.session == conn.session)
        {
            t.subscribers.retain(|(c, _)| *c != conn.id);
        }
    }

    /// Looks a task up for `cancel`. A task already final has its state
    /// queued to the caller right away.
    pub fn cancel_target(&self, conn: &Conn, task_id: &str) -> Result<CancelTarget, NotFound> {
        let s = self.lock();
        let t = s
            .tasks
            .get(task_id)
            .filter(|t| t.session == conn.session)
            .ok_or(NotFound)?;
        if t.tr.task.state.is_final() {
            conn.outbox
                .push_update(&t.id, t.tr.task.seq, t.frame.clone());
            Ok(CancelTarget::AlreadyFinal)
        } else {
            Ok(CancelTarget::Backend(t.backend_id.clone()))
        }
    }

    /// Queues a task's current state to `conn` when it is not a subscriber
    /// (a subscriber gets it through the fan-out already).
    pub fn send_state_to(&self, conn: &Conn, task_id: &str) {
        let s = self.lock();
        if let Some(t) = s.tasks.get(task_id).filter(|t| t.session == conn.session) {
            if !t.subscribers.iter().any(|(c, _)| *c == conn.id) {
                conn.outbox
                    .push_update(&t.id, t.tr.task.seq, t.frame.clone());
            }
        }
    }

    /// The task service id of a live task, for the poller. `None` when the
    /// task is gone or final.
    pub fn poll_target(&self, task_id: &str) -> Option<Arc<str>> {
        let s = self.lock();
        let t = s.tasks.get(task_id)?;
        (!t.tr.task.state.is_final()).then(|| t.backend_id.clone())
    }

    /// Whether the hub still holds this task and it is final.
    pub fn is_final(&self, task_id: &str) -> Option<bool> {
        self.lock()
            .tasks
            .get(task_id)
            .map(|t| t.tr.task.state.is_final())
    }

    /// Applies a status the task service reported, and says when to poll
    /// next (`jitter` uniform in [0, 1)). A final task never changes again;
    /// an unchanged status sends nothing.
    pub fn apply_status(
        &self,
        task_id: &str,
        status: &Status,
        policy: &PollPolicy,
        jitter: f64,
    ) -> Decision {
        let now = self.now_ms();
        self.transition(task_id, |tr| tr.on_status(status, policy, now, jitter))
    }

    /// Applies a failed poll (see [`Tracked::on_error`]).
    pub fn apply_error(
        &self,
        task_id: &str,
        error: &BackendError,
        policy: &PollPolicy,
    ) -> Decision {
        let now = self.now_ms();
        self.transition(task_id, |tr| tr.on_error(error, policy, now))
    }

    /// Turns a live task `failed` for a reason of the server's own.
    pub fn fail(&self, task_id: &str, error: String, policy: &PollPolicy) -> Decision {
        let now = self.now_ms();
        self.transition(task_id, |tr| tr.fail(error, policy, now))
    }

    fn transition(&self, task_id: &str, f: impl FnOnce(&mut Tracked) -> Step) -> Decision {
        let mut s = self.lock();
        let Some(t) = s.tasks.get_mut(task_id) else {
            return Decision::Drop;
        };
        let step = f(&mut t.tr);
        if let Some(next) = step.next {
            t.tr.commit(next);
            publish(t);
        }
        step.decision
    }

    /// `forget`: drops a finished task of `conn`'s session now. Returns the
    /// session when that is left with nothing (see [`Hub::expire_task`]).
    pub fn forget(&self, conn: &Conn, task_id: &str) -> Option<Arc<str>> {
        let owned = self
            .lock()
            .tasks
            .get(task_id)
            .is_some_and(|t| t.session == conn.session);
        if owned {
            self.expire_task(task_id)
        } else {
            None
        }
    }

    /// Forgets a finished task. Returns its session when that is left with
    /// nothing, for the caller to schedule the session's expiry.
    pub fn expire_task(&self, task_id: &str) -> Option<Arc<str>> {
        let mut guard = self.lock();
        let s = &mut *guard;
        if !s.tasks.get(task_id)?.tr.task.state.is_final() {
            return None;
        }
        let t = s.tasks.remove(task_id)?;
        let entry = s.sessions.get_mut(&t.session)?;
        entry.tasks.retain(|id| &**id != task_id);
        (entry.conns == 0 && entry.tasks.is_empty()).then_some(t.session)
    }

    /// Forgets a session that has had no task and no connection since its
    /// expiry was scheduled.
    pub fn expire_session(&self, session: &str) {
        let mut s = self.lock();
        if s.sessions
            .get(session)
            .is_some_and(|e| e.conns == 0 && e.tasks.is_empty())
        {
            s.sessions.remove(session);
        }
    }

    /// Tells every connection to close with `reason` (server shutdown).
    pub fn close_all(&self, reason: CloseReason) {
        for outbox in self.lock().conns.values() {
            outbox.close(reason);
        }
    }

    pub fn counts(&self) -> HubCounts {
        let s = self.lock();
        HubCounts {
            sessions: s.sessions.len(),
            tasks: s.tasks.len(),
            live_tasks: s
                .tasks
                .values()
                .filter(|t| !t.tr.task.state.is_final())
                .count(),
            connections: s.conns.len(),
            subscriptions: s.tasks.values().map(|t| t.subscribers.len()).sum(),
            pending_frames: s.conns.values().map(|o| o.len()).sum(),
        }
    }

    /// A session's tasks, oldest first (for the page's first render).
    pub fn session_tasks(&self, session: &str) -> Vec<Task> {
        let s = self.lock();
        s.sessions.get(session).map_or_else(Vec::new, |e| {
            e.tasks
                .iter()
                .filter_map(|id| s.tasks.get(id).map(|t| t.tr.task.clone()))
                .collect()
        })
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

    /// A copy of one task, whoever owns it (for tests and the scheduler).
    pub fn task(&self, task_id: &str) -> Option<Task> {
        self.lock().tasks.get(task_id).map(|t| t.tr.task.clone())
    }
}

/// Mirror mode: forgets a session (and its tasks) that has no connection
/// here and none being set up.
fn release_if_unused(s: &mut State, session: &str) {
    if s.sessions
        .get(session)
        .is_some_and(|e| e.conns == 0 && e.held == 0)
    {
        if let Some(e) = s.sessions.remove(session) {
            for id in &e.tasks {
                s.tasks.remove(id);
            }
        }
    }
}

/// `get_key_value` with a mutable value: the shared key and the entry.
trait GetKeyValueMut<V> {
    fn get_key_value_mut_compat(&mut self, key: &str) -> Option<(Arc<str>, &mut V)>;
}

impl<V> GetKeyValueMut<V> for HashMap<Arc<str>, V> {
    fn get_key_value_mut_compat(&mut self, key: &str) -> Option<(Arc<str>, &mut V)> {
        let k = self.get_key_value(key)?.0.clone();
        self.get_mut(key).map(|v| (k, v))
    }
}

/// Sends the task's (new) current state: one serialisation, fan-out.
fn publish(t: &mut TaskEntry) {
    t.frame = task_frame(&t.tr.task);
    for (_, outbox) in &t.subscribers {
        outbox.push_update(&t.id, t.tr.task.seq, t.frame.clone());
    }
}

#[cfg(test)]
mod mirror_tests {
    use super::*;

    fn task(id: &str, seq: u64, state: TaskState) -> Task {
        Task {
            id: id.into(),
            kind: "simulate".into(),
            state,
            done: seq,
            total: Some(10),
            message: None,
            result: None,
            error: None,
            seq,
            created_ms: 1,
            updated_ms: 1,
            params: None,
        }
    }

    fn frames(conn: &Conn) -> Vec<String> {
        let mut out = Vec::new();
        while let Next::Frame(f) = conn.outbox.pop() {
            out.push(f.to_string());
        }
        out
    }

    #[test]
    fn a_mirror_keeps_only_held_sessions_and_newer_states() {
        let hub = Hub::mirror(Clock::new());
        let s: Arc<str> = "a".repeat(32).into();
        // Not held: ignored.
        assert!(!hub.apply_remote(&s, Some("b1"), task("t1", 1, TaskState::Running)));
        hub.hold(&s);
        assert!(hub.apply_remote(&s, Some("b1"), task("t1", 2, TaskState::Running)));
        let conn = hub.connect(s.clone());
        hub.unhold(&s);
        assert!(frames(&conn)[0].contains("\"welcome\""));
        // Older or equal: ignored; newer: fanned out.
        assert!(!hub.apply_remote(&s, None, task("t1", 2, TaskState::Running)));
        assert!(!hub.apply_remote(&s, None, task("t1", 1, TaskState::Running)));
        assert!(hub.apply_remote(&s, None, task("t1", 4, TaskState::Succeeded)));
        let sent = frames(&conn);
        assert_eq!(sent.len(), 1);
        assert!(sent[0].contains("\"seq\":4"));
        assert_eq!(hub.seq_of("t1"), Some(4));
        // The last connection gone: the session and its tasks are let go.
        assert_eq!(hub.disconnect(&conn), None);
        assert_eq!(hub.counts().sessions, 0);
        assert_eq!(hub.counts().tasks, 0);
    }

    #[test]
    fn forget_remote_drops_only_the_owner_s_task() {
        let hub = Hub::mirror(Clock::new());
        let s: Arc<str> = "b".repeat(32).into();
        hub.hold(&s);
        hub.apply_remote(&s, Some("b1"), task("t1", 3, TaskState::Succeeded));
        hub.forget_remote(&"c".repeat(32), "t1");
        assert_eq!(hub.seq_of("t1"), Some(3));
        hub.forget_remote(&s, "t1");
        assert_eq!(hub.seq_of("t1"), None);
        hub.unhold(&s);
        assert_eq!(hub.counts().sessions, 0);
    }
}
