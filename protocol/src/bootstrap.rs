//! `/etc/kernex/bootstrap.toml`: written by imagebuilder into the installed system, read by the agent
//! on every start. Everything a fresh appliance needs to find and join its control plane.

use crate::token::{SecretToken, TokenKind};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The parsed and validated bootstrap file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BootstrapConfig {
    /// Base URL of the control plane, `https://host:port` (or `http://` when explicitly wanted).
    pub server_url: String,
    /// Tenant the appliance enrolls into.
    pub tenant: String,
    /// The bootstrap token (`kxb_...`). Secret: never logged.
    pub token: String,
    /// PEM of the CA that signed the server's certificate; the only CA trusted when set.
    #[serde(default)]
    pub ca_cert: Option<String>,
    /// SHA-256 (hex) of the server certificate's DER, as an alternative to `ca_cert`.
    #[serde(default)]
    pub ca_sha256: Option<String>,
    /// The KVM user VMs beside this appliance.
    #[serde(default)]
    pub vm: Vec<VmConfig>,
}

/// One `[[vm]]` entry.
#[derive(Debug, Clone, serde::Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub name: String,
    /// `tcp://HOST:PORT` or `vsock://CID:PORT`.
    pub address: String,
    /// Shared secret for the link's mutual authentication. Secret.
    pub secret: String,
}

/// Why a bootstrap file cannot be used. Always names the file; never contains the token.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("reading bootstrap config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing bootstrap config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("bootstrap config {path}: key `{key}`: {problem}")]
    Invalid {
        path: PathBuf,
        key: String,
        problem: String,
    },
}

impl BootstrapConfig {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<BootstrapConfig, BootstrapError> {
        let text = std::fs::read_to_string(path).map_err(|source| BootstrapError::Read {
            path: path.to_owned(),
            source,
        })?;
        BootstrapConfig::parse(path, &text)
    }

    /// Parses and validates `text`; `path` is only used in error messages.
    pub fn parse(path: &Path, text: &str) -> Result<BootstrapConfig, BootstrapError> {
        let config: BootstrapConfig = toml::from_str(text).map_err(|e| BootstrapError::Parse {
            path: path.to_owned(),
            // toml's message quotes the offending line, which may be the token line; keep only
            // the first line, which names the key and position.
            message: e.message().to_owned(),
        })?;
        config
            .validate()
            .map_err(|(key, problem)| BootstrapError::Invalid {
                path: path.to_owned(),
                key,
                problem,
            })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, problem: String| Err((key.to_owned(), problem));
        if let Err(problem) = check_server_url(&self.server_url) {
            return bad("server_url", problem);
        }
        if let Err(problem) = check_name(&self.tenant) {
            return bad("tenant", problem);
        }
        if let Err(e) = SecretToken::parse(TokenKind::Bootstrap, &self.token) {
            return bad("token", e.to_string());
        }
        match (&self.ca_cert, &self.ca_sha256) {
            (Some(_), Some(_)) => {
                return bad(
                    "ca_sha256",
                    "set either ca_cert or ca_sha256, not both".into(),
                )
            }
            (Some(pem), None) if !pem.contains("-----BEGIN CERTIFICATE-----") => {
                return bad(
                    "ca_cert",
                    "expected a PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
                )
            }
            (None, Some(pin)) if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) => {
                return bad(
                    "ca_sha256",
                    "expected 64 hex digits (SHA-256 of the certificate DER)".into(),
                )
            }
            _ => {}
        }
        if self.server_url.starts_with("http://")
            && (self.ca_cert.is_some() || self.ca_sha256.is_some())
        {
            return bad(
                "server_url",
                "a CA is configured but the URL is plain http://".into(),
            );
        }
        validate_vms(&self.vm)
    }
}

/// Checks a list of VMs (from the bootstrap file or a `vm.configure` command): names, no
/// duplicates, addresses, secrets. The error names the entry's key (`vm[1].address`).
pub fn validate_vms(vms: &[VmConfig]) -> Result<(), (String, String)> {
    let bad = |key: String, problem: String| Err((key, problem));
    let mut seen = std::collections::HashSet::new();
    for (i, vm) in vms.iter().enumerate() {
        if let Err(problem) = check_name(&vm.name) {
            return bad(format!("vm[{i}].name"), problem);
        }
        if !seen.insert(vm.name.as_str()) {
            return bad(
                format!("vm[{i}].name"),
                format!("duplicate VM name `{}`", vm.name),
            );
        }
        if let Err(problem) = check_vm_address(&vm.address) {
            return bad(format!("vm[{i}].address"), problem);
        }
        if vm.secret.len() < 16 {
            return bad(
                format!("vm[{i}].secret"),
                "must be at least 16 characters".into(),
            );
        }
    }
    Ok(())
}

/// Tenant and VM names: lowercase letters, digits and `-`, 1 to 63 characters, starting with a letter
/// or digit (they end up in hostnames, file names and URLs).
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid name (1-63 of a-z, 0-9 and '-', not starting with '-')"
        ))
    }
}

/// `http(s)://host[:port][/path]`, without query or fragment.
pub fn check_server_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("`{url}` must start with https:// or http://"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
            if !port.is_empty() && port.parse::<u16>().is_err() && !authority.ends_with(']') {
                return Err(format!("`{url}` has an invalid port `{port}`"));
            }
            host
        }
        _ => authority,
    };
    if host.is_empty() || url.contains(['?', '#', ' ']) {
        return Err(format!("`{url}` is not a valid server URL"));
    }
    Ok(())
}

fn check_vm_address(address: &str) -> Result<(), String> {
    let (scheme, rest) = address
        .split_once("://")
        .ok_or_else(|| format!("`{address}` must be tcp://HOST:PORT or vsock://CID:PORT"))?;
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| format!("`{address}` has no port"))?;
    if port.parse::<u16>().is_err() || host.is_empty() {
        return Err(format!(
            "`{address}` must be tcp://HOST:PORT or vsock://CID:PORT"
        ));
    }
    match scheme {
        "tcp" => Ok(()),
        "vsock" if host.parse::<u32>().is_ok() => Ok(()),
        "vsock" => Err(format!("`{address}`: a vsock CID is a number")),
        other => Err(format!(
            "`{address}`: unknown scheme `{other}` (tcp or vsock)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> String {
        SecretToken::generate(TokenKind::Bootstrap).expose()
    }

    fn parse(text: &str) -> Result<BootstrapConfig, BootstrapError> {
        BootstrapConfig::parse(Path::new("/etc/kernex/bootstrap.toml"), text)
    }

    #[test]
    fn the_documented_example_parses() {
        let text = format!(
            r#"
server_url = "https://cp.example.net:8443"
tenant     = "acme"
token      = "{}"
ca_sha256  = "{}"
[[vm]]
name    = "vm1"
address = "tcp://192.168.122.10:7070"
secret  = "0123456789abcdef0123"
[[vm]]
name    = "vm2"
address = "vsock://3:7070"
secret  = "0123456789abcdef0123"
"#,
            token(),
            "ab".repeat(32)
        );
        let config = parse(&text).unwrap();
        assert_eq!(config.tenant, "acme");
        assert_eq!(config.vm.len(), 2);
    }

    #[test]
    fn errors_name_the_file_and_key_and_never_the_token() {
        let t = token();
        let err = parse(&format!(
            "server_url = \"ftp://x\"\ntenant = \"acme\"\ntoken = \"{t}\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "bootstrap config /etc/kernex/bootstrap.toml: key `server_url`: `ftp://x` must start with https:// or http://"
        );
        let err = parse(&format!(
            "server_url = \"https://a\"\ntenant = \"acme\"\ntoken = \"{t}\"\ncolour = 1\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown field `colour`"), "{err}");
        assert!(!err.contains(&t));
        let err = parse("server_url = \"https://a\"\ntenant = \"acme\"\ntoken = \"kxb_secret\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("key `token`: not a bootstrap token"), "{err}");
        assert!(!err.contains("kxb_secret"));
        let err = parse("tenant = \"acme\"\n").unwrap_err().to_string();
        assert!(err.contains("missing field `server_url`"), "{err}");
    }

    #[test]
    fn vm_entries_are_checked() {
        let base = format!(
            "server_url = \"http://127.0.0.1:8080\"\ntenant = \"acme\"\ntoken = \"{}\"\n",
            token()
        );
        let vm = |name: &str, addr: &str| {
            format!(
                "[[vm]]\nname = \"{name}\"\naddress = \"{addr}\"\nsecret = \"0123456789abcdef\"\n"
            )
        };
        let err = parse(&format!(
            "{base}{}{}",
            vm("a", "tcp://h:1"),
            vm("a", "tcp://h:2")
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.ends_with("key `vm[1].name`: duplicate VM name `a`"),
            "{err}"
        );
        let err = parse(&format!("{base}{}", vm("a", "udp://h:1")))
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with("unknown scheme `udp` (tcp or vsock)"),
            "{err}"
        );
        let err = parse(&format!("{base}{}", vm("a", "vsock://x:1")))
            .unwrap_err()
            .to_string();
        assert!(err.ends_with("a vsock CID is a number"), "{err}");
    }

    #[test]
    fn server_urls() {
        for ok in [
            "https://cp.example.net:8443",
            "http://127.0.0.1:8080",
            "https://h/base",
            "https://[::1]:8443",
        ] {
            assert_eq!(check_server_url(ok), Ok(()), "{ok}");
        }
        for bad in [
            "cp.example.net",
            "https://",
            "https://h:99999",
            "https://h?x=1",
        ] {
            assert!(check_server_url(bad).is_err(), "{bad}");
        }
    }
}
