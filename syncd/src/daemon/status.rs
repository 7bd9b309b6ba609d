//! The daemon's state as `DIR/.podfs/syncd-status.json` (rewritten atomically whenever it
//! changes) and `podfs status DIR`, which reads it. A daemon holds `DIR/.podfs/syncd.lock`
//! while it runs; a status whose lock is free belongs to a daemon that is gone.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::cli::Output;
use crate::rules::STATE_DIR;

pub const STATUS_FILE: &str = "syncd-status.json";
pub const LOCK_FILE: &str = "syncd.lock";
/// Conflicts kept in the status (newest last).
const MAX_CONFLICTS: usize = 50;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub workspace: String,
    pub dir: PathBuf,
    /// starting, hydrating, watching, committing, offline, stopped.
    pub state: String,
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
    /// Unix seconds of this status.
    pub updated_at: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CommitRecord {
    pub version: u64,
    pub changes: usize,
    pub trigger: String,
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
        crate::hydrate::replace_state_file(dir, STATUS_FILE, &body)
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Takes `DIR/.podfs/syncd.lock` for the life of the returned file; fails when another daemon
/// holds it.
pub fn lock(dir: &Path) -> anyhow::Result<File> {
    let path = dir.join(STATE_DIR).join(LOCK_FILE);
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
fn running(dir: &Path) -> bool {
    let Ok(f) = File::open(dir.join(STATE_DIR).join(LOCK_FILE)) else { return false };
    matches!(f.try_lock_shared(), Err(std::fs::TryLockError::WouldBlock))
}

/// `podfs status DIR`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// A directory synced by `podfs syncd`.
    pub dir: PathBuf,
}

pub fn run(args: StatusArgs, out: &mut Output<'_>) -> anyhow::Result<()> {
    let path = args.dir.join(STATE_DIR).join(STATUS_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow::anyhow!("{} is not synced by podfs syncd (no {})", args.dir.display(), path.display())
        } else {
            anyhow::Error::new(e).context(format!("cannot read {}", path.display()))
        }
    })?;
    let mut status: Status = serde_json::from_str(&text).with_context(|| format!("{} is damaged", path.display()))?;
    if !running(&args.dir) && status.state != "stopped" {
        status.state = "not running".into();
    }
    out.json_or(&status, |w| {
        writeln!(w, "workspace {} in {}", status.workspace, status.dir.display())?;
        writeln!(w, "daemon:    {} (pid {})", status.state, status.pid)?;
        writeln!(w, "head:      version {}", status.head_version)?;
        writeln!(w, "pending:   {} changed path(s) not yet committed", status.pending_changes)?;
        writeln!(w, "tracked:   {} path(s), {} watched directories", status.tracked_paths, status.watched_dirs)?;
        match &status.last_commit {
            Some(c) => writeln!(
                w,
                "last save: version {} ({} change(s), {}) committed {} ms after the change",
                c.version, c.changes, c.trigger, c.latency_ms
            )?,
            None => writeln!(w, "last save: none since start")?,
        }
        if let Some(e) = &status.last_error {
            writeln!(w, "error:     {e}")?;
        }
        for c in &status.conflicts {
            match c.our_version {
                Some(v) => writeln!(
                    w,
                    "conflict:  {} changed by another writer in version {}; ours is version {v}",
                    c.path, c.their_version
                )?,
                None => writeln!(w, "conflict:  {} changed by another writer in version {}", c.path, c.their_version)?,
            }
        }
        Ok(())
    })
}
