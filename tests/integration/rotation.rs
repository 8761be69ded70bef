//! Rotating the device-token key while devices heartbeat: nothing is refused. Tokens signed with
//! the key just replaced stay valid, the servers pick the new key up without a restart, and a
//! token of a key rotated out twice is refused.

use crate::limits::heartbeat;
use kernex_tests::{wait_for, Agent, Server};
use std::time::Duration;

#[test]
fn the_device_token_key_rotates_without_refusing_anyone() {
    let server = Server::start_with(&[
        "--heartbeat-interval",
        "1s",
        "--device-token-ttl",
        "4s",
        "--secret-reload-interval",
        "500ms",
    ]);
    server.admin(&["tenant", "create", "acme"]);
    let token = server.token("acme", &[]);
    let agent = Agent::start(&server.url, "acme", &token);
    let beat = || agent.status()["last_heartbeat_at"].as_i64();
    wait_for("the agent to heartbeat", Duration::from_secs(90), beat);
    // A token signed with the first key.
    let first_key_token = server.preauthorize("acme", 1).remove(0).1;
    assert_eq!(heartbeat(&server, &first_key_token).0, 200);

    let rotate = || {
        let out = server.admin(&["secret", "rotate", "device-token-key"]);
        assert!(out.contains("rotated"), "{out}");
    };
    let carries_on = |what: &str| {
        let before = beat().unwrap();
        wait_for(what, Duration::from_secs(30), || {
            beat().filter(|t| *t > before + 2)
        });
    };

    rotate();
    std::thread::sleep(Duration::from_secs(2));
    // The replaced key still verifies; the agent renews its token (4 s) and carries on.
    assert_eq!(heartbeat(&server, &first_key_token).0, 200);
    carries_on("the agent to heartbeat after the first rotation");

    // Past a token lifetime, rotate again: the first key is gone, the agent does not notice.
    std::thread::sleep(Duration::from_secs(5));
    rotate();
    std::thread::sleep(Duration::from_secs(2));
    let (status, body) = heartbeat(&server, &first_key_token);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("invalid_device_token")),
        "{body}"
    );
    carries_on("the agent to heartbeat after the second rotation");
    assert!(
        agent.status()["last_error"].is_null(),
        "the agent saw an error: {}",
        agent.status()
    );

    // A nonsense secret name is refused with the choices.
    let out = server.admin_output(&["secret", "rotate", "root-password"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("device-token-key"));
}
