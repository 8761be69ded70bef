//! `kernex-server`: the Kernex control plane as a library, so tests can build the router and drive
//! it without a socket. `main.rs` only parses arguments and calls [`cli::run`].

pub mod api;
pub mod cli;
pub mod db;
pub mod device_token;
pub mod error;
pub mod heartbeat;
pub mod metrics;
pub mod preauthorize;
pub mod rollout;
pub mod serve;
pub mod store;

/// Sets up logging: `KERNEX_LOG` (an env-filter, default `info`) and `KERNEX_LOG_FORMAT=json` for
/// one JSON object per line.
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("KERNEX_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("KERNEX_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}
