//! Secret tokens handed to people and machines: bootstrap tokens (baked into ISOs) and API keys.
//!
//! Form: `<prefix>_<id>_<secret>`, e.g. `kxb_1f2e3d4c5b6a7980_<64 hex>`. The id is public and is how
//! logs, build records and the server refer to a token; the secret is 256 random bits, of which the
//! server keeps only the SHA-256. Both parts are lowercase hex so the token survives YAML, TOML, kernel
//! command lines and double-click selection unchanged.

use rand::RngCore;
use sha2::{Digest, Sha256};
use std::fmt;

const ID_HEX_LEN: usize = 16;
const SECRET_HEX_LEN: usize = 64;

/// What a token is for; the prefix makes a pasted token recognisable at a glance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// Enrolls devices into a tenant (`kxb_`).
    Bootstrap,
    /// Authenticates an operator or script against the REST API (`kxk_`).
    ApiKey,
}

impl TokenKind {
    fn prefix(self) -> &'static str {
        match self {
            TokenKind::Bootstrap => "kxb",
            TokenKind::ApiKey => "kxk",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            TokenKind::Bootstrap => "bootstrap token",
            TokenKind::ApiKey => "API key",
        }
    }
}

/// Why a string is not a token of the expected kind. Never contains the offending string: it may be a
/// secret pasted into the wrong place.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenParseError {
    #[error("not a {expected}: expected `{prefix}_<16 hex id>_<64 hex secret>`")]
    Malformed {
        expected: &'static str,
        prefix: &'static str,
    },
}

/// A parsed token. `Debug` and `Display` show only the public id.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretToken {
    kind: TokenKind,
    id: String,
    secret: String,
}

impl SecretToken {
    /// A fresh random token of the given kind.
    pub fn generate(kind: TokenKind) -> SecretToken {
        let mut id = [0u8; ID_HEX_LEN / 2];
        let mut secret = [0u8; SECRET_HEX_LEN / 2];
        rand::rngs::OsRng.fill_bytes(&mut id);
        rand::rngs::OsRng.fill_bytes(&mut secret);
        SecretToken {
            kind,
            id: hex(&id),
            secret: hex(&secret),
        }
    }

    /// Parses `s` as a token of `kind`, ignoring surrounding whitespace (token files end in newlines).
    pub fn parse(kind: TokenKind, s: &str) -> Result<SecretToken, TokenParseError> {
        let malformed = TokenParseError::Malformed {
            expected: kind.describe(),
            prefix: kind.prefix(),
        };
        let mut parts = s.trim().split('_');
        let (Some(prefix), Some(id), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed);
        };
        let is_hex = |p: &str, len: usize| {
            p.len() == len
                && p.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if prefix != kind.prefix() || !is_hex(id, ID_HEX_LEN) || !is_hex(secret, SECRET_HEX_LEN) {
            return Err(malformed);
        }
        Ok(SecretToken {
            kind,
            id: id.to_owned(),
            secret: secret.to_owned(),
        })
    }

    pub fn kind(&self) -> TokenKind {
        self.kind
    }

    /// The public id: safe to log, print and store.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// SHA-256 of the secret part: what the server stores and compares.
    pub fn secret_hash(&self) -> [u8; 32] {
        Sha256::digest(self.secret.as_bytes()).into()
    }

    /// The whole token, for handing out exactly once.
    pub fn expose(&self) -> String {
        format!("{}_{}_{}", self.kind.prefix(), self.id, self.secret)
    }
}

impl fmt::Debug for SecretToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretToken({}_{}_…)", self.kind.prefix(), self.id)
    }
}

impl fmt::Display for SecretToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind.describe(), self.id)
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 0xf) as usize] as char);
    }
    out
}

/// Lowercase or uppercase hex to bytes; `None` for anything else.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_round_trip() {
        let t = SecretToken::generate(TokenKind::Bootstrap);
        let parsed = SecretToken::parse(TokenKind::Bootstrap, &format!("  {}\n", t.expose()));
        assert_eq!(parsed, Ok(t.clone()));
        assert!(t.expose().starts_with("kxb_"));
        assert_eq!(t.expose().len(), 3 + 1 + 16 + 1 + 64);
    }

    #[test]
    fn debug_and_display_never_show_the_secret() {
        let t = SecretToken::generate(TokenKind::ApiKey);
        let secret = t.expose().rsplit('_').next().unwrap().to_owned();
        assert!(!format!("{t:?}").contains(&secret));
        assert!(!format!("{t}").contains(&secret));
        assert_eq!(format!("{t}"), format!("API key {}", t.id()));
    }

    #[test]
    fn wrong_kind_and_malformed_are_refused() {
        let api = SecretToken::generate(TokenKind::ApiKey).expose();
        let err = SecretToken::parse(TokenKind::Bootstrap, &api).unwrap_err();
        assert_eq!(
            err.to_string(),
            "not a bootstrap token: expected `kxb_<16 hex id>_<64 hex secret>`"
        );
        for bad in [
            "",
            "kxb",
            "kxb__",
            "kxb_0123456789abcdef_xyz",
            "kxb_0123456789ABCDEF_",
        ] {
            assert!(
                SecretToken::parse(TokenKind::Bootstrap, bad).is_err(),
                "{bad:?}"
            );
        }
        let good = SecretToken::generate(TokenKind::Bootstrap).expose();
        assert!(SecretToken::parse(TokenKind::Bootstrap, &format!("{good}_extra")).is_err());
    }

    #[test]
    fn secret_hash_depends_only_on_the_secret() {
        let t = SecretToken::generate(TokenKind::Bootstrap);
        let again = SecretToken::parse(TokenKind::Bootstrap, &t.expose()).unwrap();
        assert_eq!(t.secret_hash(), again.secret_hash());
        assert_ne!(
            t.secret_hash(),
            SecretToken::generate(TokenKind::Bootstrap).secret_hash()
        );
    }
}
