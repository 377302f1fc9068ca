//! Scheduler micro-benchmark: the delay queue alone, then the whole memory
//! engine in-process (delay queue + pipeline + table + fanout + embedded
//! simulator + one fast client), on a current-thread runtime so CPU time is ours alone.
//!
//!   cargo bench -p server --bench scheduler [-- --timers N --tasks N]
//!
//! Not criterion: lateness needs one long real-time run, not many timed
//! iterations of a closure; the figures are CPU time per timer/poll (from
//! /proc/self/stat) and due → fired lateness percentiles.

use futures::StreamExt;
use server::backend::Backend;
use server::clock::Clock;
use server::engine::fanout::{Fanout, Next, View};
use server::engine::memory::MemoryEngine;
use server::engine::pipeline::{Limits, PollCtx, PollStats};
use server::engine::{Engine, Imp};
use server::metrics::MicrosHistogram;
use server::sim::Simulator;
use server::task::new_task;
use server::task::policy::PollPolicy;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::time::DelayQueue;

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let timers = arg("--timers", 1_000_000);
    let tasks = arg("--tasks", 50_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(delay_queue_alone(timers));
    rt.block_on(poll_engine(tasks));
}

/// `n` timers due uniformly over 5 s, inserted then fired.
async fn delay_queue_alone(n: u64) {
    let spread_ms = 5_000u64;
    let mut q = DelayQueue::with_capacity(n as usize);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    for i in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        q.insert(i, Duration::from_micros(x % (spread_ms * 1000)));
    }
    let insert_s = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_seconds();
    let lateness = MicrosHistogram::default();
    let mut fired = 0u64;
    while let Some(e) = q.next().await {
        lateness.record(tokio::time::Instant::now().saturating_duration_since(e.deadline()));
        fired += 1;
    }
    let cpu2 = cpu_seconds();
    println!("delay queue alone: {n} timers due over {spread_ms} ms");
    println!(
        "  insert: {:.0} ns/timer wall; fire: {:.2} µs CPU/timer ({:.2} s CPU for {fired})",
        insert_s * 1e9 / n as f64,
        (cpu2 - cpu1) * 1e6 / n as f64,
        cpu2 - cpu1
    );
    println!(
        "  insert+fire: {:.2} µs CPU/timer; lateness p50 {:?} p99 {:?} max≈{:?}",
        (cpu2 - cpu0) * 1e6 / n as f64,
        lateness.quantile(0.5),
        lateness.quantile(0.99),
        lateness.quantile(1.0)
    );
}

/// `tasks` simulate tasks of 10 s / 100 steps polled every 500 ms (fixed):
/// ~21 polls each, every state published to one connection that reads fast.
async fn poll_engine(tasks: u64) {
    let clock = Clock::new();
    let sim = Arc::new(Simulator::new());
    let policy = Arc::new(PollPolicy {
        poll_interval_ms: 500,
        poll_min_ms: 100,
        adaptive: false,
        give_up_ms: 300_000,
        retention_ms: 600_000,
    });
    let backend = Backend::embedded(sim.clone(), clock);
    let stats = Arc::new(PollStats::default());
    let ctx = Arc::new(PollCtx {
        backend: backend.clone(),
        policy: policy.clone(),
        clock,
        stats: stats.clone(),
    });
    let limits = Limits {
        max_in_flight: 512,
        max_polls_per_s: 0,
    };
    let fanout = Fanout::new(clock);
    let (memory, queue) = MemoryEngine::new(fanout.clone(), ctx, &limits, Duration::from_secs(600));
    let engine = Engine::new(
        fanout.clone(),
        Imp::Memory(memory.clone()),
        backend,
        policy,
        clock,
    );
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(queue.run(stop_rx));
    let (session, _) = engine.resolve_session(None).await.unwrap();
    let conn = Arc::new(engine.connect(session, View::Session).await.unwrap());
    let reader = conn.clone();
    let frames = tokio::spawn(async move {
        let mut n = 0u64;
        loop {
            match reader.outbox.pop() {
                Next::Frame(_) => n += 1,
                Next::Empty => reader.outbox.notified().await,
                Next::Close(_) => return n,
            }
        }
    });

    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let params = serde_json::json!({"duration_ms": 10_000, "steps": 100});
    for _ in 0..tasks {
        let bid = sim.start("simulate", &params, clock.now_ms()).unwrap();
        let task = new_task("s", "simulate", None, clock.now_ms());
        memory.create(&conn.session, &task, &bid).await.unwrap();
        fanout.accepted(&conn, "r".into(), &task);
    }
    while engine.counts().live_tasks > 0 && t0.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cpu = cpu_seconds() - cpu0;
    let wall = t0.elapsed().as_secs_f64();
    let polls = stats.polls.load(std::sync::atomic::Ordering::Relaxed);
    engine.disconnect(&conn).await;
    let frames = frames.await.unwrap_or(0);
    println!(
        "poll engine in-process: {tasks} tasks × 10 s / 100 steps at 500 ms (fixed), one thread"
    );
    println!(
        "  {polls} polls ({:.1}/task), {frames} frames, {wall:.1} s wall, {cpu:.2} s CPU",
        polls as f64 / tasks as f64
    );
    println!(
        "  {:.2} µs CPU per poll-and-publish; lateness p50 {:?} p99 {:?} max≈{:?}",
        cpu * 1e6 / polls.max(1) as f64,
        stats.lateness.quantile(0.5),
        stats.lateness.quantile(0.99),
        stats.lateness.quantile(1.0)
    );
}
