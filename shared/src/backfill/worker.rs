//! The `Backfiller`: invocations claim segments, copy their pages, checkpoint them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::{SinkExt, StreamExt};
use serde::Serialize;

use crate::copy::{CopyEngine, MAX_SINGLE_REQUEST, marker};
use crate::error::{Error, Result};
use crate::failure_reason::FailureReason;
use crate::metrics;
use crate::object_store::{ListedObject, ObjectInfo, ObjectStore, TargetPrecondition, WriteAttrs};
use crate::ports::SegmentQueue;
use crate::rate_limit::{AdaptiveLimits, MemoryRateStore, Meter, RateLimiter, RateStore};
use crate::replicate::StoreProvider;
use crate::resumable::{CopyRun, UploadStore, Writer};
use crate::retry::RetryPolicy;
use crate::rule::{Policy, ResolvedCopyMode, Rule};
use crate::series::{Activity, ProgressMeter};
use crate::state::{RuleStore, StatsStore};
use crate::verify::Tags;

use super::*;

/// Objects of one page that must all be refused, for the same permission, before the
/// refusal is taken for the deployment's rather than the objects' (see `page_failure`).
const PAGE_REFUSED_MIN: usize = 10;

/// When page work is cut off: enough before the deadline to release the lease and answer.
fn hard_stop(deadline: Instant) -> Instant {
    deadline
        .checked_sub(Duration::from_millis(700))
        .unwrap_or(deadline)
}

pub(super) fn now_ms() -> u64 {
    u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0)
}

fn to_json(value: &impl Serialize) -> Result<serde_json::Value> {
    serde_json::to_value(value).map_err(|e| Error::Config(format!("report: {e}")))
}

/// What one invocation did for one rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RunReport {
    pub rule_id: String,
    pub state: String,
    /// Pages checkpointed; the counters below are theirs (see `Segment`).
    pub pages: u64,
    pub copied: u64,
    pub fixed: u64,
    pub in_place: u64,
    pub skipped: u64,
    /// Objects that failed and were recorded in the job's failed-objects list.
    pub failed: u64,
    /// Of `skipped`: writes given up because the target changed meanwhile (real-time
    /// replication won).
    pub yielded: u64,
    /// Replicas removed again because the source object was deleted during their copy.
    pub undone: u64,
    pub segments_finished: u64,
}

impl RunReport {
    /// Adds another run's counters into this one.
    pub fn add(&mut self, other: &RunReport) {
        self.pages += other.pages;
        self.copied += other.copied;
        self.fixed += other.fixed;
        self.in_place += other.in_place;
        self.skipped += other.skipped;
        self.failed += other.failed;
        self.yielded += other.yielded;
        self.undone += other.undone;
        self.segments_finished += other.segments_finished;
    }
}

/// The backfill function's logic.
pub struct Backfiller {
    pub(super) rules: Arc<dyn RuleStore>,
    pub(super) jobs: Arc<dyn BackfillStore>,
    pub(super) stores: Arc<dyn StoreProvider>,
    engine: CopyEngine,
    pub(super) settings: BackfillSettings,
    retry: RetryPolicy,
    /// Where large copies checkpoint their parts, to continue in the next run.
    uploads: Option<Arc<dyn UploadStore>>,
    /// Where progress per minute goes (`series.rs`), and the rollup runs each tick.
    stats: Option<Arc<dyn StatsStore>>,
    pub(super) progress: ProgressMeter,
    /// The rules' `max_objects_per_second` and `max_bandwidth` (`rate_limit.rs`).
    rate: RateLimiter,
    /// Copies in flight per rule and prefix, lowered when S3 answers SlowDown.
    adaptive: AdaptiveLimits,
    /// Fan-out mode (`fanout`): the schedule coordinates, segment messages do the work.
    segment_queue: Option<Arc<dyn SegmentQueue>>,
}

impl Backfiller {
    pub fn new(
        rules: Arc<dyn RuleStore>,
        jobs: Arc<dyn BackfillStore>,
        stores: Arc<dyn StoreProvider>,
        engine: CopyEngine,
        settings: BackfillSettings,
    ) -> Self {
        Self {
            rules,
            jobs,
            stores,
            engine,
            settings,
            retry: RetryPolicy::default(),
            uploads: None,
            stats: None,
            progress: ProgressMeter::default(),
            // Shared by this process's invocations only, until `with_rate_store`.
            rate: RateLimiter::new(Arc::new(MemoryRateStore::default())),
            adaptive: AdaptiveLimits::default(),
            segment_queue: None,
        }
    }

    /// Fans the migration out through the segment queue (`fanout`): the schedule only
    /// coordinates, and invocations fed by the queue work the segments.
    pub fn with_segment_queue(mut self, queue: Arc<dyn SegmentQueue>) -> Self {
        self.segment_queue = Some(queue);
        self
    }

    /// Where the rules' rate limits are counted: the state table, so that every
    /// invocation shares them (without it, each process counts its own).
    pub fn with_rate_store(mut self, store: Arc<dyn RateStore>) -> Self {
        self.rate = RateLimiter::new(store);
        self
    }

    /// Waits until the rule's rate limits let one more object of `bytes` be written.
    async fn take_rate(&self, rule: &Rule, bytes: u64) -> Result<()> {
        self.rate
            .acquire(&rule.id, Meter::Objects, rule.max_objects_per_second, 1)
            .await?;
        self.rate
            .acquire(&rule.id, Meter::Bytes, rule.max_bandwidth, bytes)
            .await
    }

    /// Records objects and bytes examined per minute in `stats` (at most one write per
    /// rule, invocation and minute: far fewer than the one checkpoint per page), and, on
    /// each scheduled tick, rolls every rule's finished minutes into its totals.
    pub fn with_stats(mut self, stats: Arc<dyn StatsStore>) -> Self {
        self.stats = Some(stats);
        self
    }

    /// Writes progress accumulated for the rule, when `due` says so.
    pub(super) async fn write_progress(
        &self,
        rule_id: &str,
        due: Option<(DateTime<Utc>, Activity)>,
    ) {
        let (Some(stats), Some((minute, activity))) = (&self.stats, due) else {
            return;
        };
        // Charts only: a lost write costs a minute's bar, never a checkpoint.
        if let Err(e) = stats.add_activity(rule_id, minute, &activity).await {
            tracing::warn!(rule_id, error = %e, objects = activity.backfill_objects, "backfill progress of a minute not recorded");
        }
    }

    /// The schedule's housekeeping: every rule's (and the no-rule row's) finished minutes
    /// rolled into its totals, and the bytes its migration has left as a metric.
    async fn tick(&self) {
        let Some(stats) = &self.stats else {
            return;
        };
        let rules = match self.rules.list_rules().await {
            Ok(rules) => rules,
            Err(e) => {
                tracing::warn!(error = %e, "rules not listed: no rollup this tick");
                return;
            }
        };
        let now = Utc::now();
        let ids = rules
            .iter()
            .map(|r| r.id.as_str())
            .chain(std::iter::once(crate::state::NO_RULE_COUNTERS));
        for id in ids {
            if let Err(e) = stats.roll_up_due(id, now).await {
                tracing::warn!(rule_id = id, error = %e, "finished minutes not rolled up");
            }
        }
        for rule in &rules {
            if let Ok(Some(job)) = self.jobs.job(&rule.id).await
                && job.state == JobState::Running
                && job.planned
            {
                let done = job.progress.tally.bytes;
                metrics::emit_bytes_pending(&rule.id, job.total_bytes.saturating_sub(done));
            }
        }
    }

    /// Multipart copies checkpoint their parts in `uploads`: one still going at the hard
    /// stop saves its state (its page is abandoned, as any unfinished page) and the next
    /// run continues it (`resumable.rs`). Without it, such a copy is aborted.
    pub fn with_uploads(mut self, uploads: Arc<dyn UploadStore>) -> Self {
        self.uploads = Some(uploads);
        self
    }

    /// Requests (or resumes) the backfill of a rule.
    pub async fn start(&self, rule_id: &str) -> Result<Job> {
        self.start_from(rule_id, None).await
    }

    /// Requests (or resumes) the backfill of a rule, reading its objects from the S3
    /// Inventory report whose manifest is at `inventory` (`s3://bucket/key`) instead of
    /// listing the source. The manifest is read and checked here, so a wrong one is an
    /// error now rather than a failed job later.
    pub async fn start_from(&self, rule_id: &str, inventory: Option<&str>) -> Result<Job> {
        let rule = self
            .rules
            .get_rule(rule_id)
            .await?
            .ok_or_else(|| Error::RuleNotFound(rule_id.to_string()))?;
        if let Some(url) = inventory {
            self.manifest(&rule, url).await?;
            if let Some(job) = self.jobs.job(rule_id).await?
                && job.inventory.as_deref() != Some(url)
            {
                return Err(Error::BadRequest(format!(
                    "rule '{rule_id}' has a backfill already (from {}); it cannot change its input",
                    job.inventory.as_deref().unwrap_or("listing")
                )));
            }
        }
        let now = Utc::now();
        let fresh = Job::requested(rule_id, inventory, now);
        if !self.jobs.create_job(&fresh).await? {
            let job = self.jobs.job(rule_id).await?.unwrap_or(fresh.clone());
            if matches!(job.state, JobState::Paused | JobState::Failed) {
                self.jobs.set_job_state(rule_id, JobState::Running).await?;
            }
        }
        Ok(self.jobs.job(rule_id).await?.unwrap_or(fresh))
    }

    /// Pauses a rule's backfill: workers stop after their current page.
    pub async fn pause(&self, rule_id: &str) -> Result<()> {
        for _ in 0..8 {
            match self.jobs.job(rule_id).await? {
                Some(job) if !job.state.is_finished() && job.state != JobState::Paused => {
                    // From the state it was read in only (a job completed meanwhile stays
                    // completed); moved meanwhile: read again.
                    if self
                        .jobs
                        .advance_job(rule_id, job.state, JobState::Paused)
                        .await?
                    {
                        return Ok(());
                    }
                }
                Some(_) => return Ok(()),
                None => {
                    return Err(Error::invalid(
                        "rule",
                        format!("rule '{rule_id}' has no backfill to pause"),
                    ));
                }
            }
        }
        Err(Error::Config(format!(
            "the backfill of '{rule_id}' kept changing state while it was paused; try again"
        )))
    }

    /// One invocation: the rule asked for (or, if none, every rule with historical sync on
    /// or a migration requested) gets work done until `deadline`.
    pub async fn run(
        &self,
        only: Option<&str>,
        owner: &str,
        deadline: Instant,
    ) -> Result<Vec<RunReport>> {
        self.each_active_rule(only, |rule, job| async move {
            self.run_rule(&rule, job, owner, deadline).await
        })
        .await
    }

    /// Gives `work` each rule with a migration to do (the rule `only`, if given) and its
    /// job: a rule with historical sync gets its job started here, one without may have
    /// had one started by hand (`crr backfill start`, the console); paused rules, finished
    /// jobs and rules naming buckets this deployment may not touch are left out (the last
    /// fail their job). One rule's failure does not hold the others back: a permanent
    /// error fails the job (the status shows why), a transient one is retried by the next
    /// invocation from the last checkpoint; the first error is returned after all ran.
    pub(super) async fn each_active_rule<T, F, Fut>(
        &self,
        only: Option<&str>,
        mut work: F,
    ) -> Result<Vec<T>>
    where
        F: FnMut(Rule, Job) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let rules: Vec<Rule> = match only {
            Some(id) => vec![
                self.rules
                    .get_rule(id)
                    .await?
                    .ok_or_else(|| Error::RuleNotFound(id.to_string()))?,
            ],
            None => self.rules.list_rules().await?,
        };
        let mut done = Vec::new();
        let mut first_error = None;
        for rule in rules {
            if rule.paused {
                continue;
            }
            let job = match self.jobs.job(&rule.id).await? {
                Some(job) => job,
                None if rule.historical => self.start(&rule.id).await?,
                None => continue,
            };
            if !matches!(job.state, JobState::Pending | JobState::Running) {
                continue;
            }
            let rule_id = rule.id.clone();
            let worked = match self.settings.allowed.check(&rule) {
                Ok(()) => work(rule, job).await,
                Err(e) => Err(e),
            };
            match worked {
                Ok(report) => done.push(report),
                Err(e) => {
                    tracing::error!(rule_id = %rule_id, error = %e, retryable = e.is_retryable(), "backfill of the rule failed");
                    if !e.is_retryable() {
                        self.jobs.fail_job(&rule_id, &e.to_string()).await?;
                    }
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(done),
        }
    }

    /// Runs (or continues) only the counting pass of a rule's job, until `deadline`.
    pub async fn count(&self, rule_id: &str, deadline: Instant) -> Result<Job> {
        let rule = self
            .rules
            .get_rule(rule_id)
            .await?
            .ok_or_else(|| Error::RuleNotFound(rule_id.to_string()))?;
        self.settings.allowed.check(&rule)?;
        let job = self.start(rule_id).await?;
        if job.planned {
            return Ok(job);
        }
        self.plan(&rule, job, deadline, None).await
    }

    fn time_left(&self, deadline: Instant) -> bool {
        Instant::now() + self.settings.margin < deadline
    }

    /// Handles one invocation: `{}` (the schedule: every rule with a migration to do),
    /// `{"rule_id": "..."}` (on demand), or `{"rule_id": "...", "retry_failed": true}` (the
    /// job's failed objects tried again).
    pub async fn handle(
        &self,
        payload: &serde_json::Value,
        owner: &str,
        deadline: Instant,
    ) -> Result<serde_json::Value> {
        let only = payload.get("rule_id").and_then(serde_json::Value::as_str);
        if let (Some(rule_id), Some(true)) = (
            only,
            payload
                .get("retry_failed")
                .and_then(serde_json::Value::as_bool),
        ) {
            let report = self.retry_failed(rule_id, deadline).await?;
            return to_json(&report);
        }
        if let Some(messages) = super::sqs_messages(payload) {
            let Some(queue) = &self.segment_queue else {
                return Err(Error::Config(
                    "segment messages arrived but CRR_SEGMENT_QUEUE_URL is not set: a segment \
                     not finished in time could not continue"
                        .into(),
                ));
            };
            let outcome = self
                .work_batch(queue.as_ref(), messages, owner, deadline)
                .await;
            return Ok(outcome.response());
        }
        let reports = match (&self.segment_queue, only) {
            (Some(queue), None) => self
                .coordinate(queue.as_ref(), deadline)
                .await
                .and_then(|r| to_json(&r)),
            _ => self
                .run(only, owner, deadline)
                .await
                .and_then(|r| to_json(&r)),
        };
        if only.is_none() {
            self.tick().await;
        }
        reports
    }

    /// Moves a pending job to running. Only from pending: another invocation may have
    /// finished the job since it was read, and a completed job stays completed.
    pub(super) async fn mark_running(&self, job: &Job) -> Result<()> {
        if job.state == JobState::Pending {
            self.jobs
                .advance_job(&job.rule_id, JobState::Pending, JobState::Running)
                .await?;
        }
        Ok(())
    }

    /// The counting pass, if the job still needs it, telling `cuts` of every cut and of
    /// its end (`true`), so work can start on the first segment while it goes on.
    pub(super) async fn count_telling(
        &self,
        rule: &Rule,
        job: Job,
        deadline: Instant,
        cuts: &tokio::sync::watch::Sender<bool>,
    ) -> Result<()> {
        if job.planned {
            return Ok(());
        }
        let planned = self.plan(rule, job, deadline, Some(cuts)).await;
        cuts.send_replace(true);
        planned.map(|_| ())
    }

    async fn run_rule(
        &self,
        rule: &Rule,
        job: Job,
        owner: &str,
        deadline: Instant,
    ) -> Result<RunReport> {
        let mut report = RunReport {
            rule_id: rule.id.clone(),
            ..RunReport::default()
        };
        self.mark_running(&job).await?;
        let mark = JobMark::of(&job);
        // Copying starts with the first segment cut: the workers wait for cuts while the
        // counting pass is still going, and stop once it is over and nothing is left.
        let (cuts, counting) = tokio::sync::watch::channel(job.planned);
        let plan = self.count_telling(rule, job, deadline, &cuts);
        let workers = (0..self.settings.workers.max(1))
            .map(|n| self.work(rule, &mark, owner, n, deadline, counting.clone()));
        let (planned, worked) = tokio::join!(plan, futures::future::join_all(workers));
        self.write_progress(&rule.id, self.progress.take(&rule.id, Utc::now()))
            .await;
        for done in worked {
            report.add(&done?);
        }
        planned?;
        let state = self.finish_if_done(rule).await?;
        report.state = state.as_str().to_string();
        Ok(report)
    }

    /// Marks the job completed once it is planned and every segment is done: `completed`,
    /// or `completed_with_failures` while its failed-objects list holds any. A done
    /// segment stays done (its checkpoints are refused, it cannot be claimed), so the
    /// job is complete from then on; of several invocations that see it, one moves it
    /// from running to completed (completed once, `completed_at` written once).
    pub(super) async fn finish_if_done(&self, rule: &Rule) -> Result<JobState> {
        let Some(job) = self.jobs.job(&rule.id).await? else {
            return Ok(JobState::Pending);
        };
        // The job item counts its finished segments (each finishes once: its last
        // checkpoint is refused if it is done already), so no segment is read here.
        if job.state == JobState::Running
            && job.planned
            && job.progress.segments_done >= job.segments
        {
            let state = match self.jobs.failure_count(&rule.id).await? {
                0 => JobState::Completed,
                failed => {
                    tracing::warn!(rule_id = %rule.id, failed, "backfill completed with failed objects (`crr backfill failures`)");
                    JobState::CompletedWithFailures
                }
            };
            if self
                .jobs
                .advance_job(&rule.id, JobState::Running, state)
                .await?
            {
                tracing::info!(rule_id = %rule.id, state = state.as_str(), "backfill completed");
                return Ok(state);
            }
            // Completed by another invocation meanwhile (or paused): as it is now.
            let now = self.jobs.job(&rule.id).await?;
            return Ok(now.map_or(state, |j| j.state));
        }
        Ok(job.state)
    }

    /// Records a segment cut by a counting pass (listing or inventory) with the job's
    /// progress `next`. `Some(job)`: another invocation counting too cut first; its
    /// progress is the job's, and this pass stops.
    pub(super) async fn cut(
        &self,
        rule_id: &str,
        segment: &Segment,
        next: &Job,
        job: &Job,
    ) -> Result<Option<Job>> {
        if self
            .jobs
            .add_segment(rule_id, segment, next, job.segments)
            .await?
        {
            return Ok(None);
        }
        let theirs = self
            .jobs
            .job(rule_id)
            .await?
            .ok_or_else(|| Error::Config("backfill job vanished".into()))?;
        Ok(Some(theirs))
    }

    /// The counting pass, resumable: each cut is written with the plan's position (a
    /// listing job's frontier, an inventory job's file and row).
    pub(super) async fn plan(
        &self,
        rule: &Rule,
        job: Job,
        deadline: Instant,
        cuts: Option<&tokio::sync::watch::Sender<bool>>,
    ) -> Result<Job> {
        if let Some(url) = job.inventory.clone() {
            return self.plan_inventory(rule, job, &url, deadline, cuts).await;
        }
        if job.planned {
            return Ok(job);
        }
        let source = self.stores.store(&rule.source);
        let frontier = job.open_frontier(&rule.listing_prefixes());
        let options = super::discovery::DiscoveryOptions {
            listers: self.settings.listers.max(1),
            segment_objects: self.settings.segment_objects.max(1),
            page_size: self.settings.page_size,
            // No page is started inside the margin, as `time_left` says for the workers.
            stop_at: Some(tokio::time::Instant::from_std(
                deadline
                    .checked_sub(self.settings.margin)
                    .unwrap_or_else(Instant::now),
            )),
        };
        let sink = PlanCuts {
            backfiller: self,
            rule_id: &rule.id,
            job: tokio::sync::Mutex::new(job),
            theirs: std::sync::Mutex::new(None),
            cuts,
        };
        let started = Instant::now();
        let report = super::discovery::discover(
            &super::discovery::StoreLister(source.as_ref()),
            &sink,
            frontier,
            &options,
        )
        .await?;
        tracing::info!(
            rule_id = %rule.id,
            listers = options.listers,
            segments = report.segments,
            objects = report.objects,
            lists = report.lists,
            splits = report.splits,
            open = report.frontier.len(),
            overtaken = report.overtaken,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "counting pass"
        );
        let theirs = sink.theirs.lock().map(|mut t| t.take()).unwrap_or(None);
        match theirs {
            Some(theirs) => Ok(theirs),
            None => Ok(sink.job.into_inner()),
        }
    }

    /// One worker (number `worker` of invocation `invocation`): claims segments and works
    /// through them until none is left (and the counting pass, `counting` is `false` while
    /// it goes on, cuts no more) or time runs out.
    async fn work(
        &self,
        rule: &Rule,
        mark: &JobMark,
        invocation: &str,
        worker: usize,
        deadline: Instant,
        mut counting: tokio::sync::watch::Receiver<bool>,
    ) -> Result<RunReport> {
        let mut report = RunReport::default();
        while self.time_left(deadline) {
            let counted = *counting.borrow_and_update();
            // Each claim under an owner of its own: no sibling worker, and no earlier claim
            // of this one, can write on the lease.
            let owner = &super::lease::owner(invocation, worker);
            let held_until = Instant::now() + self.settings.lease;
            let Some(segment) = self.claim(rule, owner).await? else {
                if counted || counting.changed().await.is_err() {
                    break;
                }
                continue;
            };
            let finished = self
                .work_segment(
                    rule,
                    mark,
                    segment.clone(),
                    owner,
                    held_until,
                    deadline,
                    &mut report,
                )
                .await;
            match finished {
                Ok(true) => report.segments_finished += 1,
                Ok(false) => {
                    self.jobs
                        .release_segment(&rule.id, segment.index, owner)
                        .await?;
                }
                // A large copy stopped for the deadline: this invocation's time is up.
                Err(e) if e.continues_later() => {
                    self.jobs
                        .release_segment(&rule.id, segment.index, owner)
                        .await?;
                    break;
                }
                Err(e) => {
                    // Free the segment at once so the next invocation can retry it.
                    if let Err(release) = self
                        .jobs
                        .release_segment(&rule.id, segment.index, owner)
                        .await
                    {
                        tracing::warn!(rule_id = %rule.id, segment = segment.index, error = %release, "lease not released; it will expire");
                    }
                    return Err(e);
                }
            }
        }
        Ok(report)
    }

    /// Claims a segment from the job's claim board (`ClaimBoard`): one whose lease expired
    /// or was released, else the next never claimed. Reads the job item, not the segments:
    /// the cost of a claim does not grow with the number of segments.
    pub async fn claim(&self, rule: &Rule, owner: &str) -> Result<Option<Segment>> {
        // Each round reads the job afresh; a round is lost only to another claim that
        // moved the board first, so a few suffice even with many workers starting at once.
        for _ in 0..16 {
            let Some(job) = self.jobs.job(&rule.id).await? else {
                return Ok(None);
            };
            let now = now_ms();
            let until = now + self.settings.lease.as_millis() as u64;
            let mut stale = job.claims.stale(now);
            // Spread workers over segments rather than all racing for the first one.
            fastrand::shuffle(&mut stale);
            // Work resumes from the segment as the claim found it (its checkpoint and
            // counters as of the claim).
            for index in stale.into_iter().take(3) {
                if let Some(claimed) = self
                    .jobs
                    .claim_segment(&rule.id, index, owner, now, until)
                    .await?
                {
                    tracing::info!(rule_id = %rule.id, segment = index, owner, "segment claimed again");
                    return Ok(Some(claimed));
                }
            }
            let next = job.claims.next;
            if next >= job.segments {
                // Nothing never claimed is left; only leases still held (or, if the stale
                // ones above were all taken meanwhile, another round may find more).
                if job.claims.stale(now).is_empty() {
                    return Ok(None);
                }
                continue;
            }
            if let Some(claimed) = self
                .jobs
                .claim_next_segment(&rule.id, next, owner, now, until)
                .await?
            {
                tracing::info!(rule_id = %rule.id, segment = next, owner, "segment claimed");
                return Ok(Some(claimed));
            }
            tokio::time::sleep(Duration::from_millis(fastrand::u64(1..20))).await;
        }
        Ok(None)
    }

    /// Works through one segment under `owner`'s lease (held until `held_until` unless
    /// extended), its heartbeat beside it; `Ok(true)` when it is done, `Ok(false)` when
    /// stopped early (deadline, pause, or the lease was lost).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn work_segment(
        &self,
        rule: &Rule,
        mark: &JobMark,
        segment: Segment,
        owner: &str,
        held_until: Instant,
        deadline: Instant,
        report: &mut RunReport,
    ) -> Result<bool> {
        let index = segment.index;
        let writes = super::lease::LeaseWrites::default();
        let pages = self.work_pages(rule, mark, segment, owner, &writes, deadline, report);
        let heartbeat = super::lease::heartbeat(
            self.jobs.as_ref(),
            &rule.id,
            index,
            owner,
            &writes,
            self.settings.lease,
            held_until,
        );
        tokio::select! {
            // A checkpoint that got through ends the work before a heartbeat it made
            // refused (the segment's last one marks it done) can stop it.
            biased;
            worked = pages => worked,
            lost = heartbeat => {
                // The page in flight is dropped unfinished: no checkpoint (it would be
                // refused), and whoever holds the segment now examines that page again.
                tracing::warn!(rule_id = %rule.id, segment = index, owner, lost = ?lost, "lease lost; segment work stopped");
                Ok(false)
            }
        }
    }

    /// The pages of one segment, from its checkpoint on; `Ok(true)` when it is done,
    /// `Ok(false)` when stopped early (deadline, pause, or the lease was lost).
    ///
    /// Pages are pipelined: while page N is being copied, page N+1 is listed (source and
    /// target) and page N-1 is settled (undo check, then checkpoint), so the copies never
    /// wait on a listing or a DynamoDB write. Checkpoints stay in page order, each written
    /// only after every copy of its page finished.
    #[allow(clippy::too_many_arguments)]
    async fn work_pages(
        &self,
        rule: &Rule,
        mark: &JobMark,
        segment: Segment,
        owner: &str,
        lease_writes: &super::lease::LeaseWrites,
        deadline: Instant,
        report: &mut RunReport,
    ) -> Result<bool> {
        let source = self.stores.store(&rule.source);
        let target = self.stores.store(&rule.target);
        let (source, target) = (source.as_ref(), target.as_ref());
        let rows = match segment.inventory_file {
            Some(_) => Some(self.segment_rows(rule, &segment).await?),
            None => None,
        };
        let lane = Lane {
            rule,
            mark,
            segment: &segment,
            owner,
            lease_writes,
            source,
            target,
            deadline,
            rows: rows.as_ref(),
        };
        let mut after = segment.checkpoint.clone().or(segment.start_after.clone());
        if !self.time_left(deadline) {
            return Ok(false);
        }
        let mut examined = segment.objects_done;
        let Some(mut page) = self.fetch_page(&lane, after.clone(), examined).await? else {
            return Ok(false);
        };
        examined += page.objects.len() as u64;
        let mut settling: Option<Settle> = None;
        loop {
            let last = page
                .resume_after
                .clone()
                .or_else(|| page.objects.last().map(|o| o.key.clone()))
                .or(after.clone());
            let go_on = !page.reached_end && self.time_left(deadline);
            let copies = tokio::time::timeout_at(
                hard_stop(deadline).into(),
                self.copy_page(&lane, &page, deadline),
            );
            let next = async {
                match go_on {
                    true => self.fetch_page(&lane, last.clone(), examined).await,
                    false => Ok(None),
                }
            };
            let previous = settling.take();
            let previous = async {
                match previous {
                    Some(s) => self.settle(&lane, s, report).await,
                    None => Ok(true),
                }
            };
            let (copied, next, kept) = tokio::join!(copies, next, previous);
            if !kept? {
                return Ok(false);
            }
            // A page that cannot finish before the deadline is abandoned: no checkpoint,
            // so its objects are examined again by whoever takes the segment next (those
            // already written are then recognised by the job's mark and counted so).
            let Ok(outcomes) = copied else {
                tracing::warn!(rule_id = %rule.id, segment = segment.index, "deadline: page abandoned");
                return Ok(false);
            };
            // A large copy stopped for the deadline with its parts checkpointed: the page
            // is abandoned the same way (the error stops the worker), and the next run
            // continues that copy.
            if let Err(e) = &outcomes
                && e.continues_later()
            {
                tracing::warn!(rule_id = %rule.id, segment = segment.index, progress = %e, "deadline: page abandoned, its large copy continues next run");
            }
            let done = Settle::of_page(&page, after.take(), last.clone(), outcomes?);
            let next = next?;
            match next {
                Some(following) if go_on => {
                    examined += following.objects.len() as u64;
                    settling = Some(done);
                    page = following;
                    after = last;
                }
                // The segment's end, the deadline, or a pause: this page is the last one.
                _ => {
                    let kept = self.settle(&lane, done, report).await?;
                    return Ok(kept && page.reached_end);
                }
            }
        }
    }

    /// Lists the page after `after` and what the target holds over the same keys;
    /// `None` if the job was paused meanwhile. `examined`: the segment's objects seen so
    /// far, which sizes the segment's last listing to what is left of it.
    async fn fetch_page(
        &self,
        lane: &Lane<'_>,
        after: Option<String>,
        examined: u64,
    ) -> Result<Option<Page>> {
        if let Some(job) = self.jobs.job(&lane.rule.id).await?
            && job.state == JobState::Paused
        {
            return Ok(None);
        }
        if let Some(rows) = lane.rows {
            let rows = self
                .rows_page(rows, lane.source, lane.target, after.as_deref())
                .await?;
            return Ok(Some(Page {
                objects: rows.objects,
                reached_end: rows.reached_end,
                target: rows.target,
                gone: rows.gone,
                resume_after: rows.last_row.or(after),
            }));
        }
        let segment = lane.segment;
        let mut listed = lane
            .source
            .list_page(
                &segment.prefix,
                after.as_deref(),
                self.listing_size(segment, examined),
            )
            .await?;
        let all = listed.objects.len();
        listed
            .objects
            .retain(|o| segment.end.as_ref().is_none_or(|end| o.key <= *end));
        let reached_end = listed.objects.len() < all || !listed.truncated || all == 0;
        let target = match listed.objects.last() {
            Some(last) => {
                list_range(
                    lane.target,
                    &segment.prefix,
                    after.as_deref(),
                    &last.key,
                    self.keys_hint(listed.objects.len()),
                    self.settings.page_size,
                )
                .await?
            }
            None => HashMap::new(),
        };
        Ok(Some(Page {
            objects: listed.objects,
            reached_end,
            target,
            gone: 0,
            resume_after: None,
        }))
    }

    /// Copies what a page needs, `copy_concurrency` objects at a time; each outcome
    /// (retried within the deadline) with its key. An object that still fails is recorded
    /// (`Outcome::Failed`) and the page goes on without it, unless the failure is not the
    /// object's own (see `FailureReason::of` and `page_failure`).
    async fn copy_page<'p>(
        &self,
        lane: &Lane<'_>,
        page: &'p Page,
        deadline: Instant,
    ) -> Result<Vec<(&'p str, Outcome)>> {
        let concurrency = self.settings.copy_concurrency.max(1);
        // A server-side copy needs the source's headers and metadata (its CopyObject
        // replaces them with the marker's): the HEADs of keys the target does not hold
        // (copied for sure) run ahead of the copies, as a checker does, up to
        // `concurrency` in flight and `concurrency` waiting, so a copy waits for one
        // request, not two. They are driven beside the copies (a channel between), not
        // only when a copy's place is free. Only a first attempt uses what was read
        // ahead; a HEAD that failed is left to the copy's own.
        let server_side = lane.rule.resolved_copy_mode() == ResolvedCopyMode::ServerSide;
        let (mut ready, read) = futures::channel::mpsc::channel(concurrency);
        let read_ahead = async move {
            let mut heads = futures::stream::iter(page.objects.iter())
                .map(|o| {
                    let seen = page.target.get(&o.key);
                    async move {
                        let ahead = match (server_side, seen) {
                            (true, None) => lane.source.head(&o.key).await.ok(),
                            _ => None,
                        };
                        (o, seen, ahead)
                    }
                })
                .buffered(concurrency);
            while let Some(head) = heads.next().await {
                if ready.send(head).await.is_err() {
                    break;
                }
            }
        };
        let copies = read
            .map(|(o, seen, ahead)| {
                let group = crate::rate_limit::throttle_group(&lane.segment.prefix, &o.key);
                let in_flight = self.adaptive.of(&lane.rule.id, group, concurrency);
                let ahead = std::sync::Mutex::new(ahead);
                async move {
                    // Retries end before the page is cut off at the hard stop, so an
                    // error that outlasted them is reported, not raced by the cut-off.
                    let ahead = &ahead;
                    let copied = self
                        .retry
                        .run(Some(hard_stop(deadline)), "backfill object", move || {
                            let read = ahead.lock().map(|mut a| a.take()).unwrap_or(None);
                            self.backfill_adaptive(lane, o, seen, in_flight.clone(), read)
                        })
                        .await;
                    (o, copied)
                }
            })
            .buffer_unordered(concurrency)
            .collect::<Vec<_>>();
        let ((), copies) = futures::join!(read_ahead, copies);
        let succeeded = copies.iter().filter(|(_, c)| c.is_ok()).count();
        let mut outcomes = Vec::with_capacity(copies.len());
        let mut failed = Vec::new();
        for (o, copied) in copies {
            match copied {
                Ok(outcome) => outcomes.push((o.key.as_str(), outcome)),
                Err(e) => failed.push((o, e)),
            }
        }
        if let Some(e) = self.page_failure(lane.rule, &mut failed, succeeded, deadline) {
            // No checkpoint: the page is examined again by the next invocation (or, for an
            // error of the whole rule, the job stops with it).
            return Err(e);
        }
        for (o, e) in failed {
            if let Some(reason) = FailureReason::of(&e, lane.rule) {
                tracing::warn!(rule_id = %lane.rule.id, key = %o.key, %reason, error = %e, "object failed; recorded and skipped");
                let record = FailedObject::new(&o.key, o.size, reason, &e);
                outcomes.push((o.key.as_str(), Outcome::Failed(record)));
            }
        }
        Ok(outcomes)
    }

    /// The error that stops a page instead of being recorded object by object, if any
    /// (`failed`: the page's objects that failed after their retries; `succeeded`: how many
    /// did not):
    /// - an error of the whole rule (a missing bucket, a refused bucket-level request);
    /// - a retryable error (throttling, 5xx, timeouts) when time ran out, or when no object
    ///   of the page got through: the service is struggling, not the object, and the page
    ///   is tried again next time. A retryable error of one object among others that
    ///   succeed is the object's (a key that keeps failing) and is recorded;
    /// - the same refused permission for every object of a page of at least
    ///   `PAGE_REFUSED_MIN`: the deployment's IAM, not the objects. Recording a whole
    ///   bucket's keys one by one would only hide it; the job fails with the reason and
    ///   `crr backfill start` resumes it once the permission is granted.
    fn page_failure(
        &self,
        rule: &Rule,
        failed: &mut Vec<(&ListedObject, Error)>,
        succeeded: usize,
        deadline: Instant,
    ) -> Option<Error> {
        let reasons: Vec<Option<FailureReason>> = failed
            .iter()
            .map(|(_, e)| FailureReason::of(e, rule))
            .collect();
        let stop = reasons
            .iter()
            .zip(failed.iter())
            .position(|(reason, (_, e))| {
                reason.is_none()
                    || (e.is_retryable() && (succeeded == 0 || self.retry.out_of_time(deadline)))
            });
        if let Some(i) = stop {
            return Some(failed.swap_remove(i).1);
        }
        let refused = reasons.first().copied().flatten();
        let all_refused = succeeded == 0
            && failed.len() >= PAGE_REFUSED_MIN
            && refused.is_some_and(FailureReason::is_permission)
            && reasons.iter().all(|r| *r == refused);
        if all_refused {
            tracing::error!(rule_id = %rule.id, reason = ?refused, objects = failed.len(), "every object of the page refused: a permission of the deployment");
            return Some(failed.swap_remove(0).1);
        }
        None
    }

    /// Finishes a copied page: removes replicas whose source vanished during their copy,
    /// records its failed objects, then writes the checkpoint. `Ok(false)` if the lease was
    /// lost (failed objects recorded by then are recorded again, one attempt more, by
    /// whoever examines the page again).
    async fn settle(&self, lane: &Lane<'_>, done: Settle, report: &mut RunReport) -> Result<bool> {
        if !done.failed.is_empty() {
            self.jobs
                .record_failures(&lane.rule.id, &done.failed)
                .await?;
        }
        if lane.rule.policy == Policy::Full && !done.created.is_empty() {
            report.undone += self
                .undo_deleted_meanwhile(
                    lane,
                    done.after.as_deref(),
                    &done.created,
                    done.tally.objects,
                )
                .await?;
        }
        // One write on the lease at a time, and the expiry counted from when this one is
        // sent: a checkpoint never shortens what a heartbeat just extended.
        let writing = lane.lease_writes.lock().await;
        let checkpoint = Checkpoint {
            last_key: done.last_key,
            done: done.reached_end,
            lease_until: now_ms() + self.settings.lease.as_millis() as u64,
            tally: done.tally,
        };
        let index = lane.segment.index;
        let kept = self
            .jobs
            .checkpoint_segment(&lane.rule.id, index, lane.owner, &checkpoint)
            .await?;
        drop(writing);
        if !kept {
            tracing::warn!(rule_id = %lane.rule.id, segment = index, owner = lane.owner, "checkpoint refused: the lease was lost (another worker took the segment over)");
            return Ok(false);
        }
        let due = self.progress.add(
            &lane.rule.id,
            checkpoint.tally.objects,
            checkpoint.tally.bytes,
            Utc::now(),
        );
        self.write_progress(&lane.rule.id, due).await;
        report.pages += 1;
        report.copied += checkpoint.tally.copied;
        report.fixed += checkpoint.tally.fixed;
        report.in_place += checkpoint.tally.in_place;
        report.skipped += checkpoint.tally.skipped;
        report.failed += checkpoint.tally.failed;
        report.yielded += done.yielded;
        Ok(true)
    }

    /// Closes the one gap the conditional write leaves: the source object deleted between
    /// the backfill's read and its write, while the target had no such key. Real time then
    /// found nothing to delete, and the write (`If-None-Match: *`) still went ahead. So
    /// after each page the source is listed again over the keys the backfill created: one
    /// listing per page, not a request per object. A key gone from it (and confirmed by
    /// HEAD) loses the replica just written, if that replica is still the one written. A
    /// delete after this listing has its event handled after the write, by real time.
    async fn undo_deleted_meanwhile(
        &self,
        lane: &Lane<'_>,
        after: Option<&str>,
        created: &[(String, String)],
        listed: u64,
    ) -> Result<u64> {
        let Some(last) = created.iter().map(|(k, _)| k.as_str()).max() else {
            return Ok(0);
        };
        let (source, target) = (lane.source, lane.target);
        // An inventory segment's keys are not a key range: each is checked by HEAD.
        let present = match lane.rows {
            Some(_) => HashMap::new(),
            None => {
                list_range(
                    source,
                    &lane.segment.prefix,
                    after,
                    last,
                    self.keys_hint(listed),
                    self.settings.page_size,
                )
                .await?
            }
        };
        // The keys not seen listed are checked one HEAD each, as many at once as copies:
        // one after the other, a page of an inventory segment waited 1,000 round trips.
        let checks = created
            .iter()
            .filter(|(key, _)| !present.contains_key(key))
            .map(|(key, etag)| async move {
                if source.head(key).await?.is_some() {
                    return Ok::<u64, Error>(0);
                }
                if target.head(key).await?.is_some_and(|t| t.etag == *etag) {
                    tracing::info!(rule_id = %lane.rule.id, key = %key, "source deleted while the backfill copied it; replica removed");
                    target.delete(key).await?;
                    return Ok(1);
                }
                Ok(0)
            });
        let mut checks =
            futures::stream::iter(checks).buffer_unordered(self.settings.copy_concurrency.max(1));
        let mut undone = 0;
        while let Some(checked) = checks.next().await {
            undone += checked?;
        }
        Ok(undone)
    }

    fn keys_hint(&self, objects: impl TryInto<i32>) -> i32 {
        keys_hint(objects, self.settings.page_size)
    }

    /// Keys to ask for in a segment's next listing: a page, or only what is left of the
    /// segment by the counting pass's figure plus one (to see past its end), so the
    /// last listing of a segment does not read a page of the next one.
    fn listing_size(&self, segment: &Segment, examined: u64) -> i32 {
        match segment.planned_objects.checked_sub(examined) {
            Some(left) if left > 0 => self.keys_hint(left),
            _ => self.settings.page_size.max(1),
        }
    }

    /// Examines `key` again as its page would, and writes what the plan says (retrying a
    /// failed object). A key gone from the source needs nothing more. A replica created
    /// here gets no undo check: a source deleted meanwhile has its event applied by real
    /// time after this write.
    pub(super) async fn retry_object(
        &self,
        rule: &Rule,
        mark: &JobMark,
        key: &str,
        deadline: Instant,
    ) -> Result<()> {
        let source = self.stores.store(&rule.source);
        let target = self.stores.store(&rule.target);
        let (source, target) = (source.as_ref(), target.as_ref());
        let listed = |o: ObjectInfo| ListedObject {
            key: o.key,
            size: o.size,
            etag: o.etag,
            last_modified: o.last_modified,
        };
        let current = self
            .retry
            .run(Some(deadline), "head source", || source.head(key))
            .await?;
        let Some(current) = current else {
            return Ok(());
        };
        let seen = self
            .retry
            .run(Some(deadline), "head target", || target.head(key))
            .await?
            .map(listed);
        let object = listed(current);
        let segment = Segment {
            prefix: String::new(),
            ..Segment::default()
        };
        // No lease: the object is retried outside any segment.
        let lease_writes = super::lease::LeaseWrites::default();
        let lane = Lane {
            rule,
            mark,
            segment: &segment,
            owner: "retry-failed",
            lease_writes: &lease_writes,
            source,
            target,
            deadline,
            rows: None,
        };
        let (lane, object, seen) = (&lane, &object, seen.as_ref());
        self.retry
            .run(Some(deadline), "retry failed object", move || {
                self.backfill_object(lane, object, seen, None)
            })
            .await
            .map(|_| ())
    }

    /// `backfill_object` within the prefix's AIMD limit on copies in flight. A SlowDown is
    /// answered with fewer copies in flight, and the object waits for a place again: it
    /// uses none of the retries of `RetryPolicy`, which only sees it once time runs out.
    async fn backfill_adaptive(
        &self,
        lane: &Lane<'_>,
        object: &ListedObject,
        listed: Option<&ListedObject>,
        in_flight: Arc<crate::rate_limit::Aimd>,
        mut read_ahead: Option<Option<ObjectInfo>>,
    ) -> Result<Outcome> {
        loop {
            let place = in_flight.acquire().await;
            match self
                .backfill_object(lane, object, listed, read_ahead.take())
                .await
            {
                Err(e) if e.is_throttled() && !self.retry.out_of_time(lane.deadline) => {
                    place.throttled();
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(50..250))).await;
                }
                Ok(outcome) => {
                    place.succeeded();
                    return Ok(outcome);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Examines one listed object and writes what the plan says: the whole object, or its
    /// metadata only. Every write reads the source's current state (so an object real-time
    /// replication changed meanwhile is written as it is now, never as listed), and is
    /// conditional on the target being as the backfill saw it: if real-time replication
    /// wrote the key after that, the write is refused (412) and the backfill yields, so it
    /// can never revert a newer replica.
    ///
    /// `read_ahead`: the source's HEAD, read ahead of a server-side copy (`Some(None)`:
    /// the object was gone), used in place of the copy's own.
    async fn backfill_object(
        &self,
        lane: &Lane<'_>,
        object: &ListedObject,
        listed: Option<&ListedObject>,
        read_ahead: Option<Option<ObjectInfo>>,
    ) -> Result<Outcome> {
        let (rule, source, target) = (lane.rule, lane.source, lane.target);
        crate::key::check_in(source.bucket(), &object.key)?;
        let examined = examine(rule, Some(lane.mark), source, target, object, listed).await?;
        match examined.plan {
            ObjectPlan::InPlace => Ok(Outcome::InPlace),
            ObjectPlan::Written(how) => Ok(Outcome::Written(how)),
            ObjectPlan::Skip(why) => Ok(Outcome::Skipped(why)),
            ObjectPlan::Copy { .. } => {
                self.copy(lane, &object.key, object.size, examined.target, read_ahead)
                    .await
            }
            ObjectPlan::Fix { .. } => match (examined.source, examined.target) {
                (Some(current), Some(replica)) => {
                    self.fix(lane, current, replica, examined.tags).await
                }
                (_, replica) => {
                    self.copy(lane, &object.key, object.size, replica, None)
                        .await
                }
            },
        }
    }

    /// Writes the source object `key` (of about `size` bytes, as listed) whole over
    /// `existing` (`None`: where there is none), once the rule's rate limits allow
    /// (`read_ahead`: the source's HEAD, already read).
    async fn copy(
        &self,
        lane: &Lane<'_>,
        key: &str,
        size: u64,
        existing: Option<ObjectInfo>,
        read_ahead: Option<Option<ObjectInfo>>,
    ) -> Result<Outcome> {
        let (rule, source, target) = (lane.rule, lane.source, lane.target);
        // Before the source is read: a stream copy's GET is not left open while waiting.
        self.take_rate(rule, size).await?;
        let read = match read_ahead {
            Some(head) => head.map(|info| (info, None)),
            None => self.engine.read_source(rule, source, key).await?,
        };
        let Some((current, body)) = read else {
            return Ok(Outcome::Skipped(Skip::SourceGone));
        };
        if crate::copy::source_state(&current, &rule.source.bucket)
            != crate::filter::SourceState::Present
        {
            // Another bucket's replica: never replicated again (failback objects, whose
            // marker names this source, are).
            return Ok(Outcome::Skipped(Skip::Replica));
        }
        let Some(mut attrs) = self.attrs(lane, &current, None, Write::Copy).await? else {
            return Ok(Outcome::Skipped(Skip::SourceGone));
        };
        attrs.precondition = Some(match &existing {
            None => TargetPrecondition::Absent,
            Some(t) => TargetPrecondition::Etag(t.etag.clone()),
        });
        // Parts must be checkpointed before the hard stop drops the page's copies.
        let run = CopyRun::new(
            self.uploads.as_deref(),
            &rule.id,
            Writer::Backfill,
            Some(hard_stop(lane.deadline)),
        );
        match self
            .engine
            .copy_with_attrs(rule, source, target, &current, body, attrs, run)
            .await
        {
            Ok(done) if existing.is_none() => Ok(Outcome::Created(done.etag)),
            Ok(_) => Ok(Outcome::Copied),
            Err(Error::Precondition { .. }) => Ok(Outcome::Skipped(Skip::Yielded)),
            // Deleted while being copied: real time handles deletes.
            Err(Error::NotFound { .. }) => Ok(Outcome::Skipped(Skip::SourceGone)),
            Err(e) => Err(e),
        }
    }

    /// Gives `replica`, whose bytes are `current`'s already, `current`'s metadata: a
    /// CopyObject of the replica onto itself, no byte moved (`tags`: both sides' tags, if
    /// the comparison read them). Where one request cannot rewrite it (above 5 GiB), or
    /// the provider refuses, the object is copied again instead.
    async fn fix(
        &self,
        lane: &Lane<'_>,
        current: ObjectInfo,
        replica: ObjectInfo,
        tags: Tags,
    ) -> Result<Outcome> {
        if crate::copy::source_state(&current, &lane.rule.source.bucket)
            != crate::filter::SourceState::Present
        {
            // Another bucket's replica: never replicated again (failback objects, whose
            // marker names this source, are).
            return Ok(Outcome::Skipped(Skip::Replica));
        }
        if replica.size > MAX_SINGLE_REQUEST {
            return self
                .copy(lane, &current.key, current.size, Some(replica), None)
                .await;
        }
        // A metadata-only copy moves no byte, but is a request like any other.
        self.take_rate(lane.rule, 0).await?;
        let tags = match tags {
            Tags::Read { source, .. } => Some(source),
            Tags::Counted => None,
        };
        let Some(attrs) = self.attrs(lane, &current, tags, Write::Fix).await? else {
            return Ok(Outcome::Skipped(Skip::SourceGone));
        };
        match self
            .engine
            .rewrite_metadata(lane.target, &replica, attrs)
            .await
        {
            Ok(_) => Ok(Outcome::Fixed),
            // The replica changed, or went, since it was looked at: real time wrote it.
            Err(Error::Precondition { .. } | Error::NotFound { .. }) => {
                Ok(Outcome::Skipped(Skip::Yielded))
            }
            Err(e @ Error::Service { .. }) => {
                tracing::warn!(rule_id = %lane.rule.id, key = %replica.key, error = %e, "metadata-only copy refused; copying the object again");
                self.copy(lane, &current.key, current.size, Some(replica), None)
                    .await
            }
            Err(e) => Err(e),
        }
    }

    /// What a replica of `current` is written with (`tags`: the source's, if read
    /// already), marked as this job's write `how`; `None` if the source object went
    /// while its tags or ACL were read (real time handles deletes).
    async fn attrs(
        &self,
        lane: &Lane<'_>,
        current: &ObjectInfo,
        tags: Option<Vec<(String, String)>>,
        how: Write,
    ) -> Result<Option<WriteAttrs>> {
        let attrs = self
            .engine
            .attrs_for_rule(lane.rule, lane.source, lane.target, current, tags)
            .await;
        match attrs {
            Ok(mut attrs) => {
                attrs
                    .metadata
                    .insert(marker::BACKFILL.into(), lane.mark.value(how));
                Ok(Some(attrs))
            }
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Where the listing pass's segments go: each is cut (`Backfiller::cut`) with the job's
/// totals and the discovery frontier after it, one at a time (discovery calls the sink
/// under its lock), so segment indices stay dense.
struct PlanCuts<'a> {
    backfiller: &'a Backfiller,
    rule_id: &'a str,
    /// The job as recorded by the last cut.
    job: tokio::sync::Mutex<Job>,
    /// The job as another invocation counting too left it, when it cut first.
    theirs: std::sync::Mutex<Option<Job>>,
    cuts: Option<&'a tokio::sync::watch::Sender<bool>>,
}

#[async_trait::async_trait]
impl super::discovery::SegmentSink for PlanCuts<'_> {
    async fn segment(
        &self,
        found: super::discovery::Found,
        frontier: &[super::discovery::OpenRange],
    ) -> Result<bool> {
        let mut job = self.job.lock().await;
        let segment = Segment {
            index: job.segments,
            prefix: found.range.prefix,
            start_after: found.range.after,
            end: found.range.upto,
            planned_objects: found.objects,
            ..Segment::default()
        };
        let mut next = job.clone();
        next.segments += 1;
        next.total_objects += found.objects;
        next.total_bytes += found.bytes;
        next.frontier = frontier.to_vec();
        next.planned = frontier.is_empty();
        let mut attempt = 0;
        while let Some(theirs) = self
            .backfiller
            .cut(self.rule_id, &segment, &next, &job)
            .await?
        {
            // Refused with the job still at this pass's segment count: not another pass's
            // cut but a write that collided with another on the job item (a checkpoint's
            // transaction): the condition still holds, so the cut is tried again.
            attempt += 1;
            if theirs.segments == job.segments && !theirs.planned && attempt < 5 {
                tokio::time::sleep(Duration::from_millis(fastrand::u64(10..50) * attempt)).await;
                continue;
            }
            tracing::info!(rule_id = %self.rule_id, segments = theirs.segments, "another invocation cut first; its counting pass goes on");
            if let Ok(mut slot) = self.theirs.lock() {
                *slot = Some(theirs);
            }
            return Ok(false);
        }
        *job = next;
        if let Some(cuts) = self.cuts {
            cuts.send_modify(|_| ());
        }
        Ok(true)
    }
}

/// One segment as a worker holds it: the rule, the range, the lease owner, both stores.
struct Lane<'a> {
    rule: &'a Rule,
    /// The job's mark on what it writes.
    mark: &'a JobMark,
    segment: &'a Segment,
    owner: &'a str,
    /// Taken by each write on the lease (checkpoint, heartbeat): one at a time.
    lease_writes: &'a super::lease::LeaseWrites,
    source: &'a dyn ObjectStore,
    target: &'a dyn ObjectStore,
    /// When the invocation ends.
    deadline: Instant,
    /// An inventory segment's rows (`None`: the segment is a key range, listed).
    rows: Option<&'a super::inventory::SegmentRows>,
}

/// One listed page of a segment.
struct Page {
    /// The page's objects within the segment's range.
    objects: Vec<ListedObject>,
    /// No key of the segment comes after this page.
    reached_end: bool,
    /// What the target holds over the page's keys.
    target: HashMap<String, ListedObject>,
    /// Inventory rows whose source object is gone since the report (skipped).
    gone: u64,
    /// Where the next page starts, when not after the last object's key (an inventory
    /// segment's row number).
    resume_after: Option<String>,
}

/// A copied page, waiting for its undo check and checkpoint.
struct Settle {
    /// Where the page's listing started (exclusive).
    after: Option<String>,
    last_key: Option<String>,
    reached_end: bool,
    tally: PageTally,
    yielded: u64,
    /// Keys the page wrote where the target had none, with the replicas' ETags.
    created: Vec<(String, String)>,
    /// Objects that failed, to record in the job's list.
    failed: Vec<FailedObject>,
}

impl Settle {
    fn of_page(
        page: &Page,
        after: Option<String>,
        last_key: Option<String>,
        outcomes: Vec<(&str, Outcome)>,
    ) -> Self {
        let mut done = Settle {
            after,
            last_key,
            reached_end: page.reached_end,
            tally: PageTally {
                objects: page.objects.len() as u64 + page.gone,
                bytes: page.objects.iter().map(|o| o.size).sum(),
                skipped: page.gone,
                ..PageTally::default()
            },
            yielded: 0,
            created: Vec::new(),
            failed: Vec::new(),
        };
        for (key, outcome) in outcomes {
            let counter = match outcome {
                Outcome::Copied | Outcome::Written(Write::Copy) => &mut done.tally.copied,
                Outcome::Created(etag) => {
                    done.created.push((key.to_string(), etag));
                    &mut done.tally.copied
                }
                Outcome::Fixed | Outcome::Written(Write::Fix) => &mut done.tally.fixed,
                Outcome::InPlace => &mut done.tally.in_place,
                Outcome::Skipped(why) => {
                    done.yielded += u64::from(why == Skip::Yielded);
                    &mut done.tally.skipped
                }
                Outcome::Failed(record) => {
                    done.failed.push(record);
                    &mut done.tally.failed
                }
            };
            *counter += 1;
        }
        done
    }
}

/// What became of one object: each adds to exactly one counter of its page.
enum Outcome {
    /// Written whole over an existing target object.
    Copied,
    /// Written whole where the target had no such key; the replica's ETag.
    Created(String),
    /// Metadata rewritten onto bytes that were the source's already.
    Fixed,
    InPlace,
    /// Found written by this job in a page that was never checkpointed.
    Written(Write),
    Skipped(Skip),
    /// Failed after its retries: recorded in the job's failed-objects list, and skipped.
    Failed(FailedObject),
}
