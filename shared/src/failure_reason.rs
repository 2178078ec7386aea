//! Why one object could not be replicated, as a reason code, and whether an error
//! concerns one object or the whole rule. The one place both are decided.
//!
//! Codes are S3 Replication's own failure reasons where one fits (the `failureReason` of
//! `s3:Replication:OperationFailedReplication` events and Batch Replication reports), so
//! an operator who knows those reads these the same way. Where S3 has none (S3's
//! replication never meets an archived source: it skips it as `SrcObjectNotEligible`),
//! crr adds its own in the same style; README "Failure reasons" lists them all.

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::rule::Rule;

/// The reason code of a failed object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FailureReason {
    /// The source object is archived (GLACIER, DEEP_ARCHIVE, Intelligent-Tiering archive
    /// tiers): restore it, then `crr backfill retry-failed`. crr's own code.
    SrcObjectArchived,
    /// Reading the source object (GET) was refused: `s3:GetObject` (or the object's KMS key).
    SrcGetObjectNotPermitted,
    /// Reading the source object's metadata (HEAD) was refused.
    SrcHeadObjectNotPermitted,
    /// Reading the source object's tags was refused: `s3:GetObjectTagging`.
    SrcGetTaggingNotPermitted,
    /// Reading the source object's ACL was refused: `s3:GetObjectAcl`.
    SrcGetAclNotPermitted,
    /// The source object vanished in a way the backfill could not skip.
    SrcKeyNotFound,
    /// A key the target cannot hold (empty, or over 1024 bytes, as some S3-compatible
    /// sources allow).
    SrcObjectNotEligible,
    /// The source kept changing while it was copied, on every attempt. crr's own code.
    SrcObjectChangedDuringCopy,
    /// Another request on the source object failed (the message has the service's code).
    /// crr's own code.
    SrcRequestFailed,
    /// Writing the object to the target (PutObject, CopyObject) was refused.
    DstPutObjectNotPermitted,
    /// Starting a multipart upload in the target was refused.
    DstMultipartInitNotPermitted,
    /// Uploading (or copying) a part to the target was refused.
    DstMultipartUploadNotPermitted,
    /// Completing a multipart upload in the target was refused.
    DstMultipartCompleteNotPermitted,
    /// Writing the replica's tags was refused: `s3:PutObjectTagging`.
    DstPutTaggingNotPermitted,
    /// Writing the replica's ACL was refused, or the target bucket does not accept ACLs.
    DstPutAclNotPermitted,
    /// Removing a replica (the backfill's undo of a copy whose source went) was refused.
    DstDelObjNotPermitted,
    /// Reading the target object to compare it was refused. crr's own code.
    DstHeadObjectNotPermitted,
    /// The replica written did not match the source, on every attempt. crr's own code.
    DstIntegrityCheckFailed,
    /// Another request on the target object failed (the message has the service's code).
    /// crr's own code.
    DstRequestFailed,
}

/// Which side of the rule an error's request went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Target,
}

impl FailureReason {
    /// Every code, in the README table's order.
    pub const ALL: [FailureReason; 19] = [
        FailureReason::SrcObjectArchived,
        FailureReason::SrcGetObjectNotPermitted,
        FailureReason::SrcHeadObjectNotPermitted,
        FailureReason::SrcGetTaggingNotPermitted,
        FailureReason::SrcGetAclNotPermitted,
        FailureReason::SrcKeyNotFound,
        FailureReason::SrcObjectNotEligible,
        FailureReason::SrcObjectChangedDuringCopy,
        FailureReason::SrcRequestFailed,
        FailureReason::DstPutObjectNotPermitted,
        FailureReason::DstMultipartInitNotPermitted,
        FailureReason::DstMultipartUploadNotPermitted,
        FailureReason::DstMultipartCompleteNotPermitted,
        FailureReason::DstPutTaggingNotPermitted,
        FailureReason::DstPutAclNotPermitted,
        FailureReason::DstDelObjNotPermitted,
        FailureReason::DstHeadObjectNotPermitted,
        FailureReason::DstIntegrityCheckFailed,
        FailureReason::DstRequestFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::SrcObjectArchived => "SrcObjectArchived",
            FailureReason::SrcGetObjectNotPermitted => "SrcGetObjectNotPermitted",
            FailureReason::SrcHeadObjectNotPermitted => "SrcHeadObjectNotPermitted",
            FailureReason::SrcGetTaggingNotPermitted => "SrcGetTaggingNotPermitted",
            FailureReason::SrcGetAclNotPermitted => "SrcGetAclNotPermitted",
            FailureReason::SrcKeyNotFound => "SrcKeyNotFound",
            FailureReason::SrcObjectNotEligible => "SrcObjectNotEligible",
            FailureReason::SrcObjectChangedDuringCopy => "SrcObjectChangedDuringCopy",
            FailureReason::SrcRequestFailed => "SrcRequestFailed",
            FailureReason::DstPutObjectNotPermitted => "DstPutObjectNotPermitted",
            FailureReason::DstMultipartInitNotPermitted => "DstMultipartInitNotPermitted",
            FailureReason::DstMultipartUploadNotPermitted => "DstMultipartUploadNotPermitted",
            FailureReason::DstMultipartCompleteNotPermitted => "DstMultipartCompleteNotPermitted",
            FailureReason::DstPutTaggingNotPermitted => "DstPutTaggingNotPermitted",
            FailureReason::DstPutAclNotPermitted => "DstPutAclNotPermitted",
            FailureReason::DstDelObjNotPermitted => "DstDelObjNotPermitted",
            FailureReason::DstHeadObjectNotPermitted => "DstHeadObjectNotPermitted",
            FailureReason::DstIntegrityCheckFailed => "DstIntegrityCheckFailed",
            FailureReason::DstRequestFailed => "DstRequestFailed",
        }
    }

    pub fn parse(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == code)
    }

    /// A refused permission: when every object of a page fails so, the cause is the
    /// deployment's IAM, not the objects (see `backfill` worker's page check).
    pub fn is_permission(self) -> bool {
        self.as_str().ends_with("NotPermitted")
    }

    /// The reason `err`, met while replicating one object of `rule`, is recorded under;
    /// `None` when the error concerns the whole rule (a missing bucket, a refused listing,
    /// a bucket the deployment may not touch, the state table...), which stops the job
    /// instead.
    pub fn of(err: &Error, rule: &Rule) -> Option<Self> {
        use FailureReason as R;
        let side = |operation: &str, resource: &str| side_of(rule, operation, resource);
        match err {
            Error::ObjectArchived { .. } => Some(R::SrcObjectArchived),
            Error::InvalidKey { .. } => Some(R::SrcObjectNotEligible),
            Error::AccessDenied {
                operation,
                resource,
                ..
            } => {
                let side = side(operation, resource)?;
                denied(operation, side)
            }
            Error::AclNotSupported { .. } => Some(R::DstPutAclNotPermitted),
            Error::NotFound {
                operation,
                resource,
            } => match side(operation, resource)? {
                Side::Source => Some(R::SrcKeyNotFound),
                Side::Target => Some(R::DstRequestFailed),
            },
            Error::Precondition { .. } => Some(R::SrcObjectChangedDuringCopy),
            Error::Integrity { .. } => Some(R::DstIntegrityCheckFailed),
            Error::Transient {
                operation,
                resource,
                ..
            }
            | Error::Service {
                operation,
                resource,
                ..
            } => match side(operation, resource)? {
                Side::Source => Some(R::SrcRequestFailed),
                Side::Target => Some(R::DstRequestFailed),
            },
            // Not a failure: a large copy stopped for the deadline, its parts checkpointed;
            // the page stops and the next run continues the copy.
            Error::CopyContinues { .. } => None,
            // The rule, the deployment or the state table: nothing one object can fix.
            Error::InvalidRule { .. }
            | Error::BadRequest(_)
            | Error::Inventory { .. }
            | Error::BucketClaimed { .. }
            | Error::RuleExists(_)
            | Error::RuleNotFound(_)
            | Error::RulePaused(_)
            | Error::BucketNotAllowed { .. }
            | Error::EndpointNotAllowed { .. }
            | Error::MalformedEvent(_)
            | Error::NoSuchBucket { .. }
            | Error::Config(_) => None,
        }
    }
}

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The reason of a refused request on one object; `None` for bucket-level requests
/// (listing, bucket settings), which concern the whole rule.
fn denied(operation: &str, side: Side) -> Option<FailureReason> {
    use FailureReason as R;
    Some(match (side, operation) {
        (Side::Source, "GetObject") => R::SrcGetObjectNotPermitted,
        (Side::Source, "HeadObject") => R::SrcHeadObjectNotPermitted,
        (Side::Source, "GetObjectTagging") => R::SrcGetTaggingNotPermitted,
        (Side::Source, "GetObjectAcl") => R::SrcGetAclNotPermitted,
        (_, "PutObject" | "CopyObject") => R::DstPutObjectNotPermitted,
        (_, "CreateMultipartUpload") => R::DstMultipartInitNotPermitted,
        (_, "UploadPart" | "UploadPartCopy") => R::DstMultipartUploadNotPermitted,
        (_, "CompleteMultipartUpload") => R::DstMultipartCompleteNotPermitted,
        (_, "PutObjectTagging") => R::DstPutTaggingNotPermitted,
        (_, "PutObjectAcl") => R::DstPutAclNotPermitted,
        (_, "DeleteObject") => R::DstDelObjNotPermitted,
        (Side::Target, "GetObject" | "HeadObject" | "GetObjectTagging" | "GetObjectAcl") => {
            R::DstHeadObjectNotPermitted
        }
        _ => return None,
    })
}

/// The side an object request went to, from the bucket its resource (`s3://bucket/key`)
/// names; `None` for anything else (a bucket-level request, a DynamoDB table, a queue).
fn side_of(rule: &Rule, operation: &str, resource: &str) -> Option<Side> {
    let path = resource.strip_prefix("s3://")?;
    let (bucket, key) = path.split_once('/')?;
    if key.is_empty() {
        return None;
    }
    let writes = matches!(
        operation,
        "PutObject"
            | "CopyObject"
            | "CreateMultipartUpload"
            | "UploadPart"
            | "UploadPartCopy"
            | "CompleteMultipartUpload"
            | "AbortMultipartUpload"
            | "PutObjectTagging"
            | "PutObjectAcl"
            | "DeleteObject"
    );
    let (source, target) = (bucket == rule.source.bucket, bucket == rule.target.bucket);
    match (source, target) {
        // Two servers may hold buckets of one name: the request's kind tells.
        (true, true) if writes => Some(Side::Target),
        (true, _) => Some(Side::Source),
        (false, true) => Some(Side::Target),
        (false, false) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::BucketRef;

    fn rule() -> Rule {
        let bucket = |name: &str, region: &str| BucketRef {
            bucket: name.into(),
            region: region.into(),
            endpoint_url: None,
            path_style: false,
        };
        Rule::new(
            "r",
            bucket("src", "eu-west-1"),
            bucket("dst", "eu-central-1"),
        )
    }

    fn denied(operation: &'static str, resource: &str) -> Error {
        Error::AccessDenied {
            operation,
            resource: resource.into(),
            permission: crate::error::s3_permission(operation),
        }
    }

    #[test]
    fn an_archived_source_is_not_a_permission_problem() {
        let err = Error::ObjectArchived {
            operation: "GetObject",
            resource: "s3://src/k".into(),
        };
        let reason = FailureReason::of(&err, &rule());
        assert_eq!(reason, Some(FailureReason::SrcObjectArchived));
        assert!(!FailureReason::SrcObjectArchived.is_permission());
    }

    #[test]
    fn refusals_name_the_side_and_the_request() {
        let r = rule();
        let cases = [
            (
                "GetObject",
                "s3://src/k",
                FailureReason::SrcGetObjectNotPermitted,
            ),
            (
                "HeadObject",
                "s3://src/k",
                FailureReason::SrcHeadObjectNotPermitted,
            ),
            (
                "GetObjectTagging",
                "s3://src/k",
                FailureReason::SrcGetTaggingNotPermitted,
            ),
            (
                "GetObjectAcl",
                "s3://src/k",
                FailureReason::SrcGetAclNotPermitted,
            ),
            (
                "PutObject",
                "s3://dst/k",
                FailureReason::DstPutObjectNotPermitted,
            ),
            (
                "CopyObject",
                "s3://dst/k",
                FailureReason::DstPutObjectNotPermitted,
            ),
            (
                "CreateMultipartUpload",
                "s3://dst/k",
                FailureReason::DstMultipartInitNotPermitted,
            ),
            (
                "UploadPartCopy",
                "s3://dst/k",
                FailureReason::DstMultipartUploadNotPermitted,
            ),
            (
                "CompleteMultipartUpload",
                "s3://dst/k",
                FailureReason::DstMultipartCompleteNotPermitted,
            ),
            (
                "PutObjectTagging",
                "s3://dst/k",
                FailureReason::DstPutTaggingNotPermitted,
            ),
            (
                "HeadObject",
                "s3://dst/k",
                FailureReason::DstHeadObjectNotPermitted,
            ),
        ];
        for (operation, resource, want) in cases {
            let got = FailureReason::of(&denied(operation, resource), &r);
            assert_eq!(got, Some(want), "{operation} on {resource}");
            assert!(want.is_permission());
        }
    }

    #[test]
    fn errors_of_the_whole_rule_are_not_recorded_per_object() {
        let r = rule();
        let whole = [
            denied("ListObjectsV2", "s3://src"),
            denied("GetBucketOwnershipControls", "s3://dst"),
            Error::NoSuchBucket {
                operation: "GetObject",
                bucket: "src".into(),
            },
            Error::BucketNotAllowed {
                rule_id: "r".into(),
                role: "target",
                bucket: "dst".into(),
                variable: "TargetBuckets",
            },
            Error::Transient {
                operation: "UpdateItem",
                resource: "table crr".into(),
                detail: "throttled".into(),
                throttled: true,
                source: "x".into(),
            },
            Error::Config("no table".into()),
        ];
        for err in whole {
            assert_eq!(FailureReason::of(&err, &r), None, "{err}");
        }
    }

    #[test]
    fn other_object_errors_are_recorded_by_side() {
        let r = rule();
        let service = |operation, resource: &str| Error::Service {
            operation,
            resource: resource.into(),
            detail: "InvalidArgument: no".into(),
            source: "x".into(),
        };
        assert_eq!(
            FailureReason::of(&service("GetObject", "s3://src/k"), &r),
            Some(FailureReason::SrcRequestFailed)
        );
        assert_eq!(
            FailureReason::of(&service("PutObject", "s3://dst/k"), &r),
            Some(FailureReason::DstRequestFailed)
        );
        let long_key = Error::InvalidKey {
            bucket: "src".into(),
            key: "k".repeat(1025),
            reason: "is longer than 1024 bytes".into(),
        };
        assert_eq!(
            FailureReason::of(&long_key, &r),
            Some(FailureReason::SrcObjectNotEligible)
        );
    }

    #[test]
    fn codes_read_back() {
        for reason in FailureReason::ALL {
            assert_eq!(FailureReason::parse(reason.as_str()), Some(reason));
            let json = serde_json::to_string(&reason).unwrap();
            assert_eq!(json, format!("\"{reason}\""));
        }
    }
}
