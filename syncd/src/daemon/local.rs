//! The daemon's local side on its own thread: the index (`DIR/.podfs/syncd.sqlite`), the ignore
//! rules, the inotify watches and the reconciliation, all blocking work, owned by one OS thread
//! and driven through a bounded request channel with a oneshot reply per request (the pattern
//! of the gateway's manifest writer). The async loop in [`super`] never touches SQLite or walks
//! the tree itself, so its runtime keeps serving the network while a large tree is hashed.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use podfs_protocol::{Change, Entry};
use tokio::sync::{Notify, mpsc, oneshot};

use super::index::Index;
use super::reconcile::{self, Dirty};
use super::watch::{self, Hint, Watcher};
use crate::local::rules::Rules;

/// Requests queued before a sender waits.
const QUEUE: usize = 16;

/// Figures for the status file, as of the last request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub base_version: u64,
    pub pending: usize,
    pub tracked: usize,
    pub watched: usize,
    /// The kernel refused a watch for lack of inotify watches.
    pub out_of_watches: bool,
}

/// What the next commit sends: the pending paths with their local and base entries.
#[derive(Debug, Clone, Default)]
pub struct Pending {
    pub workspace: String,
    pub base_version: u64,
    /// Local entries of the pending paths (a path deleted locally has none), sorted by path.
    pub local: Vec<Entry>,
    /// Base entries of the pending paths (a path created locally has none), sorted by path.
    pub base: Vec<Entry>,
    pub paths: HashSet<String>,
}

/// What a reconciliation round did.
#[derive(Debug, Default)]
pub struct Reconciled {
    /// Paths to look at again (they kept changing while read, or could not be read).
    pub deferred: Vec<String>,
    pub hashed: usize,
    pub counts: Counts,
}

enum Request {
    Reconcile(Dirty, oneshot::Sender<anyhow::Result<Reconciled>>),
    Pending(oneshot::Sender<Pending>),
    Advance(u64, Vec<Change>, oneshot::Sender<anyhow::Result<Counts>>),
    ResetBase(String, u64, Vec<Entry>, oneshot::Sender<anyhow::Result<Counts>>),
    Counts(oneshot::Sender<Counts>),
}

/// A handle on the local thread; the thread ends when the handle is closed or dropped.
pub struct LocalTree {
    tx: mpsc::Sender<Request>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What [`LocalTree::open`] found in the index.
pub struct Opened {
    pub tree: LocalTree,
    /// The workspace the index belongs to; `None` for a new index.
    pub workspace: Option<String>,
}

impl LocalTree {
    /// Opens the index at `index_path` and starts the thread owning it, the rules of `root`
    /// and a watcher sending hints to `hints` (and a wake-up to `overflow` when it is full).
    pub async fn open(
        root: &Path,
        index_path: &Path,
        hints: mpsc::Sender<Hint>,
        overflow: Arc<Notify>,
    ) -> anyhow::Result<Opened> {
        let (root, index_path) = (root.to_path_buf(), index_path.to_path_buf());
        let (ready_tx, ready_rx) = oneshot::channel();
        let (tx, rx) = mpsc::channel(QUEUE);
        let thread = std::thread::Builder::new()
            .name("syncd-local".into())
            .spawn(move || {
                let opened = (|| -> anyhow::Result<_> {
                    let (idx, known) = Index::open(&index_path)?;
                    let watcher = Watcher::new(&root, hints, overflow)?;
                    Ok((idx, known, watcher))
                })();
                match opened {
                    Ok((idx, known, watcher)) => {
                        let workspace = known.then(|| idx.workspace.clone());
                        let _ = ready_tx.send(Ok(workspace));
                        serve(State { idx, rules: Rules::new(&root), watcher }, rx);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .context("cannot start the daemon's local thread")?;
        let workspace = ready_rx.await.context("the daemon's local thread died")??;
        Ok(Opened { tree: LocalTree { tx, thread: Some(thread) }, workspace })
    }

    /// Ends the thread once it has answered every request sent, and waits for it: the index
    /// is closed and the watches are gone when this returns.
    pub async fn close(self) {
        let LocalTree { tx, thread } = self;
        drop(tx);
        if let Some(thread) = thread
            && let Ok(Err(_)) = tokio::task::spawn_blocking(move || thread.join()).await
        {
            tracing::error!("the daemon's local thread panicked");
        }
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Request) -> anyhow::Result<T> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| anyhow::anyhow!("the daemon's local thread stopped"))?;
        rx.await.context("the daemon's local thread stopped")
    }

    /// Brings the index in line with the disk for `batch`, watching directories as they are
    /// found, and saves it.
    pub async fn reconcile(&self, batch: Dirty) -> anyhow::Result<Reconciled> {
        self.ask(|r| Request::Reconcile(batch, r)).await?
    }

    /// What the next commit sends.
    pub async fn pending(&self) -> anyhow::Result<Pending> {
        self.ask(Request::Pending).await
    }

    /// Records that the gateway committed `changes` on top of the base as `version`.
    pub async fn advance(&self, version: u64, changes: Vec<Change>) -> anyhow::Result<Counts> {
        self.ask(|r| Request::Advance(version, changes, r)).await?
    }

    /// Makes `tree`, version `version` of `workspace`, the base.
    pub async fn reset_base(&self, workspace: &str, version: u64, tree: Vec<Entry>) -> anyhow::Result<Counts> {
        self.ask(|r| Request::ResetBase(workspace.to_string(), version, tree, r)).await?
    }

    pub async fn counts(&self) -> anyhow::Result<Counts> {
        self.ask(Request::Counts).await
    }
}

struct State {
    idx: Index,
    rules: Rules,
    watcher: Watcher,
}

fn serve(mut s: State, mut rx: mpsc::Receiver<Request>) {
    while let Some(req) = rx.blocking_recv() {
        match req {
            Request::Reconcile(batch, reply) => {
                let _ = reply.send(s.reconcile(batch));
            }
            Request::Pending(reply) => {
                let _ = reply.send(s.pending());
            }
            Request::Advance(version, changes, reply) => {
                let r = s.idx.advance_base(version, &changes).map(|()| s.counts());
                let _ = reply.send(r);
            }
            Request::ResetBase(ws, version, tree, reply) => {
                let r = s.idx.reset_base(&ws, version, tree).map(|()| s.counts());
                let _ = reply.send(r);
            }
            Request::Counts(reply) => {
                let _ = reply.send(s.counts());
            }
        }
    }
}

impl State {
    fn counts(&self) -> Counts {
        Counts {
            base_version: self.idx.base_version,
            pending: self.idx.pending.len(),
            tracked: self.idx.local.len(),
            watched: self.watcher.watched(),
            out_of_watches: self.watcher.exhausted,
        }
    }

    fn pending(&self) -> Pending {
        let (local, base) = self.idx.pending_trees();
        Pending {
            workspace: self.idx.workspace.clone(),
            base_version: self.idx.base_version,
            local,
            base,
            paths: self.idx.pending.iter().cloned().collect(),
        }
    }

    fn reconcile(&mut self, batch: Dirty) -> anyhow::Result<Reconciled> {
        let full = batch.full;
        let started = std::time::Instant::now();
        if batch.rules_changed {
            self.rules.forget();
        }
        if full {
            self.watcher.add("");
        }
        let watcher = &mut self.watcher;
        let out = reconcile::reconcile(&mut self.rules, &mut self.idx, batch, &mut |d| {
            watcher.add(d);
        })?;
        for d in &out.dirs_removed {
            self.watcher.forget(d);
        }
        for (p, e) in &out.unreadable {
            tracing::warn!(path = %p, error = %e, "cannot read; will retry");
        }
        self.idx.save()?;
        if full {
            tracing::info!(
                paths = self.idx.local.len(),
                read = out.hashed,
                pending = self.idx.pending.len(),
                secs = started.elapsed().as_secs_f64(),
                "reconciled the whole tree"
            );
            check_watch_limit(self.watcher.watched());
        }
        Ok(Reconciled { deferred: out.deferred, hashed: out.hashed, counts: self.counts() })
    }
}

/// Warns when the tree's directories come close to the inotify watch limit.
fn check_watch_limit(watched: usize) {
    if let Some(limit) = watch::max_user_watches()
        && watched as u64 * 10 > limit * 9
    {
        tracing::warn!(
            watched,
            limit,
            "close to the inotify watch limit: raise it with `sysctl -w fs.inotify.max_user_watches={}`",
            (limit * 4).max(524_288)
        );
    }
}
