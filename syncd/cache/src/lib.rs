//! `podfs-cache`: the devpod's content cache: verified file contents keyed by BLAKE3 hash, shared by every
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
//! Modules: `index` (the SQLite index), `loose` (one file per content), `packs` (pooled
//! read-only manifests), `error`. Nothing here talks to the network; the peer server of
//! `docs/peer-protocol.md` and `podfs pull` read from it alike.
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

mod error;
mod index;
mod loose;
mod packs;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::fs::{self, File, Permissions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use podfs_protocol::ContentHash;

use crate::error::Context;
pub use crate::error::{Error, Result};
pub use crate::index::UnitKind;
use crate::index::{Index, Unit};

/// Default size limit of the cache on disk: 10 GiB.
pub const DEFAULT_LIMIT: u64 = 10 << 30;
/// Units deleted per eviction transaction (short write locks).
const EVICT_BATCH: i64 = 256;
/// Older `tmp/` files are a crashed writer's.
const STALE_TMP: Duration = Duration::from_secs(3600);

/// `$XDG_CACHE_HOME/podfs`, else `$HOME/.cache/podfs`; `None` when neither is an absolute path.
pub fn default_dir() -> Option<PathBuf> {
    let absolute = |var: &str| std::env::var_os(var).map(PathBuf::from).filter(|p| p.is_absolute());
    absolute("XDG_CACHE_HOME")
        .map(|d| d.join("podfs"))
        .or_else(|| absolute("HOME").map(|h| h.join(".cache").join("podfs")))
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

/// A handle on the cache directory; cheap to clone, usable from any thread. All methods block:
/// call them from a blocking thread, never on an async runtime.
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
    index: Index,
    pool: packs::Pool,
}

/// Why a unit did not deliver.
pub(crate) enum Miss {
    /// Its file is gone (evicted by another process, or deleted by hand): forget its rows.
    Vanished,
    /// It failed verification or could not be read: drop it.
    Corrupt(String),
}

/// A unit's outcome: the value, or why it gave none.
pub(crate) type Found<T> = std::result::Result<T, Miss>;

impl ContentCache {
    /// Opens (creating if needed) the cache in `dir`, to be kept within `limit` bytes.
    pub fn open(dir: &Path, limit: u64) -> Result<Self> {
        for sub in ["objects", "packs", "tmp"] {
            let d = dir.join(sub);
            fs::create_dir_all(&d).context(|| format!("creating {}", d.display()))?;
        }
        let index = Index::open(&dir.join("index.sqlite"))?;
        let inner = Inner { dir: dir.to_path_buf(), limit, index, pool: packs::Pool::default() };
        Ok(Self { inner: Arc::new(inner) })
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Where new files are written before they are renamed in (same file system as the cache).
    pub fn tmp_dir(&self) -> PathBuf {
        self.inner.dir.join("tmp")
    }

    /// Which of `hashes` the index lists (not verified: a later read may still miss).
    pub fn contains(&self, hashes: &[ContentHash]) -> Result<HashSet<ContentHash>> {
        self.inner.index.contains(hashes)
    }

    /// The verified content of `hash` (`size` bytes), or `None` when absent or corrupt (the
    /// corrupt unit is dropped). For small content: it is read into memory whole.
    pub fn read(&self, hash: &ContentHash, size: u64) -> Result<Option<Vec<u8>>> {
        for unit in self.inner.index.lookup(hash, size)? {
            let found = match unit.kind {
                UnitKind::Loose => loose::read(&self.loose_path(hash), size)?,
                UnitKind::Pack => self.with_pack(&unit, |conn, id| Ok(packs::read_blob(conn, id, size)))?,
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
    pub fn copy_to(&self, hash: &ContentHash, size: u64, out: &mut File) -> Result<bool> {
        for unit in self.inner.index.lookup(hash, size)? {
            out.set_len(0).context(|| "truncating the output file".into())?;
            out.rewind().context(|| "rewinding the output file".into())?;
            let found = match unit.kind {
                UnitKind::Loose => loose::copy(&self.loose_path(hash), hash, size, out)?,
                UnitKind::Pack => self.with_pack(&unit, |conn, id| packs::stream_blob(conn, id, hash, size, out))?,
            };
            if self.settle(&unit, found)?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Adds the content of `src` (at offset 0, already verified by the caller as `hash`, `size`
    /// bytes) as a loose object. It is hashed again on the way in and refused on a mismatch.
    pub fn insert_file(&self, hash: &ContentHash, size: u64, src: &mut File) -> Result<()> {
        self.insert(hash, size, |file| io::copy(src, file).map(drop))
    }

    /// Adds `data` (which must hash to `hash`) as a loose object.
    pub fn insert_bytes(&self, hash: &ContentHash, data: &[u8]) -> Result<()> {
        self.insert(hash, data.len() as u64, |file| file.write_all(data))
    }

    /// Moves `path`, a manifest verified to hash to `file_hash`, into `packs/` (copying it when
    /// it is on another file system) and lists its BLOBs that no unit holds yet, in one
    /// transaction. When the pack is already there, deletes `path` and only re-lists. Returns
    /// the pack's path in the cache.
    pub fn add_pack(&self, path: &Path, file_hash: &ContentHash) -> Result<PathBuf> {
        if !path.exists() {
            return Err(Error::NotFound { path: path.to_path_buf() });
        }
        let dest = self.pack_path(file_hash);
        let present = self.inner.index.listed(UnitKind::Pack, file_hash)? && dest.exists();
        if present {
            fs::remove_file(path).context(|| format!("removing {}", path.display()))?;
        } else {
            self.move_in(path, &dest)?;
        }
        let size = fs::metadata(&dest).context(|| format!("reading {}", dest.display()))?.len();
        let indexed = self.inner.index.add_pack(&dest, file_hash, size);
        if indexed.is_err() && !present {
            let _ = fs::remove_file(&dest); // no file without its rows
        }
        indexed.map(|()| dest)
    }

    /// Marks the units holding `hashes` as used now.
    pub fn touch(&self, hashes: &[ContentHash]) -> Result<()> {
        self.inner.index.touch(hashes)
    }

    /// Deletes least recently used units until the total is within the limit; also deletes
    /// stale `tmp/` files and idle connections to packs that left the index.
    pub fn evict(&self) -> Result<EvictReport> {
        self.clean_tmp();
        let mut report = EvictReport::default();
        loop {
            let mut remove = |v: &index::Victim| remove_if_present(&self.unit_path(v.kind, &v.key));
            let (removed, kept) = self.inner.index.evict_step(self.inner.limit, EVICT_BATCH, &mut remove)?;
            report.bytes_kept = kept;
            report.units_removed += removed.len() as u64;
            report.bytes_removed += removed.iter().map(|v| v.size).sum::<u64>();
            if removed.is_empty() || kept <= self.inner.limit {
                break;
            }
        }
        let live = self.inner.index.pack_ids()?;
        self.inner.pool.retain(|id| live.contains(&id));
        Ok(report)
    }

    /// Bytes on disk and number of units, per the index.
    pub fn usage(&self) -> Result<Usage> {
        let (bytes, units) = self.inner.index.usage()?;
        Ok(Usage { bytes, units })
    }

    /// Where the loose object of `hash` lives.
    pub fn loose_path(&self, hash: &ContentHash) -> PathBuf {
        let hex = hash.to_hex();
        self.inner.dir.join("objects").join(&hex[..2]).join(hex)
    }

    /// Where the pack named `file_hash` lives.
    pub fn pack_path(&self, file_hash: &ContentHash) -> PathBuf {
        self.inner.dir.join("packs").join(format!("{}.sqlite", file_hash.to_hex()))
    }

    fn unit_path(&self, kind: UnitKind, key: &ContentHash) -> PathBuf {
        match kind {
            UnitKind::Loose => self.loose_path(key),
            UnitKind::Pack => self.pack_path(key),
        }
    }

    /// The value of a unit's outcome; a vanished unit is forgotten, a corrupt one dropped.
    fn settle<T>(&self, unit: &Unit, found: Found<T>) -> Result<Option<T>> {
        let miss = match found {
            Ok(v) => return Ok(Some(v)),
            Err(miss) => miss,
        };
        if let Miss::Corrupt(why) = &miss {
            let path = self.unit_path(unit.kind, &unit.key);
            tracing::warn!(path = %path.display(), "dropping a corrupt cache entry: {why}");
            remove_if_present(&path)?;
        }
        self.inner.index.forget(unit.id)?;
        self.inner.pool.drop_unit(unit.id);
        Ok(None)
    }

    /// Runs `f` with a read-only connection to the pack `unit` (pooled) and the BLOB id.
    fn with_pack<T>(
        &self,
        unit: &Unit,
        f: impl FnOnce(&rusqlite::Connection, i64) -> Result<Found<T>>,
    ) -> Result<Found<T>> {
        let Some(blob_id) = unit.blob_id else { return Ok(Err(Miss::Corrupt("no BLOB id".into()))) };
        self.inner.pool.with(unit.id, &self.pack_path(&unit.key), |conn| f(conn, blob_id))
    }

    /// Writes a loose object with `fill`, checks it, renames it in and lists it.
    fn insert(&self, hash: &ContentHash, size: u64, fill: impl FnOnce(&mut File) -> io::Result<()>) -> Result<()> {
        let dest = self.loose_path(hash);
        if self.inner.index.listed(UnitKind::Loose, hash)? && dest.exists() {
            return Ok(());
        }
        loose::write(&self.tmp_dir(), &dest, hash, size, fill)?;
        self.inner.index.add_loose(hash, size)
    }

    /// Moves (across file systems: copies) the pack file `src` to `dest`.
    fn move_in(&self, src: &Path, dest: &Path) -> Result<()> {
        fs::set_permissions(src, Permissions::from_mode(0o444)).context(|| format!("chmod {}", src.display()))?;
        match fs::rename(src, dest) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::CrossesDevices => {}
            Err(e) => return Err(e).context(|| format!("moving {} to {}", src.display(), dest.display())),
        }
        let mut file = tempfile::Builder::new()
            .prefix("pack-")
            .tempfile_in(self.tmp_dir())
            .context(|| "creating a file in the cache".into())?;
        let mut from = File::open(src).context(|| format!("opening {}", src.display()))?;
        io::copy(&mut from, file.as_file_mut()).context(|| format!("copying {}", src.display()))?;
        file.as_file().set_permissions(Permissions::from_mode(0o444)).context(|| "chmod of a pack copy".into())?;
        file.persist(dest).map_err(|e| e.error).context(|| format!("renaming into {}", dest.display()))?;
        fs::remove_file(src).context(|| format!("removing {}", src.display()))
    }

    /// Deletes `tmp/` files left by crashed writers (best effort).
    fn clean_tmp(&self) {
        let Ok(entries) = fs::read_dir(self.tmp_dir()) else { return };
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

/// `Ok` when `len` bytes hashing to `actual` are the `size` bytes named `hash`.
pub(crate) fn check(hash: &ContentHash, size: u64, actual: ContentHash, len: u64) -> Found<()> {
    if len != size {
        return Err(Miss::Corrupt(format!("{len} bytes, expected {size}")));
    }
    if actual != *hash {
        return Err(Miss::Corrupt(format!("content hashes to {actual}, expected {hash}")));
    }
    Ok(())
}

pub(crate) fn hash_reader(r: &mut impl Read) -> io::Result<(ContentHash, u64)> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(r)?;
    Ok((hasher.finalize().into(), hasher.count()))
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e).context(|| format!("removing {}", path.display())),
        _ => Ok(()),
    }
}
