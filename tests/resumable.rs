//! Resumable large copies against the local stack: a 1 GiB object replicated by
//! invocations of a few seconds each, through the library entry points the functions use
//! (`Replicator::handle` with the invocation's deadline, `Backfiller::run`), with the real
//! SDK clients and DynamoDB Local holding the checkpoints. Every combination is covered
//! once: server-side and stream mode, on s3s-fs and on a moto of the test's own (moto
//! holds objects and parts in memory, and one moto is one Python thread).
//!
//! Each test prints its figures (invocations, parts uploaded against parts in the object,
//! time) and asserts the waste: parts transferred twice (cut off at a deadline) are fewer
//! than the parts of one invocation. The replica is verified by its ETag: the source is
//! uploaded in 16 MiB parts, the copy reproduces that layout, so the replica's multipart
//! ETag must be the source's.
//!
//! The two 1 GiB tests are long (minutes: moto and s3s-fs read the whole source for every
//! part copied) and run on demand: `scripts/test --run-ignored all -E 'binary(resumable)'
//! --no-capture`; the changed-source and rule-deletion scenarios run by default. Each
//! test prints `figures:` lines.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use async_trait::async_trait;
use aws_sdk_s3::primitives::ByteStream;
use crr_shared::adapters::s3::S3Clients;
use crr_shared::backfill::{BackfillSettings, BackfillStore, Backfiller, JobState};
use crr_shared::copy::CopyEngine;
use crr_shared::dead_letter::DeadLetters;
use crr_shared::dynamo::DynamoStore;
use crr_shared::error::Error;
use crr_shared::object_store::ObjectStore;
use crr_shared::replicate::{Replicator, ReplicatorSettings, StoreProvider};
use crr_shared::resumable::{Continuations, UploadStore};
use crr_shared::rule::{BucketRef, CopyMode, Notify, Rule};
use crr_shared::rule_admin::{create_rule, delete_rule};
use crr_shared::testing::intercepted::{Hooks, Intercepted, Write};
use crr_tests::{OwnMoto, S3Server, Stack, rule, s3_notification, unique, upload_in_parts};
use serde_json::{Value, json};

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;
/// Length of the generated pattern's period (bytes of each 16 MiB differ).
const PERIOD: u64 = 16 * MIB;

/// Byte `offset` of a generated object; `salt` makes another version of it.
fn byte_at(offset: u64, salt: u8) -> u8 {
    ((offset % 251) as u8) ^ ((offset / PERIOD * 37 % 256) as u8) ^ salt
}

fn part_body(i: u64, part: u64, size: u64, salt: u8) -> Vec<u8> {
    let start = i * part;
    let end = (start + part).min(size);
    (start..end).map(|o| byte_at(o, salt)).collect()
}

/// Uploads a generated object of `size` bytes in parts of `part` bytes; returns its ETag.
async fn upload_source(
    stack: &Stack,
    server: &S3Server,
    bucket: &str,
    key: &str,
    (size, part): (u64, u64),
    salt: u8,
) -> Result<String> {
    let s3 = stack.s3(server);
    let parts = size.div_ceil(part);
    upload_in_parts(&s3, bucket, key, parts, move |i| {
        part_body(i, part, size, salt)
    })
    .await
}

/// Counts the parts a store uploads (or copies), each upload taking at least
/// `part_delay` (a slow link).
struct PartCounter {
    parts: Arc<AtomicU64>,
    part_delay: Duration,
}

#[async_trait]
impl Hooks for PartCounter {
    async fn before_write(&self, write: Write, _bytes: u64) {
        if write == Write::Part {
            tokio::time::sleep(self.part_delay).await;
        }
    }
    async fn after_write(&self, write: Write, _bytes: u64, ok: bool) {
        if ok && write != Write::Put {
            self.parts.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// The real S3 clients, each store counting its parts (each taking `part_delay` more).
struct CountingStores {
    clients: S3Clients,
    parts: Arc<AtomicU64>,
    part_delay: Duration,
}

impl StoreProvider for CountingStores {
    fn store(&self, bucket: &BucketRef) -> Arc<dyn ObjectStore> {
        Arc::new(Intercepted {
            inner: Arc::new(self.clients.store(bucket)),
            hooks: PartCounter {
                parts: self.parts.clone(),
                part_delay: self.part_delay,
            },
        })
    }
}

/// Collects what would be dead-lettered: a copy that makes progress must never be.
#[derive(Default)]
struct Dlq(std::sync::Mutex<Vec<String>>);

#[async_trait]
impl DeadLetters for Dlq {
    async fn dead_letter(&self, _id: &str, _body: &str, reason: &Error) -> crr_shared::Result<()> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(reason.to_string());
        Ok(())
    }
}

/// The event queue, as far as continuing messages go: what the replicator sends again.
#[derive(Default)]
struct Requeued(std::sync::Mutex<Vec<String>>);

#[async_trait]
impl Continuations for Requeued {
    async fn continue_later(&self, body: &str) -> crr_shared::Result<()> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(body.to_string());
        Ok(())
    }
}

/// What a copy over several invocations took.
#[derive(Debug, Default)]
struct Figures {
    /// Length of each invocation.
    invocation: Duration,
    invocations: u32,
    parts_uploaded: u64,
    parts_in_object: u64,
    /// Most parts uploaded by one invocation.
    most_in_one: u64,
    secs: f64,
    /// How long the completing invocation ran past its deadline.
    completion_overrun: Duration,
    /// Messages the event took (each one sent again by the replicator as its copy
    /// continued); 0 for the backfill.
    messages: u32,
}

impl Figures {
    fn check(&self, what: &str) -> Result<()> {
        println!(
            "figures: {what}: {} invocations of {:?} ({} messages), {} parts uploaded for {} in the object (at most {} in one invocation), {:.1} s; completion ran {:?} past its deadline",
            self.invocations,
            self.invocation,
            self.messages,
            self.parts_uploaded,
            self.parts_in_object,
            self.most_in_one,
            self.secs,
            self.completion_overrun
        );
        ensure!(
            self.invocations >= 2,
            "{what}: {} invocations: the object should outlast several",
            self.invocations
        );
        ensure!(
            self.parts_uploaded >= self.parts_in_object,
            "{what}: fewer parts uploaded than the object has"
        );
        let waste = self.parts_uploaded - self.parts_in_object;
        ensure!(
            waste < self.most_in_one,
            "{what}: {waste} parts transferred twice, one invocation's worth is {}",
            self.most_in_one
        );
        Ok(())
    }
}

/// The engine's defaults but for its part size (the sources' part layout is reproduced
/// anyway) and 2 parts in flight (one per core of the test machine).
fn engine(part: u64) -> CopyEngine {
    CopyEngine {
        part_size: part,
        parts_in_flight: 2,
        ..CopyEngine::default()
    }
}

/// The S3 event for `key`, as an SQS message body.
fn event_body(rule: &Rule, key: &str, etag: &str) -> String {
    s3_notification(
        &rule.source.region,
        &rule.source.bucket,
        "ObjectCreated:CompleteMultipartUpload",
        key,
        etag,
        Some("0066AA00BB00CC00DD"),
        None,
    )
    .to_string()
}

/// `body` as one SQS message `id`, received for the `receive`-th time.
fn sqs_batch(id: &str, body: &str, receive: u32) -> Value {
    json!({"Records": [{"messageId": id, "body": body, "eventSource": "aws:sqs",
        "attributes": {"ApproximateReceiveCount": receive.to_string()}}]})
}

/// Delivers the event for `key` as SQS would, one invocation of `invocation` at a time:
/// a message sent again by the replicator (its copy continues) as a new message, one
/// reported failed as the same message received once more; `between` runs after each
/// invocation that did not finish.
#[allow(clippy::too_many_arguments)]
async fn replicate_in_invocations(
    state: &DynamoStore,
    clients: &S3Clients,
    rule: &Rule,
    key: &str,
    etag: &str,
    (parts_in_object, part): (u64, u64),
    (invocation, part_delay): (Duration, Duration),
    mut between: impl AsyncFnMut(u32) -> Result<()>,
) -> Result<Figures> {
    let parts = Arc::new(AtomicU64::new(0));
    let dlq = Arc::new(Dlq::default());
    let requeued = Arc::new(Requeued::default());
    let state_arc = Arc::new(state.clone());
    let replicator = Replicator::new(
        state_arc.clone(),
        Arc::new(CountingStores {
            clients: clients.clone(),
            parts: parts.clone(),
            part_delay,
        }),
        Some(dlq.clone()),
        ReplicatorSettings {
            engine: engine(part),
            ..ReplicatorSettings::default()
        },
    )
    .with_uploads(state_arc)
    .with_continuations(requeued.clone());
    let started = Instant::now();
    let mut figures = Figures {
        invocation,
        parts_in_object,
        ..Figures::default()
    };
    let body = event_body(rule, key, etag);
    let (mut message, mut receive) = (1, 1);
    loop {
        figures.invocations += 1;
        ensure!(figures.invocations <= 80, "no end after 80 invocations");
        let before = parts.load(Ordering::SeqCst);
        let deadline = Instant::now() + invocation;
        let out = replicator
            .handle(
                &sqs_batch(&format!("m-{message}"), &body, receive),
                Some(deadline),
            )
            .await?;
        let overrun = Instant::now().saturating_duration_since(deadline);
        figures.most_in_one = figures
            .most_in_one
            .max(parts.load(Ordering::SeqCst) - before);
        let dead = dlq.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        ensure!(dead.is_empty(), "dead-lettered: {dead:?}");
        let failed = out["batchItemFailures"].as_array().map_or(0, |a| a.len());
        let resent = std::mem::take(&mut *requeued.0.lock().unwrap_or_else(|p| p.into_inner()));
        if failed > 0 {
            // No progress: the same message again, one receive more.
            receive += 1;
        } else if let [again] = resent.as_slice() {
            ensure!(*again == body, "the message sent again differs");
            (message, receive) = (message + 1, 1);
        } else {
            ensure!(resent.is_empty(), "sent again {} times", resent.len());
            // Only the completion itself may outlast the deadline (the server assembles
            // the object; s3s-fs takes seconds per GiB on this machine): reported.
            figures.completion_overrun = overrun;
            figures.messages = message;
            break;
        }
        ensure!(
            overrun.is_zero(),
            "invocation {} stopped {overrun:?} past its deadline",
            figures.invocations
        );
        between(figures.invocations).await?;
    }
    figures.secs = started.elapsed().as_secs_f64();
    figures.parts_uploaded = parts.load(Ordering::SeqCst);
    Ok(figures)
}

/// Runs the backfill of `rule` in runs of `invocation` until its job completes.
async fn backfill_in_runs(
    state: &DynamoStore,
    clients: &S3Clients,
    rule: &Rule,
    (parts_in_object, part): (u64, u64),
    invocation: Duration,
) -> Result<Figures> {
    let parts = Arc::new(AtomicU64::new(0));
    let state_arc = Arc::new(state.clone());
    let backfiller = Backfiller::new(
        state_arc.clone(),
        state_arc.clone(),
        Arc::new(CountingStores {
            clients: clients.clone(),
            parts: parts.clone(),
            part_delay: Duration::ZERO,
        }),
        engine(part),
        BackfillSettings {
            margin: Duration::from_secs(1),
            workers: 1,
            ..BackfillSettings::default()
        },
    )
    .with_uploads(state_arc);
    backfiller.start(&rule.id).await?;
    let started = Instant::now();
    let mut figures = Figures {
        invocation,
        parts_in_object,
        ..Figures::default()
    };
    loop {
        figures.invocations += 1;
        ensure!(figures.invocations <= 80, "no end after 80 runs");
        let before = parts.load(Ordering::SeqCst);
        let deadline = Instant::now() + invocation;
        let owner = format!("run-{}", figures.invocations);
        // A failed run is retried by the next one (the schedule), as deployed.
        match backfiller.run(Some(&rule.id), &owner, deadline).await {
            Ok(_) => {}
            Err(e) if e.is_retryable() => println!("run {}: {e}", figures.invocations),
            Err(e) => return Err(e.into()),
        }
        let overrun = Instant::now().saturating_duration_since(deadline);
        ensure!(
            overrun.is_zero(),
            "run {} stopped {overrun:?} past its deadline",
            figures.invocations
        );
        figures.most_in_one = figures
            .most_in_one
            .max(parts.load(Ordering::SeqCst) - before);
        match state.job(&rule.id).await?.map(|j| j.state) {
            Some(JobState::Completed) => break,
            Some(JobState::Running | JobState::Pending) => {}
            other => bail!("backfill job {other:?}"),
        }
    }
    figures.secs = started.elapsed().as_secs_f64();
    figures.parts_uploaded = parts.load(Ordering::SeqCst);
    Ok(figures)
}

/// The replica's ETag, which must be the source's (same part layout), and its size.
async fn check_replica(
    stack: &Stack,
    server: &S3Server,
    (bucket, key): (&str, &str),
    (etag, size, salt): (&str, u64, u8),
) -> Result<()> {
    let head = stack
        .s3(server)
        .head_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .with_context(|| format!("replica {bucket}/{key}"))?;
    let got = head.e_tag().unwrap_or_default().trim_matches('"');
    ensure!(got == etag, "replica ETag {got}, source {etag}");
    ensure!(head.content_length() == Some(size as i64), "replica size");
    // A window across a pattern period (and part) boundary, byte for byte.
    let start = 3 * PERIOD - 4096;
    let out = stack
        .s3(server)
        .get_object()
        .bucket(bucket)
        .key(key)
        .range(format!("bytes={}-{}", start, start + 8191))
        .send()
        .await?;
    let got = out.body.collect().await?.into_bytes();
    let want: Vec<u8> = (start..start + 8192).map(|o| byte_at(o, salt)).collect();
    ensure!(got.as_ref() == want.as_slice(), "replica bytes differ");
    Ok(())
}

async fn no_records_left(state: &DynamoStore, rule: &Rule) -> Result<()> {
    let left = state.uploads(&rule.id).await?;
    ensure!(left.is_empty(), "upload records left: {left:?}");
    Ok(())
}

async fn remove(stack: &Stack, server: &S3Server, bucket: &str, key: &str) -> Result<()> {
    stack
        .s3(server)
        .delete_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await?;
    Ok(())
}

/// A rule from `source` to `target` (events delivered by the test), created for real.
async fn new_rule(
    stack: &Stack,
    state: &DynamoStore,
    source: BucketRef,
    target: BucketRef,
    mode: CopyMode,
) -> Result<Rule> {
    let mut r = rule(&unique("big"), source, target);
    r.notify = Notify::External;
    r.copy_mode = mode;
    // moto answers GetObjectAcl of this 1 GiB multipart object with a 500; ACLs are not
    // what is tested here.
    r.copy_acl = false;
    Ok(create_rule(state, &stack.s3_clients(), r).await?)
}

/// 1 GiB on one server (`src` and `dst`: the same endpoint standing for two regions):
/// real time in one mode, the backfill in the other.
async fn one_gib_on(
    stack: &Stack,
    src: &S3Server,
    dst: &S3Server,
    realtime_mode: CopyMode,
    backfill_mode: CopyMode,
    (part, invocation): (u64, Duration),
) -> Result<()> {
    let state = stack.state(&unique("resume")).await?;
    let clients = stack.s3_clients();
    let (source, rt_target, bf_target) = (unique("big-src"), unique("big-rt"), unique("big-bf"));
    stack.create_bucket(src, &source).await?;
    for bucket in [&rt_target, &bf_target] {
        stack.create_bucket(dst, bucket).await?;
    }
    let key = "large/one-gib.bin";
    let uploaded = Instant::now();
    let etag = upload_source(stack, src, &source, key, (GIB, part), 0).await?;
    println!(
        "figures: {}: 1 GiB source uploaded in {:.1} s",
        src.endpoint,
        uploaded.elapsed().as_secs_f64()
    );
    // Invocations sized to this machine: a third of what uploading the object took (a
    // stream copy moves the same bytes twice), within 8 s and `invocation`, so the copy
    // outlasts several of them on a quiet machine as on a loaded one.
    let invocation = (uploaded.elapsed() / 3).clamp(Duration::from_secs(8), invocation);
    println!("figures: invocations of {:.1} s", invocation.as_secs_f64());
    let parts = (GIB / part, part);
    let result = async {
        let rt = new_rule(
            stack,
            &state,
            src.bucket(&source),
            dst.bucket(&rt_target),
            realtime_mode,
        )
        .await?;
        let figures = replicate_in_invocations(
            &state,
            &clients,
            &rt,
            key,
            &etag,
            parts,
            (invocation, Duration::ZERO),
            async |_| Ok(()),
        )
        .await?;
        figures.check(&format!(
            "{} real time, {:?}",
            src.endpoint,
            rt.resolved_copy_mode()
        ))?;
        check_replica(stack, dst, (&rt_target, key), (&etag, GIB, 0)).await?;
        no_records_left(&state, &rt).await?;
        remove(stack, dst, &rt_target, key).await?;
        delete_rule(&state, &clients, &rt.id).await?;

        let bf = new_rule(
            stack,
            &state,
            src.bucket(&source),
            dst.bucket(&bf_target),
            backfill_mode,
        )
        .await?;
        let figures = backfill_in_runs(&state, &clients, &bf, parts, invocation).await?;
        figures.check(&format!(
            "{} backfill, {:?}",
            src.endpoint,
            bf.resolved_copy_mode()
        ))?;
        check_replica(stack, dst, (&bf_target, key), (&etag, GIB, 0)).await?;
        no_records_left(&state, &bf).await?;
        remove(stack, dst, &bf_target, key).await?;
        delete_rule(&state, &clients, &bf.id).await?;
        anyhow::Ok(())
    }
    .await;
    // Disk and memory are shared: the gigabytes go whatever happened.
    let _ = remove(stack, src, &source, key).await;
    for bucket in [&rt_target, &bf_target] {
        let _ = remove(stack, dst, bucket, key).await;
    }
    result
}

#[tokio::test]
#[ignore = "long: about 3 minutes (1 GiB uploaded, then copied twice on s3s-fs)"]
async fn one_gib_over_several_invocations_on_s3s_fs() -> Result<()> {
    let stack = Stack::from_env()?;
    let dst = stack.s3s.clone();
    let src = S3Server {
        endpoint: dst.endpoint.clone(),
        region: stack.a.region.clone(),
    };
    // s3s-fs hashes the whole source for each UploadPartCopy's If-Match (about 2 s per
    // GiB here): 64 MiB parts keep that to 16 hashes of the object.
    // The backfill copies server-side: its runs drop a copy still going at their hard
    // stop, and s3s-fs's completion, cut off, loses the upload (it removes the upload
    // first, then assembles); server-side parts are as slow as the completion here, so
    // the engine leaves it to the next run rather than start it late.
    one_gib_on(
        &stack,
        &src,
        &dst,
        CopyMode::Stream,
        CopyMode::ServerSide,
        (64 * MIB, Duration::from_secs(20)),
    )
    .await
}

#[tokio::test]
#[ignore = "long: about 6 minutes (moto reads the whole 1 GiB value for every part)"]
async fn one_gib_over_several_invocations_on_moto() -> Result<()> {
    let stack = Stack::from_env()?;
    let moto = OwnMoto::start(&stack.a.region).await?;
    let dst = S3Server {
        endpoint: moto.server.endpoint.clone(),
        region: stack.b.region.clone(),
    };
    one_gib_on(
        &stack,
        &moto.server,
        &dst,
        CopyMode::ServerSide,
        CopyMode::Stream,
        // moto reads the whole source value for each ranged GET and part copy (about
        // 6 s per part on this machine): 64 MiB parts, 20 s invocations.
        (64 * MIB, Duration::from_secs(20)),
    )
    .await
}

/// The source overwritten between two invocations of a copy: the next invocation aborts
/// the recorded upload (its parts are of the old content) and starts over; the replica is
/// the new content. On s3s-fs, which ignores If-Match on GET, only the recorded ETag
/// tells the old parts from the new object's.
#[tokio::test]
async fn a_source_changed_between_invocations_restarts_the_copy() -> Result<()> {
    let stack = Stack::from_env()?;
    let dst = stack.s3s.clone();
    let src = S3Server {
        endpoint: dst.endpoint.clone(),
        region: stack.a.region.clone(),
    };
    let state = stack.state(&unique("resume")).await?;
    let clients = stack.s3_clients();
    let (source, target) = (unique("chg-src"), unique("chg-dst"));
    stack.create_bucket(&src, &source).await?;
    stack.create_bucket(&dst, &target).await?;
    let (key, size, part) = ("changing.bin", 320 * MIB, 16 * MIB);
    let old = upload_source(&stack, &src, &source, key, (size, part), 0).await?;
    let rule = new_rule(
        &stack,
        &state,
        src.bucket(&source),
        dst.bucket(&target),
        CopyMode::Stream,
    )
    .await?;
    let first_upload = std::sync::Mutex::new(None::<String>);
    let new_etag = std::sync::Mutex::new(None::<String>);
    let restarted = std::sync::atomic::AtomicBool::new(false);
    let result = replicate_in_invocations(
        &state,
        &clients,
        &rule,
        key,
        &old,
        (size / part, part),
        // Parts of at least 1 s, two at a time: ten rounds, never one invocation's work
        // however fast the machine.
        (Duration::from_secs(4), Duration::from_secs(1)),
        async |n| {
            let recorded = state.uploads(&rule.id).await?;
            let [upload] = recorded.as_slice() else {
                bail!("{} upload records after invocation {n}", recorded.len());
            };
            let first = first_upload
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let changed = new_etag.lock().unwrap_or_else(|p| p.into_inner()).is_some();
            if first.is_none() && !upload.parts.is_empty() {
                // Part of the copy is done: the source changes now.
                ensure!(upload.source_etag == old, "recorded ETag");
                ensure!(
                    (upload.parts.len() as u64) < size / part,
                    "all parts done in invocation {n}"
                );
                *first_upload.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(upload.upload_id.clone());
                let new = upload_source(&stack, &src, &source, key, (size, part), 1).await?;
                *new_etag.lock().unwrap_or_else(|p| p.into_inner()) = Some(new);
            } else if let (Some(first), true, false) =
                (first, changed, restarted.load(Ordering::SeqCst))
            {
                // The first invocation after the change.
                restarted.store(true, Ordering::SeqCst);
                ensure!(upload.upload_id != first, "the old upload was continued");
                ensure!(upload.invocations == 1, "a new upload, not a continued one");
                // The old upload was aborted: it takes no part any more.
                let refused = stack
                    .s3(&dst)
                    .upload_part()
                    .bucket(&target)
                    .key(key)
                    .upload_id(&first)
                    .part_number(1)
                    .body(ByteStream::from_static(b"x"))
                    .send()
                    .await;
                ensure!(refused.is_err(), "the old upload still takes parts");
            }
            Ok(())
        },
    )
    .await;
    let outcome = async {
        let figures = result?;
        println!(
            "figures: source changed mid-copy: {} invocations of 4 s, {} parts uploaded for {} in the object",
            figures.invocations, figures.parts_uploaded, figures.parts_in_object
        );
        let new = new_etag
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .context("the source was never changed")?;
        ensure!(new != old, "the new source has the old ETag");
        ensure!(restarted.load(Ordering::SeqCst), "no invocation after the change");
        check_replica(&stack, &dst, (&target, key), (&new, size, 1)).await?;
        no_records_left(&state, &rule).await?;
        delete_rule(&state, &clients, &rule.id).await?;
        anyhow::Ok(())
    }
    .await;
    let _ = remove(&stack, &src, &source, key).await;
    let _ = remove(&stack, &dst, &target, key).await;
    outcome
}

/// Deleting a rule aborts the multipart uploads its copies left in progress and removes
/// their records.
#[tokio::test]
async fn deleting_a_rule_aborts_its_uploads_in_progress() -> Result<()> {
    let stack = Stack::from_env()?;
    let moto = &stack.b;
    let src = S3Server {
        endpoint: moto.endpoint.clone(),
        region: stack.a.region.clone(),
    };
    let state = stack.state(&unique("resume")).await?;
    let clients = stack.s3_clients();
    let (source, target) = (unique("del-src"), unique("del-dst"));
    stack.create_bucket(&src, &source).await?;
    stack.create_bucket(moto, &target).await?;
    let (key, size, part) = ("left-behind.bin", 160 * MIB, 16 * MIB);
    let etag = upload_source(&stack, &src, &source, key, (size, part), 0).await?;
    let rule = new_rule(
        &stack,
        &state,
        src.bucket(&source),
        moto.bucket(&target),
        CopyMode::Stream,
    )
    .await?;
    // Invocations far too short to finish (parts of at least 1 s, two at a time: five
    // rounds in a 4 s invocation), however fast the machine: the copy stops with parts
    // recorded.
    let stopped = replicate_in_invocations(
        &state,
        &clients,
        &rule,
        key,
        &etag,
        (size / part, part),
        (Duration::from_secs(4), Duration::from_secs(1)),
        async |n| {
            if state
                .uploads(&rule.id)
                .await?
                .iter()
                .any(|u| !u.parts.is_empty())
            {
                bail!("stop after invocation {n}");
            }
            Ok(())
        },
    )
    .await;
    ensure!(
        stopped.is_err_and(|e| e.to_string().starts_with("stop after")),
        "the copy was not left in progress"
    );
    let s3 = stack.s3(moto);
    let open = s3.list_multipart_uploads().bucket(&target).send().await?;
    ensure!(
        open.uploads().len() == 1,
        "{} uploads open",
        open.uploads().len()
    );
    delete_rule(&state, &clients, &rule.id).await?;
    let open = s3.list_multipart_uploads().bucket(&target).send().await?;
    ensure!(
        open.uploads().is_empty(),
        "{} uploads left open by the deleted rule",
        open.uploads().len()
    );
    no_records_left(&state, &rule).await?;
    remove(&stack, &src, &source, key).await
}
