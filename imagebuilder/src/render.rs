//! Rendering the per-tenant seed: `nocloud/user-data`, `nocloud/meta-data`, the kernel arguments
//! for grub.cfg (minijinja templates from `autoinstall/`) and `/etc/kernex/bootstrap.toml` (TOML
//! written by serde, so a value can never break out of its quotes).

use crate::tenant::{Network, Tenant, MACHINE_ID_PLACEHOLDER};
use anyhow::Context as _;
use kernex_protocol::SecretToken;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::path::Path;

/// The templates, compiled in from `autoinstall/` or read from another directory.
#[derive(Debug, Clone)]
pub struct Templates {
    pub user_data: String,
    pub meta_data: String,
    pub kernel_args: String,
}

const TEMPLATE_FILES: [&str; 3] = ["user-data.j2", "meta-data.j2", "kernel-args.j2"];

impl Templates {
    pub fn builtin() -> Templates {
        Templates {
            user_data: include_str!("../../autoinstall/user-data.j2").to_owned(),
            meta_data: include_str!("../../autoinstall/meta-data.j2").to_owned(),
            kernel_args: include_str!("../../autoinstall/kernel-args.j2").to_owned(),
        }
    }

    pub fn from_dir(dir: &Path) -> anyhow::Result<Templates> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path)
                .with_context(|| format!("reading template {}", path.display()))
        };
        Ok(Templates {
            user_data: read(TEMPLATE_FILES[0])?,
            meta_data: read(TEMPLATE_FILES[1])?,
            kernel_args: read(TEMPLATE_FILES[2])?,
        })
    }

    /// SHA-256 over the template names and texts: identifies the templates in build records.
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        for (name, text) in
            TEMPLATE_FILES
                .iter()
                .zip([&self.user_data, &self.meta_data, &self.kernel_args])
        {
            h.update(name.as_bytes());
            h.update([0]);
            h.update(text.as_bytes());
            h.update([0]);
        }
        kernex_protocol::token::hex(&h.finalize())
    }
}

/// The rendered per-tenant files.
#[derive(Debug, Clone, PartialEq)]
pub struct Seed {
    pub user_data: String,
    pub meta_data: String,
    /// Inserted into the default grub.cfg entry's `linux` line, before `---`.
    pub kernel_args: String,
    /// Contains the token: written 0600, never logged.
    pub bootstrap_toml: String,
}

#[derive(Serialize)]
struct Context<'a> {
    tenant: &'a str,
    /// What the installer's identity section gets: the pattern with the placeholder left out.
    hostname: String,
    /// A late-command that sets the per-machine hostname, when `hostname` is a pattern.
    hostname_command: Option<String>,
    locale: &'a str,
    timezone: &'a str,
    keyboard: &'a crate::tenant::Keyboard,
    admin: &'a crate::tenant::Admin,
    network: NetworkContext<'a>,
    storage: &'a crate::tenant::Storage,
    instance_id: String,
}

#[derive(Serialize)]
struct NetworkContext<'a> {
    mode: &'static str,
    interface: &'a str,
    address: &'a str,
    gateway: &'a str,
    nameservers: &'a [String],
}

#[derive(Serialize)]
struct BootstrapFile<'a> {
    server_url: &'a str,
    tenant: &'a str,
    token: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    ca_cert: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ca_sha256: Option<&'a str>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    vm: &'a [crate::tenant::Vm],
}

/// Renders the seed for `tenant` with `token`.
pub fn render(templates: &Templates, tenant: &Tenant, token: &SecretToken) -> anyhow::Result<Seed> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.set_keep_trailing_newline(true);
    // JSON is valid YAML: every value lands as a quoted scalar or a flow sequence, never as YAML syntax.
    env.add_filter(
        "yaml",
        |value: minijinja::Value| -> Result<String, minijinja::Error> {
            serde_json::to_string(&value).map_err(|e| {
                minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string())
            })
        },
    );
    let network = match &tenant.network {
        Network::Dhcp => NetworkContext {
            mode: "dhcp",
            interface: "",
            address: "",
            gateway: "",
            nameservers: &[],
        },
        Network::Static {
            interface,
            address,
            gateway,
            nameservers,
        } => NetworkContext {
            mode: "static",
            interface,
            address,
            gateway,
            nameservers,
        },
    };
    let context = Context {
        tenant: &tenant.name,
        hostname: tenant
            .hostname
            .replace(MACHINE_ID_PLACEHOLDER, "")
            .trim_matches('-')
            .to_owned(),
        hostname_command: hostname_command(&tenant.hostname),
        locale: &tenant.locale,
        timezone: &tenant.timezone,
        keyboard: &tenant.keyboard,
        admin: &tenant.admin,
        network,
        storage: &tenant.storage,
        // Stable for the same tenant and token (reproducible builds), new for a new token.
        instance_id: format!("kernex-{}-{}", tenant.name, token.id()),
    };
    let render_one = |name: &str, text: &str| -> anyhow::Result<String> {
        env.render_str(text, &context)
            .with_context(|| format!("rendering template {name}"))
    };
    let bootstrap = BootstrapFile {
        server_url: &tenant.server_url,
        tenant: &tenant.name,
        token: token.expose(),
        ca_cert: tenant.ca_cert.as_deref(),
        ca_sha256: tenant.ca_sha256.as_deref(),
        vm: &tenant.vms,
    };
    let bootstrap_toml = format!(
        "# Written by imagebuilder for tenant {}; read by kernex-agent. Contains a secret.\n{}",
        tenant.name,
        toml::to_string(&bootstrap).context("encoding bootstrap.toml")?
    );
    // The agent must accept what we write: parse it back with the agent's own parser.
    kernex_protocol::BootstrapConfig::parse(Path::new("bootstrap.toml"), &bootstrap_toml)
        .context("the rendered bootstrap.toml does not pass the agent's checks")?;
    Ok(Seed {
        user_data: render_one(TEMPLATE_FILES[0], &templates.user_data)?,
        meta_data: render_one(TEMPLATE_FILES[1], &templates.meta_data)?,
        kernel_args: render_one(TEMPLATE_FILES[2], &templates.kernel_args)?
            .trim()
            .to_owned(),
        bootstrap_toml,
    })
}

/// The late-command that gives the installed system its own hostname from a pattern. The pattern
/// holds only `a-z0-9-` and the placeholder (checked in `tenant`), so it is safe inside the quotes.
fn hostname_command(pattern: &str) -> Option<String> {
    if !pattern.contains(MACHINE_ID_PLACEHOLDER) {
        return None;
    }
    let shell = pattern.replace(
        MACHINE_ID_PLACEHOLDER,
        "$(head -c 8 /target/etc/machine-id)",
    );
    Some(format!(
        "h=\"{shell}\"; echo \"$h\" > /target/etc/hostname; sed -i \"s/^127.0.1.1[[:space:]].*/127.0.1.1 $h/\" /target/etc/hosts || true"
    ))
}

/// Ubuntu's grub.cfg with autoinstall turned on: `kernel_args` added to the default (first) entry's
/// `linux` line before `---`, the menu timeout shortened; every other entry kept as it was.
pub fn patch_grub_cfg(original: &str, kernel_args: &str, timeout_s: u32) -> anyhow::Result<String> {
    let mut out = Vec::new();
    let mut in_first_entry = false;
    let mut seen_entry = false;
    let mut patched = false;
    let mut timeout_set = false;
    for line in original.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("set timeout=") && !timeout_set {
            out.push(format!("set timeout={timeout_s}"));
            timeout_set = true;
            continue;
        }
        if trimmed.starts_with("menuentry ") {
            in_first_entry = !seen_entry;
            seen_entry = true;
        }
        if in_first_entry
            && !patched
            && (trimmed.starts_with("linux\t") || trimmed.starts_with("linux "))
        {
            if trimmed.contains(" autoinstall") {
                anyhow::bail!("its default entry already has `autoinstall`: use a stock live-server ISO as --base");
            }
            let new = match line.find(" ---") {
                Some(at) => format!("{} {kernel_args}{}", line[..at].trim_end(), &line[at..]),
                None => format!("{} {kernel_args}", line.trim_end()),
            };
            out.push(new);
            patched = true;
            continue;
        }
        if trimmed == "}" {
            in_first_entry = false;
        }
        out.push(line.to_owned());
    }
    if !patched {
        anyhow::bail!("no menuentry with a `linux` line: not an Ubuntu live-server grub.cfg");
    }
    if !timeout_set {
        out.insert(0, format!("set timeout={timeout_s}"));
    }
    let mut text = out.join("\n");
    text.push('\n');
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UBUNTU_GRUB: &str = "set timeout=30\n\nloadfont unicode\n\nmenuentry \"Try or Install Ubuntu Server\" {\n\tset gfxpayload=keep\n\tlinux\t/casper/vmlinuz  ---\n\tinitrd\t/casper/initrd\n}\nmenuentry \"Ubuntu Server with the HWE kernel\" {\n\tset gfxpayload=keep\n\tlinux\t/casper/hwe-vmlinuz  ---\n\tinitrd\t/casper/hwe-initrd\n}\n";

    #[test]
    fn static_network_user_vms_and_fixed_hostnames_render_and_validate() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vm1.secret"), "0123456789abcdef0123\n").unwrap();
        std::fs::write(
            dir.path().join("acme.toml"),
            "server_url = \"https://cp.example.net\"\ntoken_file = \"t\"\nhostname = \"gw-1\"\n\
             [network]\nmode = \"static\"\naddress = \"192.0.2.10/24\"\ngateway = \"192.0.2.1\"\nnameservers = [\"192.0.2.53\"]\n\
             [[vm]]\nname = \"vm1\"\naddress = \"tcp://192.168.122.10:7070\"\nsecret_file = \"vm1.secret\"\n",
        )
        .unwrap();
        let tenant = Tenant::load(dir.path(), "acme").unwrap();
        let token = SecretToken::generate(kernex_protocol::TokenKind::Bootstrap);
        let seed = render(&Templates::builtin(), &tenant, &token).unwrap();
        crate::validate::validate_user_data(&seed.user_data, &seed.meta_data).unwrap();
        let yaml: serde_yaml::Value = serde_yaml::from_str(&seed.user_data).unwrap();
        let primary = &yaml["autoinstall"]["network"]["ethernets"]["primary"];
        assert_eq!(primary["addresses"][0].as_str(), Some("192.0.2.10/24"));
        assert_eq!(primary["routes"][0]["via"].as_str(), Some("192.0.2.1"));
        assert_eq!(
            primary["nameservers"]["addresses"][0].as_str(),
            Some("192.0.2.53")
        );
        assert_eq!(
            yaml["autoinstall"]["identity"]["hostname"].as_str(),
            Some("gw-1")
        );
        assert!(
            !seed.user_data.contains("machine-id"),
            "a fixed hostname needs no late-command"
        );
        let bootstrap =
            kernex_protocol::BootstrapConfig::parse(Path::new("b"), &seed.bootstrap_toml).unwrap();
        assert_eq!(bootstrap.vm[0].name, "vm1");
        assert_eq!(bootstrap.vm[0].secret, "0123456789abcdef0123");
        assert_eq!(bootstrap.token, token.expose());
    }

    #[test]
    fn grub_default_entry_gets_autoinstall_and_others_are_kept() {
        let out =
            patch_grub_cfg(UBUNTU_GRUB, r"autoinstall ds=nocloud\;s=/cdrom/nocloud/", 1).unwrap();
        assert!(out.starts_with("set timeout=1\n"));
        assert!(
            out.contains(
                "\tlinux\t/casper/vmlinuz autoinstall ds=nocloud\\;s=/cdrom/nocloud/ ---\n"
            ),
            "{out}"
        );
        assert!(
            out.contains("\tlinux\t/casper/hwe-vmlinuz  ---\n"),
            "the HWE entry is untouched: {out}"
        );
        let again = patch_grub_cfg(&out, "autoinstall", 1)
            .unwrap_err()
            .to_string();
        assert!(again.contains("already has `autoinstall`"), "{again}");
        assert!(patch_grub_cfg("set timeout=5\n", "x", 1).is_err());
    }
}
