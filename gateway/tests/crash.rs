//! `kill -9` of a real gateway process (the `podfs-gateway` binary) in the middle of batch
//! uploads and of a push, on PostgreSQL + Garage (issue 2/5).
//!
//! After every kill the test looks at PostgreSQL and the bucket directly, with no gateway
//! running: every blob row's bytes are in the store where the row says and verify against the
//! row's hash and size, every recorded pack is in the store whole, and no version appeared.
//! Packs written but not recorded are allowed: they are orphans for garbage collection. Then a
//! restarted gateway takes the same uploads again, and the tree pulls back byte for byte.
//!
//! S3 is reached through a [`FaultProxy`] that delays every new connection, so that the kills
//! land while packs are in flight.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use podfs_client::{Client, RetryPolicy};
use podfs_gateway::store::blobs::{key as loose_key, pack_key};
use podfs_gateway::store::s3::S3Url;
use podfs_protocol::pack::{BatchWriter, read_spans};
use podfs_protocol::{ContentHash, VersionRef, blob};
use podfs_syncd::{PullOptions, PushOptions, pull, push};
use podfs_testnet::tree::assert_same_tree;
use podfs_testnet::{FaultProxy, Services};
use sqlx::Row;

const TOKEN: &str = "crash-admin-token-0123456789";

/// A `podfs-gateway` process.
struct Gateway {
    child: Child,
    url: String,
}

impl Gateway {
    async fn start(database_url: &str, store: &str, services: &Services) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        let child = Command::new(env!("CARGO_BIN_EXE_podfs-gateway"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("DATABASE_URL", database_url)
            .env("PODFS_BLOB_STORE", store)
            .env("PODFS_ADMIN_TOKEN", TOKEN)
            .envs(services.s3.aws_env())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn podfs-gateway");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while reqwest::get(format!("{url}/healthz")).await.is_err() {
            assert!(Instant::now() < deadline, "podfs-gateway did not answer /healthz");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self { child, url }
    }

    fn client(&self) -> Client {
        // one attempt: a request cut by the kill fails at once instead of waiting for a gateway
        let once = RetryPolicy { max_attempts: 1, base_delay: Duration::ZERO, max_delay: Duration::ZERO };
        Client::with_retry_policy(&self.url, Some(TOKEN.into()), once).expect("client")
    }

    /// SIGKILL, and wait until the process is gone.
    fn kill_9(mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("wait");
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Incompressible content of `len` bytes from `seed`.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    // splitmix64 of the seed: distinct seeds give distinct streams
    let mut x = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// What the store holds, checked with no gateway running: every recorded pack is in the bucket
/// with its recorded size and well formed, every blob row's bytes are where the row says and
/// decode to content of its hash and size. Returns (recorded packs, blob rows, versions).
async fn assert_consistent(database_url: &str, store: &str) -> (usize, usize, i64) {
    let db = sqlx::PgPool::connect(database_url).await.expect("connect");
    let prefix = S3Url::parse(store).expect("store URL").key_prefix();
    let mut packs = std::collections::HashMap::new();
    for row in sqlx::query("SELECT hash, size FROM packs").fetch_all(&db).await.expect("packs") {
        let hash = ContentHash::from_slice(&row.get::<Vec<u8>, _>("hash")).expect("hash");
        let bytes = podfs_testnet::s3::get_object(store, &format!("{prefix}{}", pack_key(&hash)))
            .await
            .unwrap_or_else(|e| panic!("recorded pack {hash} is not in the store: {e:#}"));
        assert_eq!(bytes.len() as i64, row.get::<i64, _>("size"), "pack {hash}: recorded size");
        assert_eq!(ContentHash::of(&bytes), hash, "pack {hash}: its bytes");
        read_spans(&bytes).unwrap_or_else(|e| panic!("pack {hash}: {e}"));
        packs.insert(hash, bytes);
    }
    let rows = sqlx::query("SELECT hash, size, stored_size, pack, pack_offset FROM blobs")
        .fetch_all(&db)
        .await
        .expect("blobs");
    for row in &rows {
        let hash = ContentHash::from_slice(&row.get::<Vec<u8>, _>("hash")).expect("hash");
        let stored_size = row.get::<i64, _>("stored_size") as usize;
        let loose;
        let stored: &[u8] = match row.get::<Option<Vec<u8>>, _>("pack") {
            Some(pack) => {
                let pack = ContentHash::from_slice(&pack).expect("pack hash");
                let bytes = packs.get(&pack).unwrap_or_else(|| panic!("blob {hash} names pack {pack}, not recorded"));
                let at = row.get::<i64, _>("pack_offset") as usize;
                bytes.get(at..at + stored_size).unwrap_or_else(|| panic!("blob {hash} lies beyond pack {pack}"))
            }
            None => {
                loose = podfs_testnet::s3::get_object(store, &format!("{prefix}{}", loose_key(&hash)))
                    .await
                    .unwrap_or_else(|e| panic!("blob {hash} is recorded, its object is not in the store: {e:#}"));
                assert_eq!(loose.len(), stored_size, "blob {hash}: stored size");
                &loose
            }
        };
        let content = blob::decode(stored, &hash).unwrap_or_else(|e| panic!("blob {hash}: {e}"));
        assert_eq!(content.len() as i64, row.get::<i64, _>("size"), "blob {hash}: size");
    }
    let versions: i64 = sqlx::query("SELECT count(*) AS n FROM versions").fetch_one(&db).await.expect("count").get("n");
    db.close().await;
    (packs.len(), rows.len(), versions)
}

async fn recorded_packs(database_url: &str) -> i64 {
    let db = sqlx::PgPool::connect(database_url).await.expect("connect");
    let n = sqlx::query("SELECT count(*) AS n FROM packs").fetch_one(&db).await.expect("count").get("n");
    db.close().await;
    n
}

/// 600 incompressible files of 100 KiB (about 60 MiB: several batches and packs), two large
/// files (loose objects) and a few tiny ones.
fn write_tree(root: &Path) -> Vec<(ContentHash, Vec<u8>)> {
    let mut small = Vec::new();
    for i in 0..600u64 {
        let dir = root.join(format!("d{}", i % 20));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let bytes = noise(i + 1, 100 << 10);
        std::fs::write(dir.join(format!("f{i}")), &bytes).expect("write");
        small.push((ContentHash::of(&bytes), bytes));
    }
    for i in 0..2u64 {
        std::fs::write(root.join(format!("large{i}")), noise(1000 + i, 1 << 20)).expect("write");
    }
    for i in 0..5 {
        std::fs::write(root.join(format!("tiny{i}.txt")), format!("tiny {i}\n")).expect("write");
    }
    small
}

/// Batch bodies of the stored encoding of `blobs`, `per` records each.
fn batches(blobs: &[(ContentHash, Vec<u8>)], per: usize) -> Vec<Bytes> {
    blobs
        .chunks(per)
        .map(|chunk| {
            let mut w = BatchWriter::new();
            for (hash, content) in chunk {
                w.push(hash, &blob::encode(content));
            }
            Bytes::from(w.finish())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_batch_and_mid_push_leaves_the_store_consistent() {
    let services = Services::from_env().expect("PostgreSQL and S3 (integration tests never skip)");
    let db = services.fresh_database().await.expect("fresh database");
    let s3_addr =
        tokio::net::lookup_host(services.s3_host_port()).await.expect("resolve").next().expect("the S3 address");
    let proxy = FaultProxy::start(s3_addr).await.expect("proxy");
    let store = services.blob_store_via(&services.fresh_s3_prefix(), &proxy.http_url());
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    let small = write_tree(&src);

    // 1. Three batches of 200 records (two packs each) in flight; the gateway dies as soon as
    //    the first pack is recorded.
    let gw = Gateway::start(&db.url, &store, &services).await;
    gw.client().create_workspace("k").await.expect("create");
    proxy.set_delay(Duration::from_millis(300));
    let bodies = batches(&small, 200);
    let uploads: Vec<_> = bodies
        .iter()
        .map(|body| {
            let (client, body) = (gw.client(), body.clone());
            tokio::spawn(async move { client.put_batch("k", body).await })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while recorded_packs(&db.url).await == 0 {
        assert!(Instant::now() < deadline, "no pack was recorded");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    gw.kill_9();
    for u in uploads {
        // an upload answered before the kill is complete; the others failed, none hangs
        let _ = tokio::time::timeout(Duration::from_secs(30), u).await.expect("the upload ends with its gateway");
    }
    let (packs, rows, versions) = assert_consistent(&db.url, &store).await;
    assert!(packs >= 1 && rows >= 1, "the kill came after the first pack was recorded: {packs} packs, {rows} rows");
    assert_eq!(versions, 0);

    // 2. A push dies while its uploads are in flight: no version, the store still consistent.
    let gw = Gateway::start(&db.url, &store, &services).await;
    let before = proxy.accepted();
    let client = gw.client();
    let src2 = src.clone();
    let pushing = tokio::spawn(async move { push(&client, "k", &src2, PushOptions::default()).await });
    let deadline = Instant::now() + Duration::from_secs(120);
    while proxy.accepted() == before {
        assert!(Instant::now() < deadline, "the push never reached S3");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    gw.kill_9();
    let pushed = tokio::time::timeout(Duration::from_secs(30), pushing).await.expect("the push ends").expect("join");
    assert!(pushed.is_err(), "the push cannot succeed without its gateway");
    let (_, _, versions) = assert_consistent(&db.url, &store).await;
    assert_eq!(versions, 0, "no version without all of its content");

    // 3. Restarted: the same batches and the same push succeed, and the tree comes back.
    proxy.set_delay(Duration::ZERO);
    let gw = Gateway::start(&db.url, &store, &services).await;
    let client = gw.client();
    for body in bodies {
        let done = client.put_batch("k", body).await.expect("batch after the restart");
        assert!(done.refused.is_empty(), "{:?}", done.refused);
        assert_eq!(done.stored + done.duplicates, done.records, "every record is held now");
    }
    let report = push(&client, "k", &src, PushOptions::default()).await.expect("push after the restart");
    assert_eq!(report.version, 1);
    let out = tmp.path().join("out");
    pull(&client, "k", VersionRef::Head, &out, PullOptions::default()).await.expect("pull");
    assert_same_tree(&src, &out);
    let (packs, _, versions) = assert_consistent(&db.url, &store).await;
    assert_eq!(versions, 1);
    let listed: HashSet<String> = podfs_testnet::s3::list_keys(&store)
        .await
        .expect("list")
        .into_iter()
        .filter(|k| k.contains("/packs/"))
        .collect();
    assert!(listed.len() >= packs, "every recorded pack is in the bucket; the rest are orphans");
    drop(gw);
    db.cleanup().await;
}
