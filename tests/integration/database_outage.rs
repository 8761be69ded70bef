//! Losing PostgreSQL under load degrades and never corrupts: `/readyz` turns 503, API calls and
//! heartbeats answer 503 with `Retry-After` (never a 500, never a hang), the server stays up, and
//! once PostgreSQL is back everything recovers without a restart: readiness, the API, the agents'
//! heartbeats and a command round trip.

use kernex_tests::postgres::PrivatePostgres;
use kernex_tests::{wait_for, Agent, Server};
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn readyz(server: &Server) -> u16 {
    match ureq::get(&format!("{}/readyz", server.url)).call() {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(status, _)) => status,
        Err(e) => panic!("readyz: {e}"),
    }
}

#[test]
fn losing_postgres_degrades_then_recovers_without_a_restart() {
    if std::env::var_os("KERNEX_TEST_POSTGRES").is_none() {
        eprintln!("database_outage: runs in the PostgreSQL suite only (SQLite is in-process)");
        return;
    }
    let postgres = PrivatePostgres::start();
    let server = Server::start_on_database(
        &postgres.url(),
        &["--heartbeat-interval", "1s", "--request-timeout", "10s"],
    );
    let api = server.tenant("acme");
    let token = server.token("acme", &["--uses", "2"]);
    let agents = [
        Agent::start(&server.url, "acme", &token),
        Agent::start(&server.url, "acme", &token),
    ];
    wait_for("both devices online", Duration::from_secs(90), || {
        let devices = api.devices();
        (devices.len() == 2 && devices.iter().all(|d| d["status"] == "online")).then_some(())
    });

    // Load: an operator client listing devices every 50 ms the whole time (bounded), plus the
    // agents' heartbeats every second.
    let stop = Arc::new(AtomicBool::new(false));
    let statuses = Arc::new(Mutex::new(Vec::new()));
    let load = {
        let (api, stop, statuses) = (api.clone(), stop.clone(), statuses.clone());
        std::thread::spawn(move || {
            for _ in 0..3000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let started = Instant::now();
                let (status, _) = api.get("/devices");
                statuses.lock().unwrap().push((status, started.elapsed()));
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(1));

    postgres.stop();
    let down_at = Instant::now();
    wait_for("/readyz to say 503", Duration::from_secs(15), || {
        (readyz(&server) == 503).then_some(())
    });
    let response = match ureq::get(&format!("{}/api/v1/devices", server.url))
        .set("authorization", &format!("Bearer {}", api.key))
        .call()
    {
        Err(ureq::Error::Status(503, response)) => response,
        other => panic!("expected 503 while PostgreSQL is down, got {other:?}"),
    };
    assert!(response.header("retry-after").is_some());
    let body: serde_json::Value = response.into_json().unwrap();
    assert_eq!(body["error"]["code"], "database_unavailable", "{body}");
    // Stay down a while: agents keep trying and are refused with 503s.
    std::thread::sleep(Duration::from_secs(4));
    let outage = down_at.elapsed();

    postgres.start_again();
    let up_at = Instant::now();
    wait_for("/readyz to say 200 again", Duration::from_secs(30), || {
        (readyz(&server) == 200).then_some(())
    });
    let recovered_in = up_at.elapsed();
    // Heartbeats flow again: both devices heartbeat after PostgreSQL came back.
    let back = time::OffsetDateTime::now_utc();
    wait_for(
        "both devices to heartbeat again",
        Duration::from_secs(60),
        || {
            let devices = api.devices();
            devices
                .iter()
                .all(|d| {
                    let last = d["last_heartbeat"].as_str().unwrap_or("");
                    time::OffsetDateTime::parse(
                        last,
                        &time::format_description::well_known::Rfc3339,
                    )
                    .is_ok_and(|t| t > back)
                        && d["status"] == "online"
                })
                .then_some(())
        },
    );
    // Commands round-trip again.
    let device = api.devices()[0]["id"].as_str().unwrap().to_owned();
    let (status, command) = api.post(
        &format!("/devices/{device}/commands"),
        json!({"kind": "ping"}),
    );
    assert_eq!(status, 201, "{command}");
    let command_path = format!(
        "/devices/{device}/commands/{}",
        command["id"].as_str().unwrap()
    );
    wait_for(
        "the ping to be acknowledged",
        Duration::from_secs(30),
        || (api.get(&command_path).1["state"] == "succeeded").then_some(()),
    );

    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    let statuses = statuses.lock().unwrap();
    let unavailable = statuses.iter().filter(|(s, _)| *s == 503).count();
    assert!(unavailable > 0, "no 503 seen during a {outage:?} outage");
    for (status, took) in statuses.iter() {
        assert!(
            *status == 200 || *status == 503,
            "the API answered {status} during the outage (only 200 or 503 expected)"
        );
        assert!(*took < Duration::from_secs(12), "a request took {took:?}");
    }
    eprintln!(
        "database_outage: {} requests, {unavailable} answered 503 during a {outage:?} outage; ready {recovered_in:?} after PostgreSQL restarted",
        statuses.len()
    );
    drop(agents);
}
