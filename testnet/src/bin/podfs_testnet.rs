//! `podfs-testnet`: a network of devpods on this machine (needs root: network namespaces, veth,
//! `tc`), against a gateway on PostgreSQL and Garage (started with `scripts/dev-services up`
//! when the environment does not name them).
//!
//! ```text
//! podfs-testnet coldstart --peers N --files F --s3-delay-ms D --mode peers|s3 \
//!     [--hostile K [--hostile-mode flip|other|truncate|slowloris|stall|overlong|exit]] [--zones Z] \
//!     [--staggered] [--json]
//! ```

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use podfs_testnet::coldstart::{self, Mode, Options};

#[derive(Parser)]
#[command(name = "podfs-testnet", about = "Multi-devpod scenarios on one machine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// N devpods cold-start one workspace; prints S3 egress, per-devpod sources and timings.
    Coldstart {
        /// Devpods
        #[arg(long, default_value_t = 4)]
        peers: usize,
        /// Files of the generated node_modules-like workspace
        #[arg(long, default_value_t = 5000)]
        files: usize,
        /// Added to every S3 request
        #[arg(long, default_value_t = 20)]
        s3_delay_ms: u64,
        #[arg(long, value_enum, default_value_t = Mode::Peers)]
        mode: Mode,
        /// The first K devpods serve wrong bytes
        #[arg(long, default_value_t = 0)]
        hostile: usize,
        #[arg(long, default_value = "flip")]
        hostile_mode: String,
        /// Devpods are spread over this many zones (peers share only within one)
        #[arg(long, default_value_t = 1)]
        zones: usize,
        /// Start each devpod once the previous one finished its cold start
        #[arg(long)]
        staggered: bool,
        /// Rate of each devpod's link, Mbit/s
        #[arg(long, default_value_t = 1000)]
        devpod_mbit: u32,
        /// Rate of the services' link (S3 and the gateway), Mbit/s
        #[arg(long, default_value_t = 1000)]
        services_mbit: u32,
        /// A cold start taking longer fails the run, seconds
        #[arg(long, default_value_t = 300)]
        timeout_secs: u64,
        /// Directory for trees and caches [default: a temporary directory on /dev/shm]
        #[arg(long)]
        work_dir: Option<std::path::PathBuf>,
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // the services: from the environment, else from scripts/dev-services (this process re-runs
    // itself with what it printed, as the S3 SDK reads credentials from the environment)
    match coldstart::services_env() {
        Ok(vars) if !vars.is_empty() => {
            let status = std::env::current_exe()
                .and_then(|exe| std::process::Command::new(exe).args(std::env::args_os().skip(1)).envs(vars).status());
            return match status {
                Ok(s) if s.success() => ExitCode::SUCCESS,
                Ok(_) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("podfs-testnet: cannot re-run itself: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Ok(_) => {}
        Err(e) => {
            eprintln!("podfs-testnet: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("podfs-testnet: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Command::Coldstart {
        peers,
        files,
        s3_delay_ms,
        mode,
        hostile,
        hostile_mode,
        zones,
        staggered,
        devpod_mbit,
        services_mbit,
        timeout_secs,
        work_dir,
        json,
    } = cli.command;
    let o = Options {
        peers,
        files,
        s3_delay_ms,
        mode,
        hostile,
        hostile_mode,
        zones,
        staggered,
        devpod_mbit,
        services_mbit,
        timeout: Duration::from_secs(timeout_secs),
        work_dir,
        bin_dir: None,
        tracker_down_after: None,
    };
    match rt.block_on(coldstart::run(&o)) {
        Ok(r) if json => {
            println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Ok(r) => {
            println!(
                "{} devpods, {:?}{}: S3 egress {:.2}x one copy ({} of {} bytes), corrupt files {}, cold start p50 {:.2}s p99 {:.2}s max {:.2}s",
                r.devpods,
                r.mode,
                if r.staggered { " staggered" } else { "" },
                r.s3_bytes_total as f64 / r.s3_bytes_one_copy.max(1) as f64,
                r.s3_bytes_total,
                r.s3_bytes_one_copy,
                r.corrupt_files,
                r.seconds_p50,
                r.seconds_p99,
                r.seconds_max
            );
            for p in &r.peers {
                println!(
                    "  devpod {:>3} {} {:>6.2}s  peers {:>11} B  s3 {:>11} B  served {:>11} B{}{}",
                    p.index,
                    p.zone,
                    p.seconds,
                    p.bytes_from_peers,
                    p.bytes_from_s3,
                    p.bytes_served,
                    if p.tree_equal { "" } else { "  TREE DIFFERS" },
                    p.hostile.as_deref().map(|h| format!("  hostile ({h})")).unwrap_or_default()
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("podfs-testnet: {e:#}");
            ExitCode::FAILURE
        }
    }
}
