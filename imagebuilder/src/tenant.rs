//! `tenants/NAME.toml`: everything that differs between tenants' ISOs. Only `server_url` and a token
//! source are required; every other key has a documented default; unknown keys are errors naming the
//! key and the file.

use kernex_protocol::{SecretToken, TokenKind};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    #[error("reading tenant config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tenant config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("tenant config {path}: key `{key}`: {problem}")]
    Invalid {
        path: PathBuf,
        key: String,
        problem: String,
    },
}

/// The file as written. Optional keys get their defaults in [`Tenant`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantFile {
    server_url: String,
    #[serde(default)]
    token_file: Option<PathBuf>,
    #[serde(default)]
    token_from_server: Option<TokenFromServer>,
    #[serde(default)]
    ca_cert_file: Option<PathBuf>,
    #[serde(default)]
    ca_sha256: Option<String>,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    locale: Option<String>,
    #[serde(default)]
    timezone: Option<String>,
    #[serde(default)]
    keyboard: Option<Keyboard>,
    #[serde(default)]
    admin: Option<Admin>,
    #[serde(default)]
    network: Option<Network>,
    #[serde(default)]
    storage: Option<Storage>,
    #[serde(default)]
    vm: Vec<VmFile>,
    #[serde(default)]
    overlays: Vec<PathBuf>,
}

/// Fetch a fresh bootstrap token from the control plane at build time.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenFromServer {
    /// File holding an admin API key (`kxk_...`), relative to the tenant file.
    pub api_key_file: PathBuf,
    /// Devices the token may enroll (default: unlimited).
    #[serde(default)]
    pub uses: Option<u32>,
    /// Lifetime such as `30d` (default: until revoked).
    #[serde(default)]
    pub ttl: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Keyboard {
    pub layout: String,
    #[serde(default)]
    pub variant: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub username: String,
    /// crypt(3) hash (`mkpasswd -m sha-512`); `!` locks password login.
    #[serde(default = "locked")]
    pub password_hash: String,
    #[serde(default)]
    pub ssh_keys: Vec<String>,
}

fn locked() -> String {
    "!".to_owned()
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, tag = "mode", rename_all = "lowercase")]
pub enum Network {
    /// DHCP on every wired interface (the default).
    Dhcp,
    Static {
        /// Interface name pattern (netplan `match: name:`), e.g. `en*`.
        #[serde(default = "wired")]
        interface: String,
        /// CIDR, e.g. `192.0.2.10/24`.
        address: String,
        gateway: String,
        #[serde(default)]
        nameservers: Vec<String>,
    },
}

fn wired() -> String {
    "en*".to_owned()
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Storage {
    /// `lvm` (default) or `direct`: subiquity's guided layouts.
    pub layout: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmFile {
    name: String,
    address: String,
    secret_file: PathBuf,
}

/// A user VM as it goes into the bootstrap file.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Vm {
    pub name: String,
    pub address: String,
    pub secret: String,
}

/// Where the bootstrap token comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenSource {
    File(PathBuf),
    Server(TokenFromServer),
}

/// Replaced at install time by the first 8 hex digits of the installed system's machine id, so
/// every appliance of a tenant gets its own hostname from one ISO.
pub const MACHINE_ID_PLACEHOLDER: &str = "{machine_id}";

/// A validated tenant config with every default applied and every path made absolute.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub name: String,
    pub file: PathBuf,
    pub server_url: String,
    pub token_source: TokenSource,
    pub ca_cert: Option<String>,
    pub ca_sha256: Option<String>,
    /// A hostname, or a pattern with [`MACHINE_ID_PLACEHOLDER`].
    pub hostname: String,
    pub locale: String,
    pub timezone: String,
    pub keyboard: Keyboard,
    pub admin: Admin,
    pub network: Network,
    pub storage: Storage,
    pub vms: Vec<Vm>,
    pub overlays: Vec<PathBuf>,
}

impl Tenant {
    /// Loads `<dir>/<name>.toml`.
    pub fn load(dir: &Path, name: &str) -> Result<Tenant, TenantError> {
        let path = dir.join(format!("{name}.toml"));
        let invalid = |key: &str, problem: String| TenantError::Invalid {
            path: path.clone(),
            key: key.to_owned(),
            problem,
        };
        kernex_protocol::bootstrap::check_name(name).map_err(|p| invalid("(tenant name)", p))?;
        let text = std::fs::read_to_string(&path).map_err(|source| TenantError::Read {
            path: path.clone(),
            source,
        })?;
        let file: TenantFile = toml::from_str(&text).map_err(|e| TenantError::Parse {
            path: path.clone(),
            message: e.message().to_owned(),
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let relative = |p: &Path| {
            if p.is_absolute() {
                p.to_owned()
            } else {
                base.join(p)
            }
        };

        kernex_protocol::bootstrap::check_server_url(&file.server_url)
            .map_err(|p| invalid("server_url", p))?;
        let token_source = match (&file.token_file, &file.token_from_server) {
            (Some(f), None) => TokenSource::File(relative(f)),
            (None, Some(s)) => TokenSource::Server(TokenFromServer {
                api_key_file: relative(&s.api_key_file),
                ..s.clone()
            }),
            (None, None) => {
                return Err(invalid(
                    "token_file",
                    "missing: set token_file or [token_from_server]".into(),
                ))
            }
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "token_from_server",
                    "set either token_file or [token_from_server], not both".into(),
                ))
            }
        };
        let ca_cert = match &file.ca_cert_file {
            Some(f) => {
                let f = relative(f);
                let pem = std::fs::read_to_string(&f).map_err(|e| {
                    invalid("ca_cert_file", format!("reading {}: {e}", f.display()))
                })?;
                if !pem.contains("-----BEGIN CERTIFICATE-----") {
                    return Err(invalid(
                        "ca_cert_file",
                        format!("{} is not a PEM certificate", f.display()),
                    ));
                }
                Some(pem)
            }
            None => None,
        };
        if ca_cert.is_some() && file.ca_sha256.is_some() {
            return Err(invalid(
                "ca_sha256",
                "set either ca_cert_file or ca_sha256, not both".into(),
            ));
        }
        if let Some(pin) = &file.ca_sha256 {
            if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid("ca_sha256", "expected 64 hex digits".into()));
            }
        }
        let hostname = file
            .hostname
            .unwrap_or_else(|| format!("{name}-{{machine_id}}"));
        // The pattern's only placeholder stands for 8 hex digits; what remains must be a hostname.
        let sample = hostname.replace(MACHINE_ID_PLACEHOLDER, "0123abcd");
        if sample.is_empty()
            || sample.len() > 63
            || sample.starts_with('-')
            || !sample
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(invalid(
                "hostname",
                format!("`{hostname}` is not a valid hostname pattern (a-z, 0-9, '-' and {MACHINE_ID_PLACEHOLDER})"),
            ));
        }
        let admin = file.admin.unwrap_or(Admin {
            username: "kernex".into(),
            password_hash: locked(),
            ssh_keys: vec![],
        });
        if admin.username.is_empty()
            || !admin
                .username
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            return Err(invalid(
                "admin.username",
                format!("`{}` is not a valid user name", admin.username),
            ));
        }
        for (i, key) in admin.ssh_keys.iter().enumerate() {
            if !key.starts_with("ssh-") && !key.starts_with("ecdsa-") && !key.starts_with("sk-") {
                return Err(invalid(
                    &format!("admin.ssh_keys[{i}]"),
                    "not an OpenSSH public key".into(),
                ));
            }
        }
        let storage = file.storage.unwrap_or(Storage {
            layout: "lvm".into(),
        });
        if !["lvm", "direct"].contains(&storage.layout.as_str()) {
            return Err(invalid(
                "storage.layout",
                format!("`{}`: expected lvm or direct", storage.layout),
            ));
        }
        let mut vms = Vec::new();
        for (i, vm) in file.vm.iter().enumerate() {
            let f = relative(&vm.secret_file);
            let secret = std::fs::read_to_string(&f)
                .map_err(|e| {
                    invalid(
                        &format!("vm[{i}].secret_file"),
                        format!("reading {}: {e}", f.display()),
                    )
                })?
                .trim()
                .to_owned();
            vms.push(Vm {
                name: vm.name.clone(),
                address: vm.address.clone(),
                secret,
            });
        }
        let overlays = file
            .overlays
            .iter()
            .map(|p| relative(p))
            .collect::<Vec<_>>();
        for (i, dir) in overlays.iter().enumerate() {
            if !dir.is_dir() {
                return Err(invalid(
                    &format!("overlays[{i}]"),
                    format!("{} is not a directory", dir.display()),
                ));
            }
        }
        Ok(Tenant {
            name: name.to_owned(),
            file: path.clone(),
            server_url: file.server_url,
            token_source,
            ca_cert,
            ca_sha256: file.ca_sha256.map(|p| p.to_ascii_lowercase()),
            hostname,
            locale: file.locale.unwrap_or_else(|| "en_US.UTF-8".into()),
            timezone: file.timezone.unwrap_or_else(|| "Etc/UTC".into()),
            keyboard: file.keyboard.unwrap_or(Keyboard {
                layout: "us".into(),
                variant: String::new(),
            }),
            admin,
            network: file.network.unwrap_or(Network::Dhcp),
            storage,
            vms,
            overlays,
        })
    }

    /// The bootstrap token: read from its file, or created on the control plane with the API key.
    pub fn bootstrap_token(&self) -> anyhow::Result<SecretToken> {
        use anyhow::Context as _;
        match &self.token_source {
            TokenSource::File(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading token_file {}", path.display()))?;
                SecretToken::parse(TokenKind::Bootstrap, &text)
                    .with_context(|| format!("token_file {}", path.display()))
            }
            TokenSource::Server(spec) => {
                let key = std::fs::read_to_string(&spec.api_key_file).with_context(|| {
                    format!("reading api_key_file {}", spec.api_key_file.display())
                })?;
                let key = SecretToken::parse(TokenKind::ApiKey, &key)
                    .with_context(|| format!("api_key_file {}", spec.api_key_file.display()))?;
                let url = format!("{}/api/v1/tokens", self.server_url.trim_end_matches('/'));
                let body = serde_json::json!({
                    "uses": spec.uses, "ttl": spec.ttl,
                    "description": format!("imagebuilder: tenant {}", self.name),
                });
                let response: serde_json::Value = ureq::post(&url)
                    .set("authorization", &format!("Bearer {}", key.expose()))
                    .send_json(body)
                    .map_err(|e| match e {
                        ureq::Error::Status(status, r) => {
                            anyhow::anyhow!(
                                "POST {url}: HTTP {status}: {}",
                                r.into_string().unwrap_or_default()
                            )
                        }
                        other => anyhow::anyhow!("POST {url}: {other}"),
                    })?
                    .into_json()
                    .with_context(|| format!("POST {url}: reading the response"))?;
                let token = response["token"]
                    .as_str()
                    .with_context(|| format!("POST {url}: no token in the response"))?;
                SecretToken::parse(TokenKind::Bootstrap, token)
                    .with_context(|| format!("POST {url}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "acme.toml",
            "server_url = \"https://cp.example.net:8443\"\ntoken_file = \"acme.token\"\n",
        );
        let t = Tenant::load(dir.path(), "acme").unwrap();
        assert_eq!(
            t.token_source,
            TokenSource::File(dir.path().join("acme.token"))
        );
        assert_eq!(
            (t.hostname.as_str(), t.locale.as_str(), t.timezone.as_str()),
            ("acme-{machine_id}", "en_US.UTF-8", "Etc/UTC")
        );
        assert_eq!(t.network, Network::Dhcp);
        assert_eq!(t.admin.password_hash, "!");
    }

    #[test]
    fn errors_name_the_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("acme.toml");
        let load = |text: &str| {
            std::fs::write(&file, text).unwrap();
            Tenant::load(dir.path(), "acme").unwrap_err().to_string()
        };
        let e = load("server_url = \"https://a\"\ntoken_file = \"t\"\ncolour = \"red\"\n");
        assert!(
            e.starts_with(&format!(
                "tenant config {}: unknown field `colour`",
                file.display()
            )),
            "{e}"
        );
        let e = load("token_file = \"t\"\n");
        assert_eq!(
            e,
            format!(
                "tenant config {}: missing field `server_url`",
                file.display()
            )
        );
        let e = load("server_url = \"https://a\"\n");
        assert_eq!(e, format!("tenant config {}: key `token_file`: missing: set token_file or [token_from_server]", file.display()));
        let e =
            load("server_url = \"https://a\"\ntoken_file = \"t\"\n[storage]\nlayout = \"zfs\"\n");
        assert!(
            e.ends_with("key `storage.layout`: `zfs`: expected lvm or direct"),
            "{e}"
        );
        let e = load("server_url = \"https://a\"\ntoken_file = \"t\"\n[network]\nmode = \"static\"\naddress = \"192.0.2.2/24\"\n");
        assert!(e.contains("missing field `gateway`"), "{e}");
        let e = Tenant::load(dir.path(), "nobody").unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "reading tenant config {}",
                dir.path().join("nobody.toml").display()
            )),
            "{e}"
        );
    }

    #[test]
    fn token_files_are_checked_without_echoing_them() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "acme.toml",
            "server_url = \"https://a\"\ntoken_file = \"acme.token\"\n",
        );
        write(dir.path(), "acme.token", "kxb_not-a-token\n");
        let t = Tenant::load(dir.path(), "acme").unwrap();
        let e = format!("{:#}", t.bootstrap_token().unwrap_err());
        assert!(
            e.contains("not a bootstrap token") && !e.contains("not-a-token"),
            "{e}"
        );
    }
}
