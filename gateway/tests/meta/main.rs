//! The metadata store's conformance suite. Every case runs twice: on SQLite (a fresh file in a
//! temporary directory) and on PostgreSQL (a fresh database per test, created through the admin
//! URL in `PODFS_TEST_DATABASE_URL`, else `DATABASE_URL`, and dropped afterwards). Without
//! either variable the PostgreSQL tests fail: they never pass silently.
//!
//! Test names: `sqlite::case_*` and `pg::case_*`, plus a few connection-level tests.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::{FutureExt, TryStreamExt};
use podfs_gateway::meta::*;
use podfs_protocol::EntryKind;
use sqlx::{Connection, Executor};

mod peers;
use peers::case_peer_tracker_single_flight_and_exclusion;

// ---------------------------------------------------------------------------------------------
// Harness

macro_rules! cases {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::on_sqlite(super::$case).await;
                }
            )*
        }
        mod pg {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::on_postgres(super::$case).await;
                }
            )*
        }
    };
}

cases!(
    case_workspace_crud,
    case_commit_and_tree_at_every_version,
    case_versions_log,
    case_diff_lists_exactly_the_changes,
    case_stale_parent_conflicts_and_changes_nothing,
    case_missing_blobs_change_nothing,
    case_tree_rule_violations_change_nothing,
    case_tree_rules_allow_valid_restructuring,
    case_identical_put_is_a_noop,
    case_list_dir,
    case_history_of_one_path,
    case_file_count_and_total_bytes,
    case_commit_rows_are_o_changes,
    case_concurrent_commits_one_wins,
    case_tokens,
    case_blobs_are_idempotent,
    case_tree_streams_20k_entries_sorted,
    case_paths_sort_bytewise,
    case_delete_workspace_removes_everything,
    case_peer_tracker_single_flight_and_exclusion,
);

async fn on_sqlite<F, Fut>(case: F)
where
    F: FnOnce(MetaStore) -> Fut,
    Fut: Future<Output = ()>,
{
    with_sqlite_url(|url| async move {
        let store = MetaStore::connect(&url).await.unwrap();
        assert!(!store.is_postgres());
        store.ping().await.unwrap();
        case(store).await;
    })
    .await;
}

async fn on_postgres<F, Fut>(case: F)
where
    F: FnOnce(MetaStore) -> Fut,
    Fut: Future<Output = ()>,
{
    with_postgres_url(|url| async move {
        let store = MetaStore::connect(&url).await.unwrap();
        assert!(store.is_postgres());
        store.ping().await.unwrap();
        case(store).await;
    })
    .await;
}

/// Runs `body` with the URL of a fresh SQLite file, removed afterwards.
async fn with_sqlite_url<F, Fut>(body: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("meta.db");
    body(format!("sqlite://{}", file.display())).await;
    // The store put the file in WAL mode (a property of the file, so a fresh connection sees it).
    assert!(wal_mode(&file).await, "the store must run SQLite in WAL mode");
}

async fn wal_mode(file: &std::path::Path) -> bool {
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", file.display())).await.unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&mut conn).await.unwrap();
    mode == "wal"
}

/// Runs `body` with the URL of a fresh PostgreSQL database, dropped afterwards (best effort).
async fn with_postgres_url<F, Fut>(body: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()>,
{
    let admin =
        std::env::var("PODFS_TEST_DATABASE_URL").or_else(|_| std::env::var("DATABASE_URL")).unwrap_or_else(|_| {
            panic!("PostgreSQL tests need a server: set PODFS_TEST_DATABASE_URL or run scripts/dev-services up")
        });
    let name = format!("podfs_t_{}", hex::encode(rand::random::<[u8; 8]>()));
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to PostgreSQL at {admin}: {e}"));
    conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).await.unwrap();
    let outcome = AssertUnwindSafe(body(with_database(&admin, &name))).catch_unwind().await;
    // Best effort: a leftover database is harmless.
    let _ = conn.execute(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// `admin` with its database name replaced by `name`.
fn with_database(admin: &str, name: &str) -> String {
    let (base, query) = match admin.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (admin, String::new()),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let authority_end = base[authority_start..].find('/').map_or(base.len(), |i| authority_start + i);
    format!("{}/{name}{query}", &base[..authority_end])
}

// ---------------------------------------------------------------------------------------------
// Connection-level tests (they need the URL, not only a store)

#[tokio::test]
async fn sqlite_0004_turns_span_rows_into_span_lists() {
    with_sqlite_url(|url| {
        span_rows_become_span_lists(format!("{url}?mode=rwc"), sqlx::migrate!("../migrations/sqlite"))
    })
    .await;
}

#[tokio::test]
async fn pg_0004_turns_span_rows_into_span_lists() {
    with_postgres_url(|url| span_rows_become_span_lists(url, sqlx::migrate!("../migrations/postgres"))).await;
}

/// A store written before migration 0004 (one `pack_spans` row per span, offsets over 2^32
/// included) keeps every pack's spans, in offset order, and every blob's location once 0004
/// turns the rows into span lists.
async fn span_rows_become_span_lists(url: String, migrator: sqlx::migrate::Migrator) {
    use podfs_protocol::pack::Span;
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    migrator.run_to(3, &pool).await.unwrap();
    let (pack_a, pack_b) = (h("pack a"), h("pack b"));
    let span = |content: &str, offset: u64, len: u64| Span { hash: h(content), offset, len };
    let a = vec![span("x", 0, 40), span("y", 40, 90), span("x", 130, 40), span("z", (5 << 32) + 7, 300)];
    for (pack, spans) in [(pack_a, &a[..]), (pack_b, &[][..])] {
        sqlx::query("INSERT INTO packs (hash, size, blobs, created_at) VALUES ($1, $2, $3, 0)")
            .bind(pack.0.to_vec())
            .bind(1_i64 << 40)
            .bind(spans.len() as i64)
            .execute(&pool)
            .await
            .unwrap();
    }
    // inserted out of order: the list comes out by offset
    for s in a.iter().rev() {
        sqlx::query("INSERT INTO pack_spans (pack, pack_offset, length, hash) VALUES ($1, $2, $3, $4)")
            .bind(pack_a.0.to_vec())
            .bind(s.offset as i64)
            .bind(s.len as i64)
            .bind(s.hash.0.to_vec())
            .execute(&pool)
            .await
            .unwrap();
    }
    for s in &a[..2] {
        sqlx::query(
            "INSERT INTO blobs (hash, size, stored_size, created_at, pack, pack_offset) VALUES ($1, 1, $2, 0, $3, $4)",
        )
        .bind(s.hash.0.to_vec())
        .bind(s.len as i64)
        .bind(pack_a.0.to_vec())
        .bind(s.offset as i64)
        .execute(&pool)
        .await
        .unwrap();
    }
    sqlx::query("INSERT INTO blobs (hash, size, stored_size, created_at) VALUES ($1, 1, 50, 0)")
        .bind(h("loose").0.to_vec())
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;

    let store = MetaStore::connect(&url).await.unwrap();
    assert_eq!(store.pack_spans(&pack_a).await.unwrap(), Some(a.clone()));
    assert_eq!(store.pack_spans(&pack_b).await.unwrap(), Some(vec![]));
    assert_eq!(store.pack_spans(&h("no such pack")).await.unwrap(), None);
    let rows = store.blob_rows(&[h("x"), h("y"), h("loose")]).await.unwrap();
    assert_eq!(rows[&h("x")].pack, Some((pack_a, 0)));
    assert_eq!(rows[&h("y")].pack, Some((pack_a, 40)));
    assert_eq!((rows[&h("loose")].pack, rows[&h("loose")].stored_size), (None, 50));
    // and new packs record their lists
    let spans = vec![(span("w", 0, 60), 10)];
    assert_eq!(store.record_pack(&NewPack { hash: h("pack c"), size: 200, spans }).await.unwrap(), 1);
    assert_eq!(store.pack_spans(&h("pack c")).await.unwrap(), Some(vec![span("w", 0, 60)]));
}

#[tokio::test]
async fn sqlite_reopen_keeps_data() {
    with_sqlite_url(reopen_keeps_data).await;
}

#[tokio::test]
async fn pg_reopen_keeps_data() {
    with_postgres_url(reopen_keeps_data).await;
}

/// A second connect runs the (already applied) migrations again and sees the same data.
async fn reopen_keeps_data(url: String) {
    let first = MetaStore::connect(&url).await.unwrap();
    let ws = first.create_workspace("kept").await.unwrap();
    record(&first, &["x"]).await;
    commit(&first, &ws, vec![file("f", "x")]).await;
    drop(first);
    let second = MetaStore::connect(&url).await.unwrap();
    let again = second.workspace("kept").await.unwrap();
    assert_eq!((again.id, again.info.head, again.info.file_count), (ws.id, 1, 1));
    assert_eq!(paths(&tree(&second, &again, 1).await), ["f"]);
}

#[tokio::test]
async fn connect_refuses_unsupported_urls() {
    for url in ["mysql://localhost/x", "sqlite::memory:", "sqlite://x.db?mode=memory", "no-scheme"] {
        assert!(matches!(MetaStore::connect(url).await, Err(MetaError::Invalid(_))), "{url}");
    }
}

#[tokio::test]
async fn unreachable_database_is_unavailable() {
    // Nothing listens on port 1.
    let err = MetaStore::connect("postgres://postgres@127.0.0.1:1/podfs").await.unwrap_err();
    assert!(matches!(err, MetaError::Unavailable(_)), "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn p(s: &str) -> WsPath {
    WsPath::new(s).unwrap()
}

fn h(content: &str) -> ContentHash {
    ContentHash::of(content.as_bytes())
}

fn file_entry(path: &str, content: &str) -> Entry {
    Entry { path: p(path), kind: EntryKind::File, hash: Some(h(content)), size: content.len() as u64, mode: 0o644 }
}

fn dir_entry(path: &str) -> Entry {
    Entry { path: p(path), kind: EntryKind::Dir, hash: None, size: 0, mode: 0o755 }
}

fn file(path: &str, content: &str) -> Change {
    Change::Put(file_entry(path, content))
}

fn symlink(path: &str, target: &str) -> Change {
    Change::Put(Entry {
        path: p(path),
        kind: EntryKind::Symlink,
        hash: Some(h(target)),
        size: target.len() as u64,
        mode: 0o777,
    })
}

fn dir(path: &str) -> Change {
    Change::Put(Entry { path: p(path), kind: EntryKind::Dir, hash: None, size: 0, mode: 0o755 })
}

fn del(path: &str) -> Change {
    Change::Delete(p(path))
}

async fn record(store: &MetaStore, contents: &[&str]) {
    for c in contents {
        store.record_blob(&h(c), c.len() as u64, c.len() as u64).await.unwrap();
    }
}

fn input(parent: u64, changes: Vec<Change>) -> CommitInput {
    CommitInput { parent_version: parent, message: format!("on {parent}"), author: "tester".into(), changes }
}

/// Commits on the current head; panics on failure.
async fn commit(store: &MetaStore, ws: &WorkspaceRow, changes: Vec<Change>) -> VersionInfo {
    let head = store.workspace(&ws.info.name).await.unwrap().info.head;
    store.commit(ws, input(head, changes)).await.unwrap()
}

/// Commits on the current head and returns the error.
async fn commit_err(store: &MetaStore, ws: &WorkspaceRow, changes: Vec<Change>) -> MetaError {
    let head = store.workspace(&ws.info.name).await.unwrap().info.head;
    store.commit(ws, input(head, changes)).await.unwrap_err()
}

async fn tree(store: &MetaStore, ws: &WorkspaceRow, v: u64) -> Vec<Entry> {
    store.tree(ws.id, v).try_collect().await.unwrap()
}

fn paths(entries: &[Entry]) -> Vec<&str> {
    entries.iter().map(|e| e.path.as_str()).collect()
}

fn not_found<T: std::fmt::Debug>(result: Result<T, MetaError>) -> bool {
    matches!(result, Err(MetaError::NotFound(_)))
}

/// Everything a failed commit must leave as it was.
#[derive(Debug, PartialEq)]
struct Snapshot {
    head: u64,
    file_count: u64,
    total_bytes: u64,
    versions: Vec<(u64, u64, u64)>,
    tree: Vec<Entry>,
    rows: u64,
}

async fn snapshot(store: &MetaStore, ws: &WorkspaceRow) -> Snapshot {
    let row = store.workspace(&ws.info.name).await.unwrap();
    let versions = store.versions(ws, 1000, None).await.unwrap();
    Snapshot {
        head: row.info.head,
        file_count: row.info.file_count,
        total_bytes: row.info.total_bytes,
        versions: versions.iter().map(|v| (v.version, v.changes, v.file_count)).collect(),
        tree: tree(store, ws, row.info.head).await,
        rows: store.entry_rows(ws.id).await.unwrap(),
    }
}

// ---------------------------------------------------------------------------------------------
// Cases

async fn case_workspace_crud(store: MetaStore) {
    let b = store.create_workspace("beta").await.unwrap();
    let a = store.create_workspace("alpha").await.unwrap();
    assert_ne!(a.id, b.id);
    assert_eq!((a.info.name.as_str(), a.info.head, a.info.file_count, a.info.total_bytes), ("alpha", 0, 0, 0));
    time::OffsetDateTime::parse(&a.info.created_at, &time::format_description::well_known::Rfc3339).unwrap();

    assert!(matches!(store.create_workspace("alpha").await, Err(MetaError::Conflict(m)) if m.contains("alpha")));

    let names: Vec<String> = store.list_workspaces().await.unwrap().into_iter().map(|w| w.info.name).collect();
    assert_eq!(names, ["alpha", "beta"]);
    let got = store.workspace("beta").await.unwrap();
    assert_eq!((got.id, got.info.head), (b.id, 0));
    assert!(not_found(store.workspace("gamma").await));

    // An empty workspace has no version to resolve.
    assert!(not_found(store.resolve_version(&a, VersionRef::Head).await));
    assert!(not_found(store.resolve_version(&a, VersionRef::Number(1)).await));
    assert!(tree(&store, &a, 0).await.is_empty());
    assert!(store.list_dir(a.id, 0, None).await.unwrap().is_empty());

    store.delete_workspace("alpha").await.unwrap();
    assert!(not_found(store.workspace("alpha").await));
    assert!(not_found(store.delete_workspace("alpha").await));
    let names: Vec<String> = store.list_workspaces().await.unwrap().into_iter().map(|w| w.info.name).collect();
    assert_eq!(names, ["beta"]);
    // The name is free again, under a new id.
    let again = store.create_workspace("alpha").await.unwrap();
    assert_ne!(again.id, a.id);
}

async fn case_commit_and_tree_at_every_version(store: MetaStore) {
    let ws = store.create_workspace("demo").await.unwrap();
    record(&store, &["a1", "a2", "b1", "readme"]).await;

    let v1 = commit(&store, &ws, vec![file("src/a.rs", "a1"), dir("src"), file("README", "readme")]).await;
    assert_eq!((v1.version, v1.parent, v1.changes), (1, None, 3));
    assert_eq!((v1.workspace.as_str(), v1.message.as_str(), v1.author.as_str()), ("demo", "on 0", "tester"));
    let v2 = commit(&store, &ws, vec![file("src/a.rs", "a2"), file("src/b.rs", "b1")]).await;
    assert_eq!((v2.version, v2.parent, v2.changes), (2, Some(1), 2));
    let v3 = commit(&store, &ws, vec![del("README")]).await;
    assert_eq!((v3.version, v3.parent, v3.changes), (3, Some(2), 1));

    let t1 = vec![file_entry("README", "readme"), dir_entry("src"), file_entry("src/a.rs", "a1")];
    let t2 = vec![
        file_entry("README", "readme"),
        dir_entry("src"),
        file_entry("src/a.rs", "a2"),
        file_entry("src/b.rs", "b1"),
    ];
    let t3 = vec![dir_entry("src"), file_entry("src/a.rs", "a2"), file_entry("src/b.rs", "b1")];
    assert_eq!(tree(&store, &ws, 1).await, t1);
    assert_eq!(tree(&store, &ws, 2).await, t2);
    assert_eq!(tree(&store, &ws, 3).await, t3);
    assert!(tree(&store, &ws, 0).await.is_empty());
    // A version beyond the head is refused, not answered with the head's tree.
    let beyond: Result<Vec<Entry>, MetaError> = store.tree(ws.id, 4).try_collect().await;
    assert!(not_found(beyond));

    assert_eq!(store.entry(ws.id, 1, &p("src/a.rs")).await.unwrap(), Some(file_entry("src/a.rs", "a1")));
    assert_eq!(store.entry(ws.id, 3, &p("src/a.rs")).await.unwrap(), Some(file_entry("src/a.rs", "a2")));
    assert_eq!(store.entry(ws.id, 2, &p("README")).await.unwrap(), Some(file_entry("README", "readme")));
    assert_eq!(store.entry(ws.id, 3, &p("README")).await.unwrap(), None);
    assert_eq!(store.entry(ws.id, 1, &p("src/b.rs")).await.unwrap(), None);

    // Later commits leave earlier versions as they were.
    record(&store, &["c1"]).await;
    commit(&store, &ws, vec![file("src/c.rs", "c1"), del("src/b.rs")]).await;
    assert_eq!(tree(&store, &ws, 1).await, t1);
    assert_eq!(tree(&store, &ws, 2).await, t2);
    assert_eq!(tree(&store, &ws, 3).await, t3);
}

async fn case_versions_log(store: MetaStore) {
    let ws = store.create_workspace("log").await.unwrap();
    record(&store, &["1", "2", "3", "4", "5"]).await;
    for (i, content) in ["1", "2", "3", "4", "5"].iter().enumerate() {
        let message = if i == 2 { String::new() } else { format!("commit ✓ {content}") };
        let info = store
            .commit(
                &ws,
                CommitInput {
                    parent_version: i as u64,
                    message,
                    author: "Zoë <z@x>".into(),
                    changes: vec![file("f", content)],
                },
            )
            .await
            .unwrap();
        assert_eq!(info.version, i as u64 + 1);
    }
    let numbers = |vs: Vec<VersionInfo>| vs.into_iter().map(|v| v.version).collect::<Vec<_>>();
    assert_eq!(numbers(store.versions(&ws, 100, None).await.unwrap()), [5, 4, 3, 2, 1]);
    assert_eq!(numbers(store.versions(&ws, 2, None).await.unwrap()), [5, 4]);
    assert_eq!(numbers(store.versions(&ws, 2, Some(4)).await.unwrap()), [3, 2]);
    assert!(store.versions(&ws, 10, Some(1)).await.unwrap().is_empty());

    let v3 = store.version(&ws, 3).await.unwrap();
    assert_eq!((v3.version, v3.parent, v3.message.as_str(), v3.author.as_str()), (3, Some(2), "", "Zoë <z@x>"));
    assert_eq!(store.version(&ws, 4).await.unwrap().message, "commit ✓ 4");
    assert_eq!(store.version(&ws, 1).await.unwrap().parent, None);
    time::OffsetDateTime::parse(&v3.created_at, &time::format_description::well_known::Rfc3339).unwrap();
    assert!(not_found(store.version(&ws, 6).await));
    assert!(not_found(store.version(&ws, u64::MAX).await));

    // The head is re-read from the database, not taken from the (stale) row.
    assert_eq!(ws.info.head, 0);
    assert_eq!(store.resolve_version(&ws, VersionRef::Head).await.unwrap(), 5);
    assert_eq!(store.resolve_version(&ws, VersionRef::Number(3)).await.unwrap(), 3);
    for bad in [0, 6, u64::MAX] {
        assert!(
            matches!(store.resolve_version(&ws, VersionRef::Number(bad)).await, Err(MetaError::NotFound(_))),
            "{bad}"
        );
    }
}

async fn case_diff_lists_exactly_the_changes(store: MetaStore) {
    let ws = store.create_workspace("diff").await.unwrap();
    record(&store, &["k", "m1", "m2", "g", "n", "f1", "f2", "t"]).await;
    commit(
        &store,
        &ws,
        vec![dir("d"), file("d/keep", "k"), file("d/mod", "m1"), file("d/gone", "g"), file("flip", "f1")],
    )
    .await;
    commit(&store, &ws, vec![file("d/mod", "m2"), del("d/gone"), file("d/new", "n"), file("flip", "f2")]).await;
    commit(&store, &ws, vec![file("flip", "f1"), file("tmp", "t")]).await; // flip changed back
    commit(&store, &ws, vec![del("tmp")]).await; // tmp added and removed
    let mut chmod = file_entry("d/keep", "k");
    chmod.mode = 0o755;
    commit(&store, &ws, vec![Change::Put(chmod.clone())]).await; // v5: mode only

    let summary = |d: Vec<DiffEntry>| {
        d.into_iter()
            .map(|e| (e.path, e.change, e.old.and_then(|o| o.hash), e.new.and_then(|n| n.hash)))
            .collect::<Vec<_>>()
    };
    use DiffKind::*;
    assert_eq!(
        summary(store.diff(ws.id, 1, 2).await.unwrap()),
        [
            ("d/gone".into(), Deleted, Some(h("g")), None),
            ("d/mod".into(), Modified, Some(h("m1")), Some(h("m2"))),
            ("d/new".into(), Added, None, Some(h("n"))),
            ("flip".into(), Modified, Some(h("f1")), Some(h("f2"))),
        ]
    );
    assert_eq!(
        summary(store.diff(ws.id, 2, 3).await.unwrap()),
        [("flip".into(), Modified, Some(h("f2")), Some(h("f1"))), ("tmp".into(), Added, None, Some(h("t")))]
    );
    let without_flip = [
        ("d/gone".into(), Deleted, Some(h("g")), None),
        ("d/mod".into(), Modified, Some(h("m1")), Some(h("m2"))),
        ("d/new".into(), Added, None, Some(h("n"))),
    ];
    // flip changed and changed back: not listed.
    let mut with_tmp = without_flip.to_vec();
    with_tmp.push(("tmp".into(), Added, None, Some(h("t"))));
    assert_eq!(summary(store.diff(ws.id, 1, 3).await.unwrap()), with_tmp);
    // ...and tmp, added then deleted in between, is not listed either.
    assert_eq!(summary(store.diff(ws.id, 1, 4).await.unwrap()), without_flip);
    assert_eq!(
        summary(store.diff(ws.id, 2, 4).await.unwrap()),
        [("flip".into(), Modified, Some(h("f2")), Some(h("f1")))]
    );
    assert!(store.diff(ws.id, 3, 3).await.unwrap().is_empty());

    // A mode change is a modification, with both sides given in full.
    let d = store.diff(ws.id, 4, 5).await.unwrap();
    assert_eq!(d.len(), 1);
    assert_eq!(
        (d[0].change, d[0].old.clone(), d[0].new.clone()),
        (Modified, Some(file_entry("d/keep", "k")), Some(chmod))
    );

    // From the empty version 0, everything is added.
    let all = store.diff(ws.id, 0, 1).await.unwrap();
    assert_eq!(all.iter().map(|e| e.path.as_str()).collect::<Vec<_>>(), ["d", "d/gone", "d/keep", "d/mod", "flip"]);
    assert!(all.iter().all(|e| e.change == Added && e.old.is_none()));

    assert!(matches!(store.diff(ws.id, 3, 2).await, Err(MetaError::Invalid(_))));
}

async fn case_stale_parent_conflicts_and_changes_nothing(store: MetaStore) {
    let ws = store.create_workspace("stale").await.unwrap();
    record(&store, &["1", "2"]).await;
    commit(&store, &ws, vec![file("f", "1")]).await;
    let before = snapshot(&store, &ws).await;

    for parent in [0, 2, 7] {
        let err = store.commit(&ws, input(parent, vec![file("g", "2")])).await.unwrap_err();
        assert!(
            matches!(&err, MetaError::Conflict(m) if m.contains(&format!("parent version {parent}")) && m.contains("head is 1")),
            "{err:?}"
        );
    }
    assert_eq!(snapshot(&store, &ws).await, before);

    // The right parent still works afterwards.
    assert_eq!(store.commit(&ws, input(1, vec![file("g", "2")])).await.unwrap().version, 2);
}

async fn case_missing_blobs_change_nothing(store: MetaStore) {
    let ws = store.create_workspace("missing").await.unwrap();
    record(&store, &["known"]).await;

    // On an empty workspace: the head stays 0.
    let err = commit_err(&store, &ws, vec![file("a", "u1")]).await;
    assert!(matches!(&err, MetaError::MissingBlobs(m) if m == &[h("u1")]), "{err:?}");
    assert_eq!(store.workspace("missing").await.unwrap().info.head, 0);
    assert!(store.versions(&ws, 10, None).await.unwrap().is_empty());

    commit(&store, &ws, vec![file("k", "known")]).await;
    let before = snapshot(&store, &ws).await;
    let err = commit_err(
        &store,
        &ws,
        vec![
            file("c_u2", "u2"),
            file("a_u1", "u1"),
            file("b_known", "known"),
            file("d_u1_again", "u1"),
            symlink("e_u3", "u3"),
        ],
    )
    .await;
    // Each missing hash once, in path order.
    assert!(matches!(&err, MetaError::MissingBlobs(m) if m == &[h("u1"), h("u2"), h("u3")]), "{err:?}");
    assert_eq!(snapshot(&store, &ws).await, before);

    record(&store, &["u1", "u2", "u3"]).await;
    let v = commit(&store, &ws, vec![file("c_u2", "u2"), file("a_u1", "u1"), symlink("e_u3", "u3")]).await;
    assert_eq!(v.version, 2);
}

async fn case_tree_rule_violations_change_nothing(store: MetaStore) {
    let ws = store.create_workspace("rules").await.unwrap();
    record(&store, &["x", "y"]).await;
    commit(&store, &ws, vec![dir("d"), file("d/f", "x"), file("top", "x"), dir("empty"), symlink("link", "y")]).await;
    let before = snapshot(&store, &ws).await;

    let cases: Vec<(&str, Vec<Change>, &str)> = vec![
        ("file under a file", vec![file("top/x", "x")], "top/x"),
        ("file under a symlink", vec![file("link/x", "x")], "link/x"),
        ("delete of a non-empty dir", vec![del("d")], "d"),
        ("dir replaced by a file while it has children", vec![file("d", "x")], "d"),
        ("missing parent dir", vec![file("nodir/x", "x")], "nodir"),
        ("missing intermediate dir", vec![dir("a"), file("a/b/c", "x")], "a/b"),
        ("parent deleted in the same commit", vec![del("empty"), file("empty/x", "x")], "empty/x"),
        ("delete of an absent path", vec![del("nope")], "nope"),
        ("valid change plus a bad one", vec![file("ok", "x"), del("nope")], "nope"),
        ("duplicate path", vec![file("dup", "x"), file("dup", "y")], "dup"),
        ("duplicate path, put and delete", vec![file("top", "y"), del("top")], "top"),
        ("empty commit", vec![], "at least one change"),
    ];
    for (what, changes, named) in cases {
        let err = commit_err(&store, &ws, changes).await;
        assert!(matches!(&err, MetaError::Invalid(m) if m.contains(named)), "{what}: {err:?}");
        assert_eq!(snapshot(&store, &ws).await, before, "{what}");
    }
}

async fn case_tree_rules_allow_valid_restructuring(store: MetaStore) {
    let ws = store.create_workspace("restructure").await.unwrap();
    record(&store, &["x"]).await;
    commit(
        &store,
        &ws,
        vec![dir("d"), dir("d/e"), file("d/e/f", "x"), file("d/g", "x"), file("top", "x"), dir("empty")],
    )
    .await;

    // A directory deleted together with everything below it.
    commit(&store, &ws, vec![del("d/e/f"), del("d/e"), del("d/g"), del("d")]).await;
    // Nested directories and a file created in one commit.
    commit(&store, &ws, vec![file("a/b/c", "x"), dir("a/b"), dir("a")]).await;
    // A file replaced by a directory with a child; an empty directory replaced by a file.
    commit(&store, &ws, vec![dir("top"), file("top/inner", "x"), file("empty", "x")]).await;

    let head = store.resolve_version(&ws, VersionRef::Head).await.unwrap();
    assert_eq!(head, 4);
    assert_eq!(paths(&tree(&store, &ws, head).await), ["a", "a/b", "a/b/c", "empty", "top", "top/inner"]);
    assert_eq!(store.entry(ws.id, head, &p("top")).await.unwrap().unwrap().kind, EntryKind::Dir);
    assert_eq!(store.entry(ws.id, head, &p("empty")).await.unwrap().unwrap().kind, EntryKind::File);
}

async fn case_identical_put_is_a_noop(store: MetaStore) {
    let ws = store.create_workspace("noop").await.unwrap();
    record(&store, &["x", "y"]).await;
    commit(&store, &ws, vec![dir("d"), file("d/a", "x")]).await;
    let rows = store.entry_rows(ws.id).await.unwrap();

    let v2 = commit(&store, &ws, vec![dir("d"), file("d/a", "x")]).await;
    assert_eq!((v2.version, v2.changes, v2.file_count), (2, 0, 1));
    assert_eq!(store.entry_rows(ws.id).await.unwrap(), rows);
    assert!(store.diff(ws.id, 1, 2).await.unwrap().is_empty());
    assert_eq!(store.history(ws.id, &p("d/a")).await.unwrap().len(), 1);

    // Mixed with a real change, only the real change counts.
    let v3 = commit(&store, &ws, vec![file("d/a", "x"), file("d/b", "y")]).await;
    assert_eq!((v3.changes, v3.file_count), (1, 2));
    assert_eq!(store.entry_rows(ws.id).await.unwrap(), rows + 1);
}

async fn case_list_dir(store: MetaStore) {
    let ws = store.create_workspace("ls").await.unwrap();
    record(&store, &["x"]).await;
    commit(
        &store,
        &ws,
        vec![
            dir("src"),
            dir("src/sub"),
            file("src/b", "x"),
            file("src/a", "x"),
            file("src/sub/c", "x"),
            file("top", "x"),
            dir("empty"),
        ],
    )
    .await;
    commit(&store, &ws, vec![del("src/b"), file("src/0", "x")]).await;

    assert_eq!(paths(&store.list_dir(ws.id, 1, None).await.unwrap()), ["empty", "src", "top"]);
    assert_eq!(paths(&store.list_dir(ws.id, 1, Some(&p("src"))).await.unwrap()), ["src/a", "src/b", "src/sub"]);
    assert_eq!(paths(&store.list_dir(ws.id, 2, Some(&p("src"))).await.unwrap()), ["src/0", "src/a", "src/sub"]);
    assert_eq!(store.list_dir(ws.id, 2, Some(&p("src/sub"))).await.unwrap(), [file_entry("src/sub/c", "x")]);
    assert!(store.list_dir(ws.id, 2, Some(&p("empty"))).await.unwrap().is_empty());
    assert!(matches!(store.list_dir(ws.id, 2, Some(&p("top"))).await, Err(MetaError::Invalid(m)) if m.contains("top")));
    assert!(
        matches!(store.list_dir(ws.id, 2, Some(&p("nope"))).await, Err(MetaError::NotFound(m)) if m.contains("nope"))
    );
    assert!(not_found(store.list_dir(ws.id, 2, Some(&p("src/b"))).await));
}

async fn case_history_of_one_path(store: MetaStore) {
    let ws = store.create_workspace("hist").await.unwrap();
    record(&store, &["1", "2", "3", "o"]).await;
    commit(&store, &ws, vec![file("f", "1")]).await; // v1
    commit(&store, &ws, vec![file("other", "o")]).await; // v2
    commit(&store, &ws, vec![file("f", "2")]).await; // v3
    commit(&store, &ws, vec![del("f")]).await; // v4
    commit(&store, &ws, vec![file("f", "3")]).await; // v5

    let history = store.history(ws.id, &p("f")).await.unwrap();
    let got: Vec<_> = history.iter().map(|r| (r.from_version, r.until_version, r.entry.hash)).collect();
    assert_eq!(got, [(1, Some(3), Some(h("1"))), (3, Some(4), Some(h("2"))), (5, None, Some(h("3")))]);
    assert!(history.iter().all(|r| r.entry.path == p("f")));
    assert!(not_found(store.history(ws.id, &p("never")).await));
}

async fn case_file_count_and_total_bytes(store: MetaStore) {
    let ws = store.create_workspace("counts").await.unwrap();
    record(&store, &["0123456789", "abcde", "b", "xyz", "seven77"]).await;
    // Files and symlinks count, directories do not.
    let v1 =
        commit(&store, &ws, vec![dir("d"), file("d/a", "0123456789"), file("b", "abcde"), symlink("l", "b")]).await;
    assert_eq!((v1.file_count, v1.total_bytes), (3, 16));
    let v2 = commit(&store, &ws, vec![file("d/a", "xyz"), del("b")]).await;
    assert_eq!((v2.file_count, v2.total_bytes), (2, 4));
    let v3 = commit(&store, &ws, vec![del("l"), file("c", "seven77"), dir("e")]).await;
    assert_eq!((v3.file_count, v3.total_bytes), (2, 10));

    let row = store.workspace("counts").await.unwrap();
    assert_eq!((row.info.head, row.info.file_count, row.info.total_bytes), (3, 2, 10));
    let listed = store.list_workspaces().await.unwrap();
    assert_eq!((listed[0].info.file_count, listed[0].info.total_bytes), (2, 10));
    let v1 = store.version(&ws, 1).await.unwrap();
    assert_eq!((v1.file_count, v1.total_bytes, v1.changes), (3, 16, 4));
    let v2 = store.version(&ws, 2).await.unwrap();
    assert_eq!((v2.file_count, v2.total_bytes, v2.changes), (2, 4, 2));
}

async fn case_commit_rows_are_o_changes(store: MetaStore) {
    let ws = store.create_workspace("big").await.unwrap();
    record(&store, &["x", "y"]).await;
    let mut changes = Vec::new();
    for d in 0..20 {
        changes.push(dir(&format!("dir{d:02}")));
        for f in 0..100 {
            changes.push(file(&format!("dir{d:02}/file{f:03}"), "x"));
        }
    }
    let v1 = commit(&store, &ws, changes).await;
    assert_eq!((v1.changes, v1.file_count), (2020, 2000));
    assert_eq!(store.entry_rows(ws.id).await.unwrap(), 2020);

    // Adding one file inserts exactly one row.
    commit(&store, &ws, vec![file("dir07/new", "y")]).await;
    assert_eq!(store.entry_rows(ws.id).await.unwrap(), 2021);
    // Changing one file closes its row and inserts one.
    commit(&store, &ws, vec![file("dir03/file050", "y")]).await;
    assert_eq!(store.entry_rows(ws.id).await.unwrap(), 2022);
    // Deleting one file inserts nothing.
    let v4 = commit(&store, &ws, vec![del("dir19/file099")]).await;
    assert_eq!(store.entry_rows(ws.id).await.unwrap(), 2022);
    assert_eq!((v4.changes, v4.file_count), (1, 2000));
}

async fn case_concurrent_commits_one_wins(store: MetaStore) {
    let ws = store.create_workspace("race").await.unwrap();
    let contents: Vec<String> = (0..8).map(|i| format!("c{i}")).collect();
    record(&store, &["base"]).await;
    record(&store, &contents.iter().map(String::as_str).collect::<Vec<_>>()).await;
    commit(&store, &ws, vec![file("base", "base")]).await;

    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(8));
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let (store, ws, barrier) = (store.clone(), ws.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                store.commit(&ws, input(1, vec![file(&format!("f{i}"), &format!("c{i}"))])).await
            })
        })
        .collect();
    let mut won = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await.unwrap() {
            Ok(v) => {
                assert_eq!(v.version, 2);
                won.push(i);
            }
            Err(MetaError::Conflict(m)) => assert!(m.contains("head is 2"), "{m}"),
            Err(e) => panic!("task {i}: unexpected {e:?}"),
        }
    }
    assert_eq!(won.len(), 1, "exactly one commit must win");
    let head = store.workspace("race").await.unwrap().info;
    assert_eq!((head.head, head.file_count), (2, 2));
    assert_eq!(store.versions(&ws, 10, None).await.unwrap().len(), 2);
    assert_eq!(paths(&tree(&store, &ws, 2).await), ["base".to_string(), format!("f{}", won[0])]);
}

async fn case_tokens(store: MetaStore) {
    let a = store.create_workspace("a").await.unwrap();
    let b = store.create_workspace("b").await.unwrap();
    let t1 = store.create_token(&a, Right::Read, Some("ci")).await.unwrap();
    let t2 = store.create_token(&a, Right::Write, None).await.unwrap();
    let t3 = store.create_token(&b, Right::Admin, Some("ops")).await.unwrap();
    assert_ne!(t1, t2);
    for t in [&t1, &t2, &t3] {
        let hex = t.strip_prefix("pfs_").unwrap();
        assert!(hex.len() == 64 && hex.bytes().all(|c| c.is_ascii_hexdigit()), "{t}");
    }

    let r1 = store.token(&t1).await.unwrap().unwrap();
    assert_eq!((r1.workspace_id, r1.workspace.as_str(), r1.right), (a.id, "a", Right::Read));
    assert_eq!(store.token(&t2).await.unwrap().unwrap().right, Right::Write);
    let r3 = store.token(&t3).await.unwrap().unwrap();
    assert_eq!((r3.workspace_id, r3.right), (b.id, Right::Admin));

    assert!(store.token(&format!("pfs_{}", "0".repeat(64))).await.unwrap().is_none());
    assert!(store.token("").await.unwrap().is_none());
    assert!(store.token(&t1[..t1.len() - 1]).await.unwrap().is_none());

    store.delete_workspace("a").await.unwrap();
    assert!(store.token(&t1).await.unwrap().is_none());
    assert!(store.token(&t2).await.unwrap().is_none());
    assert!(store.token(&t3).await.unwrap().is_some());
    assert!(not_found(store.create_token(&a, Right::Read, None).await));
}

async fn case_blobs_are_idempotent(store: MetaStore) {
    let (h1, h2, h3) = (h("one"), h("two"), h("three"));
    assert!(store.record_blob(&h1, 3, 12).await.unwrap());
    assert!(!store.record_blob(&h1, 3, 12).await.unwrap());
    assert_eq!(store.missing_blobs(&[h2, h1, h3, h2]).await.unwrap(), [h2, h3]);
    assert!(store.record_blob(&h2, 3, 3).await.unwrap());
    assert_eq!(store.missing_blobs(&[h2, h1, h3, h2]).await.unwrap(), [h3]);
    assert!(store.missing_blobs(&[]).await.unwrap().is_empty());

    // More hashes than one statement takes: request order kept across chunks.
    let many: Vec<ContentHash> = (0..1200).map(|i| h(&format!("blob {i}"))).collect();
    for x in many.iter().skip(1).step_by(3) {
        store.record_blob(x, 1, 1).await.unwrap();
    }
    let expected: Vec<ContentHash> = many.iter().enumerate().filter(|(i, _)| i % 3 != 1).map(|(_, x)| *x).collect();
    assert_eq!(store.missing_blobs(&many).await.unwrap(), expected);

    // Referenced by any version, live or not; per workspace.
    let ws = store.create_workspace("refs").await.unwrap();
    let other = store.create_workspace("other").await.unwrap();
    store
        .commit(
            &ws,
            input(
                0,
                vec![Change::Put(Entry { path: p("f"), kind: EntryKind::File, hash: Some(h1), size: 3, mode: 0o644 })],
            ),
        )
        .await
        .unwrap();
    store.commit(&ws, input(1, vec![del("f")])).await.unwrap();
    assert_eq!(store.referenced_by(ws.id, &[h1, h2, h3]).await.unwrap(), HashSet::from([h1]));
    assert!(store.referenced_by(other.id, &[h1, h2]).await.unwrap().is_empty());
    assert!(store.referenced_by(ws.id, &[]).await.unwrap().is_empty());
}

async fn case_tree_streams_20k_entries_sorted(store: MetaStore) {
    let ws = store.create_workspace("huge").await.unwrap();
    record(&store, &["x", "y"]).await;
    let mut changes = Vec::new();
    for d in 0..100 {
        changes.push(dir(&format!("d{d}")));
        for f in 0..199 {
            changes.push(file(&format!("d{d}/f{f}"), "x"));
        }
    }
    let mut expected: Vec<String> = changes.iter().map(|c| c.path().to_string()).collect();
    expected.sort();
    commit(&store, &ws, changes).await;
    commit(&store, &ws, vec![file("d5/f7", "y")]).await;

    for v in [1, 2] {
        let mut count = 0;
        let mut last: Option<String> = None;
        let mut stream = store.tree(ws.id, v);
        while let Some(e) = stream.try_next().await.unwrap() {
            assert_eq!(e.path.as_str(), expected[count]);
            if let Some(last) = &last {
                assert!(last.as_str() < e.path.as_str());
            }
            let want = if v == 2 && e.path.as_str() == "d5/f7" { "y" } else { "x" };
            assert!(e.kind == EntryKind::Dir || e.hash == Some(h(want)), "{}", e.path);
            last = Some(e.path.into_string());
            count += 1;
        }
        assert_eq!(count, 20_000);
        let whole: Vec<Entry> = store.tree_all(ws.id, v).await.unwrap();
        let streamed: Vec<Entry> = store.tree(ws.id, v).try_collect().await.unwrap();
        assert_eq!(whole, streamed, "one statement or pages, the same tree");
    }
    assert!(matches!(store.tree_all(ws.id, 3).await, Err(MetaError::NotFound(_))));
}

/// A bulk commit refreshes the planner's statistics at once (`last_analyze` is only set by an
/// explicit ANALYZE, never by autovacuum); small commits do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pg_bulk_commit_refreshes_planner_statistics() {
    with_postgres_url(|url| async move {
        let store = MetaStore::connect(&url).await.unwrap();
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        let ws = store.create_workspace("bulk").await.unwrap();
        record(&store, &["x"]).await;
        commit(&store, &ws, vec![file("small", "x")]).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let analyzed = "SELECT last_analyze IS NOT NULL FROM pg_stat_user_tables WHERE relname = 'entries'";
        let done: bool = sqlx::query_scalar(analyzed).fetch_one(&mut conn).await.unwrap();
        assert!(!done, "a one-row commit must not ANALYZE");

        let n = podfs_gateway::meta::BULK_COMMIT_ROWS as usize;
        commit(&store, &ws, (0..n).map(|i| file(&format!("f{i}"), "x")).collect()).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let done: bool = sqlx::query_scalar(analyzed).fetch_one(&mut conn).await.unwrap();
            if done {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no ANALYZE 20 s after a commit of {n} rows");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

async fn case_paths_sort_bytewise(store: MetaStore) {
    let ws = store.create_workspace("order").await.unwrap();
    record(&store, &["x"]).await;
    let names = ["B", "a", "a b", "a-b", "a.b", "a0", "é", "z", "_u", "Ä"];
    let mut changes: Vec<Change> = names.iter().filter(|n| **n != "a").map(|n| file(n, "x")).collect();
    changes.push(dir("a"));
    changes.push(file("a/x", "x"));
    commit(&store, &ws, changes).await;

    let mut expected: Vec<&str> = names.to_vec();
    expected.push("a/x");
    expected.sort(); // Rust orders strings bytewise
    assert_eq!(paths(&tree(&store, &ws, 1).await), expected);
    let top: Vec<&str> = expected.iter().copied().filter(|n| !n.contains('/')).collect();
    assert_eq!(paths(&store.list_dir(ws.id, 1, None).await.unwrap()), top);
    let diff: Vec<String> = store.diff(ws.id, 0, 1).await.unwrap().into_iter().map(|d| d.path).collect();
    assert_eq!(diff, expected);
}

async fn case_delete_workspace_removes_everything(store: MetaStore) {
    let ws = store.create_workspace("doomed").await.unwrap();
    let keep = store.create_workspace("kept").await.unwrap();
    record(&store, &["x"]).await;
    commit(&store, &ws, vec![dir("d"), file("d/f", "x")]).await;
    commit(&store, &ws, vec![file("g", "x")]).await;
    commit(&store, &keep, vec![file("k", "x")]).await;
    let token = store.create_token(&ws, Right::Write, None).await.unwrap();
    assert_eq!(store.entry_rows(ws.id).await.unwrap(), 3);

    store.delete_workspace("doomed").await.unwrap();
    assert_eq!(store.entry_rows(ws.id).await.unwrap(), 0);
    assert!(store.versions(&ws, 10, None).await.unwrap().is_empty());
    assert!(store.token(&token).await.unwrap().is_none());
    assert!(not_found(store.resolve_version(&ws, VersionRef::Head).await));
    let gone: Result<Vec<Entry>, MetaError> = store.tree(ws.id, 1).try_collect().await;
    assert!(not_found(gone));
    // A commit through a stale handle finds no workspace.
    assert!(not_found(store.commit(&ws, input(2, vec![file("h", "x")])).await));
    // Blobs are shared by content and stay.
    assert!(store.missing_blobs(&[h("x")]).await.unwrap().is_empty());
    // The other workspace is untouched.
    assert_eq!(paths(&tree(&store, &keep, 1).await), ["k"]);

    let again = store.create_workspace("doomed").await.unwrap();
    assert_ne!(again.id, ws.id);
    assert_eq!(again.info.head, 0);
    assert_eq!(store.entry_rows(again.id).await.unwrap(), 0);
}
