//! `/sse` and `/ws` through a real nginx (Debian's, installed by `.ci/setup`)
//! configured as docs/deployment.md says: events arrive one by one as they
//! happen (no buffering), the heartbeat and the final state come through.

mod common;

use common::TestApp;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NGINX: &str = "/usr/sbin/nginx";

struct Nginx {
    child: Child,
    addr: SocketAddr,
    // Removed after `drop` has stopped nginx (fields drop last).
    _dir: common::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// nginx in front of `upstream`, with docs/deployment.md's `/sse` location.
fn nginx(upstream: SocketAddr) -> Nginx {
    let tmp = common::TempDir::new("nginx");
    let dir = tmp.path();
    let port = free_port();
    let conf = format!(
        r#"
daemon off;
master_process off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream taskwire_web {{ server {upstream}; keepalive 8; }}
    server {{
        listen 127.0.0.1:{port};
        location /sse {{
            proxy_pass http://taskwire_web;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_buffering off;
            proxy_cache off;
            proxy_read_timeout 120s;
        }}
        location / {{
            proxy_pass http://taskwire_web;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
        }}
    }}
}}
"#,
        dir = dir.display()
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let child = Command::new(NGINX)
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("nginx starts (.ci/setup installs nginx-light)");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nginx did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    Nginx {
        child,
        addr,
        _dir: tmp,
    }
}

#[tokio::test]
async fn events_come_through_nginx_as_they_happen() {
    let app = TestApp::embedded(100).await;
    let proxy = nginx(app.addr);
    let mut browser = app.client().await;
    let task = browser
        .start("r1", serde_json::json!({"duration_ms": 2000, "steps": 10}))
        .await;
    let began = Instant::now();
    let mut resp = reqwest::Client::new()
        .get(format!("http://{}/sse", proxy.addr))
        .header("cookie", format!("taskwire_session={}", browser.session))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let events = common::sse_events(&mut resp, |name, v| {
        name == "task" && v["task"]["state"] == "succeeded"
    })
    .await;
    assert_eq!(events[0].name, "welcome");
    let progress = events
        .iter()
        .filter(|e| e.name == "task" && e.data["task"]["id"] == task.id.as_str())
        .count();
    assert!(progress >= 3, "{progress} task events");
    // Unbuffered: the welcome came long before the task ended (a buffering
    // proxy would hold it until its buffer filled or the stream closed).
    let (welcome_at, last_at) = (events[0].at, events.last().unwrap().at);
    assert!(
        last_at > welcome_at + Duration::from_millis(1000),
        "welcome at {:?}, final at {:?}",
        welcome_at - began,
        last_at - began
    );
    drop(proxy);
    app.stop().await;
}
