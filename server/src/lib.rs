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
pub mod metrics;
pub mod preauthorize;
pub mod rollout;
pub mod samples;
pub mod serve;
pub mod store;
pub mod webhooks;

/// Sets up logging to stderr: `KERNEX_LOG` is an env-filter (default `info`); the format is
/// `KERNEX_LOG_FORMAT` (`json` or `text`), by default readable text on a terminal and one JSON
/// object per line otherwise (journald, containers, files), each line with its request's span
/// (`id`, `method`, `route`) when it was written while handling a request.
///
/// Traces go to an OTLP collector (HTTP, JSON) only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set: spans of requests and of the database calls made
/// for them. Keep the returned guard alive: dropping it flushes the spans not yet sent.
pub fn init_logging() -> TracingGuard {
    use std::io::IsTerminal as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::{EnvFilter, Layer as _};
    let filter = EnvFilter::try_from_env("KERNEX_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match std::env::var("KERNEX_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") => false,
        _ => !std::io::stderr().is_terminal(),
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json()
            .with_current_span(true)
            .with_span_list(false)
            .boxed()
    } else {
        fmt.boxed()
    };
    let (otel, provider, otel_error) = match otlp_tracer() {
        Ok(Some((provider, tracer))) => (
            Some(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(EnvFilter::new("info")),
            ),
            Some(provider),
            None,
        ),
        Ok(None) => (None, None, None),
        Err(e) => (None, None, Some(e)),
    };
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .init();
    if let Some(e) = otel_error {
        tracing::error!(error = %e, "OTLP traces disabled: the exporter could not be set up");
    }
    TracingGuard(provider)
}

/// Flushes and stops the trace exporter when dropped.
#[derive(Debug)]
pub struct TracingGuard(Option<opentelemetry_sdk::trace::SdkTracerProvider>);

impl Drop for TracingGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.0.take() {
            let _ = provider.shutdown();
        }
    }
}

type Tracer = opentelemetry_sdk::trace::Tracer;

/// The OTLP tracer when an endpoint is configured in the environment.
fn otlp_tracer() -> anyhow::Result<Option<(opentelemetry_sdk::trace::SdkTracerProvider, Tracer)>> {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig as _;
    let configured = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|var| std::env::var_os(var).is_some_and(|v| !v.is_empty()));
    if !configured {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpJson)
        .build()?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("kernex-server");
    }
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer("kernex-server");
    Ok(Some((provider, tracer)))
}
