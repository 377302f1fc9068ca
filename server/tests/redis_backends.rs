//! Several backends on the Redis engine, each its own delay queue and its
//! own permits on every worker: a slow one never holds another's polls
//! back (web + worker processes from a configuration file); kinds go to
//! their backend (role `all`, in process), each task polled only through
//! its own.

mod common;

use app::kinds::simulate_kind;
use app::protocol::{ServerMsg, TaskState};
use axum::routing::{get, post};
use axum::Json;
use common::redis_server::RedisServer;
use common::{spawn_taskwire, Client, SimProcess, TestApp};
use serde_json::json;
use server::config::file::{AdapterSpec, BackendSpec, KindSpec, Tuning};
use server::config::{Config, PollMode};
use server::engine::redis::keys;
use std::process::Child;
use std::time::{Duration, Instant};

/// A task service that takes any task at once and answers every status
/// after `delay`: "running, 1 of 2", never more.
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

/// A `taskwire` process, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Live tasks in Redis: the partitions' live sets, summed.
async fn live_total(redis: &RedisServer) -> u64 {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let mut total = 0;
    for p in 0..keys::PARTITIONS {
        let n: u64 = redis::cmd("SCARD")
            .arg(keys::live(p))
            .query_async(&mut c)
            .await
            .unwrap();
        total += n;
    }
    total
}

/// The same test as `backends.rs`'s memory-engine one, through Redis with a
/// web and a worker process: `slow` (2 s per status, 2 permits, 20 tasks)
/// and `fast` (the simulator, 100 ms). Behind one queue and one pool the
/// fast tasks would wait for the slow polls; on their own claim loop they
/// keep their cadence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_backend_never_holds_another_backends_polls_back_on_redis() {
    let redis = RedisServer::start();
    let sim = SimProcess::start();
    let slow = slow_service(Duration::from_secs(2)).await;
    let path = std::env::temp_dir().join(format!("tw-redis-backends-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        format!(
            r#"
[[backend]]
name = "slow"
adapter = "taskwire"
url = "{slow}"
poll_interval_ms = 100
poll_mode = "fixed"
max_concurrent_polls = 2

[[backend]]
name = "fast"
adapter = "taskwire"
url = "{fast}"
poll_interval_ms = 100
poll_mode = "fixed"

[[kind]]
name = "slow_work"
backend = "slow"
task = "simulate"

[[kind]]
name = "simulate"
backend = "fast"
"#,
            fast = sim.url
        ),
    )
    .unwrap();
    let url = redis.url();
    let run = |role: &str| {
        let args = [
            "--listen",
            "127.0.0.1:0",
            "--role",
            role,
            "--redis",
            &url,
            "--config",
            path.to_str().unwrap(),
            "--max-starts-per-min",
            "1000",
            "--max-live-tasks-per-session",
            "1000",
        ];
        let (child, addr) = spawn_taskwire(&args);
        (Proc(child), addr)
    };
    let (_web, web) = run("web");
    let (_worker, _) = run("worker");

    let mut c = Client::connect(web, None).await;
    // Far more slow tasks than the slow backend has permits: its queue backs up.
    for i in 0..20 {
        c.start_kind(
            &format!("s{i}"),
            "slow_work",
            json!({"duration_ms": 60_000, "steps": 2}),
        )
        .await;
    }
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
    // Behind the slow queue (20 polls of 2 s on 2 permits) they would take
    // 20 s; on their own they take about their 1.5 s.
    assert!(
        took < Duration::from_secs(10),
        "the fast tasks took {took:?}"
    );
    assert!(updates >= 5 * 8, "{updates} updates for 5 fast tasks");
    // The slow tasks are still live, the fast ones final.
    assert_eq!(live_total(&redis).await, 20);
    let _ = std::fs::remove_file(path);
}

fn spec(name: &str, adapter: AdapterSpec) -> BackendSpec {
    BackendSpec {
        name: name.into(),
        adapter,
        tuning: Tuning {
            poll_interval_ms: 100,
            poll_min_ms: 100,
            poll_mode: PollMode::Fixed,
            max_concurrent_polls: 64,
            max_polls_per_s: 0,
            timeout_ms: 5_000,
            give_up_s: 300,
            pipeline_depth: 0,
        },
    }
}

fn kind(name: &str, backend: usize) -> KindSpec {
    let mut info = simulate_kind();
    info.name = name.into();
    KindSpec {
        info,
        backend,
        remote: "simulate".into(),
        webhook: None,
    }
}

/// Role `all` on Redis with two backends: `here` (the embedded simulator)
/// and `there` (a simulator process, which knows nothing of `here`'s tasks
/// and the other way round, so a task polled through the wrong backend
/// would fail as lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_backends_on_redis_start_and_route_kinds_to_each() {
    let redis = RedisServer::start();
    let sim = SimProcess::start();
    let mut config = Config::for_tests();
    config.redis = Some(redis.url());
    config.backends = vec![
        spec("here", AdapterSpec::Embedded),
        spec(
            "there",
            AdapterSpec::Taskwire {
                url: sim.url.clone(),
            },
        ),
    ];
    config.kinds = vec![kind("local", 0), kind("remote", 1)];
    let app = TestApp::spawn(config).await;
    let mut c = app.client().await;
    let params = json!({"duration_ms": 1_500, "steps": 5});
    let local = c.start_kind("l", "local", params.clone()).await;
    let remote = c.start_kind("r", "remote", params.clone()).await;
    let moved = c.start_kind("m", "remote", params).await;
    let ids = [local.id.clone(), remote.id.clone(), moved.id.clone()];
    let mut finals = 0;
    while finals < ids.len() {
        let ServerMsg::Task { task } = c.recv().await else {
            continue;
        };
        if ids.contains(&task.id) && task.state.is_final() {
            assert_eq!(task.state, TaskState::Succeeded, "{task:?}");
            finals += 1;
        }
    }
    // The simulator process polled exactly the two tasks of `there`.
    let polled = sim.stats_per_task().await;
    assert_eq!(polled.len(), 2, "{polled:?}");
    assert_eq!(live_total(&redis).await, 0);
    app.stop().await;
}
