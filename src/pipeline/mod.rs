//! Running the stages: start-up and provisioning, the initial snapshot, the streaming session,
//! handing records to the producer and tracking their acknowledgements back to the slot.

pub mod ack;
mod end;
pub mod handover;
mod monitor;
mod output;
mod release;
pub mod run;
pub mod session;
pub mod setup;
pub mod snapshot;
mod stop;
