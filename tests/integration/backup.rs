//! `kernex-server backup` and `restore` end to end: a backup taken from a running server while
//! devices heartbeat, checked and refused when damaged or aimed at a target holding data, then
//! restored in place of lost storage; the restored server has the devices, tokens, keys and bundle
//! files, and the agent carries on against it without enrolling again. On PostgreSQL when
//! `KERNEX_TEST_POSTGRES` is set (pg_dump / pg_restore), on SQLite otherwise (VACUUM INTO). With
//! `KERNEX_TEST_S3` set, the same with the bundles in the bucket, which the backup only names.

use crate::bundles::{active_version, wait_deployment};
use crate::limits::heartbeat;
use kernex_tests::bundle::Publisher;
use kernex_tests::{psql, wait_for, Agent, BundleStore, S3Bucket, S3Tap, Server, Storage};
use serde_json::{json, Value};
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
    // --force replaces what a target holds (the server is still stopped), on PostgreSQL even a
    // table the backup does not have that refers to one it has, as a newer schema's would.
    if let Storage::Postgres { url, .. } = &server.storage {
        psql(
            url,
            "CREATE TABLE from_a_newer_schema (device_id TEXT REFERENCES devices(id))",
        );
    }
    server.admin(&["restore", "--force", "--from", backup.to_str().unwrap()]);
    if let Storage::Postgres { url, .. } = &server.storage {
        assert_eq!(
            psql(url, "SELECT to_regclass('from_a_newer_schema') IS NULL"),
            "t"
        );
    }
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
    agent_carries_on(&api, &agent, &device_id, &body);
    assert_eq!(api.devices().len(), 1 + fleet.len());
}

/// Whether a restore target holds nothing: no data directory, and on PostgreSQL no table.
fn target_is_empty(server: &Server) -> bool {
    if server.data_dir().exists() {
        return false;
    }
    match &server.storage {
        Storage::Postgres { url, .. } => {
            psql(
                url,
                "SELECT count(*) FROM pg_tables \
                 WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
            ) == "0"
        }
        _ => true,
    }
}

/// The agent goes on with its device token after a restore: a heartbeat newer than `restored`
/// (the device as the restored server first showed it), the same device, no enrollment.
fn agent_carries_on(api: &kernex_tests::Api, agent: &Agent, device_id: &str, restored: &Value) {
    let restored_beat = restored["last_heartbeat"].as_str().unwrap().to_owned();
    wait_for(
        "the agent to heartbeat the restored server",
        Duration::from_secs(30),
        || {
            let (_, device) = api.get(&format!("/devices/{device_id}"));
            (device["last_heartbeat"].as_str() != Some(restored_beat.as_str())).then_some(())
        },
    );
    assert_eq!(agent.status()["device_id"], device_id);
}

/// With the S3 bundle store (only when `KERNEX_TEST_S3` is set): the backup of a running server
/// records the bucket instead of copying bundle files (and is refused without the bucket's name);
/// a restore with the other store kind is refused either way before anything is written; restored
/// with the bucket's options, the server serves the bundle from the bucket again, the agent
/// carries on, and a deployment reaches it through the presigned redirect.
#[test]
fn s3_backup_records_the_bucket_and_restores_against_it() {
    let Some(bucket) = S3Bucket::from_env() else {
        eprintln!("skipped: KERNEX_TEST_S3 is not set (`just test-s3` starts Garage and sets it)");
        return;
    };
    // The server reaches the bucket through a tap, which records the devices' presigned GETs.
    let tap = S3Tap::start(&bucket.endpoint, u64::MAX);
    let bucket = bucket.via(&tap.url);
    let s3_args = bucket.serve_args();
    let s3_args: Vec<&str> = s3_args.iter().map(String::as_str).collect();
    let mut server = Server::start_with_bundles(
        BundleStore::S3(bucket.clone()),
        &["--heartbeat-interval", "1s", "--rollout-interval", "200ms"],
    );
    let publisher = Publisher::new(&server);
    let api = publisher.api.clone();
    let bundle_id = publisher.bundle("1.0.0", 200_000);
    let (_, bundle) = api.get(&format!("/bundles/{bundle_id}"));
    let bundle_sha = bundle["sha256"].as_str().unwrap().to_owned();
    let bundle_bytes = download(&api.base, &api.key, &bundle_id);
    assert_eq!(archive_sha256(&bundle_bytes), bundle_sha);
    let objects = bucket.objects();
    assert!(
        objects.len() == 1 && objects[0].contains(&bundle_id),
        "{objects:?}"
    );

    let bootstrap = server.token("acme", &[]);
    let agent = Agent::start(&server.url, "acme", &bootstrap);
    let device = api.wait_device("the agent to enroll and heartbeat", |d| {
        d["last_heartbeat"].is_string()
    });
    let device_id = device["id"].as_str().unwrap().to_owned();

    // Backed up while the server runs and the agent heartbeats: the database only, and the bucket
    // named in the manifest.
    let work = tempfile::tempdir().unwrap();
    let backup = work.path().join("backup");
    // Without the bucket's name the manifest could not say where the bundles are: refused.
    let out = server.admin_output(&[
        "backup",
        "--out",
        backup.to_str().unwrap(),
        "--bundle-store",
        "s3",
        "--s3-endpoint",
        &bucket.endpoint,
    ]);
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(error.contains("needs --s3-bucket"), "{error}");
    assert!(!backup.exists());
    let mut args = vec!["backup", "--out", backup.to_str().unwrap(), "--json"];
    args.extend(&s3_args);
    let manifest: Value = serde_json::from_str(&server.admin(&args)).unwrap();
    let on_disk: Value =
        serde_json::from_slice(&std::fs::read(backup.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest, on_disk);
    let store = &manifest["bundle_store"];
    assert_eq!(store["kind"], "s3", "{manifest:#}");
    assert_eq!(store["bucket"], bucket.bucket.as_str());
    assert_eq!(store["prefix"], bucket.prefix.as_str());
    assert_eq!(
        store["endpoint"].as_str().unwrap().trim_end_matches('/'),
        bucket.endpoint
    );
    assert!(
        store["note"]
            .as_str()
            .unwrap()
            .starts_with("1 bundle files"),
        "{store}"
    );
    let files: Vec<&str> = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    let postgres = matches!(server.storage, Storage::Postgres { .. });
    assert_eq!(
        files,
        [if postgres {
            "database.pgdump"
        } else {
            "kernex.db"
        }]
    );
    assert!(!backup.join("bundles").exists());

    // A backup of a server with the local store, for the opposite refusal.
    let local = Server::start_with_bundles(BundleStore::Local, &[]);
    Publisher::new(&local).bundle("1.0.0", 10_000);
    let local_backup = work.path().join("local-backup");
    local.admin(&["backup", "--out", local_backup.to_str().unwrap()]);
    drop(local);

    // The storage is lost: a new data directory (and on PostgreSQL a new, empty database); the
    // bucket is still there.
    server.stop();
    std::fs::rename(server.data_dir(), work.path().join("lost-data")).unwrap();
    if let Storage::Postgres {
        admin_url, name, ..
    } = &server.storage
    {
        psql(admin_url, &format!("DROP DATABASE {name} WITH (FORCE)"));
        psql(admin_url, &format!("CREATE DATABASE {name}"));
    }
    assert!(target_is_empty(&server));

    // The S3 backup restored as if its bundles were local: refused naming the bucket.
    let out = server.admin_output(&[
        "restore",
        "--from",
        backup.to_str().unwrap(),
        "--bundle-store",
        "local",
    ]);
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        error.contains(&format!("S3 bucket {:?}", bucket.bucket))
            && error.contains("--bundle-store s3"),
        "{error}"
    );
    assert!(target_is_empty(&server));
    // A local-store backup restored with the S3 store: refused too.
    let mut args = vec!["restore", "--from", local_backup.to_str().unwrap()];
    args.extend(&s3_args);
    let out = server.admin_output(&args);
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        error.contains("holds the files of a local bundle store")
            && error.contains("restore with --bundle-store local"),
        "{error}"
    );
    assert!(target_is_empty(&server));
    assert_eq!(bucket.objects(), objects);

    // Restored with the bucket's options, the server starts on the same bucket and port.
    let mut args = vec!["restore", "--from", backup.to_str().unwrap()];
    args.extend(&s3_args);
    let restored = server.admin(&args);
    assert!(restored.contains("restored"), "{restored}");
    assert!(!server.data_dir().join("bundles").exists());
    server.restart();

    // The bundle's bytes come from the bucket through the restored server.
    let (status, body) = api.get(&format!("/bundles/{bundle_id}"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["sha256"], bundle_sha.as_str());
    let bytes = download(&api.base, &api.key, &bundle_id);
    assert_eq!(sha256_hex(&bytes), sha256_hex(&bundle_bytes));
    assert_eq!(archive_sha256(&bytes), bundle_sha);

    // The agent carries on with its device token: new heartbeats, the same device, no enrollment.
    let (status, device) = api.get(&format!("/devices/{device_id}"));
    assert_eq!(status, 200, "{device}");
    agent_carries_on(&api, &agent, &device_id, &device);
    assert_eq!(api.devices().len(), 1);

    // And a deployment of the bundle reaches it: a 307 to the bucket, verified and installed.
    assert!(tap.presigned().is_empty());
    let deployment = publisher.deploy(json!({"bundle": bundle_id, "devices": [device_id]}));
    wait_deployment(&api, &deployment, "succeeded");
    assert_eq!(active_version(&agent).as_deref(), Some("1.0.0"));
    let seen = tap.presigned();
    assert!(!seen.is_empty());
    for request in &seen {
        assert!(
            request.request_line.contains(&bundle_id) && [200, 206].contains(&request.status),
            "{request:#?}"
        );
        assert_eq!(request.header("authorization"), None, "{request:#?}");
    }
}
