//! The heartbeat path: handlers hand each beat to a writer task that commits many beats in one
//! transaction, so the cost of a durable commit (an fsync on SQLite) is shared by everything that
//! arrived while the previous commit was running. Nothing waits on a timer: under light load a
//! batch is one beat, under heavy load it grows by itself.
//!
//! On PostgreSQL several writers commit concurrently; should two batches ever deadlock on the same
//! device rows, PostgreSQL aborts one and its beats are answered 503 (agents retry).
//!
//! When the queue is full the handler answers `503 overloaded` with `Retry-After` at once instead
//! of queueing without bound; agents back off and come back.

use crate::db::{now_ms, with_pool, Db};
use crate::error::ApiError;
use kernex_protocol::wire::{CommandAck, CommandOutcome, DeviceCommand, MAX_COMMAND_OUTPUT};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Mutex};

/// One accepted heartbeat on its way to the database.
#[derive(Debug)]
pub struct Beat {
    pub device_id: String,
    pub agent_version: String,
    pub interval_s: u32,
    /// Telemetry already serialized by the handler, off the writer's critical path.
    pub telemetry_json: String,
    pub acks: Vec<CommandAck>,
}

/// What the database said about a beat.
#[derive(Debug, PartialEq)]
pub enum BeatOutcome {
    /// Stored; these commands are open for the device.
    Accepted {
        commands: Vec<DeviceCommand>,
    },
    Deregistered,
    UnknownDevice,
}

type Reply = oneshot::Sender<Result<BeatOutcome, ApiError>>;

/// Handle to the writer tasks; cheap to clone.
#[derive(Debug, Clone)]
pub struct HeartbeatWriter {
    queue: mpsc::Sender<(Beat, Reply)>,
}

/// Tuning of the writer.
#[derive(Debug, Clone, Copy)]
pub struct WriterConfig {
    /// Beats waiting beyond this many are refused with 503.
    pub queue_depth: usize,
    /// Most beats committed in one transaction.
    pub max_batch: usize,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            queue_depth: 16_384,
            max_batch: 1_024,
        }
    }
}

impl HeartbeatWriter {
    /// Starts the writer tasks: one for SQLite (it has one writer anyway), several for PostgreSQL.
    pub fn start(db: Db, config: WriterConfig) -> HeartbeatWriter {
        let (queue, receiver) = mpsc::channel(config.queue_depth);
        let receiver = Arc::new(Mutex::new(receiver));
        let writers = match db {
            Db::Sqlite(_) => 1,
            Db::Postgres(_) => 4,
        };
        let db = db.heartbeat_writer_pool();
        for _ in 0..writers {
            tokio::spawn(run_writer(db.clone(), receiver.clone(), config.max_batch));
        }
        HeartbeatWriter { queue }
    }

    /// Queues a beat and waits until it is committed.
    pub async fn submit(&self, beat: Beat) -> Result<BeatOutcome, ApiError> {
        let (reply, outcome) = oneshot::channel();
        self.queue.try_send((beat, reply)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => ApiError::Overloaded { retry_after_s: 2 },
            mpsc::error::TrySendError::Closed(_) => {
                ApiError::Internal(anyhow::anyhow!("heartbeat writer has stopped"))
            }
        })?;
        outcome
            .await
            .map_err(|_| ApiError::Internal(anyhow::anyhow!("heartbeat writer dropped a beat")))?
    }
}

async fn run_writer(db: Db, receiver: Arc<Mutex<mpsc::Receiver<(Beat, Reply)>>>, max_batch: usize) {
    let mut batch = Vec::with_capacity(max_batch);
    loop {
        {
            let mut receiver = receiver.lock().await;
            if receiver.recv_many(&mut batch, max_batch).await == 0 {
                return; // every sender is gone: the server is shutting down
            }
        }
        let now = now_ms();
        match write_batch(&db, &batch, now).await {
            Ok(outcomes) => {
                for ((_, reply), outcome) in batch.drain(..).zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, beats = batch.len(), "committing heartbeats failed");
                for (_, reply) in batch.drain(..) {
                    let _ = reply.send(Err(ApiError::DatabaseUnavailable { retry_after_s: 5 }));
                }
            }
        }
    }
}

/// The SQL of the per-batch statements. The batch travels as one JSON parameter, so each statement
/// has one fixed text (prepared once, cached) whatever the batch size; the JSON-to-rows function is
/// the one place where the two dialects differ.
struct BatchSql {
    store: &'static str,
    existing: &'static str,
    open_commands: &'static str,
    mark_delivered: &'static str,
}

const SQLITE_BATCH: BatchSql = BatchSql {
    store: "UPDATE devices SET last_heartbeat = $1, interval_s = v.interval_s, agent_version = v.agent_version,
            telemetry = v.telemetry
            FROM (SELECT value ->> 'id' AS id, value ->> 'interval_s' AS interval_s,
                         value ->> 'agent_version' AS agent_version, value ->> 'telemetry' AS telemetry
                  FROM json_each($2)) AS v
            WHERE devices.id = v.id AND devices.deregistered_at IS NULL RETURNING devices.id",
    existing: "SELECT id FROM devices WHERE id IN (SELECT value FROM json_each($1))",
    open_commands: "SELECT device_id, id, kind, args FROM commands
            WHERE device_id IN (SELECT value FROM json_each($1)) AND state IN ('queued', 'delivered')
            ORDER BY created_at, id",
    mark_delivered: "UPDATE commands SET state = 'delivered', delivered_at = COALESCE(delivered_at, $1),
            deliveries = deliveries + 1 WHERE id IN (SELECT value FROM json_each($2))",
};

const POSTGRES_BATCH: BatchSql = BatchSql {
    store: "UPDATE devices SET last_heartbeat = $1, interval_s = v.interval_s, agent_version = v.agent_version,
            telemetry = v.telemetry
            FROM jsonb_to_recordset($2::text::jsonb) AS v(id text, interval_s bigint, agent_version text, telemetry text)
            WHERE devices.id = v.id AND devices.deregistered_at IS NULL RETURNING devices.id",
    existing: "SELECT id FROM devices WHERE id IN (SELECT jsonb_array_elements_text($1::text::jsonb))",
    open_commands: "SELECT device_id, id, kind, args FROM commands
            WHERE device_id IN (SELECT jsonb_array_elements_text($1::text::jsonb)) AND state IN ('queued', 'delivered')
            ORDER BY created_at, id",
    mark_delivered: "UPDATE commands SET state = 'delivered', delivered_at = COALESCE(delivered_at, $1),
            deliveries = deliveries + 1 WHERE id IN (SELECT jsonb_array_elements_text($2::text::jsonb))",
};

/// One row of the batch as the `store` statement reads it.
#[derive(serde::Serialize)]
struct StoredBeat<'a> {
    id: &'a str,
    interval_s: u32,
    agent_version: &'a str,
    telemetry: &'a str,
}

fn json_array<T: serde::Serialize>(items: &[T]) -> String {
    serde_json::to_string(items).expect("batch rows serialize")
}

/// Commits every beat of `batch` in one transaction and returns one outcome per beat, in order.
///
/// The statements are per batch, not per beat: one UPDATE stores every beat, one SELECT finds the
/// open commands of every device in the batch, one UPDATE marks them delivered. Acks (rare) are per
/// command.
async fn write_batch(
    db: &Db,
    batch: &[(Beat, Reply)],
    now: i64,
) -> Result<Vec<BeatOutcome>, sqlx::Error> {
    // A device that beat twice in one batch is stored once, from its latest beat.
    let mut latest: std::collections::BTreeMap<&str, &Beat> = std::collections::BTreeMap::new();
    for (beat, _) in batch {
        latest.insert(beat.device_id.as_str(), beat);
    }
    let beats: Vec<&Beat> = latest.into_values().collect();
    let rows: Vec<StoredBeat<'_>> = beats
        .iter()
        .map(|b| StoredBeat {
            id: &b.device_id,
            interval_s: b.interval_s,
            agent_version: &b.agent_version,
            telemetry: &b.telemetry_json,
        })
        .collect();
    let sql = match db {
        Db::Sqlite(_) => &SQLITE_BATCH,
        Db::Postgres(_) => &POSTGRES_BATCH,
    };
    let mut stored: HashSet<String> = HashSet::with_capacity(beats.len());
    let mut existing: HashSet<String> = HashSet::new();
    let mut deregistered_now: HashSet<String> = HashSet::new();
    let mut open: HashMap<String, Vec<DeviceCommand>> = HashMap::new();
    with_pool!(db, pool => {
        let mut tx = pool.begin().await?;
        // The write comes first so SQLite takes its write lock at once (no read-then-upgrade).
        stored.extend(
            sqlx::query_scalar::<_, String>(sql.store)
                .bind(now)
                .bind(json_array(&rows))
                .fetch_all(&mut *tx)
                .await?,
        );
        let missing: Vec<&str> = beats.iter().map(|b| b.device_id.as_str()).filter(|id| !stored.contains(*id)).collect();
        if !missing.is_empty() {
            existing.extend(
                sqlx::query_scalar::<_, String>(sql.existing)
                    .bind(json_array(&missing))
                    .fetch_all(&mut *tx)
                    .await?,
            );
        }
        for beat in beats.iter().filter(|b| stored.contains(&b.device_id)) {
            for ack in &beat.acks {
                let state = match ack.outcome {
                    CommandOutcome::Succeeded => "succeeded",
                    CommandOutcome::Failed => "failed",
                };
                let kind: Option<String> = sqlx::query_scalar(
                    "UPDATE commands SET state = $1, output = $2, completed_at = $3
                     WHERE id = $4 AND device_id = $5 AND state IN ('queued', 'delivered') RETURNING kind")
                    .bind(state)
                    .bind(kernex_protocol::truncate_utf8(&ack.output, MAX_COMMAND_OUTPUT))
                    .bind(now)
                    .bind(&ack.id)
                    .bind(&beat.device_id)
                    .fetch_optional(&mut *tx)
                    .await?;
                if kind.as_deref() == Some("deregister") && ack.outcome == CommandOutcome::Succeeded {
                    sqlx::query("UPDATE devices SET deregistered_at = $1 WHERE id = $2 AND deregistered_at IS NULL")
                        .bind(now)
                        .bind(&beat.device_id)
                        .execute(&mut *tx)
                        .await?;
                    deregistered_now.insert(beat.device_id.clone());
                }
            }
        }
        let live: Vec<&str> = stored.iter().map(String::as_str).filter(|id| !deregistered_now.contains(*id)).collect();
        let mut delivered: Vec<String> = Vec::new();
        if !live.is_empty() {
            let rows = sqlx::query_as::<_, (String, String, String, String)>(sql.open_commands)
                .bind(json_array(&live))
                .fetch_all(&mut *tx)
                .await?;
            for (device_id, id, kind, args) in rows {
                delivered.push(id.clone());
                let args = serde_json::from_str(&args).unwrap_or(serde_json::Value::Null);
                open.entry(device_id).or_default().push(DeviceCommand { id, kind, args });
            }
        }
        // Mark exactly what is sent: a command queued meanwhile stays `queued` for the next beat.
        if !delivered.is_empty() {
            sqlx::query(sql.mark_delivered)
                .bind(now)
                .bind(json_array(&delivered))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok::<_, sqlx::Error>(())
    })?;
    Ok(batch
        .iter()
        .map(|(beat, _)| {
            if deregistered_now.contains(&beat.device_id) {
                BeatOutcome::Deregistered
            } else if stored.contains(&beat.device_id) {
                BeatOutcome::Accepted {
                    commands: open.get(&beat.device_id).cloned().unwrap_or_default(),
                }
            } else if existing.contains(&beat.device_id) {
                BeatOutcome::Deregistered
            } else {
                BeatOutcome::UnknownDevice
            }
        })
        .collect())
}
