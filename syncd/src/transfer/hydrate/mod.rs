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

mod fresh;
mod switch;
mod write;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use podfs_cache::ContentCache;
use podfs_client::Client;
use podfs_manifest::{Kind, Reader};
use podfs_protocol::{ContentHash, Entry, VersionRef};
use serde::{Deserialize, Serialize};

pub use self::switch::switch;
use super::blocking;
use super::peers::{ColdPlan, PeerNode};
use super::plan::Plan;
use crate::local::state::StateDir;
use crate::validate;

/// Small files this podfs expects inside a manifest (the gateway's default limit).
const SMALL: u64 = podfs_manifest::DEFAULT_SMALL_FILE_LIMIT;

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
    /// Cold starts ask the tracker for a plan and take units from peers before S3.
    pub peers: Option<Arc<PeerNode>>,
}

/// Time and bytes spent on one source of content.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceFigures {
    /// Paths written from this source.
    pub files: u64,
    /// Content bytes written from this source.
    pub bytes: u64,
    /// Bytes moved over the network for it.
    pub transfer_bytes: u64,
    pub requests: u64,
    pub secs: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sources {
    pub manifest: SourceFigures,
    pub cache: SourceFigures,
    pub s3: SourceFigures,
    /// Units (the manifest, large files) from other devpods.
    pub peers: SourceFigures,
}

/// What a hydration did to DIR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HydrateMode {
    /// DIR was empty: the whole tree was written.
    Fresh,
    /// DIR held another version: only the paths that differ were touched.
    Switch,
    /// DIR already held the version.
    Unchanged,
}

/// What a Phase 2 pull did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HydrateReport {
    pub workspace: String,
    pub version: u64,
    pub dir: PathBuf,
    pub mode: HydrateMode,
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
    fn new(ws: &str, version: u64, dir: &Path, mode: HydrateMode, from_version: Option<u64>) -> Self {
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

    /// Counts what a plan writes.
    fn count(&mut self, plan: &Plan) {
        self.files += plan.files;
        self.symlinks += plan.symlinks;
        self.bytes += plan.bytes;
        self.dirs += plan.dirs.len() as u64;
    }
}

/// `dir`, else the user's cache directory.
pub fn cache_dir_or_default(dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    dir.or_else(podfs_cache::default_dir)
        .context("no cache directory: pass --cache-dir, or set XDG_CACHE_HOME or HOME to an absolute path")
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
        blocking(move || Ok(ContentCache::open(&d, limit)?)).await?
    };
    let pulled = {
        let dir = dir.to_path_buf();
        blocking(move || StateDir::of(&dir).read_pull_state()).await?
    };
    let mut report = match pulled {
        Some(s) if s.workspace == ws => switch(client, ws, version, dir, &cache, &opts, s.version).await?,
        Some(s) => bail!("{} holds workspace {}, not {ws}; pull into another directory", dir.display(), s.workspace),
        None => fresh::fresh(client, ws, version, dir, &cache, &opts).await?,
    };
    report.elapsed_secs = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The tree (validated) with the manifest BLOB of each path, the manifest file when one was
/// downloaded (`None`: the JSON tree was enough, the cache holds the small files), and which
/// of the tree's contents the cache holds.
pub(super) async fn tree(
    client: &Client,
    ws: &str,
    version: VersionRef,
    cache: &ContentCache,
    peers: Option<&Peered>,
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
            validate::validate_entries(m.entries).with_context(|| format!("refusing the tree of {ws}@{v}"))?;
        let hashes: Vec<ContentHash> = entries.iter().filter_map(|e| e.hash).collect();
        let c = cache.clone();
        let cached = blocking(move || Ok(c.contains(&hashes)?)).await?;
        let (mut missing, mut all) = (0u64, 0u64);
        for e in entries.iter().filter(|e| e.size <= SMALL) {
            let Some(h) = e.hash else { continue };
            all += e.size;
            if !cached.contains(&h) {
                missing += e.size;
            }
        }
        if missing * 4 <= all {
            if let Some((node, plan)) = peers {
                // this daemon will not hold the manifest: peers waiting for it ask elsewhere
                node.shelf.gone(ws, plan.version, &plan.manifest.root);
            }
            (v, entries.into_iter().map(|e| (e, None)).collect(), None, cached)
        } else {
            // too much is missing: one manifest download beats many small ones
            let (d, rows) = download_full(client, ws, VersionRef::Number(v), cache, peers, sources).await?;
            (v, rows, Some(d), cached)
        }
    } else {
        // an empty cache holds nothing: no need to ask it
        let (d, rows) = download_full(client, ws, version, cache, peers, sources).await?;
        (d.version, rows, Some(d), HashSet::new())
    };
    sources.manifest.secs += t.elapsed().as_secs_f64();
    Ok(found)
}

/// A verified manifest file in the cache's scratch directory.
pub(super) struct Downloaded {
    pub(super) path: tempfile::TempPath,
    pub(super) hash: ContentHash,
    pub(super) version: u64,
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
        let entries = validate::validate_entries(rows.into_iter().map(|(e, _)| e))
            .with_context(|| format!("refusing the manifest of {}@{}", self.ws, self.version))?;
        Ok(entries.into_iter().zip(ids).collect())
    }
}

/// The peer side of a cold start: this daemon's node and the tracker's plan.
pub type Peered = (Arc<PeerNode>, Arc<ColdPlan>);

/// Downloads the whole manifest of `ws@version` (from peers first when there is a plan for
/// that version) and reads its rows (off the runtime).
async fn download_full(
    client: &Client,
    ws: &str,
    version: VersionRef,
    cache: &ContentCache,
    peers: Option<&Peered>,
    sources: &mut Sources,
) -> anyhow::Result<(Downloaded, Vec<(Entry, Option<i64>)>)> {
    let planned = peers.filter(|(_, p)| version == VersionRef::Number(p.version));
    let from_peers = match planned {
        Some((node, plan)) => manifest_from_peers(node, plan, cache, sources).await?,
        None => None,
    };
    let (d, frame) = match from_peers {
        Some((d, frame)) => (d, Some(frame)),
        None => download_framed(client, ws, version, None, cache, sources, planned.is_some()).await?,
    };
    if let Some((node, plan)) = planned {
        // serve the frame at once: peers of the zone may be waiting for this very copy
        match frame {
            Some(f) if d.hash == plan.manifest.file_hash => node.shelf.ready(ws, plan.version, &plan.manifest.root, f),
            _ => node.shelf.gone(ws, plan.version, &plan.manifest.root),
        }
    }
    let (d, rows) = blocking(move || {
        let rows = d.rows()?;
        Ok((d, rows))
    })
    .await?;
    Ok((d, rows))
}

/// The manifest unit of `plan` (its stored frame) from peers, every group verified against the
/// hash the gateway stated, then decompressed into the cache's scratch directory and checked
/// against the stated hash of the file. Returns the manifest and the frame (an unlinked file,
/// to serve); `None` when no peer could give it.
async fn manifest_from_peers(
    node: &PeerNode,
    plan: &ColdPlan,
    cache: &ContentCache,
    sources: &mut Sources,
) -> anyhow::Result<Option<(Downloaded, std::fs::File)>> {
    let t = Instant::now();
    let mut out = tokio::fs::File::from_std(scratch_frame(cache).await?);
    let m = plan.manifest;
    if !node.fetch_unit(plan, m.root, &mut out).await {
        return Ok(None);
    }
    let frame = out.into_std().await;
    let (file, path) = scratch_file(cache).await?.into_parts();
    let decoded = blocking(move || {
        use std::io::Seek;
        let mut src = frame.try_clone()?;
        src.rewind()?;
        let sink = std::io::BufWriter::with_capacity(1 << 20, file);
        podfs_protocol::frame::decompress_verified(
            std::io::BufReader::with_capacity(1 << 20, src),
            &m.file_hash,
            m.file_size,
            sink,
        )
        .context("the manifest from peers does not decompress to the stated file")?;
        Ok(frame)
    })
    .await;
    let frame = match decoded {
        Ok(f) => f,
        Err(e) => {
            // verified against the gateway's root, so this is a bug or a broken disk, not a peer
            tracing::warn!(error = %format!("{e:#}"), "cannot use the manifest from peers");
            return Ok(None);
        }
    };
    sources.peers.files += 1;
    sources.peers.bytes += m.file_size;
    sources.peers.transfer_bytes += m.size;
    sources.peers.requests += 1;
    sources.peers.secs += t.elapsed().as_secs_f64();
    Ok(Some((Downloaded { path, hash: m.file_hash, version: plan.version, ws: plan.ws.clone() }, frame)))
}

/// An unlinked file in the cache's scratch directory, for a manifest's frame.
async fn scratch_frame(cache: &ContentCache) -> anyhow::Result<std::fs::File> {
    let tmp = cache.tmp_dir();
    blocking(move || {
        std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        tempfile::tempfile_in(&tmp).with_context(|| format!("cannot create a file in {}", tmp.display()))
    })
    .await
}

/// A new file in the cache's scratch directory.
async fn scratch_file(cache: &ContentCache) -> anyhow::Result<tempfile::NamedTempFile> {
    let tmp = cache.tmp_dir();
    blocking(move || {
        std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        tempfile::Builder::new()
            .prefix("manifest-")
            .suffix(".sqlite")
            .tempfile_in(&tmp)
            .with_context(|| format!("cannot create a file in {}", tmp.display()))
    })
    .await
}

/// Downloads a manifest (the changes since `since` when given) into the cache's scratch
/// directory, verified against the hash the gateway states.
pub(super) async fn download(
    client: &Client,
    ws: &str,
    version: VersionRef,
    since: Option<u64>,
    cache: &ContentCache,
    sources: &mut Sources,
) -> anyhow::Result<Downloaded> {
    Ok(download_framed(client, ws, version, since, cache, sources, false).await?.0)
}

/// [`download`], also keeping the transfer frame as received (an unlinked file) when
/// `keep_frame`.
async fn download_framed(
    client: &Client,
    ws: &str,
    version: VersionRef,
    since: Option<u64>,
    cache: &ContentCache,
    sources: &mut Sources,
    keep_frame: bool,
) -> anyhow::Result<(Downloaded, Option<std::fs::File>)> {
    let (file, path) = scratch_file(cache).await?.into_parts();
    let frame = match keep_frame {
        true => Some(scratch_frame(cache).await?),
        false => None,
    };
    let (_, frame, d) = client
        .download_manifest_framed(ws, version, since, file, frame)
        .await
        .with_context(|| format!("cannot download the manifest of {ws}@{version}"))?;
    sources.manifest.requests += 1;
    sources.manifest.transfer_bytes += d.transfer_bytes;
    Ok((Downloaded { path, hash: d.hash, version: d.version, ws: ws.to_string() }, frame))
}

/// Adds the manifest to the cache as a pack, marks what was used, trims the cache.
pub(super) async fn keep_in_cache(
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
