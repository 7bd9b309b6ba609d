//! The `blobs` table: which content the gateway has verified and stored, and which of it a
//! workspace references.
//!
//! It records what the blob store reports; it never reads or writes blob bytes, and it does not
//! garbage-collect (nothing here deletes a blob row).

use std::collections::HashSet;

use super::sql::{hashes_found, now_ms, stored_hashes};
use super::{ContentHash, MetaError, MetaStore};

impl MetaStore {
    /// The hashes of `hashes` that have no blob row, in request order, each once.
    pub async fn missing_blobs(&self, hashes: &[ContentHash]) -> Result<Vec<ContentHash>, MetaError> {
        let mut seen = HashSet::with_capacity(hashes.len());
        let unique: Vec<ContentHash> = hashes.iter().copied().filter(|h| seen.insert(*h)).collect();
        let mut conn = self.pool.acquire().await?;
        let stored = stored_hashes(&mut conn, &unique).await?;
        Ok(unique.into_iter().filter(|h| !stored.contains(h)).collect())
    }

    /// Records a verified, stored blob. True if it was not recorded before; recording it again
    /// changes nothing (the first sizes stay).
    pub async fn record_blob(&self, hash: &ContentHash, size: u64, stored_size: u64) -> Result<bool, MetaError> {
        let to_i64 =
            |n: u64| i64::try_from(n).map_err(|_| MetaError::Invalid(format!("blob {hash}: size {n} is too large")));
        let inserted = sqlx::query(
            "INSERT INTO blobs (hash, size, stored_size, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (hash) DO NOTHING",
        )
        .bind(hash.0.to_vec())
        .bind(to_i64(size)?)
        .bind(to_i64(stored_size)?)
        .bind(now_ms())
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(inserted == 1)
    }

    /// Which of `hashes` some version of the workspace references (live or not).
    pub async fn referenced_by(&self, ws_id: i64, hashes: &[ContentHash]) -> Result<HashSet<ContentHash>, MetaError> {
        let mut conn = self.pool.acquire().await?;
        hashes_found(&mut conn, Some(ws_id), hashes, |list| {
            format!("SELECT DISTINCT hash FROM entries WHERE workspace_id = $1 AND hash IN ({list})")
        })
        .await
    }
}
