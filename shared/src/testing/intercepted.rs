//! An `ObjectStore` that hands every call to another one, with hooks around reads and
//! writes: how tests watch the bytes a copy holds, slow a link down, or count parts,
//! without writing the whole trait out again.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::checksum::{Checksum, ChecksumAlgorithm};
use crate::error::Result;
use crate::memory_budget::MemoryBudget;
use crate::object_store::{
    AccessInfo, FetchedObject, ListPage, ObjectInfo, ObjectStore, TargetPrecondition, UploadedPart,
    WriteAttrs,
};

/// Which write a hook is called around.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    Put,
    Part,
    PartCopy,
}

/// What a test does around the wrapped store's calls; every hook does nothing by default.
#[async_trait]
pub trait Hooks: Send + Sync {
    /// After `bytes` were read (a `fetch` with a body, a `get`).
    async fn read(&self, _bytes: u64) {}
    /// Before a write of `bytes` (0 for a part copy).
    async fn before_write(&self, _write: Write, _bytes: u64) {}
    /// After a write, whether it succeeded (`ok`) or not.
    async fn after_write(&self, _write: Write, _bytes: u64, _ok: bool) {}
}

/// `inner` with `hooks` around its reads and writes.
pub struct Intercepted<S: ?Sized, H> {
    pub inner: Arc<S>,
    pub hooks: H,
}

#[async_trait]
impl<S: ObjectStore + ?Sized, H: Hooks> ObjectStore for Intercepted<S, H> {
    fn bucket(&self) -> &str {
        self.inner.bucket()
    }
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        self.inner.head(key).await
    }
    async fn fetch(
        &self,
        key: &str,
        body_limit: u64,
        budget: &MemoryBudget,
    ) -> Result<Option<FetchedObject>> {
        let fetched = self.inner.fetch(key, body_limit, budget).await?;
        if let Some(body) = fetched.as_ref().and_then(|f| f.body.as_ref()) {
            self.hooks.read(body.len() as u64).await;
        }
        Ok(fetched)
    }
    async fn get(&self, key: &str, range: Option<(u64, u64)>, if_match: &str) -> Result<Bytes> {
        let body = self.inner.get(key, range, if_match).await?;
        self.hooks.read(body.len() as u64).await;
        Ok(body)
    }
    async fn put(&self, key: &str, body: Bytes, attrs: &WriteAttrs) -> Result<String> {
        let n = body.len() as u64;
        self.hooks.before_write(Write::Put, n).await;
        let etag = self.inner.put(key, body, attrs).await;
        self.hooks.after_write(Write::Put, n, etag.is_ok()).await;
        etag
    }
    async fn create_multipart(&self, key: &str, attrs: &WriteAttrs) -> Result<String> {
        self.inner.create_multipart(key, attrs).await
    }
    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        body: Bytes,
        checksum: Option<ChecksumAlgorithm>,
    ) -> Result<String> {
        let n = body.len() as u64;
        self.hooks.before_write(Write::Part, n).await;
        let etag = self
            .inner
            .upload_part(key, upload_id, part_number, body, checksum)
            .await;
        self.hooks.after_write(Write::Part, n, etag.is_ok()).await;
        etag
    }
    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[UploadedPart],
        precondition: Option<&TargetPrecondition>,
        checksum: Option<&Checksum>,
    ) -> Result<String> {
        self.inner
            .complete_multipart(key, upload_id, parts, precondition, checksum)
            .await
    }
    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<()> {
        self.inner.abort_multipart(key, upload_id).await
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
        self.hooks.before_write(Write::PartCopy, 0).await;
        let etag = self
            .inner
            .upload_part_copy(key, upload_id, part_number, source_bucket, range, if_match)
            .await;
        self.hooks
            .after_write(Write::PartCopy, 0, etag.is_ok())
            .await;
        etag
    }
    async fn access(&self, key: &str) -> Result<AccessInfo> {
        self.inner.access(key).await
    }
    async fn acls_enabled(&self) -> Result<bool> {
        self.inner.acls_enabled().await
    }
    async fn tags(&self, key: &str) -> Result<Vec<(String, String)>> {
        self.inner.tags(key).await
    }
    async fn first_part_size(&self, key: &str) -> Result<Option<u64>> {
        self.inner.first_part_size(key).await
    }
    async fn copy_from(
        &self,
        source_bucket: &str,
        key: &str,
        if_match: &str,
        attrs: &WriteAttrs,
    ) -> Result<String> {
        self.inner
            .copy_from(source_bucket, key, if_match, attrs)
            .await
    }
    async fn delete(&self, key: &str) -> Result<()> {
        self.inner.delete(key).await
    }
    async fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        max_keys: i32,
    ) -> Result<ListPage> {
        self.inner.list_page(prefix, start_after, max_keys).await
    }
    async fn list_delimited(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        delimiter: &str,
        max_keys: i32,
    ) -> Result<crate::object_store::DelimitedPage> {
        self.inner
            .list_delimited(prefix, start_after, delimiter, max_keys)
            .await
    }
    async fn check_readable(&self) -> Result<()> {
        self.inner.check_readable().await
    }
    async fn check_writable(&self, probe_key: &str) -> Result<()> {
        self.inner.check_writable(probe_key).await
    }
}
