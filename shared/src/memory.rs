//! In-memory implementations of the store traits, for unit tests and scenario tests of the
//! core logic. They follow S3's and DynamoDB's observable rules (MD5 ETags, If-Match,
//! conditional claims) closely enough for the logic above them to be tested.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use md5::{Digest, Md5};

use crate::backfill::{BackfillStore, Checkpoint, FailedObject, Job, JobState, Segment};
use crate::checksum::{Checksum, ChecksumAlgorithm, SentChecksum};
use crate::error::{Error, Result};
use crate::ledger::LedgerEntry;
use crate::memory_budget::{HeldBytes, MemoryBudget};
use crate::object_store::{
    FetchedObject, ObjectInfo, ObjectStore, TargetPrecondition, UploadedPart, WriteAttrs,
};
use crate::resumable::{UploadState, UploadStore, Writer};
use crate::rule::Rule;
use crate::series::{self, Activity, MinuteAggregate, Rollup, StatsRead, Totals};
use crate::state::{Claim, LedgerStore, RuleStore, StatsStore, SuppressedDelete, claims_of};

#[derive(Debug, Clone)]
struct StoredObject {
    data: Bytes,
    info: ObjectInfo,
    tags: Vec<(String, String)>,
    /// Size of part 1, for objects completed from parts.
    first_part: Option<u64>,
}

#[derive(Default)]
struct World {
    buckets: HashMap<String, BTreeMap<String, StoredObject>>,
    uploads: HashMap<String, (WriteAttrs, BTreeMap<i32, Bytes>)>,
    next_upload: u64,
    /// How long each part upload (or part copy) takes, to test deadlines.
    part_delay: Duration,
    /// Parts uploaded or copied, in all.
    parts_uploaded: u64,
    /// How long each object write (PutObject, CopyObject) takes.
    write_delay: Duration,
}

/// A set of in-memory buckets that can copy between each other server-side.
#[derive(Clone, Default)]
pub struct MemoryWorld {
    inner: Arc<Mutex<World>>,
}

/// Every bucket of a rule is the world's bucket of the same name (endpoints and regions
/// aside), as the in-memory stand-in for `S3Clients`.
impl crate::replicate::StoreProvider for MemoryWorld {
    fn store(&self, bucket: &crate::rule::BucketRef) -> Arc<dyn ObjectStore> {
        Arc::new(MemoryWorld::store(self, &bucket.bucket))
    }
}

impl MemoryWorld {
    /// A store for `bucket` (created empty on first use).
    pub fn store(&self, bucket: &str) -> MemoryObjectStore {
        self.lock().buckets.entry(bucket.to_string()).or_default();
        MemoryObjectStore {
            world: self.clone(),
            bucket: bucket.to_string(),
        }
    }

    /// Makes every part upload (or part copy) take `delay`.
    pub fn set_part_delay(&self, delay: Duration) {
        self.lock().part_delay = delay;
    }

    /// Parts uploaded or copied so far, in every bucket.
    pub fn parts_uploaded(&self) -> u64 {
        self.lock().parts_uploaded
    }

    /// Multipart uploads started and neither completed nor aborted.
    pub fn open_uploads(&self) -> usize {
        self.lock().uploads.len()
    }

    /// Makes every object write (PutObject, CopyObject) of every bucket take `delay`: a
    /// slow link, for tests of what outlasts a lease or a deadline.
    pub fn set_write_delay(&self, delay: Duration) {
        self.lock().write_delay = delay;
    }

    async fn write_delay(&self) {
        let delay = self.lock().write_delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }

    fn lock(&self) -> MutexGuard<'_, World> {
        locked(&self.inner)
    }
}

/// One in-memory bucket.
#[derive(Clone)]
pub struct MemoryObjectStore {
    world: MemoryWorld,
    bucket: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl MemoryObjectStore {
    /// The world this bucket lives in.
    pub fn world(&self) -> MemoryWorld {
        self.world.clone()
    }

    /// The stored bytes of `key`, if any.
    pub fn bytes(&self, key: &str) -> Option<Bytes> {
        self.world
            .lock()
            .buckets
            .get(&self.bucket)?
            .get(key)
            .map(|o| o.data.clone())
    }

    /// Keys in the bucket, in order.
    pub fn keys(&self) -> Vec<String> {
        self.world
            .lock()
            .buckets
            .get(&self.bucket)
            .map(|b| b.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn resource(&self, key: &str) -> String {
        format!("s3://{}/{}", self.bucket, key)
    }

    /// An error S3 answers with a 4xx code that has no variant of its own, as `S3Store`
    /// reports it.
    fn refused(&self, operation: &'static str, key: &str, code: &str, message: &str) -> Error {
        Error::Service {
            operation,
            resource: self.resource(key),
            detail: format!("{code}: {message}"),
            source: format!("{code}: {message}").into(),
        }
    }

    /// S3 refuses to create keys over 1024 bytes (KeyTooLongError).
    fn check_key(&self, operation: &'static str, key: &str) -> Result<()> {
        if key.len() > crate::key::MAX_KEY_BYTES {
            return Err(self.refused(operation, key, "KeyTooLongError", "Your key is too long"));
        }
        Ok(())
    }

    /// Whether a write may replace what `key` holds now, as S3 decides for
    /// `If-None-Match: *` (412 if there is an object) and `If-Match` (412 if its ETag
    /// differs, 404 NoSuchKey if there is no object).
    fn check_target(
        &self,
        operation: &'static str,
        key: &str,
        precondition: Option<&TargetPrecondition>,
    ) -> Result<()> {
        let current = self.object(key).map(|o| o.info.etag);
        match (precondition, current) {
            (Some(TargetPrecondition::Etag(_)), None) => Err(Error::NotFound {
                operation,
                resource: self.resource(key),
            }),
            (Some(TargetPrecondition::Absent), Some(_)) => Err(Error::Precondition {
                operation,
                resource: self.resource(key),
            }),
            (Some(TargetPrecondition::Etag(want)), Some(etag)) if *want != etag => {
                Err(Error::Precondition {
                    operation,
                    resource: self.resource(key),
                })
            }
            _ => Ok(()),
        }
    }

    fn store_object(
        &self,
        key: &str,
        data: Bytes,
        etag: String,
        attrs: &WriteAttrs,
        first_part: Option<u64>,
        checksum: Checksum,
    ) {
        let info = ObjectInfo {
            key: key.to_string(),
            size: data.len() as u64,
            etag,
            last_modified: Some(Utc::now()),
            version_id: None,
            headers: attrs.headers.clone(),
            metadata: attrs.metadata.clone(),
            storage_class: attrs.storage_class.clone(),
            encryption: attrs.encryption.clone(),
            tag_count: u32::try_from(attrs.tags.len()).unwrap_or(u32::MAX),
            checksum: Some(checksum),
        };
        let object = StoredObject {
            data,
            info,
            tags: attrs.tags.clone(),
            first_part,
        };
        self.world
            .lock()
            .buckets
            .entry(self.bucket.clone())
            .or_default()
            .insert(key.to_string(), object);
    }

    /// The checksum a write stores, after checking the one it sent as S3 does: a known
    /// value must match the bytes (else `BadDigest`); without one, S3's default CRC64NVME.
    fn arriving(
        &self,
        operation: &'static str,
        key: &str,
        body: &[u8],
        sent: &SentChecksum,
    ) -> Result<Checksum> {
        match sent {
            SentChecksum::Known(want) => {
                let got = Checksum::compute(want.algorithm, body);
                if got.value != want.value {
                    return Err(self.refused(
                        operation,
                        key,
                        "BadDigest",
                        "The checksum you specified did not match what we received.",
                    ));
                }
                Ok(got)
            }
            SentChecksum::Compute(a) => Ok(Checksum::compute(*a, body)),
            SentChecksum::None => Ok(Checksum::compute(ChecksumAlgorithm::Crc64Nvme, body)),
        }
    }

    fn object(&self, key: &str) -> Option<StoredObject> {
        self.world
            .lock()
            .buckets
            .get(&self.bucket)?
            .get(key)
            .cloned()
    }
}

#[async_trait]
impl ObjectStore for MemoryObjectStore {
    fn bucket(&self) -> &str {
        &self.bucket
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        let world = self.world.lock();
        let bucket = world
            .buckets
            .get(&self.bucket)
            .ok_or_else(|| Error::NoSuchBucket {
                operation: "HeadObject",
                bucket: self.bucket.clone(),
            })?;
        Ok(bucket.get(key).map(|o| o.info.clone()))
    }

    async fn fetch(
        &self,
        key: &str,
        body_limit: u64,
        budget: &MemoryBudget,
    ) -> Result<Option<FetchedObject>> {
        Ok(self.head(key).await?.map(|info| {
            let body = (info.size <= body_limit)
                .then(|| budget.try_reserve(info.size))
                .flatten()
                .and_then(|room| Some(HeldBytes::new(self.object(key)?.data, room)));
            FetchedObject { info, body }
        }))
    }

    async fn get(&self, key: &str, range: Option<(u64, u64)>, if_match: &str) -> Result<Bytes> {
        let world = self.world.lock();
        let obj = world
            .buckets
            .get(&self.bucket)
            .and_then(|b| b.get(key))
            .ok_or_else(|| Error::NotFound {
                operation: "GetObject",
                resource: self.resource(key),
            })?;
        if obj.info.etag != if_match {
            return Err(Error::Precondition {
                operation: "GetObject",
                resource: self.resource(key),
            });
        }
        let len = obj.data.len() as u64;
        Ok(match range {
            // S3 cuts a range that reaches past the end, and refuses one that starts there.
            Some((start, _)) if start >= len => {
                return Err(self.refused(
                    "GetObject",
                    key,
                    "InvalidRange",
                    "The requested range is not satisfiable",
                ));
            }
            Some((start, end)) => obj.data.slice(start as usize..end.min(len) as usize),
            None => obj.data.clone(),
        })
    }

    async fn put(&self, key: &str, body: Bytes, attrs: &WriteAttrs) -> Result<String> {
        self.world.write_delay().await;
        self.check_key("PutObject", key)?;
        self.check_target("PutObject", key, attrs.precondition.as_ref())?;
        let checksum = self.arriving("PutObject", key, &body, &attrs.checksum)?;
        let etag = hex(&Md5::digest(&body));
        self.store_object(key, body, etag.clone(), attrs, None, checksum);
        Ok(etag)
    }

    async fn create_multipart(&self, key: &str, attrs: &WriteAttrs) -> Result<String> {
        self.check_key("CreateMultipartUpload", key)?;
        let mut world = self.world.lock();
        world.next_upload += 1;
        let id = format!("upload-{}", world.next_upload);
        world
            .uploads
            .insert(id.clone(), (attrs.clone(), BTreeMap::new()));
        Ok(id)
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        body: Bytes,
        _checksum: Option<ChecksumAlgorithm>,
    ) -> Result<String> {
        let etag = hex(&Md5::digest(&body));
        let delay = self.world.lock().part_delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut world = self.world.lock();
        world.parts_uploaded += 1;
        let upload = world
            .uploads
            .get_mut(upload_id)
            .ok_or_else(|| Error::NotFound {
                operation: "UploadPart",
                resource: self.resource(key),
            })?;
        upload.1.insert(part_number, body);
        Ok(etag)
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[UploadedPart],
        precondition: Option<&TargetPrecondition>,
        checksum: Option<&Checksum>,
    ) -> Result<String> {
        self.check_target("CompleteMultipartUpload", key, precondition)?;
        let (attrs, stored) = self
            .world
            .lock()
            .uploads
            .get(upload_id)
            .cloned()
            .ok_or_else(|| Error::NotFound {
                operation: "CompleteMultipartUpload",
                resource: self.resource(key),
            })?;
        let mut data = Vec::new();
        let mut part_sums = Vec::new();
        let mut digests = Md5::new();
        let first_part = parts
            .first()
            .and_then(|p| stored.get(&p.part_number))
            .map(|b| b.len() as u64);
        for (i, part) in parts.iter().enumerate() {
            let body = stored
                .get(&part.part_number)
                .ok_or_else(|| Error::Integrity {
                    resource: self.resource(key),
                    detail: format!("part {} was never uploaded", part.part_number),
                })?;
            // As S3: every part but the last has at least 5 MiB, and a refused completion
            // leaves the upload in place for another try.
            if i + 1 < parts.len() && (body.len() as u64) < crate::copy::MIN_PART_SIZE {
                return Err(self.refused(
                    "CompleteMultipartUpload",
                    key,
                    "EntityTooSmall",
                    "Your proposed upload is smaller than the minimum allowed object size.",
                ));
            }
            digests.update(Md5::digest(body));
            part_sums.push(body.clone());
            data.extend_from_slice(body);
        }
        // As S3: a CRC upload (CRC64NVME by default) gets the whole object's checksum, a
        // SHA one the composite checksum of its parts' checksums.
        let stored = match attrs.checksum.algorithm() {
            Some(a) if !a.combines() => {
                let mut raw = Vec::new();
                for body in &part_sums {
                    let part = Checksum::compute(a, body);
                    raw.extend(aws_smithy_types::base64::decode(&part.value).unwrap_or_default());
                }
                Checksum {
                    parts: Some(u32::try_from(parts.len()).unwrap_or(u32::MAX)),
                    ..Checksum::compute(a, &raw)
                }
            }
            a => Checksum::compute(a.unwrap_or(ChecksumAlgorithm::Crc64Nvme), &data),
        };
        if let Some(want) = checksum
            && want.agrees_with(&stored) != Some(true)
        {
            return Err(self.refused(
                "CompleteMultipartUpload",
                key,
                "BadDigest",
                "The full-object checksum you specified did not match what we received.",
            ));
        }
        self.world.lock().uploads.remove(upload_id);
        let etag = format!("{}-{}", hex(&digests.finalize()), parts.len());
        self.store_object(
            key,
            Bytes::from(data),
            etag.clone(),
            &attrs,
            first_part,
            stored,
        );
        Ok(etag)
    }

    async fn abort_multipart(&self, _key: &str, upload_id: &str) -> Result<()> {
        self.world.lock().uploads.remove(upload_id);
        Ok(())
    }

    async fn copy_from(
        &self,
        source_bucket: &str,
        key: &str,
        if_match: &str,
        attrs: &WriteAttrs,
    ) -> Result<String> {
        self.world.write_delay().await;
        self.check_key("CopyObject", key)?;
        let source = self.world.store(source_bucket);
        let algorithm = source
            .object(key)
            .and_then(|o| o.info.checksum)
            .map_or(ChecksumAlgorithm::Crc64Nvme, |c| c.algorithm);
        let data = source.get(key, None, if_match).await?;
        self.check_target("CopyObject", key, attrs.precondition.as_ref())?;
        // As S3: the copy's checksum is computed afresh with the source's algorithm.
        let checksum = Checksum::compute(algorithm, &data);
        if let SentChecksum::Known(want) = &attrs.checksum
            && want.agrees_with(&checksum) == Some(false)
        {
            return Err(Error::Integrity {
                resource: self.resource(key),
                detail: format!("CopyObject stored checksum {checksum}, the source's is {want}"),
            });
        }
        // A copy is a new single-part object: its ETag is the MD5 of its content, whatever
        // the source's (a multipart source's `<md5-of-md5s>-N` included), as S3 makes it.
        let etag = hex(&Md5::digest(&data));
        // Tagging directive REPLACE, as `S3Store` asks: the given tags, none if none.
        self.store_object(key, data, etag.clone(), attrs, None, checksum);
        Ok(etag)
    }

    async fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        source_bucket: &str,
        range: (u64, u64),
        if_match: &str,
    ) -> Result<String> {
        let data = self
            .world
            .store(source_bucket)
            .get(key, Some(range), if_match)
            .await?;
        self.upload_part(key, upload_id, part_number, data, None)
            .await
    }

    async fn access(&self, _key: &str) -> Result<crate::object_store::AccessInfo> {
        Ok(crate::object_store::AccessInfo::default())
    }

    async fn acls_enabled(&self) -> Result<bool> {
        Ok(false)
    }

    async fn tags(&self, key: &str) -> Result<Vec<(String, String)>> {
        self.object(key)
            .map(|o| o.tags)
            .ok_or_else(|| Error::NotFound {
                operation: "GetObjectTagging",
                resource: self.resource(key),
            })
    }

    async fn first_part_size(&self, key: &str) -> Result<Option<u64>> {
        self.object(key)
            .map(|o| o.first_part)
            .ok_or_else(|| Error::NotFound {
                operation: "HeadObject",
                resource: self.resource(key),
            })
    }

    async fn delete(&self, key: &str) -> Result<()> {
        if let Some(b) = self.world.lock().buckets.get_mut(&self.bucket) {
            b.remove(key);
        }
        Ok(())
    }

    async fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        max_keys: i32,
    ) -> Result<crate::object_store::ListPage> {
        let world = self.world.lock();
        let Some(bucket) = world.buckets.get(&self.bucket) else {
            return Err(Error::NoSuchBucket {
                operation: "ListObjectsV2",
                bucket: self.bucket.clone(),
            });
        };
        let mut matching = bucket
            .iter()
            .filter(|(k, _)| k.starts_with(prefix) && start_after.is_none_or(|a| k.as_str() > a))
            .map(|(_, o)| crate::object_store::ListedObject {
                key: o.info.key.clone(),
                size: o.info.size,
                etag: o.info.etag.clone(),
                last_modified: o.info.last_modified,
            });
        let objects: Vec<_> = matching.by_ref().take(max_keys.max(1) as usize).collect();
        Ok(crate::object_store::ListPage {
            objects,
            truncated: matching.next().is_some(),
        })
    }

    async fn check_readable(&self) -> Result<()> {
        Ok(())
    }

    async fn check_writable(&self, _probe_key: &str) -> Result<()> {
        Ok(())
    }
}

/// The state table in memory: rules and claims (with the same all-or-nothing claim
/// semantics as the DynamoDB transaction), ledger, counters, suppressed deletes, backfill
/// jobs and segments (with the same conditions on leases and checkpoints).
#[derive(Clone, Default)]
pub struct MemoryState {
    inner: Arc<Mutex<RulesAndClaims>>,
    ledger: Arc<Mutex<HashMap<(String, String), LedgerEntry>>>,
    /// Each rule's totals and minutes, as the DynamoDB table keeps them (`series.rs`).
    stats: Arc<Mutex<HashMap<String, RuleStats>>>,
    suppressed: Arc<Mutex<HashMap<String, Vec<SuppressedDelete>>>>,
    uploads: Arc<Mutex<BTreeMap<UploadSlot, UploadState>>>,
    backfill: Arc<Mutex<HashMap<String, BackfillJob>>>,
    /// Each rule's failed-objects list, by key.
    failures: Arc<Mutex<HashMap<String, BTreeMap<String, FailedObject>>>>,
}

/// An upload record's identity: rule, writer, key.
type UploadSlot = (String, &'static str, String);

/// A rule's backfill job and its segments, by index.
type BackfillJob = (Job, BTreeMap<u32, Segment>);

/// A rule's totals and its minute items, by minute.
type RuleStats = (Totals, BTreeMap<DateTime<Utc>, MinuteAggregate>);

type RulesAndClaims = (BTreeMap<String, Rule>, HashMap<String, Claim>);

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[async_trait]
impl LedgerStore for MemoryState {
    async fn read_ledger(&self, rule_id: &str, key: &str) -> Result<Option<LedgerEntry>> {
        Ok(locked(&self.ledger)
            .get(&(rule_id.to_string(), key.to_string()))
            .cloned())
    }

    async fn commit_ledger(
        &self,
        rule_id: &str,
        key: &str,
        expected: Option<u64>,
        sequencer: &str,
        etag: &str,
    ) -> Result<bool> {
        let mut ledger = locked(&self.ledger);
        let slot = (rule_id.to_string(), key.to_string());
        if ledger.get(&slot).map(|e| e.version) != expected {
            return Ok(false);
        }
        ledger.insert(
            slot,
            LedgerEntry {
                sequencer: sequencer.to_string(),
                etag: etag.to_string(),
                version: expected.unwrap_or(0) + 1,
            },
        );
        Ok(true)
    }
}

#[async_trait]
impl StatsStore for MemoryState {
    async fn add_activity(
        &self,
        rule_id: &str,
        minute: DateTime<Utc>,
        activity: &Activity,
    ) -> Result<()> {
        let mut all = locked(&self.stats);
        let slot = all
            .entry(rule_id.to_string())
            .or_default()
            .1
            .entry(minute)
            .or_insert_with(|| MinuteAggregate {
                minute,
                ..MinuteAggregate::default()
            });
        slot.activity.merge(activity);
        Ok(())
    }

    async fn read_stats(&self, rule_id: &str, from: DateTime<Utc>) -> Result<StatsRead> {
        let from = series::minute_of(from);
        let all = locked(&self.stats);
        let Some((totals, minutes)) = all.get(rule_id) else {
            return Ok(StatsRead::default());
        };
        Ok(StatsRead {
            totals: totals.clone(),
            minutes: minutes
                .values()
                .filter(|m| m.minute >= from || totals.rolled_through.is_none_or(|r| m.minute > r))
                .cloned()
                .collect(),
        })
    }

    async fn roll_up(&self, rule_id: &str, rollup: &Rollup) -> Result<bool> {
        let mut all = locked(&self.stats);
        let (totals, _) = all.entry(rule_id.to_string()).or_default();
        if totals.rolled_through != rollup.expected {
            return Ok(false);
        }
        let newest = rollup.add.newest_event_at;
        totals.counters.merge(&rollup.add);
        if newest.is_some() {
            totals.counters.newest_event_at = newest;
        }
        totals.rolled_through = Some(rollup.through);
        Ok(true)
    }

    async fn sample_pending(
        &self,
        rule_id: &str,
        minute: DateTime<Utc>,
        pending: u64,
    ) -> Result<()> {
        let mut all = locked(&self.stats);
        all.entry(rule_id.to_string())
            .or_default()
            .1
            .entry(minute)
            .or_insert_with(|| MinuteAggregate {
                minute,
                ..MinuteAggregate::default()
            })
            .pending = Some(pending);
        Ok(())
    }

    async fn record_suppressed(&self, rule_id: &str, delete: &SuppressedDelete) -> Result<bool> {
        let mut all = locked(&self.suppressed);
        let recorded = all.entry(rule_id.to_string()).or_default();
        let id = delete.identity();
        if recorded
            .iter()
            .any(|d| d.key == delete.key && d.identity() == id)
        {
            return Ok(false);
        }
        recorded.push(delete.clone());
        Ok(true)
    }

    async fn suppressed(&self, rule_id: &str) -> Result<Vec<SuppressedDelete>> {
        Ok(locked(&self.suppressed)
            .get(rule_id)
            .cloned()
            .unwrap_or_default())
    }
}

#[async_trait]
impl RuleStore for MemoryState {
    async fn create_rule(&self, rule: &Rule) -> Result<()> {
        let mut guard = locked(&self.inner);
        let (rules, claims) = &mut *guard;
        if rules.contains_key(&rule.id) {
            return Err(Error::RuleExists(rule.id.clone()));
        }
        let wanted = claims_of(rule);
        for want in &wanted {
            if let Some(held) = claims.get(&want.bucket) {
                return Err(held.conflict_error(want));
            }
        }
        for want in wanted {
            claims.insert(want.bucket.clone(), want);
        }
        rules.insert(rule.id.clone(), rule.clone());
        Ok(())
    }

    async fn get_rule(&self, id: &str) -> Result<Option<Rule>> {
        Ok(self
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .get(id)
            .cloned())
    }

    async fn list_rules(&self) -> Result<Vec<Rule>> {
        Ok(self
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .values()
            .cloned()
            .collect())
    }

    async fn update_rule(&self, rule: &Rule) -> Result<()> {
        let mut guard = locked(&self.inner);
        match guard.0.get_mut(&rule.id) {
            Some(stored) if stored.source == rule.source && stored.target == rule.target => {
                *stored = rule.clone();
                Ok(())
            }
            Some(_) => Err(Error::invalid(
                "source.bucket",
                "the buckets of a rule cannot change",
            )),
            None => Err(Error::RuleNotFound(rule.id.clone())),
        }
    }

    async fn delete_rule(&self, rule: &Rule) -> Result<()> {
        let mut guard = locked(&self.inner);
        let (rules, claims) = &mut *guard;
        rules.remove(&rule.id);
        for c in claims_of(rule) {
            claims.remove(&c.bucket);
        }
        drop(guard);
        locked(&self.stats).remove(&rule.id);
        locked(&self.suppressed).remove(&rule.id);
        locked(&self.uploads).retain(|(id, _, _), _| *id != rule.id);
        locked(&self.backfill).remove(&rule.id);
        locked(&self.failures).remove(&rule.id);
        Ok(())
    }

    async fn rule_for_source(&self, bucket: &str) -> Result<Option<Rule>> {
        let guard = locked(&self.inner);
        Ok(guard
            .0
            .values()
            .find(|r| r.source.bucket == bucket)
            .cloned())
    }
}

#[async_trait]
impl UploadStore for MemoryState {
    async fn load_upload(
        &self,
        rule_id: &str,
        writer: Writer,
        key: &str,
    ) -> Result<Option<UploadState>> {
        Ok(locked(&self.uploads)
            .get(&(rule_id.to_string(), writer.as_str(), key.to_string()))
            .cloned())
    }

    async fn save_upload(&self, state: &UploadState) -> Result<()> {
        let slot = (
            state.rule_id.clone(),
            state.writer.as_str(),
            state.key.clone(),
        );
        locked(&self.uploads).insert(slot, state.clone());
        Ok(())
    }

    async fn delete_upload(&self, rule_id: &str, writer: Writer, key: &str) -> Result<()> {
        locked(&self.uploads).remove(&(rule_id.to_string(), writer.as_str(), key.to_string()));
        Ok(())
    }

    async fn uploads(&self, rule_id: &str) -> Result<Vec<UploadState>> {
        Ok(locked(&self.uploads)
            .iter()
            .filter(|((id, _, _), _)| id == rule_id)
            .map(|(_, u)| u.clone())
            .collect())
    }
}

impl MemoryState {
    fn job_mut<T>(&self, rule_id: &str, f: impl FnOnce(&mut Job) -> T) -> Result<T> {
        let mut all = locked(&self.backfill);
        let (job, _) = all
            .get_mut(rule_id)
            .ok_or_else(|| Error::Config(format!("no backfill job for rule {rule_id}")))?;
        Ok(f(job))
    }

    /// Applies `f` to the rule's job and its segment `index`; `None` if there is none.
    fn job_and_segment<T>(
        &self,
        rule_id: &str,
        index: u32,
        f: impl FnOnce(&mut Job, &mut Segment) -> T,
    ) -> Option<T> {
        let mut all = locked(&self.backfill);
        let (job, segments) = all.get_mut(rule_id)?;
        let segment = segments.get_mut(&index)?;
        Some(f(job, segment))
    }
}

/// Puts `job` in `state` now, as the table's state changes do (clearing `last_error`;
/// `stamp_completed`: also writing `completed_at`).
fn move_job(job: &mut Job, state: JobState, stamp_completed: bool) {
    let now = Utc::now();
    job.state = state;
    job.updated_at = now;
    if stamp_completed {
        job.completed_at = Some(now);
    }
    job.last_error = None;
}

fn epoch_ms() -> u64 {
    u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0)
}

/// `owner` holds an unexpired lease (at `now_ms`) on a segment not done.
fn holds(segment: &Segment, owner: &str, now_ms: u64) -> bool {
    !segment.done && segment.lease_owner.as_deref() == Some(owner) && segment.lease_until >= now_ms
}

#[async_trait]
impl BackfillStore for MemoryState {
    async fn job(&self, rule_id: &str) -> Result<Option<Job>> {
        Ok(locked(&self.backfill)
            .get(rule_id)
            .map(|(job, _)| job.clone()))
    }

    async fn create_job(&self, job: &Job) -> Result<bool> {
        let mut all = locked(&self.backfill);
        if all.contains_key(&job.rule_id) {
            return Ok(false);
        }
        all.insert(job.rule_id.clone(), (job.clone(), BTreeMap::new()));
        Ok(true)
    }

    async fn set_job_state(&self, rule_id: &str, state: JobState) -> Result<()> {
        self.job_mut(rule_id, |job| move_job(job, state, state.is_finished()))
    }

    async fn advance_job(&self, rule_id: &str, from: JobState, to: JobState) -> Result<bool> {
        let mut all = locked(&self.backfill);
        let Some((job, _)) = all.get_mut(rule_id).filter(|(job, _)| job.state == from) else {
            return Ok(false);
        };
        move_job(job, to, to.is_finished() && !from.is_finished());
        Ok(true)
    }

    async fn fail_job(&self, rule_id: &str, reason: &str) -> Result<()> {
        self.job_mut(rule_id, |job| {
            job.state = JobState::Failed;
            job.updated_at = Utc::now();
            job.last_error = Some(reason.to_string());
        })
    }

    async fn add_segment(
        &self,
        rule_id: &str,
        segment: &Segment,
        job: &Job,
        expected_segments: u32,
    ) -> Result<bool> {
        let mut all = locked(&self.backfill);
        let Some((stored, segments)) = all.get_mut(rule_id) else {
            return Ok(false);
        };
        if stored.segments != expected_segments || segments.contains_key(&segment.index) {
            return Ok(false);
        }
        segments.insert(segment.index, segment.clone());
        stored.planned = job.planned;
        stored.plan_prefix = job.plan_prefix;
        stored.plan_after = job.plan_after.clone();
        stored.frontier = job.frontier.clone();
        stored.total_objects = job.total_objects;
        stored.total_bytes = job.total_bytes;
        stored.segments = job.segments;
        stored.updated_at = Utc::now();
        Ok(true)
    }

    async fn segments(&self, rule_id: &str) -> Result<Vec<Segment>> {
        Ok(locked(&self.backfill)
            .get(rule_id)
            .map(|(_, segments)| segments.values().cloned().collect())
            .unwrap_or_default())
    }

    async fn claim_next_segment(
        &self,
        rule_id: &str,
        next: u32,
        owner: &str,
        now_ms: u64,
        until_ms: u64,
    ) -> Result<Option<Segment>> {
        {
            let mut all = locked(&self.backfill);
            let Some((job, _)) = all.get_mut(rule_id) else {
                return Ok(None);
            };
            if job.claims.next != next || job.segments <= next {
                return Ok(None);
            }
            job.claims.next = next + 1;
            job.claims.leases.insert(next, until_ms);
        }
        self.claim_segment(rule_id, next, owner, now_ms, until_ms)
            .await
    }

    async fn claim_segment(
        &self,
        rule_id: &str,
        index: u32,
        owner: &str,
        now_ms: u64,
        until_ms: u64,
    ) -> Result<Option<Segment>> {
        Ok(self
            .job_and_segment(rule_id, index, |job, segment| {
                if segment.done {
                    job.claims.leases.remove(&index);
                    return None;
                }
                if segment.lease_owner.is_some() && segment.lease_until >= now_ms {
                    if let Some(entry) = job.claims.leases.get_mut(&index) {
                        *entry = segment.lease_until;
                    }
                    return None;
                }
                segment.lease_owner = Some(owner.to_string());
                segment.lease_until = until_ms;
                job.claims.leases.insert(index, until_ms);
                Some(segment.clone())
            })
            .flatten())
    }

    async fn extend_lease(
        &self,
        rule_id: &str,
        index: u32,
        owner: &str,
        now_ms: u64,
        until_ms: u64,
    ) -> Result<bool> {
        Ok(self
            .job_and_segment(rule_id, index, |job, segment| {
                if !holds(segment, owner, now_ms) {
                    return false;
                }
                segment.lease_until = until_ms;
                if let Some(entry) = job.claims.leases.get_mut(&index) {
                    *entry = until_ms;
                }
                true
            })
            .unwrap_or(false))
    }

    async fn checkpoint_segment(
        &self,
        rule_id: &str,
        index: u32,
        owner: &str,
        checkpoint: &Checkpoint,
    ) -> Result<bool> {
        Ok(self
            .job_and_segment(rule_id, index, |job, segment| {
                if !holds(segment, owner, epoch_ms()) {
                    return false;
                }
                let now = Utc::now();
                segment.done = checkpoint.done;
                segment.lease_until = checkpoint.lease_until;
                segment.updated_at = Some(now);
                if let Some(key) = checkpoint.last_key.as_ref().filter(|k| !k.is_empty()) {
                    segment.checkpoint = Some(key.clone());
                }
                segment.add_tally(&checkpoint.tally);
                // The job's totals in the same step, as the table's transaction does.
                let p = &mut job.progress;
                p.tally.add(&checkpoint.tally);
                job.updated_at = now;
                if checkpoint.done {
                    p.segments_done += 1;
                    job.claims.leases.remove(&index);
                } else {
                    job.claims.leases.insert(index, checkpoint.lease_until);
                }
                true
            })
            .unwrap_or(false))
    }

    async fn release_segment(&self, rule_id: &str, index: u32, owner: &str) -> Result<()> {
        self.job_and_segment(rule_id, index, |job, segment| {
            if segment.lease_owner.as_deref() != Some(owner) {
                return;
            }
            segment.lease_owner = None;
            segment.lease_until = 0;
            if let Some(entry) = job.claims.leases.get_mut(&index) {
                *entry = epoch_ms();
            }
        });
        Ok(())
    }

    async fn advance_claim_cursor(&self, rule_id: &str, from: u32, to: u32) -> Result<bool> {
        let mut all = locked(&self.backfill);
        Ok(match all.get_mut(rule_id) {
            Some((job, _)) if job.claims.next == from => {
                job.claims.next = to;
                true
            }
            _ => false,
        })
    }

    async fn rewind_claim_cursor(&self, rule_id: &str, to: u32) -> Result<bool> {
        let mut all = locked(&self.backfill);
        Ok(match all.get_mut(rule_id) {
            Some((job, _)) if job.claims.next > to => {
                job.claims.next = to;
                true
            }
            _ => false,
        })
    }

    async fn touch_board_entry(
        &self,
        rule_id: &str,
        index: u32,
        seen_ms: u64,
        until_ms: u64,
    ) -> Result<bool> {
        let mut all = locked(&self.backfill);
        let entry = all
            .get_mut(rule_id)
            .and_then(|(job, _)| job.claims.leases.get_mut(&index))
            .filter(|entry| **entry == seen_ms);
        Ok(match entry {
            Some(entry) => {
                *entry = until_ms;
                true
            }
            None => false,
        })
    }

    async fn record_failures(&self, rule_id: &str, failed: &[FailedObject]) -> Result<()> {
        let mut all = locked(&self.failures);
        let list = all.entry(rule_id.to_string()).or_default();
        for f in failed {
            let mut record = f.clone();
            if let Some(known) = list.get(&f.key) {
                record.attempts = known.attempts + f.attempts.max(1);
                record.first_failed_at = known.first_failed_at;
            }
            list.insert(f.key.clone(), record);
        }
        Ok(())
    }

    async fn failures(&self, rule_id: &str) -> Result<Vec<FailedObject>> {
        Ok(locked(&self.failures)
            .get(rule_id)
            .map(|list| list.values().cloned().collect())
            .unwrap_or_default())
    }

    async fn failure_count(&self, rule_id: &str) -> Result<u64> {
        Ok(locked(&self.failures)
            .get(rule_id)
            .map_or(0, |list| list.len() as u64))
    }

    async fn remove_failure(&self, rule_id: &str, key: &str) -> Result<()> {
        if let Some(list) = locked(&self.failures).get_mut(rule_id) {
            list.remove(key);
        }
        Ok(())
    }
}
