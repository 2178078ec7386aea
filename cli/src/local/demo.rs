//! `crr local demo`: the main job on the local stack, end to end. Two buckets in two
//! regions (two moto servers), a rule, the replicate function running as a real Lambda
//! binary fed from SQS; uploads and a delete, then what reached the target.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_sqs::types::QueueAttributeName;
use crr_shared::rule::{BucketRef, Notify, Rule};
use crr_shared::rule_admin;
use crr_shared::s3::S3Clients;
use crr_shared::state::RuleStore;

use crate::AwsArgs;

const SOURCE: &str = "crr-demo-source";
const TARGET: &str = "crr-demo-target";
const QUEUE: &str = "crr-demo-events";
const RULE: &str = "demo";

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
    create_bucket(&s3a, SOURCE, &a_region).await?;
    create_bucket(&s3b, TARGET, &b_region).await?;

    let sqs = aws_sdk_sqs::Client::from_conf(
        aws_sdk_sqs::config::Builder::from(&sdk)
            .endpoint_url(&a_url)
            .build(),
    );
    let queue_url = sqs
        .create_queue()
        .queue_name(QUEUE)
        .attributes(QueueAttributeName::VisibilityTimeout, "10")
        .send()
        .await
        .context("creating the event queue")?
        .queue_url
        .context("queue without URL")?;
    let queue_arn = format!("arn:aws:sqs:{a_region}:123456789012:{QUEUE}");

    if state.get_rule(RULE).await?.is_some() {
        rule_admin::delete_rule(&state, &clients, RULE).await?;
    }
    let mut rule = Rule::new(RULE, source.clone(), target.clone());
    rule.prefixes = vec!["docs/".into(), "images/".into()];
    rule.notify = Notify::Queue { arn: queue_arn };
    let rule = rule_admin::create_rule(&state, &clients, rule).await?;
    println!(
        "2. rule '{}': prefixes {:?}, policy {:?}, copy mode {:?} (two endpoints: stream)",
        rule.id,
        rule.prefixes,
        rule.policy,
        rule.resolved_copy_mode()
    );

    let exe = std::env::current_exe()?;
    let replicate = exe.with_file_name("crr-replicate");
    if !replicate.is_file() {
        bail!(
            "{} is missing: build it with `cargo build --bins`",
            replicate.display()
        );
    }
    let mut function = tokio::process::Command::new(&exe)
        .args([
            "--table",
            &aws.table,
            "local",
            "run-function",
            "--name",
            "crr-replicate",
        ])
        .arg("--binary")
        .arg(&replicate)
        .args(["--queue-url", &queue_url])
        .args(["--env", &format!("CRR_TABLE={}", aws.table)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting the replicate function")?;
    println!("3. replicate function running as a Lambda binary, fed from SQS queue {QUEUE}");

    let uploads: [(&str, &str); 5] = [
        ("docs/report 2026.txt", "quarterly numbers"),
        ("docs/a+b=c.txt", "keys with '+', '=' and spaces survive"),
        (
            "images/café.svg",
            "<svg xmlns='http://www.w3.org/2000/svg'/>",
        ),
        ("images/empty.png", ""),
        (
            "tmp/scratch.txt",
            "outside the rule's prefixes: stays behind",
        ),
    ];
    for (key, body) in uploads {
        s3a.put_object()
            .bucket(SOURCE)
            .key(key)
            .metadata("uploaded-by", "crr-demo")
            .body(ByteStream::from(body.as_bytes().to_vec()))
            .send()
            .await?;
    }
    println!("4. uploaded {} objects to the source", uploads.len());

    let expected: BTreeMap<&str, &str> = uploads
        .iter()
        .copied()
        .filter(|(k, _)| !k.starts_with("tmp/"))
        .collect();
    wait_for(Duration::from_secs(60), "the replicas", || async {
        Ok(list(&s3b, TARGET).await?.len() == expected.len())
    })
    .await?;
    s3a.delete_object()
        .bucket(SOURCE)
        .key("docs/a+b=c.txt")
        .send()
        .await?;
    println!("5. deleted docs/a+b=c.txt from the source (policy full: the replica goes too)");
    wait_for(Duration::from_secs(60), "the delete", || async {
        Ok(list(&s3b, TARGET).await?.len() == expected.len() - 1)
    })
    .await?;

    println!(
        "\n{:<24} {:>6}  {:<34} {:<34}",
        "key", "bytes", "source etag", "target etag"
    );
    let src = list(&s3a, SOURCE).await?;
    let dst = list(&s3b, TARGET).await?;
    for (key, (size, etag)) in &src {
        let replica = dst
            .get(key)
            .map(|(_, e)| e.as_str())
            .unwrap_or("(not replicated)");
        println!("{key:<24} {size:>6}  {etag:<34} {replica:<34}");
    }
    for key in dst.keys().filter(|k| !src.contains_key(*k)) {
        println!("{key:<24} {:>6}  {:<34} (extra in target)", "-", "-");
    }
    let _ = function.kill().await;
    println!(
        "\nReplication works. The stack keeps running: stop it with `scripts/local-stack down`."
    );
    Ok(())
}

async fn create_bucket(s3: &aws_sdk_s3::Client, bucket: &str, region: &str) -> Result<()> {
    let mut req = s3.create_bucket().bucket(bucket);
    if region != "us-east-1" {
        req = req.create_bucket_configuration(
            aws_sdk_s3::types::CreateBucketConfiguration::builder()
                .location_constraint(aws_sdk_s3::types::BucketLocationConstraint::from(region))
                .build(),
        );
    }
    match req.send().await {
        Ok(_) => {}
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_bucket_already_owned_by_you()) =>
        {
            // A previous demo run: start from an empty bucket.
            for key in list(s3, bucket).await?.keys() {
                s3.delete_object().bucket(bucket).key(key).send().await?;
            }
        }
        Err(e) => return Err(e).with_context(|| format!("creating bucket {bucket}")),
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
