//! `podfs-testnet coldstart`: N devpods, each a real `podfs syncd` in its own network namespace,
//! cold-start one workspace at once (or one after another), with peers or from S3 only, against
//! a gateway on PostgreSQL and Garage behind the S3 delay proxy. Every tree is compared byte
//! for byte with the pushed one; S3 egress is what the proxy counted.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::gateway::{ADMIN_TOKEN, TestGateway};
use crate::netns::Net;
use crate::services::{Services, fresh_database, fresh_s3_prefix, store_url_with_endpoint};

/// Where every devpod serves peers.
const PEER_PORT: u16 = 7070;
const WORKSPACE: &str = "coldstart";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Devpods serve each other (podfs-peer/1) and fall back to S3.
    Peers,
    /// Every devpod from S3 (and the gateway) only.
    S3,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub peers: usize,
    pub files: usize,
    pub s3_delay_ms: u64,
    pub mode: Mode,
    /// The first K devpods serve wrong bytes (in `peers` mode).
    pub hostile: usize,
    pub hostile_mode: String,
    pub zones: usize,
    /// One devpod after another (each once the previous finished), instead of all at once.
    pub staggered: bool,
    pub devpod_mbit: u32,
    pub services_mbit: u32,
    /// A cold start taking longer fails the run.
    pub timeout: Duration,
    /// Where trees and caches go (a tmpfs by default).
    pub work_dir: Option<PathBuf>,
    /// Where `podfs` and `podfs-s3-delay-proxy` are [default: beside this executable].
    pub bin_dir: Option<PathBuf>,
    /// Take the tracker down (its tables vanish from the database, so every announcement and
    /// plan fails) once this many devpods finished their cold start.
    pub tracker_down_after: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PeerResult {
    pub index: usize,
    pub zone: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostile: Option<String>,
    pub tree_equal: bool,
    /// Files (and symlinks) whose content, mode or target differs from the pushed tree.
    pub corrupt_files: u64,
    pub seconds: f64,
    pub bytes_from_peers: u64,
    pub bytes_from_s3: u64,
    pub bytes_served: u64,
    pub verification_failures: u64,
    pub source_failures: u64,
    pub fallbacks_to_s3: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mode: Mode,
    pub staggered: bool,
    pub devpods: usize,
    pub files: usize,
    pub tree_bytes: u64,
    pub s3_delay_ms: u64,
    pub zones: usize,
    pub hostile: usize,
    /// Bytes S3 sent during the cold starts (the proxy's count: the gateway's reads included).
    pub s3_bytes_total: u64,
    pub s3_requests: u64,
    /// What one S3-only cold start of the same version took from S3, measured first.
    pub s3_bytes_one_copy: u64,
    pub corrupt_files: u64,
    pub seconds_p50: f64,
    pub seconds_p99: f64,
    pub seconds_max: f64,
    pub peers: Vec<PeerResult>,
}

/// A binary in `dir`, else next to this one (`podfs`, `podfs-s3-delay-proxy`).
fn sibling(dir: Option<&Path>, name: &str) -> anyhow::Result<PathBuf> {
    let p = match dir {
        Some(d) => d.join(name),
        None => std::env::current_exe()?.with_file_name(name),
    };
    if !p.exists() {
        bail!("{} is missing: build the workspace (cargo build --release --workspace)", p.display());
    }
    Ok(p)
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// The services from the environment, else from `scripts/dev-services up` (which installs and
/// starts what is missing): the variables it prints.
pub fn services_env() -> anyhow::Result<Vec<(String, String)>> {
    if Services::from_env().is_ok() {
        return Ok(Vec::new());
    }
    let out = std::process::Command::new(repo().join("scripts/dev-services"))
        .arg("up")
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run scripts/dev-services up")?;
    if !out.status.success() {
        bail!("scripts/dev-services up failed");
    }
    let mut vars = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(rest) = line.strip_prefix("export ") else { continue };
        let Some((k, v)) = rest.split_once('=') else { continue };
        vars.push((k.to_string(), v.trim_matches('\'').to_string()));
    }
    Ok(vars)
}

struct Devpod {
    index: usize,
    zone: String,
    hostile: Option<String>,
    dir: PathBuf,
    child: Child,
}

/// The proxy's counters.
async fn proxy_stats(http: &reqwest::Client, proxy: SocketAddr, reset: bool) -> anyhow::Result<(u64, u64)> {
    let url = format!("http://{proxy}/__podfs_proxy/{}", if reset { "reset" } else { "stats" });
    let req = if reset { http.post(&url) } else { http.get(&url) };
    let v: serde_json::Value = req.send().await?.error_for_status()?.json().await?;
    let n = |k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    Ok((n("bytes_out"), n("requests")))
}

/// Runs the scenario and tears everything down, however it ends.
pub async fn run(o: &Options) -> anyhow::Result<Report> {
    if o.peers == 0 || o.zones == 0 || o.zones > o.peers {
        bail!("need at least one devpod and 1 to --peers zones");
    }
    if o.hostile >= o.peers {
        bail!("--hostile must leave at least one honest devpod");
    }
    if o.hostile > 0 && o.mode == Mode::S3 {
        bail!("--hostile needs --mode peers");
    }
    let services = Services::from_env()?;
    let podfs = sibling(o.bin_dir.as_deref(), "podfs")?;
    let proxy_bin = sibling(o.bin_dir.as_deref(), "podfs-s3-delay-proxy")?;
    let work = match &o.work_dir {
        Some(d) => tempfile::tempdir_in(d)?,
        None if Path::new("/dev/shm").is_dir() => tempfile::tempdir_in("/dev/shm")?,
        None => tempfile::tempdir()?,
    };
    // devpod peers + 1: the last one measures one S3-only copy first
    let net = Net::create(o.peers + 1, o.devpod_mbit, o.services_mbit)?;
    let db = fresh_database(&services.pg_admin_url).await?;
    let result = scenario(o, &services, &net, &db.url, &podfs, &proxy_bin, work.path()).await;
    drop(net);
    db.cleanup().await;
    result
}

#[allow(clippy::too_many_arguments)]
async fn scenario(
    o: &Options,
    services: &Services,
    net: &Net,
    db_url: &str,
    podfs: &Path,
    proxy_bin: &Path,
    work: &Path,
) -> anyhow::Result<Report> {
    let upstream = services.s3.endpoint.clone().context("the testnet needs an S3 endpoint (Garage)")?;
    let proxy_addr = SocketAddr::from((Net::HOST, free_port(Net::HOST)?));
    let mut proxy = std::process::Command::new(proxy_bin)
        .args(["--listen", &proxy_addr.to_string(), "--upstream", &upstream, "--delay-ms", &o.s3_delay_ms.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start the S3 delay proxy")?;
    let result = async {
        let http = reqwest::Client::new();
        wait_for(|| async { proxy_stats(&http, proxy_addr, false).await.is_ok() }, Duration::from_secs(10)).await?;
        let store = store_url_with_endpoint(&fresh_s3_prefix(&services.s3.store_url), &format!("http://{proxy_addr}"))?;
        let gw = TestGateway::with_services_at(db_url, &store, SocketAddr::from((Net::HOST, 0))).await?;
        let r = devpods(o, net, &gw, &http, proxy_addr, podfs, work, db_url).await;
        let _ = gw.stop().await;
        r
    }
    .await;
    let _ = proxy.kill();
    let _ = proxy.wait();
    result
}

#[allow(clippy::too_many_arguments)]
async fn devpods(
    o: &Options,
    net: &Net,
    gw: &TestGateway,
    http: &reqwest::Client,
    proxy: SocketAddr,
    podfs: &Path,
    work: &Path,
    db_url: &str,
) -> anyhow::Result<Report> {
    let client = gw.client();
    client.create_workspace(WORKSPACE).await?;
    let src = work.join("src");
    let generated = std::process::Command::new("python3")
        .arg(repo().join("benches/gen_tree.py"))
        .args(["--profile", "node_modules"])
        .arg(&src)
        .args([o.files.to_string(), "1".into()])
        .status()
        .context("cannot run benches/gen_tree.py")?;
    if !generated.success() {
        bail!("benches/gen_tree.py failed");
    }
    let (ok, out) = gw.cli(&["push", WORKSPACE, &src.to_string_lossy()]).await;
    if !ok {
        bail!("push failed: {out}");
    }
    let expected = crate::tree::read_tree(&src)?;
    let tree_bytes = expected
        .values()
        .map(|n| match n {
            crate::tree::Node::File(_, _, len) => *len,
            _ => 0,
        })
        .sum();
    // build the manifest now: every mode pays for it the same, and not in the figures
    let scratch = tempfile::tempfile_in(work)?;
    client.download_manifest(WORKSPACE, podfs_protocol::VersionRef::Number(1), None, scratch).await?;

    // one S3-only copy, on the last devpod
    let calib = o.peers + 1;
    proxy_stats(http, proxy, true).await?;
    let mut d = vec![start(net, gw, podfs, work, calib, "calibration".into(), None, None)?];
    await_cold(&mut d, o.timeout).await?;
    let (s3_bytes_one_copy, _) = proxy_stats(http, proxy, true).await?;
    let one = stop_and_check(d, &expected).await?;
    if !one.iter().all(|p| p.tree_equal) {
        bail!("the S3-only calibration devpod's tree differs from the pushed one");
    }

    // every devpod runs (and serves) until the last cold start is done
    let mut running = Vec::new();
    for i in 1..=o.peers {
        if o.tracker_down_after == Some(i - 1) {
            tracker_down(db_url).await?;
        }
        let zone = format!("z{}", (i - 1) % o.zones);
        let hostile = (i <= o.hostile).then(|| o.hostile_mode.clone());
        let peer = (o.mode == Mode::Peers).then_some(zone.as_str());
        running.push(start(net, gw, podfs, work, i, zone.clone(), peer, hostile.as_deref())?);
        if o.staggered {
            await_cold(&mut running, o.timeout).await?;
        }
    }
    await_cold(&mut running, o.timeout).await?;
    let (s3_bytes_total, s3_requests) = proxy_stats(http, proxy, false).await?;
    let results = stop_and_check(running, &expected).await?;
    let mut secs: Vec<f64> = results.iter().map(|r| r.seconds).collect();
    secs.sort_by(f64::total_cmp);
    let pct = |p: f64| secs[((secs.len() as f64 * p).ceil() as usize).clamp(1, secs.len()) - 1];
    Ok(Report {
        mode: o.mode,
        staggered: o.staggered,
        devpods: o.peers,
        files: o.files,
        tree_bytes,
        s3_delay_ms: o.s3_delay_ms,
        zones: o.zones,
        hostile: o.hostile,
        s3_bytes_total,
        s3_requests,
        s3_bytes_one_copy,
        corrupt_files: results.iter().map(|r| r.corrupt_files).sum(),
        seconds_p50: pct(0.5),
        seconds_p99: pct(0.99),
        seconds_max: secs.last().copied().unwrap_or(0.0),
        peers: results,
    })
}

/// Breaks the tracker: its table of versions held disappears, so announcements and plans fail.
async fn tracker_down(db_url: &str) -> anyhow::Result<()> {
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(db_url).await?;
    sqlx::raw_sql("ALTER TABLE peer_versions RENAME TO peer_versions_down").execute(&mut c).await?;
    Ok(())
}

/// Starts devpod `i`'s syncd into an empty directory.
#[allow(clippy::too_many_arguments)]
fn start(
    net: &Net,
    gw: &TestGateway,
    podfs: &Path,
    work: &Path,
    i: usize,
    zone: String,
    peer_zone: Option<&str>,
    hostile: Option<&str>,
) -> anyhow::Result<Devpod> {
    let dir = work.join(format!("devpod-{i}"));
    std::fs::create_dir_all(dir.join("tree"))?;
    let log = std::fs::File::create(dir.join("syncd.log"))?;
    let mut c = net.command(i, podfs);
    c.args(["--gateway", &gw.url, "--token", ADMIN_TOKEN, "syncd", "--workspace", WORKSPACE])
        .arg(dir.join("tree"))
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log);
    if let Some(z) = peer_zone {
        c.args(["--peer-listen", &SocketAddr::from((Net::devpod_ip(i), PEER_PORT)).to_string(), "--zone", z]);
    }
    if let Some(h) = hostile {
        c.args(["--peer-hostile", h]);
    }
    let child = c.spawn().context("cannot start podfs syncd in its namespace")?;
    Ok(Devpod { index: i, zone, hostile: hostile.map(str::to_string), dir, child })
}

/// Waits until every devpod finished its cold start.
async fn await_cold(pods: &mut [Devpod], timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut cold: Vec<bool> = pods.iter().map(|_| false).collect();
    while cold.iter().any(|c| !c) {
        for (p, c) in pods.iter_mut().zip(cold.iter_mut()).filter(|(_, c)| !**c) {
            if read_status(&p.dir).is_some_and(|s| s.get("cold_start").is_some()) {
                *c = true;
                continue;
            }
            if let Ok(Some(status)) = p.child.try_wait() {
                let log = std::fs::read_to_string(p.dir.join("syncd.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                bail!("devpod {} exited ({status}) before its cold start: {}", p.index, tail.join(" | "));
            }
        }
        if Instant::now() > deadline {
            bail!("cold starts did not finish within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Stops every devpod, then compares its tree with the pushed one and reads its figures.
async fn stop_and_check(
    pods: Vec<Devpod>,
    expected: &std::collections::BTreeMap<String, crate::tree::Node>,
) -> anyhow::Result<Vec<PeerResult>> {
    let mut out = Vec::new();
    for p in &pods {
        let _ = std::process::Command::new("kill").arg(p.child.id().to_string()).status();
    }
    for mut p in pods {
        let stopped = tokio::task::spawn_blocking(move || {
            let _ = p.child.wait();
            p
        })
        .await?;
        let p = stopped;
        // the status a daemon writes as it stops holds its final serving figures
        let s = read_status(&p.dir).unwrap_or_default();
        let actual = crate::tree::read_tree(&p.dir.join("tree"))?;
        let mut corrupt = 0u64;
        for (k, v) in expected {
            if actual.get(k) != Some(v) {
                corrupt += 1;
            }
        }
        corrupt += actual.keys().filter(|k| !expected.contains_key(*k)).count() as u64;
        let num = |path: &[&str]| {
            let mut v = &s;
            for k in path {
                v = v.get(*k).unwrap_or(&serde_json::Value::Null);
            }
            v.as_u64().unwrap_or(0)
        };
        out.push(PeerResult {
            index: p.index,
            zone: p.zone.clone(),
            hostile: p.hostile.clone(),
            tree_equal: corrupt == 0,
            corrupt_files: corrupt,
            seconds: s.pointer("/cold_start/seconds").and_then(serde_json::Value::as_f64).unwrap_or(0.0),
            bytes_from_peers: num(&["cold_start", "sources", "peers", "transfer_bytes"]),
            bytes_from_s3: num(&["cold_start", "sources", "s3", "transfer_bytes"])
                + num(&["cold_start", "sources", "manifest", "transfer_bytes"]),
            bytes_served: num(&["peers", "bytes_served"]),
            verification_failures: num(&["peers", "verification_failures"]),
            source_failures: num(&["peers", "source_failures"]),
            fallbacks_to_s3: num(&["peers", "fallbacks_to_s3"]),
        });
    }
    Ok(out)
}

fn read_status(dir: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("tree/.podfs/syncd-status.json")).ok()?;
    serde_json::from_str(&text).ok()
}

fn free_port(ip: std::net::Ipv4Addr) -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind((ip, 0))?.local_addr()?.port())
}

async fn wait_for<F, Fut>(check: F, limit: Duration) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        if Instant::now() > deadline {
            bail!("timed out waiting for a service");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
