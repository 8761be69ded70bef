//! Devices: enrolled appliances, their identity and their latest heartbeat.

use super::{now_ms, rfc3339, with_pool, Db};
use serde::Serialize;

/// Every device has its row in `device_heartbeats`, written with the device (empty until it beats).
pub const INSERT_HEARTBEAT_ROW: &str = "INSERT INTO device_heartbeats (device_id) VALUES ($1)";

/// A device with its latest heartbeat (kept apart, in `device_heartbeats`: see migration 0007).
/// Queries name the device `d`.
const SELECT_DEVICES: &str =
    "SELECT d.id, d.tenant_id, d.hardware_id, d.key_fingerprint, d.public_key, d.facts, d.enrolled_at, \
     d.deregistered_at, h.last_heartbeat, h.interval_s, h.agent_version, h.telemetry, d.labels \
     FROM devices d LEFT JOIN device_heartbeats h ON h.device_id = d.id";

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Device {
    pub id: String,
    pub tenant_id: String,
    pub hardware_id: String,
    pub key_fingerprint: String,
    pub public_key: String,
    /// JSON of [`kernex_protocol::wire::Facts`].
    pub facts: String,
    pub enrolled_at: i64,
    pub deregistered_at: Option<i64>,
    pub last_heartbeat: Option<i64>,
    /// The interval the device said it uses, in seconds.
    pub interval_s: Option<i64>,
    pub agent_version: Option<String>,
    /// JSON of the latest [`kernex_protocol::wire::Telemetry`].
    pub telemetry: Option<String>,
    /// JSON object of operator-set labels (selectors; `class` is the device class).
    pub labels: String,
}

/// Liveness as operators see it, derived from the last heartbeat (never stored, so never stale).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeviceStatus {
    /// Enrolled, no heartbeat yet.
    Pending,
    Online,
    /// Missed `offline_after` intervals in a row.
    Offline,
    Deregistered,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeviceView {
    pub id: String,
    pub hardware_id: String,
    pub status: DeviceStatus,
    pub last_heartbeat: Option<String>,
    pub agent_version: Option<String>,
    pub telemetry: Option<serde_json::Value>,
    pub interval_s: Option<i64>,
    pub facts: serde_json::Value,
    pub key_fingerprint: String,
    pub enrolled_at: String,
    pub deregistered_at: Option<String>,
    pub labels: std::collections::BTreeMap<String, String>,
    /// The appliance's user VMs as its agent last reported them: `name`, `address`, `connected`,
    /// `state`, `last_seen`, `rtt_ms`, `info`, `error`.
    pub vms: serde_json::Value,
}

impl Device {
    /// Offline once `offline_after` whole intervals passed without a heartbeat.
    pub fn status(&self, now: i64, offline_after: u32) -> DeviceStatus {
        if self.deregistered_at.is_some() {
            return DeviceStatus::Deregistered;
        }
        match (self.last_heartbeat, self.interval_s) {
            (Some(last), Some(interval)) => {
                let deadline = last + interval.max(1) * 1000 * i64::from(offline_after);
                if now > deadline {
                    DeviceStatus::Offline
                } else {
                    DeviceStatus::Online
                }
            }
            _ => DeviceStatus::Pending,
        }
    }

    pub fn view(&self, now: i64, offline_after: u32) -> DeviceView {
        let json = |s: &str| serde_json::from_str(s).unwrap_or(serde_json::Value::Null);
        // The user-VM links arrive with the telemetry and are stored with it; shown on their own.
        let mut telemetry = self.telemetry.as_deref().map(json);
        let vms = telemetry
            .as_mut()
            .and_then(|t| t.as_object_mut())
            .and_then(|t| t.remove("vms"))
            .unwrap_or_else(|| serde_json::json!([]));
        DeviceView {
            vms,
            id: self.id.clone(),
            hardware_id: self.hardware_id.clone(),
            status: self.status(now, offline_after),
            last_heartbeat: self.last_heartbeat.map(rfc3339),
            agent_version: self.agent_version.clone(),
            telemetry,
            interval_s: self.interval_s,
            facts: json(&self.facts),
            key_fingerprint: self.key_fingerprint.clone(),
            enrolled_at: rfc3339(self.enrolled_at),
            deregistered_at: self.deregistered_at.map(rfc3339),
            labels: self.label_map(),
        }
    }

    pub fn label_map(&self) -> std::collections::BTreeMap<String, String> {
        serde_json::from_str(&self.labels).unwrap_or_default()
    }
}

/// The device with `id`, of any tenant (device-protocol paths, where the caller proved the id).
#[tracing::instrument(name = "db.devices.by_id", level = "info", skip_all)]
pub async fn by_id(db: &Db, id: &str) -> Result<Option<Device>, sqlx::Error> {
    let sql = format!("{SELECT_DEVICES} WHERE d.id = $1");
    with_pool!(db, pool => sqlx::query_as::<_, Device>(&sql).bind(id).fetch_optional(pool).await)
}

/// The device with `id` if it belongs to `tenant_id` (REST paths).
#[tracing::instrument(name = "db.devices.in_tenant", level = "info", skip_all)]
pub async fn in_tenant(db: &Db, tenant_id: &str, id: &str) -> Result<Option<Device>, sqlx::Error> {
    let sql = format!("{SELECT_DEVICES} WHERE d.tenant_id = $1 AND d.id = $2");
    with_pool!(db, pool => sqlx::query_as::<_, Device>(&sql).bind(tenant_id).bind(id).fetch_optional(pool).await)
}

pub async fn by_fingerprint(
    db: &Db,
    tenant_id: &str,
    fingerprint: &str,
) -> Result<Option<Device>, sqlx::Error> {
    let sql = format!("{SELECT_DEVICES} WHERE d.tenant_id = $1 AND d.key_fingerprint = $2");
    with_pool!(db, pool => sqlx::query_as::<_, Device>(&sql).bind(tenant_id).bind(fingerprint).fetch_optional(pool).await)
}

#[tracing::instrument(name = "db.devices.list", level = "info", skip_all)]
pub async fn list(db: &Db, tenant_id: &str) -> Result<Vec<Device>, sqlx::Error> {
    let sql = format!("{SELECT_DEVICES} WHERE d.tenant_id = $1 ORDER BY d.enrolled_at, d.id");
    with_pool!(db, pool => sqlx::query_as::<_, Device>(&sql).bind(tenant_id).fetch_all(pool).await)
}

/// Marks a device deregistered; its heartbeats and authentications are refused from now on.
/// Returns false when it already was.
#[tracing::instrument(name = "db.devices.deregister", level = "info", skip_all)]
pub async fn deregister(db: &Db, tenant_id: &str, id: &str) -> Result<bool, sqlx::Error> {
    let done = with_pool!(db, pool => sqlx::query(
        "UPDATE devices SET deregistered_at = $1 WHERE tenant_id = $2 AND id = $3 AND deregistered_at IS NULL")
        .bind(now_ms())
        .bind(tenant_id)
        .bind(id)
        .execute(pool)
        .await.map(|r| r.rows_affected()))?;
    Ok(done == 1)
}

/// Remembers the nonce of an accepted auth request; false if it equals the previous one (a replay).
pub async fn accept_auth_nonce(db: &Db, id: &str, nonce: &str) -> Result<bool, sqlx::Error> {
    let done = with_pool!(db, pool => sqlx::query(
        "UPDATE devices SET last_auth_nonce = $1 WHERE id = $2 AND (last_auth_nonce IS NULL OR last_auth_nonce <> $1)")
        .bind(nonce)
        .bind(id)
        .execute(pool)
        .await.map(|r| r.rows_affected()))?;
    Ok(done == 1)
}

/// Replaces the labels of a device of `tenant_id`; false when there is no such device.
#[tracing::instrument(name = "db.devices.set_labels", level = "info", skip_all)]
pub async fn set_labels(
    db: &Db,
    tenant_id: &str,
    id: &str,
    labels: &std::collections::BTreeMap<String, String>,
) -> Result<bool, sqlx::Error> {
    let text = serde_json::to_string(labels).unwrap_or_else(|_| "{}".into());
    let done = with_pool!(db, pool => sqlx::query(
        "UPDATE devices SET labels = $1 WHERE tenant_id = $2 AND id = $3")
        .bind(text)
        .bind(tenant_id)
        .bind(id)
        .execute(pool)
        .await.map(|r| r.rows_affected()))?;
    Ok(done == 1)
}
