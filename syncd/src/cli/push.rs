//! `podfs push WORKSPACE DIR [-m MESSAGE]`: arguments and printing around [`crate::push()`].

use clap::Args;
use podfs_client::Client;

use crate::cli::Output;
use crate::cli::output::{human_bytes, plural};
use crate::cli::target::parse_workspace;
use crate::transfer::push::{PushOptions, UPLOAD_CONCURRENCY, push};

/// `podfs push WORKSPACE DIR [-m MESSAGE]`.
#[derive(Debug, Args)]
pub struct PushArgs {
    #[arg(value_parser = parse_workspace)]
    pub workspace: String,
    /// The directory to push.
    pub dir: std::path::PathBuf,
    /// Commit message.
    #[arg(short, long)]
    pub message: Option<String>,
    /// Commit author (the gateway picks one when absent).
    #[arg(long, env = "PODFS_AUTHOR")]
    pub author: Option<String>,
    /// Uploads in flight at once.
    #[arg(long, default_value_t = UPLOAD_CONCURRENCY)]
    pub concurrency: usize,
}

/// Human output: `pushed demo@3: 12 changes, 4 blobs uploaded (1.2 MiB)` or
/// `demo is up to date at version 3`.
pub async fn run(client: &Client, args: PushArgs, out: &mut Output<'_>) -> anyhow::Result<()> {
    let opts = PushOptions {
        message: args.message,
        author: args.author,
        concurrency: args.concurrency,
        progress: out.progress,
    };
    let r = push(client, &args.workspace, &args.dir, opts).await?;
    out.json_or(&r, |w| {
        if r.up_to_date {
            writeln!(w, "{} is up to date at version {}", r.workspace, r.version)
        } else {
            writeln!(
                w,
                "pushed {}@{}: {}, {} uploaded ({})",
                r.workspace,
                r.version,
                plural(r.changes, "change", "changes"),
                plural(r.uploaded_blobs, "blob", "blobs"),
                human_bytes(r.uploaded_bytes)
            )
        }
    })
}
