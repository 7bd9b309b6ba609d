//! The daemon's state as `DIR/.podfs/syncd-status.json` (rewritten atomically whenever it
//! changes; `podfs status DIR` reads it). A daemon holds `DIR/.podfs/syncd.lock`
//! while it runs; a status whose lock is free belongs to a daemon that is gone.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

pub use crate::local::state::STATUS_FILE;
use crate::local::state::StateDir;

/// Conflicts kept in the status (newest last).
const MAX_CONFLICTS: usize = 50;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub workspace: String,
    pub dir: PathBuf,
    pub state: DaemonState,
    /// The last version this daemon knows the workspace at (its base).
    pub head_version: u64,
    /// Paths on disk that differ from `head_version`, not yet committed.
    pub pending_changes: usize,
    /// Paths tracked (files, symlinks, directories).
    pub tracked_paths: usize,
    pub watched_dirs: usize,
    pub commits: u64,
    pub last_commit: Option<CommitRecord>,
    pub last_error: Option<String>,
    /// Paths another writer changed while this daemon had unsaved edits to them; both contents
    /// are versions (theirs at `their_version`, ours at `our_version`).
    pub conflicts: Vec<Conflict>,
    /// The cold start that filled an empty DIR, when this daemon did one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_start: Option<ColdStart>,
    /// The peer side, when serving is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers: Option<crate::transfer::peers::PeerReport>,
    /// Unix seconds of this status.
    pub updated_at: u64,
}

/// What the daemon's cold start took.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ColdStart {
    pub version: u64,
    pub seconds: f64,
    pub files: u64,
    pub bytes: u64,
    pub sources: crate::transfer::hydrate::Sources,
}

/// What the daemon is doing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DaemonState {
    #[default]
    Starting,
    /// Writing head into an empty DIR.
    Hydrating,
    /// Up to date with the disk, or waiting for the tree to be quiet.
    Watching,
    /// A commit is in flight.
    Committing,
    /// The last commit failed (gateway unreachable, ...): changes wait on disk, retried later.
    Offline,
    /// Stopped cleanly.
    Stopped,
    /// Set by `podfs status` when the status file's daemon no longer holds the lock.
    #[serde(rename = "not running")]
    NotRunning,
}

impl DaemonState {
    pub fn as_str(self) -> &'static str {
        match self {
            DaemonState::Starting => "starting",
            DaemonState::Hydrating => "hydrating",
            DaemonState::Watching => "watching",
            DaemonState::Committing => "committing",
            DaemonState::Offline => "offline",
            DaemonState::Stopped => "stopped",
            DaemonState::NotRunning => "not running",
        }
    }
}

impl std::fmt::Display for DaemonState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a batch was committed (recorded in the version's message and the status).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// The reconciliation at start found changes made while no daemon ran.
    #[serde(alias = "startup reconciliation")]
    Startup,
    /// Saves noticed by the watcher.
    #[default]
    Save,
    /// A save of at least [`BURST`] paths (`npm install`, `git checkout`).
    Burst,
    /// A whole-tree reconciliation after lost watcher events.
    #[serde(alias = "rescan after lost events")]
    Rescan,
    /// The periodic whole-tree reconciliation.
    #[serde(alias = "periodic reconciliation")]
    Periodic,
    /// The last commit before stopping.
    Shutdown,
}

/// A batch of saves of at least this many paths is a burst.
pub const BURST: usize = 100;

impl Trigger {
    /// What a batch of `changes` paths noticed this way is called: saves of [`BURST`] paths or
    /// more are a burst.
    pub fn for_batch(self, changes: usize) -> Self {
        match self {
            Trigger::Save | Trigger::Burst if changes >= BURST => Trigger::Burst,
            Trigger::Burst => Trigger::Save,
            other => other,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Trigger::Startup => "startup reconciliation",
            Trigger::Save => "save",
            Trigger::Burst => "burst",
            Trigger::Rescan => "rescan after lost events",
            Trigger::Periodic => "periodic reconciliation",
            Trigger::Shutdown => "shutdown",
        }
    }

    /// The message of a version of `changes` paths this trigger made.
    pub fn message(self, changes: usize) -> String {
        format!("syncd: {} ({changes} paths)", self.for_batch(changes).describe())
    }
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CommitRecord {
    pub version: u64,
    pub changes: usize,
    pub trigger: Trigger,
    /// From the first change noticed to the gateway's acknowledgement.
    pub latency_ms: u64,
    pub at: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Conflict {
    pub path: String,
    pub their_version: u64,
    pub our_version: Option<u64>,
    pub at: u64,
}

impl Status {
    pub fn add_conflicts(&mut self, paths: &[String], their_version: u64) {
        let at = unix_now();
        self.conflicts.extend(paths.iter().map(|p| Conflict { path: p.clone(), their_version, our_version: None, at }));
        let extra = self.conflicts.len().saturating_sub(MAX_CONFLICTS);
        self.conflicts.drain(..extra);
    }

    /// Writes the status into `dir`'s state directory (temporary file + rename).
    pub fn write(&mut self, dir: &Path) -> anyhow::Result<()> {
        self.updated_at = unix_now();
        let mut body = serde_json::to_vec_pretty(self)?;
        body.push(b'\n');
        StateDir::of(dir).write_status(&body)
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Takes `DIR/.podfs/syncd.lock` for the life of the returned file; fails when another daemon
/// holds it.
pub fn lock(dir: &Path) -> anyhow::Result<File> {
    let path = StateDir::of(dir).lock_path();
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => {
            anyhow::bail!("another syncd is already running for {} (it holds {})", dir.display(), path.display())
        }
        Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("cannot lock {}", path.display())),
    }
}

/// Whether a daemon holds `dir`'s lock now.
pub fn running(dir: &Path) -> bool {
    let Ok(f) = File::open(StateDir::of(dir).lock_path()) else { return false };
    matches!(f.try_lock_shared(), Err(std::fs::TryLockError::WouldBlock))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_files_of_the_previous_format_still_read() {
        let old = r#"{"pid":1,"workspace":"w","dir":"/w","state":"not running","head_version":3,
            "pending_changes":0,"tracked_paths":2,"watched_dirs":1,"commits":1,
            "last_commit":{"version":3,"changes":2,"trigger":"startup reconciliation","latency_ms":5,"at":1},
            "last_error":null,"conflicts":[],"updated_at":1}"#;
        let s: Status = serde_json::from_str(old).unwrap();
        assert_eq!((s.state, s.last_commit.map(|c| c.trigger)), (DaemonState::NotRunning, Some(Trigger::Startup)));
        let round: Status = serde_json::from_str(&serde_json::to_string(&Status::default()).unwrap()).unwrap();
        assert_eq!(round, Status::default());
    }
}
