//! Requests per replicated object in real time (DESIGN §4, issue 7's targets), counted by
//! the SDK interceptor (`CRR_OPERATION_LOG`) of the real `crr-replicate` binary while it
//! replicates through the local stack.
//!
//! Given a source bucket with ACLs off (S3's default since 2023), a small untagged object
//! costs two S3 requests: one GET (state and bytes) and one PUT in stream mode; one HEAD
//! and one CopyObject in server-side mode. Tags are read only for objects that have some.
//! The bucket's ACL setting is read once per process, not per object.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ObjectOwnership, OwnershipControls, OwnershipControlsRule};
use crr_shared::rule::{CopyMode, Notify};
use crr_shared::rule_admin::create_rule;
use crr_tests::{RunningFunction, S3Server, Stack, eventually, rule, unique};

const WAIT: Duration = Duration::from_secs(90);
const OBJECTS: usize = 20;

/// S3 operations the log holds, with how often each was made, after checking the
/// function's writes to the state table's stats items: only UpdateItem, at most one per
/// invocation (the invocation's counters, latencies included, into its minute item,
/// `shared/src/series.rs`). An invocation holds at least one object's event, so there
/// are at most `OBJECTS` of them.
fn s3_operations(log: &Path) -> Result<BTreeMap<String, usize>> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for line in std::fs::read_to_string(log)
        .with_context(|| format!("reading {}", log.display()))?
        .lines()
    {
        *counts.entry(line.to_string()).or_default() += 1;
    }
    let stats_writes: Vec<_> = counts
        .iter()
        .filter(|(op, _)| op.starts_with("DynamoDB:") && op.ends_with(" STATS"))
        .collect();
    let updates = count(&counts, "DynamoDB:UpdateItem STATS");
    ensure!(
        stats_writes.len() == 1 && (1..=OBJECTS).contains(&updates),
        "stats written by one UpdateItem per invocation, at most {OBJECTS}: {stats_writes:?}"
    );
    Ok(counts
        .into_iter()
        .filter(|(op, _)| op.starts_with("S3:"))
        .collect())
}

/// Replicates `OBJECTS` small objects (every fifth tagged) from a bucket on `stack.a` to
/// `target_server` in `mode`; returns the S3 operations made and checks the replicas.
async fn replicate(
    stack: &Stack,
    target_server: &S3Server,
    mode: CopyMode,
) -> Result<BTreeMap<String, usize>> {
    let table = unique("cost");
    let state = stack.state(&table).await?;
    let ((queue_url, queue_arn), _) = stack
        .create_queue_with_dlq(&stack.a, &unique("events"), 3, 5)
        .await?;
    let (source, target) = stack.bucket_pair(&stack.a, target_server).await?;
    let s3a = stack.s3(&stack.a);
    let enforced = OwnershipControlsRule::builder()
        .object_ownership(ObjectOwnership::BucketOwnerEnforced)
        .build()?;
    s3a.put_bucket_ownership_controls()
        .bucket(&source)
        .ownership_controls(OwnershipControls::builder().rules(enforced).build()?)
        .send()
        .await
        .context("turning ACLs off on the source")?;
    let mut r = rule(
        &unique("rule"),
        stack.a.bucket(&source),
        target_server.bucket(&target),
    );
    r.copy_mode = mode;
    r.notify = Notify::Queue { arn: queue_arn };
    create_rule(&state, &stack.s3_clients(), r).await?;

    let dir = std::env::temp_dir().join(unique("crr-cost"));
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("operations.log");
    let _function = RunningFunction::start_with(
        stack,
        "crr-replicate",
        &queue_url,
        &table,
        &[format!("CRR_OPERATION_LOG={}", log.display())],
    )?;
    for i in 0..OBJECTS {
        let mut req = s3a
            .put_object()
            .bucket(&source)
            .key(format!("obj {i}.txt"))
            .body(ByteStream::from(vec![b'x'; 100 + i]));
        if i % 5 == 0 {
            req = req.tagging("team=data");
        }
        req.send().await?;
    }
    let s3b = stack.s3(target_server);
    for i in 0..OBJECTS {
        let key = format!("obj {i}.txt");
        eventually(WAIT, &format!("replica of {key}"), || async {
            Ok(s3b
                .head_object()
                .bucket(&target)
                .key(&key)
                .send()
                .await
                .ok())
        })
        .await?;
        if i % 5 == 0 {
            let tags = s3b
                .get_object_tagging()
                .bucket(&target)
                .key(&key)
                .send()
                .await?;
            ensure!(
                tags.tag_set()
                    .iter()
                    .any(|t| t.key() == "team" && t.value() == "data"),
                "{mode:?}: the replica of {key} lost its tags: {:?}",
                tags.tag_set()
            );
        }
    }
    stack.wait_queue_drained(&stack.a, &queue_url, WAIT).await?;
    s3_operations(&log)
}

fn count(ops: &BTreeMap<String, usize>, op: &str) -> usize {
    ops.get(op).copied().unwrap_or(0)
}

#[tokio::test]
async fn a_small_object_costs_a_get_and_a_put_in_stream_mode() -> Result<()> {
    let stack = Stack::from_env()?;
    let target_server = stack.b.clone();
    let ops = replicate(&stack, &target_server, CopyMode::Stream).await?;
    let tagged = OBJECTS.div_ceil(5);
    ensure!(
        count(&ops, "S3:GetObject") == OBJECTS && count(&ops, "S3:PutObject") == OBJECTS,
        "one GET and one PUT per object expected: {ops:?}"
    );
    // Tags are read only for the objects that have some.
    ensure!(
        count(&ops, "S3:GetObjectTagging") == tagged,
        "tags read for {} objects, {tagged} have tags: {ops:?}",
        count(&ops, "S3:GetObjectTagging")
    );
    ensure!(
        count(&ops, "S3:GetBucketOwnershipControls") == 1,
        "the ACL setting is read once: {ops:?}"
    );
    let others: Vec<_> = ops
        .keys()
        .filter(|k| {
            ![
                "S3:GetObject",
                "S3:PutObject",
                "S3:GetObjectTagging",
                "S3:GetBucketOwnershipControls",
            ]
            .contains(&k.as_str())
        })
        .collect();
    ensure!(others.is_empty(), "unexpected S3 requests: {ops:?}");
    Ok(())
}

#[tokio::test]
async fn a_small_object_costs_a_head_and_a_copy_in_server_side_mode() -> Result<()> {
    let stack = Stack::from_env()?;
    // The other region on the same server: one endpoint, so server-side copy applies.
    let target_server = S3Server {
        endpoint: stack.a.endpoint.clone(),
        region: stack.b.region.clone(),
    };
    let ops = replicate(&stack, &target_server, CopyMode::ServerSide).await?;
    ensure!(
        count(&ops, "S3:HeadObject") == OBJECTS && count(&ops, "S3:CopyObject") == OBJECTS,
        "one HEAD and one CopyObject per object expected: {ops:?}"
    );
    ensure!(
        count(&ops, "S3:GetObjectTagging") == OBJECTS.div_ceil(5),
        "tags read only for the objects that have some: {ops:?}"
    );
    ensure!(
        count(&ops, "S3:GetBucketOwnershipControls") == 1,
        "the ACL setting is read once: {ops:?}"
    );
    let others: Vec<_> = ops
        .keys()
        .filter(|k| {
            ![
                "S3:HeadObject",
                "S3:CopyObject",
                "S3:GetObjectTagging",
                "S3:GetBucketOwnershipControls",
            ]
            .contains(&k.as_str())
        })
        .collect();
    ensure!(others.is_empty(), "unexpected S3 requests: {ops:?}");
    Ok(())
}
