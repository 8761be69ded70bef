//! Deployments: a bundle rolled out to a set of devices in phases, and each device's progress.
//!
//! Every change to a running deployment happens in a transaction that first writes the
//! deployment's row (`UPDATE deployments SET updated_at ...`): PostgreSQL locks that row and SQLite
//! takes its write lock, so two engines (replicas, or a replica racing a status report) never act on
//! the same deployment at once, and a device is released (`pending` → `queued`, with its `deploy`
//! command inserted in the same transaction) exactly once.

use super::{new_id, now_ms, rfc3339, with_pool, BeginWrite as _, Db};
use crate::error::ApiError;
use kernex_protocol::wire::{CommandSpec, DeployArgs, DeploymentReport, DeploymentState};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Deployment {
    pub id: String,
    pub tenant_id: String,
    pub bundle_id: String,
    /// `running`, `paused`, `succeeded`, `halted` or `cancelled`.
    pub state: String,
    /// JSON array of [`Phase`].
    pub phases: String,
    pub current_phase: i64,
    pub success_threshold: f64,
    pub error_threshold: f64,
    pub max_in_flight: i64,
    pub allow_downgrade: i64,
    pub rollback_of: Option<String>,
    pub message: String,
    pub created_by: String,
    pub created_at: i64,
    pub updated_at: i64,
    pub finished_at: Option<i64>,
}

const DEPLOYMENT_COLUMNS: &str = "id, tenant_id, bundle_id, state, phases, current_phase, success_threshold, error_threshold, max_in_flight, allow_downgrade, rollback_of, message, created_by, created_at, updated_at, finished_at";

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeploymentDevice {
    pub deployment_id: String,
    pub device_id: String,
    pub phase: i64,
    pub position: i64,
    pub state: String,
    pub command_id: Option<String>,
    pub message: String,
    pub log_tail: String,
    /// JSON array of `{"state", "at"}`: every state the device went through.
    pub history: String,
    pub updated_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

const DEVICE_COLUMNS: &str = "deployment_id, device_id, phase, position, state, command_id, message, log_tail, history, updated_at, started_at, finished_at";

/// How far a phase reaches, cumulatively: `1` device, `"10%"` of the targets, `"100%"`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Phase {
    Devices(u64),
    Percent(f64),
}

impl Serialize for Phase {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Phase::Devices(n) => s.serialize_u64(*n),
            Phase::Percent(p) => s.serialize_str(&format!("{p}%")),
        }
    }
}

impl<'de> Deserialize<'de> for Phase {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Phase, D::Error> {
        use serde::de::Error as _;
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Number(n) => match n.as_u64() {
                Some(n) if n > 0 => Ok(Phase::Devices(n)),
                _ => Err(D::Error::custom(format!(
                    "phase {n} must be a device count of at least 1"
                ))),
            },
            serde_json::Value::String(text) => {
                let p = text
                    .strip_suffix('%')
                    .and_then(|n| n.trim().parse::<f64>().ok())
                    .ok_or_else(|| {
                        D::Error::custom(format!("phase {text:?} is not a percentage like \"10%\""))
                    })?;
                if !(p > 0.0 && p <= 100.0) {
                    return Err(D::Error::custom(format!(
                        "phase {text:?} must be above 0% and at most 100%"
                    )));
                }
                Ok(Phase::Percent(p))
            }
            other => Err(D::Error::custom(format!(
                "phase {other} is not a device count or a percentage like \"10%\""
            ))),
        }
    }
}

/// The schema of a phase in the OpenAPI document, beside the hand-written serde above.
impl utoipa::PartialSchema for Phase {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(1))
                    .description(Some("Devices covered by the end of the phase")),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(r"^[0-9]+(\.[0-9]+)?%$"))
                    .description(Some("Share of the targets, above 0% and at most 100%")),
            )
            .into()
    }
}

impl utoipa::ToSchema for Phase {}

impl Phase {
    /// Devices covered by the end of this phase, out of `total`.
    fn reach(self, total: u64) -> u64 {
        match self {
            Phase::Devices(n) => n.min(total),
            Phase::Percent(p) => ((total as f64) * p / 100.0).ceil() as u64,
        }
    }
}

/// Assigns each of `total` targets (in order) its phase; refuses phases that shrink, leave a phase
/// empty or do not reach every target.
pub fn assign_phases(phases: &[Phase], total: u64) -> Result<Vec<i64>, String> {
    if phases.is_empty() {
        return Err("at least one phase is needed, e.g. [\"100%\"]".into());
    }
    let mut assignment = Vec::with_capacity(total as usize);
    let mut reached = 0u64;
    for (index, phase) in phases.iter().enumerate() {
        let reach = phase.reach(total);
        if reach <= reached {
            return Err(format!(
                "phase {} ({}) adds no device: phases are cumulative and must grow",
                index + 1,
                serde_json::to_string(phase).unwrap_or_default()
            ));
        }
        assignment.extend(std::iter::repeat_n(
            index as i64,
            (reach - reached) as usize,
        ));
        reached = reach;
    }
    if reached < total {
        return Err(format!(
            "the phases reach {reached} of {total} devices: end with \"100%\""
        ));
    }
    Ok(assignment)
}

/// A deployment as the API shows it, with per-phase and per-state aggregates.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeploymentView {
    pub id: String,
    pub bundle: String,
    pub state: String,
    pub message: String,
    pub phases: serde_json::Value,
    pub current_phase: i64,
    pub success_threshold: f64,
    pub error_threshold: f64,
    pub max_in_flight: i64,
    pub allow_downgrade: bool,
    pub rollback_of: Option<String>,
    pub created_by: String,
    pub created_at: String,
    pub updated_at: String,
    pub finished_at: Option<String>,
    /// Devices per state over the whole deployment.
    pub totals: BTreeMap<String, u64>,
    /// Devices per state, per phase.
    pub phase_totals: Vec<BTreeMap<String, u64>>,
    /// Absent from the list (`GET /api/v1/deployments`), present for one deployment.
    #[schema(required = false)]
    pub devices: Vec<DeploymentDeviceView>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeploymentDeviceView {
    pub id: String,
    pub phase: i64,
    pub state: String,
    pub message: String,
    pub log_tail: String,
    pub history: serde_json::Value,
    pub updated_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

impl Deployment {
    pub fn view(&self, devices: &[DeploymentDevice]) -> DeploymentView {
        let phases: Vec<Phase> = serde_json::from_str(&self.phases).unwrap_or_default();
        let mut totals = BTreeMap::new();
        let mut phase_totals = vec![BTreeMap::new(); phases.len().max(1)];
        for d in devices {
            *totals.entry(d.state.clone()).or_insert(0) += 1;
            if let Some(slot) = phase_totals.get_mut(d.phase as usize) {
                *slot.entry(d.state.clone()).or_insert(0) += 1;
            }
        }
        DeploymentView {
            id: self.id.clone(),
            bundle: self.bundle_id.clone(),
            state: self.state.clone(),
            message: self.message.clone(),
            phases: serde_json::from_str(&self.phases).unwrap_or(serde_json::Value::Null),
            current_phase: self.current_phase,
            success_threshold: self.success_threshold,
            error_threshold: self.error_threshold,
            max_in_flight: self.max_in_flight,
            allow_downgrade: self.allow_downgrade != 0,
            rollback_of: self.rollback_of.clone(),
            created_by: self.created_by.clone(),
            created_at: rfc3339(self.created_at),
            updated_at: rfc3339(self.updated_at),
            finished_at: self.finished_at.map(rfc3339),
            totals,
            phase_totals,
            devices: devices
                .iter()
                .map(|d| DeploymentDeviceView {
                    id: d.device_id.clone(),
                    phase: d.phase,
                    state: d.state.clone(),
                    message: d.message.clone(),
                    log_tail: d.log_tail.clone(),
                    history: serde_json::from_str(&d.history).unwrap_or(serde_json::Value::Null),
                    updated_at: rfc3339(d.updated_at),
                    started_at: d.started_at.map(rfc3339),
                    finished_at: d.finished_at.map(rfc3339),
                })
                .collect(),
        }
    }
}

/// What `create` needs, validated by the API layer.
#[derive(Debug)]
pub struct NewDeployment {
    pub tenant_id: String,
    pub bundle_id: String,
    pub bundle_name: String,
    /// Targets in rollout order.
    pub devices: Vec<String>,
    pub phases: Vec<Phase>,
    pub success_threshold: f64,
    pub error_threshold: f64,
    pub max_in_flight: u32,
    pub allow_downgrade: bool,
    pub rollback_of: Option<String>,
    pub created_by: String,
}

/// Stores a deployment and its targets (all `pending`); the engine releases them. Refuses a
/// device that an unfinished deployment of the same bundle name already targets.
#[tracing::instrument(name = "db.deployments.create", level = "info", skip_all)]
pub async fn create(db: &Db, new: &NewDeployment) -> Result<Deployment, ApiError> {
    let assignment = assign_phases(&new.phases, new.devices.len() as u64)
        .map_err(|m| ApiError::bad_request("invalid_phases", m))?;
    let now = now_ms();
    let deployment = Deployment {
        id: new_id(),
        tenant_id: new.tenant_id.clone(),
        bundle_id: new.bundle_id.clone(),
        state: "running".into(),
        phases: serde_json::to_string(&new.phases).map_err(anyhow::Error::from)?,
        current_phase: 0,
        success_threshold: new.success_threshold,
        error_threshold: new.error_threshold,
        max_in_flight: i64::from(new.max_in_flight),
        allow_downgrade: i64::from(new.allow_downgrade),
        rollback_of: new.rollback_of.clone(),
        message: String::new(),
        created_by: new.created_by.clone(),
        created_at: now,
        updated_at: now,
        finished_at: None,
    };
    let busy: Vec<String> = with_pool!(db, pool => {
        let mut tx = pool.begin_write().await?;
        let mut busy = Vec::new();
        for device in &new.devices {
            let other: Option<String> = sqlx::query_scalar(
                "SELECT d.id FROM deployment_devices dd JOIN deployments d ON d.id = dd.deployment_id
                 JOIN bundles b ON b.id = d.bundle_id
                 WHERE dd.device_id = $1 AND b.name = $2 AND d.state IN ('running', 'paused')
                   AND dd.state IN ('pending', 'queued', 'downloading', 'verifying', 'installing', 'health-checking')")
                .bind(device).bind(&new.bundle_name).fetch_optional(&mut *tx).await?;
            if let Some(other) = other {
                busy.push(format!("{device} (deployment {other})"));
            }
        }
        if busy.is_empty() {
            sqlx::query(&format!(
                "INSERT INTO deployments ({DEPLOYMENT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"))
                .bind(&deployment.id).bind(&deployment.tenant_id).bind(&deployment.bundle_id)
                .bind(&deployment.state).bind(&deployment.phases).bind(deployment.current_phase)
                .bind(deployment.success_threshold).bind(deployment.error_threshold)
                .bind(deployment.max_in_flight).bind(deployment.allow_downgrade)
                .bind(&deployment.rollback_of).bind(&deployment.message).bind(&deployment.created_by)
                .bind(deployment.created_at).bind(deployment.updated_at).bind(deployment.finished_at)
                .execute(&mut *tx).await?;
            for (position, (device, phase)) in new.devices.iter().zip(&assignment).enumerate() {
                sqlx::query(
                    "INSERT INTO deployment_devices (deployment_id, device_id, phase, position, state, history, updated_at)
                     VALUES ($1, $2, $3, $4, 'pending', $5, $6)")
                    .bind(&deployment.id).bind(device).bind(phase).bind(position as i64)
                    .bind(history_with("[]", "pending", now)).bind(now)
                    .execute(&mut *tx).await?;
            }
            tx.commit().await?;
        }
        Ok::<_, sqlx::Error>(busy)
    })?;
    if !busy.is_empty() {
        return Err(ApiError::conflict(
            "device_busy",
            format!(
                "already being deployed {} by another deployment: {}",
                new.bundle_name,
                busy.join(", ")
            ),
        ));
    }
    Ok(deployment)
}

/// Cancels, inside transaction `$tx`, every device of deployment `$id` not released yet, with
/// `$message`. A macro because it runs inside `with_pool!` bodies, once per backend's
/// transaction type.
macro_rules! cancel_pending {
    ($tx:ident, $id:expr, $message:expr, $now:expr) => {{
        let pending: Vec<(String, String)> = sqlx::query_as(
            "SELECT device_id, history FROM deployment_devices WHERE deployment_id = $1 AND state = 'pending'",
        )
        .bind($id)
        .fetch_all(&mut *$tx)
        .await?;
        for (device, history) in pending {
            sqlx::query(
                "UPDATE deployment_devices SET state = 'cancelled', message = $1, history = $2, updated_at = $3,
                    finished_at = $3 WHERE deployment_id = $4 AND device_id = $5 AND state = 'pending'",
            )
            .bind($message)
            .bind(history_with(&history, "cancelled", $now))
            .bind($now)
            .bind($id)
            .bind(&device)
            .execute(&mut *$tx)
            .await?;
        }
    }};
}

fn history_with(history: &str, state: &str, at: i64) -> String {
    let mut entries: Vec<serde_json::Value> = serde_json::from_str(history).unwrap_or_default();
    entries.push(serde_json::json!({"state": state, "at": rfc3339(at)}));
    serde_json::Value::Array(entries).to_string()
}

#[tracing::instrument(name = "db.deployments.get", level = "info", skip_all)]
pub async fn get(db: &Db, tenant_id: &str, id: &str) -> Result<Option<Deployment>, sqlx::Error> {
    with_pool!(db, pool => sqlx::query_as::<_, Deployment>(&format!(
        "SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE tenant_id = $1 AND id = $2"))
        .bind(tenant_id).bind(id).fetch_optional(pool).await)
}

#[tracing::instrument(name = "db.deployments.list", level = "info", skip_all)]
pub async fn list(db: &Db, tenant_id: &str) -> Result<Vec<Deployment>, sqlx::Error> {
    with_pool!(db, pool => sqlx::query_as::<_, Deployment>(&format!(
        "SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE tenant_id = $1 ORDER BY created_at, id"))
        .bind(tenant_id).fetch_all(pool).await)
}

#[tracing::instrument(name = "db.deployments.devices", level = "info", skip_all)]
pub async fn devices(db: &Db, deployment_id: &str) -> Result<Vec<DeploymentDevice>, sqlx::Error> {
    with_pool!(db, pool => sqlx::query_as::<_, DeploymentDevice>(&format!(
        "SELECT {DEVICE_COLUMNS} FROM deployment_devices WHERE deployment_id = $1 ORDER BY position"))
        .bind(deployment_id).fetch_all(pool).await)
}

/// Ids of deployments the engine has work on.
#[tracing::instrument(name = "db.deployments.running", level = "info", skip_all)]
pub async fn running(db: &Db) -> Result<Vec<String>, sqlx::Error> {
    with_pool!(db, pool => sqlx::query_scalar::<_, String>(
        "SELECT id FROM deployments WHERE state = 'running' ORDER BY created_at")
        .fetch_all(pool).await)
}

/// True when `device_id` is a target of an unfinished deployment of `bundle_id` that has released
/// it: the only case in which a device may download the bundle.
pub async fn device_may_fetch(
    db: &Db,
    device_id: &str,
    bundle_id: &str,
) -> Result<bool, sqlx::Error> {
    let n: i64 = with_pool!(db, pool => sqlx::query_scalar(
        "SELECT COUNT(*) FROM deployment_devices dd JOIN deployments d ON d.id = dd.deployment_id
         WHERE dd.device_id = $1 AND d.bundle_id = $2 AND dd.state <> 'pending'")
        .bind(device_id).bind(bundle_id).fetch_one(pool).await)?;
    Ok(n > 0)
}

/// Operator actions on a whole deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pause,
    Resume,
    Cancel,
}

/// Applies `action`; returns the deployment after it, or a 409 naming the state that forbids it.
#[tracing::instrument(name = "db.deployments.act", level = "info", skip_all)]
pub async fn act(
    db: &Db,
    tenant_id: &str,
    id: &str,
    action: Action,
) -> Result<Option<Deployment>, ApiError> {
    let now = now_ms();
    let (from, to): (&[&str], &str) = match action {
        Action::Pause => (&["running"], "paused"),
        Action::Resume => (&["paused"], "running"),
        Action::Cancel => (&["running", "paused"], "cancelled"),
    };
    let Some(deployment) = get(db, tenant_id, id).await? else {
        return Ok(None);
    };
    if !from.contains(&deployment.state.as_str()) {
        return Err(ApiError::conflict(
            "invalid_state",
            format!("deployment `{id}` is {}", deployment.state),
        ));
    }
    let finished = (to == "cancelled").then_some(now);
    let changed = with_pool!(db, pool => {
        let mut tx = pool.begin_write().await?;
        let changed = sqlx::query(
            "UPDATE deployments SET state = $1, updated_at = $2, finished_at = $3,
                message = CASE WHEN $1 = 'cancelled' THEN 'cancelled by an operator' ELSE message END
             WHERE id = $4 AND state = $5")
            .bind(to).bind(now).bind(finished).bind(id).bind(&deployment.state)
            .execute(&mut *tx).await?.rows_affected();
        if changed == 1 && action == Action::Cancel {
            // Devices not started never start; devices in flight hear of it in their next report.
            cancel_pending!(tx, id, "", now);
            let data = serde_json::json!({"deployment_id": id, "bundle_id": deployment.bundle_id,
                "state": "cancelled", "message": "cancelled by an operator"});
            crate::db::webhooks::enqueue_event!(&mut *tx, tenant_id, "deployment.finished", data, now)?;
        }
        tx.commit().await?;
        Ok::<_, sqlx::Error>(changed)
    })?;
    if changed == 0 {
        return Err(ApiError::conflict(
            "invalid_state",
            format!("deployment `{id}` changed meanwhile; read it again"),
        ));
    }
    Ok(get(db, tenant_id, id).await?)
}

/// What a device report did.
#[derive(Debug, PartialEq, Eq)]
pub enum Reported {
    Recorded { deployment_cancelled: bool },
    UnknownDeployment,
}

/// Records a device's report. Idempotent and order-tolerant: a report for a finished device, or
/// one that would move it back along the path (a retried older report), changes nothing.
#[tracing::instrument(name = "db.deployments.report", level = "info", skip_all)]
pub async fn report(
    db: &Db,
    deployment_id: &str,
    device_id: &str,
    report: &DeploymentReport,
) -> Result<Reported, sqlx::Error> {
    let now = now_ms();
    with_pool!(db, pool => {
        let mut tx = pool.begin_write().await?;
        let row: Option<(String, String, String)> = sqlx::query_as(
            "SELECT dd.state, dd.history, d.state FROM deployment_devices dd JOIN deployments d ON d.id = dd.deployment_id
             WHERE dd.deployment_id = $1 AND dd.device_id = $2")
            .bind(deployment_id).bind(device_id).fetch_optional(&mut *tx).await?;
        let Some((current, history, deployment_state)) = row else {
            return Ok(Reported::UnknownDeployment);
        };
        let current = DeploymentState::parse(&current).unwrap_or(DeploymentState::Pending);
        let moves_forward = !current.is_terminal()
            && current != DeploymentState::Pending
            && (report.state.is_terminal() || report.state.rank() >= current.rank());
        if moves_forward {
            let finished = report.state.is_terminal().then_some(now);
            sqlx::query(
                "UPDATE deployment_devices SET state = $1, message = $2, log_tail = $3, history = $4,
                    updated_at = $5, finished_at = $6 WHERE deployment_id = $7 AND device_id = $8 AND state = $9")
                .bind(report.state.as_str())
                .bind(kernex_protocol::truncate_utf8(&report.message, 1024))
                .bind(kernex_protocol::truncate_utf8(&report.log_tail, kernex_protocol::wire::MAX_LOG_TAIL))
                .bind(if report.state == current { history } else { history_with(&history, report.state.as_str(), now) })
                .bind(now).bind(finished).bind(deployment_id).bind(device_id).bind(current.as_str())
                .execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(Reported::Recorded { deployment_cancelled: deployment_state == "cancelled" })
    })
}

/// One step of the rollout engine for one deployment: halt on too many failures, advance a
/// finished phase, release pending devices into free slots. Returns true when it changed anything.
#[tracing::instrument(name = "db.deployments.step", level = "info", skip_all)]
pub async fn step(db: &Db, id: &str) -> Result<bool, sqlx::Error> {
    let now = now_ms();
    with_pool!(db, pool => {
        let mut tx = pool.begin_write().await?;
        // The lock: see the module comment.
        let deployment: Option<Deployment> = sqlx::query_as(&format!(
            "UPDATE deployments SET updated_at = updated_at WHERE id = $1 AND state = 'running' RETURNING {DEPLOYMENT_COLUMNS}"))
            .bind(id).fetch_optional(&mut *tx).await?;
        let Some(deployment) = deployment else {
            return Ok(false);
        };
        let rows: Vec<(i64, String, i64)> = sqlx::query_as(
            "SELECT phase, state, COUNT(*) FROM deployment_devices WHERE deployment_id = $1 GROUP BY phase, state")
            .bind(id).fetch_all(&mut *tx).await?;
        let phase_count = serde_json::from_str::<Vec<Phase>>(&deployment.phases).map_or(1, |p| p.len()) as i64;
        let mut phase = deployment.current_phase;
        let count = |phase: i64, pred: &dyn Fn(DeploymentState) -> bool| -> i64 {
            rows.iter()
                .filter(|(p, s, _)| *p == phase && DeploymentState::parse(s).is_some_and(pred))
                .map(|(_, _, n)| n)
                .sum()
        };
        let in_flight: i64 = rows.iter()
            .filter(|(_, s, _)| DeploymentState::parse(s).is_some_and(DeploymentState::is_in_flight))
            .map(|(_, _, n)| n).sum();

        let mut outcome: Option<(&str, String)> = None;
        // Walk forward through phases that are complete.
        loop {
            let size = count(phase, &|_| true);
            let failed = count(phase, &|s| matches!(s, DeploymentState::Failed | DeploymentState::RolledBack));
            let succeeded = count(phase, &|s| s == DeploymentState::Succeeded);
            let finished = count(phase, &DeploymentState::is_terminal);
            if size > 0 && failed as f64 / size as f64 > deployment.error_threshold {
                outcome = Some(("halted", format!(
                    "halted in phase {}: {failed} of {size} devices failed (error threshold {:.0}%)",
                    phase + 1, deployment.error_threshold * 100.0)));
                break;
            }
            if finished < size {
                break;
            }
            if size > 0 && (succeeded as f64 / size as f64) < deployment.success_threshold {
                outcome = Some(("halted", format!(
                    "halted after phase {}: {succeeded} of {size} devices succeeded (success threshold {:.0}%)",
                    phase + 1, deployment.success_threshold * 100.0)));
                break;
            }
            if phase + 1 >= phase_count {
                outcome = Some(("succeeded", format!("all {} phases succeeded", phase_count)));
                break;
            }
            phase += 1;
        }
        let mut changed = phase != deployment.current_phase;
        if let Some((state, message)) = &outcome {
            sqlx::query("UPDATE deployments SET state = $1, message = $2, current_phase = $3, updated_at = $4, finished_at = $4 WHERE id = $5")
                .bind(state).bind(message).bind(phase).bind(now).bind(id).execute(&mut *tx).await?;
            if *state == "halted" {
                cancel_pending!(tx, id, "the deployment halted", now);
            }
            let data = serde_json::json!({"deployment_id": id, "bundle_id": deployment.bundle_id,
                "state": state, "message": message});
            crate::db::webhooks::enqueue_event!(&mut *tx, &deployment.tenant_id, "deployment.finished", data, now)?;
            tx.commit().await?;
            return Ok(true);
        }
        if changed {
            sqlx::query("UPDATE deployments SET current_phase = $1, updated_at = $2 WHERE id = $3")
                .bind(phase).bind(now).bind(id).execute(&mut *tx).await?;
        }
        // Release pending devices of the phases reached so far into the free slots.
        let slots = deployment.max_in_flight - in_flight;
        if slots > 0 {
            let bundle: (String, String, String, i64) = sqlx::query_as(
                "SELECT name, version, sha256, size FROM bundles WHERE id = $1")
                .bind(&deployment.bundle_id).fetch_one(&mut *tx).await?;
            let publisher_keys: Vec<String> = sqlx::query_scalar(
                "SELECT public_key FROM publisher_keys WHERE tenant_id = $1 AND revoked_at IS NULL ORDER BY created_at")
                .bind(&deployment.tenant_id).fetch_all(&mut *tx).await?;
            let release: Vec<(String, String, String)> = sqlx::query_as(
                "SELECT dd.device_id, dd.history, dv.labels FROM deployment_devices dd JOIN devices dv ON dv.id = dd.device_id
                 WHERE dd.deployment_id = $1 AND dd.state = 'pending' AND dd.phase <= $2 ORDER BY dd.position LIMIT $3")
                .bind(id).bind(phase).bind(slots).fetch_all(&mut *tx).await?;
            for (device, history, labels) in release {
                let labels: BTreeMap<String, String> = serde_json::from_str(&labels).unwrap_or_default();
                let spec = CommandSpec::Deploy(Box::new(DeployArgs {
                    deployment: id.to_owned(),
                    bundle: deployment.bundle_id.clone(),
                    name: bundle.0.clone(),
                    version: bundle.1.clone(),
                    sha256: bundle.2.clone(),
                    size: bundle.3 as u64,
                    url: format!("{}/bundles/{}/content", kernex_protocol::API_PREFIX, deployment.bundle_id),
                    allow_downgrade: deployment.allow_downgrade != 0,
                    device_class: labels.get("class").cloned(),
                    publisher_keys: publisher_keys.clone(),
                }));
                let args = match serde_json::to_value(&spec) {
                    Ok(serde_json::Value::Object(mut o)) => o.remove("args").unwrap_or_default(),
                    _ => serde_json::Value::Null,
                };
                let command_id = new_id();
                let released = sqlx::query(
                    "UPDATE deployment_devices SET state = 'queued', command_id = $1, history = $2, updated_at = $3, started_at = $3
                     WHERE deployment_id = $4 AND device_id = $5 AND state = 'pending'")
                    .bind(&command_id).bind(history_with(&history, "queued", now)).bind(now).bind(id).bind(&device)
                    .execute(&mut *tx).await?.rows_affected();
                if released == 1 {
                    sqlx::query(
                        "INSERT INTO commands (id, device_id, kind, args, state, created_by, created_at) VALUES ($1, $2, 'deploy', $3, 'queued', $4, $5)")
                        .bind(&command_id).bind(&device).bind(args.to_string())
                        .bind(format!("deployment:{id}")).bind(now)
                        .execute(&mut *tx).await?;
                    changed = true;
                }
            }
        }
        tx.commit().await?;
        Ok(changed)
    })
}

/// The devices of a deployment that got its version or are getting it: what a rollback targets.
pub async fn rollback_targets(db: &Db, deployment_id: &str) -> Result<Vec<String>, sqlx::Error> {
    with_pool!(db, pool => sqlx::query_scalar::<_, String>(
        "SELECT device_id FROM deployment_devices WHERE deployment_id = $1 AND state IN ('succeeded', 'queued', 'downloading', 'verifying', 'installing', 'health-checking') ORDER BY position")
        .bind(deployment_id).fetch_all(pool).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_cumulative_and_must_reach_everyone() {
        let p = |s: &str| serde_json::from_str::<Vec<Phase>>(s).unwrap();
        assert_eq!(
            assign_phases(&p(r#"[1, "50%", "100%"]"#), 6).unwrap(),
            [0, 1, 1, 2, 2, 2]
        );
        assert_eq!(assign_phases(&p(r#"["100%"]"#), 3).unwrap(), [0, 0, 0]);
        assert_eq!(
            assign_phases(&p(r#"[1, "10%", "100%"]"#), 3).unwrap_err(),
            "phase 2 (\"10%\") adds no device: phases are cumulative and must grow"
        );
        assert_eq!(
            assign_phases(&p(r#"[1, 2]"#), 3).unwrap_err(),
            "the phases reach 2 of 3 devices: end with \"100%\""
        );
        assert!(serde_json::from_str::<Vec<Phase>>(r#"["150%"]"#)
            .unwrap_err()
            .to_string()
            .contains("at most 100%"));
        assert!(serde_json::from_str::<Vec<Phase>>(r#"["ten"]"#).is_err());
    }
}
