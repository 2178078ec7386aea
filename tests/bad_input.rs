//! Bad input: a corpus of malformed and hostile events, each delivered to the real
//! `crr-replicate` binary as one SQS message. Each must get a clear one-line reason (in the
//! dead-letter queue, where `crr redrive` finds it), must not fail the messages around it,
//! and must change nothing: the target stays empty.

use std::time::Duration;

use anyhow::{Result, ensure};
use crr_shared::rule::Notify;
use crr_shared::rule_admin::create_rule;
use crr_tests::perturb::{Delivery, failed_ids, sqs_event};
use crr_tests::{RunningFunction, Stack, invoke, list_all, rule, unique};
use serde_json::json;

/// An S3 notification for `bucket` with `object` as its `s3.object`.
fn notification(bucket: &str, event_name: &str, object: serde_json::Value) -> String {
    json!({"Records": [{
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
        "eventTime": "2026-12-04T10:00:00.000Z", "eventName": event_name,
        "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": bucket, "arn": format!("arn:aws:s3:::{bucket}")},
               "object": object}
    }]})
    .to_string()
}

/// (name, body, what the reason must mention) of messages that must be dead-lettered.
fn rejected(bucket: &str) -> Vec<(&'static str, String, &'static str)> {
    let put = |object| notification(bucket, "ObjectCreated:Put", object);
    vec![
        (
            "truncated JSON",
            "{\"Records\": [{\"eventVersion\": \"2.1\"".into(),
            "JSON",
        ),
        ("not JSON at all", "\u{0}\u{1}binary".into(), "JSON"),
        (
            "Records of the wrong type",
            json!({"Records": "nope"}).to_string(),
            "Records",
        ),
        (
            "key of the wrong type",
            put(json!({"key": 5, "size": 1})),
            "key",
        ),
        (
            "size of the wrong type",
            put(json!({"key": "a", "size": "big"})),
            "size",
        ),
        (
            "nesting past any sane depth",
            format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)),
            "JSON",
        ),
        (
            "a 250 KB body of junk",
            format!("{{\"Records\": [\"{}\"]}}", "x".repeat(250_000)),
            "not an object",
        ),
        (
            "non-UTF-8 percent escapes",
            put(json!({"key": "%FF%FE", "size": 1})),
            "UTF-8",
        ),
        ("empty key", put(json!({"key": "", "size": 1})), "empty"),
        (
            "key over 1024 bytes",
            put(json!({"key": "k".repeat(1025), "size": 1})),
            "1024",
        ),
    ]
}

/// Receives every message of the DLQ (each hidden once received) until `n` are in hand:
/// (body, `crr-error` reason).
async fn dead_letters(stack: &Stack, url: &str, n: usize) -> Result<Vec<(String, Option<String>)>> {
    let sqs = stack.sqs(&stack.a);
    let mut found = Vec::new();
    let start = std::time::Instant::now();
    while found.len() < n && start.elapsed() < Duration::from_secs(30) {
        let out = sqs
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .visibility_timeout(300)
            .message_attribute_names("All")
            .send()
            .await?;
        for m in out.messages() {
            let reason = m
                .message_attributes()
                .and_then(|a| a.get("crr-error"))
                .and_then(|v| v.string_value())
                .map(str::to_string);
            found.push((m.body().unwrap_or_default().to_string(), reason));
        }
        if out.messages().is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(found)
}

#[tokio::test]
async fn every_bad_event_gets_a_clear_reason_and_changes_nothing() -> Result<()> {
    let stack = Stack::from_env()?;
    let table = unique("bad");
    let state = stack.state(&table).await?;
    let (queue_url, queue_arn) = stack.create_queue(&stack.a, &unique("events"), 30).await?;
    let (dlq_url, _) = stack.create_queue(&stack.a, &unique("dlq"), 30).await?;
    let (source, target) = stack.bucket_pair(&stack.a, &stack.b).await?;
    let mut r = rule(
        &unique("rule"),
        stack.a.bucket(&source),
        stack.b.bucket(&target),
    );
    r.notify = Notify::Queue {
        arn: queue_arn.clone(),
    };
    create_rule(&state, &stack.s3_clients(), r).await?;
    let function = RunningFunction::start_direct(
        &stack,
        "crr-replicate",
        &table,
        30,
        &[format!("CRR_DLQ_URL={dlq_url}")],
    )?;
    let _ = queue_url;

    let corpus = rejected(&source);
    for (i, (name, body, _)) in corpus.iter().enumerate() {
        let batch = [Delivery {
            message_id: format!("bad-{i}"),
            body: body.clone(),
            receive_count: 1,
        }];
        let (error, answer) = invoke(
            function.port,
            "crr-replicate",
            &sqs_event(&batch, &queue_arn),
        )
        .await?;
        // Dead-lettered with its reason, so not handed back to SQS to fail again.
        ensure!(
            failed_ids(&batch, error, &answer).is_empty(),
            "{name}: handed back instead of dead-lettered: {answer}"
        );
    }
    // Events that need no change are acknowledged and change nothing either.
    let ignored = [
        (
            "a bucket no rule names",
            notification(
                "no-such-rule-bucket",
                "ObjectCreated:Put",
                json!({"key": "a", "size": 1}),
            ),
        ),
        (
            "an event type crr does not handle",
            notification(
                &source,
                "ObjectRestore:Completed",
                json!({"key": "a", "size": 1}),
            ),
        ),
        ("no records", json!({"Records": []}).to_string()),
        (
            "an S3 test event",
            json!({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": source}).to_string(),
        ),
    ];
    for (i, (name, body)) in ignored.iter().enumerate() {
        let batch = [Delivery {
            message_id: format!("ignored-{i}"),
            body: body.clone(),
            receive_count: 1,
        }];
        let (error, answer) = invoke(
            function.port,
            "crr-replicate",
            &sqs_event(&batch, &queue_arn),
        )
        .await?;
        ensure!(
            failed_ids(&batch, error, &answer).is_empty(),
            "{name}: failed: {answer}"
        );
    }

    let dead = dead_letters(&stack, &dlq_url, corpus.len()).await?;
    ensure!(
        dead.len() == corpus.len(),
        "{} dead-lettered, {} expected: {dead:#?}",
        dead.len(),
        corpus.len()
    );
    for (name, body, mentions) in &corpus {
        let Some((_, reason)) = dead.iter().find(|(b, _)| b == body) else {
            anyhow::bail!("{name}: not in the dead-letter queue");
        };
        let reason = reason.clone().unwrap_or_default();
        ensure!(
            !reason.is_empty() && !reason.contains('\n') && reason.len() < 400,
            "{name}: the reason is not one clear line: {reason:?}"
        );
        ensure!(
            reason.contains(mentions),
            "{name}: the reason does not say what was wrong ({mentions}): {reason}"
        );
    }
    let replicas = list_all(&stack.s3(&stack.b), &target).await?;
    ensure!(
        replicas.is_empty(),
        "bad events wrote to the target: {replicas:?}"
    );

    // A payload that is not an event at all fails the invocation with a one-line message.
    for payload in ["\"just a string\"", "{\"foo\": 1}", "[]"] {
        let (error, answer) = invoke(function.port, "crr-replicate", payload).await?;
        ensure!(error, "{payload}: accepted: {answer}");
        let v: serde_json::Value = serde_json::from_str(&answer)?;
        let message = v["errorMessage"].as_str().unwrap_or_default();
        ensure!(
            !message.is_empty() && !message.contains('\n'),
            "{payload}: unclear error: {answer}"
        );
    }
    Ok(())
}
