//! Switching DIR in place from the version it holds to another: one delta manifest
//! (`?since=`) names the paths that differ, what they held and what they must hold. Only those
//! paths are read and written: each must still hold its old content (or already hold the new
//! one, so an interrupted switch resumes); local edits are refused unless `force`, or kept with
//! `keep_local` (what syncd does when another writer moved head).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use cap_std::ambient_authority;
use cap_std::fs::{Dir, PermissionsExt};
use podfs_cache::ContentCache;
use podfs_client::Client;
use podfs_manifest::{Kind, Reader};
use podfs_protocol::{ContentHash, Entry, EntryKind, VersionRef, WsPath};

use super::write::{Contents, write_contents};
use super::{HydrateMode, HydrateOptions, HydrateReport, Sources, blocking, download, keep_in_cache};
use crate::local::hash;
use crate::local::state::{StateDir, gone};
use crate::local::write;
use crate::transfer::plan::Plan;

/// In place: what one changed path holds now and must hold.
struct PathSwitch {
    path: WsPath,
    before: Option<Entry>,
    after: Option<Entry>,
}

/// Turns DIR, which holds `current` of `ws` plus maybe local edits, into `version`, touching
/// only the paths that differ between the two.
pub async fn switch(
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
    let mut report = HydrateReport::new(ws, target, dir, HydrateMode::Unchanged, Some(current));
    if target == current {
        return Ok(report);
    }
    report.mode = HydrateMode::Switch;
    let mut sources = Sources::default();
    let t = Instant::now();
    let (lo, hi) = (current.min(target), current.max(target));
    let d = download(client, ws, VersionRef::Number(hi), Some(lo), cache, &mut sources).await?;
    let (d, delta) = {
        let ws = ws.to_string();
        blocking(move || {
            let delta = read_delta(&d.path, &ws, lo, hi, target > current)?;
            Ok((d, delta))
        })
        .await?
    };
    sources.manifest.secs += t.elapsed().as_secs_f64();
    let root = {
        let dir = dir.to_path_buf();
        let open = move || {
            Dir::open_ambient_dir(&dir, ambient_authority()).with_context(|| format!("cannot open {}", dir.display()))
        };
        Arc::new(blocking(open).await?)
    };

    let keep_local = opts.keep_local;
    let (todo, conflicts) = {
        let (root, changes) = (Arc::clone(&root), delta.changes);
        blocking(move || check_paths(&root, changes, keep_local)).await?
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

    let cached: HashSet<ContentHash> = {
        let hashes: Vec<ContentHash> = todo.iter().filter_map(|c| c.after.as_ref()?.hash).collect();
        let c = cache.clone();
        blocking(move || Ok(c.contains(&hashes)?)).await?
    };
    let cleared = {
        let (root, blob_ids) = (Arc::clone(&root), delta.blob_ids);
        blocking(move || clear_and_plan(&root, todo, &blob_ids, &cached, keep_local)).await?
    };
    report.removed = cleared.removed;
    report.kept_local.extend(cleared.kept);
    report.count(&cleared.plan);
    report.dirs = cleared.dirs.len() as u64;
    let used = cleared.plan.hashes();
    // DIR is live: every write goes through a temporary name
    let contents = Contents {
        local: cleared.plan.local,
        remote: cleared.plan.remote,
        manifest: Some(d.path.to_path_buf()),
        atomic: true,
        total_bytes: report.bytes,
        peers: None,
    };
    write_contents(client, ws, &root, contents, cache, opts, &mut sources).await?;
    {
        let (root, dir, ws, dirs) = (Arc::clone(&root), dir.to_path_buf(), ws.to_string(), cleared.dirs);
        blocking(move || {
            for d in dirs.iter().rev() {
                write::set_mode(&root, &d.path, d.mode)?;
            }
            StateDir::of(&dir).write_pull_state(&ws, target)
        })
        .await?;
    }
    keep_in_cache(cache, None, used).await?;
    report.sources = sources;
    Ok(report)
}

/// What a delta manifest says changes, in path order, and the manifest BLOB of each content.
struct Delta {
    changes: Vec<PathSwitch>,
    blob_ids: HashMap<ContentHash, i64>,
}

/// Reads the delta `lo..hi` of `ws` at `path` (checking its header); `forward`: switching from
/// `lo` to `hi`, else back.
fn read_delta(path: &Path, ws: &str, lo: u64, hi: u64, forward: bool) -> anyhow::Result<Delta> {
    let r = Reader::open(path).context("cannot open the downloaded delta")?;
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
    let mut blob_ids = HashMap::new();
    let changes = paths
        .into_iter()
        .map(|p| {
            let new = newer.get(&p).map(|(e, id)| {
                if let (Some(h), Some(id)) = (e.hash, id) {
                    blob_ids.insert(h, *id);
                }
                e.clone()
            });
            let old = older.get(&p).cloned();
            let (before, after) = if forward { (old, new) } else { (new, old) };
            PathSwitch { path: p, before, after }
        })
        .collect();
    Ok(Delta { changes, blob_ids })
}

/// Every changed path must hold what `before` says (or already what `after` says: nothing to
/// do). Returns the paths to switch and those holding local edits (left out with `keep_local`).
fn check_paths(
    root: &Dir,
    changes: Vec<PathSwitch>,
    keep_local: bool,
) -> anyhow::Result<(Vec<PathSwitch>, Vec<String>)> {
    let mut todo = Vec::new();
    let mut conflicts = Vec::new();
    for c in changes {
        let now = local_state(root, &c.path)?;
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
}

/// What [`clear_and_plan`] did and left to write.
struct Cleared {
    plan: Plan,
    /// Directories of the new version among the switched paths (they get their modes last).
    dirs: Vec<Entry>,
    removed: u64,
    /// Directories kept because they hold new local files (`keep_local`).
    kept: Vec<String>,
}

/// Removes what must go (children first), creates the new directories, and plans the writes.
fn clear_and_plan(
    root: &Arc<Dir>,
    todo: Vec<PathSwitch>,
    blob_ids: &HashMap<ContentHash, i64>,
    cached: &HashSet<ContentHash>,
    keep_local: bool,
) -> anyhow::Result<Cleared> {
    let mut removed = 0;
    let mut kept = Vec::new();
    for c in todo.iter().rev() {
        let now = local_state(root, &c.path)?;
        let keep_dir = matches!((&now, &c.after), (Some(LocalKind::Dir), Some(a)) if a.kind == EntryKind::Dir);
        if now.is_some() && !keep_dir {
            match remove(root, &c.path) {
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
            if local_state(root, &a.path)?.is_none() {
                write::create_dir(root, &a.path)?;
            }
            dirs.push(a);
        } else {
            let id = a.hash.and_then(|h| blob_ids.get(&h).copied());
            rows.push((a, id));
        }
    }
    let plan = Plan::new(rows, cached)?;
    Ok(Cleared { plan, dirs, removed, kept })
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
        Err(e) if gone(&e) => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {path}")),
    };
    let ft = meta.file_type();
    if ft.is_dir() {
        return Ok(Some(LocalKind::Dir));
    }
    if ft.is_symlink() {
        let target = root.read_link_contents(path.as_str()).with_context(|| format!("cannot read link {path}"))?;
        let h = ContentHash::of(&hash::link_content(&target));
        return Ok(Some(LocalKind::Content(EntryKind::Symlink, h, podfs_protocol::tree::SYMLINK_MODE)));
    }
    let mut f = root.open(path.as_str()).with_context(|| format!("cannot read {path}"))?;
    let (h, _) = hash::hash_reader(&mut f).with_context(|| format!("cannot read {path}"))?;
    let mode = meta.permissions().mode() & podfs_protocol::tree::MODE_MASK;
    Ok(Some(LocalKind::Content(EntryKind::File, h, mode)))
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
