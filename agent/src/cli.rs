//! Command line: `run` (the service) and `status` (what the agent knows, for people and scripts).

use crate::runner::{run, Exit, RunOptions};
use crate::state::StateDir;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "kernex-agent",
    version = crate::VERSION,
    about = "Kernex appliance agent: enrollment, heartbeats, commands, bundles, user-VM links."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Enroll (first start) and heartbeat until stopped or deregistered.
    Run {
        /// Bootstrap config written by imagebuilder.
        #[arg(long, default_value = "/etc/kernex/bootstrap.toml")]
        bootstrap: PathBuf,
        /// Where the device key and state live.
        #[arg(long, default_value = "/var/lib/kernex")]
        state_dir: PathBuf,
        /// Use this hardware id instead of /etc/machine-id or the DMI product uuid.
        #[arg(long)]
        hardware_id: Option<String>,
        /// Longest wait between retries when the server cannot be reached.
        #[arg(long, default_value = "5m", value_parser = humantime_like)]
        max_backoff: Duration,
    },
    /// Inside a user VM: answer the appliance's agent (health, info, allowed actions).
    VmEndpoint {
        /// `tcp://HOST:PORT` (port 0: any free port, printed at start) or `vsock://CID:PORT`.
        #[arg(long)]
        listen: crate::vm_endpoint::Address,
        /// File holding the secret shared with the appliance (the VM's `secret` in its
        /// bootstrap file); at least 16 bytes.
        #[arg(long)]
        secret_file: PathBuf,
        /// An action the appliance may run, `NAME=SHELL COMMAND` (arguments arrive as $1, $2…);
        /// repeatable. `hostname` is built in.
        #[arg(long = "action", value_parser = parse_action)]
        actions: Vec<(String, String)>,
        /// Links served at once.
        #[arg(long, default_value_t = 8)]
        max_connections: usize,
    },
    /// Print the enrolled identity, last heartbeat and last error.
    Status {
        #[arg(long, default_value = "/var/lib/kernex")]
        state_dir: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

fn parse_action(s: &str) -> Result<(String, String), String> {
    let (name, command) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected NAME=COMMAND"))?;
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !valid || command.trim().is_empty() {
        return Err(format!(
            "`{s}`: the name is letters, digits, `-`, `_`, `.`; the command is not empty"
        ));
    }
    Ok((name.to_owned(), command.to_owned()))
}

/// `500ms`, `30s`, `5m`, `1h`.
fn humantime_like(s: &str) -> Result<Duration, String> {
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{s}`: expected a number and a unit (ms, s, m, h)"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("`{s}`: unknown unit `{unit}` (ms, s, m, h)")),
    }
}

/// Runs the parsed command; the exit code for `main`.
pub fn dispatch(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Run {
            bootstrap,
            state_dir,
            hardware_id,
            max_backoff,
        } => {
            // A pending self-update, or a confirmed newer agent, runs instead of this binary.
            if let Some(code) = crate::selfupdate::launch(&state_dir) {
                return Ok(code);
            }
            let options = RunOptions {
                bootstrap,
                state_dir,
                hardware_id,
                max_backoff,
            };
            match run(&options)? {
                // Exit 0 so systemd's Restart=on-failure leaves a deregistered appliance stopped.
                Exit::Deregistered => Ok(0),
            }
        }
        Command::VmEndpoint {
            listen,
            secret_file,
            actions,
            max_connections,
        } => {
            let options = crate::vm_endpoint::EndpointOptions {
                listen,
                secret: crate::vm_endpoint::read_secret(&secret_file)?,
                actions: actions.into_iter().collect(),
                max_connections,
            };
            crate::vm_endpoint::serve(options)?;
            Ok(0)
        }
        Command::Status { state_dir, json } => status(&state_dir, json),
    }
}

fn status(state_dir: &std::path::Path, json: bool) -> anyhow::Result<u8> {
    let dir = StateDir::existing(state_dir);
    let state = dir.load()?;
    let key = std::fs::read_to_string(dir.key_file())
        .ok()
        .and_then(|pem| kernex_protocol::DeviceKey::from_pkcs8_pem(&pem).ok())
        .map(|k| k.public().fingerprint());
    if json {
        let mut value = serde_json::to_value(&state)?;
        // Link secrets stay in the state file.
        if let Some(vms) = value["vms"].as_array_mut() {
            for vm in vms {
                vm["secret"] = serde_json::json!("(hidden)");
            }
        }
        value["key_fingerprint"] = serde_json::json!(key);
        value["state_file"] = serde_json::json!(dir.state_file());
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(0);
    }
    let when = |t: Option<i64>| {
        t.map(|s| httpdate::fmt_http_date(std::time::UNIX_EPOCH + Duration::from_secs(s as u64)))
            .unwrap_or_else(|| "never".to_owned())
    };
    let state_word = if state.deregistered {
        "deregistered"
    } else if state.device_id.is_some() {
        "enrolled"
    } else {
        "not enrolled"
    };
    println!("state:          {state_word}");
    println!(
        "device id:      {}",
        state.device_id.as_deref().unwrap_or("-")
    );
    println!("tenant:         {}", state.tenant.as_deref().unwrap_or("-"));
    println!(
        "server:         {}",
        state.server_url.as_deref().unwrap_or("-")
    );
    println!("key:            {}", key.as_deref().unwrap_or("none"));
    println!("enrolled at:    {}", when(state.enrolled_at));
    println!("last heartbeat: {}", when(state.last_heartbeat_at));
    println!(
        "interval:       {}",
        state
            .interval_override_s
            .or(state.interval_s)
            .map_or("-".to_owned(), |s| format!("{s}s"))
    );
    println!("pending acks:   {}", state.pending_acks.len());
    println!(
        "last error:     {}",
        state.last_error.as_deref().unwrap_or("-")
    );
    Ok(0)
}
