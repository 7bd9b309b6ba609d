//! The `manifests` and `manifest_builds` tables: which versions have a built manifest.sqlite,
//! and which replica is building one right now.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::sql::{now_ms, to_u64, version_i64};
use super::{ContentHash, MetaError, MetaStore};

/// A built manifest, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestRow {
    pub version: u64,
    /// BLAKE3 and length of the SQLite file.
    pub hash: ContentHash,
    pub size: u64,
    /// BLAKE3 and length of the stored zstd frame.
    pub stored_hash: ContentHash,
    pub stored_size: u64,
    pub entries: u64,
    pub blobs: u64,
    pub base_version: Option<u64>,
    pub small_file_limit: u64,
    pub build_ms: u64,
}

/// The columns [`from_row`] reads (a macro, so that statements stay literal strings).
macro_rules! columns {
    () => {
        "version, hash, size, stored_hash, stored_size, entries, blobs, base_version, small_file_limit, build_ms"
    };
}

fn from_row(r: &AnyRow) -> Result<ManifestRow, MetaError> {
    let hash = |col: &str| -> Result<ContentHash, MetaError> {
        let raw: Vec<u8> = r.try_get(col)?;
        ContentHash::from_slice(&raw).map_err(|e| MetaError::Inconsistent(format!("stored manifest {col}: {e}")))
    };
    let base: Option<i64> = r.try_get("base_version")?;
    Ok(ManifestRow {
        version: to_u64(r.try_get("version")?, "manifest version")?,
        hash: hash("hash")?,
        size: to_u64(r.try_get("size")?, "manifest size")?,
        stored_hash: hash("stored_hash")?,
        stored_size: to_u64(r.try_get("stored_size")?, "manifest stored size")?,
        entries: to_u64(r.try_get("entries")?, "manifest entries")?,
        blobs: to_u64(r.try_get("blobs")?, "manifest blobs")?,
        base_version: base.map(|b| to_u64(b, "manifest base")).transpose()?,
        small_file_limit: to_u64(r.try_get("small_file_limit")?, "manifest small-file limit")?,
        build_ms: to_u64(r.try_get("build_ms")?, "manifest build time")?,
    })
}

impl MetaStore {
    /// The manifest built for version `v`, if any.
    pub async fn manifest(&self, ws_id: i64, v: u64) -> Result<Option<ManifestRow>, MetaError> {
        let row =
            sqlx::query(concat!("SELECT ", columns!(), " FROM manifests WHERE workspace_id = $1 AND version = $2"))
                .bind(ws_id)
                .bind(version_i64(v)?)
                .fetch_optional(&self.pool)
                .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// The newest manifest built for a version before `v`: the base of a derived build.
    pub async fn manifest_before(&self, ws_id: i64, v: u64) -> Result<Option<ManifestRow>, MetaError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM manifests WHERE workspace_id = $1 AND version < $2 ORDER BY version DESC LIMIT 1"
        ))
        .bind(ws_id)
        .bind(version_i64(v)?)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// Records a built manifest. A second record for the same version (another replica won
    /// the race) changes nothing; the row that stands is returned.
    pub async fn record_manifest(&self, ws_id: i64, m: &ManifestRow) -> Result<ManifestRow, MetaError> {
        let i = |n: u64| i64::try_from(n).map_err(|_| MetaError::Invalid(format!("manifest figure {n} too large")));
        sqlx::query(
            "INSERT INTO manifests (workspace_id, version, hash, size, stored_hash, stored_size, entries, blobs, \
             base_version, small_file_limit, build_ms, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
             ON CONFLICT (workspace_id, version) DO NOTHING",
        )
        .bind(ws_id)
        .bind(version_i64(m.version)?)
        .bind(m.hash.0.to_vec())
        .bind(i(m.size)?)
        .bind(m.stored_hash.0.to_vec())
        .bind(i(m.stored_size)?)
        .bind(i(m.entries)?)
        .bind(i(m.blobs)?)
        .bind(m.base_version.map(i).transpose()?)
        .bind(i(m.small_file_limit)?)
        .bind(i(m.build_ms)?)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        self.manifest(ws_id, m.version).await?.ok_or_else(|| {
            MetaError::Inconsistent(format!("manifest of version {} vanished after recording", m.version))
        })
    }

    /// Claims the build of version `v`'s manifest for `owner`: true when the claim is ours
    /// (new, or taken over from a claim older than `lease_ms`).
    pub async fn claim_manifest_build(
        &self,
        ws_id: i64,
        v: u64,
        owner: &str,
        lease_ms: i64,
    ) -> Result<bool, MetaError> {
        let v = version_i64(v)?;
        let now = now_ms();
        let inserted = sqlx::query(
            "INSERT INTO manifest_builds (workspace_id, version, owner, claimed_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (workspace_id, version) DO NOTHING",
        )
        .bind(ws_id)
        .bind(v)
        .bind(owner)
        .bind(now)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if inserted == 1 {
            return Ok(true);
        }
        let taken = sqlx::query(
            "UPDATE manifest_builds SET owner = $3, claimed_at = $4 \
             WHERE workspace_id = $1 AND version = $2 AND (claimed_at < $5 OR owner = $3)",
        )
        .bind(ws_id)
        .bind(v)
        .bind(owner)
        .bind(now)
        .bind(now - lease_ms)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(taken == 1)
    }

    /// Drops `owner`'s claim (after the build, whether it succeeded or not).
    pub async fn release_manifest_build(&self, ws_id: i64, v: u64, owner: &str) -> Result<(), MetaError> {
        sqlx::query("DELETE FROM manifest_builds WHERE workspace_id = $1 AND version = $2 AND owner = $3")
            .bind(ws_id)
            .bind(version_i64(v)?)
            .bind(owner)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
