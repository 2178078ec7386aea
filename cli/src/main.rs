//! `crr`: the console of crr, serverless cross-region replication for S3 buckets.

mod backfill_cmd;
mod console;
mod deployment_cmd;
mod local;
mod redrive_cmd;
mod rule_cmd;
mod status_cmd;
mod verify_cmd;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Serverless cross-region replication for S3 buckets.
#[derive(Parser)]
#[command(
    name = "crr",
    version,
    about,
    propagate_version = true,
    after_help = "Examples:\n  crr rule create --id photos --source-bucket photos-us --source-region us-east-1 \\\n    --target-bucket photos-eu --target-region eu-west-1 --historical\n  crr status --watch\n  crr verify photos\n\nExit codes: 0 success, 1 drift found by `crr verify`, 2 error (one line on stderr)."
)]
struct Cli {
    #[command(flatten)]
    aws: AwsArgs,
    #[command(subcommand)]
    command: Command,
}

/// Connection settings, with the AWS CLI's names and environment variables.
#[derive(clap::Args, Clone, Debug)]
pub struct AwsArgs {
    /// DynamoDB table holding rules and state.
    #[arg(long, global = true, env = "CRR_TABLE", default_value = "crr")]
    pub table: String,
    /// Region of the crr deployment (its table); defaults to the AWS configuration.
    #[arg(long, global = true, env = "AWS_REGION")]
    pub region: Option<String>,
    /// Named profile from the AWS configuration files.
    #[arg(long, global = true, env = "AWS_PROFILE")]
    pub profile: Option<String>,
    /// Endpoint for DynamoDB (e.g. DynamoDB Local); S3 endpoints are set per rule.
    #[arg(long, global = true, env = "AWS_ENDPOINT_URL_DYNAMODB")]
    pub endpoint_url: Option<String>,
}

impl AwsArgs {
    /// The SDK configuration these arguments describe.
    pub async fn sdk_config(&self) -> aws_config::SdkConfig {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(region) = &self.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(profile) = &self.profile {
            loader = loader.profile_name(profile);
        }
        loader.load().await
    }

    /// The state store (DynamoDB table) these arguments point at.
    pub async fn state(&self, sdk: &aws_config::SdkConfig) -> crr_shared::dynamo::DynamoStore {
        let mut builder = aws_sdk_dynamodb::config::Builder::from(sdk);
        if let Some(url) = &self.endpoint_url {
            builder = builder.endpoint_url(url);
        }
        if let Some(log) = crr_shared::adapters::aws_clients::OperationLog::from_env() {
            builder = builder.interceptor(log);
        }
        crr_shared::dynamo::DynamoStore::new(
            aws_sdk_dynamodb::Client::from_conf(builder.build()),
            &self.table,
        )
    }
}

/// Where the event queue and its dead-letter queue are.
#[derive(clap::Args, Clone, Debug)]
pub struct QueueArgs {
    /// The event queue the replicate function reads (the deployment's `EventQueueUrl`).
    #[arg(long, env = "CRR_QUEUE_URL")]
    pub queue_url: Option<String>,
    /// Its dead-letter queue (`DeadLetterQueueUrl`).
    #[arg(long, env = "CRR_DLQ_URL")]
    pub dlq_url: Option<String>,
    /// SQS endpoint; by default the queue URL's own host when it is not AWS's.
    #[arg(long, env = "AWS_ENDPOINT_URL_SQS")]
    pub sqs_endpoint_url: Option<String>,
}

impl QueueArgs {
    /// The SQS endpoint to use for `queue_url`, `None` for AWS's own.
    pub fn sqs_endpoint(&self, queue_url: &str) -> Option<String> {
        self.sqs_endpoint_url
            .clone()
            .or_else(|| queue_endpoint(queue_url))
    }

    /// An SQS client for `queue_url`.
    pub fn sqs_client(&self, sdk: &aws_config::SdkConfig, queue_url: &str) -> aws_sdk_sqs::Client {
        let mut conf = aws_sdk_sqs::config::Builder::from(sdk);
        if let Some(url) = self.sqs_endpoint(queue_url) {
            conf = conf.endpoint_url(url);
        }
        aws_sdk_sqs::Client::from_conf(conf.build())
    }

    /// Both queue URLs, or an error naming the missing one.
    pub fn both(&self) -> Result<(&str, &str)> {
        match (&self.queue_url, &self.dlq_url) {
            (Some(q), Some(d)) => Ok((q, d)),
            (None, _) => anyhow::bail!(
                "--queue-url (or CRR_QUEUE_URL) is needed: the deployment's EventQueueUrl output"
            ),
            (_, None) => anyhow::bail!(
                "--dlq-url (or CRR_DLQ_URL) is needed: the deployment's DeadLetterQueueUrl output"
            ),
        }
    }
}

/// The scheme and host of a queue URL when it is not AWS's (a local stack's queue is
/// reached at its own host), `None` for AWS's endpoints.
pub fn queue_endpoint(queue_url: &str) -> Option<String> {
    let (scheme, rest) = queue_url.split_once("://")?;
    let host = rest.split('/').next()?;
    (!host.ends_with(".amazonaws.com") && !host.ends_with(".amazonaws.com.cn"))
        .then(|| format!("{scheme}://{host}"))
}

#[derive(Subcommand)]
enum Command {
    /// Create, list, show and delete replication rules.
    #[command(subcommand)]
    Rule(rule_cmd::RuleCommand),
    /// Create the state table if it does not exist (local stacks; deployments get it from
    /// infra/), and record the deployment that `crr rule create` and `crr status` hold rules to.
    #[command(
        name = "init-table",
        after_help = "Examples:\n  crr --endpoint-url http://127.0.0.1:25103 init-table\n  crr --region us-east-1 --table crr-StateTable-X init-table \\\n    --source-buckets photos-us,logs-us --target-buckets photos-eu,logs-eu \\\n    --allowed-endpoints https://oss-cn-hangzhou.aliyuncs.com"
    )]
    InitTable(deployment_cmd::InitTableArgs),
    /// Historical migration: start, pause, or dry-run a rule's backfill.
    #[command(subcommand)]
    Backfill(backfill_cmd::BackfillCommand),
    /// Move failed events from the dead-letter queue back to the event queue.
    #[command(
        after_help = "Example:\n  crr redrive --rule photos --max 100 --queue-url URL --dlq-url URL"
    )]
    Redrive(redrive_cmd::RedriveArgs),
    /// List the deletes a `write` rule kept from reaching the target.
    #[command(after_help = "Example:\n  crr suppressed photos --json")]
    Suppressed {
        rule: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Progress of every rule (or one): real-time lag and counters, historical percent.
    #[command(
        after_help = "Examples:\n  crr status\n  crr status photos --watch --queue-url URL --dlq-url URL\n  crr status photos --json | jq .rules[0].historical.percent_bytes\n  crr status photos --json --series 24h | jq .rules[0].series.points[-1]\n\nThe JSON is the status function's; its fields are documented in the README (Status)."
    )]
    Status(status_cmd::StatusArgs),
    /// Compare a rule's source and target: missing, extra and different objects (exit 1 on drift).
    #[command(
        after_help = "Examples:\n  crr verify photos\n  crr verify photos --checksum --json > drift.jsonl"
    )]
    Verify(verify_cmd::VerifyArgs),
    /// The web console: rules, live progress and charts, the create dialog, and actions,
    /// served on 127.0.0.1 with your credentials.
    #[command(
        after_help = "Examples:\n  crr console --open\n  crr console --listen 127.0.0.1:9000 --queue-url URL --dlq-url URL"
    )]
    Console(console::ConsoleArgs),
    /// Local development: the local stack, and function binaries behind a Lambda Runtime API emulator.
    #[command(subcommand)]
    Local(local::LocalCommand),
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CRR_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = run(cli).await;
    if let Err(err) = result {
        // One line: the error and its causes, joined.
        let chain: Vec<String> = err.chain().map(|c| c.to_string()).collect();
        eprintln!("crr: error: {}", chain.join(": "));
        std::process::exit(2);
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Rule(cmd) => rule_cmd::run(&cli.aws, cmd).await,
        Command::InitTable(args) => deployment_cmd::init_table(&cli.aws, args).await,
        Command::Local(cmd) => local::run(&cli.aws, cmd).await,
        Command::Backfill(cmd) => backfill_cmd::run(&cli.aws, cmd).await,
        Command::Redrive(args) => redrive_cmd::redrive_cmd(&cli.aws, args).await,
        Command::Suppressed { rule, json } => {
            redrive_cmd::suppressed_cmd(&cli.aws, &rule, json).await
        }
        Command::Status(args) => status_cmd::run(&cli.aws, args).await,
        Command::Console(args) => console::run(&cli.aws, args).await,
        Command::Verify(args) => {
            if verify_cmd::run(&cli.aws, args).await? {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}
