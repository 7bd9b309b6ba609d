//! The podfs gateway: a stateless HTTP service over a metadata store (PostgreSQL, or SQLite for
//! the embedded default) and a content-addressed blob store (S3, or a local directory).
//!
//! Entry points: [`server::build`] turns a [`config::Config`] into an [`server::AppState`],
//! [`api::router`] into an axum `Router`, and [`server::serve`] runs it on a given listener
//! until a cancellation token fires.

pub mod api;
pub mod config;
pub mod error;
pub mod manifests;
pub mod meta;
pub mod server;
pub mod store;
