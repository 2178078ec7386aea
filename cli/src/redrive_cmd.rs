//! `crr redrive` and `crr suppressed`: what failed and what policy `write` held back.

use anyhow::{Context, Result};
use crr_shared::dead_letter::{is_for_bucket, redrive};
use crr_shared::state::{RuleStore, StatsStore};

use crate::{AwsArgs, QueueArgs};

#[derive(clap::Args)]
pub struct RedriveArgs {
    /// Only events of this rule's source bucket.
    #[arg(long)]
    rule: Option<String>,
    /// Move at most this many messages.
    #[arg(long, default_value_t = 1000)]
    max: usize,
    #[command(flatten)]
    queue: QueueArgs,
}

pub async fn redrive_cmd(aws: &AwsArgs, args: RedriveArgs) -> Result<()> {
    let sdk = aws.sdk_config().await;
    let source_bucket = match &args.rule {
        Some(id) => {
            let state = aws.state(&sdk).await;
            let rule = state
                .get_rule(id)
                .await?
                .ok_or_else(|| crr_shared::Error::RuleNotFound(id.clone()))?;
            Some(rule.source.bucket)
        }
        None => None,
    };
    let (queue_url, dlq_url) = args.queue.both()?;
    let sqs = args.queue.sqs_client(&sdk, queue_url);
    let report = redrive(&sqs, dlq_url, queue_url, args.max, |letter| {
        let chosen = match &source_bucket {
            Some(bucket) => is_for_bucket(letter, bucket),
            None => true,
        };
        if chosen {
            eprintln!(
                "redrive {}: {}",
                letter.message_id,
                letter.reason.as_deref().unwrap_or("(no reason recorded)")
            );
        }
        chosen
    })
    .await
    .context("redrive")?;
    println!(
        "moved {} message(s) back to the event queue; {} left in the DLQ",
        report.moved, report.kept
    );
    Ok(())
}

pub async fn suppressed_cmd(aws: &AwsArgs, rule_id: &str, json: bool) -> Result<()> {
    let sdk = aws.sdk_config().await;
    let state = aws.state(&sdk).await;
    state
        .get_rule(rule_id)
        .await?
        .ok_or_else(|| crr_shared::Error::RuleNotFound(rule_id.to_string()))?;
    let deletes = state.suppressed(rule_id).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&deletes)?);
        return Ok(());
    }
    if deletes.is_empty() {
        println!("no suppressed deletes for rule {rule_id}");
    }
    for d in deletes {
        println!(
            "{}  {}{}  sequencer {}",
            d.event_time.unwrap_or(d.recorded_at).to_rfc3339(),
            d.key,
            if d.delete_marker {
                " (delete marker)"
            } else {
                ""
            },
            d.sequencer.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}
