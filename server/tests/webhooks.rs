//! Webhook deliveries to a real receiver (axum on 127.0.0.1, port 0), with
//! real time kept small: tokio's paused clock would fire the POST's timeout
//! while the socket waits, so delays here are tens of milliseconds.

mod common;

use app::protocol::{Task, TaskState};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use common::redis_server::{RedisCluster, RedisServer, TestRedis};
use hmac::{Hmac, Mac};
use server::clock::Clock;
use server::webhook::{DeliveryStore, WebhookSettings, Webhooks};
use sha2::Sha256;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SECRET: &str = "a-test-secret-of-32-bytes-000000";

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Hit {
    headers: HeaderMap,
    body: String,
    at: Instant,
}

/// A receiver at `/hooks/...`: answers the statuses queued in `script`,
/// then 200.
#[derive(Clone, Default)]
struct Receiver {
    hits: Arc<Mutex<Vec<Hit>>>,
    script: Arc<Mutex<VecDeque<u16>>>,
}

impl Receiver {
    async fn start(script: &[u16]) -> (Receiver, String) {
        let r = Receiver::default();
        r.script.lock().unwrap().extend(script);
        let app = Router::new()
            .route("/hooks/{*rest}", post(receive))
            .with_state(r.clone());
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(tcp, app).await });
        (r, format!("http://{addr}"))
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// Waits (at most `within`) until `n` requests have come.
    async fn wait_for(&self, n: usize, within: Duration) -> Vec<Hit> {
        let deadline = Instant::now() + within;
        loop {
            let hits = self.hits();
            if hits.len() >= n || Instant::now() > deadline {
                return hits;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn receive(State(r): State<Receiver>, headers: HeaderMap, body: String) -> StatusCode {
    r.hits.lock().unwrap().push(Hit {
        headers,
        body,
        at: Instant::now(),
    });
    let status = r.script.lock().unwrap().pop_front().unwrap_or(200);
    StatusCode::from_u16(status).unwrap()
}

fn settings(base: &str) -> WebhookSettings {
    WebhookSettings {
        secret: SECRET.into(),
        allow: vec![format!("{base}/hooks/")],
        timeout_ms: 2_000,
        retry_initial_ms: 20,
        retry_max_ms: 100,
        give_up_s: 60,
        ..Default::default()
    }
}

fn task(id: &str, state: TaskState) -> Task {
    Task {
        id: id.into(),
        kind: "simulate".into(),
        state,
        done: 10,
        total: Some(10),
        message: None,
        result: Some(serde_json::json!({"n": 1.5}).into()),
        error: None,
        seq: 7,
        created_ms: 1_700_000_000_000,
        updated_ms: 1_700_000_001_000,
        params: None,
    }
}

fn header<'a>(hit: &'a Hit, name: &str) -> &'a str {
    hit.headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name}"))
        .to_str()
        .unwrap()
}

async fn pending_drops_to_zero(hooks: &Webhooks) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while hooks.pending().await.unwrap() > 0 {
        assert!(Instant::now() < deadline, "deliveries still pending");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_final_state_is_posted_signed_once() {
    let (rx, base) = Receiver::start(&[]).await;
    let hooks = Webhooks::start(settings(&base), DeliveryStore::Memory, Clock::new())
        .await
        .unwrap();
    hooks
        .register("t1", &format!("{base}/hooks/orders?o=1"))
        .await
        .unwrap();
    // Not final, and final without a hook: nothing.
    hooks.on_final(&task("t1", TaskState::Running)).await;
    hooks.on_final(&task("other", TaskState::Failed)).await;
    let t = task("t1", TaskState::Succeeded);
    hooks.on_final(&t).await;
    let hits = rx.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(hits.len(), 1);
    let hit = &hits[0];

    // The body is the WebSocket's `task` message.
    let body: serde_json::Value = serde_json::from_str(&hit.body).unwrap();
    assert_eq!(body["type"], "task");
    assert_eq!(
        serde_json::from_value::<Task>(body["task"].clone()).unwrap(),
        t
    );
    assert_eq!(header(hit, "content-type"), "application/json");

    // The receiver's check, written out as a host would.
    let ts = header(hit, "x-taskwire-timestamp");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(ts.parse::<u64>().unwrap().abs_diff(now_ms) < 60_000, "{ts}");
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{ts}.{}", hit.body).as_bytes());
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        header(hit, "x-taskwire-signature"),
        format!("sha256={expected}")
    );
    let id = header(hit, "x-taskwire-delivery");
    assert_eq!(id.len(), 32, "{id}");

    // Exactly once per task: a second final state finds no registration.
    hooks.on_final(&t).await;
    pending_drops_to_zero(&hooks).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rx.hits().len(), 1);
    hooks.close().await;
}

#[tokio::test]
async fn failures_are_retried_under_the_same_delivery_id() {
    let (rx, base) = Receiver::start(&[500, 500]).await;
    let hooks = Webhooks::start(settings(&base), DeliveryStore::Memory, Clock::new())
        .await
        .unwrap();
    hooks
        .register("t2", &format!("{base}/hooks/x"))
        .await
        .unwrap();
    hooks.on_final(&task("t2", TaskState::Failed)).await;
    let hits = rx.wait_for(3, Duration::from_secs(5)).await;
    assert_eq!(hits.len(), 3);
    let ids: Vec<&str> = hits
        .iter()
        .map(|h| header(h, "x-taskwire-delivery"))
        .collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    assert!(hits.iter().all(|h| h.body == hits[0].body));
    // Retries wait at most the cap (20 ms, then 40 ms), plus slack.
    let span = hits[2].at - hits[0].at;
    assert!(span < Duration::from_secs(2), "{span:?}");
    pending_drops_to_zero(&hooks).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rx.hits().len(), 3, "a 200 ends the delivery");
    hooks.close().await;
}

#[tokio::test]
async fn urls_outside_the_allow_list_are_refused() {
    let (_rx, base) = Receiver::start(&[]).await;
    let mut s = settings(&base);
    s.allow.push("https://shop.example/hooks/".into());
    let hooks = Webhooks::start(s, DeliveryStore::Memory, Clock::new())
        .await
        .unwrap();
    assert!(hooks.check_url(&format!("{base}/hooks/a")).is_ok());
    assert!(hooks.check_url("https://shop.example/hooks/a").is_ok());
    for (bad, why) in [
        (format!("{base}/admin"), "allowed prefix"),
        (format!("{base}/hooks/../admin"), ".."),
        (
            base.replace("http://", "http://user@") + "/hooks/",
            "user information",
        ),
        ("http://evil.example/hooks/".into(), "allowed prefix"),
        ("http://shop.example/hooks/a".into(), "allowed prefix"),
        (
            "https://shop.example.evil.com/hooks/".into(),
            "allowed prefix",
        ),
    ] {
        let err = hooks.check_url(&bad).unwrap_err();
        assert!(err.contains(why), "{bad}: {err}");
        assert!(hooks.register("t", &bad).await.is_err(), "{bad}");
    }
    hooks.close().await;
}

#[tokio::test]
async fn a_pending_delivery_survives_a_restart_with_the_file_store() {
    // The first process only ever sees failures.
    let (rx, base) = Receiver::start(&[503; 1000]).await;
    let tmp = common::TempDir::new("hooks");
    let dir = tmp.path().join("deliveries");
    let mut s = settings(&base);
    s.retry_initial_ms = 300;
    s.retry_max_ms = 300;
    let store = DeliveryStore::File(dir.clone());
    let hooks = Webhooks::start(s.clone(), store.clone(), Clock::new())
        .await
        .unwrap();
    hooks
        .register("t4", &format!("{base}/hooks/a"))
        .await
        .unwrap();
    hooks
        .register("t5", &format!("{base}/hooks/b"))
        .await
        .unwrap();
    hooks.on_final(&task("t4", TaskState::Succeeded)).await;
    // At least the first attempt (a full-jitter retry may follow at once).
    assert!(!rx.wait_for(1, Duration::from_secs(5)).await.is_empty());
    hooks.close().await;
    let first_id = header(&rx.hits()[0], "x-taskwire-delivery").to_string();
    let before = rx.hits().len();

    // The receiver recovers; a new process on the same directory sends the
    // pending delivery (same id) and still knows t5's webhook.
    rx.script.lock().unwrap().clear();
    let hooks = Webhooks::start(s, store, Clock::new()).await.unwrap();
    hooks.on_final(&task("t5", TaskState::Cancelled)).await;
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        seen = rx
            .hits()
            .iter()
            .map(|h| {
                serde_json::from_str::<serde_json::Value>(&h.body).unwrap()["task"]["id"].clone()
            })
            .collect::<Vec<_>>();
        if seen.contains(&"t5".into()) && seen[before..].contains(&"t4".into()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen.contains(&"t5".into()), "{seen:?}");
    let t4: Vec<Hit> = rx
        .hits()
        .into_iter()
        .filter(|h| h.body.contains("\"id\":\"t4\""))
        .collect();
    assert!(t4.len() >= 2);
    assert!(
        seen[before..].contains(&"t4".into()),
        "t4 not sent again after the restart"
    );
    assert!(t4
        .iter()
        .all(|h| header(h, "x-taskwire-delivery") == first_id));
    pending_drops_to_zero(&hooks).await;
    hooks.close().await;
}

#[tokio::test]
async fn a_delivery_is_given_up_after_give_up_s() {
    let (rx, base) = Receiver::start(&[500; 10_000]).await;
    let mut s = settings(&base);
    s.give_up_s = 1;
    s.retry_initial_ms = 50;
    s.retry_max_ms = 200;
    let hooks = Webhooks::start(s, DeliveryStore::Memory, Clock::new())
        .await
        .unwrap();
    hooks
        .register("t6", &format!("{base}/hooks/x"))
        .await
        .unwrap();
    hooks.on_final(&task("t6", TaskState::Failed)).await;
    pending_drops_to_zero_within(&hooks, Duration::from_secs(4)).await;
    let hits = rx.hits();
    assert!(hits.len() >= 3, "{} attempts", hits.len());
    let span = hits.last().unwrap().at - hits[0].at;
    // The last attempt is at the give-up time, not after it.
    assert!(
        span >= Duration::from_millis(900) && span < Duration::from_millis(2500),
        "{span:?}"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(rx.hits().len(), hits.len(), "attempts after giving up");
    hooks.close().await;
}

async fn pending_drops_to_zero_within(hooks: &Webhooks, within: Duration) {
    let deadline = Instant::now() + within;
    while hooks.pending().await.unwrap() > 0 {
        assert!(Instant::now() < deadline, "not given up in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// With Redis — one server, and a 3-master Redis Cluster (the three keys
/// share a hash tag): a hook registered through one process is delivered
/// once when another commits the final state, and both run a delivery loop
/// on the same queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_shares_registrations_and_deliveries_between_processes() {
    shared_deliveries(&RedisServer::start().url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_shares_registrations_and_deliveries_between_processes() {
    shared_deliveries(&RedisCluster::start().url()).await;
}

async fn shared_deliveries(url: &str) {
    let (rx, base) = Receiver::start(&[500]).await;
    let store = DeliveryStore::Redis(url.to_string());
    let a = Webhooks::start(settings(&base), store.clone(), Clock::new())
        .await
        .unwrap();
    let b = Webhooks::start(settings(&base), store, Clock::new())
        .await
        .unwrap();
    a.register("t7", &format!("{base}/hooks/x")).await.unwrap();
    b.on_final(&task("t7", TaskState::Succeeded)).await;
    a.on_final(&task("t7", TaskState::Succeeded)).await;
    let hits = rx.wait_for(2, Duration::from_secs(10)).await;
    assert_eq!(hits.len(), 2);
    assert_eq!(
        header(&hits[0], "x-taskwire-delivery"),
        header(&hits[1], "x-taskwire-delivery")
    );
    pending_drops_to_zero(&a).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.hits().len(), 2);
    a.close().await;
    b.close().await;
}

/// An https receiver: Python's http.server behind TLS with a self-signed
/// certificate for 127.0.0.1 made by `openssl`, trusted through `ca_file`.
#[tokio::test]
async fn https_webhooks_are_sent_over_tls_to_a_trusted_receiver() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let tmp = common::TempDir::new("tls");
    let dir = tmp.path();
    // A CA, and a leaf for 127.0.0.1 it signed (a self-signed CA used as
    // the server's own certificate is rightly refused by webpki).
    let (ca, cert, key) = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    let ext = dir.join("leaf.ext");
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    let openssl = |args: &[&str]| {
        let ok = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .stderr(Stdio::null())
            .status()
            .expect("openssl runs")
            .success();
        assert!(ok, "openssl {args:?}");
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=taskwire test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "key.pem",
        "-out",
        "leaf.csr",
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "leaf.ext",
        "-out",
        "cert.pem",
    ]);
    const RECEIVER: &str = r#"
import http.server, json, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers['content-length']))
        print(json.dumps({"id": self.headers['x-taskwire-delivery'], "body": body.decode()}), flush=True)
        self.send_response(204)
        self.end_headers()
    def log_message(self, *a):
        pass
srv = http.server.HTTPServer(('127.0.0.1', 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;
    let mut py = Command::new("python3")
        .arg("-c")
        .arg(RECEIVER)
        .arg(&cert)
        .arg(&key)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut lines = BufReader::new(py.stdout.take().unwrap()).lines();
    // Killed however the test ends (it holds the test's stderr).
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _py = KillOnDrop(py);
    let port: u16 = lines.next().unwrap().unwrap().trim().parse().unwrap();
    let base = format!("https://127.0.0.1:{port}");
    let mut s = settings(&base);
    s.ca_file = Some(ca.display().to_string());
    let hooks = Webhooks::start(s, DeliveryStore::Memory, Clock::new())
        .await
        .unwrap();
    hooks
        .register("t-tls", &format!("{base}/hooks/secure"))
        .await
        .unwrap();
    hooks.on_final(&task("t-tls", TaskState::Succeeded)).await;
    let line = tokio::time::timeout(
        Duration::from_secs(15),
        tokio::task::spawn_blocking(move || lines.next().unwrap().unwrap()),
    )
    .await
    .expect("delivered within 15 s")
    .unwrap();
    let got: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(got["id"].as_str().unwrap().len(), 32);
    let body: serde_json::Value = serde_json::from_str(got["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["task"]["id"], "t-tls");
    pending_drops_to_zero(&hooks).await;
    hooks.close().await;
}
