//! `crr backfill start|pause|plan`: the historical migration of a rule.

use std::sync::Arc;

use anyhow::Result;
use clap::Subcommand;
use crr_shared::backfill::{BackfillSettings, Backfiller, dry_run};
use crr_shared::copy::CopyEngine;
use crr_shared::object_store::ObjectStore;
use crr_shared::s3::S3Clients;
use crr_shared::state::RuleStore;

use crate::AwsArgs;

#[derive(Subcommand)]
pub enum BackfillCommand {
    /// Request (or resume) the historical migration; the backfill function does the work.
    #[command(after_help = "Example:\n  crr backfill start photos")]
    Start { rule: String },
    /// Pause it: workers stop after their current page; `start` resumes.
    #[command(after_help = "Example:\n  crr backfill pause photos")]
    Pause { rule: String },
    /// Dry run: what would be copied, and which target objects would be overwritten.
    #[command(after_help = "Example:\n  crr backfill plan photos --json")]
    Plan {
        rule: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(aws: &AwsArgs, cmd: BackfillCommand) -> Result<()> {
    let sdk = aws.sdk_config().await;
    let state = Arc::new(aws.state(&sdk).await);
    let clients = S3Clients::new(sdk);
    let backfiller = Backfiller::new(
        state.clone(),
        state.clone(),
        Arc::new(clients.clone()),
        CopyEngine::default(),
        BackfillSettings::default(),
    );
    match cmd {
        BackfillCommand::Start { rule } => {
            let job = backfiller.start(&rule).await?;
            println!("backfill of rule {rule}: {}", job.state.as_str());
        }
        BackfillCommand::Pause { rule } => {
            backfiller.pause(&rule).await?;
            println!("backfill of rule {rule}: paused");
        }
        BackfillCommand::Plan { rule, json } => {
            let rule = state
                .get_rule(&rule)
                .await?
                .ok_or_else(|| crr_shared::Error::RuleNotFound(rule.clone()))?;
            let source = clients.store(&rule.source);
            let target = clients.store(&rule.target);
            let report = dry_run(
                &rule,
                &source as &dyn ObjectStore,
                &target as &dyn ObjectStore,
                1000,
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
                return Ok(());
            }
            println!(
                "{} objects ({} bytes) in scope: {} to copy ({} bytes), {} already in place, {} conflicts kept (on_conflict {:?})",
                report.objects,
                report.bytes,
                report.to_copy,
                report.bytes_to_copy,
                report.in_place,
                report.kept,
                rule.on_conflict
            );
            if report.overwrites.is_empty() {
                println!("no target object would be overwritten");
            } else {
                println!(
                    "{} target object(s) would be overwritten:",
                    report.overwrites.len()
                );
                println!(
                    "{:<40} {:>12} {:>12}  {:<34} {:<34} {:<25} {:<25}",
                    "key",
                    "source size",
                    "target size",
                    "source etag",
                    "target etag",
                    "source modified",
                    "target modified"
                );
                for c in &report.overwrites {
                    let t = |d: Option<chrono::DateTime<chrono::Utc>>| {
                        d.map(|d| d.to_rfc3339()).unwrap_or_else(|| "-".into())
                    };
                    println!(
                        "{:<40} {:>12} {:>12}  {:<34} {:<34} {:<25} {:<25}",
                        c.key,
                        c.source_size,
                        c.target_size,
                        c.source_etag,
                        c.target_etag,
                        t(c.source_last_modified),
                        t(c.target_last_modified)
                    );
                }
            }
        }
    }
    Ok(())
}
