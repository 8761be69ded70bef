//! Command-line interface: `serve` plus the admin commands a first operator and scripts need.
//! Admin commands open the same database as the server (SQLite file or PostgreSQL URL) directly.

use crate::api::ApiSettings;
use crate::db::tokens::{self, NewBootstrapToken, Role};
use crate::db::{audit, tenants, Db};
use crate::serve::{serve, ServeOptions};
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
    Serve(ServeArgs),
    /// Manage tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Manage bootstrap tokens (what an ISO carries to enroll devices).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Manage API keys for the REST API.
    #[command(subcommand)]
    Apikey(ApiKeyCommand),
    /// Fleet-wide device operations for provisioning and load tests.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Make publisher keys and signed bundles (no database needed).
    #[command(subcommand)]
    Bundle(BundleCommand),
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
    if let Command::Bundle(command) = cli.command {
        return bundle_command(command);
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
            let options = ServeOptions {
                listen: args.listen,
                tls: args.tls_cert.zip(args.tls_key),
                api: ApiSettings {
                    heartbeat_interval: args.heartbeat_interval,
                    offline_after: args.offline_after,
                    device_token_ttl: args.device_token_ttl,
                    max_bundle_bytes: args.max_bundle_mib << 20,
                    bundle_retention: args.bundle_retention as usize,
                    ..ApiSettings::default()
                },
                bundle_dir: data_dir.join("bundles"),
                rollout_every: args.rollout_interval,
            };
            serve(db.clone(), options).await
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
        Command::Bundle(command) => bundle_command(command),
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
