//! `GET /metrics` of a real server with a real agent: fleet gauges from the database, counters and
//! per-route latency histograms from the request path, in Prometheus' text format.

use kernex_tests::{wait_for, Agent, Server};
use std::time::Duration;

fn scrape(server: &Server) -> String {
    let response = ureq::get(&format!("{}/metrics", server.url))
        .call()
        .unwrap();
    assert!(
        response
            .header("content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4"),
        "{:?}",
        response.header("content-type")
    );
    response.into_string().unwrap()
}

/// The value of the sample whose line starts with `series` (name and labels).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

#[test]
fn metrics_count_the_fleet_the_requests_and_the_heartbeats() {
    let server = Server::start();
    let api = server.tenant("acme");
    let token = server.token("acme", &[]);
    let _agent = Agent::start(&server.url, "acme", &token);
    api.wait_device("the device online", |d| d["status"] == "online");
    let text = wait_for("a few heartbeats counted", Duration::from_secs(30), || {
        let text = scrape(&server);
        (sample(&text, "kernex_heartbeats_total") >= Some(2.0)).then_some(text)
    });
    assert_eq!(
        sample(&text, "kernex_devices{tenant=\"acme\",status=\"online\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "kernex_enrollments_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(sample(&text, "kernex_database_up"), Some(1.0), "{text}");
    let beats = "kernex_http_request_duration_seconds_count{method=\"POST\",route=\"/api/v1/heartbeat\",status=\"200\"}";
    assert!(sample(&text, beats) >= Some(2.0), "{text}");
    assert!(
        text.contains("kernex_heartbeat_commit_duration_seconds_bucket{le=\"+Inf\"}"),
        "{text}"
    );
    // A refused request is counted under its route and status.
    let _ = ureq::get(&format!("{}/api/v1/devices", server.url)).call();
    let text = scrape(&server);
    let refused = "kernex_http_request_duration_seconds_count{method=\"GET\",route=\"/api/v1/devices\",status=\"401\"}";
    assert_eq!(sample(&text, refused), Some(1.0), "{text}");
    // Every histogram line is well formed: name{labels} value.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap();
        assert!(value.parse::<f64>().is_ok(), "{line}");
        assert!(series.starts_with("kernex_"), "{line}");
    }
}
