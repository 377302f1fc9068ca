//! The command line: one typed struct, parsed once and passed in. Every flag
//! also reads an environment variable, because scripts outside the repo start
//! taskwire.

pub mod file;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use file::{AdapterSpec, BackendSpec, KindSpec, Tuning};
use std::net::SocketAddr;
use std::path::Path;

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
    /// Serve the task-service simulator on its own (the task-service API of
    /// docs/protocol.md).
    Sim(SimConfig),
}

#[derive(Debug, Clone, Args)]
pub struct SimConfig {
    /// Address the simulator listens on.
    #[arg(long, env = "TASKWIRE_SIM_LISTEN", default_value = "127.0.0.1:4000")]
    pub listen: SocketAddr,

    /// Answer every `/tasks` request this much later (a slow task service,
    /// for benchmarks).
    #[arg(long, env = "TASKWIRE_SIM_LATENCY_MS", default_value_t = 0)]
    pub latency_ms: u64,
}

/// Where the task service is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendChoice {
    /// The simulator, in this process.
    Embedded,
    /// Any task service speaking the task-service API (docs/protocol.md) at
    /// this base URL.
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

/// `--admin-listen`: an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminListen {
    Off,
    At(SocketAddr),
}

impl std::str::FromStr for AdminListen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(AdminListen::Off);
        }
        s.parse()
            .map(AdminListen::At)
            .map_err(|_| format!("expected an address like 127.0.0.1:3002, or `off`, got `{s}`"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PollMode {
    Adaptive,
    Fixed,
}

/// What a process does (with `--redis`, any number of each share one Redis).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Web and worker in one process (the only role without `--redis`).
    All,
    /// The page, the WebSocket and sessions; no polling.
    Web,
    /// Polls the task service only (serves `/healthz` and `/metrics`).
    Worker,
}

impl Role {
    pub fn serves_clients(self) -> bool {
        self != Role::Worker
    }
    pub fn polls(self) -> bool {
        self != Role::Web
    }
}

#[derive(Debug, Clone, Args)]
pub struct Config {
    /// A TOML file of backends, kinds and server keys
    /// (docs/configuration.md); flags and their variables win over it.
    #[arg(long = "config", env = "TASKWIRE_CONFIG")]
    pub config_file: Option<std::path::PathBuf>,

    /// The backends, each with its own queue and limits (from the file,
    /// else one, `default`, from `--backend` and the poll flags).
    #[arg(skip)]
    pub backends: Vec<BackendSpec>,

    /// The kinds clients may start (from the file; else `simulate` with
    /// the embedded simulator, and any kind to a task service).
    #[arg(skip)]
    pub kinds: Vec<KindSpec>,

    /// The server API's keys (`[[api_key]]` in the file).
    #[arg(skip)]
    pub api_keys: Vec<crate::auth::ApiKey>,

    /// The watch tokens' secrets (`[tokens] secrets`): the first signs, all
    /// verify. Without them, `--token-secret`; without that, a random one
    /// (tokens then die with the process).
    #[arg(skip)]
    pub token_secrets: Vec<String>,

    /// The secret that signs watch tokens when the file has no `[tokens]`
    /// (at least 16 bytes; prefer the variable to the flag).
    #[arg(long, env = "TASKWIRE_TOKEN_SECRET", hide_env_values = true)]
    pub token_secret: Option<String>,

    /// Webhooks (`[webhooks]` in the file): secret, allow-list, retries.
    #[arg(skip)]
    pub webhooks: Option<crate::webhook::WebhookSettings>,

    /// A watch token's lifetime when the caller asks none (`[tokens] default_ttl_s`).
    #[arg(skip = crate::auth::DEFAULT_TOKEN_TTL_S)]
    pub token_ttl_s: u64,

    /// Address the web server listens on.
    #[arg(long, env = "TASKWIRE_LISTEN", default_value = "127.0.0.1:3000")]
    pub listen: SocketAddr,

    /// Threads running connections and polls (0: one per core). On a
    /// machine shared with the task service, fewer cost less per poll
    /// (docs/benchmarks.md, issue 15 third pass).
    #[arg(long, env = "TASKWIRE_WORKER_THREADS", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=1024))]
    pub worker_threads: u64,

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

    /// HTTP/1.1 pipelining of the polls to an HTTP task service: up to this
    /// many `GET`s written at once on one keep-alive connection, their
    /// answers read in order (0: off, one request per connection at a
    /// time). Only for a service that handles pipelined requests.
    #[arg(long, env = "TASKWIRE_PIPELINE_DEPTH", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=file::MAX_PIPELINE_DEPTH))]
    pub pipeline_depth: u64,

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

    /// The Redis engine: sessions and tasks live in this Redis
    /// (`redis://host:port/db`) or Redis Cluster
    /// (`redis+cluster://host:port,host:port`), shared by any number of web
    /// and worker processes. Unset: everything in this process's memory.
    #[arg(long, env = "TASKWIRE_REDIS")]
    pub redis: Option<String>,

    /// The memory engine keeps sessions and tasks in a file in this
    /// directory, so a restart loses nothing.
    #[arg(long, env = "TASKWIRE_DATA_DIR", default_value = "./taskwire-data")]
    pub data_dir: std::path::PathBuf,

    /// Keep everything in memory only: a restart forgets every session and
    /// task (the memory engine without its file).
    #[arg(long, env = "TASKWIRE_EPHEMERAL", value_parser = clap::builder::FalseyValueParser::new())]
    pub ephemeral: bool,

    /// `all`, `web` (page, WebSocket, sessions) or `worker` (polls only);
    /// `web` and `worker` need `--redis`.
    #[arg(long, env = "TASKWIRE_ROLE", default_value = "all")]
    pub role: Role,

    /// Where the operators' endpoints (`/metrics`) listen, apart from the
    /// public port; `off`: nowhere. The public port keeps `/healthz` only.
    #[arg(long, env = "TASKWIRE_ADMIN_LISTEN", default_value = "127.0.0.1:3002")]
    pub admin_listen: AdminListen,

    /// The page's CSP `frame-ancestors`: `'none'` (no site may frame it),
    /// or the sources that may, e.g. `'self' https://intranet.example`.
    #[arg(long, env = "TASKWIRE_FRAME_ANCESTORS", default_value = "'none'")]
    pub frame_ancestors: String,

    /// An HTTP request that has no response after this long is answered
    /// 408 (a WebSocket, once upgraded, is not a request any more).
    #[arg(long, env = "TASKWIRE_REQUEST_TIMEOUT_S", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub request_timeout_s: u64,

    /// The largest HTTP request body any route accepts (413 beyond).
    #[arg(long, env = "TASKWIRE_MAX_BODY_BYTES", default_value_t = 1_048_576)]
    pub max_body_bytes: u64,

    /// The built site (`pkg/`, `favicon.svg`); by default what cargo-leptos
    /// says (`LEPTOS_SITE_ROOT`), else `target/site`.
    #[arg(long, env = "TASKWIRE_SITE_ROOT")]
    pub site_root: Option<std::path::PathBuf>,

    #[command(flatten)]
    pub limits: ClientLimits,
}

/// What one client may do; every bound named, with its unit. Documented in
/// docs/security.md.
#[derive(Debug, Clone, Args)]
pub struct ClientLimits {
    /// Largest client message after reassembly; larger closes with 1009.
    #[arg(long, env = "TASKWIRE_MAX_MESSAGE_BYTES", default_value_t = 65_536,
          value_parser = clap::value_parser!(u64).range(1024..=16_777_216))]
    pub max_message_bytes: u64,

    /// Largest `params` of a `start`, serialised.
    #[arg(long, env = "TASKWIRE_MAX_PARAMS_BYTES", default_value_t = 16_384)]
    pub max_params_bytes: u64,

    /// Client messages per second per connection (token bucket); beyond:
    /// `rate_limited`.
    #[arg(long, env = "TASKWIRE_CLIENT_MSGS_PER_S", default_value_t = 20)]
    pub client_msgs_per_s: u64,

    /// Messages a connection may send at once before the rate applies.
    #[arg(long, env = "TASKWIRE_CLIENT_MSGS_BURST", default_value_t = 60)]
    pub client_msgs_burst: u64,

    /// `start`s per session per minute; beyond: `too_many_tasks`.
    #[arg(long, env = "TASKWIRE_MAX_STARTS_PER_MIN", default_value_t = 120)]
    pub max_starts_per_min: u64,

    /// Tasks not yet final per session; beyond: `too_many_tasks`.
    #[arg(
        long,
        env = "TASKWIRE_MAX_LIVE_TASKS_PER_SESSION",
        default_value_t = 100
    )]
    pub max_live_tasks_per_session: u64,

    /// WebSocket connections in total; beyond: HTTP 503 before the upgrade.
    #[arg(long, env = "TASKWIRE_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: u64,

    /// A client whose writes stay blocked this long is closed (1013); it
    /// gets what it missed from `welcome` when it reconnects.
    #[arg(long, env = "TASKWIRE_SLOW_CLIENT_TIMEOUT_S", default_value_t = 30)]
    pub slow_client_timeout_s: u64,

    /// Ping every connection this often (s).
    #[arg(long, env = "TASKWIRE_PING_INTERVAL_S", default_value_t = 20)]
    pub ping_interval_s: u64,

    /// A peer silent this long (no frame, no pong) is closed and forgotten (s).
    #[arg(long, env = "TASKWIRE_PING_TIMEOUT_S", default_value_t = 45)]
    pub ping_timeout_s: u64,
}

impl Cli {
    /// The command line of this process, with the `--config` file applied.
    pub fn load() -> Result<Cli, String> {
        let matches = Cli::command().get_matches();
        Cli::from_matches(&matches)
    }

    /// [`Cli::load`] of given arguments (for tests).
    pub fn load_from<I, T>(args: I) -> Result<Cli, String>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Cli::command()
            .try_get_matches_from(args)
            .map_err(|e| e.to_string())?;
        Cli::from_matches(&matches)
    }

    fn from_matches(matches: &ArgMatches) -> Result<Cli, String> {
        let mut cli = Cli::from_arg_matches(matches).map_err(|e| e.to_string())?;
        if let Some(path) = cli.config.config_file.clone() {
            cli.config.apply_file(&path, matches)?;
        }
        Ok(cli)
    }
}

impl Config {
    fn defaults_for_backends(&self) -> Tuning {
        Tuning {
            poll_interval_ms: self.poll_interval_ms,
            poll_min_ms: self.poll_min_ms,
            poll_mode: self.poll_mode,
            max_concurrent_polls: self.max_concurrent_polls,
            max_polls_per_s: self.max_polls_per_s,
            timeout_ms: self.backend_timeout_ms,
            give_up_s: self.backend_give_up_s,
            pipeline_depth: self.pipeline_depth,
        }
    }

    /// The file's keys, where no flag (or its variable) was given.
    fn apply_file(&mut self, path: &Path, matches: &ArgMatches) -> Result<(), String> {
        let loaded = file::load(path, &self.defaults_for_backends(), &|v| {
            std::env::var(v).ok()
        })
        .map_err(|e| e.to_string())?;
        let given = |id: &str| {
            matches!(
                matches.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        };
        let at = |key: &str, e: String| format!("{}: [server] {key}: {e}", path.display());
        let s = loaded.server;
        macro_rules! set {
            ($field:ident, $conv:expr) => {
                if let Some(v) = s.$field {
                    if !given(stringify!($field)) {
                        #[allow(clippy::redundant_closure_call)]
                        let value = ($conv)(v).map_err(|e: String| at(stringify!($field), e))?;
                        self.$field = value;
                    }
                }
            };
        }
        set!(listen, |v: String| v
            .parse()
            .map_err(|_| format!("`{v}` is not an address")));
        set!(admin_listen, |v: String| v.parse());
        set!(redis, |v: String| Ok(Some(v)));
        set!(data_dir, |v: String| Ok(v.into()));
        set!(ephemeral, Ok);
        set!(role, |v: String| <Role as clap::ValueEnum>::from_str(
            &v, false
        )
        .map_err(|_| format!("`{v}` is not all, web or worker")));
        set!(retention_s, Ok);
        set!(allowed_origins, Ok);
        set!(frame_ancestors, Ok);
        set!(request_timeout_s, Ok);
        set!(max_body_bytes, Ok);
        set!(worker_threads, Ok);
        set!(site_root, |v: String| Ok(Some(v.into())));
        if !loaded.backends.is_empty() && given("backend") {
            return Err(format!(
                "{}: has [[backend]] tables and --backend (TASKWIRE_BACKEND) is given too: use one",
                path.display()
            ));
        }
        self.backends = loaded.backends;
        self.kinds = loaded.kinds;
        self.api_keys = loaded.api_keys;
        self.webhooks = loaded.webhooks;
        if let Some(tokens) = loaded.tokens {
            self.token_secrets = tokens.secrets;
            if let Some(ttl) = tokens.default_ttl_s {
                self.token_ttl_s = ttl;
            }
        }
        Ok(())
    }

    /// Without backends from a file: one, `default`, from the flags; with
    /// the embedded simulator and no kinds, the `simulate` kind.
    /// `Application::build` calls it (tests change flags after parsing).
    pub fn resolve(&mut self) {
        if self.backends.is_empty() {
            self.backends.push(BackendSpec {
                name: "default".into(),
                adapter: match &self.backend {
                    BackendChoice::Embedded => AdapterSpec::Embedded,
                    BackendChoice::Http(url) => AdapterSpec::Taskwire { url: url.clone() },
                },
                tuning: self.defaults_for_backends(),
            });
        }
        if self.kinds.is_empty() && self.backends[0].adapter == AdapterSpec::Embedded {
            let info = app::kinds::simulate_kind();
            self.kinds.push(KindSpec {
                remote: info.name.clone(),
                webhook: None,
                info,
                backend: 0,
            });
        }
    }

    /// Defaults for tests: port 0, embedded backend, nothing on disk (the
    /// durable tests give their own `data_dir`).
    pub fn for_tests() -> Self {
        Cli::parse_from([
            "taskwire",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--ephemeral",
        ])
        .config
    }
}
