//! `podfs status DIR`: what the syncd daemon of DIR is doing, from its status file.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::cli::Output;
use crate::daemon::status::{DaemonState, Status, running};
use crate::local::state::StateDir;

/// `podfs status DIR`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// A directory synced by `podfs syncd`.
    pub dir: PathBuf,
}

pub fn run(args: StatusArgs, out: &mut Output<'_>) -> anyhow::Result<()> {
    let path = StateDir::of(&args.dir).status_path();
    let text = std::fs::read_to_string(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow::anyhow!("{} is not synced by podfs syncd (no {})", args.dir.display(), path.display())
        } else {
            anyhow::Error::new(e).context(format!("cannot read {}", path.display()))
        }
    })?;
    let mut status: Status = serde_json::from_str(&text).with_context(|| format!("{} is damaged", path.display()))?;
    if !running(&args.dir) && status.state != DaemonState::Stopped {
        status.state = DaemonState::NotRunning;
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
