//! Phase 2 pull: a version onto local disk from its manifest.sqlite, the local content cache
//! and the blob store, and in-place switching between versions.
//!
//! **Fresh** (DIR absent or empty): plan from the tree, then write.
//! - Tree and small-file bytes come from one download of the version's manifest.sqlite,
//!   checked against the hash the gateway states before SQLite opens it. When the cache
//!   already holds most small contents (another workspace with the same dependencies), the
//!   JSON tree is read instead and the manifest is not downloaded at all.
//! - Each file's bytes come from the manifest (small files), else the cache, else the blob
//!   store (large or missing files, 64 downloads in flight, verified, added to the cache).
//! - Everything is written into a private staging directory `DIR/.podfs/stage-*` by a few
//!   worker threads (each with its own read-only SQLite connection); directories get their
//!   modes last; then the staged top-level entries are renamed into DIR. A crash leaves only
//!   the staging directory, which the next pull removes: DIR never shows a partial file.
//! - The verified manifest is kept in the cache as a *pack*, so its small files serve later
//!   pulls; the cache is then trimmed to its limit (LRU).
//!
//! **Switch** (DIR holds an earlier pull: `DIR/.podfs/state.json`): one delta manifest
//! (`?since=`) names the paths that differ, what they held and what they must hold. Only
//! those paths are read and written: each must still hold its old content (or already hold
//! the new one, so an interrupted switch resumes); local edits are refused unless `force`.
//!
//! Memory: the entry list (about 200 bytes per path) plus bounded buffers: one small file per
//! worker, streamed large files, 64 downloads of at most 1 MiB each.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use cap_std::ambient_authority;
use cap_std::fs::{Dir, OpenOptions, OpenOptionsExt, Permissions, PermissionsExt};
use podfs_client::Client;
use podfs_manifest::{Kind, Reader};
use podfs_protocol::{ContentHash, Entry, EntryKind, VersionRef, WsPath};
use serde::{Deserialize, Serialize};

use crate::cache::ContentCache;
use crate::manifest;
use crate::progress;
use crate::pull::{self, Blob, Ctx, RemoteStats};
use crate::restore;
use crate::scan::STATE_DIR;

/// The pull's record in DIR: which workspace and version the tree on disk is.
pub const STATE_FILE: &str = "state.json";
/// Small files this podfs expects inside a manifest (the gateway's default limit).
const SMALL: u64 = podfs_manifest::DEFAULT_SMALL_FILE_LIMIT;
/// Contents up to this size are read from the cache into memory; larger ones are streamed.
const CACHE_IN_MEMORY: u64 = 1 << 20;

#[derive(Debug, Clone)]
pub struct HydrateOptions {
    pub cache_dir: PathBuf,
    pub cache_limit: u64,
    /// Downloads in flight at once.
    pub concurrency: usize,
    pub progress: bool,
    /// Switch versions even over local edits (they are lost).
    pub force: bool,
    /// Switch versions around local edits: a path edited locally keeps the local state (it is
    /// listed in [`HydrateReport::kept_local`]); `force` is ignored. What syncd does when
    /// another writer moved head.
    pub keep_local: bool,
}

/// Time and bytes spent per source.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Source {
    /// Paths written from this source.
    pub files: u64,
    /// Content bytes written from this source.
    pub bytes: u64,
    /// Bytes moved over the network for it.
    pub transfer_bytes: u64,
    pub requests: u64,
    pub secs: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Sources {
    pub manifest: Source,
    pub cache: Source,
    pub s3: Source,
}

/// What a Phase 2 pull did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HydrateReport {
    pub workspace: String,
    pub version: u64,
    pub dir: PathBuf,
    /// `fresh`, `switch` or `unchanged`.
    pub mode: &'static str,
    /// The version DIR held before a switch.
    pub from_version: Option<u64>,
    pub files: u64,
    pub symlinks: u64,
    pub dirs: u64,
    /// Content bytes of the files written.
    pub bytes: u64,
    /// Paths removed (switch).
    pub removed: u64,
    /// Paths left as they were because they hold local edits (switch with `keep_local`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kept_local: Vec<String>,
    pub elapsed_secs: f64,
    pub sources: Sources,
}

impl HydrateReport {
    fn new(ws: &str, version: u64, dir: &Path, mode: &'static str, from_version: Option<u64>) -> Self {
        Self {
            workspace: ws.to_string(),
            version,
            dir: dir.to_path_buf(),
            mode,
            from_version,
            files: 0,
            symlinks: 0,
            dirs: 0,
            bytes: 0,
            removed: 0,
            kept_local: Vec::new(),
            elapsed_secs: 0.0,
            sources: Sources::default(),
        }
    }

    /// Counts the files, symlinks and bytes a plan writes.
    fn count(&mut self, local: &[Local], remote: &[Blob]) {
        for e in local.iter().map(|l| &l.entry).chain(remote.iter().flat_map(|b| b.targets.iter())) {
            match e.kind {
                EntryKind::Symlink => self.symlinks += 1,
                _ => {
                    self.files += 1;
                    self.bytes += e.size;
                }
            }
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct State {
    pub(crate) workspace: String,
    pub(crate) version: u64,
}

/// Records in `DIR/.podfs/state.json` that DIR holds `ws@version` (atomically).
pub fn write_state(dir: &Path, ws: &str, version: u64) -> anyhow::Result<()> {
    let body = serde_json::to_vec(&State { workspace: ws.to_string(), version })?;
    replace_state_file(dir, STATE_FILE, &body).context("cannot record the pulled version")
}

/// Writes `DIR/.podfs/NAME` whole: a temporary file renamed over it, so readers see the old
/// or the new content, never a part.
pub(crate) fn replace_state_file(dir: &Path, name: &str, body: &[u8]) -> anyhow::Result<()> {
    let state_dir = dir.join(STATE_DIR);
    std::fs::create_dir_all(&state_dir).with_context(|| format!("cannot create {}", state_dir.display()))?;
    let tmp = state_dir.join(format!("{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, body).with_context(|| format!("cannot write {}", tmp.display()))?;
    let path = state_dir.join(name);
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot replace {}", path.display()))
}

pub(crate) fn read_state(dir: &Path) -> anyhow::Result<Option<State>> {
    let path = dir.join(STATE_DIR).join(STATE_FILE);
    match std::fs::read(&path) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| format!("{} is damaged", path.display()))?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Pulls `ws@version` into `dir`: fresh when DIR is absent or empty, in place when DIR holds
/// an earlier pull of the same workspace.
pub async fn hydrate(
    client: &Client,
    ws: &str,
    version: VersionRef,
    dir: &Path,
    opts: HydrateOptions,
) -> anyhow::Result<HydrateReport> {
    let started = Instant::now();
    let cache = {
        let (d, limit) = (opts.cache_dir.clone(), opts.cache_limit);
        blocking(move || ContentCache::open(&d, limit)).await?
    };
    let mut report = match read_state(dir)? {
        Some(s) if s.workspace == ws => switch(client, ws, version, dir, &cache, &opts, s.version).await?,
        Some(s) => bail!("{} holds workspace {}, not {ws}; pull into another directory", dir.display(), s.workspace),
        None => fresh(client, ws, version, dir, &cache, &opts).await?,
    };
    report.elapsed_secs = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Where one path's bytes come from.
#[derive(Clone, Copy)]
enum From {
    Manifest(i64),
    Cache,
}

/// A path to write locally (no network).
struct Local {
    entry: Entry,
    from: From,
}

/// A plan: directories, local writes, downloads.
struct Plan {
    dirs: Vec<Entry>,
    local: Vec<Local>,
    remote: Vec<Blob>,
}

fn plan(rows: Vec<(Entry, Option<i64>)>, cached: &HashSet<ContentHash>) -> Plan {
    let mut p = Plan { dirs: Vec::new(), local: Vec::new(), remote: Vec::new() };
    let mut remote: HashMap<ContentHash, usize> = HashMap::new();
    for (entry, blob_id) in rows {
        let Some(hash) = entry.hash else {
            p.dirs.push(entry);
            continue;
        };
        match blob_id {
            Some(id) => p.local.push(Local { entry, from: From::Manifest(id) }),
            None if cached.contains(&hash) => p.local.push(Local { entry, from: From::Cache }),
            None => match remote.get(&hash) {
                Some(&i) => p.remote[i].targets.push(entry),
                None => {
                    remote.insert(hash, p.remote.len());
                    p.remote.push(Blob { hash, size: entry.size, targets: vec![entry] });
                }
            },
        }
    }
    p
}

/// The tree (validated) with the manifest BLOB of each path, the manifest file when one was
/// downloaded (`None`: the JSON tree was enough, the cache holds the small files), and which
/// of the tree's contents the cache holds.
async fn tree(
    client: &Client,
    ws: &str,
    version: VersionRef,
    cache: &ContentCache,
    sources: &mut Sources,
) -> anyhow::Result<(u64, Vec<(Entry, Option<i64>)>, Option<Downloaded>, HashSet<ContentHash>)> {
    let t = Instant::now();
    let cache_has = {
        let c = cache.clone();
        blocking(move || Ok(c.usage()?.units > 0)).await?
    };
    let found = if cache_has {
        let m =
            client.manifest(ws, version).await.with_context(|| format!("cannot read the tree of {ws}@{version}"))?;
        sources.manifest.requests += 1;
        let v = m.version;
        let entries =
            manifest::validate_entries(m.entries).with_context(|| format!("refusing the tree of {ws}@{v}"))?;
        let hashes: Vec<ContentHash> = entries.iter().filter_map(|e| e.hash).collect();
        let c = cache.clone();
        let cached = blocking(move || c.contains(&hashes)).await?;
        let (mut missing, mut all) = (0u64, 0u64);
        for e in entries.iter().filter(|e| e.size <= SMALL) {
            let Some(h) = e.hash else { continue };
            all += e.size;
            if !cached.contains(&h) {
                missing += e.size;
            }
        }
        if missing * 4 <= all {
            (v, entries.into_iter().map(|e| (e, None)).collect(), None, cached)
        } else {
            // too much is missing: one manifest download beats many small ones
            let d = download(client, ws, VersionRef::Number(v), None, cache, sources).await?;
            (v, d.rows()?, Some(d), cached)
        }
    } else {
        // an empty cache holds nothing: no need to ask it
        let d = download(client, ws, version, None, cache, sources).await?;
        (d.version, d.rows()?, Some(d), HashSet::new())
    };
    sources.manifest.secs += t.elapsed().as_secs_f64();
    Ok(found)
}

/// A verified manifest file in the cache's scratch directory.
struct Downloaded {
    path: tempfile::TempPath,
    hash: ContentHash,
    version: u64,
    ws: String,
}

impl Downloaded {
    /// Every entry (validated as a tree) with its BLOB id.
    fn rows(&self) -> anyhow::Result<Vec<(Entry, Option<i64>)>> {
        let r = Reader::open(&self.path).context("cannot open the downloaded manifest")?;
        let h = r.header()?;
        if h.workspace != self.ws || h.version != self.version || h.kind != Kind::Full {
            bail!(
                "the manifest is for {}@{} ({:?}), asked for {}@{}",
                h.workspace,
                h.version,
                h.kind,
                self.ws,
                self.version
            );
        }
        let mut rows = Vec::new();
        r.for_each_entry(|row| {
            rows.push((row.entry, row.blob_id));
            Ok(())
        })?;
        let ids: Vec<Option<i64>> = rows.iter().map(|(_, id)| *id).collect();
        let entries = manifest::validate_entries(rows.into_iter().map(|(e, _)| e))
            .with_context(|| format!("refusing the manifest of {}@{}", self.ws, self.version))?;
        Ok(entries.into_iter().zip(ids).collect())
    }
}

async fn download(
    client: &Client,
    ws: &str,
    version: VersionRef,
    since: Option<u64>,
    cache: &ContentCache,
    sources: &mut Sources,
) -> anyhow::Result<Downloaded> {
    let tmp = cache.dir().join("tmp");
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let file = tempfile::Builder::new()
        .prefix("manifest-")
        .suffix(".sqlite")
        .tempfile_in(&tmp)
        .with_context(|| format!("cannot create a file in {}", tmp.display()))?;
    let (file, path) = file.into_parts();
    let (_, d) = client
        .download_manifest(ws, version, since, file)
        .await
        .with_context(|| format!("cannot download the manifest of {ws}@{version}"))?;
    sources.manifest.requests += 1;
    sources.manifest.transfer_bytes += d.transfer_bytes;
    Ok(Downloaded { path, hash: d.hash, version: d.version, ws: ws.to_string() })
}

async fn fresh(
    client: &Client,
    ws: &str,
    version: VersionRef,
    dir: &Path,
    cache: &ContentCache,
    opts: &HydrateOptions,
) -> anyhow::Result<HydrateReport> {
    let mut sources = Sources::default();
    let (root, stage_name) = {
        let dir = dir.to_path_buf();
        blocking(move || open_fresh_root(&dir)).await?
    };
    let result = async {
        let (v, rows, manifest, cached) = tree(client, ws, version, cache, &mut sources).await?;
        let plan = plan(rows, &cached);
        let mut report = HydrateReport::new(ws, v, dir, "fresh", None);
        report.dirs = plan.dirs.len() as u64;
        report.count(&plan.local, &plan.remote);
        let stage = Arc::new(root.open_dir(&stage_name).context("cannot open the staging directory")?);
        {
            let (stage, dirs) = (Arc::clone(&stage), plan.dirs.clone());
            blocking(move || {
                for d in &dirs {
                    restore::create_dir(&stage, &d.path)?;
                }
                Ok(())
            })
            .await?;
        }
        let all_hashes: Vec<ContentHash> =
            plan.local.iter().filter_map(|l| l.entry.hash).chain(plan.remote.iter().map(|b| b.hash)).collect();
        let total = report.bytes;
        let local = (plan.local, manifest.as_ref(), false);
        write_contents(client, ws, &stage, local, plan.remote, cache, opts, total, &mut sources).await?;
        // directories get their modes last, deepest first; then the staged tree moves into DIR
        {
            let (stage, dirs, root) = (Arc::clone(&stage), plan.dirs, Arc::clone(&root));
            let stage_name = stage_name.clone();
            blocking(move || {
                for d in dirs.iter().rev() {
                    restore::set_mode(&stage, &d.path, d.mode)?;
                }
                for name in stage.entries()? {
                    let name = name?.file_name();
                    stage.rename(&name, &root, &name).with_context(|| format!("cannot move {name:?} into place"))?;
                }
                drop(stage);
                root.remove_dir(&stage_name).context("cannot remove the staging directory")?;
                Ok(())
            })
            .await?;
        }
        write_state(dir, ws, v)?;
        keep_in_cache(cache, manifest, all_hashes).await?;
        report.sources = sources;
        anyhow::Ok(report)
    }
    .await;
    if result.is_err() {
        let _ = root.remove_dir_all(&stage_name);
    }
    result
}

/// Adds the manifest to the cache as a pack, marks what was used, trims the cache.
async fn keep_in_cache(
    cache: &ContentCache,
    manifest: Option<Downloaded>,
    used: Vec<ContentHash>,
) -> anyhow::Result<()> {
    let c = cache.clone();
    blocking(move || {
        if let Some(m) = manifest {
            let path = m.path.keep().context("cannot keep the manifest")?;
            c.add_pack(&path, &m.hash)?;
        }
        c.touch(&used)?;
        let evicted = c.evict()?;
        tracing::debug!(?evicted, "cache trimmed");
        Ok(())
    })
    .await
}

/// Whether DIR holds nothing but (maybe) the state directory.
pub(crate) fn holds_only_state(dir: &Path) -> std::io::Result<bool> {
    for e in std::fs::read_dir(dir)? {
        if e?.file_name() != STATE_DIR {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Opens DIR (created when missing; empty apart from an old `.podfs`) and makes a fresh
/// staging directory in `DIR/.podfs`. Returns DIR's handle and the staging path below it.
fn open_fresh_root(dir: &Path) -> anyhow::Result<(Arc<Dir>, PathBuf)> {
    match holds_only_state(dir) {
        Ok(true) => {}
        Ok(false) => bail!("{} is not empty; pull into a new or empty directory", dir.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            bail!("{} exists and is not a directory; pull into a new or empty directory", dir.display())
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
    }
    let root =
        Dir::open_ambient_dir(dir, ambient_authority()).with_context(|| format!("cannot open {}", dir.display()))?;
    root.create_dir_all(STATE_DIR).context("cannot create the state directory")?;
    // stages of interrupted pulls
    if let Ok(entries) = root.read_dir(STATE_DIR) {
        for e in entries.flatten() {
            let name = e.file_name();
            if name.to_string_lossy().starts_with("stage-") {
                let _ = root.remove_dir_all(Path::new(STATE_DIR).join(&name));
            }
        }
    }
    let stage = Path::new(STATE_DIR).join(format!("stage-{}-{}", std::process::id(), rand_suffix()));
    root.create_dir(&stage).context("cannot create the staging directory")?;
    Ok((Arc::new(root), stage))
}

fn rand_suffix() -> String {
    let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{n:08x}")
}

/// Writes every path: local ones (manifest BLOBs, cache) by a few threads, remote ones by
/// the downloader, at the same time. `atomic`: write through temporary names (in place);
/// else create the final names directly (a private staging directory).
#[allow(clippy::too_many_arguments)]
async fn write_contents(
    client: &Client,
    ws: &str,
    root: &Arc<Dir>,
    (local, manifest, atomic): (Vec<Local>, Option<&Downloaded>, bool),
    remote: Vec<Blob>,
    cache: &ContentCache,
    opts: &HydrateOptions,
    total_bytes: u64,
    sources: &mut Sources,
) -> anyhow::Result<()> {
    let bar = progress::bytes_bar(opts.progress, total_bytes, "pulling");
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        ws: ws.to_string(),
        root: Arc::clone(root),
        bar: bar.clone(),
        cache: Some(cache.clone()),
        stats: RemoteStats::default(),
    });
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 8) * 2;
    let local_job = {
        let (root, cache, bar) = (Arc::clone(root), cache.clone(), bar.clone());
        let manifest_path = manifest.map(|m| m.path.to_path_buf());
        tokio::task::spawn_blocking(move || {
            write_local(&root, local, manifest_path.as_deref(), &cache, (workers, atomic), &bar)
        })
    };
    let t = Instant::now();
    let concurrency = opts.concurrency.max(1);
    let wire_before = ctx.client.blob_bytes_received();
    let remote_result = pull::download_all(&ctx, remote, concurrency).await;
    let remote_secs = t.elapsed().as_secs_f64();
    let local = local_job.await.context("write task failed")??;
    remote_result.context("cannot download a file from the blob store")?;
    // contents the cache claimed but could not give (evicted or damaged meanwhile)
    let mut fallback: HashMap<ContentHash, usize> = HashMap::new();
    let mut again: Vec<Blob> = Vec::new();
    for e in local.fallback {
        let Some(hash) = e.hash else { continue };
        match fallback.get(&hash) {
            Some(&i) => again[i].targets.push(e),
            None => {
                fallback.insert(hash, again.len());
                again.push(Blob { hash, size: e.size, targets: vec![e] });
            }
        }
    }
    if !again.is_empty() {
        tracing::warn!(contents = again.len(), "cache misses after planning; downloading them");
        pull::download_all(&ctx, again, concurrency).await.context("cannot download a file from the blob store")?;
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
    local: Vec<Local>,
    manifest: Option<&Path>,
    cache: &ContentCache,
    (workers, atomic): (usize, bool),
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
                                From::Manifest(id) => {
                                    let Some(r) = &reader else { bail!("no manifest for {}", e.path) };
                                    let data =
                                        r.blob(id, &hash, e.size).with_context(|| format!("refusing {}", e.path))?;
                                    write_new(root, e, &data, atomic)?;
                                    done.manifest_files += 1;
                                    done.manifest_bytes += e.size;
                                    nanos[0].fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                                }
                                From::Cache => {
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
        return restore::write_symlink(root, &e.path, data);
    }
    if atomic {
        return restore::write_file(root, &e.path, data, e.mode);
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
    let (temp, file) = restore::TempFile::create(root, &e.path)?;
    let mut out = file.into_std();
    if !cache.copy_to(hash, e.size, &mut out)? {
        return Ok(false);
    }
    temp.persist(&cap_std::fs::File::from_std(out), e.mode)?;
    Ok(true)
}

/// In place: what one changed path holds now and must hold.
struct Change {
    path: WsPath,
    before: Option<Entry>,
    after: Option<Entry>,
}

/// Turns DIR, which holds `current` of `ws` plus maybe local edits, into `version`, touching
/// only the paths that differ between the two.
pub(crate) async fn switch(
    client: &Client,
    ws: &str,
    version: VersionRef,
    dir: &Path,
    cache: &ContentCache,
    opts: &HydrateOptions,
    current: u64,
) -> anyhow::Result<HydrateReport> {
    let target = match version {
        VersionRef::Number(n) => n,
        VersionRef::Head => client.workspace(ws).await.context("cannot read the workspace")?.head,
    };
    let mut report = HydrateReport::new(ws, target, dir, "unchanged", Some(current));
    if target == current {
        return Ok(report);
    }
    report.mode = "switch";
    let mut sources = Sources::default();
    let t = Instant::now();
    let (lo, hi) = (current.min(target), current.max(target));
    let d = download(client, ws, VersionRef::Number(hi), Some(lo), cache, &mut sources).await?;
    let (changes, blob_ids) = {
        let r = Reader::open(&d.path).context("cannot open the downloaded delta")?;
        let h = r.header()?;
        if h.workspace != ws || h.version != hi || h.kind != (Kind::Delta { base: lo }) {
            bail!("the delta is for {}@{} ({:?}), asked for {ws}@{hi} since {lo}", h.workspace, h.version, h.kind);
        }
        let mut newer: HashMap<WsPath, (Entry, Option<i64>)> = HashMap::new();
        r.for_each_entry(|row| {
            newer.insert(row.entry.path.clone(), (row.entry, row.blob_id));
            Ok(())
        })?;
        let older: HashMap<WsPath, Entry> = r.replaced()?.into_iter().map(|e| (e.path.clone(), e)).collect();
        let mut paths: Vec<WsPath> = newer.keys().chain(older.keys()).cloned().collect();
        paths.extend(r.deleted()?);
        paths.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        paths.dedup();
        let forward = target > current;
        let mut ids = HashMap::new();
        let changes: Vec<Change> = paths
            .into_iter()
            .map(|p| {
                let new = newer.get(&p).map(|(e, id)| {
                    if let (Some(h), Some(id)) = (e.hash, id) {
                        ids.insert(h, *id);
                    }
                    e.clone()
                });
                let old = older.get(&p).cloned();
                let (before, after) = if forward { (old, new) } else { (new, old) };
                Change { path: p, before, after }
            })
            .collect();
        (changes, ids)
    };
    sources.manifest.secs += t.elapsed().as_secs_f64();
    let root = Arc::new(
        Dir::open_ambient_dir(dir, ambient_authority()).with_context(|| format!("cannot open {}", dir.display()))?,
    );

    // every changed path must hold what `before` says (or already what `after` says)
    let keep_local = opts.keep_local;
    let (todo, conflicts) = {
        let root = Arc::clone(&root);
        blocking(move || {
            let mut todo = Vec::new();
            let mut conflicts = Vec::new();
            for c in changes {
                let now = local_state(&root, &c.path)?;
                if matches(&now, c.after.as_ref()) {
                    continue;
                }
                if !matches(&now, c.before.as_ref()) {
                    conflicts.push(c.path.to_string());
                    if keep_local {
                        continue;
                    }
                }
                todo.push(c);
            }
            Ok((todo, conflicts))
        })
        .await?
    };
    if keep_local {
        report.kept_local = conflicts;
    } else if !conflicts.is_empty() && !opts.force {
        let shown: Vec<&str> = conflicts.iter().take(10).map(String::as_str).collect();
        bail!(
            "{} holds local changes to {} path(s) that differ between versions {current} and {target}: {}{}; \
             push them first, or pull with --force to discard them",
            dir.display(),
            conflicts.len(),
            shown.join(", "),
            if conflicts.len() > 10 { ", ..." } else { "" }
        );
    }

    // remove what must go (children first), then write in path order
    let (local, remote, dirs, removed, kept) = {
        let root = Arc::clone(&root);
        let cached: HashSet<ContentHash> = {
            let hashes: Vec<ContentHash> = todo.iter().filter_map(|c| c.after.as_ref()?.hash).collect();
            let c = cache.clone();
            blocking(move || c.contains(&hashes)).await?
        };
        blocking(move || {
            let mut removed = 0;
            let mut kept = Vec::new();
            for c in todo.iter().rev() {
                let now = local_state(&root, &c.path)?;
                let keep_dir = matches!((&now, &c.after), (Some(LocalKind::Dir), Some(a)) if a.kind == EntryKind::Dir);
                if now.is_some() && !keep_dir {
                    match remove(&root, &c.path) {
                        Ok(()) => removed += 1,
                        // a directory that holds new local files stays, with them
                        Err(_) if keep_local && now == Some(LocalKind::Dir) && c.after.is_none() => {
                            kept.push(c.path.to_string());
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            let mut dirs = Vec::new();
            let mut rows = Vec::new();
            for c in todo {
                let Some(a) = c.after else { continue };
                if a.kind == EntryKind::Dir {
                    if local_state(&root, &a.path)?.is_none() {
                        restore::create_dir(&root, &a.path)?;
                    }
                    dirs.push(a);
                } else {
                    let id = a.hash.and_then(|h| blob_ids.get(&h).copied());
                    rows.push((a, id));
                }
            }
            let p = plan(rows, &cached);
            Ok((p.local, p.remote, dirs, removed, kept))
        })
        .await?
    };
    report.removed = removed;
    report.kept_local.extend(kept);
    report.dirs = dirs.len() as u64;
    report.count(&local, &remote);
    let used: Vec<ContentHash> =
        local.iter().filter_map(|l| l.entry.hash).chain(remote.iter().map(|b| b.hash)).collect();
    let total = report.bytes;
    // DIR is live: every write goes through a temporary name
    write_contents(client, ws, &root, (local, Some(&d), true), remote, cache, opts, total, &mut sources).await?;
    {
        let root = Arc::clone(&root);
        blocking(move || {
            for d in dirs.iter().rev() {
                restore::set_mode(&root, &d.path, d.mode)?;
            }
            Ok(())
        })
        .await?;
    }
    write_state(dir, ws, target)?;
    keep_in_cache(cache, None, used).await?;
    report.sources = sources;
    Ok(report)
}

/// What a path holds on disk, as far as a switch cares.
#[derive(Debug, PartialEq, Eq)]
enum LocalKind {
    Dir,
    /// kind, content hash, mode
    Content(EntryKind, ContentHash, u32),
}

fn local_state(root: &Dir, path: &WsPath) -> anyhow::Result<Option<LocalKind>> {
    let meta = match root.symlink_metadata(path.as_str()) {
        Ok(m) => m,
        // absent, or a parent is not a directory (yet)
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory) => {
            return Ok(None);
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {path}")),
    };
    let ft = meta.file_type();
    if ft.is_dir() {
        return Ok(Some(LocalKind::Dir));
    }
    if ft.is_symlink() {
        let target = root.read_link_contents(path.as_str()).with_context(|| format!("cannot read link {path}"))?;
        use std::os::unix::ffi::OsStrExt;
        let h = ContentHash::of(target.as_os_str().as_bytes());
        return Ok(Some(LocalKind::Content(EntryKind::Symlink, h, podfs_protocol::tree::SYMLINK_MODE)));
    }
    let mut f = root.open(path.as_str()).with_context(|| format!("cannot read {path}"))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("cannot read {path}"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let mode = meta.permissions().mode() & podfs_protocol::tree::MODE_MASK;
    Ok(Some(LocalKind::Content(EntryKind::File, hasher.finalize().into(), mode)))
}

fn matches(now: &Option<LocalKind>, want: Option<&Entry>) -> bool {
    match (now, want) {
        (None, None) => true,
        (Some(LocalKind::Dir), Some(e)) => e.kind == EntryKind::Dir,
        (Some(LocalKind::Content(k, h, m)), Some(e)) => {
            *k == e.kind && Some(*h) == e.hash && (e.kind == EntryKind::Symlink || *m == e.mode)
        }
        _ => false,
    }
}

fn remove(root: &Dir, path: &WsPath) -> anyhow::Result<()> {
    let meta = root.symlink_metadata(path.as_str()).with_context(|| format!("cannot read {path}"))?;
    if meta.is_dir() {
        root.remove_dir(path.as_str()).with_context(|| {
            format!("cannot remove directory {path}: it holds files that are in neither version (move them away)")
        })
    } else {
        root.remove_file(path.as_str()).with_context(|| format!("cannot remove {path}"))
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> anyhow::Result<T> + Send + 'static) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await.context("blocking task failed")?
}
