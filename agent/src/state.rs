//! What the agent remembers across restarts, in `<state-dir>/state.json`, written atomically
//! (temp file, fsync, rename, fsync of the directory): a crash leaves the old or the new file,
//! never a torn one. A file that does not parse is an error naming the file, never a panic and
//! never silently replaced (it holds the device's identity).

use kernex_protocol::wire::{CommandAck, Telemetry};
use serde::{Deserialize, Serialize};
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Results kept to deduplicate re-delivered commands.
const REMEMBERED_COMMANDS: usize = 256;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentState {
    /// Set once enrolled.
    #[serde(default)]
    pub device_id: Option<String>,
    #[serde(default)]
    pub tenant: Option<String>,
    #[serde(default)]
    pub server_url: Option<String>,
    /// Unix seconds.
    #[serde(default)]
    pub enrolled_at: Option<i64>,
    /// Set by a `set-interval` command; wins over the server's suggestion.
    #[serde(default)]
    pub interval_override_s: Option<u32>,
    /// The interval in use (suggested or overridden).
    #[serde(default)]
    pub interval_s: Option<u32>,
    /// Command results not yet confirmed by a successful heartbeat.
    #[serde(default)]
    pub pending_acks: Vec<CommandAck>,
    /// Ids of commands already executed, newest last.
    #[serde(default)]
    pub done_commands: Vec<String>,
    /// The server deregistered this device: the agent refuses to run until this file is removed.
    #[serde(default)]
    pub deregistered: bool,
    /// Unix seconds of the last successful heartbeat.
    #[serde(default)]
    pub last_heartbeat_at: Option<i64>,
    #[serde(default)]
    pub last_telemetry: Option<Telemetry>,
    /// The last error, for `kernex-agent status`; cleared by a successful heartbeat.
    #[serde(default)]
    pub last_error: Option<String>,
    /// PEM keys of the publishers whose bundles this device installs (from the server).
    #[serde(default)]
    pub publisher_keys: Vec<String>,
    /// The user VMs as last set by a `vm.configure` command; the bootstrap file's `[[vm]]` until
    /// then. Holds the links' secrets: the state file is 0600 and `status` leaves them out.
    #[serde(default)]
    pub vms: Option<Vec<kernex_protocol::VmConfig>>,
}

impl AgentState {
    pub fn remember_done(&mut self, id: &str) {
        self.done_commands.push(id.to_owned());
        let excess = self.done_commands.len().saturating_sub(REMEMBERED_COMMANDS);
        self.done_commands.drain(..excess);
    }

    pub fn is_done(&self, id: &str) -> bool {
        self.done_commands.iter().any(|d| d == id) || self.pending_acks.iter().any(|a| a.id == id)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("creating state directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading agent state {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "agent state {path} is corrupt ({source}); move it away to enroll this appliance as new"
    )]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The state directory and the files in it.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Creates the directory (mode 0700) if needed.
    pub fn open(dir: &Path) -> Result<StateDir, StateError> {
        use std::os::unix::fs::DirBuilderExt as _;
        if !dir.is_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| StateError::CreateDir {
                    path: dir.to_owned(),
                    source,
                })?;
        }
        Ok(StateDir {
            dir: dir.to_owned(),
        })
    }

    /// A read-only view for `status`: does not create anything.
    pub fn existing(dir: &Path) -> StateDir {
        StateDir {
            dir: dir.to_owned(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn state_file(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    pub fn key_file(&self) -> PathBuf {
        self.dir.join("device.key")
    }

    /// The saved state, or a fresh one if there is none yet.
    pub fn load(&self) -> Result<AgentState, StateError> {
        let path = self.state_file();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| StateError::Corrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(AgentState::default()),
            Err(source) => Err(StateError::Read { path, source }),
        }
    }

    pub fn save(&self, state: &AgentState) -> Result<(), StateError> {
        let json = serde_json::to_vec_pretty(state).expect("agent state serializes");
        write_atomic(&self.state_file(), &json, 0o600)
    }
}

/// Replaces `path` with `contents` so that readers and crashes see the old or the new file only.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), StateError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let err = |source| StateError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateDir::open(&dir.path().join("sub")).unwrap();
        assert_eq!(store.load().unwrap(), AgentState::default());
        let mut state = AgentState {
            device_id: Some("d1".into()),
            ..AgentState::default()
        };
        state.remember_done("c1");
        store.save(&state).unwrap();
        assert_eq!(store.load().unwrap(), state);
        let mode = std::fs::metadata(store.state_file()).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
        // No temp files left behind.
        assert_eq!(std::fs::read_dir(store.path()).unwrap().count(), 1);
    }

    #[test]
    fn corrupt_state_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateDir::open(dir.path()).unwrap();
        std::fs::write(store.state_file(), b"{\"device_id\": 12").unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "agent state {} is corrupt",
                store.state_file().display()
            )),
            "{err}"
        );
        assert!(
            err.ends_with("move it away to enroll this appliance as new"),
            "{err}"
        );
    }

    #[test]
    fn done_commands_are_bounded() {
        let mut state = AgentState::default();
        for i in 0..(REMEMBERED_COMMANDS + 10) {
            state.remember_done(&i.to_string());
        }
        assert_eq!(state.done_commands.len(), REMEMBERED_COMMANDS);
        assert!(!state.is_done("0"));
        assert!(state.is_done(&(REMEMBERED_COMMANDS + 9).to_string()));
    }
}
