//! The Redis engine with real processes: a real `redis-server` on a free
//! port, the simulator as its own process, and several `taskwire` web and
//! worker processes sharing them. Each test starts its own Redis, and runs
//! twice: on one `redis-server` (`::single`) and on a Redis Cluster of
//! three masters (`::cluster`).

mod common;

use app::protocol::{ServerMsg, TaskState};
use common::redis_server::{RedisCluster, RedisServer, TestRedis};
use common::{spawn_taskwire, Client, SimProcess};
use serde_json::json;
use std::net::SocketAddr;
use std::process::{Child, Command};
use std::time::Duration;

/// A `taskwire` process, killed (SIGKILL) on drop.
struct Proc {
    child: Child,
    addr: SocketAddr,
}

impl Proc {
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

const INTERVAL_MS: u64 = 200;

/// Runs the test body `$name` on one `redis-server` and on a 3-master
/// Redis Cluster: the same guarantees on both.
macro_rules! on_single_and_cluster {
    ($name:ident) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn single() {
                super::$name(RedisServer::start()).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn cluster() {
                super::$name(RedisCluster::start()).await
            }
        }
    };
}

fn taskwire(role: &str, redis: &dyn TestRedis, sim: &SimProcess) -> Proc {
    taskwire_with(role, redis, sim, &[])
}

fn taskwire_with(role: &str, redis: &dyn TestRedis, sim: &SimProcess, extra: &[&str]) -> Proc {
    taskwire_at(role, redis, &sim.url, extra)
}

fn taskwire_at(role: &str, redis: &dyn TestRedis, backend: &str, extra: &[&str]) -> Proc {
    let interval = INTERVAL_MS.to_string();
    let url = redis.url();
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--role",
        role,
        "--redis",
        &url,
        "--backend",
        backend,
        "--poll-mode",
        "fixed",
        "--poll-interval-ms",
        &interval,
        "--backend-timeout-ms",
        "1000",
        "--max-starts-per-min",
        "1000",
    ];
    // A flag in `extra` replaces the default one.
    for flag in extra.iter().filter(|a| a.starts_with("--")) {
        if let Some(at) = args.iter().position(|a| a == flag) {
            args.drain(at..at + 2);
        }
    }
    args.extend_from_slice(extra);
    let (child, addr) = spawn_taskwire(&args);
    Proc { child, addr }
}

/// Starts `n` simulate tasks on `client`; returns their ids.
async fn start_many(client: &mut Client, n: usize, duration_ms: u64) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let task = client
            .start(
                &format!("r{i}"),
                json!({"duration_ms": duration_ms, "steps": 10}),
            )
            .await;
        ids.push(task.id);
    }
    ids
}

/// Reads until every task in `ids` is final; returns the final states.
async fn until_all_final(client: &mut Client, ids: &[String]) -> Vec<app::protocol::Task> {
    let mut finals = std::collections::HashMap::new();
    for t in &client.welcome {
        if ids.contains(&t.id) && t.state.is_final() {
            finals.insert(t.id.clone(), t.clone());
        }
    }
    while finals.len() < ids.len() {
        if let ServerMsg::Task { task } = client.recv().await {
            if ids.contains(&task.id) && task.state.is_final() {
                finals.insert(task.id.clone(), task);
            }
        }
    }
    ids.iter().map(|id| finals[id].clone()).collect()
}

on_single_and_cluster!(two_web_two_workers_one_task_space);
async fn two_web_two_workers_one_task_space(redis: impl TestRedis) {
    let sim = SimProcess::start();
    let web_a = taskwire("web", &redis, &sim);
    let web_b = taskwire("web", &redis, &sim);
    let _w1 = taskwire("worker", &redis, &sim);
    let _w2 = taskwire("worker", &redis, &sim);

    let mut a = Client::connect(web_a.addr, None).await;
    // The same session, through the other web process.
    let mut b = Client::connect(web_b.addr, Some(&a.session)).await;
    assert_eq!(b.session, a.session, "sessions live in Redis");

    let duration_ms = 2_000;
    let ids = start_many(&mut a, 10, duration_ms).await;
    for id in &ids {
        b.send(json!({"type":"subscribe","task":id})).await;
    }
    let finals = until_all_final(&mut b, &ids).await;
    for t in &finals {
        assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
        assert_eq!((t.done, t.total), (10, Some(10)));
    }
    // A, which started them, saw the same final states.
    let finals_a = until_all_final(&mut a, &ids).await;
    assert_eq!(finals, finals_a);

    // Polled about once per tick over both workers, never twice a tick:
    // a 2 s task at 200 ms is polled ~11 times (one more for the final).
    let stats = sim.stats_per_task().await;
    let ticks = duration_ms / INTERVAL_MS;
    for id in &ids {
        let backend_polls = stats.values().copied().collect::<Vec<u64>>();
        assert!(
            !backend_polls.is_empty(),
            "{id}: the task service saw polls"
        );
    }
    for (backend_id, polls) in &stats {
        assert!(
            (ticks - 2..=ticks + 3).contains(polls),
            "task {backend_id} polled {polls} times in {ticks} ticks"
        );
    }

    // A new connection to B gets every task in its welcome.
    let c = Client::connect(web_b.addr, Some(&a.session)).await;
    let listed: Vec<&str> = c.welcome.iter().map(|t| t.id.as_str()).collect();
    for id in &ids {
        assert!(listed.contains(&id.as_str()), "{id} missing from welcome");
    }
}

on_single_and_cluster!(sessions_spread_over_partitions_workers_and_shards);
/// Many sessions' tasks: the partitions are shared out between the two
/// workers (half each, by lease), every task ends right, and on a cluster
/// every shard holds a part of the data.
async fn sessions_spread_over_partitions_workers_and_shards(redis: impl TestRedis) {
    let sim = SimProcess::start();
    let web = taskwire("web", &redis, &sim);
    let _w1 = taskwire("worker", &redis, &sim);
    let _w2 = taskwire("worker", &redis, &sim);
    // Both workers in the list before the tasks come.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let mut clients = Vec::new();
    let mut all = Vec::new();
    for _ in 0..24 {
        let mut c = Client::connect(web.addr, None).await;
        let ids = start_many(&mut c, 2, 1_500).await;
        all.extend(ids.iter().cloned());
        clients.push((c, ids));
    }
    for (c, ids) in &mut clients {
        let finals = until_all_final(c, ids).await;
        assert!(finals
            .iter()
            .all(|t| t.state == TaskState::Succeeded && t.done == 10));
    }
    let polled = sim.stats_per_task().await;
    assert_eq!(polled.len(), all.len(), "every task polled");
    let mut owners = std::collections::HashMap::<String, u32>::new();
    for p in 0..server::engine::redis::keys::PARTITIONS {
        let owner = redis.cli(&["get", &format!("{{tw:{p}}}:owner")]);
        *owners.entry(owner.trim().to_string()).or_default() += 1;
    }
    assert_eq!(owners.len(), 2, "two owners: {owners:?}");
    let half = u32::from(server::engine::redis::keys::PARTITIONS) / 2;
    assert!(owners.values().all(|n| *n == half), "{owners:?}");
    let spread = redis.keys_per_node();
    assert!(spread.iter().all(|n| *n > 0), "keys per node: {spread:?}");
}

on_single_and_cluster!(a_cancel_goes_to_the_partition_s_owner);
/// A `cancel` on a web process is handed to the owner of the task's
/// partition: with no worker running it waits (the canceller sees the
/// cancelled state at once, Redis once a worker owns the partition); with
/// a poll in flight (every request to the task service takes 600 ms) it
/// is applied after that poll, `seq` still rising by one per change.
async fn a_cancel_goes_to_the_partition_s_owner(redis: impl TestRedis) {
    let sim = SimProcess::start();
    let proxy = slow_proxy(sim.addr, Duration::from_millis(600)).await;
    let backend = format!("http://{proxy}");
    let web = taskwire_at("web", &redis, &backend, &[]);
    let mut a = Client::connect(web.addr, None).await;
    let params = json!({"duration_ms": 60_000, "steps": 60_000});
    let waiting = a.start("w", params.clone()).await;
    a.send(json!({"type":"cancel","task":waiting.id})).await;
    let seen = a.until_final(&waiting.id).await;
    assert_eq!(seen.last().unwrap().state, TaskState::Cancelled);

    // A worker comes: it takes the partition and applies the cancel; a new
    // connection finds the task cancelled in Redis.
    let _worker = taskwire_at("worker", &redis, &backend, &[]);
    let mut in_redis = None;
    for _ in 0..100 {
        let b = Client::connect(web.addr, Some(&a.session)).await;
        in_redis = b.welcome.iter().find(|t| t.id == waiting.id).cloned();
        if in_redis.as_ref().is_some_and(|t| t.state.is_final()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let in_redis = in_redis.expect("the task is listed");
    assert_eq!((in_redis.state, in_redis.seq), (TaskState::Cancelled, 1));

    // A running task, cancelled while its polls are in flight.
    let running = a.start("r", params).await;
    let mut seqs = vec![running.seq];
    loop {
        if let ServerMsg::Task { task } = a.recv().await {
            if task.id == running.id {
                seqs.push(task.seq);
                if task.done > 0 {
                    break;
                }
            }
        }
    }
    a.send(json!({"type":"cancel","task":running.id})).await;
    let seen = a.until_final(&running.id).await;
    seqs.extend(seen.iter().map(|t| t.seq));
    assert_eq!(seen.last().unwrap().state, TaskState::Cancelled);
    assert!(seqs.windows(2).all(|w| w[1] >= w[0]), "{seqs:?}");
    // The owner's copy agrees: no poll after the cancel moves it back
    // (the canceller was shown the cancelled state at once; the owner
    // committed it after the poll in flight, so perhaps at a later `seq`).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let c = Client::connect(web.addr, Some(&a.session)).await;
    let last = c.welcome.iter().find(|t| t.id == running.id).unwrap();
    assert_eq!(last.state, TaskState::Cancelled);
    assert!(last.seq >= *seqs.last().unwrap(), "{} < {seqs:?}", last.seq);
}

on_single_and_cluster!(a_worker_joining_takes_half_the_partitions_mid_run);
/// A second worker joining mid-run: the first hands over the partitions
/// now assigned to the newcomer, which reads their tasks and polls them;
/// every task ends right and none is polled more than its cadence allows
/// (two workers never poll one task at once).
async fn a_worker_joining_takes_half_the_partitions_mid_run(redis: impl TestRedis) {
    let sim = SimProcess::start();
    let web = taskwire("web", &redis, &sim);
    let _w1 = taskwire("worker", &redis, &sim);
    let duration_ms = 3_000;
    let mut clients = Vec::new();
    for _ in 0..16 {
        let mut c = Client::connect(web.addr, None).await;
        let ids = start_many(&mut c, 2, duration_ms).await;
        clients.push((c, ids));
    }
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let _w2 = taskwire("worker", &redis, &sim);
    for (c, ids) in &mut clients {
        let finals = until_all_final(c, ids).await;
        assert!(finals
            .iter()
            .all(|t| t.state == TaskState::Succeeded && t.done == 10));
    }
    let ticks = duration_ms / INTERVAL_MS;
    for (backend_id, polls) in sim.stats_per_task().await {
        assert!(
            polls <= ticks + 4,
            "task {backend_id} polled {polls} times in {ticks} ticks"
        );
    }
    // Both own partitions now.
    let mut owners = std::collections::HashSet::new();
    for p in 0..server::engine::redis::keys::PARTITIONS {
        owners.insert(
            redis
                .cli(&["get", &format!("{{tw:{p}}}:owner")])
                .trim()
                .to_string(),
        );
    }
    assert_eq!(owners.len(), 2, "{owners:?}");
}

on_single_and_cluster!(a_killed_worker_s_tasks_finish_on_the_other);
async fn a_killed_worker_s_tasks_finish_on_the_other(redis: impl TestRedis) {
    let sim = SimProcess::start();
    let web = taskwire("web", &redis, &sim);
    let mut w1 = taskwire("worker", &redis, &sim);
    let _w2 = taskwire("worker", &redis, &sim);

    let mut a = Client::connect(web.addr, None).await;
    let ids = start_many(&mut a, 20, 3_000).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    w1.kill(); // SIGKILL: its claims are left to run out.
    let finals = until_all_final(&mut a, &ids).await;
    for t in &finals {
        assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
        assert_eq!(t.done, 10);
    }
}

on_single_and_cluster!(redis_restarted_mid_run_everything_carries_on);
async fn redis_restarted_mid_run_everything_carries_on(mut redis: impl TestRedis) {
    let sim = SimProcess::start();
    let web = taskwire("web", &redis, &sim);
    let _worker = taskwire("worker", &redis, &sim);

    let mut a = Client::connect(web.addr, None).await;
    let ids = start_many(&mut a, 10, 3_000).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    redis.kill();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    redis.restart();
    // The connection stays up; the listener resubscribes and reads the
    // session again, the worker's claims run out and are polled again.
    let finals = until_all_final(&mut a, &ids).await;
    for t in &finals {
        assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    }
    // New work goes through after the restart.
    let more = start_many(&mut a, 2, 500).await;
    let finals = until_all_final(&mut a, &more).await;
    assert!(finals.iter().all(|t| t.state == TaskState::Succeeded));
}

on_single_and_cluster!(a_cut_change_feed_loses_no_final_state);
async fn a_cut_change_feed_loses_no_final_state(redis: impl TestRedis) {
    let sim = SimProcess::start();
    let web = taskwire("web", &redis, &sim);
    let _worker = taskwire("worker", &redis, &sim);
    let mut a = Client::connect(web.addr, None).await;
    let ids = start_many(&mut a, 10, 1_500).await;

    // Cut every pub/sub connection again and again while the tasks run:
    // what is published meanwhile is lost, and the web process must make
    // it good by reading the session again when it resubscribes.
    let mut conns = Vec::new();
    for node in redis.nodes() {
        let client = redis::Client::open(node).unwrap();
        conns.push(client.get_multiplexed_async_connection().await.unwrap());
    }
    let cutter = tokio::spawn(async move {
        let mut cut = 0u64;
        for _ in 0..40 {
            for conn in &mut conns {
                let n: u64 = redis::cmd("CLIENT")
                    .arg(&["KILL", "TYPE", "pubsub"])
                    .query_async(conn)
                    .await
                    .unwrap_or(0);
                cut += n;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cut
    });
    let finals = until_all_final(&mut a, &ids).await;
    assert!(finals
        .iter()
        .all(|t| t.state == TaskState::Succeeded && t.done == 10));
    assert!(cutter.await.unwrap() > 0, "subscriptions were cut");
}

on_single_and_cluster!(one_process_with_redis_behaves_like_memory);
async fn one_process_with_redis_behaves_like_memory(redis: impl TestRedis) {
    let sim = SimProcess::start();
    let all = taskwire("all", &redis, &sim);
    let mut a = Client::connect(all.addr, None).await;
    let task = a
        .start("one", json!({"duration_ms": 600, "steps": 3}))
        .await;
    assert_eq!(task.state, TaskState::Queued);
    let seen = a.until_final(&task.id).await;
    let last = seen.last().unwrap();
    assert_eq!(last.state, TaskState::Succeeded);
    // `seq` rises by one per change, whichever process made it.
    let seqs: Vec<u64> = seen.iter().map(|t| t.seq).collect();
    assert!(seqs.windows(2).all(|w| w[1] > w[0]), "{seqs:?}");

    // Cancel of a finished task, and forget: the task is gone for a new
    // connection too.
    a.send(json!({"type":"forget","task":task.id})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = Client::connect(all.addr, Some(&a.session)).await;
    assert!(b.welcome.iter().all(|t| t.id != task.id));

    // A cancel goes through Redis too.
    let long = a
        .start("long", json!({"duration_ms": 60_000, "steps": 10}))
        .await;
    a.send(json!({"type":"cancel","ref":"c","task":long.id}))
        .await;
    let seen = a.until_final(&long.id).await;
    assert_eq!(seen.last().unwrap().state, TaskState::Cancelled);
}

on_single_and_cluster!(session_limits_hold_across_web_processes);
async fn session_limits_hold_across_web_processes(redis: impl TestRedis) {
    let sim = SimProcess::start();
    let limit = ["--max-live-tasks-per-session", "2"];
    let web_a = taskwire_with("web", &redis, &sim, &limit);
    let web_b = taskwire_with("web", &redis, &sim, &limit);
    let _worker = taskwire("worker", &redis, &sim);
    let mut a = Client::connect(web_a.addr, None).await;
    let mut b = Client::connect(web_b.addr, Some(&a.session)).await;
    a.start("one", json!({"duration_ms": 30_000, "steps": 10}))
        .await;
    b.start("two", json!({"duration_ms": 30_000, "steps": 10}))
        .await;
    // The third live task of the session is refused, whichever process
    // it goes through.
    for c in [&mut a, &mut b] {
        c.send(json!({"type":"start","ref":"three","kind":"simulate",
                      "params":{"duration_ms": 1000, "steps": 1}}))
            .await;
        let (reference, code) = c.error().await;
        assert_eq!(
            (reference.as_deref(), code.as_str()),
            (Some("three"), "too_many_tasks")
        );
    }
}

#[test]
fn roles_need_redis() {
    let out = Command::new(env!("CARGO_BIN_EXE_taskwire"))
        .args(["--role", "worker", "--listen", "127.0.0.1:0"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("need --redis"), "{err}");
}

on_single_and_cluster!(a_killed_worker_s_tasks_are_polled_again_within_its_lease);
/// A killed worker's tasks are polled again within its short lease, not
/// after the backend timeout: with a 5 s backend timeout (the old lease
/// was that + 2 s), the longest silence of any task across the kill stays
/// under 4 s (about 1.5 s lease + a poll interval is expected; the figure
/// is printed for docs/benchmarks.md).
async fn a_killed_worker_s_tasks_are_polled_again_within_its_lease(redis: impl TestRedis) {
    let sim = SimProcess::start();
    // Every request to the task service takes 600 ms (a proxy that holds
    // each request that long), so at the kill most polls are in flight,
    // their tasks leased to the dying worker.
    let proxy = slow_proxy(sim.addr, Duration::from_millis(600)).await;
    let backend = format!("http://{proxy}");
    let slow = ["--backend-timeout-ms", "5000"];
    let web = taskwire_at("web", &redis, &backend, &slow);
    // One worker has every task; the second one starts just before the
    // first is killed.
    let mut w1 = taskwire_at("worker", &redis, &backend, &slow);
    let mut w2 = None;

    let mut a = Client::connect(web.addr, None).await;
    // 16 starts at once, the most a connection may have waiting on the task
    // service (each start also takes 600 ms).
    for i in 0..16 {
        // A step per millisecond: every poll is a change.
        a.send(
            json!({"type": "start", "ref": format!("f{i}"), "kind": "simulate",
            "params": {"duration_ms": 8_000, "steps": 8_000}}),
        )
        .await;
    }
    let mut ids = Vec::new();
    let t0 = std::time::Instant::now();
    let mut last: std::collections::HashMap<String, std::time::Instant> = Default::default();
    let mut longest = Duration::ZERO;
    let mut killed = false;
    let mut finals = 0;
    while ids.len() < 16 || finals < ids.len() {
        if !killed && t0.elapsed() > Duration::from_millis(3_000) {
            w2 = Some(taskwire_at("worker", &redis, &backend, &slow));
            w1.kill();
            killed = true;
        }
        let task = match a.recv().await {
            ServerMsg::Accepted { task, .. } => {
                ids.push(task.id.clone());
                task
            }
            ServerMsg::Task { task } => task,
            ServerMsg::Error { message, .. } => panic!("{message}"),
            ServerMsg::Welcome { .. } => continue,
        };
        let now = std::time::Instant::now();
        if let Some(prev) = last.insert(task.id.clone(), now) {
            if killed {
                longest = longest.max(now - prev);
            }
        }
        if task.state.is_final() {
            assert_eq!(task.state, TaskState::Succeeded);
            finals += 1;
        }
    }
    eprintln!("failover: longest silence of a task across the kill {longest:?}");
    assert!(killed && w2.is_some());
    assert!(
        longest < Duration::from_secs(4),
        "a killed worker's tasks went unpolled for {longest:?}"
    );
}

/// A TCP proxy to `to` that holds every chunk a client sends for `delay`
/// before passing it on (answers pass straight back).
async fn slow_proxy(to: std::net::SocketAddr, delay: Duration) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(to).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n @ 1..) = cr.read(&mut buf).await {
                        tokio::time::sleep(delay).await;
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                let _ = tokio::io::copy(&mut sr, &mut cw).await;
                up.abort();
            });
        }
    });
    addr
}
