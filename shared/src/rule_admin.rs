//! Creating and removing rules: validation, access checks, the atomic bucket claims and
//! the source bucket's notifications, all or nothing.

use crate::error::{Error, Result};
use crate::notification;
use crate::object_store::ObjectStore;
use crate::resumable::{UploadStore, abort_recorded};
use crate::rule::{Notify, Rule};
use crate::s3::S3Clients;
use crate::state::RuleStore;

/// Key of the object written (and removed at once) to prove the target is writable.
pub fn probe_key(rule_id: &str) -> String {
    format!(".crr-probe/{rule_id}")
}

/// Creates a rule: validates it, checks the source can be read and the target written,
/// claims both buckets in one transaction, then turns on the source's notifications.
/// If a step fails, what earlier steps made is undone.
pub async fn create_rule(rules: &dyn RuleStore, s3: &S3Clients, mut rule: Rule) -> Result<Rule> {
    rule.validate()?;
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
    let rule = rules
        .get_rule(id)
        .await?
        .ok_or_else(|| Error::RuleNotFound(id.to_string()))?;
    if rule.notify == Notify::External {
        abort_uploads(rules, s3, &rule).await?;
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
    abort_uploads(rules, s3, &rule).await?;
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
