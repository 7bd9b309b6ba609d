//! Workspaces and their version log: create, list, look up and delete workspaces; resolve a
//! version selector; list and read version records.
//!
//! It does not check workspace names (the caller does, with `valid_workspace_name`) and does
//! not write versions (`commit.rs` does).

use sqlx::Row;
use sqlx::any::AnyRow;

use super::sql::{now_ms, rfc3339, to_u64};
use super::{LIVE, MetaError, MetaStore, VersionInfo, VersionRef, Workspace, WorkspaceRow};

impl MetaStore {
    /// Creates an empty workspace (head 0). `Conflict` if the name is taken.
    pub async fn create_workspace(&self, name: &str) -> Result<WorkspaceRow, MetaError> {
        let now = now_ms();
        let row = sqlx::query(
            "INSERT INTO workspaces (name, created_at, head, file_count, total_bytes) \
             VALUES ($1, $2, 0, 0, 0) ON CONFLICT (name) DO NOTHING RETURNING id",
        )
        .bind(name)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Err(MetaError::Conflict(format!("workspace {name:?} already exists")));
        };
        Ok(WorkspaceRow {
            id: row.try_get("id")?,
            info: Workspace {
                name: name.to_string(),
                created_at: rfc3339(now)?,
                head: 0,
                file_count: 0,
                total_bytes: 0,
            },
        })
    }

    /// Every workspace, ordered by name (bytewise).
    pub async fn list_workspaces(&self) -> Result<Vec<WorkspaceRow>, MetaError> {
        sqlx::query("SELECT id, name, created_at, head, file_count, total_bytes FROM workspaces ORDER BY name")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(workspace_from_row)
            .collect()
    }

    /// The workspace called `name`, with its current head and counts.
    pub async fn workspace(&self, name: &str) -> Result<WorkspaceRow, MetaError> {
        let row =
            sqlx::query("SELECT id, name, created_at, head, file_count, total_bytes FROM workspaces WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?;
        match row {
            Some(row) => workspace_from_row(&row),
            None => Err(no_workspace(name)),
        }
    }

    /// Deletes a workspace with its versions, entries and tokens, in one transaction. Blobs stay
    /// (they are shared by content). `NotFound` if there is no such workspace.
    pub async fn delete_workspace(&self, name: &str) -> Result<(), MetaError> {
        let mut tx = self.pool.begin().await?;
        // First, so that a concurrent commit either finished before or finds no workspace.
        let row = sqlx::query("DELETE FROM workspaces WHERE name = $1 RETURNING id")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            return Err(no_workspace(name));
        };
        let id: i64 = row.try_get("id")?;
        // The foreign keys cascade; these make the cleanup independent of that setting.
        for sql in [
            "DELETE FROM tokens WHERE workspace_id = $1",
            "DELETE FROM entries WHERE workspace_id = $1",
            "DELETE FROM versions WHERE workspace_id = $1",
            "DELETE FROM peers WHERE workspace_id = $1",
            "DELETE FROM peer_versions WHERE workspace_id = $1",
            "DELETE FROM peer_leases WHERE workspace_id = $1",
        ] {
            sqlx::query(sql).bind(id).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The version number `v` selects, checked against the head as stored now. `NotFound` for
    /// `head` of an empty workspace and for numbers outside `1..=head`.
    pub async fn resolve_version(&self, ws: &WorkspaceRow, v: VersionRef) -> Result<u64, MetaError> {
        let head = self.head(ws.id).await?.ok_or_else(|| no_workspace(&ws.info.name))?;
        match v {
            VersionRef::Head if head == 0 => {
                Err(MetaError::NotFound(format!("workspace {:?} has no version yet", ws.info.name)))
            }
            VersionRef::Head => Ok(head),
            VersionRef::Number(n) if n == 0 || n > head => {
                Err(MetaError::NotFound(format!("workspace {:?} has no version {n} (head is {head})", ws.info.name)))
            }
            VersionRef::Number(n) => Ok(n),
        }
    }

    /// Up to `limit` version records, newest first, only those numbered below `before` if given.
    pub async fn versions(
        &self,
        ws: &WorkspaceRow,
        limit: u32,
        before: Option<u64>,
    ) -> Result<Vec<VersionInfo>, MetaError> {
        let before = before.map_or(LIVE, |b| i64::try_from(b).unwrap_or(LIVE));
        sqlx::query(
            "SELECT number, parent, created_at, message, author, file_count, total_bytes, changes \
             FROM versions WHERE workspace_id = $1 AND number < $2 ORDER BY number DESC LIMIT $3",
        )
        .bind(ws.id)
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| version_from_row(&ws.info.name, row))
        .collect()
    }

    /// The record of version `n`. `NotFound` if the workspace has no such version.
    pub async fn version(&self, ws: &WorkspaceRow, n: u64) -> Result<VersionInfo, MetaError> {
        let missing = || MetaError::NotFound(format!("workspace {:?} has no version {n}", ws.info.name));
        let number = i64::try_from(n).map_err(|_| missing())?;
        let row = sqlx::query(
            "SELECT number, parent, created_at, message, author, file_count, total_bytes, changes \
             FROM versions WHERE workspace_id = $1 AND number = $2",
        )
        .bind(ws.id)
        .bind(number)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => version_from_row(&ws.info.name, &row),
            None => Err(missing()),
        }
    }

    /// The head of a workspace as stored now; `None` if the workspace is gone.
    pub(super) async fn head(&self, ws_id: i64) -> Result<Option<u64>, MetaError> {
        let head: Option<i64> = sqlx::query_scalar("SELECT head FROM workspaces WHERE id = $1")
            .bind(ws_id)
            .fetch_optional(&self.pool)
            .await?;
        head.map(|h| to_u64(h, "head")).transpose()
    }
}

pub(super) fn no_workspace(name: &str) -> MetaError {
    MetaError::NotFound(format!("workspace {name:?} does not exist"))
}

fn workspace_from_row(row: &AnyRow) -> Result<WorkspaceRow, MetaError> {
    Ok(WorkspaceRow {
        id: row.try_get("id")?,
        info: Workspace {
            name: row.try_get("name")?,
            created_at: rfc3339(row.try_get("created_at")?)?,
            head: to_u64(row.try_get("head")?, "head")?,
            file_count: to_u64(row.try_get("file_count")?, "file count")?,
            total_bytes: to_u64(row.try_get("total_bytes")?, "total bytes")?,
        },
    })
}

fn version_from_row(workspace: &str, row: &AnyRow) -> Result<VersionInfo, MetaError> {
    let parent: Option<i64> = row.try_get("parent")?;
    Ok(VersionInfo {
        workspace: workspace.to_string(),
        version: to_u64(row.try_get("number")?, "version")?,
        parent: parent.map(|p| to_u64(p, "parent version")).transpose()?,
        created_at: rfc3339(row.try_get("created_at")?)?,
        message: row.try_get("message")?,
        author: row.try_get("author")?,
        file_count: to_u64(row.try_get("file_count")?, "file count")?,
        total_bytes: to_u64(row.try_get("total_bytes")?, "total bytes")?,
        changes: to_u64(row.try_get("changes")?, "change count")?,
    })
}
