//! podfs test network: the harness for end-to-end tests against real services (PostgreSQL and
//! an S3 server, Garage) on one machine.
//!
//! Start the services with `eval "$(scripts/dev-services up)"` (or run `scripts/test`); the
//! tests find them through the environment and fail, never skip, when it is missing.
//!
//! - [`services`]: where the services are ([`Services::from_env`]), a fresh database per test
//!   ([`fresh_database`], dropped with its [`TestDb`]) and a fresh S3 prefix per test
//!   ([`fresh_s3_prefix`]).
//! - [`proxy`]: [`FaultProxy`], a TCP proxy that takes PostgreSQL or S3 down and brings it back
//!   mid-operation, or delays new connections.
//! - [`s3`]: a small S3 client to look at the bucket: [`list_keys`] under a store URL's prefix,
//!   read, overwrite and delete objects.
//! - [`gateway`]: a gateway served in-process on a loopback port ([`gateway::TestGateway`]).
//! - [`tree`]: the edge-case test tree and an exact comparison of two trees.
//! - [`netns`]: a network of devpod namespaces behind a router, links limited with `tc`.
//! - [`coldstart`]: `podfs-testnet coldstart`, N devpods cold-starting one workspace at once.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod coldstart;
pub mod gateway;
pub mod netns;
pub mod proxy;
pub mod s3;
pub mod services;
pub mod tree;

pub use proxy::FaultProxy;
pub use s3::list_keys;
pub use services::{
    S3Env, Services, StoreUrl, TestDb, database_url_with_addr, fresh_database, fresh_s3_prefix, store_url_with_endpoint,
};

/// Options of a Phase 2 pull in tests: its content cache at `cache` (default size), 16
/// downloads at once, no progress bars, no forcing.
pub fn hydrate_options(cache: &std::path::Path) -> podfs_syncd::HydrateOptions {
    podfs_syncd::HydrateOptions {
        cache_dir: cache.to_path_buf(),
        cache_limit: podfs_syncd::cache::DEFAULT_LIMIT,
        concurrency: 16,
        progress: false,
        force: false,
        keep_local: false,
        peers: None,
    }
}
