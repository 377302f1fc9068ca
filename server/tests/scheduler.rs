//! The poll engine under `tokio::time::pause()`: exact tick counts, final
//! states that stop polling, lost tasks, retention. No sockets, no waiting.

use app::protocol::{ServerMsg, TaskState};
use server::backend::Backend;
use server::clock::Clock;
use server::engine::fanout::{Conn, Fanout, Next, View};
use server::engine::memory::MemoryEngine;
use server::engine::pipeline::{Limits, PollCtx, PollStats};
use server::engine::{Engine, Imp};
use server::sim::Simulator;
use server::task::new_task;
use server::task::policy::PollPolicy;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

struct Rig {
    engine: Engine,
    memory: MemoryEngine,
    fanout: Fanout,
    sim: Arc<Simulator>,
    clock: Clock,
    _stop: watch::Sender<bool>,
}

fn policy(poll_interval_ms: u64, give_up_ms: u64, retention_ms: u64) -> Arc<PollPolicy> {
    Arc::new(PollPolicy {
        poll_interval_ms,
        poll_min_ms: 100,
        adaptive: false,
        give_up_ms,
        retention_ms,
    })
}

/// The memory engine on `backend`, its delay queue running.
fn engine(
    backend: Backend,
    policy: Arc<PollPolicy>,
    clock: Clock,
) -> (Engine, MemoryEngine, Fanout, watch::Sender<bool>) {
    let fanout = Fanout::new(clock);
    let ctx = Arc::new(PollCtx {
        backend: backend.clone(),
        policy: policy.clone(),
        clock,
        stats: Arc::new(PollStats::default()),
    });
    let limits = Limits {
        max_in_flight: 64,
        max_polls_per_s: 0,
    };
    let retention = Duration::from_millis(policy.retention_ms);
    let (memory, queue) = MemoryEngine::new(fanout.clone(), ctx, &limits, retention);
    let (stop, rx) = watch::channel(false);
    tokio::spawn(queue.run(rx));
    let engine = Engine::new(
        fanout.clone(),
        Imp::Memory(memory.clone()),
        backend,
        policy,
        clock,
    );
    (engine, memory, fanout, stop)
}

fn rig(poll_interval_ms: u64, retention_ms: u64) -> Rig {
    let clock = Clock::new();
    let sim = Arc::new(Simulator::new());
    let backend = Backend::embedded(sim.clone(), clock);
    let (engine, memory, fanout, stop) = engine(
        backend,
        policy(poll_interval_ms, 300_000, retention_ms),
        clock,
    );
    Rig {
        engine,
        memory,
        fanout,
        sim,
        clock,
        _stop: stop,
    }
}

impl Rig {
    /// A connection of a new session.
    async fn conn(&self) -> Conn {
        let (session, _) = self.engine.resolve_session(None).await.unwrap();
        self.engine.connect(session, View::Session).await.unwrap()
    }

    /// Records a task as started on the task service under `bid`.
    async fn create(&self, conn: &Conn, bid: &str) -> Arc<str> {
        let task = new_task("s", "simulate", None, self.clock.now_ms());
        self.memory.create(&conn.session, &task, bid).await.unwrap();
        self.fanout.accepted(conn, "r".into(), &task);
        task.id.as_str().into()
    }

    async fn start(&self, conn: &Conn, params: serde_json::Value) -> (Arc<str>, String) {
        let bid = self
            .sim
            .start("simulate", &params, self.clock.now_ms())
            .unwrap();
        (self.create(conn, &bid).await, bid)
    }
}

fn drain(conn: &Conn) -> Vec<ServerMsg> {
    let mut out = vec![];
    while let Next::Frame(f) = conn.outbox.pop() {
        out.push(serde_json::from_str(f.as_str()).unwrap());
    }
    out
}

#[tokio::test(start_paused = true)]
async fn a_ten_second_task_is_polled_once_per_tick_then_never_again() {
    let r = rig(500, 600_000);
    let conn = r.conn().await;
    let (id, bid) = r
        .start(
            &conn,
            serde_json::json!({"duration_ms": 10_000, "steps": 100}),
        )
        .await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    // At 0, then every 500 ms on the session's phase (the second poll
    // moved by at most 250 ms to it) until one sees `succeeded` at or past
    // 10 000 ms: 21 polls, or 22 when the phase put the ticks just before
    // the multiples of 500; never more.
    let polls = r.sim.polls_of(&bid).unwrap();
    assert!((21..=22).contains(&polls), "{polls} polls");
    let task = r.memory.table.task(&id).unwrap();
    assert_eq!((task.state, task.done), (TaskState::Succeeded, 100));
    // The connection got welcome, accepted, then rising states ending final.
    let msgs = drain(&conn);
    assert!(matches!(msgs[0], ServerMsg::Welcome { .. }));
    assert!(matches!(msgs[1], ServerMsg::Accepted { .. }));
    let last = msgs.last().unwrap();
    assert!(matches!(last, ServerMsg::Task { task } if task.state == TaskState::Succeeded));
}

#[tokio::test(start_paused = true)]
async fn an_unread_connection_gets_the_newest_state_only() {
    let r = rig(100, 600_000);
    let conn = r.conn().await;
    r.start(
        &conn,
        serde_json::json!({"duration_ms": 5_000, "steps": 50}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    // 50 state changes happened; the unread outbox holds one frame per task
    // besides the replies, and it is the final one.
    let msgs = drain(&conn);
    assert_eq!(msgs.len(), 3, "{msgs:?}");
    assert!(matches!(&msgs[2], ServerMsg::Task { task } if task.state == TaskState::Succeeded));
    assert!(conn.outbox.coalesced() > 40);
}

#[tokio::test(start_paused = true)]
async fn a_task_cancelled_at_the_service_stops_being_polled() {
    let r = rig(500, 600_000);
    let conn = r.conn().await;
    let (id, bid) = r
        .start(
            &conn,
            serde_json::json!({"duration_ms": 60_000, "steps": 100}),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    // 0, then every 500 ms on the session's phase (the first tick moves by
    // at most half an interval): 4 to 6 polls before the cancel.
    let before = r.sim.polls_of(&bid).unwrap();
    assert!(
        (4..=6).contains(&before),
        "{before} polls before the cancel"
    );
    r.sim.cancel(&bid, r.clock.now_ms()).unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    // The next tick saw it; none came after.
    assert_eq!(r.sim.polls_of(&bid), Some(before + 1));
    assert_eq!(
        r.memory.table.task(&id).unwrap().state,
        TaskState::Cancelled
    );
}

#[tokio::test(start_paused = true)]
async fn a_task_the_service_forgot_fails_with_a_clear_error() {
    let r = rig(500, 600_000);
    let conn = r.conn().await;
    let id = r.create(&conn, "never-started").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let task = r.memory.table.task(&id).unwrap();
    assert_eq!(task.state, TaskState::Failed);
    assert_eq!(
        task.error.as_deref(),
        Some("the task service no longer knows this task")
    );
}

#[tokio::test(start_paused = true)]
async fn finished_tasks_and_empty_sessions_are_forgotten_after_the_retention() {
    let r = rig(500, 60_000);
    let conn = r.conn().await;
    let (id, _) = r
        .start(
            &conn,
            serde_json::json!({"duration_ms": 1_000, "steps": 10}),
        )
        .await;
    r.engine.disconnect(&conn).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(
        r.memory.table.task(&id).is_some(),
        "kept during the retention"
    );
    tokio::time::sleep(Duration::from_secs(32)).await;
    assert!(r.memory.table.task(&id).is_none(), "forgotten after it");
    assert_eq!(r.engine.counts().tasks, 0);
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert_eq!(r.engine.counts().sessions, 0, "the empty session went too");
}

/// Every live task has exactly one entry: queued or in flight, never both,
/// never missing; final tasks have none. The snapshot reads the table in the
/// queue's own task, where the polls commit, so the two are one instant.
async fn assert_one_entry_per_live_task(r: &Rig) {
    let snap = r.memory.queue().snapshot().await.unwrap();
    let mut entries: Vec<Arc<str>> = snap.queued.iter().chain(&snap.in_flight).cloned().collect();
    entries.sort();
    let before = entries.len();
    entries.dedup();
    assert_eq!(before, entries.len(), "a task with two entries");
    let mut live = snap.live;
    live.sort();
    assert_eq!(entries, live);
}

#[tokio::test(start_paused = true)]
async fn no_live_task_is_forgotten_and_none_is_held_twice() {
    let r = rig(500, 600_000);
    let conn = r.conn().await;
    let mut started = vec![];
    for i in 0..200u64 {
        let params = serde_json::json!({
            "duration_ms": 1_000 + (i % 17) * 700,
            "steps": 1 + i % 50,
            "fail_at": if i % 11 == 0 { serde_json::json!(i % 5) } else { serde_json::Value::Null },
        });
        started.push(r.start(&conn, params).await);
    }
    for step in 0..60u64 {
        tokio::time::sleep(Duration::from_millis(173)).await;
        // Cancel some at the task service behind the hub's back.
        if step % 7 == 0 {
            for (_, bid) in started.iter().skip(step as usize).step_by(13) {
                r.sim.cancel(bid, r.clock.now_ms());
            }
        }
        assert_one_entry_per_live_task(&r).await;
    }
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_one_entry_per_live_task(&r).await;
    assert!(r.memory.table.live_task_ids().is_empty());
    let snap = r.memory.queue().snapshot().await.unwrap();
    assert_eq!(
        snap.expiring, 200,
        "every finished task waits for its expiry"
    );
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_service_backs_off_then_gives_up() {
    let clock = Clock::new();
    // Port 1 on loopback: nothing listens, every request is refused.
    let backend = Backend::http("http://127.0.0.1:1", Duration::from_secs(5), 64, clock).unwrap();
    let (engine, memory, fanout, _stop) =
        engine(backend.clone(), policy(500, 10_000, 600_000), clock);
    let (session, _) = engine.resolve_session(None).await.unwrap();
    let conn = engine.connect(session, View::Session).await.unwrap();
    let task = new_task("s", "simulate", None, clock.now_ms());
    memory.create(&conn.session, &task, "x").await.unwrap();
    fanout.accepted(&conn, "r".into(), &task);
    tokio::time::sleep(Duration::from_secs(20)).await;

    let states: Vec<_> = drain(&conn)
        .into_iter()
        .filter_map(|m| match m {
            ServerMsg::Task { task } => Some(task),
            _ => None,
        })
        .collect();
    let waits: Vec<String> = states
        .iter()
        .filter_map(|t| t.message.as_deref())
        .filter_map(|m| m.split("next try in ").nth(1).map(str::to_string))
        .collect();
    // The coalescing outbox keeps only the newest state, so look at the last.
    let last = states.last().unwrap();
    assert_eq!(last.state, TaskState::Failed);
    assert!(
        last.error
            .as_deref()
            .unwrap()
            .contains("unreachable for 10 s"),
        "{last:?}"
    );
    assert!(waits.len() <= 1, "coalesced: {waits:?}");
    assert!(backend.down_since_ms().is_some());
    // A start while it is down fails at once.
    let e = backend
        .start("t1", "simulate", &serde_json::json!({}))
        .await;
    assert!(matches!(
        e,
        Err(server::backend::BackendError::Unavailable { .. })
    ));
}
