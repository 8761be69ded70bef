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
pub mod webhooks;

/// Sets up logging to stderr: `KERNEX_LOG` is an env-filter (default `info`); the format is
/// `KERNEX_LOG_FORMAT` (`json` or `text`), by default readable text on a terminal and one JSON
/// object per line otherwise (journald, containers, files), each line with its request's span
/// (`id`, `method`, `route`) when it was written while handling a request.
pub fn init_logging() {
    use std::io::IsTerminal as _;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("KERNEX_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let json = match std::env::var("KERNEX_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") => false,
        _ => !std::io::stderr().is_terminal(),
    };
    if json {
        builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init();
    } else {
        builder.init();
    }
}
