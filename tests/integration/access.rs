//! Access control, route by route: every operator endpoint of the router (`api::ROUTES`) called with
//! no key, with an admin key of another tenant, and with each role below the one it needs; each must
//! be refused, and the refusals together must change nothing the owning tenant can see (its audit
//! trail included). Then each endpoint called with the role it needs must get past authorization,
//! so a wrong body or a wrong id in this table cannot make a refusal look like access control.

use crate::{enroll, key};
use kernex_tests::bundle::{keygen, pack_with, Publisher};
use kernex_tests::{Api, Reply, Server};
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Needs {
    /// Probes, metrics and the OpenAPI document, answered to anyone.
    Public,
    /// The device protocol: device signatures or device tokens, tested in device_protocol.rs.
    Device,
    Viewer,
    Operator,
    Admin,
}

/// What each route needs. A route missing here fails the test: a new endpoint must say who may
/// call it.
fn needs(method: &str, route: &str) -> Needs {
    use Needs::*;
    match (method, route.trim_start_matches("/api/v1")) {
        ("GET", "/healthz" | "/readyz" | "/metrics" | "/openapi.json") => Public,
        ("POST", "/enroll" | "/auth" | "/heartbeat" | "/deployments/{id}/status") => Device,
        ("GET", _)
            if route.ends_with("/apikeys")
                || route.ends_with("/users")
                || route.contains("/webhooks") =>
        {
            Admin
        }
        ("POST", "/webhooks") | ("DELETE", "/webhooks/{id}") => Admin,
        ("GET", _) => Viewer,
        ("POST", "/tokens" | "/tokens/{id}/revoke" | "/apikeys" | "/apikeys/{id}/revoke") => Admin,
        ("POST", "/users" | "/users/{username}/disable") => Admin,
        ("POST", "/publisher-keys" | "/publisher-keys/{id}/revoke") => Admin,
        ("POST", "/devices/{id}/commands" | "/bundles" | "/deployments") => Operator,
        ("POST", action) if action.starts_with("/deployments/{id}/") => Operator,
        ("PUT", "/devices/{id}/labels") | ("DELETE", "/devices/{id}") => Operator,
        _ => panic!("{method} {route} is not classified in access.rs: who may call it?"),
    }
}

/// Tenant acme's objects, one of each kind, that the paths point at.
struct Objects {
    token: String,
    spare_key: String,
    device: String,
    command: String,
    publisher_key: String,
    bundle: String,
    deployment: String,
    webhook: String,
    /// A packed bundle (a newer version) and a publisher key (PEM) that are valid to upload.
    new_bundle: Vec<u8>,
    new_publisher_key: Vec<u8>,
}

impl Objects {
    fn path(&self, route: &str) -> String {
        let route = route.trim_start_matches("/api/v1");
        let id = if route.starts_with("/tokens/") {
            &self.token
        } else if route.starts_with("/apikeys/") {
            &self.spare_key
        } else if route.starts_with("/devices/") {
            &self.device
        } else if route.starts_with("/publisher-keys/") {
            &self.publisher_key
        } else if route.starts_with("/bundles/") {
            &self.bundle
        } else if route.starts_with("/deployments/") {
            &self.deployment
        } else if route.starts_with("/webhooks/") {
            &self.webhook
        } else {
            ""
        };
        route
            .replace("{name}", "acme")
            .replace("{id}", id)
            .replace("{command}", &self.command)
            .replace("{username}", "carol")
    }

    /// A request body that is valid for the route, so only authorization can refuse it.
    fn call(&self, api: &Api, method: &str, route: &str) -> Reply {
        let path = self.path(route);
        match (method, path.as_str()) {
            ("POST", "/bundles") => api.call_raw("POST", &path, &self.new_bundle),
            ("POST", "/publisher-keys") => api.call_raw("POST", &path, &self.new_publisher_key),
            ("POST", "/tokens") => api.call("POST", &path, Some(json!({"uses": 1}))),
            ("POST", "/apikeys") => api.call("POST", &path, Some(json!({"role": "viewer"}))),
            ("POST", "/users") => api.call(
                "POST",
                &path,
                Some(json!({"username": "dave", "password": "a long enough password", "role": "viewer"})),
            ),
            ("POST", "/webhooks") => api.call(
                "POST",
                &path,
                Some(json!({"url": "http://127.0.0.1:9/hook", "events": ["device.offline"]})),
            ),
            ("POST", "/deployments") => api.call(
                "POST",
                &path,
                Some(json!({"bundle": self.bundle, "devices": [self.device]})),
            ),
            ("POST", p) if p.ends_with("/commands") => {
                api.call("POST", p, Some(json!({"kind": "ping"})))
            }
            ("PUT", p) if p.ends_with("/labels") => {
                api.call("PUT", p, Some(json!({"labels": {"site": "lab"}})))
            }
            ("POST", p) => api.call("POST", p, Some(json!({}))),
            (method, p) => api.call(method, p, None),
        }
    }

    fn ids(&self) -> [&str; 8] {
        [
            &self.webhook,
            &self.token,
            &self.spare_key,
            &self.device,
            &self.command,
            &self.publisher_key,
            &self.bundle,
            &self.deployment,
        ]
    }
}

/// Everything tenant acme can read, for before/after comparisons.
fn snapshot(admin: &Api, objects: &Objects) -> Value {
    let mut all = serde_json::Map::new();
    for path in [
        "/tenants".to_owned(),
        "/tokens".to_owned(),
        "/apikeys".to_owned(),
        "/users".to_owned(),
        "/devices".to_owned(),
        format!("/devices/{}/commands", objects.device),
        "/publisher-keys".to_owned(),
        "/bundles".to_owned(),
        "/deployments".to_owned(),
        format!("/deployments/{}", objects.deployment),
        "/webhooks".to_owned(),
        format!("/webhooks/{}/deliveries", objects.webhook),
        "/audit".to_owned(),
    ] {
        let (status, body) = admin.get(&path);
        assert_eq!(status, 200, "{path}: {body}");
        all.insert(path, body);
    }
    Value::Object(all)
}

fn routes() -> impl Iterator<Item = (&'static str, &'static str, Needs)> {
    kernex_server::api::ROUTES
        .iter()
        .map(|&(method, route)| (method, route, needs(method, route)))
}

#[test]
fn every_endpoint_refuses_other_tenants_lower_roles_and_anonymous_callers() {
    // A long interval: the device below never heartbeats and must not turn offline between the
    // snapshots.
    let server = Server::start_with(&["--heartbeat-interval", "60s"]);
    let acme = Publisher::new(&server);
    let admin = acme.api.clone();
    let other = server.tenant("other");

    // One object of each kind in tenant acme.
    let created = |reply: Reply| {
        assert!(reply.0 == 201 || reply.0 == 200, "{reply:?}");
        reply.1["id"].as_str().unwrap().to_owned()
    };
    let (_, new_token) = admin.post("/tokens", json!({"uses": 5}));
    let token = new_token["id"].as_str().unwrap().to_owned();
    let (_, viewer) = admin.post("/apikeys", json!({"role": "viewer"}));
    let (_, operator) = admin.post("/apikeys", json!({"role": "operator"}));
    let spare_key = created(admin.post("/apikeys", json!({"role": "viewer"})));
    let (status, enrolled) = enroll(
        &server.url,
        "acme",
        new_token["token"].as_str().unwrap(),
        "hw-access",
        key(0),
    );
    assert_eq!(status, 201, "{enrolled}");
    let device = enrolled["device_id"].as_str().unwrap().to_owned();
    let command = created(admin.post(
        &format!("/devices/{device}/commands"),
        json!({"kind": "ping"}),
    ));
    let (_, keys) = admin.get("/publisher-keys");
    let publisher_key = keys[0]["id"].as_str().unwrap().to_owned();
    let bundle = acme.bundle("1.0.0", 64);
    let deployment = acme.deploy(json!({"bundle": bundle, "devices": [device]}));
    let webhook = created(admin.post(
        "/webhooks",
        json!({"url": "http://127.0.0.1:9/hook", "events": ["device.offline"]}),
    ));
    let (status, body) = admin.post(
        "/users",
        json!({"username": "carol", "password": "a long enough password", "role": "viewer"}),
    );
    assert_eq!(status, 201, "{body}");
    let (new_key, new_public) = keygen(acme.work.path(), "second");
    drop(new_key);
    let objects = Objects {
        token,
        spare_key,
        device: device.clone(),
        command,
        publisher_key,
        bundle,
        deployment: deployment.clone(),
        webhook,
        new_bundle: std::fs::read(pack_with(
            acme.work.path(),
            &acme.key,
            "2.0.0",
            true,
            b"payload",
        ))
        .unwrap(),
        new_publisher_key: std::fs::read(new_public).unwrap(),
    };
    // The rollout engine releases the device with a `deploy` command; wait for that so the
    // snapshots below compare a tenant at rest.
    kernex_tests::wait_for(
        "the deploy command",
        std::time::Duration::from_secs(30),
        || (acme.deploy_commands(&device, &deployment) == 1).then_some(()),
    );
    let before = snapshot(&admin, &objects);

    let viewer = admin.with_key(viewer["key"].as_str().unwrap());
    let operator = admin.with_key(operator["key"].as_str().unwrap());
    let anonymous = admin.with_key("");
    let mut checked = 0;
    for (method, route, needed) in routes() {
        if needed <= Needs::Device {
            continue;
        }
        let what = format!("{method} {route}");
        let (status, body) = objects.call(&anonymous, method, route);
        assert_eq!(status, 401, "{what} without a key: {body}");

        let (status, body) = objects.call(&other, method, route);
        if route.contains('{') || route.ends_with("/deployments") && method == "POST" {
            // Naming one of acme's objects (a deployment names acme's bundle and device).
            assert_eq!(
                status, 404,
                "{what} with another tenant's admin key: {body}"
            );
        } else {
            // Lists and creations act on the caller's own tenant: nothing of acme's may show.
            assert!(status < 500, "{what} by another tenant: {status} {body}");
            if status < 300 {
                let text = body.to_string();
                for id in objects.ids() {
                    assert!(
                        !text.contains(id),
                        "{what} by another tenant shows {id}: {text}"
                    );
                }
            }
        }

        for (role, api) in [(Needs::Viewer, &viewer), (Needs::Operator, &operator)] {
            if role < needed {
                let (status, body) = objects.call(api, method, route);
                assert_eq!(
                    (status, body["error"]["code"].as_str()),
                    (403, Some("forbidden")),
                    "{what} with a {role:?} key: {body}"
                );
            }
        }
        checked += 1;
    }
    assert!(checked >= 30, "only {checked} operator routes walked");
    assert_eq!(
        snapshot(&admin, &objects),
        before,
        "refused requests changed tenant acme"
    );

    // The role each route needs is enough: authorization passes (the action itself may still be
    // refused for what it is, e.g. resuming a rollout that is not paused). Destructive routes last,
    // so the objects the others point at still exist.
    let mut positive: Vec<_> = routes().filter(|r| r.2 > Needs::Device).collect();
    positive.sort_by_key(|(method, route, _)| *method == "DELETE" || route.ends_with("revoke"));
    for (method, route, needed) in positive {
        let api = match needed {
            Needs::Viewer => &viewer,
            Needs::Operator => &operator,
            _ => &admin,
        };
        let (status, body) = objects.call(api, method, route);
        assert!(
            ![401, 403, 404].contains(&status) && status < 500,
            "{method} {route} with a {needed:?} key: {status} {body}"
        );
    }
}
