//! `podfs pull WORKSPACE[@VERSION] DIR`: arguments and printing around [`crate::hydrate()`]
//! (Phase 2, the default) and [`crate::pull()`] (Phase 1, `--per-file`).

use std::path::PathBuf;

use clap::Args;
use podfs_client::Client;

use crate::cli::Output;
use crate::cli::output::{human_bytes, plural};
use crate::cli::target::Target;
use crate::transfer::hydrate::{self, HydrateMode, HydrateOptions};
use crate::transfer::pull::{DOWNLOAD_CONCURRENCY, PullOptions, pull};

/// `podfs pull WORKSPACE[@VERSION] DIR`.
#[derive(Debug, Args)]
pub struct PullArgs {
    /// WORKSPACE or WORKSPACE@VERSION (a number or `head`).
    pub target: Target,
    /// Where to write the tree: a new or empty directory, or one holding an earlier pull of
    /// the same workspace (switched in place: only differing paths are touched).
    pub dir: PathBuf,
    /// Downloads in flight at once.
    #[arg(long, default_value_t = DOWNLOAD_CONCURRENCY)]
    pub concurrency: usize,
    /// Phase 1: one download per distinct content, no manifest.sqlite, no cache (for comparison).
    #[arg(long)]
    pub per_file: bool,
    /// The local content cache shared by all workspaces [default: $XDG_CACHE_HOME/podfs].
    #[arg(long, env = "PODFS_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Most bytes the cache keeps (least recently used content goes first).
    #[arg(long, env = "PODFS_CACHE_SIZE", default_value_t = podfs_cache::DEFAULT_LIMIT)]
    pub cache_size: u64,
    /// Switch versions in place even over local edits to the paths that differ (the edits are lost).
    #[arg(long)]
    pub force: bool,
}

/// Human output: `pulled demo@3 into DIR: 120 files, 3 symlinks, 14 dirs, 4.5 MiB (110 blobs downloaded)`.
pub async fn run(client: &Client, args: PullArgs, out: &mut Output<'_>) -> anyhow::Result<()> {
    if !args.per_file {
        let opts = HydrateOptions {
            cache_dir: hydrate::cache_dir_or_default(args.cache_dir)?,
            cache_limit: args.cache_size,
            concurrency: args.concurrency,
            progress: out.progress,
            force: args.force,
            keep_local: false,
            peers: None,
        };
        let r = hydrate::hydrate(client, &args.target.workspace, args.target.version, &args.dir, opts).await?;
        return out.json_or(&r, |w| {
            let s = &r.sources;
            let verb = match r.mode {
                HydrateMode::Unchanged => "already at",
                HydrateMode::Switch => "switched to",
                HydrateMode::Fresh => "pulled",
            };
            writeln!(
                w,
                "{verb} {}@{} in {}: {} in {:.2}s (manifest {}, cache {}, blob store {}{})",
                r.workspace,
                r.version,
                r.dir.display(),
                tree_summary(r.files, r.symlinks, r.dirs, r.bytes),
                r.elapsed_secs,
                human_bytes(s.manifest.transfer_bytes),
                plural(s.cache.files, "file", "files"),
                plural(s.s3.files, "file", "files"),
                if r.removed > 0 { format!("; {} removed", r.removed) } else { String::new() },
            )
        });
    }
    let opts = PullOptions { concurrency: args.concurrency, progress: out.progress };
    let r = pull(client, &args.target.workspace, args.target.version, &args.dir, opts).await?;
    out.json_or(&r, |w| {
        writeln!(
            w,
            "pulled {}@{} into {}: {} ({} downloaded)",
            r.workspace,
            r.version,
            r.dir.display(),
            tree_summary(r.files, r.symlinks, r.dirs, r.bytes),
            plural(r.downloaded_blobs, "blob", "blobs"),
        )
    })
}

/// `120 files, 3 symlinks, 14 dirs, 4.5 MiB`.
fn tree_summary(files: u64, symlinks: u64, dirs: u64, bytes: u64) -> String {
    format!(
        "{}, {}, {}, {}",
        plural(files, "file", "files"),
        plural(symlinks, "symlink", "symlinks"),
        plural(dirs, "dir", "dirs"),
        human_bytes(bytes)
    )
}
