//! Checks a rendered seed before anything is written: the YAML parses, the autoinstall section fits
//! typed structs written from subiquity's autoinstall reference (unknown keys refused), and the whole
//! user-data passes `cloud-init schema` where that tool is installed.

use anyhow::Context as _;
use serde::Deserialize;
use serde_yaml::Value;

/// The whole user-data as imagebuilder writes it: only the `autoinstall` key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserData {
    autoinstall: Autoinstall,
}

/// Subiquity's autoinstall v1 keys (https://canonical-subiquity.readthedocs-hosted.com/en/latest/reference/autoinstall-reference.html).
/// Sections imagebuilder writes are typed; the rest are accepted as any YAML value.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
#[allow(dead_code)] // fields exist to be checked, not read
struct Autoinstall {
    version: u32,
    interactive_sections: Option<Vec<String>>,
    early_commands: Option<Vec<String>>,
    locale: Option<String>,
    refresh_installer: Option<Value>,
    keyboard: Option<Keyboard>,
    source: Option<Value>,
    network: Option<Value>,
    proxy: Option<Value>,
    apt: Option<Value>,
    storage: Option<Value>,
    identity: Option<Identity>,
    active_directory: Option<Value>,
    ubuntu_pro: Option<Value>,
    ssh: Option<Ssh>,
    codecs: Option<Value>,
    drivers: Option<Value>,
    oem: Option<Value>,
    snaps: Option<Value>,
    debconf_selections: Option<String>,
    packages: Option<Vec<String>>,
    kernel: Option<Value>,
    kernel_crash_dumps: Option<Value>,
    timezone: Option<String>,
    updates: Option<String>,
    shutdown: Option<String>,
    late_commands: Option<Vec<String>>,
    error_commands: Option<Vec<String>>,
    reporting: Option<Value>,
    user_data: Option<Value>,
    zdevs: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Keyboard {
    layout: String,
    #[serde(default)]
    variant: String,
    #[serde(default)]
    toggle: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Identity {
    realname: Option<String>,
    username: String,
    hostname: String,
    password: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
#[allow(dead_code)]
struct Ssh {
    install_server: Option<bool>,
    authorized_keys: Option<Vec<String>>,
    allow_pw: Option<bool>,
}

/// What [`validate_user_data`] found, for the build record.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Validation {
    /// `passed`, or why `cloud-init schema` did not run.
    pub cloud_init_schema: String,
}

pub fn validate_user_data(user_data: &str, meta_data: &str) -> anyhow::Result<Validation> {
    if !user_data.starts_with("#cloud-config\n") {
        anyhow::bail!("user-data must start with `#cloud-config`");
    }
    let parsed: UserData =
        serde_yaml::from_str(user_data).context("user-data is not a valid autoinstall config")?;
    if parsed.autoinstall.version != 1 {
        anyhow::bail!(
            "user-data: autoinstall.version must be 1, not {}",
            parsed.autoinstall.version
        );
    }
    if parsed
        .autoinstall
        .interactive_sections
        .is_some_and(|s| !s.is_empty())
    {
        anyhow::bail!(
            "user-data: interactive-sections would stop a zero-touch install at a question"
        );
    }
    for (i, command) in parsed
        .autoinstall
        .late_commands
        .iter()
        .flatten()
        .enumerate()
    {
        if command.contains('\n') {
            anyhow::bail!(
                "user-data: late-commands[{i}] spans several lines; keep one command per line"
            );
        }
    }
    let meta: Value = serde_yaml::from_str(meta_data).context("meta-data is not valid YAML")?;
    if meta
        .get("instance-id")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        anyhow::bail!("meta-data has no instance-id (NoCloud needs one)");
    }
    Ok(Validation {
        cloud_init_schema: cloud_init_schema(user_data)?,
    })
}

/// Runs `cloud-init schema --config-file`; `Ok` with the reason when cloud-init is not installed.
fn cloud_init_schema(user_data: &str) -> anyhow::Result<String> {
    let Ok(tool) = which("cloud-init") else {
        return Ok("skipped: cloud-init is not installed".into());
    };
    let mut file = tempfile::NamedTempFile::new()
        .context("creating a temporary file for cloud-init schema")?;
    std::io::Write::write_all(&mut file, user_data.as_bytes())
        .context("writing user-data for cloud-init schema")?;
    let output = std::process::Command::new(&tool)
        .args(["schema", "--config-file"])
        .arg(file.path())
        .output()
        .with_context(|| format!("running {} schema", tool.display()))?;
    if !output.status.success() {
        anyhow::bail!(
            "`cloud-init schema --config-file` refused the user-data: {}{}",
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok("passed".into())
}

/// The first `name` on `PATH`.
pub fn which(name: &str) -> Result<std::path::PathBuf, String> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("`{name}` not found on PATH"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_autoinstall_keys_are_refused() {
        let err = validate_user_data(
            "#cloud-config\nautoinstall:\n  version: 1\n  late-comands: []\n",
            "instance-id: x\n",
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("unknown field `late-comands`"),
            "{err:#}"
        );
        let err =
            validate_user_data("autoinstall:\n  version: 1\n", "instance-id: x\n").unwrap_err();
        assert_eq!(err.to_string(), "user-data must start with `#cloud-config`");
        let err = validate_user_data(
            "#cloud-config\nautoinstall:\n  version: 2\n",
            "instance-id: x\n",
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "user-data: autoinstall.version must be 1, not 2"
        );
        let err =
            validate_user_data("#cloud-config\nautoinstall:\n  version: 1\n", "{}\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "meta-data has no instance-id (NoCloud needs one)"
        );
    }
}
