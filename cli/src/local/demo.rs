//! `crr local demo`: the main job on the local stack, end to end. Two buckets in two
//! regions (two moto servers); objects already in the source; a rule with historical sync;
//! the replicate function (fed from SQS) and the backfill function (on a schedule) running
//! as real Lambda binaries; uploads, overwrites and deletes while the backfill runs; then
//! `crr status` (historical 100%, real time caught up) and `crr verify` (no drift).

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_sqs::types::QueueAttributeName;
use crr_shared::adapters::s3::S3Clients;
use crr_shared::rule::{BucketRef, Notify, Rule};
use crr_shared::rule_admin;
use crr_shared::state::RuleStore;
use crr_shared::status::{EventQueue, SqsEventQueue, StatusService};
use futures::StreamExt;

use crate::AwsArgs;

const SOURCE: &str = "crr-demo-source";
const TARGET: &str = "crr-demo-target";
const QUEUE: &str = "crr-demo-events";
const RULE: &str = "demo";
/// Objects in the source before the rule exists (the historical part).
const HISTORICAL: usize = 400;
fn env(name: &str) -> Result<String> {
    std::env::var(name).with_context(|| {
        format!("{name} is not set: run scripts/demo, or source `scripts/local-stack env`")
    })
}

fn side(endpoint: &str, region: &str, bucket: &str) -> BucketRef {
    BucketRef {
        bucket: bucket.into(),
        region: region.into(),
        endpoint_url: Some(endpoint.into()),
        path_style: true,
    }
}

pub async fn run(aws: &AwsArgs) -> Result<()> {
    let (a_url, a_region) = (env("CRR_S3_A_ENDPOINT")?, env("CRR_S3_A_REGION")?);
    let (b_url, b_region) = (env("CRR_S3_B_ENDPOINT")?, env("CRR_S3_B_REGION")?);
    let sdk = aws.sdk_config().await;
    let state = aws.state(&sdk).await;
    state.ensure_table().await?;
    let clients = S3Clients::new(sdk.clone());
    let source = side(&a_url, &a_region, SOURCE);
    let target = side(&b_url, &b_region, TARGET);
    let s3a = clients.client(&source);
    let s3b = clients.client(&target);

    println!(
        "1. buckets: s3://{SOURCE} in {a_region} ({a_url}), s3://{TARGET} in {b_region} ({b_url})"
    );
    if state.get_rule(RULE).await?.is_some() {
        rule_admin::delete_rule(&state, &clients, RULE).await?;
    }
    create_bucket(&s3a, SOURCE, &a_region).await?;
    create_bucket(&s3b, TARGET, &b_region).await?;
    let sqs = aws_sdk_sqs::Client::from_conf(
        aws_sdk_sqs::config::Builder::from(&sdk)
            .endpoint_url(&a_url)
            .build(),
    );
    let (queue_url, dlq_url) = create_queues(&sqs, &a_region).await?;

    // The history: objects written before the rule exists (no events for them).
    let seeded: Vec<(String, Vec<u8>)> = (0..HISTORICAL)
        .map(|i| {
            let dir = if i % 2 == 0 { "docs" } else { "images" };
            let size = 1024 + (i * 997) % (48 * 1024);
            (format!("{dir}/old-{i:04}.bin"), vec![(i % 251) as u8; size])
        })
        .chain((0..20).map(|i| (format!("tmp/scratch-{i}.txt"), b"outside".to_vec())))
        .collect();
    let bytes: usize = seeded.iter().map(|(_, b)| b.len()).sum();
    put_all(&s3a, &seeded).await?;
    println!(
        "2. seeded the source with {} objects ({} KiB) before any rule: {HISTORICAL} under docs/ and images/, 20 under tmp/",
        seeded.len(),
        bytes / 1024
    );

    let mut rule = Rule::new(RULE, source.clone(), target.clone());
    rule.prefixes = vec!["docs/".into(), "images/".into()];
    rule.historical = true;
    rule.notify = Notify::Queue {
        arn: format!("arn:aws:sqs:{a_region}:123456789012:{QUEUE}"),
    };
    let rule = rule_admin::create_rule(&state, &clients, rule).await?;
    println!(
        "3. rule '{}': prefixes {:?}, policy {}, historical sync on, copy mode {:?} (two endpoints: stream)",
        rule.id,
        rule.prefixes,
        serde_json::to_value(rule.policy)?,
        rule.resolved_copy_mode()
    );

    let exe = std::env::current_exe()?;
    let allowed_endpoints = format!("{a_url},{b_url}");
    let common = [
        format!("CRR_TABLE={}", aws.table),
        format!("CRR_DLQ_URL={dlq_url}"),
        format!("AWS_ENDPOINT_URL_SQS={a_url}"),
        // The demo's rule names the two local servers; crr refuses other endpoints.
        format!("CRR_ALLOWED_ENDPOINTS={allowed_endpoints}"),
    ];
    let _replicate = run_function(
        &exe,
        aws,
        "crr-replicate",
        &common,
        &["--queue-url", &queue_url],
    )?;
    // Small pages and short invocations, so the backfill takes several scheduled runs.
    let backfill_env: Vec<String> = common
        .iter()
        .cloned()
        .chain(
            [
                "CRR_BACKFILL_PAGE_SIZE=20",
                "CRR_BACKFILL_SEGMENT_OBJECTS=100",
                "CRR_BACKFILL_WORKERS=2",
                "CRR_BACKFILL_COPY_CONCURRENCY=4",
                "CRR_BACKFILL_MARGIN_SECS=1",
            ]
            .map(String::from),
        )
        .collect();
    let _backfill = run_function(
        &exe,
        aws,
        "crr-backfill",
        &backfill_env,
        &["--schedule-secs", "1", "--timeout-secs", "5"],
    )?;
    println!(
        "4. replicate function fed from SQS queue {QUEUE}; backfill function invoked every second (its schedule)"
    );

    // Live changes while the backfill runs: they take the real-time path.
    let uploads: Vec<(String, Vec<u8>)> = [
        "docs/report 2026.txt",
        "docs/a+b=c.txt",
        "docs/100%.txt",
        "images/café.svg",
        "images/empty.png",
        "tmp/not-replicated.txt",
    ]
    .iter()
    .enumerate()
    .map(|(i, k)| (k.to_string(), "x".repeat(i * 100).into_bytes()))
    .chain((0..20).map(|i| {
        (
            format!("images/old-{:04}.bin", i * 2 + 1),
            b"overwritten while the backfill runs".to_vec(),
        )
    }))
    .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    put_all(&s3a, &uploads).await?;
    let deleted: Vec<String> = (0..10)
        .map(|i| format!("docs/old-{:04}.bin", i * 40))
        .collect();
    for key in &deleted {
        s3a.delete_object().bucket(SOURCE).key(key).send().await?;
    }
    println!(
        "5. while the backfill runs: {} uploads (6 new, 20 overwrites of old objects) and {} deletes (policy full: the replicas go too)\n",
        uploads.len(),
        deleted.len()
    );
    let cli = Cli {
        exe: &exe,
        aws,
        allowed_endpoints: &allowed_endpoints,
        queue_url: &queue_url,
        dlq_url: &dlq_url,
    };
    let status = StatusService::new(
        Arc::new(state.clone()),
        Arc::new(state.clone()),
        Arc::new(state.clone()),
        Some(Arc::new(SqsEventQueue::new(
            sqs.clone(),
            &queue_url,
            Some(dlq_url.clone()),
            None,
        )) as Arc<dyn EventQueue>),
        Duration::ZERO,
    );
    // Shown once the migration is under way, to see its progress bar move.
    wait_for(Duration::from_secs(60), "the backfill to start", || async {
        let report = status.report(Some(RULE)).await?;
        Ok(report.rules[0].historical.objects_done > 0)
    })
    .await?;
    cli.show(&["status", RULE])?;
    wait_for(
        Duration::from_secs(300),
        "the backfill and the queue",
        || async {
            let report = status.report(Some(RULE)).await?;
            let r = &report.rules[0];
            Ok(r.historical.state == "completed" && r.realtime.state == "caught_up")
        },
    )
    .await?;

    println!("\n6. the backfill is complete and every event is applied:\n");
    cli.show(&["status", RULE])?;
    println!();
    if !cli.show(&["verify", RULE])? {
        bail!("crr verify found drift (see above)");
    }
    println!(
        "\nReplication works. The stack keeps running: look around with\n  eval \"$(scripts/local-stack env)\"; export CRR_QUEUE_URL={queue_url} CRR_DLQ_URL={dlq_url}\n  {} --table {} status --watch\nand stop it with `scripts/local-stack down`.",
        exe.display(),
        aws.table
    );
    Ok(())
}

/// `crr` itself, run as a user would, its output shown.
struct Cli<'a> {
    exe: &'a std::path::Path,
    aws: &'a AwsArgs,
    allowed_endpoints: &'a str,
    queue_url: &'a str,
    dlq_url: &'a str,
}

impl Cli<'_> {
    /// Runs `crr ARGS`, prints the command and its output; `Ok(false)` on exit code 1.
    fn show(&self, args: &[&str]) -> Result<bool> {
        println!("$ crr {}", args.join(" "));
        let status = std::process::Command::new(self.exe)
            .args(["--table", &self.aws.table])
            .args(args)
            .env("CRR_ALLOWED_ENDPOINTS", self.allowed_endpoints)
            .env("CRR_QUEUE_URL", self.queue_url)
            .env("CRR_DLQ_URL", self.dlq_url)
            // moto's queue counts are exact and its events immediate: nothing to settle.
            .env("CRR_STATUS_SETTLE_SECS", "0")
            .status()
            .with_context(|| format!("running crr {}", args.join(" ")))?;
        match status.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => bail!("crr {} failed ({status})", args.join(" ")),
        }
    }
}

/// `crr local run-function` for `name`, in the background until dropped.
fn run_function(
    exe: &std::path::Path,
    aws: &AwsArgs,
    name: &str,
    envs: &[String],
    extra: &[&str],
) -> Result<tokio::process::Child> {
    let binary = exe.with_file_name(name);
    if !binary.is_file() {
        bail!(
            "{} is missing: build it with `cargo build --bins`",
            binary.display()
        );
    }
    tokio::process::Command::new(exe)
        .args([
            "--table",
            &aws.table,
            "local",
            "run-function",
            "--name",
            name,
        ])
        .arg("--binary")
        .arg(&binary)
        .args(envs.iter().flat_map(|e| ["--env", e.as_str()]))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {name}"))
}

/// The event queue and its DLQ (redrive after 5 receives); returns both URLs.
async fn create_queues(sqs: &aws_sdk_sqs::Client, region: &str) -> Result<(String, String)> {
    let create = |name: String| async move {
        sqs.create_queue()
            .queue_name(&name)
            .attributes(QueueAttributeName::VisibilityTimeout, "10")
            .send()
            .await
            .with_context(|| format!("creating queue {name}"))?
            .queue_url
            .context("queue without URL")
    };
    let dlq_url = create(format!("{QUEUE}-dlq")).await?;
    let queue_url = create(QUEUE.to_string()).await?;
    let policy = serde_json::json!({
        "deadLetterTargetArn": format!("arn:aws:sqs:{region}:123456789012:{QUEUE}-dlq"),
        "maxReceiveCount": 5,
    });
    sqs.set_queue_attributes()
        .queue_url(&queue_url)
        .attributes(QueueAttributeName::RedrivePolicy, policy.to_string())
        .send()
        .await
        .context("setting the queue's redrive policy")?;
    // A previous demo run may have left messages behind.
    for url in [&queue_url, &dlq_url] {
        let _ = sqs.purge_queue().queue_url(url).send().await;
    }
    Ok((queue_url, dlq_url))
}

async fn put_all(s3: &aws_sdk_s3::Client, objects: &[(String, Vec<u8>)]) -> Result<()> {
    let mut puts = futures::stream::iter(objects.iter().map(|(key, body)| {
        s3.put_object()
            .bucket(SOURCE)
            .key(key)
            .metadata("uploaded-by", "crr-demo")
            .body(ByteStream::from(body.clone()))
            .send()
    }))
    .buffer_unordered(16);
    while let Some(done) = puts.next().await {
        done.context("uploading to the source")?;
    }
    Ok(())
}

/// Creates the bucket, or empties it if a previous demo run left it behind.
async fn create_bucket(s3: &aws_sdk_s3::Client, bucket: &str, region: &str) -> Result<()> {
    if !crr_shared::adapters::s3::create_bucket(s3, bucket, region).await? {
        for key in list(s3, bucket).await?.keys() {
            s3.delete_object().bucket(bucket).key(key).send().await?;
        }
    }
    Ok(())
}

async fn list(s3: &aws_sdk_s3::Client, bucket: &str) -> Result<BTreeMap<String, (i64, String)>> {
    let out = s3.list_objects_v2().bucket(bucket).send().await?;
    Ok(out
        .contents()
        .iter()
        .filter_map(|o| {
            let key = o.key()?.to_string();
            Some((
                key,
                (
                    o.size().unwrap_or(0),
                    o.e_tag().unwrap_or("").trim_matches('"').to_string(),
                ),
            ))
        })
        .collect())
}

async fn wait_for<F, Fut>(timeout: Duration, what: &str, mut done: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let start = Instant::now();
    while !done().await? {
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}
