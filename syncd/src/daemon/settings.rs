//! The daemon's settings: flags > environment > TOML file > defaults. Clap fills
//! [`Overrides`] from flags and environment (`cli::syncd`); [`Settings::resolve`] layers the
//! file and the defaults under them.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::transfer::hydrate::cache_dir_or_default;
use crate::transfer::peers::PeerSettings;

pub const DEFAULT_QUIET_MS: u64 = 100;
pub const DEFAULT_MAX_DELAY_MS: u64 = 1000;
pub const DEFAULT_RESCAN_SECS: u64 = 300;

/// What the command line and environment set (`None`: not given).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub gateway: Option<String>,
    pub token: Option<String>,
    pub workspace: Option<String>,
    pub dir: PathBuf,
    pub quiet_ms: Option<u64>,
    pub max_delay_ms: Option<u64>,
    pub rescan_secs: Option<u64>,
    pub cache_dir: Option<PathBuf>,
    pub author: Option<String>,
    pub adopt: bool,
    pub peer_listen: Option<String>,
    pub peer_advertise: Option<String>,
    pub zone: Option<String>,
    pub peer_hostile: Option<podfs_peer::Hostile>,
    /// The TOML file with any of the settings above (keys as the flags, `_` for `-`).
    pub config: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    gateway: Option<String>,
    token: Option<String>,
    workspace: Option<String>,
    quiet_ms: Option<u64>,
    max_delay_ms: Option<u64>,
    rescan_secs: Option<u64>,
    cache_dir: Option<PathBuf>,
    author: Option<String>,
    peer_listen: Option<String>,
    peer_advertise: Option<String>,
    zone: Option<String>,
}

/// Resolved settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub gateway: String,
    pub token: Option<String>,
    pub workspace: String,
    pub dir: PathBuf,
    pub quiet: Duration,
    pub max_delay: Duration,
    pub rescan: Duration,
    pub cache_dir: PathBuf,
    pub author: String,
    pub adopt: bool,
    /// Serving peers and taking cold starts from them; `None`: off.
    pub peers: Option<PeerSettings>,
}

impl Settings {
    pub fn resolve(o: Overrides) -> anyhow::Result<Self> {
        let file: FileConfig = match &o.config {
            Some(p) => {
                let text =
                    std::fs::read_to_string(p).with_context(|| format!("reading config file {}", p.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing config file {}", p.display()))?
            }
            None => FileConfig::default(),
        };
        let Some(workspace) = o.workspace.or(file.workspace) else {
            bail!("no workspace: pass --workspace NAME (or PODFS_WORKSPACE, or `workspace` in the config file)")
        };
        let ms = |v: Option<u64>, f: Option<u64>, d: u64| Duration::from_millis(v.or(f).unwrap_or(d));
        let quiet = ms(o.quiet_ms, file.quiet_ms, DEFAULT_QUIET_MS);
        let max_delay = ms(o.max_delay_ms, file.max_delay_ms, DEFAULT_MAX_DELAY_MS).max(quiet);
        let rescan = Duration::from_secs(o.rescan_secs.or(file.rescan_secs).unwrap_or(DEFAULT_RESCAN_SECS).max(1));
        let dir = std::path::absolute(&o.dir).with_context(|| format!("bad directory {}", o.dir.display()))?;
        Ok(Self {
            gateway: o.gateway.or(file.gateway).unwrap_or_else(|| podfs_client::DEFAULT_GATEWAY.to_string()),
            token: o.token.or(file.token),
            workspace,
            dir,
            quiet,
            max_delay,
            rescan,
            cache_dir: cache_dir_or_default(o.cache_dir.or(file.cache_dir))?,
            author: o.author.or(file.author).unwrap_or_else(default_author),
            adopt: o.adopt,
            peers: peer_settings(
                o.peer_listen.or(file.peer_listen),
                o.peer_advertise.or(file.peer_advertise),
                o.zone.or(file.zone),
                o.peer_hostile,
            )?,
        })
    }
}

fn peer_settings(
    listen: Option<String>,
    advertise: Option<String>,
    zone: Option<String>,
    hostile: Option<podfs_peer::Hostile>,
) -> anyhow::Result<Option<PeerSettings>> {
    let Some(listen) = listen else {
        if advertise.is_some() {
            bail!("--peer-advertise needs --peer-listen");
        }
        return Ok(None);
    };
    let parse = |what: &str, s: &str| -> anyhow::Result<std::net::SocketAddr> {
        s.parse().with_context(|| format!("bad {what} {s:?}: an IP address and a port, as 10.0.0.5:7070"))
    };
    let listen = parse("--peer-listen", &listen)?;
    let advertise = match advertise {
        Some(a) => parse("--peer-advertise", &a)?,
        None if listen.ip().is_unspecified() || listen.port() == 0 => {
            bail!("--peer-listen {listen} is not an address peers can reach: pass --peer-advertise IP:PORT")
        }
        None => listen,
    };
    if advertise.ip().is_unspecified() || advertise.port() == 0 {
        bail!("--peer-advertise {advertise} is not an address peers can reach");
    }
    let zone = zone.unwrap_or_else(|| "default".to_string());
    if !podfs_protocol::peer::valid_zone(&zone) {
        bail!("bad --zone {zone:?}: 1-64 of [A-Za-z0-9._-]");
    }
    Ok(Some(PeerSettings { listen, advertise, zone, hostile }))
}

fn default_author() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    format!("syncd@{}", if host.is_empty() { "localhost" } else { host })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &str) -> Overrides {
        Overrides { dir: PathBuf::from(dir), cache_dir: Some(PathBuf::from("/tmp/cache")), ..Overrides::default() }
    }

    #[test]
    fn flags_beat_the_file_which_beats_defaults() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("syncd.toml");
        std::fs::write(
            &file,
            "workspace = \"from-file\"\nquiet_ms = 250\nrescan_secs = 60\ngateway = \"http://gw:1\"\n",
        )
        .unwrap();
        let mut a = args("/work/w");
        a.config = Some(file.clone());
        a.quiet_ms = Some(50);
        a.token = Some("tok".into());
        let s = Settings::resolve(a).unwrap();
        assert_eq!(s.workspace, "from-file");
        assert_eq!(s.quiet, Duration::from_millis(50), "the flag wins");
        assert_eq!(s.rescan, Duration::from_secs(60), "the file fills what flags left");
        assert_eq!(s.max_delay, Duration::from_millis(DEFAULT_MAX_DELAY_MS));
        assert_eq!(s.gateway, "http://gw:1");
        assert_eq!(s.token.as_deref(), Some("tok"));
        assert!(s.author.starts_with("syncd@"));

        let mut a = args("/work/w");
        a.config = Some(file);
        a.gateway = Some("http://flag:2".into());
        let s = Settings::resolve(a).unwrap();
        assert_eq!((s.gateway.as_str(), s.quiet), ("http://flag:2", Duration::from_millis(250)));
    }

    #[test]
    fn bad_settings_are_named() {
        let err = Settings::resolve(args("/w")).unwrap_err().to_string();
        assert!(err.contains("--workspace"), "{err}");
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("bad.toml");
        std::fs::write(&file, "workspace = \"w\"\nquiet = 3\n").unwrap();
        let mut a = args("/w");
        a.config = Some(file);
        let err = format!("{:#}", Settings::resolve(a).unwrap_err());
        assert!(err.contains("bad.toml") && err.contains("quiet"), "{err}");
    }
}
