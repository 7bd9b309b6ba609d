//! The devpod's content cache: verified file contents keyed by BLAKE3 hash, shared by every
//! workspace and every `podfs` process on the machine.
//!
//! Layout under [`ContentCache::dir`] (by default [`default_dir`]):
//! - `objects/<2 hex>/<64 hex>`: *loose objects*, one file per content, mode 0444, written under
//!   `tmp/` and renamed in (whole content or nothing; concurrent inserts of a hash both succeed).
//! - `packs/<64 hex>.sqlite`: *packs*, verified `manifest.sqlite` files named by the hash of the
//!   file, whose `blobs` table holds small contents; read through pooled read-only, immutable,
//!   defensive connections.
//! - `index.sqlite`: the *units* (loose objects, packs) with size on disk (length rounded up to
//!   4 KiB) and last use, and which unit holds which content. `tmp/`: files being written.
//!
//! Every byte that leaves the cache is hashed and compared with its name first. A unit that
//! fails is dropped (file and rows; for a pack, the whole pack) and the read is a miss, as is a
//! listed file that is gone: the index is a hint. Never hard links: workspace files are edited
//! in place, so a link would let one edit change the content under every other workspace.
//! Content leaves by `copy_file_range` (`std::io::copy` between files), which the kernel turns
//! into a reflink where the file system can (btrfs, XFS, bcachefs).
//!
//! Eviction is LRU by unit: [`ContentCache::touch`] stamps the units holding some contents,
//! [`ContentCache::evict`] deletes the least recently used (file, then rows, in one transaction)
//! until the total is within the limit. Reads do not write the index.
//!
//! A pack's BLOBs are listed only where no unit lists that content yet: successive versions
//! share most contents, and listing 30,000 hashes again per pull would rewrite most pages of a
//! large index (hundreds of ms). So a content stays listed at the unit that brought it first
//! (plus any loose copy); when that unit goes, the next [`ContentCache::add_pack`] of a pack
//! holding it (every pull adds its manifest, already present or not) lists it again.
//!
//! Concurrency: processes share only the directory. Files appear by rename and go by unlink;
//! the index is SQLite in WAL mode with a busy timeout, written in `BEGIN IMMEDIATE`
//! transactions. A reader racing an eviction misses, or reads the unlinked file through a
//! descriptor it holds (verified all the same). A crash between rename and index insert leaves
//! an orphan file: not counted, not scanned for, adopted when that content is inserted again.
//! `evict` deletes `tmp/` files older than an hour (crashed writers).

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use podfs_protocol::ContentHash;
use rusqlite::config::DbConfig;
use rusqlite::types::ValueRef;
use rusqlite::{Connection, ErrorCode, MAIN_DB, OpenFlags, OptionalExtension, TransactionBehavior, params};

/// Default size limit of the cache on disk: 10 GiB.
pub const DEFAULT_LIMIT: u64 = 10 << 30;
const INDEX_VERSION: i64 = 1; // PRAGMA user_version of index.sqlite
const CHUNK: usize = 256 * 1024; // buffer for streaming pack BLOBs
const IN_BATCH: usize = 500; // hashes per `IN (...)` query
const POOL_PER_PACK: usize = 8; // idle connections kept per pack
const EVICT_BATCH: i64 = 256; // units deleted per eviction transaction (short write locks)
const STALE_TMP: Duration = Duration::from_secs(3600); // older tmp/ files are a crashed writer's

const LOOSE: i64 = 0;
const PACK: i64 = 1;

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

/// `$XDG_CACHE_HOME/podfs`, else `$HOME/.cache/podfs`.
pub fn default_dir() -> anyhow::Result<PathBuf> {
    let absolute = |var: &str| std::env::var_os(var).map(PathBuf::from).filter(|p| p.is_absolute());
    if let Some(dir) = absolute("XDG_CACHE_HOME") {
        return Ok(dir.join("podfs"));
    }
    if let Some(home) = absolute("HOME") {
        return Ok(home.join(".cache").join("podfs"));
    }
    bail!("no cache directory: neither XDG_CACHE_HOME nor HOME is an absolute path")
}

/// What [`ContentCache::evict`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EvictReport {
    pub units_removed: u64,
    pub bytes_removed: u64,
    pub bytes_kept: u64,
}

/// What the cache holds, per the index.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes on disk (file lengths rounded up to 4 KiB).
    pub bytes: u64,
    pub units: u64,
}

/// A handle on the cache directory; cheap to clone, usable from any thread. All methods block.
#[derive(Clone)]
pub struct ContentCache {
    inner: Arc<Inner>,
}

const _: fn() = || {
    fn shareable<T: Clone + Send + Sync>() {}
    shareable::<ContentCache>();
};

struct Inner {
    dir: PathBuf,
    limit: u64,
    index: Mutex<Connection>,
    /// Idle read-only connections per pack unit id.
    pool: Mutex<HashMap<i64, Vec<Connection>>>,
}

/// One place the index says a content is.
struct Unit {
    id: i64,
    kind: i64,
    key: ContentHash,
    blob_id: Option<i64>,
}

/// Why a unit did not deliver.
enum Miss {
    /// Its file is gone (evicted by another process, or deleted by hand): forget its rows.
    Vanished,
    /// It failed verification or could not be read: drop it.
    Corrupt(String),
}

type Found<T> = Result<T, Miss>;

impl ContentCache {
    /// Opens (creating if needed) the cache in `dir`, to be kept within `limit` bytes.
    pub fn open(dir: &Path, limit: u64) -> anyhow::Result<Self> {
        for sub in ["objects", "packs", "tmp"] {
            let d = dir.join(sub);
            fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        let path = dir.join("index.sqlite");
        let mut conn = open_index(&path).with_context(|| format!("opening the cache index {}", path.display()))?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > INDEX_VERSION {
            bail!("cache index {} has version {version}; this podfs knows {INDEX_VERSION}", path.display());
        }
        tx.execute_batch(SCHEMA)?;
        tx.pragma_update(None, "user_version", INDEX_VERSION)?;
        tx.commit()?;
        let inner = Inner { dir: dir.to_path_buf(), limit, index: Mutex::new(conn), pool: Mutex::default() };
        Ok(Self { inner: Arc::new(inner) })
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Which of `hashes` the index lists (not verified: a later read may still miss).
    pub fn contains(&self, hashes: &[ContentHash]) -> anyhow::Result<HashSet<ContentHash>> {
        let mut conn = self.index();
        let tx = conn.transaction()?;
        let mut found = HashSet::new();
        for chunk in hashes.chunks(IN_BATCH) {
            let sql = format!("SELECT DISTINCT hash FROM content WHERE hash IN ({})", placeholders(1, chunk.len()));
            let mut st = tx.prepare_cached(&sql)?;
            bind_hashes(&mut st, 1, chunk)?;
            let mut rows = st.raw_query();
            while let Some(row) = rows.next()? {
                found.insert(ContentHash::from_slice(row.get_ref(0)?.as_blob()?)?);
            }
        }
        tx.commit()?;
        Ok(found)
    }

    /// The verified content of `hash` (`size` bytes), or `None` when absent or corrupt (the
    /// corrupt unit is dropped). For small content: it is read into memory whole.
    pub fn read(&self, hash: &ContentHash, size: u64) -> anyhow::Result<Option<Vec<u8>>> {
        for unit in self.lookup(hash, size)? {
            let found = match unit.kind {
                LOOSE => read_loose(&self.loose_path(hash), size)?,
                _ => self.with_pack(&unit, |conn, id| Ok(read_blob(conn, id, size)))?,
            };
            let found =
                found.and_then(|data| check(hash, size, ContentHash::of(&data), data.len() as u64).map(|()| data));
            if let Some(data) = self.settle(&unit, found)? {
                return Ok(Some(data));
            }
        }
        Ok(None)
    }

    /// Writes the verified content of `hash` to `out`: an empty file, at offset 0, open for
    /// reading *and* writing (a copied loose object is read back to be verified). `Ok(false)`:
    /// absent or corrupt (the bad unit is dropped); `out` then holds garbage. Memory is bounded
    /// whatever the size.
    pub fn copy_to(&self, hash: &ContentHash, size: u64, out: &mut File) -> anyhow::Result<bool> {
        for unit in self.lookup(hash, size)? {
            out.set_len(0).context("truncating the output file")?;
            out.rewind()?;
            let found = match unit.kind {
                LOOSE => self.copy_loose(hash, size, out)?,
                _ => self.with_pack(&unit, |conn, id| stream_blob(conn, id, hash, size, out))?,
            };
            if self.settle(&unit, found)?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Adds the content of `src` (at offset 0, already verified by the caller as `hash`, `size`
    /// bytes) as a loose object. It is hashed again on the way in and refused on a mismatch.
    pub fn insert_file(&self, hash: &ContentHash, size: u64, src: &mut File) -> anyhow::Result<()> {
        self.insert(hash, size, |file| io::copy(src, file).map(drop))
    }

    /// Adds `data` (which must hash to `hash`) as a loose object.
    pub fn insert_bytes(&self, hash: &ContentHash, data: &[u8]) -> anyhow::Result<()> {
        self.insert(hash, data.len() as u64, |file| file.write_all(data))
    }

    /// Moves `path`, a manifest verified to hash to `file_hash`, into `packs/` (copying it when
    /// it is on another file system) and lists its BLOBs that no unit holds yet, in one
    /// transaction. When the pack is already there, deletes `path` and only re-lists. Returns
    /// the pack's path in the cache.
    pub fn add_pack(&self, path: &Path, file_hash: &ContentHash) -> anyhow::Result<PathBuf> {
        let dest = self.pack_path(file_hash);
        let present = self.listed(PACK, file_hash)? && dest.exists();
        if present {
            fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
        } else {
            self.move_in(path, &dest)?;
        }
        let size = fs::metadata(&dest)?.len();
        let indexed = index_pack(&mut self.index(), &dest, file_hash, size);
        if let Err(e) = indexed {
            if !present {
                let _ = fs::remove_file(&dest); // no file without its rows
            }
            return Err(e).with_context(|| format!("indexing the pack {}", dest.display()));
        }
        Ok(dest)
    }

    /// Marks the units holding `hashes` as used now.
    pub fn touch(&self, hashes: &[ContentHash]) -> anyhow::Result<()> {
        let now = now_ms();
        let mut conn = self.index();
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

    /// Deletes least recently used units until the total is within the limit; also deletes
    /// stale `tmp/` files and idle connections to packs that left the index.
    pub fn evict(&self) -> anyhow::Result<EvictReport> {
        self.clean_tmp();
        let limit = self.inner.limit;
        let mut report = EvictReport::default();
        let mut conn = self.index();
        loop {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut total =
                tx.query_row("SELECT coalesce(sum(size), 0) FROM units", [], |r| r.get::<_, i64>(0))? as u64;
            if total <= limit {
                report.bytes_kept = total;
                tx.commit()?;
                break;
            }
            let victims = tx
                .prepare_cached("SELECT id, kind, key, size FROM units ORDER BY last_used, id LIMIT ?1")?
                .query_map([EVICT_BATCH], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, Vec<u8>>(2)?, r.get::<_, i64>(3)?)))?
                .collect::<rusqlite::Result<Vec<(i64, i64, _, _)>>>()?;
            for (id, kind, key, size) in victims {
                if total <= limit {
                    break;
                }
                remove_if_present(&self.unit_path(kind, &ContentHash::from_slice(&key)?))?;
                delete_unit(&tx, id)?;
                total = total.saturating_sub(size as u64);
                report.units_removed += 1;
                report.bytes_removed += size as u64;
            }
            tx.commit()?;
        }
        let live: HashSet<i64> = conn
            .prepare_cached("SELECT id FROM units WHERE kind = ?1")?
            .query_map([PACK], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        drop(conn);
        self.pool().retain(|id, _| live.contains(id));
        Ok(report)
    }

    /// Bytes on disk and number of units, per the index.
    pub fn usage(&self) -> anyhow::Result<Usage> {
        let sql = "SELECT coalesce(sum(size), 0), count(*) FROM units";
        let (bytes, units): (i64, i64) = self.index().query_row(sql, [], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(Usage { bytes: bytes as u64, units: units as u64 })
    }

    fn index(&self) -> MutexGuard<'_, Connection> {
        self.inner.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn pool(&self) -> MutexGuard<'_, HashMap<i64, Vec<Connection>>> {
        self.inner.pool.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn loose_path(&self, hash: &ContentHash) -> PathBuf {
        let hex = hash.to_hex();
        self.inner.dir.join("objects").join(&hex[..2]).join(hex)
    }

    fn pack_path(&self, file_hash: &ContentHash) -> PathBuf {
        self.inner.dir.join("packs").join(format!("{}.sqlite", file_hash.to_hex()))
    }

    fn unit_path(&self, kind: i64, key: &ContentHash) -> PathBuf {
        if kind == LOOSE { self.loose_path(key) } else { self.pack_path(key) }
    }

    /// Whether the index lists the unit (`kind`, `key`).
    fn listed(&self, kind: i64, key: &ContentHash) -> anyhow::Result<bool> {
        let conn = self.index();
        let mut st = conn.prepare_cached("SELECT 1 FROM units WHERE kind = ?1 AND key = ?2")?;
        Ok(st.query_row(params![kind, &key.as_bytes()[..]], |_| Ok(())).optional()?.is_some())
    }

    /// The units holding `hash` with length `size`, loose objects first.
    fn lookup(&self, hash: &ContentHash, size: u64) -> anyhow::Result<Vec<Unit>> {
        let conn = self.index();
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
            units.push(Unit { id, kind, key: ContentHash::from_slice(&key)?, blob_id });
        }
        Ok(units)
    }

    /// The value of a unit's outcome; a vanished unit is forgotten, a corrupt one dropped.
    fn settle<T>(&self, unit: &Unit, found: Found<T>) -> anyhow::Result<Option<T>> {
        let miss = match found {
            Ok(v) => return Ok(Some(v)),
            Err(miss) => miss,
        };
        if let Miss::Corrupt(why) = &miss {
            let path = self.unit_path(unit.kind, &unit.key);
            tracing::warn!(path = %path.display(), "dropping a corrupt cache entry: {why}");
            remove_if_present(&path)?;
        }
        let mut conn = self.index();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        delete_unit(&tx, unit.id)?;
        tx.commit()?;
        drop(conn);
        self.pool().remove(&unit.id);
        Ok(None)
    }

    fn copy_loose(&self, hash: &ContentHash, size: u64, out: &mut File) -> anyhow::Result<Found<()>> {
        let path = self.loose_path(hash);
        let mut src = match open_unit(&path)? {
            Ok(f) => f,
            Err(miss) => return Ok(Err(miss)),
        };
        // copy_file_range: a reflink where the file system can, an in-kernel copy elsewhere.
        io::copy(&mut src, out).with_context(|| format!("copying {}", path.display()))?;
        out.rewind()?;
        let (actual, len) = hash_reader(out).context("reading back a copy from the cache (is it open for reading?)")?;
        Ok(check(hash, size, actual, len))
    }

    /// Runs `f` with a read-only connection to the pack `unit` (pooled) and the BLOB id.
    fn with_pack<T>(
        &self,
        unit: &Unit,
        f: impl FnOnce(&Connection, i64) -> anyhow::Result<Found<T>>,
    ) -> anyhow::Result<Found<T>> {
        let Some(blob_id) = unit.blob_id else { return Ok(Err(Miss::Corrupt("no BLOB id".into()))) };
        let pooled = self.pool().get_mut(&unit.id).and_then(Vec::pop);
        let conn = match pooled {
            Some(conn) => conn,
            None => {
                let path = self.pack_path(&unit.key);
                match open_pack(&path) {
                    Ok(conn) => conn,
                    Err(_) if !path.exists() => return Ok(Err(Miss::Vanished)),
                    Err(e) if is_corrupt(&e) => return Ok(Err(Miss::Corrupt(e.to_string()))),
                    Err(e) => return Err(e).with_context(|| format!("opening the pack {}", path.display())),
                }
            }
        };
        let found = f(&conn, blob_id)?;
        if found.is_ok() {
            let mut pool = self.pool();
            let idle = pool.entry(unit.id).or_default();
            if idle.len() < POOL_PER_PACK {
                idle.push(conn);
            }
        }
        Ok(found)
    }

    /// A new file under `tmp/`, deleted again unless [`TmpGuard::keep_as`] renames it.
    fn tmp_file(&self) -> anyhow::Result<(TmpGuard, File)> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().subsec_nanos();
        let name = format!("{}-{}-{nanos}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let path = self.inner.dir.join("tmp").join(name);
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path);
        let file = file.with_context(|| format!("creating {}", path.display()))?;
        Ok((TmpGuard(Some(path)), file))
    }

    /// Writes a loose object with `fill` under `tmp/`, checks it, renames it in and lists it.
    fn insert(
        &self,
        hash: &ContentHash,
        size: u64,
        fill: impl FnOnce(&mut File) -> io::Result<()>,
    ) -> anyhow::Result<()> {
        if self.listed(LOOSE, hash)? && self.loose_path(hash).exists() {
            return Ok(());
        }
        let (tmp, mut file) = self.tmp_file()?;
        fill(&mut file).context("writing into the cache")?;
        file.rewind()?;
        let (actual, len) = hash_reader(&mut file).context("reading back a cache copy")?;
        if actual != *hash || len != size {
            bail!("refusing to cache {hash} ({size} bytes): the content is {actual} ({len} bytes)");
        }
        file.set_permissions(Permissions::from_mode(0o444))?;
        drop(file);
        let dest = self.loose_path(hash);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        tmp.keep_as(&dest)?;
        let mut conn = self.index();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let id = upsert_unit(&tx, LOOSE, hash, disk_size(size))?;
        tx.execute(
            "INSERT OR IGNORE INTO content (hash, unit, size, blob_id) VALUES (?1, ?2, ?3, NULL)",
            params![&hash.as_bytes()[..], id, sql_int(size)],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Moves (across file systems: copies) the pack file `src` to `dest`.
    fn move_in(&self, src: &Path, dest: &Path) -> anyhow::Result<()> {
        fs::set_permissions(src, Permissions::from_mode(0o444)).with_context(|| format!("chmod {}", src.display()))?;
        match fs::rename(src, dest) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::CrossesDevices => {}
            Err(e) => return Err(e).with_context(|| format!("moving {} to {}", src.display(), dest.display())),
        }
        let (tmp, mut file) = self.tmp_file()?;
        io::copy(&mut File::open(src)?, &mut file).with_context(|| format!("copying {}", src.display()))?;
        file.set_permissions(Permissions::from_mode(0o444))?;
        tmp.keep_as(dest)?;
        fs::remove_file(src).with_context(|| format!("removing {}", src.display()))
    }

    /// Deletes `tmp/` files left by crashed writers (best effort).
    fn clean_tmp(&self) {
        let Ok(entries) = fs::read_dir(self.inner.dir.join("tmp")) else { return };
        for entry in entries.flatten() {
            let modified = entry.metadata().and_then(|m| m.modified());
            if modified.is_ok_and(|t| t.elapsed().is_ok_and(|age| age > STALE_TMP))
                && let Err(e) = fs::remove_file(entry.path())
            {
                tracing::debug!(path = %entry.path().display(), "cannot remove a stale cache temp file: {e}");
            }
        }
    }
}

/// A file under `tmp/`: removed on drop unless renamed away by [`TmpGuard::keep_as`].
struct TmpGuard(Option<PathBuf>);

impl TmpGuard {
    fn keep_as(mut self, dest: &Path) -> anyhow::Result<()> {
        if let Some(path) = self.0.take()
            && let Err(e) = fs::rename(&path, dest)
        {
            let _ = fs::remove_file(&path);
            return Err(e).with_context(|| format!("renaming into {}", dest.display()));
        }
        Ok(())
    }
}

impl Drop for TmpGuard {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = fs::remove_file(path);
        }
    }
}

fn open_index(path: &Path) -> rusqlite::Result<Connection> {
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

/// A read-only connection to a pack: immutable, defensive, untrusted schema.
fn open_pack(path: &Path) -> rusqlite::Result<Connection> {
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

/// Lists the pack at `path`, and those of its BLOBs no unit holds yet, in one transaction.
fn index_pack(conn: &mut Connection, path: &Path, file_hash: &ContentHash, size: u64) -> rusqlite::Result<()> {
    conn.execute("ATTACH DATABASE ?1 AS pack", [format!("{}?immutable=1&mode=ro", file_uri(path))])?;
    let result = (|| {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let id = upsert_unit(&tx, PACK, file_hash, disk_size(size))?;
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
    result.and(detached.map(|_| ()))
}

/// Inserts the unit or, when it is already listed, refreshes its size and use; returns its id.
fn upsert_unit(tx: &rusqlite::Transaction<'_>, kind: i64, key: &ContentHash, size: u64) -> rusqlite::Result<i64> {
    tx.query_row(
        "INSERT INTO units (kind, key, size, last_used) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (kind, key) DO UPDATE SET size = excluded.size, last_used = excluded.last_used \
         RETURNING id",
        params![kind, &key.as_bytes()[..], sql_int(size), now_ms()],
        |r| r.get(0),
    )
}

fn delete_unit(tx: &rusqlite::Transaction<'_>, id: i64) -> rusqlite::Result<()> {
    tx.execute("DELETE FROM content WHERE unit = ?1", [id])?;
    tx.execute("DELETE FROM units WHERE id = ?1", [id])?;
    Ok(())
}

/// Opens a unit's file; a missing file is [`Miss::Vanished`].
fn open_unit(path: &Path) -> anyhow::Result<Found<File>> {
    match File::open(path) {
        Ok(f) => Ok(Ok(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Err(Miss::Vanished)),
        Err(e) => Err(e).with_context(|| format!("opening {}", path.display())),
    }
}

fn read_loose(path: &Path, size: u64) -> anyhow::Result<Found<Vec<u8>>> {
    let file = match open_unit(path)? {
        Ok(f) => f,
        Err(miss) => return Ok(Err(miss)),
    };
    let mut data = Vec::with_capacity(size.min(16 << 20) as usize);
    // One byte more than expected, so that a longer file shows.
    Ok(match file.take(size.saturating_add(1)).read_to_end(&mut data) {
        Ok(_) => Ok(data),
        Err(e) => Err(Miss::Corrupt(format!("read: {e}"))),
    })
}

/// The bytes of BLOB `id` if it has `size` of them (the caller verifies the hash).
fn read_blob(conn: &Connection, id: i64, size: u64) -> Found<Vec<u8>> {
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
fn stream_blob(conn: &Connection, id: i64, hash: &ContentHash, size: u64, out: &mut File) -> anyhow::Result<Found<()>> {
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
        out.write_all(&buf[..n]).context("writing content from the cache")?;
    }
    Ok(check(hash, size, hasher.finalize().into(), hasher.count()))
}

fn check(hash: &ContentHash, size: u64, actual: ContentHash, len: u64) -> Found<()> {
    if len != size {
        return Err(Miss::Corrupt(format!("{len} bytes, expected {size}")));
    }
    if actual != *hash {
        return Err(Miss::Corrupt(format!("content hashes to {actual}, expected {hash}")));
    }
    Ok(())
}

fn hash_reader(r: &mut impl Read) -> io::Result<(ContentHash, u64)> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(r)?;
    Ok((hasher.finalize().into(), hasher.count()))
}

fn remove_if_present(path: &Path) -> anyhow::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e).with_context(|| format!("removing {}", path.display())),
        _ => Ok(()),
    }
}

/// `file:` URI of `path`, every byte but unreserved ones and `/` percent-encoded.
fn file_uri(path: &Path) -> String {
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

fn bind_hashes(st: &mut rusqlite::Statement<'_>, first: usize, hashes: &[ContentHash]) -> rusqlite::Result<()> {
    hashes.iter().enumerate().try_for_each(|(i, h)| st.raw_bind_parameter(first + i, &h.as_bytes()[..]))
}

/// `?first, ?first+1, ...`: `count` parameters.
fn placeholders(first: usize, count: usize) -> String {
    (first..first + count).map(|i| format!("?{i}")).collect::<Vec<_>>().join(",")
}

/// Size on disk: the length rounded up to 4 KiB blocks.
fn disk_size(len: u64) -> u64 {
    len.div_ceil(4096).saturating_mul(4096)
}

fn sql_int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| sql_int(d.as_millis() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A cache in a fresh temp dir whose path needs escaping in a `file:` URI.
    fn cache(limit: u64) -> (tempfile::TempDir, ContentCache) {
        let tmp = tempfile::tempdir().unwrap();
        let c = ContentCache::open(&tmp.path().join("cache ?#%"), limit).unwrap();
        (tmp, c)
    }

    /// A pack file (the manifest's `blobs` table) holding `blobs`, outside the cache.
    fn make_pack(dir: &Path, name: &str, blobs: &[&[u8]]) -> (PathBuf, ContentHash) {
        let path = dir.join(name);
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "BEGIN; CREATE TABLE blobs (id INTEGER PRIMARY KEY, hash BLOB NOT NULL UNIQUE, data BLOB NOT NULL)",
        )
        .unwrap();
        for b in blobs {
            let sql = "INSERT OR IGNORE INTO blobs (hash, data) VALUES (?1, ?2)";
            conn.execute(sql, params![&ContentHash::of(b).as_bytes()[..], b]).unwrap();
        }
        conn.execute_batch("COMMIT").unwrap();
        drop(conn);
        (path.clone(), ContentHash::of(&fs::read(&path).unwrap()))
    }

    /// What `copy_to` writes into a new file, if it succeeds.
    fn copied(c: &ContentCache, data: &[u8], dir: &Path) -> Option<Vec<u8>> {
        let path = dir.join(format!("out-{}", NEXT_OUT.fetch_add(1, Ordering::Relaxed)));
        let mut out = OpenOptions::new().read(true).write(true).create_new(true).open(&path).unwrap();
        c.copy_to(&ContentHash::of(data), data.len() as u64, &mut out).unwrap().then(|| fs::read(&path).unwrap())
    }
    static NEXT_OUT: AtomicU64 = AtomicU64::new(0);

    fn read(c: &ContentCache, data: &[u8]) -> Option<Vec<u8>> {
        c.read(&ContentHash::of(data), data.len() as u64).unwrap()
    }

    #[test]
    fn loose_round_trip() {
        let (tmp, c) = cache(DEFAULT_LIMIT);
        let small = b"hello cache".to_vec();
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let (hs, hb) = (ContentHash::of(&small), ContentHash::of(&big));
        c.insert_bytes(&hs, &small).unwrap();
        c.insert_bytes(&hs, &small).unwrap(); // no-op
        fs::write(tmp.path().join("big"), &big).unwrap();
        c.insert_file(&hb, big.len() as u64, &mut File::open(tmp.path().join("big")).unwrap()).unwrap();

        assert_eq!(read(&c, &small), Some(small.clone()));
        assert_eq!(c.read(&hs, 3).unwrap(), None, "a wrong size is a miss");
        assert_eq!(copied(&c, &big, tmp.path()), Some(big.clone()));
        assert_eq!(c.contains(&[hs, hb, ContentHash::of(b"x")]).unwrap(), HashSet::from([hs, hb]));
        assert_eq!(fs::metadata(c.loose_path(&hb)).unwrap().permissions().mode() & 0o777, 0o444);
        assert_eq!(c.usage().unwrap(), Usage { bytes: 4096 + disk_size(big.len() as u64), units: 2 });

        let other = ContentHash::of(b"other");
        assert!(c.insert_bytes(&other, &small).unwrap_err().to_string().contains("refusing"));
        assert!(c.insert_file(&other, big.len() as u64, &mut File::open(tmp.path().join("big")).unwrap()).is_err());
        assert_eq!(fs::read_dir(c.dir().join("tmp")).unwrap().count(), 0, "refused copies are removed");
        assert!(c.contains(&[other]).unwrap().is_empty());
    }

    #[test]
    fn pack_round_trip() {
        let (tmp, c) = cache(DEFAULT_LIMIT);
        let big = vec![7u8; 600_000];
        let blobs: [&[u8]; 3] = [b"alpha", &big, b""];
        let (path, file_hash) = make_pack(tmp.path(), "m.sqlite", &blobs);
        let in_cache = c.add_pack(&path, &file_hash).unwrap();
        assert!(!path.exists() && in_cache.exists());
        for b in blobs {
            assert_eq!(read(&c, b).as_deref(), Some(b));
            assert_eq!(copied(&c, b, tmp.path()).as_deref(), Some(b));
        }
        // The same pack again: the new file is deleted, nothing changes.
        let (again, same) = make_pack(tmp.path(), "m2.sqlite", &blobs);
        assert_eq!((c.add_pack(&again, &same).unwrap(), again.exists()), (in_cache, false));
        assert_eq!(c.usage().unwrap().units, 1);
        assert_eq!(c.contains(&blobs.map(ContentHash::of)).unwrap().len(), 3);
    }

    #[test]
    fn corrupt_units_are_misses_and_dropped() {
        let (tmp, c) = cache(DEFAULT_LIMIT);
        let data = b"precious bytes";
        for round in 0..2 {
            c.insert_bytes(&ContentHash::of(data), data).unwrap();
            let p = c.loose_path(&ContentHash::of(data));
            fs::set_permissions(&p, Permissions::from_mode(0o644)).unwrap();
            fs::write(&p, b"PRECIOUS BYTES").unwrap(); // same size
            assert_eq!(if round == 0 { read(&c, data) } else { copied(&c, data, tmp.path()) }, None);
            assert!(c.contains(&[ContentHash::of(data)]).unwrap().is_empty() && !p.exists());
        }
        let (path, fh) = make_pack(tmp.path(), "m.sqlite", &[b"good", b"bad!"]);
        let pack = c.add_pack(&path, &fh).unwrap();
        fs::set_permissions(&pack, Permissions::from_mode(0o644)).unwrap();
        Connection::open(&pack)
            .unwrap()
            .execute("UPDATE blobs SET data = 'BAD!' WHERE data = x'62616421'", [])
            .unwrap();
        assert_eq!(copied(&c, b"bad!", tmp.path()), None);
        assert_eq!(read(&c, b"bad!"), None);
        assert!(!pack.exists(), "the whole pack is dropped");
        assert!(c.contains(&[ContentHash::of(b"good")]).unwrap().is_empty());
    }

    #[test]
    fn eviction_is_lru_by_unit_and_keeps_within_the_limit() {
        let (tmp, c) = cache(3 * 4096);
        let datas: Vec<[u8; 100]> = (0..4u8).map(|i| [i; 100]).collect();
        let hs: Vec<ContentHash> = datas.iter().map(|d| ContentHash::of(d)).collect();
        let pause = || std::thread::sleep(Duration::from_millis(5));
        for i in 0..3 {
            c.insert_bytes(&hs[i], &datas[i]).unwrap();
            pause();
        }
        c.touch(&hs[..1]).unwrap(); // 0 is now the most recent, 1 the least
        pause();
        c.insert_bytes(&hs[3], &datas[3]).unwrap();
        let report = c.evict().unwrap();
        assert_eq!(report, EvictReport { units_removed: 1, bytes_removed: 4096, bytes_kept: 3 * 4096 });
        assert_eq!(c.contains(&hs).unwrap(), HashSet::from([hs[0], hs[2], hs[3]]));
        assert!(!c.loose_path(&hs[1]).exists());

        // A pack is one unit, evicted whole.
        let (path, fh) = make_pack(tmp.path(), "m.sqlite", &[b"p1", b"p2"]);
        c.add_pack(&path, &fh).unwrap();
        pause();
        c.touch(&hs).unwrap();
        c.evict().unwrap();
        assert!(c.usage().unwrap().bytes <= 3 * 4096);
        assert!(!c.pack_path(&fh).exists() && c.contains(&[ContentHash::of(b"p1")]).unwrap().is_empty());
    }

    #[test]
    fn two_handles_share_the_directory() {
        let (tmp, a) = cache(DEFAULT_LIMIT);
        let b = ContentCache::open(a.dir(), DEFAULT_LIMIT).unwrap();
        a.insert_bytes(&ContentHash::of(b"from a"), b"from a").unwrap();
        assert_eq!(read(&b, b"from a").as_deref(), Some(&b"from a"[..]));
        let (path, fh) = make_pack(tmp.path(), "m.sqlite", &[b"from b"]);
        b.add_pack(&path, &fh).unwrap();
        assert_eq!(read(&a, b"from b").as_deref(), Some(&b"from b"[..]));
        // A third process with a zero limit evicts everything; the others just miss.
        assert_eq!(ContentCache::open(a.dir(), 0).unwrap().evict().unwrap().units_removed, 2);
        assert_eq!(read(&a, b"from a"), None);
        assert_eq!(b.usage().unwrap(), Usage::default());
    }

    #[test]
    fn vanished_files_are_misses_and_a_later_pack_lists_again() {
        let (tmp, c) = cache(DEFAULT_LIMIT);
        let data = b"short-lived";
        c.insert_bytes(&ContentHash::of(data), data).unwrap();
        fs::remove_file(c.loose_path(&ContentHash::of(data))).unwrap();
        assert_eq!(copied(&c, data, tmp.path()), None);
        assert_eq!(read(&c, data), None);
        assert!(c.contains(&[ContentHash::of(data)]).unwrap().is_empty(), "forgotten by the index");

        // "same" is listed at v1 only; with v1 gone, adding v2 again (the next pull) lists it.
        let (p1, h1) = make_pack(tmp.path(), "v1.sqlite", &[b"same", b"old"]);
        let (p2, h2) = make_pack(tmp.path(), "v2.sqlite", &[b"same", b"new"]);
        fs::remove_file(c.add_pack(&p1, &h1).unwrap()).unwrap();
        let v2 = c.add_pack(&p2, &h2).unwrap();
        assert_eq!((read(&c, b"same"), read(&c, b"new").is_some()), (None, true));
        fs::copy(&v2, tmp.path().join("v2 again")).unwrap();
        c.add_pack(&tmp.path().join("v2 again"), &h2).unwrap();
        assert_eq!(read(&c, b"same").as_deref(), Some(&b"same"[..]));
        assert_eq!(c.usage().unwrap().units, 1);
    }

    #[test]
    fn big_packs_index_fast_and_serve_parallel_reads() {
        let (tmp, c) = cache(DEFAULT_LIMIT);
        let blobs: Vec<Vec<u8>> = (0..50_000u32).map(|i| format!("file number {i}").into_bytes()).collect();
        let refs: Vec<&[u8]> = blobs.iter().map(Vec::as_slice).collect();
        let timed = |what: &str, f: &mut dyn FnMut()| {
            let t = Instant::now();
            f();
            eprintln!("{what}: {:?}", t.elapsed());
        };
        let (path, fh) = make_pack(tmp.path(), "m.sqlite", &refs);
        timed("add_pack, 50,000 new BLOBs", &mut || drop(c.add_pack(&path, &fh).unwrap()));
        let mut next = refs[..30_000].to_vec();
        next[0] = b"changed";
        let (path, fh) = make_pack(tmp.path(), "m2.sqlite", &next);
        timed("add_pack, 30,000 BLOBs, 1 new", &mut || drop(c.add_pack(&path, &fh).unwrap()));

        let mut hashes: Vec<ContentHash> = refs.iter().map(|b| ContentHash::of(b)).collect();
        hashes.extend((0..1000u32).map(|i| ContentHash::of(&i.to_le_bytes())));
        timed("contains, 51,000 hashes", &mut || assert_eq!(c.contains(&hashes).unwrap().len(), 50_000));
        c.touch(&hashes).unwrap();
        timed("50,000 reads on 4 threads", &mut || {
            std::thread::scope(|s| {
                for part in refs.chunks(refs.len() / 4) {
                    let c = c.clone();
                    s.spawn(move || part.iter().for_each(|b| assert_eq!(read(&c, b).as_deref(), Some(*b))));
                }
            })
        });
        assert!(c.pool().values().all(|idle| idle.len() <= POOL_PER_PACK));
        assert_eq!(file_uri(Path::new("/a b/c?d#e%f")), "file:/a%20b/c%3fd%23e%25f");
    }
}
