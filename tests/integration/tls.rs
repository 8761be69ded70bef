//! HTTPS served by kernex-server itself; the agent trusts only the CA (or certificate) its bootstrap
//! config names.

use kernex_tests::{wait_for, Agent, Server};
use std::time::Duration;

struct Pki {
    ca_pem: String,
    leaf_der_sha256: String,
    dir: tempfile::TempDir,
    ca: (rcgen::Certificate, rcgen::KeyPair),
}

fn pki() -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let leaf_der_sha256 = issue_leaf(&ca, &ca_key, dir.path());
    Pki {
        ca_pem: ca.pem(),
        leaf_der_sha256,
        dir,
        ca: (ca, ca_key),
    }
}

/// A server on HTTPS with the certificate of `pki` (1 s heartbeats).
fn tls_server(pki: &Pki) -> Server {
    let cert = pki.dir.path().join("cert.pem");
    let key = pki.dir.path().join("key.pem");
    Server::start_with(&[
        "--heartbeat-interval",
        "1s",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ])
}

/// A bootstrap file for tenant acme on `server` with the trust line `trust`.
fn bootstrap(server: &Server, token: &str, trust: &str) -> String {
    format!(
        "server_url = \"{}\"\ntenant = \"acme\"\ntoken = \"{token}\"\n{trust}\n",
        server.url
    )
}

/// A new server certificate for 127.0.0.1 signed by `ca`, written as `cert.pem` and `key.pem` in
/// `dir` (replacing what is there); the SHA-256 of its DER (what `ca_sha256` pins).
fn issue_leaf(ca: &rcgen::Certificate, ca_key: &rcgen::KeyPair, dir: &std::path::Path) -> String {
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, ca, ca_key)
        .unwrap();
    std::fs::write(dir.join("cert.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), leaf_key.serialize_pem()).unwrap();
    sha2_shim::digest_hex(leaf.der())
}

mod sha2_shim {
    /// SHA-256 hex through the protocol crate's fingerprint helper (no extra dependency).
    pub fn digest_hex(bytes: &[u8]) -> String {
        use rsa::sha2::{Digest, Sha256};
        kernex_protocol::token::hex(&Sha256::digest(bytes))
    }
}

#[test]
fn agents_trust_only_the_configured_ca_or_pin() {
    let pki = pki();
    let server = tls_server(&pki);
    assert!(server.url.starts_with("https://"), "{}", server.url);
    server.admin(&["tenant", "create", "acme"]);
    let token = server.token("acme", &[]);
    let bootstrap = |trust: &str| bootstrap(&server, &token, trust);

    let with_ca =
        Agent::start_with_bootstrap(&bootstrap(&format!("ca_cert = '''\n{}'''", pki.ca_pem)));
    let with_pin = Agent::start_with_bootstrap(&bootstrap(&format!(
        "ca_sha256 = \"{}\"",
        pki.leaf_der_sha256
    )));
    let stranger = pki_stranger();
    let wrong_ca =
        Agent::start_with_bootstrap(&bootstrap(&format!("ca_cert = '''\n{stranger}'''")));
    let wrong_pin =
        Agent::start_with_bootstrap(&bootstrap(&format!("ca_sha256 = \"{}\"", "0".repeat(64))));

    for agent in [&with_ca, &with_pin] {
        wait_for(
            "an agent to heartbeat over TLS",
            Duration::from_secs(90),
            || agent.status()["last_heartbeat_at"].as_i64(),
        );
    }
    for agent in [&wrong_ca, &wrong_pin] {
        let error = wait_for(
            "an agent to refuse the server",
            Duration::from_secs(90),
            || agent.status()["last_error"].as_str().map(str::to_owned),
        );
        assert!(
            error.contains("certificate") || error.contains("UnknownIssuer"),
            "{error}"
        );
        assert!(agent.status()["device_id"].is_null());
    }
}

/// A CA that signed nothing the server presents.
fn pki_stranger() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.self_signed(&key).unwrap().pem()
}

#[test]
fn plain_http_off_loopback_must_be_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(kernex_tests::binary("kernex-server"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["serve", "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to serve plain HTTP on 0.0.0.0:0")
            && stderr.contains("--plain-http"),
        "{stderr}"
    );
    // Asked for: it serves, with a warning.
    let mut child = std::process::Command::new(kernex_tests::binary("kernex-server"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["serve", "--listen", "0.0.0.0:0", "--plain-http"])
        .env("KERNEX_LOG_FORMAT", "json")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let port = line.split(':').nth(2).unwrap().split(' ').next().unwrap();
    let status = ureq::get(&format!("http://127.0.0.1:{port}/healthz"))
        .call()
        .unwrap()
        .status();
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert_eq!(status, 200, "{line}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("serving plain HTTP on a non-loopback address"),
        "{stderr}"
    );
}

#[test]
fn a_renewed_certificate_is_served_after_sighup_without_a_restart() {
    let pki = pki();
    let server = tls_server(&pki);
    server.admin(&["tenant", "create", "acme"]);
    let token = server.token("acme", &[]);
    let bootstrap = |trust: &str| bootstrap(&server, &token, trust);
    let with_ca =
        Agent::start_with_bootstrap(&bootstrap(&format!("ca_cert = '''\n{}'''", pki.ca_pem)));
    let beat = |agent: &Agent| agent.status()["last_heartbeat_at"].as_i64();
    wait_for("the CA agent to heartbeat", Duration::from_secs(90), || {
        beat(&with_ca)
    });

    // Renewal: new files in place. Until SIGHUP the old certificate is served, so an agent
    // pinned to the new one is refused.
    let renewed = issue_leaf(&pki.ca.0, &pki.ca.1, pki.dir.path());
    let pinned_new = Agent::start_with_bootstrap(&bootstrap(&format!("ca_sha256 = \"{renewed}\"")));
    wait_for(
        "the pinned agent to be refused",
        Duration::from_secs(90),
        || {
            pinned_new.status()["last_error"]
                .as_str()
                .map(str::to_owned)
        },
    );
    assert!(pinned_new.status()["device_id"].is_null());

    let status = std::process::Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    wait_for(
        "the pinned agent to heartbeat after the reload",
        Duration::from_secs(90),
        || beat(&pinned_new),
    );
    // The same process served throughout, and the CA agent carries on.
    let before = beat(&with_ca).unwrap();
    wait_for(
        "the CA agent to heartbeat again",
        Duration::from_secs(30),
        || beat(&with_ca).filter(|t| *t > before),
    );
}
