//! Bootstrap: everything that makes a write model to capture, and starts the capture.
//!
//! - [`setup`]: database, schema, capture role and publication (idempotent).
//! - [`workload`]: the sample write workload, also the load generator of the benchmarks.
//! - [`connector`]: the Debezium connector's config and its registration with Kafka Connect.

pub mod connector;
pub mod setup;
pub mod workload;
