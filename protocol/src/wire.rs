//! Request and response bodies of the device protocol (`/api/v1/enroll`, `/auth`, `/heartbeat`) and
//! the JSON error body every endpoint uses.
//!
//! Compatibility rule: fields are only ever added, with `#[serde(default)]`, so an older agent keeps
//! working against a newer server and the other way round. Unknown command kinds are reported back
//! as failed commands, never as a failed heartbeat.

use serde::{Deserialize, Serialize};

/// `POST /api/v1/enroll`, signed with the key in `public_key`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrollRequest {
    pub tenant: String,
    /// The bootstrap token (`kxb_...`). Secret.
    pub token: String,
    /// `/etc/machine-id` or the DMI product uuid: survives a re-install with a new key.
    pub hardware_id: String,
    /// PEM SubjectPublicKeyInfo of the device's RSA-4096 key.
    pub public_key: String,
    #[serde(default)]
    pub facts: Facts,
    /// Unix seconds; the server refuses requests too far from its clock (replay window).
    pub timestamp: i64,
}

/// What a device says about itself at enrollment. All optional: the server stores what it gets.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default)]
pub struct Facts {
    pub hostname: Option<String>,
    pub os: Option<String>,
    pub kernel: Option<String>,
    pub arch: Option<String>,
    pub agent_version: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrollResponse {
    pub device_id: String,
    pub tenant: String,
    /// False when the request matched an existing device (same key, or same hardware id re-keyed).
    pub created: bool,
    /// PEM public keys of the publishers whose bundles the tenant trusts.
    #[serde(default)]
    pub publisher_keys: Vec<String>,
}

/// `POST /api/v1/auth`, signed with the device key: trades one RSA signature for a bearer token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuthRequest {
    pub device_id: String,
    /// Unix seconds (replay window, as for enrollment).
    pub timestamp: i64,
    /// Random per request, so two requests in the same second differ.
    pub nonce: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuthResponse {
    /// Bearer token for heartbeats; opaque to the agent.
    pub token: String,
    pub expires_in_s: u64,
    /// The tenant's trusted publisher keys as of now (keys added or revoked since enrollment).
    #[serde(default)]
    pub publisher_keys: Vec<String>,
}

/// `POST /api/v1/heartbeat` with `Authorization: Bearer <device token>`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeartbeatRequest {
    pub agent_version: String,
    /// The interval the agent uses when an operator overrode it (`set-interval`); absent when the
    /// agent follows the server's suggestion. The server derives "overdue" from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_s: Option<u32>,
    pub telemetry: Telemetry,
    /// Results of commands received in earlier responses; re-sent until the server stops sending
    /// the command.
    #[serde(default)]
    pub acks: Vec<CommandAck>,
    /// The links to the appliance's user VMs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vms: Vec<crate::vmlink::VmStatus>,
}

/// Point-in-time health of the appliance, read from `/proc` and `statvfs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default)]
pub struct Telemetry {
    /// Busy share of all CPUs since the previous heartbeat, 0–100.
    pub cpu_percent: f64,
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
    /// Of the file system holding the agent's state directory.
    pub disk_total_bytes: u64,
    pub disk_free_bytes: u64,
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
    pub uptime_s: u64,
    /// The active version of each installed bundle, by bundle name.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub bundles: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeartbeatResponse {
    /// When to send the next heartbeat (before jitter).
    pub interval_s: u32,
    /// Commands not yet acknowledged, oldest first. Delivered at least once: the agent deduplicates
    /// by `id`.
    #[serde(default)]
    pub commands: Vec<DeviceCommand>,
}

/// A command as the server delivers it. `kind` and `args` are kept loose on the wire so an older
/// agent can refuse a newer kind by itself; [`CommandSpec::parse`] gives the typed form.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeviceCommand {
    pub id: String,
    pub kind: String,
    #[serde(default)]
    pub args: serde_json::Value,
}

/// The commands this protocol version knows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", content = "args", rename_all = "kebab-case")]
pub enum CommandSpec {
    /// Answers `pong` with the agent's clock: proves the command path end to end.
    Ping,
    /// Overrides the server-suggested heartbeat interval; the agent keeps it across restarts.
    SetInterval(SetIntervalArgs),
    /// The device forgets its identity and stops; the server refuses it from then on.
    Deregister,
    /// Install a bundle as part of a deployment. Sent by the rollout engine only, never queued by
    /// hand ([`CommandSpec::is_internal`]).
    Deploy(Box<DeployArgs>),
    /// Relays an action to a user VM's `vm-endpoint`; the result (or a `vm_*` error) is the
    /// command's output, as JSON.
    #[serde(rename = "vm.call")]
    VmCall(VmCallArgs),
    /// Replaces the appliance's list of user VMs (as in the bootstrap file's `[[vm]]`); applied
    /// without a restart and kept across restarts.
    #[serde(rename = "vm.configure")]
    VmConfigure(VmConfigureArgs),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmCallArgs {
    pub vm: String,
    pub action: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// How long the action may run in the VM.
    #[serde(default = "default_vm_call_timeout")]
    pub timeout_s: u32,
}

fn default_vm_call_timeout() -> u32 {
    30
}

/// Longest `vm.call` timeout.
pub const MAX_VM_CALL_TIMEOUT_S: u32 = 600;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmConfigureArgs {
    pub vms: Vec<crate::VmConfig>,
}

/// What a device needs to fetch, verify and install a bundle.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeployArgs {
    pub deployment: String,
    pub bundle: String,
    pub name: String,
    pub version: String,
    /// Hex SHA-256 of the archive part, the digest the publisher signed.
    pub sha256: String,
    /// Bytes of the whole packed file.
    pub size: u64,
    /// Path on the server (`/api/v1/bundles/{id}/content`), fetched with the device's bearer token.
    pub url: String,
    /// Set on an explicit rollback: an older version may replace the active one.
    #[serde(default)]
    pub allow_downgrade: bool,
    /// The device's class (its `class` label), matched against the manifest's `compatible`.
    #[serde(default)]
    pub device_class: Option<String>,
    /// The tenant's trusted publisher keys (PEM) when the device was released: the bundle must be
    /// signed by one of them. Sent with the command so a key added or revoked since the device's
    /// last `/auth` counts at once.
    #[serde(default)]
    pub publisher_keys: Vec<String>,
}

/// Where a device is with one deployment, in the order a deployment goes through them.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum DeploymentState {
    /// Targeted, not released yet (a later phase, or waiting for a slot).
    Pending,
    /// Released: the `deploy` command is on its way.
    Queued,
    Downloading,
    Verifying,
    Installing,
    HealthChecking,
    Succeeded,
    Failed,
    /// The new version failed its health check and the previous one is active again.
    RolledBack,
    Cancelled,
}

impl DeploymentState {
    pub const ALL: [DeploymentState; 10] = [
        DeploymentState::Pending,
        DeploymentState::Queued,
        DeploymentState::Downloading,
        DeploymentState::Verifying,
        DeploymentState::Installing,
        DeploymentState::HealthChecking,
        DeploymentState::Succeeded,
        DeploymentState::Failed,
        DeploymentState::RolledBack,
        DeploymentState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeploymentState::Pending => "pending",
            DeploymentState::Queued => "queued",
            DeploymentState::Downloading => "downloading",
            DeploymentState::Verifying => "verifying",
            DeploymentState::Installing => "installing",
            DeploymentState::HealthChecking => "health-checking",
            DeploymentState::Succeeded => "succeeded",
            DeploymentState::Failed => "failed",
            DeploymentState::RolledBack => "rolled-back",
            DeploymentState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<DeploymentState> {
        DeploymentState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// No further change once here.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            DeploymentState::Succeeded
                | DeploymentState::Failed
                | DeploymentState::RolledBack
                | DeploymentState::Cancelled
        )
    }

    /// Released to the device and not finished.
    pub fn is_in_flight(self) -> bool {
        !self.is_terminal() && self != DeploymentState::Pending
    }

    /// Order along the happy path; a report never moves a device backwards.
    pub fn rank(self) -> u8 {
        DeploymentState::ALL
            .iter()
            .position(|s| *s == self)
            .map_or(0, |p| p as u8)
    }
}

/// `POST /api/v1/deployments/{id}/status`, from the device (bearer token): one state change.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DeploymentReport {
    pub state: DeploymentState,
    #[serde(default)]
    pub message: String,
    /// The last lines of script output, at most [`MAX_LOG_TAIL`] bytes.
    #[serde(default)]
    pub log_tail: String,
}

/// Longest log tail a device reports per state change.
pub const MAX_LOG_TAIL: usize = 4096;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeploymentReportResponse {
    /// The deployment was cancelled: stop unless the new version is already active.
    #[serde(default)]
    pub cancelled: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SetIntervalArgs {
    pub seconds: u32,
}

/// Bounds for [`SetIntervalArgs::seconds`] and the server's suggested interval.
pub const MIN_INTERVAL_S: u32 = 1;
pub const MAX_INTERVAL_S: u32 = 86_400;

impl CommandSpec {
    /// Typed form of `kind` + `args`, with a message fit for an operator when they do not fit.
    pub fn parse(kind: &str, args: &serde_json::Value) -> Result<CommandSpec, String> {
        let mut object = serde_json::Map::new();
        object.insert("kind".into(), serde_json::Value::String(kind.to_owned()));
        // Unit variants must not carry args; an empty object or null counts as none.
        let no_args = args.is_null() || args.as_object().is_some_and(|o| o.is_empty());
        if !no_args {
            object.insert("args".into(), args.clone());
        }
        let spec: CommandSpec = serde_json::from_value(serde_json::Value::Object(object))
            .map_err(|e| format!("command `{kind}`: {e}"))?;
        match &spec {
            CommandSpec::SetInterval(SetIntervalArgs { seconds })
                if !(MIN_INTERVAL_S..=MAX_INTERVAL_S).contains(seconds) =>
            {
                return Err(format!(
                    "command `set-interval`: seconds must be between {MIN_INTERVAL_S} and {MAX_INTERVAL_S}, got {seconds}"
                ));
            }
            CommandSpec::VmCall(args)
                if args.timeout_s == 0 || args.timeout_s > MAX_VM_CALL_TIMEOUT_S =>
            {
                return Err(format!(
                    "command `vm.call`: timeout_s must be between 1 and {MAX_VM_CALL_TIMEOUT_S}, got {}",
                    args.timeout_s
                ));
            }
            CommandSpec::VmCall(args) if args.action.is_empty() || args.vm.is_empty() => {
                return Err("command `vm.call`: `vm` and `action` are required".into());
            }
            CommandSpec::VmConfigure(args) => {
                if let Err((key, problem)) = crate::bootstrap::validate_vms(&args.vms) {
                    return Err(format!("command `vm.configure`: `{key}`: {problem}"));
                }
            }
            _ => {}
        }
        Ok(spec)
    }

    pub fn kind(&self) -> &'static str {
        match self {
            CommandSpec::Ping => "ping",
            CommandSpec::SetInterval(_) => "set-interval",
            CommandSpec::Deregister => "deregister",
            CommandSpec::Deploy(_) => "deploy",
            CommandSpec::VmCall(_) => "vm.call",
            CommandSpec::VmConfigure(_) => "vm.configure",
        }
    }

    /// Commands only the server itself issues (operators use the deployments API instead).
    pub fn is_internal(&self) -> bool {
        matches!(self, CommandSpec::Deploy(_))
    }
}

/// What became of a delivered command.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum CommandOutcome {
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CommandAck {
    pub id: String,
    pub outcome: CommandOutcome,
    /// Output or error text, at most [`MAX_COMMAND_OUTPUT`] bytes.
    #[serde(default)]
    pub output: String,
}

/// Longest command output the agent sends and the server stores.
pub const MAX_COMMAND_OUTPUT: usize = 4096;

/// `{"error": {"code": "...", "message": "..."}}`: the body of every non-2xx response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    /// Stable, machine-readable: scripts and the agent branch on it.
    pub code: String,
    pub message: String,
}

/// Error codes the agent acts on.
pub mod codes {
    /// The device was deregistered: stop for good.
    pub const DEVICE_DEREGISTERED: &str = "device_deregistered";
    /// The server does not know the device (database restored, device deleted): enroll again.
    pub const UNKNOWN_DEVICE: &str = "unknown_device";
    /// The bearer token expired or is not valid: authenticate again.
    pub const INVALID_DEVICE_TOKEN: &str = "invalid_device_token";
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn command_specs_parse_from_kind_and_args() {
        assert_eq!(
            CommandSpec::parse("ping", &json!(null)),
            Ok(CommandSpec::Ping)
        );
        assert_eq!(
            CommandSpec::parse("ping", &json!({})),
            Ok(CommandSpec::Ping)
        );
        assert_eq!(
            CommandSpec::parse("set-interval", &json!({"seconds": 30})),
            Ok(CommandSpec::SetInterval(SetIntervalArgs { seconds: 30 }))
        );
        assert_eq!(
            CommandSpec::parse("deregister", &json!(null)),
            Ok(CommandSpec::Deregister)
        );
    }

    #[test]
    fn bad_commands_are_explained() {
        let e = CommandSpec::parse("reboot-now", &json!(null)).unwrap_err();
        assert!(
            e.starts_with("command `reboot-now`: unknown variant `reboot-now`"),
            "{e}"
        );
        let e = CommandSpec::parse("set-interval", &json!({"secs": 3})).unwrap_err();
        assert!(e.contains("unknown field `secs`"), "{e}");
        let e = CommandSpec::parse("set-interval", &json!({"seconds": 0})).unwrap_err();
        assert_eq!(
            e,
            "command `set-interval`: seconds must be between 1 and 86400, got 0"
        );
    }

    #[test]
    fn heartbeat_response_tolerates_missing_optional_fields() {
        let r: HeartbeatResponse = serde_json::from_str(r#"{"interval_s": 60}"#).unwrap();
        assert!(r.commands.is_empty());
    }
}
