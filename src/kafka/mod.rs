//! Everything that talks to Kafka: the producer, its delivery reports, what becomes of the
//! records Kafka refuses (the dead-letter topic), exactly-once transactions, the position
//! they store and read back, and why the brokers may not be acknowledging.

pub mod dead_letter;
mod delivery;
pub mod exactly_once;
pub mod position;
pub mod producer;
pub mod replicas;
