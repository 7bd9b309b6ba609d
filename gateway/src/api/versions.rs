//! Versions: list, get, and commit a new version from a parent and a list of changes.

use std::time::Instant;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use podfs_protocol::VersionRef;
use podfs_protocol::api::{CommitRequest, ErrorBody, Right, VersionInfo, VersionList, VersionListQuery};

use super::auth::Caller;
use super::json::ApiJson;
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
    params(("workspace" = String, Path), VersionListQuery),
    responses((status = 200, body = VersionList), (status = 404, body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<VersionListQuery>,
) -> Result<Json<VersionList>> {
    let ws = caller.workspace(&state, &name, Right::Read).await?;
    let limit = q.limit.unwrap_or(DEFAULT_LIST_LIMIT).clamp(1, MAX_LIST_LIMIT);
    Ok(Json(VersionList { versions: state.meta.versions(&ws, limit, q.before).await? }))
}

/// Get one version (a number or `head`).
#[utoipa::path(get, path = "/v1/workspaces/{workspace}/versions/{version}", tag = "versions",
    params(("workspace" = String, Path), ("version" = String, Path, description = "version number or `head`")),
    responses((status = 200, body = VersionInfo), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<VersionInfo>> {
    let ws = caller.workspace(&state, &name, Right::Read).await?;
    let v = resolve(&state, &ws, &version).await?;
    Ok(Json(state.meta.version(&ws, v).await?))
}

/// Commit a new version: `changes` applied to `parent_version`, which must be the head.
/// The whole version becomes visible at once, or nothing does.
#[utoipa::path(post, path = "/v1/workspaces/{workspace}/versions", tag = "versions",
    params(("workspace" = String, Path)), request_body = CommitRequest,
    responses((status = 201, body = VersionInfo),
        (status = 400, description = "invalid change, broken tree rule, or `missing_blobs`", body = ErrorBody),
        (status = 409, description = "parent_version is no longer the head", body = ErrorBody)))]
pub async fn commit(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
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
