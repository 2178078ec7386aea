//! Security checks (issue 8): an object outside the rule's prefixes never reaches the
//! target, whatever event names it and whatever the backfill lists; a rule naming a bucket
//! outside the deployment's lists is refused by name; (issue 16) a rule naming an endpoint
//! the deployment does not allow is refused before any request; no secret, session token or
//! signature appears in the functions' logs, even at trace level.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Result, ensure};
use aws_sdk_s3::primitives::ByteStream;
use crr_shared::rule::Notify;
use crr_shared::rule_admin::create_rule;
use crr_shared::state::RuleStore;
use crr_tests::fault_proxy::{FaultPlan, FaultProxy};
use crr_tests::perturb::{Delivery, failed_ids, sqs_event};
use crr_tests::{RunningFunction, S3Server, Stack, eventually, invoke, list_all, rule, unique};
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

/// A TCP listener on a host no test allows (127.0.0.2) that counts the connections made
/// to it, and closes each at once.
struct CountingListener {
    endpoint: String,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingListener {
    async fn start() -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                drop(socket);
            }
        });
        Ok(Self {
            endpoint,
            connections,
            task,
        })
    }

    fn count(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for CountingListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Issue 16: whoever can write the table could point a rule's target at a host of theirs
/// and receive the source's objects. A rule naming an endpoint the deployment does not
/// allow, written straight into the table (no `crr rule create` to refuse it), is refused
/// by the functions before any request: the replicate function dead-letters its event with
/// the reason, the backfill fails its job with the reason, the status shows both; no
/// connection reaches the other host and no source object is read.
#[tokio::test]
async fn a_rule_naming_an_endpoint_not_allowed_is_refused_without_a_request() -> Result<()> {
    let stack = Stack::from_env()?;
    let table = unique("sec");
    let state = stack.state(&table).await?;
    let (_, queue_arn) = stack.create_queue(&stack.a, &unique("events"), 30).await?;
    let (dlq_url, _) = stack.create_queue(&stack.a, &unique("dlq"), 30).await?;
    let (source, target) = stack.bucket_pair(&stack.a, &stack.b).await?;
    put(&stack.s3(&stack.a), &source, "secret.txt").await?;
    // The source is read through a proxy that counts requests (127.0.0.1: allowed).
    let source_proxy = FaultProxy::start(&stack.a.endpoint, FaultPlan::none(1)).await?;
    let attacker = CountingListener::start().await?;
    // The listener answers: a connection to it is counted (then forgotten below).
    tokio::net::TcpStream::connect(attacker.endpoint.trim_start_matches("http://")).await?;
    eventually(Duration::from_secs(5), "the control connection", || async {
        Ok((attacker.count() == 1).then_some(()))
    })
    .await?;

    let mut r = rule(
        &unique("rule"),
        S3Server {
            endpoint: source_proxy.endpoint.clone(),
            region: stack.a.region.clone(),
        }
        .bucket(&source),
        S3Server {
            endpoint: attacker.endpoint.clone(),
            region: stack.b.region.clone(),
        }
        .bucket(&target),
    );
    r.notify = Notify::Queue {
        arn: queue_arn.clone(),
    };
    r.historical = true;
    let id = r.id.clone();
    // Straight into the table, as anyone with dynamodb:PutItem could.
    state.create_rule(&r).await?;

    // Real time: the event is dead-lettered with the reason, not retried.
    let replicate = RunningFunction::start_direct(
        &stack,
        "crr-replicate",
        &table,
        30,
        &[format!("CRR_DLQ_URL={dlq_url}")],
    )?;
    let b = batch(&[notification(&source, "ObjectCreated:Put", "secret.txt")]);
    let (error, answer) =
        invoke(replicate.port, "crr-replicate", &sqs_event(&b, &queue_arn)).await?;
    ensure!(
        failed_ids(&b, error, &answer).is_empty(),
        "not dead-lettered: {answer} ({} connection(s) to the other host, {} request(s) to the source)",
        attacker.count() - 1,
        source_proxy.stats.requests.load(Ordering::SeqCst)
    );
    let dead = stack
        .peek_messages(&stack.a, &dlq_url, 1, Duration::from_secs(30))
        .await?;
    let reason = dead[0].1.clone().unwrap_or_default();
    let expected = format!("target endpoint '{}'", attacker.endpoint);
    ensure!(
        reason.contains(&expected) && reason.contains("CRR_ALLOWED_ENDPOINTS"),
        "unclear reason: {reason}"
    );

    // Historical: the backfill fails the job with the reason.
    let backfill = RunningFunction::start_direct(&stack, "crr-backfill", &table, 30, &[])?;
    let (failed, answer) = invoke(
        backfill.port,
        "crr-backfill",
        &json!({ "rule_id": id }).to_string(),
    )
    .await?;
    ensure!(failed, "the backfill did not fail: {answer}");

    // The status shows both: the job's reason, and (with the deployment recorded) why
    // real time replicates nothing.
    stack.crr(
        &table,
        &["init-table", "--allowed-endpoints", "http://127.0.0.1:*"],
    )?;
    let status: serde_json::Value =
        serde_json::from_str(&stack.crr(&table, &["status", &id, "--json"])?)?;
    let rule_status = &status["rules"][0];
    ensure!(
        rule_status["historical"]["state"] == "failed"
            && rule_status["historical"]["error"]
                .as_str()
                .is_some_and(|e| e.contains(&expected)),
        "{rule_status}"
    );
    ensure!(
        rule_status["realtime"]["state"] == "refused"
            && rule_status["realtime"]["reason"]
                .as_str()
                .is_some_and(|e| e.contains(&expected)),
        "{rule_status}"
    );
    let human = stack.crr(&table, &["status", &id])?;
    ensure!(human.contains(&expected), "{human}");

    // Nothing left for the other host, nothing read from the source.
    drop((replicate, backfill));
    ensure!(
        attacker.count() == 1,
        "{} connection(s) reached the endpoint that is not allowed",
        attacker.count() - 1
    );
    let reads = source_proxy.stats.requests.load(Ordering::SeqCst);
    ensure!(reads == 0, "{reads} request(s) to the source");
    ensure!(
        list_all(&stack.s3(&stack.b), &target).await?.is_empty(),
        "the real target was written"
    );

    // Removing such a rule does not contact its endpoint either (the source's notification
    // configuration would be read and written there).
    let mut planted = rule(
        &unique("planted"),
        S3Server {
            endpoint: attacker.endpoint.clone(),
            region: stack.a.region.clone(),
        }
        .bucket(&unique("src")),
        stack.b.bucket(&unique("dst")),
    );
    planted.notify = Notify::Queue { arn: queue_arn };
    state.create_rule(&planted).await?;
    stack.crr(&table, &["rule", "delete", &planted.id])?;
    ensure!(state.get_rule(&planted.id).await?.is_none(), "not deleted");
    ensure!(
        attacker.count() == 1,
        "deleting the rule contacted the endpoint that is not allowed"
    );
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
