//! `GET /ws`: one client connection. The reader parses each frame,
//! rate-limits it and asks the engine; the writer drains the connection's
//! outbox, pings, and gives up on a peer that is silent or does not read.
//! Requests that wait on the task service (`start`, `cancel`) run as their
//! own tasks, bounded per connection, so a slow backend never stalls the
//! reader.

use super::session::Session;
use crate::auth::Claims;
use crate::clock::Clock;
use crate::config::ClientLimits;
use crate::engine::admission::StartLimits;
use crate::engine::fanout::outbox::REPLY_HIGH_WATER;
use crate::engine::fanout::{CloseReason, Conn, Next, View};
use crate::engine::{CancelTarget, Engine, Refused};
use crate::metrics as m;
use crate::rate::TokenBucket;
use crate::AppState;
use app::protocol::{ClientMsg, ErrorCode, Rejection, ServerMsg};
use axum::extract::ws::{close_code, CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{timeout, Instant};

/// `start`/`cancel` requests of one connection waiting on the task service.
pub const MAX_REQUESTS_IN_FLIGHT: usize = 16;
/// The read buffer each WebSocket allocates at once and keeps, and the
/// most one read takes from the socket: client frames are a few hundred
/// bytes at most (a `start`), and a larger one grows the buffer for itself.
/// 4 KiB here was ~40 % of an idle connection's heap.
const READ_BUFFER_BYTES: usize = 512;
/// Frames queued past this many bytes are written without waiting for the
/// flush (the buffer itself grows only as frames need it).
const WRITE_BUFFER_BYTES: usize = 4 * 1024;
/// How long a close frame may take to go out before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a woken writer waits for more frames before it writes: a
/// `send` costs the server (and, on loopback, the receiver) far more than
/// a timer, and a progress bar does not see 2 ms.
const WRITE_GATHER: Duration = Duration::from_millis(2);

/// `?token=`: a watch token instead of the session cookie (contract section 3).
#[derive(serde::Deserialize)]
pub struct TokenQuery {
    pub token: Option<String>,
}

/// Who a `/ws` or `/sse` request is: a cookie session, or a watch token's
/// scope (checked before the upgrade: a bad token is HTTP 401).
pub struct Watcher {
    pub session: Arc<str>,
    pub view: View,
    /// The token, for its `cancel` permission and expiry.
    pub claims: Option<Claims>,
}

impl Watcher {
    /// What `/ws` and `/sse` check before anything else: the Origin rule,
    /// the token or cookie, and a connection permit (a full server answers
    /// plain HTTP 503).
    pub fn admit(
        state: &AppState,
        query: &TokenQuery,
        session: Option<Extension<Session>>,
        headers: &HeaderMap,
    ) -> Result<(Watcher, OwnedSemaphorePermit), (StatusCode, String)> {
        if !origin_allowed(headers, &state.config.allowed_origins) {
            return Err((StatusCode::FORBIDDEN, "origin not allowed".into()));
        }
        let watcher = Watcher::identify(state, query, session.map(|Extension(s)| s))?;
        let permit = state.connections.clone().try_acquire_owned().map_err(|_| {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "too many connections".into(),
            )
        })?;
        Ok((watcher, permit))
    }

    pub fn identify(
        state: &AppState,
        query: &TokenQuery,
        session: Option<Session>,
    ) -> Result<Watcher, (StatusCode, String)> {
        match (&query.token, session) {
            (Some(token), _) => match state.auth.signer.verify(token, state.engine.now_ms()) {
                Ok(claims) => Ok(Watcher {
                    session: claims.session(),
                    view: claims.view(),
                    claims: Some(claims),
                }),
                Err(e) => Err((StatusCode::UNAUTHORIZED, e.to_string())),
            },
            (None, Some(session)) => Ok(Watcher {
                session: session.token,
                view: View::Session,
                claims: None,
            }),
            (None, None) => Err((StatusCode::UNAUTHORIZED, "no session".into())),
        }
    }
}

pub async fn handler(
    ws: WebSocketUpgrade,
    State(state): State<AppState>,
    session: Option<Extension<Session>>,
    Query(query): Query<TokenQuery>,
    headers: HeaderMap,
) -> Response {
    // Refused before the upgrade: plain HTTP answers.
    let (watcher, permit) = match Watcher::admit(&state, &query, session, &headers) {
        Ok(admitted) => admitted,
        Err(refused) => return refused.into_response(),
    };
    let max = state.config.limits.max_message_bytes as usize;
    // One pointer in the upgrade task (its closure, then the reader's
    // future) instead of ~700 bytes kept for the connection's whole life.
    let admitted = Box::new((state, watcher, permit));
    // Client frames and our updates are small: a 128 KiB buffer per
    // connection each way (tungstenite's defaults) would make 1,000 idle
    // connections cost ~250 MB. The buffers grow when a message needs it.
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .on_upgrade(move |socket| {
            // Split here, not in `run`: an argument stays in an async
            // fn's state for its whole life, even once moved out.
            let (sink, stream) = socket.split();
            run(sink, stream, admitted)
        })
}

/// The contract's rule: no `Origin` is fine (not a browser); `null` never is;
/// otherwise its host:port must equal `Host`, or be on the allow-list.
pub fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
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

/// What `handler` admitted: the state, who is watching, the connection permit.
type Admitted = (AppState, Watcher, OwnedSemaphorePermit);

async fn run(mut sink: Sink, mut stream: SplitStream<WebSocket>, admitted: Box<Admitted>) {
    let (state, watcher, _permit) = &*admitted;
    let mut claims = watcher.claims.clone();
    // This function's future lives as long as the connection and is as
    // large as the largest future it awaits inline, so the engine's
    // futures are boxed, and its arguments are two halves of the socket and
    // one `Box` (`size_of_val`: 2,680 bytes with the futures boxed but
    // `AppState`, the watcher and the socket as arguments; 768 now).
    let connected = {
        let connect = Box::pin(
            state
                .engine
                .connect(watcher.session.clone(), watcher.view.clone()),
        );
        connect.await
    };
    let conn = match connected {
        Ok(conn) => Arc::new(conn),
        Err(e) => {
            tracing::warn!(error = %e, "refusing a connection: the store is unreachable");
            let frame = Message::Close(Some(CloseFrame {
                code: close_code::AGAIN,
                reason: Utf8Bytes::from_static("store unreachable; reconnect"),
            }));
            let _ = timeout(CLOSE_TIMEOUT, sink.send(frame)).await;
            return;
        }
    };
    let connections = metrics::gauge!(m::WS_CONNECTIONS);
    connections.increment(1.0);

    let mut writer = tokio::spawn(write_loop(
        sink,
        conn.clone(),
        state.engine.clock(),
        state.config.limits.clone(),
    ));

    let limits = &state.config.limits;
    let mut bucket = TokenBucket::new(limits.client_msgs_per_s, limits.client_msgs_burst);
    let started = Instant::now();
    let requests = Arc::new(Semaphore::new(MAX_REQUESTS_IN_FLIGHT));
    loop {
        // A watch token ends the connection when it expires unrefreshed.
        let expires_ms = claims.as_ref().map(|c| c.expires_ms);
        // Backpressure: while the client leaves its replies unread, read no
        // more of its frames (TCP slows it down); the writer's slow-client
        // timeout still closes one that reads nothing at all.
        if conn.outbox.replies_len() >= REPLY_HIGH_WATER {
            tokio::select! {
                _ = &mut writer => break,
                _ = conn.outbox.room_for_replies() => {}
            }
        }
        tokio::select! {
            _ = &mut writer => break,
            _ = token_expiry(&state.engine, expires_ms) => {
                reply(&conn, expired());
                conn.outbox.close(CloseReason::Expired);
                let _ = timeout(CLOSE_TIMEOUT, &mut writer).await;
                break;
            }
            frame = stream.next() => {
                let Some(frame) = frame else { break };
                conn.last_seen_ms.store(state.engine.now_ms(), Ordering::Relaxed);
                let frame = match frame {
                    Ok(frame) => frame,
                    Err(e) => {
                        tracing::debug!(conn = conn.id, error = %e, "websocket read failed");
                        if is_too_big(&e) {
                            conn.outbox.close(CloseReason::TooBig);
                            let _ = timeout(CLOSE_TIMEOUT, &mut writer).await;
                        }
                        break;
                    }
                };
                let text = match frame {
                    Message::Text(text) => text,
                    Message::Binary(_) => {
                        reply(&conn, Rejection {
                            reference: None,
                            code: ErrorCode::BadRequest,
                            message: "binary frames are not part of the protocol; send JSON text".into(),
                        }.into());
                        continue;
                    }
                    Message::Ping(_) | Message::Pong(_) => continue,
                    Message::Close(_) => break,
                };
                if bucket.take(started.elapsed().as_secs_f64() * 1000.0).is_err() {
                    reply(&conn, ServerMsg::error(
                        reference_of(text.as_str()),
                        ErrorCode::RateLimited,
                        format!("at most {} messages per second", limits.client_msgs_per_s),
                    ));
                    continue;
                }
                let handled = Box::pin(handle_text(state, &conn, &mut claims, &requests, text.as_str()));
                handled.await;
            }
        }
    }
    {
        let disconnect = Box::pin(state.engine.disconnect(&conn));
        disconnect.await;
    }
    writer.abort();
    connections.decrement(1.0);
}

/// Resolves once a watch token expiring at `expires_ms` has expired;
/// never for a connection without one.
pub async fn token_expiry(engine: &Engine, expires_ms: Option<u64>) {
    match expires_ms {
        Some(at) => {
            tokio::time::sleep(Duration::from_millis(at.saturating_sub(engine.now_ms()))).await
        }
        None => std::future::pending().await,
    }
}

/// What a connection whose watch token expired is told last.
pub fn expired() -> ServerMsg {
    ServerMsg::error(None, ErrorCode::Unauthorized, "the watch token has expired")
}

type Sink = SplitSink<WebSocket, Message>;

/// Drains the outbox into the socket, pings every `ping_interval_s`, and
/// closes a peer that is silent past `ping_timeout_s` or whose writes stay
/// blocked past `slow_client_timeout_s` (a sleep until the next ping, not an
/// interval: it is one per connection and restarts after each ping).
async fn write_loop(mut sink: Sink, conn: Arc<Conn>, clock: Clock, limits: ClientLimits) {
    let outbox = &conn.outbox;
    let sent = metrics::counter!(m::MESSAGES_SENT);
    let slow = Duration::from_secs(limits.slow_client_timeout_s.max(1));
    let ping_every = Duration::from_secs(limits.ping_interval_s.max(1));
    let mut next_ping = Instant::now() + ping_every;
    loop {
        match outbox.pop() {
            Next::Frame(frame) => {
                let wrote = timeout(slow, async {
                    sink.feed(Message::Text(frame)).await?;
                    // Flush once the queue is drained rather than per frame.
                    if outbox.is_empty() {
                        sink.flush().await?;
                    }
                    Ok::<_, axum::Error>(())
                })
                .await;
                match wrote {
                    Ok(Ok(())) => sent.increment(1),
                    Ok(Err(_)) => return,
                    Err(_) => {
                        tracing::info!(conn = conn.id, "closing a client that does not read");
                        return close(&mut sink, close_code::AGAIN, "too slow; reconnect").await;
                    }
                }
            }
            Next::Close(reason) => {
                let (code, why) = match reason {
                    CloseReason::Gone => return,
                    CloseReason::Restart => (close_code::RESTART, "server restarting"),
                    CloseReason::NotReading => (close_code::POLICY, "not reading"),
                    CloseReason::TooBig => (close_code::SIZE, "message too big"),
                    CloseReason::Expired => (close_code::POLICY, "watch token expired"),
                };
                return close(&mut sink, code, why).await;
            }
            Next::Empty => {
                tokio::select! {
                    _ = outbox.notified() => {
                        // Let the polls due with the one that woke us (a
                        // session's tasks are due together, their answers
                        // arrive within a millisecond or two) add their
                        // frames first: one write for them all.
                        tokio::time::sleep(WRITE_GATHER).await;
                    }
                    _ = tokio::time::sleep_until(next_ping) => {
                        let silent_ms = clock
                            .now_ms()
                            .saturating_sub(conn.last_seen_ms.load(Ordering::Relaxed));
                        if silent_ms > limits.ping_timeout_s * 1000 {
                            tracing::debug!(conn = conn.id, "peer silent; closing");
                            return close(&mut sink, close_code::AWAY, "no answer to ping").await;
                        }
                        if timeout(slow, sink.send(Message::Ping(Default::default()))).await.is_err() {
                            return;
                        }
                        next_ping = Instant::now() + ping_every;
                    }
                }
            }
        }
    }
}

async fn close(sink: &mut Sink, code: u16, why: &'static str) {
    let frame = Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(why),
    }));
    let _ = timeout(CLOSE_TIMEOUT, sink.send(frame)).await;
}

fn is_too_big(e: &axum::Error) -> bool {
    let text = e.to_string();
    text.contains("too long") || text.contains("too big") || text.contains("Space limit")
}

/// The `ref` of a frame that will not be handled, if it has a valid one.
fn reference_of(text: &str) -> Option<String> {
    match ClientMsg::parse(text) {
        Ok(ClientMsg::Start { reference, .. }) => Some(reference),
        Ok(ClientMsg::Cancel { reference, .. }) => reference,
        Ok(_) => None,
        Err(r) => r.reference,
    }
}

fn reply(conn: &Conn, msg: ServerMsg) {
    conn.outbox.push_reply(msg.to_json().into());
}

async fn handle_text(
    state: &AppState,
    conn: &Arc<Conn>,
    claims: &mut Option<Claims>,
    requests: &Arc<Semaphore>,
    text: &str,
) {
    let msg = match ClientMsg::parse(text) {
        Ok(msg) => msg,
        Err(rejection) => return reply(conn, rejection.into()),
    };
    let engine = &state.engine;
    // What a watch token does not allow.
    if let Some(c) = claims.as_ref() {
        match &msg {
            ClientMsg::Start { reference, .. } => {
                return reply(
                    conn,
                    ServerMsg::error(
                        Some(reference.clone()),
                        ErrorCode::Forbidden,
                        "a watch token cannot start tasks",
                    ),
                )
            }
            ClientMsg::Cancel { reference, .. } if !c.cancel => {
                return reply(
                    conn,
                    ServerMsg::error(
                        reference.clone(),
                        ErrorCode::Forbidden,
                        "this watch token does not allow cancel",
                    ),
                )
            }
            // The host decides what its users' lists hold.
            ClientMsg::Forget { .. } => return,
            _ => {}
        }
    }
    match msg {
        ClientMsg::Refresh { token } => {
            let Some(current) = claims.as_mut() else {
                return reply(
                    conn,
                    ServerMsg::error(
                        None,
                        ErrorCode::BadRequest,
                        "`refresh` is for connections opened with a watch token",
                    ),
                );
            };
            match state.auth.signer.verify(&token, engine.now_ms()) {
                Ok(fresh) if fresh.scope == current.scope => *current = fresh,
                Ok(_) => reply(
                    conn,
                    ServerMsg::error(
                        None,
                        ErrorCode::Unauthorized,
                        "the new watch token has another scope",
                    ),
                ),
                Err(e) => reply(
                    conn,
                    ServerMsg::error(None, ErrorCode::Unauthorized, e.to_string()),
                ),
            }
        }
        ClientMsg::Subscribe { task } => {
            if engine.subscribe(conn, &task).await.is_err() {
                reply(conn, not_found(None, &task));
            }
        }
        ClientMsg::Unsubscribe { task } => engine.unsubscribe(conn, &task),
        ClientMsg::Forget { task } => engine.forget(conn, &task).await,
        ClientMsg::Start {
            reference,
            kind,
            params,
        } => {
            let limits = &state.config.limits;
            let params_bytes = serde_json::to_string(&params).map_or(usize::MAX, |s| s.len());
            if params_bytes as u64 > limits.max_params_bytes {
                return reply(
                    conn,
                    ServerMsg::error(
                        Some(reference),
                        ErrorCode::BadRequest,
                        format!("`params` is over {} bytes", limits.max_params_bytes),
                    ),
                );
            }
            let start_limits = StartLimits {
                per_window: limits.max_starts_per_min,
                max_live: limits.max_live_tasks_per_session,
            };
            let ticket = match engine.admit_start(&conn.session, start_limits).await {
                Ok(ticket) => ticket,
                Err(refused) => return reply(conn, error(Some(reference), refused)),
            };
            let Ok(permit) = requests.clone().try_acquire_owned() else {
                engine.release(&conn.session, ticket).await;
                return reply(conn, busy(Some(reference)));
            };
            let (engine, conn) = (engine.clone(), conn.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let started = engine
                    .start(&conn, ticket, reference.clone(), &kind, params)
                    .await;
                if let Err(refused) = started {
                    reply(&conn, error(Some(reference), refused));
                }
            });
        }
        ClientMsg::Cancel { reference, task } => {
            let backend_id = match engine.cancel_target(conn, &task).await {
                Ok(CancelTarget::AlreadyFinal) => return,
                Ok(CancelTarget::Backend(backend_id)) => backend_id,
                Err(_) => return reply(conn, not_found(reference, &task)),
            };
            let Ok(permit) = requests.clone().try_acquire_owned() else {
                return reply(conn, busy(reference));
            };
            let (engine, conn) = (engine.clone(), conn.clone());
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(refused) = engine.cancel(&conn, &task, &backend_id).await {
                    reply(&conn, error(reference, refused));
                }
            });
        }
    }
}

fn error(reference: Option<String>, refused: Refused) -> ServerMsg {
    ServerMsg::error(reference, refused.code, refused.message)
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
