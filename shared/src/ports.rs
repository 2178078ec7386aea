//! The ports: what the core needs from the outside world, as small traits, with their
//! AWS implementations in `crate::adapters` and in-memory ones for tests. Traits move
//! here from the feature files as they are touched.

use async_trait::async_trait;

use crate::backfill::SegmentWork;
use crate::error::Result;

/// Where the backfill's workable segments wait for an invocation to work on them (the
/// segment queue, consumed through an SQS event source mapping).
#[async_trait]
pub trait SegmentQueue: Send + Sync {
    /// Sends one message per segment (any number: batched as the queue allows).
    async fn send(&self, work: &[SegmentWork]) -> Result<()>;
}
