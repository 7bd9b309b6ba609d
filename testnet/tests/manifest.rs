//! End-to-end scenarios of manifest.sqlite and Phase 2 pulls (issue 2/3): round trips through
//! the manifest on the embedded default and on PostgreSQL + Garage, reuse of the content cache
//! across workspaces, in-place version switches, and refusal of hostile or damaged manifests
//! (served by a fake gateway that states the right hash for a hostile file).

use std::path::Path;
use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use podfs_client::Client;
use podfs_protocol::{ContentHash, VersionRef};
use podfs_syncd::{HydrateMode, HydrateOptions, HydrateReport, PushOptions, hydrate, push};
use podfs_testnet::gateway::{ADMIN_TOKEN, TestGateway};
use podfs_testnet::tree::{EdgeTree, assert_same_tree, make_edge_tree};

const FULL: EdgeTree = EdgeTree { big_file_bytes: 50 << 20, small_files: 5000 };
const SMALL: EdgeTree = EdgeTree { big_file_bytes: 3 << 20, small_files: 200 };

fn opts(cache: &Path) -> HydrateOptions {
    podfs_testnet::hydrate_options(cache)
}

async fn pull(client: &Client, ws: &str, v: u64, dir: &Path, cache: &Path) -> HydrateReport {
    hydrate(client, ws, VersionRef::Number(v), dir, opts(cache)).await.expect("manifest pull")
}

/// Cold pull through the manifest, then a warm pull of another workspace holding the same
/// tree: everything from the cache, nothing downloaded.
async fn round_trip_and_reuse(gw: &TestGateway, spec: EdgeTree) {
    let client = gw.client();
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    make_edge_tree(&src, spec).expect("tree");
    for ws in ["a", "b"] {
        client.create_workspace(ws).await.expect("create");
        push(&client, ws, &src, PushOptions::default()).await.expect("push");
    }
    let cache = tmp.path().join("cache");
    let cold = pull(&client, "a", 1, &tmp.path().join("cold"), &cache).await;
    assert_same_tree(&src, &tmp.path().join("cold"));
    assert_eq!(cold.mode, HydrateMode::Fresh);
    assert!(cold.sources.manifest.files > spec.small_files as u64, "{cold:?}");
    assert!(cold.sources.manifest.transfer_bytes > 0);
    assert!(cold.sources.s3.files >= 1, "the big file comes from the blob store: {cold:?}");
    // bytes on the wire are the stored form (16-byte header, maybe compressed), not the content
    let s3 = &cold.sources.s3;
    assert!(s3.transfer_bytes > 0 && s3.transfer_bytes <= podfs_client::max_stored_len(s3.bytes), "{s3:?}");
    assert_ne!(s3.transfer_bytes, s3.bytes, "stored bytes are counted, not decoded ones: {s3:?}");
    assert_eq!(cold.sources.cache.files, 0);

    let warm = pull(&client, "b", 1, &tmp.path().join("warm"), &cache).await;
    assert_same_tree(&src, &tmp.path().join("warm"));
    assert_eq!(warm.sources.manifest.transfer_bytes, 0, "no manifest download: {warm:?}");
    assert_eq!(warm.sources.s3.files, 0, "nothing from the blob store: {warm:?}");
    assert_eq!(warm.sources.cache.files, warm.files + warm.symlinks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn manifest_round_trip_embedded() {
    let gw = TestGateway::embedded().await.expect("embedded gateway");
    round_trip_and_reuse(&gw, FULL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn manifest_round_trip_postgres_garage() {
    let (gw, db, _) = TestGateway::on_fresh_services().await;
    round_trip_and_reuse(&gw, FULL).await;
    gw.stop().await.expect("stop");
    db.cleanup().await;
}

/// The served manifest is SQLite in one zstd frame, with a stated hash, an ETag and 304.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn manifest_is_served_with_hash_and_etag() {
    let (gw, db, _) = TestGateway::on_fresh_services().await;
    let client = gw.client();
    let tmp = tempfile::tempdir().expect("tempdir");
    make_edge_tree(&tmp.path().join("src"), SMALL).expect("tree");
    client.create_workspace("m").await.expect("create");
    push(&client, "m", &tmp.path().join("src"), PushOptions::default()).await.expect("push");
    let http = reqwest::Client::new();
    let url = format!("{}/v1/workspaces/m/versions/1/manifest.sqlite", gw.url);
    let resp = http.get(&url).bearer_auth(ADMIN_TOKEN).send().await.expect("get");
    assert_eq!(resp.status(), 200);
    let stated: ContentHash =
        resp.headers()["x-podfs-manifest-hash"].to_str().expect("ascii").parse().expect("hash header");
    let etag = resp.headers()["etag"].clone();
    assert_eq!(etag.to_str().expect("ascii"), format!("\"{stated}\""));
    let frame = resp.bytes().await.expect("body");
    let sqlite = zstd_decode(&frame);
    assert!(sqlite.starts_with(b"SQLite format 3\0"));
    assert_eq!(ContentHash::of(&sqlite), stated);
    let again = http.get(&url).bearer_auth(ADMIN_TOKEN).header("if-none-match", etag).send().await.expect("get");
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
    let bad = http.get(format!("{url}?since=9")).bearer_auth(ADMIN_TOKEN).send().await.expect("get");
    assert_eq!(bad.status(), 400, "a base newer than the version is refused");
    let missing = http.get(format!("{}/v1/workspaces/m/versions/7/manifest.sqlite", gw.url));
    assert_eq!(missing.bearer_auth(ADMIN_TOKEN).send().await.expect("get").status(), 404);
    gw.stop().await.expect("stop");
    db.cleanup().await;
}

fn zstd_decode(frame: &[u8]) -> Vec<u8> {
    zstd::decode_all(frame).expect("one zstd frame")
}

/// v1 -> v2 -> v1 in place: exactly the target tree each time, only differing paths touched,
/// local edits refused unless forced.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn switching_versions_in_place() {
    let (gw, db, _) = TestGateway::on_fresh_services().await;
    let client = gw.client();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (src, v1) = (tmp.path().join("src"), tmp.path().join("v1"));
    make_edge_tree(&src, SMALL).expect("tree");
    client.create_workspace("s").await.expect("create");
    push(&client, "s", &src, PushOptions::default()).await.expect("push 1");
    copy_tree(&src, &v1);
    // v2: edit, delete, add, a file becomes a directory, a directory goes away, chmod
    std::fs::write(src.join("README.md"), "changed\n").expect("edit");
    std::fs::remove_file(src.join("empty.txt")).expect("delete");
    std::fs::write(src.join("added.txt"), vec![b'x'; 300 << 10]).expect("add large");
    std::fs::write(src.join("small-added.txt"), "tiny\n").expect("add small");
    std::fs::remove_dir_all(src.join("empty dir")).expect("rmdir");
    std::fs::remove_file(src.join("run.sh")).expect("rm");
    std::fs::create_dir(src.join("run.sh")).expect("file -> dir");
    std::fs::write(src.join("run.sh/inside"), "in\n").expect("inside");
    std::fs::set_permissions(src.join("private.key"), std::os::unix::fs::PermissionsExt::from_mode(0o640))
        .expect("chmod");
    std::fs::remove_file(src.join("link-rel")).expect("rm link");
    std::os::unix::fs::symlink("src", src.join("link-rel")).expect("relink");
    push(&client, "s", &src, PushOptions::default()).await.expect("push 2");

    let (dir, cache) = (tmp.path().join("dir"), tmp.path().join("cache"));
    pull(&client, "s", 1, &dir, &cache).await;
    assert_same_tree(&v1, &dir);
    let untouched = dir.join("src/deep/er/still/pkg7/m7.js");
    let inode = inode_of(&untouched);
    let up = pull(&client, "s", 2, &dir, &cache).await;
    assert_eq!(up.mode, HydrateMode::Switch);
    assert_same_tree(&src, &dir);
    assert_eq!(inode_of(&untouched), inode, "paths that do not differ are not rewritten");
    assert!(up.files + up.symlinks <= 7, "only the differing paths are written: {up:?}");
    let down = pull(&client, "s", 1, &dir, &cache).await;
    assert_eq!(down.from_version, Some(2));
    assert_same_tree(&v1, &dir);
    assert_eq!(pull(&client, "s", 1, &dir, &cache).await.mode, HydrateMode::Unchanged);

    // a local edit of a path that differs is refused, and kept
    std::fs::write(dir.join("README.md"), "my local edit\n").expect("local edit");
    let err = hydrate(&client, "s", VersionRef::Number(2), &dir, opts(&cache)).await.expect_err("conflict");
    assert!(format!("{err:#}").contains("README.md"), "{err:#}");
    assert_eq!(std::fs::read(dir.join("README.md")).expect("read"), b"my local edit\n");
    let mut forced = opts(&cache);
    forced.force = true;
    hydrate(&client, "s", VersionRef::Number(2), &dir, forced).await.expect("forced switch");
    assert_same_tree(&src, &dir);
    gw.stop().await.expect("stop");
    db.cleanup().await;
}

fn inode_of(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p).expect("stat").ino()
}

fn copy_tree(from: &Path, to: &Path) {
    let status = std::process::Command::new("cp").arg("-a").arg(from).arg(to).status().expect("cp");
    assert!(status.success());
}

/// A pull with a tiny cache limit still writes the tree; the cache is trimmed to its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cache_is_trimmed_to_its_limit() {
    let gw = TestGateway::embedded().await.expect("embedded gateway");
    let client = gw.client();
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    make_edge_tree(&src, SMALL).expect("tree");
    client.create_workspace("c").await.expect("create");
    push(&client, "c", &src, PushOptions::default()).await.expect("push");
    let cache = tmp.path().join("cache");
    let mut o = opts(&cache);
    o.cache_limit = 1 << 20;
    hydrate(&client, "c", VersionRef::Number(1), &tmp.path().join("out"), o).await.expect("pull");
    assert_same_tree(&src, &tmp.path().join("out"));
    let c = podfs_syncd::cache::ContentCache::open(&cache, 1 << 20).expect("cache");
    assert!(c.usage().expect("usage").bytes <= 1 << 20, "{:?}", c.usage());
}

// ---- hostile and damaged manifests, from a fake gateway ----

/// Serves one crafted manifest for `ws@1`, stating `hash`/`size` (of the real file unless
/// the test lies), and at most `send` bytes of the frame.
async fn fake_gateway(frame: Vec<u8>, hash: ContentHash, size: u64, send: usize) -> String {
    let frame = Arc::new(frame);
    let app = Router::new().route(
        "/v1/workspaces/{ws}/versions/{v}/manifest.sqlite",
        get(move || {
            let frame = Arc::clone(&frame);
            async move {
                let mut h = HeaderMap::new();
                h.insert("x-podfs-manifest-hash", HeaderValue::from_str(&hash.to_hex()).expect("hex"));
                h.insert("x-podfs-manifest-size", HeaderValue::from(size));
                h.insert("x-podfs-version", HeaderValue::from_static("1"));
                (h, frame[..send.min(frame.len())].to_vec()).into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// A manifest file for `ws@1` built by `sql` on top of the real schema (or a schema without
/// the primary key, for duplicates), and its transfer frame.
fn crafted(dir: &Path, sql: &str, with_pk: bool) -> (Vec<u8>, ContentHash, u64) {
    let path = dir.join(format!("m-{}.sqlite", rand::random::<u32>()));
    let header = podfs_manifest::Header {
        workspace: "ws".into(),
        version: 1,
        kind: podfs_manifest::Kind::Full,
        small_file_limit: 1024,
    };
    podfs_manifest::Writer::create(&path, &header).expect("create").finish().expect("finish");
    let conn = rusqlite::Connection::open(&path).expect("open");
    if !with_pk {
        conn.execute_batch(
            "DROP TABLE entries; CREATE TABLE entries (path TEXT, kind TEXT, mode INTEGER, size INTEGER, hash BLOB);",
        )
        .expect("schema");
    }
    conn.execute_batch(sql).expect("rows");
    drop(conn);
    let mut frame = Vec::new();
    let c = podfs_manifest::transfer::compress(&path, &mut frame).expect("compress");
    (frame, c.hash, c.size)
}

/// Pulls from `url` and checks the pull failed with `needle` in the message, leaving nothing
/// in DIR (but its `.podfs`) and nothing next to it.
async fn refused(url: &str, needle: &str) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let client = Client::with_retry_policy(
        url,
        Some("t".into()),
        podfs_client::RetryPolicy { max_attempts: 2, ..Default::default() },
    )
    .expect("client");
    let dir = tmp.path().join("dir");
    let err = hydrate(&client, "ws", VersionRef::Number(1), &dir, opts(&tmp.path().join("cache")))
        .await
        .expect_err("hostile manifest must be refused");
    let msg = format!("{err:#}");
    assert!(msg.contains(needle), "expected {needle:?} in: {msg}");
    let mut top: Vec<String> = std::fs::read_dir(tmp.path())
        .expect("ls")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
        .collect();
    top.sort();
    assert_eq!(top, ["cache", "dir"], "nothing written next to DIR");
    let inside: Vec<_> = std::fs::read_dir(&dir).expect("ls dir").map(|e| e.expect("entry").file_name()).collect();
    assert!(inside.iter().all(|n| n == ".podfs"), "nothing written into DIR: {inside:?}");
}

const ROW: &str = "INSERT INTO entries VALUES";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_manifests_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    let h = ContentHash::of(b"x");
    let hx = h.to_hex();
    for (sql, pk, needle) in [
        (
            format!(
                "{ROW} ('../escape', 'file', 420, 1, x'{hx}'); INSERT INTO blobs (hash, data) VALUES (x'{hx}', x'78');"
            ),
            true,
            "escape",
        ),
        (format!("{ROW} ('/etc/passwd', 'file', 420, 1, x'{hx}');"), true, "passwd"),
        (format!("{ROW} ('a', 'file', 420, 1, x'{hx}'); {ROW} ('a', 'file', 420, 1, x'{hx}');"), false, "twice"),
        (
            format!("{ROW} ('l', 'symlink', 511, 1, x'{hx}'); {ROW} ('l/f', 'file', 420, 1, x'{hx}');"),
            true,
            "not a directory",
        ),
        // a BLOB whose bytes are not its name
        (
            format!("{ROW} ('f', 'file', 420, 1, x'{hx}'); INSERT INTO blobs (hash, data) VALUES (x'{hx}', x'79');"),
            true,
            "does not hash",
        ),
    ] {
        let (frame, hash, size) = crafted(d, &sql, pk);
        let url = fake_gateway(frame, hash, size, usize::MAX).await;
        refused(&url, needle).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_and_truncated_manifests_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let hx = ContentHash::of(b"x").to_hex();
    let sql = format!("{ROW} ('f', 'file', 420, 1, x'{hx}'); INSERT INTO blobs (hash, data) VALUES (x'{hx}', x'78');");
    let (frame, hash, size) = crafted(tmp.path(), &sql, true);
    // the stated hash is not the file's (a tampered manifest)
    let url = fake_gateway(frame.clone(), ContentHash::of(b"other"), size, usize::MAX).await;
    refused(&url, "refused").await;
    // the transfer stops half way
    let url = fake_gateway(frame.clone(), hash, size, frame.len() / 2).await;
    refused(&url, "manifest").await;
    // and the genuine file pulls fine
    let url = fake_gateway(frame, hash, size, usize::MAX).await;
    let client = Client::new(&url, Some("t".into())).expect("client");
    let out = tmp.path().join("ok");
    hydrate(&client, "ws", VersionRef::Number(1), &out, opts(&tmp.path().join("cache"))).await.expect("pull");
    assert_eq!(std::fs::read(out.join("f")).expect("read"), b"x");
}
