//! Status against the local stack: a scenario with known counts (replicated, deleted,
//! failed, pending, historical), read through `crr status --json` and through the real
//! `crr-status` function binary behind the Runtime API emulator; both must agree.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use aws_sdk_s3::primitives::ByteStream;
use crr_shared::backfill::{BackfillSettings, Backfiller};
use crr_shared::copy::CopyEngine;
use crr_shared::rule::Notify;
use crr_shared::rule_admin::{create_rule, delete_rule};
use crr_shared::status::StatusReport;
use crr_tests::{RunningFunction, Stack, eventually, invoke, rule, seed, unique};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

fn cli_status(stack: &Stack, table: &str, queue: &str, dlq: &str) -> Result<StatusReport> {
    let out = stack.crr(
        table,
        &[
            "status",
            "--json",
            "--queue-url",
            queue,
            "--dlq-url",
            dlq,
            "--settle-secs",
            "0",
        ],
    )?;
    serde_json::from_str(&out).with_context(|| format!("status JSON: {out}"))
}

/// The report without what depends on the moment it was made.
fn timeless(mut report: StatusReport) -> StatusReport {
    report.generated_at = Default::default();
    if let Some(q) = report.queue.as_mut() {
        q.read_at = Default::default();
    }
    for r in &mut report.rules {
        r.realtime.synced_up_to = None;
        r.realtime.lag_seconds = None;
        r.historical.eta_seconds = None;
    }
    report
}

#[tokio::test]
async fn status_reports_a_known_scenario_alike_in_the_cli_and_the_function() -> Result<()> {
    let stack = Stack::from_env()?;
    let table = unique("status");
    let state = stack.state(&table).await?;
    let (src_ok, dst_ok) = stack.bucket_pair(&stack.a, &stack.b).await?;
    let (src_bad, dst_bad) = stack.bucket_pair(&stack.a, &stack.b).await?;
    // The history: 3 objects (100, 200, 300 bytes) before the rule.
    let history = (1..=3)
        .map(|i| (format!("old/{i}"), vec![b'h'; i * 100]))
        .collect();
    seed(&stack, &stack.a, &src_ok, history, 3).await?;
    let ((queue_url, queue_arn), (dlq_url, _)) = stack
        .create_queue_with_dlq(&stack.a, &unique("events"), 2, 5)
        .await?;
    let clients = stack.s3_clients();
    let mut ok = rule(
        &unique("ok"),
        stack.a.bucket(&src_ok),
        stack.b.bucket(&dst_ok),
    );
    ok.historical = true;
    ok.notify = Notify::Queue {
        arn: queue_arn.clone(),
    };
    let ok = create_rule(&state, &clients, ok).await?;
    let mut bad = rule(
        &unique("bad"),
        stack.a.bucket(&src_bad),
        stack.b.bucket(&dst_bad),
    );
    bad.notify = Notify::Queue { arn: queue_arn };
    let bad = create_rule(&state, &clients, bad).await?;
    // The bad rule's target disappears: its events fail for good.
    stack
        .s3(&stack.b)
        .delete_bucket()
        .bucket(&dst_bad)
        .send()
        .await?;
    // Test events of the notification set-up are not part of the scenario.
    stack
        .sqs(&stack.a)
        .purge_queue()
        .queue_url(&queue_url)
        .send()
        .await?;

    // Six events while no function runs: 3 puts (10, 20, 30 bytes) and a delete for the
    // good rule, 2 puts for the bad one. All pending, so nothing can be said synced.
    let s3a = stack.s3(&stack.a);
    for (bucket, key, size) in [
        (&src_ok, "live/1", 10),
        (&src_ok, "live/2", 20),
        (&src_ok, "live/3", 30),
        (&src_bad, "x/1", 1),
        (&src_bad, "x/2", 2),
    ] {
        s3a.put_object()
            .bucket(bucket)
            .key(key)
            .body(ByteStream::from(vec![b'l'; size]))
            .send()
            .await?;
    }
    s3a.delete_object()
        .bucket(&src_ok)
        .key("old/1")
        .send()
        .await?;
    let pending = eventually(WAIT, "6 events queued", || async {
        let report = cli_status(&stack, &table, &queue_url, &dlq_url)?;
        Ok((report.queue.as_ref().map(|q| q.waiting) == Some(6)).then_some(report))
    })
    .await?;
    assert_eq!(pending.rules.len(), 2);
    for r in &pending.rules {
        assert_eq!(r.realtime.state, "catching_up", "{r:?}");
        assert_eq!((r.realtime.pending, r.realtime.in_flight), (6, 0));
        assert_eq!(
            (r.realtime.synced_up_to, r.realtime.lag_seconds),
            (None, None)
        );
    }
    let human = stack.crr(
        &table,
        &[
            "status",
            &ok.id,
            "--queue-url",
            &queue_url,
            "--dlq-url",
            &dlq_url,
        ],
    )?;
    assert!(
        human.contains("unknown while events are pending; 6 pending"),
        "{human}"
    );
    assert!(human.contains("historical  not requested"), "{human}");

    // The function drains the queue; the backfill copies the history.
    let _function = RunningFunction::start_with(
        &stack,
        "crr-replicate",
        &queue_url,
        &table,
        &[
            format!("CRR_DLQ_URL={dlq_url}"),
            "CRR_MAX_RECEIVES=1".to_string(),
        ],
    )?;
    stack.wait_queue_drained(&stack.a, &queue_url, WAIT).await?;
    let drained_at = chrono::Utc::now();
    let state = Arc::new(state);
    let backfiller = Backfiller::new(
        state.clone(),
        state.clone(),
        Arc::new(clients),
        CopyEngine::default(),
        BackfillSettings::default(),
    );
    backfiller.start(&ok.id).await?;
    backfiller
        .run(
            Some(&ok.id),
            "status-test",
            Instant::now() + Duration::from_secs(60),
        )
        .await?;

    let report = cli_status(&stack, &table, &queue_url, &dlq_url)?;
    let queue = report.queue.clone().context("queue watched")?;
    assert_eq!(
        (queue.waiting, queue.in_flight, queue.dead_letters),
        (0, 0, Some(2))
    );
    let good = report
        .rules
        .iter()
        .find(|r| r.rule_id == ok.id)
        .context("ok rule")?;
    let rt = &good.realtime;
    assert_eq!(rt.state, "caught_up");
    assert_eq!((rt.replicated_objects, rt.replicated_bytes), (3, 60));
    assert_eq!((rt.deletes, rt.failed, rt.pending), (1, 0, 0));
    let synced = rt.synced_up_to.context("synced_up_to when caught up")?;
    ensure!(
        synced >= drained_at,
        "synced_up_to {synced} before the drain {drained_at}"
    );
    ensure!(
        rt.lag_seconds.is_some_and(|l| l <= 5),
        "lag {:?}",
        rt.lag_seconds
    );
    // The backfill examined 2 old objects (one was deleted) and the 3 live ones, which
    // real time had already copied: precise copies, in place.
    let h = &good.historical;
    assert_eq!(h.state, "completed");
    assert_eq!((h.objects_done, h.objects_total), (5, 5));
    assert_eq!((h.bytes_done, h.bytes_total), (560, 560));
    assert_eq!((h.copied, h.fixed, h.in_place, h.skipped), (2, 0, 3, 0));
    assert_eq!(
        (h.percent_objects, h.percent_bytes),
        (Some(100.0), Some(100.0))
    );
    assert_eq!(h.eta_seconds, Some(0));
    let failing = report
        .rules
        .iter()
        .find(|r| r.rule_id == bad.id)
        .context("bad rule")?;
    assert_eq!(
        (failing.realtime.failed, failing.realtime.replicated_objects),
        (2, 0)
    );
    assert_eq!(failing.historical.state, "not_requested");

    let human = stack.crr(
        &table,
        &[
            "status",
            "--queue-url",
            &queue_url,
            "--dlq-url",
            &dlq_url,
            "--settle-secs",
            "0",
        ],
    )?;
    assert!(
        human.contains("2 failed event(s) in the dead-letter queue"),
        "{human}"
    );
    assert!(human.contains("! replicated 0 (0 B), deletes 0"), "{human}");
    assert!(
        human.contains(&format!(
            "historical  [{}] completed: objects 5/5 (100.0%)",
            "=".repeat(30)
        )),
        "{human}"
    );

    // The status function says the same, through its Function URL shape.
    let status_fn = RunningFunction::start_direct(
        &stack,
        "crr-status",
        &table,
        10,
        &[
            format!("CRR_QUEUE_URL={queue_url}"),
            format!("CRR_DLQ_URL={dlq_url}"),
            "CRR_STATUS_SETTLE_SECS=0".to_string(),
        ],
    )?;
    let request = |method: &str, query: serde_json::Value| {
        json!({
            "version": "2.0",
            "rawPath": "/",
            "headers": {},
            "queryStringParameters": query,
            "requestContext": { "http": { "method": method, "path": "/" }, "timeEpoch": 0 },
            "isBase64Encoded": false
        })
        .to_string()
    };
    let call = |payload: String| async move {
        let (failed, body) = invoke(status_fn.port, "crr-status", &payload).await?;
        ensure!(!failed, "status function failed: {body}");
        let response: serde_json::Value = serde_json::from_str(&body)?;
        let text = response["body"].as_str().unwrap_or_default().to_string();
        Ok::<_, anyhow::Error>((response["statusCode"].as_u64().unwrap_or(0), text))
    };
    let (code, body) = call(request("GET", json!({}))).await?;
    assert_eq!(code, 200, "{body}");
    let from_function: StatusReport = serde_json::from_str(&body)?;
    assert_eq!(timeless(from_function), timeless(report));
    let (code, body) = call(request("GET", json!({ "rule": bad.id }))).await?;
    let one: StatusReport = serde_json::from_str(&body)?;
    assert_eq!((code, one.rules.len()), (200, 1));
    let (code, body) = call(request("GET", json!({ "rule": "nope" }))).await?;
    assert_eq!(
        (code, body.as_str()),
        (404, r#"{"error":"no rule 'nope'"}"#)
    );
    let (code, _) = call(request("POST", json!({}))).await?;
    assert_eq!(code, 405);

    // A rule deleted and created again under the same id starts from zero.
    delete_rule(state.as_ref(), &stack.s3_clients(), &ok.id).await?;
    create_rule(state.as_ref(), &stack.s3_clients(), ok.clone()).await?;
    let again = cli_status(&stack, &table, &queue_url, &dlq_url)?;
    let fresh = again
        .rules
        .iter()
        .find(|r| r.rule_id == ok.id)
        .context("ok rule")?;
    assert_eq!(fresh.realtime.replicated_objects, 0);
    assert_eq!(fresh.historical.state, "not_requested");
    Ok(())
}

/// Issue 16: a rule whose source is outside the deployment's region receives no event, so
/// an empty queue says nothing of it: it is `not_receiving_events` (no `synced_up_to`, no
/// lag), never `caught_up`, while a rule inside the deployment is `caught_up`. The status
/// function knows the deployment from its environment (`AWS_REGION`, the bucket lists);
/// `crr status` from the record `crr init-table --source-buckets ...` writes.
#[tokio::test]
async fn a_rule_outside_the_deployment_is_not_receiving_events() -> Result<()> {
    let stack = Stack::from_env()?;
    let table = unique("status");
    let state = stack.state(&table).await?;
    let (queue_url, queue_arn) = stack.create_queue(&stack.a, &unique("events"), 30).await?;
    let (dlq_url, _) = stack.create_queue(&stack.a, &unique("dlq"), 30).await?;
    let (inside_src, inside_dst) = stack.bucket_pair(&stack.a, &stack.b).await?;
    // Its source in eu-west-1 (moto B); the deployment (AWS_REGION) is in us-east-1.
    let (outside_src, outside_dst) = stack.bucket_pair(&stack.b, &stack.a).await?;
    let mut inside = rule(
        &unique("inside"),
        stack.a.bucket(&inside_src),
        stack.b.bucket(&inside_dst),
    );
    inside.notify = Notify::Queue { arn: queue_arn };
    let outside = rule(
        &unique("outside"),
        stack.b.bucket(&outside_src),
        stack.a.bucket(&outside_dst),
    );
    create_rule(&state, &stack.s3_clients(), inside.clone()).await?;
    // No record yet: nothing stops the library.
    create_rule(&state, &stack.s3_clients(), outside.clone()).await?;
    // S3's test event (sent when the inside rule turned notifications on) is not the point.
    stack
        .sqs(&stack.a)
        .purge_queue()
        .queue_url(&queue_url)
        .send()
        .await?;
    let states = |report: &StatusReport| -> Vec<(String, String, Option<u64>, Option<String>)> {
        let mut v: Vec<_> = report
            .rules
            .iter()
            .map(|r| {
                (
                    r.rule_id.clone(),
                    r.realtime.state.clone(),
                    r.realtime.lag_seconds,
                    r.realtime.reason.clone(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let check = |report: &StatusReport| -> Result<()> {
        let by_id = |id: &str| report.rules.iter().find(|r| r.rule_id == id);
        let (i, o) = (
            by_id(&inside.id).context("inside")?,
            by_id(&outside.id).context("outside")?,
        );
        ensure!(
            i.realtime.state == "caught_up" && i.realtime.reason.is_none(),
            "the queue is empty, the inside rule caught up: {:?}",
            states(report)
        );
        ensure!(
            o.realtime.state == "not_receiving_events"
                && o.realtime.synced_up_to.is_none()
                && o.realtime.lag_seconds.is_none()
                && o.realtime
                    .reason
                    .as_deref()
                    .is_some_and(|r| r.contains("region eu-west-1") && r.contains("us-east-1")),
            "{:?}",
            states(report)
        );
        Ok(())
    };

    // The function, from its environment (no record in the table).
    let status_fn = RunningFunction::start_direct(
        &stack,
        "crr-status",
        &table,
        10,
        &[
            format!("CRR_QUEUE_URL={queue_url}"),
            format!("CRR_DLQ_URL={dlq_url}"),
            "CRR_STATUS_SETTLE_SECS=0".to_string(),
        ],
    )?;
    let request = json!({
        "version": "2.0", "rawPath": "/", "headers": {}, "queryStringParameters": {},
        "requestContext": { "http": { "method": "GET", "path": "/" }, "timeEpoch": 0 },
        "isBase64Encoded": false
    });
    let (failed, body) = invoke(status_fn.port, "crr-status", &request.to_string()).await?;
    ensure!(!failed, "{body}");
    let response: serde_json::Value = serde_json::from_str(&body)?;
    let from_function: StatusReport =
        serde_json::from_str(response["body"].as_str().unwrap_or_default())?;
    check(&from_function)?;

    // The CLI, from the deployment record.
    stack.crr(
        &table,
        &[
            "init-table",
            "--source-buckets",
            &format!("{inside_src},{outside_src}"),
            "--allowed-endpoints",
            crr_tests::TEST_ALLOWED_ENDPOINTS,
        ],
    )?;
    check(&cli_status(&stack, &table, &queue_url, &dlq_url)?)?;
    let human = stack.crr(
        &table,
        &[
            "status",
            &outside.id,
            "--queue-url",
            &queue_url,
            "--dlq-url",
            &dlq_url,
        ],
    )?;
    ensure!(
        human.contains("not receiving events") && human.contains("region eu-west-1"),
        "{human}"
    );
    Ok(())
}
