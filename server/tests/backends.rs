//! Several backends, each its own queue: a slow one never holds another's
//! polls back; kinds go to their backend, with their params checked; the
//! configuration file through the real binary.

mod common;

use app::kinds::simulate_kind;
use app::protocol::{ErrorCode, ServerMsg, TaskState};
use axum::routing::{get, post};
use axum::Json;
use common::{spawn_taskwire, Client, TestApp};
use serde_json::json;
use server::config::file::{AdapterSpec, BackendSpec, KindSpec, Tuning};
use server::config::{Config, PollMode};
use std::time::{Duration, Instant};

/// A task service that takes any task and answers every status after
/// `delay`: "running, 1 of 2", never more.
async fn slow_service(delay: Duration) -> String {
    let app = axum::Router::new()
        .route(
            "/tasks",
            post(|| async { (axum::http::StatusCode::CREATED, Json(json!({"id": "slow-1"}))) }),
        )
        .route(
            "/tasks/{id}",
            get(move |axum::extract::Path(id): axum::extract::Path<String>| async move {
                tokio::time::sleep(delay).await;
                Json(json!({"id": id, "state": "running", "done": 1, "total": 2, "changed_at_ms": 1}))
            }),
        );
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", tcp.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(tcp, app).await });
    url
}

fn spec(name: &str, adapter: AdapterSpec, interval_ms: u64, permits: u64) -> BackendSpec {
    BackendSpec {
        name: name.into(),
        adapter,
        tuning: Tuning {
            poll_interval_ms: interval_ms,
            poll_min_ms: interval_ms,
            poll_mode: PollMode::Fixed,
            max_concurrent_polls: permits,
            max_polls_per_s: 0,
            timeout_ms: 5_000,
            give_up_s: 300,
            pipeline_depth: 0,
        },
    }
}

fn kind(name: &str, backend: usize, remote: &str) -> KindSpec {
    let mut info = simulate_kind();
    info.name = name.into();
    KindSpec {
        info,
        backend,
        remote: remote.into(),
        webhook: None,
    }
}

/// `slow` (2 s per status, 2 permits) and `fast` (the simulator, 100 ms).
async fn two_backends() -> TestApp {
    let slow = slow_service(Duration::from_secs(2)).await;
    let mut config = Config::for_tests();
    config.backends = vec![
        spec("slow", AdapterSpec::Taskwire { url: slow }, 100, 2),
        spec("fast", AdapterSpec::Embedded, 100, 64),
    ];
    config.kinds = vec![
        kind("slow_work", 0, "simulate"),
        kind("simulate", 1, "simulate"),
    ];
    config.limits.max_starts_per_min = 1000;
    config.limits.max_live_tasks_per_session = 1000;
    TestApp::spawn(config).await
}

#[tokio::test]
async fn a_slow_backend_never_holds_another_backends_polls_back() {
    let app = two_backends().await;
    let mut c = app.client().await;
    // Far more slow tasks than the slow backend has permits: its queue backs up.
    for i in 0..20 {
        c.start_kind(
            &format!("s{i}"),
            "slow_work",
            json!({"duration_ms": 60_000, "steps": 2}),
        )
        .await;
    }
    // The fast backend's tasks run to the end, at their own cadence.
    let began = Instant::now();
    let mut fast = Vec::new();
    for i in 0..5 {
        let t = c
            .start_kind(
                &format!("f{i}"),
                "simulate",
                json!({"duration_ms": 1_500, "steps": 15}),
            )
            .await;
        fast.push(t.id);
    }
    let mut updates = 0;
    let mut done = 0;
    while done < fast.len() {
        let ServerMsg::Task { task } = c.recv().await else {
            continue;
        };
        if !fast.contains(&task.id) {
            continue;
        }
        updates += 1;
        if task.state.is_final() {
            assert_eq!(task.state, TaskState::Succeeded, "{task:?}");
            done += 1;
        }
    }
    let took = began.elapsed();
    // Behind the slow backend's queue (20 polls of 2 s on 2 permits) they
    // would take 20 s; on their own queue they take about their 1.5 s.
    assert!(
        took < Duration::from_secs(10),
        "the fast tasks took {took:?}"
    );
    // 1.5 s at 100 ms: about 15 changes each; behind the slow queue, 1 or 2.
    assert!(updates >= 5 * 8, "{updates} updates for 5 fast tasks");
    // Each backend's polls are counted on their own.
    let metrics = app.metrics().await;
    assert!(metrics.contains("backend=\"fast\""), "{metrics}");
    app.stop().await;
}

#[tokio::test]
async fn kinds_go_to_their_backend_with_their_params_checked() {
    let app = two_backends().await;
    let mut c = app.client().await;
    let (code, message) = c.try_start("u", "nope", json!({})).await.unwrap_err();
    assert_eq!(code, ErrorCode::UnknownKind);
    assert!(
        message.contains("simulate") && message.contains("slow_work"),
        "{message}"
    );
    let (code, message) = c
        .try_start("p", "simulate", json!({"duration_ms": 0, "steps": 3}))
        .await
        .unwrap_err();
    assert_eq!(code, ErrorCode::InvalidParams);
    assert!(message.starts_with("duration_ms:"), "{message}");
    let (code, message) = c
        .try_start("r", "simulate", json!({"duration_ms": 100}))
        .await
        .unwrap_err();
    assert_eq!(code, ErrorCode::InvalidParams);
    assert!(message.starts_with("steps:"), "{message}");
    let t = c
        .start_kind("ok", "simulate", json!({"duration_ms": 200, "steps": 2}))
        .await;
    assert_eq!(
        c.until_final(&t.id).await.pop().unwrap().state,
        TaskState::Succeeded
    );
    app.stop().await;
}

fn write_config(name: &str, text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("tw-config-{name}-{}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn the_binary_reads_its_config_file() {
    let path = write_config(
        "ok",
        r#"
[server]
retention_s = 60

[[backend]]
name = "sim"
adapter = "embedded"
poll_interval_ms = 100

[[kind]]
name = "simulate"
backend = "sim"
title = "Simulated work"
params = { type = "object", required = ["duration_ms", "steps"], properties = { duration_ms = { type = "integer", minimum = 1, maximum = 5000 }, steps = { type = "integer", minimum = 1 } } }
"#,
    );
    let (mut child, addr) = spawn_taskwire(&[
        "--listen",
        "127.0.0.1:0",
        "--config",
        path.to_str().unwrap(),
    ]);
    let mut c = Client::connect(addr, None).await;
    // The file's bound, not the simulator's.
    let (code, _) = c
        .try_start("big", "simulate", json!({"duration_ms": 9000, "steps": 3}))
        .await
        .unwrap_err();
    assert_eq!(code, ErrorCode::InvalidParams);
    let t = c
        .start_kind("ok", "simulate", json!({"duration_ms": 300, "steps": 3}))
        .await;
    assert_eq!(
        c.until_final(&t.id).await.pop().unwrap().state,
        TaskState::Succeeded
    );
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(path);
}

#[test]
fn a_bad_config_file_stops_the_start_naming_key_and_line() {
    let path = write_config(
        "bad",
        "[[backend]]\nname = \"a\"\nadapter = \"embedded\"\n\n[[kind]]\nname = \"k\"\nbackend = \"missing\"\n",
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_taskwire"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "off",
            "--ephemeral",
        ])
        .arg("--config")
        .arg(&path)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 5") && err.contains("missing"), "{err}");
    let _ = std::fs::remove_file(path);
}

#[tokio::test]
async fn pipelined_polls_against_the_simulator_reach_every_final_state() {
    // The simulator as its own process; polls pipelined 4 per connection.
    let sim = common::SimProcess::start();
    let mut config = Config::for_tests();
    let mut backend = spec(
        "sim",
        AdapterSpec::Taskwire {
            url: sim.url.clone(),
        },
        50,
        64,
    );
    backend.tuning.pipeline_depth = 4;
    config.backends = vec![backend];
    config.kinds = vec![kind("simulate", 0, "simulate")];
    config.limits.max_starts_per_min = 1000;
    config.limits.max_live_tasks_per_session = 1000;
    let app = TestApp::spawn(config).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(app.client().await);
    }
    for (c, client) in clients.iter_mut().enumerate() {
        let mut seen = std::collections::BTreeMap::new();
        for i in 0..10 {
            let t = client
                .start(
                    &format!("c{c}t{i}"),
                    json!({"duration_ms": 1_000, "steps": 10}),
                )
                .await;
            seen.insert(t.id, vec![t.done]);
        }
        let mut finals = 0;
        while finals < seen.len() {
            let ServerMsg::Task { task } = client.recv().await else {
                continue;
            };
            let Some(done) = seen.get_mut(&task.id) else {
                continue;
            };
            done.push(task.done);
            if task.state.is_final() {
                assert_eq!(task.state, TaskState::Succeeded, "{task:?}");
                assert_eq!(task.done, 10, "{task:?}");
                finals += 1;
            }
        }
        // Answers came back to the right task: progress never goes back.
        for (id, done) in &seen {
            assert!(done.windows(2).all(|w| w[0] <= w[1]), "{id}: {done:?}");
        }
    }
    // Polls really went pipelined: fewer writes than requests.
    let metrics = app.metrics().await;
    let read = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name) && l.contains(&sim.addr.to_string()))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let (requests, batches) = (
        read("taskwire_pipelined_requests_total"),
        read("taskwire_pipelined_batches_total"),
    );
    assert!(
        requests >= 30.0 * 10.0,
        "{requests} pipelined requests\n{metrics}"
    );
    assert!(
        batches < requests,
        "{batches} batches for {requests} requests"
    );
    app.stop().await;
}
