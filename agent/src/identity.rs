//! Who this appliance is: its RSA-4096 key (generated once, kept in the state directory) and its
//! hardware id (survives a re-install, so the server can recognise a re-keyed appliance).

use crate::state::{write_atomic, StateDir};
use anyhow::Context as _;
use kernex_protocol::wire::Facts;
use kernex_protocol::DeviceKey;
use std::path::Path;

/// The device key, generated and saved (mode 0600) on first use.
pub fn load_or_generate_key(state: &StateDir) -> anyhow::Result<DeviceKey> {
    let path = state.key_file();
    match std::fs::read_to_string(&path) {
        Ok(pem) => DeviceKey::from_pkcs8_pem(&pem)
            .with_context(|| format!("loading device key {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            crate::info!(
                "generating RSA-{} device key (once; this can take a while)",
                kernex_protocol::DEVICE_KEY_BITS
            );
            let started = std::time::Instant::now();
            let key = DeviceKey::generate()?;
            write_atomic(&path, key.to_pkcs8_pem()?.as_bytes(), 0o600)?;
            crate::info!(
                "device key {} generated in {:.1?}",
                key.public().fingerprint(),
                started.elapsed()
            );
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading device key {}", path.display())),
    }
}

/// Files tried, in order, for a stable hardware id.
const HARDWARE_ID_SOURCES: &[&str] = &["/etc/machine-id", "/sys/class/dmi/id/product_uuid"];

/// `/etc/machine-id`, else the DMI product uuid.
pub fn detect_hardware_id() -> anyhow::Result<String> {
    for source in HARDWARE_ID_SOURCES {
        if let Ok(text) = std::fs::read_to_string(source) {
            let id = text.trim();
            if !id.is_empty() {
                return Ok(id.to_owned());
            }
        }
    }
    anyhow::bail!(
        "no hardware id: none of {} is readable and non-empty (pass --hardware-id)",
        HARDWARE_ID_SOURCES.join(", ")
    )
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(Path::new(path))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// What the agent tells the server about the appliance at enrollment.
pub fn facts() -> Facts {
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_owned())
        });
    Facts {
        hostname: read_trimmed("/proc/sys/kernel/hostname"),
        os,
        kernel: read_trimmed("/proc/sys/kernel/osrelease"),
        arch: Some(std::env::consts::ARCH.to_owned()),
        agent_version: Some(crate::VERSION.to_owned()),
    }
}
