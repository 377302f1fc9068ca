//! The HTTP adapter: the task-service API (docs/protocol.md) spoken to any
//! task service over HTTP/1.1 keep-alive connections, with a timeout on
//! every request.
//!
//! A lean client on hyper's connection API rather than a general one: the
//! base URL is parsed once, a request is a method, a path and perhaps a
//! body, and a poll borrows an idle connection from a stack and gives it
//! back. A general client (reqwest) parsed the URL, ran IDNA and walked its
//! pool layers on every poll; this one costs a fraction of that.

use super::BackendError;
use crate::task_api::{RejectBody, RejectCode, StartRequest, StartResponse, Status};
use app::protocol::ErrorCode;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{CONTENT_TYPE, HOST, RETRY_AFTER};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;

/// Idle keep-alive connections kept; enough for the poll pool.
const MAX_IDLE: usize = 1024;
/// Longest body read from the task service.
const MAX_BODY_BYTES: usize = 1 << 20;

#[derive(Clone)]
pub struct HttpBackend {
    inner: Arc<Inner>,
}

struct Inner {
    /// `host:port` to connect to, and the `Host` header.
    authority: String,
    /// The base URL's path, without a trailing `/` (often empty).
    prefix: String,
    timeout: Duration,
    /// Idle connections, most recently used last.
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

/// An answer: status, `Retry-After` (seconds) if any, body.
struct Answer {
    status: StatusCode,
    retry_after: Option<u64>,
    body: Bytes,
}

impl HttpBackend {
    pub fn new(base_url: &str, timeout: Duration) -> Result<Self, BackendError> {
        let rest = base_url.strip_prefix("http://").ok_or_else(|| {
            BackendError::Protocol(format!(
                "`{base_url}`: only http:// task services are supported (put a TLS proxy in front)"
            ))
        })?;
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains(['@', '?', '#']) {
            return Err(BackendError::Protocol(format!(
                "`{base_url}` is not a usable base URL"
            )));
        }
        let authority = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        Ok(HttpBackend {
            inner: Arc::new(Inner {
                authority,
                prefix: prefix.to_string(),
                timeout,
                idle: Mutex::new(Vec::new()),
            }),
        })
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

    /// One request with the timeout around all of it (connecting
    /// included). A GET or DELETE that fails on a reused connection (the
    /// service closed it while idle) is tried once more on a new one.
    async fn request(
        &self,
        method: Method,
        path: String,
        body: Option<Bytes>,
    ) -> Result<Answer, BackendError> {
        let inner = &self.inner;
        let attempt = async {
            let retry_safe = method != Method::POST;
            let (conn, reused) = match self.checkout() {
                Some(c) => (c, true),
                None => (self.connect().await?, false),
            };
            match self.send(conn, &method, &path, body.clone()).await {
                Err(_) if reused && retry_safe => {
                    let conn = self.connect().await?;
                    self.send(conn, &method, &path, body).await
                }
                other => other,
            }
        };
        tokio::time::timeout(inner.timeout, attempt)
            .await
            .unwrap_or_else(|_| Err(BackendError::unavailable("timeout", "timed out")))
    }

    fn checkout(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.inner.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(conn) = idle.pop() {
            if !conn.is_closed() {
                return Some(conn);
            }
        }
        None
    }

    fn checkin(&self, conn: SendRequest<Full<Bytes>>) {
        if conn.is_closed() {
            return;
        }
        let mut idle = self.inner.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, BackendError> {
        let stream = TcpStream::connect(&self.inner.authority)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    BackendError::unavailable("refused", "connection refused")
                }
                _ => BackendError::unavailable("connect", format!("cannot connect: {e}")),
            })?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| BackendError::unavailable("transport", format!("handshake: {e}")))?;
        tokio::spawn(async move {
            // Ends when the service closes the connection or the sender is dropped.
            let _ = conn.await;
        });
        Ok(sender)
    }

    async fn send(
        &self,
        mut conn: SendRequest<Full<Bytes>>,
        method: &Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<Answer, BackendError> {
        conn.ready().await.map_err(transport)?;
        let mut req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(HOST, &self.inner.authority);
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| BackendError::Protocol(format!("cannot build the request: {e}")))?;
        let resp = conn.send_request(req).await.map_err(transport)?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let body = Limited::new(resp.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    BackendError::Protocol("response body too large".into())
                } else {
                    BackendError::unavailable("transport", format!("reading the answer: {e}"))
                }
            })?
            .to_bytes();
        self.checkin(conn);
        Ok(Answer {
            status,
            retry_after,
            body,
        })
    }
}

fn status_reply(answer: &Answer) -> Result<Status, BackendError> {
    match answer.status {
        StatusCode::OK => json(answer),
        StatusCode::NOT_FOUND => Err(BackendError::NotFound),
        _ => Err(unexpected(answer)),
    }
}

fn transport(e: hyper::Error) -> BackendError {
    BackendError::unavailable("transport", format!("request failed: {e}"))
}

/// Anything but the answers a route documents: 429/503/5xx are "try later",
/// the rest breaks the contract.
fn unexpected(answer: &Answer) -> BackendError {
    let status = answer.status;
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        BackendError::Unavailable {
            kind: match status.as_u16() {
                429 => "http_429",
                503 => "http_503",
                _ => "http_5xx",
            },
            reason: format!("answered {status}"),
            retry_after: answer.retry_after.map(Duration::from_secs),
        }
    } else {
        BackendError::Protocol(format!("unexpected status {status}"))
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
        let b = HttpBackend::new("http://127.0.0.1:4000", Duration::from_secs(1)).unwrap();
        assert_eq!(b.inner.authority, "127.0.0.1:4000");
        assert_eq!(b.task_path("abc"), "/tasks/abc");
        let b = HttpBackend::new("http://svc/api/", Duration::from_secs(1)).unwrap();
        assert_eq!(b.inner.authority, "svc:80");
        assert_eq!(b.task_path("a/b?c d"), "/api/tasks/a_b_c_d");
        assert!(HttpBackend::new("https://svc", Duration::from_secs(1)).is_err());
        assert!(HttpBackend::new("http:///x", Duration::from_secs(1)).is_err());
    }
}
