//! inotify through `notify`, one non-recursive watch per directory of the tree (ignored
//! directories such as `target/` cost no watch), turned into hints for the reconciler.
//!
//! Hints are never trusted alone: an overflowed queue, a watch that could not be added or any
//! event notify cannot explain asks for a full reconciliation. A directory that appears is
//! walked after its watch exists, so files created in it before that are not missed.
//!
//! The channel to the daemon is bounded ([`HINT_QUEUE`]): when it is full (a burst faster than
//! the daemon drains it), the hint is dropped and the daemon is told through a separate
//! [`Notify`] (which keeps one wake-up for a daemon that is not waiting yet) to reconcile the
//! whole tree. A full queue costs a rescan, never a lost change, and never blocks notify.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind};
use notify::{EventKind, RecursiveMode, Watcher as _};
use tokio::sync::{Notify, mpsc};

use crate::local::rules::IGNORE_FILE;
use crate::local::state::is_state_path;

/// Hints queued between the watcher and the daemon before they turn into a rescan. A saved
/// file makes about three (create, modify, close); the daemon drains them between its
/// reconciliations and commits, so this covers a 20,000-file burst arriving during a commit,
/// in a few MB.
pub const HINT_QUEUE: usize = 65_536;

/// What the watcher tells the daemon.
#[derive(Debug)]
pub enum Hint {
    /// Look at this path.
    Path(String),
    /// Walk this path (a directory appeared or was moved in).
    Tree(String),
    /// An ignore file changed: rules and tree must be read again.
    Rules,
    /// Events were lost: reconcile everything.
    Rescan(String),
}

pub struct Watcher {
    inner: notify::INotifyWatcher,
    root: PathBuf,
    watched: HashSet<String>,
    /// Set once a watch could not be added for lack of inotify watches.
    pub exhausted: bool,
}

/// The kernel's per-user inotify watch limit.
pub fn max_user_watches() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/inotify/max_user_watches").ok()?.trim().parse().ok()
}

impl Watcher {
    /// Starts watching nothing yet; hints go to `tx`, and `overflow` is notified when one had
    /// to be dropped.
    pub fn new(root: &Path, tx: mpsc::Sender<Hint>, overflow: Arc<Notify>) -> anyhow::Result<Self> {
        let base = root.to_path_buf();
        let handler = move |res: notify::Result<notify::Event>| {
            for hint in hints(&base, res) {
                send(&tx, &overflow, hint);
            }
        };
        let inner = notify::INotifyWatcher::new(handler, notify::Config::default())
            .map_err(|e| anyhow::anyhow!("cannot start watching files (inotify): {e}"))?;
        Ok(Self { inner, root: root.to_path_buf(), watched: HashSet::new(), exhausted: false })
    }

    pub fn watched(&self) -> usize {
        self.watched.len()
    }

    /// Watches directory `rel` ("" for the root). False when the kernel is out of watches.
    /// Always asks the kernel, even for a path watched before: the directory there may be a new
    /// one (removed and created again, or moved in), and for a moved directory the kernel hands
    /// back its old watch, which notify then reports under the new path.
    pub fn add(&mut self, rel: &str) -> bool {
        let path = if rel.is_empty() { self.root.clone() } else { self.root.join(rel) };
        match self.inner.watch(&path, RecursiveMode::NonRecursive) {
            Ok(()) => {
                self.watched.insert(rel.to_string());
                true
            }
            Err(e) if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) => {
                if !self.exhausted {
                    tracing::error!(
                        watched = self.watched.len(),
                        limit = max_user_watches(),
                        "out of inotify watches: raise fs.inotify.max_user_watches (sysctl -w \
                         fs.inotify.max_user_watches=1048576); until then changes are found by periodic scans"
                    );
                }
                self.exhausted = true;
                false
            }
            // the directory went away meanwhile: its removal is an event of its parent
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "cannot watch");
                true
            }
        }
    }

    /// Forgets `rel` (gone from the tree). The kernel drops the watch of a deleted directory by
    /// itself; a moved one keeps its watch under its new path, so nothing is unwatched here.
    pub fn forget(&mut self, rel: &str) {
        self.watched.remove(rel);
    }
}

/// Queues `hint`; when the queue is full, drops it and wakes the daemon for a rescan.
pub(super) fn send(tx: &mpsc::Sender<Hint>, overflow: &Notify, hint: Hint) {
    if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(hint) {
        overflow.notify_one();
    }
}

/// The hints one notify result gives.
fn hints(root: &Path, res: notify::Result<notify::Event>) -> Vec<Hint> {
    let event = match res {
        Ok(e) => e,
        Err(e) => return vec![Hint::Rescan(format!("watcher error: {e}"))],
    };
    if event.need_rescan() {
        return vec![Hint::Rescan("the kernel's event queue overflowed".into())];
    }
    let tree = match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => false,
        EventKind::Access(_) => return Vec::new(),
        EventKind::Create(CreateKind::Folder) | EventKind::Modify(ModifyKind::Name(_)) => true,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) => false,
        EventKind::Any | EventKind::Other => return vec![Hint::Rescan(format!("unexpected event {:?}", event.kind))],
    };
    let mut out = Vec::new();
    for p in &event.paths {
        let Ok(rel) = p.strip_prefix(root) else { continue };
        let Some(rel) = rel.to_str() else {
            // not a workspace path: walks skip it too (with a warning)
            continue;
        };
        if rel.is_empty() || is_state_path(rel) {
            continue;
        }
        if p.file_name().is_some_and(|n| n == IGNORE_FILE) {
            out.push(Hint::Rules);
        }
        out.push(if tree { Hint::Tree(rel.to_string()) } else { Hint::Path(rel.to_string()) });
    }
    out
}
