//! Rate limits per device, per API key and per source address (429 with `Retry-After`, one
//! caller's excess never refusing another), and CORS only for the configured origin.

use kernex_protocol::wire::{HeartbeatRequest, Telemetry};
use kernex_tests::{into_reply, Reply, Server};
use std::time::Duration;

/// Sends `count` requests made by `send` back to back; the statuses in order.
fn burst(count: usize, mut send: impl FnMut() -> Reply) -> Vec<u16> {
    (0..count).map(|_| send().0).collect()
}

/// One heartbeat with a device bearer token, as an agent sends it.
pub fn heartbeat(server: &Server, token: &str) -> Reply {
    let body = HeartbeatRequest {
        agent_version: "test".into(),
        interval_s: None,
        telemetry: Telemetry::default(),
        acks: Vec::new(),
        vms: Vec::new(),
    };
    into_reply(
        ureq::post(&format!("{}/api/v1/heartbeat", server.url))
            .set("authorization", &format!("Bearer {token}"))
            .send_json(serde_json::to_value(body).unwrap()),
    )
}

/// Asserts that the first `allowed` of `statuses` passed and the rest were refused.
fn assert_limited(what: &str, statuses: &[u16], allowed: usize) {
    let passed = statuses.iter().take_while(|s| **s < 300).count();
    assert!(
        passed >= allowed && passed < statuses.len(),
        "{what}: expected {allowed} to pass then 429s, got {statuses:?}"
    );
    assert!(
        statuses[passed..].iter().all(|s| *s == 429),
        "{what}: {statuses:?}"
    );
}

#[test]
fn each_device_key_and_address_has_its_own_limit() {
    let server = Server::start_with(&[
        "--heartbeat-interval",
        "60s",
        "--rate-limit-device",
        "1/s:5",
        "--rate-limit-api-key",
        "1/s:5",
        "--rate-limit-address",
        "1/s:5",
    ]);
    let acme = server.tenant("acme");
    let tokens: Vec<String> = server
        .preauthorize("acme", 2)
        .into_iter()
        .map(|(_, token)| token)
        .collect();

    // Per device: the first device's burst runs out, the second device is untouched.
    assert_limited("device 1", &burst(8, || heartbeat(&server, &tokens[0])), 5);
    assert_eq!(heartbeat(&server, &tokens[1]).0, 200);
    let refused = into_reply(
        ureq::post(&format!("{}/api/v1/heartbeat", server.url))
            .set("authorization", &format!("Bearer {}", tokens[0]))
            .send_json(serde_json::json!({})),
    );
    assert_eq!(refused.1["error"]["code"], "rate_limited", "{refused:?}");
    assert!(
        refused.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("this device"),
        "{refused:?}"
    );

    // Per API key: another key of the same tenant still gets through.
    let (_, second) = acme.post("/apikeys", serde_json::json!({"role": "viewer"}));
    let second = acme.with_key(second["key"].as_str().unwrap());
    assert_limited("API key", &burst(8, || acme.get("/devices")), 4);
    assert_eq!(second.get("/devices").0, 200);

    // Per address, for requests without credentials; the header says when to come back, and
    // after that the caller is served again.
    let probe = || into_reply(ureq::get(&format!("{}/readyz", server.url)).call());
    assert_limited("address", &burst(8, probe), 5);
    let response = match ureq::get(&format!("{}/readyz", server.url)).call() {
        Err(ureq::Error::Status(429, response)) => response,
        other => panic!("expected 429, got {other:?}"),
    };
    let retry_after: u64 = response.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    std::thread::sleep(Duration::from_secs(retry_after));
    assert_eq!(probe().0, 200);
    // The device limit is per device, not per address: the address being over its limit does not
    // stop a device.
    assert_eq!(heartbeat(&server, &tokens[1]).0, 200);
}

#[test]
fn cors_only_for_the_configured_origin() {
    let server = Server::start_with(&["--cors-origin", "https://console.example.com"]);
    let preflight = |origin: &str| {
        ureq::request("OPTIONS", &format!("{}/api/v1/devices", server.url))
            .set("origin", origin)
            .set("access-control-request-method", "GET")
            .set("access-control-request-headers", "authorization")
            .call()
            .unwrap()
    };
    let allowed = preflight("https://console.example.com");
    assert_eq!(
        allowed.header("access-control-allow-origin"),
        Some("https://console.example.com")
    );
    assert!(allowed
        .header("access-control-allow-headers")
        .unwrap()
        .contains("authorization"));
    let other = preflight("https://evil.example.net");
    assert_eq!(other.header("access-control-allow-origin"), None);

    // Without --cors-origin, no CORS headers at all.
    let plain = Server::start();
    let response = ureq::get(&format!("{}/healthz", plain.url))
        .set("origin", "https://console.example.com")
        .call()
        .unwrap();
    assert_eq!(response.header("access-control-allow-origin"), None);
}
