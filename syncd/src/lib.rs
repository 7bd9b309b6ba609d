//! The devpod side of podfs: the `podfs` CLI and the syncd daemon, over one library.
//!
//! Rooms, and what may use what (no cycles; nothing below `cli` imports it):
//! - [`cli`]: clap arguments and printing, one file per command. The only module that knows
//!   about stdout, `--json` and exit codes.
//! - [`daemon`]: `podfs syncd`, the long-running watcher that turns every save into a version.
//! - [`transfer`]: moving trees between DIR and the gateway: [`push()`], [`pull()`] (Phase 1),
//!   [`hydrate()`] (Phase 2 and in-place switches), `podfs restore`.
//! - [`local`]: the local tree: ignore rules, scans and hashes, confined writes, the layout of
//!   `DIR/.podfs`. Blocking code, no network.
//! - Pure logic touching no files: [`changes`] (change lists), [`validate`] (tree checks of
//!   what a gateway sent).
//!
//! The content cache is its own crate, `podfs-cache` (re-exported as [`cache`]). This crate
//! talks to the gateway only through `podfs-client`; it never links the gateway.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod changes;
pub mod cli;
pub mod daemon;
pub mod local;
pub mod transfer;
pub mod validate;

pub use cli::{Cli, run, run_with};
pub use local::scan;
pub use podfs_cache as cache;
pub use podfs_client::Client;
pub use podfs_protocol::VersionRef;
pub use transfer::hydrate::{HydrateMode, HydrateOptions, HydrateReport, hydrate};
pub use transfer::pull::{PullError, PullOptions, PullReport, pull};
pub use transfer::push::{PushError, PushOptions, PushReport, push};
