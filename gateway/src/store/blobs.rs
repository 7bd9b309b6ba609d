//! Content-addressed blobs above the backends: names, hashing, compression, verification.
//!
//! Uploads are hashed while they arrive (small ones in memory, large ones spooled to a
//! temporary file), refused when the content does not match the claimed name, encoded in the
//! stored blob format (zstd when it saves space) and only then recorded in the metadata store,
//! which is what makes them referenceable by a commit. Reads decode and verify every byte
//! before handing content out. This module does not decide who may do what (the API does).

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use podfs_protocol::ContentHash;
use podfs_protocol::api::BlobUploaded;
use podfs_protocol::blob::{self, Codec};
use tokio::io::AsyncWriteExt;

use super::{BlobBackend, ByteStream, StoreError};
use crate::error::Error;
use crate::meta::MetaStore;

/// Content at most this large is handled in memory; larger content goes through temp files.
pub const MEMORY_LIMIT: u64 = 4 << 20;
/// What the upload spool's errors are about.
const SPOOL: &str = "spooling an upload";

/// The store key of a blob: `blobs/<first two hex digits>/<hash>`.
pub fn key(hash: &ContentHash) -> String {
    let hex = hash.to_hex();
    format!("blobs/{}/{hex}", &hex[..2])
}

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

#[derive(Clone)]
pub struct BlobService {
    backend: Arc<dyn BlobBackend>,
    meta: MetaStore,
    spool: PathBuf,
    max_blob_size: u64,
    presign_ttl: Duration,
}

enum Spool {
    Memory(BytesMut),
    File(tokio::fs::File, tempfile::TempPath),
}

impl BlobService {
    pub fn new(
        backend: Arc<dyn BlobBackend>,
        meta: MetaStore,
        spool: PathBuf,
        max_blob_size: u64,
        presign_ttl: Duration,
    ) -> Self {
        Self { backend, meta, spool, max_blob_size, presign_ttl }
    }

    pub fn backend(&self) -> &Arc<dyn BlobBackend> {
        &self.backend
    }

    pub fn presign_ttl(&self) -> Duration {
        self.presign_ttl
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
            if len > self.max_blob_size {
                return Err(Error::TooLarge(format!("blob is larger than the limit of {} bytes", self.max_blob_size)));
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

    /// Reads, decodes and verifies a blob of `size` content bytes.
    pub async fn read(&self, hash: &ContentHash, size: u64) -> Result<Content, Error> {
        let stream = self.backend.get(&key(hash)).await.map_err(|e| match e {
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

    /// The stored form of a blob, verified. Up to [`MEMORY_LIMIT`] stored bytes (most blobs)
    /// are verified whole before the first byte goes out, so a bad one is a clean `corrupt`
    /// answer; a larger one is verified as it streams and ends with an error in place of its
    /// last chunk.
    pub async fn stored(&self, hash: &ContentHash) -> Result<ByteStream, Error> {
        let mut stream = self.backend.get(&key(hash)).await.map_err(|e| match e {
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

    /// A presigned URL for the stored blob, or `None` when the gateway must serve it.
    pub async fn presigned(&self, hash: &ContentHash) -> Result<Option<String>, Error> {
        Ok(self.backend.presign_get(&key(hash), self.presign_ttl).await?)
    }
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
