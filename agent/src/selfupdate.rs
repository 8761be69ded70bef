//! The agent replaces itself, and comes back by itself when the replacement is no good.
//!
//! A bundle whose manifest names an `agent_binary` goes through the same pipeline as any bundle
//! (download, verify, extract, install script); then [`stage`] copies the binary into
//! `<state-dir>/agent/versions/<version>/`, checks that it runs and says the version the manifest
//! promises, and writes `trial.json`. The agent then restarts in place ([`restart`]).
//!
//! Whatever starts `kernex-agent run` first goes through [`launch`]:
//! - a trial is pending → this process becomes the **supervisor**: it runs the new binary as its
//!   child and waits for the child to write `confirmed` (after its first successful heartbeat).
//!   Confirmed in time → `active` points at the new version. Exited, or silent past the deadline →
//!   the child is killed, the new version removed, the deployment reported rolled back, and the
//!   previous agent runs again. The supervisor is the *previous* binary: the watchdog never
//!   depends on the code it is judging.
//! - a confirmed update is active and is not this binary → `exec` into it (same PID for systemd);
//! - otherwise the agent runs here.
//!
//! The binary systemd starts (`/usr/local/bin/kernex-agent`, from the ISO) is never modified: it is
//! the fallback of last resort. Layout under `<state-dir>/agent/`:
//! ```text
//! versions/<version>/kernex-agent   binaries that came in bundles
//! active -> versions/<version>      the confirmed one (symlink replaced by rename)
//! trial.json                        the version on trial, its deployment, deadline and starts
//! confirmed                         written by the trial agent after its first heartbeat
//! ```

use crate::deployments::keep_report;
use crate::state::write_atomic;
use crate::{info, warn};
use kernex_protocol::wire::{DeploymentReport, DeploymentState};
use serde::{Deserialize, Serialize};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Set on a supervised child: it runs the agent itself, never launches another.
const SUPERVISED_ENV: &str = "KERNEX_AGENT_SUPERVISED";
/// Set on a child on trial: the version it must confirm after its first heartbeat.
const TRIAL_ENV: &str = "KERNEX_AGENT_TRIAL";
/// A supervised child exits with this to have its supervisor look for a new trial.
const EXIT_RESTART: i32 = 75;
/// A trial that did not confirm after this many starts (power lost twice) is given up.
const MAX_STARTS: u32 = 2;
/// How long `--version` of a staged binary may take.
const VERSION_CHECK: Duration = Duration::from_secs(10);

/// The version on trial.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Trial {
    pub deployment: String,
    pub version: String,
    /// How long the new agent has, from its start, to heartbeat.
    pub deadline_s: u64,
    /// Times a supervisor started it.
    #[serde(default)]
    pub starts: u32,
}

/// Paths under `<state-dir>/agent`.
#[derive(Debug, Clone)]
pub struct AgentDir {
    state_dir: PathBuf,
    root: PathBuf,
}

impl AgentDir {
    pub fn new(state_dir: &Path) -> AgentDir {
        AgentDir {
            state_dir: state_dir.to_owned(),
            root: state_dir.join("agent"),
        }
    }

    fn binary(&self, version: &str) -> PathBuf {
        self.root
            .join("versions")
            .join(version)
            .join("kernex-agent")
    }

    fn trial_file(&self) -> PathBuf {
        self.root.join("trial.json")
    }

    fn confirmed_file(&self) -> PathBuf {
        self.root.join("confirmed")
    }

    pub fn trial(&self) -> Option<Trial> {
        let bytes = std::fs::read(self.trial_file()).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(trial) => Some(trial),
            Err(e) => {
                warn!("ignoring unreadable {}: {e}", self.trial_file().display());
                let _ = std::fs::remove_file(self.trial_file());
                None
            }
        }
    }

    /// The confirmed version and its binary, if an update is active.
    pub fn active(&self) -> Option<(String, PathBuf)> {
        let target = std::fs::read_link(self.root.join("active")).ok()?;
        let version = target.file_name()?.to_string_lossy().into_owned();
        let binary = self.binary(&version);
        binary.is_file().then_some((version, binary))
    }

    /// The version the appliance runs when no trial is pending.
    fn fallback_version(&self) -> String {
        self.active()
            .map(|(version, _)| version)
            .unwrap_or_else(|| crate::VERSION.to_owned())
    }

    fn activate(&self, version: &str) -> Result<(), String> {
        let temp = self.root.join(".active.new");
        let _ = std::fs::remove_file(&temp);
        std::os::unix::fs::symlink(Path::new("versions").join(version), &temp)
            .map_err(|e| format!("creating {}: {e}", temp.display()))?;
        std::fs::rename(&temp, self.root.join("active"))
            .map_err(|e| format!("activating kernex-agent {version}: {e}"))?;
        sync_dir(&self.root);
        Ok(())
    }

    /// Keeps the active version and the one before it (whatever is running may be either).
    fn prune(&self, active: &str, previous: &str) {
        let Ok(entries) = std::fs::read_dir(self.root.join("versions")) else {
            return;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name != active && name != previous {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }

    fn report(&self, trial: &Trial, state: DeploymentState, message: String) {
        info!("deployment {}: {}", trial.deployment, message);
        let report = DeploymentReport {
            state,
            message,
            log_tail: String::new(),
        };
        if let Err(e) = keep_report(&self.state_dir, &trial.deployment, &report) {
            warn!(
                "deployment {}: keeping its report failed: {e}",
                trial.deployment
            );
        }
    }
}

/// Puts the agent binary of an installed bundle on trial. `binary` is inside the bundle's
/// version directory; `deadline` is how long the new agent has to heartbeat once started.
pub fn stage(
    state_dir: &Path,
    deployment: &str,
    version: &str,
    binary: &Path,
    deadline: Duration,
) -> Result<(), String> {
    let dir = AgentDir::new(state_dir);
    let meta = std::fs::metadata(binary)
        .map_err(|e| format!("the agent binary {}: {e}", binary.display()))?;
    if !meta.is_file() {
        return Err(format!(
            "the agent binary {} is not a regular file",
            binary.display()
        ));
    }
    let target = dir.binary(version);
    let parent = target.parent().unwrap_or(&dir.root);
    std::fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
    let temp = parent.join(".kernex-agent.new");
    std::fs::copy(binary, &temp)
        .map_err(|e| format!("copying {} to {}: {e}", binary.display(), temp.display()))?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        let file =
            std::fs::File::open(&temp).map_err(|e| format!("opening {}: {e}", temp.display()))?;
        file.set_permissions(std::fs::Permissions::from_mode(0o755))
            .and_then(|()| file.sync_all())
            .map_err(|e| format!("preparing {}: {e}", temp.display()))?;
    }
    std::fs::rename(&temp, &target)
        .map_err(|e| format!("moving the agent binary into {}: {e}", target.display()))?;
    let said = version_of(&target)?;
    if said != format!("kernex-agent {version}") {
        let _ = std::fs::remove_dir_all(parent);
        return Err(format!(
            "the agent binary says {said:?} to --version; the manifest promises kernex-agent {version}"
        ));
    }
    let trial = Trial {
        deployment: deployment.to_owned(),
        version: version.to_owned(),
        deadline_s: deadline.as_secs().max(1),
        starts: 0,
    };
    let _ = std::fs::remove_file(dir.confirmed_file());
    // The commit point: from here a restart, a crash or a power loss all lead to the trial.
    write_atomic(
        &dir.trial_file(),
        &serde_json::to_vec(&trial).unwrap_or_default(),
        0o600,
    )
    .map_err(|e| e.to_string())
}

/// `<binary> --version`, bounded in time.
fn version_of(binary: &Path) -> Result<String, String> {
    let mut child = Command::new(binary)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("running {} --version: {e}", binary.display()))?;
    let started = std::time::Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if started.elapsed() < VERSION_CHECK => {
                std::thread::sleep(Duration::from_millis(20))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{} --version did not answer within {VERSION_CHECK:?}",
                    binary.display()
                ));
            }
        }
    }
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut stdout, &mut out);
    }
    Ok(out.trim().to_owned())
}

/// Restarts into whatever [`launch`] picks now (a staged trial): a supervised child hands back to
/// its supervisor, anything else replaces itself in place. Returns only if that failed.
pub fn restart() -> String {
    if std::env::var_os(SUPERVISED_ENV).is_some() {
        info!("handing back to the supervising agent to start the new version");
        std::process::exit(EXIT_RESTART);
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return format!("finding this agent's binary: {e}"),
    };
    info!("restarting {} to start the new version", exe.display());
    let err = Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .env_remove(TRIAL_ENV)
        .exec();
    format!("restarting {}: {err}", exe.display())
}

/// The version this process must confirm after its first heartbeat, if it is on trial.
pub fn trial_version() -> Option<String> {
    std::env::var(TRIAL_ENV).ok()
}

/// Called by a trial agent after its first successful heartbeat.
pub fn confirm(state_dir: &Path, version: &str) {
    let dir = AgentDir::new(state_dir);
    match write_atomic(&dir.confirmed_file(), version.as_bytes(), 0o600) {
        Ok(()) => info!("kernex-agent {version} heartbeats: confirmed"),
        Err(e) => warn!("confirming kernex-agent {version}: {e}"),
    }
}

/// What `kernex-agent run` does before running the agent: see the module comment. Returns `None`
/// when the agent should run in this process, or the exit code of a supervised agent that ended.
pub fn launch(state_dir: &Path) -> Option<u8> {
    if let Some(supervisor) = std::env::var_os(SUPERVISED_ENV) {
        die_with(&supervisor.to_string_lossy());
        return None;
    }
    let dir = AgentDir::new(state_dir);
    loop {
        if let Some(trial) = dir.trial() {
            match supervise(&dir, trial) {
                Supervised::Exited(code) => return Some(code),
                Supervised::Relaunch => continue,
            }
        }
        let (version, binary) = dir.active()?;
        let me = std::env::current_exe().ok()?;
        if same_file(&me, &binary) {
            return None;
        }
        info!("starting kernex-agent {version} from {}", binary.display());
        let err = Command::new(&binary)
            .args(std::env::args_os().skip(1))
            .exec();
        warn!(
            "starting {} failed ({err}); running kernex-agent {} instead",
            binary.display(),
            crate::VERSION
        );
        return None;
    }
}

enum Supervised {
    /// The child ended (not for an update): the supervisor ends with its code.
    Exited(u8),
    /// Look again: a trial was settled or a new one staged.
    Relaunch,
}

fn supervise(dir: &AgentDir, mut trial: Trial) -> Supervised {
    let previous = dir.fallback_version();
    let fail = |trial: &Trial, why: String| {
        let _ = std::fs::remove_file(dir.trial_file());
        let _ = std::fs::remove_file(dir.confirmed_file());
        if let Some(parent) = dir.binary(&trial.version).parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
        dir.report(
            trial,
            DeploymentState::RolledBack,
            format!(
                "kernex-agent {} {why}; kernex-agent {previous} runs again",
                trial.version
            ),
        );
        Supervised::Relaunch
    };
    trial.starts += 1;
    if trial.starts > MAX_STARTS {
        return fail(
            &trial,
            format!("did not confirm itself in {MAX_STARTS} starts"),
        );
    }
    if let Err(e) = write_atomic(
        &dir.trial_file(),
        &serde_json::to_vec(&trial).unwrap_or_default(),
        0o600,
    ) {
        return fail(&trial, format!("could not be put on trial: {e}"));
    }
    let _ = std::fs::remove_file(dir.confirmed_file());
    let binary = dir.binary(&trial.version);
    info!(
        "kernex-agent {} on trial: it has {}s to heartbeat",
        trial.version, trial.deadline_s
    );
    let mut child = match spawn_child(&binary, Some(&trial.version)) {
        Ok(child) => child,
        Err(e) => return fail(&trial, format!("could not start: {e}")),
    };
    let deadline = now_s() + trial.deadline_s;
    loop {
        if std::fs::read_to_string(dir.confirmed_file())
            .ok()
            .as_deref()
            == Some(&trial.version)
        {
            break;
        }
        match child.try_wait() {
            Ok(Some(status)) => {
                return fail(
                    &trial,
                    format!("exited ({status}) before its first heartbeat"),
                )
            }
            Ok(None) => {}
            Err(e) => {
                kill(&mut child);
                return fail(&trial, format!("could not be watched: {e}"));
            }
        }
        if now_s() >= deadline {
            kill(&mut child);
            return fail(
                &trial,
                format!("did not heartbeat within {}s", trial.deadline_s),
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if let Err(e) = dir.activate(&trial.version) {
        kill(&mut child);
        return fail(&trial, e);
    }
    let _ = std::fs::remove_file(dir.trial_file());
    let _ = std::fs::remove_file(dir.confirmed_file());
    dir.prune(&trial.version, &previous);
    dir.report(
        &trial,
        DeploymentState::Succeeded,
        format!(
            "kernex-agent {} heartbeats and is active (was {previous})",
            trial.version
        ),
    );
    wait_child(child)
}

/// Runs `binary run …` (our own arguments) as a supervised child that dies with us.
fn spawn_child(binary: &Path, trial: Option<&str>) -> std::io::Result<Child> {
    let mut command = Command::new(binary);
    command
        .args(std::env::args_os().skip(1))
        .env(SUPERVISED_ENV, std::process::id().to_string());
    match trial {
        Some(version) => command.env(TRIAL_ENV, version),
        None => command.env_remove(TRIAL_ENV),
    };
    command.spawn()
}

/// A supervised child dies with its supervisor (killed, or crashed): it never runs on unwatched.
/// Set here rather than between fork and exec, so the check after it closes the race.
fn die_with(supervisor: &str) {
    use rustix::process::{getppid, set_parent_process_death_signal, Signal};
    if let Err(e) = set_parent_process_death_signal(Some(Signal::Kill)) {
        warn!("cannot tie this agent to its supervisor: {e}");
    }
    let parent = getppid().map(|pid| pid.as_raw_nonzero().get().to_string());
    if parent.as_deref() != Some(supervisor) {
        warn!("the supervising agent {supervisor} is gone; exiting");
        std::process::exit(1);
    }
}

/// Waits for a confirmed child; it ends the supervisor unless it asks for the next trial.
fn wait_child(mut child: Child) -> Supervised {
    match child.wait() {
        Ok(status) if status.code() == Some(EXIT_RESTART) => Supervised::Relaunch,
        Ok(status) => Supervised::Exited(status.code().unwrap_or(1).clamp(0, 255) as u8),
        Err(e) => {
            warn!("waiting for the agent: {e}");
            Supervised::Exited(1)
        }
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}
