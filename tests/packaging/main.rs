//! The files users copy (docker/, config/, migrations/) and the docs that explain them (the
//! README, docs/operations.md) stay consistent with the relay. No Docker engine or Kubernetes
//! runs here, so instead of building and starting them this parses each one and checks what a
//! user would notice: the compose stack starts PostgreSQL with logical WAL and mounts files
//! that exist, the relay configs in compose and in the Kubernetes ConfigMap parse with the
//! relay's own parser, probes and ports meet the config, the image runs unprivileged with a
//! health check, the dashboard and alerts name only metrics the relay exports, and the example
//! config names every key with its real default.
//!
//! One module per kind of file: `compose` (docker/*.yaml, Kubernetes), `dockerfile`,
//! `metrics` (dashboard, alerts, documented metrics), `example_config`, `docs` (migrations,
//! README); `files` holds the shared helpers.

mod compose;
mod dockerfile;
mod docs;
mod example_config;
mod files;
mod metrics;
