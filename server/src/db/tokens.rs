//! Bootstrap tokens (enroll devices) and API keys (authenticate operators). Only the SHA-256 of each
//! secret is stored; the whole token is shown once, when it is created.

use super::{now_ms, rfc3339, with_pool, Db};
use crate::error::ApiError;
use kernex_protocol::{SecretToken, TokenKind};
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BootstrapToken {
    pub id: String,
    pub tenant_id: String,
    pub secret_hash: Vec<u8>,
    pub description: String,
    pub uses_allowed: Option<i64>,
    pub uses: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub created_at: i64,
}

/// Whether a bootstrap token can enroll a new device now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum TokenState {
    Active,
    Expired,
    Revoked,
    Exhausted,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BootstrapTokenView {
    pub id: String,
    pub state: TokenState,
    pub description: String,
    pub uses: i64,
    pub uses_allowed: Option<i64>,
    pub expires_at: Option<String>,
    pub revoked_at: Option<String>,
    pub created_at: String,
}

const TOKEN_COLUMNS: &str =
    "id, tenant_id, secret_hash, description, uses_allowed, uses, expires_at, revoked_at, created_at";

impl BootstrapToken {
    pub fn state(&self, now: i64) -> TokenState {
        if self.revoked_at.is_some() {
            TokenState::Revoked
        } else if self.expires_at.is_some_and(|e| e <= now) {
            TokenState::Expired
        } else if self
            .uses_allowed
            .is_some_and(|allowed| self.uses >= allowed)
        {
            TokenState::Exhausted
        } else {
            TokenState::Active
        }
    }

    /// True when `token`'s secret is this token's (constant time).
    pub fn matches(&self, token: &SecretToken) -> bool {
        constant_time_eq(&self.secret_hash, &token.secret_hash())
    }

    pub fn view(&self) -> BootstrapTokenView {
        BootstrapTokenView {
            id: self.id.clone(),
            state: self.state(now_ms()),
            description: self.description.clone(),
            uses: self.uses,
            uses_allowed: self.uses_allowed,
            expires_at: self.expires_at.map(rfc3339),
            revoked_at: self.revoked_at.map(rfc3339),
            created_at: rfc3339(self.created_at),
        }
    }
}

/// Limits of a new bootstrap token.
#[derive(Debug, Clone, Default)]
pub struct NewBootstrapToken {
    /// How many devices may enroll with it; `None` = unlimited.
    pub uses: Option<u32>,
    /// How long it stays valid; `None` = until revoked.
    pub ttl: Option<Duration>,
    pub description: String,
}

#[tracing::instrument(name = "db.tokens.create_bootstrap_token", level = "info", skip_all)]
pub async fn create_bootstrap_token(
    db: &Db,
    tenant_id: &str,
    spec: &NewBootstrapToken,
) -> Result<(SecretToken, BootstrapToken), ApiError> {
    if spec.uses == Some(0) {
        return Err(ApiError::bad_request(
            "invalid_uses",
            "uses must be at least 1",
        ));
    }
    let secret = SecretToken::generate(TokenKind::Bootstrap);
    let now = now_ms();
    let expires_at = match spec.ttl {
        Some(ttl) if ttl.is_zero() => {
            return Err(ApiError::bad_request(
                "invalid_ttl",
                "ttl must be longer than zero",
            ))
        }
        Some(ttl) => Some(now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX))),
        None => None,
    };
    let row = BootstrapToken {
        id: secret.id().to_owned(),
        tenant_id: tenant_id.to_owned(),
        secret_hash: secret.secret_hash().to_vec(),
        description: spec.description.clone(),
        uses_allowed: spec.uses.map(i64::from),
        uses: 0,
        expires_at,
        revoked_at: None,
        created_at: now,
    };
    with_pool!(db, pool => sqlx::query(
        "INSERT INTO bootstrap_tokens (id, tenant_id, secret_hash, description, uses_allowed, uses, expires_at, created_at)
         VALUES ($1, $2, $3, $4, $5, 0, $6, $7)")
        .bind(&row.id)
        .bind(&row.tenant_id)
        .bind(&row.secret_hash)
        .bind(&row.description)
        .bind(row.uses_allowed)
        .bind(row.expires_at)
        .bind(row.created_at)
        .execute(pool)
        .await.map(|r| r.rows_affected()))?;
    Ok((secret, row))
}

pub async fn bootstrap_token(
    db: &Db,
    tenant_id: &str,
    id: &str,
) -> Result<Option<BootstrapToken>, sqlx::Error> {
    let sql =
        format!("SELECT {TOKEN_COLUMNS} FROM bootstrap_tokens WHERE tenant_id = $1 AND id = $2");
    with_pool!(db, pool => sqlx::query_as::<_, BootstrapToken>(&sql)
        .bind(tenant_id)
        .bind(id)
        .fetch_optional(pool)
        .await)
}

#[tracing::instrument(name = "db.tokens.list_bootstrap_tokens", level = "info", skip_all)]
pub async fn list_bootstrap_tokens(
    db: &Db,
    tenant_id: &str,
) -> Result<Vec<BootstrapToken>, sqlx::Error> {
    let sql = format!(
        "SELECT {TOKEN_COLUMNS} FROM bootstrap_tokens WHERE tenant_id = $1 ORDER BY created_at, id"
    );
    with_pool!(db, pool => sqlx::query_as::<_, BootstrapToken>(&sql)
        .bind(tenant_id)
        .fetch_all(pool)
        .await)
}

/// Revokes a token; revoking twice is not an error (the first revocation time is kept).
#[tracing::instrument(name = "db.tokens.revoke_bootstrap_token", level = "info", skip_all)]
pub async fn revoke_bootstrap_token(
    db: &Db,
    tenant_id: &str,
    id: &str,
) -> Result<BootstrapToken, ApiError> {
    with_pool!(db, pool => sqlx::query(
        "UPDATE bootstrap_tokens SET revoked_at = $1 WHERE tenant_id = $2 AND id = $3 AND revoked_at IS NULL")
        .bind(now_ms())
        .bind(tenant_id)
        .bind(id)
        .execute(pool)
        .await.map(|r| r.rows_affected()))?;
    bootstrap_token(db, tenant_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("unknown_token", format!("no bootstrap token `{id}`")))
}

/// Operator roles, from least to most powerful.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads everything in its tenant.
    Viewer,
    /// Also queues commands, deregisters devices.
    Operator,
    /// Also manages bootstrap tokens and API keys.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApiKey {
    pub id: String,
    pub tenant_id: String,
    pub secret_hash: Vec<u8>,
    pub role: String,
    pub description: String,
    pub revoked_at: Option<i64>,
    pub created_at: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ApiKeyView {
    pub id: String,
    pub role: String,
    pub description: String,
    pub revoked_at: Option<String>,
    pub created_at: String,
}

impl ApiKey {
    pub fn view(&self) -> ApiKeyView {
        ApiKeyView {
            id: self.id.clone(),
            role: self.role.clone(),
            description: self.description.clone(),
            revoked_at: self.revoked_at.map(rfc3339),
            created_at: rfc3339(self.created_at),
        }
    }
}

/// Who is calling the REST API: resolved from an API key, or from a console session (which logged
/// in with an API key or a user account).
#[derive(Debug, Clone)]
pub struct Principal {
    /// How the audit log names the caller: `apikey:<id>` or `user:<username>`.
    pub actor: String,
    pub tenant_id: String,
    pub tenant_name: String,
    pub role: Role,
}

impl Principal {
    /// `403 forbidden` unless the caller's role is at least `needed`.
    pub fn require(&self, needed: Role) -> Result<(), ApiError> {
        if self.role >= needed {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "forbidden",
                format!(
                    "this needs the {} role; the caller has {}",
                    needed.as_str(),
                    self.role.as_str()
                ),
            ))
        }
    }

    /// How the audit log names this caller.
    pub fn actor(&self) -> String {
        self.actor.clone()
    }
}

#[tracing::instrument(name = "db.tokens.create_api_key", level = "info", skip_all)]
pub async fn create_api_key(
    db: &Db,
    tenant_id: &str,
    role: Role,
    description: &str,
) -> Result<(SecretToken, ApiKey), ApiError> {
    let secret = SecretToken::generate(TokenKind::ApiKey);
    let row = ApiKey {
        id: secret.id().to_owned(),
        tenant_id: tenant_id.to_owned(),
        secret_hash: secret.secret_hash().to_vec(),
        role: role.as_str().to_owned(),
        description: description.to_owned(),
        revoked_at: None,
        created_at: now_ms(),
    };
    with_pool!(db, pool => sqlx::query(
        "INSERT INTO api_keys (id, tenant_id, secret_hash, role, description, created_at) VALUES ($1, $2, $3, $4, $5, $6)")
        .bind(&row.id)
        .bind(&row.tenant_id)
        .bind(&row.secret_hash)
        .bind(&row.role)
        .bind(&row.description)
        .bind(row.created_at)
        .execute(pool)
        .await.map(|r| r.rows_affected()))?;
    Ok((secret, row))
}

#[tracing::instrument(name = "db.tokens.list_api_keys", level = "info", skip_all)]
pub async fn list_api_keys(db: &Db, tenant_id: &str) -> Result<Vec<ApiKey>, sqlx::Error> {
    with_pool!(db, pool => sqlx::query_as::<_, ApiKey>(
        "SELECT id, tenant_id, secret_hash, role, description, revoked_at, created_at FROM api_keys
         WHERE tenant_id = $1 ORDER BY created_at, id")
        .bind(tenant_id)
        .fetch_all(pool)
        .await)
}

#[tracing::instrument(name = "db.tokens.revoke_api_key", level = "info", skip_all)]
pub async fn revoke_api_key(db: &Db, tenant_id: &str, id: &str) -> Result<bool, sqlx::Error> {
    let done = with_pool!(db, pool => sqlx::query(
        "UPDATE api_keys SET revoked_at = $1 WHERE tenant_id = $2 AND id = $3 AND revoked_at IS NULL")
        .bind(now_ms())
        .bind(tenant_id)
        .bind(id)
        .execute(pool)
        .await.map(|r| r.rows_affected()))?;
    Ok(done == 1)
}

/// Resolves an API key to its principal; `None` for unknown, wrong or revoked keys alike, so a caller
/// learns nothing about which.
#[tracing::instrument(name = "db.tokens.authenticate_api_key", level = "info", skip_all)]
pub async fn authenticate_api_key(
    db: &Db,
    key: &SecretToken,
) -> Result<Option<Principal>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        secret_hash: Vec<u8>,
        role: String,
        revoked_at: Option<i64>,
        tenant_id: String,
        tenant_name: String,
    }
    let row = with_pool!(db, pool => sqlx::query_as::<_, Row>(
        "SELECT k.secret_hash, k.role, k.revoked_at, k.tenant_id, t.name AS tenant_name
         FROM api_keys k JOIN tenants t ON t.id = k.tenant_id WHERE k.id = $1")
        .bind(key.id())
        .fetch_optional(pool)
        .await)?;
    Ok(row.and_then(|row| {
        let valid =
            constant_time_eq(&row.secret_hash, &key.secret_hash()) && row.revoked_at.is_none();
        Some(Principal {
            actor: format!("apikey:{}", key.id()),
            tenant_id: row.tenant_id,
            tenant_name: row.tenant_name,
            role: Role::parse(&row.role)?,
        })
        .filter(|_| valid)
    }))
}

/// Compares two byte strings in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(
        uses_allowed: Option<i64>,
        uses: i64,
        expires_at: Option<i64>,
        revoked_at: Option<i64>,
    ) -> BootstrapToken {
        BootstrapToken {
            id: "0123456789abcdef".into(),
            tenant_id: "t".into(),
            secret_hash: vec![],
            description: String::new(),
            uses_allowed,
            uses,
            expires_at,
            revoked_at,
            created_at: 0,
        }
    }

    #[test]
    fn token_state_prefers_revoked_then_expired_then_exhausted() {
        assert_eq!(token(None, 5, None, None).state(100), TokenState::Active);
        assert_eq!(
            token(Some(1), 1, None, None).state(100),
            TokenState::Exhausted
        );
        assert_eq!(
            token(Some(1), 1, Some(100), None).state(100),
            TokenState::Expired
        );
        assert_eq!(
            token(Some(1), 1, Some(100), Some(50)).state(100),
            TokenState::Revoked
        );
        assert_eq!(
            token(Some(2), 1, Some(101), None).state(100),
            TokenState::Active
        );
    }

    #[test]
    fn roles_are_ordered() {
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Viewer);
        let p = Principal {
            actor: "apikey:k".into(),
            tenant_id: "t".into(),
            tenant_name: "acme".into(),
            role: Role::Viewer,
        };
        assert!(p.require(Role::Viewer).is_ok());
        assert_eq!(
            p.require(Role::Admin).unwrap_err().to_string(),
            "this needs the admin role; the caller has viewer"
        );
    }

    #[test]
    fn constant_time_eq_compares_whole_strings() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
