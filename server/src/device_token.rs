//! Short-lived bearer tokens for devices: one RSA verification at `/auth` buys an HMAC-signed token
//! that every heartbeat checks without touching the database or doing public-key work.
//!
//! Form: `v1.<base64url(json claims)>.<base64url(HMAC-SHA256(key, "v1." + claims))>`. The key is
//! shared by all replicas through the database. Rotation (`kernex-server secret rotate`) makes a new
//! current key and keeps the one before as `previous`: tokens signed with either verify, so
//! devices carry on while they renew theirs; each server reloads the pair from the database
//! periodically, so no restart is needed.

use crate::error::ApiError;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use kernex_protocol::wire::codes;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// What a device token asserts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceClaims {
    #[serde(rename = "d")]
    pub device_id: String,
    #[serde(rename = "t")]
    pub tenant_id: String,
    /// Unix seconds after which the token is refused.
    #[serde(rename = "e")]
    pub expires_at: i64,
}

/// The current key (signs and verifies) and the previous one (verifies only), swappable while the
/// server runs.
pub struct DeviceTokenKey {
    keys: std::sync::RwLock<Keys>,
}

#[derive(Clone)]
struct Keys {
    current: Hmac<Sha256>,
    previous: Option<Hmac<Sha256>>,
}

impl std::fmt::Debug for DeviceTokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceTokenKey(..)")
    }
}

const VERSION: &str = "v1.";

fn mac(secret: &[u8]) -> Hmac<Sha256> {
    Hmac::new_from_slice(secret).expect("HMAC accepts keys of any length")
}

impl DeviceTokenKey {
    pub fn new(secret: &[u8]) -> DeviceTokenKey {
        DeviceTokenKey::with_previous(secret, None)
    }

    pub fn with_previous(secret: &[u8], previous: Option<&[u8]>) -> DeviceTokenKey {
        DeviceTokenKey {
            keys: std::sync::RwLock::new(Keys {
                current: mac(secret),
                previous: previous.map(mac),
            }),
        }
    }

    /// Replaces both keys (after a rotation, possibly by another replica).
    pub fn set(&self, secret: &[u8], previous: Option<&[u8]>) {
        let keys = Keys {
            current: mac(secret),
            previous: previous.map(mac),
        };
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
    }

    fn keys(&self) -> Keys {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn issue(&self, claims: &DeviceClaims) -> String {
        let payload = B64.encode(serde_json::to_vec(claims).expect("claims serialize"));
        let mut mac = self.keys().current;
        mac.update(VERSION.as_bytes());
        mac.update(payload.as_bytes());
        format!(
            "{VERSION}{payload}.{}",
            B64.encode(mac.finalize().into_bytes())
        )
    }

    /// The claims of a genuine, unexpired token.
    pub fn verify(&self, token: &str, now_s: i64) -> Result<DeviceClaims, ApiError> {
        let invalid = || {
            ApiError::unauthorized(
                codes::INVALID_DEVICE_TOKEN,
                "the device token is invalid or expired",
            )
        };
        let rest = token.strip_prefix(VERSION).ok_or_else(invalid)?;
        let (payload, signature) = rest.split_once('.').ok_or_else(invalid)?;
        let signature = B64.decode(signature).map_err(|_| invalid())?;
        let keys = self.keys();
        let genuine = |mut mac: Hmac<Sha256>| {
            mac.update(VERSION.as_bytes());
            mac.update(payload.as_bytes());
            mac.verify_slice(&signature).is_ok()
        };
        if !genuine(keys.current) && !keys.previous.is_some_and(genuine) {
            return Err(invalid());
        }
        let claims: DeviceClaims = B64
            .decode(payload)
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or_else(invalid)?;
        if claims.expires_at <= now_s {
            return Err(invalid());
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(expires_at: i64) -> DeviceClaims {
        DeviceClaims {
            device_id: "dev".into(),
            tenant_id: "ten".into(),
            expires_at,
        }
    }

    #[test]
    fn issued_tokens_verify_until_they_expire() {
        let key = DeviceTokenKey::new(b"k1");
        let token = key.issue(&claims(100));
        assert_eq!(key.verify(&token, 99).unwrap(), claims(100));
        assert_eq!(
            key.verify(&token, 100).unwrap_err().code(),
            "invalid_device_token"
        );
    }

    #[test]
    fn after_a_rotation_tokens_of_the_previous_key_verify_and_older_ones_do_not() {
        let key = DeviceTokenKey::new(b"k1");
        let first = key.issue(&claims(100));
        key.set(b"k2", Some(b"k1"));
        let second = key.issue(&claims(100));
        assert!(key.verify(&first, 0).is_ok());
        assert!(key.verify(&second, 0).is_ok());
        assert_ne!(first, second);
        key.set(b"k3", Some(b"k2"));
        assert!(key.verify(&first, 0).is_err());
        assert!(key.verify(&second, 0).is_ok());
    }

    #[test]
    fn forged_or_foreign_tokens_are_refused() {
        let key = DeviceTokenKey::new(b"k1");
        let other = DeviceTokenKey::new(b"k2").issue(&claims(100));
        assert!(key.verify(&other, 0).is_err());
        let token = key.issue(&claims(100));
        let (head, sig) = token.rsplit_once('.').unwrap();
        let forged_payload = B64.encode(serde_json::to_vec(&claims(1_000_000)).unwrap());
        assert!(key
            .verify(&format!("v1.{forged_payload}.{sig}"), 0)
            .is_err());
        assert!(key.verify(&format!("{head}.AAAA"), 0).is_err());
        assert!(key.verify("garbage", 0).is_err());
    }
}
