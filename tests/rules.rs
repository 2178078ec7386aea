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
    s3: crr_shared::s3::S3Clients,
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
