//! `podfs push WORKSPACE DIR`: commit a local directory as the workspace's next version.
//!
//! Steps: scan and hash the directory (rayon, on a blocking thread) and, as each chunk of
//! 2,048 paths is hashed, ask which of its blobs the gateway lacks and upload only those, while
//! the scan goes on: small content in batches the gateway stores as packs (encoded here,
//! several batches at once), larger content one PUT each (from memory up to 1 MiB, else
//! streamed from disk). Then fetch the head manifest, compute the change list and commit with
//! the head as parent. Nothing changed: no commit. A head that moved meanwhile:
//! [`PushError::Conflict`].

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use podfs_client::{Client, Error as ClientError};
use podfs_protocol::api::{CommitRequest, ErrorCode};
use podfs_protocol::blob;
use podfs_protocol::pack::BatchWriter;
use podfs_protocol::{ContentHash, Entry, EntryKind, VersionRef};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

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

    // Uploads start while the tree is still being hashed: each chunk of hashed content is
    // checked against the gateway (`blobs/missing`) and what it lacks is sent at once. Content
    // the head already holds is never missing, so uploading before the change list is known
    // sends nothing a push after it would not.
    let bar = progress::bytes_bar(opts.progress, 0, "uploading");
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<(ContentHash, Source)>>(4);
    let root = dir.to_path_buf();
    let scanning = tokio::task::spawn_blocking(move || {
        scan::scan_with(&root, |chunk| {
            // a closed channel means the uploads failed: the scan result no longer matters
            let _ = tx.blocking_send(chunk);
        })
    });
    let uploads = upload_as_scanned(client, ws, rx, &opts, &bar);
    let (tree, uploaded) = tokio::join!(scanning, uploads);
    let tree = tree.context("scan task failed")??;
    let (uploaded_blobs, uploaded_bytes) = uploaded?;
    bar.finish_and_clear();

    let remote = remote_tree(client, ws, head).await?;
    let changes = compute_changes(&tree.entries, &remote);
    let mut report = PushReport {
        workspace: ws.to_string(),
        version: head,
        parent: head,
        up_to_date: changes.is_empty(),
        changes: changes.len() as u64,
        uploaded_blobs,
        uploaded_bytes,
        files: count(&tree.entries, EntryKind::File),
        symlinks: count(&tree.entries, EntryKind::Symlink),
        dirs: count(&tree.entries, EntryKind::Dir),
        skipped: tree.skipped.len() as u64,
    };
    if changes.is_empty() {
        return Ok(report);
    }

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

/// Uploads the `missing` blobs; returns how many and their content bytes.
pub(crate) async fn upload(
    client: &Client,
    ws: &str,
    sources: &Sources,
    missing: &[ContentHash],
    opts: &PushOptions,
) -> anyhow::Result<(u64, u64)> {
    let bar = progress::bytes_bar(opts.progress, 0, "uploading");
    let mut up = Uploader::new(client, ws, opts, &bar);
    for h in missing {
        let source =
            sources.get(h).with_context(|| format!("the gateway asked for blob {h}, which this push does not hold"))?;
        up.add(*h, source.clone())?;
    }
    let done = up.finish().await?;
    bar.finish_and_clear();
    Ok(done)
}

/// Uploads what the gateway lacks of each chunk of `chunks` as it arrives (each content once).
/// Returns how many blobs and content bytes were uploaded.
async fn upload_as_scanned(
    client: &Client,
    ws: &str,
    mut chunks: tokio::sync::mpsc::Receiver<Vec<(ContentHash, Source)>>,
    opts: &PushOptions,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<(u64, u64)> {
    let mut up = Uploader::new(client, ws, opts, bar);
    let mut seen = HashSet::new();
    while let Some(chunk) = chunks.recv().await {
        let fresh: Vec<(ContentHash, Source)> = chunk.into_iter().filter(|(h, _)| seen.insert(*h)).collect();
        let hashes: Vec<ContentHash> = fresh.iter().map(|(h, _)| *h).collect();
        let missing = missing_set(client, ws, &hashes).await?;
        for (h, source) in fresh.into_iter().filter(|(h, _)| missing.contains(h)) {
            up.add(h, source)?;
        }
    }
    up.finish().await
}

/// The hashes of `hashes` the gateway lacks.
pub(crate) async fn missing_set(
    client: &Client,
    ws: &str,
    hashes: &[ContentHash],
) -> anyhow::Result<HashSet<ContentHash>> {
    let missing = client.missing_blobs(ws, hashes).await.context("cannot ask the gateway which blobs it lacks")?;
    Ok(missing.into_iter().collect())
}

/// Uploads started as blobs are added: content up to [`BATCH_BLOB_LIMIT`] gathered into
/// batches of at most [`BATCH_CONTENT`] bytes and [`BATCH_BLOBS`] blobs ([`upload_batch`],
/// [`BATCH_CONCURRENCY`] at once), larger content one PUT each (the push's concurrency).
struct Uploader {
    client: Client,
    ws: String,
    bar: indicatif::ProgressBar,
    batches: Arc<Semaphore>,
    singles: Arc<Semaphore>,
    running: JoinSet<anyhow::Result<()>>,
    pending: Vec<(ContentHash, Source)>,
    pending_bytes: u64,
    /// Blobs and content bytes added.
    added: (u64, u64),
}

impl Uploader {
    fn new(client: &Client, ws: &str, opts: &PushOptions, bar: &indicatif::ProgressBar) -> Self {
        Self {
            client: client.clone(),
            ws: ws.to_string(),
            bar: bar.clone(),
            batches: Arc::new(Semaphore::new(BATCH_CONCURRENCY)),
            singles: Arc::new(Semaphore::new(opts.concurrency.max(1))),
            running: JoinSet::new(),
            pending: Vec::new(),
            pending_bytes: 0,
            added: (0, 0),
        }
    }

    /// Schedules the upload of `source` (named `hash`); fails early with the error of an
    /// upload that already failed.
    fn add(&mut self, hash: ContentHash, source: Source) -> anyhow::Result<()> {
        let size = source.size();
        self.added = (self.added.0 + 1, self.added.1 + size);
        self.bar.inc_length(size);
        if size > BATCH_BLOB_LIMIT {
            self.spawn(Job::Single(hash, source));
        } else {
            if self.pending.len() >= BATCH_BLOBS || self.pending_bytes + size > BATCH_CONTENT {
                let full = Job::Batch(std::mem::take(&mut self.pending));
                self.spawn(full);
                self.pending_bytes = 0;
            }
            self.pending.push((hash, source));
            self.pending_bytes += size;
        }
        while let Some(done) = self.running.try_join_next() {
            done.context("upload task failed")??;
        }
        Ok(())
    }

    fn spawn(&mut self, job: Job) {
        let permits = Arc::clone(match job {
            Job::Batch(_) => &self.batches,
            Job::Single(..) => &self.singles,
        });
        let (client, ws, bar) = (self.client.clone(), self.ws.clone(), self.bar.clone());
        self.running.spawn(async move {
            let _permit = permits.acquire_owned().await?;
            let bytes = job.bytes();
            match job {
                Job::Batch(batch) => upload_batch(&client, &ws, batch).await?,
                Job::Single(h, source) => upload_one(&client, &ws, h, &source).await?,
            }
            bar.inc(bytes);
            anyhow::Ok(())
        });
    }

    /// Sends the last batch and waits for every upload; returns blobs and content bytes. The
    /// first failure is the answer (the other uploads are dropped with the set).
    async fn finish(mut self) -> anyhow::Result<(u64, u64)> {
        if !self.pending.is_empty() {
            let last = Job::Batch(std::mem::take(&mut self.pending));
            self.spawn(last);
        }
        while let Some(done) = self.running.join_next().await {
            done.context("upload task failed")??;
        }
        Ok(self.added)
    }
}

/// One upload of an [`Uploader`].
enum Job {
    Batch(Vec<(ContentHash, Source)>),
    Single(ContentHash, Source),
}

impl Job {
    fn bytes(&self) -> u64 {
        match self {
            Job::Batch(b) => b.iter().map(|(_, s)| s.size()).sum(),
            Job::Single(_, s) => s.size(),
        }
    }
}

/// One batch: every blob the scan did not keep in memory re-read and checked against its hash
/// (a file that changed since it was hashed stops the push, as with single uploads), encoded
/// here in the stored format (zstd where it pays, on all cores) so the gateway only verifies,
/// then sent in one request.
/// Records the gateway refuses for size (its pack limit is lower) are sent alone instead.
async fn upload_batch(client: &Client, ws: &str, batch: Vec<(ContentHash, Source)>) -> anyhow::Result<()> {
    let (body, batch) = tokio::task::spawn_blocking(move || encode_batch(&batch).map(|body| (body, batch)))
        .await
        .context("batch encoder failed")??;
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
            match source {
                // the very bytes that were hashed
                Source::Inline(content) => anyhow::Ok(blob::encode(content)),
                Source::File { path, .. } => {
                    let content = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
                    if content.len() as u64 != source.size() || ContentHash::of(&content) != *h {
                        return Err(PushError::ChangedWhilePushing { path: shown(source, h) }.into());
                    }
                    anyhow::Ok(blob::encode(&content))
                }
            }
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
