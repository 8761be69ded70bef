//! The audit trail: who changed what, when, from where, and for changes to existing objects what
//! they were before and after. Written after the change it records commits. The source address and
//! request id come from the request being served (`api::RequestContext`), so call sites pass only
//! what they know.

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
    pub source: String,
    pub request_id: Option<String>,
    pub before_state: Option<String>,
    pub after_state: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AuditEventView {
    pub id: i64,
    pub at: String,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub detail: serde_json::Value,
    /// Client address of the request, or `local` for the admin commands.
    pub source: String,
    pub request_id: Option<String>,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
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
            source: self.source.clone(),
            request_id: self.request_id.clone(),
            before: self
                .before_state
                .as_deref()
                .and_then(|s| serde_json::from_str(s).ok()),
            after: self
                .after_state
                .as_deref()
                .and_then(|s| serde_json::from_str(s).ok()),
        }
    }
}

/// Records an event (a creation, or anything without a before and after).
pub async fn record(
    db: &Db,
    tenant_id: Option<&str>,
    actor: &str,
    action: &str,
    subject: &str,
    detail: serde_json::Value,
) {
    write(db, tenant_id, actor, action, subject, detail, None).await
}

/// Records a change to an existing object, with the changed fields before and after.
pub async fn record_change(
    db: &Db,
    tenant_id: Option<&str>,
    actor: &str,
    action: &str,
    subject: &str,
    before: serde_json::Value,
    after: serde_json::Value,
) {
    let detail = serde_json::json!({});
    write(
        db,
        tenant_id,
        actor,
        action,
        subject,
        detail,
        Some((before, after)),
    )
    .await
}

/// A failure is logged, not returned: the change itself has already happened and must not be
/// reported as failed.
#[tracing::instrument(name = "db.audit.write", level = "info", skip_all)]
async fn write(
    db: &Db,
    tenant_id: Option<&str>,
    actor: &str,
    action: &str,
    subject: &str,
    detail: serde_json::Value,
    change: Option<(serde_json::Value, serde_json::Value)>,
) {
    let context = crate::api::RequestContext::current();
    let (source, request_id) = match &context {
        Some(c) => (
            c.source
                .map_or_else(|| "unknown".to_owned(), |a| a.to_string()),
            Some(&*c.id),
        ),
        None => ("local".to_owned(), None),
    };
    let (before, after) = match change {
        Some((before, after)) => (Some(before.to_string()), Some(after.to_string())),
        None => (None, None),
    };
    let result = with_pool!(db, pool => sqlx::query(
        "INSERT INTO audit_events (tenant_id, at, actor, action, subject, detail, source, request_id, before_state, after_state)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)")
        .bind(tenant_id)
        .bind(now_ms())
        .bind(actor)
        .bind(action)
        .bind(subject)
        .bind(detail.to_string())
        .bind(source)
        .bind(request_id)
        .bind(before)
        .bind(after)
        .execute(pool)
        .await.map(|r| r.rows_affected()));
    if let Err(e) = result {
        tracing::error!(error = %e, action, subject, "writing audit event failed");
    }
}

/// What to select: all filters optional, newest first, at most `limit`.
#[derive(Debug, Default)]
pub struct Filter {
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub action: Option<String>,
    pub actor: Option<String>,
    pub subject: Option<String>,
    /// Only events with an id below this (paging backwards).
    pub before_id: Option<i64>,
    pub limit: i64,
}

#[tracing::instrument(name = "db.audit.list", level = "info", skip_all)]
pub async fn list(
    db: &Db,
    tenant_id: &str,
    filter: &Filter,
) -> Result<Vec<AuditEvent>, sqlx::Error> {
    with_pool!(db, pool => sqlx::query_as::<_, AuditEvent>(
        "SELECT id, tenant_id, at, actor, action, subject, detail, source, request_id, before_state, after_state
         FROM audit_events
         WHERE tenant_id = $1
           AND ($2 IS NULL OR at >= $2) AND ($3 IS NULL OR at < $3)
           AND ($4 IS NULL OR action = $4 OR action LIKE $4 || '.%')
           AND ($5 IS NULL OR actor = $5) AND ($6 IS NULL OR subject = $6)
           AND ($7 IS NULL OR id < $7)
         ORDER BY id DESC LIMIT $8")
        .bind(tenant_id)
        .bind(filter.since_ms)
        .bind(filter.until_ms)
        .bind(filter.action.as_deref())
        .bind(filter.actor.as_deref())
        .bind(filter.subject.as_deref())
        .bind(filter.before_id)
        .bind(filter.limit)
        .fetch_all(pool)
        .await)
}
