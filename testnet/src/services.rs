//! The real services the end-to-end tests run against, found through the environment that
//! `scripts/dev-services up` prints: a PostgreSQL server where each test gets a fresh database,
//! and an S3 bucket (Garage) where each test gets a fresh key prefix.
//!
//! Nothing here skips a test: when the environment is missing, [`Services::from_env`] returns an
//! error saying how to start the services, and tests `.expect()` it.

use std::fmt;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use sqlx::{AssertSqlSafe, Connection, PgConnection};

/// What to run when the environment is missing.
pub const START_HINT: &str = "run `eval \"$(scripts/dev-services up)\"` first";

/// Where PostgreSQL and S3 are.
#[derive(Clone, Debug)]
pub struct Services {
    /// A URL of a role that may create databases (e.g. `postgres://podfs:podfs@127.0.0.1:5432/postgres`).
    pub pg_admin_url: String,
    /// The store URL tests may write under (`PODFS_TEST_BLOB_STORE`, else `PODFS_BLOB_STORE`);
    /// the same as `s3.store_url`. Give each test its own prefix with [`fresh_s3_prefix`].
    pub blob_store: String,
    /// The S3 bucket tests may write to, and how to reach it.
    pub s3: S3Env,
}

/// An S3 store and how to reach it.
#[derive(Clone)]
pub struct S3Env {
    /// The store URL as the gateway takes it: `s3://bucket/prefix?endpoint=...&region=...`.
    pub store_url: String,
    /// Endpoint (`http://127.0.0.1:3900`): the URL's `endpoint` parameter, else
    /// `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL`; `None` means AWS itself.
    pub endpoint: Option<String>,
    /// The URL's `region` parameter, else `AWS_REGION`, else `AWS_DEFAULT_REGION`, else `us-east-1`.
    pub region: String,
    /// `AWS_ACCESS_KEY_ID`.
    pub access_key_id: String,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: String,
}

impl fmt::Debug for S3Env {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Env")
            .field("store_url", &self.store_url)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

impl Services {
    /// Reads the environment printed by `scripts/dev-services up`:
    /// `PODFS_TEST_DATABASE_URL` (else `DATABASE_URL`), `PODFS_TEST_BLOB_STORE` (else
    /// `PODFS_BLOB_STORE`), `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, and the endpoint and
    /// region from the store URL or `AWS_ENDPOINT_URL_S3` / `AWS_REGION`.
    pub fn from_env() -> anyhow::Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`Services::from_env`] with another source of variables (for tests of this function).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let pg_admin_url = get("PODFS_TEST_DATABASE_URL")
            .or_else(|| get("DATABASE_URL"))
            .ok_or_else(|| anyhow!("PODFS_TEST_DATABASE_URL (or DATABASE_URL) is not set: {START_HINT}"))?;
        let s3 = S3Env::from_lookup(&get)?;
        Ok(Self { pg_admin_url, blob_store: s3.store_url.clone(), s3 })
    }

    /// `host:port` of the S3 endpoint (`127.0.0.1:3900`), e.g. as a [`crate::FaultProxy`]
    /// target.
    ///
    /// # Panics
    /// When there is no endpoint (AWS itself): a test setup error.
    pub fn s3_host_port(&self) -> String {
        let endpoint =
            self.s3.endpoint.as_deref().expect("an S3 endpoint (endpoint= in the store URL, or AWS_ENDPOINT_URL_S3)");
        endpoint_host_port(endpoint)
    }

    /// `store_url` reached through `endpoint` instead (e.g. `http://<FaultProxy addr>`); see
    /// [`store_url_with_endpoint`]. The gateway takes the URL's `endpoint` over
    /// `AWS_ENDPOINT_URL_S3`.
    ///
    /// # Panics
    /// When `store_url` is not an `s3://` URL.
    pub fn blob_store_via(&self, store_url: &str, endpoint: &str) -> String {
        store_url_with_endpoint(store_url, endpoint).expect("a valid s3:// store URL")
    }

    /// A fresh, empty PostgreSQL database for one test (see [`fresh_database`]).
    pub async fn fresh_database(&self) -> anyhow::Result<TestDb> {
        fresh_database(&self.pg_admin_url).await
    }

    /// A store URL with a prefix no other test uses (see [`fresh_s3_prefix`]).
    pub fn fresh_s3_prefix(&self) -> String {
        fresh_s3_prefix(&self.s3.store_url)
    }
}

impl S3Env {
    fn from_lookup(get: &impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let store_url = get("PODFS_TEST_BLOB_STORE")
            .or_else(|| get("PODFS_BLOB_STORE"))
            .ok_or_else(|| anyhow!("PODFS_TEST_BLOB_STORE (or PODFS_BLOB_STORE) is not set: {START_HINT}"))?;
        Self::for_store_url_with(store_url, get)
    }

    /// The settings for one store URL: endpoint and region from its query, else the
    /// environment; credentials from the environment.
    pub fn for_store_url(store_url: &str) -> anyhow::Result<Self> {
        Self::for_store_url_with(store_url.to_owned(), &|name: &str| {
            std::env::var(name).ok().filter(|v| !v.trim().is_empty())
        })
    }

    fn for_store_url_with(store_url: String, get: &impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let url = StoreUrl::parse(&store_url)?;
        let endpoint = url
            .param("endpoint")
            .map(str::to_owned)
            .or_else(|| get("AWS_ENDPOINT_URL_S3"))
            .or_else(|| get("AWS_ENDPOINT_URL"));
        let region = url
            .param("region")
            .map(str::to_owned)
            .or_else(|| get("AWS_REGION"))
            .or_else(|| get("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| "us-east-1".to_owned());
        let access_key_id =
            get("AWS_ACCESS_KEY_ID").ok_or_else(|| anyhow!("AWS_ACCESS_KEY_ID is not set: {START_HINT}"))?;
        let secret_access_key =
            get("AWS_SECRET_ACCESS_KEY").ok_or_else(|| anyhow!("AWS_SECRET_ACCESS_KEY is not set: {START_HINT}"))?;
        Ok(Self { store_url, endpoint, region, access_key_id, secret_access_key })
    }

    /// The bucket of [`S3Env::store_url`].
    pub fn bucket(&self) -> String {
        StoreUrl::parse(&self.store_url).map(|u| u.bucket).unwrap_or_default()
    }

    /// Environment variables giving a gateway process these credentials and this endpoint
    /// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL_S3`).
    pub fn aws_env(&self) -> Vec<(&'static str, String)> {
        let mut vars = vec![
            ("AWS_ACCESS_KEY_ID", self.access_key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_access_key.clone()),
            ("AWS_REGION", self.region.clone()),
        ];
        if let Some(endpoint) = &self.endpoint {
            vars.push(("AWS_ENDPOINT_URL_S3", endpoint.clone()));
        }
        vars
    }
}

/// `s3://bucket/prefix?query` taken apart: the gateway's own parser.
pub use podfs_gateway::store::s3::S3Url as StoreUrl;

/// `n` random bytes as lowercase hex.
pub fn random_hex(n: usize) -> String {
    (0..n).map(|_| format!("{:02x}", rand::random::<u8>())).collect()
}

/// The same store (bucket and query parameters) with a unique prefix appended:
/// `s3://bucket/prefix?q` becomes `s3://bucket/prefix/t-<random hex>?q`, so a test sees only
/// its own objects.
///
/// # Panics
/// When `store_url` is not an `s3://` URL (a test setup error).
pub fn fresh_s3_prefix(store_url: &str) -> String {
    let mut url = StoreUrl::parse(store_url).expect("a valid s3:// store URL");
    let leaf = format!("t-{}", random_hex(8));
    url.prefix = if url.prefix.is_empty() { leaf } else { format!("{}/{leaf}", url.prefix) };
    url.to_string()
}

/// The same store reached through another endpoint (e.g. a [`crate::FaultProxy`] in front of
/// Garage): sets the `endpoint` query parameter.
pub fn store_url_with_endpoint(store_url: &str, endpoint: &str) -> anyhow::Result<String> {
    let mut url = StoreUrl::parse(store_url)?;
    url.set_param("endpoint", endpoint);
    Ok(url.to_string())
}

/// `host:port` of an endpoint URL (`http://127.0.0.1:3900/` -> `127.0.0.1:3900`; the scheme's
/// default port when the URL has none).
pub fn endpoint_host_port(endpoint: &str) -> String {
    let (scheme, rest) = endpoint.split_once("://").unwrap_or(("http", endpoint));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    let authority = authority.rsplit_once('@').map(|x| x.1).unwrap_or(authority);
    let has_port = match authority.rfind(':') {
        Some(i) => !authority[i..].contains(']'),
        None => false,
    };
    if has_port {
        authority.to_owned()
    } else {
        let port = if scheme.eq_ignore_ascii_case("https") { 443 } else { 80 };
        format!("{authority}:{port}")
    }
}

/// A PostgreSQL URL with another database name (`postgres://u:p@h:5432/db?x` -> `.../name?x`).
pub fn database_url_with_name(url: &str, name: &str) -> anyhow::Result<String> {
    let scheme_end = url.find("://").ok_or_else(|| anyhow!("not a database URL: {url}"))? + 3;
    let after = &url[scheme_end..];
    let authority_len = after.find(['/', '?', '#']).unwrap_or(after.len());
    let (authority, rest) = after.split_at(authority_len);
    let rest = rest.strip_prefix('/').unwrap_or(rest);
    let tail = rest.find(['?', '#']).map(|i| &rest[i..]).unwrap_or("");
    Ok(format!("{}{authority}/{name}{tail}", &url[..scheme_end]))
}

/// A PostgreSQL URL with its host and port replaced (e.g. by a [`crate::FaultProxy`]'s address).
pub fn database_url_with_addr(url: &str, addr: std::net::SocketAddr) -> anyhow::Result<String> {
    let scheme_end = url.find("://").ok_or_else(|| anyhow!("not a database URL: {url}"))? + 3;
    let after = &url[scheme_end..];
    let authority_len = after.find(['/', '?', '#']).unwrap_or(after.len());
    let (authority, rest) = after.split_at(authority_len);
    let userinfo = authority.rfind('@').map(|i| &authority[..=i]).unwrap_or("");
    Ok(format!("{}{userinfo}{addr}{rest}", &url[..scheme_end]))
}

/// A database created for one test. Dropping it drops the database (best effort, waiting up to
/// 15 s); [`TestDb::cleanup`] does the same from async code and reports errors.
pub struct TestDb {
    /// The database name (`podfs_t_<hex>`).
    pub name: String,
    /// URL of the database, for the gateway's `--database-url`.
    pub url: String,
    admin_url: String,
    dropped: bool,
}

impl fmt::Debug for TestDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestDb").field("name", &self.name).field("url", &self.url).finish()
    }
}

impl TestDb {
    /// The database URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Drops the database now (terminating its open connections); a failure is logged, as the
    /// test's outcome does not depend on it. See [`TestDb::try_cleanup`].
    pub async fn cleanup(self) {
        let name = self.name.clone();
        if let Err(e) = self.try_cleanup().await {
            tracing::warn!("could not drop test database {name}: {e:#}");
        }
    }

    /// Drops the database now (terminating its open connections).
    pub async fn try_cleanup(mut self) -> anyhow::Result<()> {
        self.dropped = true;
        drop_database(&self.admin_url, &self.name).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        self.dropped = true;
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let (done_tx, done_rx) = mpsc::channel();
        // A thread with its own runtime: Drop may run inside or outside a runtime, on any flavour.
        let spawned = std::thread::Builder::new().name("testdb-drop".into()).spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(drop_database(&admin_url, &name)));
            let _ = done_tx.send(result);
        });
        if spawned.is_err() {
            return;
        }
        match done_rx.recv_timeout(Duration::from_secs(15)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("could not drop test database {}: {e:#}", self.name),
            Err(_) => tracing::warn!("dropping test database {} timed out", self.name),
        }
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Creates `podfs_t_<random hex>` through `admin_url` (a role with CREATEDB) and returns it.
pub async fn fresh_database(admin_url: &str) -> anyhow::Result<TestDb> {
    let name = format!("podfs_t_{}", random_hex(8));
    let mut conn = PgConnection::connect(admin_url)
        .await
        .with_context(|| format!("connecting to PostgreSQL at {} ({START_HINT})", redact_url(admin_url)))?;
    sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {}", quote_ident(&name))))
        .execute(&mut conn)
        .await
        .with_context(|| format!("creating database {name} (the role needs CREATEDB)"))?;
    let _ = conn.close().await;
    Ok(TestDb { url: database_url_with_name(admin_url, &name)?, name, admin_url: admin_url.to_owned(), dropped: false })
}

async fn drop_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    let mut conn = PgConnection::connect(admin_url).await?;
    let quoted = quote_ident(name);
    // WITH (FORCE) (PostgreSQL 13+) ends the connections a gateway's pool still holds.
    let forced =
        sqlx::raw_sql(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))).execute(&mut conn).await;
    if forced.is_err() {
        sqlx::raw_sql(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {quoted}"))).execute(&mut conn).await?;
    }
    let _ = conn.close().await;
    Ok(())
}

/// The URL with its password replaced by `***`, for messages.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let after = &url[scheme_end..];
    let authority_len = after.find(['/', '?', '#']).unwrap_or(after.len());
    let authority = &after[..authority_len];
    match (authority.rfind('@'), authority.find(':')) {
        (Some(at), Some(colon)) if colon < at => {
            format!("{}{}:***{}", &url[..scheme_end], &authority[..colon], &url[scheme_end + at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn missing_env_says_how_to_start_services() {
        let err = Services::from_lookup(lookup(&[])).unwrap_err().to_string();
        assert!(err.contains("scripts/dev-services up"), "{err}");
        let err = Services::from_lookup(lookup(&[("DATABASE_URL", "postgres://h/db")])).unwrap_err().to_string();
        assert!(err.contains("PODFS_BLOB_STORE"), "{err}");
    }

    #[test]
    fn reads_dev_services_env() {
        let s = Services::from_lookup(lookup(&[
            ("DATABASE_URL", "postgres://podfs:podfs@127.0.0.1:5432/podfs"),
            ("PODFS_TEST_DATABASE_URL", "postgres://podfs:podfs@127.0.0.1:5432/postgres"),
            ("PODFS_BLOB_STORE", "s3://podfs-dev/blobs?endpoint=http://127.0.0.1:3900&region=garage"),
            ("PODFS_TEST_BLOB_STORE", "s3://podfs-test/t?endpoint=http://127.0.0.1:3900&region=garage"),
            ("AWS_ACCESS_KEY_ID", "GKabc"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
            ("AWS_ENDPOINT_URL_S3", "http://elsewhere:1"),
        ]))
        .unwrap();
        assert_eq!(s.pg_admin_url, "postgres://podfs:podfs@127.0.0.1:5432/postgres");
        assert_eq!(s.s3.bucket(), "podfs-test");
        assert_eq!(s.s3.endpoint.as_deref(), Some("http://127.0.0.1:3900"));
        assert_eq!(s.s3.region, "garage");
        assert_eq!(s.blob_store, s.s3.store_url);
        assert_eq!(s.s3_host_port(), "127.0.0.1:3900");
        let via = StoreUrl::parse(&s.blob_store_via(&s.blob_store, "http://127.0.0.1:9")).unwrap();
        assert_eq!((via.bucket.as_str(), via.prefix.as_str()), ("podfs-test", "t"));
        assert_eq!((via.param("endpoint"), via.param("region")), (Some("http://127.0.0.1:9"), Some("garage")));
        assert!(!format!("{:?}", s.s3).contains("secret\""));

        // Endpoint and region from the AWS variables when the URL has none.
        let s = Services::from_lookup(lookup(&[
            ("DATABASE_URL", "postgres://h/db"),
            ("PODFS_BLOB_STORE", "s3://b/p"),
            ("AWS_ACCESS_KEY_ID", "GKabc"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
            ("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:3900"),
            ("AWS_REGION", "garage"),
        ]))
        .unwrap();
        assert_eq!(s.pg_admin_url, "postgres://h/db");
        assert_eq!(s.s3.endpoint.as_deref(), Some("http://127.0.0.1:3900"));
        assert_eq!(s.s3.region, "garage");
    }

    #[test]
    fn store_urls() {
        let u = "s3://bucket/pre/fix?endpoint=http://127.0.0.1:3900&region=garage";
        let parsed = StoreUrl::parse(u).unwrap();
        assert_eq!(parsed.bucket, "bucket");
        assert_eq!(parsed.prefix, "pre/fix");
        assert_eq!(parsed.key_prefix(), "pre/fix/");
        assert_eq!(StoreUrl::parse(&parsed.to_string()).unwrap(), parsed);
        assert_eq!(parsed.param("endpoint"), Some("http://127.0.0.1:3900"));
        assert_eq!(
            StoreUrl::parse("s3://b?endpoint=http%3A%2F%2Fh%3A1").unwrap().param("endpoint"),
            Some("http://h:1")
        );

        let fresh = fresh_s3_prefix(u);
        let f = StoreUrl::parse(&fresh).unwrap();
        assert_eq!(f.bucket, "bucket");
        assert!(f.prefix.starts_with("pre/fix/t-"), "{fresh}");
        assert_eq!(f.query, parsed.query);
        assert_ne!(fresh, fresh_s3_prefix(u));
        assert!(StoreUrl::parse(&fresh_s3_prefix("s3://b")).unwrap().prefix.starts_with("t-"));

        let moved = StoreUrl::parse(&store_url_with_endpoint(u, "http://127.0.0.1:4000").unwrap()).unwrap();
        assert_eq!((moved.param("endpoint"), moved.param("region")), (Some("http://127.0.0.1:4000"), Some("garage")));
        assert_eq!(moved.prefix, "pre/fix");
        let added = StoreUrl::parse(&store_url_with_endpoint("s3://b/p", "http://127.0.0.1:4000").unwrap()).unwrap();
        assert_eq!(added.query, [("endpoint".to_string(), "http://127.0.0.1:4000".to_string())]);
        assert!(StoreUrl::parse("http://x").is_err());
    }

    async fn database_exists(admin: &mut PgConnection, name: &str) -> bool {
        let row: Option<(i32,)> = sqlx::query_as("SELECT 1 FROM pg_database WHERE datname = $1")
            .bind(name)
            .fetch_optional(admin)
            .await
            .unwrap();
        row.is_some()
    }

    /// Against the real PostgreSQL of `scripts/dev-services up`: fails (never skips) without it.
    #[tokio::test]
    async fn fresh_database_is_created_and_dropped() {
        let services = Services::from_env().expect("services environment");
        let db = services.fresh_database().await.unwrap();
        assert!(db.name.starts_with("podfs_t_"));
        let mut conn = PgConnection::connect(db.url()).await.unwrap();
        let (current,): (String,) = sqlx::query_as("SELECT current_database()").fetch_one(&mut conn).await.unwrap();
        assert_eq!(current, db.name);
        sqlx::raw_sql("CREATE TABLE t (x int); INSERT INTO t VALUES (1)").execute(&mut conn).await.unwrap();

        // Dropping the guard drops the database, even with a connection still open.
        let name = db.name.clone();
        drop(db);
        let mut admin = PgConnection::connect(&services.pg_admin_url).await.unwrap();
        assert!(!database_exists(&mut admin, &name).await, "{name} still exists");

        // cleanup() does the same from async code.
        let db = fresh_database(&services.pg_admin_url).await.unwrap();
        let name = db.name.clone();
        db.try_cleanup().await.unwrap();
        assert!(!database_exists(&mut admin, &name).await, "{name} still exists");
    }

    #[test]
    fn endpoints() {
        assert_eq!(endpoint_host_port("http://127.0.0.1:3900"), "127.0.0.1:3900");
        assert_eq!(endpoint_host_port("http://127.0.0.1:3900/"), "127.0.0.1:3900");
        assert_eq!(endpoint_host_port("https://s3.example"), "s3.example:443");
        assert_eq!(endpoint_host_port("http://[::1]"), "[::1]:80");
        assert_eq!(endpoint_host_port("http://[::1]:3900"), "[::1]:3900");
    }

    #[test]
    fn database_urls() {
        assert_eq!(database_url_with_name("postgres://u:p@h:5432/postgres", "x").unwrap(), "postgres://u:p@h:5432/x");
        assert_eq!(
            database_url_with_name("postgres://h:5432/postgres?sslmode=disable", "x").unwrap(),
            "postgres://h:5432/x?sslmode=disable"
        );
        assert_eq!(database_url_with_name("postgres://h", "x").unwrap(), "postgres://h/x");
        assert_eq!(
            database_url_with_addr("postgres://u:p@127.0.0.1:5432/db?a=b", "127.0.0.1:9".parse().unwrap()).unwrap(),
            "postgres://u:p@127.0.0.1:9/db?a=b"
        );
        assert_eq!(redact_url("postgres://u:pw@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
    }
}
