//! One failing object never blocks a migration: against the local stack (moto stores
//! GLACIER objects and answers GetObject with 403 InvalidObjectState, CopyObject with 403
//! ObjectNotInActiveTierError, as S3 does), the backfill copies everything else, records
//! the archived object as `SrcObjectArchived`, finishes `completed_with_failures`, and
//! `crr backfill retry-failed` copies it once it is restored. Through the real `crr`
//! binary for `failures`, `retry-failed` and `status`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{RestoreRequest, StorageClass};
use crr_shared::backfill::{BackfillSettings, BackfillStore, Backfiller, JobState};
use crr_shared::copy::CopyEngine;
use crr_shared::dynamo::DynamoStore;
use crr_shared::rule::{CopyMode, Notify, Rule};
use crr_shared::rule_admin::create_rule;
use crr_tests::fault_proxy::{FaultPlan, FaultProxy};
use crr_tests::{S3Server, Stack, list_all, rule, seed, unique};

#[derive(Clone, Copy, Debug)]
enum Mode {
    /// Two moto servers: GET then PUT (GetObject answers InvalidObjectState).
    Stream,
    /// One moto server, two regions: CopyObject (answers ObjectNotInActiveTierError).
    ServerSide,
    /// As `Stream`, each side behind a fault proxy that refuses what a test says.
    Proxied,
}

struct World {
    stack: Stack,
    table: String,
    state: DynamoStore,
    rule: Rule,
    source: S3Server,
    target: S3Server,
    /// The proxies in front of the source and the target (`Mode::Proxied`).
    proxies: Option<(FaultProxy, FaultProxy)>,
}

impl World {
    async fn new(mode: Mode) -> Result<Self> {
        let stack = Stack::from_env()?;
        let mut source = stack.a.clone();
        let mut target = match mode {
            Mode::Stream | Mode::Proxied => stack.b.clone(),
            Mode::ServerSide => S3Server {
                endpoint: stack.a.endpoint.clone(),
                region: stack.b.region.clone(),
            },
        };
        let mut proxies = None;
        if let Mode::Proxied = mode {
            let src = FaultProxy::start(&source.endpoint, FaultPlan::none(1)).await?;
            let dst = FaultProxy::start(&target.endpoint, FaultPlan::none(2)).await?;
            source.endpoint = src.endpoint.clone();
            target.endpoint = dst.endpoint.clone();
            proxies = Some((src, dst));
        }
        let table = unique("bffail");
        let state = stack.state(&table).await?;
        let (sb, tb) = (unique("src"), unique("dst"));
        stack.create_bucket(&source, &sb).await?;
        stack.create_bucket(&target, &tb).await?;
        let mut r = rule(&unique("rule"), source.bucket(&sb), target.bucket(&tb));
        r.historical = true;
        r.notify = Notify::External;
        r.copy_acl = false;
        r.copy_mode = match mode {
            Mode::Stream | Mode::Proxied => CopyMode::Stream,
            Mode::ServerSide => CopyMode::ServerSide,
        };
        let rule = create_rule(&state, &stack.s3_clients(), r).await?;
        Ok(Self {
            stack,
            table,
            state,
            rule,
            source,
            target,
            proxies,
        })
    }

    fn source_proxy(&self) -> &FaultProxy {
        &self.proxies.as_ref().expect("a proxied world").0
    }

    fn target_proxy(&self) -> &FaultProxy {
        &self.proxies.as_ref().expect("a proxied world").1
    }

    /// 40 objects `f/obj-000`.. in the source.
    async fn seed_40(&self) -> Result<()> {
        let objects: Vec<(String, Vec<u8>)> = (0..40)
            .map(|i| (format!("f/obj-{i:03}"), format!("body {i}").into_bytes()))
            .collect();
        seed(
            &self.stack,
            &self.source,
            &self.rule.source.bucket,
            objects,
            16,
        )
        .await
    }

    /// One invocation of the backfill (a minute's deadline).
    async fn run(&self) -> Result<Vec<crr_shared::backfill::RunReport>> {
        let bf = self.backfiller();
        bf.start(&self.rule.id).await?;
        Ok(bf
            .run(
                Some(&self.rule.id),
                "bf",
                Instant::now() + Duration::from_secs(60),
            )
            .await?)
    }

    async fn target_keys(&self) -> Result<Vec<String>> {
        let listed = list_all(&self.stack.s3(&self.target), &self.rule.target.bucket).await?;
        Ok(listed.into_keys().collect())
    }

    async fn objects_done(&self) -> Result<u64> {
        let segments = self.state.segments(&self.rule.id).await?;
        Ok(segments.iter().map(|s| s.objects_done).sum())
    }

    fn backfiller(&self) -> Backfiller {
        let state = Arc::new(self.state.clone());
        Backfiller::new(
            state.clone(),
            state,
            Arc::new(self.stack.s3_clients()),
            CopyEngine::default(),
            BackfillSettings {
                page_size: 10,
                segment_objects: 1000,
                workers: 2,
                margin: Duration::ZERO,
                ..BackfillSettings::default()
            },
        )
    }

    async fn put_archived(&self, key: &str, body: &'static [u8]) -> Result<()> {
        self.stack
            .s3(&self.source)
            .put_object()
            .bucket(&self.rule.source.bucket)
            .key(key)
            .storage_class(StorageClass::Glacier)
            .body(ByteStream::from_static(body))
            .send()
            .await
            .context("putting a GLACIER object")?;
        Ok(())
    }

    async fn job_state(&self) -> Result<Option<JobState>> {
        Ok(self.state.job(&self.rule.id).await?.map(|j| j.state))
    }

    fn crr_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let out = self.stack.crr(&self.table, args)?;
        serde_json::from_str(&out).with_context(|| format!("crr {args:?} printed {out}"))
    }
}

/// 40 objects under `f/`, one of them (in the middle of a page) archived; the backfill
/// runs to its end, the list holds the archived key only, and a restore plus
/// `retry-failed` copies it and completes the job.
async fn archived_object_is_recorded_skipped_and_retried(mode: Mode) -> Result<()> {
    let w = World::new(mode).await?;
    w.seed_40().await?;
    let archived = "f/obj-014-archived";
    w.put_archived(archived, b"cold bytes").await?;

    // The migration goes past the archived object and finishes.
    let bf = w.backfiller();
    bf.start(&w.rule.id).await?;
    let runs = bf
        .run(
            Some(&w.rule.id),
            "bf",
            Instant::now() + Duration::from_secs(60),
        )
        .await
        .context("one archived object must not fail the run")?;
    ensure!(
        w.job_state().await? == Some(JobState::CompletedWithFailures),
        "job should be completed_with_failures: {runs:?}"
    );
    ensure!(
        runs.iter().map(|r| r.failed).sum::<u64>() == 1,
        "one failed object reported: {runs:?}"
    );
    let target = list_all(&w.stack.s3(&w.target), &w.rule.target.bucket).await?;
    ensure!(
        target.len() == 40,
        "every other object copied: {}",
        target.len()
    );
    ensure!(!target.contains_key(archived), "archived object not copied");

    // Listed with its reason code, through the CLI.
    let listed = w.crr_json(&["backfill", "failures", &w.rule.id, "--json"])?;
    let failed = listed.as_array().context("a JSON array")?;
    ensure!(failed.len() == 1, "one failed object: {listed}");
    ensure!(failed[0]["key"] == archived, "{listed}");
    ensure!(failed[0]["reason"] == "SrcObjectArchived", "{listed}");
    ensure!(failed[0]["size"] == 10, "{listed}");
    ensure!(failed[0]["attempts"] == 1, "{listed}");
    ensure!(failed[0]["retryable"] == false, "{listed}");
    ensure!(
        failed[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("archived") && !m.contains("permission")),
        "{listed}"
    );

    // The status shows the job's state, its failed objects, and the counters adding up.
    let status = w.crr_json(&["status", &w.rule.id, "--json"])?;
    let h = &status["rules"][0]["historical"];
    ensure!(h["state"] == "completed_with_failures", "{h}");
    ensure!(h["failed"] == 1 && h["failed_objects"] == 1, "{h}");
    ensure!(h["objects_done"] == 41 && h["copied"] == 40, "{h}");
    ensure!(h["percent_objects"] == 100.0, "{h}");

    // Still archived: tried again, still failing, one attempt more.
    let again = w.crr_json(&["backfill", "retry-failed", &w.rule.id, "--json"])?;
    ensure!(again["tried"] == 1 && again["still_failed"] == 1, "{again}");
    ensure!(again["state"] == "completed_with_failures", "{again}");
    let listed = w.crr_json(&["backfill", "failures", &w.rule.id, "--json"])?;
    ensure!(listed[0]["attempts"] == 2, "{listed}");

    // Restored: the retry copies it, the list empties, the job is completed.
    w.stack
        .s3(&w.source)
        .restore_object()
        .bucket(&w.rule.source.bucket)
        .key(archived)
        .restore_request(RestoreRequest::builder().days(1).build())
        .send()
        .await
        .context("restoring the archived object")?;
    let again = w.crr_json(&["backfill", "retry-failed", &w.rule.id, "--json"])?;
    ensure!(
        again["succeeded"] == 1 && again["still_failed"] == 0,
        "{again}"
    );
    ensure!(again["state"] == "completed", "{again}");
    ensure!(w.job_state().await? == Some(JobState::Completed));
    let listed = w.crr_json(&["backfill", "failures", &w.rule.id, "--json"])?;
    ensure!(listed.as_array().is_some_and(Vec::is_empty), "{listed}");
    // The replica keeps the source's storage class (GLACIER), so it is looked at, not read.
    let replica = w
        .stack
        .s3(&w.target)
        .head_object()
        .bucket(&w.rule.target.bucket)
        .key(archived)
        .send()
        .await
        .context("the restored object in the target")?;
    ensure!(replica.content_length() == Some(10), "replica size");
    ensure!(
        replica.e_tag().map(|e| e.trim_matches('"').to_string()) == Some(md5_hex(b"cold bytes")),
        "replica ETag {:?}",
        replica.e_tag()
    );
    let status = w.crr_json(&["status", &w.rule.id, "--json"])?;
    let h = &status["rules"][0]["historical"];
    ensure!(h["state"] == "completed" && h["failed_objects"] == 0, "{h}");
    Ok(())
}

fn md5_hex(bytes: &[u8]) -> String {
    use md5::Digest;
    md5::Md5::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn archived_object_does_not_block_a_stream_migration() -> Result<()> {
    archived_object_is_recorded_skipped_and_retried(Mode::Stream).await
}

#[tokio::test]
async fn archived_object_does_not_block_a_server_side_migration() -> Result<()> {
    archived_object_is_recorded_skipped_and_retried(Mode::ServerSide).await
}

/// One object whose GET is refused (403 AccessDenied) and one whose GET always fails
/// (500), each in a page whose other objects copy: both are recorded (with the S3
/// Replication reason, and as retryable for the 500), everything else is copied, and
/// once the faults end `retry-failed` copies both.
// Several threads: the proxies must answer while this one waits for the `crr` process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_failing_objects_are_recorded_and_the_rest_copied() -> Result<()> {
    let w = World::new(Mode::Proxied).await?;
    w.seed_40().await?;
    let src = &w.rule.source.bucket;
    w.source_proxy()
        .refuse("GET", &format!("/{src}/f/obj-007"), 403, "AccessDenied");
    w.source_proxy()
        .refuse("GET", &format!("/{src}/f/obj-012"), 500, "InternalError");
    let runs = w
        .run()
        .await
        .context("two bad objects must not fail the run")?;
    ensure!(
        w.job_state().await? == Some(JobState::CompletedWithFailures),
        "{runs:?}"
    );
    let copied = w.target_keys().await?;
    ensure!(copied.len() == 38, "the 38 others copied: {copied:?}");
    let failed = w.state.failures(&w.rule.id).await?;
    let got: Vec<(&str, &str, bool)> = failed
        .iter()
        .map(|f| (f.key.as_str(), f.reason.as_str(), f.retryable))
        .collect();
    ensure!(
        got == [
            ("f/obj-007", "SrcGetObjectNotPermitted", false),
            ("f/obj-012", "SrcRequestFailed", true),
        ],
        "{failed:?}"
    );
    ensure!(
        failed[0].message.contains("s3:GetObject"),
        "names the permission: {}",
        failed[0].message
    );
    ensure!(w.objects_done().await? == 40, "checkpointed past them");

    w.source_proxy().allow_all();
    let again = w.crr_json(&["backfill", "retry-failed", &w.rule.id, "--json"])?;
    ensure!(
        again["succeeded"] == 2 && again["state"] == "completed",
        "{again}"
    );
    ensure!(w.target_keys().await?.len() == 40);
    ensure!(w.state.failures(&w.rule.id).await?.is_empty());
    Ok(())
}

/// Every PUT to the target refused: not 40 failed objects but the deployment's
/// permission. The job fails with the reason after its first page, nothing is recorded
/// object by object, and `crr backfill start` resumes it once the permission is back.
#[tokio::test]
async fn a_permission_refused_for_a_whole_page_fails_the_job_instead() -> Result<()> {
    let w = World::new(Mode::Proxied).await?;
    w.seed_40().await?;
    let dst = &w.rule.target.bucket;
    w.target_proxy()
        .refuse("PUT", &format!("/{dst}/"), 403, "AccessDenied");
    let err = w.run().await.err().context("the run should fail")?;
    ensure!(w.job_state().await? == Some(JobState::Failed), "{err:#}");
    let job = w.state.job(&w.rule.id).await?.context("job")?;
    let reason = job.last_error.unwrap_or_default();
    ensure!(reason.contains("s3:PutObject"), "job error: {reason}");
    ensure!(
        w.state.failures(&w.rule.id).await?.is_empty(),
        "none recorded"
    );
    ensure!(w.objects_done().await? == 0, "no page checkpointed");

    w.target_proxy().allow_all();
    w.stack.crr(&w.table, &["backfill", "start", &w.rule.id])?;
    w.run().await?;
    ensure!(w.job_state().await? == Some(JobState::Completed));
    ensure!(w.target_keys().await?.len() == 40);
    Ok(())
}

/// Every GET of the source's objects throttled (503 SlowDown, listing fine): a struggling
/// service, not 40 failed objects. Nothing is recorded, no page is checkpointed, the job
/// is not failed, and the next invocation copies everything once the throttling ends.
#[tokio::test]
async fn a_struggling_source_is_retried_later_not_recorded() -> Result<()> {
    let w = World::new(Mode::Proxied).await?;
    w.seed_40().await?;
    let src = &w.rule.source.bucket;
    w.source_proxy()
        .refuse("GET", &format!("/{src}/f/"), 503, "SlowDown");
    // The run ends either with the page's retryable error (its retries gave up first) or
    // with the page cut off at the deadline (an attempt, with the SDK's own retries, was
    // still going): under load either can come first, and both leave the page unrecorded.
    let outcome = match w.run().await {
        Err(e) => format!("{e:#}"),
        Ok(reports) => {
            let copied: u64 = reports.iter().map(|r| r.copied).sum();
            ensure!(
                copied == 0,
                "nothing copied from a refusing source: {reports:?}"
            );
            "page cut off at the deadline".to_string()
        }
    };
    ensure!(
        w.job_state().await? == Some(JobState::Running),
        "job still running: {outcome}"
    );
    ensure!(
        w.state.failures(&w.rule.id).await?.is_empty(),
        "none recorded"
    );
    ensure!(w.objects_done().await? == 0, "no page checkpointed");

    w.source_proxy().allow_all();
    w.run().await?;
    ensure!(w.job_state().await? == Some(JobState::Completed));
    ensure!(w.target_keys().await?.len() == 40);
    Ok(())
}
