//! `podfs syncd --workspace NAME DIR`: the daemon's flags, and the process around
//! [`crate::daemon::run`]: SIGINT and SIGTERM cancel its shutdown token.

use std::path::PathBuf;

use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::daemon::{self, Overrides, Settings};

/// `podfs syncd --workspace NAME DIR`.
#[derive(Debug, Clone, Args)]
pub struct SyncdArgs {
    /// The workspace to keep DIR in sync with.
    #[arg(long, env = "PODFS_WORKSPACE")]
    pub workspace: Option<String>,
    /// The directory: empty (hydrated from head), or one this daemon or `podfs pull` filled.
    pub dir: PathBuf,
    /// Commit once the tree has been quiet this long [default: 100]
    #[arg(long, env = "PODFS_SYNCD_QUIET_MS")]
    pub quiet_ms: Option<u64>,
    /// ... or at the latest this long after the first change [default: 1000]
    #[arg(long, env = "PODFS_SYNCD_MAX_DELAY_MS")]
    pub max_delay_ms: Option<u64>,
    /// Full reconciliation of the tree every this many seconds [default: 300]
    #[arg(long, env = "PODFS_SYNCD_RESCAN_SECS")]
    pub rescan_secs: Option<u64>,
    /// Content cache shared by pulls [default: the user's cache directory]
    #[arg(long, env = "PODFS_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Author recorded on the versions [default: syncd@HOSTNAME]
    #[arg(long, env = "PODFS_SYNCD_AUTHOR")]
    pub author: Option<String>,
    /// Start in a non-empty DIR that podfs did not fill: its contents become the next version
    /// (paths of head missing from DIR are deleted).
    #[arg(long)]
    pub adopt: bool,
    /// Serve other devpods of the zone over QUIC (podfs-peer/1) on this UDP address, and take
    /// a cold start's manifest and large files from them before S3 [default: off]
    #[arg(long, env = "PODFS_PEER_LISTEN", value_name = "IP:PORT")]
    pub peer_listen: Option<String>,
    /// The address other devpods reach this one at [default: the listen address]
    #[arg(long, env = "PODFS_PEER_ADVERTISE", value_name = "IP:PORT")]
    pub peer_advertise: Option<String>,
    /// Peers share only within a zone (a network where they reach each other directly) [default: default]
    #[arg(long, env = "PODFS_ZONE")]
    pub zone: Option<String>,
    /// Serve peers wrong on purpose (testnet): flip, other, truncate, slowloris, stall, overlong, exit
    #[arg(long, hide = true)]
    pub peer_hostile: Option<podfs_peer::Hostile>,
    /// TOML file with any of the settings above and `gateway`, `token` (keys as the flags, `_` for `-`)
    #[arg(long, env = "PODFS_SYNCD_CONFIG")]
    pub config: Option<PathBuf>,
}

impl SyncdArgs {
    fn into_overrides(self, gateway: Option<String>, token: Option<String>) -> Overrides {
        Overrides {
            gateway,
            token,
            workspace: self.workspace,
            dir: self.dir,
            quiet_ms: self.quiet_ms,
            max_delay_ms: self.max_delay_ms,
            rescan_secs: self.rescan_secs,
            cache_dir: self.cache_dir,
            author: self.author,
            adopt: self.adopt,
            peer_listen: self.peer_listen,
            peer_advertise: self.peer_advertise,
            zone: self.zone,
            peer_hostile: self.peer_hostile,
            config: self.config,
        }
    }
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(args: SyncdArgs, gateway: Option<String>, token: Option<String>) -> anyhow::Result<()> {
    let settings = Settings::resolve(args.into_overrides(gateway, token))?;
    let shutdown = CancellationToken::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let on_signal = shutdown.clone();
    let signals = tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        on_signal.cancel();
    });
    let result = daemon::run(settings, shutdown).await;
    signals.abort();
    result
}
