//! Webhooks: signed deliveries of device and rollout events, retried with backoff after failures,
//! each attempt in the delivery log; and with three replicas on one PostgreSQL, every event
//! delivered once (offline sweeps and rollout steps are not duplicated) while all replicas show the
//! same fleet.

use crate::rollout_resilience::fleet;
use hmac::{Hmac, Mac as _};
use kernex_tests::bundle::Publisher;
use kernex_tests::receiver::Receiver;
use kernex_tests::{wait_for, Agent, Api, Server};
use serde_json::{json, Value};
use std::time::Duration;

/// Checks `t=<unix>,v1=<hex>` against the body with the webhook's secret.
fn assert_signed(secret: &str, signature: &str, body: &[u8]) {
    let (t, v1) = signature
        .strip_prefix("t=")
        .and_then(|s| s.split_once(",v1="))
        .unwrap_or_else(|| panic!("malformed signature {signature:?}"));
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        v1,
        expected,
        "bad signature over {}",
        String::from_utf8_lossy(body)
    );
    let age = time::OffsetDateTime::now_utc().unix_timestamp() - t.parse::<i64>().unwrap();
    assert!((0..120).contains(&age), "signature time {t} is {age} s old");
}

fn subscribe(api: &Api, url: &str, events: Value) -> (String, String) {
    let (status, hook) = api.post("/webhooks", json!({"url": url, "events": events}));
    assert_eq!(status, 201, "{hook}");
    (
        hook["id"].as_str().unwrap().to_owned(),
        hook["secret"].as_str().unwrap().to_owned(),
    )
}

/// The accepted events of `kind` for `device` (or all of `kind` when `device` is empty).
fn events(receiver: &Receiver, kind: &str, device: &str) -> Vec<Value> {
    receiver
        .accepted()
        .into_iter()
        .filter(|e| e["kind"] == kind && (device.is_empty() || e["data"]["device_id"] == device))
        .collect()
}

#[test]
fn device_events_are_signed_retried_and_logged() {
    let server = Server::start_with(&[
        "--heartbeat-interval",
        "1s",
        "--offline-after",
        "2",
        "--webhook-retry-base",
        "1s",
    ]);
    let api = server.tenant("acme");

    // Refusals name what is wrong.
    for (body, needle) in [
        (json!({"url": "ftp://x.example/"}), "only http and https"),
        (
            json!({"url": "http://x.example/", "events": ["device.exploded"]}),
            "unknown event kind",
        ),
        (json!({"events": ["*"]}), "url"),
    ] {
        let (status, reply) = api.post("/webhooks", body.clone());
        assert_eq!(status, 400, "{body}: {reply}");
        assert!(
            reply["error"]["message"].as_str().unwrap().contains(needle),
            "{reply}"
        );
    }

    // The receiver fails the first two requests: the enrollment event arrives on the third try.
    let receiver = Receiver::start(2);
    let (hook, secret) = subscribe(
        &api,
        &receiver.url,
        json!(["device.enrolled", "device.offline", "device.online"]),
    );
    let token = server.token("acme", &[]);
    let mut agent = Agent::start(&server.url, "acme", &token);
    let enrolled = wait_for("device.enrolled delivered", Duration::from_secs(60), || {
        events(&receiver, "device.enrolled", "").pop()
    });
    let device = enrolled["data"]["device_id"].as_str().unwrap().to_owned();
    assert_eq!(enrolled["data"]["hardware_id"], agent.hardware_id.as_str());
    let attempts = receiver.received();
    assert_eq!(
        attempts.iter().map(|r| r.status).collect::<Vec<_>>(),
        [500, 500, 204],
        "{attempts:?}"
    );
    for attempt in &attempts {
        assert_signed(
            &secret,
            &attempt.headers["kernex-webhook-signature"],
            &attempt.body,
        );
        assert_eq!(attempt.headers["kernex-event"], "device.enrolled");
        assert_eq!(attempt.headers["content-type"], "application/json");
    }
    // Retries are the same event (same id), the delivery id names it.
    assert!(attempts.iter().all(|a| a.json()["id"] == enrolled["id"]));
    let (_, log) = api.get(&format!("/webhooks/{hook}/deliveries"));
    let entry = &log.as_array().unwrap()[0];
    assert_eq!(
        (
            entry["state"].as_str(),
            entry["attempts"].as_i64(),
            entry["last_status"].as_i64()
        ),
        (Some("delivered"), Some(3), Some(204)),
        "{log:#}"
    );

    // Offline once when the agent stops, online once when it is back.
    agent.kill();
    let offline = wait_for("device.offline delivered", Duration::from_secs(30), || {
        events(&receiver, "device.offline", &device).pop()
    });
    assert!(offline["data"]["last_heartbeat"].is_string(), "{offline}");
    agent.spawn();
    wait_for("device.online delivered", Duration::from_secs(60), || {
        events(&receiver, "device.online", &device).pop()
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(events(&receiver, "device.offline", &device).len(), 1);
    assert_eq!(events(&receiver, "device.online", &device).len(), 1);

    // Another tenant sees none of it; a deleted webhook gets nothing more.
    let other = server.tenant("other");
    assert_eq!(other.get(&format!("/webhooks/{hook}/deliveries")).0, 404);
    assert_eq!(api.delete(&format!("/webhooks/{hook}")).0, 204);
    let before = receiver.received().len();
    agent.kill();
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        receiver.received().len(),
        before,
        "a deleted webhook was called"
    );
}

#[test]
fn three_replicas_agree_and_announce_each_event_once() {
    let server = Server::start_with(&[
        "--heartbeat-interval",
        "1s",
        "--offline-after",
        "2",
        "--rollout-interval",
        "200ms",
    ]);
    let Some(second) = server.replica() else {
        eprintln!(
            "three_replicas: runs in the PostgreSQL suite only (SQLite is one process's database)"
        );
        return;
    };
    let third = server.replica().unwrap();
    let replicas = [&server, &second, &third];
    let publisher = Publisher::new(&server);
    let api = |replica: &Server| publisher.api.at(&replica.url);
    let receiver = Receiver::start(0);
    subscribe(&publisher.api, &receiver.url, json!(["*"]));

    // Six agents spread over the three replicas.
    let urls: Vec<&str> = replicas.iter().map(|r| r.url.as_str()).collect();
    let (mut agents, ids) = fleet(&server, &publisher.api, &urls, 6);

    // Every replica shows the same fleet.
    let view = |replica: &Server| {
        let mut devices: Vec<(String, String)> = api(replica)
            .devices()
            .iter()
            .map(|d| {
                (
                    d["id"].as_str().unwrap().to_owned(),
                    d["status"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        devices.sort();
        devices
    };
    let first = view(&server);
    assert_eq!(first.len(), 6);
    for replica in &replicas[1..] {
        assert_eq!(view(replica), first, "replica {} disagrees", replica.url);
    }

    // A command queued on the third replica for a device heartbeating to the first one.
    let (status, command) = api(&third).post(
        &format!("/devices/{}/commands", ids[0]),
        json!({"kind": "ping"}),
    );
    assert_eq!(status, 201, "{command}");
    let path = format!(
        "/devices/{}/commands/{}",
        ids[0],
        command["id"].as_str().unwrap()
    );
    wait_for("the ping acknowledged", Duration::from_secs(30), || {
        (api(&second).get(&path).1["state"] == "succeeded").then_some(())
    });

    // A rollout over all six, stepped by whichever replica gets there first: one command each,
    // one `deployment.finished`.
    let bundle = publisher.bundle("1.0.0", 64 * 1024);
    let deployment =
        publisher.deploy(json!({"bundle": bundle, "devices": ids, "phases": [1, "50%", "100%"]}));
    let done = wait_for("the rollout to succeed", Duration::from_secs(120), || {
        let (_, d) = api(&third).get(&format!("/deployments/{deployment}"));
        (d["state"] == "succeeded").then_some(d)
    });
    assert_eq!(done["totals"], json!({"succeeded": 6}), "{done:#}");
    for id in &ids {
        assert_eq!(publisher.deploy_commands(id, &deployment), 1, "{id}");
    }
    wait_for(
        "deployment.finished delivered",
        Duration::from_secs(30),
        || events(&receiver, "deployment.finished", "").pop(),
    );

    // All agents stop: every replica sweeps, each device is announced offline once.
    for agent in &mut agents {
        agent.kill();
    }
    wait_for("six device.offline events", Duration::from_secs(60), || {
        (events(&receiver, "device.offline", "").len() >= 6).then_some(())
    });
    std::thread::sleep(Duration::from_secs(4));
    for id in &ids {
        assert_eq!(events(&receiver, "device.offline", id).len(), 1, "{id}");
        assert_eq!(events(&receiver, "device.enrolled", id).len(), 1, "{id}");
    }
    assert_eq!(events(&receiver, "deployment.finished", "").len(), 1);
    let ids_seen: Vec<Value> = receiver
        .accepted()
        .iter()
        .map(|e| e["id"].clone())
        .collect();
    let mut unique = ids_seen.clone();
    unique.sort_by_key(|v| v.to_string());
    unique.dedup();
    assert_eq!(unique.len(), ids_seen.len(), "an event was delivered twice");
    for replica in &replicas {
        assert!(view(replica).iter().all(|(_, status)| status == "offline"));
    }
}
