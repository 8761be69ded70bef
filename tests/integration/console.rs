//! The web console over HTTP, as a browser would use it but checked byte by byte: login with an
//! API key and with a user account, the session cookie's attributes, CSRF and cross-origin
//! refusals, roles, escaping, sessions ending with their key or user, logout, and failed logins
//! limited per address. (`console_browser` drives the same pages in Chromium.)

use kernex_tests::{wait_for, Server};
use serde_json::{json, Value};
use std::time::Duration;

/// A browser without JavaScript: keeps the session cookie, never follows redirects.
struct Browser {
    base: String,
    agent: ureq::Agent,
    cookie: Option<String>,
}

/// Status, headers of interest, body.
struct Page {
    status: u16,
    location: Option<String>,
    set_cookie: Option<String>,
    csp: Option<String>,
    frame: Option<String>,
    body: String,
}

impl Browser {
    fn new(server: &Server) -> Browser {
        Browser {
            base: server.url.clone(),
            agent: ureq::AgentBuilder::new().redirects(0).build(),
            cookie: None,
        }
    }

    fn finish(&mut self, result: Result<ureq::Response, ureq::Error>) -> Page {
        let response = match result {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("request failed: {e}"),
        };
        let header = |name: &str| response.header(name).map(str::to_owned);
        let set_cookie = header("set-cookie");
        if let Some(cookie) = &set_cookie {
            let pair = cookie.split(';').next().unwrap().to_owned();
            self.cookie = (!pair.ends_with('=')).then_some(pair);
        }
        Page {
            status: response.status(),
            location: header("location"),
            csp: header("content-security-policy"),
            frame: header("x-frame-options"),
            set_cookie,
            body: response.into_string().unwrap(),
        }
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let mut request = self.agent.request(method, &format!("{}{path}", self.base));
        if let Some(cookie) = &self.cookie {
            request = request.set("cookie", cookie);
        }
        request
    }

    fn get(&mut self, path: &str) -> Page {
        let result = self.request("GET", path).call();
        self.finish(result)
    }

    fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Page {
        let result = self.request("POST", path).send_form(form);
        self.finish(result)
    }

    fn post_from(&mut self, origin: &str, path: &str, form: &[(&str, &str)]) -> Page {
        let result = self
            .request("POST", path)
            .set("origin", origin)
            .send_form(form);
        self.finish(result)
    }

    fn login_key(&mut self, key: &str) -> Page {
        self.post(
            "/console/login",
            &[("api_key", key), ("next", "/console/devices")],
        )
    }

    /// The CSRF token of the page at `path`.
    fn csrf(&mut self, path: &str) -> String {
        let page = self.get(path);
        assert_eq!(page.status, 200, "{path}: {}", page.body);
        let start = page
            .body
            .find("name=\"csrf\" value=\"")
            .expect("a form with a CSRF token")
            + "name=\"csrf\" value=\"".len();
        page.body[start..start + 64].to_owned()
    }
}

fn api_key(server: &Server, tenant: &str, role: &str) -> String {
    server
        .admin(&["apikey", "create", "--tenant", tenant, "--role", role])
        .trim()
        .to_owned()
}

fn tokens_of(api: &kernex_tests::Api) -> Vec<Value> {
    let (status, body) = api.get("/tokens");
    assert_eq!(status, 200, "{body}");
    body.as_array().unwrap().clone()
}

#[test]
fn console_sessions_forms_and_roles() {
    let server = Server::start();
    let api = server.tenant("acme");
    let mut browser = Browser::new(&server);

    // Not logged in: pages send to the login page (remembering where to), forms are refused.
    let page = browser.get("/console/tokens");
    assert_eq!(page.status, 303);
    assert_eq!(
        page.location.as_deref(),
        Some("/console/login?next=%2Fconsole%2Ftokens")
    );
    let page = browser.post("/console/tokens", &[("description", "x")]);
    assert_eq!(page.status, 401, "{}", page.body);
    let page = browser.get("/console/login?next=%2Fconsole%2Ftokens");
    assert_eq!(page.status, 200);
    // (minijinja escapes `/` too.)
    assert!(
        page.body.contains("value=\"&#x2f;console&#x2f;tokens\""),
        "{}",
        page.body
    );
    assert!(page.csp.unwrap().contains("frame-ancestors 'none'"));
    assert_eq!(page.frame.as_deref(), Some("DENY"));

    // A wrong key: the login page again, 401, no cookie.
    let page = browser.login_key("kxk_0000000000000000_00000000000000000000000000000000");
    assert_eq!(page.status, 401);
    assert!(page.body.contains("is not valid"), "{}", page.body);
    assert!(page.set_cookie.is_none() && browser.cookie.is_none());

    // The admin key logs in: a locked-down cookie (no Secure: plain HTTP on loopback).
    let page = browser.login_key(&api.key);
    assert_eq!(page.status, 303, "{}", page.body);
    assert_eq!(page.location.as_deref(), Some("/console/devices"));
    let cookie = page.set_cookie.unwrap();
    for attribute in [
        "HttpOnly",
        "SameSite=Strict",
        "Path=/console",
        "Max-Age=43200",
    ] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    assert!(!cookie.contains("Secure"), "{cookie}");
    let page = browser.get("/console/devices");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("No devices"), "{}", page.body);

    // Create a token through the form: shown once, stored with the form's values, audited as
    // this key from this address.
    let csrf = browser.csrf("/console/tokens");
    let page = browser.post(
        "/console/tokens",
        &[
            ("csrf", &csrf),
            ("description", "lab <b>rack</b>"),
            ("uses", "2"),
            ("ttl", ""),
        ],
    );
    assert_eq!(page.status, 201, "{}", page.body);
    assert!(page.body.contains("kxb_"), "{}", page.body);
    assert!(
        page.body.contains("lab &lt;b&gt;rack&lt;"),
        "escaped: {}",
        page.body
    );
    assert!(!page.body.contains("<b>rack"), "escaped: {}", page.body);
    let tokens = tokens_of(&api);
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0]["uses_allowed"], 2);
    let (_, events) = api.get("/audit?action=token.created");
    let key_id = api.key.split('_').nth(1).unwrap();
    assert_eq!(events[0]["actor"], format!("apikey:{key_id}"));
    assert_eq!(events[0]["source"], "127.0.0.1");

    // Refused forms change nothing: no CSRF token, another site's, a bad value (kept in the form).
    let page = browser.post("/console/tokens", &[("description", "no csrf")]);
    assert_eq!(page.status, 403);
    assert!(page.body.contains("CSRF"), "{}", page.body);
    let page = browser.post_from(
        "http://evil.example",
        "/console/tokens",
        &[("csrf", &csrf), ("description", "cross-site")],
    );
    assert_eq!(page.status, 403);
    assert!(page.body.contains("another site"), "{}", page.body);
    let page = browser.post(
        "/console/tokens",
        &[
            ("csrf", &csrf),
            ("description", "keep me"),
            ("uses", "many"),
        ],
    );
    assert_eq!(page.status, 400);
    assert!(
        page.body.contains("uses: &quot;many&quot; is not a number"),
        "{}",
        page.body
    );
    assert!(page.body.contains("value=\"keep me\""), "{}", page.body);
    let page = browser.post(
        "/console/tokens",
        &[("csrf", &csrf), ("description", "bad ttl"), ("ttl", "soon")],
    );
    assert_eq!(page.status, 400);
    assert!(page.body.contains("ttl `soon`"), "{}", page.body);
    assert_eq!(tokens_of(&api).len(), 1);

    // Revoke it through the console.
    let id = tokens[0]["id"].as_str().unwrap();
    let page = browser.post(&format!("/console/tokens/{id}/revoke"), &[("csrf", &csrf)]);
    assert_eq!(page.status, 303, "{}", page.body);
    assert_eq!(tokens_of(&api)[0]["state"], "revoked");

    // A device with telemetry and an agent version that tries to inject markup (labels are
    // validated, what an agent reports is not), and another tenant's device.
    let devices = server.preauthorize("acme", 1);
    let (device, device_token) = &devices[0];
    for cpu in [10.0, 60.0, 30.0] {
        let beat = json!({"agent_version": "<script>alert(1)</script>", "telemetry": {
        "cpu_percent": cpu, "mem_total_bytes": 1000, "mem_available_bytes": 250,
        "disk_total_bytes": 2000, "disk_free_bytes": 1000},
        "vms": [
            {"name": "vm1", "address": "vsock://3:7070", "connected": true, "state": "connected",
             "last_seen": 1_700_000_000, "rtt_ms": 2.345, "info": {"hostname": "app-vm"}},
            {"name": "vm2", "address": "tcp://10.0.0.2:7070", "connected": false,
             "state": "auth-failed", "error": "authentication failed: bad tag"},
        ]});
        let reply = ureq::post(&format!("{}/api/v1/heartbeat", server.url))
            .set("authorization", &format!("Bearer {device_token}"))
            .send_json(beat);
        assert!(reply.is_ok(), "{reply:?}");
    }
    let page = browser.get("/console/devices");
    assert!(
        page.body
            .contains("<polyline points=\"0.0,21.6 60.0,9.6 120.0,16.8\""),
        "{}",
        page.body
    );
    assert!(page.body.contains("75 %"), "memory in use: {}", page.body);
    assert!(!page.body.contains("<script>"), "{}", page.body);
    assert!(page.body.contains("&lt;script&gt;"), "{}", page.body);
    assert!(
        page.body.contains("1/2 connected"),
        "user VMs: {}",
        page.body
    );
    let page = browser.get(&format!("/console/devices/{device}"));
    assert_eq!(page.status, 200);
    assert_eq!(
        page.body.matches("<tr class=\"vm\">").count(),
        2,
        "{}",
        page.body
    );
    for shown in [
        "app-vm",
        "2.3 ms",
        "2023-11-14T22:13:20Z",
        "auth-failed",
        "authentication failed: bad tag",
    ] {
        assert!(page.body.contains(shown), "{shown}: {}", page.body);
    }
    let csrf_device = browser.csrf(&format!("/console/devices/{device}"));
    let page = browser.post(
        &format!("/console/devices/{device}/ping"),
        &[("csrf", &csrf_device)],
    );
    assert_eq!(page.status, 303, "{}", page.body);
    let (_, commands) = api.get(&format!("/devices/{device}/commands"));
    assert_eq!(commands[0]["kind"], "ping");

    server.admin(&["tenant", "create", "other"]);
    let others = server.preauthorize("other", 1);
    let page = browser.get(&format!("/console/devices/{}", others[0].0));
    assert_eq!(page.status, 404, "another tenant's device");
    assert!(page.body.contains("no device"), "{}", page.body);

    // A viewer sees, but the forms it may not use are neither shown nor accepted.
    let mut viewer = Browser::new(&server);
    assert_eq!(
        viewer.login_key(&api_key(&server, "acme", "viewer")).status,
        303
    );
    let page = viewer.get("/console/tokens");
    assert!(!page.body.contains("create-token"), "{}", page.body);
    let viewer_csrf = viewer.csrf("/console/devices");
    let page = viewer.post(
        "/console/tokens",
        &[("csrf", &viewer_csrf), ("description", "x")],
    );
    assert_eq!(page.status, 403);
    assert!(page.body.contains("needs the admin role"), "{}", page.body);
    let page = viewer.post(
        &format!("/console/devices/{device}/deregister"),
        &[("csrf", &viewer_csrf)],
    );
    assert_eq!(page.status, 403);
    assert!(
        page.body.contains("needs the operator role"),
        "{}",
        page.body
    );
    assert_eq!(tokens_of(&api).len(), 1);
    // Another session's CSRF token is not this one's.
    let page = viewer.post("/console/logout", &[("csrf", &csrf)]);
    assert_eq!(page.status, 403);

    // A user account: password from a file, role from the account, audit names the user.
    let password = server.dir.path().join("password");
    std::fs::write(&password, "correct horse battery staple\n").unwrap();
    server.admin(&[
        "user",
        "create",
        "--tenant",
        "acme",
        "--role",
        "operator",
        "--password-file",
        password.to_str().unwrap(),
        "alice",
    ]);
    let mut alice = Browser::new(&server);
    let page = alice.post(
        "/console/login",
        &[("username", "alice"), ("password", "wrong password")],
    );
    assert_eq!(page.status, 401);
    let page = alice.post(
        "/console/login",
        &[
            ("username", "alice"),
            ("password", "correct horse battery staple"),
            ("next", "/console/tokens"),
        ],
    );
    assert_eq!(page.status, 303, "{}", page.body);
    assert_eq!(page.location.as_deref(), Some("/console/tokens"));
    let page = alice.get("/console/devices");
    assert!(page.body.contains("user:alice · operator"), "{}", page.body);
    let alice_csrf = alice.csrf("/console/devices");
    assert_eq!(
        alice
            .post(
                &format!("/console/devices/{device}/ping"),
                &[("csrf", &alice_csrf)]
            )
            .status,
        303
    );
    let (_, events) = api.get("/audit?action=command.queued");
    assert_eq!(events[0]["actor"], "user:alice");
    // Disabling the user ends the session at once.
    server.admin(&["user", "disable", "--tenant", "acme", "alice"]);
    assert_eq!(alice.get("/console/devices").status, 303);

    // Revoking the key a session logged in with ends that session.
    assert_eq!(viewer.get("/console/devices").status, 200);
    let (_, keys) = api.get("/apikeys");
    let viewer_key = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["role"] == "viewer")
        .unwrap();
    let (status, _) = api.post(
        &format!("/apikeys/{}/revoke", viewer_key["id"].as_str().unwrap()),
        json!({}),
    );
    assert_eq!(status, 204);
    assert_eq!(viewer.get("/console/devices").status, 303);

    // Logout ends the session in the database: the old cookie no longer works.
    let old = browser.cookie.clone();
    let page = browser.post("/console/logout", &[("csrf", &csrf)]);
    assert_eq!(page.status, 303);
    assert!(page.set_cookie.unwrap().contains("Max-Age=0"));
    browser.cookie = old;
    assert_eq!(browser.get("/console/devices").status, 303);
}

#[test]
fn failed_logins_and_wrong_keys_are_limited_per_address() {
    let server = Server::start_with(&["--rate-limit-failed-auth", "1/h:4"]);
    let api = server.tenant("acme");
    let mut browser = Browser::new(&server);
    // Two wrong passwords and two guessed API keys use up the allowance of four.
    for _ in 0..2 {
        let page = browser.post(
            "/console/login",
            &[("username", "alice"), ("password", "guess")],
        );
        assert_eq!(page.status, 401);
    }
    for guess in 0..2 {
        let key = format!("kxk_{guess:016x}_{}", "0".repeat(32));
        let (status, _) = api.with_key(&key).get("/devices");
        assert_eq!(status, 401);
    }
    // Now everything trying a credential from this address waits, even the right key...
    let page = browser.login_key(&api.key);
    assert_eq!(page.status, 429, "{}", page.body);
    assert!(
        page.body.contains("failed authentications"),
        "{}",
        page.body
    );
    let (status, body) = api.get("/devices");
    assert_eq!(status, 429, "{body}");
    // ...while requests that try none (probes, device traffic) go on.
    let health = wait_for("healthz", Duration::from_secs(5), || {
        ureq::get(&format!("{}/healthz", server.url)).call().ok()
    });
    assert_eq!(health.status(), 200);
}

#[test]
fn console_rollout_forms_drive_the_deployment() {
    let server = Server::start();
    let publisher = kernex_tests::bundle::Publisher::new(&server);
    let api = &publisher.api;
    let bundle = publisher.bundle("1.0.0", 1024);
    // Devices that never heartbeat: the rollout waits on them, so every state change is the form's.
    let devices = server.preauthorize("acme", 2);
    for (id, _) in &devices {
        let (status, body) = api.call(
            "PUT",
            &format!("/devices/{id}/labels"),
            Some(json!({"labels": {"site": "lab"}})),
        );
        assert_eq!(status, 200, "{body}");
    }
    let mut browser = Browser::new(&server);
    assert_eq!(browser.login_key(&api.key).status, 303);
    let csrf = browser.csrf("/console/deployments");
    let page = browser.get("/console/bundles");
    assert!(page.body.contains("1.0.0"), "{}", page.body);

    // A mistake in the form: 400, the form as typed, nothing created.
    let page = browser.post(
        "/console/deployments",
        &[
            ("csrf", &csrf),
            ("bundle", &bundle),
            ("selector", "site"),
            ("phases", "1, 100%"),
        ],
    );
    assert_eq!(page.status, 400, "{}", page.body);
    assert!(page.body.contains("expected key=value"), "{}", page.body);
    assert!(page.body.contains("value=\"1, 100%\""), "{}", page.body);
    let (_, list) = api.get("/deployments");
    assert_eq!(list.as_array().unwrap().len(), 0);

    let page = browser.post(
        "/console/deployments",
        &[
            ("csrf", &csrf),
            ("bundle", &bundle),
            ("selector", "site = lab"),
            ("phases", "1, 100%"),
        ],
    );
    assert_eq!(page.status, 303, "{}", page.body);
    let location = page.location.unwrap();
    let id = location
        .strip_prefix("/console/deployments/")
        .unwrap()
        .to_owned();
    let (_, deployment) = api.get(&format!("/deployments/{id}"));
    assert_eq!(deployment["phases"], json!([1, "100%"]));
    assert_eq!(deployment["devices"].as_array().unwrap().len(), 2);
    let page = browser.get(&location);
    assert!(page.body.contains("id=\"pause\""), "{}", page.body);
    assert!(page.body.contains("id=\"phases\""), "{}", page.body);

    let state = |api: &kernex_tests::Api| api.get(&format!("/deployments/{id}")).1["state"].clone();
    for (action, expected) in [
        ("pause", "paused"),
        ("resume", "running"),
        ("cancel", "cancelled"),
    ] {
        let page = browser.post(&format!("{location}/{action}"), &[("csrf", &csrf)]);
        assert_eq!(page.status, 303, "{action}: {}", page.body);
        assert_eq!(state(api), expected, "after {action}");
    }
    // The API's refusals show on the page with the API's status.
    let page = browser.post(&format!("{location}/resume"), &[("csrf", &csrf)]);
    assert_eq!(page.status, 409, "{}", page.body);
    let page = browser.post(&format!("{location}/rollback"), &[("csrf", &csrf)]);
    assert_eq!(page.status, 409, "{}", page.body);
    assert!(page.body.contains("class=\"error\""), "{}", page.body);
    let page = browser.post(&format!("{location}/explode"), &[("csrf", &csrf)]);
    assert_eq!(page.status, 404);

    // The audit page shows the trail of the forms, with its export.
    let page = browser.get("/console/audit?action=deployment");
    for action in [
        "deployment.created",
        "deployment.paused",
        "deployment.resumed",
        "deployment.cancelled",
    ] {
        assert!(page.body.contains(action), "{action}: {}", page.body);
    }
    let page = browser.get("/console/audit?action=deployment&format=csv");
    assert_eq!(page.status, 200);
    assert!(page.body.starts_with("id,at,actor,action"), "{}", page.body);
    assert_eq!(page.body.lines().count(), 5, "{}", page.body);
}

#[test]
fn the_devices_page_stays_a_page_with_many_devices() {
    let server = Server::start();
    let api = server.tenant("acme");
    server.preauthorize("acme", 501);
    let mut browser = Browser::new(&server);
    assert_eq!(browser.login_key(&api.key).status, 303);
    let page = browser.get("/console/devices");
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains("Showing the first 500 of 501 devices"),
        "{}",
        &page.body[..2000]
    );
    assert_eq!(page.body.matches("<tr class=\"device\"").count(), 500);
    assert!(page.body.contains("pending (501)"), "every device counted");
}

#[test]
fn admins_manage_console_users_in_the_console_and_the_api() {
    let server = Server::start();
    let api = server.tenant("acme");
    let mut admin = Browser::new(&server);
    assert_eq!(admin.login_key(&api.key).status, 303);
    let csrf = admin.csrf("/console/tenant");

    // A weak password: refused with the API's message, the username kept, the password not.
    let page = admin.post(
        "/console/users",
        &[
            ("csrf", &csrf),
            ("username", "bob"),
            ("password", "short"),
            ("role", "operator"),
        ],
    );
    assert_eq!(page.status, 400, "{}", page.body);
    assert!(
        page.body.contains("at least 12 characters"),
        "{}",
        page.body
    );
    assert!(page.body.contains("value=\"bob\""), "{}", page.body);
    assert!(!page.body.contains("value=\"short\""), "{}", page.body);

    let page = admin.post(
        "/console/users",
        &[
            ("csrf", &csrf),
            ("username", "bob"),
            ("password", "bob's long password"),
            ("role", "operator"),
        ],
    );
    assert_eq!(page.status, 303, "{}", page.body);
    let (status, users) = api.get("/users");
    assert_eq!(status, 200, "{users}");
    assert_eq!(users[0]["username"], "bob");
    assert_eq!(users[0]["role"], "operator");
    assert!(
        !users.to_string().contains("argon2"),
        "no hash in the API: {users}"
    );

    // The same name again, from the API: 409; another tenant's admin cannot see or disable bob.
    let (status, body) = api.post(
        "/users",
        json!({"username": "bob", "password": "another long password", "role": "viewer"}),
    );
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("user_exists"))
    );
    let other = server.tenant("other");
    assert_eq!(other.get("/users").1, json!([]));
    assert_eq!(other.post("/users/bob/disable", json!({})).0, 404);

    // bob logs in; disabling him in the console ends that session.
    let mut bob = Browser::new(&server);
    let page = bob.post(
        "/console/login",
        &[("username", "bob"), ("password", "bob's long password")],
    );
    assert_eq!(page.status, 303, "{}", page.body);
    let page = bob.get("/console/tenant");
    assert!(
        page.body.contains("shown to admins"),
        "an operator sees no keys: {}",
        page.body
    );
    let page = admin.post("/console/users/bob/disable", &[("csrf", &csrf)]);
    assert_eq!(page.status, 303, "{}", page.body);
    assert_eq!(bob.get("/console/devices").status, 303);
    let (_, users) = api.get("/users");
    assert!(users[0]["disabled_at"].is_string(), "{users}");
    let (_, events) = api.get("/audit?action=user");
    let actions: Vec<_> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].clone())
        .collect();
    assert_eq!(actions, [json!("user.disabled"), json!("user.created")]);
}

#[test]
fn guesses_sent_at_once_are_each_paid_for() {
    // 1 per minute, 2 at once: twelve wrong keys sent together all get through the check (none had
    // failed yet), and each failure pushes the address's next chance out by a minute.
    let server = Server::start_with(&["--rate-limit-failed-auth", "1/m:2"]);
    let api = server.tenant("acme");
    let guesses: Vec<_> = (0..12)
        .map(|guess| {
            let api = api.with_key(&format!("kxk_{guess:016x}_{}", "0".repeat(32)));
            std::thread::spawn(move || api.get("/devices").0)
        })
        .collect();
    let statuses: Vec<u16> = guesses.into_iter().map(|g| g.join().unwrap()).collect();
    assert!(
        statuses.iter().all(|s| *s == 401 || *s == 429),
        "{statuses:?}"
    );
    let failed = statuses.iter().filter(|s| **s == 401).count() as u64;
    let response = ureq::get(&format!("{}/api/v1/devices", server.url))
        .set("authorization", &format!("Bearer {}", api.key))
        .call()
        .unwrap_err();
    let ureq::Error::Status(429, response) = response else {
        panic!("expected 429: {response:?}")
    };
    let wait: u64 = response.header("retry-after").unwrap().parse().unwrap();
    // Every failure beyond the burst of two costs a minute of waiting.
    assert!(
        wait + 60 >= (failed - 1) * 60,
        "{failed} failures, retry after {wait} s"
    );
}
