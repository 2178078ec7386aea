//! What a deployment may touch: the buckets of the stack's `SourceBuckets` and
//! `TargetBuckets` parameters (`CRR_SOURCE_BUCKETS` / `CRR_TARGET_BUCKETS`), and the S3
//! endpoints of its `AllowedEndpoints` parameter (`CRR_ALLOWED_ENDPOINTS`).
//!
//! IAM already denies other buckets; the bucket check refuses such a rule by name, with a
//! message saying which parameter to change, instead of an AccessDenied half-way through a
//! copy. Unset (local stacks, tests): any bucket.
//!
//! IAM cannot stop a request to a host outside AWS: a rule's `endpoint_url` comes from the
//! table, so whoever can write the table could point an allowed bucket name at a host of
//! theirs and receive source objects (signed with the function's credentials). The
//! endpoint check refuses every rule naming an endpoint the deployment does not list,
//! before any request is made. `CRR_ALLOWED_ENDPOINTS` is a comma-separated list of
//! `scheme://host[:port]` entries:
//!
//! - unset or empty (the default): no custom endpoint at all. Only rules without
//!   `endpoint_url` are accepted; the SDK then reaches AWS's own S3 endpoint for the
//!   rule's region over https (`https://s3.<region>.amazonaws.com`, `.amazonaws.com.cn` in
//!   China), or the deployment's own `AWS_ENDPOINT_URL_S3` when that is set;
//! - `https://oss-cn-hangzhou.aliyuncs.com`: exactly that scheme and host, on the scheme's
//!   default port (443; 80 for http), written with or without it;
//! - `https://*.aliyuncs.com`: any host with at least one label before `.aliyuncs.com`
//!   (not `aliyuncs.com` itself, not `evilaliyuncs.com`);
//! - `http://127.0.0.1:9000`: that port only; `http://127.0.0.1:*`: any port of that host.
//!
//! Scheme and host compare case-insensitively, nothing else is normalised (`localhost` is
//! not `127.0.0.1`). A rule's endpoint with user info, a path, a query or a fragment
//! matches no entry. An entry that does not parse fails the function at start
//! (`FunctionConfig::from_env`).

use crate::error::{Error, Result};
use crate::rule::Rule;

/// Allowed bucket names per role (`None` allows any) and allowed S3 endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedBuckets {
    pub sources: Option<Vec<String>>,
    pub targets: Option<Vec<String>>,
    pub endpoints: AllowedEndpoints,
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

/// Environment variable listing the custom S3 endpoints a deployment may use.
pub const ALLOWED_ENDPOINTS_ENV: &str = "CRR_ALLOWED_ENDPOINTS";

impl AllowedBuckets {
    /// From `CRR_SOURCE_BUCKETS`, `CRR_TARGET_BUCKETS` and `CRR_ALLOWED_ENDPOINTS`.
    pub fn from_env() -> Self {
        Self {
            sources: list(std::env::var("CRR_SOURCE_BUCKETS").ok()),
            targets: list(std::env::var("CRR_TARGET_BUCKETS").ok()),
            endpoints: AllowedEndpoints::from_env(),
        }
    }

    /// Refuses a rule naming a bucket outside the lists, or an endpoint not allowed.
    pub fn check(&self, rule: &Rule) -> Result<()> {
        self.check_bucket(rule, Side::Source)?;
        self.check_bucket(rule, Side::Target)?;
        self.endpoints.check(rule)
    }

    /// Refuses a rule whose `side` bucket is outside its list.
    pub fn check_bucket(&self, rule: &Rule, side: Side) -> Result<()> {
        let (bucket, allowed, variable) = match side {
            Side::Source => (
                &rule.source.bucket,
                &self.sources,
                "CRR_SOURCE_BUCKETS (stack parameter SourceBuckets)",
            ),
            Side::Target => (
                &rule.target.bucket,
                &self.targets,
                "CRR_TARGET_BUCKETS (stack parameter TargetBuckets)",
            ),
        };
        match allowed {
            Some(names) if !names.iter().any(|n| n == bucket) => Err(Error::BucketNotAllowed {
                rule_id: rule.id.clone(),
                role: side.as_str(),
                bucket: bucket.clone(),
                variable,
            }),
            _ => Ok(()),
        }
    }
}

/// One side of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Target,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Target => "target",
        }
    }
}

/// The custom S3 endpoints rules may name (see the module documentation).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AllowedEndpoints {
    /// No check at all. The library's default for in-process use (tests, tools); never
    /// what a function reads from its environment.
    #[default]
    Unchecked,
    /// Rules without `endpoint_url` (AWS over https), and endpoints matching these.
    Only(Vec<EndpointPattern>),
}

impl AllowedEndpoints {
    /// AWS's own endpoints only: the default of `CRR_ALLOWED_ENDPOINTS`.
    pub fn aws_only() -> Self {
        AllowedEndpoints::Only(vec![])
    }

    /// From `CRR_ALLOWED_ENDPOINTS`; unset or empty: AWS only. An entry that does not
    /// parse allows nothing (and is logged); `FunctionConfig::from_env` refuses to start
    /// with one, so a deployment never runs with it.
    pub fn from_env() -> Self {
        Self::lenient(
            std::env::var(ALLOWED_ENDPOINTS_ENV)
                .unwrap_or_default()
                .split(','),
        )
    }

    /// From entries, an entry that does not parse allowing nothing (it is logged).
    pub fn lenient<'a>(entries: impl IntoIterator<Item = &'a str>) -> Self {
        let mut patterns = Vec::new();
        for entry in entries.into_iter().map(str::trim).filter(|e| !e.is_empty()) {
            match EndpointPattern::parse(entry) {
                Ok(pattern) => patterns.push(pattern),
                Err(reason) => tracing::error!(
                    entry = %crate::error::clip(entry, 200), reason = %reason,
                    "an allowed-endpoint entry does not parse; it allows nothing"
                ),
            }
        }
        AllowedEndpoints::Only(patterns)
    }

    /// Parses a comma-separated list of entries (empty: AWS only); the error names the
    /// first entry that is not `scheme://host[:port]`.
    pub fn parse(value: &str) -> Result<Self> {
        Self::from_entries(value.split(','))
    }

    /// From entries one by one (blank ones ignored).
    pub fn from_entries<'a>(entries: impl IntoIterator<Item = &'a str>) -> Result<Self> {
        let patterns = entries
            .into_iter()
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(|e| {
                EndpointPattern::parse(e).map_err(|reason| {
                    Error::Config(format!(
                        "{ALLOWED_ENDPOINTS_ENV} entry '{}' {reason}",
                        crate::error::clip(e, 200)
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AllowedEndpoints::Only(patterns))
    }

    /// The entries, as written in `CRR_ALLOWED_ENDPOINTS` (empty for `Unchecked`).
    pub fn entries(&self) -> Vec<String> {
        match self {
            AllowedEndpoints::Unchecked => vec![],
            AllowedEndpoints::Only(p) => p.iter().map(|p| p.text.clone()).collect(),
        }
    }

    /// What is allowed, in words, for error messages.
    pub fn describe(&self) -> String {
        match self {
            AllowedEndpoints::Unchecked => "any endpoint".into(),
            AllowedEndpoints::Only(p) if p.is_empty() => "AWS endpoints only".into(),
            AllowedEndpoints::Only(_) => format!("AWS endpoints and {}", self.entries().join(", ")),
        }
    }

    /// Refuses a rule naming, on either side, an endpoint not allowed.
    pub fn check(&self, rule: &Rule) -> Result<()> {
        self.check_side(rule, Side::Source)?;
        self.check_side(rule, Side::Target)
    }

    /// Refuses a rule whose `side` names an endpoint not allowed. A side without an
    /// endpoint is reached at AWS over https; its region must then be a plain region
    /// name, so that it cannot steer the SDK's endpoint anywhere else.
    pub fn check_side(&self, rule: &Rule, side: Side) -> Result<()> {
        let AllowedEndpoints::Only(patterns) = self else {
            return Ok(());
        };
        let bucket = match side {
            Side::Source => &rule.source,
            Side::Target => &rule.target,
        };
        let refused = |endpoint: String| Error::EndpointNotAllowed {
            rule_id: rule.id.clone(),
            role: side.as_str(),
            endpoint,
            allowed: self.describe(),
        };
        match &bucket.endpoint_url {
            None if crate::rule::is_region_name(&bucket.region) => Ok(()),
            None => Err(refused(format!(
                "AWS in region '{}' (not a region name)",
                crate::error::clip(&bucket.region, 100)
            ))),
            Some(url) => match Endpoint::parse(url, false) {
                Ok(endpoint) if patterns.iter().any(|p| p.matches(&endpoint)) => Ok(()),
                _ => Err(refused(crate::error::clip(url, 200))),
            },
        }
    }
}

/// One entry of `CRR_ALLOWED_ENDPOINTS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointPattern {
    /// As written (trimmed).
    pub text: String,
    endpoint: Endpoint,
}

impl EndpointPattern {
    /// Parses `scheme://host[:port]`, where host may start with `*.` and port may be `*`.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let text = text.trim();
        Ok(Self {
            text: text.to_string(),
            endpoint: Endpoint::parse(text, true)?,
        })
    }

    fn matches(&self, url: &Endpoint) -> bool {
        let p = &self.endpoint;
        let host = match p.host.strip_prefix('*') {
            // `suffix` keeps its leading dot: `a.example.com` ends with `.example.com`,
            // `example.com` and `evilexample.com` do not.
            Some(suffix) => url.host.len() > suffix.len() && url.host.ends_with(suffix),
            None => url.host == p.host,
        };
        let port = match (p.port, url.port) {
            (Port::Any, _) => true,
            (a, b) => a == b,
        };
        p.scheme == url.scheme && host && port
    }
}

/// Port of an endpoint: explicit or the scheme's default, or any (patterns only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Port {
    Number(u16),
    Any,
}

/// `scheme://host[:port]`, lower-cased, with the port made explicit.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Endpoint {
    scheme: String,
    host: String,
    port: Port,
}

impl Endpoint {
    /// Parses an endpoint URL; `pattern` allows `*.` before the host and `*` as port.
    /// Only `scheme://host[:port]` with an optional trailing `/`: no user info, path,
    /// query or fragment, which could make two spellings of one URL reach different hosts.
    fn parse(text: &str, pattern: bool) -> std::result::Result<Self, String> {
        let (scheme, rest) = text
            .split_once("://")
            .ok_or("is not a URL (scheme://host[:port])")?;
        let scheme = scheme.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "https" => 443,
            "http" => 80,
            _ => return Err("must start with http:// or https://".into()),
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#', '@', '\\']) {
            return Err(
                "must be scheme://host[:port], without user, path, query or fragment".into(),
            );
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (addr, after) = v6.split_once(']').ok_or("has an unclosed '['")?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or("has something after ']'")?),
            };
            if addr.is_empty()
                || !addr
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
            {
                return Err("has an invalid IPv6 address".into());
            }
            (format!("[{}]", addr.to_ascii_lowercase()), port)
        } else {
            let (host, port) = match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            };
            let host = host.to_ascii_lowercase();
            let name = match host.strip_prefix("*.") {
                Some(rest) if pattern => rest,
                _ => host.as_str(),
            };
            let labels_ok = !name.is_empty()
                && name.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                });
            if !labels_ok {
                return Err("has an invalid host name".into());
            }
            (host, port)
        };
        let port = match port {
            None => Port::Number(default_port),
            Some("*") if pattern => Port::Any,
            Some(p) => Port::Number(
                p.parse::<u16>()
                    .ok()
                    .filter(|_| p.chars().all(|c| c.is_ascii_digit()))
                    .ok_or("has an invalid port")?,
            ),
        };
        Ok(Self { scheme, host, port })
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
            endpoints: AllowedEndpoints::aws_only(),
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

    fn with_endpoints(source: Option<&str>, target: Option<&str>) -> Rule {
        let mut r = rule("r1", "src", "dst");
        r.source.endpoint_url = source.map(str::to_string);
        r.target.endpoint_url = target.map(str::to_string);
        r
    }

    fn allows(list: &str, url: &str) -> bool {
        let allowed = AllowedEndpoints::parse(list).unwrap();
        allowed.check(&with_endpoints(Some(url), None)).is_ok()
    }

    #[test]
    fn by_default_only_rules_without_an_endpoint_are_accepted() {
        let aws = AllowedEndpoints::parse("").unwrap();
        assert_eq!(aws, AllowedEndpoints::aws_only());
        assert_eq!(AllowedEndpoints::parse(" , ").unwrap(), aws);
        assert!(aws.check(&with_endpoints(None, None)).is_ok());
        for url in [
            "http://127.0.0.1:9000",
            "https://s3.us-east-1.amazonaws.com",
            "https://attacker.example",
        ] {
            for r in [
                with_endpoints(Some(url), None),
                with_endpoints(None, Some(url)),
            ] {
                let err = aws.check(&r).unwrap_err();
                assert_eq!(err.kind(), "EndpointNotAllowed");
                assert!(!err.is_retryable());
                let msg = err.to_string();
                assert!(
                    msg.contains(url)
                        && msg.contains("AWS endpoints only")
                        && msg.contains("CRR_ALLOWED_ENDPOINTS"),
                    "{msg}"
                );
            }
        }
        // Without an endpoint the region builds the host name: it must be a region.
        let mut r = with_endpoints(None, None);
        r.source.region = "evil.example/x".into();
        assert_eq!(aws.check(&r).unwrap_err().kind(), "EndpointNotAllowed");
        // The library's own default checks nothing (in-process use only).
        assert!(
            AllowedEndpoints::default()
                .check(&with_endpoints(Some("http://x"), None))
                .is_ok()
        );
    }

    #[test]
    fn entries_match_scheme_host_and_port_exactly() {
        let list = "http://127.0.0.1:9000, https://oss-cn-hangzhou.aliyuncs.com";
        assert!(allows(list, "http://127.0.0.1:9000"));
        assert!(allows(list, "http://127.0.0.1:9000/"));
        assert!(allows(list, "HTTP://127.0.0.1:9000"));
        assert!(allows(list, "https://OSS-cn-hangzhou.aliyuncs.com"));
        assert!(allows(list, "https://oss-cn-hangzhou.aliyuncs.com:443"));
        for refused in [
            "http://127.0.0.1:9001",
            "https://127.0.0.1:9000",
            "http://127.0.0.1",
            "http://localhost:9000",
            "http://127.0.0.2:9000",
            "http://oss-cn-hangzhou.aliyuncs.com",
            "https://oss-cn-hangzhou.aliyuncs.com:8443",
            "https://oss-cn-hangzhou.aliyuncs.com.evil.example",
            "https://oss-cn-hangzhou.aliyuncs.com@evil.example",
            "https://evil.example#@oss-cn-hangzhou.aliyuncs.com",
            "https://evil.example\\@oss-cn-hangzhou.aliyuncs.com",
            "https://oss-cn-hangzhou.aliyuncs.com/path",
            "https://oss-cn-hangzhou.aliyuncs.com?x=1",
            "http://127.0.0.1:9000.evil.example",
            "http://127.0.0.1:09000x",
            "ftp://127.0.0.1:9000",
            "127.0.0.1:9000",
        ] {
            assert!(!allows(list, refused), "{refused} was allowed");
        }
    }

    #[test]
    fn wildcards_cover_subdomains_and_ports_only() {
        let list = "https://*.aliyuncs.com,http://127.0.0.1:*";
        assert!(allows(list, "https://oss-cn-hangzhou.aliyuncs.com"));
        assert!(allows(list, "https://a.b.aliyuncs.com"));
        assert!(!allows(list, "https://aliyuncs.com"));
        assert!(!allows(list, "https://evilaliyuncs.com"));
        assert!(!allows(list, "http://oss.aliyuncs.com"));
        assert!(allows(list, "http://127.0.0.1:31101"));
        assert!(allows(list, "http://127.0.0.1"));
        assert!(!allows(list, "http://127.0.0.10:31101"));
        assert!(!allows(list, "https://127.0.0.1:31101"));
        // Wildcards belong to entries, never to a rule's endpoint.
        assert!(!allows(list, "https://*.aliyuncs.com"));
        assert!(!allows(list, "http://127.0.0.1:*"));
        assert!(allows("http://[::1]:9000", "http://[::1]:9000"));
        assert!(!allows("http://[::1]:9000", "http://[::2]:9000"));
    }

    #[test]
    fn an_entry_that_does_not_parse_is_named() {
        for bad in [
            "127.0.0.1:9000",
            "s3://bucket",
            "https://",
            "https://a/b",
            "https://user@host",
            "https://*",
            "http://host:99999",
        ] {
            let err = AllowedEndpoints::parse(&format!("https://ok.example,{bad}")).unwrap_err();
            assert!(
                matches!(err, Error::Config(_)) && err.to_string().contains(bad),
                "{bad}: {err}"
            );
        }
        // Read leniently (a deployment record, an environment at run time), a bad entry
        // allows nothing and the others still apply.
        let lenient = AllowedEndpoints::lenient(["https://ok.example", "ok.example", "http://*"]);
        assert_eq!(lenient.entries(), ["https://ok.example"]);
        let allowed = AllowedEndpoints::parse("https://a.example, http://b:1 ").unwrap();
        assert_eq!(allowed.entries(), ["https://a.example", "http://b:1"]);
        assert_eq!(
            allowed.describe(),
            "AWS endpoints and https://a.example, http://b:1"
        );
    }
}
