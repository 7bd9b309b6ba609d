//! Blobs: which are missing, upload (one at a time, or small ones in batches), where to
//! download, download.
//!
//! Uploads stream through the gateway, which hashes them on the way and stores them only when
//! the content matches the name (see ARCHITECTURE.md, "Who moves the bytes"); small ones come
//! in batches and are stored in packs (`docs/pack-format.md`). Downloads go
//! straight to S3 through presigned URLs when the store has them; the gateway serves them
//! otherwise. Downloads are scoped: a workspace token only gets content its workspace references.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use podfs_protocol::ContentHash;
use podfs_protocol::api::{
    BLOB_CONTENT_TYPE, BatchUploaded, BlobLocations, BlobUploaded, ErrorBody, HashBatch, MAX_HASH_BATCH, MissingBlobs,
    Right,
};
use podfs_protocol::pack::BATCH_CONTENT_TYPE;

use super::auth::Caller;
use super::extract::{ApiJson, ApiPath, BlobPath, WorkspacePath};
use crate::error::{Error, Result};
use crate::server::AppState;

fn parse_hash(s: &str) -> Result<ContentHash> {
    s.parse().map_err(|e: podfs_protocol::hash::HashParseError| Error::BadRequest(e.to_string()))
}

fn check_batch(batch: &HashBatch) -> Result<()> {
    if batch.hashes.len() > MAX_HASH_BATCH {
        return Err(Error::TooLarge(format!(
            "{} hashes in one batch; the limit is {MAX_HASH_BATCH}",
            batch.hashes.len()
        )));
    }
    Ok(())
}

/// Which of these hashes the gateway does not hold (so the client uploads only those).
#[utoipa::path(post, path = "/v1/workspaces/{workspace}/blobs/missing", tag = "blobs",
    params(WorkspacePath), request_body = HashBatch,
    responses((status = 200, body = MissingBlobs), (status = 413, description = "more than 10,000 hashes", body = ErrorBody)))]
pub async fn missing(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(WorkspacePath { workspace: name }): ApiPath<WorkspacePath>,
    ApiJson(batch): ApiJson<HashBatch>,
) -> Result<Json<MissingBlobs>> {
    caller.workspace(&state, &name, Right::Write).await?;
    check_batch(&batch)?;
    Ok(Json(MissingBlobs { missing: state.meta.missing_blobs(&batch.hashes).await? }))
}

/// Upload the raw content of a blob named by its BLAKE3 hash. Refused (400 `hash_mismatch`)
/// when the bytes do not hash to the name; nothing is stored then.
#[utoipa::path(put, path = "/v1/workspaces/{workspace}/blobs/{hash}", tag = "blobs",
    params(BlobPath),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, description = "stored", body = BlobUploaded),
        (status = 200, description = "already stored", body = BlobUploaded),
        (status = 400, description = "`hash_mismatch`: the content does not hash to the name; or an invalid hash",
            body = ErrorBody),
        (status = 413, description = "larger than the gateway's max blob size", body = ErrorBody)))]
pub async fn upload(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(BlobPath { workspace: name, hash }): ApiPath<BlobPath>,
    body: Body,
) -> Result<(StatusCode, Json<BlobUploaded>)> {
    caller.workspace(&state, &name, Right::Write).await?;
    let hash = parse_hash(&hash)?;
    let uploaded = state.blobs.ingest(hash, body.into_data_stream()).await?;
    let status = if uploaded.created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(uploaded)))
}

/// Upload many small blobs in one request. The body (content type
/// `application/vnd.podfs.batch`) is the header `PFSU 01 00 00 00` then records of
/// `hash (32 bytes) | stored length (u32 LE) | stored blob` (`docs/pack-format.md`); each
/// stored blob is raw or zstd as the client chose. Each record is verified alone: one that does
/// not decode to its name, or holds content over the pack limit (1 MiB by default), is
/// refused in `refused` and never stored; the others are. The answer comes once every pack is
/// durable in the blob store and recorded.
#[utoipa::path(post, path = "/v1/workspaces/{workspace}/blobs/batch", tag = "blobs",
    params(WorkspacePath),
    request_body(content = Vec<u8>, content_type = "application/vnd.podfs.batch"),
    responses((status = 200, description = "every record stored, already held or refused alone", body = BatchUploaded),
        (status = 400, description = "the body's framing is broken (nothing is stored)", body = ErrorBody),
        (status = 413, description = "the body is over the batch limit (64 MiB)", body = ErrorBody),
        (status = 415, description = "not `application/vnd.podfs.batch`", body = ErrorBody)))]
pub async fn batch(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(WorkspacePath { workspace: name }): ApiPath<WorkspacePath>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<BatchUploaded>> {
    caller.workspace(&state, &name, Right::Write).await?;
    let ctype = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if ctype != BATCH_CONTENT_TYPE {
        return Err(Error::UnsupportedMediaType(format!("a batch is sent as {BATCH_CONTENT_TYPE}, not {ctype:?}")));
    }
    let limit = state.config.max_batch_body;
    let mut stream = body.into_data_stream();
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Error::BadRequest(format!("reading the batch body: {e}")))?;
        if buf.len() + chunk.len() > limit {
            return Err(Error::TooLarge(format!("a batch body is at most {limit} bytes")));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Json(state.blobs.ingest_batch(buf.freeze()).await?))
}

/// Where to download each blob: presigned S3 URLs (fetch without the token), or gateway paths.
/// Only hashes the workspace references are answered.
#[utoipa::path(post, path = "/v1/workspaces/{workspace}/blobs/locations", tag = "blobs",
    params(WorkspacePath), request_body = HashBatch,
    responses((status = 200, description = "a presigned URL per blob (for a packed blob with the exact `range` to send, which its signature covers) or a gateway path", body = BlobLocations),
        (status = 404, description = "a hash the workspace does not reference", body = ErrorBody),
        (status = 413, description = "more than 10,000 hashes", body = ErrorBody)))]
pub async fn locations(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(WorkspacePath { workspace: name }): ApiPath<WorkspacePath>,
    ApiJson(batch): ApiJson<HashBatch>,
) -> Result<Json<BlobLocations>> {
    let ws = caller.workspace(&state, &name, Right::Read).await?;
    check_batch(&batch)?;
    let known = state.meta.referenced_by(ws.id, &batch.hashes).await?;
    if let Some(h) = batch.hashes.iter().find(|h| !known.contains(h)) {
        return Err(Error::NotFound(format!("blob {h} is not part of workspace {name}")));
    }
    let locations = state.blobs.locations(&batch.hashes, |h| format!("/v1/workspaces/{name}/blobs/{h}")).await?;
    Ok(Json(BlobLocations { expires_in_secs: state.blobs.presign_ttl().as_secs(), locations }))
}

/// Download a stored blob as stored (header + raw or zstd payload); verify it before use.
#[utoipa::path(get, path = "/v1/workspaces/{workspace}/blobs/{hash}", tag = "blobs",
    params(BlobPath),
    responses((status = 200, description = "the stored blob, verified: a small one before it is sent (else 500 `corrupt`), a large one as it streams (a transfer that breaks off failed verification)",
            content_type = "application/vnd.podfs.blob"),
        (status = 400, description = "invalid hash", body = ErrorBody),
        (status = 404, description = "a hash the workspace does not reference", body = ErrorBody)))]
pub async fn download(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(BlobPath { workspace: name, hash }): ApiPath<BlobPath>,
) -> Result<Response> {
    let ws = caller.workspace(&state, &name, Right::Read).await?;
    let hash = parse_hash(&hash)?;
    if !state.meta.referenced_by(ws.id, &[hash]).await?.contains(&hash) {
        return Err(Error::NotFound(format!("blob {hash} is not part of workspace {name}")));
    }
    let stream = state.blobs.stored(&hash).await?;
    Ok(([(header::CONTENT_TYPE, BLOB_CONTENT_TYPE)], Body::from_stream(stream)).into_response())
}
