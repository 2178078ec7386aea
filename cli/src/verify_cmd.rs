//! `crr verify RULE`: source against target, every difference on its own line as it is
//! found; exit code 1 on drift. The comparison is `crr_shared::verify`.

use std::io::IsTerminal;
use std::sync::Arc;

use anyhow::Result;
use crr_shared::adapters::s3::S3Clients;
use crr_shared::object_store::ObjectStore;
use crr_shared::state::RuleStore;
use crr_shared::verify::{VerifyOptions, VerifySummary, verify};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::AwsArgs;

#[derive(clap::Args)]
pub struct VerifyArgs {
    rule: String,
    /// JSON Lines: one object per difference, then `{"summary": {...}}`.
    #[arg(long)]
    json: bool,
    /// Prove the bytes equal where ETags cannot (multipart, SSE-KMS, replicas vouched for
    /// by their marker): by both objects' stored checksums (CRC64NVME, CRC32C, CRC32,
    /// SHA-1, SHA-256) where comparable, else by reading both and comparing MD5s.
    #[arg(long)]
    checksum: bool,
    /// Compare keys, sizes and ETags only (no HEAD or tag reads per object).
    #[arg(long)]
    shallow: bool,
    /// Objects compared at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
}

/// Verifies; `Ok(true)` when there is drift.
pub async fn run(aws: &AwsArgs, args: VerifyArgs) -> Result<bool> {
    let sdk = aws.sdk_config().await;
    let state = aws.state(&sdk).await;
    let rule = state
        .get_rule(&args.rule)
        .await?
        .ok_or_else(|| crr_shared::Error::RuleNotFound(args.rule.clone()))?;
    crate::deployment_cmd::check_endpoints(&state, &rule).await?;
    let clients = S3Clients::new(sdk);
    let source: Arc<dyn ObjectStore> = Arc::new(clients.store(&rule.source));
    let target: Arc<dyn ObjectStore> = Arc::new(clients.store(&rule.target));
    let options = VerifyOptions {
        metadata: !args.shallow,
        checksum: args.checksum,
        concurrency: args.concurrency.max(1),
        ..VerifyOptions::default()
    };
    let progress = if std::io::stderr().is_terminal() {
        ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    progress.set_style(
        ProgressStyle::with_template("{spinner} {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    let json = args.json;
    let summary = verify(
        &rule,
        source,
        target,
        &options,
        |drift| {
            let line = if json {
                serde_json::to_string(drift).unwrap_or_default()
            } else {
                let by = drift
                    .checked_by
                    .map(|m| format!(" [checked by {}]", m.as_str()))
                    .unwrap_or_default();
                format!(
                    "{:<9} {}  ({}){by}",
                    drift.kind.as_str(),
                    drift.key,
                    drift.reason
                )
            };
            progress.suspend(|| println!("{line}"));
        },
        |p| {
            progress.set_message(format!(
                "listed {} source / {} target objects, compared {}",
                p.listed_source, p.listed_target, p.compared
            ));
            progress.tick();
        },
    )
    .await?;
    progress.finish_and_clear();
    if json {
        println!("{}", serde_json::json!({ "summary": summary }));
    } else {
        print_summary(&summary);
    }
    Ok(summary.has_drift())
}

fn print_summary(s: &VerifySummary) {
    let b = |n: u64| indicatif::HumanBytes(n).to_string();
    println!(
        "rule {}: source {} objects ({}), target {} objects ({})",
        s.rule_id,
        s.source_objects,
        b(s.source_bytes),
        s.target_objects,
        b(s.target_bytes)
    );
    println!(
        "matching {}, missing {} ({}), extra {} ({}), different {} ({}){}{}",
        s.matching,
        s.missing,
        b(s.missing_bytes),
        s.extra,
        b(s.extra_bytes),
        s.different,
        b(s.different_bytes),
        if s.extra_kept > 0 {
            format!(", {} only in the target kept by policy write", s.extra_kept)
        } else {
            String::new()
        },
        if s.in_flux > 0 {
            format!(", {} changing while compared", s.in_flux)
        } else {
            String::new()
        }
    );
    let c = &s.checked_by;
    println!(
        "bytes checked by: etag {}, stored checksum {}, content read {}, size {}{}",
        c.etag,
        c.checksum,
        c.content,
        c.size,
        if s.compared_checksums {
            ""
        } else {
            " (--checksum proves what ETags cannot)"
        }
    );
    println!(
        "{}",
        if s.has_drift() {
            "DRIFT: the target is not a copy of the source (`crr backfill start RULE` copies what is missing or different)"
        } else {
            "no drift: the target is a copy of the source"
        }
    );
}
