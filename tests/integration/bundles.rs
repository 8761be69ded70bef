//! Bundles through the real server: publisher keys, streamed upload with every refusal, download
//! with Range / ETag, retention; and deployments rolled out to real agents.

use kernex_tests::bundle::{keygen, pack, post_raw, upload};
use kernex_tests::{wait_for, Agent, Api, Server};
use serde_json::{json, Value};
use std::time::Duration;

fn content(api: &Api, id: &str, headers: &[(&str, &str)]) -> (u16, Vec<u8>, Option<String>) {
    let mut request = ureq::get(&format!("{}/api/v1/bundles/{id}/content", api.base))
        .set("authorization", &format!("Bearer {}", api.key));
    for (k, v) in headers {
        request = request.set(k, v);
    }
    let response = match request.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{e}"),
    };
    let status = response.status();
    let range = response.header("content-range").map(str::to_owned);
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut response.into_reader(), &mut bytes).unwrap();
    (status, bytes, range)
}

#[test]
fn bundles_upload_refusals_and_ranged_download() {
    let server = Server::start();
    let api = server.tenant("acme");
    let work = tempfile::tempdir().unwrap();
    let (key, public) = keygen(work.path(), "publisher");
    let v1 = pack(work.path(), &key, "1.0.0", true);

    let (status, body) = upload(&api, &v1);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("no_publisher_keys")),
        "{body}"
    );
    let (status, body) = post_raw(&api, "/publisher-keys", b"not a key");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_key")),
        "{body}"
    );
    let (status, body) = post_raw(&api, "/publisher-keys", &std::fs::read(&public).unwrap());
    assert_eq!(status, 201, "{body}");

    let (status, bundle) = upload(&api, &v1);
    assert_eq!(status, 201, "{bundle}");
    assert_eq!(
        (bundle["name"].as_str(), bundle["version"].as_str()),
        (Some("hello"), Some("1.0.0"))
    );
    let id = bundle["id"].as_str().unwrap().to_owned();
    let file = std::fs::read(&v1).unwrap();

    // Whole, ranged, conditional.
    let (status, bytes, _) = content(&api, &id, &[]);
    assert_eq!((status, bytes.len()), (200, file.len()));
    assert!(bytes == file);
    let (status, bytes, range) = content(&api, &id, &[("range", "bytes=100-199")]);
    assert_eq!((status, &bytes[..]), (206, &file[100..200]));
    assert_eq!(range.unwrap(), format!("bytes 100-199/{}", file.len()));
    let etag = format!("\"{}\"", bundle["sha256"].as_str().unwrap());
    let (status, bytes, _) = content(&api, &id, &[("range", "bytes=1000-"), ("if-range", &etag)]);
    assert_eq!((status, &bytes[..]), (206, &file[1000..]));
    let (status, bytes, _) = content(
        &api,
        &id,
        &[("range", "bytes=1000-"), ("if-range", "\"stale\"")],
    );
    assert_eq!((status, bytes.len()), (200, file.len()));
    let (status, _, _) = content(&api, &id, &[("if-none-match", &etag)]);
    assert_eq!(status, 304);
    let (status, _, range) = content(&api, &id, &[("range", &format!("bytes={}-", file.len()))]);
    assert_eq!(status, 416);
    assert_eq!(range.unwrap(), format!("bytes */{}", file.len()));

    // Refusals, each with its reason; nothing of them stays in the store.
    let (status, body) = upload(&api, &v1);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("version_not_newer")),
        "{body}"
    );
    let (other_key, _) = keygen(work.path(), "stranger");
    let foreign = pack(&work.path().join("foreign"), &other_key, "2.0.0", true);
    let (status, body) = upload(&api, &foreign);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_signature")),
        "{body}"
    );
    let mut flipped = std::fs::read(pack(&work.path().join("flip"), &key, "2.0.1", true)).unwrap();
    flipped[200] ^= 0x40;
    let (status, body) = post_raw(&api, "/bundles", &flipped);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_signature")),
        "{body}"
    );
    let (status, body) = post_raw(&api, "/bundles", b"just some bytes, not a bundle at all");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_bundle")),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("trailer"),
        "{body}"
    );
    let incoming = server.data_dir().join("bundles/.incoming");
    assert_eq!(std::fs::read_dir(&incoming).unwrap().count(), 0);

    // A viewer may read but not upload; another tenant sees nothing.
    let viewer = api.with_key(
        server
            .admin(&["apikey", "create", "--tenant", "acme", "--role", "viewer"])
            .trim(),
    );
    let (status, _) = upload(&viewer, &v1);
    assert_eq!(status, 403);
    let other = server.tenant("globex");
    let (status, _, _) = content(&other, &id, &[]);
    assert_eq!(status, 404);
    let (status, list) = other.get("/bundles");
    assert_eq!((status, list), (200, json!([])));
}

/// Current version of `hello` installed by an agent, from its state directory.
pub fn active_version(agent: &Agent) -> Option<String> {
    let link = agent.state_dir().join("bundles/hello/current");
    std::fs::read_link(link)
        .ok()
        .and_then(|target| target.file_name().map(|n| n.to_string_lossy().into_owned()))
}

pub fn deployment(api: &Api, id: &str) -> Value {
    let (status, body) = api.get(&format!("/deployments/{id}"));
    assert_eq!(status, 200, "{body}");
    body
}

pub fn wait_deployment(api: &Api, id: &str, state: &str) -> Value {
    wait_for(
        &format!("deployment {id} to be {state}"),
        Duration::from_secs(120),
        || {
            let d = deployment(api, id);
            if d["state"] == state {
                return Some(d);
            }
            assert!(
                !["succeeded", "halted", "cancelled"].contains(&d["state"].as_str().unwrap_or("")),
                "deployment ended {} instead of {state}: {d:#}",
                d["state"]
            );
            None
        },
    )
}

#[test]
fn rollouts_advance_in_phases_halt_on_failure_and_roll_back() {
    let server = Server::start_with(&["--heartbeat-interval", "1s", "--rollout-interval", "200ms"]);
    let api = server.tenant("acme");
    let work = tempfile::tempdir().unwrap();
    let (key, public) = keygen(work.path(), "publisher");
    assert_eq!(
        post_raw(&api, "/publisher-keys", &std::fs::read(&public).unwrap()).0,
        201
    );
    let token = server.token("acme", &[]);
    let agents: Vec<Agent> = (0..3)
        .map(|_| Agent::start(&server.url, "acme", &token))
        .collect();
    let devices = wait_for("three devices online", Duration::from_secs(120), || {
        let devices = api.devices();
        (devices.len() == 3 && devices.iter().all(|d| d["status"] == "online")).then_some(devices)
    });
    let ids: Vec<String> = devices
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect();

    // 1.0.0 to everyone in three phases: 1 device, then half, then all.
    let (_, v1) = upload(&api, &pack(work.path(), &key, "1.0.0", true));
    let (status, created) = api.post(
        "/deployments",
        json!({"bundle": v1["id"], "devices": ids, "phases": [1, "50%", "100%"], "max_in_flight": 2}),
    );
    assert_eq!(status, 201, "{created}");
    let d1 = created["id"].as_str().unwrap().to_owned();
    let done = wait_deployment(&api, &d1, "succeeded");
    assert_eq!(done["totals"], json!({"succeeded": 3}), "{done:#}");
    assert_eq!(
        done["phase_totals"],
        json!([{"succeeded": 1}, {"succeeded": 1}, {"succeeded": 1}])
    );
    let history: Vec<&str> = done["devices"][0]["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["state"].as_str().unwrap())
        .collect();
    assert_eq!(
        history,
        [
            "pending",
            "queued",
            "downloading",
            "verifying",
            "installing",
            "health-checking",
            "succeeded"
        ]
    );
    for agent in &agents {
        assert_eq!(active_version(agent).as_deref(), Some("1.0.0"));
    }
    // Heartbeats say which version each appliance runs.
    wait_for(
        "heartbeats with the active bundle",
        Duration::from_secs(30),
        || {
            api.devices()
                .iter()
                .all(|d| d["telemetry"]["bundles"] == json!({"hello": "1.0.0"}))
                .then_some(())
        },
    );

    // 1.1.0 fails its health check on the canary: rolled back there, the rollout halts, the
    // others never start.
    let (_, v2) = upload(&api, &pack(work.path(), &key, "1.1.0", false));
    let (_, created) = api.post(
        "/deployments",
        json!({"bundle": v2["id"], "devices": ids, "phases": [1, "100%"], "error_threshold": 0.0}),
    );
    let d2 = created["id"].as_str().unwrap().to_owned();
    let halted = wait_deployment(&api, &d2, "halted");
    assert_eq!(
        halted["totals"],
        json!({"rolled-back": 1, "cancelled": 2}),
        "{halted:#}"
    );
    assert!(
        halted["message"]
            .as_str()
            .unwrap()
            .contains("halted in phase 1"),
        "{halted}"
    );
    let canary = &halted["devices"][0];
    assert!(
        canary["log_tail"].as_str().unwrap().contains("unhealthy"),
        "{canary}"
    );
    for agent in &agents {
        assert_eq!(active_version(agent).as_deref(), Some("1.0.0"));
    }

    // 1.2.0 everywhere, then an explicit rollback to the last version that worked (1.0.0).
    let (_, v3) = upload(&api, &pack(work.path(), &key, "1.2.0", true));
    let (_, created) = api.post(
        "/deployments",
        json!({"bundle": v3["id"], "selector": {"labels": {}}}),
    );
    let d3 = created["id"].as_str().unwrap().to_owned();
    wait_deployment(&api, &d3, "succeeded");
    for agent in &agents {
        assert_eq!(active_version(agent).as_deref(), Some("1.2.0"));
    }
    let (status, rollback) = api.post(&format!("/deployments/{d3}/rollback"), json!({}));
    assert_eq!(status, 201, "{rollback}");
    assert_eq!(rollback["version"], "1.0.0");
    let back = wait_deployment(&api, rollback["id"].as_str().unwrap(), "succeeded");
    assert_eq!(back["totals"], json!({"succeeded": 3}), "{back:#}");
    for agent in &agents {
        assert_eq!(active_version(agent).as_deref(), Some("1.0.0"));
    }
}
