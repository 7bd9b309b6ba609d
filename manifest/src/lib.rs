//! The `manifest.sqlite` format (see `docs/manifest-format.md`): one version's whole tree plus
//! the bytes of its small files, in one SQLite file, moved as one zstd frame.
//!
//! The gateway writes it ([`Writer`]); clients read it ([`Reader`]) only after the whole file
//! hashed to the value the gateway stated ([`transfer::decompress_verified`]), open it
//! read-only with SQLite's defensive settings, and still check every BLOB against its content
//! hash before using it ([`Reader::blob`]). The same schema carries a *delta* manifest (the
//! changes from one version to another), which adds the `deleted` table's rows.

pub mod transfer;

use std::path::Path;

use podfs_protocol::tree::EntryError;
use podfs_protocol::{ContentHash, Entry, EntryKind, WsPath};
use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

/// `PRAGMA application_id`: "PFSM".
pub const APPLICATION_ID: i32 = 0x5046_534d;
/// `PRAGMA user_version`: bumped on any incompatible schema change.
pub const FORMAT_VERSION: i32 = 1;
/// Files (and symlinks) up to this many bytes have their bytes inside the manifest by default.
pub const DEFAULT_SMALL_FILE_LIMIT: u64 = 128 * 1024;
/// The HTTP content type of the transfer form (one zstd frame of the SQLite file).
pub const TRANSFER_CONTENT_TYPE: &str = podfs_protocol::frame::CONTENT_TYPE;

const SCHEMA: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE entries (
    path TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('file', 'symlink', 'dir')),
    mode INTEGER NOT NULL,
    size INTEGER NOT NULL,
    hash BLOB
) WITHOUT ROWID;
CREATE TABLE blobs (id INTEGER PRIMARY KEY, hash BLOB NOT NULL UNIQUE, data BLOB NOT NULL);
CREATE TABLE deleted (path TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE replaced (
    path TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('file', 'symlink', 'dir')),
    mode INTEGER NOT NULL,
    size INTEGER NOT NULL,
    hash BLOB
) WITHOUT ROWID;
";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("manifest database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("manifest I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a podfs manifest: {0}")]
    Format(String),
    #[error("manifest entry {path:?}: {problem}")]
    BadEntry { path: String, problem: String },
    #[error("manifest BLOB {hash} does not hash to its name (it hashes to {actual})")]
    BlobMismatch { hash: ContentHash, actual: ContentHash },
    #[error("manifest transfer frame")]
    Frame(#[source] podfs_protocol::frame::FrameError),
    #[error("manifest file hashes to {actual}, the gateway stated {expected}")]
    FileMismatch { expected: ContentHash, actual: ContentHash },
    #[error("manifest file is {actual} bytes, the gateway stated {expected}")]
    SizeMismatch { expected: u64, actual: u64 },
}

impl From<EntryError> for Error {
    fn from(e: EntryError) -> Self {
        Error::BadEntry { path: String::new(), problem: e.to_string() }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A whole tree, or the changes from `base` to `version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Full,
    Delta { base: u64 },
}

/// What the `meta` table says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub workspace: String,
    pub version: u64,
    pub kind: Kind,
    /// Files and symlinks up to this size have their bytes in `blobs`.
    pub small_file_limit: u64,
}

/// Builds a manifest file. Everything happens in one transaction with the journal off (the
/// file is a scratch file until it is complete and hashed); [`Writer::finish`] commits.
pub struct Writer {
    conn: Connection,
}

impl Writer {
    /// Creates a new manifest at `path` (which must not exist).
    pub fn create(path: &Path, header: &Header) -> Result<Self> {
        if path.exists() {
            return Err(Error::Io(std::io::Error::new(std::io::ErrorKind::AlreadyExists, path.display().to_string())));
        }
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "page_size", 4096)?;
        conn.pragma_update(None, "application_id", APPLICATION_ID)?;
        conn.pragma_update(None, "user_version", FORMAT_VERSION)?;
        let w = Self::begin(conn)?;
        w.conn.execute_batch(SCHEMA)?;
        w.set_header(header)?;
        Ok(w)
    }

    /// Opens an existing (verified) manifest at `path` to turn it into another version's: the
    /// "nearest earlier manifest plus the diff" build. Deleted BLOBs are zeroed
    /// (`secure_delete`) so stale bytes neither leak nor cost transfer size.
    pub fn modify(path: &Path, header: &Header) -> Result<Self> {
        let conn = Connection::open(path)?;
        check_format(&conn)?;
        conn.pragma_update(None, "secure_delete", "ON")?;
        let w = Self::begin(conn)?;
        w.conn.execute("DELETE FROM deleted", [])?;
        w.conn.execute("DELETE FROM replaced", [])?;
        w.set_header(header)?;
        Ok(w)
    }

    fn begin(conn: Connection) -> Result<Self> {
        conn.pragma_update(None, "journal_mode", "OFF")?;
        conn.pragma_update(None, "synchronous", "OFF")?;
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
        conn.execute_batch("BEGIN")?;
        Ok(Self { conn })
    }

    fn set_header(&self, h: &Header) -> Result<()> {
        let (kind, base) = match h.kind {
            Kind::Full => ("full", None),
            Kind::Delta { base } => ("delta", Some(base)),
        };
        self.conn.execute("DELETE FROM meta", [])?;
        let mut put = self.conn.prepare("INSERT INTO meta (key, value) VALUES (?1, ?2)")?;
        put.execute(params!["format", FORMAT_VERSION.to_string()])?;
        put.execute(params!["workspace", h.workspace])?;
        put.execute(params!["version", h.version.to_string()])?;
        put.execute(params!["kind", kind])?;
        put.execute(params!["small_file_limit", h.small_file_limit.to_string()])?;
        if let Some(base) = base {
            put.execute(params!["base_version", base.to_string()])?;
        }
        Ok(())
    }

    /// Adds or replaces the entry at `e.path`.
    pub fn put_entry(&mut self, e: &Entry) -> Result<()> {
        self.upsert("INSERT OR REPLACE INTO entries (path, kind, mode, size, hash) VALUES (?1, ?2, ?3, ?4, ?5)", e)
    }

    /// Runs `sql` (an upsert into `entries` or `replaced`, which share their columns) for `e`.
    fn upsert(&self, sql: &str, e: &Entry) -> Result<()> {
        self.conn.prepare_cached(sql)?.execute(params![
            e.path.as_str(),
            e.kind.as_str(),
            e.mode,
            e.size as i64,
            e.hash.as_ref().map(|h| h.as_bytes().as_slice())
        ])?;
        Ok(())
    }

    /// Removes the entry at `path` (a full manifest) and records it as deleted (a delta).
    pub fn delete_entry(&mut self, path: &str, record: bool) -> Result<()> {
        self.conn.prepare_cached("DELETE FROM entries WHERE path = ?1")?.execute([path])?;
        if record {
            self.conn.prepare_cached("INSERT OR IGNORE INTO deleted (path) VALUES (?1)")?.execute([path])?;
        }
        Ok(())
    }

    /// Records what `e.path` held at the base version (a delta), so that a client can check
    /// that the path it is about to change still holds what the base said.
    pub fn put_replaced(&mut self, e: &Entry) -> Result<()> {
        self.upsert("INSERT OR REPLACE INTO replaced (path, kind, mode, size, hash) VALUES (?1, ?2, ?3, ?4, ?5)", e)
    }

    /// Adds the bytes of `hash`; the caller has verified them. Adding twice is a no-op.
    pub fn put_blob(&mut self, hash: &ContentHash, data: &[u8]) -> Result<()> {
        let mut st = self.conn.prepare_cached("INSERT OR IGNORE INTO blobs (hash, data) VALUES (?1, ?2)")?;
        st.execute(params![hash.as_bytes().as_slice(), data])?;
        Ok(())
    }

    /// Whether the BLOB of `hash` is already in the file.
    pub fn has_blob(&self, hash: &ContentHash) -> Result<bool> {
        let mut st = self.conn.prepare_cached("SELECT 1 FROM blobs WHERE hash = ?1")?;
        Ok(st.exists([hash.as_bytes().as_slice()])?)
    }

    /// Drops BLOBs no entry refers to any more (after a diff was applied).
    pub fn drop_unreferenced_blobs(&mut self) -> Result<u64> {
        let n = self
            .conn
            .execute("DELETE FROM blobs WHERE hash NOT IN (SELECT hash FROM entries WHERE hash IS NOT NULL)", [])?;
        Ok(n as u64)
    }

    /// Counts (entries, blobs) of the file as it stands.
    pub fn counts(&self) -> Result<(u64, u64)> {
        let entries: i64 = self.conn.query_row("SELECT count(*) FROM entries", [], |r| r.get(0))?;
        let blobs: i64 = self.conn.query_row("SELECT count(*) FROM blobs", [], |r| r.get(0))?;
        Ok((entries as u64, blobs as u64))
    }

    /// Commits and closes the file.
    pub fn finish(self) -> Result<()> {
        self.conn.execute_batch("COMMIT")?;
        self.conn.close().map_err(|(_, e)| Error::Sqlite(e))?;
        Ok(())
    }
}

fn check_format(conn: &Connection) -> Result<()> {
    let app: i32 = conn.pragma_query_value(None, "application_id", |r| r.get(0))?;
    if app != APPLICATION_ID {
        return Err(Error::Format(format!("application_id is {app:#x}, not {APPLICATION_ID:#x}")));
    }
    let v: i32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if v != FORMAT_VERSION {
        return Err(Error::Format(format!("format version {v}; this podfs reads version {FORMAT_VERSION}")));
    }
    Ok(())
}

/// A manifest opened for reading: read-only, immutable, defensive, untrusted schema.
pub struct Reader {
    conn: Connection,
}

/// One row of `entries`, with where its bytes are.
#[derive(Debug, Clone)]
pub struct Row {
    pub entry: Entry,
    /// `blobs.id` of its bytes when they are inside the manifest.
    pub blob_id: Option<i64>,
}

impl Reader {
    /// Opens `path`. Call only on a file whose hash was checked (see `transfer`); the
    /// settings here are the second line of defence against a hostile file.
    pub fn open(path: &Path) -> Result<Self> {
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
        let uri = format!("file:{}?immutable=1", uri_path(path));
        let conn = Connection::open_with_flags(uri, flags)?;
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)?;
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_TRUSTED_SCHEMA, false)?;
        conn.pragma_update(None, "query_only", "ON")?;
        conn.pragma_update(None, "cell_size_check", "ON")?;
        conn.pragma_update(None, "mmap_size", 0)?;
        check_format(&conn)?;
        for table in ["meta", "entries", "blobs", "deleted", "replaced"] {
            let sql: Option<String> = conn
                .query_row("SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = ?1", [table], |r| r.get(0))
                .optional()?;
            if sql.is_none() {
                return Err(Error::Format(format!("table {table} is missing")));
            }
        }
        let views: i64 =
            conn.query_row("SELECT count(*) FROM sqlite_schema WHERE type IN ('view', 'trigger')", [], |r| r.get(0))?;
        if views != 0 {
            return Err(Error::Format("a manifest has no views or triggers".into()));
        }
        Ok(Self { conn })
    }

    pub fn header(&self) -> Result<Header> {
        let get = |key: &str| -> Result<Option<String>> {
            Ok(self.conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).optional()?)
        };
        let need =
            |key: &str| -> Result<String> { get(key)?.ok_or_else(|| Error::Format(format!("meta {key} missing"))) };
        let num = |key: &str, s: String| -> Result<u64> {
            s.parse().map_err(|_| Error::Format(format!("meta {key} is not a number: {s:?}")))
        };
        let kind = match need("kind")?.as_str() {
            "full" => Kind::Full,
            "delta" => Kind::Delta { base: num("base_version", need("base_version")?)? },
            other => return Err(Error::Format(format!("unknown manifest kind {other:?}"))),
        };
        Ok(Header {
            workspace: need("workspace")?,
            version: num("version", need("version")?)?,
            kind,
            small_file_limit: num("small_file_limit", need("small_file_limit")?)?,
        })
    }

    /// Calls `f` with every entry in path order (byte order), each with the id of its BLOB when
    /// the bytes are inside. Fields are checked (valid path, kind, mode, hash length); the
    /// tree-level rules (sorted, no duplicates, closed tree) are the caller's.
    pub fn for_each_entry(&self, mut f: impl FnMut(Row) -> Result<()>) -> Result<()> {
        let mut st = self.conn.prepare(
            "SELECT e.path, e.kind, e.mode, e.size, e.hash, b.id FROM entries e \
             LEFT JOIN blobs b ON b.hash = e.hash ORDER BY e.path",
        )?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            f(Row { entry: entry_of(r)?, blob_id: r.get(5)? })?;
        }
        Ok(())
    }

    /// What a delta's changed and deleted paths held at its base version, in path order.
    pub fn replaced(&self) -> Result<Vec<Entry>> {
        let mut st = self.conn.prepare("SELECT path, kind, mode, size, hash FROM replaced ORDER BY path")?;
        let mut rows = st.query([])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            out.push(entry_of(r)?);
        }
        Ok(out)
    }

    /// Paths a delta manifest deletes, in path order.
    pub fn deleted(&self) -> Result<Vec<WsPath>> {
        let mut st = self.conn.prepare("SELECT path FROM deleted ORDER BY path")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for p in rows {
            let p = p?;
            out.push(WsPath::new(&p).map_err(|e| Error::BadEntry { path: p.clone(), problem: e.to_string() })?);
        }
        Ok(out)
    }

    /// The verified bytes of the BLOB `id`, which must hash to `hash` and be `size` long.
    pub fn blob(&self, id: i64, hash: &ContentHash, size: u64) -> Result<Vec<u8>> {
        let mut st = self.conn.prepare_cached("SELECT hash, data FROM blobs WHERE id = ?1")?;
        let (name, data): (Vec<u8>, Vec<u8>) = st.query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))?;
        if name != hash.as_bytes() {
            return Err(Error::Format(format!("BLOB {id} is not the content {hash}")));
        }
        verify_blob(hash, size, data)
    }

    /// The verified bytes of `hash` if the manifest holds them.
    pub fn blob_by_hash(&self, hash: &ContentHash, size: u64) -> Result<Option<Vec<u8>>> {
        let mut st = self.conn.prepare_cached("SELECT data FROM blobs WHERE hash = ?1")?;
        let data: Option<Vec<u8>> = st.query_row([hash.as_bytes().as_slice()], |r| r.get(0)).optional()?;
        data.map(|d| verify_blob(hash, size, d)).transpose()
    }
}

/// One `entries` (or `replaced`) row, its fields checked.
fn entry_of(r: &rusqlite::Row<'_>) -> Result<Entry> {
    let path: String = r.get(0)?;
    let bad = |problem: String| Error::BadEntry { path: path.clone(), problem };
    let kind: String = r.get(1)?;
    let kind = EntryKind::parse(&kind).ok_or_else(|| bad(format!("unknown kind {kind:?}")))?;
    let mode: i64 = r.get(2)?;
    let size: i64 = r.get(3)?;
    let hash: Option<Vec<u8>> = r.get(4)?;
    let hash = match hash {
        Some(h) => Some(ContentHash::from_slice(&h).map_err(|e| bad(e.to_string()))?),
        None => None,
    };
    let mode = u32::try_from(mode).map_err(|_| bad(format!("mode {mode}")))?;
    let size = u64::try_from(size).map_err(|_| bad(format!("size {size}")))?;
    let wpath = WsPath::new(&path).map_err(|e| bad(e.to_string()))?;
    Entry { path: wpath, kind, hash, size, mode }.validated().map_err(|e| bad(e.to_string()))
}

/// Checks `data` against its name and expected length.
pub fn verify_blob(hash: &ContentHash, size: u64, data: Vec<u8>) -> Result<Vec<u8>> {
    let actual = ContentHash::of(&data);
    if actual != *hash {
        return Err(Error::BlobMismatch { hash: *hash, actual });
    }
    if data.len() as u64 != size {
        return Err(Error::BadEntry {
            path: String::new(),
            problem: format!("BLOB {hash} has {} bytes, its entry says {size}", data.len()),
        });
    }
    Ok(data)
}

/// `path` escaped for a `file:` URI (`?` and `#` and `%` would end or change it).
fn uri_path(path: &Path) -> String {
    let s = path.to_string_lossy();
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '?' => out.push_str("%3f"),
            '#' => out.push_str("%23"),
            '%' => out.push_str("%25"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests;
