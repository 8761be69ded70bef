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
use kernex_protocol::wire::{DeploymentReport, DeploymentState};
use serde::{Deserialize, Serialize};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest log tail kept per report.
const LOG_TAIL: usize = kernex_protocol::wire::MAX_LOG_TAIL;

#[derive(Debug, Clone)]
pub struct Deployer {
    root: PathBuf,
    /// Versions kept per bundle name, the active and the previous one included.
    pub keep_versions: usize,
    /// Pause between two runs of a failing health script.
    pub health_retry: Duration,
    pub limits: Limits,
    /// Test hook: stop right after this step as a crash would (journal and files left as they are).
    pub fail_at: Option<&'static str>,
    /// The agent's state directory, where agent updates are staged (`selfupdate`).
    agent_state: PathBuf,
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

/// The active version of every bundle under `root` (a deployer's root), by name.
pub fn active_versions(root: &Path) -> std::collections::BTreeMap<String, String> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Default::default();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|entry| {
            let target = std::fs::read_link(entry.path().join("current")).ok()?;
            let version = target.file_name()?.to_string_lossy().into_owned();
            Some((entry.file_name().to_string_lossy().into_owned(), version))
        })
        .collect()
}

/// A report with its state, message and output tail (the device reports these as they are).
fn outcome(state: DeploymentState, message: impl Into<String>, log_tail: &str) -> DeploymentReport {
    DeploymentReport {
        state,
        message: message.into(),
        log_tail: log_tail.to_owned(),
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
    /// `root` is `<state-dir>/bundles`.
    pub fn new(root: PathBuf) -> Deployer {
        Deployer {
            agent_state: root.parent().unwrap_or(&root).to_owned(),
            root,
            keep_versions: 3,
            health_retry: Duration::from_secs(1),
            limits: Limits::default(),
            fail_at: None,
        }
    }

    /// The active version of bundle `name`.
    pub fn active(&self, name: &str) -> Option<String> {
        let target = std::fs::read_link(self.root.join(name).join("current")).ok()?;
        target.file_name().map(|n| n.to_string_lossy().into_owned())
    }

    /// Runs a job to its end; reports each stage through `report` as it starts. `report` answers
    /// whether to go on: false (the deployment was cancelled) stops the job if it has not touched
    /// the installed versions yet; once installation began it runs to its end, so a cancel never
    /// leaves half an installation. Returns the final report (also the last one passed to `report`).
    pub fn run(
        &self,
        job: &Job,
        report: &mut dyn FnMut(&DeploymentReport) -> bool,
    ) -> DeploymentReport {
        let last = match self.try_run(job, report) {
            Ok(done) => done,
            Err(message) => outcome(DeploymentState::Failed, message, ""),
        };
        let _ = report(&last);
        last
    }

    fn try_run(
        &self,
        job: &Job,
        report: &mut dyn FnMut(&DeploymentReport) -> bool,
    ) -> Result<DeploymentReport, String> {
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
        report: &mut dyn FnMut(&DeploymentReport) -> bool,
    ) -> Result<DeploymentReport, String> {
        let name_dir = self.root.join(&manifest.name);
        // An agent bundle is compared with the agent that runs, whatever was installed before.
        let previous = match manifest.agent_binary {
            Some(_) => Some(crate::VERSION.to_owned()),
            None => self.active(&manifest.name),
        };
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
                return Ok(outcome(
                    DeploymentState::Succeeded,
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
        // The last moment a cancel can stop the job with nothing changed on the appliance.
        let go_on = report(&outcome(
            DeploymentState::Installing,
            format!("installing {} {}", manifest.name, manifest.version),
            "",
        ));
        if !go_on {
            return Ok(outcome(
                DeploymentState::Cancelled,
                "cancelled before installation",
                "",
            ));
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
        self.failpoint("after-extract")?;

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
            return Ok(outcome(
                DeploymentState::Failed,
                format!("install script {why}"),
                &log,
            ));
        }
        self.failpoint("after-install")?;

        if let Some(binary) = &manifest.agent_binary {
            // Settled by the new agent's first heartbeat, or its absence (see `selfupdate`). The
            // journal goes first: from the trial on, a crash is the supervisor's to handle.
            let _ = std::fs::remove_file(&journal_path);
            let staged = crate::selfupdate::stage(
                &self.agent_state,
                &job.deployment_id,
                &manifest.version,
                &target.join(binary),
                manifest.timeouts.health,
            );
            return Ok(match staged {
                Ok(()) => outcome(
                    DeploymentState::HealthChecking,
                    format!(
                        "kernex-agent {} staged; restarting into it (it has {:?} to heartbeat)",
                        manifest.version, manifest.timeouts.health
                    ),
                    &log,
                ),
                Err(why) => {
                    let _ = std::fs::remove_dir_all(&target);
                    outcome(DeploymentState::Failed, why, &log)
                }
            });
        }

        switch_current(&name_dir, &manifest.version)?;
        journal.stage = "activated".into();
        write_journal(&journal_path, &journal)?;
        self.failpoint("after-activate")?;

        let mut log = log;
        if let Some(health) = &manifest.scripts.health {
            // Too late to stop: the new version is active and must prove itself or be rolled back.
            let _ = report(&outcome(
                DeploymentState::HealthChecking,
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
                return Ok(outcome(
                    DeploymentState::RolledBack,
                    format!(
                        "the health check kept failing for {:?}; {back}",
                        manifest.timeouts.health
                    ),
                    &log,
                ));
            }
        }
        self.failpoint("after-health")?;
        let _ = std::fs::remove_file(&journal_path);
        self.prune(&name_dir, &manifest.version, previous.as_deref());
        Ok(outcome(
            DeploymentState::Succeeded,
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
    pub fn recover(&self) -> Vec<(String, DeploymentReport)> {
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
                outcome(
                    DeploymentState::RolledBack,
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
                outcome(
                    DeploymentState::Failed,
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

impl Deployer {
    /// Crash simulation for tests: [`Deployer::fail_at`] returns here as if the process died (the
    /// caller's cleanup is skipped by the error path only for staging), and
    /// `KERNEX_AGENT_FAILPOINT=<step>` makes the real agent exit on the spot.
    fn failpoint(&self, step: &str) -> Result<(), String> {
        if self.fail_at == Some(step) {
            return Err(format!("simulated crash after {step}"));
        }
        if std::env::var("KERNEX_AGENT_FAILPOINT").as_deref() == Ok(step) {
            crate::warn!("failpoint {step}: exiting as a crash would");
            std::process::exit(86);
        }
        Ok(())
    }
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
    [
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
    .for_each(|mut stream| {
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
        });
    });
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
    // Disconnected as soon as every reader has ended, or a timeout: either way, go on.
    let _ = finished.recv_timeout(Duration::from_secs(2));
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

#[cfg(test)]
mod tests {
    use super::*;
    use kernex_protocol::bundle::{pack, read_sealed, PublisherKey};
    use std::os::unix::fs::PermissionsExt as _;

    fn key() -> PublisherKey {
        static KEY: std::sync::OnceLock<PublisherKey> = std::sync::OnceLock::new();
        KEY.get_or_init(|| PublisherKey::generate().unwrap())
            .clone()
    }

    /// Packs a bundle `t` at `version` with the given scripts; returns the archive part.
    fn bundle(dir: &Path, version: &str, install: &str, health: &str, extra: &str) -> PathBuf {
        let src = dir.join(format!("src-{version}-{}", rand::random::<u32>()));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(
            src.join("manifest.toml"),
            format!("name = \"t\"\nversion = \"{version}\"\n{extra}[scripts]\ninstall = \"install.sh\"\nhealth = \"health.sh\"\nrollback = \"rollback.sh\"\n[timeouts]\ninstall = \"2s\"\nhealth = \"2s\"\n"),
        )
        .unwrap();
        for (name, body) in [
            ("install.sh", install),
            ("health.sh", health),
            (
                "rollback.sh",
                "touch \"$KERNEX_BUNDLE_DIR/../../rollback-ran\"",
            ),
        ] {
            std::fs::write(src.join(name), format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(src.join(name), std::fs::Permissions::from_mode(0o755))
                .unwrap();
        }
        let packed = dir.join(format!("{version}.kxb"));
        pack(&src, &key(), &packed).unwrap();
        let sealed = read_sealed(&packed).unwrap();
        let bytes = std::fs::read(&packed).unwrap();
        let archive = dir.join(format!("{version}-{}.tar.gz", rand::random::<u32>()));
        std::fs::write(&archive, &bytes[..sealed.archive_bytes as usize]).unwrap();
        archive
    }

    fn job(archive: &Path) -> Job {
        Job {
            deployment_id: format!("d-{}", rand::random::<u32>()),
            archive: archive.to_owned(),
            allow_downgrade: false,
            device_class: Some("nuc".into()),
        }
    }

    fn deployer(root: &Path) -> Deployer {
        Deployer {
            health_retry: Duration::from_millis(100),
            ..Deployer::new(root.to_owned())
        }
    }

    fn run(d: &Deployer, job: &Job) -> (DeploymentReport, Vec<DeploymentState>) {
        let mut stages = Vec::new();
        let report = d.run(job, &mut |r: &DeploymentReport| {
            stages.push(r.state);
            true
        });
        (report, stages)
    }

    #[test]
    fn install_upgrade_and_refusals() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("bundles");
        let d = deployer(&root);
        let echo = "echo \"prev=$KERNEX_PREVIOUS_VERSION\" > seen";
        let (report, stages) = run(&d, &job(&bundle(tmp.path(), "1.0.0", echo, "exit 0", "")));
        assert_eq!(report.state, DeploymentState::Succeeded, "{report:?}");
        assert_eq!(
            stages,
            [
                DeploymentState::Installing,
                DeploymentState::HealthChecking,
                DeploymentState::Succeeded
            ]
        );
        assert_eq!(d.active("t").as_deref(), Some("1.0.0"));
        let (report, _) = run(&d, &job(&bundle(tmp.path(), "1.1.0", echo, "exit 0", "")));
        assert_eq!(report.state, DeploymentState::Succeeded, "{report:?}");
        assert_eq!(
            std::fs::read_to_string(root.join("t/current/seen")).unwrap(),
            "prev=1.0.0\n"
        );

        let old = bundle(tmp.path(), "0.9.0", "exit 0", "exit 0", "");
        let (report, _) = run(&d, &job(&old));
        assert_eq!(report.state, DeploymentState::Failed);
        assert!(
            report.message.contains("older than the active 1.1.0"),
            "{report:?}"
        );
        let (report, _) = run(
            &d,
            &Job {
                allow_downgrade: true,
                ..job(&old)
            },
        );
        assert_eq!(report.state, DeploymentState::Succeeded, "{report:?}");
        assert_eq!(d.active("t").as_deref(), Some("0.9.0"));

        let other = bundle(
            tmp.path(),
            "2.0.0",
            "exit 0",
            "exit 0",
            "compatible = [\"rpi\"]\n",
        );
        let (report, _) = run(&d, &job(&other));
        assert!(
            report.message.contains("for device classes [\"rpi\"]"),
            "{report:?}"
        );
        assert_eq!(d.active("t").as_deref(), Some("0.9.0"));
    }

    #[test]
    fn a_cancel_before_installation_changes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("bundles");
        let d = deployer(&root);
        run(
            &d,
            &job(&bundle(tmp.path(), "1.0.0", "exit 0", "exit 0", "")),
        );
        let mut stages = Vec::new();
        let report = d.run(
            &job(&bundle(tmp.path(), "1.1.0", "touch ran", "exit 0", "")),
            &mut |r: &DeploymentReport| {
                stages.push(r.state);
                r.state != DeploymentState::Installing
            },
        );
        assert_eq!(report.state, DeploymentState::Cancelled, "{report:?}");
        assert_eq!(
            stages,
            [DeploymentState::Installing, DeploymentState::Cancelled]
        );
        assert_eq!(d.active("t").as_deref(), Some("1.0.0"));
        let left: Vec<_> = std::fs::read_dir(root.join("t/versions"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["1.0.0"]);
        assert!(!root.join("t/journal.json").exists());
        assert!(std::fs::read_dir(&root).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".staging")));
    }

    #[test]
    fn failures_keep_or_restore_the_previous_version() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("bundles");
        let d = deployer(&root);
        run(
            &d,
            &job(&bundle(tmp.path(), "1.0.0", "exit 0", "exit 0", "")),
        );

        let (report, _) = run(
            &d,
            &job(&bundle(
                tmp.path(),
                "1.1.0",
                "echo broken; exit 3",
                "exit 0",
                "",
            )),
        );
        assert_eq!(report.state, DeploymentState::Failed);
        assert!(report.log_tail.contains("broken"), "{report:?}");
        assert_eq!(d.active("t").as_deref(), Some("1.0.0"));
        assert!(!root.join("t/versions/1.1.0").exists());

        let (report, stages) = run(
            &d,
            &job(&bundle(
                tmp.path(),
                "1.2.0",
                "exit 0",
                "echo sick; exit 1",
                "",
            )),
        );
        assert_eq!(report.state, DeploymentState::RolledBack, "{report:?}");
        assert_eq!(stages.last(), Some(&DeploymentState::RolledBack));
        assert!(report.log_tail.contains("sick"), "{report:?}");
        assert_eq!(d.active("t").as_deref(), Some("1.0.0"));
        assert!(root.join("t/rollback-ran").exists());

        // An install that hangs (with a child of its own) is killed at its timeout.
        let started = Instant::now();
        let (report, _) = run(
            &d,
            &job(&bundle(
                tmp.path(),
                "1.3.0",
                "sleep 300 & sleep 300",
                "exit 0",
                "",
            )),
        );
        assert_eq!(report.state, DeploymentState::Failed);
        assert!(report.message.contains("timed out"), "{report:?}");
        assert!(started.elapsed() < Duration::from_secs(60));
        assert_eq!(d.active("t").as_deref(), Some("1.0.0"));
    }

    #[test]
    fn a_crash_at_any_step_recovers_to_one_whole_version() {
        for (step, expected, active) in [
            ("after-extract", DeploymentState::Failed, "1.0.0"),
            ("after-install", DeploymentState::Failed, "1.0.0"),
            ("after-activate", DeploymentState::RolledBack, "1.0.0"),
        ] {
            let tmp = tempfile::tempdir().unwrap();
            let root = tmp.path().join("bundles");
            run(
                &deployer(&root),
                &job(&bundle(tmp.path(), "1.0.0", "exit 0", "exit 0", "")),
            );
            let crashing = Deployer {
                fail_at: Some(step),
                ..deployer(&root)
            };
            let j = job(&bundle(tmp.path(), "1.1.0", "exit 0", "exit 0", ""));
            let (report, _) = run(&crashing, &j);
            assert!(
                report.message.contains("simulated crash"),
                "{step}: {report:?}"
            );
            let recovered = deployer(&root).recover();
            assert_eq!(recovered.len(), 1, "{step}");
            assert_eq!(
                (recovered[0].0.as_str(), recovered[0].1.state),
                (j.deployment_id.as_str(), expected),
                "{step}"
            );
            assert_eq!(
                deployer(&root).active("t").as_deref(),
                Some(active),
                "{step}"
            );
            assert!(!root.join("t/journal.json").exists(), "{step}");
            assert!(
                deployer(&root).recover().is_empty(),
                "{step}: recovery is done once"
            );
            // And the same deployment can run again to the end.
            let (report, _) = run(&deployer(&root), &j);
            assert_eq!(
                report.state,
                DeploymentState::Succeeded,
                "{step}: {report:?}"
            );
        }
    }

    #[test]
    fn pruning_keeps_the_newest_the_active_and_the_previous() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("bundles");
        let d = Deployer {
            keep_versions: 2,
            ..deployer(&root)
        };
        for v in ["1.0.0", "1.1.0", "1.2.0", "1.3.0"] {
            run(&d, &job(&bundle(tmp.path(), v, "exit 0", "exit 0", "")));
        }
        let mut left: Vec<String> = std::fs::read_dir(root.join("t/versions"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["1.2.0", "1.3.0"]);
    }
}
