//! HTTP: the device protocol and the operator REST API, both under `/api/v1`.
//!
//! [`app`] builds the router from an [`AppState`] and does no I/O of its own, so tests drive it with
//! `tower::ServiceExt::oneshot` and `serve` binds it to a socket.

mod device;
mod extract;
mod rest;

use crate::db::Db;
use crate::device_token::DeviceTokenKey;
use crate::error::ApiError;
use crate::heartbeat::HeartbeatWriter;
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
    /// Largest request body accepted, in bytes.
    pub body_limit: usize,
}

impl Default for ApiSettings {
    fn default() -> Self {
        ApiSettings {
            heartbeat_interval: Duration::from_secs(60),
            offline_after: 3,
            device_token_ttl: Duration::from_secs(3600),
            body_limit: 64 * 1024,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AppState(Arc<Shared>);

#[derive(Debug)]
pub struct Shared {
    pub db: Db,
    pub heartbeats: HeartbeatWriter,
    pub device_tokens: DeviceTokenKey,
    pub settings: ApiSettings,
}

impl AppState {
    pub fn new(
        db: Db,
        heartbeats: HeartbeatWriter,
        device_tokens: DeviceTokenKey,
        settings: ApiSettings,
    ) -> AppState {
        AppState(Arc::new(Shared {
            db,
            heartbeats,
            device_tokens,
            settings,
        }))
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
    let api = Router::new()
        .route("/enroll", post(device::enroll))
        .route("/auth", post(device::auth))
        .route("/heartbeat", post(device::heartbeat))
        .route("/tenants", get(rest::list_tenants))
        .route("/tenants/{name}", get(rest::get_tenant))
        .route("/tokens", get(rest::list_tokens).post(rest::create_token))
        .route("/tokens/{id}", get(rest::get_token))
        .route("/tokens/{id}/revoke", post(rest::revoke_token))
        .route(
            "/apikeys",
            get(rest::list_api_keys).post(rest::create_api_key),
        )
        .route("/apikeys/{id}/revoke", post(rest::revoke_api_key))
        .route("/devices", get(rest::list_devices))
        .route(
            "/devices/{id}",
            get(rest::get_device).delete(rest::deregister_device),
        )
        .route(
            "/devices/{id}/commands",
            get(rest::list_commands).post(rest::queue_command),
        )
        .route("/devices/{id}/commands/{command}", get(rest::get_command))
        .route("/audit", get(rest::list_audit));
    Router::new()
        .nest(kernex_protocol::API_PREFIX, api)
        .route("/healthz", get(rest::healthz))
        .route("/readyz", get(rest::readyz))
        .fallback(|| async { ApiError::not_found("not_found", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::MethodNotAllowed {
                message: "method not allowed on this route".into(),
            }
        })
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}
