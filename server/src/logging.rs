//! Logs to stderr and, when configured, traces to an OTLP collector.
//!
//! Every log line written while a request is served names that request (`id`, `method`, `route`),
//! down to the database errors. The request is not a tracing span: it is the task-local
//! [`RequestContext`] that `api::record_request` sets, and [`WithRequest`] writes it into the line
//! when one is written. A span per request would cost every request the formatting of its fields
//! (the fmt layer formats a span's fields when the span is created, whatever is logged later): a
//! tenth of a heartbeat's CPU time. Only when traces are exported does a request get a span.

use crate::api::RequestContext;
use std::sync::atomic::{AtomicBool, Ordering};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Whether spans go to an OTLP collector (set once by [`init_logging`]).
static EXPORTING_TRACES: AtomicBool = AtomicBool::new(false);

/// True when request spans are exported: only then are they worth creating.
pub fn exporting_traces() -> bool {
    EXPORTING_TRACES.load(Ordering::Relaxed)
}

/// Sets up logging to stderr: `KERNEX_LOG` is an env-filter (default `info`); the format is
/// `KERNEX_LOG_FORMAT` (`json` or `text`), by default readable text on a terminal and one JSON
/// object per line otherwise (journald, containers, files). A line written while a request is
/// served carries it: `"span": {"name": "request", "id", "method", "route"}` in JSON,
/// `request{id=… method=… route=…}:` before the target in text.
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
        fmt.event_format(WithRequest {
            inner: tracing_subscriber::fmt::format()
                .json()
                .with_current_span(false)
                .with_span_list(false),
            json: true,
        })
        .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
        .boxed()
    } else {
        fmt.event_format(WithRequest {
            inner: tracing_subscriber::fmt::format(),
            json: false,
        })
        .boxed()
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
    EXPORTING_TRACES.store(otel.is_some(), Ordering::Relaxed);
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .init();
    if let Some(e) = otel_error {
        tracing::error!(error = %e, "OTLP traces disabled: the exporter could not be set up");
    }
    TracingGuard(provider)
}

/// A line format that adds the request being served (if any) to what `inner` writes.
struct WithRequest<F> {
    inner: F,
    /// `inner` writes one JSON object per line (else readable text).
    json: bool,
}

impl<S, N, F> FormatEvent<S, N> for WithRequest<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let Some(request) = RequestContext::with_current(RequestLabel::of) else {
            return self.inner.format_event(ctx, writer, event);
        };
        // Written to a buffer first, to put the request in: such a line loses its colours on a
        // terminal (the buffer's writer cannot be told to keep them).
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        let line = if self.json {
            request.into_json(&line)
        } else {
            request.into_text(&line, event.metadata().target())
        };
        writer.write_str(&line)
    }
}

/// What a log line says of its request.
struct RequestLabel {
    id: String,
    method: String,
    route: String,
}

impl RequestLabel {
    fn of(context: &RequestContext) -> RequestLabel {
        RequestLabel {
            id: context.id.to_string(),
            method: context.method.to_string(),
            route: context
                .route
                .as_ref()
                .map_or("unmatched", |r| r.as_str())
                .to_owned(),
        }
    }

    /// Adds `"span": {...}` as the object's last member (the line is one JSON object and a newline).
    fn into_json(self, line: &str) -> String {
        let body = line.trim_end();
        let Some(open) = body.strip_suffix('}') else {
            return line.to_owned(); // not an object: left as it is rather than broken
        };
        let span = serde_json::json!({
            "name": "request",
            "id": self.id,
            "method": self.method,
            "route": self.route,
        });
        let separator = if open.trim_end().ends_with('{') {
            ""
        } else {
            ","
        };
        format!("{open}{separator}\"span\":{span}}}\n")
    }

    /// Puts `request{id=… method=… route=…}: ` before the target, where text lines show spans.
    fn into_text(self, line: &str, target: &str) -> String {
        let label = format!(
            "request{{id={} method={} route={}}}: ",
            self.id, self.method, self.route
        );
        match line.find(target) {
            Some(at) => format!("{}{label}{}", &line[..at], &line[at..]),
            None => format!("{label}{line}"),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn label() -> RequestLabel {
        RequestLabel {
            id: "0123456789abcdef".into(),
            method: "POST".into(),
            route: "/api/v1/enroll".into(),
        }
    }

    #[test]
    fn a_json_line_gets_the_request_as_its_last_member() {
        let line = "{\"timestamp\":\"t\",\"level\":\"INFO\",\"fields\":{\"message\":\"m\"}}\n";
        let out: serde_json::Value = serde_json::from_str(&label().into_json(line)).unwrap();
        assert_eq!(out["fields"]["message"], "m");
        assert_eq!(out["span"]["id"], "0123456789abcdef");
        assert_eq!(out["span"]["route"], "/api/v1/enroll");
        assert_eq!(out["span"]["name"], "request");
        assert_eq!(label().into_json("{}\n"), "{\"span\":{\"id\":\"0123456789abcdef\",\"method\":\"POST\",\"name\":\"request\",\"route\":\"/api/v1/enroll\"}}\n");
    }

    #[test]
    fn a_text_line_names_the_request_before_its_target() {
        let line = "2026-11-23T15:00:00Z  INFO kernex_server::api: request refused status=403\n";
        assert_eq!(
            label().into_text(line, "kernex_server::api"),
            "2026-11-23T15:00:00Z  INFO request{id=0123456789abcdef method=POST route=/api/v1/enroll}: kernex_server::api: request refused status=403\n"
        );
    }
}
