//! Historical migration against the local stack: the real `crr-backfill` binary behind the
//! Runtime API emulator (short deadlines force many invocations; SIGKILLs at random
//! points), and in-process runs for leases, dry runs and the interplay with real time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use aws_sdk_s3::primitives::ByteStream;
use crr_shared::backfill::{
    BackfillSettings, BackfillStore, Backfiller, Checkpoint, JobProgress, JobState, PageTally,
    RunReport, Segment, dry_run,
};
use crr_shared::copy::CopyEngine;
use crr_shared::dynamo::DynamoStore;
use crr_shared::replicate::{Replicator, ReplicatorSettings};
use crr_shared::rule::{CopyMode, Notify, OnConflict, Rule};
use crr_shared::rule_admin::create_rule;
use crr_shared::verify::{DifferenceKind, VerifyOptions, verify};
use crr_tests::fault_proxy::{FaultPlan, FaultProxy};
use crr_tests::{FannedOutBackfill, S3Server, Stack, list_all, rule, seed, unique};
use serde_json::json;

struct Fixture {
    stack: Stack,
    table: String,
    state: DynamoStore,
    rule: Rule,
}

/// Source (moto A) and target (moto B) buckets, and a historical rule over `prefixes`.
async fn fixture(prefixes: &[&str], configure: impl FnOnce(&mut Rule)) -> Result<Fixture> {
    fixture_on(|stack| stack.b.clone(), prefixes, configure).await
}

/// As `fixture`, with the target bucket on the server `target_server` picks.
async fn fixture_on(
    target_server: impl FnOnce(&Stack) -> S3Server,
    prefixes: &[&str],
    configure: impl FnOnce(&mut Rule),
) -> Result<Fixture> {
    let stack = Stack::from_env()?;
    let table = unique("bf");
    let state = stack.state(&table).await?;
    let server = target_server(&stack);
    let (source, target) = stack.bucket_pair(&stack.a, &server).await?;
    let mut r = rule(
        &unique("rule"),
        stack.a.bucket(&source),
        server.bucket(&target),
    );
    r.prefixes = prefixes.iter().map(|p| p.to_string()).collect();
    r.historical = true;
    r.notify = Notify::External;
    // One request fewer per object; ACLs are covered by the replication suite.
    r.copy_acl = false;
    configure(&mut r);
    let rule = create_rule(&state, &stack.s3_clients(), r).await?;
    Ok(Fixture {
        stack,
        table,
        state,
        rule,
    })
}

impl Fixture {
    fn source(&self) -> &str {
        &self.rule.source.bucket
    }
    fn target(&self) -> &str {
        &self.rule.target.bucket
    }

    async fn seed(&self, objects: Vec<(String, Vec<u8>)>) -> Result<()> {
        seed(&self.stack, &self.stack.a, self.source(), objects, 16).await
    }

    /// The source objects under the rule's prefixes, and the whole target.
    async fn both_sides(
        &self,
    ) -> Result<(
        BTreeMap<String, (i64, String)>,
        BTreeMap<String, (i64, String)>,
    )> {
        let source = list_all(&self.stack.s3(&self.stack.a), self.source()).await?;
        let in_scope = source
            .into_iter()
            .filter(|(k, _)| self.rule.matches_key(k))
            .collect();
        let target = list_all(&self.stack.s3(&self.stack.b), self.target()).await?;
        Ok((in_scope, target))
    }

    async fn assert_exact_copy(&self) -> Result<()> {
        let (source, target) = self.both_sides().await?;
        ensure!(
            source.len() == target.len(),
            "source has {} objects in scope, target {}",
            source.len(),
            target.len()
        );
        for (key, (size, etag)) in &source {
            let t = target
                .get(key)
                .with_context(|| format!("{key} missing in the target"))?;
            ensure!(
                t == &(*size, etag.clone()),
                "{key} differs: source {size}/{etag}, target {}/{}",
                t.0,
                t.1
            );
        }
        Ok(())
    }

    fn backfiller(&self, settings: BackfillSettings) -> Backfiller {
        let state = Arc::new(self.state.clone());
        Backfiller::new(
            state.clone(),
            state,
            Arc::new(self.stack.s3_clients()),
            CopyEngine::default(),
            settings,
        )
    }

    fn env(&self, page: u32, segment: u32, lease_secs: u32) -> Vec<String> {
        vec![
            format!("CRR_BACKFILL_PAGE_SIZE={page}"),
            format!("CRR_BACKFILL_SEGMENT_OBJECTS={segment}"),
            format!("CRR_BACKFILL_LEASE_SECS={lease_secs}"),
            "CRR_BACKFILL_MARGIN_SECS=1".to_string(),
            "CRR_BACKFILL_WORKERS=4".to_string(),
        ]
    }

    /// Runs the backfill in this process until the job completes (or a minute passes).
    async fn backfill_to_end(&self, settings: BackfillSettings) -> Result<Vec<RunReport>> {
        // No margin: the deadline is far, and a margin would only hold pages back.
        let bf = self.backfiller(BackfillSettings {
            margin: Duration::ZERO,
            ..settings
        });
        bf.start(&self.rule.id).await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let runs = bf.run(Some(&self.rule.id), "bf", deadline).await?;
        ensure!(
            self.job_state().await? == Some(JobState::Completed),
            "not completed: {runs:?}"
        );
        Ok(runs)
    }

    async fn job_state(&self) -> Result<Option<JobState>> {
        Ok(self.state.job(&self.rule.id).await?.map(|j| j.state))
    }

    /// The job's counters over all segments: (objects, copied, fixed, in place, skipped).
    /// The job item's totals (what status reads) must be exactly the segments' sums.
    async fn counters(&self) -> Result<(u64, u64, u64, u64, u64)> {
        let segments = self.state.segments(&self.rule.id).await?;
        let job = self.state.job(&self.rule.id).await?.context("no job")?;
        ensure!(
            job.progress == JobProgress::of_segments(&segments),
            "job totals {:?} are not the segments' {:?}",
            job.progress,
            JobProgress::of_segments(&segments)
        );
        let sum = |f: fn(&Segment) -> u64| segments.iter().map(f).sum::<u64>();
        Ok((
            sum(|s| s.objects_done),
            sum(|s| s.copied),
            sum(|s| s.fixed),
            sum(|s| s.in_place),
            sum(|s| s.skipped),
        ))
    }

    /// `crr verify`'s comparison of the whole rule (bytes, headers, metadata, tags):
    /// (matching, drifts).
    async fn verified(&self) -> Result<(u64, Vec<String>)> {
        let clients = self.stack.s3_clients();
        let mut drifts = Vec::new();
        let summary = verify(
            &self.rule,
            Arc::new(clients.store(&self.rule.source)),
            Arc::new(clients.store(&self.rule.target)),
            &VerifyOptions::default(),
            |d| drifts.push(format!("{}: {}", d.key, d.reason)),
            |_| {},
        )
        .await?;
        Ok((summary.matching, drifts))
    }
}

/// Puts `key` into `bucket` with a content type, user metadata and tags (`k=v&...`).
async fn put_with(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    body: &'static [u8],
    content_type: &str,
    metadata: &[(&str, &str)],
    tagging: &str,
) -> Result<()> {
    let mut req = s3
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(ByteStream::from_static(body))
        .content_type(content_type);
    for (k, v) in metadata {
        req = req.metadata(*k, *v);
    }
    if !tagging.is_empty() {
        req = req.tagging(tagging);
    }
    req.send().await.with_context(|| format!("putting {key}"))?;
    Ok(())
}

/// What a target object shows of itself: ETag, content type, user metadata (crr's
/// markers aside) and tags.
async fn described(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
) -> Result<(
    String,
    String,
    BTreeMap<String, String>,
    Vec<(String, String)>,
)> {
    let head = s3.head_object().bucket(bucket).key(key).send().await?;
    let tags = s3
        .get_object_tagging()
        .bucket(bucket)
        .key(key)
        .send()
        .await?;
    Ok((
        head.e_tag()
            .unwrap_or_default()
            .trim_matches('"')
            .to_string(),
        head.content_type().unwrap_or_default().to_string(),
        head.metadata()
            .into_iter()
            .flatten()
            .filter(|(k, _)| !k.starts_with("crr-source-"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        tags.tag_set()
            .iter()
            .map(|t| (t.key().to_string(), t.value().to_string()))
            .collect(),
    ))
}

fn objects(prefix: &str, n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            (
                format!("{prefix}obj-{i:05}.txt"),
                format!("{prefix} object {i} ")
                    .repeat(1 + i % 7)
                    .into_bytes(),
            )
        })
        .collect()
}

#[tokio::test]
async fn five_thousand_objects_in_three_prefixes_fanned_out_over_two_instances() -> Result<()> {
    let f = fixture(&["logs/", "img/", "docs/"], |_| {}).await?;
    let mut all = objects("logs/", 1700);
    all.extend(objects("img/", 1650));
    all.extend(objects("docs/", 1650));
    all.extend(objects("other/", 200));
    all.extend(objects("logsx", 50)); // shares a first letter, outside every prefix
    f.seed(all).await?;

    // A 5-second deadline: a segment that outlasts an invocation is checkpointed and
    // continues in another one, through a message sent again.
    let fanout = FannedOutBackfill::start(&f.stack, &f.table, 5, &f.env(40, 500, 30), 2).await?;
    let started = Instant::now();
    let mut coordinations = 0;
    while f.job_state().await? != Some(JobState::Completed) {
        ensure!(
            started.elapsed() < Duration::from_secs(900),
            "backfill did not complete in 15 minutes"
        );
        fanout.coordinate().await?;
        coordinations += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let claims = fanout.claims_per_worker();
    println!(
        "5000 objects in scope backfilled by 2 instances fed by the segment queue in {:?}: \
         {coordinations} coordinator runs, segment claims per instance {claims:?}",
        started.elapsed()
    );
    ensure!(
        claims.iter().all(|c| *c > 0),
        "an instance never worked on a segment: {claims:?}"
    );
    f.assert_exact_copy().await?;
    let job = f.state.job(&f.rule.id).await?.context("job")?;
    assert_eq!(job.total_objects, 5000);
    let segments = f.state.segments(&f.rule.id).await?;
    assert_eq!(segments.iter().map(|s| s.objects_done).sum::<u64>(), 5000);
    assert!(segments.len() >= 10, "{} segments", segments.len());
    // Pages cut off by the deadline copied objects without a checkpoint: examined again,
    // they count as the copies they were, not as objects found in place.
    assert_eq!(f.counters().await?, (5000, 5000, 0, 0, 0));
    // Every segment was handed out through the queue, and none is left on the board.
    assert_eq!(job.claims.next, job.segments);
    assert!(job.claims.leases.is_empty(), "{:?}", job.claims.leases);
    Ok(())
}

#[tokio::test]
async fn sigkill_at_random_points_of_a_fanned_out_backfill_still_completes_to_an_exact_copy()
-> Result<()> {
    let f = fixture(&["a/", "b/"], |_| {}).await?;
    // A versioned target counts every write: a key with two versions was copied twice.
    f.stack
        .s3(&f.stack.b)
        .put_bucket_versioning()
        .bucket(f.target())
        .versioning_configuration(
            aws_sdk_s3::types::VersioningConfiguration::builder()
                .status(aws_sdk_s3::types::BucketVersioningStatus::Enabled)
                .build(),
        )
        .send()
        .await?;
    let mut all = objects("a/", 1000);
    all.extend(objects("b/", 1000));
    f.seed(all).await?;

    // Leases of 2 s; a segment whose worker was killed is sent again 4 s after its lease
    // ran out (or at once by SQS, when the message's visibility timeout ends first).
    let mut env = f.env(50, 300, 2);
    env.push("CRR_BACKFILL_REQUEUE_SECS=4".into());
    let fanout = Arc::new(FannedOutBackfill::start(&f.stack, &f.table, 20, &env, 3).await?);
    let coordinator = {
        let fanout = fanout.clone();
        tokio::spawn(async move {
            loop {
                let _ = fanout.coordinate().await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let mut kills = 0;
    let started = Instant::now();
    while f.job_state().await? != Some(JobState::Completed) {
        ensure!(
            started.elapsed() < Duration::from_secs(900),
            "backfill did not complete in 15 minutes"
        );
        tokio::time::sleep(Duration::from_millis(300 + fastrand::u64(0..1200))).await;
        if kills < 12 {
            // Kill one process at random: a worker in the middle of a segment, or the
            // coordinator in the middle of cutting and sending.
            let pids = fanout.function_pids();
            if !pids.is_empty() {
                let pid = pids[fastrand::usize(0..pids.len())];
                if std::process::Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .status()?
                    .success()
                {
                    kills += 1;
                }
            }
        }
    }
    coordinator.abort();
    println!(
        "completed after {kills} SIGKILLs in {:?}; segment claims per instance {:?}",
        started.elapsed(),
        fanout.claims_per_worker()
    );
    ensure!(kills >= 10, "only {kills} kills happened before completion");
    f.assert_exact_copy().await?;

    let versions = f
        .stack
        .s3(&f.stack.b)
        .list_object_versions()
        .bucket(f.target())
        .max_keys(1000)
        .send()
        .await?;
    let mut writes: BTreeMap<String, usize> = BTreeMap::new();
    let mut page = versions;
    loop {
        for v in page.versions() {
            *writes
                .entry(v.key().unwrap_or_default().to_string())
                .or_default() += 1;
        }
        if page.is_truncated() != Some(true) {
            break;
        }
        let token = (
            page.next_key_marker().map(str::to_string),
            page.next_version_id_marker().map(str::to_string),
        );
        page = f
            .stack
            .s3(&f.stack.b)
            .list_object_versions()
            .bucket(f.target())
            .set_key_marker(token.0)
            .set_version_id_marker(token.1)
            .send()
            .await?;
    }
    let twice = writes.values().filter(|n| **n > 1).count();
    println!(
        "objects written more than once: {twice} of {}",
        writes.len()
    );
    // Every key was written, and counted once as copied, whichever page wrote it.
    assert_eq!(writes.len(), 2000);
    assert_eq!(f.counters().await?, (2000, 2000, 0, 0, 0));
    Ok(())
}

#[tokio::test]
async fn racing_invocations_share_segments_and_a_dead_lease_is_taken_over() -> Result<()> {
    let f = fixture(&[], |_| {}).await?;
    f.seed(objects("k/", 600)).await?;
    let settings = BackfillSettings {
        page_size: 50,
        segment_objects: 100,
        workers: 3,
        copy_concurrency: 8,
        lease: Duration::from_secs(30),
        margin: Duration::ZERO,
        // One lister: six segments of 100 (more listers cut more, smaller ones).
        listers: 1,
        ..BackfillSettings::default()
    };
    let bf = f.backfiller(settings.clone());
    // The counting pass only, then a lease of a "killed" invocation on segment 0.
    let job = bf
        .count(&f.rule.id, Instant::now() + Duration::from_secs(60))
        .await?;
    assert!(job.planned);
    assert_eq!((job.total_objects, job.segments), (600, 6));
    let segments = f.state.segments(&f.rule.id).await?;
    assert_eq!(segments.len(), 6);
    let now = chrono::Utc::now().timestamp_millis() as u64;
    assert!(
        f.state
            .claim_segment(&f.rule.id, 0, "killed", now, now + 3000)
            .await?
            .is_some()
    );
    // A held lease cannot be claimed, not even by a second try.
    assert!(
        f.state
            .claim_segment(&f.rule.id, 0, "other", now, now + 3000)
            .await?
            .is_none()
    );

    // Two invocations race on the rule.
    let (a, b) = (f.backfiller(settings.clone()), f.backfiller(settings));
    let deadline = Instant::now() + Duration::from_secs(120);
    let (ra, rb) = tokio::join!(
        a.run(Some(&f.rule.id), "inv-a", deadline),
        b.run(Some(&f.rule.id), "inv-b", deadline)
    );
    let (ra, rb) = (ra?, rb?);
    // Whoever finished first may have stopped before segment 0's lease expired.
    if f.job_state().await? != Some(JobState::Completed) {
        tokio::time::sleep(Duration::from_secs(3)).await;
        a.run(
            Some(&f.rule.id),
            "inv-c",
            Instant::now() + Duration::from_secs(60),
        )
        .await?;
    }
    assert_eq!(f.job_state().await?, Some(JobState::Completed));
    f.assert_exact_copy().await?;
    // Each object was copied exactly once: no segment was worked on twice at once.
    let segments = f.state.segments(&f.rule.id).await?;
    assert_eq!(
        segments.iter().map(|s| s.copied).sum::<u64>(),
        600,
        "{ra:?} {rb:?}"
    );
    assert_eq!(segments.iter().map(|s| s.objects_done).sum::<u64>(), 600);
    // Segment 0 was finished by someone else than the killed invocation.
    assert!(segments[0].done && segments[0].lease_owner.as_deref() != Some("killed"));
    Ok(())
}

/// Pages slower than the lease: every target request goes through a proxy that delays it
/// by up to 1.2 s, so a page of 20 objects (4 at a time) takes seconds against a lease of
/// two. Two invocations of two workers each race on six segments from the start, a third
/// comes when every first lease would have run out, and more come after the job
/// completed. The heartbeat keeps each lease with the worker copying its page, so each
/// segment is worked by one worker at a time: no page is counted twice, no segment
/// finishes twice, the job completes once and stays completed.
#[tokio::test]
async fn pages_slower_than_the_lease_are_counted_once_by_racing_invocations() -> Result<()> {
    let stack = Stack::from_env()?;
    let mut plan = FaultPlan::none(16);
    plan.latency = 1.0;
    plan.max_latency = Duration::from_millis(1200);
    let proxy = FaultProxy::start(&stack.b.endpoint, plan).await?;
    let via_proxy = S3Server {
        endpoint: proxy.endpoint.clone(),
        region: stack.b.region.clone(),
    };
    let f = fixture_on(move |_| via_proxy, &[], |_| {}).await?;
    f.seed(objects("k/", 240)).await?;
    let settings = BackfillSettings {
        page_size: 20,
        segment_objects: 40,
        workers: 2,
        copy_concurrency: 4,
        lease: Duration::from_secs(2),
        margin: Duration::ZERO,
        // One lister: six segments of two pages (more listers cut more, smaller ones).
        listers: 1,
        ..BackfillSettings::default()
    };
    proxy.set_faults(true);
    let deadline = Instant::now() + Duration::from_secs(90);
    let run = |name: &'static str, after: Duration| {
        let bf = f.backfiller(settings.clone());
        let rule_id = f.rule.id.clone();
        async move {
            tokio::time::sleep(after).await;
            bf.run(Some(&rule_id), name, deadline).await
        }
    };
    let started = Instant::now();
    let (ra, rb, rc) = tokio::join!(
        run("inv-a", Duration::ZERO),
        run("inv-b", Duration::ZERO),
        run("inv-c", settings.lease * 2)
    );
    let mut reports: Vec<RunReport> = [ra?, rb?, rc?].into_iter().flatten().collect();
    let took = started.elapsed();
    println!("{}; three invocations took {took:?}", proxy.stats.summary());
    // Whoever finished first may have stopped while a page was still being copied.
    let mut more = 0;
    while f.job_state().await? != Some(JobState::Completed) {
        ensure!(more < 5, "not completed: {reports:?}");
        more += 1;
        reports.extend(
            f.backfiller(settings.clone())
                .run(Some(&f.rule.id), "inv-more", deadline)
                .await?,
        );
    }
    let job = f.state.job(&f.rule.id).await?.context("job")?;
    let segments = f.state.segments(&f.rule.id).await?;
    assert_eq!((job.total_objects, segments.len()), (240, 6));
    // Twelve pages or more (six segments of two, at times an empty third), on four
    // workers (six once the third invocation came, when half of it was done): about three
    // pages one after the other each. Over three leases in all: a page took longer than
    // the lease on average (else the test shows nothing).
    ensure!(
        took > settings.lease * 3,
        "pages were not slower than the lease: {took:?}"
    );
    // Both invocations racing from the start worked on the job.
    let working = reports.iter().filter(|r| r.pages > 0).count();
    ensure!(working >= 2, "one invocation did all the work: {reports:?}");
    // Each object counted once, in its segment and in the invocations' reports; each
    // segment finished once.
    assert!(segments.iter().all(|s| s.done && s.objects_done == 40));
    assert_eq!(f.counters().await?, (240, 240, 0, 0, 0));
    let sum = |f: fn(&RunReport) -> u64| reports.iter().map(f).sum::<u64>();
    assert_eq!(sum(|r| r.copied), 240, "{reports:?}");
    assert_eq!(sum(|r| r.segments_finished), 6, "{reports:?}");
    proxy.set_faults(false);
    f.assert_exact_copy().await?;

    // Completed once, and it stays so: later invocations find nothing to claim and
    // change neither the job nor its counters.
    let completed_at = job.completed_at;
    assert!(completed_at.is_some());
    let (later_a, later_b) =
        tokio::join!(run("inv-d", Duration::ZERO), run("inv-e", Duration::ZERO));
    for report in later_a?.into_iter().chain(later_b?) {
        assert_eq!((report.pages, report.segments_finished), (0, 0));
    }
    let job = f.state.job(&f.rule.id).await?.context("job")?;
    assert_eq!(
        (job.state, job.completed_at),
        (JobState::Completed, completed_at)
    );
    assert_eq!(f.counters().await?, (240, 240, 0, 0, 0));
    Ok(())
}

/// The lease rules as DynamoDB enforces them (the conditions of `BackfillStore`'s writes).
#[tokio::test]
async fn only_the_holder_of_an_unexpired_lease_extends_it_or_checkpoints() -> Result<()> {
    let f = fixture(&[], |_| {}).await?;
    f.seed(objects("k/", 20)).await?;
    let bf = f.backfiller(BackfillSettings {
        page_size: 10,
        segment_objects: 100,
        ..BackfillSettings::default()
    });
    let job = bf
        .count(&f.rule.id, Instant::now() + Duration::from_secs(60))
        .await?;
    assert_eq!((job.planned, job.segments), (true, 1));
    f.state
        .advance_job(&f.rule.id, JobState::Pending, JobState::Running)
        .await?;
    let id = f.rule.id.as_str();
    let now_ms = || chrono::Utc::now().timestamp_millis() as u64;
    let page = |last: &str, done: bool| Checkpoint {
        last_key: Some(last.to_string()),
        done,
        tally: PageTally {
            objects: 10,
            bytes: 100,
            copied: 10,
            ..PageTally::default()
        },
        lease_until: now_ms() + 60_000,
    };
    let t = now_ms();
    let claimed = f.state.claim_segment(id, 0, "a", t, t + 1000).await?;
    assert_eq!(claimed.context("claim")?.lease_owner.as_deref(), Some("a"));
    assert!(
        f.state
            .claim_segment(id, 0, "b", t, t + 1000)
            .await?
            .is_none()
    );
    // Only the holder extends or checkpoints.
    assert!(!f.state.extend_lease(id, 0, "b", t, t + 1000).await?);
    assert!(
        !f.state
            .checkpoint_segment(id, 0, "b", &page("k/10", false))
            .await?
    );
    assert!(
        f.state
            .checkpoint_segment(id, 0, "a", &page("k/10", false))
            .await?
    );
    // Run out: its former holder can neither extend it nor checkpoint, even before anyone
    // took it over; the next holder gets the segment as the last checkpoint left it.
    assert!(f.state.extend_lease(id, 0, "a", t, now_ms() + 1).await?);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let later = now_ms();
    assert!(
        !f.state
            .extend_lease(id, 0, "a", later, later + 1000)
            .await?
    );
    assert!(
        !f.state
            .checkpoint_segment(id, 0, "a", &page("k/20", true))
            .await?
    );
    let taken = f
        .state
        .claim_segment(id, 0, "b", later, later + 60_000)
        .await?
        .context("take over")?;
    assert_eq!(
        (
            taken.checkpoint.as_deref(),
            taken.objects_done,
            taken.copied
        ),
        (Some("k/10"), 10, 10)
    );
    assert!(
        f.state
            .extend_lease(id, 0, "b", later, later + 60_000)
            .await?
    );
    assert!(
        !f.state
            .checkpoint_segment(id, 0, "a", &page("k/20", true))
            .await?
    );
    assert!(
        f.state
            .checkpoint_segment(id, 0, "b", &page("k/20", true))
            .await?
    );
    // Done: never set back, never added to, never claimed again.
    assert!(
        !f.state
            .checkpoint_segment(id, 0, "b", &page("k/30", false))
            .await?
    );
    assert!(
        !f.state
            .extend_lease(id, 0, "b", later, later + 1000)
            .await?
    );
    let far = later + 3_600_000;
    assert!(
        f.state
            .claim_segment(id, 0, "c", far, far + 1000)
            .await?
            .is_none()
    );
    let s = &f.state.segments(id).await?[0];
    assert_eq!((s.done, s.objects_done, s.copied), (true, 20, 20));
    // The job completes once; a late "pending -> running" does not reopen it.
    assert!(
        f.state
            .advance_job(id, JobState::Running, JobState::Completed)
            .await?
    );
    assert!(
        !f.state
            .advance_job(id, JobState::Running, JobState::Completed)
            .await?
    );
    assert!(
        !f.state
            .advance_job(id, JobState::Pending, JobState::Running)
            .await?
    );
    assert_eq!(f.job_state().await?, Some(JobState::Completed));
    Ok(())
}

#[tokio::test]
async fn plan_lists_exactly_the_target_objects_that_would_be_overwritten() -> Result<()> {
    let f = fixture(&["p/"], |_| {}).await?;
    f.seed(objects("p/", 30)).await?;
    let s3b = f.stack.s3(&f.stack.b);
    // Seeded conflicts: three keys with other content; two identical; one outside scope.
    let conflicts = ["p/obj-00003.txt", "p/obj-00011.txt", "p/obj-00027.txt"];
    for key in conflicts {
        s3b.put_object()
            .bucket(f.target())
            .key(key)
            .body(ByteStream::from_static(b"target's own"))
            .send()
            .await?;
    }
    let source = objects("p/", 30);
    for (key, body) in source
        .iter()
        .filter(|(k, _)| k.ends_with("05.txt") || k.ends_with("06.txt"))
    {
        s3b.put_object()
            .bucket(f.target())
            .key(key)
            .body(ByteStream::from(body.clone()))
            .send()
            .await?;
    }
    let clients = f.stack.s3_clients();
    let (src, dst) = (clients.store(&f.rule.source), clients.store(&f.rule.target));
    let report = dry_run(&f.rule, &src, &dst, 7).await?;
    let keys: Vec<&str> = report.overwrites.iter().map(|c| c.key.as_str()).collect();
    assert_eq!(keys, conflicts);
    assert_eq!(
        (report.objects, report.to_copy, report.in_place, report.kept),
        (30, 28, 2, 0)
    );
    assert_eq!(report.overwrites[0].target_size, 12);

    // The CLI shows the same, and nothing was written.
    let out = f
        .stack
        .crr(&f.table, &["backfill", "plan", &f.rule.id, "--json"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(v["overwrites"].as_array().map(Vec::len), Some(3));
    assert_eq!(list_all(&s3b, f.target()).await?.len(), 5);

    // With on_conflict = skip nothing would be overwritten.
    let mut keep = f.rule.clone();
    keep.on_conflict = OnConflict::Skip;
    let report = dry_run(&keep, &src, &dst, 100).await?;
    assert!(report.overwrites.is_empty());
    assert_eq!(report.kept, 3);
    Ok(())
}

#[tokio::test]
async fn a_realtime_overwrite_during_the_backfill_is_not_reverted() -> Result<()> {
    let f = fixture(&[], |r| r.copy_mode = crr_shared::rule::CopyMode::Stream).await?;
    f.seed(objects("r/", 800)).await?;
    let bf = f.backfiller(BackfillSettings {
        page_size: 40,
        segment_objects: 200,
        workers: 2,
        copy_concurrency: 4,
        lease: Duration::from_secs(30),
        margin: Duration::ZERO,
        ..BackfillSettings::default()
    });
    bf.start(&f.rule.id).await?;
    let replicator = Replicator::new(
        Arc::new(f.state.clone()),
        Arc::new(f.stack.s3_clients()),
        None,
        ReplicatorSettings::default(),
    );
    let s3a = f.stack.s3(&f.stack.a);
    let realtime = async {
        // While the backfill runs, 40 objects change and real time replicates them.
        for i in (0..800).step_by(20) {
            let key = format!("r/obj-{i:05}.txt");
            let out = s3a
                .put_object()
                .bucket(f.source())
                .key(&key)
                .body(ByteStream::from(format!("changed {i}").into_bytes()))
                .send()
                .await?;
            let record = json!({"eventVersion": "2.1", "eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
                "s3": {"bucket": {"name": f.source()}, "object": {"key": key, "eTag": out.e_tag().unwrap_or_default().trim_matches('"'),
                       "sequencer": format!("{:018X}", 0x1000 + i)}}});
            replicator
                .handle(&json!({"Records": [record]}), None)
                .await?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::Ok(())
    };
    let backfill = bf.run(
        Some(&f.rule.id),
        "bf",
        Instant::now() + Duration::from_secs(300),
    );
    let (rt, report) = tokio::join!(realtime, backfill);
    rt?;
    let report = report?;
    println!("backfill: {report:?}");
    assert_eq!(f.job_state().await?, Some(JobState::Completed));
    f.assert_exact_copy().await?;
    for i in (0..800).step_by(20) {
        let key = format!("r/obj-{i:05}.txt");
        let (body, _) = crr_tests::read_object(&f.stack.s3(&f.stack.b), f.target(), &key)
            .await?
            .context("replica")?;
        assert_eq!(
            body,
            format!("changed {i}").into_bytes(),
            "{key} was reverted"
        );
    }
    Ok(())
}

/// Source objects of the metadata scenario, and the target objects seeded beside them:
/// the same bytes with another content type, other user metadata, other tags (as many),
/// no tags where the source has some; a precise copy; other bytes; and one key missing.
async fn seed_same_bytes_other_metadata(f: &Fixture) -> Result<()> {
    let (s3a, s3b) = (f.stack.s3(&f.stack.a), f.stack.s3(&f.stack.b));
    let (src, dst) = (f.source(), f.target());
    let red = [("color", "red")];
    for key in [
        "m/type",
        "m/meta",
        "m/tags",
        "m/untagged",
        "m/same",
        "m/bytes",
        "m/new",
    ] {
        put_with(
            &s3a,
            src,
            key,
            b"the same bytes",
            "text/plain",
            &red,
            "team=data",
        )
        .await?;
    }
    let body = b"the same bytes";
    put_with(
        &s3b,
        dst,
        "m/type",
        body,
        "application/octet-stream",
        &red,
        "team=data",
    )
    .await?;
    put_with(
        &s3b,
        dst,
        "m/meta",
        body,
        "text/plain",
        &[("color", "blue")],
        "team=data",
    )
    .await?;
    put_with(&s3b, dst, "m/tags", body, "text/plain", &red, "team=other").await?;
    put_with(&s3b, dst, "m/untagged", body, "text/plain", &red, "").await?;
    put_with(&s3b, dst, "m/same", body, "text/plain", &red, "team=data").await?;
    put_with(
        &s3b,
        dst,
        "m/bytes",
        b"other bytes, same",
        "text/plain",
        &red,
        "team=data",
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn same_bytes_with_other_metadata_is_overwritten_listed_by_the_plan_and_kept_under_skip()
-> Result<()> {
    // on_conflict = overwrite (the default): listed by the plan, then made precise.
    let f = fixture(&["m/"], |_| {}).await?;
    seed_same_bytes_other_metadata(&f).await?;
    let clients = f.stack.s3_clients();
    let (src, dst) = (clients.store(&f.rule.source), clients.store(&f.rule.target));
    let report = dry_run(&f.rule, &src, &dst, 3).await?;
    let listed: Vec<(&str, DifferenceKind)> = report
        .overwrites
        .iter()
        .map(|c| (c.key.as_str(), c.reason))
        .collect();
    assert_eq!(
        listed,
        vec![
            ("m/bytes", DifferenceKind::Bytes),
            ("m/meta", DifferenceKind::Metadata),
            ("m/tags", DifferenceKind::Tags),
            ("m/type", DifferenceKind::Headers),
            ("m/untagged", DifferenceKind::Tags),
        ]
    );
    assert_eq!(
        (
            report.objects,
            report.to_copy,
            report.to_fix,
            report.in_place,
            report.kept
        ),
        (7, 2, 4, 1, 0)
    );
    let out = f
        .stack
        .crr(&f.table, &["backfill", "plan", &f.rule.id, "--json"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let reasons: Vec<(String, String)> = v["overwrites"]
        .as_array()
        .context("overwrites")?
        .iter()
        .map(|c| (c["key"].to_string(), c["reason"].to_string()))
        .collect();
    assert_eq!(reasons.len(), 5, "{out}");
    assert!(
        reasons.contains(&("\"m/type\"".into(), "\"headers\"".into())),
        "{reasons:?}"
    );
    assert_eq!(v["to_fix"], 4);
    // What the plan cost: a listing of each side; two HEADs per same-size-same-ETag pair
    // (5), one for the pair listed with other bytes; tags read on both sides only where
    // nothing else differs and both have some (m/tags, m/same).
    let log = std::env::temp_dir().join(unique("plan-operations"));
    let run = f
        .stack
        .crr_command(&f.table, &["backfill", "plan", &f.rule.id])?
        .env(crr_shared::adapters::aws_clients::OPERATION_LOG_ENV, &log)
        .output()?;
    ensure!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let mut operations: BTreeMap<String, usize> = BTreeMap::new();
    for line in std::fs::read_to_string(&log)?.lines() {
        if let Some(op) = line.strip_prefix("S3:") {
            *operations.entry(op.to_string()).or_default() += 1;
        }
    }
    let expected: BTreeMap<String, usize> = [
        ("HeadObject", 11),
        ("GetObjectTagging", 4),
        ("ListObjectsV2", 2),
    ]
    .into_iter()
    .map(|(op, n)| (op.to_string(), n))
    .collect();
    assert_eq!(operations, expected);

    let s3b = f.stack.s3(&f.stack.b);
    let before = described(&s3b, f.target(), "m/meta").await?;
    let runs = f
        .backfill_to_end(BackfillSettings {
            page_size: 3,
            ..BackfillSettings::default()
        })
        .await?;
    // New and other bytes copied; same bytes fixed in place; the precise copy left alone.
    assert_eq!(f.counters().await?, (7, 2, 4, 1, 0), "{runs:?}");
    let run = &runs[0];
    assert_eq!(
        (run.copied, run.fixed, run.in_place, run.skipped),
        (2, 4, 1, 0)
    );
    let (matching, drifts) = f.verified().await?;
    assert!(drifts.is_empty(), "{drifts:?}");
    assert_eq!(matching, 7);
    // The fix rewrote the metadata, not the bytes: the ETag is the one it had.
    let after = described(&s3b, f.target(), "m/meta").await?;
    assert_eq!(after.0, before.0);
    assert_eq!(after.2.get("color").map(String::as_str), Some("red"));
    let typed = described(&s3b, f.target(), "m/type").await?;
    assert_eq!(typed.1, "text/plain");
    for key in ["m/tags", "m/untagged"] {
        let tags = described(&s3b, f.target(), key).await?.3;
        assert_eq!(tags, vec![("team".into(), "data".into())], "{key}");
    }
    // A second look finds every object in place, and lists nothing.
    let report = dry_run(&f.rule, &src, &dst, 1000).await?;
    assert_eq!((report.in_place, report.overwrites.len()), (7, 0));

    // on_conflict = skip: nothing but the missing key is written; the conflicts are kept.
    let f = fixture(&["m/"], |r| r.on_conflict = OnConflict::Skip).await?;
    seed_same_bytes_other_metadata(&f).await?;
    let clients = f.stack.s3_clients();
    let (src, dst) = (clients.store(&f.rule.source), clients.store(&f.rule.target));
    let report = dry_run(&f.rule, &src, &dst, 1000).await?;
    assert!(report.overwrites.is_empty(), "{:?}", report.overwrites);
    assert_eq!(
        (report.to_copy, report.to_fix, report.in_place, report.kept),
        (1, 0, 1, 5)
    );
    let s3b = f.stack.s3(&f.stack.b);
    let mut kept = BTreeMap::new();
    for key in ["m/type", "m/meta", "m/tags", "m/untagged", "m/bytes"] {
        kept.insert(key, described(&s3b, f.target(), key).await?);
    }
    f.backfill_to_end(BackfillSettings::default()).await?;
    assert_eq!(f.counters().await?, (7, 1, 0, 1, 5));
    for (key, was) in kept {
        assert_eq!(
            described(&s3b, f.target(), key).await?,
            was,
            "{key} was changed"
        );
    }
    Ok(())
}

#[tokio::test]
async fn counters_add_up_after_a_page_killed_mid_way_and_resumed() -> Result<()> {
    let f = fixture(&[], |_| {}).await?;
    let all = objects("k/", 300);
    f.seed(all.clone()).await?;
    // In the target already: 20 precise copies and 20 with the bytes but another type.
    let s3b = f.stack.s3(&f.stack.b);
    for (i, (key, body)) in all.iter().enumerate().take(40) {
        let mut req = s3b
            .put_object()
            .bucket(f.target())
            .key(key)
            .body(ByteStream::from(body.clone()));
        if i % 2 == 1 {
            req = req.content_type("text/html");
        }
        req.send().await?;
    }
    let settings = BackfillSettings {
        // The whole segment is one page: nothing is checkpointed before it is over.
        page_size: 1000,
        segment_objects: 1000,
        workers: 1,
        copy_concurrency: 1,
        lease: Duration::from_secs(2),
        margin: Duration::ZERO,
        ..BackfillSettings::default()
    };
    let bf = f.backfiller(settings.clone());
    bf.start(&f.rule.id).await?;
    // Killed (its future dropped mid-page, as a SIGKILL would stop it) once it wrote some
    // of the page.
    let run = bf.run(
        Some(&f.rule.id),
        "killed",
        Instant::now() + Duration::from_secs(300),
    );
    let some_written = crr_tests::eventually(Duration::from_secs(60), "some copies", || async {
        let n = list_all(&s3b, f.target()).await?.len();
        Ok((n >= 40 + 30).then_some(n))
    });
    let written = tokio::select! {
        done = run => anyhow::bail!("the run ended before it was killed: {done:?}"),
        written = some_written => written?,
    };
    let (objects, copied, ..) = f.counters().await?;
    ensure!(
        (objects, copied) == (0, 0),
        "the page was checkpointed before the kill ({objects} objects): the test needs it unfinished"
    );
    println!("killed after {} new objects were written", written - 40);

    // The lease expires; another invocation takes the segment over and finishes it.
    tokio::time::sleep(settings.lease + Duration::from_millis(500)).await;
    let runs = f
        .backfiller(settings)
        .run(
            Some(&f.rule.id),
            "resumed",
            Instant::now() + Duration::from_secs(300),
        )
        .await?;
    assert_eq!(f.job_state().await?, Some(JobState::Completed));
    let (objects, copied, fixed, in_place, skipped) = f.counters().await?;
    // What the killed page wrote counts as written, once: not as in place.
    assert_eq!(
        (objects, copied, fixed, in_place, skipped),
        (300, 260, 20, 20, 0),
        "{runs:?}"
    );
    assert_eq!(copied + fixed + in_place + skipped, objects);
    f.assert_exact_copy().await?;
    let (matching, drifts) = f.verified().await?;
    assert!(drifts.is_empty(), "{drifts:?}");
    assert_eq!(matching, 300);
    Ok(())
}

#[tokio::test]
async fn a_metadata_only_fix_works_on_s3s_fs_too() -> Result<()> {
    // s3s-fs: another S3 implementation (SigV4 and copy-source If-Match checked, no
    // tagging: its tag reads answer 501 and count as none).
    let f = fixture_on(|stack| stack.s3s.clone(), &[], |_| {}).await?;
    let (s3a, s3t) = (f.stack.s3(&f.stack.a), f.stack.s3(&f.stack.s3s));
    let red = [("color", "red")];
    for key in ["type", "meta", "same"] {
        put_with(
            &s3a,
            f.source(),
            key,
            b"the same bytes",
            "text/plain",
            &red,
            "",
        )
        .await?;
    }
    let body = b"the same bytes";
    put_with(&s3t, f.target(), "type", body, "text/html", &red, "").await?;
    put_with(
        &s3t,
        f.target(),
        "meta",
        body,
        "text/plain",
        &[("color", "blue")],
        "",
    )
    .await?;
    put_with(&s3t, f.target(), "same", body, "text/plain", &red, "").await?;
    let etag = |out: aws_sdk_s3::operation::head_object::HeadObjectOutput| {
        out.e_tag().unwrap_or_default().to_string()
    };
    let before = etag(
        s3t.head_object()
            .bucket(f.target())
            .key("meta")
            .send()
            .await?,
    );
    f.backfill_to_end(BackfillSettings::default()).await?;
    assert_eq!(f.counters().await?, (3, 0, 2, 1, 0));
    let (matching, drifts) = f.verified().await?;
    assert!(drifts.is_empty(), "{drifts:?}");
    assert_eq!(matching, 3);
    let after = etag(
        s3t.head_object()
            .bucket(f.target())
            .key("meta")
            .send()
            .await?,
    );
    assert_eq!(after, before, "the fix moved the bytes");
    Ok(())
}

#[tokio::test]
async fn server_side_heads_are_read_ahead_of_the_copies() -> Result<()> {
    // One server, one endpoint (a fault proxy in front of moto A) for both buckets, in
    // two regions: server-side copies, each a HEAD (the source's headers and metadata)
    // and a CopyObject. One copy in flight: while the first object's CopyObject is held
    // at the proxy, the next object's HEAD must already come, read ahead of its copy;
    // HEAD then copy, one object after the other, would never send it.
    let endpoint = Stack::from_env()?.a.endpoint;
    let proxy = FaultProxy::start(&endpoint, FaultPlan::none(19)).await?;
    let through = proxy.endpoint.clone();
    let f = fixture_on(
        |stack| S3Server {
            endpoint: stack.a.endpoint.clone(),
            region: stack.b.region.clone(),
        },
        &[],
        |r| {
            r.copy_mode = CopyMode::ServerSide;
            r.source.endpoint_url = Some(through.clone());
            r.target.endpoint_url = Some(through);
        },
    )
    .await?;
    let keys = ["k0", "k1", "k2"];
    f.seed(
        keys.iter()
            .map(|k| (k.to_string(), format!("bytes of {k}").into_bytes()))
            .collect(),
    )
    .await?;
    let mut copy = proxy.hold("PUT", &format!("/{}/k0", f.target()));
    let mut head = proxy.hold("HEAD", &format!("/{}/k1", f.source()));
    let settings = BackfillSettings {
        copy_concurrency: 1,
        workers: 1,
        ..BackfillSettings::default()
    };
    let watch = async {
        copy.arrived(Duration::from_secs(60)).await?;
        // Held: k0's copy cannot end, so only a HEAD read ahead reaches the proxy now.
        let ahead = head.arrived(Duration::from_secs(20)).await;
        head.release();
        copy.release();
        ahead.context("k1's HEAD did not come while k0's copy was held")
    };
    let (ran, watched) = tokio::join!(f.backfill_to_end(settings), watch);
    watched?;
    ran?;
    let s3 = f.stack.s3(&f.stack.a);
    let source = list_all(&s3, f.source()).await?;
    let target = list_all(&s3, f.target()).await?;
    ensure!(
        source == target,
        "not an exact copy: {source:?} vs {target:?}"
    );
    assert_eq!(f.counters().await?.1, 3, "three objects copied");
    Ok(())
}
