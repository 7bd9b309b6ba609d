//! A backend that wraps another and injects faults, for tests of everything above the store
//! (the gateway's verification, the clients' retries and refreshes) through the real gateway.
//!
//! Faults are switched at run time through [`Faults`], a cloneable handle the test keeps while
//! the gateway owns the [`Faulty`] backend: corrupt the bytes `get` returns for chosen keys,
//! answer `NotFound` for chosen keys, fail the next puts or gets with `Unavailable`, delay every
//! call, or hand out presigned URLs that have already expired. With every fault off it is the
//! inner backend (the conformance suite runs on it so). It never changes what is stored: a
//! corrupt read flips a byte on the way out.
//!
//! Models: neon's `libs/remote_storage/src/simulate_failures.rs` (a wrapper failing chosen
//! operations) and object_store's `throttle.rs` (a wrapper delaying each call, switched at run
//! time).

use std::collections::HashSet;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::{BlobBackend, ByteStream, StoreError, read_all};

/// An expired presigned URL is signed for this long...
const EXPIRED_TTL: Duration = Duration::from_secs(1);
/// ...and handed out only this long after it was signed: past its lifetime even for a store
/// that compares whole seconds of the signing date (`X-Amz-Date` has no fractions).
const EXPIRED_AFTER: Duration = Duration::from_millis(2100);

/// `inner` with the faults `faults` switches on.
pub struct Faulty {
    inner: Arc<dyn BlobBackend>,
    faults: Faults,
}

impl Faulty {
    /// Wraps `inner`, every fault off; returns the backend and the handle that switches faults.
    pub fn new(inner: Arc<dyn BlobBackend>) -> (Self, Faults) {
        let faults = Faults::default();
        (Self { inner, faults: faults.clone() }, faults)
    }
}

/// Switches the faults of a [`Faulty`] backend and counts the calls it saw. Cheap to clone;
/// every clone switches the same backend.
#[derive(Clone, Default)]
pub struct Faults(Arc<Mutex<State>>);

#[derive(Default)]
struct State {
    corrupt: HashSet<String>,
    hidden: HashSet<String>,
    failing_puts: u32,
    failing_gets: u32,
    expiring_presigns: u32,
    delay: Duration,
    puts: u64,
    gets: u64,
    presigns: u64,
    expired: u64,
}

/// Calls the handle counted (every call, failed or not).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Calls {
    /// `put_bytes` and `put_file`.
    pub puts: u64,
    /// `get`.
    pub gets: u64,
    /// `presign_get`.
    pub presigns: u64,
    /// Presigned URLs handed out already expired.
    pub expired: u64,
}

impl Faults {
    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `get` of `key` returns its bytes with the last one flipped (one byte appended to an empty
    /// object), until [`Faults::clear`].
    pub fn corrupt(&self, key: &str) {
        self.state().corrupt.insert(key.to_string());
    }

    /// `get` of `key` answers `NotFound` and `exists` false, as if the object were lost.
    pub fn hide(&self, key: &str) {
        self.state().hidden.insert(key.to_string());
    }

    /// The next `n` puts fail with `Unavailable` (nothing is stored).
    pub fn fail_puts(&self, n: u32) {
        self.state().failing_puts = n;
    }

    /// The next `n` gets fail with `Unavailable`.
    pub fn fail_gets(&self, n: u32) {
        self.state().failing_gets = n;
    }

    /// The next `n` presigned URLs come back already expired: each is signed for one second and
    /// handed out only once that second has passed (so each of these calls takes about two
    /// seconds). A backend that does not presign is unaffected.
    pub fn expire_presigned(&self, n: u32) {
        self.state().expiring_presigns = n;
    }

    /// Every call waits this long before it reaches the inner backend (zero: no delay).
    pub fn delay(&self, d: Duration) {
        self.state().delay = d;
    }

    /// Every fault off (the counts stay).
    pub fn clear(&self) {
        let mut s = self.state();
        s.corrupt.clear();
        s.hidden.clear();
        s.failing_puts = 0;
        s.failing_gets = 0;
        s.expiring_presigns = 0;
        s.delay = Duration::ZERO;
    }

    /// The calls seen so far.
    pub fn calls(&self) -> Calls {
        let s = self.state();
        Calls { puts: s.puts, gets: s.gets, presigns: s.presigns, expired: s.expired }
    }

    /// Counts a get (whole or ranged); its delay, whether it must fail, whether `key` is hidden
    /// or corrupt.
    fn on_get(&self, key: &str) -> (Duration, bool, bool, bool) {
        let mut s = self.state();
        s.gets += 1;
        let fail = take_one(&mut s.failing_gets);
        (s.delay, fail, s.hidden.contains(key), s.corrupt.contains(key))
    }

    /// Counts a put; whether it must fail.
    fn on_put(&self) -> (Duration, bool) {
        let mut s = self.state();
        s.puts += 1;
        let fail = take_one(&mut s.failing_puts);
        (s.delay, fail)
    }
}

/// `stream` with its last byte flipped (one byte appended when it is empty).
async fn corrupted(key: &str, stream: ByteStream) -> Result<ByteStream, StoreError> {
    let mut bytes = read_all(stream).await.map_err(|e| StoreError::Unavailable(format!("reading {key}: {e}")))?;
    match bytes.last_mut() {
        Some(last) => *last ^= 1,
        None => bytes.push(0),
    }
    Ok(Box::pin(futures::stream::once(async move { Ok(Bytes::from(bytes)) })))
}

/// Takes one from a budget of failures; whether there was one.
fn take_one(budget: &mut u32) -> bool {
    let some = *budget > 0;
    *budget = budget.saturating_sub(1);
    some
}

fn injected(what: &str, key: &str) -> StoreError {
    StoreError::Unavailable(format!("injected fault: {what} {key}"))
}

async fn wait(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

impl Faulty {
    /// A whole or ranged get through the faults switched on for `key`.
    async fn faulty_get(&self, key: &str, range: Option<Range<u64>>) -> Result<ByteStream, StoreError> {
        let (delay, fail, hidden, corrupt) = self.faults.on_get(key);
        wait(delay).await;
        if fail {
            return Err(injected("get", key));
        }
        if hidden {
            return Err(StoreError::NotFound(key.to_string()));
        }
        let stream = match range {
            Some(r) => self.inner.get_range(key, r).await?,
            None => self.inner.get(key).await?,
        };
        if corrupt { corrupted(key, stream).await } else { Ok(stream) }
    }
}

#[async_trait]
impl BlobBackend for Faulty {
    fn describe(&self) -> String {
        format!("faulty({})", self.inner.describe())
    }

    async fn put_bytes(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        let (delay, fail) = self.faults.on_put();
        wait(delay).await;
        if fail {
            return Err(injected("put", key));
        }
        self.inner.put_bytes(key, data).await
    }

    async fn put_file(&self, key: &str, path: &Path) -> Result<(), StoreError> {
        let (delay, fail) = self.faults.on_put();
        wait(delay).await;
        if fail {
            return Err(injected("put", key));
        }
        self.inner.put_file(key, path).await
    }

    async fn get(&self, key: &str) -> Result<ByteStream, StoreError> {
        self.faulty_get(key, None).await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<ByteStream, StoreError> {
        self.faulty_get(key, Some(range)).await
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let (delay, hidden) = {
            let s = self.faults.state();
            (s.delay, s.hidden.contains(key))
        };
        wait(delay).await;
        if hidden {
            return Ok(false);
        }
        self.inner.exists(key).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let delay = self.faults.state().delay;
        wait(delay).await;
        self.inner.delete(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let delay = self.faults.state().delay;
        wait(delay).await;
        self.inner.list(prefix).await
    }

    async fn presign_get(
        &self,
        key: &str,
        range: Option<Range<u64>>,
        ttl: Duration,
    ) -> Result<Option<String>, StoreError> {
        let (delay, expire) = {
            let mut s = self.faults.state();
            s.presigns += 1;
            (s.delay, take_one(&mut s.expiring_presigns))
        };
        wait(delay).await;
        if !expire {
            return self.inner.presign_get(key, range, ttl).await;
        }
        let signed = tokio::time::Instant::now();
        let url = self.inner.presign_get(key, range, EXPIRED_TTL).await?;
        if url.is_some() {
            tokio::time::sleep_until(signed + EXPIRED_AFTER).await;
            self.faults.state().expired += 1;
        }
        Ok(url)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::store::memory::MemoryBackend;

    fn faulty() -> (Faulty, Faults) {
        Faulty::new(Arc::new(MemoryBackend::default()))
    }

    async fn read(b: &Faulty, key: &str) -> Result<Vec<u8>, StoreError> {
        Ok(read_all(b.get(key).await?).await.unwrap())
    }

    /// With every fault off, the wrapper is its inner backend: the one conformance suite, on
    /// the memory and the file backend.
    #[tokio::test]
    async fn conforms_with_faults_off() {
        let (b, f) = faulty();
        crate::store::conformance::run(&b, "memory").await;
        let dir = tempfile::tempdir().unwrap();
        let file = crate::store::file::FileBackend::open(dir.path()).await.unwrap();
        let (b, _) = Faulty::new(Arc::new(file));
        crate::store::conformance::run(&b, "file").await;
        assert_eq!(f.calls().expired, 0);
    }

    #[tokio::test]
    async fn corrupt_flips_a_byte_on_the_way_out_only() {
        let (b, f) = faulty();
        b.put_bytes("k", Bytes::from_static(b"abc")).await.unwrap();
        b.put_bytes("empty", Bytes::new()).await.unwrap();
        f.corrupt("k");
        f.corrupt("empty");
        assert_eq!(read(&b, "k").await.unwrap(), b"abb");
        assert_eq!(read(&b, "empty").await.unwrap(), b"\0");
        f.clear();
        assert_eq!(read(&b, "k").await.unwrap(), b"abc", "the stored bytes are untouched");
        assert_eq!(read(&b, "empty").await.unwrap(), b"");
    }

    #[tokio::test]
    async fn failures_take_from_their_budget() {
        let (b, f) = faulty();
        f.fail_puts(1);
        assert!(matches!(b.put_bytes("k", Bytes::from_static(b"x")).await, Err(StoreError::Unavailable(_))));
        assert!(!b.exists("k").await.unwrap(), "a failed put stores nothing");
        b.put_bytes("k", Bytes::from_static(b"x")).await.unwrap();
        f.fail_gets(2);
        for _ in 0..2 {
            assert!(matches!(read(&b, "k").await, Err(StoreError::Unavailable(_))));
        }
        assert_eq!(read(&b, "k").await.unwrap(), b"x");
        assert_eq!(f.calls(), Calls { puts: 2, gets: 3, presigns: 0, expired: 0 });
    }

    #[tokio::test]
    async fn hidden_objects_are_not_found() {
        let (b, f) = faulty();
        b.put_bytes("k", Bytes::from_static(b"x")).await.unwrap();
        f.hide("k");
        assert!(matches!(read(&b, "k").await, Err(StoreError::NotFound(_))));
        assert!(!b.exists("k").await.unwrap());
        assert_eq!(b.list("").await.unwrap(), vec!["k".to_string()], "the object is still stored");
        f.clear();
        assert!(b.exists("k").await.unwrap());
    }

    /// A lower bound only: a slow machine can make the calls take longer, never shorter.
    #[tokio::test]
    async fn delay_holds_every_call() {
        let (b, f) = faulty();
        f.delay(Duration::from_millis(50));
        let start = std::time::Instant::now();
        b.put_bytes("k", Bytes::from_static(b"x")).await.unwrap();
        assert_eq!(read(&b, "k").await.unwrap(), b"x");
        assert!(start.elapsed() >= Duration::from_millis(100), "{:?}", start.elapsed());
    }

    #[tokio::test]
    async fn a_backend_without_presigning_has_nothing_to_expire() {
        let (b, f) = faulty();
        f.expire_presigned(1);
        assert_eq!(b.presign_get("k", None, Duration::from_secs(60)).await.unwrap(), None);
        assert_eq!(f.calls(), Calls { presigns: 1, ..Calls::default() });
    }
}
