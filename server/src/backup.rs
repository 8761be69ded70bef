//! `kernex-server backup` and `restore`: a consistent copy of the database and of the local bundle
//! store, with a manifest that lets a restore check every file before it touches anything.
//!
//! A backup directory holds:
//! - `kernex.db` (SQLite, written by `VACUUM INTO`: one read transaction, so a consistent snapshot
//!   while the running server keeps writing heartbeats) or `database.pgdump` (PostgreSQL, `pg_dump`
//!   custom format);
//! - `bundles/<object key>`: the files of the bundles alive in that snapshot (local store only; an
//!   S3 bucket is backed up by the bucket's own versioning or replication, the manifest says which);
//! - `manifest.json`, written last (a directory without one is an interrupted backup): time, server
//!   version, backend, schema version (the newest migration applied), bundle store, and the size
//!   and SHA-256 of every file.
//!
//! The backup never migrates anything: it does not go through [`Db::open`], so an older server still
//! running on the database is left alone. The restore refuses a target that holds data unless
//! `--force`, and checks the manifest, every file's size and SHA-256 and the schema version before
//! writing. The next `serve` applies migrations newer than the backup's, as on any upgrade.
//!
//! Consistency of bundles with the database: a bundle's file is committed to the store before its
//! row is inserted, and retention marks a row retired before deleting the file. So every bundle
//! alive in the snapshot has its file in the store, unless retention retired it between the snapshot
//! and the copy; that backup fails naming the bundle, and running it again succeeds.

use crate::cli::{BundleStoreArgs, BundleStoreKind};
use crate::db::{self, redact_url};
use anyhow::{bail, ensure, Context as _};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

/// Name of the manifest in a backup directory.
pub const MANIFEST: &str = "manifest.json";
/// The database file of a SQLite backup.
const SQLITE_DUMP: &str = "kernex.db";
/// The database file of a PostgreSQL backup (`pg_dump --format=custom`).
const POSTGRES_DUMP: &str = "database.pgdump";
/// Version of the backup layout; a restore refuses others.
const FORMAT: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// The `kernex-server` that wrote the backup.
    pub server_version: String,
    /// `sqlite` or `postgres`.
    pub backend: String,
    /// The newest migration applied to the database in the backup.
    pub schema_version: i64,
    pub bundle_store: BundleStoreNote,
    /// Every file of the backup but the manifest, database first.
    pub files: Vec<FileEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum BundleStoreNote {
    /// The bundle files are in the backup under `bundles/`.
    Local { bundles: usize },
    /// The bundle files stay in the bucket, which the operator backs up on its own.
    S3 {
        endpoint: String,
        bucket: String,
        prefix: String,
        note: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative to the backup directory, `/`-separated.
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// Where the server's state lives, as `--data-dir` and `--database` say.
#[derive(Debug)]
pub enum Source<'a> {
    /// The SQLite file.
    Sqlite(PathBuf),
    /// A `postgres://` URL.
    Postgres(&'a str),
}

impl<'a> Source<'a> {
    pub fn new(database: Option<&'a str>, data_dir: &Path) -> anyhow::Result<Source<'a>> {
        Ok(match database {
            None => Source::Sqlite(data_dir.join(db::SQLITE_FILE)),
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Source::Postgres(url)
            }
            Some(url) => match url.strip_prefix("sqlite:") {
                Some(rest) => {
                    let path = rest.trim_start_matches("//");
                    let path = path.split('?').next().unwrap_or(path);
                    ensure!(
                        !path.is_empty() && path != ":memory:",
                        "--database {url}: backup and restore need a SQLite file"
                    );
                    Source::Sqlite(PathBuf::from(path))
                }
                None => bail!(
                    "--database {}: unsupported URL scheme (use postgres://... or sqlite:PATH)",
                    redact_url(url)
                ),
            },
        })
    }

    fn backend(&self) -> &'static str {
        match self {
            Source::Sqlite(_) => "sqlite",
            Source::Postgres(_) => "postgres",
        }
    }
}

/// A live bundle of the snapshot: where its file is and what it must hash to.
struct LiveBundle {
    id: String,
    object_key: String,
    /// Of the archive: the file's first `archive_bytes` bytes (the signature trailer follows).
    sha256: String,
    size: i64,
    archive_bytes: i64,
}

/// Writes a backup of `source` (and of the local bundle store under `data_dir`) into `out`, which
/// must not exist or be empty. Returns the manifest written.
pub async fn backup(
    source: &Source<'_>,
    data_dir: &Path,
    store: &BundleStoreArgs,
    out: &Path,
) -> anyhow::Result<Manifest> {
    // The manifest is what a restore finds an S3 store's bundles by: it must name the bucket.
    if store.bundle_store == BundleStoreKind::S3 {
        for (flag, var, missing) in [
            (
                "--s3-endpoint",
                "KERNEX_S3_ENDPOINT",
                store.s3_endpoint.is_none(),
            ),
            (
                "--s3-bucket",
                "KERNEX_S3_BUCKET",
                store.s3_bucket.as_deref().is_none_or(str::is_empty),
            ),
        ] {
            ensure!(
                !missing,
                "--bundle-store s3 needs {flag} (or the environment variable {var}): the manifest \
                 names the bucket the bundles stay in"
            );
        }
    }
    prepare_out(out)?;
    let (dump, schema_version, live) = match source {
        Source::Sqlite(file) => backup_sqlite(file, &out.join(SQLITE_DUMP))?,
        Source::Postgres(url) => backup_postgres(url, &out.join(POSTGRES_DUMP)).await?,
    };
    let mut files = vec![dump];
    let bundle_store = match store.bundle_store {
        BundleStoreKind::Local => {
            let root = data_dir.join("bundles");
            for bundle in &live {
                crate::store::validate_key(&bundle.object_key)
                    .with_context(|| format!("bundle {} in the database", bundle.id))?;
                let from = root.join(&bundle.object_key);
                let path = format!("bundles/{}", bundle.object_key);
                let to = out.join(&path);
                std::fs::create_dir_all(to.parent().unwrap_or(out))
                    .with_context(|| format!("creating the directory of {}", to.display()))?;
                let archive_bytes = u64::try_from(bundle.archive_bytes).unwrap_or(0);
                let (size, sha256, archive_sha256) = match copy_hashed(&from, &to, archive_bytes) {
                    Err(err) if !from.exists() => {
                        return Err(err.context(format!(
                            "bundle {}'s file {} is gone: retention retired it after the database \
                             snapshot; run the backup again",
                            bundle.id,
                            from.display()
                        )))
                    }
                    other => other?,
                };
                ensure!(
                    i64::try_from(size) == Ok(bundle.size) && archive_sha256 == bundle.sha256,
                    "bundle {}'s file {} ({size} bytes, archive SHA-256 {archive_sha256}) is not \
                     what the database says ({} bytes, {}): the bundle store is damaged",
                    bundle.id,
                    from.display(),
                    bundle.size,
                    bundle.sha256
                );
                files.push(FileEntry { path, size, sha256 });
            }
            BundleStoreNote::Local {
                bundles: live.len(),
            }
        }
        BundleStoreKind::S3 => BundleStoreNote::S3 {
            endpoint: store
                .s3_endpoint
                .as_ref()
                .map(|u| u.to_string())
                .unwrap_or_default(),
            bucket: store.s3_bucket.clone().unwrap_or_default(),
            prefix: store.s3_prefix.clone(),
            note: format!(
                "{} bundle files stay in the bucket: back it up with the object store's own \
                 versioning or replication",
                live.len()
            ),
        },
    };
    let manifest = Manifest {
        format: FORMAT,
        created_at: db::rfc3339(db::now_ms()),
        server_version: env!("CARGO_PKG_VERSION").to_owned(),
        backend: source.backend().to_owned(),
        schema_version,
        bundle_store,
        files,
    };
    let path = out.join(MANIFEST);
    let mut json = serde_json::to_vec_pretty(&manifest)?;
    json.push(b'\n');
    write_synced(&path, &json)?;
    sync_dir(out)?;
    Ok(manifest)
}

fn prepare_out(out: &Path) -> anyhow::Result<()> {
    match std::fs::read_dir(out) {
        Ok(mut entries) => ensure!(
            entries.next().is_none(),
            "--out {} is not empty: give a new directory for each backup",
            out.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?
        }
        Err(e) => return Err(e).with_context(|| format!("reading --out {}", out.display())),
    }
    Ok(())
}

/// `VACUUM INTO` the backup file: SQLite copies one read transaction's view of the database, so
/// heartbeats committed meanwhile are simply not in it (WAL: the writer is never blocked).
fn backup_sqlite(file: &Path, to: &Path) -> anyhow::Result<(FileEntry, i64, Vec<LiveBundle>)> {
    ensure!(
        file.exists(),
        "no SQLite database at {}: check --data-dir (or give --database for PostgreSQL)",
        file.display()
    );
    let conn =
        rusqlite::Connection::open_with_flags(file, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("opening {}", file.display()))?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    let target = to
        .to_str()
        .with_context(|| format!("{} is not UTF-8", to.display()))?;
    conn.execute("VACUUM INTO ?1", [target]).with_context(|| {
        format!(
            "copying {} into {} (VACUUM INTO)",
            file.display(),
            to.display()
        )
    })?;
    drop(conn);
    // Read what the restore will see from the copy itself, not the live file.
    let copy =
        rusqlite::Connection::open_with_flags(to, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("opening the copy {}", to.display()))?;
    let schema_version = sqlite_schema_version(&copy)
        .with_context(|| format!("reading the schema version of {}", file.display()))?;
    let mut statement = copy.prepare(
        "SELECT id, object_key, sha256, size, archive_bytes FROM bundles
         WHERE deleted_at IS NULL ORDER BY id",
    )?;
    let live = statement
        .query_map([], |row| {
            Ok(LiveBundle {
                id: row.get(0)?,
                object_key: row.get(1)?,
                sha256: row.get(2)?,
                size: row.get(3)?,
                archive_bytes: row.get(4)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()
        .with_context(|| format!("listing the bundles of {}", file.display()))?;
    drop(statement);
    drop(copy);
    std::fs::File::open(to)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", to.display()))?;
    let (size, sha256) = hash_file(to)?;
    let entry = FileEntry {
        path: SQLITE_DUMP.to_owned(),
        size,
        sha256,
    };
    Ok((entry, schema_version, live))
}

fn sqlite_schema_version(conn: &rusqlite::Connection) -> anyhow::Result<i64> {
    let version: Option<i64> = conn
        .query_row(
            "SELECT MAX(version) FROM _sqlx_migrations WHERE success",
            [],
            |row| row.get(0),
        )
        .context("no migrations table: this is not a kernex-server database")?;
    version.context("no migration applied: this is not a kernex-server database")
}

/// `pg_dump` runs on a snapshot exported from a repeatable-read transaction that also reads the
/// schema version and the live bundles, so all three agree.
async fn backup_postgres(
    url: &str,
    to: &Path,
) -> anyhow::Result<(FileEntry, i64, Vec<LiveBundle>)> {
    let pool = connect_postgres(url).await?;
    let mut tx = pool
        .begin()
        .await
        .context("starting the snapshot transaction")?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let snapshot: String = sqlx::query_scalar("SELECT pg_export_snapshot()")
        .fetch_one(&mut *tx)
        .await
        .context("exporting a snapshot for pg_dump")?;
    let schema_version: Option<i64> =
        sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(&mut *tx)
            .await
            .with_context(|| {
                format!(
                    "reading the schema version of {}: is this a kernex-server database?",
                    redact_url(url)
                )
            })?;
    let schema_version = schema_version.with_context(|| {
        format!(
            "{}: no migration applied, not a kernex-server database",
            redact_url(url)
        )
    })?;
    let live: Vec<(String, String, String, i64, i64)> = sqlx::query_as(
        "SELECT id, object_key, sha256, size, archive_bytes FROM bundles
         WHERE deleted_at IS NULL ORDER BY id",
    )
    .fetch_all(&mut *tx)
    .await
    .context("listing the live bundles")?;
    let target = to
        .to_str()
        .with_context(|| format!("{} is not UTF-8", to.display()))?;
    run_pg_tool(
        "pg_dump",
        url,
        &[
            "--format=custom",
            "--no-owner",
            "--no-privileges",
            &format!("--snapshot={snapshot}"),
            &format!("--file={target}"),
        ],
    )
    .await?;
    tx.rollback().await?;
    pool.close().await;
    std::fs::File::open(to)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", to.display()))?;
    let (size, sha256) = hash_file(to)?;
    let live = live
        .into_iter()
        .map(|(id, object_key, sha256, size, archive_bytes)| LiveBundle {
            id,
            object_key,
            sha256,
            size,
            archive_bytes,
        })
        .collect();
    Ok((
        FileEntry {
            path: POSTGRES_DUMP.to_owned(),
            size,
            sha256,
        },
        schema_version,
        live,
    ))
}

/// A small pool that does not migrate: backup and restore must leave the schema as they find it.
async fn connect_postgres(url: &str) -> anyhow::Result<sqlx::PgPool> {
    use std::str::FromStr as _;
    let options = sqlx::postgres::PgConnectOptions::from_str(url)
        .with_context(|| format!("parsing --database URL {}", redact_url(url)))?;
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect_with(options)
        .await
        .with_context(|| format!("connecting to PostgreSQL at {}", redact_url(url)))
}

/// Runs `pg_dump` or `pg_restore` (from PATH) against `url`; the password goes through
/// `PGPASSWORD`, not the command line, where `ps` would show it.
/// The `--dbname` for a client tool (the URL without its password) and the password, which goes
/// in the environment rather than on a command line others can read.
fn pg_tool_target(url: &str) -> anyhow::Result<(url::Url, Option<String>)> {
    let mut parsed = url::Url::parse(url)
        .with_context(|| format!("parsing --database URL {}", redact_url(url)))?;
    let password = parsed.password().map(|p| {
        percent_encoding::percent_decode_str(p)
            .decode_utf8_lossy()
            .into_owned()
    });
    let _ = parsed.set_password(None);
    Ok((parsed, password))
}

fn pg_tool_error(tool: &str, e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        anyhow::anyhow!(
            "{tool} not found on PATH: install the PostgreSQL client tools (Debian: \
             postgresql-client), the same major version as the server or newer"
        )
    } else {
        anyhow::Error::from(e).context(format!("running {tool}"))
    }
}

async fn run_pg_tool(tool: &str, url: &str, args: &[&str]) -> anyhow::Result<()> {
    let (dbname, password) = pg_tool_target(url)?;
    let mut command = std::process::Command::new(tool);
    command
        .args(args)
        .arg(format!("--dbname={dbname}"))
        .stdin(std::process::Stdio::null());
    if let Some(password) = password {
        command.env("PGPASSWORD", password);
    }
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .context("waiting for the PostgreSQL client tool")?;
    let tool = tool.to_owned();
    let output = output.map_err(|e| pg_tool_error(&tool, e))?;
    ensure!(
        output.status.success(),
        "{tool} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

/// Replaces every table of the database at `url` with the dump, in one transaction: the tables are
/// dropped and the dump's SQL (from `pg_restore -f -`) runs through `psql --single-transaction`, so
/// a restore that fails leaves the target as it was. `pg_restore --clean` would drop only what the
/// dump holds, and a table of a newer schema referring to one of them (a backup taken before a
/// migration, restored over a database after it) would stop the drop.
async fn replace_postgres(url: &str, dump: &str, tables: &[String]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let (dbname, password) = pg_tool_target(url)?;
    let mut drop_tables = String::new();
    if !tables.is_empty() {
        drop_tables = format!("DROP TABLE IF EXISTS {} CASCADE;\n", tables.join(", "));
    }
    let dump = dump.to_owned();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let spawn = |command: &mut Command, tool: &str| {
            if let Some(password) = &password {
                command.env("PGPASSWORD", password);
            }
            command.spawn().map_err(|e| pg_tool_error(tool, e))
        };
        let mut restore = spawn(
            Command::new("pg_restore")
                .args(["--no-owner", "--no-privileges", "--file=-", &dump])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
            "pg_restore",
        )?;
        let mut psql = spawn(
            Command::new("psql")
                .args([
                    "--no-psqlrc",
                    "--quiet",
                    "--single-transaction",
                    "--set=ON_ERROR_STOP=1",
                ])
                .arg(format!("--dbname={dbname}"))
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
            "psql",
        )?;
        let mut sql_in = psql.stdin.take().expect("psql's stdin is piped");
        let mut sql_out = restore.stdout.take().expect("pg_restore's stdout is piped");
        // A psql that stopped at an error closes its input: the copy fails, psql's status says why.
        let _ = sql_in
            .write_all(drop_tables.as_bytes())
            .and_then(|()| std::io::copy(&mut sql_out, &mut sql_in).map(|_| ()));
        drop(sql_in); // the end of psql's input: it commits and exits
        let restored = restore
            .wait_with_output()
            .context("waiting for pg_restore")?;
        let applied = psql.wait_with_output().context("waiting for psql")?;
        ensure!(
            applied.status.success(),
            "psql failed ({}) replacing the tables, nothing was changed: {}",
            applied.status,
            String::from_utf8_lossy(&applied.stderr).trim()
        );
        ensure!(
            restored.status.success(),
            "pg_restore failed ({}): {}",
            restored.status,
            String::from_utf8_lossy(&restored.stderr).trim()
        );
        Ok(())
    })
    .await
    .context("waiting for the PostgreSQL client tools")?
}

/// Restores the backup in `from` into `target`: checks the manifest, every file and the schema
/// version first, refuses a target holding data unless `force`, then writes.
pub async fn restore(
    target: &Source<'_>,
    data_dir: &Path,
    store: &BundleStoreArgs,
    from: &Path,
    force: bool,
) -> anyhow::Result<Manifest> {
    let manifest = verify(from)?;
    ensure!(
        manifest.backend == target.backend(),
        "{} holds a {} database and the target is {}: restore it with {}",
        from.display(),
        manifest.backend,
        target.backend(),
        if manifest.backend == "sqlite" {
            "no --database (into --data-dir)"
        } else {
            "--database postgres://..."
        }
    );
    let needed = db::latest_migration(target.backend() == "postgres");
    ensure!(
        manifest.schema_version <= needed,
        "{}: the backup's schema is at migration {}, this kernex-server knows migrations up to {}: \
         restore with the server version that wrote it ({}) or newer",
        from.join(MANIFEST).display(),
        manifest.schema_version,
        needed,
        manifest.server_version
    );
    let bundles: Vec<&FileEntry> = manifest
        .files
        .iter()
        .filter(|f| f.path.starts_with("bundles/"))
        .collect();
    match (&manifest.bundle_store, store.bundle_store) {
        (BundleStoreNote::Local { .. }, BundleStoreKind::Local)
        | (BundleStoreNote::S3 { .. }, BundleStoreKind::S3) => {}
        (BundleStoreNote::Local { .. }, BundleStoreKind::S3) => bail!(
            "{} holds the files of a local bundle store: restore with --bundle-store local (then \
             copy bundles/ into the bucket if the server is to use S3)",
            from.display()
        ),
        (BundleStoreNote::S3 { bucket, .. }, BundleStoreKind::Local) => bail!(
            "{}'s bundles are in the S3 bucket {bucket:?}, not in the backup: restore with \
             --bundle-store s3 and the bucket's options",
            from.display()
        ),
    }
    let bundle_root = data_dir.join("bundles");
    let local_bundles = store.bundle_store == BundleStoreKind::Local;
    match target {
        Source::Sqlite(file) => {
            let leftovers: Vec<PathBuf> = ["", "-wal", "-shm"]
                .iter()
                .map(|suffix| PathBuf::from(format!("{}{suffix}", file.display())))
                .filter(|p| p.exists())
                .collect();
            if !force {
                ensure!(
                    leftovers.is_empty(),
                    "{} exists: refusing to overwrite a database (stop the server, then give \
                     --force to replace it, or restore into an empty --data-dir)",
                    file.display()
                );
                ensure_no_bundles(&bundle_root, local_bundles)?;
            }
            let dir = file.parent().unwrap_or(Path::new("."));
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let temp = dir.join(format!(".{}.restoring", db::SQLITE_FILE));
            copy_hashed(&from.join(SQLITE_DUMP), &temp, 0)?;
            let conn = rusqlite::Connection::open(&temp)
                .with_context(|| format!("opening {}", temp.display()))?;
            let check: String = conn
                .query_row("PRAGMA integrity_check", [], |row| row.get(0))
                .with_context(|| format!("checking {}", temp.display()))?;
            ensure!(
                check == "ok",
                "{}: SQLite integrity check failed: {check}",
                from.join(SQLITE_DUMP).display()
            );
            drop(conn);
            if local_bundles {
                restore_bundles(from, &bundles, &bundle_root, force)?;
            }
            for leftover in &leftovers {
                std::fs::remove_file(leftover)
                    .with_context(|| format!("removing {}", leftover.display()))?;
            }
            std::fs::rename(&temp, file)
                .with_context(|| format!("moving {} to {}", temp.display(), file.display()))?;
            sync_dir(dir)?;
        }
        Source::Postgres(url) => {
            let pool = connect_postgres(url).await?;
            let tables: Vec<String> = sqlx::query_scalar(
                "SELECT schemaname || '.' || tablename FROM pg_tables
                 WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1 LIMIT 5",
            )
            .fetch_all(&pool)
            .await
            .with_context(|| format!("listing the tables of {}", redact_url(url)))?;
            if !force {
                ensure!(
                    tables.is_empty(),
                    "{} is not empty (tables {}): refusing to restore over it (stop the servers, \
                     then give --force to replace its kernex tables, or restore into a new database)",
                    redact_url(url),
                    tables.join(", ")
                );
                ensure_no_bundles(&bundle_root, local_bundles)?;
            }
            let dump = from.join(POSTGRES_DUMP);
            let dump = dump
                .to_str()
                .with_context(|| format!("{} is not UTF-8", dump.display()))?;
            if force {
                let all: Vec<String> = sqlx::query_scalar(
                    "SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) FROM pg_tables
                     WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
                )
                .fetch_all(&pool)
                .await
                .with_context(|| format!("listing the tables of {}", redact_url(url)))?;
                replace_postgres(url, dump, &all).await?;
            } else {
                run_pg_tool(
                    "pg_restore",
                    url,
                    &[
                        "--no-owner",
                        "--no-privileges",
                        "--exit-on-error",
                        "--single-transaction",
                        dump,
                    ],
                )
                .await?;
            }
            let restored: Option<i64> =
                sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
                    .fetch_one(&pool)
                    .await
                    .context("reading the restored schema version")?;
            ensure!(
                restored == Some(manifest.schema_version),
                "the restored database is at migration {restored:?}, the manifest says {}",
                manifest.schema_version
            );
            pool.close().await;
            if local_bundles {
                restore_bundles(from, &bundles, &bundle_root, force)?;
            }
        }
    }
    Ok(manifest)
}

fn ensure_no_bundles(root: &Path, local: bool) -> anyhow::Result<()> {
    if !local {
        return Ok(());
    }
    let found = walk(root)?;
    ensure!(
        found.is_empty(),
        "the bundle store {} holds {} files: refusing to mix them with the backup's (give --force \
         to replace them, or restore into an empty --data-dir)",
        root.display(),
        found.len()
    );
    Ok(())
}

/// Copies the backup's bundle files into the store (replacing it under `force`); each file goes
/// through a temporary name, so the store never shows a partial file under a bundle's key.
fn restore_bundles(
    from: &Path,
    bundles: &[&FileEntry],
    root: &Path,
    force: bool,
) -> anyhow::Result<()> {
    if force && root.exists() {
        std::fs::remove_dir_all(root).with_context(|| format!("removing {}", root.display()))?;
    }
    let incoming = root.join(".incoming");
    std::fs::create_dir_all(&incoming)
        .with_context(|| format!("creating {}", incoming.display()))?;
    for entry in bundles {
        let key = &entry.path["bundles/".len()..];
        crate::store::validate_key(key)
            .with_context(|| format!("{} in the manifest", entry.path))?;
        let to = root.join(key);
        let temp = incoming.join(uuid::Uuid::new_v4().simple().to_string());
        copy_hashed(&from.join(&entry.path), &temp, 0)?;
        let dir = to.parent().unwrap_or(root);
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::rename(&temp, &to)
            .with_context(|| format!("moving {} to {}", temp.display(), to.display()))?;
    }
    Ok(())
}

/// Reads the manifest of `dir` and checks every file it lists: present, same size, same SHA-256.
pub fn verify(dir: &Path) -> anyhow::Result<Manifest> {
    let path = dir.join(MANIFEST);
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{} not found: {} is not a backup, or its backup was interrupted",
            path.display(),
            dir.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let manifest: Manifest =
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))?;
    ensure!(
        manifest.format == FORMAT,
        "{}: backup format {} is not {FORMAT}, the one this kernex-server reads",
        path.display(),
        manifest.format
    );
    let database = match manifest.backend.as_str() {
        "sqlite" => SQLITE_DUMP,
        "postgres" => POSTGRES_DUMP,
        other => bail!("{}: unknown backend {other:?}", path.display()),
    };
    ensure!(
        manifest.files.iter().any(|f| f.path == database),
        "{}: lists no {database}",
        path.display()
    );
    for entry in &manifest.files {
        ensure!(
            !entry.path.starts_with('/')
                && !entry.path.split('/').any(|p| p == ".." || p.is_empty()),
            "{}: invalid file name {:?}",
            path.display(),
            entry.path
        );
        let file = dir.join(&entry.path);
        let (size, sha256) = hash_file(&file)
            .with_context(|| format!("{} is listed in {}", entry.path, path.display()))?;
        ensure!(
            size == entry.size,
            "{} has {size} bytes, the manifest says {}: the backup is damaged",
            file.display(),
            entry.size
        );
        ensure!(
            sha256 == entry.sha256,
            "{} has SHA-256 {sha256}, the manifest says {}: the backup is damaged",
            file.display(),
            entry.sha256
        );
    }
    Ok(manifest)
}

fn hash_file(path: &Path) -> anyhow::Result<(u64, String)> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let (size, sha256, _) = hash_copy(&mut file, None, path, 0)?;
    Ok((size, sha256))
}

/// Copies `from` to `to` (created, synced), hashing on the way: size, SHA-256 of the whole file
/// and SHA-256 of its first `prefix` bytes.
fn copy_hashed(from: &Path, to: &Path, prefix: u64) -> anyhow::Result<(u64, String, String)> {
    let mut source =
        std::fs::File::open(from).with_context(|| format!("opening {}", from.display()))?;
    let mut dest =
        std::fs::File::create(to).with_context(|| format!("creating {}", to.display()))?;
    let result = hash_copy(&mut source, Some(&mut dest), from, prefix)?;
    dest.sync_all()
        .with_context(|| format!("syncing {}", to.display()))?;
    Ok(result)
}

fn hash_copy(
    source: &mut std::fs::File,
    mut dest: Option<&mut std::fs::File>,
    path: &Path,
    prefix: u64,
) -> anyhow::Result<(u64, String, String)> {
    let (mut whole, mut head) = (Sha256::new(), Sha256::new());
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = source
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        whole.update(&buf[..n]);
        let in_head = prefix.saturating_sub(size).min(n as u64) as usize;
        head.update(&buf[..in_head]);
        if let Some(dest) = dest.as_mut() {
            dest.write_all(&buf[..n])
                .with_context(|| format!("writing the copy of {}", path.display()))?;
        }
        size += n as u64;
    }
    let hex = |digest: sha2::digest::Output<Sha256>| kernex_protocol::token::hex(&digest);
    Ok((size, hex(whole.finalize()), hex(head.finalize())))
}

fn write_synced(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let mut file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    file.write_all(data)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

/// Every regular file under `root` except the store's temporaries (none if `root` is missing).
fn walk(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        };
        for entry in entries {
            let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                if entry.file_name() != ".incoming" {
                    pending.push(path);
                }
            } else {
                found.push(path);
            }
        }
    }
    Ok(found)
}
