//! The console's pages and forms. Each reads and acts through the REST handlers (see the module
//! above), so a page never shows or does anything its user's API call could not.

use super::render::{page, sparkline, PageError};
use super::ConsoleSession;
use crate::api::extract::{ApiJson, ApiPath, ApiQuery};
use crate::api::{bundles, deployments, rest, users, AppState};
use crate::db::tokens::Role;
use crate::error::ApiError;
use axum::extract::{Form, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};
use std::collections::HashMap;

type PageResult = Result<Response, PageError>;

/// Rows of the devices page; the API (`GET /api/v1/devices`) lists them all.
const MAX_DEVICES_SHOWN: usize = 500;
type FormData = HashMap<String, String>;

impl ConsoleSession {
    /// An error page that still shows who is logged in.
    fn fail(&self, error: impl Into<ApiError>) -> PageError {
        PageError {
            error: error.into(),
            session: Some(Box::new(self.clone())),
        }
    }

    fn can(&self, role: Role) -> bool {
        self.principal().role >= role
    }
}

/// `context` with the fields of `extra` added (a page's optional parts: an error, a form, ...).
fn merged(mut context: Value, extra: Value) -> Value {
    if let (Some(object), Value::Object(extra)) = (context.as_object_mut(), extra) {
        object.extend(extra);
    }
    context
}

/// What a REST handler answered, as JSON (an empty body as `null`).
async fn call<R: IntoResponse>(result: Result<R, ApiError>) -> Result<Value, ApiError> {
    let response = result?.into_response();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("reading a handler's answer: {e}")))?;
    if bytes.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("a handler's answer is not JSON: {e}")))
}

/// A request body or query for a REST handler, from JSON built out of a form: the handler's own
/// validation then names what is wrong with it.
fn input<T: DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    serde_json::from_value(value)
        .map_err(|e| ApiError::bad_request("invalid_request", e.to_string()))
}

/// A form field, trimmed; absent when empty.
fn field<'a>(form: &'a FormData, name: &str) -> Option<&'a str> {
    form.get(name).map(|v| v.trim()).filter(|v| !v.is_empty())
}

/// A form field that must be a number, or a 400 naming the field.
fn number<T: std::str::FromStr>(form: &FormData, name: &str) -> Result<Option<T>, ApiError> {
    field(form, name)
        .map(|v| {
            v.parse().map_err(|_| {
                ApiError::bad_request("invalid_request", format!("{name}: {v:?} is not a number"))
            })
        })
        .transpose()
}

fn see_other(location: &str) -> Response {
    Redirect::to(location).into_response()
}

/// Whole percent of `total` not `free`.
fn percent_used(total: Option<&Value>, free: Option<&Value>) -> Option<i64> {
    let total = total?.as_f64()?;
    let free = free?.as_f64()?;
    (total > 0.0).then(|| ((total - free) / total * 100.0).round() as i64)
}

/// The fields a device row shows besides the API's view: used shares, sparkline points, VM counts.
fn decorate_device(state: &AppState, device: &mut Value) {
    let id = device["id"].as_str().unwrap_or_default().to_owned();
    let history = state.samples.history(&id);
    let telemetry = &device["telemetry"];
    let extra = json!({
        "mem_percent": percent_used(telemetry.get("mem_total_bytes"), telemetry.get("mem_available_bytes")),
        "disk_percent": percent_used(telemetry.get("disk_total_bytes"), telemetry.get("disk_free_bytes")),
        "cpu_percent": telemetry.get("cpu_percent").and_then(Value::as_f64).map(|c| c.round() as i64),
        "spark_cpu": sparkline(&history.cpu, 120.0, 24.0),
        "spark_mem": sparkline(&history.mem, 120.0, 24.0),
        "samples": history.cpu.len(),
        "vm_count": device["vms"].as_array().map_or(0, Vec::len),
        "vms_connected": device["vms"].as_array().map_or(0, |vms| {
            vms.iter().filter(|vm| vm["connected"] == json!(true)).count()
        }),
    });
    if let (Some(object), Value::Object(extra)) = (device.as_object_mut(), extra) {
        object.extend(extra);
    }
    for vm in device["vms"].as_array_mut().into_iter().flatten() {
        if let Some(seconds) = vm["last_seen"].as_i64() {
            vm["last_seen_at"] = json!(crate::db::rfc3339(seconds * 1000));
        }
    }
}

pub async fn devices(
    State(state): State<AppState>,
    s: ConsoleSession,
    Query(query): Query<FormData>,
) -> PageResult {
    let status = field(&query, "status");
    let filter = input(json!({ "status": status })).map_err(|e| s.fail(e))?;
    let mut list = call(
        rest::list_devices(
            State(state.clone()),
            s.principal().clone(),
            ApiQuery(filter),
        )
        .await,
    )
    .await
    .map_err(|e| s.fail(e))?;
    let mut counts = Map::new();
    let all = list.as_array_mut().map(std::mem::take).unwrap_or_default();
    let total = all.len();
    for device in &all {
        let status = device["status"].as_str().unwrap_or("unknown").to_owned();
        let n = counts.get(&status).and_then(Value::as_u64).unwrap_or(0);
        counts.insert(status, json!(n + 1));
    }
    // A page a browser can show: the first devices, counted all the same; the filters narrow it.
    let mut shown: Vec<Value> = all.into_iter().take(MAX_DEVICES_SHOWN).collect();
    for device in &mut shown {
        decorate_device(&state, device);
    }
    Ok(page(
        "devices.html",
        Some(&s),
        StatusCode::OK,
        json!({"nav": "devices", "devices": shown, "total": total, "counts": counts, "status": status}),
    ))
}

async fn device_page(
    state: &AppState,
    s: &ConsoleSession,
    id: String,
    status: StatusCode,
    error: Option<String>,
) -> PageResult {
    let principal = s.principal().clone();
    let mut device =
        call(rest::get_device(State(state.clone()), principal.clone(), ApiPath(id.clone())).await)
            .await
            .map_err(|e| s.fail(e))?;
    decorate_device(state, &mut device);
    let mut commands =
        call(rest::list_commands(State(state.clone()), principal, ApiPath(id)).await)
            .await
            .map_err(|e| s.fail(e))?;
    if let Some(list) = commands.as_array_mut() {
        list.reverse(); // newest first
        list.truncate(20);
    }
    Ok(page(
        "device.html",
        Some(s),
        status,
        json!({
            "nav": "devices",
            "device": device,
            "commands": commands,
            "can_operate": s.can(Role::Operator),
            "error": error,
        }),
    ))
}

pub async fn device(
    State(state): State<AppState>,
    s: ConsoleSession,
    Path(id): Path<String>,
) -> PageResult {
    device_page(&state, &s, id, StatusCode::OK, None).await
}

/// Runs a form's action; on success redirects to `done`, on a refusal shows `page` again with the
/// error (and the API's status) so nothing typed is lost.
async fn act<F, P>(
    s: &ConsoleSession,
    form: &FormData,
    done: String,
    action: F,
    page: P,
) -> PageResult
where
    F: std::future::Future<Output = Result<Value, ApiError>>,
    P: AsyncFnOnce(StatusCode, String) -> PageResult,
{
    s.check_form(form)?;
    match action.await {
        Ok(_) => Ok(see_other(&done)),
        Err(ApiError::Internal(e)) => Err(s.fail(ApiError::Internal(e))),
        Err(e) => page(e.status(), e.to_string()).await,
    }
}

pub async fn ping_device(
    State(state): State<AppState>,
    s: ConsoleSession,
    Path(id): Path<String>,
    Form(form): Form<FormData>,
) -> PageResult {
    let body = input(json!({"kind": "ping"})).map_err(|e| s.fail(e))?;
    let action = async {
        call(
            rest::queue_command(
                State(state.clone()),
                s.principal().clone(),
                ApiPath(id.clone()),
                ApiJson(body),
            )
            .await,
        )
        .await
    };
    act(
        &s,
        &form,
        format!("/console/devices/{id}"),
        action,
        async |status, error| device_page(&state, &s, id.clone(), status, Some(error)).await,
    )
    .await
}

pub async fn deregister_device(
    State(state): State<AppState>,
    s: ConsoleSession,
    Path(id): Path<String>,
    Form(form): Form<FormData>,
) -> PageResult {
    let action = async {
        let done = call(
            rest::deregister_device(
                State(state.clone()),
                s.principal().clone(),
                ApiPath(id.clone()),
            )
            .await,
        )
        .await;
        if done.is_ok() {
            state.samples.forget(&id);
        }
        done
    };
    act(
        &s,
        &form,
        format!("/console/devices/{id}"),
        action,
        async |status, error| device_page(&state, &s, id.clone(), status, Some(error)).await,
    )
    .await
}

async fn tokens_page(
    state: &AppState,
    s: &ConsoleSession,
    status: StatusCode,
    extra: Value,
) -> PageResult {
    let tokens = call(rest::list_tokens(State(state.clone()), s.principal().clone()).await)
        .await
        .map_err(|e| s.fail(e))?;
    let context = merged(
        json!({"nav": "tokens", "tokens": tokens, "can_admin": s.can(Role::Admin)}),
        extra,
    );
    Ok(page("tokens.html", Some(s), status, context))
}

pub async fn tokens(State(state): State<AppState>, s: ConsoleSession) -> PageResult {
    tokens_page(&state, &s, StatusCode::OK, json!({})).await
}

/// `POST /console/tokens`: shows the new token once, on the page that answers the form.
pub async fn create_token(
    State(state): State<AppState>,
    s: ConsoleSession,
    Form(form): Form<FormData>,
) -> PageResult {
    s.check_form(&form)?;
    let created = async {
        let body = input(json!({
            "uses": number::<u32>(&form, "uses")?,
            "ttl": field(&form, "ttl"),
            "description": field(&form, "description").unwrap_or_default(),
        }))?;
        call(rest::create_token(State(state.clone()), s.principal().clone(), ApiJson(body)).await)
            .await
    }
    .await;
    match created {
        Ok(token) => tokens_page(&state, &s, StatusCode::CREATED, json!({"created": token})).await,
        Err(ApiError::Internal(e)) => Err(s.fail(ApiError::Internal(e))),
        Err(e) => {
            tokens_page(
                &state,
                &s,
                e.status(),
                json!({"error": e.to_string(), "form": form}),
            )
            .await
        }
    }
}

pub async fn revoke_token(
    State(state): State<AppState>,
    s: ConsoleSession,
    Path(id): Path<String>,
    Form(form): Form<FormData>,
) -> PageResult {
    let action = async {
        call(
            rest::revoke_token(
                State(state.clone()),
                s.principal().clone(),
                ApiPath(id.clone()),
            )
            .await,
        )
        .await
    };
    act(
        &s,
        &form,
        "/console/tokens".into(),
        action,
        async |status, error| tokens_page(&state, &s, status, json!({"error": error})).await,
    )
    .await
}

pub async fn bundles(State(state): State<AppState>, s: ConsoleSession) -> PageResult {
    let principal = s.principal().clone();
    let bundles = call(bundles::list(State(state.clone()), principal.clone()).await)
        .await
        .map_err(|e| s.fail(e))?;
    let keys = call(bundles::list_publisher_keys(State(state.clone()), principal).await)
        .await
        .map_err(|e| s.fail(e))?;
    Ok(page(
        "bundles.html",
        Some(&s),
        StatusCode::OK,
        json!({"nav": "bundles", "bundles": bundles, "keys": keys}),
    ))
}

async fn deployments_page(
    state: &AppState,
    s: &ConsoleSession,
    status: StatusCode,
    extra: Value,
) -> PageResult {
    let principal = s.principal().clone();
    let mut deployments = call(deployments::list(State(state.clone()), principal.clone()).await)
        .await
        .map_err(|e| s.fail(e))?;
    let bundles = call(bundles::list(State(state.clone()), principal).await)
        .await
        .map_err(|e| s.fail(e))?;
    for deployment in deployments.as_array_mut().into_iter().flatten() {
        deployment["bundle_label"] = bundle_label(&bundles, &deployment["bundle"]);
    }
    let context = merged(
        json!({
            "nav": "deployments",
            "deployments": deployments,
            "bundles": bundles,
            "can_operate": s.can(Role::Operator),
        }),
        extra,
    );
    Ok(page("deployments.html", Some(s), status, context))
}

pub async fn deployments(State(state): State<AppState>, s: ConsoleSession) -> PageResult {
    deployments_page(&state, &s, StatusCode::OK, json!({})).await
}

/// `name version` of the bundle with id `id`, or the id when it is no longer stored.
fn bundle_label(bundles: &Value, id: &Value) -> Value {
    bundles
        .as_array()
        .and_then(|all| all.iter().find(|b| &b["id"] == id))
        .map_or(id.clone(), |b| {
            json!(format!(
                "{} {}",
                b["name"].as_str().unwrap_or_default(),
                b["version"].as_str().unwrap_or_default()
            ))
        })
}

/// The deployment body of the console's form: targets as device ids or `key=value` labels,
/// phases as a comma list (`1, 50%, 100%`).
fn deployment_body(form: &FormData) -> Result<Value, ApiError> {
    // Ids split on commas and white space; labels only on commas and lines (`a = b` is one).
    let list = |name: &str| -> Vec<String> {
        let separators: &[char] = if name == "selector" {
            &[',', '\n']
        } else {
            &[',', ' ', '\n']
        };
        field(form, name)
            .unwrap_or_default()
            .split(separators)
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let mut body = json!({
        "bundle": field(form, "bundle").ok_or_else(|| {
            ApiError::bad_request("invalid_deployment", "choose a bundle")
        })?,
        "max_in_flight": number::<u32>(form, "max_in_flight")?,
        "success_threshold": number::<f64>(form, "success_threshold")?,
        "error_threshold": number::<f64>(form, "error_threshold")?,
        "allow_downgrade": field(form, "allow_downgrade").is_some(),
    });
    let phases: Vec<Value> = list("phases")
        .into_iter()
        .map(|p| p.parse::<u64>().map_or(json!(p), |n| json!(n)))
        .collect();
    if !phases.is_empty() {
        body["phases"] = json!(phases);
    }
    match (list("devices"), list("selector")) {
        (devices, selector) if !devices.is_empty() && selector.is_empty() => {
            body["devices"] = json!(devices);
        }
        (devices, selector) if devices.is_empty() && !selector.is_empty() => {
            let mut labels = Map::new();
            for pair in selector {
                let (k, v) = pair.split_once('=').ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_deployment",
                        format!("selector {pair:?}: expected key=value"),
                    )
                })?;
                labels.insert(k.trim().to_owned(), json!(v.trim()));
            }
            body["selector"] = json!({"labels": labels});
        }
        _ => {
            return Err(ApiError::bad_request(
                "invalid_deployment",
                "give either device ids or a label selector (key=value), not both",
            ))
        }
    }
    Ok(body)
}

pub async fn create_deployment(
    State(state): State<AppState>,
    s: ConsoleSession,
    Form(form): Form<FormData>,
) -> PageResult {
    s.check_form(&form)?;
    let created = async {
        let body = input(deployment_body(&form)?)?;
        call(deployments::create(State(state.clone()), s.principal().clone(), ApiJson(body)).await)
            .await
    }
    .await;
    match created {
        Ok(created) => Ok(see_other(&format!(
            "/console/deployments/{}",
            created["id"].as_str().unwrap_or_default()
        ))),
        Err(ApiError::Internal(e)) => Err(s.fail(ApiError::Internal(e))),
        Err(e) => {
            deployments_page(
                &state,
                &s,
                e.status(),
                json!({"error": e.to_string(), "form": form}),
            )
            .await
        }
    }
}

async fn deployment_page(
    state: &AppState,
    s: &ConsoleSession,
    id: String,
    status: StatusCode,
    error: Option<String>,
) -> PageResult {
    let mut deployment =
        call(deployments::get(State(state.clone()), s.principal().clone(), ApiPath(id)).await)
            .await
            .map_err(|e| s.fail(e))?;
    // Per phase: its reach and how many of its devices are in each state, as bar widths.
    let phases = deployment["phases"].as_array().cloned().unwrap_or_default();
    let totals = deployment["phase_totals"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let progress: Vec<Value> = phases
        .iter()
        .zip(totals.iter().chain(std::iter::repeat(&json!({}))))
        .enumerate()
        .map(|(i, (reach, counts))| {
            let all: u64 = counts
                .as_object()
                .map_or(0, |c| c.values().filter_map(Value::as_u64).sum());
            let share = |state: &str| {
                let n = counts[state].as_u64().unwrap_or(0);
                if all == 0 {
                    0.0
                } else {
                    (n as f64 * 100.0 / all as f64).round()
                }
            };
            json!({
                "number": i + 1,
                "reach": reach,
                "devices": all,
                "counts": counts,
                "succeeded": share("succeeded"),
                "failed": share("failed") + share("rolled_back"),
                "current": deployment["current_phase"].as_u64() == Some(i as u64),
            })
        })
        .collect();
    deployment["progress"] = json!(progress);
    // Only this deployment's bundle; a retired one (404) is named by its id.
    let bundle_id = deployment["bundle"].as_str().unwrap_or_default().to_owned();
    let bundle = match call(
        bundles::get(
            State(state.clone()),
            s.principal().clone(),
            ApiPath(bundle_id),
        )
        .await,
    )
    .await
    {
        Ok(bundle) => bundle,
        Err(ApiError::NotFound { .. }) => Value::Null,
        Err(e) => return Err(s.fail(e)),
    };
    deployment["bundle_label"] = bundle_label(&json!([bundle]), &deployment["bundle"]);
    let state_name = deployment["state"].as_str().unwrap_or_default().to_owned();
    Ok(page(
        "deployment.html",
        Some(s),
        status,
        json!({
            "nav": "deployments",
            "deployment": deployment,
            "can_operate": s.can(Role::Operator),
            "running": matches!(state_name.as_str(), "running" | "paused"),
            "error": error,
        }),
    ))
}

pub async fn deployment(
    State(state): State<AppState>,
    s: ConsoleSession,
    Path(id): Path<String>,
) -> PageResult {
    deployment_page(&state, &s, id, StatusCode::OK, None).await
}

/// `POST /console/deployments/{id}/{pause|resume|cancel|rollback}`.
pub async fn act_on_deployment(
    State(state): State<AppState>,
    s: ConsoleSession,
    Path((id, action)): Path<(String, String)>,
    Form(form): Form<FormData>,
) -> PageResult {
    s.check_form(&form)?;
    let (st, p, path) = (
        State(state.clone()),
        s.principal().clone(),
        ApiPath(id.clone()),
    );
    let result = match action.as_str() {
        "pause" => call(deployments::pause(st, p, path).await).await,
        "resume" => call(deployments::resume(st, p, path).await).await,
        "cancel" => call(deployments::cancel(st, p, path).await).await,
        "rollback" => call(deployments::rollback(st, p, path).await).await,
        other => {
            return Err(s.fail(ApiError::not_found(
                "not_found",
                format!("deployments have no action {other:?}"),
            )))
        }
    };
    match result {
        // A rollback is a new deployment: show that one.
        Ok(done) if action == "rollback" => Ok(see_other(&format!(
            "/console/deployments/{}",
            done["id"].as_str().unwrap_or(&id)
        ))),
        Ok(_) => Ok(see_other(&format!("/console/deployments/{id}"))),
        Err(ApiError::Internal(e)) => Err(s.fail(ApiError::Internal(e))),
        Err(e) => deployment_page(&state, &s, id, e.status(), Some(e.to_string())).await,
    }
}

/// `GET /console/audit`: filters and paging as the API's; `format=csv|ndjson` downloads the
/// export the API would.
pub async fn audit(
    State(state): State<AppState>,
    s: ConsoleSession,
    Query(query): Query<FormData>,
) -> PageResult {
    let mut filter = Map::new();
    for name in ["action", "actor", "subject", "since", "until", "format"] {
        if let Some(v) = field(&query, name) {
            filter.insert(name.into(), json!(v));
        }
    }
    if let Some(before) = number::<i64>(&query, "before").map_err(|e| s.fail(e))? {
        filter.insert("before".into(), json!(before));
    }
    let export = filter.contains_key("format");
    // A page shows 50; an export is as long as the API allows.
    filter.insert("limit".into(), json!(if export { 100_000 } else { 50 }));
    let q = input(Value::Object(filter)).map_err(|e| s.fail(e))?;
    let response = rest::list_audit(State(state.clone()), s.principal().clone(), ApiQuery(q))
        .await
        .map_err(|e| s.fail(e))?;
    if export && field(&query, "format") != Some("json") {
        return Ok(response);
    }
    let events = call(Ok(response)).await.map_err(|e| s.fail(e))?;
    let older = events
        .as_array()
        .filter(|e| e.len() == 50)
        .and_then(|e| e.last())
        .map(|e| e["id"].clone());
    Ok(page(
        "audit.html",
        Some(&s),
        StatusCode::OK,
        json!({"nav": "audit", "events": events, "filter": query, "older": older}),
    ))
}

async fn tenant_page(
    state: &AppState,
    s: &ConsoleSession,
    status: StatusCode,
    extra: Value,
) -> PageResult {
    let principal = s.principal().clone();
    let tenant = call(
        rest::get_tenant(
            State(state.clone()),
            principal.clone(),
            ApiPath(principal.tenant_name.clone()),
        )
        .await,
    )
    .await
    .map_err(|e| s.fail(e))?;
    // Keys and users are for admins, as in the API.
    let (keys, users) = if s.can(Role::Admin) {
        let keys = call(rest::list_api_keys(State(state.clone()), principal.clone()).await)
            .await
            .map_err(|e| s.fail(e))?;
        let users = call(users::list(State(state.clone()), principal).await)
            .await
            .map_err(|e| s.fail(e))?;
        (keys, users)
    } else {
        (Value::Null, Value::Null)
    };
    let context = merged(
        json!({"nav": "tenant", "tenant": tenant, "keys": keys, "users": users}),
        extra,
    );
    Ok(page("tenant.html", Some(s), status, context))
}

pub async fn tenant(State(state): State<AppState>, s: ConsoleSession) -> PageResult {
    tenant_page(&state, &s, StatusCode::OK, json!({})).await
}

/// `POST /console/users`: a new console user of the tenant (admins).
pub async fn create_user(
    State(state): State<AppState>,
    s: ConsoleSession,
    Form(form): Form<FormData>,
) -> PageResult {
    let body = json!({
        "username": field(&form, "username").unwrap_or_default(),
        "password": form.get("password").map(String::as_str).unwrap_or_default(),
        "role": field(&form, "role").unwrap_or("viewer"),
    });
    let action = async {
        let body = input(body)?;
        call(users::create(State(state.clone()), s.principal().clone(), ApiJson(body)).await).await
    };
    // The password is not sent back into the form.
    let kept = json!({"username": form.get("username"), "role": form.get("role")});
    act(
        &s,
        &form,
        "/console/tenant".into(),
        action,
        async |status, error| {
            tenant_page(&state, &s, status, json!({"error": error, "form": kept})).await
        },
    )
    .await
}

pub async fn disable_user(
    State(state): State<AppState>,
    s: ConsoleSession,
    Path(username): Path<String>,
    Form(form): Form<FormData>,
) -> PageResult {
    let action = async {
        call(
            users::disable(
                State(state.clone()),
                s.principal().clone(),
                ApiPath(username.clone()),
            )
            .await,
        )
        .await
    };
    act(
        &s,
        &form,
        "/console/tenant".into(),
        action,
        async |status, error| tenant_page(&state, &s, status, json!({"error": error})).await,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(pairs: &[(&str, &str)]) -> FormData {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn deployment_forms_become_api_bodies() {
        let body = deployment_body(&form(&[
            ("bundle", "b1"),
            ("selector", "site=lab, role = edge"),
            ("phases", "1, 50%,100%"),
            ("max_in_flight", "2"),
            ("success_threshold", ""),
        ]))
        .unwrap();
        assert_eq!(
            body,
            json!({
                "bundle": "b1",
                "selector": {"labels": {"site": "lab", "role": "edge"}},
                "phases": [1, "50%", "100%"],
                "max_in_flight": 2,
                "success_threshold": null,
                "error_threshold": null,
                "allow_downgrade": false,
            })
        );
        let body = deployment_body(&form(&[("bundle", "b1"), ("devices", "d1 d2")])).unwrap();
        assert_eq!(body["devices"], json!(["d1", "d2"]));

        for (bad, expected) in [
            (form(&[("devices", "d1")]), "choose a bundle"),
            (
                form(&[("bundle", "b"), ("devices", "d"), ("selector", "a=b")]),
                "not both",
            ),
            (form(&[("bundle", "b")]), "not both"),
            (
                form(&[("bundle", "b"), ("selector", "site")]),
                "\"site\": expected key=value",
            ),
            (
                form(&[("bundle", "b"), ("devices", "d"), ("max_in_flight", "many")]),
                "max_in_flight: \"many\" is not a number",
            ),
        ] {
            let err = deployment_body(&bad).unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
        }
    }
}
