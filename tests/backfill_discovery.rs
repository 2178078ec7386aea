//! Parallel discovery against the local stack (issue 18 item 1): the listing counting pass
//! runs many listers at once, keeps its frontier in the job item (DynamoDB Local) with each
//! cut, and resumes from it across invocations stopped by short deadlines, killed, or
//! racing each other. The segments it leaves partition the key space exactly, and the
//! totals are the truth. The source is moto, read through the real SDK.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use crr_shared::backfill::{BackfillSettings, BackfillStore, Backfiller, JobState, Segment};
use crr_shared::copy::CopyEngine;
use crr_shared::dynamo::DynamoStore;
use crr_shared::rule::{Notify, Rule};
use crr_shared::rule_admin::create_rule;
use crr_shared::status::{StatusService, TotalSource, historical_status};
use crr_tests::fault_proxy::{FaultPlan, FaultProxy};
use crr_tests::{S3Server, Stack, list_all, rule, seed, unique};

/// A 12-hex-digit pseudo-random string per `i` (no structure to split by).
fn hex(i: u64) -> String {
    let x = i
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    format!("{:012x}", x >> 16)
}

/// Keys with structure (dated sub-prefixes), without (hashes), odd ones, and some outside
/// the rule's prefixes; sizes vary.
fn keys() -> Vec<(String, Vec<u8>)> {
    let mut keys = Vec::new();
    for day in 1..=12 {
        for part in 0..60 {
            keys.push(format!("logs/2026-01-{day:02}/part-{part:04}.gz"));
        }
    }
    for i in 0..1500 {
        keys.push(format!("blob/{}", hex(i)));
    }
    for i in 0..300 {
        keys.push(format!("top-{i:04}"));
    }
    for odd in [
        "logs/a b",
        "logs/a+b",
        "logs/é/x",
        "logs//double",
        "logs/2026-01-05",
        "logs/2026-01-05/",
        "logs/%41",
    ] {
        keys.push(odd.to_string());
    }
    for i in 0..50 {
        keys.push(format!("other/{i}"));
    }
    keys.into_iter()
        .enumerate()
        .map(|(i, k)| (k, vec![b'x'; i % 7]))
        .collect()
}

struct Fixture {
    stack: Stack,
    state: DynamoStore,
    rule: Rule,
    /// What the source holds under the rule's prefixes: key -> size.
    truth: BTreeMap<String, u64>,
}

/// A source bucket on moto A (reached at `source_endpoint`, the server itself or a proxy
/// in front of it) seeded with `objects`, a target on moto B, and a historical rule over
/// `prefixes`, in a state table of its own.
async fn fixture(
    source_endpoint: Option<&str>,
    prefixes: &[&str],
    objects: Vec<(String, Vec<u8>)>,
) -> Result<Fixture> {
    let stack = Stack::from_env()?;
    let state = stack.state(&unique("disc")).await?;
    let (source, target) = stack.bucket_pair(&stack.a, &stack.b).await?;
    let truth = objects
        .iter()
        .filter(|(k, _)| prefixes.is_empty() || prefixes.iter().any(|p| k.starts_with(p)))
        .map(|(k, b)| (k.clone(), b.len() as u64))
        .collect();
    seed(&stack, &stack.a, &source, objects, 32).await?;
    let via = S3Server {
        endpoint: source_endpoint.unwrap_or(&stack.a.endpoint).to_string(),
        region: stack.a.region.clone(),
    };
    let mut r = rule(
        &unique("rule"),
        via.bucket(&source),
        stack.b.bucket(&target),
    );
    r.prefixes = prefixes.iter().map(|p| p.to_string()).collect();
    r.historical = true;
    r.notify = Notify::External;
    r.copy_acl = false;
    let rule = create_rule(&state, &stack.s3_clients(), r).await?;
    Ok(Fixture {
        stack,
        state,
        rule,
        truth,
    })
}

impl Fixture {
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

    /// Every key of the truth is in exactly one segment, each segment's count is the keys
    /// it holds, the indices are 0..n, and the job's totals are the truth's.
    async fn check_partition(&self) -> Result<Vec<Segment>> {
        let mut segments = self.state.segments(&self.rule.id).await?;
        segments.sort_by_key(|s| s.index);
        for (i, s) in segments.iter().enumerate() {
            ensure!(
                s.index as usize == i,
                "segment indices not dense: {i} is {}",
                s.index
            );
        }
        let holds = |s: &Segment, key: &str| {
            key.starts_with(&s.prefix)
                && s.start_after.as_deref().is_none_or(|a| key > a)
                && s.end.as_deref().is_none_or(|e| key <= e)
        };
        let mut held = vec![0u64; segments.len()];
        for key in self.truth.keys() {
            let holders: Vec<u32> = segments
                .iter()
                .filter(|s| holds(s, key))
                .map(|s| s.index)
                .collect();
            ensure!(holders.len() == 1, "{key:?} is in segments {holders:?}");
            held[holders[0] as usize] += 1;
        }
        for s in &segments {
            ensure!(
                held[s.index as usize] == s.planned_objects,
                "segment {} counted {} objects and holds {}",
                s.index,
                s.planned_objects,
                held[s.index as usize]
            );
        }
        let job = self.state.job(&self.rule.id).await?.context("no job")?;
        let bytes: u64 = self.truth.values().sum();
        ensure!(job.planned && job.frontier.is_empty(), "{job:?}");
        ensure!(
            (job.total_objects, job.total_bytes) == (self.truth.len() as u64, bytes),
            "totals {} objects {} bytes, truth {} objects {bytes} bytes",
            job.total_objects,
            job.total_bytes,
            self.truth.len()
        );
        ensure!(job.segments as usize == segments.len());
        Ok(segments)
    }
}

#[tokio::test]
async fn stopped_killed_and_racing_counting_passes_resume_to_an_exact_partition() -> Result<()> {
    // Every LIST takes at least 50 ms (a proxy in front of moto), so an invocation of at
    // most 300 ms lists at most 7 pages a lister, however fast the machine: the ~60 pages
    // take several invocations.
    let stack = Stack::from_env()?;
    let proxy = FaultProxy::start(&stack.a.endpoint, FaultPlan::none(2)).await?;
    proxy.delay("GET", Duration::from_millis(50));
    let f = fixture(Some(&proxy.endpoint), &["logs/", "blob/", "top"], keys()).await?;
    let settings = BackfillSettings {
        page_size: 50,
        segment_objects: 120,
        listers: 4,
        margin: Duration::ZERO,
        ..BackfillSettings::default()
    };
    let bf = f.backfiller(settings);
    let id = f.rule.id.clone();
    let mut rounds = 0u32;
    let mut seen_counting = false;
    loop {
        rounds += 1;
        ensure!(rounds <= 400, "the counting pass made no progress");
        let job = f.state.job(&id).await?;
        if job.as_ref().is_some_and(|j| j.planned) {
            break;
        }
        // While counting (after some cut): the total is a lower bound, and says so.
        if let Some(job) = job.filter(|j| j.segments > 0) {
            let h = historical_status(Some(&job), chrono::Utc::now());
            ensure!(!h.total_final && h.total_source == Some(TotalSource::Listing));
            ensure!(h.objects_total <= f.truth.len() as u64, "{h:?}");
            ensure!(h.percent_objects.is_none_or(|p| p < 100.0), "{h:?}");
            seen_counting = true;
        }
        // Short invocations (a few LIST pages each), every third one killed at a random
        // point, and every other round two at once.
        let budget = Duration::from_millis(100 + fastrand::u64(0..200));
        let deadline = Instant::now() + budget;
        let one = async {
            if rounds.is_multiple_of(3) {
                let kill = Duration::from_millis(fastrand::u64(20..400));
                let _ = tokio::time::timeout(kill, bf.count(&id, deadline)).await;
                Ok(())
            } else {
                bf.count(&id, deadline).await.map(|_| ())
            }
        };
        if rounds.is_multiple_of(2) {
            let (a, b) = tokio::join!(one, bf.count(&id, deadline + budget / 2));
            a?;
            b?;
        } else {
            one.await?;
        }
    }
    ensure!(seen_counting, "never saw the pass between two invocations");
    ensure!(
        rounds >= 3,
        "too few invocations ({rounds}) for a resumption test"
    );
    let segments = f.check_partition().await?;
    println!(
        "{} objects in {} segments after {rounds} invocations",
        f.truth.len(),
        segments.len()
    );

    // The status says the total is final, and how it was obtained.
    let shared = Arc::new(f.state.clone());
    let status = StatusService::new(
        shared.clone(),
        shared.clone(),
        shared,
        None,
        Duration::from_secs(60),
    );
    let report = status.report(Some(&id)).await?;
    let h = serde_json::to_value(&report.rules[0].historical)?;
    ensure!(
        h["total_final"] == true && h["total_source"] == "listing",
        "{h}"
    );
    ensure!(h["objects_total"] == f.truth.len() as u64, "{h}");

    // The segments are worked as cut (their bounds, 1 KB strings below a sub-prefix
    // included, are start-after and end of real listings): an exact copy.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut copied = false;
    while Instant::now() < deadline {
        let reports = bf
            .run(
                Some(&id),
                &unique("inv"),
                Instant::now() + Duration::from_secs(30),
            )
            .await?;
        if reports
            .iter()
            .any(|r| r.state == JobState::Completed.as_str())
        {
            copied = true;
            break;
        }
    }
    ensure!(copied, "the backfill did not complete");
    let target = list_all(&f.stack.s3(&f.stack.b), &f.rule.target.bucket).await?;
    let target: BTreeMap<String, u64> = target
        .into_iter()
        .map(|(k, (size, _))| (k, size as u64))
        .collect();
    ensure!(
        target == f.truth,
        "target is not the source's objects under the prefixes"
    );
    Ok(())
}

#[tokio::test]
async fn sixteen_listers_count_faster_than_one_with_about_as_many_lists() -> Result<()> {
    // The source behind a proxy adding S3's LIST latency to every request (150 ms, as
    // docs/scale.md assumes), so that listers at once show. Moto itself answers one
    // request at a time (tens of ms for a LIST here): that part does not shrink.
    let stack = Stack::from_env()?;
    let proxy = FaultProxy::start(&stack.a.endpoint, FaultPlan::none(1)).await?;
    proxy.delay("GET", Duration::from_millis(150));
    let objects: Vec<(String, Vec<u8>)> = (0..3000u64)
        .map(|i| {
            let key = match i % 3 {
                0 => format!("h/{}", hex(i)),
                _ => format!("s/{i:08}"),
            };
            (key, vec![b'y'; (i % 5) as usize])
        })
        .collect();
    let mut measured = Vec::new();
    let f = fixture(Some(&proxy.endpoint), &[], objects).await?;
    for listers in [1usize, 16] {
        // A fresh job each time: the rule again in a table of its own.
        let state = f.stack.state(&unique("disc")).await?;
        let mut r = f.rule.clone();
        r.id = unique("rule");
        let rule = create_rule(&state, &f.stack.s3_clients(), r).await?;
        let g = Fixture {
            stack: f.stack.clone(),
            state,
            rule,
            truth: f.truth.clone(),
        };
        let bf = g.backfiller(BackfillSettings {
            page_size: 100,
            segment_objects: 1000,
            listers,
            ..BackfillSettings::default()
        });
        let requests = proxy.stats.requests.load(Ordering::SeqCst);
        let started = Instant::now();
        let job = bf
            .count(&g.rule.id, Instant::now() + Duration::from_secs(300))
            .await?;
        let elapsed = started.elapsed();
        let lists = proxy.stats.requests.load(Ordering::SeqCst) - requests;
        ensure!(job.planned, "{job:?}");
        let segments = g.check_partition().await?;
        println!(
            "{listers:>2} listers: {} objects, {} segments, {lists} LIST requests, {} ms",
            g.truth.len(),
            segments.len(),
            elapsed.as_millis()
        );
        measured.push((lists, elapsed));
    }
    let ((lists1, took1), (lists16, took16)) = (measured[0], measured[1]);
    // One chain: 30 pages in a row, each at least 150 ms. Sixteen listers list about as
    // many pages (plus one for each range a split opens), several at a time: faster, by
    // how much depends on moto's own time per LIST (see the printed figures).
    ensure!(took1 >= Duration::from_millis(30 * 150), "{took1:?}");
    ensure!(
        lists16 <= lists1 * 2 + 40,
        "{lists16} LISTs with 16 listers, {lists1} with one"
    );
    ensure!(took16 < took1, "16 listers took {took16:?}, one {took1:?}");
    Ok(())
}
