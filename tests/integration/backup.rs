//! `kernex-server backup` and `restore` end to end: a backup taken from a running server while
//! devices heartbeat, checked and refused when damaged or aimed at a target holding data, then
//! restored in place of lost storage; the restored server has the devices, tokens, keys and bundle
//! files, and the agent carries on against it without enrolling again. On PostgreSQL when
//! `KERNEX_TEST_POSTGRES` is set (pg_dump / pg_restore), on SQLite otherwise (VACUUM INTO).

use crate::limits::heartbeat;
use kernex_tests::bundle::Publisher;
use kernex_tests::{psql, wait_for, Agent, BundleStore, Server, Storage};
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A bundle's SHA-256 is its archive's (the signature trailer follows it in the file).
fn archive_sha256(file: &[u8]) -> String {
    let temp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(temp.path(), file).unwrap();
    kernex_protocol::bundle::read_sealed(temp.path())
        .unwrap()
        .sha256
}

fn download(base: &str, key: &str, id: &str) -> Vec<u8> {
    let response = ureq::get(&format!("{base}/api/v1/bundles/{id}/content"))
        .set("authorization", &format!("Bearer {key}"))
        .call()
        .unwrap();
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut response.into_reader(), &mut bytes).unwrap();
    bytes
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn backup_under_heartbeats_restores_devices_tokens_and_bundles() {
    let mut server = Server::start_with_bundles(
        BundleStore::Local,
        &["--heartbeat-interval", "1s", "--rate-limit-device", "off"],
    );
    let publisher = Publisher::new(&server);
    let api = publisher.api.clone();
    let bundle_id = publisher.bundle("1.0.0", 200_000);
    let (_, bundle) = api.get(&format!("/bundles/{bundle_id}"));
    let bundle_sha = bundle["sha256"].as_str().unwrap().to_owned();
    let bundle_bytes = download(&api.base, &api.key, &bundle_id);
    assert_eq!(archive_sha256(&bundle_bytes), bundle_sha);

    let bootstrap = server.token("acme", &["--description", "site-1"]);
    let agent = Agent::start(&server.url, "acme", &bootstrap);
    let device = api.wait_device("the agent to enroll and heartbeat", |d| {
        d["last_heartbeat"].is_string()
    });
    let device_id = device["id"].as_str().unwrap().to_owned();

    // Pre-authorized devices heartbeat as fast as they can while the backup runs.
    let fleet = server.preauthorize("acme", 6);
    let stop = AtomicBool::new(false);
    let beats = AtomicU64::new(0);
    let work = tempfile::tempdir().unwrap();
    let backup = work.path().join("backup");
    let (printed, during) = std::thread::scope(|scope| {
        for (_, token) in &fleet {
            let (server, stop, beats) = (&server, &stop, &beats);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let (status, body) = heartbeat(server, token);
                    assert_eq!(status, 200, "{body}");
                    beats.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        wait_for("heartbeats to flow", Duration::from_secs(10), || {
            (beats.load(Ordering::Relaxed) > 20).then_some(())
        });
        let before = beats.load(Ordering::Relaxed);
        let printed = server.admin(&["backup", "--out", backup.to_str().unwrap(), "--json"]);
        let during = beats.load(Ordering::Relaxed) - before;
        stop.store(true, Ordering::Relaxed);
        (printed, during)
    });
    assert!(during > 0, "no heartbeat was answered during the backup");

    let manifest: Value = serde_json::from_str(&printed).unwrap();
    let on_disk: Value =
        serde_json::from_slice(&std::fs::read(backup.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest, on_disk);
    let postgres = matches!(server.storage, Storage::Postgres { .. });
    assert_eq!(
        manifest["backend"],
        if postgres { "postgres" } else { "sqlite" }
    );
    assert!(
        manifest["schema_version"].as_i64().unwrap() >= 4,
        "{manifest}"
    );
    assert_eq!(manifest["bundle_store"]["kind"], "local");
    let files = manifest["files"].as_array().unwrap();
    let bundle_file = files
        .iter()
        .find(|f| f["path"].as_str().unwrap().starts_with("bundles/"))
        .unwrap_or_else(|| panic!("no bundle file in {manifest}"));
    assert_eq!(bundle_file["sha256"], sha256_hex(&bundle_bytes).as_str());
    for file in files {
        let bytes = std::fs::read(backup.join(file["path"].as_str().unwrap())).unwrap();
        assert_eq!(sha256_hex(&bytes), file["sha256"].as_str().unwrap());
        assert_eq!(bytes.len() as u64, file["size"].as_u64().unwrap());
    }

    // A damaged copy is refused before anything is written, naming the file.
    let damaged = work.path().join("damaged");
    copy_dir(&backup, &damaged);
    let damaged_file = damaged.join(bundle_file["path"].as_str().unwrap());
    let mut bytes = std::fs::read(&damaged_file).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&damaged_file, bytes).unwrap();
    let out = server.admin_output(&["restore", "--from", damaged.to_str().unwrap()]);
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        error.contains(&damaged_file.display().to_string()) && error.contains("SHA-256"),
        "{error}"
    );
    // The live storage holds data: refused without --force.
    let out = server.admin_output(&["restore", "--from", backup.to_str().unwrap()]);
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(error.contains("--force"), "{error}");
    // A backup directory is never reused.
    let out = server.admin_output(&["backup", "--out", backup.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not empty"));

    // The storage is lost: a new data directory (and on PostgreSQL a new, empty database).
    server.stop();
    let data = server.data_dir();
    std::fs::rename(&data, work.path().join("lost-data")).unwrap();
    if let Storage::Postgres {
        admin_url, name, ..
    } = &server.storage
    {
        psql(admin_url, &format!("DROP DATABASE {name} WITH (FORCE)"));
        psql(admin_url, &format!("CREATE DATABASE {name}"));
    }
    let restored = server.admin(&["restore", "--from", backup.to_str().unwrap()]);
    assert!(restored.contains("restored"), "{restored}");
    // --force replaces what a target holds (the server is still stopped).
    server.admin(&["restore", "--force", "--from", backup.to_str().unwrap()]);
    server.restart();

    // Device, bootstrap token, API key, device tokens and the bundle's bytes are all back.
    let (status, body) = api.get(&format!("/devices/{device_id}"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(api.devices().len(), 1 + fleet.len());
    let tokens = server.admin(&["token", "list", "--tenant", "acme", "--json"]);
    assert!(tokens.contains("site-1"), "{tokens}");
    assert_eq!(heartbeat(&server, &fleet[0].1).0, 200);
    let bytes = download(&api.base, &api.key, &bundle_id);
    assert_eq!(archive_sha256(&bytes), bundle_sha);
    assert!(bytes == bundle_bytes);

    // The agent carries on with its device token: new heartbeats, the same device, no enrollment.
    let restored_beat = body["last_heartbeat"].as_str().unwrap().to_owned();
    wait_for(
        "the agent to heartbeat the restored server",
        Duration::from_secs(30),
        || {
            let (_, device) = api.get(&format!("/devices/{device_id}"));
            (device["last_heartbeat"].as_str() != Some(restored_beat.as_str())).then_some(())
        },
    );
    assert_eq!(agent.status()["device_id"], device_id.as_str());
    assert_eq!(api.devices().len(), 1 + fleet.len());
}
