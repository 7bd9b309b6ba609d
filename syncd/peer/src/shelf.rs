//! What this peer may serve: per workspace version, the units the gateway stated (root and
//! length), each pending while this peer fetches it, ready once a verified copy is on local
//! disk, or gone. A request waits a bounded time for a pending unit: that is how the holder of
//! a single-flight lease answers the peers that asked it while it fetched.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bao_tree::BlockSize;
use bao_tree::io::outboard::{PreOrderMemOutboard, PreOrderOutboard};
use podfs_protocol::ContentHash;
use tokio::sync::{OnceCell, watch};

/// Verified streaming in groups of 16 KiB (2^4 BLAKE3 chunks).
pub const BLOCK: BlockSize = BlockSize::from_chunk_log(4);

#[derive(Debug, Clone)]
pub enum SlotState {
    /// This peer is fetching it.
    Pending,
    /// A verified copy of exactly the unit's bytes, open (so that the cache moving or evicting
    /// the file does not pull it from under a stream; it is released when the slot goes).
    Ready(Arc<File>),
    /// Not here: the fetch failed, or the copy was evicted or found corrupt.
    Gone,
}

impl SlotState {
    pub fn is_pending(&self) -> bool {
        matches!(self, Self::Pending)
    }
    pub fn is_ready(&self) -> bool {
        matches!(self, Self::Ready(_))
    }
}

/// One unit of one version.
#[derive(Debug)]
pub struct Slot {
    pub root: ContentHash,
    pub length: u64,
    state: watch::Sender<SlotState>,
    /// The hash tree above the 16 KiB groups, computed from the ready copy on first request.
    outboard: OnceCell<Arc<PreOrderMemOutboard>>,
}

impl Slot {
    fn new(root: ContentHash, length: u64) -> Self {
        Self { root, length, state: watch::channel(SlotState::Pending).0, outboard: OnceCell::new() }
    }

    pub fn state(&self) -> SlotState {
        self.state.borrow().clone()
    }

    /// The ready copy, waiting up to `wait` while the unit is pending.
    pub async fn ready_file(&self, wait: Duration) -> Option<Arc<File>> {
        let mut rx = self.state.subscribe();
        let settled = tokio::time::timeout(wait, rx.wait_for(|s| !s.is_pending())).await;
        match settled {
            Ok(Ok(s)) => match &*s {
                SlotState::Ready(f) => Some(Arc::clone(f)),
                _ => None,
            },
            _ => None,
        }
    }

    /// The outboard of the ready copy `file` (hashed once, on a blocking thread). An error
    /// when the copy is not `length` bytes or does not hash to the root (it rotted on disk).
    pub async fn outboard(&self, file: Arc<File>) -> std::io::Result<Arc<PreOrderMemOutboard>> {
        let (root, length) = (self.root, self.length);
        self.outboard
            .get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || {
                    use bao_tree::io::sync::CreateOutboard;
                    if file.metadata()?.len() != length {
                        return Err(std::io::Error::other("the copy has another length"));
                    }
                    let ob = PreOrderOutboard::<Vec<u8>>::create_sized(
                        std::io::BufReader::with_capacity(1 << 20, At { file: &file, pos: 0 }),
                        length,
                        BLOCK,
                    )?;
                    if ob.root.as_bytes() != root.as_bytes() {
                        return Err(std::io::Error::other("the copy does not hash to its root"));
                    }
                    Ok(Arc::new(PreOrderMemOutboard { root: ob.root, tree: ob.tree, data: ob.data }))
                })
                .await
                .map_err(std::io::Error::other)?
            })
            .await
            .cloned()
    }
}

/// The units of one version, by root.
type Units = HashMap<ContentHash, Arc<Slot>>;

/// Versions this peer serves, keyed by workspace name and version.
#[derive(Debug, Default)]
pub struct Shelf {
    versions: Mutex<HashMap<(String, u64), Units>>,
}

impl Shelf {
    /// Starts serving `ws@version` with these units (root, length), all pending; units already
    /// listed keep their state.
    pub fn offer(&self, ws: &str, version: u64, units: impl IntoIterator<Item = (ContentHash, u64)>) {
        let mut all = self.lock();
        let slots = all.entry((ws.to_string(), version)).or_default();
        for (root, length) in units {
            slots.entry(root).or_insert_with(|| Arc::new(Slot::new(root, length)));
        }
    }

    /// `file` is a verified copy of a unit.
    pub fn ready(&self, ws: &str, version: u64, root: &ContentHash, file: File) {
        self.set(ws, version, root, SlotState::Ready(Arc::new(file)));
    }

    /// The unit is not here (its fetch failed; its copy was evicted or corrupt).
    pub fn gone(&self, ws: &str, version: u64, root: &ContentHash) {
        self.set(ws, version, root, SlotState::Gone);
    }

    /// Every unit not ready yet is gone (a cold start that ended, however it ended).
    pub fn settle(&self, ws: &str, version: u64) {
        let all = self.lock();
        if let Some(slots) = all.get(&(ws.to_string(), version)) {
            for s in slots.values() {
                s.state.send_if_modified(|st| {
                    let pending = st.is_pending();
                    if pending {
                        *st = SlotState::Gone;
                    }
                    pending
                });
            }
        }
    }

    /// Stops serving a version; requests waiting on its units get `NOT_HELD`.
    pub fn forget(&self, ws: &str, version: u64) {
        let removed = self.lock().remove(&(ws.to_string(), version));
        for s in removed.into_iter().flat_map(|m| m.into_values()) {
            s.state.send_replace(SlotState::Gone);
        }
    }

    /// Versions of `ws` whose every unit is ready, newest first.
    pub fn complete(&self, ws: &str) -> Vec<u64> {
        let all = self.lock();
        let mut v: Vec<u64> = all
            .iter()
            .filter(|((w, _), slots)| w == ws && slots.values().all(|s| s.state().is_ready()))
            .map(|((_, v), _)| *v)
            .collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        v
    }

    /// The slot of `root` in `ws@version`, if this peer serves it.
    pub fn slot(&self, ws: &str, version: u64, root: &ContentHash) -> Option<Arc<Slot>> {
        self.lock().get(&(ws.to_string(), version)).and_then(|s| s.get(root)).cloned()
    }

    fn set(&self, ws: &str, version: u64, root: &ContentHash, state: SlotState) {
        if let Some(s) = self.slot(ws, version, root) {
            s.state.send_replace(state);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, u64), Units>> {
        self.versions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Reads a shared file from the start by position (the file's own offset is left alone).
struct At<'a> {
    file: &'a File,
    pos: u64,
}

impl Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}
