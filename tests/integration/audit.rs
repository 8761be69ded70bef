//! The audit trail: who, what, when, from where (address and request id), before and after;
//! filtered, paged, and exported as NDJSON and CSV.

use crate::{enroll, key};
use kernex_tests::Server;
use serde_json::{json, Value};

#[test]
fn changes_are_audited_with_source_before_and_after_and_exported() {
    let server = Server::start_with(&["--heartbeat-interval", "60s"]);
    let api = server.tenant("acme");
    let (_, token) = api.post(
        "/tokens",
        json!({"uses": 1, "description": "line 1, \"quoted\""}),
    );
    let token_id = token["id"].as_str().unwrap().to_owned();
    let (status, _) = enroll(
        &server.url,
        "acme",
        token["token"].as_str().unwrap(),
        "hw-audit",
        key(1),
    );
    assert_eq!(status, 201);
    let device = api.devices()[0]["id"].as_str().unwrap().to_owned();
    api.call(
        "PUT",
        &format!("/devices/{device}/labels"),
        Some(json!({"labels": {"site": "paris"}})),
    );
    api.call(
        "PUT",
        &format!("/devices/{device}/labels"),
        Some(json!({"labels": {"site": "lyon"}})),
    );

    // The revocation, with a request id of the caller's choosing.
    let response = ureq::post(&format!("{}/api/v1/tokens/{token_id}/revoke", server.url))
        .set("authorization", &format!("Bearer {}", api.key))
        .set("x-request-id", "audit-test-1")
        .send_json(json!({}))
        .unwrap();
    assert_eq!(response.status(), 200);

    let (status, events) = api.get("/audit?action=token");
    assert_eq!(status, 200, "{events}");
    let events = events.as_array().unwrap();
    assert_eq!(
        events
            .iter()
            .map(|e| e["action"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["token.revoked", "token.created"],
        "{events:#?}"
    );
    let revoked = &events[0];
    assert_eq!(revoked["subject"], token_id.as_str());
    assert_eq!(revoked["source"], "127.0.0.1");
    assert_eq!(revoked["request_id"], "audit-test-1");
    assert!(
        revoked["actor"].as_str().unwrap().starts_with("apikey:"),
        "{revoked}"
    );
    // The token was used up by the enrollment before it was revoked.
    assert_eq!(revoked["before"]["state"], "exhausted", "{revoked}");
    assert_eq!(revoked["after"]["state"], "revoked", "{revoked}");
    assert!(revoked["after"]["revoked_at"].is_string());

    let (_, labelled) = api.get(&format!("/audit?action=device.labelled&subject={device}"));
    let labelled = labelled.as_array().unwrap();
    assert_eq!(labelled.len(), 2);
    assert_eq!(labelled[0]["before"], json!({"labels": {"site": "paris"}}));
    assert_eq!(labelled[0]["after"], json!({"labels": {"site": "lyon"}}));
    assert_eq!(labelled[1]["before"], json!({"labels": {}}));

    // The enrollment came from the device's own request, the tenant from the admin command.
    let (_, all) = api.get("/audit");
    let all = all.as_array().unwrap();
    let enrolled = all
        .iter()
        .find(|e| e["action"] == "device.enrolled")
        .unwrap();
    assert_eq!(enrolled["source"], "127.0.0.1");
    let created = all
        .iter()
        .find(|e| e["action"] == "tenant.created")
        .unwrap();
    assert_eq!(
        (created["source"].as_str(), &created["actor"]),
        (Some("local"), &json!("cli"))
    );

    // Time filters, paging, and their errors.
    assert_eq!(api.get("/audit?since=2999-01-01T00:00:00Z").1, json!([]));
    assert_eq!(api.get("/audit?until=2000-01-01T00:00:00Z").1, json!([]));
    let (status, err) = api.get("/audit?since=yesterday");
    assert_eq!(status, 400);
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("since \"yesterday\""),
        "{err}"
    );
    let (_, page) = api.get("/audit?limit=2");
    let (_, next) = api.get(&format!("/audit?limit=100&before={}", page[1]["id"]));
    assert_eq!(next.as_array().unwrap().len(), all.len() - 2);
    assert_eq!(next[0]["id"], all[2]["id"]);
    let (status, err) = api.get("/audit?format=xml");
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (400, Some("invalid_query"))
    );

    // Exports: NDJSON lines are the same events; CSV has a header and quotes what needs it.
    let export = |format: &str| {
        let response = ureq::get(&format!(
            "{}/api/v1/audit?format={format}&limit=100000",
            server.url
        ))
        .set("authorization", &format!("Bearer {}", api.key))
        .call()
        .unwrap();
        assert!(response
            .header("content-disposition")
            .unwrap()
            .contains(&format!("kernex-audit.{format}")));
        response.into_string().unwrap()
    };
    let lines: Vec<Value> = export("ndjson")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(&lines, all);
    let csv = export("csv");
    let mut rows = csv.split("\r\n").filter(|l| !l.is_empty());
    assert_eq!(
        rows.next().unwrap(),
        "id,at,actor,action,subject,source,request_id,detail,before,after"
    );
    assert_eq!(rows.count(), all.len());
    // A JSON column with commas and quotes: quoted, inner quotes doubled.
    assert!(
        csv.contains(r#","{""revoked_at"":"#) || csv.contains(r#","{""state"":""revoked"","#),
        "{csv}"
    );
}
