//! Contract section 3 against a real server: the server API with keys,
//! watch tokens on `/ws` and `/sse`, their isolation, and one list per
//! cookie session in every tab (contract 1.1, section 1).

mod common;

use app::protocol::{ErrorCode, ServerMsg, TaskState};
use common::{Client, TestApp};
use serde_json::{json, Value};
use server::auth::ApiKey;
use server::config::Config;
use sha2::{Digest, Sha256};
use std::time::Duration;
use tokio::time::timeout;

const SHOP_KEY: &str = "shop-key-0123456789";
const BLOG_KEY: &str = "blog-key-0123456789";

fn key(name: &str, secret: &str) -> ApiKey {
    ApiKey {
        name: name.into(),
        sha256: Sha256::digest(secret.as_bytes()).into(),
        requests_per_s: 1000,
        burst: 1000,
    }
}

async fn app() -> TestApp {
    let mut config = Config::for_tests();
    config.poll_interval_ms = 50;
    config.api_keys = vec![key("shop", SHOP_KEY), key("blog", BLOG_KEY)];
    config.token_secrets = vec!["test-secret-0123456789".into()];
    TestApp::spawn(config).await
}

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    fn new(app: &TestApp) -> Api {
        Api {
            base: format!("http://{}", app.addr),
            http: reqwest::Client::new(),
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("the server answers");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Starts a short `simulate` task of `owner`: the task and its watch token.
    async fn start(&self, owner: &str, duration_ms: u64) -> (Value, String) {
        let (status, body) = self
            .call(
                "POST",
                "/api/v1/tasks",
                Some(SHOP_KEY),
                Some(json!({"kind": "simulate", "owner": owner,
                    "params": {"duration_ms": duration_ms, "steps": 4}})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        (
            body["task"].clone(),
            body["watch_token"].as_str().unwrap().to_string(),
        )
    }

    async fn token(&self, body: Value) -> String {
        let (status, resp) = self
            .call("POST", "/api/v1/tokens", Some(SHOP_KEY), Some(body))
            .await;
        assert_eq!(status, 201, "{resp}");
        assert!(resp["expires_ms"].as_u64().unwrap() > 0);
        resp["watch_token"].as_str().unwrap().to_string()
    }
}

/// The next `task` message's task (skipping nothing else: fails on another message).
async fn next_task(c: &mut Client) -> app::protocol::Task {
    match c.recv().await {
        ServerMsg::Task { task } => task,
        other => panic!("expected a task message, got {other:?}"),
    }
}

/// Frames that arrive within `ms` (none expected).
async fn quiet(c: &mut Client, ms: u64) -> Option<ServerMsg> {
    timeout(Duration::from_millis(ms), c.recv()).await.ok()
}

#[tokio::test]
async fn the_api_needs_a_known_key() {
    let app = app().await;
    let api = Api::new(&app);
    let (status, body) = api.call("GET", "/api/v1/tasks?owner=a", None, None).await;
    assert_eq!(status, 401);
    assert_eq!(body["code"], "unauthorized");
    let (status, _) = api
        .call("GET", "/api/v1/tasks?owner=a", Some("nope"), None)
        .await;
    assert_eq!(status, 401);
    let (status, body) = api
        .call(
            "POST",
            "/api/v1/tasks",
            Some(SHOP_KEY),
            Some(json!({"kind": "simulate", "params": {"duration_ms": 0, "steps": 1}})),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_params")),
        "{body}"
    );
    let (status, body) = api
        .call(
            "POST",
            "/api/v1/tasks",
            Some(SHOP_KEY),
            Some(json!({"kind": "nope", "params": {}})),
        )
        .await;
    assert_eq!((status, body["code"].as_str()), (400, Some("unknown_kind")));
    let (status, body) = api
        .call("POST", "/api/v1/tasks", Some(SHOP_KEY), Some(json!("x")))
        .await;
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_request")));
    let (status, body) = api
        .call(
            "POST",
            "/api/v1/tasks",
            Some(SHOP_KEY),
            Some(json!({"kind": "simulate", "owner": "o".repeat(129), "params": {}})),
        )
        .await;
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_request")));
    let (status, body) = api
        .call("POST", "/api/v1/tasks", Some(SHOP_KEY), Some(json!({"kind": "simulate", "owner": "a",
            "params": {"duration_ms": 100, "steps": 1}, "webhook": "http://169.254.169.254/latest"})))
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_params")),
        "{body}"
    );
    let (status, body) = api
        .call("GET", "/api/v1/tasks/tnope", Some(SHOP_KEY), None)
        .await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
    app.stop().await;
}

#[tokio::test]
async fn a_task_started_over_the_api_is_watched_read_listed_and_cancelled() {
    let app = app().await;
    let api = Api::new(&app);
    let (task, token) = api.start("alice", 400).await;
    let id = task["id"].as_str().unwrap();
    assert_eq!(task["state"], "queued");
    let mut watcher = Client::connect_token(app.addr, &token).await;
    assert_eq!(watcher.session, "", "a token's welcome has session null");
    let finals = watcher.until_final(id).await;
    assert_eq!(finals.last().unwrap().state, TaskState::Succeeded);
    let (status, got) = api
        .call("GET", &format!("/api/v1/tasks/{id}"), Some(SHOP_KEY), None)
        .await;
    assert_eq!((status, got["state"].as_str()), (200, Some("succeeded")));
    // Cancelling a finished task returns it unchanged.
    let (status, got) = api
        .call(
            "DELETE",
            &format!("/api/v1/tasks/{id}"),
            Some(SHOP_KEY),
            None,
        )
        .await;
    assert_eq!((status, got["state"].as_str()), (200, Some("succeeded")));
    // A long one, cancelled.
    let (long, _) = api.start("alice", 60_000).await;
    let long_id = long["id"].as_str().unwrap();
    let (status, got) = api
        .call(
            "DELETE",
            &format!("/api/v1/tasks/{long_id}"),
            Some(SHOP_KEY),
            None,
        )
        .await;
    assert_eq!(
        (status, got["state"].as_str()),
        (200, Some("cancelled")),
        "{got}"
    );
    let (status, list) = api
        .call("GET", "/api/v1/tasks?owner=alice", Some(SHOP_KEY), None)
        .await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = list["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![long_id, id], "newest first");
    // Another key never sees them.
    let (status, _) = api
        .call("GET", &format!("/api/v1/tasks/{id}"), Some(BLOG_KEY), None)
        .await;
    assert_eq!(status, 404);
    let (_, list) = api
        .call("GET", "/api/v1/tasks?owner=alice", Some(BLOG_KEY), None)
        .await;
    assert_eq!(list["tasks"], json!([]));
    app.stop().await;
}

#[tokio::test]
async fn tokens_are_isolated_by_owner_and_from_cookie_sessions() {
    let app = app().await;
    let api = Api::new(&app);
    let alice = api.token(json!({"owner": "alice"})).await;
    let mut a = Client::connect_token(app.addr, &alice).await;
    assert!(a.welcome.is_empty());
    let mut browser = app.client().await;
    let cookie_task = browser
        .start("r1", json!({"duration_ms": 60_000, "steps": 10}))
        .await;
    // Bob's task and the browser's never reach alice; alice's new task does.
    let (bob_task, bob_token) = api.start("bob", 60_000).await;
    let (alice_task, _) = api.start("alice", 60_000).await;
    let seen = next_task(&mut a).await;
    assert_eq!(seen.id, alice_task["id"].as_str().unwrap());
    for other in [bob_task["id"].as_str().unwrap(), cookie_task.id.as_str()] {
        a.send(json!({"type": "subscribe", "task": other})).await;
        let (_, code) = a.error().await;
        assert_eq!(code, "not_found");
    }
    // The browser cannot reach alice's task either.
    browser
        .send(json!({"type": "subscribe", "task": alice_task["id"]}))
        .await;
    loop {
        match browser.recv().await {
            ServerMsg::Error { code, .. } => {
                assert_eq!(code, ErrorCode::NotFound);
                break;
            }
            ServerMsg::Task { task } => assert_eq!(task.id, cookie_task.id),
            other => panic!("{other:?}"),
        }
    }
    // A one-task token sees its task only, and no new task of its owner.
    let mut b = Client::connect_token(app.addr, &bob_token).await;
    assert_eq!(b.welcome.len(), 1);
    api.start("bob", 60_000).await;
    while let Some(msg) = quiet(&mut b, 400).await {
        if let ServerMsg::Task { task } = msg {
            assert_eq!(task.id, bob_task["id"].as_str().unwrap());
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn what_a_token_may_do() {
    let app = app().await;
    let api = Api::new(&app);
    let (task, token) = api.start("carol", 60_000).await;
    let id = task["id"].as_str().unwrap().to_string();
    let mut c = Client::connect_token(app.addr, &token).await;
    c.send(json!({"type": "start", "ref": "s1", "kind": "simulate", "params": {"duration_ms": 10, "steps": 1}})).await;
    assert_eq!(c.error().await, (Some("s1".into()), "forbidden".into()));
    c.send(json!({"type": "cancel", "ref": "c1", "task": id}))
        .await;
    assert_eq!(c.error().await, (Some("c1".into()), "forbidden".into()));
    // A refresh with the same scope has no reply; another scope is refused.
    let same = api.token(json!({"task": id, "ttl_s": 60})).await;
    c.send(json!({"type": "refresh", "token": same})).await;
    let other = api.token(json!({"owner": "carol"})).await;
    c.send(json!({"type": "refresh", "token": other})).await;
    assert_eq!(c.error().await.1, "unauthorized");
    c.send(json!({"type": "refresh", "token": "tw1.garbage.sig"}))
        .await;
    assert_eq!(c.error().await.1, "unauthorized");
    // With `cancel`, the token cancels.
    let canceller = api.token(json!({"task": id, "cancel": true})).await;
    let mut k = Client::connect_token(app.addr, &canceller).await;
    k.send(json!({"type": "cancel", "ref": "c2", "task": id}))
        .await;
    let finals = k.until_final(&id).await;
    assert_eq!(finals.last().unwrap().state, TaskState::Cancelled);
    app.stop().await;
}

#[tokio::test]
async fn bad_and_expired_tokens_are_refused_and_expiry_closes_with_1008() {
    let app = app().await;
    let api = Api::new(&app);
    for bad in ["nope", "tw1.e30.AAAA"] {
        let err = tokio_tungstenite::connect_async(format!("ws://{}/ws?token={bad}", app.addr))
            .await
            .expect_err("refused before the upgrade");
        match err {
            tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 401),
            other => panic!("{other:?}"),
        }
        let (status, _) = api
            .call("GET", &format!("/sse?token={bad}"), None, None)
            .await;
        assert_eq!(status, 401);
    }
    let short = api.token(json!({"owner": "dave", "ttl_s": 1})).await;
    let mut c = Client::connect_token(app.addr, &short).await;
    let (reference, code) = c.error().await;
    assert_eq!((reference, code.as_str()), (None, "unauthorized"));
    match c.recv_frame().await {
        Some(tokio_tungstenite::tungstenite::Message::Close(Some(frame))) => {
            assert_eq!(u16::from(frame.code), 1008)
        }
        other => panic!("expected close 1008, got {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let err = tokio_tungstenite::connect_async(format!("ws://{}/ws?token={short}", app.addr))
        .await
        .expect_err("an expired token is refused");
    assert!(matches!(err, tokio_tungstenite::tungstenite::Error::Http(r) if r.status() == 401));
    app.stop().await;
}

#[tokio::test]
async fn server_sent_events_by_token_and_by_cookie() {
    let app = app().await;
    let api = Api::new(&app);
    let (task, token) = api.start("erin", 300).await;
    let id = task["id"].as_str().unwrap().to_string();
    let mut resp = reqwest::get(format!("http://{}/sse?token={token}", app.addr))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let events = common::sse_events(&mut resp, |name, v| {
        name == "task" && v["task"]["state"] == "succeeded"
    })
    .await;
    assert_eq!(events[0].name, "welcome");
    assert_eq!(events[0].data["session"], Value::Null);
    assert!(events[1..]
        .iter()
        .all(|e| e.name == "task" && e.data["task"]["id"] == id.as_str()));
    // By cookie: the session's tasks, as on the WebSocket.
    let mut browser = app.client().await;
    let t = browser
        .start("r1", json!({"duration_ms": 300, "steps": 3}))
        .await;
    let mut resp = reqwest::Client::new()
        .get(format!("http://{}/sse", app.addr))
        .header("cookie", format!("taskwire_session={}", browser.session))
        .send()
        .await
        .unwrap();
    let events = common::sse_events(&mut resp, |name, v| {
        name == "task" && v["task"]["state"] == "succeeded"
    })
    .await;
    assert_eq!(events[0].data["session"], browser.session.as_str());
    assert!(events
        .iter()
        .skip(1)
        .all(|e| e.data["task"]["id"] == t.id.as_str()));
    // Another origin is not allowed by default.
    let resp = reqwest::Client::new()
        .get(format!("http://{}/sse?token={token}", app.addr))
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    app.stop().await;
}

#[tokio::test]
async fn every_tab_of_a_session_sees_a_task_started_in_another() {
    let app = app().await;
    let mut first = app.client().await;
    let mut second = Client::connect(app.addr, Some(&first.session)).await;
    let task = first
        .start("r1", json!({"duration_ms": 300, "steps": 3}))
        .await;
    let seen = next_task(&mut second).await;
    assert_eq!(seen.id, task.id);
    let finals = second.until_final(&task.id).await;
    assert_eq!(finals.last().unwrap().state, TaskState::Succeeded);
    app.stop().await;
}

/// A receiver of webhooks on port 0: answers 500 to the first `fail` POSTs.
async fn receiver(
    fail: usize,
) -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<(axum::http::HeaderMap, String)>>>,
) {
    use axum::routing::post;
    let hits = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/hooks/{*rest}",
        post(move |headers: axum::http::HeaderMap, body: String| {
            let h = h.clone();
            async move {
                let mut hits = h.lock().unwrap();
                hits.push((headers, body));
                if hits.len() <= fail {
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    axum::http::StatusCode::NO_CONTENT
                }
            }
        }),
    );
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", tcp.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(tcp, app).await });
    (base, hits)
}

#[tokio::test]
async fn webhooks_of_api_tasks_and_of_kinds_are_signed_and_retried() {
    let (base, hits) = receiver(2).await;
    let mut config = Config::for_tests();
    config.poll_interval_ms = 50;
    config.api_keys = vec![key("shop", SHOP_KEY)];
    config.webhooks = Some(server::webhook::WebhookSettings {
        secret: "hook-secret-0123456789".into(),
        allow: vec![format!("{base}/hooks/")],
        retry_initial_ms: 20,
        retry_max_ms: 50,
        ..Default::default()
    });
    let simulate = server::config::file::KindSpec {
        info: app::kinds::simulate_kind(),
        backend: 0,
        remote: "simulate".into(),
        webhook: Some(format!("{base}/hooks/kind")),
    };
    config.kinds = vec![simulate];
    let app = TestApp::spawn(config).await;
    let api = Api::new(&app);
    let (status, body) = api
        .call("POST", "/api/v1/tasks", Some(SHOP_KEY), Some(json!({"kind": "simulate", "owner": "o",
            "params": {"duration_ms": 200, "steps": 2}, "webhook": "http://127.0.0.1:1/elsewhere"})))
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_params")),
        "{body}"
    );
    let (status, body) = api
        .call("POST", "/api/v1/tasks", Some(SHOP_KEY), Some(json!({"kind": "simulate", "owner": "o",
            "params": {"duration_ms": 200, "steps": 2}, "webhook": format!("{base}/hooks/api?x=1")})))
        .await;
    assert_eq!(status, 201, "{body}");
    let id = body["task"]["id"].as_str().unwrap().to_string();
    // Failed twice, then delivered: three POSTs with one delivery id.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while hits.lock().unwrap().len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "webhook not delivered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = hits.lock().unwrap().clone();
    let ids: Vec<&str> = got
        .iter()
        .map(|(h, _)| h["x-taskwire-delivery"].to_str().unwrap())
        .collect();
    assert!(ids.iter().all(|d| *d == ids[0]), "{ids:?}");
    let (headers, body) = &got[2];
    let sent: Value = serde_json::from_str(body).unwrap();
    assert_eq!(
        (sent["type"].as_str(), sent["task"]["id"].as_str()),
        (Some("task"), Some(id.as_str()))
    );
    assert_eq!(sent["task"]["state"], "succeeded");
    use hmac::Mac;
    let ts = headers["x-taskwire-timestamp"].to_str().unwrap();
    let mut mac = hmac::Hmac::<Sha256>::new_from_slice(b"hook-secret-0123456789").unwrap();
    mac.update(format!("{ts}.{body}").as_bytes());
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        headers["x-taskwire-signature"].to_str().unwrap(),
        format!("sha256={hex}")
    );
    // A browser's task of a kind with a webhook: delivered too.
    let mut browser = app.client().await;
    let t = browser
        .start("r1", json!({"duration_ms": 200, "steps": 2}))
        .await;
    browser.until_final(&t.id).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let found = hits.lock().unwrap().iter().any(|(_, b)| b.contains(&t.id));
        if found {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "kind webhook not delivered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.stop().await;
}
