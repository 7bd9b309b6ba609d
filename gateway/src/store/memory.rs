//! An in-memory backend for unit tests. Not for production: it forgets everything on exit.

use std::collections::BTreeMap;
use std::ops::Range;
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
    // A panic while the lock was held cannot have left a map operation half done.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Bytes>> {
        self.objects.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Bytes>> {
        self.objects.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl BlobBackend for MemoryBackend {
    fn describe(&self) -> String {
        "memory:".into()
    }

    async fn put_bytes(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        self.write().insert(key.to_string(), data);
        Ok(())
    }

    async fn put_file(&self, key: &str, path: &Path) -> Result<(), StoreError> {
        let data = tokio::fs::read(path).await.map_err(|e| StoreError::io(path.display().to_string(), e))?;
        self.put_bytes(key, data.into()).await
    }

    async fn get(&self, key: &str) -> Result<ByteStream, StoreError> {
        let data = self.read().get(key).cloned().ok_or_else(|| StoreError::NotFound(key.to_string()))?;
        Ok(Box::pin(futures::stream::once(async move { Ok(data) })))
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<ByteStream, StoreError> {
        let data = self.read().get(key).cloned().ok_or_else(|| StoreError::NotFound(key.to_string()))?;
        let len = data.len() as u64;
        let part = data.slice(range.start.min(len) as usize..range.end.min(len) as usize);
        Ok(Box::pin(futures::stream::once(async move { Ok(part) })))
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.read().contains_key(key))
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.write().remove(key);
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let objects = self.read();
        Ok(objects.keys().filter(|k| k.starts_with(prefix)).cloned().collect())
    }

    async fn presign_get(
        &self,
        _key: &str,
        _range: Option<Range<u64>>,
        _ttl: Duration,
    ) -> Result<Option<String>, StoreError> {
        Ok(None)
    }
}
