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
    about = "Kernex control plane: tenants, bootstrap tokens, devices, commands."
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
    /// Directory for the embedded SQLite database (and, later, bundles).
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
    let db = Db::open(cli.storage.database.as_deref(), &cli.storage.data_dir).await?;
    let result = dispatch(&db, cli.command).await;
    db.close().await;
    result
}

async fn dispatch(db: &Db, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => {
            let options = ServeOptions {
                listen: args.listen,
                tls: args.tls_cert.zip(args.tls_key),
                api: ApiSettings {
                    heartbeat_interval: args.heartbeat_interval,
                    offline_after: args.offline_after,
                    device_token_ttl: args.device_token_ttl,
                    ..ApiSettings::default()
                },
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
