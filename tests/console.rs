//! The web console (`crr console`) in a real browser: Debian's chromium driven through
//! chromedriver, against the local stack, with the real function binaries doing the
//! replication. Every test saves screenshots (see `browser::screenshot_dir`).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use aws_sdk_s3::primitives::ByteStream;
use crr_shared::adapters::sqs::SqsDeadLetters;
use crr_shared::backfill::{BackfillStore, JobState};
use crr_shared::dead_letter::DeadLetters;
use crr_shared::dynamo::DynamoStore;
use crr_shared::rule::{Notify, Rule};
use crr_shared::rule_admin::create_rule;
use crr_shared::state::RuleStore;
use crr_tests::browser::{Browser, ConsoleServer};
use crr_tests::{RunningFunction, Stack, eventually, invoke, rule, s3_notification, unique};

const WAIT: Duration = Duration::from_secs(90);

/// A table, a source bucket on moto A (us-east-1) and a target on moto B (eu-west-1), the
/// event queue with its DLQ, and the console serving them.
struct Setup {
    stack: Stack,
    table: String,
    state: DynamoStore,
    source: String,
    target: String,
    queue_url: String,
    queue_arn: String,
    dlq_url: String,
}

async fn setup() -> Result<Setup> {
    let stack = Stack::from_env()?;
    let table = unique("console");
    let state = stack.state(&table).await?;
    let (source, target) = stack.bucket_pair(&stack.a, &stack.b).await?;
    let ((queue_url, queue_arn), (dlq_url, _)) = stack
        .create_queue_with_dlq(&stack.a, &unique("events"), 5, 5)
        .await?;
    Ok(Setup {
        stack,
        table,
        state,
        source,
        target,
        queue_url,
        queue_arn,
        dlq_url,
    })
}

impl Setup {
    fn console(&self) -> Result<ConsoleServer> {
        ConsoleServer::start(
            &self.stack,
            &self.table,
            &[
                "--queue-url",
                &self.queue_url,
                "--dlq-url",
                &self.dlq_url,
                // moto delivers an event the moment the object is written.
                "--settle-secs",
                "0",
            ],
        )
    }

    /// The backfill function with small pages and 5 s invocations: a migration moves in
    /// steps the page can see.
    fn backfill_function(&self) -> Result<RunningFunction> {
        RunningFunction::start_direct(
            &self.stack,
            "crr-backfill",
            &self.table,
            5,
            &[
                "CRR_BACKFILL_PAGE_SIZE=20".into(),
                "CRR_BACKFILL_SEGMENT_OBJECTS=60".into(),
                "CRR_BACKFILL_WORKERS=2".into(),
                "CRR_BACKFILL_MARGIN_SECS=1".into(),
            ],
        )
    }

    /// A rule from source to target delivering events to the test's queue.
    fn rule(&self) -> Rule {
        let mut r = rule(
            &unique("rule"),
            self.stack.a.bucket(&self.source),
            self.stack.b.bucket(&self.target),
        );
        r.notify = Notify::Queue {
            arn: self.queue_arn.clone(),
        };
        r
    }

    async fn put(&self, bucket: &str, server_a: bool, key: &str, body: &str) -> Result<()> {
        let server = if server_a {
            &self.stack.a
        } else {
            &self.stack.b
        };
        self.stack
            .s3(server)
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(ByteStream::from(body.as_bytes().to_vec()))
            .send()
            .await?;
        Ok(())
    }
}

/// The one-line error `crr rule create` prints for these arguments (without "crr: error: ").
fn cli_error(s: &Setup, args: &[&str]) -> Result<String> {
    let mut all = vec!["rule", "create"];
    all.extend_from_slice(args);
    let out = s.stack.crr_command(&s.table, &all)?.output()?;
    ensure!(!out.status.success(), "crr rule create {args:?} succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr);
    Ok(stderr
        .trim()
        .strip_prefix("crr: error: ")
        .unwrap_or(stderr.trim())
        .to_string())
}

#[tokio::test]
async fn create_a_rule_through_the_dialog() -> Result<()> {
    let s = setup().await?;
    // Historical objects, one of which the target already holds with other content.
    s.put(&s.source, true, "photos/a.jpg", "new a").await?;
    s.put(&s.source, true, "photos/b.jpg", "new b").await?;
    s.put(
        &s.target,
        false,
        "photos/a.jpg",
        "old a, kept in the target",
    )
    .await?;
    let console = s.console()?;
    let browser = Browser::start().await?;
    browser.open(&format!("{}#/new", console.url)).await?;

    let id = unique("photos");
    browser.fill("#f-source-bucket", &s.source).await?;
    browser.fill("#f-source-region", &s.stack.a.region).await?;
    // The same region as the source: refused, next to the field, in the CLI's words.
    browser.fill("#f-target-region", &s.stack.a.region).await?;
    browser.fill("#f-target-bucket", &s.target).await?;
    browser.fill("#f-id", &id).await?;
    browser.click("input[name=scope][value=prefixes]").await?;
    browser.fill(".prefix-input", "photos/").await?;
    browser.click("input[name=historical][value=yes]").await?;
    browser.click("details.advanced > summary").await?;
    browser
        .fill("#f-source-endpoint_url", &s.stack.a.endpoint)
        .await?;
    browser
        .fill("#f-target-endpoint_url", &s.stack.b.endpoint)
        .await?;
    browser.click("input[name='source.path_style']").await?;
    browser.click("input[name='target.path_style']").await?;
    browser.click("#f-notify-type option[value=queue]").await?;
    browser.fill("#f-notify-arn", &s.queue_arn).await?;
    browser.click("#create-submit").await?;
    let shown = browser
        .wait_text(
            ".field-error[data-for='target.region']",
            WAIT,
            "the region error next to the field",
            |t| !t.is_empty(),
        )
        .await?;
    let cli = cli_error(
        &s,
        &[
            "--id",
            &id,
            "--source-bucket",
            &s.source,
            "--source-region",
            &s.stack.a.region,
            "--target-bucket",
            &s.target,
            "--target-region",
            &s.stack.a.region,
        ],
    )?;
    assert_eq!(shown, cli, "the form and the CLI say the same");
    assert!(shown.contains("target.region"), "{shown}");
    browser.screenshot("console-create-refused").await?;
    ensure!(
        s.state.get_rule(&id).await?.is_none(),
        "a refused rule was written"
    );

    // The right region; before creating, what would the historical sync overwrite?
    browser.fill("#f-target-region", &s.stack.b.region).await?;
    browser.click("#show-plan").await?;
    browser
        .wait_for("#plan-table tr[data-overwrite='photos/a.jpg']")
        .await?;
    let summary = browser
        .wait_text("#plan-summary", WAIT, "the plan", |t| !t.is_empty())
        .await?;
    assert!(
        summary.contains("1 target object(s) would be overwritten"),
        "{summary}"
    );
    ensure!(
        browser
            .client
            .find(fantoccini::Locator::Css(
                "#plan-table tr[data-overwrite='photos/b.jpg']"
            ))
            .await
            .is_err(),
        "b.jpg is not in the target: nothing to overwrite"
    );
    browser.screenshot("console-create-plan").await?;

    browser.click("#create-submit").await?;
    browser
        .wait_text("h1", WAIT, "the rule's page", |t| t == format!("Rule {id}"))
        .await?;
    let created = s.state.get_rule(&id).await?.context("rule created")?;
    assert_eq!(created.prefixes, vec!["photos/".to_string()]);
    assert!(created.historical);
    assert_eq!(created.target.region, s.stack.b.region);
    assert_eq!(
        created.notify,
        Notify::Queue {
            arn: s.queue_arn.clone()
        }
    );
    // The pair rule is the same transaction's: the target cannot be claimed again.
    let other_source = unique("src");
    s.stack.create_bucket(&s.stack.a, &other_source).await?;
    let second = cli_error(
        &s,
        &[
            "--id",
            "second",
            "--source-bucket",
            &other_source,
            "--source-region",
            &s.stack.a.region,
            "--source-endpoint-url",
            &s.stack.a.endpoint,
            "--target-bucket",
            &s.target,
            "--target-region",
            &s.stack.b.region,
            "--target-endpoint-url",
            &s.stack.b.endpoint,
        ],
    )?;
    assert!(second.contains("already in rule"), "{second}");
    browser.screenshot("console-rule-created").await?;
    browser.close().await
}

#[tokio::test]
async fn a_migration_bar_reaches_100_percent_while_the_backfill_runs() -> Result<()> {
    let s = setup().await?;
    let objects = 240;
    for i in 0..objects {
        s.put(
            &s.source,
            true,
            &format!("old/{i:04}"),
            &format!("object {i}"),
        )
        .await?;
    }
    // No historical sync asked at creation: the migration is started from the console.
    let r = s.rule();
    let id = r.id.clone();
    create_rule(&s.state, &s.stack.s3_clients(), r).await?;
    // Real time runs beside it (the test event S3 sent when notifications were set up is
    // applied, so the rule shows caught up).
    let _replicate = RunningFunction::start(&s.stack, "crr-replicate", &s.queue_url, &s.table)?;
    let console = s.console()?;
    let browser = Browser::start().await?;
    browser.open(&format!("{}#/rule/{id}", console.url)).await?;
    let historical = "section.card:nth-of-type(2) [data-badge]";
    browser
        .wait_text(historical, WAIT, "no migration yet", |t| {
            t == "Not requested"
        })
        .await?;
    browser.click("#backfill-start").await?;
    browser
        .wait_text(historical, WAIT, "the migration requested", |t| {
            t == "Pending"
        })
        .await?;
    browser.click("#backfill-pause").await?;
    browser
        .wait_text(historical, WAIT, "the migration paused", |t| t == "Paused")
        .await?;
    ensure!(s.state.job(&id).await?.context("job")?.state == JobState::Paused);
    browser.click("#backfill-start").await?;
    browser
        .wait_text(historical, WAIT, "the migration resumed", |t| {
            t == "Running" || t == "Pending"
        })
        .await?;

    browser.open(&console.url).await?;
    browser.wait_for(&format!("tr[data-rule='{id}']")).await?;
    let bar = format!("tr[data-rule='{id}'] [data-bar='objects']");

    // The backfill function, small pages and short invocations: the bar moves in steps.
    let function = s.backfill_function()?;
    let port = function.port;
    let runner = tokio::spawn(async move {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(240) {
            let _ = invoke(port, "crr-backfill", "{}").await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let mut seen = vec![];
    let started = Instant::now();
    loop {
        if let Ok(el) = browser.client.find(fantoccini::Locator::Css(&bar)).await
            && let Ok(Some(p)) = el.attr("data-percent").await
        {
            if seen.last() != Some(&p) {
                seen.push(p.clone());
            }
            if p == "100.00" {
                break;
            }
        }
        ensure!(
            started.elapsed() < Duration::from_secs(240),
            "the bar did not reach 100 %: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    runner.abort();
    println!("objects bar went through {seen:?}");
    let job = s.state.job(&id).await?.context("job")?;
    assert_eq!(job.state, JobState::Completed);
    browser
        .wait_text(
            &format!("tr[data-rule='{id}'] [data-badge]:last-of-type"),
            WAIT,
            "the completed badge",
            |_| true,
        )
        .await?;
    browser
        .wait_attr(
            &format!("tr[data-rule='{id}'] [data-bar='bytes']"),
            "data-percent",
            WAIT,
            "the bytes bar at 100 %",
            |p| p == "100.00",
        )
        .await?;
    browser
        .wait_text(
            &format!("tr[data-rule='{id}'] [data-field='lag']"),
            WAIT,
            "real time caught up",
            |t| t == "0 s",
        )
        .await?;
    browser.screenshot("console-overview-migrated").await?;

    // Verify from the rule's page: clean, then a missing replica streams in.
    browser.open(&format!("{}#/rule/{id}", console.url)).await?;
    browser.click("#verify").await?;
    browser.wait_for("[data-verify='clean']").await?;
    s.stack
        .s3(&s.stack.b)
        .delete_object()
        .bucket(&s.target)
        .key("old/0007")
        .send()
        .await?;
    browser.click("#verify").await?;
    browser.wait_for("[data-verify='drift']").await?;
    let row = browser
        .wait_text(
            "#verify-rows tr[data-drift='missing']",
            WAIT,
            "the missing object",
            |t| t.contains("old/0007"),
        )
        .await?;
    assert!(row.contains("missing"), "{row}");
    browser.screenshot("console-verify").await?;
    browser.close().await
}

#[tokio::test]
async fn lag_returns_to_zero_after_uploads_and_the_rule_pauses_and_resumes() -> Result<()> {
    let s = setup().await?;
    let r = s.rule();
    let id = r.id.clone();
    create_rule(&s.state, &s.stack.s3_clients(), r).await?;
    let _replicate = RunningFunction::start(&s.stack, "crr-replicate", &s.queue_url, &s.table)?;
    let console = s.console()?;
    let browser = Browser::start().await?;
    browser.open(&format!("{}#/rule/{id}", console.url)).await?;
    browser.wait_for("#pause").await?;

    for i in 0..20 {
        s.put(
            &s.source,
            true,
            &format!("live/{i:02}.txt"),
            &"x".repeat(100 * (i + 1)),
        )
        .await?;
    }
    browser
        .wait_text("[data-field='replicated']", WAIT, "20 replicated", |t| {
            t == "20 replicated"
        })
        .await?;
    browser
        .wait_text("[data-field='lag']", WAIT, "lag back to 0", |t| t == "0 s")
        .await?;
    browser
        .wait_text("[data-field='pending']", WAIT, "nothing pending", |t| {
            t == "0"
        })
        .await?;
    // The charts are drawn from the per-minute series (refreshed every 10 s): the
    // latency chart has a point where events were replicated.
    browser
        .wait_attr(
            "[data-chart='replication-latency']",
            "data-points",
            WAIT,
            "a latency point in the chart",
            |n| n.parse::<u32>().is_ok_and(|n| n >= 1),
        )
        .await?;
    let objects_chart = browser
        .wait_for("[data-chart='objects-replicated'] svg[role=img]")
        .await?;
    let label = objects_chart.attr("aria-label").await?.unwrap_or_default();
    println!("objects chart: {label}");
    // The last hour, where this test's minutes are visible.
    browser.click("[data-window='1h']").await?;
    browser
        .wait_text("#charts-note", WAIT, "the hour window", |t| {
            t.starts_with("Last hour")
        })
        .await?;
    browser.screenshot("console-rule-detail").await?;

    browser.click("#pause").await?;
    browser
        .wait_text(".title-row [data-badge]", WAIT, "the paused badge", |t| {
            t == "Paused"
        })
        .await?;
    ensure!(s.state.get_rule(&id).await?.context("rule")?.paused);
    browser.screenshot("console-paused").await?;
    browser.click("#resume").await?;
    browser
        .wait_text(".title-row [data-badge]", WAIT, "the enabled badge", |t| {
            t == "Enabled"
        })
        .await?;
    ensure!(!s.state.get_rule(&id).await?.context("rule")?.paused);
    browser.close().await
}

#[tokio::test]
async fn a_dead_lettered_event_is_redriven_and_the_rule_deleted() -> Result<()> {
    let s = setup().await?;
    let r = s.rule();
    let id = r.id.clone();
    create_rule(&s.state, &s.stack.s3_clients(), r).await?;
    // An event given up on, as the replicate function dead-letters it: with its reason.
    let body = s3_notification(
        &s.stack.a.region,
        &s.source,
        "ObjectCreated:Put",
        "reports/q3 summary.pdf",
        "\"0123\"",
        None,
        None,
    )
    .to_string();
    SqsDeadLetters::new(s.stack.sqs(&s.stack.a), &s.dlq_url)
        .dead_letter(
            "m-1",
            &body,
            &crr_shared::Error::AccessDenied {
                operation: "CopyObject",
                resource: format!("s3://{}/reports/q3 summary.pdf", s.target),
                permission: "s3:PutObject",
            },
        )
        .await?;
    let console = s.console()?;
    let browser = Browser::start().await?;
    browser.open(&format!("{}#/rule/{id}", console.url)).await?;
    let row = browser
        .wait_text(
            "#dead-letters-body tr[data-letter]",
            WAIT,
            "the failed event",
            |t| t.contains("reports/q3 summary.pdf"),
        )
        .await?;
    assert!(row.contains("s3:PutObject"), "the reason is shown: {row}");
    browser.screenshot("console-failed-events").await?;
    browser.click("#redrive").await?;
    browser
        .wait_for("#dead-letters-body [data-empty='dead-letters']")
        .await?;
    // (Beside it, the test event S3 sent when the rule turned notifications on.)
    let moved = s
        .stack
        .peek_messages(&s.stack.a, &s.queue_url, 1, WAIT)
        .await?;
    ensure!(
        moved.iter().filter(|(body, _)| body.contains("q3")).count() == 1,
        "the event is back in the event queue once: {moved:?}"
    );

    // Delete: the confirmation names the rule, and only the typed id unlocks it.
    browser.click("#delete").await?;
    browser.fill("#confirm-id", "not-the-id").await?;
    let go = browser.wait_for("#confirm-delete").await?;
    ensure!(
        go.attr("disabled").await?.is_some(),
        "delete is locked until the id is typed"
    );
    browser.fill("#confirm-id", &id).await?;
    browser.screenshot("console-delete-confirm").await?;
    browser.click("#confirm-delete").await?;
    browser
        .wait_text("h1", WAIT, "the rules page", |t| {
            t == "Cross-region replication rules"
        })
        .await?;
    eventually(WAIT, "the rule deleted", || async {
        Ok(s.state.get_rule(&id).await?.is_none().then_some(()))
    })
    .await?;
    browser.close().await
}

#[tokio::test]
async fn the_console_guards_changes_and_never_shows_credentials() -> Result<()> {
    let s = setup().await?;
    let r = s.rule();
    let id = r.id.clone();
    create_rule(&s.state, &s.stack.s3_clients(), r).await?;
    // Credentials of its own, to look for in everything the console serves.
    let secret = unique("secret-key");
    let session = unique("session-token");
    let console = ConsoleServer::start_with_env(
        &s.stack,
        &s.table,
        &["--queue-url", &s.queue_url, "--dlq-url", &s.dlq_url],
        &[
            ("AWS_SECRET_ACCESS_KEY", &secret),
            ("AWS_SESSION_TOKEN", &session),
        ],
    )?;
    assert!(
        console.url.starts_with("http://127.0.0.1:"),
        "loopback: {}",
        console.url
    );
    let host = console.authority().to_string();
    let (status, head, page) = console.request("GET", "/", &host, &[], "")?;
    assert_eq!(status, 200);
    assert!(
        head.contains("content-security-policy: default-src 'self'"),
        "{head}"
    );
    assert!(head.contains("x-frame-options: deny"), "{head}");
    let token = page
        .split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .context("the page carries its CSRF token")?
        .to_string();
    assert_eq!(token.len(), 64);

    let pause = format!("/api/rules/{id}/pause");
    // No token, a wrong one, a token from a foreign page's host: refused, nothing changes.
    let (status, _, body) = console.request("POST", &pause, &host, &[], "")?;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("CSRF token"), "{body}");
    let (status, _, _) = console.request("POST", &pause, &host, &[("x-crr-csrf", "0")], "")?;
    assert_eq!(status, 403);
    let port = host.rsplit(':').next().context("port")?;
    let (status, _, body) = console.request(
        "POST",
        &pause,
        &format!("attacker.example:{port}"),
        &[("x-crr-csrf", &token)],
        "",
    )?;
    assert_eq!(status, 421, "DNS rebinding refused: {body}");
    // Verify streams (EventSource cannot send headers) take the token in the query only.
    let (status, _, _) =
        console.request("GET", &format!("/api/rules/{id}/verify"), &host, &[], "")?;
    assert_eq!(status, 403);
    ensure!(!s.state.get_rule(&id).await?.context("rule")?.paused);
    let (status, _, _) = console.request("POST", &pause, &host, &[("x-crr-csrf", &token)], "")?;
    assert_eq!(status, 200);
    ensure!(s.state.get_rule(&id).await?.context("rule")?.paused);
    // The same token works through `localhost` too.
    let (status, _, _) = console.request(
        "POST",
        &format!("/api/rules/{id}/resume"),
        &format!("localhost:{port}"),
        &[("x-crr-csrf", &token)],
        "",
    )?;
    assert_eq!(status, 200);
    // Delete needs the id typed back.
    let (status, _, body) = console.request(
        "DELETE",
        &format!("/api/rules/{id}"),
        &host,
        &[("x-crr-csrf", &token), ("content-type", "application/json")],
        r#"{"confirm":"something else"}"#,
    )?;
    assert_eq!(status, 400, "{body}");
    ensure!(s.state.get_rule(&id).await?.is_some());

    for path in [
        "/".to_string(),
        "/assets/app.js".into(),
        "/assets/charts.js".into(),
        "/api/status".into(),
        format!("/api/rules/{id}"),
        format!("/api/rules/{id}/dead-letters"),
        format!("/api/rules/{id}/failures"),
        format!("/api/rules/{id}/suppressed"),
    ] {
        let (status, head, body) = console.request("GET", &path, &host, &[], "")?;
        assert_eq!(status, 200, "{path}: {body}");
        for leaked in [&secret, &session] {
            ensure!(
                !body.contains(leaked.as_str()) && !head.contains(&leaked.to_ascii_lowercase()),
                "{path} shows a credential"
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn suppressed_deletes_and_objects_the_migration_could_not_copy_are_listed() -> Result<()> {
    let s = setup().await?;
    // An archived object: the migration cannot read it (moto answers 403
    // InvalidObjectState / ObjectNotInActiveTierError) and lists it with S3's reason.
    s.stack
        .s3(&s.stack.a)
        .put_object()
        .bucket(&s.source)
        .key("archive/cold.bin")
        .storage_class(aws_sdk_s3::types::StorageClass::Glacier)
        .body(ByteStream::from(b"frozen".to_vec()))
        .send()
        .await?;
    s.put(&s.source, true, "docs/keep.txt", "kept").await?;
    let mut r = s.rule();
    r.policy = crr_shared::rule::Policy::Write;
    r.historical = true;
    let id = r.id.clone();
    create_rule(&s.state, &s.stack.s3_clients(), r).await?;
    let _replicate = RunningFunction::start(&s.stack, "crr-replicate", &s.queue_url, &s.table)?;
    let backfill = s.backfill_function()?;
    eventually(WAIT, "the migration finished", || async {
        let _ = invoke(backfill.port, "crr-backfill", "{}").await;
        Ok(s.state
            .job(&id)
            .await?
            .filter(|j| j.state.is_finished())
            .map(|_| ()))
    })
    .await?;
    // Policy write: a delete in the source stays out of the target, and is listed.
    s.stack
        .s3(&s.stack.a)
        .delete_object()
        .bucket(&s.source)
        .key("docs/keep.txt")
        .send()
        .await?;
    let console = s.console()?;
    let browser = Browser::start().await?;
    browser.open(&format!("{}#/rule/{id}", console.url)).await?;
    let failed = browser
        .wait_text(
            "#backfill-failures-body tbody tr",
            WAIT,
            "the archived object",
            |t| t.contains("archive/cold.bin"),
        )
        .await?;
    assert!(failed.contains("SrcObjectArchived"), "{failed}");
    browser
        .wait_text(
            "#suppressed-deletes-body tbody tr",
            WAIT,
            "the suppressed delete",
            |t| t.contains("docs/keep.txt"),
        )
        .await?;
    browser
        .wait_text(
            "[data-field='failed_objects']",
            WAIT,
            "one failed object",
            |t| t == "1 failed objects",
        )
        .await?;
    browser.screenshot("console-lists").await?;
    browser.close().await
}
