use server::config::{Cli, Command};
use server::{sim, Application};
use std::sync::Arc;
use tracing_subscriber::EnvFilter;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let cli = match Cli::load() {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("taskwire: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    // The simulator keeps tokio's default (one thread per core, or
    // `TOKIO_WORKER_THREADS`).
    if let (None, n @ 1..) = (&cli.command, cli.config.worker_threads) {
        runtime.worker_threads(usize::try_from(n).unwrap_or(1));
    }
    match runtime.build() {
        Ok(runtime) => runtime.block_on(serve(cli)),
        Err(e) => {
            eprintln!("taskwire: cannot start the runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

// mimalloc's options (the vendored v3 `mi_option_e` of libmimalloc-sys;
// the crate's own constants are v2's and lack this one).
#[cfg(target_os = "linux")]
extern "C" {
    fn mi_option_set_default(option: std::ffi::c_int, value: std::ffi::c_long);
}
/// `mi_option_arena_eager_commit`: 4 in v3's `mi_option_e`.
#[cfg(target_os = "linux")]
const MI_OPTION_ARENA_EAGER_COMMIT: std::ffi::c_int = 4;

/// mimalloc commits its arenas up front on Linux by default and then only
/// resets (not decommits) what it frees, so pages freed after a burst
/// (WebSocket handshakes, a start ramp) stay in the RSS: measured, 2,000
/// idle connections cost ~15-19 KB each that way and ~10 KB without it
/// (docs/benchmarks.md, issue 15 second pass). The first arena is reserved
/// by the first allocation, before `main`, so this runs as an ELF
/// constructor (before Rust's runtime allocates anything) and allocates
/// nothing itself. A default only: `MIMALLOC_ARENA_EAGER_COMMIT` in the
/// environment still wins.
#[cfg(target_os = "linux")]
extern "C" fn commit_arenas_lazily() {
    // SAFETY: a plain setter of the linked mimalloc, run before any thread
    // or allocation exists.
    unsafe { mi_option_set_default(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
}

#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array"]
static COMMIT_ARENAS_LAZILY: extern "C" fn() = commit_arenas_lazily;

async fn serve(cli: Cli) -> std::process::ExitCode {
    let result = match cli.command {
        Some(Command::Sim(c)) => run_sim(c.listen, c.latency_ms).await,
        None => run(cli.config).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("taskwire: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(config: server::config::Config) -> Result<(), Box<dyn std::error::Error>> {
    let app = Application::build(config).await?;
    // Before the address goes out: a signal from then on shuts down cleanly.
    let stop = server::shutdown_signal();
    tracing::info!("taskwire listening on http://{}", app.addr());
    if let Some(admin) = app.admin_addr() {
        tracing::info!("metrics for operators at http://{admin}/metrics");
    }
    app.run_until(stop).await?;
    Ok(())
}

async fn run_sim(
    listen: std::net::SocketAddr,
    latency_ms: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let stop = server::shutdown_signal();
    tracing::info!(
        "task-service simulator listening on http://{}",
        listener.local_addr()?
    );
    let latency = std::time::Duration::from_millis(latency_ms);
    sim::http::serve(listener, Arc::new(sim::Simulator::new()), latency, stop).await?;
    Ok(())
}
