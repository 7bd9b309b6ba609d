//! Turning pending paths into a version, and what happens when head moved.
//!
//! A commit sends the change list between the local index and the base, with the base's
//! version as parent. Blobs are uploaded first, each re-read from disk and checked against the
//! hash the index holds: a file that changed since it was hashed is not uploaded (the commit
//! stops and the path is looked at again). The base advances only after the gateway's answer.
//!
//! **Two writers.** When the gateway refuses the parent (another writer moved head), syncd
//! fetches the diff from its base to head. Paths only the other writer changed are written to
//! disk (only where the disk still holds the base's state). Paths both changed to the same state
//! need nothing. Paths both changed differently are conflicts: the other writer's state stays
//! in its version, ours is committed on top of it and becomes head. Nothing is overwritten
//! without a version holding it; the conflict is named in the commit message and in
//! `podfs status`.

use std::collections::HashSet;
use std::path::Path;

use anyhow::Context;
use podfs_client::Client;
use podfs_protocol::api::CommitRequest;
use podfs_protocol::{Change, ContentHash, Entry, EntryKind, VersionRef};

use podfs_cache::ContentCache;

use super::local::{Counts, LocalTree, Pending};
use crate::changes::{changes_of_diff, compute_changes};
use crate::local::hash;
use crate::local::scan::{Source, Sources};
use crate::transfer::hydrate::{self, HydrateOptions};
use crate::transfer::push::{self, PushError};

/// What a commit needs besides the index.
pub struct Ctx<'a> {
    pub client: &'a Client,
    /// DIR.
    pub root: &'a Path,
    pub author: &'a str,
    pub cache: &'a ContentCache,
    /// For writing the other writer's changes (`keep_local` set).
    pub hydrate: &'a HydrateOptions,
    /// The index, on its thread.
    pub local: &'a LocalTree,
}

/// How one attempt ended.
#[derive(Debug)]
pub enum Attempt {
    Committed {
        version: u64,
        changes: usize,
        counts: Counts,
    },
    /// Head moved; the other writer's changes are merged into the base and the disk. `touched`
    /// must be looked at again; `conflicts` were changed on both sides.
    Rebased {
        touched: Vec<String>,
        conflicts: Vec<String>,
        head: u64,
        counts: Counts,
    },
    /// These paths changed after they were hashed: look again, then retry.
    Changed(Vec<String>),
    /// The gateway (or what is behind it) did not answer, or refused: retry later.
    Failed(anyhow::Error),
}

/// Commits the pending paths of the index.
pub async fn commit(ctx: &Ctx<'_>, message: String) -> Attempt {
    match try_commit(ctx, message).await {
        Ok(a) => a,
        Err(e) => Attempt::Failed(e),
    }
}

async fn try_commit(ctx: &Ctx<'_>, message: String) -> anyhow::Result<Attempt> {
    let (client, root) = (ctx.client, ctx.root);
    let pending = ctx.local.pending().await?;
    let changes = compute_changes(&pending.local, &pending.base);
    if changes.is_empty() {
        let counts = ctx.local.counts().await?;
        return Ok(Attempt::Committed { version: pending.base_version, changes: 0, counts });
    }
    let ws = pending.workspace.clone();
    if let Err(e) = upload(client, &ws, root, &changes).await {
        if let Some(PushError::ChangedWhilePushing { path }) = e.downcast_ref::<PushError>() {
            let rel = Path::new(path).strip_prefix(root).map(|p| p.to_string_lossy().into_owned());
            return Ok(Attempt::Changed(vec![rel.unwrap_or_else(|_| path.clone())]));
        }
        return Err(e);
    }
    let req = CommitRequest {
        parent_version: pending.base_version,
        message: Some(message),
        author: Some(ctx.author.to_string()),
        changes: changes.clone(),
    };
    match client.commit(&ws, &req).await {
        Ok(info) => {
            let n = changes.len();
            let counts = ctx
                .local
                .advance(info.version, changes)
                .await
                .context("committed, but the local index could not record it")?;
            Ok(Attempt::Committed { version: info.version, changes: n, counts })
        }
        Err(e) if e.is_conflict() => rebase(ctx, &pending).await,
        Err(e) => Err(anyhow::Error::new(e).context(format!("cannot commit to {ws}"))),
    }
}

/// Uploads the blobs of `changes` the gateway lacks, each re-read and verified.
async fn upload(client: &Client, ws: &str, root: &Path, changes: &[Change]) -> anyhow::Result<()> {
    let mut seen = HashSet::new();
    let puts: Vec<&Entry> = changes
        .iter()
        .filter_map(|c| match c {
            Change::Put(e) if e.hash.is_some() => Some(e),
            _ => None,
        })
        .filter(|e| seen.insert(e.hash))
        .collect();
    let hashes: Vec<ContentHash> = puts.iter().filter_map(|e| e.hash).collect();
    let missing = push::missing_set(client, ws, &hashes).await?;
    let mut sources = Sources::new();
    for e in puts {
        let Some(h) = e.hash.filter(|h| missing.contains(h)) else { continue };
        let local = root.join(e.path.as_str());
        let source = match e.kind {
            EntryKind::Symlink => {
                let link = local.clone();
                let read = tokio::task::spawn_blocking(move || hash::read_link(&link)).await?;
                match read {
                    Ok((actual, text)) if actual == h => Source::Inline(text),
                    _ => return Err(PushError::ChangedWhilePushing { path: local.display().to_string() }.into()),
                }
            }
            _ => Source::File { path: local, size: e.size },
        };
        sources.insert(h, source);
    }
    let missing: Vec<ContentHash> = sources.keys().copied().collect();
    let opts = push::PushOptions { progress: false, ..Default::default() };
    push::upload(client, ws, &sources, &missing, &opts).await.map(|_| ())
}

/// Head moved: merge the other writer's changes (see the module docs).
async fn rebase(ctx: &Ctx<'_>, pending: &Pending) -> anyhow::Result<Attempt> {
    let (client, root) = (ctx.client, ctx.root);
    let ws = pending.workspace.clone();
    let head = client.workspace(&ws).await.with_context(|| format!("cannot read workspace {ws}"))?.head;
    let from = pending.base_version;
    if head == from {
        anyhow::bail!("the gateway refused parent version {from}, which is still head");
    }
    let diff = client
        .diff(&ws, VersionRef::Number(from), VersionRef::Number(head))
        .await
        .with_context(|| format!("cannot read the changes between versions {from} and {head}"))?;
    let mut conflicts = Vec::new();
    let mut touched = Vec::new();
    for d in &diff.changes {
        touched.push(d.path.clone());
        if pending.paths.contains(&d.path) {
            let ours = pending.local.iter().find(|e| e.path.as_str() == d.path);
            let same = match (ours, d.new.as_ref()) {
                (None, None) => true,
                (Some(a), Some(b)) => a.same_content(b),
                _ => false,
            };
            if !same {
                conflicts.push(d.path.clone());
            }
        }
    }
    // the other writer's changes onto the disk, around local edits
    let report = hydrate::switch(client, &ws, VersionRef::Number(head), root, ctx.cache, ctx.hydrate, from)
        .await
        .with_context(|| format!("cannot bring the changes of versions {}..={head} to disk", from + 1))?;
    tracing::info!(
        from,
        head,
        changed = diff.changes.len(),
        kept_local = report.kept_local.len(),
        conflicts = conflicts.len(),
        "head moved: merged the other writer's changes"
    );
    let counts = ctx.local.advance(head, changes_of_diff(&diff.changes, true)).await?;
    Ok(Attempt::Rebased { touched, conflicts, head, counts })
}
