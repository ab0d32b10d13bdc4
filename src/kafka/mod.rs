//! Everything that talks to Kafka: the producer and its delivery reports, and exactly-once
//! transactions with their stored position.

pub mod exactly_once;
pub mod producer;
