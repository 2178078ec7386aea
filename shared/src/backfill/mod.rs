//! Historical migration: copies what existed in the source before the rule, in key-range
//! segments claimed through leases, checkpointed page by page, deadline-aware.
//!
//! A job is planned by a counting pass over the rule's prefixes, which measures the total
//! (objects, bytes) and cuts the key space into segments of about `segment_objects`
//! objects: `listers` listers at once split the key space and list its parts
//! (`discovery`), or the rows of an S3 Inventory report are read (`inventory`). Workers (several per invocation, any number of invocations) claim a segment
//! with a conditional write on its lease, list it page by page, copy what the target
//! lacks or holds differently, and write the page's checkpoint (last key, counters) only
//! after every copy of the page finished, extending the lease in the same conditional
//! write. Each worker holds its leases under an owner of its own, and a heartbeat extends
//! the lease while a page is copied (`lease`). A crash loses at most the page in flight
//! (those objects are examined again, and copied again if they were being copied); a
//! lease left behind expires and the segment is taken over.
//!
//! Nothing waits that need not: workers start on the first segment as soon as the
//! counting pass cuts it, and within a segment the next page is listed and the previous
//! one checkpointed while the current one is copied.
//!
//! The feature in these files: this one (the job's model and the `BackfillStore` port),
//! `discovery` (the listing counting pass: parallel listers, the frontier), `inventory`
//! (the counting pass from an S3 Inventory report, and its segments' rows),
//! `plan` (what to do with each listed object, the dry run, range listings), `lease`
//! (lease owners and the heartbeat), `worker` (the `Backfiller`: claiming segments,
//! copying pages, checkpoints) and `failures` (the objects that failed: recorded, listed,
//! tried again).

pub mod discovery;
mod failures;
mod fanout;
pub mod inventory;
mod lease;
mod plan;
mod worker;

pub use failures::*;
pub use fanout::{BatchOutcome, CoordinatorReport, QueuedMessage, SegmentWork, sqs_messages};
pub use lease::LeaseLost;
pub use plan::*;
pub use worker::*;

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::allowed::AllowedBuckets;
use crate::error::Result;

/// Where a rule's historical migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Requested, no object examined yet.
    Pending,
    /// Some segment has been worked on.
    Running,
    Completed,
    /// Every segment is done, and some objects failed: they are in the job's failed-objects
    /// list (`crr backfill failures`), and `crr backfill retry-failed` tries them again.
    CompletedWithFailures,
    Failed,
    Paused,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::CompletedWithFailures => "completed_with_failures",
            JobState::Failed => "failed",
            JobState::Paused => "paused",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => JobState::Pending,
            "running" => JobState::Running,
            "completed" => JobState::Completed,
            "completed_with_failures" => JobState::CompletedWithFailures,
            "failed" => JobState::Failed,
            "paused" => JobState::Paused,
            _ => return None,
        })
    }

    /// Every segment is done (with or without failed objects).
    pub fn is_finished(self) -> bool {
        matches!(self, JobState::Completed | JobState::CompletedWithFailures)
    }
}

/// A rule's backfill job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub rule_id: String,
    pub state: JobState,
    /// The counting pass is over: totals are final and every segment exists.
    pub planned: bool,
    /// Counting pass position of an inventory job: data files read, and the last row cut
    /// in the current one. (A listing job written by an older version kept its position
    /// here too: the index into the rule's prefixes, and the last key counted; `frontier`
    /// takes over from it.)
    pub plan_prefix: usize,
    pub plan_after: Option<String>,
    /// Counting pass position of a listing job: the ranges of the key space still open
    /// (each with how far it was listed and what it counted since its last cut), written
    /// with each cut (`discovery`). Empty before the pass starts and once it is over.
    pub frontier: Vec<discovery::OpenRange>,
    /// Objects and bytes in the segments cut so far (final once `planned`; the frontier's
    /// counts are not in them yet).
    pub total_objects: u64,
    pub total_bytes: u64,
    /// Segments cut so far.
    pub segments: u32,
    pub started_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    /// Why the job is `Failed` (a permanent error: missing bucket, access denied...).
    pub last_error: Option<String>,
    /// The S3 Inventory manifest (`s3://bucket/key/manifest.json`) the job reads its
    /// objects from instead of listing the source; then `plan_prefix` counts the
    /// manifest's data files read so far, and the segments are row ranges of them.
    pub inventory: Option<String>,
    /// What every checkpoint so far added, summed in the job item by each checkpoint (so
    /// status reads one item, however many segments there are).
    pub progress: JobProgress,
    /// Who may claim which segment, without reading the segments (`ClaimBoard`).
    pub claims: ClaimBoard,
}

impl Job {
    /// Objects and bytes counted so far: those of the segments cut, and those the frontier
    /// counted since its ranges' last cuts (as of the last cut). The total while the
    /// counting pass goes on is at least this.
    pub fn counted(&self) -> (u64, u64) {
        self.frontier
            .iter()
            .fold((self.total_objects, self.total_bytes), |(o, b), r| {
                (o + r.objects, b + r.bytes)
            })
    }

    /// Where the listing pass over `prefixes` goes on: the stored frontier, or, if there is
    /// none (the pass not started, or started by a version that kept one position), the
    /// rest of the prefixes from `plan_prefix`, the first one after `plan_after`.
    pub fn open_frontier(&self, prefixes: &[String]) -> Vec<discovery::OpenRange> {
        if self.planned {
            return Vec::new();
        }
        if !self.frontier.is_empty() {
            return self.frontier.clone();
        }
        let mut open = discovery::start(prefixes.get(self.plan_prefix..).unwrap_or_default());
        if let Some(first) = open.first_mut() {
            first.range.after = self.plan_after.clone();
        }
        open
    }
}

impl Job {
    /// A job just requested at `now`: pending, nothing counted or cut yet; reading the S3
    /// Inventory report whose manifest is `inventory`, or listing the source.
    pub fn requested(rule_id: &str, inventory: Option<&str>, now: DateTime<Utc>) -> Self {
        Job {
            rule_id: rule_id.to_string(),
            state: JobState::Pending,
            planned: false,
            plan_prefix: 0,
            plan_after: None,
            frontier: Vec::new(),
            total_objects: 0,
            total_bytes: 0,
            segments: 0,
            started_at: now,
            updated_at: now,
            completed_at: None,
            last_error: None,
            inventory: inventory.map(str::to_string),
            progress: JobProgress::default(),
            claims: ClaimBoard::default(),
        }
    }
}

/// A job's totals over its segments, kept in the job item: each checkpoint adds its page's
/// tally (and one finished segment with the segment's last page) in the same transaction
/// that writes the segment's checkpoint, so the totals are exactly the segments' sums.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobProgress {
    /// Summed `Segment` counters (`objects` = `objects_done`, `bytes` = `bytes_done`).
    pub tally: PageTally,
    pub segments_done: u32,
}

impl JobProgress {
    /// The totals a list of segments adds up to (for reports and tests; the job item keeps
    /// them as it goes).
    pub fn of_segments(segments: &[Segment]) -> Self {
        let mut p = JobProgress::default();
        for s in segments {
            p.tally.add(&s.tally());
            p.segments_done += u32::from(s.done);
        }
        p
    }
}

/// The claim state of a job, kept in the job item so a claim reads one item, not every
/// segment.
///
/// Segments `next..segments` were never claimed: a claim takes `next` by moving it on with
/// a conditional write (and entering the segment in `leases` in the same write). Every
/// segment handed out and not done has an entry in `leases`: its lease's expiry as far as
/// the job item knows (0: released). An entry is only a hint, written after the segment's
/// own lease: the segment's conditional claim decides. So a claim looks at `leases` for
/// an expired or released segment, then at `next`; `leases` holds at most about as many
/// entries as workers ever ran at once (a segment leaves it when done).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimBoard {
    /// The first segment index never handed out.
    pub next: u32,
    /// Segment index -> lease expiry (epoch ms; 0 when released).
    pub leases: std::collections::BTreeMap<u32, u64>,
}

impl ClaimBoard {
    /// Segments whose lease expired or was released (at `now_ms`): claimable again.
    pub fn stale(&self, now_ms: u64) -> Vec<u32> {
        self.leases
            .iter()
            .filter(|(_, until)| **until < now_ms)
            .map(|(index, _)| *index)
            .collect()
    }

    /// Segments leased now.
    pub fn active(&self, now_ms: u64) -> u32 {
        self.leases
            .values()
            .filter(|until| **until >= now_ms)
            .count() as u32
    }
}

/// A key range `(start_after, end]` under one prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Segment {
    pub index: u32,
    pub prefix: String,
    /// Exclusive lower bound (`None`: from the start of the prefix).
    pub start_after: Option<String>,
    /// Inclusive upper bound (`None`: to the end of the prefix).
    pub end: Option<String>,
    /// Objects the counting pass found in the range (0: not known). Only a hint for
    /// sizing the last listing; keys added or deleted since are handled all the same.
    pub planned_objects: u64,
    /// Last key examined; listing resumes after it.
    pub checkpoint: Option<String>,
    pub done: bool,
    pub lease_owner: Option<String>,
    /// Epoch milliseconds.
    pub lease_until: u64,
    /// Objects and bytes examined: `copied + fixed + in_place + skipped + failed` objects.
    pub objects_done: u64,
    pub bytes_done: u64,
    /// Objects written whole (new, or bytes differed).
    pub copied: u64,
    /// Objects whose target held the bytes but not all the metadata: metadata rewritten.
    pub fixed: u64,
    /// Objects found precise copies already.
    pub in_place: u64,
    /// Objects left alone otherwise (see `Skip`).
    pub skipped: u64,
    /// Objects that failed and were recorded in the job's failed-objects list.
    pub failed: u64,
    /// Time of the last checkpoint.
    pub updated_at: Option<DateTime<Utc>>,
    /// For a job reading an S3 Inventory report: the data file (key in the inventory
    /// bucket) the segment is a row range of. `start_after`, `end` and `checkpoint` are
    /// then row numbers of that file (1-based, every data line counted), and `prefix` is
    /// empty: rows outside the rule's prefixes are passed over.
    pub inventory_file: Option<String>,
}

/// What one checkpoint adds to a segment (`Segment` says what each counter means).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageTally {
    pub objects: u64,
    pub bytes: u64,
    pub copied: u64,
    pub fixed: u64,
    pub in_place: u64,
    pub skipped: u64,
    pub failed: u64,
}

impl PageTally {
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &PageTally) {
        self.objects += other.objects;
        self.bytes += other.bytes;
        self.copied += other.copied;
        self.fixed += other.fixed;
        self.in_place += other.in_place;
        self.skipped += other.skipped;
        self.failed += other.failed;
    }
}

impl Segment {
    /// The segment's counters so far, as one tally.
    pub fn tally(&self) -> PageTally {
        PageTally {
            objects: self.objects_done,
            bytes: self.bytes_done,
            copied: self.copied,
            fixed: self.fixed,
            in_place: self.in_place,
            skipped: self.skipped,
            failed: self.failed,
        }
    }

    /// Adds a checkpoint's tally to the segment's counters.
    pub fn add_tally(&mut self, t: &PageTally) {
        self.objects_done += t.objects;
        self.bytes_done += t.bytes;
        self.copied += t.copied;
        self.fixed += t.fixed;
        self.in_place += t.in_place;
        self.skipped += t.skipped;
        self.failed += t.failed;
    }
}

/// A page finished: where the segment stands after it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// Last key examined (listing resumes after it).
    pub last_key: Option<String>,
    /// The segment has no more keys.
    pub done: bool,
    /// What the page added.
    pub tally: PageTally,
    /// The lease's new expiry (epoch ms).
    pub lease_until: u64,
}

/// Backfill jobs and segments in the state table.
#[async_trait]
pub trait BackfillStore: Send + Sync {
    async fn job(&self, rule_id: &str) -> Result<Option<Job>>;
    /// Creates the job if there is none; `Ok(false)` if one exists.
    async fn create_job(&self, job: &Job) -> Result<bool>;
    /// Sets the job's state (and `completed_at` for `Completed`); clears `last_error`.
    async fn set_job_state(&self, rule_id: &str, state: JobState) -> Result<()>;
    /// Moves the job from `from` to `to` (as `set_job_state`), only if it is in `from`:
    /// `Ok(false)` if it is not (another invocation, or the user, moved it first).
    async fn advance_job(&self, rule_id: &str, from: JobState, to: JobState) -> Result<bool>;
    /// Marks the job `Failed` with the reason; `crr backfill start` resumes it.
    async fn fail_job(&self, rule_id: &str, reason: &str) -> Result<()>;
    /// Records a cut of the counting pass: the new segment and the job's plan position
    /// and totals, atomically, if the plan is still at `expected_segments` segments.
    async fn add_segment(
        &self,
        rule_id: &str,
        segment: &Segment,
        job: &Job,
        expected_segments: u32,
    ) -> Result<bool>;
    /// Every segment of the job: an explicit report only (`crr backfill segments`, tests);
    /// claims and status read the job item (`Job::claims`, `Job::progress`).
    async fn segments(&self, rule_id: &str) -> Result<Vec<Segment>>;
    /// Hands out the never-claimed segment `next` (`ClaimBoard::next`) to `owner` until
    /// `until_ms`, if the job's cursor is still at `next`: the cursor moves on and the
    /// segment enters the board in one conditional write, then the segment's lease is
    /// taken as `claim_segment` does. `None` if another claim moved the cursor first (read
    /// the job again), or if the segment was not free (then it is left on the board).
    async fn claim_next_segment(
        &self,
        rule_id: &str,
        next: u32,
        owner: &str,
        now_ms: u64,
        until_ms: u64,
    ) -> Result<Option<Segment>>;
    /// Takes the segment's lease for `owner` until `until_ms` if it is free or expired
    /// (at `now_ms`) and the segment is not done; the segment as the claim left it (its
    /// checkpoint and counters as of the claim, not of an earlier listing), `None` if the
    /// lease was not free. The job's board learns the new lease (or, when the claim
    /// failed, the segment's real state: done segments leave it).
    async fn claim_segment(
        &self,
        rule_id: &str,
        index: u32,
        owner: &str,
        now_ms: u64,
        until_ms: u64,
    ) -> Result<Option<Segment>>;
    /// The heartbeat: moves the lease's expiry to `until_ms` if `owner` still holds an
    /// unexpired lease (at `now_ms`) on a segment not done; `Ok(false)` if not (the lease
    /// was lost).
    async fn extend_lease(
        &self,
        rule_id: &str,
        index: u32,
        owner: &str,
        now_ms: u64,
        until_ms: u64,
    ) -> Result<bool>;
    /// Writes a page's checkpoint and extends the lease, if `owner` still holds an
    /// unexpired lease and the segment is not done yet; `Ok(false)` (nothing written) if
    /// not. So a worker that lost its lease adds nothing, and a done segment never gets
    /// `done` set back or counters added. The job's totals (`Job::progress`) get the same
    /// tally in the same atomic write, exactly once also when the write is retried.
    async fn checkpoint_segment(
        &self,
        rule_id: &str,
        index: u32,
        owner: &str,
        checkpoint: &Checkpoint,
    ) -> Result<bool>;
    /// Gives the lease up (if `owner` holds it); the board entry then reads the time of
    /// the release (stale from then on: claimable, and sent again by the fan-out's
    /// coordinator if no claim came for a while).
    async fn release_segment(&self, rule_id: &str, index: u32, owner: &str) -> Result<()>;
    /// Moves the claim cursor (`ClaimBoard::next`) forward from `from` to `to`, if it is
    /// at `from`; `Ok(false)` if it is not. In fan-out mode the cursor is the first
    /// segment never sent to the segment queue (`fanout`).
    async fn advance_claim_cursor(&self, rule_id: &str, from: u32, to: u32) -> Result<bool>;
    /// Moves the claim cursor back to `to` if it is past it (a segment's message was taken
    /// off the segment queue without being worked on, the job being paused): that segment
    /// and every later one are sent again.
    async fn rewind_claim_cursor(&self, rule_id: &str, to: u32) -> Result<bool>;
    /// Sets segment `index`'s board entry to `until_ms` if it still reads `seen_ms`
    /// (`Ok(false)` otherwise: a claim or release moved it meanwhile).
    async fn touch_board_entry(
        &self,
        rule_id: &str,
        index: u32,
        seen_ms: u64,
        until_ms: u64,
    ) -> Result<bool>;
    /// Records failed objects in the job's list: a key already there gets the new reason,
    /// message, size and time, and one more attempt.
    async fn record_failures(&self, rule_id: &str, failed: &[FailedObject]) -> Result<()>;
    /// The job's failed objects, in key order.
    async fn failures(&self, rule_id: &str) -> Result<Vec<FailedObject>>;
    /// How many objects the job's list holds.
    async fn failure_count(&self, rule_id: &str) -> Result<u64>;
    /// Takes `key` off the job's list (it was copied, or is gone).
    async fn remove_failure(&self, rule_id: &str, key: &str) -> Result<()>;
}

/// Tuning of the backfill.
#[derive(Debug, Clone)]
pub struct BackfillSettings {
    /// Keys per ListObjectsV2 page, and so per checkpoint.
    pub page_size: i32,
    /// Objects per segment cut by the counting pass.
    pub segment_objects: u64,
    /// Listers at work at once in a listing job's counting pass (`discovery`).
    pub listers: usize,
    /// Segments worked on at once within one invocation.
    pub workers: usize,
    /// Objects copied at once within one page.
    pub copy_concurrency: usize,
    /// How long a lease lasts without a heartbeat or checkpoint (the heartbeat extends it
    /// every third of it).
    pub lease: Duration,
    /// Time kept free before the deadline: no page starts inside it.
    pub margin: Duration,
    /// Fan-out mode: how long a segment's lease may have run out (or the segment been
    /// released) without a claim before the coordinator sends it to the queue again.
    pub requeue_after: Duration,
    /// Buckets this deployment may touch: a rule naming others fails its job.
    pub allowed: AllowedBuckets,
}

impl Default for BackfillSettings {
    fn default() -> Self {
        Self {
            page_size: 1000,
            segment_objects: 10_000,
            listers: 16,
            workers: 4,
            copy_concurrency: 16,
            lease: Duration::from_secs(120),
            margin: Duration::from_secs(20),
            requeue_after: Duration::from_secs(240),
            allowed: AllowedBuckets::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::discovery::{KeyRange, OpenRange};
    use super::*;

    fn job() -> Job {
        Job {
            state: JobState::Running,
            ..Job::requested("r", None, Utc::now())
        }
    }

    #[test]
    fn the_listing_pass_goes_on_from_its_frontier_or_from_an_older_single_position() {
        let prefixes = ["a/".to_string(), "b/".to_string(), "c/".to_string()];
        // Not started: the whole of every prefix.
        assert_eq!(
            job().open_frontier(&prefixes),
            vec![
                OpenRange::whole("a/"),
                OpenRange::whole("b/"),
                OpenRange::whole("c/")
            ]
        );
        // Started by a version that kept one position (prefix 1, after its last cut).
        let mut older = job();
        (older.plan_prefix, older.plan_after, older.segments) = (1, Some("b/k9".into()), 4);
        let open = older.open_frontier(&prefixes);
        assert_eq!(open.len(), 2);
        assert_eq!(
            open[0].range,
            KeyRange {
                prefix: "b/".into(),
                after: Some("b/k9".into()),
                upto: None
            }
        );
        assert_eq!(open[1], OpenRange::whole("c/"));
        // The stored frontier, as is; nothing once planned.
        let mut stored = job();
        stored.frontier = vec![OpenRange {
            listed: Some("a/x".into()),
            objects: 7,
            bytes: 70,
            ..OpenRange::whole("a/")
        }];
        (stored.total_objects, stored.total_bytes) = (100, 1000);
        assert_eq!(stored.open_frontier(&prefixes), stored.frontier);
        assert_eq!(stored.counted(), (107, 1070));
        stored.planned = true;
        assert!(stored.open_frontier(&prefixes).is_empty());
    }
}
