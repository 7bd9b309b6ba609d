//! Bearer tokens: minting a token for a workspace and looking one up.
//!
//! A token is `pfs_` followed by 64 random hex digits; only its BLAKE3 hash is stored, so a
//! database dump reveals no usable token. This file does not decide what a right allows (the
//! API's auth does) nor revoke tokens (deleting the workspace deletes its tokens).

use sqlx::Row;

use super::sql::now_ms;
use super::workspaces::no_workspace;
use super::{MetaError, MetaStore, Right, TokenRow, WorkspaceRow};

/// Prefix of every token, so that a leaked one is recognizable.
const TOKEN_PREFIX: &str = "pfs_";

impl MetaStore {
    /// Mints a token granting `right` on `ws` and returns its text, which is not stored and
    /// cannot be shown again. `NotFound` if the workspace is gone.
    pub async fn create_token(&self, ws: &WorkspaceRow, right: Right, name: Option<&str>) -> Result<String, MetaError> {
        let token = format!("{TOKEN_PREFIX}{}", hex::encode(rand::random::<[u8; 32]>()));
        let inserted = sqlx::query(
            "INSERT INTO tokens (token_hash, workspace_id, \"right\", name, created_at) \
             SELECT $1, id, $3, $4, $5 FROM workspaces WHERE id = $2",
        )
        .bind(token_hash(&token))
        .bind(ws.id)
        .bind(right.as_str())
        .bind(name)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(|e| match e {
            // The workspace was deleted between the SELECT and the INSERT.
            sqlx::Error::Database(db) if db.is_foreign_key_violation() => no_workspace(&ws.info.name),
            e => e.into(),
        })?
        .rows_affected();
        if inserted == 0 {
            return Err(no_workspace(&ws.info.name));
        }
        Ok(token)
    }

    /// What `token` grants, or `None` if it is unknown (or its workspace was deleted).
    pub async fn token(&self, token: &str) -> Result<Option<TokenRow>, MetaError> {
        let row = sqlx::query(
            "SELECT t.workspace_id, w.name, t.\"right\" FROM tokens t \
             JOIN workspaces w ON w.id = t.workspace_id WHERE t.token_hash = $1",
        )
        .bind(token_hash(token))
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let right: String = row.try_get("right")?;
        Ok(Some(TokenRow {
            workspace_id: row.try_get("workspace_id")?,
            workspace: row.try_get("name")?,
            right: Right::parse(&right)
                .ok_or_else(|| MetaError::Inconsistent(format!("stored token right {right:?} is unknown")))?,
        }))
    }
}

fn token_hash(token: &str) -> Vec<u8> {
    blake3::hash(token.as_bytes()).as_bytes().to_vec()
}
