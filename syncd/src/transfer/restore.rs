//! `podfs restore WORKSPACE VERSION`: a new version whose tree equals an old one's, so any save
//! can be had back without rewriting history. Content is never re-uploaded: every blob of the
//! old version is still in the store.

use anyhow::Context;
use podfs_client::Client;
use podfs_protocol::VersionRef;
use podfs_protocol::api::{CommitRequest, VersionInfo};

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
