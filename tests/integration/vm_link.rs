//! The appliance ↔ user VM link with real processes: a server, an appliance agent, and
//! `kernex-agent vm-endpoint` processes standing in for two user VMs. Links come up and report
//! through heartbeats; calls are relayed; a wrong secret, a VM that goes away and comes back, a
//! slow action, too much output and an unknown VM each end in their own clear error; the VM list
//! changes without a restart.

use kernex_tests::{wait_for, Agent, Api, Server, VmEndpoint};
use serde_json::{json, Value};
use std::time::Duration;

const SECRET1: &str = "vm1-secret-0123456789";
const SECRET2: &str = "vm2-secret-9876543210";

fn vms(api: &Api, device: &str) -> Vec<Value> {
    let (status, body) = api.get(&format!("/devices/{device}"));
    assert_eq!(status, 200, "{body}");
    body["vms"].as_array().cloned().unwrap_or_default()
}

fn vm(api: &Api, device: &str, name: &str) -> Option<Value> {
    vms(api, device).into_iter().find(|v| v["name"] == name)
}

fn wait_vm(
    api: &Api,
    device: &str,
    name: &str,
    what: &str,
    accept: impl Fn(&Value) -> bool,
) -> Value {
    wait_for(&format!("{name} {what}"), Duration::from_secs(60), || {
        vm(api, device, name).filter(|v| accept(v))
    })
}

/// Queues a command and waits for its result: (state, output parsed as JSON when it is).
fn command(api: &Api, device: &str, kind: &str, args: Value) -> (String, Value) {
    let (status, queued) = api.post(
        &format!("/devices/{device}/commands"),
        json!({"kind": kind, "args": args}),
    );
    assert_eq!(status, 201, "{queued}");
    let id = queued["id"].as_str().unwrap().to_owned();
    wait_for(
        &format!("{kind} {id} to finish"),
        Duration::from_secs(90),
        || {
            let (_, c) = api.get(&format!("/devices/{device}/commands/{id}"));
            let state = c["state"].as_str().unwrap_or("").to_owned();
            (state == "succeeded" || state == "failed").then(|| {
                let output = c["output"].as_str().unwrap_or("");
                (
                    state,
                    serde_json::from_str(output).unwrap_or(Value::String(output.into())),
                )
            })
        },
    )
}

fn call(api: &Api, device: &str, vm: &str, action: &str, timeout_s: u32) -> (String, Value) {
    command(
        api,
        device,
        "vm.call",
        json!({"vm": vm, "action": action, "timeout_s": timeout_s}),
    )
}

#[test]
fn the_appliance_links_its_vms_relays_calls_and_says_what_went_wrong() {
    let server = Server::start();
    let api = server.tenant("acme");
    let actions = [
        "--action",
        "slow=sleep 30",
        "--action",
        "flood=head -c 100000 /dev/zero",
        "--action",
        "echo=echo \"$@\"",
    ];
    let mut vm1 = VmEndpoint::start(SECRET1, &actions);
    let vm2 = VmEndpoint::start(SECRET2, &[]);
    let token = server.token("acme", &[]);
    // vm3 points at vm2's endpoint with another secret: the handshake must fail, both ways.
    let agent = Agent::start_with_bootstrap(&format!(
        "server_url = \"{}\"\ntenant = \"acme\"\ntoken = \"{token}\"\n\
         [[vm]]\nname = \"vm1\"\naddress = \"{}\"\nsecret = \"{SECRET1}\"\n\
         [[vm]]\nname = \"vm2\"\naddress = \"{}\"\nsecret = \"{SECRET2}\"\n\
         [[vm]]\nname = \"vm3\"\naddress = \"{}\"\nsecret = \"wrong-secret-000000000\"\n",
        server.url,
        vm1.address(),
        vm2.address(),
        vm2.address()
    ));
    let device = api.wait_device("the appliance online", |d| d["status"] == "online")["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Both VMs linked, with info and a round-trip time; vm3 refused for its secret.
    for name in ["vm1", "vm2"] {
        let v = wait_vm(&api, &device, name, "connected with info", |v| {
            v["connected"] == true && v["info"]["hostname"].is_string()
        });
        assert!(v["rtt_ms"].as_f64().unwrap() >= 0.0, "{v}");
        assert!(v["info"]["mem_total_bytes"].as_u64() > Some(0), "{v}");
        assert!(v["last_seen"].as_i64() > Some(0), "{v}");
    }
    let v3 = wait_vm(&api, &device, "vm3", "refused", |v| {
        v["state"] == "auth-failed"
    });
    assert_eq!(v3["connected"], false);
    assert!(v3["error"].as_str().unwrap().contains("secret"), "{v3}");

    // A relayed call returns the VM's hostname; arguments reach the action.
    let hostname = vm(&api, &device, "vm1").unwrap()["info"]["hostname"].clone();
    let (state, out) = call(&api, &device, "vm1", "hostname", 10);
    assert_eq!(state, "succeeded", "{out}");
    assert_eq!(out["result"]["stdout"].as_str().unwrap().trim(), hostname);
    let (state, out) = command(
        &api,
        &device,
        "vm.call",
        json!({"vm": "vm1", "action": "echo", "args": ["a b", "c"]}),
    );
    assert_eq!(
        (state.as_str(), out["result"]["stdout"].as_str()),
        ("succeeded", Some("a b c\n")),
        "{out}"
    );

    // Each failure with its code.
    let failures = [
        ("vm9", "hostname", 10, "vm_unknown"),
        ("vm3", "hostname", 10, "vm_auth_failed"),
        ("vm1", "slow", 1, "vm_timeout"),
        ("vm1", "flood", 10, "vm_output_too_large"),
        ("vm2", "slow", 10, "vm_action_not_allowed"),
    ];
    for (name, action, timeout, code) in failures {
        let (state, out) = call(&api, &device, name, action, timeout);
        assert_eq!(state, "failed", "{name} {action}: {out}");
        assert_eq!(out["error"]["code"], code, "{name} {action}: {out}");
    }
    // The slow action did not hold up the link: vm1 still answers.
    assert_eq!(call(&api, &device, "vm1", "hostname", 10).0, "succeeded");
    // A slow VM holds up nobody else: while vm1 runs a 4 s action, vm2 answers and the appliance
    // keeps heartbeating.
    let (status, slow) = api.post(
        &format!("/devices/{device}/commands"),
        json!({"kind": "vm.call", "args": {"vm": "vm1", "action": "slow", "timeout_s": 4}}),
    );
    assert_eq!(status, 201, "{slow}");
    let started = std::time::Instant::now();
    let (state, _) = call(&api, &device, "vm2", "hostname", 10);
    assert_eq!(state, "succeeded");
    let (_, slow) = api.get(&format!(
        "/devices/{device}/commands/{}",
        slow["id"].as_str().unwrap()
    ));
    assert!(
        !["succeeded", "failed"].contains(&slow["state"].as_str().unwrap()),
        "vm2 answered after {:?}, after vm1's slow call ended: {slow}",
        started.elapsed()
    );

    // vm1 goes away: reported down, calls say so; it comes back on the same port: linked again.
    vm1.kill();
    wait_vm(&api, &device, "vm1", "down", |v| v["connected"] == false);
    let (state, out) = call(&api, &device, "vm1", "hostname", 10);
    assert_eq!(
        (state.as_str(), &out["error"]["code"]),
        ("failed", &json!("vm_down")),
        "{out}"
    );
    vm1.spawn();
    wait_vm(&api, &device, "vm1", "back", |v| v["connected"] == true);
    assert_eq!(call(&api, &device, "vm1", "hostname", 10).0, "succeeded");

    // A new VM list, without a restart: vm3 gets the right secret, vm2 goes.
    let (state, out) = command(
        &api,
        &device,
        "vm.configure",
        json!({"vms": [
            {"name": "vm1", "address": vm1.address(), "secret": SECRET1},
            {"name": "vm3", "address": vm2.address(), "secret": SECRET2},
        ]}),
    );
    assert_eq!(state, "succeeded", "{out}");
    wait_vm(&api, &device, "vm3", "linked with the new secret", |v| {
        v["connected"] == true
    });
    wait_for("vm2 gone from the list", Duration::from_secs(30), || {
        vm(&api, &device, "vm2").is_none().then_some(())
    });
    // A bad list is refused by the server before it reaches the appliance, naming the entry.
    let (status, body) = api.post(
        &format!("/devices/{device}/commands"),
        json!({"kind": "vm.configure", "args": {"vms": [{"name": "vm1", "address": "udp://x:1", "secret": SECRET1}]}}),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("vm[0].address"),
        "{body}"
    );
    // Secrets never show in `status`.
    let status = agent.status();
    assert!(!status.to_string().contains(SECRET1), "{status}");
}
