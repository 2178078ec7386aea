//! End to end: a PUT on the source bucket (moto, region A) produces moto's real S3
//! notification in SQS; `crr local run-function` polls the queue and invokes the real
//! `crr-replicate` binary through the Runtime API; the replica appears in the target
//! bucket on another server (moto region B, or s3s-fs), copied in stream mode.
//!
//! Moto gaps that matter here (DESIGN.md section 7): its S3->SQS records carry no
//! `sequencer`, so the function falls back to reading the source's current state; it
//! does not check SigV4 (s3s-fs does: the s3s-fs test covers signing of our writes).

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Result;
use aws_sdk_s3::primitives::ByteStream;
use crr_shared::rule::{Notify, Policy, Rule};
use crr_shared::rule_admin::create_rule;
use crr_tests::{RunningFunction, S3Server, Stack, eventually, read_object, rule, unique};

const WAIT: Duration = Duration::from_secs(60);

struct Pipeline {
    stack: Stack,
    source: String,
    target: String,
    target_server: S3Server,
    queue_url: String,
    _function: RunningFunction,
}

/// Source bucket on moto A with notifications to a fresh queue, a target bucket on
/// `target_server`, a rule made by `configure`, and the replicate function running.
async fn pipeline(
    target_server: fn(&Stack) -> S3Server,
    configure: impl FnOnce(&mut Rule),
) -> Result<Pipeline> {
    let stack = Stack::from_env()?;
    let table = unique("e2e");
    let state = stack.state(&table).await?;
    let (source, target) = (unique("src"), unique("dst"));
    let target_server = target_server(&stack);
    stack.create_bucket(&stack.a, &source).await?;
    stack.create_bucket(&target_server, &target).await?;
    let (queue_url, queue_arn) = stack.create_queue(&stack.a, &unique("events"), 5).await?;
    let mut r = rule(
        &unique("rule"),
        stack.a.bucket(&source),
        target_server.bucket(&target),
    );
    r.notify = Notify::Queue { arn: queue_arn };
    configure(&mut r);
    create_rule(&state, &stack.s3_clients(), r).await?;
    let function = RunningFunction::start(&stack, "crr-replicate", &queue_url, &table)?;
    Ok(Pipeline {
        stack,
        source,
        target,
        target_server,
        queue_url,
        _function: function,
    })
}

impl Pipeline {
    async fn put(&self, key: &str, body: &[u8], metadata: &[(&str, &str)]) -> Result<()> {
        let mut req = self
            .stack
            .s3(&self.stack.a)
            .put_object()
            .bucket(&self.source)
            .key(key)
            .content_type("text/plain; charset=utf-8")
            .body(ByteStream::from(body.to_vec()));
        for (k, v) in metadata {
            req = req.metadata(*k, *v);
        }
        req.send().await?;
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.stack
            .s3(&self.stack.a)
            .delete_object()
            .bucket(&self.source)
            .key(key)
            .send()
            .await?;
        Ok(())
    }

    async fn replica(&self, key: &str) -> Result<Option<(Vec<u8>, HashMap<String, String>)>> {
        read_object(&self.stack.s3(&self.target_server), &self.target, key).await
    }

    async fn wait_replica(&self, key: &str, body: &[u8]) -> Result<HashMap<String, String>> {
        eventually(WAIT, &format!("replica of '{key}'"), || async {
            Ok(self
                .replica(key)
                .await?
                .filter(|(b, _)| b == body)
                .map(|(_, m)| m))
        })
        .await
    }

    async fn settle(&self) -> Result<()> {
        self.stack
            .wait_queue_drained(&self.stack.a, &self.queue_url, WAIT)
            .await
    }
}

#[tokio::test]
async fn put_replicates_to_the_other_region_with_bytes_and_metadata_under_write_policy()
-> Result<()> {
    let p = pipeline(
        |s| s.b.clone(),
        |r| {
            r.policy = Policy::Write;
            r.prefixes = vec!["docs/".into(), "café/".into()];
        },
    )
    .await?;

    let keys: [(&str, &[u8]); 5] = [
        ("docs/hello world.txt", b"hello, world"),
        ("docs/a+b%c&d=e.txt", b"plus percent ampersand"),
        ("café/ünïcödé 日本.txt", "unicode body ✓".as_bytes()),
        ("docs/empty", b""),
        ("docs/nested/dir/file.bin", &[0u8, 1, 2, 255, 254]),
    ];
    for (key, body) in keys {
        p.put(key, body, &[("owner", "alice"), ("project", "crr")])
            .await?;
    }
    p.put("other/outside-prefix.txt", b"not replicated", &[])
        .await?;

    for (key, body) in keys {
        let meta = p.wait_replica(key, body).await?;
        assert_eq!(
            meta.get("owner").map(String::as_str),
            Some("alice"),
            "{key}: {meta:?}"
        );
        assert_eq!(
            meta.get("project").map(String::as_str),
            Some("crr"),
            "{key}: {meta:?}"
        );
        assert_eq!(
            meta.get("crr-source-bucket"),
            Some(&p.source),
            "{key}: replica marker"
        );
    }
    let head = p
        .stack
        .s3(&p.target_server)
        .head_object()
        .bucket(&p.target)
        .key("docs/hello world.txt")
        .send()
        .await?;
    assert_eq!(head.content_type(), Some("text/plain; charset=utf-8"));

    // An overwrite reaches the target too.
    p.put("docs/hello world.txt", b"hello again", &[("owner", "bob")])
        .await?;
    let meta = p
        .wait_replica("docs/hello world.txt", b"hello again")
        .await?;
    assert_eq!(meta.get("owner").map(String::as_str), Some("bob"));

    // Under `write`, a delete is not replicated.
    p.delete("docs/hello world.txt").await?;
    p.settle().await?;
    assert!(
        p.replica("other/outside-prefix.txt").await?.is_none(),
        "object outside the prefixes was replicated"
    );
    assert_eq!(
        p.replica("docs/hello world.txt").await?.map(|(b, _)| b),
        Some(b"hello again".to_vec())
    );
    Ok(())
}

#[tokio::test]
async fn delete_reaches_the_target_under_full_policy() -> Result<()> {
    let p = pipeline(|s| s.b.clone(), |r| r.policy = Policy::Full).await?;
    p.put("to-delete.txt", b"short-lived", &[]).await?;
    p.put("to-keep.txt", b"stays", &[]).await?;
    p.wait_replica("to-delete.txt", b"short-lived").await?;
    p.wait_replica("to-keep.txt", b"stays").await?;
    p.delete("to-delete.txt").await?;
    eventually(WAIT, "the delete to reach the target", || async {
        Ok(p.replica("to-delete.txt").await?.is_none().then_some(()))
    })
    .await?;
    p.settle().await?;
    assert!(p.replica("to-keep.txt").await?.is_some());
    Ok(())
}

#[tokio::test]
async fn replicates_into_s3s_fs_which_checks_signatures() -> Result<()> {
    // s3s-fs verifies SigV4 on every request, so this proves the stream-mode writes are
    // correctly signed (moto would accept anything). s3s-fs has no tagging or versioning.
    let p = pipeline(|s| s.s3s.clone(), |r| r.prefixes = vec!["in/".into()]).await?;
    let big: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 253) as u8).collect();
    p.put(
        "in/key with spaces+plus.txt",
        b"to s3s",
        &[("owner", "carol")],
    )
    .await?;
    p.put("in/big.bin", &big, &[]).await?;
    p.put("out/not.txt", b"x", &[]).await?;
    let meta = p
        .wait_replica("in/key with spaces+plus.txt", b"to s3s")
        .await?;
    assert_eq!(meta.get("owner").map(String::as_str), Some("carol"));
    p.wait_replica("in/big.bin", &big).await?;
    p.settle().await?;
    assert!(p.replica("out/not.txt").await?.is_none());
    Ok(())
}

#[tokio::test]
async fn a_poison_message_fails_alone_reaches_the_dlq_with_its_reason_and_redrive_replays_it()
-> Result<()> {
    let stack = Stack::from_env()?;
    let table = unique("dlq");
    let state = stack.state(&table).await?;
    let (source, target) = stack.bucket_pair(&stack.a, &stack.b).await?;
    let ((queue_url, queue_arn), (dlq_url, _)) = stack
        .create_queue_with_dlq(&stack.a, &unique("events"), 2, 5)
        .await?;
    let mut r = rule(
        &unique("rule"),
        stack.a.bucket(&source),
        stack.b.bucket(&target),
    );
    r.notify = Notify::Queue { arn: queue_arn };
    let r = create_rule(&state, &stack.s3_clients(), r).await?;
    let _function = RunningFunction::start_with(
        &stack,
        "crr-replicate",
        &queue_url,
        &table,
        &[
            format!("CRR_DLQ_URL={dlq_url}"),
            "CRR_MAX_RECEIVES=2".to_string(),
        ],
    )?;
    let s3a = stack.s3(&stack.a);
    let s3b = stack.s3(&stack.b);

    // A malformed message among good events: only it fails, and it is dead-lettered
    // with the parse error.
    stack
        .sqs(&stack.a)
        .send_message()
        .queue_url(&queue_url)
        .message_body("{\"Records\": [trunc")
        .send()
        .await?;
    s3a.put_object()
        .bucket(&source)
        .key("good.txt")
        .body(ByteStream::from_static(b"good"))
        .send()
        .await?;
    eventually(WAIT, "good.txt replicated", || async {
        Ok(read_object(&s3b, &target, "good.txt").await?.map(|_| ()))
    })
    .await?;
    let dead = stack.peek_messages(&stack.a, &dlq_url, 1, WAIT).await?;
    assert_eq!(dead[0].0, "{\"Records\": [trunc");
    let reason = dead[0].1.clone().unwrap_or_default();
    assert!(
        reason.starts_with("malformed event: body is not JSON"),
        "{reason}"
    );

    // The target bucket disappears: the next event fails permanently, naming the bucket.
    s3b.delete_object()
        .bucket(&target)
        .key("good.txt")
        .send()
        .await?;
    s3b.delete_bucket().bucket(&target).send().await?;
    s3a.put_object()
        .bucket(&source)
        .key("needs fix.txt")
        .body(ByteStream::from_static(b"later"))
        .send()
        .await?;
    let dead = stack.peek_messages(&stack.a, &dlq_url, 2, WAIT).await?;
    let reasons: Vec<String> = dead.iter().filter_map(|(_, r)| r.clone()).collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains(&format!("bucket '{target}' does not exist"))),
        "{reasons:?}"
    );

    // The fix, then a redrive of this rule's events: the malformed message stays.
    stack.create_bucket(&stack.b, &target).await?;
    let out = stack.crr(
        &table,
        &[
            "redrive",
            "--rule",
            &r.id,
            "--queue-url",
            &queue_url,
            "--dlq-url",
            &dlq_url,
        ],
    )?;
    assert!(out.contains("moved 1 message(s)"), "{out}");
    assert!(out.contains("1 left in the DLQ"), "{out}");
    let replica = eventually(WAIT, "the redriven event replicated", || async {
        read_object(&s3b, &target, "needs fix.txt").await
    })
    .await?;
    assert_eq!(replica.0, b"later");
    Ok(())
}

#[tokio::test]
async fn eventbridge_events_through_sqs_replicate_and_delete() -> Result<()> {
    // S3 -> EventBridge (moto's default bus) -> rule -> SQS -> replicate. moto's
    // EventBridge events carry a constant sequencer and an epoch-seconds `time`: the
    // ledger tells events apart by ETag when sequencers are equal.
    let stack = Stack::from_env()?;
    let table = unique("eb");
    let state = stack.state(&table).await?;
    let (source, target) = stack.bucket_pair(&stack.a, &stack.b).await?;
    let (queue_url, queue_arn) = stack.create_queue(&stack.a, &unique("events"), 5).await?;
    let eb = aws_sdk_eventbridge::Client::from_conf(
        aws_sdk_eventbridge::config::Builder::from(&stack.sdk(&stack.a.region))
            .endpoint_url(&stack.a.endpoint)
            .build(),
    );
    let pattern = serde_json::json!({
        "source": ["aws.s3"],
        "detail-type": ["Object Created", "Object Deleted"],
        "detail": {"bucket": {"name": [source]}}
    });
    let rule_name = unique("s3-to-crr");
    eb.put_rule()
        .name(&rule_name)
        .event_pattern(pattern.to_string())
        .send()
        .await?;
    eb.put_targets()
        .rule(&rule_name)
        .targets(
            aws_sdk_eventbridge::types::Target::builder()
                .id("crr")
                .arn(&queue_arn)
                .build()?,
        )
        .send()
        .await?;
    let r = rule(
        &unique("rule"),
        stack.a.bucket(&source),
        stack.b.bucket(&target),
    );
    assert_eq!(r.notify, Notify::EventBridge);
    create_rule(&state, &stack.s3_clients(), r).await?;
    let _function = RunningFunction::start(&stack, "crr-replicate", &queue_url, &table)?;

    let s3a = stack.s3(&stack.a);
    let s3b = stack.s3(&stack.b);
    let key = "eventbridge/a key+plus.txt";
    s3a.put_object()
        .bucket(&source)
        .key(key)
        .body(ByteStream::from_static(b"v1"))
        .send()
        .await?;
    eventually(WAIT, "v1 replicated", || async {
        Ok(read_object(&s3b, &target, key)
            .await?
            .filter(|(b, _)| b == b"v1")
            .map(|_| ()))
    })
    .await?;
    s3a.put_object()
        .bucket(&source)
        .key(key)
        .body(ByteStream::from_static(b"v2"))
        .send()
        .await?;
    eventually(WAIT, "v2 replicated", || async {
        Ok(read_object(&s3b, &target, key)
            .await?
            .filter(|(b, _)| b == b"v2")
            .map(|_| ()))
    })
    .await?;
    s3a.delete_object().bucket(&source).key(key).send().await?;
    eventually(WAIT, "the delete replicated", || async {
        Ok(read_object(&s3b, &target, key)
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;
    Ok(())
}
