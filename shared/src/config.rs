//! Configuration of the functions, read from the environment in one place.

use std::time::Duration;

use crate::allowed::{AllowedBuckets, AllowedEndpoints};
use crate::backfill::BackfillSettings;
use crate::copy::CopyEngine;
use crate::error::{Error, Result};
use crate::memory_budget::MemoryBudget;
use crate::replicate::ReplicatorSettings;

/// Settings every function needs.
#[derive(Debug, Clone)]
pub struct FunctionConfig {
    /// DynamoDB table holding rules and state (`CRR_TABLE`).
    pub table: String,
    /// Copy engine tuning (`CRR_MULTIPART_THRESHOLD_MB`, `CRR_SERVER_SIDE_THRESHOLD_MB`,
    /// `CRR_PART_SIZE_MB`, `CRR_PARTS_IN_FLIGHT`, `CRR_STREAM_MEMORY_MB`), and the process's
    /// memory budget for object bytes (see `object_memory`).
    pub engine: CopyEngine,
    /// Dead-letter queue URL (`CRR_DLQ_URL`); without it, failures go back to SQS only.
    pub dlq_url: Option<String>,
    /// Receives before a failing message is dead-lettered with its reason
    /// (`CRR_MAX_RECEIVES`, default 4; keep it below the queue's maxReceiveCount).
    pub max_receives: u32,
    /// The event queue (`CRR_QUEUE_URL`): the replicate function sends a message whose
    /// large copy continues back to it (`resumable.rs`).
    pub queue_url: Option<String>,
}

impl FunctionConfig {
    /// Settings of the backfill function (`CRR_BACKFILL_PAGE_SIZE`,
    /// `CRR_BACKFILL_SEGMENT_OBJECTS`, `CRR_BACKFILL_LISTERS`, `CRR_BACKFILL_WORKERS`,
    /// `CRR_BACKFILL_COPY_CONCURRENCY`,
    /// `CRR_BACKFILL_LEASE_SECS`, `CRR_BACKFILL_MARGIN_SECS`).
    pub fn backfill() -> Result<BackfillSettings> {
        let d = BackfillSettings::default();
        Ok(BackfillSettings {
            page_size: optional_number("CRR_BACKFILL_PAGE_SIZE")?
                .map(|n| n.clamp(1, 1000) as i32)
                .unwrap_or(d.page_size),
            segment_objects: optional_number("CRR_BACKFILL_SEGMENT_OBJECTS")?
                .map(|n| n.max(1))
                .unwrap_or(d.segment_objects),
            listers: optional_number("CRR_BACKFILL_LISTERS")?
                .map(|n| n.clamp(1, 256) as usize)
                .unwrap_or(d.listers),
            workers: optional_number("CRR_BACKFILL_WORKERS")?
                .map(|n| n.clamp(1, 64) as usize)
                .unwrap_or(d.workers),
            copy_concurrency: optional_number("CRR_BACKFILL_COPY_CONCURRENCY")?
                .map(|n| n.clamp(1, 256) as usize)
                .unwrap_or(d.copy_concurrency),
            lease: optional_number("CRR_BACKFILL_LEASE_SECS")?
                .map(Duration::from_secs)
                .unwrap_or(d.lease),
            margin: optional_number("CRR_BACKFILL_MARGIN_SECS")?
                .map(Duration::from_secs)
                .unwrap_or(d.margin),
            requeue_after: optional_number("CRR_BACKFILL_REQUEUE_SECS")?
                .map(Duration::from_secs)
                .unwrap_or(d.requeue_after),
            allowed: AllowedBuckets::from_env(),
        })
    }

    /// The backfill's segment queue (`CRR_SEGMENT_QUEUE_URL`): when set, the backfill fans
    /// out (`backfill::fanout`): the schedule coordinates and segment messages do the work.
    pub fn segment_queue_url() -> Option<String> {
        std::env::var("CRR_SEGMENT_QUEUE_URL")
            .ok()
            .filter(|v| !v.is_empty())
    }

    /// Settings of the status function: the event queue to watch (`CRR_QUEUE_URL`) and the
    /// settle time of `synced_up_to` (`CRR_STATUS_SETTLE_SECS`, see `status.rs`).
    pub fn status() -> Result<StatusSettings> {
        Ok(StatusSettings {
            queue_url: std::env::var("CRR_QUEUE_URL")
                .ok()
                .filter(|v| !v.is_empty()),
            settle: optional_number("CRR_STATUS_SETTLE_SECS")?
                .map(Duration::from_secs)
                .unwrap_or(crate::status::DEFAULT_SETTLE),
        })
    }

    /// Settings of the replicate function.
    pub fn replicator(&self) -> ReplicatorSettings {
        ReplicatorSettings {
            engine: self.engine.clone(),
            max_receives: self.max_receives,
            allowed: AllowedBuckets::from_env(),
            ..ReplicatorSettings::default()
        }
    }
}

/// What a function's environment must hold in a deployment (binary name, variables):
/// `infra/template.yaml` is checked against it by `tests/iam.rs`, along with the rule that
/// every `CRR_*` variable the template sets is one the code reads.
pub const DEPLOYMENT_ENV: &[(&str, &[&str])] = &[
    (
        "crr-replicate",
        &[
            "CRR_TABLE",
            "CRR_DLQ_URL",
            "CRR_QUEUE_URL",
            "CRR_MAX_RECEIVES",
            "CRR_SOURCE_BUCKETS",
            "CRR_TARGET_BUCKETS",
            "CRR_ALLOWED_ENDPOINTS",
        ],
    ),
    (
        "crr-backfill",
        &[
            "CRR_TABLE",
            "CRR_SEGMENT_QUEUE_URL",
            "CRR_SOURCE_BUCKETS",
            "CRR_TARGET_BUCKETS",
            "CRR_ALLOWED_ENDPOINTS",
        ],
    ),
    (
        "crr-status",
        &[
            "CRR_TABLE",
            "CRR_QUEUE_URL",
            "CRR_DLQ_URL",
            "CRR_STATUS_SETTLE_SECS",
            "CRR_SOURCE_BUCKETS",
            "CRR_TARGET_BUCKETS",
            "CRR_ALLOWED_ENDPOINTS",
        ],
    ),
];

/// Settings of the status function.
#[derive(Debug, Clone)]
pub struct StatusSettings {
    pub queue_url: Option<String>,
    pub settle: Duration,
}

impl FunctionConfig {
    /// Reads the configuration; the error names the variable that is missing or wrong.
    pub fn from_env() -> Result<Self> {
        let defaults = CopyEngine::default();
        // A deployment never runs with an entry that does not parse (it would allow nothing).
        AllowedEndpoints::parse(&std::env::var("CRR_ALLOWED_ENDPOINTS").unwrap_or_default())?;
        Ok(Self {
            table: required("CRR_TABLE")?,
            engine: CopyEngine {
                multipart_threshold: optional_mb("CRR_MULTIPART_THRESHOLD_MB")?
                    .unwrap_or(defaults.multipart_threshold),
                server_side_threshold: optional_mb("CRR_SERVER_SIDE_THRESHOLD_MB")?
                    .unwrap_or(defaults.server_side_threshold),
                part_size: optional_mb("CRR_PART_SIZE_MB")?.unwrap_or(defaults.part_size),
                parts_in_flight: optional_number("CRR_PARTS_IN_FLIGHT")?
                    .map(|n| n as usize)
                    .unwrap_or(defaults.parts_in_flight),
                stream_memory: optional_mb("CRR_STREAM_MEMORY_MB")?
                    .unwrap_or(defaults.stream_memory),
                memory: object_memory()?,
                ..defaults
            },
            dlq_url: std::env::var("CRR_DLQ_URL").ok().filter(|v| !v.is_empty()),
            max_receives: optional_number("CRR_MAX_RECEIVES")?
                .map(|n| n.clamp(1, 1000) as u32)
                .unwrap_or(4),
            queue_url: std::env::var("CRR_QUEUE_URL")
                .ok()
                .filter(|v| !v.is_empty()),
        })
    }
}

/// The process's budget for object bytes: `CRR_OBJECT_MEMORY_MB` when set, else a fixed
/// share of the Lambda function's memory (`AWS_LAMBDA_FUNCTION_MEMORY_SIZE`, MB; see
/// `memory_budget::LAMBDA_SHARE_PERCENT`), else (outside Lambda) the default. Call it
/// once per process and share the result: two budgets are two limits.
pub fn object_memory() -> Result<MemoryBudget> {
    if let Some(mb) = optional_number("CRR_OBJECT_MEMORY_MB")? {
        return Ok(MemoryBudget::new(mb.max(1) * 1024 * 1024));
    }
    Ok(match optional_number("AWS_LAMBDA_FUNCTION_MEMORY_SIZE")? {
        Some(mb) => MemoryBudget::for_function_memory(mb),
        None => MemoryBudget::default(),
    })
}

/// A variable that must be set.
pub fn required(name: &str) -> Result<String> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => Ok(v),
        _ => Err(Error::Config(format!(
            "environment variable {name} is not set"
        ))),
    }
}

fn optional_number(name: &str) -> Result<Option<u64>> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v.parse::<u64>().map(Some).map_err(|_| {
            Error::Config(format!(
                "environment variable {name}='{v}' is not a whole number"
            ))
        }),
        _ => Ok(None),
    }
}

fn optional_mb(name: &str) -> Result<Option<u64>> {
    Ok(optional_number(name)?.map(|mb| mb * 1024 * 1024))
}
