//! Resumable large copies: a multipart copy that outlasts its invocation continues in the
//! next one instead of starting from zero.
//!
//! - **Checkpoint.** The upload's state ([`UploadState`]: upload id, part size, the parts
//!   done with their MD5s, the source ETag, the copy mode, a digest of what the replica is
//!   written with) is saved through the [`UploadStore`] port (DynamoDB in `dynamo.rs`,
//!   memory in `memory.rs`), batched by time: at most one write every
//!   [`CHECKPOINT_EVERY`] while parts complete, one when the copy stops for its deadline
//!   or a transient failure, and a delete when it completes or is abandoned. A copy that
//!   finishes within [`CHECKPOINT_EVERY`] writes nothing. A crash (the process killed)
//!   loses at most the parts of the last [`CHECKPOINT_EVERY`].
//! - **Deadline.** Near the invocation's deadline ([`CopyRun::deadline`]) no part is
//!   started that would not finish [`CopyRun::reserve`] before it (judged by the slowest
//!   part seen so far, kept in the checkpoint); parts in flight are waited for until then
//!   and dropped after (not recorded); the state is saved and the copy returns
//!   [`Error::CopyContinues`], retryable.
//! - **Resume.** The next copy of the same key (same rule, same writer) continues the
//!   saved upload if the source ETag, size, mode, part size and written attributes are
//!   unchanged, uploading only the parts not done; otherwise it aborts the old upload,
//!   deletes its state and starts over.
//! - **Orphans.** Uploads are aborted when the source changed (above), when the copy fails
//!   for good, and when the rule is deleted ([`abort_recorded`], from `rule_admin`). What
//!   no record names (a process killed before its first checkpoint) is left to the target
//!   bucket's AbortIncompleteMultipartUpload lifecycle rule (docs/deploy.md); records
//!   expire by TTL after [`UPLOAD_TTL_DAYS`] without a checkpoint.
//!
//! A part's ETag is the hex MD5 of its bytes in both modes (the copy engine checks it:
//! stream parts against their computed MD5, copied parts must report an MD5), so the
//! record keeps the 16-byte digests and derives the ETags: 20 bytes per part, 200 KB for
//! S3's 10,000 parts, within DynamoDB's 400 KB item.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use md5::{Digest, Md5};

use crate::error::{Error, Result};
use crate::object_store::{ObjectInfo, ObjectStore, UploadedPart, WriteAttrs};
use crate::rule::ResolvedCopyMode;

/// Least time between two checkpoints of one upload while its parts complete.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);
/// Days an upload record outlives its last checkpoint (its TTL); the target bucket's
/// lifecycle rule aborts the upload itself after as many days.
pub const UPLOAD_TTL_DAYS: i64 = 7;
/// Time kept free before the deadline by default: parts in flight are given up then, so
/// that the checkpoint and the invocation's answer still fit.
pub const DEFAULT_RESERVE: Duration = Duration::from_millis(1500);

/// Who writes the replica: real time and the backfill keep separate records of the same
/// key, since they write different attributes (the backfill marks its writes) and must
/// not take each other's upload for a changed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    Realtime,
    Backfill,
}

impl Writer {
    pub fn as_str(self) -> &'static str {
        match self {
            Writer::Realtime => "realtime",
            Writer::Backfill => "backfill",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "realtime" => Some(Writer::Realtime),
            "backfill" => Some(Writer::Backfill),
            _ => None,
        }
    }
}

/// The copy mode as a record stores it.
pub fn mode_str(mode: ResolvedCopyMode) -> &'static str {
    match mode {
        ResolvedCopyMode::ServerSide => "server_side",
        ResolvedCopyMode::Stream => "stream",
    }
}

/// The copy mode stored in a record.
pub fn parse_mode(s: &str) -> Option<ResolvedCopyMode> {
    match s {
        "server_side" => Some(ResolvedCopyMode::ServerSide),
        "stream" => Some(ResolvedCopyMode::Stream),
        _ => None,
    }
}

/// A multipart copy in progress, as checkpointed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadState {
    pub rule_id: String,
    pub writer: Writer,
    /// Target key (the source's).
    pub key: String,
    pub upload_id: String,
    /// The source object being copied: its ETag and size.
    pub source_etag: String,
    pub size: u64,
    pub part_size: u64,
    pub mode: ResolvedCopyMode,
    /// Whether the part layout is the source's own (then the replica's ETag must be its).
    pub matches_source: bool,
    /// Digest of the attributes the upload was created with ([`attrs_digest`]).
    pub attrs: String,
    /// Parts done: part number -> MD5 of its bytes (its ETag in hex).
    pub parts: BTreeMap<i32, [u8; 16]>,
    /// Slowest part seen, in milliseconds: how long before its deadline an invocation
    /// stops starting parts.
    pub slowest_part_ms: u64,
    /// Invocations that worked on the upload, this one included.
    pub invocations: u32,
    pub started_at: DateTime<Utc>,
}

impl UploadState {
    /// Parts in the whole object.
    pub fn part_count(&self) -> u64 {
        self.size.div_ceil(self.part_size.max(1)).max(1)
    }

    /// Whether this upload can be continued to copy `info` as described: the same source
    /// object (ETag and size), copied the same way, written with the same attributes.
    pub fn continues(
        &self,
        info: &ObjectInfo,
        mode: ResolvedCopyMode,
        part_size: u64,
        attrs: &str,
    ) -> bool {
        self.source_etag == info.etag
            && self.size == info.size
            && self.mode == mode
            && self.part_size == part_size
            && self.attrs == attrs
    }

    /// The parts done, in order, as CompleteMultipartUpload lists them, with their MD5s.
    pub fn uploaded(&self) -> (Vec<UploadedPart>, Vec<[u8; 16]>) {
        self.parts
            .iter()
            .map(|(n, md5)| {
                (
                    UploadedPart {
                        part_number: *n,
                        etag: hex(md5),
                    },
                    *md5,
                )
            })
            .unzip()
    }

    /// The parts done, packed: per part its number (4 bytes, big-endian) and MD5.
    pub fn packed_parts(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.parts.len() * 20);
        for (n, md5) in &self.parts {
            out.extend_from_slice(&n.to_be_bytes());
            out.extend_from_slice(md5);
        }
        out
    }

    /// Reads what [`UploadState::packed_parts`] wrote.
    pub fn unpack_parts(packed: &[u8]) -> Result<BTreeMap<i32, [u8; 16]>> {
        if !packed.len().is_multiple_of(20) {
            return Err(Error::Config(format!(
                "upload record: parts of {} bytes, not a multiple of 20",
                packed.len()
            )));
        }
        Ok(packed
            .chunks_exact(20)
            .map(|c| {
                let mut n = [0u8; 4];
                let mut md5 = [0u8; 16];
                n.copy_from_slice(&c[..4]);
                md5.copy_from_slice(&c[4..]);
                (i32::from_be_bytes(n), md5)
            })
            .collect())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Digest of what a replica is written with (headers, metadata, tags, storage class,
/// encryption, ACL; not the write's precondition, which each invocation decides anew).
pub fn attrs_digest(attrs: &WriteAttrs) -> String {
    let mut written = attrs.clone();
    written.precondition = None;
    hex(&Md5::digest(format!("{written:?}").as_bytes()))
}

/// Where multipart copies in progress are recorded (the port).
#[async_trait]
pub trait UploadStore: Send + Sync {
    /// The record of `writer`'s upload of `key` under `rule_id`, if any.
    async fn load_upload(
        &self,
        rule_id: &str,
        writer: Writer,
        key: &str,
    ) -> Result<Option<UploadState>>;

    /// Writes (replaces) the record, with a fresh TTL.
    async fn save_upload(&self, state: &UploadState) -> Result<()>;

    /// Removes the record; removing a missing one is not an error.
    async fn delete_upload(&self, rule_id: &str, writer: Writer, key: &str) -> Result<()>;

    /// Every record of the rule.
    async fn uploads(&self, rule_id: &str) -> Result<Vec<UploadState>>;
}

/// Where a message whose copy continues goes to be delivered again (the port; SQS in
/// `dead_letter.rs`): a fresh message, so that progress never counts as a failed receive
/// towards the queue's maxReceiveCount, and visible at once rather than after the
/// visibility timeout.
#[async_trait]
pub trait Continuations: Send + Sync {
    /// Sends `body` again as a new message.
    async fn continue_later(&self, body: &str) -> Result<()>;
}

/// What one invocation's copy may spend and where it keeps its progress.
#[derive(Clone, Copy)]
pub struct CopyRun<'a> {
    /// Where progress is saved; `None`: nowhere, and a copy stopped for its deadline
    /// aborts its upload (nothing is left behind, nothing is resumed).
    pub uploads: Option<&'a dyn UploadStore>,
    pub rule_id: &'a str,
    pub writer: Writer,
    /// When the invocation ends.
    pub deadline: Option<Instant>,
    /// Time kept free before `deadline` for the checkpoint and the answer.
    pub reserve: Duration,
}

impl<'a> CopyRun<'a> {
    /// No deadline, no record: the copy runs to its end (CLI, tests).
    pub fn unbounded() -> CopyRun<'static> {
        CopyRun {
            uploads: None,
            rule_id: "",
            writer: Writer::Realtime,
            deadline: None,
            reserve: DEFAULT_RESERVE,
        }
    }

    /// A copy for `rule_id` by `writer` until `deadline`, recorded in `uploads`.
    pub fn new(
        uploads: Option<&'a dyn UploadStore>,
        rule_id: &'a str,
        writer: Writer,
        deadline: Option<Instant>,
    ) -> Self {
        CopyRun {
            uploads,
            rule_id,
            writer,
            deadline,
            reserve: DEFAULT_RESERVE,
        }
    }

    /// When parts in flight are given up.
    fn finish_by(&self) -> Option<Instant> {
        self.deadline
            .map(|d| d.checked_sub(self.reserve).unwrap_or(d))
    }

    /// The upload to copy `info` with: the recorded one if it continues (same source, mode,
    /// part size, attributes), else a new one (a recorded upload that does not continue
    /// is aborted and its record deleted first).
    pub async fn open(
        &self,
        target: &dyn ObjectStore,
        info: &ObjectInfo,
        attrs: &WriteAttrs,
        mode: ResolvedCopyMode,
        part_size: u64,
        matches_source: bool,
    ) -> Result<Upload> {
        let digest = attrs_digest(attrs);
        if let Some(store) = self.uploads
            && let Some(mut saved) = store
                .load_upload(self.rule_id, self.writer, &info.key)
                .await?
        {
            if saved.continues(info, mode, part_size, &digest) {
                saved.invocations += 1;
                tracing::info!(
                    rule_id = %self.rule_id, key = %info.key, upload_id = %saved.upload_id,
                    parts_done = saved.parts.len(), parts = saved.part_count(),
                    invocation = saved.invocations, "multipart copy resumed"
                );
                return Ok(Upload {
                    recorded: true,
                    progressed: 0,
                    state: saved,
                    last_saved: Instant::now(),
                });
            }
            tracing::info!(
                rule_id = %self.rule_id, key = %info.key, upload_id = %saved.upload_id,
                recorded_etag = %saved.source_etag, etag = %info.etag,
                "recorded multipart copy is of another source state; aborted, starting over"
            );
            abort_quietly(target, &saved.key, &saved.upload_id).await;
            store
                .delete_upload(self.rule_id, self.writer, &info.key)
                .await?;
        }
        let upload_id = target.create_multipart(&info.key, attrs).await?;
        Ok(Upload {
            recorded: false,
            progressed: 0,
            last_saved: Instant::now(),
            state: UploadState {
                rule_id: self.rule_id.to_string(),
                writer: self.writer,
                key: info.key.clone(),
                upload_id,
                source_etag: info.etag.clone(),
                size: info.size,
                part_size,
                mode,
                matches_source,
                attrs: digest,
                parts: BTreeMap::new(),
                slowest_part_ms: 0,
                invocations: 1,
                started_at: Utc::now(),
            },
        })
    }

    /// Times the parts of `upload`, `wave` at a time, against the deadline.
    pub fn clock(&self, upload: &Upload, wave: usize) -> PartClock {
        PartClock {
            finish_by: self.finish_by(),
            wave,
            times: Mutex::new(PartTimes {
                remembered_ms: upload.state.slowest_part_ms,
                slowest_here_ms: None,
                started: 0,
            }),
        }
    }

    /// Records a finished part; checkpoints if the last one is [`CHECKPOINT_EVERY`] old.
    pub async fn part_done(&self, upload: &mut Upload, part: i32, md5: [u8; 16]) -> Result<()> {
        upload.state.parts.insert(part, md5);
        upload.progressed += 1;
        if upload.last_saved.elapsed() >= CHECKPOINT_EVERY {
            self.save(upload).await?;
        }
        Ok(())
    }

    /// Saves the upload's state now (if there is a store).
    pub async fn save(&self, upload: &mut Upload) -> Result<()> {
        if let Some(store) = self.uploads {
            store.save_upload(&upload.state).await?;
            upload.recorded = true;
            upload.last_saved = Instant::now();
        }
        Ok(())
    }

    /// The parts loop ended with parts missing: the deadline came. With a store, the state
    /// is saved and the copy continues next time (`Error::CopyContinues`) if this
    /// invocation finished a part, else it is a transient failure (a part takes longer
    /// than an invocation has left); without a store, a transient failure (the caller
    /// aborts the upload).
    pub async fn stopped(&self, upload: &mut Upload, clock: &PartClock, resource: &str) -> Error {
        upload.state.slowest_part_ms = clock.slowest_ms();
        let (done, parts) = (upload.state.parts.len() as u64, upload.state.part_count());
        let no_time = |detail: String| Error::Transient {
            operation: "UploadPart",
            resource: resource.to_string(),
            detail: detail.clone(),
            throttled: false,
            source: detail.into(),
        };
        if self.uploads.is_none() {
            return no_time(format!(
                "deadline reached with {done} of {parts} parts done; nowhere to record them"
            ));
        }
        if let Err(e) = self.save(upload).await {
            return e;
        }
        tracing::info!(
            rule_id = %self.rule_id, key = %upload.state.key, upload_id = %upload.state.upload_id,
            parts_done = done, parts, this_invocation = upload.progressed,
            slowest_part_ms = upload.state.slowest_part_ms, "deadline: multipart copy checkpointed, continues next invocation"
        );
        if upload.progressed == 0 {
            return no_time(format!(
                "no part finished before the deadline ({done} of {parts} done; slowest part {} ms)",
                upload.state.slowest_part_ms
            ));
        }
        Error::CopyContinues {
            resource: resource.to_string(),
            parts_done: done,
            parts,
        }
    }

    /// The copy failed with `error` before completing: a transient failure keeps the
    /// upload and its state for the retry (which continues it); anything else aborts the
    /// upload and deletes its record. Returns `error`.
    pub async fn failed(
        &self,
        target: &dyn ObjectStore,
        upload: &mut Upload,
        clock: Option<&PartClock>,
        error: Error,
    ) -> Error {
        let keep = matches!(error, Error::Transient { .. }) && self.uploads.is_some();
        if keep {
            if let Some(clock) = clock {
                upload.state.slowest_part_ms = clock.slowest_ms();
            }
            match self.save(upload).await {
                Ok(()) => return error,
                Err(e) => {
                    tracing::warn!(key = %upload.state.key, error = %e, "multipart state not saved; upload aborted")
                }
            }
        }
        self.abandon(target, upload).await;
        error
    }

    /// Aborts the upload and deletes its record (if it has one).
    pub async fn abandon(&self, target: &dyn ObjectStore, upload: &Upload) {
        abort_quietly(target, &upload.state.key, &upload.state.upload_id).await;
        self.forget(upload).await;
    }

    /// Deletes the upload's record, if it was ever written (a completed copy).
    pub async fn forget(&self, upload: &Upload) {
        if let (Some(store), true) = (self.uploads, upload.recorded)
            && let Err(e) = store
                .delete_upload(self.rule_id, self.writer, &upload.state.key)
                .await
        {
            // It expires by its TTL; a later copy of the key finds it stale or continues it.
            tracing::warn!(key = %upload.state.key, error = %e, "multipart record not deleted");
        }
    }
}

/// One multipart upload as a copy holds it.
pub struct Upload {
    pub state: UploadState,
    /// A record of it exists (loaded, or saved by this copy).
    recorded: bool,
    /// Parts this invocation finished.
    pub progressed: u64,
    last_saved: Instant,
}

impl Upload {
    /// Part indices (from 0) still to transfer.
    pub fn missing(&self) -> Vec<u64> {
        (0..self.state.part_count())
            .filter(|i| {
                i32::try_from(i + 1)
                    .map(|n| !self.state.parts.contains_key(&n))
                    .unwrap_or(true)
            })
            .collect()
    }

    /// Every part is done.
    pub fn is_complete(&self) -> bool {
        self.state.parts.len() as u64 == self.state.part_count()
    }
}

/// Decides, as parts come and go, whether another part may start before the deadline.
///
/// A part starts if the slowest part this invocation finished (before any finished: the
/// one the checkpoint remembers) would still finish before the cut-off. The first wave
/// (`wave` parts) of an invocation always starts, so that an outlier remembered from an
/// earlier invocation can never keep every later one from trying: at worst one wave per
/// invocation is cut off and transferred again.
pub struct PartClock {
    finish_by: Option<Instant>,
    wave: usize,
    times: Mutex<PartTimes>,
}

struct PartTimes {
    remembered_ms: u64,
    slowest_here_ms: Option<u64>,
    started: usize,
}

impl PartClock {
    fn lock(&self) -> std::sync::MutexGuard<'_, PartTimes> {
        self.times.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a part may start now; counts it as started if so.
    pub fn may_start(&self) -> bool {
        let mut times = self.lock();
        let now = Instant::now();
        let Some(finish_by) = self.finish_by else {
            times.started += 1;
            return true;
        };
        let first_wave = times.slowest_here_ms.is_none() && times.started < self.wave;
        let slowest = Duration::from_millis(times.slowest_here_ms.unwrap_or(times.remembered_ms));
        let go = now < finish_by && (first_wave || now + slowest < finish_by);
        if go {
            times.started += 1;
        }
        go
    }

    /// Runs a part, given up (`None`) at the cut-off; notes how long it took if it
    /// finished (a part cut off says nothing of its speed: it may have started late).
    pub async fn bounded<T>(&self, part: impl Future<Output = T>) -> Option<T> {
        let started = Instant::now();
        let done = match self.finish_by {
            Some(t) => tokio::time::timeout_at(t.into(), part).await.ok(),
            None => Some(part.await),
        };
        if done.is_some() {
            let took = started.elapsed().as_millis() as u64;
            let mut times = self.lock();
            times.slowest_here_ms = Some(times.slowest_here_ms.unwrap_or(0).max(took));
        }
        done
    }

    /// The part time to remember for the next invocation.
    pub fn slowest_ms(&self) -> u64 {
        let times = self.lock();
        times.slowest_here_ms.unwrap_or(times.remembered_ms)
    }
}

async fn abort_quietly(target: &dyn ObjectStore, key: &str, upload_id: &str) {
    match target.abort_multipart(key, upload_id).await {
        Ok(()) | Err(Error::NotFound { .. }) => {}
        Err(e) => {
            tracing::warn!(key = %key, upload_id, error = %e, "abort of multipart upload failed; the bucket's lifecycle rule removes it")
        }
    }
}

/// Aborts every upload recorded for `rule_id` in `target` and deletes the records (a rule
/// being deleted). Returns how many there were.
pub async fn abort_recorded(
    uploads: &dyn UploadStore,
    target: &dyn ObjectStore,
    rule_id: &str,
) -> Result<u64> {
    let recorded = uploads.uploads(rule_id).await?;
    for upload in &recorded {
        match target.abort_multipart(&upload.key, &upload.upload_id).await {
            Ok(()) | Err(Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        uploads
            .delete_upload(rule_id, upload.writer, &upload.key)
            .await?;
        tracing::info!(rule_id, key = %upload.key, upload_id = %upload.upload_id, "multipart upload of a deleted rule aborted");
    }
    Ok(recorded.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::{CopyEngine, CopyOutcome, replica_attrs};
    use crate::memory::{MemoryObjectStore, MemoryState, MemoryWorld};
    use bytes::Bytes;

    const MIB: usize = 1024 * 1024;

    fn engine() -> CopyEngine {
        CopyEngine {
            multipart_threshold: 5 * MIB as u64,
            server_side_threshold: 5 * MIB as u64,
            part_size: 5 * MIB as u64,
            parts_in_flight: 2,
            ..CopyEngine::default()
        }
    }

    async fn seeded(world: &MemoryWorld, size: usize, salt: u8) -> (MemoryObjectStore, ObjectInfo) {
        let src = world.store("src");
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8 ^ salt).collect();
        src.put("big", Bytes::from(data), &WriteAttrs::default())
            .await
            .unwrap();
        let info = src.head("big").await.unwrap().unwrap();
        (src, info)
    }

    /// One invocation of `budget`: the copy as replicate and the backfill run it.
    async fn invocation(
        state: &MemoryState,
        src: &MemoryObjectStore,
        dst: &MemoryObjectStore,
        info: &ObjectInfo,
        mode: ResolvedCopyMode,
        budget: Duration,
    ) -> Result<CopyOutcome> {
        let run = CopyRun {
            reserve: Duration::from_millis(50),
            ..CopyRun::new(
                Some(state),
                "r1",
                Writer::Realtime,
                Some(Instant::now() + budget),
            )
        };
        let attrs = replica_attrs(None, "src", info, vec![]);
        engine().copy(src, dst, info, None, &attrs, mode, run).await
    }

    #[tokio::test]
    async fn a_copy_longer_than_an_invocation_continues_where_it_stopped() {
        for mode in [ResolvedCopyMode::Stream, ResolvedCopyMode::ServerSide] {
            let world = MemoryWorld::default();
            let (src, info) = seeded(&world, 45 * MIB + 3, 0).await;
            let dst = world.store("dst");
            let state = MemoryState::default();
            world.set_part_delay(Duration::from_millis(300));
            // 10 parts, 2 at a time, 300 ms each (and their MD5s): 1.5 s of work; 1.2 s
            // per invocation.
            let mut invocations = 0;
            let mut most_in_one = 0;
            let out = loop {
                invocations += 1;
                assert!(invocations < 20, "{mode:?}: no end");
                let before = world.parts_uploaded();
                let done =
                    invocation(&state, &src, &dst, &info, mode, Duration::from_millis(1200)).await;
                most_in_one = most_in_one.max(world.parts_uploaded() - before);
                match done {
                    Ok(out) => break out,
                    Err(e) => {
                        assert!(e.continues_later(), "{mode:?}: {e}");
                        assert!(e.is_retryable());
                        let saved = state.uploads("r1").await.unwrap();
                        assert_eq!(saved.len(), 1);
                        assert!(!saved[0].parts.is_empty());
                        assert_eq!(world.open_uploads(), 1, "one upload, continued");
                    }
                }
            };
            assert!(invocations >= 2, "{mode:?}: {invocations} invocations");
            assert!(out.etag.ends_with("-10"), "{}", out.etag);
            assert_eq!(dst.bytes("big"), src.bytes("big"));
            // Parts transferred twice (cut off at a deadline): fewer than one invocation's.
            let parts = world.parts_uploaded();
            assert!(
                parts - 10 < most_in_one,
                "{mode:?}: {parts} parts for 10, at most {most_in_one} in one invocation"
            );
            assert_eq!(world.open_uploads(), 0);
            assert!(state.uploads("r1").await.unwrap().is_empty());
        }
    }

    #[tokio::test]
    async fn a_source_changed_between_invocations_aborts_the_upload_and_starts_over() {
        let world = MemoryWorld::default();
        let (src, old) = seeded(&world, 30 * MIB, 0).await;
        let dst = world.store("dst");
        let state = MemoryState::default();
        world.set_part_delay(Duration::from_millis(200));
        let mode = ResolvedCopyMode::Stream;
        // Invocations until part of the copy is done (a loaded machine may need several).
        let first = loop {
            let err = invocation(&state, &src, &dst, &old, mode, Duration::from_millis(600))
                .await
                .unwrap_err();
            assert!(err.is_retryable(), "{err}");
            let saved = state.uploads("r1").await.unwrap().remove(0);
            if !saved.parts.is_empty() {
                break saved;
            }
        };
        assert_eq!(first.source_etag, old.etag);

        let (_, new) = seeded(&world, 30 * MIB, 7).await;
        assert_ne!(new.etag, old.etag);
        let err = invocation(&state, &src, &dst, &new, mode, Duration::from_millis(600))
            .await
            .unwrap_err();
        assert!(err.is_retryable(), "{err}");
        let second = state.uploads("r1").await.unwrap().remove(0);
        assert_ne!(second.upload_id, first.upload_id);
        assert_eq!(second.source_etag, new.etag);
        assert_eq!(second.invocations, 1);
        // The first upload was aborted: only the new one is open.
        assert_eq!(world.open_uploads(), 1);
        // Continuing the old state would now fail its If-Match: it is not continued.
        loop {
            match invocation(&state, &src, &dst, &new, mode, Duration::from_secs(2)).await {
                Ok(_) => break,
                Err(e) => assert!(e.continues_later(), "{e}"),
            }
        }
        assert_eq!(dst.bytes("big"), src.bytes("big"));
        assert_eq!(world.open_uploads(), 0);
    }

    #[tokio::test]
    async fn without_a_store_a_copy_stopped_for_its_deadline_leaves_nothing_behind() {
        let world = MemoryWorld::default();
        let (src, info) = seeded(&world, 30 * MIB, 0).await;
        let dst = world.store("dst");
        world.set_part_delay(Duration::from_millis(100));
        let run = CopyRun {
            reserve: Duration::from_millis(50),
            ..CopyRun::new(
                None,
                "r1",
                Writer::Realtime,
                Some(Instant::now() + Duration::from_millis(180)),
            )
        };
        let attrs = replica_attrs(None, "src", &info, vec![]);
        let err = engine()
            .copy(
                &src,
                &dst,
                &info,
                None,
                &attrs,
                ResolvedCopyMode::Stream,
                run,
            )
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Transient { .. }), "{err}");
        assert!(!err.continues_later());
        assert_eq!(world.open_uploads(), 0);
    }

    #[tokio::test]
    async fn a_deleted_rules_recorded_uploads_are_aborted() {
        let world = MemoryWorld::default();
        let (src, info) = seeded(&world, 30 * MIB, 0).await;
        let dst = world.store("dst");
        let state = MemoryState::default();
        world.set_part_delay(Duration::from_millis(100));
        let err = invocation(
            &state,
            &src,
            &dst,
            &info,
            ResolvedCopyMode::Stream,
            Duration::from_millis(180),
        )
        .await
        .unwrap_err();
        // Stopped with or without a part done, the upload is recorded and left open.
        assert!(err.is_retryable(), "{err}");
        assert_eq!(world.open_uploads(), 1);
        assert_eq!(abort_recorded(&state, &dst, "r1").await.unwrap(), 1);
        assert_eq!(world.open_uploads(), 0);
        assert!(state.uploads("r1").await.unwrap().is_empty());
    }

    #[test]
    fn parts_are_packed_in_twenty_bytes_each() {
        let mut parts = BTreeMap::new();
        parts.insert(1, [1u8; 16]);
        parts.insert(10_000, [0xab; 16]);
        let state = UploadState {
            rule_id: "r".into(),
            writer: Writer::Backfill,
            key: "k".into(),
            upload_id: "u".into(),
            source_etag: "e".into(),
            size: 1,
            part_size: 1,
            mode: ResolvedCopyMode::Stream,
            matches_source: false,
            attrs: String::new(),
            parts,
            slowest_part_ms: 0,
            invocations: 1,
            started_at: Utc::now(),
        };
        let packed = state.packed_parts();
        assert_eq!(packed.len(), 40);
        assert_eq!(UploadState::unpack_parts(&packed).unwrap(), state.parts);
        assert!(UploadState::unpack_parts(&packed[..39]).is_err());
        let (listed, _) = state.uploaded();
        assert_eq!(listed[1].etag, "ab".repeat(16));
    }
}
