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
