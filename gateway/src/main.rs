//! `podfs-gateway`: parses the configuration, builds the state and serves until SIGINT/SIGTERM.

use clap::Parser;
use podfs_gateway::config::{Args, Config};
use podfs_gateway::server;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        // colours only for a terminal: a service's log usually goes to a file or a journal
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("podfs-gateway: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    // the AWS SDK brings aws-lc, other TLS users bring ring: with both in the graph rustls needs
    // a process-wide choice (CRATES.md trap 1)
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = Config::resolve(Args::parse())?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("listening on {}: {e}", config.listen))?;
    let addr = listener.local_addr()?;
    let state = server::build(config.clone()).await?;
    tracing::info!(%addr, database = %redact(&config.database_url), blobs = %state.blobs.backend().describe(), "podfs-gateway listening");
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down: finishing in-flight requests");
        signal.cancel();
    });
    server::serve(listener, state, shutdown).await
}

/// The database URL without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}
