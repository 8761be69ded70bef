//! What crosses the wire between `kernex-agent` and `kernex-server`.
//!
//! This crate is the only place that defines request and response bodies, how device requests are
//! signed, what a bootstrap or API token looks like, and the `/etc/kernex/bootstrap.toml` format.
//! It has no I/O of its own beyond reading a bootstrap file, so both the static agent and the server
//! can depend on it without pulling in a runtime.

pub mod bootstrap;
pub mod bundle;
pub mod signing;
pub mod token;
pub mod vmlink;
pub mod wire;

pub use bootstrap::{BootstrapConfig, BootstrapError, VmConfig};
pub use signing::{DeviceKey, DevicePublicKey, SigningError, DEVICE_KEY_BITS};
pub use token::{SecretToken, TokenKind, TokenParseError};

/// Prefix of every versioned route; a breaking change gets a new prefix, never a changed meaning.
pub const API_PREFIX: &str = "/api/v1";

/// Header that carries the base64 RSA-PKCS#1-v1.5-SHA-256 signature of a device request's body.
pub const SIGNATURE_HEADER: &str = "kernex-signature";

/// Header carrying a request id from the agent to the server's logs.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// How far a signed request's timestamp may be from the server's clock, in seconds.
pub const MAX_CLOCK_SKEW_S: i64 = 300;

/// At most `max` bytes of `s`, cut at a character boundary: command output and other free text
/// are bounded the same way on both sides of the wire.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(super::truncate_utf8("héllo", 2), "h");
        assert_eq!(super::truncate_utf8("héllo", 3), "hé");
        assert_eq!(super::truncate_utf8("abc", 10), "abc");
    }
}
