//! The devpod as a peer (`docs/peer-protocol.md`): a QUIC endpoint serving what this daemon
//! cold-started, the heartbeat that announces it, and the cold start's side: one plan from the
//! gateway, then each unit (the manifest, each large file) from peers of the zone before S3.
//!
//! Order of sources for a unit: holders of the whole version (least loaded first), then the
//! peer fetching it for the zone (single flight: it answers once it has the unit), then S3.
//! A failed source hands the verified prefix to the next peer, which resumes there; S3 starts
//! over (stored blobs are compressed, so they have no byte ranges of the content). A peer that
//! sent bytes failing verification is not asked again by this daemon and is reported.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use podfs_client::Client;
use podfs_peer::{CapabilityKey, Connector, Failure, Hostile, Identity, Limits, ServeStats, Shelf, Source, Want};
use podfs_protocol::ContentHash;
use podfs_protocol::api::{PeerAnnounce, PlanRequest, UnitKind};
use podfs_protocol::peer::PeerId;
use serde::Serialize;
use tokio::io::AsyncSeekExt;
use tokio_util::sync::CancellationToken;

/// A cold start waits this long for its plan before going S3-only (the first asker's plan
/// includes the build of the version's manifest, which S3-only would wait for too).
pub const PLAN_TIMEOUT: Duration = Duration::from_secs(60);
/// A holder of the whole version must start sending within this, and keep sending.
const HOLDER_TIMEOUT: Duration = Duration::from_secs(1);
/// Between verified groups from any peer.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(1);
/// Heartbeats: well within the tracker's 15 s expiry.
pub const HEARTBEAT: Duration = Duration::from_secs(5);

/// How a daemon serves and where.
#[derive(Debug, Clone)]
pub struct PeerSettings {
    /// UDP address the QUIC endpoint binds.
    pub listen: SocketAddr,
    /// The address other peers reach it at (the listen address unless it is unspecified).
    pub advertise: SocketAddr,
    pub zone: String,
    /// Misbehave when serving (the testnet's hostile peers).
    pub hostile: Option<Hostile>,
}

/// What the peer side did, for the status file and `--json`.
#[derive(Debug, Default)]
pub struct PeerFigures {
    /// Units fetched whole from peers, and their bytes.
    pub units: AtomicU64,
    pub bytes: AtomicU64,
    /// Sources that failed a unit (any reason), and those whose bytes failed verification.
    pub failures: AtomicU64,
    pub corrupt: AtomicU64,
    pub busy: AtomicU64,
    /// Units no peer could give, fetched from S3 instead.
    pub fallbacks: AtomicU64,
}

/// The figures as plain numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PeerReport {
    pub peer_id: String,
    pub address: String,
    pub zone: String,
    pub units_from_peers: u64,
    pub bytes_from_peers: u64,
    pub source_failures: u64,
    pub verification_failures: u64,
    pub busy_answers: u64,
    pub fallbacks_to_s3: u64,
    pub streams_served: u64,
    pub bytes_served: u64,
    pub requests_denied: u64,
    pub busy_served: u64,
}

/// This daemon's peer side.
pub struct PeerNode {
    pub id: PeerId,
    settings: PeerSettings,
    pub shelf: Arc<Shelf>,
    key: Arc<CapabilityKey>,
    serve_stats: Arc<ServeStats>,
    connector: Connector,
    /// Peers whose bytes failed verification: never asked again; reported once.
    bad: Mutex<HashSet<PeerId>>,
    reports: Mutex<Vec<PeerId>>,
    pub figures: PeerFigures,
}

impl std::fmt::Debug for PeerNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerNode").field("id", &self.id).field("settings", &self.settings).finish_non_exhaustive()
    }
}

/// A cold start's plan, as the hydration uses it. Its routes (who holds what) are replaced
/// when a source fails and the tracker is asked again.
#[derive(Debug)]
pub struct ColdPlan {
    pub ws: String,
    pub version: u64,
    capability: Vec<u8>,
    /// Every unit's length, by root.
    pub units: HashMap<ContentHash, u64>,
    pub manifest: ManifestUnit,
    client: Client,
    routes: Mutex<Arc<Routes>>,
    /// Peers that failed this cold start (dead, stalled, bad bytes): excluded from new plans.
    failed: Mutex<HashSet<PeerId>>,
    /// One re-plan at a time.
    replanning: tokio::sync::Mutex<()>,
}

/// Who to ask, per the latest plan.
#[derive(Debug, Default)]
struct Routes {
    generation: u64,
    /// Holders of the whole version, in the tracker's order.
    complete: Vec<Source>,
    /// Every named peer by id (holders and fetchers).
    addresses: HashMap<PeerId, Source>,
    /// Per unit, the peer fetching it for the zone; absent: this daemon holds the lease.
    fetchers: HashMap<ContentHash, PeerId>,
}

/// The manifest's unit: its stored frame, and the SQLite file it decompresses to.
#[derive(Debug, Clone, Copy)]
pub struct ManifestUnit {
    pub root: ContentHash,
    pub size: u64,
    pub file_hash: ContentHash,
    pub file_size: u64,
}

fn routes(p: &podfs_protocol::api::PeerPlan, generation: u64) -> Routes {
    let mut r = Routes { generation, ..Routes::default() };
    for h in &p.holders {
        let Ok(addr) = h.address.parse::<SocketAddr>() else { continue };
        let s = Source { peer: h.peer, addr };
        r.addresses.insert(h.peer, s);
        if h.complete {
            r.complete.push(s);
        }
    }
    r.fetchers = p.units.iter().filter_map(|u| u.fetcher.map(|f| (u.hash, f))).collect();
    r
}

impl PeerNode {
    /// Binds the endpoint and starts serving until `shutdown`.
    pub fn start(settings: PeerSettings, shutdown: CancellationToken) -> anyhow::Result<Arc<Self>> {
        let identity = Arc::new(Identity::generate()?);
        let endpoint = podfs_peer::endpoint(&identity, settings.listen)
            .with_context(|| format!("cannot serve peers on {}", settings.listen))?;
        let shelf = Arc::new(Shelf::default());
        let key = Arc::new(CapabilityKey::default());
        let serve_stats = Arc::new(ServeStats::default());
        let limits = Limits { hostile: settings.hostile, ..Limits::default() };
        if let Some(h) = settings.hostile {
            tracing::warn!(mode = ?h, "serving peers HOSTILE on purpose (testnet)");
        }
        tokio::spawn(podfs_peer::serve(
            endpoint.clone(),
            Arc::clone(&shelf),
            Arc::clone(&key),
            limits,
            Arc::clone(&serve_stats),
            shutdown,
        ));
        let connector = Connector::new(endpoint, Arc::clone(&identity), Duration::from_millis(500));
        tracing::info!(id = %identity.id(), listen = %settings.listen, zone = %settings.zone, "serving peers");
        Ok(Arc::new(Self {
            id: identity.id(),
            settings,
            shelf,
            key,
            serve_stats,
            connector,
            bad: Mutex::default(),
            reports: Mutex::default(),
            figures: PeerFigures::default(),
        }))
    }

    pub fn report(&self) -> PeerReport {
        let f = &self.figures;
        let s = &self.serve_stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PeerReport {
            peer_id: self.id.to_string(),
            address: self.settings.advertise.to_string(),
            zone: self.settings.zone.clone(),
            units_from_peers: l(&f.units),
            bytes_from_peers: l(&f.bytes),
            source_failures: l(&f.failures),
            verification_failures: l(&f.corrupt),
            busy_answers: l(&f.busy),
            fallbacks_to_s3: l(&f.fallbacks),
            streams_served: l(&s.streams),
            bytes_served: l(&s.bytes_served),
            requests_denied: l(&s.denied),
            busy_served: l(&s.busy),
        }
    }

    /// One heartbeat: where this daemon serves `ws`, the versions it holds whole, and the peers
    /// it reports.
    pub async fn announce(&self, client: &Client, ws: &str) -> anyhow::Result<()> {
        let reports = std::mem::take(&mut *lock(&self.reports));
        let mut versions = self.shelf.complete(ws);
        versions.truncate(16);
        let a = PeerAnnounce {
            peer: self.id,
            zone: self.settings.zone.clone(),
            address: self.settings.advertise.to_string(),
            serving: u32::try_from(self.serve_stats.serving.load(Ordering::Relaxed)).unwrap_or(u32::MAX),
            versions,
            reports: reports.clone(),
        };
        match client.announce_peer(ws, &a).await {
            Ok(r) => {
                if let Ok(k) = hex::decode(&r.capability_key) {
                    self.key.set(k);
                }
                Ok(())
            }
            Err(e) => {
                lock(&self.reports).extend(reports);
                Err(e).context("cannot announce to the tracker")
            }
        }
    }

    /// The plan of a cold start of `ws@version`, or `None` (tracker down or slow: S3-only).
    /// Its units are offered on the shelf as pending at once, so that peers the tracker sends
    /// here wait for them instead of being refused.
    pub async fn plan(&self, client: &Client, ws: &str, version: u64) -> Option<Arc<ColdPlan>> {
        let req = PlanRequest {
            peer: self.id,
            zone: self.settings.zone.clone(),
            address: self.settings.advertise.to_string(),
            exclude: Vec::new(),
        };
        let p = match tokio::time::timeout(PLAN_TIMEOUT, client.peer_plan(ws, version, &req)).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "no peer plan; cold start from S3 only");
                return None;
            }
            Err(_) => {
                tracing::warn!("the peer plan timed out; cold start from S3 only");
                return None;
            }
        };
        let capability = hex::decode(&p.capability).ok()?;
        if let Ok(k) = hex::decode(&p.capability_key) {
            self.key.set(k);
        }
        let manifest = p.units.iter().find(|u| u.kind == UnitKind::Manifest).and_then(|u| {
            Some(ManifestUnit { root: u.hash, size: u.size, file_hash: u.file_hash?, file_size: u.file_size? })
        })?;
        self.shelf.offer(ws, p.version, p.units.iter().map(|u| (u.hash, u.size)));
        let r = routes(&p, 0);
        tracing::info!(version = p.version, holders = r.complete.len(), named = r.addresses.len(), "peer plan");
        let units = p.units.into_iter().map(|u| (u.hash, u.size)).collect();
        Some(Arc::new(ColdPlan {
            ws: ws.to_string(),
            version: p.version,
            capability,
            units,
            manifest,
            client: client.clone(),
            routes: Mutex::new(Arc::new(r)),
            failed: Mutex::default(),
            replanning: tokio::sync::Mutex::new(()),
        }))
    }

    /// Asks the tracker again, excluding every peer that failed this cold start, unless
    /// another task did since routes of `generation` were read.
    async fn replan(&self, plan: &ColdPlan, generation: u64) {
        let _one = plan.replanning.lock().await;
        if lock(&plan.routes).generation != generation {
            return;
        }
        let req = PlanRequest {
            peer: self.id,
            zone: self.settings.zone.clone(),
            address: self.settings.advertise.to_string(),
            exclude: lock(&plan.failed).iter().copied().take(16).collect(),
        };
        match tokio::time::timeout(PLAN_TIMEOUT, plan.client.peer_plan(&plan.ws, plan.version, &req)).await {
            Ok(Ok(p)) => {
                let r = routes(&p, generation + 1);
                tracing::info!(holders = r.complete.len(), named = r.addresses.len(), "peer plan renewed");
                *lock(&plan.routes) = Arc::new(r);
            }
            _ => {
                // no tracker: the rest comes from S3; mark the routes tried
                *lock(&plan.routes) = Arc::new(Routes { generation: generation + 1, ..Routes::default() });
            }
        }
    }

    /// Fetches unit `root` of `plan` from peers into `out` (empty, at offset 0). True when it
    /// holds the whole unit, every byte verified; false when no peer could give it (whatever
    /// `out` holds then is to be discarded). When the sources of the plan fail, the tracker is
    /// asked once more (without them) before giving up.
    pub async fn fetch_unit(&self, plan: &ColdPlan, root: ContentHash, out: &mut tokio::fs::File) -> bool {
        let Some(&size) = plan.units.get(&root) else { return false };
        let mut offset = 0u64;
        let mut tried = false;
        for round in 0..2 {
            let r = Arc::clone(&*lock(&plan.routes));
            let mut sources: Vec<(Source, Duration)> = r.complete.iter().map(|s| (*s, HOLDER_TIMEOUT)).collect();
            let fetcher = r.fetchers.get(&root).filter(|f| **f != self.id).and_then(|f| r.addresses.get(f));
            if let Some(f) = fetcher.filter(|f| !sources.iter().any(|(s, _)| s.peer == f.peer)) {
                // it answers once it fetched the unit from S3: give it that long
                sources.push((*f, fetch_time(size)));
            }
            let mut failed_here = false;
            for (source, first_timeout) in sources {
                if source.peer == self.id || lock(&self.bad).contains(&source.peer) {
                    continue;
                }
                if round > 0 && lock(&plan.failed).contains(&source.peer) {
                    continue;
                }
                tried = true;
                match self.try_source(plan, source, first_timeout, root, size, &mut offset, out).await {
                    Some(true) => return true,
                    Some(false) => {
                        failed_here = true;
                    }
                    None => return false,
                }
            }
            if !failed_here || round == 1 {
                break;
            }
            self.replan(plan, r.generation).await;
        }
        if tried {
            self.figures.fallbacks.fetch_add(1, Ordering::Relaxed);
        }
        false
    }

    /// One source: `Some(true)` the unit is whole in `out`, `Some(false)` it failed (`out`
    /// holds the verified prefix up to `offset`), `None` the local copy cannot be written.
    #[allow(clippy::too_many_arguments)]
    async fn try_source(
        &self,
        plan: &ColdPlan,
        source: Source,
        first_timeout: Duration,
        root: ContentHash,
        length: u64,
        offset: &mut u64,
        out: &mut tokio::fs::File,
    ) -> Option<bool> {
        let want = Want {
            capability: &plan.capability,
            root,
            length,
            offset: *offset,
            first_timeout,
            progress_timeout: PROGRESS_TIMEOUT,
        };
        let f = match self.connector.fetch(source, &want, out).await {
            Ok(()) => {
                self.figures.units.fetch_add(1, Ordering::Relaxed);
                self.figures.bytes.fetch_add(length - *offset, Ordering::Relaxed);
                return Some(true);
            }
            Err(f) => f,
        };
        self.figures.failures.fetch_add(1, Ordering::Relaxed);
        match f.failure {
            Failure::Corrupt => {
                self.figures.corrupt.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer = %source.peer, unit = %root, "a peer sent bytes that failed verification; dropped and reported");
                lock(&self.bad).insert(source.peer);
                lock(&self.reports).push(source.peer);
                lock(&plan.failed).insert(source.peer);
                self.connector.forget(source.peer).await;
            }
            Failure::Busy => {
                self.figures.busy.fetch_add(1, Ordering::Relaxed);
            }
            other => {
                tracing::debug!(peer = %source.peer, unit = %root, failure = %other, "peer source failed");
                if !matches!(other, Failure::Denied | Failure::BadRequest) {
                    lock(&plan.failed).insert(source.peer);
                }
            }
        }
        // keep the verified prefix for the next peer
        if f.verified_to > *offset && out.set_len(f.verified_to).await.is_ok() {
            *offset = f.verified_to;
        } else if out.set_len(*offset).await.is_err() {
            return None;
        }
        if out.seek(std::io::SeekFrom::Start(*offset)).await.is_err() {
            return None;
        }
        Some(false)
    }
}

/// How long the peer fetching a unit for the zone may take before it answers: what fetching
/// `size` bytes from S3 at 20 MB/s takes, plus 5 s, at most a minute.
fn fetch_time(size: u64) -> Duration {
    Duration::from_secs(5).saturating_add(Duration::from_millis(size / 20_000)).min(Duration::from_secs(60))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
