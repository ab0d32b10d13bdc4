//! From decoded changes to Kafka records: outbox rows, `pg_logical_emit_message` envelopes and
//! the optional CloudEvents headers.

pub mod cloudevents;
pub mod message;
pub mod outbox;
pub mod record;
