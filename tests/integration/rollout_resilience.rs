//! Deployments when things go wrong on the way: a download cut or an agent killed mid-download
//! (resumed, not restarted), an operator pausing and cancelling, the agent dying at each step of
//! an installation, the server killed mid-rollout, several replicas on one PostgreSQL.

use crate::bundles::{active_version, deployment, wait_deployment};
use kernex_tests::bundle::Publisher;
use kernex_tests::proxy::{Download, Proxy};
use kernex_tests::{wait_for, Agent, Api, Server};
use serde_json::{json, Value};
use std::time::Duration;

const MIB: usize = 1024 * 1024;

/// Starts `n` agents against `urls` (round robin) and waits for them online; their device ids.
pub fn fleet(server: &Server, api: &Api, urls: &[&str], n: usize) -> (Vec<Agent>, Vec<String>) {
    let token = server.token("acme", &[]);
    let agents: Vec<Agent> = (0..n)
        .map(|i| Agent::start(urls[i % urls.len()], "acme", &token))
        .collect();
    let devices = wait_for(
        &format!("{n} devices online"),
        Duration::from_secs(120),
        || {
            let devices = api.devices();
            (devices.len() == n && devices.iter().all(|d| d["status"] == "online"))
                .then_some(devices)
        },
    );
    // In the order of `agents`: match by hardware id.
    let ids = agents
        .iter()
        .map(|agent| {
            devices
                .iter()
                .find(|d| d["hardware_id"] == agent.hardware_id.as_str())
                .unwrap_or_else(|| panic!("no device for {}: {devices:?}", agent.hardware_id))["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    (agents, ids)
}

pub fn device_state(deployment: &Value, device: &str) -> String {
    deployment["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == device)
        .unwrap_or_else(|| panic!("{device} not in {deployment:#}"))["state"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn wait_device_state(api: &Api, deployment_id: &str, device: &str, state: &str) -> Value {
    wait_for(
        &format!("{device} to be {state} in {deployment_id}"),
        Duration::from_secs(120),
        || {
            let d = deployment(api, deployment_id);
            (device_state(&d, device) == state).then_some(d)
        },
    )
}

/// The first byte asked for by a `Range: bytes=N-` header.
fn range_start(seen: &kernex_tests::proxy::Seen) -> Option<u64> {
    seen.header("range")?
        .strip_prefix("bytes=")?
        .strip_suffix('-')?
        .parse()
        .ok()
}

#[test]
fn downloads_resume_after_a_cut_connection_and_an_agent_restart_and_refuse_a_flipped_bit() {
    let server = Server::start_with(&["--heartbeat-interval", "1s", "--rollout-interval", "200ms"]);
    let publisher = Publisher::new(&server);
    let proxy = Proxy::start(&server.url);
    let (mut agents, ids) = fleet(&server, &publisher.api, &[&proxy.url], 1);
    let size = 4 * MIB;

    // The connection drops after 1 MiB: the agent asks for the rest, not for everything again.
    let bundle = publisher.bundle("1.0.0", size);
    proxy.set(Download::CutAfter(MIB as u64));
    let d1 = publisher.deploy(json!({"bundle": bundle, "devices": ids}));
    wait_deployment(&publisher.api, &d1, "succeeded");
    let downloads = proxy.downloads();
    assert_eq!(downloads.len(), 2, "{downloads:#?}");
    assert_eq!(range_start(&downloads[0]), None);
    let resumed_at = range_start(&downloads[1]).expect("the second download is ranged");
    assert!(
        resumed_at > MIB as u64 / 2 && resumed_at <= MIB as u64,
        "resumed at {resumed_at}"
    );
    assert!(
        proxy.downloaded() < (size + 256 * 1024) as u64,
        "{} bytes went through the proxy for a bundle of about {size}",
        proxy.downloaded()
    );
    assert_eq!(active_version(&agents[0]).as_deref(), Some("1.0.0"));

    // The agent is killed mid-download: once back, it picks up where its file ends.
    let bundle = publisher.bundle("1.1.0", size);
    let before = proxy.downloaded();
    proxy.set(Download::HoldAfter(MIB as u64));
    let d2 = publisher.deploy(json!({"bundle": bundle, "devices": ids}));
    wait_for("1 MiB of the download", Duration::from_secs(60), || {
        (proxy.downloaded() >= before + MIB as u64).then_some(())
    });
    agents[0].kill();
    proxy.release();
    agents[0].spawn();
    let done = wait_deployment(&publisher.api, &d2, "succeeded");
    let downloads = proxy.downloads();
    assert_eq!(downloads.len(), 4, "{downloads:#?}");
    let resumed_at = range_start(&downloads[3]).expect("the download after the restart is ranged");
    assert!(resumed_at > MIB as u64 / 2, "resumed at {resumed_at}");
    assert_eq!(active_version(&agents[0]).as_deref(), Some("1.1.0"));
    assert_eq!(publisher.deploy_commands(&ids[0], &d2), 1, "{done:#}");

    // One bit flipped on the wire: the agent's SHA-256 check refuses the bundle, nothing installs.
    let bundle = publisher.bundle("1.2.0", size);
    proxy.set(Download::FlipByteAt(2 * MIB as u64));
    let d3 = publisher.deploy(json!({"bundle": bundle, "devices": ids}));
    let halted = wait_deployment(&publisher.api, &d3, "halted");
    let message = halted["devices"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("SHA-256") && message.contains("expects"),
        "{halted:#}"
    );
    assert_eq!(active_version(&agents[0]).as_deref(), Some("1.1.0"));
    let downloads = agents[0].state_dir().join("deployments/downloads");
    assert_eq!(std::fs::read_dir(downloads).unwrap().count(), 0);
}

#[test]
fn an_operator_pauses_resumes_and_cancels_a_rollout() {
    let server = Server::start_with(&["--heartbeat-interval", "1s", "--rollout-interval", "200ms"]);
    let publisher = Publisher::new(&server);
    let proxy = Proxy::start(&server.url);
    let (agents, ids) = fleet(&server, &publisher.api, &[&proxy.url], 3);
    let phases = json!([1, "100%"]);

    // Paused while the canary downloads: the canary finishes, nobody else starts until resumed.
    let bundle = publisher.bundle("1.0.0", 2 * MIB);
    proxy.set(Download::HoldAfter(64 * 1024));
    let d1 = publisher.deploy(json!({"bundle": bundle, "devices": ids, "phases": phases}));
    let canary = wait_for("the canary downloading", Duration::from_secs(60), || {
        let d = deployment(&publisher.api, &d1);
        ids.iter()
            .find(|id| device_state(&d, id) == "downloading")
            .cloned()
    });
    assert_eq!(publisher.act(&d1, "pause")["state"], "paused");
    proxy.release();
    wait_device_state(&publisher.api, &d1, &canary, "succeeded");
    // Several engine intervals (200 ms) pass: still paused, the others still pending.
    std::thread::sleep(Duration::from_secs(2));
    let paused = deployment(&publisher.api, &d1);
    assert_eq!(paused["state"], "paused", "{paused:#}");
    assert_eq!(
        paused["totals"],
        json!({"succeeded": 1, "pending": 2}),
        "{paused:#}"
    );
    assert_eq!(publisher.act(&d1, "resume")["state"], "running");
    let done = wait_deployment(&publisher.api, &d1, "succeeded");
    assert_eq!(done["totals"], json!({"succeeded": 3}), "{done:#}");

    // Cancelled while the canary downloads: the others never start, the canary is told when it
    // reports next and stops before installing; every appliance stays on 1.0.0.
    let bundle = publisher.bundle("1.1.0", 2 * MIB);
    proxy.set(Download::HoldAfter(64 * 1024));
    let d2 = publisher.deploy(json!({"bundle": bundle, "devices": ids, "phases": phases}));
    let canary = wait_for("the canary downloading", Duration::from_secs(60), || {
        let d = deployment(&publisher.api, &d2);
        ids.iter()
            .find(|id| device_state(&d, id) == "downloading")
            .cloned()
    });
    let cancelled = publisher.act(&d2, "cancel");
    assert_eq!(cancelled["state"], "cancelled", "{cancelled:#}");
    proxy.release();
    let d = wait_device_state(&publisher.api, &d2, &canary, "cancelled");
    for device in d["devices"].as_array().unwrap() {
        let history: Vec<&str> = device["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["state"].as_str().unwrap())
            .collect();
        if device["id"] == canary.as_str() {
            assert_eq!(
                history,
                // The report that brings the news is recorded, then the agent stops.
                ["pending", "queued", "downloading", "verifying", "cancelled"],
                "{d:#}"
            );
        } else {
            assert_eq!(history, ["pending", "cancelled"], "{d:#}");
            assert_eq!(
                publisher.deploy_commands(device["id"].as_str().unwrap(), &d2),
                0
            );
        }
    }
    for agent in &agents {
        assert_eq!(active_version(agent).as_deref(), Some("1.0.0"));
    }
}

#[test]
fn an_agent_killed_at_each_step_comes_back_on_one_whole_version() {
    let server = Server::start_with(&["--heartbeat-interval", "1s", "--rollout-interval", "200ms"]);
    let api = server.tenant("acme");
    let (mut agents, ids) = fleet(&server, &api, &[&server.url], 1);
    // The publisher key comes after the agent authenticated: it travels with the deploy command.
    let publisher = Publisher::with_api(api);
    let first = publisher.bundle("1.0.0", 64 * 1024);
    let d = publisher.deploy(json!({"bundle": first, "devices": ids}));
    wait_deployment(&publisher.api, &d, "succeeded");

    // (step the agent dies after, what the deployment ends as, the version active afterwards)
    let steps = [
        ("after-extract", "failed", "1.0.0"),
        ("after-install", "failed", "1.0.0"),
        ("after-activate", "rolled-back", "1.0.0"),
        ("after-health", "rolled-back", "1.0.0"),
    ];
    for (i, (step, ends, active)) in steps.into_iter().enumerate() {
        let version = format!("1.0.{}", i + 1);
        let bundle = publisher.bundle(&version, 64 * 1024);
        agents[0].kill();
        agents[0].spawn_with_env(&[("KERNEX_AGENT_FAILPOINT", step)]);
        let d = publisher.deploy(json!({"bundle": bundle, "devices": ids}));
        let code = agents[0].wait_exit(Duration::from_secs(120));
        assert_eq!(code, 86, "the agent should have died at {step}");
        agents[0].spawn();
        let done = wait_for(
            &format!("{d} to end after a crash {step}"),
            Duration::from_secs(120),
            || {
                let done = deployment(&publisher.api, &d);
                ["succeeded", "halted"]
                    .contains(&done["state"].as_str().unwrap())
                    .then_some(done)
            },
        );
        assert_eq!(device_state(&done, &ids[0]), ends, "{step}: {done:#}");
        assert!(
            done["devices"][0]["message"]
                .as_str()
                .unwrap()
                .contains("restarted"),
            "{step}: {done:#}"
        );
        assert_eq!(
            active_version(&agents[0]).as_deref(),
            Some(active),
            "{step}"
        );
        // One whole version on disk per name: no staging left, no half-installed version.
        let root = agents[0].state_dir().join("bundles");
        let leftovers: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "hello")
            .collect();
        assert!(leftovers.is_empty(), "{step}: {leftovers:?}");
        assert!(!root.join("hello/journal.json").exists(), "{step}");
        assert!(
            ends != "failed" || !root.join("hello/versions").join(&version).exists(),
            "{step}: {version} left half installed"
        );
    }

    // And it still deploys normally.
    let last = publisher.bundle("1.1.0", 64 * 1024);
    let d = publisher.deploy(json!({"bundle": last, "devices": ids}));
    wait_deployment(&publisher.api, &d, "succeeded");
    assert_eq!(active_version(&agents[0]).as_deref(), Some("1.1.0"));
}

#[test]
fn a_rollout_survives_a_server_kill_and_replicas_step_it_once() {
    let interval = ["--heartbeat-interval", "1s", "--rollout-interval", "100ms"];
    let mut server = Server::start_with(&interval);
    let publisher = Publisher::new(&server);
    // On PostgreSQL two more replicas share the database and the bundle directory; agents are
    // spread over all three, and all three run the rollout engine.
    let replicas: Vec<Server> = (0..2).filter_map(|_| server.replica()).collect();
    let mut urls = vec![server.url.clone()];
    urls.extend(replicas.iter().map(|r| r.url.clone()));
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let (agents, ids) = fleet(&server, &publisher.api, &urls, 4);

    let bundle = publisher.bundle("1.0.0", 256 * 1024);
    let d = publisher.deploy(json!({"bundle": bundle, "devices": ids, "phases": [1, 2, "100%"]}));
    // Killed as soon as the first phase is done, then back on the same port and storage.
    wait_for(
        "the first phase to finish",
        Duration::from_secs(120),
        || {
            let d = deployment(&publisher.api, &d);
            (d["phase_totals"][0]["succeeded"] == 1).then_some(())
        },
    );
    server.restart();
    let done = wait_deployment(&publisher.api, &d, "succeeded");
    assert_eq!(done["totals"], json!({"succeeded": 4}), "{done:#}");
    for (agent, id) in agents.iter().zip(&ids) {
        assert_eq!(active_version(agent).as_deref(), Some("1.0.0"));
        assert_eq!(
            publisher.deploy_commands(id, &d),
            1,
            "{id} commanded other than once: {done:#}"
        );
    }
    for device in done["devices"].as_array().unwrap() {
        let history: Vec<&str> = device["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["state"].as_str().unwrap())
            .collect();
        assert_eq!(
            history.iter().filter(|s| **s == "queued").count(),
            1,
            "{device:#}"
        );
    }
}
