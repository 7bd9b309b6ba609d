//! Peers end to end: real `podfs syncd` devpods in network namespaces (`podfs-testnet
//! coldstart`) against PostgreSQL + Garage behind the S3 delay proxy, and a cold start whose
//! holder died before it asked. Needs root (namespaces, veth, tc), as CI has.

use std::path::PathBuf;
use std::time::Duration;

use podfs_testnet::coldstart::{self, Mode, Options, Report};

fn bin_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_podfs-s3-delay-proxy")).parent().expect("target dir").to_path_buf()
}

fn options(peers: usize, mode: Mode) -> Options {
    Options {
        peers,
        files: 400,
        s3_delay_ms: 5,
        mode,
        hostile: 0,
        hostile_mode: "flip".into(),
        zones: 1,
        staggered: false,
        devpod_mbit: 1000,
        services_mbit: 1000,
        timeout: Duration::from_secs(120),
        work_dir: None,
        bin_dir: Some(bin_dir()),
        tracker_down_after: None,
    }
}

async fn run(o: Options) -> Report {
    let _ = rustls::crypto::ring::default_provider().install_default();
    coldstart::run(&o).await.unwrap_or_else(|e| panic!("coldstart {o:?}: {e:#}"))
}

fn check_trees(r: &Report) {
    assert_eq!(r.corrupt_files, 0, "{r:#?}");
    assert!(r.peers.iter().all(|p| p.tree_equal), "{r:#?}");
    assert!(r.s3_bytes_one_copy > 0, "{r:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_devpods_cost_about_one_copy_of_s3_egress_with_peers_and_three_without() {
    let r = run(options(3, Mode::Peers)).await;
    check_trees(&r);
    let ratio = r.s3_bytes_total as f64 / r.s3_bytes_one_copy as f64;
    assert!(ratio <= 1.3, "peers: S3 egress {ratio:.2}x one copy: {r:#?}");
    let from_peers = r.peers.iter().filter(|p| p.bytes_from_peers > 0).count();
    assert!(from_peers >= 2, "two devpods take their units from the first: {r:#?}");
    assert!(r.peers.iter().map(|p| p.bytes_served).sum::<u64>() > 0);

    let r = run(options(3, Mode::S3)).await;
    check_trees(&r);
    let ratio = r.s3_bytes_total as f64 / r.s3_bytes_one_copy as f64;
    assert!(ratio >= 2.9, "S3 only: every devpod pays a copy, {ratio:.2}x: {r:#?}");
    assert!(r.peers.iter().all(|p| p.bytes_from_peers == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_peers_corrupt_nothing_and_every_cold_start_finishes() {
    // "exit": the holder dies halfway through serving a unit
    for mode in ["flip", "other", "truncate", "stall", "overlong", "exit"] {
        let mut o = options(3, Mode::Peers);
        o.hostile = 1;
        o.hostile_mode = mode.into();
        // the hostile devpod cold-starts first and holds the whole version when the others ask
        o.staggered = true;
        let r = run(o).await;
        check_trees(&r);
        let honest: Vec<_> = r.peers.iter().filter(|p| p.hostile.is_none()).collect();
        assert_eq!(honest.len(), 2);
        assert!(
            honest.iter().map(|p| p.source_failures).sum::<u64>() > 0,
            "{mode}: the hostile holder was asked and failed: {r:#?}"
        );
        if matches!(mode, "flip" | "other" | "overlong") {
            assert!(
                honest.iter().map(|p| p.verification_failures).sum::<u64>() > 0,
                "{mode}: bad bytes were caught by verification: {r:#?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_tracker_down_cold_starts_run_from_s3() {
    // the first devpod cold-starts with peers on; then the tracker breaks (its tables vanish);
    // the next ones plan in vain, each takes a copy from S3, and every tree is exact
    let mut o = options(3, Mode::Peers);
    o.staggered = true;
    o.tracker_down_after = Some(1);
    let r = run(o).await;
    check_trees(&r);
    let ratio = r.s3_bytes_total as f64 / r.s3_bytes_one_copy as f64;
    assert!(ratio >= 2.9, "{ratio:.2}x: {r:#?}");
    assert!(r.peers.iter().all(|p| p.bytes_from_s3 > 0 && p.bytes_from_peers == 0), "{r:#?}");
}
