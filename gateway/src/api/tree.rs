//! Reading trees: the JSON manifest of a version (streamed), one directory, the diff of two
//! versions, and the history of one path.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use podfs_protocol::WsPath;
use podfs_protocol::api::{
    Diff, DiffQuery, DirListing, DirQuery, ErrorBody, HistoryQuery, Manifest, PathHistory, Right,
};
use tokio_stream::wrappers::ReceiverStream;

use super::auth::Caller;
use super::extract::{ApiPath, ApiQuery, VersionPath, WorkspacePath};
use super::versions::resolve;
use crate::error::{Error, Result};
use crate::server::AppState;

/// Bytes gathered before a chunk of the manifest is sent.
const MANIFEST_CHUNK: usize = 64 * 1024;

/// The whole tree of a version as JSON (the Phase 1 manifest), entries sorted by path.
/// Streamed straight from the database, so its size is not bounded by memory.
#[utoipa::path(get, path = "/v1/workspaces/{workspace}/versions/{version}/manifest", tag = "trees",
    params(VersionPath), responses((status = 200, body = Manifest)))]
pub async fn manifest(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(VersionPath { workspace: name, version }): ApiPath<VersionPath>,
) -> Result<Response> {
    let ws = caller.workspace(&state, &name, Right::Read).await?;
    let v = resolve(&state, &ws, &version).await?;
    let mut rows = state.meta.tree(ws.id, v);
    let head =
        format!("{{\"workspace\":{},\"version\":{v},\"entries\":[", serde_json::to_string(&name).unwrap_or_default());
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(8);
    tokio::spawn(async move {
        let mut buf = BytesMut::from(head.as_bytes());
        let mut first = true;
        while let Some(row) = rows.next().await {
            let entry = match row {
                Ok(e) => e,
                Err(e) => {
                    // the client sees a truncated body, never a manifest that looks complete
                    tracing::error!(workspace = %name, version = v, "manifest stream failed: {e}");
                    let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                    return;
                }
            };
            if !first {
                buf.put_u8(b',');
            }
            first = false;
            if serde_json::to_writer((&mut buf).writer(), &entry).is_err() {
                let _ = tx.send(Err(std::io::Error::other("serializing an entry"))).await;
                return;
            }
            if buf.len() >= MANIFEST_CHUNK && tx.send(Ok(buf.split().freeze())).await.is_err() {
                return;
            }
        }
        buf.extend_from_slice(b"]}");
        let _ = tx.send(Ok(buf.freeze())).await;
    });
    Ok(([(header::CONTENT_TYPE, "application/json")], Body::from_stream(ReceiverStream::new(rx))).into_response())
}

/// List one directory of a version (direct children, sorted).
#[utoipa::path(get, path = "/v1/workspaces/{workspace}/versions/{version}/tree", tag = "trees",
    params(VersionPath, DirQuery),
    responses((status = 200, body = DirListing), (status = 400, description = "invalid path, or not a directory", body = ErrorBody)))]
pub async fn list_dir(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(VersionPath { workspace: name, version }): ApiPath<VersionPath>,
    ApiQuery(q): ApiQuery<DirQuery>,
) -> Result<Json<DirListing>> {
    let ws = caller.workspace(&state, &name, Right::Read).await?;
    let v = resolve(&state, &ws, &version).await?;
    let dir = match q.path.as_deref() {
        None | Some("") => None,
        Some(p) => Some(WsPath::new(p)?),
    };
    let entries = state.meta.list_dir(ws.id, v, dir.as_ref()).await?;
    Ok(Json(DirListing {
        workspace: name,
        version: v,
        path: dir.map(WsPath::into_string).unwrap_or_default(),
        entries,
    }))
}

/// The changes from one version to another, sorted by path.
#[utoipa::path(get, path = "/v1/workspaces/{workspace}/diff", tag = "trees",
    params(WorkspacePath, DiffQuery),
    responses((status = 200, body = Diff), (status = 400, description = "invalid version, or from > to", body = ErrorBody)))]
pub async fn diff(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(WorkspacePath { workspace: name }): ApiPath<WorkspacePath>,
    ApiQuery(q): ApiQuery<DiffQuery>,
) -> Result<Json<Diff>> {
    let ws = caller.workspace(&state, &name, Right::Read).await?;
    let from = resolve(&state, &ws, &q.from).await?;
    let to = resolve(&state, &ws, &q.to).await?;
    if from > to {
        return Err(Error::BadRequest(format!("diff needs from <= to (got from={from}, to={to})")));
    }
    let changes = state.meta.diff(ws.id, from, to).await?;
    Ok(Json(Diff { workspace: name, from, to, changes }))
}

/// Every content one path has had, oldest first.
#[utoipa::path(get, path = "/v1/workspaces/{workspace}/history", tag = "trees",
    params(WorkspacePath, HistoryQuery),
    responses((status = 200, body = PathHistory), (status = 400, description = "invalid path", body = ErrorBody)))]
pub async fn history(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(WorkspacePath { workspace: name }): ApiPath<WorkspacePath>,
    ApiQuery(q): ApiQuery<HistoryQuery>,
) -> Result<Json<PathHistory>> {
    let ws = caller.workspace(&state, &name, Right::Read).await?;
    let path = WsPath::new(q.path)?;
    let revisions = state.meta.history(ws.id, &path).await?;
    Ok(Json(PathHistory { workspace: name, path: path.into_string(), revisions }))
}
