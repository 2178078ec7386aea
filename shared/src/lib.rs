//! crr-shared: the core of crr, serverless cross-region replication for S3 buckets.
//!
//! One module per concept: [`rule`] (model and validation), [`event`] (incoming event
//! shapes), [`filter`] (the copy/delete/skip decision), [`copy`] (the copy engine),
//! [`replicate`] (the real-time handler), [`rule_admin`] (creating and removing rules),
//! [`notification`] (source bucket notifications). AWS sits behind two traits,
//! [`object_store::ObjectStore`] and [`state::RuleStore`], implemented in [`s3`] and
//! [`dynamo`] for AWS and in [`memory`] for tests.

pub mod adapters;
pub mod allowed;
pub mod backfill;
pub mod checksum;
pub mod config;
pub mod copy;
pub mod dead_letter;
pub mod deployment;
pub mod dynamo;
pub mod error;
pub mod event;
pub mod failure_reason;
pub mod filter;
pub mod key;
pub mod ledger;
pub mod memory;
pub mod memory_budget;
pub mod metrics;
pub mod notification;
pub mod object_store;
pub mod ports;
pub mod rate_limit;
pub mod replicate;
pub mod resumable;
pub mod retry;
pub mod rule;
pub mod rule_admin;
pub mod series;
pub mod state;
pub mod status;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod verify;

pub use error::{Error, Result};
