use std::path::PathBuf;

use podfs_protocol::{ContentHash, Entry, EntryKind, WsPath};
use rusqlite::{Connection, params};

use crate::transfer::{compress, decompress_verified};
use crate::{Error, Header, Kind, Reader, Writer};

fn entry(path: &str, kind: EntryKind, content: &[u8]) -> Entry {
    let dir = kind == EntryKind::Dir;
    Entry {
        path: WsPath::new(path).unwrap(),
        kind,
        hash: (!dir).then(|| ContentHash::of(content)),
        size: if dir { 0 } else { content.len() as u64 },
        mode: match kind {
            EntryKind::Dir => 0o755,
            EntryKind::Symlink => 0o777,
            EntryKind::File => 0o644,
        },
    }
}

fn header(version: u64, kind: Kind) -> Header {
    Header { workspace: "ws".into(), version, kind, small_file_limit: 1024 }
}

/// A manifest of: dir `d`, `d/a` ("alpha"), `d/b` (same bytes as `d/a`), symlink `l`, and a
/// "large" file `z` whose bytes are not inside.
fn sample(dir: &tempfile::TempDir) -> PathBuf {
    let path = dir.path().join("m.sqlite");
    let mut w = Writer::create(&path, &header(3, Kind::Full)).unwrap();
    for e in [
        entry("d", EntryKind::Dir, b""),
        entry("d/a", EntryKind::File, b"alpha"),
        entry("d/b", EntryKind::File, b"alpha"),
        entry("l", EntryKind::Symlink, b"d/a"),
        entry("z", EntryKind::File, &[7u8; 4000]),
    ] {
        w.put_entry(&e).unwrap();
    }
    w.put_blob(&ContentHash::of(b"alpha"), b"alpha").unwrap();
    w.put_blob(&ContentHash::of(b"alpha"), b"alpha").unwrap();
    w.put_blob(&ContentHash::of(b"d/a"), b"d/a").unwrap();
    w.finish().unwrap();
    path
}

fn rows(r: &Reader) -> Vec<(String, Option<i64>)> {
    let mut out = Vec::new();
    r.for_each_entry(|row| {
        out.push((row.entry.path.to_string(), row.blob_id));
        Ok(())
    })
    .unwrap();
    out
}

#[test]
fn writes_and_reads_a_full_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let r = Reader::open(&sample(&dir)).unwrap();
    assert_eq!(r.header().unwrap(), header(3, Kind::Full));
    let rows = rows(&r);
    let paths: Vec<_> = rows.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(paths, ["d", "d/a", "d/b", "l", "z"]);
    let ids: Vec<_> = rows.iter().map(|(_, id)| id.is_some()).collect();
    assert_eq!(ids, [false, true, true, true, false], "dirs and large files have no BLOB");
    assert_eq!(rows[1].1, rows[2].1, "identical content is stored once");
    let h = ContentHash::of(b"alpha");
    assert_eq!(r.blob(rows[1].1.unwrap(), &h, 5).unwrap(), b"alpha");
    assert_eq!(r.blob_by_hash(&h, 5).unwrap().unwrap(), b"alpha");
    assert!(r.blob_by_hash(&ContentHash::of(b"nope"), 4).unwrap().is_none());
    assert!(r.deleted().unwrap().is_empty());
}

#[test]
fn modify_applies_a_diff_and_drops_unreferenced_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let path = sample(&dir);
    let mut w = Writer::modify(&path, &header(4, Kind::Full)).unwrap();
    w.delete_entry("d/a", false).unwrap();
    w.delete_entry("d/b", false).unwrap();
    w.put_entry(&entry("d/c", EntryKind::File, b"gamma")).unwrap();
    assert!(!w.has_blob(&ContentHash::of(b"gamma")).unwrap());
    w.put_blob(&ContentHash::of(b"gamma"), b"gamma").unwrap();
    assert_eq!(w.drop_unreferenced_blobs().unwrap(), 1, "alpha is gone");
    assert_eq!(w.counts().unwrap(), (4, 2));
    w.finish().unwrap();
    let r = Reader::open(&path).unwrap();
    assert_eq!(r.header().unwrap().version, 4);
    let paths: Vec<_> = rows(&r).into_iter().map(|(p, _)| p).collect();
    assert_eq!(paths, ["d", "d/c", "l", "z"]);
    let raw = std::fs::read(&path).unwrap();
    assert!(raw.windows(5).all(|w| w != b"alpha"), "deleted BLOB bytes are zeroed, not left behind");
}

#[test]
fn delta_records_deletions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.sqlite");
    let mut w = Writer::create(&path, &header(9, Kind::Delta { base: 7 })).unwrap();
    w.delete_entry("gone", true).unwrap();
    w.put_entry(&entry("new", EntryKind::File, b"n")).unwrap();
    w.finish().unwrap();
    let r = Reader::open(&path).unwrap();
    assert_eq!(r.header().unwrap().kind, Kind::Delta { base: 7 });
    assert_eq!(r.deleted().unwrap(), vec![WsPath::new("gone").unwrap()]);
}

#[test]
fn tampered_blob_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = sample(&dir);
    let conn = Connection::open(&path).unwrap();
    conn.execute("UPDATE blobs SET data = ?1 WHERE data = ?2", params![b"alphA".as_slice(), b"alpha".as_slice()])
        .unwrap();
    drop(conn);
    let r = Reader::open(&path).unwrap();
    let id = rows(&r)[1].1.unwrap();
    let err = r.blob(id, &ContentHash::of(b"alpha"), 5).unwrap_err();
    assert!(matches!(err, Error::BlobMismatch { .. }), "{err}");
    assert!(r.blob_by_hash(&ContentHash::of(b"alpha"), 5).is_err());
}

#[test]
fn hostile_rows_and_foreign_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["../escape", "/etc/passwd", "a//b", ""] {
        let path = sample(&dir);
        let conn = Connection::open(&path).unwrap();
        conn.execute("INSERT INTO entries VALUES (?1, 'file', 420, 1, NULL)", [bad]).unwrap();
        drop(conn);
        let r = Reader::open(&path).unwrap();
        let err = r.for_each_entry(|_| Ok(())).unwrap_err();
        assert!(matches!(err, Error::BadEntry { .. }), "{bad:?}: {err}");
        std::fs::remove_file(&path).unwrap();
    }

    let path = sample(&dir);
    let conn = Connection::open(&path).unwrap();
    conn.execute_batch("CREATE VIEW v AS SELECT 1; ").unwrap();
    drop(conn);
    assert!(matches!(Reader::open(&path), Err(Error::Format(_))), "views are refused");
    std::fs::remove_file(&path).unwrap();

    let other = dir.path().join("other.sqlite");
    Connection::open(&other).unwrap().execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);").unwrap();
    assert!(matches!(Reader::open(&other), Err(Error::Format(_))), "not a manifest");
    std::fs::write(&other, b"not sqlite at all, just bytes").unwrap();
    assert!(Reader::open(&other).is_err());
}

#[test]
fn transfer_round_trip_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let path = sample(&dir);
    let mut frame = Vec::new();
    let c = compress(&path, &mut frame).unwrap();
    assert_eq!(hash_file(&path).unwrap(), (c.hash, c.size));
    assert_eq!((ContentHash::of(&frame), frame.len() as u64), (c.stored_hash, c.stored_size));

    let mut out = Vec::new();
    decompress_verified(frame.as_slice(), &c.hash, c.size, &mut out).unwrap();
    assert_eq!(out, std::fs::read(&path).unwrap());

    let wrong = ContentHash::of(b"x");
    assert!(matches!(
        decompress_verified(frame.as_slice(), &wrong, c.size, Vec::new()),
        Err(podfs_protocol::frame::FrameError::HashMismatch { .. })
    ));
    // a frame inflating past the stated size is cut off at the cap
    assert!(matches!(
        decompress_verified(frame.as_slice(), &c.hash, c.size - 1, Vec::new()),
        Err(podfs_protocol::frame::FrameError::SizeMismatch { .. })
    ));
    let truncated = &frame[..frame.len() / 2];
    assert!(decompress_verified(truncated, &c.hash, c.size, Vec::new()).is_err());
    assert!(decompress_verified(&b"garbage"[..], &c.hash, c.size, Vec::new()).is_err());
    let as_manifest_error = Error::from(decompress_verified(frame.as_slice(), &wrong, c.size, Vec::new()).unwrap_err());
    assert!(matches!(as_manifest_error, Error::FileMismatch { .. }), "{as_manifest_error:?}");
}

/// BLAKE3 and length of a whole file.
fn hash_file(path: &std::path::Path) -> std::io::Result<(ContentHash, u64)> {
    let mut hasher = blake3::Hasher::new();
    let n = std::io::copy(&mut std::fs::File::open(path)?, &mut hasher)?;
    Ok((hasher.finalize().into(), n))
}
