//! Claims and status reads cost the same whatever the number of segments (issue 18): a
//! job of 100,000 segment items, written straight into DynamoDB Local, against one of 10.
//! What each operation reads is counted from the operation log (`OperationLog` writes
//! `DynamoDB:<Operation> items=N` for every read).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, WriteRequest};
use crr_shared::adapters::aws_clients::OperationLog;
use crr_shared::backfill::{BackfillSettings, BackfillStore, Backfiller};
use crr_shared::copy::CopyEngine;
use crr_shared::dynamo::DynamoStore;
use crr_shared::rule::{Notify, Rule};
use crr_shared::rule_admin::create_rule;
use crr_shared::status::StatusService;
use crr_tests::{Stack, rule, unique};
use futures::StreamExt;

const LARGE: u32 = 100_000;
const SMALL: u32 = 10;

/// What a stretch of the log cost: the operations made, and the reads by operation and
/// item family (`BACKFILL`: the job, its segments and failed objects) with the items
/// they returned.
#[derive(Debug, PartialEq, Eq)]
struct Cost {
    operations: BTreeMap<String, usize>,
    /// `DynamoDB:Query BACKFILL` -> (requests, items returned).
    reads: BTreeMap<String, (usize, usize)>,
}

impl Cost {
    /// Items read in the job's partition.
    fn backfill_items(&self) -> usize {
        self.reads
            .iter()
            .filter(|(op, _)| op.ends_with(" BACKFILL"))
            .map(|(_, (_, items))| items)
            .sum()
    }

    /// What the job's partition cost: its reads and writes (a status read also reads and
    /// rolls up the realtime counters and charts, whose cost depends on the minute, not on
    /// the job).
    fn backfill(&self) -> Vec<(String, (usize, usize))> {
        let reads = self
            .reads
            .iter()
            .filter(|(op, _)| op.ends_with(" BACKFILL"))
            .map(|(op, n)| (op.clone(), *n));
        let writes = self
            .operations
            .iter()
            .filter(|(op, _)| op.ends_with(" BACKFILL"))
            .map(|(op, n)| (op.clone(), (*n, 0)));
        reads.chain(writes).collect()
    }
}

/// The log's lines so far.
fn lines(log: &Path) -> Result<Vec<String>> {
    Ok(std::fs::read_to_string(log)
        .with_context(|| format!("reading {}", log.display()))?
        .lines()
        .map(str::to_string)
        .collect())
}

/// The cost of the log lines after the first `from`.
fn cost_since(log: &Path, from: usize) -> Result<Cost> {
    let mut cost = Cost {
        operations: BTreeMap::new(),
        reads: BTreeMap::new(),
    };
    for line in &lines(log)?[from..] {
        match line.split_once(" items=") {
            Some((op, n)) => {
                let read = cost.reads.entry(op.trim().to_string()).or_default();
                read.0 += 1;
                read.1 += n.parse::<usize>()?;
            }
            None => *cost.operations.entry(line.clone()).or_default() += 1,
        }
    }
    Ok(cost)
}

/// A rule with a started job of `segments` segment items, the segments written directly
/// (BatchWriteItem, 25 a request) in the shape `DynamoStore` keeps them, and the job
/// item told the counting pass is over.
async fn job_with_segments(
    stack: &Stack,
    state: &DynamoStore,
    client: &aws_sdk_dynamodb::Client,
    segments: u32,
) -> Result<Rule> {
    let (source, target) = stack.bucket_pair(&stack.a, &stack.b).await?;
    let mut r = rule(
        &unique("rule"),
        stack.a.bucket(&source),
        stack.b.bucket(&target),
    );
    r.historical = true;
    r.notify = Notify::External;
    let rule = create_rule(state, &stack.s3_clients(), r).await?;
    let bf = backfiller(stack, state);
    bf.start(&rule.id).await?;
    let pk = format!("BACKFILL#{}", rule.id);
    let n = |v: u64| AttributeValue::N(v.to_string());
    let batches: Vec<Vec<WriteRequest>> = (0..segments)
        .collect::<Vec<_>>()
        .chunks(25)
        .map(|chunk| {
            chunk
                .iter()
                .map(|i| {
                    let mut item = std::collections::HashMap::from([
                        ("pk".to_string(), AttributeValue::S(pk.clone())),
                        ("sk".to_string(), AttributeValue::S(format!("SEG#{i:06}"))),
                        ("prefix".to_string(), AttributeValue::S("p/".into())),
                        (
                            "end_key".to_string(),
                            AttributeValue::S(format!("p/{i:08}")),
                        ),
                        ("planned_objects".to_string(), n(10_000)),
                        ("done".to_string(), AttributeValue::Bool(false)),
                        ("lease_until".to_string(), n(0)),
                    ]);
                    for counter in [
                        "objects_done",
                        "bytes_done",
                        "copied",
                        "fixed",
                        "in_place",
                        "skipped",
                        "failed",
                    ] {
                        item.insert(counter.to_string(), n(0));
                    }
                    let put = PutRequest::builder().set_item(Some(item)).build()?;
                    anyhow::Ok(WriteRequest::builder().put_request(put).build())
                })
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<_>>()?;
    let table = state.table().to_string();
    let written = futures::stream::iter(batches)
        .map(|batch| {
            let (client, table) = (client.clone(), table.clone());
            async move {
                let mut pending = batch;
                // DynamoDB may leave some writes of a batch unprocessed: send those again.
                for _ in 0..20 {
                    let out = client
                        .batch_write_item()
                        .request_items(&table, pending)
                        .send()
                        .await?;
                    match out.unprocessed_items().and_then(|u| u.get(&table)) {
                        Some(left) if !left.is_empty() => pending = left.clone(),
                        _ => return anyhow::Ok(()),
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                anyhow::bail!("batch never fully written")
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    written.into_iter().collect::<Result<Vec<()>>>()?;
    client
        .update_item()
        .table_name(&table)
        .key("pk", AttributeValue::S(pk))
        .key("sk", AttributeValue::S("JOB".into()))
        .update_expression(
            "SET #st = :running, planned = :t, segment_count = :n, total_objects = :o, total_bytes = :b",
        )
        .expression_attribute_names("#st", "state")
        .expression_attribute_values(":running", AttributeValue::S("running".into()))
        .expression_attribute_values(":t", AttributeValue::Bool(true))
        .expression_attribute_values(":n", n(u64::from(segments)))
        .expression_attribute_values(":o", n(u64::from(segments) * 10_000))
        .expression_attribute_values(":b", n(u64::from(segments) * 10_000_000))
        .send()
        .await?;
    Ok(rule)
}

fn backfiller(stack: &Stack, state: &DynamoStore) -> Backfiller {
    let state = Arc::new(state.clone());
    Backfiller::new(
        state.clone(),
        state,
        Arc::new(stack.s3_clients()),
        CopyEngine::default(),
        BackfillSettings::default(),
    )
}

/// What one claim, a release and a claim again (of the segment released), and one status
/// read cost on `rule`'s job.
async fn costs(
    stack: &Stack,
    state: &DynamoStore,
    log: &Path,
    rule: &Rule,
) -> Result<(Cost, Cost, Cost)> {
    let bf = backfiller(stack, state);
    let from = lines(log)?.len();
    let first = bf
        .claim(rule, "scale-owner-1")
        .await?
        .context("no segment claimed")?;
    let claim = cost_since(log, from)?;
    state
        .release_segment(&rule.id, first.index, "scale-owner-1")
        .await?;
    let from = lines(log)?.len();
    let again = bf
        .claim(rule, "scale-owner-2")
        .await?
        .context("the released segment not claimed again")?;
    ensure!(again.index == first.index, "{again:?} is not {first:?}");
    let reclaim = cost_since(log, from)?;
    let shared = Arc::new(state.clone());
    let status = StatusService::new(
        shared.clone(),
        shared.clone(),
        shared,
        None,
        Duration::from_secs(60),
    );
    let from = lines(log)?.len();
    let report = status.report(Some(&rule.id)).await?;
    let read = cost_since(log, from)?;
    let h = &report.rules[0].historical;
    ensure!(
        h.segments == state.job(&rule.id).await?.context("job")?.segments
            && h.workers_active == 1
            && h.total_final,
        "{h:?}"
    );
    Ok((claim, reclaim, read))
}

#[tokio::test]
async fn claims_and_status_reads_cost_the_same_with_100000_segments_as_with_10() -> Result<()> {
    let stack = Stack::from_env()?;
    let log = std::env::temp_dir().join(unique("scale-operations"));
    let conf = aws_sdk_dynamodb::config::Builder::from(&stack.sdk(&stack.a.region))
        .endpoint_url(&stack.dynamodb)
        .interceptor(OperationLog::to_file(&log)?)
        .build();
    let client = aws_sdk_dynamodb::Client::from_conf(conf);
    let state = DynamoStore::new(client.clone(), unique("scale"));
    state.ensure_table().await?;

    let small = job_with_segments(&stack, &state, &client, SMALL).await?;
    let large = job_with_segments(&stack, &state, &client, LARGE).await?;
    let (small_claim, small_reclaim, small_status) = costs(&stack, &state, &log, &small).await?;
    let (large_claim, large_reclaim, large_status) = costs(&stack, &state, &log, &large).await?;
    println!("claim, 10 segments:      {small_claim:?}");
    println!("claim, 100,000 segments: {large_claim:?}");
    println!("claim again, 10:         {small_reclaim:?}");
    println!("claim again, 100,000:    {large_reclaim:?}");
    println!("status, 10:              {small_status:?}");
    println!("status, 100,000:         {large_status:?}");
    assert_eq!(small_claim, large_claim);
    assert_eq!(small_reclaim, large_reclaim);
    assert_eq!(small_status.backfill(), large_status.backfill());
    // A claim reads the job item, nothing else; so does a status read (and it counts the
    // failed objects: none here).
    assert_eq!(large_claim.backfill_items(), 1, "{large_claim:?}");
    assert_eq!(large_reclaim.backfill_items(), 1, "{large_reclaim:?}");
    assert_eq!(large_status.backfill_items(), 1, "{large_status:?}");

    // `crr backfill segments` is the report that reads every segment: the job item's
    // totals are the segments' sums.
    let out = stack.crr(
        state.table(),
        &["backfill", "segments", &small.id, "--json"],
    )?;
    let report: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(
        report["segments"].as_array().map(Vec::len),
        Some(SMALL as usize)
    );
    assert_eq!(report["consistent"], true, "{out}");

    // The counter sees a read of every segment: the explicit report reads them all.
    let from = lines(&log)?.len();
    let all = state.segments(&large.id).await?;
    let report = cost_since(&log, from)?;
    assert_eq!(all.len(), LARGE as usize);
    assert_eq!(report.backfill_items(), LARGE as usize, "{report:?}");
    let _ = std::fs::remove_file(&log);
    Ok(())
}

/// The store with its own operation log, on a fresh table.
async fn logged_state(stack: &Stack) -> Result<(DynamoStore, aws_sdk_dynamodb::Client)> {
    let log = std::env::temp_dir().join(unique("board-operations"));
    let conf = aws_sdk_dynamodb::config::Builder::from(&stack.sdk(&stack.a.region))
        .endpoint_url(&stack.dynamodb)
        .interceptor(OperationLog::to_file(&log)?)
        .build();
    let client = aws_sdk_dynamodb::Client::from_conf(conf);
    let state = DynamoStore::new(client.clone(), unique("board"));
    state.ensure_table().await?;
    Ok((state, client))
}

fn now_ms() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0)
}

/// A claim that moved the cursor and died before taking the segment's lease leaves the
/// segment on the board: it is claimed again once the board's expiry passes, not lost.
#[tokio::test]
async fn a_segment_handed_out_by_a_claim_that_died_is_claimed_again_after_its_expiry() -> Result<()>
{
    let stack = Stack::from_env()?;
    let (state, client) = logged_state(&stack).await?;
    let rule = job_with_segments(&stack, &state, &client, 2).await?;
    // The cursor's write of a claim, without the lease that follows it.
    let died_until = now_ms() + 1500;
    client
        .update_item()
        .table_name(state.table())
        .key("pk", AttributeValue::S(format!("BACKFILL#{}", rule.id)))
        .key("sk", AttributeValue::S("JOB".into()))
        .update_expression("SET claim_next = :one, leases.#i = :u")
        .expression_attribute_names("#i", "0")
        .expression_attribute_values(":one", AttributeValue::N("1".into()))
        .expression_attribute_values(":u", AttributeValue::N(died_until.to_string()))
        .send()
        .await?;
    let bf = backfiller(&stack, &state);
    let next = bf.claim(&rule, "live-1").await?.context("segment 1")?;
    assert_eq!(next.index, 1);
    assert!(bf.claim(&rule, "live-2").await?.is_none());
    while now_ms() <= died_until {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let again = bf
        .claim(&rule, "live-2")
        .await?
        .context("segment 0 again")?;
    assert_eq!(
        (again.index, again.lease_owner.as_deref()),
        (0, Some("live-2"))
    );
    let job = state.job(&rule.id).await?.context("job")?;
    assert_eq!(job.claims.next, 2);
    assert_eq!(job.claims.leases.len(), 2, "{:?}", job.claims);
    Ok(())
}

/// A job item written before the claim board (no `leases`, no totals) gets them at its
/// first claim, counted once from its segments; done segments are passed over.
#[tokio::test]
async fn a_job_from_before_the_claim_board_is_counted_once_and_claimed_on() -> Result<()> {
    let stack = Stack::from_env()?;
    let (state, client) = logged_state(&stack).await?;
    let rule = job_with_segments(&stack, &state, &client, 3).await?;
    let pk = AttributeValue::S(format!("BACKFILL#{}", rule.id));
    client
        .update_item()
        .table_name(state.table())
        .key("pk", pk.clone())
        .key("sk", AttributeValue::S("JOB".into()))
        .update_expression("REMOVE leases, claim_next")
        .send()
        .await?;
    // Segment 0 finished by the old code, with its counters.
    client
        .update_item()
        .table_name(state.table())
        .key("pk", pk)
        .key("sk", AttributeValue::S("SEG#000000".into()))
        .update_expression("SET done = :t, objects_done = :n, bytes_done = :b, copied = :n")
        .expression_attribute_values(":t", AttributeValue::Bool(true))
        .expression_attribute_values(":n", AttributeValue::N("7".into()))
        .expression_attribute_values(":b", AttributeValue::N("70".into()))
        .send()
        .await?;
    let bf = backfiller(&stack, &state);
    let first = bf.claim(&rule, "new-1").await?.context("a segment")?;
    assert_eq!(first.index, 1);
    let job = state.job(&rule.id).await?.context("job")?;
    assert_eq!(
        (
            job.progress.tally.objects,
            job.progress.tally.bytes,
            job.progress.segments_done
        ),
        (7, 70, 1)
    );
    assert_eq!(bf.claim(&rule, "new-2").await?.map(|s| s.index), Some(2));
    assert!(bf.claim(&rule, "new-3").await?.is_none());
    Ok(())
}
