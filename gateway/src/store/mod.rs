//! Blob backends: where stored blobs live.
//!
//! A backend moves opaque bytes under string keys: it does not hash, compress or verify. That
//! happens once, above the backends, in [`blobs`]. Backends: [`file`] (a local directory, the
//! embedded default), [`s3`] (any S3-compatible service) and [`memory`] (tests).
//! [`conformance`] is the one suite every backend's tests run.

pub mod blobs;
pub mod conformance;
pub mod faults;
pub mod file;
pub mod memory;
pub mod s3;

use std::ops::Range;
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;

pub use blobs::{BlobService, Content};

/// A stream of stored bytes.
pub type ByteStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// Any error, boxed, as a source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no object {0}")]
    NotFound(String),
    /// The backend could not be reached or answered with a server error: worth retrying later.
    #[error("blob store unavailable: {0}")]
    Unavailable(String),
    /// A local file or directory of the store could not be read or written.
    #[error("blob store I/O on {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The backend refused the request for a reason retrying will not fix (credentials,
    /// permissions, a missing bucket).
    #[error("blob store refused {what}")]
    Refused {
        what: String,
        #[source]
        source: BoxError,
    },
    /// A key the backend cannot hold (a bug: keys are made by the gateway).
    #[error("invalid blob store key {0:?}")]
    InvalidKey(String),
}

impl StoreError {
    /// An I/O error on `what`; a missing file is [`StoreError::NotFound`].
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        let what = what.into();
        match source.kind() {
            std::io::ErrorKind::NotFound => StoreError::NotFound(what),
            _ => StoreError::Io { what, source },
        }
    }
}

#[async_trait]
pub trait BlobBackend: Send + Sync + 'static {
    /// A short description for logs, e.g. `s3://bucket/prefix`.
    fn describe(&self) -> String;
    /// Stores `data` under `key`, replacing what is there (keys are content-addressed, so a
    /// replacement holds the same bytes).
    async fn put_bytes(&self, key: &str, data: Bytes) -> Result<(), StoreError>;
    /// Stores the whole file at `path` under `key`.
    async fn put_file(&self, key: &str, path: &Path) -> Result<(), StoreError>;
    /// Streams the object at `key`.
    async fn get(&self, key: &str) -> Result<ByteStream, StoreError>;
    /// Streams the bytes `range` of the object at `key` (fewer when the object ends first).
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<ByteStream, StoreError>;
    async fn exists(&self, key: &str) -> Result<bool, StoreError>;
    async fn delete(&self, key: &str) -> Result<(), StoreError>;
    /// Every key starting with `prefix`, sorted.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError>;
    /// A URL a client can GET `key` from without credentials for `ttl`, when the backend
    /// supports it; `None` means the gateway serves the object itself. With `range`, the
    /// signature covers the header `Range: bytes=start-(end-1)`: the client must send exactly
    /// that, and the store refuses any other range or none.
    async fn presign_get(
        &self,
        key: &str,
        range: Option<Range<u64>>,
        ttl: Duration,
    ) -> Result<Option<String>, StoreError>;
}

/// Builds a backend from its URL: `file:///dir` or `s3://bucket/prefix?endpoint=..&region=..`.
pub async fn from_url(url: &str, s3_opts: &s3::S3Options) -> anyhow::Result<std::sync::Arc<dyn BlobBackend>> {
    if let Some(path) = url.strip_prefix("file://") {
        anyhow::ensure!(path.starts_with('/'), "blob store {url:?}: a file store needs an absolute path, file:///dir");
        return Ok(std::sync::Arc::new(file::FileBackend::open(path).await?));
    }
    if url.starts_with("s3://") {
        return Ok(std::sync::Arc::new(s3::S3Backend::from_url(url, s3_opts).await?));
    }
    if url == "memory:" {
        return Ok(std::sync::Arc::new(memory::MemoryBackend::default()));
    }
    anyhow::bail!("blob store {url:?}: expected file:///dir or s3://bucket/prefix")
}

/// The kind of object a key names, for metrics: `blob`, `pack`, `manifest` or `other`.
pub fn kind_of(key: &str) -> &'static str {
    match key.split('/').next() {
        Some("blobs") => "blob",
        Some("packs") => "pack",
        Some("manifests") => "manifest",
        _ => "other",
    }
}

/// Collects a whole stream into memory.
pub async fn read_all(mut s: ByteStream) -> std::io::Result<Vec<u8>> {
    use futures::StreamExt;
    let mut out = Vec::new();
    while let Some(chunk) = s.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}
