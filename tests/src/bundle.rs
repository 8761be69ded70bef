//! Bundles for tests: publisher keys and packs made by the real `kernex-server bundle` commands,
//! uploads, and a [`Publisher`] that deploys them.

use crate::{binary, into_reply, Api, Reply, Server};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A publisher key made with `kernex-server bundle keygen`: (private, public) paths.
pub fn keygen(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{name}.pem"));
    let out = Command::new(binary("kernex-server"))
        .args(["bundle", "keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (key.clone(), key.with_extension("pub.pem"))
}

/// Writes a bundle directory and packs it with `kernex-server bundle pack`.
pub fn pack(dir: &Path, key: &Path, version: &str, health_ok: bool) -> PathBuf {
    pack_with(dir, key, version, health_ok, &[7u8; 300_000])
}

/// [`pack`] with the given payload (random bytes make a bundle as large as they are).
pub fn pack_with(
    dir: &Path,
    key: &Path,
    version: &str,
    health_ok: bool,
    payload: &[u8],
) -> PathBuf {
    let src = dir.join(format!("src-{version}"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(
        src.join("manifest.toml"),
        format!(
            "name = \"hello\"\nversion = \"{version}\"\n[scripts]\ninstall = \"install.sh\"\nhealth = \"health.sh\"\nrollback = \"rollback.sh\"\n[timeouts]\ninstall = \"20s\"\nhealth = \"3s\"\n"
        ),
    )
    .unwrap();
    let script = |name: &str, body: &str| {
        use std::os::unix::fs::PermissionsExt as _;
        let path = src.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    script(
        "install.sh",
        "echo \"installing $KERNEX_BUNDLE_NAME $KERNEX_BUNDLE_VERSION over '$KERNEX_PREVIOUS_VERSION'\"\necho \"$KERNEX_BUNDLE_VERSION\" > installed-version",
    );
    script(
        "health.sh",
        if health_ok {
            "exit 0"
        } else {
            "echo unhealthy >&2; exit 1"
        },
    );
    script(
        "rollback.sh",
        "echo rolled back > \"$KERNEX_BUNDLE_DIR/../../rollback-ran\"",
    );
    std::fs::write(src.join("payload.bin"), payload).unwrap();
    let out = dir.join(format!("hello-{version}.kxb"));
    let status = Command::new(binary("kernex-server"))
        .args(["bundle", "pack"])
        .arg(&src)
        .arg("--key")
        .arg(key)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    out
}

pub fn post_raw(api: &Api, path: &str, body: &[u8]) -> Reply {
    into_reply(
        ureq::post(&format!("{}/api/v1{path}", api.base))
            .set("authorization", &format!("Bearer {}", api.key))
            .send_bytes(body),
    )
}

pub fn upload(api: &Api, file: &Path) -> Reply {
    post_raw(api, "/bundles", &std::fs::read(file).unwrap())
}

/// A tenant with a trusted publisher key and a place to pack bundles.
#[derive(Debug)]
pub struct Publisher {
    pub api: Api,
    pub work: tempfile::TempDir,
    pub key: PathBuf,
}

impl Publisher {
    /// Tenant `acme`, created on `server`.
    pub fn new(server: &Server) -> Publisher {
        Publisher::with_api(server.tenant("acme"))
    }

    /// The tenant `api` belongs to.
    pub fn with_api(api: Api) -> Publisher {
        let work = tempfile::tempdir().unwrap();
        let (key, public) = keygen(work.path(), "publisher");
        let (status, body) = post_raw(&api, "/publisher-keys", &std::fs::read(public).unwrap());
        assert_eq!(status, 201, "{body}");
        Publisher { api, work, key }
    }

    /// Packs and uploads `hello` at `version` with `size` bytes of random payload; its id.
    pub fn bundle(&self, version: &str, size: usize) -> String {
        let payload: Vec<u8> = (0..size).map(|_| rand::random::<u8>()).collect();
        let file = pack_with(self.work.path(), &self.key, version, true, &payload);
        let (status, body) = upload(&self.api, &file);
        assert_eq!(status, 201, "{body}");
        body["id"].as_str().unwrap().to_owned()
    }

    /// Packs and uploads an agent bundle: `binary` as the new agent, `health` as the time it has
    /// to heartbeat; its id.
    pub fn agent_bundle(&self, version: &str, binary: &Path, health: &str) -> String {
        let src = self.work.path().join(format!("agent-{version}"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(
        src.join("manifest.toml"),
        format!(
            "name = \"kernex-agent\"\nversion = \"{version}\"\nagent_binary = \"kernex-agent\"\n[scripts]\ninstall = \"install.sh\"\n[timeouts]\nhealth = \"{health}\"\n"
        ),
    )
    .unwrap();
        let executable = |path: PathBuf| {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        std::fs::write(
            src.join("install.sh"),
            "#!/bin/sh\necho installing the agent\n",
        )
        .unwrap();
        executable(src.join("install.sh"));
        std::fs::copy(binary, src.join("kernex-agent")).unwrap();
        executable(src.join("kernex-agent"));
        let out = self.work.path().join(format!("agent-{version}.kxb"));
        let packed = Command::new(crate::binary("kernex-server"))
            .args(["bundle", "pack"])
            .arg(&src)
            .arg("--key")
            .arg(&self.key)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            packed.status.success(),
            "{}",
            String::from_utf8_lossy(&packed.stderr)
        );
        let (status, body) = upload(&self.api, &out);
        assert_eq!(status, 201, "{body}");
        body["id"].as_str().unwrap().to_owned()
    }

    pub fn deploy(&self, body: Value) -> String {
        let (status, created) = self.api.post("/deployments", body);
        assert_eq!(status, 201, "{created}");
        created["id"].as_str().unwrap().to_owned()
    }

    pub fn act(&self, deployment: &str, action: &str) -> Value {
        let (status, body) = self
            .api
            .post(&format!("/deployments/{deployment}/{action}"), json!({}));
        assert_eq!(status, 200, "{action}: {body}");
        body
    }

    /// The `deploy` commands a device received for `deployment`.
    pub fn deploy_commands(&self, device: &str, deployment: &str) -> usize {
        let (status, commands) = self.api.get(&format!("/devices/{device}/commands"));
        assert_eq!(status, 200, "{commands}");
        commands
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["kind"] == "deploy" && c["args"]["deployment"] == deployment)
            .count()
    }
}
