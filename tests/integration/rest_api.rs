//! The operator API: tenant isolation, roles, token and key management, JSON errors everywhere;
//! and the admin commands' errors.

use crate::{enroll, key};
use kernex_tests::{into_reply, Server};
use serde_json::json;

#[test]
fn keys_see_only_their_tenant_and_roles_are_enforced() {
    let server = Server::start();
    let acme = server.tenant("acme");
    let other = server.tenant("other");
    let token = server.token("acme", &[]);
    let (_, enrolled) = enroll(&server.url, "acme", &token, "hw-1", key(0));
    let device = format!("/devices/{}", enrolled["device_id"].as_str().unwrap());

    assert_eq!(acme.get(&device).0, 200);
    let (status, body) = other.get(&device);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("unknown_device")),
        "{body}"
    );
    assert_eq!(other.delete(&device).0, 404);
    assert_eq!(
        other
            .post(&format!("{device}/commands"), json!({"kind": "ping"}))
            .0,
        404
    );
    assert!(other.devices().is_empty());
    let (_, tenants) = other.get("/tenants");
    assert_eq!(tenants.as_array().unwrap().len(), 1);
    assert_eq!(tenants[0]["name"], "other");
    assert_eq!(other.get("/tenants/acme").0, 404);

    // Roles: an admin makes a viewer and an operator key through the API.
    let (status, viewer) = acme.post("/apikeys", json!({"role": "viewer"}));
    assert_eq!(status, 201, "{viewer}");
    let viewer = acme.with_key(viewer["key"].as_str().unwrap());
    let (_, operator) = acme.post("/apikeys", json!({"role": "operator", "description": "ci"}));
    let operator_id = operator["id"].as_str().unwrap().to_owned();
    let operator = acme.with_key(operator["key"].as_str().unwrap());

    assert_eq!(viewer.get(&device).0, 200);
    let (status, body) = viewer.post(&format!("{device}/commands"), json!({"kind": "ping"}));
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    assert_eq!(viewer.post("/tokens", json!({})).0, 403);
    assert_eq!(
        operator
            .post(&format!("{device}/commands"), json!({"kind": "ping"}))
            .0,
        201
    );
    assert_eq!(operator.post("/tokens", json!({})).0, 403);
    assert_eq!(operator.get("/apikeys").0, 403);

    // Revoked keys and garbage keys are refused alike.
    assert_eq!(
        acme.post(&format!("/apikeys/{operator_id}/revoke"), json!({}))
            .0,
        204
    );
    let (status, body) = operator.get("/devices");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("invalid_api_key"))
    );
    assert_eq!(acme.with_key("kxk_nonsense").get("/devices").0, 401);
    let reply = into_reply(ureq::get(&format!("{}/api/v1/devices", server.url)).call());
    assert_eq!(reply.0, 401);
}

#[test]
fn tokens_are_managed_through_the_api_and_shown_once() {
    let server = Server::start();
    let acme = server.tenant("acme");
    let (status, created) = acme.post(
        "/tokens",
        json!({"uses": 5, "ttl": "7d", "description": "line 3"}),
    );
    assert_eq!(status, 201, "{created}");
    let secret = created["token"].as_str().unwrap();
    assert!(secret.starts_with("kxb_"));
    assert_eq!(
        (created["uses_allowed"].as_i64(), created["state"].as_str()),
        (Some(5), Some("active"))
    );
    let (_, listed) = acme.get("/tokens");
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert!(
        !listed
            .to_string()
            .contains(secret.rsplit('_').next().unwrap()),
        "secrets are never listed"
    );
    let (status, one) = acme.get(&format!("/tokens/{}", created["id"].as_str().unwrap()));
    assert_eq!((status, one["description"].as_str()), (200, Some("line 3")));

    for (body, code) in [
        (json!({"ttl": "soon"}), "invalid_ttl"),
        (json!({"uses": 0}), "invalid_uses"),
        (json!({"uses": -1}), "invalid_request"),
        (json!({"colour": "red"}), "invalid_request"),
    ] {
        let (status, reply) = acme.post("/tokens", body.clone());
        assert_eq!(
            (status, reply["error"]["code"].as_str()),
            (400, Some(code)),
            "{body} → {reply}"
        );
    }
    let (status, reply) = acme.get("/tokens/0000000000000000");
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (404, Some("unknown_token"))
    );
    let (status, reply) = acme.get("/no/such/route");
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, reply) = acme.delete("/tokens");
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (405, Some("method_not_allowed"))
    );
    let reply = into_reply(
        ureq::post(&format!("{}/api/v1/tokens", server.url))
            .set("authorization", &format!("Bearer {}", acme.key))
            .set("content-type", "application/json")
            .send_string("{\"uses\": "),
    );
    assert_eq!(
        (reply.0, reply.1["error"]["code"].as_str()),
        (400, Some("malformed_json"))
    );
}

#[test]
fn admin_commands_explain_what_is_wrong() {
    let server = Server::start();
    server.admin(&["tenant", "create", "acme"]);
    let out = server.admin_output(&["tenant", "create", "acme"]);
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: creating tenant `acme`: tenant `acme` already exists"
    );
    let out = server.admin_output(&["tenant", "create", "Bad Name"]);
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("tenant name: `Bad Name` is not a valid name"));
    let out = server.admin_output(&["token", "create", "--tenant", "nobody"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: no tenant named `nobody`"
    );
    let out = server.admin_output(&["token", "create", "--tenant", "acme", "--ttl", "soon"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value 'soon' for '--ttl <TTL>'"));

    let json: serde_json::Value = serde_json::from_str(&server.admin(&[
        "token", "create", "--tenant", "acme", "--uses", "3", "--json",
    ]))
    .unwrap();
    assert!(json["token"].as_str().unwrap().starts_with("kxb_"));
    assert_eq!(
        (json["uses_allowed"].as_i64(), json["tenant"].as_str()),
        (Some(3), Some("acme"))
    );
    let json: serde_json::Value = serde_json::from_str(&server.admin(&[
        "apikey", "create", "--tenant", "acme", "--role", "viewer", "--json",
    ]))
    .unwrap();
    assert!(json["key"].as_str().unwrap().starts_with("kxk_"));
    let listed = server.admin(&["token", "list", "--tenant", "acme"]);
    assert!(listed.contains("active\tuses 0/3"), "{listed}");
}
