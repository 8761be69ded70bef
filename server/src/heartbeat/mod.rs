//! The heartbeat path: handlers hand each beat to a writer that commits many beats in one
//! transaction, so the cost of a durable commit (an fsync on SQLite) is shared by everything that
//! arrived while the previous commit was running. Under light load a batch is one beat, under
//! heavy load it grows by itself; the only wait is the spacing of commits under load (at most 3 ms on
//! SQLite, 1–2 ms on PostgreSQL).
//!
//! Each backend has its writer, behind the same queue:
//! - SQLite ([`sqlite`]): one OS thread that owns a `rusqlite` connection and runs a whole batch as
//!   plain function calls. sqlx's SQLite driver sends every statement and every returned row to its
//!   worker thread as a message; on a busy 2-core machine each of those hand-offs waits for a time
//!   slice, and a batch of ~100 beats spent more time being handed around than in SQLite.
//! - PostgreSQL ([`postgres`]): several sqlx tasks committing concurrently, each batch as a few
//!   fixed statements with the rows as one JSON parameter; under load they take from the queue at
//!   most every millisecond.
//!
//! When the queue is full the handler answers `503 overloaded` with `Retry-After` at once instead
//! of queueing without bound; agents back off and come back.
//!
//! On SQLite a beat is appended to `heartbeat_log` and folded into `device_heartbeats` later, in
//! bulk (see [`sqlite`]): what a device's row says of its liveness lags its beats by a few
//! seconds ([`FOLD_DELAY`] plus the fold). [`HeartbeatWriter::fold`] folds at once, for readers
//! that must see every beat (the REST device reads, the offline sweep). On PostgreSQL beats go
//! straight to `device_heartbeats` and a fold is a no-op.

mod postgres;
mod sqlite;

use crate::db::Db;
use crate::error::ApiError;
use crate::metrics::Metrics;
use kernex_protocol::wire::{CommandAck, CommandOutcome, DeviceCommand};
use rustc_hash::{FxHashMap, FxHashSet};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

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
type Queue = mpsc::Receiver<Job>;

/// Most time a stored beat waits in SQLite's `heartbeat_log` before it is folded into
/// `device_heartbeats` unless a reader asks for a fold: the most a device's liveness read from the
/// database without [`HeartbeatWriter::fold`] lags. The longer, the more beats of a device one
/// fold writes as one.
pub const FOLD_DELAY: std::time::Duration = std::time::Duration::from_secs(5);

/// What the writer is asked to do.
#[derive(Debug)]
enum Job {
    /// Store a beat and answer it once committed.
    Beat(Beat, Reply),
    /// Fold the beats stored so far into `device_heartbeats` (SQLite), then answer whether that
    /// worked.
    Fold(oneshot::Sender<bool>),
    /// Fold if the oldest beat not folded yet has waited [`FOLD_DELAY`] (sent by a timer, so an
    /// idle writer folds too).
    Tick,
}

/// Handle to the writer; cheap to clone.
#[derive(Debug, Clone)]
pub struct HeartbeatWriter {
    queue: mpsc::Sender<Job>,
    /// Whether beats wait in a log to be folded (SQLite); on PostgreSQL a fold has nothing to do.
    logs_beats: bool,
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
    /// Starts the backend's writer. Fails when the SQLite file cannot be opened for writing.
    pub fn start(
        db: &Db,
        config: WriterConfig,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<HeartbeatWriter> {
        let (queue, receiver) = mpsc::channel(config.queue_depth);
        match db {
            Db::Sqlite(pool) => sqlite::start(
                pool.connect_options().get_filename(),
                receiver,
                queue.downgrade(),
                config,
                metrics,
            )?,
            Db::Postgres(pool) => postgres::start(pool, receiver, config, metrics),
        }
        Ok(HeartbeatWriter {
            queue,
            logs_beats: matches!(db, Db::Sqlite(_)),
        })
    }

    /// Queues a beat and waits until it is committed.
    pub async fn submit(&self, beat: Beat) -> Result<BeatOutcome, ApiError> {
        let (reply, outcome) = oneshot::channel();
        self.queue
            .try_send(Job::Beat(beat, reply))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => ApiError::Overloaded { retry_after_s: 2 },
                mpsc::error::TrySendError::Closed(_) => {
                    ApiError::Internal(anyhow::anyhow!("heartbeat writer has stopped"))
                }
            })?;
        outcome
            .await
            .map_err(|_| ApiError::Internal(anyhow::anyhow!("heartbeat writer dropped a beat")))?
    }

    /// Waits until every beat answered before the call is in `device_heartbeats`, for readers
    /// that must see them all; false when that could not be done (the fold failed, and the writer
    /// logged why, or the writer has stopped), so what the table says may lag. Waits for room in
    /// the queue rather than failing when it is full. At once on PostgreSQL.
    pub async fn fold(&self) -> bool {
        if !self.logs_beats {
            return true;
        }
        let (done, folded) = oneshot::channel();
        if self.queue.send(Job::Fold(done)).await.is_err() {
            return false;
        }
        folded.await.unwrap_or(false)
    }
}

/// Splits what the writer took from the queue into beats and fold requests.
fn split_jobs(
    jobs: impl IntoIterator<Item = Job>,
    beats: &mut Vec<(Beat, Reply)>,
    folds: &mut Vec<oneshot::Sender<bool>>,
) {
    for job in jobs {
        match job {
            Job::Beat(beat, reply) => beats.push((beat, reply)),
            Job::Fold(done) => folds.push(done),
            Job::Tick => {}
        }
    }
}

/// Counts a batch's beats and the time its commit took.
fn record(metrics: &Metrics, beats: usize, started: std::time::Instant, ok: bool) {
    metrics.heartbeat_batch_committed(started.elapsed());
    if ok {
        metrics
            .heartbeats
            .fetch_add(beats as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What one committed batch did, per device; turned into one outcome per beat by [`answer`].
///
/// The writers' sets and maps of device ids hash with Fx rather than SipHash (a handful of lookups
/// per beat): device ids are the server's own UUIDs, taken from a token it signed, so nobody can
/// pick ids that collide.
#[derive(Debug, Default)]
struct Committed {
    /// Devices whose beat was stored.
    stored: FxHashSet<String>,
    /// Devices that exist but were not stored (deregistered before this batch).
    not_stored_but_known: FxHashSet<String>,
    /// Devices that acknowledged a `deregister` command in this batch.
    deregistered_now: FxHashSet<String>,
    /// Commands sent with the answer, per device.
    open: FxHashMap<String, Vec<DeviceCommand>>,
}

/// The beats of a batch to store: one per device, its latest (a device that beat twice while a
/// commit was running is stored once).
fn latest_per_device(batch: &[(Beat, Reply)]) -> Vec<&Beat> {
    let mut latest: BTreeMap<&str, &Beat> = BTreeMap::new();
    for (beat, _) in batch {
        latest.insert(beat.device_id.as_str(), beat);
    }
    latest.into_values().collect()
}

/// The state a command takes when a device acknowledges it.
fn ack_state(outcome: CommandOutcome) -> &'static str {
    match outcome {
        CommandOutcome::Succeeded => "succeeded",
        CommandOutcome::Failed => "failed",
    }
}

// The writers' statements. On SQLite the writer remembers which devices are live and which have no
// open command (`sqlite::Known`): a statement added here that deregisters a device, deletes a row
// or opens a command must make the writer forget, which the triggers of migration 0009 do for the
// ones below.

/// Closes an open command acknowledged by its device; returns its kind. The same text on both
/// backends (`$N` in order of first use, which SQLite binds positionally).
const ACK_SQL: &str = "UPDATE commands SET state = $1, output = $2, completed_at = $3
     WHERE id = $4 AND device_id = $5 AND state IN ('queued', 'delivered') RETURNING kind";

/// Creates the heartbeat row of a device that lacks one. Every insert of a device writes its row
/// (`db::devices::INSERT_HEARTBEAT_ROW`); should one ever be missed, the device's beats create it
/// instead of the device being taken for deregistered. The same text on both backends.
const HEARTBEAT_ROW_SQL: &str =
    "INSERT INTO device_heartbeats (device_id) VALUES ($1) ON CONFLICT (device_id) DO NOTHING";

/// Marks a device deregistered once it acknowledged the `deregister` command.
const DEREGISTER_SQL: &str =
    "UPDATE devices SET deregistered_at = $1 WHERE id = $2 AND deregistered_at IS NULL";

/// Answers every beat of the batch from what the commit did, or with 503 when it failed.
fn answer(batch: &mut Vec<(Beat, Reply)>, committed: Result<Committed, String>) {
    let committed = match committed {
        Ok(committed) => committed,
        Err(err) => {
            tracing::warn!(error = %err, beats = batch.len(), "committing heartbeats failed");
            for (_, reply) in batch.drain(..) {
                let _ = reply.send(Err(ApiError::DatabaseUnavailable { retry_after_s: 5 }));
            }
            return;
        }
    };
    for (beat, reply) in batch.drain(..) {
        let outcome = if committed.deregistered_now.contains(&beat.device_id) {
            BeatOutcome::Deregistered
        } else if committed.stored.contains(&beat.device_id) {
            BeatOutcome::Accepted {
                commands: committed
                    .open
                    .get(&beat.device_id)
                    .cloned()
                    .unwrap_or_default(),
            }
        } else if committed.not_stored_but_known.contains(&beat.device_id) {
            BeatOutcome::Deregistered
        } else {
            BeatOutcome::UnknownDevice
        };
        let _ = reply.send(Ok(outcome));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{commands, devices, tenants};
    use kernex_protocol::wire::CommandSpec;

    fn beat(device_id: &str, acks: Vec<CommandAck>) -> Beat {
        Beat {
            device_id: device_id.into(),
            agent_version: "test".into(),
            interval_s: 60,
            telemetry_json: r#"{"load1":0.5}"#.into(),
            acks,
        }
    }

    /// A fresh SQLite database with tenant `acme` and `count` pre-authorized devices; their ids.
    async fn with_devices(dir: &std::path::Path, count: u32) -> (Db, Vec<String>) {
        let db = Db::open(None, dir).await.unwrap();
        let tenant = tenants::create(&db, "acme").await.unwrap();
        let tokens = dir.join("tokens");
        crate::preauthorize::preauthorize(
            &db,
            &tenant,
            count,
            std::time::Duration::from_secs(60),
            &tokens,
        )
        .await
        .unwrap();
        let ids = std::fs::read_to_string(&tokens)
            .unwrap()
            .lines()
            .map(|l| l.split(' ').next().unwrap().to_owned())
            .collect();
        (db, ids)
    }

    fn ack(id: &str) -> CommandAck {
        CommandAck {
            id: id.into(),
            outcome: CommandOutcome::Succeeded,
            output: "done".into(),
        }
    }

    fn commands_of(outcome: BeatOutcome) -> Vec<String> {
        match outcome {
            BeatOutcome::Accepted { commands } => commands.into_iter().map(|c| c.kind).collect(),
            other => panic!("expected an accepted beat, got {other:?}"),
        }
    }

    /// The SQLite writer end to end: stored telemetry, unknown devices, commands delivered until
    /// acknowledged, deregistration by command, and a burst of concurrent beats in few batches.
    #[tokio::test]
    async fn sqlite_writer_stores_beats_and_delivers_commands() {
        let dir = tempfile::tempdir().unwrap();
        let (db, ids) = with_devices(dir.path(), 3).await;
        let (a, b, c) = (&ids[0], &ids[1], &ids[2]);
        let writer =
            HeartbeatWriter::start(&db, WriterConfig::default(), Arc::new(Metrics::new([])))
                .unwrap();

        assert_eq!(
            writer.submit(beat("no-such-device", vec![])).await.unwrap(),
            BeatOutcome::UnknownDevice
        );
        assert!(commands_of(writer.submit(beat(a, vec![])).await.unwrap()).is_empty());
        assert!(writer.fold().await);
        let stored = devices::by_id(&db, a).await.unwrap().unwrap();
        assert!(stored.last_heartbeat.is_some());
        assert_eq!(stored.telemetry.as_deref(), Some(r#"{"load1":0.5}"#));

        // Delivered with every beat until acknowledged; an ack closes it with its output.
        let ping = commands::queue(&db, a, &CommandSpec::Ping, "test")
            .await
            .unwrap();
        assert_eq!(
            commands_of(writer.submit(beat(a, vec![])).await.unwrap()),
            ["ping"]
        );
        assert_eq!(
            commands_of(writer.submit(beat(a, vec![])).await.unwrap()),
            ["ping"]
        );
        assert!(commands_of(writer.submit(beat(a, vec![ack(&ping.id)])).await.unwrap()).is_empty());
        let closed = commands::get(&db, a, &ping.id).await.unwrap().unwrap();
        assert_eq!((closed.state.as_str(), closed.deliveries), ("succeeded", 2));
        assert_eq!(closed.output.as_deref(), Some("done"));

        // More devices with open commands than the writer holds in memory (one, in tests): then
        // every beat asks for its device's.
        let ping_a = commands::queue(&db, a, &CommandSpec::Ping, "test")
            .await
            .unwrap();
        let ping_b = commands::queue(&db, b, &CommandSpec::Ping, "test")
            .await
            .unwrap();
        for (device, ping) in [(a, &ping_a), (b, &ping_b)] {
            assert_eq!(
                commands_of(writer.submit(beat(device, vec![])).await.unwrap()),
                ["ping"]
            );
            let acked = writer.submit(beat(device, vec![ack(&ping.id)]));
            assert!(commands_of(acked.await.unwrap()).is_empty());
        }

        // A burst: every beat answered, both devices stored.
        let burst: Vec<_> = (0..500)
            .map(|i| {
                let writer = writer.clone();
                let id = if i % 2 == 0 { a.clone() } else { b.clone() };
                tokio::spawn(async move { writer.submit(beat(&id, vec![])).await })
            })
            .collect();
        for handle in burst {
            assert!(commands_of(handle.await.unwrap().unwrap()).is_empty());
        }
        assert!(writer.fold().await);
        assert!(devices::by_id(&db, b)
            .await
            .unwrap()
            .unwrap()
            .last_heartbeat
            .is_some());

        // Deregistration takes effect when the device acknowledges it, and sticks.
        let deregister = commands::queue(&db, a, &CommandSpec::Deregister, "test")
            .await
            .unwrap();
        assert_eq!(
            commands_of(writer.submit(beat(a, vec![])).await.unwrap()),
            ["deregister"]
        );
        assert_eq!(
            writer
                .submit(beat(a, vec![ack(&deregister.id)]))
                .await
                .unwrap(),
            BeatOutcome::Deregistered
        );
        assert_eq!(
            writer.submit(beat(a, vec![])).await.unwrap(),
            BeatOutcome::Deregistered
        );
        assert!(commands_of(writer.submit(beat(b, vec![])).await.unwrap()).is_empty());

        // Deregistered through the API (another connection) after its beats were stored: the
        // writer, which knew it live, refuses its next beat.
        assert!(commands_of(writer.submit(beat(c, vec![])).await.unwrap()).is_empty());
        assert!(commands_of(writer.submit(beat(c, vec![])).await.unwrap()).is_empty());
        let tenant = devices::by_id(&db, c).await.unwrap().unwrap().tenant_id;
        assert!(devices::deregister(&db, &tenant, c).await.unwrap());
        assert_eq!(
            writer.submit(beat(c, vec![])).await.unwrap(),
            BeatOutcome::Deregistered
        );

        // A device whose heartbeat row went missing gets it back with its next beat, instead of
        // being taken for deregistered.
        crate::db::with_pool!(&db, pool => sqlx::query("DELETE FROM device_heartbeats WHERE device_id = $1")
            .bind(b).execute(pool).await.map(|_| ()))
        .unwrap();
        assert!(commands_of(writer.submit(beat(b, vec![])).await.unwrap()).is_empty());
        assert!(writer.fold().await);
        let healed = devices::by_id(&db, b).await.unwrap().unwrap();
        assert!(healed.last_heartbeat.is_some());
        assert_eq!(healed.telemetry.as_deref(), Some(r#"{"load1":0.5}"#));
    }

    /// On SQLite beats wait in `heartbeat_log` until folded: a fold leaves each device its latest
    /// beat and empties the log, and beats a stopped server logged and did not fold are folded
    /// when the next writer starts.
    #[tokio::test]
    async fn sqlite_log_is_folded_latest_beat_last_and_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (db, ids) = with_devices(dir.path(), 1).await;
        let id = ids[0].clone();
        let start = || {
            HeartbeatWriter::start(&db, WriterConfig::default(), Arc::new(Metrics::new([])))
                .unwrap()
        };
        let numbered = |n: u32| Beat {
            telemetry_json: format!(r#"{{"n":{n}}}"#),
            ..beat(&id, vec![])
        };
        let log_rows = || async {
            crate::db::with_pool!(&db, pool => sqlx::query_scalar::<_, i64>("SELECT count(*) FROM heartbeat_log")
                .fetch_one(pool).await)
            .unwrap()
        };
        let telemetry = || async {
            devices::by_id(&db, &id)
                .await
                .unwrap()
                .unwrap()
                .telemetry
                .unwrap()
        };

        let writer = start();
        for n in 1..=3 {
            assert!(commands_of(writer.submit(numbered(n)).await.unwrap()).is_empty());
        }
        assert!(writer.fold().await);
        assert_eq!(telemetry().await, r#"{"n":3}"#);
        // The folded rows leave the log right after the fold is answered.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while log_rows().await > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the log was not emptied"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        // A row number is never reused, even by an empty log: deleting up to a fold's newest row
        // cannot take a beat logged after it.
        assert!(commands_of(writer.submit(numbered(6)).await.unwrap()).is_empty());
        let newest = crate::db::with_pool!(&db, pool => sqlx::query_scalar::<_, i64>(
            "SELECT max(seq) FROM heartbeat_log").fetch_one(pool).await)
        .unwrap();
        assert_eq!(newest, 4);

        // As a server that stopped before folding leaves them.
        crate::db::with_pool!(&db, pool => sqlx::query(
            "INSERT INTO heartbeat_log (device_id, at, interval_s, agent_version, telemetry)
             VALUES ($1, 1, 60, 'test', '{\"n\":4}'), ($1, 2, 60, 'test', '{\"n\":5}')")
            .bind(&id).execute(pool).await.map(|_| ()))
        .unwrap();
        let _restarted = start();
        assert_eq!(telemetry().await, r#"{"n":5}"#);
        assert_eq!(log_rows().await, 0);
    }

    /// The offline sweep folds before it announces anything: a device whose latest beat is still
    /// in the log is not taken for offline, and what the sweep acts on is the folded row.
    #[tokio::test]
    async fn the_sweep_folds_before_announcing_a_device_offline() {
        let dir = tempfile::tempdir().unwrap();
        let (db, ids) = with_devices(dir.path(), 1).await;
        let id = ids[0].clone();
        let writer =
            HeartbeatWriter::start(&db, WriterConfig::default(), Arc::new(Metrics::new([])))
                .unwrap();
        // As folded before this beat: silent for ten seconds, at a one-second interval.
        let set_stale = || async {
            crate::db::with_pool!(&db, pool => sqlx::query(
                "UPDATE device_heartbeats SET last_heartbeat = $1, interval_s = 1 WHERE device_id = $2")
                .bind(crate::db::now_ms() - 10_000).bind(&id).execute(pool).await.map(|_| ()))
            .unwrap();
        };
        let one_second = Beat {
            interval_s: 1,
            ..beat(&id, vec![])
        };
        assert!(commands_of(writer.submit(one_second).await.unwrap()).is_empty());
        set_stale().await;
        let swept = crate::db::webhooks::sweep_devices(&db, 3, writer.fold()).await;
        assert_eq!(swept.unwrap(), (0, 0));

        // A pass whose fold failed announces nothing; what it would act on is the folded row.
        set_stale().await;
        let swept = crate::db::webhooks::sweep_devices(&db, 3, async { false }).await;
        assert_eq!(swept.unwrap(), (0, 0));
        let swept = crate::db::webhooks::sweep_devices(&db, 3, async { true }).await;
        assert_eq!(swept.unwrap(), (1, 0));
    }
}
