//! The declarative HTTP adapter against a real job service on a real
//! socket: a small axum app with an in-memory job store, shaped like a
//! typical JSON job API (and, for the preset, like AIP-151 operations).
//! The test moves jobs along by hand, so every poll's answer is known.
//! Every request is bounded by the adapter's timeout.

use app::protocol::{ErrorCode, TaskState};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};
use server::backend::declarative::{DeclarativeBackend, HttpSpec};
use server::backend::BackendError;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(2);

/// The answer shapes the service speaks.
#[derive(Clone, Copy, PartialEq)]
enum Shape {
    /// `{metadata: {state, done, total, message, update_time}, response?, error?}`
    Jobs,
    /// AIP-151: `{name, done?, metadata: {progressPercent, updateTime}, response? | error?}`
    Lro,
}

#[derive(Clone, Default)]
struct Job {
    /// None: left out of the answer.
    state: Option<Value>,
    done: Option<Value>,
    total: Option<Value>,
    message: Option<String>,
    response: Option<Value>,
    error: Option<String>,
    update_time: Option<Value>,
}

/// Per-test knobs: what the next answers look like.
#[derive(Clone, Default)]
struct Knobs {
    /// Answer this status (and a small JSON body) instead.
    force: Option<(u16, &'static str)>,
    retry_after: Option<&'static str>,
    non_json: bool,
    delay: Option<Duration>,
}

#[derive(Default)]
struct Seen {
    /// Raw request targets, as sent on the wire.
    targets: Vec<String>,
    authorization: Vec<Option<String>>,
    bodies: Vec<Value>,
}

struct Service {
    shape: Shape,
    jobs: Mutex<HashMap<String, Job>>,
    next: Mutex<u64>,
    knobs: Mutex<Knobs>,
    seen: Mutex<Seen>,
}

impl Service {
    fn job(&self, id: &str, f: impl FnOnce(&mut Job)) {
        f(self.jobs.lock().unwrap().get_mut(id).expect("known job"));
    }

    fn insert(&self, id: &str, job: Job) {
        self.jobs.lock().unwrap().insert(id.to_string(), job);
    }

    fn knobs(&self, knobs: Knobs) {
        *self.knobs.lock().unwrap() = knobs;
    }

    fn last_target(&self) -> String {
        self.seen
            .lock()
            .unwrap()
            .targets
            .last()
            .cloned()
            .unwrap_or_default()
    }

    fn requests(&self) -> usize {
        self.seen.lock().unwrap().targets.len()
    }

    fn body_of(&self, job: &Job) -> Value {
        let mut meta = serde_json::Map::new();
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                meta.insert(k.to_string(), v);
            }
        };
        match self.shape {
            Shape::Jobs => {
                put("state", job.state.clone());
                put("done", job.done.clone());
                put("total", job.total.clone());
                put("message", job.message.clone().map(Value::from));
                put("update_time", job.update_time.clone());
                let mut body = json!({ "metadata": meta });
                if let Some(r) = &job.response {
                    body["response"] = r.clone();
                }
                if let Some(e) = &job.error {
                    body["error"] = json!({ "code": 13, "message": e });
                }
                body
            }
            Shape::Lro => {
                let (done, total) = (
                    job.done.as_ref().and_then(Value::as_u64).unwrap_or(0),
                    job.total.as_ref().and_then(Value::as_u64).unwrap_or(0),
                );
                if total > 0 {
                    put(
                        "progressPercent",
                        Some(json!(done as f64 * 100.0 / total as f64)),
                    );
                }
                put("updateTime", job.update_time.clone());
                put("state", job.state.clone());
                let mut body = json!({ "metadata": meta });
                // proto3 JSON: `done: false` is left out.
                if job.response.is_some() || job.error.is_some() {
                    body["done"] = json!(true);
                }
                if let Some(r) = &job.response {
                    body["response"] = r.clone();
                }
                if let Some(e) = &job.error {
                    body["error"] = json!({ "code": 13, "message": e });
                }
                body
            }
        }
    }
}

async fn handle(
    State(svc): State<Arc<Service>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let target = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    {
        let mut seen = svc.seen.lock().unwrap();
        seen.targets.push(target.clone());
        seen.authorization.push(
            headers
                .get("authorization")
                .map(|v| v.to_str().unwrap().to_string()),
        );
        seen.bodies.push(body.clone());
    }
    let knobs = svc.knobs.lock().unwrap().clone();
    if let Some(d) = knobs.delay {
        tokio::time::sleep(d).await;
    }
    if let Some((code, text)) = knobs.force {
        let mut resp = (
            StatusCode::from_u16(code).unwrap(),
            [("content-type", "application/json")],
            text,
        )
            .into_response();
        if let Some(r) = knobs.retry_after {
            resp.headers_mut().insert("retry-after", r.parse().unwrap());
        }
        return resp;
    }
    if knobs.non_json {
        return (StatusCode::OK, "<html>maintenance</html>").into_response();
    }

    let path = decode(uri.path());
    let Some(rest) = path.strip_prefix("/v1/") else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let json_ok = |v: Value| (StatusCode::OK, axum::Json(v)).into_response();
    match (method, rest) {
        (Method::POST, "jobs" | "things:run") => {
            let input = &body[if svc.shape == Shape::Jobs {
                "input"
            } else {
                "n"
            }];
            if input
                .get("n")
                .and_then(Value::as_i64)
                .is_some_and(|n| n <= 0)
            {
                let text = json!({"error": {"code": 400, "message": "input.n must be positive"}});
                return (StatusCode::BAD_REQUEST, axum::Json(text)).into_response();
            }
            let n = {
                let mut next = svc.next.lock().unwrap();
                *next += 1;
                *next
            };
            let name = match svc.shape {
                Shape::Jobs => format!("jobs/{n}"),
                Shape::Lro => format!("operations/{n}"),
            };
            let state = (svc.shape == Shape::Jobs).then(|| json!("PENDING"));
            svc.insert(
                &name,
                Job {
                    state,
                    done: Some(json!(0)),
                    ..Job::default()
                },
            );
            json_ok(json!({ "name": name }))
        }
        (Method::POST, rest) if rest.ends_with(":cancel") => {
            let id = rest.trim_end_matches(":cancel");
            let mut jobs = svc.jobs.lock().unwrap();
            let Some(job) = jobs.get_mut(id) else {
                return StatusCode::NOT_FOUND.into_response();
            };
            match svc.shape {
                Shape::Jobs => {
                    job.state = Some(json!("CANCELLED"));
                    let job = job.clone();
                    drop(jobs);
                    json_ok(svc.body_of(&job))
                }
                // CancelOperation answers Empty; the operation ends later.
                Shape::Lro => {
                    job.state = Some(json!("CANCELLED"));
                    job.error = Some("Operation was cancelled.".into());
                    json_ok(json!({}))
                }
            }
        }
        (Method::GET, id) => {
            let job = svc.jobs.lock().unwrap().get(id).cloned();
            match job {
                Some(job) => json_ok(svc.body_of(&job)),
                None => (
                    StatusCode::NOT_FOUND,
                    axum::Json(json!({"error": "no such job"})),
                )
                    .into_response(),
            }
        }
        _ => StatusCode::METHOD_NOT_ALLOWED.into_response(),
    }
}

fn decode(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(byte) = u8::from_str_radix(&path[i + 1..i + 3], 16) {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

async fn spawn(shape: Shape) -> (Arc<Service>, String) {
    let svc = Arc::new(Service {
        shape,
        jobs: Mutex::default(),
        next: Mutex::default(),
        knobs: Mutex::default(),
        seen: Mutex::default(),
    });
    let app = Router::new().fallback(handle).with_state(svc.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (svc, url)
}

/// How the integrator embeds the spec: flattened into a `[[backend]]` table.
#[derive(Deserialize)]
struct ConfigFile {
    backend: Vec<BackendEntry>,
}

#[derive(Deserialize)]
struct BackendEntry {
    name: String,
    adapter: String,
    timeout_ms: Option<u64>,
    #[serde(flatten)]
    spec: HttpSpec,
}

const JOBS_CONFIG: &str = r#"
[[backend]]
name = "jobs"
adapter = "http"
timeout_ms = 2000
url = "URL"
headers = { Authorization = "Bearer t0ken" }
start  = { method = "POST", path = "/v1/jobs", body = { type = "{kind}", input = "{params}" }, id = "/name" }
status = { method = "GET", path = "/v1/{id}" }
cancel = { method = "POST", path = "/v1/{id}:cancel" }
[backend.fields]
state = "/metadata/state"
done = "/metadata/done"
total = "/metadata/total"
message = "/metadata/message"
result = "/response"
error = "/error/message"
changed_at = "/metadata/update_time"
[backend.states]
PENDING = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
"#;

fn backend_from(config: &str, url: &str) -> DeclarativeBackend {
    let file: ConfigFile = toml::from_str(&config.replace("URL", url)).expect("config parses");
    let entry = file.backend.into_iter().next().unwrap();
    assert_eq!(entry.adapter, "http");
    entry.spec.validate().expect("valid");
    let timeout = entry
        .timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(TIMEOUT);
    DeclarativeBackend::new(&entry.spec, timeout)
        .unwrap()
        .with_name(entry.name)
}

async fn jobs() -> (Arc<Service>, DeclarativeBackend) {
    let (svc, url) = spawn(Shape::Jobs).await;
    (svc.clone(), backend_from(JOBS_CONFIG, &url))
}

#[tokio::test]
async fn a_job_runs_to_succeeded_with_rising_progress() {
    let (svc, b) = jobs().await;
    let params = json!({"n": 3, "tags": ["x"], "nested": {"f": 1.5}});
    let id = b.start("report", &params).await.unwrap();
    assert_eq!(id, "jobs/1");
    {
        let seen = svc.seen.lock().unwrap();
        assert_eq!(seen.targets, ["/v1/jobs"]);
        assert_eq!(
            seen.bodies[0],
            json!({"type": "report", "input": params}),
            "{{params}} as a JSON object"
        );
        assert_eq!(seen.authorization[0].as_deref(), Some("Bearer t0ken"));
    }

    let s = b.status(&id).await.unwrap();
    assert_eq!(
        (s.id.as_str(), s.state, s.done, s.total),
        ("jobs/1", TaskState::Queued, 0, None)
    );
    let mut last_done = 0;
    for done in 1..=3 {
        svc.job(&id, |j| {
            j.state = Some(json!("RUNNING"));
            j.done = Some(json!(done));
            j.total = Some(json!("3")); // int64 as a string, as Google APIs send it
            j.message = Some(format!("step {done}"));
        });
        let s = b.status(&id).await.unwrap();
        assert_eq!((s.state, s.total), (TaskState::Running, Some(3)));
        assert!(s.done > last_done);
        last_done = s.done;
        assert_eq!(s.message, Some(format!("step {done}")));
        assert_eq!(s.result, None);
    }
    svc.job(&id, |j| {
        j.state = Some(json!("SUCCEEDED"));
        j.response = Some(json!({"rows": 3}));
    });
    let s = b.status(&id).await.unwrap();
    assert_eq!((s.state, s.done), (TaskState::Succeeded, 3));
    assert_eq!(s.result, Some(json!({"rows": 3})));
    assert_eq!(s.error, None);
    assert!(svc
        .seen
        .lock()
        .unwrap()
        .authorization
        .iter()
        .all(|a| a.as_deref() == Some("Bearer t0ken")));
}

#[tokio::test]
async fn a_failed_job_reports_its_error_text() {
    let (svc, b) = jobs().await;
    let id = b.start("report", &json!({})).await.unwrap();
    svc.job(&id, |j| {
        j.state = Some(json!("FAILED"));
        j.error = Some("disk full".into());
    });
    let s = b.status(&id).await.unwrap();
    assert_eq!(
        (s.state, s.error.as_deref(), s.result),
        (TaskState::Failed, Some("disk full"), None)
    );
}

#[tokio::test]
async fn a_refused_start_is_rejected_with_the_services_reason() {
    let (svc, b) = jobs().await;
    match b.start("report", &json!({"n": 0})).await {
        Err(BackendError::Rejected { code, message }) => {
            assert_eq!(code, ErrorCode::InvalidParams);
            assert_eq!(message, "input.n must be positive");
        }
        other => panic!("{other:?}"),
    }
    svc.knobs(Knobs {
        force: Some((422, r#"{"message": "type is not known"}"#)),
        ..Knobs::default()
    });
    match b.start("nope", &json!({})).await {
        Err(BackendError::Rejected { code, message }) => {
            assert_eq!(
                (code, message.as_str()),
                (ErrorCode::InvalidParams, "type is not known")
            );
        }
        other => panic!("{other:?}"),
    }
    // Another 4xx on start breaks the contract.
    svc.knobs(Knobs {
        force: Some((401, "{}")),
        ..Knobs::default()
    });
    let e = b.start("report", &json!({})).await.unwrap_err();
    assert!(
        matches!(&e, BackendError::Protocol(m) if m.contains("401")),
        "{e:?}"
    );
}

#[tokio::test]
async fn cancel_reads_the_answer_as_a_status() {
    let (svc, b) = jobs().await;
    let id = b.start("report", &json!({})).await.unwrap();
    svc.job(&id, |j| j.state = Some(json!("RUNNING")));
    let before = svc.requests();
    let s = b.cancel(&id).await.unwrap();
    assert_eq!((s.id.as_str(), s.state), ("jobs/1", TaskState::Cancelled));
    assert_eq!(
        svc.requests(),
        before + 1,
        "a cancel answer with a state needs no poll"
    );
    assert_eq!(svc.last_target(), "/v1/jobs%2F1:cancel");
}

#[tokio::test]
async fn without_a_cancel_spec_cancel_is_refused() {
    let (svc, url) = spawn(Shape::Jobs).await;
    let config = JOBS_CONFIG.replace(
        "cancel = { method = \"POST\", path = \"/v1/{id}:cancel\" }\n",
        "",
    );
    let b = backend_from(&config, &url);
    let id = b.start("report", &json!({})).await.unwrap();
    let before = svc.requests();
    match b.cancel(&id).await {
        Err(BackendError::Rejected { code, message }) => {
            assert_eq!(code, ErrorCode::BadRequest);
            assert!(
                message.contains("backend `jobs` has no cancel"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(svc.requests(), before, "nothing is sent");
}

#[tokio::test]
async fn an_unmapped_or_missing_state_is_out_of_contract() {
    let (svc, b) = jobs().await;
    let id = b.start("report", &json!({})).await.unwrap();
    svc.job(&id, |j| j.state = Some(json!("PAUSED")));
    match b.status(&id).await {
        Err(BackendError::Protocol(m)) => {
            assert!(
                m.contains("`PAUSED`") && m.contains("/metadata/state"),
                "{m}"
            )
        }
        other => panic!("{other:?}"),
    }
    svc.job(&id, |j| j.state = None);
    match b.status(&id).await {
        Err(BackendError::Protocol(m)) => {
            assert!(m.contains("no state at `/metadata/state`"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    svc.knobs(Knobs {
        non_json: true,
        ..Knobs::default()
    });
    match b.status(&id).await {
        Err(BackendError::Protocol(m)) => assert!(m.contains("not JSON"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn missing_optional_fields_are_none() {
    let (svc, b) = jobs().await;
    let id = b.start("report", &json!({})).await.unwrap();
    svc.job(&id, |j| {
        *j = Job {
            state: Some(json!("SUCCEEDED")),
            ..Job::default()
        }
    });
    let s = b.status(&id).await.unwrap();
    assert_eq!(
        (s.state, s.done, s.total, s.message, s.result, s.error),
        (TaskState::Succeeded, 0, None, None, None, None)
    );
    assert!(s.changed_at_ms > 0, "stamped by the server's clock");
}

#[tokio::test]
async fn an_unknown_job_is_not_found() {
    let (svc, b) = jobs().await;
    assert!(matches!(
        b.status("jobs/404").await,
        Err(BackendError::NotFound)
    ));
    assert!(matches!(
        b.cancel("jobs/404").await,
        Err(BackendError::NotFound)
    ));
    svc.knobs(Knobs {
        force: Some((404, "{}")),
        ..Knobs::default()
    });
    // 404 on start is not "lost": it is a misconfigured path.
    assert!(matches!(
        b.start("x", &json!({})).await,
        Err(BackendError::Protocol(_))
    ));
}

#[tokio::test]
async fn an_outage_is_unavailable() {
    let (svc, b) = jobs().await;
    let id = b.start("report", &json!({})).await.unwrap();
    svc.knobs(Knobs {
        force: Some((503, "{}")),
        retry_after: Some("7"),
        ..Knobs::default()
    });
    match b.status(&id).await {
        Err(BackendError::Unavailable {
            kind, retry_after, ..
        }) => {
            assert_eq!(
                (kind, retry_after),
                ("http_503", Some(Duration::from_secs(7)))
            );
        }
        other => panic!("{other:?}"),
    }
    svc.knobs(Knobs {
        force: Some((500, "{}")),
        ..Knobs::default()
    });
    assert!(matches!(
        b.status(&id).await,
        Err(BackendError::Unavailable {
            kind: "http_5xx",
            ..
        })
    ));
    assert!(matches!(
        b.start("x", &json!({})).await,
        Err(BackendError::Unavailable { .. })
    ));
    assert!(matches!(
        b.cancel(&id).await,
        Err(BackendError::Unavailable { .. })
    ));
    svc.knobs(Knobs {
        force: Some((429, "{}")),
        ..Knobs::default()
    });
    assert!(matches!(
        b.status(&id).await,
        Err(BackendError::Unavailable {
            kind: "http_429",
            ..
        })
    ));

    // Slow: the timeout.
    let (svc, url) = spawn(Shape::Jobs).await;
    let file: ConfigFile = toml::from_str(&JOBS_CONFIG.replace("URL", &url)).unwrap();
    let slow = DeclarativeBackend::new(&file.backend[0].spec, Duration::from_millis(200)).unwrap();
    svc.insert(
        "jobs/1",
        Job {
            state: Some(json!("RUNNING")),
            ..Job::default()
        },
    );
    svc.knobs(Knobs {
        delay: Some(Duration::from_secs(5)),
        ..Knobs::default()
    });
    let began = std::time::Instant::now();
    assert!(matches!(
        slow.status("jobs/1").await,
        Err(BackendError::Unavailable {
            kind: "timeout",
            ..
        })
    ));
    assert!(began.elapsed() < Duration::from_secs(2));

    // Nobody listening.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let gone = backend_from(JOBS_CONFIG, &format!("http://{addr}"));
    assert!(matches!(
        gone.status("jobs/1").await,
        Err(BackendError::Unavailable {
            kind: "refused",
            ..
        })
    ));
}

#[tokio::test]
async fn ids_are_percent_encoded_in_paths() {
    let (svc, b) = jobs().await;
    let id = "jobs/a b?c#d%e:f";
    svc.insert(
        id,
        Job {
            state: Some(json!("RUNNING")),
            ..Job::default()
        },
    );
    let s = b.status(id).await.unwrap();
    assert_eq!((s.id.as_str(), s.state), (id, TaskState::Running));
    assert_eq!(svc.last_target(), "/v1/jobs%2Fa%20b%3Fc%23d%25e%3Af");
    let s = b.cancel(id).await.unwrap();
    assert_eq!(s.state, TaskState::Cancelled);
    assert_eq!(svc.last_target(), "/v1/jobs%2Fa%20b%3Fc%23d%25e%3Af:cancel");
}

#[tokio::test]
async fn changed_at_is_stable_until_progress_moves() {
    let (svc, b) = jobs().await;
    let id = b.start("report", &json!({})).await.unwrap();
    svc.job(&id, |j| {
        j.state = Some(json!("RUNNING"));
        j.done = Some(json!(1));
        j.total = Some(json!(5));
    });
    let first = b.status(&id).await.unwrap().changed_at_ms;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let again = b.status(&id).await.unwrap();
    assert_eq!(again.changed_at_ms, first, "nothing changed");
    svc.job(&id, |j| j.message = Some("only the message".into()));
    assert_eq!(b.status(&id).await.unwrap().changed_at_ms, first);
    svc.job(&id, |j| j.done = Some(json!(2)));
    let moved = b.status(&id).await.unwrap().changed_at_ms;
    assert!(moved >= first + 20, "{first} -> {moved}");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(b.status(&id).await.unwrap().changed_at_ms, moved);
}

#[tokio::test]
async fn changed_at_is_read_as_rfc3339_or_unix_ms() {
    let (svc, b) = jobs().await;
    let id = b.start("report", &json!({})).await.unwrap();
    svc.job(&id, |j| {
        j.state = Some(json!("RUNNING"));
        j.update_time = Some(json!("2025-11-29T07:06:42.5+01:00"));
    });
    assert_eq!(
        b.status(&id).await.unwrap().changed_at_ms,
        1_764_396_402_500
    );
    svc.job(&id, |j| j.update_time = Some(json!("2025-11-29T06:06:43Z")));
    assert_eq!(
        b.status(&id).await.unwrap().changed_at_ms,
        1_764_396_403_000
    );
    svc.job(&id, |j| j.update_time = Some(json!(1_764_396_404_000u64)));
    assert_eq!(
        b.status(&id).await.unwrap().changed_at_ms,
        1_764_396_404_000
    );
    svc.job(&id, |j| j.update_time = Some(json!("last tuesday")));
    match b.status(&id).await {
        Err(BackendError::Protocol(m)) => assert!(m.contains("/metadata/update_time"), "{m}"),
        other => panic!("{other:?}"),
    }
}

const LRO_CONFIG: &str = r#"
[[backend]]
name = "vertex-ish"
adapter = "http"
url = "URL"
preset = "google-lro"
headers = { Authorization = "Bearer lro-token" }
start = { path = "/v1/things:run", body = { n = "{params}", label = "{kind} job" } }
"#;

#[tokio::test]
async fn google_lro_operations_through_the_preset() {
    let (svc, url) = spawn(Shape::Lro).await;
    let b = backend_from(LRO_CONFIG, &url);
    let id = b.start("render", &json!({"frames": 4})).await.unwrap();
    assert_eq!(id, "operations/1");
    assert_eq!(
        svc.seen.lock().unwrap().bodies[0],
        json!({"n": {"frames": 4}, "label": "render job"})
    );

    // No `done` yet: running, no progress known.
    let s = b.status(&id).await.unwrap();
    assert_eq!((s.state, s.done, s.total), (TaskState::Running, 0, None));
    assert_eq!(
        svc.last_target(),
        "/v1/operations/1",
        "{{+id}} keeps the resource path"
    );
    svc.job(&id, |j| {
        j.done = Some(json!(1));
        j.total = Some(json!(3));
        j.update_time = Some(json!("2025-11-29T06:06:42.123456Z"));
    });
    let s = b.status(&id).await.unwrap();
    assert_eq!(
        (s.state, s.done, s.total),
        (TaskState::Running, 33, Some(100))
    );
    assert_eq!(s.changed_at_ms, 1_764_396_402_123);
    svc.job(&id, |j| {
        j.response = Some(json!({"@type": "x.Result", "frames": 4}))
    });
    let s = b.status(&id).await.unwrap();
    assert_eq!(s.state, TaskState::Succeeded);
    assert_eq!(s.result, Some(json!({"@type": "x.Result", "frames": 4})));

    let failing = b.start("render", &json!({})).await.unwrap();
    svc.job(&failing, |j| j.error = Some("quota exceeded".into()));
    let s = b.status(&failing).await.unwrap();
    assert_eq!(
        (s.state, s.error.as_deref()),
        (TaskState::Failed, Some("quota exceeded"))
    );

    // CancelOperation answers `{}`: the adapter polls once. A cancelled
    // operation is `done` with an error; without a state it reads as failed.
    let cancelled = b.start("render", &json!({})).await.unwrap();
    let before = svc.requests();
    let s = b.cancel(&cancelled).await.unwrap();
    assert_eq!(svc.requests(), before + 2, "cancel, then one poll");
    assert_eq!(
        (s.state, s.error.as_deref()),
        (TaskState::Failed, Some("Operation was cancelled."))
    );
    assert!(svc
        .seen
        .lock()
        .unwrap()
        .targets
        .contains(&format!("/v1/{cancelled}:cancel")));
    assert!(svc
        .seen
        .lock()
        .unwrap()
        .authorization
        .iter()
        .all(|a| a.as_deref() == Some("Bearer lro-token")));

    // An API whose metadata has a state maps it: then a cancel reads as cancelled.
    let config = format!("{LRO_CONFIG}[backend.fields]\nstate = \"/metadata/state\"\n[backend.states]\nCANCELLED = \"cancelled\"\n");
    let b = backend_from(&config, &url);
    let id = b.start("render", &json!({})).await.unwrap();
    assert_eq!(b.status(&id).await.unwrap().state, TaskState::Running);
    assert_eq!(b.cancel(&id).await.unwrap().state, TaskState::Cancelled);
}

#[test]
fn the_documented_configurations_are_valid() {
    let doc = include_str!("../../docs/http-adapter.md");
    let blocks: Vec<&str> = doc
        .split("```toml\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .collect();
    assert_eq!(blocks.len(), 2);
    for block in blocks {
        let file: ConfigFile = toml::from_str(block).expect("parses");
        for entry in file.backend {
            entry
                .spec
                .validate()
                .unwrap_or_else(|e| panic!("{}: {e}", entry.name));
        }
    }
}

#[tokio::test]
async fn pipelined_status_polls_carry_the_headers_and_get_their_own_answers() {
    let (svc, url) = spawn(Shape::Jobs).await;
    let b = backend_from(JOBS_CONFIG, &url).with_pipeline(4, 8);
    let mut ids = Vec::new();
    for i in 0..10u64 {
        let id = b.start("report", &json!({"n": i + 1})).await.unwrap();
        svc.job(&id, |j| {
            j.state = Some(json!("RUNNING"));
            j.done = Some(json!(i));
            j.total = Some(json!(10));
        });
        ids.push(id);
    }
    // All at once: they go out pipelined, up to 4 per write.
    let answers = futures::future::join_all(ids.iter().map(|id| b.status(id))).await;
    for (i, (id, answer)) in ids.iter().zip(answers).enumerate() {
        let s = answer.unwrap();
        assert_eq!((s.id.as_str(), s.done), (id.as_str(), i as u64));
    }
    let seen = svc.seen.lock().unwrap();
    assert_eq!(
        seen.targets.len(),
        20,
        "10 starts, 10 polls: {:?}",
        seen.targets
    );
    assert!(seen
        .authorization
        .iter()
        .all(|a| a.as_deref() == Some("Bearer t0ken")));
}
