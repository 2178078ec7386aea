//! `crr backfill start|pause|run|plan|failures|retry-failed|segments`: the historical migration of
//! a rule.

use std::sync::Arc;

use anyhow::Result;
use clap::Subcommand;
use crr_shared::adapters::s3::S3Clients;
use crr_shared::backfill::{BackfillSettings, BackfillStore, Backfiller, JobState, dry_run};
use crr_shared::copy::CopyEngine;
use crr_shared::object_store::ObjectStore;
use crr_shared::state::RuleStore;

use crate::AwsArgs;

#[derive(Subcommand)]
pub enum BackfillCommand {
    /// Request (or resume) the historical migration; the backfill function does the work.
    #[command(
        after_help = "Examples:\n  crr backfill start photos\n  crr backfill start photos --inventory s3://photos-inventory/photos/daily/2026-12-01T01-00Z/manifest.json"
    )]
    Start {
        rule: String,
        /// Read the objects to migrate from this S3 Inventory report (its manifest.json,
        /// CSV format) instead of listing the source; read with the source's endpoint and
        /// credentials.
        #[arg(long, value_name = "s3://BUCKET/KEY/manifest.json")]
        inventory: Option<String>,
    },
    /// Pause it: workers stop after their current page; `start` resumes.
    #[command(after_help = "Example:\n  crr backfill pause photos")]
    Pause { rule: String },
    /// Run the migration in this process until it completes (the backfill function's code;
    /// for a first sync from an operator's machine, and for benchmarks).
    #[command(after_help = "Example:\n  crr backfill run photos --workers 4 --copy-concurrency 32")]
    Run {
        rule: String,
        /// Segments worked on at once.
        #[arg(long, default_value_t = 4)]
        workers: usize,
        /// Copies at once per worker.
        #[arg(long, default_value_t = 16)]
        copy_concurrency: usize,
        /// Objects per key-range segment (smaller: more parallel segments).
        #[arg(long, default_value_t = 10_000)]
        segment_objects: u64,
        /// Keys per listing page.
        #[arg(long, default_value_t = 1000)]
        page_size: i32,
        /// Read the objects from this S3 Inventory report instead of listing (as `start`).
        #[arg(long, value_name = "s3://BUCKET/KEY/manifest.json")]
        inventory: Option<String>,
    },
    /// List the objects the migration could not copy, with their reason codes (README
    /// "Failure reasons").
    #[command(after_help = "Example:\n  crr backfill failures photos --json")]
    Failures {
        rule: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Try the failed objects again in this process (after a restore, or a permission
    /// fixed): those copied leave the list; a job `completed_with_failures` whose list
    /// empties becomes `completed`.
    #[command(after_help = "Example:\n  crr backfill retry-failed photos")]
    RetryFailed {
        rule: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Report every key-range segment of the job (range, checkpoint, lease, counters) and
    /// check the job's totals against the segments' sums. The one command that reads every
    /// segment item: claims and status read only the job item.
    #[command(after_help = "Example:\n  crr backfill segments photos --json")]
    Segments {
        rule: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Dry run: what would be copied, and which target objects would be overwritten.
    #[command(after_help = "Example:\n  crr backfill plan photos --json")]
    Plan {
        rule: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// The backfill's code with the CLI's memory budget, checkpointing large copies in the
/// table.
pub fn backfiller(
    state: Arc<crr_shared::dynamo::DynamoStore>,
    clients: S3Clients,
    settings: BackfillSettings,
) -> crr_shared::Result<Backfiller> {
    Ok(Backfiller::new(
        state.clone(),
        state.clone(),
        Arc::new(clients),
        CopyEngine {
            memory: crr_shared::config::object_memory()?,
            ..CopyEngine::default()
        },
        settings,
    )
    .with_uploads(state.clone())
    .with_rate_store(state))
}

pub async fn run(aws: &AwsArgs, cmd: BackfillCommand) -> Result<()> {
    let sdk = aws.sdk_config().await;
    let state = Arc::new(aws.state(&sdk).await);
    let clients = S3Clients::new(sdk);
    let settings = match &cmd {
        BackfillCommand::Run {
            workers,
            copy_concurrency,
            segment_objects,
            page_size,
            ..
        } => BackfillSettings {
            workers: (*workers).max(1),
            copy_concurrency: (*copy_concurrency).max(1),
            segment_objects: (*segment_objects).max(1),
            page_size: (*page_size).clamp(1, 1000),
            // Held to the deployment as the backfill function is.
            allowed: crate::deployment_cmd::known(&state).await?.allowed(),
            ..BackfillSettings::default()
        },
        _ => BackfillSettings::default(),
    };
    let backfiller = backfiller(state.clone(), clients.clone(), settings)?;
    match cmd {
        BackfillCommand::Run {
            rule, inventory, ..
        } => {
            let started = std::time::Instant::now();
            backfiller.start_from(&rule, inventory.as_deref()).await?;
            let owner = format!("crr-cli-{}", uuid::Uuid::new_v4().simple());
            let mut total = crr_shared::backfill::RunReport::default();
            loop {
                // Long "invocations": the deadline only bounds how long a lease is held.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
                for report in backfiller.run(Some(&rule), &owner, deadline).await? {
                    total.add(&report);
                }
                match state.job(&rule).await?.map(|j| j.state) {
                    Some(s) if s.is_finished() => break,
                    Some(JobState::Paused) => anyhow::bail!("the backfill of {rule} was paused"),
                    _ => {}
                }
            }
            let secs = started.elapsed().as_secs_f64();
            let objects =
                total.copied + total.fixed + total.in_place + total.skipped + total.failed;
            println!(
                "backfill of rule {rule}: completed in {secs:.2} s, {} copied, {} fixed, {} in place, {} skipped, {} failed ({:.0} objects/s)",
                total.copied,
                total.fixed,
                total.in_place,
                total.skipped,
                total.failed,
                objects as f64 / secs.max(1e-9)
            );
            if total.failed > 0 {
                println!("failed objects: `crr backfill failures {rule}`");
            }
        }
        BackfillCommand::Start { rule, inventory } => {
            let job = backfiller.start_from(&rule, inventory.as_deref()).await?;
            match &job.inventory {
                Some(url) => println!(
                    "backfill of rule {rule}: {} (from the inventory {url})",
                    job.state.as_str()
                ),
                None => println!("backfill of rule {rule}: {}", job.state.as_str()),
            }
        }
        BackfillCommand::Pause { rule } => {
            backfiller.pause(&rule).await?;
            println!("backfill of rule {rule}: paused");
        }
        BackfillCommand::Failures { rule, json } => {
            state
                .get_rule(&rule)
                .await?
                .ok_or_else(|| crr_shared::Error::RuleNotFound(rule.clone()))?;
            let failed = state.failures(&rule).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&failed)?);
                return Ok(());
            }
            if failed.is_empty() {
                println!("backfill of rule {rule}: no failed objects");
                return Ok(());
            }
            println!(
                "{:<40} {:>12} {:<32} {:>8}  {:<24}  message",
                "key", "size", "reason", "attempts", "last try"
            );
            for f in &failed {
                println!(
                    "{:<40} {:>12} {:<32} {:>8}  {:<24}  {}",
                    f.key,
                    f.size,
                    f.reason.as_str(),
                    f.attempts,
                    f.last_try
                        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    f.message
                );
            }
            println!(
                "{} failed object(s); `crr backfill retry-failed {rule}` tries them again",
                failed.len()
            );
        }
        BackfillCommand::Segments { rule, json } => segments_report(&state, &rule, json).await?,
        BackfillCommand::RetryFailed { rule, json } => {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3600);
            let report = backfiller.retry_failed(&rule, deadline).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
                return Ok(());
            }
            println!(
                "backfill of rule {rule}: {} failed object(s) tried again, {} replicated, {} still failing; job {}",
                report.tried, report.succeeded, report.still_failed, report.state
            );
            if report.still_failed > 0 {
                println!("see why: `crr backfill failures {rule}`");
            }
        }
        BackfillCommand::Plan { rule, json } => {
            let rule = state
                .get_rule(&rule)
                .await?
                .ok_or_else(|| crr_shared::Error::RuleNotFound(rule.clone()))?;
            crate::deployment_cmd::check_endpoints(&state, &rule).await?;
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
                "{} objects ({} bytes) in scope: {} to copy ({} bytes), {} to fix (metadata only), {} already in place, {} conflicts kept (on_conflict {:?})",
                report.objects,
                report.bytes,
                report.to_copy,
                report.bytes_to_copy,
                report.to_fix,
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
                    "{:<40} {:<8} {:>12} {:>12}  {:<34} {:<34} {:<25} {:<25}  first difference",
                    "key",
                    "differs",
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
                        "{:<40} {:<8} {:>12} {:>12}  {:<34} {:<34} {:<25} {:<25}  {}",
                        c.key,
                        c.reason.as_str(),
                        c.source_size,
                        c.target_size,
                        c.source_etag,
                        c.target_etag,
                        t(c.source_last_modified),
                        t(c.target_last_modified),
                        c.detail
                    );
                }
            }
        }
    }
    Ok(())
}

/// `crr backfill segments`: every segment, and whether the job item's totals (what the
/// status shows) are the segments' sums.
async fn segments_report(
    state: &crr_shared::dynamo::DynamoStore,
    rule: &str,
    json: bool,
) -> Result<()> {
    let job = state
        .job(rule)
        .await?
        .ok_or_else(|| anyhow::anyhow!("rule {rule} has no backfill job"))?;
    let segments = state.segments(rule).await?;
    let sums = crr_shared::backfill::JobProgress::of_segments(&segments);
    let consistent = sums == job.progress;
    if json {
        let listed: Vec<_> = segments
            .iter()
            .map(|s| {
                serde_json::json!({
                    "index": s.index,
                    "prefix": s.prefix,
                    "start_after": s.start_after,
                    "end": s.end,
                    "checkpoint": s.checkpoint,
                    "done": s.done,
                    "lease_owner": s.lease_owner,
                    "lease_until_ms": s.lease_until,
                    "objects_done": s.objects_done,
                    "bytes_done": s.bytes_done,
                    "copied": s.copied,
                    "fixed": s.fixed,
                    "in_place": s.in_place,
                    "skipped": s.skipped,
                    "failed": s.failed,
                })
            })
            .collect();
        let totals = |p: &crr_shared::backfill::JobProgress| {
            serde_json::json!({
                "objects_done": p.tally.objects,
                "bytes_done": p.tally.bytes,
                "copied": p.tally.copied,
                "fixed": p.tally.fixed,
                "in_place": p.tally.in_place,
                "skipped": p.tally.skipped,
                "failed": p.tally.failed,
                "segments_done": p.segments_done,
            })
        };
        let report = serde_json::json!({
            "rule_id": rule,
            "segments": listed,
            "job_totals": totals(&job.progress),
            "segment_sums": totals(&sums),
            "consistent": consistent,
            "claim_next": job.claims.next,
            "board": job.claims.leases.len(),
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{:>6} {:<5} {:>10} {:>10}  {:<30} {:<30}  lease",
        "index", "done", "objects", "bytes", "end", "checkpoint"
    );
    for s in &segments {
        println!(
            "{:>6} {:<5} {:>10} {:>10}  {:<30} {:<30}  {}",
            s.index,
            s.done,
            s.objects_done,
            s.bytes_done,
            s.end.as_deref().unwrap_or("(end of prefix)"),
            s.checkpoint.as_deref().unwrap_or("-"),
            s.lease_owner.as_deref().unwrap_or("-"),
        );
    }
    println!(
        "{} segment(s), {} done; job totals {} the segments' sums ({} objects, {} bytes)",
        segments.len(),
        sums.segments_done,
        if consistent { "equal" } else { "DIFFER FROM" },
        sums.tally.objects,
        sums.tally.bytes
    );
    if !consistent {
        anyhow::bail!(
            "the job item's totals differ from its segments': {:?} vs {:?}",
            job.progress,
            sums
        );
    }
    Ok(())
}
