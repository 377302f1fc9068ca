//! The HTTP adapter: the task-service API (docs/protocol.md) spoken to any
//! task service over HTTP/1.1 keep-alive connections, with a timeout on
//! every request (the connections and the timeout are [`Client`]'s).

use super::client::{unexpected, Answer, Client};
use super::BackendError;
use crate::task_api::{RejectBody, RejectCode, StartRequest, StartResponse, Status};
use app::protocol::ErrorCode;
use hyper::{Method, StatusCode};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
pub struct HttpBackend {
    inner: Arc<Client>,
}

impl HttpBackend {
    /// `max_idle`: idle keep-alive connections kept, at most (the poll
    /// pool's size: more are never in use at once by polls).
    pub fn new(base_url: &str, timeout: Duration, max_idle: usize) -> Result<Self, BackendError> {
        Ok(HttpBackend {
            inner: Arc::new(Client::new(base_url, timeout)?.with_max_idle(max_idle)),
        })
    }

    /// Its polls pipelined ([`Client::set_pipeline`]); before any clone.
    pub fn with_pipeline(mut self, depth: usize, max_in_flight: usize) -> Self {
        if let Some(client) = Arc::get_mut(&mut self.inner) {
            client.set_pipeline(depth, max_in_flight);
        }
        self
    }

    pub async fn start(
        &self,
        kind: &str,
        params: &serde_json::Value,
    ) -> Result<String, BackendError> {
        let body = serde_json::to_vec(&StartRequest {
            kind: kind.to_string(),
            params: params.clone(),
        })
        .map_err(|e| BackendError::Protocol(format!("cannot encode the request: {e}")))?;
        let path = format!("{}/tasks", self.inner.prefix);
        let answer = self.request(Method::POST, path, Some(body.into())).await?;
        match answer.status {
            StatusCode::CREATED | StatusCode::OK => Ok(json::<StartResponse>(&answer)?.id),
            StatusCode::BAD_REQUEST => {
                let reject: RejectBody = json(&answer)?;
                Err(BackendError::Rejected {
                    code: match reject.code {
                        RejectCode::UnknownKind => ErrorCode::UnknownKind,
                        RejectCode::InvalidParams => ErrorCode::InvalidParams,
                    },
                    message: reject.error,
                })
            }
            _ => Err(unexpected(&answer)),
        }
    }

    pub async fn status(&self, id: &str) -> Result<Status, BackendError> {
        let answer = self.request(Method::GET, self.task_path(id), None).await?;
        status_reply(&answer)
    }

    pub async fn cancel(&self, id: &str) -> Result<Status, BackendError> {
        let answer = self
            .request(Method::DELETE, self.task_path(id), None)
            .await?;
        status_reply(&answer)
    }

    fn task_path(&self, id: &str) -> String {
        let mut path = String::with_capacity(self.inner.prefix.len() + 7 + id.len());
        path.push_str(&self.inner.prefix);
        path.push_str("/tasks/");
        // Ids come from the task service; replace what would change the
        // path or is not allowed in a request line.
        path.extend(id.chars().map(|c| match c {
            '/' | '?' | '#' | '%' => '_',
            c if c.is_ascii_graphic() => c,
            _ => '_',
        }));
        path
    }

    async fn request(
        &self,
        method: Method,
        path: String,
        body: Option<bytes::Bytes>,
    ) -> Result<Answer, BackendError> {
        self.inner.request(method, &path, &[], body).await
    }
}

fn status_reply(answer: &Answer) -> Result<Status, BackendError> {
    match answer.status {
        StatusCode::OK => json(answer),
        StatusCode::NOT_FOUND => Err(BackendError::NotFound),
        _ => Err(unexpected(answer)),
    }
}

fn json<T: serde::de::DeserializeOwned>(answer: &Answer) -> Result<T, BackendError> {
    serde_json::from_slice(&answer.body)
        .map_err(|e| BackendError::Protocol(format!("bad JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_parse_once() {
        let b = HttpBackend::new("http://127.0.0.1:4000", Duration::from_secs(1), 8).unwrap();
        assert_eq!(b.inner.authority, "127.0.0.1:4000");
        assert_eq!(b.task_path("abc"), "/tasks/abc");
        let b = HttpBackend::new("http://svc/api/", Duration::from_secs(1), 8).unwrap();
        assert_eq!(b.inner.authority, "svc:80");
        assert_eq!(b.task_path("a/b?c d"), "/api/tasks/a_b_c_d");
        assert!(HttpBackend::new("https://svc", Duration::from_secs(1), 8).is_err());
        assert!(HttpBackend::new("http:///x", Duration::from_secs(1), 8).is_err());
    }
}
