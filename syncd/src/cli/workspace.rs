//! `podfs workspace create|list|delete`.

use std::io::Write;

use anyhow::Context;
use clap::Subcommand;
use podfs_client::Client;

use crate::cli::Output;
use crate::cli::output::human_bytes;
use crate::cli::target::parse_workspace;

#[derive(Debug, Subcommand)]
pub enum WorkspaceCmd {
    /// Create a workspace (admin token).
    Create {
        #[arg(value_parser = parse_workspace)]
        name: String,
    },
    /// List the workspaces the token can see.
    List,
    /// Delete a workspace and all its versions (admin token).
    Delete {
        #[arg(value_parser = parse_workspace)]
        name: String,
    },
}

pub async fn run(client: &Client, cmd: WorkspaceCmd, out: &mut Output<'_>) -> anyhow::Result<()> {
    match cmd {
        WorkspaceCmd::Create { name } => {
            let ws = client.create_workspace(&name).await.with_context(|| format!("cannot create workspace {name}"))?;
            out.json_or(&ws, |w| writeln!(w, "created workspace {}", ws.name))
        }
        WorkspaceCmd::List => {
            let list = client.list_workspaces().await.context("cannot list workspaces")?;
            out.json_or(&list, |w| {
                let rows: Vec<[String; 5]> = list
                    .workspaces
                    .iter()
                    .map(|ws| {
                        [
                            ws.name.clone(),
                            ws.head.to_string(),
                            ws.file_count.to_string(),
                            human_bytes(ws.total_bytes),
                            ws.created_at.clone(),
                        ]
                    })
                    .collect();
                write_table(w, ["NAME", "HEAD", "FILES", "SIZE", "CREATED"], &rows)
            })
        }
        WorkspaceCmd::Delete { name } => {
            client.delete_workspace(&name).await.with_context(|| format!("cannot delete workspace {name}"))?;
            out.json_or(&serde_json::json!({ "deleted": name }), |w| writeln!(w, "deleted workspace {name}"))
        }
    }
}

/// Left-aligned columns separated by two spaces.
pub fn write_table<const N: usize>(w: &mut dyn Write, header: [&str; N], rows: &[[String; N]]) -> std::io::Result<()> {
    let mut widths = header.map(str::len);
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |w: &mut dyn Write, cells: [&str; N]| -> std::io::Result<()> {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == N {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<width$}  ", width = widths[i]));
            }
        }
        writeln!(w, "{}", s.trim_end())
    };
    line(w, header)?;
    for r in rows {
        line(w, std::array::from_fn(|i| r[i].as_str()))?;
    }
    Ok(())
}
