//! `podfs log WORKSPACE [PATH]`: versions, newest first; with PATH, the revisions of that path
//! (as `podfs history`).

use anyhow::Context;
use clap::Args;
use podfs_client::Client;

use crate::cli::Output;
use crate::cli::output::plural;
use crate::cli::target::parse_workspace;

/// Versions shown by default.
pub const DEFAULT_LIMIT: u32 = 100;

#[derive(Debug, Args)]
pub struct LogArgs {
    #[arg(value_parser = parse_workspace)]
    pub workspace: String,
    /// Only the revisions of this path (oldest first, as `podfs history`).
    pub path: Option<String>,
    /// Most versions to show.
    #[arg(short = 'n', long, default_value_t = DEFAULT_LIMIT)]
    pub limit: u32,
    /// Only versions older than this one.
    #[arg(long)]
    pub before: Option<u64>,
}

/// One line per version: `VERSION  TIME  AUTHOR  N changes  MESSAGE`.
pub async fn run(client: &Client, args: LogArgs, out: &mut Output<'_>) -> anyhow::Result<()> {
    if let Some(path) = args.path {
        return crate::cli::history::run(
            client,
            crate::cli::history::HistoryArgs { workspace: args.workspace, path },
            out,
        )
        .await;
    }
    let list = client
        .versions(&args.workspace, Some(args.limit), args.before)
        .await
        .with_context(|| format!("cannot list the versions of {}", args.workspace))?;
    out.json_or(&list, |w| {
        let width = list.versions.iter().map(|v| v.version.to_string().len()).max().unwrap_or(1);
        for v in &list.versions {
            let message = v.message.lines().next().unwrap_or("");
            let line = format!(
                "{:>width$}  {}  {}  {}  {}",
                v.version,
                v.created_at,
                v.author,
                plural(v.changes, "change", "changes"),
                message
            );
            writeln!(w, "{}", line.trim_end())?;
        }
        Ok(())
    })
}
