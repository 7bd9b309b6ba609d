//! `podfs restore WORKSPACE VERSION`: a new version whose tree equals an old one's, so any save
//! can be had back without rewriting history. Content is never re-uploaded: every blob of the
//! old version is still in the store.

use anyhow::Context;
use clap::Args;
use podfs_client::Client;
use podfs_protocol::VersionRef;
use podfs_protocol::api::{CommitRequest, VersionInfo};

use crate::cli::Output;
use crate::target::parse_workspace;

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

/// Commits `ws@version`'s tree on top of head; `None` when head already equals it.
pub async fn restore_version(
    client: &Client,
    ws: &str,
    version: u64,
    message: Option<String>,
) -> anyhow::Result<Option<VersionInfo>> {
    let head = client.workspace(ws).await.with_context(|| format!("cannot read workspace {ws}"))?.head;
    if version == 0 || version > head {
        anyhow::bail!("{ws} has versions 1 to {head}; there is no version {version}");
    }
    // the diff runs forward (version -> head); restoring runs it backward
    let diff = client
        .diff(ws, VersionRef::Number(version), VersionRef::Number(head))
        .await
        .with_context(|| format!("cannot compare version {version} with head {head}"))?;
    let changes = crate::changes::changes_of_diff(&diff.changes, false);
    if changes.is_empty() {
        return Ok(None);
    }
    let req = CommitRequest {
        parent_version: head,
        message: Some(message.unwrap_or_else(|| format!("restore version {version}"))),
        author: None,
        changes,
    };
    let info = client.commit(ws, &req).await.map_err(|e| {
        if e.is_conflict() {
            anyhow::anyhow!("{ws} moved past version {head} while restoring; run the command again")
        } else {
            anyhow::Error::new(e).context(format!("cannot commit to {ws}"))
        }
    })?;
    Ok(Some(info))
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
