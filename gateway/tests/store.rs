//! The blob-backend conformance suite on every backend: memory, local directory, and S3
//! (the real S3-compatible server from `scripts/dev-services up`; PODFS_TEST_BLOB_STORE or PODFS_BLOB_STORE must be set).

use podfs_gateway::store::{self, conformance, s3::S3Options};

fn unique(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

#[tokio::test]
async fn memory_backend_conforms() {
    let b = store::memory::MemoryBackend::default();
    conformance::run(&b, &unique("t")).await;
}

#[tokio::test]
async fn file_backend_conforms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = store::file::FileBackend::open(dir.path()).await.expect("open file backend");
    conformance::run(&b, &unique("t")).await;
}

#[tokio::test]
async fn file_backend_refuses_keys_outside_its_root() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = store::file::FileBackend::open(dir.path().join("root")).await.expect("open");
    use podfs_gateway::store::BlobBackend;
    for key in ["../escape", "/abs", "a/../../b", "a//b"] {
        assert!(b.put_bytes(key, bytes::Bytes::from_static(b"x")).await.is_err(), "{key}");
    }
    assert!(!dir.path().join("escape").exists());
}

#[tokio::test]
async fn s3_backend_conforms() {
    let url = std::env::var("PODFS_TEST_BLOB_STORE")
        .or_else(|_| std::env::var("PODFS_BLOB_STORE"))
        .expect("PODFS_BLOB_STORE is not set: run `eval \"$(scripts/dev-services up)\"` (S3 tests never skip)");
    assert!(url.starts_with("s3://"), "PODFS_BLOB_STORE must be an s3:// URL for this test, got {url}");
    let b = store::from_url(&url, &S3Options::default()).await.expect("S3 backend");
    conformance::run(b.as_ref(), &unique("conformance")).await;
}
