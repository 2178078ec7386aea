//! The deployed stack, end to end: `scripts/deploy-local` deploys infra/template.yaml
//! (expanded offline, adapted only where moto cannot take it) into a moto server as a
//! CloudFormation stack; these tests read what the stack created through the ordinary
//! APIs (CloudFormation, Lambda, IAM, SQS, EventBridge, DynamoDB), never the
//! template's text, and then replicate through it with the real function binaries.
//!
//! Where the stack lives: a moto server of the test's own (region us-east-1) holds the
//! stack and the source bucket. It has to be one server: moto delivers a bucket's
//! EventBridge notifications only to its own event bus, so the stack's rule, queue and the
//! source bucket must share it. The target bucket is on the local stack's moto B
//! (eu-west-1), a separate server, so the copies go in stream mode.
//!
//! Which DynamoDB: the functions use the table the stack created, in the same moto, not
//! DynamoDB Local. That keeps the test honest about what the stack gives them (the table's
//! name, key schema and the retention of its items once the stack is deleted) at the cost
//! of moto's DynamoDB instead of AWS's own; every other suite runs on DynamoDB Local.
//!
//! What moto does not do, and how the tests stand in for it:
//! - it runs Lambda functions only in Docker (absent here): once their configuration is
//!   read, the event source mappings are disabled, and the real `crr-replicate`,
//!   `crr-backfill` and `crr-status` binaries run behind the Runtime API emulator (`crr
//!   local run-function`) with exactly the environment, timeout and memory size the stack
//!   gave each (read from Lambda's GetFunctionConfiguration), endpoints aside; they are fed
//!   from the stack's queues with the mappings' batch sizes, and the backfill is invoked
//!   with the schedule target's input;
//! - it skips `AWS::SQS::QueuePolicy`, `AWS::CloudWatch::Alarm` and `AWS::Lambda::Url`
//!   (reported created, nothing made), and does not keep Architectures, LoggingConfig, TTL
//!   or point-in-time recovery: those are checked on the template as deployed (the
//!   expansion `scripts/deploy-local --expanded-out` wrote), and the test says so;
//! - it checks no IAM: the roles' policies are read back from IAM and evaluated here
//!   against the operations the binaries really made (recorded with `CRR_OPERATION_LOG`,
//!   mapped to actions as tests/iam.rs maps them) and the resources the stack named.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use aws_sdk_lambda::types::EventSourceMappingConfiguration;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_sqs::types::QueueAttributeName;
use crr_shared::backfill::{BackfillStore, JobState};
use crr_shared::config::DEPLOYMENT_ENV;
use crr_shared::dynamo::DynamoStore;
use crr_shared::state::RuleStore;
use crr_tests::deployed::{EVENT_SOURCE_ACTIONS, Policy, actions_for};
use crr_tests::{
    DeployedFunction, Feed, OwnMoto, RunningFunction, S3Server, Stack, bin, bin_dir, eventually,
    invoke, list_all, read_object, seed, unique,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(120);
const REGION: &str = "us-east-1";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// A stack `scripts/deploy-local` created in a moto server of the test's own.
struct Deployment {
    moto: OwnMoto,
    stack_name: String,
    outputs: BTreeMap<String, String>,
    /// The template as deployed (SAM expanded, adapted for moto).
    expanded: Value,
    sources: Vec<String>,
    targets: Vec<String>,
    params: BTreeMap<String, String>,
    cfn: aws_sdk_cloudformation::Client,
    lambda: aws_sdk_lambda::Client,
    iam: aws_sdk_iam::Client,
    sqs: aws_sdk_sqs::Client,
    events: aws_sdk_eventbridge::Client,
    dynamodb: aws_sdk_dynamodb::Client,
}

impl Deployment {
    /// Deploys the template with `sources`, `targets` and `params` into a new moto server.
    async fn create(
        stack: &Stack,
        moto: OwnMoto,
        sources: &[&str],
        targets: &[&str],
        params: &[(&str, &str)],
    ) -> Result<Self> {
        let stack_name = unique("crr");
        let expanded_path = std::env::temp_dir().join(format!("{stack_name}-expanded.json"));
        let mut cmd = tokio::process::Command::new(root().join("scripts/deploy-local"));
        cmd.args(["--endpoint", &moto.server.endpoint, "--region", REGION])
            .args(["--stack-name", &stack_name, "--no-build"])
            .args(["--source-buckets", &sources.join(",")])
            .args(["--target-buckets", &targets.join(",")])
            .arg("--expanded-out")
            .arg(&expanded_path)
            .env("CRR_BIN_DIR", bin_dir());
        for (k, v) in params {
            cmd.args(["--param", &format!("{k}={v}")]);
        }
        let started = Instant::now();
        let out = cmd.output().await.context("running scripts/deploy-local")?;
        ensure!(
            out.status.success(),
            "scripts/deploy-local failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!(
            "deployed {stack_name} in {:?}:\n{}",
            started.elapsed(),
            String::from_utf8_lossy(&out.stderr)
        );
        let outputs: BTreeMap<String, String> = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("outputs: {}", String::from_utf8_lossy(&out.stdout)))?;
        let expanded: Value = serde_json::from_str(&std::fs::read_to_string(&expanded_path)?)?;
        let _ = std::fs::remove_file(&expanded_path);
        let sdk = stack.sdk(REGION);
        let endpoint = moto.server.endpoint.clone();
        macro_rules! client {
            ($krate:ident) => {
                $krate::Client::from_conf(
                    $krate::config::Builder::from(&sdk)
                        .endpoint_url(&endpoint)
                        .build(),
                )
            };
        }
        let mut all_params: BTreeMap<String, String> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        all_params.insert("SourceBuckets".into(), sources.join(","));
        all_params.insert("TargetBuckets".into(), targets.join(","));
        all_params
            .entry("AllowedEndpoints".into())
            .or_insert_with(|| "http://127.0.0.1:*".into());
        // The rest take the template's defaults.
        for (name, p) in expanded
            .get("Parameters")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            if let Some(default) = p.get("Default") {
                let value = match default {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                all_params.entry(name.clone()).or_insert(value);
            }
        }
        Ok(Self {
            stack_name,
            outputs,
            expanded,
            sources: sources.iter().map(|s| s.to_string()).collect(),
            targets: targets.iter().map(|s| s.to_string()).collect(),
            params: all_params,
            cfn: client!(aws_sdk_cloudformation),
            lambda: client!(aws_sdk_lambda),
            iam: client!(aws_sdk_iam),
            sqs: client!(aws_sdk_sqs),
            events: client!(aws_sdk_eventbridge),
            dynamodb: client!(aws_sdk_dynamodb),
            moto,
        })
    }

    fn output(&self, name: &str) -> Result<&str> {
        self.outputs
            .get(name)
            .map(String::as_str)
            .with_context(|| format!("the stack has no output {name}: {:?}", self.outputs))
    }

    fn param(&self, name: &str) -> Result<&str> {
        self.params
            .get(name)
            .map(String::as_str)
            .with_context(|| format!("no parameter {name}"))
    }

    /// A resource of the template as deployed.
    fn resource(&self, logical_id: &str) -> Result<&Value> {
        self.expanded
            .get("Resources")
            .and_then(|r| r.get(logical_id))
            .with_context(|| format!("the deployed template has no {logical_id}"))
    }

    fn resources_of_type(&self, kind: &str) -> Vec<(&String, &Value)> {
        self.expanded
            .get("Resources")
            .and_then(Value::as_object)
            .map(|r| {
                r.iter()
                    .filter(|(_, v)| v.get("Type").and_then(Value::as_str) == Some(kind))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Each function output (`ReplicateFunctionName`, ...) with the binary its code is
    /// built from (the function's `BuildProperties.Binary`, kept through the expansion).
    fn function_outputs(&self) -> Result<Vec<(String, String)>> {
        let mut out = vec![];
        for (name, output) in self
            .expanded
            .get("Outputs")
            .and_then(Value::as_object)
            .context("no Outputs")?
        {
            let Some(target) = output
                .get("Value")
                .and_then(|v| v.get("Ref"))
                .and_then(Value::as_str)
            else {
                continue;
            };
            let resource = self.resource(target)?;
            if resource.get("Type").and_then(Value::as_str) != Some("AWS::Lambda::Function") {
                continue;
            }
            let binary = resource
                .pointer("/Metadata/BuildProperties/Binary")
                .and_then(Value::as_str)
                .with_context(|| format!("{target}: no Metadata.BuildProperties.Binary"))?;
            out.push((name.clone(), binary.to_string()));
        }
        ensure!(out.len() == 3, "three function outputs expected: {out:?}");
        Ok(out)
    }

    /// The function as deployed: GetFunctionConfiguration.
    async fn function(&self, output: &str, binary: &str) -> Result<DeployedFunction> {
        let name = self.output(output)?;
        let config = self
            .lambda
            .get_function_configuration()
            .function_name(name)
            .send()
            .await
            .with_context(|| format!("output {output}: function {name}"))?;
        Ok(DeployedFunction {
            name: config.function_name().context("no name")?.to_string(),
            binary: binary.to_string(),
            env: config
                .environment()
                .and_then(|e| e.variables())
                .map(|v| v.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default(),
            timeout_secs: u64::try_from(config.timeout().unwrap_or(3))?,
            memory_mb: config.memory_size().unwrap_or(128),
        })
    }

    async fn function_arn(&self, name: &str) -> Result<String> {
        Ok(self
            .lambda
            .get_function_configuration()
            .function_name(name)
            .send()
            .await?
            .function_arn()
            .context("no arn")?
            .to_string())
    }

    /// The one event source mapping of `function`.
    async fn mapping(&self, function: &str) -> Result<EventSourceMappingConfiguration> {
        let out = self
            .lambda
            .list_event_source_mappings()
            .function_name(function)
            .send()
            .await?;
        let mappings = out.event_source_mappings();
        ensure!(
            mappings.len() == 1,
            "{function}: one event source mapping expected, found {mappings:?}"
        );
        Ok(mappings[0].clone())
    }

    async fn queue_attributes(&self, url: &str) -> Result<BTreeMap<String, String>> {
        let out = self
            .sqs
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::All)
            .send()
            .await
            .with_context(|| format!("queue {url}"))?;
        Ok(out
            .attributes()
            .map(|a| {
                a.iter()
                    .map(|(k, v)| (k.as_str().to_string(), v.clone()))
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn queue_arn(&self, url: &str) -> Result<String> {
        self.queue_attributes(url)
            .await?
            .remove("QueueArn")
            .with_context(|| format!("{url}: no QueueArn"))
    }

    /// The inline policies of the role the function runs as, read back from IAM.
    async fn role_policy(&self, function: &str) -> Result<Policy> {
        let config = self
            .lambda
            .get_function_configuration()
            .function_name(function)
            .send()
            .await?;
        let role_arn = config.role().context("no role")?;
        let role = role_arn.rsplit('/').next().unwrap_or(role_arn);
        let trust = self
            .iam
            .get_role()
            .role_name(role)
            .send()
            .await
            .with_context(|| format!("{function}: role {role_arn}"))?;
        let trust = trust
            .role()
            .and_then(|r| r.assume_role_policy_document())
            .unwrap_or_default();
        ensure!(
            trust.contains("lambda.amazonaws.com"),
            "{function}: role {role} is not assumable by Lambda: {trust}"
        );
        let mut policy = Policy::default();
        let names = self.iam.list_role_policies().role_name(role).send().await?;
        for name in names.policy_names() {
            let doc = self
                .iam
                .get_role_policy()
                .role_name(role)
                .policy_name(name)
                .send()
                .await?;
            policy
                .statements
                .extend(Policy::parse(doc.policy_document())?.statements);
        }
        ensure!(
            !policy.statements.is_empty(),
            "{function}: role {role} has no policy"
        );
        Ok(policy)
    }

    async fn table_arn(&self) -> Result<String> {
        let table = self.output("StateTableName")?;
        let out = self
            .dynamodb
            .describe_table()
            .table_name(table)
            .send()
            .await
            .with_context(|| format!("output StateTableName: table {table}"))?;
        Ok(out
            .table()
            .and_then(|t| t.table_arn())
            .context("no table arn")?
            .to_string())
    }

    /// The `crr` CLI against the stack's table (in the stack's moto).
    fn crr(&self, args: &[&str]) -> Result<std::process::Output> {
        std::process::Command::new(bin("crr")?)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("AWS_REGION", REGION)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_ENDPOINT_URL_DYNAMODB", &self.moto.server.endpoint)
            .env("AWS_ENDPOINT_URL_SQS", &self.moto.server.endpoint)
            .args(args)
            .output()
            .context("running crr")
    }

    fn crr_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.crr(args)?;
        ensure!(
            out.status.success(),
            "crr {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    async fn delete(&self) -> Result<()> {
        self.cfn
            .delete_stack()
            .stack_name(&self.stack_name)
            .send()
            .await?;
        eventually(WAIT, "the stack deleted", || async {
            match self
                .cfn
                .describe_stacks()
                .stack_name(&self.stack_name)
                .send()
                .await
            {
                Ok(out) => Ok(out
                    .stacks()
                    .first()
                    .and_then(|s| s.stack_status())
                    .filter(|s| s.as_str() == "DELETE_COMPLETE")
                    .map(|_| ())),
                // A deleted stack is no longer found by its name.
                Err(e) if format!("{e:?}").contains("does not exist") => Ok(Some(())),
                Err(e) => Err(e.into()),
            }
        })
        .await
    }
}

fn json(text: &str) -> Result<Value> {
    serde_json::from_str(text).with_context(|| format!("not JSON: {text}"))
}

/// The wiring of a deployed stack, read through the services' APIs.
async fn check_wiring(d: &Deployment) -> Result<()> {
    // The stack is up, and its outputs are the ones the script printed.
    let described = d
        .cfn
        .describe_stacks()
        .stack_name(&d.stack_name)
        .send()
        .await?;
    let s = described.stacks().first().context("no stack")?;
    assert_eq!(
        s.stack_status().map(|s| s.as_str()),
        Some("CREATE_COMPLETE")
    );
    let described_outputs: BTreeMap<String, String> = s
        .outputs()
        .iter()
        .filter_map(|o| Some((o.output_key()?.to_string(), o.output_value()?.to_string())))
        .collect();
    assert_eq!(described_outputs, d.outputs);

    // Every output resolves to an existing resource.
    let table = d.output("StateTableName")?;
    let table_arn = d.table_arn().await?;
    let described_table = d
        .dynamodb
        .describe_table()
        .table_name(table)
        .send()
        .await?;
    let t = described_table.table().context("no table")?;
    let keys: Vec<(String, String)> = t
        .key_schema()
        .iter()
        .map(|k| {
            (
                k.attribute_name().to_string(),
                k.key_type().as_str().to_string(),
            )
        })
        .collect();
    assert_eq!(
        keys,
        [("pk".into(), "HASH".into()), ("sk".into(), "RANGE".into())]
    );
    assert_eq!(t.deletion_protection_enabled(), Some(true));
    let queue_url = d.output("EventQueueUrl")?;
    let dlq_url = d.output("DeadLetterQueueUrl")?;
    let segment_url = d.output("SegmentQueueUrl")?;
    let queue = d.queue_attributes(queue_url).await?;
    assert_eq!(
        queue.get("QueueArn").map(String::as_str),
        Some(d.output("EventQueueArn")?),
        "EventQueueArn is the event queue's"
    );
    let dlq_arn = d.queue_arn(dlq_url).await?;
    let segment = d.queue_attributes(segment_url).await?;
    // The dashboard: the Rust SDK's CloudWatch speaks CBOR (rpcv2), which moto does not
    // answer, so it is found through CloudFormation's record of what it created.
    let resources = d
        .cfn
        .list_stack_resources()
        .stack_name(&d.stack_name)
        .send()
        .await
        .context("ListStackResources")?;
    let dashboard = resources
        .stack_resource_summaries()
        .iter()
        .find(|r| r.logical_resource_id() == Some("Dashboard"))
        .context("no Dashboard resource")?;
    assert_eq!(
        dashboard.physical_resource_id(),
        Some(d.output("DashboardName")?)
    );
    assert_eq!(
        dashboard.resource_status().map(|s| s.as_str()),
        Some("CREATE_COMPLETE")
    );
    // RecordDeploymentCommand names this table and these parameters (the e2e runs it).
    let record = d.output("RecordDeploymentCommand")?;
    for expected in [
        format!("--table {table} "),
        format!("--region {REGION} "),
        format!("--source-buckets \"{}\"", d.param("SourceBuckets")?),
        format!("--target-buckets \"{}\"", d.param("TargetBuckets")?),
        format!("--allowed-endpoints \"{}\"", d.param("AllowedEndpoints")?),
    ] {
        assert!(record.contains(&expected), "{expected} in {record}");
    }

    // The queues: redrive to their DLQs, visibility at least 6x the consumer's timeout.
    let functions = d.function_outputs()?;
    let mut deployed = BTreeMap::new();
    for (output, binary) in &functions {
        deployed.insert(binary.clone(), d.function(output, binary).await?);
    }
    let replicate = &deployed["crr-replicate"];
    let backfill = &deployed["crr-backfill"];
    let status = &deployed["crr-status"];
    let redrive = json(queue.get("RedrivePolicy").context("event queue: no redrive")?)?;
    assert_eq!(redrive["deadLetterTargetArn"], Value::from(dlq_arn.clone()));
    assert_eq!(redrive["maxReceiveCount"].to_string().trim_matches('"'), "5");
    let visibility = |q: &BTreeMap<String, String>| -> u64 {
        q.get("VisibilityTimeout")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    assert!(visibility(&queue) >= 6 * replicate.timeout_secs, "{queue:?}");
    assert!(visibility(&segment) >= 6 * backfill.timeout_secs, "{segment:?}");
    let segment_redrive =
        json(segment.get("RedrivePolicy").context("segment queue: no redrive")?)?;
    let segment_dlq_arn = segment_redrive["deadLetterTargetArn"]
        .as_str()
        .context("segment queue's DLQ")?;
    let segment_dlq = d
        .sqs
        .get_queue_url()
        .queue_name(segment_dlq_arn.rsplit(':').next().unwrap_or_default())
        .send()
        .await
        .context("the segment queue's DLQ exists")?;
    assert_ne!(segment_dlq.queue_url(), Some(dlq_url));
    for (arn, q) in [(&dlq_arn, dlq_url)] {
        let attrs = d.queue_attributes(q).await?;
        assert_eq!(attrs.get("QueueArn"), Some(arn));
        assert_eq!(
            attrs.get("MessageRetentionPeriod").map(String::as_str),
            Some("1209600")
        );
    }

    // The mappings: each function fed by its queue, partial batch failures reported.
    let event_mapping = d.mapping(&replicate.name).await?;
    assert_eq!(
        event_mapping.event_source_arn(),
        Some(d.output("EventQueueArn")?)
    );
    assert_eq!(event_mapping.batch_size(), Some(10));
    assert_eq!(
        event_mapping
            .scaling_config()
            .and_then(|s| s.maximum_concurrency()),
        Some(50)
    );
    let segment_mapping = d.mapping(&backfill.name).await?;
    assert_eq!(
        segment_mapping.event_source_arn(),
        segment.get("QueueArn").map(String::as_str)
    );
    assert_eq!(segment_mapping.batch_size(), Some(1));
    assert_eq!(
        segment_mapping
            .scaling_config()
            .and_then(|s| s.maximum_concurrency())
            .map(|c| c.to_string()),
        Some(d.param("BackfillConcurrency")?.to_string()),
        "BackfillConcurrency sets the segment mapping's MaximumConcurrency"
    );
    for m in [&event_mapping, &segment_mapping] {
        assert!(
            m.function_response_types()
                .iter()
                .any(|t| t.as_str() == "ReportBatchItemFailures"),
            "{m:?}"
        );
    }
    let status_mappings = d
        .lambda
        .list_event_source_mappings()
        .function_name(&status.name)
        .send()
        .await?;
    assert!(status_mappings.event_source_mappings().is_empty());

    // Each function's environment names the stack's table, queues and bucket lists.
    let sources = d.param("SourceBuckets")?;
    let targets = d.param("TargetBuckets")?;
    let allowed = d.param("AllowedEndpoints")?;
    let expect = |f: &DeployedFunction, name: &str, value: &str| {
        assert_eq!(
            f.env.get(name).map(String::as_str),
            Some(value),
            "{}: {name} in {:?}",
            f.binary,
            f.env
        );
    };
    for f in [replicate, backfill, status] {
        expect(f, "CRR_TABLE", table);
        expect(f, "CRR_SOURCE_BUCKETS", sources);
        expect(f, "CRR_TARGET_BUCKETS", targets);
        expect(f, "CRR_ALLOWED_ENDPOINTS", allowed);
        let (_, required) = DEPLOYMENT_ENV
            .iter()
            .find(|(b, _)| *b == f.binary)
            .with_context(|| format!("{} not in DEPLOYMENT_ENV", f.binary))?;
        for name in *required {
            assert!(f.env.contains_key(*name), "{}: {name} missing", f.binary);
        }
    }
    expect(replicate, "CRR_QUEUE_URL", queue_url);
    expect(replicate, "CRR_DLQ_URL", dlq_url);
    expect(backfill, "CRR_SEGMENT_QUEUE_URL", segment_url);
    expect(status, "CRR_QUEUE_URL", queue_url);
    expect(status, "CRR_DLQ_URL", dlq_url);

    // The roles: each grants its function the resources the stack wired it to.
    let replicate_policy = d.role_policy(&replicate.name).await?;
    let backfill_policy = d.role_policy(&backfill.name).await?;
    let status_policy = d.role_policy(&status.name).await?;
    for action in EVENT_SOURCE_ACTIONS {
        assert!(
            replicate_policy.allows(action, d.output("EventQueueArn")?),
            "replicate: {action} on its mapping's queue"
        );
        assert!(
            backfill_policy.allows(action, segment.get("QueueArn").context("arn")?),
            "backfill: {action} on its mapping's queue"
        );
    }
    assert!(replicate_policy.allows("sqs:SendMessage", &dlq_arn));
    assert!(replicate_policy.allows("sqs:SendMessage", d.output("EventQueueArn")?));
    assert!(backfill_policy.allows("sqs:SendMessage", segment.get("QueueArn").context("arn")?));
    for arn in [d.output("EventQueueArn")?, dlq_arn.as_str()] {
        assert!(status_policy.allows("sqs:GetQueueAttributes", arn), "{arn}");
    }
    for (policy, actions) in [
        (&replicate_policy, &["dynamodb:GetItem", "dynamodb:UpdateItem"][..]),
        (&backfill_policy, &["dynamodb:Query", "dynamodb:PutItem"][..]),
        (&status_policy, &["dynamodb:Query", "dynamodb:GetItem"][..]),
    ] {
        for action in actions {
            assert!(policy.allows(action, &table_arn), "{action} on {table_arn}");
        }
    }
    // S3 grants name only the stack's buckets, and the directions the template means.
    let buckets: BTreeSet<&str> = d
        .sources
        .iter()
        .chain(&d.targets)
        .map(String::as_str)
        .collect();
    for (name, policy) in [
        ("replicate", &replicate_policy),
        ("backfill", &backfill_policy),
        ("status", &status_policy),
    ] {
        for resource in policy.resources_of("s3") {
            let bucket = resource
                .strip_prefix("arn:aws:s3:::")
                .map(|r| r.split('/').next().unwrap_or_default());
            assert!(
                bucket.is_some_and(|b| buckets.contains(b)),
                "{name}: an S3 grant outside the stack's buckets: {resource}"
            );
        }
    }
    for source in &d.sources {
        let object = format!("arn:aws:s3:::{source}/some/key");
        for policy in [&replicate_policy, &backfill_policy] {
            assert!(policy.allows("s3:GetObject", &object));
            assert!(!policy.allows("s3:PutObject", &object), "no writes to a source");
            assert!(!policy.allows("s3:DeleteObject", &object), "no deletes in a source");
        }
        assert!(backfill_policy.allows("s3:ListBucket", &format!("arn:aws:s3:::{source}")));
    }
    for target in &d.targets {
        let object = format!("arn:aws:s3:::{target}/some/key");
        assert!(replicate_policy.allows("s3:PutObject", &object));
        assert!(replicate_policy.allows("s3:DeleteObject", &object));
        assert!(backfill_policy.allows("s3:PutObject", &object));
    }
    assert!(status_policy.resources_of("s3").is_empty(), "status reads no S3");

    // The EventBridge rule: S3 events of the source buckets only, to the event queue.
    let rules = d
        .events
        .list_rule_names_by_target()
        .target_arn(d.output("EventQueueArn")?)
        .send()
        .await?;
    let [rule_name] = rules.rule_names() else {
        bail!("one rule targets the event queue: {:?}", rules.rule_names());
    };
    let rule = d.events.describe_rule().name(rule_name).send().await?;
    assert_eq!(rule.state().map(|s| s.as_str()), Some("ENABLED"));
    let pattern = json(rule.event_pattern().context("no pattern")?)?;
    assert_eq!(pattern["source"], serde_json::json!(["aws.s3"]));
    assert_eq!(
        pattern["detail-type"],
        serde_json::json!(["Object Created", "Object Deleted"])
    );
    assert_eq!(
        pattern["detail"]["bucket"]["name"],
        serde_json::json!(d.sources)
    );
    // The schedule: the backfill function, with the template's input, at the parameter's rate.
    let backfill_arn = d.function_arn(&backfill.name).await?;
    let schedules = d
        .events
        .list_rule_names_by_target()
        .target_arn(&backfill_arn)
        .send()
        .await?;
    let [schedule] = schedules.rule_names() else {
        bail!("one rule invokes the backfill: {:?}", schedules.rule_names());
    };
    let described = d.events.describe_rule().name(schedule).send().await?;
    assert_eq!(
        described.schedule_expression(),
        Some(d.param("BackfillSchedule")?)
    );
    let targets = d.events.list_targets_by_rule().rule(schedule).send().await?;
    let input = targets
        .targets()
        .iter()
        .find(|t| t.arn() == backfill_arn)
        .and_then(|t| t.input())
        .context("the schedule's target has an input")?;
    assert_eq!(json(input)?, serde_json::json!({}));

    // Functions: the runtime, handler, timeout and memory the template sets.
    for (f, timeout, memory) in [(replicate, 60, 512), (backfill, 900, 1024), (status, 15, 256)] {
        assert_eq!((f.timeout_secs, f.memory_mb), (timeout, memory), "{}", f.binary);
        let config = d
            .lambda
            .get_function_configuration()
            .function_name(&f.name)
            .send()
            .await?;
        assert_eq!(config.runtime().map(|r| r.as_str()), Some("provided.al2023"));
        assert_eq!(config.handler(), Some("bootstrap"));
    }

    check_what_moto_skips(d)?;
    Ok(())
}

/// What moto reports created but does not create (or keep), checked on the template as
/// deployed instead: the event queue's policy, the alarms, the Function URL, the
/// functions' architecture and logging, and the table's TTL and point-in-time recovery.
fn check_what_moto_skips(d: &Deployment) -> Result<()> {
    let reference = |v: &Value, what: &str| -> bool {
        v.get("Ref").and_then(Value::as_str) == Some(what)
            || v.get("Fn::GetAtt")
                .and_then(|g| g.get(0))
                .and_then(Value::as_str)
                == Some(what)
    };
    // The queue policy: EventBridge's rule and the source buckets may send to the event queue.
    let policy = d.resource("EventQueuePolicy")?;
    let queues = policy.pointer("/Properties/Queues").context("Queues")?;
    assert!(
        queues
            .as_array()
            .is_some_and(|q| q.len() == 1 && reference(&q[0], "EventQueue")),
        "{queues}"
    );
    let statements = policy
        .pointer("/Properties/PolicyDocument/Statement")
        .and_then(Value::as_array)
        .context("statements")?;
    let eventbridge = statements
        .iter()
        .find(|s| s.pointer("/Principal/Service") == Some(&Value::from("events.amazonaws.com")))
        .context("no statement lets EventBridge send")?;
    assert_eq!(eventbridge["Action"], "sqs:SendMessage");
    assert!(reference(&eventbridge["Resource"], "EventQueue"));
    assert!(reference(
        eventbridge
            .pointer("/Condition/ArnEquals/aws:SourceArn")
            .context("SourceArn")?,
        "S3EventsRule"
    ));
    assert!(
        statements
            .iter()
            .any(|s| s.pointer("/Principal/Service") == Some(&Value::from("s3.amazonaws.com"))),
        "the source buckets may send straight to the queue (--notify-queue-arn)"
    );
    // The alarms: on the stack's own queues and backfill function.
    let alarms = d.resources_of_type("AWS::CloudWatch::Alarm");
    let mut watched = BTreeSet::new();
    for (name, alarm) in &alarms {
        let dims = alarm
            .pointer("/Properties/Dimensions")
            .and_then(Value::as_array)
            .with_context(|| format!("{name}: no dimensions"))?;
        for dim in dims {
            let value = &dim["Value"];
            for resource in [
                "DeadLetterQueue",
                "SegmentDeadLetterQueue",
                "SegmentQueue",
                "EventQueue",
                "BackfillFunction",
            ] {
                if reference(value, resource) {
                    watched.insert(resource);
                }
            }
        }
    }
    assert_eq!(alarms.len(), 5, "five alarms");
    assert_eq!(watched.len(), 5, "each alarm watches a resource of the stack: {watched:?}");
    // The Function URL: IAM-authenticated, on the status function.
    let url = d.resource("StatusFunctionUrl")?;
    assert_eq!(url["Type"], "AWS::Lambda::Url");
    assert_eq!(url.pointer("/Properties/AuthType"), Some(&Value::from("AWS_IAM")));
    assert!(reference(
        url.pointer("/Properties/TargetFunctionArn")
            .context("TargetFunctionArn")?,
        "StatusFunction"
    ));
    // The adaptation the script made: the StatusUrl output is all that is missing.
    let outputs = d.expanded.get("Outputs").context("Outputs")?;
    assert!(outputs.get("StatusUrl").is_none());
    assert!(!d.outputs.contains_key("StatusUrl"));
    // Architectures and logging, which moto does not keep.
    for (name, f) in d.resources_of_type("AWS::Lambda::Function") {
        assert_eq!(
            f.pointer("/Properties/Architectures"),
            Some(&serde_json::json!(["arm64"])),
            "{name}"
        );
        assert_eq!(
            f.pointer("/Properties/LoggingConfig/LogFormat"),
            Some(&Value::from("JSON")),
            "{name}"
        );
    }
    // TTL and point-in-time recovery, which moto reads back as disabled.
    let table = d.resource("StateTable")?;
    assert_eq!(
        table.pointer("/Properties/TimeToLiveSpecification"),
        Some(&serde_json::json!({"AttributeName": "expires_at", "Enabled": true}))
    );
    assert_eq!(
        table.pointer("/Properties/PointInTimeRecoverySpecification/PointInTimeRecoveryEnabled"),
        Some(&Value::from(true))
    );
    assert_eq!(table["DeletionPolicy"], "Retain");
    Ok(())
}

#[tokio::test]
async fn the_deployed_stack_is_wired_as_the_template_says() -> Result<()> {
    let stack = Stack::from_env()?;
    let moto = OwnMoto::start(REGION).await?;
    let (s1, s2, t1, t2) = (unique("src"), unique("src"), unique("dst"), unique("dst"));
    let d = Deployment::create(
        &stack,
        moto,
        &[&s1, &s2],
        &[&t1, &t2],
        &[
            ("BackfillConcurrency", "7"),
            ("BackfillSchedule", "rate(2 minutes)"),
        ],
    )
    .await?;
    check_wiring(&d).await?;
    Ok(())
}
