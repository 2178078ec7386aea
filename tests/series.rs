//! Per-minute activity (issue 17 item 3) against DynamoDB Local and moto through the real
//! SDK: events applied in two minutes make two points with their counts, bytes and
//! latencies; the status JSON's `series` (the Function URL handler and `crr status
//! --series`) has one point per minute; the rollup moves each finished minute into the
//! totals exactly once, however many rollups race, and the totals read the same before
//! and after; minute items carry their TTL.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_s3::primitives::ByteStream;
use chrono::{DateTime, Utc};
use crr_shared::backfill::{BackfillSettings, BackfillStore, Backfiller};
use crr_shared::copy::CopyEngine;
use crr_shared::dynamo::{DynamoStore, TTL_ATTRIBUTE};
use crr_shared::replicate::{Replicator, ReplicatorSettings};
use crr_shared::rule::Notify;
use crr_shared::rule_admin::create_rule;
use crr_shared::series::{self, Activity, MinuteAggregate, Window};
use crr_shared::state::{RealtimeCounters, RuleStore, StatsStore};
use crr_shared::status::{SqsEventQueue, StatusReport, StatusService, answer};
use crr_tests::{RunningFunction, Stack, eventually, invoke, rule, s3_notification, seed, unique};
use serde_json::json;

fn dynamodb(stack: &Stack) -> aws_sdk_dynamodb::Client {
    let conf = aws_sdk_dynamodb::config::Builder::from(&stack.sdk(&stack.a.region))
        .endpoint_url(&stack.dynamodb)
        .build();
    aws_sdk_dynamodb::Client::from_conf(conf)
}

/// Sleeps into the next minute (one second past its start), so what follows is written
/// in a minute of its own.
async fn next_minute() {
    let now = Utc::now();
    let next = series::minute_of(now) + chrono::Duration::seconds(61);
    tokio::time::sleep((next - now).to_std().unwrap_or_default()).await;
}

/// One event notification for each `(key, etag, age in seconds)`, in one payload, with
/// event times that old: the replication latency of each is its age plus the work.
fn events(region: &str, bucket: &str, objects: &[(&str, &str, i64)]) -> serde_json::Value {
    let records: Vec<serde_json::Value> = objects
        .iter()
        .map(|(key, etag, age)| {
            let mut n = s3_notification(region, bucket, "ObjectCreated:Put", key, etag, None, None);
            let mut record = n["Records"][0].take();
            record["eventTime"] = (Utc::now() - chrono::Duration::seconds(*age))
                .to_rfc3339()
                .into();
            record
        })
        .collect();
    serde_json::json!({ "Records": records })
}

async fn put(stack: &Stack, bucket: &str, key: &str, size: usize) -> Result<String> {
    let out = stack
        .s3(&stack.a)
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(ByteStream::from(vec![b's'; size]))
        .send()
        .await?;
    Ok(out.e_tag().unwrap_or_default().to_string())
}

/// Replicates one payload in-process; the minutes its counters may have been written in.
async fn replicate(
    replicator: &Replicator,
    payload: serde_json::Value,
) -> Result<(DateTime<Utc>, DateTime<Utc>)> {
    let before = series::minute_of(Utc::now());
    replicator.handle(&payload, None).await?;
    Ok((before, series::minute_of(Utc::now())))
}

#[tokio::test]
async fn events_in_two_minutes_make_two_points_in_the_status_series() -> Result<()> {
    let stack = Stack::from_env()?;
    let table = unique("series");
    let state = stack.state(&table).await?;
    let (src, dst) = stack.bucket_pair(&stack.a, &stack.b).await?;
    let mut r = rule(&unique("rule"), stack.a.bucket(&src), stack.b.bucket(&dst));
    r.notify = Notify::External; // events come from this test, once each
    let r = create_rule(&state, &stack.s3_clients(), r).await?;
    let replicator = Replicator::new(
        Arc::new(state.clone()),
        Arc::new(stack.s3_clients()),
        None,
        ReplicatorSettings::default(),
    );
    let region = &stack.a.region;
    let (e1, e2, e3, e4) = (
        put(&stack, &src, "one", 100).await?,
        put(&stack, &src, "two", 200).await?,
        put(&stack, &src, "three", 300).await?,
        put(&stack, &src, "four", 400).await?,
    );

    // Minute 1: three objects, 12 s, 12 s and 45 s after their events (plus the work: the
    // histogram's buckets around them leave a loaded machine 15 s).
    let first = replicate(
        &replicator,
        events(
            region,
            &src,
            &[("one", &e1, 12), ("two", &e2, 12), ("three", &e3, 45)],
        ),
    )
    .await?;
    next_minute().await;
    // Minute 2: one object, 35 s after its event.
    let second = replicate(&replicator, events(region, &src, &[("four", &e4, 35)])).await?;
    ensure!(
        first.1 < second.0,
        "the two batches share a minute: {first:?} {second:?}"
    );

    let read = state
        .read_stats(&r.id, Utc::now() - chrono::Duration::minutes(30))
        .await?;
    let busy: Vec<&MinuteAggregate> = read
        .minutes
        .iter()
        .filter(|m| m.activity.counters.replicated_objects > 0)
        .collect();
    ensure!(busy.len() == 2, "two minutes with activity: {busy:#?}");
    let (m1, m2) = (busy[0], busy[1]);
    ensure!(
        m1.minute >= first.0 && m1.minute <= first.1,
        "{m1:?} {first:?}"
    );
    ensure!(
        m2.minute >= second.0 && m2.minute <= second.1,
        "{m2:?} {second:?}"
    );
    let c1 = &m1.activity.counters;
    assert_eq!((c1.replicated_objects, c1.replicated_bytes), (3, 600));
    let c2 = &m2.activity.counters;
    assert_eq!((c2.replicated_objects, c2.replicated_bytes), (1, 400));
    // Two of three in (10 s, 30 s]: the median is that bucket's top; the maximum is the
    // 45 s one, rounded up to two digits.
    assert_eq!(m1.activity.latency.p50_ms(), Some(30_000));
    let max1 = m1.activity.latency.max_ms.context("max latency")?;
    ensure!(
        (45_000..60_000).contains(&max1) && max1 % 1_000 == 0,
        "max {max1}"
    );
    let max2 = m2.activity.latency.max_ms.context("max latency")?;
    ensure!((35_000..60_000).contains(&max2), "max {max2}");
    assert_eq!(m2.activity.latency.p50_ms(), Some(max2));

    // The minute items carry their TTL, days after their minute.
    let item = dynamodb(&stack)
        .get_item()
        .table_name(&table)
        .key("pk", AttributeValue::S(format!("STATS#{}", r.id)))
        .key(
            "sk",
            AttributeValue::S(format!("M#{}", series::minute_key(m1.minute))),
        )
        .send()
        .await?
        .item
        .context("minute item")?;
    let ttl: i64 = item
        .get(TTL_ATTRIBUTE)
        .and_then(|v| v.as_n().ok())
        .context("TTL attribute")?
        .parse()?;
    assert_eq!(
        ttl,
        (m1.minute + chrono::Duration::days(series::SERIES_TTL_DAYS)).timestamp()
    );

    // The status JSON, as the status function answers it.
    let store = Arc::new(state.clone());
    let service = StatusService::new(
        store.clone(),
        store.clone(),
        store.clone() as Arc<dyn BackfillStore>,
        None,
        Duration::ZERO,
    );
    let query = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let got = answer(
        &service,
        "GET",
        &query(&[("rule", &r.id), ("series", "24h")]),
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.body);
    let report: StatusReport = serde_json::from_str(&got.body)?;
    let s = report.rules[0].series.as_ref().context("series")?;
    assert_eq!((s.minute_seconds, s.points.len()), (60, 1440));
    assert_eq!(s.to - s.from, chrono::Duration::hours(24));
    let point = |t: DateTime<Utc>| s.points.iter().find(|p| p.t == t).context("point");
    let (p1, p2) = (point(m1.minute)?, point(m2.minute)?);
    assert_eq!(
        (
            p1.replicated_objects,
            p1.replicated_bytes,
            p1.latency_p50_ms
        ),
        (3, 600, Some(30_000))
    );
    assert_eq!(p1.latency_max_ms, Some(max1));
    assert_eq!((p2.replicated_objects, p2.latency_max_ms), (1, Some(max2)));
    let quiet = s
        .points
        .iter()
        .filter(|p| p.t != m1.minute && p.t != m2.minute)
        .collect::<Vec<_>>();
    ensure!(
        quiet
            .iter()
            .all(|p| p.replicated_objects == 0 && p.latency_p50_ms.is_none()),
        "only two minutes had events"
    );
    // No migration, no queue: no percent, no pending sample.
    ensure!(
        s.points
            .iter()
            .all(|p| p.backfill_percent_objects.is_none() && p.pending.is_none())
    );
    // Without `series`, none; a window not offered is refused in one line.
    let plain = answer(&service, "GET", &query(&[("rule", &r.id)])).await;
    ensure!(!plain.body.contains("\"series\""), "{}", plain.body);
    let bad = answer(
        &service,
        "GET",
        &query(&[("rule", &r.id), ("series", "2h")]),
    )
    .await;
    assert_eq!(
        (bad.status, bad.body.as_str()),
        (
            400,
            r#"{"error":"unknown series window '2h': use 1h, 6h or 24h"}"#
        )
    );
    let orphan = answer(&service, "GET", &query(&[("series", "1h")])).await;
    assert_eq!(orphan.status, 400, "{}", orphan.body);

    // `crr status RULE --json --series 24h` prints the same series.
    let out = stack.crr(&table, &["status", &r.id, "--json", "--series", "24h"])?;
    let from_cli: StatusReport = serde_json::from_str(&out)?;
    let cli_series = from_cli.rules[0].series.as_ref().context("CLI series")?;
    assert_eq!(cli_series.points.len(), 1440);
    let cli_p1 = cli_series
        .points
        .iter()
        .find(|p| p.t == m1.minute)
        .context("CLI point")?;
    assert_eq!(cli_p1, p1);
    let refused = stack.crr(&table, &["status", &r.id, "--json", "--series", "2d"]);
    ensure!(refused.is_err(), "--series 2d accepted");

    // And the real status function binary, through its Function URL shape.
    let status_fn = RunningFunction::start_direct(&stack, "crr-status", &table, 10, &[])?;
    let call = |series: &str| {
        json!({
            "version": "2.0", "rawPath": "/", "headers": {},
            "queryStringParameters": { "rule": r.id, "series": series },
            "requestContext": { "http": { "method": "GET", "path": "/" }, "timeEpoch": 0 },
            "isBase64Encoded": false
        })
        .to_string()
    };
    let (failed, body) = invoke(status_fn.port, "crr-status", &call("24h")).await?;
    ensure!(!failed, "{body}");
    let response: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(response["statusCode"], 200, "{body}");
    let from_fn: StatusReport =
        serde_json::from_str(response["body"].as_str().unwrap_or_default())?;
    let fn_series = from_fn.rules[0]
        .series
        .as_ref()
        .context("function series")?;
    assert_eq!(fn_series.points.len(), 1440);
    assert_eq!(fn_series.points.iter().find(|p| p.t == m2.minute), Some(p2));
    let (_, body) = invoke(status_fn.port, "crr-status", &call("48h")).await?;
    let response: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(response["statusCode"], 400, "{body}");
    Ok(())
}

fn counters(objects: u64, at: DateTime<Utc>) -> Activity {
    Activity::of_counters(RealtimeCounters {
        replicated_objects: objects,
        replicated_bytes: objects * 1_000,
        failed: 1,
        newest_event_at: Some(at),
        ..RealtimeCounters::default()
    })
}

#[tokio::test]
async fn racing_rollups_move_each_finished_minute_into_the_totals_once() -> Result<()> {
    let stack = Stack::from_env()?;
    let state: DynamoStore = stack.state(&unique("rollup")).await?;
    let rule_id = "racing";
    let now = Utc::now();
    let minute = |ago: i64| series::minute_of(now) - chrono::Duration::minutes(ago);
    // Finished minutes 30, 20 and 10 minutes ago; one 3 minutes ago, not final yet.
    for (ago, objects) in [(30, 1), (20, 2), (10, 4), (3, 8)] {
        state
            .add_activity(rule_id, minute(ago), &counters(objects, minute(ago)))
            .await?;
    }
    let before = state.counters(rule_id).await?;
    assert_eq!((before.replicated_objects, before.failed), (15, 4));
    assert_eq!(before.newest_event_at, Some(minute(3)));

    // Two rollups planned from the same read, written at once: one moves the minutes.
    let read = state.read_stats(rule_id, series::recent_from(now)).await?;
    let plan = series::plan_rollup(&read, now).context("a rollup is due")?;
    assert_eq!(
        (plan.expected, plan.through),
        (None, series::final_through(now))
    );
    assert_eq!(plan.add.replicated_objects, 7);
    let (a, b) = tokio::join!(state.roll_up(rule_id, &plan), state.roll_up(rule_id, &plan));
    assert_eq!([a?, b?].iter().filter(|won| **won).count(), 1);
    assert_eq!(state.counters(rule_id).await?, before);
    let totals = state.read_stats(rule_id, now).await?.totals;
    assert_eq!(totals.counters.replicated_objects, 7);
    assert_eq!(totals.rolled_through, Some(series::final_through(now)));
    assert!(
        !state.roll_up_due(rule_id, now).await?,
        "nothing left to roll"
    );

    // Later, the 3-minutes-ago minute is final: eight rollups race, one moves it.
    let later = now + chrono::Duration::minutes(10);
    let racing = (0..8).map(|_| state.roll_up_due(rule_id, later));
    let won = futures::future::join_all(racing)
        .await
        .into_iter()
        .collect::<crr_shared::Result<Vec<bool>>>()?;
    assert_eq!(won.iter().filter(|w| **w).count(), 1, "{won:?}");
    let totals = state.read_stats(rule_id, later).await?.totals;
    assert_eq!(
        (totals.counters.replicated_objects, totals.counters.failed),
        (15, 4)
    );
    assert_eq!(totals.counters.newest_event_at, Some(minute(3)));
    assert_eq!(state.counters(rule_id).await?, before);

    // A rule deleted takes its minutes with it.
    let (src, dst) = stack.bucket_pair(&stack.a, &stack.b).await?;
    let mut r = rule(&unique("gone"), stack.a.bucket(&src), stack.b.bucket(&dst));
    r.notify = Notify::External;
    let r = create_rule(&state, &stack.s3_clients(), r).await?;
    state
        .add_activity(&r.id, minute(0), &counters(5, now))
        .await?;
    assert_eq!(state.counters(&r.id).await?.replicated_objects, 5);
    state.delete_rule(&r).await?;
    assert_eq!(state.counters(&r.id).await?, RealtimeCounters::default());
    Ok(())
}

/// The backfill records what it examined per minute (the series' `backfill_objects`, and
/// the percent derived from them), and a status read samples the queue's backlog into the
/// current minute (`pending`).
#[tokio::test]
async fn the_backfill_and_the_backlog_show_in_the_series() -> Result<()> {
    let stack = Stack::from_env()?;
    let table = unique("series");
    let state = Arc::new(stack.state(&table).await?);
    let (src, dst) = stack.bucket_pair(&stack.a, &stack.b).await?;
    let history = (0..30)
        .map(|i| (format!("old/{i:02}"), vec![b'h'; 10]))
        .collect();
    seed(&stack, &stack.a, &src, history, 4).await?;
    let mut r = rule(&unique("rule"), stack.a.bucket(&src), stack.b.bucket(&dst));
    r.notify = Notify::External;
    r.historical = true;
    let r = create_rule(state.as_ref(), &stack.s3_clients(), r).await?;
    let backfiller = Backfiller::new(
        state.clone(),
        state.clone(),
        Arc::new(stack.s3_clients()),
        CopyEngine::default(),
        BackfillSettings {
            page_size: 7,
            ..BackfillSettings::default()
        },
    )
    .with_stats(state.clone());
    backfiller.start(&r.id).await?;
    let started = series::minute_of(Utc::now());
    backfiller
        .run(
            Some(&r.id),
            "series-test",
            Instant::now() + Duration::from_secs(60),
        )
        .await?;

    let (queue_url, _) = stack.create_queue(&stack.a, &unique("events"), 30).await?;
    for i in 0..3 {
        stack
            .sqs(&stack.a)
            .send_message()
            .queue_url(&queue_url)
            .message_body(format!("{{\"n\": {i}}}"))
            .send()
            .await?;
    }
    let queue = Arc::new(SqsEventQueue::new(
        stack.sqs(&stack.a),
        &queue_url,
        None,
        None,
    ));
    let service = StatusService::new(
        state.clone(),
        state.clone(),
        state.clone() as Arc<dyn BackfillStore>,
        Some(queue),
        Duration::ZERO,
    );
    let window = Window::parse("1h")?;
    // The first read of a minute samples the backlog; a read after it shows the sample.
    let report = eventually(Duration::from_secs(30), "a backlog sample", || async {
        let report = service.report_with(Some(&r.id), Some(window)).await?;
        let sampled = report.rules[0]
            .series
            .as_ref()
            .is_some_and(|s| s.points.iter().any(|p| p.pending == Some(3)));
        Ok(sampled.then_some(report))
    })
    .await?;
    let status = &report.rules[0];
    assert_eq!(status.historical.objects_done, 30);
    let s = status.series.as_ref().context("series")?;
    let examined: u64 = s.points.iter().map(|p| p.backfill_objects).sum();
    let bytes: u64 = s.points.iter().map(|p| p.backfill_bytes).sum();
    assert_eq!((examined, bytes), (30, 300));
    // Before the migration 0%, after it 100%.
    let before = s
        .points
        .iter()
        .find(|p| p.t < started)
        .context("a minute before the migration")?;
    assert_eq!(before.backfill_percent_objects, Some(0.0));
    let last = s.points.last().context("points")?;
    assert_eq!(last.backfill_percent_objects, Some(100.0));
    Ok(())
}
