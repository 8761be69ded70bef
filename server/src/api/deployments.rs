//! Deployments: create (targets by id or label selector, phases, thresholds), read with
//! aggregates, pause / resume / cancel / roll back; and the device's status reports.

use super::device::DeviceAuth;
use super::extract::{ApiJson, ApiPath};
use super::AppState;
use crate::db::deployments::{self, Action, NewDeployment, Phase, Reported};
use crate::db::tokens::{Principal, Role};
use crate::db::{audit, bundles, devices};
use crate::error::ApiError;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use kernex_protocol::wire::{DeploymentReport, DeploymentReportResponse};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;

type ApiResult<T> = Result<T, ApiError>;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    bundle: String,
    /// Device ids, in rollout order.
    #[serde(default)]
    devices: Option<Vec<String>>,
    /// Or every live device whose labels include all of these.
    #[serde(default)]
    selector: Option<Selector>,
    /// Cumulative reach of each phase; default one phase of everyone.
    #[serde(default)]
    phases: Option<Vec<Phase>>,
    /// Share of a phase's devices that must succeed before the next phase starts (default 1.0).
    #[serde(default)]
    success_threshold: Option<f64>,
    /// Share of a phase's devices that may fail before the rollout halts (default 0.0: any).
    #[serde(default)]
    error_threshold: Option<f64>,
    /// Devices deploying at the same time (default 10).
    #[serde(default)]
    max_in_flight: Option<u32>,
    /// Allow installing a version older than the active one.
    #[serde(default)]
    allow_downgrade: bool,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    labels: BTreeMap<String, String>,
}

fn fraction(name: &str, value: Option<f64>, default: f64) -> ApiResult<f64> {
    let v = value.unwrap_or(default);
    if !(0.0..=1.0).contains(&v) {
        return Err(ApiError::bad_request(
            "invalid_deployment",
            format!("{name} must be between 0 and 1, got {v}"),
        ));
    }
    Ok(v)
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct DeploymentCreated {
    id: String,
}

/// `POST /api/v1/deployments/{id}/rollback`: the deployment of the previous version.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct RollbackCreated {
    id: String,
    /// The version rolled back to.
    version: String,
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct DeviceLabels {
    id: String,
    labels: BTreeMap<String, String>,
}

#[utoipa::path(post, path = "/api/v1/deployments", tag = "deployments", request_body = CreateBody, responses((status = 201, description = "Created; the rollout starts.", body = DeploymentCreated), (status = 400, description = "`invalid_deployment`, `invalid_phases`, `malformed_json`, `invalid_request`.", body = kernex_protocol::wire::ErrorBody), (status = 404, description = "`unknown_bundle`, `unknown_device`.", body = kernex_protocol::wire::ErrorBody), (status = 409, description = "`device_busy`: a target is being deployed this bundle by another deployment.", body = kernex_protocol::wire::ErrorBody), (status = 403, description = "`forbidden`: the key's role is below operator.", body = kernex_protocol::wire::ErrorBody)), security(("api_key" = [])))]
pub async fn create(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(body): ApiJson<CreateBody>,
) -> ApiResult<impl IntoResponse> {
    principal.require(Role::Operator)?;
    let bad = |m: String| ApiError::bad_request("invalid_deployment", m);
    let success_threshold = fraction("success_threshold", body.success_threshold, 1.0)?;
    let error_threshold = fraction("error_threshold", body.error_threshold, 0.0)?;
    let max_in_flight = body.max_in_flight.unwrap_or(10);
    if max_in_flight == 0 {
        return Err(bad("max_in_flight must be at least 1".into()));
    }
    let bundle = bundles::get(&state.db, &principal.tenant_id, &body.bundle)
        .await?
        .ok_or_else(|| {
            ApiError::not_found("unknown_bundle", format!("no bundle `{}`", body.bundle))
        })?;
    let targets = resolve_targets(&state, &principal, body.devices, body.selector).await?;
    let new = NewDeployment {
        tenant_id: principal.tenant_id.clone(),
        bundle_id: bundle.id.clone(),
        bundle_name: bundle.name.clone(),
        devices: targets,
        phases: body.phases.unwrap_or(vec![Phase::Percent(100.0)]),
        success_threshold,
        error_threshold,
        max_in_flight,
        allow_downgrade: body.allow_downgrade,
        rollback_of: None,
        created_by: principal.actor(),
    };
    let deployment = deployments::create(&state.db, &new).await?;
    audit::record(
        &state.db,
        Some(&principal.tenant_id),
        &principal.actor(),
        "deployment.created",
        &deployment.id,
        json!({"bundle": bundle.id, "name": bundle.name, "version": bundle.version, "devices": new.devices.len()}),
    )
    .await;
    state.rollouts.wake();
    Ok((
        StatusCode::CREATED,
        Json(DeploymentCreated { id: deployment.id }),
    ))
}

/// The target list: explicit ids (each must be a live device of the tenant) or a selector.
async fn resolve_targets(
    state: &AppState,
    principal: &Principal,
    ids: Option<Vec<String>>,
    selector: Option<Selector>,
) -> ApiResult<Vec<String>> {
    let bad = |m: String| ApiError::bad_request("invalid_deployment", m);
    let all = devices::list(&state.db, &principal.tenant_id).await?;
    let targets: Vec<String> = match (ids, selector) {
        (Some(ids), None) => {
            let mut seen = std::collections::HashSet::new();
            for id in &ids {
                if !seen.insert(id) {
                    return Err(bad(format!("device `{id}` is listed twice")));
                }
                match all.iter().find(|d| &d.id == id) {
                    None => {
                        return Err(ApiError::not_found(
                            "unknown_device",
                            format!("no device `{id}`"),
                        ))
                    }
                    Some(d) if d.deregistered_at.is_some() => {
                        return Err(bad(format!("device `{id}` is deregistered")))
                    }
                    Some(_) => {}
                }
            }
            ids
        }
        (None, Some(selector)) => all
            .iter()
            .filter(|d| d.deregistered_at.is_none())
            .filter(|d| {
                let labels = d.label_map();
                selector
                    .labels
                    .iter()
                    .all(|(k, v)| labels.get(k) == Some(v))
            })
            .map(|d| d.id.clone())
            .collect(),
        _ => return Err(bad("give either `devices` or `selector`".into())),
    };
    if targets.is_empty() {
        return Err(bad("no device matches the targets".into()));
    }
    Ok(targets)
}

#[utoipa::path(get, path = "/api/v1/deployments", tag = "deployments", responses((status = 200, description = "The tenant's deployments with aggregates (without `devices`).", body = [crate::db::deployments::DeploymentView])), security(("api_key" = [])))]
pub async fn list(State(state): State<AppState>, principal: Principal) -> ApiResult<Json<Value>> {
    let list = deployments::list(&state.db, &principal.tenant_id).await?;
    let mut views = Vec::with_capacity(list.len());
    for deployment in &list {
        let devices = deployments::devices(&state.db, &deployment.id).await?;
        let mut view = json!(deployment.view(&devices));
        if let Some(o) = view.as_object_mut() {
            o.remove("devices"); // the list shows aggregates; GET /deployments/{id} has devices
        }
        views.push(view);
    }
    Ok(Json(json!(views)))
}

#[utoipa::path(get, path = "/api/v1/deployments/{id}", tag = "deployments", params(("id" = String, Path, description = "Deployment id")), responses((status = 200, description = "The deployment with its devices.", body = crate::db::deployments::DeploymentView), (status = 404, description = "`unknown_deployment`.", body = kernex_protocol::wire::ErrorBody)), security(("api_key" = [])))]
pub async fn get(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Value>> {
    let deployment = deployments::get(&state.db, &principal.tenant_id, &id)
        .await?
        .ok_or_else(|| unknown_deployment(&id))?;
    let devices = deployments::devices(&state.db, &id).await?;
    Ok(Json(json!(deployment.view(&devices))))
}

fn unknown_deployment(id: &str) -> ApiError {
    ApiError::not_found("unknown_deployment", format!("no deployment `{id}`"))
}

async fn act(
    state: AppState,
    principal: Principal,
    id: String,
    action: Action,
) -> ApiResult<Json<Value>> {
    principal.require(Role::Operator)?;
    let before = deployments::get(&state.db, &principal.tenant_id, &id)
        .await?
        .ok_or_else(|| unknown_deployment(&id))?;
    let deployment = deployments::act(&state.db, &principal.tenant_id, &id, action)
        .await?
        .ok_or_else(|| unknown_deployment(&id))?;
    let name = match action {
        Action::Pause => "deployment.paused",
        Action::Resume => "deployment.resumed",
        Action::Cancel => "deployment.cancelled",
    };
    audit::record_change(
        &state.db,
        Some(&principal.tenant_id),
        &principal.actor(),
        name,
        &id,
        json!({"state": before.state}),
        json!({"state": deployment.state}),
    )
    .await;
    state.rollouts.wake();
    let devices = deployments::devices(&state.db, &id).await?;
    Ok(Json(json!(deployment.view(&devices))))
}

#[utoipa::path(post, path = "/api/v1/deployments/{id}/pause", tag = "deployments", params(("id" = String, Path, description = "Deployment id")), responses((status = 200, description = "The deployment after the change.", body = crate::db::deployments::DeploymentView), (status = 404, description = "`unknown_deployment`.", body = kernex_protocol::wire::ErrorBody), (status = 409, description = "`invalid_state`: not in a state this action applies to (e.g. resuming a cancelled deployment), or changed meanwhile.", body = kernex_protocol::wire::ErrorBody), (status = 403, description = "`forbidden`: the key's role is below operator.", body = kernex_protocol::wire::ErrorBody)), security(("api_key" = [])))]
pub async fn pause(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Value>> {
    act(state, principal, id, Action::Pause).await
}

#[utoipa::path(post, path = "/api/v1/deployments/{id}/resume", tag = "deployments", params(("id" = String, Path, description = "Deployment id")), responses((status = 200, description = "The deployment after the change.", body = crate::db::deployments::DeploymentView), (status = 404, description = "`unknown_deployment`.", body = kernex_protocol::wire::ErrorBody), (status = 409, description = "`invalid_state`: not in a state this action applies to (e.g. resuming a cancelled deployment), or changed meanwhile.", body = kernex_protocol::wire::ErrorBody), (status = 403, description = "`forbidden`: the key's role is below operator.", body = kernex_protocol::wire::ErrorBody)), security(("api_key" = [])))]
pub async fn resume(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Value>> {
    act(state, principal, id, Action::Resume).await
}

#[utoipa::path(post, path = "/api/v1/deployments/{id}/cancel", tag = "deployments", params(("id" = String, Path, description = "Deployment id")), responses((status = 200, description = "The deployment after the change.", body = crate::db::deployments::DeploymentView), (status = 404, description = "`unknown_deployment`.", body = kernex_protocol::wire::ErrorBody), (status = 409, description = "`invalid_state`: not in a state this action applies to (e.g. resuming a cancelled deployment), or changed meanwhile.", body = kernex_protocol::wire::ErrorBody), (status = 403, description = "`forbidden`: the key's role is below operator.", body = kernex_protocol::wire::ErrorBody)), security(("api_key" = [])))]
pub async fn cancel(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Value>> {
    act(state, principal, id, Action::Cancel).await
}

/// `POST /api/v1/deployments/{id}/rollback`: cancels the deployment if it still runs and deploys
/// the previous version of the bundle, explicitly allowed to downgrade, to every device that got
/// (or was getting) the new one.
#[utoipa::path(post, path = "/api/v1/deployments/{id}/rollback", tag = "deployments", params(("id" = String, Path, description = "Deployment id")), responses((status = 201, description = "A deployment of the previous version was created.", body = RollbackCreated), (status = 404, description = "`unknown_deployment`.", body = kernex_protocol::wire::ErrorBody), (status = 409, description = "`bundle_retired`, `no_previous_version`, `nothing_to_roll_back`, `device_busy`.", body = kernex_protocol::wire::ErrorBody), (status = 403, description = "`forbidden`: the key's role is below operator.", body = kernex_protocol::wire::ErrorBody)), security(("api_key" = [])))]
pub async fn rollback(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<impl IntoResponse> {
    principal.require(Role::Operator)?;
    let deployment = deployments::get(&state.db, &principal.tenant_id, &id)
        .await?
        .ok_or_else(|| unknown_deployment(&id))?;
    let bundle = bundles::get(&state.db, &principal.tenant_id, &deployment.bundle_id)
        .await?
        .ok_or_else(|| {
            ApiError::conflict(
                "bundle_retired",
                "the deployment's bundle is no longer stored",
            )
        })?;
    let previous = bundles::previous_version(
        &state.db,
        &principal.tenant_id,
        &bundle.name,
        &bundle.version,
    )
    .await?
    .ok_or_else(|| {
        ApiError::conflict(
            "no_previous_version",
            format!(
                "no stored version of {} older than {}",
                bundle.name, bundle.version
            ),
        )
    })?;
    if matches!(deployment.state.as_str(), "running" | "paused") {
        deployments::act(&state.db, &principal.tenant_id, &id, Action::Cancel).await?;
    }
    let targets = deployments::rollback_targets(&state.db, &id).await?;
    if targets.is_empty() {
        return Err(ApiError::conflict(
            "nothing_to_roll_back",
            format!(
                "no device of deployment `{id}` got {} {}",
                bundle.name, bundle.version
            ),
        ));
    }
    let new = NewDeployment {
        tenant_id: principal.tenant_id.clone(),
        bundle_id: previous.id.clone(),
        bundle_name: previous.name.clone(),
        devices: targets,
        phases: vec![Phase::Percent(100.0)],
        success_threshold: 0.0,
        error_threshold: 1.0,
        max_in_flight: deployment.max_in_flight.max(1) as u32,
        allow_downgrade: true,
        rollback_of: Some(id.clone()),
        created_by: principal.actor(),
    };
    let created = deployments::create(&state.db, &new).await?;
    audit::record(
        &state.db,
        Some(&principal.tenant_id),
        &principal.actor(),
        "deployment.rolled_back",
        &id,
        json!({"rollback": created.id, "to": previous.version}),
    )
    .await;
    state.rollouts.wake();
    Ok((
        StatusCode::CREATED,
        Json(RollbackCreated {
            id: created.id,
            version: previous.version,
        }),
    ))
}

/// `POST /api/v1/deployments/{id}/status`: a device reports a state change of its deployment.
#[utoipa::path(post, path = "/api/v1/deployments/{id}/status", tag = "device protocol", request_body = kernex_protocol::wire::DeploymentReport, params(("id" = String, Path, description = "Deployment id")), responses((status = 200, description = "Recorded.", body = kernex_protocol::wire::DeploymentReportResponse), (status = 400, description = "`malformed_json`, `invalid_request`.", body = kernex_protocol::wire::ErrorBody), (status = 404, description = "`unknown_deployment`.", body = kernex_protocol::wire::ErrorBody)), security(("device_token" = [])))]
pub async fn report(
    State(state): State<AppState>,
    DeviceAuth(claims): DeviceAuth,
    ApiPath(id): ApiPath<String>,
    ApiJson(report): ApiJson<DeploymentReport>,
) -> ApiResult<Json<DeploymentReportResponse>> {
    match deployments::report(&state.db, &id, &claims.device_id, &report).await? {
        Reported::UnknownDeployment => Err(unknown_deployment(&id)),
        Reported::Recorded {
            deployment_cancelled,
        } => {
            if report.state.is_terminal() {
                state.rollouts.wake();
            }
            Ok(Json(DeploymentReportResponse {
                cancelled: deployment_cancelled,
            }))
        }
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LabelsBody {
    labels: BTreeMap<String, String>,
}

/// `PUT /api/v1/devices/{id}/labels`: replaces the device's labels (selectors match them; the
/// `class` label is the device class bundles declare compatibility with).
#[utoipa::path(put, path = "/api/v1/devices/{id}/labels", tag = "devices", request_body = LabelsBody, params(("id" = String, Path, description = "Device id")), responses((status = 200, description = "The device's labels now.", body = DeviceLabels), (status = 400, description = "`invalid_labels`, `malformed_json`, `invalid_request`.", body = kernex_protocol::wire::ErrorBody), (status = 404, description = "`unknown_device`.", body = kernex_protocol::wire::ErrorBody), (status = 403, description = "`forbidden`: the key's role is below operator.", body = kernex_protocol::wire::ErrorBody)), security(("api_key" = [])))]
pub async fn put_labels(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<LabelsBody>,
) -> ApiResult<Json<DeviceLabels>> {
    principal.require(Role::Operator)?;
    for (k, v) in &body.labels {
        let valid = |s: &str, max: usize| {
            !s.is_empty()
                && s.len() <= max
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        };
        if !valid(k, 63) || !valid(v, 255) {
            return Err(ApiError::bad_request(
                "invalid_labels",
                format!("label {k:?}={v:?}: keys (1-63) and values (1-255) are letters, digits, '-', '_', '.' or '/'"),
            ));
        }
    }
    let unknown = || ApiError::not_found("unknown_device", format!("no device `{id}`"));
    let before = devices::in_tenant(&state.db, &principal.tenant_id, &id)
        .await?
        .ok_or_else(unknown)?
        .view(crate::db::now_ms(), state.settings.offline_after)
        .labels;
    if !devices::set_labels(&state.db, &principal.tenant_id, &id, &body.labels).await? {
        return Err(unknown());
    }
    audit::record_change(
        &state.db,
        Some(&principal.tenant_id),
        &principal.actor(),
        "device.labelled",
        &id,
        json!({"labels": before}),
        json!({"labels": body.labels}),
    )
    .await;
    Ok(Json(DeviceLabels {
        id,
        labels: body.labels,
    }))
}
