//! Historical migration: copies what existed in the source before the rule, in key-range
//! segments claimed through leases, checkpointed page by page, deadline-aware.
//!
//! A job is planned by a counting pass over the rule's prefixes, which measures the total
//! (objects, bytes) and cuts the key space into segments of about `segment_objects`
//! objects. Workers (several per invocation, any number of invocations) claim a segment
//! with a conditional write on its lease, list it page by page, copy what the target
//! lacks or holds differently, and write the page's checkpoint (last key, counters) only
//! after every copy of the page finished, extending the lease in the same conditional
//! write. A crash loses at most the page in flight (those objects are examined again, and
//! copied again if they were being copied); a lease left behind expires and the segment
//! is taken over.
//!
//! Nothing waits that need not: workers start on the first segment as soon as the
//! counting pass cuts it, and within a segment the next page is listed and the previous
//! one checkpointed while the current one is copied.
//!
//! # In place means a precise copy
//!
//! A target object is in place only if `verify::replica_difference` finds nothing: the
//! same bytes (size and ETag, or crr's `crr-source-etag` marker naming the source's ETag)
//! *and* the same content headers, user metadata (crr's markers aside) and tags, exactly
//! what `crr verify` compares. Otherwise it is written (`plan_object`): its bytes differ ->
//! copied again; only its metadata differs -> fixed, with a CopyObject of the target
//! object onto itself (`REPLACE`, conditional on its ETag) that rewrites headers,
//! metadata, tags and ACL without moving a byte, in either copy mode; a copy again where
//! that cannot be (above 5 GiB, or refused by the provider). A target object that is not
//! crr's replica of this source is a conflict: replaced under `on_conflict = overwrite`
//! (and listed by `crr backfill plan` with what differs), kept under `skip`, replaced
//! under `newer` only by a source modified later.
//!
//! # Requests per object
//!
//! The target is listed over each source page's key range (one ListObjectsV2 per page on
//! each side), so most objects need no request of their own to be judged:
//! - no such key in the target: none; the copy follows (stream mode: GET + PUT;
//!   server-side: HEAD + CopyObject), conditional on the key still being absent;
//! - listed with the source's size and ETag: a HEAD of each side (at once), plus
//!   GetObjectTagging on each side where nothing else differs and both HEADs count the
//!   same number of tags, not zero (differing counts already differ; two untagged objects
//!   need no read). Found equal: nothing more. Metadata differs: one CopyObject (the
//!   fix), plus what the copy engine reads for any replica: the source's tags if it has
//!   some and they were not read yet, its ACL where the rule carries ACLs;
//! - listed otherwise: a HEAD of the target (its marker may vouch for the bytes, and it
//!   tells what a conflict would replace); if it vouches, as above with a HEAD of the
//!   source; if not, the copy.
//!
//! A same-size-same-ETag pair so costs two HEADs where the listing alone used to decide:
//! the price of knowing that the metadata agrees.
//!
//! # Counting writes once
//!
//! Each object of a checkpointed page is counted once, in exactly one of `copied`,
//! `fixed`, `in_place` and `skipped` (conflicts kept by `on_conflict`, writes yielded to
//! real time, objects deleted meanwhile, replicas of another bucket: `Skip`): they add up
//! to `objects_done`. A page that is abandoned (deadline, lost lease, SIGKILL) writes no
//! checkpoint, so its objects are examined again, and the ones it wrote are then found
//! equal. To count those as the writes they were, without a DynamoDB write per object,
//! every replica the backfill writes carries `crr-source-backfill: <job>/copied` (or
//! `/fixed`), `<job>` being the job's start time in epoch milliseconds. A precise copy
//! whose markers name exactly this source state (bucket, key, ETag) and this job was
//! written by this job in a page that was never checkpointed (a checkpointed key is never
//! examined again by the same job), and is counted as written, not in place. A later job
//! (another start time), or a replica real time rewrote since, counts it in place.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::allowed::AllowedBuckets;
use crate::copy::{CopyEngine, MAX_SINGLE_REQUEST, marker};
use crate::error::{Error, Result};
use crate::object_store::{ListedObject, ObjectInfo, ObjectStore, TargetPrecondition, WriteAttrs};
use crate::replicate::StoreProvider;
use crate::retry::RetryPolicy;
use crate::rule::{OnConflict, Policy, Rule};
use crate::state::RuleStore;
use crate::verify::{
    Difference, DifferenceKind, Tags, content_difference, metadata_difference, read_tags,
    replica_difference,
};

/// Where a rule's historical migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Requested, no object examined yet.
    Pending,
    /// Some segment has been worked on.
    Running,
    Completed,
    Failed,
    Paused,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Paused => "paused",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => JobState::Pending,
            "running" => JobState::Running,
            "completed" => JobState::Completed,
            "failed" => JobState::Failed,
            "paused" => JobState::Paused,
            _ => return None,
        })
    }
}

/// A rule's backfill job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub rule_id: String,
    pub state: JobState,
    /// The counting pass is over: totals are final and every segment exists.
    pub planned: bool,
    /// Counting pass position: index into the rule's prefixes, and last key counted.
    pub plan_prefix: usize,
    pub plan_after: Option<String>,
    /// Objects and bytes counted so far (final once `planned`).
    pub total_objects: u64,
    pub total_bytes: u64,
    /// Segments cut so far.
    pub segments: u32,
    pub started_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    /// Why the job is `Failed` (a permanent error: missing bucket, access denied...).
    pub last_error: Option<String>,
}

/// A key range `(start_after, end]` under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// Objects and bytes examined: `copied + fixed + in_place + skipped` objects.
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
    /// Time of the last checkpoint.
    pub updated_at: Option<DateTime<Utc>>,
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
    async fn segments(&self, rule_id: &str) -> Result<Vec<Segment>>;
    /// Takes the segment's lease if it is free or expired and the segment is not done.
    async fn claim_segment(
        &self,
        rule_id: &str,
        index: u32,
        owner: &str,
        now_ms: u64,
        until_ms: u64,
    ) -> Result<bool>;
    /// Writes a page's checkpoint and extends the lease, if `owner` still holds it.
    async fn checkpoint_segment(
        &self,
        rule_id: &str,
        index: u32,
        owner: &str,
        checkpoint: &Checkpoint,
    ) -> Result<bool>;
    /// Gives the lease up (if `owner` holds it).
    async fn release_segment(&self, rule_id: &str, index: u32, owner: &str) -> Result<()>;
}

/// Tuning of the backfill.
#[derive(Debug, Clone)]
pub struct BackfillSettings {
    /// Keys per ListObjectsV2 page, and so per checkpoint.
    pub page_size: i32,
    /// Objects per segment cut by the counting pass.
    pub segment_objects: u64,
    /// Segments worked on at once within one invocation.
    pub workers: usize,
    /// Objects copied at once within one page.
    pub copy_concurrency: usize,
    /// How long a lease lasts without a checkpoint.
    pub lease: Duration,
    /// Time kept free before the deadline: no page starts inside it.
    pub margin: Duration,
    /// Buckets this deployment may touch: a rule naming others fails its job.
    pub allowed: AllowedBuckets,
}

impl Default for BackfillSettings {
    fn default() -> Self {
        Self {
            page_size: 1000,
            segment_objects: 10_000,
            workers: 4,
            copy_concurrency: 16,
            lease: Duration::from_secs(120),
            margin: Duration::from_secs(20),
            allowed: AllowedBuckets::default(),
        }
    }
}

/// What the backfill writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Write {
    /// The whole object, bytes and metadata.
    Copy,
    /// Metadata only, onto bytes that are the source's already.
    Fix,
}

impl Write {
    fn as_str(self) -> &'static str {
        match self {
            Write::Copy => "copied",
            Write::Fix => "fixed",
        }
    }
}

/// Why the backfill leaves an object as it is although the target is not its copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Skip {
    /// A conflicting target object, kept by `on_conflict = skip`.
    ConflictKept,
    /// A conflicting target object not older than the source, kept by `on_conflict = newer`.
    TargetNewer,
    /// The source object went after it was listed: real time handles deletes.
    SourceGone,
    /// The source object is a replica of another bucket's: not replicated again.
    Replica,
    /// The target changed after the backfill looked (real time wrote it): the conditional
    /// write was refused, and the backfill yields.
    Yielded,
    /// One side went while the two were being compared: left to real time, whose event
    /// for it is in hand (`crr verify` counts such objects in flux).
    InFlux,
}

/// What the backfill should do with one source object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectPlan {
    /// Write the source object, bytes and metadata. `overwrites`: it replaces a target
    /// object that is not crr's replica of this source (a conflict `crr backfill plan`
    /// lists).
    Copy { overwrites: bool },
    /// The target holds the source's bytes, not all its metadata: rewrite only that.
    Fix { overwrites: bool },
    /// The target is a precise copy already.
    InPlace,
    /// The target is a precise copy this job wrote in a page that was never checkpointed:
    /// counted as that write.
    Written(Write),
    /// Leave the target as it is.
    Skip(Skip),
}

/// The mark the backfill leaves on what it writes (`marker::BACKFILL`): the job, by its
/// start time in epoch milliseconds, and how it wrote (`<job>/copied`, `<job>/fixed`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobMark(String);

impl JobMark {
    pub fn of(job: &Job) -> Self {
        Self(job.started_at.timestamp_millis().to_string())
    }

    fn value(&self, how: Write) -> String {
        format!("{}/{}", self.0, how.as_str())
    }

    /// How this job wrote `target`, if it did, from exactly the source state `source`
    /// (bucket, key, ETag).
    fn written(&self, rule: &Rule, source: &ListedObject, target: &ObjectInfo) -> Option<Write> {
        let m = &target.metadata;
        let key = m
            .get(marker::SOURCE_KEY)
            .and_then(|k| percent_encoding::percent_decode_str(k).decode_utf8().ok());
        let same_source = m.get(marker::SOURCE_BUCKET) == Some(&rule.source.bucket)
            && key.as_deref() == Some(source.key.as_str())
            && m.get(marker::SOURCE_ETAG) == Some(&source.etag);
        let (job, how) = m.get(marker::BACKFILL)?.rsplit_once('/')?;
        if !same_source || job != self.0 {
            return None;
        }
        [Write::Copy, Write::Fix]
            .into_iter()
            .find(|w| w.as_str() == how)
    }
}

/// True when `target` is a replica crr wrote of an object of the rule's source bucket.
fn is_own_replica(rule: &Rule, target: &ObjectInfo) -> bool {
    crate::copy::replica_source(target) == Some(rule.source.bucket.as_str())
}

/// The decision for one object (pure): from the source as listed (or as HEAD saw it),
/// the target's HEAD (`None`: no such key) and how the target differs from the source
/// (`verify::replica_difference`, or `verify::content_difference` where only the bytes
/// were compared; `None`: a precise copy). `job`: the running job, whose own unsettled
/// writes are recognised by their mark (`None` for a dry run).
pub fn plan_object(
    rule: &Rule,
    job: Option<&JobMark>,
    source: &ListedObject,
    target: Option<&ObjectInfo>,
    difference: Option<&Difference>,
) -> ObjectPlan {
    let Some(target) = target else {
        return ObjectPlan::Copy { overwrites: false };
    };
    let Some(difference) = difference else {
        return match job.and_then(|j| j.written(rule, source, target)) {
            Some(how) => ObjectPlan::Written(how),
            None => ObjectPlan::InPlace,
        };
    };
    let write = |overwrites| match difference.kind {
        DifferenceKind::Bytes => ObjectPlan::Copy { overwrites },
        DifferenceKind::Headers | DifferenceKind::Metadata | DifferenceKind::Tags => {
            ObjectPlan::Fix { overwrites }
        }
    };
    // A replica crr wrote of this source object (another version of it, or other
    // metadata) is crr's own: replacing it is no conflict.
    if is_own_replica(rule, target) {
        return write(false);
    }
    match rule.on_conflict {
        OnConflict::Overwrite => write(true),
        OnConflict::Skip => ObjectPlan::Skip(Skip::ConflictKept),
        OnConflict::Newer => match (source.last_modified, target.last_modified) {
            (Some(s), Some(t)) if s > t => write(true),
            _ => ObjectPlan::Skip(Skip::TargetNewer),
        },
    }
}

/// What examining one source object found: the plan, and what it rests on.
struct Examined {
    plan: ObjectPlan,
    /// The source as HEAD saw it, where the comparison needed it.
    source: Option<ObjectInfo>,
    /// The target as HEAD saw it (`None`: no such key, as listed or as HEAD found).
    target: Option<ObjectInfo>,
    /// Both sides' tags, where they were read.
    tags: Tags,
    difference: Option<Difference>,
}

/// Examines one listed source object against what the target listed under its key
/// (`listed`), with the requests the module documentation counts; writes nothing. Shared
/// by the backfill and its dry run.
async fn examine(
    rule: &Rule,
    job: Option<&JobMark>,
    source: &dyn ObjectStore,
    target: &dyn ObjectStore,
    object: &ListedObject,
    listed: Option<&ListedObject>,
) -> Result<Examined> {
    let mut examined = Examined {
        plan: ObjectPlan::Copy { overwrites: false },
        source: None,
        target: None,
        tags: Tags::Counted,
        difference: None,
    };
    let Some(listed) = listed else {
        return Ok(examined);
    };
    let key = object.key.as_str();
    // The source is read where the bytes are (or may be) the same, so the metadata decides;
    // and where its listing gave no ETag (some S3-compatible servers list none).
    let same_listed =
        !listed.etag.is_empty() && listed.size == object.size && listed.etag == object.etag;
    let (source_head, target_head) = if same_listed || object.etag.is_empty() {
        let (s, t) = futures::join!(source.head(key), target.head(key));
        (Some(s?), t?)
    } else {
        let t = target.head(key).await?;
        let vouched = t
            .as_ref()
            .is_some_and(|t| content_difference(object.size, &object.etag, t).is_none());
        match vouched {
            true => (Some(source.head(key).await?), t),
            false => (None, t),
        }
    };
    let Some(t) = target_head else {
        return Ok(examined); // gone since listed: written as absent
    };
    let (as_seen, difference) = match source_head {
        Some(None) => {
            examined.plan = ObjectPlan::Skip(Skip::SourceGone);
            examined.target = Some(t);
            return Ok(examined);
        }
        Some(Some(s)) => {
            // Tags are read only where nothing else differs already.
            if content_difference(s.size, &s.etag, &t).is_none()
                && metadata_difference(&s, &t).is_none()
            {
                examined.tags = match read_tags(source, target, &s, &t).await {
                    Ok(tags) => tags,
                    Err(Error::NotFound { .. }) => {
                        examined.plan = ObjectPlan::Skip(Skip::InFlux);
                        return Ok(examined);
                    }
                    Err(e) => return Err(e),
                };
            }
            let difference = replica_difference(&s, &t, &examined.tags, false);
            let as_seen = ListedObject {
                key: s.key.clone(),
                size: s.size,
                etag: s.etag.clone(),
                last_modified: s.last_modified,
            };
            examined.source = Some(s);
            (as_seen, difference)
        }
        None => (
            object.clone(),
            content_difference(object.size, &object.etag, &t),
        ),
    };
    examined.plan = plan_object(rule, job, &as_seen, Some(&t), difference.as_ref());
    examined.target = Some(t);
    examined.difference = difference;
    Ok(examined)
}

/// One object a backfill would overwrite: for `crr backfill plan`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Conflict {
    pub key: String,
    /// What differs: `bytes` (the object is copied again), or `headers`, `metadata`,
    /// `tags` (only the metadata is rewritten).
    pub reason: DifferenceKind,
    /// The first difference, in words (`etag a != b`, `content-type x != y`...).
    pub detail: String,
    pub source_size: u64,
    pub target_size: u64,
    pub source_etag: String,
    pub target_etag: String,
    pub source_last_modified: Option<DateTime<Utc>>,
    pub target_last_modified: Option<DateTime<Utc>>,
}

/// The dry run of a backfill.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DryRun {
    pub objects: u64,
    pub bytes: u64,
    /// Objects whose bytes would be written (new or overwritten), and those bytes.
    pub to_copy: u64,
    pub bytes_to_copy: u64,
    /// Objects whose target holds the same bytes but other metadata: only the metadata
    /// would be rewritten.
    pub to_fix: u64,
    /// Objects already in place: precise copies.
    pub in_place: u64,
    /// Target objects that are not crr's replicas of the source and would be replaced
    /// (copied over or fixed), in key order.
    pub overwrites: Vec<Conflict>,
    /// Conflicts left alone (`on_conflict` skip or newer).
    pub kept: u64,
}

/// Lists what a backfill of `rule` would do, writing nothing: page by page as the
/// backfill does, with the same requests (see the module documentation).
pub async fn dry_run(
    rule: &Rule,
    source: &dyn ObjectStore,
    target: &dyn ObjectStore,
    page_size: i32,
) -> Result<DryRun> {
    let mut report = DryRun::default();
    for prefix in rule.listing_prefixes() {
        let mut after: Option<String> = None;
        loop {
            let page = source
                .list_page(&prefix, after.as_deref(), page_size)
                .await?;
            let listed = match page.objects.last() {
                Some(last) => {
                    list_range(
                        target,
                        &prefix,
                        after.as_deref(),
                        &last.key,
                        keys_hint(page.objects.len(), page_size),
                        page_size,
                    )
                    .await?
                }
                None => HashMap::new(),
            };
            let verdicts = futures::stream::iter(page.objects.iter())
                .map(|o| {
                    let seen = listed.get(&o.key);
                    async move {
                        examine(rule, None, source, target, o, seen)
                            .await
                            .map(|e| (o, e))
                    }
                })
                .buffered(16)
                .collect::<Vec<_>>()
                .await;
            for verdict in verdicts {
                let (object, examined) = verdict?;
                report.objects += 1;
                report.bytes += object.size;
                let overwrites = match examined.plan {
                    ObjectPlan::Copy { overwrites } => {
                        report.to_copy += 1;
                        report.bytes_to_copy += object.size;
                        overwrites
                    }
                    ObjectPlan::Fix { overwrites } => {
                        report.to_fix += 1;
                        overwrites
                    }
                    ObjectPlan::InPlace | ObjectPlan::Written(_) => {
                        report.in_place += 1;
                        false
                    }
                    ObjectPlan::Skip(Skip::ConflictKept | Skip::TargetNewer) => {
                        report.kept += 1;
                        false
                    }
                    ObjectPlan::Skip(_) => false,
                };
                if let (true, Some(t), Some(d)) = (overwrites, examined.target, examined.difference)
                {
                    let s = examined.source.as_ref();
                    report.overwrites.push(Conflict {
                        key: object.key.clone(),
                        reason: d.kind,
                        detail: d.detail,
                        source_size: s.map_or(object.size, |s| s.size),
                        target_size: t.size,
                        source_etag: s.map_or(object.etag.clone(), |s| s.etag.clone()),
                        target_etag: t.etag,
                        source_last_modified: s.map_or(object.last_modified, |s| s.last_modified),
                        target_last_modified: t.last_modified,
                    });
                }
            }
            after = page.objects.last().map(|o| o.key.clone());
            if !page.truncated || after.is_none() {
                break;
            }
        }
    }
    Ok(report)
}

/// Keys to ask for when listing a range known to hold `objects` keys: one more, to see
/// past its end (a range listed by a whole page need not see past it).
fn keys_hint(objects: impl TryInto<i32>, page_size: i32) -> i32 {
    let page = page_size.max(1);
    objects
        .try_into()
        .map_or(page, |n: i32| n.saturating_add(1).clamp(1, page))
}

/// The objects of `store` under `prefix` after `after`, up to `last` (inclusive): one
/// listing per page of the source instead of a HEAD per object. `keys`: how many the
/// first listing asks for (the range's size when known, plus one to see past it), then
/// `page_size` each.
async fn list_range(
    store: &dyn ObjectStore,
    prefix: &str,
    after: Option<&str>,
    last: &str,
    keys: i32,
    page_size: i32,
) -> Result<HashMap<String, ListedObject>> {
    let mut found = HashMap::new();
    let mut from = after.map(str::to_string);
    let mut keys = keys;
    loop {
        let page = store.list_page(prefix, from.as_deref(), keys).await?;
        keys = page_size;
        let past_last = page.objects.last().is_none_or(|o| o.key.as_str() >= last);
        from = page.objects.last().map(|o| o.key.clone());
        for o in page.objects {
            if o.key.as_str() <= last {
                found.insert(o.key.clone(), o);
            }
        }
        if past_last || !page.truncated {
            return Ok(found);
        }
    }
}

/// When page work is cut off: enough before the deadline to release the lease and answer.
fn hard_stop(deadline: Instant) -> Instant {
    deadline
        .checked_sub(Duration::from_millis(700))
        .unwrap_or(deadline)
}

fn now_ms() -> u64 {
    u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0)
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
    /// Of `skipped`: writes given up because the target changed meanwhile (real-time
    /// replication won).
    pub yielded: u64,
    /// Replicas removed again because the source object was deleted during their copy.
    pub undone: u64,
    pub segments_finished: u64,
}

/// The backfill function's logic.
pub struct Backfiller {
    rules: Arc<dyn RuleStore>,
    jobs: Arc<dyn BackfillStore>,
    stores: Arc<dyn StoreProvider>,
    engine: CopyEngine,
    settings: BackfillSettings,
    retry: RetryPolicy,
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
        }
    }

    /// Requests (or resumes) the backfill of a rule.
    pub async fn start(&self, rule_id: &str) -> Result<Job> {
        self.rules
            .get_rule(rule_id)
            .await?
            .ok_or_else(|| Error::RuleNotFound(rule_id.to_string()))?;
        let now = Utc::now();
        let fresh = Job {
            rule_id: rule_id.to_string(),
            state: JobState::Pending,
            planned: false,
            plan_prefix: 0,
            plan_after: None,
            total_objects: 0,
            total_bytes: 0,
            segments: 0,
            started_at: now,
            updated_at: now,
            completed_at: None,
            last_error: None,
        };
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
        match self.jobs.job(rule_id).await? {
            Some(job) if job.state != JobState::Completed => {
                self.jobs.set_job_state(rule_id, JobState::Paused).await
            }
            Some(_) => Ok(()),
            None => Err(Error::invalid(
                "rule",
                format!("rule '{rule_id}' has no backfill to pause"),
            )),
        }
    }

    /// One invocation: every rule asked for (or, if none, every rule with historical sync
    /// on) gets work done until `deadline`.
    pub async fn run(
        &self,
        only: Option<&str>,
        owner: &str,
        deadline: Instant,
    ) -> Result<Vec<RunReport>> {
        let rules: Vec<Rule> = match only {
            Some(id) => vec![
                self.rules
                    .get_rule(id)
                    .await?
                    .ok_or_else(|| Error::RuleNotFound(id.to_string()))?,
            ],
            None => self
                .rules
                .list_rules()
                .await?
                .into_iter()
                .filter(|r| r.historical)
                .collect(),
        };
        let mut reports = Vec::new();
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
            let run = match self.settings.allowed.check(&rule) {
                Ok(()) => self.run_rule(&rule, job, owner, deadline).await,
                Err(e) => Err(e),
            };
            match run {
                Ok(report) => reports.push(report),
                Err(e) => {
                    // One rule's failure does not hold the others back. A permanent error
                    // fails the job (the status shows why); a transient one is retried by
                    // the next invocation from the last checkpoint.
                    tracing::error!(rule_id = %rule.id, error = %e, retryable = e.is_retryable(), "backfill of the rule failed");
                    if !e.is_retryable() {
                        self.jobs.fail_job(&rule.id, &e.to_string()).await?;
                    }
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(reports),
        }
    }

    /// Runs (or continues) only the counting pass of a rule's job, until `deadline`.
    pub async fn count(&self, rule_id: &str, deadline: Instant) -> Result<Job> {
        let rule = self
            .rules
            .get_rule(rule_id)
            .await?
            .ok_or_else(|| Error::RuleNotFound(rule_id.to_string()))?;
        let job = self.start(rule_id).await?;
        if job.planned {
            return Ok(job);
        }
        self.plan(&rule, job, deadline, None).await
    }

    fn time_left(&self, deadline: Instant) -> bool {
        Instant::now() + self.settings.margin < deadline
    }

    /// Handles one invocation: `{}` (the schedule: every rule with historical sync) or
    /// `{"rule_id": "..."}` (on demand).
    pub async fn handle(
        &self,
        payload: &serde_json::Value,
        owner: &str,
        deadline: Instant,
    ) -> Result<serde_json::Value> {
        let only = payload.get("rule_id").and_then(serde_json::Value::as_str);
        let reports = self.run(only, owner, deadline).await?;
        serde_json::to_value(reports).map_err(|e| Error::Config(format!("report: {e}")))
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
        if job.state == JobState::Pending {
            self.jobs.set_job_state(&rule.id, JobState::Running).await?;
        }
        let mark = JobMark::of(&job);
        // Copying starts with the first segment cut: the workers wait for cuts while the
        // counting pass is still going, and stop once it is over and nothing is left.
        let (cuts, counting) = tokio::sync::watch::channel(job.planned);
        let plan = async {
            if job.planned {
                return Ok(());
            }
            let planned = self.plan(rule, job, deadline, Some(&cuts)).await;
            cuts.send_replace(true);
            planned.map(|_| ())
        };
        let workers = (0..self.settings.workers.max(1))
            .map(|_| self.work(rule, &mark, owner, deadline, counting.clone()));
        let (planned, worked) = tokio::join!(plan, futures::future::join_all(workers));
        for done in worked {
            let done = done?;
            report.pages += done.pages;
            report.copied += done.copied;
            report.fixed += done.fixed;
            report.in_place += done.in_place;
            report.skipped += done.skipped;
            report.yielded += done.yielded;
            report.undone += done.undone;
            report.segments_finished += done.segments_finished;
        }
        planned?;
        let state = self.finish_if_done(rule).await?;
        report.state = state.as_str().to_string();
        Ok(report)
    }

    /// Marks the job completed once it is planned and every segment is done.
    async fn finish_if_done(&self, rule: &Rule) -> Result<JobState> {
        let Some(job) = self.jobs.job(&rule.id).await? else {
            return Ok(JobState::Pending);
        };
        if job.state == JobState::Running && job.planned {
            let segments = self.jobs.segments(&rule.id).await?;
            if segments.iter().all(|s| s.done) {
                self.jobs
                    .set_job_state(&rule.id, JobState::Completed)
                    .await?;
                return Ok(JobState::Completed);
            }
        }
        Ok(job.state)
    }

    /// The counting pass, resumable: each cut is written with the plan's position.
    async fn plan(
        &self,
        rule: &Rule,
        mut job: Job,
        deadline: Instant,
        cuts: Option<&tokio::sync::watch::Sender<bool>>,
    ) -> Result<Job> {
        let source = self.stores.store(&rule.source);
        let prefixes = rule.listing_prefixes();
        // Counted since the last cut (not yet in `job`'s totals).
        let (mut objects, mut bytes) = (0u64, 0u64);
        let mut segment_start = job.plan_after.clone();
        let mut after = job.plan_after.clone();
        while job.plan_prefix < prefixes.len() {
            if !self.time_left(deadline) {
                return Ok(job);
            }
            let prefix = &prefixes[job.plan_prefix];
            let page = source
                .list_page(prefix, after.as_deref(), self.settings.page_size)
                .await?;
            let mut cut_at: Option<String> = None;
            let mut rest_of_page = false;
            for (i, o) in page.objects.iter().enumerate() {
                objects += 1;
                bytes += o.size;
                after = Some(o.key.clone());
                if objects >= self.settings.segment_objects {
                    cut_at = Some(o.key.clone());
                    rest_of_page = i + 1 < page.objects.len();
                    break;
                }
            }
            // A cut on the prefix's very last key ends the prefix: no empty segment after it.
            if cut_at.is_some() && !rest_of_page && !page.truncated {
                cut_at = None;
            }
            let prefix_done = cut_at.is_none() && !page.truncated;
            if cut_at.is_none() && !prefix_done {
                continue;
            }
            let segment = Segment {
                index: job.segments,
                prefix: prefix.clone(),
                start_after: segment_start.clone(),
                end: cut_at.clone(),
                planned_objects: objects,
                checkpoint: None,
                done: false,
                lease_owner: None,
                lease_until: 0,
                objects_done: 0,
                bytes_done: 0,
                copied: 0,
                fixed: 0,
                in_place: 0,
                skipped: 0,
                updated_at: None,
            };
            let mut next = job.clone();
            next.segments += 1;
            next.total_objects += objects;
            next.total_bytes += bytes;
            if prefix_done {
                next.plan_prefix += 1;
                next.plan_after = None;
            } else {
                next.plan_after = cut_at.clone();
            }
            next.planned = next.plan_prefix >= prefixes.len();
            if !self
                .jobs
                .add_segment(&rule.id, &segment, &next, job.segments)
                .await?
            {
                // Another invocation is counting too and cut first: take its progress.
                return self
                    .jobs
                    .job(&rule.id)
                    .await?
                    .ok_or_else(|| Error::Config("backfill job vanished".into()));
            }
            job = next;
            if let Some(cuts) = cuts {
                cuts.send_modify(|_| ());
            }
            objects = 0;
            bytes = 0;
            segment_start = job.plan_after.clone();
            after = job.plan_after.clone();
        }
        Ok(job)
    }

    /// One worker: claims segments and works through them until none is left (and the
    /// counting pass, `counting` is `false` while it goes on, cuts no more) or time runs out.
    async fn work(
        &self,
        rule: &Rule,
        mark: &JobMark,
        owner: &str,
        deadline: Instant,
        mut counting: tokio::sync::watch::Receiver<bool>,
    ) -> Result<RunReport> {
        let mut report = RunReport::default();
        while self.time_left(deadline) {
            let counted = *counting.borrow_and_update();
            let Some(segment) = self.claim(rule, owner).await? else {
                if counted || counting.changed().await.is_err() {
                    break;
                }
                continue;
            };
            let finished = self
                .work_segment(rule, mark, segment.clone(), owner, deadline, &mut report)
                .await;
            match finished {
                Ok(true) => report.segments_finished += 1,
                Ok(false) => {
                    self.jobs
                        .release_segment(&rule.id, segment.index, owner)
                        .await?;
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

    async fn claim(&self, rule: &Rule, owner: &str) -> Result<Option<Segment>> {
        let now = now_ms();
        let mut free: Vec<Segment> = self
            .jobs
            .segments(&rule.id)
            .await?
            .into_iter()
            .filter(|s| !s.done && (s.lease_owner.is_none() || s.lease_until < now))
            .collect();
        // Spread workers over segments rather than all racing for the first one.
        fastrand::shuffle(&mut free);
        let until = now + self.settings.lease.as_millis() as u64;
        for segment in free {
            if self
                .jobs
                .claim_segment(&rule.id, segment.index, owner, now, until)
                .await?
            {
                tracing::info!(rule_id = %rule.id, segment = segment.index, owner, "segment claimed");
                return Ok(Some(segment));
            }
        }
        Ok(None)
    }

    /// Works through one segment; `Ok(true)` when it is done, `Ok(false)` when stopped
    /// early (deadline, pause, or the lease was lost).
    ///
    /// Pages are pipelined: while page N is being copied, page N+1 is listed (source and
    /// target) and page N-1 is settled (undo check, then checkpoint), so the copies never
    /// wait on a listing or a DynamoDB write. Checkpoints stay in page order, each written
    /// only after every copy of its page finished.
    async fn work_segment(
        &self,
        rule: &Rule,
        mark: &JobMark,
        segment: Segment,
        owner: &str,
        deadline: Instant,
        report: &mut RunReport,
    ) -> Result<bool> {
        let source = self.stores.store(&rule.source);
        let target = self.stores.store(&rule.target);
        let (source, target) = (source.as_ref(), target.as_ref());
        let lane = Lane {
            rule,
            mark,
            segment: &segment,
            owner,
            source,
            target,
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
            let last = page.objects.last().map(|o| o.key.clone()).or(after.clone());
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
        }))
    }

    /// Copies what a page needs, `copy_concurrency` objects at a time; each outcome
    /// (retried within the deadline) with its key.
    async fn copy_page<'p>(
        &self,
        lane: &Lane<'_>,
        page: &'p Page,
        deadline: Instant,
    ) -> Result<Vec<(&'p str, Outcome)>> {
        let copies = futures::stream::iter(page.objects.iter())
            .map(|o| {
                let seen = page.target.get(&o.key);
                async move {
                    let copied = self
                        .retry
                        .run(Some(deadline), "backfill object", move || {
                            self.backfill_object(lane, o, seen)
                        })
                        .await;
                    copied.map(|c| (o.key.as_str(), c))
                }
            })
            .buffer_unordered(self.settings.copy_concurrency.max(1))
            .collect::<Vec<_>>()
            .await;
        // An object that still fails after retries stops the segment without a
        // checkpoint: the page is examined again next time, nothing is skipped.
        copies.into_iter().collect()
    }

    /// Finishes a copied page: removes replicas whose source vanished during their copy,
    /// then writes the checkpoint. `Ok(false)` if the lease was lost.
    async fn settle(&self, lane: &Lane<'_>, done: Settle, report: &mut RunReport) -> Result<bool> {
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
        if !kept {
            tracing::warn!(rule_id = %lane.rule.id, segment = index, owner = lane.owner, "lease lost; another invocation took the segment over");
            return Ok(false);
        }
        report.pages += 1;
        report.copied += checkpoint.tally.copied;
        report.fixed += checkpoint.tally.fixed;
        report.in_place += checkpoint.tally.in_place;
        report.skipped += checkpoint.tally.skipped;
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
        let present = list_range(
            source,
            &lane.segment.prefix,
            after,
            last,
            self.keys_hint(listed),
            self.settings.page_size,
        )
        .await?;
        let mut undone = 0;
        for (key, etag) in created {
            if present.contains_key(key) || source.head(key).await?.is_some() {
                continue;
            }
            if target.head(key).await?.is_some_and(|t| t.etag == *etag) {
                tracing::info!(rule_id = %lane.rule.id, key = %key, "source deleted while the backfill copied it; replica removed");
                target.delete(key).await?;
                undone += 1;
            }
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

    /// Examines one listed object and writes what the plan says: the whole object, or its
    /// metadata only. Every write reads the source's current state (so an object real-time
    /// replication changed meanwhile is written as it is now, never as listed), and is
    /// conditional on the target being as the backfill saw it: if real-time replication
    /// wrote the key after that, the write is refused (412) and the backfill yields, so it
    /// can never revert a newer replica.
    async fn backfill_object(
        &self,
        lane: &Lane<'_>,
        object: &ListedObject,
        listed: Option<&ListedObject>,
    ) -> Result<Outcome> {
        let (rule, source, target) = (lane.rule, lane.source, lane.target);
        crate::key::check_in(source.bucket(), &object.key)?;
        let examined = examine(rule, Some(lane.mark), source, target, object, listed).await?;
        match examined.plan {
            ObjectPlan::InPlace => Ok(Outcome::InPlace),
            ObjectPlan::Written(how) => Ok(Outcome::Written(how)),
            ObjectPlan::Skip(why) => Ok(Outcome::Skipped(why)),
            ObjectPlan::Copy { .. } => self.copy(lane, &object.key, examined.target).await,
            ObjectPlan::Fix { .. } => match (examined.source, examined.target) {
                (Some(current), Some(replica)) => {
                    self.fix(lane, current, replica, examined.tags).await
                }
                (_, replica) => self.copy(lane, &object.key, replica).await,
            },
        }
    }

    /// Writes the source object `key` whole over `existing` (`None`: where there is none).
    async fn copy(
        &self,
        lane: &Lane<'_>,
        key: &str,
        existing: Option<ObjectInfo>,
    ) -> Result<Outcome> {
        let (rule, source, target) = (lane.rule, lane.source, lane.target);
        let Some((current, body)) = self.engine.read_source(rule, source, key).await? else {
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
        match self
            .engine
            .copy_with_attrs(rule, source, target, &current, body, attrs)
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
            return self.copy(lane, &current.key, Some(replica)).await;
        }
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
                self.copy(lane, &current.key, Some(replica)).await
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

/// One segment as a worker holds it: the rule, the range, the lease owner, both stores.
struct Lane<'a> {
    rule: &'a Rule,
    /// The job's mark on what it writes.
    mark: &'a JobMark,
    segment: &'a Segment,
    owner: &'a str,
    source: &'a dyn ObjectStore,
    target: &'a dyn ObjectStore,
}

/// One listed page of a segment.
struct Page {
    /// The page's objects within the segment's range.
    objects: Vec<ListedObject>,
    /// No key of the segment comes after this page.
    reached_end: bool,
    /// What the target holds over the page's keys.
    target: HashMap<String, ListedObject>,
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
                objects: page.objects.len() as u64,
                bytes: page.objects.iter().map(|o| o.size).sum(),
                ..PageTally::default()
            },
            yielded: 0,
            created: Vec::new(),
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
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use bytes::Bytes;
    use chrono::TimeZone;

    use super::*;
    use crate::memory::MemoryWorld;
    use crate::object_store::{ContentHeaders, WriteAttrs};
    use crate::rule::tests::rule;

    const ETAG: &str = "5d41402abc4b2a76b9719d911017c592";

    fn at(secs: i64) -> Option<DateTime<Utc>> {
        Utc.timestamp_opt(1_700_000_000 + secs, 0).single()
    }

    fn listed(key: &str, modified: i64) -> ListedObject {
        ListedObject {
            key: key.into(),
            size: 5,
            etag: ETAG.into(),
            last_modified: at(modified),
        }
    }

    fn info(key: &str, meta: &[(&str, &str)], modified: i64) -> ObjectInfo {
        ObjectInfo {
            key: key.into(),
            size: 5,
            etag: ETAG.into(),
            last_modified: at(modified),
            version_id: None,
            headers: ContentHeaders {
                content_type: Some("text/plain".into()),
                ..ContentHeaders::default()
            },
            metadata: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            storage_class: None,
            encryption: None,
            tag_count: 0,
        }
    }

    /// crr's markers on a replica of `src/key` at `ETAG`, written by job `job` if given.
    fn replica_markers(key: &str, job: Option<&str>) -> BTreeMap<String, String> {
        let mut m = BTreeMap::from([
            (marker::SOURCE_BUCKET.to_string(), "src".to_string()),
            (marker::SOURCE_KEY.to_string(), key.replace('/', "%2F")),
            (marker::SOURCE_ETAG.to_string(), ETAG.to_string()),
        ]);
        if let Some(job) = job {
            m.insert(marker::BACKFILL.into(), job.into());
        }
        m
    }

    fn mark() -> JobMark {
        JobMark("1700000000123".into())
    }

    /// The plan for `target` against the source `info("d/k", ...)`, decided as the backfill
    /// does: by verify's comparison.
    fn plan_for(r: &Rule, job: Option<&JobMark>, target: Option<&ObjectInfo>) -> ObjectPlan {
        let source = info("d/k", &[("color", "red")], 10);
        let difference = target.and_then(|t| replica_difference(&source, t, &Tags::Counted, false));
        plan_object(r, job, &listed("d/k", 10), target, difference.as_ref())
    }

    #[test]
    fn a_missing_target_is_copied_and_a_precise_one_is_in_place() {
        let r = rule("r", "src", "dst");
        assert_eq!(
            plan_for(&r, Some(&mark()), None),
            ObjectPlan::Copy { overwrites: false }
        );
        // Markers are crr's own and never compared; everything else is the source's.
        let mut same = info("d/k", &[("color", "red")], 20);
        same.metadata.extend(replica_markers("d/k", None));
        assert_eq!(
            plan_for(&r, Some(&mark()), Some(&same)),
            ObjectPlan::InPlace
        );
        // A user's own object that happens to be a precise copy is in place too.
        let theirs = info("d/k", &[("color", "red")], 20);
        assert_eq!(plan_for(&r, None, Some(&theirs)), ObjectPlan::InPlace);
    }

    #[test]
    fn same_bytes_with_other_headers_metadata_or_tags_is_a_conflict_fixed_under_overwrite() {
        let mut r = rule("r", "src", "dst");
        let mut other_type = info("d/k", &[("color", "red")], 20);
        other_type.headers.content_type = Some("image/png".into());
        let other_meta = info("d/k", &[("color", "blue")], 20);
        let mut tagged = info("d/k", &[("color", "red")], 20);
        tagged.tag_count = 1;
        for (target, kind) in [
            (&other_type, DifferenceKind::Headers),
            (&other_meta, DifferenceKind::Metadata),
            (&tagged, DifferenceKind::Tags),
        ] {
            let source = info("d/k", &[("color", "red")], 10);
            let found = replica_difference(&source, target, &Tags::Counted, false);
            assert_eq!(found.map(|d| d.kind), Some(kind));
            r.on_conflict = OnConflict::Overwrite;
            assert_eq!(
                plan_for(&r, Some(&mark()), Some(target)),
                ObjectPlan::Fix { overwrites: true },
                "{kind:?}"
            );
            r.on_conflict = OnConflict::Skip;
            assert_eq!(
                plan_for(&r, Some(&mark()), Some(target)),
                ObjectPlan::Skip(Skip::ConflictKept)
            );
            // The target (modified at 20) is newer than the source (10): kept.
            r.on_conflict = OnConflict::Newer;
            assert_eq!(
                plan_for(&r, Some(&mark()), Some(target)),
                ObjectPlan::Skip(Skip::TargetNewer)
            );
        }
        // An older target gives way under `newer`.
        let mut older = other_meta.clone();
        older.last_modified = at(5);
        assert_eq!(
            plan_for(&r, None, Some(&older)),
            ObjectPlan::Fix { overwrites: true }
        );
    }

    #[test]
    fn other_bytes_are_copied_whole() {
        let r = rule("r", "src", "dst");
        let mut other = info("d/k", &[("color", "red")], 20);
        other.etag = "0123456789abcdef0123456789abcdef".into();
        assert_eq!(
            plan_for(&r, None, Some(&other)),
            ObjectPlan::Copy { overwrites: true }
        );
        // Another ETag, but crr's marker vouches for the bytes (a multipart replica with
        // another part layout): only the metadata is compared.
        let mut vouched = info("d/k", &[("color", "blue")], 20);
        vouched.etag = "0123456789abcdef0123456789abcdef-2".into();
        vouched.metadata.extend(replica_markers("d/k", None));
        assert_eq!(
            plan_for(&r, None, Some(&vouched)),
            ObjectPlan::Fix { overwrites: false }
        );
    }

    #[test]
    fn crrs_own_stale_replica_is_brought_up_to_date_whatever_on_conflict_says() {
        // The source's metadata changed after the copy; its bytes did not. The marker
        // still names the source's ETag: that alone no longer counts as in place.
        let mut r = rule("r", "src", "dst");
        r.on_conflict = OnConflict::Skip;
        let mut stale = info("d/k", &[("color", "blue")], 20);
        stale.metadata.extend(replica_markers("d/k", None));
        assert_eq!(
            plan_for(&r, None, Some(&stale)),
            ObjectPlan::Fix { overwrites: false }
        );
        stale.size = 6;
        assert_eq!(
            plan_for(&r, None, Some(&stale)),
            ObjectPlan::Copy { overwrites: false }
        );
    }

    #[test]
    fn a_precise_copy_this_job_wrote_in_an_unsettled_page_counts_as_that_write() {
        let r = rule("r", "src", "dst");
        let job = mark();
        let written = |mark: &str| {
            let mut t = info("d/k", &[("color", "red")], 20);
            t.metadata.extend(replica_markers("d/k", Some(mark)));
            t
        };
        let copied = written("1700000000123/copied");
        let fixed = written("1700000000123/fixed");
        assert_eq!(
            plan_for(&r, Some(&job), Some(&copied)),
            ObjectPlan::Written(Write::Copy)
        );
        assert_eq!(
            plan_for(&r, Some(&job), Some(&fixed)),
            ObjectPlan::Written(Write::Fix)
        );
        // Another job's write, a dry run, or a marker naming another source state: in place.
        let earlier = written("1600000000000/copied");
        assert_eq!(
            plan_for(&r, Some(&job), Some(&earlier)),
            ObjectPlan::InPlace
        );
        assert_eq!(plan_for(&r, None, Some(&copied)), ObjectPlan::InPlace);
        let source = listed("d/k", 10);
        let mut other_source = copied.clone();
        other_source
            .metadata
            .insert(marker::SOURCE_BUCKET.into(), "elsewhere".into());
        assert_eq!(
            plan_object(&r, Some(&job), &source, Some(&other_source), None),
            ObjectPlan::InPlace
        );
        let mut other_key = copied.clone();
        other_key
            .metadata
            .insert(marker::SOURCE_KEY.into(), "d%2Fother".into());
        assert_eq!(
            plan_object(&r, Some(&job), &source, Some(&other_key), None),
            ObjectPlan::InPlace
        );
        let mut older_state = copied;
        older_state.metadata.insert(
            marker::SOURCE_ETAG.into(),
            "ffffffffffffffffffffffffffffffff".into(),
        );
        assert_eq!(
            plan_object(&r, Some(&job), &source, Some(&older_state), None),
            ObjectPlan::InPlace
        );
        // The mark the backfill writes is the one it recognises.
        assert_eq!(job.value(Write::Fix), "1700000000123/fixed");
    }

    async fn put(
        store: &dyn ObjectStore,
        key: &str,
        body: &'static str,
        content_type: &str,
        tags: &[(&str, &str)],
    ) {
        let attrs = WriteAttrs {
            headers: ContentHeaders {
                content_type: Some(content_type.into()),
                ..ContentHeaders::default()
            },
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..WriteAttrs::default()
        };
        store.put(key, Bytes::from(body), &attrs).await.unwrap();
    }

    #[tokio::test]
    async fn examining_reads_both_sides_only_where_the_listing_cannot_decide() {
        let world = MemoryWorld::default();
        let (src, dst) = (world.store("src"), world.store("dst"));
        let r = rule("r", "src", "dst");
        put(&src, "same", "hello", "text/plain", &[("t", "1")]).await;
        put(&dst, "same", "hello", "text/plain", &[("t", "1")]).await;
        put(&src, "retagged", "hello", "text/plain", &[("t", "1")]).await;
        put(&dst, "retagged", "hello", "text/plain", &[("t", "2")]).await;
        put(&src, "retyped", "hello", "text/plain", &[]).await;
        put(&dst, "retyped", "hello", "text/html", &[]).await;
        put(&src, "other", "hello", "text/plain", &[]).await;
        put(&dst, "other", "HELLO", "text/plain", &[]).await;
        put(&src, "new", "hello", "text/plain", &[]).await;
        let page = src.list_page("", None, 100).await.unwrap().objects;
        let target = dst.list_page("", None, 100).await.unwrap().objects;
        let mut found = BTreeMap::new();
        for o in &page {
            let seen = target.iter().find(|t| t.key == o.key);
            let e = examine(&r, Some(&mark()), &src, &dst, o, seen)
                .await
                .unwrap();
            found.insert(o.key.clone(), (e.plan, e.difference.map(|d| d.kind)));
        }
        let expected = BTreeMap::from([
            (
                "new".to_string(),
                (ObjectPlan::Copy { overwrites: false }, None),
            ),
            (
                "other".to_string(),
                (
                    ObjectPlan::Copy { overwrites: true },
                    Some(DifferenceKind::Bytes),
                ),
            ),
            (
                "retagged".to_string(),
                (
                    ObjectPlan::Fix { overwrites: true },
                    Some(DifferenceKind::Tags),
                ),
            ),
            (
                "retyped".to_string(),
                (
                    ObjectPlan::Fix { overwrites: true },
                    Some(DifferenceKind::Headers),
                ),
            ),
            ("same".to_string(), (ObjectPlan::InPlace, None)),
        ]);
        assert_eq!(found, expected);
        // The source is gone since it was listed: nothing to write.
        let same = page.iter().find(|o| o.key == "same").unwrap();
        let listed_target = target.iter().find(|t| t.key == "same");
        src.delete("same").await.unwrap();
        let e = examine(&r, None, &src, &dst, same, listed_target)
            .await
            .unwrap();
        assert_eq!(e.plan, ObjectPlan::Skip(Skip::SourceGone));
    }

    #[tokio::test]
    async fn a_dry_run_lists_metadata_conflicts_with_what_differs() {
        let world = MemoryWorld::default();
        let (src, dst) = (world.store("src"), world.store("dst"));
        put(&src, "a", "hello", "text/plain", &[]).await;
        put(&dst, "a", "hello", "text/html", &[]).await;
        put(&src, "b", "hello", "text/plain", &[]).await;
        put(&dst, "b", "hello", "text/plain", &[]).await;
        put(&src, "c", "hello", "text/plain", &[]).await;
        put(&dst, "c", "bye", "text/plain", &[]).await;
        put(&src, "d", "hello", "text/plain", &[]).await;
        let mut r = rule("r", "src", "dst");
        let report = dry_run(&r, &src, &dst, 2).await.unwrap();
        assert_eq!(
            (
                report.objects,
                report.to_copy,
                report.to_fix,
                report.in_place,
                report.kept
            ),
            (4, 2, 1, 1, 0)
        );
        let listed: Vec<(&str, DifferenceKind)> = report
            .overwrites
            .iter()
            .map(|c| (c.key.as_str(), c.reason))
            .collect();
        assert_eq!(
            listed,
            vec![("a", DifferenceKind::Headers), ("c", DifferenceKind::Bytes)]
        );
        assert_eq!(
            report.overwrites[0].detail,
            "content-type text/plain != text/html"
        );
        r.on_conflict = OnConflict::Skip;
        let report = dry_run(&r, &src, &dst, 100).await.unwrap();
        assert!(report.overwrites.is_empty());
        assert_eq!((report.to_copy, report.to_fix, report.kept), (1, 0, 2));
    }
}
