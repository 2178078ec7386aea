//! Objects the backfill could not copy: recorded with a reason code, skipped (the job
//! checkpoints past them and goes on), listed (`crr backfill failures`) and tried again
//! on demand (`crr backfill retry-failed`).
//!
//! Which errors concern one object (recorded) and which the whole rule (the job stops) is
//! decided by `FailureReason::of`; the page-level rules (a struggling service, a refusal
//! of every object of a page) by the worker's `copy_page`.

use std::time::Instant;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, clip};
use crate::failure_reason::FailureReason;

use super::*;

/// Longest error message kept with a failed object, in bytes.
const MAX_MESSAGE: usize = 1000;

/// One object of the job's failed-objects list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedObject {
    pub key: String,
    /// Size as listed, in bytes.
    pub size: u64,
    pub reason: FailureReason,
    /// The error of the last try.
    pub message: String,
    /// Whether that error was one that may pass by itself (throttling, 5xx) rather than one
    /// that needs a change (a permission, a restore).
    pub retryable: bool,
    /// Tries that failed: one per page pass or `retry-failed`, each with its own quick
    /// retries within the invocation.
    pub attempts: u32,
    pub first_failed_at: DateTime<Utc>,
    pub last_try: DateTime<Utc>,
}

impl FailedObject {
    /// `key` (of `size` bytes) failed now with `err`, recorded as `reason`.
    pub fn new(key: &str, size: u64, reason: FailureReason, err: &Error) -> Self {
        let now = Utc::now();
        Self {
            key: key.to_string(),
            size,
            reason,
            message: clip(&err.to_string(), MAX_MESSAGE),
            retryable: err.is_retryable(),
            attempts: 1,
            first_failed_at: now,
            last_try: now,
        }
    }
}

/// What `retry-failed` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RetryFailedReport {
    pub rule_id: String,
    /// Objects tried again.
    pub tried: u64,
    /// Of those: now replicated (or gone from the source), and off the list.
    pub succeeded: u64,
    /// Of those: failed again, still on the list with one more attempt.
    pub still_failed: u64,
    /// The job's state afterwards.
    pub state: String,
}

impl Backfiller {
    /// Tries every object of the job's failed-objects list again, as its page would have
    /// (the same examination, plan and copy): success takes it off the list, failure
    /// updates its reason, message, attempts and time. When the list empties, a job
    /// `completed_with_failures` becomes `completed`. An error of the whole rule (a bucket
    /// gone, a refused listing...) stops it.
    pub async fn retry_failed(
        &self,
        rule_id: &str,
        deadline: Instant,
    ) -> Result<RetryFailedReport> {
        let rule = self
            .rules
            .get_rule(rule_id)
            .await?
            .ok_or_else(|| Error::RuleNotFound(rule_id.to_string()))?;
        let job = self.jobs.job(rule_id).await?.ok_or_else(|| {
            Error::invalid("rule", format!("rule '{rule_id}' has no backfill job"))
        })?;
        self.settings.allowed.check(&rule)?;
        let mark = JobMark::of(&job);
        let failed = self.jobs.failures(rule_id).await?;
        let mut report = RetryFailedReport {
            rule_id: rule_id.to_string(),
            tried: failed.len() as u64,
            ..RetryFailedReport::default()
        };
        let (rule_ref, mark_ref) = (&rule, &mark);
        let tries = futures::stream::iter(failed)
            .map(|f| async move {
                let tried = self
                    .retry_object(rule_ref, mark_ref, &f.key, deadline)
                    .await;
                (f, tried)
            })
            .buffer_unordered(self.settings.copy_concurrency.max(1))
            .collect::<Vec<_>>()
            .await;
        let mut again = Vec::new();
        let mut whole_rule = None;
        for (f, tried) in tries {
            match tried {
                Ok(()) => {
                    tracing::info!(rule_id = %rule_id, key = %f.key, reason = %f.reason, "failed object replicated on retry");
                    self.jobs.remove_failure(rule_id, &f.key).await?;
                    report.succeeded += 1;
                }
                Err(e) => match FailureReason::of(&e, &rule) {
                    Some(reason) => {
                        tracing::warn!(rule_id = %rule_id, key = %f.key, %reason, error = %e, "failed object failed again");
                        again.push(FailedObject::new(&f.key, f.size, reason, &e));
                    }
                    None => {
                        whole_rule.get_or_insert(e);
                    }
                },
            }
        }
        report.still_failed = again.len() as u64;
        self.jobs.record_failures(rule_id, &again).await?;
        if let Some(e) = whole_rule {
            return Err(e);
        }
        let mut state = self.jobs.job(rule_id).await?.map_or(job.state, |j| j.state);
        if state == JobState::CompletedWithFailures
            && self.jobs.failure_count(rule_id).await? == 0
            && self
                .jobs
                .advance_job(
                    rule_id,
                    JobState::CompletedWithFailures,
                    JobState::Completed,
                )
                .await?
        {
            state = JobState::Completed;
        }
        report.state = state.as_str().to_string();
        Ok(report)
    }
}
