//! `RuleStore`: where rules and bucket claims live. The DynamoDB implementation is in
//! `dynamo.rs`, the in-memory one in `memory.rs`.

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::rule::Rule;

/// Which side of a pair a bucket is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Source,
    Target,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Target => "target",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "source" => Some(Role::Source),
            "target" => Some(Role::Target),
            _ => None,
        }
    }
}

/// A bucket's membership in one sync pair. A bucket has at most one claim, which is how
/// "a bucket is in at most one pair" is enforced. Buckets are identified by name, as S3
/// bucket names are global; rules on other S3-compatible endpoints follow the same rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub bucket: String,
    pub rule_id: String,
    pub role: Role,
}

impl Claim {
    /// The error for someone wanting `want` while this claim holds the bucket.
    pub fn conflict_error(&self, want: &Claim) -> Error {
        Error::BucketClaimed {
            field: format!("{}.bucket", want.role.as_str()),
            bucket: self.bucket.clone(),
            rule_id: self.rule_id.clone(),
            role: self.role.as_str().to_string(),
        }
    }
}

/// The two claims a rule makes.
pub fn claims_of(rule: &Rule) -> Vec<Claim> {
    vec![
        Claim {
            bucket: rule.source.bucket.clone(),
            rule_id: rule.id.clone(),
            role: Role::Source,
        },
        Claim {
            bucket: rule.target.bucket.clone(),
            rule_id: rule.id.clone(),
            role: Role::Target,
        },
    ]
}

/// Rules and their bucket claims.
#[async_trait]
pub trait RuleStore: Send + Sync {
    /// Stores the rule and claims both its buckets, all or nothing: of two concurrent
    /// creates naming one bucket, exactly one succeeds.
    async fn create_rule(&self, rule: &Rule) -> Result<()>;

    /// The rule with this id.
    async fn get_rule(&self, id: &str) -> Result<Option<Rule>>;

    /// All rules, ordered by id.
    async fn list_rules(&self) -> Result<Vec<Rule>>;

    /// Removes the rule and releases its claims.
    async fn delete_rule(&self, rule: &Rule) -> Result<()>;

    /// The rule whose source is `bucket`, if any.
    async fn rule_for_source(&self, bucket: &str) -> Result<Option<Rule>>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryRuleStore;
    use crate::rule::tests::rule;

    #[tokio::test]
    async fn a_bucket_is_in_at_most_one_pair() {
        let store = MemoryRuleStore::default();
        store
            .create_rule(&rule("ab", "bucket-a", "bucket-b"))
            .await
            .unwrap();
        let err = store
            .create_rule(&rule("ac", "bucket-a", "bucket-c"))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "rule field `source.bucket`: bucket 'bucket-a' is already in rule 'ab' as source"
        );
        let err = store
            .create_rule(&rule("cb", "bucket-c", "bucket-b"))
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("`target.bucket`: bucket 'bucket-b'"),
            "{err}"
        );
        let err = store
            .create_rule(&rule("ba", "bucket-b", "bucket-a"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("as target"), "{err}");
        // Nothing of the refused rules was kept: bucket-c is still free.
        store
            .create_rule(&rule("cd", "bucket-c", "bucket-d"))
            .await
            .unwrap();
        let ab = store.get_rule("ab").await.unwrap().unwrap();
        store.delete_rule(&ab).await.unwrap();
        store
            .create_rule(&rule("ae", "bucket-a", "bucket-e"))
            .await
            .unwrap();
    }
}
