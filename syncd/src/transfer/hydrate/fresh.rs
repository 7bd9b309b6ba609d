//! A fresh hydration: DIR absent or empty. Everything is written into a private staging
//! directory `DIR/.podfs/stage-*` (files created at their final names there, no temporary
//! names needed), directories get their modes last, then the staged top-level entries are
//! renamed into DIR. A crash leaves only the staging directory, which the next pull removes:
//! DIR never shows a partial file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use cap_std::ambient_authority;
use cap_std::fs::Dir;
use podfs_cache::ContentCache;
use podfs_client::Client;
use podfs_protocol::VersionRef;

use super::write::{Contents, write_contents};
use super::{HydrateMode, HydrateOptions, HydrateReport, Peered, Sources, blocking, keep_in_cache, tree};
use crate::local::state::{StateDir, holds_only_state};
use crate::local::write;
use crate::transfer::plan::Plan;

pub(super) async fn fresh(
    client: &Client,
    ws: &str,
    version: VersionRef,
    dir: &Path,
    cache: &ContentCache,
    opts: &HydrateOptions,
) -> anyhow::Result<HydrateReport> {
    let mut sources = Sources::default();
    let (root, stage_name, stage) = {
        let dir = dir.to_path_buf();
        blocking(move || open_fresh_root(&dir)).await?
    };
    let result = async {
        let peered = match (&opts.peers, version) {
            (Some(node), VersionRef::Number(n)) => node.plan(client, ws, n).await.map(|p| (Arc::clone(node), p)),
            _ => None,
        };
        let result =
            fill(client, ws, version, dir, cache, opts, peered.as_ref(), &root, &stage, &stage_name, &mut sources)
                .await;
        if let Some((node, plan)) = &peered {
            // whatever this daemon did not end up holding, peers must not wait for
            node.shelf.settle(ws, plan.version);
        }
        result
    }
    .await;
    if result.is_err() {
        let _ = blocking(move || Ok(root.remove_dir_all(&stage_name)?)).await;
    }
    result
}

/// Plans and writes the tree into the staging directory, then moves it into DIR.
#[allow(clippy::too_many_arguments)]
async fn fill(
    client: &Client,
    ws: &str,
    version: VersionRef,
    dir: &Path,
    cache: &ContentCache,
    opts: &HydrateOptions,
    peered: Option<&Peered>,
    root: &Arc<Dir>,
    stage: &Arc<Dir>,
    stage_name: &Path,
    sources: &mut Sources,
) -> anyhow::Result<HydrateReport> {
    {
        let (v, rows, manifest, cached) = tree(client, ws, version, cache, peered, sources).await?;
        let plan = Plan::new(rows, &cached).with_context(|| format!("refusing the tree of {ws}@{v}"))?;
        let mut report = HydrateReport::new(ws, v, dir, HydrateMode::Fresh, None);
        report.count(&plan);
        {
            let (stage, dirs) = (Arc::clone(stage), plan.dirs.clone());
            blocking(move || {
                for d in &dirs {
                    write::create_dir(&stage, &d.path)?;
                }
                Ok(())
            })
            .await?;
        }
        let all_hashes = plan.hashes();
        let contents = Contents {
            local: plan.local,
            remote: plan.remote,
            manifest: manifest.as_ref().map(|m| m.path.to_path_buf()),
            atomic: false,
            total_bytes: report.bytes,
            peers: peered.cloned(),
        };
        write_contents(client, ws, stage, contents, cache, opts, sources).await?;
        // directories get their modes last, deepest first; then the staged tree moves into DIR
        {
            let (stage, dirs, root) = (Arc::clone(stage), plan.dirs, Arc::clone(root));
            let (stage_name, dir, ws) = (stage_name.to_path_buf(), dir.to_path_buf(), ws.to_string());
            blocking(move || {
                for d in dirs.iter().rev() {
                    write::set_mode(&stage, &d.path, d.mode)?;
                }
                for name in stage.entries()? {
                    let name = name?.file_name();
                    stage.rename(&name, &root, &name).with_context(|| format!("cannot move {name:?} into place"))?;
                }
                drop(stage);
                root.remove_dir(&stage_name).context("cannot remove the staging directory")?;
                StateDir::of(&dir).write_pull_state(&ws, v)
            })
            .await?;
        }
        keep_in_cache(cache, manifest, all_hashes).await?;
        report.sources = std::mem::take(sources);
        Ok(report)
    }
}

/// Opens DIR (created when missing; empty apart from an old `.podfs`) and makes a fresh
/// staging directory in `DIR/.podfs`. Returns DIR's handle, the staging path below it and the
/// staging directory's handle.
fn open_fresh_root(dir: &Path) -> anyhow::Result<(Arc<Dir>, PathBuf, Arc<Dir>)> {
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
    let stage_name = StateDir::of(dir).new_stage()?;
    let stage = root.open_dir(&stage_name).context("cannot open the staging directory")?;
    Ok((Arc::new(root), stage_name, Arc::new(stage)))
}
