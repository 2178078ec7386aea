//! Configuration of the functions, read from the environment in one place.

use crate::copy::CopyEngine;
use crate::error::{Error, Result};
use crate::replicate::ReplicatorSettings;

/// Settings every function needs.
#[derive(Debug, Clone)]
pub struct FunctionConfig {
    /// DynamoDB table holding rules and state (`CRR_TABLE`).
    pub table: String,
    /// Copy engine tuning (`CRR_MULTIPART_THRESHOLD_MB`, `CRR_PART_SIZE_MB`,
    /// `CRR_PARTS_IN_FLIGHT`).
    pub engine: CopyEngine,
    /// Dead-letter queue URL (`CRR_DLQ_URL`); without it, failures go back to SQS only.
    pub dlq_url: Option<String>,
    /// Receives before a failing message is dead-lettered with its reason
    /// (`CRR_MAX_RECEIVES`, default 4; keep it below the queue's maxReceiveCount).
    pub max_receives: u32,
}

impl FunctionConfig {
    /// Settings of the replicate function.
    pub fn replicator(&self) -> ReplicatorSettings {
        ReplicatorSettings {
            engine: self.engine.clone(),
            max_receives: self.max_receives,
            ..ReplicatorSettings::default()
        }
    }
}

impl FunctionConfig {
    /// Reads the configuration; the error names the variable that is missing or wrong.
    pub fn from_env() -> Result<Self> {
        let defaults = CopyEngine::default();
        Ok(Self {
            table: required("CRR_TABLE")?,
            engine: CopyEngine {
                multipart_threshold: optional_mb("CRR_MULTIPART_THRESHOLD_MB")?
                    .unwrap_or(defaults.multipart_threshold),
                part_size: optional_mb("CRR_PART_SIZE_MB")?.unwrap_or(defaults.part_size),
                parts_in_flight: optional_number("CRR_PARTS_IN_FLIGHT")?
                    .map(|n| n as usize)
                    .unwrap_or(defaults.parts_in_flight),
                ..defaults
            },
            dlq_url: std::env::var("CRR_DLQ_URL").ok().filter(|v| !v.is_empty()),
            max_receives: optional_number("CRR_MAX_RECEIVES")?
                .map(|n| n.clamp(1, 1000) as u32)
                .unwrap_or(4),
        })
    }
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
