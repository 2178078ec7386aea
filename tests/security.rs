//! Security checks (issue 8): an object outside the rule's prefixes never reaches the
//! target, whatever event names it and whatever the backfill lists; a rule naming a bucket
//! outside the deployment's lists is refused by name; no secret, session token or
//! signature appears in the functions' logs, even at trace level.

use std::time::Duration;

use anyhow::{Result, ensure};
use aws_sdk_s3::primitives::ByteStream;
use crr_shared::rule::Notify;
use crr_shared::rule_admin::create_rule;
use crr_tests::perturb::{Delivery, failed_ids, sqs_event};
use crr_tests::{RunningFunction, Stack, invoke, list_all, rule, unique};
use serde_json::json;

fn notification(bucket: &str, event_name: &str, key: &str) -> String {
    json!({"Records": [{
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
        "eventTime": "2026-12-04T10:00:00.000Z", "eventName": event_name,
        "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": 1}}
    }]})
    .to_string()
}

fn batch(bodies: &[String]) -> Vec<Delivery> {
    bodies
        .iter()
        .enumerate()
        .map(|(i, body)| Delivery {
            message_id: format!("m{i}"),
            body: body.clone(),
            receive_count: 1,
        })
        .collect()
}

async fn put(s3: &aws_sdk_s3::Client, bucket: &str, key: &str) -> Result<()> {
    s3.put_object()
        .bucket(bucket)
        .key(key)
        .body(ByteStream::from_static(b"secret payload"))
        .send()
        .await?;
    Ok(())
}

#[tokio::test]
async fn objects_outside_the_prefixes_never_reach_the_target() -> Result<()> {
    let stack = Stack::from_env()?;
    let table = unique("sec");
    let state = stack.state(&table).await?;
    let (_, queue_arn) = stack.create_queue(&stack.a, &unique("events"), 30).await?;
    let (source, target) = stack.bucket_pair(&stack.a, &stack.b).await?;
    let s3a = stack.s3(&stack.a);
    // Near misses of the prefix `in/`: no slash, other case, nested elsewhere.
    let outside = ["inx", "IN/a", "out/in/a", "i", "in"];
    for key in outside.iter().chain(&["in/a", "in/deep/b"]) {
        put(&s3a, &source, key).await?;
    }
    let mut r = rule(
        &unique("rule"),
        stack.a.bucket(&source),
        stack.b.bucket(&target),
    );
    r.prefixes = vec!["in/".into()];
    r.historical = true;
    r.notify = Notify::Queue {
        arn: queue_arn.clone(),
    };
    let id = r.id.clone();
    create_rule(&state, &stack.s3_clients(), r).await?;

    // Real time: an event for every key, inside and out.
    let function = RunningFunction::start_direct(&stack, "crr-replicate", &table, 30, &[])?;
    let bodies: Vec<String> = outside
        .iter()
        .chain(&["in/a"])
        .map(|k| notification(&source, "ObjectCreated:Put", k))
        .collect();
    let b = batch(&bodies);
    let (error, answer) =
        invoke(function.port, "crr-replicate", &sqs_event(&b, &queue_arn)).await?;
    ensure!(failed_ids(&b, error, &answer).is_empty(), "{answer}");
    // Historical: the backfill lists the bucket.
    stack.crr(&table, &["backfill", "run", &id])?;

    let replicas: Vec<String> = list_all(&stack.s3(&stack.b), &target)
        .await?
        .into_keys()
        .collect();
    ensure!(
        replicas == ["in/a", "in/deep/b"],
        "the target holds {replicas:?}: only in/a and in/deep/b belong there"
    );
    Ok(())
}

#[tokio::test]
async fn a_rule_naming_a_bucket_outside_the_deployment_is_refused() -> Result<()> {
    let stack = Stack::from_env()?;
    let table = unique("sec");
    let state = stack.state(&table).await?;
    let (_, queue_arn) = stack.create_queue(&stack.a, &unique("events"), 30).await?;
    let (dlq_url, _) = stack.create_queue(&stack.a, &unique("dlq"), 30).await?;
    let (source, target) = stack.bucket_pair(&stack.a, &stack.b).await?;
    put(&stack.s3(&stack.a), &source, "a").await?;
    let mut r = rule(
        &unique("rule"),
        stack.a.bucket(&source),
        stack.b.bucket(&target),
    );
    r.notify = Notify::Queue {
        arn: queue_arn.clone(),
    };
    create_rule(&state, &stack.s3_clients(), r).await?;
    // The deployment may write only to some other bucket.
    let function = RunningFunction::start_direct(
        &stack,
        "crr-replicate",
        &table,
        30,
        &[
            format!("CRR_DLQ_URL={dlq_url}"),
            format!("CRR_SOURCE_BUCKETS={source}"),
            "CRR_TARGET_BUCKETS=the-only-allowed-target".into(),
        ],
    )?;
    let b = batch(&[notification(&source, "ObjectCreated:Put", "a")]);
    let (error, answer) =
        invoke(function.port, "crr-replicate", &sqs_event(&b, &queue_arn)).await?;
    ensure!(
        failed_ids(&b, error, &answer).is_empty(),
        "not dead-lettered: {answer}"
    );
    let dead = stack
        .peek_messages(&stack.a, &dlq_url, 1, Duration::from_secs(30))
        .await?;
    let reason = dead[0].1.clone().unwrap_or_default();
    ensure!(
        reason.contains(&format!("target bucket '{target}'")) && reason.contains("TargetBuckets"),
        "unclear reason: {reason}"
    );
    let replicas = list_all(&stack.s3(&stack.b), &target).await?;
    ensure!(replicas.is_empty(), "written anyway: {replicas:?}");
    Ok(())
}

#[tokio::test]
async fn no_secret_or_signature_appears_in_the_logs() -> Result<()> {
    const SECRET: &str = "crrSentinelSecretKey0123456789abcdefABCDEF";
    const TOKEN: &str = "crrSentinelSessionToken9876543210";
    let stack = Stack::from_env()?;
    let table = unique("sec");
    let state = stack.state(&table).await?;
    let (_, queue_arn) = stack.create_queue(&stack.a, &unique("events"), 30).await?;
    let (source, target) = stack.bucket_pair(&stack.a, &stack.b).await?;
    let s3a = stack.s3(&stack.a);
    put(&s3a, &source, "ok.txt").await?;
    let mut r = rule(
        &unique("rule"),
        stack.a.bucket(&source),
        stack.b.bucket(&target),
    );
    r.notify = Notify::Queue {
        arn: queue_arn.clone(),
    };
    create_rule(&state, &stack.s3_clients(), r).await?;
    let dir = std::env::temp_dir().join(unique("crr-sec"));
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("replicate.log");
    let function = RunningFunction::start_direct_logged(
        &stack,
        "crr-replicate",
        &table,
        30,
        &[
            format!("AWS_SECRET_ACCESS_KEY={SECRET}"),
            format!("AWS_SESSION_TOKEN={TOKEN}"),
            // Everything, the SDK's own request logging included.
            "AWS_LAMBDA_LOG_LEVEL=trace".into(),
            "RUST_LOG=trace".into(),
        ],
        Some(&log),
    )?;
    // A copy that works, one whose source is gone, and one that fails (target deleted).
    let ok = batch(&[
        notification(&source, "ObjectCreated:Put", "ok.txt"),
        notification(&source, "ObjectCreated:Put", "gone.txt"),
    ]);
    let (error, answer) =
        invoke(function.port, "crr-replicate", &sqs_event(&ok, &queue_arn)).await?;
    ensure!(failed_ids(&ok, error, &answer).is_empty(), "{answer}");
    stack
        .s3(&stack.b)
        .delete_object()
        .bucket(&target)
        .key("ok.txt")
        .send()
        .await?;
    stack
        .s3(&stack.b)
        .delete_bucket()
        .bucket(&target)
        .send()
        .await?;
    let failing = batch(&[notification(&source, "ObjectCreated:Put", "ok.txt")]);
    let _ = invoke(
        function.port,
        "crr-replicate",
        &sqs_event(&failing, &queue_arn),
    )
    .await?;
    drop(function);

    let text = std::fs::read_to_string(&log)?;
    ensure!(
        text.len() > 1000,
        "the log holds almost nothing: is trace logging on? {text}"
    );
    for (what, needle) in [
        ("the secret access key", SECRET),
        ("the session token", TOKEN),
        ("a request signature", "Signature="),
        ("a presigned URL", "X-Amz-Signature"),
        ("a presigned URL's credential", "X-Amz-Credential"),
    ] {
        ensure!(
            !text.contains(needle),
            "{what} appears in the function's log ({})",
            log.display()
        );
    }
    Ok(())
}
