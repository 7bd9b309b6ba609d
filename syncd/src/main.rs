//! The `podfs` binary: process setup around [`podfs_syncd::run`].

use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    // One rustls provider for the whole process (the dependency graph may hold aws-lc too).
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,podfs_syncd::daemon=info")),
        )
        .with_writer(std::io::stderr)
        // colours only for a terminal: a daemon's log usually goes to a file or a journal
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    podfs_syncd::run(std::env::args_os()).await
}
