//! The whole chain under QEMU: kernex-server on loopback → `imagebuilder build` from the stand-in
//! base ISO (qemu/build-standin.sh; `KERNEX_STANDIN_ISO` points at it) → the ISO booted with BIOS
//! and with UEFI (OVMF), both at once → each appliance installs itself from the NoCloud seed, starts
//! the agent, enrolls and heartbeats with telemetry, as seen through the REST API; then a bundle is
//! rolled out to both, and the agent updates itself to a newer build.
//!
//! QEMU runs with `-accel tcg` (no KVM here); RSA-4096 key generation alone takes 5-30 s in such a
//! guest, so every wait is generous but bounded. Serial logs are kept on failure (the path is printed).

#![allow(clippy::unwrap_used)]

use kernex_tests::bundle::Publisher;
use kernex_tests::{binary, wait_for, Server};
use serde_json::{json, Value};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Where Debian's OVMF firmware lives.
const OVMF: &str = "/usr/share/ovmf/OVMF.fd";

struct Guest {
    child: Child,
    serial: PathBuf,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn boot(iso: &Path, firmware: &str, serial: PathBuf, extra: &[String]) -> Guest {
    let mut command = Command::new("qemu-system-x86_64");
    command
        .args([
            "-accel",
            "tcg",
            "-m",
            "1024",
            "-smp",
            "1",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args(["-nic", "user,model=e1000"])
        .args(extra)
        .arg("-cdrom")
        .arg(iso)
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if firmware == "uefi" {
        command.args(["-bios", OVMF]);
    }
    spawn(command, serial)
}

fn spawn(mut command: Command, serial: PathBuf) -> Guest {
    Guest {
        child: command
            .spawn()
            .expect("starting qemu-system-x86_64 (apt-get install qemu-system-x86 ovmf)"),
        serial,
    }
}

#[test]
fn tenant_iso_boots_with_bios_and_uefi_and_the_appliances_enroll() {
    let standin = PathBuf::from(
        std::env::var_os("KERNEX_STANDIN_ISO")
            .expect("KERNEX_STANDIN_ISO: build the stand-in base with `just standin`"),
    );
    assert!(
        standin.is_file(),
        "{} missing: `just standin` builds it",
        standin.display()
    );
    let server = Server::start_with(&["--heartbeat-interval", "5s"]);
    let api = server.tenant("acme");
    let token = server.token("acme", &["--uses", "2"]);

    let work = tempfile::Builder::new()
        .prefix("kernex-qemu-")
        .tempdir()
        .unwrap();
    let tenants = work.path().join("tenants");
    std::fs::create_dir(&tenants).unwrap();
    // The guest reaches the host's loopback at 10.0.2.2 (QEMU user networking).
    std::fs::write(
        tenants.join("acme.toml"),
        format!(
            "server_url = \"http://10.0.2.2:{}\"\ntoken_file = \"acme.token\"\n",
            server.port
        ),
    )
    .unwrap();
    std::fs::write(tenants.join("acme.token"), &token).unwrap();
    // The user VM beside the appliance, on a QEMU socket network of their own.
    std::fs::write(tenants.join("vm1.secret"), USER_VM_SECRET).unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(tenants.join("acme.toml"))
        .unwrap()
        .write_all(
            format!(
                "[[vm]]\nname = \"vm1\"\naddress = \"tcp://{USER_VM_IP}:7070\"\nsecret_file = \"vm1.secret\"\n"
            )
            .as_bytes(),
        )
        .unwrap();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new(binary("imagebuilder"))
        .current_dir(workspace)
        .args(["build", "--tenant", "acme", "--base"])
        .arg(&standin)
        .arg("--tenants-dir")
        .arg(&tenants)
        .arg("--out")
        .arg(work.path())
        .env("KERNEX_IMAGEBUILDER_CACHE", work.path().join("cache"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "imagebuilder build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let iso = work.path().join("acme.iso");

    // The user VM listens on the socket network; the BIOS appliance's second NIC joins it (the
    // UEFI one has no way to its VM: it must report it down, not fail).
    let vm_net = free_port();
    let user_vm = boot_user_vm(&work.path().join("uservm.serial"), vm_net);
    let guests = [
        boot(
            &iso,
            "bios",
            work.path().join("bios.serial"),
            &[
                "-netdev".into(),
                format!("socket,id=vmnet,connect=127.0.0.1:{vm_net}"),
                "-device".into(),
                "e1000,netdev=vmnet,mac=52:54:00:4b:58:02".into(),
            ],
        ),
        boot(&iso, "uefi", work.path().join("uefi.serial"), &[]),
    ];
    let keep_logs = KeepOnPanic(work);
    let devices = wait_for(
        "both appliances to enroll and heartbeat with telemetry",
        Duration::from_secs(600),
        || {
            let devices = api.devices();
            let ready = devices.len() == 2
                && devices.iter().all(|d| {
                    d["status"] == "online" && d["telemetry"]["mem_total_bytes"].as_u64() > Some(0)
                });
            ready.then_some(devices)
        },
    );
    for guest in &guests {
        let log = String::from_utf8_lossy(&std::fs::read(&guest.serial).unwrap()).into_owned();
        assert!(
            log.contains("standin: install finished"),
            "{}:\n{log}",
            guest.serial.display()
        );
        assert!(
            log.contains("standin: started kernex-agent.service"),
            "{}:\n{log}",
            guest.serial.display()
        );
    }
    let hardware: std::collections::HashSet<_> = devices
        .iter()
        .map(|d| d["hardware_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        hardware.len(),
        2,
        "two appliances, two identities: {devices:?}"
    );

    // The BIOS appliance linked its user VM and relays a call to it.
    let appliance = wait_for(
        "the appliance to report its user VM connected",
        Duration::from_secs(300),
        || {
            api.devices().into_iter().find(|d| {
                d["vms"].as_array().is_some_and(|v| {
                    v.iter()
                        .any(|vm| vm["name"] == "vm1" && vm["connected"] == true)
                })
            })
        },
    );
    let appliance_id = appliance["id"].as_str().unwrap();
    let linked = &appliance["vms"][0];
    assert_eq!(linked["info"]["hostname"], USER_VM_HOSTNAME, "{linked}");
    assert!(linked["rtt_ms"].as_f64().is_some(), "{linked}");
    let (status, queued) = api.post(
        &format!("/devices/{appliance_id}/commands"),
        json!({"kind": "vm.call", "args": {"vm": "vm1", "action": "hostname"}}),
    );
    assert_eq!(status, 201, "{queued}");
    let command_id = queued["id"].as_str().unwrap();
    let output = wait_for(
        "the relayed call's result",
        Duration::from_secs(120),
        || {
            let (_, c) = api.get(&format!("/devices/{appliance_id}/commands/{command_id}"));
            (c["state"] == "succeeded" || c["state"] == "failed").then_some(c)
        },
    );
    assert_eq!(output["state"], "succeeded", "{output}");
    let result: Value = serde_json::from_str(output["output"].as_str().unwrap()).unwrap();
    assert_eq!(
        result["result"]["stdout"].as_str().unwrap().trim(),
        USER_VM_HOSTNAME,
        "{result}"
    );
    let other = devices.iter().find(|d| d["id"] != appliance_id).unwrap();
    let (_, other) = api.get(&format!("/devices/{}", other["id"].as_str().unwrap()));
    assert_eq!(other["vms"][0]["connected"], false, "{other}");

    // A bundle to both appliances, canary first: installed, activated, health-checked in the
    // guest's own chroot, by the agent the ISO installed.
    let publisher = Publisher::with_api(api.clone());
    let hello = publisher.bundle("1.0.0", 256 * 1024);
    let ids: Vec<&str> = devices.iter().map(|d| d["id"].as_str().unwrap()).collect();
    let deployment =
        publisher.deploy(json!({"bundle": hello, "devices": ids, "phases": [1, "100%"]}));
    let done = settle(&publisher, &deployment);
    assert_eq!(done["state"], "succeeded", "{done:#}");
    assert_eq!(done["totals"], json!({"succeeded": 2}), "{done:#}");

    // And the agent updates itself in the guest: the real newer agent, started by the old one.
    if let Some(next) = std::env::var_os("KERNEX_AGENT_NEXT_BIN").map(PathBuf::from) {
        let out = Command::new(&next).arg("--version").output().unwrap();
        let newer = String::from_utf8_lossy(&out.stdout)
            .trim()
            .replace("kernex-agent ", "");
        let bundle = publisher.agent_bundle(&newer, &next, "120s");
        let deployment = publisher.deploy(json!({"bundle": bundle, "devices": ids}));
        let done = settle(&publisher, &deployment);
        assert_eq!(done["state"], "succeeded", "{done:#}");
        wait_for(
            "both appliances heartbeating with the new agent",
            Duration::from_secs(120),
            || {
                let devices = api.devices();
                devices
                    .iter()
                    .all(|d| d["agent_version"] == newer.as_str() && d["status"] == "online")
                    .then_some(())
            },
        );
    } else {
        eprintln!("KERNEX_AGENT_NEXT_BIN not set: the self-update in the guest is not exercised");
    }
    drop(guests);
    drop(user_vm);
    keep_logs.disarm();
}

const USER_VM_SECRET: &str = "user-vm-secret-0123456789";
const USER_VM_HOSTNAME: &str = "uservm-1";
const USER_VM_IP: &str = "192.168.76.10";

/// The user VM (qemu/build-uservm.sh: `KERNEX_USERVM_DIR` holds its vmlinuz and initrd) with its
/// NIC listening on `net` for the appliance. The secret goes on the kernel command line: a test
/// stand-in only; a real VM reads it from a file.
fn boot_user_vm(serial: &Path, net: u16) -> Guest {
    let dir = PathBuf::from(
        std::env::var_os("KERNEX_USERVM_DIR")
            .expect("KERNEX_USERVM_DIR: build the user VM with `just uservm`"),
    );
    let mut command = Command::new("qemu-system-x86_64");
    command
        .args(["-accel", "tcg", "-m", "256", "-smp", "1", "-display", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(dir.join("vmlinuz"))
        .arg("-initrd")
        .arg(dir.join("initrd"))
        .arg("-append")
        .arg(format!(
            "console=ttyS0 kernex.hostname={USER_VM_HOSTNAME} kernex.ip={USER_VM_IP}/24 kernex.secret={USER_VM_SECRET}"
        ))
        .arg("-netdev")
        .arg(format!("socket,id=vmnet,listen=127.0.0.1:{net}"))
        .args(["-device", "e1000,netdev=vmnet,mac=52:54:00:4b:58:01"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let guest = Guest {
        child: command.spawn().expect("starting qemu-system-x86_64"),
        serial: serial.to_owned(),
    };
    // Up (and QEMU listening) once the endpoint says so. No probe connection: QEMU's socket
    // network takes the first client that connects as the peer.
    wait_for(
        "the user VM's vm-endpoint",
        Duration::from_secs(180),
        || {
            std::fs::read(serial)
                .ok()
                .filter(|log| String::from_utf8_lossy(log).contains("vm-endpoint listening"))
                .map(|_| ())
        },
    );
    guest
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits for a deployment to end (TCG guests are slow: generous, bounded).
fn settle(publisher: &Publisher, id: &str) -> Value {
    wait_for(
        &format!("deployment {id} to end"),
        Duration::from_secs(300),
        || {
            let (_, d) = publisher.api.get(&format!("/deployments/{id}"));
            ["succeeded", "halted", "cancelled"]
                .contains(&d["state"].as_str().unwrap_or(""))
                .then_some(d)
        },
    )
}

/// Keeps the work directory (ISO, serial logs) when the test fails, and says where.
struct KeepOnPanic(tempfile::TempDir);

impl KeepOnPanic {
    fn disarm(self) {}
}

impl Drop for KeepOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let path = std::mem::replace(&mut self.0, tempfile::tempdir().unwrap()).keep();
            eprintln!("serial logs and ISO kept in {}", path.display());
        }
    }
}
