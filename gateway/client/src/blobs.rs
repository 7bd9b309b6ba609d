//! Routes for blobs: which ones the gateway lacks, uploads, download locations, and fetching a
//! stored blob with verification.
//!
//! Downloads are verified here, never handed out unchecked: [`Client::fetch_blob`] returns the
//! content only after its length and BLAKE3 hash matched; [`Client::fetch_blob_to`] streams into
//! a caller's writer and reports success only after the whole content matched (the writer holds
//! unverified bytes on failure: give it a temporary file and drop that on error).

use std::io::{self, BufWriter, Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use futures::TryStreamExt;
use podfs_protocol::ContentHash;
use podfs_protocol::api::{
    BatchUploaded, BlobLocation, BlobLocations, BlobUploaded, HashBatch, MAX_HASH_BATCH, MissingBlobs,
};
use podfs_protocol::blob;
use podfs_protocol::pack::BATCH_CONTENT_TYPE;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, RANGE};
use reqwest::{Body, Method, Response, Url};
use tokio::io::AsyncReadExt;
use tokio_util::io::{ReaderStream, StreamReader, SyncIoBridge};

use crate::Client;
use crate::client::send;
use crate::error::{Error, MarkedWriter, Result};

/// Buffer size for streaming a file up or a blob down.
pub(crate) const STREAM_BUF: usize = 256 * 1024;

pub use podfs_protocol::blob::max_stored_len;

impl Client {
    /// `POST .../blobs/missing`: the hashes of `hashes` the gateway does not hold, in request
    /// order. Sends batches of at most [`MAX_HASH_BATCH`].
    pub async fn missing_blobs(&self, ws: &str, hashes: &[ContentHash]) -> Result<Vec<ContentHash>> {
        let url = self.url(["v1", "workspaces", ws, "blobs", "missing"]);
        let mut missing = Vec::new();
        for chunk in hashes.chunks(MAX_HASH_BATCH) {
            let body = HashBatch { hashes: chunk.to_vec() };
            let r: MissingBlobs = self.call_json("missing blobs", || self.post_json(url.clone(), &body)).await?;
            missing.extend(r.missing);
        }
        Ok(missing)
    }

    /// `PUT .../blobs/{hash}` with the content in memory. Uploads are idempotent (content
    /// addressed) and retried. 400 `hash_mismatch` when `content` does not hash to `hash`.
    pub async fn put_blob(&self, ws: &str, hash: &ContentHash, content: Bytes) -> Result<BlobUploaded> {
        let url = self.url(["v1", "workspaces", ws, "blobs", &hash.to_hex()]);
        self.call_json("upload blob", || {
            self.request(Method::PUT, url.clone())
                .header(CONTENT_TYPE, "application/octet-stream")
                .body(content.clone())
        })
        .await
    }

    /// `POST .../blobs/batch`: many small blobs in one request (`body` built with
    /// `podfs_protocol::pack::BatchWriter`). Retried like every idempotent upload; records the
    /// gateway refused are listed in the answer, the others are stored once it arrives.
    pub async fn put_batch(&self, ws: &str, body: Bytes) -> Result<BatchUploaded> {
        let url = self.url(["v1", "workspaces", ws, "blobs", "batch"]);
        self.call_json("upload batch", || {
            self.request(Method::POST, url.clone()).header(CONTENT_TYPE, BATCH_CONTENT_TYPE).body(body.clone())
        })
        .await
    }

    /// `PUT .../blobs/{hash}` streaming `size` bytes from the file at `path`, never holding it
    /// whole in memory. The file is reopened on each attempt; a file whose length is no longer
    /// `size` fails with [`Error::Io`] (it changed since it was hashed).
    pub async fn put_blob_file(&self, ws: &str, hash: &ContentHash, path: &Path, size: u64) -> Result<BlobUploaded> {
        let url = self.url(["v1", "workspaces", ws, "blobs", &hash.to_hex()]);
        crate::retry::retry(self.retry_policy(), "upload blob", || async {
            let file = tokio::fs::File::open(path).await?;
            let now = file.metadata().await?.len();
            if now != size {
                return Err(Error::Io(io::Error::other(format!(
                    "{} changed while uploading: it is {now} bytes, it was {size} when hashed",
                    path.display()
                ))));
            }
            let body = Body::wrap_stream(ReaderStream::with_capacity(file.take(size), STREAM_BUF));
            let req = self
                .request(Method::PUT, url.clone())
                .header(CONTENT_TYPE, "application/octet-stream")
                .header(CONTENT_LENGTH, size)
                .body(body);
            crate::client::decode_json(send(req).await?).await
        })
        .await
    }

    /// `POST .../blobs/locations`: where to GET each stored blob. Sends batches of at most
    /// [`MAX_HASH_BATCH`]; `expires_in_secs` is the shortest of the batches'.
    pub async fn blob_locations(&self, ws: &str, hashes: &[ContentHash]) -> Result<BlobLocations> {
        let url = self.url(["v1", "workspaces", ws, "blobs", "locations"]);
        let mut out = BlobLocations { expires_in_secs: u64::MAX, locations: Vec::with_capacity(hashes.len()) };
        for chunk in hashes.chunks(MAX_HASH_BATCH) {
            let body = HashBatch { hashes: chunk.to_vec() };
            let r: BlobLocations = self.call_json("blob locations", || self.post_json(url.clone(), &body)).await?;
            out.expires_in_secs = out.expires_in_secs.min(r.expires_in_secs);
            out.locations.extend(r.locations);
        }
        if out.locations.is_empty() {
            out.expires_in_secs = 0;
        }
        Ok(out)
    }

    /// `GET .../blobs/{hash}`: the stored blob as is (header + payload), unverified. Prefer
    /// [`Self::fetch_blob`], which verifies.
    pub async fn get_blob(&self, ws: &str, hash: &ContentHash) -> Result<Bytes> {
        let url = self.url(["v1", "workspaces", ws, "blobs", &hash.to_hex()]);
        let resp = self.call("get blob", || self.get(url.clone())).await?;
        resp.bytes().await.map_err(Error::Transport)
    }

    /// Downloads the blob at `loc` into memory and returns its verified content. Refuses (as
    /// [`Error::Corrupt`]) a stored blob longer than `max_content_len` content could take, so
    /// memory stays bounded by the caller's expectation. Retried per the policy; a refused
    /// presigned URL gives [`Error::LocationExpired`].
    pub async fn fetch_blob(&self, loc: &BlobLocation, max_content_len: u64) -> Result<Vec<u8>> {
        let cap = max_stored_len(max_content_len);
        crate::retry::retry(self.retry_policy(), "fetch blob", || async {
            let mut resp = self.open_location(loc).await?;
            let too_big = || Error::Corrupt {
                hash: loc.hash,
                source: blob::BlobError::Length { expected: max_content_len, actual: u64::MAX },
            };
            if resp.content_length().is_some_and(|n| n > cap) {
                return Err(too_big());
            }
            let mut stored = Vec::with_capacity(resp.content_length().unwrap_or(0).min(cap) as usize);
            while let Some(chunk) = resp.chunk().await.map_err(Error::Transport)? {
                if stored.len() as u64 + chunk.len() as u64 > cap {
                    return Err(too_big());
                }
                self.count_blob_bytes(chunk.len());
                stored.extend_from_slice(&chunk);
            }
            blob::decode(&stored, &loc.hash).map_err(|e| Error::from_blob(loc.hash, e))
        })
        .await
    }

    /// Streams the blob at `loc` into `out` as plain content (decompressing on a blocking thread)
    /// and returns `out` with the content length once length and hash are verified. Not retried:
    /// on error `out` holds unverified, partial bytes; retry with a fresh writer.
    pub async fn fetch_blob_to<W>(&self, loc: &BlobLocation, out: W) -> Result<(W, u64)>
    where
        W: Write + Send + 'static,
    {
        let resp = self.open_location(loc).await?;
        let counter = self.clone();
        let stream =
            resp.bytes_stream().inspect_ok(move |c| counter.count_blob_bytes(c.len())).map_err(io::Error::other);
        // Dropping this future (the caller gave up) stops the blocking copy at its next read.
        let cancelled = Arc::new(AtomicBool::new(false));
        let _guard = CancelOnDrop(Arc::clone(&cancelled));
        let reader = CancellableRead { inner: SyncIoBridge::new(StreamReader::new(stream)), cancelled };
        let hash = loc.hash;
        tokio::task::spawn_blocking(move || {
            let mut sink = BufWriter::with_capacity(STREAM_BUF, MarkedWriter(out));
            let n = blob::decode_to(reader, &hash, &mut sink).map_err(|e| Error::from_blob(hash, e))?;
            let out = sink.into_inner().map_err(|e| Error::Io(e.into_error()))?;
            Ok((out.0, n))
        })
        .await
        .map_err(|e| Error::Io(io::Error::other(format!("download task failed: {e}"))))?
    }

    /// Sends the GET for a location: with the bearer token for the gateway's own URLs, without
    /// any credentials for presigned ones.
    async fn open_location(&self, loc: &BlobLocation) -> Result<Response> {
        let (url, presigned) = self.location_url(loc)?;
        let mut req = if presigned { self.anonymous(Method::GET, url) } else { self.request(Method::GET, url) };
        if let Some(range) = &loc.range {
            // exactly the range the signature covers: a packed blob's bytes in its pack
            req = req.header(RANGE, range.header());
        }
        match send(req).await {
            // Object stores refuse an expired signature with 403 (AWS) or 400 (Garage: "Date is
            // too old"); either way the cure is a fresh URL.
            Err(Error::Api { status, message, .. }) if presigned && matches!(status.as_u16(), 400 | 401 | 403) => {
                Err(Error::LocationExpired { hash: loc.hash, status, message })
            }
            other => other,
        }
    }

    /// The URL of a location and whether it is presigned (fetched without the token). The token
    /// only ever goes to the gateway's own origin.
    fn location_url(&self, loc: &BlobLocation) -> Result<(Url, bool)> {
        if loc.url.starts_with('/') {
            return Ok((self.gateway_path_url(&loc.url)?, !loc.gateway));
        }
        let url =
            Url::parse(&loc.url).map_err(|e| Error::InvalidUrl { url: loc.url.clone(), message: e.to_string() })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::InvalidUrl { url: loc.url.clone(), message: "not an http(s) URL".into() });
        }
        let to_gateway = loc.gateway && self.same_origin(&url);
        if loc.gateway && !to_gateway {
            tracing::warn!(url = %loc.url, "gateway location on another origin: fetching it without the token");
        }
        Ok((url, !to_gateway))
    }
}

/// Sets its flag when dropped.
pub(crate) struct CancelOnDrop(pub(crate) Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A reader that fails once its flag is set.
pub(crate) struct CancellableRead<R> {
    pub(crate) inner: R,
    pub(crate) cancelled: Arc<AtomicBool>,
}

impl<R: Read> Read for CancellableRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.cancelled.load(Ordering::Relaxed) {
            return Err(io::Error::other("download cancelled"));
        }
        self.inner.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(url: &str, gateway: bool) -> BlobLocation {
        BlobLocation { hash: ContentHash::of(b"x"), url: url.into(), gateway, range: None }
    }

    #[test]
    fn token_only_goes_to_the_gateway() {
        let c = Client::new("http://gw:7070", Some("t".into())).expect("client");
        let (u, presigned) = c.location_url(&loc("/v1/workspaces/a/blobs/ab", true)).expect("url");
        assert_eq!(u.as_str(), "http://gw:7070/v1/workspaces/a/blobs/ab");
        assert!(!presigned);
        let (_, presigned) = c.location_url(&loc("http://s3:3900/b/k?X-Amz-Signature=1", false)).expect("url");
        assert!(presigned);
        let (_, presigned) = c.location_url(&loc("http://evil:1/x", true)).expect("url");
        assert!(presigned, "no token to a foreign origin even when flagged gateway");
        let (_, presigned) = c.location_url(&loc("http://gw:7070/v1/x", true)).expect("url");
        assert!(!presigned);
        assert!(c.location_url(&loc("file:///etc/passwd", false)).is_err());
    }

    #[test]
    fn stored_length_bound_covers_zstd_worst_case() {
        for n in [0u64, 1, 100, 64 << 10, 1 << 20, 50 << 20] {
            assert!(max_stored_len(n) >= n + n / 256 + 64 + blob::HEADER_LEN as u64);
        }
        assert_eq!(max_stored_len(u64::MAX), u64::MAX);
    }
}
