//! Real-time replication: one invocation of the replicate function, from payload to
//! response. Each event goes through `filter::decide`, the per-key ledger (order and
//! duplicates), the copy engine, and the counters.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_lambda_events::sqs::{BatchItemFailure, SqsBatchResponse};
use chrono::Utc;
use futures::StreamExt;
use serde_json::{Value, json};

use crate::allowed::AllowedBuckets;
use crate::copy::{CopyEngine, source_state};
use crate::dead_letter::DeadLetters;
use crate::error::{Error, Result};
use crate::event::{EventKind, Incoming, Invocation, ReplicationEvent, SqsItem, parse_invocation};
use crate::filter::{Skip, SourceState, Step, converge, outside_rule};
use crate::ledger::{Freshness, freshness, newest_applied, normalize_sequencer};
use crate::metrics;
use crate::object_store::ObjectStore;
use crate::resumable::{Continuations, CopyRun, UploadStore, Writer};
use crate::retry::RetryPolicy;
use crate::rule::{BucketRef, Rule};
use crate::series::{self, Activity};
use crate::state::{NO_RULE_COUNTERS, StateStore, SuppressedDelete};

/// Gives an `ObjectStore` for a rule's bucket (S3 clients in Lambda, memory in tests).
pub trait StoreProvider: Send + Sync {
    fn store(&self, bucket: &BucketRef) -> Arc<dyn ObjectStore>;
}

impl StoreProvider for crate::adapters::s3::S3Clients {
    fn store(&self, bucket: &BucketRef) -> Arc<dyn ObjectStore> {
        Arc::new(crate::adapters::s3::S3Clients::store(self, bucket))
    }
}

/// What became of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The source's current object was copied to the target.
    Replicated { bytes: u64 },
    /// The target object was removed (policy `full`, source absent).
    Deleted,
    /// A delete kept from the target by policy `write`, recorded for the first time.
    Suppressed,
    /// Nothing changed, for this reason.
    Skipped(Skip),
}

impl Outcome {
    fn name(&self) -> &'static str {
        match self {
            Outcome::Replicated { .. } => "replicated",
            Outcome::Deleted => "deleted",
            Outcome::Suppressed => "suppressed_delete",
            Outcome::Skipped(skip) => skip.as_str(),
        }
    }
}

/// How long a looked-up rule is trusted before it is read again.
const RULE_CACHE_TTL: Duration = Duration::from_secs(30);
/// Messages of one SQS batch handled at once.
const BATCH_CONCURRENCY: usize = 8;
/// The ledger's ETag for an applied removal.
const REMOVED: &str = "(removed)";
/// Commits tried for one event before it is failed (each lost race re-applies).
const MAX_COMMITS: u32 = 5;
/// Reads of the source for one application: a copy that finds something gone mid-way
/// reads the source again and converges on what it holds then.
const MAX_SOURCE_READS: u32 = 3;

/// Settings of the replicate function.
#[derive(Clone, Debug)]
pub struct ReplicatorSettings {
    pub engine: CopyEngine,
    pub retry: RetryPolicy,
    /// Receives after which a still-failing message is sent to the DLQ with its reason;
    /// keep it below the queue's maxReceiveCount.
    pub max_receives: u32,
    /// Buckets this deployment may touch.
    pub allowed: AllowedBuckets,
}

impl Default for ReplicatorSettings {
    fn default() -> Self {
        Self {
            engine: CopyEngine::default(),
            retry: RetryPolicy::default(),
            max_receives: 4,
            allowed: AllowedBuckets::default(),
        }
    }
}

/// The replicate function's logic, generic over where state and objects live.
pub struct Replicator {
    state: Arc<dyn StateStore>,
    stores: Arc<dyn StoreProvider>,
    dead_letters: Option<Arc<dyn DeadLetters>>,
    settings: ReplicatorSettings,
    cache: Mutex<HashMap<String, (Instant, Option<Rule>)>>,
    /// Where large copies checkpoint their parts, to continue in the next invocation.
    uploads: Option<Arc<dyn UploadStore>>,
    /// Where a message whose copy continues is sent again as a fresh message.
    continuations: Option<Arc<dyn Continuations>>,
}

/// Counters and latencies of one invocation, per rule.
#[derive(Default)]
struct Tally(Mutex<HashMap<String, Activity>>);

impl Tally {
    fn add(&self, rule_id: &str, f: impl FnOnce(&mut Activity)) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(map.entry(rule_id.to_string()).or_default());
    }

    fn take(&self) -> HashMap<String, Activity> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// An event that failed, with the rule it belongs to (if known) for counting.
struct Failure {
    rule_id: Option<String>,
    error: Error,
}

impl Replicator {
    pub fn new(
        state: Arc<dyn StateStore>,
        stores: Arc<dyn StoreProvider>,
        dead_letters: Option<Arc<dyn DeadLetters>>,
        settings: ReplicatorSettings,
    ) -> Self {
        Self {
            state,
            stores,
            dead_letters,
            settings,
            cache: Mutex::default(),
            uploads: None,
            continuations: None,
        }
    }

    /// Multipart copies checkpoint their parts in `uploads`: one that reaches the
    /// invocation's deadline stops, saves its state and continues when its message comes
    /// again (`resumable.rs`). Without it, such a copy is aborted at the deadline.
    pub fn with_uploads(mut self, uploads: Arc<dyn UploadStore>) -> Self {
        self.uploads = Some(uploads);
        self
    }

    /// A message whose copy continues is sent to `queue` again as a new message (its
    /// receive count starts over: progress is no failed try) and acknowledged; without
    /// it, the message is reported failed and comes back after its visibility timeout.
    pub fn with_continuations(mut self, queue: Arc<dyn Continuations>) -> Self {
        self.continuations = Some(queue);
        self
    }

    /// Handles one invocation. SQS batches answer with the ids of failed messages (partial
    /// batch response); a message given up on goes to the DLQ with its reason instead.
    /// Direct invocations fail as a whole if any event fails.
    pub async fn handle(&self, payload: &Value, deadline: Option<Instant>) -> Result<Value> {
        let tally = Tally::default();
        let result = match parse_invocation(payload)? {
            Invocation::Sqs(items) => {
                let failures: Vec<BatchItemFailure> = futures::stream::iter(items)
                    .map(|item| self.handle_message(item, deadline, &tally))
                    .buffer_unordered(BATCH_CONCURRENCY)
                    .filter_map(|failed| async move {
                        failed.map(|id| {
                            let mut f = BatchItemFailure::default();
                            f.item_identifier = id;
                            f
                        })
                    })
                    .collect()
                    .await;
                let mut response = SqsBatchResponse::default();
                response.batch_item_failures = failures;
                serde_json::to_value(response)
                    .map_err(|e| Error::Config(format!("batch response: {e}")))
            }
            Invocation::Direct(events) => match self.apply_all(events, deadline, &tally).await {
                Ok(()) => Ok(json!({"status": "ok"})),
                Err(f) => Err(f.error),
            },
        };
        self.flush(tally).await;
        result
    }

    /// Handles one SQS message; `Some(id)` if SQS should deliver it again.
    async fn handle_message(
        &self,
        item: SqsItem,
        deadline: Option<Instant>,
        tally: &Tally,
    ) -> Option<String> {
        let failure = match item.events {
            Ok(events) => match self.apply_all(events, deadline, tally).await {
                Ok(()) => return None,
                Err(f) => f,
            },
            Err(error) => {
                // Malformed: counted against the rule of the bucket it names, if it names one.
                let rule_id = match crate::event::bucket_hint(&item.body) {
                    Some(bucket) => self.rule_for(&bucket).await.ok().flatten().map(|r| r.id),
                    None => None,
                };
                Failure { rule_id, error }
            }
        };
        if failure.error.continues_later()
            && let Some(queue) = &self.continuations
        {
            // Progress, not a failed try: a fresh message (receive count 1, visible at
            // once) carries the copy on, and this one is acknowledged.
            match queue.continue_later(&item.body).await {
                Ok(()) => {
                    tracing::info!(message_id = %item.message_id, error = %failure.error, "copy continues: message sent again");
                    return None;
                }
                Err(e) => {
                    tracing::warn!(message_id = %item.message_id, error = %e, "could not send the continuing message; SQS delivers it again")
                }
            }
        }
        // A copy that made progress is never given up on for its receive count (only the
        // queue's own maxReceiveCount bounds it, see docs/deploy.md).
        let give_up = !failure.error.is_retryable()
            || (item.receive_count >= self.settings.max_receives
                && !failure.error.continues_later());
        tracing::error!(
            message_id = %item.message_id, receive_count = item.receive_count,
            error_kind = failure.error.kind(), give_up, error = %failure.error,
            "message failed"
        );
        if let (true, Some(dlq)) = (give_up, &self.dead_letters) {
            match dlq
                .dead_letter(&item.message_id, &item.body, &failure.error)
                .await
            {
                Ok(()) => {
                    let rule_id = failure.rule_id.as_deref().unwrap_or(NO_RULE_COUNTERS);
                    tally.add(rule_id, |a| a.counters.failed += 1);
                    return None;
                }
                Err(e) => {
                    tracing::error!(message_id = %item.message_id, error = %e, "could not dead-letter the message")
                }
            }
        }
        Some(item.message_id)
    }

    /// Applies every event of one message, in order (S3 puts one record per message, but
    /// the format allows more).
    async fn apply_all(
        &self,
        events: Vec<Incoming>,
        deadline: Option<Instant>,
        tally: &Tally,
    ) -> Result<(), Failure> {
        for incoming in events {
            match incoming {
                Incoming::Change(event) => {
                    self.apply_counted(&event, deadline, tally).await?;
                }
                Incoming::TestEvent => tracing::info!("S3 test event acknowledged"),
                Incoming::Ignored { event_name } => {
                    tracing::info!(event_name = %event_name, "event type not replicated, acknowledged");
                }
            }
        }
        Ok(())
    }

    async fn apply_counted(
        &self,
        event: &ReplicationEvent,
        deadline: Option<Instant>,
        tally: &Tally,
    ) -> Result<Outcome, Failure> {
        let started = Instant::now();
        let rule = self
            .rule_for(&event.bucket)
            .await
            .map_err(|error| Failure {
                rule_id: None,
                error,
            })?;
        let Some(rule) = rule else {
            tracing::info!(bucket = %event.bucket, key = %event.key, "no rule for this bucket, acknowledged");
            return Ok(Outcome::Skipped(Skip::NoRule));
        };
        self.settings
            .allowed
            .check(&rule)
            .map_err(|error| Failure {
                rule_id: Some(rule.id.clone()),
                error,
            })?;
        let result = self
            .settings
            .retry
            .run(deadline, "apply event", || {
                self.apply_until(&rule, event, deadline)
            })
            .await;
        let latency = started.elapsed().as_millis() as u64;
        match &result {
            Ok(outcome) => {
                tracing::info!(
                    rule_id = %rule.id, bucket = %event.bucket, key = %event.key, event_name = %event.event_name,
                    sequencer = ?event.sequencer, outcome = outcome.name(), elapsed_ms = latency, "event applied"
                );
                let bytes = match outcome {
                    Outcome::Replicated { bytes } => *bytes,
                    _ => 0,
                };
                // Event time to replica written, for events that changed the target.
                let replication_latency = match outcome {
                    Outcome::Replicated { .. } | Outcome::Deleted => event
                        .event_time
                        .map(|t| u64::try_from((Utc::now() - t).num_milliseconds()).unwrap_or(0)),
                    _ => None,
                };
                metrics::emit_event(&rule.id, outcome.name(), latency, bytes, false);
                if let Some(ms) = replication_latency {
                    metrics::emit_replication_latency(&rule.id, ms);
                }
                tally.add(&rule.id, |a| {
                    if let Some(ms) = replication_latency {
                        a.latency.record(ms);
                    }
                    let c = &mut a.counters;
                    match outcome {
                        Outcome::Replicated { bytes } => {
                            c.replicated_objects += 1;
                            c.replicated_bytes += bytes;
                        }
                        Outcome::Deleted => c.deletes += 1,
                        Outcome::Suppressed => c.suppressed_deletes += 1,
                        Outcome::Skipped(skip) if skip.is_stale() => c.skipped_stale += 1,
                        Outcome::Skipped(_) => c.skipped_other += 1,
                    }
                    c.newest_event_at = c.newest_event_at.max(event.event_time);
                });
            }
            Err(e) if e.continues_later() => {
                tracing::info!(
                    rule_id = %rule.id, bucket = %event.bucket, key = %event.key, event_name = %event.event_name,
                    elapsed_ms = latency, progress = %e, "copy continues in the next invocation"
                );
                metrics::emit_event(&rule.id, "copy_continues", latency, 0, false);
            }
            Err(e) => {
                tracing::warn!(
                    rule_id = %rule.id, bucket = %event.bucket, key = %event.key, event_name = %event.event_name,
                    error_kind = e.kind(), retryable = e.is_retryable(), error = %e, "event failed"
                );
                metrics::emit_event(&rule.id, "failed", latency, 0, true);
            }
        }
        result.map_err(|error| Failure {
            rule_id: Some(rule.id.clone()),
            error,
        })
    }

    /// Applies one event under its rule, once (retries are the caller's).
    ///
    /// The event only names a key: what is done is what the source holds for that key now
    /// (`filter::converge`). The sequencer lets a provably stale or duplicate event skip the
    /// work; the ledger's version is the optimistic lock that makes a lost race re-apply,
    /// with or without a sequencer.
    pub async fn apply_with_rule(&self, rule: &Rule, event: &ReplicationEvent) -> Result<Outcome> {
        self.apply_until(rule, event, None).await
    }

    /// `apply_with_rule` within an invocation ending at `deadline`: a large copy that
    /// cannot finish by then stops with its progress saved (`Error::CopyContinues`).
    pub async fn apply_until(
        &self,
        rule: &Rule,
        event: &ReplicationEvent,
        deadline: Option<Instant>,
    ) -> Result<Outcome> {
        if rule.paused {
            return Err(Error::RulePaused(rule.id.clone()));
        }
        if let Some(skip) = outside_rule(rule, event) {
            return Ok(Outcome::Skipped(skip));
        }
        let sequencer = event.sequencer.as_deref().and_then(normalize_sequencer);
        // What the event is about: the ETag it announced, or a removal. (S3's own delete
        // events carry no ETag; moto's carry the deleted object's.)
        let etag = match event.kind {
            EventKind::Created => event.etag.clone().unwrap_or_default(),
            EventKind::Removed { .. } => REMOVED.to_string(),
        };
        let mut entry = self.state.read_ledger(&rule.id, &event.key).await?;
        if let Some(seq) = &sequencer {
            match freshness(entry.as_ref(), seq, &etag) {
                Freshness::Stale => return Ok(Outcome::Skipped(Skip::Stale)),
                Freshness::Duplicate => return Ok(Outcome::Skipped(Skip::Duplicate)),
                Freshness::New => {}
            }
        }
        for _ in 0..MAX_COMMITS {
            let outcome = self.converge_key(rule, event, deadline).await?;
            let (newest, newest_etag) = newest_applied(entry.as_ref(), sequencer.as_deref(), &etag);
            let expected = entry.as_ref().map(|e| e.version);
            if self
                .state
                .commit_ledger(&rule.id, &event.key, expected, &newest, &newest_etag)
                .await?
            {
                return Ok(outcome);
            }
            // Another event for this key committed while we wrote: our write and its
            // write may have landed in either order, so apply the current state again.
            tracing::info!(rule_id = %rule.id, key = %event.key, "concurrent event for the same key; re-applying");
            entry = self.state.read_ledger(&rule.id, &event.key).await?;
        }
        Err(Error::Transient {
            operation: "UpdateItem",
            resource: format!("ledger of s3://{}/{}", rule.source.bucket, event.key),
            detail: format!("{MAX_COMMITS} concurrent updates in a row"),
            throttled: false,
            source: "ledger contention".into(),
        })
    }

    /// Makes the target match what the source holds for the event's key *now*, whatever
    /// the event announced (see `filter::converge`), so a late or re-applied event can
    /// never leave an older state behind.
    async fn converge_key(
        &self,
        rule: &Rule,
        event: &ReplicationEvent,
        deadline: Option<Instant>,
    ) -> Result<Outcome> {
        let key = event.key.as_str();
        let run = CopyRun::new(
            self.uploads.as_deref(),
            &rule.id,
            Writer::Realtime,
            deadline,
        );
        let source = self.stores.store(&rule.source);
        let engine = &self.settings.engine;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let current = engine.read_source(rule, source.as_ref(), key).await?;
            let state = match &current {
                None => SourceState::Absent,
                Some((info, _)) => source_state(info, &rule.source.bucket),
            };
            match converge(rule.policy, event.kind, state) {
                Step::Copy => {
                    let Some((info, body)) = current else {
                        return Err(Error::Config("copy step without a source object".into()));
                    };
                    let target = self.stores.store(&rule.target);
                    match engine
                        .copy_for_rule(
                            rule,
                            source.as_ref(),
                            target.as_ref(),
                            &info,
                            body,
                            None,
                            run,
                        )
                        .await
                    {
                        Ok(done) => return Ok(Outcome::Replicated { bytes: done.bytes }),
                        // Something vanished mid-copy (the source deleted, its tags or bytes
                        // gone): read the source again and converge on what it holds then.
                        Err(Error::NotFound { .. }) if attempt < MAX_SOURCE_READS => continue,
                        Err(e) => return Err(e),
                    }
                }
                Step::DeleteTarget => {
                    self.stores.store(&rule.target).delete(key).await?;
                    return Ok(Outcome::Deleted);
                }
                Step::RecordSuppressed => {
                    let delete = SuppressedDelete {
                        key: key.to_string(),
                        event_time: event.event_time,
                        sequencer: event.sequencer.clone(),
                        delete_marker: matches!(
                            event.kind,
                            EventKind::Removed {
                                delete_marker: true
                            }
                        ),
                        recorded_at: Utc::now(),
                    };
                    let first = self.state.record_suppressed(&rule.id, &delete).await?;
                    return Ok(if first {
                        Outcome::Suppressed
                    } else {
                        Outcome::Skipped(Skip::SuppressedBefore)
                    });
                }
                Step::Leave(skip) => return Ok(Outcome::Skipped(skip)),
            }
        }
    }

    /// Writes the invocation's counters and latencies: one update per rule (of the
    /// minute it is written in, `series.rs`), retried; a failure is logged, not returned,
    /// since the objects themselves were replicated.
    async fn flush(&self, tally: Tally) {
        for (rule_id, activity) in tally.take() {
            if activity.is_empty() {
                continue;
            }
            if activity.counters.failed > 0 {
                metrics::emit_failed(&rule_id, activity.counters.failed);
            }
            let written = self
                .settings
                .retry
                .run(None, "add counters", || {
                    // The minute is taken at each try: writers write the minute they are in.
                    self.state
                        .add_activity(&rule_id, series::minute_of(Utc::now()), &activity)
                })
                .await;
            if let Err(e) = written {
                tracing::error!(rule_id = %rule_id, error = %e, activity = ?activity, "counters lost");
            }
        }
    }

    async fn rule_for(&self, bucket: &str) -> Result<Option<Rule>> {
        if let Some((at, rule)) = self.lock_cache().get(bucket)
            && at.elapsed() < RULE_CACHE_TTL
        {
            return Ok(rule.clone());
        }
        let rule = self.state.rule_for_source(bucket).await?;
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
    use crate::memory::{MemoryObjectStore, MemoryState, MemoryWorld};
    use crate::object_store::WriteAttrs;
    use crate::rule::Policy;
    use crate::rule::tests::rule;
    use crate::state::{RuleStore, StatsStore};
    use bytes::Bytes;

    #[derive(Default)]
    struct Dlq(Mutex<Vec<(String, String)>>);
    #[async_trait::async_trait]
    impl DeadLetters for Dlq {
        async fn dead_letter(&self, message_id: &str, _body: &str, reason: &Error) -> Result<()> {
            self.0
                .lock()
                .unwrap()
                .push((message_id.to_string(), reason.to_string()));
            Ok(())
        }
    }

    fn record(name: &str, key: &str, seq: Option<&str>, etag: &str) -> Value {
        let mut object = json!({"key": key, "eTag": etag});
        if let Some(s) = seq {
            object["sequencer"] = json!(s);
        }
        json!({"eventVersion": "2.1", "eventSource": "aws:s3", "eventName": name,
            "eventTime": "2026-11-22T01:00:00.000Z",
            "s3": {"bucket": {"name": "src-bucket"}, "object": object}})
    }

    fn notification(name: &str, key: &str) -> String {
        json!({"Records": [record(name, key, None, "")]}).to_string()
    }

    fn sqs(bodies: &[(&str, String)]) -> Value {
        json!({"Records": bodies.iter().map(|(id, body)| json!({
            "messageId": id, "body": body, "eventSource": "aws:sqs",
            "attributes": {"ApproximateReceiveCount": "1"}})).collect::<Vec<_>>()})
    }

    /// Hands one notification to the replicator as a one-message SQS batch.
    async fn deliver(rep: &Replicator, message_id: &str, event_name: &str, key: &str) -> Value {
        rep.handle(&sqs(&[(message_id, notification(event_name, key))]), None)
            .await
            .unwrap()
    }

    struct Setup {
        rep: Replicator,
        src: MemoryObjectStore,
        dst: MemoryObjectStore,
        state: MemoryState,
        dlq: Arc<Dlq>,
    }

    async fn setup(policy: Policy, prefixes: &[&str]) -> Setup {
        let world = MemoryWorld::default();
        let (src, dst) = (world.store("src-bucket"), world.store("dst-bucket"));
        let state = MemoryState::default();
        let mut r = rule("r1", "src-bucket", "dst-bucket");
        r.policy = policy;
        r.prefixes = prefixes.iter().map(|p| p.to_string()).collect();
        r.copy_mode = crate::rule::CopyMode::Stream;
        state.create_rule(&r).await.unwrap();
        let dlq = Arc::new(Dlq::default());
        let rep = Replicator::new(
            Arc::new(state.clone()),
            Arc::new(world),
            Some(dlq.clone()),
            ReplicatorSettings::default(),
        );
        Setup {
            rep,
            src,
            dst,
            state,
            dlq,
        }
    }

    async fn put(store: &MemoryObjectStore, key: &str, body: &'static [u8]) -> String {
        store
            .put(key, Bytes::from_static(body), &WriteAttrs::default())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn given_a_write_rule_puts_replicate_and_deletes_are_suppressed_and_recorded() {
        let s = setup(Policy::Write, &["docs/"]).await;
        put(&s.src, "docs/a b+c.txt", b"hello").await;
        put(&s.src, "other/x", b"x").await;
        let resp = s
            .rep
            .handle(
                &sqs(&[
                    (
                        "m1",
                        notification("ObjectCreated:Put", "docs%2Fa+b%2Bc.txt"),
                    ),
                    ("m2", notification("ObjectCreated:Put", "other%2Fx")),
                ]),
                None,
            )
            .await
            .unwrap();
        assert_eq!(resp, json!({"batchItemFailures": []}));
        assert_eq!(s.dst.keys(), vec!["docs/a b+c.txt".to_string()]);

        s.src.delete("docs/a b+c.txt").await.unwrap();
        deliver(&s.rep, "m3", "ObjectRemoved:Delete", "docs%2Fa+b%2Bc.txt").await;
        assert_eq!(
            s.dst.bytes("docs/a b+c.txt").unwrap(),
            Bytes::from_static(b"hello")
        );
        let suppressed = s.state.suppressed("r1").await.unwrap();
        assert_eq!(suppressed.len(), 1);
        assert_eq!(suppressed[0].key, "docs/a b+c.txt");
        let c = s.state.counters("r1").await.unwrap();
        assert_eq!(
            (
                c.replicated_objects,
                c.replicated_bytes,
                c.suppressed_deletes,
                c.skipped_other
            ),
            (1, 5, 1, 1)
        );
    }

    #[tokio::test]
    async fn given_a_full_rule_deletes_reach_the_target_unless_recreated() {
        let s = setup(Policy::Full, &[]).await;
        put(&s.src, "k", b"v1").await;
        deliver(&s.rep, "m1", "ObjectCreated:Put", "k").await;
        assert!(s.dst.bytes("k").is_some());
        // Delete event arrives after the key was created again: the replica stays.
        deliver(&s.rep, "m2", "ObjectRemoved:Delete", "k").await;
        assert!(s.dst.bytes("k").is_some());
        s.src.delete("k").await.unwrap();
        deliver(&s.rep, "m3", "ObjectRemoved:Delete", "k").await;
        assert!(s.dst.bytes("k").is_none());
        assert_eq!(s.state.counters("r1").await.unwrap().deletes, 1);
        // Every event that wrote the target has a replication latency (event time, days
        // ago, to now): the copy, the delete that converged to a copy of the recreated
        // key, and the delete.
        let read = s
            .state
            .read_stats("r1", Utc::now() - chrono::Duration::hours(1))
            .await
            .unwrap();
        let latencies: u64 = read
            .minutes
            .iter()
            .map(|m| m.activity.latency.count())
            .sum();
        assert_eq!(latencies, 3);
        let max = read
            .minutes
            .iter()
            .filter_map(|m| m.activity.latency.max_ms)
            .max();
        assert!(max >= Some(86_400_000), "{max:?}");
    }

    #[tokio::test]
    async fn a_poison_message_fails_alone_and_goes_to_the_dlq_with_its_reason() {
        let s = setup(Policy::Full, &[]).await;
        put(&s.src, "good", b"g").await;
        let resp = s
            .rep
            .handle(
                &sqs(&[
                    ("m1", "{truncated".to_string()),
                    ("m2", notification("ObjectCreated:Put", "good")),
                    (
                        "m3",
                        json!({"Service": "Amazon S3", "Event": "s3:TestEvent"}).to_string(),
                    ),
                ]),
                None,
            )
            .await
            .unwrap();
        // Permanent: dead-lettered with the parse error, so not handed back to SQS.
        assert_eq!(resp, json!({"batchItemFailures": []}));
        let dead = s.dlq.0.lock().unwrap().clone();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].0, "m1");
        assert!(
            dead[0].1.starts_with("malformed event: body is not JSON"),
            "{}",
            dead[0].1
        );
        assert!(s.dst.bytes("good").is_some());
        // It names no bucket: counted deployment-wide, not against a rule.
        assert_eq!(s.state.counters(NO_RULE_COUNTERS).await.unwrap().failed, 1);
        assert_eq!(s.state.counters("r1").await.unwrap().failed, 0);
        // A bad key in an event for the rule's bucket counts against that rule.
        let resp = s
            .rep
            .handle(
                &sqs(&[("m4", notification("ObjectCreated:Put", "%FF"))]),
                None,
            )
            .await
            .unwrap();
        assert_eq!(resp, json!({"batchItemFailures": []}));
        assert_eq!(s.state.counters("r1").await.unwrap().failed, 1);
    }

    #[tokio::test]
    async fn reversed_and_duplicated_events_end_with_the_newest_content() {
        let s = setup(Policy::Full, &[]).await;
        let e1 = put(&s.src, "k", b"old").await;
        let e2 = put(&s.src, "k", b"new").await;
        let older = record("ObjectCreated:Put", "k", Some("0055AED6DCD90281E5"), &e1);
        let newer = record("ObjectCreated:Put", "k", Some("0055AED6DCD90281F0"), &e2);
        // Newer first, then the older one, then the newer one again.
        for (id, r) in [("m1", &newer), ("m2", &older), ("m3", &newer)] {
            let body = json!({"Records": [r]}).to_string();
            s.rep.handle(&sqs(&[(id, body)]), None).await.unwrap();
        }
        assert_eq!(s.dst.bytes("k").unwrap(), Bytes::from_static(b"new"));
        let c = s.state.counters("r1").await.unwrap();
        assert_eq!((c.replicated_objects, c.skipped_stale), (1, 2));
    }

    #[tokio::test]
    async fn a_delete_older_than_the_applied_create_is_stale() {
        let s = setup(Policy::Full, &[]).await;
        let etag = put(&s.src, "k", b"v2").await;
        let create = record("ObjectCreated:Put", "k", Some("20"), &etag);
        let delete = record("ObjectRemoved:Delete", "k", Some("10"), "");
        s.rep
            .handle(&json!({"Records": [create]}), None)
            .await
            .unwrap();
        s.src.delete("k").await.unwrap();
        // The delete's sequencer is older: it must not remove the newer replica.
        let out = s
            .rep
            .handle(&json!({"Records": [delete]}), None)
            .await
            .unwrap();
        assert_eq!(out, json!({"status": "ok"}));
        assert!(s.dst.bytes("k").is_some());
    }

    #[tokio::test]
    async fn paused_rules_keep_their_events_waiting() {
        let s = setup(Policy::Full, &[]).await;
        put(&s.src, "k", b"v").await;
        let mut r = s.state.get_rule("r1").await.unwrap().unwrap();
        r.paused = true;
        let err = s
            .rep
            .apply_with_rule(
                &r,
                &crate::event::ReplicationEvent {
                    bucket: "src-bucket".into(),
                    key: "k".into(),
                    kind: crate::event::EventKind::Created,
                    sequencer: None,
                    version_id: None,
                    etag: None,
                    size: None,
                    event_time: None,
                    event_name: "ObjectCreated:Put".into(),
                },
            )
            .await
            .unwrap_err();
        assert!(err.is_retryable());
        assert!(s.dst.bytes("k").is_none());
    }

    #[tokio::test]
    async fn late_events_copy_the_current_content_and_replicas_are_not_replicated() {
        let s = setup(Policy::Full, &[]).await;
        put(&s.src, "k", b"new").await;
        deliver(&s.rep, "m1", "ObjectCreated:Put", "k").await;
        assert_eq!(s.dst.bytes("k").unwrap(), Bytes::from_static(b"new"));
        let replica = s.dst.head("k").await.unwrap().unwrap();
        let mut attrs = crate::copy::replica_attrs(None, "elsewhere", &replica, vec![]);
        // Other bytes than the replica's: not its checksum.
        attrs.checksum = Default::default();
        s.src
            .put("r", Bytes::from_static(b"x"), &attrs)
            .await
            .unwrap();
        let ev = crate::event::parse_message_body(&notification("ObjectCreated:Put", "r")).unwrap();
        let Incoming::Change(ev) = &ev[0] else {
            panic!()
        };
        let r = s.state.get_rule("r1").await.unwrap().unwrap();
        assert_eq!(
            s.rep.apply_with_rule(&r, ev).await.unwrap(),
            Outcome::Skipped(Skip::ReplicaOfOther)
        );
    }

    /// S3 answers 503 SlowDown twice, then succeeds: the object is written exactly once.
    #[tokio::test]
    async fn slow_down_twice_then_success_writes_once() {
        use aws_sdk_s3::operation::get_bucket_ownership_controls::GetBucketOwnershipControlsOutput;
        use aws_sdk_s3::operation::get_object::GetObjectOutput;
        use aws_sdk_s3::operation::put_object::PutObjectOutput;
        use aws_sdk_s3::primitives::ByteStream;
        use aws_sdk_s3::types::{ObjectOwnership, OwnershipControls, OwnershipControlsRule};
        use aws_smithy_mocks::{RuleMode, mock, mock_client};

        const SLOW_DOWN: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
        let md5 = "5d41402abc4b2a76b9719d911017c592"; // "hello"
        // S3's default for new buckets: ACLs off, so no object ACL is read.
        let ownership =
            mock!(aws_sdk_s3::Client::get_bucket_ownership_controls).then_output(|| {
                let rule = OwnershipControlsRule::builder()
                    .object_ownership(ObjectOwnership::BucketOwnerEnforced)
                    .build()
                    .unwrap();
                GetBucketOwnershipControlsOutput::builder()
                    .ownership_controls(OwnershipControls::builder().rules(rule).build().unwrap())
                    .build()
            });
        // One GET gives the object's metadata and bytes (no tags: no tagging count).
        let get = mock!(aws_sdk_s3::Client::get_object)
            .sequence()
            .http_status(503, Some(SLOW_DOWN.to_string()))
            .times(2)
            .output(move || {
                GetObjectOutput::builder()
                    .content_length(5)
                    .e_tag(format!("\"{md5}\""))
                    .body(ByteStream::from_static(b"hello"))
                    .build()
            })
            .build();
        let put = mock!(aws_sdk_s3::Client::put_object).then_output(move || {
            PutObjectOutput::builder()
                .e_tag(format!("\"{md5}\""))
                .build()
        });
        // SDK-level retries off: the 503s reach crr's own retry policy.
        let client = mock_client!(
            aws_sdk_s3,
            RuleMode::MatchAny,
            [&ownership, &get, &put],
            |c| c.retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
        );

        struct Mocked(aws_sdk_s3::Client);
        impl StoreProvider for Mocked {
            fn store(&self, bucket: &BucketRef) -> Arc<dyn ObjectStore> {
                Arc::new(crate::adapters::s3::S3Store::new(
                    self.0.clone(),
                    bucket.bucket.clone(),
                ))
            }
        }
        let state = MemoryState::default();
        let mut r = rule("r1", "src-bucket", "dst-bucket");
        r.copy_mode = crate::rule::CopyMode::Stream;
        state.create_rule(&r).await.unwrap();
        let settings = ReplicatorSettings {
            retry: RetryPolicy {
                base: Duration::from_millis(1),
                ..RetryPolicy::default()
            },
            ..ReplicatorSettings::default()
        };
        let rep = Replicator::new(
            Arc::new(state.clone()),
            Arc::new(Mocked(client)),
            None,
            settings,
        );
        let out = deliver(&rep, "m1", "ObjectCreated:Put", "k").await;
        assert_eq!(out, json!({"batchItemFailures": []}));
        assert_eq!(get.num_calls(), 3);
        assert_eq!(put.num_calls(), 1);
        assert_eq!(ownership.num_calls(), 1);
        assert_eq!(state.counters("r1").await.unwrap().replicated_objects, 1);
    }

    /// Another event for the same key commits between this event's read of the ledger and
    /// its commit: the commit is refused, the source's current state is applied again, and
    /// the target ends with the newest content.
    #[tokio::test]
    async fn a_lost_ledger_race_re_applies_the_current_state() {
        use crate::ledger::LedgerEntry;
        use crate::series::{Activity, Rollup, StatsRead};
        use crate::state::{LedgerStore, SuppressedDelete};
        use std::sync::atomic::{AtomicBool, Ordering};

        /// MemoryState whose first commit finds the ledger moved on: a concurrent event
        /// (for the newest content, written to the source meanwhile) committed first.
        struct Racy {
            inner: MemoryState,
            src: MemoryObjectStore,
            raced: AtomicBool,
        }
        #[async_trait::async_trait]
        impl RuleStore for Racy {
            async fn create_rule(&self, rule: &Rule) -> Result<()> {
                self.inner.create_rule(rule).await
            }
            async fn get_rule(&self, id: &str) -> Result<Option<Rule>> {
                self.inner.get_rule(id).await
            }
            async fn list_rules(&self) -> Result<Vec<Rule>> {
                self.inner.list_rules().await
            }
            async fn update_rule(&self, rule: &Rule) -> Result<()> {
                self.inner.update_rule(rule).await
            }
            async fn delete_rule(&self, rule: &Rule) -> Result<()> {
                self.inner.delete_rule(rule).await
            }
            async fn rule_for_source(&self, bucket: &str) -> Result<Option<Rule>> {
                self.inner.rule_for_source(bucket).await
            }
        }
        #[async_trait::async_trait]
        impl LedgerStore for Racy {
            async fn read_ledger(&self, rule_id: &str, key: &str) -> Result<Option<LedgerEntry>> {
                self.inner.read_ledger(rule_id, key).await
            }
            async fn commit_ledger(
                &self,
                rule_id: &str,
                key: &str,
                expected: Option<u64>,
                seq: &str,
                etag: &str,
            ) -> Result<bool> {
                if !self.raced.swap(true, Ordering::SeqCst) {
                    // The concurrent event: the source changed and its event committed.
                    self.src
                        .put(key, Bytes::from_static(b"newest"), &WriteAttrs::default())
                        .await?;
                    let newer = normalize_sequencer("FF").unwrap_or_default();
                    assert!(
                        self.inner
                            .commit_ledger(rule_id, key, expected, &newer, "other")
                            .await?
                    );
                }
                self.inner
                    .commit_ledger(rule_id, key, expected, seq, etag)
                    .await
            }
        }
        #[async_trait::async_trait]
        impl StatsStore for Racy {
            async fn add_activity(
                &self,
                rule_id: &str,
                minute: chrono::DateTime<chrono::Utc>,
                activity: &Activity,
            ) -> Result<()> {
                self.inner.add_activity(rule_id, minute, activity).await
            }
            async fn read_stats(
                &self,
                rule_id: &str,
                from: chrono::DateTime<chrono::Utc>,
            ) -> Result<StatsRead> {
                self.inner.read_stats(rule_id, from).await
            }
            async fn roll_up(&self, rule_id: &str, rollup: &Rollup) -> Result<bool> {
                self.inner.roll_up(rule_id, rollup).await
            }
            async fn sample_pending(
                &self,
                rule_id: &str,
                minute: chrono::DateTime<chrono::Utc>,
                pending: u64,
            ) -> Result<()> {
                self.inner.sample_pending(rule_id, minute, pending).await
            }
            async fn record_suppressed(&self, rule_id: &str, d: &SuppressedDelete) -> Result<bool> {
                self.inner.record_suppressed(rule_id, d).await
            }
            async fn suppressed(&self, rule_id: &str) -> Result<Vec<SuppressedDelete>> {
                self.inner.suppressed(rule_id).await
            }
        }

        let s = setup(Policy::Full, &[]).await;
        let etag = put(&s.src, "k", b"older").await;
        let racy = Racy {
            inner: s.state.clone(),
            src: s.src.clone(),
            raced: AtomicBool::new(false),
        };
        let rep = Replicator::new(
            Arc::new(racy),
            Arc::new(s.src.world()),
            None,
            ReplicatorSettings::default(),
        );
        let event = json!({"Records": [record("ObjectCreated:Put", "k", Some("10"), &etag)]});
        rep.handle(&event, None).await.unwrap();
        // The first copy wrote "older"; the lost commit made it copy again: "newest".
        assert_eq!(s.dst.bytes("k").unwrap(), Bytes::from_static(b"newest"));
        let entry = s.state.read_ledger("r1", "k").await.unwrap().unwrap();
        assert_eq!(entry.sequencer, normalize_sequencer("FF").unwrap());
    }
}
