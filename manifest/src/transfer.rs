//! The transfer (and storage) form of a manifest: the SQLite file as one zstd frame that
//! declares its content size. The gateway states the BLAKE3 and length of the *decompressed*
//! file; a reader decompresses with that length as the cap (a frame that inflates further is
//! refused: no decompression bombs) and compares the hash before SQLite ever opens the file.

use std::io::{self, Read, Write};
use std::path::Path;

use podfs_protocol::ContentHash;

use crate::{Error, Result};

/// zstd level of stored manifests: fast to build, and most of the size is already-compact text.
pub const LEVEL: i32 = 3;

/// What [`compress`] produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compressed {
    /// BLAKE3 and length of the SQLite file.
    pub hash: ContentHash,
    pub size: u64,
    /// BLAKE3 and length of the zstd frame.
    pub stored_hash: ContentHash,
    pub stored_size: u64,
}

/// Compresses the SQLite file at `src` into `dst` as one frame, hashing both sides.
pub fn compress(src: &Path, dst: impl Write) -> Result<Compressed> {
    let mut file = std::fs::File::open(src)?;
    let size = file.metadata()?.len();
    let mut out = HashingWriter { inner: dst, hasher: blake3::Hasher::new(), len: 0 };
    let mut enc = zstd::stream::write::Encoder::new(&mut out, LEVEL)?;
    enc.set_pledged_src_size(Some(size))?;
    enc.include_contentsize(true)?;
    enc.include_checksum(false)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut read = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        read += n as u64;
        hasher.update(&buf[..n]);
        enc.write_all(&buf[..n])?;
    }
    if read != size {
        return Err(Error::Io(io::Error::other(format!("{} changed while being compressed", src.display()))));
    }
    enc.finish()?;
    out.inner.flush()?;
    Ok(Compressed {
        hash: hasher.finalize().into(),
        size,
        stored_hash: out.hasher.finalize().into(),
        stored_size: out.len,
    })
}

/// Decompresses the frame read from `src` into `dst`, refusing more than `expected_size`
/// bytes, and checks length and BLAKE3 against what the gateway stated. On error `dst` holds
/// garbage the caller must discard.
pub fn decompress_verified(
    src: impl Read,
    expected_hash: &ContentHash,
    expected_size: u64,
    dst: impl Write,
) -> Result<()> {
    let mut dec = zstd::stream::read::Decoder::new(src)?.take(expected_size.saturating_add(1));
    let mut out = HashingWriter { inner: dst, hasher: blake3::Hasher::new(), len: 0 };
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match dec.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(Error::Format(format!("the manifest transfer is not a valid zstd frame: {e}")));
            }
        };
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
    }
    out.inner.flush()?;
    if out.len != expected_size {
        return Err(Error::SizeMismatch { expected: expected_size, actual: out.len });
    }
    let actual: ContentHash = out.hasher.finalize().into();
    if actual != *expected_hash {
        return Err(Error::FileMismatch { expected: *expected_hash, actual });
    }
    Ok(())
}

/// BLAKE3 and length of a whole file.
pub fn hash_file(path: &Path) -> Result<(ContentHash, u64)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let n = io::copy(&mut file, &mut hasher)?;
    Ok((hasher.finalize().into(), n))
}

struct HashingWriter<W> {
    inner: W,
    hasher: blake3::Hasher,
    len: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
