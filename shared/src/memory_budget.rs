//! One budget per process for the object bytes the copy engine holds in memory.
//!
//! Every copy of a process (the replicate function's batch, the backfill's workers x
//! copies) takes its bytes from one budget: a stream copy reserves the bytes it is about to
//! read *before* it reads them, and gives them back when they are dropped, after the PUT
//! or UploadPart that sent them returned. A copy that finds the budget spent waits for it
//! (in order of arrival) instead of allocating past it. Server-side copies hold no bytes.
//!
//! Size: `CRR_OBJECT_MEMORY_MB` when set; else [`LAMBDA_SHARE_PERCENT`] of the function's
//! memory (`AWS_LAMBDA_FUNCTION_MEMORY_SIZE`, in MB); outside Lambda
//! [`DEFAULT_BUDGET_MB`]. The rest of the function's memory is for the runtime, the SDK's
//! buffers and connections, and the allocator's slack.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Share of a Lambda function's memory (percent) given to object bytes. Half: the process
/// itself (runtime, SDK clients, TLS, connection buffers) takes 20-40 MB, the bytes of a
/// body are briefly held twice while the SDK reassembles a response, and the allocator
/// keeps freed pages for a while; measured with the real binaries (README, "Memory").
pub const LAMBDA_SHARE_PERCENT: u64 = 50;

/// Budget outside Lambda (the CLI's `crr backfill run`, tests), in MiB.
pub const DEFAULT_BUDGET_MB: u64 = 1024;

/// The semaphore counts KiB, so that a u32 of permits reaches 4 TiB.
const UNIT: u64 = 1024;

const MIB: u64 = 1024 * 1024;

/// A byte budget shared by every clone (an `Arc` inside): clone it, never re-create it,
/// to share it.
#[derive(Debug, Clone)]
pub struct MemoryBudget {
    semaphore: Arc<Semaphore>,
    units: u32,
}

impl Default for MemoryBudget {
    fn default() -> Self {
        Self::new(DEFAULT_BUDGET_MB * MIB)
    }
}

impl MemoryBudget {
    /// A budget of `bytes` (at least 1 KiB).
    pub fn new(bytes: u64) -> Self {
        let units = u32::try_from(bytes.div_ceil(UNIT).max(1)).unwrap_or(u32::MAX);
        Self {
            semaphore: Arc::new(Semaphore::new(units as usize)),
            units,
        }
    }

    /// The budget of a Lambda function of `function_mb` MB: [`LAMBDA_SHARE_PERCENT`] of it.
    pub fn for_function_memory(function_mb: u64) -> Self {
        Self::new(function_mb * MIB * LAMBDA_SHARE_PERCENT / 100)
    }

    /// The whole budget, in bytes.
    pub fn bytes(&self) -> u64 {
        u64::from(self.units) * UNIT
    }

    /// Bytes not reserved at this moment.
    pub fn available(&self) -> u64 {
        self.semaphore.available_permits() as u64 * UNIT
    }

    /// KiB units for `bytes`, never more than the whole budget: a request larger than the
    /// budget takes all of it (and so waits for every other holder) rather than waiting
    /// forever.
    fn units_for(&self, bytes: u64) -> u32 {
        u32::try_from(bytes.div_ceil(UNIT))
            .unwrap_or(u32::MAX)
            .min(self.units)
    }

    /// Reserves `bytes`, waiting until they are free (first come, first served).
    pub async fn reserve(&self, bytes: u64) -> Reservation {
        let units = self.units_for(bytes);
        if let Some(reserved) = self.try_reserve(bytes) {
            return reserved;
        }
        let started = std::time::Instant::now();
        // The semaphore is never closed: `acquire` cannot fail.
        let permit = Arc::clone(&self.semaphore)
            .acquire_many_owned(units)
            .await
            .ok();
        tracing::debug!(
            bytes,
            waited_ms = started.elapsed().as_millis() as u64,
            "waited for the memory budget"
        );
        Reservation { _permit: permit }
    }

    /// Reserves `bytes` if they are free now (and nobody is waiting before us).
    pub fn try_reserve(&self, bytes: u64) -> Option<Reservation> {
        let units = self.units_for(bytes);
        Arc::clone(&self.semaphore)
            .try_acquire_many_owned(units)
            .ok()
            .map(|permit| Reservation {
                _permit: Some(permit),
            })
    }
}

/// Bytes reserved from a [`MemoryBudget`], given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    _permit: Option<OwnedSemaphorePermit>,
}

impl Reservation {
    /// A reservation of nothing, for bytes that are outside any budget.
    pub fn none() -> Self {
        Self { _permit: None }
    }
}

/// An object's bytes together with the budget they hold: the budget is given back when
/// they are dropped, after the write that sends them returned.
#[derive(Debug)]
pub struct HeldBytes {
    bytes: Bytes,
    _reservation: Reservation,
}

impl HeldBytes {
    /// `bytes`, holding `reservation` as long as they live here.
    pub fn new(bytes: Bytes, reservation: Reservation) -> Self {
        Self {
            bytes,
            _reservation: reservation,
        }
    }

    /// Bytes counted in no budget (tests, callers that read them by other means).
    pub fn unbudgeted(bytes: Bytes) -> Self {
        Self::new(bytes, Reservation::none())
    }

    /// The bytes (a cheap clone of them for a request: the reservation stays here).
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }
}

impl std::ops::Deref for HeldBytes {
    type Target = Bytes;

    fn deref(&self) -> &Bytes {
        &self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use async_trait::async_trait;

    use crate::copy::{CopyEngine, CopyMethod};
    use crate::memory::{MemoryObjectStore, MemoryWorld};
    use crate::object_store::{ObjectStore, WriteAttrs};
    use crate::rule::CopyMode;
    use crate::testing::intercepted::{Hooks, Intercepted, Write};

    /// Object bytes the copies hold: read from the source (fetch, get) and not yet
    /// written to the target (put, upload_part), with the most ever held at once.
    #[derive(Default)]
    struct Held {
        now: AtomicU64,
        most: AtomicU64,
    }

    impl Held {
        fn add(&self, n: u64) {
            let now = self.now.fetch_add(n, Ordering::SeqCst) + n;
            self.most.fetch_max(now, Ordering::SeqCst);
        }
        fn sub(&self, n: u64) {
            self.now.fetch_sub(n, Ordering::SeqCst);
        }
    }

    /// A memory bucket whose reads and writes take a moment (so that copies overlap),
    /// counting the bytes in flight between them.
    type Watched = Intercepted<MemoryObjectStore, Arc<Held>>;

    async fn a_moment() {
        tokio::time::sleep(Duration::from_millis(3)).await;
    }

    #[async_trait]
    impl Hooks for Arc<Held> {
        async fn read(&self, bytes: u64) {
            self.add(bytes);
            a_moment().await;
        }
        async fn before_write(&self, write: Write, _bytes: u64) {
            if write != Write::PartCopy {
                a_moment().await;
            }
        }
        async fn after_write(&self, write: Write, bytes: u64, _ok: bool) {
            if write != Write::PartCopy {
                self.sub(bytes);
            }
        }
    }

    /// Copies every object of `sizes` (MiB fractions allowed) at once, as a batch or a
    /// backfill page does, through one engine in stream mode; returns the most bytes held
    /// at once and the copy methods used.
    async fn copy_all_at_once(engine: &CopyEngine, sizes: &[u64]) -> (u64, Vec<CopyMethod>) {
        let world = MemoryWorld::default();
        let held = Arc::new(Held::default());
        let source = Watched {
            inner: Arc::new(world.store("src")),
            hooks: held.clone(),
        };
        let target = Watched {
            inner: Arc::new(world.store("dst")),
            hooks: held.clone(),
        };
        for (i, size) in sizes.iter().enumerate() {
            let data = vec![i as u8; *size as usize];
            source
                .inner
                .put(&format!("k{i}"), Bytes::from(data), &WriteAttrs::default())
                .await
                .unwrap();
        }
        let mut rule = crate::rule::tests::rule("r1", "src", "dst");
        rule.copy_mode = CopyMode::Stream;
        rule.copy_acl = false;
        let copies = (0..sizes.len()).map(|i| {
            let (rule, source, target) = (&rule, &source, &target);
            async move {
                let key = format!("k{i}");
                let (info, body) = engine
                    .read_source(rule, source, &key)
                    .await
                    .unwrap()
                    .unwrap();
                let done = engine
                    .copy_for_rule(
                        rule,
                        source,
                        target,
                        &info,
                        body,
                        None,
                        crate::resumable::CopyRun::unbounded(),
                    )
                    .await
                    .unwrap();
                assert_eq!(target.inner.bytes(&key), source.inner.bytes(&key));
                done.method
            }
        });
        let methods = futures::future::join_all(copies).await;
        assert_eq!(held.now.load(Ordering::SeqCst), 0);
        (held.most.load(Ordering::SeqCst), methods)
    }

    fn engine(budget: u64) -> CopyEngine {
        CopyEngine {
            multipart_threshold: 6 * MIB,
            part_size: 5 * MIB,
            parts_in_flight: 4,
            memory: MemoryBudget::new(budget),
            ..CopyEngine::default()
        }
    }

    #[tokio::test]
    async fn concurrent_copies_never_hold_more_than_the_budget() {
        // Ten copies at once: 8 MiB of single objects and 21 MiB in parts, against a
        // budget of 6 MiB.
        let mut sizes = vec![MIB; 8];
        sizes.extend([10 * MIB + 5, 11 * MIB]);
        let (most, methods) = copy_all_at_once(&engine(6 * MIB), &sizes).await;
        assert!(most <= 6 * MIB, "held {most} bytes at once");
        // The budget was used, not just a copy at a time.
        assert!(most > 3 * MIB, "held only {most} bytes at once");
        assert!(methods.contains(&CopyMethod::StreamSingle));
        assert!(methods.contains(&CopyMethod::StreamMultipart));
        // Without the budget the same copies hold far more (the test can fail).
        let (unbounded, _) = copy_all_at_once(&engine(1 << 40), &sizes).await;
        assert!(unbounded > 12 * MIB, "held {unbounded} bytes at once");
    }

    #[tokio::test]
    async fn an_object_or_part_larger_than_the_budget_still_completes_alone() {
        // A 6 MiB single object, and 5 MiB parts, with a budget of 4 MiB: each takes all of
        // it in turn.
        let (most, methods) =
            copy_all_at_once(&engine(4 * MIB), &[6 * MIB, 11 * MIB, MIB, 2 * MIB]).await;
        assert_eq!(
            methods,
            [
                CopyMethod::StreamSingle,
                CopyMethod::StreamMultipart,
                CopyMethod::StreamSingle,
                CopyMethod::StreamSingle
            ]
        );
        assert!(most <= 6 * MIB, "held {most} bytes at once");
    }

    #[test]
    fn the_budget_is_a_share_of_the_function_memory() {
        assert_eq!(
            MemoryBudget::for_function_memory(512).bytes(),
            512 * MIB * LAMBDA_SHARE_PERCENT / 100
        );
        assert_eq!(MemoryBudget::default().bytes(), DEFAULT_BUDGET_MB * MIB);
        // Rounded up to whole KiB, never empty.
        assert_eq!(MemoryBudget::new(1).bytes(), 1024);
        assert_eq!(MemoryBudget::new(0).bytes(), 1024);
    }

    #[tokio::test]
    async fn reservations_wait_for_the_bytes_and_give_them_back_when_dropped() {
        let budget = MemoryBudget::new(10 * MIB);
        let a = budget.reserve(6 * MIB).await;
        assert_eq!(budget.available(), 4 * MIB);
        assert!(budget.try_reserve(5 * MIB).is_none());
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.reserve(5 * MIB).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        // A waiter is served first: later small requests do not overtake it.
        assert!(budget.try_reserve(MIB).is_none());
        drop(a);
        let b = waiting.await.unwrap();
        assert_eq!(budget.available(), 5 * MIB);
        drop(b);
        assert_eq!(budget.available(), 10 * MIB);
    }

    #[tokio::test]
    async fn a_request_larger_than_the_budget_takes_all_of_it() {
        let budget = MemoryBudget::new(4 * MIB);
        let all = budget.reserve(100 * MIB).await;
        assert_eq!(budget.available(), 0);
        drop(all);
        let held = HeldBytes::new(Bytes::from_static(b"abc"), budget.reserve(3).await);
        assert_eq!(budget.available(), 4 * MIB - 1024);
        assert_eq!(&held[..], b"abc");
        drop(held);
        assert_eq!(budget.available(), 4 * MIB);
    }
}
