//! A gateway running in-process on a loopback port, for end-to-end tests.

use podfs_client::Client;
use podfs_gateway::config::Config;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The admin token every test gateway uses.
pub const ADMIN_TOKEN: &str = "testnet-admin-token-0123456789";

pub struct TestGateway {
    pub url: String,
    pub config: Config,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    _dir: Option<tempfile::TempDir>,
}

impl TestGateway {
    /// The embedded default (SQLite + local blob directory) in a fresh temporary data dir.
    pub async fn embedded() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let config = Config::embedded(dir.path(), ADMIN_TOKEN)?;
        Self::start_owning(config, Some(dir)).await
    }

    /// A gateway on `database_url` and `blob_store`, with a fresh temporary data dir.
    pub async fn with_services(database_url: &str, blob_store: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut config = Config::embedded(dir.path(), ADMIN_TOKEN)?;
        config.database_url = database_url.to_string();
        config.blob_store = blob_store.to_string();
        Self::start_owning(config, Some(dir)).await
    }

    /// A gateway on a fresh PostgreSQL database and a fresh prefix of the S3 bucket (from
    /// `scripts/dev-services up`); panics, never skips, when they are missing. Returns the
    /// database (to clean up) and the store URL.
    pub async fn on_fresh_services() -> (Self, crate::services::TestDb, String) {
        let s = crate::services::Services::from_env()
            .expect("PostgreSQL and S3 are required: run `eval \"$(scripts/dev-services up)\"` first");
        let db = crate::services::fresh_database(&s.pg_admin_url).await.expect("fresh database");
        let store = crate::services::fresh_s3_prefix(&s.s3.store_url);
        let gw = Self::with_services(&db.url, &store).await.expect("gateway on PostgreSQL + S3");
        (gw, db, store)
    }

    /// Starts a gateway with `config` on a free loopback port.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        Self::start_owning(config, None).await
    }

    async fn start_owning(mut config: Config, dir: Option<tempfile::TempDir>) -> anyhow::Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        config.listen = listener.local_addr()?;
        let state = podfs_gateway::server::build(config.clone()).await?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(podfs_gateway::server::serve(listener, state, shutdown.clone()));
        Ok(Self { url: format!("http://{}", config.listen), config, shutdown, task: Some(task), _dir: dir })
    }

    /// A client with the admin token.
    pub fn client(&self) -> Client {
        Client::new(&self.url, Some(ADMIN_TOKEN.to_string())).expect("client for a loopback URL")
    }

    /// Runs the `podfs` CLI in-process against this gateway; returns (exit success, stdout).
    pub async fn cli(&self, args: &[&str]) -> (bool, String) {
        let mut argv = vec!["podfs", "--gateway", &self.url, "--token", ADMIN_TOKEN];
        argv.extend_from_slice(args);
        let mut out = Vec::new();
        let code = podfs_syncd::run_with(argv, &mut out).await;
        (code == std::process::ExitCode::SUCCESS, String::from_utf8_lossy(&out).into_owned())
    }

    /// Stops serving and waits for in-flight requests.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            t.await??;
        }
        Ok(())
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
