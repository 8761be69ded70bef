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
pub mod process;
pub mod runner;
pub mod selfupdate;
pub mod state;
pub mod telemetry;
pub mod vm_endpoint;
pub mod vm_links;

/// Reported in heartbeats and `--version`; what a self-update compares against. The package
/// version unless `KERNEX_AGENT_VERSION` is set at build time (release builds stamp their own;
/// the self-update tests build a second agent that is really newer).
pub const VERSION: &str = match option_env!("KERNEX_AGENT_VERSION") {
    Some(version) => version,
    None => env!("CARGO_PKG_VERSION"),
};
