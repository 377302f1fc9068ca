//! The task service dies mid-task and comes back on the same port: tasks say
//! it is unreachable, `start` gets `backend_unavailable` at once, the server
//! and its connections stay up, and the lost tasks fail with a clear error.

mod common;

use app::protocol::{ServerMsg, TaskState};
use common::{SimProcess, TestApp};
use serde_json::json;

#[tokio::test]
async fn the_simulator_killed_and_restarted_mid_task() {
    let mut sim = SimProcess::start();
    let addr = sim.addr.to_string();
    let app = TestApp::with_backend(&sim.url, 100).await;
    let mut c = app.client().await;
    let task = c
        .start("long", json!({"duration_ms": 60000, "steps": 600}))
        .await;
    // Wait until it runs.
    loop {
        if let ServerMsg::Task { task: t } = c.recv().await {
            if t.id == task.id && t.state == TaskState::Running && t.done > 0 {
                break;
            }
        }
    }

    sim.kill();
    let unreachable = loop {
        if let ServerMsg::Task { task: t } = c.recv().await {
            if t.message
                .as_deref()
                .is_some_and(|m| m.contains("unreachable"))
            {
                break t;
            }
        }
    };
    assert_eq!(unreachable.state, TaskState::Running, "keeps its state");
    assert!(unreachable.message.unwrap().contains("next try in"));

    // `start` during the outage: backend_unavailable, at once.
    let began = std::time::Instant::now();
    c.send(json!({"type":"start","ref":"during","kind":"simulate","params":{"duration_ms":1000,"steps":1}}))
        .await;
    assert_eq!(
        c.error().await,
        (Some("during".into()), "backend_unavailable".into())
    );
    assert!(began.elapsed() < common::RECV_TIMEOUT);

    // Back on the same port, but it has forgotten the task.
    let _sim = SimProcess::start_on(&addr);
    let last = c.until_final(&task.id).await.pop().unwrap();
    assert_eq!(last.state, TaskState::Failed);
    assert_eq!(
        last.error.as_deref(),
        Some("the task service no longer knows this task")
    );

    // The same connection goes on working; a probe start clears the outage.
    let mut accepted = None;
    for attempt in 0..50 {
        c.send(json!({"type":"start","ref":format!("after{attempt}"),"kind":"simulate","params":{"duration_ms":300,"steps":3}}))
            .await;
        match c.recv().await {
            ServerMsg::Accepted { task, .. } => {
                accepted = Some(task);
                break;
            }
            ServerMsg::Error { code, .. } => {
                assert_eq!(code.as_str(), "backend_unavailable");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            other => panic!("{other:?}"),
        }
    }
    let task = accepted.expect("starts work again once the service is back");
    assert_eq!(
        c.until_final(&task.id).await.pop().unwrap().state,
        TaskState::Succeeded
    );
    app.stop().await;
}

#[tokio::test]
async fn metrics_are_exposed_in_prometheus_text() {
    let app = TestApp::embedded(100).await;
    let mut c = app.client().await;
    let task = c.start("m", json!({"duration_ms": 300, "steps": 3})).await;
    c.until_final(&task.id).await;
    let body = app.metrics().await;
    for name in [
        "taskwire_poll_seconds",
        "taskwire_poll_lateness_seconds",
        "taskwire_ws_connections",
        "taskwire_messages_sent_total",
    ] {
        assert!(body.contains(name), "{name} missing from:\n{body}");
    }
    app.stop().await;
}
