//! `ObjectStore` conformance: one set of contract tests for
//! `crr_shared::object_store::ObjectStore`, written once and run against every
//! implementation, so the in-memory fake the unit tests rely on cannot drift from S3:
//!
//! | module   | implementation                      | server                         |
//! |----------|-------------------------------------|--------------------------------|
//! | `memory` | `MemoryObjectStore` (`MemoryWorld`) | none                           |
//! | `moto`   | `S3Store`                           | moto server (stack region A)   |
//! | `s3s_fs` | `S3Store`                           | s3s-fs (the stack's second S3) |
//!
//! Each contract is an `async fn(&Backend)`; `conformance!` instantiates it once per
//! backend, so a test's full name reads `s3s_fs::tags_written_with_an_object_...`.
//! Every test makes its own uniquely named buckets.
//!
//! Where a server legitimately differs from S3, `Caps` says so, with the reason, and the
//! test asserts what that server does instead: a gap never makes a test pass on its own.
//! The differences (DESIGN.md §7 lists the known ones):
//! - moto: no SigV4 check (wrong credentials get in); copy-source If-Match enforced
//!   neither by CopyObject nor by UploadPartCopy; If-Match on CompleteMultipartUpload
//!   ignored (If-None-Match honoured); target conditions on CopyObject ignored; keys over
//!   1024 bytes accepted; a key holding a line feed is a 404; a part for an aborted upload
//!   is a 500; listings carry control characters raw, which XML 1.0 cannot (S3Store then
//!   asks for `encoding-type=url`, which moto honours).
//! - s3s-fs: no tagging (`x-amz-tagging` dropped, GetObjectTagging 501); GET ignores
//!   If-Match (S3Store checks the answer's ETag itself); UploadPartCopy ignores
//!   copy-source If-Match; target conditions on CopyObject ignored; If-Match on a missing
//!   key is a 412 where S3 answers 404; listings carry no ETags; a CopyObject copy keeps a
//!   multipart source's ETag; a refused completion drops the upload; an unknown upload
//!   is AccessDenied; HEAD ignores `partNumber`; keys are file paths: `.`, `..` and empty
//!   segments are resolved (the object is silently stored under another key), a key
//!   ending in '/' is a directory, a key cannot also be the prefix of another, keys over
//!   about 150 bytes fail (a sidecar file is named after the key's base64), and control
//!   characters are listed raw whatever `encoding-type` asks, so such listings fail.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use crr_shared::Error;
use crr_shared::adapters::s3::S3Store;
use crr_shared::memory::MemoryWorld;
use crr_shared::memory_budget::MemoryBudget;
use crr_shared::object_store::{
    ContentHeaders, ObjectStore, TargetPrecondition, UploadedPart, WriteAttrs,
};
use crr_tests::{S3Server, Stack, unique};
use md5::{Digest, Md5};

/// Smallest part S3 accepts before the last one of a multipart upload.
const MIN_PART: usize = 5 * 1024 * 1024;

/// ETag of empty content.
const EMPTY_MD5: &str = "d41d8cd98f00b204e9800998ecf8427e";

/// Whether a backend checks request signatures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signatures {
    /// No credentials at all: the in-memory store.
    NoCredentials,
    /// Accepts any signature (moto).
    Unchecked,
    /// Verifies SigV4, as S3 does.
    Checked,
}

/// What a backend does where servers legitimately differ from S3. `true` means "as S3".
#[derive(Debug, Clone, Copy)]
struct Caps {
    signatures: Signatures,
    /// Object tagging (s3s-fs has none).
    tagging: bool,
    /// GET honours If-Match by itself (s3s-fs does not; `S3Store::get` compares the
    /// answer's ETag, so the contract holds either way).
    conditional_get: bool,
    /// CopyObject enforces `x-amz-copy-source-if-match` (moto does not).
    copy_source_if_match: bool,
    /// UploadPartCopy enforces `x-amz-copy-source-if-match` (neither moto nor s3s-fs).
    part_copy_source_if_match: bool,
    /// CopyObject honours If-None-Match / If-Match on its target (neither moto nor s3s-fs).
    copy_target_precondition: bool,
    /// CompleteMultipartUpload honours If-Match (moto honours only If-None-Match).
    complete_if_match: bool,
    /// Error kind of a write with If-Match on a missing key: S3 answers 404 NoSuchKey
    /// (`NotFound`); s3s-fs answers 412 (`Precondition`).
    if_match_on_missing_key: &'static str,
    /// Error kind for a part or completion of an aborted upload: S3 answers 404
    /// NoSuchUpload (`NotFound`); moto 500 (`Retryable`); s3s-fs `AccessDenied`.
    unknown_upload: &'static str,
    /// Listings carry ETags (s3s-fs lists none).
    listed_etags: bool,
    /// HEAD `?partNumber=1` tells the part's size (s3s-fs ignores `partNumber`).
    tells_part_size: bool,
    /// Keys over 1024 bytes are refused (moto accepts them).
    key_limit: bool,
    /// A CopyObject copy gets the MD5 of its content as ETag, whatever the source's
    /// (s3s-fs keeps a multipart source's `<md5-of-md5s>-N`).
    copy_gives_md5_etag: bool,
    /// A completion refused (EntityTooSmall) leaves the upload open for another try
    /// (s3s-fs drops it before checking the parts).
    keeps_upload_after_failed_completion: bool,
    /// Keys may hold a line feed (moto's URL routing matches no path with one: 404).
    newline_in_keys: bool,
    /// Keys are file paths (s3s-fs): see `ODD_KEYS`.
    file_system_keys: bool,
}

impl Caps {
    /// As S3 itself behaves.
    const S3: Caps = Caps {
        signatures: Signatures::Checked,
        tagging: true,
        conditional_get: true,
        copy_source_if_match: true,
        part_copy_source_if_match: true,
        copy_target_precondition: true,
        complete_if_match: true,
        if_match_on_missing_key: "NotFound",
        unknown_upload: "NotFound",
        listed_etags: true,
        tells_part_size: true,
        key_limit: true,
        copy_gives_md5_etag: true,
        keeps_upload_after_failed_completion: true,
        newline_in_keys: true,
        file_system_keys: false,
    };
}

/// Where a backend's buckets live.
enum Kind {
    Memory(MemoryWorld),
    S3 { stack: Box<Stack>, server: S3Server },
}

/// One implementation under test: makes fresh buckets and says what it supports.
struct Backend {
    name: &'static str,
    caps: Caps,
    kind: Kind,
}

impl Backend {
    fn memory() -> Result<Self> {
        Ok(Self {
            name: "memory",
            caps: Caps {
                signatures: Signatures::NoCredentials,
                ..Caps::S3
            },
            kind: Kind::Memory(MemoryWorld::default()),
        })
    }

    fn moto() -> Result<Self> {
        let stack = Stack::from_env()?;
        Ok(Self {
            name: "moto",
            caps: Caps {
                signatures: Signatures::Unchecked,
                copy_source_if_match: false,
                part_copy_source_if_match: false,
                copy_target_precondition: false,
                complete_if_match: false,
                unknown_upload: "Retryable",
                key_limit: false,
                newline_in_keys: false,
                ..Caps::S3
            },
            kind: Kind::S3 {
                server: stack.a.clone(),
                stack: Box::new(stack),
            },
        })
    }

    fn s3s_fs() -> Result<Self> {
        let stack = Stack::from_env()?;
        Ok(Self {
            name: "s3s-fs",
            caps: Caps {
                tagging: false,
                conditional_get: false,
                part_copy_source_if_match: false,
                copy_target_precondition: false,
                if_match_on_missing_key: "Precondition",
                unknown_upload: "AccessDenied",
                listed_etags: false,
                tells_part_size: false,
                copy_gives_md5_etag: false,
                keeps_upload_after_failed_completion: false,
                file_system_keys: true,
                ..Caps::S3
            },
            kind: Kind::S3 {
                server: stack.s3s.clone(),
                stack: Box::new(stack),
            },
        })
    }

    /// A store over a new, empty, uniquely named bucket.
    async fn bucket(&self) -> Result<Arc<dyn ObjectStore>> {
        let name = unique("conf");
        Ok(match &self.kind {
            Kind::Memory(world) => Arc::new(world.store(&name)),
            Kind::S3 { stack, server } => {
                stack.create_bucket(server, &name).await?;
                Arc::new(S3Store::new(stack.s3(server), name))
            }
        })
    }

    /// The server's own client, to show what it does where `S3Store` makes up for it.
    fn raw_client(&self) -> Option<aws_sdk_s3::Client> {
        match &self.kind {
            Kind::Memory(_) => None,
            Kind::S3 { stack, server } => Some(stack.s3(server)),
        }
    }

    /// A store over `bucket` whose requests are signed with a wrong secret key; `None`
    /// where there are no credentials.
    fn with_wrong_credentials(&self, bucket: &str) -> Option<Arc<dyn ObjectStore>> {
        let Kind::S3 { server, .. } = &self.kind else {
            return None;
        };
        let sdk = aws_config::SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(server.region.clone()))
            .credentials_provider(aws_sdk_s3::config::SharedCredentialsProvider::new(
                aws_sdk_s3::config::Credentials::new(
                    "testing",
                    "not-the-secret",
                    None,
                    None,
                    "conformance",
                ),
            ))
            .build();
        let client = crr_shared::adapters::s3::client_for(&sdk, &server.bucket(bucket));
        Some(Arc::new(S3Store::new(client, bucket.to_string())))
    }
}

/// Instantiates each contract once per backend, in modules `memory`, `moto`, `s3s_fs`.
macro_rules! conformance {
    ($($contract:ident),* $(,)?) => {
        mod memory {
            $(#[tokio::test]
            async fn $contract() -> anyhow::Result<()> {
                super::$contract(&super::Backend::memory()?).await
            })*
        }
        mod moto {
            $(#[tokio::test]
            async fn $contract() -> anyhow::Result<()> {
                super::$contract(&super::Backend::moto()?).await
            })*
        }
        mod s3s_fs {
            $(#[tokio::test]
            async fn $contract() -> anyhow::Result<()> {
                super::$contract(&super::Backend::s3s_fs()?).await
            })*
        }
    };
}

conformance!(
    a_missing_key_heads_and_fetches_as_none_and_gets_as_not_found,
    get_with_the_current_etag_reads_the_object_or_a_range_of_it,
    get_with_the_etag_of_an_overwritten_object_is_a_precondition_failure,
    put_if_absent_creates_a_new_key_and_leaves_an_existing_one_alone,
    put_if_etag_overwrites_the_object_seen_and_refuses_a_changed_one,
    writes_if_etag_on_a_key_that_is_gone_are_refused,
    multipart_completion_honours_if_absent_and_if_etag,
    copy_from_copies_the_source_while_its_etag_still_matches,
    copy_from_a_multipart_source_makes_a_single_part_object_with_an_md5_etag,
    copy_from_a_source_changed_since_it_was_seen_is_a_precondition_failure,
    copy_from_honours_the_target_precondition,
    fetch_reads_the_body_up_to_the_limit_and_only_metadata_above_it,
    a_missing_key_is_not_found_and_wrong_credentials_are_access_denied,
    content_headers_and_user_metadata_round_trip_through_put_multipart_and_copy,
    tags_written_with_an_object_are_read_back_and_counted,
    multipart_upload_joins_its_parts_under_an_md5_of_md5s_etag,
    a_part_under_5_mib_before_the_last_one_is_refused_at_completion,
    an_aborted_upload_takes_no_more_parts_and_leaves_no_object,
    upload_part_copy_copies_ranges_of_the_source_while_its_etag_matches,
    deleting_a_missing_key_succeeds_and_deleting_an_object_removes_it,
    a_usable_bucket_passes_the_readable_and_writable_checks,
    listing_returns_keys_in_utf8_byte_order,
    a_key_can_also_be_the_prefix_of_other_keys,
    listing_pages_by_prefix_start_after_and_max_keys,
    zero_byte_objects_are_written_read_listed_and_copied,
    odd_keys_round_trip_through_every_operation,
    a_1024_byte_multibyte_key_round_trips_and_a_longer_one_is_refused,
);

// ---- helpers ------------------------------------------------------------------------

fn md5_hex(data: &[u8]) -> String {
    hex(&Md5::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// S3's ETag of a multipart object: MD5 of the parts' binary MD5s, dash, part count.
fn multipart_etag(parts: &[&[u8]]) -> String {
    let mut all = Md5::new();
    for p in parts {
        all.update(Md5::digest(p));
    }
    format!("{}-{}", hex(&all.finalize()), parts.len())
}

/// `n` bytes that differ from one offset to the next (so ranges are checkable).
fn pattern(n: usize, seed: u8) -> Bytes {
    Bytes::from((0..n).map(|i| (i % 251) as u8 ^ seed).collect::<Vec<u8>>())
}

fn plain() -> WriteAttrs {
    WriteAttrs::default()
}

fn when(precondition: TargetPrecondition) -> WriteAttrs {
    WriteAttrs {
        precondition: Some(precondition),
        ..WriteAttrs::default()
    }
}

fn etag_is(etag: &str) -> TargetPrecondition {
    TargetPrecondition::Etag(etag.to_string())
}

/// The error of `result`, checked to be of `kind` (`Error::kind()`).
fn expect_err<T: Debug>(result: crr_shared::Result<T>, kind: &str, what: &str) -> Result<Error> {
    match result {
        Ok(v) => bail!("{what}: expected a {kind} error, got Ok({v:?})"),
        Err(e) if e.kind() == kind => Ok(e),
        Err(e) => bail!("{what}: expected a {kind} error, got {} ({e})", e.kind()),
    }
}

async fn put(store: &dyn ObjectStore, key: &str, body: &[u8]) -> Result<String> {
    store
        .put(key, Bytes::copy_from_slice(body), &plain())
        .await
        .with_context(|| format!("putting {key:?}"))
}

/// The whole current content of `key`, read with its current ETag.
async fn content(store: &dyn ObjectStore, key: &str) -> Result<Bytes> {
    let info = store
        .head(key)
        .await?
        .with_context(|| format!("{key:?} is missing"))?;
    Ok(store.get(key, None, &info.etag).await?)
}

async fn listed_keys(store: &dyn ObjectStore, prefix: &str) -> Result<Vec<String>> {
    let page = store.list_page(prefix, None, 1000).await?;
    ensure!(!page.truncated, "more than 1000 keys under {prefix:?}");
    Ok(page.objects.into_iter().map(|o| o.key).collect())
}

/// Uploads `parts` (numbered from 1) into a new multipart upload of `key`.
async fn upload_parts(
    store: &dyn ObjectStore,
    key: &str,
    attrs: &WriteAttrs,
    parts: &[&[u8]],
) -> Result<(String, Vec<UploadedPart>)> {
    let upload_id = store.create_multipart(key, attrs).await?;
    let mut done = Vec::new();
    for (i, body) in parts.iter().enumerate() {
        let part_number = i32::try_from(i + 1)?;
        let etag = store
            .upload_part(
                key,
                &upload_id,
                part_number,
                Bytes::copy_from_slice(body),
                None,
            )
            .await?;
        ensure!(
            etag == md5_hex(body),
            "part {part_number}'s ETag is the MD5 of its bytes"
        );
        done.push(UploadedPart { part_number, etag });
    }
    Ok((upload_id, done))
}

// ---- conditional reads --------------------------------------------------------------

async fn a_missing_key_heads_and_fetches_as_none_and_gets_as_not_found(b: &Backend) -> Result<()> {
    let store = b.bucket().await?;
    ensure!(store.head("nothing-here").await?.is_none());
    ensure!(
        store
            .fetch("nothing-here", 1 << 20, &MemoryBudget::default())
            .await?
            .is_none()
    );
    let err = expect_err(
        store.get("nothing-here", None, EMPTY_MD5).await,
        "NotFound",
        "GET of a missing key",
    )?;
    ensure!(
        err.to_string().contains("nothing-here"),
        "the error names the key: {err}"
    );
    Ok(())
}

async fn get_with_the_current_etag_reads_the_object_or_a_range_of_it(b: &Backend) -> Result<()> {
    let store = b.bucket().await?;
    let body = pattern(1000, 7);
    let etag = put(&*store, "k", &body).await?;
    ensure!(etag == md5_hex(&body), "a single PUT's ETag is the MD5");
    ensure!(store.get("k", None, &etag).await? == body);
    ensure!(store.get("k", Some((10, 20)), &etag).await? == body.slice(10..20));
    ensure!(store.get("k", Some((999, 1000)), &etag).await? == body.slice(999..));
    ensure!(
        store.get("k", Some((990, 5000)), &etag).await? == body.slice(990..),
        "a range past the end is cut at the end"
    );
    let err = expect_err(
        store.get("k", Some((1000, 1010)), &etag).await,
        "Service",
        "a range starting at the end",
    )?;
    ensure!(err.to_string().contains("InvalidRange"), "{err}");
    Ok(())
}

async fn get_with_the_etag_of_an_overwritten_object_is_a_precondition_failure(
    b: &Backend,
) -> Result<()> {
    let store = b.bucket().await?;
    let old = put(&*store, "k", b"first").await?;
    let new = put(&*store, "k", b"second").await?;
    expect_err(
        store.get("k", None, &old).await,
        "Precondition",
        "GET with the old ETag",
    )?;
    expect_err(
        store.get("k", Some((0, 2)), &old).await,
        "Precondition",
        "ranged GET with the old ETag",
    )?;
    ensure!(store.get("k", None, &new).await? == "second");

    // s3s-fs serves a GET whatever its If-Match says: there the refusal above is
    // S3Store's own, from the ETag of the answer.
    if let Some(raw) = b.raw_client() {
        let answer = raw
            .get_object()
            .bucket(store.bucket())
            .key("k")
            .if_match(format!("\"{old}\""))
            .send()
            .await;
        let status = answer
            .as_ref()
            .err()
            .and_then(|e| e.raw_response())
            .map(|r| r.status().as_u16());
        if b.caps.conditional_get {
            ensure!(
                status == Some(412),
                "{}: a stale If-Match GET answers {status:?}",
                b.name
            );
        } else {
            ensure!(
                answer.is_ok(),
                "s3s-fs now honours If-Match on GET: update Caps"
            );
        }
    }
    Ok(())
}

// ---- conditional writes -------------------------------------------------------------

async fn put_if_absent_creates_a_new_key_and_leaves_an_existing_one_alone(
    b: &Backend,
) -> Result<()> {
    let store = b.bucket().await?;
    let absent = when(TargetPrecondition::Absent);
    let etag = store
        .put("k", Bytes::from_static(b"first"), &absent)
        .await
        .context("If-None-Match: * on a new key writes")?;
    expect_err(
        store.put("k", Bytes::from_static(b"second"), &absent).await,
        "Precondition",
        "If-None-Match: * on an existing key",
    )?;
    let info = store.head("k").await?.context("k is there")?;
    ensure!(info.etag == etag, "the refused write changed nothing");
    ensure!(content(&*store, "k").await? == "first");
    Ok(())
}

async fn put_if_etag_overwrites_the_object_seen_and_refuses_a_changed_one(
    b: &Backend,
) -> Result<()> {
    let store = b.bucket().await?;
    let seen = put(&*store, "k", b"one").await?;
    let second = store
        .put("k", Bytes::from_static(b"two"), &when(etag_is(&seen)))
        .await
        .context("If-Match with the current ETag writes")?;
    ensure!(second == md5_hex(b"two"));
    expect_err(
        store
            .put("k", Bytes::from_static(b"three"), &when(etag_is(&seen)))
            .await,
        "Precondition",
        "If-Match with a stale ETag",
    )?;
    ensure!(content(&*store, "k").await? == "two");
    Ok(())
}

async fn writes_if_etag_on_a_key_that_is_gone_are_refused(b: &Backend) -> Result<()> {
    // S3 answers 404 NoSuchKey (moto too); s3s-fs answers 412. Both refuse the write, and
    // the backfill reads either as "the target changed since it was seen".
    let store = b.bucket().await?;
    let seen = put(&*store, "k", b"one").await?;
    store.delete("k").await?;
    expect_err(
        store
            .put("k", Bytes::from_static(b"two"), &when(etag_is(&seen)))
            .await,
        b.caps.if_match_on_missing_key,
        "PUT If-Match on a deleted key",
    )?;
    ensure!(store.head("k").await?.is_none(), "nothing was written");

    let (id, parts) = upload_parts(&*store, "k", &plain(), &[b"three"]).await?;
    let completed = store
        .complete_multipart("k", &id, &parts, Some(&etag_is(&seen)), None)
        .await;
    if b.caps.complete_if_match {
        expect_err(
            completed,
            b.caps.if_match_on_missing_key,
            "completion If-Match on a deleted key",
        )?;
        ensure!(store.head("k").await?.is_none(), "nothing was completed");
    } else {
        // moto ignores If-Match on CompleteMultipartUpload: the object is created.
        completed.context("moto completes despite If-Match on a deleted key")?;
        ensure!(content(&*store, "k").await? == "three");
    }
    Ok(())
}

async fn multipart_completion_honours_if_absent_and_if_etag(b: &Backend) -> Result<()> {
    let store = b.bucket().await?;
    let existing = put(&*store, "k", b"existing").await?;

    // If-None-Match: * on an existing key.
    let (id, parts) = upload_parts(&*store, "k", &plain(), &[b"by multipart"]).await?;
    expect_err(
        store
            .complete_multipart("k", &id, &parts, Some(&TargetPrecondition::Absent), None)
            .await,
        "Precondition",
        "completion with If-None-Match: * over an existing key",
    )?;
    store.abort_multipart("k", &id).await?;
    ensure!(content(&*store, "k").await? == "existing");

    // If-Match with a stale ETag.
    let (id, parts) = upload_parts(&*store, "k", &plain(), &[b"by multipart"]).await?;
    let stale = store
        .complete_multipart("k", &id, &parts, Some(&etag_is(EMPTY_MD5)), None)
        .await;
    if b.caps.complete_if_match {
        expect_err(stale, "Precondition", "completion with a stale If-Match")?;
        store.abort_multipart("k", &id).await?;
        ensure!(content(&*store, "k").await? == "existing");
    } else {
        // moto ignores If-Match on CompleteMultipartUpload: the object is replaced.
        let etag = stale.context("moto completes despite a stale If-Match")?;
        ensure!(etag == multipart_etag(&[b"by multipart"]));
        ensure!(content(&*store, "k").await? == "by multipart");
        put(&*store, "k", b"existing").await?;
    }

    // If-Match with the current ETag, then If-None-Match: * on a new key.
    let (id, parts) = upload_parts(&*store, "k", &plain(), &[b"replaced"]).await?;
    let etag = store
        .complete_multipart("k", &id, &parts, Some(&etag_is(&existing)), None)
        .await
        .context("completion with the current If-Match")?;
    ensure!(etag == multipart_etag(&[b"replaced"]));
    ensure!(content(&*store, "k").await? == "replaced");

    let (id, parts) = upload_parts(&*store, "new", &plain(), &[b"created"]).await?;
    store
        .complete_multipart("new", &id, &parts, Some(&TargetPrecondition::Absent), None)
        .await
        .context("completion with If-None-Match: * on a new key")?;
    ensure!(content(&*store, "new").await? == "created");
    Ok(())
}

// ---- server-side copies -------------------------------------------------------------

async fn copy_from_copies_the_source_while_its_etag_still_matches(b: &Backend) -> Result<()> {
    let source = b.bucket().await?;
    let target = b.bucket().await?;
    let body = pattern(3000, 1);
    let etag = put(&*source, "dir/k", &body).await?;
    let copied = target
        .copy_from(source.bucket(), "dir/k", &etag, &plain())
        .await?;
    ensure!(
        copied == etag,
        "a copy of a single-part object keeps its ETag"
    );
    ensure!(content(&*target, "dir/k").await? == body);
    Ok(())
}

async fn copy_from_a_multipart_source_makes_a_single_part_object_with_an_md5_etag(
    b: &Backend,
) -> Result<()> {
    let source = b.bucket().await?;
    let target = b.bucket().await?;
    let (p1, p2) = (pattern(MIN_PART, 21), pattern(10, 22));
    let (id, parts) = upload_parts(&*source, "k", &plain(), &[&p1, &p2]).await?;
    let etag = source
        .complete_multipart("k", &id, &parts, None, None)
        .await?;
    let copied = target
        .copy_from(source.bucket(), "k", &etag, &plain())
        .await?;
    let mut whole = p1.to_vec();
    whole.extend_from_slice(&p2);
    if b.caps.copy_gives_md5_etag {
        ensure!(copied == md5_hex(&whole), "copy ETag {copied}");
    } else {
        // s3s-fs gives the copy its source's ETag.
        ensure!(copied == etag, "s3s-fs copy ETag {copied}");
    }
    ensure!(target.head("k").await?.context("copied")?.etag == copied);
    ensure!(target.get("k", None, &copied).await? == whole);
    Ok(())
}

async fn copy_from_a_source_changed_since_it_was_seen_is_a_precondition_failure(
    b: &Backend,
) -> Result<()> {
    let source = b.bucket().await?;
    let target = b.bucket().await?;
    let seen = put(&*source, "k", b"as seen").await?;
    let now = put(&*source, "k", b"changed since").await?;
    let copy = target
        .copy_from(source.bucket(), "k", &seen, &plain())
        .await;
    if b.caps.copy_source_if_match {
        expect_err(copy, "Precondition", "CopyObject with a stale source ETag")?;
        ensure!(target.head("k").await?.is_none(), "nothing was copied");
    } else {
        // moto does not enforce x-amz-copy-source-if-match (DESIGN.md §7): it copies the
        // source as it is now. The copy engine's ETag check is what catches this there.
        let etag = copy.context("moto copies despite a stale source ETag")?;
        ensure!(etag == now, "moto copied the current source");
        ensure!(content(&*target, "k").await? == "changed since");
    }
    Ok(())
}

async fn copy_from_honours_the_target_precondition(b: &Backend) -> Result<()> {
    let source = b.bucket().await?;
    let target = b.bucket().await?;
    let etag = put(&*source, "k", b"source").await?;
    let old = put(&*target, "k", b"target").await?;
    let absent = target
        .copy_from(
            source.bucket(),
            "k",
            &etag,
            &when(TargetPrecondition::Absent),
        )
        .await;
    if b.caps.copy_target_precondition {
        expect_err(
            absent,
            "Precondition",
            "CopyObject If-None-Match: * over a key",
        )?;
        ensure!(content(&*target, "k").await? == "target");
        expect_err(
            target
                .copy_from(source.bucket(), "k", &etag, &when(etag_is(EMPTY_MD5)))
                .await,
            "Precondition",
            "CopyObject with a stale target If-Match",
        )?;
        target
            .copy_from(source.bucket(), "k", &etag, &when(etag_is(&old)))
            .await
            .context("CopyObject with the current target If-Match")?;
    } else {
        // Neither moto nor s3s-fs reads If-None-Match / If-Match on CopyObject: the copy
        // overwrites whatever the target holds.
        absent.with_context(|| format!("{} copies despite If-None-Match: *", b.name))?;
    }
    ensure!(content(&*target, "k").await? == "source");
    Ok(())
}

// ---- reads --------------------------------------------------------------------------

async fn fetch_reads_the_body_up_to_the_limit_and_only_metadata_above_it(
    b: &Backend,
) -> Result<()> {
    let store = b.bucket().await?;
    let body = pattern(1000, 3);
    let etag = put(&*store, "k", &body).await?;
    let at_limit = store
        .fetch("k", 1000, &MemoryBudget::default())
        .await?
        .context("k exists")?;
    ensure!(
        at_limit.body.as_deref() == Some(&body),
        "limit = size: body read"
    );
    ensure!(at_limit.info.size == 1000 && at_limit.info.etag == etag);
    let roomy = store
        .fetch("k", 1 << 20, &MemoryBudget::default())
        .await?
        .context("k exists")?;
    ensure!(
        roomy.body.as_deref() == Some(&body),
        "limit > size: body read"
    );
    let above = store
        .fetch("k", 999, &MemoryBudget::default())
        .await?
        .context("k exists")?;
    ensure!(above.body.is_none(), "limit < size: no body");
    ensure!(above.info.size == 1000 && above.info.etag == etag);
    ensure!(above.info.last_modified.is_some());
    ensure!(above.info == at_limit.info, "the same metadata either way");
    // No byte is read past the memory budget: with no room for the body now, only the
    // metadata; a body read holds its room until dropped.
    let budget = MemoryBudget::new(4096);
    let taken = budget.reserve(4096).await;
    let no_room = store
        .fetch("k", 1 << 20, &budget)
        .await?
        .context("k exists")?;
    ensure!(no_room.body.is_none(), "no room in the budget: no body");
    ensure!(no_room.info == at_limit.info);
    drop(taken);
    let held = store
        .fetch("k", 1 << 20, &budget)
        .await?
        .context("k exists")?;
    ensure!(held.body.as_deref() == Some(&body), "room: body read");
    ensure!(
        budget.available() == 3072,
        "the body holds 1 KiB of the budget, {} left",
        budget.available()
    );
    drop(held);
    ensure!(budget.available() == 4096, "given back when dropped");
    Ok(())
}

async fn a_missing_key_is_not_found_and_wrong_credentials_are_access_denied(
    b: &Backend,
) -> Result<()> {
    let store = b.bucket().await?;
    put(&*store, "k", b"secret").await?;
    expect_err(
        store.get("missing", None, EMPTY_MD5).await,
        "NotFound",
        "GET of a missing key with good credentials",
    )?;
    let Some(intruder) = b.with_wrong_credentials(store.bucket()) else {
        // The in-memory store has no credentials to get wrong.
        ensure!(b.caps.signatures == Signatures::NoCredentials);
        return Ok(());
    };
    match b.caps.signatures {
        Signatures::Checked => {
            let err = expect_err(
                intruder.put("k", Bytes::from_static(b"x"), &plain()).await,
                "AccessDenied",
                "PUT with a wrong secret key",
            )?;
            ensure!(
                err.to_string().contains("s3:PutObject") && err.to_string().contains("/k"),
                "names the permission and the key: {err}"
            );
            expect_err(intruder.head("k").await, "AccessDenied", "HEAD")?;
            expect_err(
                intruder.head("missing").await,
                "AccessDenied",
                "HEAD missing",
            )?;
            expect_err(
                intruder.list_page("", None, 10).await,
                "AccessDenied",
                "LIST",
            )?;
            expect_err(
                intruder.check_readable().await,
                "AccessDenied",
                "readable check",
            )?;
            ensure!(content(&*store, "k").await? == "secret");
        }
        Signatures::Unchecked => {
            // moto does not check signatures (DESIGN.md §7): a wrong secret gets in.
            intruder
                .put("k", Bytes::from_static(b"x"), &plain())
                .await
                .context("moto accepts a wrong secret key")?;
            ensure!(content(&*store, "k").await? == "x");
        }
        Signatures::NoCredentials => bail!("{} has credentials but says it has none", b.name),
    }
    Ok(())
}

// ---- attributes ---------------------------------------------------------------------

fn rich_attrs() -> WriteAttrs {
    WriteAttrs {
        headers: ContentHeaders {
            content_type: Some("text/plain; charset=utf-8".into()),
            content_encoding: Some("gzip".into()),
            content_disposition: Some("attachment; filename=\"report 1.txt\"".into()),
            content_language: Some("de-CH".into()),
            cache_control: Some("max-age=60, must-revalidate".into()),
            expires: Some("Wed, 21 Oct 2037 07:28:00 GMT".into()),
        },
        metadata: BTreeMap::from([
            ("color".to_string(), "blue".to_string()),
            ("with-dash".to_string(), "a value with spaces".to_string()),
        ]),
        ..WriteAttrs::default()
    }
}

async fn check_attrs(store: &dyn ObjectStore, key: &str, how: &str) -> Result<()> {
    let want = rich_attrs();
    let info = store
        .head(key)
        .await?
        .with_context(|| format!("{key} after {how}"))?;
    let got = &info.headers;
    let w = &want.headers;
    ensure!(got.content_type == w.content_type, "{how}: type {got:?}");
    ensure!(
        got.content_encoding == w.content_encoding,
        "{how}: encoding {got:?}"
    );
    ensure!(
        got.content_disposition == w.content_disposition,
        "{how}: disposition {got:?}"
    );
    ensure!(
        got.content_language == w.content_language,
        "{how}: language {got:?}"
    );
    ensure!(
        got.cache_control == w.cache_control,
        "{how}: cache-control {got:?}"
    );
    let instant = |s: &Option<String>| {
        s.as_deref()
            .and_then(|s| chrono::DateTime::parse_from_rfc2822(s).ok())
    };
    ensure!(
        instant(&got.expires).is_some() && instant(&got.expires) == instant(&w.expires),
        "{how}: expires {:?}",
        got.expires
    );
    ensure!(
        info.metadata == want.metadata,
        "{how}: metadata {:?}",
        info.metadata
    );
    Ok(())
}

async fn content_headers_and_user_metadata_round_trip_through_put_multipart_and_copy(
    b: &Backend,
) -> Result<()> {
    let store = b.bucket().await?;
    let target = b.bucket().await?;
    let attrs = rich_attrs();
    let etag = store.put("put", Bytes::from_static(b"x"), &attrs).await?;
    check_attrs(&*store, "put", "PUT").await?;
    let fetched = store
        .fetch("put", 10, &MemoryBudget::default())
        .await?
        .context("put exists")?;
    let head = store.head("put").await?.context("put exists")?;
    ensure!(
        fetched.info == head,
        "GET and HEAD describe the object alike"
    );

    let (id, parts) = upload_parts(&*store, "mpu", &attrs, &[b"y"]).await?;
    store
        .complete_multipart("mpu", &id, &parts, None, None)
        .await?;
    check_attrs(&*store, "mpu", "multipart upload").await?;

    // copy_from replaces the metadata with what it is given: first nothing, then all.
    target
        .copy_from(store.bucket(), "put", &etag, &plain())
        .await?;
    let bare = target.head("put").await?.context("copied")?;
    ensure!(
        bare.metadata.is_empty(),
        "REPLACE with nothing: {:?}",
        bare.metadata
    );
    target
        .copy_from(store.bucket(), "put", &etag, &attrs)
        .await?;
    check_attrs(&*target, "put", "CopyObject").await
}

async fn tags_written_with_an_object_are_read_back_and_counted(b: &Backend) -> Result<()> {
    let store = b.bucket().await?;
    let target = b.bucket().await?;
    let tags = vec![
        ("project".to_string(), "crr".to_string()),
        ("note".to_string(), "a b+c=d/e:f@g_h.i-j".to_string()),
    ];
    let attrs = WriteAttrs {
        tags: tags.clone(),
        ..WriteAttrs::default()
    };
    let sorted = |mut t: Vec<(String, String)>| {
        t.sort();
        t
    };
    let put = store.put("k", Bytes::from_static(b"tagged"), &attrs).await;
    if !b.caps.tagging {
        // s3s-fs has no object tagging: it takes x-amz-tagging and drops it, and answers
        // GetObjectTagging with 501, which S3Store reads as "no tags".
        put.context("s3s-fs accepts a write with tags")?;
        ensure!(store.tags("k").await?.is_empty());
        ensure!(store.head("k").await?.context("k")?.tag_count == 0);
        ensure!(store.tags("missing").await?.is_empty());
        return Ok(());
    }
    let etag = put?;
    ensure!(sorted(store.tags("k").await?) == sorted(tags.clone()));
    ensure!(store.head("k").await?.context("k")?.tag_count == 2);
    expect_err(
        store.tags("missing").await,
        "NotFound",
        "tags of a missing key",
    )?;

    let (id, parts) = upload_parts(&*store, "mpu", &attrs, &[b"y"]).await?;
    store
        .complete_multipart("mpu", &id, &parts, None, None)
        .await?;
    ensure!(sorted(store.tags("mpu").await?) == sorted(tags.clone()));

    target.copy_from(store.bucket(), "k", &etag, &attrs).await?;
    ensure!(sorted(target.tags("k").await?) == sorted(tags.clone()));
    // Tags are replaced, not kept: a copy without tags leaves none.
    target
        .copy_from(store.bucket(), "k", &etag, &plain())
        .await?;
    ensure!(target.tags("k").await?.is_empty());
    ensure!(target.head("k").await?.context("k")?.tag_count == 0);
    Ok(())
}

// ---- multipart ----------------------------------------------------------------------

async fn multipart_upload_joins_its_parts_under_an_md5_of_md5s_etag(b: &Backend) -> Result<()> {
    let store = b.bucket().await?;
    let (p1, p2) = (pattern(MIN_PART, 11), pattern(1000, 12));
    let (id, parts) = upload_parts(&*store, "big", &plain(), &[&p1, &p2]).await?;
    ensure!(
        store.head("big").await?.is_none(),
        "nothing before completion"
    );
    let etag = store
        .complete_multipart("big", &id, &parts, None, None)
        .await?;
    let want = multipart_etag(&[&p1, &p2]);
    ensure!(etag == want, "completion ETag {etag}, want {want}");
    let info = store.head("big").await?.context("big exists")?;
    ensure!(info.etag == want && info.size == (MIN_PART + 1000) as u64);
    let mut whole = p1.to_vec();
    whole.extend_from_slice(&p2);
    ensure!(store.get("big", None, &etag).await? == whole);
    let first = store.first_part_size("big").await?;
    if b.caps.tells_part_size {
        ensure!(first == Some(MIN_PART as u64), "part 1 size {first:?}");
    } else {
        // s3s-fs ignores ?partNumber= and describes the whole object.
        ensure!(first.is_none(), "s3s-fs: {first:?}");
    }
    let listed = store.list_page("", None, 10).await?;
    ensure!(listed.objects.len() == 1 && listed.objects[0].size == info.size);
    if b.caps.listed_etags {
        ensure!(listed.objects[0].etag == want);
    } else {
        ensure!(listed.objects[0].etag.is_empty(), "s3s-fs lists no ETag");
    }
    Ok(())
}

async fn a_part_under_5_mib_before_the_last_one_is_refused_at_completion(
    b: &Backend,
) -> Result<()> {
    let store = b.bucket().await?;
    let (id, parts) = upload_parts(&*store, "k", &plain(), &[b"small", b"last"]).await?;
    let err = expect_err(
        store.complete_multipart("k", &id, &parts, None, None).await,
        "Service",
        "completion with a 5-byte first part",
    )?;
    ensure!(err.to_string().contains("EntityTooSmall"), "{err}");
    ensure!(store.head("k").await?.is_none());
    let abort = store.abort_multipart("k", &id).await;
    if b.caps.keeps_upload_after_failed_completion {
        abort.context("the upload is still open after a refused completion")?;
    } else {
        // s3s-fs forgets the upload before it checks the parts.
        expect_err(abort, b.caps.unknown_upload, "s3s-fs: abort after refusal")?;
    }
    Ok(())
}

async fn an_aborted_upload_takes_no_more_parts_and_leaves_no_object(b: &Backend) -> Result<()> {
    let store = b.bucket().await?;
    let (id, parts) = upload_parts(&*store, "k", &plain(), &[b"part"]).await?;
    store.abort_multipart("k", &id).await?;
    ensure!(store.head("k").await?.is_none());
    expect_err(
        store
            .upload_part("k", &id, 2, Bytes::from_static(b"more"), None)
            .await,
        b.caps.unknown_upload,
        "a part for an aborted upload",
    )?;
    let complete = store.complete_multipart("k", &id, &parts, None, None).await;
    ensure!(
        complete.is_err(),
        "completing an aborted upload: {complete:?}"
    );
    ensure!(store.head("k").await?.is_none());
    Ok(())
}

async fn upload_part_copy_copies_ranges_of_the_source_while_its_etag_matches(
    b: &Backend,
) -> Result<()> {
    let source = b.bucket().await?;
    let target = b.bucket().await?;
    let body = pattern(MIN_PART + 100, 5);
    let etag = put(&*source, "k", &body).await?;
    let id = target.create_multipart("k", &plain()).await?;
    let split = MIN_PART as u64;
    let mut parts = Vec::new();
    for (n, range) in [(1, (0, split)), (2, (split, body.len() as u64))] {
        let part = target
            .upload_part_copy("k", &id, n, source.bucket(), range, &etag)
            .await?;
        let bytes = body.slice(range.0 as usize..range.1 as usize);
        ensure!(
            part == md5_hex(&bytes),
            "part {n}'s ETag is the MD5 of its range"
        );
        parts.push(UploadedPart {
            part_number: n,
            etag: part,
        });
    }
    let done = target
        .complete_multipart("k", &id, &parts, None, None)
        .await?;
    let (a, z) = body.split_at(MIN_PART);
    ensure!(done == multipart_etag(&[a, z]));
    ensure!(target.get("k", None, &done).await? == body);

    // The source changes: a part copy with the ETag seen before is refused.
    put(&*source, "k", b"changed").await?;
    let id = target.create_multipart("k", &plain()).await?;
    let stale = target
        .upload_part_copy("k", &id, 1, source.bucket(), (0, 3), &etag)
        .await;
    if b.caps.part_copy_source_if_match {
        expect_err(
            stale,
            "Precondition",
            "UploadPartCopy with a stale source ETag",
        )?;
    } else {
        // Neither moto nor s3s-fs enforces copy-source If-Match on UploadPartCopy: the
        // part holds the source as it is now.
        let part = stale.with_context(|| format!("{} copies the part anyway", b.name))?;
        ensure!(part == md5_hex(b"cha"));
    }
    target.abort_multipart("k", &id).await?;
    ensure!(
        content(&*target, "k").await? == body,
        "the aborted upload changed nothing"
    );
    Ok(())
}

// ---- deletes and listings -----------------------------------------------------------

async fn deleting_a_missing_key_succeeds_and_deleting_an_object_removes_it(
    b: &Backend,
) -> Result<()> {
    let store = b.bucket().await?;
    store
        .delete("never-was")
        .await
        .context("deleting a missing key")?;
    put(&*store, "k", b"x").await?;
    store.delete("k").await?;
    ensure!(store.head("k").await?.is_none());
    store.delete("k").await.context("deleting it again")?;
    ensure!(listed_keys(&*store, "").await?.is_empty());
    Ok(())
}

async fn a_usable_bucket_passes_the_readable_and_writable_checks(b: &Backend) -> Result<()> {
    let store = b.bucket().await?;
    store.check_readable().await.context("an empty bucket")?;
    store.check_writable("probe/crr").await?;
    ensure!(
        listed_keys(&*store, "").await?.is_empty(),
        "the probe is gone"
    );
    // The readable check lists a key that XML 1.0 cannot carry (S3Store asks for URL
    // encoding then), except on s3s-fs, which does not encode listings (see ODD_KEYS).
    put(&*store, "\u{1}first", b"x").await?;
    let readable = store.check_readable().await;
    if b.caps.file_system_keys {
        expect_err(readable, "Service", "s3s-fs: listing a control character")?;
    } else {
        readable.context("a bucket whose first key is a control character")?;
    }
    Ok(())
}

async fn listing_returns_keys_in_utf8_byte_order(b: &Backend) -> Result<()> {
    let store = b.bucket().await?;
    // UTF-8 byte order, which is code point order: U+FF5E sorts before U+1F600 here,
    // though UTF-16 order would put the emoji (a surrogate pair, D83D...) first.
    let keys = [
        "a", "B", "a-b", "b/c", "a0", "~tilde", "é", "\u{FF5E}", "😀", "日本", "Z", "0",
    ];
    for k in keys {
        put(&*store, k, b"").await?;
    }
    let mut want: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    want.sort();
    ensure!(want.iter().position(|k| k == "\u{FF5E}") < want.iter().position(|k| k == "😀"));
    let got = listed_keys(&*store, "").await?;
    ensure!(got == want, "listed {got:?}\nwant   {want:?}");
    Ok(())
}

async fn a_key_can_also_be_the_prefix_of_other_keys(b: &Backend) -> Result<()> {
    let store = b.bucket().await?;
    put(&*store, "dir", b"object first").await?;
    let under = store
        .put("dir/file", Bytes::from_static(b"then below"), &plain())
        .await;
    put(&*store, "top/file", b"below first").await?;
    let over = store
        .put("top", Bytes::from_static(b"then the object"), &plain())
        .await;
    if b.caps.file_system_keys {
        // On s3s-fs a key is a file path: "dir" cannot be a file and a directory at once.
        for (key, written) in [("dir/file", under), ("top", over)] {
            let err = written
                .err()
                .with_context(|| format!("s3s-fs refuses {key:?}"))?;
            ensure!(
                err.to_string().contains(key),
                "the error names {key:?}: {err}"
            );
        }
        ensure!(listed_keys(&*store, "").await? == ["dir", "top/file"]);
        return Ok(());
    }
    under?;
    over?;
    ensure!(listed_keys(&*store, "").await? == ["dir", "dir/file", "top", "top/file"]);
    ensure!(content(&*store, "dir").await? == "object first");
    ensure!(content(&*store, "top").await? == "then the object");
    Ok(())
}

async fn listing_pages_by_prefix_start_after_and_max_keys(b: &Backend) -> Result<()> {
    let store = b.bucket().await?;
    let keys = [
        "o/1", "p/01", "p/02", "p/03", "p/04", "p/05", "p/06", "p/07", "q/1",
    ];
    for k in keys {
        put(&*store, k, k.as_bytes()).await?;
    }
    let page = |prefix: &'static str, after: Option<&'static str>, max: i32| {
        let store = store.clone();
        async move {
            let p = store.list_page(prefix, after, max).await?;
            let keys: Vec<String> = p.objects.iter().map(|o| o.key.clone()).collect();
            anyhow::Ok((keys, p.truncated))
        }
    };
    let v = |ks: &[&str]| ks.iter().map(|k| k.to_string()).collect::<Vec<_>>();
    ensure!(page("p/", None, 3).await? == (v(&["p/01", "p/02", "p/03"]), true));
    ensure!(page("p/", Some("p/03"), 3).await? == (v(&["p/04", "p/05", "p/06"]), true));
    ensure!(page("p/", Some("p/06"), 3).await? == (v(&["p/07"]), false));
    ensure!(page("p/", Some("p/035"), 1).await? == (v(&["p/04"]), true));
    let all_p = v(&["p/01", "p/02", "p/03", "p/04", "p/05", "p/06", "p/07"]);
    ensure!(
        page("p/", None, 7).await? == (all_p.clone(), false),
        "max = count"
    );
    ensure!(
        page("p/", Some("a"), 100).await? == (all_p, false),
        "start_after before prefix"
    );
    ensure!(
        page("p/", Some("p/07"), 100).await? == (vec![], false),
        "after the last"
    );
    ensure!(
        page("r", None, 100).await? == (vec![], false),
        "no such prefix"
    );
    ensure!(page("", Some("p/07"), 100).await? == (v(&["q/1"]), false));

    let listed = store.list_page("o/", None, 10).await?;
    let o = listed.objects.first().context("o/1 listed")?;
    let head = store.head("o/1").await?.context("o/1")?;
    ensure!(o.size == 3 && o.last_modified.is_some());
    if b.caps.listed_etags {
        ensure!(o.etag == head.etag);
    } else {
        // s3s-fs lists no ETags (the backfill HEADs where a listing cannot decide).
        ensure!(o.etag.is_empty(), "s3s-fs listed an ETag {:?}", o.etag);
    }
    Ok(())
}

async fn zero_byte_objects_are_written_read_listed_and_copied(b: &Backend) -> Result<()> {
    let store = b.bucket().await?;
    let target = b.bucket().await?;
    let etag = put(&*store, "empty", b"").await?;
    ensure!(etag == EMPTY_MD5, "ETag of nothing: {etag}");
    let info = store.head("empty").await?.context("empty exists")?;
    ensure!(info.size == 0 && info.etag == EMPTY_MD5);
    let fetched = store
        .fetch("empty", 0, &MemoryBudget::default())
        .await?
        .context("empty exists")?;
    ensure!(
        fetched.body.as_ref().map(|b| &b[..]) == Some(&b""[..]),
        "limit 0 reads an empty body"
    );
    ensure!(store.get("empty", None, &etag).await?.is_empty());
    let listed = store.list_page("", None, 10).await?;
    ensure!(listed.objects.len() == 1 && listed.objects[0].size == 0);
    let copied = target
        .copy_from(store.bucket(), "empty", &etag, &plain())
        .await?;
    ensure!(copied == EMPTY_MD5);
    ensure!(target.head("empty").await?.context("copied")?.size == 0);

    // A "folder" marker: a zero-byte object whose key ends in '/', as consoles make them.
    let folder = store
        .put("folder/", Bytes::new(), &plain())
        .await
        .context("PUT of a folder marker")?;
    if b.caps.file_system_keys {
        // s3s-fs makes a directory of it: the PUT "succeeds" without an ETag, HEAD then
        // fails (500) and listings skip it. Nothing a reader could find is stored.
        ensure!(
            folder.is_empty(),
            "s3s-fs gave a folder marker ETag {folder:?}"
        );
        expect_err(store.head("folder/").await, "Retryable", "s3s-fs: HEAD")?;
        ensure!(listed_keys(&*store, "folder").await?.is_empty());
        return Ok(());
    }
    ensure!(folder == EMPTY_MD5);
    ensure!(store.head("folder/").await?.context("folder/")?.size == 0);
    ensure!(listed_keys(&*store, "folder").await? == ["folder/"]);
    target
        .copy_from(store.bucket(), "folder/", &folder, &plain())
        .await?;
    ensure!(listed_keys(&*target, "folder").await? == ["folder/"]);
    Ok(())
}

// ---- keys ---------------------------------------------------------------------------

/// What s3s-fs, which stores each key as a file path, does with a key.
#[derive(Debug, Clone, Copy)]
enum OnFileSystem {
    /// Kept as it is, like S3.
    Same,
    /// Resolved as a path and stored under this other key.
    StoredAs(&'static str),
    /// Refused with an error naming the key.
    Refused,
    /// Kept, but listed raw in XML 1.0, which cannot carry the character: every listing
    /// that includes the key fails (s3s-fs ignores `encoding-type=url`).
    Unlistable,
}

/// Keys S3 accepts as they are, and what s3s-fs makes of them.
const ODD_KEYS: &[(&str, OnFileSystem)] = &[
    ("with space", OnFileSystem::Same),
    ("plus+sign", OnFileSystem::Same),
    ("percent%20and%zz", OnFileSystem::Same),
    ("ünïcödé/日本語/😀", OnFileSystem::Same),
    ("a/../b", OnFileSystem::StoredAs("b")),
    ("./x", OnFileSystem::StoredAs("x")),
    ("double//slash", OnFileSystem::StoredAs("double/slash")),
    ("trailing/", OnFileSystem::Refused),
    ("control\u{1}char", OnFileSystem::Unlistable),
    ("unit\u{1f}separator", OnFileSystem::Unlistable),
    ("delete\u{7f}char", OnFileSystem::Same),
    ("tab\tkey", OnFileSystem::Same),
    ("line\nfeed", OnFileSystem::Same),
    ("carriage\rreturn", OnFileSystem::Same),
    ("?query#hash&amp;", OnFileSystem::Same),
];

async fn odd_keys_round_trip_through_every_operation(b: &Backend) -> Result<()> {
    let store = b.bucket().await?;
    let target = b.bucket().await?;
    for &(key, on_fs) in ODD_KEYS {
        let body = format!("body of {key:?}");
        let outcome = if b.caps.file_system_keys {
            on_fs
        } else if key.contains('\n') && !b.caps.newline_in_keys {
            // moto: no route matches a path holding a line feed; the PUT is a 404.
            OnFileSystem::Refused
        } else {
            OnFileSystem::Same
        };
        let written = store.put(key, Bytes::from(body.clone()), &plain()).await;
        match outcome {
            OnFileSystem::Same => {
                let etag = written.with_context(|| format!("PUT {key:?}"))?;
                let info = store
                    .head(key)
                    .await?
                    .with_context(|| format!("HEAD {key:?}"))?;
                ensure!(info.key == key && info.etag == etag, "{key:?}: {info:?}");
                ensure!(store.get(key, None, &etag).await? == body, "GET {key:?}");
                ensure!(
                    store
                        .fetch(key, 1000, &MemoryBudget::default())
                        .await?
                        .context("fetch")?
                        .body
                        .map(|b| b.bytes().clone())
                        == Some(body.clone().into())
                );
                let listed = listed_keys(&*store, key).await?;
                ensure!(
                    listed == vec![key.to_string()],
                    "{key:?} listed as {listed:?}"
                );
                target
                    .copy_from(store.bucket(), key, &etag, &plain())
                    .await
                    .with_context(|| format!("CopyObject {key:?}"))?;
                ensure!(content(&*target, key).await? == body, "copy of {key:?}");
                store.delete(key).await?;
                ensure!(store.head(key).await?.is_none(), "{key:?} deleted");
            }
            OnFileSystem::StoredAs(alias) => {
                // s3s-fs resolves the key as a file path: the write "succeeds" under
                // another key, which is what a replica there would be stored as.
                written.with_context(|| format!("s3s-fs: PUT {key:?}"))?;
                ensure!(
                    content(&*store, alias).await? == body,
                    "{key:?} stored as {alias:?}"
                );
                let listed = listed_keys(&*store, "").await?;
                ensure!(
                    listed.contains(&alias.to_string()) && !listed.contains(&key.to_string()),
                    "s3s-fs lists {key:?} as {alias:?}: {listed:?}"
                );
                store.delete(alias).await?;
            }
            OnFileSystem::Unlistable => {
                let etag = written.with_context(|| format!("PUT {key:?}"))?;
                ensure!(store.get(key, None, &etag).await? == body, "GET {key:?}");
                let err = expect_err(
                    store.list_page("", None, 1000).await,
                    "Service",
                    "s3s-fs: listing a control character",
                )?;
                ensure!(err.to_string().contains("ListObjectsV2"), "{err}");
                store.delete(key).await?;
                ensure!(store.head(key).await?.is_none(), "{key:?} deleted");
            }
            OnFileSystem::Refused => {
                let err = written
                    .err()
                    .with_context(|| format!("{} refuses {key:?}", b.name))?;
                ensure!(
                    err.to_string().contains(key),
                    "the error names {key:?}: {err}"
                );
                ensure!(store.head(key).await?.is_none(), "{key:?} was not stored");
            }
        }
    }
    Ok(())
}

async fn a_1024_byte_multibyte_key_round_trips_and_a_longer_one_is_refused(
    b: &Backend,
) -> Result<()> {
    let store = b.bucket().await?;
    // 1024 bytes of 2-, 3- and 4-byte characters, in path segments as keys usually come,
    // and in one segment.
    let segment = "é日😀".repeat(28); // 9 bytes * 28 = 252
    let mut key = [segment.as_str(); 4].join("/"); // 1011 bytes
    key.push_str("/日日日é"); // + 12 = 1023
    key.push('x'); // 1024
    ensure!(key.len() == 1024, "key is {} bytes", key.len());
    let flat = "é日😀".repeat(113) + "xxxxxxx"; // one segment of 1024 bytes
    ensure!(flat.len() == 1024);
    for key in [&key, &flat] {
        let written = store.put(key, Bytes::from_static(b"long"), &plain()).await;
        if b.caps.file_system_keys {
            // s3s-fs names a sidecar file after the base64 of the key (and cannot name a
            // file over 255 bytes): any key over about 150 bytes fails, with a 500 that
            // S3Store reports as retryable. A clear error naming the key, not a success.
            let err = expect_err(written, "Retryable", "s3s-fs: a 1024-byte key")?;
            ensure!(
                err.to_string().contains(key.as_str()),
                "names the key: {err}"
            );
            continue;
        }
        let etag = written.context("a 1024-byte key")?;
        ensure!(store.head(key).await?.context("long key")?.etag == etag);
        ensure!(listed_keys(&*store, "").await? == vec![key.clone()]);
        ensure!(store.get(key, None, &etag).await? == "long");
        store.delete(key).await?;
    }

    let too_long = format!("{key}y");
    let written = store
        .put(&too_long, Bytes::from_static(b"x"), &plain())
        .await;
    if b.caps.key_limit {
        let err = written.err().context("a 1025-byte key is refused")?;
        ensure!(err.to_string().contains("KeyTooLong"), "{err}");
    } else {
        // moto accepts keys over S3's limit of 1024 bytes.
        written.context("moto accepts a 1025-byte key")?;
    }
    Ok(())
}
