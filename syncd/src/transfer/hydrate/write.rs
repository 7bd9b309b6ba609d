//! Writing a planned tree: paths from the manifest's BLOBs and from the content cache by a few
//! worker threads (each with its own read-only SQLite connection), contents from the blob store
//! by the downloader ([`crate::transfer::fetch`]), at the same time. Every content is verified
//! before it is written; contents the cache listed but could not give are downloaded after all.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use cap_std::fs::{Dir, OpenOptions, OpenOptionsExt, Permissions, PermissionsExt};
use podfs_cache::ContentCache;
use podfs_client::Client;
use podfs_manifest::Reader;
use podfs_protocol::{ContentHash, Entry, EntryKind};

use super::{HydrateOptions, Peered, Sources};
use crate::local::write::{self, TempFile};
use crate::transfer::fetch::{self, Fetcher, RemoteStats};
use crate::transfer::plan::{Blob, ByContent, LocalSource, LocalWrite};
use crate::transfer::progress;

/// Contents up to this size are read from the cache into memory; larger ones are streamed.
const CACHE_IN_MEMORY: u64 = 1 << 20;

/// What [`write_contents`] writes.
pub(super) struct Contents {
    /// Paths written from the manifest or the cache.
    pub local: Vec<LocalWrite>,
    /// Contents downloaded from the blob store.
    pub remote: Vec<Blob>,
    /// The verified manifest file the `local` BLOB ids refer to.
    pub manifest: Option<PathBuf>,
    /// Write through temporary names (DIR is live); else create the final names directly (a
    /// private staging directory).
    pub atomic: bool,
    /// Content bytes, for the progress bar.
    pub total_bytes: u64,
    /// A cold start's peers: its units come from them before the blob store.
    pub peers: Option<Peered>,
}

/// Writes every path: local ones (manifest BLOBs, cache) by a few threads, remote ones by
/// the downloader, at the same time.
pub(super) async fn write_contents(
    client: &Client,
    ws: &str,
    root: &Arc<Dir>,
    contents: Contents,
    cache: &ContentCache,
    opts: &HydrateOptions,
    sources: &mut Sources,
) -> anyhow::Result<()> {
    let Contents { local, remote, manifest, atomic, total_bytes, peers } = contents;
    let bar = progress::bytes_bar(opts.progress, total_bytes, "pulling");
    let ctx = Arc::new(Fetcher {
        client: client.clone(),
        ws: ws.to_string(),
        root: Arc::clone(root),
        bar: bar.clone(),
        cache: Some(cache.clone()),
        stats: RemoteStats::default(),
        peers,
    });
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 8) * 2;
    let local_job = {
        let (root, cache, bar) = (Arc::clone(root), cache.clone(), bar.clone());
        tokio::task::spawn_blocking(move || {
            write_local(&root, local, manifest.as_deref(), &cache, workers, atomic, &bar)
        })
    };
    let t = Instant::now();
    let concurrency = opts.concurrency.max(1);
    let wire_before = ctx.client.blob_bytes_received();
    let remote_result = fetch::download_all(&ctx, remote, concurrency).await;
    let remote_secs = t.elapsed().as_secs_f64();
    let local = local_job.await.context("write task failed")??;
    remote_result.context("cannot download a file from the blob store")?;
    // contents the cache claimed but could not give (evicted or damaged meanwhile)
    let mut again = ByContent::default();
    for e in local.fallback {
        again.add(e)?;
    }
    if !again.is_empty() {
        let again = again.into_blobs();
        tracing::warn!(contents = again.len(), "cache misses after planning; downloading them");
        fetch::download_all(&ctx, again, concurrency).await.context("cannot download a file from the blob store")?;
    }
    bar.finish_and_clear();
    sources.manifest.files += local.manifest_files;
    sources.manifest.bytes += local.manifest_bytes;
    sources.manifest.secs += local.manifest_secs;
    sources.cache.files += local.cache_files;
    sources.cache.bytes += local.cache_bytes;
    sources.cache.secs += local.cache_secs;
    sources.s3.files += ctx.stats.files.load(Ordering::Relaxed);
    sources.s3.bytes += ctx.stats.bytes.load(Ordering::Relaxed);
    sources.s3.transfer_bytes += ctx.client.blob_bytes_received() - wire_before;
    sources.s3.requests += ctx.stats.requests.load(Ordering::Relaxed);
    sources.s3.secs += remote_secs;
    let p = &ctx.stats.peers;
    sources.peers.files += p.files.load(Ordering::Relaxed);
    sources.peers.bytes += p.bytes.load(Ordering::Relaxed);
    sources.peers.transfer_bytes += p.bytes.load(Ordering::Relaxed);
    sources.peers.requests += p.requests.load(Ordering::Relaxed);
    Ok(())
}

#[derive(Default)]
struct LocalDone {
    manifest_files: u64,
    manifest_bytes: u64,
    manifest_secs: f64,
    cache_files: u64,
    cache_bytes: u64,
    cache_secs: f64,
    /// Paths the cache could not serve after all.
    fallback: Vec<Entry>,
}

/// Worker threads take paths in chunks off a shared counter; each has its own manifest
/// connection. Every content is verified before it is written.
fn write_local(
    root: &Arc<Dir>,
    local: Vec<LocalWrite>,
    manifest: Option<&Path>,
    cache: &ContentCache,
    workers: usize,
    atomic: bool,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<LocalDone> {
    const CHUNK: usize = 32;
    let next = AtomicUsize::new(0);
    let nanos = [AtomicU64::new(0), AtomicU64::new(0)];
    let results: Vec<anyhow::Result<LocalDone>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers.min(local.len().div_ceil(CHUNK)).max(1))
            .map(|_| {
                s.spawn(|| -> anyhow::Result<LocalDone> {
                    let reader = manifest.map(Reader::open).transpose().context("cannot open the manifest")?;
                    let mut done = LocalDone::default();
                    loop {
                        let start = next.fetch_add(CHUNK, Ordering::Relaxed);
                        if start >= local.len() {
                            return Ok(done);
                        }
                        for item in &local[start..(start + CHUNK).min(local.len())] {
                            let t = Instant::now();
                            let e = &item.entry;
                            let Some(hash) = e.hash else { continue };
                            match item.from {
                                LocalSource::Manifest(id) => {
                                    let Some(r) = &reader else { bail!("no manifest for {}", e.path) };
                                    let data =
                                        r.blob(id, &hash, e.size).with_context(|| format!("refusing {}", e.path))?;
                                    write_new(root, e, &data, atomic)?;
                                    done.manifest_files += 1;
                                    done.manifest_bytes += e.size;
                                    nanos[0].fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                                }
                                LocalSource::Cache => {
                                    if from_cache(root, e, &hash, cache, atomic)? {
                                        done.cache_files += 1;
                                        done.cache_bytes += e.size;
                                    } else {
                                        done.fallback.push(e.clone());
                                    }
                                    nanos[1].fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                                }
                            }
                            bar.inc(e.size);
                        }
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a writer panicked")))).collect()
    });
    let mut all = LocalDone::default();
    for r in results {
        let d = r?;
        all.manifest_files += d.manifest_files;
        all.manifest_bytes += d.manifest_bytes;
        all.cache_files += d.cache_files;
        all.cache_bytes += d.cache_bytes;
        all.fallback.extend(d.fallback);
    }
    // summed over threads, divided by threads: the wall time each source kept the writers busy
    let w = workers as f64;
    all.manifest_secs = nanos[0].load(Ordering::Relaxed) as f64 / 1e9 / w;
    all.cache_secs = nanos[1].load(Ordering::Relaxed) as f64 / 1e9 / w;
    Ok(all)
}

/// Writes `e` holding `data`: through a temporary name when `atomic`, else (a private
/// staging directory) as a new file at its final name.
fn write_new(root: &Arc<Dir>, e: &Entry, data: &[u8], atomic: bool) -> anyhow::Result<()> {
    if e.kind == EntryKind::Symlink {
        return write::write_symlink(root, &e.path, data);
    }
    if atomic {
        return write::write_file(root, &e.path, data, e.mode);
    }
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true).mode(0o600);
    let mut f = root.open_with(e.path.as_str(), &opts).with_context(|| format!("cannot create {}", e.path))?;
    f.write_all(data).with_context(|| format!("cannot write {}", e.path))?;
    f.set_permissions(Permissions::from_mode(e.mode)).with_context(|| format!("cannot set the mode of {}", e.path))?;
    Ok(())
}

/// Writes `e` from the cache (large contents always through a temporary name). False when
/// the cache could not give verified content.
fn from_cache(
    root: &Arc<Dir>,
    e: &Entry,
    hash: &ContentHash,
    cache: &ContentCache,
    atomic: bool,
) -> anyhow::Result<bool> {
    if e.size <= CACHE_IN_MEMORY || e.kind == EntryKind::Symlink {
        return match cache.read(hash, e.size)? {
            Some(data) => write_new(root, e, &data, atomic).map(|()| true),
            None => Ok(false),
        };
    }
    let (temp, file) = TempFile::create(root, &e.path)?;
    let mut out = file.into_std();
    if !cache.copy_to(hash, e.size, &mut out)? {
        return Ok(false);
    }
    temp.persist(&cap_std::fs::File::from_std(out), e.mode)?;
    Ok(true)
}
