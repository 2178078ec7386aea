//! The deployment record: what the CLI and the status know of the deployment they talk
//! to, which they cannot read from the functions' environment: its region, the buckets
//! of its `SourceBuckets` / `TargetBuckets` parameters and its `AllowedEndpoints`.
//!
//! `crr init-table --source-buckets ... --target-buckets ... --allowed-endpoints ...`
//! writes it into the state table (region: the CLI's `--region`); the deploy guide has it
//! run after every deploy that changes those parameters. Without a record, the CLI knows
//! only the endpoints of its own `CRR_ALLOWED_ENDPOINTS` (default: AWS only), and the
//! status function its own environment (the stack's parameters).
//!
//! With it, a rule is judged before it is created (`rule_admin::create_rule_with`) and
//! while it lives (`status`):
//! - its source outside the deployment's region, or outside `SourceBuckets`: no event of
//!   it reaches the deployment (the EventBridge rule and the queue policy name the
//!   source buckets, and S3 delivers only within a region): `not_receiving_events`;
//! - its target outside `TargetBuckets`, or an endpoint not allowed: its events reach the
//!   functions, which refuse them (dead-lettered with the reason): `refused`.
//!
//! Rules whose events crr does not deliver (`notify: external`) are not held to the region.

use serde::{Deserialize, Serialize};

use crate::allowed::{AllowedBuckets, AllowedEndpoints, Side};
use crate::error::{Error, Result};
use crate::rule::{Notify, Rule};

/// What is known of a deployment. `None` (and an empty list of endpoints: AWS only)
/// where the record says nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    /// Where the deployment's event queue and EventBridge rule are.
    #[serde(default)]
    pub region: Option<String>,
    /// The stack's `SourceBuckets`; `None`: not known.
    #[serde(default)]
    pub source_buckets: Option<Vec<String>>,
    /// The stack's `TargetBuckets`; `None`: not known.
    #[serde(default)]
    pub target_buckets: Option<Vec<String>>,
    /// The stack's `AllowedEndpoints` entries; empty: AWS endpoints only.
    #[serde(default)]
    pub allowed_endpoints: Vec<String>,
    /// When the record was written (RFC 3339).
    #[serde(default)]
    pub recorded_at: Option<String>,
}

/// What becomes of a rule's events in a deployment, when not replication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// No event of the rule's source reaches the deployment.
    NotReceiving(String),
    /// Its events arrive, and the functions refuse them.
    Refused(String),
}

impl Finding {
    pub fn reason(&self) -> &str {
        match self {
            Finding::NotReceiving(r) | Finding::Refused(r) => r,
        }
    }
}

impl Deployment {
    /// The deployment a function runs in, from its environment: `AWS_REGION` (set by
    /// Lambda), `CRR_SOURCE_BUCKETS`, `CRR_TARGET_BUCKETS`, `CRR_ALLOWED_ENDPOINTS`.
    pub fn from_env() -> Self {
        let allowed = AllowedBuckets::from_env();
        Self {
            region: std::env::var("AWS_REGION").ok().filter(|r| !r.is_empty()),
            source_buckets: allowed.sources,
            target_buckets: allowed.targets,
            allowed_endpoints: allowed.endpoints.entries(),
            recorded_at: None,
        }
    }

    /// The endpoints allowed; an entry that does not parse allows nothing.
    pub fn endpoints(&self) -> AllowedEndpoints {
        AllowedEndpoints::lenient(self.allowed_endpoints.iter().map(String::as_str))
    }

    /// The buckets and endpoints allowed, as the functions check them.
    pub fn allowed(&self) -> AllowedBuckets {
        AllowedBuckets {
            sources: self.source_buckets.clone(),
            targets: self.target_buckets.clone(),
            endpoints: self.endpoints(),
        }
    }

    /// Everything that keeps `rule` from being replicated by this deployment.
    pub fn findings(&self, rule: &Rule) -> Vec<Finding> {
        let mut found = Vec::new();
        if let Some(region) = &self.region
            && rule.notify != Notify::External
            && &rule.source.region != region
        {
            found.push(Finding::NotReceiving(format!(
                "source bucket '{}' is in region {}, the deployment in {region}: S3 sends its events only within {}",
                rule.source.bucket, rule.source.region, rule.source.region
            )));
        }
        let allowed = self.allowed();
        if let Err(e) = allowed.check_bucket(rule, Side::Source) {
            found.push(Finding::NotReceiving(e.to_string()));
        }
        if let Err(e) = allowed.check_bucket(rule, Side::Target) {
            found.push(Finding::Refused(e.to_string()));
        }
        for side in [Side::Source, Side::Target] {
            if let Err(e) = allowed.endpoints.check_side(rule, side) {
                found.push(Finding::Refused(e.to_string()));
            }
        }
        found
    }

    /// Whether `rule` may be created in this deployment: an endpoint not allowed is always
    /// refused (the functions would refuse every event); a source outside the region or
    /// the bucket lists is refused unless `force`, and then returned as a warning.
    pub fn admit(&self, rule: &Rule, force: bool) -> Result<Vec<String>> {
        let allowed = self.allowed();
        allowed.endpoints.check(rule)?;
        let mut warnings = Vec::new();
        if let Some(region) = &self.region
            && rule.notify != Notify::External
            && &rule.source.region != region
        {
            let reason = format!(
                "'{}' is not in this deployment's region {region}: its events would never arrive (deploy crr in {} too, or use --notify-external)",
                rule.source.region, rule.source.region
            );
            warnings.push(refuse_unless(force, "source.region", reason)?);
        }
        for (side, field, parameter) in [
            (Side::Source, "source.bucket", "SourceBuckets"),
            (Side::Target, "target.bucket", "TargetBuckets"),
        ] {
            if allowed.check_bucket(rule, side).is_err() {
                let (bucket, listed) = match side {
                    Side::Source => (&rule.source.bucket, &self.source_buckets),
                    Side::Target => (&rule.target.bucket, &self.target_buckets),
                };
                let reason = format!(
                    "'{bucket}' is not in this deployment's {parameter} ({}): add it to the stack parameter, redeploy and re-run `crr init-table --{}`",
                    listed.as_deref().unwrap_or_default().join(", "),
                    match side {
                        Side::Source => "source-buckets",
                        Side::Target => "target-buckets",
                    }
                );
                warnings.push(refuse_unless(force, field, reason)?);
            }
        }
        Ok(warnings)
    }
}

fn refuse_unless(force: bool, field: &str, reason: String) -> Result<String> {
    if force {
        Ok(format!("rule field `{field}`: {reason}"))
    } else {
        Err(Error::invalid(
            field,
            format!("{reason}; --force creates the rule anyway"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::tests::rule;

    fn deployment() -> Deployment {
        Deployment {
            region: Some("us-east-1".into()),
            source_buckets: Some(vec!["src".into()]),
            target_buckets: Some(vec!["dst".into()]),
            allowed_endpoints: vec!["http://127.0.0.1:9000".into()],
            recorded_at: None,
        }
    }

    #[test]
    fn a_rule_inside_the_deployment_has_no_finding() {
        let r = rule("r1", "src", "dst");
        assert_eq!(deployment().findings(&r), vec![]);
        assert_eq!(deployment().admit(&r, false).unwrap(), Vec::<String>::new());
        // Nothing known, nothing found (but endpoints: AWS only).
        assert_eq!(Deployment::default().findings(&r), vec![]);
    }

    #[test]
    fn a_source_outside_the_region_or_list_receives_no_event() {
        let mut r = rule("r1", "src", "dst");
        r.source.region = "ap-south-1".into();
        let found = deployment().findings(&r);
        assert!(
            matches!(&found[..], [Finding::NotReceiving(m)] if m.contains("region ap-south-1")),
            "{found:?}"
        );
        let err = deployment().admit(&r, false).unwrap_err();
        assert!(
            err.to_string().starts_with("rule field `source.region`")
                && err.to_string().contains("--force"),
            "{err}"
        );
        let warnings = deployment().admit(&r, true).unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        // Events crr does not deliver are not held to the region.
        r.notify = Notify::External;
        assert_eq!(deployment().findings(&r), vec![]);

        let r = rule("r1", "other", "dst");
        assert!(matches!(
            &deployment().findings(&r)[..],
            [Finding::NotReceiving(m)] if m.contains("SourceBuckets")
        ));
        let err = deployment().admit(&r, false).unwrap_err().to_string();
        assert!(
            err.contains("'other' is not in this deployment's SourceBuckets (src)"),
            "{err}"
        );
        assert!(deployment().admit(&r, true).is_ok());
    }

    #[test]
    fn a_target_or_endpoint_not_allowed_is_refused() {
        let r = rule("r1", "src", "elsewhere");
        assert!(matches!(
            &deployment().findings(&r)[..],
            [Finding::Refused(m)] if m.contains("TargetBuckets")
        ));
        let mut r = rule("r1", "src", "dst");
        r.target.endpoint_url = Some("http://127.0.0.1:9001".into());
        assert!(matches!(
            &deployment().findings(&r)[..],
            [Finding::Refused(m)] if m.contains("http://127.0.0.1:9001")
        ));
        // --force does not let an endpoint through.
        assert_eq!(
            deployment().admit(&r, true).unwrap_err().kind(),
            "EndpointNotAllowed"
        );
        r.target.endpoint_url = Some("http://127.0.0.1:9000".into());
        assert!(deployment().admit(&r, false).is_ok());
    }
}
