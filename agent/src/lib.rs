//! `kernex-agent`: runs on every appliance. Enrolls with the bootstrap token on first start,
//! heartbeats with telemetry, runs the commands the control plane queues.
//!
//! A library plus a thin `main`, so tests call [`runner::run`] and friends directly.

pub mod backoff;
pub mod cli;
pub mod client;
pub mod deploy;
pub mod deployments;
pub mod extract;
pub mod identity;
pub mod log;
pub mod runner;
pub mod state;
pub mod telemetry;

/// Reported in heartbeats and `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
