//! `RuleStore`: where rules and bucket claims live. The DynamoDB implementation is in
//! `dynamo.rs`, the in-memory one in `memory.rs`.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::deployment::Deployment;
use crate::error::{Error, Result};
use crate::ledger::LedgerEntry;
use crate::rule::Rule;
use crate::series::{self, Activity, Rollup, StatsRead};

/// Which side of a pair a bucket is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Source,
    Target,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Target => "target",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "source" => Some(Role::Source),
            "target" => Some(Role::Target),
            _ => None,
        }
    }
}

/// A bucket's membership in one sync pair. A bucket has at most one claim, which is how
/// "a bucket is in at most one pair" is enforced. Buckets are identified by name, as S3
/// bucket names are global; rules on other S3-compatible endpoints follow the same rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub bucket: String,
    pub rule_id: String,
    pub role: Role,
}

impl Claim {
    /// The error for someone wanting `want` while this claim holds the bucket.
    pub fn conflict_error(&self, want: &Claim) -> Error {
        Error::BucketClaimed {
            field: format!("{}.bucket", want.role.as_str()),
            bucket: self.bucket.clone(),
            rule_id: self.rule_id.clone(),
            role: self.role.as_str().to_string(),
        }
    }
}

/// The two claims a rule makes.
pub fn claims_of(rule: &Rule) -> Vec<Claim> {
    vec![
        Claim {
            bucket: rule.source.bucket.clone(),
            rule_id: rule.id.clone(),
            role: Role::Source,
        },
        Claim {
            bucket: rule.target.bucket.clone(),
            rule_id: rule.id.clone(),
            role: Role::Target,
        },
    ]
}

/// Rules and their bucket claims.
#[async_trait]
pub trait RuleStore: Send + Sync {
    /// Stores the rule and claims both its buckets, all or nothing: of two concurrent
    /// creates naming one bucket, exactly one succeeds.
    async fn create_rule(&self, rule: &Rule) -> Result<()>;

    /// The rule with this id.
    async fn get_rule(&self, id: &str) -> Result<Option<Rule>>;

    /// All rules, ordered by id.
    async fn list_rules(&self) -> Result<Vec<Rule>>;

    /// Replaces a rule's stored settings (pause, resume); the buckets cannot change.
    async fn update_rule(&self, rule: &Rule) -> Result<()>;

    /// Removes the rule, releases its claims, and drops its counters, suppressed deletes
    /// and backfill job, so that a new rule of the same id starts afresh.
    async fn delete_rule(&self, rule: &Rule) -> Result<()>;

    /// The rule whose source is `bucket`, if any.
    async fn rule_for_source(&self, bucket: &str) -> Result<Option<Rule>>;

    /// The deployment record (`crr init-table --source-buckets ...`), if one was written.
    /// Stores that keep none have none.
    async fn deployment(&self) -> Result<Option<Deployment>> {
        Ok(None)
    }

    /// Writes (replaces) the deployment record.
    async fn put_deployment(&self, _deployment: &Deployment) -> Result<()> {
        Err(Error::Config(
            "this store keeps no deployment record".into(),
        ))
    }
}

/// Per-key ledger of applied events (see `ledger.rs`).
#[async_trait]
pub trait LedgerStore: Send + Sync {
    /// The entry for `key` under `rule_id`, read consistently.
    async fn read_ledger(&self, rule_id: &str, key: &str) -> Result<Option<LedgerEntry>>;

    /// Writes `sequencer`/`etag` with version `expected + 1`, only if the entry is still at
    /// version `expected` (`None`: only if there is no entry). `Ok(false)` when it was not.
    async fn commit_ledger(
        &self,
        rule_id: &str,
        key: &str,
        expected: Option<u64>,
        sequencer: &str,
        etag: &str,
    ) -> Result<bool>;
}

/// The counters row of events that name no rule (malformed, or for a bucket no rule
/// replicates) and were dead-lettered: deployment-wide, not any rule's.
pub const NO_RULE_COUNTERS: &str = "(no rule)";

pub use crate::series::RealtimeCounters;

/// A delete that policy `write` kept from reaching the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuppressedDelete {
    pub key: String,
    /// When S3 says the delete happened.
    pub event_time: Option<DateTime<Utc>>,
    pub sequencer: Option<String>,
    /// Whether the delete created a delete marker (versioned bucket).
    pub delete_marker: bool,
    /// When crr recorded it.
    pub recorded_at: DateTime<Utc>,
}

impl SuppressedDelete {
    /// What tells this delete from any other of the same key: its sequencer, else its
    /// event time (moto's S3->SQS events carry no sequencer), else nothing (then every
    /// delete of the key without either is one record).
    pub fn identity(&self) -> String {
        match (&self.sequencer, self.event_time) {
            // Normalised: the same sequencer written with or without trailing zeros.
            (Some(seq), _) => format!(
                "seq:{}",
                crate::ledger::normalize_sequencer(seq).unwrap_or_else(|| seq.clone())
            ),
            (None, Some(t)) => format!(
                "time:{}",
                t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            ),
            (None, None) => "unknown".to_string(),
        }
    }
}

/// Counters and records the status function and the CLI read. Counters are kept per
/// minute and rolled into lifetime totals (`series.rs` says how, and what it costs).
#[async_trait]
pub trait StatsStore: Send + Sync {
    /// Adds to the rule's `minute` atomically, in one write: `minute` is the current
    /// minute ([`series::minute_of`] of now, taken when the write is made) or one that
    /// [`series::writable_minute`] allows.
    async fn add_activity(
        &self,
        rule_id: &str,
        minute: DateTime<Utc>,
        activity: &Activity,
    ) -> Result<()>;

    /// The rule's totals and its minutes from `from` on, plus every minute not rolled
    /// into the totals yet (one Query while the rollup keeps up).
    async fn read_stats(&self, rule_id: &str, from: DateTime<Utc>) -> Result<StatsRead>;

    /// Moves `rollup`'s minutes into the totals if `rolled_through` is still
    /// `rollup.expected`: `Ok(false)` (nothing written) if another rollup moved it first.
    async fn roll_up(&self, rule_id: &str, rollup: &Rollup) -> Result<bool>;

    /// Records the event queue's backlog sampled in `minute`.
    async fn sample_pending(
        &self,
        rule_id: &str,
        minute: DateTime<Utc>,
        pending: u64,
    ) -> Result<()>;

    /// Records one suppressed delete, once per [`SuppressedDelete::identity`]: `Ok(false)`
    /// when that delete was recorded before (a redelivered or re-applied event).
    async fn record_suppressed(&self, rule_id: &str, delete: &SuppressedDelete) -> Result<bool>;
    /// Suppressed deletes of the rule, oldest first.
    async fn suppressed(&self, rule_id: &str) -> Result<Vec<SuppressedDelete>>;

    /// Adds to the rule's counters (in the current minute).
    async fn add_counters(&self, rule_id: &str, delta: &RealtimeCounters) -> Result<()> {
        let activity = Activity::of_counters(delta.clone());
        self.add_activity(rule_id, series::minute_of(Utc::now()), &activity)
            .await
    }

    /// The rule's counters so far (lifetime).
    async fn counters(&self, rule_id: &str) -> Result<RealtimeCounters> {
        let now = Utc::now();
        let read = self.read_stats(rule_id, series::recent_from(now)).await?;
        Ok(read.lifetime())
    }

    /// Rolls the rule's finished minutes into its totals if any are due at `now`;
    /// `Ok(false)` when none were, or another rollup moved them first.
    async fn roll_up_due(&self, rule_id: &str, now: DateTime<Utc>) -> Result<bool> {
        let read = self.read_stats(rule_id, series::recent_from(now)).await?;
        match series::plan_rollup(&read, now) {
            Some(rollup) => self.roll_up(rule_id, &rollup).await,
            None => Ok(false),
        }
    }
}

/// Everything the functions keep in the table.
pub trait StateStore: RuleStore + LedgerStore + StatsStore {}
impl<T: RuleStore + LedgerStore + StatsStore> StateStore for T {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryState;
    use crate::rule::tests::rule;

    #[tokio::test]
    async fn a_bucket_is_in_at_most_one_pair() {
        let store = MemoryState::default();
        store
            .create_rule(&rule("ab", "bucket-a", "bucket-b"))
            .await
            .unwrap();
        let err = store
            .create_rule(&rule("ac", "bucket-a", "bucket-c"))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "rule field `source.bucket`: bucket 'bucket-a' is already in rule 'ab' as source"
        );
        let err = store
            .create_rule(&rule("cb", "bucket-c", "bucket-b"))
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("`target.bucket`: bucket 'bucket-b'"),
            "{err}"
        );
        let err = store
            .create_rule(&rule("ba", "bucket-b", "bucket-a"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("as target"), "{err}");
        // Nothing of the refused rules was kept: bucket-c is still free.
        store
            .create_rule(&rule("cd", "bucket-c", "bucket-d"))
            .await
            .unwrap();
        let ab = store.get_rule("ab").await.unwrap().unwrap();
        store.delete_rule(&ab).await.unwrap();
        store
            .create_rule(&rule("ae", "bucket-a", "bucket-e"))
            .await
            .unwrap();
    }
}
