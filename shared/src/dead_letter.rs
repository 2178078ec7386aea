//! The dead-letter queue: where events go that could not be replicated, with the reason.
//!
//! SQS's own redrive policy moves a message to the DLQ after `maxReceiveCount` failed
//! receives, but without saying why. The replicate function therefore sends a message to
//! the DLQ itself, with the error as message attributes, when the error is permanent or
//! the message has been received `max_receives` times (set below the queue's
//! maxReceiveCount), and acknowledges it. `redrive` moves messages back.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::MessageSystemAttributeName;

use crate::adapters::sqs::sqs_error;
use crate::error::{Error, Result};

/// Message attribute holding the one-line error.
pub const ERROR_ATTRIBUTE: &str = "crr-error";
/// Message attribute holding the error kind (`NoSuchBucket`, `Retryable`...).
pub const KIND_ATTRIBUTE: &str = "crr-error-kind";
/// Message attribute holding the id of the original message.
pub const ORIGINAL_ID_ATTRIBUTE: &str = "crr-original-message-id";

/// Somewhere to put a message that is given up on.
#[async_trait]
pub trait DeadLetters: Send + Sync {
    /// Stores `body` with the reason it failed.
    async fn dead_letter(&self, message_id: &str, body: &str, reason: &Error) -> Result<()>;
}

/// A message found in the dead-letter queue.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    pub message_id: String,
    pub body: String,
    pub reason: Option<String>,
    pub kind: Option<String>,
    pub receive_count: u32,
}

/// What a redrive did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedriveReport {
    /// Moved back to the event queue.
    pub moved: usize,
    /// Left in the DLQ (did not match the filter, or over `max`).
    pub kept: usize,
}

/// Moves up to `max` messages accepted by `select` from the DLQ back to the event queue
/// (without the failure attributes, so they are processed afresh).
pub async fn redrive(
    client: &Client,
    dlq_url: &str,
    queue_url: &str,
    max: usize,
    select: impl Fn(&DeadLetter) -> bool,
) -> Result<RedriveReport> {
    let mut report = RedriveReport::default();
    let mut held: HashMap<String, String> = HashMap::new();
    let mut seen: HashSet<String> = HashSet::new();
    while report.moved < max {
        let out = receive(client, dlq_url).await?;
        let messages = out.messages.unwrap_or_default();
        if messages.is_empty() {
            break;
        }
        let mut fresh = false;
        for m in messages {
            let (Some(letter), Some(handle)) = (letter_of(&m), m.receipt_handle()) else {
                continue;
            };
            let id = letter.message_id.clone();
            fresh |= seen.insert(id.clone());
            if report.moved < max && select(&letter) {
                client
                    .send_message()
                    .queue_url(queue_url)
                    .message_body(&letter.body)
                    .send()
                    .await
                    .map_err(|e| sqs_error("SendMessage", queue_url, e))?;
                client
                    .delete_message()
                    .queue_url(dlq_url)
                    .receipt_handle(handle)
                    .send()
                    .await
                    .map_err(|e| sqs_error("DeleteMessage", dlq_url, e))?;
                report.moved += 1;
            } else {
                held.insert(id, handle.to_string());
            }
        }
        if !fresh {
            break;
        }
    }
    // Make what was looked at but not moved visible again at once.
    release(client, dlq_url, held.values()).await?;
    report.kept = held.len();
    Ok(report)
}

/// Up to `max` messages of the DLQ, read without removing them: each is hidden for the
/// short time of the read, then made visible again at once.
pub async fn peek(client: &Client, dlq_url: &str, max: usize) -> Result<Vec<DeadLetter>> {
    let mut letters: Vec<DeadLetter> = vec![];
    let mut handles: Vec<String> = vec![];
    let mut seen: HashSet<String> = HashSet::new();
    while letters.len() < max {
        let out = receive(client, dlq_url).await?;
        let messages = out.messages.unwrap_or_default();
        let mut fresh = false;
        for m in &messages {
            let (Some(letter), Some(handle)) = (letter_of(m), m.receipt_handle()) else {
                continue;
            };
            handles.push(handle.to_string());
            if seen.insert(letter.message_id.clone()) && letters.len() < max {
                fresh = true;
                letters.push(letter);
            }
        }
        if !fresh {
            break;
        }
    }
    release(client, dlq_url, handles.iter()).await?;
    Ok(letters)
}

/// The buckets and keys a dead-lettered message is about (empty when its body is not an
/// event crr understands: those are listed with their reason all the same).
pub fn changes_of(letter: &DeadLetter) -> Vec<(String, String)> {
    crate::event::parse_message_body(&letter.body)
        .map(|events| {
            events
                .into_iter()
                .filter_map(|e| match e {
                    crate::event::Incoming::Change(c) => Some((c.bucket, c.key)),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a dead-lettered message is about `source_bucket` (a rule's events).
pub fn is_for_bucket(letter: &DeadLetter, source_bucket: &str) -> bool {
    changes_of(letter).iter().any(|(b, _)| b == source_bucket)
}

async fn receive(
    client: &Client,
    dlq_url: &str,
) -> Result<aws_sdk_sqs::operation::receive_message::ReceiveMessageOutput> {
    client
        .receive_message()
        .queue_url(dlq_url)
        .max_number_of_messages(10)
        .wait_time_seconds(1)
        .visibility_timeout(60)
        .message_attribute_names("All")
        .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
        .send()
        .await
        .map_err(|e| sqs_error("ReceiveMessage", dlq_url, e))
}

/// A received message as a dead letter (`None` without a message id).
fn letter_of(m: &aws_sdk_sqs::types::Message) -> Option<DeadLetter> {
    let attr = |name: &str| {
        m.message_attributes()
            .and_then(|a| a.get(name))
            .and_then(|v| v.string_value())
            .map(str::to_string)
    };
    Some(DeadLetter {
        message_id: m.message_id()?.to_string(),
        body: m.body().unwrap_or_default().to_string(),
        reason: attr(ERROR_ATTRIBUTE),
        kind: attr(KIND_ATTRIBUTE),
        receive_count: m
            .attributes()
            .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    })
}

/// Makes received messages visible again at once.
async fn release(
    client: &Client,
    dlq_url: &str,
    handles: impl Iterator<Item = &String>,
) -> Result<()> {
    for handle in handles {
        client
            .change_message_visibility()
            .queue_url(dlq_url)
            .receipt_handle(handle)
            .visibility_timeout(0)
            .send()
            .await
            .map_err(|e| sqs_error("ChangeMessageVisibility", dlq_url, e))?;
    }
    Ok(())
}
