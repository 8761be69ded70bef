//! Deployments on the appliance. A `deploy` command only queues a job on disk (so the command can
//! be acknowledged at once, and a restart finds the job again); a worker thread of its own
//! downloads the bundle (resuming), verifies it, hands the archive to the [`Deployer`] and reports
//! every state change to the server, retrying until the server has it. Heartbeats go on meanwhile.
//!
//! Layout under `<state-dir>/deployments/`:
//! ```text
//! queue/<deployment>.json     the job (DeployArgs), removed once its final report is on disk
//! downloads/<bundle>.part     the packed file as far as it got; <bundle>.etag beside it
//! work/<deployment>.tar.gz    the verified archive handed to the deployer
//! reports/<deployment>.json   the latest report not yet acknowledged by the server
//! ```

use crate::client::{Client, ClientError};
use crate::deploy::{Deployer, Job};
use crate::state::write_atomic;
use crate::{info, warn};
use kernex_protocol::bundle::{read_sealed, PublisherPublicKey};
use kernex_protocol::wire::{
    DeployArgs, DeploymentReport, DeploymentReportResponse, DeploymentState,
};
use kernex_protocol::BootstrapConfig;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// How long a download keeps retrying a server that is unreachable or failing before the
/// deployment is reported failed.
const DOWNLOAD_PATIENCE: Duration = Duration::from_secs(30 * 60);

/// Handle to the worker; the runner feeds it jobs, the session token and the trusted keys.
#[derive(Debug, Clone)]
pub struct Deployments {
    dir: PathBuf,
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    inputs: Mutex<Inputs>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct Inputs {
    token: Option<String>,
    publisher_keys: Vec<String>,
    /// Bumped on every change so the worker notices work without polling the disk too often.
    generation: u64,
}

impl Deployments {
    /// Starts the worker. `bundles_root` is where the deployer keeps installed versions.
    pub fn start(
        state_dir: &Path,
        bootstrap: &BootstrapConfig,
        publisher_keys: Vec<String>,
    ) -> anyhow::Result<Deployments> {
        let dir = state_dir.join("deployments");
        for sub in ["queue", "downloads", "work", "reports"] {
            std::fs::create_dir_all(dir.join(sub))
                .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.join(sub).display()))?;
        }
        let deployments = Deployments {
            dir: dir.clone(),
            shared: Arc::new(Shared::default()),
        };
        deployments.set_publisher_keys(publisher_keys);
        let worker = Worker {
            dir,
            client: Client::new(bootstrap)?,
            deployer: Deployer::new(state_dir.join("bundles")),
            shared: deployments.shared.clone(),
        };
        std::thread::Builder::new()
            .name("deployments".into())
            .spawn(move || worker.run())
            .map_err(|e| anyhow::anyhow!("starting the deployment thread: {e}"))?;
        Ok(deployments)
    }

    /// Queues a job; idempotent (a re-delivered command finds its job already there).
    pub fn enqueue(&self, args: &DeployArgs) -> Result<String, String> {
        if !is_safe_id(&args.deployment) || !is_safe_id(&args.bundle) {
            return Err("deploy: malformed deployment or bundle id".into());
        }
        let path = self
            .dir
            .join("queue")
            .join(format!("{}.json", args.deployment));
        if !path.exists() {
            let json = serde_json::to_vec_pretty(args).map_err(|e| e.to_string())?;
            write_atomic(&path, &json, 0o600).map_err(|e| e.to_string())?;
        }
        self.poke(|_| {});
        Ok(format!(
            "deployment {} of {} {} accepted",
            args.deployment, args.name, args.version
        ))
    }

    pub fn set_token(&self, token: &str) {
        self.poke(|inputs| inputs.token = Some(token.to_owned()));
    }

    pub fn set_publisher_keys(&self, keys: Vec<String>) {
        self.poke(|inputs| inputs.publisher_keys = keys);
    }

    fn poke(&self, change: impl FnOnce(&mut Inputs)) {
        let mut inputs = self
            .shared
            .inputs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        change(&mut inputs);
        inputs.generation += 1;
        self.shared.changed.notify_all();
    }
}

/// Ids become file names: letters, digits and '-' only.
fn is_safe_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

struct Worker {
    dir: PathBuf,
    client: Client,
    deployer: Deployer,
    shared: Arc<Shared>,
}

/// How a job ended before the deployer took over.
enum Early {
    Failed(String),
    Cancelled,
}

impl Worker {
    fn run(self) {
        // Whatever a crash interrupted: the deployer puts the appliance back on one whole version
        // and says what happened; those reports go out first.
        for (deployment, report) in self.deployer.recover() {
            warn!("deployment {deployment}: {}", report.message);
            self.save_report(&deployment, &report);
            self.finish_job(&deployment);
        }
        let mut seen = 0;
        loop {
            let token = self.wait_for_work(&mut seen);
            self.flush_reports(&token);
            // Drain the queue: one job after the other, each with the newest token.
            while let Some(args) = self.next_job() {
                let token = self.token().unwrap_or_else(|| token.clone());
                self.run_job(&args, &token);
                self.flush_reports(&token);
            }
        }
    }

    /// Blocks until there is a session token and either an input changed (a new job, token or
    /// key: at once) or work waits on disk (a report the server did not take, a job from before a
    /// restart: after a pause, so an unreachable server is not retried in a tight loop).
    fn wait_for_work(&self, seen: &mut u64) -> String {
        let mut inputs = self
            .shared
            .inputs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        loop {
            if let Some(token) = inputs.token.clone() {
                if inputs.generation != *seen {
                    *seen = inputs.generation;
                    return token;
                }
            }
            let (guard, waited) = self
                .shared
                .changed
                .wait_timeout(inputs, Duration::from_secs(5))
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            inputs = guard;
            if let Some(token) = inputs.token.clone() {
                if waited.timed_out() && self.has_work() {
                    return token;
                }
            }
        }
    }

    /// The newest session token (the runner renews it while long jobs run).
    fn token(&self) -> Option<String> {
        self.shared
            .inputs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .token
            .clone()
    }

    fn has_work(&self) -> bool {
        ["queue", "reports"].iter().any(|sub| {
            std::fs::read_dir(self.dir.join(sub))
                .map(|mut entries| entries.next().is_some())
                .unwrap_or(false)
        })
    }

    fn next_job(&self) -> Option<DeployArgs> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(self.dir.join("queue"))
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        names.sort();
        for path in names {
            match std::fs::read(&path)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<DeployArgs>(&bytes).ok())
            {
                Some(args) => return Some(args),
                None => {
                    warn!("dropping unreadable deployment job {}", path.display());
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        None
    }

    fn run_job(&self, args: &DeployArgs, token: &str) {
        info!(
            "deployment {}: {} {} starting",
            args.deployment, args.name, args.version
        );
        let result = self.fetch_and_verify(args, token);
        let final_report = match result {
            Ok(archive) => {
                let job = Job {
                    deployment_id: args.deployment.clone(),
                    archive: archive.clone(),
                    allow_downgrade: args.allow_downgrade,
                    device_class: args.device_class.clone(),
                };
                let report = self.deployer.run(&job, &mut |r: &DeploymentReport| {
                    // The final report goes out below, after it is on disk.
                    r.state.is_terminal() || !self.report(&args.deployment, token, r)
                });
                let _ = std::fs::remove_file(&archive);
                report
            }
            Err(Early::Cancelled) => DeploymentReport {
                state: DeploymentState::Cancelled,
                message: "cancelled before installation".into(),
                log_tail: String::new(),
            },
            Err(Early::Failed(message)) => DeploymentReport {
                state: DeploymentState::Failed,
                message,
                log_tail: String::new(),
            },
        };
        info!(
            "deployment {}: {} ({})",
            args.deployment,
            final_report.state.as_str(),
            final_report.message
        );
        if final_report.state == DeploymentState::HealthChecking {
            // A new agent is staged: the job is done here, its outcome is the supervisor's to
            // report (see `selfupdate`).
            self.finish_job(&args.deployment);
            self.cleanup_download(&args.bundle);
            let failed = crate::selfupdate::restart();
            warn!("{failed}; the new agent starts at the next restart");
            return;
        }
        // The final report is on disk before the job is gone: it survives a crash from here on.
        self.save_report(&args.deployment, &final_report);
        self.finish_job(&args.deployment);
        self.cleanup_download(&args.bundle);
    }

    /// Downloads (resuming) and verifies; returns the archive ready for the deployer.
    fn fetch_and_verify(&self, args: &DeployArgs, token: &str) -> Result<PathBuf, Early> {
        if self.report(
            &args.deployment,
            token,
            &state(DeploymentState::Downloading, ""),
        ) {
            return Err(Early::Cancelled);
        }
        let part = self
            .dir
            .join("downloads")
            .join(format!("{}.part", args.bundle));
        let etag_file = part.with_extension("etag");
        let started = std::time::Instant::now();
        let mut delay = Duration::from_secs(1);
        loop {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&part)
                .map_err(|e| Early::Failed(format!("opening {}: {e}", part.display())))?;
            let etag = std::fs::read_to_string(&etag_file).ok();
            match self
                .client
                .download(&args.url, token, &mut file, etag.as_deref())
            {
                Ok(etag) => {
                    if let Some(etag) = etag {
                        let _ = std::fs::write(&etag_file, etag);
                    }
                    break;
                }
                Err(ClientError::Status {
                    status, message, ..
                }) if (400..500).contains(&status) && status != 408 && status != 429 => {
                    return Err(Early::Failed(format!(
                        "downloading the bundle: HTTP {status}: {message}"
                    )));
                }
                Err(e) => {
                    if started.elapsed() > DOWNLOAD_PATIENCE {
                        return Err(Early::Failed(format!("downloading the bundle: {e}")));
                    }
                    warn!("deployment {}: {e}; resuming in {delay:?}", args.deployment);
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
        let have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        if have != args.size {
            let _ = std::fs::remove_file(&part);
            return Err(Early::Failed(format!(
                "downloaded {have} bytes, the server announced {}",
                args.size
            )));
        }
        if self.report(
            &args.deployment,
            token,
            &state(DeploymentState::Verifying, ""),
        ) {
            return Err(Early::Cancelled);
        }
        let sealed = read_sealed(&part).map_err(|e| Early::Failed(e.to_string()))?;
        if sealed.sha256 != args.sha256 {
            let _ = std::fs::remove_file(&part);
            return Err(Early::Failed(format!(
                "the bundle's SHA-256 is {}, the deployment expects {}",
                sealed.sha256, args.sha256
            )));
        }
        // The keys the server sent with the job are the tenant's current ones; those from the
        // last `/auth` only stand in for a server that sent none.
        let pems = if args.publisher_keys.is_empty() {
            self.publisher_keys()
        } else {
            args.publisher_keys.clone()
        };
        let trusted: Vec<PublisherPublicKey> = pems
            .iter()
            .filter_map(|pem| PublisherPublicKey::from_pem(pem).ok())
            .collect();
        let publisher = sealed
            .verify(&trusted)
            .map_err(|e| Early::Failed(e.to_string()))?;
        info!(
            "deployment {}: signature by {publisher} verified",
            args.deployment
        );
        let archive = self
            .dir
            .join("work")
            .join(format!("{}.tar.gz", args.deployment));
        copy_prefix(&part, &archive, sealed.archive_bytes)
            .map_err(|e| Early::Failed(format!("preparing {}: {e}", archive.display())))?;
        Ok(archive)
    }

    fn publisher_keys(&self) -> Vec<String> {
        self.shared
            .inputs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .publisher_keys
            .clone()
    }

    /// Sends a report now (a few tries); if the server does not take it, it waits on disk for
    /// [`Worker::flush_reports`]. Returns true when the server says the deployment was cancelled.
    fn report(&self, deployment: &str, token: &str, report: &DeploymentReport) -> bool {
        match self.send(deployment, token, report) {
            Ok(response) => response.cancelled,
            Err(e) => {
                warn!(
                    "deployment {deployment}: reporting {}: {e}",
                    report.state.as_str()
                );
                self.save_report(deployment, report);
                false
            }
        }
    }

    fn send(
        &self,
        deployment: &str,
        token: &str,
        report: &DeploymentReport,
    ) -> Result<DeploymentReportResponse, ClientError> {
        self.client
            .post_bearer(&format!("/deployments/{deployment}/status"), report, token)
    }

    fn save_report(&self, deployment: &str, report: &DeploymentReport) {
        if let Err(e) = write_report(&self.dir, deployment, report) {
            warn!("deployment {deployment}: keeping its report failed: {e}");
        }
    }

    /// Sends every report waiting on disk; keeps those the server did not take.
    fn flush_reports(&self, token: &str) {
        let Ok(entries) = std::fs::read_dir(self.dir.join("reports")) else {
            return;
        };
        for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
            let Some(deployment) = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned)
            else {
                continue;
            };
            let Some(report) = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<DeploymentReport>(&b).ok())
            else {
                let _ = std::fs::remove_file(&path);
                continue;
            };
            match self.send(&deployment, token, &report) {
                Ok(_) => {
                    let _ = std::fs::remove_file(&path);
                }
                // The server forgot the deployment: nobody will ever take this report.
                Err(e) if e.code() == Some("unknown_deployment") => {
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => warn!("deployment {deployment}: report still pending: {e}"),
            }
        }
    }

    fn finish_job(&self, deployment: &str) {
        let _ = std::fs::remove_file(self.dir.join("queue").join(format!("{deployment}.json")));
        let _ = std::fs::remove_file(self.dir.join("work").join(format!("{deployment}.tar.gz")));
    }

    fn cleanup_download(&self, bundle: &str) {
        let part = self.dir.join("downloads").join(format!("{bundle}.part"));
        let _ = std::fs::remove_file(part.with_extension("etag"));
        let _ = std::fs::remove_file(part);
    }
}

/// Keeps `report` until the agent's deployment worker has delivered it (used by the
/// self-update supervisor, which settles an agent update while no worker runs).
pub fn keep_report(
    state_dir: &Path,
    deployment: &str,
    report: &DeploymentReport,
) -> Result<(), crate::state::StateError> {
    let dir = state_dir.join("deployments");
    let reports = dir.join("reports");
    std::fs::create_dir_all(&reports).map_err(|source| crate::state::StateError::CreateDir {
        path: reports.clone(),
        source,
    })?;
    write_report(&dir, deployment, report)
}

fn write_report(
    dir: &Path,
    deployment: &str,
    report: &DeploymentReport,
) -> Result<(), crate::state::StateError> {
    let path = dir.join("reports").join(format!("{deployment}.json"));
    let json = serde_json::to_vec(report).unwrap_or_default();
    write_atomic(&path, &json, 0o600)
}

fn state(state: DeploymentState, message: &str) -> DeploymentReport {
    DeploymentReport {
        state,
        message: message.to_owned(),
        log_tail: String::new(),
    }
}

/// Copies the first `len` bytes of `from` into a new `to`, synced.
fn copy_prefix(from: &Path, to: &Path, len: u64) -> std::io::Result<()> {
    use std::io::Read as _;
    let mut reader = std::fs::File::open(from)?.take(len);
    let mut writer = std::fs::File::create(to)?;
    std::io::copy(&mut reader, &mut writer)?;
    writer.sync_all()
}
