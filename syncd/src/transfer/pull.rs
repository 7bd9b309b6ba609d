//! Phase 1 pull (`podfs pull --per-file`): a version into a new or empty directory with one
//! download per distinct content, no manifest.sqlite and no cache.
//!
//! Steps: GET the JSON manifest and validate it (sorted, no duplicates, closed tree) before
//! touching the disk; create the directories; download every distinct content ([`super::fetch`]);
//! give directories their modes last. Every write goes through a `cap_std` handle on DIR.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use podfs_client::Client;
use podfs_protocol::VersionRef;
use serde::Serialize;

use super::blocking;
pub use super::fetch::DOWNLOAD_CONCURRENCY;
use super::fetch::{self, Fetcher, RemoteStats};
use super::plan::Plan;
use super::progress;
use crate::local::state::StateDir;
use crate::local::write;
use crate::validate;

#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Downloads in flight at once.
    pub concurrency: usize,
    /// Show progress bars on stderr.
    pub progress: bool,
}

impl Default for PullOptions {
    fn default() -> Self {
        Self { concurrency: DOWNLOAD_CONCURRENCY, progress: false }
    }
}

/// What a pull wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PullReport {
    pub workspace: String,
    pub version: u64,
    pub dir: PathBuf,
    pub files: u64,
    pub symlinks: u64,
    pub dirs: u64,
    /// Content bytes of the files written.
    pub bytes: u64,
    /// Distinct blobs downloaded (identical content is downloaded once).
    pub downloaded_blobs: u64,
    /// Content bytes of the distinct blobs.
    pub downloaded_bytes: u64,
}

/// Pull failures a caller may want to tell apart.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("workspace {0} not found")]
    WorkspaceNotFound(String),
    #[error("workspace {0} has no version yet")]
    NoVersion(String),
    #[error("version {version} of workspace {workspace} not found")]
    VersionNotFound { workspace: String, version: VersionRef },
}

/// Pulls `version` of `ws` into `dir`, which must not exist or be empty.
pub async fn pull(
    client: &Client,
    ws: &str,
    version: VersionRef,
    dir: &Path,
    opts: PullOptions,
) -> anyhow::Result<PullReport> {
    let manifest = match client.manifest(ws, version).await {
        Ok(m) => m,
        Err(e) if e.is_not_found() => return Err(not_found(client, ws, version).await),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read the manifest of {ws}@{version}"));
        }
    };
    if let VersionRef::Number(n) = version
        && manifest.version != n
    {
        return Err(validate::ManifestError::WrongVersion {
            want: format!("{ws}@{n}"),
            got: manifest.version.to_string(),
        }
        .into());
    }
    let version = manifest.version;
    let entries = validate::validate_entries(manifest.entries)
        .with_context(|| format!("refusing the manifest of {ws}@{version}"))?;

    let plan = Plan::new(entries.into_iter().map(|e| (e, None)), &HashSet::new())
        .with_context(|| format!("refusing the manifest of {ws}@{version}"))?;
    let report = PullReport {
        workspace: ws.to_string(),
        version,
        dir: dir.to_path_buf(),
        files: plan.files,
        symlinks: plan.symlinks,
        dirs: plan.dirs.len() as u64,
        bytes: plan.bytes,
        downloaded_blobs: plan.remote.len() as u64,
        downloaded_bytes: plan.remote.iter().map(|b| b.size).sum(),
    };
    let Plan { dirs, remote: blobs, .. } = plan;
    let total = std::time::Instant::now();

    let root = {
        let dir = dir.to_path_buf();
        let dirs = dirs.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<cap_std::fs::Dir> {
            let root = write::open_empty_root(&dir)?;
            for d in &dirs {
                write::create_dir(&root, &d.path)?;
            }
            Ok(root)
        })
        .await
        .context("directory task failed")??
    };
    let ctx = Arc::new(Fetcher {
        client: client.clone(),
        ws: ws.to_string(),
        root: Arc::new(root),
        bar: progress::bytes_bar(opts.progress, report.downloaded_bytes, "pulling"),
        cache: None,
        stats: RemoteStats::default(),
        peers: None,
    });

    fetch::download_all(&ctx, blobs, opts.concurrency.max(1)).await.with_context(|| {
        format!("pull of {ws}@{} into {} failed; the directory is incomplete", report.version, dir.display())
    })?;

    let root = Arc::clone(&ctx.root);
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        for d in dirs.iter().rev() {
            write::set_mode(&root, &d.path, d.mode)?;
        }
        Ok(())
    })
    .await
    .context("directory task failed")??;
    ctx.bar.finish_and_clear();
    {
        let (dir, ws, version) = (dir.to_path_buf(), ws.to_string(), report.version);
        blocking(move || StateDir::of(&dir).write_pull_state(&ws, version)).await?;
    }
    tracing::debug!(secs = total.elapsed().as_secs_f64(), "per-file pull done");
    Ok(report)
}

/// Explains a 404 on the manifest.
async fn not_found(client: &Client, ws: &str, version: VersionRef) -> anyhow::Error {
    match client.workspace(ws).await {
        Err(e) if e.is_not_found() => PullError::WorkspaceNotFound(ws.to_string()).into(),
        Ok(w) if w.head == 0 => PullError::NoVersion(ws.to_string()).into(),
        _ => PullError::VersionNotFound { workspace: ws.to_string(), version }.into(),
    }
}
