//! The layout of `DIR/.podfs`: what a pull and the syncd daemon keep beside the tree. Nothing
//! in it is ever part of the tree (the rules exclude it), and this module is the only place
//! that spells its names.
//!
//! - `state.json`: which workspace and version DIR holds (written by pull and syncd);
//! - `syncd.sqlite`: the daemon's index and base; `syncd-status.json`: its status;
//!   `syncd.lock`: held while a daemon runs;
//! - `stage-*`: staging directories of fresh pulls (removed by the next pull when left over).
//!
//! Temporary files of in-place writes sit next to their target as `.podfs-tmp-*`
//! ([`TEMP_PREFIX`]), which the rules exclude too.

use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// Top-level directory that is never part of the tree.
pub const STATE_DIR: &str = ".podfs";
/// Prefix of temporary files written next to their target.
pub const TEMP_PREFIX: &str = ".podfs-tmp-";

const PULL_STATE: &str = "state.json";
const INDEX: &str = "syncd.sqlite";
/// The daemon's status file in the state directory.
pub const STATUS_FILE: &str = "syncd-status.json";
const LOCK: &str = "syncd.lock";
const STAGE_PREFIX: &str = "stage-";

/// What DIR holds, per `state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullState {
    pub workspace: String,
    pub version: u64,
}

/// `DIR/.podfs` of one DIR.
#[derive(Debug, Clone)]
pub struct StateDir {
    path: PathBuf,
}

impl StateDir {
    pub fn of(dir: &Path) -> Self {
        Self { path: dir.join(STATE_DIR) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates the directory (and DIR) when missing.
    pub fn create(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.path).with_context(|| format!("cannot create {}", self.path.display()))
    }

    pub fn index_path(&self) -> PathBuf {
        self.path.join(INDEX)
    }

    pub fn status_path(&self) -> PathBuf {
        self.path.join(STATUS_FILE)
    }

    pub fn lock_path(&self) -> PathBuf {
        self.path.join(LOCK)
    }

    /// Which workspace and version DIR holds; `None` when no pull or daemon recorded one.
    pub fn read_pull_state(&self) -> anyhow::Result<Option<PullState>> {
        let path = self.path.join(PULL_STATE);
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| format!("{} is damaged", path.display()))?)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Records that DIR holds `ws@version` (atomically).
    pub fn write_pull_state(&self, ws: &str, version: u64) -> anyhow::Result<()> {
        let body = serde_json::to_vec(&PullState { workspace: ws.to_string(), version })?;
        self.replace(PULL_STATE, &body).context("cannot record the pulled version")
    }

    /// Replaces the daemon's status file (atomically).
    pub fn write_status(&self, body: &[u8]) -> anyhow::Result<()> {
        self.replace(STATUS_FILE, body)
    }

    /// Writes `NAME` whole: a temporary file renamed over it, so readers see the old or the
    /// new content, never a part.
    fn replace(&self, name: &str, body: &[u8]) -> anyhow::Result<()> {
        self.create()?;
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .tempfile_in(&self.path)
            .with_context(|| format!("cannot create a file in {}", self.path.display()))?;
        tmp.write_all(body).with_context(|| format!("cannot write {}", tmp.path().display()))?;
        // readable by others, as a plain write would make it (`podfs status` run by another user)
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("cannot set the mode of {}", tmp.path().display()))?;
        let path = self.path.join(name);
        tmp.persist(&path).map_err(|e| e.error).with_context(|| format!("cannot replace {}", path.display()))?;
        Ok(())
    }

    /// Removes the staging directories of interrupted pulls (best effort), then makes a new
    /// one; returns its path relative to DIR.
    pub fn new_stage(&self) -> anyhow::Result<PathBuf> {
        self.create()?;
        if let Ok(entries) = std::fs::read_dir(&self.path) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(STAGE_PREFIX) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let stage = tempfile::Builder::new()
            .prefix(STAGE_PREFIX)
            .tempdir_in(&self.path)
            .context("cannot create the staging directory")?
            .keep();
        let name = stage.file_name().context("a staging directory without a name")?;
        Ok(Path::new(STATE_DIR).join(name))
    }
}

/// Whether the workspace path `rel` is the state directory or inside it.
pub fn is_state_path(rel: &str) -> bool {
    rel == STATE_DIR || rel.strip_prefix(STATE_DIR).is_some_and(|rest| rest.starts_with('/'))
}

/// Whether DIR holds nothing but (maybe) the state directory.
pub fn holds_only_state(dir: &Path) -> io::Result<bool> {
    for e in std::fs::read_dir(dir)? {
        if e?.file_name() != STATE_DIR {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The path (or a parent) disappeared or stopped being a directory while we looked: the
/// usual race with a user editing the tree, not an error.
pub fn gone(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_stages_are_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let s = StateDir::of(tmp.path());
        assert_eq!(s.read_pull_state().unwrap(), None);
        s.write_pull_state("demo", 3).unwrap();
        s.write_pull_state("demo", 4).unwrap();
        assert_eq!(s.read_pull_state().unwrap(), Some(PullState { workspace: "demo".into(), version: 4 }));
        let names: Vec<_> = std::fs::read_dir(s.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, [PULL_STATE], "no temporary file is left");
        assert!(holds_only_state(tmp.path()).unwrap());

        let first = s.new_stage().unwrap();
        assert!(tmp.path().join(&first).is_dir() && first.starts_with(STATE_DIR));
        let second = s.new_stage().unwrap();
        assert!(!tmp.path().join(&first).exists() && tmp.path().join(&second).is_dir());
        std::fs::write(tmp.path().join("f"), b"x").unwrap();
        assert!(!holds_only_state(tmp.path()).unwrap());
        assert!(is_state_path(".podfs") && is_state_path(".podfs/x") && !is_state_path(".podfsx"));
    }
}
