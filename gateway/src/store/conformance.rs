//! The one conformance suite every blob backend passes (memory, file, S3). Called from the
//! tests of each backend; panics with a message naming the broken expectation.

use std::time::Duration;

use bytes::Bytes;

use super::{BlobBackend, StoreError, read_all};

/// Runs every check against `backend`. Keys are created under `prefix` (unique per run).
pub async fn run(backend: &dyn BlobBackend, prefix: &str) {
    let k1 = format!("{prefix}/aa/one");
    let k2 = format!("{prefix}/ab/two");
    let missing = format!("{prefix}/zz/missing");

    // put / get / overwrite
    backend.put_bytes(&k1, Bytes::from_static(b"first")).await.expect("put_bytes");
    assert_eq!(read_all(backend.get(&k1).await.expect("get")).await.expect("read"), b"first");
    backend.put_bytes(&k1, Bytes::from_static(b"first")).await.expect("overwrite with the same bytes");
    assert!(backend.exists(&k1).await.expect("exists"), "exists after put");
    assert!(!backend.exists(&missing).await.expect("exists on missing"), "exists on a missing key");
    match backend.get(&missing).await {
        Err(StoreError::NotFound(_)) => {}
        Err(e) => panic!("get of a missing key must be NotFound, got {e}"),
        Ok(_) => panic!("get of a missing key must fail"),
    }

    // empty object
    backend.put_bytes(&k2, Bytes::new()).await.expect("put empty");
    assert!(read_all(backend.get(&k2).await.expect("get empty")).await.expect("read").is_empty());

    // put_file of a multi-MiB file, streamed back intact
    let big: Vec<u8> = (0..(5u32 << 20)).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let tmp = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(tmp.path(), &big).expect("write temp file");
    let k3 = format!("{prefix}/ac/big");
    backend.put_file(&k3, tmp.path()).await.expect("put_file");
    let back = read_all(backend.get(&k3).await.expect("get big")).await.expect("read big");
    assert!(back == big, "big object came back different ({} bytes)", back.len());

    // ranges: inside, to the end, past the end
    let range = |r: std::ops::Range<u64>| backend.get_range(&k3, r);
    assert!(read_all(range(0..1).await.expect("range")).await.expect("read") == big[..1], "first byte");
    let mid = read_all(range(1_000_000..1_000_100).await.expect("range")).await.expect("read");
    assert!(mid == big[1_000_000..1_000_100], "a range in the middle");
    let n = big.len() as u64;
    let tail = read_all(range(n - 10..n).await.expect("range")).await.expect("read");
    assert!(tail == big[big.len() - 10..], "the last bytes");
    let past = read_all(range(n - 10..n + 100).await.expect("range")).await.expect("read");
    assert!(past == big[big.len() - 10..], "a range past the end gives what there is");
    match backend.get_range(&missing, 0..10).await {
        Err(StoreError::NotFound(_)) => {}
        Err(e) => panic!("get_range of a missing key must be NotFound, got {e}"),
        Ok(_) => panic!("get_range of a missing key must fail"),
    }

    // list is sorted and filtered by prefix
    let keys = backend.list(&format!("{prefix}/")).await.expect("list");
    assert_eq!(keys, vec![k1.clone(), k2.clone(), k3.clone()]);
    assert_eq!(backend.list(&format!("{prefix}/ab")).await.expect("list sub"), vec![k2.clone()]);

    // presigning either gives a URL or says the gateway serves the object
    if let Some(url) = backend.presign_get(&k1, None, Duration::from_secs(60)).await.expect("presign") {
        assert!(url.starts_with("http://") || url.starts_with("https://"), "presigned URL {url}");
        let ranged = backend.presign_get(&k3, Some(10..20), Duration::from_secs(60)).await.expect("presign range");
        let ranged = ranged.expect("a store that presigns also presigns ranges");
        assert!(ranged.to_ascii_lowercase().contains("range"), "the Range header is signed: {ranged}");
    }

    // delete, and deleting again is fine
    backend.delete(&k1).await.expect("delete");
    backend.delete(&k1).await.expect("delete again");
    assert!(!backend.exists(&k1).await.expect("exists after delete"));
    backend.delete(&k2).await.expect("delete k2");
    backend.delete(&k3).await.expect("delete k3");
    assert!(backend.list(&format!("{prefix}/")).await.expect("list after delete").is_empty());
}
