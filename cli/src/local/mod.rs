//! `crr local ...`: running the functions on this machine as real Lambda binaries.

mod demo;
mod instances;
mod poller;
mod runtime_api;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;

use crate::AwsArgs;

#[derive(Subcommand)]
pub enum LocalCommand {
    /// Start the local stack: moto per region (S3, SQS, EventBridge), DynamoDB Local,
    /// s3s-fs, on 127.0.0.1 (runs the project's scripts/local-stack; installs what is missing).
    #[command(after_help = "Example:\n  crr local up && eval \"$(scripts/local-stack env)\"")]
    Up,
    /// Stop the local stack (by the PIDs it recorded).
    #[command(after_help = "Example:\n  crr local down")]
    Down,
    /// Whether each local service is running.
    #[command(after_help = "Example:\n  crr local status")]
    Status,
    /// Deploy infra/template.yaml into the local stack's moto (region A) as a
    /// CloudFormation stack, as `sam deploy` would into AWS (runs the project's
    /// scripts/deploy-local: builds, zips and uploads the functions, expands the SAM
    /// template, waits for CREATE_COMPLETE, prints the outputs as JSON). Every argument
    /// goes to the script (`crr local deploy --help-script` shows them).
    #[command(
        after_help = "Examples:\n  crr local deploy --source-buckets photos-us --target-buckets photos-eu\n  crr local deploy --delete"
    )]
    Deploy {
        /// Arguments of scripts/deploy-local (--source-buckets, --target-buckets,
        /// --stack-name, --param KEY=VALUE, --no-build, --delete, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run a function binary behind a Lambda Runtime API emulator on 127.0.0.1; with
    /// --queue-url, also poll that SQS queue and invoke the function with its batches
    /// (deleting the messages the function did not report as failed), as Lambda's SQS
    /// event source mapping does. --instances N runs N processes of the binary, each
    /// behind its own emulator, fed by N pollers (a mapping's MaximumConcurrency N).
    #[command(
        after_help = "Examples:\n  crr local run-function --name replicate --binary target/debug/crr-replicate \\\n    --queue-url http://127.0.0.1:25101/123456789012/crr-events --env CRR_TABLE=crr\n  crr local run-function --name backfill --binary target/debug/crr-backfill --instances 4 \\\n    --batch-size 1 --queue-url http://127.0.0.1:25101/123456789012/crr-segments --schedule-secs 60 \\\n    --env CRR_SEGMENT_QUEUE_URL=http://127.0.0.1:25101/123456789012/crr-segments --env CRR_TABLE=crr"
    )]
    RunFunction(RunFunctionArgs),
    /// Replicate between two buckets in two regions of the local stack and show the result
    /// (needs `scripts/local-stack up`; scripts/demo does everything).
    #[command(after_help = "Example:\n  eval \"$(scripts/local-stack env)\"; crr local demo")]
    Demo,
}

#[derive(clap::Args)]
pub struct RunFunctionArgs {
    /// Function name (reported to the function as AWS_LAMBDA_FUNCTION_NAME).
    #[arg(long)]
    pub name: String,
    /// The function's executable.
    #[arg(long)]
    pub binary: PathBuf,
    /// Port of the first instance's emulator (its Runtime API, and the function's Invoke
    /// API); 0 picks a free one. Other instances listen on free ports.
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Processes of the function, each behind its own Runtime API emulator, as Lambda
    /// runs one execution environment per invocation in flight. An invocation (from a
    /// poller, the schedule or the Invoke API on any instance's port) goes to an idle
    /// instance. With --queue-url, this many pollers each keep one batch in flight.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub instances: u16,
    /// Seconds an invocation may run before it is failed and the process restarted.
    #[arg(long, default_value_t = 30)]
    pub timeout_secs: u64,
    /// Extra environment for the function, KEY=VALUE (repeatable).
    #[arg(long = "env")]
    pub envs: Vec<String>,
    /// SQS queue to feed the function from.
    #[arg(long)]
    pub queue_url: Option<String>,
    /// SQS endpoint (defaults to the queue URL's scheme, host and port).
    #[arg(long)]
    pub sqs_endpoint_url: Option<String>,
    /// Messages per invocation (SQS allows up to 10 per receive).
    #[arg(long, default_value_t = 10)]
    pub batch_size: i32,
    /// Invoke the function with `{}` every this many seconds, as an EventBridge schedule
    /// does the backfill function (one invocation at a time, on one instance).
    #[arg(long)]
    pub schedule_secs: Option<f64>,
}

pub async fn run(aws: &AwsArgs, cmd: LocalCommand) -> Result<()> {
    match cmd {
        LocalCommand::RunFunction(args) => run_function(aws, args).await,
        LocalCommand::Demo => demo::run(aws).await,
        LocalCommand::Up => run_script("local-stack", &["up".into()]),
        LocalCommand::Down => run_script("local-stack", &["down".into()]),
        LocalCommand::Status => run_script("local-stack", &["status".into()]),
        LocalCommand::Deploy { args } => {
            // The script's own help, not clap's, describes its options.
            let mut args: Vec<String> = args
                .into_iter()
                .map(|a| {
                    if a == "--help-script" {
                        "--help".into()
                    } else {
                        a
                    }
                })
                .collect();
            // `--region` is crr's own (global) option: the deployment's region, which is
            // the stack's.
            if let Some(region) = &aws.region {
                args.extend(["--region".to_string(), region.clone()]);
            }
            run_script("deploy-local", &args)
        }
    }
}

/// Runs `scripts/NAME ARGS` of the crr checkout this command runs in (`CRR_HOME`, or the
/// nearest parent of the current directory that has the script).
fn run_script(name: &str, args: &[String]) -> Result<()> {
    let script = find_script(name).with_context(|| {
        format!("scripts/{name} not found: run crr inside a crr checkout, or set CRR_HOME to one")
    })?;
    let status = std::process::Command::new(&script)
        .args(args)
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!("{} {} failed ({status})", script.display(), args.join(" "));
    }
    Ok(())
}

fn find_script(name: &str) -> Option<PathBuf> {
    let start = match std::env::var_os("CRR_HOME") {
        Some(home) => PathBuf::from(home),
        None => std::env::current_dir().ok()?,
    };
    start
        .ancestors()
        .map(|dir| dir.join("scripts").join(name))
        .find(|p| p.is_file())
}

fn parse_envs(envs: &[String]) -> Result<Vec<(String, String)>> {
    envs.iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => bail!("--env '{kv}' is not KEY=VALUE"),
        })
        .collect()
}

async fn run_function(aws: &AwsArgs, args: RunFunctionArgs) -> Result<()> {
    if !args.binary.is_file() {
        bail!(
            "--binary {}: no such file (build it with `cargo build --bins`)",
            args.binary.display()
        );
    }
    let envs = parse_envs(&args.envs)?;
    let timeout = Duration::from_secs(args.timeout_secs);
    let count = usize::from(args.instances);
    let function = instances::Instances::start(&args.name, count, args.port, timeout)
        .await
        .context("starting the Runtime API emulators")?;
    for (i, addr) in function.addrs().into_iter().enumerate() {
        eprintln!(
            "crr local: {} instance {i}: Runtime API and Invoke API on http://{addr}",
            args.name
        );
    }
    let supervisors: Vec<_> = function
        .emulators()
        .iter()
        .map(|emulator| {
            tokio::spawn(runtime_api::supervise(
                emulator.clone(),
                args.binary.clone(),
                envs.clone(),
            ))
        })
        .collect();
    let mut feeders = Vec::new();
    if let Some(url) = &args.queue_url {
        let sdk = aws.sdk_config().await;
        for _ in 0..count {
            feeders.push(tokio::spawn(poller::run(
                sdk.clone(),
                function.clone(),
                url.clone(),
                args.sqs_endpoint_url.clone(),
                args.batch_size,
            )));
        }
    }
    if let Some(secs) = args.schedule_secs {
        let function = function.clone();
        let every = Duration::from_secs_f64(secs.max(0.1));
        feeders.push(tokio::spawn(async move {
            loop {
                let result = function.invoke(axum::body::Bytes::from_static(b"{}")).await;
                tracing::info!(?result, "scheduled invocation finished");
                tokio::time::sleep(every).await;
            }
        }));
    }
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = sigterm.recv() => {}
    }
    for task in feeders {
        task.abort();
    }
    function.shutdown();
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        futures::future::join_all(supervisors),
    )
    .await;
    Ok(())
}
