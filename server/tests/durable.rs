//! The durable single node (the default memory engine with its file):
//! a restart, graceful or a crash, loses no session and no task; a page view
//! leaves no lasting state; a damaged file is a clear start-up error.

mod common;

use app::protocol::{ServerMsg, TaskState};
use common::{spawn_taskwire, Client, TempDir, TestApp};
use server::config::Config;
use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn start_node(dir: &TempDir) -> (Child, std::net::SocketAddr) {
    spawn_taskwire(&[
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        dir.arg(),
        "--poll-interval-ms",
        "100",
    ])
}

fn stop(child: &mut Child, signal: &str) {
    let pid = child.id().to_string();
    Command::new("kill")
        .args([signal, &pid])
        .status()
        .expect("kill runs");
    let _ = child.wait();
}

/// Five long tasks, the process stopped by `signal` mid-run and started
/// again over the same directory: the same session lists the same five,
/// which carry on and all succeed, `seq` never going back.
async fn restart_loses_nothing(signal: &str) {
    let dir = TempDir::new("restart");
    let (mut child, addr) = start_node(&dir);
    let mut client = Client::connect(addr, None).await;
    let session = client.session.clone();
    let mut ids = Vec::new();
    for i in 0..5 {
        let params = serde_json::json!({"duration_ms": 6_000, "steps": 30});
        ids.push(client.start(&format!("r{i}"), params).await.id);
    }
    // Some progress first, so that there is something to carry on from.
    let mut last_seq: BTreeMap<String, u64> = BTreeMap::new();
    let until = Instant::now() + Duration::from_millis(1_500);
    while Instant::now() < until {
        if let ServerMsg::Task { task } = client.recv().await {
            last_seq.insert(task.id.clone(), task.seq);
        }
    }
    stop(&mut child, signal);
    drop(client);

    let (mut child, addr) = start_node(&dir);
    let mut client = Client::connect(addr, Some(&session)).await;
    assert_eq!(client.session, session, "the same session after {signal}");
    let mut listed: Vec<String> = client.welcome.iter().map(|t| t.id.clone()).collect();
    listed.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(listed, want, "the same tasks after {signal}");
    for t in &client.welcome {
        let before = last_seq.get(&t.id).copied().unwrap_or(0);
        assert!(t.seq > before, "seq went back for {} after {signal}", t.id);
        assert!(!t.state.is_final() || t.state == TaskState::Succeeded);
    }
    let mut finals: BTreeMap<String, (TaskState, u64)> = client
        .welcome
        .iter()
        .filter(|t| t.state.is_final())
        .map(|t| (t.id.clone(), (t.state, t.done)))
        .collect();
    while finals.len() < ids.len() {
        if let ServerMsg::Task { task } = client.recv().await {
            if task.state.is_final() {
                finals.insert(task.id.clone(), (task.state, task.done));
            }
        }
    }
    for id in &ids {
        assert_eq!(
            finals.get(id),
            Some(&(TaskState::Succeeded, 30)),
            "{id} after {signal}"
        );
    }
    stop(&mut child, "-TERM");
}

#[tokio::test]
async fn sigterm_mid_run_loses_nothing() {
    restart_loses_nothing("-TERM").await;
}

#[tokio::test]
async fn sigkill_mid_run_loses_nothing() {
    restart_loses_nothing("-KILL").await;
}

/// A finished task stays listed after a restart, and is forgotten like any
/// other one retention after it finished (also from the file).
#[tokio::test]
async fn finished_tasks_survive_and_then_expire() {
    let dir = TempDir::new("expire");
    let args = |d: &TempDir| {
        vec![
            "--listen".to_string(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            d.arg().into(),
            "--retention-s".into(),
            "3".into(),
        ]
    };
    let a = args(&dir);
    let (mut child, addr) = spawn_taskwire(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let mut client = Client::connect(addr, None).await;
    let session = client.session.clone();
    let task = client
        .start("r", serde_json::json!({"duration_ms": 100, "steps": 1}))
        .await;
    client.until_final(&task.id).await;
    // A graceful stop writes the last checkpoint.
    stop(&mut child, "-TERM");

    let (mut child, addr) = spawn_taskwire(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let client = Client::connect(addr, Some(&session)).await;
    assert_eq!(client.session, session);
    assert_eq!(client.welcome.len(), 1);
    assert_eq!(client.welcome[0].state, TaskState::Succeeded);
    drop(client);
    // Gone one retention later: the session with it.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let client = Client::connect(addr, Some(&session)).await;
        if client.welcome.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the finished task never expired");
        drop(client);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop(&mut child, "-TERM");
    // Gone from the file too: another restart does not bring it back.
    let (mut child, addr) = spawn_taskwire(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let client = Client::connect(addr, Some(&session)).await;
    assert!(client.welcome.is_empty(), "an expired task stays forgotten");
    drop(client);
    stop(&mut child, "-TERM");
}

/// A damaged file stops the start with an error that names it, and is not
/// replaced.
#[test]
fn a_damaged_file_is_a_clear_startup_error() {
    let dir = TempDir::new("corrupt");
    let file = dir.path().join("taskwire.redb");
    std::fs::write(&file, vec![0xA5u8; 64 * 1024]).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_taskwire"))
        .args(["--listen", "127.0.0.1:0", "--data-dir", dir.arg()])
        .env("NO_COLOR", "1")
        .env("TASKWIRE_ADMIN_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("taskwire runs");
    assert!(
        !out.status.success(),
        "it must not start over a damaged file"
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(file.to_str().unwrap()),
        "the error names the file: {text}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), vec![0xA5u8; 64 * 1024]);
}

/// Page views leave nothing: 20,000 GETs without a cookie, then one
/// retention, and the sessions gauge is back to 0.
#[tokio::test]
async fn page_views_leave_no_sessions() {
    let mut config = Config::for_tests();
    config.retention_s = 1;
    let app = TestApp::spawn(config).await;
    let http = reqwest::Client::new();
    let url = format!("http://{}/", app.addr);
    let mut pending = futures::stream::FuturesUnordered::new();
    use futures::StreamExt;
    for _ in 0..20_000 {
        pending.push(http.get(&url).send());
        if pending.len() >= 32 {
            let r = pending.next().await.unwrap().expect("GET /");
            assert!(r.status().is_success());
        }
    }
    while let Some(r) = pending.next().await {
        assert!(r.expect("GET /").status().is_success());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let sessions = app.state.engine.counts().sessions;
        if sessions == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{sessions} sessions left after the retention"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    app.stop().await;
}

/// More live tasks on disk than the delay queue's command channel holds
/// (4,096): the start-up loads them all and polls every one (it once
/// waited forever on the channel nobody drained yet).
#[tokio::test]
async fn thousands_of_live_tasks_load_and_resume() {
    use server::clock::Clock;
    use server::engine::fanout::Fanout;
    use server::engine::memory::{durable, Table};
    const N: usize = 5_000;
    let dir = TempDir::new("many");
    let clock = Clock::new();
    {
        let (db, _) = durable::open(dir.path()).unwrap();
        let table = Table::new(Fanout::new(clock), true);
        let session: std::sync::Arc<str> = "0123456789abcdef0123456789abcdef".into();
        let params = serde_json::json!({"duration_ms": 2_000, "steps": 2});
        for i in 0..N {
            let mut task =
                server::task::new_task(&session, "simulate", Some(params.clone()), clock.now_ms());
            task.id = format!("t{i:05}");
            table.insert(&session, &task, &format!("b{i:05}"));
        }
        let store = durable::Durable::start(db, table);
        store.flush().await.unwrap();
        store.close().await;
    }
    let mut config = Config::for_tests();
    config.ephemeral = false;
    config.data_dir = dir.path().to_path_buf();
    let app = tokio::time::timeout(Duration::from_secs(60), TestApp::spawn(config))
        .await
        .expect("the start-up does not hang");
    assert_eq!(app.state.engine.counts().tasks, N);
    let deadline = Instant::now() + Duration::from_secs(60);
    while app.state.engine.counts().live_tasks > 0 {
        assert!(Instant::now() < deadline, "the loaded tasks never finished");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    app.stop().await;
}
