//! Sessions by cookie: the page and the WebSocket upgrade both resolve the
//! `taskwire_session` cookie to a session, making a new one (and setting the
//! cookie) when it is missing, malformed or unknown.

use crate::AppState;
use app::InitialTasks;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

pub const COOKIE_NAME: &str = "taskwire_session";

/// The caller's session, put into the request's extensions.
#[derive(Clone, Debug)]
pub struct Session {
    pub token: Arc<str>,
}

/// The value of our cookie in a request's `Cookie` headers, if any.
pub fn cookie_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE_NAME)
        .map(|(_, value)| value.trim())
}

pub async fn middleware(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    // A watch token's `/ws` or `/sse` has no cookie session (and makes none).
    if req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p.starts_with("token=")))
    {
        return next.run(req).await;
    }
    let (token, is_new) = match state
        .engine
        .resolve_session(cookie_token(req.headers()))
        .await
    {
        Ok(resolved) => resolved,
        Err(e) => {
            tracing::warn!(error = %e, "no session: the store is unreachable");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "1")],
                "taskwire's store is unreachable; try again in a moment",
            )
                .into_response();
        }
    };
    // The page is rendered with the session's tasks (the WebSocket gets
    // them in `welcome` instead).
    if !matches!(req.uri().path(), "/ws" | "/sse") {
        let tasks = state.engine.session_tasks(&token).await;
        req.extensions_mut().insert(InitialTasks(tasks));
    }
    req.extensions_mut().insert(Session {
        token: token.clone(),
    });
    let secure = req
        .headers()
        .get("x-forwarded-proto")
        .is_some_and(|v| v.as_bytes() == b"https");
    let mut resp = next.run(req).await;
    if is_new {
        let cookie = format!(
            "{COOKIE_NAME}={token}; Path=/; HttpOnly; SameSite=Lax{}",
            if secure { "; Secure" } else { "" }
        );
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    resp
}
