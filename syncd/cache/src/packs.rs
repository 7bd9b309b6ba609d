//! Packs: verified `manifest.sqlite` files kept whole under `packs/<file hash>.sqlite`, whose
//! `blobs` table holds many small contents. Read through pooled read-only connections opened
//! immutable, defensive and with an untrusted schema; every BLOB is hashed before it is used.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};

use podfs_protocol::ContentHash;
use rusqlite::config::DbConfig;
use rusqlite::types::ValueRef;
use rusqlite::{Connection, ErrorCode, MAIN_DB, OpenFlags};

use crate::error::{Context, Result};
use crate::{Found, Miss, check};

/// Buffer for streaming pack BLOBs.
const CHUNK: usize = 256 * 1024;
/// Idle connections kept per pack.
const POOL_PER_PACK: usize = 8;

/// Idle read-only connections per pack unit id.
#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<i64, Vec<Connection>>>,
}

impl Pool {
    fn idle(&self) -> MutexGuard<'_, HashMap<i64, Vec<Connection>>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` with a connection to the pack `unit` at `path` (pooled, else opened); a
    /// connection that served a good read goes back to the pool.
    pub fn with<T>(&self, unit: i64, path: &Path, f: impl FnOnce(&Connection) -> Result<Found<T>>) -> Result<Found<T>> {
        let pooled = self.idle().get_mut(&unit).and_then(Vec::pop);
        let conn = match pooled {
            Some(conn) => conn,
            None => match open(path) {
                Ok(conn) => conn,
                Err(_) if !path.exists() => return Ok(Err(Miss::Vanished)),
                Err(e) if is_corrupt(&e) => return Ok(Err(Miss::Corrupt(e.to_string()))),
                Err(e) => return Err(e).context(|| format!("opening the pack {}", path.display())),
            },
        };
        let found = f(&conn)?;
        if found.is_ok() {
            let mut idle = self.idle();
            let conns = idle.entry(unit).or_default();
            if conns.len() < POOL_PER_PACK {
                conns.push(conn);
            }
        }
        Ok(found)
    }

    /// Closes the idle connections of `unit`.
    pub fn drop_unit(&self, unit: i64) {
        self.idle().remove(&unit);
    }

    /// Keeps only the connections of packs `keep` says are still listed.
    pub fn retain(&self, keep: impl Fn(i64) -> bool) {
        self.idle().retain(|id, _| keep(*id));
    }

    #[cfg(test)]
    pub fn max_idle(&self) -> usize {
        self.idle().values().map(Vec::len).max().unwrap_or(0)
    }
}

#[cfg(test)]
pub const MAX_IDLE: usize = POOL_PER_PACK;

/// A read-only connection to a pack: immutable, defensive, untrusted schema.
fn open(path: &Path) -> rusqlite::Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
    let conn = Connection::open_with_flags(format!("{}?immutable=1", file_uri(path)), flags)?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_TRUSTED_SCHEMA, false)?;
    conn.pragma_update(None, "trusted_schema", "OFF")?;
    conn.pragma_update(None, "query_only", "ON")?;
    conn.pragma_update(None, "cell_size_check", "ON")?;
    // Reads the header and the schema now: a file that is not a database fails here.
    conn.query_row("SELECT count(*) FROM sqlite_schema", [], |_| Ok(()))?;
    Ok(conn)
}

fn is_corrupt(e: &rusqlite::Error) -> bool {
    matches!(e.sqlite_error_code(), Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase))
}

/// The bytes of BLOB `id` if it has `size` of them (the caller verifies the hash).
pub fn read_blob(conn: &Connection, id: i64, size: u64) -> Found<Vec<u8>> {
    let data = conn.prepare_cached("SELECT data FROM blobs WHERE id = ?1").and_then(|mut st| {
        st.query_row([id], |r| match r.get_ref(0)? {
            ValueRef::Blob(b) | ValueRef::Text(b) if b.len() as u64 == size => Ok(Some(b.to_vec())),
            _ => Ok(None),
        })
    });
    match data {
        Ok(Some(data)) => Ok(data),
        Ok(None) => Err(Miss::Corrupt(format!("BLOB {id} is not {size} bytes"))),
        Err(e) => Err(Miss::Corrupt(format!("BLOB {id}: {e}"))),
    }
}

/// Streams BLOB `id` to `out`, hashing as it goes.
pub fn stream_blob(conn: &Connection, id: i64, hash: &ContentHash, size: u64, out: &mut File) -> Result<Found<()>> {
    let corrupt = |e: &dyn std::fmt::Display| Ok(Err(Miss::Corrupt(format!("BLOB {id}: {e}"))));
    let mut blob = match conn.blob_open(MAIN_DB, "blobs", "data", id, true) {
        Ok(blob) if blob.len() as u64 == size => blob,
        Ok(blob) => return corrupt(&format_args!("{} bytes, expected {size}", blob.len())),
        Err(e) => return corrupt(&e),
    };
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK.min(blob.len()).max(1)];
    loop {
        let n = match blob.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => return corrupt(&e),
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).context(|| "writing content from the cache".into())?;
    }
    Ok(check(hash, size, hasher.finalize().into(), hasher.count()))
}

/// `file:` URI of `path`, every byte but unreserved ones and `/` percent-encoded.
pub fn file_uri(path: &Path) -> String {
    let mut uri = String::from("file:");
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            uri.push(char::from(b));
        } else {
            let _ = write!(uri, "%{b:02x}");
        }
    }
    uri
}
