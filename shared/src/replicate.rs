//! Real-time replication: one invocation of the replicate function, from payload to
//! response. Maps each event to the decision of `filter::decide` and carries it out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

use crate::copy::{CopyEngine, is_replica};
use crate::error::{Error, Result};
use crate::event::{Incoming, Invocation, ReplicationEvent, parse_invocation};
use crate::filter::{Action, SkipReason, decide};
use crate::object_store::ObjectStore;
use crate::rule::{BucketRef, Rule};
use crate::state::RuleStore;

/// Gives an `ObjectStore` for a rule's bucket (S3 clients in Lambda, memory in tests).
pub trait StoreProvider: Send + Sync {
    fn store(&self, bucket: &BucketRef) -> Arc<dyn ObjectStore>;
}

impl StoreProvider for crate::s3::S3Clients {
    fn store(&self, bucket: &BucketRef) -> Arc<dyn ObjectStore> {
        Arc::new(crate::s3::S3Clients::store(self, bucket))
    }
}

/// What became of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Replicated { bytes: u64 },
    Deleted,
    Skipped(&'static str),
}

/// How long a looked-up rule is trusted before it is read again.
const RULE_CACHE_TTL: Duration = Duration::from_secs(30);
/// Messages of one SQS batch handled at once.
const BATCH_CONCURRENCY: usize = 8;

/// The replicate function's logic, generic over where rules and objects live.
pub struct Replicator {
    rules: Arc<dyn RuleStore>,
    stores: Arc<dyn StoreProvider>,
    engine: CopyEngine,
    cache: Mutex<HashMap<String, (Instant, Option<Rule>)>>,
}

impl Replicator {
    pub fn new(
        rules: Arc<dyn RuleStore>,
        stores: Arc<dyn StoreProvider>,
        engine: CopyEngine,
    ) -> Self {
        Self {
            rules,
            stores,
            engine,
            cache: Mutex::default(),
        }
    }

    /// Handles one invocation. SQS batches answer with the ids of failed messages (partial
    /// batch response); direct invocations fail as a whole if any event fails.
    pub async fn handle(&self, payload: &Value) -> Result<Value> {
        match parse_invocation(payload)? {
            Invocation::Sqs(items) => {
                let failures: Vec<Value> = futures::stream::iter(items)
                    .map(|item| async move {
                        let result = match item.events {
                            Ok(events) => self.apply_all(events).await,
                            Err(e) => Err(e),
                        };
                        match result {
                            Ok(()) => None,
                            Err(e) => {
                                tracing::error!(message_id = %item.message_id, error_kind = e.kind(), error = %e, "message failed");
                                Some(json!({"itemIdentifier": item.message_id}))
                            }
                        }
                    })
                    .buffer_unordered(BATCH_CONCURRENCY)
                    .filter_map(|f| async move { f })
                    .collect()
                    .await;
                Ok(json!({"batchItemFailures": failures}))
            }
            Invocation::Direct(events) => {
                self.apply_all(events).await?;
                Ok(json!({"status": "ok"}))
            }
        }
    }

    /// Applies every event of one message, in order (S3 puts one record per message, but
    /// the format allows more).
    async fn apply_all(&self, events: Vec<Incoming>) -> Result<()> {
        for incoming in events {
            match incoming {
                Incoming::Change(event) => {
                    self.apply(&event).await?;
                }
                Incoming::TestEvent => tracing::info!("S3 test event acknowledged"),
                Incoming::Ignored { event_name } => {
                    tracing::info!(event_name = %event_name, "event type not replicated, acknowledged");
                }
            }
        }
        Ok(())
    }

    /// Applies one event and logs what became of it.
    pub async fn apply(&self, event: &ReplicationEvent) -> Result<Outcome> {
        let started = Instant::now();
        let result = self.apply_inner(event).await;
        match &result {
            Ok(outcome) => tracing::info!(
                bucket = %event.bucket, key = %event.key, event_name = %event.event_name,
                outcome = ?outcome, elapsed_ms = started.elapsed().as_millis() as u64,
                "event applied"
            ),
            Err(e) => tracing::warn!(
                bucket = %event.bucket, key = %event.key, event_name = %event.event_name,
                error_kind = e.kind(), retryable = e.is_retryable(), error = %e,
                "event failed"
            ),
        }
        result
    }

    async fn apply_inner(&self, event: &ReplicationEvent) -> Result<Outcome> {
        let Some(rule) = self.rule_for(&event.bucket).await? else {
            return Ok(Outcome::Skipped("no_rule"));
        };
        match decide(&rule, event) {
            Action::Skip(SkipReason::SuppressedDelete) => {
                tracing::info!(rule_id = %rule.id, key = %event.key, sequencer = ?event.sequencer, "suppressed delete (policy write)");
                Ok(Outcome::Skipped(SkipReason::SuppressedDelete.as_str()))
            }
            Action::Skip(reason) => Ok(Outcome::Skipped(reason.as_str())),
            Action::Copy => self.copy(&rule, event).await,
            Action::Delete => self.delete(&rule, event).await,
        }
    }

    /// Copies the source's *current* object: whatever event announced it, the newest
    /// content is what reaches the target, so a late or repeated event cannot bring back
    /// an older version.
    async fn copy(&self, rule: &Rule, event: &ReplicationEvent) -> Result<Outcome> {
        let source = self.stores.store(&rule.source);
        let Some(info) = source.head(&event.key).await? else {
            // Deleted since: its delete event does the rest.
            return Ok(Outcome::Skipped("source_gone"));
        };
        if is_replica(&info) {
            return Ok(Outcome::Skipped("replica_loop"));
        }
        let target = self.stores.store(&rule.target);
        let done = self
            .engine
            .copy(
                source.as_ref(),
                target.as_ref(),
                &info,
                rule.resolved_copy_mode(),
            )
            .await?;
        Ok(Outcome::Replicated { bytes: done.bytes })
    }

    /// Removes the target object unless the source has it again (re-created after the
    /// delete: the newer create wins).
    async fn delete(&self, rule: &Rule, event: &ReplicationEvent) -> Result<Outcome> {
        let source = self.stores.store(&rule.source);
        if source.head(&event.key).await?.is_some() {
            return Ok(Outcome::Skipped("recreated"));
        }
        self.stores.store(&rule.target).delete(&event.key).await?;
        Ok(Outcome::Deleted)
    }

    async fn rule_for(&self, bucket: &str) -> Result<Option<Rule>> {
        if let Some((at, rule)) = self.lock_cache().get(bucket)
            && at.elapsed() < RULE_CACHE_TTL
        {
            return Ok(rule.clone());
        }
        let rule = self.rules.rule_for_source(bucket).await?;
        self.lock_cache()
            .insert(bucket.to_string(), (Instant::now(), rule.clone()));
        Ok(rule)
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Option<Rule>)>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Turns a handler error into the Lambda error shape: `errorType` says whether a retry
/// can help.
pub fn diagnostic(err: &Error) -> lambda_runtime::Diagnostic {
    lambda_runtime::Diagnostic {
        error_type: if err.is_retryable() {
            format!("Retryable.{}", err.kind())
        } else {
            format!("NonRetryable.{}", err.kind())
        },
        error_message: err.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{MemoryObjectStore, MemoryRuleStore, MemoryWorld};
    use crate::object_store::WriteAttrs;
    use crate::rule::Policy;
    use crate::rule::tests::rule;
    use bytes::Bytes;

    struct World(MemoryWorld);
    impl StoreProvider for World {
        fn store(&self, bucket: &BucketRef) -> Arc<dyn ObjectStore> {
            Arc::new(self.0.store(&bucket.bucket))
        }
    }

    fn notification(name: &str, key: &str) -> String {
        json!({"Records": [{"eventVersion": "2.1", "eventSource": "aws:s3", "eventName": name,
            "s3": {"bucket": {"name": "src-bucket"}, "object": {"key": key}}}]})
        .to_string()
    }

    fn sqs(bodies: &[(&str, String)]) -> Value {
        json!({"Records": bodies.iter().map(|(id, body)| json!({
            "messageId": id, "body": body, "eventSource": "aws:sqs"})).collect::<Vec<_>>()})
    }

    async fn setup(
        policy: Policy,
        prefixes: &[&str],
    ) -> (Replicator, MemoryObjectStore, MemoryObjectStore) {
        let world = MemoryWorld::default();
        let (src, dst) = (world.store("src-bucket"), world.store("dst-bucket"));
        let rules = MemoryRuleStore::default();
        let mut r = rule("r1", "src-bucket", "dst-bucket");
        r.policy = policy;
        r.prefixes = prefixes.iter().map(|p| p.to_string()).collect();
        r.copy_mode = crate::rule::CopyMode::Stream;
        rules.create_rule(&r).await.unwrap();
        let rep = Replicator::new(
            Arc::new(rules),
            Arc::new(World(world)),
            CopyEngine::default(),
        );
        (rep, src, dst)
    }

    #[tokio::test]
    async fn given_a_write_rule_puts_replicate_and_deletes_are_suppressed() {
        let (rep, src, dst) = setup(Policy::Write, &["docs/"]).await;
        src.put(
            "docs/a b+c.txt",
            Bytes::from_static(b"hello"),
            &WriteAttrs::default(),
        )
        .await
        .unwrap();
        src.put("other/x", Bytes::from_static(b"x"), &WriteAttrs::default())
            .await
            .unwrap();
        let resp = rep
            .handle(&sqs(&[
                (
                    "m1",
                    notification("ObjectCreated:Put", "docs%2Fa+b%2Bc.txt"),
                ),
                ("m2", notification("ObjectCreated:Put", "other%2Fx")),
            ]))
            .await
            .unwrap();
        assert_eq!(resp, json!({"batchItemFailures": []}));
        assert_eq!(dst.keys(), vec!["docs/a b+c.txt".to_string()]);

        src.delete("docs/a b+c.txt").await.unwrap();
        rep.handle(&sqs(&[(
            "m3",
            notification("ObjectRemoved:Delete", "docs%2Fa+b%2Bc.txt"),
        )]))
        .await
        .unwrap();
        assert_eq!(
            dst.bytes("docs/a b+c.txt").unwrap(),
            Bytes::from_static(b"hello")
        );
    }

    #[tokio::test]
    async fn given_a_full_rule_deletes_reach_the_target_unless_recreated() {
        let (rep, src, dst) = setup(Policy::Full, &[]).await;
        src.put("k", Bytes::from_static(b"v1"), &WriteAttrs::default())
            .await
            .unwrap();
        rep.handle(&sqs(&[("m1", notification("ObjectCreated:Put", "k"))]))
            .await
            .unwrap();
        assert!(dst.bytes("k").is_some());
        // Delete event arrives after the key was created again: the replica stays.
        rep.handle(&sqs(&[("m2", notification("ObjectRemoved:Delete", "k"))]))
            .await
            .unwrap();
        assert!(dst.bytes("k").is_some());
        src.delete("k").await.unwrap();
        rep.handle(&sqs(&[("m3", notification("ObjectRemoved:Delete", "k"))]))
            .await
            .unwrap();
        assert!(dst.bytes("k").is_none());
    }

    #[tokio::test]
    async fn a_poison_message_fails_alone() {
        let (rep, src, dst) = setup(Policy::Full, &[]).await;
        src.put("good", Bytes::from_static(b"g"), &WriteAttrs::default())
            .await
            .unwrap();
        let resp = rep
            .handle(&sqs(&[
                ("m1", "{truncated".to_string()),
                ("m2", notification("ObjectCreated:Put", "good")),
                (
                    "m3",
                    json!({"Service": "Amazon S3", "Event": "s3:TestEvent"}).to_string(),
                ),
            ]))
            .await
            .unwrap();
        assert_eq!(
            resp,
            json!({"batchItemFailures": [{"itemIdentifier": "m1"}]})
        );
        assert!(dst.bytes("good").is_some());
    }

    #[tokio::test]
    async fn late_events_copy_the_current_content_and_replicas_are_not_replicated() {
        let (rep, src, dst) = setup(Policy::Full, &[]).await;
        src.put("k", Bytes::from_static(b"new"), &WriteAttrs::default())
            .await
            .unwrap();
        // Two events for one key, the older one last: the target ends with the newest.
        rep.handle(&sqs(&[("m1", notification("ObjectCreated:Put", "k"))]))
            .await
            .unwrap();
        rep.handle(&sqs(&[("m2", notification("ObjectCreated:Put", "k"))]))
            .await
            .unwrap();
        assert_eq!(dst.bytes("k").unwrap(), Bytes::from_static(b"new"));
        // An object that is itself a replica is not copied again.
        let replica = dst.head("k").await.unwrap().unwrap();
        let attrs = crate::copy::replica_attrs("elsewhere", &replica);
        src.put("r", Bytes::from_static(b"x"), &attrs)
            .await
            .unwrap();
        let ev = crate::event::parse_message_body(&notification("ObjectCreated:Put", "r")).unwrap();
        let Incoming::Change(ev) = &ev[0] else {
            panic!()
        };
        assert_eq!(
            rep.apply(ev).await.unwrap(),
            Outcome::Skipped("replica_loop")
        );
    }
}
