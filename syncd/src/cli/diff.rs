//! `podfs diff WORKSPACE V1 V2`: one line per changed path, `A path`, `M path` or `D path`.

use anyhow::Context;
use clap::Args;
use podfs_client::Client;
use podfs_protocol::VersionRef;
use podfs_protocol::api::DiffKind;

use crate::cli::target::parse_workspace;
use crate::cli::{Output, parse_version};

#[derive(Debug, Args)]
pub struct DiffArgs {
    #[arg(value_parser = parse_workspace)]
    pub workspace: String,
    /// Older version (a number or `head`).
    #[arg(value_parser = parse_version)]
    pub from: VersionRef,
    /// Newer version (a number or `head`).
    #[arg(value_parser = parse_version)]
    pub to: VersionRef,
}

pub async fn run(client: &Client, args: DiffArgs, out: &mut Output<'_>) -> anyhow::Result<()> {
    let diff = client
        .diff(&args.workspace, args.from, args.to)
        .await
        .with_context(|| format!("cannot diff {} {}..{}", args.workspace, args.from, args.to))?;
    out.json_or(&diff, |w| {
        for c in &diff.changes {
            let letter = match c.change {
                DiffKind::Added => 'A',
                DiffKind::Modified => 'M',
                DiffKind::Deleted => 'D',
            };
            writeln!(w, "{letter} {}", c.path)?;
        }
        Ok(())
    })
}
