//! cdc-cqrs: keeps MongoDB read models exactly in step with a PostgreSQL write model.
//!
//! Changes flow one way: PostgreSQL WAL -> Debezium (Kafka Connect) -> Kafka topics -> the stream jobs ->
//! MongoDB. This crate holds what the binaries share: configuration, the Postgres and Kafka clients set up
//! the way every part needs them, and the bootstrap logic (schema, sample workload, connector).

pub mod bootstrap;
pub mod cli;
pub mod compaction;
pub mod config;
pub mod dead_letter;
pub mod envelope;
pub mod feed;
pub mod handoff;
pub mod health;
pub mod kafka;
pub mod metrics;
pub mod postgres;
pub mod projection;
pub mod readmodel;
pub mod rows;
pub mod runtime;
pub mod service;
pub mod sink;
pub mod telemetry;
pub mod verify;
