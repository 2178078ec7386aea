//! The backfill function (EventBridge schedule, on demand, or SQS batches of segment
//! messages in fan-out mode): wiring only; the logic is `crr_shared::backfill`.

use std::sync::Arc;

use crr_shared::adapters::s3::S3Clients;
use crr_shared::adapters::sqs::SqsSegmentQueue;
use crr_shared::backfill::Backfiller;
use crr_shared::config::FunctionConfig;
use crr_shared::dynamo::DynamoStore;
use crr_shared::replicate::diagnostic;
use crr_shared::retry::instant_of;
use lambda_runtime::{Diagnostic, LambdaEvent, service_fn, tracing};
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    tracing::init_default_subscriber();
    let config = FunctionConfig::from_env()?;
    // One budget for the whole process: every copy shares this engine's (clones share it).
    tracing::info!(
        object_memory_mib = config.engine.memory.bytes() / (1024 * 1024),
        "memory budget for object bytes"
    );
    let settings = FunctionConfig::backfill()?;
    let aws = aws_config::load_from_env().await;
    let state = Arc::new(DynamoStore::new(
        crr_shared::adapters::aws_clients::dynamodb(&aws),
        config.table.clone(),
    ));
    let segment_queue = FunctionConfig::segment_queue_url().map(|url| {
        Arc::new(SqsSegmentQueue::new(
            crr_shared::adapters::aws_clients::sqs(&aws),
            url,
        ))
    });
    let mut backfiller = Backfiller::new(
        state.clone(),
        state.clone(),
        Arc::new(S3Clients::new(aws)),
        config.engine,
        settings,
    )
    .with_uploads(state.clone())
    .with_rate_store(state.clone())
    .with_stats(state);
    if let Some(queue) = segment_queue {
        tracing::info!("fan-out mode: the schedule coordinates, the segment queue feeds the work");
        backfiller = backfiller.with_segment_queue(queue);
    }
    let backfiller = Arc::new(backfiller);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| {
        let backfiller = Arc::clone(&backfiller);
        async move {
            let deadline = instant_of(event.context.deadline());
            backfiller
                .handle(&event.payload, &event.context.request_id, deadline)
                .await
                .map_err(|e| -> Diagnostic { diagnostic(&e) })
        }
    }))
    .await
}
