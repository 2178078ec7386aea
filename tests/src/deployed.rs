//! What the IAM tests share: the IAM actions each AWS operation needs (tests/iam.rs checks
//! the template grants them, tests/deploy.rs that a deployed role does), and IAM policy
//! documents as a deployment's IAM returns them, with the evaluation of their grants.

use anyhow::{Context, Result, bail};

/// The IAM actions AWS requires for one operation (`service:Operation`, as the operation
/// log records it), as crr makes it (its writes carry tags and canned ACLs, so they need
/// the tagging and ACL permissions too).
pub fn actions_for(operation: &str) -> Result<Vec<&'static str>> {
    let (service, name) = operation
        .split_once(':')
        .with_context(|| format!("operation log line {operation:?}"))?;
    let actions: &[&str] = match (service.to_ascii_lowercase().as_str(), name) {
        ("s3", "HeadObject" | "GetObject") => &["s3:GetObject"],
        ("s3", "PutObject" | "CreateMultipartUpload" | "CopyObject") => &[
            "s3:PutObject",
            "s3:PutObjectTagging",
            "s3:PutObjectAcl",
            "s3:GetObject",
        ],
        ("s3", "UploadPart" | "CompleteMultipartUpload") => &["s3:PutObject"],
        ("s3", "UploadPartCopy") => &["s3:GetObject", "s3:PutObject"],
        ("s3", "AbortMultipartUpload") => &["s3:AbortMultipartUpload"],
        ("s3", "DeleteObject") => &["s3:DeleteObject"],
        ("s3", "ListObjectsV2") => &["s3:ListBucket"],
        ("s3", "GetObjectTagging") => &["s3:GetObjectTagging"],
        ("s3", "PutObjectTagging") => &["s3:PutObjectTagging"],
        ("s3", "GetObjectAcl") => &["s3:GetObjectAcl"],
        ("s3", "GetBucketOwnershipControls") => &["s3:GetBucketOwnershipControls"],
        ("s3", "PutObjectAcl") => &["s3:PutObjectAcl"],
        ("dynamodb", "GetItem") => &["dynamodb:GetItem"],
        ("dynamodb", "PutItem") => &["dynamodb:PutItem"],
        ("dynamodb", "UpdateItem") => &["dynamodb:UpdateItem"],
        ("dynamodb", "DeleteItem") => &["dynamodb:DeleteItem"],
        ("dynamodb", "Query") => &["dynamodb:Query"],
        ("dynamodb", "Scan") => &["dynamodb:Scan"],
        // The functions' transactions put, update and check items.
        ("dynamodb", "TransactWriteItems") => &[
            "dynamodb:PutItem",
            "dynamodb:UpdateItem",
            "dynamodb:ConditionCheckItem",
        ],
        ("sqs", "SendMessage") => &["sqs:SendMessage"],
        ("sqs", "SendMessageBatch") => &["sqs:SendMessage"],
        ("sqs", "GetQueueAttributes") => &["sqs:GetQueueAttributes"],
        ("cloudwatch", "GetMetricStatistics") => &["cloudwatch:GetMetricStatistics"],
        _ => bail!("operation {operation} has no IAM mapping in tests/src/deployed.rs: add it"),
    };
    Ok(actions.to_vec())
}

/// What Lambda's SQS event source mapping does with the function's role.
pub const EVENT_SOURCE_ACTIONS: [&str; 3] = [
    "sqs:ReceiveMessage",
    "sqs:DeleteMessage",
    "sqs:GetQueueAttributes",
];

/// One statement of an identity policy: Effect, Action and Resource only (the template's
/// conditions are on the status function's stats writes, which this does not evaluate).
#[derive(Debug, Clone)]
pub struct Statement {
    pub sid: Option<String>,
    pub allow: bool,
    pub actions: Vec<String>,
    pub resources: Vec<String>,
}

/// An identity policy document, as IAM's GetRolePolicy returns it: URL-encoded JSON on
/// AWS, plain JSON, or (moto) the Python repr of the parsed document.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub statements: Vec<Statement>,
}

impl Policy {
    pub fn parse(document: &str) -> Result<Self> {
        let text = if document.trim_start().starts_with('%') {
            percent_encoding::percent_decode_str(document)
                .decode_utf8()?
                .into_owned()
        } else {
            document.to_string()
        };
        let value: serde_json::Value = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(_) => serde_json::from_str(&python_repr_to_json(&text))
                .with_context(|| format!("policy document is neither JSON nor a repr: {text}"))?,
        };
        let strings = |v: Option<&serde_json::Value>| -> Vec<String> {
            match v {
                Some(serde_json::Value::String(s)) => vec![s.clone()],
                Some(serde_json::Value::Array(items)) => items
                    .iter()
                    .filter_map(|i| i.as_str().map(String::from))
                    .collect(),
                _ => vec![],
            }
        };
        let statements = match value.get("Statement") {
            Some(serde_json::Value::Array(items)) => items.clone(),
            Some(one) => vec![one.clone()],
            None => vec![],
        };
        Ok(Self {
            statements: statements
                .iter()
                .map(|s| Statement {
                    sid: s.get("Sid").and_then(|v| v.as_str()).map(String::from),
                    allow: s.get("Effect").and_then(|v| v.as_str()) == Some("Allow"),
                    actions: strings(s.get("Action")),
                    resources: strings(s.get("Resource")),
                })
                .collect(),
        })
    }

    /// Whether an Allow statement grants `action` on `resource` (no Deny is evaluated:
    /// the template has none).
    pub fn allows(&self, action: &str, resource: &str) -> bool {
        self.statements.iter().any(|s| {
            s.allow
                && s.actions
                    .iter()
                    .any(|a| wildcard_match(&a.to_ascii_lowercase(), &action.to_ascii_lowercase()))
                && s.resources.iter().any(|r| wildcard_match(r, resource))
        })
    }

    /// Every resource any Allow statement names for an action of `service` (`s3`, `sqs`).
    pub fn resources_of(&self, service: &str) -> Vec<String> {
        let prefix = format!("{service}:");
        self.statements
            .iter()
            .filter(|s| s.allow && s.actions.iter().any(|a| a.starts_with(&prefix)))
            .flat_map(|s| s.resources.clone())
            .collect()
    }
}

/// IAM's matching of ARNs and actions: `*` any run of characters, `?` any one.
pub fn wildcard_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// A Python literal (dicts, lists, strings, True/False/None) as JSON: moto's IAM returns
/// an inline policy as `str()` of the parsed document.
fn python_repr_to_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                out.push('"');
                while let Some(s) = chars.next() {
                    match s {
                        '\\' => {
                            if let Some(escaped) = chars.next() {
                                match escaped {
                                    '\'' => out.push('\''),
                                    other => {
                                        out.push('\\');
                                        out.push(other);
                                    }
                                }
                            }
                        }
                        '"' if c == '\'' => out.push_str("\\\""),
                        s if s == c => break,
                        s => out.push(s),
                    }
                }
                out.push('"');
            }
            c if c.is_ascii_alphabetic() => {
                let mut word = String::from(c);
                while let Some(n) = chars.peek().filter(|n| n.is_ascii_alphanumeric()) {
                    word.push(*n);
                    chars.next();
                }
                out.push_str(match word.as_str() {
                    "True" => "true",
                    "False" => "false",
                    "None" => "null",
                    other => other,
                });
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_python_repr_reads_as_the_json_document() -> Result<()> {
        let repr = r#"{'Version': '2012-10-17', 'Statement': [{'Sid': 'A', 'Effect': 'Allow', 'Action': ['s3:GetObject'], 'Resource': ['arn:aws:s3:::src/*'], 'Condition': {'Bool': {'x': True}}}, {'Effect': 'Allow', 'Action': 'sqs:SendMessage', 'Resource': "arn:aws:sqs:us-east-1:1:q'1"}]}"#;
        let policy = Policy::parse(repr)?;
        assert_eq!(policy.statements.len(), 2);
        assert!(policy.allows("s3:GetObject", "arn:aws:s3:::src/a/b"));
        assert!(!policy.allows("s3:GetObject", "arn:aws:s3:::other/a"));
        assert!(!policy.allows("s3:PutObject", "arn:aws:s3:::src/a"));
        assert!(policy.allows("sqs:SendMessage", "arn:aws:sqs:us-east-1:1:q'1"));
        let encoded = "%7B%22Statement%22%3A%7B%22Effect%22%3A%22Allow%22%2C%22Action%22%3A%22s3%3A%2A%22%2C%22Resource%22%3A%22%2A%22%7D%7D";
        assert!(Policy::parse(encoded)?.allows("s3:ListBucket", "arn:aws:s3:::x"));
        Ok(())
    }

    #[test]
    fn wildcards_match_as_iam_matches_them() {
        assert!(wildcard_match("arn:aws:s3:::b/*", "arn:aws:s3:::b/k/x"));
        assert!(!wildcard_match("arn:aws:s3:::b/*", "arn:aws:s3:::b"));
        assert!(wildcard_match("*", "anything"));
        assert!(wildcard_match("s3:Get*", "s3:GetObjectTagging"));
        assert!(wildcard_match("a?c", "abc"));
        assert!(!wildcard_match("a?c", "ac"));
    }
}
