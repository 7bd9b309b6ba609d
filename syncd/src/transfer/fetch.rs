//! Downloads from the blob store: locations are fetched in batches of up to 10,000 as the
//! downloads need them, each distinct content is downloaded once, 64 at a time, verified
//! against its BLAKE3 hash, and written atomically to every path that holds it (and into the
//! content cache when there is one).
//!
//! Memory: blobs up to [`SMALL_BLOB`] are fetched into memory (bounded by the expected size, so
//! at most `concurrency` x about 2 x SMALL_BLOB bytes); larger ones are streamed through the
//! decoder into a temporary file. Retries: the client retries in-memory fetches; streamed
//! fetches are retried here with a fresh temporary file; refused presigned URLs (expired) get
//! fresh locations.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cap_std::fs::{Dir, File};
use futures::{StreamExt, TryStreamExt};
use indicatif::ProgressBar;
use podfs_cache::ContentCache;
use podfs_client::{Client, Error as ClientError};
use podfs_protocol::api::{BlobLocation, MAX_HASH_BATCH};
use podfs_protocol::{ContentHash, EntryKind, WsPath};

use super::hydrate::Peered;
use super::plan::Blob;
use crate::local::write::{self, TempFile};

/// Downloads in flight at once.
pub const DOWNLOAD_CONCURRENCY: usize = 64;
/// Blobs up to this content size are downloaded into memory; larger ones are streamed to disk.
pub const SMALL_BLOB: u64 = 1 << 20;
/// Times a refused presigned URL is replaced by a fresh location before giving up.
const MAX_LOCATION_REFRESHES: u32 = 3;

/// What downloads from the blob store did (for the per-source summary).
#[derive(Debug, Default)]
pub struct RemoteStats {
    /// Paths written from downloaded content.
    pub files: AtomicU64,
    /// Content bytes downloaded.
    pub bytes: AtomicU64,
    /// HTTP requests: blob GETs and location batches.
    pub requests: AtomicU64,
    /// What came from peers instead (files, content bytes, units).
    pub peers: PeerStats,
}

#[derive(Debug, Default)]
pub struct PeerStats {
    pub files: AtomicU64,
    pub bytes: AtomicU64,
    pub requests: AtomicU64,
}

/// Everything a download needs: where from, where to, and where to report.
pub struct Fetcher {
    pub client: Client,
    pub ws: String,
    /// DIR (or a staging directory in it): every write goes through this handle.
    pub root: Arc<Dir>,
    pub bar: ProgressBar,
    /// Downloaded content is also added here.
    pub cache: Option<ContentCache>,
    pub stats: RemoteStats,
    /// A cold start's peers: units of its plan come from them first.
    pub peers: Option<Peered>,
}

/// Downloads every blob: locations are fetched one batch at a time as the downloads need them.
pub async fn download_all(ctx: &Arc<Fetcher>, blobs: Vec<Blob>, concurrency: usize) -> anyhow::Result<()> {
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
async fn refresh(ctx: &Fetcher, hash: ContentHash) -> anyhow::Result<Located> {
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
async fn fresh(ctx: &Fetcher, hash: ContentHash, located: Located) -> anyhow::Result<Located> {
    if Instant::now() >= located.stale_at { refresh(ctx, hash).await } else { Ok(located) }
}

async fn download(ctx: &Arc<Fetcher>, blob: Blob, loc: Located) -> anyhow::Result<()> {
    if ctx.peers.as_ref().is_some_and(|(_, plan)| plan.units.contains_key(&blob.hash)) {
        return download_unit(ctx, blob, loc).await;
    }
    ctx.stats.requests.fetch_add(1, Ordering::Relaxed);
    ctx.stats.files.fetch_add(blob.targets.len() as u64, Ordering::Relaxed);
    ctx.stats.bytes.fetch_add(blob.size, Ordering::Relaxed);
    if blob.size <= SMALL_BLOB { download_small(ctx, blob, loc).await } else { download_large(ctx, blob, loc).await }
}

fn first_path(blob: &Blob) -> &WsPath {
    &blob.targets[0].path
}

/// In memory: fetch (verified), then write every path holding it.
async fn download_small(ctx: &Arc<Fetcher>, blob: Blob, mut loc: Located) -> anyhow::Result<()> {
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
                EntryKind::Symlink => write::write_symlink(&root, &t.path, &content)?,
                _ => write::write_file(&root, &t.path, &content, t.mode)?,
            }
        }
        Ok(())
    })
    .await
    .context("write task failed")??;
    ctx.bar.inc(size);
    Ok(())
}

/// A unit of a cold start's plan: from peers into a temporary file for the first path, else
/// from the blob store as any large file. Once its verified copy is in the cache, this daemon
/// serves it to the zone.
async fn download_unit(ctx: &Arc<Fetcher>, blob: Blob, loc: Located) -> anyhow::Result<()> {
    let Some((node, plan)) = ctx.peers.as_ref() else { return download_large(ctx, blob, loc).await };
    let first = blob.targets[0].clone();
    if blob.targets.iter().any(|t| t.kind != EntryKind::File) {
        bail!("{}: a {}-byte symlink cannot be created", first.path, blob.size);
    }
    let (temp, file) = {
        let (root, path) = (Arc::clone(&ctx.root), first.path.clone());
        tokio::task::spawn_blocking(move || TempFile::create(&root, &path)).await.context("write task failed")??
    };
    let mut out = tokio::fs::File::from_std(file.into_std());
    if node.fetch_unit(plan, blob.hash, &mut out).await {
        let p = &ctx.stats.peers;
        p.files.fetch_add(blob.targets.len() as u64, Ordering::Relaxed);
        p.bytes.fetch_add(blob.size, Ordering::Relaxed);
        p.requests.fetch_add(1, Ordering::Relaxed);
        let file = File::from_std(out.into_std().await);
        return place_large(ctx, blob, temp, file).await;
    }
    drop((temp, out));
    ctx.stats.requests.fetch_add(1, Ordering::Relaxed);
    ctx.stats.files.fetch_add(blob.targets.len() as u64, Ordering::Relaxed);
    ctx.stats.bytes.fetch_add(blob.size, Ordering::Relaxed);
    download_large(ctx, blob, loc).await
}

/// Streamed: decode into a temporary file for the first path (retrying with a fresh one),
/// rename it into place, then copy it to the other paths holding the same content.
async fn download_large(ctx: &Arc<Fetcher>, blob: Blob, mut loc: Located) -> anyhow::Result<()> {
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
    place_large(ctx, blob, temp, file).await
}

/// A verified download in `temp`: into the cache (and served to peers when it is a unit of a
/// cold start), copied to the other paths holding it, and renamed into place.
async fn place_large(ctx: &Arc<Fetcher>, blob: Blob, temp: TempFile, file: File) -> anyhow::Result<()> {
    let root = Arc::clone(&ctx.root);
    let cache = ctx.cache.clone();
    let peers = ctx.peers.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        if let Some(cache) = cache {
            let mut verified = root.open(temp.path()).context("cannot reopen a download")?.into_std();
            cache.insert_file(&blob.hash, blob.size, &mut verified)?;
            if let Some((node, plan)) = peers.filter(|(_, p)| p.units.contains_key(&blob.hash)) {
                // the cache's copy, never DIR's (which its user may edit)
                match std::fs::File::open(cache.loose_path(&blob.hash)) {
                    Ok(f) => node.shelf.ready(&plan.ws, plan.version, &blob.hash, f),
                    Err(_) => node.shelf.gone(&plan.ws, plan.version, &blob.hash),
                }
            }
        }
        // copy from the temporary file, which is readable whatever the final mode
        for t in &blob.targets[1..] {
            write::copy_file(&root, temp.path(), &t.path, t.mode)?;
        }
        temp.persist(&file, blob.targets[0].mode)
    })
    .await
    .context("write task failed")??;
    ctx.bar.inc(blob.size);
    Ok(())
}
