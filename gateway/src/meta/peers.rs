//! The peer tracker's tables (`migrations/*/0005_peers.sql`): devpods serving a workspace, the
//! versions each holds or fetches, single-flight leases per zone, reports of peers that sent
//! bad bytes, and the key capabilities are signed with. Soft state: expired rows are ignored,
//! and deleted on the next write of their workspace.

use std::collections::HashMap;

use podfs_protocol::peer::PeerId;
use sqlx::Row;

use super::sql::{now_ms, to_u64, version_i64};
use super::{ContentHash, MetaError, MetaStore};

/// A peer of the asker's zone that holds a version or is fetching it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderRow {
    pub peer: PeerId,
    pub address: String,
    pub complete: bool,
}

/// Where a peer serves.
#[derive(Debug, Clone)]
pub struct PeerSeat<'a> {
    pub peer: PeerId,
    pub zone: &'a str,
    pub address: &'a str,
    pub serving: u64,
}

/// How long what a plan records lasts, and how many holders it names.
#[derive(Debug, Clone, Copy)]
pub struct PlanTerms {
    /// The asker is recorded as fetching the version for this long.
    pub ttl_ms: i64,
    /// A lease on a unit of this size lasts this long.
    pub lease_ms: fn(u64) -> i64,
    pub max_holders: usize,
}

/// A peer reported by this many requesters (within [`REPORT_WINDOW_MS`]) is handed out no more.
pub const REPORTS_TO_EXCLUDE: i64 = 2;
pub const REPORT_WINDOW_MS: i64 = 10 * 60 * 1000;

fn peer_id(raw: &[u8]) -> Result<PeerId, MetaError> {
    ContentHash::from_slice(raw).map(PeerId).map_err(|e| MetaError::Inconsistent(format!("stored peer id: {e}")))
}

impl MetaStore {
    /// The PKCS#8 Ed25519 key every replica signs capabilities with: the stored one, or
    /// `fresh` stored now if there is none yet (the first replica to ask wins).
    pub async fn peer_signing_key(&self, fresh: &[u8]) -> Result<Vec<u8>, MetaError> {
        sqlx::query("INSERT INTO peer_keys (id, pkcs8, created_at) VALUES (1, $1, $2) ON CONFLICT (id) DO NOTHING")
            .bind(fresh.to_vec())
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        let row = sqlx::query("SELECT pkcs8 FROM peer_keys WHERE id = 1").fetch_one(&self.pool).await?;
        Ok(row.try_get("pkcs8")?)
    }

    /// Records a heartbeat: where `seat` serves, the versions it holds whole (replacing those it
    /// announced before), and the peers it reports.
    pub async fn announce_peer(
        &self,
        ws_id: i64,
        seat: &PeerSeat<'_>,
        versions: &[u64],
        reports: &[PeerId],
        ttl_ms: i64,
    ) -> Result<(), MetaError> {
        let now = now_ms();
        let expires = now + ttl_ms;
        let me = seat.peer.0.as_bytes().to_vec();
        let mut tx = self.pool.begin().await?;
        for sql in [
            "DELETE FROM peers WHERE workspace_id = $1 AND expires_at < $2",
            "DELETE FROM peer_versions WHERE workspace_id = $1 AND expires_at < $2",
            "DELETE FROM peer_leases WHERE workspace_id = $1 AND expires_at < $2",
        ] {
            sqlx::query(sql).bind(ws_id).bind(now).execute(&mut *tx).await?;
        }
        upsert_seat(&mut tx, ws_id, seat, expires).await?;
        sqlx::query("DELETE FROM peer_versions WHERE workspace_id = $1 AND peer = $2 AND complete = 1")
            .bind(ws_id)
            .bind(me.clone())
            .execute(&mut *tx)
            .await?;
        for &v in versions {
            sqlx::query(
                "INSERT INTO peer_versions (workspace_id, version, peer, complete, expires_at) \
                 VALUES ($1, $2, $3, 1, $4) \
                 ON CONFLICT (workspace_id, version, peer) DO UPDATE SET complete = 1, expires_at = $4",
            )
            .bind(ws_id)
            .bind(version_i64(v)?)
            .bind(me.clone())
            .bind(expires)
            .execute(&mut *tx)
            .await?;
        }
        for r in reports.iter().filter(|r| **r != seat.peer) {
            sqlx::query(
                "INSERT INTO peer_reports (peer, reporter, at) VALUES ($1, $2, $3) \
                 ON CONFLICT (peer, reporter) DO UPDATE SET at = $3",
            )
            .bind(r.0.as_bytes().to_vec())
            .bind(me.clone())
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("DELETE FROM peer_reports WHERE at < $1").bind(now - REPORT_WINDOW_MS).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// A cold start of `v` by `seat`: records it as fetching `v` (for `ttl_ms`), releases the
    /// leases of the `exclude`d peers, returns up to `max_holders` other peers of its zone holding or fetching `v` (whole first, least loaded
    /// first, none reported by several requesters), and for each unit the peer that fetches it
    /// from S3 for the zone. A unit without a live lease is leased to the asker (for the time
    /// `lease_ms` gives its size), so its fetcher is the asker itself.
    pub async fn peer_plan(
        &self,
        ws_id: i64,
        v: u64,
        seat: &PeerSeat<'_>,
        units: &[(ContentHash, u64)],
        exclude: &[PeerId],
        terms: &PlanTerms,
    ) -> Result<(Vec<HolderRow>, HashMap<ContentHash, PeerId>), MetaError> {
        let PlanTerms { ttl_ms, lease_ms, max_holders } = *terms;
        let now = now_ms();
        let vi = version_i64(v)?;
        let me = seat.peer.0.as_bytes().to_vec();
        let mut tx = self.pool.begin().await?;
        upsert_seat(&mut tx, ws_id, seat, now + ttl_ms).await?;
        for peer in exclude {
            sqlx::query("DELETE FROM peer_leases WHERE workspace_id = $1 AND version = $2 AND zone = $3 AND peer = $4")
                .bind(ws_id)
                .bind(vi)
                .bind(seat.zone)
                .bind(peer.0.as_bytes().to_vec())
                .execute(&mut *tx)
                .await?;
        }
        let rows = sqlx::query(
            "SELECT pv.peer, p.address, pv.complete FROM peer_versions pv \
             JOIN peers p ON p.workspace_id = pv.workspace_id AND p.peer = pv.peer \
             WHERE pv.workspace_id = $1 AND pv.version = $2 AND p.zone = $3 AND pv.peer <> $4 \
               AND pv.expires_at > $5 AND p.expires_at > $5 \
               AND (SELECT COUNT(*) FROM peer_reports r WHERE r.peer = pv.peer AND r.at > $6) < $7 \
             ORDER BY pv.complete DESC, p.serving, pv.peer LIMIT $8",
        )
        .bind(ws_id)
        .bind(vi)
        .bind(seat.zone)
        .bind(me.clone())
        .bind(now)
        .bind(now - REPORT_WINDOW_MS)
        .bind(REPORTS_TO_EXCLUDE)
        .bind(i64::try_from(max_holders + exclude.len()).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await?;
        let mut holders = Vec::with_capacity(rows.len());
        for r in rows {
            let raw: Vec<u8> = r.try_get("peer")?;
            let complete: i64 = r.try_get("complete")?;
            let peer = peer_id(&raw)?;
            if !exclude.contains(&peer) && holders.len() < max_holders {
                holders.push(HolderRow { peer, address: r.try_get("address")?, complete: complete == 1 });
            }
        }
        sqlx::query(
            "INSERT INTO peer_versions (workspace_id, version, peer, complete, expires_at) VALUES ($1, $2, $3, 0, $4) \
             ON CONFLICT (workspace_id, version, peer) DO UPDATE SET expires_at = $4 WHERE peer_versions.complete = 0",
        )
        .bind(ws_id)
        .bind(vi)
        .bind(me.clone())
        .bind(now + ttl_ms)
        .execute(&mut *tx)
        .await?;
        // take every lease that is free or expired; a concurrent asker's insert waits for ours
        for &(hash, size) in units {
            sqlx::query(
                "INSERT INTO peer_leases (workspace_id, version, zone, hash, peer, expires_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (workspace_id, version, zone, hash) DO UPDATE SET peer = $5, expires_at = $6 \
                 WHERE peer_leases.expires_at <= $7",
            )
            .bind(ws_id)
            .bind(vi)
            .bind(seat.zone)
            .bind(hash.as_bytes().to_vec())
            .bind(me.clone())
            .bind(now + lease_ms(size))
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        let rows = sqlx::query(
            "SELECT l.hash, l.peer, p.address FROM peer_leases l \
             JOIN peers p ON p.workspace_id = l.workspace_id AND p.peer = l.peer \
             WHERE l.workspace_id = $1 AND l.version = $2 AND l.zone = $3",
        )
        .bind(ws_id)
        .bind(vi)
        .bind(seat.zone)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut fetchers = HashMap::with_capacity(rows.len());
        for r in rows {
            let (h, p): (Vec<u8>, Vec<u8>) = (r.try_get("hash")?, r.try_get("peer")?);
            let h = ContentHash::from_slice(&h).map_err(|e| MetaError::Inconsistent(format!("stored lease: {e}")))?;
            let peer = peer_id(&p)?;
            // every fetcher is named among the holders, so that the asker can reach it
            if peer != seat.peer && !holders.iter().any(|x| x.peer == peer) {
                holders.push(HolderRow { peer, address: r.try_get("address")?, complete: false });
            }
            fetchers.insert(h, peer);
        }
        Ok((holders, fetchers))
    }

    /// The distinct contents of files above `above` bytes in version `v`, at most `limit`.
    pub async fn large_contents(
        &self,
        ws_id: i64,
        v: u64,
        above: u64,
        limit: usize,
    ) -> Result<Vec<(ContentHash, u64)>, MetaError> {
        let rows = sqlx::query(
            "SELECT DISTINCT hash, size FROM entries WHERE workspace_id = $1 AND from_version <= $2 \
             AND until_version > $2 AND kind = 'file' AND size > $3 ORDER BY hash LIMIT $4",
        )
        .bind(ws_id)
        .bind(version_i64(v)?)
        .bind(i64::try_from(above).unwrap_or(i64::MAX))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let raw: Vec<u8> = r.try_get("hash")?;
                let hash = ContentHash::from_slice(&raw)
                    .map_err(|e| MetaError::Inconsistent(format!("stored entry hash: {e}")))?;
                Ok((hash, to_u64(r.try_get("size")?, "entry size")?))
            })
            .collect()
    }
}

async fn upsert_seat(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    ws_id: i64,
    seat: &PeerSeat<'_>,
    expires: i64,
) -> Result<(), MetaError> {
    sqlx::query(
        "INSERT INTO peers (workspace_id, peer, zone, address, serving, expires_at) VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (workspace_id, peer) DO UPDATE SET zone = $3, address = $4, serving = $5, expires_at = $6",
    )
    .bind(ws_id)
    .bind(seat.peer.0.as_bytes().to_vec())
    .bind(seat.zone)
    .bind(seat.address)
    .bind(i64::try_from(seat.serving).unwrap_or(i64::MAX))
    .bind(expires)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
