//! Everything that talks to PostgreSQL: reaching the server, the replication protocol and the
//! pgoutput decoder.

pub mod connect;
pub mod pgoutput;
pub mod replication;
