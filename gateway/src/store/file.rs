//! A backend in a local directory: the embedded default. Each key is a file below the root;
//! writes go to a temporary file that is synced and renamed into place, so a crash never leaves
//! a torn object under a key.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio_util::io::ReaderStream;

use super::{BlobBackend, ByteStream, StoreError};

pub struct FileBackend {
    root: PathBuf,
    tmp: PathBuf,
}

impl FileBackend {
    pub async fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        let tmp = root.join(".tmp");
        tokio::fs::create_dir_all(&tmp).await.map_err(|e| StoreError::io(tmp.display().to_string(), e))?;
        Ok(Self { root, tmp })
    }

    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        // keys are produced by the gateway, but never let one leave the root
        if key.is_empty() || key.starts_with('/') || key.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
            return Err(StoreError::InvalidKey(key.to_string()));
        }
        Ok(self.root.join(key))
    }

    async fn publish(&self, tmp: tempfile::TempPath, key: &str) -> Result<(), StoreError> {
        let dest = self.path(key)?;
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(|e| StoreError::io(parent.display().to_string(), e))?;
        }
        let what = format!("renaming into {key}");
        blocking(&what, move || tmp.persist(&dest).map_err(|e| e.error)).await
    }

    fn new_tmp(&self) -> Result<tempfile::NamedTempFile, StoreError> {
        tempfile::NamedTempFile::new_in(&self.tmp)
            .map_err(|e| StoreError::io(format!("a temporary file in {}", self.tmp.display()), e))
    }
}

#[async_trait]
impl BlobBackend for FileBackend {
    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }

    async fn put_bytes(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        let (file, tmp) = self.new_tmp()?.into_parts();
        let mut file = tokio::fs::File::from_std(file);
        let io = |e| StoreError::io(format!("writing {key}"), e);
        file.write_all(&data).await.map_err(io)?;
        file.sync_data().await.map_err(io)?;
        drop(file);
        self.publish(tmp, key).await
    }

    async fn put_file(&self, key: &str, path: &Path) -> Result<(), StoreError> {
        let tmp = self.new_tmp()?.into_temp_path();
        let io = |e| StoreError::io(format!("copying {} to {key}", path.display()), e);
        tokio::fs::copy(path, &tmp).await.map_err(io)?;
        tokio::fs::File::open(&tmp).await.map_err(io)?.sync_data().await.map_err(io)?;
        self.publish(tmp, key).await
    }

    async fn get(&self, key: &str) -> Result<ByteStream, StoreError> {
        let file = tokio::fs::File::open(self.path(key)?).await.map_err(|e| StoreError::io(key, e))?;
        Ok(Box::pin(ReaderStream::with_capacity(file, 256 * 1024)))
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<ByteStream, StoreError> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let mut file = tokio::fs::File::open(self.path(key)?).await.map_err(|e| StoreError::io(key, e))?;
        file.seek(std::io::SeekFrom::Start(range.start)).await.map_err(|e| StoreError::io(key, e))?;
        let part = file.take(range.end.saturating_sub(range.start));
        Ok(Box::pin(ReaderStream::with_capacity(part, 256 * 1024)))
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        tokio::fs::try_exists(self.path(key)?).await.map_err(|e| StoreError::io(key, e))
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match tokio::fs::remove_file(self.path(key)?).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StoreError::io(format!("deleting {key}"), e)),
            _ => Ok(()),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        let what = format!("listing {}", root.display());
        blocking(&what, move || {
            let mut out = Vec::new();
            let mut stack = vec![root.clone()];
            while let Some(dir) = stack.pop() {
                for e in std::fs::read_dir(&dir)? {
                    let e = e?;
                    let path = e.path();
                    if e.file_type()?.is_dir() {
                        if path != root.join(".tmp") {
                            stack.push(path);
                        }
                    } else if let Ok(rel) = path.strip_prefix(&root) {
                        let key = rel.to_string_lossy().to_string();
                        if key.starts_with(&prefix) {
                            out.push(key);
                        }
                    }
                }
            }
            out.sort();
            Ok(out)
        })
        .await
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

/// Runs blocking file work; its I/O error, or the task's failure, names `what`.
async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| StoreError::io(what, e)),
        Err(e) => Err(StoreError::Io { what: what.to_string(), source: std::io::Error::other(e) }),
    }
}
