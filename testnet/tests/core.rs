//! End-to-end scenarios of the core (issue 1/3): push / pull round trips, versions, dedup,
//! bad input and service failures, on the embedded default and on real PostgreSQL + Garage
//! (`scripts/dev-services up`; these tests fail, never skip, when the services are missing).

use std::time::Duration;

use podfs_client::Client;
use podfs_protocol::api::CommitRequest;
use podfs_protocol::{Change, ContentHash, Entry, EntryKind, VersionRef, WsPath};
use podfs_syncd::{PullOptions, PushOptions, pull, push};
use podfs_testnet::gateway::TestGateway;
use podfs_testnet::proxy::FaultProxy;
use podfs_testnet::services::{
    Services, database_url_with_addr, fresh_database, fresh_s3_prefix, store_url_with_endpoint,
};
use podfs_testnet::tree::{EdgeTree, assert_same_tree, make_edge_tree};

const FULL: EdgeTree = EdgeTree { big_file_bytes: 50 << 20, small_files: 5000 };
const SMALL: EdgeTree = EdgeTree { big_file_bytes: 3 << 20, small_files: 200 };

fn services() -> Services {
    Services::from_env().expect("PostgreSQL and S3 are required: run `eval \"$(scripts/dev-services up)\"` first")
}

async fn round_trip(gw: &TestGateway, spec: EdgeTree) {
    let client = gw.client();
    client.create_workspace("rt").await.expect("create workspace");
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    make_edge_tree(&src, spec).expect("make tree");
    let report = push(&client, "rt", &src, PushOptions::default()).await.expect("push");
    assert_eq!(report.version, 1);
    let out = tmp.path().join("out");
    let pulled = pull(&client, "rt", VersionRef::Number(1), &out, PullOptions::default()).await.expect("pull");
    assert_eq!(pulled.version, 1);
    assert_same_tree(&src, &out);
    // pushing the same tree again changes nothing
    let again = push(&client, "rt", &src, PushOptions::default()).await.expect("push again");
    assert!(again.up_to_date, "{again:?}");
    assert_eq!(again.uploaded_blobs, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn round_trip_embedded() {
    let gw = TestGateway::embedded().await.expect("embedded gateway");
    round_trip(&gw, FULL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn round_trip_postgres_garage() {
    let (gw, db, _) = TestGateway::on_fresh_services().await;
    round_trip(&gw, FULL).await;
    gw.stop().await.expect("stop");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn versions_diff_and_stale_parent() {
    let (gw, db, _) = TestGateway::on_fresh_services().await;
    let client = gw.client();
    client.create_workspace("v").await.expect("create");
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    make_edge_tree(&src, SMALL).expect("tree");
    let v1_copy = tmp.path().join("v1");
    push(&client, "v", &src, PushOptions::default()).await.expect("push 1");
    pull(&client, "v", VersionRef::Number(1), &v1_copy, PullOptions::default()).await.expect("pull 1");

    std::fs::write(src.join("README.md"), "changed\n").expect("change");
    std::fs::remove_file(src.join("empty.txt")).expect("delete");
    std::fs::write(src.join("new.txt"), "new\n").expect("add");
    std::fs::remove_dir(src.join("empty dir/nested empty")).expect("rmdir");
    let r2 = push(&client, "v", &src, PushOptions { message: Some("second".into()), ..Default::default() })
        .await
        .expect("push 2");
    assert_eq!((r2.version, r2.changes), (2, 4));

    // version 1 is still the original
    let again = tmp.path().join("v1-again");
    pull(&client, "v", VersionRef::Number(1), &again, PullOptions::default()).await.expect("pull 1 again");
    assert_same_tree(&v1_copy, &again);
    let v2 = tmp.path().join("v2");
    pull(&client, "v", VersionRef::Head, &v2, PullOptions::default()).await.expect("pull head");
    assert_same_tree(&src, &v2);

    // the diff lists exactly the changes, through the CLI too
    let diff = client.diff("v", VersionRef::Number(1), VersionRef::Number(2)).await.expect("diff");
    let got: Vec<String> = diff.changes.iter().map(|c| format!("{:?} {}", c.change, c.path)).collect();
    assert_eq!(got, ["Modified README.md", "Deleted empty dir/nested empty", "Deleted empty.txt", "Added new.txt"]);
    let (ok, out) = gw.cli(&["diff", "v", "1", "2"]).await;
    assert!(ok);
    assert_eq!(out.lines().count(), 4, "{out}");

    // a commit on a stale parent: 409, nothing changes
    let stale = CommitRequest {
        parent_version: 1,
        message: None,
        author: None,
        changes: vec![Change::Delete(WsPath::new("README.md").expect("path"))],
    };
    let err = client.commit("v", &stale).await.expect_err("stale parent must be refused");
    assert!(err.is_conflict(), "{err}");
    let ws = client.workspace("v").await.expect("workspace");
    assert_eq!(ws.head, 2);
    let v2b = tmp.path().join("v2b");
    pull(&client, "v", VersionRef::Head, &v2b, PullOptions::default()).await.expect("pull head again");
    assert_same_tree(&src, &v2b);
    gw.stop().await.expect("stop");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identical_content_is_stored_once_in_s3() {
    let (gw, db, store) = TestGateway::on_fresh_services().await;
    let client = gw.client();
    let tmp = tempfile::tempdir().expect("tempdir");
    let content = format!("shared content {}\n", rand::random::<u64>()).repeat(1000);
    for ws in ["one", "two"] {
        client.create_workspace(ws).await.expect("create");
        let dir = tmp.path().join(ws);
        std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
        std::fs::write(dir.join("a.txt"), &content).expect("write");
        std::fs::write(dir.join("sub/b.txt"), &content).expect("write");
        push(&client, ws, &dir, PushOptions::default()).await.expect("push");
    }
    let hash = ContentHash::of(content.as_bytes());
    let keys = podfs_testnet::s3::list_keys(&store).await.expect("list bucket");
    // small content lives in a pack: the bucket holds one pack (the second push sent nothing)
    // and no object of the content's own
    assert!(!keys.iter().any(|k| k.contains(&hash.to_string())), "no loose copy: {keys:?}");
    let packs: Vec<&String> = keys.iter().filter(|k| k.contains("packs/")).collect();
    assert_eq!(packs.len(), 1, "one pack, found {packs:?} among {} keys", keys.len());
    let pack = podfs_testnet::s3::get_object(&store, packs[0]).await.expect("get pack");
    assert_eq!(
        ContentHash::of(&pack).to_string(),
        packs[0].rsplit('/').next().unwrap_or_default(),
        "named by its hash"
    );
    let spans = podfs_protocol::pack::read_spans(&pack).expect("a well-formed pack");
    let hits: Vec<_> = spans.iter().filter(|s| s.hash == hash).collect();
    assert_eq!(hits.len(), 1, "content must be stored once: {spans:?}");
    // stored compressed, in the blob format, and it decodes to the content
    let stored = &pack[hits[0].offset as usize..(hits[0].offset + hits[0].len) as usize];
    assert!(stored.len() < content.len() / 4, "{} stored bytes for {} content bytes", stored.len(), content.len());
    let decoded = podfs_protocol::blob::decode(stored, &hash).expect("decodes");
    assert_eq!(decoded, content.as_bytes());
    gw.stop().await.expect("stop");
    db.cleanup().await;
}

/// Uploads 100 distinct contents and returns a commit request putting `files` files on `parent`.
async fn prepared_commit(client: &Client, ws: &str, parent: u64, files: usize) -> CommitRequest {
    let mut changes = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for i in 0..files {
        let content = format!("file {} of a big commit\n", i % 100);
        let hash = ContentHash::of(content.as_bytes());
        if seen.insert(hash) {
            client.put_blob(ws, &hash, content.clone().into()).await.expect("upload");
        }
        changes.push(Change::Put(Entry {
            path: WsPath::new(format!("f{i:06}.txt")).expect("path"),
            kind: EntryKind::File,
            hash: Some(hash),
            size: content.len() as u64,
            mode: 0o644,
        }));
    }
    CommitRequest { parent_version: parent, message: Some("big".into()), author: None, changes }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_outage_during_commit_leaves_no_partial_version() {
    let s = services();
    let db = fresh_database(&s.pg_admin_url).await.expect("fresh database");
    let pg_addr = tokio::net::lookup_host(pg_host_port(&db.url)).await.expect("resolve").next().expect("pg addr");
    let proxy = FaultProxy::start(pg_addr).await.expect("proxy");
    let proxied_url = database_url_with_addr(&db.url, proxy.addr()).expect("proxied database URL");
    let gw = TestGateway::with_services(&proxied_url, &fresh_s3_prefix(&s.s3.store_url)).await.expect("gateway");
    let client = gw.client();
    client.create_workspace("pg").await.expect("create");
    let req = prepared_commit(&client, "pg", 0, 20_000).await;

    // the database goes away before the commit: a clear error, nothing committed
    proxy.set_down(true);
    let err = client.commit("pg", &req).await.expect_err("commit without the database must fail");
    assert_eq!(err.status().map(|s| s.as_u16()), Some(503), "{err}");
    proxy.set_down(false);
    assert_eq!(client.workspace("pg").await.expect("workspace").head, 0);

    // the database goes away in the middle of a 20,000-file commit: all or nothing
    let commit = {
        let client = client.clone();
        let req = req.clone();
        tokio::spawn(async move { client.commit("pg", &req).await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    proxy.set_down(true);
    let outcome = commit.await.expect("join");
    proxy.set_down(false);
    let ws = client.workspace("pg").await.expect("workspace after outage");
    match outcome {
        Ok(v) => assert_eq!((ws.head, v.file_count), (1, 20_000), "a commit that succeeded is whole"),
        Err(_) => assert_eq!(ws.head, 0, "a commit that failed left no version"),
    }
    if ws.head == 1 {
        assert_eq!(client.manifest("pg", VersionRef::Head).await.expect("manifest").entries.len(), 20_000);
    } else {
        // a retry succeeds once the database is back
        let v = client.commit("pg", &req).await.expect("retry after the outage");
        assert_eq!((v.version, v.file_count), (1, 20_000));
    }
    gw.stop().await.expect("stop");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_outage_during_push_leaves_no_partial_version() {
    let s = services();
    let db = fresh_database(&s.pg_admin_url).await.expect("fresh database");
    let endpoint = s.s3.endpoint.clone().expect("the S3 endpoint of the dev services");
    let host_port = endpoint.split_once("://").map_or(endpoint.as_str(), |x| x.1).trim_end_matches('/').to_string();
    let s3_addr = tokio::net::lookup_host(host_port).await.expect("resolve").next().expect("s3 addr");
    let proxy = FaultProxy::start(s3_addr).await.expect("proxy");
    let store =
        store_url_with_endpoint(&fresh_s3_prefix(&s.s3.store_url), &proxy.http_url()).expect("proxied store URL");
    let gw = TestGateway::with_services(&db.url, &store).await.expect("gateway");
    let client = gw.client();
    client.create_workspace("s3").await.expect("create");
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    make_edge_tree(&src, SMALL).expect("tree");

    proxy.set_down(true);
    let err = push(&client, "s3", &src, PushOptions::default()).await.expect_err("push without S3 must fail");
    assert!(!format!("{err:#}").is_empty());
    assert_eq!(client.workspace("s3").await.expect("workspace").head, 0, "no version without its content");
    assert_eq!(client.versions("s3", None, None).await.expect("versions").versions.len(), 0);

    proxy.set_down(false);
    let report = push(&client, "s3", &src, PushOptions::default()).await.expect("push once S3 is back");
    assert_eq!(report.version, 1);
    let out = tmp.path().join("out");
    pull(&client, "s3", VersionRef::Head, &out, PullOptions::default()).await.expect("pull");
    assert_same_tree(&src, &out);
    gw.stop().await.expect("stop");
    db.cleanup().await;
}

/// `host:port` of a postgres:// URL.
fn pg_host_port(url: &str) -> String {
    let rest = url.split_once("://").map(|x| x.1).unwrap_or(url);
    let rest = rest.rsplit_once('@').map(|x| x.1).unwrap_or(rest);
    let host = rest.split('/').next().unwrap_or(rest);
    if host.contains(':') { host.to_string() } else { format!("{host}:5432") }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tampered_blob_in_s3_is_never_served() {
    let (gw, db, store) = TestGateway::on_fresh_services().await;
    let client = gw.client();
    client.create_workspace("t").await.expect("create");
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    let content = format!("precious {}\n", rand::random::<u64>());
    std::fs::write(src.join("a.txt"), &content).expect("write");
    push(&client, "t", &src, PushOptions::default()).await.expect("push");
    let keys = podfs_testnet::s3::list_keys(&store).await.expect("list");
    let key = keys.iter().find(|k| k.contains("packs/")).expect("the pack holding it");
    // someone replaces the pack with a well-formed pack holding other content of the same
    // length at the same place
    let forged_content = "x".repeat(content.len());
    let mut forged = podfs_protocol::pack::PackWriter::new();
    let stored = podfs_protocol::blob::encode(forged_content.as_bytes());
    forged.push(ContentHash::of(forged_content.as_bytes()), &stored);
    podfs_testnet::s3::put_object(&store, key, forged.finish().bytes).await.expect("overwrite");

    let err = client.get_file("t", VersionRef::Head, &WsPath::new("a.txt").expect("path")).await.err();
    let err = err.expect("a tampered blob must not be served");
    assert_eq!(err.code(), Some(podfs_protocol::api::ErrorCode::Corrupt), "{err}");
    let out = tmp.path().join("out");
    let pulled = pull(&client, "t", VersionRef::Head, &out, PullOptions::default()).await;
    assert!(pulled.is_err(), "pull must refuse the tampered blob");
    assert!(!out.join("a.txt").exists(), "nothing unverified reaches the final path");
    gw.stop().await.expect("stop");
    db.cleanup().await;
}
