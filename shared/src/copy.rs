//! The copy engine: server-side (CopyObject) or streaming (ranged GETs -> PutObject or a
//! multipart upload with a bounded number of parts in flight), every copy verified.

use std::collections::BTreeMap;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use md5::{Digest, Md5};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};

use crate::error::{Error, Result};
use crate::object_store::{ObjectInfo, ObjectStore, UploadedPart, WriteAttrs};
use crate::rule::ResolvedCopyMode;

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

    /// True for metadata names written by crr rather than by the user.
    pub fn is_marker(name: &str) -> bool {
        name.starts_with("crr-source-")
    }
}

/// Largest object a single PutObject or CopyObject may write.
pub const MAX_SINGLE_REQUEST: u64 = 5 * 1024 * 1024 * 1024;
/// S3's limit on parts per multipart upload.
const MAX_PARTS: u64 = 10_000;

/// Tuning of the copy engine.
#[derive(Debug, Clone)]
pub struct CopyEngine {
    /// Objects larger than this are copied in parts.
    pub multipart_threshold: u64,
    /// Size of each part (grown automatically to stay within 10,000 parts).
    pub part_size: u64,
    /// Parts transferred at once; memory in stream mode is bounded by this x `part_size`.
    pub parts_in_flight: usize,
}

impl Default for CopyEngine {
    fn default() -> Self {
        Self {
            multipart_threshold: 64 * 1024 * 1024,
            part_size: 16 * 1024 * 1024,
            parts_in_flight: 4,
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
    StreamSingle,
    StreamMultipart,
}

/// Metadata and headers to write on a replica of `info` from `source_bucket`.
pub fn replica_attrs(source_bucket: &str, info: &ObjectInfo) -> WriteAttrs {
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
    WriteAttrs {
        headers: info.headers.clone(),
        metadata,
    }
}

/// True when `info` describes an object crr itself wrote as a replica.
pub fn is_replica(info: &ObjectInfo) -> bool {
    info.metadata.contains_key(marker::SOURCE_BUCKET)
        && info.metadata.contains_key(marker::SOURCE_ETAG)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The ETag S3 gives a single-request upload of unencrypted or SSE-S3 data: its MD5.
fn md5_hex(data: &[u8]) -> String {
    hex(&Md5::digest(data))
}

/// The ETag S3 gives a multipart upload: MD5 of the parts' MD5s, then `-<parts>`.
fn multipart_etag(part_md5s: &[[u8; 16]]) -> String {
    let mut all = Md5::new();
    for d in part_md5s {
        all.update(d);
    }
    format!("{}-{}", hex(&all.finalize()), part_md5s.len())
}

impl CopyEngine {
    /// Copies the object `info` (as HEAD saw it in `source`) to the same key in `target`.
    pub async fn copy(
        &self,
        source: &dyn ObjectStore,
        target: &dyn ObjectStore,
        info: &ObjectInfo,
        mode: ResolvedCopyMode,
    ) -> Result<CopyOutcome> {
        let attrs = replica_attrs(source.bucket(), info);
        match mode {
            ResolvedCopyMode::ServerSide if info.size <= MAX_SINGLE_REQUEST => {
                self.server_side(source, target, info, &attrs).await
            }
            // Multipart server-side copy (UploadPartCopy) is not built yet: larger
            // objects travel through this function, in bounded memory.
            ResolvedCopyMode::ServerSide | ResolvedCopyMode::Stream => {
                if info.size <= self.multipart_threshold && info.size <= MAX_SINGLE_REQUEST {
                    self.stream_single(source, target, info, &attrs).await
                } else {
                    self.stream_multipart(source, target, info, &attrs).await
                }
            }
        }
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
        if !info.etag.contains('-') && etag != info.etag {
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
        attrs: &WriteAttrs,
    ) -> Result<CopyOutcome> {
        let body = source.get(&info.key, None, &info.etag).await?;
        if body.len() as u64 != info.size {
            return Err(Error::Integrity {
                resource: format!("s3://{}/{}", source.bucket(), info.key),
                detail: format!("read {} bytes, expected {}", body.len(), info.size),
            });
        }
        let md5 = md5_hex(&body);
        if !info.etag.contains('-') && md5 != info.etag {
            return Err(integrity(source, &info.key, &info.etag, &md5));
        }
        let etag = target.put(&info.key, body, attrs).await?;
        if etag != md5 {
            return Err(integrity(target, &info.key, &md5, &etag));
        }
        Ok(CopyOutcome {
            bytes: info.size,
            etag,
            method: CopyMethod::StreamSingle,
        })
    }

    async fn stream_multipart(
        &self,
        source: &dyn ObjectStore,
        target: &dyn ObjectStore,
        info: &ObjectInfo,
        attrs: &WriteAttrs,
    ) -> Result<CopyOutcome> {
        let part_size = self
            .part_size
            .max(info.size.div_ceil(MAX_PARTS))
            .max(5 * 1024 * 1024);
        let upload_id = target.create_multipart(&info.key, attrs).await?;
        let result = self
            .upload_parts(source, target, info, &upload_id, part_size)
            .await;
        let (parts, digests) = match result {
            Ok(done) => done,
            Err(e) => {
                // Leave no orphaned parts behind; the copy's own error is what matters.
                if let Err(abort) = target.abort_multipart(&info.key, &upload_id).await {
                    tracing::warn!(key = %info.key, error = %abort, "abort of multipart upload failed");
                }
                return Err(e);
            }
        };
        let etag = target
            .complete_multipart(&info.key, &upload_id, &parts)
            .await?;
        let expected = multipart_etag(&digests);
        if etag != expected {
            return Err(integrity(target, &info.key, &expected, &etag));
        }
        Ok(CopyOutcome {
            bytes: info.size,
            etag,
            method: CopyMethod::StreamMultipart,
        })
    }

    async fn upload_parts(
        &self,
        source: &dyn ObjectStore,
        target: &dyn ObjectStore,
        info: &ObjectInfo,
        upload_id: &str,
        part_size: u64,
    ) -> Result<(Vec<UploadedPart>, Vec<[u8; 16]>)> {
        let count = info.size.div_ceil(part_size);
        let mut done: Vec<(UploadedPart, [u8; 16])> = futures::stream::iter(0..count)
            .map(|i| async move {
                let start = i * part_size;
                let end = (start + part_size).min(info.size);
                let body: Bytes = source
                    .get(&info.key, Some((start, end)), &info.etag)
                    .await?;
                if body.len() as u64 != end - start {
                    return Err(Error::Integrity {
                        resource: format!("s3://{}/{}", source.bucket(), info.key),
                        detail: format!("range {start}-{end} returned {} bytes", body.len()),
                    });
                }
                let digest: [u8; 16] = Md5::digest(&body).into();
                let part_number = i32::try_from(i + 1).map_err(|_| Error::Integrity {
                    resource: format!("s3://{}/{}", target.bucket(), info.key),
                    detail: "too many parts".into(),
                })?;
                let etag = target
                    .upload_part(&info.key, upload_id, part_number, body)
                    .await?;
                if etag != hex(&digest) {
                    return Err(integrity(target, &info.key, &hex(&digest), &etag));
                }
                Ok((UploadedPart { part_number, etag }, digest))
            })
            .buffer_unordered(self.parts_in_flight.max(1))
            .try_collect()
            .await?;
        done.sort_by_key(|(p, _)| p.part_number);
        Ok(done.into_iter().unzip())
    }
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
    use crate::memory::{MemoryObjectStore, MemoryWorld};

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
        let out = CopyEngine::default()
            .copy(&src, &dst, &info, ResolvedCopyMode::Stream)
            .await
            .unwrap();
        assert_eq!(out.method, CopyMethod::StreamSingle);
        let replica = dst.head("dir/a b.txt").await.unwrap().unwrap();
        assert_eq!(replica.etag, info.etag);
        assert_eq!(replica.headers, info.headers);
        assert_eq!(replica.metadata["owner"], "alice");
        assert_eq!(replica.metadata[marker::SOURCE_BUCKET], "src");
        assert!(is_replica(&replica));
        assert!(!is_replica(&info));
        assert_eq!(dst.bytes("dir/a b.txt"), src.bytes("dir/a b.txt"));
    }

    #[tokio::test]
    async fn large_objects_go_through_multipart_with_the_s3_etag() {
        let (src, info) = seeded(12 * 1024 * 1024 + 3).await;
        let dst = src.world().store("dst");
        let engine = CopyEngine {
            multipart_threshold: 5 * 1024 * 1024,
            part_size: 5 * 1024 * 1024,
            parts_in_flight: 2,
        };
        let out = engine
            .copy(&src, &dst, &info, ResolvedCopyMode::Stream)
            .await
            .unwrap();
        assert_eq!(out.method, CopyMethod::StreamMultipart);
        assert!(out.etag.ends_with("-3"), "{}", out.etag);
        assert_eq!(dst.bytes("dir/a b.txt"), src.bytes("dir/a b.txt"));
    }

    #[tokio::test]
    async fn a_source_changed_mid_copy_is_a_precondition_failure() {
        let (src, mut info) = seeded(10).await;
        info.etag = "0123456789abcdef0123456789abcdef".into();
        let dst = src.world().store("dst");
        let err = CopyEngine::default()
            .copy(&src, &dst, &info, ResolvedCopyMode::Stream)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Precondition { .. }), "{err}");
        assert!(dst.head("dir/a b.txt").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn server_side_copy_and_zero_byte_objects() {
        let (src, info) = seeded(0).await;
        let dst = src.world().store("dst");
        let out = CopyEngine::default()
            .copy(&src, &dst, &info, ResolvedCopyMode::ServerSide)
            .await
            .unwrap();
        assert_eq!(out.method, CopyMethod::ServerSide);
        assert_eq!(dst.bytes("dir/a b.txt").unwrap().len(), 0);
    }
}
