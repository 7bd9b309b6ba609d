//! Loose objects: one file per content under `objects/<2 hex>/<64 hex>`, mode 0444, written
//! under `tmp/` and renamed in, so a loose object is whole or absent. Concurrent inserts of one
//! hash both succeed (the second rename replaces identical bytes).

use std::fs::{self, File, Permissions};
use std::io::{self, Read, Seek};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use podfs_protocol::ContentHash;

use crate::error::{Context, Error, Result};
use crate::{Found, Miss, check, hash_reader};

/// Opens a unit's file; a missing file is [`Miss::Vanished`].
pub fn open(path: &Path) -> Result<Found<File>> {
    match File::open(path) {
        Ok(f) => Ok(Ok(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Err(Miss::Vanished)),
        Err(e) => Err(e).context(|| format!("opening {}", path.display())),
    }
}

/// The bytes of the loose object at `path` if there are at most `size + 1` (the caller checks).
pub fn read(path: &Path, size: u64) -> Result<Found<Vec<u8>>> {
    let file = match open(path)? {
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

/// Copies the loose object at `path` into `out` and verifies the copy by reading it back.
pub fn copy(path: &Path, hash: &ContentHash, size: u64, out: &mut File) -> Result<Found<()>> {
    let mut src = match open(path)? {
        Ok(f) => f,
        Err(miss) => return Ok(Err(miss)),
    };
    // copy_file_range: a reflink where the file system can, an in-kernel copy elsewhere.
    io::copy(&mut src, out).context(|| format!("copying {}", path.display()))?;
    out.rewind().context(|| "rewinding a cache copy".into())?;
    let (actual, len) =
        hash_reader(out).context(|| "reading back a copy from the cache (is it open for reading?)".into())?;
    Ok(check(hash, size, actual, len))
}

/// Writes a loose object for `hash` with `fill` into a temporary file under `tmp`, checks it
/// and renames it to `dest`. Content that does not hash to its name is refused and removed.
pub fn write(
    tmp: &Path,
    dest: &Path,
    hash: &ContentHash,
    size: u64,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<()> {
    let mut file = tempfile::Builder::new()
        .prefix("loose-")
        .tempfile_in(tmp)
        .context(|| format!("creating a file in {}", tmp.display()))?;
    fill(file.as_file_mut()).context(|| "writing into the cache".into())?;
    file.rewind().context(|| "rewinding a cache copy".into())?;
    let (actual, actual_size) = hash_reader(file.as_file_mut()).context(|| "reading back a cache copy".into())?;
    if actual != *hash || actual_size != size {
        return Err(Error::Corrupt { hash: *hash, size, actual, actual_size });
    }
    file.as_file().set_permissions(Permissions::from_mode(0o444)).context(|| "chmod of a cache copy".into())?;
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).context(|| format!("creating {}", parent.display()))?;
    }
    file.persist(dest).map_err(|e| e.error).context(|| format!("renaming into {}", dest.display()))?;
    Ok(())
}
