//! outbox-relay: tails a PostgreSQL logical replication slot (pgoutput) and publishes every
//! committed outbox insert to Kafka, confirming the slot only after Kafka acknowledged it.
//!
//! The modules follow the pipeline: [`postgres`] reads the slot, [`mapping`] turns rows and
//! messages into records, [`kafka`] publishes them, [`pipeline`] runs the stages and feeds the
//! confirmed LSN back, [`ops`] is what operators touch (`check`, `status`, HTTP, metrics) and
//! [`config`] is the TOML they write. Dependencies point down this list, never back up.
#![deny(missing_docs)]

pub mod config;
pub mod fxhash;
pub mod kafka;
pub mod lsn;
pub mod mapping;
pub mod ops;
pub mod pipeline;
pub mod postgres;
