//! Logs: JSON lines off a terminal, each line written while handling a request carrying that
//! request's id; the id travels from the agent (`x-request-id`) to the server's log and back in the
//! response, so one id finds a failed call on both sides.

use kernex_tests::{binary, wait_for, Server};
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn a_request_id_follows_a_refused_enrollment_from_agent_to_server_log() {
    let server = Server::start_logged(&[]);
    server.admin(&["tenant", "create", "acme"]);
    let token = server.token("acme", &["--uses", "1"]);
    let id = &token["kxb_".len().."kxb_".len() + 16];
    server.admin(&["token", "revoke", "--tenant", "acme", id]);

    // An agent whose only token was revoked: refused, and it says so with the request id.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bootstrap.toml"),
        format!(
            "server_url = \"{}\"\ntenant = \"acme\"\ntoken = \"{token}\"\n",
            server.url
        ),
    )
    .unwrap();
    let agent_log = dir.path().join("agent.log");
    let mut agent = Command::new(binary("kernex-agent"))
        .args(["run", "--max-backoff", "1s", "--bootstrap"])
        .arg(dir.path().join("bootstrap.toml"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&agent_log).unwrap())
        .spawn()
        .unwrap();
    let request_id = wait_for(
        "the agent to log a refusal",
        Duration::from_secs(30),
        || {
            let log = std::fs::read_to_string(&agent_log).unwrap();
            let line = log.lines().find(|l| l.contains("HTTP 403 token_revoked"))?;
            let id = line.split("(request ").nth(1)?.split(')').next()?;
            Some(id.to_owned())
        },
    );
    let _ = agent.kill();
    let _ = agent.wait();
    assert_eq!(request_id.len(), 16, "{request_id}");

    // The server logged the same refusal as JSON, inside a span with that id.
    let lines: Vec<Value> = wait_for("the server's log line", Duration::from_secs(10), || {
        let log = server.log();
        let lines: Vec<Value> = log
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        lines
            .iter()
            .any(|l| l["span"]["id"] == request_id.as_str())
            .then_some(lines)
    });
    let line = lines
        .iter()
        .find(|l| l["span"]["id"] == request_id.as_str())
        .unwrap();
    assert_eq!(line["fields"]["message"], "request refused", "{line}");
    assert_eq!(line["fields"]["status"], 403, "{line}");
    assert_eq!(line["span"]["route"], "/api/v1/enroll", "{line}");
    assert_eq!(line["level"], "INFO", "{line}");
    // The token is never logged, whole or in part.
    let secret = token.rsplit('_').next().unwrap();
    assert!(
        !server.log().contains(secret),
        "the token leaked into the log"
    );

    // A caller without an id gets a fresh one back; a sane id of the caller's is kept.
    let response = ureq::get(&format!("{}/healthz", server.url))
        .call()
        .unwrap();
    assert_eq!(response.header("x-request-id").map(str::len), Some(16));
    let response = ureq::get(&format!("{}/healthz", server.url))
        .set("x-request-id", "op-7f3a.retry:2")
        .call()
        .unwrap();
    assert_eq!(response.header("x-request-id"), Some("op-7f3a.retry:2"));
    let long = "x".repeat(65);
    for unwanted in ["has spaces", "quote\"s", long.as_str()] {
        let response = ureq::get(&format!("{}/healthz", server.url))
            .set("x-request-id", unwanted)
            .call()
            .unwrap();
        let id = response.header("x-request-id").unwrap();
        assert_eq!(id.len(), 16, "{unwanted:?} replaced by {id:?}");
    }
}
