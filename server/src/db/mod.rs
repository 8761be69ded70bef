//! Storage: one enum over the two backends, one set of SQL that both accept.
//!
//! Every query is written once in the common dialect (`$N` placeholders, `BIGINT` unix-millisecond
//! times, `TEXT` ids, `RETURNING`, `ON CONFLICT`) and run through [`with_pool!`], which compiles it
//! against each backend's native driver. Backend-specific code is the exception and lives next to
//! its portable twin.

pub mod audit;
pub mod bundles;
pub mod commands;
pub mod deployments;
pub mod devices;
pub mod secrets;
pub mod tenants;
pub mod tokens;
pub mod users;
pub mod webhooks;

use anyhow::Context as _;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

/// Why [`Db::readiness`] says no.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    #[error("the database does not answer: {0}")]
    Unreachable(String),
    #[error("the database schema is at migration {applied}, this server needs {needed}")]
    SchemaBehind { applied: i64, needed: i64 },
}

/// A connection pool to whichever backend the operator chose.
#[derive(Debug, Clone)]
pub enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs `$body` with `$pool` bound to the backend's native pool; `$body` is compiled once per backend.
#[macro_export]
macro_rules! with_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::db::Db::Sqlite($pool) => $body,
            $crate::db::Db::Postgres($pool) => $body,
        }
    };
}
pub use with_pool;

/// Name of the SQLite file inside the data directory.
pub const SQLITE_FILE: &str = "kernex.db";

impl Db {
    /// Opens `database` (a `postgres://` URL) or, when absent, the SQLite file in `data_dir`, and runs
    /// pending migrations.
    pub async fn open(database: Option<&str>, data_dir: &Path) -> anyhow::Result<Db> {
        let db = match database {
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                let options = PgConnectOptions::from_str(url)
                    .with_context(|| format!("parsing --database URL {}", redact_url(url)))?;
                let pool = PgPoolOptions::new()
                    .max_connections(16)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect_with(options)
                    .await
                    .with_context(|| format!("connecting to PostgreSQL at {}", redact_url(url)))?;
                Db::Postgres(pool)
            }
            Some(url) if url.starts_with("sqlite:") => {
                let options = SqliteConnectOptions::from_str(url)
                    .with_context(|| format!("parsing --database URL {url}"))?;
                Db::Sqlite(
                    open_sqlite(options)
                        .await
                        .with_context(|| format!("opening {url}"))?,
                )
            }
            Some(url) => anyhow::bail!(
                "--database {}: unsupported URL scheme (use postgres://... or sqlite:PATH)",
                redact_url(url)
            ),
            None => {
                std::fs::create_dir_all(data_dir)
                    .with_context(|| format!("creating data directory {}", data_dir.display()))?;
                let file = data_dir.join(SQLITE_FILE);
                let options = SqliteConnectOptions::new().filename(&file);
                Db::Sqlite(
                    open_sqlite(options)
                        .await
                        .with_context(|| format!("opening SQLite database {}", file.display()))?,
                )
            }
        };
        db.migrate().await?;
        Ok(db)
    }

    fn migrator(&self) -> sqlx::migrate::Migrator {
        migrator(matches!(self, Db::Postgres(_)))
    }

    async fn migrate(&self) -> anyhow::Result<()> {
        let migrator = self.migrator();
        with_pool!(self, pool => migrator.run(pool).await).context("running database migrations")
    }

    /// Whether this server can serve: the database answers, and its schema has every migration
    /// this binary carries (another replica may be mid-upgrade, or someone restored an old dump).
    pub async fn readiness(&self) -> Result<(), NotReady> {
        let needed = latest_migration(matches!(self, Db::Postgres(_)));
        let applied: Option<i64> = with_pool!(self, pool => sqlx::query_scalar(
            "SELECT MAX(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(pool)
            .await)
        .map_err(|e| NotReady::Unreachable(e.to_string()))?;
        match applied.unwrap_or(0) {
            applied if applied < needed => Err(NotReady::SchemaBehind { applied, needed }),
            _ => Ok(()),
        }
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Db::Sqlite(_) => "sqlite",
            Db::Postgres(_) => "postgres",
        }
    }

    pub async fn close(&self) {
        with_pool!(self, pool => pool.close().await)
    }
}

fn migrator(postgres: bool) -> sqlx::migrate::Migrator {
    if postgres {
        sqlx::migrate!("migrations/postgres")
    } else {
        sqlx::migrate!("migrations/sqlite")
    }
}

/// The newest migration this binary carries for the backend: the schema version it needs.
pub fn latest_migration(postgres: bool) -> i64 {
    migrator(postgres)
        .iter()
        .map(|m| m.version)
        .max()
        .unwrap_or(0)
}

async fn open_sqlite(options: SqliteConnectOptions) -> Result<SqlitePool, sqlx::Error> {
    // WAL: readers never block the writer. FULL: a heartbeat is on disk before it is answered;
    // the heartbeat writer batches commits so the fsync cost is shared.
    let options = options
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true);
    SqlitePoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`, for error messages and logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{}:***{}", &url[..scheme_end + 3], user, &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Milliseconds since the Unix epoch: the one time representation in the database.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// RFC 3339 (UTC) for a stored millisecond time.
pub fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// A fresh random id (UUID v4, hyphenated).
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A transaction that will write after reading. On SQLite it starts with `BEGIN IMMEDIATE`: a
/// deferred transaction that read first and then writes fails at once with "database is locked"
/// when another connection wrote meanwhile (the busy timeout cannot help a read lock that must
/// be upgraded); taking the write lock up front makes it wait its turn instead.
pub trait BeginWrite {
    type Database: sqlx::Database;
    #[allow(async_fn_in_trait)]
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, Self::Database>, sqlx::Error>;
}

impl BeginWrite for SqlitePool {
    type Database = sqlx::Sqlite;
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
        self.begin_with("BEGIN IMMEDIATE").await
    }
}

impl BeginWrite for PgPool {
    type Database = sqlx::Postgres;
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
        self.begin().await
    }
}

/// True when `err` is a unique-constraint violation (a concurrent insert won).
pub fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("postgres://kx:pw@localhost/db"),
            "postgres://kx:***@localhost/db"
        );
        assert_eq!(
            redact_url("postgres://localhost/db"),
            "postgres://localhost/db"
        );
    }

    /// Migration 0007 moves each device's liveness to `device_heartbeats` without losing any, and
    /// the devices read back as before.
    #[tokio::test]
    async fn heartbeats_move_to_their_own_table_with_their_data() {
        let dir = tempfile::tempdir().unwrap();
        let pool = open_sqlite(SqliteConnectOptions::new().filename(dir.path().join(SQLITE_FILE)))
            .await
            .unwrap();
        let all = migrator(false);
        let mut before = migrator(false);
        before.migrations = all
            .iter()
            .filter(|m| m.version < 7)
            .cloned()
            .collect::<Vec<_>>()
            .into();
        before.run(&pool).await.unwrap();
        sqlx::raw_sql(
            "INSERT INTO tenants (id, name, created_at) VALUES ('t', 'acme', 1);
             INSERT INTO devices (id, tenant_id, hardware_id, key_fingerprint, public_key, enrolled_at,
                 last_heartbeat, interval_s, agent_version, telemetry, offline_since)
             VALUES ('beating', 't', 'hw1', 'fp1', 'pem', 1, 5000, 60, '0.1.0', '{\"load1\":0.5}', NULL),
                    ('gone', 't', 'hw2', 'fp2', 'pem', 1, 4000, 30, '0.0.9', '{}', 4500),
                    ('new', 't', 'hw3', 'fp3', 'pem', 1, NULL, NULL, NULL, NULL, NULL);
             UPDATE devices SET deregistered_at = 6000 WHERE id = 'gone';",
        )
        .execute(&pool)
        .await
        .unwrap();
        all.run(&pool).await.unwrap();
        // id, last heartbeat, interval, agent version, telemetry, offline since
        type Row = (
            String,
            Option<i64>,
            Option<i64>,
            Option<String>,
            Option<String>,
            Option<i64>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT device_id, last_heartbeat, interval_s, agent_version, telemetry, offline_since
                 FROM device_heartbeats ORDER BY device_id",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(
            rows,
            [
                (
                    "beating".into(),
                    Some(5000),
                    Some(60),
                    Some("0.1.0".into()),
                    Some(r#"{"load1":0.5}"#.into()),
                    None
                ),
                (
                    "gone".into(),
                    Some(4000),
                    Some(30),
                    Some("0.0.9".into()),
                    Some("{}".into()),
                    Some(4500)
                ),
                ("new".into(), None, None, None, None, None),
            ]
        );
        let db = Db::Sqlite(pool);
        let device = devices::by_id(&db, "beating").await.unwrap().unwrap();
        assert_eq!(
            (
                device.last_heartbeat,
                device.interval_s,
                device.agent_version.as_deref()
            ),
            (Some(5000), Some(60), Some("0.1.0"))
        );
        let gone = devices::by_id(&db, "gone").await.unwrap().unwrap();
        assert_eq!(gone.status(10_000, 3), devices::DeviceStatus::Deregistered);
        // The columns left `devices`: nothing can write a heartbeat there by mistake.
        with_pool!(&db, pool => sqlx::query("SELECT telemetry FROM devices").execute(pool).await.map(|_| ()))
            .unwrap_err();
    }

    #[tokio::test]
    async fn readiness_needs_every_migration() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(None, dir.path()).await.unwrap();
        assert!(db.readiness().await.is_ok());
        // As if an old dump had been restored under this binary.
        with_pool!(&db, pool => sqlx::query(
            "DELETE FROM _sqlx_migrations WHERE version = (SELECT MAX(version) FROM _sqlx_migrations)")
            .execute(pool)
            .await
            .map(|r| r.rows_affected()))
        .unwrap();
        let needed = db.migrator().iter().map(|m| m.version).max().unwrap();
        assert_eq!(
            db.readiness().await.unwrap_err().to_string(),
            format!(
                "the database schema is at migration {}, this server needs {needed}",
                needed - 1
            )
        );
        db.close().await;
        assert!(matches!(
            db.readiness().await,
            Err(NotReady::Unreachable(_))
        ));
    }

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }
}
