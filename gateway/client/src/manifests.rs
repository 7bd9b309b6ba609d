//! `GET .../versions/{v}/manifest.sqlite`: download a manifest (whole or delta), decompress it
//! with the stated length as the cap, and check it against the stated BLAKE3 before anyone
//! opens it.

use std::io::{self, BufWriter, Write};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use futures::TryStreamExt;
use podfs_protocol::api::{MANIFEST_BASE_HEADER, MANIFEST_HASH_HEADER, MANIFEST_SIZE_HEADER, VERSION_HEADER};
use podfs_protocol::frame::{self, FrameError};
use podfs_protocol::{ContentHash, VersionRef};
use tokio_util::io::{StreamReader, SyncIoBridge};

use crate::Client;
use crate::blobs::{CancelOnDrop, CancellableRead, STREAM_BUF};
use crate::error::{Error, Result};

/// A verified manifest written to the caller's file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestDownload {
    /// The version it describes.
    pub version: u64,
    /// For a delta: the version it starts from.
    pub base: Option<u64>,
    /// BLAKE3 and length of the SQLite file (verified).
    pub hash: ContentHash,
    pub size: u64,
    /// Bytes that came over the wire.
    pub transfer_bytes: u64,
}

impl Client {
    /// Downloads the manifest of `ws@v` (the changes since `since` when given) into `out`,
    /// verified: `out` holds exactly the SQLite file the gateway stated, or an error is
    /// returned (`CorruptManifest` for a file that fails verification; retryable). A damaged
    /// transfer is retried with a fresh request while the retry policy allows; `out` is
    /// rewritten from its start each time.
    pub async fn download_manifest(
        &self,
        ws: &str,
        v: VersionRef,
        since: Option<u64>,
        out: std::fs::File,
    ) -> Result<(std::fs::File, ManifestDownload)> {
        let (out, _, d) = self.download_manifest_framed(ws, v, since, out, None).await?;
        Ok((out, d))
    }

    /// [`Self::download_manifest`], also keeping the transfer frame as received in `frame`
    /// (the bytes whose BLAKE3 the gateway checked against the stored frame as they passed: a
    /// peer serves them to the devpods of its zone).
    pub async fn download_manifest_framed(
        &self,
        ws: &str,
        v: VersionRef,
        since: Option<u64>,
        out: std::fs::File,
        frame: Option<std::fs::File>,
    ) -> Result<(std::fs::File, Option<std::fs::File>, ManifestDownload)> {
        let policy = *self.retry_policy();
        let (mut out, mut frame) = (out, frame);
        let mut attempt = 1;
        loop {
            let frame_copy = frame.as_ref().map(std::fs::File::try_clone).transpose()?;
            match self.download_manifest_once(ws, v, since, out.try_clone()?, frame_copy).await {
                Ok(d) => return Ok((out, frame, d)),
                Err(e) if e.is_retryable() && attempt < policy.max_attempts => {
                    tracing::debug!(workspace = ws, %v, attempt, error = %e, "retrying manifest download");
                    tokio::time::sleep(policy.jittered_backoff(attempt)).await;
                    attempt += 1;
                    for f in std::iter::once(&mut out).chain(frame.as_mut()) {
                        f.set_len(0)?;
                        io::Seek::rewind(f)?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn download_manifest_once(
        &self,
        ws: &str,
        v: VersionRef,
        since: Option<u64>,
        out: std::fs::File,
        frame: Option<std::fs::File>,
    ) -> Result<ManifestDownload> {
        let vs = v.to_string();
        let mut url = self.url(["v1", "workspaces", ws, "versions", &vs, "manifest.sqlite"]);
        if let Some(s) = since {
            url.query_pairs_mut().append_pair("since", &s.to_string());
        }
        let resp = self.call("get manifest.sqlite", || self.get(url.clone())).await?;
        let decode = |message: String| Error::Decode { url: url.to_string(), message };
        let header = |name: &str| resp.headers().get(name).and_then(|h| h.to_str().ok()).map(str::to_string);
        let need = |name: &str| header(name).ok_or_else(|| decode(format!("no {name} header")));
        let hash: ContentHash =
            need(MANIFEST_HASH_HEADER)?.parse().map_err(|_| decode(format!("bad {MANIFEST_HASH_HEADER}")))?;
        let size: u64 =
            need(MANIFEST_SIZE_HEADER)?.parse().map_err(|_| decode(format!("bad {MANIFEST_SIZE_HEADER}")))?;
        let version: u64 = need(VERSION_HEADER)?.parse().map_err(|_| decode(format!("bad {VERSION_HEADER}")))?;
        let base: Option<u64> = match header(MANIFEST_BASE_HEADER) {
            Some(b) => Some(b.parse().map_err(|_| decode(format!("bad {MANIFEST_BASE_HEADER}")))?),
            None => None,
        };
        let what = format!("{ws}@{version}");
        if let VersionRef::Number(n) = v
            && n != version
        {
            return Err(decode(format!("asked for version {n}, got {version}")));
        }
        if base != since {
            return Err(decode(format!("asked for the changes since {since:?}, got since {base:?}")));
        }
        let counted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let seen = Arc::clone(&counted);
        let stream = resp
            .bytes_stream()
            .inspect_ok(move |c| {
                seen.fetch_add(c.len() as u64, std::sync::atomic::Ordering::Relaxed);
            })
            .map_err(io::Error::other);
        let cancelled = Arc::new(AtomicBool::new(false));
        let _guard = CancelOnDrop(Arc::clone(&cancelled));
        let reader = CancellableRead { inner: SyncIoBridge::new(StreamReader::new(stream)), cancelled };
        tokio::task::spawn_blocking(move || {
            let mut sink = BufWriter::with_capacity(STREAM_BUF, out);
            let copy = frame.map(|f| BufWriter::with_capacity(STREAM_BUF, f));
            let mut src = io::BufReader::with_capacity(STREAM_BUF, Tee { inner: reader, copy });
            let r = frame::decompress_verified(&mut src, &hash, size, &mut sink)
                .and_then(|()| {
                    // the rest of the body (past what the decoder needed) belongs to the frame
                    io::copy(&mut src, &mut io::sink())?;
                    if let Some(mut k) = src.into_inner().copy {
                        k.flush()?;
                    }
                    Ok(())
                })
                .and_then(|()| Ok(sink.flush()?));
            match r {
                Ok(()) => Ok(()),
                Err(FrameError::Io(e)) => Err(Error::Io(e)),
                Err(source) => Err(Error::CorruptManifest { what, source }),
            }
        })
        .await
        .map_err(|e| Error::Io(io::Error::other(format!("download task failed: {e}"))))??;
        let transfer_bytes = counted.load(std::sync::atomic::Ordering::Relaxed);
        Ok(ManifestDownload { version, base, hash, size, transfer_bytes })
    }
}

/// Reads from `inner`, writing a copy of every byte read to `copy`.
struct Tee<R> {
    inner: R,
    copy: Option<BufWriter<std::fs::File>>,
}

impl<R: io::Read> io::Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(c) = self.copy.as_mut() {
            c.write_all(&buf[..n])?;
        }
        Ok(n)
    }
}
