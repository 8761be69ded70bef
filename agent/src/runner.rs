//! The agent's life: enroll once, authenticate when needed, heartbeat forever, run what the server
//! asks. One thread, blocking I/O; every failure ends in a bounded, jittered wait.

use crate::backoff::{jittered, Backoff};
use crate::client::{unix_now, Client, ClientError};
use crate::deployments::Deployments;
use crate::state::{AgentState, StateDir};
use crate::telemetry::Sampler;
use crate::vm_links::VmLinks;
use crate::{error, identity, info, warn};
use anyhow::Context as _;
use kernex_protocol::wire::{
    codes, AuthRequest, AuthResponse, CommandAck, CommandOutcome, CommandSpec, DeviceCommand,
    EnrollRequest, EnrollResponse, HeartbeatRequest, HeartbeatResponse, SetIntervalArgs,
    VmCallArgs, MAX_COMMAND_OUTPUT,
};
use kernex_protocol::{BootstrapConfig, DeviceKey};
use rand::RngCore as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Everything `kernex-agent run` needs, resolved from the command line.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub bootstrap: PathBuf,
    pub state_dir: PathBuf,
    /// Overrides hardware-id detection.
    pub hardware_id: Option<String>,
    /// Longest wait between retries.
    pub max_backoff: Duration,
}

/// Why `run` returned instead of running forever.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// The server deregistered the device; the agent will not run again from this state.
    Deregistered,
}

/// Interval used before the server has suggested one.
const DEFAULT_INTERVAL_S: u32 = 60;

pub fn run(options: &RunOptions) -> anyhow::Result<Exit> {
    let bootstrap = BootstrapConfig::load(&options.bootstrap)?;
    let dir = StateDir::open(&options.state_dir)?;
    let mut state = dir.load()?;
    if state.deregistered {
        warn!(
            "this appliance was deregistered; remove {} to enroll it again",
            dir.state_file().display()
        );
        return Ok(Exit::Deregistered);
    }
    if state
        .tenant
        .as_deref()
        .is_some_and(|t| t != bootstrap.tenant)
        || state
            .server_url
            .as_deref()
            .is_some_and(|u| u != bootstrap.server_url)
    {
        warn!("bootstrap config names a different tenant or server than the enrolled identity; enrolling again");
        state.device_id = None;
    }
    let key = identity::load_or_generate_key(&dir)?;
    let hardware_id = match &options.hardware_id {
        Some(id) => id.clone(),
        None => identity::detect_hardware_id()?,
    };
    let deployments =
        Deployments::start(&options.state_dir, &bootstrap, state.publisher_keys.clone())?;
    let vm_links = VmLinks::default();
    vm_links.configure(state.vms.as_deref().unwrap_or(&bootstrap.vm));
    let (call_done, call_results) = std::sync::mpsc::channel();
    let mut agent = Agent {
        deployments,
        client: Client::new(&bootstrap)
            .with_context(|| format!("configuring TLS from {}", options.bootstrap.display()))?,
        bootstrap,
        bootstrap_path: options.bootstrap.clone(),
        key,
        hardware_id,
        dir,
        state,
        sampler: Sampler::new(options.state_dir.clone())
            .with_bundles(options.state_dir.join("bundles")),
        session: None,
        trial: crate::selfupdate::trial_version(),
        state_dir: options.state_dir.clone(),
        vm_links,
        calls_in_flight: std::collections::HashSet::new(),
        call_done,
        call_results,
    };
    info!(
        "kernex-agent {} starting for tenant {} at {}",
        crate::VERSION,
        agent.bootstrap.tenant,
        agent.bootstrap.server_url
    );
    let mut backoff = Backoff::new(Duration::from_secs(1), options.max_backoff);
    loop {
        match agent.step() {
            Ok(next) => {
                backoff.reset();
                agent.wait_for_results(next)?;
            }
            Err(Failure::Deregistered) => {
                agent.forget_identity()?;
                warn!("the server deregistered this device; stopping");
                return Ok(Exit::Deregistered);
            }
            Err(Failure::Retry { error, retry_after }) => {
                let delay = backoff.next_delay(retry_after);
                error!("{error:#}; retrying in {delay:.1?}");
                agent.state.last_error = Some(format!("{error:#}"));
                agent.save()?;
                std::thread::sleep(delay);
            }
            Err(Failure::Fatal(e)) => return Err(e),
        }
    }
}

enum Failure {
    Deregistered,
    /// Worth retrying after a backoff: network, server errors, refused tokens (the bootstrap file
    /// may be fixed meanwhile).
    Retry {
        error: anyhow::Error,
        retry_after: Option<Duration>,
    },
    /// Local trouble (state cannot be written): systemd restarts us.
    Fatal(anyhow::Error),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Failure {
        if e.code() == Some(codes::DEVICE_DEREGISTERED) {
            return Failure::Deregistered;
        }
        let retry_after = e.retry_after();
        Failure::Retry {
            error: e.into(),
            retry_after,
        }
    }
}

impl From<crate::state::StateError> for Failure {
    fn from(e: crate::state::StateError) -> Failure {
        Failure::Fatal(e.into())
    }
}

struct Session {
    token: String,
    /// Re-authenticate a little before this.
    expires: Instant,
}

struct Agent {
    deployments: Deployments,
    bootstrap: BootstrapConfig,
    bootstrap_path: PathBuf,
    client: Client,
    key: DeviceKey,
    hardware_id: String,
    dir: StateDir,
    state: AgentState,
    sampler: Sampler,
    session: Option<Session>,
    /// This agent is a self-update on trial: its first heartbeat confirms it.
    trial: Option<String>,
    state_dir: PathBuf,
    vm_links: VmLinks,
    /// `vm.call`s being relayed by their own threads; results come back on `call_results`.
    calls_in_flight: std::collections::HashSet<String>,
    call_done: std::sync::mpsc::Sender<CommandAck>,
    call_results: std::sync::mpsc::Receiver<CommandAck>,
}

impl Agent {
    /// Sleeps until the next round, or until a relayed `vm.call` finished (its result then goes
    /// out with a heartbeat at once).
    fn wait_for_results(&mut self, pause: Duration) -> Result<(), crate::state::StateError> {
        let Ok(first) = self.call_results.recv_timeout(pause) else {
            return Ok(());
        };
        for ack in std::iter::once(first).chain(self.call_results.try_iter()) {
            self.calls_in_flight.remove(&ack.id);
            self.state.pending_acks.push(ack);
        }
        self.save()
    }

    /// One round: make sure we are enrolled and authenticated, heartbeat, run commands. Returns how
    /// long to wait before the next round.
    fn step(&mut self) -> Result<Duration, Failure> {
        let device_id = match self.state.device_id.clone() {
            Some(id) => id,
            None => self.enroll()?,
        };
        let token = match &self.session {
            Some(s) if s.expires > Instant::now() => s.token.clone(),
            _ => match self.authenticate(&device_id) {
                Ok(token) => token,
                Err(e) => return Err(self.recover(e)),
            },
        };
        self.heartbeat(&token)
    }

    /// Turns "the server lost or expired our identity" into the next step's work.
    fn recover(&mut self, e: ClientError) -> Failure {
        match e.code() {
            Some(codes::UNKNOWN_DEVICE) => {
                warn!(
                    "the server does not know device {:?}; enrolling again",
                    self.state.device_id
                );
                self.state.device_id = None;
                self.session = None;
                Failure::Retry {
                    error: e.into(),
                    retry_after: Some(Duration::from_millis(100)),
                }
            }
            Some(codes::INVALID_DEVICE_TOKEN) => {
                self.session = None;
                Failure::Retry {
                    error: e.into(),
                    retry_after: None,
                }
            }
            _ => e.into(),
        }
    }

    fn enroll(&mut self) -> Result<String, Failure> {
        // Re-read the bootstrap file: an operator may have put a fresh token in it since start-up.
        if let Ok(fresh) = BootstrapConfig::load(&self.bootstrap_path) {
            self.bootstrap.token = fresh.token;
        }
        let request = EnrollRequest {
            tenant: self.bootstrap.tenant.clone(),
            token: self.bootstrap.token.clone(),
            hardware_id: self.hardware_id.clone(),
            public_key: self.key.public().to_pem(),
            facts: identity::facts(),
            timestamp: self.client.server_now_s(),
        };
        let response: EnrollResponse = self.client.post_signed("/enroll", &request, &self.key)?;
        info!(
            "enrolled as device {} in tenant {} ({})",
            response.device_id,
            response.tenant,
            if response.created {
                "new device"
            } else {
                "existing device"
            }
        );
        self.state.device_id = Some(response.device_id.clone());
        self.state.tenant = Some(self.bootstrap.tenant.clone());
        self.state.server_url = Some(self.bootstrap.server_url.clone());
        self.state.enrolled_at = Some(unix_now());
        self.state.publisher_keys = response.publisher_keys;
        self.deployments
            .set_publisher_keys(self.state.publisher_keys.clone());
        self.save()?;
        Ok(response.device_id)
    }

    fn authenticate(&mut self, device_id: &str) -> Result<String, ClientError> {
        let mut nonce = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let request = AuthRequest {
            device_id: device_id.to_owned(),
            timestamp: self.client.server_now_s(),
            nonce: kernex_protocol::token::hex(&nonce),
        };
        let response: AuthResponse = self.client.post_signed("/auth", &request, &self.key)?;
        // Renew at 80 % of the lifetime so a heartbeat never carries an expired token.
        let lifetime = Duration::from_secs(response.expires_in_s).mul_f64(0.8);
        self.session = Some(Session {
            token: response.token.clone(),
            expires: Instant::now() + lifetime,
        });
        self.deployments.set_token(&response.token);
        if response.publisher_keys != self.state.publisher_keys {
            self.state.publisher_keys = response.publisher_keys;
            self.deployments
                .set_publisher_keys(self.state.publisher_keys.clone());
            if let Err(e) = self.save() {
                warn!("keeping the publisher keys failed: {e}");
            }
        }
        Ok(response.token)
    }

    fn current_interval(&self) -> u32 {
        self.state
            .interval_override_s
            .or(self.state.interval_s)
            .unwrap_or(DEFAULT_INTERVAL_S)
    }

    fn heartbeat(&mut self, token: &str) -> Result<Duration, Failure> {
        let telemetry = self.sampler.sample();
        let request = HeartbeatRequest {
            agent_version: crate::VERSION.to_owned(),
            interval_s: self.state.interval_override_s,
            telemetry: telemetry.clone(),
            acks: self.state.pending_acks.clone(),
            vms: self.vm_links.statuses(),
        };
        let response: HeartbeatResponse =
            match self.client.post_bearer("/heartbeat", &request, token) {
                Ok(response) => response,
                Err(e) => return Err(self.recover(e)),
            };
        // The server committed the acks with this heartbeat.
        let acked: Vec<String> = request.acks.iter().map(|a| a.id.clone()).collect();
        self.state.pending_acks.retain(|a| !acked.contains(&a.id));
        for id in &acked {
            self.state.remember_done(id);
        }
        self.state.interval_s = Some(response.interval_s);
        self.state.last_heartbeat_at = Some(unix_now());
        self.state.last_telemetry = Some(telemetry);
        self.state.last_error = None;
        if let Some(version) = self.trial.take() {
            crate::selfupdate::confirm(&self.state_dir, &version);
        }
        let ran = self.run_commands(&response.commands);
        // Results must be on disk before they are reported: a state we cannot write is fatal.
        self.save()?;
        if ran > 0 {
            // Report results now rather than one interval later.
            return Ok(Duration::ZERO);
        }
        Ok(jittered(Duration::from_secs(u64::from(
            self.current_interval(),
        ))))
    }

    /// Runs the commands not run before; returns how many ran.
    fn run_commands(&mut self, commands: &[DeviceCommand]) -> usize {
        let mut ran = 0;
        for command in commands {
            if self.state.is_done(&command.id) || self.calls_in_flight.contains(&command.id) {
                continue; // re-delivery of something already run: its ack is on its way
            }
            if let Ok(CommandSpec::VmCall(args)) = CommandSpec::parse(&command.kind, &command.args)
            {
                self.relay_vm_call(&command.id, args);
                continue;
            }
            let (outcome, output) = match CommandSpec::parse(&command.kind, &command.args) {
                Ok(spec) => self.execute(&spec),
                Err(message) => (CommandOutcome::Failed, message),
            };
            info!(
                "command {} ({}): {:?}: {}",
                command.id, command.kind, outcome, output
            );
            let output = kernex_protocol::truncate_utf8(&output, MAX_COMMAND_OUTPUT).to_owned();
            self.state.pending_acks.push(CommandAck {
                id: command.id.clone(),
                outcome,
                output,
            });
            ran += 1;
        }
        ran
    }

    fn execute(&mut self, spec: &CommandSpec) -> (CommandOutcome, String) {
        match spec {
            CommandSpec::Ping => (CommandOutcome::Succeeded, format!("pong {}", unix_now())),
            CommandSpec::SetInterval(SetIntervalArgs { seconds }) => {
                self.state.interval_override_s = Some(*seconds);
                (
                    CommandOutcome::Succeeded,
                    format!("heartbeat interval set to {seconds}s"),
                )
            }
            // The identity is forgotten when the server confirms (it answers the ack with
            // `device_deregistered`), so a lost ack cannot strand a half-deregistered device.
            CommandSpec::Deregister => (CommandOutcome::Succeeded, "deregistering".to_owned()),
            // Queued for the deployment thread; its progress goes to the deployment's status.
            CommandSpec::Deploy(args) => match self.deployments.enqueue(args) {
                Ok(message) => (CommandOutcome::Succeeded, message),
                Err(message) => (CommandOutcome::Failed, message),
            },
            CommandSpec::VmConfigure(args) => {
                self.state.vms = Some(args.vms.clone());
                self.vm_links.configure(&args.vms);
                let names: Vec<&str> = args.vms.iter().map(|vm| vm.name.as_str()).collect();
                (
                    CommandOutcome::Succeeded,
                    format!("user VMs now: {}", names.join(", ")),
                )
            }
            // Relayed by `relay_vm_call` before it gets here.
            CommandSpec::VmCall(_) => (CommandOutcome::Failed, "vm.call not relayed".into()),
        }
    }

    /// Relays a `vm.call` on a thread of its own (a slow VM must not hold up heartbeats); the
    /// result, or the error with its `vm_*` code, is the command's output as JSON.
    fn relay_vm_call(&mut self, id: &str, args: VmCallArgs) {
        self.calls_in_flight.insert(id.to_owned());
        let (links, done, id) = (self.vm_links.clone(), self.call_done.clone(), id.to_owned());
        // Room for the JSON around the output inside the ack.
        let max_output = (MAX_COMMAND_OUTPUT - 512) as u64;
        let spawned = std::thread::Builder::new()
            .name("vm-call".into())
            .spawn(move || {
                let params = kernex_protocol::vmlink::CallParams {
                    action: args.action.clone(),
                    args: args.args.clone(),
                    timeout_ms: u64::from(args.timeout_s) * 1000,
                    max_output_bytes: max_output,
                };
                let (outcome, output) = match links.call(&args.vm, params) {
                    Ok(result) => (
                        CommandOutcome::Succeeded,
                        serde_json::json!({"vm": args.vm, "action": args.action, "result": result}),
                    ),
                    Err(fault) => (
                        CommandOutcome::Failed,
                        serde_json::json!({"vm": args.vm, "action": args.action, "error": fault}),
                    ),
                };
                info!(
                    "command {id} (vm.call {} {}): {outcome:?}",
                    args.vm, args.action
                );
                let output = output.to_string();
                let _ = done.send(CommandAck {
                    id,
                    outcome,
                    output: kernex_protocol::truncate_utf8(&output, MAX_COMMAND_OUTPUT).to_owned(),
                });
            });
        if let Err(e) = spawned {
            warn!("relaying a vm.call: {e}");
        }
    }

    /// Deregistered: drop the key and device id, keep a marker so a restart does not re-enroll.
    fn forget_identity(&mut self) -> anyhow::Result<()> {
        let key = self.dir.key_file();
        if let Err(e) = std::fs::remove_file(&key) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(e).with_context(|| format!("removing device key {}", key.display()));
            }
        }
        self.state.deregistered = true;
        self.state.device_id = None;
        self.state.pending_acks.clear();
        self.save()?;
        Ok(())
    }

    fn save(&self) -> Result<(), crate::state::StateError> {
        self.dir.save(&self.state)
    }
}
