//! The command line: one typed struct, parsed once and passed in. Every flag
//! also reads an environment variable, because scripts outside the repo start
//! taskwire.

use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "taskwire",
    version,
    about = "Live progress of long-running tasks, brokered over WebSocket"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Serve the task-service simulator on its own (contract section 2).
    Sim(SimConfig),
}

#[derive(Debug, Clone, Args)]
pub struct SimConfig {
    /// Address the simulator listens on.
    #[arg(long, env = "TASKWIRE_SIM_LISTEN", default_value = "127.0.0.1:4000")]
    pub listen: SocketAddr,
}

/// Where the task service is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendChoice {
    /// The simulator, in this process.
    Embedded,
    /// Any task service speaking contract section 2 at this base URL.
    Http(String),
}

impl std::str::FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "embedded" {
            Ok(BackendChoice::Embedded)
        } else if s.starts_with("http://") || s.starts_with("https://") {
            Ok(BackendChoice::Http(s.trim_end_matches('/').to_string()))
        } else {
            Err(format!("expected `embedded` or an http:// URL, got `{s}`"))
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PollMode {
    Adaptive,
    Fixed,
}

#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address the web server listens on.
    #[arg(long, env = "TASKWIRE_LISTEN", default_value = "127.0.0.1:3000")]
    pub listen: SocketAddr,

    /// `embedded` (the built-in simulator) or the base URL of a task service.
    #[arg(long, env = "TASKWIRE_BACKEND", default_value = "embedded")]
    pub backend: BackendChoice,

    /// How often each live task is polled, in milliseconds.
    #[arg(long, env = "TASKWIRE_POLL_INTERVAL_MS", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    pub poll_interval_ms: u64,

    /// `adaptive`: poll sooner when a step or the end is due, with jitter
    /// (the interval stays the ceiling); `fixed`: every interval exactly.
    #[arg(long, env = "TASKWIRE_POLL_MODE", default_value = "adaptive")]
    pub poll_mode: PollMode,

    /// With adaptive cadence, never poll a task more often than this (ms).
    #[arg(long, env = "TASKWIRE_POLL_MIN_MS", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub poll_min_ms: u64,

    /// Polls in flight at once, over all tasks.
    #[arg(long, env = "TASKWIRE_MAX_CONCURRENT_POLLS", default_value_t = 512,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub max_concurrent_polls: u64,

    /// Polls started per second, over all tasks (0: no cap). Beyond it, due
    /// polls wait in the delay queue.
    #[arg(long, env = "TASKWIRE_MAX_POLLS_PER_S", default_value_t = 50_000)]
    pub max_polls_per_s: u64,

    /// Timeout of each request to the task service, in milliseconds.
    #[arg(long, env = "TASKWIRE_BACKEND_TIMEOUT_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub backend_timeout_ms: u64,

    /// A task whose task service stays unreachable this long turns `failed`.
    #[arg(long, env = "TASKWIRE_BACKEND_GIVE_UP_S", default_value_t = 300)]
    pub backend_give_up_s: u64,

    /// How long finished tasks stay listed, in seconds.
    #[arg(long, env = "TASKWIRE_RETENTION_S", default_value_t = 600)]
    pub retention_s: u64,

    /// Origins allowed to open the WebSocket besides the page's own
    /// (comma separated, e.g. `https://example.com`).
    #[arg(long, env = "TASKWIRE_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
}

impl Config {
    /// Defaults for tests: port 0, embedded backend.
    pub fn for_tests() -> Self {
        Cli::parse_from(["taskwire", "--listen", "127.0.0.1:0"]).config
    }
}
