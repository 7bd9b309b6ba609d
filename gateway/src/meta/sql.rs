//! Small helpers shared by the store's statements: placeholder lists for chunked statements,
//! conversions between API integers (`u64`) and database integers (`i64`), times, decoding an
//! entry row, and deciding which database errors are transient.
//!
//! No statement runs here; this file holds no policy beyond those conversions.

use std::collections::HashSet;
use std::fmt::Write as _;

use podfs_protocol::EntryKind;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{ContentHash, Entry, LIVE, MetaError, WsPath};

/// Rows per multi-row statement: at most 500 `IN (...)` items or 500 inserted rows (about 3,000
/// bind parameters), far below SQLite's 32766 and PostgreSQL's 65535.
pub(super) const CHUNK: usize = 500;

/// The statement of one chunk of a chunked loop. A full chunk has the same text every time, so
/// it is prepared once per connection; the last, shorter chunk is parsed for its one use.
pub(super) fn chunk_query<'a>(sql: String, rows: usize) -> sqlx::query::Query<'a, sqlx::Any, sqlx::any::AnyArguments> {
    sqlx::query(sqlx::AssertSqlSafe(sql)).persistent(rows == CHUNK)
}

/// `$first, $first+1, ..., $first+n-1`.
pub(super) fn params(first: usize, n: usize) -> String {
    let mut s = String::with_capacity(n * 6);
    for i in 0..n {
        if i > 0 {
            s.push_str(", ");
        }
        // Writing to a String cannot fail.
        let _ = write!(s, "${}", first + i);
    }
    s
}

/// `($first), ($first+1), ..., ($first+n-1)`: the rows of a one-column `VALUES` list.
pub(super) fn value_rows(first: usize, n: usize) -> String {
    (first..first + n).map(|i| format!("(${i})")).collect::<Vec<_>>().join(", ")
}

/// The current time in unix milliseconds.
pub(super) fn now_ms() -> i64 {
    let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
    i64::try_from(nanos / 1_000_000).unwrap_or(i64::MAX)
}

/// Unix milliseconds as RFC 3339.
pub(super) fn rfc3339(ms: i64) -> Result<String, MetaError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .ok_or_else(|| MetaError::Inconsistent(format!("stored time {ms} ms is out of range")))
}

/// A number read from the database as an API number; negative means corrupt data.
pub(super) fn to_u64(v: i64, what: &str) -> Result<u64, MetaError> {
    u64::try_from(v).map_err(|_| MetaError::Inconsistent(format!("stored {what} {v} is negative")))
}

/// A version number from the API as a database number. Numbers beyond the database range
/// cannot name an existing version.
pub(super) fn version_i64(v: u64) -> Result<i64, MetaError> {
    i64::try_from(v)
        .ok()
        .filter(|v| *v < LIVE)
        .ok_or_else(|| MetaError::NotFound(format!("version {v} does not exist")))
}

/// `until_version` as the API shows it: `None` while live.
pub(super) fn until(v: i64) -> Result<Option<u64>, MetaError> {
    if v == LIVE { Ok(None) } else { to_u64(v, "version").map(Some) }
}

/// Reads an entry from a row with the columns `path, kind, hash, size, mode`.
pub(super) fn entry_from_row(row: &AnyRow) -> Result<Entry, MetaError> {
    let path: String = row.try_get("path")?;
    let kind: String = row.try_get("kind")?;
    let hash: Option<Vec<u8>> = row.try_get("hash")?;
    let size: i64 = row.try_get("size")?;
    let mode: i64 = row.try_get("mode")?;
    let corrupt = |what: &str| MetaError::Inconsistent(format!("stored entry {path:?} has an invalid {what}"));
    Ok(Entry {
        kind: EntryKind::parse(&kind).ok_or_else(|| corrupt("kind"))?,
        hash: hash.map(|h| ContentHash::from_slice(&h)).transpose().map_err(|_| corrupt("hash"))?,
        size: u64::try_from(size).map_err(|_| corrupt("size"))?,
        mode: u32::try_from(mode).map_err(|_| corrupt("mode"))?,
        path: WsPath::new(path.as_str()).map_err(|_| corrupt("path"))?,
    })
}

/// Which of `hashes` have a row in `blobs`, checked in chunks on one connection (which may be
/// inside a transaction).
pub(super) async fn stored_hashes(
    conn: &mut AnyConnection,
    pg: bool,
    hashes: &[ContentHash],
) -> Result<HashSet<ContentHash>, MetaError> {
    hashes_found(conn, None, hashes, |first, n| blob_probe_sql(pg, "hash", first, n)).await
}

/// `SELECT columns FROM blobs` for the `n` hashes bound from `$first`. On PostgreSQL, one
/// primary-key probe per hash (`VALUES ... CROSS JOIN LATERAL (... OFFSET 0)`, the fence
/// keeping the planner from flattening it back): `hash IN (500 hashes)` is planned as a scan
/// of the whole table once 500 hashes are a sizable part of it (a store of 50,000 blobs: 10 ms
/// per chunk, 1 s for the rows of a 50,000-file manifest, where the probes take 1 ms per
/// chunk). Elsewhere `hash IN (...)`.
pub(super) fn blob_probe_sql(pg: bool, columns: &str, first: usize, n: usize) -> String {
    if pg {
        format!(
            "SELECT b.* FROM (VALUES {}) AS p (h) CROSS JOIN LATERAL \
             (SELECT {columns} FROM blobs WHERE hash = p.h OFFSET 0) AS b",
            value_rows(first, n)
        )
    } else {
        format!("SELECT {columns} FROM blobs WHERE hash IN ({})", params(first, n))
    }
}

/// Runs the query `sql(first, n)`, which selects a `hash` column for the `n` hashes bound from
/// `$first`, over `hashes` in chunks and collects the hashes it finds. With `workspace`, `$1`
/// is bound to it and the hash placeholders start at `$2`.
pub(super) async fn hashes_found(
    conn: &mut AnyConnection,
    workspace: Option<i64>,
    hashes: &[ContentHash],
    sql: impl Fn(usize, usize) -> String,
) -> Result<HashSet<ContentHash>, MetaError> {
    let mut found = HashSet::new();
    let first = if workspace.is_some() { 2 } else { 1 };
    for chunk in hashes.chunks(CHUNK) {
        let mut query = chunk_query(sql(first, chunk.len()), chunk.len());
        if let Some(ws) = workspace {
            query = query.bind(ws);
        }
        for h in chunk {
            query = query.bind(h.0.to_vec());
        }
        for row in query.fetch_all(&mut *conn).await? {
            let raw: Vec<u8> = row.try_get("hash")?;
            found.insert(stored_hash(&raw)?);
        }
    }
    Ok(found)
}

/// A hash column read back from the database.
pub(super) fn stored_hash(raw: &[u8]) -> Result<ContentHash, MetaError> {
    ContentHash::from_slice(raw).map_err(|e| MetaError::Inconsistent(format!("stored {e}")))
}

/// The first few hashes of a list, for messages.
pub(super) fn hash_list(hashes: &[ContentHash]) -> String {
    const SHOWN: usize = 5;
    let mut s = hashes.iter().take(SHOWN).map(|h| h.to_hex()).collect::<Vec<_>>().join(", ");
    if hashes.len() > SHOWN {
        let _ = write!(s, ", ... ({} more)", hashes.len() - SHOWN);
    }
    s
}

/// True for errors that say "the database is not reachable or not answering right now":
/// pool timeouts, I/O and TLS failures, lost connections, PostgreSQL shutting down or out of
/// connections, deadlocks, SQLite still busy after its timeout.
pub(super) fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let Some(code) = db.code() else { return false };
            if db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>().is_some() {
                // 08: connection exception; 57P01-03: shutdown / cannot connect now;
                // 53300: too many connections; 40001 / 40P01: serialization failure / deadlock.
                code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01")
            } else {
                // SQLite extended codes: the primary code is the low byte.
                // 5 BUSY, 6 LOCKED, 10 IOERR, 13 FULL, 14 CANTOPEN.
                code.parse::<i32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6 | 10 | 13 | 14))
            }
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholder_lists() {
        assert_eq!(params(1, 3), "$1, $2, $3");
        assert_eq!(params(4, 1), "$4");
        assert_eq!(params(2, 0), "");
        assert_eq!(value_rows(3, 2), "($3), ($4)");
    }

    #[test]
    fn times_and_numbers() {
        assert_eq!(rfc3339(0).ok().as_deref(), Some("1970-01-01T00:00:00Z"));
        assert_eq!(rfc3339(1_500).ok().as_deref(), Some("1970-01-01T00:00:01.5Z"));
        assert!(to_u64(-1, "size").is_err());
        assert!(matches!(version_i64(u64::MAX), Err(MetaError::NotFound(_))));
        assert!(matches!(version_i64(LIVE as u64), Err(MetaError::NotFound(_))));
        assert_eq!(until(LIVE).ok(), Some(None));
        assert_eq!(until(3).ok(), Some(Some(3)));
    }
}
