//! `podfs restore WORKSPACE VERSION`: arguments and printing around
//! [`crate::transfer::restore::restore_version`].

use clap::Args;
use podfs_client::Client;

use crate::cli::Output;
use crate::cli::target::parse_workspace;
use crate::transfer::restore::restore_version;

#[derive(Debug, Args)]
pub struct RestoreArgs {
    #[arg(value_parser = parse_workspace)]
    pub workspace: String,
    /// The version to bring back.
    pub version: u64,
    /// Commit message [default: "restore version N"].
    #[arg(short, long)]
    pub message: Option<String>,
}

pub async fn run(client: &Client, args: RestoreArgs, out: &mut Output<'_>) -> anyhow::Result<()> {
    let r = restore_version(client, &args.workspace, args.version, args.message).await?;
    #[derive(serde::Serialize)]
    struct Restored {
        workspace: String,
        restored: u64,
        version: Option<u64>,
    }
    let body =
        Restored { workspace: args.workspace.clone(), restored: args.version, version: r.as_ref().map(|i| i.version) };
    out.json_or(&body, |w| match &r {
        Some(i) => writeln!(
            w,
            "{}: version {} restores version {} ({} changes)",
            args.workspace, i.version, args.version, i.changes
        ),
        None => writeln!(w, "{}: head already equals version {}", args.workspace, args.version),
    })
}
