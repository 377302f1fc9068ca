//! The hub: sessions, their tasks, and which connections watch which task.
//! Every change to a task goes through here, gets the next `seq`, is
//! serialised once and fans out to the task's subscribers' outboxes.

pub mod outbox;

use crate::backend::Status;
use crate::clock::Clock;
use crate::scheduler::policy::{Decision, Observed, PollPolicy};
use app::protocol::{ServerMsg, Task, TaskMsgRef, TaskState, PROTOCOL_VERSION};
use axum::extract::ws::Utf8Bytes;
pub use outbox::{CloseReason, Next, Outbox};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

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
}

struct TaskEntry {
    /// `task.id`, shared with the outboxes that key their updates by it.
    id: Arc<str>,
    task: Task,
    /// `{"type":"task",...}` of the current state, serialised once.
    frame: Utf8Bytes,
    session: Arc<str>,
    backend_id: Arc<str>,
    subscribers: Vec<(ConnId, Arc<Outbox>)>,
    outage: Option<Outage>,
    /// The first `(done, changed_at_ms)` the task service reported: the
    /// adaptive cadence measures the rate of progress from it.
    first_seen: Option<(u64, u64)>,
}

struct Outage {
    since_ms: u64,
    failures: u32,
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

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    // The OS random source failing is not something a request can cause.
    getrandom::fill(&mut buf).expect("the OS random source works");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// A well-formed session token: 32 lowercase hex chars (128 random bits).
fn is_token(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Hub {
    pub fn new(clock: Clock) -> Self {
        Hub {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                clock,
                next_conn: AtomicU64::new(1),
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
                tasks.push(t.task.clone());
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
            .filter(|id| s.tasks.get(*id).is_some_and(|t| !t.task.state.is_final()))
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
        let now = self.now_ms();
        let id: Arc<str> = format!("t{}", random_hex(12)).into();
        let task = Task {
            id: id.to_string(),
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
        };
        let accepted = ServerMsg::Accepted {
            reference,
            task: task.clone(),
        };
        let mut s = self.lock();
        s.sessions
            .entry(conn.session.clone())
            .or_default()
            .tasks
            .push(id.clone());
        conn.outbox.push_reply(accepted.to_json().into());
        s.tasks.insert(
            id.clone(),
            TaskEntry {
                id: id.clone(),
                frame: task_frame(&task),
                task,
                session: conn.session.clone(),
                backend_id: backend_id.into(),
                subscribers: vec![(conn.id, conn.outbox.clone())],
                outage: None,
                first_seen: None,
            },
        );
        id
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
        conn.outbox.push_update(&t.id, t.task.seq, t.frame.clone());
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
        if t.task.state.is_final() {
            conn.outbox.push_update(&t.id, t.task.seq, t.frame.clone());
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
                conn.outbox.push_update(&t.id, t.task.seq, t.frame.clone());
            }
        }
    }

    /// The task service id of a live task, for the poller. `None` when the
    /// task is gone or final.
    pub fn poll_target(&self, task_id: &str) -> Option<Arc<str>> {
        let s = self.lock();
        let t = s.tasks.get(task_id)?;
        (!t.task.state.is_final()).then(|| t.backend_id.clone())
    }

    /// Whether the hub still holds this task and it is final.
    pub fn is_final(&self, task_id: &str) -> Option<bool> {
        self.lock()
            .tasks
            .get(task_id)
            .map(|t| t.task.state.is_final())
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
        let mut s = self.lock();
        let Some(t) = s.tasks.get_mut(task_id) else {
            return Decision::Drop;
        };
        t.outage = None;
        let (first_done, first_changed_at_ms) = *t
            .first_seen
            .get_or_insert((status.done, status.changed_at_ms));
        if !t.task.state.is_final() {
            let next = Task {
                state: status.state,
                done: status.done,
                total: status.total,
                message: status.message.clone(),
                result: status.result.clone(),
                error: status.error.clone(),
                updated_ms: status.changed_at_ms,
                ..t.task.clone()
            };
            if next != t.task {
                publish(t, next);
            }
        }
        if t.task.state.is_final() {
            return policy.after_success(true);
        }
        let seen = Observed {
            done: t.task.done,
            total: t.task.total,
            changed_at_ms: t.task.updated_ms,
            first_done,
            first_changed_at_ms,
        };
        if policy.adaptive {
            Decision::Poll(policy.next_poll(&seen, now, jitter))
        } else {
            Decision::Tick(Duration::from_millis(policy.poll_interval_ms))
        }
    }

    /// Records a failed poll: the task keeps its state and says, in
    /// `message`, that the service is unreachable and when the next try is.
    pub fn apply_outage(
        &self,
        task_id: &str,
        reason: &str,
        retry_after: Option<Duration>,
        policy: &PollPolicy,
    ) -> Decision {
        let now = self.now_ms();
        let mut s = self.lock();
        let Some(t) = s.tasks.get_mut(task_id) else {
            return Decision::Drop;
        };
        if t.task.state.is_final() {
            return policy.after_success(true);
        }
        let outage = t.outage.get_or_insert(Outage {
            since_ms: now,
            failures: 0,
        });
        outage.failures += 1;
        let decision = policy.after_failure(
            outage.failures,
            now.saturating_sub(outage.since_ms),
            retry_after,
        );
        let message = match decision {
            Decision::Poll(d) => format!(
                "the task service is unreachable ({reason}); next try in {:.1} s",
                d.as_secs_f64()
            ),
            _ => return decision,
        };
        let next = Task {
            message: Some(message),
            updated_ms: now,
            ..t.task.clone()
        };
        publish(t, next);
        decision
    }

    /// Turns a live task `failed` for a reason of the server's own (the task
    /// service lost it, or stayed unreachable too long).
    pub fn fail(&self, task_id: &str, error: String, policy: &PollPolicy) -> Decision {
        let now = self.now_ms();
        let mut s = self.lock();
        let Some(t) = s.tasks.get_mut(task_id) else {
            return Decision::Drop;
        };
        if !t.task.state.is_final() {
            let next = Task {
                state: TaskState::Failed,
                message: None,
                error: Some(error),
                updated_ms: now,
                ..t.task.clone()
            };
            publish(t, next);
        }
        t.outage = None;
        policy.after_success(true)
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
        if !s.tasks.get(task_id)?.task.state.is_final() {
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
                .filter(|t| !t.task.state.is_final())
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
                .filter_map(|id| s.tasks.get(id).map(|t| t.task.clone()))
                .collect()
        })
    }

    /// The ids of every task not yet final (for invariant checks).
    pub fn live_task_ids(&self) -> Vec<Arc<str>> {
        let s = self.lock();
        s.tasks
            .iter()
            .filter(|(_, t)| !t.task.state.is_final())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// A copy of one task, whoever owns it (for tests and the scheduler).
    pub fn task(&self, task_id: &str) -> Option<Task> {
        self.lock().tasks.get(task_id).map(|t| t.task.clone())
    }
}

/// Makes `next` the task's state: next `seq`, one serialisation, fan-out.
fn publish(t: &mut TaskEntry, mut next: Task) {
    next.seq = t.task.seq + 1;
    t.frame = task_frame(&next);
    t.task = next;
    for (_, outbox) in &t.subscribers {
        outbox.push_update(&t.id, t.task.seq, t.frame.clone());
    }
}
