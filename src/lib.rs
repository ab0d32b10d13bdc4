//! outbox-relay: tails a PostgreSQL logical replication slot (pgoutput) and publishes every
//! committed outbox insert to Kafka, confirming the slot only after Kafka acknowledged it.
#![deny(missing_docs)]

pub mod ack;
pub mod check;
pub mod cloudevents;
pub mod config;
pub mod exactly_once;
pub mod fxhash;
pub mod handover;
pub mod http;
pub mod lsn;
pub mod message;
pub mod metrics;
pub mod outbox;
pub mod pgconn;
pub mod pgoutput;
pub mod publisher;
pub mod relay;
pub mod replication;
pub mod setup;
pub mod snapshot;
pub mod status;
