//! The cache on a real directory: round trips, corruption, eviction, sharing between handles.

#![allow(clippy::unwrap_used)]
use std::collections::HashSet;
use std::fs::{self, File, OpenOptions, Permissions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use podfs_protocol::ContentHash;
use rusqlite::{Connection, params};

use super::*;
use crate::index::disk_size;
use crate::packs::file_uri;

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
    let err = c.insert_bytes(&other, &small).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }) && err.to_string().contains("refusing"), "{err}");
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
    Connection::open(&pack).unwrap().execute("UPDATE blobs SET data = 'BAD!' WHERE data = x'62616421'", []).unwrap();
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

/// What keeps adding a pack cheap for a large index: a pack lists only contents no unit lists
/// yet, so the next version's manifest (30,000 BLOBs, one new) adds one row, not 30,000. And
/// many threads read one pack through a bounded pool. (Timings: `benches/manifest`.)
#[test]
fn a_pack_lists_only_new_contents_and_serves_parallel_reads() {
    let (tmp, c) = cache(DEFAULT_LIMIT);
    let blobs: Vec<Vec<u8>> = (0..50_000u32).map(|i| format!("file number {i}").into_bytes()).collect();
    let refs: Vec<&[u8]> = blobs.iter().map(Vec::as_slice).collect();
    let (path, fh1) = make_pack(tmp.path(), "m.sqlite", &refs);
    c.add_pack(&path, &fh1).unwrap();
    assert_eq!(c.inner.index.content_rows(UnitKind::Pack, &fh1).unwrap(), 50_000);
    let mut next = refs[..30_000].to_vec();
    next[0] = b"changed";
    let (path, fh2) = make_pack(tmp.path(), "m2.sqlite", &next);
    c.add_pack(&path, &fh2).unwrap();
    assert_eq!(c.inner.index.content_rows(UnitKind::Pack, &fh2).unwrap(), 1, "only the new content is listed");
    assert_eq!(read(&c, b"changed").as_deref(), Some(&b"changed"[..]));

    let mut hashes: Vec<ContentHash> = refs.iter().map(|b| ContentHash::of(b)).collect();
    hashes.extend((0..1000u32).map(|i| ContentHash::of(&i.to_le_bytes())));
    assert_eq!(c.contains(&hashes).unwrap().len(), 50_000);
    c.touch(&hashes).unwrap();
    std::thread::scope(|s| {
        for part in refs.chunks(refs.len() / 4) {
            let c = c.clone();
            s.spawn(move || part.iter().for_each(|b| assert_eq!(read(&c, b).as_deref(), Some(*b))));
        }
    });
    assert!(c.inner.pool.max_idle() <= packs::MAX_IDLE);
    assert_eq!(file_uri(Path::new("/a b/c?d#e%f")), "file:/a%20b/c%3fd%23e%25f");
}

#[test]
fn a_missing_pack_file_is_not_found_and_a_newer_index_is_refused() {
    let (tmp, c) = cache(DEFAULT_LIMIT);
    let err = c.add_pack(&tmp.path().join("nope.sqlite"), &ContentHash::of(b"x")).unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    Connection::open(c.dir().join("index.sqlite")).unwrap().pragma_update(None, "user_version", 99).unwrap();
    let err = ContentCache::open(c.dir(), DEFAULT_LIMIT).err().expect("refused");
    assert!(matches!(err, Error::Version { found: 99, .. }), "{err:?}");
}
