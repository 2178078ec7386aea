//! Tolerance for S3-compatible servers that answer a success with an XML document whose
//! root element differs from S3's (moto names some `...Response` where S3 names them
//! `...Result` / `NotificationConfiguration`). The SDK rejects such a document; these
//! helpers recognise exactly that case so the answer can be used. Nothing else is
//! accepted: any other unparsable answer stays an error.

use aws_sdk_s3::error::SdkError;
use aws_smithy_runtime_api::http::Response;

/// The body of a successful response whose XML root element is `root`.
pub fn success_body_with_root<E>(err: &SdkError<E, Response>, root: &str) -> Option<String> {
    let raw = err.raw_response()?;
    if !raw.status().is_success() {
        return None;
    }
    let body = String::from_utf8_lossy(raw.body().bytes()?).into_owned();
    body.contains(&format!("<{root}")).then_some(body)
}

/// The text of the first `<name>...</name>` element.
pub fn xml_text(body: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let start = body.find(&open)? + open.len();
    let end = body[start..].find(&format!("</{name}>"))? + start;
    Some(
        body[start..end]
            .replace("&quot;", "\"")
            .replace("&#34;", "\""),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_element_text() {
        let body = "<CompleteMultipartUploadResponse><ETag>&quot;abc-3&quot;</ETag></CompleteMultipartUploadResponse>";
        assert_eq!(xml_text(body, "ETag").as_deref(), Some("\"abc-3\""));
        assert_eq!(xml_text(body, "Key"), None);
    }
}
