//! Wire types shared by every podfs process.
//!
//! Everything that crosses a process boundary lives here: the content hash, the stored blob
//! format, packs and upload batches, the transfer frame, the peer protocol's capabilities and framing, workspace paths, tree entries and the REST v1 request and response bodies.
//! This crate is pure: no async runtime, no sockets, no files. Callers bring the bytes.

pub mod api;
pub mod blob;
pub mod frame;
pub mod hash;
pub mod pack;
pub mod path;
pub mod peer;
pub mod tree;

pub use hash::ContentHash;
pub use path::{PathError, WsPath};
pub use tree::{Change, Entry, EntryKind, VersionRef};
