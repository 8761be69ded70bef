//! `kernex-server`: the Kernex control plane as a library, so tests can build the router and drive
//! it without a socket. `main.rs` only parses arguments and calls [`cli::run`].

pub mod api;
pub mod backup;
pub mod cli;
pub mod console;
pub mod db;
pub mod device_token;
pub mod error;
pub mod heartbeat;
pub mod logging;
pub mod metrics;
pub mod preauthorize;
pub mod rollout;
pub mod samples;
pub mod serve;
pub mod store;
pub mod webhooks;

pub use logging::{init_logging, TracingGuard};
