//! The backfill function. Not implemented yet: it answers every invocation with a
//! non-retryable "not implemented" error so nothing mistakes it for a success.

use lambda_runtime::{Diagnostic, LambdaEvent, service_fn, tracing};
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    tracing::init_default_subscriber();
    lambda_runtime::run(service_fn(|_event: LambdaEvent<Value>| async {
        Err::<Value, Diagnostic>(Diagnostic {
            error_type: "NonRetryable.NotImplemented".into(),
            error_message: "the backfill function is not implemented yet".into(),
        })
    }))
    .await
}
