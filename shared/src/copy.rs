//! The copy engine: server-side (CopyObject) or streaming (ranged GETs -> PutObject or a
//! multipart upload with a bounded number of parts in flight), every copy verified.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use md5::{Digest, Md5};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};

use crate::checksum::{ChecksumAlgorithm, SentChecksum};
use crate::error::{Error, Result};
use crate::filter::SourceState;
use crate::memory_budget::{HeldBytes, MemoryBudget};
use crate::object_store::{
    Encryption, ObjectInfo, ObjectStore, TargetPrecondition, UploadedPart, WriteAttrs,
};
use crate::resumable::{CopyRun, PartClock, Upload};
use crate::rule::{ResolvedCopyMode, Rule};

/// User-metadata names of the replica marker. They name where a replica came from, so
/// that an event about a replica is never replicated again, and keep what S3 cannot set
/// on the replica itself (the source's time of last write).
pub mod marker {
    /// Source bucket.
    pub const SOURCE_BUCKET: &str = "crr-source-bucket";
    /// Source key, percent-encoded (metadata values must be ASCII).
    pub const SOURCE_KEY: &str = "crr-source-key";
    /// Source ETag at the time of the copy.
    pub const SOURCE_ETAG: &str = "crr-source-etag";
    /// Source version id, when the source bucket is versioned.
    pub const SOURCE_VERSION: &str = "crr-source-version";
    /// Source Last-Modified (RFC 3339): the replica's own Last-Modified is the copy time.
    pub const SOURCE_LAST_MODIFIED: &str = "crr-source-last-modified";
    /// Canonical user id of the source object's owner (S3 makes the writer the owner).
    pub const SOURCE_OWNER: &str = "crr-source-owner";
    /// Written by the backfill only: which job wrote the replica and how (see
    /// `backfill::JobMark`), so a page re-examined after it was abandoned counts its
    /// writes as writes, not as objects found in place.
    pub const BACKFILL: &str = "crr-source-backfill";

    /// True for metadata names written by crr rather than by the user.
    pub fn is_marker(name: &str) -> bool {
        name.starts_with("crr-source-")
    }
}

/// Largest object a single PutObject or CopyObject may write.
pub const MAX_SINGLE_REQUEST: u64 = 5 * 1024 * 1024 * 1024;
/// How long a source bucket's ACL setting is trusted before it is read again.
const ACL_SETTING_TTL: Duration = Duration::from_secs(300);
/// S3's limit on parts per multipart upload.
const MAX_PARTS: u64 = 10_000;
/// S3's smallest part (all but the last).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;

/// Tuning of the copy engine.
#[derive(Debug, Clone)]
pub struct CopyEngine {
    /// Target buckets found to refuse ACLs (bucket owner enforced): ACLs are not sent there.
    pub acl_refused: Arc<Mutex<HashSet<String>>>,
    /// Source buckets' ACL setting, with when it was read.
    pub acl_sources: Arc<tokio::sync::Mutex<HashMap<String, (Instant, bool)>>>,
    /// Objects larger than this are streamed in parts.
    pub multipart_threshold: u64,
    /// Objects larger than this are copied server-side in parts (UploadPartCopy); up to
    /// it, one CopyObject. Higher than the stream threshold: a CopyObject moves no bytes
    /// through us and costs one request where parts cost two more than their number.
    pub server_side_threshold: u64,
    /// Size of each part (grown automatically to stay within 10,000 parts).
    pub part_size: u64,
    /// Parts transferred at once; memory in stream mode is bounded by this x `part_size`.
    pub parts_in_flight: usize,
    /// Bytes of parts a stream copy holds at once: fewer parts are in flight when the part
    /// size (the source's own, when reproduced) would exceed it; at least one always is.
    pub stream_memory: u64,
    /// The process's budget for object bytes, shared by every copy (every clone of this
    /// engine): a stream copy reserves an object's or a part's bytes before reading them.
    pub memory: MemoryBudget,
}

impl Default for CopyEngine {
    fn default() -> Self {
        Self {
            acl_refused: Arc::default(),
            acl_sources: Arc::default(),
            multipart_threshold: 64 * 1024 * 1024,
            server_side_threshold: 512 * 1024 * 1024,
            part_size: 16 * 1024 * 1024,
            parts_in_flight: 4,
            stream_memory: 128 * 1024 * 1024,
            memory: MemoryBudget::default(),
        }
    }
}

/// What a finished copy wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOutcome {
    pub bytes: u64,
    pub etag: String,
    pub method: CopyMethod,
}

/// How the bytes travelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMethod {
    ServerSide,
    ServerSideMultipart,
    StreamSingle,
    StreamMultipart,
}

/// Metadata, headers, tags, storage class and encryption to write on a replica of `info`
/// from `source_bucket`, under `rule`'s overrides.
pub fn replica_attrs(
    rule: Option<&Rule>,
    source_bucket: &str,
    info: &ObjectInfo,
    tags: Vec<(String, String)>,
) -> WriteAttrs {
    let mut metadata: BTreeMap<String, String> = info
        .metadata
        .iter()
        .filter(|(k, _)| !marker::is_marker(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.insert(marker::SOURCE_BUCKET.into(), source_bucket.into());
    metadata.insert(
        marker::SOURCE_KEY.into(),
        utf8_percent_encode(&info.key, NON_ALPHANUMERIC).to_string(),
    );
    metadata.insert(marker::SOURCE_ETAG.into(), info.etag.clone());
    if let Some(v) = &info.version_id {
        metadata.insert(marker::SOURCE_VERSION.into(), v.clone());
    }
    if let Some(t) = info.last_modified {
        metadata.insert(marker::SOURCE_LAST_MODIFIED.into(), t.to_rfc3339());
    }
    let target_key = rule.and_then(|r| r.target_kms_key_id.clone());
    // A KMS key lives in one region: SSE-KMS replicas use the rule's target-region key, or
    // the target region's `aws/s3` key when the rule names none.
    let encryption = match (&info.encryption, target_key) {
        (_, Some(key)) => Some(Encryption::Kms { key_id: Some(key) }),
        (Some(Encryption::Kms { .. }), None) => Some(Encryption::Kms { key_id: None }),
        (other, None) => other.clone(),
    };
    WriteAttrs {
        headers: info.headers.clone(),
        metadata,
        tags,
        storage_class: rule
            .and_then(|r| r.storage_class.clone())
            .or_else(|| info.storage_class.clone()),
        encryption,
        acl: None,
        precondition: None,
        checksum: SentChecksum::for_copy_of(info.checksum.as_ref()),
    }
}

/// The bucket `info` is a replica of, when crr wrote it as one (its marker names it).
pub fn replica_source(info: &ObjectInfo) -> Option<&str> {
    if !info.metadata.contains_key(marker::SOURCE_ETAG) {
        return None;
    }
    info.metadata.get(marker::SOURCE_BUCKET).map(String::as_str)
}

/// What `info`, read from `own_bucket`, is for replication out of that bucket: a replica
/// crr wrote of *another* bucket's object is not replicated again (two deployments
/// replicating into each other must not loop); an object whose marker names
/// `own_bucket` itself was restored from this rule's target (failback) and is
/// replicated like any other.
pub fn source_state<'a>(info: &'a ObjectInfo, own_bucket: &str) -> SourceState<'a> {
    match replica_source(info) {
        Some(other) if other != own_bucket => SourceState::ReplicaOf(other),
        _ => SourceState::Present,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The ETag S3 gives a multipart upload: MD5 of the parts' MD5s, then `-<parts>`.
fn multipart_etag(part_md5s: &[[u8; 16]]) -> String {
    let mut all = Md5::new();
    for d in part_md5s {
        all.update(d);
    }
    format!("{}-{}", hex(&all.finalize()), part_md5s.len())
}

fn parse_md5(etag: &str) -> Option<[u8; 16]> {
    if etag.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, chunk) in etag.as_bytes().chunks(2).enumerate() {
        let pair = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

/// Parts of a multipart copy: their size, and whether they reproduce the source's own
/// part layout (then the replica's ETag must equal the source's).
struct PartLayout {
    part_size: u64,
    matches_source: bool,
}

impl CopyEngine {
    /// Copies `info` (as HEAD or GET saw it in `source`; `body`: its content, if that GET
    /// read it) to the same key in `target` as `rule` says: its copy mode, storage class
    /// and KMS key; tags and ACL included. Reads only what is needed: tags when
    /// `x-amz-tagging-count` says there are some, the ACL only where the source bucket
    /// has ACLs turned on. A multipart copy runs within `run` (deadline, checkpoints).
    #[allow(clippy::too_many_arguments)]
    pub async fn copy_for_rule(
        &self,
        rule: &Rule,
        source: &dyn ObjectStore,
        target: &dyn ObjectStore,
        info: &ObjectInfo,
        body: Option<HeldBytes>,
        precondition: Option<TargetPrecondition>,
        run: CopyRun<'_>,
    ) -> Result<CopyOutcome> {
        let mut attrs = self
            .attrs_for_rule(rule, source, target, info, None)
            .await?;
        // Honoured by PutObject, CopyObject and CompleteMultipartUpload.
        attrs.precondition = precondition;
        self.copy_with_attrs(rule, source, target, info, body, attrs, run)
            .await
    }

    /// What a replica of `info` is written with under `rule`: `replica_attrs` with the
    /// source's tags (`tags` when the caller read them already, else read where
    /// `x-amz-tagging-count` says there are some), and the owner marker and canned ACL
    /// where the rule carries ACLs and the source bucket has them turned on.
    pub async fn attrs_for_rule(
        &self,
        rule: &Rule,
        source: &dyn ObjectStore,
        target: &dyn ObjectStore,
        info: &ObjectInfo,
        tags: Option<Vec<(String, String)>>,
    ) -> Result<WriteAttrs> {
        let tags = match tags {
            Some(tags) => tags,
            None if info.tag_count > 0 => source.tags(&info.key).await?,
            None => Vec::new(),
        };
        let mut attrs = replica_attrs(Some(rule), source.bucket(), info, tags);
        if rule.copy_acl && self.source_acls_enabled(source).await? {
            let access = source.access(&info.key).await?;
            if let Some(owner) = access.owner_id {
                attrs.metadata.insert(marker::SOURCE_OWNER.into(), owner);
            }
            if !self.refuses_acls(target.bucket()) {
                attrs.acl = access.canned_acl;
            }
        }
        Ok(attrs)
    }

    /// Copies `info` to the same key in `target` in `rule`'s copy mode, writing `attrs`
    /// (from `attrs_for_rule`), within `run`.
    #[allow(clippy::too_many_arguments)]
    pub async fn copy_with_attrs(
        &self,
        rule: &Rule,
        source: &dyn ObjectStore,
        target: &dyn ObjectStore,
        info: &ObjectInfo,
        body: Option<HeldBytes>,
        attrs: WriteAttrs,
        run: CopyRun<'_>,
    ) -> Result<CopyOutcome> {
        let mode = rule.resolved_copy_mode();
        self.with_acl_fallback(target, attrs, async |attrs: &WriteAttrs| {
            self.copy(source, target, info, body.as_ref(), attrs, mode, run)
                .await
        })
        .await
    }

    /// Gives `target`'s object `current` the metadata `attrs` (headers, user metadata,
    /// tags, ACL) without moving its bytes: a server-side copy of the object onto itself
    /// with `REPLACE`, if it is still `current` (If-Match, on both sides of the copy). For
    /// a replica that holds its source's bytes already but not all its metadata. Returns
    /// the object's new ETag; a single-part object must keep its own (checked).
    pub async fn rewrite_metadata(
        &self,
        target: &dyn ObjectStore,
        current: &ObjectInfo,
        mut attrs: WriteAttrs,
    ) -> Result<String> {
        attrs.precondition = Some(TargetPrecondition::Etag(current.etag.clone()));
        let done = self
            .with_acl_fallback(target, attrs, async |attrs: &WriteAttrs| {
                self.server_side(target, target, current, attrs).await
            })
            .await?;
        Ok(done.etag)
    }

    /// Runs `write`; if the target bucket refuses ACLs (bucket owner enforced), remembers
    /// that and writes again without the ACL.
    async fn with_acl_fallback<T>(
        &self,
        target: &dyn ObjectStore,
        mut attrs: WriteAttrs,
        write: impl AsyncFn(&WriteAttrs) -> Result<T>,
    ) -> Result<T> {
        match write(&attrs).await {
            Err(Error::AclNotSupported { .. }) if attrs.acl.is_some() => {
                tracing::warn!(bucket = %target.bucket(), "target bucket does not accept ACLs (bucket owner enforced): replicas get the bucket's own access rules");
                self.lock_refused().insert(target.bucket().to_string());
                attrs.acl = None;
                write(&attrs).await
            }
            other => other,
        }
    }

    /// The source object's current state, and in stream mode its bytes too when it is
    /// copied in one request: the bytes travel through here anyway, so one GET does what
    /// HEAD + GET did. The body is read only if the memory budget has room for it when the
    /// GET's headers tell its size (it then holds that room until dropped); else the copy
    /// waits for room and GETs it again, so no byte is read past the budget and a small
    /// object never holds more than its own size. `None` when the object is gone.
    pub async fn read_source(
        &self,
        rule: &Rule,
        source: &dyn ObjectStore,
        key: &str,
    ) -> Result<Option<(ObjectInfo, Option<HeldBytes>)>> {
        Ok(match rule.resolved_copy_mode() {
            ResolvedCopyMode::Stream => source
                .fetch(
                    key,
                    self.multipart_threshold.min(MAX_SINGLE_REQUEST),
                    &self.memory,
                )
                .await?
                .map(|f| (f.info, f.body)),
            ResolvedCopyMode::ServerSide => source.head(key).await?.map(|info| (info, None)),
        })
    }

    /// Whether `source` has ACLs turned on, asked once per bucket every
    /// `ACL_SETTING_TTL` rather than once per object. The lock is held while asking, so
    /// the events of a batch wait for one answer instead of each asking.
    async fn source_acls_enabled(&self, source: &dyn ObjectStore) -> Result<bool> {
        let bucket = source.bucket();
        let mut known = self.acl_sources.lock().await;
        if let Some((at, enabled)) = known.get(bucket)
            && at.elapsed() < ACL_SETTING_TTL
        {
            return Ok(*enabled);
        }
        let enabled = source.acls_enabled().await?;
        known.insert(bucket.to_string(), (Instant::now(), enabled));
        Ok(enabled)
    }

    /// True when `info` is copied in one request (PutObject or CopyObject) in `mode`.
    fn is_single(&self, info: &ObjectInfo, mode: ResolvedCopyMode) -> bool {
        let threshold = match mode {
            ResolvedCopyMode::Stream => self.multipart_threshold,
            ResolvedCopyMode::ServerSide => self.server_side_threshold,
        };
        info.size <= threshold && info.size <= MAX_SINGLE_REQUEST
    }

    fn lock_refused(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.acl_refused.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn refuses_acls(&self, bucket: &str) -> bool {
        self.lock_refused().contains(bucket)
    }

    /// Copies the object `info` to the same key in `target`, writing `attrs`; `body` is
    /// its content when already read. A multipart copy stops before `run`'s deadline and
    /// continues next time from its checkpoint (`resumable.rs`).
    #[allow(clippy::too_many_arguments)]
    pub async fn copy(
        &self,
        source: &dyn ObjectStore,
        target: &dyn ObjectStore,
        info: &ObjectInfo,
        body: Option<&HeldBytes>,
        attrs: &WriteAttrs,
        mode: ResolvedCopyMode,
        run: CopyRun<'_>,
    ) -> Result<CopyOutcome> {
        match (mode, self.is_single(info, mode)) {
            (ResolvedCopyMode::ServerSide, true) => {
                self.server_side(source, target, info, attrs).await
            }
            (ResolvedCopyMode::Stream, true) => {
                self.stream_single(source, target, info, body, attrs).await
            }
            (mode, false) => {
                let layout = self.layout(source, info).await?;
                self.multipart(source, target, info, attrs, mode, layout, run)
                    .await
            }
        }
    }

    /// Reproduces the source's part size when the provider tells it and it explains the
    /// source's part count; else the engine's own part size (grown to fit 10,000 parts).
    async fn layout(&self, source: &dyn ObjectStore, info: &ObjectInfo) -> Result<PartLayout> {
        let own = PartLayout {
            part_size: self
                .part_size
                .max(info.size.div_ceil(MAX_PARTS))
                .max(MIN_PART_SIZE),
            matches_source: false,
        };
        let Some(parts) = info
            .etag
            .split_once('-')
            .and_then(|(_, n)| n.parse::<u64>().ok())
        else {
            return Ok(own);
        };
        Ok(match source.first_part_size(&info.key).await? {
            Some(size) if size > 0 && info.size.div_ceil(size) == parts => PartLayout {
                part_size: size,
                matches_source: true,
            },
            _ => own,
        })
    }

    async fn server_side(
        &self,
        source: &dyn ObjectStore,
        target: &dyn ObjectStore,
        info: &ObjectInfo,
        attrs: &WriteAttrs,
    ) -> Result<CopyOutcome> {
        let etag = target
            .copy_from(source.bucket(), &info.key, &info.etag, attrs)
            .await?;
        // A server-side copy of a single-part object keeps its MD5 ETag; a multipart
        // source gets a fresh single-part ETag, which says nothing about the content.
        if etag_proves_content(info, attrs) && etag != info.etag {
            return Err(integrity(target, &info.key, &info.etag, &etag));
        }
        Ok(CopyOutcome {
            bytes: info.size,
            etag,
            method: CopyMethod::ServerSide,
        })
    }

    async fn stream_single(
        &self,
        source: &dyn ObjectStore,
        target: &dyn ObjectStore,
        info: &ObjectInfo,
        body: Option<&HeldBytes>,
        attrs: &WriteAttrs,
    ) -> Result<CopyOutcome> {
        // Bytes read here hold their room in the budget until the PUT returned.
        let (body, _room) = match body {
            Some(held) => (held.bytes().clone(), None),
            None => {
                let room = self.memory.reserve(info.size).await;
                (source.get(&info.key, None, &info.etag).await?, Some(room))
            }
        };
        if body.len() as u64 != info.size {
            return Err(Error::Integrity {
                resource: format!("s3://{}/{}", source.bucket(), info.key),
                detail: format!("read {} bytes, expected {}", body.len(), info.size),
            });
        }
        // No hash over the bytes here: the PUT carries the source's own checksum (or a
        // CRC64NVME the SDK computes), which the target checks on arrival, and a
        // single-part source's MD5 ETag must come out again as the replica's.
        let etag = target.put(&info.key, body, attrs).await?;
        if etag_proves_content(info, attrs) && etag != info.etag {
            return Err(integrity(target, &info.key, &info.etag, &etag));
        }
        Ok(CopyOutcome {
            bytes: info.size,
            etag,
            method: CopyMethod::StreamSingle,
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn multipart(
        &self,
        source: &dyn ObjectStore,
        target: &dyn ObjectStore,
        info: &ObjectInfo,
        attrs: &WriteAttrs,
        mode: ResolvedCopyMode,
        layout: PartLayout,
        run: CopyRun<'_>,
    ) -> Result<CopyOutcome> {
        // Streamed parts carry a CRC the target checks on arrival: the source's own
        // algorithm when it has a full-object CRC (then the whole replica is checked
        // against the source's value at completion), else CRC64NVME. Server-side parts
        // are S3's own copies.
        let (part_checksum, whole) = match mode {
            ResolvedCopyMode::Stream => {
                let (parts, whole) = SentChecksum::for_parts_of(info.checksum.as_ref());
                (Some(parts), whole)
            }
            ResolvedCopyMode::ServerSide => (None, None),
        };
        let attrs = &WriteAttrs {
            checksum: part_checksum.map_or(SentChecksum::None, SentChecksum::Compute),
            ..attrs.clone()
        };
        // A new upload, or the one an earlier invocation checkpointed for this same source.
        let mut upload = run
            .open(
                target,
                info,
                attrs,
                mode,
                layout.part_size,
                layout.matches_source,
            )
            .await?;
        let clock = run.clock(&upload, self.parts_at_once(layout.part_size, mode));
        let result = self
            .upload_parts(
                source,
                target,
                info,
                &mut upload,
                (mode, part_checksum, attrs.etag_is_md5()),
                &run,
                &clock,
            )
            .await;
        let (parts, digests) = match result {
            Ok(done) => done,
            // Stopped for the deadline with its state saved: the upload stays.
            Err(e) if e.continues_later() => return Err(e),
            // Leave no orphaned parts behind (unless a retry is to continue them); the
            // copy's own error is what matters.
            Err(e) => return Err(run.failed(target, &mut upload, Some(&clock), e).await),
        };
        // Completing can take as long as a part (the server assembles the object): left
        // to the next invocation, first thing, rather than cut off by the deadline.
        if !clock.may_start() {
            let resource = format!("s3://{}/{}", target.bucket(), info.key);
            return Err(run.stopped(&mut upload, &clock, &resource).await);
        }
        let upload_id = upload.state.upload_id.clone();
        let completed = target
            .complete_multipart(
                &info.key,
                &upload_id,
                &parts,
                attrs.precondition.as_ref(),
                whole.as_ref(),
            )
            .await;
        let etag = match completed {
            Ok(etag) => etag,
            // The upload is gone but the target holds what its parts make: completed by an
            // invocation that was cut off while it waited for the answer.
            Err(Error::NotFound { .. })
                if attrs.etag_is_md5()
                    && self
                        .completed_before(target, info, &digests)
                        .await
                        .unwrap_or(false) =>
            {
                multipart_etag(&digests)
            }
            Err(e) => return Err(run.failed(target, &mut upload, None, e).await),
        };
        run.forget(&upload).await;
        if attrs.etag_is_md5() {
            // Part-wise verification: the ETag S3 computed from the parts it stored must
            // be the one computed from the parts we sent (stream) or S3 reported (copy),
            // and, when the source's part layout was reproduced, the source's own ETag.
            let expected = multipart_etag(&digests);
            if etag != expected {
                return Err(integrity(target, &info.key, &expected, &etag));
            }
            if layout.matches_source && source_etag_is_md5(info) && etag != info.etag {
                return Err(integrity(target, &info.key, &info.etag, &etag));
            }
        }
        Ok(CopyOutcome {
            bytes: info.size,
            etag,
            method: match mode {
                ResolvedCopyMode::ServerSide => CopyMethod::ServerSideMultipart,
                ResolvedCopyMode::Stream => CopyMethod::StreamMultipart,
            },
        })
    }

    /// Whether `target` holds the object the parts `digests` make, written as a replica
    /// of `info` (a completion whose answer was lost).
    async fn completed_before(
        &self,
        target: &dyn ObjectStore,
        info: &ObjectInfo,
        digests: &[[u8; 16]],
    ) -> Result<bool> {
        Ok(target.head(&info.key).await?.is_some_and(|t| {
            t.etag == multipart_etag(digests)
                && t.metadata.get(marker::SOURCE_ETAG) == Some(&info.etag)
        }))
    }

    /// Parts in flight: `parts_in_flight`, fewer in stream mode where their bytes would
    /// exceed `stream_memory` (server-side parts hold no bytes here).
    fn parts_at_once(&self, part_size: u64, mode: ResolvedCopyMode) -> usize {
        let wanted = self.parts_in_flight.max(1);
        match mode {
            ResolvedCopyMode::ServerSide => wanted,
            ResolvedCopyMode::Stream => {
                let fit = usize::try_from(self.stream_memory / part_size.max(1)).unwrap_or(1);
                wanted.min(fit).max(1)
            }
        }
    }

    /// Transfers every part `upload` lacks, at most `parts_in_flight` at once, so
    /// stream-mode memory is bounded by `parts_in_flight x part_size` whatever the
    /// object's size. Parts are started only while `clock` says they can finish before the
    /// deadline; each finished part is recorded in `upload` (checkpointed now and then by
    /// `run`). Returns every part of the object, or `Error::CopyContinues` if the deadline
    /// came first.
    #[allow(clippy::too_many_arguments)]
    async fn upload_parts(
        &self,
        source: &dyn ObjectStore,
        target: &dyn ObjectStore,
        info: &ObjectInfo,
        upload: &mut Upload,
        (mode, checksum, md5_etags): (ResolvedCopyMode, Option<ChecksumAlgorithm>, bool),
        run: &CopyRun<'_>,
        clock: &PartClock,
    ) -> Result<(Vec<UploadedPart>, Vec<[u8; 16]>)> {
        let part_size = upload.state.part_size;
        let upload_id = upload.state.upload_id.clone();
        let upload_id = upload_id.as_str();
        let resource = format!("s3://{}/{}", target.bucket(), info.key);
        let mut transfers = futures::stream::iter(upload.missing())
            .take_while(|_| std::future::ready(clock.may_start()))
            .map(|i| {
                let resource = resource.clone();
                clock.bounded(async move {
                    let start = i * part_size;
                    let end = (start + part_size).min(info.size);
                    let part_number = i32::try_from(i + 1).map_err(|_| Error::Integrity {
                        resource: resource.clone(),
                        detail: "too many parts".into(),
                    })?;
                    let etag = match mode {
                        ResolvedCopyMode::ServerSide => {
                            target
                                .upload_part_copy(
                                    &info.key,
                                    upload_id,
                                    part_number,
                                    source.bucket(),
                                    (start, end),
                                    &info.etag,
                                )
                                .await?
                        }
                        ResolvedCopyMode::Stream => {
                            // The part's room in the budget, held until UploadPart returned.
                            let _room = self.memory.reserve(end - start).await;
                            let body: Bytes = source
                                .get(&info.key, Some((start, end)), &info.etag)
                                .await?;
                            if body.len() as u64 != end - start {
                                return Err(Error::Integrity {
                                    resource: format!("s3://{}/{}", source.bucket(), info.key),
                                    detail: format!(
                                        "range {start}-{end} returned {} bytes",
                                        body.len()
                                    ),
                                });
                            }
                            // The part's CRC, checked by the target on arrival, stands for
                            // the MD5 this used to compute: S3's part ETag is its MD5.
                            target
                                .upload_part(&info.key, upload_id, part_number, body, checksum)
                                .await?
                        }
                    };
                    // The parts' MD5s make the multipart ETag checked at completion; an
                    // SSE-KMS target's part ETags are not MD5s and nothing is made of them.
                    let digest = match parse_md5(&etag) {
                        Some(d) => d,
                        None if !md5_etags => [0; 16],
                        None => {
                            return Err(Error::Integrity {
                                resource: resource.clone(),
                                detail: format!("part {part_number} has ETag '{etag}', not an MD5"),
                            });
                        }
                    };
                    Ok((UploadedPart { part_number, etag }, digest))
                })
            })
            .buffer_unordered(self.parts_at_once(part_size, mode));
        while let Some(transferred) = transfers.next().await {
            match transferred {
                Some(Ok((part, digest))) => run.part_done(upload, part.part_number, digest).await?,
                Some(Err(e)) => return Err(e),
                // Cut off at the deadline: not recorded, transferred again next time.
                None => {}
            }
        }
        drop(transfers);
        if !upload.is_complete() {
            return Err(run.stopped(upload, clock, &resource).await);
        }
        Ok(upload.state.uploaded())
    }
}

/// Whether a single-request replica of `info` written with `attrs` must have `info`'s
/// ETag: both are MD5s of the content (a single-part source, neither SSE-KMS).
fn etag_proves_content(info: &ObjectInfo, attrs: &WriteAttrs) -> bool {
    !info.etag.contains('-') && source_etag_is_md5(info) && attrs.etag_is_md5()
}

/// SSE-KMS objects have ETags that are not MD5s of their content.
fn source_etag_is_md5(info: &ObjectInfo) -> bool {
    !matches!(info.encryption, Some(Encryption::Kms { .. }))
}

fn integrity(store: &dyn ObjectStore, key: &str, expected: &str, got: &str) -> Error {
    Error::Integrity {
        resource: format!("s3://{}/{}", store.bucket(), key),
        detail: format!("ETag {got} where {expected} was expected"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum::Checksum;
    use crate::memory::{MemoryObjectStore, MemoryWorld};

    async fn copy(
        engine: &CopyEngine,
        src: &MemoryObjectStore,
        dst: &MemoryObjectStore,
        info: &ObjectInfo,
        mode: ResolvedCopyMode,
    ) -> Result<CopyOutcome> {
        let tags = src.tags(&info.key).await?;
        let attrs = replica_attrs(None, src.bucket(), info, tags);
        engine
            .copy(src, dst, info, None, &attrs, mode, CopyRun::unbounded())
            .await
    }

    async fn seeded(size: usize) -> (MemoryObjectStore, ObjectInfo) {
        let src = MemoryWorld::default().store("src");
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let mut attrs = WriteAttrs::default();
        attrs.metadata.insert("owner".into(), "alice".into());
        attrs.headers.content_type = Some("text/plain".into());
        src.put("dir/a b.txt", Bytes::from(data), &attrs)
            .await
            .unwrap();
        let info = src.head("dir/a b.txt").await.unwrap().unwrap();
        (src, info)
    }

    #[tokio::test]
    async fn single_part_stream_copy_keeps_bytes_headers_and_metadata() {
        let (src, info) = seeded(1000).await;
        let dst = src.world().store("dst");
        let out = copy(
            &CopyEngine::default(),
            &src,
            &dst,
            &info,
            ResolvedCopyMode::Stream,
        )
        .await
        .unwrap();
        assert_eq!(out.method, CopyMethod::StreamSingle);
        let replica = dst.head("dir/a b.txt").await.unwrap().unwrap();
        assert_eq!(replica.etag, info.etag);
        assert_eq!(replica.headers, info.headers);
        assert_eq!(replica.metadata["owner"], "alice");
        assert_eq!(replica.metadata[marker::SOURCE_BUCKET], "src");
        assert_eq!(replica_source(&replica), Some("src"));
        assert_eq!(replica_source(&info), None);
        // Read back from the target bucket it is another bucket's replica; restored into
        // "src" (failback) it is src's own object again.
        assert_eq!(source_state(&replica, "dst"), SourceState::ReplicaOf("src"));
        assert_eq!(source_state(&replica, "src"), SourceState::Present);
        assert_eq!(source_state(&info, "src"), SourceState::Present);
        assert_eq!(dst.bytes("dir/a b.txt"), src.bytes("dir/a b.txt"));
    }

    #[tokio::test]
    async fn large_objects_go_through_multipart_with_the_s3_etag() {
        let (src, info) = seeded(12 * 1024 * 1024 + 3).await;
        let dst = src.world().store("dst");
        let out = copy(&small_parts(), &src, &dst, &info, ResolvedCopyMode::Stream)
            .await
            .unwrap();
        assert_eq!(out.method, CopyMethod::StreamMultipart);
        assert!(out.etag.ends_with("-3"), "{}", out.etag);
        assert_eq!(dst.bytes("dir/a b.txt"), src.bytes("dir/a b.txt"));
    }

    /// The source `seeded` makes, written anew with `checksum` sent (stored as S3 would).
    async fn seeded_with(
        size: usize,
        checksum: ChecksumAlgorithm,
    ) -> (MemoryObjectStore, ObjectInfo) {
        let (src, info) = seeded(size).await;
        let data = src.bytes(&info.key).unwrap();
        let attrs = WriteAttrs {
            checksum: SentChecksum::Compute(checksum),
            ..WriteAttrs::default()
        };
        src.put(&info.key, data, &attrs).await.unwrap();
        let info = src.head(&info.key).await.unwrap().unwrap();
        (src, info)
    }

    #[tokio::test]
    async fn every_copy_carries_the_source_checksum() {
        use ChecksumAlgorithm::*;
        for algorithm in [Crc64Nvme, Crc32c, Crc32, Sha1, Sha256] {
            for (size, mode) in [
                (1000, ResolvedCopyMode::Stream),
                (1000, ResolvedCopyMode::ServerSide),
                (12 * 1024 * 1024 + 3, ResolvedCopyMode::Stream),
            ] {
                let (src, info) = seeded_with(size, algorithm).await;
                let dst = src.world().store("dst");
                copy(&small_parts(), &src, &dst, &info, mode).await.unwrap();
                let replica = dst.head(&info.key).await.unwrap().unwrap();
                let (want, got) = (info.checksum.clone().unwrap(), replica.checksum.unwrap());
                assert_eq!(want.algorithm, algorithm);
                match (size > 1000, algorithm.combines()) {
                    // Streamed in parts, a CRC replica gets the whole object's checksum,
                    // checked against the source's at completion.
                    (true, true) | (false, _) => assert_eq!(got, want, "{algorithm} {mode:?}"),
                    // S3 keeps no full-object SHA of a multipart upload: its parts carry a
                    // CRC64NVME, and the replica the whole object's.
                    (true, false) => {
                        assert_eq!(got.algorithm, Crc64Nvme);
                        assert!(got.is_full_object());
                    }
                }
                assert_eq!(dst.bytes(&info.key), src.bytes(&info.key));
            }
        }
    }

    #[tokio::test]
    async fn a_copy_of_bytes_other_than_the_source_checksum_says_is_refused() {
        // The source's stored checksum names other bytes than those read (corrupted on
        // the way, or a server that stored a wrong one): the target refuses the write.
        let (src, mut info) = seeded_with(1000, ChecksumAlgorithm::Crc32c).await;
        info.checksum = Some(Checksum::compute(ChecksumAlgorithm::Crc32c, b"other bytes"));
        let dst = src.world().store("dst");
        let err = copy(
            &CopyEngine::default(),
            &src,
            &dst,
            &info,
            ResolvedCopyMode::Stream,
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("BadDigest"), "{err}");
        assert!(dst.bytes(&info.key).is_none());
        // In parts, the completion is refused the same way and no object appears.
        let (src, mut info) = seeded_with(12 * 1024 * 1024 + 3, ChecksumAlgorithm::Crc64Nvme).await;
        info.checksum = Some(Checksum::compute(
            ChecksumAlgorithm::Crc64Nvme,
            b"other bytes",
        ));
        let dst = src.world().store("dst");
        let err = copy(&small_parts(), &src, &dst, &info, ResolvedCopyMode::Stream)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("BadDigest"), "{err}");
        assert!(dst.bytes(&info.key).is_none());
    }

    #[tokio::test]
    async fn a_source_changed_mid_copy_is_a_precondition_failure() {
        let (src, mut info) = seeded(10).await;
        info.etag = "0123456789abcdef0123456789abcdef".into();
        let dst = src.world().store("dst");
        let err = copy(
            &CopyEngine::default(),
            &src,
            &dst,
            &info,
            ResolvedCopyMode::Stream,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, Error::Precondition { .. }), "{err}");
        assert!(dst.head("dir/a b.txt").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn server_side_copy_and_zero_byte_objects() {
        let (src, info) = seeded(0).await;
        let dst = src.world().store("dst");
        let out = copy(
            &CopyEngine::default(),
            &src,
            &dst,
            &info,
            ResolvedCopyMode::ServerSide,
        )
        .await
        .unwrap();
        assert_eq!(out.method, CopyMethod::ServerSide);
        assert_eq!(dst.bytes("dir/a b.txt").unwrap().len(), 0);
    }

    fn small_parts() -> CopyEngine {
        CopyEngine {
            multipart_threshold: 5 * 1024 * 1024,
            server_side_threshold: 5 * 1024 * 1024,
            part_size: 5 * 1024 * 1024,
            parts_in_flight: 3,
            ..CopyEngine::default()
        }
    }

    #[tokio::test]
    async fn server_side_multipart_copies_parts_with_upload_part_copy() {
        let (src, info) = seeded(11 * 1024 * 1024).await;
        let dst = src.world().store("dst");
        let out = copy(
            &small_parts(),
            &src,
            &dst,
            &info,
            ResolvedCopyMode::ServerSide,
        )
        .await
        .unwrap();
        assert_eq!(out.method, CopyMethod::ServerSideMultipart);
        assert!(out.etag.ends_with("-3"), "{}", out.etag);
        assert_eq!(dst.bytes("dir/a b.txt"), src.bytes("dir/a b.txt"));
    }

    #[tokio::test]
    async fn server_side_copies_stay_single_up_to_their_own_threshold() {
        // 11 MiB: above the stream threshold, below the server-side one.
        let (src, info) = seeded(11 * 1024 * 1024).await;
        let engine = CopyEngine {
            server_side_threshold: 16 * 1024 * 1024,
            ..small_parts()
        };
        let dst = src.world().store("dst");
        let out = copy(&engine, &src, &dst, &info, ResolvedCopyMode::ServerSide)
            .await
            .unwrap();
        assert_eq!(out.method, CopyMethod::ServerSide);
        assert_eq!(out.etag, info.etag);
        let dst = src.world().store("dst2");
        let out = copy(&engine, &src, &dst, &info, ResolvedCopyMode::Stream)
            .await
            .unwrap();
        assert_eq!(out.method, CopyMethod::StreamMultipart);
        assert_eq!(dst.bytes("dir/a b.txt"), src.bytes("dir/a b.txt"));
    }

    #[tokio::test]
    async fn a_multipart_source_is_copied_with_its_own_part_layout_and_etag() {
        // The source was uploaded in 6 MiB parts; the engine's own size is 5 MiB.
        let world = MemoryWorld::default();
        let src = world.store("src");
        let data: Vec<u8> = (0..13 * 1024 * 1024).map(|i| (i % 241) as u8).collect();
        let upload = src
            .create_multipart("big", &WriteAttrs::default())
            .await
            .unwrap();
        let mut parts = Vec::new();
        for (i, chunk) in data.chunks(6 * 1024 * 1024).enumerate() {
            let n = i as i32 + 1;
            let etag = src
                .upload_part("big", &upload, n, Bytes::copy_from_slice(chunk), None)
                .await
                .unwrap();
            parts.push(UploadedPart {
                part_number: n,
                etag,
            });
        }
        src.complete_multipart("big", &upload, &parts, None, None)
            .await
            .unwrap();
        let info = src.head("big").await.unwrap().unwrap();
        let dst = world.store("dst");
        for mode in [ResolvedCopyMode::Stream, ResolvedCopyMode::ServerSide] {
            let out = copy(&small_parts(), &src, &dst, &info, mode).await.unwrap();
            assert_eq!(out.etag, info.etag, "{mode:?}");
        }
    }

    #[tokio::test]
    async fn tags_storage_class_and_kms_follow_the_rule() {
        let (src, mut info) = seeded(100).await;
        info.encryption = Some(Encryption::Kms {
            key_id: Some("arn:aws:kms:us-east-1:1:key/src".into()),
        });
        let mut rule = crate::rule::tests::rule("r1", "src", "dst");
        rule.storage_class = Some("STANDARD_IA".into());
        let attrs = replica_attrs(
            Some(&rule),
            "src",
            &info,
            vec![("team".into(), "data".into())],
        );
        assert_eq!(attrs.storage_class.as_deref(), Some("STANDARD_IA"));
        // The source key is in another region: the target region's default key is used.
        assert_eq!(attrs.encryption, Some(Encryption::Kms { key_id: None }));
        rule.target_kms_key_id = Some("arn:aws:kms:eu-west-1:1:key/dst".into());
        let attrs = replica_attrs(Some(&rule), "src", &info, vec![]);
        assert_eq!(
            attrs.encryption,
            Some(Encryption::Kms {
                key_id: rule.target_kms_key_id.clone()
            })
        );
        assert!(!attrs.etag_is_md5());
        let _ = src;
    }

    #[tokio::test]
    async fn a_metadata_rewrite_keeps_the_bytes_and_refuses_a_changed_object() {
        let (src, info) = seeded(100).await;
        let mut attrs = replica_attrs(None, "src", &info, vec![("k".into(), "v".into())]);
        attrs.headers.content_type = Some("application/json".into());
        let etag = CopyEngine::default()
            .rewrite_metadata(&src, &info, attrs.clone())
            .await
            .unwrap();
        assert_eq!(etag, info.etag);
        let after = src.head(&info.key).await.unwrap().unwrap();
        assert_eq!(
            after.headers.content_type.as_deref(),
            Some("application/json")
        );
        assert_eq!(after.metadata[marker::SOURCE_ETAG], info.etag);
        assert_eq!(src.tags(&info.key).await.unwrap(), attrs.tags);
        assert_eq!(src.bytes(&info.key).unwrap().len(), 100);
        // Only the object as it was seen is rewritten.
        let mut stale = info.clone();
        stale.etag = "0123456789abcdef0123456789abcdef".into();
        let err = CopyEngine::default()
            .rewrite_metadata(&src, &stale, attrs)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Precondition { .. }), "{err}");
    }

    #[tokio::test]
    async fn conditional_writes_refuse_a_target_that_changed() {
        // As the backfill writes: only if the target is still as it saw it.
        for size in [100usize, 12 * 1024 * 1024] {
            let (src, info) = seeded(size).await;
            let dst = src.world().store("dst");
            dst.put(
                "dir/a b.txt",
                Bytes::from_static(b"written by real time"),
                &WriteAttrs::default(),
            )
            .await
            .unwrap();
            let mut attrs = replica_attrs(None, "src", &info, vec![]);
            attrs.precondition = Some(TargetPrecondition::Absent);
            let err = small_parts()
                .copy(
                    &src,
                    &dst,
                    &info,
                    None,
                    &attrs,
                    ResolvedCopyMode::Stream,
                    CopyRun::unbounded(),
                )
                .await
                .unwrap_err();
            assert!(matches!(err, Error::Precondition { .. }), "{size}: {err}");
            assert_eq!(
                dst.bytes("dir/a b.txt").unwrap(),
                Bytes::from_static(b"written by real time")
            );
        }
    }
}
