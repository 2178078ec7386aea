//! Historical migration from an S3 Inventory report instead of a listing: the test writes
//! the report as S3 Inventory does (manifest.json and gzip-compressed CSV data files in a
//! bucket of its own, keys URL-encoded, a versioned bucket's columns), changes the source
//! after the report, and runs the real `crr-backfill` binary over it.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use crr_shared::backfill::{
    BackfillSettings, BackfillStore, Backfiller, Checkpoint, JobState, PageTally, Segment,
};
use crr_shared::copy::CopyEngine;
use crr_shared::dynamo::DynamoStore;
use crr_shared::rule::{Notify, Rule};
use crr_shared::rule_admin::create_rule;
use crr_tests::{RunningFunction, Stack, encode_key_like_s3, invoke, list_all, rule, seed, unique};
use md5::{Digest, Md5};

const SCHEMA: &str =
    "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag, StorageClass";

/// One CSV line of a versioned bucket's report, every field quoted.
fn row(bucket: &str, key: &str, version: &str, latest: bool, marker: bool, size: usize) -> String {
    let fields = [
        bucket.to_string(),
        encode_key_like_s3(key),
        version.to_string(),
        latest.to_string(),
        marker.to_string(),
        if marker {
            String::new()
        } else {
            size.to_string()
        },
        "2026-12-01T00:00:00.000Z".to_string(),
        "0123456789abcdef0123456789abcdef".to_string(),
        "STANDARD".to_string(),
    ];
    let quoted: Vec<String> = fields
        .iter()
        .map(|f| format!("\"{}\"", f.replace('"', "\"\"")))
        .collect();
    quoted.join(",")
}

fn gzip(text: &str) -> Result<Vec<u8>> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(text.as_bytes())?;
    Ok(e.finish()?)
}

async fn put(s3: &aws_sdk_s3::Client, bucket: &str, key: &str, body: Vec<u8>) -> Result<()> {
    s3.put_object()
        .bucket(bucket)
        .key(key)
        .body(body.into())
        .send()
        .await
        .with_context(|| format!("putting {key}"))?;
    Ok(())
}

struct Fixture {
    stack: Stack,
    table: String,
    state: DynamoStore,
    rule: Rule,
    /// The bucket the inventory reports are written to (on the source's server).
    reports: String,
}

async fn fixture(prefixes: &[&str]) -> Result<Fixture> {
    let stack = Stack::from_env()?;
    let table = unique("inv");
    let state = stack.state(&table).await?;
    let (source, target) = stack.bucket_pair(&stack.a, &stack.b).await?;
    let mut r = rule(
        &unique("rule"),
        stack.a.bucket(&source),
        stack.b.bucket(&target),
    );
    r.prefixes = prefixes.iter().map(|p| p.to_string()).collect();
    r.notify = Notify::External;
    r.copy_acl = false;
    let rule = create_rule(&state, &stack.s3_clients(), r).await?;
    let reports = unique("reports");
    stack.create_bucket(&stack.a, &reports).await?;
    Ok(Fixture {
        stack,
        table,
        state,
        rule,
        reports,
    })
}

impl Fixture {
    /// Writes a report of `files` (each a list of CSV lines) with `manifest` edited by
    /// `edit`; returns the manifest's `s3://` URL.
    async fn write_report(
        &self,
        name: &str,
        files: &[Vec<String>],
        edit: impl FnOnce(&mut serde_json::Value),
    ) -> Result<String> {
        let s3 = self.stack.s3(&self.stack.a);
        let source = &self.rule.source.bucket;
        let base = format!("inventory/{source}/{name}");
        let mut listed = Vec::new();
        for (i, lines) in files.iter().enumerate() {
            let key = format!("{base}/data/{i:04}-7d1c2f0e.csv.gz");
            let body = gzip(&(lines.join("\n") + "\n"))?;
            listed.push(serde_json::json!({
                "key": key,
                "size": body.len(),
                "MD5checksum": Md5::digest(&body)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>(),
            }));
            put(&s3, &self.reports, &key, body).await?;
        }
        let mut manifest = serde_json::json!({
            "sourceBucket": source,
            "destinationBucket": format!("arn:aws:s3:::{}", self.reports),
            "version": "2016-11-30",
            "creationTimestamp": "1764547200000",
            "fileFormat": "CSV",
            "fileSchema": SCHEMA,
            "files": listed,
        });
        edit(&mut manifest);
        let key = format!("{base}/2026-12-01T00-00Z/manifest.json");
        put(&s3, &self.reports, &key, manifest.to_string().into_bytes()).await?;
        Ok(format!("s3://{}/{key}", self.reports))
    }

    fn crr_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let out = self.stack.crr(&self.table, args)?;
        serde_json::from_str(&out).with_context(|| format!("crr {args:?}: {out}"))
    }

    /// `crr ARGS`'s failure: its stderr (the command must fail).
    fn crr_error(&self, args: &[&str]) -> Result<String> {
        let out = self.stack.crr_command(&self.table, args)?.output()?;
        ensure!(!out.status.success(), "crr {args:?} succeeded");
        Ok(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

#[tokio::test]
async fn a_migration_from_an_inventory_copies_what_the_source_holds_now() -> Result<()> {
    let f = fixture(&["data/", "ünï/"]).await?;
    let source = f.rule.source.bucket.clone();
    let odd = [
        "data/with space.txt",
        "data/plus+sign.txt",
        "data/100% sure.txt",
        "data/ünicode é/日本.txt",
        "ünï/a+b c%20d.txt",
    ];
    let mut objects: Vec<(String, Vec<u8>)> = odd
        .iter()
        .map(|k| (k.to_string(), format!("body of {k}").into_bytes()))
        .collect();
    for i in 0..14 {
        let key = format!("data/plain-{i:02}.txt");
        objects.push((key.clone(), format!("{key} ").repeat(1 + i).into_bytes()));
    }
    for key in ["data/changed.txt", "data/deleted.txt", "other/outside.txt"] {
        objects.push((key.to_string(), format!("old {key}").into_bytes()));
    }
    seed(&f.stack, &f.stack.a, &source, objects.clone(), 8).await?;

    // The report: the objects in two data files, plus a noncurrent version and a delete
    // marker (a versioned bucket's rows, both passed over).
    let mut lines: Vec<String> = objects
        .iter()
        .map(|(k, body)| row(&source, k, "v2", true, false, body.len()))
        .collect();
    lines.insert(
        3,
        row(&source, "data/with space.txt", "v1", false, false, 3),
    );
    lines.push(row(&source, "data/marker-only.txt", "v9", true, true, 0));
    let second = lines.split_off(lines.len() / 2);
    let in_scope = objects.iter().filter(|(k, _)| f.rule.matches_key(k));
    let (inventory_objects, inventory_bytes) = in_scope.fold((0u64, 0u64), |(n, b), (_, body)| {
        (n + 1, b + body.len() as u64)
    });
    let url = f.write_report("daily", &[lines, second], |_| {}).await?;

    // Since the report: one object changed, one deleted, one added.
    let s3a = f.stack.s3(&f.stack.a);
    put(
        &s3a,
        &source,
        "data/changed.txt",
        b"new content, after the report".to_vec(),
    )
    .await?;
    s3a.delete_object()
        .bucket(&source)
        .key("data/deleted.txt")
        .send()
        .await?;
    put(
        &s3a,
        &source,
        "data/added-later.txt",
        b"not in the report".to_vec(),
    )
    .await?;

    let started = f.stack.crr(
        &f.table,
        &["backfill", "start", &f.rule.id, "--inventory", &url],
    )?;
    ensure!(started.contains("from the inventory"), "{started}");

    // Small pages and segments: several segments per data file, several pages each, and
    // 5-second invocations that stop and resume from the checkpoints.
    let env = vec![
        "CRR_BACKFILL_PAGE_SIZE=3".to_string(),
        "CRR_BACKFILL_SEGMENT_OBJECTS=4".to_string(),
        "CRR_BACKFILL_LEASE_SECS=30".to_string(),
        "CRR_BACKFILL_MARGIN_SECS=1".to_string(),
        "CRR_BACKFILL_WORKERS=2".to_string(),
    ];
    let function = RunningFunction::start_direct(&f.stack, "crr-backfill", &f.table, 5, &env)?;
    let payload = serde_json::json!({ "rule_id": f.rule.id }).to_string();
    let begun = Instant::now();
    loop {
        let job = f.state.job(&f.rule.id).await?.context("job")?;
        if job.state.is_finished() || job.state == JobState::Failed {
            ensure!(job.state == JobState::Completed, "{job:?}");
            break;
        }
        ensure!(
            begun.elapsed() < Duration::from_secs(300),
            "not completed in 5 minutes: {job:?}"
        );
        let (failed, body) = invoke(function.port, "crr-backfill", &payload).await?;
        ensure!(!failed, "invocation failed: {body}");
    }

    // The target: every object of the report in scope that the source still holds, as
    // the source holds it now; nothing outside the prefixes, nothing not in the report.
    let source_now = list_all(&s3a, &source).await?;
    let target = list_all(&f.stack.s3(&f.stack.b), &f.rule.target.bucket).await?;
    let expected: BTreeMap<String, (i64, String)> = source_now
        .into_iter()
        .filter(|(k, _)| f.rule.matches_key(k) && k != "data/added-later.txt")
        .collect();
    ensure!(
        target == expected,
        "target {:?}\nexpected {:?}",
        target.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for key in odd {
        ensure!(target.contains_key(key), "{key} not copied");
    }
    let changed = f
        .stack
        .s3(&f.stack.b)
        .get_object()
        .bucket(&f.rule.target.bucket)
        .key("data/changed.txt")
        .send()
        .await?
        .body
        .collect()
        .await?
        .into_bytes();
    ensure!(&changed[..] == b"new content, after the report");

    // Totals from the report (the deleted object counted, then skipped).
    let job = f.state.job(&f.rule.id).await?.context("job")?;
    ensure!(
        (job.total_objects, job.total_bytes) == (inventory_objects, inventory_bytes),
        "{job:?}, expected {inventory_objects} objects, {inventory_bytes} bytes"
    );
    let segments = f.state.segments(&f.rule.id).await?;
    ensure!(segments.len() >= 4, "{} segments", segments.len());
    ensure!(segments.iter().all(|s| s.inventory_file.is_some()));
    let sum = |g: fn(&Segment) -> u64| segments.iter().map(g).sum::<u64>();
    ensure!(sum(|s| s.objects_done) == inventory_objects);
    ensure!(sum(|s| s.skipped) == 1, "deleted object not skipped once");
    ensure!(sum(|s| s.copied) == inventory_objects - 1);

    let status = f.crr_json(&["status", &f.rule.id, "--json"])?;
    let h = &status["rules"][0]["historical"];
    ensure!(h["state"] == "completed", "{h}");
    ensure!(h["total_source"] == "inventory", "{h}");
    ensure!(h["total_final"] == true, "{h}");
    ensure!(h["skipped"] == 1 && h["percent_objects"] == 100.0, "{h}");
    Ok(())
}

#[tokio::test]
async fn a_malformed_or_foreign_inventory_is_refused_with_the_field_at_fault() -> Result<()> {
    let f = fixture(&[]).await?;
    let source = f.rule.source.bucket.clone();
    seed(
        &f.stack,
        &f.stack.a,
        &source,
        vec![("k".into(), b"v".to_vec())],
        1,
    )
    .await?;
    let lines = vec![row(&source, "k", "v1", true, false, 1)];
    let cases: Vec<(String, &str)> = vec![
        (
            f.write_report("orc", std::slice::from_ref(&lines), |m| {
                m["fileFormat"] = "ORC".into()
            })
            .await?,
            "manifest field `fileFormat` is 'ORC': only CSV reports are read",
        ),
        (
            f.write_report("foreign", std::slice::from_ref(&lines), |m| {
                m["sourceBucket"] = "someone-elses".into()
            })
            .await?,
            "manifest field `sourceBucket` is 'someone-elses'",
        ),
        (
            f.write_report("nokey", std::slice::from_ref(&lines), |m| {
                m["fileSchema"] = "Bucket, Size".into()
            })
            .await?,
            "manifest field `fileSchema` has no Key column",
        ),
        (
            format!("s3://{}/inventory/none/manifest.json", f.reports),
            "no such manifest",
        ),
        ("inventory/manifest.json".to_string(), "not an s3:// URL"),
    ];
    for (url, expected) in cases {
        let error = f.crr_error(&["backfill", "start", &f.rule.id, "--inventory", &url])?;
        ensure!(error.contains(expected), "{url}: {error}");
        ensure!(error.contains(&url), "{url}: {error}");
        ensure!(error.lines().count() == 1, "{error}");
    }
    // Refused at the start: no job was made.
    ensure!(f.state.job(&f.rule.id).await?.is_none());

    // A data file that is not gzip fails the job with the file named.
    let url = f
        .write_report("ok", std::slice::from_ref(&lines), |_| {})
        .await?;
    f.stack.crr(
        &f.table,
        &["backfill", "start", &f.rule.id, "--inventory", &url],
    )?;
    let data = format!("inventory/{source}/ok/data/0000-7d1c2f0e.csv.gz");
    put(
        &f.stack.s3(&f.stack.a),
        &f.reports,
        &data,
        b"plain text, not gzip at all".to_vec(),
    )
    .await?;
    let env = vec!["CRR_BACKFILL_MARGIN_SECS=1".to_string()];
    let function = RunningFunction::start_direct(&f.stack, "crr-backfill", &f.table, 10, &env)?;
    let payload = serde_json::json!({ "rule_id": f.rule.id }).to_string();
    let (failed, body) = invoke(function.port, "crr-backfill", &payload).await?;
    ensure!(failed, "{body}");
    let job = f.state.job(&f.rule.id).await?.context("job")?;
    ensure!(job.state == JobState::Failed, "{job:?}");
    let error = job.last_error.unwrap_or_default();
    ensure!(
        error.contains(&format!("s3://{}/{data}", f.reports)) && error.contains("gzip"),
        "{error}"
    );
    Ok(())
}

#[tokio::test]
async fn a_stopped_run_resumes_after_the_last_checkpointed_row() -> Result<()> {
    let f = fixture(&[]).await?;
    let source = f.rule.source.bucket.clone();
    let objects: Vec<(String, Vec<u8>)> = (0..10)
        .map(|i| (format!("k{i}"), format!("object {i}").into_bytes()))
        .collect();
    seed(&f.stack, &f.stack.a, &source, objects.clone(), 8).await?;
    let lines: Vec<String> = objects
        .iter()
        .map(|(k, b)| row(&source, k, "v1", true, false, b.len()))
        .collect();
    let url = f.write_report("resume", &[lines], |_| {}).await?;

    let state = Arc::new(f.state.clone());
    let bf = Backfiller::new(
        state.clone(),
        state,
        Arc::new(f.stack.s3_clients()),
        CopyEngine::default(),
        BackfillSettings {
            page_size: 2,
            margin: Duration::ZERO,
            ..BackfillSettings::default()
        },
    );
    bf.start_from(&f.rule.id, Some(&url)).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let job = bf.count(&f.rule.id, deadline).await?;
    ensure!(
        job.planned && job.segments == 1 && job.total_objects == 10,
        "{job:?}"
    );

    // A run that stopped after rows 1-4: their checkpoint written, nothing after it.
    let now = u64::try_from(chrono::Utc::now().timestamp_millis())?;
    let rule_id = &f.rule.id;
    ensure!(
        f.state
            .claim_segment(rule_id, 0, "stopped", now, now + 60_000)
            .await?
            .is_some()
    );
    let checkpoint = Checkpoint {
        last_key: Some("4".into()),
        done: false,
        tally: PageTally {
            objects: 4,
            bytes: 32,
            copied: 4,
            ..PageTally::default()
        },
        lease_until: now + 60_000,
    };
    ensure!(
        f.state
            .checkpoint_segment(rule_id, 0, "stopped", &checkpoint)
            .await?
    );
    f.state.release_segment(rule_id, 0, "stopped").await?;

    bf.run(Some(rule_id), "resumed", deadline).await?;
    let job = f.state.job(rule_id).await?.context("job")?;
    ensure!(job.state == JobState::Completed, "{job:?}");
    // Rows 5-10 were examined (and copied); rows 1-4 were not examined again.
    let target = list_all(&f.stack.s3(&f.stack.b), &f.rule.target.bucket).await?;
    let copied: Vec<&str> = target.keys().map(String::as_str).collect();
    ensure!(copied == ["k4", "k5", "k6", "k7", "k8", "k9"], "{copied:?}");
    let segment = &f.state.segments(rule_id).await?[0];
    ensure!(segment.done && segment.objects_done == 10, "{segment:?}");
    ensure!(segment.checkpoint.as_deref() == Some("10"), "{segment:?}");
    Ok(())
}
