//! The lean HTTP/1.1 client both HTTP adapters share: one base URL parsed
//! once, keep-alive connections on a stack, a timeout around every request.
//!
//! Built on hyper's connection API rather than a general client: reqwest
//! parsed the URL, ran IDNA and walked its pool layers on every poll; this
//! costs a fraction of that.

use super::pipeline::Pipeline;
use super::tls::TlsConnector;
use super::BackendError;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST, RETRY_AFTER};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::rustls::pki_types::ServerName;

/// Idle keep-alive connections kept when the owner names no bound: the
/// default poll pool's size (`max_concurrent_polls`); the task-service
/// adapter passes its own pool's size ([`Client::with_max_idle`]).
const DEFAULT_MAX_IDLE: usize = 512;
/// An idle connection unused this long is closed: a burst of starts opens
/// many connections at once, and steady polling reuses only the few most
/// recently used ones (the stack is last in, first out), so the rest would
/// otherwise stay open, each with hyper's buffers and its task, for good.
pub(crate) const IDLE_EXPIRY: Duration = Duration::from_secs(5);
/// Longest body read from the task service.
pub(crate) const MAX_BODY_BYTES: usize = 1 << 20;

/// A connection to the service, plain or TLS.
pub(crate) trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}
pub(crate) type Stream = Box<dyn Io>;

pub(crate) struct Client {
    /// `host:port` to connect to, and the `Host` header.
    pub(crate) authority: String,
    /// The base URL's path, without a trailing `/` (often empty).
    pub(crate) prefix: String,
    timeout: Duration,
    /// For an `https://` base URL: the connector and the name the
    /// certificate must carry.
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// Idle connections with when each was checked in, most recently used
    /// last (reused from the back, expired from the front).
    idle: Mutex<VecDeque<(SendRequest<Full<Bytes>>, Instant)>>,
    max_idle: usize,
    /// `GET`s pipelined ([`Client::set_pipeline`]), else none.
    pipeline: Option<Pipeline>,
}

/// An answer: status, `Retry-After` (seconds) if any, body.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) retry_after: Option<u64>,
    pub(crate) body: Bytes,
}

impl Client {
    pub(crate) fn new(base_url: &str, timeout: Duration) -> Result<Self, BackendError> {
        Client::with_tls(base_url, timeout, None)
    }

    /// A client of an `http://` base URL, or of an `https://` one over `tls`.
    pub(crate) fn with_tls(
        base_url: &str,
        timeout: Duration,
        tls: Option<&TlsConnector>,
    ) -> Result<Self, BackendError> {
        let (rest, default_port, tls) = match (base_url.strip_prefix("https://"), tls) {
            (Some(rest), Some(tls)) => (rest, 443, Some(tls)),
            _ => match base_url.strip_prefix("http://") {
                Some(rest) => (rest, 80, None),
                None => {
                    return Err(BackendError::Protocol(format!(
                        "`{base_url}`: only http:// task services are supported (put a TLS proxy in front)"
                    )))
                }
            },
        };
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
            format!("{authority}:{default_port}")
        };
        let tls = match tls {
            None => None,
            Some(connector) => {
                let host = authority
                    .rsplit_once(':')
                    .map_or(authority.as_str(), |(h, _)| h)
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                let name = ServerName::try_from(host.to_string()).map_err(|e| {
                    BackendError::Protocol(format!("`{base_url}`: not a TLS server name: {e}"))
                })?;
                Some((connector.clone(), name))
            }
        };
        Ok(Client {
            authority,
            prefix: prefix.to_string(),
            timeout,
            tls,
            idle: Mutex::new(VecDeque::new()),
            max_idle: DEFAULT_MAX_IDLE,
            pipeline: None,
        })
    }

    /// Sends the `GET`s without a body pipelined, up to `depth` on one
    /// connection at a time and over at most `max_in_flight / depth`
    /// connections (rounded up); `depth` below 2 leaves pipelining off.
    pub(crate) fn set_pipeline(&mut self, depth: usize, max_in_flight: usize) {
        self.pipeline = (depth >= 2).then(|| {
            Pipeline::new(
                self.authority.clone(),
                self.tls.clone(),
                depth,
                max_in_flight.div_ceil(depth),
                self.timeout,
            )
        });
    }

    /// Keeps at most `max_idle` idle connections (at least one).
    pub(crate) fn with_max_idle(mut self, max_idle: usize) -> Self {
        self.max_idle = max_idle.max(1);
        self
    }

    /// One request with the timeout around all of it (connecting
    /// included). `path_and_query` is sent as is (the caller adds
    /// [`Client::prefix`]); `Content-Type: application/json` goes with a
    /// body unless `headers` name one. A request other than POST that fails
    /// on a reused connection (the service closed it while idle) is tried
    /// once more on a new one.
    pub(crate) async fn request(
        &self,
        method: Method,
        path_and_query: &str,
        headers: &[(HeaderName, HeaderValue)],
        body: Option<Bytes>,
    ) -> Result<Answer, BackendError> {
        if let Some(pipeline) = &self.pipeline {
            // A target hyper would refuse (not plain visible ASCII) takes
            // hyper's path, and its error.
            if method == Method::GET
                && body.is_none()
                && path_and_query.bytes().all(|b| b.is_ascii_graphic())
            {
                let head = self.head(path_and_query, headers);
                return tokio::time::timeout(self.timeout, pipeline.request(head))
                    .await
                    .unwrap_or_else(|_| Err(BackendError::unavailable("timeout", "timed out")));
            }
        }
        let attempt = async {
            let retry_safe = method != Method::POST;
            let (conn, reused) = match self.checkout() {
                Some(c) => (c, true),
                None => (self.connect().await?, false),
            };
            match self
                .send(conn, &method, path_and_query, headers, body.clone())
                .await
            {
                Err(_) if reused && retry_safe => {
                    let conn = self.connect().await?;
                    self.send(conn, &method, path_and_query, headers, body)
                        .await
                }
                other => other,
            }
        };
        tokio::time::timeout(self.timeout, attempt)
            .await
            .unwrap_or_else(|_| Err(BackendError::unavailable("timeout", "timed out")))
    }

    /// A bodiless `GET`'s request head, as hyper would write it.
    fn head(&self, path_and_query: &str, headers: &[(HeaderName, HeaderValue)]) -> Bytes {
        let mut head = Vec::with_capacity(64 + path_and_query.len());
        head.extend_from_slice(b"GET ");
        head.extend_from_slice(path_and_query.as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        head.extend_from_slice(self.authority.as_bytes());
        head.extend_from_slice(b"\r\n");
        for (name, value) in headers {
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        Bytes::from(head)
    }

    fn checkout(&self) -> Option<SendRequest<Full<Bytes>>> {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        expire(&mut idle, now);
        while let Some((conn, _)) = idle.pop_back() {
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
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        expire(&mut idle, now);
        if idle.len() < self.max_idle {
            idle.push_back((conn, now));
        }
    }

    /// Idle connections kept (for tests).
    #[cfg(test)]
    pub(crate) fn idle_len(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, BackendError> {
        handshake(open(&self.authority, self.tls.as_ref()).await?).await
    }

    async fn send(
        &self,
        mut conn: SendRequest<Full<Bytes>>,
        method: &Method,
        path_and_query: &str,
        headers: &[(HeaderName, HeaderValue)],
        body: Option<Bytes>,
    ) -> Result<Answer, BackendError> {
        conn.ready().await.map_err(transport)?;
        let mut req = Request::builder()
            .method(method.clone())
            .uri(path_and_query)
            .header(HOST, &self.authority);
        if body.is_some() && !headers.iter().any(|(name, _)| name == CONTENT_TYPE) {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        for (name, value) in headers {
            req = req.header(name, value);
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

/// Drops the idle connections checked in more than [`IDLE_EXPIRY`] ago
/// (dropping the sender ends the connection's task, which closes it). The
/// oldest are at the front, so this stops at the first fresh one: O(1)
/// per call apart from the connections it drops.
fn expire<T>(idle: &mut VecDeque<(T, Instant)>, now: Instant) {
    while idle
        .front()
        .is_some_and(|(_, since)| now.saturating_duration_since(*since) > IDLE_EXPIRY)
    {
        idle.pop_front();
    }
}

/// A connection to `authority` (`host:port`), over TLS when `tls` names
/// the connector and the certificate's name.
pub(crate) async fn open(
    authority: &str,
    tls: Option<&(TlsConnector, ServerName<'static>)>,
) -> Result<Stream, BackendError> {
    let stream = TcpStream::connect(authority)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::ConnectionRefused => {
                BackendError::unavailable("refused", "connection refused")
            }
            _ => BackendError::unavailable("connect", format!("cannot connect: {e}")),
        })?;
    let _ = stream.set_nodelay(true);
    match tls {
        None => Ok(Box::new(stream)),
        Some((connector, name)) => {
            let stream = connector
                .connect(name.clone(), stream)
                .await
                .map_err(|e| BackendError::unavailable("tls", format!("TLS: {e}")))?;
            Ok(Box::new(stream))
        }
    }
}

/// HTTP/1.1 over `io`; the connection is driven by its own task, which
/// ends when the peer closes it or the sender is dropped.
async fn handshake<IO>(io: IO) -> Result<SendRequest<Full<Bytes>>, BackendError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| BackendError::unavailable("transport", format!("handshake: {e}")))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

fn transport(e: hyper::Error) -> BackendError {
    BackendError::unavailable("transport", format!("request failed: {e}"))
}

/// Anything but the answers a route documents: 429/503/5xx are "try later",
/// the rest breaks the contract.
pub(crate) fn unexpected(answer: &Answer) -> BackendError {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_connections_expire_oldest_first_and_only_past_the_expiry() {
        let t0 = Instant::now();
        let mut idle: VecDeque<(u32, Instant)> = VecDeque::new();
        idle.push_back((1, t0));
        idle.push_back((2, t0 + Duration::from_secs(1)));
        idle.push_back((3, t0 + Duration::from_secs(4)));
        expire(&mut idle, t0 + IDLE_EXPIRY);
        assert_eq!(idle.len(), 3, "exactly at the expiry: kept");
        expire(&mut idle, t0 + IDLE_EXPIRY + Duration::from_millis(1500));
        assert_eq!(idle.iter().map(|(c, _)| *c).collect::<Vec<_>>(), [3]);
        expire(&mut idle, t0 + Duration::from_secs(60));
        assert!(idle.is_empty());
    }

    #[test]
    fn max_idle_is_at_least_one() {
        let c = Client::new("http://127.0.0.1:1", Duration::from_secs(1))
            .unwrap()
            .with_max_idle(0);
        assert_eq!(c.max_idle, 1);
        assert_eq!(c.idle_len(), 0);
    }
}
