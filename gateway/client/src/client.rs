//! The `Client` itself: connection pool, URL building, authentication and the response
//! handling every route shares. The routes are in `workspaces.rs`, `versions.rs` and `blobs.rs`.

use std::sync::Arc;
use std::time::Duration;

use podfs_protocol::api::{ErrorBody, ErrorCode};
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::retry::{RetryPolicy, retry, retry_if};

/// Gateway address used when none is given.
pub const DEFAULT_GATEWAY: &str = "http://127.0.0.1:7070";
/// Idle keep-alive connections kept per host: enough for 64+ requests in flight.
pub const POOL_MAX_IDLE_PER_HOST: usize = 128;
/// How long an idle pooled connection is kept.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Time allowed to open a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest silence while reading a response (no overall timeout: blobs may be large).
pub const READ_TIMEOUT: Duration = Duration::from_secs(120);
/// Most bytes of an error body kept for the error message.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// A typed client for the gateway's REST v1. Cheap to clone; clones share one connection pool.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    base: Url,
    token: Option<String>,
    retry: RetryPolicy,
    /// Stored-blob bytes received by `fetch_blob` and `fetch_blob_to` (as sent, before decoding).
    pub(crate) blob_bytes: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.inner.base.as_str())
            .field("token", &self.inner.token.as_ref().map(|_| "<redacted>"))
            .field("retry", &self.inner.retry)
            .finish()
    }
}

impl Client {
    /// A client for the gateway at `base_url` (e.g. `http://127.0.0.1:7070`), sending `token`
    /// as a bearer token when given. Uses the default [`RetryPolicy`].
    pub fn new(base_url: &str, token: Option<String>) -> Result<Self> {
        Self::with_retry_policy(base_url, token, RetryPolicy::default())
    }

    pub fn with_retry_policy(base_url: &str, token: Option<String>, retry: RetryPolicy) -> Result<Self> {
        let invalid = |message: &str| Error::InvalidUrl { url: base_url.to_string(), message: message.to_string() };
        let base = Url::parse(base_url).map_err(|e| invalid(&e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(invalid("the gateway URL must be http:// or https://"));
        }
        if base.cannot_be_a_base() || base.query().is_some() || base.fragment().is_some() {
            return Err(invalid("the gateway URL must not carry a query or fragment"));
        }
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .tcp_nodelay(true)
            .tcp_keepalive(Duration::from_secs(30))
            .user_agent(concat!("podfs-client/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(Error::Transport)?;
        let token = token.filter(|t| !t.is_empty());
        Ok(Self { inner: Arc::new(Inner { http, base, token, retry, blob_bytes: Default::default() }) })
    }

    pub fn base_url(&self) -> &Url {
        &self.inner.base
    }

    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.inner.retry
    }

    /// The underlying reqwest client (shared pool), for callers with special needs.
    /// Bytes of stored blobs this client (and its clones) received from blob locations, as
    /// they came over the wire (compressed), attempts that failed included.
    pub fn blob_bytes_received(&self) -> u64 {
        self.inner.blob_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn count_blob_bytes(&self, n: usize) {
        self.inner.blob_bytes.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.inner.http
    }

    /// The URL of `segments` below the base URL; each segment is percent-encoded.
    pub(crate) fn url<I, S>(&self, segments: I) -> Url
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut url = self.inner.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty();
            for s in segments {
                path.push(s.as_ref());
            }
        }
        url
    }

    /// The URL of a path the gateway handed out (`/v1/...`, maybe with a query), below the base
    /// URL's own path prefix.
    pub(crate) fn gateway_path_url(&self, path: &str) -> Result<Url> {
        let joined = format!("{}{}", self.inner.base.as_str().trim_end_matches('/'), path);
        Url::parse(&joined).map_err(|e| Error::InvalidUrl { url: path.to_string(), message: e.to_string() })
    }

    /// True when `url` points at the gateway itself (same scheme, host and port as the base).
    pub(crate) fn same_origin(&self, url: &Url) -> bool {
        url.origin() == self.inner.base.origin()
    }

    /// A request carrying the bearer token.
    pub(crate) fn request(&self, method: Method, url: Url) -> RequestBuilder {
        let req = self.inner.http.request(method, url);
        match &self.inner.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// A request without any credentials (presigned object-store URLs).
    pub(crate) fn anonymous(&self, method: Method, url: Url) -> RequestBuilder {
        self.inner.http.request(method, url)
    }

    /// Sends an idempotent request built by `build`, retrying per the policy, and decodes the
    /// JSON answer.
    pub(crate) async fn call_json<T, F>(&self, what: &str, build: F) -> Result<T>
    where
        T: DeserializeOwned,
        F: Fn() -> RequestBuilder,
    {
        retry(&self.inner.retry, what, || async { decode_json(send(build()).await?).await }).await
    }

    /// Like [`Self::call_json`] but resends only when the connection was never made.
    pub(crate) async fn call_json_once<T, F>(&self, what: &str, build: F) -> Result<T>
    where
        T: DeserializeOwned,
        F: Fn() -> RequestBuilder,
    {
        retry_if(&self.inner.retry, what, Error::is_connect, || async { decode_json(send(build()).await?).await }).await
    }

    /// Sends an idempotent request, retrying, and returns the successful response unread.
    pub(crate) async fn call(&self, what: &str, build: impl Fn() -> RequestBuilder) -> Result<Response> {
        retry(&self.inner.retry, what, || send(build())).await
    }

    pub(crate) fn get(&self, url: Url) -> RequestBuilder {
        self.request(Method::GET, url)
    }

    pub(crate) fn post_json(&self, url: Url, body: &impl Serialize) -> RequestBuilder {
        self.request(Method::POST, url).json(body)
    }
}

/// Sends `req`; a non-2xx answer becomes [`Error::Api`].
pub(crate) async fn send(req: RequestBuilder) -> Result<Response> {
    let resp = req.send().await.map_err(Error::Transport)?;
    if resp.status().is_success() || resp.status() == StatusCode::NOT_MODIFIED {
        return Ok(resp);
    }
    Err(api_error(resp).await)
}

/// Reads an error answer into [`Error::Api`], from an `ErrorBody` when there is one.
pub(crate) async fn api_error(mut resp: Response) -> Error {
    let status = resp.status();
    let mut body = Vec::new();
    while body.len() < MAX_ERROR_BODY {
        match resp.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body.truncate(MAX_ERROR_BODY);
    if let Ok(e) = serde_json::from_slice::<ErrorBody>(&body) {
        return Error::Api { status, code: e.code, message: e.message };
    }
    let text = String::from_utf8_lossy(&body);
    let text = text.trim();
    let code = ErrorCode::for_status(status.as_u16());
    if let Some(message) = xml_element(text, "Message") {
        // an S3-style error document: its code (AccessDenied, ...) is no podfs code
        let message = match xml_element(text, "Code") {
            Some(s3_code) => format!("{s3_code}: {message}"),
            None => message.to_string(),
        };
        return Error::Api { status, code, message };
    }
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text.chars().take(500).collect()
    };
    Error::Api { status, code, message }
}

/// The text of the first `<name>...</name>` element of an XML document, if any.
fn xml_element<'a>(doc: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let start = doc.find(&open)? + open.len();
    let len = doc[start..].find(&format!("</{name}>"))?;
    Some(doc[start..start + len].trim())
}

/// Reads a JSON body.
pub(crate) async fn decode_json<T: DeserializeOwned>(resp: Response) -> Result<T> {
    let url = resp.url().to_string();
    let body = resp.bytes().await.map_err(Error::Transport)?;
    serde_json::from_slice(&body).map_err(|e| Error::Decode { url, message: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_built_below_the_base() {
        let c = Client::new("http://127.0.0.1:7070", None).expect("client");
        assert_eq!(c.url(["v1", "workspaces", "a b"]).as_str(), "http://127.0.0.1:7070/v1/workspaces/a%20b");
        assert_eq!(c.url(["x", "a/b?c#d"]).as_str(), "http://127.0.0.1:7070/x/a%2Fb%3Fc%23d");
        let c = Client::new("http://h:1/prefix/", None).expect("client");
        assert_eq!(c.url(["v1"]).as_str(), "http://h:1/prefix/v1");
        assert_eq!(c.gateway_path_url("/v1/blobs/ab?x=1").expect("url").as_str(), "http://h:1/prefix/v1/blobs/ab?x=1");
        assert!(c.same_origin(&Url::parse("http://h:1/other").expect("url")));
        assert!(!c.same_origin(&Url::parse("http://h:2/other").expect("url")));
    }

    #[test]
    fn s3_error_documents_are_read() {
        let doc =
            r#"<?xml version="1.0"?><Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"#;
        assert_eq!(xml_element(doc, "Code"), Some("AccessDenied"));
        assert_eq!(xml_element(doc, "Message"), Some("Request has expired"));
        assert_eq!(xml_element(doc, "Resource"), None);
        assert_eq!(xml_element("<Message>unterminated", "Message"), None);
    }

    #[test]
    fn bad_base_urls_are_refused() {
        for bad in ["", "ftp://x", "127.0.0.1:7070", "http://h/?q=1", "mailto:x@y"] {
            assert!(Client::new(bad, None).is_err(), "{bad}");
        }
    }

    #[test]
    fn debug_hides_the_token() {
        let c = Client::new("http://h", Some("secret".into())).expect("client");
        assert!(!format!("{c:?}").contains("secret"));
    }
}
