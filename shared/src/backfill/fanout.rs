//! Fan-out: one rule's migration spread over many invocations through the SQS segment
//! queue, so that its speed grows with Lambda's concurrency, not with one invocation's.
//!
//! Two roles, one function:
//! - the **coordinator** (the schedule, `{}`, when a segment queue is configured) does no
//!   copying. Per rule with a job it starts the job, runs the counting pass (segments are
//!   cut and become workable while it goes on), sends every segment it cut to the queue,
//!   sends again the segments whose work stopped, and finishes the job;
//! - the **workers** (SQS batches of segment messages, through an event source mapping
//!   whose `MaximumConcurrency` bounds the fan-out) claim the segment a message names,
//!   work it page by page with checkpoints as any worker does, and, when the deadline
//!   comes first, release it and send it to the queue again to continue.
//!
//! Nothing is lost and nothing needs exactly-once delivery:
//! - a message names a segment, and the segment's conditional lease decides who works
//!   on it: a duplicate (SQS delivers at least once; the coordinator may send again)
//!   finds the segment leased or done and is dropped;
//! - the job's claim cursor (`ClaimBoard::next`) is the first segment never sent: the
//!   coordinator sends from it to the last segment cut and then moves it, so a send lost
//!   to a crash is made by the next coordinator;
//! - a segment whose worker died, or whose continuation was not sent, stays on the claim
//!   board with its lease's expiry (or its release time): once that is older than
//!   `requeue_after`, the coordinator sends the segment again (and dates the entry, so
//!   it is sent once per `requeue_after`);
//! - a message taken while the job is paused (or failed) is not worked on: it moves the
//!   cursor back to its segment, and the coordinator sends from there once the job runs
//!   again.

use std::time::Instant;

use chrono::Utc;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::worker::now_ms;
use super::*;
use crate::error::{Error, Result};
use crate::ports::SegmentQueue;
use crate::rule::Rule;

/// Segment messages sent per round of the coordinator (the cursor moves after each).
const SEND_ROUND: u32 = 500;

/// A segment queue message: work on segment `segment` of rule `rule_id`'s job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentWork {
    pub rule_id: String,
    pub segment: u32,
}

#[derive(Serialize, Deserialize)]
struct Body {
    crr_segment: SegmentWork,
}

impl SegmentWork {
    /// The message body: `{"crr_segment": {"rule_id": "...", "segment": 7}}`.
    pub fn body(&self) -> String {
        serde_json::json!({"crr_segment": {"rule_id": self.rule_id, "segment": self.segment}})
            .to_string()
    }

    /// Reads a message body; the error names what is wrong with it.
    pub fn parse(body: &str) -> Result<Self> {
        serde_json::from_str::<Body>(body)
            .map(|b| b.crr_segment)
            .map_err(|e| {
                Error::MalformedEvent(format!(
                    "not a segment message ({e}): {}",
                    crate::error::clip(body, 200)
                ))
            })
    }
}

/// One SQS record of a batch: its message id (for partial batch failures) and body.
#[derive(Debug, Clone)]
pub struct QueuedMessage {
    pub message_id: String,
    pub body: String,
}

/// The SQS records of an event (`{"Records": [{"eventSource": "aws:sqs", ...}]}`), or
/// `None` when the payload is not an SQS batch.
pub fn sqs_messages(payload: &serde_json::Value) -> Option<Vec<QueuedMessage>> {
    let records = payload.get("Records")?.as_array()?;
    let from_sqs = |r: &serde_json::Value| {
        r.get("eventSource").and_then(serde_json::Value::as_str) == Some("aws:sqs")
    };
    if records.is_empty() || !records.iter().all(from_sqs) {
        return None;
    }
    Some(
        records
            .iter()
            .map(|r| {
                let text = |name: &str| {
                    r.get(name)
                        .and_then(serde_json::Value::as_str)
                        .unwrap_or_default()
                        .to_string()
                };
                QueuedMessage {
                    message_id: text("messageId"),
                    body: text("body"),
                }
            })
            .collect(),
    )
}

/// What the coordinator did for one rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CoordinatorReport {
    pub rule_id: String,
    pub state: String,
    /// Segments cut so far, and whether the counting pass is over.
    pub segments: u32,
    pub planned: bool,
    /// Segments sent to the queue for the first time by this run.
    pub sent: u32,
    /// Segments sent again because their work stopped.
    pub resent: u32,
}

/// What an SQS batch of segment messages came to.
#[derive(Debug, Default)]
pub struct BatchOutcome {
    /// Message ids to report as failed (SQS delivers them again, then to the DLQ).
    pub failed: Vec<String>,
    pub reports: Vec<RunReport>,
}

impl BatchOutcome {
    /// The partial batch response Lambda's SQS event source mapping reads.
    pub fn response(&self) -> serde_json::Value {
        let failures: Vec<_> = self
            .failed
            .iter()
            .map(|id| serde_json::json!({ "itemIdentifier": id }))
            .collect();
        serde_json::json!({ "batchItemFailures": failures })
    }
}

/// What became of one segment message.
enum Worked {
    /// Worked on (finished, or continued by a message sent again).
    Report(RunReport),
    /// Nothing to do: the segment is done or leased, the job gone, finished or paused.
    Dropped(&'static str),
}

impl Backfiller {
    /// The coordinator's run (the schedule, in fan-out mode): every rule with a migration
    /// to do gets its job started, its segments cut and sent, its stopped segments sent
    /// again, and the job finished once every segment is done.
    pub async fn coordinate(
        &self,
        queue: &dyn SegmentQueue,
        deadline: Instant,
    ) -> Result<Vec<CoordinatorReport>> {
        self.each_active_rule(None, |rule, job| async move {
            self.coordinate_rule(queue, &rule, job, deadline).await
        })
        .await
    }

    async fn coordinate_rule(
        &self,
        queue: &dyn SegmentQueue,
        rule: &Rule,
        job: Job,
        deadline: Instant,
    ) -> Result<CoordinatorReport> {
        let mut report = CoordinatorReport {
            rule_id: rule.id.clone(),
            ..CoordinatorReport::default()
        };
        self.mark_running(&job).await?;
        // Segments are sent as they are cut: the workers start while the pass goes on.
        let (cuts, mut counting) = tokio::sync::watch::channel(job.planned);
        let plan = self.count_telling(rule, job, deadline, &cuts);
        let send = async {
            let mut sent = 0;
            loop {
                let counted = *counting.borrow_and_update();
                sent += self.send_new_segments(queue, &rule.id, deadline).await?;
                if counted || counting.changed().await.is_err() {
                    return Ok::<u32, Error>(sent);
                }
            }
        };
        let (planned, sent) = tokio::join!(plan, send);
        planned?;
        report.sent = sent?;
        report.resent = self.resend_stopped(queue, &rule.id).await?;
        let state = self.finish_if_done(rule).await?;
        report.state = state.as_str().to_string();
        if let Some(job) = self.jobs.job(&rule.id).await? {
            report.segments = job.segments;
            report.planned = job.planned;
        }
        tracing::info!(rule_id = %rule.id, sent = report.sent, resent = report.resent, segments = report.segments, planned = report.planned, state = %report.state, "backfill coordinated");
        Ok(report)
    }

    /// Sends the segments from the claim cursor to the last one cut, moving the cursor
    /// after each round; returns how many were sent.
    async fn send_new_segments(
        &self,
        queue: &dyn SegmentQueue,
        rule_id: &str,
        deadline: Instant,
    ) -> Result<u32> {
        let mut sent = 0;
        loop {
            let Some(job) = self.jobs.job(rule_id).await? else {
                return Ok(sent);
            };
            let from = job.claims.next;
            if from >= job.segments || Instant::now() >= deadline {
                return Ok(sent);
            }
            let to = job.segments.min(from.saturating_add(SEND_ROUND));
            let work: Vec<SegmentWork> = (from..to)
                .map(|segment| SegmentWork {
                    rule_id: rule_id.to_string(),
                    segment,
                })
                .collect();
            queue.send(&work).await?;
            sent += to - from;
            // Lost to another coordinator or a rewind: the next round reads the cursor
            // again (a segment sent twice is dropped by its second claim).
            if !self.jobs.advance_claim_cursor(rule_id, from, to).await? {
                tracing::info!(rule_id, from, to, "claim cursor moved meanwhile");
            }
        }
    }

    /// Sends again the segments whose work stopped: on the claim board with a lease that
    /// ran out (or a release) longer than `requeue_after` ago.
    async fn resend_stopped(&self, queue: &dyn SegmentQueue, rule_id: &str) -> Result<u32> {
        let Some(job) = self.jobs.job(rule_id).await? else {
            return Ok(0);
        };
        let now = now_ms();
        let cutoff = now.saturating_sub(self.settings.requeue_after.as_millis() as u64);
        let stopped: Vec<(u32, u64)> = job
            .claims
            .leases
            .iter()
            .filter(|(_, until)| **until < cutoff)
            .map(|(index, until)| (*index, *until))
            .collect();
        // Dated first: of coordinators racing, one sends each (in one batch).
        let mut resend = Vec::new();
        for (segment, until) in stopped {
            if self
                .jobs
                .touch_board_entry(rule_id, segment, until, now)
                .await?
            {
                tracing::warn!(
                    rule_id,
                    segment,
                    stopped_ms_ago = now.saturating_sub(until),
                    "segment work had stopped; sent again"
                );
                resend.push(SegmentWork {
                    rule_id: rule_id.to_string(),
                    segment,
                });
            }
        }
        queue.send(&resend).await?;
        Ok(resend.len() as u32)
    }

    /// Works an SQS batch of segment messages (up to `workers` at once); the ones that
    /// failed on something that may pass are reported for SQS to deliver again.
    pub async fn work_batch(
        &self,
        queue: &dyn SegmentQueue,
        messages: Vec<QueuedMessage>,
        invocation: &str,
        deadline: Instant,
    ) -> BatchOutcome {
        let workers = self.settings.workers.max(1);
        let results: Vec<(String, Result<Worked>)> =
            futures::stream::iter(messages.into_iter().enumerate())
                .map(|(n, m)| async move {
                    let owner = super::lease::owner(invocation, n);
                    let worked = match SegmentWork::parse(&m.body) {
                        Ok(work) => self.work_message(queue, &work, &owner, deadline).await,
                        Err(e) => Err(e),
                    };
                    (m.message_id, worked)
                })
                .buffer_unordered(workers)
                .collect()
                .await;
        let mut outcome = BatchOutcome::default();
        for (id, worked) in results {
            match worked {
                Ok(Worked::Report(report)) => outcome.reports.push(report),
                Ok(Worked::Dropped(why)) => {
                    tracing::info!(message_id = %id, why, "segment message dropped");
                }
                Err(e) => {
                    tracing::error!(message_id = %id, error = %e, retryable = e.is_retryable(), "segment message failed");
                    outcome.failed.push(id);
                }
            }
        }
        outcome
    }

    /// One segment message: claim, work until done or the deadline, then continue later.
    async fn work_message(
        &self,
        queue: &dyn SegmentQueue,
        work: &SegmentWork,
        owner: &str,
        deadline: Instant,
    ) -> Result<Worked> {
        let Some(rule) = self.rules.get_rule(&work.rule_id).await? else {
            return Ok(Worked::Dropped("rule deleted"));
        };
        let Some(job) = self.jobs.job(&rule.id).await? else {
            return Ok(Worked::Dropped("no job"));
        };
        if rule.paused || matches!(job.state, JobState::Paused | JobState::Failed) {
            // Not worked on, not lost: the coordinator sends it again after the resume
            // (`crr backfill start` resumes a failed job as well as a paused one).
            self.jobs
                .rewind_claim_cursor(&rule.id, work.segment)
                .await?;
            return Ok(Worked::Dropped("job paused"));
        }
        if !matches!(job.state, JobState::Pending | JobState::Running) {
            return Ok(Worked::Dropped("job not running"));
        }
        if let Err(e) = self.settings.allowed.check(&rule) {
            self.jobs.fail_job(&rule.id, &e.to_string()).await?;
            return Err(e);
        }
        self.mark_running(&job).await?;
        let now = now_ms();
        let held_until = Instant::now() + self.settings.lease;
        let until = now + self.settings.lease.as_millis() as u64;
        let Some(segment) = self
            .jobs
            .claim_segment(&rule.id, work.segment, owner, now, until)
            .await?
        else {
            return Ok(Worked::Dropped("segment done or leased"));
        };
        tracing::info!(rule_id = %rule.id, segment = work.segment, owner, "segment claimed");
        let mark = JobMark::of(&job);
        let mut report = RunReport {
            rule_id: rule.id.clone(),
            ..RunReport::default()
        };
        let finished = self
            .work_segment(
                &rule,
                &mark,
                segment,
                owner,
                held_until,
                deadline,
                &mut report,
            )
            .await;
        self.write_progress(&rule.id, self.progress.take(&rule.id, Utc::now()))
            .await;
        let continues = match finished {
            Ok(true) => {
                report.segments_finished += 1;
                false
            }
            Ok(false) => true,
            Err(e) if e.continues_later() => true,
            Err(e) => {
                if let Err(release) = self
                    .jobs
                    .release_segment(&rule.id, work.segment, owner)
                    .await
                {
                    tracing::warn!(rule_id = %rule.id, segment = work.segment, error = %release, "lease not released; it will expire");
                }
                if !e.is_retryable() {
                    self.jobs.fail_job(&rule.id, &e.to_string()).await?;
                }
                return Err(e);
            }
        };
        if continues {
            self.jobs
                .release_segment(&rule.id, work.segment, owner)
                .await?;
            // Paused meanwhile: the board keeps the released segment, and the coordinator
            // sends it again once the job runs.
            let paused = self
                .jobs
                .job(&rule.id)
                .await?
                .is_some_and(|j| j.state == JobState::Paused);
            if !paused {
                // If this send fails, the message itself is delivered again.
                queue.send(std::slice::from_ref(work)).await?;
                tracing::info!(rule_id = %rule.id, segment = work.segment, "segment continues in another invocation");
            }
        }
        report.state = self.finish_if_done(&rule).await?.as_str().to_string();
        Ok(Worked::Report(report))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use async_trait::async_trait;
    use bytes::Bytes;

    use super::*;
    use crate::copy::CopyEngine;
    use crate::memory::{MemoryState, MemoryWorld};
    use crate::object_store::{ObjectStore, WriteAttrs};
    use crate::rule::tests::rule;
    use crate::state::RuleStore;

    #[test]
    fn a_segment_message_reads_back_and_bad_bodies_are_named() {
        let work = SegmentWork {
            rule_id: "r 1".into(),
            segment: 7,
        };
        assert_eq!(SegmentWork::parse(&work.body()).unwrap(), work);
        let err = SegmentWork::parse("{\"Records\": []}").unwrap_err();
        assert!(err.to_string().contains("not a segment message"), "{err}");
    }

    #[test]
    fn only_sqs_batches_are_taken_for_segment_messages() {
        let sqs = serde_json::json!({"Records": [
            {"eventSource": "aws:sqs", "messageId": "m1", "body": "{}"}
        ]});
        let got = sqs_messages(&sqs).unwrap();
        assert_eq!(got[0].message_id, "m1");
        assert!(sqs_messages(&serde_json::json!({})).is_none());
        let s3 = serde_json::json!({"Records": [{"eventSource": "aws:s3"}]});
        assert!(sqs_messages(&s3).is_none());
    }

    /// The segment queue in memory: messages in order, every send counted.
    #[derive(Default)]
    struct Queue {
        messages: Mutex<VecDeque<SegmentWork>>,
        sent: Mutex<Vec<SegmentWork>>,
    }

    #[async_trait]
    impl SegmentQueue for Queue {
        async fn send(&self, work: &[SegmentWork]) -> Result<()> {
            self.messages.lock().unwrap().extend(work.iter().cloned());
            self.sent.lock().unwrap().extend(work.iter().cloned());
            Ok(())
        }
    }

    impl Queue {
        fn take(&self) -> Option<SegmentWork> {
            self.messages.lock().unwrap().pop_front()
        }
        fn sends_of(&self, segment: u32) -> usize {
            let sent = self.sent.lock().unwrap();
            sent.iter().filter(|w| w.segment == segment).count()
        }
    }

    const OBJECTS: usize = 60;

    /// A rule `r` (historical) over `src` -> `dst` with `OBJECTS` objects, every write
    /// taking 10 ms; segments of 20 objects listed 5 at a time, copied one at a time.
    async fn setup() -> (MemoryState, MemoryWorld, Backfiller) {
        let state = MemoryState::default();
        let mut r = rule("r", "src", "dst");
        r.historical = true;
        state.create_rule(&r).await.unwrap();
        let world = MemoryWorld::default();
        let src = world.store("src");
        world.store("dst");
        for i in 0..OBJECTS {
            src.put(
                &format!("k{i:03}"),
                Bytes::from(format!("object {i}")),
                &WriteAttrs::default(),
            )
            .await
            .unwrap();
        }
        world.set_write_delay(Duration::from_millis(10));
        let settings = BackfillSettings {
            page_size: 5,
            segment_objects: 20,
            workers: 2,
            copy_concurrency: 1,
            lease: Duration::from_millis(400),
            margin: Duration::ZERO,
            requeue_after: Duration::from_millis(200),
            // One lister: three segments of four pages (more listers cut more, smaller
            // ones, which no invocation would outlast).
            listers: 1,
            ..BackfillSettings::default()
        };
        let backfiller = Backfiller::new(
            Arc::new(state.clone()),
            Arc::new(state.clone()),
            Arc::new(world.clone()),
            CopyEngine::default(),
            settings,
        );
        (state, world, backfiller)
    }

    /// An invocation's deadline that leaves about 100 ms of page work (the hard stop is
    /// 700 ms before it): a segment of four 50 ms pages needs several invocations.
    fn short_deadline() -> Instant {
        Instant::now() + Duration::from_millis(800)
    }

    /// `instances` consumers drain the queue, one message per invocation, while the
    /// coordinator runs every 100 ms, until the job is finished.
    async fn drain(b: &Backfiller, queue: &Queue, state: &MemoryState, instances: usize) {
        let done = || async {
            let job = state.job("r").await.unwrap();
            job.is_some_and(|j| j.state.is_finished())
        };
        let consumer = |n: usize| async move {
            let mut invocation = 0;
            while !done().await {
                let Some(work) = queue.take() else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                invocation += 1;
                let message = QueuedMessage {
                    message_id: format!("m-{n}-{invocation}"),
                    body: work.body(),
                };
                let id = format!("inv-{n}-{invocation}");
                let out = b
                    .work_batch(queue, vec![message], &id, short_deadline())
                    .await;
                if !out.failed.is_empty() {
                    // SQS delivers a failed message again.
                    queue.messages.lock().unwrap().push_back(work);
                }
            }
        };
        let coordinator = async {
            while !done().await {
                b.coordinate(queue, Instant::now() + Duration::from_secs(5))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let consumers = futures::future::join_all((0..instances).map(consumer));
        tokio::time::timeout(Duration::from_secs(60), async {
            tokio::join!(coordinator, consumers)
        })
        .await
        .expect("the fan-out did not finish the job in 60 s");
    }

    fn assert_exact_copy(world: &MemoryWorld, state_job: &Job) {
        assert_eq!(world.store("dst").keys(), world.store("src").keys());
        assert_eq!(state_job.state, JobState::Completed);
        let t = &state_job.progress.tally;
        // Every object counted once, as copied, whichever invocation copied it.
        assert_eq!((t.objects, t.copied), (OBJECTS as u64, OBJECTS as u64));
    }

    #[tokio::test]
    async fn three_instances_fed_by_the_queue_finish_segments_that_outlast_an_invocation() {
        let (state, world, b) = setup().await;
        let queue = Queue::default();
        drain(&b, &queue, &state, 3).await;
        let job = state.job("r").await.unwrap().unwrap();
        assert_exact_copy(&world, &job);
        assert_eq!(job.segments, 3);
        // Each segment was sent once by the coordinator and continued by the invocations
        // its deadline stopped.
        for segment in 0..3 {
            assert!(
                queue.sends_of(segment) >= 2,
                "segment {segment} was never continued"
            );
        }
        assert!(job.claims.leases.is_empty(), "{:?}", job.claims);
    }

    #[tokio::test]
    async fn a_segment_whose_worker_died_is_sent_again_once_its_lease_ran_out() {
        let (state, world, b) = setup().await;
        let queue = Queue::default();
        b.coordinate(&queue, Instant::now() + Duration::from_secs(5))
            .await
            .unwrap();
        // The message of segment 1 is taken by a worker that dies holding the lease.
        let taken = queue.take().unwrap();
        let lost = queue.take().unwrap();
        queue.messages.lock().unwrap().push_front(taken);
        let now = now_ms();
        assert!(
            state
                .claim_segment("r", lost.segment, "dead", now, now + 300)
                .await
                .unwrap()
                .is_some()
        );
        drain(&b, &queue, &state, 2).await;
        assert_exact_copy(&world, &state.job("r").await.unwrap().unwrap());
        assert!(queue.sends_of(lost.segment) >= 2);
    }

    #[tokio::test]
    async fn messages_taken_while_paused_are_sent_again_after_the_resume() {
        let (state, world, b) = setup().await;
        let queue = Queue::default();
        b.coordinate(&queue, Instant::now() + Duration::from_secs(5))
            .await
            .unwrap();
        b.pause("r").await.unwrap();
        // Every message is consumed while paused: none is worked on, none is lost.
        while let Some(work) = queue.take() {
            let message = QueuedMessage {
                message_id: "m".into(),
                body: work.body(),
            };
            let out = b
                .work_batch(&queue, vec![message], "inv", short_deadline())
                .await;
            assert!(out.failed.is_empty() && out.reports.is_empty(), "{out:?}");
        }
        assert!(world.store("dst").keys().is_empty());
        assert_eq!(state.job("r").await.unwrap().unwrap().claims.next, 0);
        b.start("r").await.unwrap();
        drain(&b, &queue, &state, 2).await;
        assert_exact_copy(&world, &state.job("r").await.unwrap().unwrap());
    }

    #[tokio::test]
    async fn a_duplicate_message_is_dropped_while_its_segment_is_worked_on() {
        let (state, _world, b) = setup().await;
        let queue = Queue::default();
        b.coordinate(&queue, Instant::now() + Duration::from_secs(5))
            .await
            .unwrap();
        let work = queue.take().unwrap();
        let message = |id: &str| QueuedMessage {
            message_id: id.into(),
            body: work.body(),
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let (first, second) = tokio::join!(
            b.work_batch(&queue, vec![message("a")], "inv-a", deadline),
            async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                b.work_batch(&queue, vec![message("b")], "inv-b", deadline)
                    .await
            }
        );
        assert_eq!(first.reports.len(), 1, "{first:?}");
        assert_eq!(first.reports[0].segments_finished, 1);
        assert!(
            second.reports.is_empty() && second.failed.is_empty(),
            "{second:?}"
        );
        let segment = &state.segments("r").await.unwrap()[work.segment as usize];
        assert_eq!((segment.objects_done, segment.copied), (20, 20));
    }

    #[tokio::test]
    async fn a_malformed_message_fails_alone() {
        let (_state, _world, b) = setup().await;
        let queue = Queue::default();
        let out = b
            .work_batch(
                &queue,
                vec![QueuedMessage {
                    message_id: "bad".into(),
                    body: "not json".into(),
                }],
                "inv",
                short_deadline(),
            )
            .await;
        assert_eq!(out.failed, vec!["bad".to_string()]);
        assert_eq!(
            out.response(),
            serde_json::json!({"batchItemFailures": [{"itemIdentifier": "bad"}]})
        );
    }
}
