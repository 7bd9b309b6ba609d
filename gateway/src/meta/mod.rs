//! The metadata store: workspaces, versions, path intervals, verified blobs and bearer tokens,
//! kept in PostgreSQL (production) or SQLite (embedded default) through one sqlx `Any` code
//! path.
//!
//! What it does: connects and runs the migrations of `migrations/postgres` or
//! `migrations/sqlite` (chosen by URL scheme); commits a version as one transaction that
//! compare-and-sets the workspace head and enforces the closed-tree rules (`commit.rs`); reads
//! the tree, a directory, a diff or a path's history as of any version (`tree.rs`); records
//! verified blobs (`blobs.rs`); records built manifests and build claims (`manifests.rs`);
//! creates and looks up tokens (`tokens.rs`).
//!
//! What it does not do: validate workspace names or path syntax (callers hold `WsPath` and
//! check names with `valid_workspace_name`), move or verify blob bytes (the blob store does),
//! map errors to HTTP statuses (the API's error module does), cache, or log errors (they are
//! returned to the caller, which handles them; the one exception is the background `ANALYZE`
//! after a bulk commit, whose failure only costs plan quality).
//!
//! Every statement is portable: `$N` placeholders, integers bound and read as `i64`, hashes as
//! 32-byte blobs, times as unix milliseconds, no booleans, no arrays, no database-specific
//! locking. Multi-row statements are cut into chunks of 500 rows to stay far below the
//! bind-parameter limits (SQLite 32766, PostgreSQL 65535).

mod blobs;
mod commit;
mod manifests;
mod peers;
mod sql;
mod tokens;
mod tree;
mod workspaces;

use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use sqlx::any::AnyPoolOptions;
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::{AnyPool, Executor};

pub use blobs::{BlobRow, NewPack};
pub use manifests::ManifestRow;
pub use peers::{HolderRow, PeerSeat, PlanTerms};

/// The current time in unix milliseconds, as the store records times.
pub fn now_unix_ms() -> i64 {
    sql::now_ms()
}
pub use podfs_protocol::api::{DiffEntry, DiffKind, PathRevision, Right, VersionInfo, Workspace};
pub use podfs_protocol::{Change, ContentHash, Entry, VersionRef, WsPath};

/// `until_version` of an entry row that is still current (i64::MAX).
pub const LIVE: i64 = i64::MAX;

/// Most connections a PostgreSQL pool opens.
const PG_MAX_CONNECTIONS: u32 = 16;
/// Most connections a SQLite pool opens (readers run in parallel under WAL; writers queue).
const SQLITE_MAX_CONNECTIONS: u32 = 8;
/// How long a query waits for a free connection before the store reports `Unavailable`.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a SQLite statement waits for another connection's write lock.
const SQLITE_BUSY_TIMEOUT_MS: u32 = 10_000;

static PG_MIGRATOR: Migrator = sqlx::migrate!("../migrations/postgres");
static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("../migrations/sqlite");
static INSTALL_DRIVERS: Once = Once::new();

/// Everything the metadata store can fail with. The first four carry a message for humans
/// naming the problem; the database failures keep the sqlx error as their source.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// Unknown workspace, version or path.
    #[error("{0}")]
    NotFound(String),
    /// Workspace name taken; commit parent no longer the head (the message names the head).
    #[error("{0}")]
    Conflict(String),
    /// A request that breaks the rules: empty commit, duplicate path, tree-rule violation, ...
    #[error("{0}")]
    Invalid(String),
    /// The commit references blobs that are not stored (each once, in path order).
    #[error("commit references {} blob(s) the gateway does not hold: {}", .0.len(), sql::hash_list(.0))]
    MissingBlobs(Vec<ContentHash>),
    /// The database is unreachable, overloaded or timed out: worth retrying later.
    #[error("metadata database unavailable")]
    Unavailable(#[source] sqlx::Error),
    /// The database refused a statement for another reason: a bug or a schema mismatch.
    #[error("metadata database error")]
    Database(#[source] sqlx::Error),
    /// The schema could not be brought up to date.
    #[error("metadata schema migration failed")]
    Migration(#[source] MigrateError),
    /// The stored data breaks the store's own rules (a row it cannot have written, live rows
    /// that changed under a commit): a bug or tampering, not the caller's mistake.
    #[error("metadata store inconsistent: {0}")]
    Inconsistent(String),
}

impl From<sqlx::Error> for MetaError {
    fn from(e: sqlx::Error) -> Self {
        if sql::is_transient(&e) { MetaError::Unavailable(e) } else { MetaError::Database(e) }
    }
}

impl From<MigrateError> for MetaError {
    fn from(e: MigrateError) -> Self {
        match e {
            MigrateError::Execute(e) => e.into(),
            e => MetaError::Migration(e),
        }
    }
}

/// A workspace and its database id (the id is what the per-workspace methods take).
#[derive(Debug, Clone)]
pub struct WorkspaceRow {
    pub id: i64,
    pub info: Workspace,
}

/// What a bearer token grants.
#[derive(Debug, Clone)]
pub struct TokenRow {
    pub workspace_id: i64,
    pub workspace: String,
    pub right: Right,
}

/// One commit request, validated at the type level (`WsPath`, `Entry`) by the caller.
#[derive(Debug, Clone)]
pub struct CommitInput {
    /// Must be the current head (0 for an empty workspace).
    pub parent_version: u64,
    pub message: String,
    pub author: String,
    pub changes: Vec<Change>,
}

/// Handle on the metadata database. Cheap to clone (it is a connection pool).
#[derive(Debug, Clone)]
pub struct MetaStore {
    pool: AnyPool,
    postgres: bool,
    /// This process's refreshes of the planner's statistics.
    analyzed: Arc<Mutex<Analyzed>>,
}

/// When this process last started an `ANALYZE`, and whether it is still running.
#[derive(Debug, Default)]
struct Analyzed {
    last: Option<Instant>,
    running: bool,
}

/// A commit that changes at least this many paths on PostgreSQL refreshes the planner's
/// statistics of `entries` and `blobs` (`ANALYZE`, in the background)...
pub const BULK_COMMIT_ROWS: i64 = 1_000;
/// ...one at a time, and at most this often per process.
const ANALYZE_EVERY: Duration = Duration::from_secs(5);

impl MetaStore {
    /// Connects to `postgres://...`, `postgresql://...` or `sqlite://...` and brings the schema
    /// up to date. A SQLite file is created if missing (`mode=rwc` unless the URL sets a mode)
    /// and runs in WAL mode with `synchronous=NORMAL` and a 10 s busy timeout. In-memory SQLite
    /// is refused (`Invalid`).
    pub async fn connect(url: &str) -> Result<Self, MetaError> {
        INSTALL_DRIVERS.call_once(sqlx::any::install_default_drivers);
        let postgres = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            true
        } else if url.starts_with("sqlite:") {
            false
        } else {
            let scheme = url.split(':').next().unwrap_or_default();
            return Err(MetaError::Invalid(format!(
                "unsupported metadata database URL scheme {scheme:?}: expected postgres://, postgresql:// or sqlite://"
            )));
        };
        let store = if postgres {
            let pool = AnyPoolOptions::new()
                .max_connections(PG_MAX_CONNECTIONS)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect(url)
                .await
                .map_err(connect_error)?;
            PG_MIGRATOR.run(&pool).await?;
            MetaStore { pool, postgres, analyzed: Arc::default() }
        } else {
            if url.contains(":memory:") || url.contains("mode=memory") {
                // Each pooled connection would open its own, empty database.
                return Err(MetaError::Invalid(
                    "in-memory SQLite is not supported: use a file (in a temporary directory for tests)".into(),
                ));
            }
            let url = if url.contains("mode=") {
                url.to_string()
            } else if url.contains('?') {
                format!("{url}&mode=rwc")
            } else {
                format!("{url}?mode=rwc")
            };
            let pool = AnyPoolOptions::new()
                .max_connections(SQLITE_MAX_CONNECTIONS)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        conn.execute(sqlx::AssertSqlSafe(format!("PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")))
                            .await?;
                        conn.execute("PRAGMA synchronous = NORMAL").await?;
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                        Ok(())
                    })
                })
                .connect(&url)
                .await
                .map_err(connect_error)?;
            // Persistent in the file: once is enough, and it must precede the first write.
            pool.execute("PRAGMA journal_mode = WAL").await?;
            SQLITE_MIGRATOR.run(&pool).await?;
            MetaStore { pool, postgres, analyzed: Arc::default() }
        };
        Ok(store)
    }

    /// True when the store runs on PostgreSQL, false on SQLite.
    pub fn is_postgres(&self) -> bool {
        self.postgres
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), MetaError> {
        self.pool.execute("SELECT 1").await?;
        Ok(())
    }

    /// After a bulk commit on PostgreSQL: `ANALYZE entries, blobs` in the background, unless
    /// one is running or this process started one less than [`ANALYZE_EVERY`] ago.
    ///
    /// Autovacuum analyzes a table only after a tenth of it changed and up to a minute later.
    /// Until then the planner takes a workspace that just received thousands of rows for an
    /// empty one (its statistics know only the other workspaces, or nothing), and every plan
    /// that filters on it costs a scan of the whole workspace:
    /// - a tree page (1,000 rows) scanned the whole version: 20-50 ms instead of 0.6 ms;
    /// - the commit's per-path probes used `entries_from` on `workspace_id` alone, filtering
    ///   every row of the workspace for each path: 500 probes against 2,300 rows took 240 ms
    ///   instead of 2 ms, and a 20,000-file burst into a workspace that already held 19,000
    ///   rows took 92 s to commit instead of about 4 s.
    ///
    /// `ANALYZE` samples a bounded number of rows (0.1-0.4 s here) and takes a lock that blocks
    /// neither reads nor writes. A failure only costs plan quality, so it is logged, not
    /// returned.
    fn refresh_statistics(&self) {
        if !self.postgres {
            return;
        }
        {
            let mut a = self.analyzed.lock().unwrap_or_else(|e| e.into_inner());
            if a.running || a.last.is_some_and(|t| t.elapsed() < ANALYZE_EVERY) {
                return;
            }
            (a.running, a.last) = (true, Some(Instant::now()));
        }
        let (pool, analyzed) = (self.pool.clone(), Arc::clone(&self.analyzed));
        tokio::spawn(async move {
            match pool.execute("ANALYZE entries, blobs").await {
                Ok(_) => metrics::counter!("podfs_meta_analyze_total").increment(1),
                Err(e) => tracing::warn!(error = %e, "ANALYZE after a bulk commit failed"),
            }
            analyzed.lock().unwrap_or_else(|e| e.into_inner()).running = false;
        });
    }

    /// Interval rows stored for a workspace across all its versions: a storage statistic (it
    /// grows by the number of changed paths per commit, whatever the tree size).
    pub async fn entry_rows(&self, ws_id: i64) -> Result<u64, MetaError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM entries WHERE workspace_id = $1")
            .bind(ws_id)
            .fetch_one(&self.pool)
            .await?;
        sql::to_u64(n, "row count")
    }
}

/// Connection-time errors: a malformed URL is a configuration problem, the rest as usual.
fn connect_error(e: sqlx::Error) -> MetaError {
    match e {
        sqlx::Error::Configuration(e) => MetaError::Invalid(format!("bad metadata database URL: {e}")),
        e => e.into(),
    }
}
