//! Publisher keys (who may sign a tenant's bundles) and bundles (signed, immutable, versioned per
//! name; the bytes live in the object store under `object_key`).

use super::{new_id, now_ms, rfc3339, with_pool, Db};
use crate::error::ApiError;
use serde::Serialize;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PublisherKey {
    pub id: String,
    pub tenant_id: String,
    pub fingerprint: String,
    pub public_key: String,
    pub created_by: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PublisherKeyView {
    pub id: String,
    pub fingerprint: String,
    pub public_key: String,
    pub created_by: String,
    pub created_at: String,
    pub revoked_at: Option<String>,
}

impl PublisherKey {
    pub fn view(&self) -> PublisherKeyView {
        PublisherKeyView {
            id: self.id.clone(),
            fingerprint: self.fingerprint.clone(),
            public_key: self.public_key.clone(),
            created_by: self.created_by.clone(),
            created_at: rfc3339(self.created_at),
            revoked_at: self.revoked_at.map(rfc3339),
        }
    }
}

const KEY_COLUMNS: &str =
    "id, tenant_id, fingerprint, public_key, created_by, created_at, revoked_at";

/// Trusts `public_key` (already validated PEM) for the tenant; adding a known key returns it.
pub async fn add_publisher_key(
    db: &Db,
    tenant_id: &str,
    fingerprint: &str,
    public_key: &str,
    created_by: &str,
) -> Result<(PublisherKey, bool), ApiError> {
    let id = new_id();
    let inserted = with_pool!(db, pool => sqlx::query(
        "INSERT INTO publisher_keys (id, tenant_id, fingerprint, public_key, created_by, created_at)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant_id, fingerprint) DO NOTHING")
        .bind(&id).bind(tenant_id).bind(fingerprint).bind(public_key).bind(created_by).bind(now_ms())
        .execute(pool).await.map(|r| r.rows_affected()))?;
    let key = with_pool!(db, pool => sqlx::query_as::<_, PublisherKey>(&format!(
        "SELECT {KEY_COLUMNS} FROM publisher_keys WHERE tenant_id = $1 AND fingerprint = $2"))
        .bind(tenant_id).bind(fingerprint).fetch_one(pool).await)?;
    Ok((key, inserted == 1))
}

#[tracing::instrument(name = "db.bundles.publisher_keys", level = "info", skip_all)]
pub async fn publisher_keys(db: &Db, tenant_id: &str) -> Result<Vec<PublisherKey>, sqlx::Error> {
    with_pool!(db, pool => sqlx::query_as::<_, PublisherKey>(&format!(
        "SELECT {KEY_COLUMNS} FROM publisher_keys WHERE tenant_id = $1 ORDER BY created_at, id"))
        .bind(tenant_id).fetch_all(pool).await)
}

/// PEMs of the keys the tenant trusts now (not revoked): what agents verify bundles with.
pub async fn trusted_pems(db: &Db, tenant_id: &str) -> Result<Vec<String>, sqlx::Error> {
    with_pool!(db, pool => sqlx::query_scalar::<_, String>(
        "SELECT public_key FROM publisher_keys WHERE tenant_id = $1 AND revoked_at IS NULL ORDER BY created_at, id")
        .bind(tenant_id).fetch_all(pool).await)
}

pub async fn revoke_publisher_key(db: &Db, tenant_id: &str, id: &str) -> Result<bool, sqlx::Error> {
    with_pool!(db, pool => sqlx::query(
        "UPDATE publisher_keys SET revoked_at = $1 WHERE tenant_id = $2 AND id = $3 AND revoked_at IS NULL")
        .bind(now_ms()).bind(tenant_id).bind(id).execute(pool).await.map(|r| r.rows_affected() == 1))
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Bundle {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub version: String,
    /// Hex SHA-256 of the archive: what the publisher signed.
    pub sha256: String,
    /// Bytes of the whole packed file (archive, signature, trailer).
    pub size: i64,
    pub archive_bytes: i64,
    /// The manifest as JSON.
    pub manifest: String,
    /// Fingerprint of the publisher key that signed it.
    pub publisher: String,
    pub object_key: String,
    pub created_by: String,
    pub created_at: i64,
    pub deleted_at: Option<i64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BundleView {
    pub id: String,
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub size: i64,
    pub manifest: serde_json::Value,
    pub publisher: String,
    pub created_by: String,
    pub created_at: String,
}

impl Bundle {
    pub fn view(&self) -> BundleView {
        BundleView {
            id: self.id.clone(),
            name: self.name.clone(),
            version: self.version.clone(),
            sha256: self.sha256.clone(),
            size: self.size,
            manifest: serde_json::from_str(&self.manifest).unwrap_or(serde_json::Value::Null),
            publisher: self.publisher.clone(),
            created_by: self.created_by.clone(),
            created_at: rfc3339(self.created_at),
        }
    }

    /// The ETag of the content: the file never changes under an id.
    pub fn etag(&self) -> String {
        format!("\"{}\"", self.sha256)
    }
}

const BUNDLE_COLUMNS: &str = "id, tenant_id, name, version, sha256, size, archive_bytes, manifest, publisher, object_key, created_by, created_at, deleted_at";

/// Every version ever stored under `name` (including retired ones): versions are monotonic over
/// the name's whole history, so a retired version can never come back as "new".
pub async fn versions(db: &Db, tenant_id: &str, name: &str) -> Result<Vec<String>, sqlx::Error> {
    with_pool!(db, pool => sqlx::query_scalar::<_, String>(
        "SELECT version FROM bundles WHERE tenant_id = $1 AND name = $2")
        .bind(tenant_id).bind(name).fetch_all(pool).await)
}

#[tracing::instrument(name = "db.bundles.insert", level = "info", skip_all)]
pub async fn insert(db: &Db, bundle: &Bundle) -> Result<(), ApiError> {
    let result = with_pool!(db, pool => sqlx::query(&format!(
        "INSERT INTO bundles ({BUNDLE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"))
        .bind(&bundle.id).bind(&bundle.tenant_id).bind(&bundle.name).bind(&bundle.version)
        .bind(&bundle.sha256).bind(bundle.size).bind(bundle.archive_bytes).bind(&bundle.manifest)
        .bind(&bundle.publisher).bind(&bundle.object_key).bind(&bundle.created_by).bind(bundle.created_at)
        .bind(bundle.deleted_at)
        .execute(pool).await.map(|_| ()));
    match result {
        Err(e) if super::is_unique_violation(&e) => Err(ApiError::conflict(
            "bundle_exists",
            format!("bundle {} {} already exists", bundle.name, bundle.version),
        )),
        other => Ok(other?),
    }
}

/// A live (not retired) bundle of the tenant.
#[tracing::instrument(name = "db.bundles.get", level = "info", skip_all)]
pub async fn get(db: &Db, tenant_id: &str, id: &str) -> Result<Option<Bundle>, sqlx::Error> {
    with_pool!(db, pool => sqlx::query_as::<_, Bundle>(&format!(
        "SELECT {BUNDLE_COLUMNS} FROM bundles WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL"))
        .bind(tenant_id).bind(id).fetch_optional(pool).await)
}

#[tracing::instrument(name = "db.bundles.list", level = "info", skip_all)]
pub async fn list(db: &Db, tenant_id: &str) -> Result<Vec<Bundle>, sqlx::Error> {
    with_pool!(db, pool => sqlx::query_as::<_, Bundle>(&format!(
        "SELECT {BUNDLE_COLUMNS} FROM bundles WHERE tenant_id = $1 AND deleted_at IS NULL ORDER BY name, created_at"))
        .bind(tenant_id).fetch_all(pool).await)
}

/// Live bundles of `name` beyond the newest `keep`, not used by an unfinished deployment: the
/// ones retention retires. Newest first by semantic version.
pub async fn retirable(
    db: &Db,
    tenant_id: &str,
    name: &str,
    keep: usize,
) -> Result<Vec<Bundle>, sqlx::Error> {
    let mut live = with_pool!(db, pool => sqlx::query_as::<_, Bundle>(&format!(
        "SELECT {BUNDLE_COLUMNS} FROM bundles b WHERE tenant_id = $1 AND name = $2 AND deleted_at IS NULL"))
        .bind(tenant_id).bind(name).fetch_all(pool).await)?;
    live.sort_by_key(|b| std::cmp::Reverse(semver_of(&b.version)));
    let mut retire = Vec::new();
    for bundle in live.into_iter().skip(keep) {
        let in_use: i64 = with_pool!(db, pool => sqlx::query_scalar(
            "SELECT COUNT(*) FROM deployments WHERE bundle_id = $1 AND state IN ('running', 'paused')")
            .bind(&bundle.id).fetch_one(pool).await)?;
        if in_use == 0 {
            retire.push(bundle);
        }
    }
    Ok(retire)
}

pub async fn mark_retired(db: &Db, id: &str) -> Result<(), sqlx::Error> {
    with_pool!(db, pool => sqlx::query("UPDATE bundles SET deleted_at = $1 WHERE id = $2 AND deleted_at IS NULL")
        .bind(now_ms()).bind(id).execute(pool).await.map(|_| ()))
}

/// The newest live version of `name` older than `version` that some device installed
/// successfully: what a rollback goes back to (an older release that failed everywhere is no
/// place to return to).
pub async fn previous_version(
    db: &Db,
    tenant_id: &str,
    name: &str,
    version: &str,
) -> Result<Option<Bundle>, sqlx::Error> {
    let live = with_pool!(db, pool => sqlx::query_as::<_, Bundle>(&format!(
        "SELECT {BUNDLE_COLUMNS} FROM bundles b WHERE tenant_id = $1 AND name = $2 AND deleted_at IS NULL
           AND EXISTS (SELECT 1 FROM deployment_devices dd JOIN deployments d ON d.id = dd.deployment_id
                       WHERE d.bundle_id = b.id AND dd.state = 'succeeded')"))
        .bind(tenant_id).bind(name).fetch_all(pool).await)?;
    let current = semver_of(version);
    Ok(live
        .into_iter()
        .filter(|b| semver_of(&b.version) < current)
        .max_by(|a, b| semver_of(&a.version).cmp(&semver_of(&b.version))))
}

/// Stored versions were validated at upload; an unparsable one sorts first.
pub fn semver_of(version: &str) -> semver::Version {
    semver::Version::parse(version).unwrap_or(semver::Version::new(0, 0, 0))
}
