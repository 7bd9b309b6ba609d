//! The client's one error type and the retry classification.

use std::io;

use podfs_protocol::ContentHash;
use podfs_protocol::api::ErrorCode;
use podfs_protocol::blob::BlobError;
use reqwest::StatusCode;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a gateway call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The gateway (or an object store behind a presigned URL) answered with an error status.
    /// `code` and `message` come from the `ErrorBody`; for non-JSON answers `code` is derived from
    /// the status ([`ErrorCode::for_status`]) and `message` is the start of the body (an object
    /// store's own error code leads the message then).
    #[error("{message} (HTTP {}, {code})", status.as_u16())]
    Api { status: StatusCode, code: ErrorCode, message: String },
    /// The request did not complete: connection refused or reset, timeout, broken body. The
    /// message names the URL and reqwest's whole chain of causes (reqwest's own message names
    /// none of them), so the error is not repeated as a `source`.
    #[error("{}", transport_message(.0))]
    Transport(reqwest::Error),
    /// A success response whose body is not what the API promises.
    #[error("unexpected response from {url}: {message}")]
    Decode { url: String, message: String },
    /// A downloaded blob failed verification (header, length or BLAKE3 hash).
    #[error("blob {hash} failed verification")]
    Corrupt {
        hash: ContentHash,
        #[source]
        source: BlobError,
    },
    /// A downloaded manifest.sqlite failed verification (length or BLAKE3 of the file, or the
    /// frame), or it was not the manifest asked for.
    #[error("manifest of {what} refused")]
    CorruptManifest {
        what: String,
        #[source]
        source: podfs_protocol::frame::FrameError,
    },
    /// A presigned URL was refused (400, 401 or 403 from the object store): usually it expired.
    /// Fetch fresh locations and try again.
    #[error("presigned URL for blob {hash} was refused (HTTP {}, {message}); fetch fresh locations", status.as_u16())]
    LocationExpired { hash: ContentHash, status: StatusCode, message: String },
    /// A base URL or a location URL that cannot be used.
    #[error("invalid URL {url:?}: {message}")]
    InvalidUrl { url: String, message: String },
    /// A local file could not be read or written (uploads from disk, downloads to a writer).
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl Error {
    /// True when the same request may succeed if sent again: network failures, timeouts, 408,
    /// 429 and 5xx answers (except 501 and 505), and corrupt downloads (a damaged transfer).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Transport(e) => !(e.is_builder() || e.is_redirect()),
            Error::Api { status, .. } => {
                matches!(status.as_u16(), 408 | 429)
                    || (status.is_server_error()
                        && *status != StatusCode::NOT_IMPLEMENTED
                        && *status != StatusCode::HTTP_VERSION_NOT_SUPPORTED)
            }
            Error::Corrupt { .. } | Error::CorruptManifest { .. } => true,
            Error::Decode { .. } | Error::LocationExpired { .. } | Error::InvalidUrl { .. } | Error::Io(_) => false,
        }
    }

    /// True when the request surely never reached the server (safe to resend even when it is
    /// not idempotent).
    pub fn is_connect(&self) -> bool {
        matches!(self, Error::Transport(e) if e.is_connect())
    }

    /// The HTTP status of an `Api` error.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Error::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The `ErrorBody` code of an `Api` error (`NotFound`, `Conflict`, `MissingBlobs`, ...).
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Api { code, .. } => Some(*code),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.status() == Some(StatusCode::NOT_FOUND)
    }

    pub fn is_conflict(&self) -> bool {
        self.status() == Some(StatusCode::CONFLICT)
    }

    /// Turns a blob decoding failure into `Corrupt`, or into `Transport` when reading the
    /// network failed, or `Io` when writing the output failed ([`WriteFailed`]).
    pub(crate) fn from_blob(hash: ContentHash, e: BlobError) -> Self {
        let BlobError::Io(io) = e else {
            return Error::Corrupt { hash, source: e };
        };
        let network = io.get_ref().is_some_and(|inner| inner.is::<reqwest::Error>());
        let output = io.get_ref().is_some_and(|inner| inner.is::<WriteFailed>());
        if !(network || output) {
            // the decoder itself failed (zstd: corrupt frame)
            return Error::Corrupt { hash, source: BlobError::Io(io) };
        }
        match io.into_inner() {
            Some(inner) => match inner.downcast::<reqwest::Error>() {
                Ok(re) => Error::Transport(*re),
                Err(inner) => match inner.downcast::<WriteFailed>() {
                    Ok(w) => Error::Io(w.0),
                    Err(other) => Error::Io(io::Error::other(other)),
                },
            },
            None => Error::Io(io::Error::other("unknown I/O error")),
        }
    }
}

/// `request to URL failed: cause: cause ...` (reqwest's Display is only "error sending request
/// for url (..)"; what went wrong is in its sources).
fn transport_message(e: &reqwest::Error) -> String {
    let mut out = match e.url() {
        Some(url) => format!("request to {url} failed"),
        None => "request failed".to_string(),
    };
    let mut next = std::error::Error::source(e);
    if next.is_none() {
        // no deeper cause: reqwest's own message is all there is (builder, redirect, status)
        out.push_str(": ");
        out.push_str(&e.to_string());
    }
    while let Some(cause) = next {
        let text = cause.to_string();
        // hyper and std repeat their source in their own message now and then: print it once
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

/// Marks an error of the caller's writer, to tell it apart from a decoder error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct WriteFailed(pub io::Error);

/// A writer whose errors are marked [`WriteFailed`].
pub(crate) struct MarkedWriter<W>(pub W);

impl<W: io::Write> io::Write for MarkedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf).map_err(|e| io::Error::new(e.kind(), WriteFailed(e)))
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush().map_err(|e| io::Error::new(e.kind(), WriteFailed(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16) -> Error {
        Error::Api {
            status: StatusCode::from_u16(status).expect("status"),
            code: ErrorCode::for_status(status),
            message: "y".into(),
        }
    }

    #[test]
    fn retry_classification() {
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(api(s).is_retryable(), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 413, 501, 505] {
            assert!(!api(s).is_retryable(), "{s}");
        }
        let h = ContentHash::of(b"x");
        assert!(Error::Corrupt { hash: h, source: BlobError::BadHeader }.is_retryable());
        let expired = Error::LocationExpired { hash: h, status: StatusCode::FORBIDDEN, message: "m".into() };
        assert!(!expired.is_retryable());
        assert!(api(404).is_not_found());
        assert!(api(409).is_conflict());
        assert_eq!(api(409).code(), Some(ErrorCode::Conflict));
    }

    /// A refused connection names the URL and the OS error, in `{e}` as in `{e:#}`.
    #[tokio::test]
    async fn transport_errors_name_their_cause() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let url = format!("http://127.0.0.1:{port}/v1/workspaces");
        let e = Error::Transport(reqwest::get(&url).await.expect_err("nothing listens"));
        let shown = e.to_string();
        assert!(shown.starts_with(&format!("request to {url} failed: ")), "{shown}");
        assert!(shown.to_lowercase().contains("connection refused"), "{shown}");
        assert!(std::error::Error::source(&e).is_none(), "the cause is in the message, not repeated as a source");
        assert!(e.is_connect() && e.is_retryable());
    }

    #[test]
    fn blob_errors_are_mapped() {
        let h = ContentHash::of(b"x");
        assert!(matches!(Error::from_blob(h, BlobError::BadHeader), Error::Corrupt { .. }));
        let decoder = io::Error::other("Data corruption detected");
        assert!(matches!(Error::from_blob(h, BlobError::Io(decoder)), Error::Corrupt { .. }));
        let disk = io::Error::new(io::ErrorKind::StorageFull, WriteFailed(io::Error::from(io::ErrorKind::StorageFull)));
        match Error::from_blob(h, BlobError::Io(disk)) {
            Error::Io(e) => assert_eq!(e.kind(), io::ErrorKind::StorageFull),
            other => panic!("{other:?}"),
        }
    }
}
