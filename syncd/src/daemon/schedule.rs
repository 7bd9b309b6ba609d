//! When the daemon reconciles, commits and rescans: the timing rules as a pure state machine
//! over [`tokio::time::Instant`], so tests drive it with a paused clock.
//!
//! - A batch of watcher hints is reconciled once the tree has been quiet for `quiet`, or at the
//!   latest `max_delay` after its first hint (a file written continuously still gets saved).
//!   A whole-tree batch is reconciled at once.
//! - Pending changes are committed as soon as possible; after a failure, retries back off
//!   exponentially from [`FIRST_BACKOFF`] to [`MAX_BACKOFF`], and a success resets that.
//! - The whole tree is reconciled every `rescan`, or every [`EXHAUSTED_RESCAN`] at most while
//!   the kernel is out of inotify watches (scans are then the only way changes are found).

use std::time::Duration;

use tokio::time::Instant;

/// First wait after a failed commit.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Longest wait between retries while the gateway is unreachable.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A failed reconciliation is retried (as a full one) after this long.
pub const RECONCILE_RETRY: Duration = Duration::from_secs(5);
/// Full reconciliations this often while the kernel is out of inotify watches.
pub const EXHAUSTED_RESCAN: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct Schedule {
    quiet: Duration,
    max_delay: Duration,
    rescan: Duration,
    /// First hint of the batch not reconciled yet.
    first_hint: Option<Instant>,
    last_hint: Instant,
    next_rescan: Instant,
    retry_at: Option<Instant>,
    backoff: Duration,
    /// When the oldest change not yet committed was noticed.
    oldest: Option<Instant>,
}

impl Schedule {
    /// A schedule whose first batch (the start-up reconciliation) is due now.
    pub fn new(quiet: Duration, max_delay: Duration, rescan: Duration, now: Instant) -> Self {
        Self {
            quiet,
            max_delay: max_delay.max(quiet),
            rescan,
            first_hint: Some(now),
            last_hint: now,
            next_rescan: now + rescan,
            retry_at: None,
            backoff: FIRST_BACKOFF,
            oldest: Some(now),
        }
    }

    /// A watcher hint arrived.
    pub fn hint(&mut self, now: Instant) {
        self.first_hint.get_or_insert(now);
        self.oldest.get_or_insert(now);
        self.last_hint = now;
    }

    /// When the current batch is due (`full`: it is a whole-tree one); `None` without hints.
    pub fn flush_at(&self, full: bool) -> Option<Instant> {
        let first = self.first_hint?;
        Some(if full { first } else { (self.last_hint + self.quiet).min(first + self.max_delay) })
    }

    /// Whether the current batch is due now.
    pub fn flush_due(&self, now: Instant, full: bool) -> bool {
        full || self.flush_at(full).is_some_and(|at| at <= now)
    }

    /// The batch was handed to the reconciler.
    pub fn flushed(&mut self) {
        self.first_hint = None;
    }

    /// Paths must be looked at again soon (they kept changing while read): a new batch, due
    /// after the quiet period.
    pub fn look_again(&mut self, now: Instant) {
        self.first_hint = Some(now);
        self.last_hint = now;
    }

    /// Paths must be looked at again before the next commit (another writer's changes were
    /// merged, or a file changed while uploading): a new batch, due now.
    pub fn look_again_now(&mut self, now: Instant) {
        self.first_hint = Some(now.checked_sub(self.max_delay).unwrap_or(now));
        self.last_hint = now;
    }

    /// When a whole-tree reconciliation is next due.
    pub fn next_rescan(&self) -> Instant {
        self.next_rescan
    }

    /// True (once) when the periodic whole-tree reconciliation is due; schedules the next.
    pub fn rescan_due(&mut self, now: Instant, out_of_watches: bool) -> bool {
        if now < self.next_rescan {
            return false;
        }
        let every = if out_of_watches { self.rescan.min(EXHAUSTED_RESCAN) } else { self.rescan };
        self.next_rescan = now + every;
        self.first_hint.get_or_insert(now);
        true
    }

    /// A reconciliation failed: try the whole tree again after [`RECONCILE_RETRY`].
    pub fn reconcile_failed(&mut self, now: Instant) {
        self.next_rescan = now + RECONCILE_RETRY;
    }

    /// Whether a commit may be attempted now (not waiting out a backoff).
    pub fn may_commit(&self, now: Instant) -> bool {
        self.retry_at.is_none_or(|at| at <= now)
    }

    /// When the daemon must wake next: the batch, a commit of `pending` changes, or a rescan.
    pub fn wake_at(&self, full: bool, pending: bool, now: Instant) -> Instant {
        let commit_at = pending.then(|| self.retry_at.unwrap_or(now));
        [self.flush_at(full), commit_at, Some(self.next_rescan)].into_iter().flatten().min().unwrap_or(self.next_rescan)
    }

    /// Nothing is pending any more (the disk equals the base).
    pub fn settled(&mut self) {
        self.oldest = None;
    }

    /// A commit succeeded; returns how long its oldest change waited. `more`: changes are still
    /// pending (noticed during the commit).
    pub fn committed(&mut self, now: Instant, more: bool) -> Duration {
        let waited = self.oldest.map_or(Duration::ZERO, |o| now.saturating_duration_since(o));
        self.retry_at = None;
        self.backoff = FIRST_BACKOFF;
        self.oldest = more.then_some(now);
        waited
    }

    /// A commit failed; returns how long until the retry.
    pub fn commit_failed(&mut self, now: Instant) -> Duration {
        let wait = self.backoff;
        self.retry_at = Some(now + wait);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        wait
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::advance;

    use super::*;

    const QUIET: Duration = Duration::from_millis(100);
    const MAX_DELAY: Duration = Duration::from_millis(1000);
    const RESCAN: Duration = Duration::from_secs(300);

    fn schedule() -> Schedule {
        let mut s = Schedule::new(QUIET, MAX_DELAY, RESCAN, Instant::now());
        assert!(s.flush_due(Instant::now(), true), "the start-up reconciliation is due at once");
        s.flushed();
        s.settled();
        s
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_waits_for_quiet() {
        let mut s = schedule();
        assert_eq!(s.flush_at(false), None);
        s.hint(Instant::now());
        advance(QUIET - Duration::from_millis(1)).await;
        assert!(!s.flush_due(Instant::now(), false));
        s.hint(Instant::now()); // another save: the quiet period starts again
        advance(QUIET - Duration::from_millis(1)).await;
        assert!(!s.flush_due(Instant::now(), false));
        advance(Duration::from_millis(1)).await;
        assert!(s.flush_due(Instant::now(), false));
        assert_eq!(s.wake_at(false, false, Instant::now()), Instant::now());
        s.flushed();
        assert_eq!(s.flush_at(false), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_file_written_continuously_is_flushed_at_max_delay() {
        let mut s = schedule();
        let start = Instant::now();
        s.hint(start);
        while Instant::now() < start + MAX_DELAY - QUIET / 2 {
            advance(QUIET / 2).await;
            s.hint(Instant::now());
            assert!(!s.flush_due(Instant::now(), false) || Instant::now() >= start + MAX_DELAY);
        }
        assert_eq!(s.flush_at(false), Some(start + MAX_DELAY));
        advance(start + MAX_DELAY - Instant::now()).await;
        assert!(s.flush_due(Instant::now(), false));
    }

    #[tokio::test(start_paused = true)]
    async fn failed_commits_back_off_and_a_success_resets() {
        let mut s = schedule();
        let waits: Vec<Duration> = (0..10).map(|_| s.commit_failed(Instant::now())).collect();
        assert_eq!(waits[..4], [500, 1000, 2000, 4000].map(Duration::from_millis));
        assert_eq!(*waits.last().unwrap(), MAX_BACKOFF);
        assert!(!s.may_commit(Instant::now()));
        assert_eq!(s.wake_at(false, true, Instant::now()), Instant::now() + MAX_BACKOFF);
        advance(MAX_BACKOFF).await;
        assert!(s.may_commit(Instant::now()));
        s.committed(Instant::now(), false);
        assert_eq!(s.commit_failed(Instant::now()), FIRST_BACKOFF);
    }

    #[tokio::test(start_paused = true)]
    async fn commit_latency_counts_from_the_oldest_change() {
        let mut s = schedule();
        s.hint(Instant::now());
        advance(Duration::from_millis(700)).await;
        s.hint(Instant::now());
        assert_eq!(s.committed(Instant::now(), true), Duration::from_millis(700));
        advance(Duration::from_millis(50)).await;
        assert_eq!(s.committed(Instant::now(), false), Duration::from_millis(50), "changes left count anew");
        assert_eq!(s.committed(Instant::now(), false), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn rescans_are_periodic_and_more_frequent_without_watches() {
        let mut s = schedule();
        assert!(!s.rescan_due(Instant::now(), false));
        advance(RESCAN).await;
        assert!(s.rescan_due(Instant::now(), false));
        assert!(!s.rescan_due(Instant::now(), false), "once per period");
        assert_eq!(s.next_rescan(), Instant::now() + RESCAN);
        advance(RESCAN).await;
        assert!(s.rescan_due(Instant::now(), true));
        assert_eq!(s.next_rescan(), Instant::now() + EXHAUSTED_RESCAN);
        s.reconcile_failed(Instant::now());
        assert_eq!(s.next_rescan(), Instant::now() + RECONCILE_RETRY);
    }

    #[tokio::test(start_paused = true)]
    async fn look_again_now_is_due_at_once() {
        let mut s = schedule();
        advance(Duration::from_secs(5)).await;
        s.look_again_now(Instant::now());
        assert!(s.flush_due(Instant::now(), false));
        s.flushed();
        s.look_again(Instant::now());
        assert!(!s.flush_due(Instant::now(), false));
        advance(QUIET).await;
        assert!(s.flush_due(Instant::now(), false));
    }
}
