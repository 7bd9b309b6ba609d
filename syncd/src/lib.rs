//! The devpod side of podfs: the `podfs` CLI (`push`, `pull`, `log`, `cat`, `diff`, `history`,
//! `workspace`, `token`); later the syncd daemon.
//!
//! The commands are library functions so tests can drive them in-process: [`push()`] and
//! [`pull()`] for the data path, [`run`] / [`run_with`] for the whole command line. This crate
//! talks to the gateway only through `podfs-client`; it never links the gateway.
//!
//! Pure logic lives apart from I/O: [`changes`] (change lists), [`manifest`] (manifest
//! validation) and [`target`] (`WORKSPACE@VERSION`) touch no files; [`scan`] reads a local tree,
//! [`restore`] writes one, confined below its root.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod cache;
pub mod cat;
pub mod changes;
pub mod cli;
pub mod daemon;
pub mod diff;
pub mod history;
pub mod hydrate;
pub mod log;
pub mod manifest;
pub mod output;
pub mod progress;
pub mod pull;
pub mod push;
pub mod restore;
pub mod restore_version;
pub mod rules;
pub mod scan;
pub mod target;
pub mod token;
pub mod workspace;

pub use cli::{Cli, run, run_with};
pub use hydrate::{HydrateOptions, HydrateReport, hydrate};
pub use podfs_client::Client;
pub use podfs_protocol::VersionRef;
pub use pull::{PullError, PullOptions, PullReport, pull};
pub use push::{PushError, PushOptions, PushReport, push};
pub use target::Target;
