//! A local SQS event source: receives batches from a queue, invokes the function with
//! them, and deletes the messages it did not report as failed (partial batch response).
//! One poller has one batch in flight at a time: `--instances N` runs N of them, as an
//! event source mapping with `MaximumConcurrency` N invokes up to N batches at once.
//! Failed and unanswered messages reappear after the queue's visibility timeout, and a
//! redrive policy on the queue moves them to its DLQ, as with Lambda's own mapping.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use aws_lambda_events::sqs::SqsBatchResponse;
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageSystemAttributeName, QueueAttributeName,
};
use axum::body::Bytes;
use serde_json::{Value, json};

use super::instances::Instances;
use super::runtime_api::InvokeResult;

pub async fn run(
    sdk: aws_config::SdkConfig,
    function: Instances,
    queue_url: String,
    endpoint: Option<String>,
    batch_size: i32,
) {
    let mut builder = aws_sdk_sqs::config::Builder::from(&sdk);
    if let Some(url) = endpoint.or_else(|| crate::queue_endpoint(&queue_url)) {
        builder = builder.endpoint_url(url);
    }
    let sqs = aws_sdk_sqs::Client::from_conf(builder.build());
    let region = sdk.region().map(|r| r.to_string()).unwrap_or_default();
    let arn = sqs
        .get_queue_attributes()
        .queue_url(&queue_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .ok()
        .and_then(|o| {
            o.attributes()
                .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        })
        .unwrap_or_default();
    loop {
        let received = sqs
            .receive_message()
            .queue_url(&queue_url)
            .max_number_of_messages(batch_size.clamp(1, 10))
            .wait_time_seconds(1)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await;
        let messages = match received {
            Ok(out) => out.messages.unwrap_or_default(),
            Err(e) => {
                eprintln!("crr local: receive from {queue_url} failed: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if messages.is_empty() {
            continue;
        }
        let mut handles = HashMap::new();
        let records: Vec<Value> = messages
            .iter()
            .map(|m| {
                let id = m.message_id().unwrap_or_default().to_string();
                handles.insert(
                    id.clone(),
                    m.receipt_handle().unwrap_or_default().to_string(),
                );
                let attributes: HashMap<String, String> = m
                    .attributes()
                    .map(|a| {
                        a.iter()
                            .map(|(k, v)| (k.as_str().to_string(), v.clone()))
                            .collect()
                    })
                    .unwrap_or_default();
                json!({
                    "messageId": id,
                    "receiptHandle": m.receipt_handle().unwrap_or_default(),
                    "body": m.body().unwrap_or_default(),
                    "attributes": attributes,
                    "messageAttributes": {},
                    "md5OfBody": m.md5_of_body().unwrap_or_default(),
                    "eventSource": "aws:sqs",
                    "eventSourceARN": arn,
                    "awsRegion": region,
                })
            })
            .collect();
        let payload = Bytes::from(json!({"Records": records}).to_string());
        let failed: HashSet<String> = match function.invoke(payload).await {
            InvokeResult::Ok(body) => match serde_json::from_slice::<SqsBatchResponse>(&body) {
                Ok(response) => response
                    .batch_item_failures
                    .into_iter()
                    .map(|f| f.item_identifier)
                    .collect(),
                // An unreadable answer fails the whole batch, as Lambda treats it.
                Err(_) => handles.keys().cloned().collect(),
            },
            InvokeResult::Error(body) => {
                eprintln!(
                    "crr local: invocation failed: {}",
                    String::from_utf8_lossy(&body)
                );
                handles.keys().cloned().collect()
            }
        };
        let entries: Vec<DeleteMessageBatchRequestEntry> = handles
            .iter()
            .filter(|(id, _)| !failed.contains(*id))
            .enumerate()
            .filter_map(|(i, (_, handle))| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(format!("m{i}"))
                    .receipt_handle(handle)
                    .build()
                    .ok()
            })
            .collect();
        if !entries.is_empty()
            && let Err(e) = sqs
                .delete_message_batch()
                .queue_url(&queue_url)
                .set_entries(Some(entries))
                .send()
                .await
        {
            eprintln!("crr local: delete from {queue_url} failed: {e}");
        }
    }
}
