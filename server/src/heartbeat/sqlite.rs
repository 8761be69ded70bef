//! The SQLite heartbeat writer: one OS thread, one `rusqlite` connection, a batch per transaction
//! run as plain function calls with cached prepared statements.
//!
//! The cycle of that thread bounds throughput (beats wait for the commit they are part of), so:
//! - a beat is appended to `heartbeat_log`, not written into its device's `device_heartbeats`
//!   row. Devices beat in no order, so a batch of updated rows dirtied one page per beat, each
//!   written whole to the WAL and later copied by the checkpoint; appended rows share pages (a
//!   batch of 50 beats fills 4). A fold ([`Folder`]) writes each device's latest beat, kept in
//!   memory, into `device_heartbeats` once the oldest has waited [`FOLD_DELAY`](super::FOLD_DELAY)
//!   (or when asked), in device order and in steps of [`FOLD_STEP`] devices between batches: every page it touches is written
//!   once for all the beats it carries, and no commit a beat waits for includes it;
//! - the whole batch is one hand-off in; the answers go out as one hand-off to a task on the
//!   runtime, which wakes the handlers from there (waking each from this thread cost a cross-thread
//!   wake-up per beat);
//! - what the writer learns of a device (it has a heartbeat row and is not deregistered; it has no
//!   open command) is kept in memory ([`Known`]) until a change that could make it wrong, which
//!   triggers count (migration 0009): a beat of a known device is appended without the two index
//!   probes and the command query it would otherwise cost;
//! - under load, commits start at most every [`COMMIT_EVERY`]: a beat that arrives sooner after
//!   the last commit started waits for the rest of that moment's beats, instead of paying a whole
//!   commit (an fsync, the wake-ups around it) for itself and a few others. Without it, the answers
//!   of a large batch set off a wave of beats whose first few got commits of their own: 800–1,800
//!   commits/s at 256 connections instead of ~250, and ~8 % fewer beats/s on two cores. A beat
//!   after a quiet moment is committed at once;
//! - checkpoints run on a second thread with its own connection (`wal_autocheckpoint` is off on the
//!   writer), so copying WAL pages into the database file and its fsync never sit inside a commit.

use super::{answer, latest_per_device, record, split_jobs, Beat, Committed, Job, Queue, Reply};
use super::{WriterConfig, ACK_SQL, DEREGISTER_SQL, FOLD_DELAY, HEARTBEAT_ROW_SQL};
use crate::db::now_ms;
use crate::metrics::Metrics;
use anyhow::Context as _;
use kernex_protocol::wire::{CommandOutcome, DeviceCommand, MAX_COMMAND_OUTPUT};
use rusqlite::{params, Connection, OptionalExtension as _};
use rustc_hash::{FxHashMap, FxHashSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// How often the checkpointer copies committed WAL frames into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// WAL frames (pages) past which the checkpointer makes the WAL start over: 4096 × 4 KiB = 16 MiB.
const WAL_RESTART_FRAMES: i64 = 4096;
/// Devices with unfolded beats past which a fold starts without waiting for [`FOLD_DELAY`] (their
/// beats are held in memory until folded: about 30 MiB at most).
const FOLD_MAX_DEVICES: usize = 65_536;
/// Beats logged past which a fold starts without waiting for [`FOLD_DELAY`]: the log's pages pass
/// through the writer's page cache, so this bounds what they take of it (about 24 MiB).
const FOLD_MAX_ROWS: usize = 65_536;
/// Log rows deleted per transaction once a fold has written its beats.
const TRIM_STEP: usize = 8_192;
/// Devices folded per transaction: a fold is done in steps between batches of beats, so beats
/// never wait for a whole fold (one step is a few milliseconds).
const FOLD_STEP: usize = 2_048;
/// Least time between the starts of two commits of beats (see the module's doc): at most 3 ms
/// more for a beat to wait, and no cap on throughput (a commit carries up to `max_batch` beats).
/// 1, 1.5, 2, 3, 5 and 8 ms were compared side by side at 10k devices and 256 connections; 3 ms
/// did the most beats/s with the lowest p99.
const COMMIT_EVERY: Duration = Duration::from_millis(3);
/// Devices with open commands held in memory at most (re-read whenever a command is queued); with
/// more (a command queued to a whole large fleet), every beat asks the database for its device's
/// commands.
const WITH_COMMANDS_HELD: usize = if cfg!(test) { 1 } else { 4_096 };
/// Devices known to be live held in memory at most (about 100 bytes each, so about 26 MiB); past
/// it, the set starts over.
const LIVE_HELD: usize = 1 << 18;

/// A committed batch and what the commit did, on its way to the task that answers its beats.
type Answers = mpsc::UnboundedSender<(Vec<(Beat, Reply)>, Result<Committed, String>)>;

/// Logs a beat of a device with a heartbeat row, unless the device is deregistered, which the small
/// partial index of deregistered devices answers without reading the device's row (`INDEXED BY`
/// makes preparing the statement fail, rather than the beat go slow, should the index ever stop
/// serving).
const STORE: &str =
    "INSERT INTO heartbeat_log (device_id, at, interval_s, agent_version, telemetry)
        SELECT ?5, ?1, ?2, ?3, ?4
        WHERE EXISTS (SELECT 1 FROM device_heartbeats WHERE device_id = ?5)
          AND NOT EXISTS (SELECT 1 FROM devices INDEXED BY devices_deregistered
                          WHERE id = ?5 AND deregistered_at IS NOT NULL)";
/// Logs a beat of a device known to be live ([`Known::live`]).
const APPEND: &str =
    "INSERT INTO heartbeat_log (device_id, at, interval_s, agent_version, telemetry)
        VALUES (?5, ?1, ?2, ?3, ?4)";
/// The devices with open commands, one more than [`WITH_COMMANDS_HELD`] at most (from the small
/// partial index of open commands).
const WITH_COMMANDS: &str = "SELECT DISTINCT device_id FROM commands INDEXED BY commands_open
        WHERE state IN ('queued', 'delivered') LIMIT ?1";
/// Folds what a stopped server logged and did not fold: each device's latest logged beat.
const FOLD_LEFT_OVER: &str =
    "UPDATE device_heartbeats SET last_heartbeat = l.at, interval_s = l.interval_s,
          agent_version = l.agent_version, telemetry = l.telemetry
        FROM (SELECT device_id, at, interval_s, agent_version, telemetry FROM heartbeat_log
              WHERE seq IN (SELECT max(seq) FROM heartbeat_log GROUP BY device_id)) AS l
        WHERE device_heartbeats.device_id = l.device_id";
/// Folds one device's latest beat. An update only: a beat is logged only for a device with a row.
const FOLD_BEAT: &str = "UPDATE device_heartbeats SET last_heartbeat = ?1, interval_s = ?2,
        agent_version = ?3, telemetry = ?4 WHERE device_id = ?5";
/// For a beat that stored nothing: whether its device is deregistered (None: no such device).
const DEREGISTERED: &str = "SELECT deregistered_at IS NOT NULL FROM devices WHERE id = ?1";
const OPEN_COMMANDS: &str = "SELECT id, kind, args FROM commands
        WHERE device_id = ?1 AND state IN ('queued', 'delivered') ORDER BY created_at, id";
const MARK_DELIVERED: &str = "UPDATE commands SET state = 'delivered',
        delivered_at = COALESCE(delivered_at, ?1), deliveries = deliveries + 1 WHERE id = ?2";

/// Starts the writer, its checkpointer, the task that answers its beats and the timer that makes
/// an idle writer fold. Beats a previous run logged and did not fold are folded first.
pub(super) fn start(
    path: &Path,
    receiver: Queue,
    queue: mpsc::WeakSender<Job>,
    config: WriterConfig,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let mut writer = open(path, "-65536")?;
    // The page cache holds the heartbeat table (64 MiB at most, grown only as pages are touched)
    // so a beat of any of 100k devices finds its page in memory.
    writer
        .pragma_update(None, "wal_autocheckpoint", 0)
        .with_context(|| format!("configuring the heartbeat writer on {}", path.display()))?;
    fold_left_over(&mut writer).with_context(|| {
        format!(
            "folding the heartbeat log left by the last run into {}",
            path.display()
        )
    })?;
    let checkpointer = open(path, "-2000")?;
    let (stop_checkpoints, stopped) = std_mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("kx-checkpoint".into())
        .spawn(move || run_checkpoints(checkpointer, stopped))
        .context("starting the SQLite checkpoint thread")?;
    let (answers, mut answered) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((mut batch, committed)) = answered.recv().await {
            answer(&mut batch, committed);
        }
    });
    // Holds the queue only while it ticks: once every handle is gone, the writer sees the queue
    // closed and stops.
    tokio::spawn(async move {
        let mut every = tokio::time::interval(FOLD_DELAY / 4);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            every.tick().await;
            match queue.upgrade() {
                Some(queue) => {
                    let _ = queue.try_send(Job::Tick);
                }
                None => break,
            }
        }
    });
    std::thread::Builder::new()
        .name("kx-heartbeats".into())
        .spawn(move || {
            run(
                writer,
                receiver,
                config.max_batch,
                answers,
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
    answers: Answers,
    _stop_checkpoints: std_mpsc::Sender<()>,
    metrics: Arc<Metrics>,
) {
    let mut jobs = Vec::with_capacity(max_batch);
    let mut batch = Vec::with_capacity(max_batch);
    let mut folder = Folder::default();
    let mut known = Known::default();
    let mut last_commit: Option<Instant> = None;
    loop {
        // While a fold is under way or asked for, it is the work to do when no beat is waiting. The
        // queue closes once every sender is gone: the server is shutting down, and dropping
        // `_stop_checkpoints` ends the checkpointer too.
        let first = if folder.round.is_some() || !folder.waiting.is_empty() {
            match receiver.try_recv() {
                Ok(job) => Some(job),
                Err(mpsc::error::TryRecvError::Empty) => None,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            }
        } else {
            match receiver.blocking_recv() {
                Some(job) => Some(job),
                None => break,
            }
        };
        if let Some(first) = first {
            jobs.push(first);
            // A fold under way fills the moment instead, one step between batches.
            if folder.round.is_none() {
                if let Some(wait) =
                    last_commit.and_then(|at| COMMIT_EVERY.checked_sub(at.elapsed()))
                {
                    std::thread::sleep(wait);
                }
            }
            take_waiting(&mut receiver, &mut jobs, max_batch);
            split_jobs(jobs.drain(..), &mut batch, &mut folder.waiting);
        }
        if !batch.is_empty() {
            let started = Instant::now();
            last_commit = Some(started);
            let now = now_ms();
            let committed = write_batch(&mut conn, &batch, now, &mut known).map_err(|e| {
                // What the rolled-back transaction taught it may not hold.
                known = Known::default();
                e.to_string()
            });
            record(&metrics, batch.len(), started, committed.is_ok());
            if let Ok(committed) = &committed {
                folder.logged(&mut batch, committed, now, conn.last_insert_rowid());
            }
            let full = std::mem::replace(&mut batch, Vec::with_capacity(max_batch));
            if let Err(mpsc::error::SendError((mut batch, committed))) =
                answers.send((full, committed))
            {
                answer(&mut batch, committed); // the runtime is shutting down
            }
        }
        folder.step(&mut conn);
    }
    while folder.round.is_some() || !folder.unfolded.is_empty() {
        folder.waiting.clear();
        if !folder.step_now(&mut conn) {
            break; // failed and logged; the next start folds the log
        }
    }
}

/// A beat logged and not folded yet: what its device's `device_heartbeats` row is to say.
#[derive(Debug)]
struct Logged {
    at: i64,
    interval_s: u32,
    agent_version: String,
    telemetry: String,
}

/// The beats logged and not folded yet (each device's latest), and the fold under way.
#[derive(Debug, Default)]
struct Folder {
    /// Each device's latest; a fold sorts them by device, the order it writes them in, so
    /// neighbouring devices share pages (a map kept in that order cost a dozen string comparisons
    /// on cold memory per beat at 10k devices).
    unfolded: FxHashMap<String, Logged>,
    /// The newest log row among `unfolded`.
    unfolded_upto: i64,
    /// When the oldest of `unfolded` was logged.
    oldest: Option<Instant>,
    /// Beats logged since the last fold started.
    logged_rows: usize,
    /// Fold requests for the next round.
    waiting: Vec<oneshot::Sender<bool>>,
    round: Option<Round>,
}

/// A fold under way: the beats it took, folded [`FOLD_STEP`] devices per transaction, then the log
/// rows they came from deleted [`TRIM_STEP`] rows per transaction.
#[derive(Debug)]
struct Round {
    beats: std::vec::IntoIter<(String, Logged)>,
    /// The log holds nothing newer than this row for these beats: the rows to delete.
    upto: i64,
    /// Fold requests answered when the round is done.
    done: Vec<oneshot::Sender<bool>>,
}

/// What the writer knows of devices from its own statements, as long as nothing that could make it
/// wrong has happened since: a device deregistered or deleted, a heartbeat row deleted, a command
/// queued or reopened. Triggers count those in `heartbeat_writer_epoch` (migration 0009), whoever
/// makes them, the writer included; the count is read inside the writer's transaction, which
/// holds the write lock, so nothing can change between the check and the beats it serves.
#[derive(Debug, Default)]
struct Known {
    /// The epoch this holds for; None: nothing known yet.
    epoch: Option<i64>,
    /// Devices whose beats were stored: they have a heartbeat row and are not deregistered.
    live: FxHashSet<String>,
    /// Devices that may have open commands (every one that has some is in it); None when there
    /// are more than [`WITH_COMMANDS_HELD`], and every beat asks.
    with_commands: Option<FxHashSet<String>>,
}

impl Known {
    /// Forgets everything if the epoch moved since the last call.
    fn refresh(&mut self, tx: &rusqlite::Transaction) -> rusqlite::Result<()> {
        let epoch: i64 = tx
            .prepare_cached("SELECT n FROM heartbeat_writer_epoch")?
            .query_row([], |row| row.get(0))?;
        if self.epoch == Some(epoch) && self.live.len() < LIVE_HELD {
            return Ok(());
        }
        // Not `clear`: a full set would keep its memory.
        self.live = FxHashSet::default();
        let mut with_commands = FxHashSet::default();
        let mut query = tx.prepare_cached(WITH_COMMANDS)?;
        let mut rows = query.query([WITH_COMMANDS_HELD + 1])?;
        while let Some(row) = rows.next()? {
            with_commands.insert(row.get(0)?);
        }
        self.with_commands = (with_commands.len() <= WITH_COMMANDS_HELD).then_some(with_commands);
        self.epoch = Some(epoch);
        Ok(())
    }

    /// Whether the device may have open commands.
    fn may_have_commands(&self, device: &str) -> bool {
        self.with_commands
            .as_ref()
            .is_none_or(|devices| devices.contains(device))
    }
}

impl Folder {
    /// Notes the beats of a committed batch (`newest_row`: the last row it logged). Their agent
    /// version and telemetry move here: answering a beat needs neither.
    fn logged(
        &mut self,
        batch: &mut [(Beat, Reply)],
        committed: &Committed,
        at: i64,
        newest_row: i64,
    ) {
        if committed.stored.is_empty() {
            return;
        }
        // In arrival order, so a device's latest beat of the batch is the one that stays.
        for (beat, _) in batch.iter_mut() {
            if !committed.stored.contains(&beat.device_id) {
                continue;
            }
            let logged = Logged {
                at,
                interval_s: beat.interval_s,
                agent_version: std::mem::take(&mut beat.agent_version),
                telemetry: std::mem::take(&mut beat.telemetry_json),
            };
            match self.unfolded.get_mut(&beat.device_id) {
                Some(unfolded) => *unfolded = logged,
                None => {
                    self.unfolded.insert(beat.device_id.clone(), logged);
                }
            }
        }
        self.unfolded_upto = newest_row;
        self.logged_rows += committed.stored.len();
        self.oldest.get_or_insert_with(Instant::now);
    }

    /// Starts a round when one is due or asked for, and takes one step of the round under way.
    fn step(&mut self, conn: &mut Connection) {
        if self.round.is_none() {
            let due = self.unfolded.len() >= FOLD_MAX_DEVICES
                || self.logged_rows >= FOLD_MAX_ROWS
                || self.oldest.is_some_and(|t| t.elapsed() >= FOLD_DELAY)
                || !self.waiting.is_empty();
            if !due {
                return;
            }
        }
        self.step_now(conn);
    }

    /// One step, starting a round if none is under way; false if the step failed.
    fn step_now(&mut self, conn: &mut Connection) -> bool {
        let round = match &mut self.round {
            Some(round) => round,
            None if self.unfolded.is_empty() => {
                for done in self.waiting.drain(..) {
                    let _ = done.send(true);
                }
                return true;
            }
            None => {
                self.oldest = None;
                self.logged_rows = 0;
                let mut beats: Vec<(String, Logged)> =
                    std::mem::take(&mut self.unfolded).into_iter().collect();
                beats.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                self.round.insert(Round {
                    beats: beats.into_iter(),
                    upto: self.unfolded_upto,
                    done: std::mem::take(&mut self.waiting),
                })
            }
        };
        if round.beats.len() == 0 {
            // Folded: the rows go. A failed delete leaves them to the next round's, which covers
            // them too.
            return match trim_step(conn, round.upto) {
                Ok(rows) => {
                    if rows < TRIM_STEP {
                        self.round = None;
                    }
                    true
                }
                Err(err) => {
                    tracing::warn!(error = %err, "deleting folded heartbeats from the log failed");
                    self.round = None;
                    false
                }
            };
        }
        let step: Vec<(String, Logged)> = round.beats.by_ref().take(FOLD_STEP).collect();
        if let Err(err) = fold_step(conn, &step) {
            tracing::warn!(error = %err, "folding heartbeats failed; they stay in the log and are tried again");
            // Back with the beats logged since, which are newer.
            let round = self.round.take().expect("a round is under way");
            for (device, beat) in step.into_iter().chain(round.beats) {
                self.unfolded.entry(device).or_insert(beat);
            }
            self.oldest = Some(Instant::now());
            for done in round.done {
                let _ = done.send(false);
            }
            return false;
        }
        if round.beats.len() == 0 {
            for done in round.done.drain(..) {
                let _ = done.send(true);
            }
        }
        true
    }
}

/// Adds what is waiting in the queue to `jobs`, up to `max` jobs.
fn take_waiting(receiver: &mut Queue, jobs: &mut Vec<Job>, max: usize) {
    while jobs.len() < max {
        match receiver.try_recv() {
            Ok(job) => jobs.push(job),
            Err(_) => break,
        }
    }
}

/// Writes a step of a fold into `device_heartbeats`.
fn fold_step(conn: &mut Connection, beats: &[(String, Logged)]) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let mut fold = tx.prepare_cached(FOLD_BEAT)?;
        for (device, beat) in beats {
            fold.execute(params![
                beat.at,
                beat.interval_s,
                beat.agent_version,
                beat.telemetry,
                device
            ])?;
        }
    }
    tx.commit()
}

/// Deletes up to [`TRIM_STEP`] of the oldest log rows up to `upto`; how many it deleted.
fn trim_step(conn: &mut Connection, upto: i64) -> rusqlite::Result<usize> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let rows = tx
        .prepare_cached(
            "DELETE FROM heartbeat_log WHERE seq IN
               (SELECT seq FROM heartbeat_log WHERE seq <= ?1 ORDER BY seq LIMIT ?2)",
        )?
        .execute(params![upto, TRIM_STEP])?;
    tx.commit()?;
    Ok(rows)
}

/// Folds the log a stopped server left, in one transaction, and empties it.
fn fold_left_over(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute(FOLD_LEFT_OVER, [])?;
    tx.execute("DELETE FROM heartbeat_log", [])?;
    tx.commit()
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
    known: &mut Known,
) -> rusqlite::Result<Committed> {
    let beats = latest_per_device(batch);
    let mut committed = Committed::default();
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    known.refresh(&tx)?;
    {
        let mut append = tx.prepare_cached(APPEND)?;
        let mut store = tx.prepare_cached(STORE)?;
        let mut deregistered = tx.prepare_cached(DEREGISTERED)?;
        for beat in &beats {
            let values = params![
                now,
                beat.interval_s,
                beat.agent_version,
                beat.telemetry_json,
                beat.device_id
            ];
            if known.live.contains(&beat.device_id) {
                append.execute(values)?;
                committed.stored.insert(beat.device_id.clone());
                continue;
            }
            let mut changed = store.execute(values)?;
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
                        changed = store.execute(values)?;
                    }
                    None => {}
                }
            }
            if changed == 1 {
                committed.stored.insert(beat.device_id.clone());
                known.live.insert(beat.device_id.clone());
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
                    known.live.remove(&beat.device_id);
                }
            }
        }
        let mut open = tx.prepare_cached(OPEN_COMMANDS)?;
        let mut mark = tx.prepare_cached(MARK_DELIVERED)?;
        for beat in &beats {
            let id = &beat.device_id;
            if !committed.stored.contains(id)
                || committed.deregistered_now.contains(id)
                || !known.may_have_commands(id)
            {
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
            if commands.is_empty() {
                // Acknowledged in this batch, or delivered and closed by an earlier one.
                if let Some(devices) = &mut known.with_commands {
                    devices.remove(id);
                }
            } else {
                committed.open.insert(id.clone(), commands);
            }
        }
    }
    tx.commit()?;
    Ok(committed)
}
