//! Everything that talks to PostgreSQL: reaching the server, the replication protocol and the
//! pgoutput decoder, the slot and publication catalogs with the rules about them, the
//! high-availability settings a failover slot needs, and how a failed request is sorted into
//! retry or stop.

pub mod catalog;
pub mod connect;
pub mod errors;
pub mod ha;
pub mod pgoutput;
pub mod replication;
