//! Replication rules: the model of DESIGN.md section 1 and its validation, in one place.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Most prefixes a rule may name (as Alibaba OSS CRR).
pub const MAX_PREFIXES: usize = 5;

fn yes() -> bool {
    true
}

/// One side of a sync pair: a bucket, its region and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketRef {
    pub bucket: String,
    pub region: String,
    /// Custom S3 endpoint (S3-compatible providers, local servers). `None` means AWS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), needed by most local servers.
    #[serde(default)]
    pub path_style: bool,
}

impl BucketRef {
    /// The S3 partition the region belongs to, which decides whether server-side copy
    /// is possible between two buckets.
    pub fn partition(&self) -> &'static str {
        partition_of(&self.region)
    }
}

/// `aws`, `aws-cn` or `aws-us-gov`, from the region name.
pub fn partition_of(region: &str) -> &'static str {
    if region.starts_with("cn-") {
        "aws-cn"
    } else if region.starts_with("us-gov-") {
        "aws-us-gov"
    } else {
        "aws"
    }
}

/// Which changes reach the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Creates, overwrites and deletes are replicated.
    #[default]
    Full,
    /// Creates and overwrites only; deletes are skipped and recorded as suppressed.
    Write,
}

/// What the historical migration does when the target already has the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnConflict {
    /// Replace the target object (as OSS does).
    #[default]
    Overwrite,
    /// Keep the target object.
    Skip,
    /// Replace only if the source object is newer.
    Newer,
}

/// How objects are copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CopyMode {
    /// Server-side when both buckets share a partition and endpoint family, else stream.
    #[default]
    Auto,
    /// Always CopyObject / UploadPartCopy.
    ServerSide,
    /// Always GET from the source and PUT to the target.
    Stream,
}

/// The copy mechanism actually used for a rule, once `Auto` is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolvedCopyMode {
    ServerSide,
    Stream,
}

/// How the source bucket's changes reach the replicate function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Notify {
    /// S3 sends events to EventBridge; an EventBridge rule (infra/) routes them to the queue.
    #[default]
    EventBridge,
    /// S3 sends events straight to this SQS queue.
    Queue { arn: String },
    /// Events are delivered by something crr does not configure (an S3-compatible
    /// provider's own notifications, or a hand-made pipeline); crr leaves the bucket's
    /// notification configuration alone.
    External,
}

/// A replication rule: source -> target, with filters and policies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub id: String,
    pub source: BucketRef,
    pub target: BucketRef,
    /// Key prefixes to replicate; empty means all objects.
    #[serde(default)]
    pub prefixes: Vec<String>,
    #[serde(default)]
    pub policy: Policy,
    /// Whether objects that existed before the rule are migrated by the backfill.
    #[serde(default)]
    pub historical: bool,
    #[serde(default)]
    pub on_conflict: OnConflict,
    #[serde(default)]
    pub copy_mode: CopyMode,
    /// How source events are delivered.
    #[serde(default)]
    pub notify: Notify,
    /// Storage class for replicas (`None`: the source object's class).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class: Option<String>,
    /// Carry canned ACLs (public-read...) to replicas where the target bucket accepts ACLs.
    #[serde(default = "yes")]
    pub copy_acl: bool,
    /// KMS key (in the target region) for replicas of SSE-KMS objects, or for all replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_kms_key_id: Option<String>,
    /// Most objects per second the historical migration writes, over all its invocations
    /// together (`None`: no limit). Real-time replication is not limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_objects_per_second: Option<u64>,
    /// Most bytes per second the historical migration copies, over all its invocations
    /// together (`None`: no limit). Stored as a number; read from a number or from a
    /// rate such as `"200MiB/s"` (`rate_limit::parse_rate`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::rate_limit::bandwidth_serde::deserialize"
    )]
    pub max_bandwidth: Option<u64>,
    /// Paused rules keep their events waiting instead of applying them.
    #[serde(default)]
    pub paused: bool,
    /// RFC 3339 creation time.
    #[serde(default)]
    pub created_at: String,
}

impl Rule {
    /// A rule from `source` to `target` with the defaults: all objects, policy `full`, no
    /// historical sync, `on_conflict` overwrite, copy mode auto, EventBridge delivery,
    /// ACLs carried.
    pub fn new(id: impl Into<String>, source: BucketRef, target: BucketRef) -> Self {
        Rule {
            id: id.into(),
            source,
            target,
            prefixes: vec![],
            policy: Policy::Full,
            historical: false,
            on_conflict: OnConflict::Overwrite,
            copy_mode: CopyMode::Auto,
            notify: Notify::EventBridge,
            storage_class: None,
            copy_acl: true,
            target_kms_key_id: None,
            max_objects_per_second: None,
            max_bandwidth: None,
            paused: false,
            created_at: String::new(),
        }
    }

    /// Checks every restriction that can be checked without looking at other rules.
    /// (The one-pair-per-bucket restriction is enforced atomically by the state store.)
    pub fn validate(&self) -> Result<()> {
        validate_id(&self.id)?;
        validate_bucket("source.bucket", &self.source.bucket)?;
        validate_bucket("target.bucket", &self.target.bucket)?;
        validate_region("source.region", &self.source.region)?;
        validate_region("target.region", &self.target.region)?;
        validate_endpoint("source.endpoint_url", self.source.endpoint_url.as_deref())?;
        validate_endpoint("target.endpoint_url", self.target.endpoint_url.as_deref())?;
        if self.source.region == self.target.region {
            return Err(Error::invalid(
                "target.region",
                format!(
                    "must differ from the source region ('{}'): replication is cross-region",
                    self.source.region
                ),
            ));
        }
        if self.source.bucket == self.target.bucket
            && self.source.endpoint_url == self.target.endpoint_url
        {
            return Err(Error::invalid(
                "target.bucket",
                "must differ from the source bucket",
            ));
        }
        validate_prefixes(&self.prefixes)?;
        if let Some(class) = &self.storage_class {
            const CLASSES: &[&str] = &[
                "STANDARD",
                "REDUCED_REDUNDANCY",
                "STANDARD_IA",
                "ONEZONE_IA",
                "INTELLIGENT_TIERING",
                "GLACIER",
                "DEEP_ARCHIVE",
                "GLACIER_IR",
            ];
            if !CLASSES.contains(&class.as_str()) {
                return Err(Error::invalid(
                    "storage_class",
                    format!("'{class}' is not one of {}", CLASSES.join(", ")),
                ));
            }
        }
        if let Notify::Queue { arn } = &self.notify
            && !(arn.starts_with("arn:") && arn.contains(":sqs:"))
        {
            return Err(Error::invalid(
                "notify.arn",
                format!("'{arn}' is not an SQS queue ARN"),
            ));
        }
        for (field, limit) in [
            ("max_objects_per_second", self.max_objects_per_second),
            ("max_bandwidth", self.max_bandwidth),
        ] {
            if limit == Some(0) {
                return Err(Error::invalid(
                    field,
                    "must be more than 0 (leave it out for no limit)",
                ));
            }
        }
        if self.copy_mode == CopyMode::ServerSide && !self.server_side_possible() {
            return Err(Error::invalid(
                "copy_mode",
                "server-side copy needs both buckets in one partition behind one endpoint; use `stream` or `auto`",
            ));
        }
        Ok(())
    }

    /// The prefixes to list to see every key the rule covers exactly once, in order: `""`
    /// when the rule has none, and without a prefix that lies inside another (`a/b/`
    /// inside `a/`), whose keys the outer listing already returns.
    pub fn listing_prefixes(&self) -> Vec<String> {
        if self.prefixes.is_empty() {
            return vec![String::new()];
        }
        let mut roots: Vec<String> = self
            .prefixes
            .iter()
            .filter(|p| {
                !self
                    .prefixes
                    .iter()
                    .any(|outer| outer != *p && p.starts_with(outer.as_str()))
            })
            .cloned()
            .collect();
        roots.sort();
        roots
    }

    /// Whether a key falls under the rule's prefixes (all keys when there are none).
    pub fn matches_key(&self, key: &str) -> bool {
        self.prefixes.is_empty() || self.prefixes.iter().any(|p| key.starts_with(p.as_str()))
    }

    /// True when S3 itself can copy between the two buckets.
    pub fn server_side_possible(&self) -> bool {
        self.source.partition() == self.target.partition()
            && self.source.endpoint_url == self.target.endpoint_url
    }

    /// `Auto` resolved against the rule's buckets.
    pub fn resolved_copy_mode(&self) -> ResolvedCopyMode {
        match self.copy_mode {
            CopyMode::ServerSide => ResolvedCopyMode::ServerSide,
            CopyMode::Stream => ResolvedCopyMode::Stream,
            CopyMode::Auto if self.server_side_possible() => ResolvedCopyMode::ServerSide,
            CopyMode::Auto => ResolvedCopyMode::Stream,
        }
    }
}

fn validate_id(id: &str) -> Result<()> {
    let ok_chars = id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if id.is_empty() || id.len() > 64 || !ok_chars {
        return Err(Error::invalid(
            "id",
            format!("'{id}' must be 1-64 characters of letters, digits, '-' or '_'"),
        ));
    }
    Ok(())
}

/// S3 bucket naming rules (the general-purpose bucket subset every provider accepts).
fn validate_bucket(field: &str, bucket: &str) -> Result<()> {
    let len_ok = (3..=63).contains(&bucket.len());
    let chars_ok = bucket
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    let ends_ok = bucket
        .chars()
        .next()
        .zip(bucket.chars().last())
        .is_some_and(|(a, b)| a.is_ascii_alphanumeric() && b.is_ascii_alphanumeric());
    if !(len_ok && chars_ok && ends_ok) || bucket.contains("..") {
        return Err(Error::invalid(
            field,
            format!(
                "'{bucket}' is not a valid bucket name (3-63 lowercase letters, digits, '-' or '.', starting and ending with a letter or digit)"
            ),
        ));
    }
    Ok(())
}

/// Whether `region` has the shape of a region name (lowercase letters, digits, '-').
pub(crate) fn is_region_name(region: &str) -> bool {
    !region.is_empty()
        && region.len() <= 32
        && region
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn validate_region(field: &str, region: &str) -> Result<()> {
    if !is_region_name(region) {
        return Err(Error::invalid(
            field,
            format!("'{region}' is not a region name (like us-east-1)"),
        ));
    }
    Ok(())
}

fn validate_endpoint(field: &str, endpoint: Option<&str>) -> Result<()> {
    match endpoint {
        Some(url) if !(url.starts_with("http://") || url.starts_with("https://")) => {
            Err(Error::invalid(
                field,
                format!("'{url}' must start with http:// or https://"),
            ))
        }
        _ => Ok(()),
    }
}

fn validate_prefixes(prefixes: &[String]) -> Result<()> {
    if prefixes.len() > MAX_PREFIXES {
        return Err(Error::invalid(
            "prefixes",
            format!(
                "at most {MAX_PREFIXES} prefixes are allowed, got {}",
                prefixes.len()
            ),
        ));
    }
    for (i, p) in prefixes.iter().enumerate() {
        if p.is_empty() {
            return Err(Error::invalid(
                "prefixes",
                format!(
                    "prefix {} is empty; omit prefixes to replicate all objects",
                    i + 1
                ),
            ));
        }
        if p.len() > 1024 {
            return Err(Error::invalid(
                "prefixes",
                format!("prefix {} is longer than 1024 bytes", i + 1),
            ));
        }
        if prefixes[..i].contains(p) {
            return Err(Error::invalid(
                "prefixes",
                format!("prefix '{p}' is listed twice"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn rule(id: &str, src: &str, dst: &str) -> Rule {
        let side = |bucket: &str, region: &str| BucketRef {
            bucket: bucket.into(),
            region: region.into(),
            endpoint_url: None,
            path_style: false,
        };
        Rule::new(id, side(src, "us-east-1"), side(dst, "eu-west-1"))
    }

    fn field_of(err: Error) -> String {
        match err {
            Error::InvalidRule { field, .. } => field,
            other => panic!("expected InvalidRule, got {other}"),
        }
    }

    #[test]
    fn a_plain_rule_is_valid() {
        rule("r1", "src-bucket", "dst-bucket").validate().unwrap();
    }

    #[test]
    fn regions_must_differ() {
        let mut r = rule("r1", "src-bucket", "dst-bucket");
        r.target.region = "us-east-1".into();
        let err = r.validate().unwrap_err();
        assert!(
            err.to_string()
                .contains("must differ from the source region"),
            "{err}"
        );
        assert_eq!(field_of(err), "target.region");
    }

    #[test]
    fn at_most_five_prefixes_none_empty_none_duplicated() {
        let mut r = rule("r1", "src-bucket", "dst-bucket");
        r.prefixes = (0..6).map(|i| format!("p{i}/")).collect();
        assert_eq!(field_of(r.validate().unwrap_err()), "prefixes");
        r.prefixes = (0..5).map(|i| format!("p{i}/")).collect();
        r.validate().unwrap();
        r.prefixes = vec!["a/".into(), String::new()];
        assert!(
            r.validate()
                .unwrap_err()
                .to_string()
                .contains("prefix 2 is empty")
        );
        r.prefixes = vec!["a/".into(), "b/".into(), "a/".into()];
        assert!(
            r.validate()
                .unwrap_err()
                .to_string()
                .contains("'a/' is listed twice")
        );
    }

    #[test]
    fn bad_names_are_named_in_the_error() {
        let r = rule("r1", "Bad_Bucket", "dst-bucket");
        assert_eq!(field_of(r.validate().unwrap_err()), "source.bucket");
        let r = rule("r 1", "src-bucket", "dst-bucket");
        assert_eq!(field_of(r.validate().unwrap_err()), "id");
        let mut r = rule("r1", "src-bucket", "dst-bucket");
        r.source.endpoint_url = Some("localhost:9000".into());
        assert_eq!(field_of(r.validate().unwrap_err()), "source.endpoint_url");
    }

    #[test]
    fn copy_mode_resolution() {
        let mut r = rule("r1", "src-bucket", "dst-bucket");
        assert_eq!(r.resolved_copy_mode(), ResolvedCopyMode::ServerSide);
        r.target.region = "cn-north-1".into();
        assert_eq!(r.resolved_copy_mode(), ResolvedCopyMode::Stream);
        r.copy_mode = CopyMode::ServerSide;
        assert_eq!(field_of(r.validate().unwrap_err()), "copy_mode");
        let mut r = rule("r1", "src-bucket", "dst-bucket");
        r.target.endpoint_url = Some("http://127.0.0.1:9000".into());
        assert_eq!(r.resolved_copy_mode(), ResolvedCopyMode::Stream);
    }

    #[test]
    fn listing_prefixes_cover_each_key_once() {
        let mut r = rule("r", "a", "b");
        assert_eq!(r.listing_prefixes(), vec![String::new()]);
        r.prefixes = vec!["logs/2026/".into(), "img/".into(), "logs/".into()];
        assert_eq!(r.listing_prefixes(), vec!["img/", "logs/"]);
    }

    #[test]
    fn rate_limits_are_optional_positive_and_read_from_old_items() {
        let mut r = rule("r1", "src-bucket", "dst-bucket");
        r.max_objects_per_second = Some(0);
        assert_eq!(
            field_of(r.validate().unwrap_err()),
            "max_objects_per_second"
        );
        r.max_objects_per_second = Some(20);
        r.max_bandwidth = Some(0);
        assert_eq!(field_of(r.validate().unwrap_err()), "max_bandwidth");
        r.max_bandwidth = Some(1 << 20);
        r.validate().unwrap();
        // A rule stored before the limits existed still loads, without them.
        let mut json = serde_json::to_value(rule("r1", "a-b", "c-d")).unwrap();
        assert!(json.get("max_bandwidth").is_none());
        let old: Rule = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(
            (old.max_objects_per_second, old.max_bandwidth),
            (None, None)
        );
        // The console sends the bandwidth as text.
        json["max_bandwidth"] = serde_json::json!("200MiB/s");
        let given: Rule = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(given.max_bandwidth, Some(200 << 20));
        json["max_bandwidth"] = serde_json::json!("fast");
        let err = serde_json::from_value::<Rule>(json).unwrap_err();
        assert!(err.to_string().contains("max_bandwidth"), "{err}");
    }

    #[test]
    fn prefix_matching() {
        let mut r = rule("r1", "src-bucket", "dst-bucket");
        assert!(r.matches_key("anything"));
        r.prefixes = vec!["logs/".into(), "img/".into()];
        assert!(r.matches_key("img/a b.png"));
        assert!(!r.matches_key("other/x"));
        assert!(!r.matches_key("logs"));
    }
}
