//! Webhook subscriptions, the delivery queue, and the device offline/online sweep that feeds it.
//!
//! An event is enqueued as one row per subscribed webhook, in the same transaction as the change it
//! reports where there is one ([`enqueue_event!`]), so an event is never announced for a change
//! that rolled back, nor lost for one that committed. Any replica may send any delivery: it claims
//! the row first (`claimed_until`), so each attempt is made by one replica.

use super::{new_id, now_ms, rfc3339, with_pool, BeginWrite as _, Db};
use serde::Serialize;

/// Every event kind a webhook can subscribe to.
pub const EVENT_KINDS: &[&str] = &[
    "device.enrolled",
    "device.offline",
    "device.online",
    "device.deregistered",
    "deployment.finished",
];

/// Attempts before a delivery is given up (`failed`).
pub const MAX_ATTEMPTS: i64 = 10;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Webhook {
    pub id: String,
    pub tenant_id: String,
    pub url: String,
    pub secret: String,
    pub events: String,
    pub created_at: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WebhookView {
    pub id: String,
    pub url: String,
    pub events: Vec<String>,
    pub created_at: String,
}

impl Webhook {
    pub fn view(&self) -> WebhookView {
        WebhookView {
            id: self.id.clone(),
            url: self.url.clone(),
            events: self
                .events
                .split(',')
                .filter(|e| !e.is_empty())
                .map(str::to_owned)
                .collect(),
            created_at: rfc3339(self.created_at),
        }
    }
}

/// `*` or `,a,b,`: the stored form, matched with one `LIKE` in [`enqueue_event!`].
pub fn events_column(kinds: &[String]) -> String {
    if kinds.is_empty() || kinds.iter().any(|k| k == "*") {
        "*".to_owned()
    } else {
        format!(",{},", kinds.join(","))
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Delivery {
    pub id: String,
    pub webhook_id: String,
    pub event_id: String,
    pub kind: String,
    pub payload: String,
    pub state: String,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub delivered_at: Option<i64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeliveryView {
    pub id: String,
    pub event_id: String,
    pub kind: String,
    pub state: String,
    pub attempts: i64,
    pub next_attempt_at: Option<String>,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub created_at: String,
    pub delivered_at: Option<String>,
    pub payload: serde_json::Value,
}

impl Delivery {
    pub fn view(&self) -> DeliveryView {
        DeliveryView {
            id: self.id.clone(),
            event_id: self.event_id.clone(),
            kind: self.kind.clone(),
            state: self.state.clone(),
            attempts: self.attempts,
            next_attempt_at: (self.state == "pending").then(|| rfc3339(self.next_attempt_at)),
            last_status: self.last_status,
            last_error: self.last_error.clone(),
            created_at: rfc3339(self.created_at),
            delivered_at: self.delivered_at.map(rfc3339),
            payload: serde_json::from_str(&self.payload).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// What a webhook receives: the event, and when and where it happened.
pub fn envelope(
    event_id: &str,
    kind: &str,
    tenant_id: &str,
    at: i64,
    data: serde_json::Value,
) -> String {
    serde_json::json!({"id": event_id, "kind": kind, "tenant_id": tenant_id, "at": rfc3339(at), "data": data})
        .to_string()
}

/// Enqueues event `$kind` (with `$data`, a JSON value) of tenant `$tenant` for every webhook of the
/// tenant subscribed to it, through `$executor` (a pool, or `&mut *tx` to be part of a change).
#[macro_export]
macro_rules! enqueue_event {
    ($executor:expr, $tenant:expr, $kind:expr, $data:expr, $now:expr) => {{
        let event_id = $crate::db::new_id();
        let payload = $crate::db::webhooks::envelope(&event_id, $kind, $tenant, $now, $data);
        sqlx::query(
            "INSERT INTO webhook_deliveries (id, webhook_id, event_id, kind, payload, state, attempts, next_attempt_at, created_at)
             SELECT $1 || ':' || w.id, w.id, $1, $2, $3, 'pending', 0, $4, $4 FROM webhooks w
             WHERE w.tenant_id = $5 AND w.deleted_at IS NULL AND (w.events = '*' OR w.events LIKE '%,' || $2 || ',%')",
        )
        .bind(&event_id)
        .bind($kind)
        .bind(&payload)
        .bind($now)
        .bind($tenant)
        .execute($executor)
        .await
        .map(|r| r.rows_affected())
    }};
}
pub use enqueue_event;

/// Enqueues an event outside any transaction (the change it reports is already committed). A
/// failure is logged: the change happened and must not be reported as failed.
pub async fn emit(db: &Db, tenant_id: &str, kind: &str, data: serde_json::Value) {
    let now = now_ms();
    let result = with_pool!(db, pool => enqueue_event!(pool, tenant_id, kind, data, now));
    if let Err(e) = result {
        tracing::error!(error = %e, kind, "enqueueing a webhook event failed");
    }
}

#[tracing::instrument(name = "db.webhooks.create", level = "info", skip_all)]
pub async fn create(
    db: &Db,
    tenant_id: &str,
    url: &str,
    events: &str,
    secret: &str,
) -> Result<Webhook, sqlx::Error> {
    let id = new_id();
    let now = now_ms();
    with_pool!(db, pool => sqlx::query(
        "INSERT INTO webhooks (id, tenant_id, url, secret, events, created_at) VALUES ($1, $2, $3, $4, $5, $6)")
        .bind(&id).bind(tenant_id).bind(url).bind(secret).bind(events).bind(now)
        .execute(pool).await.map(|r| r.rows_affected()))?;
    Ok(Webhook {
        id,
        tenant_id: tenant_id.to_owned(),
        url: url.to_owned(),
        secret: secret.to_owned(),
        events: events.to_owned(),
        created_at: now,
    })
}

const WEBHOOK_COLUMNS: &str = "id, tenant_id, url, secret, events, created_at";

#[tracing::instrument(name = "db.webhooks.list", level = "info", skip_all)]
pub async fn list(db: &Db, tenant_id: &str) -> Result<Vec<Webhook>, sqlx::Error> {
    with_pool!(db, pool => sqlx::query_as(&format!(
        "SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE tenant_id = $1 AND deleted_at IS NULL ORDER BY created_at"))
        .bind(tenant_id).fetch_all(pool).await)
}

pub async fn get(db: &Db, tenant_id: &str, id: &str) -> Result<Option<Webhook>, sqlx::Error> {
    with_pool!(db, pool => sqlx::query_as(&format!(
        "SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL"))
        .bind(tenant_id).bind(id).fetch_optional(pool).await)
}

/// Stops a webhook: no new deliveries, pending ones dropped (kept in the log as `failed`).
#[tracing::instrument(name = "db.webhooks.delete", level = "info", skip_all)]
pub async fn delete(db: &Db, tenant_id: &str, id: &str) -> Result<bool, sqlx::Error> {
    let now = now_ms();
    with_pool!(db, pool => {
        let mut tx = pool.begin_write().await?;
        let deleted = sqlx::query("UPDATE webhooks SET deleted_at = $1 WHERE tenant_id = $2 AND id = $3 AND deleted_at IS NULL")
            .bind(now).bind(tenant_id).bind(id).execute(&mut *tx).await?.rows_affected() == 1;
        sqlx::query("UPDATE webhook_deliveries SET state = 'failed', last_error = 'webhook deleted' WHERE webhook_id = $1 AND state = 'pending'")
            .bind(id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(deleted)
    })
}

/// The newest deliveries of a webhook, newest first.
#[tracing::instrument(name = "db.webhooks.deliveries", level = "info", skip_all)]
pub async fn deliveries(
    db: &Db,
    webhook_id: &str,
    limit: i64,
) -> Result<Vec<Delivery>, sqlx::Error> {
    with_pool!(db, pool => sqlx::query_as(
        "SELECT id, webhook_id, event_id, kind, payload, state, attempts, next_attempt_at, last_status, last_error, created_at, delivered_at
         FROM webhook_deliveries WHERE webhook_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2")
        .bind(webhook_id).bind(limit).fetch_all(pool).await)
}

/// A delivery this replica claimed, with where to send it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    pub id: String,
    pub kind: String,
    pub payload: String,
    pub attempts: i64,
    pub url: String,
    pub secret: String,
}

/// Claims up to `limit` due deliveries for `hold_ms` (another replica skips them meanwhile).
#[tracing::instrument(name = "db.webhooks.claim_due", level = "info", skip_all)]
pub async fn claim_due(db: &Db, limit: i64, hold_ms: i64) -> Result<Vec<Claimed>, sqlx::Error> {
    let now = now_ms();
    with_pool!(db, pool => {
        let due: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM webhook_deliveries WHERE state = 'pending' AND next_attempt_at <= $1
             AND (claimed_until IS NULL OR claimed_until < $1) ORDER BY next_attempt_at LIMIT $2")
            .bind(now).bind(limit).fetch_all(pool).await?;
        let mut claimed = Vec::new();
        for id in due {
            // The claim: only one replica's UPDATE matches.
            let row: Option<Claimed> = sqlx::query_as(
                "UPDATE webhook_deliveries SET claimed_until = $1
                 WHERE id = $2 AND state = 'pending' AND (claimed_until IS NULL OR claimed_until < $3)
                 RETURNING id, kind, payload, attempts,
                   (SELECT url FROM webhooks WHERE webhooks.id = webhook_deliveries.webhook_id) AS url,
                   (SELECT secret FROM webhooks WHERE webhooks.id = webhook_deliveries.webhook_id) AS secret")
                .bind(now + hold_ms).bind(&id).bind(now).fetch_optional(pool).await?;
            claimed.extend(row);
        }
        Ok(claimed)
    })
}

/// Records one attempt: delivered, or failed with the next try at `retry_at` (given up after
/// [`MAX_ATTEMPTS`]).
#[tracing::instrument(name = "db.webhooks.record_attempt", level = "info", skip_all)]
pub async fn record_attempt(
    db: &Db,
    id: &str,
    status: Option<u16>,
    error: Option<&str>,
    retry_at: i64,
) -> Result<(), sqlx::Error> {
    let now = now_ms();
    let delivered = status.is_some_and(|s| (200..300).contains(&s));
    with_pool!(db, pool => sqlx::query(
        "UPDATE webhook_deliveries SET attempts = attempts + 1, last_status = $1, last_error = $2, claimed_until = NULL,
            state = CASE WHEN $3 THEN 'delivered' WHEN attempts + 1 >= $4 THEN 'failed' ELSE 'pending' END,
            delivered_at = CASE WHEN $3 THEN $5 ELSE NULL END,
            next_attempt_at = $6
         WHERE id = $7 AND state = 'pending'")
        .bind(status.map(i64::from)).bind(error).bind(delivered).bind(MAX_ATTEMPTS).bind(now).bind(retry_at).bind(id)
        .execute(pool).await.map(|_| ()))
}

/// One pass of the device sweep: devices past their offline deadline that were not announced yet
/// are marked and announced (`device.offline`), devices that heartbeated since they were announced
/// offline are announced back (`device.online`). Each transition is one row update, so with several
/// replicas sweeping, each is announced once. Returns (offline, online) counts.
///
/// `catch_up` is awaited when a transition looks due, before any is made: the heartbeat fold, as a
/// device whose latest beats are still in SQLite's heartbeat log looks past its deadline. When it
/// answers false (the fold failed) the pass makes no transition. (A device back online whose beats
/// are not folded yet is announced after the next fold.)
#[tracing::instrument(name = "db.webhooks.sweep_devices", level = "info", skip_all)]
pub async fn sweep_devices(
    db: &Db,
    offline_after: u32,
    catch_up: impl std::future::Future<Output = bool>,
) -> Result<(usize, usize), sqlx::Error> {
    // On `device_heartbeats`; a deregistered device (few: a partial index) is never announced.
    const WENT_OFFLINE: &str = "offline_since IS NULL
        AND last_heartbeat IS NOT NULL AND interval_s IS NOT NULL
        AND $1 > last_heartbeat + (CASE WHEN interval_s < 1 THEN 1 ELSE interval_s END) * 1000 * $2
        AND NOT EXISTS (SELECT 1 FROM devices d WHERE d.id = device_id AND d.deregistered_at IS NOT NULL)";
    const CAME_BACK: &str = "offline_since IS NOT NULL AND last_heartbeat > offline_since";
    let now = now_ms();
    with_pool!(db, pool => {
        // Look before taking the write lock: nearly every pass finds nothing, and on SQLite a
        // write transaction scanning the devices would hold up the heartbeat writer meanwhile
        // (a read does not, under WAL).
        let due: bool = sqlx::query_scalar(&format!(
            "SELECT EXISTS (SELECT 1 FROM device_heartbeats WHERE {WENT_OFFLINE})
                 OR EXISTS (SELECT 1 FROM device_heartbeats WHERE {CAME_BACK})"))
            .bind(now)
            .bind(i64::from(offline_after))
            .fetch_one(pool)
            .await?;
        if !due {
            return Ok((0, 0));
        }
        if !catch_up.await {
            return Ok((0, 0));
        }
        let mut tx = pool.begin_write().await?;
        let mut counts = [0; 2];
        let transitions = [
            ("device.offline",
             format!("UPDATE device_heartbeats SET offline_since = $1 WHERE {WENT_OFFLINE}
              RETURNING device_id, last_heartbeat")),
            ("device.online",
             format!("UPDATE device_heartbeats SET offline_since = NULL WHERE {CAME_BACK}
              RETURNING device_id, last_heartbeat")),
        ];
        for (count, (kind, sql)) in counts.iter_mut().zip(transitions) {
            let mut query = sqlx::query_as::<_, (String, i64)>(&sql);
            if kind == "device.offline" {
                query = query.bind(now).bind(i64::from(offline_after));
            }
            let changed = query.fetch_all(&mut *tx).await?;
            for (id, last) in &changed {
                let (tenant, hardware_id): (String, String) =
                    sqlx::query_as("SELECT tenant_id, hardware_id FROM devices WHERE id = $1")
                        .bind(id)
                        .fetch_one(&mut *tx)
                        .await?;
                let data = serde_json::json!({"device_id": id, "hardware_id": hardware_id, "last_heartbeat": rfc3339(*last)});
                enqueue_event!(&mut *tx, &tenant, kind, data, now)?;
            }
            *count = changed.len();
        }
        tx.commit().await?;
        Ok((counts[0], counts[1]))
    })
}
