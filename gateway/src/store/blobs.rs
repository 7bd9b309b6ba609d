//! Content-addressed blobs above the backends: names, hashing, compression, verification.
//!
//! Uploads are hashed while they arrive (small ones in memory, large ones spooled to a
//! temporary file), refused when the content does not match the claimed name, encoded in the
//! stored blob format (zstd when it saves space) and only then recorded in the metadata store,
//! which is what makes them referenceable by a commit. Reads decode and verify every byte
//! before handing content out. This module does not decide who may do what (the API does).
//!
//! Small content (up to the pack limit) arrives in batches ([`BlobService::ingest_batch`]) and
//! is stored in packs (`docs/pack-format.md`): the accepted records of a batch, already in the
//! stored encoding the client chose, are concatenated into packs of about 16 MiB, each PUT once
//! and then recorded with all its blobs in one transaction. Reads find a blob through its row:
//! its own object, or a byte range of a pack.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt, TryStreamExt};
use podfs_protocol::ContentHash;
use podfs_protocol::api::{BatchUploaded, BlobLocation, BlobUploaded, ByteRange, ErrorCode, RefusedBlob};
use podfs_protocol::blob::{self, Codec};
use podfs_protocol::pack::{self, PackWriter, RecordError};
use tokio::io::AsyncWriteExt;

use super::{BlobBackend, ByteStream, StoreError};
use crate::error::Error;
use crate::meta::{BlobRow, MetaStore, NewPack};

/// Content at most this large is handled in memory; larger content goes through temp files.
pub const MEMORY_LIMIT: u64 = 4 << 20;
/// What the upload spool's errors are about.
const SPOOL: &str = "spooling an upload";

/// The store key of a blob: `blobs/<first two hex digits>/<hash>`.
pub fn key(hash: &ContentHash) -> String {
    let hex = hash.to_hex();
    format!("blobs/{}/{hex}", &hex[..2])
}

/// The store key of a pack: `packs/<first two hex digits>/<hash of the pack>`.
pub fn pack_key(hash: &ContentHash) -> String {
    let hex = hash.to_hex();
    format!("packs/{}/{hex}", &hex[..2])
}

/// Packs of one batch PUT at once.
const PACK_PUTS: usize = 4;
/// Packed reads of a manifest build: ranges apart by less than this are fetched as one.
pub const MERGE_GAP: u64 = 1 << 20;
/// ...up to this many bytes per merged range.
pub const MERGE_MAX: u64 = 32 << 20;
/// Merged ranges in flight during a build.
const RANGE_FETCHES: usize = 4;
/// Loose small blobs in flight during a build.
const LOOSE_FETCHES: usize = 64;

/// Verified content, ready to serve.
pub enum Content {
    Memory(Bytes),
    /// An anonymous temporary file holding the content (gone when dropped).
    File {
        file: std::fs::File,
        len: u64,
    },
}

impl Content {
    pub fn len(&self) -> u64 {
        match self {
            Content::Memory(b) => b.len() as u64,
            Content::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Streams `range` (start, end exclusive) of the content.
    pub fn stream_range(self, start: u64, end: u64) -> ByteStream {
        match self {
            Content::Memory(b) => {
                let part = b.slice(start as usize..end as usize);
                Box::pin(futures::stream::once(async move { Ok(part) }))
            }
            Content::File { mut file, .. } => {
                let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = file.seek(SeekFrom::Start(start)) {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                    let mut left = end - start;
                    let mut buf = vec![0u8; 256 * 1024];
                    while left > 0 {
                        let want = buf.len().min(left as usize);
                        match file.read(&mut buf[..want]) {
                            Ok(0) => break,
                            Ok(n) => {
                                left -= n as u64;
                                if tx.blocking_send(Ok(Bytes::copy_from_slice(&buf[..n]))).is_err() {
                                    return;
                                }
                            }
                            Err(e) => {
                                let _ = tx.blocking_send(Err(e));
                                return;
                            }
                        }
                    }
                });
                Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
            }
        }
    }
}

/// The limits and switches of a [`BlobService`].
#[derive(Debug, Clone, Copy)]
pub struct BlobOptions {
    /// Largest content accepted.
    pub max_blob_size: u64,
    /// How long presigned URLs stay valid.
    pub presign_ttl: Duration,
    /// Content up to this size is accepted in batches and stored in packs.
    pub pack_blob_limit: u64,
    /// Presign byte ranges of packs (false: the gateway serves packed blobs itself).
    pub presign_ranges: bool,
}

#[derive(Clone)]
pub struct BlobService {
    backend: Arc<dyn BlobBackend>,
    meta: MetaStore,
    spool: PathBuf,
    opts: BlobOptions,
}

enum Spool {
    Memory(BytesMut),
    File(tokio::fs::File, tempfile::TempPath),
}

impl BlobService {
    pub fn new(backend: Arc<dyn BlobBackend>, meta: MetaStore, spool: PathBuf, opts: BlobOptions) -> Self {
        Self { backend, meta, spool, opts }
    }

    pub fn backend(&self) -> &Arc<dyn BlobBackend> {
        &self.backend
    }

    pub fn presign_ttl(&self) -> Duration {
        self.opts.presign_ttl
    }

    /// Receives content claimed to hash to `hash`, verifies it, stores it and records it.
    pub async fn ingest<S, E>(&self, hash: ContentHash, mut body: S) -> Result<BlobUploaded, Error>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let mut hasher = blake3::Hasher::new();
        let mut len = 0u64;
        let mut spool = Spool::Memory(BytesMut::new());
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| Error::BadRequest(format!("reading the upload body: {e}")))?;
            len += chunk.len() as u64;
            if len > self.opts.max_blob_size {
                let limit = self.opts.max_blob_size;
                return Err(Error::TooLarge(format!("blob is larger than the limit of {limit} bytes")));
            }
            hasher.update(&chunk);
            match &mut spool {
                Spool::Memory(buf) if len <= MEMORY_LIMIT => buf.extend_from_slice(&chunk),
                Spool::Memory(buf) => {
                    let (file, path) =
                        tempfile::NamedTempFile::new_in(&self.spool).map_err(Error::scratch(SPOOL))?.into_parts();
                    let mut file = tokio::fs::File::from_std(file);
                    file.write_all(buf).await.map_err(Error::scratch(SPOOL))?;
                    file.write_all(&chunk).await.map_err(Error::scratch(SPOOL))?;
                    spool = Spool::File(file, path);
                }
                Spool::File(file, _) => file.write_all(&chunk).await.map_err(Error::scratch(SPOOL))?,
            }
        }
        let actual = ContentHash::from(hasher.finalize());
        if actual != hash {
            metrics::counter!("podfs_blob_hash_mismatch_total").increment(1);
            return Err(Error::HashMismatch(format!(
                "uploaded content hashes to {actual}, not to the blob name {hash}; nothing was stored"
            )));
        }
        if self.meta.missing_blobs(&[hash]).await?.is_empty() {
            metrics::counter!("podfs_blob_dedup_hits_total").increment(1);
            return Ok(BlobUploaded { hash, size: len, stored_size: 0, created: false });
        }
        let key = key(&hash);
        let stored_size = match spool {
            Spool::Memory(buf) => {
                let encoded = blocking("encoding an upload", move || Ok(blob::encode(&buf))).await?;
                let n = encoded.len() as u64;
                self.backend.put_bytes(&key, Bytes::from(encoded)).await?;
                n
            }
            Spool::File(mut file, path) => {
                file.flush().await.map_err(Error::scratch(SPOOL))?;
                let file = file.into_std().await;
                let spool_dir = self.spool.clone();
                let (encoded, n) = blocking("encoding an upload", move || {
                    let mut file = file;
                    let io = Error::scratch("encoding an upload");
                    let mut sample = vec![0u8; blob::SAMPLE_LEN.min(len as usize)];
                    file.seek(SeekFrom::Start(0)).map_err(&io)?;
                    file.read_exact(&mut sample).map_err(&io)?;
                    let codec = if blob::worth_compressing(&sample) { Codec::Zstd } else { Codec::Raw };
                    file.seek(SeekFrom::Start(0)).map_err(&io)?;
                    let out = tempfile::NamedTempFile::new_in(&spool_dir).map_err(&io)?;
                    let n = blob::encode_to(
                        std::io::BufReader::new(file),
                        len,
                        codec,
                        std::io::BufWriter::new(out.as_file()),
                    )
                    .map_err(|e| match e {
                        blob::BlobError::Io(source) => Error::Scratch { what: "encoding an upload".into(), source },
                        other => Error::Internal(format!("encoding an upload of {len} bytes: {other}")),
                    })?;
                    Ok((out.into_temp_path(), n))
                })
                .await?;
                drop(path);
                self.backend.put_file(&key, &encoded).await?;
                n
            }
        };
        let created = self.meta.record_blob(&hash, len, stored_size).await?;
        metrics::counter!("podfs_blob_uploaded_bytes_total").increment(len);
        metrics::counter!("podfs_blob_stored_bytes_total").increment(stored_size);
        Ok(BlobUploaded { hash, size: len, stored_size, created })
    }

    /// Receives a batch of small blobs (`podfs_protocol::pack`'s batch body), verifies every
    /// record, stores the accepted ones not held yet in packs and records them. A record that
    /// does not decode to its name, or holds content over the pack limit, is refused alone (and
    /// never stored); a body whose framing is broken is refused whole. Returns only after every
    /// pack is durable in the blob store and recorded.
    pub async fn ingest_batch(&self, body: Bytes) -> Result<BatchUploaded, Error> {
        let limit = self.opts.pack_blob_limit;
        let (accepted, refused, repeats, records) = blocking("verifying a batch", move || {
            let records =
                pack::read_batch(&body, blob::max_stored_len(limit)).map_err(|e| Error::BadRequest(e.to_string()))?;
            let n = records.len() as u64;
            let mut accepted = Vec::with_capacity(records.len());
            let mut refused = Vec::new();
            let mut seen = HashSet::with_capacity(records.len());
            let mut repeats = 0;
            for r in &records {
                match pack::verify_record(r, limit) {
                    Ok(size) if seen.insert(r.hash) => {
                        // offsets into the body, so the bytes are not copied here
                        let start = r.stored.as_ptr() as usize - body.as_ptr() as usize;
                        accepted.push((r.hash, size, body.slice(start..start + r.stored.len())));
                    }
                    // the same content again in this batch: stored once, a duplicate
                    Ok(_) => repeats += 1,
                    Err(e) => refused.push(refusal(r.hash, e)),
                }
            }
            Ok((accepted, refused, repeats, n))
        })
        .await?;
        metrics::histogram!("podfs_batch_blobs").record(records as f64);
        if !refused.is_empty() {
            metrics::counter!("podfs_blob_hash_mismatch_total").increment(refused.len() as u64);
        }
        let hashes: Vec<ContentHash> = accepted.iter().map(|(h, _, _)| *h).collect();
        let missing: HashSet<ContentHash> = self.meta.missing_blobs(&hashes).await?.into_iter().collect();
        let duplicates = (accepted.len() - missing.len()) as u64 + repeats;
        metrics::counter!("podfs_blob_dedup_hits_total").increment(duplicates);
        let fresh: Vec<(ContentHash, u64, Bytes)> =
            accepted.into_iter().filter(|(h, _, _)| missing.contains(h)).collect();
        let packs = blocking("building packs", move || Ok(build_packs(fresh))).await?;
        let written = futures::stream::iter(packs)
            .map(|(pack, sizes)| async move {
                let key = pack_key(&pack.hash);
                let size = pack.bytes.len() as u64;
                self.backend.put_bytes(&key, Bytes::from(pack.bytes)).await?;
                metrics::counter!("podfs_packs_written_total").increment(1);
                metrics::counter!("podfs_pack_bytes_total").increment(size);
                let spans = pack.spans.into_iter().zip(sizes).collect();
                Ok::<_, Error>(NewPack { hash: pack.hash, size, spans })
            })
            .buffer_unordered(PACK_PUTS)
            // every PUT runs to its end (none is cancelled half-way when another fails)
            .collect::<Vec<Result<NewPack, Error>>>()
            .await
            .into_iter()
            .collect::<Result<Vec<NewPack>, Error>>()?;
        let mut stored = 0;
        let mut stored_bytes = 0;
        let mut content_bytes = 0;
        for p in &written {
            stored += self.meta.record_pack(p).await?;
            stored_bytes += p.size;
            content_bytes += p.spans.iter().map(|(_, n)| n).sum::<u64>();
        }
        metrics::counter!("podfs_blob_uploaded_bytes_total").increment(content_bytes);
        metrics::counter!("podfs_blob_stored_bytes_total").increment(stored_bytes);
        Ok(BatchUploaded { records, stored, duplicates, packs: written.len() as u64, stored_bytes, refused })
    }

    /// The stored bytes of a blob as its row places them: its own object or a pack range.
    async fn open_stored(&self, hash: &ContentHash, row: Option<&BlobRow>) -> Result<ByteStream, StoreError> {
        match stored_at(hash, row) {
            (key, Some(range)) => self.backend.get_range(&key, range).await,
            (key, None) => self.backend.get(&key).await,
        }
    }

    /// Reads, decodes and verifies a blob of `size` content bytes.
    pub async fn read(&self, hash: &ContentHash, size: u64) -> Result<Content, Error> {
        let row = self.meta.blob_row(hash).await?;
        self.read_located(hash, size, row.as_ref()).await
    }

    /// [`Self::read`] of a blob whose row was looked up already (`None`: its own object).
    async fn read_located(&self, hash: &ContentHash, size: u64, row: Option<&BlobRow>) -> Result<Content, Error> {
        let stream = self.open_stored(hash, row).await.map_err(|e| match e {
            StoreError::NotFound(_) => {
                Error::Corrupt(format!("blob {hash} is recorded but missing from the blob store"))
            }
            other => other.into(),
        })?;
        let hash = *hash;
        if size <= MEMORY_LIMIT {
            let stored = super::read_all(stream)
                .await
                .map_err(|source| Error::StoreRead { what: format!("blob {hash}"), source })?;
            let content =
                blocking("decoding a blob", move || blob::decode(&stored, &hash).map_err(|e| verify_error(&hash, e)))
                    .await?;
            return Ok(Content::Memory(Bytes::from(content)));
        }
        let spool = self.spool.clone();
        let reader = tokio_util::io::StreamReader::new(stream);
        blocking("decoding a blob", move || {
            let io = Error::scratch(format!("spooling blob {hash}"));
            let mut out = tempfile::tempfile_in(&spool).map_err(&io)?;
            let bridge = tokio_util::io::SyncIoBridge::new(reader);
            let len = blob::decode_to(
                std::io::BufReader::with_capacity(256 * 1024, bridge),
                &hash,
                std::io::BufWriter::new(&mut out),
            )
            .map_err(|e| verify_error(&hash, e))?;
            out.seek(SeekFrom::Start(0)).map_err(Error::scratch(format!("spooling blob {hash}")))?;
            Ok(Content::File { file: out, len })
        })
        .await
    }

    /// Reads the content of many small blobs (each at most [`MEMORY_LIMIT`]), verified, in no
    /// particular order: packed ones grouped by pack, sorted by offset and fetched as merged
    /// ranges (gaps under [`MERGE_GAP`]), one GET per range; loose ones one GET each.
    pub fn read_small(
        &self,
        blobs: Vec<ContentHash>,
    ) -> impl Stream<Item = Result<Vec<(ContentHash, Bytes)>, Error>> + Send + '_ {
        futures::stream::once(async move {
            let rows = self.meta.blob_rows(&blobs).await?;
            let mut loose = Vec::new();
            let mut packed: HashMap<ContentHash, Vec<(u64, u64, ContentHash)>> = HashMap::new();
            for h in blobs {
                match rows.get(&h).and_then(BlobRow::pack_range) {
                    Some((pack, r)) => packed.entry(pack).or_default().push((r.start, r.end - r.start, h)),
                    None => loose.push(h),
                }
            }
            let mut ranges = Vec::new();
            for (pack, mut spans) in packed {
                spans.sort_unstable_by_key(|s| s.0);
                for group in merge_ranges(&spans, MERGE_GAP, MERGE_MAX) {
                    ranges.push((pack, group));
                }
            }
            metrics::counter!("podfs_manifest_blob_reads_total", "kind" => "range").increment(ranges.len() as u64);
            metrics::counter!("podfs_manifest_blob_reads_total", "kind" => "loose").increment(loose.len() as u64);
            let loose = futures::stream::iter(loose)
                .map(move |h| async move {
                    match self.read_located(&h, 0, None).await? {
                        Content::Memory(b) => Ok(vec![(h, b)]),
                        Content::File { .. } => Err(Error::Internal(format!("small blob {h} was spooled"))),
                    }
                })
                .buffer_unordered(LOOSE_FETCHES);
            let ranged = futures::stream::iter(ranges)
                .map(move |(pack, spans)| self.read_range(pack, spans))
                .buffer_unordered(RANGE_FETCHES);
            Ok::<_, Error>(futures::stream::select(loose, ranged))
        })
        .try_flatten()
    }

    /// One GET of a merged range of `pack`, then every blob in it decoded and verified.
    async fn read_range(
        &self,
        pack: ContentHash,
        spans: Vec<(u64, u64, ContentHash)>,
    ) -> Result<Vec<(ContentHash, Bytes)>, Error> {
        let start = spans.first().map_or(0, |s| s.0);
        let end = spans.last().map_or(0, |s| s.0 + s.1);
        let what = || format!("pack {pack} bytes {start}..{end}");
        let stream = self.backend.get_range(&pack_key(&pack), start..end).await.map_err(|e| match e {
            StoreError::NotFound(_) => {
                Error::Corrupt(format!("pack {pack} is recorded but missing from the blob store"))
            }
            other => other.into(),
        })?;
        let bytes = super::read_all(stream).await.map_err(|source| Error::StoreRead { what: what(), source })?;
        if bytes.len() as u64 != end - start {
            return Err(Error::Corrupt(format!("{}: the store returned {} bytes", what(), bytes.len())));
        }
        blocking("decoding packed blobs", move || {
            spans
                .into_iter()
                .map(|(offset, len, hash)| {
                    let at = (offset - start) as usize;
                    let content =
                        blob::decode(&bytes[at..at + len as usize], &hash).map_err(|e| verify_error(&hash, e))?;
                    Ok((hash, Bytes::from(content)))
                })
                .collect()
        })
        .await
    }

    /// The stored form of a blob, verified. Up to [`MEMORY_LIMIT`] stored bytes (most blobs)
    /// are verified whole before the first byte goes out, so a bad one is a clean `corrupt`
    /// answer; a larger one is verified as it streams and ends with an error in place of its
    /// last chunk.
    pub async fn stored(&self, hash: &ContentHash) -> Result<ByteStream, Error> {
        let row = self.meta.blob_row(hash).await?;
        let mut stream = self.open_stored(hash, row.as_ref()).await.map_err(|e| match e {
            StoreError::NotFound(_) => Error::NotFound(format!("blob {hash} is not stored")),
            other => other.into(),
        })?;
        let hash = *hash;
        let mut head = BytesMut::new();
        while head.len() as u64 <= MEMORY_LIMIT {
            match stream.next().await {
                Some(Ok(chunk)) => head.extend_from_slice(&chunk),
                Some(Err(source)) => return Err(Error::StoreRead { what: format!("blob {hash}"), source }),
                None => {
                    let stored = head.freeze();
                    let copy = stored.clone();
                    blocking("verifying a blob", move || {
                        blob::decode(&copy, &hash).map(drop).map_err(|e| verify_error(&hash, e))
                    })
                    .await
                    .inspect_err(|e| {
                        if matches!(e, Error::CorruptBlob { .. }) {
                            metrics::counter!("podfs_stored_corrupt_total", "kind" => "blob").increment(1);
                        }
                    })?;
                    return Ok(Box::pin(futures::stream::once(async move { Ok(stored) })));
                }
            }
        }
        let whole = futures::stream::once(async move { Ok(head.freeze()) }).chain(stream);
        Ok(verified_stored(Box::pin(whole), hash))
    }

    /// Where a client downloads each of `hashes` (each once, in order) from: a presigned URL of
    /// its object, or of exactly its range of a pack; or the gateway path `gateway_path(hash)`
    /// when the store does not presign (or ranges are not presigned).
    pub async fn locations(
        &self,
        hashes: &[ContentHash],
        gateway_path: impl Fn(&ContentHash) -> String,
    ) -> Result<Vec<BlobLocation>, Error> {
        let rows = self.meta.blob_rows(hashes).await?;
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(hashes.len());
        for h in hashes.iter().filter(|h| seen.insert(**h)) {
            let (key, range) = stored_at(h, rows.get(h));
            let presigned = if range.is_some() && !self.opts.presign_ranges {
                None
            } else {
                self.backend.presign_get(&key, range.clone(), self.opts.presign_ttl).await?
            };
            out.push(match presigned {
                Some(url) => BlobLocation { hash: *h, url, gateway: false, range: range.map(ByteRange::from) },
                None => BlobLocation { hash: *h, url: gateway_path(h), gateway: true, range: None },
            });
        }
        Ok(out)
    }
}

/// The object holding the stored bytes of `hash` and, for a packed blob, their range in it.
fn stored_at(hash: &ContentHash, row: Option<&BlobRow>) -> (String, Option<Range<u64>>) {
    match row.and_then(BlobRow::pack_range) {
        Some((pack, range)) => (pack_key(&pack), Some(range)),
        None => (key(hash), None),
    }
}

/// Why a batch record was refused, as the answer names it.
fn refusal(hash: ContentHash, e: RecordError) -> RefusedBlob {
    let code = match e {
        RecordError::TooLarge { .. } => ErrorCode::PayloadTooLarge,
        RecordError::Blob(_) => ErrorCode::HashMismatch,
    };
    RefusedBlob { hash, code, message: format!("blob {hash}: {e}; not stored") }
}

/// Packs of at most about [`pack::PACK_TARGET`] bytes holding `blobs`, in order, each with the
/// content length of every blob it holds.
fn build_packs(blobs: Vec<(ContentHash, u64, Bytes)>) -> Vec<(pack::Pack, Vec<u64>)> {
    let mut out = Vec::new();
    let mut w = PackWriter::new();
    let mut sizes = Vec::new();
    for (hash, size, stored) in blobs {
        if w.would_overflow(stored.len()) {
            out.push((std::mem::take(&mut w).finish(), std::mem::take(&mut sizes)));
        }
        w.push(hash, &stored);
        sizes.push(size);
    }
    if !w.is_empty() {
        out.push((w.finish(), sizes));
    }
    out
}

/// `spans` (offset, length, name; sorted by offset) cut into groups that are each fetched as
/// one range: a group ends where the next span starts more than `gap` bytes after it, or would
/// take the group past `max` bytes.
pub fn merge_ranges<T: Copy>(spans: &[(u64, u64, T)], gap: u64, max: u64) -> Vec<Vec<(u64, u64, T)>> {
    let mut out: Vec<Vec<(u64, u64, T)>> = Vec::new();
    let mut start = 0;
    let mut end = 0;
    for &s in spans {
        match out.last_mut() {
            Some(group) if s.0 >= end && s.0 - end <= gap && s.0 + s.1 - start <= max => {
                group.push(s);
                end = s.0 + s.1;
            }
            _ => {
                out.push(vec![s]);
                start = s.0;
                end = s.0 + s.1;
            }
        }
    }
    out
}

/// Chunks of a stored blob in flight to the verifier.
const VERIFY_QUEUE: usize = 4;

/// `stored` passed on unchanged while a blocking task decodes and hashes a copy (the tee). Each
/// chunk is held back until the next one arrives, and the last one until the verifier has
/// accepted the whole blob, so a receiver of a bad blob never sees a complete body: the stream
/// ends with an error (the HTTP transfer breaks off), which is logged and counted here.
pub fn verified_stored(stored: ByteStream, hash: ContentHash) -> ByteStream {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(VERIFY_QUEUE);
    let verifier = tokio::task::spawn_blocking(move || -> Result<(), String> {
        let chunks = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, std::io::Error>);
        let mut reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(chunks));
        blob::decode_to(&mut reader, &hash, std::io::sink()).map_err(|e| e.to_string())?;
        match std::io::copy(&mut reader, &mut std::io::sink()) {
            Ok(0) => Ok(()),
            Ok(n) => Err(format!("{n} bytes follow the payload")),
            Err(e) => Err(e.to_string()),
        }
    });
    struct Tee {
        stored: ByteStream,
        tx: Option<tokio::sync::mpsc::Sender<Bytes>>,
        verifier: Option<tokio::task::JoinHandle<Result<(), String>>>,
        held: Option<Bytes>,
    }
    async fn verdict(hash: ContentHash, tee: &mut Tee) -> Result<(), std::io::Error> {
        tee.tx = None;
        let outcome = match tee.verifier.take() {
            Some(v) => v.await.unwrap_or_else(|e| Err(format!("the verifier died: {e}"))),
            None => Ok(()),
        };
        outcome.map_err(|reason| {
            metrics::counter!("podfs_stored_corrupt_total", "kind" => "blob").increment(1);
            tracing::error!(%hash, %reason, "stored blob failed verification while being served; transfer aborted");
            std::io::Error::other(format!("stored blob {hash} failed verification: {reason}"))
        })
    }
    let tee = Tee { stored, tx: Some(tx), verifier: Some(verifier), held: None };
    Box::pin(futures::stream::unfold(Some(tee), move |tee| async move {
        let mut tee = tee?;
        loop {
            match tee.stored.next().await {
                Some(Ok(chunk)) => {
                    let sent = match &tee.tx {
                        Some(tx) => tx.send(chunk.clone()).await.is_ok(),
                        None => false,
                    };
                    if !sent {
                        // the verifier stopped early: it has refused the blob
                        let e = verdict(hash, &mut tee).await.err().unwrap_or_else(|| {
                            std::io::Error::other(format!("stored blob {hash} is longer than its payload"))
                        });
                        return Some((Err(e), None));
                    }
                    if let Some(prev) = tee.held.replace(chunk) {
                        return Some((Ok(prev), Some(tee)));
                    }
                }
                Some(Err(e)) => return Some((Err(e), None)),
                None => {
                    return match verdict(hash, &mut tee).await {
                        Ok(()) => tee.held.take().map(|last| (Ok(last), None)),
                        Err(e) => Some((Err(e), None)),
                    };
                }
            }
        }
    }))
}

/// A read failure is the store's fault (unavailable); anything else means the stored bytes
/// are not the content they are named after.
fn verify_error(hash: &ContentHash, e: blob::BlobError) -> Error {
    match e {
        blob::BlobError::Io(source) => Error::StoreRead { what: format!("blob {hash}"), source },
        source => Error::CorruptBlob { hash: *hash, source },
    }
}

/// Runs `f` on the blocking pool; `what` names it should the task die.
async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f).await.map_err(|source| Error::Task { what: what.to_string(), source })?
}

#[cfg(test)]
mod tests {
    use super::merge_ranges;

    fn names(groups: &[Vec<(u64, u64, char)>]) -> Vec<String> {
        groups.iter().map(|g| g.iter().map(|s| s.2).collect()).collect()
    }

    #[test]
    fn nearby_ranges_merge_far_or_long_ones_do_not() {
        let spans = [(0, 10, 'a'), (10, 10, 'b'), (100, 10, 'c'), (2000, 10, 'd'), (2010, 500, 'e')];
        // gaps of 0 and 80 bytes merge; 1,890 does not
        assert_eq!(names(&merge_ranges(&spans, 100, 1000)), ["abc", "de"]);
        // d + e would be 510 bytes, over a 300-byte cap
        assert_eq!(names(&merge_ranges(&spans, 100, 300)), ["abc", "d", "e"]);
        // no gap allowed: only adjacent spans merge
        assert_eq!(names(&merge_ranges(&spans, 0, 1000)), ["ab", "c", "de"]);
        assert!(merge_ranges::<char>(&[], 100, 1000).is_empty());
    }
}
