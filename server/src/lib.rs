//! taskwire's server: the page (Leptos SSR), the WebSocket hub, the poll
//! scheduler and the task-service adapters, wired together by
//! [`Application`].

pub mod backend;
pub mod clock;
pub mod config;
pub mod engine;
pub mod hub;
pub mod metrics;
pub mod rate;
pub mod scheduler;
pub mod session;
pub mod sim;
pub mod ws;

use app::{shell, App, InitialTasks};
use axum::extract::FromRef;
use axum::routing::get;
use axum::Router;
use backend::Backend;
use clock::Clock;
use config::{BackendChoice, Config, Role};
use engine::listener::Listener;
use engine::store::{Store, StoreError};
use engine::worker::Worker;
use engine::Engine;
use hub::{CloseReason, Hub};
use leptos::prelude::LeptosOptions;
use leptos_axum::{generate_route_list, LeptosRoutes};
use scheduler::policy::PollPolicy;
use scheduler::{Limits, Scheduler, SchedulerHandle};
use sim::Simulator;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How long in-flight polls get to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub leptos_options: LeptosOptions,
    pub config: Arc<Config>,
    pub hub: Hub,
    /// Sessions and tasks: in memory, or in Redis (mirrored in `hub`).
    pub engine: Engine,
    pub backend: Backend,
    pub scheduler: SchedulerHandle,
    pub policy: Arc<PollPolicy>,
    /// The embedded simulator, when that is the backend.
    pub sim: Option<Arc<Simulator>>,
    /// One permit per open WebSocket (`--max-connections`).
    pub connections: Arc<tokio::sync::Semaphore>,
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
    #[error("bad backend: {0}")]
    Backend(#[from] backend::BackendError),
    #[error("bad Redis URL: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Config(String),
}

/// A built server, bound to its port, not yet serving.
pub struct Application {
    tcp: TcpListener,
    router: Router,
    state: AppState,
    scheduler: Scheduler,
    /// The Redis engine's poller (roles `all` and `worker`).
    worker: Option<Worker>,
    /// The Redis engine's change feed (roles `all` and `web`).
    listener: Option<Listener>,
    addr: SocketAddr,
}

impl Application {
    pub async fn build(config: Config) -> Result<Application, StartupError> {
        let clock = Clock::new();
        if config.redis.is_none() && config.role != Role::All {
            return Err(StartupError::Config(
                "--role web and --role worker need --redis (without it, one process does all)"
                    .into(),
            ));
        }
        if config.role != Role::All && config.backend == BackendChoice::Embedded {
            return Err(StartupError::Config(
                "--role web and --role worker need a shared task service: --backend http://..."
                    .into(),
            ));
        }
        let store = config.redis.as_deref().map(Store::open).transpose()?;
        if let Some(store) = &store {
            match tokio::time::timeout(Duration::from_secs(2), store.ping()).await {
                Ok(Ok(())) => tracing::info!(role = ?config.role, "Redis engine: connected"),
                _ => tracing::warn!("Redis is not answering yet; carrying on and retrying"),
            }
        }
        let (backend, sim) = match &config.backend {
            BackendChoice::Embedded => {
                let sim = Arc::new(Simulator::new());
                (Backend::embedded(sim.clone(), clock), Some(sim))
            }
            BackendChoice::Http(url) => (
                Backend::http(url, Duration::from_millis(config.backend_timeout_ms), clock)?,
                None,
            ),
        };
        let policy = PollPolicy {
            poll_interval_ms: config.poll_interval_ms,
            poll_min_ms: config.poll_min_ms,
            adaptive: config.poll_mode == config::PollMode::Adaptive,
            give_up_ms: config.backend_give_up_s.saturating_mul(1000),
            retention_ms: config.retention_s.saturating_mul(1000),
        };
        let hub = if store.is_some() {
            Hub::mirror(clock)
        } else {
            Hub::new(clock)
        };
        let limits = Limits {
            max_in_flight: config.max_concurrent_polls as usize,
            max_polls_per_s: config.max_polls_per_s,
        };
        // With Redis, the local scheduler only expires the mirror's
        // finished tasks and keeps the metrics; the workers poll.
        let (scheduler, handle) =
            Scheduler::new(hub.clone(), backend.clone(), policy.clone(), limits.clone());
        let policy = Arc::new(policy);
        let retention = Duration::from_secs(config.retention_s);
        let engine = Engine::new(
            hub.clone(),
            handle.clone(),
            policy.clone(),
            clock,
            store.clone(),
        );
        let worker = store
            .as_ref()
            .filter(|_| config.role.polls())
            .map(|store| Worker {
                store: store.clone(),
                backend: backend.clone(),
                policy: policy.clone(),
                limits,
                clock,
                stats: handle.shared_stats(),
                backend_timeout: Duration::from_millis(config.backend_timeout_ms),
            });
        let listener = store
            .as_ref()
            .filter(|_| config.role.serves_clients())
            .map(|store| Listener {
                store: store.clone(),
                hub: hub.clone(),
                scheduler: handle.clone(),
                retention,
            });

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

        let connections = Arc::new(tokio::sync::Semaphore::new(
            (config.limits.max_connections as usize).min(tokio::sync::Semaphore::MAX_PERMITS),
        ));
        let state = AppState {
            leptos_options,
            config: Arc::new(config),
            hub,
            engine,
            backend,
            scheduler: handle,
            policy,
            sim,
            connections,
        };
        let router = if state.config.role.serves_clients() {
            router(state.clone())
        } else {
            worker_router(state.clone())
        };
        Ok(Application {
            tcp,
            router,
            state,
            scheduler,
            worker,
            listener,
            addr,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
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
        let scheduler = tokio::spawn(self.scheduler.run(stop_rx.clone()));
        let worker = self.worker.map(|w| tokio::spawn(w.run(stop_rx.clone())));
        if let Some(listener) = self.listener {
            tokio::spawn(listener.run(stop_rx.clone()));
        }
        let hub = self.state.hub.clone();
        let serve = axum::serve(self.tcp, self.router).with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down: closing connections");
            hub.close_all(CloseReason::Restart);
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
            let _ = scheduler.await;
            if let Some(worker) = worker {
                let _ = worker.await;
            }
        })
        .await;
        result
    }

    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.run_until(shutdown_signal()).await
    }
}

fn router(state: AppState) -> Router {
    let routes = generate_route_list(App);
    let options = state.leptos_options.clone();
    // The page is rendered with the session's tasks already in it (read
    // by the session middleware, which may wait on Redis).
    let initial_tasks = move || {
        let tasks = leptos::prelude::use_context::<axum::http::request::Parts>()
            .and_then(|parts| parts.extensions.get::<InitialTasks>().cloned())
            .unwrap_or_default();
        leptos::prelude::provide_context(tasks);
    };
    Router::new()
        .route("/ws", get(ws::handler))
        .leptos_routes_with_context(&state, routes, initial_tasks, move || {
            shell(options.clone())
        })
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            session::middleware,
        ))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics::render))
        .fallback(leptos_axum::file_and_error_handler::<AppState, _>(shell))
        .with_state(state)
}

/// A worker serves no page and no WebSocket: only its health and metrics.
fn worker_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics::render))
        .with_state(state)
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
