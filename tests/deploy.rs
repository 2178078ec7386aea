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

/// What the stack created, read back through the services' APIs.
struct Created {
    table: String,
    table_arn: String,
    /// The queues' attributes (GetQueueAttributes, All).
    queue: BTreeMap<String, String>,
    segment: BTreeMap<String, String>,
    dlq_arn: String,
    replicate: DeployedFunction,
    backfill: DeployedFunction,
    status: DeployedFunction,
}

impl Created {
    async fn read(d: &Deployment) -> Result<Self> {
        let mut functions = BTreeMap::new();
        for (output, binary) in d.function_outputs()? {
            functions.insert(binary.clone(), d.function(&output, &binary).await?);
        }
        let mut take = |binary: &str| {
            functions
                .remove(binary)
                .with_context(|| format!("no function runs {binary}"))
        };
        Ok(Self {
            table: d.output("StateTableName")?.to_string(),
            table_arn: d.table_arn().await?,
            queue: d.queue_attributes(d.output("EventQueueUrl")?).await?,
            segment: d.queue_attributes(d.output("SegmentQueueUrl")?).await?,
            dlq_arn: d.queue_arn(d.output("DeadLetterQueueUrl")?).await?,
            replicate: take("crr-replicate")?,
            backfill: take("crr-backfill")?,
            status: take("crr-status")?,
        })
    }

    fn segment_arn(&self) -> Result<&str> {
        self.segment
            .get("QueueArn")
            .map(String::as_str)
            .context("segment queue without QueueArn")
    }
}

/// The wiring of a deployed stack, read through the services' APIs.
async fn check_wiring(d: &Deployment) -> Result<()> {
    let c = Created::read(d).await?;
    check_outputs(d, &c).await?;
    check_queues(d, &c).await?;
    check_mappings(d, &c).await?;
    check_environments(d, &c)?;
    check_roles(d, &c).await?;
    check_events(d, &c).await?;
    check_functions(d, &c).await?;
    check_what_moto_skips(d)?;
    Ok(())
}

/// The stack is complete, every output resolves to an existing resource, one log group per function.
async fn check_outputs(d: &Deployment, c: &Created) -> Result<()> {
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
    let table = c.table.as_str();
    let described_table = d.dynamodb.describe_table().table_name(table).send().await?;
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
    assert_eq!(
        c.queue.get("QueueArn").map(String::as_str),
        Some(d.output("EventQueueArn")?),
        "EventQueueArn is the event queue's"
    );
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

    // The log groups: one per function, named where Lambda writes its logs (moto keeps no
    // LoggingConfig: the functions' link to them is checked on the template below).
    let log_groups: BTreeSet<&str> = resources
        .stack_resource_summaries()
        .iter()
        .filter(|r| r.resource_type() == Some("AWS::Logs::LogGroup"))
        .filter_map(|r| r.physical_resource_id())
        .collect();
    let expected: BTreeSet<String> = [&c.replicate, &c.backfill, &c.status]
        .iter()
        .map(|f| format!("/aws/lambda/{}", f.name))
        .collect();
    assert_eq!(
        log_groups,
        expected.iter().map(String::as_str).collect(),
        "a log group per function"
    );
    Ok(())
}

/// The queues: redrive to their DLQs, visibility at least 6x the consumer's timeout.
async fn check_queues(d: &Deployment, c: &Created) -> Result<()> {
    let (queue, segment, dlq_arn) = (&c.queue, &c.segment, &c.dlq_arn);
    let (replicate, backfill) = (&c.replicate, &c.backfill);
    let dlq_url = d.output("DeadLetterQueueUrl")?;
    // The queues: redrive to their DLQs, visibility at least 6x the consumer's timeout.
    let redrive = json(
        queue
            .get("RedrivePolicy")
            .context("event queue: no redrive")?,
    )?;
    assert_eq!(redrive["deadLetterTargetArn"], Value::from(dlq_arn.clone()));
    assert_eq!(
        redrive["maxReceiveCount"].to_string().trim_matches('"'),
        "5"
    );
    let visibility = |q: &BTreeMap<String, String>| -> u64 {
        q.get("VisibilityTimeout")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    assert!(visibility(queue) >= 6 * replicate.timeout_secs, "{queue:?}");
    assert!(
        visibility(segment) >= 6 * backfill.timeout_secs,
        "{segment:?}"
    );
    let segment_redrive = json(
        segment
            .get("RedrivePolicy")
            .context("segment queue: no redrive")?,
    )?;
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
    for (arn, q) in [(dlq_arn, dlq_url)] {
        let attrs = d.queue_attributes(q).await?;
        assert_eq!(attrs.get("QueueArn"), Some(arn));
        assert_eq!(
            attrs.get("MessageRetentionPeriod").map(String::as_str),
            Some("1209600")
        );
    }
    Ok(())
}

/// The event source mappings: each function fed by its queue, as configured.
async fn check_mappings(d: &Deployment, c: &Created) -> Result<()> {
    let (replicate, backfill, status, segment) = (&c.replicate, &c.backfill, &c.status, &c.segment);
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
    Ok(())
}

/// Each function's environment names the stack's table, queues and bucket lists.
fn check_environments(d: &Deployment, c: &Created) -> Result<()> {
    let (replicate, backfill, status) = (&c.replicate, &c.backfill, &c.status);
    let table = c.table.as_str();
    let queue_url = d.output("EventQueueUrl")?;
    let dlq_url = d.output("DeadLetterQueueUrl")?;
    let segment_url = d.output("SegmentQueueUrl")?;
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
    Ok(())
}

/// The roles: each grants its function the resources the stack wired it to.
async fn check_roles(d: &Deployment, c: &Created) -> Result<()> {
    let (replicate, backfill, status) = (&c.replicate, &c.backfill, &c.status);
    let (table_arn, dlq_arn) = (&c.table_arn, &c.dlq_arn);
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
            backfill_policy.allows(action, c.segment_arn()?),
            "backfill: {action} on its mapping's queue"
        );
    }
    assert!(replicate_policy.allows("sqs:SendMessage", dlq_arn));
    assert!(replicate_policy.allows("sqs:SendMessage", d.output("EventQueueArn")?));
    assert!(backfill_policy.allows("sqs:SendMessage", c.segment_arn()?));
    for arn in [d.output("EventQueueArn")?, dlq_arn.as_str()] {
        assert!(status_policy.allows("sqs:GetQueueAttributes", arn), "{arn}");
    }
    for (policy, actions) in [
        (
            &replicate_policy,
            &["dynamodb:GetItem", "dynamodb:UpdateItem"][..],
        ),
        (
            &backfill_policy,
            &["dynamodb:Query", "dynamodb:PutItem"][..],
        ),
        (&status_policy, &["dynamodb:Query", "dynamodb:GetItem"][..]),
    ] {
        for action in actions {
            assert!(policy.allows(action, table_arn), "{action} on {table_arn}");
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
            assert!(
                !policy.allows("s3:PutObject", &object),
                "no writes to a source"
            );
            assert!(
                !policy.allows("s3:DeleteObject", &object),
                "no deletes in a source"
            );
        }
        assert!(backfill_policy.allows("s3:ListBucket", &format!("arn:aws:s3:::{source}")));
    }
    for target in &d.targets {
        let object = format!("arn:aws:s3:::{target}/some/key");
        assert!(replicate_policy.allows("s3:PutObject", &object));
        assert!(replicate_policy.allows("s3:DeleteObject", &object));
        assert!(backfill_policy.allows("s3:PutObject", &object));
    }
    assert!(
        status_policy.resources_of("s3").is_empty(),
        "status reads no S3"
    );
    Ok(())
}

/// The EventBridge rule and the schedule.
async fn check_events(d: &Deployment, c: &Created) -> Result<()> {
    let backfill = &c.backfill;
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
        bail!(
            "one rule invokes the backfill: {:?}",
            schedules.rule_names()
        );
    };
    let described = d.events.describe_rule().name(schedule).send().await?;
    assert_eq!(
        described.schedule_expression(),
        Some(d.param("BackfillSchedule")?)
    );
    let targets = d
        .events
        .list_targets_by_rule()
        .rule(schedule)
        .send()
        .await?;
    let input = targets
        .targets()
        .iter()
        .find(|t| t.arn() == backfill_arn)
        .and_then(|t| t.input())
        .context("the schedule's target has an input")?;
    assert_eq!(json(input)?, serde_json::json!({}));
    Ok(())
}

/// Functions: the runtime, handler, timeout and memory the template sets.
async fn check_functions(d: &Deployment, c: &Created) -> Result<()> {
    let (replicate, backfill, status) = (&c.replicate, &c.backfill, &c.status);
    // Functions: the runtime, handler, timeout and memory the template sets.
    for (f, timeout, memory) in [
        (replicate, 60, 512),
        (backfill, 900, 1024),
        (status, 15, 256),
    ] {
        assert_eq!(
            (f.timeout_secs, f.memory_mb),
            (timeout, memory),
            "{}",
            f.binary
        );
        let config = d
            .lambda
            .get_function_configuration()
            .function_name(&f.name)
            .send()
            .await?;
        assert_eq!(
            config.runtime().map(|r| r.as_str()),
            Some("provided.al2023")
        );
        assert_eq!(config.handler(), Some("bootstrap"));
    }
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
    assert_eq!(
        watched.len(),
        5,
        "each alarm watches a resource of the stack: {watched:?}"
    );
    // The Function URL: IAM-authenticated, on the status function.
    let url = d.resource("StatusFunctionUrl")?;
    assert_eq!(url["Type"], "AWS::Lambda::Url");
    assert_eq!(
        url.pointer("/Properties/AuthType"),
        Some(&Value::from("AWS_IAM"))
    );
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
        let group = name.replace("Function", "LogGroup");
        assert!(
            f.pointer("/Properties/LoggingConfig/LogGroup")
                .is_some_and(|g| reference(g, &group)),
            "{name} logs to {group}"
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

/// Splits a command line as a POSIX shell would for the plain words and double-quoted
/// strings `RecordDeploymentCommand` holds.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = vec![];
    let mut word: Option<String> = None;
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                word.get_or_insert_with(String::new);
            }
            c if c.is_whitespace() && !quoted => words.extend(word.take()),
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    words
}

/// The resources each action a function needs must be granted on, in this deployment:
/// (resources, whether one of them is enough).
struct Wiring {
    source: String,
    target: String,
    table_arn: String,
    event_queue_arn: String,
    dlq_arn: String,
    segment_queue_arn: String,
}

impl Wiring {
    fn resources(&self, binary: &str, action: &str) -> (Vec<String>, bool) {
        let source_object = format!("arn:aws:s3:::{}/any/key", self.source);
        let target_object = format!("arn:aws:s3:::{}/any/key", self.target);
        let (source_bucket, target_bucket) = (
            format!("arn:aws:s3:::{}", self.source),
            format!("arn:aws:s3:::{}", self.target),
        );
        let all = |v: Vec<&String>| (v.into_iter().cloned().collect(), false);
        match (binary, action) {
            // A replica is read (HEAD) before it is written.
            (_, "s3:GetObject") => all(vec![&source_object, &target_object]),
            (_, "s3:GetObjectTagging" | "s3:GetObjectAcl") => all(vec![&source_object]),
            (_, "s3:GetBucketOwnershipControls") => all(vec![&source_bucket]),
            (_, "s3:ListBucket") => all(vec![&source_bucket, &target_bucket]),
            (_, a) if a.starts_with("s3:") => all(vec![&target_object]),
            (_, a) if a.starts_with("dynamodb:") => all(vec![&self.table_arn]),
            ("crr-replicate", "sqs:SendMessage") => (
                vec![self.dlq_arn.clone(), self.event_queue_arn.clone()],
                true,
            ),
            ("crr-replicate", _) => all(vec![&self.event_queue_arn]),
            ("crr-backfill", a) if a.starts_with("sqs:") => all(vec![&self.segment_queue_arn]),
            ("crr-status", "sqs:GetQueueAttributes") => {
                all(vec![&self.event_queue_arn, &self.dlq_arn])
            }
            _ => (vec!["*".to_string()], false),
        }
    }
}

/// The operations a function made (its operation log), as IAM actions.
fn needed_actions(log: &Path, event_source: bool) -> Result<BTreeMap<String, String>> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let mut needed = BTreeMap::new();
    if event_source {
        for action in EVENT_SOURCE_ACTIONS {
            needed.insert(action.to_string(), "the SQS event source".to_string());
        }
    }
    for line in text.lines() {
        let op = line.split(' ').next().unwrap_or_default();
        for action in actions_for(op)? {
            needed
                .entry(action.to_string())
                .or_insert_with(|| op.to_string());
        }
    }
    Ok(needed)
}

/// A Function URL request (payload format 2.0) for the status function.
fn status_request() -> String {
    serde_json::json!({
        "version": "2.0", "rawPath": "/", "headers": {}, "queryStringParameters": {},
        "requestContext": { "http": { "method": "GET", "path": "/" }, "timeEpoch": 0 },
        "isBase64Encoded": false
    })
    .to_string()
}

#[tokio::test]
async fn replicates_through_what_the_stack_created_and_its_table_outlives_it() -> Result<()> {
    let stack = Stack::from_env()?;
    let moto = OwnMoto::start(REGION).await?;
    let here: S3Server = moto.server.clone();
    let cf = here.endpoint.clone();
    let (source, target, other) = (unique("src"), unique("dst"), unique("other"));
    stack.create_bucket(&here, &source).await?;
    stack.create_bucket(&here, &other).await?;
    stack.create_bucket(&stack.b, &target).await?;
    // Objects there before the rule: the historical migration's.
    let historical: Vec<(String, Vec<u8>)> = (0..30)
        .map(|i| {
            (
                format!("old/{i:03} a key+plus.txt"),
                format!("historical object {i}").into_bytes(),
            )
        })
        .collect();
    seed(&stack, &here, &source, historical.clone(), 6).await?;

    let d = Deployment::create(
        &stack,
        moto,
        &[&source],
        &[&target],
        &[("BackfillConcurrency", "2")],
    )
    .await?;
    let table = d.output("StateTableName")?.to_string();
    let queue_url = d.output("EventQueueUrl")?.to_string();
    let segment_url = d.output("SegmentQueueUrl")?.to_string();
    let c = Created::read(&d).await?;
    let (replicate, backfill, status) = (&c.replicate, &c.backfill, &c.status);

    // The mappings' configuration, read; then they are disabled: an enabled mapping makes
    // moto run the function in Docker on every message. Their batch sizes feed the binaries.
    let event_mapping = d.mapping(&replicate.name).await?;
    let segment_mapping = d.mapping(&backfill.name).await?;
    for m in [&event_mapping, &segment_mapping] {
        let uuid = m.uuid().context("mapping without uuid")?;
        d.lambda
            .update_event_source_mapping()
            .uuid(uuid)
            .enabled(false)
            .send()
            .await?;
        eventually(WAIT, "the mapping disabled", || async {
            let m = d
                .lambda
                .get_event_source_mapping()
                .uuid(uuid)
                .send()
                .await?;
            Ok((m.state() == Some("Disabled")).then_some(()))
        })
        .await?;
    }
    let concurrency = |m: &EventSourceMappingConfiguration| -> u16 {
        let max = m
            .scaling_config()
            .and_then(|s| s.maximum_concurrency())
            .unwrap_or(2);
        // Two processes stand for the mapping's concurrency on this 2-core machine.
        u16::try_from(max.clamp(1, 2)).unwrap_or(1)
    };

    // The deployment recorded as its output says, then a rule as an operator makes it.
    let record = shell_words(d.output("RecordDeploymentCommand")?);
    ensure!(
        record.first().map(String::as_str) == Some("crr"),
        "{record:?}"
    );
    let record: Vec<&str> = record[1..].iter().map(String::as_str).collect();
    d.crr_ok(&record)?;
    let rule_id = unique("deployed");
    d.crr_ok(&[
        "--table",
        &table,
        "rule",
        "create",
        "--id",
        &rule_id,
        "--source-bucket",
        &source,
        "--source-region",
        REGION,
        "--source-endpoint-url",
        &cf,
        "--source-path-style",
        "--target-bucket",
        &target,
        "--target-region",
        &stack.b.region,
        "--target-endpoint-url",
        &stack.b.endpoint,
        "--target-path-style",
        "--historical",
    ])?;
    // moto leaves EventBridgeConfiguration out of GetBucketNotificationConfiguration: that
    // `crr rule create` turned it on shows below, as the source's events reach the queue.
    let s3_here = stack.s3(&here);

    // The stack's EventBridge rule takes the source's events, not another bucket's.
    s3_here
        .put_bucket_notification_configuration()
        .bucket(&other)
        .notification_configuration(
            aws_sdk_s3::types::NotificationConfiguration::builder()
                .event_bridge_configuration(
                    aws_sdk_s3::types::EventBridgeConfiguration::builder().build(),
                )
                .build(),
        )
        .send()
        .await?;
    let put = |bucket: &str, key: &str, body: &[u8]| {
        s3_here
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(ByteStream::from(body.to_vec()))
            .send()
    };
    put(&other, "not-a-source.txt", b"x").await?;
    put(&source, "live/first.txt", b"first live object").await?;
    let seen = stack_messages(&d, &queue_url).await?;
    ensure!(
        seen.iter().any(|b| b.contains(&source)),
        "the source's event reached the stack's queue: {seen:?}"
    );
    ensure!(
        !seen.iter().any(|b| b.contains(&other)),
        "another bucket's event reached the stack's queue: {seen:?}"
    );

    // The real binaries, configured as deployed, endpoints aside.
    let dir = std::env::temp_dir().join(unique("crr-deployed"));
    std::fs::create_dir_all(&dir)?;
    let endpoints = [
        ("AWS_ENDPOINT_URL_DYNAMODB", cf.as_str()),
        ("AWS_ENDPOINT_URL_SQS", cf.as_str()),
        // moto answers nothing the SDK's CloudWatch (CBOR) reads: the status does without.
        ("AWS_ENDPOINT_URL_CLOUDWATCH", cf.as_str()),
    ];
    let observe = |binary: &str| {
        vec![(
            "CRR_OPERATION_LOG",
            dir.join(format!("{binary}.ops")).display().to_string(),
        )]
    };
    let log = |name: &str| dir.join(format!("{name}.log"));
    let replicate_fn = RunningFunction::deployed(
        replicate,
        REGION,
        &endpoints,
        &observe("crr-replicate"),
        Feed::Queue {
            url: &queue_url,
            sqs_endpoint: &cf,
            batch_size: event_mapping.batch_size().unwrap_or(10),
            instances: concurrency(&event_mapping),
        },
        &log("replicate"),
    )?;
    let workers = RunningFunction::deployed(
        backfill,
        REGION,
        &endpoints,
        &observe("crr-backfill"),
        Feed::Queue {
            url: &segment_url,
            sqs_endpoint: &cf,
            batch_size: segment_mapping.batch_size().unwrap_or(1),
            instances: concurrency(&segment_mapping),
        },
        &log("backfill-workers"),
    )?;
    let coordinator = RunningFunction::deployed(
        backfill,
        REGION,
        &endpoints,
        &observe("crr-backfill"),
        Feed::Direct,
        &log("backfill-schedule"),
    )?;
    let status_fn = RunningFunction::deployed(
        status,
        REGION,
        &endpoints,
        &observe("crr-status"),
        Feed::Direct,
        &log("status"),
    )?;
    let schedule_input = schedule_input(&d, &backfill.name).await?;

    // Historical objects migrate: the schedule's invocations, as often as the test likes.
    let state = DynamoStore::new(d.dynamodb.clone(), table.clone());
    let started = Instant::now();
    loop {
        let job = state.job(&rule_id).await?;
        if job.as_ref().map(|j| j.state) == Some(JobState::Completed) {
            break;
        }
        ensure!(
            started.elapsed() < WAIT,
            "the backfill did not complete: {job:?}; logs in {}",
            dir.display()
        );
        let (failed, body) = invoke(coordinator.port, &backfill.name, &schedule_input).await?;
        ensure!(!failed, "the scheduled invocation failed: {body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Live puts, an overwrite and a delete replicate through EventBridge and the queue.
    let s3_target = stack.s3(&stack.b);
    put(&source, "live/second key+plus.txt", b"second").await?;
    put(&source, &historical[0].0, b"overwritten after the rule").await?;
    s3_here
        .delete_object()
        .bucket(&source)
        .key(&historical[1].0)
        .send()
        .await?;
    for (key, body) in [
        ("live/first.txt", &b"first live object"[..]),
        ("live/second key+plus.txt", b"second"),
        (historical[0].0.as_str(), b"overwritten after the rule"),
    ] {
        eventually(WAIT, &format!("replica of {key}"), || async {
            Ok(read_object(&s3_target, &target, key)
                .await?
                .filter(|(b, _)| b == body)
                .map(|_| ()))
        })
        .await?;
    }
    eventually(WAIT, "the delete replicated", || async {
        Ok(read_object(&s3_target, &target, &historical[1].0)
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;
    stack
        .wait_queue_drained(&here, &queue_url, WAIT)
        .await
        .context("the event queue drained")?;
    let (source_objects, target_objects) = (
        list_all(&s3_here, &source).await?,
        list_all(&s3_target, &target).await?,
    );
    assert_eq!(
        source_objects, target_objects,
        "the target is the source's copy"
    );
    assert_eq!(source_objects.len(), historical.len() + 1);

    // The status function reports the migration complete and the live replication.
    let (failed, body) = invoke(status_fn.port, &status.name, &status_request()).await?;
    ensure!(!failed, "{body}");
    let response = json(&body)?;
    assert_eq!(response["statusCode"], 200, "{body}");
    let report: crr_shared::status::StatusReport =
        serde_json::from_str(response["body"].as_str().context("no body")?)?;
    let rule = report
        .rules
        .iter()
        .find(|r| r.rule_id == rule_id)
        .context("the rule is in the status")?;
    assert_eq!(rule.historical.state, "completed", "{rule:?}");
    assert_eq!(rule.historical.percent_objects, Some(100.0), "{rule:?}");
    // The migration listed the historical objects and the first live one, put before it ran.
    assert_eq!(rule.historical.objects_total, historical.len() as u64 + 1);
    assert!(rule.realtime.replicated_objects >= 3, "{:?}", rule.realtime);
    assert!(rule.realtime.deletes >= 1, "{:?}", rule.realtime);
    assert_eq!(rule.realtime.failed, 0, "{:?}", rule.realtime);

    // `crr verify` finds no drift.
    let out = d.crr(&["--table", &table, "verify", &rule_id, "--json"])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.lines().count(), 1, "only the summary: {stdout}");

    // Each role grants what its function did, on what the stack wired it to.
    let wiring = Wiring {
        source: source.clone(),
        target: target.clone(),
        table_arn: c.table_arn.clone(),
        event_queue_arn: d.output("EventQueueArn")?.to_string(),
        dlq_arn: c.dlq_arn.clone(),
        segment_queue_arn: c.segment_arn()?.to_string(),
    };
    let mut missing = vec![];
    for (f, event_source) in [(replicate, true), (backfill, true), (status, false)] {
        let policy = d.role_policy(&f.name).await?;
        let needed = needed_actions(&dir.join(format!("{}.ops", f.binary)), event_source)?;
        ensure!(
            needed.keys().any(|a| a.starts_with("dynamodb:")),
            "{}: no operation recorded: {needed:?}",
            f.binary
        );
        println!("{}: needs {:?}", f.binary, needed.keys());
        for (action, why) in &needed {
            let (resources, any) = wiring.resources(&f.binary, action);
            let granted: Vec<bool> = resources.iter().map(|r| policy.allows(action, r)).collect();
            let ok = if any {
                granted.iter().any(|g| *g)
            } else {
                granted.iter().all(|g| *g)
            };
            if !ok {
                missing.push(format!(
                    "{} needs {action} on {resources:?} (for {why})",
                    f.binary
                ));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "the deployed roles lack:\n  {}",
        missing.join("\n  ")
    );

    // The stack deleted: what it made is gone, but the table (DeletionPolicy: Retain)
    // keeps the rule, the bucket claims, the migration's record and the counters.
    drop((replicate_fn, workers, coordinator, status_fn));
    d.delete().await?;
    ensure!(
        d.sqs
            .get_queue_url()
            .queue_name(queue_url.rsplit('/').next().unwrap_or_default())
            .send()
            .await
            .is_err(),
        "the event queue is gone"
    );
    for f in [replicate, backfill, status] {
        ensure!(
            d.lambda
                .get_function_configuration()
                .function_name(&f.name)
                .send()
                .await
                .is_err(),
            "{} is gone",
            f.name
        );
    }
    let rules_left = d
        .events
        .list_rule_names_by_target()
        .target_arn(&wiring.event_queue_arn)
        .send()
        .await?;
    assert!(
        rules_left.rule_names().is_empty(),
        "the EventBridge rule is gone"
    );
    d.dynamodb
        .describe_table()
        .table_name(&table)
        .send()
        .await
        .context("the table is retained")?;
    let rules = state.list_rules().await?;
    assert!(rules.iter().any(|r| r.id == rule_id), "{rules:?}");
    assert_eq!(
        state.job(&rule_id).await?.map(|j| j.state),
        Some(JobState::Completed)
    );
    let families = item_families(&d, &table).await?;
    println!("the retained table holds, by item family: {families:?}");
    for family in ["DEPLOYMENT", "RULES", "CLAIM", "BACKFILL", "KEY", "STATS"] {
        assert!(families.contains_key(family), "{family} in {families:?}");
    }
    let listed = d.crr_ok(&["--table", &table, "rule", "list", "--json"])?;
    assert!(listed.contains(&rule_id), "{listed}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The bodies of the messages now in the stack's queue (received and made visible again).
async fn stack_messages(d: &Deployment, url: &str) -> Result<Vec<String>> {
    eventually(WAIT, "an event in the stack's queue", || async {
        let out = d
            .sqs
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .visibility_timeout(0)
            .send()
            .await?;
        let bodies: Vec<String> = out
            .messages()
            .iter()
            .filter_map(|m| m.body().map(String::from))
            .collect();
        Ok((!bodies.is_empty()).then_some(bodies))
    })
    .await
}

/// The input the backfill's schedule invokes it with.
async fn schedule_input(d: &Deployment, function: &str) -> Result<String> {
    let arn = d.function_arn(function).await?;
    let rules = d
        .events
        .list_rule_names_by_target()
        .target_arn(&arn)
        .send()
        .await?;
    let rule = rules.rule_names().first().context("no schedule")?;
    let targets = d.events.list_targets_by_rule().rule(rule).send().await?;
    targets
        .targets()
        .iter()
        .find(|t| t.arn() == arn)
        .and_then(|t| t.input())
        .map(String::from)
        .context("the schedule's target has no input")
}

/// Items of the table counted by family (the partition key's part before '#').
async fn item_families(d: &Deployment, table: &str) -> Result<BTreeMap<String, usize>> {
    let mut families = BTreeMap::new();
    let mut start = None;
    loop {
        let out = d
            .dynamodb
            .scan()
            .table_name(table)
            .set_exclusive_start_key(start)
            .send()
            .await?;
        for item in out.items() {
            let pk = item
                .get("pk")
                .and_then(|v| v.as_s().ok())
                .cloned()
                .unwrap_or_default();
            let family = pk.split('#').next().unwrap_or_default().to_string();
            *families.entry(family).or_insert(0) += 1;
        }
        match out.last_evaluated_key() {
            Some(k) if !k.is_empty() => start = Some(k.clone()),
            _ => return Ok(families),
        }
    }
}
