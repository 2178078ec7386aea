//! Status: what the status function answers and `crr status` shows, computed in one place
//! from what the system really knows: the rules, their real-time counters, the event
//! queue's backlog and the backfill job and segments.
//!
//! # How `synced_up_to` is computed, and how far it can be off
//!
//! Every event reaches the replicate function through one SQS queue (S3 -> queue, or
//! S3 -> EventBridge -> queue). An event is finished when it has been applied, skipped,
//! or sent to the dead-letter queue; until then it is a message in the queue (waiting,
//! delayed, or in flight in an invocation). Hence, with `read_at` the time the queue's
//! counts were read:
//!
//! - queue empty (no message waiting, delayed or in flight): every event S3 had
//!   delivered by `read_at` is finished, so `synced_up_to = read_at - settle`;
//! - queue not empty, age of its oldest message known (`ApproximateAgeOfOldestMessage`,
//!   CloudWatch, a datapoint of age `A` observed at `t`): every message sent before
//!   `t - A` was gone at `t`, so `synced_up_to = t - A - settle`;
//! - queue not empty, age unknown (no CloudWatch, as on the local stack): nothing honest
//!   can be said, so `synced_up_to` is `null` and the state `catching_up`.
//!
//! `settle` (`CRR_STATUS_SETTLE_SECS`, default 60 s) covers what the queue cannot see: the
//! time S3 takes to deliver an event (AWS: "typically seconds, sometimes a minute or
//! longer") and the staleness of SQS's approximate counts (they settle within about a
//! minute). An event delayed longer than `settle` on its way to the queue is the one way
//! `synced_up_to` can be too late; it is never too late because of work crr holds.
//! The queue serves every rule of a deployment, so the bound is deployment-wide: a rule's
//! `synced_up_to` is never later than the oldest unfinished event of any rule.
//! `lag_seconds = generated_at - synced_up_to`.
//!
//! # Historical percent and ETA
//!
//! Totals come from the backfill's counting pass (`total_final` once it is over,
//! `total_source` says whether it listed the source or read an S3 Inventory report). While
//! it goes on, the totals are what it counted so far (segments cut, and what the discovery
//! frontier counted beyond them as of the last cut): lower bounds, and percent, computed
//! against them, is an upper bound that stays below 100 (`null` before anything is counted). Objects found after the count (written meanwhile under the last
//! segment) raise the total to what was examined, so percent never exceeds 100; once the
//! job is complete the totals are what it examined (objects deleted meanwhile are gone).
//! `eta_seconds = remaining / rate`, where `rate` is bytes (or objects, for a bucket of
//! empty objects) examined per second since the job started, wall-clock, pauses included;
//! `null` while counting, paused, failed or before the first checkpoint; `0` when done.

use std::collections::HashMap;

/// Where a backfill's totals come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TotalSource {
    /// The counting pass listed the source.
    Listing,
    /// The counting pass read the rows of an S3 Inventory report (as of the report's
    /// date: objects gone since are counted, and skipped when their row is worked).
    Inventory,
}
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::backfill::{BackfillStore, Job, JobState};
use crate::deployment::{Deployment, Finding};
use crate::error::{Error, Result, from_sdk};
use crate::metrics;
use crate::rule::{Policy, Rule};
use crate::series::{self, MigrationNow, Series, StatsRead, Window};
use crate::state::{RealtimeCounters, RuleStore, StatsStore};

/// Default of `CRR_STATUS_SETTLE_SECS`.
pub const DEFAULT_SETTLE: Duration = Duration::from_secs(60);

/// The event queue's backlog, as SQS reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backlog {
    /// Messages waiting to be received (`ApproximateNumberOfMessages`).
    pub waiting: u64,
    /// Messages received by an invocation and not yet deleted
    /// (`ApproximateNumberOfMessagesNotVisible`).
    pub in_flight: u64,
    /// Messages not yet visible (`ApproximateNumberOfMessagesDelayed`).
    pub delayed: u64,
    /// Age of the oldest message, when a metric says it.
    pub oldest: Option<OldestMessage>,
    /// Messages in the dead-letter queue (failed events), when one is configured.
    pub dead_letters: Option<u64>,
    /// When the counts were read.
    pub read_at: DateTime<Utc>,
}

/// One observation of the age of the queue's oldest message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OldestMessage {
    pub age_seconds: u64,
    /// When the age was observed (end of the metric's period).
    pub observed_at: DateTime<Utc>,
}

impl Backlog {
    /// Messages not finished: waiting, delayed and in flight.
    pub fn unfinished(&self) -> u64 {
        self.waiting + self.in_flight + self.delayed
    }
}

/// Where the status reads the event queue's backlog.
#[async_trait]
pub trait EventQueue: Send + Sync {
    async fn backlog(&self) -> Result<Backlog>;

    /// The queue's name (the `Queue` dimension of `OperationsPendingReplication`).
    fn name(&self) -> String {
        "events".to_string()
    }
}

/// Real-time replication of one rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RealtimeStatus {
    /// `caught_up` (nothing unfinished), `catching_up` (events unfinished), `paused`
    /// (the rule is paused: its events wait), `unknown` (no queue to watch),
    /// `not_receiving_events` (its source is outside the deployment's region or
    /// `SourceBuckets`: no event of it arrives), or `refused` (its target or an endpoint is
    /// not allowed: its events are dead-lettered). See `deployment.rs`.
    pub state: String,
    /// Why the state is `not_receiving_events` or `refused`; `null` otherwise.
    #[serde(default)]
    pub reason: Option<String>,
    /// Every event that happened before this time has been applied, skipped or sent to the
    /// dead-letter queue (see the module documentation for the method and its bound).
    pub synced_up_to: Option<DateTime<Utc>>,
    /// `generated_at - synced_up_to`, in seconds.
    pub lag_seconds: Option<u64>,
    /// Objects copied to the target, and their bytes.
    pub replicated_objects: u64,
    pub replicated_bytes: u64,
    /// Objects removed from the target (policy `full`).
    pub deletes: u64,
    /// Deletes not applied because of policy `write` (listed by `crr suppressed`).
    pub suppressed_deletes: u64,
    /// Events older than, or the same as, one already applied for their key.
    pub skipped_stale: u64,
    /// Events that needed no change (outside the prefixes, replicas of replicas, tests).
    pub skipped_other: u64,
    /// Events given up on and sent to the dead-letter queue (`crr redrive` replays them).
    pub failed: u64,
    /// Events waiting in the queue (waiting + delayed), all rules of the deployment.
    pub pending: u64,
    /// Events being processed by an invocation now, all rules of the deployment.
    pub in_flight: u64,
    /// Event time of the newest event applied or skipped for this rule.
    pub last_event_at: Option<DateTime<Utc>>,
}

/// Historical migration (backfill) of one rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoricalStatus {
    /// `not_requested`, `pending`, `running`, `completed`, `completed_with_failures`
    /// (every object examined, some in the failed-objects list), `failed` or `paused`.
    pub state: String,
    /// `counting` (the totals are being measured), `copying`, or `done`; `null` when not
    /// requested.
    pub phase: Option<String>,
    /// Objects and bytes examined: `copied + fixed + in_place + skipped + failed` objects.
    pub objects_done: u64,
    pub bytes_done: u64,
    /// Of those: written whole to the target (new, or its bytes differed).
    pub copied: u64,
    /// The target held the bytes but other headers, metadata or tags: metadata rewritten.
    #[serde(default)]
    pub fixed: u64,
    /// Found precise copies already (bytes, headers, metadata, tags: as `crr verify`).
    #[serde(default)]
    pub in_place: u64,
    /// Left alone otherwise: conflicts kept by `on_conflict`, writes yielded to real-time
    /// replication, objects deleted meanwhile, replicas of another bucket.
    pub skipped: u64,
    /// Failed when their page was examined, recorded in the job's failed-objects list and
    /// skipped.
    #[serde(default)]
    pub failed: u64,
    /// Objects in the failed-objects list now (`crr backfill failures` lists them,
    /// `crr backfill retry-failed` takes those it copies off the list).
    #[serde(default)]
    pub failed_objects: u64,
    /// Objects and bytes to examine (the counting pass's measure). While `total_final` is
    /// false, a lower bound: what the counting pass has counted so far.
    pub objects_total: u64,
    pub bytes_total: u64,
    /// The counting pass is over, so the totals are final (`false`: they are lower bounds,
    /// and the percentages, computed against them, upper bounds).
    pub total_final: bool,
    /// How the totals were obtained: `listing` (the counting pass listed the source) or
    /// `inventory` (it read an S3 Inventory report's rows); `null` with no job.
    #[serde(default)]
    pub total_source: Option<TotalSource>,
    pub percent_objects: Option<f64>,
    pub percent_bytes: Option<f64>,
    /// Key-range segments: all, finished, and leased by a running worker now.
    pub segments: u32,
    pub segments_done: u32,
    pub workers_active: u32,
    pub started_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub eta_seconds: Option<u64>,
    /// Why the job failed.
    pub error: Option<String>,
}

/// A bucket of a rule, as the status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketStatus {
    pub bucket: String,
    pub region: String,
}

/// One rule's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleStatus {
    pub rule_id: String,
    pub source: BucketStatus,
    pub target: BucketStatus,
    /// Empty: all objects.
    pub prefixes: Vec<String>,
    pub policy: Policy,
    pub paused: bool,
    /// The historical migration's rate limits (absent: none), as in the rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_objects_per_second: Option<u64>,
    /// Bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    pub realtime: RealtimeStatus,
    pub historical: HistoricalStatus,
    /// Minute by minute activity, when asked for (`?series=24h`, `--series 24h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub series: Option<Series>,
}

/// The status JSON of the status function and `crr status --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub generated_at: DateTime<Utc>,
    /// The event queue's backlog (`null` where no queue is configured).
    pub queue: Option<Backlog>,
    pub rules: Vec<RuleStatus>,
    /// Events dead-lettered that name no rule (malformed beyond reading a bucket, or for a
    /// bucket no rule replicates): deployment-wide, in no rule's `failed`.
    #[serde(default)]
    pub unattributed_failed: u64,
}

/// Reads and computes status reports.
pub struct StatusService {
    rules: Arc<dyn RuleStore>,
    stats: Arc<dyn StatsStore>,
    jobs: Arc<dyn BackfillStore>,
    queue: Option<Arc<dyn EventQueue>>,
    settle: Duration,
    /// The deployment when the table holds no record (the status function: its own
    /// environment).
    deployment_fallback: Option<Deployment>,
    /// Whether reports print EMF metric lines (the status function; not the CLI, whose
    /// stdout is the report).
    emit_metrics: bool,
}

impl StatusService {
    pub fn new(
        rules: Arc<dyn RuleStore>,
        stats: Arc<dyn StatsStore>,
        jobs: Arc<dyn BackfillStore>,
        queue: Option<Arc<dyn EventQueue>>,
        settle: Duration,
    ) -> Self {
        Self {
            rules,
            stats,
            jobs,
            queue,
            settle,
            deployment_fallback: None,
            emit_metrics: false,
        }
    }

    /// Prints `OperationsPendingReplication` and `BytesPendingReplication` as EMF lines
    /// with each report (`metrics.rs`).
    pub fn with_metrics(mut self) -> Self {
        self.emit_metrics = true;
        self
    }

    /// Judges rules by `deployment` when the table holds no deployment record.
    pub fn with_deployment_fallback(mut self, deployment: Deployment) -> Self {
        self.deployment_fallback = Some(deployment);
        self
    }

    /// The report for every rule, or for the one named (`Error::RuleNotFound` if none).
    pub async fn report(&self, only: Option<&str>) -> Result<StatusReport> {
        self.report_with(only, None).await
    }

    /// The report, each rule's with its activity series over `window` when one is given.
    ///
    /// Reading is also when finished minutes are rolled into the totals, and when the
    /// queue's backlog is sampled into each rule's current minute (once a minute, as the
    /// minute's `pending`): a failure of either is logged and the report stands.
    pub async fn report_with(
        &self,
        only: Option<&str>,
        window: Option<Window>,
    ) -> Result<StatusReport> {
        let rules = match only {
            Some(id) => vec![
                self.rules
                    .get_rule(id)
                    .await?
                    .ok_or_else(|| Error::RuleNotFound(id.to_string()))?,
            ],
            None => self.rules.list_rules().await?,
        };
        let queue = match &self.queue {
            Some(q) => Some(q.backlog().await?),
            None => None,
        };
        if let (true, Some(q), Some(events)) = (self.emit_metrics, &queue, &self.queue) {
            metrics::emit_pending(&events.name(), q.waiting + q.delayed);
        }
        let deployment = match self.rules.deployment().await? {
            Some(recorded) => Some(recorded),
            None => self.deployment_fallback.clone(),
        };
        // One clock reading: every lag is `generated_at - synced_up_to`, as documented.
        let now = Utc::now();
        let from = match window {
            Some(w) => w.first_minute(now),
            None => series::recent_from(now),
        };
        let mut statuses = Vec::with_capacity(rules.len());
        for rule in &rules {
            let read = self.read_stats(&rule.id, from, now, queue.as_ref()).await?;
            let counters = read.lifetime();
            let job = self.jobs.job(&rule.id).await?;
            // The job item holds the totals: no segment is read, however many there are.
            let failed_objects = match &job {
                Some(_) => self.jobs.failure_count(&rule.id).await?,
                None => 0,
            };
            let mut status = rule_status(
                rule,
                &counters,
                queue.as_ref(),
                job.as_ref(),
                self.settle,
                now,
            );
            status.historical.failed_objects = failed_objects;
            if let Some(d) = &deployment {
                outside_deployment(&mut status.realtime, &d.findings(rule));
            }
            let h = &status.historical;
            if self.emit_metrics && h.state == "running" && h.total_final {
                metrics::emit_bytes_pending(&rule.id, h.bytes_total.saturating_sub(h.bytes_done));
            }
            if let Some(window) = window {
                let migration = (job.is_some() && h.total_final).then_some(MigrationNow {
                    objects_done: h.objects_done,
                    objects_total: h.objects_total,
                });
                status.series = Some(series::series(&read, window, now, migration));
            }
            statuses.push(status);
        }
        let unattributed_failed = self
            .read_stats(
                crate::state::NO_RULE_COUNTERS,
                series::recent_from(now),
                now,
                None,
            )
            .await?
            .lifetime()
            .failed;
        Ok(StatusReport {
            generated_at: now,
            queue,
            rules: statuses,
            unattributed_failed,
        })
    }

    /// One rule's stats from `from` on; rolls its finished minutes up and samples the
    /// backlog into its current minute if that minute has no sample yet.
    async fn read_stats(
        &self,
        rule_id: &str,
        from: DateTime<Utc>,
        now: DateTime<Utc>,
        queue: Option<&Backlog>,
    ) -> Result<StatsRead> {
        let read = self.stats.read_stats(rule_id, from.min(now)).await?;
        if let Some(rollup) = series::plan_rollup(&read, now)
            && let Err(e) = self.stats.roll_up(rule_id, &rollup).await
        {
            tracing::warn!(rule_id, error = %e, "finished minutes not rolled up");
        }
        let minute = series::minute_of(now);
        if let Some(q) = queue
            && read.minute(minute).is_none_or(|m| m.pending.is_none())
            && let Err(e) = self
                .stats
                .sample_pending(rule_id, minute, q.waiting + q.delayed)
                .await
        {
            tracing::warn!(rule_id, error = %e, "backlog not sampled");
        }
        Ok(read)
    }
}

/// One rule's status from what was read (pure: every number is computed here).
pub fn rule_status(
    rule: &Rule,
    counters: &RealtimeCounters,
    queue: Option<&Backlog>,
    job: Option<&Job>,
    settle: Duration,
    now: DateTime<Utc>,
) -> RuleStatus {
    let synced = queue.and_then(|q| synced_up_to(q, settle));
    let state = match queue {
        _ if rule.paused => "paused",
        None => "unknown",
        Some(q) if q.unfinished() == 0 => "caught_up",
        Some(_) => "catching_up",
    };
    let realtime = RealtimeStatus {
        state: state.to_string(),
        reason: None,
        synced_up_to: synced,
        lag_seconds: synced.map(|t| seconds_between(t, now)),
        replicated_objects: counters.replicated_objects,
        replicated_bytes: counters.replicated_bytes,
        deletes: counters.deletes,
        suppressed_deletes: counters.suppressed_deletes,
        skipped_stale: counters.skipped_stale,
        skipped_other: counters.skipped_other,
        failed: counters.failed,
        pending: queue.map_or(0, |q| q.waiting + q.delayed),
        in_flight: queue.map_or(0, |q| q.in_flight),
        last_event_at: counters.newest_event_at,
    };
    RuleStatus {
        rule_id: rule.id.clone(),
        source: BucketStatus {
            bucket: rule.source.bucket.clone(),
            region: rule.source.region.clone(),
        },
        target: BucketStatus {
            bucket: rule.target.bucket.clone(),
            region: rule.target.region.clone(),
        },
        prefixes: rule.prefixes.clone(),
        policy: rule.policy,
        paused: rule.paused,
        max_objects_per_second: rule.max_objects_per_second,
        max_bandwidth: rule.max_bandwidth,
        realtime,
        historical: historical_status(job, now),
        series: None,
    }
}

/// A rule the deployment does not replicate is never `caught_up`: with no event of it
/// arriving (or every one refused), an empty queue says nothing of its source. The state
/// says why, and nothing claims it synced up to any time. Paused stays paused.
pub fn outside_deployment(realtime: &mut RealtimeStatus, findings: &[Finding]) {
    let Some(first) = findings.first() else {
        return;
    };
    if realtime.state != "paused" {
        realtime.state = match first {
            Finding::NotReceiving(_) => "not_receiving_events",
            Finding::Refused(_) => "refused",
        }
        .to_string();
    }
    realtime.synced_up_to = None;
    realtime.lag_seconds = None;
    let reasons: Vec<&str> = findings.iter().map(Finding::reason).collect();
    realtime.reason = Some(reasons.join("; "));
}

/// The time before which every event is finished, if the backlog allows saying one.
pub fn synced_up_to(queue: &Backlog, settle: Duration) -> Option<DateTime<Utc>> {
    let settle = chrono::Duration::from_std(settle).unwrap_or_default();
    if queue.unfinished() == 0 {
        return Some(queue.read_at - settle);
    }
    let oldest = queue.oldest.as_ref()?;
    let age = chrono::Duration::seconds(i64::try_from(oldest.age_seconds).unwrap_or(i64::MAX));
    Some(oldest.observed_at - age - settle)
}

fn seconds_between(earlier: DateTime<Utc>, later: DateTime<Utc>) -> u64 {
    u64::try_from((later - earlier).num_seconds()).unwrap_or(0)
}

/// A rule's historical migration from its job (pure): the job item carries the totals of
/// its segments (`Job::progress`) and their leases (`Job::claims`).
pub fn historical_status(job: Option<&Job>, now: DateTime<Utc>) -> HistoricalStatus {
    let Some(job) = job else {
        return HistoricalStatus {
            state: "not_requested".into(),
            phase: None,
            objects_done: 0,
            bytes_done: 0,
            copied: 0,
            fixed: 0,
            in_place: 0,
            skipped: 0,
            failed: 0,
            failed_objects: 0,
            objects_total: 0,
            bytes_total: 0,
            total_final: false,
            total_source: None,
            percent_objects: None,
            percent_bytes: None,
            segments: 0,
            segments_done: 0,
            workers_active: 0,
            started_at: None,
            updated_at: None,
            completed_at: None,
            eta_seconds: None,
            error: None,
        };
    };
    let done = &job.progress.tally;
    let objects_done = done.objects;
    let bytes_done = done.bytes;
    let completed = job.state.is_finished();
    // Objects written under the last segment after the count are examined too, and once
    // the job is complete the totals are what it examined (objects deleted meanwhile gone).
    // While counting, the total is what was counted so far (the segments cut and what the
    // discovery frontier counted beyond them): a lower bound.
    let (counted_objects, counted_bytes) = job.counted();
    let (objects_total, bytes_total) = if completed {
        (objects_done, bytes_done)
    } else {
        (
            counted_objects.max(objects_done),
            counted_bytes.max(bytes_done),
        )
    };
    let percent = |done: u64, total: u64| -> Option<f64> {
        if completed || (job.planned && total == 0) {
            Some(100.0)
        } else if total == 0 {
            // Nothing counted yet: no percent of anything.
            None
        } else {
            // One decimal, and never 100.0 before the last object is done (nor before the
            // total is final: against a lower bound it is an upper bound of the progress).
            let p = (done as f64 * 1000.0 / total as f64).floor() / 10.0;
            Some(if done < total || !job.planned {
                p.min(99.9)
            } else {
                100.0
            })
        }
    };
    let now_ms = u64::try_from(now.timestamp_millis()).unwrap_or(0);
    // Every checkpoint writes the job's time too.
    let updated = Some(job.updated_at);
    let phase = if completed {
        "done"
    } else if job.planned {
        "copying"
    } else {
        "counting"
    };
    HistoricalStatus {
        state: job.state.as_str().to_string(),
        phase: Some(phase.to_string()),
        objects_done,
        bytes_done,
        copied: done.copied,
        fixed: done.fixed,
        in_place: done.in_place,
        skipped: done.skipped,
        failed: done.failed,
        // Read apart from the job and segments (`StatusService::report`).
        failed_objects: 0,
        objects_total,
        bytes_total,
        total_final: job.planned,
        total_source: Some(match job.inventory {
            Some(_) => TotalSource::Inventory,
            None => TotalSource::Listing,
        }),
        percent_objects: percent(objects_done, objects_total),
        percent_bytes: percent(bytes_done, bytes_total),
        segments: job.segments,
        segments_done: job.progress.segments_done,
        workers_active: job.claims.active(now_ms.saturating_add(1)),
        started_at: Some(job.started_at),
        updated_at: updated,
        completed_at: job.completed_at,
        eta_seconds: eta_seconds(
            job,
            objects_done,
            bytes_done,
            objects_total,
            bytes_total,
            now,
        ),
        error: job.last_error.clone(),
    }
}

/// Seconds left at the rate seen since the job started (see the module documentation).
pub fn eta_seconds(
    job: &Job,
    objects_done: u64,
    bytes_done: u64,
    objects_total: u64,
    bytes_total: u64,
    now: DateTime<Utc>,
) -> Option<u64> {
    match job.state {
        JobState::Completed | JobState::CompletedWithFailures => return Some(0),
        JobState::Running if job.planned => {}
        _ => return None,
    }
    // Bytes measure the work better; a bucket of empty objects has only objects.
    let (done, total) = if bytes_total > 0 {
        (bytes_done, bytes_total)
    } else {
        (objects_done, objects_total)
    };
    if done >= total {
        return Some(0);
    }
    let elapsed_ms = (now - job.started_at).num_milliseconds();
    if done == 0 || elapsed_ms <= 0 {
        return None;
    }
    let rate_per_ms = done as f64 / elapsed_ms as f64;
    Some(((total - done) as f64 / rate_per_ms / 1000.0).ceil() as u64)
}

/// What the status function answers to one HTTP request of its Function URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAnswer {
    pub status: u16,
    pub body: String,
}

/// Answers a Function URL request: `GET /` for every rule, `GET /?rule=ID` for one, and
/// `GET /?rule=ID&series=24h` (or `1h`, `6h`) for one with its minute-by-minute series.
/// Errors are JSON `{"error": "..."}` with 400 (bad request), 404 (no such rule), 405
/// (not GET) or 503 (a store could not be read; retry).
pub async fn answer(
    service: &StatusService,
    method: &str,
    query: &HashMap<String, String>,
) -> HttpAnswer {
    let error = |status: u16, message: String| HttpAnswer {
        status,
        body: serde_json::json!({ "error": message }).to_string(),
    };
    if !method.eq_ignore_ascii_case("GET") {
        return error(405, format!("method {method} is not allowed: use GET"));
    }
    if let Some(unknown) = query
        .keys()
        .find(|k| !["rule", "series"].contains(&k.as_str()))
    {
        return error(
            400,
            format!("unknown query parameter '{unknown}': the only ones are 'rule' and 'series'"),
        );
    }
    let rule = query.get("rule").map(String::as_str);
    let window = match query.get("series").map(|w| Window::parse(w)).transpose() {
        Ok(window) => window,
        Err(e) => return error(400, e.to_string()),
    };
    if window.is_some() && rule.is_none() {
        return error(
            400,
            "'series' needs 'rule': one rule's series at a time".into(),
        );
    }
    match service.report_with(rule, window).await {
        Ok(report) => match serde_json::to_string(&report) {
            Ok(body) => HttpAnswer { status: 200, body },
            Err(e) => error(500, format!("status could not be encoded: {e}")),
        },
        Err(Error::RuleNotFound(id)) => error(404, format!("no rule '{id}'")),
        Err(e) if e.is_retryable() => error(503, e.to_string()),
        Err(e) => error(500, e.to_string()),
    }
}

impl HttpAnswer {
    /// The answer in the shape a Lambda Function URL returns to its caller.
    pub fn to_function_url_response(&self) -> serde_json::Value {
        serde_json::json!({
            "statusCode": self.status,
            "headers": { "content-type": "application/json" },
            "body": self.body,
            "isBase64Encoded": false,
        })
    }
}

/// The SQS event queue, with the age of its oldest message from CloudWatch when a
/// CloudWatch client is given.
pub struct SqsEventQueue {
    sqs: aws_sdk_sqs::Client,
    queue_url: String,
    dlq_url: Option<String>,
    cloudwatch: Option<aws_sdk_cloudwatch::Client>,
}

impl SqsEventQueue {
    pub fn new(
        sqs: aws_sdk_sqs::Client,
        queue_url: impl Into<String>,
        dlq_url: Option<String>,
        cloudwatch: Option<aws_sdk_cloudwatch::Client>,
    ) -> Self {
        Self {
            sqs,
            queue_url: queue_url.into(),
            dlq_url,
            cloudwatch,
        }
    }

    async fn counts(&self, url: &str) -> Result<HashMap<String, u64>> {
        use aws_sdk_sqs::types::QueueAttributeName as A;
        let out = self
            .sqs
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(A::ApproximateNumberOfMessages)
            .attribute_names(A::ApproximateNumberOfMessagesNotVisible)
            .attribute_names(A::ApproximateNumberOfMessagesDelayed)
            .send()
            .await
            .map_err(|e| {
                from_sdk(
                    "GetQueueAttributes",
                    format!("queue {url}"),
                    "sqs:GetQueueAttributes",
                    e,
                )
            })?;
        Ok(out
            .attributes()
            .map(|a| {
                a.iter()
                    .map(|(k, v)| (k.as_str().to_string(), v.parse().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The latest `ApproximateAgeOfOldestMessage` datapoint of the last 10 minutes.
    async fn oldest(
        &self,
        cloudwatch: &aws_sdk_cloudwatch::Client,
    ) -> Result<Option<OldestMessage>> {
        use aws_sdk_cloudwatch::primitives::DateTime as AwsTime;
        use aws_sdk_cloudwatch::types::{Dimension, Statistic};
        let name = self.queue_url.rsplit('/').next().unwrap_or_default();
        let end = Utc::now();
        let start = end - chrono::Duration::minutes(10);
        let out = cloudwatch
            .get_metric_statistics()
            .namespace("AWS/SQS")
            .metric_name("ApproximateAgeOfOldestMessage")
            .dimensions(Dimension::builder().name("QueueName").value(name).build())
            .start_time(AwsTime::from_secs(start.timestamp()))
            .end_time(AwsTime::from_secs(end.timestamp()))
            .period(60)
            .statistics(Statistic::Maximum)
            .send()
            .await
            .map_err(|e| {
                from_sdk(
                    "GetMetricStatistics",
                    format!("metric ApproximateAgeOfOldestMessage of queue {name}"),
                    "cloudwatch:GetMetricStatistics",
                    e,
                )
            })?;
        let latest = out
            .datapoints()
            .iter()
            .filter_map(|d| Some((d.timestamp()?.secs(), d.maximum()?)))
            .max_by_key(|(t, _)| *t);
        Ok(latest.and_then(|(t, age)| {
            // A datapoint covers [t, t + 60 s): the age was observed by its end.
            let observed_at = DateTime::from_timestamp(t + 60, 0)?.min(end);
            Some(OldestMessage {
                age_seconds: age.max(0.0).ceil() as u64,
                observed_at,
            })
        }))
    }
}

#[async_trait]
impl EventQueue for SqsEventQueue {
    fn name(&self) -> String {
        self.queue_url
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string()
    }

    async fn backlog(&self) -> Result<Backlog> {
        let read_at = Utc::now();
        let counts = self.counts(&self.queue_url).await?;
        let get = |name: &str| counts.get(name).copied().unwrap_or(0);
        let mut backlog = Backlog {
            waiting: get("ApproximateNumberOfMessages"),
            in_flight: get("ApproximateNumberOfMessagesNotVisible"),
            delayed: get("ApproximateNumberOfMessagesDelayed"),
            oldest: None,
            dead_letters: None,
            read_at,
        };
        if backlog.unfinished() > 0
            && let Some(cw) = &self.cloudwatch
        {
            // Without the metric the status still stands, with `synced_up_to` unknown.
            backlog.oldest = match self.oldest(cw).await {
                Ok(oldest) => oldest,
                Err(e) => {
                    tracing::warn!(error = %e, "age of the oldest queued event unknown");
                    None
                }
            };
        }
        if let Some(dlq) = &self.dlq_url {
            let counts = self.counts(dlq).await?;
            backlog.dead_letters = Some(
                [
                    "ApproximateNumberOfMessages",
                    "ApproximateNumberOfMessagesNotVisible",
                ]
                .iter()
                .map(|n| counts.get(*n).copied().unwrap_or(0))
                .sum(),
            );
        }
        Ok(backlog)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backfill::Segment;
    use crate::rule::tests::rule;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn backlog(waiting: u64, in_flight: u64, oldest: Option<OldestMessage>) -> Backlog {
        Backlog {
            waiting,
            in_flight,
            delayed: 0,
            oldest,
            dead_letters: Some(2),
            read_at: at("2026-11-22T10:00:00Z"),
        }
    }

    fn job(state: JobState, planned: bool, objects: u64, bytes: u64) -> Job {
        Job {
            rule_id: "r".into(),
            state,
            planned,
            plan_prefix: 0,
            plan_after: None,
            frontier: Vec::new(),
            total_objects: objects,
            total_bytes: bytes,
            segments: 2,
            started_at: at("2026-11-22T09:00:00Z"),
            updated_at: at("2026-11-22T09:30:00Z"),
            completed_at: None,
            last_error: None,
            inventory: None,
            progress: Default::default(),
            claims: Default::default(),
        }
    }

    /// The status of `job` with `segments` summed into its totals and leases on its board,
    /// as the checkpoints and claims leave the job item.
    fn historical_status(
        job: Option<&Job>,
        segments: &[Segment],
        now: DateTime<Utc>,
    ) -> HistoricalStatus {
        let job = job.map(|j| {
            let mut j = j.clone();
            j.progress = crate::backfill::JobProgress::of_segments(segments);
            for s in segments
                .iter()
                .filter(|s| !s.done && s.lease_owner.is_some())
            {
                j.claims.leases.insert(s.index, s.lease_until);
            }
            if let Some(latest) = segments.iter().filter_map(|s| s.updated_at).max() {
                j.updated_at = j.updated_at.max(latest);
            }
            j
        });
        super::historical_status(job.as_ref(), now)
    }

    fn segment(index: u32, objects: u64, bytes: u64, done: bool) -> Segment {
        Segment {
            index,
            prefix: String::new(),
            start_after: None,
            end: None,
            planned_objects: 0,
            checkpoint: None,
            done,
            lease_owner: None,
            lease_until: 0,
            objects_done: objects,
            bytes_done: bytes,
            copied: objects,
            fixed: 0,
            in_place: 0,
            skipped: 0,
            failed: 0,
            updated_at: None,
            inventory_file: None,
        }
    }

    #[test]
    fn an_empty_queue_means_synced_up_to_the_read_minus_the_settle_time() {
        let q = backlog(0, 0, None);
        assert_eq!(
            synced_up_to(&q, Duration::from_secs(60)),
            Some(at("2026-11-22T09:59:00Z"))
        );
        assert_eq!(
            synced_up_to(&q, Duration::ZERO),
            Some(at("2026-11-22T10:00:00Z"))
        );
    }

    #[test]
    fn a_backlog_bounds_synced_up_to_by_its_oldest_message_or_says_nothing() {
        let oldest = OldestMessage {
            age_seconds: 300,
            observed_at: at("2026-11-22T09:59:00Z"),
        };
        assert_eq!(
            synced_up_to(&backlog(5, 1, Some(oldest)), Duration::from_secs(60)),
            Some(at("2026-11-22T09:53:00Z"))
        );
        // In-flight work alone holds it back too.
        assert_eq!(synced_up_to(&backlog(0, 1, None), Duration::ZERO), None);
    }

    #[test]
    fn rule_status_reports_counters_pending_and_lag() {
        let r = rule("r", "a", "b");
        let counters = RealtimeCounters {
            replicated_objects: 7,
            replicated_bytes: 700,
            deletes: 1,
            failed: 2,
            skipped_stale: 3,
            ..RealtimeCounters::default()
        };
        let now = at("2026-11-22T10:00:30Z");
        let s = rule_status(
            &r,
            &counters,
            Some(&backlog(0, 0, None)),
            None,
            Duration::from_secs(60),
            now,
        );
        assert_eq!(s.realtime.state, "caught_up");
        assert_eq!(s.realtime.lag_seconds, Some(90));
        assert_eq!(
            (
                s.realtime.replicated_objects,
                s.realtime.failed,
                s.realtime.skipped_stale
            ),
            (7, 2, 3)
        );
        assert_eq!(s.historical.state, "not_requested");
        let s = rule_status(
            &r,
            &counters,
            Some(&backlog(4, 2, None)),
            None,
            Duration::ZERO,
            now,
        );
        assert_eq!(s.realtime.state, "catching_up");
        assert_eq!((s.realtime.pending, s.realtime.in_flight), (4, 2));
        assert_eq!(
            (s.realtime.synced_up_to, s.realtime.lag_seconds),
            (None, None)
        );
        let s = rule_status(&r, &counters, None, None, Duration::ZERO, now);
        assert_eq!(s.realtime.state, "unknown");
    }

    #[test]
    fn percent_and_eta_follow_the_bytes_examined_since_the_start() {
        // 1 hour in, a quarter of the bytes and 40% of the objects done: 3 hours to go.
        let j = job(JobState::Running, true, 1000, 4_000_000);
        let segs = [segment(0, 400, 1_000_000, false), segment(1, 0, 0, false)];
        let h = historical_status(Some(&j), &segs, at("2026-11-22T10:00:00Z"));
        assert_eq!(h.percent_objects, Some(40.0));
        assert_eq!(h.percent_bytes, Some(25.0));
        assert_eq!(h.eta_seconds, Some(3 * 3600));
        assert_eq!((h.segments, h.segments_done), (2, 0));
        assert_eq!(h.phase.as_deref(), Some("copying"));
    }

    #[test]
    fn a_job_completed_with_failures_is_done_and_counts_them() {
        let mut done = job(JobState::CompletedWithFailures, true, 10, 100);
        done.completed_at = Some(at("2026-11-22T09:40:00Z"));
        let mut seg = segment(0, 10, 100, true);
        seg.copied = 8;
        seg.failed = 2;
        let h = historical_status(Some(&done), &[seg], at("2026-11-22T10:00:00Z"));
        assert_eq!(h.state, "completed_with_failures");
        assert_eq!(h.phase.as_deref(), Some("done"));
        assert_eq!((h.percent_objects, h.eta_seconds), (Some(100.0), Some(0)));
        assert_eq!((h.objects_done, h.copied, h.failed), (10, 8, 2));
    }

    #[test]
    fn percent_is_against_a_lower_bound_while_counting_and_capped_below_100_until_done() {
        let now = at("2026-11-22T10:00:00Z");
        // Counting: 500 objects in the segments cut, 300 more counted by the frontier
        // beyond them: the total is at least 800, and says it is not final.
        let mut counting = job(JobState::Running, false, 500, 500);
        counting.frontier = vec![crate::backfill::discovery::OpenRange {
            objects: 300,
            bytes: 300,
            ..crate::backfill::discovery::OpenRange::whole("p/")
        }];
        let h = historical_status(Some(&counting), &[segment(0, 400, 400, false)], now);
        assert_eq!(
            (h.objects_total, h.bytes_total, h.total_final),
            (800, 800, false)
        );
        assert_eq!((h.percent_objects, h.eta_seconds), (Some(50.0), None));
        assert_eq!(h.phase.as_deref(), Some("counting"));
        // All that was counted so far is done: not 100 while the total may grow.
        let h = historical_status(Some(&counting), &[segment(0, 800, 800, false)], now);
        assert_eq!(h.percent_objects, Some(99.9));
        // Nothing counted yet: no percent.
        let fresh = job(JobState::Running, false, 0, 0);
        let h = historical_status(Some(&fresh), &[], now);
        assert_eq!((h.percent_objects, h.total_final), (None, false));

        let nearly = job(JobState::Running, true, 10_000, 10_000);
        let h = historical_status(
            Some(&nearly),
            &[segment(0, 9_999, 9_999, false)],
            at("2026-11-22T10:00:00Z"),
        );
        assert_eq!(h.percent_objects, Some(99.9));

        // Objects found after the count raise the total; completed is 100% and ETA 0.
        let mut done = job(JobState::Completed, true, 10, 100);
        done.completed_at = Some(at("2026-11-22T09:40:00Z"));
        let h = historical_status(
            Some(&done),
            &[segment(0, 12, 120, true), segment(1, 0, 0, true)],
            at("2026-11-22T10:00:00Z"),
        );
        assert_eq!((h.objects_total, h.bytes_total), (12, 120));
        assert_eq!(
            (h.percent_objects, h.percent_bytes),
            (Some(100.0), Some(100.0))
        );
        assert_eq!((h.eta_seconds, h.segments_done), (Some(0), 2));

        // An empty source: 100% once counted.
        let empty = job(JobState::Completed, true, 0, 0);
        let h = historical_status(Some(&empty), &[], at("2026-11-22T10:00:00Z"));
        assert_eq!(h.percent_bytes, Some(100.0));
    }

    #[test]
    fn no_eta_when_paused_failed_or_before_the_first_page() {
        let segs = [segment(0, 10, 10, false)];
        let now = at("2026-11-22T10:00:00Z");
        for state in [JobState::Paused, JobState::Failed, JobState::Pending] {
            let h = historical_status(Some(&job(state, true, 100, 100)), &segs, now);
            assert_eq!(h.eta_seconds, None, "{state:?}");
        }
        let h = historical_status(
            Some(&job(JobState::Running, true, 100, 100)),
            &[segment(0, 0, 0, false)],
            now,
        );
        assert_eq!(h.eta_seconds, None);
        // Empty objects only: objects measure the rate.
        let h = historical_status(
            Some(&job(JobState::Running, true, 100, 0)),
            &[segment(0, 50, 0, false)],
            now,
        );
        assert_eq!(h.eta_seconds, Some(3600));
    }

    #[tokio::test]
    async fn the_series_answer_has_a_point_per_minute_and_refuses_other_windows() {
        use crate::memory::MemoryState;
        use crate::series::Activity;
        let store = Arc::new(MemoryState::default());
        store.create_rule(&rule("r", "a", "b")).await.unwrap();
        let now = Utc::now();
        let minute = series::minute_of(now) - chrono::Duration::minutes(2);
        let mut activity = Activity::of_counters(RealtimeCounters {
            replicated_objects: 2,
            replicated_bytes: 20,
            ..RealtimeCounters::default()
        });
        activity.latency.record(800);
        store.add_activity("r", minute, &activity).await.unwrap();
        let service = StatusService::new(
            store.clone(),
            store.clone(),
            store.clone(),
            None,
            Duration::ZERO,
        );
        let ask = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let got = answer(&service, "GET", &ask(&[("rule", "r"), ("series", "6h")])).await;
        assert_eq!(got.status, 200, "{}", got.body);
        let report: StatusReport = serde_json::from_str(&got.body).unwrap();
        let s = report.rules[0].series.as_ref().unwrap();
        assert_eq!(s.points.len(), 360);
        let p = s.points.iter().find(|p| p.t == minute).unwrap();
        assert_eq!((p.replicated_objects, p.replicated_bytes), (2, 20));
        assert_eq!((p.latency_p50_ms, p.latency_max_ms), (Some(800), Some(800)));
        assert_eq!(report.rules[0].realtime.replicated_objects, 2);
        for bad in ["24", "7d", ""] {
            let got = answer(&service, "GET", &ask(&[("rule", "r"), ("series", bad)])).await;
            assert_eq!(got.status, 400, "{bad}: {}", got.body);
        }
        let got = answer(&service, "GET", &ask(&[("series", "1h")])).await;
        assert_eq!(got.status, 400);
        let got = answer(&service, "GET", &ask(&[("rule", "r")])).await;
        assert!(!got.body.contains("series"), "{}", got.body);
    }

    #[test]
    fn a_rule_outside_the_deployment_is_never_caught_up() {
        let mut outside = rule("outside", "a", "b");
        outside.source.region = "ap-south-1".into();
        let inside = rule("inside", "c", "d");
        let deployment = Deployment {
            region: Some("us-east-1".into()),
            ..Deployment::default()
        };
        let now = at("2026-11-22T10:00:30Z");
        let status = |r: &Rule| {
            let mut s = rule_status(
                r,
                &RealtimeCounters::default(),
                Some(&backlog(0, 0, None)),
                None,
                Duration::from_secs(60),
                now,
            );
            outside_deployment(&mut s.realtime, &deployment.findings(r));
            s.realtime
        };
        let rt = status(&outside);
        assert_eq!(rt.state, "not_receiving_events");
        assert_eq!((rt.synced_up_to, rt.lag_seconds), (None, None));
        assert!(rt.reason.unwrap().contains("ap-south-1"));
        let rt = status(&inside);
        assert_eq!((rt.state.as_str(), rt.reason), ("caught_up", None));
        outside.paused = true;
        assert_eq!(status(&outside).state, "paused");
        let mut refused = rule("refused", "e", "f");
        refused.target.endpoint_url = Some("http://elsewhere:9000".into());
        let rt = status(&refused);
        assert_eq!(rt.state, "refused");
        assert!(rt.reason.unwrap().contains("http://elsewhere:9000"));
    }
}
