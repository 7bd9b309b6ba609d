//! `podfs syncd`: the devpod daemon. It hydrates an empty DIR from head, then watches it and
//! commits every change as a new version, until its shutdown token is cancelled.
//!
//! The loop: watcher hints collect into a dirty set; the [`schedule`] says when a batch is due
//! (quiet period, max delay) and the [`local`] thread reconciles it against the index; whatever
//! differs from the base is committed ([`commit`]). Commits are serial; hints that arrive
//! meanwhile form the next batch, so a burst (`npm install`, `git checkout`) becomes a version
//! per `max_delay` at most. A full reconciliation runs at start, after a watcher overflow,
//! when an ignore file changes, and every `rescan`. State lives in `DIR/.podfs` (never
//! committed; [`crate::local::state`]).
//!
//! Threads: this loop runs on the async runtime and only waits (on hints, timers, the local
//! thread, the network); the index, the rules, the watches and every file read of a
//! reconciliation live on the local thread; hydration and switches run their file and SQLite
//! work on blocking threads.

mod commit;
pub mod index;
pub mod local;
pub mod reconcile;
pub mod schedule;
pub mod settings;
pub mod status;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::FutureExt;
use podfs_cache::ContentCache;
use podfs_client::Client;
use podfs_protocol::VersionRef;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::commit::Attempt;
use self::local::{Counts, LocalTree};
use self::reconcile::Dirty;
use self::schedule::{MAX_BACKOFF, Schedule};
pub use self::settings::{Overrides, Settings};
use self::status::{ColdStart, CommitRecord, DaemonState, Status, Trigger};
use self::watch::{HINT_QUEUE, Hint};
use crate::local::state::{self, StateDir};
use crate::transfer::blocking;
use crate::transfer::hydrate::{self, HydrateOptions};
use crate::transfer::peers::{self, PeerNode};

/// How long a shutdown waits for the last commit.
const SHUTDOWN_COMMIT: Duration = Duration::from_secs(15);
/// Downloads in flight when the daemon hydrates or brings another writer's changes to disk.
const DOWNLOADS: usize = 32;

/// Runs the daemon with `settings` until `shutdown` is cancelled, then commits what is pending
/// (for up to 15 s) and returns.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let client = Client::new(&settings.gateway, settings.token.clone())?;
    let state_dir = StateDir::of(&settings.dir);
    let lock = {
        let dir = settings.dir.clone();
        blocking(move || {
            StateDir::of(&dir).create()?;
            status::lock(&dir)
        })
        .await?
    };
    let (hint_tx, hints) = mpsc::channel(HINT_QUEUE);
    let overflow = Arc::new(Notify::new());
    let opened = LocalTree::open(&settings.dir, &state_dir.index_path(), hint_tx, Arc::clone(&overflow)).await?;
    let cache = {
        let dir = settings.cache_dir.clone();
        blocking(move || Ok(ContentCache::open(&dir, podfs_cache::DEFAULT_LIMIT)?)).await?
    };
    let peers = match &settings.peers {
        Some(p) => Some(PeerNode::start(p.clone(), shutdown.clone())?),
        None => None,
    };
    if let Some(node) = &peers {
        tokio::spawn(heartbeat(Arc::clone(node), client.clone(), settings.workspace.clone(), shutdown.clone()));
    }
    let mut d = Daemon {
        peers,
        status: Status {
            pid: std::process::id(),
            workspace: settings.workspace.clone(),
            dir: settings.dir.clone(),
            ..Status::default()
        },
        client,
        local: opened.tree,
        cache,
        counts: Counts::default(),
        s: settings,
    };
    d.write_status(DaemonState::Starting).await;
    tokio::select! {
        started = d.start(opened.workspace) => started?,
        () = shutdown.cancelled() => {
            d.write_status(DaemonState::Stopped).await;
            d.local.close().await;
            return Ok(());
        }
    }
    let result = d.run(hints, &overflow, shutdown).await;
    // the index and the watches go before the lock does
    d.local.close().await;
    drop(lock);
    result
}

struct Daemon {
    /// Serving other devpods, and cold-starting from them.
    peers: Option<Arc<PeerNode>>,
    client: Client,
    s: Settings,
    local: LocalTree,
    status: Status,
    cache: ContentCache,
    /// The local thread's figures as of its last answer.
    counts: Counts,
}

/// The loop's own state besides the schedule.
struct Batch {
    dirty: Dirty,
    /// Why the changes being collected will be committed.
    trigger: Trigger,
    /// (their version, paths) of a conflict the next commit resolves with our side.
    conflict: Option<(u64, Vec<String>)>,
}

impl Daemon {
    /// Makes sure the index has a base: hydrates an empty DIR from head, takes over a DIR
    /// `podfs pull` filled, or adopts a DIR's contents when asked to.
    async fn start(&mut self, known: Option<String>) -> anyhow::Result<()> {
        let s = &self.s;
        if let Some(ws) = known {
            if ws != s.workspace {
                bail!("{} is synced with workspace {ws}, not {}", s.dir.display(), s.workspace);
            }
            self.counts = self.local.counts().await?;
            return Ok(());
        }
        let head = wait_for_head(&self.client, &s.workspace).await?;
        let (empty, pulled) = {
            let dir = s.dir.clone();
            blocking(move || {
                let empty = state::holds_only_state(&dir).with_context(|| format!("cannot read {}", dir.display()))?;
                Ok((empty, StateDir::of(&dir).read_pull_state()?))
            })
            .await?
        };
        let version = if empty {
            if head > 0 {
                self.write_status(DaemonState::Hydrating).await;
                let mut opts = hydrate_options(&self.s, false);
                opts.peers = self.peers.clone();
                let s = &self.s;
                let r = hydrate::hydrate(&self.client, &s.workspace, VersionRef::Number(head), &s.dir, opts).await?;
                tracing::info!(version = head, files = r.files, secs = r.elapsed_secs, "hydrated");
                self.status.cold_start = Some(ColdStart {
                    version: r.version,
                    seconds: r.elapsed_secs,
                    files: r.files,
                    bytes: r.bytes,
                    sources: r.sources,
                });
                if let Some(node) = &self.peers {
                    // holders of the whole version are served first: say so now, not at the next beat
                    if let Err(e) = node.announce(&self.client, &s.workspace).await {
                        tracing::warn!(error = %format!("{e:#}"), "cannot announce the cold-started version");
                    }
                }
            }
            head
        } else if let Some(st) = pulled.filter(|st| st.workspace == self.s.workspace) {
            // filled by `podfs pull`: local edits since are changes against that version
            st.version
        } else if head == 0 || self.s.adopt {
            head
        } else {
            bail!(
                "{} is not empty and podfs did not fill it: start syncd in an empty directory, or pass --adopt \
                 to make its contents the next version of {} (paths of head missing here are deleted)",
                self.s.dir.display(),
                self.s.workspace
            );
        };
        let tree = crate::transfer::push::remote_tree(&self.client, &self.s.workspace, version).await?;
        self.counts = self.local.reset_base(&self.s.workspace, version, tree).await?;
        Ok(())
    }

    async fn run(
        &mut self,
        mut hints: mpsc::Receiver<Hint>,
        overflow: &Notify,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut sched = Schedule::new(self.s.quiet, self.s.max_delay, self.s.rescan, Instant::now());
        let mut b =
            Batch { dirty: Dirty { full: true, ..Dirty::default() }, trigger: Trigger::Startup, conflict: None };
        loop {
            let wake = sched.wake_at(b.dirty.full, self.counts.pending > 0, Instant::now());
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    tracing::info!("stopping: committing what is pending first");
                    drain(&mut hints, overflow, &mut b);
                    return self.shutdown(b).await;
                }
                // a due flush goes first (it drains the queue itself): a steady stream of
                // hints cannot hold back the max delay
                () = tokio::time::sleep_until(wake) => {}
                hint = hints.recv() => {
                    let Some(hint) = hint else { bail!("the file watcher stopped") };
                    sched.hint(Instant::now());
                    note(hint, &mut b);
                    continue;
                }
                () = overflow.notified() => {
                    sched.hint(Instant::now());
                    note(Hint::Rescan("the hint queue was full".into()), &mut b);
                    continue;
                }
            }
            let now = Instant::now();
            if sched.rescan_due(now, self.counts.out_of_watches) && !b.dirty.full {
                b.dirty.full = true;
                b.trigger = Trigger::Periodic;
            }
            if sched.flush_due(now, b.dirty.full) {
                drain(&mut hints, overflow, &mut b);
                sched.flushed();
                let batch = std::mem::take(&mut b.dirty);
                match self.local.reconcile(batch).await {
                    Ok(r) => {
                        self.counts = r.counts;
                        if !r.deferred.is_empty() {
                            b.dirty.paths.extend(r.deferred);
                            sched.look_again(Instant::now());
                        }
                    }
                    Err(e) => {
                        // an unreadable directory, a full disk...: try the whole tree again soon
                        tracing::warn!(error = %format!("{e:#}"), "cannot reconcile; retrying with a full scan");
                        self.status.last_error = Some(format!("{e:#}"));
                        sched.reconcile_failed(Instant::now());
                    }
                }
                if self.counts.pending == 0 {
                    sched.settled();
                    b.trigger = Trigger::Save;
                }
                self.write_status(DaemonState::Watching).await;
            }
            if self.counts.pending > 0 && sched.may_commit(Instant::now()) {
                self.write_status(DaemonState::Committing).await;
                let message = match &b.conflict {
                    Some((theirs, paths)) => conflict_message(*theirs, paths, self.counts.pending),
                    None => b.trigger.message(self.counts.pending),
                };
                let attempt = self.commit_once(message).await;
                if !self.settle(attempt, &mut sched, &mut b) {
                    self.write_status(DaemonState::Offline).await;
                    continue;
                }
                self.write_status(DaemonState::Watching).await;
            }
        }
    }

    /// Acts on how a commit attempt ended; false when it failed (retried after a backoff).
    fn settle(&mut self, attempt: Attempt, sched: &mut Schedule, b: &mut Batch) -> bool {
        match attempt {
            Attempt::Committed { version, changes, counts } => {
                self.counts = counts;
                let latency = sched.committed(Instant::now(), counts.pending > 0);
                tracing::info!(version, changes, latency_ms = latency.as_millis() as u64, "committed");
                self.status.commits += 1;
                self.status.last_commit = Some(CommitRecord {
                    version,
                    changes,
                    trigger: b.trigger.for_batch(changes),
                    latency_ms: latency.as_millis() as u64,
                    at: status::unix_now(),
                });
                for c in self.status.conflicts.iter_mut().filter(|c| c.our_version.is_none()) {
                    c.our_version = Some(version);
                }
                self.status.last_error = None;
                b.trigger = Trigger::Save;
                b.conflict = None;
            }
            Attempt::Rebased { touched, conflicts, head, counts } => {
                self.counts = counts;
                if !conflicts.is_empty() {
                    tracing::warn!(?conflicts, their_version = head, "conflicting edits: both kept as versions");
                    self.status.add_conflicts(&conflicts, head);
                    b.conflict = Some((head, conflicts));
                }
                b.dirty.paths.extend(touched);
                sched.look_again_now(Instant::now());
            }
            Attempt::Changed(paths) => {
                b.dirty.paths.extend(paths);
                sched.look_again_now(Instant::now());
            }
            Attempt::Failed(e) => {
                let wait = sched.commit_failed(Instant::now());
                tracing::warn!(error = %format!("{e:#}"), retry_in_ms = wait.as_millis() as u64, "commit failed; changes wait on disk");
                self.status.last_error = Some(format!("{e:#}"));
                return false;
            }
        }
        true
    }

    /// One commit attempt of what is pending.
    async fn commit_once(&mut self, message: String) -> Attempt {
        let hopts = hydrate_options(&self.s, true);
        let ctx = commit::Ctx {
            client: &self.client,
            root: &self.s.dir,
            author: &self.s.author,
            cache: &self.cache,
            hydrate: &hopts,
            local: &self.local,
        };
        commit::commit(&ctx, message).await
    }

    async fn shutdown(&mut self, mut b: Batch) -> anyhow::Result<()> {
        if b.trigger == Trigger::Save {
            b.trigger = Trigger::Shutdown;
        }
        if !b.dirty.is_empty() {
            self.counts = self.local.reconcile(b.dirty).await?.counts;
        }
        if self.counts.pending > 0 {
            let message = b.trigger.message(self.counts.pending);
            match tokio::time::timeout(SHUTDOWN_COMMIT, self.commit_once(message)).await {
                Ok(Attempt::Committed { version, changes, counts }) => {
                    self.counts = counts;
                    tracing::info!(version, changes, "committed");
                }
                _ => tracing::warn!(
                    pending = self.counts.pending,
                    "could not commit before stopping: the changes stay on disk and are committed at the next start"
                ),
            }
        }
        self.write_status(DaemonState::Stopped).await;
        Ok(())
    }

    /// Writes the status file (on a blocking thread); a failure is logged, never fatal.
    async fn write_status(&mut self, state: DaemonState) {
        self.status.state = state;
        self.status.head_version = self.counts.base_version;
        self.status.pending_changes = self.counts.pending;
        self.status.tracked_paths = self.counts.tracked;
        self.status.watched_dirs = self.counts.watched;
        self.status.peers = self.peers.as_ref().map(|n| n.report());
        let (mut status, dir) = (self.status.clone(), self.s.dir.clone());
        if let Err(e) = blocking(move || status.write(&dir)).await {
            tracing::warn!(error = %format!("{e:#}"), "cannot write the status file");
        }
    }
}

/// Folds every hint already queued into the batch, and a rescan when hints were dropped.
fn drain(hints: &mut mpsc::Receiver<Hint>, overflow: &Notify, b: &mut Batch) {
    while let Ok(h) = hints.try_recv() {
        note(h, b);
    }
    if overflow.notified().now_or_never().is_some() {
        note(Hint::Rescan("the hint queue was full".into()), b);
    }
}

/// Folds one hint into the batch.
fn note(hint: Hint, b: &mut Batch) {
    match hint {
        Hint::Path(p) => {
            b.dirty.paths.insert(p);
        }
        Hint::Tree(p) => {
            b.dirty.trees.insert(p);
        }
        Hint::Rules => {
            b.dirty.rules_changed = true;
            b.dirty.full = true;
        }
        Hint::Rescan(why) => {
            if !b.dirty.full {
                tracing::warn!(reason = %why, "reconciling the whole tree");
            }
            b.dirty.full = true;
            b.trigger = Trigger::Rescan;
        }
    }
}

/// The message of a version that puts our side of a conflict on top of theirs.
fn conflict_message(theirs: u64, paths: &[String], changes: usize) -> String {
    let mut shown = paths.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    if paths.len() > 5 {
        shown.push_str(&format!(" and {} more", paths.len() - 5));
    }
    format!(
        "syncd: conflict with version {theirs} on {shown}: both kept, theirs in version {theirs}, ours here ({changes} paths)"
    )
}

/// Announces this daemon to the tracker every few seconds until `shutdown`.
async fn heartbeat(node: Arc<PeerNode>, client: Client, ws: String, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(peers::HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        if let Err(e) = node.announce(&client, &ws).await {
            tracing::debug!(error = %format!("{e:#}"), "heartbeat failed");
        }
    }
}

fn hydrate_options(s: &Settings, keep_local: bool) -> HydrateOptions {
    HydrateOptions {
        cache_dir: s.cache_dir.clone(),
        cache_limit: podfs_cache::DEFAULT_LIMIT,
        concurrency: DOWNLOADS,
        progress: false,
        force: false,
        keep_local,
        peers: None,
    }
}

/// The workspace's head, waiting (with a message) while the gateway is unreachable.
async fn wait_for_head(client: &Client, ws: &str) -> anyhow::Result<u64> {
    let mut wait = Duration::from_millis(500);
    loop {
        match client.workspace(ws).await {
            Ok(w) => return Ok(w.head),
            Err(e) if e.is_not_found() => {
                bail!("workspace {ws} does not exist (create it with `podfs workspace create {ws}`)")
            }
            Err(e) if e.is_retryable() => {
                tracing::warn!(error = %e, "the gateway is unreachable; waiting to start");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(MAX_BACKOFF);
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read workspace {ws}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflict_messages_name_both_sides() {
        let m = conflict_message(7, &["a".into(), "b".into()], 3);
        assert!(m.contains("conflict with version 7 on a, b") && m.contains("both kept"), "{m}");
        let many: Vec<String> = (0..8).map(|i| format!("p{i}")).collect();
        assert!(conflict_message(7, &many, 8).contains("and 3 more"));
    }

    #[test]
    fn triggers_name_bursts() {
        assert_eq!(Trigger::Save.message(3), "syncd: save (3 paths)");
        assert_eq!(Trigger::Save.message(status::BURST), format!("syncd: burst ({} paths)", status::BURST));
        assert_eq!(Trigger::Startup.message(500), "syncd: startup reconciliation (500 paths)");
        assert_eq!(Trigger::Save.for_batch(status::BURST), Trigger::Burst);
    }

    #[tokio::test]
    async fn a_full_hint_queue_wakes_the_daemon_for_a_rescan() {
        let (tx, mut rx) = mpsc::channel(2);
        let overflow = Notify::new();
        for i in 0..3 {
            watch::send(&tx, &overflow, Hint::Path(format!("p{i}")));
        }
        drop(tx);
        // the wake-up is kept for a daemon that was not waiting yet
        tokio::time::timeout(Duration::from_secs(5), overflow.notified()).await.expect("woken for a rescan");
        let mut got = Vec::new();
        while let Some(h) = rx.recv().await {
            got.push(h);
        }
        assert!(matches!(&got[..], [Hint::Path(a), Hint::Path(b)] if a == "p0" && b == "p1"), "{got:?}");
    }
}
