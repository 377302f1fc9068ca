//! Prometheus metrics at `GET /metrics`, through the `metrics` facade and its
//! Prometheus exporter. Hot paths count in plain atomics (scheduler stats,
//! outbox coalescing); the scheduler's upkeep job copies them into the
//! registry and drains histogram samples every [`UPKEEP_INTERVAL`].

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::time::Duration;

/// How often counters are copied into the registry and histograms drained.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

pub const POLLS: &str = "taskwire_polls_total";
pub const POLL_SECONDS: &str = "taskwire_poll_seconds";
pub const POLL_LATENESS_SECONDS: &str = "taskwire_poll_lateness_seconds";
pub const POLLS_DEFERRED: &str = "taskwire_polls_deferred_total";
pub const LIVE_TASKS: &str = "taskwire_live_tasks";
pub const TASKS: &str = "taskwire_tasks";
pub const SESSIONS: &str = "taskwire_sessions";
pub const QUEUE_DEPTH: &str = "taskwire_queue_depth";
pub const POLLS_IN_FLIGHT: &str = "taskwire_polls_in_flight";
pub const BACKEND_ERRORS: &str = "taskwire_backend_errors_total";
pub const WS_CONNECTIONS: &str = "taskwire_ws_connections";
pub const MESSAGES_SENT: &str = "taskwire_messages_sent_total";
pub const UPDATES_COALESCED: &str = "taskwire_updates_coalesced_total";
/// Pipelined task-service requests (`pipeline_depth`), labelled `service`
/// (`host:port`).
pub const PIPELINED_REQUESTS: &str = "taskwire_pipelined_requests_total";
/// Writes that carried them (requests ÷ batches: the mean batch).
pub const PIPELINED_BATCHES: &str = "taskwire_pipelined_batches_total";
/// Redis engine: polls waiting in a worker's delay queue of a backend (the
/// tasks of the partitions it owns); labelled `backend`.
pub const REDIS_QUEUE_DEPTH: &str = "taskwire_redis_queue_depth";
/// Redis engine: partitions this worker owns.
pub const REDIS_PARTITIONS: &str = "taskwire_redis_partitions_owned";
/// Redis engine: events whose `seq` skipped one (a message was lost).
pub const REDIS_SEQ_GAPS: &str = "taskwire_redis_seq_gaps_total";
/// Redis engine: the listener read every mirrored session again.
pub const REDIS_RESYNCS: &str = "taskwire_redis_resyncs_total";
/// Redis engine: calls to Redis that failed, by operation.
pub const REDIS_ERRORS: &str = "taskwire_redis_errors_total";
/// Server API: requests by API key name and outcome.
pub const API_REQUESTS: &str = "taskwire_api_requests_total";
/// Open `/sse` streams.
pub const SSE_CONNECTIONS: &str = "taskwire_sse_connections";
/// Webhook deliveries ended, by `outcome`: `delivered`, `gave_up`,
/// `refused` (queue full), `store_error` (could not be queued).
pub const WEBHOOK_DELIVERIES: &str = "taskwire_webhook_deliveries_total";
/// Webhook attempts that failed, by `kind` (`http_5xx`, `timeout`, `refused`, ...).
pub const WEBHOOK_FAILURES: &str = "taskwire_webhook_failures_total";
/// Webhook attempts scheduled again after a failure.
pub const WEBHOOK_RETRIES: &str = "taskwire_webhook_retries_total";
/// Webhook deliveries waiting or in flight, as the delivery loop last saw them.
pub const WEBHOOK_QUEUE_DEPTH: &str = "taskwire_webhook_queue_depth";

/// Seconds; from a fast loopback poll to a timed-out one.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The process-wide recorder (the `metrics` facade has one global recorder,
/// so every `Application` in a process shares it). `None` if another
/// recorder was installed first.
pub fn handle() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new().set_buckets(BUCKETS).ok()?;
            let handle = builder.install_recorder().ok()?;
            describe();
            Some(handle)
        })
        .as_ref()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(POLLS, "Status polls sent to the task service");
    describe_counter!(
        API_REQUESTS,
        "Server API requests by API key name and outcome"
    );
    describe_gauge!(SSE_CONNECTIONS, "Open Server-Sent Events streams");
    describe_histogram!(POLL_SECONDS, Unit::Seconds, "Latency of one status poll");
    describe_histogram!(
        POLL_LATENESS_SECONDS,
        Unit::Seconds,
        "How late a poll fired after it was due"
    );
    describe_counter!(
        POLLS_DEFERRED,
        "Due polls moved later by the polls-per-second cap"
    );
    describe_gauge!(LIVE_TASKS, "Tasks not yet final");
    describe_gauge!(TASKS, "Tasks held, finished ones included");
    describe_gauge!(SESSIONS, "Sessions held");
    describe_gauge!(QUEUE_DEPTH, "Entries in the delay queue");
    describe_gauge!(POLLS_IN_FLIGHT, "Polls waiting on the task service");
    describe_counter!(BACKEND_ERRORS, "Failed task-service requests, by kind");
    describe_counter!(
        PIPELINED_REQUESTS,
        "Task-service requests sent pipelined, by service"
    );
    describe_counter!(
        PIPELINED_BATCHES,
        "Writes of pipelined requests (one or more each), by service"
    );
    describe_gauge!(WS_CONNECTIONS, "Open WebSocket connections");
    describe_counter!(MESSAGES_SENT, "Frames written to WebSocket clients");
    describe_counter!(
        UPDATES_COALESCED,
        "Task updates replaced by a newer state before a slow client read them"
    );
    describe_counter!(WEBHOOK_DELIVERIES, "Webhook deliveries ended, by outcome");
    describe_counter!(WEBHOOK_FAILURES, "Failed webhook attempts, by kind");
    describe_counter!(WEBHOOK_RETRIES, "Webhook attempts scheduled again");
    describe_gauge!(
        WEBHOOK_QUEUE_DEPTH,
        "Webhook deliveries waiting or in flight"
    );
}

/// The text exposition, for `GET /metrics`.
pub async fn render() -> impl axum::response::IntoResponse {
    let body = handle().map(|h| h.render()).unwrap_or_default();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

/// A lock-free histogram of microseconds: 4 linear sub-buckets per power of
/// two (within 12.5 %), up to ~2^40 µs. For figures the benchmarks read
/// in-process (p50/p99 lateness) without the exporter.
pub struct MicrosHistogram {
    buckets: [std::sync::atomic::AtomicU64; Self::LEN],
}

impl Default for MicrosHistogram {
    fn default() -> Self {
        MicrosHistogram {
            buckets: std::array::from_fn(|_| std::sync::atomic::AtomicU64::new(0)),
        }
    }
}

impl MicrosHistogram {
    const SUB: u32 = 4;
    const LEN: usize = 41 * Self::SUB as usize;

    fn index(us: u64) -> usize {
        if us < Self::SUB as u64 {
            return us as usize;
        }
        let exp = 63 - us.leading_zeros(); // >= 2
        let sub = (us >> (exp - 2)) & 3;
        (((exp - 1) * Self::SUB) as usize + sub as usize).min(Self::LEN - 1)
    }

    /// The largest value that falls in bucket `i`.
    fn upper(i: usize) -> u64 {
        if i < Self::SUB as usize {
            return i as u64;
        }
        let exp = i as u32 / Self::SUB + 1;
        let sub = i as u64 % Self::SUB as u64;
        ((4 + sub + 1) << (exp - 2)) - 1
    }

    pub fn record(&self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        self.buckets[Self::index(us)].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.buckets
            .iter()
            .map(|b| b.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }

    /// The value at quantile `q` (0..=1), as its bucket's upper bound.
    pub fn quantile(&self, q: f64) -> Duration {
        let total = self.count();
        if total == 0 {
            return Duration::ZERO;
        }
        let rank = ((total as f64 * q).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(std::sync::atomic::Ordering::Relaxed);
            if seen >= rank {
                return Duration::from_micros(Self::upper(i));
            }
        }
        Duration::from_micros(Self::upper(Self::LEN - 1))
    }
}

/// Counts one server API request of key `key` (its name, never the key).
pub fn api_request(key: &str, outcome: &'static str) {
    metrics::counter!(API_REQUESTS, "key" => key.to_string(), "outcome" => outcome).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_within_an_eighth() {
        for us in [
            0u64,
            1,
            3,
            4,
            5,
            7,
            8,
            100,
            1000,
            12_345,
            999_999,
            5_000_000_000,
        ] {
            let i = MicrosHistogram::index(us);
            let up = MicrosHistogram::upper(i);
            assert!(up >= us, "{us} -> {i} -> {up}");
            assert!(up as f64 <= us as f64 * 1.25 + 1.0, "{us} -> {up}");
        }
    }

    #[test]
    fn quantiles_of_a_known_spread() {
        let h = MicrosHistogram::default();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        let p50 = h.quantile(0.5).as_micros() as u64;
        let p99 = h.quantile(0.99).as_micros() as u64;
        assert!((500..=640).contains(&p50), "{p50}");
        assert!((990..=1100).contains(&p99), "{p99}");
    }
}
