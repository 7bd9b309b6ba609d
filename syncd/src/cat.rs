//! `podfs cat WORKSPACE[@VERSION] PATH`: one file's raw bytes to stdout (a symlink's link text).

use anyhow::{Context, bail};
use clap::Args;
use podfs_client::Client;
use podfs_protocol::{ContentHash, WsPath};

use crate::cli::{Output, stdout_error};
use crate::target::Target;

#[derive(Debug, Args)]
pub struct CatArgs {
    /// WORKSPACE or WORKSPACE@VERSION (a number or `head`).
    pub target: Target,
    /// Path of the file in the workspace.
    pub path: String,
}

/// Streams the content to stdout and checks it against the ETag hash at the end.
pub async fn run(client: &Client, args: CatArgs, out: &mut Output<'_>) -> anyhow::Result<()> {
    let path =
        WsPath::new(args.path.trim_start_matches("./")).with_context(|| format!("invalid path {:?}", args.path))?;
    let Target { workspace, version } = &args.target;
    let mut file = client
        .get_file(workspace, *version, &path)
        .await
        .with_context(|| format!("cannot read {path} in {}", args.target))?;
    let mut hasher = blake3::Hasher::new();
    while let Some(chunk) = file.chunk().await.with_context(|| format!("cannot read {path}"))? {
        hasher.update(&chunk);
        out.w.write_all(&chunk).map_err(stdout_error)?;
    }
    out.w.flush().map_err(stdout_error)?;
    if let Some(expected) = file.hash {
        let actual = ContentHash::from(hasher.finalize());
        if actual != expected {
            bail!("{path}: the content received does not match its hash {expected}");
        }
    }
    Ok(())
}
