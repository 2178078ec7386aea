//! `crr rule ...`: create, list, show, update and delete replication rules.

use anyhow::Result;
use clap::{Subcommand, ValueEnum};
use crr_shared::adapters::s3::S3Clients;
use crr_shared::rate_limit::format_rate;
use crr_shared::rule::{BucketRef, CopyMode, Notify, OnConflict, Policy, Rule};
use crr_shared::state::RuleStore;
use crr_shared::{Error, rule_admin};

use crate::AwsArgs;

#[derive(Subcommand)]
pub enum RuleCommand {
    /// Create a rule: validate it, hold it to the deployment (`crr init-table`'s record: region,
    /// buckets, endpoints), claim both buckets, turn on source notifications.
    #[command(
        after_help = "Example:\n  crr rule create --id photos --source-bucket photos-us --source-region us-east-1 \\\n    --target-bucket photos-eu --target-region eu-west-1 --prefix img/ --policy write\n\nWithout a deployment record in the table, custom endpoints (--source-endpoint-url,\n--target-endpoint-url) must be listed in CRR_ALLOWED_ENDPOINTS, as for the functions."
    )]
    Create(Box<CreateArgs>),
    /// List all rules.
    #[command(after_help = "Example:\n  crr rule list --json")]
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one rule.
    #[command(after_help = "Example:\n  crr rule show photos")]
    Show {
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change a rule's rate limits for its historical migration (`none` removes a limit).
    #[command(
        after_help = "Example:\n  crr rule update photos --max-objects-per-second 500 --max-bandwidth 200MiB/s\n  crr rule update photos --max-bandwidth none\n\nThe limits hold over every backfill invocation together; invocations already running\nkeep the old limits until they end (at most the function's timeout)."
    )]
    Update(UpdateArgs),
    /// Pause a rule: its events wait (in the queue, then the DLQ) until it is resumed.
    #[command(after_help = "Example:\n  crr rule pause photos")]
    Pause { id: String },
    /// Resume a paused rule (then `crr redrive --rule ID` replays what waited in the DLQ).
    #[command(after_help = "Example:\n  crr rule resume photos")]
    Resume { id: String },
    /// Delete a rule: turn off its notifications and release its buckets.
    #[command(after_help = "Example:\n  crr rule delete photos")]
    Delete { id: String },
}

/// `crr rule update`'s arguments.
#[derive(clap::Args)]
pub struct UpdateArgs {
    id: String,
    /// Most objects per second the migration writes, or `none`.
    #[arg(long, value_name = "N|none")]
    max_objects_per_second: Option<String>,
    /// Most bytes per second the migration copies (200MiB/s, 1.5GB/s, 500KiB/s), or `none`.
    #[arg(long, value_name = "RATE|none")]
    max_bandwidth: Option<String>,
    /// Print the updated rule as JSON.
    #[arg(long)]
    json: bool,
}

// Limits are parsed here rather than by clap, so that a bad one is refused like any
// other rule field: one line naming the field.

/// `--max-objects-per-second` (`none`, for `update`: no limit).
fn objects_limit(text: &str) -> Result<Option<u64>, Error> {
    if text.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    text.trim()
        .parse::<u64>()
        .map(Some)
        .map_err(|_| Error::InvalidRule {
            field: "max_objects_per_second".into(),
            reason: format!("'{text}' is not a whole number of objects per second"),
        })
}

/// `--max-bandwidth` (`none`, for `update`: no limit).
fn bandwidth_limit(text: &str) -> Result<Option<u64>, Error> {
    if text.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    crr_shared::rate_limit::parse_rate("max_bandwidth", text).map(Some)
}

#[derive(Clone, Copy, ValueEnum)]
enum PolicyArg {
    Full,
    Write,
}

#[derive(Clone, Copy, ValueEnum)]
enum OnConflictArg {
    Overwrite,
    Skip,
    Newer,
}

#[derive(Clone, Copy, ValueEnum)]
enum CopyModeArg {
    Auto,
    ServerSide,
    Stream,
}

#[derive(clap::Args)]
pub struct CreateArgs {
    /// Rule id: letters, digits, '-' and '_'.
    #[arg(long)]
    id: String,
    #[arg(long)]
    source_bucket: String,
    #[arg(long)]
    source_region: String,
    /// S3 endpoint of the source, when not AWS (S3-compatible or local servers).
    #[arg(long)]
    source_endpoint_url: Option<String>,
    /// Path-style addressing for the source.
    #[arg(long)]
    source_path_style: bool,
    #[arg(long)]
    target_bucket: String,
    #[arg(long)]
    target_region: String,
    #[arg(long)]
    target_endpoint_url: Option<String>,
    #[arg(long)]
    target_path_style: bool,
    /// Key prefix to replicate (repeat up to 5 times); none means all objects.
    #[arg(long = "prefix")]
    prefixes: Vec<String>,
    /// `full` replicates deletes too; `write` only creates and overwrites.
    #[arg(long, value_enum, default_value = "full")]
    policy: PolicyArg,
    /// Also migrate objects that existed before the rule.
    #[arg(long)]
    historical: bool,
    /// What the historical migration does with same-named target objects.
    #[arg(long, value_enum, default_value = "overwrite")]
    on_conflict: OnConflictArg,
    #[arg(long, value_enum, default_value = "auto")]
    copy_mode: CopyModeArg,
    /// Storage class of the replicas (default: the source object's).
    #[arg(long)]
    storage_class: Option<String>,
    /// Do not carry canned ACLs (public-read...) to the replicas.
    #[arg(long)]
    no_copy_acl: bool,
    /// KMS key id or ARN in the target region, for replicas of SSE-KMS objects.
    #[arg(long)]
    target_kms_key_id: Option<String>,
    /// Most objects per second the historical migration writes, over all its invocations.
    #[arg(long, value_name = "N")]
    max_objects_per_second: Option<String>,
    /// Most bytes per second the historical migration copies, over all its invocations
    /// (200MiB/s, 1.5GB/s, 500KiB/s, 10MB/s).
    #[arg(long, value_name = "RATE")]
    max_bandwidth: Option<String>,
    /// Deliver source events straight to this SQS queue instead of through EventBridge.
    #[arg(long, conflicts_with = "notify_external")]
    notify_queue_arn: Option<String>,
    /// Leave the source's notification configuration alone: events are delivered by the
    /// provider's own mechanism (S3-compatible providers) or a pipeline of yours.
    #[arg(long)]
    notify_external: bool,
    /// Create the rule even if its source or target is outside the deployment's region or
    /// bucket lists (warns instead of refusing); an endpoint not allowed is still refused.
    #[arg(long)]
    force: bool,
    /// Print the created rule as JSON.
    #[arg(long)]
    json: bool,
}

impl CreateArgs {
    fn into_rule(self) -> Result<Rule, Error> {
        let max_objects_per_second = match &self.max_objects_per_second {
            Some(text) if !text.eq_ignore_ascii_case("none") => objects_limit(text)?,
            _ => None,
        };
        let max_bandwidth = match &self.max_bandwidth {
            Some(text) if !text.eq_ignore_ascii_case("none") => bandwidth_limit(text)?,
            _ => None,
        };
        Ok(Rule {
            id: self.id,
            source: BucketRef {
                bucket: self.source_bucket,
                region: self.source_region,
                endpoint_url: self.source_endpoint_url,
                path_style: self.source_path_style,
            },
            target: BucketRef {
                bucket: self.target_bucket,
                region: self.target_region,
                endpoint_url: self.target_endpoint_url,
                path_style: self.target_path_style,
            },
            prefixes: self.prefixes,
            policy: match self.policy {
                PolicyArg::Full => Policy::Full,
                PolicyArg::Write => Policy::Write,
            },
            historical: self.historical,
            on_conflict: match self.on_conflict {
                OnConflictArg::Overwrite => OnConflict::Overwrite,
                OnConflictArg::Skip => OnConflict::Skip,
                OnConflictArg::Newer => OnConflict::Newer,
            },
            copy_mode: match self.copy_mode {
                CopyModeArg::Auto => CopyMode::Auto,
                CopyModeArg::ServerSide => CopyMode::ServerSide,
                CopyModeArg::Stream => CopyMode::Stream,
            },
            notify: match (self.notify_queue_arn, self.notify_external) {
                (Some(arn), _) => Notify::Queue { arn },
                (None, true) => Notify::External,
                (None, false) => Notify::EventBridge,
            },
            storage_class: self.storage_class,
            copy_acl: !self.no_copy_acl,
            target_kms_key_id: self.target_kms_key_id,
            max_objects_per_second,
            max_bandwidth,
            paused: false,
            created_at: String::new(),
        })
    }
}

fn describe(rule: &Rule) -> String {
    let prefixes = if rule.prefixes.is_empty() {
        "(all objects)".to_string()
    } else {
        rule.prefixes.join(", ")
    };
    let limits = match (rule.max_objects_per_second, rule.max_bandwidth) {
        (None, None) => String::new(),
        (objects, bytes) => format!(
            "\n  migration limits: {}, {}",
            objects.map_or("no object limit".to_string(), |n| format!("{n} objects/s")),
            bytes.map_or("no bandwidth limit".to_string(), format_rate),
        ),
    };
    format!(
        "{id}: s3://{sb} ({sr}) -> s3://{tb} ({tr})\n  prefixes: {prefixes}\n  policy: {policy:?}, historical: {hist}, on_conflict: {oc:?}, copy_mode: {cm:?}{paused}{limits}",
        id = rule.id,
        sb = rule.source.bucket,
        sr = rule.source.region,
        tb = rule.target.bucket,
        tr = rule.target.region,
        policy = rule.policy,
        hist = rule.historical,
        oc = rule.on_conflict,
        cm = rule.copy_mode,
        paused = if rule.paused { ", PAUSED" } else { "" },
    )
}

pub async fn run(aws: &AwsArgs, cmd: RuleCommand) -> Result<()> {
    let sdk = aws.sdk_config().await;
    let state = aws.state(&sdk).await;
    match cmd {
        RuleCommand::Create(args) => {
            let json = args.json;
            let options = rule_admin::CreateOptions {
                force: args.force,
                fallback: Some(crate::deployment_cmd::fallback()?),
            };
            let s3 = S3Clients::new(sdk);
            let created =
                rule_admin::create_rule_with(&state, &s3, args.into_rule()?, &options).await?;
            for warning in &created.warnings {
                eprintln!("crr: warning (--force): {warning}");
            }
            let rule = created.rule;
            if json {
                println!("{}", serde_json::to_string_pretty(&rule)?);
            } else {
                println!("created rule {}", describe(&rule));
            }
        }
        RuleCommand::List { json } => {
            let rules = state.list_rules().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rules)?);
            } else if rules.is_empty() {
                println!("no rules");
            } else {
                for rule in &rules {
                    println!("{}", describe(rule));
                }
            }
        }
        RuleCommand::Show { id, json } => {
            let rule = state.get_rule(&id).await?.ok_or(Error::RuleNotFound(id))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rule)?);
            } else {
                println!("{}", describe(&rule));
            }
        }
        RuleCommand::Update(args) => {
            let update = rule_admin::LimitsUpdate {
                max_objects_per_second: args
                    .max_objects_per_second
                    .as_deref()
                    .map(objects_limit)
                    .transpose()?,
                max_bandwidth: args
                    .max_bandwidth
                    .as_deref()
                    .map(bandwidth_limit)
                    .transpose()?,
            };
            if update == rule_admin::LimitsUpdate::default() {
                anyhow::bail!(
                    "nothing to change: give --max-objects-per-second and/or --max-bandwidth"
                );
            }
            let rule = rule_admin::update_limits(&state, &args.id, update).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&rule)?);
            } else {
                println!("updated rule {}", describe(&rule));
            }
        }
        RuleCommand::Pause { id } => set_paused(&state, &id, true).await?,
        RuleCommand::Resume { id } => set_paused(&state, &id, false).await?,
        RuleCommand::Delete { id } => {
            let s3 = S3Clients::new(sdk);
            let fallback = crate::deployment_cmd::fallback()?;
            let rule = rule_admin::delete_rule_with(&state, &s3, &id, Some(fallback)).await?;
            println!("deleted rule {}", rule.id);
        }
    }
    Ok(())
}

async fn set_paused(state: &dyn RuleStore, id: &str, paused: bool) -> Result<()> {
    rule_admin::set_paused(state, id, paused).await?;
    // The replicate function re-reads rules within 30 seconds.
    println!("rule {id} {}", if paused { "paused" } else { "resumed" });
    Ok(())
}
