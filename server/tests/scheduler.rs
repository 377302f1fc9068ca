//! The poll engine under `tokio::time::pause()`: exact tick counts, final
//! states that stop polling, lost tasks, retention. No sockets, no waiting.

use app::protocol::{ServerMsg, TaskState};
use server::backend::Backend;
use server::clock::Clock;
use server::hub::{Conn, Hub, Next};
use server::scheduler::policy::PollPolicy;
use server::scheduler::{Limits, Scheduler, SchedulerHandle};
use server::sim::Simulator;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

struct Rig {
    hub: Hub,
    sim: Arc<Simulator>,
    clock: Clock,
    handle: SchedulerHandle,
    _stop: watch::Sender<bool>,
}

fn rig(poll_interval_ms: u64, retention_ms: u64) -> Rig {
    let clock = Clock::new();
    let sim = Arc::new(Simulator::new());
    let hub = Hub::new(clock);
    let policy = PollPolicy {
        poll_interval_ms,
        poll_min_ms: 100,
        adaptive: false,
        give_up_ms: 300_000,
        retention_ms,
    };
    let (scheduler, handle) = Scheduler::new(
        hub.clone(),
        Backend::embedded(sim.clone(), clock),
        policy,
        Limits {
            max_in_flight: 64,
            max_polls_per_s: 0,
        },
    );
    let (stop, rx) = watch::channel(false);
    tokio::spawn(scheduler.run(rx));
    Rig {
        hub,
        sim,
        clock,
        handle,
        _stop: stop,
    }
}

impl Rig {
    async fn start(&self, conn: &Conn, params: serde_json::Value) -> (Arc<str>, String) {
        let bid = self
            .sim
            .start("simulate", &params, self.clock.now_ms())
            .unwrap();
        let id = self.hub.create_task(conn, "r".into(), "simulate", &bid);
        self.handle.poll(id.clone(), Duration::ZERO).await;
        (id, bid)
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
    let (session, _) = r.hub.resolve_session(None);
    let conn = r.hub.connect(session);
    let (id, bid) = r
        .start(
            &conn,
            serde_json::json!({"duration_ms": 10_000, "steps": 100}),
        )
        .await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    // At 0, 500, ..., 10 000 ms: 21 polls; the last saw `succeeded`.
    assert_eq!(r.sim.polls_of(&bid), Some(21));
    let task = r.hub.task(&id).unwrap();
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
    let (session, _) = r.hub.resolve_session(None);
    let conn = r.hub.connect(session);
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
    let (session, _) = r.hub.resolve_session(None);
    let conn = r.hub.connect(session);
    let (id, bid) = r
        .start(
            &conn,
            serde_json::json!({"duration_ms": 60_000, "steps": 100}),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    r.sim.cancel(&bid, r.clock.now_ms()).unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    // 0, 500, ..., 2 000 before the cancel; 2 500 saw it.
    assert_eq!(r.sim.polls_of(&bid), Some(6));
    assert_eq!(r.hub.task(&id).unwrap().state, TaskState::Cancelled);
}

#[tokio::test(start_paused = true)]
async fn a_task_the_service_forgot_fails_with_a_clear_error() {
    let r = rig(500, 600_000);
    let (session, _) = r.hub.resolve_session(None);
    let conn = r.hub.connect(session);
    let id = r
        .hub
        .create_task(&conn, "r".into(), "simulate", "never-started");
    r.handle.poll(id.clone(), Duration::ZERO).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let task = r.hub.task(&id).unwrap();
    assert_eq!(task.state, TaskState::Failed);
    assert_eq!(
        task.error.as_deref(),
        Some("the task service no longer knows this task")
    );
}

#[tokio::test(start_paused = true)]
async fn finished_tasks_and_empty_sessions_are_forgotten_after_the_retention() {
    let r = rig(500, 60_000);
    let (session, _) = r.hub.resolve_session(None);
    let conn = r.hub.connect(session.clone());
    let (id, _) = r
        .start(
            &conn,
            serde_json::json!({"duration_ms": 1_000, "steps": 10}),
        )
        .await;
    if let Some(s) = r.hub.disconnect(&conn) {
        r.handle.expire_session(s, Duration::from_secs(60)).await;
    }
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(r.hub.task(&id).is_some(), "kept during the retention");
    tokio::time::sleep(Duration::from_secs(32)).await;
    assert!(r.hub.task(&id).is_none(), "forgotten after it");
    assert_eq!(r.hub.counts().tasks, 0);
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert_eq!(r.hub.counts().sessions, 0, "the empty session went too");
}
