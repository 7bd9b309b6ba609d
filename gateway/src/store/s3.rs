//! A backend on any S3-compatible service (Tigris, Garage, MinIO, AWS).
//!
//! Configured from `s3://bucket/prefix?endpoint=URL&region=R&path_style=true|false` plus the
//! standard AWS environment and credential chain (`AWS_ACCESS_KEY_ID`, profiles, instance
//! roles, `AWS_ENDPOINT_URL_S3`, ...). Path-style addressing is the default whenever an endpoint
//! is set (Garage, MinIO, 127.0.0.1); Tigris and AWS take `path_style=false`.
//! Nothing here relies on conditional writes: Garage ignores them, and keys are content-addressed.
//! PUTs send `UNSIGNED-PAYLOAD`: the signature covers the request but not a SHA-256 of the body,
//! which would cost a SHA-256 pass over every byte here and another in the store. Integrity does
//! not rest on it: every read is checked against the BLAKE3 name, and TLS protects the transfer
//! to a remote store.

use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::config::{Region, RequestChecksumCalculation, ResponseChecksumValidation, timeout::TimeoutConfig};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream as SdkStream;
use bytes::Bytes;
use podfs_protocol::api::ByteRange;
use tokio_util::io::ReaderStream;

use super::{BlobBackend, ByteStream, StoreError};

/// Switches that differ between S3-compatible services.
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    /// Send and validate the SDK's default CRC checksums on every request. Off by default:
    /// several S3-compatible services reject them (CRATES.md trap 2).
    pub checksums_when_supported: bool,
}

pub struct S3Backend {
    client: aws_sdk_s3::Client,
    bucket: String,
    /// Empty, or ends with `/`.
    prefix: String,
    url: String,
}

/// The S3 SDK's HTTPS client: hyper 1 and rustls 0.23 on the ring provider, the same stack as
/// reqwest and quinn elsewhere in podfs. The SDK's default client would bring hyper 0.14,
/// rustls 0.21 and aws-lc as a second stack (CRATES.md trap 11).
pub fn http_client() -> aws_sdk_s3::config::SharedHttpClient {
    use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
    aws_smithy_http_client::Builder::new().tls_provider(Provider::Rustls(CryptoMode::Ring)).build_https()
}

/// A store URL `s3://bucket[/prefix][?endpoint=URL&region=R&path_style=true|false]`, the one
/// parser of them (the gateway and the test harness share it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    /// The key prefix without leading or trailing `/` (may be empty).
    pub prefix: String,
    /// Query parameters, percent-decoded, in order.
    pub query: Vec<(String, String)>,
}

/// The query parameters a store URL may carry.
const PARAMS: [&str; 3] = ["endpoint", "region", "path_style"];

impl S3Url {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(s.starts_with("s3://"), "not an s3:// URL: {s}");
        let url = url::Url::parse(s).map_err(|e| anyhow::anyhow!("blob store {s:?}: {e}"))?;
        let bucket = url.host_str().unwrap_or_default().to_string();
        anyhow::ensure!(!bucket.is_empty(), "blob store {s:?} names no bucket");
        let query: Vec<(String, String)> = url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
        if let Some((k, _)) = query.iter().find(|(k, _)| !PARAMS.contains(&k.as_str())) {
            anyhow::bail!("blob store {s:?}: unknown parameter {k:?} (endpoint, region, path_style)");
        }
        Ok(Self { bucket, prefix: url.path().trim_matches('/').to_string(), query })
    }

    /// The value of a query parameter; `None` when absent or empty.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).filter(|v| !v.is_empty())
    }

    /// Sets (or adds) a query parameter.
    pub fn set_param(&mut self, name: &str, value: &str) {
        match self.query.iter_mut().find(|(k, _)| k == name) {
            Some((_, v)) => *v = value.to_string(),
            None => self.query.push((name.to_string(), value.to_string())),
        }
    }

    /// The prefix every key of this store starts with: `prefix/`, or empty for the bucket root.
    pub fn key_prefix(&self) -> String {
        if self.prefix.is_empty() { String::new() } else { format!("{}/", self.prefix) }
    }

    fn path_style(&self) -> Option<bool> {
        self.param("path_style").map(|v| matches!(v, "true" | "1" | "yes"))
    }
}

impl std::fmt::Display for S3Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}", self.bucket)?;
        if !self.prefix.is_empty() {
            write!(f, "/{}", self.prefix)?;
        }
        if !self.query.is_empty() {
            let q = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(&self.query).finish();
            write!(f, "?{q}")?;
        }
        Ok(())
    }
}

impl S3Backend {
    pub async fn from_url(url: &str, opts: &S3Options) -> anyhow::Result<Self> {
        let p = S3Url::parse(url)?;
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(http_client());
        if let Some(r) = p.param("region") {
            loader = loader.region(Region::new(r.to_string()));
        }
        let sdk = loader.load().await;
        let endpoint = p
            .param("endpoint")
            .map(str::to_string)
            .or_else(|| std::env::var("AWS_ENDPOINT_URL_S3").or_else(|_| std::env::var("AWS_ENDPOINT_URL")).ok());
        let (checksum_req, checksum_resp) = if opts.checksums_when_supported {
            (RequestChecksumCalculation::WhenSupported, ResponseChecksumValidation::WhenSupported)
        } else {
            (RequestChecksumCalculation::WhenRequired, ResponseChecksumValidation::WhenRequired)
        };
        let mut b = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(p.path_style().unwrap_or(endpoint.is_some()))
            .request_checksum_calculation(checksum_req)
            .response_checksum_validation(checksum_resp)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .read_timeout(Duration::from_secs(60))
                    .build(),
            );
        if sdk.region().is_none() {
            b = b.region(Region::new("us-east-1"));
        }
        if let Some(ep) = &endpoint {
            b = b.endpoint_url(ep);
        }
        Ok(Self {
            client: aws_sdk_s3::Client::from_conf(b.build()),
            bucket: p.bucket.clone(),
            prefix: p.key_prefix(),
            url: format!("s3://{}/{}", p.bucket, p.key_prefix()),
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

/// Counts one S3 request by operation and object kind (`podfs_s3_requests_total`), and the
/// bytes of a PUT (`podfs_s3_put_bytes`). Presigned URLs are not requests of the gateway.
fn count(op: &'static str, key: &str, put_bytes: Option<u64>) {
    let kind = super::kind_of(key);
    metrics::counter!("podfs_s3_requests_total", "op" => op, "kind" => kind).increment(1);
    if let Some(n) = put_bytes {
        metrics::histogram!("podfs_s3_put_bytes", "kind" => kind).record(n as f64);
    }
}

fn classify<E>(key: &str, e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = e.raw_response().map(|r| r.status().as_u16()).unwrap_or(0);
    let detail = format!("{key}: {}", aws_sdk_s3::error::DisplayErrorContext(&e));
    match &e {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
            StoreError::Unavailable(detail)
        }
        SdkError::ServiceError(se) if matches!(se.err().code(), Some("NoSuchKey" | "NotFound")) || status == 404 => {
            StoreError::NotFound(key.to_string())
        }
        SdkError::ServiceError(_) if status >= 500 => StoreError::Unavailable(format!("HTTP {status}: {detail}")),
        _ => StoreError::Refused { what: format!("{key} (HTTP {status})"), source: Box::new(e) },
    }
}

#[async_trait]
impl BlobBackend for S3Backend {
    fn describe(&self) -> String {
        self.url.clone()
    }

    async fn put_bytes(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        count("put", key, Some(data.len() as u64));
        let k = self.key(key);
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&k)
            .content_length(data.len() as i64)
            .body(SdkStream::from(data))
            .customize()
            .disable_payload_signing()
            .send()
            .await
            .map_err(|e| classify(&k, e))?;
        Ok(())
    }

    async fn put_file(&self, key: &str, path: &Path) -> Result<(), StoreError> {
        count("put", key, tokio::fs::metadata(path).await.ok().map(|m| m.len()));
        let k = self.key(key);
        let body = SdkStream::from_path(path).await.map_err(|e| StoreError::Refused {
            what: format!("reading {} for {k}", path.display()),
            source: Box::new(e),
        })?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&k)
            .body(body)
            .customize()
            .disable_payload_signing()
            .send()
            .await
            .map_err(|e| classify(&k, e))?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<ByteStream, StoreError> {
        count("get", key, None);
        let k = self.key(key);
        let out = self.client.get_object().bucket(&self.bucket).key(&k).send().await.map_err(|e| classify(&k, e))?;
        Ok(Box::pin(ReaderStream::with_capacity(out.body.into_async_read(), 256 * 1024)))
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<ByteStream, StoreError> {
        count("get_range", key, None);
        let k = self.key(key);
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&k)
            .range(ByteRange::from(range).header())
            .send()
            .await
            .map_err(|e| classify(&k, e))?;
        Ok(Box::pin(ReaderStream::with_capacity(out.body.into_async_read(), 256 * 1024)))
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        count("head", key, None);
        let k = self.key(key);
        match self.client.head_object().bucket(&self.bucket).key(&k).send().await {
            Ok(_) => Ok(true),
            Err(e) => match classify(&k, e) {
                StoreError::NotFound(_) => Ok(false),
                other => Err(other),
            },
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        count("delete", key, None);
        let k = self.key(key);
        self.client.delete_object().bucket(&self.bucket).key(&k).send().await.map_err(|e| classify(&k, e))?;
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let full = self.key(prefix);
        let mut out = Vec::new();
        let mut pages = self.client.list_objects_v2().bucket(&self.bucket).prefix(&full).into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify(&full, e))?;
            for o in page.contents() {
                if let Some(k) = o.key().and_then(|k| k.strip_prefix(&self.prefix)) {
                    out.push(k.to_string());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    async fn presign_get(
        &self,
        key: &str,
        range: Option<Range<u64>>,
        ttl: Duration,
    ) -> Result<Option<String>, StoreError> {
        let k = self.key(key);
        let cfg = PresigningConfig::expires_in(ttl)
            .map_err(|e| StoreError::Refused { what: format!("presigning {k} for {ttl:?}"), source: Box::new(e) })?;
        let mut get = self.client.get_object().bucket(&self.bucket).key(&k);
        if let Some(r) = &range {
            // a header of the request, so part of the signature (X-Amz-SignedHeaders)
            get = get.range(ByteRange::from(r.clone()).header());
        }
        let req = get.presigned(cfg).await.map_err(|e| classify(&k, e))?;
        if range.is_some() && !req.headers().any(|(name, _)| name.eq_ignore_ascii_case("range")) {
            return Err(StoreError::Refused {
                what: format!("presigning a range of {k}"),
                source: "the SDK did not sign the Range header".into(),
            });
        }
        Ok(Some(req.uri().to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_store_urls() {
        let p = S3Url::parse("s3://bkt/some/prefix/?endpoint=http%3A%2F%2F127.0.0.1%3A3900&region=garage").unwrap();
        assert_eq!(p.bucket, "bkt");
        assert_eq!(p.key_prefix(), "some/prefix/");
        assert_eq!(p.param("endpoint"), Some("http://127.0.0.1:3900"));
        assert_eq!(p.param("region"), Some("garage"));
        let p = S3Url::parse("s3://bkt?endpoint=http://h:1&path_style=false").unwrap();
        assert_eq!(p.key_prefix(), "");
        assert_eq!(p.path_style(), Some(false));
        assert!(S3Url::parse("s3:///x").is_err());
        assert!(S3Url::parse("s3://b?bogus=1").is_err());
        assert!(S3Url::parse("http://b").is_err());
        // Display round-trips, with the values encoded
        let mut u = S3Url::parse("s3://b/p/q?region=r").unwrap();
        u.set_param("endpoint", "http://h:1/x?y");
        assert_eq!(S3Url::parse(&u.to_string()).unwrap(), u);
        assert_eq!(u.param("endpoint"), Some("http://h:1/x?y"));
    }
}
