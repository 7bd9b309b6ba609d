//! Versions: list, get, and commit a new version from a parent and a list of changes.

use std::time::Instant;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use podfs_protocol::VersionRef;
use podfs_protocol::api::{CommitRequest, ErrorBody, Right, VersionInfo, VersionList, VersionListQuery};

use super::auth::Caller;
use super::extract::{ApiJson, ApiPath, ApiQuery, VersionPath, WorkspacePath};
use crate::error::{Error, Result};
use crate::meta::{CommitInput, WorkspaceRow};
use crate::server::AppState;

/// Longest commit message or author accepted, in bytes.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;
/// Default and largest page of the version list.
pub const DEFAULT_LIST_LIMIT: u32 = 100;
pub const MAX_LIST_LIMIT: u32 = 1000;

/// Parses a `{version}` path segment (a number or `head`) and resolves it in `ws`.
pub async fn resolve(state: &AppState, ws: &WorkspaceRow, version: &str) -> Result<u64> {
    let v: VersionRef =
        version.parse().map_err(|e: podfs_protocol::tree::VersionRefError| Error::BadRequest(e.to_string()))?;
    Ok(state.meta.resolve_version(ws, v).await?)
}

/// List versions, newest first.
#[utoipa::path(get, path = "/v1/workspaces/{workspace}/versions", tag = "versions",
    params(WorkspacePath, VersionListQuery), responses((status = 200, body = VersionList)))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(WorkspacePath { workspace: name }): ApiPath<WorkspacePath>,
    ApiQuery(q): ApiQuery<VersionListQuery>,
) -> Result<Json<VersionList>> {
    let ws = caller.workspace(&state, &name, Right::Read).await?;
    let limit = q.limit.unwrap_or(DEFAULT_LIST_LIMIT).clamp(1, MAX_LIST_LIMIT);
    Ok(Json(VersionList { versions: state.meta.versions(&ws, limit, q.before).await? }))
}

/// Get one version (a number or `head`).
#[utoipa::path(get, path = "/v1/workspaces/{workspace}/versions/{version}", tag = "versions",
    params(VersionPath), responses((status = 200, body = VersionInfo)))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(VersionPath { workspace: name, version }): ApiPath<VersionPath>,
) -> Result<Json<VersionInfo>> {
    let ws = caller.workspace(&state, &name, Right::Read).await?;
    let v = resolve(&state, &ws, &version).await?;
    Ok(Json(state.meta.version(&ws, v).await?))
}

/// Commit a new version: `changes` applied to `parent_version`, which must be the head.
/// The whole version becomes visible at once, or nothing does.
#[utoipa::path(post, path = "/v1/workspaces/{workspace}/versions", tag = "versions",
    params(WorkspacePath), request_body = CommitRequest,
    responses((status = 201, body = VersionInfo),
        (status = 400, description = "invalid change, broken tree rule, or `missing_blobs`", body = ErrorBody),
        (status = 409, description = "parent_version is no longer the head", body = ErrorBody)))]
pub async fn commit(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(WorkspacePath { workspace: name }): ApiPath<WorkspacePath>,
    ApiJson(req): ApiJson<CommitRequest>,
) -> Result<(StatusCode, Json<VersionInfo>)> {
    let ws = caller.workspace(&state, &name, Right::Write).await?;
    let message = req.message.unwrap_or_default();
    let author = req.author.unwrap_or_else(|| caller.author());
    if message.len() > MAX_MESSAGE_LEN || author.len() > MAX_MESSAGE_LEN {
        return Err(Error::BadRequest(format!("message and author are limited to {MAX_MESSAGE_LEN} bytes")));
    }
    let changes = req.changes.len();
    let started = Instant::now();
    let info = state
        .meta
        .commit(&ws, CommitInput { parent_version: req.parent_version, message, author, changes: req.changes })
        .await?;
    metrics::histogram!("podfs_commit_seconds").record(started.elapsed().as_secs_f64());
    metrics::counter!("podfs_commits_total").increment(1);
    tracing::info!(workspace = %name, version = info.version, changes, "committed");
    Ok((StatusCode::CREATED, Json(info)))
}
