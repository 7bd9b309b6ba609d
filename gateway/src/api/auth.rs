//! Bearer-token authentication and the right checks.
//!
//! The admin token (from the configuration) may do everything. Workspace tokens, created
//! through the API and stored as BLAKE3 hashes, carry `read` or `write` on one workspace.
//! Missing or unknown token: 401. A right the token lacks, or another workspace: 403, decided
//! before the workspace is looked up so a token does not learn which other workspaces exist.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use podfs_protocol::api::Right;

use crate::error::Error;
use crate::meta::WorkspaceRow;
use crate::server::AppState;

#[derive(Debug, Clone)]
pub enum Caller {
    Admin,
    Workspace { workspace: String, right: Right },
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| Error::Unauthorized("missing bearer token: send `Authorization: Bearer <token>`".into()))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Error::Unauthorized("malformed Authorization header: expected `Bearer <token>`".into()))?;
        if blake3::hash(token.as_bytes()) == state.admin_token_hash {
            return Ok(Caller::Admin);
        }
        match state.meta.token(token).await? {
            Some(row) => Ok(Caller::Workspace { workspace: row.workspace, right: row.right }),
            None => Err(Error::Unauthorized("invalid token".into())),
        }
    }
}

impl Caller {
    pub fn require_admin(&self) -> Result<(), Error> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Workspace { .. } => Err(Error::Forbidden("this needs the admin token".into())),
        }
    }

    /// Checks `right` on the workspace named `name` (before it is looked up).
    pub fn require(&self, name: &str, right: Right) -> Result<(), Error> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Workspace { workspace, right: have } if workspace == name => {
                if *have >= right {
                    Ok(())
                } else {
                    Err(Error::Forbidden(format!(
                        "this token has {} access to workspace {name}; this needs {}",
                        have.as_str(),
                        right.as_str()
                    )))
                }
            }
            Caller::Workspace { .. } => Err(Error::Forbidden(format!("this token has no access to workspace {name}"))),
        }
    }

    /// Checks `right` on `name` and loads the workspace.
    pub async fn workspace(&self, state: &AppState, name: &str, right: Right) -> Result<WorkspaceRow, Error> {
        self.require(name, right)?;
        Ok(state.meta.workspace(name).await?)
    }

    /// The name the author field records for commits made by this caller.
    pub fn author(&self) -> String {
        match self {
            Caller::Admin => "admin".into(),
            Caller::Workspace { workspace, .. } => format!("token:{workspace}"),
        }
    }
}
