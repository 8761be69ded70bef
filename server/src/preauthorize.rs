//! Bulk registration of devices that have no key yet, with ready-made bearer tokens.
//!
//! Load tests use it to seed 100k devices in seconds (an honest seed: the rows are the same rows
//! enrollment writes, the tokens the same tokens `/auth` issues). Such a device cannot `/auth` until
//! it enrolls for real with a bootstrap token, which gives it a key.

use crate::db::tenants::Tenant;
use crate::db::{new_id, now_ms, secrets, with_pool, Db};
use crate::device_token::{DeviceClaims, DeviceTokenKey};
use anyhow::Context as _;
use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

/// Rows per INSERT statement: far below both backends' bound-parameter limits.
const ROWS_PER_INSERT: usize = 500;

pub async fn preauthorize(
    db: &Db,
    tenant: &Tenant,
    count: u32,
    token_ttl: Duration,
    out: &Path,
) -> anyhow::Result<u32> {
    let key =
        DeviceTokenKey::new(&secrets::get_or_create(db, crate::serve::DEVICE_TOKEN_SECRET).await?);
    let now = now_ms();
    let expires_at = now / 1000 + token_ttl.as_secs() as i64;
    let ids: Vec<String> = (0..count).map(|_| new_id()).collect();
    for chunk in ids.chunks(ROWS_PER_INSERT) {
        let mut sql = String::from(
            "INSERT INTO devices (id, tenant_id, hardware_id, key_fingerprint, public_key, enrolled_at) VALUES ",
        );
        for i in 0..chunk.len() {
            let p = i * 4;
            if i > 0 {
                sql.push(',');
            }
            sql.push_str(&format!(
                "(${}, ${}, ${}, ${}, '', ${})",
                p + 1,
                p + 2,
                p + 3,
                p + 4,
                chunk.len() * 4 + 1
            ));
        }
        with_pool!(db, pool => async {
            let mut query = sqlx::query(&sql);
            for id in chunk {
                query = query
                    .bind(id.clone())
                    .bind(tenant.id.clone())
                    .bind(format!("preauthorized:{id}"))
                    .bind(format!("preauthorized:{id}"));
            }
            let mut tx = pool.begin().await?;
            query.bind(now).execute(&mut *tx).await?;
            // Their rows in `device_heartbeats` (see `db::devices::INSERT_HEARTBEAT_ROW`).
            let rows = (1..=chunk.len()).map(|p| format!("(${p})")).collect::<Vec<_>>().join(",");
            let sql = format!("INSERT INTO device_heartbeats (device_id) VALUES {rows}");
            let mut heartbeats = sqlx::query(&sql);
            for id in chunk {
                heartbeats = heartbeats.bind(id.clone());
            }
            heartbeats.execute(&mut *tx).await?;
            tx.commit().await
        }.await)
        .context("inserting pre-authorized devices")?;
    }
    let mut file = create_private(out)?;
    let mut buffer = String::with_capacity(ids.len() * 200);
    for id in &ids {
        let token = key.issue(&DeviceClaims {
            device_id: id.clone(),
            tenant_id: tenant.id.clone(),
            expires_at,
        });
        buffer.push_str(id);
        buffer.push(' ');
        buffer.push_str(&token);
        buffer.push('\n');
    }
    file.write_all(buffer.as_bytes())
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(count)
}

/// Creates (or truncates) `path` readable by its owner only: it holds credentials.
fn create_private(path: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))
}
