//! One memory budget per process (issue 16): the real function binaries copy 40 MiB
//! objects in stream mode, many at once, and their peak resident memory (VmHWM, read from
//! /proc while they run) stays below the Lambda memory size their budget is taken from.
//!
//! Source and target buckets are both on s3s-fs (a fast server writing to disk; the shared
//! moto is not made to hold gigabytes), named as two regions: the rule streams every byte
//! through the function. Each test prints its figure (`peak RSS ...`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use aws_sdk_s3::primitives::ByteStream;
use crr_shared::backfill::{BackfillStore, JobState};
use crr_shared::rule::{CopyMode, Notify, Rule};
use crr_shared::rule_admin::create_rule;
use crr_tests::perturb::{Delivery, failed_ids, sqs_event};
use crr_tests::{
    RunningFunction, S3Server, Stack, invoke, list_all, rule, s3_notification, unique,
};
use futures::StreamExt;

const MIB: u64 = 1024 * 1024;

/// A stream-mode rule from a source bucket to a target bucket, both on s3s-fs.
async fn stream_rule(stack: &Stack, table: &str, historical: bool) -> Result<Rule> {
    let state = stack.state(table).await?;
    // The same server, standing for two regions: different regions make a valid rule, the
    // endpoint makes it stream.
    let source_server = S3Server {
        endpoint: stack.s3s.endpoint.clone(),
        region: stack.a.region.clone(),
    };
    let (source, target) = stack.bucket_pair(&source_server, &stack.s3s).await?;
    let mut r = rule(
        &unique("rule"),
        source_server.bucket(&source),
        stack.s3s.bucket(&target),
    );
    r.copy_mode = CopyMode::Stream;
    r.notify = Notify::External;
    r.historical = historical;
    r.copy_acl = false;
    Ok(create_rule(&state, &stack.s3_clients(), r).await?)
}

fn source_server(stack: &Stack) -> S3Server {
    S3Server {
        endpoint: stack.s3s.endpoint.clone(),
        region: stack.a.region.clone(),
    }
}

/// `count` objects of `size` bytes under `prefix` in the rule's source: one PUT, then
/// server-side copies (the bytes never pass through this process again). Returns their
/// keys and ETag.
async fn seed_large(
    stack: &Stack,
    rule: &Rule,
    prefix: &str,
    count: usize,
    size: u64,
) -> Result<(Vec<String>, String)> {
    let s3 = stack.s3(&source_server(stack));
    let bucket = &rule.source.bucket;
    let first = format!("{prefix}00000");
    let body: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let out = s3
        .put_object()
        .bucket(bucket)
        .key(&first)
        .body(ByteStream::from(body))
        .send()
        .await
        .context("seeding the first object")?;
    let etag = out
        .e_tag()
        .unwrap_or_default()
        .trim_matches('"')
        .to_string();
    let keys: Vec<String> = (0..count).map(|i| format!("{prefix}{i:05}")).collect();
    let copies: Vec<Result<()>> = futures::stream::iter(keys.iter().skip(1))
        .map(|key| {
            let s3 = s3.clone();
            let source = format!("{bucket}/{first}");
            async move {
                s3.copy_object()
                    .bucket(bucket)
                    .key(key)
                    .copy_source(source)
                    .send()
                    .await
                    .with_context(|| format!("seeding {key}"))?;
                Ok(())
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    copies.into_iter().collect::<Result<()>>()?;
    Ok((keys, etag))
}

/// Peak resident memory (VmHWM, KiB) of each process the function ran, sampled every
/// 100 ms until stopped: a process restarted by the emulator would start a new peak.
struct PeakRss {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<BTreeMap<i32, u64>>,
}

impl PeakRss {
    fn watch(function: &Arc<RunningFunction>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let (function, stop) = (Arc::clone(function), Arc::clone(&stop));
            async move {
                let mut peaks = BTreeMap::new();
                loop {
                    for pid in function.function_pids() {
                        if let Some(kib) = vm_hwm_kib(pid) {
                            let peak = peaks.entry(pid).or_insert(0);
                            *peak = kib.max(*peak);
                        }
                    }
                    if stop.load(Ordering::SeqCst) {
                        return peaks;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        Self { stop, task }
    }

    /// The peaks, per process, once more read now.
    async fn finish(self) -> Result<BTreeMap<i32, u64>> {
        self.stop.store(true, Ordering::SeqCst);
        Ok(self.task.await?)
    }
}

fn vm_hwm_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Every key of `keys` is in the target with the source's ETag (HEAD: s3s-fs lists no
/// ETags).
async fn assert_replicated(
    stack: &Stack,
    rule: &Rule,
    keys: &[String],
    etag: &str,
    size: u64,
) -> Result<()> {
    let s3 = stack.s3(&stack.s3s);
    for key in keys {
        let head = s3
            .head_object()
            .bucket(&rule.target.bucket)
            .key(key)
            .send()
            .await
            .with_context(|| format!("{key} missing in the target"))?;
        let got = head.e_tag().unwrap_or_default().trim_matches('"');
        let length = head.content_length().unwrap_or(0);
        ensure!(
            length as u64 == size && got == etag,
            "{key}: {length} bytes, ETag {got}"
        );
    }
    Ok(())
}

/// Removes both buckets' objects: gigabytes on disk otherwise.
async fn clean_up(stack: &Stack, rule: &Rule) {
    for (server, bucket) in [
        (source_server(stack), &rule.source.bucket),
        (stack.s3s.clone(), &rule.target.bucket),
    ] {
        let s3 = stack.s3(&server);
        if let Ok(all) = list_all(&s3, bucket).await {
            for key in all.keys() {
                let _ = s3.delete_object().bucket(bucket).key(key).send().await;
            }
        }
    }
}

/// Checks the peaks against the function's memory size and prints them.
fn check_peaks(what: &str, peaks: &BTreeMap<i32, u64>, function_mb: u64) -> Result<()> {
    ensure!(!peaks.is_empty(), "{what}: no function process was seen");
    let peak_kib = peaks.values().copied().max().unwrap_or(0);
    println!(
        "{what}: peak RSS (VmHWM) {:.1} MiB against a {function_mb} MB function ({} process(es))",
        peak_kib as f64 / 1024.0,
        peaks.len()
    );
    ensure!(
        peak_kib < function_mb * 1024,
        "{what}: peak RSS {peak_kib} KiB reaches the function's {function_mb} MB"
    );
    Ok(())
}

#[tokio::test]
async fn a_batch_of_ten_40_mib_objects_streams_within_a_512_mb_function() -> Result<()> {
    const FUNCTION_MB: u64 = 512;
    let stack = Stack::from_env()?;
    let table = unique("mem");
    let rule = stream_rule(&stack, &table, false).await?;
    // 40 MiB objects (the requirement), then 60 MiB ones (where main's code,
    // holding 8 at once, measured 550 MiB): one SQS batch of ten messages each, one object
    // per message, in a function process of its own each.
    let mut outcome = Ok(());
    for mib in [40, 60] {
        let size = mib * MIB;
        let (keys, etag) = seed_large(&stack, &rule, &format!("big{mib}/"), 10, size).await?;
        let function = Arc::new(RunningFunction::start_direct(
            &stack,
            "crr-replicate",
            &table,
            120,
            &[format!("AWS_LAMBDA_FUNCTION_MEMORY_SIZE={FUNCTION_MB}")],
        )?);
        let batch: Vec<Delivery> = keys
            .iter()
            .enumerate()
            .map(|(i, key)| Delivery {
                message_id: format!("m{i}"),
                body: s3_notification(
                    &rule.source.region,
                    &rule.source.bucket,
                    "ObjectCreated:Put",
                    key,
                    &etag,
                    None,
                    None,
                )
                .to_string(),
                receive_count: 1,
            })
            .collect();
        let peaks = PeakRss::watch(&function);
        let started = Instant::now();
        let (error, answer) = invoke(
            function.port,
            "crr-replicate",
            &sqs_event(&batch, "arn:aws:sqs:us-east-1:123456789012:crr-mem"),
        )
        .await?;
        let elapsed = started.elapsed();
        let peaks = peaks.finish().await?;
        println!("10 x {mib} MiB streamed in one batch in {elapsed:?}");
        let within = check_peaks(
            &format!("crr-replicate, 10 x {mib} MiB"),
            &peaks,
            FUNCTION_MB,
        );
        let failed = failed_ids(&batch, error, &answer);
        let replicated = assert_replicated(&stack, &rule, &keys, &etag, size).await;
        outcome = outcome
            .and_then(|()| {
                ensure!(failed.is_empty(), "{mib} MiB: {answer}");
                Ok(())
            })
            .and(replicated)
            .and(within);
    }
    clean_up(&stack, &rule).await;
    outcome
}

#[tokio::test]
async fn a_backfill_of_64_objects_of_40_mib_with_64_copies_at_once_fits_in_1024_mb() -> Result<()> {
    const FUNCTION_MB: u64 = 1024;
    const OBJECTS: usize = 64;
    let stack = Stack::from_env()?;
    let table = unique("mem");
    let rule = stream_rule(&stack, &table, true).await?;
    let size = 40 * MIB;
    let (keys, etag) = seed_large(&stack, &rule, "big/", OBJECTS, size).await?;

    // The default 4 workers x 16 copies; segments of 16 objects so that every worker has
    // a segment, and pages of 16 so that all 64 copies are asked for at once.
    let function = Arc::new(RunningFunction::start_direct(
        &stack,
        "crr-backfill",
        &table,
        120,
        &[
            format!("AWS_LAMBDA_FUNCTION_MEMORY_SIZE={FUNCTION_MB}"),
            "CRR_BACKFILL_SEGMENT_OBJECTS=16".to_string(),
            "CRR_BACKFILL_PAGE_SIZE=16".to_string(),
        ],
    )?);
    let state = stack.state(&table).await?;
    let peaks = PeakRss::watch(&function);
    let started = Instant::now();
    let mut invocations = 0;
    let mut completed = Ok(());
    while state.job(&rule.id).await?.map(|j| j.state) != Some(JobState::Completed) {
        if started.elapsed() > Duration::from_secs(300) {
            completed = Err(anyhow::anyhow!("backfill did not complete in 5 minutes"));
            break;
        }
        let (failed, body) = invoke(function.port, "crr-backfill", "{}").await?;
        if failed {
            completed = Err(anyhow::anyhow!("invocation failed: {body}"));
            break;
        }
        invocations += 1;
    }
    let elapsed = started.elapsed();
    let peaks = peaks.finish().await?;
    println!("{OBJECTS} x 40 MiB backfilled in {invocations} invocation(s), {elapsed:?}");
    if completed.is_err() {
        let _ = check_peaks("crr-backfill (incomplete)", &peaks, FUNCTION_MB);
        clean_up(&stack, &rule).await;
        return completed;
    }
    let within = check_peaks(
        &format!("crr-backfill, {OBJECTS} x 40 MiB, 4 workers x 16 copies"),
        &peaks,
        FUNCTION_MB,
    );
    let replicated = assert_replicated(&stack, &rule, &keys, &etag, size).await;
    clean_up(&stack, &rule).await;
    replicated?;
    let segments = state.segments(&rule.id).await?;
    ensure!(
        segments.len() >= 4,
        "{} segments: not every worker had one",
        segments.len()
    );
    within
}
