//! Command-line interface: `serve` plus the admin commands a first operator and scripts need.
//! Admin commands open the same database as the server (SQLite file or PostgreSQL URL) directly.

use crate::api::ApiSettings;
use crate::backup::{self, BundleStoreNote, Source};
use crate::db::tokens::{self, NewBootstrapToken, Role};
use crate::db::{audit, tenants, Db};
use crate::serve::{serve, ServeOptions};
use crate::store::{S3Config, S3Credentials, S3Downloads, StoreConfig};
use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "kernex-server",
    version,
    about = "Kernex control plane: tenants, bootstrap tokens, devices, commands, bundles, deployments."
)]
pub struct Cli {
    #[command(flatten)]
    pub storage: StorageArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Where state lives; shared by every subcommand.
#[derive(Debug, Args)]
pub struct StorageArgs {
    /// Directory for the embedded SQLite database and the bundle store (`bundles/`).
    #[arg(
        long,
        global = true,
        env = "KERNEX_DATA_DIR",
        default_value = "./kernex-data"
    )]
    pub data_dir: PathBuf,
    /// `postgres://user:password@host/db` to use PostgreSQL instead of the embedded SQLite file.
    #[arg(
        long,
        global = true,
        env = "KERNEX_DATABASE_URL",
        hide_env_values = true
    )]
    pub database: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the control plane.
    Serve(Box<ServeArgs>),
    /// Manage tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Manage bootstrap tokens (what an ISO carries to enroll devices).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Manage API keys for the REST API.
    #[command(subcommand)]
    Apikey(ApiKeyCommand),
    /// Manage user accounts (a username and password to log in to the web console).
    #[command(subcommand)]
    User(UserCommand),
    /// Fleet-wide device operations for provisioning and load tests.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Make publisher keys and signed bundles (no database needed).
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Rotate server-wide secrets.
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Back up the database and the local bundle store into a new directory while the server runs:
    /// SQLite through `VACUUM INTO` (a consistent snapshot; heartbeats keep being written),
    /// PostgreSQL through `pg_dump --format=custom` (from PATH), the files of the live bundles, and
    /// manifest.json (time, backend, schema version, size and SHA-256 of every file). With
    /// `--bundle-store s3` the bundles stay in the bucket: back it up with the store's own tools.
    /// Never migrates the database.
    Backup(Box<BackupArgs>),
    /// Restore a backup into an empty --data-dir (SQLite) or an empty database (--database). Checks
    /// manifest.json, the size and SHA-256 of every file and the schema version before writing.
    /// Stop the servers first; the next `serve` applies the migrations newer than the backup.
    Restore(Box<RestoreArgs>),
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Directory to write; it must not exist or be empty.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Print the manifest as JSON instead of a summary.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub bundle_store: BundleStoreArgs,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// A directory written by `kernex-server backup`.
    #[arg(long, value_name = "DIR")]
    pub from: PathBuf,
    /// Replace what the target holds: the SQLite file and the local bundle store, or the tables
    /// of the database (`pg_restore --clean`).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub bundle_store: BundleStoreArgs,
}

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Make a new device-token key. Tokens signed with the key it replaces stay valid until that
    /// key is rotated out too, so devices carry on and renew theirs (within --device-token-ttl);
    /// running servers switch within --secret-reload-interval. Rotate again only after a token
    /// lifetime has passed, or devices still holding a token of the oldest key re-authenticate.
    Rotate {
        /// The secret to rotate; `device-token-key` is the only one.
        #[arg(value_parser = ["device-token-key"])]
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Generate an RSA-4096 publisher key: the private key in OUT (mode 0600), the public half in
    /// OUT with `.pub.pem` instead of `.pem` (upload it with POST /api/v1/publisher-keys).
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Pack DIR (with manifest.toml at its root) into one signed bundle file.
    Pack {
        dir: PathBuf,
        /// The publisher's private key (from `bundle keygen`).
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on; port 0 picks a free port (the chosen one is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// PEM certificate chain for HTTPS (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for HTTPS (needs --tls-cert).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve plain HTTP on a non-loopback address (behind a proxy that terminates TLS). Without it,
    /// such a --listen needs --tls-cert and --tls-key: bootstrap and device tokens must not travel
    /// unencrypted by accident. Loopback addresses may always serve plain HTTP.
    #[arg(long, conflicts_with = "tls_cert")]
    pub plain_http: bool,
    /// Heartbeat interval suggested to agents.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: std::time::Duration,
    /// Missed intervals after which a device is reported offline.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub offline_after: u32,
    /// Lifetime of the bearer tokens devices get from /api/v1/auth.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub device_token_ttl: std::time::Duration,
    /// Largest bundle upload accepted, in MiB.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_bundle_mib: u64,
    /// Versions kept per bundle name; older ones are deleted unless a deployment still uses them.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub bundle_retention: u64,
    /// How often the rollout engine checks running deployments when nothing wakes it earlier.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub rollout_interval: std::time::Duration,
    /// How often shared secrets are read again from the database, to follow a rotation made by
    /// `kernex-server secret rotate` while this server runs.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub secret_reload_interval: std::time::Duration,
    /// Wait before retrying a failed webhook delivery; doubled after each further failure (at most
    /// an hour, ±20 % jitter), given up after 10 attempts.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub webhook_retry_base: std::time::Duration,
    /// How long a web console login lasts.
    #[arg(long, default_value = "12h", value_parser = humantime::parse_duration)]
    pub console_session_lifetime: std::time::Duration,
    /// Mark the console's cookie Secure (HTTPS only) even when serving plain HTTP on loopback: for
    /// a TLS-terminating proxy on the same host. It is Secure in every other case anyway.
    #[arg(long)]
    pub console_secure_cookies: bool,
    #[command(flatten)]
    pub bundle_store: BundleStoreArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// Rate limits (answered with 429 and `Retry-After`) and time limits. A rate is `N/s`, `N/m` or
/// `N/h` with an optional burst after a colon (`10/s:30`), or `off`.
#[derive(Debug, Args)]
#[command(next_help_heading = "Limits")]
pub struct LimitArgs {
    /// Requests per device (those carrying a device token).
    #[arg(long, default_value = "10/s:30", value_name = "RATE", value_parser = crate::api::limits::parse_rate)]
    pub rate_limit_device: crate::api::limits::RateLimit,
    /// Requests per API key.
    #[arg(long, default_value = "50/s:200", value_name = "RATE", value_parser = crate::api::limits::parse_rate)]
    pub rate_limit_api_key: crate::api::limits::RateLimit,
    /// Requests per source address without device token or API key (enrollment, /auth, probes).
    /// Authenticated requests count against their device or key instead: sites share NAT addresses.
    #[arg(long, default_value = "20/s:60", value_name = "RATE", value_parser = crate::api::limits::parse_rate)]
    pub rate_limit_address: crate::api::limits::RateLimit,
    /// Failed authentications per source address (API keys that are wrong, revoked or unknown;
    /// failed console logins). Past it, that address's requests with an API key and its console
    /// logins are refused until the rate allows more: guessing keys or passwords stays slow.
    #[arg(long, default_value = "10/m:20", value_name = "RATE", value_parser = crate::api::limits::parse_rate)]
    pub rate_limit_failed_auth: crate::api::limits::RateLimit,
    /// Behind a reverse proxy: the client's address is the last entry of `X-Forwarded-For` (only
    /// set this when the proxy overwrites or appends that header; clients could forge it otherwise).
    #[arg(long)]
    pub forwarded_for: bool,
    /// Longest time to answer a request (503 `timeout` after it); a download's body streams on.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub request_timeout: std::time::Duration,
    /// Longest time a bundle upload may take, body included.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub upload_timeout: std::time::Duration,
    /// Origins allowed to call the API from a browser (CORS), e.g. `https://console.example.com`;
    /// repeatable. None by default: the built-in console is served from the API's own origin.
    #[arg(long, value_name = "ORIGIN")]
    pub cors_origin: Vec<axum::http::HeaderValue>,
}

/// Where bundle files are kept. Credentials for S3 come only from the environment
/// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`) or a file, never from a flag's value.
#[derive(Debug, Args)]
#[command(next_help_heading = "Bundle store")]
pub struct BundleStoreArgs {
    /// `local`: files under --data-dir in `bundles/`. `s3`: a bucket of an S3-compatible store
    /// (AWS S3, Garage, MinIO, ...); needs --s3-endpoint, --s3-bucket, --s3-region and credentials
    /// from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or --s3-credentials-file.
    #[arg(long, value_enum, env = "KERNEX_BUNDLE_STORE", default_value_t = BundleStoreKind::Local)]
    pub bundle_store: BundleStoreKind,
    /// S3 API endpoint (scheme, host, port), e.g. `https://s3.eu-central-1.amazonaws.com` or
    /// `http://127.0.0.1:3900`; requests are path-style (`<endpoint>/<bucket>/<key>`).
    #[arg(long, env = "KERNEX_S3_ENDPOINT", value_name = "URL")]
    pub s3_endpoint: Option<url::Url>,
    /// S3 bucket holding the bundle files; it must exist.
    #[arg(long, env = "KERNEX_S3_BUCKET", value_name = "NAME")]
    pub s3_bucket: Option<String>,
    /// Region requests are signed for (`us-east-1`, Garage's `s3_region`, ...).
    #[arg(long, env = "KERNEX_S3_REGION", value_name = "REGION")]
    pub s3_region: Option<String>,
    /// Prefix of every key in the bucket, e.g. `kernex/`, to share a bucket.
    #[arg(
        long,
        env = "KERNEX_S3_PREFIX",
        value_name = "PREFIX",
        default_value = ""
    )]
    pub s3_prefix: String,
    /// File with the S3 access key in the AWS credentials format (`aws_access_key_id = ...` and
    /// `aws_secret_access_key = ...`), instead of AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.
    #[arg(long, env = "KERNEX_S3_CREDENTIALS_FILE", value_name = "FILE")]
    pub s3_credentials_file: Option<PathBuf>,
    /// How devices download bundles kept in S3: `redirect` answers `307` with a presigned URL, so
    /// the bytes go from the bucket straight to the device (which must reach the endpoint);
    /// `proxy` streams them through the server. Operators' downloads are always streamed.
    #[arg(long, value_enum, env = "KERNEX_S3_DOWNLOADS", default_value_t = S3DownloadsArg::Redirect)]
    pub s3_downloads: S3DownloadsArg,
    /// Lifetime of the presigned URLs of `--s3-downloads redirect` (at most 7 days). A download
    /// that starts in time runs to its end; a resume asks the server for a new URL.
    #[arg(long, env = "KERNEX_S3_PRESIGN_TTL", default_value = "15m", value_parser = humantime::parse_duration)]
    pub s3_presign_ttl: std::time::Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BundleStoreKind {
    Local,
    S3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum S3DownloadsArg {
    Redirect,
    Proxy,
}

impl BundleStoreArgs {
    /// The validated store configuration; errors name the missing option or variable. `env`
    /// looks up environment variables (the process environment outside tests).
    pub fn config(
        &self,
        data_dir: &std::path::Path,
        max_bundle_bytes: u64,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<StoreConfig> {
        if self.bundle_store == BundleStoreKind::Local {
            let stray = [
                ("--s3-endpoint", self.s3_endpoint.is_some()),
                ("--s3-bucket", self.s3_bucket.is_some()),
                ("--s3-region", self.s3_region.is_some()),
                ("--s3-prefix", !self.s3_prefix.is_empty()),
                ("--s3-credentials-file", self.s3_credentials_file.is_some()),
            ];
            if let Some((flag, _)) = stray.iter().find(|(_, set)| *set) {
                anyhow::bail!("{flag} is set but the bundle store is local: add --bundle-store s3");
            }
            return Ok(StoreConfig::Local(data_dir.join("bundles")));
        }
        let needs = |flag: &str, var: &str| {
            anyhow::anyhow!("--bundle-store s3 needs {flag} (or the environment variable {var})")
        };
        let endpoint = self
            .s3_endpoint
            .clone()
            .ok_or_else(|| needs("--s3-endpoint", "KERNEX_S3_ENDPOINT"))?;
        let bucket = self
            .s3_bucket
            .clone()
            .filter(|b| !b.is_empty())
            .ok_or_else(|| needs("--s3-bucket", "KERNEX_S3_BUCKET"))?;
        let region = self
            .s3_region
            .clone()
            .filter(|r| !r.is_empty())
            .ok_or_else(|| needs("--s3-region", "KERNEX_S3_REGION"))?;
        let credentials = match &self.s3_credentials_file {
            Some(file) => S3Credentials::from_file(file)?,
            None => {
                let id = env("AWS_ACCESS_KEY_ID").filter(|v| !v.is_empty());
                let secret = env("AWS_SECRET_ACCESS_KEY").filter(|v| !v.is_empty());
                match (id, secret) {
                    (Some(id), Some(secret)) => S3Credentials::new(id, secret),
                    (id, secret) => {
                        let missing: Vec<&str> = [
                            ("AWS_ACCESS_KEY_ID", id.is_none()),
                            ("AWS_SECRET_ACCESS_KEY", secret.is_none()),
                        ]
                        .iter()
                        .filter(|(_, missing)| *missing)
                        .map(|(var, _)| *var)
                        .collect();
                        anyhow::bail!(
                            "--bundle-store s3 needs credentials: {} not set (or pass --s3-credentials-file)",
                            match missing.as_slice() {
                                [one] => format!("the environment variable {one} is"),
                                _ => format!("the environment variables {} are", missing.join(" and ")),
                            }
                        );
                    }
                }
            }
        };
        const MAX_PRESIGN_TTL: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);
        let downloads = match self.s3_downloads {
            S3DownloadsArg::Proxy => S3Downloads::Proxy,
            S3DownloadsArg::Redirect => {
                let ttl = self.s3_presign_ttl;
                anyhow::ensure!(
                    ttl >= std::time::Duration::from_secs(1) && ttl <= MAX_PRESIGN_TTL,
                    "--s3-presign-ttl must be between 1s and 7 days (S3's limit), not {}",
                    humantime::format_duration(ttl)
                );
                S3Downloads::Redirect { ttl }
            }
        };
        let prefix = match self.s3_prefix.trim_matches('/') {
            "" => String::new(),
            prefix => format!("{prefix}/"),
        };
        Ok(StoreConfig::S3(Box::new(S3Config {
            endpoint,
            bucket,
            region,
            prefix,
            credentials,
            part_size: S3Config::part_size_for(max_bundle_bytes),
            downloads,
        })))
    }
}

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Create a tenant.
    Create {
        /// Lowercase letters, digits and '-'.
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// List tenants.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a bootstrap token and print it (once: only its hash is stored).
    Create {
        #[arg(long)]
        tenant: String,
        /// Devices it may enroll (default: unlimited).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        uses: Option<u32>,
        /// Lifetime, e.g. 24h or 30d (default: until revoked).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<std::time::Duration>,
        #[arg(long, default_value = "")]
        description: String,
        /// Print {"token": ..., "id": ..., ...} instead of the bare token.
        #[arg(long)]
        json: bool,
    },
    /// List a tenant's bootstrap tokens (ids and state, never secrets).
    List {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a bootstrap token: devices can no longer enroll with it.
    Revoke {
        #[arg(long)]
        tenant: String,
        /// The token id (the 16 hex digits after `kxb_`).
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    /// Create an API key and print it (once: only its hash is stored).
    Create {
        #[arg(long)]
        tenant: String,
        #[arg(long, value_enum)]
        role: Role,
        #[arg(long, default_value = "")]
        description: String,
        /// Print {"key": ..., "id": ..., ...} instead of the bare key.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a console user. The password is read from --password-file or, without it, from the
    /// first line of standard input (never from the command line, where `ps` would show it).
    Create {
        #[arg(long)]
        tenant: String,
        #[arg(long, value_enum)]
        role: Role,
        /// File holding the password (its first line); at least 12 characters.
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
        /// 1–64 of a-z, 0-9, `.`, `_`, `@`, `-`, starting with a letter or digit; unique across
        /// tenants.
        username: String,
        #[arg(long)]
        json: bool,
    },
    /// List a tenant's users.
    List {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        json: bool,
    },
    /// Disable a user: their console sessions end at once and they can no longer log in.
    Disable {
        #[arg(long)]
        tenant: String,
        username: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Register N devices without hardware and write `device_id token` lines for them: seeds load
    /// tests and factory provisioning without an RSA key generation per device.
    Preauthorize {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        count: u32,
        /// Lifetime of the bearer tokens written.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        token_ttl: std::time::Duration,
        /// File to write (mode 0600): one `device_id token` line per device.
        #[arg(long)]
        out: PathBuf,
    },
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let storage = &cli.storage;
    match cli.command {
        Command::Bundle(command) => return bundle_command(command),
        // Not through Db::open: a backup or a restore must not migrate the database.
        Command::Backup(args) => {
            let source = Source::new(storage.database.as_deref(), &storage.data_dir)?;
            let manifest =
                backup::backup(&source, &storage.data_dir, &args.bundle_store, &args.out).await?;
            if args.json {
                println!("{}", serde_json::to_string(&manifest)?);
            } else {
                let bytes: u64 = manifest.files.iter().map(|f| f.size).sum();
                println!(
                    "backup of the {} database (schema version {}) and {} written to {} ({} files, \
                     {bytes} bytes)",
                    manifest.backend,
                    manifest.schema_version,
                    match &manifest.bundle_store {
                        BundleStoreNote::Local { bundles } => format!("{bundles} bundle files"),
                        BundleStoreNote::S3 { note, .. } => note.clone(),
                    },
                    args.out.display(),
                    manifest.files.len()
                );
            }
            return Ok(());
        }
        Command::Restore(args) => {
            let target = Source::new(storage.database.as_deref(), &storage.data_dir)?;
            let manifest = backup::restore(
                &target,
                &storage.data_dir,
                &args.bundle_store,
                &args.from,
                args.force,
            )
            .await?;
            println!(
                "restored the {} backup of {} (schema version {}, {} files); `serve` applies newer \
                 migrations when it starts",
                manifest.backend,
                manifest.created_at,
                manifest.schema_version,
                manifest.files.len()
            );
            return Ok(());
        }
        _ => {}
    }
    let db = Db::open(cli.storage.database.as_deref(), &cli.storage.data_dir).await?;
    let result = dispatch(&db, &cli.storage.data_dir, cli.command).await;
    db.close().await;
    result
}

fn bundle_command(command: BundleCommand) -> anyhow::Result<()> {
    use kernex_protocol::bundle::{pack, PublisherKey};
    match command {
        BundleCommand::Keygen { out } => {
            let public = out.with_extension("pub.pem");
            anyhow::ensure!(
                !out.exists(),
                "{} exists: refusing to overwrite a private key",
                out.display()
            );
            let key = PublisherKey::generate().context("generating the publisher key")?;
            write_private(&out, key.to_pkcs8_pem()?.as_bytes())?;
            std::fs::write(&public, key.public().to_pem())
                .with_context(|| format!("writing {}", public.display()))?;
            println!(
                "publisher key {} written to {} (public half {})",
                key.public().fingerprint(),
                out.display(),
                public.display()
            );
            Ok(())
        }
        BundleCommand::Pack {
            dir,
            key,
            out,
            json,
        } => {
            let pem = std::fs::read_to_string(&key)
                .with_context(|| format!("reading publisher key {}", key.display()))?;
            let key = PublisherKey::from_pkcs8_pem(&pem)
                .with_context(|| format!("publisher key {}", key.display()))?;
            let packed = pack(&dir, &key, &out)
                .with_context(|| format!("packing {} into {}", dir.display(), out.display()))?;
            if json {
                println!(
                    "{}",
                    json!({"name": packed.manifest.name, "version": packed.manifest.version,
                           "sha256": packed.sha256, "size": packed.bytes, "file": out})
                );
            } else {
                println!(
                    "{} {} packed into {} ({} bytes, sha256 {})",
                    packed.manifest.name,
                    packed.manifest.version,
                    out.display(),
                    packed.bytes,
                    packed.sha256
                );
            }
            Ok(())
        }
    }
}

/// The password for `user create`: the first line of the file, or of standard input.
fn read_password(file: Option<&std::path::Path>) -> anyhow::Result<String> {
    let text = match file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the password from {}", path.display()))?,
        None => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("reading the password from standard input")?;
            line
        }
    };
    let password = text.lines().next().unwrap_or_default().to_owned();
    let from = file.map_or("standard input".to_owned(), |p| p.display().to_string());
    anyhow::ensure!(
        !password.is_empty(),
        "no password in {from} (its first line is empty)"
    );
    Ok(password)
}

async fn user_command(db: &Db, command: UserCommand) -> anyhow::Result<()> {
    use crate::db::users;
    match command {
        UserCommand::Create {
            tenant,
            role,
            password_file,
            username,
            json,
        } => {
            let tenant = tenants::require(db, &tenant).await?;
            let password = read_password(password_file.as_deref())?;
            let user = users::create(db, &tenant.id, &username, &password, role)
                .await
                .with_context(|| format!("creating user `{username}`"))?;
            audit::record(
                db,
                Some(&tenant.id),
                "cli",
                "user.created",
                &user.username,
                json!({"role": user.role}),
            )
            .await;
            if json {
                println!("{}", json!(user.view()));
            } else {
                println!(
                    "created {} user {} in tenant {}",
                    user.role, user.username, tenant.name
                );
            }
        }
        UserCommand::List { tenant, json } => {
            let tenant = tenants::require(db, &tenant).await?;
            let all = users::list(db, &tenant.id).await.context("listing users")?;
            if json {
                println!(
                    "{}",
                    json!(all.iter().map(|u| u.view()).collect::<Vec<_>>())
                );
            } else {
                for user in all {
                    let state = user.disabled_at.map_or("enabled", |_| "disabled");
                    println!("{}\t{}\t{state}", user.username, user.role);
                }
            }
        }
        UserCommand::Disable { tenant, username } => {
            let tenant = tenants::require(db, &tenant).await?;
            anyhow::ensure!(
                users::disable(db, &tenant.id, &username).await?,
                "tenant {} has no enabled user `{username}`",
                tenant.name
            );
            audit::record(
                db,
                Some(&tenant.id),
                "cli",
                "user.disabled",
                &username,
                json!({}),
            )
            .await;
            println!("disabled user {username}; their console sessions have ended");
        }
    }
    Ok(())
}

fn write_private(path: &std::path::Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(data)
        .with_context(|| format!("writing {}", path.display()))
}

async fn dispatch(db: &Db, data_dir: &std::path::Path, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => {
            anyhow::ensure!(
                args.tls_cert.is_some() || args.plain_http || args.listen.ip().is_loopback(),
                "refusing to serve plain HTTP on {}: give --tls-cert and --tls-key, or --plain-http \
                 when a proxy in front terminates TLS",
                args.listen
            );
            let listen_loopback_plain = args.tls_cert.is_none() && args.listen.ip().is_loopback();
            let max_bundle_bytes = args.max_bundle_mib << 20;
            let bundle_store = args
                .bundle_store
                .config(data_dir, max_bundle_bytes, |var| std::env::var(var).ok())?;
            let options = ServeOptions {
                listen: args.listen,
                tls: args.tls_cert.zip(args.tls_key),
                api: ApiSettings {
                    heartbeat_interval: args.heartbeat_interval,
                    offline_after: args.offline_after,
                    device_token_ttl: args.device_token_ttl,
                    max_bundle_bytes,
                    bundle_retention: args.bundle_retention as usize,
                    limits: crate::api::limits::LimitSettings {
                        per_device: args.limits.rate_limit_device.0,
                        per_api_key: args.limits.rate_limit_api_key.0,
                        per_address: args.limits.rate_limit_address.0,
                        failed_auth_per_address: args.limits.rate_limit_failed_auth.0,
                        request_timeout: args.limits.request_timeout,
                        upload_timeout: args.limits.upload_timeout,
                        forwarded_for: args.limits.forwarded_for,
                    },
                    cors_origins: args.limits.cors_origin,
                    ..ApiSettings::default()
                },
                bundle_store,
                rollout_every: args.rollout_interval,
                webhook_retry_base: args.webhook_retry_base,
                secret_reload_interval: args.secret_reload_interval,
                console: crate::console::ConsoleSettings {
                    session_lifetime: args.console_session_lifetime,
                    // Over TLS here, or (plain HTTP off loopback) behind a proxy terminating TLS:
                    // either way the browser speaks HTTPS. Only plain HTTP on loopback is not.
                    secure_cookies: args.console_secure_cookies || !listen_loopback_plain,
                },
            };
            serve(db.clone(), options).await
        }
        Command::Secret(SecretCommand::Rotate { name }) => {
            debug_assert_eq!(name, "device-token-key");
            crate::db::secrets::rotate(
                db,
                crate::serve::DEVICE_TOKEN_SECRET,
                crate::serve::DEVICE_TOKEN_SECRET_PREVIOUS,
            )
            .await
            .context("rotating the device-token key")?;
            audit::record(db, None, "cli", "secret.rotated", &name, json!({})).await;
            println!("device-token key rotated; running servers switch to it within --secret-reload-interval (30 s by default)");
            Ok(())
        }
        Command::Tenant(TenantCommand::Create { name, json }) => {
            let tenant = tenants::create(db, &name)
                .await
                .with_context(|| format!("creating tenant `{name}`"))?;
            audit::record(
                db,
                Some(&tenant.id),
                "cli",
                "tenant.created",
                &tenant.id,
                json!({"name": name}),
            )
            .await;
            if json {
                println!("{}", json!(tenant.view()));
            } else {
                println!("created tenant {} ({})", tenant.name, tenant.id);
            }
            Ok(())
        }
        Command::Tenant(TenantCommand::List { json }) => {
            let all = tenants::list(db).await.context("listing tenants")?;
            if json {
                println!(
                    "{}",
                    json!(all.iter().map(|t| t.view()).collect::<Vec<_>>())
                );
            } else {
                for t in all {
                    println!("{}\t{}", t.name, t.id);
                }
            }
            Ok(())
        }
        Command::Token(TokenCommand::Create {
            tenant,
            uses,
            ttl,
            description,
            json,
        }) => {
            let tenant = tenants::require(db, &tenant).await?;
            let spec = NewBootstrapToken {
                uses,
                ttl,
                description,
            };
            let (secret, row) = tokens::create_bootstrap_token(db, &tenant.id, &spec).await?;
            audit::record(
                db,
                Some(&tenant.id),
                "cli",
                "token.created",
                &row.id,
                json!({"uses_allowed": row.uses_allowed, "expires_at": row.expires_at}),
            )
            .await;
            if json {
                let mut view = json!(row.view());
                view["token"] = json!(secret.expose());
                view["tenant"] = json!(tenant.name);
                println!("{view}");
            } else {
                println!("{}", secret.expose());
            }
            Ok(())
        }
        Command::Token(TokenCommand::List { tenant, json }) => {
            let tenant = tenants::require(db, &tenant).await?;
            let rows = tokens::list_bootstrap_tokens(db, &tenant.id).await?;
            if json {
                println!(
                    "{}",
                    json!(rows.iter().map(|r| r.view()).collect::<Vec<_>>())
                );
            } else {
                for row in rows {
                    let view = row.view();
                    let limit = view
                        .uses_allowed
                        .map_or("unlimited".to_owned(), |n| n.to_string());
                    println!(
                        "{}\t{}\tuses {}/{}\texpires {}",
                        view.id,
                        json!(view.state).as_str().unwrap_or(""),
                        view.uses,
                        limit,
                        view.expires_at.as_deref().unwrap_or("never")
                    );
                }
            }
            Ok(())
        }
        Command::Token(TokenCommand::Revoke { tenant, id }) => {
            let tenant = tenants::require(db, &tenant).await?;
            tokens::revoke_bootstrap_token(db, &tenant.id, &id).await?;
            audit::record(db, Some(&tenant.id), "cli", "token.revoked", &id, json!({})).await;
            println!("revoked bootstrap token {id}");
            Ok(())
        }
        Command::Apikey(ApiKeyCommand::Create {
            tenant,
            role,
            description,
            json,
        }) => {
            let tenant = tenants::require(db, &tenant).await?;
            let (secret, row) = tokens::create_api_key(db, &tenant.id, role, &description).await?;
            audit::record(
                db,
                Some(&tenant.id),
                "cli",
                "apikey.created",
                &row.id,
                json!({"role": row.role}),
            )
            .await;
            if json {
                let mut view = json!(row.view());
                view["key"] = json!(secret.expose());
                view["tenant"] = json!(tenant.name);
                println!("{view}");
            } else {
                println!("{}", secret.expose());
            }
            Ok(())
        }
        Command::User(command) => user_command(db, command).await,
        Command::Bundle(command) => bundle_command(command),
        Command::Backup(_) | Command::Restore(_) => {
            unreachable!("handled before opening the database")
        }
        Command::Device(DeviceCommand::Preauthorize {
            tenant,
            count,
            token_ttl,
            out,
        }) => {
            let tenant = tenants::require(db, &tenant).await?;
            let written =
                crate::preauthorize::preauthorize(db, &tenant, count, token_ttl, &out).await?;
            audit::record(
                db,
                Some(&tenant.id),
                "cli",
                "device.preauthorized",
                &tenant.id,
                json!({"count": written}),
            )
            .await;
            eprintln!(
                "pre-authorized {written} devices; tokens in {}",
                out.display()
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_config(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<StoreConfig> {
        let cli = Cli::try_parse_from(["kernex-server", "serve"].iter().chain(args)).unwrap();
        let Command::Serve(serve) = cli.command else {
            unreachable!()
        };
        serve
            .bundle_store
            .config(std::path::Path::new("/data"), 4 << 30, |var| {
                env.iter()
                    .find(|(name, _)| *name == var)
                    .map(|(_, value)| value.to_string())
            })
    }

    const S3: [&str; 8] = [
        "--bundle-store",
        "s3",
        "--s3-endpoint",
        "http://127.0.0.1:3900",
        "--s3-bucket",
        "bundles",
        "--s3-region",
        "garage",
    ];
    const KEYS: [(&str, &str); 2] = [
        ("AWS_ACCESS_KEY_ID", "GKid"),
        ("AWS_SECRET_ACCESS_KEY", "s3cr3t"),
    ];

    #[test]
    fn bundle_store_options_are_validated_naming_what_is_missing() {
        let error =
            |args: &[&str], env: &[(&str, &str)]| store_config(args, env).unwrap_err().to_string();
        assert!(matches!(
            store_config(&[], &[]).unwrap(),
            StoreConfig::Local(dir) if dir == std::path::Path::new("/data/bundles")
        ));
        assert_eq!(
            error(&["--s3-bucket", "b"], &[]),
            "--s3-bucket is set but the bundle store is local: add --bundle-store s3"
        );
        assert_eq!(
            error(&S3[..6], &KEYS),
            "--bundle-store s3 needs --s3-region (or the environment variable KERNEX_S3_REGION)"
        );
        assert_eq!(
            error(&[&S3[..2], &S3[4..]].concat(), &KEYS),
            "--bundle-store s3 needs --s3-endpoint (or the environment variable KERNEX_S3_ENDPOINT)"
        );
        assert_eq!(
            error(&S3, &[]),
            "--bundle-store s3 needs credentials: the environment variables AWS_ACCESS_KEY_ID and \
             AWS_SECRET_ACCESS_KEY are not set (or pass --s3-credentials-file)"
        );
        assert_eq!(
            error(&S3, &KEYS[..1]),
            "--bundle-store s3 needs credentials: the environment variable AWS_SECRET_ACCESS_KEY \
             is not set (or pass --s3-credentials-file)"
        );
        assert_eq!(
            error(&[&S3[..], &["--s3-presign-ttl", "8d"]].concat(), &KEYS),
            "--s3-presign-ttl must be between 1s and 7 days (S3's limit), not 8days"
        );

        let StoreConfig::S3(config) = store_config(
            &[&S3[..], &["--s3-prefix", "/kernex/fleet/"]].concat(),
            &KEYS,
        )
        .unwrap() else {
            panic!("not S3")
        };
        assert_eq!(config.prefix, "kernex/fleet/");
        assert_eq!(config.part_size, 8 << 20);
        assert_eq!(
            config.downloads,
            S3Downloads::Redirect {
                ttl: std::time::Duration::from_secs(900)
            }
        );
        assert!(!format!("{config:?}").contains("s3cr3t"));
        let StoreConfig::S3(config) =
            store_config(&[&S3[..], &["--s3-downloads", "proxy"]].concat(), &KEYS).unwrap()
        else {
            panic!("not S3")
        };
        assert_eq!(config.downloads, S3Downloads::Proxy);
    }
}
