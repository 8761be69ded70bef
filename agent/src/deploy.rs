//! Installing, activating, health-checking and rolling back bundles, crash-consistently.
//!
//! Layout under the root (`<state-dir>/bundles`):
//! ```text
//! <name>/versions/<version>/    extracted bundles
//! <name>/current -> versions/v  the active version: a symlink replaced by rename, the one commit point
//! <name>/journal.json           the deployment in progress and how far it got
//! ```
//! A crash anywhere leaves `current` on exactly one complete version; [`Deployer::recover`] reads a
//! journal left behind, puts the previous version back if the new one was activated but never
//! confirmed healthy, and says what happened.

use crate::extract::{extract, Limits};
use crate::state::write_atomic;
use kernex_protocol::bundle::Manifest;
use serde::{Deserialize, Serialize};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest log tail kept per report.
const LOG_TAIL: usize = 4096;

#[derive(Debug, Clone)]
pub struct Deployer {
    root: PathBuf,
    /// Versions kept per bundle name, the active and the previous one included.
    pub keep_versions: usize,
    /// Pause between two runs of a failing health script.
    pub health_retry: Duration,
    pub limits: Limits,
}

/// One deployment for the deployer: the verified archive and what the server allowed.
#[derive(Debug, Clone)]
pub struct Job {
    pub deployment_id: String,
    /// The archive part of the bundle, signature already checked.
    pub archive: PathBuf,
    /// An explicit rollback: an older version may replace the active one.
    pub allow_downgrade: bool,
    pub device_class: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    Verifying,
    Installing,
    HealthChecking,
    Succeeded,
    Failed,
    RolledBack,
}

impl Stage {
    pub fn is_final(self) -> bool {
        matches!(self, Stage::Succeeded | Stage::Failed | Stage::RolledBack)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub stage: Stage,
    pub message: String,
    /// The last bytes of script output.
    pub log_tail: String,
}

impl Report {
    fn new(stage: Stage, message: impl Into<String>, log_tail: &str) -> Report {
        Report {
            stage,
            message: message.into(),
            log_tail: log_tail.to_owned(),
        }
    }
}

/// What a crash must be able to undo.
#[derive(Debug, Serialize, Deserialize)]
struct Journal {
    deployment_id: String,
    version: String,
    previous: Option<String>,
    /// `installing` (the new version is unpacked, not active) or `activated` (active, not yet
    /// confirmed healthy).
    stage: String,
}

impl Deployer {
    pub fn new(root: PathBuf) -> Deployer {
        Deployer {
            root,
            keep_versions: 3,
            health_retry: Duration::from_secs(1),
            limits: Limits::default(),
        }
    }

    /// The active version of bundle `name`.
    pub fn active(&self, name: &str) -> Option<String> {
        let target = std::fs::read_link(self.root.join(name).join("current")).ok()?;
        target.file_name().map(|n| n.to_string_lossy().into_owned())
    }

    /// Runs a job to its end; reports each stage through `report` as it starts. Returns the final
    /// report (also the last one passed to `report`).
    pub fn run(&self, job: &Job, report: &mut dyn FnMut(&Report)) -> Report {
        let last = match self.try_run(job, report) {
            Ok(done) => done,
            Err(message) => Report::new(Stage::Failed, message, ""),
        };
        report(&last);
        last
    }

    fn try_run(&self, job: &Job, report: &mut dyn FnMut(&Report)) -> Result<Report, String> {
        std::fs::create_dir_all(&self.root)
            .map_err(|e| format!("creating {}: {e}", self.root.display()))?;
        let staging = self.root.join(format!(".staging-{}", job.deployment_id));
        let _ = std::fs::remove_dir_all(&staging);
        let manifest = extract(&job.archive, &staging, &self.limits).map_err(|e| e.to_string())?;
        let outcome = self.install(job, &manifest, &staging, report);
        let _ = std::fs::remove_dir_all(&staging);
        outcome
    }

    fn install(
        &self,
        job: &Job,
        manifest: &Manifest,
        staging: &Path,
        report: &mut dyn FnMut(&Report),
    ) -> Result<Report, String> {
        let name_dir = self.root.join(&manifest.name);
        let previous = self.active(&manifest.name);
        if !manifest.compatible.is_empty()
            && !job
                .device_class
                .as_ref()
                .is_some_and(|class| manifest.compatible.contains(class))
        {
            return Err(format!(
                "{} {} is for device classes {:?}; this device is {}",
                manifest.name,
                manifest.version,
                manifest.compatible,
                job.device_class.as_deref().unwrap_or("of no class")
            ));
        }
        if let Some(active) = &previous {
            if *active == manifest.version {
                return Ok(Report::new(
                    Stage::Succeeded,
                    format!("{} {active} is already active", manifest.name),
                    "",
                ));
            }
            let older = semver::Version::parse(active).is_ok_and(|a| manifest.semver() < a);
            if older && !job.allow_downgrade {
                return Err(format!(
                    "{} {} is older than the active {active} and this is not a rollback",
                    manifest.name, manifest.version
                ));
            }
        }
        let versions = name_dir.join("versions");
        std::fs::create_dir_all(&versions)
            .map_err(|e| format!("creating {}: {e}", versions.display()))?;
        let target = versions.join(&manifest.version);
        let _ = std::fs::remove_dir_all(&target);
        std::fs::rename(staging, &target)
            .map_err(|e| format!("moving the bundle into {}: {e}", target.display()))?;
        let journal_path = name_dir.join("journal.json");
        let mut journal = Journal {
            deployment_id: job.deployment_id.clone(),
            version: manifest.version.clone(),
            previous: previous.clone(),
            stage: "installing".into(),
        };
        write_journal(&journal_path, &journal)?;
        failpoint("after-extract")?;

        report(&Report::new(
            Stage::Installing,
            format!("installing {} {}", manifest.name, manifest.version),
            "",
        ));
        let env = Env {
            dir: &target,
            name: &manifest.name,
            version: &manifest.version,
            previous: previous.as_deref().unwrap_or(""),
            deployment: &job.deployment_id,
        };
        let (installed, log) = run_script(
            &target,
            &manifest.scripts.install,
            &env,
            manifest.timeouts.install,
        );
        if let Err(why) = installed {
            let _ = std::fs::remove_dir_all(&target);
            let _ = std::fs::remove_file(&journal_path);
            return Ok(Report::new(
                Stage::Failed,
                format!("install script {why}"),
                &log,
            ));
        }
        failpoint("after-install")?;

        switch_current(&name_dir, &manifest.version)?;
        journal.stage = "activated".into();
        write_journal(&journal_path, &journal)?;
        failpoint("after-activate")?;

        let mut log = log;
        if let Some(health) = &manifest.scripts.health {
            report(&Report::new(
                Stage::HealthChecking,
                "waiting for the health check to pass",
                &log,
            ));
            let deadline = Instant::now() + manifest.timeouts.health;
            let healthy = loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let (result, out) =
                    run_script(&target, health, &env, left.max(Duration::from_secs(1)));
                log = tail(&format!("{log}{out}"));
                if result.is_ok() {
                    break true;
                }
                if Instant::now() + self.health_retry >= deadline {
                    break false;
                }
                std::thread::sleep(self.health_retry);
            };
            if !healthy {
                let back = self.roll_back(&name_dir, &journal, manifest, &env, &mut log);
                let _ = std::fs::remove_file(&journal_path);
                return Ok(Report::new(
                    Stage::RolledBack,
                    format!(
                        "the health check kept failing for {:?}; {back}",
                        manifest.timeouts.health
                    ),
                    &log,
                ));
            }
        }
        failpoint("after-health")?;
        let _ = std::fs::remove_file(&journal_path);
        self.prune(&name_dir, &manifest.version, previous.as_deref());
        Ok(Report::new(
            Stage::Succeeded,
            format!("{} {} is active", manifest.name, manifest.version),
            &log,
        ))
    }

    /// Puts the previous version back (or none) and runs the failed bundle's rollback script.
    fn roll_back(
        &self,
        name_dir: &Path,
        journal: &Journal,
        manifest: &Manifest,
        env: &Env<'_>,
        log: &mut String,
    ) -> String {
        let back = match &journal.previous {
            Some(previous) => match switch_current(name_dir, previous) {
                Ok(()) => format!("{previous} is active again"),
                Err(e) => format!("putting {previous} back failed: {e}"),
            },
            None => {
                let _ = std::fs::remove_file(name_dir.join("current"));
                "no earlier version to go back to".to_owned()
            }
        };
        if let Some(script) = &manifest.scripts.rollback {
            let (result, out) = run_script(env.dir, script, env, manifest.timeouts.rollback);
            *log = tail(&format!("{log}{out}"));
            if let Err(why) = result {
                return format!("{back}; the rollback script {why}");
            }
        }
        back
    }

    /// Removes old versions beyond `keep_versions`, never the active or the previous one.
    fn prune(&self, name_dir: &Path, active: &str, previous: Option<&str>) {
        let Ok(entries) = std::fs::read_dir(name_dir.join("versions")) else {
            return;
        };
        let mut versions: Vec<(semver::Version, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                semver::Version::parse(&name).ok().map(|v| (v, e.path()))
            })
            .collect();
        versions.sort_by(|a, b| b.0.cmp(&a.0));
        for (version, path) in versions.into_iter().skip(self.keep_versions) {
            let v = version.to_string();
            if v != active && Some(v.as_str()) != previous {
                let _ = std::fs::remove_dir_all(path);
            }
        }
    }

    /// After a restart: finishes or undoes what a journal says was in progress. Returns one final
    /// report per interrupted deployment.
    pub fn recover(&self) -> Vec<(String, Report)> {
        let mut reports = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return reports;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with(".staging-") {
                let _ = std::fs::remove_dir_all(&path);
                continue;
            }
            let journal_path = path.join("journal.json");
            let Some(journal) = std::fs::read(&journal_path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Journal>(&b).ok())
            else {
                continue;
            };
            let report = if journal.stage == "activated" {
                let back = match &journal.previous {
                    Some(previous) => switch_current(&path, previous)
                        .map(|()| format!("{previous} is active again"))
                        .unwrap_or_else(|e| format!("putting {previous} back failed: {e}")),
                    None => {
                        let _ = std::fs::remove_file(path.join("current"));
                        "no earlier version to go back to".to_owned()
                    }
                };
                Report::new(
                    Stage::RolledBack,
                    format!(
                        "the agent restarted before {} was confirmed healthy; {back}",
                        journal.version
                    ),
                    "",
                )
            } else {
                if self.active(&entry.file_name().to_string_lossy()).as_deref()
                    != Some(journal.version.as_str())
                {
                    let _ = std::fs::remove_dir_all(path.join("versions").join(&journal.version));
                }
                Report::new(
                    Stage::Failed,
                    format!("the agent restarted while installing {}", journal.version),
                    "",
                )
            };
            let _ = std::fs::remove_file(&journal_path);
            reports.push((journal.deployment_id, report));
        }
        reports
    }
}

fn write_journal(path: &Path, journal: &Journal) -> Result<(), String> {
    let json = serde_json::to_vec(journal).map_err(|e| e.to_string())?;
    write_atomic(path, &json, 0o600).map_err(|e| e.to_string())
}

/// Points `<name_dir>/current` at `versions/<version>` by renaming a fresh symlink over it: readers
/// see the old or the new target, never none.
fn switch_current(name_dir: &Path, version: &str) -> Result<(), String> {
    let temp = name_dir.join(".current.new");
    let _ = std::fs::remove_file(&temp);
    std::os::unix::fs::symlink(Path::new("versions").join(version), &temp)
        .map_err(|e| format!("creating {}: {e}", temp.display()))?;
    std::fs::rename(&temp, name_dir.join("current"))
        .map_err(|e| format!("activating {version}: {e}"))?;
    std::fs::File::open(name_dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("syncing {}: {e}", name_dir.display()))
}

/// Test hook: `KERNEX_AGENT_FAILPOINT=<step>` makes the agent exit right after that step, as a
/// crash there would (a kill -9 in tests; nothing sets it in production).
fn failpoint(step: &str) -> Result<(), String> {
    if std::env::var("KERNEX_AGENT_FAILPOINT").as_deref() == Ok(step) {
        crate::warn!("failpoint {step}: exiting as a crash would");
        std::process::exit(86);
    }
    Ok(())
}

struct Env<'a> {
    dir: &'a Path,
    name: &'a str,
    version: &'a str,
    previous: &'a str,
    deployment: &'a str,
}

/// Runs a bundle script (executable, working directory the bundle) with a timeout; the whole
/// process group is killed at the deadline. Returns the result and the output's tail.
fn run_script(
    dir: &Path,
    script: &str,
    env: &Env<'_>,
    timeout: Duration,
) -> (Result<(), String>, String) {
    use std::os::unix::process::CommandExt as _;
    let mut command = std::process::Command::new(dir.join(script));
    command
        .current_dir(dir)
        .env("KERNEX_BUNDLE_DIR", env.dir)
        .env("KERNEX_BUNDLE_NAME", env.name)
        .env("KERNEX_BUNDLE_VERSION", env.version)
        .env("KERNEX_PREVIOUS_VERSION", env.previous)
        .env("KERNEX_DEPLOYMENT_ID", env.deployment)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => return (Err(format!("{script} could not start: {e}")), String::new()),
    };
    let output = Arc::new(Mutex::new(String::new()));
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|mut stream| {
        let output = output.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let _done = done; // dropped when this reader ends
            let mut buffer = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buffer) {
                if n == 0 {
                    break;
                }
                let mut out = output.lock().unwrap_or_else(|p| p.into_inner());
                out.push_str(&String::from_utf8_lossy(&buffer[..n]));
                if out.len() > 2 * LOG_TAIL {
                    *out = tail(&out);
                }
            }
        })
    })
    .collect();
    let deadline = Instant::now() + timeout;
    let result = loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => break Ok(()),
            Ok(Some(status)) => break Err(format!("{script} failed ({status})")),
            Ok(None) if Instant::now() >= deadline => {
                let pid = rustix::process::Pid::from_child(&child);
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::Kill);
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!(
                    "{script} timed out after {timeout:?} and was killed"
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => break Err(format!("{script}: waiting failed: {e}")),
        }
    };
    // A script may leave a daemon behind that holds the pipes open: wait for the output a moment,
    // not for the daemon (the reader threads end when it does).
    drop(done);
    let grace = Instant::now() + Duration::from_secs(2);
    let mut open = readers.len();
    while open > 0 {
        match finished.recv_timeout(grace.saturating_duration_since(Instant::now())) {
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break,
            Ok(()) => open -= 1,
        }
    }
    let out = output.lock().unwrap_or_else(|p| p.into_inner()).clone();
    (result, tail(&out))
}

fn tail(text: &str) -> String {
    if text.len() <= LOG_TAIL {
        return text.to_owned();
    }
    let mut start = text.len() - LOG_TAIL;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_owned()
}
