//! One integration-test binary (one link) for everything that runs real processes.
//! Each test starts its own server on its own storage, so tests run in parallel.

#![allow(clippy::unwrap_used)]

mod access;
mod agent_lifecycle;
mod audit;
mod backup;
mod bundles;
mod console;
mod database_outage;
mod device_protocol;
mod imagebuilder;
mod limits;
mod logs;
mod metrics;
mod rest_api;
mod rollout_resilience;
mod rotation;
mod self_update;
mod tls;
mod traces;
mod vm_link;
mod webhooks;

use kernex_protocol::wire::{EnrollRequest, Facts};
use kernex_protocol::DeviceKey;
use kernex_tests::{into_reply, Reply};
use std::sync::OnceLock;

/// Device keys shared by tests (generation is the slow part); tests that need different devices
/// take different indices.
pub fn key(i: usize) -> &'static DeviceKey {
    static KEYS: [OnceLock<DeviceKey>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    KEYS[i].get_or_init(|| DeviceKey::generate().unwrap())
}

/// Sends `body` to `path` signed with `key`.
pub fn post_signed(base: &str, path: &str, body: &[u8], key: &DeviceKey) -> Reply {
    into_reply(
        ureq::post(&format!("{base}/api/v1{path}"))
            .set("content-type", "application/json")
            .set(kernex_protocol::SIGNATURE_HEADER, &key.sign(body))
            .send_bytes(body),
    )
}

pub fn enroll_request(
    tenant: &str,
    token: &str,
    hardware_id: &str,
    key: &DeviceKey,
) -> EnrollRequest {
    EnrollRequest {
        tenant: tenant.into(),
        token: token.into(),
        hardware_id: hardware_id.into(),
        public_key: key.public().to_pem(),
        facts: Facts::default(),
        timestamp: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64,
    }
}

pub fn enroll(base: &str, tenant: &str, token: &str, hardware_id: &str, key: &DeviceKey) -> Reply {
    let body = serde_json::to_vec(&enroll_request(tenant, token, hardware_id, key)).unwrap();
    post_signed(base, "/enroll", &body, key)
}
