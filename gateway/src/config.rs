//! Gateway configuration: flags > environment > TOML file > defaults.
//!
//! clap resolves flag and environment; the file (`--config` / `PODFS_CONFIG`) fills what
//! neither gave; the named constants below fill the rest. With no database URL and no blob
//! store, the gateway runs on the embedded default: SQLite metadata and a blob directory, both
//! under the data dir.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use serde::Deserialize;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
pub const DEFAULT_DATA_DIR: &str = "podfs-data";
/// Largest blob accepted: 4 GiB (one S3 PUT holds 5 GiB).
pub const DEFAULT_MAX_BLOB_SIZE: u64 = 4 << 30;
/// How long presigned download URLs stay valid.
pub const DEFAULT_PRESIGN_TTL_SECS: u64 = 900;
/// Largest JSON request body (a commit of ~300k changes).
pub const DEFAULT_MAX_JSON_BODY: usize = 64 << 20;
/// Files up to this size have their bytes inside a version's manifest.sqlite.
pub const DEFAULT_MANIFEST_SMALL_FILE_LIMIT: u64 = podfs_manifest::DEFAULT_SMALL_FILE_LIMIT;
/// Content up to this size is uploaded in batches and stored in packs.
pub const DEFAULT_PACK_BLOB_LIMIT: u64 = podfs_protocol::pack::DEFAULT_PACK_BLOB_LIMIT;
/// Packed blobs are handled in memory: at most 4 MiB each.
pub const MAX_PACK_BLOB_LIMIT: u64 = 4 << 20;
/// Largest batch upload body: a client batch of 16 MiB plus ample room.
pub const DEFAULT_MAX_BATCH_BODY: usize = 64 << 20;
/// Name of the admin token file written by the embedded default.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

#[derive(Debug, Clone, Parser, Default)]
#[command(name = "podfs-gateway", version, about = "The podfs gateway: workspaces, versions and content over HTTP")]
pub struct Args {
    /// Address to listen on [default: 127.0.0.1:7070]
    #[arg(long, env = "PODFS_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory for the embedded default's database and blobs, and for temporary files [default: ./podfs-data]
    #[arg(long, env = "PODFS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// PostgreSQL URL (postgres://...) or sqlite://FILE; the embedded SQLite under the data dir when absent
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Blob store: s3://bucket/prefix[?endpoint=URL&region=R&path_style=BOOL] or file:///dir; DATA_DIR/blobs when absent
    #[arg(long, env = "PODFS_BLOB_STORE")]
    pub blob_store: Option<String>,
    /// The admin bearer token; generated into DATA_DIR/admin-token on the embedded default when absent
    #[arg(long, env = "PODFS_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Largest blob accepted, in bytes [default: 4 GiB]
    #[arg(long, env = "PODFS_MAX_BLOB_SIZE")]
    pub max_blob_size: Option<u64>,
    /// Seconds presigned download URLs stay valid [default: 900]
    #[arg(long, env = "PODFS_PRESIGN_TTL_SECS")]
    pub presign_ttl_secs: Option<u64>,
    /// Send the AWS SDK's default CRC checksums to S3 (some S3-compatible services reject them)
    #[arg(long, env = "PODFS_S3_CHECKSUMS")]
    pub s3_checksums: Option<bool>,
    /// Files up to this many bytes travel inside manifest.sqlite [default: 128 KiB]
    #[arg(long, env = "PODFS_MANIFEST_SMALL_FILE_LIMIT")]
    pub manifest_small_file_limit: Option<u64>,
    /// Content up to this many bytes is stored in packs, several blobs to an S3 object [default: 1 MiB]
    #[arg(long, env = "PODFS_PACK_BLOB_LIMIT")]
    pub pack_blob_limit: Option<u64>,
    /// Hand out presigned URLs for ranges of packs (the S3 signature covers the Range header);
    /// false makes the gateway serve packed blobs itself, for a store that does not enforce a signed Range [default: true]
    #[arg(long, env = "PODFS_PRESIGN_RANGES")]
    pub presign_ranges: Option<bool>,
    /// TOML file with any of the settings above (keys as the flags, with `_` for `-`)
    #[arg(long, env = "PODFS_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    database_url: Option<String>,
    blob_store: Option<String>,
    admin_token: Option<String>,
    max_blob_size: Option<u64>,
    presign_ttl_secs: Option<u64>,
    s3_checksums: Option<bool>,
    manifest_small_file_limit: Option<u64>,
    pack_blob_limit: Option<u64>,
    presign_ranges: Option<bool>,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub database_url: String,
    pub blob_store: String,
    /// `None`: generate or read the token file (embedded default only).
    pub admin_token: Option<String>,
    pub max_blob_size: u64,
    pub presign_ttl: Duration,
    pub s3_checksums: bool,
    pub max_json_body: usize,
    pub manifest_small_file_limit: u64,
    pub pack_blob_limit: u64,
    pub max_batch_body: usize,
    pub presign_ranges: bool,
}

impl Config {
    pub fn resolve(args: Args) -> anyhow::Result<Self> {
        let file: FileConfig = match &args.config {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let data_dir = args.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let database_url = args
            .database_url
            .or(file.database_url)
            .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("meta.sqlite").display()));
        let blob_store = match args.blob_store.or(file.blob_store) {
            Some(s) => s,
            None => format!("file://{}", absolute(&data_dir.join("blobs"))?.display()),
        };
        Ok(Self {
            listen: match args.listen.or(file.listen) {
                Some(l) => l,
                None => DEFAULT_LISTEN.parse()?,
            },
            database_url,
            blob_store,
            admin_token: args.admin_token.or(file.admin_token).filter(|t| !t.is_empty()),
            max_blob_size: args.max_blob_size.or(file.max_blob_size).unwrap_or(DEFAULT_MAX_BLOB_SIZE),
            presign_ttl: Duration::from_secs(
                args.presign_ttl_secs.or(file.presign_ttl_secs).unwrap_or(DEFAULT_PRESIGN_TTL_SECS),
            ),
            s3_checksums: args.s3_checksums.or(file.s3_checksums).unwrap_or(false),
            max_json_body: DEFAULT_MAX_JSON_BODY,
            manifest_small_file_limit: args
                .manifest_small_file_limit
                .or(file.manifest_small_file_limit)
                .unwrap_or(DEFAULT_MANIFEST_SMALL_FILE_LIMIT),
            pack_blob_limit: match args.pack_blob_limit.or(file.pack_blob_limit).unwrap_or(DEFAULT_PACK_BLOB_LIMIT) {
                n if n > MAX_PACK_BLOB_LIMIT => {
                    anyhow::bail!("pack_blob_limit {n} is over the maximum of {MAX_PACK_BLOB_LIMIT} bytes (4 MiB)")
                }
                n => n,
            },
            max_batch_body: DEFAULT_MAX_BATCH_BODY,
            presign_ranges: args.presign_ranges.or(file.presign_ranges).unwrap_or(true),
            data_dir,
        })
    }

    /// An embedded-default configuration under `data_dir` (tests, quick starts).
    pub fn embedded(data_dir: &Path, admin_token: &str) -> anyhow::Result<Self> {
        Self::resolve(Args {
            data_dir: Some(data_dir.to_path_buf()),
            admin_token: Some(admin_token.to_string()),
            listen: Some("127.0.0.1:0".parse()?),
            ..Args::default()
        })
    }

    pub fn is_embedded_database(&self) -> bool {
        self.database_url.starts_with("sqlite:")
    }
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    Ok(if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir()?.join(p) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_flag_over_file_over_default() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gw.toml");
        std::fs::write(&file, "listen = \"127.0.0.1:9999\"\nmax_blob_size = 10\ndata_dir = \"/tmp/x\"\n").unwrap();
        let c =
            Config::resolve(Args { config: Some(file.clone()), max_blob_size: Some(20), ..Args::default() }).unwrap();
        assert_eq!(c.listen.port(), 9999);
        assert_eq!(c.max_blob_size, 20);
        assert_eq!(c.database_url, "sqlite:///tmp/x/meta.sqlite");
        assert_eq!(c.blob_store, "file:///tmp/x/blobs");
        assert_eq!(c.presign_ttl, Duration::from_secs(DEFAULT_PRESIGN_TTL_SECS));
        std::fs::write(&file, "bogus = 1\n").unwrap();
        assert!(Config::resolve(Args { config: Some(file), ..Args::default() }).is_err());
    }
}
