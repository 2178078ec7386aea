//! SQS at the edge: the dead-letter queue, continuations on the event queue, and the
//! backfill's segment queue.

use async_trait::async_trait;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{MessageAttributeValue, SendMessageBatchRequestEntry};

use crate::backfill::SegmentWork;
use crate::dead_letter::{DeadLetters, ERROR_ATTRIBUTE, KIND_ATTRIBUTE, ORIGINAL_ID_ATTRIBUTE};
use crate::error::{Error, Result, from_sdk};
use crate::ports::SegmentQueue;

/// The SQS dead-letter queue.
pub struct SqsDeadLetters {
    client: Client,
    queue_url: String,
}

impl SqsDeadLetters {
    pub fn new(client: Client, queue_url: impl Into<String>) -> Self {
        Self {
            client,
            queue_url: queue_url.into(),
        }
    }
}

/// An SQS error, classified (`from_sdk`), naming the queue and the permission the
/// operation needs.
pub(crate) fn sqs_error<E, R>(
    operation: &'static str,
    queue: &str,
    err: aws_sdk_sqs::error::SdkError<E, R>,
) -> Error
where
    E: aws_smithy_types::error::metadata::ProvideErrorMetadata
        + std::error::Error
        + Send
        + Sync
        + 'static,
    R: crate::error::HttpStatus + std::fmt::Debug + Send + Sync + 'static,
{
    let permission = match operation {
        "SendMessage" => "sqs:SendMessage",
        "ReceiveMessage" => "sqs:ReceiveMessage",
        "DeleteMessage" => "sqs:DeleteMessage",
        "SendMessageBatch" => "sqs:SendMessage",
        _ => "sqs:ChangeMessageVisibility",
    };
    from_sdk(operation, format!("queue {queue}"), permission, err)
}

fn text(value: &str) -> Result<MessageAttributeValue> {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .map_err(|e| Error::Config(e.to_string()))
}

#[async_trait]
impl DeadLetters for SqsDeadLetters {
    async fn dead_letter(&self, message_id: &str, body: &str, reason: &Error) -> Result<()> {
        // SQS attribute values are limited in size; the reason is one line anyway (cut on
        // a character boundary: keys may be any UTF-8).
        let line = crate::error::clip(&reason.to_string(), 1000);
        self.client
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(body)
            .message_attributes(ERROR_ATTRIBUTE, text(&line)?)
            .message_attributes(KIND_ATTRIBUTE, text(reason.kind())?)
            .message_attributes(ORIGINAL_ID_ATTRIBUTE, text(message_id)?)
            .send()
            .await
            .map_err(|e| sqs_error("SendMessage", &self.queue_url, e))?;
        Ok(())
    }
}

/// The event queue, taking back a message whose copy continues (`resumable.rs`).
pub struct SqsContinuations {
    client: Client,
    queue_url: String,
}

impl SqsContinuations {
    pub fn new(client: Client, queue_url: impl Into<String>) -> Self {
        Self {
            client,
            queue_url: queue_url.into(),
        }
    }
}

#[async_trait]
impl crate::resumable::Continuations for SqsContinuations {
    async fn continue_later(&self, body: &str) -> Result<()> {
        self.client
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(body)
            .send()
            .await
            .map_err(|e| sqs_error("SendMessage", &self.queue_url, e))?;
        Ok(())
    }
}

/// The backfill's segment queue: one message per segment to work on.
pub struct SqsSegmentQueue {
    client: Client,
    queue_url: String,
}

impl SqsSegmentQueue {
    pub fn new(client: Client, queue_url: impl Into<String>) -> Self {
        Self {
            client,
            queue_url: queue_url.into(),
        }
    }
}

#[async_trait]
impl SegmentQueue for SqsSegmentQueue {
    async fn send(&self, work: &[SegmentWork]) -> Result<()> {
        // SendMessageBatch takes 10 entries; an entry refused inside an accepted batch
        // (throttled, say) is sent again with the next round, up to a few times.
        for chunk in work.chunks(10) {
            let mut pending: Vec<(String, String)> = chunk
                .iter()
                .enumerate()
                .map(|(i, w)| (i.to_string(), w.body()))
                .collect();
            for round in 0..5 {
                if pending.is_empty() {
                    break;
                }
                if round > 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(50 << round)).await;
                }
                let entries = pending
                    .iter()
                    .map(|(id, body)| {
                        SendMessageBatchRequestEntry::builder()
                            .id(id)
                            .message_body(body)
                            .build()
                            .map_err(|e| Error::Config(e.to_string()))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let out = self
                    .client
                    .send_message_batch()
                    .queue_url(&self.queue_url)
                    .set_entries(Some(entries))
                    .send()
                    .await
                    .map_err(|e| sqs_error("SendMessageBatch", &self.queue_url, e))?;
                let failed: Vec<&str> = out.failed().iter().map(|f| f.id()).collect();
                if let Some(f) = out.failed().iter().find(|f| f.sender_fault()) {
                    return Err(Error::Config(format!(
                        "the segment queue {} refused a message: {} {}",
                        self.queue_url,
                        f.code(),
                        f.message().unwrap_or_default()
                    )));
                }
                pending.retain(|(id, _)| failed.contains(&id.as_str()));
            }
            if !pending.is_empty() {
                return Err(Error::Transient {
                    operation: "SendMessageBatch",
                    resource: format!("queue {}", self.queue_url),
                    detail: format!("{} message(s) not taken after 5 tries", pending.len()),
                    throttled: false,
                    source: "partial batch failure".into(),
                });
            }
        }
        Ok(())
    }
}
