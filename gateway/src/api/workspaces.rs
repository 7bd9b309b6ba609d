//! Workspaces: create, list, get, delete; and workspace tokens.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use podfs_protocol::api::{
    CreateToken, CreateWorkspace, ErrorBody, Right, TokenCreated, Workspace, WorkspaceList, valid_workspace_name,
};

use super::auth::Caller;
use super::extract::{ApiJson, ApiPath, WorkspacePath};
use crate::error::{Error, Result};
use crate::server::AppState;

/// Create a workspace (admin).
#[utoipa::path(post, path = "/v1/workspaces", tag = "workspaces", request_body = CreateWorkspace,
    responses((status = 201, body = Workspace), (status = 400, description = "invalid workspace name", body = ErrorBody),
        (status = 403, description = "this needs the admin token", body = ErrorBody),
        (status = 409, description = "the name is taken", body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<CreateWorkspace>,
) -> Result<(StatusCode, Json<Workspace>)> {
    caller.require_admin()?;
    if !valid_workspace_name(&req.name) {
        return Err(Error::BadRequest(format!(
            "invalid workspace name {:?}: use 1-128 of A-Z a-z 0-9 . _ -, not starting with .",
            req.name
        )));
    }
    let ws = state.meta.create_workspace(&req.name).await?;
    tracing::info!(workspace = %req.name, "workspace created");
    Ok((StatusCode::CREATED, Json(ws.info)))
}

/// List the workspaces the token can see (all for admin).
#[utoipa::path(get, path = "/v1/workspaces", tag = "workspaces", responses((status = 200, body = WorkspaceList)))]
pub async fn list(State(state): State<AppState>, caller: Caller) -> Result<Json<WorkspaceList>> {
    let all = state.meta.list_workspaces().await?;
    let workspaces =
        all.into_iter().filter(|w| caller.require(&w.info.name, Right::Read).is_ok()).map(|w| w.info).collect();
    Ok(Json(WorkspaceList { workspaces }))
}

/// Get one workspace.
#[utoipa::path(get, path = "/v1/workspaces/{workspace}", tag = "workspaces",
    params(WorkspacePath), responses((status = 200, body = Workspace)))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(WorkspacePath { workspace: name }): ApiPath<WorkspacePath>,
) -> Result<Json<Workspace>> {
    Ok(Json(caller.workspace(&state, &name, Right::Read).await?.info))
}

/// Delete a workspace and all its versions (admin). Content shared with other workspaces stays.
#[utoipa::path(delete, path = "/v1/workspaces/{workspace}", tag = "workspaces",
    params(WorkspacePath), responses((status = 204, description = "deleted")))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(WorkspacePath { workspace: name }): ApiPath<WorkspacePath>,
) -> Result<StatusCode> {
    caller.require_admin()?;
    state.meta.delete_workspace(&name).await?;
    tracing::info!(workspace = %name, "workspace deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// Create a token with read or write access to one workspace (admin). The token is shown once.
#[utoipa::path(post, path = "/v1/workspaces/{workspace}/tokens", tag = "workspaces",
    params(WorkspacePath), request_body = CreateToken,
    responses((status = 201, body = TokenCreated), (status = 400, description = "an `admin` right", body = ErrorBody)))]
pub async fn create_token(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(WorkspacePath { workspace: name }): ApiPath<WorkspacePath>,
    ApiJson(req): ApiJson<CreateToken>,
) -> Result<(StatusCode, Json<TokenCreated>)> {
    caller.require_admin()?;
    if req.right == Right::Admin {
        return Err(Error::BadRequest("a workspace token has `read` or `write` right, not `admin`".into()));
    }
    let ws = state.meta.workspace(&name).await?;
    let token = state.meta.create_token(&ws, req.right, req.name.as_deref()).await?;
    Ok((StatusCode::CREATED, Json(TokenCreated { token, workspace: name, right: req.right, name: req.name })))
}
