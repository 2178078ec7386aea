//! Test support shared by the library's unit tests and the integration tests (the
//! `testing` feature), kept out of the Lambda binaries.

pub mod intercepted;
