//! Templates (compiled into the binary, HTML-escaped by default) and the console's error page.

use super::ConsoleSession;
use crate::error::ApiError;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use minijinja::Environment;
use serde_json::{json, Value};

static TEMPLATES: std::sync::LazyLock<Environment<'static>> = std::sync::LazyLock::new(|| {
    let mut env = Environment::new();
    // Pages share templates whose optional parts (a form's values, an error) are often absent.
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Chainable);
    env.add_filter("bytes", human_bytes);
    // `.html` names turn on HTML escaping of every `{{ }}`.
    for (name, source) in [
        ("base.html", include_str!("templates/base.html")),
        ("login.html", include_str!("templates/login.html")),
        ("error.html", include_str!("templates/error.html")),
        ("devices.html", include_str!("templates/devices.html")),
        ("device.html", include_str!("templates/device.html")),
        ("tokens.html", include_str!("templates/tokens.html")),
        ("bundles.html", include_str!("templates/bundles.html")),
        (
            "deployments.html",
            include_str!("templates/deployments.html"),
        ),
        ("deployment.html", include_str!("templates/deployment.html")),
        ("audit.html", include_str!("templates/audit.html")),
        ("tenant.html", include_str!("templates/tenant.html")),
    ] {
        // A template that does not parse is a bug caught by `every_template_parses`.
        if let Err(e) = env.add_template(name, source) {
            tracing::error!(template = name, error = %e, "console template does not parse");
        }
    }
    env
});

/// Renders `template` with `context`, plus what every page shows: who is logged in, the CSRF
/// token for its forms, the request id.
pub fn page(
    template: &str,
    session: Option<&ConsoleSession>,
    status: StatusCode,
    mut context: Value,
) -> Response {
    if let (Some(object), Some(session)) = (context.as_object_mut(), session) {
        let p = session.principal();
        object.insert(
            "me".into(),
            json!({"actor": p.actor, "role": p.role.as_str(), "tenant": p.tenant_name}),
        );
        object.insert("csrf".into(), json!(session.session.csrf));
    }
    if let Some(object) = context.as_object_mut() {
        object.insert(
            "request_id".into(),
            json!(crate::api::RequestContext::current().map(|c| c.id.to_string())),
        );
    }
    let rendered = TEMPLATES
        .get_template(template)
        .and_then(|t| t.render(&context));
    match rendered {
        Ok(html) => (status, Html(html)).into_response(),
        Err(e) => {
            tracing::error!(template, error = %e, "rendering a console page failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Html("<h1>internal error</h1>"),
            )
                .into_response()
        }
    }
}

pub fn login(next: &str, error: Option<&str>, status: StatusCode) -> Response {
    page(
        "login.html",
        None,
        status,
        json!({"next": next, "error": error}),
    )
}

/// An API error shown as a page, with the status the API would have answered.
#[derive(Debug)]
pub struct PageError {
    pub error: ApiError,
    /// Who is logged in, for the page's header (boxed: errors travel through many `Result`s).
    pub session: Option<Box<ConsoleSession>>,
}

impl From<ApiError> for PageError {
    fn from(error: ApiError) -> PageError {
        PageError {
            error,
            session: None,
        }
    }
}

impl From<sqlx::Error> for PageError {
    fn from(error: sqlx::Error) -> PageError {
        PageError::from(ApiError::from(error))
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(err) = &self.error {
            tracing::error!(error = ?err, "internal error");
        }
        let status = self.error.status();
        let mut response = page(
            "error.html",
            self.session.as_deref(),
            status,
            json!({
                "status": status.as_u16(),
                "reason": status.canonical_reason(),
                "code": self.error.code(),
                "message": self.error.to_string(),
            }),
        );
        if let Some(seconds) = self.error.retry_after() {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(seconds),
            );
        }
        response
    }
}

/// `1536` → `1.5 KiB`.
fn human_bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// SVG polyline points for a sparkline of percentages, `width` × `height` pixels.
pub fn sparkline(values: &[u8], width: f64, height: f64) -> String {
    match values.len() {
        0 => String::new(),
        1 => {
            let y = height - f64::from(values[0]) / 100.0 * height;
            format!("0,{y:.1} {width:.1},{y:.1}")
        }
        n => values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let x = i as f64 * width / (n - 1) as f64;
                let y = height - f64::from(*v) / 100.0 * height;
                format!("{x:.1},{y:.1}")
            })
            .collect::<Vec<_>>()
            .join(" "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_parses() {
        for name in [
            "base.html",
            "login.html",
            "error.html",
            "devices.html",
            "device.html",
            "tokens.html",
            "bundles.html",
            "deployments.html",
            "deployment.html",
            "audit.html",
            "tenant.html",
        ] {
            TEMPLATES
                .get_template(name)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn every_template_renders_without_data() {
        for name in TEMPLATES.templates().map(|(name, _)| name) {
            TEMPLATES
                .get_template(name)
                .and_then(|t| t.render(json!({})))
                .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        }
        assert_eq!(human_bytes(512.0), "512 B");
        assert_eq!(human_bytes(1536.0), "1.5 KiB");
        assert_eq!(human_bytes(3.0 * 1024.0 * 1024.0 * 1024.0), "3.0 GiB");
    }

    #[test]
    fn values_are_escaped() {
        let response = login("/console/<script>", Some("<b>x</b>"), StatusCode::OK);
        assert_eq!(response.status(), StatusCode::OK);
        let html = TEMPLATES
            .get_template("login.html")
            .unwrap()
            .render(json!({"next": "\"><script>", "error": "<b>"}))
            .unwrap();
        assert!(
            !html.contains("<script>") && !html.contains("<b>"),
            "{html}"
        );
        assert!(html.contains("&lt;b&gt;"), "{html}");
    }

    #[test]
    fn sparklines_scale_to_the_box() {
        assert_eq!(sparkline(&[], 100.0, 20.0), "");
        assert_eq!(sparkline(&[50], 100.0, 20.0), "0,10.0 100.0,10.0");
        assert_eq!(sparkline(&[0, 100], 100.0, 20.0), "0.0,20.0 100.0,0.0");
    }
}
