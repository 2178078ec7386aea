//! Rules against the real local stack: validation, the atomic one-pair-per-bucket claim
//! (including a race of concurrent creates), notification merging and all-or-nothing
//! creation. DynamoDB Local runs the real transaction; moto stores the notification
//! configuration.

use anyhow::Result;
use aws_sdk_s3::types::{Event, NotificationConfiguration, QueueConfiguration};
use crr_shared::Error;
use crr_shared::rule::Notify;
use crr_shared::rule_admin::{create_rule, delete_rule};
use crr_shared::state::RuleStore;
use crr_tests::{Stack, rule, unique};

struct Fixture {
    stack: Stack,
    state: crr_shared::dynamo::DynamoStore,
    s3: crr_shared::adapters::s3::S3Clients,
    queue_arn: String,
}

async fn fixture() -> Result<Fixture> {
    let stack = Stack::from_env()?;
    let state = stack.state(&unique("rules")).await?;
    let (_, queue_arn) = stack.create_queue(&stack.a, &unique("q"), 5).await?;
    let s3 = stack.s3_clients();
    Ok(Fixture {
        stack,
        state,
        s3,
        queue_arn,
    })
}

impl Fixture {
    async fn bucket_a(&self) -> Result<String> {
        let b = unique("src");
        self.stack.create_bucket(&self.stack.a, &b).await?;
        Ok(b)
    }
    async fn bucket_b(&self) -> Result<String> {
        let b = unique("dst");
        self.stack.create_bucket(&self.stack.b, &b).await?;
        Ok(b)
    }
    fn rule(&self, id: &str, src: &str, dst: &str) -> crr_shared::rule::Rule {
        let mut r = rule(id, self.stack.a.bucket(src), self.stack.b.bucket(dst));
        r.notify = Notify::Queue {
            arn: self.queue_arn.clone(),
        };
        r
    }
}

fn field_of(err: &Error) -> &str {
    match err {
        Error::InvalidRule { field, .. } | Error::BucketClaimed { field, .. } => field,
        other => panic!("expected a rule error, got: {other}"),
    }
}

#[tokio::test]
async fn a_bucket_is_in_at_most_one_pair_as_source_or_target() -> Result<()> {
    let f = fixture().await?;
    let (a, b, c) = (
        f.bucket_a().await?,
        f.bucket_b().await?,
        f.bucket_b().await?,
    );
    create_rule(&f.state, &f.s3, f.rule("ab", &a, &b)).await?;

    // A->B forbids A->C ...
    let err = create_rule(&f.state, &f.s3, f.rule("ac", &a, &c))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("rule field `source.bucket`: bucket '{a}' is already in rule 'ab' as source")
    );
    // ... and C->B ...
    let c_src = f.bucket_a().await?;
    let err = create_rule(&f.state, &f.s3, f.rule("cb", &c_src, &b))
        .await
        .unwrap_err();
    assert_eq!(field_of(&err), "target.bucket");
    // ... and B as a source anywhere.
    let mut ba = rule("ba", f.stack.b.bucket(&b), f.stack.a.bucket(&c_src));
    ba.notify = Notify::EventBridge;
    let err = create_rule(&f.state, &f.s3, ba).await.unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("bucket '{b}' is already in rule 'ab' as target")),
        "{err}"
    );

    let ids: Vec<String> = f
        .state
        .list_rules()
        .await?
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, vec!["ab"]);
    // Deleting the rule frees both buckets.
    delete_rule(&f.state, &f.s3, "ab").await?;
    create_rule(&f.state, &f.s3, f.rule("ac", &a, &c)).await?;
    Ok(())
}

#[tokio::test]
async fn concurrent_creates_claiming_one_bucket_have_exactly_one_winner() -> Result<()> {
    let f = fixture().await?;
    let source = f.bucket_a().await?;
    let mut targets = Vec::new();
    for _ in 0..8 {
        targets.push(f.bucket_b().await?);
    }
    let attempts = targets
        .iter()
        .enumerate()
        .map(|(i, t)| create_rule(&f.state, &f.s3, f.rule(&format!("race{i}"), &source, t)));
    let results = futures::future::join_all(attempts).await;
    let winners = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(winners, 1, "results: {results:?}");
    for err in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(
            matches!(err, Error::BucketClaimed { .. }),
            "unexpected error: {err}"
        );
        assert_eq!(field_of(err), "source.bucket");
    }
    assert_eq!(f.state.list_rules().await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn invalid_rules_are_refused_with_the_field_named_and_nothing_is_made() -> Result<()> {
    let f = fixture().await?;
    let (a, b) = (f.bucket_a().await?, f.bucket_b().await?);

    let mut same_region = f.rule("r1", &a, &b);
    same_region.target.region = same_region.source.region.clone();
    let err = create_rule(&f.state, &f.s3, same_region).await.unwrap_err();
    assert_eq!(field_of(&err), "target.region");

    let mut six = f.rule("r1", &a, &b);
    six.prefixes = (0..6).map(|i| format!("p{i}/")).collect();
    let err = create_rule(&f.state, &f.s3, six).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "rule field `prefixes`: at most 5 prefixes are allowed, got 6"
    );

    let mut dup = f.rule("r1", &a, &b);
    dup.prefixes = vec!["x/".into(), "x/".into()];
    assert_eq!(
        field_of(&create_rule(&f.state, &f.s3, dup).await.unwrap_err()),
        "prefixes"
    );

    // A target bucket that does not exist: refused before anything is claimed.
    let missing = unique("missing");
    let err = create_rule(&f.state, &f.s3, f.rule("r1", &a, &missing))
        .await
        .unwrap_err();
    assert_eq!(field_of(&err), "target.bucket");
    assert!(err.to_string().contains("does not exist"), "{err}");
    let source_notifications = crr_shared::notification::read(&f.stack.s3(&f.stack.a), &a).await?;
    assert!(source_notifications.queue_configurations().is_empty());

    assert!(f.state.list_rules().await?.is_empty());
    create_rule(&f.state, &f.s3, f.rule("r1", &a, &b)).await?;
    Ok(())
}

#[tokio::test]
async fn notifications_are_merged_with_the_existing_configuration_and_restored_on_delete()
-> Result<()> {
    let f = fixture().await?;
    let (a, b) = (f.bucket_a().await?, f.bucket_b().await?);
    let (_, other_arn) = f
        .stack
        .create_queue(&f.stack.a, &unique("thumbs"), 5)
        .await?;
    let s3a = f.stack.s3(&f.stack.a);
    let existing = QueueConfiguration::builder()
        .id("thumbnails")
        .queue_arn(&other_arn)
        .events(Event::from("s3:ObjectCreated:Put"))
        .build()?;
    s3a.put_bucket_notification_configuration()
        .bucket(&a)
        .notification_configuration(
            NotificationConfiguration::builder()
                .queue_configurations(existing)
                .build(),
        )
        .send()
        .await?;

    create_rule(&f.state, &f.s3, f.rule("r1", &a, &b)).await?;
    let now = s3a
        .get_bucket_notification_configuration()
        .bucket(&a)
        .send()
        .await?;
    let ids: Vec<&str> = now
        .queue_configurations()
        .iter()
        .filter_map(|q| q.id())
        .collect();
    assert_eq!(ids, vec!["thumbnails", "crr-r1"]);
    assert_eq!(now.queue_configurations()[1].queue_arn(), f.queue_arn);

    delete_rule(&f.state, &f.s3, "r1").await?;
    let after = s3a
        .get_bucket_notification_configuration()
        .bucket(&a)
        .send()
        .await?;
    let ids: Vec<&str> = after
        .queue_configurations()
        .iter()
        .filter_map(|q| q.id())
        .collect();
    assert_eq!(ids, vec!["thumbnails"]);
    assert!(f.state.get_rule("r1").await?.is_none());
    Ok(())
}

/// `crr rule create ARGS` for a rule from `source` to `target`; the failure's stderr, or
/// the success's stderr (warnings).
fn crr_create(
    f: &Fixture,
    table: &str,
    id: &str,
    source: &crr_shared::rule::BucketRef,
    target: &crr_shared::rule::BucketRef,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Result<(bool, String)> {
    let endpoint = |b: &crr_shared::rule::BucketRef| b.endpoint_url.clone().unwrap_or_default();
    let (se, te) = (endpoint(source), endpoint(target));
    let mut args = vec![
        "rule",
        "create",
        "--id",
        id,
        "--source-bucket",
        &source.bucket,
        "--source-region",
        &source.region,
        "--source-endpoint-url",
        &se,
        "--source-path-style",
        "--target-bucket",
        &target.bucket,
        "--target-region",
        &target.region,
        "--target-endpoint-url",
        &te,
        "--target-path-style",
    ];
    args.extend_from_slice(extra);
    let mut cmd = f.stack.crr_command(table, &args)?;
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// A refusal is one line on stderr, exit code 2.
fn one_line(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "not one line: {stderr}");
    assert!(lines[0].starts_with("crr: error: "), "{stderr}");
    lines[0]
}

/// Issue 16: with the deployment recorded (`crr init-table --source-buckets ...`), `crr
/// rule create` refuses a source outside the deployment's region or bucket lists with a
/// one-line error and makes nothing; `--force` creates it with a warning. An endpoint the
/// deployment does not allow is refused even with `--force`, before any request to it;
/// without a record, the CLI's own `CRR_ALLOWED_ENDPOINTS` (default: AWS only) decides.
#[tokio::test]
async fn rules_are_held_to_the_recorded_deployment() -> Result<()> {
    let f = fixture().await?;
    let table = f.state.table().to_string();
    let (a, b) = (&f.stack.a, &f.stack.b);
    let (src, dst, unlisted) = (
        f.bucket_a().await?,
        f.bucket_b().await?,
        f.bucket_a().await?,
    );
    // A source in the other region (moto B) and a target for it in A: both listed.
    let (src_b, dst_a) = (unique("srcb"), unique("dsta"));
    f.stack.create_bucket(b, &src_b).await?;
    f.stack.create_bucket(a, &dst_a).await?;
    let queue = ["--notify-queue-arn", f.queue_arn.as_str()];
    let (sources, targets) = (format!("{src},{src_b}"), format!("{dst},{dst_a}"));
    let endpoints = format!("{},{}", a.endpoint, b.endpoint);
    let recorded = f.stack.crr(
        &table,
        &[
            "init-table",
            "--source-buckets",
            &sources,
            "--target-buckets",
            &targets,
            "--allowed-endpoints",
            &endpoints,
        ],
    )?;
    assert!(recorded.contains("region us-east-1"), "{recorded}");

    // A source outside SourceBuckets.
    let (ok, err) = crr_create(
        &f,
        &table,
        "r1",
        &a.bucket(&unlisted),
        &b.bucket(&dst),
        &queue,
        &[],
    )?;
    assert!(!ok);
    let line = one_line(&err);
    assert!(
        line.contains(&format!(
            "rule field `source.bucket`: '{unlisted}' is not in this deployment's SourceBuckets"
        )) && line.contains("--force"),
        "{line}"
    );
    // A source outside the deployment's region (EventBridge delivery).
    let (ok, err) = crr_create(
        &f,
        &table,
        "r2",
        &b.bucket(&src_b),
        &a.bucket(&dst_a),
        &[],
        &[],
    )?;
    assert!(!ok);
    let line = one_line(&err);
    assert!(
        line.contains(
            "rule field `source.region`: 'eu-west-1' is not in this deployment's region us-east-1"
        ),
        "{line}"
    );
    assert!(f.state.list_rules().await?.is_empty());
    assert!(f.state.rule_for_source(&unlisted).await?.is_none());

    // An endpoint not in the list: refused even with --force, and never contacted.
    let proxy = crr_tests::fault_proxy::FaultProxy::start(
        &b.endpoint,
        crr_tests::fault_proxy::FaultPlan::none(1),
    )
    .await?;
    let via_proxy = crr_tests::S3Server {
        endpoint: proxy.endpoint.clone(),
        region: b.region.clone(),
    };
    let forced: Vec<&str> = queue.iter().copied().chain(["--force"]).collect();
    let (ok, err) = crr_create(
        &f,
        &table,
        "r3",
        &a.bucket(&src),
        &via_proxy.bucket(&dst),
        &forced,
        &[],
    )?;
    assert!(!ok);
    let line = one_line(&err);
    assert!(
        line.contains(&format!("names target endpoint '{}'", proxy.endpoint))
            && line.contains("CRR_ALLOWED_ENDPOINTS"),
        "{line}"
    );
    assert_eq!(
        proxy
            .stats
            .requests
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert!(f.state.list_rules().await?.is_empty());

    // --force: created, with the warning on stderr.
    let (ok, err) = crr_create(
        &f,
        &table,
        "r1",
        &a.bucket(&unlisted),
        &b.bucket(&dst),
        &forced,
        &[],
    )?;
    assert!(ok, "{err}");
    assert!(
        err.contains("warning") && err.contains("SourceBuckets"),
        "{err}"
    );
    assert!(f.state.get_rule("r1").await?.is_some());

    // No record: the CLI's own CRR_ALLOWED_ENDPOINTS decides; unset, AWS only.
    let bare = unique("rules");
    f.stack.state(&bare).await?;
    let (ok, err) = crr_create(
        &f,
        &bare,
        "r4",
        &a.bucket(&src),
        &b.bucket(&dst),
        &queue,
        &[("CRR_ALLOWED_ENDPOINTS", "")],
    )?;
    assert!(!ok);
    let line = one_line(&err);
    assert!(
        line.contains(&format!("names source endpoint '{}'", a.endpoint))
            && line.contains("allowed: AWS endpoints only"),
        "{line}"
    );
    let (ok, err) = crr_create(
        &f,
        &bare,
        "r4",
        &a.bucket(&src),
        &b.bucket(&dst),
        &queue,
        &[],
    )?;
    assert!(ok, "{err}");
    Ok(())
}
