//! `imagebuilder build | render | inspect`.

use crate::build::{build, BuildOptions, IsoManifest};
use crate::render::{render, Templates};
use crate::tenant::Tenant;
use crate::{iso, validate};
use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};

#[derive(Debug, Parser)]
#[command(
    name = "imagebuilder",
    version,
    about = "Turns an Ubuntu 24.04 live-server ISO into a tenant's zero-touch autoinstall ISO."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct TenantArgs {
    /// Tenant name: reads TENANTS_DIR/NAME.toml.
    #[arg(long)]
    pub tenant: String,
    #[arg(long, default_value = "tenants")]
    pub tenants_dir: PathBuf,
    /// Templates directory (default: the autoinstall/ templates built into imagebuilder).
    #[arg(long)]
    pub templates: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build NAME.iso (+ .sha256 + .build.json) from a base ISO.
    Build {
        #[command(flatten)]
        tenant: TenantArgs,
        /// The stock ubuntu-24.04.x-live-server-amd64.iso.
        #[arg(long)]
        base: PathBuf,
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Replace existing output files.
        #[arg(long)]
        force: bool,
        /// The static kernex-agent binary to install.
        #[arg(
            long,
            env = "KERNEX_AGENT_BIN",
            default_value = "target/x86_64-unknown-linux-musl/agent/kernex-agent"
        )]
        agent: PathBuf,
        /// Files laid into every installed system (the kernex-agent systemd unit).
        #[arg(long, default_value = "overlays")]
        overlays: PathBuf,
        /// Where prepared ISOs are cached (default: $XDG_CACHE_HOME/kernex/imagebuilder).
        #[arg(long, env = "KERNEX_IMAGEBUILDER_CACHE")]
        cache_dir: Option<PathBuf>,
        /// Do not use or fill the cache (overrides --cache-dir): remaster the base for this build only.
        #[arg(long)]
        no_cache: bool,
        /// Print the build record as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write only the seed files (user-data, meta-data, bootstrap.toml) for review or a CIDATA stick.
    Render {
        #[command(flatten)]
        tenant: TenantArgs,
        #[arg(long)]
        out: PathBuf,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Show what an ISO built by imagebuilder carries (never the token) and its boot records.
    Inspect {
        iso: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn templates(args: &TenantArgs) -> anyhow::Result<Templates> {
    match &args.templates {
        Some(dir) => Templates::from_dir(dir),
        None => Ok(Templates::builtin()),
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Build {
            tenant,
            base,
            out,
            force,
            agent,
            overlays,
            cache_dir,
            no_cache,
            json,
        } => {
            let options = BuildOptions {
                templates: templates(&tenant)?,
                tenant: tenant.tenant,
                base,
                tenants_dir: tenant.tenants_dir,
                out_dir: out,
                force,
                agent,
                overlays,
                cache_dir: if no_cache {
                    None
                } else {
                    cache_dir.or_else(crate::prepared::default_cache_dir)
                },
            };
            let record = build(&options)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&record)?);
            } else {
                println!("{}  {}", record.iso_sha256, record.iso.display());
                println!(
                    "tenant {}, token {}, agent {}, prepared ISO {} ({})",
                    record.tenant,
                    record.token_id,
                    record.agent_version,
                    &record.prepared.key[..16],
                    if record.prepared.reused {
                        "reused from the cache"
                    } else {
                        "built, now cached"
                    }
                );
            }
            Ok(())
        }
        Command::Render {
            tenant: args,
            out,
            force,
        } => {
            let templates = templates(&args)?;
            let tenant = Tenant::load(&args.tenants_dir, &args.tenant)?;
            let token = tenant.bootstrap_token()?;
            let seed = render(&templates, &tenant, &token)?;
            validate::validate_user_data(&seed.user_data, &seed.meta_data)?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            for (name, text, mode) in [
                ("user-data", &seed.user_data, 0o644),
                ("meta-data", &seed.meta_data, 0o644),
                ("bootstrap.toml", &seed.bootstrap_toml, 0o600),
            ] {
                write_new(&out.join(name), text, mode, force)?;
            }
            println!(
                "wrote user-data, meta-data and bootstrap.toml to {}",
                out.display()
            );
            println!("kernel command line: {}", seed.kernel_args);
            Ok(())
        }
        Command::Inspect { iso: path, json } => inspect(&path, json),
    }
}

fn write_new(path: &Path, text: &str, mode: u32, force: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    if path.exists() && !force {
        anyhow::bail!(
            "{} already exists; pass --force to replace it",
            path.display()
        );
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

fn inspect(path: &Path, json: bool) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let extracted =
        iso::extract(path, &["/kernex/manifest.json"], dir.path()).with_context(|| {
            format!(
                "{} was not built by imagebuilder (no /kernex/manifest.json)",
                path.display()
            )
        })?;
    let manifest: IsoManifest = serde_json::from_str(&std::fs::read_to_string(&extracted[0])?)
        .with_context(|| format!("{}: unreadable /kernex/manifest.json", path.display()))?;
    let boot = iso::boot_report(path)?;
    if json {
        let mut value = serde_json::to_value(&manifest)?;
        value["boot_records"] = serde_json::Value::String(boot);
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!("tenant:          {}", manifest.tenant);
        println!("server:          {}", manifest.server_url);
        println!("token id:        {}", manifest.token_id);
        println!("agent version:   {}", manifest.agent_version);
        println!("templates:       {}", manifest.templates_sha256);
        println!("boot records:\n{}", boot.trim_end());
    }
    Ok(())
}
