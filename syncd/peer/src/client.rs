//! The requesting side: one connection per server (pinned to the id the plan named), one
//! stream per unit request. Bytes are written to the caller's file only after their 16 KiB
//! group verified against the root the gateway stated; a failure reports how far the
//! verified prefix reaches, so the next source resumes there.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bao_tree::io::fsm::{ResponseDecoder, ResponseDecoderNext};
use bao_tree::io::{BaoContentItem, DecodeError};
use bao_tree::{BaoTree, ChunkNum, ChunkRanges};
use iroh_io::TokioStreamReader;
use podfs_protocol::ContentHash;
use podfs_protocol::peer::{PeerId, Request, Status};
use tokio::io::AsyncWriteExt;

use crate::shelf::BLOCK;
use crate::tls::{Identity, SERVER_NAME};

/// Why a source failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("cannot connect")]
    Connect,
    #[error("busy")]
    Busy,
    #[error("denied")]
    Denied,
    #[error("does not hold the unit")]
    NotHeld,
    #[error("refused the request as malformed")]
    BadRequest,
    /// Bytes that failed verification, an unknown status, or a stream running long: the peer
    /// is not to be asked again and is reported.
    #[error("sent bytes that failed verification")]
    Corrupt,
    #[error("made no progress in time")]
    Stalled,
    #[error("the stream broke off")]
    Broken,
    #[error("cannot write the local copy")]
    Local,
}

impl Failure {
    /// A failure that says the peer is hostile or broken, not merely busy or slow.
    pub fn is_misbehaviour(self) -> bool {
        self == Self::Corrupt
    }
}

/// A failed fetch: why, and how far the verified bytes written reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{failure} (verified up to byte {verified_to})")]
pub struct Failed {
    pub failure: Failure,
    pub verified_to: u64,
}

/// Where a unit can come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    pub peer: PeerId,
    pub addr: SocketAddr,
}

/// One unit to fetch, as the gateway stated it.
#[derive(Debug, Clone)]
pub struct Want<'a> {
    pub capability: &'a [u8],
    pub root: ContentHash,
    pub length: u64,
    /// A multiple of 16 KiB: the verified prefix already written.
    pub offset: u64,
    /// For the status and the first verified group (a holder still fetching the unit answers
    /// only once it has it).
    pub first_timeout: Duration,
    /// For every later group.
    pub progress_timeout: Duration,
}

/// Connections to other peers, made on demand and kept while they live.
pub struct Connector {
    endpoint: quinn::Endpoint,
    identity: Arc<Identity>,
    conns: tokio::sync::Mutex<HashMap<PeerId, quinn::Connection>>,
    connect_timeout: Duration,
}

impl Connector {
    pub fn new(endpoint: quinn::Endpoint, identity: Arc<Identity>, connect_timeout: Duration) -> Self {
        Self { endpoint, identity, conns: tokio::sync::Mutex::new(HashMap::new()), connect_timeout }
    }

    async fn connection(&self, to: Source) -> Result<quinn::Connection, Failure> {
        let mut conns = self.conns.lock().await;
        if let Some(c) = conns.get(&to.peer).filter(|c| c.close_reason().is_none()) {
            return Ok(c.clone());
        }
        let config = self.identity.client_config(to.peer).map_err(|_| Failure::Connect)?;
        let connecting = self.endpoint.connect_with(config, to.addr, SERVER_NAME).map_err(|_| Failure::Connect)?;
        let conn = match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::debug!(peer = %to.peer, addr = %to.addr, error = %e, "cannot connect to a peer");
                return Err(Failure::Connect);
            }
            Err(_) => return Err(Failure::Connect),
        };
        conns.insert(to.peer, conn.clone());
        Ok(conn)
    }

    /// Fetches `want` from `from` into `out`, which is positioned at `want.offset`: on success
    /// it holds the unit's bytes from there to the end, every group verified before it was
    /// written. On failure it holds the verified prefix [`Failed::verified_to`] reports.
    pub async fn fetch(&self, from: Source, want: &Want<'_>, out: &mut tokio::fs::File) -> Result<(), Failed> {
        let mut verified_to = want.offset;
        let failed = |failure, verified_to| Failed { failure, verified_to };
        let conn = self.connection(from).await.map_err(|f| failed(f, verified_to))?;
        let (mut send, mut recv) = tokio::time::timeout(want.first_timeout, conn.open_bi())
            .await
            .map_err(|_| failed(Failure::Stalled, verified_to))?
            .map_err(|_| failed(Failure::Broken, verified_to))?;
        let req =
            Request { capability: want.capability.to_vec(), root: want.root, length: want.length, offset: want.offset };
        send.write_all(&req.encode()).await.map_err(|_| failed(Failure::Broken, verified_to))?;
        let _ = send.finish();
        let mut status = [0u8];
        match tokio::time::timeout(want.first_timeout, recv.read_exact(&mut status)).await {
            Err(_) => return Err(failed(Failure::Stalled, verified_to)),
            Ok(Err(_)) => return Err(failed(Failure::Broken, verified_to)),
            Ok(Ok(_)) => {}
        }
        match Status::from_byte(status[0]) {
            Some(Status::Ok) => {}
            Some(Status::Busy) => return Err(failed(Failure::Busy, verified_to)),
            Some(Status::Denied) => return Err(failed(Failure::Denied, verified_to)),
            Some(Status::NotHeld) => return Err(failed(Failure::NotHeld, verified_to)),
            Some(Status::BadRequest) => return Err(failed(Failure::BadRequest, verified_to)),
            None => return Err(failed(Failure::Corrupt, verified_to)),
        }
        let tree = BaoTree::new(want.length, BLOCK);
        let ranges = ChunkRanges::from(ChunkNum(want.offset / 1024)..);
        let mut decoder =
            ResponseDecoder::new(blake3::Hash::from_bytes(want.root.0), ranges, tree, TokioStreamReader(recv));
        let mut timeout = want.first_timeout;
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
        let result = loop {
            let next = match tokio::time::timeout(timeout, decoder.next()).await {
                Ok(n) => n,
                Err(_) => break Err(Failure::Stalled),
            };
            match next {
                ResponseDecoderNext::More((d, item)) => {
                    decoder = d;
                    match item {
                        Ok(BaoContentItem::Parent(_)) => {}
                        Ok(BaoContentItem::Leaf(leaf)) => {
                            if leaf.offset != verified_to + buf.len() as u64 {
                                break Err(Failure::Corrupt);
                            }
                            buf.extend_from_slice(&leaf.data);
                            timeout = want.progress_timeout;
                            if buf.len() >= 1 << 20 {
                                if out.write_all(&buf).await.is_err() {
                                    break Err(Failure::Local);
                                }
                                verified_to += buf.len() as u64;
                                buf.clear();
                            }
                        }
                        Err(DecodeError::LeafHashMismatch(_) | DecodeError::ParentHashMismatch(_)) => {
                            break Err(Failure::Corrupt);
                        }
                        Err(_) => break Err(Failure::Broken),
                    }
                }
                ResponseDecoderNext::Done(mut rest) => {
                    // a stream that runs long past the unit is not a peer to trust again; one
                    // that verified whole but does not end is merely closed
                    let more = tokio::time::timeout(want.progress_timeout, rest.0.read(&mut [0u8; 1])).await;
                    break if matches!(more, Ok(Ok(Some(_)))) { Err(Failure::Corrupt) } else { Ok(()) };
                }
            }
        };
        // what verified before a failure is kept: the next source resumes after it
        if !buf.is_empty() {
            if out.write_all(&buf).await.is_err() {
                return Err(failed(Failure::Local, verified_to));
            }
            verified_to += buf.len() as u64;
        }
        if out.flush().await.is_err() {
            return Err(failed(Failure::Local, want.offset));
        }
        match result {
            Ok(()) if verified_to == want.length => Ok(()),
            Ok(()) => Err(failed(Failure::Corrupt, verified_to)),
            Err(f) => Err(failed(f, round_down(verified_to))),
        }
    }

    /// Drops the connection to a peer (after it misbehaved).
    pub async fn forget(&self, peer: PeerId) {
        if let Some(c) = self.conns.lock().await.remove(&peer) {
            c.close(0u32.into(), b"dropped");
        }
    }
}

/// Resumed requests start at a group boundary.
fn round_down(n: u64) -> u64 {
    n - n % podfs_protocol::peer::GROUP_BYTES
}
