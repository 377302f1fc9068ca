use server::config::{Cli, Command};
use server::{sim, Application};
use std::sync::Arc;
use tracing_subscriber::EnvFilter;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
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
