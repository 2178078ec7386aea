//! Rate control of the historical migration against the local stack: a rule's
//! `max_objects_per_second` and `max_bandwidth` hold over two backfill runners at once
//! (their windows are counted in DynamoDB Local), and a target answering `503 SlowDown`
//! gets fewer copies in flight until it stops. Rates are measured at a proxy in front of
//! the target, which sees every write.
//!
//! Bounds are loose where the machine's load could bite (lower bounds) and exact where
//! the limiter guarantees them (upper bounds, with 15% slack): a limit of L per second
//! lets at most L through per wall-clock second, so a run that wrote into k + 1 seconds
//! lasted at least k seconds from the start of its first one; with 10 such seconds the
//! rate so measured is at most 11% above the limit.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use crr_shared::backfill::{BackfillSettings, BackfillStore, Backfiller, JobState, RunReport};
use crr_shared::copy::CopyEngine;
use crr_shared::dynamo::DynamoStore;
use crr_shared::rule::{Notify, Rule};
use crr_shared::rule_admin::{LimitsUpdate, create_rule, update_limits};
use crr_shared::state::RuleStore;
use crr_tests::fault_proxy::{FaultPlan, FaultProxy};
use crr_tests::{S3Server, Stack, list_all, rule, seed, unique};

/// A source on moto A, a target on moto B seen through a proxy that watches its PUTs.
struct Fixture {
    stack: Stack,
    state: DynamoStore,
    rule: Rule,
    proxy: FaultProxy,
}

async fn fixture(configure: impl FnOnce(&mut Rule)) -> Result<Fixture> {
    let stack = Stack::from_env()?;
    let state = stack.state(&unique("rate")).await?;
    let proxy = FaultProxy::start(&stack.b.endpoint, FaultPlan::none(18)).await?;
    let via_proxy = S3Server {
        endpoint: proxy.endpoint.clone(),
        region: stack.b.region.clone(),
    };
    let (source, target) = stack.bucket_pair(&stack.a, &via_proxy).await?;
    let mut r = rule(
        &unique("rule"),
        stack.a.bucket(&source),
        via_proxy.bucket(&target),
    );
    r.historical = true;
    r.notify = Notify::External;
    r.copy_acl = false;
    configure(&mut r);
    let rule = create_rule(&state, &stack.s3_clients(), r).await?;
    Ok(Fixture {
        stack,
        state,
        rule,
        proxy,
    })
}

fn objects(prefix: &str, n: usize, size: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| (format!("{prefix}{i:05}"), vec![b'a' + (i % 26) as u8; size]))
        .collect()
}

impl Fixture {
    async fn seed(&self, objects: Vec<(String, Vec<u8>)>) -> Result<()> {
        seed(
            &self.stack,
            &self.stack.a,
            &self.rule.source.bucket,
            objects,
            16,
        )
        .await
    }

    /// A runner as the backfill function builds it: rate windows in the table.
    fn backfiller(&self, settings: BackfillSettings) -> Backfiller {
        let state = Arc::new(self.state.clone());
        Backfiller::new(
            state.clone(),
            state.clone(),
            Arc::new(self.stack.s3_clients()),
            CopyEngine::default(),
            settings,
        )
        .with_rate_store(state)
    }

    /// Runs `runners` backfill invocations at once, each its own `Backfiller` (as separate
    /// function instances are), until they stop: the start of the second they started in
    /// (see `start_of_this_second`), and their reports.
    async fn run_together(
        &self,
        runners: usize,
        settings: BackfillSettings,
    ) -> Result<(Instant, Vec<RunReport>)> {
        let deadline = Instant::now() + Duration::from_secs(60);
        // The counting pass first, so that every runner finds segments to claim (a runner
        // that starts while another counts may find none cut yet and stop).
        self.backfiller(settings.clone())
            .count(&self.rule.id, deadline)
            .await?;
        let start = start_of_this_second();
        let runs = (0..runners).map(|i| {
            let bf = self.backfiller(settings.clone());
            let rule_id = self.rule.id.clone();
            async move {
                bf.run(Some(&rule_id), &format!("runner-{i}"), deadline)
                    .await
            }
        });
        let mut reports = Vec::new();
        for run in futures::future::join_all(runs).await {
            reports.extend(run?);
        }
        Ok((start, reports))
    }

    async fn assert_exact_copy_and_no_failure(&self) -> Result<()> {
        let source = list_all(&self.stack.s3(&self.stack.a), &self.rule.source.bucket).await?;
        let target = list_all(&self.stack.s3(&self.stack.b), &self.rule.target.bucket).await?;
        ensure!(
            source == target,
            "target differs: {} source objects, {} target objects",
            source.len(),
            target.len()
        );
        let job = self.state.job(&self.rule.id).await?.context("no job")?;
        ensure!(job.state == JobState::Completed, "job is {:?}", job.state);
        let failed = self.state.failure_count(&self.rule.id).await?;
        ensure!(failed == 0, "{failed} objects recorded as failed");
        Ok(())
    }
}

fn settings() -> BackfillSettings {
    BackfillSettings {
        page_size: 20,
        segment_objects: 25,
        workers: 2,
        copy_concurrency: 8,
        lease: Duration::from_secs(30),
        margin: Duration::ZERO,
        ..BackfillSettings::default()
    }
}

/// The start of the current wall-clock second (the limiter's windows are those), as an
/// `Instant`: measured from there, a run that used k + 1 windows took at least k seconds
/// however late in its first second it began.
fn start_of_this_second() -> Instant {
    let (now, wall) = (
        Instant::now(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default(),
    );
    now.checked_sub(Duration::from_nanos(u64::from(wall.subsec_nanos())))
        .unwrap_or(now)
}

/// (writes, bytes, seconds from `start` to the last write) of what the proxy answered.
fn measured(proxy: &FaultProxy, start: Instant) -> (u64, u64, f64) {
    let answered = proxy.stats.answered();
    let last = answered.iter().map(|(t, _)| *t).max().unwrap_or(start);
    let bytes = answered.iter().map(|(_, b)| b).sum();
    (
        answered.len() as u64,
        bytes,
        last.duration_since(start).as_secs_f64(),
    )
}

#[tokio::test]
async fn objects_per_second_hold_over_two_concurrent_runners() -> Result<()> {
    const LIMIT: u64 = 20;
    const OBJECTS: usize = 200;
    let f = fixture(|r| r.max_objects_per_second = Some(LIMIT)).await?;
    f.seed(objects("k/", OBJECTS, 16)).await?;
    f.proxy.watch("PUT");

    let (start, reports) = f.run_together(2, settings()).await?;
    let (writes, _, seconds) = measured(&f.proxy, start);

    f.assert_exact_copy_and_no_failure().await?;
    ensure!(
        writes == OBJECTS as u64,
        "{writes} writes for {OBJECTS} objects"
    );
    let copied: Vec<u64> = reports.iter().map(|r| r.copied).collect();
    ensure!(
        copied.iter().sum::<u64>() == OBJECTS as u64 && copied.iter().all(|c| *c > 0),
        "both runners copy, together every object once: {copied:?}"
    );
    let rate = writes as f64 / seconds;
    println!(
        "{writes} objects in {seconds:.2} s by two runners: {rate:.1} objects/s (limit {LIMIT})"
    );
    ensure!(
        rate <= LIMIT as f64 * 1.15,
        "{rate:.1} objects/s over the limit of {LIMIT}"
    );
    ensure!(
        rate >= LIMIT as f64 / 4.0,
        "{rate:.1} objects/s: far below the limit"
    );
    Ok(())
}

#[tokio::test]
async fn bandwidth_holds_over_two_concurrent_runners() -> Result<()> {
    const LIMIT: u64 = 256 * 1024;
    const SIZE: usize = 64 * 1024;
    const OBJECTS: usize = 40;
    let f = fixture(|r| r.max_bandwidth = Some(LIMIT)).await?;
    f.seed(objects("big/", OBJECTS, SIZE)).await?;
    f.proxy.watch("PUT");

    let (start, _) = f.run_together(2, settings()).await?;
    let (writes, bytes, seconds) = measured(&f.proxy, start);

    f.assert_exact_copy_and_no_failure().await?;
    ensure!(
        writes == OBJECTS as u64,
        "{writes} writes for {OBJECTS} objects"
    );
    ensure!(
        bytes == (OBJECTS * SIZE) as u64,
        "{bytes} bytes written for {} bytes of objects",
        OBJECTS * SIZE
    );
    let rate = bytes as f64 / seconds;
    println!(
        "{bytes} bytes in {seconds:.2} s by two runners: {:.0} KiB/s (limit {} KiB/s)",
        rate / 1024.0,
        LIMIT / 1024
    );
    ensure!(
        rate <= LIMIT as f64 * 1.15,
        "{:.0} KiB/s over the limit",
        rate / 1024.0
    );
    ensure!(
        rate >= LIMIT as f64 / 4.0,
        "{:.0} KiB/s: far below the limit",
        rate / 1024.0
    );
    Ok(())
}

#[tokio::test]
async fn slow_down_takes_copies_in_flight_down_and_the_migration_still_completes() -> Result<()> {
    const OBJECTS: usize = 300;
    let f = fixture(|_| {}).await?;
    f.seed(objects("k/", OBJECTS, 1024)).await?;
    // Writes take 100 ms, as S3's do for small objects: 16 copies at once show as 16.
    f.proxy.delay("PUT", Duration::from_millis(100));
    let settings = BackfillSettings {
        page_size: 100,
        segment_objects: 1000,
        workers: 1,
        copy_concurrency: 16,
        ..settings()
    };
    let bf = f.backfiller(settings);
    let deadline = Instant::now() + Duration::from_secs(60);
    // (The backfill's future is not `Send`: run beside the observer, not spawned.)
    let run = bf.run(Some(&f.rule.id), "runner", deadline);

    let answered = |n: usize| {
        let proxy = &f.proxy;
        async move {
            let until = Instant::now() + Duration::from_secs(30);
            while proxy.stats.answered().len() < n {
                ensure!(Instant::now() < until, "fewer than {n} writes in 30 s");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(())
        }
    };
    let observe = async {
        answered(40).await?;
        let before = f.proxy.stats.take_peak();
        // The target asks to slow down for a while: every PUT is answered 503 SlowDown.
        let target = format!("/{}/", f.rule.target.bucket);
        f.proxy.refuse("PUT", &target, 503, "SlowDown");
        tokio::time::sleep(Duration::from_secs(4)).await;
        f.proxy.allow_all();
        let during = f.proxy.stats.take_peak();
        let done = f.proxy.stats.answered().len();
        answered(done + 20).await?;
        let after = f.proxy.stats.take_peak();
        anyhow::Ok((before, during, after))
    };
    let (reports, observed) = tokio::join!(run, observe);
    let reports = reports?;
    let (before, during, after) = observed?;
    println!(
        "peak PUTs in flight: {before} before SlowDown, {during} while refused, {after} over the 20 writes after; {reports:?}"
    );
    f.assert_exact_copy_and_no_failure().await?;
    ensure!(before >= 8, "16 copies at once should show: peak {before}");
    ensure!(
        after < before,
        "copies in flight did not go down after SlowDown: {before} before, {after} after"
    );
    Ok(())
}

#[tokio::test]
async fn limits_are_updated_and_removed_through_rule_admin() -> Result<()> {
    let f = fixture(|r| r.max_objects_per_second = Some(5)).await?;
    let set = update_limits(
        &f.state,
        &f.rule.id,
        LimitsUpdate {
            max_objects_per_second: None,
            max_bandwidth: Some(Some(200 << 20)),
        },
    )
    .await?;
    ensure!(set.max_objects_per_second == Some(5) && set.max_bandwidth == Some(200 << 20));
    let stored = f.state.get_rule(&f.rule.id).await?.context("rule gone")?;
    ensure!(stored == set, "stored {stored:?}");
    let cleared = update_limits(
        &f.state,
        &f.rule.id,
        LimitsUpdate {
            max_objects_per_second: Some(None),
            max_bandwidth: None,
        },
    )
    .await?;
    ensure!(cleared.max_objects_per_second.is_none() && cleared.max_bandwidth.is_some());
    let refused = update_limits(
        &f.state,
        &f.rule.id,
        LimitsUpdate {
            max_objects_per_second: Some(Some(0)),
            max_bandwidth: None,
        },
    )
    .await
    .unwrap_err();
    ensure!(
        refused.to_string().contains("max_objects_per_second"),
        "{refused}"
    );
    Ok(())
}

/// The CLI: `crr rule create --max-objects-per-second --max-bandwidth`, `crr rule update`
/// (`none` removes a limit), `crr rule show`, and a one-line refusal of a bad rate.
#[tokio::test]
async fn the_cli_sets_shows_updates_and_refuses_limits() -> Result<()> {
    let stack = Stack::from_env()?;
    let table = unique("ratecli");
    let state = stack.state(&table).await?;
    let (source, target) = stack.bucket_pair(&stack.a, &stack.b).await?;
    let id = unique("rule");
    let create = |extra: &[&str]| {
        let mut args = vec![
            "rule",
            "create",
            "--id",
            &id,
            "--source-bucket",
            &source,
            "--source-region",
            &stack.a.region,
            "--source-endpoint-url",
            &stack.a.endpoint,
            "--source-path-style",
            "--target-bucket",
            &target,
            "--target-region",
            &stack.b.region,
            "--target-endpoint-url",
            &stack.b.endpoint,
            "--target-path-style",
            "--notify-external",
        ];
        args.extend_from_slice(extra);
        stack
            .crr_command(&table, &args)?
            .output()
            .context("running crr")
    };
    let refused = create(&["--max-bandwidth", "10Mbit/s"])?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    ensure!(!refused.status.success(), "a bad rate is refused");
    ensure!(
        stderr.trim().lines().count() == 1 && stderr.contains("max_bandwidth"),
        "one line naming the field: {stderr}"
    );
    ensure!(state.get_rule(&id).await?.is_none(), "nothing made");

    let made = create(&[
        "--max-objects-per-second",
        "50",
        "--max-bandwidth",
        "200MiB/s",
    ])?;
    ensure!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let rule = state.get_rule(&id).await?.context("rule not stored")?;
    ensure!(rule.max_objects_per_second == Some(50) && rule.max_bandwidth == Some(200 << 20));
    let shown = stack.crr(&table, &["rule", "show", &id])?;
    ensure!(
        shown.contains("50 objects/s") && shown.contains("200MiB/s"),
        "{shown}"
    );

    stack.crr(
        &table,
        &[
            "rule",
            "update",
            &id,
            "--max-bandwidth",
            "none",
            "--max-objects-per-second",
            "80",
        ],
    )?;
    let rule = state.get_rule(&id).await?.context("rule gone")?;
    ensure!(
        rule.max_objects_per_second == Some(80) && rule.max_bandwidth.is_none(),
        "{rule:?}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&stack.crr(&table, &["rule", "show", &id, "--json"])?)?;
    ensure!(json["max_objects_per_second"] == 80 && json.get("max_bandwidth").is_none());
    Ok(())
}
