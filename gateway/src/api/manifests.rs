//! `GET .../versions/{version}/manifest.sqlite`: a version's manifest.sqlite in its transfer
//! form (one zstd frame), built on first request; with `?since=N`, a delta manifest.
//!
//! Headers state what the client must check before opening the file: `x-podfs-manifest-hash`
//! and `x-podfs-manifest-size` describe the decompressed SQLite file; `ETag` is that hash.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use podfs_protocol::api::{
    ErrorBody, MANIFEST_BASE_HEADER, MANIFEST_HASH_HEADER, MANIFEST_SIZE_HEADER, ManifestQuery, Right, VERSION_HEADER,
};

use super::auth::Caller;
use super::extract::{ApiPath, ApiQuery, VersionPath};
use super::files::{etag_matches, header_value};
use super::versions::resolve;
use crate::error::{Error, Result};
use crate::server::AppState;

/// A version's manifest.sqlite (whole tree + bytes of small files) as one zstd frame.
#[utoipa::path(get, path = "/v1/workspaces/{workspace}/versions/{version}/manifest.sqlite", tag = "trees",
    params(VersionPath, ManifestQuery, ("If-None-Match" = Option<String>, Header)),
    responses(
        (status = 200, description = "the manifest: one zstd frame of a SQLite file (docs/manifest-format.md)",
            content_type = "application/zstd",
            headers(("x-podfs-manifest-hash" = String, description = "BLAKE3 of the decompressed file"),
                ("x-podfs-manifest-size" = u64, description = "length of the decompressed file"))),
        (status = 304, description = "the ETag matches"),
        (status = 400, description = "invalid version, or `since` is 0 or newer than the version", body = ErrorBody)))]
pub async fn get_manifest(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(VersionPath { workspace: name, version }): ApiPath<VersionPath>,
    ApiQuery(query): ApiQuery<ManifestQuery>,
    headers: HeaderMap,
) -> Result<Response> {
    let ws = caller.workspace(&state, &name, Right::Read).await?;
    let v = resolve(&state, &ws, &version).await?;
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(podfs_manifest::TRANSFER_CONTENT_TYPE));
    h.insert(VERSION_HEADER, header_value(&v.to_string())?);
    let immutable = version != "head";
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(if immutable { "private, max-age=31536000, immutable" } else { "private, no-cache" }),
    );
    if let Some(since) = query.since {
        if since > v {
            return Err(Error::BadRequest(format!("since={since} is newer than version {v}")));
        }
        if since == 0 {
            return Err(Error::BadRequest("since=0: ask for the whole manifest instead".into()));
        }
        // the base version must exist too
        resolve(&state, &ws, &since.to_string()).await?;
        let delta = state.manifests.delta(&ws, since, v).await?;
        let c = delta.compressed;
        h.insert(MANIFEST_BASE_HEADER, header_value(&since.to_string())?);
        h.insert(MANIFEST_HASH_HEADER, header_value(&c.hash.to_hex())?);
        h.insert(MANIFEST_SIZE_HEADER, header_value(&c.size.to_string())?);
        h.insert(header::CONTENT_LENGTH, header_value(&c.stored_size.to_string())?);
        let body = Body::from_stream(crate::manifests::file_stream(delta.file));
        return Ok((StatusCode::OK, h, body).into_response());
    }
    let built = state.manifests.get_or_build(&ws, v).await?;
    let m = &built.row;
    let etag = format!("\"{}\"", m.hash);
    h.insert(header::ETAG, header_value(&etag)?);
    h.insert(MANIFEST_HASH_HEADER, header_value(&m.hash.to_hex())?);
    h.insert(MANIFEST_SIZE_HEADER, header_value(&m.size.to_string())?);
    if let Some(inm) = headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok())
        && etag_matches(inm, &etag)
    {
        return Ok((StatusCode::NOT_MODIFIED, h).into_response());
    }
    h.insert(header::CONTENT_LENGTH, header_value(&m.stored_size.to_string())?);
    let stream = state.manifests.frame(built).await?;
    Ok((StatusCode::OK, h, Body::from_stream(stream)).into_response())
}
