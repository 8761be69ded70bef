//! Device identity: an RSA-4096 key pair generated once on the appliance, and the signatures that
//! prove possession of it (enrollment and authentication requests; never heartbeats).
//!
//! Scheme: RSASSA-PKCS1-v1_5 with SHA-256 over the exact request body bytes, base64 in the
//! [`crate::SIGNATURE_HEADER`] header. Keys travel as PEM (SPKI for public, PKCS#8 for private).

use base64::Engine as _;
use rsa::pkcs1v15::{Signature, SigningKey, VerifyingKey};
use rsa::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding,
};
use rsa::signature::{SignatureEncoding, Signer, Verifier};
use rsa::traits::PublicKeyParts;
use rsa::{RsaPrivateKey, RsaPublicKey};
use sha2::{Digest, Sha256};

/// Size of every device key. The server refuses anything else.
pub const DEVICE_KEY_BITS: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("generating an RSA-{DEVICE_KEY_BITS} key failed")]
    Generate(#[source] rsa::Error),
    #[error("not a PKCS#8 PEM RSA private key")]
    PrivateKeyPem(#[source] rsa::pkcs8::Error),
    #[error("encoding the key as PEM failed")]
    Encode(#[source] rsa::pkcs8::Error),
    #[error("not a PEM SubjectPublicKeyInfo RSA public key")]
    PublicKeyPem(#[source] rsa::pkcs8::spki::Error),
    #[error("the key has {bits} bits; device keys must be RSA-{DEVICE_KEY_BITS}")]
    WrongKeySize { bits: usize },
    #[error("the signature is not valid base64")]
    SignatureEncoding,
    #[error("the signature does not match the body and key")]
    BadSignature,
}

/// The device's private key. Lives in the agent's state directory, mode 0600.
#[derive(Clone)]
pub struct DeviceKey {
    signing: SigningKey<Sha256>,
    private: RsaPrivateKey,
}

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceKey({})", self.public().fingerprint())
    }
}

impl DeviceKey {
    /// Generates a new RSA-4096 key. Takes about a second natively, tens of seconds under emulation.
    pub fn generate() -> Result<DeviceKey, SigningError> {
        let private = RsaPrivateKey::new(&mut rand::rngs::OsRng, DEVICE_KEY_BITS)
            .map_err(SigningError::Generate)?;
        Ok(DeviceKey::from_private(private))
    }

    fn from_private(private: RsaPrivateKey) -> DeviceKey {
        DeviceKey {
            signing: SigningKey::new(private.clone()),
            private,
        }
    }

    pub fn from_pkcs8_pem(pem: &str) -> Result<DeviceKey, SigningError> {
        let private = RsaPrivateKey::from_pkcs8_pem(pem).map_err(SigningError::PrivateKeyPem)?;
        let bits = private.n().bits();
        if bits != DEVICE_KEY_BITS {
            return Err(SigningError::WrongKeySize { bits });
        }
        Ok(DeviceKey::from_private(private))
    }

    pub fn to_pkcs8_pem(&self) -> Result<String, SigningError> {
        self.private
            .to_pkcs8_pem(LineEnding::LF)
            .map(|pem| pem.to_string())
            .map_err(SigningError::Encode)
    }

    pub fn public(&self) -> DevicePublicKey {
        DevicePublicKey {
            key: self.private.to_public_key(),
        }
    }

    /// Base64 signature of `body`, for the signature header.
    pub fn sign(&self, body: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.sign_raw(body))
    }

    /// The raw signature bytes of `body` (bundles carry them in binary).
    pub fn sign_raw(&self, body: &[u8]) -> Vec<u8> {
        let signature: Signature = self.signing.sign(body);
        signature.to_vec()
    }
}

/// A device's public key as the server stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePublicKey {
    key: RsaPublicKey,
}

impl DevicePublicKey {
    /// Parses a PEM public key and insists on RSA-4096.
    pub fn from_pem(pem: &str) -> Result<DevicePublicKey, SigningError> {
        let key =
            RsaPublicKey::from_public_key_pem(pem.trim()).map_err(SigningError::PublicKeyPem)?;
        let bits = key.n().bits();
        if bits != DEVICE_KEY_BITS {
            return Err(SigningError::WrongKeySize { bits });
        }
        Ok(DevicePublicKey { key })
    }

    pub fn to_pem(&self) -> String {
        self.key
            .to_public_key_pem(LineEnding::LF)
            .expect("encoding an in-memory RSA public key cannot fail")
    }

    /// `sha256:<hex>` of the DER SubjectPublicKeyInfo: a stable, short name for the key.
    pub fn fingerprint(&self) -> String {
        let der = self
            .key
            .to_public_key_der()
            .expect("encoding an in-memory RSA public key cannot fail");
        format!(
            "sha256:{}",
            crate::token::hex(&Sha256::digest(der.as_bytes()))
        )
    }

    /// Checks a base64 signature header against `body`.
    pub fn verify(&self, body: &[u8], signature_b64: &str) -> Result<(), SigningError> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(signature_b64.trim())
            .map_err(|_| SigningError::SignatureEncoding)?;
        self.verify_raw(body, &raw)
    }

    /// Checks raw signature bytes against `body`.
    pub fn verify_raw(&self, body: &[u8], raw: &[u8]) -> Result<(), SigningError> {
        let signature = Signature::try_from(raw).map_err(|_| SigningError::BadSignature)?;
        VerifyingKey::<Sha256>::new(self.key.clone())
            .verify(body, &signature)
            .map_err(|_| SigningError::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;

    /// One key for all tests in this module: generation is the slow part.
    fn key() -> &'static DeviceKey {
        static KEY: OnceLock<DeviceKey> = OnceLock::new();
        KEY.get_or_init(|| DeviceKey::generate().unwrap())
    }

    #[test]
    fn sign_and_verify_round_trip_through_pem() {
        let key = DeviceKey::from_pkcs8_pem(&key().to_pkcs8_pem().unwrap()).unwrap();
        let public = DevicePublicKey::from_pem(&key.public().to_pem()).unwrap();
        let sig = key.sign(b"{\"a\":1}");
        public.verify(b"{\"a\":1}", &sig).unwrap();
        assert!(matches!(
            public.verify(b"{\"a\":2}", &sig),
            Err(SigningError::BadSignature)
        ));
        assert!(matches!(
            public.verify(b"{\"a\":1}", "!!"),
            Err(SigningError::SignatureEncoding)
        ));
        assert_eq!(public.fingerprint(), key.public().fingerprint());
        assert!(public.fingerprint().starts_with("sha256:"));
    }

    #[test]
    fn small_keys_are_refused() {
        let small = RsaPrivateKey::new(&mut rand::rngs::OsRng, 1024).unwrap();
        let pem = small
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap();
        let err = DevicePublicKey::from_pem(&pem).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the key has 1024 bits; device keys must be RSA-4096"
        );
        assert!(DevicePublicKey::from_pem("not a key").is_err());
    }
}
