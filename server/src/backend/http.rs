//! The HTTP adapter: contract section 2 spoken to any task service, over a
//! pooled keep-alive HTTP/1.1 client, with a timeout on every request.

use super::types::{RejectBody, RejectCode, StartRequest, StartResponse, Status};
use super::BackendError;
use app::protocol::ErrorCode;
use reqwest::{header::RETRY_AFTER, Client, Response, StatusCode};
use std::time::Duration;

/// Idle keep-alive connections kept per host; enough for the poll pool.
const POOL_MAX_IDLE_PER_HOST: usize = 1024;
/// Longest body read from the task service.
const MAX_BODY_BYTES: usize = 1 << 20;

#[derive(Clone)]
pub struct HttpBackend {
    client: Client,
    base_url: String,
}

impl HttpBackend {
    pub fn new(base_url: &str, timeout: Duration) -> Result<Self, BackendError> {
        let client = Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| BackendError::Protocol(format!("cannot build the HTTP client: {e}")))?;
        Ok(HttpBackend {
            client,
            base_url: base_url.trim_end_matches('/').to_string(),
        })
    }

    pub async fn start(
        &self,
        kind: &str,
        params: &serde_json::Value,
    ) -> Result<String, BackendError> {
        let body = StartRequest {
            kind: kind.to_string(),
            params: params.clone(),
        };
        let resp = self
            .client
            .post(format!("{}/tasks", self.base_url))
            .json(&body)
            .send()
            .await
            .map_err(transport)?;
        match resp.status() {
            StatusCode::CREATED | StatusCode::OK => Ok(read_json::<StartResponse>(resp).await?.id),
            StatusCode::BAD_REQUEST => {
                let reject: RejectBody = read_json(resp).await?;
                Err(BackendError::Rejected {
                    code: match reject.code {
                        RejectCode::UnknownKind => ErrorCode::UnknownKind,
                        RejectCode::InvalidParams => ErrorCode::InvalidParams,
                    },
                    message: reject.error,
                })
            }
            _ => Err(unexpected(resp)),
        }
    }

    pub async fn status(&self, id: &str) -> Result<Status, BackendError> {
        let resp = self
            .client
            .get(self.task_url(id))
            .send()
            .await
            .map_err(transport)?;
        status_reply(resp).await
    }

    pub async fn cancel(&self, id: &str) -> Result<Status, BackendError> {
        let resp = self
            .client
            .delete(self.task_url(id))
            .send()
            .await
            .map_err(transport)?;
        status_reply(resp).await
    }

    fn task_url(&self, id: &str) -> String {
        // Ids come from the task service; escape the few characters that
        // would change the path anyway.
        let id: String = id
            .chars()
            .map(|c| match c {
                '/' | '?' | '#' | '%' | ' ' => '_',
                c => c,
            })
            .collect();
        format!("{}/tasks/{id}", self.base_url)
    }
}

async fn status_reply(resp: Response) -> Result<Status, BackendError> {
    match resp.status() {
        StatusCode::OK => read_json(resp).await,
        StatusCode::NOT_FOUND => Err(BackendError::NotFound),
        _ => Err(unexpected(resp)),
    }
}

fn transport(e: reqwest::Error) -> BackendError {
    if e.is_timeout() {
        BackendError::unavailable("timeout", "timed out")
    } else if e.is_connect() {
        BackendError::unavailable("refused", "connection refused")
    } else {
        BackendError::unavailable("transport", format!("request failed: {e}"))
    }
}

/// Anything but the answers a route documents: 429/503/5xx are "try later",
/// the rest breaks the contract.
fn unexpected(resp: Response) -> BackendError {
    let status = resp.status();
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        BackendError::Unavailable {
            kind: match status.as_u16() {
                429 => "http_429",
                503 => "http_503",
                _ => "http_5xx",
            },
            reason: format!("answered {status}"),
            retry_after,
        }
    } else {
        BackendError::Protocol(format!("unexpected status {status}"))
    }
}

async fn read_json<T: serde::de::DeserializeOwned>(resp: Response) -> Result<T, BackendError> {
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_BODY_BYTES as u64)
    {
        return Err(BackendError::Protocol("response body too large".into()));
    }
    let bytes = resp.bytes().await.map_err(transport)?;
    if bytes.len() > MAX_BODY_BYTES {
        return Err(BackendError::Protocol("response body too large".into()));
    }
    serde_json::from_slice(&bytes).map_err(|e| BackendError::Protocol(format!("bad JSON: {e}")))
}
