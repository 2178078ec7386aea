//! Checksums carried and verified, on the local servers: a source object's additional
//! checksum (CRC64NVME, CRC32C, CRC32, SHA-1, SHA-256; full-object or composite) reaches
//! its replica, and `crr verify --checksum` proves replicas by stored checksums before it
//! reads bytes, and says which way each object was checked.
//!
//! | setup            | source         | target         | copy mode   |
//! |------------------|----------------|----------------|-------------|
//! | moto_stream      | moto A         | moto B         | stream      |
//! | moto_server_side | moto A (us-e1) | moto A (eu-w1) | server-side |
//! | moto_to_s3s      | moto A         | s3s-fs         | stream      |
//!
//! What the servers do with checksums (measured here with the Rust SDK, as crr's clients
//! are set up: checksums only when asked for):
//! - moto 5.x keeps a checksum only when the request names its algorithm
//!   (`x-amz-sdk-checksum-algorithm`; a bare `x-amz-checksum-*` value header is dropped),
//!   and then keeps the value sent as it is, right or wrong: it refuses nothing. Where the
//!   algorithm is named without a value (the SDK's `checksum_algorithm` under crr's
//!   WhenRequired setting sends none), moto computes its own: right for CRC32, SHA-1 and
//!   SHA-256, but a CRC32 under the CRC64NVME and CRC32C names. CopyObject keeps
//!   algorithm and value; HEAD and GET return them with checksum mode on. Multipart: a
//!   COMPOSITE checksum is reported without its `-<parts>` suffix, a FULL_OBJECT one with
//!   a 4-byte value even for CRC64NVME; an upload created without an algorithm gets no
//!   checksum (S3 gives every object a CRC64NVME).
//! - s3s-fs 0.14.1 checks a checksum sent as a header (BadDigest on a wrong value) and
//!   keeps it; an algorithm named without a value gets none. It writes the bytes before
//!   it checks the checksum: a refused PUT leaves them in place (S3 keeps nothing). A
//!   signed payload whose SHA-256 does not match is refused as it streams in (nothing
//!   left), but answered 500 InternalError. No GetObjectAttributes.
//!
//! So these tests assert algorithm and value where the server keeps them right, only
//! content and kind where moto's values are wrong (multipart), and say where a server's
//! gap shows; none relies on a check a server does not make.

use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm as SdkAlgorithm, ChecksumType, CompletedMultipartUpload, CompletedPart,
};
use crr_shared::checksum::{Checksum, ChecksumAlgorithm};
use crr_shared::copy::{CopyEngine, marker};
use crr_shared::replicate::{Replicator, ReplicatorSettings};
use crr_shared::rule::{Notify, ResolvedCopyMode, Rule};
use crr_shared::rule_admin::create_rule;
use crr_shared::verify::{CheckMethod, Drift, DriftKind, VerifySummary};
use crr_tests::fault_proxy::{FaultPlan, FaultProxy};
use crr_tests::{S3Server, Sequencers, Stack, read_object, rule, s3_notification, unique};

const MIB: usize = 1024 * 1024;

const ALGORITHMS: [ChecksumAlgorithm; 5] = [
    ChecksumAlgorithm::Crc64Nvme,
    ChecksumAlgorithm::Crc32c,
    ChecksumAlgorithm::Crc32,
    ChecksumAlgorithm::Sha1,
    ChecksumAlgorithm::Sha256,
];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Setup {
    MotoStream,
    MotoServerSide,
    MotoToS3s,
}

impl Setup {
    fn servers(self, stack: &Stack) -> (S3Server, S3Server) {
        match self {
            Setup::MotoStream => (stack.a.clone(), stack.b.clone()),
            Setup::MotoServerSide => (
                stack.a.clone(),
                S3Server {
                    endpoint: stack.a.endpoint.clone(),
                    region: stack.b.region.clone(),
                },
            ),
            Setup::MotoToS3s => (stack.a.clone(), stack.s3s.clone()),
        }
    }

    /// Whether the target keeps a checksum when a PUT names the algorithm without a value
    /// (moto computes one; s3s-fs keeps only values sent).
    fn target_keeps_computed_checksums(self) -> bool {
        self != Setup::MotoToS3s
    }
}

struct Env {
    stack: Stack,
    setup: Setup,
    src: S3Server,
    dst: S3Server,
    table: String,
    rule: Rule,
    replicator: Replicator,
    sequencer: Sequencers,
}

async fn env(setup: Setup) -> Result<Env> {
    let stack = Stack::from_env()?;
    let (src, dst) = setup.servers(&stack);
    env_between(stack, setup, src, dst).await
}

/// As `env`, between these two servers (a proxy in front of one of the setup's).
async fn env_between(stack: Stack, setup: Setup, src: S3Server, dst: S3Server) -> Result<Env> {
    let table = unique("checksums");
    let state = stack.state(&table).await?;
    let (sb, tb) = (unique("src"), unique("dst"));
    stack.create_bucket(&src, &sb).await?;
    stack.create_bucket(&dst, &tb).await?;
    let mut r = rule(&unique("rule"), src.bucket(&sb), dst.bucket(&tb));
    // Events come from the test, one per object, with increasing sequencers.
    r.notify = Notify::External;
    let clients = stack.s3_clients();
    let r = create_rule(&state, &clients, r).await?;
    let mode = match setup {
        Setup::MotoServerSide => ResolvedCopyMode::ServerSide,
        _ => ResolvedCopyMode::Stream,
    };
    assert_eq!(r.resolved_copy_mode(), mode, "{setup:?}");
    let settings = ReplicatorSettings {
        // Small parts, so that 9 MiB objects are copied in parts (5 + 4 MiB: another
        // layout than the sources' 6 + 3 MiB).
        engine: CopyEngine {
            multipart_threshold: 8 * MIB as u64,
            server_side_threshold: 8 * MIB as u64,
            part_size: 5 * MIB as u64,
            parts_in_flight: 2,
            ..CopyEngine::default()
        },
        ..ReplicatorSettings::default()
    };
    let replicator = Replicator::new(Arc::new(state), Arc::new(clients), None, settings);
    Ok(Env {
        stack,
        setup,
        src,
        dst,
        table,
        rule: r,
        replicator,
        sequencer: Sequencers::default(),
    })
}

fn sdk_algorithm(a: ChecksumAlgorithm) -> SdkAlgorithm {
    match a {
        ChecksumAlgorithm::Crc64Nvme => SdkAlgorithm::Crc64Nvme,
        ChecksumAlgorithm::Crc32c => SdkAlgorithm::Crc32C,
        ChecksumAlgorithm::Crc32 => SdkAlgorithm::Crc32,
        ChecksumAlgorithm::Sha1 => SdkAlgorithm::Sha1,
        ChecksumAlgorithm::Sha256 => SdkAlgorithm::Sha256,
    }
}

/// Bytes of `len` that differ with `seed`.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(u32::from(seed)) as u8)
        .collect()
}

impl Env {
    fn source(&self) -> &str {
        &self.rule.source.bucket
    }
    fn target(&self) -> &str {
        &self.rule.target.bucket
    }

    /// PUTs `body` to the source with the SDK computing a checksum of `algorithm`;
    /// returns the ETag.
    async fn put(&self, key: &str, body: &[u8], algorithm: ChecksumAlgorithm) -> Result<String> {
        let out = self
            .stack
            .s3(&self.src)
            .put_object()
            .bucket(self.source())
            .key(key)
            .checksum_algorithm(sdk_algorithm(algorithm))
            .body(ByteStream::from(body.to_vec()))
            .send()
            .await
            .with_context(|| format!("PUT {key} with {algorithm}"))?;
        Ok(out
            .e_tag()
            .unwrap_or_default()
            .trim_matches('"')
            .to_string())
    }

    /// Uploads `parts` to the source as one multipart upload of `algorithm` and `kind`,
    /// each part with its checksum (as S3 asks); returns the ETag.
    async fn put_parts(
        &self,
        key: &str,
        parts: &[&[u8]],
        algorithm: ChecksumAlgorithm,
        kind: ChecksumType,
    ) -> Result<String> {
        let s3 = self.stack.s3(&self.src);
        let created = s3
            .create_multipart_upload()
            .bucket(self.source())
            .key(key)
            .checksum_algorithm(sdk_algorithm(algorithm))
            .checksum_type(kind.clone())
            .send()
            .await
            .with_context(|| format!("CreateMultipartUpload {key}"))?;
        let id = created.upload_id().context("upload id")?;
        let mut done = vec![];
        for (i, body) in parts.iter().enumerate() {
            let n = i32::try_from(i + 1)?;
            let out = s3
                .upload_part()
                .bucket(self.source())
                .key(key)
                .upload_id(id)
                .part_number(n)
                .checksum_algorithm(sdk_algorithm(algorithm))
                .body(ByteStream::from(body.to_vec()))
                .send()
                .await
                .with_context(|| format!("UploadPart {key} {n}"))?;
            done.push(
                CompletedPart::builder()
                    .part_number(n)
                    .set_e_tag(out.e_tag().map(str::to_string))
                    .set_checksum_crc64_nvme(out.checksum_crc64_nvme().map(str::to_string))
                    .set_checksum_crc32_c(out.checksum_crc32_c().map(str::to_string))
                    .set_checksum_crc32(out.checksum_crc32().map(str::to_string))
                    .set_checksum_sha1(out.checksum_sha1().map(str::to_string))
                    .set_checksum_sha256(out.checksum_sha256().map(str::to_string))
                    .build(),
            );
        }
        let completed = s3
            .complete_multipart_upload()
            .bucket(self.source())
            .key(key)
            .upload_id(id)
            .checksum_type(kind)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(done))
                    .build(),
            )
            .send()
            .await;
        if let Err(e) = completed {
            // moto answers with a misnamed root element the SDK cannot read: the upload is
            // complete all the same (crr's own store reads the ETag from it likewise).
            crr_shared::adapters::compat::success_body_with_root(
                &e,
                "CompleteMultipartUploadResponse",
            )
            .with_context(|| format!("CompleteMultipartUpload {key}: {e:?}"))?;
        }
        // moto keeps no ACL on an object made by CompleteMultipartUpload and answers its
        // GetObjectAcl with a 500; give it one as S3 would have.
        s3.put_object_acl()
            .bucket(self.source())
            .key(key)
            .acl(aws_sdk_s3::types::ObjectCannedAcl::Private)
            .send()
            .await?;
        let head = self.head(&self.src, self.source(), key).await?;
        Ok(head.0)
    }

    /// ETag and stored checksum of an object, HEAD with checksum mode on.
    async fn head(
        &self,
        server: &S3Server,
        bucket: &str,
        key: &str,
    ) -> Result<(String, Option<Checksum>)> {
        let store = self.stack.s3_clients().store(&server.bucket(bucket));
        use crr_shared::object_store::ObjectStore;
        let info = store
            .head(key)
            .await?
            .with_context(|| format!("no {key} in {bucket}"))?;
        Ok((info.etag, info.checksum))
    }

    /// The source's and the replica's stored checksums.
    async fn checksums(&self, key: &str) -> Result<(Option<Checksum>, Option<Checksum>)> {
        let (_, a) = self.head(&self.src, self.source(), key).await?;
        let (_, b) = self.head(&self.dst, self.target(), key).await?;
        Ok((a, b))
    }

    /// Delivers an ObjectCreated event for `key` to the replicate handler, in-process.
    async fn created(&self, key: &str, etag: &str) -> Result<()> {
        let event = s3_notification(
            &self.src.region,
            self.source(),
            "ObjectCreated:Put",
            key,
            etag,
            Some(&self.sequencer.next()),
            None,
        );
        self.replicator.handle(&event, None).await?;
        Ok(())
    }

    async fn replica(&self, key: &str) -> Result<Vec<u8>> {
        let (body, _) = read_object(&self.stack.s3(&self.dst), self.target(), key)
            .await?
            .with_context(|| format!("no replica of {key} ({:?})", self.setup))?;
        Ok(body)
    }

    /// Runs the real `crr verify RULE --json [extra]`: exit code, drifts, summary.
    fn verify(&self, extra: &[&str]) -> Result<(i32, Vec<Drift>, VerifySummary)> {
        self.stack.verify_json(&self.table, &self.rule.id, extra)
    }

    /// Overwrites the replica of `key` with `body` (the same length, other bytes),
    /// keeping its metadata (crr's marker with it), with a checksum of `algorithm` if
    /// given: a replica changed behind crr's back.
    async fn tamper(
        &self,
        key: &str,
        body: &[u8],
        algorithm: Option<ChecksumAlgorithm>,
    ) -> Result<()> {
        let s3 = self.stack.s3(&self.dst);
        let (_, metadata) = read_object(&s3, self.target(), key)
            .await?
            .context("replica to tamper with")?;
        ensure!(
            metadata.contains_key(marker::SOURCE_ETAG),
            "replica of {key} without crr's marker: {metadata:?}"
        );
        s3.put_object()
            .bucket(self.target())
            .key(key)
            .set_metadata(Some(metadata))
            .set_checksum_algorithm(algorithm.map(sdk_algorithm))
            .body(ByteStream::from(body.to_vec()))
            .send()
            .await
            .with_context(|| format!("tampering with {key}"))?;
        Ok(())
    }
}

/// (a) Each algorithm reaches the replica: the same algorithm and value where the target
/// keeps checksums; on s3s-fs (which keeps none) the copy's success says the server
/// checked the value sent with the bytes, and a wrong value is refused.
async fn each_algorithm_is_carried(setup: Setup) -> Result<()> {
    let e = env(setup).await?;
    let mut refused = vec![];
    for (i, algorithm) in ALGORITHMS.into_iter().enumerate() {
        let key = format!("algo/{algorithm}");
        let body = pattern(1000 + i, i as u8);
        let etag = e.put(&key, &body, algorithm).await?;
        let (source, _) = e.checksums_of_source(&key).await?;
        let source = source.with_context(|| format!("{setup:?}: {key} has no checksum"))?;
        assert_eq!(source.algorithm, algorithm, "{setup:?}: {key}");
        // moto stores a CRC32 under the CRC64NVME and CRC32C names (its own computation,
        // not the value sent): S3 stores the real one. What a copy carries is what the
        // source has, right or not.
        let right = source == Checksum::compute(algorithm, &body);
        let replicated = e.created(&key, &etag).await;
        if !right && setup == Setup::MotoToS3s {
            // moto's wrong value went with the bytes to s3s-fs, which checked it and
            // refused them: the copy fails, reported as BadDigest. (s3s-fs writes the bytes
            // before it checks them, so they are left in place: S3 would keep nothing.)
            let err = replicated.expect_err("s3s-fs took bytes under a wrong checksum");
            let text = format!("{err:#}");
            assert!(text.contains("BadDigest"), "{setup:?}: {key}: {text}");
            refused.push(key);
            continue;
        }
        replicated?;
        assert_eq!(e.replica(&key).await?, body, "{setup:?}: {key}");
        // Kept by moto and s3s-fs alike (sent as a header with its algorithm named).
        let (_, replica) = e.checksums(&key).await?;
        assert_eq!(replica, Some(source), "{setup:?}: replica of {key}");
    }
    // Equal single-part MD5 ETags prove the copies already (they kept the MD5 ETag). The
    // refused ones are drift: missing on S3; on s3s-fs the bytes it refused and kept
    // anyway, without their content headers.
    let (code, drifts, summary) = e.verify(&["--checksum"])?;
    let drifted: Vec<&str> = drifts.iter().map(|d| d.key.as_str()).collect();
    refused.sort();
    assert_eq!(drifted, refused, "{setup:?}: {drifts:?}");
    assert_eq!(code, i32::from(!refused.is_empty()), "{setup:?}");
    assert_eq!(summary.matching, 5 - refused.len() as u64, "{setup:?}");
    Ok(())
}

impl Env {
    async fn checksums_of_source(&self, key: &str) -> Result<(Option<Checksum>, String)> {
        let (etag, c) = self.head(&self.src, self.source(), key).await?;
        Ok((c, etag))
    }
}

/// (b) Multipart sources (6 + 3 MiB): composite CRC32C and SHA-256, full-object
/// CRC64NVME, replicated in parts of another layout (5 + 4 MiB), then verified.
async fn multipart_sources_are_carried_and_verified(setup: Setup) -> Result<()> {
    let e = env(setup).await?;
    let (p1, p2) = (pattern(6 * MIB, 1), pattern(3 * MIB, 2));
    let whole = [p1.clone(), p2.clone()].concat();
    let sources = [
        (
            "composite-crc32c",
            ChecksumAlgorithm::Crc32c,
            ChecksumType::Composite,
        ),
        (
            "composite-sha256",
            ChecksumAlgorithm::Sha256,
            ChecksumType::Composite,
        ),
        (
            "full-crc64nvme",
            ChecksumAlgorithm::Crc64Nvme,
            ChecksumType::FullObject,
        ),
    ];
    for (key, algorithm, kind) in &sources {
        let etag = e
            .put_parts(key, &[&p1, &p2], *algorithm, kind.clone())
            .await?;
        ensure!(etag.ends_with("-2"), "{key}: multipart ETag {etag}");
        let (source, _) = e.checksums_of_source(key).await?;
        let source = source.with_context(|| format!("{setup:?}: {key} has no checksum"))?;
        assert_eq!(source.algorithm, *algorithm, "{setup:?}: {key}");
        // moto reports a composite checksum without its `-2` suffix (parts Some(0):
        // "composite, count untold"), S3 with it (Some(2)).
        assert_eq!(
            source.is_full_object(),
            *kind == ChecksumType::FullObject,
            "{setup:?}: {key}: {source}"
        );
        e.created(key, &etag).await?;
        assert!(e.replica(key).await? == whole, "{setup:?}: {key} content");
        let (_, replica) = e.checksums(key).await?;
        eprintln!("{setup:?}: {key}: source {source}, replica {replica:?}");
        if !setup.target_keeps_computed_checksums() {
            continue;
        }
        match setup {
            // Streamed parts carry the source's algorithm when it is a full-object CRC,
            // else CRC64NVME (S3's default); either way a FULL_OBJECT upload, so the
            // replica has a full-object checksum. Its value is not asserted: moto's
            // multipart checksum values are wrong (not the CRC of the whole).
            Setup::MotoStream => {
                let replica = replica.with_context(|| format!("replica of {key}"))?;
                let want = match source.is_full_object() {
                    true => source.algorithm,
                    false => ChecksumAlgorithm::Crc64Nvme,
                };
                assert_eq!(replica.algorithm, want, "{key}: {replica}");
                assert!(replica.is_full_object(), "{key}: {replica}");
            }
            // UploadPartCopy parts are the server's own copies: the upload is created
            // without an algorithm, so S3 gives the replica its default CRC64NVME and moto
            // gives it none. Nothing to assert that both would do.
            Setup::MotoServerSide | Setup::MotoToS3s => {}
        }
    }
    let (code, drifts, summary) = e.verify(&["--checksum"])?;
    eprintln!("{setup:?}: {summary:?}");
    assert_eq!((code, drifts.len()), (0, 0), "{setup:?}: {drifts:?}");
    assert_eq!(summary.matching, 3);
    Ok(())
}

/// (c) A replica overwritten with other bytes of the same size, crr's marker kept, passes
/// a plain `crr verify` (the marker vouches for it) and is found by `--checksum`: by the
/// stored checksums where both sides have comparable ones, else by reading both.
async fn a_tampered_replica_of_the_same_size_is_found(setup: Setup) -> Result<()> {
    let e = env(setup).await?;
    let bodies: Vec<Vec<u8>> = (0..3u8).map(|i| pattern(4096, 10 + i)).collect();
    // CRC32 and SHA-256: the ones moto computes right (its CRC32C and CRC64NVME are
    // CRC32s, which s3s-fs refuses when crr carries them).
    for (key, body) in ["crc32", "sha256", "untouched"].iter().zip(&bodies) {
        let algorithm = match *key {
            "sha256" => ChecksumAlgorithm::Sha256,
            _ => ChecksumAlgorithm::Crc32,
        };
        let etag = e.put(key, body, algorithm).await?;
        e.created(key, &etag).await?;
    }
    // Same length, other bytes. "crc32" is rewritten naming its own algorithm (a
    // comparable checksum where the target then computes one: moto does, s3s-fs not), "sha256" with none (neither server then keeps one: S3 would give
    // it a CRC64NVME, not comparable with SHA-256 either).
    let mut other = bodies[0].clone();
    other[2000] ^= 0x5a;
    e.tamper("crc32", &other, Some(ChecksumAlgorithm::Crc32))
        .await?;
    let mut other = bodies[1].clone();
    other[10] ^= 0x01;
    e.tamper("sha256", &other, None).await?;

    let (code, drifts, _) = e.verify(&[])?;
    assert_eq!((code, drifts.len()), (0, 0), "{setup:?}: {drifts:?}");

    let (code, drifts, summary) = e.verify(&["--checksum"])?;
    assert_eq!(code, 1, "{setup:?}: {drifts:?}");
    let found: Vec<(&str, DriftKind, Option<CheckMethod>)> = drifts
        .iter()
        .map(|d| (d.key.as_str(), d.kind, d.checked_by))
        .collect();
    let crc_by = match setup.target_keeps_computed_checksums() {
        true => CheckMethod::Checksum,
        // s3s-fs keeps no checksum: the bytes are read.
        false => CheckMethod::Content,
    };
    assert_eq!(
        found,
        vec![
            ("crc32", DriftKind::Different, Some(crc_by)),
            ("sha256", DriftKind::Different, Some(CheckMethod::Content)),
        ],
        "{setup:?}: {drifts:?}"
    );
    if crc_by == CheckMethod::Checksum {
        assert!(
            drifts[0].reason.starts_with("checksum CRC32 "),
            "{drifts:?}"
        );
    }
    assert_eq!((summary.matching, summary.different), (1, 2));
    assert_eq!(summary.checked_by.etag, 1, "{summary:?}");

    // The human output says it too (exit code 1: drift).
    let out = e
        .stack
        .crr_command(&e.table, &["verify", &e.rule.id, "--checksum"])?
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("[checked by {}]", crc_by.as_str())),
        "{text}"
    );
    assert!(text.contains("bytes checked by: etag 1,"), "{text}");
    Ok(())
}

/// (d) A stream copy whose bytes are altered on the way to s3s-fs (one byte flipped by
/// the fault proxy, length and headers kept) is refused by the server: once, and the
/// copy is retried and lands exact; on every attempt, and it fails, reported with the
/// server's refusal, not counted as a copy.
#[tokio::test]
async fn a_stream_copy_altered_on_the_way_is_refused() -> Result<()> {
    let stack = Stack::from_env()?;
    let proxy = FaultProxy::start(&stack.s3s.endpoint, FaultPlan::none(19)).await?;
    let dst = S3Server {
        endpoint: proxy.endpoint.clone(),
        region: stack.s3s.region.clone(),
    };
    let e = env_between(stack.clone(), Setup::MotoToS3s, stack.a.clone(), dst).await?;
    let direct = stack.s3(&stack.s3s);
    let body = pattern(4096, 77);
    let etag = e.put("once.bin", &body, ChecksumAlgorithm::Sha256).await?;
    proxy.corrupt("PUT", &format!("/{}/once.bin", e.target()));
    e.created("once.bin", &etag).await?;
    let (copied, _) = read_object(&direct, e.target(), "once.bin")
        .await?
        .context("once.bin not copied")?;
    assert!(copied == body, "once.bin: the altered bytes were kept");

    let etag = e
        .put("always.bin", &body, ChecksumAlgorithm::Sha256)
        .await?;
    for _ in 0..50 {
        proxy.corrupt("PUT", &format!("/{}/always.bin", e.target()));
    }
    let err = e
        .created("always.bin", &etag)
        .await
        .expect_err("bytes altered on the way were taken");
    let text = format!("{err:#}");
    eprintln!("refused: {text}");
    // Over plain HTTP crr signs the payload as well, so s3s-fs finds the altered bytes by
    // their SHA-256 before it looks at the checksum, and answers 500 InternalError (its
    // log says `Sha256Mismatch`; S3 would say XAmzContentSHA256Mismatch, or BadDigest
    // for the checksum over HTTPS, where crr sends UNSIGNED-PAYLOAD): retried like any
    // 500, then reported with the server's code.
    assert!(
        text.contains("PutObject") && text.contains("always.bin"),
        "{text}"
    );
    assert!(
        ["BadDigest", "XAmzContentSHA256Mismatch", "InternalError"]
            .iter()
            .any(|code| text.contains(code)),
        "{text}"
    );
    // Nothing half-written: s3s-fs checks the payload's SHA-256 as it streams the bytes
    // in (its checksum check, by contrast, comes after the write), as S3 keeps nothing of
    // a refused request.
    let left = read_object(&direct, e.target(), "always.bin").await?;
    assert!(left.is_none(), "always.bin: refused bytes left on s3s-fs");
    Ok(())
}

macro_rules! setups {
    ($module:ident, $setup:expr) => {
        mod $module {
            use super::*;
            #[tokio::test]
            async fn each_algorithm_is_carried() -> Result<()> {
                super::each_algorithm_is_carried($setup).await
            }
            #[tokio::test]
            async fn multipart_sources_are_carried_and_verified() -> Result<()> {
                super::multipart_sources_are_carried_and_verified($setup).await
            }
            #[tokio::test]
            async fn a_tampered_replica_of_the_same_size_is_found() -> Result<()> {
                super::a_tampered_replica_of_the_same_size_is_found($setup).await
            }
        }
    };
}

setups!(moto_stream, Setup::MotoStream);
setups!(moto_server_side, Setup::MotoServerSide);
setups!(moto_to_s3s, Setup::MotoToS3s);
