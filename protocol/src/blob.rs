//! The stored blob format: how one piece of content is kept in a blob store.
//!
//! A stored blob is a 16-byte header followed by the payload:
//!
//! | bytes | field |
//! |-------|-------|
//! | 0..4  | magic `PFSB` |
//! | 4     | format version, 1 |
//! | 5     | codec: 0 = raw, 1 = zstd (one frame) |
//! | 6..8  | reserved, 0 |
//! | 8..16 | content length in bytes, u64 little endian (uncompressed) |
//!
//! The blob's name is the BLAKE3 hash of the uncompressed content. Decoding always checks the
//! length and the hash, and never inflates past the declared length (decompression bombs).
//! This module does no I/O of its own; it works on slices, `Read` and `Write`.

use std::io::{self, Read, Write};

use crate::ContentHash;
use crate::frame::HashingWriter;

pub const MAGIC: &[u8; 4] = b"PFSB";
pub const FORMAT_VERSION: u8 = 1;
pub const HEADER_LEN: usize = 16;
/// zstd level for stored blobs: fast to write, about 3x on source code.
pub const ZSTD_LEVEL: i32 = 3;
/// Compression is kept only when it saves at least this share of the size.
pub const MIN_SAVING: f64 = 0.05;
/// Whole blobs up to this size decode with a reused bulk context.
const BULK_LIMIT: usize = 4 << 20;
/// How much of a large blob is compressed to decide whether compressing it is worth it.
pub const SAMPLE_LEN: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Raw,
    Zstd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub codec: Codec,
    pub content_len: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("not a podfs blob (bad magic or header)")]
    BadHeader,
    #[error("unsupported blob format version {0}")]
    UnsupportedVersion(u8),
    #[error("unknown blob codec {0}")]
    UnknownCodec(u8),
    #[error("blob length mismatch: header says {expected} bytes, content has {actual}")]
    Length { expected: u64, actual: u64 },
    #[error("blob content does not match its name: expected {expected}, got {actual}")]
    HashMismatch { expected: ContentHash, actual: ContentHash },
    #[error("blob I/O: {0}")]
    Io(#[from] io::Error),
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(MAGIC);
        h[4] = FORMAT_VERSION;
        h[5] = match self.codec {
            Codec::Raw => 0,
            Codec::Zstd => 1,
        };
        h[8..].copy_from_slice(&self.content_len.to_le_bytes());
        h
    }

    pub fn parse(raw: &[u8]) -> Result<Self, BlobError> {
        if raw.len() < HEADER_LEN || &raw[..4] != MAGIC || raw[6..8] != [0, 0] {
            return Err(BlobError::BadHeader);
        }
        if raw[4] != FORMAT_VERSION {
            return Err(BlobError::UnsupportedVersion(raw[4]));
        }
        let codec = match raw[5] {
            0 => Codec::Raw,
            1 => Codec::Zstd,
            c => return Err(BlobError::UnknownCodec(c)),
        };
        let mut len = [0u8; 8];
        len.copy_from_slice(&raw[8..HEADER_LEN]);
        Ok(Self { codec, content_len: u64::from_le_bytes(len) })
    }
}

/// The most bytes a stored blob of `content_len` content bytes can take: the 16-byte header plus
/// the content, or a zstd frame of it (zstd's worst case is `n + n/256 + 64`).
pub fn max_stored_len(content_len: u64) -> u64 {
    content_len.saturating_add(content_len / 128).saturating_add(HEADER_LEN as u64 + 1024)
}

/// True when zstd saves at least [`MIN_SAVING`] on `sample`.
pub fn worth_compressing(sample: &[u8]) -> bool {
    if sample.len() < 64 {
        return false;
    }
    match zstd::bulk::compress(sample, 1) {
        Ok(c) => (c.len() as f64) < sample.len() as f64 * (1.0 - MIN_SAVING),
        Err(_) => false,
    }
}

thread_local! {
    /// One zstd context per thread for whole-blob work: creating one costs more than
    /// compressing a small file (packs of thousands of small files).
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> = const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { std::cell::RefCell::new(None) };
}

/// `content` compressed at [`ZSTD_LEVEL`] with this thread's context.
fn compress(content: &[u8]) -> io::Result<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = Some(zstd::bulk::Compressor::new(ZSTD_LEVEL)?);
        }
        match c.as_mut() {
            Some(c) => c.compress(content),
            None => Err(io::Error::other("no zstd context")),
        }
    })
}

/// A zstd payload decompressed with this thread's context into at most `cap` bytes (an error
/// beyond: a decompression bomb).
fn decompress(payload: &[u8], cap: usize) -> io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new()?);
        }
        match d.as_mut() {
            Some(d) => d.decompress(payload, cap),
            None => Err(io::Error::other("no zstd context")),
        }
    })
}

/// Encodes `content` whole, compressing when that saves space.
pub fn encode(content: &[u8]) -> Vec<u8> {
    if content.len() >= 64
        && let Ok(c) = compress(content)
        && (c.len() as f64) < content.len() as f64 * (1.0 - MIN_SAVING)
    {
        let mut out = Vec::with_capacity(HEADER_LEN + c.len());
        out.extend_from_slice(&Header { codec: Codec::Zstd, content_len: content.len() as u64 }.encode());
        out.extend_from_slice(&c);
        return out;
    }
    let mut out = Vec::with_capacity(HEADER_LEN + content.len());
    out.extend_from_slice(&Header { codec: Codec::Raw, content_len: content.len() as u64 }.encode());
    out.extend_from_slice(content);
    out
}

/// Streams `content_len` bytes from `content` into `out` as a stored blob with `codec`.
/// Returns the number of bytes written. The caller has hashed the content already.
pub fn encode_to(
    mut content: impl Read,
    content_len: u64,
    codec: Codec,
    mut out: impl Write,
) -> Result<u64, BlobError> {
    out.write_all(&Header { codec, content_len }.encode())?;
    let mut counter = CountingWriter { inner: out, n: 0 };
    let copied = match codec {
        Codec::Raw => io::copy(&mut content.by_ref().take(content_len), &mut counter)?,
        Codec::Zstd => {
            let mut enc = zstd::stream::write::Encoder::new(&mut counter, ZSTD_LEVEL)?;
            enc.set_pledged_src_size(Some(content_len))?;
            let n = io::copy(&mut content.by_ref().take(content_len), &mut enc)?;
            enc.finish()?;
            n
        }
    };
    if copied != content_len {
        return Err(BlobError::Length { expected: content_len, actual: copied });
    }
    counter.inner.flush()?;
    Ok(HEADER_LEN as u64 + counter.n)
}

/// Decodes a whole stored blob and checks it against `expected`.
pub fn decode(stored: &[u8], expected: &ContentHash) -> Result<Vec<u8>, BlobError> {
    let header = Header::parse(stored)?;
    let payload = &stored[HEADER_LEN..];
    let cap = usize::try_from(header.content_len).map_err(|_| BlobError::BadHeader)?;
    let content = match header.codec {
        Codec::Raw => payload.to_vec(),
        // whole blobs in memory (small ones, mostly): this thread's context, capped at the
        // declared length; larger ones stream with a context of their own
        Codec::Zstd if cap <= BULK_LIMIT => match decompress(payload, cap) {
            Ok(out) => out,
            Err(_) => return Err(BlobError::Length { expected: header.content_len, actual: u64::MAX }),
        },
        Codec::Zstd => {
            let mut out = Vec::with_capacity(cap.min(64 << 20));
            let mut dec = zstd::stream::read::Decoder::new(payload)?.take(header.content_len + 1);
            dec.read_to_end(&mut out).map_err(|_| BlobError::BadHeader)?;
            out
        }
    };
    if content.len() as u64 != header.content_len {
        return Err(BlobError::Length { expected: header.content_len, actual: content.len() as u64 });
    }
    let actual = ContentHash::of(&content);
    if &actual != expected {
        return Err(BlobError::HashMismatch { expected: *expected, actual });
    }
    Ok(content)
}

/// Streams a stored blob from `stored` into `out` as plain content, checking length and hash.
/// `out` has received unverified bytes when this fails: write to a temporary place and keep it
/// only on `Ok`. Returns the content length.
pub fn decode_to(mut stored: impl Read, expected: &ContentHash, out: impl Write) -> Result<u64, BlobError> {
    let mut raw = [0u8; HEADER_LEN];
    stored.read_exact(&mut raw).map_err(|_| BlobError::BadHeader)?;
    let header = Header::parse(&raw)?;
    let mut sink = HashingWriter::new(out);
    let limit = header.content_len + 1;
    match header.codec {
        Codec::Raw => {
            io::copy(&mut stored.take(limit), &mut sink)?;
        }
        Codec::Zstd => {
            let dec = zstd::stream::read::Decoder::new(stored)?;
            io::copy(&mut dec.take(limit), &mut sink)?;
        }
    }
    sink.flush()?;
    let (actual, n) = sink.finish();
    if n != header.content_len {
        return Err(BlobError::Length { expected: header.content_len, actual: n });
    }
    if &actual != expected {
        return Err(BlobError::HashMismatch { expected: *expected, actual });
    }
    Ok(n)
}

struct CountingWriter<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn compressible_content_is_compressed() {
        let content = "hello podfs ".repeat(1000).into_bytes();
        let stored = encode(&content);
        assert_eq!(Header::parse(&stored).unwrap().codec, Codec::Zstd);
        assert!(stored.len() < content.len() / 4);
        assert_eq!(decode(&stored, &ContentHash::of(&content)).unwrap(), content);
    }

    #[test]
    fn random_content_is_kept_raw() {
        // xorshift64: incompressible bytes without a dependency
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let content: Vec<u8> = (0..10_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 56) as u8
            })
            .collect();
        let stored = encode(&content);
        assert_eq!(Header::parse(&stored).unwrap().codec, Codec::Raw);
    }

    #[test]
    fn wrong_hash_and_tampering_are_refused() {
        let content = b"some content that is long enough to be compressed, compressed, compressed".repeat(4);
        let h = ContentHash::of(&content);
        let mut stored = encode(&content);
        assert!(matches!(decode(&stored, &ContentHash::of(b"x")), Err(BlobError::HashMismatch { .. })));
        let last = stored.len() - 1;
        stored[last] ^= 1;
        assert!(decode(&stored, &h).is_err());
        assert!(matches!(decode(b"nope", &h), Err(BlobError::BadHeader)));
    }

    #[test]
    fn bomb_is_capped() {
        // a header claiming 10 bytes in front of a frame inflating to 10 MB
        let big = vec![0u8; 10 << 20];
        let frame = zstd::bulk::compress(&big, 1).unwrap();
        let mut stored = Header { codec: Codec::Zstd, content_len: 10 }.encode().to_vec();
        stored.extend_from_slice(&frame);
        assert!(matches!(decode(&stored, &ContentHash::of(&big)), Err(BlobError::Length { .. })));
        let mut out = Vec::new();
        assert!(decode_to(&stored[..], &ContentHash::of(&big), &mut out).is_err());
        assert!(out.len() <= 11);
    }

    proptest! {
        #[test]
        fn streaming_and_whole_agree(content in proptest::collection::vec(any::<u8>(), 0..5000), repeat in 1usize..4, zstd in any::<bool>()) {
            let content = content.repeat(repeat);
            let h = ContentHash::of(&content);
            let codec = if zstd { Codec::Zstd } else { Codec::Raw };
            let mut stored = Vec::new();
            let n = encode_to(&content[..], content.len() as u64, codec, &mut stored).unwrap();
            prop_assert_eq!(n, stored.len() as u64);
            prop_assert_eq!(decode(&stored, &h).unwrap(), content.clone());
            let mut out = Vec::new();
            prop_assert_eq!(decode_to(&stored[..], &h, &mut out).unwrap(), content.len() as u64);
            prop_assert_eq!(&out, &content);
            prop_assert_eq!(decode(&encode(&content), &h).unwrap(), content);
        }
    }
}
