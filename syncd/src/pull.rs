//! `podfs pull WORKSPACE[@VERSION] DIR`: materialize a version into a new or empty directory.
//!
//! Steps: GET the manifest and validate it (sorted, no duplicates, closed tree) before touching
//! the disk; create the directories; fetch blob locations in batches of 10,000, lazily; download
//! each distinct blob once, 64 at a time, verify it, write every path holding it atomically;
//! give directories their modes last. Every write goes through a `cap_std` handle on DIR.
//!
//! Memory: blobs up to [`SMALL_BLOB`] are fetched into memory (bounded by the expected size, so
//! at most `concurrency` x about 2 x SMALL_BLOB bytes); larger ones are streamed through the
//! decoder into a temporary file. Retries: the client retries in-memory fetches; streamed
//! fetches are retried here with a fresh temporary file; refused presigned URLs (expired) get
//! fresh locations.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cap_std::fs::{Dir, File};
use futures::{StreamExt, TryStreamExt};
use indicatif::ProgressBar;
use podfs_client::{Client, Error as ClientError};
use podfs_protocol::api::{BlobLocation, MAX_HASH_BATCH};
use podfs_protocol::{ContentHash, Entry, EntryKind, VersionRef, WsPath};
use serde::Serialize;

use std::sync::atomic::{AtomicU64, Ordering};

use crate::cache::ContentCache;
use crate::manifest;
use crate::progress;
use crate::restore::{self, TempFile};

/// Downloads in flight at once.
pub const DOWNLOAD_CONCURRENCY: usize = 64;
/// Blobs up to this content size are downloaded into memory; larger ones are streamed to disk.
pub const SMALL_BLOB: u64 = 1 << 20;
/// Times a refused presigned URL is replaced by a fresh location before giving up.
const MAX_LOCATION_REFRESHES: u32 = 3;

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

/// One distinct content and every path that holds it.
pub(crate) struct Blob {
    pub(crate) hash: ContentHash,
    pub(crate) size: u64,
    pub(crate) targets: Vec<Entry>,
}

/// What downloads from the blob store did (for the per-source summary).
#[derive(Debug, Default)]
pub(crate) struct RemoteStats {
    /// Paths written from downloaded content.
    pub(crate) files: AtomicU64,
    /// Content bytes downloaded.
    pub(crate) bytes: AtomicU64,
    /// HTTP requests: blob GETs and location batches.
    pub(crate) requests: AtomicU64,
}

pub(crate) struct Ctx {
    pub(crate) client: Client,
    pub(crate) ws: String,
    pub(crate) root: Arc<Dir>,
    pub(crate) bar: ProgressBar,
    /// Downloaded content is also added here.
    pub(crate) cache: Option<ContentCache>,
    pub(crate) stats: RemoteStats,
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
        return Err(manifest::ManifestError::WrongVersion {
            want: format!("{ws}@{n}"),
            got: manifest.version.to_string(),
        }
        .into());
    }
    let version = manifest.version;
    let entries = manifest::validate_entries(manifest.entries)
        .with_context(|| format!("refusing the manifest of {ws}@{version}"))?;

    let plan = plan(entries)?;
    let report = PullReport {
        workspace: ws.to_string(),
        version,
        dir: dir.to_path_buf(),
        files: plan.files,
        symlinks: plan.symlinks,
        dirs: plan.dirs.len() as u64,
        bytes: plan.bytes,
        downloaded_blobs: plan.blobs.len() as u64,
        downloaded_bytes: plan.blobs.iter().map(|b| b.size).sum(),
    };
    let Plan { dirs, blobs, .. } = plan;
    let total = std::time::Instant::now();

    let root = {
        let dir = dir.to_path_buf();
        let dirs = dirs.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<Dir> {
            let root = restore::open_empty_root(&dir)?;
            for d in &dirs {
                restore::create_dir(&root, &d.path)?;
            }
            Ok(root)
        })
        .await
        .context("directory task failed")??
    };
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        ws: ws.to_string(),
        root: Arc::new(root),
        bar: progress::bytes_bar(opts.progress, report.downloaded_bytes, "pulling"),
        cache: None,
        stats: RemoteStats::default(),
    });

    download_all(&ctx, blobs, opts.concurrency.max(1)).await.with_context(|| {
        format!("pull of {ws}@{} into {} failed; the directory is incomplete", report.version, dir.display())
    })?;

    let root = Arc::clone(&ctx.root);
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        for d in dirs.iter().rev() {
            restore::set_mode(&root, &d.path, d.mode)?;
        }
        Ok(())
    })
    .await
    .context("directory task failed")??;
    ctx.bar.finish_and_clear();
    crate::hydrate::write_state(dir, ws, report.version)?;
    tracing::debug!(secs = total.elapsed().as_secs_f64(), "per-file pull done");
    Ok(report)
}

/// What a validated manifest asks for: directories in path order, and each distinct content
/// with every path holding it.
struct Plan {
    dirs: Vec<Entry>,
    blobs: Vec<Blob>,
    files: u64,
    symlinks: u64,
    /// Content bytes of the files.
    bytes: u64,
}

fn plan(entries: Vec<Entry>) -> anyhow::Result<Plan> {
    let mut plan = Plan { dirs: Vec::new(), blobs: Vec::new(), files: 0, symlinks: 0, bytes: 0 };
    let mut by_hash: HashMap<ContentHash, usize> = HashMap::new();
    for e in entries {
        let hash = match (e.kind, e.hash) {
            (EntryKind::Dir, _) => {
                plan.dirs.push(e);
                continue;
            }
            (_, Some(hash)) => hash,
            (_, None) => bail!("manifest entry {} has no hash", e.path),
        };
        if e.kind == EntryKind::File {
            plan.files += 1;
            plan.bytes += e.size;
        } else {
            plan.symlinks += 1;
        }
        match by_hash.get(&hash) {
            Some(&i) if plan.blobs[i].size != e.size => {
                bail!("manifest gives blob {hash} two sizes ({} and {})", plan.blobs[i].size, e.size)
            }
            Some(&i) => plan.blobs[i].targets.push(e),
            None => {
                by_hash.insert(hash, plan.blobs.len());
                plan.blobs.push(Blob { hash, size: e.size, targets: vec![e] });
            }
        }
    }
    Ok(plan)
}

/// Explains a 404 on the manifest.
async fn not_found(client: &Client, ws: &str, version: VersionRef) -> anyhow::Error {
    match client.workspace(ws).await {
        Err(e) if e.is_not_found() => PullError::WorkspaceNotFound(ws.to_string()).into(),
        Ok(w) if w.head == 0 => PullError::NoVersion(ws.to_string()).into(),
        _ => PullError::VersionNotFound { workspace: ws.to_string(), version }.into(),
    }
}

/// Downloads every blob: locations are fetched one batch at a time as the downloads need them.
pub(crate) async fn download_all(ctx: &Arc<Ctx>, blobs: Vec<Blob>, concurrency: usize) -> anyhow::Result<()> {
    let mut batches = Vec::new();
    let mut rest = blobs.into_iter().peekable();
    while rest.peek().is_some() {
        batches.push(rest.by_ref().take(MAX_HASH_BATCH).collect::<Vec<_>>());
    }
    futures::stream::iter(batches)
        .then(|batch| {
            let ctx = Arc::clone(ctx);
            async move {
                let hashes: Vec<ContentHash> = batch.iter().map(|b| b.hash).collect();
                ctx.stats.requests.fetch_add(1, Ordering::Relaxed);
                let locs = ctx.client.blob_locations(&ctx.ws, &hashes).await.context("cannot get blob locations")?;
                let stale_at = stale_at(locs.expires_in_secs);
                let mut by_hash: HashMap<ContentHash, BlobLocation> =
                    locs.locations.into_iter().map(|l| (l.hash, l)).collect();
                let jobs = batch
                    .into_iter()
                    .map(|b| match by_hash.remove(&b.hash) {
                        Some(loc) => Ok((b, Located { loc, stale_at })),
                        None => Err(anyhow::anyhow!("the gateway gave no location for blob {}", b.hash)),
                    })
                    .collect::<Vec<_>>();
                anyhow::Ok(futures::stream::iter(jobs))
            }
        })
        .try_flatten()
        .map_ok(|(blob, loc)| {
            let ctx = Arc::clone(ctx);
            async move { download(&ctx, blob, loc).await }
        })
        .try_buffer_unordered(concurrency)
        .try_collect::<()>()
        .await
}

/// A blob location and when to stop trusting it.
struct Located {
    loc: BlobLocation,
    /// After three quarters of the URL's lifetime, it is refreshed before use.
    stale_at: Instant,
}

fn stale_at(expires_in_secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(expires_in_secs.saturating_mul(3) / 4)
}

/// A fresh location for `hash` (after a presigned URL was refused, or before it expires).
async fn refresh(ctx: &Ctx, hash: ContentHash) -> anyhow::Result<Located> {
    let locs = ctx.client.blob_locations(&ctx.ws, &[hash]).await.context("cannot refresh a blob location")?;
    let stale_at = stale_at(locs.expires_in_secs);
    let loc = locs
        .locations
        .into_iter()
        .find(|l| l.hash == hash)
        .with_context(|| format!("the gateway gave no location for blob {hash}"))?;
    Ok(Located { loc, stale_at })
}

/// `located`, refreshed first when it is close to expiring.
async fn fresh(ctx: &Ctx, hash: ContentHash, located: Located) -> anyhow::Result<Located> {
    if Instant::now() >= located.stale_at { refresh(ctx, hash).await } else { Ok(located) }
}

async fn download(ctx: &Arc<Ctx>, blob: Blob, loc: Located) -> anyhow::Result<()> {
    ctx.stats.requests.fetch_add(1, Ordering::Relaxed);
    ctx.stats.files.fetch_add(blob.targets.len() as u64, Ordering::Relaxed);
    ctx.stats.bytes.fetch_add(blob.size, Ordering::Relaxed);
    if blob.size <= SMALL_BLOB { download_small(ctx, blob, loc).await } else { download_large(ctx, blob, loc).await }
}

fn first_path(blob: &Blob) -> &WsPath {
    &blob.targets[0].path
}

/// In memory: fetch (verified), then write every path holding it.
async fn download_small(ctx: &Arc<Ctx>, blob: Blob, mut loc: Located) -> anyhow::Result<()> {
    let mut refreshes = 0;
    let content = loop {
        loc = fresh(ctx, blob.hash, loc).await?;
        match ctx.client.fetch_blob(&loc.loc, blob.size).await {
            Ok(c) => break c,
            Err(ClientError::LocationExpired { .. }) if refreshes < MAX_LOCATION_REFRESHES => {
                refreshes += 1;
                loc = refresh(ctx, blob.hash).await?;
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot download {}", first_path(&blob)));
            }
        }
    };
    if content.len() as u64 != blob.size {
        bail!("{}: the manifest says {} bytes, its blob has {}", first_path(&blob), blob.size, content.len());
    }
    let root = Arc::clone(&ctx.root);
    let size = blob.size;
    let cache = ctx.cache.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        if let Some(cache) = cache {
            cache.insert_bytes(&blob.hash, &content)?;
        }
        for t in &blob.targets {
            match t.kind {
                EntryKind::Symlink => restore::write_symlink(&root, &t.path, &content)?,
                _ => restore::write_file(&root, &t.path, &content, t.mode)?,
            }
        }
        Ok(())
    })
    .await
    .context("write task failed")??;
    ctx.bar.inc(size);
    Ok(())
}

/// Streamed: decode into a temporary file for the first path (retrying with a fresh one),
/// rename it into place, then copy it to the other paths holding the same content.
async fn download_large(ctx: &Arc<Ctx>, blob: Blob, mut loc: Located) -> anyhow::Result<()> {
    let first = blob.targets[0].clone();
    if blob.targets.iter().any(|t| t.kind != EntryKind::File) {
        bail!("{}: a {}-byte symlink cannot be created", first.path, blob.size);
    }
    let policy = *ctx.client.retry_policy();
    let (mut attempt, mut refreshes) = (1, 0);
    let (temp, file) = loop {
        let (temp, file) = {
            let (root, path) = (Arc::clone(&ctx.root), first.path.clone());
            tokio::task::spawn_blocking(move || TempFile::create(&root, &path)).await.context("write task failed")??
        };
        loc = fresh(ctx, blob.hash, loc).await?;
        match ctx.client.fetch_blob_to(&loc.loc, file.into_std()).await {
            Ok((file, n)) if n == blob.size => break (temp, File::from_std(file)),
            Ok((_, n)) => bail!("{}: the manifest says {} bytes, its blob has {n}", first.path, blob.size),
            Err(ClientError::LocationExpired { .. }) if refreshes < MAX_LOCATION_REFRESHES => {
                refreshes += 1;
                loc = refresh(ctx, blob.hash).await?;
            }
            Err(e) if e.is_retryable() && attempt < policy.max_attempts => {
                tracing::debug!(path = %first.path, attempt, error = %e, "retrying download");
                tokio::time::sleep(policy.jittered_backoff(attempt)).await;
                attempt += 1;
            }
            Err(e) => return Err(e).with_context(|| format!("cannot download {}", first.path)),
        }
        // `temp` is dropped here, removing the partial file
    };
    let root = Arc::clone(&ctx.root);
    let cache = ctx.cache.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        if let Some(cache) = cache {
            let mut verified = root.open(temp.path()).context("cannot reopen a download")?.into_std();
            cache.insert_file(&blob.hash, blob.size, &mut verified)?;
        }
        // copy from the temporary file, which is readable whatever the final mode
        for t in &blob.targets[1..] {
            restore::copy_file(&root, temp.path(), &t.path, t.mode)?;
        }
        temp.persist(&file, first.mode)
    })
    .await
    .context("write task failed")??;
    ctx.bar.inc(blob.size);
    Ok(())
}

/// `podfs pull WORKSPACE[@VERSION] DIR`.
#[derive(Debug, clap::Args)]
pub struct PullArgs {
    /// WORKSPACE or WORKSPACE@VERSION (a number or `head`).
    pub target: crate::target::Target,
    /// Where to write the tree: a new or empty directory, or one holding an earlier pull of
    /// the same workspace (switched in place: only differing paths are touched).
    pub dir: PathBuf,
    /// Downloads in flight at once.
    #[arg(long, default_value_t = DOWNLOAD_CONCURRENCY)]
    pub concurrency: usize,
    /// Phase 1: one download per distinct content, no manifest.sqlite, no cache (for comparison).
    #[arg(long)]
    pub per_file: bool,
    /// The local content cache shared by all workspaces [default: $XDG_CACHE_HOME/podfs].
    #[arg(long, env = "PODFS_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Most bytes the cache keeps (least recently used content goes first).
    #[arg(long, env = "PODFS_CACHE_SIZE", default_value_t = crate::cache::DEFAULT_LIMIT)]
    pub cache_size: u64,
    /// Switch versions in place even over local edits to the paths that differ (the edits are lost).
    #[arg(long)]
    pub force: bool,
}

/// Human output: `pulled demo@3 into DIR: 120 files, 3 symlinks, 14 dirs, 4.5 MiB (110 blobs downloaded)`.
pub async fn run(client: &Client, args: PullArgs, out: &mut crate::cli::Output<'_>) -> anyhow::Result<()> {
    use crate::output::{human_bytes, plural};
    if !args.per_file {
        let opts = crate::hydrate::HydrateOptions {
            cache_dir: match args.cache_dir {
                Some(d) => d,
                None => crate::cache::default_dir()?,
            },
            cache_limit: args.cache_size,
            concurrency: args.concurrency,
            progress: out.progress,
            force: args.force,
            keep_local: false,
        };
        let r = crate::hydrate::hydrate(client, &args.target.workspace, args.target.version, &args.dir, opts).await?;
        return out.json_or(&r, |w| {
            let s = &r.sources;
            let verb = match r.mode {
                "unchanged" => "already at",
                "switch" => "switched to",
                _ => "pulled",
            };
            writeln!(
                w,
                "{verb} {}@{} in {}: {}, {}, {}, {} in {:.2}s (manifest {}, cache {}, blob store {}{})",
                r.workspace,
                r.version,
                r.dir.display(),
                plural(r.files, "file", "files"),
                plural(r.symlinks, "symlink", "symlinks"),
                plural(r.dirs, "dir", "dirs"),
                human_bytes(r.bytes),
                r.elapsed_secs,
                human_bytes(s.manifest.transfer_bytes),
                plural(s.cache.files, "file", "files"),
                plural(s.s3.files, "file", "files"),
                if r.removed > 0 { format!("; {} removed", r.removed) } else { String::new() },
            )
        });
    }
    let opts = PullOptions { concurrency: args.concurrency, progress: out.progress };
    let r = pull(client, &args.target.workspace, args.target.version, &args.dir, opts).await?;
    out.json_or(&r, |w| {
        writeln!(
            w,
            "pulled {}@{} into {}: {}, {}, {}, {} ({} downloaded)",
            r.workspace,
            r.version,
            r.dir.display(),
            plural(r.files, "file", "files"),
            plural(r.symlinks, "symlink", "symlinks"),
            plural(r.dirs, "dir", "dirs"),
            human_bytes(r.bytes),
            plural(r.downloaded_blobs, "blob", "blobs"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(p: &str, kind: EntryKind, content: &[u8]) -> Entry {
        let hash = (kind != EntryKind::Dir).then(|| ContentHash::of(content));
        let size = if kind == EntryKind::Dir { 0 } else { content.len() as u64 };
        Entry { path: WsPath::new(p).unwrap(), kind, hash, size, mode: 0o644 }
    }

    #[test]
    fn identical_content_is_downloaded_once() {
        let p = plan(vec![
            e("a", EntryKind::File, b"same"),
            e("b", EntryKind::Symlink, b"same"),
            e("c", EntryKind::File, b"other"),
            e("d", EntryKind::Dir, b""),
            e("d/e", EntryKind::File, b"same"),
        ])
        .unwrap();
        assert_eq!((p.files, p.symlinks, p.dirs.len(), p.bytes), (3, 1, 1, 13));
        assert_eq!(p.blobs.len(), 2);
        let paths: Vec<_> = p.blobs[0].targets.iter().map(|t| t.path.as_str()).collect();
        assert_eq!(paths, ["a", "b", "d/e"]);
    }

    #[test]
    fn one_hash_with_two_sizes_is_refused() {
        let mut lying = e("b", EntryKind::File, b"same");
        lying.size = 99;
        assert!(plan(vec![e("a", EntryKind::File, b"same"), lying]).is_err());
    }
}
