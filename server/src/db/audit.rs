//! The audit trail: who changed what, when. Written after the change it records commits.

use super::{now_ms, rfc3339, with_pool, Db};
use serde::Serialize;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AuditEvent {
    pub id: i64,
    pub tenant_id: Option<String>,
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct AuditEventView {
    pub id: i64,
    pub at: String,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub detail: serde_json::Value,
}

impl AuditEvent {
    pub fn view(&self) -> AuditEventView {
        AuditEventView {
            id: self.id,
            at: rfc3339(self.at),
            actor: self.actor.clone(),
            action: self.action.clone(),
            subject: self.subject.clone(),
            detail: serde_json::from_str(&self.detail).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// Records an event. A failure is logged, not returned: the change itself has already happened and
/// must not be reported as failed.
pub async fn record(
    db: &Db,
    tenant_id: Option<&str>,
    actor: &str,
    action: &str,
    subject: &str,
    detail: serde_json::Value,
) {
    let result = with_pool!(db, pool => sqlx::query(
        "INSERT INTO audit_events (tenant_id, at, actor, action, subject, detail) VALUES ($1, $2, $3, $4, $5, $6)")
        .bind(tenant_id)
        .bind(now_ms())
        .bind(actor)
        .bind(action)
        .bind(subject)
        .bind(detail.to_string())
        .execute(pool)
        .await.map(|r| r.rows_affected()));
    if let Err(e) = result {
        tracing::error!(error = %e, action, subject, "writing audit event failed");
    }
}

pub async fn list(db: &Db, tenant_id: &str, limit: i64) -> Result<Vec<AuditEvent>, sqlx::Error> {
    with_pool!(db, pool => sqlx::query_as::<_, AuditEvent>(
        "SELECT id, tenant_id, at, actor, action, subject, detail FROM audit_events
         WHERE tenant_id = $1 ORDER BY id DESC LIMIT $2")
        .bind(tenant_id)
        .bind(limit)
        .fetch_all(pool)
        .await)
}
