//! taskwire's server: the web side (page, WebSocket), the engine (memory
//! or Redis: sessions, tasks, the delay queue, the fan-out), the
//! task-service adapters and the simulator, wired together by
//! [`Application`]. The engine is chosen here, once.

pub mod auth;
pub mod backend;
pub mod clock;
pub mod config;
pub mod engine;
pub mod metrics;
pub mod rate;
pub mod sim;
pub mod task;
pub mod task_api;
pub mod web;
pub mod webhook;

use axum::extract::FromRef;
use axum::Router;
use backend::Backend;
use clock::Clock;
use config::file::AdapterSpec;
use config::{AdminListen, Config, Role};
use engine::backends::{Backends, Slot};
use engine::fanout::{CloseReason, Fanout};
use engine::memory::queue::Queue;
use engine::memory::MemoryEngine;
use engine::pipeline::{Limits, PollCtx, PollStats};
use engine::redis::listener::Listener;
use engine::redis::store::{Store, StoreError};
use engine::redis::worker::Worker;
use engine::redis::RedisEngine;
use engine::{Engine, Imp};
use leptos::prelude::LeptosOptions;
use sim::Simulator;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use task::policy::PollPolicy;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How long in-flight polls get to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub leptos_options: LeptosOptions,
    pub config: Arc<Config>,
    /// Sessions, tasks and their fan-out: in memory, or in Redis.
    pub engine: Engine,
    /// The poll pipeline's counters, per backend (memory queues or Redis worker).
    pub stats: Arc<[Arc<PollStats>]>,
    /// The embedded simulator, when that is the backend.
    pub sim: Option<Arc<Simulator>>,
    /// One permit per open WebSocket or event stream (`--max-connections`).
    pub connections: Arc<tokio::sync::Semaphore>,
    /// The server API's keys and the watch tokens' signer.
    pub auth: Arc<auth::Auth>,
}

impl FromRef<AppState> for LeptosOptions {
    fn from_ref(state: &AppState) -> Self {
        state.leptos_options.clone()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr} (--admin-listen; `off` disables it): {source}")]
    AdminListen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("bad backend: {0}")]
    Backend(#[from] backend::BackendError),
    #[error("bad Redis URL: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Durable(#[from] engine::memory::durable::DurableError),
    #[error("{0}")]
    Config(String),
}

/// A built server, bound to its port, not yet serving.
pub struct Application {
    tcp: TcpListener,
    /// The operators' listener (`--admin-listen`) and its address.
    admin: Option<(TcpListener, SocketAddr)>,
    router: Router,
    state: AppState,
    /// The memory engine's delay queues, one per backend.
    queues: Vec<Queue>,
    /// The Redis engine's poller: owns partitions, a delay queue per
    /// backend (roles `all` and `worker`).
    worker: Option<Worker>,
    /// The Redis engine's change feed (roles `all` and `web`).
    listener: Option<Listener>,
    addr: SocketAddr,
}

impl Application {
    pub async fn build(mut config: Config) -> Result<Application, StartupError> {
        config.resolve();
        let clock = Clock::new();
        if config.redis.is_none() && config.role != Role::All {
            return Err(StartupError::Config(
                "--role web and --role worker need --redis (without it, one process does all)"
                    .into(),
            ));
        }
        let embedded = config
            .backends
            .iter()
            .any(|b| b.adapter == AdapterSpec::Embedded);
        if config.role != Role::All && embedded {
            return Err(StartupError::Config(
                "--role web and --role worker need a shared task service: --backend http://..."
                    .into(),
            ));
        }
        let store = config.redis.as_deref().map(Store::open).transpose()?;
        if let Some(store) = &store {
            match tokio::time::timeout(Duration::from_secs(2), store.ping()).await {
                Ok(Ok(())) => {
                    tracing::info!(role = ?config.role, cluster = store.is_cluster(), "Redis engine: connected");
                    if let Err(e) = store.migrate_unpartitioned().await {
                        tracing::warn!(error = %e, "moving keys of an older version failed");
                    }
                    if let Err(e @ StoreError::Corrupt(_)) = store.check_partitions().await {
                        return Err(StartupError::Config(e.to_string()));
                    }
                }
                _ => tracing::warn!("Redis is not answering yet; carrying on and retrying"),
            }
        }
        // The recorder first: handles taken before it would go nowhere.
        let _ = metrics::handle();
        let (backends, sim) = build_backends(&config, clock)?;
        let retention = Duration::from_secs(config.retention_s);
        let fanout = Fanout::new(clock);
        let (engine, queues, worker, listener) = match store {
            None => {
                let (memory, queues) = if config.ephemeral {
                    MemoryEngine::with_backends(fanout.clone(), &backends, retention)
                } else {
                    MemoryEngine::open(fanout.clone(), &backends, retention, &config.data_dir)
                        .await?
                };
                let engine =
                    Engine::with_backends(fanout, Imp::Memory(memory), backends.clone(), clock);
                (engine, queues, None, None)
            }
            Some(store) => {
                let redis = RedisEngine::new(store.clone(), clock, config.retention_s, &backends);
                let worker = config.role.polls().then(|| Worker {
                    engine: redis.clone(),
                    backends: backends.clone(),
                });
                let listener = config
                    .role
                    .serves_clients()
                    .then(|| Listener::new(store, fanout.clone(), retention));
                let engine =
                    Engine::with_backends(fanout, Imp::Redis(redis), backends.clone(), clock);
                (engine, Vec::new(), worker, listener)
            }
        };
        let mut engine = engine;
        if let Some(settings) = config.webhooks.clone() {
            engine.set_webhooks(start_webhooks(&config, settings, clock).await?);
        }

        let tcp =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartupError::Listen {
                    addr: config.listen,
                    source,
                })?;
        let addr = tcp.local_addr().map_err(|source| StartupError::Listen {
            addr: config.listen,
            source,
        })?;

        let mut leptos_options = leptos::config::get_configuration(None)
            .map(|c| c.leptos_options)
            .unwrap_or_else(|_| LeptosOptions::builder().output_name("taskwire").build());
        if leptos_options.output_name.is_empty() {
            // Built without cargo-leptos (plain `cargo test`): the page still
            // renders, naming the assets cargo-leptos would build.
            leptos_options.output_name = "taskwire".into();
        }
        leptos_options.site_addr = addr;
        if let Some(root) = &config.site_root {
            leptos_options.site_root = root.to_string_lossy().into_owned().into();
        }
        // cargo-leptos writes the assets' hashes beside the binary
        // (`hash-files`); run without cargo-leptos's environment (`make
        // run`), the file still says the names are hashed.
        let hash_file = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join(&*leptos_options.hash_file)))
            .unwrap_or_default();
        let assets = web::headers::HashedAssets::load(
            &hash_file,
            &leptos_options.site_pkg_dir,
            &leptos_options.output_name,
        );
        leptos_options.hash_files = assets.hash_of("wasm").is_some();

        let admin = match config.admin_listen {
            AdminListen::Off => None,
            AdminListen::At(at) => {
                let err = |source| StartupError::AdminListen { addr: at, source };
                let tcp = TcpListener::bind(at).await.map_err(err)?;
                let bound = tcp.local_addr().map_err(err)?;
                Some((tcp, bound))
            }
        };

        let connections = Arc::new(tokio::sync::Semaphore::new(
            (config.limits.max_connections as usize).min(tokio::sync::Semaphore::MAX_PERMITS),
        ));
        let stats = backends
            .slots()
            .iter()
            .map(|s| s.ctx.stats.clone())
            .collect();
        let auth = Arc::new(build_auth(&config)?);
        let state = AppState {
            auth,
            leptos_options,
            config: Arc::new(config),
            engine,
            stats,
            sim,
            connections,
        };
        let router = if state.config.role.serves_clients() {
            web::router(state.clone(), assets)
        } else {
            web::worker_router(state.clone())
        };
        Ok(Application {
            tcp,
            admin,
            router,
            state,
            queues,
            worker,
            listener,
            addr,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where `/metrics` is served (`--admin-listen`), unless it is `off`.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(_, at)| *at)
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` completes: then stops accepting, closes every
    /// WebSocket with 1012, and lets the polls in flight finish.
    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let queues: Vec<_> = self
            .queues
            .into_iter()
            .map(|q| tokio::spawn(q.run(stop_rx.clone())))
            .collect();
        tokio::spawn(upkeep(self.state.clone(), stop_rx.clone()));
        let worker = self.worker.map(|w| tokio::spawn(w.run(stop_rx.clone())));
        if let Some(listener) = self.listener {
            tokio::spawn(listener.run(stop_rx.clone()));
        }
        // The admin listener stops with the rest (it holds no connection
        // worth draining).
        if let Some((tcp, _)) = self.admin {
            let admin = web::admin_router(self.state.clone());
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                let serve = axum::serve(tcp, admin).with_graceful_shutdown(async move {
                    let _ = stop.changed().await;
                });
                if let Err(e) = serve.await {
                    tracing::warn!(error = %e, "the admin listener stopped");
                }
            });
        }
        let engine = self.state.engine.clone();
        let serve = axum::serve(self.tcp, self.router).with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down: closing connections");
            engine.close_all(CloseReason::Restart);
            let _ = stop_tx.send(true);
        });
        let result = serve.await;
        // Upgraded connections outlive `serve`: wait (bounded) until every
        // one has sent its close frame and returned its permit, and for the
        // polls in flight.
        let connections = self.state.connections.clone();
        let every_permit = u32::try_from(self.state.config.limits.max_connections)
            .unwrap_or(u32::MAX)
            .min(tokio::sync::Semaphore::MAX_PERMITS as u32);
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
            let _ = connections.acquire_many(every_permit).await;
            for queue in queues {
                let _ = queue.await;
            }
            if let Some(worker) = worker {
                let _ = worker.await;
            }
        })
        .await;
        // The durable store's last checkpoint, whatever the wait above.
        self.state.engine.close().await;
        if let Some(hooks) = self.state.engine.webhooks() {
            hooks.close().await;
        }
        result
    }

    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.run_until(shutdown_signal()).await
    }
}

/// Each configured backend with its adapter, cadence, limits and counters;
/// and the simulator, when one of them is the embedded one.
fn build_backends(
    config: &Config,
    clock: Clock,
) -> Result<(Backends, Option<Arc<Simulator>>), StartupError> {
    let mut sim: Option<Arc<Simulator>> = None;
    let mut slots = Vec::with_capacity(config.backends.len());
    for spec in &config.backends {
        let t = &spec.tuning;
        let timeout = Duration::from_millis(t.timeout_ms);
        let backend = match &spec.adapter {
            AdapterSpec::Embedded => {
                let sim = sim.get_or_insert_with(|| Arc::new(Simulator::new()));
                Backend::embedded(sim.clone(), clock)
            }
            AdapterSpec::Taskwire { url } => Backend::http(
                url,
                timeout,
                usize::try_from(t.max_concurrent_polls).unwrap_or(usize::MAX),
                clock,
            )?
            .with_pipeline(t),
            AdapterSpec::Http(http) => Backend::declarative(&spec.name, http, timeout, clock)
                .map_err(|e| StartupError::Config(format!("backend `{}`: {e}", spec.name)))?
                .with_pipeline(t),
            AdapterSpec::Celery {
                broker,
                result_backend,
                queue,
                terminate_on_cancel,
            } => Backend::celery(
                broker,
                result_backend,
                queue,
                *terminate_on_cancel,
                timeout,
                clock,
            )?,
        };
        let policy = Arc::new(PollPolicy {
            poll_interval_ms: t.poll_interval_ms,
            poll_min_ms: t.poll_min_ms,
            adaptive: t.poll_mode == config::PollMode::Adaptive,
            give_up_ms: t.give_up_s.saturating_mul(1000),
            retention_ms: config.retention_s.saturating_mul(1000),
        });
        let ctx = Arc::new(PollCtx {
            backend,
            policy,
            clock,
            stats: Arc::new(PollStats::for_backend(&spec.name)),
        });
        slots.push(Slot {
            name: spec.name.as_str().into(),
            ctx,
            limits: Limits {
                max_in_flight: usize::try_from(t.max_concurrent_polls).unwrap_or(usize::MAX),
                max_polls_per_s: t.max_polls_per_s,
            },
        });
    }
    Ok((Backends::new(slots, config.kinds.clone()), sim))
}

/// Copies the engine's sizes and the poll counters into the metrics
/// registry every [`metrics::UPKEEP_INTERVAL`]. A sleep loop is right here:
/// one per process, not a timer per task (polls come from the delay queue).
async fn upkeep(state: AppState, mut stop: watch::Receiver<bool>) {
    use metrics as m;
    if m::handle().is_none() {
        return;
    }
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(m::UPKEEP_INTERVAL) => {}
        }
        let counts = state.engine.counts();
        ::metrics::gauge!(m::LIVE_TASKS).set(counts.live_tasks as f64);
        ::metrics::gauge!(m::TASKS).set(counts.tasks as f64);
        ::metrics::gauge!(m::SESSIONS).set(counts.sessions as f64);
        for stats in state.stats.iter() {
            let b = || ::metrics::Label::new("backend", stats.backend.to_string());
            let depth = stats.queue_depth.load(Ordering::Relaxed) as f64;
            ::metrics::gauge!(m::QUEUE_DEPTH, vec![b()]).set(depth);
            let in_flight = stats.in_flight.load(Ordering::Relaxed) as f64;
            ::metrics::gauge!(m::POLLS_IN_FLIGHT, vec![b()]).set(in_flight);
            ::metrics::counter!(m::POLLS, vec![b()]).absolute(stats.polls.load(Ordering::Relaxed));
            let deferred = stats.deferred.load(Ordering::Relaxed);
            ::metrics::counter!(m::POLLS_DEFERRED, vec![b()]).absolute(deferred);
        }
        ::metrics::counter!(m::UPDATES_COALESCED)
            .absolute(engine::fanout::outbox::COALESCED_TOTAL.load(Ordering::Relaxed));
        if let Some(h) = m::handle() {
            h.run_upkeep();
        }
    }
}

/// Ctrl-C or SIGTERM. The handlers are installed when this is called, not
/// when the future is first polled, so a signal that arrives while the
/// server is still starting is not lost to the default action (exit).
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let (mut term, mut int) = {
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::terminate()).ok(),
            signal(SignalKind::interrupt()).ok(),
        )
    };
    async move {
        #[cfg(unix)]
        {
            let term = async {
                match term.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let int = async {
                match int.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! { _ = term => {}, _ = int => {} }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The server API's keys and the token signer: `[tokens] secrets`, else
/// `--token-secret`, else a random secret (tokens then die with the process,
/// and several processes would not take each other's).
fn build_auth(config: &Config) -> Result<auth::Auth, StartupError> {
    let secrets: Vec<Vec<u8>> = if !config.token_secrets.is_empty() {
        config
            .token_secrets
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect()
    } else {
        config
            .token_secret
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect()
    };
    let signer = if secrets.is_empty() {
        if !config.api_keys.is_empty() || config.redis.is_some() {
            tracing::warn!(
                "no [tokens] secrets and no TASKWIRE_TOKEN_SECRET: watch tokens are signed \
                 with a random secret and stop working at the next restart"
            );
        }
        auth::Signer::ephemeral()
    } else {
        auth::Signer::new(secrets)
            .map_err(|e| StartupError::Config(format!("watch tokens: {e}")))?
    };
    Ok(auth::Auth {
        keys: auth::ApiKeys::new(config.api_keys.clone()),
        signer,
    })
}

/// The webhooks' delivery loop, its store beside the engine's truth: the
/// Redis engine's Redis, the durable file's directory, or memory with
/// `--ephemeral`. Every kind's webhook must pass the allow-list.
async fn start_webhooks(
    config: &Config,
    settings: webhook::WebhookSettings,
    clock: Clock,
) -> Result<webhook::Webhooks, StartupError> {
    let store = match (&config.redis, config.ephemeral) {
        (Some(url), _) => webhook::DeliveryStore::Redis(url.clone()),
        (None, true) => webhook::DeliveryStore::Memory,
        (None, false) => webhook::DeliveryStore::File(config.data_dir.clone()),
    };
    let hooks = webhook::Webhooks::start(settings, store, clock)
        .await
        .map_err(|e| StartupError::Config(format!("webhooks: {e}")))?;
    for kind in &config.kinds {
        if let Some(url) = &kind.webhook {
            hooks.check_url(url).map_err(|e| {
                StartupError::Config(format!("[[kind]] `{}`: webhook: {e}", kind.info.name))
            })?;
        }
    }
    Ok(hooks)
}
