//! The device protocol spoken directly (no agent): exact status codes and error codes, and that a
//! refused request stores nothing.

use crate::{enroll, enroll_request, key, post_signed};
use kernex_protocol::wire::AuthRequest;
use kernex_tests::{into_reply, Server};
use serde_json::json;
use std::time::Duration;

#[test]
fn enrollment_is_idempotent_and_spends_one_use() {
    let server = Server::start();
    let api = server.tenant("acme");
    let token = server.token("acme", &["--uses", "2"]);

    let (status, first) = enroll(&server.url, "acme", &token, "hw-1", key(0));
    assert_eq!(status, 201, "{first}");
    assert_eq!(first["created"], true);
    // The same key again (a retry after a lost response): same device, no use spent.
    let (status, again) = enroll(&server.url, "acme", &token, "hw-1", key(0));
    assert_eq!(
        (status, &again["device_id"], &again["created"]),
        (200, &first["device_id"], &json!(false))
    );
    let (_, tokens) = api.get("/tokens");
    assert_eq!(tokens[0]["uses"], 1);

    // Re-installed appliance: same hardware id, new key → same device, re-keyed and audited.
    let (status, rekeyed) = enroll(&server.url, "acme", &token, "hw-1", key(1));
    assert_eq!(
        (status, &rekeyed["device_id"]),
        (200, &first["device_id"]),
        "{rekeyed}"
    );
    let devices = api.devices();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0]["key_fingerprint"], key(1).public().fingerprint());
    let (_, audit) = api.get("/audit");
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(
        actions.contains(&"device.rekeyed") && actions.contains(&"device.enrolled"),
        "{actions:?}"
    );
    let (_, tokens) = api.get("/tokens");
    assert_eq!(
        (tokens[0]["uses"].as_i64(), tokens[0]["state"].as_str()),
        (Some(2), Some("exhausted"))
    );
}

#[test]
fn refused_tokens_store_nothing() {
    let server = Server::start();
    let api = server.tenant("acme");
    server.admin(&["tenant", "create", "other"]);

    // Used up.
    let once = server.token("acme", &["--uses", "1"]);
    assert_eq!(enroll(&server.url, "acme", &once, "hw-a", key(0)).0, 201);
    let (status, body) = enroll(&server.url, "acme", &once, "hw-b", key(1));
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("token_exhausted")),
        "{body}"
    );

    // Expired.
    let brief = server.token("acme", &["--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(1500));
    let (status, body) = enroll(&server.url, "acme", &brief, "hw-b", key(1));
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("token_expired")),
        "{body}"
    );

    // Revoked through the API.
    let revoked = server.token("acme", &[]);
    let id = revoked.split('_').nth(1).unwrap();
    let (status, body) = api.post(&format!("/tokens/{id}/revoke"), json!({}));
    assert_eq!(
        (status, body["state"].as_str()),
        (200, Some("revoked")),
        "{body}"
    );
    let (status, body) = enroll(&server.url, "acme", &revoked, "hw-b", key(1));
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("token_revoked")),
        "{body}"
    );

    // Wrong: another tenant's name, a made-up token, a malformed one.
    let good = server.token("acme", &[]);
    let last = if good.ends_with('0') { '1' } else { '0' };
    let forged = format!("{}{last}", &good[..good.len() - 1]);
    for (tenant, token) in [
        ("other", good.as_str()),
        ("acme", forged.as_str()),
        ("acme", "kxb_nope"),
    ] {
        let (status, body) = enroll(&server.url, tenant, token, "hw-b", key(1));
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (401, Some("invalid_token")),
            "{tenant} {body}"
        );
    }
    assert_eq!(
        api.devices().len(),
        1,
        "only the first enrollment stored a device"
    );
}

#[test]
fn malformed_requests_get_clear_errors() {
    let server = Server::start();
    let _api = server.tenant("acme");
    let token = server.token("acme", &[]);

    let (status, body) = post_signed(&server.url, "/enroll", b"{not json", key(0));
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("malformed_json")),
        "{body}"
    );

    // 413 is tested in-process (server/src/api/mod.rs): over a socket the server answers before the
    // client has finished sending, and whether the client reads the answer or a reset is a race.

    // A body signed by a different key than the one it carries.
    let body = serde_json::to_vec(&enroll_request("acme", &token, "hw", key(0))).unwrap();
    let (status, reply) = post_signed(&server.url, "/enroll", &body, key(1));
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (401, Some("bad_signature")),
        "{reply}"
    );

    // No signature at all.
    let reply = into_reply(ureq::post(&format!("{}/api/v1/enroll", server.url)).send_bytes(&body));
    assert_eq!(
        (reply.0, reply.1["error"]["code"].as_str()),
        (401, Some("missing_signature"))
    );

    // A 2048-bit key.
    let small = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
    let pem = rsa::pkcs8::EncodePublicKey::to_public_key_pem(
        &small.to_public_key(),
        rsa::pkcs8::LineEnding::LF,
    )
    .unwrap();
    let mut request = enroll_request("acme", &token, "hw", key(0));
    request.public_key = pem;
    let body = serde_json::to_vec(&request).unwrap();
    let (status, reply) = post_signed(&server.url, "/enroll", &body, key(0));
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (400, Some("invalid_public_key")),
        "{reply}"
    );
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("2048 bits"),
        "{reply}"
    );

    // Heartbeats without or with a forged device token.
    let reply =
        into_reply(ureq::post(&format!("{}/api/v1/heartbeat", server.url)).send_json(json!({})));
    assert_eq!(
        (reply.0, reply.1["error"]["code"].as_str()),
        (401, Some("invalid_device_token"))
    );
    let reply = into_reply(
        ureq::post(&format!("{}/api/v1/heartbeat", server.url))
            .set("authorization", "Bearer v1.eyJkIjoieCJ9.AAAA")
            .send_json(json!({})),
    );
    assert_eq!(
        (reply.0, reply.1["error"]["code"].as_str()),
        (401, Some("invalid_device_token"))
    );
}

#[test]
fn auth_refuses_replays_and_unknown_devices() {
    let server = Server::start();
    let _api = server.tenant("acme");
    let token = server.token("acme", &[]);
    let (_, enrolled) = enroll(&server.url, "acme", &token, "hw-1", key(0));
    let device_id = enrolled["device_id"].as_str().unwrap().to_owned();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;

    let auth = |device_id: &str, timestamp: i64, nonce: &str| {
        let body = serde_json::to_vec(&AuthRequest {
            device_id: device_id.into(),
            timestamp,
            nonce: nonce.into(),
        })
        .unwrap();
        post_signed(&server.url, "/auth", &body, key(0))
    };
    let (status, body) = auth(&device_id, now, "0123456789abcdef0001");
    assert_eq!(status, 200, "{body}");
    assert!(body["token"].as_str().unwrap().starts_with("v1."));
    let (status, body) = auth(&device_id, now, "0123456789abcdef0001");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("replayed_request")),
        "{body}"
    );
    let (status, body) = auth(&device_id, now - 3600, "0123456789abcdef0002");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("clock_skew")),
        "{body}"
    );
    let (status, body) = auth("no-such-device", now, "0123456789abcdef0003");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("unknown_device")),
        "{body}"
    );
}
