//! push and pull against an in-memory fake of the gateway (the real one is exercised in
//! `testnet/`): round trips, dedup, faults, and the write-confinement guarantees of pull.

#![allow(clippy::unwrap_used)]

mod support;

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use podfs_client::Client;
use podfs_protocol::{ContentHash, Entry, EntryKind, VersionRef, WsPath};
use podfs_syncd::scan::scan;
use podfs_syncd::{PullOptions, PushError, PushOptions, pull, push};

fn client(url: &str) -> Client {
    Client::new(url, Some(support::TOKEN.into())).unwrap()
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
    let noise: Vec<u8> = (0..(2u64 << 20) + 3).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    fs::write(r.join("noise.bin"), &noise).unwrap();
    fs::set_permissions(r.join("ro"), fs::Permissions::from_mode(0o555)).unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_then_pull_round_trips_every_kind_of_entry() {
    let gw = support::start().await;
    let c = client(&gw.url);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    make_tree(&src);

    let r = push(&c, "demo", &src, PushOptions { message: Some("first".into()), ..Default::default() }).await.unwrap();
    assert_eq!((r.version, r.parent, r.up_to_date), (1, 0, false));
    assert_eq!(r.changes as usize, entries(&src).len());
    // main.rs/copy.rs and big/big-copy are deduplicated; link text "src/main.rs" is its own blob
    assert_eq!(r.uploaded_blobs, 10);
    assert_eq!(gw.state.lock().unwrap().uploads, 10);

    let again = push(&c, "demo", &src, PushOptions::default()).await.unwrap();
    assert!(again.up_to_date);
    assert_eq!((again.version, again.changes, again.uploaded_blobs), (1, 0, 0));

    let dst = tmp.path().join("dst");
    let p = pull(&c, "demo", VersionRef::Head, &dst, PullOptions::default()).await.unwrap();
    assert_eq!(p.version, 1);
    assert_eq!(p.downloaded_blobs, 10);
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
    let gw = support::start().await;
    let c = client(&gw.url);
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("f"), b"x").unwrap();
    push(&c, "demo", tmp.path(), PushOptions::default()).await.unwrap();
    let err = pull(&c, "demo", VersionRef::Head, tmp.path(), PullOptions::default()).await.unwrap_err();
    assert!(format!("{err:#}").contains("not empty"), "{err:#}");
}

#[tokio::test]
async fn missing_workspace_and_version_are_named() {
    let gw = support::start().await;
    let c = client(&gw.url);
    let tmp = tempfile::tempdir().unwrap();
    let err = pull(&c, "demo", VersionRef::Head, &tmp.path().join("x"), PullOptions::default()).await.unwrap_err();
    assert_eq!(err.to_string(), "workspace demo has no version yet");
    let err = pull(&c, "other", VersionRef::Head, &tmp.path().join("x"), PullOptions::default()).await.unwrap_err();
    assert_eq!(err.to_string(), "workspace other not found");
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

/// `a -> /tmp/x` then `a/f`: refused before anything is written (DIR is not even created).
#[tokio::test]
async fn manifest_writing_through_a_symlink_is_refused_before_any_write() {
    let gw = support::start().await;
    let c = client(&gw.url);
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().to_str().unwrap().as_bytes().to_vec();
    {
        let mut s = gw.state.lock().unwrap();
        for content in [&target[..], b"pwned"] {
            s.blobs.insert(ContentHash::of(content), podfs_protocol::blob::encode(content));
        }
        s.manifest_override =
            Some(vec![entry("a", EntryKind::Symlink, &target), entry("a/f", EntryKind::File, b"pwned")]);
    }
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("dst");
    let err = pull(&c, "demo", VersionRef::Head, &dst, PullOptions::default()).await.unwrap_err();
    assert!(format!("{err:#}").contains("symlink, not a directory"), "{err:#}");
    assert!(!dst.exists(), "nothing written");
    assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
    assert_eq!(gw.state.lock().unwrap().location_requests, 0, "refused before any download");

    // a duplicate path and a missing parent are refused the same way
    for bad in [
        vec![entry("f", EntryKind::File, b"pwned"), entry("f", EntryKind::File, b"pwned")],
        vec![entry("d/f", EntryKind::File, b"pwned")],
        vec![entry("b", EntryKind::File, b"pwned"), entry("a", EntryKind::File, b"pwned")],
    ] {
        gw.state.lock().unwrap().manifest_override = Some(bad);
        assert!(pull(&c, "demo", VersionRef::Head, &dst, PullOptions::default()).await.is_err());
        assert!(!dst.exists());
    }
}

#[tokio::test]
async fn corrupt_blobs_never_reach_their_final_path() {
    let gw = support::start().await;
    let c = Client::with_retry_policy(
        &gw.url,
        Some(support::TOKEN.into()),
        podfs_client::RetryPolicy {
            max_attempts: 2,
            base_delay: std::time::Duration::from_millis(1),
            max_delay: std::time::Duration::from_millis(1),
        },
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("small"), b"small content").unwrap();
    let big: Vec<u8> = (0..(3u32 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    fs::write(src.join("big"), &big).unwrap();
    push(&c, "demo", &src, PushOptions::default()).await.unwrap();
    for (name, content) in [("small", &b"small content"[..]), ("big", &big[..])] {
        {
            let mut s = gw.state.lock().unwrap();
            s.corrupt.clear();
            s.corrupt.insert(ContentHash::of(content));
        }
        let dst = tmp.path().join(format!("dst-{name}"));
        let err = pull(&c, "demo", VersionRef::Head, &dst, PullOptions::default()).await.unwrap_err();
        assert!(format!("{err:#}").contains("failed verification"), "{err:#}");
        assert!(!dst.join(name).exists(), "{name} must not be written");
        let leftovers: Vec<_> = fs::read_dir(&dst).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(leftovers.iter().all(|n| !n.to_string_lossy().starts_with(".podfs-tmp")), "{leftovers:?}");
    }
}

#[tokio::test]
async fn expired_presigned_urls_are_refreshed_and_get_no_token() {
    let gw = support::start().await;
    let c = client(&gw.url);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("small"), b"small").unwrap();
    fs::write(src.join("big"), vec![7u8; 2 << 20]).unwrap();
    push(&c, "demo", &src, PushOptions::default()).await.unwrap();
    gw.state.lock().unwrap().presigned = true;
    let dst = tmp.path().join("dst");
    pull(&c, "demo", VersionRef::Head, &dst, PullOptions::default()).await.unwrap();
    assert_eq!(entries(&dst), entries(&src));
    assert_eq!(gw.state.lock().unwrap().location_requests, 3, "one batch, one refresh per blob");
}

#[tokio::test]
async fn a_moved_head_is_a_conflict() {
    let gw = support::start().await;
    let c = client(&gw.url);
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("f"), b"x").unwrap();
    gw.state.lock().unwrap().force_conflict = true;
    let err = push(&c, "demo", tmp.path(), PushOptions::default()).await.unwrap_err();
    assert!(matches!(err.downcast_ref::<PushError>(), Some(PushError::Conflict { parent: 0, .. })), "{err:#}");
    assert!(err.to_string().contains("run push again"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_cli_runs_in_process() {
    let gw = support::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("hello.txt"), b"hello").unwrap();
    let base = ["podfs", "--gateway", gw.url.as_str(), "--token", support::TOKEN];
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

    // the fake gateway speaks the Phase 1 API only (manifest pulls are tested in testnet)
    let dst = tmp.path().join("dst");
    let (code, out) = run(args(&["--json", "pull", "--per-file", "demo@1", dst.to_str().unwrap()])).await;
    assert_eq!(code, std::process::ExitCode::SUCCESS);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v["version"].as_u64(), v["files"].as_u64()), (Some(1), Some(1)));
    assert_eq!(fs::read(dst.join("hello.txt")).unwrap(), b"hello");

    let (code, out) = run(args(&["log", "demo"])).await;
    assert_eq!(code, std::process::ExitCode::SUCCESS);
    assert!(out.starts_with("1  2026-01-01T00:00:00Z  test  0 changes"), "{out}");

    let (code, out) = run(args(&["pull", "--per-file", "demo@head", dst.to_str().unwrap()])).await;
    assert_eq!(code, std::process::ExitCode::FAILURE);
    assert!(out.is_empty());
}
