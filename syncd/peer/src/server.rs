//! The serving side: one QUIC endpoint, one task per connection, one per stream. A request is
//! answered with a status byte and, for `OK`, the verified-streaming encoding of the unit from
//! the requested offset (validated against the outboard as it is read, so a copy that rotted
//! on disk ends the stream and is dropped from the shelf instead of being sent).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bao_tree::io::fsm::encode_ranges_validated;
use bao_tree::io::outboard::PreOrderMemOutboard;
use bao_tree::{ChunkNum, ChunkRanges};
use bytes::Bytes;
use iroh_io::AsyncStreamWriter;
use podfs_protocol::peer::{Capability, PeerId, REQUEST_HEAD, REQUEST_TAIL, Request, Status};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::shelf::Shelf;
use crate::tls::remote_id;

/// Limits of one server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Streams served at once; above it a request is answered `BUSY` at once.
    pub max_serving: usize,
    /// A request must arrive whole within this.
    pub request_timeout: Duration,
    /// How long a request for a unit this peer is still fetching waits for it.
    pub pending_wait: Duration,
    /// A write that makes no progress for this long (a slow or stalled reader) ends the stream.
    pub write_timeout: Duration,
    /// Misbehave on purpose (the testnet's hostile peers); `None` in production.
    pub hostile: Option<Hostile>,
}

/// The ways a hostile peer misbehaves, for tests and the testnet. Each must end in zero corrupt
/// files and a cold start that finishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hostile {
    /// One byte flipped after the first group.
    Flip,
    /// Every byte wrong: the bytes of some other content.
    Other,
    /// The stream ends cleanly halfway.
    Truncate,
    /// One write every 500 ms.
    Slowloris,
    /// `OK`, then nothing.
    Stall,
    /// The whole unit, then garbage as if it were longer.
    Overlong,
    /// The process dies halfway through a unit (a devpod killed while serving).
    Exit,
}

impl std::str::FromStr for Hostile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "flip" => Self::Flip,
            "other" => Self::Other,
            "truncate" => Self::Truncate,
            "slowloris" => Self::Slowloris,
            "stall" => Self::Stall,
            "overlong" => Self::Overlong,
            "exit" => Self::Exit,
            _ => {
                return Err(format!(
                    "unknown hostile mode {s:?}: flip, other, truncate, slowloris, stall, overlong, exit"
                ));
            }
        })
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_serving: 32,
            request_timeout: Duration::from_secs(2),
            pending_wait: Duration::from_secs(30),
            write_timeout: Duration::from_secs(5),
            hostile: None,
        }
    }
}

/// What a server did, for `--json` and the status file.
#[derive(Debug, Default)]
pub struct ServeStats {
    /// Streams being served now (the load a heartbeat reports).
    pub serving: AtomicU64,
    pub streams: AtomicU64,
    pub bytes_served: AtomicU64,
    pub busy: AtomicU64,
    pub denied: AtomicU64,
    pub not_held: AtomicU64,
    pub bad_requests: AtomicU64,
    /// Copies found corrupt while serving (dropped from the shelf).
    pub corrupt_copies: AtomicU64,
}

/// The gateway's capability key, learned when the daemon announces itself.
#[derive(Debug, Default)]
pub struct CapabilityKey(RwLock<Option<Vec<u8>>>);

impl CapabilityKey {
    pub fn set(&self, key: Vec<u8>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(key);
    }
    fn get(&self) -> Option<Vec<u8>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

struct Ctx {
    shelf: Arc<Shelf>,
    key: Arc<CapabilityKey>,
    limits: Limits,
    serving: Arc<Semaphore>,
    stats: Arc<ServeStats>,
}

/// Serves `shelf` on `endpoint` until `shutdown`.
pub async fn serve(
    endpoint: quinn::Endpoint,
    shelf: Arc<Shelf>,
    key: Arc<CapabilityKey>,
    limits: Limits,
    stats: Arc<ServeStats>,
    shutdown: CancellationToken,
) {
    let ctx = Arc::new(Ctx { shelf, key, limits, serving: Arc::new(Semaphore::new(limits.max_serving)), stats });
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            () = shutdown.cancelled() => break,
        };
        let Some(incoming) = incoming else { break };
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "peer handshake failed");
                    return;
                }
            };
            let Some(requester) = remote_id(&conn) else { return };
            while let Ok((send, recv)) = conn.accept_bi().await {
                let ctx = Arc::clone(&ctx);
                tokio::spawn(async move { handle(&ctx, requester, send, recv).await });
            }
        });
    }
    endpoint.close(0u32.into(), b"shutting down");
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

async fn read_request(recv: &mut quinn::RecvStream) -> Result<Request, podfs_protocol::peer::PeerError> {
    let bad = podfs_protocol::peer::PeerError::BadRequest;
    let mut head = [0u8; REQUEST_HEAD];
    recv.read_exact(&mut head).await.map_err(|_| bad("truncated"))?;
    let n = Request::capability_len(&head)?;
    let mut rest = vec![0u8; n + REQUEST_TAIL];
    recv.read_exact(&mut rest).await.map_err(|_| bad("truncated"))?;
    let mut all = head.to_vec();
    all.extend_from_slice(&rest);
    Request::decode(&all)
}

async fn answer(send: &mut quinn::SendStream, status: Status, counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
    let _ = send.write_all(&[status as u8]).await;
    let _ = send.finish();
}

async fn handle(ctx: &Ctx, requester: PeerId, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let stats = &ctx.stats;
    let req = match tokio::time::timeout(ctx.limits.request_timeout, read_request(&mut recv)).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) | Err(_) => return answer(&mut send, Status::BadRequest, &stats.bad_requests).await,
    };
    let Some(key) = ctx.key.get() else { return answer(&mut send, Status::Denied, &stats.denied).await };
    let cap = match Capability::verify(&req.capability, &key, &requester, now_ms()) {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(%requester, error = %e, "request denied");
            return answer(&mut send, Status::Denied, &stats.denied).await;
        }
    };
    // the same answer whether this peer holds the unit under another version or not at all
    let Some(slot) = ctx.shelf.slot(&cap.workspace, cap.version, &req.root).filter(|s| s.length == req.length) else {
        return answer(&mut send, Status::Denied, &stats.denied).await;
    };
    let Some(copy) = slot.ready_file(ctx.limits.pending_wait).await else {
        return answer(&mut send, Status::NotHeld, &stats.not_held).await;
    };
    // waiting for a pending unit holds no permit: it costs a stream of the requester's few
    let Ok(_permit) = Arc::clone(&ctx.serving).try_acquire_owned() else {
        return answer(&mut send, Status::Busy, &stats.busy).await;
    };
    let _load = Load::new(&stats.serving);
    let outboard = match slot.outboard(Arc::clone(&copy)).await {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(unit = %req.root, error = %e, "cannot serve a unit: its copy is unreadable");
            ctx.shelf.gone(&cap.workspace, cap.version, &req.root);
            return answer(&mut send, Status::NotHeld, &stats.not_held).await;
        }
    };
    let file = Window { file: copy, start: 0, buf: Bytes::new() };
    stats.streams.fetch_add(1, Ordering::Relaxed);
    if send.write_all(&[Status::Ok as u8]).await.is_err() {
        return;
    }
    let ob = PreOrderMemOutboard { root: outboard.root, tree: outboard.tree, data: &outboard.data[..] };
    let ranges = ChunkRanges::from(ChunkNum(req.offset / 1024)..);
    let hostile = ctx.limits.hostile;
    if hostile == Some(Hostile::Stall) {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    let mut out = Timed { send, timeout: ctx.limits.write_timeout, written: 0, hostile, half: req.length / 2 };
    match encode_ranges_validated(file, ob, &ranges, &mut out).await {
        Ok(()) => {
            stats.bytes_served.fetch_add(out.written, Ordering::Relaxed);
            if hostile == Some(Hostile::Overlong) {
                let _ = out.send.write_all(&vec![7u8; 1 << 20]).await;
            }
            let _ = out.send.finish();
        }
        Err(e) => {
            stats.bytes_served.fetch_add(out.written, Ordering::Relaxed);
            if matches!(
                e,
                bao_tree::io::EncodeError::LeafHashMismatch(_) | bao_tree::io::EncodeError::ParentHashMismatch(_)
            ) {
                stats.corrupt_copies.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(unit = %req.root, "a cached copy failed verification while serving; dropped");
                ctx.shelf.gone(&cap.workspace, cap.version, &req.root);
            }
            if hostile != Some(Hostile::Truncate) {
                let _ = out.send.reset(1u32.into());
            }
        }
    }
}

/// A stream writer whose every write must progress within `timeout`.
struct Timed {
    send: quinn::SendStream,
    timeout: Duration,
    written: u64,
    hostile: Option<Hostile>,
    half: u64,
}

impl Timed {
    async fn put(&mut self, data: &[u8]) -> std::io::Result<()> {
        let mut bad;
        let data = match self.hostile {
            None | Some(Hostile::Stall | Hostile::Overlong) => data,
            Some(Hostile::Flip) if self.written < 40_000 && self.written + data.len() as u64 >= 40_000 => {
                bad = data.to_vec();
                bad[0] ^= 1;
                &bad
            }
            Some(Hostile::Flip) => data,
            Some(Hostile::Other) => {
                bad = data.iter().map(|b| b ^ 0x55).collect();
                &bad
            }
            Some(Hostile::Truncate) if self.written >= self.half => {
                let _ = self.send.finish();
                return Err(std::io::Error::other("hostile: truncated"));
            }
            Some(Hostile::Truncate) => data,
            Some(Hostile::Exit) if self.written >= self.half => {
                tracing::warn!("hostile: exiting halfway through a unit");
                std::process::exit(9);
            }
            Some(Hostile::Exit) => data,
            Some(Hostile::Slowloris) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                data
            }
        };
        match tokio::time::timeout(self.timeout, self.send.write_all(data)).await {
            Ok(Ok(())) => {
                self.written += data.len() as u64;
                Ok(())
            }
            Ok(Err(e)) => Err(std::io::Error::other(e)),
            Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the reader stalled")),
        }
    }
}

impl AsyncStreamWriter for &mut Timed {
    async fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.put(data).await
    }
    async fn write_bytes(&mut self, data: Bytes) -> std::io::Result<()> {
        self.put(&data).await
    }
    async fn sync(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Reads a shared copy by position (`pread`: streams of one unit never move each other's
/// offset), a 1 MiB window at a time on a blocking thread, handing out the 16 KiB groups the
/// encoder asks for from it.
struct Window {
    file: Arc<std::fs::File>,
    start: u64,
    buf: Bytes,
}

const WINDOW: usize = 1 << 20;

impl iroh_io::AsyncSliceReader for Window {
    async fn read_at(&mut self, offset: u64, len: usize) -> std::io::Result<Bytes> {
        let inside = offset >= self.start && offset + len as u64 <= self.start + self.buf.len() as u64;
        if !inside {
            let file = Arc::clone(&self.file);
            let want = len.max(WINDOW);
            let buf = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; want];
                let mut n = 0;
                while n < want {
                    match file.read_at(&mut buf[n..], offset + n as u64)? {
                        0 => break,
                        k => n += k,
                    }
                }
                buf.truncate(n);
                Ok(buf)
            })
            .await
            .map_err(std::io::Error::other)??;
            self.start = offset;
            self.buf = Bytes::from(buf);
        }
        let from = (offset - self.start) as usize;
        let to = (from + len).min(self.buf.len());
        Ok(self.buf.slice(from.min(to)..to))
    }

    async fn size(&mut self) -> std::io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
}

/// Counts a stream as served while it lives.
struct Load<'a>(&'a AtomicU64);

impl<'a> Load<'a> {
    fn new(n: &'a AtomicU64) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Self(n)
    }
}

impl Drop for Load<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
