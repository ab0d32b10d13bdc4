//! Test harness: a throwaway PostgreSQL cluster, a throwaway Apache Kafka broker and the relay
//! binary, all real processes on loopback. Everything is torn down on `Drop`, so a failing
//! test leaves nothing behind; on panic the relevant logs are printed to help.
//!
//! Tests run on tokio's current-thread runtime (the crate does not enable the multi-thread
//! one), so nothing here blocks for long: Kafka reads poll librdkafka without waiting, and
//! only server start-up and short metadata calls block.
//!
//! One module per part: `pg` (PostgreSQL), `broker` (Apache Kafka), `reader` (reading it
//! back), `relay` (the process under test), `debezium` (Kafka Connect with Debezium beside it), `cli` (one-shot commands), `events` (writing
//! outbox rows and checking what arrived), `scrape` (HTTP and Prometheus), `pki`
//! (certificates), `proxy` (a cuttable TCP proxy), `murmur` (Java's partitioner), `util`, and `checker` (the
//! reliability suite's writer and checker). Everything is re-exported here, so tests write
//! `common::Pg`.
#![allow(dead_code)] // each test binary uses a different subset of the harness
#![allow(unused_imports)] // likewise for the re-exports

pub mod broker;
pub mod checker;
pub mod cli;
pub mod cluster;
pub mod debezium;
pub mod events;
pub mod murmur;
pub mod pg;
pub mod pki;
pub mod proxy;
pub mod reader;
pub mod relay;
pub mod scrape;
pub mod util;

pub use broker::*;
pub use cli::*;
pub use cluster::*;
pub use debezium::*;
pub use events::*;
pub use murmur::*;
pub use pg::*;
pub use pki::*;
pub use proxy::*;
pub use reader::*;
pub use relay::*;
pub use scrape::*;
pub use util::*;
