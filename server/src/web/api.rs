//! The server API (contract section 3): a host application's backend starts,
//! reads, cancels and lists its owners' tasks and hands its users watch
//! tokens. Every request carries `Authorization: Bearer <api key>`; errors
//! are `{"code","error"}` with the client protocol's codes. Tasks go through
//! the same engine path as a browser's `start` (admission, polling,
//! retention, durability); they belong to an owner's session
//! ([`crate::auth::owner_session`]) instead of a cookie's.

use crate::auth::{check_owner, owner_session, Claims, KeyCheck, Scope, MAX_TOKEN_TTL_S};
use crate::engine::admission::StartLimits;
use crate::engine::Refused;
use crate::AppState;
use app::protocol::{ErrorCode, Task};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/tasks", get(list).post(start))
        .route("/api/v1/tasks/{id}", get(read).delete(cancel))
        .route("/api/v1/tokens", axum::routing::post(token))
}

/// An API error: its HTTP status follows from the code (contract section 3).
#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    message: String,
    retry_after_s: Option<u64>,
}

impl ApiError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            retry_after_s: None,
        }
    }
}

impl From<Refused> for ApiError {
    fn from(r: Refused) -> Self {
        ApiError::new(r.code, r.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self.code {
            ErrorCode::BadRequest | ErrorCode::UnknownKind | ErrorCode::InvalidParams => {
                StatusCode::BAD_REQUEST
            }
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::RateLimited | ErrorCode::TooManyTasks => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::BackendUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let body = Json(json!({"code": self.code, "error": self.message}));
        let mut resp = (status, body).into_response();
        if let Some(s) = self.retry_after_s {
            resp.headers_mut().insert(header::RETRY_AFTER, s.into());
        }
        if self.code == ErrorCode::Unauthorized {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The calling key's name, from `Authorization: Bearer <key>`, after its rate.
fn key_of(state: &AppState, headers: &HeaderMap) -> ApiResult<Arc<str>> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unauthorized,
                "send `Authorization: Bearer <api key>`",
            )
        })?;
    match state.auth.keys.check(presented, state.engine.now_ms()) {
        KeyCheck::Ok(name) => Ok(name),
        KeyCheck::Limited(name, wait_ms) => {
            crate::metrics::api_request(&name, "rate_limited");
            Err(ApiError {
                retry_after_s: Some(wait_ms.div_ceil(1000).max(1)),
                ..ApiError::new(
                    ErrorCode::RateLimited,
                    format!("API key `{name}` is over its request rate"),
                )
            })
        }
        KeyCheck::Unknown => {
            tracing::info!("server API: unknown key refused");
            Err(ApiError::new(ErrorCode::Unauthorized, "unknown API key"))
        }
    }
}

/// A JSON body, or `bad_request` saying what is wrong with it.
fn body<T: serde::de::DeserializeOwned>(bytes: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("request body: {e}")))
}

/// A write's key (named in the request's span) and its JSON body.
fn keyed<T: serde::de::DeserializeOwned>(
    state: &AppState,
    headers: &HeaderMap,
    bytes: &Bytes,
) -> ApiResult<(Arc<str>, T)> {
    let key = key_of(state, headers)?;
    tracing::Span::current().record("key", &*key);
    Ok((key, body(bytes)?))
}

fn owner_checked(owner: &str) -> ApiResult<()> {
    check_owner(owner).map_err(|e| ApiError::new(ErrorCode::BadRequest, e))
}

#[derive(Deserialize)]
struct StartBody {
    kind: String,
    #[serde(default = "empty_object")]
    params: serde_json::Value,
    #[serde(default)]
    owner: String,
    webhook: Option<String>,
}

fn empty_object() -> serde_json::Value {
    json!({})
}

/// `POST /api/v1/tasks` → `201 {"task", "watch_token"}`.
#[tracing::instrument(skip_all, fields(key))]
async fn start(
    State(state): State<AppState>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult<Response> {
    let (key, req): (_, StartBody) = keyed(&state, &headers, &bytes)?;
    owner_checked(&req.owner)?;
    if req.kind.is_empty() || req.kind.len() > app::protocol::MAX_ID_BYTES {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("kind: 1 to {} bytes", app::protocol::MAX_ID_BYTES),
        ));
    }
    if !req.params.is_object() {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "params: must be a JSON object",
        ));
    }
    let limits = &state.config.limits;
    let params_bytes = serde_json::to_string(&req.params).map_or(usize::MAX, |s| s.len());
    if params_bytes as u64 > limits.max_params_bytes {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("params: over {} bytes", limits.max_params_bytes),
        ));
    }
    if let Some(url) = &req.webhook {
        state
            .engine
            .check_webhook(url)
            .map_err(|e| ApiError::new(ErrorCode::InvalidParams, format!("webhook: {e}")))?;
    }
    let session = owner_session(&key, &req.owner);
    state.engine.open_owner(&session).await;
    let start_limits = StartLimits {
        per_window: limits.max_starts_per_min,
        max_live: limits.max_live_tasks_per_session,
    };
    let ticket = state.engine.admit_start(&session, start_limits).await?;
    let task = state
        .engine
        .start_for(
            &session,
            ticket,
            &req.kind,
            req.params,
            req.webhook.as_deref(),
        )
        .await;
    let task = match task {
        Ok(task) => task,
        Err(refused) => {
            crate::metrics::api_request(&key, refused.code.as_str());
            return Err(refused.into());
        }
    };
    crate::metrics::api_request(&key, "started");
    tracing::info!(task = %task.id, kind = %task.kind, "server API: task started");
    let claims = Claims {
        scope: Scope {
            key: key.to_string(),
            owner: req.owner,
            task: Some(task.id.clone()),
        },
        cancel: false,
        expires_ms: state.engine.now_ms() + state.config.token_ttl_s * 1000,
    };
    let watch_token = state.auth.signer.sign(&claims);
    Ok((
        StatusCode::CREATED,
        Json(json!({"task": task, "watch_token": watch_token})),
    )
        .into_response())
}

/// The session of a task that belongs to one of `key`'s owners, else `not_found`.
async fn session_of_key(state: &AppState, key: &str, id: &str) -> ApiResult<Arc<str>> {
    let not_found = || ApiError::new(ErrorCode::NotFound, format!("no task `{id}`"));
    let session = state
        .engine
        .session_of(id)
        .await
        .map_err(|e| ApiError::new(ErrorCode::BackendUnavailable, format!("store: {e}")))?;
    let prefix = owner_session(key, "");
    match session {
        Some(s) if s.starts_with(&*prefix) => Ok(s),
        _ => Err(not_found()),
    }
}

/// `GET /api/v1/tasks/{id}` → `200 Task`.
async fn read(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Task>> {
    let key = key_of(&state, &headers)?;
    let session = session_of_key(&state, &key, &id).await?;
    state
        .engine
        .task_of(&session, &id)
        .await
        .map(Json)
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no task `{id}`")))
}

/// `DELETE /api/v1/tasks/{id}` → `200 Task` (a finished task unchanged).
#[tracing::instrument(skip_all, fields(key, task = %id))]
async fn cancel(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Task>> {
    let key = key_of(&state, &headers)?;
    tracing::Span::current().record("key", &*key);
    let session = session_of_key(&state, &key, &id).await?;
    Ok(Json(state.engine.cancel_for(&session, &id).await?))
}

#[derive(Deserialize)]
struct ListQuery {
    owner: Option<String>,
}

/// `GET /api/v1/tasks?owner=` → `200 {"tasks": [...]}`, newest first.
async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let key = key_of(&state, &headers)?;
    let Ok(Query(query)) = query else {
        return Err(ApiError::new(ErrorCode::BadRequest, "bad query string"));
    };
    let owner = query.owner.unwrap_or_default();
    owner_checked(&owner)?;
    let tasks = state
        .engine
        .tasks_of(&owner_session(&key, &owner))
        .await
        .map_err(|e| ApiError::new(ErrorCode::BackendUnavailable, format!("store: {e}")))?;
    Ok(Json(json!({ "tasks": tasks })))
}

#[derive(Deserialize)]
struct TokenBody {
    owner: Option<String>,
    task: Option<String>,
    ttl_s: Option<u64>,
    #[serde(default)]
    cancel: bool,
}

/// `POST /api/v1/tokens` → `201 {"watch_token", "expires_ms"}`.
#[tracing::instrument(skip_all, fields(key))]
async fn token(
    State(state): State<AppState>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult<Response> {
    let (key, req): (_, TokenBody) = keyed(&state, &headers, &bytes)?;
    let ttl_s = req.ttl_s.unwrap_or(state.config.token_ttl_s);
    if !(1..=MAX_TOKEN_TTL_S).contains(&ttl_s) {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("ttl_s: 1 to {MAX_TOKEN_TTL_S}"),
        ));
    }
    let scope = match (req.owner, req.task) {
        (Some(owner), None) => {
            owner_checked(&owner)?;
            Scope {
                key: key.to_string(),
                owner,
                task: None,
            }
        }
        (None, Some(task)) => {
            let session = session_of_key(&state, &key, &task).await?;
            let owner = session[owner_session(&key, "").len()..].to_string();
            Scope {
                key: key.to_string(),
                owner,
                task: Some(task),
            }
        }
        _ => {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                "give `owner` or `task` (one of them)",
            ))
        }
    };
    let expires_ms = state.engine.now_ms() + ttl_s * 1000;
    let claims = Claims {
        scope,
        cancel: req.cancel,
        expires_ms,
    };
    crate::metrics::api_request(&key, "token");
    Ok((
        StatusCode::CREATED,
        Json(json!({"watch_token": state.auth.signer.sign(&claims), "expires_ms": expires_ms})),
    )
        .into_response())
}
