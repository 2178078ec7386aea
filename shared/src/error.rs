//! The one error type of the library, and the one place that decides what is retryable.

use aws_sdk_dynamodb::error::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

/// Boxed source error, kept so the SDK's own error is never flattened to a string.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in crr, by meaning rather than by backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A rule field is invalid; `field` names it the way the CLI flag and JSON do.
    #[error("rule field `{field}`: {reason}")]
    InvalidRule { field: String, reason: String },

    /// A request (status query, CLI flag) asks for something that does not exist.
    #[error("{0}")]
    BadRequest(String),

    /// A bucket is already part of another sync pair.
    #[error("rule field `{field}`: bucket '{bucket}' is already in rule '{rule_id}' as {role}")]
    BucketClaimed {
        field: String,
        bucket: String,
        rule_id: String,
        role: String,
    },

    /// A rule with this id exists already.
    #[error("rule field `id`: rule '{0}' already exists")]
    RuleExists(String),

    /// No rule with this id.
    #[error("rule '{0}' not found (`crr rule list` shows the rules)")]
    RuleNotFound(String),

    /// The rule is paused: its events wait (in the queue, then the DLQ) until it resumes.
    #[error("rule '{0}' is paused; its events wait for `crr rule resume` (then `crr redrive`)")]
    RulePaused(String),

    /// A rule names a bucket the deployment may not touch.
    #[error(
        "rule '{rule_id}' names {role} bucket '{bucket}', which this deployment may not touch: add it to {variable} and redeploy"
    )]
    BucketNotAllowed {
        rule_id: String,
        role: &'static str,
        bucket: String,
        variable: &'static str,
    },

    /// A rule names an S3 endpoint the deployment may not use (`CRR_ALLOWED_ENDPOINTS`).
    #[error(
        "rule '{rule_id}' names {role} endpoint '{endpoint}', which this deployment may not use (allowed: {allowed}): add it to CRR_ALLOWED_ENDPOINTS (stack parameter AllowedEndpoints) and redeploy"
    )]
    EndpointNotAllowed {
        rule_id: String,
        role: &'static str,
        endpoint: String,
        allowed: String,
    },

    /// An incoming event could not be understood; never retried.
    #[error("malformed event: {0}")]
    MalformedEvent(String),

    /// The caller lacks an IAM permission.
    #[error("access denied: {operation} on {resource} needs permission {permission}")]
    AccessDenied {
        operation: &'static str,
        resource: String,
        permission: &'static str,
    },

    /// The source object sits in an archive storage class (S3 Glacier Flexible Retrieval,
    /// Deep Archive, or an Intelligent-Tiering archive tier): it must be restored before
    /// its bytes can be read. Not a permission problem, and repeating will not help.
    #[error(
        "{resource} is archived (GLACIER, DEEP_ARCHIVE or an Intelligent-Tiering archive tier) and must be restored before it can be copied ({operation})"
    )]
    ObjectArchived {
        operation: &'static str,
        resource: String,
    },

    /// The bucket does not exist (or is not visible at that endpoint).
    #[error("bucket '{bucket}' does not exist ({operation})")]
    NoSuchBucket {
        operation: &'static str,
        bucket: String,
    },

    /// The object does not exist.
    #[error("{resource} not found ({operation})")]
    NotFound {
        operation: &'static str,
        resource: String,
    },

    /// A precondition (If-Match on the source ETag) failed: the object changed meanwhile.
    #[error("{resource} changed while being copied ({operation} precondition failed)")]
    Precondition {
        operation: &'static str,
        resource: String,
    },

    /// The bucket refuses ACLs (Object Ownership "bucket owner enforced").
    #[error("{resource}: the bucket does not accept ACLs ({operation})")]
    AclNotSupported {
        operation: &'static str,
        resource: String,
    },

    /// A key S3 cannot hold (empty, or over 1024 bytes), met in a listing or a request.
    #[error("key in bucket '{bucket}' {reason}: '{key}'")]
    InvalidKey {
        bucket: String,
        key: String,
        reason: String,
    },

    /// The replica's content does not match the source.
    #[error("integrity check failed for {resource}: {detail}")]
    Integrity { resource: String, detail: String },

    /// A call that may succeed if repeated: throttling, 5xx, timeouts, dropped connections.
    #[error("{operation} on {resource} failed (retryable): {detail}")]
    Transient {
        operation: &'static str,
        resource: String,
        detail: String,
        /// The service asked to slow down (S3's `503 SlowDown`, a throttling code): the
        /// backfill takes fewer copies in flight (`rate_limit::Aimd`), on top of retrying.
        throttled: bool,
        #[source]
        source: BoxError,
    },

    /// A multipart copy stopped before the invocation's deadline with its progress saved
    /// (`resumable.rs`): not a failure. The next invocation (the message delivered again,
    /// the backfill's next run) continues it from the parts done.
    #[error(
        "{resource}: copy continues in the next invocation ({parts_done} of {parts} parts done)"
    )]
    CopyContinues {
        resource: String,
        parts_done: u64,
        parts: u64,
    },

    /// Any other service failure that repeating will not fix.
    #[error("{operation} on {resource} failed: {detail}")]
    Service {
        operation: &'static str,
        resource: String,
        detail: String,
        #[source]
        source: BoxError,
    },

    /// Configuration is missing or wrong (environment, endpoints).
    #[error("configuration: {0}")]
    Config(String),

    /// An S3 Inventory report given as a backfill's input cannot be used: `location` is
    /// the file (`s3://bucket/key`), `reason` names the field or row at fault.
    #[error("inventory {location}: {reason}")]
    Inventory { location: String, reason: String },
}

/// Longest reason text kept, in bytes.
const MAX_REASON: usize = 300;

/// `text` cut to at most `max` bytes (on a character boundary), saying how much was cut.
pub fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes in all)", &text[..end], text.len())
}

/// Result alias for the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The rule field an error is about, named as in the rule's JSON (`target.region`,
    /// `prefixes`...), for a form to show the error next to that field.
    pub fn rule_field(&self) -> Option<String> {
        match self {
            Error::InvalidRule { field, .. } | Error::BucketClaimed { field, .. } => {
                Some(field.clone())
            }
            Error::RuleExists(_) => Some("id".into()),
            Error::BucketNotAllowed { role, .. } => Some(format!("{role}.bucket")),
            Error::EndpointNotAllowed { role, .. } => Some(format!("{role}.endpoint_url")),
            _ => None,
        }
    }

    /// Whether doing the same thing again later may succeed. The only place this is decided.
    pub fn is_retryable(&self) -> bool {
        // A failed precondition or integrity check is retried: the usual cause is the
        // source changing under a copy (caught by If-Match, or, on servers that ignore
        // copy-source If-Match, by the ETag check), else bytes damaged in transit; the next
        // attempt reads the source's current state again.
        matches!(
            self,
            Error::Transient { .. }
                | Error::RulePaused(_)
                | Error::Integrity { .. }
                | Error::Precondition { .. }
                | Error::CopyContinues { .. }
        )
    }

    /// Whether the service asked the caller to send fewer requests (decided from the error
    /// code in `from_sdk`, never from message text).
    pub fn is_throttled(&self) -> bool {
        matches!(
            self,
            Error::Transient {
                throttled: true,
                ..
            }
        )
    }

    /// Whether the work outlasted this invocation and goes on in the next one: retryable,
    /// but not within this invocation (no time is left), and progress, not a failed try.
    pub fn continues_later(&self) -> bool {
        matches!(self, Error::CopyContinues { .. })
    }

    /// Short machine-readable kind, used as the Lambda `errorType` and in DLQ reasons.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::InvalidRule { .. } => "InvalidRule",
            Error::BadRequest(_) => "BadRequest",
            Error::BucketClaimed { .. } => "BucketClaimed",
            Error::RuleExists(_) => "RuleExists",
            Error::RuleNotFound(_) => "RuleNotFound",
            Error::RulePaused(_) => "RulePaused",
            Error::BucketNotAllowed { .. } => "BucketNotAllowed",
            Error::EndpointNotAllowed { .. } => "EndpointNotAllowed",
            Error::MalformedEvent(_) => "MalformedEvent",
            Error::AccessDenied { .. } => "AccessDenied",
            Error::ObjectArchived { .. } => "ObjectArchived",
            Error::NoSuchBucket { .. } => "NoSuchBucket",
            Error::NotFound { .. } => "NotFound",
            Error::Precondition { .. } => "Precondition",
            Error::Integrity { .. } => "Integrity",
            Error::InvalidKey { .. } => "InvalidKey",
            Error::AclNotSupported { .. } => "AclNotSupported",
            Error::Transient { .. } => "Retryable",
            Error::CopyContinues { .. } => "CopyContinues",
            Error::Service { .. } => "Service",
            Error::Config(_) => "Config",
            Error::Inventory { .. } => "InvalidInventory",
        }
    }

    /// A malformed-event error whose text is kept short: a hostile event may quote
    /// kilobytes of itself in a parse error, and the reason travels in a DLQ message
    /// attribute and a log line.
    pub fn malformed(reason: impl Into<String>) -> Self {
        Error::MalformedEvent(clip(&reason.into(), MAX_REASON))
    }

    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidRule {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// How a failed AWS call is to be treated. Decided from the SDK's structured error
/// (kind of failure, HTTP status, service error code), never from message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    Retryable,
    AccessDenied,
    /// The object is in an archive tier (`InvalidObjectState`, `ObjectNotInActiveTierError`).
    ObjectArchived,
    NoSuchBucket,
    NotFound,
    Precondition,
    ConditionFailed,
    AclNotSupported,
    Permanent,
}

/// Error codes that AWS services use for throttling and transient trouble.
const RETRYABLE_CODES: &[&str] = &[
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "InternalFailure",
    "InternalServerError",
    "ServiceUnavailable",
    "TransactionInProgressException",
    // A DynamoDB write that met a transaction in flight on the same item (the backfill's
    // job item takes both): the same write again goes through.
    "TransactionConflictException",
    // 409s S3 asks callers to repeat: a concurrent conditional write or bucket-level
    // operation got in the way.
    "ConditionalRequestConflict",
    "OperationAborted",
    // A token that expired in flight or a skewed clock: the SDK refreshes credentials and
    // corrects the skew on the next attempt.
    "ExpiredToken",
    "RequestTimeTooSkewed",
];

/// Error codes meaning "the object is archived; restore it first". `InvalidObjectState` is
/// what GetObject answers (403), `ObjectNotInActiveTierError` what CopyObject and
/// UploadPartCopy answer for an archived source.
const ARCHIVED_CODES: &[&str] = &["InvalidObjectState", "ObjectNotInActiveTierError"];

/// Error codes meaning "this caller may not": no permission, or credentials the service
/// does not accept. HEAD responses carry no body, so a bare 403 there has no code (or the
/// SDK's generic `Forbidden`). A 403 with any other code (a disabled account, a
/// requester-pays bucket...) is not a missing permission: it is reported with its code.
const DENIED_CODES: &[&str] = &[
    "AccessDenied",
    "AccessDeniedException",
    "Forbidden",
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "InvalidToken",
];

/// Error codes that mean "too many requests": the caller should send fewer, not only
/// retry. A subset of `RETRYABLE_CODES`.
const THROTTLING_CODES: &[&str] = &[
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
];

/// Whether an SDK error is the service asking for fewer requests (by its error code, or
/// HTTP 429).
pub fn is_throttling<E, R>(err: &SdkError<E, R>) -> bool
where
    E: ProvideErrorMetadata,
    R: HttpStatus,
{
    match err {
        SdkError::ServiceError(service) => {
            THROTTLING_CODES.contains(&service.err().code().unwrap_or(""))
                || service.raw().status_code() == 429
        }
        _ => false,
    }
}

/// Classifies any SDK error. Shared by S3 and DynamoDB calls (both use the same
/// `SdkError` shape).
pub fn classify<E, R>(err: &SdkError<E, R>) -> FailureClass
where
    E: ProvideErrorMetadata,
    R: HttpStatus,
{
    match err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            FailureClass::Retryable
        }
        SdkError::ServiceError(service) => {
            let status = service.raw().status_code();
            let code = service.err().code().unwrap_or("");
            // 501 Not Implemented: the provider lacks the feature; asking again won't help.
            if status == 501 || code == "NotImplemented" {
                FailureClass::Permanent
            } else if RETRYABLE_CODES.contains(&code) || status >= 500 || status == 429 {
                FailureClass::Retryable
            } else if code == "AccessControlListNotSupported" {
                FailureClass::AclNotSupported
            } else if code == "NoSuchBucket" {
                FailureClass::NoSuchBucket
            } else if code == "ConditionalCheckFailedException"
                || code == "TransactionCanceledException"
            {
                FailureClass::ConditionFailed
            } else if ARCHIVED_CODES.contains(&code) {
                FailureClass::ObjectArchived
            } else if DENIED_CODES.contains(&code) || (status == 403 && code.is_empty()) {
                FailureClass::AccessDenied
            } else if status == 404 || code == "NoSuchKey" || code == "NotFound" {
                FailureClass::NotFound
            } else if status == 412 || code == "PreconditionFailed" {
                FailureClass::Precondition
            } else {
                FailureClass::Permanent
            }
        }
        _ => FailureClass::Permanent,
    }
}

/// The HTTP status of a raw response, whichever response type the SDK used.
pub trait HttpStatus {
    fn status_code(&self) -> u16;
}

impl HttpStatus for aws_smithy_runtime_api::http::Response {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

/// The IAM permission an S3 operation needs, named in AccessDenied messages.
pub fn s3_permission(operation: &str) -> &'static str {
    match operation {
        "GetObject" | "HeadObject" => "s3:GetObject",
        "GetObjectTagging" => "s3:GetObjectTagging",
        "GetObjectAcl" => "s3:GetObjectAcl",
        "GetBucketOwnershipControls" => "s3:GetBucketOwnershipControls",
        "PutObjectTagging" => "s3:PutObjectTagging",
        "PutObject" | "CreateMultipartUpload" | "UploadPart" | "CompleteMultipartUpload" => {
            "s3:PutObject"
        }
        "CopyObject" | "UploadPartCopy" => "s3:GetObject (source) and s3:PutObject (target)",
        "AbortMultipartUpload" => "s3:AbortMultipartUpload",
        "DeleteObject" => "s3:DeleteObject",
        "ListObjectsV2" | "HeadBucket" => "s3:ListBucket",
        "GetBucketNotificationConfiguration" => "s3:GetBucketNotification",
        "PutBucketNotificationConfiguration" => "s3:PutBucketNotification",
        _ => "s3:*",
    }
}

/// The IAM permission a DynamoDB operation needs.
pub fn dynamodb_permission(operation: &str) -> &'static str {
    match operation {
        "GetItem" => "dynamodb:GetItem",
        "PutItem" => "dynamodb:PutItem",
        "UpdateItem" => "dynamodb:UpdateItem",
        "DeleteItem" => "dynamodb:DeleteItem",
        "Query" => "dynamodb:Query",
        "Scan" => "dynamodb:Scan",
        "TransactWriteItems" => "dynamodb:PutItem/DeleteItem/ConditionCheckItem (transaction)",
        "CreateTable" => "dynamodb:CreateTable",
        "DescribeTable" => "dynamodb:DescribeTable",
        _ => "dynamodb:*",
    }
}

/// Turns an SDK error into ours, keeping the source. `resource` names bucket/key or table.
pub fn from_sdk<E, R>(
    operation: &'static str,
    resource: String,
    permission: &'static str,
    err: SdkError<E, R>,
) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: HttpStatus + std::fmt::Debug + Send + Sync + 'static,
{
    match classify(&err) {
        FailureClass::Retryable => Error::Transient {
            operation,
            resource,
            detail: detail_of(&err),
            throttled: is_throttling(&err),
            source: Box::new(err),
        },
        FailureClass::AccessDenied => Error::AccessDenied {
            operation,
            resource,
            permission,
        },
        FailureClass::ObjectArchived => Error::ObjectArchived {
            operation,
            resource,
        },
        FailureClass::NoSuchBucket => Error::NoSuchBucket {
            operation,
            bucket: resource
                .trim_start_matches("s3://")
                .split('/')
                .next()
                .unwrap_or_default()
                .to_string(),
        },
        FailureClass::NotFound => Error::NotFound {
            operation,
            resource,
        },
        FailureClass::Precondition => Error::Precondition {
            operation,
            resource,
        },
        FailureClass::AclNotSupported => Error::AclNotSupported {
            operation,
            resource,
        },
        FailureClass::ConditionFailed | FailureClass::Permanent => Error::Service {
            operation,
            resource,
            detail: detail_of(&err),
            source: Box::new(err),
        },
    }
}

/// One line saying what the service answered: its error code and message when it sent
/// them, else the SDK's own chain of causes.
fn detail_of<E, R>(err: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let meta = err.as_service_error().map(|e| (e.code(), e.message()));
    match meta {
        Some((Some(code), Some(message))) => format!("{code}: {message}"),
        Some((Some(code), None)) => code.to_string(),
        _ => aws_smithy_types::error::display::DisplayErrorContext(err).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_s3::operation::get_object::GetObjectError;
    use aws_smithy_runtime_api::http::{Response, StatusCode};
    use aws_smithy_types::body::SdkBody;
    use aws_smithy_types::error::ErrorMetadata;

    fn service_error(status: u16, code: &str) -> SdkError<GetObjectError, Response> {
        let meta = ErrorMetadata::builder().code(code).build();
        let raw = Response::new(StatusCode::try_from(status).unwrap(), SdkBody::empty());
        SdkError::service_error(GetObjectError::generic(meta), raw)
    }

    #[test]
    fn throttling_and_server_errors_are_retryable() {
        assert_eq!(
            classify(&service_error(503, "SlowDown")),
            FailureClass::Retryable
        );
        assert_eq!(
            classify(&service_error(500, "InternalError")),
            FailureClass::Retryable
        );
        assert_eq!(
            classify(&service_error(400, "RequestTimeout")),
            FailureClass::Retryable
        );
        assert_eq!(classify(&service_error(429, "")), FailureClass::Retryable);
    }

    #[test]
    fn slow_down_is_told_apart_from_other_retryable_errors_by_its_code() {
        let throttled = |status, code| {
            from_sdk(
                "PutObject",
                "s3://b/k".into(),
                "s3:PutObject",
                service_error(status, code),
            )
            .is_throttled()
        };
        assert!(throttled(503, "SlowDown"));
        assert!(throttled(429, ""));
        assert!(throttled(400, "ThrottlingException"));
        assert!(!throttled(503, "ServiceUnavailable"));
        assert!(!throttled(500, "InternalError"));
        assert!(!throttled(403, "AccessDenied"));
    }

    #[test]
    fn permission_and_missing_things_are_permanent() {
        assert_eq!(
            classify(&service_error(403, "AccessDenied")),
            FailureClass::AccessDenied
        );
        assert_eq!(
            classify(&service_error(404, "NoSuchBucket")),
            FailureClass::NoSuchBucket
        );
        assert_eq!(
            classify(&service_error(404, "NoSuchKey")),
            FailureClass::NotFound
        );
        assert_eq!(
            classify(&service_error(412, "PreconditionFailed")),
            FailureClass::Precondition
        );
        assert_eq!(
            classify(&service_error(400, "InvalidArgument")),
            FailureClass::Permanent
        );
    }

    /// S3 clients whose every GET, HEAD, PUT and CopyObject answers `status` with the
    /// error document of `code` (no body at all for HEAD, as S3 does), through the real
    /// SDK's response parsing: what S3 answers, not a hand-built error.
    mod answered {
        use crate::adapters::s3::S3Store;
        use crate::object_store::{ObjectStore, WriteAttrs};
        use aws_smithy_mocks::{RuleMode, mock, mock_client};
        use bytes::Bytes;

        fn document(code: &str) -> String {
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>said by the mock</Message></Error>"
            )
        }

        fn store(status: u16, code: &str) -> S3Store {
            let body = document(code);
            let (b1, b2, b3) = (body.clone(), body.clone(), body);
            let get = mock!(aws_sdk_s3::Client::get_object)
                .then_http_response(move || http_response(status, &b1));
            let put = mock!(aws_sdk_s3::Client::put_object)
                .then_http_response(move || http_response(status, &b2));
            let copy = mock!(aws_sdk_s3::Client::copy_object)
                .then_http_response(move || http_response(status, &b3));
            let head = mock!(aws_sdk_s3::Client::head_object)
                .then_http_response(move || http_response(status, ""));
            let client = mock_client!(
                aws_sdk_s3,
                RuleMode::MatchAny,
                [&get, &put, &copy, &head],
                |c| c.retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
            );
            S3Store::new(client, "b".into())
        }

        fn http_response(status: u16, body: &str) -> aws_smithy_runtime_api::http::Response {
            aws_smithy_runtime_api::http::Response::new(
                aws_smithy_runtime_api::http::StatusCode::try_from(status).unwrap(),
                aws_smithy_types::body::SdkBody::from(body.to_string()),
            )
        }

        async fn get(status: u16, code: &str) -> super::Error {
            store(status, code).get("k", None, "e").await.unwrap_err()
        }

        async fn put(status: u16, code: &str) -> super::Error {
            let attrs = WriteAttrs::default();
            store(status, code)
                .put("k", Bytes::from_static(b"x"), &attrs)
                .await
                .unwrap_err()
        }

        #[tokio::test]
        async fn access_denied_403_is_a_missing_permission() {
            let err = get(403, "AccessDenied").await;
            assert!(
                matches!(
                    err,
                    super::Error::AccessDenied {
                        permission: "s3:GetObject",
                        ..
                    }
                ),
                "{err:?}"
            );
            assert!(!err.is_retryable());
        }

        #[tokio::test]
        async fn a_bare_403_on_head_is_a_missing_permission() {
            let err = store(403, "AccessDenied").head("k").await.unwrap_err();
            assert!(
                matches!(
                    err,
                    super::Error::AccessDenied {
                        operation: "HeadObject",
                        ..
                    }
                ),
                "{err:?}"
            );
        }

        #[tokio::test]
        async fn invalid_object_state_403_is_an_archived_object_not_a_permission() {
            let err = get(403, "InvalidObjectState").await;
            assert!(
                matches!(
                    err,
                    super::Error::ObjectArchived {
                        operation: "GetObject",
                        ..
                    }
                ),
                "{err:?}"
            );
            assert!(!err.is_retryable());
            assert_eq!(err.kind(), "ObjectArchived");
            assert!(err.to_string().contains("s3://b/k is archived"), "{err}");
            assert!(!err.to_string().contains("permission"), "{err}");
        }

        #[tokio::test]
        async fn object_not_in_active_tier_403_on_copy_is_an_archived_source() {
            let err = store(403, "ObjectNotInActiveTierError")
                .copy_from("src", "k", "e", &WriteAttrs::default())
                .await
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    super::Error::ObjectArchived {
                        operation: "CopyObject",
                        ..
                    }
                ),
                "{err:?}"
            );
            assert!(!err.is_retryable());
        }

        #[tokio::test]
        async fn other_403s_are_reported_with_their_code() {
            for code in ["AccountProblem", "InvalidPayer", "AllAccessDisabled"] {
                let err = get(403, code).await;
                assert!(
                    matches!(err, super::Error::Service { .. }),
                    "{code}: {err:?}"
                );
                assert!(!err.is_retryable(), "{code}");
                assert!(err.to_string().contains(code), "{err}");
            }
        }

        #[tokio::test]
        async fn credentials_refused_403_is_access_denied() {
            for code in ["SignatureDoesNotMatch", "InvalidAccessKeyId"] {
                let err = get(403, code).await;
                assert!(
                    matches!(err, super::Error::AccessDenied { .. }),
                    "{code}: {err:?}"
                );
            }
        }

        #[tokio::test]
        async fn conditional_request_conflict_409_is_retryable() {
            let err = put(409, "ConditionalRequestConflict").await;
            assert!(
                matches!(
                    err,
                    super::Error::Transient {
                        operation: "PutObject",
                        ..
                    }
                ),
                "{err:?}"
            );
            assert!(err.is_retryable());
        }

        #[tokio::test]
        async fn operation_aborted_409_is_retryable() {
            let err = put(409, "OperationAborted").await;
            assert!(err.is_retryable(), "{err:?}");
        }

        #[tokio::test]
        async fn other_409s_are_permanent() {
            let err = put(409, "BucketAlreadyExists").await;
            assert!(matches!(err, super::Error::Service { .. }), "{err:?}");
            assert!(!err.is_retryable());
        }
    }

    #[test]
    fn invalid_object_state_is_not_access_denied() {
        assert_eq!(
            classify(&service_error(403, "InvalidObjectState")),
            FailureClass::ObjectArchived
        );
        assert_eq!(
            classify(&service_error(403, "AllAccessDisabled")),
            FailureClass::Permanent
        );
        assert_eq!(
            classify(&service_error(403, "SignatureDoesNotMatch")),
            FailureClass::AccessDenied
        );
        assert_eq!(
            classify(&service_error(409, "ConditionalRequestConflict")),
            FailureClass::Retryable
        );
        assert_eq!(
            classify(&service_error(409, "OperationAborted")),
            FailureClass::Retryable
        );
    }

    #[test]
    fn access_denied_names_the_permission() {
        let err = from_sdk(
            "PutObject",
            "s3://target/a.txt".into(),
            s3_permission("PutObject"),
            service_error(403, "AccessDenied"),
        );
        assert!(!err.is_retryable());
        assert_eq!(
            err.to_string(),
            "access denied: PutObject on s3://target/a.txt needs permission s3:PutObject"
        );
        let err = from_sdk(
            "GetObject",
            "s3://gone/a.txt".into(),
            s3_permission("GetObject"),
            service_error(404, "NoSuchBucket"),
        );
        assert_eq!(err.to_string(), "bucket 'gone' does not exist (GetObject)");
    }
}
