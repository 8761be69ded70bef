//! HTTP: the device protocol and the operator REST API, both under `/api/v1`.
//!
//! [`app`] builds the router from an [`AppState`] and does no I/O of its own, so tests drive it with
//! `tower::ServiceExt::oneshot` and `serve` binds it to a socket.

pub(crate) mod bundles;
pub(crate) mod deployments;
mod device;
pub(crate) mod extract;
pub mod limits;
pub mod openapi;
pub(crate) mod rest;
pub(crate) mod users;
mod webhooks;

use crate::db::Db;
use crate::device_token::DeviceTokenKey;
use crate::error::ApiError;
use crate::heartbeat::HeartbeatWriter;
use crate::metrics::Metrics;
use crate::rollout::RolloutEngine;
use crate::store::ObjectStore;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use std::sync::Arc;
use std::time::Duration;

/// Settings the handlers read on every request.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// Interval suggested to agents.
    pub heartbeat_interval: Duration,
    /// Missed intervals after which a device counts as offline.
    pub offline_after: u32,
    /// Lifetime of a device bearer token.
    pub device_token_ttl: Duration,
    /// Largest request body accepted, in bytes (bundle uploads excepted).
    pub body_limit: usize,
    /// Largest bundle upload accepted, in bytes.
    pub max_bundle_bytes: u64,
    /// Versions of each bundle name kept; older ones are retired unless a deployment uses them.
    pub bundle_retention: usize,
    /// Rate and time limits.
    pub limits: limits::LimitSettings,
    /// Origins allowed to call the API from a browser; empty: no CORS headers at all.
    pub cors_origins: Vec<axum::http::HeaderValue>,
}

impl Default for ApiSettings {
    fn default() -> Self {
        ApiSettings {
            heartbeat_interval: Duration::from_secs(60),
            offline_after: 3,
            device_token_ttl: Duration::from_secs(3600),
            body_limit: 64 * 1024,
            max_bundle_bytes: 4 << 30,
            bundle_retention: 5,
            limits: limits::LimitSettings::default(),
            cors_origins: Vec::new(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AppState(Arc<Shared>);

#[derive(Debug)]
pub struct Shared {
    pub db: Db,
    pub heartbeats: HeartbeatWriter,
    pub device_tokens: Arc<DeviceTokenKey>,
    pub settings: ApiSettings,
    pub store: ObjectStore,
    pub rollouts: RolloutEngine,
    pub metrics: Arc<Metrics>,
    pub limiters: Arc<limits::Limiters>,
    /// Recent CPU and memory use per device, for the console's sparklines.
    pub samples: crate::samples::Samples,
    /// The web console's settings.
    pub console: crate::console::ConsoleSettings,
}

impl AppState {
    pub fn new(shared: Shared) -> AppState {
        shared.limiters.start_sweeping();
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub fn app(state: AppState) -> Router {
    let body_limit = state.settings.body_limit;
    // Full paths rather than `nest`: a nested router rewrites every request's URI on the way in.
    let v1 = |path: &str| format!("{}{path}", kernex_protocol::API_PREFIX);
    Router::new()
        .route(&v1("/enroll"), post(device::enroll))
        .route(&v1("/auth"), post(device::auth))
        .route(&v1("/tenants"), get(rest::list_tenants))
        .route(&v1("/tenants/{name}"), get(rest::get_tenant))
        .route(
            &v1("/tokens"),
            get(rest::list_tokens).post(rest::create_token),
        )
        .route(&v1("/tokens/{id}"), get(rest::get_token))
        .route(&v1("/tokens/{id}/revoke"), post(rest::revoke_token))
        .route(
            &v1("/apikeys"),
            get(rest::list_api_keys).post(rest::create_api_key),
        )
        .route(&v1("/apikeys/{id}/revoke"), post(rest::revoke_api_key))
        .route(&v1("/users"), get(users::list).post(users::create))
        .route(&v1("/users/{username}/disable"), post(users::disable))
        .route(&v1("/devices"), get(rest::list_devices))
        .route(
            &v1("/devices/{id}"),
            get(rest::get_device).delete(rest::deregister_device),
        )
        .route(
            &v1("/devices/{id}/commands"),
            get(rest::list_commands).post(rest::queue_command),
        )
        .route(
            &v1("/devices/{id}/commands/{command}"),
            get(rest::get_command),
        )
        .route(&v1("/audit"), get(rest::list_audit))
        .route(
            &v1("/publisher-keys"),
            get(bundles::list_publisher_keys).post(bundles::add_publisher_key),
        )
        .route(
            &v1("/publisher-keys/{id}/revoke"),
            post(bundles::revoke_publisher_key),
        )
        .route(&v1("/bundles/{id}"), get(bundles::get))
        .route(
            &v1("/deployments"),
            get(deployments::list).post(deployments::create),
        )
        .route(&v1("/deployments/{id}"), get(deployments::get))
        .route(&v1("/deployments/{id}/pause"), post(deployments::pause))
        .route(&v1("/deployments/{id}/resume"), post(deployments::resume))
        .route(&v1("/deployments/{id}/cancel"), post(deployments::cancel))
        .route(
            &v1("/deployments/{id}/rollback"),
            post(deployments::rollback),
        )
        .route(&v1("/deployments/{id}/status"), post(deployments::report))
        .route(
            &v1("/devices/{id}/labels"),
            axum::routing::put(deployments::put_labels),
        )
        .route(&v1("/webhooks"), get(webhooks::list).post(webhooks::create))
        .route(
            &v1("/webhooks/{id}"),
            axum::routing::delete(webhooks::delete),
        )
        .route(&v1("/webhooks/{id}/deliveries"), get(webhooks::deliveries))
        .route("/healthz", get(rest::healthz))
        .route("/readyz", get(rest::readyz))
        .route("/metrics", get(rest::metrics))
        .route(&v1("/openapi.json"), get(openapi::openapi_json))
        .merge(crate::console::router())
        .fallback(|| async { ApiError::not_found("not_found", "no such route") })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            read_whole_body,
        ))
        .layer(DefaultBodyLimit::max(body_limit))
        // After the layers above: the heartbeat's extractor reads its body itself (the hot path
        // pays for no extra layer), bundle bodies stream instead of being read whole.
        .route(&v1("/heartbeat"), post(device::heartbeat))
        .route(
            &v1("/bundles"),
            get(bundles::list)
                .post(bundles::upload)
                .layer(DefaultBodyLimit::disable()),
        )
        .route(&v1("/bundles/{id}/content"), get(bundles::content))
        // After the last route: it only reaches the routes added before it.
        .method_not_allowed_fallback(|| async {
            ApiError::MethodNotAllowed {
                message: "method not allowed on this route".into(),
            }
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limits::limit_requests,
        ))
        .layer(tower::util::option_layer(cors(
            &state.settings.cors_origins,
        )))
        // Outermost, and after routing: sees every request with its route template (refusals by
        // the limits included).
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            record_request,
        ))
        .with_state(state)
}

/// CORS for the configured origins only. With none, no layer at all: no CORS headers (browsers
/// then refuse cross-origin calls, which is what the built-in console on the same origin needs),
/// and no cost (an unconfigured CORS layer still clones its settings and writes `Vary` into
/// every response).
fn cors(origins: &[axum::http::HeaderValue]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{header, Method};
    if origins.is_empty() {
        return None;
    }
    let layer = tower_http::cors::CorsLayer::new()
        .allow_origin(origins.to_vec())
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
        .max_age(Duration::from_secs(600));
    Some(layer)
}

/// Every route as `(method, template)`, for the per-route metrics (a route missing here is
/// counted under `unmatched`; `the_route_table_matches_the_router` keeps them in step).
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/api/v1/enroll"),
    ("POST", "/api/v1/auth"),
    ("POST", "/api/v1/heartbeat"),
    ("GET", "/api/v1/tenants"),
    ("GET", "/api/v1/tenants/{name}"),
    ("GET", "/api/v1/tokens"),
    ("POST", "/api/v1/tokens"),
    ("GET", "/api/v1/tokens/{id}"),
    ("POST", "/api/v1/tokens/{id}/revoke"),
    ("GET", "/api/v1/apikeys"),
    ("POST", "/api/v1/apikeys"),
    ("POST", "/api/v1/apikeys/{id}/revoke"),
    ("GET", "/api/v1/users"),
    ("POST", "/api/v1/users"),
    ("POST", "/api/v1/users/{username}/disable"),
    ("GET", "/api/v1/devices"),
    ("GET", "/api/v1/devices/{id}"),
    ("DELETE", "/api/v1/devices/{id}"),
    ("GET", "/api/v1/devices/{id}/commands"),
    ("POST", "/api/v1/devices/{id}/commands"),
    ("GET", "/api/v1/devices/{id}/commands/{command}"),
    ("PUT", "/api/v1/devices/{id}/labels"),
    ("GET", "/api/v1/audit"),
    ("GET", "/api/v1/publisher-keys"),
    ("POST", "/api/v1/publisher-keys"),
    ("POST", "/api/v1/publisher-keys/{id}/revoke"),
    ("GET", "/api/v1/bundles"),
    ("POST", "/api/v1/bundles"),
    ("GET", "/api/v1/bundles/{id}"),
    ("GET", "/api/v1/bundles/{id}/content"),
    ("GET", "/api/v1/deployments"),
    ("POST", "/api/v1/deployments"),
    ("GET", "/api/v1/deployments/{id}"),
    ("POST", "/api/v1/deployments/{id}/pause"),
    ("POST", "/api/v1/deployments/{id}/resume"),
    ("POST", "/api/v1/deployments/{id}/cancel"),
    ("POST", "/api/v1/deployments/{id}/rollback"),
    ("POST", "/api/v1/deployments/{id}/status"),
    ("GET", "/api/v1/webhooks"),
    ("POST", "/api/v1/webhooks"),
    ("DELETE", "/api/v1/webhooks/{id}"),
    ("GET", "/api/v1/webhooks/{id}/deliveries"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/api/v1/openapi.json"),
];

/// What the code serving a request may want to know about it without being handed it: the audit
/// trail records where a change came from, and every log line names its request
/// ([`crate::logging`]).
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub id: std::sync::Arc<str>,
    pub method: axum::http::Method,
    /// The route template that matched, if one did.
    pub route: Option<axum::extract::MatchedPath>,
    /// The client's address (see `limits::client_address`); formatted only by whoever needs it.
    pub source: Option<std::net::IpAddr>,
}

tokio::task_local! {
    static REQUEST_CONTEXT: RequestContext;
}

impl RequestContext {
    /// The context of the request this task serves, if it serves one.
    pub fn current() -> Option<RequestContext> {
        REQUEST_CONTEXT.try_with(Clone::clone).ok()
    }

    /// `f` of the context of the request this task serves, if it serves one.
    pub fn with_current<R>(f: impl FnOnce(&RequestContext) -> R) -> Option<R> {
        REQUEST_CONTEXT.try_with(f).ok()
    }
}

/// Outermost: gives the request an id (the caller's `x-request-id` when it is sane, a fresh one
/// otherwise), serves it with a [`RequestContext`] naming it (so every log line written while
/// handling it names it, down to the database errors), answers with the id in `x-request-id`,
/// times it into its route's histogram, and logs refusals and failures. A `request` span is made
/// only when traces are exported (see [`crate::logging`]).
async fn record_request(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use tracing::Instrument as _;
    let started = std::time::Instant::now();
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .cloned();
    let id = request
        .headers()
        .get(kernex_protocol::REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            (1..=64).contains(&v.len())
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()));
    let context = RequestContext {
        id: id.as_str().into(),
        method: request.method().clone(),
        route,
        source: limits::client_address(&request, state.settings.limits.forwarded_for),
    };
    // At error level so the span exists whatever KERNEX_LOG lets through.
    let span = if crate::logging::exporting_traces() {
        let route = context.route.as_ref().map_or("unmatched", |r| r.as_str());
        tracing::error_span!("request", id = %id, method = %context.method, route = route)
    } else {
        tracing::Span::none()
    };
    let mut response = REQUEST_CONTEXT
        .scope(context.clone(), next.run(request).instrument(span.clone()))
        .await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    state.metrics.request(
        context.method.as_str(),
        context.route.as_ref().map(|r| r.as_str()),
        status,
        elapsed,
    );
    let log = || {
        let ms = elapsed.as_secs_f64() * 1000.0;
        match status {
            // Shedding load or waiting out the database: degraded, not broken.
            503 => tracing::warn!(status, ms, "request not served"),
            500.. => tracing::error!(status, ms, "request failed"),
            401 | 403 => tracing::info!(status, ms, "request refused"),
            _ => tracing::debug!(status, ms, "request done"),
        }
    };
    span.in_scope(|| REQUEST_CONTEXT.sync_scope(context, log));
    if let Ok(value) = axum::http::HeaderValue::from_str(&id) {
        response
            .headers_mut()
            .insert(kernex_protocol::REQUEST_ID_HEADER, value);
    }
    response
}

/// Reads the request body (up to the limit) before any handler or extractor runs. A request refused
/// early (no API key, no signature) would otherwise be answered while its body is unread, and the
/// connection closed under a client still sending: it sees a broken pipe instead of the error.
async fn read_whole_body(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let (parts, body) = request.into_parts();
    match axum::body::to_bytes(body, state.settings.body_limit).await {
        Ok(bytes) => {
            next.run(axum::extract::Request::from_parts(
                parts,
                axum::body::Body::from(bytes),
            ))
            .await
        }
        Err(_) => ApiError::PayloadTooLarge {
            limit: state.settings.body_limit,
        }
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heartbeat::WriterConfig;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt as _;

    async fn test_app(dir: &std::path::Path) -> Router {
        let db = Db::open(None, dir).await.unwrap();
        let metrics = Arc::new(Metrics::new(
            ROUTES.iter().chain(crate::console::ROUTES).copied(),
        ));
        let heartbeats =
            HeartbeatWriter::start(&db, WriterConfig::default(), metrics.clone()).unwrap();
        app(AppState::new(Shared {
            store: ObjectStore::local(&dir.join("bundles")).unwrap(),
            rollouts: RolloutEngine::start(db.clone(), Duration::from_secs(1)),
            db,
            heartbeats,
            device_tokens: Arc::new(DeviceTokenKey::new(b"test")),
            limiters: Arc::new(limits::Limiters::new(ApiSettings::default().limits)),
            settings: ApiSettings::default(),
            metrics,
            samples: Default::default(),
            console: Default::default(),
        }))
    }

    #[tokio::test]
    async fn the_route_table_matches_the_router() {
        let dir = tempfile::tempdir().unwrap();
        let app = test_app(dir.path()).await;
        for (method, path) in ROUTES {
            let path = path.replace(['{', '}'], "");
            let response = app
                .clone()
                .oneshot(
                    Request::builder()
                        .method(*method)
                        .uri(&path)
                        .body(Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            let status = response.status();
            let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
                .await
                .unwrap();
            let text = String::from_utf8_lossy(&bytes);
            assert!(
                status != StatusCode::METHOD_NOT_ALLOWED && !text.contains("no such route"),
                "{method} {path}: {status} {text}"
            );
        }
    }

    /// The routes `app` registers, read from this file's source: `(template, methods)`. Routes of
    /// the web console (`/console`) are pages, not API, and stay out of the document.
    fn routes_in_source() -> std::collections::BTreeMap<String, Vec<String>> {
        let source = include_str!("mod.rs");
        let body = source
            .split("pub fn app(state: AppState) -> Router {")
            .nth(1)
            .and_then(|rest| rest.split("\n}\n").next())
            .expect("mod.rs has `pub fn app`");
        let mut routes = std::collections::BTreeMap::new();
        for call in body.split(".route(").skip(1) {
            let call: String = call.split_whitespace().collect();
            let (path, handlers) = if let Some(rest) = call.strip_prefix("&v1(\"") {
                let (path, rest) = rest.split_once('"').unwrap();
                (format!("{}{path}", kernex_protocol::API_PREFIX), rest)
            } else {
                let rest = call.strip_prefix('"').expect("a route template literal");
                let (path, rest) = rest.split_once('"').unwrap();
                (path.to_owned(), rest)
            };
            if path.starts_with("/console") {
                continue;
            }
            // The method routers chained after the template: `get(a).post(b)`, `routing::put(c)`.
            let mut methods: Vec<String> = ["get", "post", "put", "delete", "patch"]
                .iter()
                .filter(|m| {
                    handlers.contains(&format!(",{m}("))
                        || handlers.contains(&format!(".{m}("))
                        || handlers.contains(&format!("::{m}("))
                })
                .map(|m| m.to_uppercase())
                .collect();
            methods.sort();
            routes.insert(path, methods);
        }
        routes
    }

    #[tokio::test]
    async fn every_route_of_the_router_is_documented() {
        let from_source = routes_in_source();
        assert!(from_source.len() > 30, "{from_source:?}");
        let doc = openapi::document();
        let documented: std::collections::BTreeMap<String, Vec<String>> = doc
            .paths
            .paths
            .iter()
            .map(|(path, item)| {
                let mut methods: Vec<String> = [
                    ("GET", item.get.is_some()),
                    ("POST", item.post.is_some()),
                    ("PUT", item.put.is_some()),
                    ("DELETE", item.delete.is_some()),
                    ("PATCH", item.patch.is_some()),
                ]
                .iter()
                .filter(|(_, present)| *present)
                .map(|(m, _)| m.to_string())
                .collect();
                methods.sort();
                (path.clone(), methods)
            })
            .collect();
        let undocumented: Vec<_> = from_source
            .iter()
            .filter(|(path, methods)| documented.get(*path) != Some(methods))
            .collect();
        let stale: Vec<_> = documented
            .iter()
            .filter(|(path, methods)| from_source.get(*path) != Some(methods))
            .collect();
        assert!(
            undocumented.is_empty() && stale.is_empty(),
            "routes of `app` missing from the OpenAPI document (add #[utoipa::path] and list the \
             handler in api::openapi::ApiDoc): {undocumented:?}; documented but not routed: {stale:?}"
        );
        // And the source reading against the real router: every documented method is served, every
        // other one is refused with 405 (so a method added to a route without its documentation
        // is caught too).
        let dir = tempfile::tempdir().unwrap();
        let app = test_app(dir.path()).await;
        // The console's pages may be in ROUTES (for their metrics) but are not API.
        let mut table: Vec<(String, String)> = ROUTES
            .iter()
            .filter(|(_, p)| !p.starts_with("/console"))
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        table.sort();
        let mut from_doc: Vec<(String, String)> = documented
            .iter()
            .flat_map(|(p, ms)| ms.iter().map(move |m| (m.clone(), p.clone())))
            .collect();
        from_doc.sort();
        assert_eq!(from_doc, table, "the OpenAPI document vs ROUTES");
        for (path, methods) in &documented {
            let uri = path.replace(['{', '}'], "");
            for method in ["GET", "POST", "PUT", "DELETE", "PATCH"] {
                let response = app
                    .clone()
                    .oneshot(
                        Request::builder()
                            .method(method)
                            .uri(&uri)
                            .body(Body::empty())
                            .unwrap(),
                    )
                    .await
                    .unwrap();
                let served = response.status() != StatusCode::METHOD_NOT_ALLOWED;
                assert_eq!(
                    served,
                    methods.iter().any(|m| m == method),
                    "{method} {path}: {}",
                    response.status()
                );
            }
        }
    }

    /// Regression: the routes added after `method_not_allowed_fallback` (heartbeat, bundle
    /// upload and download) answered 405 with an empty body instead of the JSON error.
    #[tokio::test]
    async fn every_405_is_a_json_error() {
        let dir = tempfile::tempdir().unwrap();
        let app = test_app(dir.path()).await;
        for (_, template) in ROUTES {
            let uri = template.replace(['{', '}'], "");
            let request = Request::builder()
                .method("PATCH")
                .uri(&uri)
                .body(Body::empty())
                .unwrap();
            let (status, body) = call(app.clone(), request).await;
            assert_eq!(
                (status, body["error"]["code"].as_str()),
                (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed")),
                "PATCH {uri}"
            );
        }
    }

    /// Regression: a path parameter that is not UTF-8 once percent-decoded got axum's plain-text
    /// 400, not the JSON error body the document promises (found while checking the document).
    #[tokio::test]
    async fn undecodable_path_parameters_get_a_json_400() {
        let dir = tempfile::tempdir().unwrap();
        let app = test_app(dir.path()).await;
        let db = Db::open(None, dir.path()).await.unwrap();
        let tenant = crate::db::tenants::create(&db, "acme").await.unwrap();
        let (key, _) =
            crate::db::tokens::create_api_key(&db, &tenant.id, crate::db::tokens::Role::Admin, "")
                .await
                .unwrap();
        let device_token = DeviceTokenKey::new(b"test").issue(&crate::device_token::DeviceClaims {
            device_id: "d".into(),
            tenant_id: tenant.id.clone(),
            expires_at: i64::MAX,
        });
        let mut checked = 0;
        for (method, template) in ROUTES
            .iter()
            .filter(|(_, p)| p.starts_with("/api/") && p.contains('{'))
        {
            let uri: String = template
                .split('/')
                .map(|part| if part.starts_with('{') { "%FF" } else { part })
                .collect::<Vec<_>>()
                .join("/");
            let bearer = if template.ends_with("/status") {
                device_token.clone()
            } else {
                key.expose()
            };
            let request = Request::builder()
                .method(*method)
                .uri(&uri)
                .header("authorization", format!("Bearer {bearer}"))
                .header("content-type", "application/json")
                .body(Body::from("{}"))
                .unwrap();
            let (status, body) = call(app.clone(), request).await;
            assert_eq!(
                (status, body["error"]["code"].as_str()),
                (StatusCode::BAD_REQUEST, Some("invalid_path")),
                "{method} {uri}: {body}"
            );
            checked += 1;
        }
        assert!(checked > 20, "{checked} routes with parameters");
    }

    #[tokio::test]
    async fn the_openapi_document_is_served_without_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let app = test_app(dir.path()).await;
        let (status, body) = call(
            app,
            Request::get("/api/v1/openapi.json")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["openapi"], "3.1.0");
        assert_eq!(
            body["components"]["securitySchemes"]["api_key"]["scheme"],
            "bearer"
        );
        assert!(body["paths"]["/api/v1/devices/{id}"]["get"]["responses"]["404"].is_object());
    }

    /// The status and JSON body of a request; a body that is not JSON fails the test, naming it.
    async fn call(app: Router, request: Request<Body>) -> (StatusCode, serde_json::Value) {
        let what = format!("{} {}", request.method(), request.uri());
        let response = app.oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            panic!(
                "{what}: {status} with a body that is not JSON: {:?}",
                String::from_utf8_lossy(&bytes)
            )
        });
        (status, body)
    }

    #[tokio::test]
    async fn oversized_bodies_get_413_with_a_json_error() {
        let dir = tempfile::tempdir().unwrap();
        let app = test_app(dir.path()).await;
        let token = DeviceTokenKey::new(b"test").issue(&crate::device_token::DeviceClaims {
            device_id: "d".into(),
            tenant_id: "t".into(),
            expires_at: i64::MAX,
        });
        for path in ["/api/v1/enroll", "/api/v1/heartbeat"] {
            let request = Request::post(path)
                .header("content-type", "application/json")
                .header(kernex_protocol::SIGNATURE_HEADER, "x")
                .header("authorization", format!("Bearer {token}"))
                .body(Body::from(vec![b' '; 100 * 1024]))
                .unwrap();
            let (status, body) = call(app.clone(), request).await;
            assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{path}: {body}");
            assert_eq!(body["error"]["code"], "payload_too_large", "{path}");
            assert_eq!(
                body["error"]["message"],
                "request body is larger than the limit of 65536 bytes"
            );
        }
    }

    #[tokio::test]
    async fn health_and_readiness() {
        let dir = tempfile::tempdir().unwrap();
        let app = test_app(dir.path()).await;
        let (status, body) = call(
            app.clone(),
            Request::get("/readyz").body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(
            (status, body["database"].as_str()),
            (StatusCode::OK, Some("sqlite"))
        );
        let (status, body) = call(app, Request::get("/nowhere").body(Body::empty()).unwrap()).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("not_found"))
        );
    }
}
