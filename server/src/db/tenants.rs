//! Tenants: the unit of isolation. Every other row belongs to exactly one.

use super::{new_id, now_ms, rfc3339, with_pool, Db};
use crate::error::ApiError;
use serde::Serialize;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub created_at: i64,
}

/// A tenant as the API and `--json` show it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TenantView {
    pub id: String,
    pub name: String,
    pub created_at: String,
}

impl Tenant {
    pub fn view(&self) -> TenantView {
        TenantView {
            id: self.id.clone(),
            name: self.name.clone(),
            created_at: rfc3339(self.created_at),
        }
    }
}

#[tracing::instrument(name = "db.tenants.create", level = "info", skip_all)]
pub async fn create(db: &Db, name: &str) -> Result<Tenant, ApiError> {
    kernex_protocol::bootstrap::check_name(name).map_err(|message| {
        ApiError::bad_request("invalid_name", format!("tenant name: {message}"))
    })?;
    let tenant = Tenant {
        id: new_id(),
        name: name.to_owned(),
        created_at: now_ms(),
    };
    let inserted = with_pool!(db, pool => sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES ($1, $2, $3)")
        .bind(&tenant.id)
        .bind(&tenant.name)
        .bind(tenant.created_at)
        .execute(pool)
        .await.map(|r| r.rows_affected()));
    match inserted {
        Ok(_) => Ok(tenant),
        Err(e) if super::is_unique_violation(&e) => Err(ApiError::conflict(
            "tenant_exists",
            format!("tenant `{name}` already exists"),
        )),
        Err(e) => Err(e.into()),
    }
}

#[tracing::instrument(name = "db.tenants.by_name", level = "info", skip_all)]
pub async fn by_name(db: &Db, name: &str) -> Result<Option<Tenant>, sqlx::Error> {
    with_pool!(db, pool => sqlx::query_as::<_, Tenant>("SELECT id, name, created_at FROM tenants WHERE name = $1")
        .bind(name)
        .fetch_optional(pool)
        .await)
}

/// The tenant called `name`, or a `404 unknown_tenant` naming it.
#[tracing::instrument(name = "db.tenants.require", level = "info", skip_all)]
pub async fn require(db: &Db, name: &str) -> Result<Tenant, ApiError> {
    by_name(db, name)
        .await?
        .ok_or_else(|| ApiError::not_found("unknown_tenant", format!("no tenant named `{name}`")))
}

#[tracing::instrument(name = "db.tenants.list", level = "info", skip_all)]
pub async fn list(db: &Db) -> Result<Vec<Tenant>, sqlx::Error> {
    with_pool!(db, pool => sqlx::query_as::<_, Tenant>("SELECT id, name, created_at FROM tenants ORDER BY name")
        .fetch_all(pool)
        .await)
}
