//! From decoded changes to Kafka records: outbox rows, `pg_logical_emit_message` envelopes,
//! the optional CloudEvents headers and the optional Debezium JSON envelope of key and value.

pub mod cloudevents;
pub mod debezium;
pub mod message;
pub mod outbox;
pub mod record;
