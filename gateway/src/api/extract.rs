//! Request extractors whose rejections are JSON error bodies like every other error, and the
//! typed path parameters of the routes.
//!
//! Handlers take [`ApiJson`], [`ApiPath`] and [`ApiQuery`] instead of axum's `Json`, `Path` and
//! `Query`, whose rejections answer `text/plain`. The path parameter structs both deserialize
//! the path and document it (with the patterns the OpenAPI document states).

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use utoipa::IntoParams;

use crate::error::Error;

/// Pattern of a workspace name (`podfs_protocol::api::valid_workspace_name`).
pub const WORKSPACE_PATTERN: &str = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$";
/// Pattern of a version in a path: a number or `head`.
pub const VERSION_PATTERN: &str = "^(head|[0-9]+)$";
/// Pattern of a content hash: BLAKE3, 64 lowercase hex digits.
pub const HASH_PATTERN: &str = "^[0-9a-f]{64}$";

/// A JSON body. Refused with 400 (malformed), 413 (over the body limit) or 415 (no JSON
/// content type).
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(JsonRejection::BytesRejection(e)) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(Error::TooLarge(format!("request body too large: {}", e.body_text())))
            }
            Err(e @ JsonRejection::MissingJsonContentType(_)) => Err(Error::UnsupportedMediaType(e.body_text())),
            Err(e) => Err(Error::BadRequest(format!("invalid request body: {}", e.body_text()))),
        }
    }
}

/// Path parameters. Refused with 400 when a segment does not decode (bad percent-encoding,
/// not UTF-8, not a number where one is needed).
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(ApiPath(v)),
            // the route and the struct disagree: a bug, not the caller's
            Err(e @ PathRejection::MissingPathParams(_)) => Err(Error::Internal(e.body_text())),
            Err(e) => Err(Error::BadRequest(format!("invalid path: {}", e.body_text()))),
        }
    }
}

/// Query parameters. Refused with 400 when the query does not decode.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| ApiQuery(v))
            .map_err(|e: QueryRejection| Error::BadRequest(format!("invalid query: {}", e.body_text())))
    }
}

/// `/v1/workspaces/{workspace}...`
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct WorkspacePath {
    /// Workspace name.
    #[param(pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")]
    pub workspace: String,
}

/// `/v1/workspaces/{workspace}/versions/{version}...`
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct VersionPath {
    /// Workspace name.
    #[param(pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")]
    pub workspace: String,
    /// Version number or `head`.
    #[param(pattern = "^(head|[0-9]+)$")]
    pub version: String,
}

/// `/v1/workspaces/{workspace}/versions/{version}/files/{path}`
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct FilePath {
    /// Workspace name.
    #[param(pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")]
    pub workspace: String,
    /// Version number or `head`.
    #[param(pattern = "^(head|[0-9]+)$")]
    pub version: String,
    /// Workspace path of the file, may contain `/`.
    pub path: String,
}

/// `/v1/workspaces/{workspace}/blobs/{hash}`
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct BlobPath {
    /// Workspace name.
    #[param(pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")]
    pub workspace: String,
    /// BLAKE3 of the content, 64 lowercase hex digits.
    #[param(pattern = "^[0-9a-f]{64}$")]
    pub hash: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The attribute literals above are these constants (attributes cannot name constants).
    #[test]
    fn documented_patterns_are_the_constants() {
        let doc = serde_json::to_string(&<FilePath as IntoParams>::into_params(|| None)).expect("json");
        let blob = serde_json::to_string(&<BlobPath as IntoParams>::into_params(|| None)).expect("json");
        for (json, pattern) in [(&doc, WORKSPACE_PATTERN), (&doc, VERSION_PATTERN), (&blob, HASH_PATTERN)] {
            assert!(json.contains(&serde_json::to_string(pattern).expect("json")), "{pattern} not in {json}");
        }
    }
}
