//! `podfs push WORKSPACE DIR`: commit a local directory as the workspace's next version.
//!
//! Steps: scan and hash the directory (rayon, on a blocking thread); fetch the head manifest;
//! compute the change list; ask which blobs the gateway lacks (batches of 10,000); upload only
//! those: small content in batches the gateway stores as packs (encoded here, several batches
//! at once), larger content one PUT each (from memory up to 1 MiB, else streamed from disk);
//! commit with the head as parent. Nothing changed: no commit. A head that moved meanwhile: [`PushError::Conflict`].

use std::collections::HashSet;
use std::path::Path;

use anyhow::Context;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use podfs_client::{Client, Error as ClientError};
use podfs_protocol::api::{CommitRequest, ErrorCode};
use podfs_protocol::blob;
use podfs_protocol::pack::BatchWriter;
use podfs_protocol::{Change, ContentHash, Entry, EntryKind, VersionRef};
use serde::Serialize;

use super::progress;
use crate::changes::compute_changes;
use crate::local::scan::{self, Source, Sources};

/// Single uploads (large content) in flight at once.
pub const UPLOAD_CONCURRENCY: usize = 32;
/// Content up to this size is uploaded in batches (the gateway keeps it in packs); the
/// gateway's default pack limit.
pub const BATCH_BLOB_LIMIT: u64 = podfs_protocol::pack::DEFAULT_PACK_BLOB_LIMIT;
/// A batch carries at most this many content bytes...
pub const BATCH_CONTENT: u64 = 32 << 20;
/// ...and at most this many blobs.
pub const BATCH_BLOBS: usize = 8192;
/// Batches in flight at once.
pub const BATCH_CONCURRENCY: usize = 4;
/// Files smaller than this are read into memory for upload; larger ones are streamed.
pub const SMALL_UPLOAD: u64 = 1 << 20;

#[derive(Debug, Clone)]
pub struct PushOptions {
    /// Commit message.
    pub message: Option<String>,
    /// Commit author (the gateway picks one when absent).
    pub author: Option<String>,
    /// Uploads in flight at once.
    pub concurrency: usize,
    /// Show progress bars on stderr.
    pub progress: bool,
}

impl Default for PushOptions {
    fn default() -> Self {
        Self { message: None, author: None, concurrency: UPLOAD_CONCURRENCY, progress: false }
    }
}

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PushReport {
    pub workspace: String,
    /// The new version, or the unchanged head when `up_to_date`.
    pub version: u64,
    /// The version the push was based on.
    pub parent: u64,
    /// True when nothing changed and no version was committed.
    pub up_to_date: bool,
    /// Paths put or deleted by the commit.
    pub changes: u64,
    pub uploaded_blobs: u64,
    /// Content bytes uploaded.
    pub uploaded_bytes: u64,
    /// The pushed tree.
    pub files: u64,
    pub symlinks: u64,
    pub dirs: u64,
    /// Local paths skipped (sockets, FIFOs, devices).
    pub skipped: u64,
}

/// Push failures a caller may want to tell apart.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(
        "workspace {workspace} moved on while pushing (its head is no longer version {parent}): \
         someone else pushed; run push again"
    )]
    Conflict { workspace: String, parent: u64 },
    #[error("{path} changed while pushing (it no longer matches the hash computed a moment ago); run push again")]
    ChangedWhilePushing { path: String },
    #[error("workspace {0} not found")]
    WorkspaceNotFound(String),
}

/// Pushes `dir` to `ws` as a new version on top of its head.
pub async fn push(client: &Client, ws: &str, dir: &Path, opts: PushOptions) -> anyhow::Result<PushReport> {
    let head = match client.workspace(ws).await {
        Ok(w) => w.head,
        Err(e) if e.is_not_found() => {
            return Err(PushError::WorkspaceNotFound(ws.to_string()).into());
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read workspace {ws}")),
    };

    let spin = progress::spinner(opts.progress, "scanning");
    let root = dir.to_path_buf();
    let tree = tokio::task::spawn_blocking(move || scan::scan(&root)).await.context("scan task failed")??;
    spin.finish_and_clear();

    let remote = remote_tree(client, ws, head).await?;
    let changes = compute_changes(&tree.entries, &remote);
    let mut report = PushReport {
        workspace: ws.to_string(),
        version: head,
        parent: head,
        up_to_date: changes.is_empty(),
        changes: changes.len() as u64,
        uploaded_blobs: 0,
        uploaded_bytes: 0,
        files: count(&tree.entries, EntryKind::File),
        symlinks: count(&tree.entries, EntryKind::Symlink),
        dirs: count(&tree.entries, EntryKind::Dir),
        skipped: tree.skipped.len() as u64,
    };
    if changes.is_empty() {
        return Ok(report);
    }

    let mut seen = HashSet::new();
    let needed: Vec<ContentHash> = changes
        .iter()
        .filter_map(|c| match c {
            Change::Put(e) => e.hash,
            Change::Delete(_) => None,
        })
        .filter(|h| seen.insert(*h))
        .collect();
    let missing = client.missing_blobs(ws, &needed).await.context("cannot ask the gateway which blobs it lacks")?;
    let (blobs, bytes) = upload(client, ws, &tree.sources, &missing, &opts).await?;
    report.uploaded_blobs = blobs;
    report.uploaded_bytes = bytes;

    let req =
        CommitRequest { parent_version: head, message: opts.message.clone(), author: opts.author.clone(), changes };
    let info = match client.commit(ws, &req).await {
        Ok(info) => info,
        Err(e) if e.is_conflict() => {
            return Err(PushError::Conflict { workspace: ws.to_string(), parent: head }.into());
        }
        Err(e) => return Err(e).with_context(|| format!("cannot commit to {ws}")),
    };
    report.version = info.version;
    Ok(report)
}

fn count(entries: &[Entry], kind: EntryKind) -> u64 {
    entries.iter().filter(|e| e.kind == kind).count() as u64
}

/// The entries of version `head` sorted by path; empty for version 0 (an empty workspace).
pub(crate) async fn remote_tree(client: &Client, ws: &str, head: u64) -> anyhow::Result<Vec<Entry>> {
    if head == 0 {
        return Ok(Vec::new());
    }
    let mut entries = match client.manifest(ws, VersionRef::Number(head)).await {
        Ok(m) => m.entries,
        Err(e) if e.is_not_found() => Vec::new(),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read the manifest of {ws}@{head}"));
        }
    };
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(entries)
}

/// Uploads the `missing` blobs; returns how many and their content bytes. Content up to
/// [`BATCH_BLOB_LIMIT`] goes in batches ([`upload_batch`]), larger content one PUT each; both
/// run at once.
pub(crate) async fn upload(
    client: &Client,
    ws: &str,
    sources: &Sources,
    missing: &[ContentHash],
    opts: &PushOptions,
) -> anyhow::Result<(u64, u64)> {
    let mut small = Vec::new();
    let mut large = Vec::new();
    for h in missing {
        let source =
            sources.get(h).with_context(|| format!("the gateway asked for blob {h}, which this push does not hold"))?;
        if source.size() <= BATCH_BLOB_LIMIT { small.push((*h, source)) } else { large.push((*h, source)) }
    }
    let total: u64 = small.iter().chain(&large).map(|(_, s)| s.size()).sum();
    let n = (small.len() + large.len()) as u64;
    let bar = progress::bytes_bar(opts.progress, total, "uploading");
    let batches = futures::stream::iter(batches(small))
        .map(|batch| {
            let bar = bar.clone();
            async move {
                let bytes: u64 = batch.iter().map(|(_, s)| s.size()).sum();
                upload_batch(client, ws, batch).await?;
                bar.inc(bytes);
                anyhow::Ok(())
            }
        })
        .buffer_unordered(BATCH_CONCURRENCY)
        .try_collect::<()>();
    let singles = futures::stream::iter(large)
        .map(|(h, source)| {
            let bar = bar.clone();
            async move {
                upload_one(client, ws, h, source).await?;
                bar.inc(source.size());
                anyhow::Ok(())
            }
        })
        .buffer_unordered(opts.concurrency.max(1))
        .try_collect::<()>();
    futures::try_join!(batches, singles)?;
    bar.finish_and_clear();
    Ok((n, total))
}

/// `jobs` cut into batches of at most [`BATCH_CONTENT`] content bytes and [`BATCH_BLOBS`] blobs.
fn batches(jobs: Vec<(ContentHash, &Source)>) -> Vec<Vec<(ContentHash, &Source)>> {
    let mut out: Vec<Vec<(ContentHash, &Source)>> = Vec::new();
    let mut bytes = 0;
    for job in jobs {
        let size = job.1.size();
        match out.last_mut() {
            Some(b) if b.len() < BATCH_BLOBS && bytes + size <= BATCH_CONTENT => {
                b.push(job);
                bytes += size;
            }
            _ => {
                out.push(vec![job]);
                bytes = size;
            }
        }
    }
    out
}

/// One batch: every file re-read and checked against its hash (a file that changed since it
/// was hashed stops the push, as with single uploads), encoded here in the stored format
/// (zstd where it pays, on all cores) so the gateway only verifies, then sent in one request.
/// Records the gateway refuses for size (its pack limit is lower) are sent alone instead.
async fn upload_batch(client: &Client, ws: &str, batch: Vec<(ContentHash, &Source)>) -> anyhow::Result<()> {
    let owned: Vec<(ContentHash, Source)> = batch.iter().map(|(h, s)| (*h, (*s).clone())).collect();
    let body = tokio::task::spawn_blocking(move || encode_batch(&owned)).await.context("batch encoder failed")??;
    let answer = client.put_batch(ws, Bytes::from(body)).await.context("cannot upload a batch of blobs")?;
    for refused in answer.refused {
        let Some((h, source)) = batch.iter().find(|(h, _)| *h == refused.hash) else {
            anyhow::bail!("the gateway refused blob {}, which the batch did not hold", refused.hash);
        };
        match refused.code {
            ErrorCode::PayloadTooLarge => upload_one(client, ws, *h, source).await?,
            ErrorCode::HashMismatch => return Err(PushError::ChangedWhilePushing { path: shown(source, h) }.into()),
            _ => anyhow::bail!("the gateway refused blob {h}: {}", refused.message),
        }
    }
    Ok(())
}

/// The batch body of `jobs`, each re-read and verified.
fn encode_batch(jobs: &[(ContentHash, Source)]) -> anyhow::Result<Vec<u8>> {
    use rayon::prelude::*;
    let records: Vec<Vec<u8>> = jobs
        .par_iter()
        .map(|(h, source)| {
            let content = match source {
                Source::Inline(text) => text.to_vec(),
                Source::File { path, .. } => {
                    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?
                }
            };
            if content.len() as u64 != source.size() || ContentHash::of(&content) != *h {
                return Err(PushError::ChangedWhilePushing { path: shown(source, h) }.into());
            }
            anyhow::Ok(blob::encode(&content))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut w = BatchWriter::new();
    for ((h, _), stored) in jobs.iter().zip(&records) {
        w.push(h, stored);
    }
    Ok(w.finish())
}

/// How a source is named in messages.
fn shown(source: &Source, hash: &ContentHash) -> String {
    match source {
        Source::File { path, .. } => path.display().to_string(),
        Source::Inline(_) => format!("symlink text {hash}"),
    }
}

async fn upload_one(client: &Client, ws: &str, hash: ContentHash, source: &Source) -> anyhow::Result<()> {
    let (result, path) = match source {
        Source::Inline(text) => (client.put_blob(ws, &hash, text.clone()).await, None),
        Source::File { path, size } if *size < SMALL_UPLOAD => {
            let shown = path.display().to_string();
            let data = tokio::fs::read(path).await.with_context(|| format!("cannot read {shown}"))?;
            if data.len() as u64 != *size || ContentHash::of(&data) != hash {
                return Err(PushError::ChangedWhilePushing { path: shown }.into());
            }
            (client.put_blob(ws, &hash, Bytes::from(data)).await, Some(shown))
        }
        Source::File { path, size } => {
            (client.put_blob_file(ws, &hash, path, *size).await, Some(path.display().to_string()))
        }
    };
    match result {
        Ok(_) => Ok(()),
        Err(ClientError::Api { code: ErrorCode::HashMismatch, .. }) => {
            Err(PushError::ChangedWhilePushing { path: path.unwrap_or_else(|| format!("symlink text {hash}")) }.into())
        }
        Err(e) => Err(e).with_context(|| match path {
            Some(p) => format!("cannot upload {p}"),
            None => format!("cannot upload blob {hash}"),
        }),
    }
}
