//! Reads of the tree as of a version: the whole tree (streamed), one entry, one directory, the
//! difference between two versions, and the history of one path.
//!
//! A version's tree is the set of rows with `from_version <= V < until_version`. Rows of a
//! committed version never change (later commits only lower `until_version` from LIVE to a
//! number above V), so a read of version V is consistent even when spread over several
//! statements.
//!
//! These reads take version numbers the caller resolved (`resolve_version`); apart from
//! `tree`, which checks the range itself, they do not check that V exists.

use std::collections::BTreeMap;

use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use podfs_protocol::EntryKind;
use sqlx::{AnyPool, Row};

use super::sql::{entry_from_row, to_u64, until, version_i64};
use super::{DiffEntry, DiffKind, Entry, MetaError, MetaStore, PathRevision, WsPath};

/// Entries per page of a streamed tree.
const TREE_PAGE: i64 = 1000;

impl MetaStore {
    /// The whole tree of version `v`, sorted by path (bytewise), as a stream.
    ///
    /// The stream reads pages of 1,000 entries by key (`path > last`), each one short query on
    /// a pooled connection: memory stays bounded and no connection or snapshot is held while a
    /// slow consumer (an HTTP client) reads. The first page checks that `v` is in `0..=head`
    /// (0 is the empty tree); the last checks that the workspace still exists, so a workspace
    /// deleted mid-stream ends the stream with `NotFound`, never with a silently short tree.
    pub fn tree(&self, ws_id: i64, v: u64) -> BoxStream<'static, Result<Entry, MetaError>> {
        let v = match version_i64(v) {
            Ok(v) => v,
            Err(e) => return stream::once(async move { Err(e) }).boxed(),
        };
        let store = self.clone();
        // State: the path to continue after (`None` once the last page is out), and whether
        // the first page has been read.
        stream::try_unfold((Some(String::new()), false), move |(after, first_done)| {
            let store = store.clone();
            async move {
                let Some(after) = after else {
                    return Ok::<_, MetaError>(None);
                };
                if !first_done {
                    store.check_version(ws_id, v).await?;
                }
                let page = tree_page(&store.pool, ws_id, v, &after).await?;
                let next = if (page.len() as i64) < TREE_PAGE {
                    // Last page: make sure it is not short because the workspace went away.
                    store.check_version(ws_id, v).await?;
                    None
                } else {
                    page.last().map(|e| e.path.as_str().to_string())
                };
                Ok(Some((stream::iter(page.into_iter().map(Ok::<Entry, MetaError>)), (next, true))))
            }
        })
        .try_flatten()
        .boxed()
    }

    /// The whole tree of version `v`, sorted by path, read by one statement (one snapshot):
    /// for a caller that holds every entry anyway (a manifest build). Costs one sort of the
    /// version's rows whatever the planner believes about them, where [`Self::tree`]'s pages
    /// each cost a scan of the whole version while the table's statistics still describe it
    /// as nearly empty (right after its first big commit, before `ANALYZE`).
    pub async fn tree_all(&self, ws_id: i64, v: u64) -> Result<Vec<Entry>, MetaError> {
        let v = version_i64(v)?;
        self.check_version(ws_id, v).await?;
        sqlx::query(
            "SELECT path, kind, hash, size, mode FROM entries \
             WHERE workspace_id = $1 AND from_version <= $2 AND until_version > $2 ORDER BY path",
        )
        .bind(ws_id)
        .bind(v)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(entry_from_row)
        .collect()
    }

    /// The entry at `path` in version `v`, if any.
    pub async fn entry(&self, ws_id: i64, v: u64, path: &WsPath) -> Result<Option<Entry>, MetaError> {
        let v = version_i64(v)?;
        let row = sqlx::query(
            "SELECT path, kind, hash, size, mode FROM entries \
             WHERE workspace_id = $1 AND path = $2 AND from_version <= $3 AND until_version > $3",
        )
        .bind(ws_id)
        .bind(path.as_str())
        .bind(v)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(entry_from_row).transpose()
    }

    /// The direct children of `dir` (the top when `None`) in version `v`, sorted by path.
    /// `NotFound` if `dir` does not exist in `v`, `Invalid` if it is not a directory.
    pub async fn list_dir(&self, ws_id: i64, v: u64, dir: Option<&WsPath>) -> Result<Vec<Entry>, MetaError> {
        if let Some(dir) = dir {
            match self.entry(ws_id, v, dir).await? {
                None => {
                    return Err(MetaError::NotFound(format!("{dir} does not exist in version {v}")));
                }
                Some(e) if e.kind != EntryKind::Dir => {
                    return Err(MetaError::Invalid(format!("{dir} is a {}, not a directory", e.kind.as_str())));
                }
                Some(_) => {}
            }
        }
        let v = version_i64(v)?;
        // A self-join rather than one filter: SQLite without statistics assumes
        // `workspace_id = ?` is selective and would read the whole workspace in primary-key
        // order to avoid a sort. Here the children come from `entries_parent` in path order
        // (covering in SQLite), then each row from its primary key; same plan on PostgreSQL.
        sqlx::query(
            "SELECT e.path, e.kind, e.hash, e.size, e.mode FROM entries c CROSS JOIN entries e \
             WHERE c.workspace_id = $1 AND c.parent = $2 AND c.from_version <= $3 AND c.until_version > $3 \
             AND e.workspace_id = c.workspace_id AND e.path = c.path AND e.from_version = c.from_version \
             ORDER BY c.path",
        )
        .bind(ws_id)
        .bind(dir.map_or("", |d| d.as_str()))
        .bind(v)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(entry_from_row)
        .collect()
    }

    /// What changed from version `from` to version `to` (`from <= to`, else `Invalid`), sorted
    /// by path. A path whose content at `to` equals its content at `from` is not listed, however
    /// often it changed in between; neither is a path added and deleted in between.
    pub async fn diff(&self, ws_id: i64, from: u64, to: u64) -> Result<Vec<DiffEntry>, MetaError> {
        if from > to {
            return Err(MetaError::Invalid(format!("cannot diff from version {from} back to version {to}")));
        }
        if from == to {
            return Ok(Vec::new());
        }
        let (from, to) = (version_i64(from)?, version_i64(to)?);
        // Rows live at `from` and closed by `to`: the old side of every changed path.
        let old = sqlx::query(
            "SELECT path, kind, hash, size, mode FROM entries \
             WHERE workspace_id = $1 AND until_version > $2 AND until_version <= $3 AND from_version <= $2",
        )
        .bind(ws_id)
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await?;
        // Rows opened after `from` and live at `to`: the new side.
        let new = sqlx::query(
            "SELECT path, kind, hash, size, mode FROM entries \
             WHERE workspace_id = $1 AND from_version > $2 AND from_version <= $3 AND until_version > $3",
        )
        .bind(ws_id)
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await?;

        let mut sides: BTreeMap<String, (Option<Entry>, Option<Entry>)> = BTreeMap::new();
        for row in &old {
            let e = entry_from_row(row)?;
            let path = e.path.as_str().to_string();
            sides.entry(path).or_default().0 = Some(e);
        }
        for row in &new {
            let e = entry_from_row(row)?;
            let path = e.path.as_str().to_string();
            sides.entry(path).or_default().1 = Some(e);
        }
        Ok(sides
            .into_iter()
            .filter_map(|(path, sides)| {
                let change = match &sides {
                    (Some(old), Some(new)) if old.same_content(new) => return None,
                    (Some(_), Some(_)) => DiffKind::Modified,
                    (Some(_), None) => DiffKind::Deleted,
                    (None, Some(_)) => DiffKind::Added,
                    (None, None) => return None,
                };
                Some(DiffEntry { path, change, old: sides.0, new: sides.1 })
            })
            .collect())
    }

    /// Every content `path` has had, oldest first. `NotFound` if the path never existed.
    pub async fn history(&self, ws_id: i64, path: &WsPath) -> Result<Vec<PathRevision>, MetaError> {
        let rows = sqlx::query(
            "SELECT from_version, until_version, path, kind, hash, size, mode FROM entries \
             WHERE workspace_id = $1 AND path = $2 ORDER BY from_version",
        )
        .bind(ws_id)
        .bind(path.as_str())
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            return Err(MetaError::NotFound(format!("{path} has never existed in this workspace")));
        }
        rows.iter()
            .map(|row| {
                Ok(PathRevision {
                    from_version: to_u64(row.try_get("from_version")?, "version")?,
                    until_version: until(row.try_get("until_version")?)?,
                    entry: entry_from_row(row)?,
                })
            })
            .collect()
    }

    /// `NotFound` unless the workspace exists and `v` is in `0..=head`.
    async fn check_version(&self, ws_id: i64, v: i64) -> Result<(), MetaError> {
        match self.head(ws_id).await? {
            None => Err(MetaError::NotFound(format!("workspace {ws_id} does not exist"))),
            Some(head) if to_u64(v, "version")? > head => {
                Err(MetaError::NotFound(format!("version {v} does not exist (head is {head})")))
            }
            Some(_) => Ok(()),
        }
    }
}

/// Up to `TREE_PAGE` entries of version `v` with paths after `after`, in path order.
async fn tree_page(pool: &AnyPool, ws_id: i64, v: i64, after: &str) -> Result<Vec<Entry>, MetaError> {
    sqlx::query(
        "SELECT path, kind, hash, size, mode FROM entries \
         WHERE workspace_id = $1 AND path > $2 AND from_version <= $3 AND until_version > $3 \
         ORDER BY path LIMIT $4",
    )
    .bind(ws_id)
    .bind(after)
    .bind(v)
    .bind(TREE_PAGE)
    .fetch_all(pool)
    .await?
    .iter()
    .map(entry_from_row)
    .collect()
}
