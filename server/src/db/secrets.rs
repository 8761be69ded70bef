//! Server-wide secrets kept in the database so every replica shares them.

use super::{with_pool, Db};
use rand::RngCore;

/// The named 32-byte secret, created at random by whichever replica asks first.
pub async fn get_or_create(db: &Db, name: &str) -> Result<Vec<u8>, sqlx::Error> {
    let mut fresh = vec![0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut fresh);
    with_pool!(db, pool => {
        sqlx::query("INSERT INTO server_secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .bind(&fresh)
            .execute(pool)
            .await?;
        sqlx::query_scalar::<_, Vec<u8>>("SELECT value FROM server_secrets WHERE name = $1")
            .bind(name)
            .fetch_one(pool)
            .await
    })
}

/// The value of `name`, if it exists.
pub async fn get(db: &Db, name: &str) -> Result<Option<Vec<u8>>, sqlx::Error> {
    with_pool!(db, pool => sqlx::query_scalar::<_, Vec<u8>>("SELECT value FROM server_secrets WHERE name = $1")
        .bind(name)
        .fetch_optional(pool)
        .await)
}

/// Replaces `name` with a fresh random value, keeping the old one as `previous` (one transaction,
/// so every replica sees either the old pair or the new one).
pub async fn rotate(db: &Db, name: &str, previous: &str) -> Result<(), sqlx::Error> {
    use super::BeginWrite as _;
    let mut fresh = vec![0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut fresh);
    with_pool!(db, pool => {
        let mut tx = pool.begin_write().await?;
        let current: Option<Vec<u8>> = sqlx::query_scalar("SELECT value FROM server_secrets WHERE name = $1")
            .bind(name).fetch_optional(&mut *tx).await?;
        if let Some(current) = current {
            sqlx::query("INSERT INTO server_secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = excluded.value")
                .bind(previous).bind(current).execute(&mut *tx).await?;
        }
        sqlx::query("INSERT INTO server_secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = excluded.value")
            .bind(name).bind(&fresh).execute(&mut *tx).await?;
        tx.commit().await
    })
}
