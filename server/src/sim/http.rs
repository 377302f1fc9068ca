//! The simulator as a standalone task service: the routes of the
//! task-service API (docs/protocol.md, plus `GET /stats`) over a [`Simulator`]. The wall clock is read
//! here and only here, then passed into the model.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::{SimError, SimStats, Simulator};
use crate::task_api::{RejectBody, RejectCode, StartRequest, StartResponse};

/// Seconds a client is told to wait (`Retry-After`) when the simulator is full.
pub const RETRY_AFTER_FULL_S: u64 = 1;

/// The task-service routes over `sim`.
pub fn router(sim: Arc<Simulator>) -> Router {
    Router::new()
        .route("/tasks", post(start_task))
        .route("/tasks/{id}", get(get_task).delete(cancel_task))
        .route("/stats", get(stats))
        .with_state(sim)
}

/// Serves [`router`] on `listener` until `shutdown` completes, then lets the
/// requests in flight finish. `latency`: every `/tasks` request is answered
/// that much later (a slow task service, for benchmarks; zero: none).
pub async fn serve(
    listener: tokio::net::TcpListener,
    sim: Arc<Simulator>,
    latency: std::time::Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = if latency.is_zero() {
        router(sim)
    } else {
        router(sim).layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| async move {
                if req.uri().path().starts_with("/tasks") {
                    tokio::time::sleep(latency).await;
                }
                next.run(req).await
            },
        ))
    };
    // No Nagle delay: answers to pipelined requests are written one by
    // one, and the second must not wait for the client's ACK of the first.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Now, in Unix epoch ms. A clock before 1970 reads as 0.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The body of a `404` or `503`.
#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(ErrorBody { error: "not found" }),
    )
        .into_response()
}

fn reject(code: RejectCode, error: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(RejectBody { code, error })).into_response()
}

/// `POST /tasks`. The body is parsed here rather than by the `Json`
/// extractor so that every malformed body gets the contract's `400` shape.
#[tracing::instrument(level = "debug", skip_all)]
async fn start_task(State(sim): State<Arc<Simulator>>, body: Bytes) -> Response {
    let request: StartRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return reject(
                RejectCode::InvalidParams,
                format!(
                    "the body must be a JSON object {{\"kind\": string, \"params\": object}}: {e}"
                ),
            )
        }
    };
    match sim.start(&request.kind, &request.params, now_ms()) {
        Ok(id) => {
            tracing::debug!(%id, kind = %request.kind, "task started");
            (StatusCode::CREATED, Json(StartResponse { id })).into_response()
        }
        Err(e @ SimError::UnknownKind(_)) => reject(RejectCode::UnknownKind, e.to_string()),
        Err(e @ SimError::InvalidParams(_)) => reject(RejectCode::InvalidParams, e.to_string()),
        Err(e @ SimError::Full) => {
            tracing::warn!("simulator full, start refused");
            let error = e.to_string();
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, RETRY_AFTER_FULL_S.to_string())],
                Json(ErrorBody { error: &error }),
            )
                .into_response()
        }
    }
}

/// `GET /tasks/{id}`.
#[tracing::instrument(level = "debug", skip_all, fields(id = %id))]
async fn get_task(State(sim): State<Arc<Simulator>>, Path(id): Path<String>) -> Response {
    match sim.status(&id, now_ms()) {
        Some(status) => Json(status).into_response(),
        None => not_found(),
    }
}

/// `DELETE /tasks/{id}`.
#[tracing::instrument(level = "debug", skip_all, fields(id = %id))]
async fn cancel_task(State(sim): State<Arc<Simulator>>, Path(id): Path<String>) -> Response {
    match sim.cancel(&id, now_ms()) {
        Some(status) => Json(status).into_response(),
        None => not_found(),
    }
}

#[derive(Deserialize)]
struct StatsQuery {
    per_task: Option<String>,
}

#[derive(Serialize)]
struct StatsBody {
    #[serde(flatten)]
    stats: SimStats,
    /// Polls by task id, only with `?per_task=1`: it is as long as the task list.
    #[serde(skip_serializing_if = "Option::is_none")]
    per_task: Option<BTreeMap<String, u64>>,
}

/// `GET /stats`, `GET /stats?per_task=1`.
#[tracing::instrument(level = "debug", skip_all)]
async fn stats(State(sim): State<Arc<Simulator>>, Query(query): Query<StatsQuery>) -> Response {
    let per_task = matches!(query.per_task.as_deref(), Some("1" | "true"));
    Json(StatsBody {
        stats: sim.stats(),
        per_task: per_task.then(|| sim.polls_per_task()),
    })
    .into_response()
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use serde_json::{json, Value};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    use super::*;

    struct TestServer {
        addr: SocketAddr,
        stop: oneshot::Sender<()>,
        task: JoinHandle<std::io::Result<()>>,
    }

    async fn spawn(sim: Arc<Simulator>) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, sim, std::time::Duration::ZERO, async {
            let _ = stopped.await;
        }));
        TestServer { addr, stop, task }
    }

    /// One HTTP/1.1 request on its own connection: `(status, headers, body)`.
    async fn call(
        addr: SocketAddr,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> (u16, String, String) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let body = body.unwrap_or("");
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        let raw = String::from_utf8(raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").expect("a full response");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status line");
        (status, head.to_ascii_lowercase(), body.to_owned())
    }

    async fn call_json(
        addr: SocketAddr,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> (u16, Value) {
        let (status, _, body) = call(addr, method, path, body).await;
        let value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{method} {path}: body {body:?} is not JSON: {e}"));
        (status, value)
    }

    #[tokio::test]
    async fn start_poll_cancel() {
        let sim = Arc::new(Simulator::new());
        let server = spawn(sim.clone()).await;
        let addr = server.addr;

        let start = r#"{"kind":"simulate","params":{"duration_ms":60000,"steps":10}}"#;
        let (status, body) = call_json(addr, "POST", "/tasks", Some(start)).await;
        assert_eq!(status, 201);
        let id = body["id"].as_str().unwrap().to_owned();
        assert_eq!(body, json!({ "id": id }));

        let (status, body) = call_json(addr, "GET", &format!("/tasks/{id}"), None).await;
        assert_eq!(status, 200);
        assert_eq!(body["id"], json!(id));
        assert_eq!(body["state"], json!("running"));
        assert_eq!(body["done"], json!(0));
        assert_eq!(body["total"], json!(10));
        for key in ["message", "result", "error"] {
            assert_eq!(body[key], Value::Null, "{key}");
        }
        assert!(body["changed_at_ms"].as_u64().unwrap() > 1_600_000_000_000);

        let (status, body) = call_json(addr, "DELETE", &format!("/tasks/{id}"), None).await;
        assert_eq!(status, 200);
        assert_eq!(body["state"], json!("cancelled"));
        let (status, again) = call_json(addr, "DELETE", &format!("/tasks/{id}"), None).await;
        assert_eq!((status, &again), (200, &body));

        assert_eq!(sim.polls_of(&id), Some(1));
        server.stop.send(()).unwrap();
        server.task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn unknown_ids_are_404() {
        let server = spawn(Arc::new(Simulator::new())).await;
        for method in ["GET", "DELETE"] {
            let (status, body) =
                call_json(server.addr, method, "/tasks/0123456789abcdef", None).await;
            assert_eq!(
                (status, body),
                (404, json!({ "error": "not found" })),
                "{method}"
            );
        }
    }

    #[tokio::test]
    async fn bad_starts_are_400() {
        let server = spawn(Arc::new(Simulator::new())).await;
        let cases = [
            (r#"{"kind":"sleep","params":{}}"#, "unknown_kind", "sleep"),
            (
                r#"{"kind":"simulate","params":{"duration_ms":1.5,"steps":1}}"#,
                "invalid_params",
                "duration_ms",
            ),
            (
                r#"{"kind":"simulate","params":{"duration_ms":10,"steps":1,"x":1}}"#,
                "invalid_params",
                "unknown key `x`",
            ),
            (r#"{"kind":"simulate"}"#, "invalid_params", "params"),
            (r#"{"params":{}}"#, "invalid_params", "kind"),
            (r#"{"kind":7,"params":{}}"#, "invalid_params", "kind"),
            (r#"not json"#, "invalid_params", "JSON"),
            ("", "invalid_params", "JSON"),
            (r#"[1,2]"#, "invalid_params", "JSON object"),
        ];
        for (request, code, needle) in cases {
            let (status, body) = call_json(server.addr, "POST", "/tasks", Some(request)).await;
            assert_eq!(status, 400, "{request}");
            assert_eq!(body["code"], json!(code), "{request}");
            let error = body["error"].as_str().unwrap();
            assert!(error.contains(needle), "{request}: {error}");
            assert_eq!(body.as_object().unwrap().len(), 2, "{request}");
        }
    }

    #[tokio::test]
    async fn full_is_503_with_retry_after() {
        let server = spawn(Arc::new(Simulator::with_limits(1, 1000))).await;
        let start = r#"{"kind":"simulate","params":{"duration_ms":60000,"steps":10}}"#;
        let (status, _, _) = call(server.addr, "POST", "/tasks", Some(start)).await;
        assert_eq!(status, 201);
        let (status, head, body) = call(server.addr, "POST", "/tasks", Some(start)).await;
        assert_eq!(status, 503);
        assert!(head.contains("retry-after: 1"), "{head}");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert!(body["error"].as_str().unwrap().contains("retry later"));
    }

    #[tokio::test]
    async fn stats_with_and_without_per_task() {
        let server = spawn(Arc::new(Simulator::new())).await;
        let addr = server.addr;
        let start = r#"{"kind":"simulate","params":{"duration_ms":60000,"steps":10}}"#;
        let (_, body) = call_json(addr, "POST", "/tasks", Some(start)).await;
        let id = body["id"].as_str().unwrap().to_owned();
        call_json(addr, "GET", &format!("/tasks/{id}"), None).await;
        call_json(addr, "GET", &format!("/tasks/{id}"), None).await;
        call_json(addr, "GET", "/tasks/unknown", None).await;

        let (status, body) = call_json(addr, "GET", "/stats", None).await;
        assert_eq!(status, 200);
        assert_eq!(
            body,
            json!({ "tasks": 1, "polls": 3, "starts": 1, "cancels": 0 })
        );

        let (status, body) = call_json(addr, "GET", "/stats?per_task=1", None).await;
        assert_eq!(status, 200);
        assert_eq!(
            body,
            json!({ "tasks": 1, "polls": 3, "starts": 1, "cancels": 0, "per_task": { id: 2 } })
        );

        let (_, body) = call_json(addr, "GET", "/stats?per_task=0", None).await;
        assert!(body.get("per_task").is_none());
    }

    #[test]
    fn now_is_after_2020() {
        assert!(now_ms() > 1_577_836_800_000);
    }
}
