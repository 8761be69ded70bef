//! User accounts and console sessions: how a person (rather than a script with an API key) logs in
//! to the web console.
//!
//! A session is a random cookie whose SHA-256 is the row's key, and it remembers what it logged in
//! with. Every request checks that again (the key not revoked, the user not disabled) and takes the
//! role from it, so revoking a key or disabling a user ends their sessions at once, on every
//! replica.

use super::tokens::{constant_time_eq, Principal, Role};
use super::{new_id, now_ms, rfc3339, with_pool, Db};
use crate::error::ApiError;
use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

/// Shortest password accepted.
pub const MIN_PASSWORD_CHARS: usize = 12;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct User {
    pub id: String,
    pub tenant_id: String,
    pub username: String,
    pub password_hash: String,
    pub role: String,
    pub created_at: i64,
    pub disabled_at: Option<i64>,
}

/// A user as the API, `--json` and the console show it (never the password hash).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UserView {
    pub id: String,
    pub username: String,
    pub role: String,
    pub created_at: String,
    pub disabled_at: Option<String>,
}

impl User {
    pub fn view(&self) -> UserView {
        UserView {
            id: self.id.clone(),
            username: self.username.clone(),
            role: self.role.clone(),
            created_at: rfc3339(self.created_at),
            disabled_at: self.disabled_at.map(rfc3339),
        }
    }
}

/// Usernames: 1–64 of `a-z 0-9 . _ @ -` starting with a letter or digit, so an e-mail address
/// works, nothing needs escaping, and no name is a path segment of its own (`.`, `..`).
pub fn check_username(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err("must be 1 to 64 characters".into());
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit()) {
        return Err("must start with a letter (a-z) or a digit".into());
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "._@-".contains(*c)))
    {
        Some(c) => Err(format!(
            "{c:?} is not allowed (use a-z, 0-9, `.`, `_`, `@`, `-`)"
        )),
        None => Ok(()),
    }
}

fn check_password(password: &str) -> Result<(), ApiError> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(ApiError::bad_request(
            "weak_password",
            format!("the password must have at least {MIN_PASSWORD_CHARS} characters"),
        ));
    }
    Ok(())
}

/// Argon2 runs at most one per core at a time: each takes 19 MiB and tens of milliseconds, and a
/// flood of logins must queue here rather than grow the blocking pool (up to 512 threads) to
/// gigabytes.
async fn password_work() -> tokio::sync::SemaphorePermit<'static> {
    static WORK: std::sync::LazyLock<tokio::sync::Semaphore> = std::sync::LazyLock::new(|| {
        tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get()))
    });
    // Never closed, so acquiring cannot fail.
    WORK.acquire()
        .await
        .unwrap_or_else(|_| unreachable!("the semaphore is never closed"))
}

/// Argon2id with the crate's defaults (19 MiB, 2 passes), on the blocking pool: tens of
/// milliseconds of CPU that must not stall a runtime worker.
async fn hash_password(password: String) -> Result<String, ApiError> {
    let _permit = password_work().await;
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
        argon2::Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("hashing a password: {e}")))
    })
    .await
    .map_err(|e| ApiError::Internal(e.into()))?
}

/// Checks `password` against `hash`, or against a hash of a random password when there is none (an
/// unknown user): a login attempt takes as long whether or not the name exists.
async fn verify_password(hash: Option<String>, password: String) -> bool {
    static DECOY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
        argon2::Argon2::default()
            .hash_password(random_hex(16).as_bytes(), &salt)
            .map(|h| h.to_string())
            .unwrap_or_default()
    });
    let _permit = password_work().await;
    tokio::task::spawn_blocking(move || {
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| DECOY.clone());
        let matches = PasswordHash::new(&hash).is_ok_and(|parsed| {
            argon2::Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        });
        known && matches
    })
    .await
    .unwrap_or(false)
}

#[tracing::instrument(name = "db.users.create", level = "info", skip_all)]
pub async fn create(
    db: &Db,
    tenant_id: &str,
    username: &str,
    password: &str,
    role: Role,
) -> Result<User, ApiError> {
    check_username(username)
        .map_err(|m| ApiError::bad_request("invalid_username", format!("username: {m}")))?;
    check_password(password)?;
    let user = User {
        id: new_id(),
        tenant_id: tenant_id.to_owned(),
        username: username.to_owned(),
        password_hash: hash_password(password.to_owned()).await?,
        role: role.as_str().to_owned(),
        created_at: now_ms(),
        disabled_at: None,
    };
    let inserted = with_pool!(db, pool => sqlx::query(
        "INSERT INTO users (id, tenant_id, username, password_hash, role, created_at)
         VALUES ($1, $2, $3, $4, $5, $6)")
        .bind(&user.id)
        .bind(&user.tenant_id)
        .bind(&user.username)
        .bind(&user.password_hash)
        .bind(&user.role)
        .bind(user.created_at)
        .execute(pool)
        .await.map(|r| r.rows_affected()));
    match inserted {
        Ok(_) => Ok(user),
        Err(e) if super::is_unique_violation(&e) => Err(ApiError::conflict(
            "user_exists",
            format!("a user named `{username}` already exists"),
        )),
        Err(e) => Err(e.into()),
    }
}

#[tracing::instrument(name = "db.users.list", level = "info", skip_all)]
pub async fn list(db: &Db, tenant_id: &str) -> Result<Vec<User>, sqlx::Error> {
    with_pool!(db, pool => sqlx::query_as::<_, User>(
        "SELECT id, tenant_id, username, password_hash, role, created_at, disabled_at FROM users
         WHERE tenant_id = $1 ORDER BY username")
        .bind(tenant_id)
        .fetch_all(pool)
        .await)
}

/// Disables the user and ends their sessions; `false` if the tenant has no such enabled user.
#[tracing::instrument(name = "db.users.disable", level = "info", skip_all)]
pub async fn disable(db: &Db, tenant_id: &str, username: &str) -> Result<bool, sqlx::Error> {
    let disabled = with_pool!(db, pool => sqlx::query(
        "UPDATE users SET disabled_at = $1 WHERE tenant_id = $2 AND username = $3 AND disabled_at IS NULL")
        .bind(now_ms())
        .bind(tenant_id)
        .bind(username)
        .execute(pool)
        .await.map(|r| r.rows_affected()))?;
    with_pool!(db, pool => sqlx::query(
        "DELETE FROM console_sessions WHERE user_id IN (SELECT id FROM users WHERE tenant_id = $1 AND username = $2)")
        .bind(tenant_id)
        .bind(username)
        .execute(pool)
        .await.map(|r| r.rows_affected()))?;
    Ok(disabled == 1)
}

/// Checks a username and password; `None` for an unknown user, a wrong password or a disabled
/// account alike, after the same amount of work.
#[tracing::instrument(name = "db.users.authenticate", level = "info", skip_all)]
pub async fn authenticate(
    db: &Db,
    username: &str,
    password: &str,
) -> Result<Option<(String, Principal)>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        id: String,
        password_hash: String,
        role: String,
        disabled_at: Option<i64>,
        tenant_id: String,
        tenant_name: String,
    }
    let row = with_pool!(db, pool => sqlx::query_as::<_, Row>(
        "SELECT u.id, u.password_hash, u.role, u.disabled_at, u.tenant_id, t.name AS tenant_name
         FROM users u JOIN tenants t ON t.id = u.tenant_id WHERE u.username = $1")
        .bind(username)
        .fetch_optional(pool)
        .await)?;
    let hash = row.as_ref().map(|r| r.password_hash.clone());
    let matches = verify_password(hash, password.to_owned()).await;
    Ok(row
        .filter(|r| matches && r.disabled_at.is_none())
        .and_then(|r| {
            Some((
                r.id,
                Principal {
                    actor: format!("user:{username}"),
                    tenant_id: r.tenant_id,
                    tenant_name: r.tenant_name,
                    role: Role::parse(&r.role)?,
                },
            ))
        }))
}

/// What a console session logged in with.
#[derive(Debug, Clone)]
pub enum Login {
    ApiKey(String),
    User(String),
}

/// A session as its cookie finds it.
#[derive(Debug, Clone)]
pub struct Session {
    pub principal: Principal,
    /// The token every form of this session must carry back.
    pub csrf: String,
    pub expires_at: i64,
}

fn session_hash(cookie: &str) -> Vec<u8> {
    Sha256::digest(cookie.as_bytes()).to_vec()
}

fn random_hex(bytes: usize) -> String {
    use rand::RngCore as _;
    let mut buf = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut buf);
    kernex_protocol::token::hex(&buf)
}

/// Starts a session for `login`; returns the cookie value (shown to the browser only) and the
/// session. Expired sessions are swept on the way.
#[tracing::instrument(name = "db.users.start_session", level = "info", skip_all)]
pub async fn start_session(
    db: &Db,
    principal: Principal,
    login: &Login,
    lifetime: std::time::Duration,
) -> Result<(String, Session), sqlx::Error> {
    let now = now_ms();
    with_pool!(db, pool => sqlx::query("DELETE FROM console_sessions WHERE expires_at < $1")
        .bind(now)
        .execute(pool)
        .await.map(|r| r.rows_affected()))?;
    let cookie = random_hex(32);
    let session = Session {
        principal,
        csrf: random_hex(32),
        expires_at: now + lifetime.as_millis() as i64,
    };
    let (api_key_id, user_id) = match login {
        Login::ApiKey(id) => (Some(id.as_str()), None),
        Login::User(id) => (None, Some(id.as_str())),
    };
    with_pool!(db, pool => sqlx::query(
        "INSERT INTO console_sessions (id_hash, tenant_id, api_key_id, user_id, csrf, created_at, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)")
        .bind(session_hash(&cookie))
        .bind(&session.principal.tenant_id)
        .bind(api_key_id)
        .bind(user_id)
        .bind(&session.csrf)
        .bind(now)
        .bind(session.expires_at)
        .execute(pool)
        .await.map(|r| r.rows_affected()))?;
    Ok((cookie, session))
}

/// The live session of a cookie: not expired, logged in with a key that is not revoked or a user
/// that is not disabled, with that key's or user's role as it is now.
#[tracing::instrument(name = "db.users.session", level = "info", skip_all)]
pub async fn session(db: &Db, cookie: &str) -> Result<Option<Session>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        id_hash: Vec<u8>,
        tenant_id: String,
        tenant_name: String,
        csrf: String,
        expires_at: i64,
        api_key_id: Option<String>,
        key_role: Option<String>,
        key_revoked_at: Option<i64>,
        username: Option<String>,
        user_role: Option<String>,
        user_disabled_at: Option<i64>,
    }
    let hash = session_hash(cookie);
    let row = with_pool!(db, pool => sqlx::query_as::<_, Row>(
        "SELECT s.id_hash, s.tenant_id, t.name AS tenant_name, s.csrf, s.expires_at, s.api_key_id,
                k.role AS key_role, k.revoked_at AS key_revoked_at,
                u.username, u.role AS user_role, u.disabled_at AS user_disabled_at
         FROM console_sessions s
         JOIN tenants t ON t.id = s.tenant_id
         LEFT JOIN api_keys k ON k.id = s.api_key_id
         LEFT JOIN users u ON u.id = s.user_id
         WHERE s.id_hash = $1")
        .bind(&hash)
        .fetch_optional(pool)
        .await)?;
    let Some(row) = row else { return Ok(None) };
    if !constant_time_eq(&row.id_hash, &hash) || row.expires_at <= now_ms() {
        return Ok(None);
    }
    let (actor, role) = match (row.api_key_id, row.username) {
        (Some(key), None) if row.key_revoked_at.is_none() => {
            (format!("apikey:{key}"), row.key_role)
        }
        (None, Some(user)) if row.user_disabled_at.is_none() => {
            (format!("user:{user}"), row.user_role)
        }
        _ => return Ok(None),
    };
    let Some(role) = role.as_deref().and_then(Role::parse) else {
        return Ok(None);
    };
    Ok(Some(Session {
        principal: Principal {
            actor,
            tenant_id: row.tenant_id,
            tenant_name: row.tenant_name,
            role,
        },
        csrf: row.csrf,
        expires_at: row.expires_at,
    }))
}

#[tracing::instrument(name = "db.users.end_session", level = "info", skip_all)]
pub async fn end_session(db: &Db, cookie: &str) -> Result<(), sqlx::Error> {
    with_pool!(db, pool => sqlx::query("DELETE FROM console_sessions WHERE id_hash = $1")
        .bind(session_hash(cookie))
        .execute(pool)
        .await.map(|r| r.rows_affected()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_are_checked() {
        for good in ["alice", "ops.team-1", "a@example.com", "x_y"] {
            assert_eq!(check_username(good), Ok(()), "{good}");
        }
        assert!(check_username("").is_err());
        for bad in [".", "..", "-x", "_x", "@x"] {
            assert!(
                check_username(bad).unwrap_err().contains("must start"),
                "{bad}"
            );
        }
        assert!(check_username(&"a".repeat(65)).is_err());
        let err = check_username("aLice").unwrap_err();
        assert!(err.contains("'L'"), "{err}");
        assert!(check_username("a b").unwrap_err().contains("' '"));
    }

    #[tokio::test]
    async fn passwords_hash_and_verify() {
        let hash = hash_password("correct horse battery".into()).await.unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(verify_password(Some(hash.clone()), "correct horse battery".into()).await);
        assert!(!verify_password(Some(hash), "correct horse battery!".into()).await);
        assert!(!verify_password(None, "correct horse battery".into()).await);
        assert!(check_password("short").is_err());
    }

    #[tokio::test]
    async fn sessions_follow_their_key_and_user() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(None, dir.path()).await.unwrap();
        let tenant = super::super::tenants::create(&db, "acme").await.unwrap();
        let day = std::time::Duration::from_secs(86400);

        // A user's session carries the user's role, and ends when the user is disabled.
        create(
            &db,
            &tenant.id,
            "alice",
            "a long enough password",
            Role::Operator,
        )
        .await
        .unwrap();
        assert!(authenticate(&db, "alice", "wrong password!!")
            .await
            .unwrap()
            .is_none());
        assert!(authenticate(&db, "bob", "a long enough password")
            .await
            .unwrap()
            .is_none());
        let (user_id, principal) = authenticate(&db, "alice", "a long enough password")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (principal.actor.as_str(), principal.role),
            ("user:alice", Role::Operator)
        );
        let (cookie, started) = start_session(&db, principal, &Login::User(user_id), day)
            .await
            .unwrap();
        let found = session(&db, &cookie).await.unwrap().unwrap();
        assert_eq!(found.csrf, started.csrf);
        assert!(session(&db, "not-a-cookie").await.unwrap().is_none());
        assert!(disable(&db, &tenant.id, "alice").await.unwrap());
        assert!(session(&db, &cookie).await.unwrap().is_none());
        assert!(authenticate(&db, "alice", "a long enough password")
            .await
            .unwrap()
            .is_none());
        assert!(matches!(
            create(
                &db,
                &tenant.id,
                "alice",
                "another long password",
                Role::Viewer
            )
            .await,
            Err(ApiError::Conflict { .. })
        ));

        // An API key's session ends when the key is revoked, or at logout.
        let (key, _) = super::super::tokens::create_api_key(&db, &tenant.id, Role::Viewer, "")
            .await
            .unwrap();
        let principal = super::super::tokens::authenticate_api_key(&db, &key)
            .await
            .unwrap()
            .unwrap();
        let login = Login::ApiKey(key.id().to_owned());
        let (cookie, _) = start_session(&db, principal.clone(), &login, day)
            .await
            .unwrap();
        let (other, _) = start_session(&db, principal.clone(), &login, day)
            .await
            .unwrap();
        end_session(&db, &other).await.unwrap();
        assert!(session(&db, &other).await.unwrap().is_none());
        assert_eq!(
            session(&db, &cookie).await.unwrap().unwrap().principal.role,
            Role::Viewer
        );
        super::super::tokens::revoke_api_key(&db, &tenant.id, key.id())
            .await
            .unwrap();
        assert!(session(&db, &cookie).await.unwrap().is_none());

        // An expired session is gone.
        let (cookie, _) = start_session(&db, principal, &login, std::time::Duration::ZERO)
            .await
            .unwrap();
        assert!(session(&db, &cookie).await.unwrap().is_none());
    }
}
