//! The operator REST API. Every handler takes a [`Principal`] (an API key) and sees only its tenant;
//! a resource of another tenant is reported as not found.

use super::extract::{ApiJson, ApiPath, ApiQuery};
use super::AppState;
use crate::db::tokens::{self, NewBootstrapToken, Principal, Role};
use crate::db::{audit, commands, devices, now_ms, tenants};
use crate::error::ApiError;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use kernex_protocol::wire::CommandSpec;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

type ApiResult<T> = Result<T, ApiError>;

#[utoipa::path(get, path = "/healthz", tag = "probes", responses((status = 200, description = "The process is up.", body = String, content_type = "text/plain")))]
pub async fn healthz() -> &'static str {
    "ok"
}

/// `GET /readyz` when ready.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Readiness {
    /// Always `ready` (otherwise the answer is a 503 error).
    #[schema(example = "ready")]
    status: &'static str,
    /// `sqlite` or `postgres`.
    database: &'static str,
}

/// Ready when the database answers and has every migration this binary carries.
#[utoipa::path(get, path = "/readyz", tag = "probes", responses((status = 200, description = "Ready: the database answers and has every migration.", body = Readiness)))]
pub async fn readyz(State(state): State<AppState>) -> ApiResult<Json<Readiness>> {
    match state.db.readiness().await {
        Ok(()) => Ok(Json(Readiness {
            status: "ready",
            database: state.db.backend(),
        })),
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
#[utoipa::path(get, path = "/metrics", tag = "probes", responses((status = 200, description = "Prometheus text format.", body = String, content_type = "text/plain; version=0.0.4; charset=utf-8")))]
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

#[utoipa::path(get, path = "/api/v1/tenants", tag = "tenants", responses((status = 200, description = "The caller's tenant (a key sees one tenant).", body = [crate::db::tenants::TenantView])), security(("api_key" = [])))]
pub async fn list_tenants(
    State(state): State<AppState>,
    principal: Principal,
) -> ApiResult<Json<Value>> {
    let tenant = tenants::require(&state.db, &principal.tenant_name).await?;
    Ok(Json(json!([tenant.view()])))
}

#[utoipa::path(get, path = "/api/v1/tenants/{name}", tag = "tenants", params(("name" = String, Path, description = "Tenant name")), responses((status = 200, description = "The tenant.", body = crate::db::tenants::TenantView), (status = 404, description = "`unknown_tenant`: not the caller's tenant.", body = kernex_protocol::wire::ErrorBody)), security(("api_key" = [])))]
pub async fn get_tenant(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(name): ApiPath<String>,
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

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenBody {
    /// Devices it may enroll; absent = unlimited.
    #[serde(default)]
    #[schema(minimum = 1)]
    uses: Option<u32>,
    /// Lifetime such as `24h` or `7d`; absent = until revoked.
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    description: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedToken {
    /// The whole token: shown this once.
    token: String,
    #[serde(flatten)]
    details: tokens::BootstrapTokenView,
}

#[utoipa::path(post, path = "/api/v1/tokens", tag = "tokens", request_body = CreateTokenBody, responses((status = 201, description = "Created; `token` is shown this once.", body = CreatedToken), (status = 400, description = "`invalid_ttl`, `invalid_uses`, `malformed_json`, `invalid_request`.", body = kernex_protocol::wire::ErrorBody), (status = 403, description = "`forbidden`: the key's role is below admin.", body = kernex_protocol::wire::ErrorBody)), security(("api_key" = [])))]
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

#[utoipa::path(get, path = "/api/v1/tokens", tag = "tokens", responses((status = 200, description = "The tenant's bootstrap tokens.", body = [crate::db::tokens::BootstrapTokenView])), security(("api_key" = [])))]
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

#[utoipa::path(get, path = "/api/v1/tokens/{id}", tag = "tokens", params(("id" = String, Path, description = "Bootstrap token id")), responses((status = 200, description = "The token (never its secret).", body = crate::db::tokens::BootstrapTokenView), (status = 404, description = "`unknown_token`.", body = kernex_protocol::wire::ErrorBody)), security(("api_key" = [])))]
pub async fn get_token(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Value>> {
    let row = tokens::bootstrap_token(&state.db, &principal.tenant_id, &id)
        .await?
        .ok_or_else(|| {
            ApiError::not_found("unknown_token", format!("no bootstrap token `{id}`"))
        })?;
    Ok(Json(json!(row.view())))
}

#[utoipa::path(post, path = "/api/v1/tokens/{id}/revoke", tag = "tokens", params(("id" = String, Path, description = "Bootstrap token id")), responses((status = 200, description = "Revoked (idempotent).", body = crate::db::tokens::BootstrapTokenView), (status = 404, description = "`unknown_token`.", body = kernex_protocol::wire::ErrorBody), (status = 403, description = "`forbidden`: the key's role is below admin.", body = kernex_protocol::wire::ErrorBody)), security(("api_key" = [])))]
pub async fn revoke_token(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Value>> {
    principal.require(Role::Admin)?;
    let before = tokens::bootstrap_token(&state.db, &principal.tenant_id, &id)
        .await?
        .map(|t| t.view());
    let row = tokens::revoke_bootstrap_token(&state.db, &principal.tenant_id, &id).await?;
    let after = row.view();
    audit::record_change(
        &state.db,
        Some(&principal.tenant_id),
        &principal.actor(),
        "token.revoked",
        &id,
        json!({"state": before.as_ref().map(|b| b.state), "revoked_at": before.and_then(|b| b.revoked_at)}),
        json!({"state": after.state, "revoked_at": after.revoked_at}),
    )
    .await;
    Ok(Json(json!(row.view())))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKeyBody {
    role: Role,
    #[serde(default)]
    description: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedApiKey {
    /// The whole key (`kxk_...`): shown this once.
    key: String,
    #[serde(flatten)]
    details: tokens::ApiKeyView,
}

#[utoipa::path(post, path = "/api/v1/apikeys", tag = "apikeys", request_body = CreateApiKeyBody, responses((status = 201, description = "Created; `key` is shown this once.", body = CreatedApiKey), (status = 400, description = "`malformed_json`, `invalid_request`.", body = kernex_protocol::wire::ErrorBody), (status = 403, description = "`forbidden`: the key's role is below admin.", body = kernex_protocol::wire::ErrorBody)), security(("api_key" = [])))]
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
    Ok((
        StatusCode::CREATED,
        Json(CreatedApiKey {
            key: secret.expose(),
            details: row.view(),
        }),
    ))
}

#[utoipa::path(get, path = "/api/v1/apikeys", tag = "apikeys", responses((status = 200, description = "The tenant's API keys (never their secrets).", body = [crate::db::tokens::ApiKeyView]), (status = 403, description = "`forbidden`: the key's role is below admin.", body = kernex_protocol::wire::ErrorBody)), security(("api_key" = [])))]
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

#[utoipa::path(post, path = "/api/v1/apikeys/{id}/revoke", tag = "apikeys", params(("id" = String, Path, description = "API key id")), responses((status = 204, description = "Revoked (idempotent)."), (status = 404, description = "`unknown_api_key`.", body = kernex_protocol::wire::ErrorBody), (status = 403, description = "`forbidden`: the key's role is below admin.", body = kernex_protocol::wire::ErrorBody)), security(("api_key" = [])))]
pub async fn revoke_api_key(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
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
        audit::record_change(
            &state.db,
            Some(&principal.tenant_id),
            &principal.actor(),
            "apikey.revoked",
            &id,
            json!({"revoked": false}),
            json!({"revoked": true}),
        )
        .await;
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeviceFilter {
    /// Only devices with this status (`pending`, `online`, `offline`, `deregistered`).
    status: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/devices", tag = "devices", params(DeviceFilter), responses((status = 200, description = "The tenant's devices.", body = [crate::db::devices::DeviceView]), (status = 400, description = "`invalid_query`: an unknown parameter or value.", body = kernex_protocol::wire::ErrorBody)), security(("api_key" = [])))]
pub async fn list_devices(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(filter): ApiQuery<DeviceFilter>,
) -> ApiResult<Json<Value>> {
    // Every heartbeat answered so far shows, though SQLite folds them into the devices' rows only
    // every few seconds. Should the fold fail (the writer logged why), the list is what it is.
    state.heartbeats.fold().await;
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

#[utoipa::path(get, path = "/api/v1/devices/{id}", tag = "devices", params(("id" = String, Path, description = "Device id")), responses((status = 200, description = "The device.", body = crate::db::devices::DeviceView), (status = 404, description = "`unknown_device`.", body = kernex_protocol::wire::ErrorBody)), security(("api_key" = [])))]
pub async fn get_device(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Value>> {
    state.heartbeats.fold().await;
    let device = device_of(&state, &principal, &id).await?;
    Ok(Json(json!(
        device.view(now_ms(), state.settings.offline_after)
    )))
}

/// Deregisters a device: its next heartbeat is refused with `device_deregistered` and the agent stops.
#[utoipa::path(delete, path = "/api/v1/devices/{id}", tag = "devices", params(("id" = String, Path, description = "Device id")), responses((status = 200, description = "Deregistered (idempotent); its next heartbeat is refused.", body = crate::db::devices::DeviceView), (status = 404, description = "`unknown_device`.", body = kernex_protocol::wire::ErrorBody), (status = 403, description = "`forbidden`: the key's role is below operator.", body = kernex_protocol::wire::ErrorBody)), security(("api_key" = [])))]
pub async fn deregister_device(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Value>> {
    principal.require(Role::Operator)?;
    let before = device_of(&state, &principal, &id)
        .await?
        .view(now_ms(), state.settings.offline_after);
    if devices::deregister(&state.db, &principal.tenant_id, &id).await? {
        audit::record_change(
            &state.db,
            Some(&principal.tenant_id),
            &principal.actor(),
            "device.deregistered",
            &id,
            json!({"status": before.status}),
            json!({"status": "deregistered"}),
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

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QueueCommandBody {
    kind: String,
    #[serde(default)]
    args: Value,
}

#[utoipa::path(post, path = "/api/v1/devices/{id}/commands", tag = "devices", request_body = QueueCommandBody, params(("id" = String, Path, description = "Device id")), responses((status = 201, description = "Queued; delivered with the device's next heartbeat.", body = crate::db::commands::CommandView), (status = 400, description = "`invalid_command`, `malformed_json`, `invalid_request`.", body = kernex_protocol::wire::ErrorBody), (status = 404, description = "`unknown_device`.", body = kernex_protocol::wire::ErrorBody), (status = 409, description = "`device_deregistered`.", body = kernex_protocol::wire::ErrorBody), (status = 403, description = "`forbidden`: the key's role is below operator.", body = kernex_protocol::wire::ErrorBody)), security(("api_key" = [])))]
pub async fn queue_command(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
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

#[utoipa::path(get, path = "/api/v1/devices/{id}/commands", tag = "devices", params(("id" = String, Path, description = "Device id")), responses((status = 200, description = "The device's commands.", body = [crate::db::commands::CommandView]), (status = 404, description = "`unknown_device`.", body = kernex_protocol::wire::ErrorBody)), security(("api_key" = [])))]
pub async fn list_commands(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Value>> {
    let device = device_of(&state, &principal, &id).await?;
    let rows = commands::list(&state.db, &device.id).await?;
    Ok(Json(json!(rows
        .iter()
        .map(|c| c.view())
        .collect::<Vec<_>>())))
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/commands/{command}", tag = "devices", params(("id" = String, Path, description = "Device id"), ("command" = String, Path, description = "Command id")), responses((status = 200, description = "The command with its result.", body = crate::db::commands::CommandView), (status = 404, description = "`unknown_device`, `unknown_command`.", body = kernex_protocol::wire::ErrorBody)), security(("api_key" = [])))]
pub async fn get_command(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath((id, command)): ApiPath<(String, String)>,
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

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// At most this many events (default 100; up to 1000, or 100000 for ndjson/csv exports).
    #[serde(default)]
    limit: Option<i64>,
    /// RFC 3339 times: events at or after `since`, before `until`.
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    until: Option<String>,
    /// An action (`token.revoked`) or a family (`token`).
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    actor: Option<String>,
    #[serde(default)]
    subject: Option<String>,
    /// Events older than this event id (the next page).
    #[serde(default)]
    before: Option<i64>,
    /// `json` (default), `ndjson` or `csv`.
    #[serde(default)]
    format: Option<String>,
}

fn parse_time(name: &str, value: Option<&str>) -> ApiResult<Option<i64>> {
    value
        .map(|v| {
            time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339)
                .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
                .map_err(|e| {
                    ApiError::bad_request(
                        "invalid_query",
                        format!("{name} {v:?} is not an RFC 3339 time ({e})"),
                    )
                })
        })
        .transpose()
}

/// `GET /api/v1/audit`: the tenant's audit trail, filtered, as JSON or exported as NDJSON or CSV.
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit", params(AuditQuery), responses((status = 200, description = "The tenant's audit events, newest first: a JSON array, or one JSON object per line (`format=ndjson`), or CSV (`format=csv`).", content(([crate::db::audit::AuditEventView] = "application/json"), (String = "application/x-ndjson"), (String = "text/csv"))), (status = 400, description = "`invalid_query`: a bad time, format or number.", body = kernex_protocol::wire::ErrorBody)), security(("api_key" = [])))]
pub async fn list_audit(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> ApiResult<axum::response::Response> {
    let format = q.format.as_deref().unwrap_or("json");
    let max = match format {
        "json" => 1000,
        "ndjson" | "csv" => 100_000,
        other => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("format {other:?}: expected json, ndjson or csv"),
            ))
        }
    };
    let filter = audit::Filter {
        since_ms: parse_time("since", q.since.as_deref())?,
        until_ms: parse_time("until", q.until.as_deref())?,
        action: q.action,
        actor: q.actor,
        subject: q.subject,
        before_id: q.before,
        limit: q.limit.unwrap_or(100).clamp(1, max),
    };
    let rows = audit::list(&state.db, &principal.tenant_id, &filter).await?;
    let views: Vec<_> = rows.iter().map(|e| e.view()).collect();
    let (content_type, body) = match format {
        "ndjson" => (
            "application/x-ndjson",
            views
                .iter()
                .map(|v| json!(v).to_string() + "\n")
                .collect::<String>(),
        ),
        "csv" => ("text/csv; charset=utf-8", audit_csv(&views)),
        _ => return Ok(Json(json!(views)).into_response()),
    };
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, content_type),
            (
                axum::http::header::CONTENT_DISPOSITION,
                if format == "csv" {
                    "attachment; filename=\"kernex-audit.csv\""
                } else {
                    "attachment; filename=\"kernex-audit.ndjson\""
                },
            ),
        ],
        body,
    )
        .into_response())
}

/// RFC 4180 CSV: a header line, JSON columns as JSON text, fields quoted when they need it.
fn audit_csv(views: &[audit::AuditEventView]) -> String {
    fn field(text: &str) -> String {
        if text.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", text.replace('"', "\"\""))
        } else {
            text.to_owned()
        }
    }
    let json_or_empty = |v: &Option<Value>| v.as_ref().map_or(String::new(), Value::to_string);
    let mut out =
        String::from("id,at,actor,action,subject,source,request_id,detail,before,after\r\n");
    for v in views {
        let row = [
            v.id.to_string(),
            v.at.clone(),
            v.actor.clone(),
            v.action.clone(),
            v.subject.clone(),
            v.source.clone(),
            v.request_id.clone().unwrap_or_default(),
            v.detail.to_string(),
            json_or_empty(&v.before),
            json_or_empty(&v.after),
        ];
        out += &row.iter().map(|f| field(f)).collect::<Vec<_>>().join(",");
        out += "\r\n";
    }
    out
}
