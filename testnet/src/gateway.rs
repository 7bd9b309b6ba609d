//! A gateway running in-process on a loopback port, for end-to-end tests: the real router
//! (`podfs_gateway::api::router`) on the real metadata and blob stores, plus two test hooks that
//! change nothing until a test uses them:
//!
//! - [`Hold`]: holds the next request matching a method and path (say the daemon's commit) in
//!   front of the router until the test forwards or refuses it, so a test can act while that
//!   request is provably in flight;
//! - [`TestGateway::faulty`]: the blob store wrapped in [`Faulty`], whose faults the test
//!   switches through the returned [`Faults`] handle.

use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use podfs_client::Client;
use podfs_gateway::config::Config;
use podfs_gateway::store::faults::Faulty;
use podfs_gateway::store::{self, BlobBackend};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use podfs_gateway::store::faults::{Calls, Faults};

/// The key a loose blob is stored under in the blob store (for [`Faults`] switches).
pub fn blob_key(hash: &podfs_protocol::ContentHash) -> String {
    podfs_gateway::store::blobs::key(hash)
}

/// The admin token every test gateway uses.
pub const ADMIN_TOKEN: &str = "testnet-admin-token-0123456789";

pub struct TestGateway {
    pub url: String,
    pub config: Config,
    /// Holds chosen requests in front of the router (inert until armed).
    pub hold: Hold,
    /// The gateway's state (its metadata and blob stores), for tests that look behind the API.
    pub state: podfs_gateway::server::AppState,
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

    /// A gateway on SQLite in a fresh temporary data dir whose blob store (`blob_store`, else a
    /// directory in the data dir) is wrapped in [`Faulty`]; returns the handle switching its
    /// faults.
    pub async fn faulty(blob_store: Option<&str>) -> anyhow::Result<(Self, Faults)> {
        let dir = tempfile::tempdir()?;
        let mut config = Config::embedded(dir.path(), ADMIN_TOKEN)?;
        if let Some(url) = blob_store {
            config.blob_store = url.to_string();
        }
        let opts = store::s3::S3Options { checksums_when_supported: config.s3_checksums };
        let (backend, faults) = Faulty::new(store::from_url(&config.blob_store, &opts).await?);
        let gw = Self::start_on(config, Arc::new(backend), Some(dir)).await?;
        Ok((gw, faults))
    }

    /// A gateway on `database_url` and `blob_store`, with a fresh temporary data dir.
    pub async fn with_services(database_url: &str, blob_store: &str) -> anyhow::Result<Self> {
        Self::with_services_at(database_url, blob_store, "127.0.0.1:0".parse()?).await
    }

    /// The same, listening on `addr` (the testnet's services address).
    pub async fn with_services_at(
        database_url: &str,
        blob_store: &str,
        addr: std::net::SocketAddr,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut config = Config::embedded(dir.path(), ADMIN_TOKEN)?;
        config.database_url = database_url.to_string();
        config.blob_store = blob_store.to_string();
        config.listen = addr;
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

    /// The key of the object holding the stored blob `hash`: its own object, or its pack (for
    /// [`Faults`] switches and bucket inspection).
    pub async fn stored_key(&self, hash: &podfs_protocol::ContentHash) -> anyhow::Result<String> {
        let row =
            self.state.meta.blob_row(hash).await?.ok_or_else(|| anyhow::anyhow!("blob {hash} is not recorded"))?;
        Ok(match row.pack {
            Some((pack, _)) => podfs_gateway::store::blobs::pack_key(&pack),
            None => blob_key(hash),
        })
    }

    /// Starts a gateway with `config` on a free loopback port.
    pub async fn start(mut config: Config) -> anyhow::Result<Self> {
        config.listen = "127.0.0.1:0".parse()?;
        Self::start_owning(config, None).await
    }

    async fn start_owning(config: Config, dir: Option<tempfile::TempDir>) -> anyhow::Result<Self> {
        let opts = store::s3::S3Options { checksums_when_supported: config.s3_checksums };
        let backend = store::from_url(&config.blob_store, &opts).await?;
        Self::start_on(config, backend, dir).await
    }

    async fn start_on(
        mut config: Config,
        backend: Arc<dyn BlobBackend>,
        dir: Option<tempfile::TempDir>,
    ) -> anyhow::Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        config.listen = listener.local_addr()?;
        let state = podfs_gateway::server::build_with_backend(config.clone(), backend).await?;
        let hold = Hold::default();
        let layer = hold.clone();
        let app = podfs_gateway::api::router(state.clone())
            .layer(axum::middleware::from_fn(move |req: Request, next: Next| layer.clone().intercept(req, next)));
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await?;
            Ok::<(), anyhow::Error>(())
        });
        Ok(Self {
            url: format!("http://{}", config.listen),
            config,
            hold,
            state,
            shutdown,
            task: Some(task),
            _dir: dir,
        })
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

    /// Stops serving and waits for in-flight requests (a held one is refused first).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.hold.disarm();
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            t.await??;
        }
        Ok(())
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.hold.disarm();
        self.shutdown.cancel();
    }
}

/// Holds the next request matching a method and a path suffix in front of the router, until
/// the test [forwards](Hold::forward) or [refuses](Hold::refuse) it. Cheap to clone.
///
/// A held request is read whole first, and it lives in a task of its own: a client that
/// disconnects (or is killed) meanwhile does not cancel it, so a forwarded request reaches the
/// router exactly as a request whose answer was lost on the way back.
#[derive(Clone, Default)]
pub struct Hold(Arc<HoldInner>);

#[derive(Default)]
struct HoldInner {
    state: Mutex<HoldState>,
    changed: Notify,
}

#[derive(Default)]
struct HoldState {
    /// What the next held request must match.
    armed: Option<(Method, String)>,
    /// The request held now: its path, and where its fate goes.
    held: Option<(String, oneshot::Sender<Fate>)>,
    /// Requests held so far.
    count: u64,
}

/// What happens to a held request.
enum Fate {
    /// Sent to the router; its status comes back here.
    Forward(oneshot::Sender<StatusCode>),
    /// Answered 503 without reaching the router.
    Refuse,
}

impl Hold {
    fn state(&self) -> MutexGuard<'_, HoldState> {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds the next `method` request whose path ends with `path_suffix` (one request; later
    /// ones pass).
    pub fn arm(&self, method: Method, path_suffix: &str) {
        self.state().armed = Some((method, path_suffix.to_string()));
    }

    /// Holds the next commit (`POST /v1/workspaces/{ws}/versions`).
    pub fn arm_commit(&self) {
        self.arm(Method::POST, "/versions");
    }

    /// Waits until a request is held (read whole, not yet sent on); returns its path.
    pub async fn wait_held(&self) -> String {
        loop {
            let notified = self.0.changed.notified();
            let held = self.state().held.as_ref().map(|(path, _)| path.clone());
            if let Some(path) = held {
                return path;
            }
            notified.await;
        }
    }

    /// Whether a request is held right now.
    pub fn is_holding(&self) -> bool {
        self.state().held.is_some()
    }

    /// Requests held so far.
    pub fn held_count(&self) -> u64 {
        self.state().count
    }

    /// Sends the held request on to the router and returns the status the router answered
    /// (whether or not its client is still there). Panics when nothing is held.
    pub async fn forward(&self) -> StatusCode {
        let (tx, rx) = oneshot::channel();
        let (_, fate) = self.state().held.take().expect("Hold::forward: no request is held");
        assert!(fate.send(Fate::Forward(tx)).is_ok(), "the held request's task is gone");
        rx.await.expect("the forwarded request's task ended without an answer")
    }

    /// Answers the held request 503 without sending it on. Panics when nothing is held.
    pub fn refuse(&self) {
        let (_, fate) = self.state().held.take().expect("Hold::refuse: no request is held");
        let _ = fate.send(Fate::Refuse);
    }

    /// Holds nothing more, and refuses the held request if there is one.
    pub fn disarm(&self) {
        let mut s = self.state();
        s.armed = None;
        if let Some((_, fate)) = s.held.take() {
            let _ = fate.send(Fate::Refuse);
        }
    }

    /// The middleware: passes requests through, except the one it is armed for.
    async fn intercept(self, req: Request, next: Next) -> Response {
        let path = req.uri().path().to_string();
        let take = {
            let mut s = self.state();
            let hit = s.armed.as_ref().is_some_and(|(m, suffix)| req.method() == m && path.ends_with(suffix.as_str()));
            if hit {
                s.armed = None;
            }
            hit
        };
        if !take {
            return next.run(req).await;
        }
        // Its own task: hyper drops this future when the client goes away, the task lives on.
        let task = tokio::spawn(async move {
            let (parts, body) = req.into_parts();
            let body = match axum::body::to_bytes(body, usize::MAX).await {
                Ok(b) => b,
                Err(e) => return (StatusCode::BAD_REQUEST, format!("held request body: {e}")).into_response(),
            };
            let (tx, rx) = oneshot::channel();
            {
                let mut s = self.state();
                s.held = Some((path, tx));
                s.count += 1;
            }
            self.0.changed.notify_waiters();
            match rx.await {
                Ok(Fate::Forward(status)) => {
                    let resp = next.run(Request::from_parts(parts, Body::from(body))).await;
                    let _ = status.send(resp.status());
                    resp
                }
                Ok(Fate::Refuse) | Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "held request refused").into_response(),
            }
        });
        task.await.unwrap_or_else(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response())
    }
}
