//! Building the gateway's state from its configuration, and serving it.

use std::sync::{Arc, OnceLock};

use anyhow::Context;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{ADMIN_TOKEN_FILE, Config};
use crate::manifests::ManifestService;
use crate::meta::MetaStore;
use crate::store::{self, BlobService};

/// Shared by every request. Cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub meta: MetaStore,
    pub blobs: BlobService,
    pub manifests: ManifestService,
    pub config: Config,
    /// BLAKE3 of the admin token (compared in constant time by `blake3::Hash`'s `Eq`).
    pub admin_token_hash: blake3::Hash,
    pub metrics: PrometheusHandle,
    /// The capability signing key, loaded from the database on the tracker's first use.
    pub peer_key: tokio::sync::OnceCell<Arc<ring::signature::Ed25519KeyPair>>,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// The process-wide Prometheus recorder (installed once, shared by every gateway in a process).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // another recorder may already be installed by an embedding process: then ours only renders its own
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Connects the metadata and blob stores and settles the admin token.
pub async fn build(config: Config) -> anyhow::Result<AppState> {
    let backend =
        store::from_url(&config.blob_store, &store::s3::S3Options { checksums_when_supported: config.s3_checksums })
            .await?;
    build_with_backend(config, backend).await
}

/// [`build`] over a blob backend the caller made instead of `config.blob_store` (tests wrap
/// one in [`store::faults::Faulty`]).
pub async fn build_with_backend(config: Config, backend: Arc<dyn store::BlobBackend>) -> anyhow::Result<AppState> {
    tokio::fs::create_dir_all(&config.data_dir)
        .await
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let spool = config.data_dir.join("tmp");
    tokio::fs::create_dir_all(&spool).await.with_context(|| format!("creating {}", spool.display()))?;
    let meta = MetaStore::connect(&config.database_url)
        .await
        .map_err(|e| anyhow::anyhow!("connecting the metadata database: {e}"))?;
    let admin_token = admin_token(&config).await?;
    let opts = store::blobs::BlobOptions {
        max_blob_size: config.max_blob_size,
        presign_ttl: config.presign_ttl,
        pack_blob_limit: config.pack_blob_limit,
        presign_ranges: config.presign_ranges,
    };
    let blobs = BlobService::new(backend, meta.clone(), spool.clone(), opts);
    let manifests = ManifestService::new(meta.clone(), blobs.clone(), spool, config.manifest_small_file_limit);
    Ok(AppState(Arc::new(Inner {
        meta,
        blobs,
        manifests,
        admin_token_hash: blake3::hash(admin_token.as_bytes()),
        metrics: metrics_handle(),
        config,
        peer_key: tokio::sync::OnceCell::new(),
    })))
}

/// The configured admin token; on the embedded default, the one in the data dir, generated
/// and printed once on first start.
async fn admin_token(config: &Config) -> anyhow::Result<String> {
    if let Some(t) = &config.admin_token {
        anyhow::ensure!(t.len() >= 16, "the admin token must be at least 16 characters");
        return Ok(t.clone());
    }
    anyhow::ensure!(
        config.is_embedded_database(),
        "set --admin-token / PODFS_ADMIN_TOKEN: only the embedded default generates one"
    );
    let path = config.data_dir.join(ADMIN_TOKEN_FILE);
    match tokio::fs::read_to_string(&path).await {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let token = format!("pfs_admin_{}", hex::encode(rand::random::<[u8; 24]>()));
    write_private(&path, &token).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("podfs-gateway: generated an admin token (kept in {}):\n\n    {token}\n", path.display());
    Ok(token)
}

fn write_private(path: &std::path::Path, token: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(token.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

/// Serves the API on `listener` until `shutdown` fires, then lets in-flight requests finish.
pub async fn serve(listener: TcpListener, state: AppState, shutdown: CancellationToken) -> anyhow::Result<()> {
    let app = crate::api::router(state);
    axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await?;
    Ok(())
}
