//! The gateway's error type and the ONE place where errors become HTTP statuses.
//!
//! Every error response is a JSON [`ErrorBody`] with a stable code and a message naming the
//! problem. 5xx errors are logged here, where they are handled; 4xx are the caller's mistakes
//! and are not logged above debug.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use podfs_protocol::ContentHash;
use podfs_protocol::api::ErrorBody;

use crate::meta::MetaError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    HashMismatch(String),
    #[error("the commit references blobs that were never uploaded: {}", list(.0))]
    MissingBlobs(Vec<ContentHash>),
    #[error("{0}")]
    RangeNotSatisfiable(String),
    /// Stored data failed verification.
    #[error("{0}")]
    Corrupt(String),
    /// PostgreSQL or the blob store is unreachable: retry later.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

fn list(hashes: &[ContentHash]) -> String {
    let shown: Vec<String> = hashes.iter().take(10).map(|h| h.to_string()).collect();
    let more = if hashes.len() > 10 { format!(" and {} more", hashes.len() - 10) } else { String::new() };
    format!("{}{more}", shown.join(", "))
}

impl Error {
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Error::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Error::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Error::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Error::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Error::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Error::HashMismatch(_) => (StatusCode::BAD_REQUEST, "hash_mismatch"),
            Error::MissingBlobs(_) => (StatusCode::BAD_REQUEST, "missing_blobs"),
            Error::RangeNotSatisfiable(_) => (StatusCode::RANGE_NOT_SATISFIABLE, "range_not_satisfiable"),
            Error::Corrupt(_) => (StatusCode::INTERNAL_SERVER_ERROR, "corrupt"),
            Error::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Error::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = self.to_string();
        if status.is_server_error() {
            tracing::error!(code, %message, "request failed");
        } else {
            tracing::debug!(code, %message, "request refused");
        }
        let mut resp = (status, Json(ErrorBody { code: code.to_string(), message })).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
        }
        resp
    }
}

impl From<MetaError> for Error {
    fn from(e: MetaError) -> Self {
        match e {
            MetaError::NotFound(m) => Error::NotFound(m),
            MetaError::Conflict(m) => Error::Conflict(m),
            MetaError::Invalid(m) => Error::BadRequest(m),
            MetaError::MissingBlobs(h) => Error::MissingBlobs(h),
            MetaError::Unavailable(m) => Error::Unavailable(format!("metadata database unavailable: {m}")),
            MetaError::Internal(m) => Error::Internal(format!("metadata database: {m}")),
        }
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(m) => Error::NotFound(m),
            StoreError::Unavailable(m) => Error::Unavailable(m),
            StoreError::Other(m) => Error::Internal(m),
        }
    }
}

impl From<podfs_protocol::PathError> for Error {
    fn from(e: podfs_protocol::PathError) -> Self {
        Error::BadRequest(e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
