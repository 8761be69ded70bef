//! The SQLite heartbeat writer: one OS thread, one `rusqlite` connection, a batch per transaction
//! run as plain function calls with cached prepared statements.
//!
//! Two choices keep its cycle short, and the cycle is what bounds throughput (beats wait for the
//! commit they are part of):
//! - the whole batch is one hand-off in and one wake-up per beat out; no per-statement messages;
//! - checkpoints run on a second thread with its own connection (`wal_autocheckpoint` is off on the
//!   writer), so copying WAL pages into the database file and its fsync never sit inside a commit.

use super::{answer, latest_per_device, record, Beat, Committed, Queue, Reply, WriterConfig};
use super::{ACK_SQL, DEREGISTER_SQL, HEARTBEAT_ROW_SQL};
use crate::db::now_ms;
use crate::metrics::Metrics;
use anyhow::Context as _;
use kernex_protocol::wire::{CommandOutcome, DeviceCommand, MAX_COMMAND_OUTPUT};
use rusqlite::{params, Connection, OptionalExtension as _};
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Duration;

/// How often the checkpointer copies committed WAL frames into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// WAL frames (pages) past which the checkpointer makes the WAL start over: 4096 × 4 KiB = 16 MiB.
const WAL_RESTART_FRAMES: i64 = 4096;

/// Stores a beat unless its device is deregistered, which the small partial index of deregistered
/// devices answers without reading the device's row (`INDEXED BY` makes preparing the statement
/// fail, rather than the beat go slow, should the index ever stop serving).
const STORE: &str = "UPDATE device_heartbeats SET last_heartbeat = ?1, interval_s = ?2, agent_version = ?3,
        telemetry = ?4 WHERE device_id = ?5 AND NOT EXISTS (SELECT 1 FROM devices INDEXED BY devices_deregistered
        WHERE id = ?5 AND deregistered_at IS NOT NULL)";
/// For a beat that stored nothing: whether its device is deregistered (None: no such device).
const DEREGISTERED: &str = "SELECT deregistered_at IS NOT NULL FROM devices WHERE id = ?1";
const OPEN_COMMANDS: &str = "SELECT id, kind, args FROM commands
        WHERE device_id = ?1 AND state IN ('queued', 'delivered') ORDER BY created_at, id";
const MARK_DELIVERED: &str = "UPDATE commands SET state = 'delivered',
        delivered_at = COALESCE(delivered_at, ?1), deliveries = deliveries + 1 WHERE id = ?2";

pub(super) fn start(
    path: &Path,
    receiver: Queue,
    config: WriterConfig,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let writer = open(path, "-65536")?;
    // The page cache holds the heartbeat table (64 MiB at most, grown only as pages are touched)
    // so a beat of any of 100k devices finds its page in memory.
    writer
        .pragma_update(None, "wal_autocheckpoint", 0)
        .with_context(|| format!("configuring the heartbeat writer on {}", path.display()))?;
    let checkpointer = open(path, "-2000")?;
    let (stop_checkpoints, stopped) = std_mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("kx-checkpoint".into())
        .spawn(move || run_checkpoints(checkpointer, stopped))
        .context("starting the SQLite checkpoint thread")?;
    std::thread::Builder::new()
        .name("kx-heartbeats".into())
        .spawn(move || {
            run(
                writer,
                receiver,
                config.max_batch,
                stop_checkpoints,
                metrics,
            )
        })
        .context("starting the SQLite heartbeat writer thread")?;
    Ok(())
}

/// A connection with the pool's durability settings: WAL, `synchronous=FULL` (a beat is on disk
/// before it is answered), a busy timeout for the moments another connection writes.
fn open(path: &Path, cache_size: &str) -> anyhow::Result<Connection> {
    let context = || format!("opening {} for heartbeats", path.display());
    let conn = Connection::open(PathBuf::from(path)).with_context(context)?;
    conn.busy_timeout(Duration::from_secs(10))
        .with_context(context)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .with_context(context)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .with_context(context)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .with_context(context)?;
    conn.pragma_update(None, "cache_size", cache_size)
        .with_context(context)?;
    // A WAL that grew under a burst is cut back to this size when it starts over.
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)
        .with_context(context)?;
    conn.set_prepared_statement_cache_capacity(16);
    Ok(conn)
}

fn run(
    mut conn: Connection,
    mut receiver: Queue,
    max_batch: usize,
    _stop_checkpoints: std_mpsc::Sender<()>,
    metrics: Arc<Metrics>,
) {
    let mut batch = Vec::with_capacity(max_batch);
    // `blocking_recv` returns None once every sender is gone: the server is shutting down, and
    // dropping `_stop_checkpoints` ends the checkpointer too.
    while let Some(first) = receiver.blocking_recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match receiver.try_recv() {
                Ok(beat) => batch.push(beat),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        let committed = write_batch(&mut conn, &batch, now_ms()).map_err(|e| e.to_string());
        record(&metrics, batch.len(), started, committed.is_ok());
        answer(&mut batch, committed);
    }
}

fn run_checkpoints(conn: Connection, stopped: std_mpsc::Receiver<()>) {
    while let Err(std_mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(CHECKPOINT_EVERY) {
        if let Err(err) = checkpoint(&conn) {
            tracing::warn!(error = %err, "SQLite checkpoint failed");
        }
    }
}

/// PASSIVE never waits for the writer or readers: it copies what is committed and comes back
/// later for the rest. But the WAL only starts over from its beginning when a write transaction
/// begins after a checkpoint that copied everything, which a writer that never pauses does not
/// give it; so once the WAL is past [`WAL_RESTART_FRAMES`], a RESTART checkpoint holds the writer
/// back for the few frames committed since the PASSIVE one, and the WAL is reused from the start.
fn checkpoint(conn: &Connection) -> rusqlite::Result<()> {
    let frames: i64 = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| row.get(1))?;
    if frames > WAL_RESTART_FRAMES {
        conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()))?;
    }
    Ok(())
}

/// Commits every beat of `batch` in one transaction. `BEGIN IMMEDIATE` takes the write lock at
/// once, so the transaction never has to upgrade a read lock (and never fails halfway for it).
fn write_batch(
    conn: &mut Connection,
    batch: &[(Beat, Reply)],
    now: i64,
) -> rusqlite::Result<Committed> {
    let beats = latest_per_device(batch);
    let mut committed = Committed::default();
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let mut store = tx.prepare_cached(STORE)?;
        let mut deregistered = tx.prepare_cached(DEREGISTERED)?;
        for beat in &beats {
            let mut store_beat = || {
                store.execute(params![
                    now,
                    beat.interval_s,
                    beat.agent_version,
                    beat.telemetry_json,
                    beat.device_id
                ])
            };
            let mut changed = store_beat()?;
            if changed == 0 {
                let state: Option<bool> = deregistered
                    .query_row([&beat.device_id], |row| row.get(0))
                    .optional()?;
                match state {
                    Some(true) => {
                        committed
                            .not_stored_but_known
                            .insert(beat.device_id.clone());
                    }
                    Some(false) => {
                        tracing::warn!(device = %beat.device_id, "device had no heartbeat row; created");
                        tx.execute(HEARTBEAT_ROW_SQL, [&beat.device_id])?;
                        changed = store_beat()?;
                    }
                    None => {}
                }
            }
            if changed == 1 {
                committed.stored.insert(beat.device_id.clone());
            }
        }
        let mut ack = tx.prepare_cached(ACK_SQL)?;
        for beat in beats
            .iter()
            .filter(|b| committed.stored.contains(&b.device_id))
        {
            for a in &beat.acks {
                let kind: Option<String> = ack
                    .query_row(
                        params![
                            super::ack_state(a.outcome),
                            kernex_protocol::truncate_utf8(&a.output, MAX_COMMAND_OUTPUT),
                            now,
                            a.id,
                            beat.device_id
                        ],
                        |row| row.get(0),
                    )
                    .optional()?;
                if kind.as_deref() == Some("deregister") && a.outcome == CommandOutcome::Succeeded {
                    tx.execute(DEREGISTER_SQL, params![now, beat.device_id])?;
                    committed.deregistered_now.insert(beat.device_id.clone());
                }
            }
        }
        let mut open = tx.prepare_cached(OPEN_COMMANDS)?;
        let mut mark = tx.prepare_cached(MARK_DELIVERED)?;
        for beat in &beats {
            let id = &beat.device_id;
            if !committed.stored.contains(id) || committed.deregistered_now.contains(id) {
                continue;
            }
            let commands = open
                .query_map([id], |row| {
                    let args: String = row.get(2)?;
                    Ok(DeviceCommand {
                        id: row.get(0)?,
                        kind: row.get(1)?,
                        args: serde_json::from_str(&args).unwrap_or(serde_json::Value::Null),
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            // Mark exactly what is sent: a command queued meanwhile stays `queued` for the next beat.
            for command in &commands {
                mark.execute(params![now, command.id])?;
            }
            if !commands.is_empty() {
                committed.open.insert(id.clone(), commands);
            }
        }
    }
    tx.commit()?;
    Ok(committed)
}
