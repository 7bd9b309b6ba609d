//! The `blobs` table: which content the gateway has verified and stored, and which of it a
//! workspace references.
//!
//! It records what the blob store reports; it never reads or writes blob bytes, and it does not
//! garbage-collect (nothing here deletes a blob row). A pack row, with the list of every span
//! written into the pack, is recorded together with the blobs it holds, in one transaction,
//! after the pack is durable.

use std::collections::{HashMap, HashSet};

use futures::StreamExt;
use podfs_protocol::pack::{self, Span};
use sqlx::Row;

use super::sql::{
    CHUNK, blob_probe_sql, chunk_query, hashes_found, now_ms, params, stored_hash, stored_hashes, to_u64,
};
use super::{ContentHash, MetaError, MetaStore};

/// Where a recorded blob's stored bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobRow {
    pub hash: ContentHash,
    /// Content bytes.
    pub size: u64,
    /// Stored bytes (header and payload).
    pub stored_size: u64,
    /// `None`: its own object; else the pack and the offset in it.
    pub pack: Option<(ContentHash, u64)>,
}

impl BlobRow {
    /// For a packed blob: its pack and the bytes of the pack it takes.
    pub fn pack_range(&self) -> Option<(ContentHash, std::ops::Range<u64>)> {
        self.pack.map(|(pack, offset)| (pack, offset..offset + self.stored_size))
    }
}

/// A pack the blob store holds, to record with its blobs.
#[derive(Debug, Clone)]
pub struct NewPack {
    pub hash: ContentHash,
    pub size: u64,
    /// Every stored blob in the pack, with its content length.
    pub spans: Vec<(Span, u64)>,
}

/// Chunks of [`MetaStore::blob_rows`] in flight at once.
const ROW_READS: usize = 4;

fn to_i64(n: u64, what: &str) -> Result<i64, MetaError> {
    i64::try_from(n).map_err(|_| MetaError::Invalid(format!("{what}: {n} is too large")))
}

impl MetaStore {
    /// The hashes of `hashes` that have no blob row, in request order, each once.
    pub async fn missing_blobs(&self, hashes: &[ContentHash]) -> Result<Vec<ContentHash>, MetaError> {
        let mut seen = HashSet::with_capacity(hashes.len());
        let unique: Vec<ContentHash> = hashes.iter().copied().filter(|h| seen.insert(*h)).collect();
        let mut conn = self.pool.acquire().await?;
        let stored = stored_hashes(&mut conn, self.postgres, &unique).await?;
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
        hashes_found(&mut conn, Some(ws_id), hashes, |first, n| {
            format!("SELECT DISTINCT hash FROM entries WHERE workspace_id = $1 AND hash IN ({})", params(first, n))
        })
        .await
    }

    /// Records a pack the blob store holds and every blob in it, in one transaction: the pack
    /// row with its span list (every stored blob written into it, copies of content recorded
    /// before included: what garbage collection counts as live or dead bytes), and a blob row
    /// for each content not recorded before (its location is this pack). Returns how many
    /// blobs became referenceable. Recording the same pack again changes nothing.
    pub async fn record_pack(&self, pack: &NewPack) -> Result<u64, MetaError> {
        let now = now_ms();
        let spans: Vec<Span> = pack.spans.iter().map(|(s, _)| *s).collect();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO packs (hash, size, blobs, created_at, spans) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (hash) DO NOTHING",
        )
        .bind(pack.hash.0.to_vec())
        .bind(to_i64(pack.size, "pack size")?)
        .bind(to_i64(pack.spans.len() as u64, "pack blobs")?)
        .bind(now)
        .bind(pack::encode_spans(&spans))
        .execute(&mut *tx)
        .await?;
        // one row per content: the first copy in the pack is its location
        let mut seen = HashSet::new();
        let firsts: Vec<&(Span, u64)> = pack.spans.iter().filter(|(s, _)| seen.insert(s.hash)).collect();
        let mut created = 0;
        for chunk in firsts.chunks(CHUNK) {
            let rows: Vec<String> = (0..chunk.len()).map(|i| format!("({})", params(6 * i + 1, 6))).collect();
            let sql = format!(
                "INSERT INTO blobs (hash, size, stored_size, created_at, pack, pack_offset) VALUES {} \
                 ON CONFLICT (hash) DO NOTHING",
                rows.join(", ")
            );
            let mut q = chunk_query(sql, chunk.len());
            for (span, size) in chunk {
                q = q
                    .bind(span.hash.0.to_vec())
                    .bind(to_i64(*size, "blob size")?)
                    .bind(to_i64(span.len, "stored size")?)
                    .bind(now)
                    .bind(pack.hash.0.to_vec())
                    .bind(to_i64(span.offset, "pack offset")?);
            }
            created += q.execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
        Ok(created)
    }

    /// The blob rows of those of `hashes` that are recorded, read [`ROW_READS`] chunks at once
    /// (a manifest build asks for 50,000).
    pub async fn blob_rows(&self, hashes: &[ContentHash]) -> Result<HashMap<ContentHash, BlobRow>, MetaError> {
        let mut out = HashMap::with_capacity(hashes.len());
        let chunks: Vec<Vec<ContentHash>> = hashes.chunks(CHUNK).map(<[ContentHash]>::to_vec).collect();
        let mut chunks = futures::stream::iter(chunks)
            .map(|chunk| {
                let sql = blob_probe_sql(self.postgres, "hash, size, stored_size, pack, pack_offset", 1, chunk.len());
                let pool = self.pool.clone();
                async move {
                    let mut q = chunk_query(sql, chunk.len());
                    for h in &chunk {
                        q = q.bind(h.0.to_vec());
                    }
                    q.fetch_all(&pool).await
                }
            })
            .buffer_unordered(ROW_READS);
        while let Some(rows) = chunks.next().await {
            for row in rows? {
                let hash = stored_hash(&row.try_get::<Vec<u8>, _>("hash")?)?;
                let pack: Option<Vec<u8>> = row.try_get("pack")?;
                let offset: Option<i64> = row.try_get("pack_offset")?;
                let pack = match (pack, offset) {
                    (None, _) => None,
                    (Some(p), Some(o)) => Some((stored_hash(&p)?, to_u64(o, "pack offset")?)),
                    (Some(_), None) => {
                        return Err(MetaError::Inconsistent(format!("blob {hash} names a pack but no offset")));
                    }
                };
                let b = BlobRow {
                    hash,
                    size: to_u64(row.try_get("size")?, "blob size")?,
                    stored_size: to_u64(row.try_get("stored_size")?, "stored size")?,
                    pack,
                };
                out.insert(hash, b);
            }
        }
        Ok(out)
    }

    /// The blob row of `hash`, if it is recorded.
    pub async fn blob_row(&self, hash: &ContentHash) -> Result<Option<BlobRow>, MetaError> {
        Ok(self.blob_rows(&[*hash]).await?.remove(hash))
    }

    /// The span list of a recorded pack (every stored blob written into it, in offset order),
    /// or `None` when no such pack is recorded.
    pub async fn pack_spans(&self, hash: &ContentHash) -> Result<Option<Vec<Span>>, MetaError> {
        let row = sqlx::query("SELECT spans FROM packs WHERE hash = $1")
            .bind(hash.0.to_vec())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            let list: Vec<u8> = r.try_get("spans")?;
            pack::decode_spans(&list).map_err(|e| MetaError::Inconsistent(format!("pack {hash}: {e}")))
        })
        .transpose()
    }

    /// Every recorded pack: hash, size and the number of stored blobs written into it, by hash.
    pub async fn packs(&self) -> Result<Vec<(ContentHash, u64, u64)>, MetaError> {
        let rows = sqlx::query("SELECT hash, size, blobs FROM packs ORDER BY hash").fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                Ok((
                    stored_hash(&r.try_get::<Vec<u8>, _>("hash")?)?,
                    to_u64(r.try_get("size")?, "pack size")?,
                    to_u64(r.try_get("blobs")?, "pack blobs")?,
                ))
            })
            .collect()
    }
}
