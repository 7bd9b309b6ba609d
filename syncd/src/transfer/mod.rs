//! Moving trees between a local directory and the gateway.
//!
//! - [`push`]: scan DIR, upload what the gateway lacks, commit the changes against head.
//! - [`plan`]: the one planner grouping a tree's entries by content (each distinct content is
//!   fetched once, whatever number of paths hold it).
//! - [`fetch`]: downloads from the blob store (presigned locations, refreshed when refused),
//!   verified, written through the confined writers of [`crate::local::write`].
//! - [`pull`]: Phase 1, one download per distinct content (`podfs pull --per-file`).
//! - [`hydrate`]: Phase 2, from manifest.sqlite and the content cache, fresh or as an in-place
//!   switch between versions (which syncd uses to bring other writers' changes to disk).
//! - [`restore`]: `podfs restore`, a new version equal to an old one.
//!
//! Async code here never blocks its runtime: file and SQLite work runs on blocking threads.

pub mod fetch;
pub mod hydrate;
pub mod peers;
pub mod plan;
pub mod progress;
pub mod pull;
pub mod push;
pub mod restore;

/// Runs blocking work (files, SQLite, hashing) on tokio's blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    use anyhow::Context;
    tokio::task::spawn_blocking(f).await.context("blocking task failed")?
}
