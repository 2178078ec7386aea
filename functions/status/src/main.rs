//! The status function (Lambda Function URL, AWS_IAM auth): wiring only; the numbers are
//! computed by `crr_shared::status`, the same code `crr status` runs.

use std::sync::Arc;

use aws_lambda_events::event::lambda_function_urls::LambdaFunctionUrlRequest;
use crr_shared::adapters::aws_clients;
use crr_shared::config::FunctionConfig;
use crr_shared::deployment::Deployment;
use crr_shared::dynamo::DynamoStore;
use crr_shared::status::{EventQueue, SqsEventQueue, StatusService, answer};
use lambda_runtime::{LambdaEvent, service_fn, tracing};
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    tracing::init_default_subscriber();
    let config = FunctionConfig::from_env()?;
    let settings = FunctionConfig::status()?;
    let aws = aws_config::load_from_env().await;
    let state = Arc::new(DynamoStore::new(
        aws_clients::dynamodb(&aws),
        config.table.clone(),
    ));
    let queue = settings.queue_url.map(|url| {
        Arc::new(SqsEventQueue::new(
            aws_clients::sqs(&aws),
            url,
            config.dlq_url.clone(),
            Some(aws_clients::cloudwatch(&aws)),
        )) as Arc<dyn EventQueue>
    });
    let service = Arc::new(
        StatusService::new(state.clone(), state.clone(), state, queue, settings.settle)
            // Without a record in the table, the stack's own parameters say what it replicates.
            .with_deployment_fallback(Deployment::from_env())
            .with_metrics(),
    );
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<LambdaFunctionUrlRequest>| {
            let service = Arc::clone(&service);
            async move {
                let request = event.payload;
                let method = request
                    .request_context
                    .http
                    .method
                    .as_deref()
                    .unwrap_or("GET");
                let reply = answer(&service, method, &request.query_string_parameters).await;
                Ok::<Value, lambda_runtime::Error>(reply.to_function_url_response())
            }
        },
    ))
    .await
}
