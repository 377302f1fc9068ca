//! A `redis-server` of the tests' own, for the Redis engine's tests.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` of our own, on a free port, killed on drop. Its
/// append-only file is written on every change, so a restart (even after
/// SIGKILL) finds every task where it was.
pub struct RedisServer {
    node: Node,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer {
            node: Node::start("redis", free_port(), &[]),
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.node.port)
    }

    pub fn restart(&mut self) {
        self.node.restart();
    }

    pub fn kill(&mut self) {
        self.node.kill();
    }
}

/// One `redis-server` of the tests' (a server, or a cluster's node) on
/// `port`, its append-only file (written on every change) in a directory
/// of its own; killed, and the directory removed, on drop.
struct Node {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    flags: &'static [&'static str],
}

impl Node {
    fn start(kind: &str, port: u16, flags: &'static [&'static str]) -> Node {
        let dir =
            std::env::temp_dir().join(format!("taskwire-{kind}-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a temp dir");
        let mut node = Node {
            child: None,
            port,
            dir,
            flags,
        };
        node.restart();
        node
    }

    /// Starts it (again); returns once it accepts connections.
    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(self.flags)
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("redis-server runs (the README's test command installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// What the Redis engine's tests need of "a Redis": one server or a cluster.
#[allow(dead_code)]
pub trait TestRedis: Send + Sync {
    /// The URL `--redis` takes.
    fn url(&self) -> String;
    /// Every node's own `redis://` URL.
    fn nodes(&self) -> Vec<String>;
    /// SIGKILL every node.
    fn kill(&mut self);
    /// Starts every node again (its data read back from its append-only file).
    fn restart(&mut self);
    /// The number of keys each node holds.
    fn keys_per_node(&self) -> Vec<u64> {
        self.nodes()
            .iter()
            .map(|url| {
                let port = url.trim_end_matches('/').rsplit(':').next().unwrap_or("");
                cli(port, &["dbsize"]).trim().parse().unwrap_or(0)
            })
            .collect()
    }
    /// `redis-cli -c` (following cluster redirections) against the first
    /// node: its output.
    fn cli(&self, args: &[&str]) -> String {
        let first = self.nodes().remove(0);
        let port = first
            .trim_end_matches('/')
            .rsplit(':')
            .next()
            .unwrap_or("")
            .to_string();
        cli(&port, args)
    }
}

fn cli(port: &str, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-c", "-p", port])
        .args(args)
        .output()
        .expect("redis-cli runs (the README's test command installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl TestRedis for RedisServer {
    fn url(&self) -> String {
        RedisServer::url(self)
    }
    fn nodes(&self) -> Vec<String> {
        vec![RedisServer::url(self)]
    }
    fn kill(&mut self) {
        RedisServer::kill(self)
    }
    fn restart(&mut self) {
        RedisServer::restart(self)
    }
}

/// A Redis Cluster of three masters (no replicas) on free local ports,
/// made by `redis-cli --cluster create`, as an operator would; killed on
/// drop.
pub struct RedisCluster {
    nodes: Vec<Node>,
}

/// A cluster node's flags beside [`Node`]'s own.
const CLUSTER_NODE: &[&str] = &[
    "--cluster-enabled",
    "yes",
    "--cluster-node-timeout",
    "2000",
    "--cluster-config-file",
    "nodes.conf",
];

#[allow(dead_code)]
impl RedisCluster {
    pub fn start() -> RedisCluster {
        let mut nodes: Vec<Node> = Vec::new();
        for _ in 0..3 {
            let port = free_cluster_port(&nodes.iter().map(|n| n.port).collect::<Vec<_>>());
            nodes.push(Node::start("cluster", port, CLUSTER_NODE));
        }
        let cluster = RedisCluster { nodes };
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli runs (the README's test command installs it)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        cluster.wait_ok();
        cluster
    }

    /// Waits until every node says the cluster is ok.
    fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        for n in &self.nodes {
            loop {
                let out = Command::new("redis-cli")
                    .args(["-p", &n.port.to_string(), "cluster", "info"])
                    .output()
                    .expect("redis-cli runs");
                if String::from_utf8_lossy(&out.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "the cluster did not come up");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl TestRedis for RedisCluster {
    fn url(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", seeds.join(","))
    }
    fn nodes(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}/", n.port))
            .collect()
    }
    fn kill(&mut self) {
        self.nodes.iter_mut().for_each(Node::kill);
    }
    fn restart(&mut self) {
        self.nodes.iter_mut().for_each(Node::restart);
        self.wait_ok();
    }
}

/// A free port whose cluster bus port (+10000) is free too, not in `taken`.
fn free_cluster_port(taken: &[u16]) -> u16 {
    for _ in 0..1000 {
        let port = free_port();
        if port > 55_000 || taken.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
    panic!("no free port pair for a cluster node");
}
