//! The outside world's implementations of the ports (`crate::ports`): AWS services at
//! the edge. Adapters move here from the feature files as they are touched.

pub mod aws_clients;
pub mod compat;
pub mod s3;
pub mod sqs;
