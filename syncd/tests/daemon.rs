//! The syncd daemon end to end (issue 3/3): the real `podfs` binary, real files and inotify, a
//! gateway on PostgreSQL + Garage (`scripts/dev-services up`; these tests fail, never skip,
//! when the services are missing).
//!
//! Every scenario ends in the same check: the workspace's head holds exactly the tree on disk
//! (as `push` would scan it) and the daemon has nothing pending.

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use podfs_client::Client;
use podfs_protocol::api::CommitRequest;
use podfs_protocol::{Change, ContentHash, Entry, EntryKind, VersionRef, WsPath};
use podfs_syncd::daemon::status::{DaemonState, STATUS_FILE, Status};
use podfs_syncd::{PushOptions, push};
use podfs_testnet::gateway::{ADMIN_TOKEN, TestGateway};
use podfs_testnet::proxy::FaultProxy;

const WAIT: Duration = Duration::from_secs(60);

/// A `podfs syncd` child process.
struct Syncd {
    child: Child,
    dir: PathBuf,
    log: PathBuf,
}

impl Syncd {
    /// Starts `podfs syncd` on `dir`, with `extra` flags.
    fn start(gateway: &str, ws: &str, dir: &Path, scratch: &Path, extra: &[&str]) -> Self {
        let log = scratch.join(format!("syncd-{}.log", rand_tag()));
        let child = Command::new(env!("CARGO_BIN_EXE_podfs"))
            .args(["--gateway", gateway, "--token", ADMIN_TOKEN, "syncd", "--workspace", ws])
            .args(extra)
            .arg(dir)
            .arg("--cache-dir")
            .arg(scratch.join("cache"))
            .env("RUST_LOG", "warn,podfs_syncd::daemon=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start podfs syncd");
        Self { child, dir: dir.to_path_buf(), log }
    }

    fn status(&self) -> Option<Status> {
        let text = std::fs::read_to_string(self.dir.join(".podfs").join(STATUS_FILE)).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the daemon watches the tree.
    async fn wait_watching(&mut self) {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Some(code) = self.child.try_wait().expect("wait") {
                panic!("syncd exited ({code}):\n{}", self.log());
            }
            if self.status().is_some_and(|s| s.state == DaemonState::Watching) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("syncd never started watching:\n{}", self.log());
    }

    fn kill9(mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reap");
    }

    /// SIGTERM, then the exit status must be success.
    fn stop(mut self) {
        let ok = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status().expect("kill").success();
        assert!(ok, "kill -TERM failed");
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "syncd exited with {status} on SIGTERM:\n{}", self.log());
    }
}

impl Drop for Syncd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rand_tag() -> String {
    podfs_testnet::services::random_hex(6)
}

/// The tree on disk as `push` sees it.
fn disk_tree(dir: &Path) -> Vec<Entry> {
    podfs_syncd::scan::scan(dir).expect("scan").entries
}

async fn head_tree(client: &Client, ws: &str) -> (u64, Vec<Entry>) {
    let head = client.workspace(ws).await.expect("workspace").head;
    if head == 0 {
        return (0, Vec::new());
    }
    let mut e = client.manifest(ws, VersionRef::Number(head)).await.expect("manifest").entries;
    e.sort_by(|a, b| a.path.as_str().cmp(b.path.as_str()));
    (head, e)
}

/// Waits until the daemon has nothing pending and head equals the disk; returns head.
async fn wait_synced(d: &Syncd, client: &Client, ws: &str) -> u64 {
    let deadline = Instant::now() + WAIT;
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Some(s) = d.status()
            && s.state == DaemonState::Watching
            && s.pending_changes == 0
        {
            let disk = disk_tree(&d.dir);
            let (head, remote) = head_tree(client, ws).await;
            if disk == remote {
                return head;
            }
            last = diff_summary(&disk, &remote);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("head never matched the disk ({last}); status {:?}\n{}", d.status(), d.log());
}

fn diff_summary(disk: &[Entry], remote: &[Entry]) -> String {
    let changes = podfs_syncd::changes::compute_changes(disk, remote);
    let shown: Vec<String> = changes.iter().take(5).map(|c| format!("{c:?}")).collect();
    format!("{} differences: {}", changes.len(), shown.join("; "))
}

fn write(dir: &Path, rel: &str, body: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    std::fs::write(p, body).expect("write");
}

async fn versions(client: &Client, ws: &str) -> Vec<podfs_protocol::api::VersionInfo> {
    client.versions(ws, Some(1000), None).await.expect("versions").versions
}

/// A workspace holding a small tree, pushed; returns the client.
async fn seeded(gw: &TestGateway, ws: &str, scratch: &Path) -> Client {
    let client = gw.client();
    client.create_workspace(ws).await.expect("create");
    let src = scratch.join("seed");
    write(&src, "README.md", "hello\n");
    write(&src, "src/main.rs", "fn main() {}\n");
    write(&src, "src/lib/util.rs", "pub fn f() {}\n");
    std::fs::create_dir_all(src.join("empty")).expect("mkdir");
    push(&client, ws, &src, PushOptions::default()).await.expect("push");
    client
}

/// A gateway on fresh PostgreSQL + S3 holding a seeded workspace, and a scratch directory.
struct World {
    gw: TestGateway,
    db: podfs_testnet::services::TestDb,
    tmp: tempfile::TempDir,
    client: Client,
    ws: &'static str,
    /// Where syncd runs.
    dir: PathBuf,
}

impl World {
    async fn new(ws: &'static str) -> Self {
        let (gw, db, _) = TestGateway::on_fresh_services().await;
        let tmp = tempfile::tempdir().expect("tempdir");
        let client = seeded(&gw, ws, tmp.path()).await;
        let dir = tmp.path().join("work");
        Self { gw, db, tmp, client, ws, dir }
    }

    /// Starts syncd on `dir` through `gateway` with `extra` flags and waits until it watches.
    async fn syncd_via(&self, gateway: &str, extra: &[&str]) -> Syncd {
        let mut d = Syncd::start(gateway, self.ws, &self.dir, self.tmp.path(), extra);
        d.wait_watching().await;
        d
    }

    async fn syncd(&self) -> Syncd {
        self.syncd_via(&self.gw.url, &[]).await
    }

    async fn synced(&self, d: &Syncd) -> u64 {
        wait_synced(d, &self.client, self.ws).await
    }

    async fn finish(self) {
        self.gw.stop().await.expect("stop");
        self.db.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_kind_of_edit_reaches_a_version() {
    let w = World::new("edits").await;
    let (client, dir) = (&w.client, &w.dir);
    let d = w.syncd().await;
    assert_eq!(std::fs::read_to_string(dir.join("README.md")).expect("hydrated"), "hello\n");
    let v0 = w.synced(&d).await;
    assert_eq!(v0, 1, "hydrating commits nothing");

    type Step = Box<dyn Fn(&Path)>;
    let steps: Vec<(&str, Step)> = vec![
        ("edit", Box::new(|d| write(d, "README.md", "hello again\n"))),
        ("create", Box::new(|d| write(d, "src/new.rs", "// new\n"))),
        ("delete", Box::new(|d| std::fs::remove_file(d.join("src/lib/util.rs")).expect("rm"))),
        ("rename", Box::new(|d| std::fs::rename(d.join("src/new.rs"), d.join("src/renamed.rs")).expect("mv"))),
        (
            "chmod",
            Box::new(|d| {
                std::fs::set_permissions(d.join("README.md"), std::fs::Permissions::from_mode(0o755)).expect("chmod")
            }),
        ),
        ("symlink", Box::new(|d| symlink("src/main.rs", d.join("link")).expect("symlink"))),
        ("empty dir", Box::new(|d| std::fs::create_dir_all(d.join("a/b/c")).expect("mkdir"))),
        ("dir move", Box::new(|d| std::fs::rename(d.join("src"), d.join("source")).expect("mv dir"))),
        ("dir delete", Box::new(|d| std::fs::remove_dir_all(d.join("a")).expect("rm -r"))),
        (
            "ignored",
            Box::new(|d| {
                write(d, ".podfsignore", "*.log\n");
                write(d, "debug.log", "noise");
                write(d, ".README.md.swp", "vim swap");
                write(d, "kept.txt", "kept");
            }),
        ),
    ];
    let mut last = v0;
    for (name, step) in steps {
        step(dir);
        let v = w.synced(&d).await;
        assert!(v > last, "{name}: no new version (head {v})");
        last = v;
    }
    let (_, head) = head_tree(client, "edits").await;
    let paths: Vec<&str> = head.iter().map(|e| e.path.as_str()).collect();
    assert!(paths.contains(&"kept.txt") && !paths.contains(&"debug.log") && !paths.contains(&".README.md.swp"));
    let link = head.iter().find(|e| e.path.as_str() == "link").expect("link");
    assert_eq!((link.kind, link.hash), (EntryKind::Symlink, Some(ContentHash::of(b"src/main.rs"))));
    let newest = &versions(client, "edits").await[0];
    assert!(newest.message.starts_with("syncd: "), "{newest:?}");
    assert!(newest.author.starts_with("syncd@"), "{newest:?}");

    // podfs status reads the daemon's state
    let (ok, out) = w.gw.cli(&["--json", "status", dir.to_str().expect("utf-8")]).await;
    assert!(ok, "{out}");
    let s: Status = serde_json::from_str(&out).expect("status json");
    assert_eq!((s.state, s.head_version, s.pending_changes), (DaemonState::Watching, last, 0));
    assert!(s.last_commit.is_some_and(|c| c.version == last));

    d.stop();
    let (ok, out) = w.gw.cli(&["--json", "status", dir.to_str().expect("utf-8")]).await;
    assert!(ok && out.contains("\"stopped\""), "{out}");
    w.finish().await;
}

/// The quiet period and the max delay of the burst test: equal, so that every batch is
/// committed exactly this long after its first change, however the writes are spread.
const BURST_DELAY_MS: u64 = 400;

/// A version's `created_at` (RFC 3339, the in-process gateway's clock) in ms since the epoch.
fn unix_ms(rfc3339: &str) -> i128 {
    let t = time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339).expect("created_at");
    t.unix_timestamp_nanos() / 1_000_000
}

fn now_ms() -> i128 {
    time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000
}

/// The content of burst file `i`: 50 distinct contents, so the test measures batching, not
/// 10,000 uploads (each distinct content is uploaded once).
fn module(i: usize) -> String {
    format!("module.exports = {};\n", i % 50)
}

/// The message syncd gives a version of `changes` paths made from edits.
fn edit_message(changes: u64) -> String {
    format!("syncd: {} ({changes} paths)", if changes >= 100 { "burst" } else { "save" })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_10000_files_makes_a_version_per_max_delay_at_most() {
    let w = World::new("burst").await;
    let (client, dir) = (&w.client, &w.dir);
    let delay = BURST_DELAY_MS.to_string();
    let d = w.syncd_via(&w.gw.url, &["--quiet-ms", &delay, "--max-delay-ms", &delay]).await;
    let v0 = w.synced(&d).await;

    // A tree moved in at once is one event, so one batch: one version, named a burst.
    let staged = w.tmp.path().join("staged");
    for i in 0..1000 {
        write(&staged, &format!("vendor/pkg{}/file{i}.js", i % 10), &module(i));
    }
    std::fs::rename(staged.join("vendor"), dir.join("vendor")).expect("move the tree in");
    let v1 = w.synced(&d).await;
    assert_eq!(v1, v0 + 1, "one move, one version");
    let moved = &versions(client, "burst").await[0];
    assert_eq!((moved.changes, moved.message.as_str()), (1011, "syncd: burst (1011 paths)"), "{moved:?}");

    // 10,000 files written one by one, as `npm install` does.
    let started = now_ms();
    for i in 0..10_000 {
        write(dir, &format!("node_modules/pkg{}/file{i}.js", i % 100), &module(i));
    }
    let v2 = w.synced(&d).await;
    assert!(
        !d.log().contains("overflowed"),
        "the event queue overflowed (fs.inotify.max_queued_events lowered by another test?): this test measures batches, not rescans\n{}",
        d.log()
    );
    let made: Vec<_> = versions(client, "burst").await.into_iter().filter(|v| v.version > v1).collect();
    assert_eq!(made.len() as u64, v2 - v1);
    assert!(
        made.iter().map(|v| v.changes).sum::<u64>() >= 10_100,
        "every file and directory is in some version: {made:?}"
    );
    // Each version is named for its size: a batch of at least 100 paths is a burst.
    for v in &made {
        assert_eq!(v.message, edit_message(v.changes), "{v:?}");
    }
    assert!(made.iter().any(|v| v.message.contains("burst")), "{made:?}");
    // A version per max delay at most: a batch is taken BURST_DELAY_MS after its first change,
    // which came after the previous batch was taken, so batches are taken at least that far
    // apart. The first batch of the burst was taken after the first write, and each version is
    // made after its batch was taken: the last of n versions came at least (n - 1) x
    // BURST_DELAY_MS after the first write (a slow machine only adds to that; the 2 ms cover
    // the truncation of both clocks to ms).
    let last = made.iter().map(|v| unix_ms(&v.created_at)).max().expect("the burst made versions");
    let spread = last - started;
    assert!(
        (made.len() as i128 - 1) * i128::from(BURST_DELAY_MS) <= spread + 2,
        "{} versions within {spread} ms of the first write: more than one per {BURST_DELAY_MS} ms",
        made.len()
    );
    // Every file of the burst is in head, with its content.
    let (_, head) = head_tree(client, "burst").await;
    let files: std::collections::HashMap<&str, Option<ContentHash>> =
        head.iter().filter(|e| e.kind == EntryKind::File).map(|e| (e.path.as_str(), e.hash)).collect();
    for i in 0..10_000 {
        let path = format!("node_modules/pkg{}/file{i}.js", i % 100);
        let want = ContentHash::of(module(i).as_bytes());
        assert_eq!(files.get(path.as_str()), Some(&Some(want)), "{path}");
    }
    d.stop();
    w.finish().await;
}

/// Sets `fs.inotify.max_queued_events` for the life of the guard (read when an inotify
/// instance is created, so only watchers started meanwhile get the small queue).
struct QueueLimit(String);

impl QueueLimit {
    const PATH: &str = "/proc/sys/fs/inotify/max_queued_events";
    fn set(n: u32) -> Self {
        let old = std::fs::read_to_string(Self::PATH).expect("read max_queued_events");
        std::fs::write(Self::PATH, n.to_string())
            .expect("this test lowers fs.inotify.max_queued_events and must run as root");
        Self(old.trim().to_string())
    }
}

impl Drop for QueueLimit {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, &self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_overflowed_event_queue_still_ends_equal_to_disk() {
    let w = World::new("overflow").await;
    let dir = &w.dir;
    let d = {
        let _small = QueueLimit::set(16);
        w.syncd().await
    };
    w.synced(&d).await;
    for i in 0..3000 {
        write(dir, &format!("gen/d{}/f{i}.txt", i % 30), &format!("{i}\n"));
    }
    std::fs::remove_file(dir.join("README.md")).expect("rm");
    w.synced(&d).await;
    assert!(d.log().contains("overflowed"), "no overflow was seen:\n{}", d.log());
    d.stop();
    w.finish().await;
}

/// Holds the daemon's next commit in front of the gateway, waits until the daemon is inside that
/// commit by its own account, and kills it with -9 while the request is provably in flight.
async fn kill_9_during_a_held_commit(w: &World, d: Syncd) {
    let held = tokio::time::timeout(WAIT, w.gw.hold.wait_held()).await.unwrap_or_else(|_| {
        panic!("the daemon never sent its commit:\n{}", d.log());
    });
    assert_eq!(held, format!("/v1/workspaces/{}/versions", w.ws));
    assert_eq!(d.status().map(|s| s.state), Some(DaemonState::Committing), "the daemon is mid-commit");
    d.kill9();
    assert!(w.gw.hold.is_holding(), "the commit was still in flight when the daemon died");
}

/// The paths `from`..`to` changed.
async fn changed_paths(client: &Client, ws: &str, from: u64, to: u64) -> Vec<String> {
    let diff = client.diff(ws, VersionRef::Number(from), VersionRef::Number(to)).await.expect("diff");
    diff.changes.into_iter().map(|c| c.path).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_commit_and_offline_edits_lose_nothing() {
    let w = World::new("crash").await;
    let (client, dir) = (&w.client, &w.dir);
    let d = w.syncd().await;
    w.synced(&d).await;
    write(dir, "acknowledged.txt", "saved before the crash");
    let acked = w.synced(&d).await;

    // 1. The commit reaches the gateway after the daemon died: it lands, nobody hears the answer.
    w.gw.hold.arm_commit();
    // moved in with one rename: one event, one batch, one held commit however slow the machine
    let staged = w.tmp.path().join("staged-burst");
    for i in 0..500 {
        write(&staged, &format!("burst/f{i}.txt"), &format!("{i}\n"));
    }
    std::fs::rename(staged.join("burst"), dir.join("burst")).expect("move the burst in");
    kill_9_during_a_held_commit(&w, d).await;
    assert_eq!(w.gw.hold.forward().await, axum::http::StatusCode::CREATED, "the orphaned commit lands");
    let landed = acked + 1;
    assert_eq!(client.workspace("crash").await.expect("ws").head, landed);
    // edits while no daemon runs
    write(dir, "offline.txt", "written while syncd was down");
    write(dir, "README.md", "changed offline\n");
    std::fs::remove_dir_all(dir.join("src/lib")).expect("rm -r");

    let d = w.syncd().await;
    let head = w.synced(&d).await;
    assert!(head > landed);
    // nothing duplicated: after the landed version, only the offline edits were committed
    let after = changed_paths(client, "crash", landed, head).await;
    assert_eq!(after, ["README.md", "offline.txt", "src/lib", "src/lib/util.rs"], "{after:?}");
    let history = client.history("crash", "burst/f0.txt").await.expect("history").revisions;
    assert_eq!(history.iter().map(|r| r.from_version).collect::<Vec<_>>(), [landed], "{history:?}");
    assert!(d.status().is_some_and(|s| s.conflicts.is_empty()), "no conflict with itself: {:?}", d.status());
    // the acknowledged save is in its version, byte for byte
    let pulled = w.tmp.path().join("acked");
    podfs_syncd::pull(client, "crash", VersionRef::Number(acked), &pulled, Default::default()).await.expect("pull");
    assert_eq!(std::fs::read_to_string(pulled.join("acknowledged.txt")).expect("read"), "saved before the crash");

    // 2. The commit never reaches the gateway: after the restart it is made once.
    w.gw.hold.arm_commit();
    for i in 0..500 {
        write(dir, &format!("second/f{i}.txt"), &format!("{i}\n"));
    }
    kill_9_during_a_held_commit(&w, d).await;
    w.gw.hold.refuse();
    assert_eq!(client.workspace("crash").await.expect("ws").head, head, "the refused commit made nothing");
    let d = w.syncd().await;
    let head2 = w.synced(&d).await;
    let after = changed_paths(client, "crash", head, head2).await;
    assert_eq!(after.len(), 501, "second/ and its 500 files, nothing else: {after:?}");
    assert!(after.iter().all(|p| p.starts_with("second")), "{after:?}");
    assert_eq!(w.gw.hold.held_count(), 2);
    d.stop();
    w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changes_wait_while_the_gateway_is_down() {
    let w = World::new("outage").await;
    let (client, dir) = (&w.client, &w.dir);
    let proxy = FaultProxy::start(w.gw.config.listen).await.expect("proxy");
    let d = w.syncd_via(&proxy.http_url(), &[]).await;
    let before = w.synced(&d).await;

    proxy.set_down(true);
    write(dir, "during-outage.txt", "one");
    write(dir, "src/main.rs", "fn main() { /* edited during the outage */ }\n");
    let deadline = Instant::now() + WAIT;
    while !d.status().is_some_and(|s| s.state == DaemonState::Offline && s.last_error.is_some()) {
        assert!(Instant::now() < deadline, "syncd never noticed the outage: {:?}", d.status());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(client.workspace("outage").await.expect("ws").head, before, "nothing committed while down");
    write(dir, "during-outage.txt", "two");
    proxy.set_down(false);
    w.synced(&d).await;
    d.stop();
    w.finish().await;
}

/// Commits `path` = `body` as another writer would.
async fn other_writer(client: &Client, ws: &str, path: &str, body: &str) -> u64 {
    let head = client.workspace(ws).await.expect("ws").head;
    let hash = ContentHash::of(body.as_bytes());
    client.put_blob(ws, &hash, bytes::Bytes::copy_from_slice(body.as_bytes())).await.expect("put blob");
    let e = Entry {
        path: WsPath::new(path.to_string()).expect("path"),
        kind: EntryKind::File,
        hash: Some(hash),
        size: body.len() as u64,
        mode: 0o644,
    };
    let req = CommitRequest {
        parent_version: head,
        message: Some("other writer".into()),
        author: Some("other".into()),
        changes: vec![Change::Put(e)],
    };
    client.commit(ws, &req).await.expect("commit").version
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_writers_rebase_disjoint_paths_and_keep_both_sides_of_a_conflict() {
    let w = World::new("two").await;
    let (client, dir) = (&w.client, &w.dir);
    let d = w.syncd().await;
    w.synced(&d).await;

    // disjoint: the other writer adds theirs.txt, we edit README.md
    other_writer(client, "two", "theirs.txt", "from the other writer").await;
    write(dir, "README.md", "ours\n");
    w.synced(&d).await;
    assert_eq!(std::fs::read_to_string(dir.join("theirs.txt")).expect("rebased onto disk"), "from the other writer");

    // overlapping: both change src/main.rs
    let theirs = other_writer(client, "two", "src/main.rs", "their main\n").await;
    write(dir, "src/main.rs", "our main\n");
    let head = w.synced(&d).await;
    assert!(head > theirs);
    assert_eq!(std::fs::read_to_string(dir.join("src/main.rs")).expect("read"), "our main\n");
    let file = client
        .get_file("two", VersionRef::Number(theirs), &WsPath::new("src/main.rs".to_string()).expect("path"))
        .await
        .expect("their version")
        .bytes()
        .await
        .expect("bytes");
    assert_eq!(&file[..], b"their main\n", "their content stays in their version");
    let s = d.status().expect("status");
    assert!(
        s.conflicts.iter().any(|c| c.path == "src/main.rs" && c.their_version == theirs && c.our_version == Some(head)),
        "{s:?}"
    );
    let newest = &versions(client, "two").await[0];
    assert!(newest.message.contains("conflict"), "{newest:?}");
    d.stop();
    w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restore_brings_back_an_old_version_and_log_lists_a_path() {
    let w = World::new("back").await;
    let (client, gw) = (&w.client, &w.gw);
    let src = w.tmp.path().join("seed");
    write(&src, "README.md", "second\n");
    std::fs::remove_dir_all(src.join("src/lib")).expect("rm");
    push(client, "back", &src, PushOptions::default()).await.expect("push v2");
    let (ok, out) = gw.cli(&["restore", "back", "1"]).await;
    assert!(ok, "{out}");
    assert!(out.contains("version 3 restores version 1"), "{out}");
    let v1 = client.manifest("back", VersionRef::Number(1)).await.expect("v1").entries;
    let v3 = client.manifest("back", VersionRef::Number(3)).await.expect("v3").entries;
    assert_eq!(v1, v3);
    let (ok, out) = gw.cli(&["log", "back", "README.md"]).await;
    assert!(ok, "{out}");
    assert_eq!(out.lines().count(), 3, "three revisions of README.md: {out}");
    let (ok, out) = gw.cli(&["restore", "back", "9"]).await;
    assert!(!ok && out.is_empty());
    w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_name_that_is_not_utf8_is_skipped_and_the_rest_still_syncs() {
    use std::os::unix::ffi::OsStrExt;
    let w = World::new("names").await;
    let d = w.syncd().await;
    w.synced(&d).await;
    let bad = w.dir.join(std::ffi::OsStr::from_bytes(b"bad\xffname.txt"));
    std::fs::write(&bad, "not a workspace path").expect("write");
    write(&w.dir, "good.txt", "still synced");
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, head) = head_tree(&w.client, "names").await;
        if head.iter().any(|e| e.path.as_str() == "good.txt") {
            assert!(head.iter().all(|e| !e.path.as_str().starts_with("bad")), "{head:?}");
            break;
        }
        assert!(Instant::now() < deadline, "good.txt never reached head:\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(d.status().is_some_and(|s| s.state == DaemonState::Watching && s.pending_changes == 0), "{:?}", d.status());
    // a full reconciliation (as at a restart) skips it too
    d.stop();
    let d = w.syncd().await;
    assert!(d.log().contains("not valid UTF-8"), "{}", d.log());
    assert_eq!(d.status().map(|s| s.pending_changes), Some(0));
    d.stop();
    w.finish().await;
}
