//! The gateway's error type and the ONE place where errors become HTTP statuses and wire codes.
//!
//! Every error response is a JSON [`ErrorBody`] with an [`ErrorCode`] and a message naming the
//! problem (the error and its chain of causes). 5xx errors are logged here, once, where they are
//! handled, with the whole chain; 4xx are the caller's mistakes and are not logged above debug.
//! Variants wrapping a lower layer's error keep it as their `#[source]`; their own message
//! does not repeat it (see docs/error-handling.md).

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use podfs_protocol::ContentHash;
use podfs_protocol::api::{ErrorBody, ErrorCode};
use podfs_protocol::blob::BlobError;

use crate::meta::MetaError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A malformed path, query or body, or a request breaking a rule.
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// The route exists but not with this method.
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    TooLarge(String),
    /// A JSON body without `content-type: application/json`.
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    HashMismatch(String),
    #[error("the commit references blobs that were never uploaded: {}", list(.0))]
    MissingBlobs(Vec<ContentHash>),
    #[error("{0}")]
    RangeNotSatisfiable(String),
    /// Stored data disagrees with what the metadata says about it (length, presence).
    #[error("{0}")]
    Corrupt(String),
    /// A stored blob failed decoding or verification against its hash.
    #[error("stored blob {hash} failed verification")]
    CorruptBlob {
        hash: ContentHash,
        #[source]
        source: BlobError,
    },
    /// The metadata store failed (its variant decides the status).
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// The blob store failed (its variant decides the status).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reading a stored object's bytes broke off: the store is unwell, retry later.
    #[error("reading {what} from the blob store")]
    StoreRead {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// Another replica holds a build claim for too long: retry later.
    #[error("{0}")]
    Busy(String),
    /// The gateway's own scratch files (upload spool, manifest builds) failed.
    #[error("{what}")]
    Scratch {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// Building or reading a manifest.sqlite failed.
    #[error("{what}")]
    Manifest {
        what: String,
        #[source]
        source: podfs_manifest::Error,
    },
    /// A blocking task died (it panicked or the runtime is shutting down).
    #[error("{what}")]
    Task {
        what: String,
        #[source]
        source: tokio::task::JoinError,
    },
    /// A bug with no underlying error: an invariant that did not hold.
    #[error("{0}")]
    Internal(String),
}

fn list(hashes: &[ContentHash]) -> String {
    let shown: Vec<String> = hashes.iter().take(10).map(|h| h.to_string()).collect();
    let more = if hashes.len() > 10 { format!(" and {} more", hashes.len() - 10) } else { String::new() };
    format!("{}{more}", shown.join(", "))
}

impl Error {
    /// The HTTP status and wire code of this error: the one mapping of the gateway.
    pub fn status_and_code(&self) -> (StatusCode, ErrorCode) {
        use ErrorCode as C;
        match self {
            Error::BadRequest(_) | Error::Meta(MetaError::Invalid(_)) => (StatusCode::BAD_REQUEST, C::BadRequest),
            Error::Unauthorized(_) => (StatusCode::UNAUTHORIZED, C::Unauthorized),
            Error::Forbidden(_) => (StatusCode::FORBIDDEN, C::Forbidden),
            Error::NotFound(_) | Error::Meta(MetaError::NotFound(_)) => (StatusCode::NOT_FOUND, C::NotFound),
            Error::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, C::MethodNotAllowed),
            Error::Conflict(_) | Error::Meta(MetaError::Conflict(_)) => (StatusCode::CONFLICT, C::Conflict),
            Error::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, C::PayloadTooLarge),
            Error::UnsupportedMediaType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, C::UnsupportedMediaType),
            Error::HashMismatch(_) => (StatusCode::BAD_REQUEST, C::HashMismatch),
            Error::MissingBlobs(_) | Error::Meta(MetaError::MissingBlobs(_)) => {
                (StatusCode::BAD_REQUEST, C::MissingBlobs)
            }
            Error::RangeNotSatisfiable(_) => (StatusCode::RANGE_NOT_SATISFIABLE, C::RangeNotSatisfiable),
            Error::Corrupt(_) | Error::CorruptBlob { .. } => (StatusCode::INTERNAL_SERVER_ERROR, C::Corrupt),
            Error::Manifest {
                source: podfs_manifest::Error::FileMismatch { .. } | podfs_manifest::Error::SizeMismatch { .. },
                ..
            } => (StatusCode::INTERNAL_SERVER_ERROR, C::Corrupt),
            Error::Meta(MetaError::Unavailable(_))
            | Error::Store(StoreError::Unavailable(_))
            | Error::StoreRead { .. }
            | Error::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, C::Unavailable),
            // a blob the gateway asked for by a key it made: it was recorded, so it should be there
            Error::Store(StoreError::NotFound(_)) => (StatusCode::INTERNAL_SERVER_ERROR, C::Corrupt),
            Error::Meta(MetaError::Database(_) | MetaError::Migration(_) | MetaError::Inconsistent(_))
            | Error::Store(StoreError::Io { .. } | StoreError::Refused { .. } | StoreError::InvalidKey(_))
            | Error::Scratch { .. }
            | Error::Manifest { .. }
            | Error::Task { .. }
            | Error::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, C::Internal),
        }
    }

    /// The scratch-file error of `what`.
    pub fn scratch(what: impl Into<String>) -> impl Fn(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Scratch { what: what.clone(), source }
    }
}

/// `e` and its chain of sources, `outer: inner: innermost`.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        // some libraries repeat their source in their own message: print it once
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = s.source();
    }
    out
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = chain(&self);
        if status.is_server_error() {
            tracing::error!(%code, error = %message, "request failed");
        } else {
            tracing::debug!(%code, %message, "request refused");
        }
        let mut resp = (status, Json(ErrorBody { code, message })).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
        }
        resp
    }
}

impl From<podfs_protocol::PathError> for Error {
    fn from(e: podfs_protocol::PathError) -> Self {
        Error::BadRequest(e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_name_every_cause_once() {
        let e = Error::Scratch { what: "spool file".into(), source: std::io::Error::other("disk full") };
        assert_eq!(chain(&e), "spool file: disk full");
        let e = Error::Store(StoreError::Io { what: "blobs/ab/x".into(), source: std::io::Error::other("EIO") });
        assert_eq!(chain(&e), "blob store I/O on blobs/ab/x: EIO");
    }

    #[test]
    fn statuses_and_codes() {
        let meta_down = Error::Meta(MetaError::Unavailable(sqlx::Error::PoolTimedOut));
        assert_eq!(meta_down.status_and_code(), (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable));
        let missing = Error::Meta(MetaError::NotFound("no workspace x".into()));
        assert_eq!(missing.status_and_code(), (StatusCode::NOT_FOUND, ErrorCode::NotFound));
        let bad = Error::CorruptBlob { hash: ContentHash::of(b"x"), source: BlobError::BadHeader };
        assert_eq!(bad.status_and_code(), (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Corrupt));
    }
}
