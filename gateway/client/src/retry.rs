//! Retries with exponential backoff and full jitter.
//!
//! Policy: the client retries on its own every request that is safe to repeat (reads, batch
//! look-ups, blob uploads, which are content-addressed and so idempotent), up to
//! [`RetryPolicy::max_attempts`] attempts, for errors that [`Error::is_retryable`] accepts.
//! A commit is resent only when the connection was never made ([`Error::is_connect`]): a commit
//! that reached the gateway and lost its answer would come back as 409, not as success.
//! Streaming downloads into a caller's writer are not retried here (the writer already holds
//! partial bytes); callers wrap them in [`retry`] with a fresh writer per attempt.

use std::future::Future;
use std::time::Duration;

use crate::error::{Error, Result};

/// Default number of attempts (first try included).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// Default delay before the second attempt; doubles on each further attempt.
pub const DEFAULT_BASE_DELAY: Duration = Duration::from_millis(200);
/// Default cap on one delay.
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; 1 disables retries.
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { max_attempts: DEFAULT_MAX_ATTEMPTS, base_delay: DEFAULT_BASE_DELAY, max_delay: DEFAULT_MAX_DELAY }
    }
}

impl RetryPolicy {
    /// No retries at all.
    pub fn none() -> Self {
        Self { max_attempts: 1, ..Self::default() }
    }

    /// The longest wait before attempt `attempt + 1` (attempt counts from 1); the actual wait is
    /// uniformly random in `[0, backoff]` ("full jitter").
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.saturating_sub(1).min(20)).unwrap_or(u32::MAX);
        self.base_delay.saturating_mul(factor).min(self.max_delay)
    }

    /// The wait before attempt `attempt + 1`: uniformly random in `[0, backoff(attempt)]`.
    pub fn jittered_backoff(&self, attempt: u32) -> Duration {
        self.backoff(attempt).mul_f64(rand::random::<f64>())
    }
}

/// Runs `op` until it succeeds, fails with an error `accept` refuses, or the policy's attempts
/// are used up. `what` names the operation in logs.
pub async fn retry_if<T, F, Fut>(
    policy: &RetryPolicy,
    what: &str,
    accept: impl Fn(&Error) -> bool,
    mut op: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut attempt = 1;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt < policy.max_attempts && accept(&e) => {
                let wait = policy.jittered_backoff(attempt);
                tracing::debug!(%what, attempt, ?wait, error = %e, "retrying");
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// [`retry_if`] with [`Error::is_retryable`].
pub async fn retry<T, F, Fut>(policy: &RetryPolicy, what: &str, op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    retry_if(policy, what, Error::is_retryable, op).await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use reqwest::StatusCode;

    use super::*;

    fn unavailable() -> Error {
        Error::Api {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: podfs_protocol::api::ErrorCode::Unavailable,
            message: "busy".into(),
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy::default();
        assert_eq!(p.backoff(1), Duration::from_millis(200));
        assert_eq!(p.backoff(2), Duration::from_millis(400));
        assert_eq!(p.backoff(3), Duration::from_millis(800));
        assert_eq!(p.backoff(30), DEFAULT_MAX_DELAY);
        assert_eq!(p.backoff(u32::MAX), DEFAULT_MAX_DELAY);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_retryable_errors_then_gives_up() {
        let calls = AtomicU32::new(0);
        let r: Result<()> = retry(&RetryPolicy::default(), "test", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(unavailable())
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), DEFAULT_MAX_ATTEMPTS);

        calls.store(0, Ordering::SeqCst);
        let r = retry(&RetryPolicy::default(), "test", || async {
            if calls.fetch_add(1, Ordering::SeqCst) < 2 { Err(unavailable()) } else { Ok(7) }
        })
        .await;
        assert_eq!(r.ok(), Some(7));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn does_not_retry_permanent_errors() {
        let calls = AtomicU32::new(0);
        let r: Result<()> = retry(&RetryPolicy::default(), "test", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(Error::Api {
                status: StatusCode::NOT_FOUND,
                code: podfs_protocol::api::ErrorCode::NotFound,
                message: "no".into(),
            })
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
