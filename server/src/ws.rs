//! `GET /ws`: one client connection. The reader parses each frame and acts
//! on it; the writer drains the connection's outbox. Requests that wait on
//! the task service run as their own tasks, bounded per connection, so a
//! slow backend never stalls the reader.

use crate::backend::BackendError;
use crate::hub::{CancelTarget, CloseReason, Conn, Next};
use crate::metrics as m;
use crate::session::Session;
use crate::AppState;
use app::protocol::{ClientMsg, ErrorCode, Rejection, ServerMsg};
use axum::extract::ws::{close_code, CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures::{SinkExt, StreamExt};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Largest client message, after reassembly of fragments (contract default).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// `start`/`cancel` requests of one connection waiting on the task service.
pub const MAX_REQUESTS_IN_FLIGHT: usize = 16;

pub async fn handler(
    ws: WebSocketUpgrade,
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    headers: HeaderMap,
) -> Response {
    if !origin_allowed(&headers, &state.config.allowed_origins) {
        return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
    }
    ws.max_message_size(MAX_MESSAGE_BYTES)
        .max_frame_size(MAX_MESSAGE_BYTES)
        .on_upgrade(move |socket| run(socket, state, session.token))
}

/// The contract's rule: no `Origin` is fine (not a browser); `null` never is;
/// otherwise its host:port must equal `Host`, or be on the allow-list.
fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    if origin == "null" {
        return false;
    }
    if allowed.iter().any(|a| a.trim_end_matches('/') == origin) {
        return true;
    }
    let origin_host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}

async fn run(socket: WebSocket, state: AppState, session: Arc<str>) {
    let conn = Arc::new(state.hub.connect(session));
    let (mut sink, mut stream) = socket.split();
    let connections = metrics::gauge!(m::WS_CONNECTIONS);
    connections.increment(1.0);

    let writer_conn = conn.clone();
    let mut writer = tokio::spawn(async move {
        let outbox = &writer_conn.outbox;
        let sent = metrics::counter!(m::MESSAGES_SENT);
        loop {
            match outbox.pop() {
                Next::Frame(frame) => {
                    if sink.feed(Message::Text(frame)).await.is_err() {
                        return;
                    }
                    sent.increment(1);
                    // Flush once the queue is drained rather than per frame.
                    if outbox.is_empty() && sink.flush().await.is_err() {
                        return;
                    }
                }
                Next::Close(reason) => {
                    let (code, why) = match reason {
                        CloseReason::Gone => return,
                        CloseReason::Restart => (close_code::RESTART, "server restarting"),
                        CloseReason::NotReading => (close_code::POLICY, "not reading"),
                        CloseReason::TooBig => (close_code::SIZE, "message too big"),
                    };
                    let _ = sink
                        .send(Message::Close(Some(CloseFrame {
                            code,
                            reason: Utf8Bytes::from_static(why),
                        })))
                        .await;
                    return;
                }
                Next::Empty => outbox.notified().await,
            }
        }
    });

    let requests = Arc::new(Semaphore::new(MAX_REQUESTS_IN_FLIGHT));
    loop {
        tokio::select! {
            _ = &mut writer => break,
            frame = stream.next() => match frame {
                Some(Ok(Message::Text(text))) => handle_text(&state, &conn, &requests, text.as_str()).await,
                Some(Ok(Message::Binary(_))) => reply(&conn, Rejection {
                    reference: None,
                    code: ErrorCode::BadRequest,
                    message: "binary frames are not part of the protocol; send JSON text".into(),
                }.into()),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_))) | None => break,
                Some(Err(e)) => {
                    tracing::debug!(conn = conn.id, error = %e, "websocket read failed");
                    if is_too_big(&e) {
                        conn.outbox.close(CloseReason::TooBig);
                        let _ = tokio::time::timeout(Duration::from_secs(1), &mut writer).await;
                    }
                    break;
                }
            }
        }
    }
    if let Some(session) = state.hub.disconnect(&conn) {
        state
            .scheduler
            .expire_session(session, Duration::from_secs(state.config.retention_s))
            .await;
    }
    writer.abort();
    connections.decrement(1.0);
}

fn is_too_big(e: &axum::Error) -> bool {
    let text = e.to_string();
    text.contains("too long") || text.contains("too big") || text.contains("Space limit")
}

fn reply(conn: &Conn, msg: ServerMsg) {
    conn.outbox.push_reply(msg.to_json().into());
}

async fn handle_text(state: &AppState, conn: &Arc<Conn>, requests: &Arc<Semaphore>, text: &str) {
    let msg = match ClientMsg::parse(text) {
        Ok(msg) => msg,
        Err(rejection) => return reply(conn, rejection.into()),
    };
    match msg {
        ClientMsg::Subscribe { task } => {
            if state.hub.subscribe(conn, &task).is_err() {
                reply(conn, not_found(None, &task));
            }
        }
        ClientMsg::Unsubscribe { task } => state.hub.unsubscribe(conn, &task),
        ClientMsg::Start {
            reference,
            kind,
            params,
        } => {
            let Ok(permit) = requests.clone().try_acquire_owned() else {
                return reply(conn, busy(Some(reference)));
            };
            let (state, conn) = (state.clone(), conn.clone());
            tokio::spawn(async move {
                let _permit = permit;
                start(&state, &conn, reference, &kind, &params).await;
            });
        }
        ClientMsg::Cancel { reference, task } => {
            let target = match state.hub.cancel_target(conn, &task) {
                Ok(CancelTarget::AlreadyFinal) => return,
                Ok(CancelTarget::Backend(backend_id)) => backend_id,
                Err(_) => return reply(conn, not_found(reference, &task)),
            };
            let Ok(permit) = requests.clone().try_acquire_owned() else {
                return reply(conn, busy(reference));
            };
            let (state, conn) = (state.clone(), conn.clone());
            tokio::spawn(async move {
                let _permit = permit;
                cancel(&state, &conn, reference, &task, &target).await;
            });
        }
    }
}

async fn start(
    state: &AppState,
    conn: &Conn,
    reference: String,
    kind: &str,
    params: &serde_json::Value,
) {
    match state.backend.start(kind, params).await {
        Ok(backend_id) => {
            let task = state.hub.create_task(conn, reference, kind, &backend_id);
            state.scheduler.poll(task, Duration::ZERO).await;
        }
        Err(e) => reply(conn, backend_error(Some(reference), e)),
    }
}

async fn cancel(
    state: &AppState,
    conn: &Conn,
    reference: Option<String>,
    task: &str,
    backend_id: &str,
) {
    let policy = &state.policy;
    match state.backend.cancel(backend_id).await {
        Ok(status) => {
            state.hub.apply_status(task, &status, policy, 0.0);
        }
        Err(BackendError::NotFound) => {
            state.hub.fail(
                task,
                "the task service no longer knows this task".into(),
                policy,
            );
        }
        Err(e) => return reply(conn, backend_error(reference, e)),
    }
    state.hub.send_state_to(conn, task);
}

fn not_found(reference: Option<String>, task: &str) -> ServerMsg {
    ServerMsg::error(
        reference,
        ErrorCode::NotFound,
        format!("no task `{task}` in this session"),
    )
}

fn busy(reference: Option<String>) -> ServerMsg {
    ServerMsg::error(
        reference,
        ErrorCode::RateLimited,
        format!("at most {MAX_REQUESTS_IN_FLIGHT} start/cancel requests may wait on the task service at once"),
    )
}

fn backend_error(reference: Option<String>, e: BackendError) -> ServerMsg {
    let code = match &e {
        BackendError::Rejected { code, .. } => *code,
        BackendError::Unavailable { .. } => ErrorCode::BackendUnavailable,
        BackendError::NotFound | BackendError::Protocol(_) => ErrorCode::Internal,
    };
    if code == ErrorCode::Internal {
        tracing::warn!(error = %e, "task service answered out of contract");
    }
    ServerMsg::error(reference, code, e.to_string())
}
