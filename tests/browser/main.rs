//! The web console in a real browser (headless Chromium through chromedriver): an operator logs
//! in, creates a bootstrap token, a real agent enrolls with it and the operator sees the device go
//! online, then starts a rollout of a bundle from the console, watches it succeed, rolls it back,
//! and reads the audit log. Screenshots of every step go to `target/console-screenshots/`.
//!
//! Run by `just test-browser` (which installs Debian's chromium and chromium-driver).

#![allow(clippy::unwrap_used)]

use kernex_tests::bundle::Publisher;
use kernex_tests::webdriver::Browser;
use kernex_tests::{wait_for, Agent, Server};
use serde_json::json;
use std::path::PathBuf;
use std::time::Duration;

fn screenshots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn an_operator_enrolls_a_device_and_rolls_out_a_bundle_in_the_console() {
    let shots = screenshots();
    let shot =
        |browser: &Browser, name: &str| browser.screenshot(&shots.join(format!("{name}.png")));
    let server = Server::start();
    let publisher = Publisher::new(&server);
    let api = &publisher.api;
    let v1 = publisher.bundle("1.0.0", 4096);
    let v2 = publisher.bundle("1.1.0", 4096);
    let browser = Browser::start();
    let console = format!("{}/console", server.url);

    // Not logged in: the console sends the browser to the login page.
    browser.open(&format!("{console}/devices"));
    assert!(
        browser.current_url().contains("/console/login"),
        "{}",
        browser.current_url()
    );
    browser.fill(
        "#api_key",
        "kxk_0000000000000000_00000000000000000000000000000000",
    );
    browser.click("#login-with-key");
    assert!(
        browser.text().contains("is not valid"),
        "{}",
        browser.text()
    );
    shot(&browser, "01-login-refused");
    browser.fill("#api_key", &api.key);
    browser.click("#login-with-key");
    browser.find("#no-devices");
    let whoami = browser.find("#whoami");
    assert!(
        browser.text_of(&whoami).contains("admin"),
        "{}",
        browser.text_of(&whoami)
    );
    shot(&browser, "02-devices-empty");

    // A bootstrap token, made in the console and shown once.
    browser.click("a[href='/console/tokens']");
    browser.fill("#token-description", "browser test");
    browser.fill("#token-uses", "1");
    browser.fill("#token-ttl", "1h");
    browser.click("#create-token-button");
    let token = browser.text_of(&browser.find("#token-secret"));
    assert!(token.starts_with("kxb_"), "{token}");
    shot(&browser, "03-token-created");

    // A real agent enrolls with it; the devices page (refreshing itself) shows it online, with
    // its telemetry sparkline once a few heartbeats arrived.
    let agent = Agent::start(&server.url, "acme", &token);
    browser.click("a[href='/console/devices']");
    browser.wait_for(".device .status.online", Duration::from_secs(120));
    browser.wait_for(".device svg.spark polyline", Duration::from_secs(30));
    let device = api.devices()[0]["id"].as_str().unwrap().to_owned();
    shot(&browser, "04-device-online");
    browser.click(&format!("a[href='/console/devices/{device}']"));
    assert_eq!(browser.text_of(&browser.find("#device-status")), "online");
    shot(&browser, "05-device");

    // A rollout of 1.0.0 to the device, started from the console's form.
    let (status, body) = api.call(
        "PUT",
        &format!("/devices/{device}/labels"),
        Some(json!({"labels": {"site": "lab"}})),
    );
    assert_eq!(status, 200, "{body}");
    let rollout = |bundle: &str| {
        browser.click("a[href='/console/deployments']");
        browser.click(&format!("#deployment-bundle option[value='{bundle}']"));
        browser.fill("#deployment-selector", "site=lab");
        browser.click("#start-rollout");
        wait_for("the rollout page", Duration::from_secs(10), || {
            browser
                .current_url()
                .contains("/console/deployments/")
                .then_some(())
        });
        browser.wait_for("#deployment-state.succeeded", Duration::from_secs(120));
        browser.current_url()
    };
    rollout(&v1);
    shot(&browser, "06-rollout-succeeded");
    let second = rollout(&v2);
    wait_for("the agent to report 1.1.0", Duration::from_secs(60), || {
        let (_, d) = api.get(&format!("/devices/{device}"));
        (d["telemetry"]["bundles"]["hello"] == "1.1.0").then_some(())
    });

    // Roll the second back from its page: a new rollout of 1.0.0 that succeeds too.
    browser.open(&second);
    browser.click("#rollback");
    wait_for("the rollback's page", Duration::from_secs(10), || {
        (browser.current_url() != second).then_some(())
    });
    browser.wait_for("#deployment-state.succeeded", Duration::from_secs(120));
    assert!(browser.text().contains("Rolls back"), "{}", browser.text());
    shot(&browser, "07-rolled-back");
    wait_for(
        "the agent to report 1.0.0 again",
        Duration::from_secs(60),
        || {
            let (_, d) = api.get(&format!("/devices/{device}"));
            (d["telemetry"]["bundles"]["hello"] == "1.0.0").then_some(())
        },
    );

    // The audit log shows what the console did, attributed to the key.
    browser.click("a[href='/console/audit']");
    let text = browser.text();
    for action in [
        "console.login",
        "token.created",
        "deployment.created",
        "device.enrolled",
    ] {
        assert!(text.contains(action), "{action} in the audit log: {text}");
    }
    shot(&browser, "08-audit");
    browser.click("a[href='/console/bundles']");
    shot(&browser, "09-bundles");
    browser.click("a[href='/console/deployments']");
    shot(&browser, "10-rollouts");

    // Logging out ends the session: the console asks for a login again.
    browser.click("#logout");
    browser.open(&format!("{console}/devices"));
    assert!(
        browser.current_url().contains("/console/login"),
        "{}",
        browser.current_url()
    );
    drop(agent);
}
