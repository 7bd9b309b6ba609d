//! Building and storing manifest.sqlite files (see `docs/manifest-format.md`).
//!
//! Cost follows the change, not the workspace:
//! - A commit never builds anything. A version's manifest is built the first time it is asked
//!   for, once: concurrent requests in this process wait on one build (a per-version lock),
//!   and gateway replicas coordinate through a claim row in `manifest_builds` (the others poll
//!   for the result; a claim older than [`BUILD_LEASE`] is taken over).
//! - A build starts from the newest earlier manifest when there is one and the diff to it is
//!   small: it decompresses that file, applies the diff and fetches only the changed small
//!   files from the blob store. Otherwise (first build, or a diff touching more than half of
//!   the entries) it builds from the tree and every small file.
//! - A client that already holds version N asks for a *delta* (`?since=N`): built on the fly
//!   from the diff, never stored, O(changes) to build and to move.
//!
//! Stored at `manifests/<2 hex>/<hash>.sqlite.zst` (content-addressed: two replicas that both
//! finish store the same name). Reads of the stored frame are verified as they stream
//! ([`verified_stream`]); clients verify the decompressed file against the stated hash.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use podfs_manifest::transfer::{self, Compressed};
use podfs_manifest::{Header, Kind, Writer};
use podfs_protocol::{ContentHash, Entry, EntryKind};
use tokio::sync::mpsc;

use crate::error::Error;
use crate::meta::{DiffKind, ManifestRow, MetaStore, WorkspaceRow};
use crate::store::{BlobService, ByteStream};

/// How long a replica's claim on a build holds before another replica may take it over.
pub const BUILD_LEASE: Duration = Duration::from_secs(120);
/// How often a replica waiting on another's build looks for the result.
const POLL: Duration = Duration::from_millis(200);
/// Messages queued for the SQLite writer thread. A message of blobs holds at most one merged
/// range (up to 32 MiB stored), so this bounds what waits for the writer.
const WRITER_QUEUE: usize = 4;
/// Entries (or deletions) per message to the writer.
const OPS_PER_MESSAGE: usize = 1024;

/// The store key of a manifest whose SQLite file hashes to `hash`.
pub fn key(hash: &ContentHash) -> String {
    let hex = hash.to_hex();
    format!("manifests/{}/{hex}.sqlite.zst", &hex[..2])
}

/// Held while this process builds one version's manifest.
type BuildLock = Arc<tokio::sync::Mutex<()>>;

#[derive(Clone)]
pub struct ManifestService {
    meta: MetaStore,
    blobs: BlobService,
    spool: PathBuf,
    small_file_limit: u64,
    /// Identifies this process in `manifest_builds`.
    owner: String,
    building: Arc<Mutex<HashMap<(i64, u64), BuildLock>>>,
}

/// A version's manifest: its row, and when this very call built it, the stored frame it just
/// wrote (already durable in the blob store and recorded), so the first answer is served from
/// local disk instead of a GET of what was just PUT.
pub struct Manifest {
    pub row: ManifestRow,
    /// The stored frame, unlinked (gone when dropped).
    pub frame: Option<std::fs::File>,
}

/// A delta manifest ready to send: its file (unlinked when dropped) and figures.
pub struct Delta {
    pub file: std::fs::File,
    pub compressed: Compressed,
    _dir: tempfile::TempDir,
}

/// What the writer thread is told: batches, so that the thread wakes once per batch, not per
/// entry.
enum Msg {
    Ops(Vec<Op>),
    /// Verified bytes of small files (one merged range of a pack, or one loose blob).
    Blobs(Vec<(ContentHash, Bytes)>),
}

impl ManifestService {
    pub fn new(meta: MetaStore, blobs: BlobService, spool: PathBuf, small_file_limit: u64) -> Self {
        let owner = format!("{}-{}", std::process::id(), hex::encode(rand::random::<[u8; 8]>()));
        // small files are read into memory; the blob service spools anything larger
        let small_file_limit = small_file_limit.min(crate::store::blobs::MEMORY_LIMIT);
        Self { meta, blobs, spool, small_file_limit, owner, building: Arc::default() }
    }

    /// The manifest of version `v`, built first if it does not exist yet.
    pub async fn get_or_build(&self, ws: &WorkspaceRow, v: u64) -> Result<Manifest, Error> {
        if let Some(row) = self.meta.manifest(ws.id, v).await? {
            return Ok(Manifest { row, frame: None });
        }
        let lock = {
            let mut map = self.building.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(map.entry((ws.id, v)).or_default())
        };
        let result = {
            let _held = lock.lock().await;
            self.build_once(ws, v).await
        };
        let mut map = self.building.lock().unwrap_or_else(|e| e.into_inner());
        if Arc::strong_count(&lock) <= 2 {
            map.remove(&(ws.id, v));
        }
        result
    }

    /// Under this process's lock: look again, then claim across replicas and build, or wait
    /// for the replica that holds the claim.
    async fn build_once(&self, ws: &WorkspaceRow, v: u64) -> Result<Manifest, Error> {
        let lease_ms = BUILD_LEASE.as_millis() as i64;
        let deadline = Instant::now() + BUILD_LEASE + Duration::from_secs(30);
        loop {
            if let Some(row) = self.meta.manifest(ws.id, v).await? {
                return Ok(Manifest { row, frame: None });
            }
            if self.meta.claim_manifest_build(ws.id, v, &self.owner, lease_ms).await? {
                let built = self.build(ws, v).await;
                // a failed release leaves a claim that expires with its lease
                let _ = self.meta.release_manifest_build(ws.id, v, &self.owner).await;
                return built;
            }
            if Instant::now() > deadline {
                return Err(Error::Busy(format!(
                    "another gateway has been building the manifest of {}@{v} for too long; retry",
                    ws.info.name
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn build(&self, ws: &WorkspaceRow, v: u64) -> Result<Manifest, Error> {
        let started = Instant::now();
        let header = Header {
            workspace: ws.info.name.clone(),
            version: v,
            kind: Kind::Full,
            small_file_limit: self.small_file_limit,
        };
        let dir = tempfile::tempdir_in(&self.spool).map_err(Error::scratch("creating a manifest scratch dir"))?;
        let path = dir.path().join("manifest.sqlite");
        let base = match self.meta.manifest_before(ws.id, v).await? {
            Some(b) if b.small_file_limit == self.small_file_limit => {
                let diff = self.meta.diff(ws.id, b.version, v).await?;
                (diff.len() as u64 * 2 <= b.entries).then_some((b, diff))
            }
            _ => None,
        };
        let base_version = base.as_ref().map(|(b, _)| b.version);
        let (writer, tx) = match base {
            Some((b, diff)) => {
                let frame = dir.path().join("base.sqlite.zst");
                self.download(&b, &frame).await?;
                let (path, header) = (path.clone(), header.clone());
                let (b_hash, b_size) = (b.hash, b.size);
                let (tx, writer) = spawn_writer(false, move || {
                    let src = std::io::BufReader::new(std::fs::File::open(&frame)?);
                    let out = std::io::BufWriter::new(std::fs::File::create(&path)?);
                    transfer::decompress_verified(src, &b_hash, b_size, out)?;
                    std::fs::remove_file(&frame)?;
                    Writer::modify(&path, &header)
                });
                self.feed(tx.clone(), ops_of(diff, false)).await?;
                (writer, tx)
            }
            None => {
                let (path, header) = (path.clone(), header.clone());
                let (tx, writer) = spawn_writer(false, move || Writer::create(&path, &header));
                let tree = self.meta.tree_all(ws.id, v).await?;
                self.feed(tx.clone(), tree.into_iter().map(Op::Put).collect()).await?;
                (writer, tx)
            }
        };
        drop(tx);
        let frame = dir.path().join("manifest.sqlite.zst");
        let (compressed, (entries, blobs)) = writer.compress(path, frame.clone()).await?;
        self.blobs.backend().put_file(&key(&compressed.hash), &frame).await?;
        // open before the scratch dir goes: the open file outlives its name
        let frame = std::fs::File::open(&frame).map_err(manifest_io)?;
        let row = ManifestRow {
            version: v,
            hash: compressed.hash,
            size: compressed.size,
            stored_hash: compressed.stored_hash,
            stored_size: compressed.stored_size,
            entries,
            blobs,
            base_version,
            small_file_limit: self.small_file_limit,
            build_ms: started.elapsed().as_millis() as u64,
        };
        let row = self.meta.record_manifest(ws.id, &row).await?;
        let kind = if base_version.is_some() { "derived" } else { "full" };
        metrics::counter!("podfs_manifest_builds_total", "kind" => kind).increment(1);
        metrics::histogram!("podfs_manifest_build_seconds", "kind" => kind).record(started.elapsed().as_secs_f64());
        tracing::info!(workspace = %ws.info.name, version = v, kind, base = ?base_version, entries, blobs,
            bytes = compressed.size, stored = compressed.stored_size, ms = row.build_ms, "manifest built");
        Ok(Manifest { row, frame: Some(frame) })
    }

    /// The changes from `since` to `v` as a delta manifest (not stored).
    pub async fn delta(&self, ws: &WorkspaceRow, since: u64, v: u64) -> Result<Delta, Error> {
        let diff = self.meta.diff(ws.id, since, v).await?;
        let header = Header {
            workspace: ws.info.name.clone(),
            version: v,
            kind: Kind::Delta { base: since },
            small_file_limit: self.small_file_limit,
        };
        let dir = tempfile::tempdir_in(&self.spool).map_err(Error::scratch("creating a manifest scratch dir"))?;
        let path = dir.path().join("delta.sqlite");
        let (tx, writer) = {
            let path = path.clone();
            spawn_writer(true, move || Writer::create(&path, &header))
        };
        self.feed(tx.clone(), ops_of(diff, true)).await?;
        drop(tx);
        let frame = dir.path().join("delta.sqlite.zst");
        let (compressed, _) = writer.compress(path, frame.clone()).await?;
        let file = std::fs::File::open(&frame).map_err(manifest_io)?;
        Ok(Delta { file, compressed, _dir: dir })
    }

    /// Sends entries and deletions to the writer while the bytes of every small file among the
    /// entries are fetched (each distinct content once, verified: packed ones as merged ranges
    /// of their packs, see [`BlobService::read_small`]) and sent after them. `ops` are all in
    /// memory (a tree of 50,000 files is a few MB of rows).
    async fn feed(&self, tx: mpsc::Sender<Msg>, ops: Vec<Op>) -> Result<(), Error> {
        let limit = self.small_file_limit;
        let mut seen = std::collections::HashSet::new();
        let small: Vec<ContentHash> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Put(e) if e.kind != EntryKind::Dir && e.size <= limit => e.hash,
                _ => None,
            })
            .filter(|h| seen.insert(*h))
            .collect();
        let entries = async {
            let mut ops = ops.into_iter().peekable();
            while ops.peek().is_some() {
                let batch: Vec<Op> = ops.by_ref().take(OPS_PER_MESSAGE).collect();
                tx.send(Msg::Ops(batch)).await.map_err(|_| writer_gone())?;
            }
            Ok::<_, Error>(())
        };
        let blobs = async {
            let reads = self.blobs.read_small(small);
            futures::pin_mut!(reads);
            while let Some(blobs) = reads.try_next().await? {
                tx.send(Msg::Blobs(blobs)).await.map_err(|_| writer_gone())?;
            }
            Ok(())
        };
        futures::try_join!(entries, blobs)?;
        Ok(())
    }

    /// Downloads the stored frame of `m` into `to`, verified as it arrives.
    async fn download(&self, m: &ManifestRow, to: &Path) -> Result<(), Error> {
        use tokio::io::AsyncWriteExt;
        let mut stream = self.stored(m).await?;
        let mut file = tokio::fs::File::create(to).await.map_err(manifest_io)?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|source| Error::StoreRead { what: format!("manifest {}", m.hash), source })?;
            file.write_all(&chunk).await.map_err(manifest_io)?;
        }
        file.flush().await.map_err(manifest_io)?;
        Ok(())
    }

    /// The stored frame of `m`, from the local copy its build left when there is one, else from
    /// the blob store; either way checked against the recorded hash and length as it streams.
    pub async fn frame(&self, m: Manifest) -> Result<ByteStream, Error> {
        match m.frame {
            Some(file) => Ok(verified_stream(file_stream(file), m.row.stored_hash, m.row.stored_size)),
            None => self.stored(&m.row).await,
        }
    }

    /// The stored frame of `m`, streamed and checked against its recorded hash and length; a
    /// mismatch ends the stream with an error (a client sees a broken transfer, never a
    /// complete wrong file).
    pub async fn stored(&self, m: &ManifestRow) -> Result<ByteStream, Error> {
        let stream = self.blobs.backend().get(&key(&m.hash)).await.map_err(|e| match e {
            crate::store::StoreError::NotFound(_) => {
                Error::Corrupt(format!("manifest {} is recorded but missing from the blob store", m.hash))
            }
            other => other.into(),
        })?;
        Ok(verified_stream(stream, m.stored_hash, m.stored_size))
    }
}

/// A diff as writer operations; `with_old` adds what each changed path held before (deltas).
fn ops_of(diff: Vec<crate::meta::DiffEntry>, with_old: bool) -> Vec<Op> {
    let mut ops = Vec::with_capacity(diff.len());
    for d in diff {
        if with_old && let Some(old) = d.old {
            ops.push(Op::Replaced(old));
        }
        ops.push(match (d.change, d.new) {
            (DiffKind::Deleted, _) | (_, None) => Op::Delete(d.path),
            (_, Some(e)) => Op::Put(e),
        });
    }
    ops
}

/// An entry to put, or a path to delete.
enum Op {
    Put(Entry),
    Delete(String),
    Replaced(Entry),
}

/// The SQLite side of a build: a thread owning the [`Writer`], fed through a bounded channel.
struct WriterThread(std::thread::JoinHandle<Result<(u64, u64), Error>>);

impl WriterThread {
    /// Waits for the writer to finish the SQLite file at `path` (all senders dropped), then
    /// compresses it into `frame`. Returns the figures and (entries, blobs) of the file.
    async fn compress(self, path: PathBuf, frame: PathBuf) -> Result<(Compressed, (u64, u64)), Error> {
        tokio::task::spawn_blocking(move || -> Result<_, Error> {
            let counts = self.0.join().map_err(|_| Error::Internal("the manifest writer thread panicked".into()))??;
            let out = std::io::BufWriter::new(std::fs::File::create(&frame).map_err(manifest_io)?);
            Ok((transfer::compress(&path, out).map_err(manifest_err)?, counts))
        })
        .await
        .map_err(|source| Error::Task { what: "compressing a manifest".into(), source })?
    }
}

/// `record_deletes`: list deleted paths in the `deleted` table (a delta); a full manifest
/// only drops their entries.
fn spawn_writer(
    record_deletes: bool,
    open: impl FnOnce() -> podfs_manifest::Result<Writer> + Send + 'static,
) -> (mpsc::Sender<Msg>, WriterThread) {
    let (tx, mut rx) = mpsc::channel::<Msg>(WRITER_QUEUE);
    let handle = std::thread::spawn(move || -> Result<(u64, u64), Error> {
        let mut w = open().map_err(manifest_err)?;
        while let Some(msg) = rx.blocking_recv() {
            match msg {
                Msg::Ops(ops) => ops.iter().try_for_each(|op| match op {
                    Op::Put(e) => w.put_entry(e),
                    Op::Delete(p) => w.delete_entry(p, record_deletes),
                    Op::Replaced(e) => w.put_replaced(e),
                }),
                Msg::Blobs(blobs) => blobs.iter().try_for_each(|(h, b)| w.put_blob(h, b)),
            }
            .map_err(manifest_err)?;
        }
        w.drop_unreferenced_blobs().map_err(manifest_err)?;
        let counts = w.counts().map_err(manifest_err)?;
        w.finish().map_err(manifest_err)?;
        Ok(counts)
    });
    (tx, WriterThread(handle))
}

fn writer_gone() -> Error {
    Error::Internal("the manifest writer stopped early".into())
}

/// A manifest error; a stored manifest failing verification is told apart by the status mapping.
fn manifest_err(source: podfs_manifest::Error) -> Error {
    let what = match source {
        podfs_manifest::Error::FileMismatch { .. } | podfs_manifest::Error::SizeMismatch { .. } => {
            "a stored manifest failed verification"
        }
        _ => "building a manifest",
    };
    Error::Manifest { what: what.into(), source }
}

fn manifest_io(source: std::io::Error) -> Error {
    Error::Scratch { what: "writing a manifest scratch file".into(), source }
}

/// The bytes of a local scratch file (a built frame or a delta), read from its start.
pub fn file_stream(file: std::fs::File) -> ByteStream {
    Box::pin(tokio_util::io::ReaderStream::with_capacity(tokio::fs::File::from_std(file), 256 * 1024))
}

/// `stream`, hashed as it passes; ends with an error unless it was exactly `len` bytes that
/// hash to `hash`.
pub fn verified_stream(stream: ByteStream, hash: ContentHash, len: u64) -> ByteStream {
    let state = (stream, blake3::Hasher::new(), 0u64, false);
    Box::pin(futures::stream::unfold(state, move |(mut s, mut hasher, mut n, done)| async move {
        if done {
            return None;
        }
        match s.next().await {
            Some(Ok(chunk)) => {
                hasher.update(&chunk);
                n += chunk.len() as u64;
                if n > len {
                    let e = std::io::Error::other(format!("stored manifest {hash} is longer than recorded"));
                    return Some((Err(e), (s, hasher, n, true)));
                }
                Some((Ok(chunk), (s, hasher, n, false)))
            }
            Some(Err(e)) => Some((Err(e), (s, hasher, n, true))),
            None => {
                let actual = ContentHash::from(hasher.finalize());
                if n == len && actual == hash {
                    None
                } else {
                    metrics::counter!("podfs_blob_hash_mismatch_total").increment(1);
                    tracing::error!(%hash, %actual, n, len, "stored manifest frame failed verification");
                    let e = std::io::Error::other(format!("stored manifest frame {hash} failed verification"));
                    Some((Err(e), (s, hasher, n, true)))
                }
            }
        }
    }))
}
