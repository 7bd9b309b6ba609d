//! An in-memory backend for unit tests. Not for production: it forgets everything on exit.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::RwLock;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::{BlobBackend, ByteStream, StoreError};

#[derive(Default)]
pub struct MemoryBackend {
    objects: RwLock<BTreeMap<String, Bytes>>,
}

impl MemoryBackend {
    fn lock_err() -> StoreError {
        StoreError::Other("memory store lock poisoned".into())
    }
}

#[async_trait]
impl BlobBackend for MemoryBackend {
    fn describe(&self) -> String {
        "memory:".into()
    }

    async fn put_bytes(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        self.objects.write().map_err(|_| Self::lock_err())?.insert(key.to_string(), data);
        Ok(())
    }

    async fn put_file(&self, key: &str, path: &Path) -> Result<(), StoreError> {
        let data = tokio::fs::read(path).await?;
        self.put_bytes(key, data.into()).await
    }

    async fn get(&self, key: &str) -> Result<ByteStream, StoreError> {
        let data = self
            .objects
            .read()
            .map_err(|_| Self::lock_err())?
            .get(key)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(key.to_string()))?;
        Ok(Box::pin(futures::stream::once(async move { Ok(data) })))
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.objects.read().map_err(|_| Self::lock_err())?.contains_key(key))
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.objects.write().map_err(|_| Self::lock_err())?.remove(key);
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let objects = self.objects.read().map_err(|_| Self::lock_err())?;
        Ok(objects.keys().filter(|k| k.starts_with(prefix)).cloned().collect())
    }

    async fn presign_get(&self, _key: &str, _ttl: Duration) -> Result<Option<String>, StoreError> {
        Ok(None)
    }
}
