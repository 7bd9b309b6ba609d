//! `podfs cat WORKSPACE[@VERSION] PATH`: one file's raw bytes to stdout (a symlink's link text).
//!
//! Nothing reaches stdout before the whole content hashed to the hash the gateway stated (its
//! ETag): the content is held in memory up to [`IN_MEMORY`], else in an anonymous temporary
//! file, then written out.

use std::io::{Read, Seek, Write};

use anyhow::{Context, bail};
use clap::Args;
use podfs_client::Client;
use podfs_protocol::{ContentHash, WsPath};

use crate::cli::target::Target;
use crate::cli::{Output, stdout_error};

/// Contents up to this size are verified in memory; larger ones in a temporary file.
const IN_MEMORY: usize = 16 << 20;

#[derive(Debug, Args)]
pub struct CatArgs {
    /// WORKSPACE or WORKSPACE@VERSION (a number or `head`).
    pub target: Target,
    /// Path of the file in the workspace.
    pub path: String,
}

/// Receives the content, checks it against the ETag hash, then prints it.
pub async fn run(client: &Client, args: CatArgs, out: &mut Output<'_>) -> anyhow::Result<()> {
    let path =
        WsPath::new(args.path.trim_start_matches("./")).with_context(|| format!("invalid path {:?}", args.path))?;
    let Target { workspace, version } = &args.target;
    let mut file = client
        .get_file(workspace, *version, &path)
        .await
        .with_context(|| format!("cannot read {path} in {}", args.target))?;
    let Some(expected) = file.hash else {
        bail!("{path}: the gateway did not state the content's hash (no ETag); refusing to print unverified bytes")
    };
    let mut hasher = blake3::Hasher::new();
    let mut held = Vec::new();
    let mut spill: Option<std::fs::File> = None;
    while let Some(chunk) = file.chunk().await.with_context(|| format!("cannot read {path}"))? {
        hasher.update(&chunk);
        if spill.is_none() && held.len() + chunk.len() > IN_MEMORY {
            let mut f = tempfile::tempfile().context("cannot create a temporary file")?;
            f.write_all(&held).context("cannot write a temporary file")?;
            held = Vec::new();
            spill = Some(f);
        }
        match &mut spill {
            Some(f) => f.write_all(&chunk).context("cannot write a temporary file")?,
            None => held.extend_from_slice(&chunk),
        }
    }
    let actual = ContentHash::from(hasher.finalize());
    if actual != expected {
        bail!("{path}: the content received hashes to {actual}, not to its hash {expected}; nothing was printed");
    }
    match spill {
        None => out.w.write_all(&held).map_err(stdout_error)?,
        Some(mut f) => {
            f.rewind().context("cannot read a temporary file")?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = f.read(&mut buf).context("cannot read a temporary file")?;
                if n == 0 {
                    break;
                }
                out.w.write_all(&buf[..n]).map_err(stdout_error)?;
            }
        }
    }
    out.w.flush().map_err(stdout_error)?;
    Ok(())
}
