//! `GET /sse`: the WebSocket's stream over Server-Sent Events (contract
//! section 3), for `EventSource` and for proxies that break WebSockets.
//! Authenticated by `?token=` or by the session cookie; the first event is
//! `welcome`, then `task` for each change, from the same bounded outbox as a
//! WebSocket (coalesced per task, the final state never dropped); a comment
//! line at least every 15 s. Cross-origin pages allowed by
//! `--allowed-origins` may read it (CORS, no credentials).

use super::session::Session;
use super::ws::{expired, token_expiry, TokenQuery, Watcher};
use crate::engine::fanout::{Conn, Next};
use crate::engine::Engine;
use crate::metrics as m;
use crate::AppState;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;

/// A comment line at least this often (contract: ≤ 15 s), so proxies and
/// clients see the stream is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(15);

pub async fn handler(
    State(state): State<AppState>,
    session: Option<Extension<Session>>,
    Query(query): Query<TokenQuery>,
    headers: HeaderMap,
) -> Response {
    let (watcher, permit) = match Watcher::admit(&state, &query, session, &headers) {
        Ok(admitted) => admitted,
        Err(refused) => return refused.into_response(),
    };
    let conn = match state.engine.connect(watcher.session, watcher.view).await {
        Ok(conn) => Arc::new(conn),
        Err(e) => {
            tracing::warn!(error = %e, "refusing an event stream: the store is unreachable");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "1")],
                "store unreachable; try again",
            )
                .into_response();
        }
    };
    metrics::gauge!(m::SSE_CONNECTIONS).increment(1.0);
    let stream = Stream {
        conn,
        engine: state.engine.clone(),
        expires_ms: watcher.claims.map(|c| c.expires_ms),
        _permit: permit,
        done: false,
    };
    let events = futures::stream::unfold(stream, |mut s| async move {
        let event = s.next().await?;
        Some((Ok::<_, Infallible>(event), s))
    });
    let mut resp = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(HEARTBEAT))
        .into_response();
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // nginx: do not buffer this response (docs/deployment.md).
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    if let Some(origin) = headers.get(header::ORIGIN) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        h.append(header::VARY, HeaderValue::from_static("origin"));
    }
    resp
}

/// One event stream: a connection of the engine, let go when the client is.
struct Stream {
    conn: Arc<Conn>,
    engine: Engine,
    /// A watch token's expiry (Unix ms): the stream ends with `unauthorized` then.
    expires_ms: Option<u64>,
    _permit: OwnedSemaphorePermit,
    done: bool,
}

impl Stream {
    async fn next(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        loop {
            match self.conn.outbox.pop() {
                Next::Frame(frame) => {
                    metrics::counter!(m::MESSAGES_SENT).increment(1);
                    return Some(Event::default().event(kind_of(&frame)).data(frame.as_str()));
                }
                Next::Close(_) => return None,
                Next::Empty => {
                    tokio::select! {
                        _ = self.conn.outbox.notified() => {}
                        _ = token_expiry(&self.engine, self.expires_ms) => {
                            self.done = true;
                            return Some(Event::default().event("error").data(expired().to_json()));
                        }
                    }
                }
            }
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        metrics::gauge!(m::SSE_CONNECTIONS).decrement(1.0);
        let (engine, conn) = (self.engine.clone(), self.conn.clone());
        tokio::spawn(async move { engine.disconnect(&conn).await });
    }
}

/// The event name of a server frame: its `type` (`welcome`, `task`, `error`).
fn kind_of(frame: &str) -> &str {
    frame
        .strip_prefix("{\"type\":\"")
        .and_then(|rest| rest.split('"').next())
        .unwrap_or("message")
}

#[cfg(test)]
mod tests {
    #[test]
    fn events_are_named_by_the_frame_s_type() {
        assert_eq!(super::kind_of(r#"{"type":"task","task":{}}"#), "task");
        assert_eq!(super::kind_of(r#"{"type":"welcome"}"#), "welcome");
        assert_eq!(super::kind_of("[]"), "message");
    }
}
