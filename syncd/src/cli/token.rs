//! `podfs token create WORKSPACE --right read|write [--name N]`.

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use podfs_client::Client;
use podfs_protocol::api::Right;

use crate::cli::Output;
use crate::cli::target::parse_workspace;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TokenRight {
    Read,
    Write,
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Create a workspace token (admin token). Prints the token alone on stdout; it is shown once.
    Create {
        #[arg(value_parser = parse_workspace)]
        workspace: String,
        #[arg(long, value_enum)]
        right: TokenRight,
        /// A name to recognize the token by.
        #[arg(long)]
        name: Option<String>,
    },
}

pub async fn run(client: &Client, cmd: TokenCmd, out: &mut Output<'_>) -> anyhow::Result<()> {
    match cmd {
        TokenCmd::Create { workspace, right, name } => {
            let right = match right {
                TokenRight::Read => Right::Read,
                TokenRight::Write => Right::Write,
            };
            let t = client
                .create_token(&workspace, right, name)
                .await
                .with_context(|| format!("cannot create a token for {workspace}"))?;
            if !out.json {
                eprintln!("{} token for workspace {} (shown once, keep it safe):", t.right.as_str(), t.workspace);
            }
            out.json_or(&t, |w| writeln!(w, "{}", t.token))
        }
    }
}
