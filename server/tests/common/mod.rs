//! Test harness: a real taskwire on port 0, real WebSocket clients, and the
//! simulator as a real separate process.
#![allow(dead_code)]

pub mod redis_server;

use app::protocol::{ServerMsg, Task};
use futures::{SinkExt, StreamExt};
use server::config::{BackendChoice, Config};
use server::{AppState, Application};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{http, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for one expected frame before failing.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(15);

pub struct TestApp {
    pub addr: SocketAddr,
    /// The admin listener (`/metrics`).
    pub admin: SocketAddr,
    pub state: AppState,
    stop: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl TestApp {
    pub async fn spawn(config: Config) -> TestApp {
        let app = Application::build(config).await.expect("app builds");
        let addr = app.addr();
        let admin = app.admin_addr().expect("tests keep the admin listener");
        let state = app.state().clone();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(app.run_until(async move {
            let _ = rx.await;
        }));
        TestApp {
            addr,
            admin,
            state,
            stop: Some(tx),
            handle,
        }
    }

    pub async fn embedded(poll_interval_ms: u64) -> TestApp {
        let mut config = Config::for_tests();
        config.poll_interval_ms = poll_interval_ms;
        Self::spawn(config).await
    }

    pub async fn with_backend(url: &str, poll_interval_ms: u64) -> TestApp {
        let mut config = Config::for_tests();
        config.poll_interval_ms = poll_interval_ms;
        config.backend = BackendChoice::Http(url.to_string());
        Self::spawn(config).await
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.addr, None).await
    }

    /// `GET /metrics` on the admin listener: the Prometheus text.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.handle).await;
    }
}

pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub session: String,
    pub welcome: Vec<Task>,
    /// The highest `seq` seen per task, to check it never decreases.
    seqs: std::collections::HashMap<String, u64>,
}

impl Client {
    /// Connects (with a session cookie if given) and reads the `welcome`.
    pub async fn connect(addr: SocketAddr, session: Option<&str>) -> Client {
        Client::connect_path(addr, "/ws", session).await
    }

    /// Connects with a watch token (`/ws?token=`) and reads the `welcome`.
    pub async fn connect_token(addr: SocketAddr, token: &str) -> Client {
        Client::connect_path(addr, &format!("/ws?token={token}"), None).await
    }

    async fn connect_path(addr: SocketAddr, path: &str, session: Option<&str>) -> Client {
        let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
        if let Some(s) = session {
            req.headers_mut().insert(
                http::header::COOKIE,
                format!("taskwire_session={s}").parse().unwrap(),
            );
        }
        let (ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .expect("ws connects");
        let mut c = Client {
            ws,
            session: String::new(),
            welcome: vec![],
            seqs: Default::default(),
        };
        match c.recv().await {
            ServerMsg::Welcome {
                protocol,
                session,
                tasks,
            } => {
                assert_eq!(protocol, 1);
                c.session = session.unwrap_or_default();
                c.welcome = tasks;
            }
            other => panic!("first frame must be welcome, got {other:?}"),
        }
        c
    }

    pub async fn send_raw(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    pub async fn send(&mut self, v: serde_json::Value) {
        self.send_raw(&v.to_string()).await
    }

    pub async fn send_message(&mut self, m: Message) {
        self.ws.send(m).await.expect("send");
    }

    /// The next protocol message (pings skipped).
    pub async fn recv(&mut self) -> ServerMsg {
        loop {
            let frame = tokio::time::timeout(RECV_TIMEOUT, self.ws.next())
                .await
                .expect("a frame within the timeout")
                .expect("connection open")
                .expect("frame ok");
            match frame {
                Message::Text(t) => {
                    let msg: ServerMsg = serde_json::from_str(t.as_str())
                        .unwrap_or_else(|e| panic!("server sent non-protocol JSON {t}: {e}"));
                    if let ServerMsg::Task { task } | ServerMsg::Accepted { task, .. } = &msg {
                        let last = self.seqs.entry(task.id.clone()).or_insert(0);
                        assert!(task.seq >= *last, "seq went back for {}", task.id);
                        *last = task.seq;
                    }
                    return msg;
                }
                Message::Close(f) => panic!("connection closed: {f:?}"),
                _ => continue,
            }
        }
    }

    /// The next raw frame, closes included.
    pub async fn recv_frame(&mut self) -> Option<Message> {
        tokio::time::timeout(RECV_TIMEOUT, self.ws.next())
            .await
            .expect("a frame within the timeout")
            .map(|r| r.expect("frame ok"))
    }

    /// Sends `start` and returns the task of the `accepted` reply.
    pub async fn start(&mut self, reference: &str, params: serde_json::Value) -> Task {
        self.start_kind(reference, "simulate", params).await
    }

    /// [`Client::start`] of any kind.
    pub async fn start_kind(
        &mut self,
        reference: &str,
        kind: &str,
        params: serde_json::Value,
    ) -> Task {
        match self.try_start(reference, kind, params).await {
            Ok(task) => task,
            Err((code, message)) => panic!("start refused: {code:?} {message}"),
        }
    }

    /// Sends `start`: the accepted task, or the error's code and message.
    pub async fn try_start(
        &mut self,
        reference: &str,
        kind: &str,
        params: serde_json::Value,
    ) -> Result<Task, (app::protocol::ErrorCode, String)> {
        self.send(serde_json::json!({"type":"start","ref":reference,"kind":kind,"params":params}))
            .await;
        loop {
            match self.recv().await {
                ServerMsg::Accepted { reference: r, task } if r == reference => return Ok(task),
                ServerMsg::Error {
                    reference: Some(r),
                    code,
                    message,
                } if r == reference => return Err((code, message)),
                _ => continue,
            }
        }
    }

    /// Reads `task` messages until task `id` is final; returns every state seen.
    pub async fn until_final(&mut self, id: &str) -> Vec<Task> {
        let mut seen = vec![];
        loop {
            if let ServerMsg::Task { task } = self.recv().await {
                if task.id == id {
                    let fin = task.state.is_final();
                    seen.push(task);
                    if fin {
                        return seen;
                    }
                }
            }
        }
    }

    /// The next error message.
    pub async fn error(&mut self) -> (Option<String>, String) {
        loop {
            if let ServerMsg::Error {
                reference, code, ..
            } = self.recv().await
            {
                return (reference, code.as_str().to_string());
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// Runs the `taskwire` binary with `args` and waits for the address it
/// logs ("... listening on http://ADDR"); its output keeps being drained so
/// it never blocks on a full pipe.
pub fn spawn_taskwire(args: &[&str]) -> (Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_taskwire"))
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        // Processes side by side: each its own admin port.
        .env("TASKWIRE_ADMIN_LISTEN", "127.0.0.1:0")
        // Nothing on disk unless the test gives a `--data-dir`: test
        // processes run side by side.
        .env(
            "TASKWIRE_EPHEMERAL",
            if args.contains(&"--data-dir") {
                "0"
            } else {
                "1"
            },
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("taskwire starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // TASKWIRE_TEST_LOGS=1 shows what the process logs (with `--nocapture`).
    let show = std::env::var_os("TASKWIRE_TEST_LOGS").is_some();
    let addr = loop {
        let line = lines
            .next()
            .expect("taskwire printed its address")
            .expect("readable stdout");
        if show {
            eprintln!("[starting] {line}");
        }
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.trim().parse::<SocketAddr>().expect("an address");
        }
    };
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if show {
                eprintln!("[{addr}] {line}");
            }
        }
    });
    (child, addr)
}

/// The simulator as its own process (`taskwire sim`), killed on drop.
pub struct SimProcess {
    child: Child,
    pub url: String,
    pub addr: SocketAddr,
}

impl SimProcess {
    pub fn start() -> SimProcess {
        Self::start_on("127.0.0.1:0")
    }

    pub fn start_on(listen: &str) -> SimProcess {
        let (child, addr) = spawn_taskwire(&["sim", "--listen", listen]);
        SimProcess {
            child,
            url: format!("http://{addr}"),
            addr,
        }
    }

    pub async fn stats(&self) -> serde_json::Value {
        reqwest::get(format!("{}/stats", self.url))
            .await
            .expect("stats")
            .json()
            .await
            .expect("stats json")
    }

    /// Status requests per task (by the task service's id).
    pub async fn stats_per_task(&self) -> std::collections::BTreeMap<String, u64> {
        let body: serde_json::Value = reqwest::get(format!("{}/stats?per_task=1", self.url))
            .await
            .expect("stats")
            .json()
            .await
            .expect("stats json");
        serde_json::from_value(body["per_task"].clone()).expect("per_task is a map")
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One Server-Sent Event: its name, its data (JSON) and when it arrived.
#[derive(Debug)]
pub struct SseEvent {
    pub name: String,
    pub data: serde_json::Value,
    pub at: std::time::Instant,
}

/// Reads an event stream (comments skipped) until `done` says so.
pub async fn sse_events(
    resp: &mut reqwest::Response,
    mut done: impl FnMut(&str, &serde_json::Value) -> bool,
) -> Vec<SseEvent> {
    let mut buf = String::new();
    let mut events = Vec::new();
    loop {
        let chunk = tokio::time::timeout(RECV_TIMEOUT, resp.chunk())
            .await
            .expect("an event within the timeout")
            .unwrap()
            .expect("the stream stays open");
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let field = |name: &str| {
                block
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.strip_prefix(' ').unwrap_or(v).to_string())
            };
            let Some(data) = field("data:") else {
                continue; // a comment (the heartbeat)
            };
            let name = field("event:").unwrap_or_else(|| "message".into());
            let data: serde_json::Value = serde_json::from_str(&data).unwrap();
            let stop = done(&name, &data);
            events.push(SseEvent {
                name,
                data,
                at: std::time::Instant::now(),
            });
            if stop {
                return events;
            }
        }
    }
}

/// A fresh directory under the system's temp dir, removed (with all that a
/// test or a process it started wrote there) on drop.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("taskwire-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }

    pub fn arg(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
