//! `podfs syncd --workspace NAME DIR`: the devpod daemon. It hydrates an empty DIR from head,
//! then watches it and commits every change as a new version.
//!
//! The loop: watcher hints collect into a dirty set; once the tree has been quiet for
//! `quiet_ms` (or `max_delay_ms` after the first hint, so a file written continuously still
//! gets committed) the dirty paths are reconciled against the index and whatever differs from
//! the base is committed. Commits are serial; hints that arrive meanwhile form the next batch,
//! so a burst (`npm install`, `git checkout`) becomes a version per `max_delay_ms` at most.
//! A full reconciliation runs at start, after a watcher overflow, when an ignore file changes,
//! and every `rescan_secs`. State lives in `DIR/.podfs` (never committed): `syncd.sqlite`
//! (index and base), `syncd-status.json`, `syncd.lock`.

mod commit;
pub mod index;
pub mod reconcile;
pub mod status;
mod watch;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use podfs_client::Client;
use podfs_protocol::VersionRef;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::time::Instant;

use self::commit::Attempt;
use self::index::{INDEX_FILE, Index};
use self::reconcile::Dirty;
use self::status::{CommitRecord, Status};
use self::watch::{Hint, Watcher};
use crate::cache::ContentCache;
use crate::hydrate::{self, HydrateOptions};
use crate::rules::{Rules, STATE_DIR};

pub const DEFAULT_QUIET_MS: u64 = 100;
pub const DEFAULT_MAX_DELAY_MS: u64 = 1000;
pub const DEFAULT_RESCAN_SECS: u64 = 300;
/// Longest wait between retries while the gateway is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A failed reconciliation is retried (as a full one) after this long.
const RECONCILE_RETRY: Duration = Duration::from_secs(5);
/// Full reconciliations this often while the kernel is out of inotify watches.
const EXHAUSTED_RESCAN: Duration = Duration::from_secs(10);
/// How long a shutdown waits for the last commit.
const SHUTDOWN_COMMIT: Duration = Duration::from_secs(15);
/// A batch of at least this many paths is called a burst in its version's message.
const BURST: usize = 100;

/// `podfs syncd --workspace NAME DIR`.
#[derive(Debug, Clone, clap::Args)]
pub struct SyncdArgs {
    /// The workspace to keep DIR in sync with.
    #[arg(long, env = "PODFS_WORKSPACE")]
    pub workspace: Option<String>,
    /// The directory: empty (hydrated from head), or one this daemon or `podfs pull` filled.
    pub dir: PathBuf,
    /// Commit once the tree has been quiet this long [default: 100]
    #[arg(long, env = "PODFS_SYNCD_QUIET_MS")]
    pub quiet_ms: Option<u64>,
    /// ... or at the latest this long after the first change [default: 1000]
    #[arg(long, env = "PODFS_SYNCD_MAX_DELAY_MS")]
    pub max_delay_ms: Option<u64>,
    /// Full reconciliation of the tree every this many seconds [default: 300]
    #[arg(long, env = "PODFS_SYNCD_RESCAN_SECS")]
    pub rescan_secs: Option<u64>,
    /// Content cache shared by pulls [default: the user's cache directory]
    #[arg(long, env = "PODFS_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Author recorded on the versions [default: syncd@HOSTNAME]
    #[arg(long, env = "PODFS_SYNCD_AUTHOR")]
    pub author: Option<String>,
    /// Start in a non-empty DIR that podfs did not fill: its contents become the next version
    /// (paths of head missing from DIR are deleted).
    #[arg(long)]
    pub adopt: bool,
    /// TOML file with any of the settings above and `gateway`, `token` (keys as the flags, `_` for `-`)
    #[arg(long, env = "PODFS_SYNCD_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    gateway: Option<String>,
    token: Option<String>,
    workspace: Option<String>,
    quiet_ms: Option<u64>,
    max_delay_ms: Option<u64>,
    rescan_secs: Option<u64>,
    cache_dir: Option<PathBuf>,
    author: Option<String>,
}

/// Resolved settings: flags > environment > file > defaults.
#[derive(Debug, Clone)]
pub struct Settings {
    pub gateway: String,
    pub token: Option<String>,
    pub workspace: String,
    pub dir: PathBuf,
    pub quiet: Duration,
    pub max_delay: Duration,
    pub rescan: Duration,
    pub cache_dir: PathBuf,
    pub author: String,
    pub adopt: bool,
}

impl Settings {
    pub fn resolve(args: SyncdArgs, gateway: Option<String>, token: Option<String>) -> anyhow::Result<Self> {
        let file: FileConfig = match &args.config {
            Some(p) => {
                let text =
                    std::fs::read_to_string(p).with_context(|| format!("reading config file {}", p.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing config file {}", p.display()))?
            }
            None => FileConfig::default(),
        };
        let Some(workspace) = args.workspace.or(file.workspace) else {
            bail!("no workspace: pass --workspace NAME (or PODFS_WORKSPACE, or `workspace` in the config file)")
        };
        let ms = |v: Option<u64>, f: Option<u64>, d: u64| Duration::from_millis(v.or(f).unwrap_or(d));
        let quiet = ms(args.quiet_ms, file.quiet_ms, DEFAULT_QUIET_MS);
        let max_delay = ms(args.max_delay_ms, file.max_delay_ms, DEFAULT_MAX_DELAY_MS).max(quiet);
        let rescan = Duration::from_secs(args.rescan_secs.or(file.rescan_secs).unwrap_or(DEFAULT_RESCAN_SECS).max(1));
        let dir = std::path::absolute(&args.dir).with_context(|| format!("bad directory {}", args.dir.display()))?;
        Ok(Self {
            gateway: gateway.or(file.gateway).unwrap_or_else(|| podfs_client::DEFAULT_GATEWAY.to_string()),
            token: token.or(file.token),
            workspace,
            dir,
            quiet,
            max_delay,
            rescan,
            cache_dir: match args.cache_dir.or(file.cache_dir) {
                Some(d) => d,
                None => crate::cache::default_dir()?,
            },
            author: args.author.or(file.author).unwrap_or_else(default_author),
            adopt: args.adopt,
        })
    }
}

fn default_author() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    format!("syncd@{}", if host.is_empty() { "localhost" } else { host })
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let client = Client::new(&settings.gateway, settings.token.clone())?;
    let dir = settings.dir.clone();
    std::fs::create_dir_all(dir.join(STATE_DIR)).with_context(|| format!("cannot create {}", dir.display()))?;
    let _lock = status::lock(&dir)?;
    let mut d = Daemon::start(client, settings).await?;
    d.run().await
}

struct Daemon {
    client: Client,
    s: Settings,
    idx: Index,
    rules: Rules,
    status: Status,
    cache: ContentCache,
}

/// Why a batch is committed (recorded in the version's message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    Startup,
    Edit,
    Rescan,
    Periodic,
    Shutdown,
}

impl Trigger {
    /// The message of a version of `changes` paths this trigger made.
    fn message(self, changes: usize) -> String {
        format!("syncd: {} ({changes} paths)", self.name(changes))
    }

    fn name(self, changes: usize) -> &'static str {
        match self {
            Trigger::Startup => "startup reconciliation",
            Trigger::Edit if changes >= BURST => "burst",
            Trigger::Edit => "save",
            Trigger::Rescan => "rescan after lost events",
            Trigger::Periodic => "periodic reconciliation",
            Trigger::Shutdown => "shutdown",
        }
    }
}

impl Daemon {
    /// Opens the index, hydrating DIR or adopting its contents the first time.
    async fn start(client: Client, s: Settings) -> anyhow::Result<Self> {
        let (mut idx, known) = Index::open(&s.dir.join(STATE_DIR).join(INDEX_FILE))?;
        let cache = ContentCache::open(&s.cache_dir, crate::cache::DEFAULT_LIMIT)?;
        let mut status = Status {
            pid: std::process::id(),
            workspace: s.workspace.clone(),
            dir: s.dir.clone(),
            state: "starting".into(),
            ..Status::default()
        };
        status.write(&s.dir)?;
        if known && idx.workspace != s.workspace {
            bail!("{} is synced with workspace {}, not {}", s.dir.display(), idx.workspace, s.workspace);
        }
        if !known {
            let head = wait_for_head(&client, &s.workspace).await?;
            let empty =
                hydrate::holds_only_state(&s.dir).with_context(|| format!("cannot read {}", s.dir.display()))?;
            let version = if empty {
                if head > 0 {
                    status.state = "hydrating".into();
                    status.write(&s.dir)?;
                    let opts = hydrate_options(&s, false);
                    let r = hydrate::hydrate(&client, &s.workspace, VersionRef::Number(head), &s.dir, opts).await?;
                    tracing::info!(version = head, files = r.files, secs = r.elapsed_secs, "hydrated");
                }
                head
            } else if let Some(st) = hydrate::read_state(&s.dir)?.filter(|st| st.workspace == s.workspace) {
                // filled by `podfs pull`: local edits since are changes against that version
                st.version
            } else if head == 0 || s.adopt {
                head
            } else {
                bail!(
                    "{} is not empty and podfs did not fill it: start syncd in an empty directory, or pass --adopt \
                     to make its contents the next version of {} (paths of head missing here are deleted)",
                    s.dir.display(),
                    s.workspace
                );
            };
            let tree = crate::push::remote_tree(&client, &s.workspace, version).await?;
            idx.reset_base(&s.workspace, version, tree)?;
        }
        let rules = Rules::new(&s.dir);
        Ok(Self { client, idx, rules, status, cache, s })
    }

    async fn run(&mut self) -> anyhow::Result<()> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut watcher = Watcher::new(&self.s.dir, tx)?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut dirty = Dirty { full: true, ..Dirty::default() };
        let mut trigger = Trigger::Startup;
        let mut first_hint: Option<Instant> = Some(Instant::now());
        let mut last_hint = Instant::now();
        let mut next_rescan = Instant::now() + self.s.rescan;
        let mut backoff = Duration::from_millis(500);
        let mut retry_at: Option<Instant> = None;
        // when the oldest change not yet committed was noticed
        let mut oldest: Option<Instant> = None;
        let mut stopping = false;
        // (their version, paths) of a conflict the next commit resolves with our side
        let mut conflict: Option<(u64, Vec<String>)> = None;
        loop {
            let flush_at =
                first_hint.map(|f| if dirty.full { f } else { (last_hint + self.s.quiet).min(f + self.s.max_delay) });
            let commit_at =
                if self.idx.pending.is_empty() { None } else { Some(retry_at.unwrap_or_else(Instant::now)) };
            let wake = [flush_at, commit_at, Some(next_rescan)].into_iter().flatten().min().unwrap_or(next_rescan);
            if !stopping {
                tokio::select! {
                    hint = rx.recv() => {
                        let Some(hint) = hint else { bail!("the file watcher stopped") };
                        let now = Instant::now();
                        first_hint.get_or_insert(now);
                        oldest.get_or_insert(now);
                        last_hint = now;
                        self.note(hint, &mut dirty, &mut trigger);
                        continue;
                    }
                    _ = tokio::time::sleep_until(wake) => {}
                    _ = tokio::signal::ctrl_c() => stopping = true,
                    _ = term.recv() => stopping = true,
                }
            }
            if stopping {
                tracing::info!("stopping: committing what is pending first");
                while let Ok(h) = rx.try_recv() {
                    self.note(h, &mut dirty, &mut trigger);
                }
                if trigger == Trigger::Edit {
                    trigger = Trigger::Shutdown;
                }
                return self.shutdown(dirty, trigger, &mut watcher).await;
            }
            let now = Instant::now();
            if now >= next_rescan {
                // without enough inotify watches, scans are the only way changes are found
                let every = if watcher.exhausted { self.s.rescan.min(EXHAUSTED_RESCAN) } else { self.s.rescan };
                next_rescan = now + every;
                if !dirty.full {
                    dirty.full = true;
                    trigger = Trigger::Periodic;
                }
                first_hint.get_or_insert(now);
            }
            if flush_at.is_some_and(|f| f <= now) || dirty.full {
                while let Ok(h) = rx.try_recv() {
                    self.note(h, &mut dirty, &mut trigger);
                }
                let batch = std::mem::take(&mut dirty);
                first_hint = None;
                let deferred = match self.reconcile(batch, &mut watcher) {
                    Ok(d) => d,
                    Err(e) => {
                        // an unreadable directory, a full disk...: try the whole tree again soon
                        tracing::warn!(error = %format!("{e:#}"), "cannot reconcile; retrying with a full scan");
                        self.status.last_error = Some(format!("{e:#}"));
                        next_rescan = Instant::now() + RECONCILE_RETRY;
                        Vec::new()
                    }
                };
                if !deferred.is_empty() {
                    dirty.paths.extend(deferred);
                    first_hint = Some(Instant::now());
                    last_hint = Instant::now();
                }
                if self.idx.pending.is_empty() {
                    oldest = None;
                    trigger = Trigger::Edit;
                }
                self.write_status("watching", &watcher);
            }
            if !self.idx.pending.is_empty() && retry_at.is_none_or(|r| r <= Instant::now()) {
                self.write_status("committing", &watcher);
                let changes = self.idx.pending.len();
                let message = match &conflict {
                    Some((theirs, paths)) => conflict_message(*theirs, paths, changes),
                    None => trigger.message(changes),
                };
                match self.commit_once(message).await {
                    Attempt::Committed { version, changes } => {
                        let latency = oldest.map_or(Duration::ZERO, |o| o.elapsed());
                        tracing::info!(version, changes, latency_ms = latency.as_millis() as u64, "committed");
                        self.status.commits += 1;
                        self.status.last_commit = Some(CommitRecord {
                            version,
                            changes,
                            trigger: trigger.name(changes).to_string(),
                            latency_ms: latency.as_millis() as u64,
                            at: status::unix_now(),
                        });
                        for c in self.status.conflicts.iter_mut().filter(|c| c.our_version.is_none()) {
                            c.our_version = Some(version);
                        }
                        self.status.last_error = None;
                        retry_at = None;
                        backoff = Duration::from_millis(500);
                        oldest = if self.idx.pending.is_empty() { None } else { Some(Instant::now()) };
                        trigger = Trigger::Edit;
                        conflict = None;
                    }
                    Attempt::Rebased { touched, conflicts, head } => {
                        if !conflicts.is_empty() {
                            tracing::warn!(
                                ?conflicts,
                                their_version = head,
                                "conflicting edits: both kept as versions"
                            );
                            self.status.add_conflicts(&conflicts, head);
                            conflict = Some((head, conflicts));
                        }
                        dirty.paths.extend(touched);
                        first_hint = Some(Instant::now().checked_sub(self.s.max_delay).unwrap_or_else(Instant::now));
                    }
                    Attempt::Changed(paths) => {
                        dirty.paths.extend(paths);
                        first_hint = Some(Instant::now().checked_sub(self.s.max_delay).unwrap_or_else(Instant::now));
                    }
                    Attempt::Failed(e) => {
                        tracing::warn!(error = %format!("{e:#}"), retry_in_ms = backoff.as_millis() as u64, "commit failed; changes wait on disk");
                        self.status.last_error = Some(format!("{e:#}"));
                        retry_at = Some(Instant::now() + backoff);
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        self.write_status("offline", &watcher);
                        continue;
                    }
                }
                self.write_status("watching", &watcher);
            }
        }
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
        };
        commit::commit(&ctx, &mut self.idx, message).await
    }

    /// Folds one hint into the dirty set.
    fn note(&mut self, hint: Hint, dirty: &mut Dirty, trigger: &mut Trigger) {
        match hint {
            Hint::Path(p) => {
                dirty.paths.insert(p);
            }
            Hint::Tree(p) => {
                dirty.trees.insert(p);
            }
            Hint::Rules => {
                self.rules.forget();
                dirty.full = true;
            }
            Hint::Rescan(why) => {
                if !dirty.full {
                    tracing::warn!(reason = %why, "reconciling the whole tree");
                }
                dirty.full = true;
                *trigger = Trigger::Rescan;
            }
        }
    }

    /// Reconciles `batch` (watching directories as they are found); returns paths to look at
    /// again.
    fn reconcile(&mut self, batch: Dirty, watcher: &mut Watcher) -> anyhow::Result<Vec<String>> {
        let full = batch.full;
        let started = std::time::Instant::now();
        if full {
            watcher.add("");
        }
        let out = tokio::task::block_in_place(|| {
            reconcile::reconcile(&mut self.rules, &mut self.idx, batch, &mut |d| {
                watcher.add(d);
            })
        })?;
        for d in &out.dirs_removed {
            watcher.forget(d);
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
            check_watch_limit(watcher.watched());
        }
        Ok(out.deferred)
    }

    async fn shutdown(&mut self, dirty: Dirty, trigger: Trigger, watcher: &mut Watcher) -> anyhow::Result<()> {
        if !dirty.is_empty() {
            self.reconcile(dirty, watcher)?;
        }
        if !self.idx.pending.is_empty() {
            let changes = self.idx.pending.len();
            let message = trigger.message(changes);
            let attempt = tokio::time::timeout(SHUTDOWN_COMMIT, self.commit_once(message)).await;
            match attempt {
                Ok(Attempt::Committed { version, changes }) => tracing::info!(version, changes, "committed"),
                _ => tracing::warn!(
                    pending = self.idx.pending.len(),
                    "could not commit before stopping: the changes stay on disk and are committed at the next start"
                ),
            }
        }
        self.write_status("stopped", watcher);
        Ok(())
    }

    fn write_status(&mut self, state: &str, watcher: &Watcher) {
        self.status.state = state.to_string();
        self.status.head_version = self.idx.base_version;
        self.status.pending_changes = self.idx.pending.len();
        self.status.tracked_paths = self.idx.local.len();
        self.status.watched_dirs = watcher.watched();
        if let Err(e) = self.status.write(&self.s.dir) {
            tracing::warn!(error = %format!("{e:#}"), "cannot write the status file");
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

fn hydrate_options(s: &Settings, keep_local: bool) -> HydrateOptions {
    HydrateOptions {
        cache_dir: s.cache_dir.clone(),
        cache_limit: crate::cache::DEFAULT_LIMIT,
        concurrency: 32,
        progress: false,
        force: false,
        keep_local,
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

    fn args(dir: &str) -> SyncdArgs {
        SyncdArgs {
            workspace: None,
            dir: PathBuf::from(dir),
            quiet_ms: None,
            max_delay_ms: None,
            rescan_secs: None,
            cache_dir: Some(PathBuf::from("/tmp/cache")),
            author: None,
            adopt: false,
            config: None,
        }
    }

    #[test]
    fn flags_beat_the_file_which_beats_defaults() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("syncd.toml");
        std::fs::write(
            &file,
            "workspace = \"from-file\"\nquiet_ms = 250\nrescan_secs = 60\ngateway = \"http://gw:1\"\n",
        )
        .unwrap();
        let mut a = args("/work/w");
        a.config = Some(file.clone());
        a.quiet_ms = Some(50);
        let s = Settings::resolve(a, None, Some("tok".into())).unwrap();
        assert_eq!(s.workspace, "from-file");
        assert_eq!(s.quiet, Duration::from_millis(50), "the flag wins");
        assert_eq!(s.rescan, Duration::from_secs(60), "the file fills what flags left");
        assert_eq!(s.max_delay, Duration::from_millis(DEFAULT_MAX_DELAY_MS));
        assert_eq!(s.gateway, "http://gw:1");
        assert_eq!(s.token.as_deref(), Some("tok"));
        assert!(s.author.starts_with("syncd@"));

        let mut a = args("/work/w");
        a.config = Some(file);
        let s = Settings::resolve(a, Some("http://flag:2".into()), None).unwrap();
        assert_eq!((s.gateway.as_str(), s.quiet), ("http://flag:2", Duration::from_millis(250)));
    }

    #[test]
    fn bad_settings_are_named() {
        let err = Settings::resolve(args("/w"), None, None).unwrap_err().to_string();
        assert!(err.contains("--workspace"), "{err}");
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("bad.toml");
        std::fs::write(&file, "workspace = \"w\"\nquiet = 3\n").unwrap();
        let mut a = args("/w");
        a.config = Some(file);
        let err = format!("{:#}", Settings::resolve(a, None, None).unwrap_err());
        assert!(err.contains("bad.toml") && err.contains("quiet"), "{err}");
    }

    #[test]
    fn conflict_messages_name_both_sides() {
        let m = conflict_message(7, &["a".into(), "b".into()], 3);
        assert!(m.contains("conflict with version 7 on a, b") && m.contains("both kept"), "{m}");
        let many: Vec<String> = (0..8).map(|i| format!("p{i}")).collect();
        assert!(conflict_message(7, &many, 8).contains("and 3 more"));
    }
}
