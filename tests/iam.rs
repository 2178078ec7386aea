//! The IAM and environment cross-check between the code and `infra/template.yaml`.
//!
//! The three function binaries run scenarios against the local stack with
//! `CRR_OPERATION_LOG` set, so every AWS operation they make is recorded (an SDK
//! interceptor, `shared/src/adapters/aws_clients.rs`). Each operation is mapped to the IAM actions
//! AWS requires for it, and the template must grant each function every one of them: a
//! function needing an action its policy lacks fails this test. Resource scoping is not
//! checked here (cfn-lint and checkov see the template; the buckets are parameters).
//! The environment variables each function needs in a deployment
//! (`config::DEPLOYMENT_ENV`) must be set by the template, and every `CRR_*` variable the
//! template sets must be one the code reads.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::ObjectCannedAcl;
use crr_shared::backfill::{BackfillStore, JobState};
use crr_shared::config::DEPLOYMENT_ENV;
use crr_shared::rule::{Notify, Policy};
use crr_shared::rule_admin::create_rule;
use crr_tests::deployed::{EVENT_SOURCE_ACTIONS, actions_for};
use crr_tests::{
    FannedOutBackfill, RunningFunction, S3Server, Stack, eventually, invoke, rule, seed, unique,
};
use serde_yaml::Value;

const WAIT: Duration = Duration::from_secs(90);
const MIB: usize = 1024 * 1024;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The template's value with CloudFormation's short-form tags: `!If [c, a, b]` is taken
/// as `a` (the statement as deployed with its condition true).
fn untag(v: &Value) -> &Value {
    match v {
        Value::Tagged(t) if t.tag == "If" => t.value.get(1).map(untag).unwrap_or(v),
        Value::Tagged(t) => untag(&t.value),
        _ => v,
    }
}

fn strings(v: &Value) -> Vec<String> {
    match untag(v) {
        Value::String(s) => vec![s.clone()],
        Value::Sequence(items) => items.iter().flat_map(strings).collect(),
        _ => vec![],
    }
}

struct FunctionResource {
    actions: BTreeSet<String>,
    env: BTreeSet<String>,
}

fn function_resources(template: &Value) -> Result<BTreeMap<String, FunctionResource>> {
    let resources = template
        .get("Resources")
        .and_then(Value::as_mapping)
        .context("template without Resources")?;
    let mut out = BTreeMap::new();
    for (name, resource) in resources {
        if resource.get("Type").and_then(Value::as_str) != Some("AWS::Serverless::Function") {
            continue;
        }
        let binary = resource
            .get("Metadata")
            .and_then(|m| m.get("BuildProperties"))
            .and_then(|b| b.get("Binary"))
            .and_then(Value::as_str)
            .with_context(|| format!("{name:?}: no Metadata.BuildProperties.Binary"))?;
        let props = resource.get("Properties").context("no Properties")?;
        let mut actions = BTreeSet::new();
        for policy in props
            .get("Policies")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            for statement in policy
                .get("Statement")
                .and_then(Value::as_sequence)
                .into_iter()
                .flatten()
            {
                let statement = untag(statement);
                if statement.get("Effect").and_then(Value::as_str) == Some("Allow") {
                    actions.extend(statement.get("Action").map(strings).unwrap_or_default());
                }
            }
        }
        let env = props
            .get("Environment")
            .and_then(|e| e.get("Variables"))
            .and_then(Value::as_mapping)
            .map(|m| {
                m.keys()
                    .filter_map(Value::as_str)
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        out.insert(binary.to_string(), FunctionResource { actions, env });
    }
    Ok(out)
}

fn recorded(path: &Path) -> Result<BTreeSet<String>> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .lines()
        // `DynamoDB:UpdateItem STATS`: the item family does not change the action.
        .map(|l| l.split(' ').next().unwrap_or_default().to_string())
        .collect())
}

fn log_env(path: &Path) -> String {
    format!("CRR_OPERATION_LOG={}", path.display())
}

async fn put(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    size: usize,
    tagged: bool,
) -> Result<()> {
    let mut req = s3
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(ByteStream::from(vec![b'o'; size]));
    if tagged {
        req = req.tagging("team=data").acl(ObjectCannedAcl::PublicRead);
    }
    req.send().await.with_context(|| format!("put {key}"))?;
    Ok(())
}

/// Every operation `crr-replicate` makes over puts (tagged, multipart), deletes, a
/// suppressed delete and a failure to the DLQ, in stream and server-side mode.
async fn replicate_operations(stack: &Stack, dir: &Path) -> Result<BTreeSet<String>> {
    let table = unique("iam");
    let state = stack.state(&table).await?;
    let ((queue_url, queue_arn), (dlq_url, _)) = stack
        .create_queue_with_dlq(&stack.a, &unique("events"), 2, 5)
        .await?;
    let eu_on_a = S3Server {
        endpoint: stack.a.endpoint.clone(),
        region: stack.b.region.clone(),
    };
    let mut pairs = vec![];
    for (target_server, policy) in [
        (&stack.b, Policy::Full),
        (&eu_on_a, Policy::Full),
        (&stack.b, Policy::Write),
    ] {
        let (source, target) = stack.bucket_pair(&stack.a, target_server).await?;
        let mut r = rule(
            &unique("rule"),
            stack.a.bucket(&source),
            target_server.bucket(&target),
        );
        r.policy = policy;
        r.notify = Notify::Queue {
            arn: queue_arn.clone(),
        };
        create_rule(&state, &stack.s3_clients(), r).await?;
        pairs.push((source, target, target_server.clone()));
    }
    let log = dir.join("replicate.log");
    let _function = RunningFunction::start_with(
        stack,
        "crr-replicate",
        &queue_url,
        &table,
        &[
            log_env(&log),
            format!("CRR_DLQ_URL={dlq_url}"),
            "CRR_MAX_RECEIVES=1".into(),
            "CRR_MULTIPART_THRESHOLD_MB=5".into(),
            "CRR_SERVER_SIDE_THRESHOLD_MB=5".into(),
            "CRR_PART_SIZE_MB=5".into(),
        ],
    )?;
    let s3a = stack.s3(&stack.a);
    for (source, _, _) in &pairs[..2] {
        put(&s3a, source, "small.txt", 10, true).await?;
        put(&s3a, source, "big.bin", 11 * MIB, false).await?;
        put(&s3a, source, "gone.txt", 3, false).await?;
        s3a.delete_object()
            .bucket(source)
            .key("gone.txt")
            .send()
            .await?;
    }
    // The `write` rule: its target disappears (the put fails to the DLQ), and its delete
    // is suppressed.
    let (source, target, server) = &pairs[2];
    stack
        .s3(server)
        .delete_bucket()
        .bucket(target)
        .send()
        .await?;
    put(&s3a, source, "fails.txt", 5, false).await?;
    put(&s3a, source, "kept.txt", 5, false).await?;
    s3a.delete_object()
        .bucket(source)
        .key("kept.txt")
        .send()
        .await?;
    stack.wait_queue_drained(&stack.a, &queue_url, WAIT).await?;
    for (_, target, server) in &pairs[..2] {
        let s3 = stack.s3(server);
        eventually(WAIT, "the big replica", || async {
            Ok(s3
                .head_object()
                .bucket(target)
                .key("big.bin")
                .send()
                .await
                .ok())
        })
        .await?;
    }
    recorded(&log)
}

/// Every operation `crr-backfill` makes migrating small, multipart and conflicting
/// objects in stream and server-side mode.
async fn backfill_operations(stack: &Stack, dir: &Path) -> Result<BTreeSet<String>> {
    let table = unique("iam");
    let state = stack.state(&table).await?;
    let eu_on_a = S3Server {
        endpoint: stack.a.endpoint.clone(),
        region: stack.b.region.clone(),
    };
    let mut ids = vec![];
    for target_server in [&stack.b, &eu_on_a] {
        let (source, target) = stack.bucket_pair(&stack.a, target_server).await?;
        let s3a = stack.s3(&stack.a);
        put(&s3a, &source, "tagged.txt", 10, true).await?;
        seed(
            stack,
            &stack.a,
            &source,
            vec![
                ("plain.txt".into(), vec![b'p'; 100]),
                ("big.bin".into(), vec![b'b'; 11 * MIB]),
                ("conflict.txt".into(), b"new".to_vec()),
            ],
            3,
        )
        .await?;
        put(&stack.s3(target_server), &target, "conflict.txt", 7, false).await?;
        let mut r = rule(
            &unique("rule"),
            stack.a.bucket(&source),
            target_server.bucket(&target),
        );
        r.historical = true;
        r.notify = Notify::External;
        ids.push(create_rule(&state, &stack.s3_clients(), r).await?.id);
    }
    let log = dir.join("backfill.log");
    // Fanned out as deployed: the coordinator sends segments, a worker fed by the queue
    // (and continuing through it) copies them.
    let fanout = FannedOutBackfill::start(
        stack,
        &table,
        60,
        &[
            log_env(&log),
            "CRR_MULTIPART_THRESHOLD_MB=5".into(),
            "CRR_SERVER_SIDE_THRESHOLD_MB=5".into(),
        ],
        1,
    )
    .await?;
    let started = Instant::now();
    loop {
        let mut done = true;
        for id in &ids {
            done &= state.job(id).await?.map(|j| j.state) == Some(JobState::Completed);
        }
        if done {
            break;
        }
        ensure!(started.elapsed() < WAIT, "backfill did not complete");
        fanout.coordinate().await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    recorded(&log)
}

/// Every operation `crr-status` makes answering with a backlog (CloudWatch asked).
async fn status_operations(stack: &Stack, dir: &Path) -> Result<BTreeSet<String>> {
    let table = unique("iam");
    stack.state(&table).await?;
    let ((queue_url, _), (dlq_url, _)) = stack
        .create_queue_with_dlq(&stack.a, &unique("events"), 2, 5)
        .await?;
    stack
        .sqs(&stack.a)
        .send_message()
        .queue_url(&queue_url)
        .message_body("{}")
        .send()
        .await?;
    let log = dir.join("status.log");
    let function = RunningFunction::start_direct(
        stack,
        "crr-status",
        &table,
        20,
        &[
            log_env(&log),
            format!("CRR_QUEUE_URL={queue_url}"),
            format!("CRR_DLQ_URL={dlq_url}"),
            // moto answers GetMetricStatistics (with no datapoints).
            format!("AWS_ENDPOINT_URL_CLOUDWATCH={}", stack.a.endpoint),
        ],
    )?;
    let request = serde_json::json!({
        "version": "2.0", "rawPath": "/", "headers": {}, "queryStringParameters": {},
        "requestContext": { "http": { "method": "GET", "path": "/" }, "timeEpoch": 0 },
        "isBase64Encoded": false
    });
    let (failed, body) = invoke(function.port, "crr-status", &request.to_string()).await?;
    ensure!(!failed && body.contains("\"statusCode\":200"), "{body}");
    recorded(&log)
}

#[tokio::test]
async fn the_template_grants_every_action_and_variable_the_functions_use() -> Result<()> {
    let stack = Stack::from_env()?;
    let text = std::fs::read_to_string(root().join("infra/template.yaml"))?;
    let template: Value = serde_yaml::from_str(&text).context("parsing infra/template.yaml")?;
    let functions = function_resources(&template)?;
    let dir = std::env::temp_dir().join(unique("crr-iam"));
    std::fs::create_dir_all(&dir)?;

    let (replicate, backfill, status) = tokio::try_join!(
        replicate_operations(&stack, &dir),
        backfill_operations(&stack, &dir),
        status_operations(&stack, &dir),
    )?;
    // Lambda's SQS event source polls with the function's role.
    let event_source = EVENT_SOURCE_ACTIONS;
    let mut missing = vec![];
    for (binary, operations, extra) in [
        ("crr-replicate", &replicate, &event_source[..]),
        ("crr-backfill", &backfill, &event_source[..]),
        ("crr-status", &status, &[][..]),
    ] {
        let function = functions
            .get(binary)
            .with_context(|| format!("no function builds {binary} in the template"))?;
        let mut needed: BTreeMap<&str, String> = extra
            .iter()
            .map(|a| (*a, "the SQS event source".to_string()))
            .collect();
        for op in operations {
            for action in actions_for(op)? {
                needed.entry(action).or_insert_with(|| op.clone());
            }
        }
        println!("{binary}: operations {operations:?}");
        ensure!(
            operations.iter().any(|op| op.contains("DynamoDB:")),
            "{binary}: no operation recorded; is CRR_OPERATION_LOG wired? {operations:?}"
        );
        for (action, why) in &needed {
            if !function.actions.contains(*action) {
                missing.push(format!("{binary} needs {action} (for {why})"));
            }
        }
        let unused: Vec<&String> = function
            .actions
            .iter()
            .filter(|a| !needed.contains_key(a.as_str()))
            .collect();
        println!("{binary}: granted but not seen used: {unused:?}");
    }
    assert!(
        missing.is_empty(),
        "infra/template.yaml lacks actions the functions use:\n  {}",
        missing.join("\n  ")
    );
    // What the template says of the functions holds.
    assert!(
        !replicate.iter().any(|op| op.ends_with(":ListObjectsV2")),
        "{replicate:?}"
    );
    assert!(
        !backfill.iter().any(|op| op.ends_with(":DeleteObject")),
        "{backfill:?}"
    );
    assert!(
        replicate.contains("SQS:SendMessage"),
        "the DLQ path ran: {replicate:?}"
    );

    // Environment: what a deployment needs is set; nothing set is unknown to the code.
    let code = ["shared/src/config.rs", "shared/src/adapters/aws_clients.rs"]
        .iter()
        .map(|f| std::fs::read_to_string(root().join(f)))
        .collect::<std::io::Result<Vec<_>>>()?
        .join("\n");
    for (binary, required) in DEPLOYMENT_ENV {
        let function = functions.get(*binary).context("function")?;
        for name in *required {
            assert!(
                function.env.contains(*name),
                "{binary} needs {name} in the template"
            );
        }
        for name in function.env.iter().filter(|n| n.starts_with("CRR_")) {
            assert!(
                code.contains(&format!("\"{name}\"")),
                "the template sets {name} for {binary}, which no code reads"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
