//! `crr init-table [--source-buckets ...]`: the state table, and the deployment record the
//! CLI holds rules to (see `crr_shared::deployment`).

use anyhow::{Context, Result};
use crr_shared::allowed::{ALLOWED_ENDPOINTS_ENV, AllowedEndpoints};
use crr_shared::deployment::Deployment;
use crr_shared::dynamo::DynamoStore;
use crr_shared::rule::Rule;
use crr_shared::state::RuleStore;

use crate::AwsArgs;

/// With any of these, `init-table` also records the deployment.
#[derive(clap::Args, Debug, Default)]
pub struct InitTableArgs {
    /// The stack's SourceBuckets, comma-separated: `crr rule create` refuses other sources.
    #[arg(long, value_delimiter = ',')]
    source_buckets: Option<Vec<String>>,
    /// The stack's TargetBuckets, comma-separated: `crr rule create` refuses other targets.
    #[arg(long, value_delimiter = ',')]
    target_buckets: Option<Vec<String>>,
    /// The stack's AllowedEndpoints, comma-separated `scheme://host[:port]` (host may
    /// start with `*.`, port may be `*`); without it: AWS endpoints only.
    #[arg(long, value_delimiter = ',')]
    allowed_endpoints: Option<Vec<String>>,
}

impl InitTableArgs {
    fn records(&self) -> bool {
        self.source_buckets.is_some()
            || self.target_buckets.is_some()
            || self.allowed_endpoints.is_some()
    }
}

fn names(list: &Option<Vec<String>>) -> Option<Vec<String>> {
    let names: Vec<String> = list
        .iter()
        .flatten()
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .collect();
    (!names.is_empty()).then_some(names)
}

pub async fn init_table(aws: &AwsArgs, args: InitTableArgs) -> Result<()> {
    let sdk = aws.sdk_config().await;
    let state = aws.state(&sdk).await;
    state.ensure_table().await?;
    println!("table {} is ready", state.table());
    if !args.records() {
        return Ok(());
    }
    let region = sdk
        .region()
        .map(|r| r.to_string())
        .context("the deployment record needs the deployment's region: pass --region")?;
    let endpoints = args.allowed_endpoints.clone().unwrap_or_default();
    // Refused here rather than allowing nothing later.
    AllowedEndpoints::from_entries(endpoints.iter().map(String::as_str))?;
    let deployment = Deployment {
        region: Some(region),
        source_buckets: names(&args.source_buckets),
        target_buckets: names(&args.target_buckets),
        allowed_endpoints: endpoints
            .iter()
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect(),
        recorded_at: Some(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
    };
    state.put_deployment(&deployment).await?;
    println!("{}", describe(&deployment));
    Ok(())
}

/// The deployment record, in one line.
pub fn describe(d: &Deployment) -> String {
    let list = |l: &Option<Vec<String>>| l.as_ref().map_or("(any)".into(), |l| l.join(", "));
    format!(
        "deployment: region {}, source buckets {}, target buckets {}, endpoints: {}",
        d.region.as_deref().unwrap_or("(unknown)"),
        list(&d.source_buckets),
        list(&d.target_buckets),
        d.endpoints().describe()
    )
}

/// What the CLI holds rules to: the table's deployment record, or else the endpoints of
/// its own `CRR_ALLOWED_ENDPOINTS` (unset: AWS only; region and buckets unknown).
pub async fn known(state: &DynamoStore) -> Result<Deployment> {
    if let Some(recorded) = state.deployment().await? {
        return Ok(recorded);
    }
    fallback()
}

/// Refuses, before any request, a rule naming an endpoint the deployment does not allow:
/// the CLI contacts a rule's endpoints with the operator's credentials.
pub async fn check_endpoints(state: &DynamoStore, rule: &Rule) -> Result<()> {
    known(state).await?.endpoints().check(rule)?;
    Ok(())
}

/// The CLI's own view when the table holds no record.
pub fn fallback() -> Result<Deployment> {
    let value = std::env::var(ALLOWED_ENDPOINTS_ENV).unwrap_or_default();
    let endpoints = AllowedEndpoints::parse(&value)?;
    Ok(Deployment {
        allowed_endpoints: endpoints.entries(),
        ..Deployment::default()
    })
}
