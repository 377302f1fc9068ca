//! Load generator: the simulator and the server as real processes, N real
//! WebSocket clients, and a report of what the browsers saw (staleness,
//! final states) and what it cost (CPU and memory of each process).
//!
//! ```sh
//! cargo bench -p server --bench loadgen -- --clients 100 --tasks-per-client 10 \
//!     [--duration-ms 10000] [--steps 100] [--poll-interval-ms 500] [--ramp-ms 2000] \
//!     [--threads 2] [--json] [--server-args --max-concurrent-polls 1024 ...]
//! ```
//!
//! Everything after `--server-args` is passed to the server unchanged. See
//! `docs/benchmarks.md` for the figures and how to read them.

// The report's `json!` is one large object.
#![recursion_limit = "256"]

use app::protocol::{ServerMsg, TaskState};
use futures::{SinkExt, StreamExt};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{watch, Semaphore};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

const USAGE: &str = "\
usage: cargo bench -p server --bench loadgen -- [options] [--server-args ARGS...]
  --clients N             WebSocket clients, one session each        (default 100)
  --tasks-per-client N    simulate tasks each client starts          (default 10)
  --duration-ms N         duration of each task                      (default 10000)
  --steps N               steps of each task                         (default 100)
  --poll-interval-ms N    the server's --poll-interval-ms            (default 500)
  --ramp-ms N             all starts spread evenly over this long    (default 2000)
  --threads N             worker threads of the load generator       (default 2)
  --connect-concurrency N WebSocket handshakes in flight at once     (default 64)
  --label TEXT            scenario name in the report
  --server-bin PATH       taskwire binary for server and simulator
                          (default: the one cargo built, target/release/taskwire)
  --engine E              memory (default), redis-all (one `--role all`
                          process on Redis), redis-split (one web and
                          one worker process on Redis) or redis-cluster
                          (the same on a 3-master Redis Cluster); starts
                          its own redis-server(s) on free ports for the
                          Redis ones
                          and reports its commands, CPU and reads per
                          poll (INFO commandstats / cpu / stats, between
                          the go and the last final state)
  --workers N             worker processes of redis-split/-cluster (default 1)
  --kill-server-at-ms N   SIGKILL the server N ms after the go and start it
                          again (same port, same data dir); clients
                          reconnect with their cookies (memory engine)
  --json                  print one JSON object instead of a table
  --server-args ARGS...   everything after this goes to the server";

/// The second backend's kind (`--slow-backend-latency-ms`).
const SLOW_KIND: &str = "slow_simulate";

#[derive(Clone, Debug)]
struct Opts {
    clients: usize,
    tasks_per_client: usize,
    duration_ms: u64,
    steps: u64,
    poll_interval_ms: u64,
    ramp_ms: u64,
    threads: usize,
    connect_concurrency: usize,
    label: Option<String>,
    server_bin: String,
    json: bool,
    engine: String,
    /// Worker processes of `redis-split`.
    workers: usize,
    /// SIGKILL the server this long after the go, and start it again on the
    /// same port and data directory; clients reconnect with their cookie.
    kill_server_at_ms: Option<u64>,
    /// A second backend (a second simulator answering this much later):
    /// every other client starts its tasks there; staleness is reported
    /// for each backend's tasks apart.
    slow_backend_latency_ms: Option<u64>,
    server_args: Vec<String>,
}

impl Opts {
    fn parse(args: impl IntoIterator<Item = String>) -> Result<Opts, String> {
        let mut o = Opts {
            clients: 100,
            tasks_per_client: 10,
            duration_ms: 10_000,
            steps: 100,
            poll_interval_ms: 500,
            ramp_ms: 2_000,
            threads: 2,
            connect_concurrency: 64,
            label: None,
            server_bin: env!("CARGO_BIN_EXE_taskwire").to_string(),
            json: false,
            engine: "memory".into(),
            workers: 1,
            kill_server_at_ms: None,
            slow_backend_latency_ms: None,
            server_args: vec![],
        };
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
                _ => (arg.clone(), None),
            };
            let mut value = |name: &str| -> Result<String, String> {
                inline
                    .clone()
                    .or_else(|| it.next())
                    .ok_or_else(|| format!("{name} needs a value"))
            };
            fn num<T: std::str::FromStr>(name: &str, v: String) -> Result<T, String> {
                v.parse()
                    .map_err(|_| format!("{name}: `{v}` is not a valid number"))
            }
            match flag.as_str() {
                // `cargo bench` passes `--bench` to every bench target.
                "--bench" => {}
                "--clients" => o.clients = num(&flag, value(&flag)?)?,
                "--tasks-per-client" => o.tasks_per_client = num(&flag, value(&flag)?)?,
                "--duration-ms" => o.duration_ms = num(&flag, value(&flag)?)?,
                "--steps" => o.steps = num(&flag, value(&flag)?)?,
                "--poll-interval-ms" => o.poll_interval_ms = num(&flag, value(&flag)?)?,
                "--ramp-ms" => o.ramp_ms = num(&flag, value(&flag)?)?,
                "--threads" => o.threads = num(&flag, value(&flag)?)?,
                "--connect-concurrency" => o.connect_concurrency = num(&flag, value(&flag)?)?,
                "--label" => o.label = Some(value(&flag)?),
                "--server-bin" => o.server_bin = value(&flag)?,
                "--json" => o.json = true,
                "--workers" => o.workers = num(&flag, value(&flag)?)?,
                "--kill-server-at-ms" => o.kill_server_at_ms = Some(num(&flag, value(&flag)?)?),
                "--slow-backend-latency-ms" => {
                    o.slow_backend_latency_ms = Some(num(&flag, value(&flag)?)?)
                }
                "--engine" => {
                    o.engine = value(&flag)?;
                    if !matches!(
                        o.engine.as_str(),
                        "memory" | "redis-all" | "redis-split" | "redis-cluster"
                    ) {
                        return Err(format!(
                            "--engine: `{}` is not memory, redis-all, redis-split or redis-cluster",
                            o.engine
                        ));
                    }
                }
                "--server-args" => {
                    o.server_args = it.by_ref().collect();
                    // `cargo bench` appends `--bench` to every bench's args.
                    if o.server_args.last().is_some_and(|a| a == "--bench") {
                        o.server_args.pop();
                    }
                }
                "-h" | "--help" => return Err(String::new()),
                other => return Err(format!("unknown argument `{other}`")),
            }
        }
        if o.clients == 0 || o.tasks_per_client == 0 {
            return Err("--clients and --tasks-per-client must be at least 1".into());
        }
        if o.workers == 0 {
            return Err("--workers must be at least 1".into());
        }
        if o.threads == 0 || o.connect_concurrency == 0 {
            return Err("--threads and --connect-concurrency must be at least 1".into());
        }
        Ok(o)
    }

    fn scenario(&self) -> String {
        let base = format!(
            "{}c x {}t, {} ms/{} steps, poll {} ms, ramp {} ms",
            self.clients,
            self.tasks_per_client,
            self.duration_ms,
            self.steps,
            self.poll_interval_ms,
            self.ramp_ms
        );
        let base = if self.engine == "memory" {
            base
        } else if self.engine != "redis-all" && self.workers != 1 {
            format!("{base}, engine {} ({} workers)", self.engine, self.workers)
        } else {
            format!("{base}, engine {}", self.engine)
        };
        let base = match self.kill_server_at_ms {
            Some(at) => format!("{base}, server SIGKILLed at +{at} ms"),
            None => base,
        };
        let base = match self.slow_backend_latency_ms {
            Some(ms) => format!("{base}, half the clients on a second backend {ms} ms slower"),
            None => base,
        };
        let base = if self.server_args.is_empty() {
            base
        } else {
            format!("{base}, server {}", self.server_args.join(" "))
        };
        match &self.label {
            Some(l) => format!("{l}: {base}"),
            None => base,
        }
    }
}

fn main() {
    let opts = match Opts::parse(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("loadgen: {e}");
            }
            eprintln!("{USAGE}");
            std::process::exit(if e.is_empty() { 0 } else { 2 });
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.threads)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(opts.clone())) {
        Ok(report) => {
            if opts.json {
                println!("{}", serde_json::to_string(&report).expect("json"));
            } else {
                print_table(&report);
            }
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(1);
        }
    }
}

// ---------------------------------------------------------------- processes

/// A child process (simulator or server), killed when dropped, panics included.
struct ChildProc {
    child: Child,
    addr: SocketAddr,
    log: Arc<LogTail>,
}

/// What the drain thread kept of a child's stdout: warnings and errors.
#[derive(Default)]
struct LogTail {
    warns: AtomicU64,
    errors: AtomicU64,
    /// The first few warning/error lines, verbatim.
    first: Mutex<Vec<String>>,
}

impl ChildProc {
    /// Starts `cmd`, waits for a stdout line holding `marker` followed by an
    /// address, then keeps draining stdout in a thread.
    fn start(name: &'static str, mut cmd: Command, marker: &'static str) -> Result<Self, String> {
        cmd.env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start the {name}: {e}"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let log = Arc::new(LogTail::default());
        let (tx, rx) = mpsc::channel::<SocketAddr>();
        let tail = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.is_some() {
                    if let Some(rest) = line.split(marker).nth(1) {
                        if let Ok(addr) = rest.trim().parse::<SocketAddr>() {
                            let _ = tx.take().unwrap().send(addr);
                            continue;
                        }
                    }
                }
                let warn = line.contains(" WARN ");
                let error = line.contains(" ERROR ");
                if warn {
                    tail.warns.fetch_add(1, Ordering::Relaxed);
                }
                if error {
                    tail.errors.fetch_add(1, Ordering::Relaxed);
                }
                if warn || error {
                    let mut first = tail.first.lock().unwrap();
                    if first.len() < 5 {
                        first.push(line);
                    }
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the {name} did not print `{marker}ADDR` within 60 s"
                ));
            }
        };
        Ok(ChildProc { child, addr, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running (a crash would make every figure wrong).
    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `redis-server` of the run's own on a free port, no persistence, or a
/// Redis Cluster of several (`--engine redis-cluster`: three masters made
/// by `redis-cli --cluster create`); killed when dropped.
struct RedisProc {
    children: Vec<Child>,
    ports: Vec<u16>,
    cluster: bool,
}

impl RedisProc {
    fn start() -> Result<RedisProc, String> {
        let mut r = RedisProc {
            children: Vec::new(),
            ports: Vec::new(),
            cluster: false,
        };
        r.node(false)?;
        Ok(r)
    }

    fn start_cluster(shards: usize) -> Result<RedisProc, String> {
        let mut r = RedisProc {
            children: Vec::new(),
            ports: Vec::new(),
            cluster: true,
        };
        for _ in 0..shards {
            r.node(true)?;
        }
        let addrs: Vec<String> = r.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .map_err(|e| format!("cannot run redis-cli: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&out.stdout)
            ));
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for p in &r.ports {
            loop {
                let out = Command::new("redis-cli")
                    .args(["-p", &p.to_string(), "cluster", "info"])
                    .output()
                    .map_err(|e| format!("cannot run redis-cli: {e}"))?;
                if String::from_utf8_lossy(&out.stdout).contains("cluster_state:ok") {
                    break;
                }
                if Instant::now() > deadline {
                    return Err("the Redis Cluster did not come up".into());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(r)
    }

    /// Starts one node on a free port (a cluster node's bus port, +10000,
    /// free too).
    fn node(&mut self, cluster: bool) -> Result<(), String> {
        let port = loop {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| format!("no free port: {e}"))?
                .port();
            if !cluster
                || (port <= 55_000
                    && !self.ports.contains(&port)
                    && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok())
            {
                break port;
            }
        };
        let dir = std::env::temp_dir().join(format!("taskwire-loadgen-redis-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir);
        if cluster {
            cmd.args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ]);
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start redis-server (is it installed?): {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline || !matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                return Err("redis-server did not start".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.children.push(child);
        self.ports.push(port);
        Ok(())
    }

    fn url(&self) -> String {
        if self.cluster {
            let seeds: Vec<String> = self
                .ports
                .iter()
                .map(|p| format!("127.0.0.1:{p}"))
                .collect();
            format!("redis+cluster://{}", seeds.join(","))
        } else {
            format!("redis://127.0.0.1:{}/", self.ports[0])
        }
    }

    /// Each node's own URL (for `INFO`).
    fn node_urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}/"))
            .collect()
    }
}

impl Drop for RedisProc {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for p in &self.ports {
            let _ = std::fs::remove_dir_all(
                std::env::temp_dir().join(format!("taskwire-loadgen-redis-{p}")),
            );
        }
    }
}

/// What Redis counted so far: `INFO commandstats`, `INFO cpu` (its own
/// CPU, user + sys) and `INFO stats` (`total_reads_processed`: one per
/// socket read, so one per round trip however many commands it carries).
#[derive(Debug)]
struct RedisStats {
    /// Per command: calls, µs spent in it (a script's includes its commands').
    calls: BTreeMap<String, (u64, u64)>,
    cpu_s: f64,
    /// Of which in the kernel (`used_cpu_sys`).
    sys_s: f64,
    reads: u64,
}

impl RedisStats {
    /// Every node's counts, summed (a cluster's; one for a single Redis),
    /// with each node's CPU beside.
    fn read_all(urls: &[String]) -> Result<(RedisStats, Vec<f64>), String> {
        let mut sum: Option<RedisStats> = None;
        let mut per_node = Vec::new();
        for url in urls {
            let one = RedisStats::read(url)?;
            per_node.push(one.cpu_s);
            sum = Some(match sum {
                None => one,
                Some(mut s) => {
                    for (cmd, (n, usec)) in one.calls {
                        let e = s.calls.entry(cmd).or_insert((0, 0));
                        e.0 += n;
                        e.1 += usec;
                    }
                    s.cpu_s += one.cpu_s;
                    s.sys_s += one.sys_s;
                    s.reads += one.reads;
                    s
                }
            });
        }
        sum.map(|s| (s, per_node))
            .ok_or_else(|| "no Redis node".to_string())
    }

    fn read(url: &str) -> Result<RedisStats, String> {
        let text = || -> redis::RedisResult<String> {
            let mut c = redis::Client::open(url)?.get_connection()?;
            let mut all = String::new();
            for section in ["commandstats", "cpu", "stats"] {
                all += &redis::cmd("INFO").arg(section).query::<String>(&mut c)?;
            }
            Ok(all)
        };
        let text = text().map_err(|e| format!("INFO: {e}"))?;
        let mut stats = RedisStats {
            calls: BTreeMap::new(),
            cpu_s: 0.0,
            sys_s: 0.0,
            reads: 0,
        };
        for line in text.lines() {
            let Some((key, value)) = line.trim().split_once(':') else {
                continue;
            };
            if let Some(cmd) = key.strip_prefix("cmdstat_") {
                // calls=N,usec=N,...
                let field = |name: &str| {
                    value
                        .split(',')
                        .find_map(|kv| kv.strip_prefix(name))
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0)
                };
                stats
                    .calls
                    .insert(cmd.to_uppercase(), (field("calls="), field("usec=")));
            }
            match key {
                "used_cpu_user" => stats.cpu_s += value.parse().unwrap_or(0.0),
                "used_cpu_sys" => {
                    let sys: f64 = value.parse().unwrap_or(0.0);
                    stats.cpu_s += sys;
                    stats.sys_s += sys;
                }
                "total_reads_processed" => stats.reads = value.parse().unwrap_or(0),
                _ => {}
            }
        }
        Ok(stats)
    }

    /// The window from `before` to `self`, per poll. Commands are counted
    /// as `INFO commandstats` does: those a script runs too, `INFO` left
    /// out; the reads include the few of the `INFO` calls themselves.
    fn since(&self, before: &RedisStats, polls: u64) -> serde_json::Value {
        let per = |n: f64| {
            if polls == 0 {
                None
            } else {
                Some(round(n / polls as f64, 3))
            }
        };
        let mut by_command = BTreeMap::new();
        let mut usec_by_command = BTreeMap::new();
        let mut commands = 0;
        for (cmd, (n, usec)) in &self.calls {
            let (n0, usec0) = before.calls.get(cmd).copied().unwrap_or((0, 0));
            let d = n.saturating_sub(n0);
            if d > 0 && cmd != "INFO" {
                commands += d;
                by_command.insert(cmd.clone(), per(d as f64));
                usec_by_command.insert(cmd.clone(), per(usec.saturating_sub(usec0) as f64));
            }
        }
        let reads = self.reads.saturating_sub(before.reads);
        let cpu_s = self.cpu_s - before.cpu_s;
        json!({
            "polls": polls,
            "commands": commands,
            "commands_per_poll": per(commands as f64),
            "reads": reads,
            "reads_per_poll": per(reads as f64),
            "cpu_s": round(cpu_s, 3),
            "cpu_us_per_poll": per(cpu_s * 1e6).map(|us| round(us, 1)),
            "sys_us_per_poll": per((self.sys_s - before.sys_s) * 1e6).map(|us| round(us, 1)),
            "by_command": by_command,
            "usec_per_poll_by_command": usec_by_command,
        })
    }
}

// ---------------------------------------------------------------- /proc

fn clock_ticks_per_s() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// VmRSS of `/proc/{pid}/status`, in KiB (`pid` may be `self`).
fn rss_kb(pid: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// (utime, stime) of `/proc/{pid}/stat`, in clock ticks.
fn cpu_ticks(pid: &str) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields follow the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    Some((f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?))
}

/// (busy, total) ticks of the whole machine, from `/proc/stat`.
fn machine_ticks() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8) // user nice system idle iowait irq softirq steal (guest is inside user)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 5 {
        return None;
    }
    let total: u64 = v.iter().sum();
    Some((total - v[3] - v[4], total))
}

/// Polls VmRSS of the given processes (server, simulator, this process,
/// then the (first) worker and redis-server when there are) every 200 ms.
struct Sampler {
    stop: Arc<AtomicBool>,
    peaks: Arc<Vec<AtomicU64>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(pids: Vec<String>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peaks: Arc<Vec<AtomicU64>> = Arc::new(pids.iter().map(|_| AtomicU64::new(0)).collect());
        let (s, p) = (stop.clone(), peaks.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                for (i, pid) in pids.iter().enumerate() {
                    if let Some(kb) = rss_kb(pid) {
                        p[i].fetch_max(kb, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Sampler {
            stop,
            peaks,
            handle: Some(handle),
        }
    }

    /// Peak RSS in KiB, in the order of the pids given.
    fn finish(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.peaks
            .iter()
            .map(|p| p.load(Ordering::Relaxed))
            .collect()
    }
}

// ---------------------------------------------------------------- clients

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Counters every client updates as it goes, for the progress line.
#[derive(Default)]
struct Live {
    connected: AtomicU64,
    connect_failed: AtomicU64,
    accepted: AtomicU64,
    finals: AtomicU64,
    updates: AtomicU64,
    errors: AtomicU64,
}

/// What one client saw.
#[derive(Default)]
struct ClientResult {
    connected: bool,
    /// Its tasks ran on the slow backend (`--slow-backend-latency-ms`).
    slow: bool,
    /// Closed by the server (or the stream failed) before it was done.
    disconnected: bool,
    /// Reconnections after the server was killed (`--kill-server-at-ms`).
    reconnects: u64,
    /// Every `task` message: receipt − `updated_ms`, in ms.
    staleness: Vec<u32>,
    /// The first final `task` message of each task: receipt − `updated_ms`.
    final_staleness: Vec<u32>,
    /// Messages whose `updated_ms` was ahead of the receipt (counted as 0).
    ahead: u64,
    updates: u64,
    accepted: u64,
    start_errors: u64,
    errors: BTreeMap<String, u64>,
    seq_regressions: u64,
    /// Each task's last state and `done`; final or not.
    tasks: Vec<(TaskState, u64)>,
}

struct TaskView {
    state: TaskState,
    done: u64,
    seq: u64,
}

struct ClientPlan {
    index: usize,
    url: String,
    opts: Arc<Opts>,
    go: watch::Receiver<Option<Instant>>,
    abort: watch::Receiver<bool>,
    connect_permits: Arc<Semaphore>,
    live: Arc<Live>,
}

/// tungstenite allocates a 128 KiB read buffer per connection by default:
/// 128 MB for 1,000 clients. Frames here are a few hundred bytes.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(8 * 1024)
}

async fn client(plan: ClientPlan) -> ClientResult {
    let ClientPlan {
        index,
        url,
        opts,
        mut go,
        mut abort,
        connect_permits,
        live,
    } = plan;
    let mut res = ClientResult::default();

    // Connect (a bounded number of handshakes at once) and read `welcome`.
    let (ws, session) = {
        let _permit = connect_permits.acquire().await.expect("semaphore");
        let connected = tokio::time::timeout(Duration::from_secs(30), async {
            let (mut ws, _) =
                tokio_tungstenite::connect_async_with_config(url.as_str(), Some(ws_config()), true)
                    .await
                    .map_err(|e| e.to_string())?;
            loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => {
                        return match serde_json::from_str::<ServerMsg>(t.as_str()) {
                            Ok(ServerMsg::Welcome { session, .. }) => {
                                Ok((ws, session.unwrap_or_default()))
                            }
                            other => Err(format!("first frame not welcome: {other:?}")),
                        };
                    }
                    Some(Ok(Message::Close(f))) => return Err(format!("closed: {f:?}")),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(e.to_string()),
                    None => return Err("closed before welcome".into()),
                }
            }
        })
        .await;
        match connected {
            Ok(Ok(connected)) => connected,
            Ok(Err(e)) => {
                if live.connect_failed.fetch_add(1, Ordering::Relaxed) < 3 {
                    eprintln!("loadgen: client {index} failed to connect: {e}");
                }
                return res;
            }
            Err(_) => {
                if live.connect_failed.fetch_add(1, Ordering::Relaxed) < 3 {
                    eprintln!("loadgen: client {index} timed out connecting");
                }
                return res;
            }
        }
    };
    res.connected = true;
    live.connected.fetch_add(1, Ordering::Relaxed);

    // Wait for the common start instant.
    let go_at = loop {
        if let Some(t) = *go.borrow_and_update() {
            break t;
        }
        if go.changed().await.is_err() {
            return res;
        }
    };

    let (mut sink, mut stream) = ws.split();
    let total = (opts.clients * opts.tasks_per_client) as u64;
    let ramp = Duration::from_millis(opts.ramp_ms);
    let params = json!({"duration_ms": opts.duration_ms, "steps": opts.steps});
    let (clients, per) = (opts.clients, opts.tasks_per_client);
    res.slow = opts.slow_backend_latency_ms.is_some() && index % 2 == 1;
    let kind = if res.slow { SLOW_KIND } else { "simulate" };
    // Starts interleave over all clients: global slot `index + k * clients`.
    let sender = tokio::spawn(async move {
        for k in 0..per {
            let slot = (index + k * clients) as u64;
            let at = go_at + ramp.mul_f64(slot as f64 / total as f64);
            tokio::time::sleep_until(at.into()).await;
            let msg = json!({
                "type": "start",
                "ref": format!("c{index}-{k}"),
                "kind": kind,
                "params": params,
            });
            if sink.send(Message::text(msg.to_string())).await.is_err() {
                break;
            }
        }
        sink
    });

    let deadline = go_at + ramp + Duration::from_millis(opts.duration_ms) + Duration::from_secs(30);
    let sleep = tokio::time::sleep_until(deadline.into());
    tokio::pin!(sleep);
    let mut views: HashMap<String, TaskView> = HashMap::with_capacity(per);
    let mut answered = 0usize; // starts answered by `accepted` or an error
    let mut finals = 0usize;
    let mut stale = Vec::with_capacity(per * 24);
    // Sinks of the connections made after a server restart (kept open).
    let mut sinks = Vec::new();

    while answered < per || finals < views.len() {
        let frame = tokio::select! {
            f = stream.next() => f,
            _ = &mut sleep => break,
            _ = abort.changed() => break,
        };
        let received_ms = unix_ms();
        let text = match frame {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                if opts.kill_server_at_ms.is_none() {
                    res.disconnected = true;
                    break;
                }
                // The server was killed: reconnect with the cookie until it
                // is back (or the deadline), and take `welcome` as the truth.
                let again = loop {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if Instant::now() >= deadline {
                        break None;
                    }
                    let mut req = url.as_str().into_client_request().expect("a ws url");
                    req.headers_mut().insert(
                        "cookie",
                        format!("taskwire_session={session}")
                            .parse()
                            .expect("a header"),
                    );
                    let Ok((mut ws, _)) =
                        tokio_tungstenite::connect_async_with_config(req, Some(ws_config()), true)
                            .await
                    else {
                        continue;
                    };
                    if let Some(Ok(Message::Text(t))) = ws.next().await {
                        if let Ok(ServerMsg::Welcome {
                            session: s, tasks, ..
                        }) = serde_json::from_str::<ServerMsg>(t.as_str())
                        {
                            break Some((ws, s.unwrap_or_default(), tasks));
                        }
                    }
                };
                let Some((ws, same, tasks)) = again else {
                    res.disconnected = true;
                    break;
                };
                res.reconnects += 1;
                if same != session {
                    *res.errors
                        .entry("new session after restart".into())
                        .or_default() += 1;
                }
                for task in tasks {
                    let is_final = task.state.is_final();
                    match views.get_mut(&task.id) {
                        Some(v) => {
                            if task.seq < v.seq {
                                res.seq_regressions += 1;
                            }
                            if !v.state.is_final() {
                                (v.state, v.done, v.seq) = (task.state, task.done, task.seq);
                                if is_final {
                                    finals += 1;
                                    live.finals.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        None => {
                            // Accepted before the kill, `accepted` lost with it.
                            answered += 1;
                            res.accepted += 1;
                            live.accepted.fetch_add(1, Ordering::Relaxed);
                            if is_final {
                                finals += 1;
                                live.finals.fetch_add(1, Ordering::Relaxed);
                            }
                            views.insert(
                                task.id,
                                TaskView {
                                    state: task.state,
                                    done: task.done,
                                    seq: task.seq,
                                },
                            );
                        }
                    }
                }
                let (new_sink, new_stream) = ws.split();
                sinks.push(new_sink);
                stream = new_stream;
                continue;
            }
            Some(Ok(_)) => continue,
        };
        let msg: ServerMsg = match serde_json::from_str(text.as_str()) {
            Ok(m) => m,
            Err(e) => {
                *res.errors.entry(format!("unparsable: {e}")).or_default() += 1;
                continue;
            }
        };
        match msg {
            ServerMsg::Task { task } => {
                res.updates += 1;
                live.updates.fetch_add(1, Ordering::Relaxed);
                let s = if task.updated_ms > received_ms {
                    res.ahead += 1;
                    0
                } else {
                    (received_ms - task.updated_ms).min(u32::MAX as u64) as u32
                };
                stale.push(s);
                let is_final = task.state.is_final();
                match views.get_mut(&task.id) {
                    Some(v) => {
                        if task.seq < v.seq {
                            res.seq_regressions += 1;
                        }
                        let was_final = v.state.is_final();
                        if !was_final {
                            v.state = task.state;
                            v.done = task.done;
                            v.seq = task.seq;
                        }
                        if is_final && !was_final {
                            finals += 1;
                            live.finals.fetch_add(1, Ordering::Relaxed);
                            res.final_staleness.push(s);
                        }
                    }
                    None => {
                        if is_final {
                            finals += 1;
                            live.finals.fetch_add(1, Ordering::Relaxed);
                            res.final_staleness.push(s);
                        }
                        views.insert(
                            task.id,
                            TaskView {
                                state: task.state,
                                done: task.done,
                                seq: task.seq,
                            },
                        );
                    }
                }
            }
            ServerMsg::Accepted { task, .. } => {
                answered += 1;
                res.accepted += 1;
                live.accepted.fetch_add(1, Ordering::Relaxed);
                views.entry(task.id).or_insert_with(|| {
                    if task.state.is_final() {
                        finals += 1;
                        live.finals.fetch_add(1, Ordering::Relaxed);
                    }
                    TaskView {
                        state: task.state,
                        done: task.done,
                        seq: task.seq,
                    }
                });
            }
            ServerMsg::Error {
                reference, code, ..
            } => {
                live.errors.fetch_add(1, Ordering::Relaxed);
                *res.errors.entry(code.as_str().to_string()).or_default() += 1;
                if reference.as_deref().is_some_and(|r| r.starts_with('c')) {
                    // A refused start is not retried.
                    answered += 1;
                    res.start_errors += 1;
                }
            }
            ServerMsg::Welcome { .. } => {
                *res.errors.entry("second welcome".into()).or_default() += 1;
            }
        }
    }

    res.staleness = stale;
    res.tasks = views.into_values().map(|v| (v.state, v.done)).collect();
    sender.abort();
    if let Ok(mut sink) = sender.await {
        let _ = sink.close().await;
    }
    for mut sink in sinks {
        let _ = sink.close().await;
    }
    res
}

// ---------------------------------------------------------------- the run

fn percentile(sorted: &[u32], q: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

/// A file or directory of this run's own (the server's store, a config
/// file), removed however the run ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.0.is_dir() {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

async fn run(opts: Opts) -> Result<serde_json::Value, String> {
    let tck = clock_ticks_per_s();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf();
    let bin = opts.server_bin.clone();
    let machine_start = machine_ticks();
    let started = Instant::now();

    // 1. The simulator.
    let mut sim_cmd = Command::new(&bin);
    sim_cmd
        .args(["sim", "--listen", "127.0.0.1:0"])
        .current_dir(&root);
    let mut sim = ChildProc::start("simulator", sim_cmd, "listening on http://")?;
    // 1b. The slow backend: a second simulator, and a config file naming both.
    let mut slow_sim = None;
    let config_file = match opts.slow_backend_latency_ms {
        None => None,
        Some(ms) => {
            let mut cmd = Command::new(&bin);
            cmd.args([
                "sim",
                "--listen",
                "127.0.0.1:0",
                "--latency-ms",
                &ms.to_string(),
            ])
            .current_dir(&root);
            let slow = ChildProc::start("slow simulator", cmd, "listening on http://")?;
            let file =
                std::env::temp_dir().join(format!("taskwire-loadgen-{}.toml", std::process::id()));
            let text = format!(
                "[[backend]]\nname = \"fast\"\nadapter = \"taskwire\"\nurl = \"http://{}\"\n\n\
                 [[backend]]\nname = \"slow\"\nadapter = \"taskwire\"\nurl = \"http://{}\"\n\n\
                 [[kind]]\nname = \"simulate\"\nbackend = \"fast\"\n\n\
                 [[kind]]\nname = \"{SLOW_KIND}\"\nbackend = \"slow\"\ntask = \"simulate\"\n",
                sim.addr, slow.addr
            );
            let file = Scratch(file);
            std::fs::write(&file.0, text).map_err(|e| format!("config file: {e}"))?;
            slow_sim = Some(slow);
            Some(file)
        }
    };

    // 2. Redis, for the Redis engines.
    let redis = match opts.engine.as_str() {
        "memory" => None,
        "redis-cluster" => Some(RedisProc::start_cluster(3)?),
        _ => Some(RedisProc::start()?),
    };

    // 3. The server (and, split, its worker). The memory engine is durable
    // by default: a fresh data directory per run (unless the server args
    // give one), so no run loads another's tasks.
    let data_dir = std::env::temp_dir().join(format!("taskwire-loadgen-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_dir);
    let own_data_dir = !opts.server_args.iter().any(|a| a == "--data-dir");
    // Dropped after the server (declared before it): the store goes with the run.
    let _data_dir = own_data_dir.then(|| Scratch(data_dir.clone()));
    let (poll_interval_ms, server_args) = (opts.poll_interval_ms, opts.server_args.clone());
    let taskwire_on = |role: &str, listen: &str| {
        let mut cmd = Command::new(&bin);
        cmd.args(["--listen", listen]);
        match &config_file {
            Some(file) => cmd.arg("--config").arg(&file.0),
            None => cmd.arg("--backend").arg(format!("http://{}", sim.addr)),
        };
        cmd.arg("--poll-interval-ms")
            .arg(poll_interval_ms.to_string());
        if let Some(r) = &redis {
            cmd.args(["--redis", &r.url(), "--role", role]);
        }
        if own_data_dir && redis.is_none() {
            cmd.arg("--data-dir").arg(&data_dir);
        }
        cmd.args(&server_args).current_dir(&root);
        // Several processes side by side: each its own admin port.
        cmd.env("TASKWIRE_ADMIN_LISTEN", "127.0.0.1:0");
        cmd
    };
    let taskwire = |role: &str| taskwire_on(role, "127.0.0.1:0");
    let split = matches!(opts.engine.as_str(), "redis-split" | "redis-cluster");
    let mut server = ChildProc::start(
        "server",
        taskwire(if split { "web" } else { "all" }),
        "taskwire listening on http://",
    )?;
    let mut workers = Vec::new();
    if split {
        for _ in 0..opts.workers {
            workers.push(ChildProc::start(
                "worker",
                taskwire("worker"),
                "taskwire listening on http://",
            )?);
        }
    }
    eprintln!(
        "loadgen: simulator {} (pid {}), server {} (pid {}); {}",
        sim.addr,
        sim.pid(),
        server.addr,
        server.pid(),
        opts.scenario()
    );

    let pid_of = |p: Option<u32>| p.map_or_else(String::new, |p| p.to_string());
    let sampler = Sampler::start(vec![
        server.pid().to_string(),
        sim.pid().to_string(),
        "self".to_string(),
        pid_of(workers.first().map(|w| w.pid())),
        pid_of(redis.as_ref().map(|r| r.children[0].id())),
    ]);

    // The server's RSS before any client: the baseline of the per-connection figure.
    let server_pid = server.pid().to_string();
    let rss_before_connect_kb = rss_kb(&server_pid).unwrap_or(0);

    // 3. The clients: connect all, then start tasks on one common clock.
    let opts = Arc::new(opts);
    let live = Arc::new(Live::default());
    let (go_tx, go_rx) = watch::channel(None::<Instant>);
    let (abort_tx, abort_rx) = watch::channel(false);
    let permits = Arc::new(Semaphore::new(opts.connect_concurrency));
    let url = format!("ws://{}/ws", server.addr);
    let mut handles = Vec::with_capacity(opts.clients);
    for index in 0..opts.clients {
        handles.push(tokio::spawn(client(ClientPlan {
            index,
            url: url.clone(),
            opts: opts.clone(),
            go: go_rx.clone(),
            abort: abort_rx.clone(),
            connect_permits: permits.clone(),
            live: live.clone(),
        })));
    }
    drop(go_rx);
    let connect_started = Instant::now();
    loop {
        let c =
            live.connected.load(Ordering::Relaxed) + live.connect_failed.load(Ordering::Relaxed);
        if c as usize >= opts.clients {
            break;
        }
        if connect_started.elapsed() > Duration::from_secs(120) {
            let _ = abort_tx.send(true);
            return Err(format!(
                "only {c} of {} clients connected in 120 s",
                opts.clients
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connect_s = connect_started.elapsed().as_secs_f64();
    // Every client connected and welcomed, no task yet: what connections
    // alone cost (sampled once, after the last welcome settles).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_connected_kb = rss_kb(&server_pid).unwrap_or(0);
    let redis_before = redis.as_ref().map(|r| RedisStats::read_all(&r.node_urls()));
    let go_at = Instant::now() + Duration::from_millis(100);
    let _ = go_tx.send(Some(go_at));

    // Progress on stderr; Ctrl-C ends the run early (the report still prints).
    let total_tasks = (opts.clients * opts.tasks_per_client) as u64;
    let progress = {
        let live = live.clone();
        let abort_tx = abort_tx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => eprintln!(
                        "loadgen: +{:>5.1} s  accepted {}/{}  final {}  updates {}  errors {}",
                        go_at.elapsed().as_secs_f64(),
                        live.accepted.load(Ordering::Relaxed),
                        total_tasks,
                        live.finals.load(Ordering::Relaxed),
                        live.updates.load(Ordering::Relaxed),
                        live.errors.load(Ordering::Relaxed),
                    ),
                    _ = tokio::signal::ctrl_c() => {
                        eprintln!("loadgen: interrupted, reporting what was seen");
                        let _ = abort_tx.send(true);
                        break;
                    }
                }
            }
        })
    };

    // Redis in the steady state: from 1 s after the last start to 1.5 s
    // before the first tasks end, with the simulator's poll count at both
    // ends (the window above also holds every start and final).
    let steady = redis.as_ref().and_then(|r| {
        let from = Duration::from_millis(opts.ramp_ms) + Duration::from_secs(1);
        let to =
            Duration::from_millis(opts.duration_ms).checked_sub(Duration::from_millis(1_500))?;
        (to > from).then(|| {
            let urls = r.node_urls();
            let sim_stats = format!("http://{}/stats", sim.addr);
            tokio::spawn(async move {
                let sample = || async {
                    let urls = urls.clone();
                    let stats = tokio::task::spawn_blocking(move || RedisStats::read_all(&urls))
                        .await
                        .map_err(|e| e.to_string())??;
                    let polls: serde_json::Value = reqwest::get(&sim_stats)
                        .await
                        .map_err(|e| e.to_string())?
                        .json()
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok::<_, String>((stats, polls["polls"].as_u64().unwrap_or(0)))
                };
                tokio::time::sleep_until((go_at + from).into()).await;
                let a = sample().await?;
                tokio::time::sleep_until((go_at + to).into()).await;
                let b = sample().await?;
                Ok::<_, String>((a, b))
            })
        })
    });

    // The mid-run crash: SIGKILL, then the same server again.
    let mut restarted = 0u64;
    if let Some(at) = opts.kill_server_at_ms {
        tokio::time::sleep_until((go_at + Duration::from_millis(at)).into()).await;
        let _ = server.child.kill();
        let _ = server.child.wait();
        eprintln!(
            "loadgen: +{:>5.1} s  server SIGKILLed",
            go_at.elapsed().as_secs_f64()
        );
        let listen = server.addr.to_string();
        server = ChildProc::start(
            "server",
            taskwire_on("all", &listen),
            "taskwire listening on http://",
        )?;
        restarted += 1;
        eprintln!(
            "loadgen: +{:>5.1} s  server back (pid {}; CPU and RSS figures below are this process's only)",
            go_at.elapsed().as_secs_f64(),
            server.pid()
        );
    }

    let mut results = Vec::with_capacity(opts.clients);
    for h in handles {
        results.push(h.await.map_err(|e| format!("a client panicked: {e}"))?);
    }
    let run_s = go_at.elapsed().as_secs_f64();
    progress.abort();
    let redis_after = redis.as_ref().map(|r| RedisStats::read_all(&r.node_urls()));
    let steady = match steady {
        Some(h) => match h.await {
            Ok(Ok((((a, _), pa), ((b, _), pb)))) => b.since(&a, pb.saturating_sub(pa)),
            Ok(Err(e)) => json!({ "error": e }),
            Err(e) => json!({ "error": e.to_string() }),
        },
        None => serde_json::Value::Null,
    };

    // 4. What the simulator counted.
    let stats: serde_json::Value = async {
        reqwest::get(format!("http://{}/stats?per_task=1", sim.addr))
            .await?
            .json()
            .await
    }
    .await
    .map_err(|e| format!("simulator /stats: {e}"))?;

    // 5. Resource use, before the children go.
    let server_alive = server.alive();
    let sim_alive = sim.alive();
    let cpu = |pid: &str| cpu_ticks(pid).unwrap_or((0, 0));
    let (server_cpu, sim_cpu, self_cpu) = (
        cpu(&server.pid().to_string()),
        cpu(&sim.pid().to_string()),
        cpu("self"),
    );
    let worker_alive = (!workers.is_empty()).then(|| workers.iter_mut().all(|w| w.alive()));
    let worker_cpu = (!workers.is_empty()).then(|| {
        workers.iter().fold((0, 0), |(u, s), w| {
            let (wu, ws) = cpu(&w.pid().to_string());
            (u + wu, s + ws)
        })
    });
    let redis_cpu = redis.as_ref().map(|r| {
        r.children.iter().fold((0, 0), |(u, s), c| {
            let (cu, cs) = cpu(&c.id().to_string());
            (u + cu, s + cs)
        })
    });
    let machine_end = machine_ticks();
    let peaks = sampler.finish();
    let wall_s = started.elapsed().as_secs_f64();
    let server_log = (
        server.log.warns.load(Ordering::Relaxed),
        server.log.errors.load(Ordering::Relaxed),
        server.log.first.lock().unwrap().clone(),
    );
    drop(server);
    drop(workers);
    drop(redis);
    drop(sim);
    drop(slow_sim);
    drop(config_file);

    // 6. The report (staleness: of the first backend's tasks only).
    let mut slow_staleness: Vec<u32> = Vec::new();
    let mut staleness: Vec<u32> = Vec::new();
    let mut final_staleness: Vec<u32> = Vec::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let (mut updates, mut accepted, mut start_errors, mut ahead, mut seq_regressions) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut right, mut finished, mut unfinished) = (0u64, 0u64, 0u64);
    let mut final_states: BTreeMap<&'static str, u64> = BTreeMap::new();
    let (mut connected, mut disconnected, mut reconnects) = (0u64, 0u64, 0u64);
    for r in results {
        connected += r.connected as u64;
        disconnected += r.disconnected as u64;
        reconnects += r.reconnects;
        if r.slow {
            slow_staleness.extend_from_slice(&r.staleness);
        } else {
            staleness.extend_from_slice(&r.staleness);
            final_staleness.extend_from_slice(&r.final_staleness);
        }
        for (k, v) in r.errors {
            *errors.entry(k).or_default() += v;
        }
        updates += r.updates;
        accepted += r.accepted;
        start_errors += r.start_errors;
        ahead += r.ahead;
        seq_regressions += r.seq_regressions;
        for (state, done) in r.tasks {
            if state.is_final() {
                finished += 1;
                *final_states.entry(state.as_str()).or_default() += 1;
            } else {
                unfinished += 1;
            }
            if state == TaskState::Succeeded && done == opts.steps {
                right += 1;
            }
        }
    }
    staleness.sort_unstable();
    final_staleness.sort_unstable();
    slow_staleness.sort_unstable();
    let polls_total = stats["polls"].as_u64().unwrap_or(0);
    let per_task: Vec<u64> = stats["per_task"]
        .as_object()
        .map(|m| m.values().filter_map(|v| v.as_u64()).collect())
        .unwrap_or_default();
    let expected_polls = opts.duration_ms / opts.poll_interval_ms.max(1);
    let polls_mean = if per_task.is_empty() {
        0.0
    } else {
        per_task.iter().sum::<u64>() as f64 / per_task.len() as f64
    };
    let secs = |(u, s): (u64, u64)| (u + s) as f64 / tck;
    let per_poll_us = |cpu_s: f64| {
        if polls_total == 0 {
            None
        } else {
            Some(round(cpu_s * 1e6 / polls_total as f64, 1))
        }
    };
    let (server_s, sim_s, self_s) = (secs(server_cpu), secs(sim_cpu), secs(self_cpu));
    let worker_s = worker_cpu.map(secs);
    let redis_s = redis_cpu.map(secs);
    let taskwire_s = server_s + worker_s.unwrap_or(0.0);
    let machine = match (machine_start, machine_end) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
            Some(((b1 - b0) as f64 / tck, (b1 - b0) as f64 / (t1 - t0) as f64))
        }
        _ => None,
    };
    let mb = |kb: u64| round(kb as f64 / 1024.0, 1);

    Ok(json!({
        "scenario": opts.scenario(),
        "clients": opts.clients,
        "tasks_per_client": opts.tasks_per_client,
        "duration_ms": opts.duration_ms,
        "steps": opts.steps,
        "poll_interval_ms": opts.poll_interval_ms,
        "ramp_ms": opts.ramp_ms,
        "server_args": opts.server_args,
        "loadgen_threads": opts.threads,
        "server_bin": opts.server_bin,
        "server_binary_mtime": std::fs::metadata(&opts.server_bin)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs()),
        "tasks": total_tasks,
        "clients_connected": connected,
        "clients_disconnected": disconnected,
        "server_restarts": restarted,
        "client_reconnects": reconnects,
        "connect_s": round(connect_s, 2),
        "accepted": accepted,
        "start_errors": start_errors,
        "finished": finished,
        "unfinished": unfinished,
        "final_states": final_states,
        "right": right,
        "staleness_ms": {
            "samples": staleness.len(),
            "p50": percentile(&staleness, 0.50),
            "p90": percentile(&staleness, 0.90),
            "p99": percentile(&staleness, 0.99),
            "max": staleness.last(),
            "ahead_of_clock": ahead,
        },
        "slow_backend_staleness_ms": {
            "samples": slow_staleness.len(),
            "p50": percentile(&slow_staleness, 0.50),
            "p99": percentile(&slow_staleness, 0.99),
        },
        "final_staleness_ms": {
            "p50": percentile(&final_staleness, 0.50),
            "p99": percentile(&final_staleness, 0.99),
            "max": final_staleness.last(),
        },
        "updates": updates,
        "updates_per_task": if accepted > 0 { round(updates as f64 / accepted as f64, 2) } else { 0.0 },
        "updates_per_s": round(updates as f64 / run_s.max(1e-9), 1),
        "seq_regressions": seq_regressions,
        "polls": {
            "total": polls_total,
            "tasks": per_task.len(),
            "mean": round(polls_mean, 2),
            "min": per_task.iter().min(),
            "max": per_task.iter().max(),
            "expected": expected_polls,
            "tasks_below_expected": per_task.iter().filter(|p| **p < expected_polls).count(),
            "starts": stats["starts"],
        },
        "server": {
            "peak_rss_mb": mb(peaks[0]),
            "rss_before_connect_mb": mb(rss_before_connect_kb),
            "rss_connected_mb": mb(rss_connected_kb),
            "rss_kb_per_connection": if connected > 0 {
                round(rss_connected_kb.saturating_sub(rss_before_connect_kb) as f64 / connected as f64, 1)
            } else { 0.0 },
            "cpu_s": round(server_s, 2),
            "user_s": round(server_cpu.0 as f64 / tck, 2),
            "sys_s": round(server_cpu.1 as f64 / tck, 2),
            "cpu_us_per_poll": per_poll_us(server_s),
            "alive_at_end": server_alive,
            "log_warnings": server_log.0,
            "log_errors": server_log.1,
            "log_first": server_log.2,
        },
        "engine": opts.engine,
        "worker": worker_s.map(|w| json!({
            "processes": opts.workers,
            "peak_rss_mb": mb(peaks[3]),
            "cpu_s": round(w, 2),
            "cpu_us_per_poll": per_poll_us(w),
            "alive_at_end": worker_alive,
        })),
        "redis": redis_s.map(|r| json!({
            "peak_rss_mb": mb(peaks[4]),
            "cpu_s": round(r, 2),
            "cpu_us_per_poll": per_poll_us(r),
            "steady": steady,
            "window": match (&redis_before, &redis_after) {
                (Some(Ok((b, b_nodes))), Some(Ok((a, a_nodes)))) => {
                    let mut w = a.since(b, polls_total);
                    // Each node's share: how evenly a cluster spreads it.
                    w["cpu_s_per_node"] = json!(a_nodes
                        .iter()
                        .zip(b_nodes)
                        .map(|(a, b)| round(a - b, 2))
                        .collect::<Vec<_>>());
                    w
                }
                (Some(Err(e)), _) | (_, Some(Err(e))) => json!({ "error": e }),
                _ => serde_json::Value::Null,
            },
        })),
        "taskwire_total": {
            "peak_rss_mb": mb(peaks[0] + peaks[3]),
            "cpu_s": round(taskwire_s, 2),
            "cpu_us_per_poll": per_poll_us(taskwire_s),
        },
        "sim": {
            "peak_rss_mb": mb(peaks[1]),
            "cpu_s": round(sim_s, 2),
            "cpu_us_per_poll": per_poll_us(sim_s),
            "alive_at_end": sim_alive,
        },
        "loadgen": {
            "peak_rss_mb": mb(peaks[2]),
            "cpu_s": round(self_s, 2),
            "cpu_us_per_poll": per_poll_us(self_s),
        },
        "machine": {
            "busy_cpu_s": machine.map(|m| round(m.0, 2)),
            "busy_fraction": machine.map(|m| round(m.1, 3)),
            "other_cpu_s": machine.map(|m| round((m.0 - server_s - sim_s - self_s - worker_s.unwrap_or(0.0) - redis_s.unwrap_or(0.0)).max(0.0), 2)),
        },
        "run_s": round(run_s, 2),
        "wall_s": round(wall_s, 2),
        "errors": errors.values().sum::<u64>(),
        "errors_by_code": errors,
    }))
}

fn print_table(r: &serde_json::Value) {
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "-".to_string(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let rows: Vec<(&str, String)> = vec![
        ("scenario", s(&r["scenario"])),
        ("tasks", s(&r["tasks"])),
        (
            "clients connected / dropped",
            format!(
                "{} / {} (connect {} s)",
                s(&r["clients_connected"]),
                s(&r["clients_disconnected"]),
                s(&r["connect_s"])
            ),
        ),
        (
            "server restarts / client reconnects",
            format!(
                "{} / {}",
                s(&r["server_restarts"]),
                s(&r["client_reconnects"])
            ),
        ),
        (
            "accepted / start errors",
            format!("{} / {}", s(&r["accepted"]), s(&r["start_errors"])),
        ),
        (
            "final states right / total",
            format!("{} / {}", s(&r["right"]), s(&r["tasks"])),
        ),
        (
            "final states",
            format!(
                "{} (unfinished {})",
                s(&r["final_states"]),
                s(&r["unfinished"])
            ),
        ),
        (
            "staleness p50 / p99 / max ms",
            format!(
                "{} / {} / {}",
                s(&r["staleness_ms"]["p50"]),
                s(&r["staleness_ms"]["p99"]),
                s(&r["staleness_ms"]["max"])
            ),
        ),
        (
            "slow backend's staleness p50 / p99 ms",
            format!(
                "{} / {}",
                s(&r["slow_backend_staleness_ms"]["p50"]),
                s(&r["slow_backend_staleness_ms"]["p99"])
            ),
        ),
        (
            "final-state staleness p50 / p99",
            format!(
                "{} / {}",
                s(&r["final_staleness_ms"]["p50"]),
                s(&r["final_staleness_ms"]["p99"])
            ),
        ),
        (
            "polls per task mean / min / max",
            format!(
                "{} / {} / {} (expected {}, below: {})",
                s(&r["polls"]["mean"]),
                s(&r["polls"]["min"]),
                s(&r["polls"]["max"]),
                s(&r["polls"]["expected"]),
                s(&r["polls"]["tasks_below_expected"])
            ),
        ),
        (
            "updates received (per task, per s)",
            format!(
                "{} ({}, {}/s)",
                s(&r["updates"]),
                s(&r["updates_per_task"]),
                s(&r["updates_per_s"])
            ),
        ),
        ("engine", s(&r["engine"])),
        ("server peak RSS MB", s(&r["server"]["peak_rss_mb"])),
        (
            "server RSS MB before / with clients connected (KB per connection)",
            format!(
                "{} / {} ({})",
                s(&r["server"]["rss_before_connect_mb"]),
                s(&r["server"]["rss_connected_mb"]),
                s(&r["server"]["rss_kb_per_connection"])
            ),
        ),
        (
            "redis commands / reads (round trips) per poll",
            format!(
                "{} / {}",
                s(&r["redis"]["window"]["commands_per_poll"]),
                s(&r["redis"]["window"]["reads_per_poll"])
            ),
        ),
        (
            "redis CPU µs per poll (INFO cpu)",
            s(&r["redis"]["window"]["cpu_us_per_poll"]),
        ),
        (
            "  in the steady state (no starts, no finals)",
            s(&r["redis"]["steady"]["cpu_us_per_poll"]),
        ),
        (
            "redis commands per poll, by command",
            s(&r["redis"]["window"]["by_command"]),
        ),
        (
            "worker / redis-server CPU s (peak RSS MB)",
            format!(
                "{} ({}) / {} ({})",
                s(&r["worker"]["cpu_s"]),
                s(&r["worker"]["peak_rss_mb"]),
                s(&r["redis"]["cpu_s"]),
                s(&r["redis"]["peak_rss_mb"])
            ),
        ),
        (
            "taskwire total CPU s / µs per poll / RSS MB",
            format!(
                "{} / {} / {}",
                s(&r["taskwire_total"]["cpu_s"]),
                s(&r["taskwire_total"]["cpu_us_per_poll"]),
                s(&r["taskwire_total"]["peak_rss_mb"])
            ),
        ),
        (
            "server CPU s (user + sys)",
            format!(
                "{} ({} + {})",
                s(&r["server"]["cpu_s"]),
                s(&r["server"]["user_s"]),
                s(&r["server"]["sys_s"])
            ),
        ),
        (
            "CPU µs per poll server / sim / loadgen",
            format!(
                "{} / {} / {}",
                s(&r["server"]["cpu_us_per_poll"]),
                s(&r["sim"]["cpu_us_per_poll"]),
                s(&r["loadgen"]["cpu_us_per_poll"])
            ),
        ),
        (
            "sim CPU s / peak RSS MB",
            format!(
                "{} / {}",
                s(&r["sim"]["cpu_s"]),
                s(&r["sim"]["peak_rss_mb"])
            ),
        ),
        (
            "loadgen CPU s / peak RSS MB",
            format!(
                "{} / {}",
                s(&r["loadgen"]["cpu_s"]),
                s(&r["loadgen"]["peak_rss_mb"])
            ),
        ),
        (
            "machine busy CPU s (fraction) / others",
            format!(
                "{} ({}) / {}",
                s(&r["machine"]["busy_cpu_s"]),
                s(&r["machine"]["busy_fraction"]),
                s(&r["machine"]["other_cpu_s"])
            ),
        ),
        (
            "wall s (run / total)",
            format!("{} / {}", s(&r["run_s"]), s(&r["wall_s"])),
        ),
        (
            "errors",
            format!("{} {}", s(&r["errors"]), s(&r["errors_by_code"])),
        ),
        ("seq regressions", s(&r["seq_regressions"])),
        (
            "server log warnings / errors",
            format!(
                "{} / {}",
                s(&r["server"]["log_warnings"]),
                s(&r["server"]["log_errors"])
            ),
        ),
    ];
    let width = rows
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    for (k, v) in rows {
        println!("{k:<width$}  {v}");
    }
    if let Some(lines) = r["server"]["log_first"].as_array() {
        for l in lines {
            println!("  server log: {}", s(l));
        }
    }
    if r["server"]["alive_at_end"] == false || r["sim"]["alive_at_end"] == false {
        println!("WARNING: a child process had exited before the end of the run");
    }
}
