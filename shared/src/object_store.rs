//! `ObjectStore`: the narrow view of a bucket that replication needs. The AWS
//! implementation lives in `adapters/s3.rs`; the in-memory one in `memory.rs` serves unit
//! tests.

use std::collections::BTreeMap;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};

use crate::checksum::{Checksum, ChecksumAlgorithm, SentChecksum};
use crate::error::Result;
use crate::memory_budget::{HeldBytes, MemoryBudget};

/// Content headers S3 stores with an object and returns on GET/HEAD.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContentHeaders {
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub content_disposition: Option<String>,
    pub content_language: Option<String>,
    pub cache_control: Option<String>,
    /// `Expires`, as the HTTP date string S3 returned.
    pub expires: Option<String>,
}

/// Server-side encryption of an object, or asked for on a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encryption {
    /// SSE-S3 (`AES256`).
    S3Managed,
    /// SSE-KMS with this key (`None`: the account's `aws/s3` key in that region).
    Kms { key_id: Option<String> },
}

/// What HEAD tells about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    /// ETag without quotes.
    pub etag: String,
    pub last_modified: Option<DateTime<Utc>>,
    pub version_id: Option<String>,
    pub headers: ContentHeaders,
    /// User metadata (`x-amz-meta-*`), names lower-case.
    pub metadata: BTreeMap<String, String>,
    /// Storage class, when not STANDARD.
    pub storage_class: Option<String>,
    pub encryption: Option<Encryption>,
    /// Number of tags (`x-amz-tagging-count`; S3 omits the header when there are none).
    pub tag_count: u32,
    /// The additional checksum S3 stores with the object, when it has one and the store
    /// tells it (HEAD and GET ask with checksum mode on).
    pub checksum: Option<Checksum>,
}

/// The current object as one GET saw it: its metadata, and its bytes when small enough.
#[derive(Debug)]
pub struct FetchedObject {
    pub info: ObjectInfo,
    /// The whole content, read only when the object is at most the caller's limit and the
    /// memory budget had room for it; it holds that room until dropped.
    pub body: Option<HeldBytes>,
}

/// Who owns an object and who else may read it, as far as it can be carried over.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessInfo {
    /// Canonical user id of the owner.
    pub owner_id: Option<String>,
    /// The canned ACL the grants amount to (`public-read`...); `None` for private objects
    /// and for grants to specific accounts, which mean nothing in another account.
    pub canned_acl: Option<String>,
}

/// What is written with a replica.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteAttrs {
    pub headers: ContentHeaders,
    pub metadata: BTreeMap<String, String>,
    /// Object tags, in order.
    pub tags: Vec<(String, String)>,
    pub storage_class: Option<String>,
    pub encryption: Option<Encryption>,
    /// Canned ACL for the replica.
    pub acl: Option<String>,
    /// Write only if the target is still as it was seen (single-request writes).
    pub precondition: Option<TargetPrecondition>,
    /// The checksum a single-request write sends for the target to verify on arrival
    /// (and the algorithm a multipart upload is created with).
    pub checksum: SentChecksum,
}

/// What the target must still be for a write to go ahead: the backfill's guard against
/// overwriting what real-time replication wrote after the backfill looked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPrecondition {
    /// No object under the key (`If-None-Match: *`); else `Error::Precondition`.
    Absent,
    /// The object with this ETag (`If-Match`); else `Error::Precondition`, or
    /// `Error::NotFound` when there is no object at all (S3's 404; some S3-compatible
    /// servers answer 412 there too).
    Etag(String),
}

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedObject {
    pub key: String,
    pub size: u64,
    pub etag: String,
    pub last_modified: Option<DateTime<Utc>>,
}

/// One page of a listing, in key order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListPage {
    pub objects: Vec<ListedObject>,
    /// True when the listing has more keys after this page.
    pub truncated: bool,
}

/// One page of a listing grouped by a delimiter, in key order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DelimitedPage {
    /// The keys with no delimiter after the prefix.
    pub objects: Vec<ListedObject>,
    /// The sub-prefixes (each ending with the delimiter) standing for the keys below them.
    pub common_prefixes: Vec<String>,
    /// True when the listing has more after this page.
    pub truncated: bool,
}

impl From<ListPage> for DelimitedPage {
    fn from(page: ListPage) -> Self {
        Self {
            objects: page.objects,
            common_prefixes: Vec::new(),
            truncated: page.truncated,
        }
    }
}

impl WriteAttrs {
    /// True when the written object's ETag is the MD5 of its content (not so for SSE-KMS).
    pub fn etag_is_md5(&self) -> bool {
        !matches!(self.encryption, Some(Encryption::Kms { .. }))
    }
}

/// One finished part of a multipart upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadedPart {
    pub part_number: i32,
    pub etag: String,
}

/// A bucket, seen through the operations replication uses.
#[async_trait]
pub trait ObjectStore: Send + Sync {
    /// The bucket this store reads and writes.
    fn bucket(&self) -> &str;

    /// Metadata of the current object, `None` if there is none.
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>>;

    /// The current object's metadata and, when it is at most `body_limit` bytes and
    /// `budget` has room for it at once, its content, from one GET; `None` if absent. The
    /// size is known from the response's headers, before any byte of the body is read: a
    /// body that is too large, or has no room in the budget now, is not read (the caller
    /// waits for room and GETs it). Where HEAD then GET would take two requests, this
    /// takes one.
    async fn fetch(
        &self,
        key: &str,
        body_limit: u64,
        budget: &MemoryBudget,
    ) -> Result<Option<FetchedObject>>;

    /// Bytes `range` (inclusive start, exclusive end; `None` for the whole object) of the
    /// object whose ETag is `if_match`; a changed object is an `Error::Precondition`.
    async fn get(&self, key: &str, range: Option<(u64, u64)>, if_match: &str) -> Result<Bytes>;

    /// Writes a whole object in one request; returns its ETag.
    async fn put(&self, key: &str, body: Bytes, attrs: &WriteAttrs) -> Result<String>;

    /// Starts a multipart upload; returns its upload id.
    async fn create_multipart(&self, key: &str, attrs: &WriteAttrs) -> Result<String>;

    /// Uploads one part, with its checksum of `checksum` (the upload's algorithm) for the
    /// server to verify on arrival; returns its ETag.
    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        body: Bytes,
        checksum: Option<ChecksumAlgorithm>,
    ) -> Result<String>;

    /// Completes a multipart upload, only if the target is as `precondition` says (if
    /// given), and, with `checksum` (a full-object one of the upload's algorithm), only if
    /// the assembled object has that checksum; returns the object's ETag.
    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[UploadedPart],
        precondition: Option<&TargetPrecondition>,
        checksum: Option<&Checksum>,
    ) -> Result<String>;

    /// Abandons a multipart upload so no parts are left behind.
    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<()>;

    /// Server-side copy of bytes `range` (start inclusive, end exclusive) of
    /// `source_bucket/key`, if its ETag is still `if_match`, as one part; returns its ETag.
    async fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        source_bucket: &str,
        range: (u64, u64),
        if_match: &str,
    ) -> Result<String>;

    /// Owner and canned ACL of the object (empty where the provider has no ACLs).
    async fn access(&self, key: &str) -> Result<AccessInfo>;

    /// False when the bucket has ACLs turned off (object ownership "bucket owner
    /// enforced", S3's default since 2023) or the provider has no ACLs: then every object
    /// is the bucket owner's and reading object ACLs tells nothing.
    async fn acls_enabled(&self) -> Result<bool>;

    /// The object's tags (empty where the provider has no tagging).
    async fn tags(&self, key: &str) -> Result<Vec<(String, String)>>;

    /// Size of part 1 of a multipart object, if the provider tells (HEAD ?partNumber=1).
    async fn first_part_size(&self, key: &str) -> Result<Option<u64>>;

    /// Server-side copy of `source_bucket/key` (only if its ETag is still `if_match`) into
    /// this bucket under the same key, with `attrs` replacing the metadata; returns the ETag.
    async fn copy_from(
        &self,
        source_bucket: &str,
        key: &str,
        if_match: &str,
        attrs: &WriteAttrs,
    ) -> Result<String>;

    /// Deletes the object; deleting a missing object is not an error.
    async fn delete(&self, key: &str) -> Result<()>;

    /// Up to `max_keys` objects under `prefix` whose keys sort after `start_after`.
    async fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        max_keys: i32,
    ) -> Result<ListPage>;

    /// Up to `max_keys` entries (keys and sub-prefixes) under `prefix` after
    /// `start_after`, grouped by `delimiter` (ListObjectsV2 with `Delimiter`). This default
    /// groups `list_page`'s keys itself, skipping each sub-prefix with one more listing
    /// (start-after the greatest key under it): for stores without a delimiter of their own.
    async fn list_delimited(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        delimiter: &str,
        max_keys: i32,
    ) -> Result<DelimitedPage> {
        let mut page = DelimitedPage::default();
        let mut after = start_after.map(str::to_string);
        let wanted = usize::try_from(max_keys.max(1)).unwrap_or(1);
        'pages: loop {
            let taken = page.objects.len() + page.common_prefixes.len();
            let listed = self
                .list_page(
                    prefix,
                    after.as_deref(),
                    i32::try_from(wanted - taken).unwrap_or(1),
                )
                .await?;
            let more = listed.truncated;
            for object in listed.objects {
                if page.objects.len() + page.common_prefixes.len() >= wanted {
                    page.truncated = true;
                    break 'pages;
                }
                let below = object.key.get(prefix.len()..).unwrap_or_default();
                if let Some(at) = below.find(delimiter).filter(|_| !delimiter.is_empty()) {
                    let common = object.key[..prefix.len() + at + delimiter.len()].to_string();
                    after = Some(crate::backfill::discovery::greatest_under(common.clone()));
                    page.common_prefixes.push(common);
                    continue 'pages;
                }
                after = Some(object.key.clone());
                page.objects.push(object);
            }
            if !more {
                break;
            }
            if page.objects.len() + page.common_prefixes.len() >= wanted {
                page.truncated = true;
                break;
            }
        }
        Ok(page)
    }

    /// Proves the bucket exists and can be listed and read.
    async fn check_readable(&self) -> Result<()>;

    /// Proves objects can be written (and removed) under `probe_key`.
    async fn check_writable(&self, probe_key: &str) -> Result<()>;
}
