//! OTLP traces: with an endpoint configured, the server exports the span of each request and,
//! as its children in the same trace, the spans of the database calls made for it.

use kernex_tests::receiver::Receiver;
use kernex_tests::{wait_for, Server};
use serde_json::Value;
use std::time::Duration;

/// Every span the collector received, flattened (OTLP/HTTP JSON).
fn spans(collector: &Receiver) -> Vec<(Value, Value)> {
    let mut all = Vec::new();
    for request in collector.received() {
        assert_eq!(request.path, "/v1/traces");
        for resource in request.json()["resourceSpans"].as_array().unwrap() {
            for scope in resource["scopeSpans"].as_array().unwrap() {
                for span in scope["spans"].as_array().unwrap() {
                    all.push((resource["resource"].clone(), span.clone()));
                }
            }
        }
    }
    all
}

fn attribute<'a>(span: &'a Value, key: &str) -> Option<&'a str> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)?["value"]["stringValue"]
        .as_str()
}

#[test]
fn requests_and_their_database_calls_are_exported_over_otlp() {
    let collector = Receiver::start(0);
    let server = Server::start_with_env(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &collector.base()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let api = server.tenant("acme");
    let response = ureq::get(&format!("{}/api/v1/devices", server.url))
        .set("authorization", &format!("Bearer {}", api.key))
        .set("x-request-id", "trace-me")
        .call()
        .unwrap();
    assert_eq!(response.status(), 200);

    let (request, children) = wait_for(
        "the request's spans at the collector",
        Duration::from_secs(30),
        || {
            let spans = spans(&collector);
            let (resource, request) = spans
                .iter()
                .find(|(_, s)| s["name"] == "request" && attribute(s, "id") == Some("trace-me"))?
                .clone();
            let children: Vec<Value> = spans
                .iter()
                .map(|(_, s)| s)
                .filter(|s| {
                    s["parentSpanId"] == request["spanId"] && s["traceId"] == request["traceId"]
                })
                .cloned()
                .collect();
            (children.len() >= 2).then_some(((resource, request), children))
        },
    );
    let (resource, request) = request;
    assert_eq!(attribute(&request, "route"), Some("/api/v1/devices"));
    assert_eq!(attribute(&request, "method"), Some("GET"));
    let service = resource["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["key"] == "service.name")
        .unwrap();
    assert_eq!(service["value"]["stringValue"], "kernex-server");
    let mut names: Vec<&str> = children
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["db.devices.list", "db.tokens.authenticate_api_key"]);
}
