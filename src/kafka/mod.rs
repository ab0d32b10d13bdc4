//! Everything that talks to Kafka: the producer and its delivery reports, exactly-once
//! transactions, and the position they store and read back.

pub mod exactly_once;
pub mod position;
pub mod producer;
