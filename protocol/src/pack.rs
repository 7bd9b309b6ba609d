//! Packs and upload batches: many small stored blobs in one object, or in one request.
//!
//! **Pack** (`docs/pack-format.md`): stored blobs (the [`crate::blob`] format, header and
//! payload, unchanged) concatenated, then a trailer of one 48-byte entry per blob (BLAKE3 of the
//! content, offset, stored length; u64 little endian), then a 48-byte footer: magic `PFSP`,
//! format version 1, three reserved zero bytes, the entry count (u64 LE) and the BLAKE3 of the
//! trailer. A pack is named by the BLAKE3 of all its bytes. The trailer lets a pack be read
//! without the database (recovery, garbage collection); the database stays the authority.
//!
//! **Batch** (the body of `POST .../blobs/batch`): the 8-byte header `PFSU`, version 1, three
//! zero bytes, then records of `hash (32) | stored length (u32 LE) | stored blob`. The sender
//! chooses each blob's encoding; the receiver decodes every record with its declared length as
//! the cap and checks the hash before keeping it.

use std::ops::Range;

use crate::ContentHash;
use crate::blob::{self, BlobError, HEADER_LEN, Header};

pub const PACK_MAGIC: &[u8; 4] = b"PFSP";
pub const PACK_VERSION: u8 = 1;
/// Bytes of one trailer entry: hash, offset, stored length.
pub const ENTRY_LEN: usize = 48;
/// Bytes of the footer: magic, version, reserved, entry count, BLAKE3 of the trailer.
pub const FOOTER_LEN: usize = 48;
/// Content up to this size travels in batches and lives in packs (by default). Above the
/// manifest's small-file limit (128 KiB): files between the two are few, but each would cost an
/// S3 PUT of its own (measured on Garage: about 3 ms of its CPU per object).
pub const DEFAULT_PACK_BLOB_LIMIT: u64 = 1 << 20;
/// A pack is closed once adding the next blob would take it past this size.
pub const PACK_TARGET: u64 = 16 << 20;

pub const BATCH_MAGIC: &[u8; 4] = b"PFSU";
pub const BATCH_VERSION: u8 = 1;
pub const BATCH_HEADER_LEN: usize = 8;
/// Bytes in front of each record's stored blob: hash and length.
pub const RECORD_HEADER_LEN: usize = 36;
/// The content type of a batch body.
pub const BATCH_CONTENT_TYPE: &str = "application/vnd.podfs.batch";

/// Where one stored blob sits in a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub hash: ContentHash,
    pub offset: u64,
    /// Stored bytes (header and payload).
    pub len: u64,
}

impl Span {
    pub fn range(&self) -> Range<u64> {
        self.offset..self.offset + self.len
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PackError {
    #[error("not a podfs pack (bad footer)")]
    BadFooter,
    #[error("unsupported pack format version {0}")]
    UnsupportedVersion(u8),
    #[error("pack trailer does not match its hash in the footer")]
    TrailerHash,
    #[error("pack trailer entry {0} is out of bounds or overlaps another")]
    BadEntry(usize),
    #[error("a span list of {0} bytes is not a whole number of 48-byte entries")]
    SpanList(usize),
    #[error("batch: {0}")]
    Batch(String),
}

/// Builds a pack in memory.
#[derive(Debug, Default)]
pub struct PackWriter {
    buf: Vec<u8>,
    spans: Vec<Span>,
}

/// A finished pack: its bytes, its name and where each blob is.
#[derive(Debug)]
pub struct Pack {
    pub bytes: Vec<u8>,
    pub hash: ContentHash,
    pub spans: Vec<Span>,
}

impl PackWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes of stored blobs so far (the pack without trailer and footer).
    pub fn len(&self) -> u64 {
        self.buf.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// True when `stored_len` more bytes would take a non-empty pack past [`PACK_TARGET`].
    pub fn would_overflow(&self, stored_len: usize) -> bool {
        !self.is_empty() && self.len() + stored_len as u64 > PACK_TARGET
    }

    /// Appends a stored blob (already verified by the caller) and returns where it is.
    pub fn push(&mut self, hash: ContentHash, stored: &[u8]) -> Span {
        let span = Span { hash, offset: self.len(), len: stored.len() as u64 };
        self.buf.extend_from_slice(stored);
        self.spans.push(span);
        span
    }

    /// Adds trailer and footer and names the pack.
    pub fn finish(self) -> Pack {
        let Self { mut buf, spans } = self;
        let trailer_start = buf.len();
        buf.extend_from_slice(&encode_spans(&spans));
        let trailer_hash = blake3::hash(&buf[trailer_start..]);
        buf.extend_from_slice(PACK_MAGIC);
        buf.extend_from_slice(&[PACK_VERSION, 0, 0, 0]);
        buf.extend_from_slice(&(spans.len() as u64).to_le_bytes());
        buf.extend_from_slice(trailer_hash.as_bytes());
        let hash = ContentHash::of(&buf);
        Pack { bytes: buf, hash, spans }
    }
}

/// The trailer entries of `spans` in their order: 48 bytes each (hash, offset u64 LE, stored
/// length u64 LE). Also the span list the database keeps with each pack.
pub fn encode_spans(spans: &[Span]) -> Vec<u8> {
    let mut out = Vec::with_capacity(spans.len() * ENTRY_LEN);
    for s in spans {
        out.extend_from_slice(&s.hash.0);
        out.extend_from_slice(&s.offset.to_le_bytes());
        out.extend_from_slice(&s.len.to_le_bytes());
    }
    out
}

/// The spans of trailer entries (see [`encode_spans`]), unchecked against any pack.
pub fn decode_spans(entries: &[u8]) -> Result<Vec<Span>, PackError> {
    if !entries.len().is_multiple_of(ENTRY_LEN) {
        return Err(PackError::SpanList(entries.len()));
    }
    Ok(entries
        .chunks_exact(ENTRY_LEN)
        .map(|e| Span {
            hash: ContentHash::from_slice(&e[..32]).unwrap_or(ContentHash([0; 32])),
            offset: u64_at(e, 32),
            len: u64_at(e, 40),
        })
        .collect())
}

/// The number of trailer entries a footer announces, after checking it is a pack footer.
pub fn footer_entries(footer: &[u8]) -> Result<u64, PackError> {
    if footer.len() != FOOTER_LEN || &footer[..4] != PACK_MAGIC || footer[5..8] != [0, 0, 0] {
        return Err(PackError::BadFooter);
    }
    if footer[4] != PACK_VERSION {
        return Err(PackError::UnsupportedVersion(footer[4]));
    }
    Ok(u64_at(footer, 8))
}

/// Reads the spans of a whole pack from its trailer, checking the trailer hash and that every
/// span lies in the blob area without overlapping another.
pub fn read_spans(pack: &[u8]) -> Result<Vec<Span>, PackError> {
    if pack.len() < FOOTER_LEN {
        return Err(PackError::BadFooter);
    }
    let footer = &pack[pack.len() - FOOTER_LEN..];
    let n = footer_entries(footer)?;
    let trailer_len = usize::try_from(n).ok().and_then(|n| n.checked_mul(ENTRY_LEN)).ok_or(PackError::BadFooter)?;
    let blob_area = (pack.len() - FOOTER_LEN).checked_sub(trailer_len).ok_or(PackError::BadFooter)?;
    let trailer = &pack[blob_area..pack.len() - FOOTER_LEN];
    if blake3::hash(trailer).as_bytes() != &footer[16..48] {
        return Err(PackError::TrailerHash);
    }
    let mut spans = decode_spans(trailer)?;
    let mut order: Vec<usize> = (0..spans.len()).collect();
    order.sort_by_key(|&i| spans[i].offset);
    let mut end = 0u64;
    for i in order {
        let s = spans[i];
        let stop = s.offset.checked_add(s.len).ok_or(PackError::BadEntry(i))?;
        if s.offset < end || stop > blob_area as u64 || s.len < HEADER_LEN as u64 {
            return Err(PackError::BadEntry(i));
        }
        end = stop;
    }
    spans.shrink_to_fit();
    Ok(spans)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Builds a batch body.
#[derive(Debug)]
pub struct BatchWriter {
    buf: Vec<u8>,
    records: usize,
}

impl Default for BatchWriter {
    fn default() -> Self {
        let mut buf = Vec::new();
        buf.extend_from_slice(BATCH_MAGIC);
        buf.extend_from_slice(&[BATCH_VERSION, 0, 0, 0]);
        Self { buf, records: 0 }
    }
}

impl BatchWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a record: `stored` is the blob in the stored format (any codec).
    pub fn push(&mut self, hash: &ContentHash, stored: &[u8]) {
        let len = u32::try_from(stored.len()).expect("a batch record is smaller than 4 GiB");
        self.buf.extend_from_slice(&hash.0);
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(stored);
        self.records += 1;
    }

    /// Bytes so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn records(&self) -> usize {
        self.records
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// One record of a batch, not yet verified.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub hash: ContentHash,
    pub stored: &'a [u8],
}

/// Splits a batch body into its records. Fails on a bad header, a truncated record or a record
/// longer than `max_stored` bytes: the framing is broken, so nothing in the batch is trusted.
pub fn read_batch(body: &[u8], max_stored: u64) -> Result<Vec<Record<'_>>, PackError> {
    let bad = |m: String| PackError::Batch(m);
    if body.len() < BATCH_HEADER_LEN || &body[..4] != BATCH_MAGIC || body[5..8] != [0, 0, 0] {
        return Err(bad("the body does not start with the batch header PFSU".into()));
    }
    if body[4] != BATCH_VERSION {
        return Err(bad(format!("unsupported batch version {}", body[4])));
    }
    let mut rest = &body[BATCH_HEADER_LEN..];
    let mut out = Vec::new();
    while !rest.is_empty() {
        let i = out.len();
        if rest.len() < RECORD_HEADER_LEN {
            return Err(bad(format!("record {i} is truncated in its header")));
        }
        let hash = ContentHash::from_slice(&rest[..32]).map_err(|e| bad(e.to_string()))?;
        let len = u64::from(u32::from_le_bytes([rest[32], rest[33], rest[34], rest[35]]));
        if len > max_stored {
            return Err(bad(format!("record {i} ({hash}) is {len} stored bytes; the limit is {max_stored}")));
        }
        let len = len as usize;
        let Some(stored) = rest.get(RECORD_HEADER_LEN..RECORD_HEADER_LEN + len) else {
            return Err(bad(format!("record {i} ({hash}) is truncated: {len} bytes announced")));
        };
        out.push(Record { hash, stored });
        rest = &rest[RECORD_HEADER_LEN + len..];
    }
    Ok(out)
}

/// Why one record of a batch was refused.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("content of {content_len} bytes is over the pack limit of {limit} bytes: upload it alone")]
    TooLarge { content_len: u64, limit: u64 },
    #[error(transparent)]
    Blob(#[from] BlobError),
}

/// Verifies one record: a stored blob whose content is at most `limit` bytes, decoded with its
/// declared length as the cap, hashing to its name. Returns the content length.
pub fn verify_record(record: &Record<'_>, limit: u64) -> Result<u64, RecordError> {
    let header = Header::parse(record.stored)?;
    if header.content_len > limit {
        return Err(RecordError::TooLarge { content_len: header.content_len, limit });
    }
    let content = blob::decode(record.stored, &record.hash)?;
    Ok(content.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::encode;

    fn blobs(n: usize) -> Vec<(ContentHash, Vec<u8>)> {
        (0..n)
            .map(|i| {
                let content = format!("blob {i} ").repeat(i % 50 + 1).into_bytes();
                (ContentHash::of(&content), encode(&content))
            })
            .collect()
    }

    #[test]
    fn pack_round_trip() {
        let mut w = PackWriter::new();
        for (h, stored) in blobs(100) {
            w.push(h, &stored);
        }
        let pack = w.finish();
        assert_eq!(pack.hash, ContentHash::of(&pack.bytes));
        assert_eq!(read_spans(&pack.bytes).unwrap(), pack.spans);
        let list = encode_spans(&pack.spans);
        assert_eq!(list.len(), 100 * ENTRY_LEN);
        assert_eq!(decode_spans(&list).unwrap(), pack.spans);
        assert_eq!(decode_spans(&list[1..]), Err(PackError::SpanList(list.len() - 1)));
        for (s, (h, stored)) in pack.spans.iter().zip(blobs(100)) {
            assert_eq!(s.hash, h);
            assert_eq!(&pack.bytes[s.offset as usize..(s.offset + s.len) as usize], &stored[..]);
        }
        assert_eq!(read_spans(&PackWriter::new().finish().bytes).unwrap(), vec![]);
    }

    #[test]
    fn damaged_packs_are_refused() {
        let mut w = PackWriter::new();
        for (h, stored) in blobs(3) {
            w.push(h, &stored);
        }
        let pack = w.finish().bytes;
        let n = pack.len();
        let mut t = pack.clone();
        t[n - FOOTER_LEN - 1] ^= 1; // the trailer
        assert_eq!(read_spans(&t), Err(PackError::TrailerHash));
        let mut t = pack.clone();
        t[n - FOOTER_LEN] = b'X';
        assert_eq!(read_spans(&t), Err(PackError::BadFooter));
        let mut t = pack.clone();
        t[n - FOOTER_LEN + 4] = 9;
        assert_eq!(read_spans(&t), Err(PackError::UnsupportedVersion(9)));
        let mut t = pack.clone();
        t[n - FOOTER_LEN + 8] = 200; // more entries than the pack holds
        assert_eq!(read_spans(&t), Err(PackError::BadFooter));
        assert_eq!(read_spans(&pack[..10]), Err(PackError::BadFooter));
    }

    #[test]
    fn overlapping_entries_are_refused() {
        // a trailer that claims two blobs at the same place, correctly hashed
        let (h, stored) = blobs(1).remove(0);
        let mut w = PackWriter::new();
        w.push(h, &stored);
        w.spans.push(Span { hash: h, offset: 0, len: stored.len() as u64 });
        assert_eq!(read_spans(&w.finish().bytes), Err(PackError::BadEntry(1)));
    }

    #[test]
    fn overflow_rule() {
        let mut w = PackWriter::new();
        assert!(!w.would_overflow(PACK_TARGET as usize * 2), "an empty pack takes anything");
        w.push(ContentHash::of(b""), &encode(b""));
        assert!(w.would_overflow(PACK_TARGET as usize));
        assert!(!w.would_overflow(1000));
    }

    #[test]
    fn batch_round_trip_and_verification() {
        let mut w = BatchWriter::new();
        let all = blobs(20);
        for (h, stored) in &all {
            w.push(h, stored);
        }
        // a record whose bytes do not match its name
        let wrong = ContentHash::of(b"another");
        w.push(&wrong, &all[0].1);
        let body = w.finish();
        let records = read_batch(&body, 1 << 20).unwrap();
        assert_eq!(records.len(), 21);
        for (r, (h, stored)) in records.iter().zip(&all) {
            assert_eq!(&r.hash, h);
            assert_eq!(r.stored, &stored[..]);
            assert!(verify_record(r, 1 << 20).is_ok());
        }
        assert!(matches!(verify_record(&records[20], 1 << 20), Err(RecordError::Blob(BlobError::HashMismatch { .. }))));
        assert!(matches!(verify_record(&records[19], 10), Err(RecordError::TooLarge { .. })));
    }

    #[test]
    fn broken_batches_are_refused() {
        let (h, stored) = blobs(1).remove(0);
        let mut w = BatchWriter::new();
        w.push(&h, &stored);
        let body = w.finish();
        assert!(read_batch(&body[..body.len() - 1], 1 << 20).is_err(), "truncated payload");
        assert!(read_batch(&body[..BATCH_HEADER_LEN + 10], 1 << 20).is_err(), "truncated record header");
        assert!(read_batch(b"PFSB\x01\0\0\0", 1 << 20).is_err(), "wrong magic");
        assert!(read_batch(&body, 4).is_err(), "record over the cap");
        assert_eq!(read_batch(&BatchWriter::new().finish(), 1).unwrap().len(), 0);
    }
}
