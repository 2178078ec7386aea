//! The per-event replicate function: wiring only; the logic is `crr_shared::replicate`.

use std::sync::Arc;

use crr_shared::adapters::aws_clients;
use crr_shared::adapters::s3::S3Clients;
use crr_shared::adapters::sqs::{SqsContinuations, SqsDeadLetters};
use crr_shared::config::FunctionConfig;
use crr_shared::dead_letter::DeadLetters;
use crr_shared::dynamo::DynamoStore;
use crr_shared::replicate::{Replicator, diagnostic};
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
    let aws = aws_config::load_from_env().await;
    let state = Arc::new(DynamoStore::new(
        aws_clients::dynamodb(&aws),
        config.table.clone(),
    ));
    let dead_letters = config.dlq_url.as_ref().map(|url| {
        Arc::new(SqsDeadLetters::new(aws_clients::sqs(&aws), url)) as Arc<dyn DeadLetters>
    });
    let mut replicator = Replicator::new(
        state.clone(),
        Arc::new(S3Clients::new(aws.clone())),
        dead_letters,
        config.replicator(),
    )
    .with_uploads(state);
    if let Some(url) = &config.queue_url {
        replicator = replicator
            .with_continuations(Arc::new(SqsContinuations::new(aws_clients::sqs(&aws), url)));
    }
    let replicator = Arc::new(replicator);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| {
        let replicator = Arc::clone(&replicator);
        async move {
            let deadline = instant_of(event.context.deadline());
            replicator
                .handle(&event.payload, Some(deadline))
                .await
                .map_err(|e| -> Diagnostic { diagnostic(&e) })
        }
    }))
    .await
}
