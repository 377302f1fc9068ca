//! HTTP/1.1 pipelining of a backend's `GET`s (`pipeline_depth`, off unless
//! set): the polls due together share a few keep-alive connections, each
//! connection writing up to `depth` requests in one write and reading the
//! answers in order from one buffer, so a batch of polls costs one `write`
//! and about one `read` instead of one of each per poll, and one wake of
//! the connection's task instead of one per poll.
//!
//! Only `GET`s go this way (a repeat is harmless, so a batch cut short by a
//! closed connection is sent again once); starts and cancels keep their
//! own connection each ([`super::client::Client`]).
//!
//! The queue holds at most what the backend's poll permits let in
//! (`max_concurrent_polls`), and a connection's batch at most `depth`.
//! Connections are opened when a request finds none waiting (up to
//! `max_conns`) and closed after [`IDLE_EXPIRY`] without work.

use super::client::{open, Answer, Stream, IDLE_EXPIRY, MAX_BODY_BYTES};
use super::tls::TlsConnector;
use super::BackendError;
use crate::metrics as m;
use bytes::{Buf, Bytes, BytesMut};
use hyper::StatusCode;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, Notify};
use tokio_rustls::rustls::pki_types::ServerName;

/// Longest answer head (status line and headers) read.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most headers an answer may carry.
const MAX_HEADERS: usize = 64;

/// The pipelined connections of one backend.
pub(crate) struct Pipeline {
    shared: Arc<Shared>,
}

struct Shared {
    authority: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    depth: usize,
    max_conns: usize,
    timeout: Duration,
    state: Mutex<State>,
    /// Wakes a connection waiting for work.
    work: Notify,
    requests: metrics::Counter,
    batches: metrics::Counter,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    /// Connections open or opening.
    conns: usize,
    /// Connections waiting for work.
    waiting: usize,
}

struct Job {
    /// The request, head only (a `GET` has no body).
    head: Bytes,
    reply: oneshot::Sender<Result<Answer, BackendError>>,
    /// Sent once already, on a connection that closed before answering.
    retried: bool,
}

impl Pipeline {
    pub(crate) fn new(
        authority: String,
        tls: Option<(TlsConnector, ServerName<'static>)>,
        depth: usize,
        max_conns: usize,
        timeout: Duration,
    ) -> Self {
        Pipeline {
            shared: Arc::new(Shared {
                requests: metrics::counter!(m::PIPELINED_REQUESTS, "service" => authority.clone()),
                batches: metrics::counter!(m::PIPELINED_BATCHES, "service" => authority.clone()),
                authority,
                tls,
                depth: depth.max(1),
                max_conns: max_conns.max(1),
                timeout,
                state: Mutex::new(State::default()),
                work: Notify::new(),
            }),
        }
    }

    /// Sends `head` (a whole `GET` request) on a pipelined connection and
    /// waits for its answer (the caller bounds the wait).
    pub(crate) async fn request(&self, head: Bytes) -> Result<Answer, BackendError> {
        let (reply, answer) = oneshot::channel();
        self.shared.submit(Job {
            head,
            reply,
            retried: false,
        });
        answer.await.unwrap_or_else(|_| {
            Err(BackendError::unavailable(
                "transport",
                "the connection ended before answering",
            ))
        })
    }

    /// Connections open or opening (for tests).
    #[cfg(test)]
    pub(crate) fn conns(&self) -> usize {
        self.shared.lock().conns
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `job`. A waiting connection is woken when the queue was
    /// empty (the jobs queued after it, before it runs, go in its batch);
    /// with none waiting, a new one is opened only when more wait than the
    /// busy ones take in their next batches. So a burst of polls fills a
    /// few connections' batches rather than spreading one request over
    /// each of many.
    fn submit(self: &Arc<Self>, job: Job) {
        let mut st = self.lock();
        st.queue.push_back(job);
        let open = st.waiting == 0
            && st.conns < self.max_conns
            && st.queue.len() > st.conns.saturating_mul(self.depth);
        if open {
            st.conns += 1;
        }
        let wake = st.waiting > 0 && st.queue.len() == 1;
        drop(st);
        if open {
            tokio::spawn(run(self.clone()));
        } else if wake {
            self.work.notify_one();
        }
    }

    /// Puts back, in their order, the jobs of a batch a connection could
    /// not finish, for another connection.
    fn requeue(&self, jobs: impl DoubleEndedIterator<Item = Job>) {
        let mut st = self.lock();
        for job in jobs.rev() {
            st.queue.push_front(job);
        }
        drop(st);
        self.work.notify_one();
    }

    /// Fills `batch` with the next jobs (up to `depth` whose caller still
    /// waits): `true`; or `false` once nothing came for [`IDLE_EXPIRY`]
    /// (the connection is then counted out).
    async fn next_batch(&self, batch: &mut VecDeque<Job>) -> bool {
        loop {
            {
                let mut st = self.lock();
                while batch.len() < self.depth {
                    match st.queue.pop_front() {
                        Some(job) if job.reply.is_closed() => {}
                        Some(job) => batch.push_back(job),
                        None => break,
                    }
                }
                if !batch.is_empty() {
                    // Another full batch waits: wake a connection for it
                    // (less than that waits for the next one free).
                    if st.queue.len() >= self.depth && st.waiting > 0 {
                        self.work.notify_one();
                    }
                    return true;
                }
                st.waiting += 1;
            }
            let woken = tokio::time::timeout(IDLE_EXPIRY, self.work.notified())
                .await
                .is_ok();
            // Let the polls woken together with the first one queue theirs.
            tokio::task::yield_now().await;
            let mut st = self.lock();
            st.waiting -= 1;
            if !woken && st.queue.is_empty() {
                st.conns -= 1;
                return false;
            }
        }
    }

    /// A connection gone (failed or closed): counted out, and the queue
    /// handed to a new one if work is left and nobody waits for it.
    fn conn_gone(self: &Arc<Self>) {
        let mut st = self.lock();
        st.conns -= 1;
        let open = !st.queue.is_empty() && st.waiting == 0 && st.conns < self.max_conns;
        if open {
            st.conns += 1;
        }
        drop(st);
        if open {
            tokio::spawn(run(self.clone()));
        }
    }
}

/// Why an exchange stopped.
enum Cut {
    /// The idle wait ran out: the connection closes, nothing pending.
    Idle,
    /// The connection cannot carry more: the batch's unanswered jobs are
    /// sent again elsewhere (once) or failed with this error.
    Broken(BackendError),
}

/// One connection's life: take a batch, write it, read its answers, again.
async fn run(shared: Arc<Shared>) {
    let mut batch = VecDeque::with_capacity(shared.depth);
    let mut stream: Option<Stream> = None;
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let cut = loop {
        if !shared.next_batch(&mut batch).await {
            break Cut::Idle;
        }
        let io = match &mut stream {
            Some(io) => io,
            None => {
                let opened = tokio::time::timeout(
                    shared.timeout,
                    open(&shared.authority, shared.tls.as_ref()),
                )
                .await
                .unwrap_or_else(|_| Err(BackendError::unavailable("timeout", "timed out")));
                match opened {
                    Ok(io) => stream.insert(io),
                    Err(e) => {
                        // Nothing was sent: these jobs fail as a request
                        // without pipelining would.
                        for job in batch.drain(..) {
                            let _ = job.reply.send(Err(e.clone()));
                        }
                        break Cut::Broken(e);
                    }
                }
            }
        };
        out.clear();
        for job in &batch {
            out.extend_from_slice(&job.head);
        }
        shared.batches.increment(1);
        shared.requests.increment(batch.len() as u64);
        // The answers are handed over once the batch is read (or cut), all
        // at once: the polls they wake run together, so updates bound for
        // one client (a session's tasks are due together) leave in one write.
        let mut answered = Vec::with_capacity(batch.len());
        let exchange = async {
            io.write_all(&out).await.map_err(|e| (true, io_error(&e)))?;
            while !batch.is_empty() {
                let (answer, keep_alive) = read_answer(io, &mut buf).await?;
                if let Some(job) = batch.pop_front() {
                    answered.push((job, answer));
                }
                if !keep_alive {
                    return Err((
                        true,
                        BackendError::unavailable("closed", "closed by the service"),
                    ));
                }
            }
            Ok(())
        };
        let result = tokio::time::timeout(shared.timeout, exchange).await;
        for (job, answer) in answered {
            let _ = job.reply.send(Ok(answer));
        }
        match result {
            Ok(Ok(())) => {}
            Ok(Err((untouched, e))) => {
                settle(&shared, &mut batch, untouched, &e);
                break Cut::Broken(e);
            }
            Err(_) => {
                let e = BackendError::unavailable("timeout", "timed out");
                settle(&shared, &mut batch, false, &e);
                break Cut::Broken(e);
            }
        }
    };
    match cut {
        Cut::Idle => {}
        Cut::Broken(e) => {
            tracing::debug!(authority = %shared.authority, error = %e, "pipelined connection closed");
            shared.conn_gone();
        }
    }
}

/// The unanswered jobs of a broken batch: the first is sent again only if
/// none of its answer was read (`untouched`), the others always (none of
/// theirs was); each at most once, else it fails with `e`.
fn settle(shared: &Shared, batch: &mut VecDeque<Job>, untouched: bool, e: &BackendError) {
    let mut again = Vec::with_capacity(batch.len());
    for (i, job) in batch.drain(..).enumerate() {
        if !job.retried && (untouched || i > 0) {
            again.push(Job {
                retried: true,
                ..job
            });
        } else {
            let _ = job.reply.send(Err(e.clone()));
        }
    }
    if !again.is_empty() {
        shared.requeue(again.into_iter());
    }
}

fn io_error(e: &std::io::Error) -> BackendError {
    BackendError::unavailable("transport", format!("request failed: {e}"))
}

/// Reads more into `buf`; `Err` at the end of the stream. `untouched`
/// says whether the answer being read had no byte yet.
async fn fill(
    io: &mut Stream,
    buf: &mut BytesMut,
    untouched: bool,
) -> Result<(), (bool, BackendError)> {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(4096);
    }
    match io.read_buf(buf).await {
        Ok(0) => Err((
            untouched,
            BackendError::unavailable("closed", "the service closed the connection"),
        )),
        Ok(_) => Ok(()),
        Err(e) => Err((untouched, io_error(&e))),
    }
}

fn protocol(msg: impl Into<String>) -> (bool, BackendError) {
    (false, BackendError::Protocol(msg.into()))
}

/// One answer off the connection: its status, `Retry-After`, body, and
/// whether the connection stays open after it. Interim (1xx) answers are
/// skipped; the body is delimited by `Content-Length`, chunked coding, or
/// the end of the connection.
async fn read_answer(
    io: &mut Stream,
    buf: &mut BytesMut,
) -> Result<(Answer, bool), (bool, BackendError)> {
    let mut untouched = buf.is_empty();
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        let parsed = resp
            .parse(buf)
            .map_err(|e| protocol(format!("bad answer head: {e}")))?;
        let head_len = match parsed {
            httparse::Status::Partial => {
                if buf.len() > MAX_HEAD_BYTES {
                    return Err(protocol("answer head too large"));
                }
                fill(io, buf, untouched).await?;
                untouched = false;
                continue;
            }
            httparse::Status::Complete(n) => n,
        };
        let code = resp.code.unwrap_or(0);
        let status =
            StatusCode::from_u16(code).map_err(|_| protocol(format!("bad status {code}")))?;
        if status.is_informational() {
            buf.advance(head_len);
            continue;
        }
        let mut length = None;
        let mut chunked = false;
        let mut keep_alive = resp.version == Some(1);
        let mut retry_after = None;
        for h in resp.headers.iter() {
            let value = std::str::from_utf8(h.value).unwrap_or("").trim();
            if h.name.eq_ignore_ascii_case("content-length") {
                let n = value
                    .parse::<usize>()
                    .map_err(|_| protocol("bad Content-Length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(protocol("conflicting Content-Length"));
                }
                length = Some(n);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value
                    .rsplit(',')
                    .next()
                    .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
                if !chunked {
                    return Err(protocol(format!("unsupported Transfer-Encoding `{value}`")));
                }
            } else if h.name.eq_ignore_ascii_case("connection") {
                for token in value.split(',') {
                    let token = token.trim();
                    if token.eq_ignore_ascii_case("close") {
                        keep_alive = false;
                    } else if token.eq_ignore_ascii_case("keep-alive") {
                        keep_alive = true;
                    }
                }
            } else if h.name.eq_ignore_ascii_case("retry-after") {
                retry_after = value.parse::<u64>().ok();
            }
        }
        buf.advance(head_len);
        let body = if code == 204 || code == 304 {
            Bytes::new()
        } else if chunked {
            read_chunked(io, buf).await?
        } else if let Some(n) = length {
            if n > MAX_BODY_BYTES {
                return Err(protocol("response body too large"));
            }
            while buf.len() < n {
                fill(io, buf, false).await?;
            }
            buf.split_to(n).freeze()
        } else {
            // Delimited by the end of the connection.
            loop {
                if buf.len() > MAX_BODY_BYTES {
                    return Err(protocol("response body too large"));
                }
                match fill(io, buf, false).await {
                    Ok(()) => {}
                    Err(_) => break,
                }
            }
            keep_alive = false;
            buf.split().freeze()
        };
        return Ok((
            Answer {
                status,
                retry_after,
                body,
            },
            keep_alive,
        ));
    }
}

/// A chunked body (the chunk extensions and trailers skipped).
async fn read_chunked(io: &mut Stream, buf: &mut BytesMut) -> Result<Bytes, (bool, BackendError)> {
    let mut body = BytesMut::new();
    loop {
        let line = read_line(io, buf).await?;
        let size = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size, 16).map_err(|_| protocol("bad chunk size"))?;
        if size == 0 {
            // Trailers, up to an empty line.
            while !read_line(io, buf).await?.is_empty() {}
            return Ok(body.freeze());
        }
        if body.len() + size > MAX_BODY_BYTES {
            return Err(protocol("response body too large"));
        }
        while buf.len() < size + 2 {
            fill(io, buf, false).await?;
        }
        body.extend_from_slice(&buf[..size]);
        if &buf[size..size + 2] != b"\r\n" {
            return Err(protocol("bad chunk end"));
        }
        buf.advance(size + 2);
    }
}

/// One CRLF-ended line, without its end.
async fn read_line(io: &mut Stream, buf: &mut BytesMut) -> Result<String, (bool, BackendError)> {
    loop {
        if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..i]).into_owned();
            buf.advance(i + 2);
            return Ok(line);
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(protocol("chunk line too long"));
        }
        fill(io, buf, false).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A service that answers whatever it is sent with `answers`, written
    /// in one piece once it has read `expect` requests, then acts on `then`.
    async fn service(
        answers: Vec<&'static str>,
        close_after: bool,
    ) -> (String, tokio::task::JoinHandle<usize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let handle = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let want = answers.len();
            let mut buf = [0u8; 4096];
            while seen.windows(4).filter(|w| *w == b"\r\n\r\n").count() < want {
                let n = sock.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
            }
            let all: String = answers.concat();
            sock.write_all(all.as_bytes()).await.unwrap();
            if close_after {
                drop(sock);
            } else {
                let _ = sock.read(&mut buf).await;
            }
            seen.windows(4).filter(|w| *w == b"\r\n\r\n").count()
        });
        (addr, handle)
    }

    fn get(path: &str) -> Bytes {
        Bytes::from(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n"))
    }

    #[tokio::test]
    async fn answers_of_one_batch_are_read_in_order_whatever_their_framing() {
        let (addr, svc) = service(
            vec![
                "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\none",
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;x=y\r\ntwo\r\n2\r\n!!\r\n0\r\nx-t: 1\r\n\r\n",
                "HTTP/1.1 503 Busy\r\nretry-after: 7\r\ncontent-length: 4\r\n\r\nbusy",
            ],
            false,
        )
        .await;
        let p = Arc::new(Pipeline::new(addr, None, 8, 1, Duration::from_secs(5)));
        let asks: Vec<_> = ["/a", "/b", "/c", "/d"]
            .into_iter()
            .map(|path| {
                let p = p.clone();
                tokio::spawn(async move { p.request(get(path)).await })
            })
            .collect();
        let mut got = Vec::new();
        for ask in asks {
            got.push(ask.await.unwrap().unwrap());
        }
        assert_eq!(got[0].status, 200);
        assert_eq!(&got[0].body[..], b"one");
        assert_eq!(got[1].status, 404);
        assert_eq!(&got[2].body[..], b"two!!");
        assert_eq!(got[3].status, 503);
        assert_eq!(got[3].retry_after, Some(7));
        assert_eq!(p.conns(), 1, "one connection carried them all");
        svc.abort();
    }

    #[tokio::test]
    async fn a_connection_closed_after_one_answer_sends_the_rest_again_elsewhere() {
        // The first connection answers one request and closes: the two
        // others are sent again on a second connection.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let svc = tokio::spawn(async move {
            let (mut first, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = first.read(&mut buf).await.unwrap();
            first
                .write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n1")
                .await
                .unwrap();
            drop(first);
            let (mut second, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            while seen.windows(4).filter(|w| *w == b"\r\n\r\n").count() < 2 {
                let n = second.read(&mut buf).await.unwrap();
                seen.extend_from_slice(&buf[..n]);
            }
            second
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n2HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n3")
                .await
                .unwrap();
            let _ = second.read(&mut buf).await;
        });
        let p = Pipeline::new(addr, None, 8, 1, Duration::from_secs(5));
        // All three queued before the connection takes its first batch.
        let (a, b, c) = tokio::join!(
            p.request(get("/1")),
            p.request(get("/2")),
            p.request(get("/3"))
        );
        let bodies: Vec<_> = [a, b, c]
            .into_iter()
            .map(|r| String::from_utf8(r.unwrap().body.to_vec()).unwrap())
            .collect();
        assert_eq!(bodies, ["1", "2", "3"]);
        svc.abort();
    }

    #[tokio::test]
    async fn a_service_that_is_down_fails_the_batch_as_unavailable() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let p = Pipeline::new(addr, None, 4, 2, Duration::from_secs(5));
        let err = p.request(get("/x")).await.unwrap_err();
        assert!(matches!(err, BackendError::Unavailable { .. }), "{err:?}");
        assert_eq!(p.conns(), 0);
    }

    #[tokio::test]
    async fn a_malformed_answer_is_a_protocol_error() {
        let (addr, svc) = service(vec!["HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n"], true).await;
        let p = Pipeline::new(addr, None, 4, 1, Duration::from_secs(5));
        let err = p.request(get("/x")).await.unwrap_err();
        assert!(matches!(err, BackendError::Protocol(_)), "{err:?}");
        assert_eq!(svc.await.unwrap(), 1);
    }
}
