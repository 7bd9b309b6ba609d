//! The `podfs` command line: parsing, dispatch and printing, one file per command. [`run`] is
//! the whole `podfs` program minus process setup. Only this module writes to stdout or knows
//! about `--json` and exit codes; the library below it returns values and typed errors.

pub mod cat;
pub mod diff;
pub mod history;
pub mod log;
pub mod output;
pub mod pull;
pub mod push;
pub mod restore;
pub mod status;
pub mod syncd;
pub mod target;
pub mod token;
pub mod workspace;

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use podfs_client::{Client, DEFAULT_GATEWAY};
use podfs_protocol::VersionRef;
use serde::Serialize;

/// podfs: versioned workspaces shared between devpods.
#[derive(Debug, Parser)]
#[command(name = "podfs", version, about)]
pub struct Cli {
    /// Gateway URL [default: http://127.0.0.1:7070]
    #[arg(long, env = "PODFS_GATEWAY", global = true)]
    pub gateway: Option<String>,
    /// Bearer token.
    #[arg(long, env = "PODFS_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Machine-readable JSON on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, list or delete workspaces.
    #[command(subcommand)]
    Workspace(workspace::WorkspaceCmd),
    /// Create workspace tokens.
    #[command(subcommand)]
    Token(token::TokenCmd),
    /// Commit a local directory as the workspace's next version.
    Push(push::PushArgs),
    /// Write a version of a workspace into a new or empty directory.
    Pull(pull::PullArgs),
    /// List versions, newest first (with a PATH: that path's revisions).
    Log(log::LogArgs),
    /// Print one file of a version to stdout.
    Cat(cat::CatArgs),
    /// List the paths changed between two versions.
    Diff(diff::DiffArgs),
    /// List the revisions of one path.
    History(history::HistoryArgs),
    /// Commit an old version's tree as a new version.
    Restore(restore::RestoreArgs),
    /// Keep a directory in sync with a workspace: every save becomes a version.
    Syncd(syncd::SyncdArgs),
    /// Show the state of the syncd daemon of a directory.
    Status(status::StatusArgs),
}

/// Where a command writes its result.
pub struct Output<'a> {
    pub w: &'a mut (dyn Write + Send),
    /// Print JSON instead of text.
    pub json: bool,
    /// Show progress bars on stderr.
    pub progress: bool,
}

impl Output<'_> {
    /// Writes `value` as one line of JSON with `--json`, else what `human` writes.
    pub fn json_or<T: Serialize>(
        &mut self,
        value: &T,
        human: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
    ) -> anyhow::Result<()> {
        if self.json {
            serde_json::to_writer(&mut *self.w, value).map_err(std::io::Error::from).map_err(stdout_error)?;
            writeln!(self.w).map_err(stdout_error)?;
        } else {
            human(&mut *self.w).map_err(stdout_error)?;
        }
        self.w.flush().map_err(stdout_error)?;
        Ok(())
    }
}

/// Stdout was closed by its reader (`podfs log | head`): not worth an error message.
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed")]
pub struct StdoutClosed;

/// Wraps a failed write to stdout, telling a closed pipe apart.
pub fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        StdoutClosed.into()
    } else {
        anyhow::Error::new(e).context("cannot write to stdout")
    }
}

/// Parses `head` or a version number.
pub fn parse_version(s: &str) -> Result<VersionRef, String> {
    s.parse().map_err(|e: podfs_protocol::tree::VersionRefError| e.to_string())
}

/// Runs the `podfs` command line `args` (program name first), writing results to stdout and
/// errors to stderr as `error: ...`. Returns 0 on success, 1 on failure, 2 on a usage error.
pub async fn run<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut stdout = std::io::stdout();
    run_with(args, &mut stdout).await
}

/// [`run`] with stdout replaced by `stdout` (for tests).
pub async fn run_with<I, T>(args: I, stdout: &mut (dyn Write + Send)) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    match execute(cli, stdout).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<StdoutClosed>() => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a parsed command.
pub async fn execute(cli: Cli, stdout: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    if let Command::Syncd(a) = cli.command {
        return syncd::run(a, cli.gateway, cli.token).await;
    }
    let gateway = cli.gateway.as_deref().unwrap_or(DEFAULT_GATEWAY);
    let client = Client::new(gateway, cli.token.clone())?;
    let mut out = Output { w: stdout, json: cli.json, progress: std::io::stderr().is_terminal() };
    match cli.command {
        Command::Workspace(c) => workspace::run(&client, c, &mut out).await,
        Command::Token(c) => token::run(&client, c, &mut out).await,
        Command::Push(a) => push::run(&client, a, &mut out).await,
        Command::Pull(a) => pull::run(&client, a, &mut out).await,
        Command::Log(a) => log::run(&client, a, &mut out).await,
        Command::Cat(a) => cat::run(&client, a, &mut out).await,
        Command::Diff(a) => diff::run(&client, a, &mut out).await,
        Command::History(a) => history::run(&client, a, &mut out).await,
        Command::Restore(a) => restore::run(&client, a, &mut out).await,
        Command::Status(a) => status::run(a, &mut out),
        Command::Syncd(_) => unreachable!("handled above"),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_commands() {
        let cli = Cli::try_parse_from(["podfs", "--json", "pull", "demo@3", "/tmp/x"]).unwrap();
        assert!(cli.json);
        match cli.command {
            Command::Pull(a) => {
                assert_eq!(a.target.workspace, "demo");
                assert_eq!(a.target.version, VersionRef::Number(3));
            }
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from(["podfs", "diff", "demo", "1", "head", "--gateway", "http://h:1"]).unwrap();
        assert_eq!(cli.gateway.as_deref(), Some("http://h:1"));
        assert!(matches!(cli.command, Command::Diff(d) if d.from == VersionRef::Number(1) && d.to == VersionRef::Head));
        assert!(Cli::try_parse_from(["podfs", "pull", "demo@x", "/tmp/x"]).is_err());
        assert!(Cli::try_parse_from(["podfs", "token", "create", "demo", "--right", "admin"]).is_err());
        assert!(Cli::try_parse_from(["podfs", "push", "demo", "dir", "-m", "msg"]).is_ok());
    }

    #[tokio::test]
    async fn usage_errors_exit_2_and_gateway_errors_exit_1() {
        let mut out = Vec::new();
        assert_eq!(run_with(["podfs", "bogus"], &mut out).await, ExitCode::from(2));
        // nothing listens on port 9 of localhost: a transport error, reported, exit 1
        let code = run_with(["podfs", "--gateway", "http://127.0.0.1:9", "log", "demo"], &mut out).await;
        assert_eq!(code, ExitCode::FAILURE);
        assert!(out.is_empty());
    }
}
