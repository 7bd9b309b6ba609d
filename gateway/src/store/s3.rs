//! A backend on any S3-compatible service (Tigris, Garage, MinIO, AWS).
//!
//! Configured from `s3://bucket/prefix?endpoint=URL&region=R&path_style=true|false` plus the
//! standard AWS environment and credential chain (`AWS_ACCESS_KEY_ID`, profiles, instance
//! roles, `AWS_ENDPOINT_URL_S3`, ...). Path-style addressing is the default whenever an endpoint
//! is set (Garage, MinIO, 127.0.0.1); Tigris and AWS take `path_style=false`.
//! Nothing here relies on conditional writes: Garage ignores them, and keys are content-addressed.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::config::{Region, RequestChecksumCalculation, ResponseChecksumValidation, timeout::TimeoutConfig};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream as SdkStream;
use bytes::Bytes;
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

struct Parsed {
    bucket: String,
    prefix: String,
    endpoint: Option<String>,
    region: Option<String>,
    path_style: Option<bool>,
}

fn parse(url: &str) -> anyhow::Result<Parsed> {
    let rest = url.strip_prefix("s3://").ok_or_else(|| anyhow::anyhow!("not an s3:// URL: {url}"))?;
    let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
    anyhow::ensure!(!bucket.is_empty(), "blob store {url:?} names no bucket");
    let prefix = prefix.trim_matches('/');
    let mut p = Parsed {
        bucket: bucket.to_string(),
        prefix: if prefix.is_empty() { String::new() } else { format!("{prefix}/") },
        endpoint: None,
        region: None,
        path_style: None,
    };
    for pair in query.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        match k {
            "endpoint" => p.endpoint = Some(v),
            "region" => p.region = Some(v),
            "path_style" => p.path_style = Some(matches!(v.as_str(), "true" | "1" | "yes")),
            other => anyhow::bail!("blob store {url:?}: unknown parameter {other:?} (endpoint, region, path_style)"),
        }
    }
    Ok(p)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl S3Backend {
    pub async fn from_url(url: &str, opts: &S3Options) -> anyhow::Result<Self> {
        let p = parse(url)?;
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(r) = &p.region {
            loader = loader.region(Region::new(r.clone()));
        }
        let sdk = loader.load().await;
        let endpoint = p
            .endpoint
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL_S3").or_else(|_| std::env::var("AWS_ENDPOINT_URL")).ok());
        let (checksum_req, checksum_resp) = if opts.checksums_when_supported {
            (RequestChecksumCalculation::WhenSupported, ResponseChecksumValidation::WhenSupported)
        } else {
            (RequestChecksumCalculation::WhenRequired, ResponseChecksumValidation::WhenRequired)
        };
        let mut b = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(p.path_style.unwrap_or(endpoint.is_some()))
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
            prefix: p.prefix.clone(),
            url: format!("s3://{}/{}", p.bucket, p.prefix),
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
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
        let k = self.key(key);
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&k)
            .content_length(data.len() as i64)
            .body(SdkStream::from(data))
            .send()
            .await
            .map_err(|e| classify(&k, e))?;
        Ok(())
    }

    async fn put_file(&self, key: &str, path: &Path) -> Result<(), StoreError> {
        let k = self.key(key);
        let body = SdkStream::from_path(path).await.map_err(|e| StoreError::Refused {
            what: format!("reading {} for {k}", path.display()),
            source: Box::new(e),
        })?;
        self.client.put_object().bucket(&self.bucket).key(&k).body(body).send().await.map_err(|e| classify(&k, e))?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<ByteStream, StoreError> {
        let k = self.key(key);
        let out = self.client.get_object().bucket(&self.bucket).key(&k).send().await.map_err(|e| classify(&k, e))?;
        Ok(Box::pin(ReaderStream::with_capacity(out.body.into_async_read(), 256 * 1024)))
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
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

    async fn presign_get(&self, key: &str, ttl: Duration) -> Result<Option<String>, StoreError> {
        let k = self.key(key);
        let cfg = PresigningConfig::expires_in(ttl)
            .map_err(|e| StoreError::Refused { what: format!("presigning {k} for {ttl:?}"), source: Box::new(e) })?;
        let req =
            self.client.get_object().bucket(&self.bucket).key(&k).presigned(cfg).await.map_err(|e| classify(&k, e))?;
        Ok(Some(req.uri().to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_store_urls() {
        let p = parse("s3://bkt/some/prefix/?endpoint=http%3A%2F%2F127.0.0.1%3A3900&region=garage").unwrap();
        assert_eq!(p.bucket, "bkt");
        assert_eq!(p.prefix, "some/prefix/");
        assert_eq!(p.endpoint.as_deref(), Some("http://127.0.0.1:3900"));
        assert_eq!(p.region.as_deref(), Some("garage"));
        let p = parse("s3://bkt?endpoint=http://h:1&path_style=false").unwrap();
        assert_eq!(p.prefix, "");
        assert_eq!(p.path_style, Some(false));
        assert!(parse("s3:///x").is_err());
        assert!(parse("s3://b?bogus=1").is_err());
    }
}
