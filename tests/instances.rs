//! `crr local run-function --instances N`: N processes of a function, each behind its own
//! Runtime API emulator, fed by N SQS pollers, as Lambda runs N execution environments
//! for an event source mapping whose MaximumConcurrency is N.
//!
//! Concurrency is proved without timing: the fault proxy in front of the target holds
//! each object's PUT until the test lets it go. With one message per invocation, an
//! invocation reaches its PUT only while holding its instance, so all three PUTs held at
//! once means three invocations in flight at once; one instance would never get past the
//! first. (moto's S3 sends no notifications here: the test writes S3's events itself.)

use std::time::Duration;

use anyhow::{Result, ensure};
use aws_sdk_s3::primitives::ByteStream;
use crr_shared::rule::Notify;
use crr_shared::rule_admin::create_rule;
use crr_tests::fault_proxy::{FaultPlan, FaultProxy};
use crr_tests::{RunningFunction, Stack, eventually, read_object, rule, s3_notification, unique};

const WAIT: Duration = Duration::from_secs(60);
const INSTANCES: usize = 3;

#[tokio::test]
async fn three_instances_fed_by_a_queue_run_three_invocations_at_once() -> Result<()> {
    let stack = Stack::from_env()?;
    let table = unique("inst");
    let state = stack.state(&table).await?;
    let (source, target) = stack.bucket_pair(&stack.a, &stack.b).await?;
    let proxy = FaultProxy::start(&stack.b.endpoint, FaultPlan::none(18)).await?;
    let mut through_proxy = stack.b.bucket(&target);
    through_proxy.endpoint_url = Some(proxy.endpoint.clone());
    let mut r = rule(&unique("rule"), stack.a.bucket(&source), through_proxy);
    r.notify = Notify::External;
    create_rule(&state, &stack.s3_clients(), r).await?;
    // Visibility well past the time the PUTs are held: no message comes back meanwhile.
    let (queue_url, _) = stack.create_queue(&stack.a, &unique("events"), 120).await?;

    let s3a = stack.s3(&stack.a);
    let sqs = stack.sqs(&stack.a);
    let keys: Vec<String> = (0..INSTANCES).map(|i| format!("k{i}")).collect();
    let mut held = Vec::new();
    for key in &keys {
        held.push(proxy.hold("PUT", &format!("/{target}/{key}")));
        let put = s3a
            .put_object()
            .bucket(&source)
            .key(key)
            .body(ByteStream::from(key.as_bytes().to_vec()))
            .send()
            .await?;
        let event = s3_notification(
            &stack.a.region,
            &source,
            "ObjectCreated:Put",
            key,
            put.e_tag().unwrap_or_default().trim_matches('"'),
            None,
            None,
        );
        sqs.send_message()
            .queue_url(&queue_url)
            .message_body(event.to_string())
            .send()
            .await?;
    }

    let function = RunningFunction::start_with_args(
        &stack,
        "crr-replicate",
        &queue_url,
        &table,
        120,
        &[],
        &["--instances", &INSTANCES.to_string(), "--batch-size", "1"],
    )?;
    for h in &mut held {
        h.arrived(WAIT).await?;
    }
    // Every PUT is held: three invocations are in flight now, in three processes.
    let pids = function.function_pids();
    ensure!(
        pids.len() == INSTANCES,
        "{INSTANCES} function processes expected, found {pids:?}"
    );

    for h in held {
        h.release();
    }
    let s3b = stack.s3(&stack.b);
    for key in &keys {
        let (body, _) = eventually(WAIT, &format!("replica of {key}"), || async {
            read_object(&s3b, &target, key).await
        })
        .await?;
        assert_eq!(body, key.as_bytes());
    }
    // Every message was deleted: each poller deleted its own batch.
    stack.wait_queue_drained(&stack.a, &queue_url, WAIT).await?;
    Ok(())
}
