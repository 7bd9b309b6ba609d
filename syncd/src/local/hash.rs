//! Content hashes of local paths: the one place that reads a file or a symlink to hash it.
//!
//! A symlink's content is its link text, byte for byte (never followed). Files at least
//! [`LARGE_HASH_THRESHOLD`] long are read in fixed chunks, each hashed on several threads;
//! smaller ones are read whole. Never through mmap: a file truncated while mapped kills the
//! process with SIGBUS, and a devpod's files change under us.

use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use bytes::Bytes;
use podfs_protocol::{ContentHash, EntryKind};

/// Files at least this large are hashed in chunks on several threads.
pub const LARGE_HASH_THRESHOLD: u64 = 1 << 20;
/// Chunk read at a time when hashing a large file.
const HASH_CHUNK: usize = 4 << 20;

/// BLAKE3 of the file at `path` and the number of bytes hashed.
pub fn hash_file(path: &Path) -> io::Result<(ContentHash, u64)> {
    let len = fs::symlink_metadata(path)?.len();
    if len >= LARGE_HASH_THRESHOLD {
        hash_reader(&mut fs::File::open(path)?)
    } else {
        let data = fs::read(path)?;
        Ok((ContentHash::of(&data), data.len() as u64))
    }
}

/// The BLAKE3 and bytes of the file at `path` when it is at most `limit` bytes long (read whole,
/// once); `None` for a longer file (hash it with [`hash_file`]).
pub fn read_small(path: &Path, limit: u64) -> io::Result<Option<(ContentHash, Bytes)>> {
    if fs::symlink_metadata(path)?.len() > limit {
        return Ok(None);
    }
    let data = fs::read(path)?;
    if data.len() as u64 > limit {
        return Ok(None);
    }
    Ok(Some((ContentHash::of(&data), Bytes::from(data))))
}

/// BLAKE3 of everything `r` yields and its length, read in large chunks hashed in parallel.
pub fn hash_reader(r: &mut impl Read) -> io::Result<(ContentHash, u64)> {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; HASH_CHUNK];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update_rayon(&buf[..n]);
    }
    Ok((h.finalize().into(), h.count()))
}

/// The content of a symlink: its link text.
pub fn link_content(target: &Path) -> Bytes {
    Bytes::copy_from_slice(target.as_os_str().as_bytes())
}

/// The link text of the symlink at `path` and its hash.
pub fn read_link(path: &Path) -> io::Result<(ContentHash, Bytes)> {
    let text = link_content(&fs::read_link(path)?);
    Ok((ContentHash::of(&text), text))
}

/// Hash and length of the content of `path` read as `kind` (a file or a symlink).
pub fn hash_path(path: &Path, kind: EntryKind) -> io::Result<(ContentHash, u64)> {
    match kind {
        EntryKind::Symlink => read_link(path).map(|(h, t)| (h, t.len() as u64)),
        _ => hash_file(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_files_hash_like_small_ones_and_links_hash_their_text() {
        let tmp = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3 * LARGE_HASH_THRESHOLD as usize + 7).map(|i| (i * 31 % 251) as u8).collect();
        fs::write(tmp.path().join("big"), &data).unwrap();
        let (h, n) = hash_file(&tmp.path().join("big")).unwrap();
        assert_eq!((h, n), (ContentHash::of(&data), data.len() as u64));
        fs::write(tmp.path().join("small"), b"tiny").unwrap();
        assert_eq!(hash_file(&tmp.path().join("small")).unwrap(), (ContentHash::of(b"tiny"), 4));
        std::os::unix::fs::symlink("../some/where", tmp.path().join("l")).unwrap();
        let (h, text) = read_link(&tmp.path().join("l")).unwrap();
        assert_eq!((h, &text[..]), (ContentHash::of(b"../some/where"), &b"../some/where"[..]));
        assert_eq!(hash_path(&tmp.path().join("l"), EntryKind::Symlink).unwrap(), (h, 13));
    }
}
