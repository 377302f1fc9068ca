//! The Celery adapter against a real `redis-server` (broker on DB 0, result
//! backend on DB 1) and a real Celery worker running
//! `server/tests/celery/tasks.py` from the venv `.ci/setup` makes
//! (`target/celery-venv`, or `TASKWIRE_CELERY_VENV`). Each test starts its
//! own Redis and, if it needs one, its own worker, and kills both on drop.

mod common;

use app::protocol::TaskState;
use futures::future::join_all;
use serde_json::json;
use server::backend::celery::{meta_key, CeleryBackend, MAX_BATCH};
use server::backend::{BackendError, Status};
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_millis(1_000);
/// Longest wait for a worker to start or a task to reach a state.
const WAIT: Duration = Duration::from_secs(30);
const POLL_EVERY: Duration = Duration::from_millis(10);
const QUEUE: &str = "taskwire-test";

/// A `redis-server` of our own on a free port, no persistence, killed on drop.
struct RedisServer {
    child: Option<Child>,
    port: u16,
}

impl RedisServer {
    fn start() -> RedisServer {
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server runs (.ci/setup installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        RedisServer {
            child: Some(child),
            port,
        }
    }

    fn url(&self, db: u8) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.port)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A plain connection to one of its databases, for what the test
    /// writes or measures itself.
    async fn conn(&self, db: u8) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url(db))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("redis answers")
    }

    /// `cmdstat_<cmd>`'s `calls`, from `INFO commandstats`.
    async fn calls(&self, cmd: &str) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut self.conn(0).await)
            .await
            .unwrap();
        command_stat(&info, cmd, "calls")
    }
}

impl RedisServer {
    /// Redis's own CPU time (user + system), ms, from `INFO cpu`.
    async fn cpu_ms(&self) -> f64 {
        let info: String = redis::cmd("INFO")
            .arg("cpu")
            .query_async(&mut self.conn(0).await)
            .await
            .unwrap();
        ["used_cpu_user:", "used_cpu_sys:"]
            .iter()
            .filter_map(|k| info.lines().find_map(|l| l.strip_prefix(k)))
            .map(|v| v.trim().parse::<f64>().unwrap_or(0.0) * 1e3)
            .sum()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn command_stat(info: &str, cmd: &str, field: &str) -> u64 {
    let prefix = format!("cmdstat_{cmd}:");
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|stats| {
            stats
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{field}=")))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0, |v| v as u64)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn venv() -> PathBuf {
    let dir = std::env::var_os("TASKWIRE_CELERY_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/celery-venv"));
    assert!(
        dir.join("bin/celery").exists(),
        "no Celery venv at {}: run .ci/setup (or point TASKWIRE_CELERY_VENV at a venv with celery[redis])",
        dir.display()
    );
    dir
}

/// A Celery worker (prefork, one process, so a second task waits in the
/// queue) in its own process group, all of which is killed on drop. Its
/// log is printed if the test fails. Its temp dir (the prefork pool's
/// `pymp-*` directories, which a killed worker cannot remove) is its own,
/// removed after it.
struct Worker {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    _tmp: common::TempDir,
}

impl Worker {
    fn start(redis: &RedisServer) -> Worker {
        let tasks_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/celery");
        let tmp = common::TempDir::new("celery");
        let mut child = Command::new(venv().join("bin/celery"))
            .args(["-A", "tasks", "worker", "--pool=prefork", "--concurrency=1"])
            .args(["-Q", QUEUE, "-n", &format!("tw{}@%h", redis.port)])
            .args([
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ])
            .args(["-l", "info"])
            .current_dir(tasks_dir)
            .env("TASKWIRE_CELERY_BROKER", redis.url(0))
            .env("TASKWIRE_CELERY_RESULT_BACKEND", redis.url(1))
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("TMPDIR", tmp.path())
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the venv's celery runs");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.ends_with(" ready.") {
                    let _ = ready_tx.send(());
                }
                lines.lock().unwrap().push(line);
            }
        });
        let worker = Worker {
            child,
            log,
            _tmp: tmp,
        };
        if ready.recv_timeout(WAIT).is_err() {
            panic!("the Celery worker did not start:\n{}", worker.log_text());
        }
        worker
    }

    fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // The whole group (prefork children too), which is ours alone:
        // the worker was started as its leader.
        let pgid = self.child.id() as libc::pid_t;
        if pgid > 1 {
            // SAFETY: kill(2) takes no pointers; -pgid names only that group.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- Celery worker log ---\n{}", self.log_text());
        }
    }
}

fn backend(redis: &RedisServer) -> CeleryBackend {
    CeleryBackend::new(&redis.url(0), &redis.url(1), QUEUE, TIMEOUT).expect("a backend")
}

/// Polls until `done` holds (or fails after [`WAIT`]); returns every status seen.
async fn poll_until(b: &CeleryBackend, id: &str, done: impl Fn(&Status) -> bool) -> Vec<Status> {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        let s = b.status(id).await.expect("a status");
        let stop = done(&s);
        seen.push(s);
        if stop {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "{id}: still {:?} after {WAIT:?}",
            seen.last()
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
}

#[tokio::test]
async fn a_task_reports_progress_then_succeeds() {
    let redis = RedisServer::start();
    let _worker = Worker::start(&redis);
    let b = backend(&redis);
    let id = b
        .start("count-1", "tasks.count", &json!({"n": 20, "step_ms": 40}))
        .await
        .unwrap();
    assert_eq!(id, "count-1", "taskwire's id is the Celery task id");
    let seen = poll_until(&b, &id, |s| s.state.is_final()).await;

    let last = seen.last().unwrap();
    assert_eq!(last.state, TaskState::Succeeded, "{last:?}");
    assert_eq!(last.result, Some(json!(20)));
    assert_eq!((last.done, last.total), (20, Some(20)));
    let now = now_ms();
    assert!(
        last.changed_at_ms <= now && now - last.changed_at_ms < 30_000,
        "date_done read as {}",
        last.changed_at_ms
    );

    let progress: Vec<&Status> = seen
        .iter()
        .filter(|s| s.state == TaskState::Running && s.total.is_some())
        .collect();
    let dones: Vec<u64> = progress.iter().map(|s| s.done).collect();
    assert!(
        dones.windows(2).all(|w| w[0] <= w[1]),
        "done never goes back: {dones:?}"
    );
    let mut distinct = dones.clone();
    distinct.dedup();
    assert!(distinct.len() >= 3, "progress seen rising: {dones:?}");
    for s in &progress {
        assert_eq!(s.total, Some(20));
        assert_eq!(s.message.as_deref(), Some(&*format!("counted {}", s.done)));
    }
    // An unchanged (state, done) keeps its changed_at_ms; a change moves it on.
    for w in seen.windows(2) {
        if (w[0].state, w[0].done) == (w[1].state, w[1].done) {
            assert_eq!(w[0].changed_at_ms, w[1].changed_at_ms, "{w:?}");
        } else if !w[1].state.is_final() {
            assert!(w[1].changed_at_ms >= w[0].changed_at_ms, "{w:?}");
        }
    }
}

#[tokio::test]
async fn a_failing_task_reads_as_failed_with_its_exception() {
    let redis = RedisServer::start();
    let _worker = Worker::start(&redis);
    let b = backend(&redis);
    b.start("fail-1", "tasks.fail", &json!({"reason": "no luck"}))
        .await
        .unwrap();
    // A task name no worker knows: Celery fails it (NotRegistered).
    b.start("nobody-1", "tasks.nobody", &serde_json::Value::Null)
        .await
        .unwrap();

    let failed = poll_until(&b, "fail-1", |s| s.state.is_final()).await;
    let failed = failed.last().unwrap();
    assert_eq!(failed.state, TaskState::Failed, "{failed:?}");
    assert_eq!(
        failed.error.as_deref(),
        Some("ValueError: cannot do it: no luck")
    );

    let unknown = poll_until(&b, "nobody-1", |s| s.state.is_final()).await;
    let unknown = unknown.last().unwrap();
    assert_eq!(unknown.state, TaskState::Failed, "{unknown:?}");
    let error = unknown.error.as_deref().unwrap();
    assert!(error.starts_with("NotRegistered"), "{error}");

    // What taskwire refuses before it reaches Celery.
    assert!(matches!(
        b.start("bad-1", "tasks.count", &json!([1, 2])).await,
        Err(BackendError::Rejected { .. })
    ));
}

#[tokio::test]
async fn revoke_cancels_a_queued_task_and_terminate_stops_a_running_one() {
    let redis = RedisServer::start();
    let _worker = Worker::start(&redis);
    let b = backend(&redis);

    // The worker's one process is busy with `running`, so `queued` waits.
    b.start("running", "tasks.sleep", &json!({"seconds": 30}))
        .await
        .unwrap();
    poll_until(&b, "running", |s| s.state == TaskState::Running).await;
    b.start("queued", "tasks.sleep", &json!({"seconds": 30}))
        .await
        .unwrap();
    assert_eq!(b.status("queued").await.unwrap().state, TaskState::Queued);

    let answer = b.cancel("queued").await.unwrap();
    assert!(
        matches!(answer.state, TaskState::Queued | TaskState::Cancelled),
        "{answer:?}"
    );
    // The worker marks a revoked queued task REVOKED as it receives the
    // broadcast (and discards it when it comes to it).
    poll_until(&b, "queued", |s| s.state.is_final())
        .await
        .last()
        .filter(|s| s.state == TaskState::Cancelled)
        .expect("the queued task is cancelled");

    // Without terminate a running task keeps running: the worker only
    // flags it as revoked. The revoke is handled within a few ms of its
    // publication; half a second later the task is still running.
    let answer = b.cancel("running").await.unwrap();
    assert_eq!(answer.state, TaskState::Running);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(b.status("running").await.unwrap().state, TaskState::Running);

    // With terminate, the prefork pool kills the process running it.
    let killer = b.clone().with_terminate_on_cancel(true);
    killer.cancel("running").await.unwrap();
    let end = poll_until(&b, "running", |s| s.state.is_final()).await;
    assert_eq!(end.last().unwrap().state, TaskState::Cancelled);

    // Cancelling a final task changes nothing: its final status comes back.
    let again = b.cancel("queued").await.unwrap();
    assert_eq!(again.state, TaskState::Cancelled);
}

#[tokio::test]
async fn concurrent_polls_share_mgets() {
    const TASKS: usize = 2_000;
    let redis = RedisServer::start();
    let b = backend(&redis);
    let mut results = redis.conn(1).await;
    let mut pipe = redis::pipe();
    for i in 0..TASKS {
        pipe.set(
            meta_key(&format!("t{i}")),
            json!({"status": "PROGRESS", "result": {"current": i % 7, "total": 7}}).to_string(),
        )
        .ignore();
    }
    pipe.query_async::<()>(&mut results).await.unwrap();

    let ids: Vec<String> = (0..TASKS)
        .map(|i| format!("t{i}"))
        .chain(["missing".to_string()])
        .collect();
    let before = (redis.calls("mget").await, redis.calls("get").await);
    // One task per poll, as the engine's pollers are.
    let polls = ids.iter().map(|id| {
        let (b, id) = (b.clone(), id.clone());
        tokio::spawn(async move { b.status(&id).await })
    });
    let statuses: Vec<_> = join_all(polls)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let after = (redis.calls("mget").await, redis.calls("get").await);

    for (i, s) in statuses[..TASKS].iter().enumerate() {
        let s = s.as_ref().unwrap();
        assert_eq!(
            (s.state, s.done, s.total),
            (TaskState::Running, (i % 7) as u64, Some(7))
        );
    }
    let missing = statuses[TASKS].as_ref().unwrap();
    assert_eq!((missing.state, missing.total), (TaskState::Queued, None));

    let mgets = after.0 - before.0;
    println!("{} polls in {mgets} MGETs", TASKS + 1);
    assert_eq!(after.1, before.1, "no GET at all");
    assert_eq!(mgets, b.round_trips(), "one round trip is one MGET");
    let least = (TASKS + 1).div_ceil(MAX_BATCH) as u64;
    assert!(
        (least..=least + 3).contains(&mgets),
        "{} polls in {mgets} MGETs",
        TASKS + 1
    );
}

#[tokio::test]
async fn a_stopped_redis_is_unavailable() {
    let mut redis = RedisServer::start();
    let b = backend(&redis);
    assert_eq!(b.status("t").await.unwrap().state, TaskState::Queued);
    redis.kill();
    let is_down = |r: Result<_, BackendError>| {
        matches!(r, Err(BackendError::Unavailable { kind: "redis", .. }))
    };
    let t0 = Instant::now();
    assert!(is_down(b.status("t").await.map(|_| ())));
    assert!(is_down(
        b.start("t2", "tasks.count", &json!({})).await.map(|_| ())
    ));
    assert!(is_down(b.cancel("t").await.map(|_| ())));
    assert!(
        t0.elapsed() < 4 * TIMEOUT,
        "each call fails within its timeout"
    );

    // Never reachable: `new` does not wait for the network either.
    let nobody = format!("redis://127.0.0.1:{}/0", free_port());
    let b = CeleryBackend::new(&nobody, &nobody, QUEUE, TIMEOUT).unwrap();
    assert!(is_down(b.status("t").await.map(|_| ())));
}

#[tokio::test]
async fn an_unknown_state_is_a_protocol_error() {
    let redis = RedisServer::start();
    let b = backend(&redis);
    let mut results = redis.conn(1).await;
    redis::cmd("SET")
        .arg(meta_key("odd"))
        .arg(json!({"status": "CHEWING", "result": null}).to_string())
        .query_async::<()>(&mut results)
        .await
        .unwrap();
    match b.status("odd").await {
        Err(BackendError::Protocol(e)) => assert!(e.contains("CHEWING"), "{e}"),
        other => panic!("{other:?}"),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Poll throughput with MGET batching against one GET per task (over one
/// multiplexed connection, so the GETs are pipelined too), one tokio task
/// per poll as in the engine. Run with
/// `cargo test -p server --release --test celery bench -- --ignored --nocapture`;
/// figures in docs/celery.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_batched_vs_one_get_per_task() {
    const TASKS: usize = 5_000;
    const ROUNDS: usize = 10;
    let redis = RedisServer::start();
    let b = backend(&redis);
    let mut results = redis.conn(1).await;
    let mut pipe = redis::pipe();
    let ids: Vec<String> = (0..TASKS).map(|i| format!("task-{i:05}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let meta = json!({
            "status": "PROGRESS",
            "result": {"current": i % 100, "total": 100, "description": format!("step {i}")},
            "traceback": null, "children": [], "date_done": null, "task_id": id,
        });
        pipe.set(meta_key(id), meta.to_string()).ignore();
    }
    pipe.query_async::<()>(&mut results).await.unwrap();
    let single = redis::aio::ConnectionManager::new(redis::Client::open(redis.url(1)).unwrap())
        .await
        .unwrap();

    for batched in [true, false] {
        let (redis_cpu0, cpu0, t0) = (redis.cpu_ms().await, process_cpu_ms(), Instant::now());
        let (mgets0, gets0) = (redis.calls("mget").await, redis.calls("get").await);
        for _ in 0..ROUNDS {
            let polls = ids.iter().map(|id| {
                let (b, c, id) = (b.clone(), single.clone(), id.clone());
                tokio::spawn(async move {
                    if batched {
                        b.status(&id).await.map(|_| ()).unwrap();
                    } else {
                        let mut c = c;
                        let raw: Option<Vec<u8>> = redis::cmd("GET")
                            .arg(meta_key(&id))
                            .query_async(&mut c)
                            .await
                            .unwrap();
                        serde_json::from_slice::<serde_json::Value>(&raw.unwrap()).unwrap();
                    }
                })
            });
            for p in join_all(polls).await {
                p.unwrap();
            }
        }
        let wall = t0.elapsed().as_secs_f64();
        let (cpu, redis_cpu) = (process_cpu_ms() - cpu0, redis.cpu_ms().await - redis_cpu0);
        let trips = (redis.calls("mget").await - mgets0) + (redis.calls("get").await - gets0);
        let polls = (TASKS * ROUNDS) as f64;
        println!(
            "{}: {polls} polls in {:.0} ms = {:.0} polls/s; {trips} round trips; \
             taskwire CPU {cpu:.0} ms, Redis CPU {redis_cpu:.0} ms",
            if batched {
                "MGET batches"
            } else {
                "one GET each"
            },
            wall * 1e3,
            polls / wall,
        );
    }
}

/// This process's CPU time (user + system), ms.
fn process_cpu_ms() -> f64 {
    // SAFETY: getrusage writes into the struct we hand it.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    ms(u.ru_utime) + ms(u.ru_stime)
}

/// The whole path: a browser's `start` of a kind on a celery backend, the
/// real worker running it, progress and the final state over the WebSocket.
#[tokio::test]
async fn a_celery_kind_runs_to_100_percent_through_taskwire() {
    use app::kinds::KindInfo;
    use server::config::file::{AdapterSpec, BackendSpec, KindSpec, Tuning};
    use server::config::{Config, PollMode};

    let redis = RedisServer::start();
    let _worker = Worker::start(&redis);
    let mut config = Config::for_tests();
    config.backends = vec![BackendSpec {
        name: "celery".into(),
        adapter: AdapterSpec::Celery {
            broker: redis.url(0),
            result_backend: redis.url(1),
            queue: QUEUE.into(),
            terminate_on_cancel: false,
        },
        tuning: Tuning {
            poll_interval_ms: 50,
            poll_min_ms: 50,
            poll_mode: PollMode::Fixed,
            max_concurrent_polls: 64,
            max_polls_per_s: 0,
            timeout_ms: 2_000,
            give_up_s: 60,
            pipeline_depth: 0,
        },
    }];
    let params = serde_json::from_value(json!({
        "type": "object", "required": ["n"],
        "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 1000}}
    }))
    .unwrap();
    config.kinds = vec![KindSpec {
        info: KindInfo {
            name: "count".into(),
            title: Some("Count".into()),
            params: Some(params),
        },
        backend: 0,
        remote: "tasks.count".into(),
        webhook: None,
    }];
    let app = common::TestApp::spawn(config).await;
    let mut c = app.client().await;
    let (code, _) = c
        .try_start("bad", "count", json!({"n": 0}))
        .await
        .unwrap_err();
    assert_eq!(code, app::protocol::ErrorCode::InvalidParams);
    let task = c
        .start_kind("c", "count", json!({"n": 10, "step_ms": 40}))
        .await;
    let seen = tokio::time::timeout(WAIT, c.until_final(&task.id))
        .await
        .expect("the task ends");
    let last = seen.last().unwrap();
    assert_eq!(last.state, TaskState::Succeeded, "{last:?}");
    assert_eq!((last.done, last.total), (10, Some(10)));
    assert_eq!(last.result.as_ref().map(|r| r.value()), Some(json!(10)));
    assert!(
        seen.iter()
            .any(|t| t.state == TaskState::Running && t.done > 0 && t.done < 10),
        "progress on the way: {seen:?}"
    );
    app.stop().await;
}
