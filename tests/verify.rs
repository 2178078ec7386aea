//! `crr verify` against the local stack: seeded drift of each kind is reported (exit 1),
//! a true copy is not (exit 0); on moto -> moto and on moto -> s3s-fs.

use std::process::Output;

use anyhow::{Context, Result};
use aws_sdk_s3::primitives::ByteStream;
use crr_shared::copy::marker;
use crr_shared::rule::Notify;
use crr_shared::rule_admin::create_rule;
use crr_shared::verify::{Drift, DriftKind, VerifySummary};
use crr_tests::{S3Server, Stack, rule, unique};

const MIB: usize = 1024 * 1024;

async fn put(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    body: &[u8],
    meta: &[(&str, &str)],
) -> Result<String> {
    let mut req = s3
        .put_object()
        .bucket(bucket)
        .key(key)
        .content_type("application/octet-stream")
        .body(ByteStream::from(body.to_vec()));
    for (k, v) in meta {
        req = req.metadata(*k, *v);
    }
    let out = req.send().await.with_context(|| format!("put {key}"))?;
    Ok(out
        .e_tag()
        .unwrap_or_default()
        .trim_matches('"')
        .to_string())
}

/// Uploads `body` in parts of `part` bytes through crr's own S3 store (which copes with
/// moto's misnamed CompleteMultipartUpload answer); returns the ETag.
async fn put_multipart(
    stack: &Stack,
    server: &S3Server,
    bucket: &str,
    key: &str,
    body: &[u8],
    part: usize,
) -> Result<String> {
    use crr_shared::object_store::{ContentHeaders, ObjectStore, UploadedPart, WriteAttrs};
    let store = stack.s3_clients().store(&server.bucket(bucket));
    let attrs = WriteAttrs {
        headers: ContentHeaders {
            content_type: Some("application/octet-stream".into()),
            ..ContentHeaders::default()
        },
        ..WriteAttrs::default()
    };
    let id = store.create_multipart(key, &attrs).await?;
    let mut parts = vec![];
    for (i, chunk) in body.chunks(part).enumerate() {
        let part_number = i as i32 + 1;
        let etag = store
            .upload_part(
                key,
                &id,
                part_number,
                bytes::Bytes::from(chunk.to_vec()),
                None,
            )
            .await?;
        parts.push(UploadedPart { part_number, etag });
    }
    Ok(store
        .complete_multipart(key, &id, &parts, None, None)
        .await?)
}

fn verify(
    stack: &Stack,
    table: &str,
    rule_id: &str,
    extra: &[&str],
) -> Result<(i32, Vec<Drift>, VerifySummary)> {
    let mut args = vec!["verify", rule_id, "--json"];
    args.extend_from_slice(extra);
    let out: Output = stack.crr_command(table, &args)?.output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut drifts = vec![];
    let mut summary = None;
    for line in stdout.lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
        match value.get("summary") {
            Some(s) => summary = Some(serde_json::from_value(s.clone())?),
            None => drifts.push(serde_json::from_value(value)?),
        }
    }
    let summary = summary.with_context(|| {
        format!(
            "no summary; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok((out.status.code().unwrap_or(-1), drifts, summary))
}

async fn seeded_drift_is_reported(stack: &Stack, target_server: &S3Server) -> Result<()> {
    let table = unique("verify");
    let state = stack.state(&table).await?;
    let (source, target) = stack.bucket_pair(&stack.a, target_server).await?;
    let mut r = rule(
        &unique("rule"),
        stack.a.bucket(&source),
        target_server.bucket(&target),
    );
    r.notify = Notify::External;
    let r = create_rule(&state, &stack.s3_clients(), r).await?;
    let (s3a, s3b) = (stack.s3(&stack.a), stack.s3(target_server));

    // In place: same bytes and metadata; a multipart source whose replica was written in
    // one piece carries the source's ETag in its marker.
    for s3 in [&s3a, &s3b] {
        put(
            s3,
            if std::ptr::eq(s3, &s3a) {
                &source
            } else {
                &target
            },
            "same.txt",
            b"same",
            &[("k", "v")],
        )
        .await?;
    }
    let big: Vec<u8> = (0..6 * MIB).map(|i| (i % 253) as u8).collect();
    let big_etag = put_multipart(stack, &stack.a, &source, "big.bin", &big, 5 * MIB).await?;
    put(
        &s3b,
        &target,
        "big.bin",
        &big,
        &[(marker::SOURCE_ETAG, &big_etag)],
    )
    .await?;
    // Drift of each kind.
    put(&s3a, &source, "missing.txt", b"only in the source", &[]).await?;
    put(&s3b, &target, "extra.txt", b"only in the target", &[]).await?;
    put(&s3a, &source, "samesize.txt", b"content A", &[]).await?;
    put(&s3b, &target, "samesize.txt", b"content B", &[]).await?;
    put(&s3a, &source, "meta.txt", b"m", &[("color", "red")]).await?;
    put(&s3b, &target, "meta.txt", b"m", &[("color", "blue")]).await?;

    let (code, drifts, summary) = verify(stack, &table, &r.id, &[])?;
    assert_eq!(code, 1, "{drifts:?}");
    let found: Vec<(&str, DriftKind)> = drifts.iter().map(|d| (d.key.as_str(), d.kind)).collect();
    assert_eq!(
        found,
        vec![
            ("extra.txt", DriftKind::Extra),
            ("meta.txt", DriftKind::Different),
            ("missing.txt", DriftKind::Missing),
            ("samesize.txt", DriftKind::Different),
        ],
        "{drifts:?}"
    );
    assert_eq!(
        (
            summary.matching,
            summary.missing,
            summary.extra,
            summary.different
        ),
        (2, 1, 1, 2)
    );
    assert_eq!((summary.missing_bytes, summary.extra_bytes), (18, 18));

    // A replica vouched by its marker but with other bytes of the same size: only the
    // content checksum sees it.
    let mut tampered = big.clone();
    tampered[3 * MIB] ^= 0xff;
    put(
        &s3b,
        &target,
        "big.bin",
        &tampered,
        &[(marker::SOURCE_ETAG, &big_etag)],
    )
    .await?;
    let (_, drifts, _) = verify(stack, &table, &r.id, &[])?;
    assert!(!drifts.iter().any(|d| d.key == "big.bin"), "{drifts:?}");
    let (code, drifts, summary) = verify(stack, &table, &r.id, &["--checksum"])?;
    assert_eq!((code, summary.different), (1, 3));
    let big_drift = drifts
        .iter()
        .find(|d| d.key == "big.bin")
        .context("big.bin drift")?;
    assert!(big_drift.reason.starts_with("content md5"), "{big_drift:?}");

    // Repaired: no drift, exit 0, and the human summary says so.
    put(
        &s3b,
        &target,
        "big.bin",
        &big,
        &[(marker::SOURCE_ETAG, &big_etag)],
    )
    .await?;
    put(&s3b, &target, "missing.txt", b"only in the source", &[]).await?;
    s3b.delete_object()
        .bucket(&target)
        .key("extra.txt")
        .send()
        .await?;
    put(&s3b, &target, "samesize.txt", b"content A", &[]).await?;
    put(&s3b, &target, "meta.txt", b"m", &[("color", "red")]).await?;
    let (code, drifts, summary) = verify(stack, &table, &r.id, &["--checksum"])?;
    assert_eq!((code, drifts.len(), summary.matching), (0, 0, 5));
    let human = stack.crr(&table, &["verify", &r.id])?;
    assert!(
        human.contains("no drift: the target is a copy of the source"),
        "{human}"
    );
    Ok(())
}

#[tokio::test]
async fn verify_reports_missing_extra_and_different_objects_on_moto() -> Result<()> {
    let stack = Stack::from_env()?;
    seeded_drift_is_reported(&stack, &stack.b.clone()).await
}

#[tokio::test]
async fn verify_reports_missing_extra_and_different_objects_on_s3s_fs() -> Result<()> {
    let stack = Stack::from_env()?;
    seeded_drift_is_reported(&stack, &stack.s3s.clone()).await
}

#[tokio::test]
async fn verify_of_an_unknown_rule_is_a_one_line_error() -> Result<()> {
    let stack = Stack::from_env()?;
    let table = unique("verify");
    stack.state(&table).await?;
    let out = stack
        .crr_command(&table, &["verify", "no-such-rule"])?
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("no-such-rule"), "{stderr}");
    Ok(())
}
