//! The agent updates itself through a bundle: a real newer agent (the musl agent built a second
//! time with another `KERNEX_AGENT_VERSION`, `just agent-next`) takes over and heartbeats; broken
//! replacements (one that hangs, one that crashes, one that lies about its version) are replaced
//! by the previous agent without help.

use crate::rollout_resilience::{device_state, fleet};
use kernex_tests::bundle::Publisher;
use kernex_tests::{binary, wait_for, Server};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn version_of(binary: &Path) -> String {
    let out = Command::new(binary).arg("--version").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    text.trim()
        .strip_prefix("kernex-agent ")
        .unwrap_or_else(|| panic!("{} --version said {text:?}", binary.display()))
        .to_owned()
}

/// A stand-in "agent" that answers `--version` like one and then misbehaves.
fn impostor(dir: &Path, version: &str, behaviour: &str) -> PathBuf {
    let path = dir.join(format!("impostor-{version}"));
    std::fs::write(
        &path,
        format!("#!/bin/sh\ncase \"$1\" in --version) echo \"kernex-agent {version}\";; *) {behaviour};; esac\n"),
    )
    .unwrap();
    path
}

fn device(publisher: &Publisher, id: &str) -> Value {
    let (status, device) = publisher.api.get(&format!("/devices/{id}"));
    assert_eq!(status, 200, "{device}");
    device
}

/// Deploys and waits for the deployment to end; the device's final state and message.
fn deploy_and_settle(publisher: &Publisher, bundle: &str, device: &str) -> (String, String) {
    let d = publisher.deploy(json!({"bundle": bundle, "devices": [device]}));
    let done = wait_for(
        &format!("deployment {d} to end"),
        Duration::from_secs(180),
        || {
            let (_, done) = publisher.api.get(&format!("/deployments/{d}"));
            ["succeeded", "halted"]
                .contains(&done["state"].as_str().unwrap_or(""))
                .then_some(done)
        },
    );
    (
        device_state(&done, device),
        done["devices"][0]["message"]
            .as_str()
            .unwrap_or("")
            .to_owned(),
    )
}

#[test]
fn the_agent_updates_itself_and_broken_updates_roll_themselves_back() {
    let Some(next) = std::env::var_os("KERNEX_AGENT_NEXT_BIN").map(PathBuf::from) else {
        eprintln!(
            "SKIPPED: set KERNEX_AGENT_NEXT_BIN to an agent built with another KERNEX_AGENT_VERSION \
             (`just agent-next`; `just test` does it)"
        );
        return;
    };
    let current = version_of(&binary("kernex-agent"));
    let newer = version_of(&next);
    assert_ne!(current, newer, "the next agent must report another version");

    let server = Server::start_with(&["--heartbeat-interval", "1s", "--rollout-interval", "200ms"]);
    let publisher = Publisher::new(&server);
    let (agents, ids) = fleet(&server, &publisher.api, &[&server.url], 1);
    let id = &ids[0];
    assert_eq!(device(&publisher, id)["agent_version"], current.as_str());

    // A real newer agent: staged, started by the old one, heartbeats, becomes the active agent.
    let bundle = publisher.agent_bundle(&newer, &next, "60s");
    let (state, message) = deploy_and_settle(&publisher, &bundle, id);
    assert_eq!(state, "succeeded", "{message}");
    assert!(message.contains("heartbeats and is active"), "{message}");
    wait_for(
        "the new agent's heartbeats",
        Duration::from_secs(30),
        || (device(&publisher, id)["agent_version"] == newer.as_str()).then_some(()),
    );
    let active = std::fs::read_link(agents[0].state_dir().join("agent/active")).unwrap();
    assert_eq!(active, Path::new("versions").join(&newer));

    // Replacements that never heartbeat: the previous agent comes back by itself each time.
    let work = publisher.work.path().to_owned();
    let broken = [
        (
            "0.99.1-hangs",
            "exec sleep 600",
            "did not heartbeat within 5s",
        ),
        ("0.99.2-crashes", "exit 3", "before its first heartbeat"),
    ];
    for (version, behaviour, why) in broken {
        let bundle = publisher.agent_bundle(version, &impostor(&work, version, behaviour), "5s");
        let (state, message) = deploy_and_settle(&publisher, &bundle, id);
        assert_eq!(state, "rolled-back", "{version}: {message}");
        assert!(message.contains(why), "{version}: {message}");
        assert!(
            message.contains(&format!("kernex-agent {newer} runs again")),
            "{message}"
        );
        let before = device(&publisher, id)["last_heartbeat"].clone();
        wait_for(
            "heartbeats from the restored agent",
            Duration::from_secs(30),
            || {
                let now = device(&publisher, id);
                (now["last_heartbeat"] != before && now["agent_version"] == newer.as_str())
                    .then_some(())
            },
        );
        assert!(
            !agents[0].state_dir().join("agent/trial.json").exists(),
            "{version}"
        );
        assert!(
            !agents[0]
                .state_dir()
                .join("agent/versions")
                .join(version)
                .exists(),
            "{version}"
        );
    }

    // A binary that is not what its manifest says never runs as the agent.
    let bundle = publisher.agent_bundle("0.99.3", &impostor(&work, "6.6.6", "exit 0"), "5s");
    let (state, message) = deploy_and_settle(&publisher, &bundle, id);
    assert_eq!(state, "failed", "{message}");
    assert!(
        message.contains("promises kernex-agent 0.99.3"),
        "{message}"
    );
    assert_eq!(
        std::fs::read_link(agents[0].state_dir().join("agent/active")).unwrap(),
        Path::new("versions").join(&newer)
    );
}
