//! The operator REST API. Every handler takes a [`Principal`] (an API key) and sees only its tenant;
//! a resource of another tenant is reported as not found.

use super::extract::{ApiJson, ApiQuery};
use super::AppState;
use crate::db::tokens::{self, NewBootstrapToken, Principal, Role};
use crate::db::{audit, commands, devices, now_ms, tenants};
use crate::error::ApiError;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use kernex_protocol::wire::CommandSpec;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

type ApiResult<T> = Result<T, ApiError>;

pub async fn healthz() -> &'static str {
    "ok"
}

/// Ready when the database answers and has every migration this binary carries.
pub async fn readyz(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    match state.db.readiness().await {
        Ok(()) => Ok(Json(
            json!({"status": "ready", "database": state.db.backend()}),
        )),
        Err(crate::db::NotReady::Unreachable(why)) => {
            tracing::warn!(error = %why, "not ready: the database does not answer");
            Err(ApiError::DatabaseUnavailable { retry_after_s: 5 })
        }
        Err(behind) => Err(ApiError::NotReady {
            message: behind.to_string(),
        }),
    }
}

/// Prometheus metrics (text format). Open like `/healthz`: expose it only where Prometheus can
/// reach it.
pub async fn metrics(State(state): State<AppState>) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    match state
        .metrics
        .render(&state.db, state.settings.offline_after)
        .await
    {
        Ok(text) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "metrics: the database did not answer");
            ApiError::DatabaseUnavailable { retry_after_s: 5 }.into_response()
        }
    }
}

pub async fn list_tenants(
    State(state): State<AppState>,
    principal: Principal,
) -> ApiResult<Json<Value>> {
    let tenant = tenants::require(&state.db, &principal.tenant_name).await?;
    Ok(Json(json!([tenant.view()])))
}

pub async fn get_tenant(
    State(state): State<AppState>,
    principal: Principal,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    if name != principal.tenant_name {
        return Err(ApiError::not_found(
            "unknown_tenant",
            format!("no tenant named `{name}`"),
        ));
    }
    let tenant = tenants::require(&state.db, &name).await?;
    Ok(Json(json!(tenant.view())))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenBody {
    /// Devices it may enroll; absent = unlimited.
    #[serde(default)]
    uses: Option<u32>,
    /// Lifetime such as `24h` or `7d`; absent = until revoked.
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    description: String,
}

#[derive(Debug, Serialize)]
struct CreatedToken {
    /// The whole token: shown this once.
    token: String,
    #[serde(flatten)]
    details: tokens::BootstrapTokenView,
}

pub async fn create_token(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(body): ApiJson<CreateTokenBody>,
) -> ApiResult<impl IntoResponse> {
    principal.require(Role::Admin)?;
    let ttl = body
        .ttl
        .as_deref()
        .map(|s| {
            humantime::parse_duration(s)
                .map_err(|e| ApiError::bad_request("invalid_ttl", format!("ttl `{s}`: {e}")))
        })
        .transpose()?;
    let spec = NewBootstrapToken {
        uses: body.uses,
        ttl,
        description: body.description,
    };
    let (secret, row) =
        tokens::create_bootstrap_token(&state.db, &principal.tenant_id, &spec).await?;
    audit::record(
        &state.db,
        Some(&principal.tenant_id),
        &principal.actor(),
        "token.created",
        &row.id,
        json!({"uses_allowed": row.uses_allowed, "expires_at": row.expires_at}),
    )
    .await;
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            token: secret.expose(),
            details: row.view(),
        }),
    ))
}

pub async fn list_tokens(
    State(state): State<AppState>,
    principal: Principal,
) -> ApiResult<Json<Value>> {
    let rows = tokens::list_bootstrap_tokens(&state.db, &principal.tenant_id).await?;
    Ok(Json(json!(rows
        .iter()
        .map(|r| r.view())
        .collect::<Vec<_>>())))
}

pub async fn get_token(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let row = tokens::bootstrap_token(&state.db, &principal.tenant_id, &id)
        .await?
        .ok_or_else(|| {
            ApiError::not_found("unknown_token", format!("no bootstrap token `{id}`"))
        })?;
    Ok(Json(json!(row.view())))
}

pub async fn revoke_token(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    principal.require(Role::Admin)?;
    let row = tokens::revoke_bootstrap_token(&state.db, &principal.tenant_id, &id).await?;
    audit::record(
        &state.db,
        Some(&principal.tenant_id),
        &principal.actor(),
        "token.revoked",
        &id,
        json!({}),
    )
    .await;
    Ok(Json(json!(row.view())))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKeyBody {
    role: Role,
    #[serde(default)]
    description: String,
}

pub async fn create_api_key(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(body): ApiJson<CreateApiKeyBody>,
) -> ApiResult<impl IntoResponse> {
    principal.require(Role::Admin)?;
    let (secret, row) = tokens::create_api_key(
        &state.db,
        &principal.tenant_id,
        body.role,
        &body.description,
    )
    .await?;
    audit::record(
        &state.db,
        Some(&principal.tenant_id),
        &principal.actor(),
        "apikey.created",
        &row.id,
        json!({"role": row.role}),
    )
    .await;
    let mut view = json!(row.view());
    view["key"] = Value::String(secret.expose());
    Ok((StatusCode::CREATED, Json(view)))
}

pub async fn list_api_keys(
    State(state): State<AppState>,
    principal: Principal,
) -> ApiResult<Json<Value>> {
    principal.require(Role::Admin)?;
    let rows = tokens::list_api_keys(&state.db, &principal.tenant_id).await?;
    Ok(Json(json!(rows
        .iter()
        .map(|r| r.view())
        .collect::<Vec<_>>())))
}

pub async fn revoke_api_key(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    principal.require(Role::Admin)?;
    let keys = tokens::list_api_keys(&state.db, &principal.tenant_id).await?;
    if !keys.iter().any(|k| k.id == id) {
        return Err(ApiError::not_found(
            "unknown_api_key",
            format!("no API key `{id}`"),
        ));
    }
    if tokens::revoke_api_key(&state.db, &principal.tenant_id, &id).await? {
        audit::record(
            &state.db,
            Some(&principal.tenant_id),
            &principal.actor(),
            "apikey.revoked",
            &id,
            json!({}),
        )
        .await;
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceFilter {
    /// Only devices with this status (`pending`, `online`, `offline`, `deregistered`).
    status: Option<String>,
}

pub async fn list_devices(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(filter): ApiQuery<DeviceFilter>,
) -> ApiResult<Json<Value>> {
    let now = now_ms();
    let offline_after = state.settings.offline_after;
    let views: Vec<_> = devices::list(&state.db, &principal.tenant_id)
        .await?
        .iter()
        .map(|d| d.view(now, offline_after))
        .filter(|v| {
            filter
                .status
                .as_deref()
                .is_none_or(|s| json!(v.status) == s)
        })
        .collect();
    Ok(Json(json!(views)))
}

async fn device_of(
    state: &AppState,
    principal: &Principal,
    id: &str,
) -> ApiResult<devices::Device> {
    devices::in_tenant(&state.db, &principal.tenant_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("unknown_device", format!("no device `{id}`")))
}

pub async fn get_device(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let device = device_of(&state, &principal, &id).await?;
    Ok(Json(json!(
        device.view(now_ms(), state.settings.offline_after)
    )))
}

/// Deregisters a device: its next heartbeat is refused with `device_deregistered` and the agent stops.
pub async fn deregister_device(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    principal.require(Role::Operator)?;
    device_of(&state, &principal, &id).await?;
    if devices::deregister(&state.db, &principal.tenant_id, &id).await? {
        audit::record(
            &state.db,
            Some(&principal.tenant_id),
            &principal.actor(),
            "device.deregistered",
            &id,
            json!({}),
        )
        .await;
        crate::db::webhooks::emit(
            &state.db,
            &principal.tenant_id,
            "device.deregistered",
            json!({"device_id": id, "by": principal.actor()}),
        )
        .await;
    }
    let device = device_of(&state, &principal, &id).await?;
    Ok(Json(json!(
        device.view(now_ms(), state.settings.offline_after)
    )))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueCommandBody {
    kind: String,
    #[serde(default)]
    args: Value,
}

pub async fn queue_command(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<QueueCommandBody>,
) -> ApiResult<impl IntoResponse> {
    principal.require(Role::Operator)?;
    let spec = CommandSpec::parse(&body.kind, &body.args)
        .map_err(|m| ApiError::bad_request("invalid_command", m))?;
    if spec.is_internal() {
        return Err(ApiError::bad_request(
            "invalid_command",
            format!(
                "command `{}` is issued by deployments only: use POST /api/v1/deployments",
                spec.kind()
            ),
        ));
    }
    let device = device_of(&state, &principal, &id).await?;
    if device.deregistered_at.is_some() {
        return Err(ApiError::conflict(
            "device_deregistered",
            format!("device `{id}` is deregistered"),
        ));
    }
    let command = commands::queue(&state.db, &device.id, &spec, &principal.actor()).await?;
    audit::record(
        &state.db,
        Some(&principal.tenant_id),
        &principal.actor(),
        "command.queued",
        &command.id,
        json!({"device": device.id, "kind": command.kind}),
    )
    .await;
    Ok((StatusCode::CREATED, Json(command.view())))
}

pub async fn list_commands(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let device = device_of(&state, &principal, &id).await?;
    let rows = commands::list(&state.db, &device.id).await?;
    Ok(Json(json!(rows
        .iter()
        .map(|c| c.view())
        .collect::<Vec<_>>())))
}

pub async fn get_command(
    State(state): State<AppState>,
    principal: Principal,
    Path((id, command)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let device = device_of(&state, &principal, &id).await?;
    let row = commands::get(&state.db, &device.id, &command)
        .await?
        .ok_or_else(|| {
            ApiError::not_found(
                "unknown_command",
                format!("no command `{command}` for device `{id}`"),
            )
        })?;
    Ok(Json(json!(row.view())))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    #[serde(default)]
    limit: Option<i64>,
}

pub async fn list_audit(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> ApiResult<Json<Value>> {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let rows = audit::list(&state.db, &principal.tenant_id, limit).await?;
    Ok(Json(json!(rows
        .iter()
        .map(|e| e.view())
        .collect::<Vec<_>>())))
}
