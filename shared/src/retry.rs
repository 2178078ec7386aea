//! Retrying what may succeed later (`Error::is_retryable`), with exponential backoff and
//! full jitter, bounded by attempts and by the caller's deadline.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::error::Result;

/// The `Instant` of a wall-clock deadline (Lambda gives one as epoch milliseconds).
pub fn instant_of(deadline: std::time::SystemTime) -> Instant {
    Instant::now()
        + deadline
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
}

/// How hard to try.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// First backoff ceiling; doubled each attempt.
    pub base: Duration,
    /// Largest backoff ceiling.
    pub cap: Duration,
    /// Time kept free before the deadline: no attempt starts inside it.
    pub margin: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            base: Duration::from_millis(100),
            cap: Duration::from_secs(5),
            margin: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// Backoff before attempt `attempt + 1` (attempt counts from 1): uniform in
    /// [0, min(cap, base * 2^(attempt-1))] ("full jitter").
    pub fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(self.cap);
        ceiling.mul_f64(fastrand::f64())
    }

    /// Whether `run` may have given up for lack of time rather than of attempts: the
    /// longest backoff and the margin no longer fit before `deadline`.
    pub fn out_of_time(&self, deadline: Instant) -> bool {
        Instant::now() + self.cap + self.margin >= deadline
    }

    /// Runs `op` until it succeeds, fails permanently, runs out of attempts, or the next
    /// attempt could not finish before `deadline`.
    pub async fn run<T, F, Fut>(
        &self,
        deadline: Option<Instant>,
        what: &str,
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
                // Stopped for the deadline with its progress saved: nothing to retry here.
                Err(e) if e.continues_later() => return Err(e),
                Err(e) if e.is_retryable() && attempt < self.max_attempts => {
                    let wait = self.backoff(attempt);
                    let out_of_time =
                        deadline.is_some_and(|d| Instant::now() + wait + self.margin >= d);
                    if out_of_time {
                        tracing::warn!(what, attempt, error = %e, "no time left for another attempt");
                        return Err(e);
                    }
                    tracing::info!(what, attempt, backoff_ms = wait.as_millis() as u64, error = %e, "retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn transient() -> Error {
        Error::Transient {
            operation: "GetObject",
            resource: "s3://b/k".into(),
            detail: "SlowDown".into(),
            throttled: true,
            source: "503".into(),
        }
    }

    fn fast() -> RetryPolicy {
        RetryPolicy {
            base: Duration::from_millis(1),
            cap: Duration::from_millis(2),
            margin: Duration::ZERO,
            ..RetryPolicy::default()
        }
    }

    #[tokio::test]
    async fn retryable_errors_are_retried_until_success() {
        let calls = AtomicU32::new(0);
        let out = fast()
            .run(None, "t", || async {
                if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                    Err(transient())
                } else {
                    Ok(7)
                }
            })
            .await
            .unwrap();
        assert_eq!((out, calls.load(Ordering::SeqCst)), (7, 3));
    }

    #[tokio::test]
    async fn permanent_errors_and_exhausted_attempts_stop() {
        let calls = AtomicU32::new(0);
        let err = fast()
            .run(None, "t", || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(Error::RuleNotFound("r".into()))
            })
            .await
            .unwrap_err();
        assert!(!err.is_retryable());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let calls = AtomicU32::new(0);
        fast()
            .run(None, "t", || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(transient())
            })
            .await
            .unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 6);
    }

    #[tokio::test]
    async fn no_attempt_starts_past_the_deadline() {
        let calls = AtomicU32::new(0);
        let policy = RetryPolicy {
            margin: Duration::from_secs(10),
            ..fast()
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        policy
            .run(Some(deadline), "t", || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(transient())
            })
            .await
            .unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy::default();
        for attempt in 1..20 {
            assert!(p.backoff(attempt) <= p.cap);
        }
        assert!(p.backoff(1) <= p.base);
    }
}
