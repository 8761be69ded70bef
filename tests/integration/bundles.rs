//! Bundles through the real server: publisher keys, streamed upload with every refusal, download
//! with Range / ETag, retention; and deployments rolled out to real agents. With `KERNEX_TEST_S3`
//! set every server keeps its bundles in S3, and the S3-only test checks the redirect to the bucket.

use kernex_tests::bundle::{keygen, pack, pack_with, post_raw, upload};
use kernex_tests::{wait_for, Agent, Api, BundleStore, S3Bucket, S3Tap, Server};
use serde_json::{json, Value};
use std::time::Duration;

/// Bytes that do not compress, for bundles as big as their payload.
fn noise(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut bytes);
    bytes
}

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
    assert_store_holds(&server, &[&id]);

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

/// The server's store holds the objects of exactly these bundles: nothing of refused uploads, no
/// temporary file, no unfinished multipart upload.
fn assert_store_holds(server: &Server, bundle_ids: &[&str]) {
    let mut held: Vec<String> = match &server.bundles {
        BundleStore::Local => {
            let root = server.data_dir().join("bundles");
            assert_eq!(
                std::fs::read_dir(root.join(".incoming")).unwrap().count(),
                0
            );
            std::fs::read_dir(&root)
                .unwrap()
                .map(|tenant| tenant.unwrap().path())
                .filter(|tenant| !tenant.ends_with(".incoming"))
                .flat_map(|tenant| std::fs::read_dir(tenant).unwrap())
                .map(|object| object.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        }
        BundleStore::S3(bucket) => {
            assert_eq!(bucket.multipart_uploads(), Vec::<String>::new());
            bucket
                .objects()
                .iter()
                .map(|key| key.rsplit('/').next().unwrap().to_owned())
                .collect()
        }
    };
    held.sort();
    let mut expected: Vec<&str> = bundle_ids.to_vec();
    expected.sort();
    assert_eq!(held, expected);
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

/// With the S3 store: a device's download is a `307` to a presigned URL of the bucket, which the
/// agent follows without its bearer token; a download cut short resumes there with a ranged
/// request answered `206`; a refused upload big enough to have sent parts leaves neither an object
/// nor an unfinished upload behind.
#[test]
fn s3_device_downloads_redirect_to_the_bucket_and_resume() {
    let Some(bucket) = S3Bucket::from_env() else {
        eprintln!("skipped: KERNEX_TEST_S3 is not set (`just test-s3` starts Garage and sets it)");
        return;
    };
    const CUT_AFTER: u64 = 256 * 1024;
    let tap = S3Tap::start(&bucket.endpoint, CUT_AFTER);
    let server = Server::start_with_bundles(
        BundleStore::S3(bucket.via(&tap.url)),
        &["--heartbeat-interval", "1s", "--rollout-interval", "200ms"],
    );
    let api = server.tenant("acme");
    let work = tempfile::tempdir().unwrap();
    let (key, public) = keygen(work.path(), "publisher");
    assert_eq!(
        post_raw(&api, "/publisher-keys", &std::fs::read(&public).unwrap()).0,
        201
    );

    // 10 MiB: the first 8 MiB part is on its way before the signature turns out wrong.
    let big = pack_with(
        &work.path().join("big"),
        &key,
        "0.9.0",
        true,
        &noise(10 << 20),
    );
    let mut big = std::fs::read(big).unwrap();
    big[200] ^= 0x40;
    let (status, body) = post_raw(&api, "/bundles", &big);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_signature")),
        "{body}"
    );
    assert_store_holds(&server, &[]);

    // 2 MiB of noise: long enough a download to cut.
    let v1_file = pack_with(work.path(), &key, "1.0.0", true, &noise(2 << 20));
    let size = std::fs::metadata(&v1_file).unwrap().len();
    let (status, v1) = upload(&api, &v1_file);
    assert_eq!(status, 201, "{v1}");
    let v1_id = v1["id"].as_str().unwrap().to_owned();
    assert_store_holds(&server, &[&v1_id]);

    let token = server.token("acme", &[]);
    let agent = Agent::start(&server.url, "acme", &token);
    let device = api.wait_device("the device online", |d| d["status"] == "online");
    let (status, created) = api.post(
        "/deployments",
        json!({"bundle": v1_id, "devices": [device["id"]]}),
    );
    assert_eq!(status, 201, "{created}");
    wait_deployment(&api, created["id"].as_str().unwrap(), "succeeded");
    assert_eq!(active_version(&agent).as_deref(), Some("1.0.0"));

    let seen = tap.presigned();
    assert_eq!(seen.len(), 2, "one cut download and one resumed: {seen:#?}");
    let (first, resumed) = (&seen[0], &seen[1]);
    assert!(first.cut);
    assert_eq!(
        (first.status, first.header("range")),
        (200, None),
        "{first:#?}"
    );
    let range = resumed
        .header("range")
        .expect("the resumed GET asks for a range");
    let from: u64 = range
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected range {range:?}"));
    assert!(from > 0 && from <= CUT_AFTER, "resumed from {from}");
    assert_eq!(resumed.status, 206, "{resumed:#?}");
    assert_eq!(
        resumed.response_header("content-range"),
        Some(format!("bytes {from}-{}/{size}", size - 1).as_str())
    );
    for request in &seen {
        assert_eq!(request.header("authorization"), None, "{request:#?}");
        assert!(
            request.request_line.contains("X-Amz-Expires=900"),
            "{request:#?}"
        );
        // Only ever the store's own ETag, never the server's (the bundle's SHA-256).
        if let Some(if_range) = request.header("if-range") {
            assert_eq!(Some(if_range), first.response_header("etag"));
        }
    }

    // The redirect itself: for a device the bundle was released to, and no redirect (404) for a
    // bundle that was not.
    let (device_id, device_token) = server.preauthorize("acme", 1).remove(0);
    let (device_id, device_token) = (device_id.as_str(), device_token.as_str());
    let (_, v2) = upload(&api, &pack(work.path(), &key, "1.1.0", true));
    let v2_id = v2["id"].as_str().unwrap().to_owned();
    let (status, created) = api.post(
        "/deployments",
        json!({"bundle": v2_id, "devices": [device_id]}),
    );
    assert_eq!(status, 201, "{created}");
    let deployment_id = created["id"].as_str().unwrap().to_owned();
    wait_for(
        "the bundle released to the device",
        Duration::from_secs(30),
        || (deployment(&api, &deployment_id)["devices"][0]["state"] == "queued").then_some(()),
    );
    let no_redirects = ureq::AgentBuilder::new().redirects(0).build();
    let fetch = |bundle: &str| match no_redirects
        .get(&format!("{}/api/v1/bundles/{bundle}/content", server.url))
        .set("authorization", &format!("Bearer {device_token}"))
        .call()
    {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{e}"),
    };
    let redirect = fetch(&v2_id);
    assert_eq!(redirect.status(), 307);
    let location = redirect.header("location").unwrap();
    assert!(
        location.starts_with(&format!("{}/{}/{}", tap.url, bucket.bucket, bucket.prefix))
            && location.contains(&v2_id)
            && location.contains("X-Amz-Signature="),
        "{location}"
    );
    assert_eq!(redirect.header("cache-control"), Some("no-store"));
    assert_eq!(fetch(&v1_id).status(), 404);
}
