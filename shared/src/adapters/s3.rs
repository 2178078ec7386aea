//! The AWS edge for objects: `ObjectStore` over `aws_sdk_s3`, and client construction for
//! a rule's bucket (region, custom endpoint, path-style).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use aws_config::SdkConfig;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::get_object::GetObjectError;
use aws_sdk_s3::operation::head_object::HeadObjectError;
use aws_sdk_s3::primitives::{ByteStream, DateTime as SmithyDateTime, DateTimeFormat};
use aws_sdk_s3::types::{
    ChecksumMode, ChecksumType, CompletedMultipartUpload, CompletedPart, EncodingType, Grant,
    MetadataDirective, ObjectCannedAcl, ObjectOwnership, ServerSideEncryption, StorageClass, Tag,
    TaggingDirective,
};
use bytes::{Bytes, BytesMut};
use chrono::{DateTime, Utc};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use crate::adapters::compat;
use crate::checksum::{Checksum, ChecksumAlgorithm, SentChecksum};
use crate::error::{Error, Result, from_sdk, s3_permission};
use crate::memory_budget::{HeldBytes, MemoryBudget};
use crate::object_store::{
    AccessInfo, ContentHeaders, Encryption, FetchedObject, ListPage, ListedObject, ObjectInfo,
    ObjectStore, TargetPrecondition, UploadedPart, WriteAttrs,
};
use crate::rule::BucketRef;

/// Characters left as they are in a `x-amz-copy-source` key: unreserved ones and '/'.
const COPY_SOURCE_KEEP: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'/');

/// Error code of GetBucketOwnershipControls on a bucket that has none.
const OWNERSHIP_CONTROLS_NOT_FOUND: &str = "OwnershipControlsNotFoundError";

/// Characters left as they are in a tag key or value of `x-amz-tagging`.
const TAG_KEEP: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Builds an S3 client for one side of a rule: its region, and its endpoint and
/// addressing style when it is not AWS. Without an endpoint the standard
/// `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` settings of `base` still apply.
pub fn client_for(base: &SdkConfig, bucket: &BucketRef) -> Client {
    let mut builder = aws_sdk_s3::config::Builder::from(base)
        .region(aws_sdk_s3::config::Region::new(bucket.region.clone()))
        // Checksums only where S3 requires them: S3-compatible servers differ in their
        // support for the newer default trailers, and integrity is verified by ETag.
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
    if let Some(url) = &bucket.endpoint_url {
        builder = builder.endpoint_url(url);
    }
    if bucket.path_style {
        builder = builder.force_path_style(true);
    }
    Client::from_conf(crate::adapters::aws_clients::with_operation_log(builder).build())
}

/// Creates `bucket` in `region` (with a location constraint outside us-east-1);
/// `Ok(false)` when this account already owns it. For tools and tests: crr itself never
/// creates buckets.
pub async fn create_bucket(s3: &Client, bucket: &str, region: &str) -> Result<bool> {
    let mut req = s3.create_bucket().bucket(bucket);
    if region != "us-east-1" {
        req = req.create_bucket_configuration(
            aws_sdk_s3::types::CreateBucketConfiguration::builder()
                .location_constraint(aws_sdk_s3::types::BucketLocationConstraint::from(region))
                .build(),
        );
    }
    match req.send().await {
        Ok(_) => Ok(true),
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_bucket_already_owned_by_you()) =>
        {
            Ok(false)
        }
        Err(e) => Err(from_sdk(
            "CreateBucket",
            format!("bucket {bucket}"),
            "s3:CreateBucket",
            e,
        )),
    }
}

/// Caches one client per (region, endpoint, style): SDK clients hold connection pools and
/// are meant to be built once per process.
#[derive(Clone)]
pub struct S3Clients {
    base: SdkConfig,
    cache: Arc<Mutex<HashMap<ClientKey, Client>>>,
    /// The endpoint the environment names for buckets whose rule names none, read once.
    env_endpoint: Option<String>,
}

/// Region, endpoint and path-style flag: what distinguishes two S3 clients.
type ClientKey = (String, Option<String>, bool);

impl S3Clients {
    pub fn new(base: SdkConfig) -> Self {
        Self {
            base,
            cache: Arc::default(),
            env_endpoint: env_endpoint(),
        }
    }

    /// The client for `bucket`'s region and endpoint.
    pub fn client(&self, bucket: &BucketRef) -> Client {
        let key = (
            bucket.region.clone(),
            bucket.endpoint_url.clone(),
            bucket.path_style,
        );
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        cache
            .entry(key)
            .or_insert_with(|| client_for(&self.base, bucket))
            .clone()
    }

    /// An `ObjectStore` for `bucket`.
    pub fn store(&self, bucket: &BucketRef) -> S3Store {
        let endpoint = bucket.endpoint_url.as_deref();
        S3Store::at(
            self.client(bucket),
            bucket.bucket.clone(),
            endpoint.or(self.env_endpoint.as_deref()),
        )
    }
}

/// `ObjectStore` over one S3 bucket.
#[derive(Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    /// Whether PUT and UploadPart bodies are signed (SHA-256 over every byte). Over HTTPS
    /// they are not: TLS protects them in transit and the checksum every write carries
    /// proves them on arrival (UNSIGNED-PAYLOAD, as S3 allows). Over plain HTTP the
    /// signature is all that protects them from being altered on the way, so it stays.
    sign_payload: bool,
}

impl S3Store {
    /// A store over `bucket`, at the endpoint the standard `AWS_ENDPOINT_URL_S3` /
    /// `AWS_ENDPOINT_URL` settings name (AWS itself without them).
    pub fn new(client: Client, bucket: String) -> Self {
        Self::at(client, bucket, env_endpoint().as_deref())
    }

    /// A store over `bucket` reached at `endpoint` (`None`: AWS itself).
    pub fn at(client: Client, bucket: String, endpoint: Option<&str>) -> Self {
        Self {
            client,
            bucket,
            sign_payload: signs_payload(endpoint),
        }
    }

    /// Reads a GET's body into one buffer of `expected` bytes (its Content-Length),
    /// chunk by chunk: collecting the chunks and joining them would hold the body twice.
    async fn read_body(&self, key: &str, mut body: ByteStream, expected: u64) -> Result<Bytes> {
        let capacity = usize::try_from(expected.min(crate::copy::MAX_SINGLE_REQUEST)).unwrap_or(0);
        let mut buf = BytesMut::with_capacity(capacity);
        loop {
            match body.try_next().await {
                Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
                Ok(None) => return Ok(buf.freeze()),
                Err(e) => {
                    return Err(Error::Transient {
                        operation: "GetObject",
                        resource: self.resource(key),
                        detail: format!("reading the body: {e}"),
                        throttled: false,
                        source: Box::new(e),
                    });
                }
            }
        }
    }

    /// The checksum the target reports for what it stored must be the one sent, where it
    /// reports one of the same algorithm and kind (S3 does; some S3-compatible servers
    /// check the value on arrival but report none).
    fn check_stored(
        &self,
        operation: &'static str,
        key: &str,
        sent: Option<&Checksum>,
        stored: Option<Checksum>,
    ) -> Result<()> {
        if let (Some(want), Some(got)) = (sent, stored)
            && want.agrees_with(&got) == Some(false)
        {
            return Err(Error::Integrity {
                resource: self.resource(key),
                detail: format!("{operation} stored checksum {got}, the source's is {want}"),
            });
        }
        Ok(())
    }

    fn resource(&self, key: &str) -> String {
        format!("s3://{}/{}", self.bucket, key)
    }

    /// A key from a listing asked for with `encoding-type=url`: percent-encoded, '+'
    /// standing for a space, as AWS's own SDKs read it (moto writes a space as %20 and a
    /// '+' as %2B, which reads the same way).
    fn url_decoded(&self, encoded: &str) -> Result<String> {
        crate::key::form_decode(encoded).map_err(|e| Error::Service {
            operation: "ListObjectsV2",
            resource: format!("s3://{}", self.bucket),
            detail: format!("listed key {encoded:?} is not URL-encoded UTF-8: {e}"),
            source: Box::new(e),
        })
    }

    fn err<E, R>(&self, operation: &'static str, key: &str, err: SdkError<E, R>) -> Error
    where
        E: aws_smithy_types::error::metadata::ProvideErrorMetadata
            + std::error::Error
            + Send
            + Sync
            + 'static,
        R: crate::error::HttpStatus + std::fmt::Debug + Send + Sync + 'static,
    {
        from_sdk(operation, self.resource(key), s3_permission(operation), err)
    }
}

/// The S3 endpoint the standard `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` settings name.
fn env_endpoint() -> Option<String> {
    std::env::var("AWS_ENDPOINT_URL_S3")
        .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
        .ok()
}

/// Whether writes to `endpoint` sign their payload: only over plain HTTP (AWS itself, with
/// no endpoint, is HTTPS).
fn signs_payload(endpoint: Option<&str>) -> bool {
    endpoint.is_some_and(|e| e.trim().to_ascii_lowercase().starts_with("http://"))
}

fn sdk_algorithm(a: ChecksumAlgorithm) -> aws_sdk_s3::types::ChecksumAlgorithm {
    use aws_sdk_s3::types::ChecksumAlgorithm as Sdk;
    match a {
        ChecksumAlgorithm::Crc64Nvme => Sdk::Crc64Nvme,
        ChecksumAlgorithm::Crc32c => Sdk::Crc32C,
        ChecksumAlgorithm::Crc32 => Sdk::Crc32,
        ChecksumAlgorithm::Sha1 => Sdk::Sha1,
        ChecksumAlgorithm::Sha256 => Sdk::Sha256,
    }
}

/// The stored checksum among a response's checksum fields (S3 returns at most one).
fn checksum_of(
    values: [(ChecksumAlgorithm, Option<&str>); 5],
    kind: Option<&ChecksumType>,
) -> Option<Checksum> {
    let composite = matches!(kind, Some(ChecksumType::Composite));
    values.into_iter().find_map(|(algorithm, value)| {
        value
            .filter(|v| !v.is_empty())
            .map(|v| Checksum::from_header(algorithm, v, composite))
    })
}

/// The checksum fields of any S3 output that has them, in `checksum_of`'s order.
macro_rules! checksums {
    ($out:expr) => {{
        let out = &$out;
        [
            (ChecksumAlgorithm::Crc64Nvme, out.checksum_crc64_nvme()),
            (ChecksumAlgorithm::Crc32c, out.checksum_crc32_c()),
            (ChecksumAlgorithm::Crc32, out.checksum_crc32()),
            (ChecksumAlgorithm::Sha1, out.checksum_sha1()),
            (ChecksumAlgorithm::Sha256, out.checksum_sha256()),
        ]
    }};
}

/// Sets a known checksum value as its header on any builder with S3's checksum setters
/// (the SDK sends it as it is).
macro_rules! with_checksum_value {
    ($builder:expr, $checksum:expr) => {{
        let b = $builder;
        let c: &Checksum = $checksum;
        let v = Some(c.value.clone());
        match c.algorithm {
            ChecksumAlgorithm::Crc64Nvme => b.set_checksum_crc64_nvme(v),
            ChecksumAlgorithm::Crc32c => b.set_checksum_crc32_c(v),
            ChecksumAlgorithm::Crc32 => b.set_checksum_crc32(v),
            ChecksumAlgorithm::Sha1 => b.set_checksum_sha1(v),
            ChecksumAlgorithm::Sha256 => b.set_checksum_sha256(v),
        }
    }};
}

/// Sends a write with a body: signed over plain HTTP, UNSIGNED-PAYLOAD over HTTPS
/// (`S3Store::sign_payload`).
macro_rules! send_body {
    ($req:expr, $sign:expr) => {
        match $sign {
            true => $req.send().await,
            false => $req.customize().disable_payload_signing().send().await,
        }
    };
}

fn unquote(etag: &str) -> String {
    etag.trim_matches('"').to_string()
}

fn to_chrono(t: &SmithyDateTime) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.secs(), t.subsec_nanos())
}

fn expires_of(value: Option<&String>) -> Option<SmithyDateTime> {
    value.and_then(|s| SmithyDateTime::from_str(s, DateTimeFormat::HttpDate).ok())
}

fn metadata_map(attrs: &WriteAttrs) -> Option<HashMap<String, String>> {
    Some(
        attrs
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    )
}

/// Tags as the `x-amz-tagging` header wants them: a URL-encoded query string.
fn tagging_header(tags: &[(String, String)]) -> Option<String> {
    if tags.is_empty() {
        return None;
    }
    let enc = |s: &str| utf8_percent_encode(s, TAG_KEEP).to_string();
    Some(
        tags.iter()
            .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
            .collect::<Vec<_>>()
            .join("&"),
    )
}

fn sse_of(e: &Option<Encryption>) -> (Option<ServerSideEncryption>, Option<String>) {
    match e {
        None => (None, None),
        Some(Encryption::S3Managed) => (Some(ServerSideEncryption::Aes256), None),
        Some(Encryption::Kms { key_id }) => (Some(ServerSideEncryption::AwsKms), key_id.clone()),
    }
}

/// `If-Match` / `If-None-Match` values for a conditional write of the target.
fn precondition_headers(p: &Option<TargetPrecondition>) -> (Option<String>, Option<String>) {
    match p {
        None => (None, None),
        Some(TargetPrecondition::Etag(e)) => (Some(format!("\"{e}\"")), None),
        Some(TargetPrecondition::Absent) => (None, Some("*".to_string())),
    }
}

/// `x-amz-copy-source`: bucket and percent-encoded key.
fn copy_source(bucket: &str, key: &str) -> String {
    format!("{}/{}", bucket, utf8_percent_encode(key, COPY_SOURCE_KEEP))
}

/// `ObjectInfo` from a HEAD or GET response, which share their header accessors but no
/// trait.
macro_rules! object_info {
    ($out:expr, $key:expr) => {{
        let out = &$out;
        ObjectInfo {
            key: $key.to_string(),
            size: u64::try_from(out.content_length().unwrap_or(0)).unwrap_or(0),
            etag: out.e_tag().map(unquote).unwrap_or_default(),
            last_modified: out.last_modified().and_then(to_chrono),
            version_id: out.version_id().map(str::to_string),
            headers: ContentHeaders {
                content_type: out.content_type().map(str::to_string),
                content_encoding: out.content_encoding().map(str::to_string),
                content_disposition: out.content_disposition().map(str::to_string),
                content_language: out.content_language().map(str::to_string),
                cache_control: out.cache_control().map(str::to_string),
                expires: out.expires_string().map(str::to_string),
            },
            metadata: out
                .metadata()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                        .collect()
                })
                .unwrap_or_default(),
            storage_class: out
                .storage_class()
                .map(|c| c.as_str().to_string())
                .filter(|c| c != "STANDARD"),
            encryption: match out.server_side_encryption() {
                Some(ServerSideEncryption::AwsKms) | Some(ServerSideEncryption::AwsKmsDsse) => {
                    Some(Encryption::Kms {
                        key_id: out.ssekms_key_id().map(str::to_string),
                    })
                }
                Some(ServerSideEncryption::Aes256) => Some(Encryption::S3Managed),
                _ => None,
            },
            tag_count: out
                .tag_count()
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(0),
            checksum: checksum_of(checksums!(out), out.checksum_type()),
        }
    }};
}

/// Applies content headers and metadata to any of the S3 write builders, which share the
/// same setter names but no trait.
macro_rules! with_attrs {
    ($builder:expr, $attrs:expr) => {{
        let h = &$attrs.headers;
        let (sse, kms_key) = sse_of(&$attrs.encryption);
        $builder
            .set_storage_class($attrs.storage_class.as_deref().map(StorageClass::from))
            .set_server_side_encryption(sse)
            .set_ssekms_key_id(kms_key)
            .set_tagging(tagging_header(&$attrs.tags))
            .set_acl($attrs.acl.as_deref().map(ObjectCannedAcl::from))
            .set_content_type(h.content_type.clone())
            .set_content_encoding(h.content_encoding.clone())
            .set_content_disposition(h.content_disposition.clone())
            .set_content_language(h.content_language.clone())
            .set_cache_control(h.cache_control.clone())
            .set_expires(expires_of(h.expires.as_ref()))
            .set_metadata(metadata_map($attrs))
    }};
}

#[async_trait]
impl ObjectStore for S3Store {
    fn bucket(&self) -> &str {
        &self.bucket
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        let out = match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .checksum_mode(ChecksumMode::Enabled)
            .send()
            .await
        {
            Ok(out) => out,
            Err(SdkError::ServiceError(e)) if matches!(e.err(), HeadObjectError::NotFound(_)) => {
                return Ok(None);
            }
            Err(e) => return Err(self.err("HeadObject", key, e)),
        };
        Ok(Some(object_info!(out, key)))
    }

    async fn fetch(
        &self,
        key: &str,
        body_limit: u64,
        budget: &MemoryBudget,
    ) -> Result<Option<FetchedObject>> {
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            // The stored checksum, to carry to the replica. Asked for with the header
            // alone, not the SDK's checksum mode, which would also hash the body to check
            // it: the target checks the bytes against this value on arrival anyway.
            .customize()
            .mutate_request(|req| {
                req.headers_mut().insert("x-amz-checksum-mode", "ENABLED");
            })
            .send()
            .await
        {
            Ok(out) => out,
            Err(SdkError::ServiceError(e)) if matches!(e.err(), GetObjectError::NoSuchKey(_)) => {
                return Ok(None);
            }
            Err(e) => return Err(self.err("GetObject", key, e)),
        };
        let info = object_info!(out, key);
        // The headers told the size; no byte of the body is read before it has room.
        let room = (info.size <= body_limit)
            .then(|| budget.try_reserve(info.size))
            .flatten();
        let Some(room) = room else {
            // Dropping the unread body closes the connection: cheaper than reading it.
            return Ok(Some(FetchedObject { info, body: None }));
        };
        let body = self.read_body(key, out.body, info.size).await?;
        Ok(Some(FetchedObject {
            info,
            body: Some(HeldBytes::new(body, room)),
        }))
    }

    async fn get(&self, key: &str, range: Option<(u64, u64)>, if_match: &str) -> Result<Bytes> {
        let mut req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .if_match(format!("\"{if_match}\""));
        if let Some((start, end)) = range {
            req = req.range(format!("bytes={}-{}", start, end.saturating_sub(1)));
        }
        let out = match req.send().await {
            Ok(out) => out,
            Err(SdkError::ServiceError(e)) if matches!(e.err(), GetObjectError::NoSuchKey(_)) => {
                return Err(Error::NotFound {
                    operation: "GetObject",
                    resource: self.resource(key),
                });
            }
            Err(e) => return Err(self.err("GetObject", key, e)),
        };
        // Not every S3-compatible server honours If-Match on GET (s3s-fs ignores it): the
        // ETag of the answer tells whether it is still the object that was asked for.
        if out.e_tag().is_some_and(|etag| unquote(etag) != if_match) {
            return Err(Error::Precondition {
                operation: "GetObject",
                resource: self.resource(key),
            });
        }
        let expected = match range {
            Some((start, end)) => end.saturating_sub(start),
            None => u64::try_from(out.content_length().unwrap_or(0)).unwrap_or(0),
        };
        self.read_body(key, out.body, expected).await
    }

    async fn put(&self, key: &str, body: Bytes, attrs: &WriteAttrs) -> Result<String> {
        let (if_match, if_none_match) = precondition_headers(&attrs.precondition);
        let req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .set_if_match(if_match)
            .set_if_none_match(if_none_match);
        let sent = attrs.checksum.value_for(&body);
        let req = with_attrs!(req, attrs);
        let req = match &sent {
            // The algorithm named too (`x-amz-sdk-checksum-algorithm`; the SDK still sends
            // the value as given): servers that keep a checksum only when the algorithm is
            // named (moto) keep it.
            Some(c) => with_checksum_value!(req.checksum_algorithm(sdk_algorithm(c.algorithm)), c),
            None => req,
        }
        .body(ByteStream::from(body));
        let out = send_body!(req, self.sign_payload).map_err(|e| self.err("PutObject", key, e))?;
        let stored = checksum_of(checksums!(out), None);
        self.check_stored("PutObject", key, sent.as_ref(), stored)?;
        Ok(out.e_tag().map(unquote).unwrap_or_default())
    }

    async fn create_multipart(&self, key: &str, attrs: &WriteAttrs) -> Result<String> {
        let req = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key);
        // Parts carry checksums of the upload's algorithm; a CRC one makes a full-object
        // checksum of the whole (S3 checks a given one at completion).
        let req = match attrs.checksum.algorithm() {
            Some(a) => req
                .checksum_algorithm(sdk_algorithm(a))
                .checksum_type(match a.combines() {
                    true => ChecksumType::FullObject,
                    false => ChecksumType::Composite,
                }),
            None => req,
        };
        let out = with_attrs!(req, attrs)
            .send()
            .await
            .map_err(|e| self.err("CreateMultipartUpload", key, e))?;
        out.upload_id()
            .map(str::to_string)
            .ok_or_else(|| Error::Integrity {
                resource: self.resource(key),
                detail: "CreateMultipartUpload returned no upload id".into(),
            })
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        body: Bytes,
        checksum: Option<ChecksumAlgorithm>,
    ) -> Result<String> {
        let req = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(part_number);
        let req = match checksum {
            Some(a) => with_checksum_value!(req, &Checksum::compute(a, &body)),
            None => req,
        }
        .body(ByteStream::from(body));
        let out = send_body!(req, self.sign_payload).map_err(|e| self.err("UploadPart", key, e))?;
        Ok(out.e_tag().map(unquote).unwrap_or_default())
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[UploadedPart],
        precondition: Option<&TargetPrecondition>,
        checksum: Option<&Checksum>,
    ) -> Result<String> {
        let (if_match, if_none_match) = precondition_headers(&precondition.cloned());
        let completed = CompletedMultipartUpload::builder()
            .set_parts(Some(
                parts
                    .iter()
                    .map(|p| {
                        CompletedPart::builder()
                            .part_number(p.part_number)
                            .e_tag(format!("\"{}\"", p.etag))
                            .build()
                    })
                    .collect(),
            ))
            .build();
        let sent = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .set_if_match(if_match)
            .set_if_none_match(if_none_match)
            .multipart_upload(completed);
        // The whole object's checksum, for S3 to check the assembled parts against.
        let sent = match checksum {
            Some(c) => with_checksum_value!(sent.checksum_type(ChecksumType::FullObject), c),
            None => sent,
        }
        .send()
        .await;
        match sent {
            Ok(out) => {
                let stored = checksum_of(checksums!(out), out.checksum_type());
                self.check_stored("CompleteMultipartUpload", key, checksum, stored)?;
                Ok(out.e_tag().map(unquote).unwrap_or_default())
            }
            Err(e) => match compat::success_body_with_root(&e, "CompleteMultipartUploadResponse")
                .and_then(|body| compat::xml_text(&body, "ETag"))
            {
                Some(etag) => Ok(unquote(&etag)),
                None => Err(self.err("CompleteMultipartUpload", key, e)),
            },
        }
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<()> {
        self.client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
            .map_err(|e| self.err("AbortMultipartUpload", key, e))?;
        Ok(())
    }

    async fn copy_from(
        &self,
        source_bucket: &str,
        key: &str,
        if_match: &str,
        attrs: &WriteAttrs,
    ) -> Result<String> {
        let (target_if_match, if_none_match) = precondition_headers(&attrs.precondition);
        let req = self
            .client
            .copy_object()
            .bucket(&self.bucket)
            .key(key)
            .copy_source(copy_source(source_bucket, key))
            .copy_source_if_match(format!("\"{if_match}\""))
            .set_if_match(target_if_match)
            .set_if_none_match(if_none_match)
            .metadata_directive(MetadataDirective::Replace)
            // Always REPLACE, with the tags read from the source (none when it has none):
            // with COPY, moto leaves an overwritten replica's old tags in place when the
            // source has none (found by tests/reliability.rs).
            .tagging_directive(TaggingDirective::Replace);
        let out = with_attrs!(req, attrs)
            .send()
            .await
            .map_err(|e| self.err("CopyObject", key, e))?;
        // S3 computes the copy's checksum afresh, with the source's algorithm: the
        // source's own full-object value must come out again.
        let result = out.copy_object_result();
        let stored = result.and_then(|r| checksum_of(checksums!(r), r.checksum_type()));
        let sent = match &attrs.checksum {
            SentChecksum::Known(c) => Some(c),
            _ => None,
        };
        self.check_stored("CopyObject", key, sent, stored)?;
        Ok(result
            .and_then(|r| r.e_tag())
            .map(unquote)
            .unwrap_or_default())
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
        let out = self
            .client
            .upload_part_copy()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(part_number)
            .copy_source(copy_source(source_bucket, key))
            .copy_source_range(format!("bytes={}-{}", range.0, range.1.saturating_sub(1)))
            .copy_source_if_match(format!("\"{if_match}\""))
            .send()
            .await
            .map_err(|e| self.err("UploadPartCopy", key, e))?;
        Ok(out
            .copy_part_result()
            .and_then(|r| r.e_tag())
            .map(unquote)
            .unwrap_or_default())
    }

    async fn access(&self, key: &str) -> Result<AccessInfo> {
        let out = match self
            .client
            .get_object_acl()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => out,
            // Providers without ACLs answer 501 Not Implemented.
            Err(SdkError::ServiceError(e)) if e.raw().status().as_u16() == 501 => {
                return Ok(AccessInfo::default());
            }
            Err(e) => return Err(self.err("GetObjectAcl", key, e)),
        };
        let group = |g: &Grant| {
            g.grantee().and_then(|grantee| grantee.uri()).map(|uri| {
                (
                    uri.to_string(),
                    g.permission()
                        .map(|p| p.as_str().to_string())
                        .unwrap_or_default(),
                )
            })
        };
        let groups: Vec<(String, String)> = out.grants().iter().filter_map(group).collect();
        let has = |uri_end: &str, perm: &str| {
            groups
                .iter()
                .any(|(u, p)| u.ends_with(uri_end) && p == perm)
        };
        let canned_acl = if has("/global/AllUsers", "READ") && has("/global/AllUsers", "WRITE") {
            Some("public-read-write")
        } else if has("/global/AllUsers", "READ") {
            Some("public-read")
        } else if has("/global/AuthenticatedUsers", "READ") {
            Some("authenticated-read")
        } else {
            None
        };
        Ok(AccessInfo {
            owner_id: out.owner().and_then(|o| o.id()).map(str::to_string),
            canned_acl: canned_acl.map(str::to_string),
        })
    }

    async fn acls_enabled(&self) -> Result<bool> {
        match self
            .client
            .get_bucket_ownership_controls()
            .bucket(&self.bucket)
            .send()
            .await
        {
            Ok(out) => Ok(!out
                .ownership_controls()
                .map(|c| c.rules())
                .unwrap_or_default()
                .iter()
                .any(|r| r.object_ownership() == &ObjectOwnership::BucketOwnerEnforced)),
            // No ownership controls set: a bucket from before 2023, ACLs in force. The SDK
            // models no variant for this error, so its code is the only way to tell.
            Err(SdkError::ServiceError(e))
                if e.err().code() == Some(OWNERSHIP_CONTROLS_NOT_FOUND) =>
            {
                Ok(true)
            }
            // Providers without ACLs or ownership controls (s3s-fs) answer 501.
            Err(SdkError::ServiceError(e)) if e.raw().status().as_u16() == 501 => Ok(false),
            Err(e) => Err(self.err("GetBucketOwnershipControls", "", e)),
        }
    }

    async fn tags(&self, key: &str) -> Result<Vec<(String, String)>> {
        match self
            .client
            .get_object_tagging()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => Ok(out
                .tag_set()
                .iter()
                .map(|t: &Tag| (t.key().to_string(), t.value().to_string()))
                .collect()),
            // Providers without tagging (s3s-fs) answer 501 Not Implemented.
            Err(SdkError::ServiceError(e)) if e.raw().status().as_u16() == 501 => Ok(Vec::new()),
            Err(e) => Err(self.err("GetObjectTagging", key, e)),
        }
    }

    async fn first_part_size(&self, key: &str) -> Result<Option<u64>> {
        let out = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .part_number(1)
            .send()
            .await
            .map_err(|e| self.err("HeadObject", key, e))?;
        // Without a parts count the provider ignored partNumber and described the whole object.
        Ok(match out.parts_count() {
            Some(n) if n > 1 => out.content_length().and_then(|l| u64::try_from(l).ok()),
            _ => None,
        })
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.err("DeleteObject", key, e))?;
        Ok(())
    }

    async fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        max_keys: i32,
    ) -> Result<ListPage> {
        let request = |encoding: Option<EncodingType>| {
            self.client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_start_after(start_after.map(str::to_string))
                .max_keys(max_keys)
                .set_encoding_type(encoding)
                .send()
        };
        let out = match request(None).await {
            Ok(out) => out,
            // A key holding a character XML 1.0 cannot carry (U+0001...) makes the page
            // unreadable; asked to, S3 percent-encodes the keys instead. Asked only then:
            // not every S3-compatible server encodes them (s3s-fs says it does but does
            // not), and there decoding would change keys holding '%' or '+'.
            Err(e) if compat::success_body_with_root(&e, "ListBucketResult").is_some() => {
                request(Some(EncodingType::Url))
                    .await
                    .map_err(|e| self.err("ListObjectsV2", prefix, e))?
            }
            Err(e) => return Err(self.err("ListObjectsV2", prefix, e)),
        };
        let url_encoded = out.encoding_type() == Some(&EncodingType::Url);
        let mut objects = Vec::with_capacity(out.contents().len());
        for o in out.contents() {
            let Some(key) = o.key() else { continue };
            objects.push(ListedObject {
                key: if url_encoded {
                    self.url_decoded(key)?
                } else {
                    key.to_string()
                },
                size: u64::try_from(o.size().unwrap_or(0)).unwrap_or(0),
                etag: o.e_tag().map(unquote).unwrap_or_default(),
                last_modified: o.last_modified().and_then(to_chrono),
            });
        }
        Ok(ListPage {
            objects,
            truncated: out.is_truncated().unwrap_or(false),
        })
    }

    async fn list_delimited(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        delimiter: &str,
        max_keys: i32,
    ) -> Result<crate::object_store::DelimitedPage> {
        let request = |encoding: Option<EncodingType>| {
            self.client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .delimiter(delimiter)
                .set_start_after(start_after.map(str::to_string))
                .max_keys(max_keys)
                .set_encoding_type(encoding)
                .send()
        };
        // As `list_page`: percent-encoded only when a key cannot be carried in XML.
        let out = match request(None).await {
            Ok(out) => out,
            Err(e) if compat::success_body_with_root(&e, "ListBucketResult").is_some() => {
                request(Some(EncodingType::Url))
                    .await
                    .map_err(|e| self.err("ListObjectsV2", prefix, e))?
            }
            Err(e) => return Err(self.err("ListObjectsV2", prefix, e)),
        };
        let url_encoded = out.encoding_type() == Some(&EncodingType::Url);
        let decoded = |s: &str| -> Result<String> {
            match url_encoded {
                true => self.url_decoded(s),
                false => Ok(s.to_string()),
            }
        };
        let mut objects = Vec::with_capacity(out.contents().len());
        for o in out.contents() {
            let Some(key) = o.key() else { continue };
            objects.push(ListedObject {
                key: decoded(key)?,
                size: u64::try_from(o.size().unwrap_or(0)).unwrap_or(0),
                etag: o.e_tag().map(unquote).unwrap_or_default(),
                last_modified: o.last_modified().and_then(to_chrono),
            });
        }
        let mut common_prefixes = Vec::with_capacity(out.common_prefixes().len());
        for p in out.common_prefixes() {
            if let Some(p) = p.prefix() {
                common_prefixes.push(decoded(p)?);
            }
        }
        Ok(crate::object_store::DelimitedPage {
            objects,
            common_prefixes,
            truncated: out.is_truncated().unwrap_or(false),
        })
    }

    async fn check_readable(&self) -> Result<()> {
        self.list_page("", None, 1).await.map(|_| ())
    }

    async fn check_writable(&self, probe_key: &str) -> Result<()> {
        self.put(
            probe_key,
            Bytes::from_static(b"crr write probe"),
            &WriteAttrs::default(),
        )
        .await?;
        self.delete(probe_key).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use aws_smithy_mocks::{RuleMode, mock, mock_client};
    use aws_smithy_runtime_api::box_error::BoxError;
    use aws_smithy_runtime_api::client::interceptors::Intercept;
    use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef;
    use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
    use aws_smithy_types::config_bag::ConfigBag;

    use super::*;

    /// The headers of every request as it left for the wire (signed).
    #[derive(Debug, Clone, Default)]
    struct Sent(Arc<Mutex<Vec<HashMap<String, String>>>>);

    impl Intercept for Sent {
        fn name(&self) -> &'static str {
            "sent-headers"
        }
        fn read_before_transmit(
            &self,
            context: &BeforeTransmitInterceptorContextRef<'_>,
            _components: &RuntimeComponents,
            _cfg: &mut ConfigBag,
        ) -> std::result::Result<(), BoxError> {
            let headers = context
                .request()
                .headers()
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
                .collect();
            self.0.lock().unwrap().push(headers);
            Ok(())
        }
    }

    fn store(endpoint: &str, sent: &Sent) -> S3Store {
        let put = mock!(aws_sdk_s3::Client::put_object).then_output(|| {
            aws_sdk_s3::operation::put_object::PutObjectOutput::builder()
                .e_tag("\"e\"")
                .build()
        });
        let part = mock!(aws_sdk_s3::Client::upload_part).then_output(|| {
            aws_sdk_s3::operation::upload_part::UploadPartOutput::builder()
                .e_tag("\"e\"")
                .build()
        });
        let sent = sent.clone();
        let client = mock_client!(aws_sdk_s3, RuleMode::MatchAny, [&put, &part], |c| c
            .interceptor(sent.clone())
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired));
        S3Store::at(client, "b".into(), Some(endpoint))
    }

    #[tokio::test]
    async fn payloads_are_signed_over_http_and_checked_by_checksum_over_https() {
        for (endpoint, signed) in [
            ("http://127.0.0.1:9000", true),
            ("https://s3.example", false),
        ] {
            let sent = Sent::default();
            let s3 = store(endpoint, &sent);
            let attrs = WriteAttrs {
                checksum: SentChecksum::Compute(ChecksumAlgorithm::Crc64Nvme),
                ..WriteAttrs::default()
            };
            s3.put("k", Bytes::from_static(b"hello world"), &attrs)
                .await
                .unwrap();
            s3.upload_part(
                "k",
                "u",
                1,
                Bytes::from_static(b"hello world"),
                Some(ChecksumAlgorithm::Crc32c),
            )
            .await
            .unwrap();
            let requests = sent.0.lock().unwrap().clone();
            assert_eq!(requests.len(), 2, "{endpoint}");
            for headers in requests {
                let payload = headers
                    .get("x-amz-content-sha256")
                    .cloned()
                    .unwrap_or_default();
                match signed {
                    // The SHA-256 of the body, signed.
                    true => assert_eq!(payload.len(), 64, "{endpoint}: {headers:?}"),
                    false => assert!(
                        payload.contains("UNSIGNED-PAYLOAD"),
                        "{endpoint}: {headers:?}"
                    ),
                }
                // Either way the body carries a CRC (a header, or an aws-chunked trailer)
                // for S3 to check on arrival.
                let checksum = headers.keys().any(|k| k.starts_with("x-amz-checksum-"))
                    || headers
                        .get("x-amz-trailer")
                        .is_some_and(|t| t.starts_with("x-amz-checksum-"));
                assert!(checksum, "{endpoint}: {headers:?}");
            }
        }
    }

    #[test]
    fn only_plain_http_endpoints_sign_payloads() {
        assert!(signs_payload(Some("http://localhost:9000")));
        assert!(signs_payload(Some("HTTP://10.0.0.1")));
        assert!(!signs_payload(Some("https://s3.eu-west-1.amazonaws.com")));
        assert!(!signs_payload(None));
    }
}
