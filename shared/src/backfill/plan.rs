//! What the backfill does with each listed object.
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

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;

use crate::copy::marker;
use crate::error::{Error, Result};
use crate::object_store::{ListedObject, ObjectInfo, ObjectStore};
use crate::rule::{OnConflict, Rule};
use crate::verify::{
    Difference, DifferenceKind, Tags, content_difference, metadata_difference, read_tags,
    replica_difference,
};

use super::*;

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

    pub(super) fn value(&self, how: Write) -> String {
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
pub(super) struct Examined {
    pub(super) plan: ObjectPlan,
    /// The source as HEAD saw it, where the comparison needed it.
    pub(super) source: Option<ObjectInfo>,
    /// The target as HEAD saw it (`None`: no such key, as listed or as HEAD found).
    pub(super) target: Option<ObjectInfo>,
    /// Both sides' tags, where they were read.
    pub(super) tags: Tags,
    pub(super) difference: Option<Difference>,
}

/// Examines one listed source object against what the target listed under its key
/// (`listed`), with the requests the module documentation counts; writes nothing. Shared
/// by the backfill and its dry run.
pub(super) async fn examine(
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
            // Owned objects: a closure over borrowed ones makes the future `Send` for
            // one lifetime only, and no caller could spawn the dry run.
            let verdicts = futures::stream::iter(page.objects.iter().cloned())
                .map(|o| {
                    let seen = listed.get(&o.key);
                    async move {
                        let examined = examine(rule, None, source, target, &o, seen).await;
                        examined.map(|e| (o, e))
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
pub(super) fn keys_hint(objects: impl TryInto<i32>, page_size: i32) -> i32 {
    let page = page_size.max(1);
    objects
        .try_into()
        .map_or(page, |n: i32| n.saturating_add(1).clamp(1, page))
}

/// The objects of `store` under `prefix` after `after`, up to `last` (inclusive): one
/// listing per page of the source instead of a HEAD per object. `keys`: how many the
/// first listing asks for (the range's size when known, plus one to see past it), then
/// `page_size` each.
pub(super) async fn list_range(
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
            checksum: None,
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
