//! Typed async client for the podfs gateway's REST API v1 (reqwest, rustls).
//!
//! One method per route, request and response bodies from `podfs_protocol::api`, one error
//! type ([`Error`]) with [`Error::is_retryable`]. What this crate does:
//! - keeps one tuned connection pool (HTTP/1.1 keep-alive, 128 idle connections per host), so
//!   64+ requests can be in flight at once;
//! - retries idempotent requests with exponential backoff and jitter (see [`retry`] for the
//!   policy); a commit is not resent once it reached the gateway;
//! - verifies every downloaded blob (length and BLAKE3) before handing out its content, in
//!   memory for small blobs ([`Client::fetch_blob`]) or streamed into a writer for large ones
//!   ([`Client::fetch_blob_to`]), and every manifest.sqlite against the hash the gateway states
//!   ([`Client::download_manifest`]).
//!
//! What it does not do: walk or write local trees (that is `podfs-syncd`), or decide what to
//! upload.
//!
//! The caller installs the rustls crypto provider (ring) at the start of its binary.

#![cfg_attr(test, allow(clippy::unwrap_used))]

mod blobs;
mod client;
mod error;
mod manifests;
mod peers;
pub mod retry;
mod versions;
mod workspaces;

pub use blobs::max_stored_len;
pub use client::{CONNECT_TIMEOUT, Client, DEFAULT_GATEWAY, POOL_IDLE_TIMEOUT, POOL_MAX_IDLE_PER_HOST, READ_TIMEOUT};
pub use error::{Error, Result};
pub use manifests::ManifestDownload;
pub use podfs_protocol as protocol;
pub use reqwest::StatusCode;
pub use retry::RetryPolicy;
pub use versions::FileResponse;
