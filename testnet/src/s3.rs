//! A small S3 client for tests to look at the bucket behind the gateway: list the keys under a
//! store URL's prefix (dedup checks), read, overwrite (tamper tests) and delete objects.
//!
//! Configured like the gateway for Garage: explicit endpoint, path-style addressing, static
//! credentials from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`, and checksums only when an
//! operation requires them (aws-sdk-s3's default CRC32 on every request is not something every
//! S3-compatible store accepts).

use anyhow::Context;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::primitives::ByteStream;

use crate::services::{S3Env, StoreUrl};

/// An S3 client for `env`'s endpoint, region and credentials.
pub fn client(env: &S3Env) -> aws_sdk_s3::Client {
    let mut config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .http_client(podfs_gateway::store::s3::http_client())
        .region(Region::new(env.region.clone()))
        .credentials_provider(Credentials::new(
            env.access_key_id.clone(),
            env.secret_access_key.clone(),
            None,
            None,
            "podfs-testnet",
        ))
        .force_path_style(true)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
    if let Some(endpoint) = &env.endpoint {
        config = config.endpoint_url(endpoint);
    }
    aws_sdk_s3::Client::from_conf(config.build())
}

fn env_for(store_url: &str) -> anyhow::Result<(S3Env, StoreUrl)> {
    Ok((S3Env::for_store_url(store_url)?, StoreUrl::parse(store_url)?))
}

/// Every object key under `store_url`'s prefix (full keys, sorted), e.g. for
/// `s3://podfs-test/t/t-1a2b?...`: the keys starting with `t/t-1a2b/`.
pub async fn list_keys(store_url: &str) -> anyhow::Result<Vec<String>> {
    let (env, url) = env_for(store_url)?;
    list_keys_with(&client(&env), &url.bucket, &url.key_prefix()).await
}

/// Every key in `bucket` starting with `prefix`, sorted.
pub async fn list_keys_with(client: &aws_sdk_s3::Client, bucket: &str, prefix: &str) -> anyhow::Result<Vec<String>> {
    let mut keys = Vec::new();
    let mut pages = client.list_objects_v2().bucket(bucket).prefix(prefix).into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.with_context(|| format!("ListObjectsV2 s3://{bucket}/{prefix}"))?;
        keys.extend(page.contents().iter().filter_map(|o| o.key().map(str::to_owned)));
    }
    keys.sort();
    Ok(keys)
}

/// The bytes of object `key` (a full key, as [`list_keys`] returns) in `store_url`'s bucket.
pub async fn get_object(store_url: &str, key: &str) -> anyhow::Result<Vec<u8>> {
    let (env, url) = env_for(store_url)?;
    let out = client(&env)
        .get_object()
        .bucket(&url.bucket)
        .key(key)
        .send()
        .await
        .with_context(|| format!("GetObject s3://{}/{key}", url.bucket))?;
    Ok(out.body.collect().await?.into_bytes().to_vec())
}

/// Writes object `key` (a full key) in `store_url`'s bucket, e.g. to corrupt a stored blob.
pub async fn put_object(store_url: &str, key: &str, bytes: Vec<u8>) -> anyhow::Result<()> {
    let (env, url) = env_for(store_url)?;
    client(&env)
        .put_object()
        .bucket(&url.bucket)
        .key(key)
        .body(ByteStream::from(bytes))
        .send()
        .await
        .with_context(|| format!("PutObject s3://{}/{key}", url.bucket))?;
    Ok(())
}

/// Deletes every object under `store_url`'s prefix; returns how many. Refuses a store URL
/// without a prefix (it would empty the bucket).
pub async fn delete_prefix(store_url: &str) -> anyhow::Result<usize> {
    let (env, url) = env_for(store_url)?;
    anyhow::ensure!(!url.prefix.is_empty(), "refusing to delete a whole bucket ({store_url})");
    let client = client(&env);
    let keys = list_keys_with(&client, &url.bucket, &url.key_prefix()).await?;
    for key in &keys {
        client
            .delete_object()
            .bucket(&url.bucket)
            .key(key)
            .send()
            .await
            .with_context(|| format!("DeleteObject s3://{}/{key}", url.bucket))?;
    }
    Ok(keys.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::{Services, fresh_s3_prefix};

    /// Against the real S3 of `scripts/dev-services up`: fails (never skips) without it.
    #[tokio::test]
    async fn put_list_get_delete_on_real_s3() {
        let services = Services::from_env().expect("S3 environment");
        let store = fresh_s3_prefix(&services.s3.store_url);
        let prefix = StoreUrl::parse(&store).unwrap().key_prefix();
        assert!(list_keys(&store).await.unwrap().is_empty());

        put_object(&store, &format!("{prefix}b"), b"two".to_vec()).await.unwrap();
        put_object(&store, &format!("{prefix}a"), b"one".to_vec()).await.unwrap();
        // A sibling prefix sharing the first characters is not listed.
        let sibling = format!("{}x/c", prefix.trim_end_matches('/'));
        put_object(&store, &sibling, b"three".to_vec()).await.unwrap();

        assert_eq!(list_keys(&store).await.unwrap(), vec![format!("{prefix}a"), format!("{prefix}b")]);
        assert_eq!(get_object(&store, &format!("{prefix}a")).await.unwrap(), b"one");
        assert_eq!(delete_prefix(&store).await.unwrap(), 2);
        assert!(list_keys(&store).await.unwrap().is_empty());

        let env = services.s3.clone();
        client(&env).delete_object().bucket(env.bucket()).key(&sibling).send().await.unwrap();
        let bucket_only = format!("s3://{}", env.bucket());
        assert!(delete_prefix(&bucket_only).await.is_err());
    }
}
