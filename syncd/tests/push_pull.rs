//! push and pull against the real gateway served in-process (`podfs_testnet::gateway`: the real
//! router on SQLite and a blob directory, or on Garage for presigned URLs), its blob store
//! wrapped in a fault injector: round trips, dedup, faults, and the write-confinement guarantees
//! of pull. The presigned-URL test needs S3 (`scripts/dev-services up`) and fails, never skips,
//! without it.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use podfs_client::Client;
use podfs_protocol::api::CommitRequest;
use podfs_protocol::{Change, ContentHash, Entry, EntryKind, VersionRef, WsPath};
use podfs_syncd::scan::scan;
use podfs_syncd::{PullOptions, PushError, PushOptions, pull, push};
use podfs_testnet::gateway::{ADMIN_TOKEN, Faults, TestGateway};

/// A gateway on SQLite and a blob directory, its store wrapped in faults (all off), with the
/// workspace `demo` created (no version yet).
async fn gateway() -> (TestGateway, Faults, Client) {
    let (gw, faults) = TestGateway::faulty(None).await.unwrap();
    let c = gw.client();
    c.create_workspace("demo").await.unwrap();
    (gw, faults, c)
}

/// A client that gives up after two attempts, 1 ms apart (faults that stay make it fail fast).
fn impatient(gw: &TestGateway) -> Client {
    let policy = podfs_client::RetryPolicy {
        max_attempts: 2,
        base_delay: std::time::Duration::from_millis(1),
        max_delay: std::time::Duration::from_millis(1),
    };
    Client::with_retry_policy(&gw.url, Some(ADMIN_TOKEN.into()), policy).unwrap()
}

/// A tree with everything push must keep: empty dirs, modes, symlinks (relative, absolute,
/// dangling), hidden files, duplicate content, a read-only dir, a large compressible file and a
/// large incompressible one (both streamed).
fn make_tree(r: &Path) {
    fs::create_dir_all(r.join("src/empty")).unwrap();
    fs::create_dir_all(r.join("ro")).unwrap();
    fs::write(r.join("src/main.rs"), b"fn main() { println!(\"hi\"); }\n").unwrap();
    fs::write(r.join("src/copy.rs"), b"fn main() { println!(\"hi\"); }\n").unwrap();
    fs::write(r.join(".hidden"), b"secret").unwrap();
    fs::write(r.join("empty.txt"), b"").unwrap();
    fs::write(r.join("run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(r.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(r.join("ro/readonly.txt"), b"read me").unwrap();
    fs::set_permissions(r.join("ro/readonly.txt"), fs::Permissions::from_mode(0o444)).unwrap();
    symlink("src/main.rs", r.join("link")).unwrap();
    symlink("/etc/hostname", r.join("abs-link")).unwrap();
    symlink("../nowhere", r.join("src/dangling")).unwrap();
    let big: Vec<u8> = b"podfs streams big files ".iter().copied().cycle().take(3 << 20).collect();
    fs::write(r.join("big.txt"), &big).unwrap();
    fs::write(r.join("big-copy.txt"), &big).unwrap();
    fs::write(r.join("noise.bin"), noise((2 << 20) + 3)).unwrap();
    fs::set_permissions(r.join("ro"), fs::Permissions::from_mode(0o555)).unwrap();
}

/// Incompressible bytes (stored raw).
fn noise(len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect()
}

fn entries(dir: &Path) -> Vec<Entry> {
    scan(dir).unwrap().entries
}

fn make_writable(dir: &Path) {
    for e in entries(dir) {
        if e.kind == EntryKind::Dir {
            fs::set_permissions(dir.join(e.path.as_str()), fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
}

/// No temporary file of pull is left in `dir`.
fn no_leftovers(dir: &Path) {
    let names: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(names.iter().all(|n| !n.to_string_lossy().starts_with(".podfs-tmp")), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_then_pull_round_trips_every_kind_of_entry() {
    let (_gw, faults, c) = gateway().await;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    make_tree(&src);

    let r = push(&c, "demo", &src, PushOptions { message: Some("first".into()), ..Default::default() }).await.unwrap();
    assert_eq!((r.version, r.parent, r.up_to_date), (1, 0, false));
    assert_eq!(r.changes as usize, entries(&src).len());
    // main.rs/copy.rs and big/big-copy are deduplicated; link text "src/main.rs" is its own blob
    assert_eq!(r.uploaded_blobs, 10);
    // the 8 small contents travel in one batch and are stored as one pack; big.txt and
    // noise.bin are objects of their own
    assert_eq!(faults.calls().puts, 3, "the store got each distinct content once, the small ones in one pack");

    let again = push(&c, "demo", &src, PushOptions::default()).await.unwrap();
    assert!(again.up_to_date);
    assert_eq!((again.version, again.changes, again.uploaded_blobs), (1, 0, 0));
    assert_eq!(faults.calls().puts, 3);

    let dst = tmp.path().join("dst");
    let p = pull(&c, "demo", VersionRef::Head, &dst, PullOptions::default()).await.unwrap();
    assert_eq!(p.version, 1);
    assert_eq!(p.downloaded_blobs, 10);
    assert_eq!(faults.calls().gets, 10, "each distinct content read from the store once");
    assert_eq!(entries(&dst), entries(&src));
    assert_eq!(fs::read_link(dst.join("abs-link")).unwrap(), Path::new("/etc/hostname"));
    assert_eq!(fs::read(dst.join("big-copy.txt")).unwrap(), fs::read(src.join("big.txt")).unwrap());
    assert_eq!(fs::metadata(dst.join("ro")).unwrap().permissions().mode() & 0o777, 0o555);

    // second version: modify, delete, mode change, file -> dir, dir -> file, symlink retarget
    make_writable(&src);
    fs::write(src.join("src/main.rs"), b"changed").unwrap();
    fs::remove_file(src.join("src/copy.rs")).unwrap();
    fs::set_permissions(src.join("run.sh"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::remove_file(src.join("empty.txt")).unwrap();
    fs::create_dir(src.join("empty.txt")).unwrap();
    fs::remove_dir(src.join("src/empty")).unwrap();
    fs::write(src.join("src/empty"), b"now a file").unwrap();
    fs::remove_file(src.join("link")).unwrap();
    symlink("run.sh", src.join("link")).unwrap();
    let r2 = push(&c, "demo", &src, PushOptions::default()).await.unwrap();
    assert_eq!((r2.version, r2.parent), (2, 1));
    assert_eq!(r2.changes, 7);
    assert_eq!(r2.uploaded_blobs, 3, "changed, now a file, run.sh link text");

    let dst2 = tmp.path().join("dst2");
    pull(&c, "demo", VersionRef::Number(2), &dst2, PullOptions::default()).await.unwrap();
    assert_eq!(entries(&dst2), entries(&src));
    // version 1 is still there
    let dst1 = tmp.path().join("dst1");
    pull(&c, "demo", VersionRef::Number(1), &dst1, PullOptions { concurrency: 1, progress: false }).await.unwrap();
    assert_eq!(entries(&dst1), entries(&dst));
    for d in [&src, &dst, &dst1, &dst2] {
        make_writable(d);
    }
}

#[tokio::test]
async fn pulling_into_a_non_empty_dir_is_refused() {
    let (_gw, _, c) = gateway().await;
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("f"), b"x").unwrap();
    push(&c, "demo", tmp.path(), PushOptions::default()).await.unwrap();
    let err = pull(&c, "demo", VersionRef::Head, tmp.path(), PullOptions::default()).await.unwrap_err();
    assert!(format!("{err:#}").contains("not empty"), "{err:#}");
}

#[tokio::test]
async fn missing_workspace_and_version_are_named() {
    let (_gw, _, c) = gateway().await;
    let tmp = tempfile::tempdir().unwrap();
    let err = pull(&c, "demo", VersionRef::Head, &tmp.path().join("x"), PullOptions::default()).await.unwrap_err();
    assert_eq!(err.to_string(), "workspace demo has no version yet");
    let err = pull(&c, "other", VersionRef::Head, &tmp.path().join("x"), PullOptions::default()).await.unwrap_err();
    assert_eq!(err.to_string(), "workspace other not found");
    fs::write(tmp.path().join("f"), b"x").unwrap();
    push(&c, "demo", tmp.path(), PushOptions::default()).await.unwrap();
    let err = pull(&c, "demo", VersionRef::Number(7), &tmp.path().join("x"), PullOptions::default()).await.unwrap_err();
    assert_eq!(err.to_string(), "version 7 of workspace demo not found");
    let err = push(&c, "other", tmp.path(), PushOptions::default()).await.unwrap_err();
    assert!(matches!(err.downcast_ref::<PushError>(), Some(PushError::WorkspaceNotFound(_))));
    assert!(!tmp.path().join("x").exists());
}

fn entry(p: &str, kind: EntryKind, content: &[u8]) -> Entry {
    let (hash, size, mode) = match kind {
        EntryKind::Dir => (None, 0, 0o755),
        _ => (Some(ContentHash::of(content)), content.len() as u64, 0o644),
    };
    Entry { path: WsPath::new(p).unwrap(), kind, hash, size, mode }
}

/// Writes `rows` into version 1 of `ws` straight into the gateway's SQLite database, as a
/// tampered database (or a broken gateway) would serve them: the real gateway refuses to commit
/// such trees, so only its database can hold them. `from_version` 0 lets a path appear twice.
fn tamper(gw: &TestGateway, ws: &str, rows: &[(Entry, i64)]) {
    let path = gw.config.database_url.strip_prefix("sqlite://").unwrap();
    let db = rusqlite::Connection::open(path).unwrap();
    db.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
    let id: i64 = db.query_row("SELECT id FROM workspaces WHERE name = ?1", [ws], |r| r.get(0)).unwrap();
    for (e, from) in rows {
        let kind = match e.kind {
            EntryKind::File => "file",
            EntryKind::Symlink => "symlink",
            EntryKind::Dir => "dir",
        };
        db.execute(
            "INSERT INTO entries (workspace_id, path, from_version, until_version, parent, kind, hash, size, mode) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            rusqlite::params![
                id,
                e.path.as_str(),
                from,
                i64::MAX,
                e.path.parent_str(),
                kind,
                e.hash.map(|h| h.as_bytes().to_vec()),
                e.size as i64,
                i64::from(e.mode),
            ],
        )
        .unwrap();
    }
}

/// `a -> /tmp/x` then `a/f`: refused before anything is written (DIR is not even created) and
/// before any content is read; a duplicate path and a missing parent are refused the same way.
#[tokio::test]
async fn hostile_manifests_are_refused_before_any_write() {
    let (gw, faults, c) = gateway().await;
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().to_str().unwrap().as_bytes().to_vec();
    // (workspace, rows added to version 1, what the refusal names)
    type Case<'a> = (&'a str, Vec<(Entry, i64)>, &'a str);
    let hostile: Vec<Case> = vec![
        (
            "through-a-symlink",
            vec![(entry("a", EntryKind::Symlink, &target), 1), (entry("a/f", EntryKind::File, b"pwned"), 1)],
            "symlink, not a directory",
        ),
        (
            "duplicate",
            vec![(entry("f", EntryKind::File, b"pwned"), 0), (entry("f", EntryKind::File, b"pwned"), 1)],
            "lists \"f\" twice",
        ),
        ("orphan", vec![(entry("d/f", EntryKind::File, b"pwned"), 1)], "no directory entry for its parent \"d\""),
    ];
    // An unsorted manifest cannot be served through the real gateway: it streams the tree
    // `ORDER BY path` whatever its database holds (syncd's manifest checks still refuse one).
    let tmp = tempfile::tempdir().unwrap();
    let seed = tmp.path().join("seed");
    fs::create_dir(&seed).unwrap();
    fs::write(seed.join("seed.txt"), b"seed").unwrap();
    for (ws, rows, named) in hostile {
        c.create_workspace(ws).await.unwrap();
        push(&c, ws, &seed, PushOptions::default()).await.unwrap();
        // the content is stored, so only pull's checks stand between it and the disk
        for content in [&target[..], b"pwned"] {
            c.put_blob(ws, &ContentHash::of(content), bytes::Bytes::copy_from_slice(content)).await.unwrap();
        }
        tamper(&gw, ws, &rows);
        let served = c.manifest(ws, VersionRef::Number(1)).await.unwrap().entries;
        assert_eq!(served.len(), rows.len() + 1, "{ws}: the gateway serves the tampered tree: {served:?}");

        let gets = faults.calls().gets;
        let dst = tmp.path().join(format!("dst-{ws}"));
        let err = pull(&c, ws, VersionRef::Head, &dst, PullOptions::default()).await.unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("refusing the manifest") && msg.contains(named), "{ws}: {msg}");
        assert!(!dst.exists(), "{ws}: nothing written");
        assert_eq!(faults.calls().gets, gets, "{ws}: refused before any download");
    }
    assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
}

/// A stored blob that reads back corrupt (a flipped byte, small and streamed) is never written
/// to its path, and pull fails naming the path.
#[tokio::test]
async fn corrupt_blobs_never_reach_their_final_path() {
    let (gw, faults, _) = gateway().await;
    let c = impatient(&gw);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("small"), b"small content").unwrap();
    let big = noise(3 << 20);
    fs::write(src.join("big"), &big).unwrap();
    push(&c, "demo", &src, PushOptions::default()).await.unwrap();
    for (name, content) in [("small", &b"small content"[..]), ("big", &big[..])] {
        faults.clear();
        faults.corrupt(&gw.stored_key(&ContentHash::of(content)).await.unwrap());
        let dst = tmp.path().join(format!("dst-{name}"));
        let err = pull(&c, "demo", VersionRef::Head, &dst, PullOptions::default()).await.unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(&format!("cannot download {name}")), "{msg}");
        // the gateway verifies what it serves: a small blob before sending it (a `corrupt`
        // answer), a large one as it streams (the transfer breaks off before its end)
        if name == "small" {
            assert!(msg.contains("failed verification") && msg.contains("corrupt"), "{msg}");
        }
        assert!(!dst.join(name).exists(), "{name} must not be written");
        no_leftovers(&dst);
    }
    // the stored bytes were never touched: without the fault the same pull succeeds
    faults.clear();
    let dst = tmp.path().join("dst-clean");
    pull(&c, "demo", VersionRef::Head, &dst, PullOptions::default()).await.unwrap();
    assert_eq!(fs::read(dst.join("big")).unwrap(), big);
}

/// A blob the store has lost (recorded, but NotFound) fails the pull naming the path; nothing is
/// written for it.
#[tokio::test]
async fn a_lost_blob_fails_the_pull_naming_its_path() {
    let (gw, faults, _) = gateway().await;
    let c = impatient(&gw);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("kept"), b"kept").unwrap();
    push(&c, "demo", &src, PushOptions::default()).await.unwrap();
    // a second push: its pack holds only the content to lose
    fs::write(src.join("lost"), b"lost content").unwrap();
    push(&c, "demo", &src, PushOptions::default()).await.unwrap();
    faults.hide(&gw.stored_key(&ContentHash::of(b"lost content")).await.unwrap());
    let dst = tmp.path().join("dst");
    let err = pull(&c, "demo", VersionRef::Head, &dst, PullOptions::default()).await.unwrap_err();
    assert!(format!("{err:#}").contains("cannot download lost"), "{err:#}");
    assert!(!dst.join("lost").exists());
    no_leftovers(&dst);
}

/// A store that fails for a moment: the gateway answers 503, the client retries, pull completes.
/// A store that stays down: push fails and commits nothing; once it is back, push succeeds.
#[tokio::test]
async fn store_outages_are_retried_or_commit_nothing() {
    let (gw, faults, c) = gateway().await;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("a"), b"a").unwrap();
    fs::write(src.join("big"), noise(3 << 20)).unwrap();

    faults.fail_puts(u32::MAX);
    let err = push(&impatient(&gw), "demo", &src, PushOptions::default()).await.unwrap_err();
    assert!(format!("{err:#}").contains("injected fault"), "{err:#}");
    assert_eq!(c.workspace("demo").await.unwrap().head, 0, "nothing committed");
    faults.clear();
    assert_eq!(push(&c, "demo", &src, PushOptions::default()).await.unwrap().version, 1);

    faults.fail_gets(1);
    let before = faults.calls().gets;
    let dst = tmp.path().join("dst");
    pull(&c, "demo", VersionRef::Head, &dst, PullOptions { concurrency: 1, progress: false }).await.unwrap();
    assert_eq!(entries(&dst), entries(&src));
    assert_eq!(faults.calls().gets, before + 3, "two blobs, one read failed and was retried");
}

/// Presigned URLs (S3 store) that have expired are refreshed, once per blob, for a small blob
/// (fetched into memory) and a large one (streamed).
///
/// The fake also checked that presigned URLs are fetched without the gateway's token. That
/// cannot be observed here: Garage serves a presigned GET that carries a bearer header all the
/// same. `podfs-client`'s `token_only_goes_to_the_gateway` unit test covers that rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_presigned_urls_are_refreshed() {
    let services = podfs_testnet::Services::from_env().expect(podfs_testnet::services::START_HINT);
    let store = podfs_testnet::fresh_s3_prefix(&services.blob_store);
    let (gw, faults) = TestGateway::faulty(Some(&store)).await.unwrap();
    let c = gw.client();
    c.create_workspace("demo").await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("small"), b"small").unwrap();
    fs::write(src.join("big"), vec![7u8; 2 << 20]).unwrap();
    push(&c, "demo", &src, PushOptions::default()).await.unwrap();
    let locs = c.blob_locations("demo", &[ContentHash::of(b"small")]).await.unwrap();
    assert!(locs.locations.iter().all(|l| !l.gateway), "an S3 store hands out presigned URLs: {locs:?}");
    let before = faults.calls();

    faults.expire_presigned(2);
    let dst = tmp.path().join("dst");
    pull(&c, "demo", VersionRef::Head, &dst, PullOptions::default()).await.unwrap();
    assert_eq!(entries(&dst), entries(&src));
    let calls = faults.calls();
    assert_eq!(calls.expired - before.expired, 2, "both URLs of the first batch had expired");
    assert_eq!(calls.presigns - before.presigns, 4, "one batch of two, then one refresh per blob");
}

/// Another writer commits while push is between its head read and its commit: the commit is
/// refused (409) and push says to run it again.
#[tokio::test]
async fn a_moved_head_is_a_conflict() {
    let (gw, _, c) = gateway().await;
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("f"), b"x").unwrap();
    gw.hold.arm_commit();
    let other_writer = async {
        gw.hold.wait_held().await;
        let theirs = CommitRequest {
            parent_version: 0,
            message: Some("other writer".into()),
            author: None,
            changes: vec![Change::Put(entry("theirs", EntryKind::Dir, b""))],
        };
        assert_eq!(c.commit("demo", &theirs).await.unwrap().version, 1);
        gw.hold.forward().await
    };
    // one task, both futures: push runs until its commit is held, the other writer commits,
    // then push's commit goes on
    let (pushed, status) = tokio::join!(push(&c, "demo", tmp.path(), PushOptions::default()), other_writer);
    assert_eq!(status, axum::http::StatusCode::CONFLICT);
    let err = pushed.unwrap_err();
    assert!(matches!(err.downcast_ref::<PushError>(), Some(PushError::Conflict { parent: 0, .. })), "{err:#}");
    assert!(err.to_string().contains("run push again"));
    assert_eq!(c.workspace("demo").await.unwrap().head, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_cli_runs_in_process() {
    let (gw, _, c) = gateway().await;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("hello.txt"), b"hello").unwrap();
    let base = ["podfs", "--gateway", gw.url.as_str(), "--token", ADMIN_TOKEN];
    let run = |args: Vec<String>| async move {
        let mut out = Vec::new();
        let code = podfs_syncd::run_with(args, &mut out).await;
        (code, String::from_utf8(out).unwrap())
    };
    let args = |extra: &[&str]| base.iter().chain(extra).map(|s| s.to_string()).collect::<Vec<_>>();

    let (code, out) = run(args(&["push", "demo", src.to_str().unwrap(), "-m", "hi"])).await;
    assert_eq!(code, std::process::ExitCode::SUCCESS);
    assert_eq!(out, "pushed demo@1: 1 change, 1 blob uploaded (5 B)\n");

    let (_, out) = run(args(&["--json", "push", "demo", src.to_str().unwrap()])).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["up_to_date"], true);
    assert_eq!(v["version"], 1);

    let dst = tmp.path().join("dst");
    let (code, out) = run(args(&["--json", "pull", "--per-file", "demo@1", dst.to_str().unwrap()])).await;
    assert_eq!(code, std::process::ExitCode::SUCCESS);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v["version"].as_u64(), v["files"].as_u64()), (Some(1), Some(1)));
    assert_eq!(fs::read(dst.join("hello.txt")).unwrap(), b"hello");

    // the default pull (Phase 2, from the version's manifest.sqlite), which the fake never spoke
    let dst2 = tmp.path().join("dst2");
    let cache = tmp.path().join("cache");
    let (code, out) =
        run(args(&["pull", "--cache-dir", cache.to_str().unwrap(), "demo", dst2.to_str().unwrap()])).await;
    assert_eq!(code, std::process::ExitCode::SUCCESS, "{out}");
    assert_eq!(fs::read(dst2.join("hello.txt")).unwrap(), b"hello");

    let info = &c.versions("demo", None, None).await.unwrap().versions[0];
    let (code, out) = run(args(&["log", "demo"])).await;
    assert_eq!(code, std::process::ExitCode::SUCCESS);
    assert_eq!(out, format!("1  {}  {}  1 change  hi\n", info.created_at, info.author));

    let (code, out) = run(args(&["pull", "--per-file", "demo@head", dst.to_str().unwrap()])).await;
    assert_eq!(code, std::process::ExitCode::FAILURE);
    assert!(out.is_empty());
}
