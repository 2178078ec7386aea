//! The per-event replicate function: wiring only; the logic is `crr_shared::replicate`.

use std::sync::Arc;

use crr_shared::config::FunctionConfig;
use crr_shared::dynamo::DynamoStore;
use crr_shared::replicate::{Replicator, diagnostic};
use crr_shared::s3::S3Clients;
use lambda_runtime::{Diagnostic, LambdaEvent, service_fn, tracing};
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    tracing::init_default_subscriber();
    let config = FunctionConfig::from_env()?;
    let aws = aws_config::load_from_env().await;
    let rules = DynamoStore::new(aws_sdk_dynamodb::Client::new(&aws), config.table.clone());
    let replicator = Arc::new(Replicator::new(
        Arc::new(rules),
        Arc::new(S3Clients::new(aws)),
        config.engine,
    ));
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| {
        let replicator = Arc::clone(&replicator);
        async move {
            replicator
                .handle(&event.payload)
                .await
                .map_err(|e| -> Diagnostic { diagnostic(&e) })
        }
    }))
    .await
}
