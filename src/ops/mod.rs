//! What operators touch: the `check` and `status` commands, the HTTP endpoint and its metrics.

pub mod check;
pub mod http;
pub mod metrics;
pub mod status;
