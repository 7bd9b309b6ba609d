//! Packs end to end (issue 2/5): small content travels in batches and lives in packs. Round
//! trips of 20,000 small files on the embedded default and on PostgreSQL + Garage (with the
//! bucket holding one object per pack plus one per large file), per-record refusal in a batch,
//! signed ranges that refuse any other range, stores mixing old loose small blobs with packs,
//! and a blob store failing mid-batch.

use std::collections::HashSet;
use std::path::Path;

use podfs_client::Client;
use podfs_protocol::api::{CommitRequest, ErrorCode};
use podfs_protocol::pack::{BATCH_CONTENT_TYPE, BatchWriter};
use podfs_protocol::{Change, ContentHash, Entry, EntryKind, VersionRef, WsPath, blob};
use podfs_syncd::{PullOptions, PushOptions, pull, push};
use podfs_testnet::gateway::{ADMIN_TOKEN, TestGateway};
use podfs_testnet::tree::assert_same_tree;

/// `n` small files (0 to 6 KiB, some content repeated) in 100 directories, two medium files
/// of 300 KiB (over the manifest's small-file limit, under the pack limit: packed, fetched by
/// range), plus `large` files of 1.5 MiB (over the pack limit: their own objects). Returns the
/// distinct large contents.
fn small_tree(root: &Path, n: usize, large: usize) -> usize {
    for i in 0..n {
        let dir = root.join(format!("d{:02}", i % 100));
        std::fs::create_dir_all(&dir).expect("mkdir");
        // every 50th file repeats the content of file i - 1 (dedup inside a batch)
        let seed = if i % 50 == 0 && i > 0 { i - 1 } else { i };
        let body = format!("module {seed} {{ value: {} }}\n", seed * 7919).repeat(seed % 97);
        std::fs::write(dir.join(format!("f{i}.js")), body).expect("write");
    }
    let pattern =
        |len: u32, i: usize| -> Vec<u8> { (0..len).map(|j| ((j as usize * 31 + i * 7) % 251) as u8).collect() };
    for i in 0..2 {
        std::fs::write(root.join(format!("medium{i}.bin")), pattern(300 << 10, 1000 + i)).expect("write");
    }
    for i in 0..large {
        std::fs::write(root.join(format!("large{i}.bin")), pattern(3 << 19, i)).expect("write");
    }
    large
}

/// Pushes a 20,000-file tree, pulls it back both ways (Phase 1 through blob locations, Phase 2
/// through the manifest) and checks single-file GETs of packed content.
async fn round_trip_20k(gw: &TestGateway) -> usize {
    let client = gw.client();
    client.create_workspace("p").await.expect("create");
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    let large = small_tree(&src, 20_000, 3);
    let r = push(&client, "p", &src, PushOptions::default()).await.expect("push");
    assert_eq!(r.files, 20_005);
    let out = tmp.path().join("out");
    pull(&client, "p", VersionRef::Head, &out, PullOptions::default()).await.expect("pull");
    assert_same_tree(&src, &out);
    let hydrated = tmp.path().join("hydrated");
    podfs_syncd::hydrate(
        &client,
        "p",
        VersionRef::Head,
        &hydrated,
        podfs_testnet::hydrate_options(&tmp.path().join("cache")),
    )
    .await
    .expect("manifest pull");
    assert_same_tree(&src, &hydrated);
    for name in ["d07/f12307.js", "d00/f0.js", "medium1.bin", "large1.bin"] {
        let f = client.get_file("p", VersionRef::Head, &WsPath::new(name).expect("path")).await.expect("get file");
        let bytes = f.bytes().await.expect("body");
        assert_eq!(bytes.as_ref(), std::fs::read(src.join(name)).expect("read").as_slice(), "{name}");
    }
    large
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_thousand_small_files_round_trip_embedded() {
    let gw = TestGateway::embedded().await.expect("gateway");
    round_trip_20k(&gw).await;
    let packs = gw.state.meta.packs().await.expect("packs");
    assert!(!packs.is_empty() && packs.len() <= 10, "a few packs for ~50 MB of small content: {}", packs.len());
    gw.stop().await.expect("stop");
}

/// The bucket holds one object per pack plus one per large file (and the manifest built by the
/// Phase 2 pull): nothing per small file.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_thousand_small_files_round_trip_postgres_garage() {
    let (gw, db, store) = TestGateway::on_fresh_services().await;
    let large = round_trip_20k(&gw).await;
    let keys = podfs_testnet::s3::list_keys(&store).await.expect("list bucket");
    let kind = |k: &str| keys.iter().filter(|key| key.contains(k)).count();
    let packs = gw.state.meta.packs().await.expect("packs");
    assert_eq!(kind("/packs/"), packs.len(), "one object per recorded pack: {keys:?}");
    assert_eq!(kind("/blobs/"), large, "one object per large file");
    assert_eq!(kind("/manifests/"), 1);
    assert_eq!(keys.len(), packs.len() + large + 1, "{keys:?}");
    let spans: u64 = packs.iter().map(|p| p.2).sum();
    assert!(spans >= 19_000, "every distinct small content is in a pack: {spans}");
    gw.stop().await.expect("stop");
    db.cleanup().await;
}

/// A batch body from `(hash, stored)` records.
fn batch(records: &[(ContentHash, Vec<u8>)]) -> Vec<u8> {
    let mut w = BatchWriter::new();
    for (h, stored) in records {
        w.push(h, stored);
    }
    w.finish()
}

async fn post_batch(gw: &TestGateway, ctype: &str, body: Vec<u8>) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/v1/workspaces/b/blobs/batch", gw.url))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", ctype)
        .body(body)
        .send()
        .await
        .expect("send")
}

/// One record that does not match its name (and one over the pack limit) is refused alone;
/// the others are stored. A broken body or a wrong content type stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_refuses_bad_records_alone() {
    let gw = TestGateway::embedded().await.expect("gateway");
    let client = gw.client();
    client.create_workspace("b").await.expect("create");
    let good: Vec<(ContentHash, Vec<u8>)> = (0..5)
        .map(|i| {
            let c = format!("good content {i} ").repeat(20 * i + 1);
            (ContentHash::of(c.as_bytes()), blob::encode(c.as_bytes()))
        })
        .collect();
    let torn = ContentHash::of(b"what the file held when it was hashed");
    let big = vec![1u8; podfs_protocol::pack::DEFAULT_PACK_BLOB_LIMIT as usize + 1];
    let mut records = good.clone();
    records.insert(2, (torn, blob::encode(b"what the file holds now")));
    records.push((ContentHash::of(&big), blob::encode(&big)));
    let garbage = ContentHash::of(b"garbage");
    records.push((garbage, b"not a stored blob at all".to_vec()));

    // a wrong content type and a truncated body store nothing; the first good record comes
    // twice (a duplicate, stored once)
    let mut sent = records.clone();
    sent.push(good[0].clone());
    let body = batch(&sent);
    let r = post_batch(&gw, "application/octet-stream", body.clone()).await;
    assert_eq!(r.status(), 415);
    let r = post_batch(&gw, BATCH_CONTENT_TYPE, body[..body.len() - 3].to_vec()).await;
    assert_eq!(r.status(), 400);
    let err: podfs_protocol::api::ErrorBody = r.json().await.expect("json error");
    assert!(err.message.contains("truncated"), "{}", err.message);
    let all: Vec<ContentHash> = records.iter().map(|r| r.0).collect();
    assert_eq!(client.missing_blobs("b", &all).await.expect("missing").len(), all.len());

    let r = post_batch(&gw, BATCH_CONTENT_TYPE, body).await;
    assert_eq!(r.status(), 200);
    let answer: podfs_protocol::api::BatchUploaded = r.json().await.expect("answer");
    assert_eq!((answer.records, answer.stored, answer.duplicates, answer.packs), (9, 5, 1, 1), "{answer:?}");
    let refused: Vec<(ContentHash, ErrorCode)> = answer.refused.iter().map(|r| (r.hash, r.code)).collect();
    assert_eq!(
        refused,
        vec![
            (torn, ErrorCode::HashMismatch),
            (ContentHash::of(&big), ErrorCode::PayloadTooLarge),
            (garbage, ErrorCode::HashMismatch)
        ]
    );
    let missing: HashSet<ContentHash> = client.missing_blobs("b", &all).await.expect("missing").into_iter().collect();
    assert_eq!(missing, [torn, ContentHash::of(&big), garbage].into_iter().collect());
    // sent again: every good record is a duplicate, nothing new is written
    let again: podfs_protocol::api::BatchUploaded =
        post_batch(&gw, BATCH_CONTENT_TYPE, batch(&good)).await.json().await.expect("answer");
    assert_eq!((again.stored, again.duplicates, again.packs), (0, 5, 0), "{again:?}");
    // the stored ones are committable and come back intact
    let entries: Vec<Change> = good
        .iter()
        .enumerate()
        .map(|(i, (h, stored))| {
            let size = blob::Header::parse(stored).expect("header").content_len;
            Change::Put(Entry {
                path: WsPath::new(format!("f{i}")).expect("path"),
                kind: EntryKind::File,
                hash: Some(*h),
                size,
                mode: 0o644,
            })
        })
        .collect();
    let req = CommitRequest { parent_version: 0, message: None, author: None, changes: entries };
    client.commit("b", &req).await.expect("commit");
    let f = client.get_file("b", VersionRef::Head, &WsPath::new("f3").expect("path")).await.expect("get");
    assert_eq!(f.bytes().await.expect("body").as_ref(), "good content 3 ".repeat(61).as_bytes());
    gw.stop().await.expect("stop");
}

/// A packed blob's presigned location covers exactly its range of the pack: Garage serves that
/// range and refuses a widened, shifted or dropped one. With `presign_ranges` off, the gateway
/// serves packed blobs itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packed_locations_sign_exactly_their_range() {
    let (gw, db, _store) = TestGateway::on_fresh_services().await;
    let client = gw.client();
    client.create_workspace("r").await.expect("create");
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    for i in 0..3 {
        std::fs::write(src.join(format!("f{i}")), format!("file {i} of the pack\n").repeat(10)).expect("write");
    }
    push(&client, "r", &src, PushOptions::default()).await.expect("push");
    let contents: Vec<String> = (0..3).map(|i| format!("file {i} of the pack\n").repeat(10)).collect();
    let hashes: Vec<ContentHash> = contents.iter().map(|c| ContentHash::of(c.as_bytes())).collect();
    let locs = client.blob_locations("r", &hashes).await.expect("locations").locations;
    // the blob furthest into the pack, so that a range from 0 is a widened one
    let loc = locs.into_iter().max_by_key(|l| l.range.map(|r| r.start)).expect("three locations");
    let range = loc.range.expect("a packed blob is located by its range");
    assert!(range.start > 0, "{loc:?}");
    let middle = loc.hash;
    let content = &contents[hashes.iter().position(|h| *h == middle).expect("one of ours")];
    assert!(!loc.gateway && loc.url.contains("/packs/"), "{loc:?}");
    let http = reqwest::Client::new();
    let get = |header: Option<String>| {
        let mut req = http.get(&loc.url);
        if let Some(h) = header {
            req = req.header("range", h);
        }
        req.send()
    };
    let exact = get(Some(range.header())).await.expect("get");
    assert_eq!(exact.status(), 206);
    let stored = exact.bytes().await.expect("body");
    assert_eq!(blob::decode(&stored, &middle).expect("the exact range is the blob"), content.as_bytes());
    let end = range.start + range.len - 1;
    for bad in [
        Some(format!("bytes=0-{end}")),
        Some(format!("bytes={}-{}", range.start, end + 1000)),
        Some(format!("bytes={}-{}", range.start + 1, end + 1)),
        Some("bytes=0-".to_string()),
        None,
    ] {
        let r = get(bad.clone()).await.expect("get");
        // Garage: 403 for a range other than the signed one, 400 for a signed header missing
        assert!(matches!(r.status().as_u16(), 400 | 403), "range {bad:?} must be refused: {}", r.status());
    }
    // the client fetches it through the location, verified
    let content = client.fetch_blob(&loc, 1 << 20).await.expect("fetch");
    assert_eq!(ContentHash::of(&content), middle);
    let config = gw.config.clone();
    gw.stop().await.expect("stop");

    // ranges not presigned: the gateway serves the packed blob, verified
    let tmp_gw = TestGateway::start({
        let mut c = config;
        c.presign_ranges = false;
        c.listen = "127.0.0.1:0".parse().expect("addr");
        c
    })
    .await
    .expect("gateway");
    let client = tmp_gw.client();
    let loc = client.blob_locations("r", &[middle]).await.expect("locations").locations.remove(0);
    assert!(loc.gateway && loc.range.is_none(), "{loc:?}");
    let content = client.fetch_blob(&loc, 1 << 20).await.expect("fetch through the gateway");
    assert_eq!(ContentHash::of(&content), middle);
    tmp_gw.stop().await.expect("stop");
    db.cleanup().await;
}

/// A store written before packs (small blobs as loose objects through PUT) plus versions
/// pushed with packs: every version reads back byte-identically, through every read path.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn loose_small_blobs_and_packs_serve_every_version() {
    let (gw, db, _store) = TestGateway::on_fresh_services().await;
    let client = gw.client();
    client.create_workspace("m").await.expect("create");
    let tmp = tempfile::tempdir().expect("tempdir");
    let v1 = tmp.path().join("v1");
    small_tree(&v1, 300, 1);
    // version 1 the old way: one PUT per blob
    let scanned = podfs_syncd::scan::scan(&v1).expect("scan");
    for e in &scanned.entries {
        if let (Some(h), EntryKind::File) = (e.hash, e.kind) {
            let bytes = std::fs::read(v1.join(e.path.as_str())).expect("read");
            client.put_blob("m", &h, bytes.into()).await.expect("put");
        }
    }
    let changes = scanned.entries.iter().cloned().map(Change::Put).collect();
    client
        .commit("m", &CommitRequest { parent_version: 0, message: None, author: None, changes })
        .await
        .expect("commit v1");
    assert!(gw.state.meta.packs().await.expect("packs").is_empty(), "version 1 is all loose");
    // version 2 by push: new small content in packs, old content stays where it is
    let v2 = tmp.path().join("v2");
    small_tree(&v2, 600, 1);
    std::fs::write(v2.join("d01/f1.js"), "changed\n").expect("write");
    push(&client, "m", &v2, PushOptions::default()).await.expect("push v2");
    assert!(!gw.state.meta.packs().await.expect("packs").is_empty());
    for (v, dir) in [(1, &v1), (2, &v2)] {
        let out = tmp.path().join(format!("out{v}"));
        pull(&client, "m", VersionRef::Number(v), &out, PullOptions::default()).await.expect("pull");
        assert_same_tree(dir, &out);
        let hydrated = tmp.path().join(format!("hydrated{v}"));
        let opts = podfs_testnet::hydrate_options(&tmp.path().join(format!("cache{v}")));
        podfs_syncd::hydrate(&client, "m", VersionRef::Number(v), &hydrated, opts).await.expect("hydrate");
        assert_same_tree(dir, &hydrated);
    }
    gw.stop().await.expect("stop");
    db.cleanup().await;
}

/// The blob store fails while a batch's packs are written: the push fails, no blob is recorded
/// and no version appears; the pack objects written meanwhile are orphans (in the store, not
/// in `packs`), which is how garbage collection finds them. Once the store is back the same
/// push succeeds; it builds the same packs (same content in the same order), so the orphan is
/// overwritten with the same bytes and recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_failure_mid_batch_records_nothing() {
    let (gw, faults) = TestGateway::faulty(None).await.expect("gateway");
    let policy = podfs_client::RetryPolicy {
        max_attempts: 2,
        base_delay: std::time::Duration::from_millis(1),
        max_delay: std::time::Duration::from_millis(1),
    };
    let client = Client::with_retry_policy(&gw.url, Some(ADMIN_TOKEN.into()), policy).expect("client");
    client.create_workspace("f").await.expect("create");
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    // ~24 MiB of incompressible small files: one batch, two packs
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut hashes = Vec::new();
    for i in 0..240 {
        let bytes: Vec<u8> = (0..100 << 10)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        hashes.push(ContentHash::of(&bytes));
        std::fs::write(src.join(format!("n{i}")), bytes).expect("write");
    }
    // every pack PUT of the first attempt and its retry fails but one
    faults.fail_puts(3);
    let err = push(&client, "f", &src, PushOptions::default()).await.expect_err("the store is failing");
    assert!(format!("{err:#}").contains("unavailable"), "{err:#}");
    assert_eq!(client.workspace("f").await.expect("ws").head, 0, "no version");
    assert_eq!(client.missing_blobs("f", &hashes).await.expect("missing").len(), hashes.len(), "no blob recorded");
    assert!(gw.state.meta.packs().await.expect("packs").is_empty(), "no pack recorded");
    let orphans = gw.state.blobs.backend().list("packs/").await.expect("list");
    assert!(!orphans.is_empty(), "the pack that was written is an orphan, found by listing packs/");
    faults.clear();
    push(&client, "f", &src, PushOptions::default()).await.expect("push once the store is back");
    let out = tmp.path().join("out");
    pull(&client, "f", VersionRef::Head, &out, PullOptions::default()).await.expect("pull");
    assert_same_tree(&src, &out);
    let recorded: HashSet<String> = gw
        .state
        .meta
        .packs()
        .await
        .expect("packs")
        .iter()
        .map(|p| podfs_gateway::store::blobs::pack_key(&p.0))
        .collect();
    let stored = gw.state.blobs.backend().list("packs/").await.expect("list");
    assert_eq!(stored.iter().cloned().collect::<HashSet<_>>(), recorded, "every pack in the store is recorded now");
    assert!(orphans.iter().all(|k| recorded.contains(k)), "the orphan was the same pack: {orphans:?}");
    gw.stop().await.expect("stop");
}
