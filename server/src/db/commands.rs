//! Commands queued by operators for one device, delivered in heartbeat responses until acknowledged.
//!
//! States: `queued` → `delivered` (sent at least once) → `succeeded` | `failed`. Delivery is
//! at-least-once; the agent deduplicates by id.

use super::{new_id, now_ms, rfc3339, with_pool, Db};
use crate::error::ApiError;
use kernex_protocol::wire::CommandSpec;
use serde::Serialize;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Command {
    pub id: String,
    pub device_id: String,
    pub kind: String,
    pub args: String,
    pub state: String,
    pub created_by: String,
    pub created_at: i64,
    pub delivered_at: Option<i64>,
    pub deliveries: i64,
    pub completed_at: Option<i64>,
    pub output: Option<String>,
}

const COMMAND_COLUMNS: &str =
    "id, device_id, kind, args, state, created_by, created_at, delivered_at, deliveries, completed_at, output";

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CommandView {
    pub id: String,
    pub device_id: String,
    pub kind: String,
    pub args: serde_json::Value,
    pub state: String,
    pub created_by: String,
    pub created_at: String,
    pub delivered_at: Option<String>,
    pub deliveries: i64,
    pub completed_at: Option<String>,
    pub output: Option<String>,
}

impl Command {
    pub fn view(&self) -> CommandView {
        CommandView {
            id: self.id.clone(),
            device_id: self.device_id.clone(),
            kind: self.kind.clone(),
            args: serde_json::from_str(&self.args).unwrap_or(serde_json::Value::Null),
            state: self.state.clone(),
            created_by: self.created_by.clone(),
            created_at: rfc3339(self.created_at),
            delivered_at: self.delivered_at.map(rfc3339),
            deliveries: self.deliveries,
            completed_at: self.completed_at.map(rfc3339),
            output: self.output.clone(),
        }
    }
}

/// Queues a validated command for `device_id`.
#[tracing::instrument(name = "db.commands.queue", level = "info", skip_all)]
pub async fn queue(
    db: &Db,
    device_id: &str,
    spec: &CommandSpec,
    created_by: &str,
) -> Result<Command, ApiError> {
    let args = match serde_json::to_value(spec).map_err(anyhow::Error::from)? {
        serde_json::Value::Object(mut o) => o.remove("args").unwrap_or(serde_json::Value::Null),
        _ => serde_json::Value::Null,
    };
    let command = Command {
        id: new_id(),
        device_id: device_id.to_owned(),
        kind: spec.kind().to_owned(),
        args: args.to_string(),
        state: "queued".into(),
        created_by: created_by.to_owned(),
        created_at: now_ms(),
        delivered_at: None,
        deliveries: 0,
        completed_at: None,
        output: None,
    };
    with_pool!(db, pool => sqlx::query(
        "INSERT INTO commands (id, device_id, kind, args, state, created_by, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)")
        .bind(&command.id)
        .bind(&command.device_id)
        .bind(&command.kind)
        .bind(&command.args)
        .bind(&command.state)
        .bind(&command.created_by)
        .bind(command.created_at)
        .execute(pool)
        .await.map(|r| r.rows_affected()))?;
    Ok(command)
}

#[tracing::instrument(name = "db.commands.list", level = "info", skip_all)]
pub async fn list(db: &Db, device_id: &str) -> Result<Vec<Command>, sqlx::Error> {
    let sql = format!(
        "SELECT {COMMAND_COLUMNS} FROM commands WHERE device_id = $1 ORDER BY created_at, id"
    );
    with_pool!(db, pool => sqlx::query_as::<_, Command>(&sql).bind(device_id).fetch_all(pool).await)
}

#[tracing::instrument(name = "db.commands.get", level = "info", skip_all)]
pub async fn get(db: &Db, device_id: &str, id: &str) -> Result<Option<Command>, sqlx::Error> {
    let sql = format!("SELECT {COMMAND_COLUMNS} FROM commands WHERE device_id = $1 AND id = $2");
    with_pool!(db, pool => sqlx::query_as::<_, Command>(&sql).bind(device_id).bind(id).fetch_optional(pool).await)
}
