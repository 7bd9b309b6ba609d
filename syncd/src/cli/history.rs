//! `podfs history WORKSPACE PATH`: every revision of one path, oldest first.

use anyhow::Context;
use clap::Args;
use podfs_client::Client;

use crate::cli::Output;
use crate::cli::output::human_bytes;
use crate::cli::target::parse_workspace;

#[derive(Debug, Args)]
pub struct HistoryArgs {
    #[arg(value_parser = parse_workspace)]
    pub workspace: String,
    /// Path in the workspace.
    pub path: String,
}

/// One line per revision: `FROM..UNTIL  KIND  MODE  SIZE  HASH` (UNTIL empty while current).
pub async fn run(client: &Client, args: HistoryArgs, out: &mut Output<'_>) -> anyhow::Result<()> {
    let h = client
        .history(&args.workspace, &args.path)
        .await
        .with_context(|| format!("cannot read the history of {} in {}", args.path, args.workspace))?;
    out.json_or(&h, |w| {
        for r in &h.revisions {
            let until = r.until_version.map(|u| u.to_string()).unwrap_or_default();
            let hash = r.entry.hash.map(|h| h.to_hex()[..12].to_string()).unwrap_or_else(|| "-".into());
            writeln!(
                w,
                "{}..{until}  {}  {:03o}  {}  {hash}",
                r.from_version,
                r.entry.kind.as_str(),
                r.entry.mode,
                human_bytes(r.entry.size)
            )?;
        }
        Ok(())
    })
}
