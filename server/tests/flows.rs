//! The vertical slice end to end: real server on port 0, real WebSocket
//! clients, the simulator embedded and as a separate HTTP process.

mod common;

use app::protocol::{ServerMsg, TaskState};
use common::{Client, SimProcess, TestApp};
use serde_json::json;

/// start → accepted → progress → succeeded; fail_at → failed; cancel →
/// cancelled; isolation; reconnect; bad input. Run against any backend.
async fn the_whole_loop(app: &TestApp) {
    let mut c = app.client().await;
    assert!(c.welcome.is_empty());

    // start → accepted (queued, done 0, total null) → progress → succeeded
    let task = c
        .start("a", json!({"duration_ms": 1500, "steps": 10}))
        .await;
    assert_eq!(task.state, TaskState::Queued);
    assert_eq!((task.done, task.total), (0, None));
    assert_eq!(task.kind, "simulate");
    let seen = c.until_final(&task.id).await;
    let last = seen.last().unwrap();
    assert_eq!(last.state, TaskState::Succeeded);
    assert_eq!((last.done, last.total), (10, Some(10)));
    assert_eq!(
        last.result.as_ref().map(|r| r.value()),
        Some(json!({"steps": 10}))
    );
    assert!(
        seen.iter()
            .any(|t| t.state == TaskState::Running && t.done > 0 && t.done < 10),
        "progress was reported on the way: {seen:?}"
    );
    assert!(seen
        .windows(2)
        .all(|w| w[0].done <= w[1].done && w[0].seq < w[1].seq));
    let succeeded = task.id.clone();

    // fail_at → failed with an error, keeping its done
    let task = c
        .start("b", json!({"duration_ms": 1000, "steps": 10, "fail_at": 4}))
        .await;
    let last = c.until_final(&task.id).await.pop().unwrap();
    assert_eq!(last.state, TaskState::Failed);
    assert_eq!(last.done, 4);
    assert!(last.error.as_deref().is_some_and(|e| !e.is_empty()));
    let failed = task.id.clone();

    // cancel → cancelled
    let task = c
        .start("c", json!({"duration_ms": 60000, "steps": 100}))
        .await;
    c.send(json!({"type":"cancel","ref":"c2","task":task.id}))
        .await;
    let last = c.until_final(&task.id).await.pop().unwrap();
    assert_eq!(last.state, TaskState::Cancelled);
    let cancelled = task.id.clone();
    // Cancelling a finished task is no error: its final state again.
    c.send(json!({"type":"cancel","task":cancelled})).await;
    match c.recv().await {
        ServerMsg::Task { task } => assert_eq!(
            (task.id.as_str(), task.state),
            (cancelled.as_str(), TaskState::Cancelled)
        ),
        other => panic!("expected the final state, got {other:?}"),
    }

    // Another session sees none of it.
    let mut other = app.client().await;
    assert_ne!(other.session, c.session);
    assert!(other.welcome.is_empty());
    other
        .send(json!({"type":"subscribe","task":succeeded}))
        .await;
    assert_eq!(other.error().await, (None, "not_found".to_string()));
    other
        .send(json!({"type":"cancel","ref":"x","task":cancelled}))
        .await;
    assert_eq!(
        other.error().await,
        (Some("x".into()), "not_found".to_string())
    );
    other
        .send(json!({"type":"unsubscribe","task":failed}))
        .await;
    // `forget` of another session's task: no reply, and the task stays.
    other.send(json!({"type":"forget","task":succeeded})).await;
    other
        .send(json!({"type":"subscribe","task":"no-such-task"}))
        .await;
    assert_eq!(other.error().await, (None, "not_found".to_string()));

    // Reconnecting with the cookie lists every task, finished ones included.
    let session = c.session.clone();
    c.close().await;
    let again = Client::connect(app.addr, Some(&session)).await;
    assert_eq!(again.session, session);
    let mut listed: Vec<_> = again
        .welcome
        .iter()
        .map(|t| (t.id.clone(), t.state))
        .collect();
    listed.sort_by(|a, b| a.0.cmp(&b.0));
    let mut expected = vec![
        (succeeded, TaskState::Succeeded),
        (failed, TaskState::Failed),
        (cancelled, TaskState::Cancelled),
    ];
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(listed, expected);
    // A forged cookie gets a fresh, empty session.
    let forged = Client::connect(app.addr, Some("0123456789abcdef0123456789abcdef")).await;
    assert_ne!(forged.session, session);
    assert!(forged.welcome.is_empty());
}

#[tokio::test]
async fn the_whole_loop_with_the_embedded_simulator() {
    let app = TestApp::embedded(100).await;
    the_whole_loop(&app).await;
    app.stop().await;
}

#[tokio::test]
async fn the_whole_loop_with_the_simulator_as_its_own_process() {
    let sim = SimProcess::start();
    let app = TestApp::with_backend(&sim.url, 100).await;
    the_whole_loop(&app).await;
    let stats = sim.stats().await;
    assert_eq!(stats["starts"], 3);
    app.stop().await;
}

#[tokio::test]
async fn bad_input_gets_bad_request_and_the_connection_keeps_working() {
    let app = TestApp::embedded(100).await;
    let mut c = app.client().await;
    let cases: Vec<(&str, Option<&str>)> = vec![
        ("{not json", None),
        ("[1,2,3]", None),
        (r#"{"type":"launch","ref":"r1"}"#, Some("r1")),
        (r#"{"ref":"r2"}"#, Some("r2")),
        (
            r#"{"type":"start","ref":"r3","kind":"simulate"}"#,
            Some("r3"),
        ),
        (r#"{"type":"start","ref":"r4","params":{}}"#, Some("r4")),
        (
            r#"{"type":"start","ref":"r5","kind":"simulate","params":[]}"#,
            Some("r5"),
        ),
        (r#"{"type":"subscribe"}"#, None),
        (r#"{"type":"cancel","ref":"r6"}"#, Some("r6")),
        (r#"{"type":"subscribe","task":42}"#, None),
        (
            r#"{"type":"start","ref":7,"kind":"simulate","params":{}}"#,
            None,
        ),
    ];
    for (text, reference) in &cases {
        c.send_raw(text).await;
        assert_eq!(
            c.error().await,
            (reference.map(str::to_string), "bad_request".to_string()),
            "for {text}"
        );
    }
    let long_ref = "r".repeat(65);
    c.send(json!({"type":"start","ref":long_ref,"kind":"simulate","params":{}}))
        .await;
    assert_eq!(c.error().await, (None, "bad_request".to_string()));
    c.send_message(tokio_tungstenite::tungstenite::Message::binary(vec![
        1, 2, 3,
    ]))
    .await;
    assert_eq!(c.error().await, (None, "bad_request".to_string()));

    // The task service's own refusals keep their codes.
    c.send(json!({"type":"start","ref":"k","kind":"nope","params":{}}))
        .await;
    assert_eq!(
        c.error().await,
        (Some("k".into()), "unknown_kind".to_string())
    );
    c.send(
        json!({"type":"start","ref":"p","kind":"simulate","params":{"duration_ms":0,"steps":1}}),
    )
    .await;
    assert_eq!(
        c.error().await,
        (Some("p".into()), "invalid_params".to_string())
    );

    // Unknown fields are ignored, and the connection still works.
    c.send(json!({"type":"start","ref":"ok","kind":"simulate","extra":1,"params":{"duration_ms":200,"steps":2}}))
        .await;
    let task = loop {
        if let ServerMsg::Accepted { task, .. } = c.recv().await {
            break task;
        }
    };
    assert_eq!(
        c.until_final(&task.id).await.pop().unwrap().state,
        TaskState::Succeeded
    );
    app.stop().await;
}

#[tokio::test]
async fn fifty_watchers_of_one_task_cost_one_poll_per_tick() {
    let poll_ms = 100;
    let duration_ms = 2000;
    let app = TestApp::embedded(poll_ms).await;
    let mut first = app.client().await;
    let session = first.session.clone();
    let mut watchers = vec![];
    for _ in 0..49 {
        watchers.push(Client::connect(app.addr, Some(&session)).await);
    }
    let task = first
        .start("w", json!({"duration_ms": duration_ms, "steps": 20}))
        .await;
    for w in &mut watchers {
        w.send(json!({"type":"subscribe","task":task.id})).await;
    }
    assert_eq!(
        first.until_final(&task.id).await.pop().unwrap().state,
        TaskState::Succeeded
    );
    for w in &mut watchers {
        assert_eq!(
            w.until_final(&task.id).await.pop().unwrap().state,
            TaskState::Succeeded
        );
    }
    let polls = app.state.sim.as_ref().unwrap().stats().polls;
    let ticks = duration_ms / poll_ms;
    // One poll per tick (plus the first at once and the one that saw the end),
    // never one per watcher.
    assert!(polls >= ticks / 2, "polled {polls} times");
    assert!(
        polls <= ticks + 3,
        "polled {polls} times for {ticks} ticks with 50 watchers"
    );
    app.stop().await;
}
