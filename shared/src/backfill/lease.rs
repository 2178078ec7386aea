//! Leases on segments: whose they are, and the heartbeat that keeps one alive while its
//! segment is worked on.
//!
//! A lease belongs to one claim of one worker of one invocation, never to an invocation
//! as a whole: a sibling worker cannot pass for the holder. Every write on a held segment
//! (heartbeat, checkpoint) is conditional on the lease being the writer's and unexpired
//! and on the segment not being done (`BackfillStore`), so a worker that lost its lease
//! neither extends it nor adds its page's counters, and a done segment stays done.
//!
//! A page may take longer than the lease (large objects, a slow link, throttling): the
//! heartbeat extends the lease every third of its length for as long as the segment is
//! worked on. If an extension is refused (someone else holds the lease, or the segment is
//! done) or cannot be written before only a third of the lease is left, the lease is
//! lost and the worker stops the segment at once, page in flight included, without a
//! checkpoint: whoever takes the segment over examines that page again.

use std::time::{Duration, Instant};

use super::BackfillStore;
use super::worker::now_ms;

/// The lease owner of a worker's claim: `{invocation}/w{worker}/{nonce}`. The nonce sets
/// apart two claims of one worker, and invocations that were given one name (a retried
/// Lambda invocation keeps its request id; the CLI or a test may reuse a name).
pub(super) fn owner(invocation: &str, worker: usize) -> String {
    format!(
        "{invocation}/w{worker}/{:06x}",
        fastrand::u32(..0x0100_0000)
    )
}

/// Taken by every write on one lease (heartbeat, checkpoint): a heartbeat never races a
/// checkpoint, whose outcome decides. The segment's last checkpoint marks it done, after
/// which every heartbeat is refused; the work ends on that checkpoint, not on the refusal.
pub(super) type LeaseWrites = tokio::sync::Mutex<()>;

/// Why a lease ended while its segment was being worked on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseLost {
    /// The extension was refused: another worker took the segment over (the lease had
    /// expired), or the segment is done.
    TakenOver,
    /// No extension got through in time (the table did not answer): the lease must be
    /// presumed free for others.
    NotExtended,
}

/// The heartbeat of one lease, held by `owner` until `held_until` (by this process's
/// clock, no later than the expiry the claim wrote). Returns only when the lease is lost;
/// the segment's work runs beside it and is dropped when it returns.
pub(super) async fn heartbeat(
    store: &dyn BackfillStore,
    rule_id: &str,
    index: u32,
    owner: &str,
    writes: &LeaseWrites,
    lease: Duration,
    mut held_until: Instant,
) -> LeaseLost {
    let every = (lease / 3).max(Duration::from_millis(10));
    let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
    loop {
        tokio::time::sleep(every).await;
        // Held to the end of the lease's last third at most, so that the worker has
        // stopped before anyone else may claim the segment.
        let give_up = held_until.checked_sub(every).unwrap_or_else(Instant::now);
        let extend = async {
            // After a checkpoint being written, if any: the new expiry counts from when
            // the extension is sent.
            let _one = writes.lock().await;
            let sent = Instant::now();
            let now = now_ms();
            let extended = store
                .extend_lease(rule_id, index, owner, now, now.saturating_add(lease_ms))
                .await;
            extended.map(|held| held.then_some(sent))
        };
        match tokio::time::timeout_at(give_up.into(), extend).await {
            Ok(Ok(Some(sent))) => held_until = sent + lease,
            Ok(Ok(None)) => return LeaseLost::TakenOver,
            Ok(Err(e)) if Instant::now() < give_up => {
                tracing::warn!(rule_id, segment = index, owner, error = %e, "lease not extended; trying again");
            }
            Ok(Err(e)) => {
                tracing::warn!(rule_id, segment = index, owner, error = %e, "lease not extended in time");
                return LeaseLost::NotExtended;
            }
            Err(_) => return LeaseLost::NotExtended,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use async_trait::async_trait;
    use bytes::Bytes;

    use super::super::*;
    use super::*;
    use crate::copy::CopyEngine;
    use crate::error::Result;
    use crate::memory::{MemoryState, MemoryWorld};
    use crate::object_store::{ObjectStore, WriteAttrs};
    use crate::rule::tests::rule;
    use crate::state::RuleStore;

    const OBJECTS: usize = 12;

    /// A rule `r` over `src` -> `dst` with `OBJECTS` objects to copy, every object write
    /// taking `write_delay`.
    async fn setup(write_delay: Duration) -> (MemoryState, MemoryWorld) {
        let state = MemoryState::default();
        let mut r = rule("r", "src", "dst");
        r.historical = true;
        state.create_rule(&r).await.unwrap();
        let world = MemoryWorld::default();
        let src = world.store("src");
        world.store("dst");
        for i in 0..OBJECTS {
            let body = Bytes::from(format!("object {i}"));
            src.put(&format!("k{i:02}"), body, &WriteAttrs::default())
                .await
                .unwrap();
        }
        world.set_write_delay(write_delay);
        (state, world)
    }

    /// One segment of `OBJECTS` objects, listed in one page and copied one at a time.
    fn settings(lease: Duration, workers: usize) -> BackfillSettings {
        BackfillSettings {
            page_size: 100,
            segment_objects: 100,
            workers,
            copy_concurrency: 1,
            lease,
            margin: Duration::ZERO,
            ..BackfillSettings::default()
        }
    }

    fn backfiller(
        jobs: Arc<dyn BackfillStore>,
        state: &MemoryState,
        world: &MemoryWorld,
        settings: BackfillSettings,
    ) -> Backfiller {
        Backfiller::new(
            Arc::new(state.clone()),
            jobs,
            Arc::new(world.clone()),
            CopyEngine::default(),
            settings,
        )
    }

    #[tokio::test]
    async fn a_page_slower_than_the_lease_keeps_its_lease_and_is_counted_once() {
        // 12 writes of 100 ms one after the other: a page of 1.2 s against a lease of 0.3 s.
        let (state, world) = setup(Duration::from_millis(100)).await;
        let lease = Duration::from_millis(300);
        let a = backfiller(Arc::new(state.clone()), &state, &world, settings(lease, 2));
        let b = backfiller(Arc::new(state.clone()), &state, &world, settings(lease, 2));
        let deadline = Instant::now() + Duration::from_secs(30);
        let first = a.run(Some("r"), "inv-a", deadline);
        // A second invocation comes when the lease would have run out twice over, and
        // someone keeps trying to take the segment meanwhile.
        let second = async {
            tokio::time::sleep(lease * 2).await;
            b.run(Some("r"), "inv-b", deadline).await
        };
        let stolen = async {
            let mut stolen = 0;
            let started = Instant::now();
            while started.elapsed() < Duration::from_millis(1500) {
                let now = now_ms();
                if let Some(s) = state.segments("r").await.unwrap().first()
                    && !s.done
                    && state
                        .claim_segment("r", s.index, "thief", now, now + 1)
                        .await
                        .unwrap()
                        .is_some()
                {
                    stolen += 1;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            stolen
        };
        let (ra, rb, stolen) = tokio::join!(first, second, stolen);
        let reports: Vec<RunReport> = ra.unwrap().into_iter().chain(rb.unwrap()).collect();
        assert_eq!(stolen, 0, "the lease was taken while its page was copied");
        let segments = state.segments("r").await.unwrap();
        assert_eq!(segments.len(), 1);
        let s = &segments[0];
        assert!(s.done);
        assert_eq!((s.objects_done, s.copied), (OBJECTS as u64, OBJECTS as u64));
        let finished: u64 = reports.iter().map(|r| r.segments_finished).sum();
        let copied: u64 = reports.iter().map(|r| r.copied).sum();
        assert_eq!((finished, copied), (1, OBJECTS as u64), "{reports:?}");
        assert_eq!(world.store("dst").keys().len(), OBJECTS);
        let job = state.job("r").await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Completed);
        // Completed once, and it stays so: a pause or a later run changes nothing.
        a.pause("r").await.unwrap();
        let later = b.run(Some("r"), "inv-c", deadline).await.unwrap();
        assert!(later.is_empty(), "{later:?}");
        assert_eq!(state.job("r").await.unwrap().unwrap(), job);
        assert_eq!(state.segments("r").await.unwrap(), segments);
    }

    #[derive(Clone, Copy, PartialEq)]
    enum Fault {
        /// The first claim's heartbeats are refused (the lease was taken over while the
        /// worker was stalled); later claims find the segment taken.
        HeartbeatRefused,
        /// The first claim's heartbeats hang (the table does not answer); later claims
        /// find the segment taken.
        HeartbeatHangs,
        /// Checkpoints are written at once, their answers come late.
        CheckpointAnsweredLate(Duration),
    }

    /// The state table, with a fault.
    struct Faulty {
        state: MemoryState,
        lose: AtomicBool,
        fault: Fault,
    }

    #[async_trait]
    impl BackfillStore for Faulty {
        async fn job(&self, rule_id: &str) -> Result<Option<Job>> {
            self.state.job(rule_id).await
        }
        async fn create_job(&self, job: &Job) -> Result<bool> {
            self.state.create_job(job).await
        }
        async fn set_job_state(&self, rule_id: &str, state: JobState) -> Result<()> {
            self.state.set_job_state(rule_id, state).await
        }
        async fn advance_job(&self, rule_id: &str, from: JobState, to: JobState) -> Result<bool> {
            self.state.advance_job(rule_id, from, to).await
        }
        async fn fail_job(&self, rule_id: &str, reason: &str) -> Result<()> {
            self.state.fail_job(rule_id, reason).await
        }
        async fn record_failures(&self, rule_id: &str, failed: &[FailedObject]) -> Result<()> {
            self.state.record_failures(rule_id, failed).await
        }
        async fn failures(&self, rule_id: &str) -> Result<Vec<FailedObject>> {
            self.state.failures(rule_id).await
        }
        async fn failure_count(&self, rule_id: &str) -> Result<u64> {
            self.state.failure_count(rule_id).await
        }
        async fn remove_failure(&self, rule_id: &str, key: &str) -> Result<()> {
            self.state.remove_failure(rule_id, key).await
        }
        async fn add_segment(
            &self,
            rule_id: &str,
            segment: &Segment,
            job: &Job,
            expected: u32,
        ) -> Result<bool> {
            self.state
                .add_segment(rule_id, segment, job, expected)
                .await
        }
        async fn segments(&self, rule_id: &str) -> Result<Vec<Segment>> {
            self.state.segments(rule_id).await
        }
        async fn advance_claim_cursor(&self, rule_id: &str, from: u32, to: u32) -> Result<bool> {
            self.state.advance_claim_cursor(rule_id, from, to).await
        }
        async fn rewind_claim_cursor(&self, rule_id: &str, to: u32) -> Result<bool> {
            self.state.rewind_claim_cursor(rule_id, to).await
        }
        async fn touch_board_entry(
            &self,
            rule_id: &str,
            index: u32,
            seen_ms: u64,
            until_ms: u64,
        ) -> Result<bool> {
            self.state
                .touch_board_entry(rule_id, index, seen_ms, until_ms)
                .await
        }
        async fn claim_next_segment(
            &self,
            rule_id: &str,
            next: u32,
            owner: &str,
            now_ms: u64,
            until_ms: u64,
        ) -> Result<Option<Segment>> {
            // As `claim_segment` below: only the first claim goes through.
            let heartbeats_fail =
                matches!(self.fault, Fault::HeartbeatRefused | Fault::HeartbeatHangs);
            if heartbeats_fail && self.lose.swap(true, Ordering::SeqCst) {
                return Ok(None);
            }
            self.state
                .claim_next_segment(rule_id, next, owner, now_ms, until_ms)
                .await
        }
        async fn claim_segment(
            &self,
            rule_id: &str,
            index: u32,
            owner: &str,
            now_ms: u64,
            until_ms: u64,
        ) -> Result<Option<Segment>> {
            // The first claim goes through, and its lease is lost at its first heartbeat;
            // later claims find the segment held by someone else.
            let heartbeats_fail =
                matches!(self.fault, Fault::HeartbeatRefused | Fault::HeartbeatHangs);
            if heartbeats_fail && self.lose.swap(true, Ordering::SeqCst) {
                return Ok(None);
            }
            self.state
                .claim_segment(rule_id, index, owner, now_ms, until_ms)
                .await
        }
        async fn extend_lease(
            &self,
            rule_id: &str,
            index: u32,
            owner: &str,
            now_ms: u64,
            until_ms: u64,
        ) -> Result<bool> {
            match (self.lose.load(Ordering::SeqCst), self.fault) {
                (true, Fault::HeartbeatRefused) => Ok(false),
                (true, Fault::HeartbeatHangs) => std::future::pending().await,
                _ => {
                    self.state
                        .extend_lease(rule_id, index, owner, now_ms, until_ms)
                        .await
                }
            }
        }
        async fn checkpoint_segment(
            &self,
            rule_id: &str,
            index: u32,
            owner: &str,
            checkpoint: &Checkpoint,
        ) -> Result<bool> {
            let written = self
                .state
                .checkpoint_segment(rule_id, index, owner, checkpoint)
                .await;
            if let Fault::CheckpointAnsweredLate(late) = self.fault {
                tokio::time::sleep(late).await;
            }
            written
        }
        async fn release_segment(&self, rule_id: &str, index: u32, owner: &str) -> Result<()> {
            self.state.release_segment(rule_id, index, owner).await
        }
    }

    async fn a_lost_lease_stops_the_segment_at_once(fault: Fault) {
        let (state, world) = setup(Duration::from_millis(100)).await;
        let lease = Duration::from_millis(300);
        let losing = Arc::new(Faulty {
            state: state.clone(),
            lose: AtomicBool::new(false),
            fault,
        });
        let a = backfiller(losing, &state, &world, settings(lease, 1));
        let started = Instant::now();
        let report = a
            .run(Some("r"), "inv-a", started + Duration::from_secs(30))
            .await
            .unwrap();
        let took = started.elapsed();
        // Stopped at the first heartbeat (a third of the lease) or when a third was left,
        // long before the page's 1.2 s were over, and nothing was checkpointed.
        assert!(took < Duration::from_millis(600), "stopped after {took:?}");
        assert_eq!((report[0].pages, report[0].segments_finished), (0, 0));
        let s = &state.segments("r").await.unwrap()[0];
        assert!(!s.done);
        assert_eq!((s.checkpoint.as_deref(), s.objects_done), (None, 0));
        let written = world.store("dst").keys().len();
        assert!(written < OBJECTS / 2, "{written} objects written");
        // The page in flight was dropped: no write of it lands later.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(world.store("dst").keys().len(), written);

        // Whoever takes the segment next examines the page again and counts each object
        // once, those the stopped worker wrote included.
        let now = now_ms() + lease.as_millis() as u64;
        let b = backfiller(Arc::new(state.clone()), &state, &world, settings(lease, 1));
        world.set_write_delay(Duration::ZERO);
        if fault == Fault::HeartbeatHangs {
            // Its lease (released, or run out) is free by then.
            assert!(s.lease_owner.is_none() || s.lease_until < now);
        }
        b.run(Some("r"), "inv-b", Instant::now() + Duration::from_secs(30))
            .await
            .unwrap();
        let s = &state.segments("r").await.unwrap()[0];
        assert!(s.done);
        assert_eq!((s.objects_done, s.copied), (OBJECTS as u64, OBJECTS as u64));
        let job = state.job("r").await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Completed);
    }

    #[tokio::test]
    async fn a_heartbeat_refused_stops_the_segment_at_once_without_a_checkpoint() {
        a_lost_lease_stops_the_segment_at_once(Fault::HeartbeatRefused).await;
    }

    #[tokio::test]
    async fn a_heartbeat_unanswered_stops_the_segment_before_the_lease_runs_out() {
        a_lost_lease_stops_the_segment_at_once(Fault::HeartbeatHangs).await;
    }

    #[tokio::test]
    async fn the_last_checkpoint_ends_the_work_not_the_heartbeat_it_makes_refused() {
        // Six segments of two objects (a page, and at times an empty one). Heartbeats every 100 ms; the answer to
        // each checkpoint comes 60 ms after it was written. Once a segment's checkpoint
        // marked it done, a heartbeat would be refused: it waits for the checkpoint's
        // answer, which ends the segment's work as finished (without that wait, a
        // heartbeat in those 60 ms would stop it as lost, its page uncounted).
        let (state, world) = setup(Duration::ZERO).await;
        let late = Arc::new(Faulty {
            state: state.clone(),
            lose: AtomicBool::new(false),
            fault: Fault::CheckpointAnsweredLate(Duration::from_millis(60)),
        });
        let mut settings = settings(Duration::from_millis(300), 1);
        (settings.page_size, settings.segment_objects) = (2, 2);
        // One lister: the key space is cut in one chain, two objects a segment (more
        // listers split it into more, smaller segments).
        settings.listers = 1;
        let a = backfiller(late, &state, &world, settings);
        let report = a
            .run(Some("r"), "inv-a", Instant::now() + Duration::from_secs(30))
            .await
            .unwrap();
        let segments = state.segments("r").await.unwrap();
        assert_eq!(segments.len(), OBJECTS / 2);
        assert!(segments.iter().all(|s| s.done && s.objects_done == 2));
        // The invocation saw every page it checkpointed, and every segment it finished.
        let r = &report[0];
        assert_eq!(
            (r.copied, r.segments_finished),
            (OBJECTS as u64, OBJECTS as u64 / 2),
            "{r:?}"
        );
        assert_eq!(r.state, "completed");
    }

    fn segment(index: u32) -> Segment {
        Segment {
            index,
            prefix: String::new(),
            start_after: None,
            end: None,
            planned_objects: 0,
            checkpoint: None,
            done: false,
            lease_owner: None,
            lease_until: 0,
            objects_done: 0,
            bytes_done: 0,
            copied: 0,
            fixed: 0,
            in_place: 0,
            skipped: 0,
            failed: 0,
            updated_at: None,
            inventory_file: None,
        }
    }

    fn page(last_key: &str, done: bool) -> Checkpoint {
        Checkpoint {
            last_key: Some(last_key.into()),
            done,
            tally: PageTally {
                objects: 10,
                bytes: 100,
                copied: 10,
                ..PageTally::default()
            },
            lease_until: now_ms() + 60_000,
        }
    }

    #[tokio::test]
    async fn the_memory_store_keeps_leases_and_checkpoints_to_their_holder() {
        let state = MemoryState::default();
        let now = chrono::Utc::now();
        let job = Job {
            rule_id: "r".into(),
            state: JobState::Running,
            planned: true,
            plan_prefix: 1,
            plan_after: None,
            frontier: Vec::new(),
            total_objects: 20,
            total_bytes: 200,
            segments: 1,
            started_at: now,
            updated_at: now,
            completed_at: None,
            last_error: None,
            inventory: None,
            progress: Default::default(),
            claims: Default::default(),
        };
        let mut empty = job.clone();
        empty.segments = 0;
        assert!(state.create_job(&empty).await.unwrap());
        assert!(state.add_segment("r", &segment(0), &job, 0).await.unwrap());
        let t = now_ms();
        // Claimed with the state it has then; a held lease is not claimed again.
        let claimed = state.claim_segment("r", 0, "a", t, t + 50).await.unwrap();
        assert_eq!(claimed.unwrap().lease_owner.as_deref(), Some("a"));
        assert!(
            state
                .claim_segment("r", 0, "b", t, t + 50)
                .await
                .unwrap()
                .is_none()
        );
        // Only the holder extends it or checkpoints.
        assert!(!state.extend_lease("r", 0, "b", t, t + 50).await.unwrap());
        assert!(
            !state
                .checkpoint_segment("r", 0, "b", &page("k10", false))
                .await
                .unwrap()
        );
        assert!(
            state
                .checkpoint_segment("r", 0, "a", &page("k10", false))
                .await
                .unwrap()
        );
        // Run out: neither extended nor checkpointed by its former holder, even before
        // anyone took it over; then taken over with the checkpoint as it stands.
        assert!(state.extend_lease("r", 0, "a", t, t + 1).await.unwrap());
        tokio::time::sleep(Duration::from_millis(5)).await;
        let later = now_ms();
        assert!(
            !state
                .extend_lease("r", 0, "a", later, later + 50)
                .await
                .unwrap()
        );
        assert!(
            !state
                .checkpoint_segment("r", 0, "a", &page("k20", true))
                .await
                .unwrap()
        );
        let taken = state
            .claim_segment("r", 0, "b", later, later + 60_000)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (taken.checkpoint.as_deref(), taken.objects_done),
            (Some("k10"), 10)
        );
        assert!(
            state
                .extend_lease("r", 0, "b", later, later + 60_000)
                .await
                .unwrap()
        );
        assert!(
            state
                .checkpoint_segment("r", 0, "b", &page("k20", true))
                .await
                .unwrap()
        );
        // Done: no checkpoint sets it back or adds to it, nobody claims it.
        assert!(
            !state
                .checkpoint_segment("r", 0, "b", &page("k30", false))
                .await
                .unwrap()
        );
        assert!(
            !state
                .extend_lease("r", 0, "b", later, later + 50)
                .await
                .unwrap()
        );
        let far = later + 120_000;
        assert!(
            state
                .claim_segment("r", 0, "c", far, far + 50)
                .await
                .unwrap()
                .is_none()
        );
        let s = &state.segments("r").await.unwrap()[0];
        assert!(s.done);
        assert_eq!((s.objects_done, s.copied), (20, 20));
        // The job completes once.
        assert!(
            state
                .advance_job("r", JobState::Running, JobState::Completed)
                .await
                .unwrap()
        );
        assert!(
            !state
                .advance_job("r", JobState::Running, JobState::Completed)
                .await
                .unwrap()
        );
        assert!(
            !state
                .advance_job("r", JobState::Pending, JobState::Running)
                .await
                .unwrap()
        );
        assert_eq!(
            state.job("r").await.unwrap().unwrap().state,
            JobState::Completed
        );
    }
}
