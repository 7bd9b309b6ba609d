//! The transfer frame: a whole file as one zstd frame that declares its content size, moved
//! with the BLAKE3 hash and length of the *decompressed* bytes stated beside it (manifests are
//! stored and served this way; `docs/manifest-format.md`).
//!
//! A reader decompresses with the stated length as the cap (a frame that inflates further is
//! refused: no decompression bombs) and compares the hash before anything opens the result.
//! Pure: works on `Read` and `Write`; callers bring the files.

use std::io::{self, Read, Write};

use crate::ContentHash;

/// zstd level of frames: fast to build, and most of a manifest is already-compact text.
pub const LEVEL: i32 = 3;
/// Sources at least this large are compressed by several zstd workers (still one frame).
pub const MULTITHREAD_FROM: u64 = 16 << 20;
/// At most this many workers per frame.
const MAX_WORKERS: u32 = 4;
/// The HTTP content type of a frame.
pub const CONTENT_TYPE: &str = "application/zstd";

/// What a frame failed with.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame I/O")]
    Io(#[from] io::Error),
    #[error("not a valid zstd frame")]
    NotZstd(#[source] io::Error),
    #[error("the source changed while it was compressed ({expected} bytes stated, {actual} read)")]
    SourceChanged { expected: u64, actual: u64 },
    #[error("decompressed frame is {actual} bytes, {expected} were stated")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("decompressed frame hashes to {actual}, {expected} was stated")]
    HashMismatch { expected: ContentHash, actual: ContentHash },
}

/// What [`compress`] produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compressed {
    /// BLAKE3 and length of the content.
    pub hash: ContentHash,
    pub size: u64,
    /// BLAKE3 and length of the zstd frame.
    pub stored_hash: ContentHash,
    pub stored_size: u64,
}

/// Compresses exactly `size` bytes read from `src` into `dst` as one frame, hashing both sides.
pub fn compress(mut src: impl Read, size: u64, dst: impl Write) -> Result<Compressed, FrameError> {
    let mut out = HashingWriter::new(dst);
    let mut enc = zstd::stream::write::Encoder::new(&mut out, LEVEL)?;
    if size >= MULTITHREAD_FROM {
        // a full manifest of a large tree is hundreds of MB: one core would take seconds
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        enc.multithread(cores.min(MAX_WORKERS))?;
    }
    enc.set_pledged_src_size(Some(size))?;
    enc.include_contentsize(true)?;
    enc.include_checksum(false)?;
    let mut plain = HashingWriter::new(&mut enc);
    io::copy(&mut src, &mut plain)?;
    let (hash, read) = plain.finish();
    if read != size {
        return Err(FrameError::SourceChanged { expected: size, actual: read });
    }
    enc.finish()?;
    out.flush()?;
    let (stored_hash, stored_size) = out.finish();
    Ok(Compressed { hash, size, stored_hash, stored_size })
}

/// Decompresses the frame read from `src` into `dst`, refusing more than `expected_size`
/// bytes, and checks length and BLAKE3 against what was stated. On error `dst` holds garbage
/// the caller must discard.
pub fn decompress_verified(
    src: impl Read,
    expected_hash: &ContentHash,
    expected_size: u64,
    dst: impl Write,
) -> Result<(), FrameError> {
    let mut dec = zstd::stream::read::Decoder::new(src)?.take(expected_size.saturating_add(1));
    let mut out = HashingWriter::new(dst);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match dec.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(FrameError::NotZstd(e)),
        };
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
    }
    out.flush()?;
    let (actual, len) = out.finish();
    if len != expected_size {
        return Err(FrameError::SizeMismatch { expected: expected_size, actual: len });
    }
    if actual != *expected_hash {
        return Err(FrameError::HashMismatch { expected: *expected_hash, actual });
    }
    Ok(())
}

/// A writer that hashes (BLAKE3) and counts what passes through it to `inner`.
pub struct HashingWriter<W> {
    inner: W,
    hasher: blake3::Hasher,
    len: u64,
}

impl<W> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self { inner, hasher: blake3::Hasher::new(), len: 0 }
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Hash and length of everything written.
    pub fn finish(self) -> (ContentHash, u64) {
        (self.hasher.finalize().into(), self.len)
    }

    /// Hash and length of everything written, and the inner writer back.
    pub fn into_parts(self) -> (ContentHash, u64, W) {
        (self.hasher.finalize().into(), self.len, self.inner)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let content = b"manifest bytes ".repeat(5000);
        let mut frame = Vec::new();
        let c = compress(&content[..], content.len() as u64, &mut frame).unwrap();
        assert_eq!(c.size, content.len() as u64);
        assert_eq!(c.hash, ContentHash::of(&content));
        assert_eq!(c.stored_hash, ContentHash::of(&frame));
        assert!(c.stored_size < c.size);

        let mut out = Vec::new();
        decompress_verified(&frame[..], &c.hash, c.size, &mut out).unwrap();
        assert_eq!(out, content);

        let too_small = decompress_verified(&frame[..], &c.hash, c.size - 1, io::sink());
        assert!(matches!(too_small, Err(FrameError::SizeMismatch { .. })), "{too_small:?}");
        let other = ContentHash::of(b"other");
        let wrong = decompress_verified(&frame[..], &other, c.size, io::sink());
        assert!(matches!(wrong, Err(FrameError::HashMismatch { .. })), "{wrong:?}");
        let garbage = decompress_verified(&b"not zstd at all"[..], &c.hash, c.size, io::sink());
        assert!(matches!(garbage, Err(FrameError::Io(_) | FrameError::NotZstd(_))), "{garbage:?}");
        let changed = compress(&content[..10], 11, io::sink());
        assert!(matches!(changed, Err(FrameError::SourceChanged { .. })), "{changed:?}");
    }

    /// A large source is compressed by several workers, and is still one frame that declares
    /// its content size.
    #[test]
    fn large_sources_are_still_one_frame() {
        let mut x = 7u64;
        let content: Vec<u8> = (0..MULTITHREAD_FROM + 12345)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                b"abcdefgh ;\n"[(x >> 60) as usize % 11]
            })
            .collect();
        let mut frame = Vec::new();
        let c = compress(&content[..], content.len() as u64, &mut frame).unwrap();
        assert_eq!(zstd::zstd_safe::find_frame_compressed_size(&frame), Ok(frame.len()));
        assert!(matches!(zstd::zstd_safe::get_frame_content_size(&frame), Ok(Some(n)) if n == content.len() as u64));
        let mut out = Vec::new();
        decompress_verified(&frame[..], &c.hash, c.size, &mut out).unwrap();
        assert!(out == content);
    }
}
