//! Creating and removing rules: validation, access checks, the atomic bucket claims and
//! the source bucket's notifications, all or nothing.

use crate::adapters::s3::S3Clients;
use crate::allowed::Side;
use crate::deployment::Deployment;
use crate::error::{Error, Result};
use crate::notification;
use crate::object_store::ObjectStore;
use crate::resumable::{UploadStore, abort_recorded};
use crate::rule::{Notify, Rule};
use crate::state::RuleStore;

/// Key of the object written (and removed at once) to prove the target is writable.
pub fn probe_key(rule_id: &str) -> String {
    format!(".crr-probe/{rule_id}")
}

/// How a rule is held to its deployment at creation.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Create a rule whose source lies outside the deployment's region or bucket lists
    /// (with warnings) instead of refusing it. Endpoints are never forced.
    pub force: bool,
    /// What to hold the rule to when the table has no deployment record (the CLI: the
    /// endpoints of its own `CRR_ALLOWED_ENDPOINTS`); `None`: nothing.
    pub fallback: Option<Deployment>,
}

/// A created rule, with what `--force` let through.
#[derive(Debug, Clone)]
pub struct Created {
    pub rule: Rule,
    pub warnings: Vec<String>,
}

/// Creates a rule, held to the table's deployment record if there is one (see
/// `create_rule_with`).
pub async fn create_rule(rules: &dyn RuleStore, s3: &S3Clients, rule: Rule) -> Result<Rule> {
    Ok(create_rule_with(rules, s3, rule, &CreateOptions::default())
        .await?
        .rule)
}

/// Creates a rule: validates it, holds it to the deployment (the table's record, else
/// `options.fallback`: its region, bucket lists and allowed endpoints), checks the source
/// can be read and the target written, claims both buckets in one transaction, then turns
/// on the source's notifications. If a step fails, what earlier steps made is undone.
pub async fn create_rule_with(
    rules: &dyn RuleStore,
    s3: &S3Clients,
    rule: Rule,
    options: &CreateOptions,
) -> Result<Created> {
    rule.validate()?;
    let warnings = match rules
        .deployment()
        .await?
        .or_else(|| options.fallback.clone())
    {
        Some(deployment) => deployment.admit(&rule, options.force)?,
        None => vec![],
    };
    for warning in &warnings {
        tracing::warn!(rule_id = %rule.id, warning = %warning, "rule created with --force");
    }
    let rule = create_admitted(rules, s3, rule).await?;
    Ok(Created { rule, warnings })
}

async fn create_admitted(rules: &dyn RuleStore, s3: &S3Clients, mut rule: Rule) -> Result<Rule> {
    if rule.created_at.is_empty() {
        rule.created_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    }
    s3.store(&rule.source)
        .check_readable()
        .await
        .map_err(|e| Error::invalid("source.bucket", format!("cannot be read: {e}")))?;
    s3.store(&rule.target)
        .check_writable(&probe_key(&rule.id))
        .await
        .map_err(|e| Error::invalid("target.bucket", format!("cannot be written: {e}")))?;

    rules.create_rule(&rule).await?;
    if rule.notify == Notify::External {
        return Ok(rule);
    }

    let client = s3.client(&rule.source);
    let notified = async {
        let current = notification::read(&client, &rule.source.bucket).await?;
        notification::write(
            &client,
            &rule.source.bucket,
            notification::with_rule(&current, &rule)?,
        )
        .await
    }
    .await;
    if let Err(e) = notified {
        if let Err(undo) = rules.delete_rule(&rule).await {
            tracing::error!(rule_id = %rule.id, error = %undo, "could not release the claims of a failed create");
        }
        return Err(Error::invalid(
            "source.bucket",
            format!("event notifications could not be turned on: {e}"),
        ));
    }
    Ok(rule)
}

/// Removes a rule: its notification configuration on the source, the multipart uploads
/// its large copies left in progress (aborted, their records deleted), then the rule and
/// its claims. A source bucket that no longer exists does not block the removal.
pub async fn delete_rule<S: RuleStore + UploadStore>(
    rules: &S,
    s3: &S3Clients,
    id: &str,
) -> Result<Rule> {
    delete_rule_with(rules, s3, id, None).await
}

/// As `delete_rule`; an endpoint the deployment (the table's record, else `fallback`)
/// does not allow is not contacted: the rule goes, its notification configuration on a
/// refused source and its uploads on a refused target are left alone (the target's
/// lifecycle rule removes those).
pub async fn delete_rule_with<S: RuleStore + UploadStore>(
    rules: &S,
    s3: &S3Clients,
    id: &str,
    fallback: Option<Deployment>,
) -> Result<Rule> {
    let rule = rules
        .get_rule(id)
        .await?
        .ok_or_else(|| Error::RuleNotFound(id.to_string()))?;
    let deployment = rules.deployment().await?.or(fallback);
    let refused = match &deployment {
        Some(d) => d.endpoints().check_side(&rule, Side::Source).err(),
        None => None,
    };
    if let Some(e) = &refused {
        tracing::warn!(rule_id = %rule.id, error = %e, "source not contacted: its notification configuration is left as it is");
    }
    let target_allowed = deployment
        .as_ref()
        .is_none_or(|d| d.endpoints().check_side(&rule, Side::Target).is_ok());
    if target_allowed {
        abort_uploads(rules, s3, &rule).await?;
    }
    if rule.notify == Notify::External || refused.is_some() {
        rules.delete_rule(&rule).await?;
        return Ok(rule);
    }
    let client = s3.client(&rule.source);
    let unnotified = async {
        let current = notification::read(&client, &rule.source.bucket).await?;
        notification::write(
            &client,
            &rule.source.bucket,
            notification::without_rule(&current, &rule.id),
        )
        .await
    }
    .await;
    match unnotified {
        Ok(()) | Err(Error::NoSuchBucket { .. }) => {}
        Err(e) => return Err(e),
    }
    rules.delete_rule(&rule).await?;
    Ok(rule)
}

/// Aborts the rule's recorded multipart uploads; a target bucket that no longer exists
/// holds none.
async fn abort_uploads(uploads: &dyn UploadStore, s3: &S3Clients, rule: &Rule) -> Result<()> {
    let target = s3.store(&rule.target);
    match abort_recorded(uploads, &target, &rule.id).await {
        Ok(n) if n > 0 => {
            tracing::info!(rule_id = %rule.id, uploads = n, "multipart uploads in progress aborted")
        }
        Ok(_) | Err(Error::NoSuchBucket { .. }) => {}
        Err(e) => return Err(e),
    }
    Ok(())
}

/// Pauses (or resumes) a rule: its events wait in the queue, then the DLQ, until it is
/// resumed. The replicate function re-reads rules within 30 seconds.
pub async fn set_paused(rules: &dyn RuleStore, id: &str, paused: bool) -> Result<Rule> {
    let mut rule = rules
        .get_rule(id)
        .await?
        .ok_or_else(|| Error::RuleNotFound(id.to_string()))?;
    rule.paused = paused;
    rules.update_rule(&rule).await?;
    Ok(rule)
}

/// A change to a rule's rate limits: `None` leaves a limit as it is, `Some(None)` removes
/// it, `Some(Some(n))` sets it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitsUpdate {
    pub max_objects_per_second: Option<Option<u64>>,
    pub max_bandwidth: Option<Option<u64>>,
}

/// Changes a rule's rate limits (validated as at creation). Running backfill invocations
/// take the new limits with the next rule they read (the next invocation).
pub async fn update_limits(rules: &dyn RuleStore, id: &str, update: LimitsUpdate) -> Result<Rule> {
    let mut rule = rules
        .get_rule(id)
        .await?
        .ok_or_else(|| Error::RuleNotFound(id.to_string()))?;
    if let Some(limit) = update.max_objects_per_second {
        rule.max_objects_per_second = limit;
    }
    if let Some(limit) = update.max_bandwidth {
        rule.max_bandwidth = limit;
    }
    rule.validate()?;
    rules.update_rule(&rule).await?;
    Ok(rule)
}
