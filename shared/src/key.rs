//! Object keys: the one validation every path applies (S3 notifications, EventBridge
//! events, backfill and verify listings).
//!
//! crr replicates every key S3 accepts: any UTF-8 string of 1 to 1024 bytes. That
//! includes keys with `.` or `..` segments, `//`, a trailing `/`, and control
//! characters. They are safe to pass on: aws-sdk-s3 signs the path as given
//! (`normalize_uri_path = false` for S3) and percent-encodes what is not unreserved, and
//! neither hyper nor the `http` crate normalise paths, so `a/../b` reaches S3 as that key
//! and not as `b`. A server that cannot hold such a key (s3s-fs stores objects as files)
//! refuses it itself, and that refusal is reported as the server's error.

/// S3's longest key, in bytes of UTF-8.
pub const MAX_KEY_BYTES: usize = 1024;

/// Checks that `key` is one S3 accepts; the reason otherwise, naming what is wrong.
pub fn check(key: &str) -> std::result::Result<(), String> {
    if key.is_empty() {
        return Err("is empty".into());
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(format!(
            "is {} bytes long, S3 allows {MAX_KEY_BYTES}",
            key.len()
        ));
    }
    Ok(())
}

/// Decodes a form-URL-encoded key ('+' standing for a space), as S3 writes keys in
/// notifications and in listings asked for with `encoding-type=url`.
pub fn form_decode(encoded: &str) -> std::result::Result<String, std::str::Utf8Error> {
    percent_encoding::percent_decode_str(&encoded.replace('+', " "))
        .decode_utf8()
        .map(|k| k.into_owned())
}

/// `key` as a one-line message shows it: control characters escaped, clipped.
pub fn shown(key: &str) -> String {
    crate::error::clip(&key.escape_default().to_string(), 100)
}

/// [`check`] for a key of `bucket` met outside an event (a listing, a request): the error
/// names the bucket and shows the key on one line.
pub fn check_in(bucket: &str, key: &str) -> crate::Result<()> {
    check(key).map_err(|reason| crate::Error::InvalidKey {
        bucket: bucket.to_string(),
        key: shown(key),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_s3_accepts_is_accepted() {
        let long = "日".repeat(341) + "a"; // 1024 bytes, multi-byte
        assert_eq!(long.len(), 1024);
        for key in [
            "a",
            "..",
            ".",
            "a/../b",
            "./x",
            "x/.",
            "a//b",
            "dir/",
            "/lead",
            "a\u{1}b",
            "tab\there",
            "new\nline",
            "sp ace+plus%25",
            long.as_str(),
        ] {
            assert_eq!(check(key), Ok(()), "{key:?}");
        }
    }

    #[test]
    fn empty_and_over_long_keys_say_why() {
        assert_eq!(check(""), Err("is empty".into()));
        let over = "é".repeat(513);
        assert_eq!(
            check(&over),
            Err("is 1026 bytes long, S3 allows 1024".into())
        );
    }
}
