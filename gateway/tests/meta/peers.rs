//! The peer tracker's tables, in the metadata suite (run on SQLite and PostgreSQL).

use podfs_gateway::meta::*;
use podfs_protocol::peer::PeerId;

use super::{commit, file, h, record};

fn peer(name: &str) -> PeerId {
    PeerId(h(name))
}

fn seat<'a>(name: &str, zone: &'a str, address: &'a str) -> PeerSeat<'a> {
    PeerSeat { peer: peer(name), zone, address, serving: 0 }
}

pub(super) async fn case_peer_tracker_single_flight_and_exclusion(store: MetaStore) {
    let ws = store.create_workspace("tracked").await.unwrap();
    record(&store, &["m", "big"]).await;
    commit(&store, &ws, vec![file("f", "big")]).await;
    let units = [(h("manifest"), 100), (h("big"), 3)];
    let terms = PlanTerms { ttl_ms: 15_000, lease_ms: |_| 60_000, max_holders: 4 };
    // the first asker of a zone gets every lease: it fetches everything from S3
    let (holders, fetchers) =
        store.peer_plan(ws.id, 1, &seat("a", "z1", "10.0.0.1:7070"), &units, &[], &terms).await.unwrap();
    assert!(holders.is_empty());
    assert_eq!(fetchers.values().collect::<Vec<_>>(), [&peer("a"), &peer("a")]);
    // the next asker of the zone asks it (single flight), and knows where it is
    let (holders, fetchers) =
        store.peer_plan(ws.id, 1, &seat("b", "z1", "10.0.0.2:7070"), &units, &[], &terms).await.unwrap();
    assert_eq!(holders, [HolderRow { peer: peer("a"), address: "10.0.0.1:7070".into(), complete: false }]);
    assert!(fetchers.values().all(|p| *p == peer("a")));
    // another zone has leases of its own
    let (holders, fetchers) =
        store.peer_plan(ws.id, 1, &seat("c", "z2", "10.1.0.1:7070"), &units, &[], &terms).await.unwrap();
    assert!(holders.is_empty());
    assert!(fetchers.values().all(|p| *p == peer("c")));
    // a holder of the whole version comes first
    store.announce_peer(ws.id, &seat("b", "z1", "10.0.0.2:7070"), &[1], &[], 15_000).await.unwrap();
    let (holders, _) = store.peer_plan(ws.id, 1, &seat("d", "z1", "10.0.0.4:7070"), &units, &[], &terms).await.unwrap();
    assert_eq!(holders[0], HolderRow { peer: peer("b"), address: "10.0.0.2:7070".into(), complete: true });
    assert_eq!(holders.len(), 2);
    // excluding the fetcher (it died or lied) hands its leases to the asker and names it nowhere
    let (holders, fetchers) =
        store.peer_plan(ws.id, 1, &seat("d", "z1", "10.0.0.4:7070"), &units, &[peer("a")], &terms).await.unwrap();
    assert!(holders.iter().all(|x| x.peer != peer("a")), "{holders:?}");
    assert!(fetchers.values().all(|p| *p == peer("d")), "{fetchers:?}");
    // a peer reported by two requesters is handed out no more
    store.announce_peer(ws.id, &seat("d", "z1", "10.0.0.4:7070"), &[], &[peer("b")], 15_000).await.unwrap();
    let (holders, _) = store.peer_plan(ws.id, 1, &seat("e", "z1", "10.0.0.5:7070"), &units, &[], &terms).await.unwrap();
    assert!(holders.iter().any(|x| x.peer == peer("b")), "one report is not enough: {holders:?}");
    store.announce_peer(ws.id, &seat("e", "z1", "10.0.0.5:7070"), &[], &[peer("b")], 15_000).await.unwrap();
    let (holders, _) = store.peer_plan(ws.id, 1, &seat("f", "z1", "10.0.0.6:7070"), &units, &[], &terms).await.unwrap();
    assert!(holders.iter().all(|x| x.peer != peer("b")), "two reports exclude it: {holders:?}");
    // an announcement that expired is ignored
    store.announce_peer(ws.id, &seat("g", "z3", "10.2.0.1:7070"), &[1], &[], -1).await.unwrap();
    let (holders, _) = store.peer_plan(ws.id, 1, &seat("h", "z3", "10.2.0.2:7070"), &units, &[], &terms).await.unwrap();
    assert!(holders.is_empty(), "{holders:?}");
    // every replica signs with the same key: the first one stored wins
    let k1 = store.peer_signing_key(b"first").await.unwrap();
    let k2 = store.peer_signing_key(b"second").await.unwrap();
    assert_eq!((k1.as_slice(), k2.as_slice()), (&b"first"[..], &b"first"[..]));
    // the large contents of a version, for its plan
    assert_eq!(store.large_contents(ws.id, 1, 2, 10).await.unwrap(), [(h("big"), 3)]);
    assert!(store.large_contents(ws.id, 1, 3, 10).await.unwrap().is_empty());
}
