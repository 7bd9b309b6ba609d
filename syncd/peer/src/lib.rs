//! `podfs-peer/1` (`docs/peer-protocol.md`): devpods of one zone serving each other the units
//! of a workspace version (its manifest, its large files) over QUIC, every 16 KiB group
//! verified against the BLAKE3 root the gateway stated before it is written anywhere.
//!
//! - [`tls`]: the daemon's identity (a self-signed certificate whose hash is its peer id) and
//!   the QUIC / rustls configuration (mutual TLS 1.3, ring, no 0-RTT, LAN-sized windows).
//! - [`shelf`]: what this peer serves, per version: pending while it fetches, then ready.
//! - [`server`]: answers requests (capability checks, limits, verified streaming).
//! - [`client`]: fetches a unit from one peer into a file, verified, resumable.
//!
//! The gateway's tracker and the choice of sources live in the daemon (`podfs-syncd`).

pub mod client;
pub mod server;
pub mod shelf;
pub mod tls;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;

pub use client::{Connector, Failed, Failure, Source, Want};
pub use server::{CapabilityKey, Hostile, Limits, ServeStats, serve};
pub use shelf::{Shelf, SlotState};
pub use tls::Identity;

/// A QUIC endpoint on `addr` that serves with `identity` and connects out from the same socket.
pub fn endpoint(identity: &Identity, addr: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    Ok(quinn::Endpoint::server(identity.server_config()?, addr)?)
}
