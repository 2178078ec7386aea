//! Verify: compares a rule's source and target and reports every difference (drift).
//!
//! Both sides are listed at once, prefix by prefix, and merged in key order, so memory
//! stays bounded by a few pages whatever the bucket's size. Then, per key:
//!
//! - only in the source: `missing`;
//! - only in the target: `extra` under policy `full`; under `write` the source's deletes
//!   are meant to be kept, so such keys are only counted (`extra_kept`);
//! - in both: `different` when the sizes differ; when the ETags differ, unless the
//!   replica's `crr-source-etag` marker names the source's ETag (a multipart replica with
//!   another part layout, or an SSE-KMS object, whose contents the copy verified); with
//!   `metadata` (the default), also when content headers, user metadata (crr's own
//!   markers aside) or tags differ.
//! - with `checksum`, wherever equal single-part ETags (MD5s of both contents) do not
//!   already prove the bytes equal, they are proved another way: first by the checksums
//!   S3 stores with both objects (CRC64NVME, CRC32C, CRC32, SHA-1, SHA-256; from the HEADs
//!   verify takes anyway), where both have one of the same algorithm and kind; only where
//!   they cannot be compared by reading both contents and comparing their MD5s.
//!
//! Each object on both sides is counted by the way its bytes were checked
//! ([`CheckedBy`]): `size` (the sizes differ), `etag` (ETags, or crr's marker),
//! `checksum` (stored checksums), `content` (both read); each drift says it too.
//!
//! That comparison is `replica_difference`, the one answer to "is this replica a precise
//! copy of this source": the backfill asks it too before it counts an object in place.
//! Tags are read only where HEAD's `x-amz-tagging-count` says one side has some and the
//! counts agree (`read_tags`): two untagged objects cost no tag request.
//! Not compared: ACLs (crr carries a canned ACL where both buckets allow them; reading it
//! back would cost two more requests per object), storage class and encryption (the
//! rule may set them on purpose).
//!
//! Objects that change while being compared (deleted, or overwritten between the
//! listing and the read) are counted as `in_flux`, not as drift: real-time replication
//! has their events in hand.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::copy::marker;
use crate::error::{Error, Result};
use crate::object_store::{ListedObject, ObjectInfo, ObjectStore};
use crate::rule::{Policy, Rule};

/// What to compare beyond keys, sizes and ETags.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Compare content headers, user metadata and tags (two HEADs per object present on
    /// both sides, and two tag reads where both have the same number of tags, not zero).
    pub metadata: bool,
    /// Prove the bytes equal where the ETags cannot (multipart objects, SSE-KMS,
    /// differing part layouts, replicas vouched for by their marker only): by the objects'
    /// stored checksums where comparable, else by reading both and comparing their MD5s.
    pub checksum: bool,
    /// Objects compared at once.
    pub concurrency: usize,
    /// Keys per listing page.
    pub page_size: i32,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self {
            metadata: true,
            checksum: false,
            concurrency: 16,
            page_size: 1000,
        }
    }
}

/// Kinds of drift.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftKind {
    Missing,
    Extra,
    Different,
}

impl DriftKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DriftKind::Missing => "missing",
            DriftKind::Extra => "extra",
            DriftKind::Different => "different",
        }
    }
}

/// How an object's bytes were compared with its replica's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckMethod {
    /// The sizes differ: nothing more was needed.
    Size,
    /// The ETags (MD5s of single-part contents), or the replica's `crr-source-etag` marker
    /// naming the source's ETag.
    Etag,
    /// The additional checksums S3 stores with both objects (same algorithm and kind).
    Checksum,
    /// Both contents read and their MD5s compared.
    Content,
}

impl CheckMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckMethod::Size => "size",
            CheckMethod::Etag => "etag",
            CheckMethod::Checksum => "checksum",
            CheckMethod::Content => "content",
        }
    }
}

/// Objects present on both sides, by the way their bytes were compared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckedBy {
    pub size: u64,
    pub etag: u64,
    pub checksum: u64,
    pub content: u64,
}

impl CheckedBy {
    fn count(&mut self, method: CheckMethod) {
        match method {
            CheckMethod::Size => self.size += 1,
            CheckMethod::Etag => self.etag += 1,
            CheckMethod::Checksum => self.checksum += 1,
            CheckMethod::Content => self.content += 1,
        }
    }
}

/// One difference between source and target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drift {
    pub kind: DriftKind,
    pub key: String,
    pub source_size: Option<u64>,
    pub target_size: Option<u64>,
    /// What differs, in words (`size 10 != 12`, `metadata 'color'`...).
    pub reason: String,
    /// For a key on both sides: how its bytes were compared. When `differs_in` is
    /// `bytes`, the method that found the difference; otherwise the one that found the
    /// bytes equal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_by: Option<CheckMethod>,
    /// For a key on both sides: what differs (`bytes`, `headers`, `metadata`, `tags`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub differs_in: Option<DifferenceKind>,
}

/// What part of a replica differs from its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DifferenceKind {
    /// The content: size, ETag (or crr's marker, or the checksum) tell it.
    Bytes,
    /// Content headers: type, encoding, disposition, language, cache-control, expires.
    Headers,
    /// User metadata, crr's `crr-source-*` markers aside.
    Metadata,
    Tags,
}

impl DifferenceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DifferenceKind::Bytes => "bytes",
            DifferenceKind::Headers => "headers",
            DifferenceKind::Metadata => "metadata",
            DifferenceKind::Tags => "tags",
        }
    }
}

/// The first thing found to differ between a source object and its replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Difference {
    pub kind: DifferenceKind,
    /// In words: `etag a != b`, `content-type text/plain != (none)`, `metadata 'color'`...
    pub detail: String,
}

impl Difference {
    fn new(kind: DifferenceKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
        }
    }
}

/// Both objects' tags, as far as they had to be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tags {
    /// Not read: HEAD's tag counts decide (they differ, or both are zero).
    Counted,
    /// Read from both sides (same non-zero count).
    Read {
        source: Vec<(String, String)>,
        target: Vec<(String, String)>,
    },
}

/// Totals of a verification.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifySummary {
    pub rule_id: String,
    pub source_objects: u64,
    pub source_bytes: u64,
    pub target_objects: u64,
    pub target_bytes: u64,
    /// Keys whose replica matches.
    pub matching: u64,
    pub missing: u64,
    pub missing_bytes: u64,
    pub extra: u64,
    pub extra_bytes: u64,
    pub different: u64,
    pub different_bytes: u64,
    /// Keys only in the target, kept on purpose by policy `write`.
    pub extra_kept: u64,
    /// Keys that changed while being compared (left to real-time replication).
    pub in_flux: u64,
    pub compared_metadata: bool,
    pub compared_checksums: bool,
    /// Keys on both sides (not in flux), by the way their bytes were compared.
    #[serde(default)]
    pub checked_by: CheckedBy,
}

impl VerifySummary {
    /// True when the target is not a copy of the source.
    pub fn has_drift(&self) -> bool {
        self.missing + self.extra + self.different > 0
    }
}

/// Where the verification stands, for progress displays.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub listed_source: u64,
    pub listed_target: u64,
    pub compared: u64,
}

/// The verdict on one key.
enum Verdict {
    Matching(CheckMethod),
    Drift(Drift),
    ExtraKept,
    InFlux,
}

/// Compares the rule's source and target; `on_drift` sees each difference as it is found,
/// in key order, `on_progress` every compared key.
pub async fn verify(
    rule: &Rule,
    source: Arc<dyn ObjectStore>,
    target: Arc<dyn ObjectStore>,
    options: &VerifyOptions,
    mut on_drift: impl FnMut(&Drift),
    mut on_progress: impl FnMut(Progress),
) -> Result<VerifySummary> {
    let mut summary = VerifySummary {
        rule_id: rule.id.clone(),
        compared_metadata: options.metadata,
        compared_checksums: options.checksum,
        ..VerifySummary::default()
    };
    let listed_source = Arc::new(AtomicU64::new(0));
    let listed_target = Arc::new(AtomicU64::new(0));
    let mut compared = 0u64;
    for prefix in rule.listing_prefixes() {
        let src = spawn_listing(
            Arc::clone(&source),
            prefix.clone(),
            options.page_size,
            Arc::clone(&listed_source),
        );
        let dst = spawn_listing(
            Arc::clone(&target),
            prefix,
            options.page_size,
            Arc::clone(&listed_target),
        );
        let pairs = merge(src, dst);
        let verdicts = pairs
            .map(|pair| {
                let (source, target) = (Arc::clone(&source), Arc::clone(&target));
                async move {
                    let pair = pair?;
                    let verdict = judge(rule, &*source, &*target, &pair, options).await?;
                    Ok::<_, Error>((pair, verdict))
                }
            })
            .buffered(options.concurrency.max(1));
        let mut verdicts = std::pin::pin!(verdicts);
        while let Some(next) = verdicts.next().await {
            let (pair, verdict) = next?;
            if let Some(s) = &pair.source {
                summary.source_objects += 1;
                summary.source_bytes += s.size;
            }
            if let Some(t) = &pair.target {
                summary.target_objects += 1;
                summary.target_bytes += t.size;
            }
            match verdict {
                Verdict::Matching(method) => {
                    summary.matching += 1;
                    summary.checked_by.count(method);
                }
                Verdict::ExtraKept => summary.extra_kept += 1,
                Verdict::InFlux => summary.in_flux += 1,
                Verdict::Drift(drift) => {
                    let (count, bytes) = match drift.kind {
                        DriftKind::Missing => (&mut summary.missing, &mut summary.missing_bytes),
                        DriftKind::Extra => (&mut summary.extra, &mut summary.extra_bytes),
                        DriftKind::Different => {
                            (&mut summary.different, &mut summary.different_bytes)
                        }
                    };
                    *count += 1;
                    *bytes += drift.source_size.or(drift.target_size).unwrap_or(0);
                    if let Some(method) = drift.checked_by {
                        summary.checked_by.count(method);
                    }
                    on_drift(&drift);
                }
            }
            compared += 1;
            on_progress(Progress {
                listed_source: listed_source.load(Ordering::Relaxed),
                listed_target: listed_target.load(Ordering::Relaxed),
                compared,
            });
        }
    }
    Ok(summary)
}

/// A key with what each side listed under it.
struct Pair {
    key: String,
    source: Option<ListedObject>,
    target: Option<ListedObject>,
}

/// Lists `prefix` page by page into a channel (a few pages ahead of the comparison).
fn spawn_listing(
    store: Arc<dyn ObjectStore>,
    prefix: String,
    page_size: i32,
    listed: Arc<AtomicU64>,
) -> mpsc::Receiver<Result<ListedObject>> {
    let (tx, rx) = mpsc::channel(page_size.max(1) as usize * 2);
    tokio::spawn(async move {
        let mut after: Option<String> = None;
        loop {
            let page = match store.list_page(&prefix, after.as_deref(), page_size).await {
                Ok(page) => page,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            after = page.objects.last().map(|o| o.key.clone());
            listed.fetch_add(page.objects.len() as u64, Ordering::Relaxed);
            for o in page.objects {
                // The one key validation every path applies (a server listing a key S3
                // could not hold is reported, not compared).
                let checked = crate::key::check_in(store.bucket(), &o.key).map(|()| o);
                if tx.send(checked).await.is_err() {
                    return;
                }
            }
            if !page.truncated || after.is_none() {
                return;
            }
        }
    });
    rx
}

/// Merges two key-ordered listings into pairs, in key order.
fn merge(
    source: mpsc::Receiver<Result<ListedObject>>,
    target: mpsc::Receiver<Result<ListedObject>>,
) -> impl futures::Stream<Item = Result<Pair>> {
    struct Sides {
        source: mpsc::Receiver<Result<ListedObject>>,
        target: mpsc::Receiver<Result<ListedObject>>,
        next_source: Option<ListedObject>,
        next_target: Option<ListedObject>,
        failed: bool,
    }
    let sides = Sides {
        source,
        target,
        next_source: None,
        next_target: None,
        failed: false,
    };
    futures::stream::unfold(sides, |mut s| async move {
        if s.failed {
            return None;
        }
        if s.next_source.is_none() {
            match s.source.recv().await {
                Some(Ok(o)) => s.next_source = Some(o),
                Some(Err(e)) => {
                    s.failed = true;
                    return Some((Err(e), s));
                }
                None => {}
            }
        }
        if s.next_target.is_none() {
            match s.target.recv().await {
                Some(Ok(o)) => s.next_target = Some(o),
                Some(Err(e)) => {
                    s.failed = true;
                    return Some((Err(e), s));
                }
                None => {}
            }
        }
        let pair = match (&s.next_source, &s.next_target) {
            (None, None) => return None,
            (Some(a), Some(b)) if a.key == b.key => Pair {
                key: a.key.clone(),
                source: s.next_source.take(),
                target: s.next_target.take(),
            },
            (Some(a), Some(b)) if a.key < b.key => Pair {
                key: a.key.clone(),
                source: s.next_source.take(),
                target: None,
            },
            (Some(_), Some(b)) | (None, Some(b)) => Pair {
                key: b.key.clone(),
                source: None,
                target: s.next_target.take(),
            },
            (Some(a), None) => Pair {
                key: a.key.clone(),
                source: s.next_source.take(),
                target: None,
            },
        };
        Some((Ok(pair), s))
    })
}

fn drift(kind: DriftKind, pair: &Pair, reason: impl Into<String>) -> Verdict {
    Verdict::Drift(Drift {
        kind,
        key: pair.key.clone(),
        source_size: pair.source.as_ref().map(|o| o.size),
        target_size: pair.target.as_ref().map(|o| o.size),
        reason: reason.into(),
        checked_by: None,
        differs_in: None,
    })
}

/// A `Different` drift of a key on both sides: what differs, found how.
fn different(pair: &Pair, difference: Difference, method: CheckMethod) -> Verdict {
    Verdict::Drift(Drift {
        kind: DriftKind::Different,
        key: pair.key.clone(),
        source_size: pair.source.as_ref().map(|o| o.size),
        target_size: pair.target.as_ref().map(|o| o.size),
        reason: difference.detail,
        checked_by: Some(method),
        differs_in: Some(difference.kind),
    })
}

async fn judge(
    rule: &Rule,
    source: &dyn ObjectStore,
    target: &dyn ObjectStore,
    pair: &Pair,
    options: &VerifyOptions,
) -> Result<Verdict> {
    let (s, t) = match (&pair.source, &pair.target) {
        (Some(s), Some(t)) => (s, t),
        (Some(_), None) => return Ok(drift(DriftKind::Missing, pair, "not in the target")),
        (None, _) if rule.policy == Policy::Write => return Ok(Verdict::ExtraKept),
        (None, _) => return Ok(drift(DriftKind::Extra, pair, "not in the source")),
    };
    if s.size != t.size {
        let detail = format!("size {} != {}", s.size, t.size);
        return Ok(different(
            pair,
            Difference::new(DifferenceKind::Bytes, detail),
            CheckMethod::Size,
        ));
    }
    // Some S3-compatible servers (s3s-fs) list no ETags: HEAD tells them.
    let listed_etags = !s.etag.is_empty() && !t.etag.is_empty();
    // With `checksum`, equal multipart ETags are proved by the stored checksums the HEADs
    // tell (or the contents) too.
    let need_heads = options.metadata
        || !listed_etags
        || s.etag != t.etag
        || (options.checksum && s.etag.contains('-'));
    let heads = if need_heads {
        let (a, b) = futures::join!(source.head(&pair.key), target.head(&pair.key));
        let unchanged = |info: &ObjectInfo, listed: &ListedObject| {
            info.size == listed.size && (listed.etag.is_empty() || info.etag == listed.etag)
        };
        match (a?, b?) {
            (Some(a), Some(b)) if unchanged(&a, s) && unchanged(&b, t) => Some((a, b)),
            // Changed since it was listed.
            _ => return Ok(Verdict::InFlux),
        }
    } else {
        None
    };
    let (source_etag, target_etag) = match &heads {
        Some((a, b)) => (a.etag.clone(), b.etag.clone()),
        None => (s.etag.clone(), t.etag.clone()),
    };
    // With `checksum`, the bytes are proved equal wherever equal ETags do not prove it
    // (multipart objects, other part layouts, SSE-KMS, a replica vouched for only by its
    // marker): by the stored checksums where comparable (free: the HEADs told them), else
    // by reading both contents.
    let plain_md5s = source_etag == target_etag && !source_etag.contains('-');
    let confirmed_by = if options.checksum && !plain_md5s {
        let stored = heads
            .as_ref()
            .and_then(|(a, b)| Some((a.checksum.as_ref()?, b.checksum.as_ref()?)));
        match stored.and_then(|(a, b)| Some((a.agrees_with(b)?, a, b))) {
            Some((true, _, _)) => Some(CheckMethod::Checksum),
            Some((false, a, b)) => {
                let detail = format!("checksum {a} != {b}");
                return Ok(different(
                    pair,
                    Difference::new(DifferenceKind::Bytes, detail),
                    CheckMethod::Checksum,
                ));
            }
            None => {
                let size = s.size;
                let (a, b) = futures::join!(
                    content_md5(source, &pair.key, size, &source_etag),
                    content_md5(target, &pair.key, size, &target_etag)
                );
                match changed_is_none(a, b)? {
                    None => return Ok(Verdict::InFlux),
                    Some((a, b)) if a != b => {
                        let detail = format!("content md5 {a} != {b}");
                        return Ok(different(
                            pair,
                            Difference::new(DifferenceKind::Bytes, detail),
                            CheckMethod::Content,
                        ));
                    }
                    Some(_) => Some(CheckMethod::Content),
                }
            }
        }
    } else {
        None
    };
    let method = confirmed_by.unwrap_or(CheckMethod::Etag);
    // Listed with equal ETags, and nothing more to compare.
    let Some((a, b)) = &heads else {
        return Ok(Verdict::Matching(method));
    };
    let content_confirmed = confirmed_by.is_some();
    let difference = if options.metadata {
        let tags = read_tags(source, target, a, b).await?;
        replica_difference(a, b, &tags, content_confirmed)
    } else if content_confirmed {
        None
    } else {
        content_difference(a.size, &a.etag, b)
    };
    Ok(match difference {
        Some(d) => different(pair, d, method),
        None => Verdict::Matching(method),
    })
}

/// Whether `target` is a precise copy of `source`: the first difference, in the order
/// bytes, headers, metadata, tags, or `None`. The one comparison of crr: `crr verify`
/// reports what it finds as drift, the backfill copies (or fixes) what it finds and
/// counts the rest in place. Pure: from both HEADs and the tags `read_tags` gave.
/// `content_confirmed`: the caller read both contents and found them equal, so the
/// ETags need not agree (`crr verify --checksum`).
pub fn replica_difference(
    source: &ObjectInfo,
    target: &ObjectInfo,
    tags: &Tags,
    content_confirmed: bool,
) -> Option<Difference> {
    let content = match content_confirmed {
        true => None,
        false => content_difference(source.size, &source.etag, target),
    };
    content
        .or_else(|| metadata_difference(source, target))
        .or_else(|| tags_difference(source, target, tags))
}

/// Whether the replica's bytes are the source's, as far as their HEADs tell: same size,
/// and the same ETag or a `crr-source-etag` marker naming the source's ETag (a multipart
/// replica with another part layout, or an SSE-KMS object, whose content the copy
/// verified when it wrote it).
/// `source_size` and `source_etag` may come from a listing.
pub fn content_difference(
    source_size: u64,
    source_etag: &str,
    target: &ObjectInfo,
) -> Option<Difference> {
    if source_size != target.size {
        return Some(Difference::new(
            DifferenceKind::Bytes,
            format!("size {source_size} != {}", target.size),
        ));
    }
    let vouched = || {
        target
            .metadata
            .get(marker::SOURCE_ETAG)
            .is_some_and(|e| e == source_etag)
    };
    if source_etag != target.etag && !vouched() {
        return Some(Difference::new(
            DifferenceKind::Bytes,
            format!("etag {source_etag} != {}", target.etag),
        ));
    }
    None
}

/// The first difference in content headers or user metadata (crr's markers aside).
pub fn metadata_difference(source: &ObjectInfo, target: &ObjectInfo) -> Option<Difference> {
    let (a, b) = (&source.headers, &target.headers);
    let headers = [
        ("content-type", &a.content_type, &b.content_type),
        ("content-encoding", &a.content_encoding, &b.content_encoding),
        (
            "content-disposition",
            &a.content_disposition,
            &b.content_disposition,
        ),
        ("content-language", &a.content_language, &b.content_language),
        ("cache-control", &a.cache_control, &b.cache_control),
        ("expires", &a.expires, &b.expires),
    ];
    for (name, x, y) in headers {
        if x != y {
            return Some(Difference::new(
                DifferenceKind::Headers,
                format!(
                    "{name} {} != {}",
                    x.as_deref().unwrap_or("(none)"),
                    y.as_deref().unwrap_or("(none)")
                ),
            ));
        }
    }
    let user = |m: &std::collections::BTreeMap<String, String>| {
        m.iter()
            .filter(|(k, _)| !marker::is_marker(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<Vec<_>>()
    };
    let (x, y) = (user(&source.metadata), user(&target.metadata));
    if x != y {
        let name = x
            .iter()
            .chain(y.iter())
            .find(|kv| !x.contains(kv) || !y.contains(kv))
            .map(|(k, _)| k.clone())
            .unwrap_or_default();
        return Some(Difference::new(
            DifferenceKind::Metadata,
            format!("metadata '{name}'"),
        ));
    }
    None
}

/// Whether the tags differ: by HEAD's counts, then by the tags read (in any order).
fn tags_difference(source: &ObjectInfo, target: &ObjectInfo, tags: &Tags) -> Option<Difference> {
    if source.tag_count != target.tag_count {
        return Some(Difference::new(
            DifferenceKind::Tags,
            format!("tags: {} != {}", source.tag_count, target.tag_count),
        ));
    }
    match tags {
        Tags::Counted => None,
        Tags::Read { source, target } => {
            let (mut a, mut b) = (source.clone(), target.clone());
            a.sort();
            b.sort();
            (a != b).then(|| Difference::new(DifferenceKind::Tags, "tags"))
        }
    }
}

/// Both objects' tags where HEAD's counts cannot decide (the same number, not zero);
/// otherwise no request.
pub async fn read_tags(
    source_store: &dyn ObjectStore,
    target_store: &dyn ObjectStore,
    source: &ObjectInfo,
    target: &ObjectInfo,
) -> Result<Tags> {
    if source.tag_count != target.tag_count || source.tag_count == 0 {
        return Ok(Tags::Counted);
    }
    let (a, b) = futures::join!(
        source_store.tags(&source.key),
        target_store.tags(&target.key)
    );
    Ok(Tags::Read {
        source: a?,
        target: b?,
    })
}

/// Bytes read per request when computing checksums.
const CHECKSUM_CHUNK: u64 = 8 * 1024 * 1024;

/// Both MD5s; `None` if either object changed (or went) while being read.
fn changed_is_none(a: Result<String>, b: Result<String>) -> Result<Option<(String, String)>> {
    match (a, b) {
        (Ok(a), Ok(b)) => Ok(Some((a, b))),
        (Err(Error::Precondition { .. } | Error::NotFound { .. }), _)
        | (_, Err(Error::Precondition { .. } | Error::NotFound { .. })) => Ok(None),
        (Err(e), _) | (_, Err(e)) => Err(e),
    }
}

/// MD5 of the object's content, read in ranges, each conditional on `etag`.
async fn content_md5(store: &dyn ObjectStore, key: &str, size: u64, etag: &str) -> Result<String> {
    let mut md5 = Md5::new();
    let mut start = 0;
    while start < size {
        let end = (start + CHECKSUM_CHUNK).min(size);
        let chunk = store.get(key, Some((start, end)), etag).await?;
        md5.update(&chunk);
        start = end;
    }
    Ok(md5.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum::{ChecksumAlgorithm, SentChecksum};
    use crate::memory::MemoryWorld;
    use crate::object_store::WriteAttrs;
    use crate::rule::tests::rule;
    use bytes::Bytes;

    async fn put(store: &dyn ObjectStore, key: &str, body: &str, meta: &[(&str, &str)]) {
        let attrs = WriteAttrs {
            metadata: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..WriteAttrs::default()
        };
        store
            .put(key, Bytes::from(body.to_string()), &attrs)
            .await
            .unwrap();
    }

    async fn run(
        r: &Rule,
        world: &MemoryWorld,
        options: VerifyOptions,
    ) -> (VerifySummary, Vec<Drift>) {
        let mut drifts = vec![];
        let summary = verify(
            r,
            Arc::new(world.store("src")),
            Arc::new(world.store("dst")),
            &options,
            |d| drifts.push(d.clone()),
            |_| {},
        )
        .await
        .unwrap();
        (summary, drifts)
    }

    #[tokio::test]
    async fn each_kind_of_drift_is_found_and_a_true_copy_has_none() {
        let world = MemoryWorld::default();
        let (src, dst) = (world.store("src"), world.store("dst"));
        for k in ["same", "meta", "samesize"] {
            put(&src, k, "hello", &[("color", "red")]).await;
        }
        put(&dst, "same", "hello", &[("color", "red")]).await;
        put(&dst, "meta", "hello", &[("color", "blue")]).await;
        put(&dst, "samesize", "HELLO", &[("color", "red")]).await;
        put(&src, "missing", "abc", &[]).await;
        put(&dst, "extra", "abcd", &[]).await;
        put(&src, "outside/x", "x", &[]).await;

        let mut r = rule("r", "src", "dst");
        r.prefixes = vec!["s".into(), "m".into(), "e".into()];
        let (summary, drifts) = run(&r, &world, VerifyOptions::default()).await;
        let kinds: Vec<(&str, DriftKind)> =
            drifts.iter().map(|d| (d.key.as_str(), d.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                ("extra", DriftKind::Extra),
                ("meta", DriftKind::Different),
                ("missing", DriftKind::Missing),
                ("samesize", DriftKind::Different),
            ]
        );
        assert_eq!(drifts[1].reason, "metadata 'color'");
        assert!(
            drifts[3].reason.starts_with("etag "),
            "{}",
            drifts[3].reason
        );
        assert_eq!(
            (
                summary.matching,
                summary.missing,
                summary.extra,
                summary.different
            ),
            (1, 1, 1, 2)
        );
        assert_eq!((summary.missing_bytes, summary.extra_bytes), (3, 4));
        assert!(summary.has_drift());

        // Under `write`, extra target objects are kept on purpose.
        r.policy = Policy::Write;
        let (summary, _) = run(&r, &world, VerifyOptions::default()).await;
        assert_eq!((summary.extra, summary.extra_kept), (0, 1));

        // A true copy: no drift.
        let world = MemoryWorld::default();
        for store in [world.store("src"), world.store("dst")] {
            put(&store, "a", "1", &[]).await;
            put(&store, "b/c", "22", &[("k", "v")]).await;
        }
        let (summary, drifts) =
            run(&rule("r", "src", "dst"), &world, VerifyOptions::default()).await;
        assert!(drifts.is_empty() && !summary.has_drift());
        assert_eq!(summary.matching, 2);
    }

    #[tokio::test]
    async fn tags_are_read_only_where_the_counts_cannot_tell() {
        let world = MemoryWorld::default();
        let (src, dst) = (world.store("src"), world.store("dst"));
        let tagged = |tags: &[(&str, &str)]| WriteAttrs {
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..WriteAttrs::default()
        };
        for (key, a, b) in [
            ("none", vec![], vec![]),
            ("count", vec![("t", "1")], vec![]),
            ("value", vec![("t", "1")], vec![("t", "2")]),
            (
                "order",
                vec![("a", "1"), ("b", "2")],
                vec![("b", "2"), ("a", "1")],
            ),
        ] {
            src.put(key, Bytes::from_static(b"x"), &tagged(&a))
                .await
                .unwrap();
            dst.put(key, Bytes::from_static(b"x"), &tagged(&b))
                .await
                .unwrap();
        }
        let mut found = vec![];
        for key in ["none", "count", "value", "order"] {
            let a = src.head(key).await.unwrap().unwrap();
            let b = dst.head(key).await.unwrap().unwrap();
            let tags = read_tags(&src, &dst, &a, &b).await.unwrap();
            let read = matches!(tags, Tags::Read { .. });
            let difference = replica_difference(&a, &b, &tags, false).map(|d| d.kind);
            found.push((key, read, difference));
        }
        assert_eq!(
            found,
            vec![
                ("none", false, None),
                ("count", false, Some(DifferenceKind::Tags)),
                ("value", true, Some(DifferenceKind::Tags)),
                ("order", true, None),
            ]
        );
    }

    fn checking() -> VerifyOptions {
        VerifyOptions {
            checksum: true,
            ..VerifyOptions::default()
        }
    }

    #[tokio::test]
    async fn a_replica_vouched_by_its_marker_matches_unless_the_checksum_says_otherwise() {
        let world = MemoryWorld::default();
        let (src, dst) = (world.store("src"), world.store("dst"));
        put(&src, "k", "content", &[]).await;
        let etag = src.head("k").await.unwrap().unwrap().etag;
        // Same size, another ETag, but the marker names the source's ETag (as a multipart
        // replica with another part layout would): trusted without --checksum.
        put(
            &dst,
            "k",
            "CONTENT",
            &[(marker::SOURCE_ETAG, etag.as_str())],
        )
        .await;
        let r = rule("r", "src", "dst");
        let (summary, _) = run(&r, &world, VerifyOptions::default()).await;
        assert_eq!(summary.matching, 1);
        assert_eq!(summary.checked_by.etag, 1);
        // Both carry S3's default CRC64NVME: the stored checksums tell, no byte is read.
        let (summary, drifts) = run(&r, &world, checking()).await;
        assert_eq!(summary.different, 1);
        assert!(
            drifts[0].reason.starts_with("checksum CRC64NVME "),
            "{:?}",
            drifts[0]
        );
        assert_eq!(drifts[0].checked_by, Some(CheckMethod::Checksum));
        assert_eq!(drifts[0].differs_in, Some(DifferenceKind::Bytes));
        assert_eq!(
            summary.checked_by,
            CheckedBy {
                checksum: 1,
                ..CheckedBy::default()
            }
        );
    }

    async fn put_with(store: &dyn ObjectStore, key: &str, body: &[u8], attrs: WriteAttrs) {
        store
            .put(key, Bytes::copy_from_slice(body), &attrs)
            .await
            .unwrap();
    }

    /// A two-part upload of `part` twice; returns its ETag.
    async fn put_parts(
        store: &dyn ObjectStore,
        key: &str,
        part: &[u8],
        attrs: WriteAttrs,
    ) -> String {
        let upload = store.create_multipart(key, &attrs).await.unwrap();
        let mut parts = vec![];
        for n in 1..=2 {
            let etag = store
                .upload_part(key, &upload, n, Bytes::copy_from_slice(part), None)
                .await
                .unwrap();
            parts.push(crate::object_store::UploadedPart {
                part_number: n,
                etag,
            });
        }
        store
            .complete_multipart(key, &upload, &parts, None, None)
            .await
            .unwrap()
    }

    fn sending(algorithm: ChecksumAlgorithm, meta: &[(&str, &str)]) -> WriteAttrs {
        WriteAttrs {
            checksum: SentChecksum::Compute(algorithm),
            metadata: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..WriteAttrs::default()
        }
    }

    #[tokio::test]
    async fn checksums_prove_what_etags_cannot_and_content_is_read_only_where_they_cannot_compare()
    {
        let world = MemoryWorld::default();
        let (src, dst) = (world.store("src"), world.store("dst"));
        // A multipart source (two parts) and a single-part replica: other ETags, the same
        // full-object CRC64NVME.
        let part = vec![7u8; 5 * 1024 * 1024];
        let whole = [part.clone(), part.clone()].concat();
        let multi_etag = put_parts(&src, "multi", &part, WriteAttrs::default()).await;
        put_with(
            &dst,
            "multi",
            &whole,
            sending(
                ChecksumAlgorithm::Crc64Nvme,
                &[(marker::SOURCE_ETAG, &multi_etag)],
            ),
        )
        .await;
        // The same bytes, but a composite SHA-256 (of the parts) beside a full-object
        // CRC64NVME: only the contents can tell.
        let sha_etag = put_parts(
            &src,
            "other-algo",
            &part,
            sending(ChecksumAlgorithm::Sha256, &[]),
        )
        .await;
        assert_eq!(
            src.head("other-algo")
                .await
                .unwrap()
                .unwrap()
                .checksum
                .map(|c| c.parts),
            Some(Some(2))
        );
        put_with(
            &dst,
            "other-algo",
            &whole,
            sending(
                ChecksumAlgorithm::Crc64Nvme,
                &[(marker::SOURCE_ETAG, &sha_etag)],
            ),
        )
        .await;
        // Tampered, same size, marker kept, other algorithms: the contents tell.
        put_with(
            &src,
            "tampered",
            b"abc",
            sending(ChecksumAlgorithm::Sha1, &[]),
        )
        .await;
        let etag = src.head("tampered").await.unwrap().unwrap().etag;
        put_with(
            &dst,
            "tampered",
            b"abd",
            sending(ChecksumAlgorithm::Crc32, &[(marker::SOURCE_ETAG, &etag)]),
        )
        .await;
        // Equal single-part ETags: the MD5s prove it.
        put(&src, "plain", "same", &[]).await;
        put(&dst, "plain", "same", &[]).await;
        // Another size: nothing more to compare.
        put(&src, "short", "abc", &[]).await;
        put(&dst, "short", "abcd", &[]).await;

        let r = rule("r", "src", "dst");
        let (summary, drifts) = run(&r, &world, checking()).await;
        let found: Vec<_> = drifts
            .iter()
            .map(|d| (d.key.as_str(), d.checked_by))
            .collect();
        assert_eq!(
            found,
            vec![
                ("short", Some(CheckMethod::Size)),
                ("tampered", Some(CheckMethod::Content)),
            ]
        );
        assert!(drifts[1].reason.starts_with("content md5 "), "{drifts:?}");
        assert_eq!(
            summary.checked_by,
            CheckedBy {
                size: 1,
                etag: 1,
                checksum: 1,
                content: 2,
            }
        );
        assert_eq!((summary.matching, summary.different), (3, 2));

        // Without --checksum the ETags and markers decide: the tampered replica passes.
        let (summary, drifts) = run(&r, &world, VerifyOptions::default()).await;
        assert_eq!(drifts.len(), 1, "{drifts:?}");
        assert_eq!(summary.checked_by.etag, 4);
    }

    #[test]
    fn drifts_and_summaries_of_older_versions_still_read() {
        let drift: Drift = serde_json::from_str(
            r#"{"kind":"different","key":"k","source_size":1,"target_size":1,"reason":"etag a != b"}"#,
        )
        .unwrap();
        assert_eq!(drift.checked_by, None);
        let json = serde_json::to_value(Drift {
            checked_by: Some(CheckMethod::Checksum),
            ..drift
        })
        .unwrap();
        assert_eq!(json["checked_by"], "checksum");
        assert!(json.get("differs_in").is_none());
    }
}
