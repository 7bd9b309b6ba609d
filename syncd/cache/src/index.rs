//! `index.sqlite`: which units (loose objects, packs) the cache holds, their size on disk and
//! last use, and which unit holds which content. The index is a hint: a listed file may be gone
//! (another process evicted it), and every read is verified anyway.
//!
//! SQLite in WAL mode with a busy timeout, shared by every process using the cache directory;
//! writes are short `BEGIN IMMEDIATE` transactions.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use podfs_protocol::ContentHash;
use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};

use crate::error::{Context, Error, Result};
use crate::packs::file_uri;

/// `PRAGMA user_version` of index.sqlite.
const INDEX_VERSION: i64 = 1;
/// Hashes per `IN (...)` query.
const IN_BATCH: usize = 500;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS units (
    id INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused: the pack pool is keyed by it
    kind INTEGER NOT NULL,                -- 0 loose object, 1 pack
    key BLOB NOT NULL,                    -- content hash (loose) or file hash (pack)
    size INTEGER NOT NULL,                -- bytes on disk
    last_used INTEGER NOT NULL,           -- unix ms
    UNIQUE (kind, key)
);
CREATE INDEX IF NOT EXISTS units_lru ON units (last_used, id);
CREATE TABLE IF NOT EXISTS content (
    hash BLOB NOT NULL,
    unit INTEGER NOT NULL,
    size INTEGER NOT NULL,
    blob_id INTEGER,                      -- blobs.id inside a pack
    PRIMARY KEY (hash, unit)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS content_unit ON content (unit);
";

/// What kind of file a unit is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnitKind {
    /// `objects/<2 hex>/<hash>`: one content.
    Loose,
    /// `packs/<file hash>.sqlite`: a verified manifest whose `blobs` table holds many.
    Pack,
}

impl UnitKind {
    fn to_sql(self) -> i64 {
        match self {
            UnitKind::Loose => 0,
            UnitKind::Pack => 1,
        }
    }

    fn from_sql(n: i64) -> Result<Self> {
        match n {
            0 => Ok(UnitKind::Loose),
            1 => Ok(UnitKind::Pack),
            other => Err(Error::BadIndex(format!("unit kind {other}"))),
        }
    }
}

/// One place the index says a content is.
#[derive(Debug, Clone)]
pub struct Unit {
    pub id: i64,
    pub kind: UnitKind,
    /// The content hash (loose) or the pack file's hash.
    pub key: ContentHash,
    /// `blobs.id` inside a pack.
    pub blob_id: Option<i64>,
}

/// A unit the eviction removes: its rows are gone once the caller committed.
pub struct Victim {
    pub kind: UnitKind,
    pub key: ContentHash,
    pub size: u64,
}

pub struct Index {
    conn: Mutex<Connection>,
}

impl Index {
    /// Opens (creating, migrating) the index at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let what = || format!("opening the cache index {}", path.display());
        let mut conn = open_connection(path).context(what)?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).context(what)?;
        let found: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0)).context(what)?;
        if found > INDEX_VERSION {
            return Err(Error::Version { path: path.to_path_buf(), found, known: INDEX_VERSION });
        }
        tx.execute_batch(SCHEMA).context(what)?;
        tx.pragma_update(None, "user_version", INDEX_VERSION).context(what)?;
        tx.commit().context(what)?;
        Ok(Self { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Which of `hashes` the index lists.
    pub fn contains(&self, hashes: &[ContentHash]) -> Result<HashSet<ContentHash>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mut found = HashSet::new();
        for chunk in hashes.chunks(IN_BATCH) {
            let sql = format!("SELECT DISTINCT hash FROM content WHERE hash IN ({})", placeholders(1, chunk.len()));
            let mut st = tx.prepare_cached(&sql)?;
            bind_hashes(&mut st, 1, chunk)?;
            let mut rows = st.raw_query();
            while let Some(row) = rows.next()? {
                found.insert(hash_of(row.get_ref(0)?.as_blob().map_err(rusqlite::Error::from)?)?);
            }
        }
        tx.commit()?;
        Ok(found)
    }

    /// Whether the index lists the unit (`kind`, `key`).
    pub fn listed(&self, kind: UnitKind, key: &ContentHash) -> Result<bool> {
        let conn = self.conn();
        let mut st = conn.prepare_cached("SELECT 1 FROM units WHERE kind = ?1 AND key = ?2")?;
        Ok(st.query_row(params![kind.to_sql(), &key.as_bytes()[..]], |_| Ok(())).optional()?.is_some())
    }

    /// The units holding `hash` with length `size`, loose objects first.
    pub fn lookup(&self, hash: &ContentHash, size: u64) -> Result<Vec<Unit>> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(
            "SELECT u.id, u.kind, u.key, c.blob_id FROM content c JOIN units u ON u.id = c.unit \
             WHERE c.hash = ?1 AND c.size = ?2 ORDER BY u.kind, u.last_used DESC",
        )?;
        let rows = st.query_map(params![&hash.as_bytes()[..], sql_int(size)], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get::<_, Vec<u8>>(2)?, r.get(3)?))
        })?;
        let mut units = Vec::new();
        for row in rows {
            let (id, kind, key, blob_id) = row?;
            units.push(Unit { id, kind: UnitKind::from_sql(kind)?, key: hash_of(&key)?, blob_id });
        }
        Ok(units)
    }

    /// Lists the loose object `hash` (`size` bytes of content).
    pub fn add_loose(&self, hash: &ContentHash, size: u64) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let id = upsert_unit(&tx, UnitKind::Loose, hash, disk_size(size))?;
        tx.execute(
            "INSERT OR IGNORE INTO content (hash, unit, size, blob_id) VALUES (?1, ?2, ?3, NULL)",
            params![&hash.as_bytes()[..], id, sql_int(size)],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Lists the pack at `path` (`size` bytes, named `file_hash`) and those of its BLOBs no unit
    /// holds yet, in one transaction. Successive versions share most contents, and listing
    /// 30,000 hashes again per pull would rewrite most pages of a large index, so a content stays
    /// listed at the unit that brought it first.
    pub fn add_pack(&self, path: &Path, file_hash: &ContentHash, size: u64) -> Result<()> {
        let mut conn = self.conn();
        conn.execute("ATTACH DATABASE ?1 AS pack", [format!("{}?immutable=1&mode=ro", file_uri(path))])?;
        let result = (|| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let id = upsert_unit(&tx, UnitKind::Pack, file_hash, disk_size(size))?;
            // In hash order, so the probes and inserts walk the index once. octet_length() reads
            // the record header only, not the BLOB.
            tx.execute(
                "INSERT OR IGNORE INTO content (hash, unit, size, blob_id) \
                 SELECT hash, ?1, octet_length(data), id FROM pack.blobs AS b \
                 WHERE typeof(hash) = 'blob' AND length(hash) = 32 \
                 AND NOT EXISTS (SELECT 1 FROM content AS c WHERE c.hash = b.hash) ORDER BY hash",
                [id],
            )?;
            tx.commit()
        })();
        let detached = conn.execute("DETACH DATABASE pack", []);
        result.and(detached.map(|_| ())).context(|| format!("indexing the pack {}", path.display()))
    }

    /// Marks the units holding `hashes` as used now.
    pub fn touch(&self, hashes: &[ContentHash]) -> Result<()> {
        let now = now_ms();
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for chunk in hashes.chunks(IN_BATCH) {
            let sql = format!(
                "UPDATE units SET last_used = ?1 WHERE last_used < ?1 \
                 AND id IN (SELECT unit FROM content WHERE hash IN ({}))",
                placeholders(2, chunk.len())
            );
            let mut st = tx.prepare_cached(&sql)?;
            st.raw_bind_parameter(1, now)?;
            bind_hashes(&mut st, 2, chunk)?;
            st.raw_execute()?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Forgets the unit `id` and what it holds.
    pub fn forget(&self, id: i64) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        delete_unit(&tx, id)?;
        tx.commit()?;
        Ok(())
    }

    /// Bytes on disk and number of units.
    pub fn usage(&self) -> Result<(u64, u64)> {
        let sql = "SELECT coalesce(sum(size), 0), count(*) FROM units";
        let (bytes, units): (i64, i64) = self.conn().query_row(sql, [], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok((bytes as u64, units as u64))
    }

    /// One eviction step: while the total exceeds `limit`, the least recently used units (at
    /// most `batch`) are handed to `remove` (which deletes the file) and their rows deleted, in
    /// one transaction. Returns the units removed and the total left; call again while it
    /// removes some and the total is above the limit.
    pub fn evict_step(
        &self,
        limit: u64,
        batch: i64,
        remove: &mut dyn FnMut(&Victim) -> Result<()>,
    ) -> Result<(Vec<Victim>, u64)> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut total = tx.query_row("SELECT coalesce(sum(size), 0) FROM units", [], |r| r.get::<_, i64>(0))? as u64;
        let mut removed = Vec::new();
        if total > limit {
            let rows = tx
                .prepare_cached("SELECT id, kind, key, size FROM units ORDER BY last_used, id LIMIT ?1")?
                .query_map([batch], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, Vec<u8>>(2)?, r.get::<_, i64>(3)?)))?
                .collect::<rusqlite::Result<Vec<(i64, i64, Vec<u8>, i64)>>>()?;
            for (id, kind, key, size) in rows {
                if total <= limit {
                    break;
                }
                let v = Victim { kind: UnitKind::from_sql(kind)?, key: hash_of(&key)?, size: size as u64 };
                remove(&v)?;
                delete_unit(&tx, id)?;
                total = total.saturating_sub(v.size);
                removed.push(v);
            }
        }
        tx.commit()?;
        Ok((removed, total))
    }

    /// Ids of the packs listed.
    pub fn pack_ids(&self) -> Result<HashSet<i64>> {
        let conn = self.conn();
        let ids = conn
            .prepare_cached("SELECT id FROM units WHERE kind = ?1")?
            .query_map([UnitKind::Pack.to_sql()], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(ids)
    }

    /// Content rows listed at the unit `id` (tests: what a pack brought in).
    #[cfg(test)]
    pub fn content_rows(&self, kind: UnitKind, key: &ContentHash) -> Result<u64> {
        let sql = "SELECT count(*) FROM content c JOIN units u ON u.id = c.unit WHERE u.kind = ?1 AND u.key = ?2";
        let n: i64 = self.conn().query_row(sql, params![kind.to_sql(), &key.as_bytes()[..]], |r| r.get(0))?;
        Ok(n as u64)
    }
}

fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI; // so that ATTACH takes a `file:...?immutable=1` URI
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "cache_size", -16384)?; // 16 MiB: probing 30,000 hashes per pack
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_TRUSTED_SCHEMA, false)?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

/// Inserts the unit or, when it is already listed, refreshes its size and use; returns its id.
fn upsert_unit(tx: &rusqlite::Transaction<'_>, kind: UnitKind, key: &ContentHash, size: u64) -> rusqlite::Result<i64> {
    tx.query_row(
        "INSERT INTO units (kind, key, size, last_used) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (kind, key) DO UPDATE SET size = excluded.size, last_used = excluded.last_used \
         RETURNING id",
        params![kind.to_sql(), &key.as_bytes()[..], sql_int(size), now_ms()],
        |r| r.get(0),
    )
}

fn delete_unit(tx: &rusqlite::Transaction<'_>, id: i64) -> rusqlite::Result<()> {
    tx.execute("DELETE FROM content WHERE unit = ?1", [id])?;
    tx.execute("DELETE FROM units WHERE id = ?1", [id])?;
    Ok(())
}

fn hash_of(bytes: &[u8]) -> Result<ContentHash> {
    ContentHash::from_slice(bytes).map_err(|e| Error::BadIndex(e.to_string()))
}

fn bind_hashes(st: &mut rusqlite::Statement<'_>, first: usize, hashes: &[ContentHash]) -> rusqlite::Result<()> {
    hashes.iter().enumerate().try_for_each(|(i, h)| st.raw_bind_parameter(first + i, &h.as_bytes()[..]))
}

/// `?first, ?first+1, ...`: `count` parameters.
fn placeholders(first: usize, count: usize) -> String {
    (first..first + count).map(|i| format!("?{i}")).collect::<Vec<_>>().join(",")
}

/// Size on disk: the length rounded up to 4 KiB blocks.
pub fn disk_size(len: u64) -> u64 {
    len.div_ceil(4096).saturating_mul(4096)
}

fn sql_int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| sql_int(d.as_millis() as u64))
}
