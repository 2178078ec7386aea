//! The buckets a deployment may touch: the stack's `SourceBuckets` and `TargetBuckets`
//! parameters, handed to the functions as `CRR_SOURCE_BUCKETS` / `CRR_TARGET_BUCKETS`.
//! IAM already denies other buckets; this check refuses such a rule by name, with a
//! message saying which parameter to change, instead of an AccessDenied half-way through a
//! copy. Unset (local stacks, tests): any bucket.

use crate::error::{Error, Result};
use crate::rule::Rule;

/// Allowed bucket names per role; `None` allows any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedBuckets {
    pub sources: Option<Vec<String>>,
    pub targets: Option<Vec<String>>,
}

/// A comma-separated list (spaces around names ignored); empty means unset.
fn list(value: Option<String>) -> Option<Vec<String>> {
    let names: Vec<String> = value?
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    (!names.is_empty()).then_some(names)
}

impl AllowedBuckets {
    /// From `CRR_SOURCE_BUCKETS` and `CRR_TARGET_BUCKETS`.
    pub fn from_env() -> Self {
        Self {
            sources: list(std::env::var("CRR_SOURCE_BUCKETS").ok()),
            targets: list(std::env::var("CRR_TARGET_BUCKETS").ok()),
        }
    }

    /// Refuses a rule naming a bucket outside the lists.
    pub fn check(&self, rule: &Rule) -> Result<()> {
        for (role, bucket, allowed, variable) in [
            (
                "source",
                &rule.source.bucket,
                &self.sources,
                "CRR_SOURCE_BUCKETS (stack parameter SourceBuckets)",
            ),
            (
                "target",
                &rule.target.bucket,
                &self.targets,
                "CRR_TARGET_BUCKETS (stack parameter TargetBuckets)",
            ),
        ] {
            if let Some(names) = allowed
                && !names.iter().any(|n| n == bucket)
            {
                return Err(Error::BucketNotAllowed {
                    rule_id: rule.id.clone(),
                    role,
                    bucket: bucket.clone(),
                    variable,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::tests::rule;

    #[test]
    fn a_rule_outside_the_lists_is_refused_by_name() {
        let r = rule("r1", "src", "dst");
        assert!(AllowedBuckets::default().check(&r).is_ok());
        let allowed = AllowedBuckets {
            sources: list(Some(" src , other ".into())),
            targets: list(Some("elsewhere".into())),
        };
        let err = allowed.check(&r).unwrap_err();
        assert!(!err.is_retryable());
        let msg = err.to_string();
        assert!(
            msg.contains("target bucket 'dst'") && msg.contains("TargetBuckets"),
            "{msg}"
        );
        let only_sources = AllowedBuckets {
            targets: None,
            ..allowed
        };
        assert!(only_sources.check(&r).is_ok());
        assert_eq!(list(Some(" , ".into())), None);
    }
}
