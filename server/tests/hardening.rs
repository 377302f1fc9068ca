//! Browsers that lie, flood, stall and vanish: real server, real sockets.

mod common;

use app::protocol::{ServerMsg, TaskState};
use common::{Client, TestApp};
use futures::StreamExt;
use serde_json::json;
use server::config::Config;
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{http, Message};

async fn spawn_with(f: impl FnOnce(&mut Config)) -> TestApp {
    let mut config = Config::for_tests();
    config.poll_interval_ms = 50;
    f(&mut config);
    TestApp::spawn(config).await
}

async fn upgrade_status(app: &TestApp, origin: Option<&str>) -> u16 {
    let mut req = format!("ws://{}/ws", app.addr)
        .into_client_request()
        .unwrap();
    if let Some(o) = origin {
        req.headers_mut()
            .insert(http::header::ORIGIN, o.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((_, resp)) => resp.status().as_u16(),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("{e}"),
    }
}

/// Polls `f` until it holds, for at most `secs`.
async fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let until = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < until {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

#[tokio::test]
async fn origin_check_as_the_contract_says() {
    let app = spawn_with(|c| c.allowed_origins = vec!["https://trusted.example".into()]).await;
    let own = format!("http://{}", app.addr);
    assert_eq!(upgrade_status(&app, None).await, 101);
    assert_eq!(upgrade_status(&app, Some(&own)).await, 101);
    assert_eq!(
        upgrade_status(&app, Some("https://trusted.example")).await,
        101
    );
    assert_eq!(
        upgrade_status(&app, Some("https://evil.example")).await,
        403
    );
    assert_eq!(upgrade_status(&app, Some("null")).await, 403);
    assert_eq!(
        upgrade_status(&app, Some(&format!("http://{}.evil", app.addr))).await,
        403
    );
    app.stop().await;
}

#[tokio::test]
async fn the_page_sets_an_httponly_session_cookie_once() {
    let app = TestApp::embedded(100).await;
    let url = format!("http://{}/", app.addr);
    let resp = reqwest::get(&url).await.unwrap();
    assert_eq!(resp.status(), 200);
    let cookie = resp.headers()[http::header::SET_COOKIE]
        .to_str()
        .unwrap()
        .to_string();
    assert!(cookie.starts_with("taskwire_session="), "{cookie}");
    for attr in ["HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(cookie.contains(attr), "{cookie} lacks {attr}");
    }
    let token = cookie["taskwire_session=".len()..]
        .split(';')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(token.len(), 32, "128 random bits in hex");
    let again = reqwest::Client::new()
        .get(&url)
        .header(http::header::COOKIE, format!("taskwire_session={token}"))
        .send()
        .await
        .unwrap();
    assert!(
        again.headers().get(http::header::SET_COOKIE).is_none(),
        "known session: no new cookie"
    );
    // The WebSocket accepts the page's session.
    let c = Client::connect(app.addr, Some(&token)).await;
    assert_eq!(c.session, token);
    app.stop().await;
}

#[tokio::test]
async fn limits_answer_with_typed_errors() {
    let app = spawn_with(|c| {
        c.limits.max_live_tasks_per_session = 2;
        c.limits.max_starts_per_min = 3;
        c.limits.max_params_bytes = 1024;
        c.limits.client_msgs_per_s = 5;
        c.limits.client_msgs_burst = 10;
    })
    .await;
    let mut c = app.client().await;
    let long = json!({"duration_ms": 60000, "steps": 10});
    c.start("a", long.clone()).await;
    c.start("b", long.clone()).await;
    c.send(json!({"type":"start","ref":"c","kind":"simulate","params":long}))
        .await;
    assert_eq!(c.error().await, (Some("c".into()), "too_many_tasks".into()));
    // Per-minute cap: the third start of the minute went through above
    // (refused for live tasks, but counted); the next is refused too.
    c.send(
        json!({"type":"start","ref":"d","kind":"simulate","params":{"duration_ms":10,"steps":1}}),
    )
    .await;
    assert_eq!(c.error().await, (Some("d".into()), "too_many_tasks".into()));
    let big = json!({"duration_ms": 10, "steps": 1, "pad": "x".repeat(2000)});
    c.send(json!({"type":"start","ref":"e","kind":"simulate","params":big}))
        .await;
    assert_eq!(c.error().await, (Some("e".into()), "bad_request".into()));

    // A flood gets rate_limited, and the connection still works after.
    for i in 0..30 {
        c.send(json!({"type":"subscribe","task":format!("x{i}")}))
            .await;
    }
    let mut codes = std::collections::HashMap::<String, u32>::new();
    for _ in 0..30 {
        *codes.entry(c.error().await.1).or_default() += 1;
    }
    assert!(
        codes.get("rate_limited").copied().unwrap_or(0) >= 10,
        "{codes:?}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.send(json!({"type":"subscribe","task":"y"})).await;
    assert_eq!(c.error().await, (None, "not_found".into()));
    app.stop().await;
}

#[tokio::test]
async fn beyond_max_connections_the_upgrade_gets_503() {
    let app = spawn_with(|c| c.limits.max_connections = 2).await;
    let a = app.client().await;
    let _b = app.client().await;
    assert_eq!(upgrade_status(&app, None).await, 503);
    a.close().await;
    assert!(eventually(5, || app.state.connections.available_permits() == 1).await);
    assert_eq!(upgrade_status(&app, None).await, 101);
    app.stop().await;
}

#[tokio::test]
async fn a_message_over_the_size_limit_closes_with_1009_fragments_included() {
    let app = TestApp::embedded(100).await;
    for fragmented in [false, true] {
        let mut c = app.client().await;
        let pad = "x".repeat(70 * 1024);
        let text = json!({"type":"subscribe","task":pad}).to_string();
        if fragmented {
            use tokio_tungstenite::tungstenite::protocol::frame::{
                coding::{Data, OpCode},
                Frame,
            };
            let bytes = text.into_bytes();
            let chunks: Vec<_> = bytes.chunks(16 * 1024).collect();
            for (i, chunk) in chunks.iter().enumerate() {
                let opcode = if i == 0 {
                    OpCode::Data(Data::Text)
                } else {
                    OpCode::Data(Data::Continue)
                };
                let frame = Frame::message(chunk.to_vec(), opcode, i + 1 == chunks.len());
                c.send_message(Message::Frame(frame)).await;
            }
        } else {
            c.send_raw(&text).await;
        }
        let close = loop {
            match c.recv_frame().await {
                Some(Message::Close(f)) => break f,
                Some(_) => continue,
                None => panic!("closed without a close frame"),
            }
        };
        assert_eq!(
            u16::from(close.unwrap().code),
            1009,
            "fragmented: {fragmented}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn a_thousand_abruptly_dropped_connections_leave_nothing_behind() {
    let app = spawn_with(|c| c.limits.max_connections = 5_000).await;
    let mut first = app.client().await;
    let session = first.session.clone();
    let task = first
        .start("t", json!({"duration_ms": 60000, "steps": 100}))
        .await;
    let mut clients = vec![];
    for _ in 0..1000 {
        let mut c = Client::connect(app.addr, Some(&session)).await;
        c.send(json!({"type":"subscribe","task":task.id})).await;
        clients.push(c);
    }
    assert!(eventually(20, || app.state.engine.counts().subscriptions == 1001).await);
    // No close frame: the sockets just go.
    drop(clients);
    drop(first);
    assert!(
        eventually(20, || {
            let c = app.state.engine.counts();
            c.connections == 0 && c.subscriptions == 0
        })
        .await,
        "{:?}",
        app.state.engine.counts()
    );
    app.stop().await;
}

#[tokio::test]
async fn a_peer_that_never_answers_pings_is_closed_and_forgotten() {
    let app = spawn_with(|c| {
        c.limits.ping_interval_s = 1;
        c.limits.ping_timeout_s = 2;
    })
    .await;
    // A client that reads nothing never answers a ping.
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", app.addr))
        .await
        .unwrap();
    assert!(eventually(5, || app.state.engine.counts().connections == 1).await);
    assert!(eventually(10, || app.state.engine.counts().connections == 0).await);
    drop(ws);
    app.stop().await;
}

/// A client whose socket buffer is tiny and which reads nothing: the
/// server's writes block, its outbox coalesces (bounded by tasks), and the
/// client gets every final state, either still connected or, once closed
/// as too slow, from `welcome` on reconnecting.
#[tokio::test]
async fn a_client_that_reads_nothing_still_gets_every_final_state() {
    for slow_timeout_s in [60, 2] {
        let app = spawn_with(|c| {
            c.limits.slow_client_timeout_s = slow_timeout_s;
            c.limits.max_live_tasks_per_session = 1000;
            c.limits.max_starts_per_min = 1000;
            c.limits.client_msgs_burst = 1000;
        })
        .await;
        let mut starter = app.client().await;
        let session = starter.session.clone();
        let mut ids = vec![];
        for i in 0..20 {
            ids.push(
                starter
                    .start(
                        &format!("s{i}"),
                        json!({"duration_ms": 3000, "steps": 3000}),
                    )
                    .await
                    .id,
            );
        }
        starter.close().await;

        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(2048).unwrap();
        let stream = socket.connect(app.addr).await.unwrap();
        let mut req = format!("ws://{}/ws", app.addr)
            .into_client_request()
            .unwrap();
        req.headers_mut().insert(
            http::header::COOKIE,
            format!("taskwire_session={session}").parse().unwrap(),
        );
        let (mut ws, _) = tokio_tungstenite::client_async(req, stream).await.unwrap();
        // Read nothing for 5 s while 20 tasks make 3000 steps each: what
        // waits for this client stays at most one frame per task (+ replies).
        let mut most_pending = 0;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            most_pending = most_pending.max(app.state.engine.counts().pending_frames);
        }
        assert!(most_pending <= 20 + 2, "{most_pending} frames queued");
        let counts = app.state.engine.counts();
        assert_eq!(counts.live_tasks, 0, "all finished meanwhile");

        let mut finals = std::collections::HashMap::new();
        // Per task: the `seq` at `welcome`, and the frames received since.
        let mut welcome_seq = std::collections::HashMap::new();
        let mut frames = 0u64;
        let mut closed = false;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    match serde_json::from_str::<ServerMsg>(t.as_str()).unwrap() {
                        ServerMsg::Task { task } | ServerMsg::Accepted { task, .. } => {
                            frames += 1;
                            if task.state.is_final() {
                                finals.insert(task.id, (task.state, task.seq));
                            }
                        }
                        ServerMsg::Welcome { tasks, .. } => {
                            for t in tasks {
                                welcome_seq.insert(t.id.clone(), t.seq);
                                if t.state.is_final() {
                                    finals.insert(t.id, (t.state, t.seq));
                                }
                            }
                        }
                        _ => {}
                    }
                }
                Ok(Some(Ok(Message::Close(f)))) => {
                    assert_eq!(slow_timeout_s, 2, "only the short timeout closes");
                    assert_eq!(u16::from(f.unwrap().code), 1013);
                    closed = true;
                    break;
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(_))) | Ok(None) => break,
                Err(_) => break,
            }
            if finals.len() == ids.len() {
                break;
            }
        }
        if slow_timeout_s == 60 {
            // Blocked well under the timeout: still connected, every final
            // state on this very connection.
            assert!(!closed, "a 5 s stall is under the 60 s timeout");
            assert_eq!(
                finals.len(),
                ids.len(),
                "every final on the same connection"
            );
            // Never more frames than changes: an update waiting for this
            // client is replaced by a newer one, never queued beside it
            // (whether any waited depends on how much the kernel's socket
            // buffers took; the outbox's own tests show the replacing).
            let changes: u64 = finals
                .iter()
                .map(|(id, (_, seq))| seq - welcome_seq.get(id).copied().unwrap_or(0))
                .sum();
            assert!(frames <= changes, "{frames} frames for {changes} changes");
        }
        if finals.len() < ids.len() {
            // Closed as too slow: the reconnect's welcome has everything.
            let again = Client::connect(app.addr, Some(&session)).await;
            for t in again.welcome {
                finals.insert(t.id, (t.state, t.seq));
            }
        }
        for id in &ids {
            assert_eq!(
                finals.get(id).map(|f| f.0),
                Some(TaskState::Succeeded),
                "timeout {slow_timeout_s}"
            );
        }
        let _ = ws.close(None).await;
        app.stop().await;
    }
}

#[tokio::test]
async fn twenty_thousand_short_tasks_leave_nothing_after_the_retention() {
    let app = spawn_with(|c| {
        c.retention_s = 1;
        c.poll_interval_ms = 20;
        c.limits.max_live_tasks_per_session = 100_000;
        c.limits.max_starts_per_min = 100_000;
        c.limits.client_msgs_per_s = 100_000;
        c.limits.client_msgs_burst = 100_000;
    })
    .await;
    let mut c = app.client().await;
    // In rounds of 16: a connection may have 16 starts waiting at once.
    for round in 0..(20_000 / 16) {
        for i in 0..16 {
            c.send(json!({"type":"start","ref":format!("{round}-{i}"),"kind":"simulate","params":{"duration_ms":10,"steps":1}}))
                .await;
        }
        let mut accepted = 0;
        while accepted < 16 {
            match c.recv().await {
                ServerMsg::Accepted { .. } => accepted += 1,
                ServerMsg::Error { code, message, .. } => panic!("{code:?}: {message}"),
                _ => {}
            }
        }
    }
    c.close().await;
    assert!(
        eventually(60, || {
            let n = app.state.engine.counts();
            n.tasks == 0 && n.sessions == 0 && n.connections == 0
        })
        .await,
        "{:?}",
        app.state.engine.counts()
    );
    app.stop().await;
}

#[tokio::test]
async fn sigterm_closes_every_client_with_1012_and_exits_in_time() {
    let (mut child, addr) =
        common::spawn_taskwire(&["--listen", "127.0.0.1:0", "--poll-interval-ms", "50"]);
    let mut c = Client::connect(addr, None).await;
    c.start("t", json!({"duration_ms": 60000, "steps": 10}))
        .await;

    let began = std::time::Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let close = loop {
        match c.recv_frame().await {
            Some(Message::Close(f)) => break f,
            Some(_) => continue,
            None => panic!("no close frame"),
        }
    };
    assert_eq!(u16::from(close.unwrap().code), 1012);
    let exited = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            began.elapsed() < Duration::from_secs(15),
            "did not exit in time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exited.success(), "{exited:?}");
}

/// A client that sends 20,000 messages before reading any reply is slowed
/// down (its frames are read no faster than it reads replies), never cut
/// off: all 20,000 replies arrive, in order, on the same connection.
#[tokio::test]
async fn a_burst_before_any_read_gets_every_reply_and_stays_open() {
    use futures::SinkExt;
    const N: usize = 20_000;
    let app = spawn_with(|_| {}).await;
    let mut req = format!("ws://{}/ws", app.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert(http::header::USER_AGENT, "burst".parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let (mut sink, mut stream) = ws.split();
    // Every message earns exactly one reply: `not_found` while the burst
    // allowance lasts, `rate_limited` after.
    let sender = tokio::spawn(async move {
        for i in 0..N {
            let msg = format!(r#"{{"type":"cancel","ref":"b{i}","task":"nope"}}"#);
            sink.feed(Message::text(msg)).await.expect("send");
        }
        sink.flush().await.expect("flush");
        sink
    });
    // Nothing is read until every message is out.
    let mut sink = tokio::time::timeout(Duration::from_secs(120), sender)
        .await
        .expect("the burst goes out (TCP buffers hold it)")
        .unwrap();
    let mut refs = Vec::with_capacity(N);
    while refs.len() < N {
        let frame = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("a reply within the timeout")
            .expect("the connection stays open")
            .expect("a frame");
        match frame {
            Message::Text(t) => match serde_json::from_str::<ServerMsg>(t.as_str()).unwrap() {
                ServerMsg::Welcome { .. } => {}
                ServerMsg::Error {
                    reference, code, ..
                } => {
                    assert!(
                        matches!(code.as_str(), "not_found" | "rate_limited"),
                        "{code:?}"
                    );
                    refs.push(reference.expect("the reply names its message"));
                }
                other => panic!("unexpected {other:?}"),
            },
            Message::Close(f) => panic!("closed after {} replies: {f:?}", refs.len()),
            _ => {}
        }
    }
    for (i, r) in refs.iter().enumerate() {
        assert_eq!(r, &format!("b{i}"), "replies in order");
    }
    // Still open and answering.
    sink.send(Message::text(
        r#"{"type":"cancel","ref":"last","task":"nope"}"#,
    ))
    .await
    .unwrap();
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("a reply")
            .expect("open")
            .expect("frame");
        if let Message::Text(t) = frame {
            if t.as_str().contains("\"last\"") {
                break;
            }
        }
    }
    app.stop().await;
}
