//! The protocol between two real QUIC endpoints on loopback: verified fetches, resumption,
//! every capability refusal, single-flight waiting, limits and each hostile mode.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use podfs_protocol::ContentHash;
use podfs_protocol::peer::{Capability, PeerId, public_key};
use ring::rand::SystemRandom;
use ring::signature::Ed25519KeyPair;
use std::os::unix::fs::FileExt;

use tokio_util::sync::CancellationToken;

use super::*;

const WS: &str = "web-app";
const V: u64 = 3;

struct Net {
    gateway: Ed25519KeyPair,
    server_id: PeerId,
    server_addr: SocketAddr,
    shelf: Arc<Shelf>,
    stats: Arc<ServeStats>,
    client: Connector,
    client_id: PeerId,
    data: Vec<u8>,
    root: ContentHash,
    dir: tempfile::TempDir,
    stop: CancellationToken,
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A server holding one unit of `len` bytes, and a client.
async fn net(len: usize, limits: Limits) -> Net {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
    let gateway = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4099) as u8).collect();
    let root = ContentHash::of(&data);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("unit");
    std::fs::write(&path, &data).unwrap();
    let shelf = Arc::new(Shelf::default());
    shelf.offer(WS, V, [(root, len as u64)]);
    shelf.ready(WS, V, &root, std::fs::File::open(&path).unwrap());
    let server = Identity::generate().unwrap();
    let ep = endpoint(&server, "127.0.0.1:0".parse().unwrap()).unwrap();
    let server_addr = ep.local_addr().unwrap();
    let key = Arc::new(CapabilityKey::default());
    key.set(public_key(&gateway));
    let stats = Arc::new(ServeStats::default());
    let stop = CancellationToken::new();
    tokio::spawn(serve(ep, Arc::clone(&shelf), key, limits, Arc::clone(&stats), stop.clone()));
    let me = Arc::new(Identity::generate().unwrap());
    let client_id = me.id();
    let cep = endpoint(&me, "127.0.0.1:0".parse().unwrap()).unwrap();
    let client = Connector::new(cep, me, Duration::from_millis(500));
    Net { gateway, server_id: server.id(), server_addr, shelf, stats, client, client_id, data, root, dir, stop }
}

impl Net {
    fn cap(&self, requester: PeerId, ws: &str, version: u64, expires_at_ms: u64) -> Vec<u8> {
        Capability { requester, workspace: ws.into(), version, expires_at_ms }.sign(&self.gateway)
    }
    fn good_cap(&self) -> Vec<u8> {
        self.cap(self.client_id, WS, V, now_ms() + 60_000)
    }
    fn source(&self) -> Source {
        Source { peer: self.server_id, addr: self.server_addr }
    }
    async fn out(&self) -> (std::path::PathBuf, tokio::fs::File) {
        let p = self.dir.path().join(format!("out-{}", rand_name()));
        (p.clone(), tokio::fs::File::create(&p).await.unwrap())
    }
    async fn fetch(&self, cap: &[u8], root: ContentHash, offset: u64) -> (Result<(), Failed>, Vec<u8>) {
        let want = Want {
            capability: cap,
            root,
            length: self.data.len() as u64,
            offset,
            first_timeout: Duration::from_secs(2),
            progress_timeout: Duration::from_millis(300),
        };
        let (p, mut f) = self.out().await;
        let r = self.client.fetch(self.source(), &want, &mut f).await;
        drop(f);
        (r, std::fs::read(p).unwrap())
    }
}

fn rand_name() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

const LEN: usize = (3 << 20) + 5_000;

#[tokio::test]
async fn a_unit_arrives_whole_and_verified_and_resumes_from_an_offset() {
    let n = net(LEN, Limits::default()).await;
    let cap = n.good_cap();
    let (r, got) = n.fetch(&cap, n.root, 0).await;
    assert_eq!(r, Ok(()));
    assert!(got == n.data, "the fetched bytes differ");
    let at = 16 * 1024 * 10;
    let (r, got) = n.fetch(&cap, n.root, at).await;
    assert_eq!(r, Ok(()));
    assert!(got == n.data[at as usize..], "the resumed bytes differ");
    assert_eq!(n.stats.streams.load(std::sync::atomic::Ordering::Relaxed), 2);
}

#[tokio::test]
async fn capabilities_are_checked_and_say_nothing_about_other_units() {
    let n = net(100_000, Limits::default()).await;
    let deny = |r: Result<(), Failed>| assert_eq!(r.map_err(|f| f.failure), Err(Failure::Denied));
    let expired = n.cap(n.client_id, WS, V, now_ms() - 1);
    deny(n.fetch(&expired, n.root, 0).await.0);
    let someone_else = n.cap(PeerId(ContentHash::of(b"someone")), WS, V, now_ms() + 60_000);
    deny(n.fetch(&someone_else, n.root, 0).await.0);
    let other_ws = n.cap(n.client_id, "other-ws", V, now_ms() + 60_000);
    deny(n.fetch(&other_ws, n.root, 0).await.0);
    let other_version = n.cap(n.client_id, WS, V + 1, now_ms() + 60_000);
    deny(n.fetch(&other_version, n.root, 0).await.0);
    // a hash outside the version gets the same answer as one this peer does not hold at all
    deny(n.fetch(&n.good_cap(), ContentHash::of(b"not in the version"), 0).await.0);
    let forged = {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        let k = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        Capability { requester: n.client_id, workspace: WS.into(), version: V, expires_at_ms: now_ms() + 60_000 }
            .sign(&k)
    };
    deny(n.fetch(&forged, n.root, 0).await.0);
    assert_eq!(n.fetch(&n.good_cap(), n.root, 0).await.0, Ok(()));
}

#[tokio::test]
async fn a_holder_still_fetching_answers_once_it_has_the_unit() {
    let n = net(200_000, Limits::default()).await;
    let (later_root, len) = (n.root, n.data.len() as u64);
    // a second version whose unit is still being fetched
    n.shelf.offer(WS, V + 1, [(later_root, len)]);
    let cap = n.cap(n.client_id, WS, V + 1, now_ms() + 60_000);
    let (shelf, path) = (Arc::clone(&n.shelf), n.dir.path().join("unit"));
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        shelf.ready(WS, V + 1, &later_root, std::fs::File::open(path).unwrap());
    });
    let t = std::time::Instant::now();
    let (r, got) = n.fetch(&cap, later_root, 0).await;
    assert_eq!(r, Ok(()));
    assert!(got == n.data);
    assert!(t.elapsed() >= Duration::from_millis(300));
    // a fetch that fails answers NOT_HELD to those waiting
    n.shelf.offer(WS, V + 2, [(later_root, len)]);
    let cap = n.cap(n.client_id, WS, V + 2, now_ms() + 60_000);
    let shelf = Arc::clone(&n.shelf);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        shelf.settle(WS, V + 2);
    });
    assert_eq!(n.fetch(&cap, later_root, 0).await.0.map_err(|f| f.failure), Err(Failure::NotHeld));
}

#[tokio::test]
async fn a_server_at_its_cap_answers_busy_and_a_wrong_identity_is_refused() {
    let n = net(50_000, Limits { max_serving: 0, ..Limits::default() }).await;
    assert_eq!(n.fetch(&n.good_cap(), n.root, 0).await.0.map_err(|f| f.failure), Err(Failure::Busy));
    // a server that is not the peer the plan named: the handshake fails
    let want = Want {
        capability: &n.good_cap(),
        root: n.root,
        length: n.data.len() as u64,
        offset: 0,
        first_timeout: Duration::from_secs(1),
        progress_timeout: Duration::from_secs(1),
    };
    let (_, mut f) = n.out().await;
    let impostor = Source { peer: PeerId(ContentHash::of(b"expected")), addr: n.server_addr };
    assert_eq!(n.client.fetch(impostor, &want, &mut f).await.map_err(|f| f.failure), Err(Failure::Connect));
}

#[tokio::test]
async fn a_copy_that_rotted_on_the_server_is_not_served() {
    let n = net(300_000, Limits::default()).await;
    let path = n.dir.path().join("unit");
    let mut bad = n.data.clone();
    bad[200_000] ^= 1;
    // rewritten in place: the open copy the shelf holds sees it
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().write_all_at(&bad, 0).unwrap();
    assert_eq!(n.fetch(&n.good_cap(), n.root, 0).await.0.map_err(|f| f.failure), Err(Failure::NotHeld));
    assert!(matches!(n.shelf.slot(WS, V, &n.root).unwrap().state(), SlotState::Gone));
}

#[tokio::test]
async fn every_hostile_mode_fails_the_source_and_keeps_only_verified_bytes() {
    for (mode, expect) in [
        (Hostile::Flip, Failure::Corrupt),
        (Hostile::Other, Failure::Corrupt),
        (Hostile::Overlong, Failure::Corrupt),
        (Hostile::Truncate, Failure::Broken),
        (Hostile::Stall, Failure::Stalled),
        (Hostile::Slowloris, Failure::Stalled),
    ] {
        let n = net(LEN, Limits { hostile: Some(mode), ..Limits::default() }).await;
        let (r, got) = n.fetch(&n.good_cap(), n.root, 0).await;
        let f = r.expect_err(&format!("{mode:?} must fail"));
        assert_eq!(f.failure, expect, "{mode:?}");
        // whatever was written is a verified prefix, and the resumption point is inside it
        assert!(got.len() as u64 >= f.verified_to, "{mode:?}");
        assert!(got[..] == n.data[..got.len()], "{mode:?}: unverified bytes were written");
        assert_eq!(f.verified_to % (16 * 1024), 0, "{mode:?}");
        if mode == Hostile::Overlong {
            assert!(got == n.data, "overlong: the unit itself verified");
        }
        // the next source resumes from the verified prefix
        if f.verified_to > 0 {
            let honest = net(LEN, Limits::default()).await;
            let (r, rest) = honest.fetch(&honest.good_cap(), honest.root, f.verified_to).await;
            assert_eq!(r, Ok(()));
            assert!(rest == n.data[f.verified_to as usize..]);
        }
    }
}

#[tokio::test]
async fn concurrent_streams_of_one_unit_do_not_disturb_each_other() {
    let n = net(LEN, Limits::default()).await;
    let cap = n.good_cap();
    let offsets = [0, 16 * 1024, 0, 160 * 1024, 0, 1 << 20];
    let all = futures::future::join_all(offsets.iter().map(|o| n.fetch(&cap, n.root, *o))).await;
    for ((r, got), o) in all.into_iter().zip(offsets) {
        assert_eq!(r, Ok(()));
        assert!(got == n.data[o as usize..], "a stream from {o} got other bytes");
    }
    assert_eq!(n.stats.corrupt_copies.load(std::sync::atomic::Ordering::Relaxed), 0);
}
