//! The fanout: this process's connections, which task each one watches, and
//! the latest state of every task of a connected session, serialised once
//! and pushed to its subscribers' outboxes. A task is kept here only as that
//! frame (with its `seq` and state): `welcome` and `accepted` splice it, so
//! the fanout holds no second copy of the engine's `Task`. Both engines use it the same
//! way: they hold the truth (the memory table, or Redis) and [`Fanout::apply`]
//! each change here; a session is held only while a connection of it is
//! open or being set up, so the fanout never grows with sessions nobody
//! watches.

pub mod outbox;

use crate::clock::Clock;
use crate::engine::hash::Map;
use app::protocol::{Task, TaskMsgRef, TaskState, PROTOCOL_VERSION};
use axum::extract::ws::Utf8Bytes;
pub use outbox::{CloseReason, Next, Outbox};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

pub type ConnId = u64;

/// Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct Fanout {
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
    sessions: Map<Arc<str>, SessionEntry>,
    tasks: Map<Arc<str>, TaskEntry>,
    conns: Map<ConnId, Arc<Outbox>>,
}

#[derive(Default)]
struct SessionEntry {
    /// The session's tasks held here, oldest first.
    tasks: Vec<Arc<str>>,
    /// Its open connections: each is subscribed to every new task of the
    /// session it may see (contract 1.1: every tab shows the same list).
    members: Vec<Member>,
    /// Connections being set up (their session's tasks being loaded).
    held: u32,
}

struct Member {
    id: ConnId,
    outbox: Arc<Outbox>,
    view: View,
}

/// What a connection sees of its session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum View {
    /// A cookie session's connection: every task, `start` allowed;
    /// `welcome` names the session.
    Session,
    /// A watch token for an owner: every task of the owner, present and
    /// future; `welcome`'s session is null.
    Owner,
    /// A watch token for one task: that task only.
    Task(Arc<str>),
}

impl View {
    /// Whether a connection with this view may see `task_id` of its session.
    pub fn sees(&self, task_id: &str) -> bool {
        match self {
            View::Session | View::Owner => true,
            View::Task(only) => &**only == task_id,
        }
    }
}

struct TaskEntry {
    /// `task.id`, shared with the outboxes that key their updates by it.
    id: Arc<str>,
    /// The current state's `seq` and state; the rest of it is in `frame`.
    seq: u64,
    state: TaskState,
    /// `{"type":"task","task":{...}}` of the current state, serialised once:
    /// the only copy of the task here ([`task_json`] reads the task back out).
    frame: Utf8Bytes,
    session: Arc<str>,
    subscribers: Vec<(ConnId, Arc<Outbox>)>,
}

/// One WebSocket connection as the engine knows it.
pub struct Conn {
    pub id: ConnId,
    pub session: Arc<str>,
    pub view: View,
    pub outbox: Arc<Outbox>,
    /// When the peer last sent anything, pongs included (Unix ms).
    pub last_seen_ms: AtomicU64,
}

/// The fanout's sizes, for tests and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FanoutCounts {
    /// Sessions with a connection here (or one being set up).
    pub sessions: usize,
    pub tasks: usize,
    pub connections: usize,
    pub subscriptions: usize,
    /// Frames waiting in all outboxes (bounded by subscriptions + replies).
    pub pending_frames: usize,
}

/// The task id was not found *in this session* (whether it exists elsewhere
/// is never revealed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotFound;

/// What every `task` frame starts with (`TaskMsgRef`'s JSON: the tag, then
/// the task) and ends with; the task's own JSON is what lies between.
const FRAME_HEAD: &str = r#"{"type":"task","task":"#;
const FRAME_TAIL: &str = "}";

/// A task's `task` frame, in an allocation of its own length (a `String`
/// grown by doubling would keep up to twice that for as long as the state
/// stays current). Written into the thread's scratch buffer first, then
/// copied once: growing a fresh `String` and shrinking it took three
/// reallocations per frame.
fn task_frame(task: &Task) -> Utf8Bytes {
    /// A scratch buffer grown past this by one large task is let go.
    const SCRATCH_KEEP: usize = 16 * 1024;
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with_borrow_mut(|buf| {
        buf.clear();
        serde_json::to_writer(&mut *buf, &TaskMsgRef { task }).expect("a Task always serialises");
        let json = std::str::from_utf8(buf).expect("serde_json writes UTF-8");
        debug_assert!(json.starts_with(FRAME_HEAD) && json.ends_with(FRAME_TAIL));
        let frame = Utf8Bytes::from(json.to_owned());
        if buf.capacity() > SCRATCH_KEEP {
            *buf = Vec::new();
        }
        frame
    })
}

/// The task's JSON inside its `task` frame.
fn task_json(frame: &str) -> &str {
    &frame[FRAME_HEAD.len()..frame.len() - FRAME_TAIL.len()]
}

/// `welcome` (same JSON as `ServerMsg::Welcome`), its tasks spliced from their frames.
fn welcome_json<'a>(session: Option<&str>, frames: impl Iterator<Item = &'a str>) -> String {
    let mut out = format!(
        r#"{{"type":"welcome","protocol":{PROTOCOL_VERSION},"session":{},"tasks":["#,
        serde_json::to_string(&session).expect("a string always serialises")
    );
    for (i, frame) in frames.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(task_json(frame));
    }
    out.push_str("]}");
    out
}

/// `accepted` (same JSON as `ServerMsg::Accepted`) for a task's `task` frame.
fn accepted_json(reference: &str, frame: &str) -> String {
    format!(
        r#"{{"type":"accepted","ref":{},"task":{}}}"#,
        serde_json::to_string(reference).expect("a string always serialises"),
        task_json(frame)
    )
}

impl Fanout {
    pub fn new(clock: Clock) -> Self {
        Fanout {
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

    /// A connection of `session` is being set up: changes to its tasks are
    /// kept from now on (see [`Fanout::apply`]).
    pub fn hold(&self, session: &Arc<str>) {
        self.lock()
            .sessions
            .entry(session.clone())
            .or_default()
            .held += 1;
    }

    /// The set-up [`Fanout::hold`] began is over.
    pub fn unhold(&self, session: &str) {
        let mut guard = self.lock();
        let s = &mut *guard;
        if let Some(e) = s.sessions.get_mut(session) {
            e.held = e.held.saturating_sub(1);
        }
        release_if_unused(s, session);
    }

    /// Registers a connection of `session` (held by the caller), queues its
    /// `welcome` (every task of the session held here that `view` sees) and
    /// subscribes it to all of them, atomically, so no update falls between
    /// the snapshot and the subscription.
    pub fn connect(&self, session: Arc<str>, view: View) -> Conn {
        let id = self.inner.next_conn.fetch_add(1, Ordering::Relaxed);
        let outbox = Outbox::new();
        let mut guard = self.lock();
        let s = &mut *guard;
        let entry = s.sessions.entry(session.clone()).or_default();
        entry.members.push(Member {
            id,
            outbox: outbox.clone(),
            view: view.clone(),
        });
        let mut frames = Vec::with_capacity(entry.tasks.len());
        for tid in entry.tasks.iter().filter(|tid| view.sees(tid)) {
            if let Some(t) = s.tasks.get_mut(tid) {
                t.subscribers.push((id, outbox.clone()));
                frames.push(t.frame.clone());
            }
        }
        s.conns.insert(id, outbox.clone());
        let named = (view == View::Session).then_some(&*session);
        let welcome = welcome_json(named, frames.iter().map(|f| f.as_str()));
        outbox.push_reply(welcome.into());
        Conn {
            id,
            session,
            view,
            outbox,
            last_seen_ms: AtomicU64::new(self.now_ms()),
        }
    }

    /// Forgets a connection and its subscriptions; the session and its
    /// tasks go too when no other connection of it is left. Whether the
    /// session had no other connection.
    pub fn disconnect(&self, conn: &Conn) -> bool {
        conn.outbox.close(CloseReason::Gone);
        let mut guard = self.lock();
        let s = &mut *guard;
        s.conns.remove(&conn.id);
        let Some(entry) = s.sessions.get_mut(&conn.session) else {
            return true;
        };
        entry.members.retain(|m| m.id != conn.id);
        let last = entry.members.is_empty();
        for tid in &entry.tasks {
            if let Some(t) = s.tasks.get_mut(tid) {
                t.subscribers.retain(|(c, _)| *c != conn.id);
            }
        }
        release_if_unused(s, &conn.session);
        last
    }

    /// Whether a connection of `session` is open here.
    pub fn is_connected(&self, session: &str) -> bool {
        self.lock()
            .sessions
            .get(session)
            .is_some_and(|e| !e.members.is_empty())
    }

    /// A task's state from the engine's truth. Kept only for a session held
    /// here, and only when newer than what is here (a late or repeated
    /// change can never move a task back); fanned out when kept. A task new
    /// here goes to every connection of the session that may see it. Returns
    /// whether it was applied.
    pub fn apply(&self, session: &str, task: &Task) -> bool {
        self.apply_except(session, task, None)
    }

    /// [`Fanout::apply`], but a task new here is not sent to `except` (it
    /// is subscribed all the same).
    fn apply_except(&self, session: &str, task: &Task, except: Option<ConnId>) -> bool {
        let mut guard = self.lock();
        let s = &mut *guard;
        let Some((session, entry)) = s.sessions.get_key_value_mut_compat(session) else {
            return false;
        };
        if let Some(t) = s.tasks.get_mut(task.id.as_str()) {
            if task.seq <= t.seq {
                return false;
            }
            publish(t, task);
            return true;
        }
        let id: Arc<str> = task.id.as_str().into();
        entry.tasks.push(id.clone());
        let frame = task_frame(task);
        let mut subscribers = Vec::new();
        for m in entry.members.iter().filter(|m| m.view.sees(&id)) {
            subscribers.push((m.id, m.outbox.clone()));
            if Some(m.id) != except {
                m.outbox.push_update(&id, task.seq, frame.clone());
            }
        }
        s.tasks.insert(
            id.clone(),
            TaskEntry {
                id,
                seq: task.seq,
                state: task.state,
                frame,
                session,
                subscribers,
            },
        );
        true
    }

    /// A task `conn` just started: subscribes it and queues `accepted`
    /// with the newest state known here. Every connection of the session
    /// is subscribed to a new task as soon as a state of it arrives (its
    /// first poll may be quicker than the start's answer), so `conn` may
    /// have been sent a newer `task` already: `accepted`, a reply, goes out
    /// before any waiting update, and carrying the newest state it keeps
    /// `seq` from going back.
    pub fn accepted(&self, conn: &Conn, reference: String, task: &Task) {
        // The session's other connections get it as a `task` message.
        self.apply_except(&conn.session, task, Some(conn.id));
        let mut s = self.lock();
        let accepted = match s.tasks.get_mut(task.id.as_str()) {
            Some(t) => {
                if !t.subscribers.iter().any(|(c, _)| *c == conn.id) {
                    t.subscribers.push((conn.id, conn.outbox.clone()));
                }
                accepted_json(&reference, &t.frame)
            }
            None => accepted_json(&reference, &task_frame(task)),
        };
        conn.outbox.push_reply(accepted.into());
    }

    /// The sessions held here (to read again after a feed of changes was lost).
    pub fn sessions(&self) -> Vec<Arc<str>> {
        self.lock().sessions.keys().cloned().collect()
    }

    /// The `seq` held here for a task, if it is held.
    pub fn seq_of(&self, task_id: &str) -> Option<u64> {
        self.lock().tasks.get(task_id).map(|t| t.seq)
    }

    /// A task was forgotten or expired: dropped here too (if `session` owns it).
    pub fn forget(&self, session: &str, task_id: &str) {
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
            .filter(|t| t.session == conn.session && conn.view.sees(task_id))
            .ok_or(NotFound)?;
        if !t.subscribers.iter().any(|(c, _)| *c == conn.id) {
            t.subscribers.push((conn.id, conn.outbox.clone()));
        }
        conn.outbox.push_update(&t.id, t.seq, t.frame.clone());
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

    /// Queues a task's current state to `conn`; with `unless_subscribed`,
    /// only when it does not get it through the fan-out already.
    pub fn send_state_to(&self, conn: &Conn, task_id: &str, unless_subscribed: bool) {
        let s = self.lock();
        if let Some(t) = s
            .tasks
            .get(task_id)
            .filter(|t| t.session == conn.session && conn.view.sees(task_id))
        {
            if !(unless_subscribed && t.subscribers.iter().any(|(c, _)| *c == conn.id)) {
                conn.outbox.push_update(&t.id, t.seq, t.frame.clone());
            }
        }
    }

    /// Tells every connection to close with `reason` (server shutdown).
    pub fn close_all(&self, reason: CloseReason) {
        for outbox in self.lock().conns.values() {
            outbox.close(reason);
        }
    }

    pub fn counts(&self) -> FanoutCounts {
        let s = self.lock();
        FanoutCounts {
            sessions: s.sessions.len(),
            tasks: s.tasks.len(),
            connections: s.conns.len(),
            subscriptions: s.tasks.values().map(|t| t.subscribers.len()).sum(),
            pending_frames: s.conns.values().map(|o| o.len()).sum(),
        }
    }

    /// The tasks held here and whether each is live (for the Redis web
    /// role's gauges).
    pub fn task_counts(&self) -> (usize, usize) {
        let s = self.lock();
        let live = s.tasks.values().filter(|t| !t.state.is_final()).count();
        (s.tasks.len(), live)
    }

    /// A copy of one task held here (for tests), read back from its frame.
    pub fn task(&self, task_id: &str) -> Option<Task> {
        let frame = self.lock().tasks.get(task_id)?.frame.clone();
        Some(serde_json::from_str(task_json(&frame)).expect("a frame holds a task"))
    }
}

/// Forgets a session (and its tasks) that has no connection here and none
/// being set up.
fn release_if_unused(s: &mut State, session: &str) {
    if s.sessions
        .get(session)
        .is_some_and(|e| e.members.is_empty() && e.held == 0)
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

impl<V> GetKeyValueMut<V> for Map<Arc<str>, V> {
    fn get_key_value_mut_compat(&mut self, key: &str) -> Option<(Arc<str>, &mut V)> {
        let k = self.get_key_value(key)?.0.clone();
        self.get_mut(key).map(|v| (k, v))
    }
}

/// Makes `task` the entry's current state and sends it: one
/// serialisation, fan-out.
fn publish(t: &mut TaskEntry, task: &Task) {
    t.seq = task.seq;
    t.state = task.state;
    t.frame = task_frame(task);
    for (_, outbox) in &t.subscribers {
        outbox.push_update(&t.id, t.seq, t.frame.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use app::protocol::TaskState;

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
    fn welcome_and_accepted_spliced_from_frames_are_the_messages_json() {
        use app::protocol::ServerMsg;
        let mut a = task("t1", 3, TaskState::Running);
        a.message = Some("step \"3\" of 10".into());
        a.params = Some(serde_json::json!({"duration_ms": 1000, "steps": 10}).into());
        let b = task("t2", 9, TaskState::Succeeded);
        let frames = [task_frame(&a), task_frame(&b)];
        for (session, tasks) in [(Some("s\"1"), vec![a.clone(), b.clone()]), (None, vec![])] {
            let expected = ServerMsg::Welcome {
                protocol: PROTOCOL_VERSION,
                session: session.map(str::to_string),
                tasks: tasks.clone(),
            };
            let spliced = welcome_json(session, frames[..tasks.len()].iter().map(|f| f.as_str()));
            assert_eq!(spliced, expected.to_json());
        }
        let expected = ServerMsg::Accepted {
            reference: "r\u{1}".into(),
            task: a.clone(),
        };
        assert_eq!(accepted_json("r\u{1}", &frames[0]), expected.to_json());
        assert_eq!(
            task_frame(&a).len(),
            ServerMsg::Task { task: a }.to_json().len()
        );
    }

    #[test]
    fn keeps_only_held_sessions_and_newer_states() {
        let fanout = Fanout::new(Clock::new());
        let s: Arc<str> = "a".repeat(32).into();
        // Not held: ignored.
        assert!(!fanout.apply(&s, &task("t1", 1, TaskState::Running)));
        fanout.hold(&s);
        assert!(fanout.apply(&s, &task("t1", 2, TaskState::Running)));
        let conn = fanout.connect(s.clone(), View::Session);
        fanout.unhold(&s);
        assert!(frames(&conn)[0].contains("\"welcome\""));
        // Older or equal: ignored; newer: fanned out.
        assert!(!fanout.apply(&s, &task("t1", 2, TaskState::Running)));
        assert!(!fanout.apply(&s, &task("t1", 1, TaskState::Running)));
        assert!(fanout.apply(&s, &task("t1", 4, TaskState::Succeeded)));
        let sent = frames(&conn);
        assert_eq!(sent.len(), 1);
        assert!(sent[0].contains("\"seq\":4"));
        assert_eq!(fanout.seq_of("t1"), Some(4));
        // The last connection gone: the session and its tasks are let go.
        assert!(fanout.disconnect(&conn));
        assert_eq!(fanout.counts().sessions, 0);
        assert_eq!(fanout.counts().tasks, 0);
    }

    #[test]
    fn forget_drops_only_the_owner_s_task() {
        let fanout = Fanout::new(Clock::new());
        let s: Arc<str> = "b".repeat(32).into();
        fanout.hold(&s);
        fanout.apply(&s, &task("t1", 3, TaskState::Succeeded));
        fanout.forget(&"c".repeat(32), "t1");
        assert_eq!(fanout.seq_of("t1"), Some(3));
        fanout.forget(&s, "t1");
        assert_eq!(fanout.seq_of("t1"), None);
        fanout.unhold(&s);
        assert_eq!(fanout.counts().sessions, 0);
    }

    #[test]
    fn a_quick_first_poll_follows_the_accepted() {
        let fanout = Fanout::new(Clock::new());
        let s: Arc<str> = "d".repeat(32).into();
        fanout.hold(&s);
        let conn = fanout.connect(s.clone(), View::Session);
        fanout.unhold(&s);
        frames(&conn);
        // The first poll's state got here before the start's `accepted`.
        fanout.apply(&s, &task("t1", 1, TaskState::Running));
        fanout.accepted(&conn, "r1".into(), &task("t1", 0, TaskState::Queued));
        let sent = frames(&conn);
        assert_eq!(sent.len(), 2, "{sent:?}");
        assert!(sent[0].contains("\"accepted\"") && sent[0].contains("\"seq\":1"));
        assert!(sent[1].contains("\"seq\":1"));
    }

    #[test]
    fn every_connection_of_the_session_gets_a_new_task() {
        let fanout = Fanout::new(Clock::new());
        let s: Arc<str> = "e".repeat(32).into();
        fanout.hold(&s);
        let a = fanout.connect(s.clone(), View::Session);
        let b = fanout.connect(s.clone(), View::Owner);
        let only = fanout.connect(s.clone(), View::Task("t9".into()));
        fanout.unhold(&s);
        assert!(frames(&b)[0].contains("\"session\":null"));
        frames(&a);
        frames(&only);
        fanout.accepted(&a, "r1".into(), &task("t1", 0, TaskState::Queued));
        let to_a = frames(&a);
        assert_eq!(to_a.len(), 1, "{to_a:?}");
        assert!(to_a[0].contains("\"accepted\""));
        let to_b = frames(&b);
        assert_eq!(to_b.len(), 1, "{to_b:?}");
        assert!(to_b[0].starts_with("{\"type\":\"task\""));
        assert!(frames(&only).is_empty());
        // Both are subscribed: the next change reaches both, not `only`.
        fanout.apply(&s, &task("t1", 1, TaskState::Running));
        assert_eq!(frames(&a).len(), 1);
        assert_eq!(frames(&b).len(), 1);
        assert!(frames(&only).is_empty());
        assert_eq!(fanout.subscribe(&only, "t1"), Err(NotFound));
    }

    #[test]
    fn accepted_never_carries_an_older_state_than_was_sent() {
        let fanout = Fanout::new(Clock::new());
        let s: Arc<str> = "f".repeat(32).into();
        fanout.hold(&s);
        let conn = fanout.connect(s.clone(), View::Session);
        fanout.unhold(&s);
        frames(&conn);
        // Two polls' states reach the session's connections (this one too)
        // and are written out before the start's answer comes back.
        fanout.apply(&s, &task("t1", 1, TaskState::Running));
        fanout.apply(&s, &task("t1", 2, TaskState::Running));
        assert_eq!(frames(&conn).len(), 1);
        fanout.accepted(&conn, "r1".into(), &task("t1", 0, TaskState::Queued));
        let sent = frames(&conn);
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert!(sent[0].contains("\"accepted\"") && sent[0].contains("\"seq\":2"));
    }
}
