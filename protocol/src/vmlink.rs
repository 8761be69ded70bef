//! The link between an appliance's agent and the `kernex-agent vm-endpoint` inside each user VM.
//!
//! Blocking I/O over any byte stream (TCP or vsock). Frames are a 4-byte big-endian length and a
//! JSON body; after the handshake every frame also carries an HMAC-SHA256 tag over its direction,
//! sequence number and body, keyed by a session key both sides derive from the shared secret and
//! the two nonces: a frame that was altered, replayed, reordered or sent the other way is refused.
//!
//! Handshake (mutual, nothing is answered before the appliance proved the secret):
//! ```text
//! appliance → endpoint   Hello     { version, nonce_a }
//! endpoint  → appliance  Challenge { version, nonce_e }          (random only: reveals nothing)
//! appliance → endpoint   Auth      { mac_a = HMAC(secret, "appliance" ‖ nonce_a ‖ nonce_e) }
//! endpoint  → appliance  Welcome   { mac_e = HMAC(secret, "endpoint" ‖ nonce_a ‖ nonce_e) }
//!                        or Refused { code: "auth_failed" } and the connection closes
//! ```
//! Then the appliance sends [`Request`]s and the endpoint answers each with a [`Response`].

use hmac::{Hmac, Mac as _};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sha2::Sha256;
use std::io::{Read, Write};

/// The version of this protocol; a Hello with another is refused.
pub const VERSION: u32 = 1;
/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 1024 * 1024;
/// Most bytes of output a `call` returns; more is the `output_too_large` error.
pub const MAX_CALL_OUTPUT: usize = 256 * 1024;
const NONCE_BYTES: usize = 32;
const TAG_BYTES: usize = 32;

/// Stable error codes, on the link and in `vm.call` results.
pub mod codes {
    pub const UNKNOWN_VM: &str = "vm_unknown";
    pub const VM_DOWN: &str = "vm_down";
    pub const AUTH_FAILED: &str = "vm_auth_failed";
    pub const TIMEOUT: &str = "vm_timeout";
    pub const OUTPUT_TOO_LARGE: &str = "vm_output_too_large";
    pub const ACTION_NOT_ALLOWED: &str = "vm_action_not_allowed";
    pub const CALL_FAILED: &str = "vm_call_failed";
    pub const PROTOCOL: &str = "vm_protocol_error";
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
enum Handshake {
    Hello { version: u32, nonce: String },
    Challenge { version: u32, nonce: String },
    Auth { mac: String },
    Welcome { mac: String },
    Refused { code: String, message: String },
}

/// What the appliance asks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Request {
    pub id: u64,
    #[serde(flatten)]
    pub method: Method,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "method", content = "params", rename_all = "snake_case")]
pub enum Method {
    /// Liveness; the round trip is the link's RTT.
    Health,
    Info,
    Call(CallParams),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CallParams {
    /// An action the endpoint allows (`vm-endpoint --action NAME=COMMAND`, or a built-in).
    pub action: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// The endpoint stops the action after this long.
    pub timeout_ms: u64,
    /// Stdout and stderr together past this are the `vm_output_too_large` error.
    #[serde(default = "default_max_output")]
    pub max_output_bytes: u64,
}

fn default_max_output() -> u64 {
    MAX_CALL_OUTPUT as u64
}

/// The endpoint's answer to the request with the same id.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Response {
    pub id: u64,
    #[serde(flatten)]
    pub result: Outcome,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Health { uptime_s: u64 },
    Info(VmInfo),
    Call(CallResult),
    Error(LinkFault),
}

/// About the user VM, from its own `/proc` and `/etc/os-release`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default)]
pub struct VmInfo {
    pub hostname: String,
    pub os: String,
    pub kernel: String,
    pub uptime_s: u64,
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
    pub endpoint_version: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CallResult {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    pub duration_ms: u64,
}

/// An error with a stable code and a message for people.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct LinkFault {
    pub code: String,
    pub message: String,
}

impl LinkFault {
    pub fn new(code: &str, message: impl Into<String>) -> LinkFault {
        LinkFault {
            code: code.to_owned(),
            message: message.into(),
        }
    }
}

/// How a user VM is doing, as the appliance reports it in heartbeats (`vms` of a device).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default)]
pub struct VmStatus {
    pub name: String,
    pub address: String,
    pub connected: bool,
    /// `connected`, `connecting`, `down` or `auth-failed`.
    pub state: String,
    /// Unix seconds of the last answer from the VM.
    pub last_seen: Option<i64>,
    /// Round trip of the last health request, in milliseconds.
    pub rtt_ms: Option<f64>,
    pub info: Option<VmInfo>,
    /// Why the link is not up.
    pub error: Option<String>,
}

/// Why a link failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("authentication failed: {0}")]
    AuthFailed(String),
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl LinkError {
    /// The stable code for a `vm.call` result.
    pub fn code(&self) -> &'static str {
        match self {
            LinkError::Io(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                ) =>
            {
                codes::TIMEOUT
            }
            LinkError::Io(_) => codes::VM_DOWN,
            LinkError::AuthFailed(_) => codes::AUTH_FAILED,
            LinkError::Protocol(_) => codes::PROTOCOL,
        }
    }
}

/// An authenticated link: frames in both directions carry tags under the session key.
#[derive(Debug)]
pub struct Session<S> {
    stream: S,
    key: [u8; 32],
    /// `b'a'` on the appliance's side, `b'e'` on the endpoint's: the direction of frames we send.
    me: u8,
    sent: u64,
    received: u64,
}

impl<S: Write> Session<S> {
    pub fn send<T: Serialize>(&mut self, message: &T) -> Result<(), LinkError> {
        let body = serde_json::to_vec(message).map_err(|e| LinkError::Protocol(e.to_string()))?;
        let tag = self.tag(self.me, self.sent, &body);
        self.sent += 1;
        let mut frame = body;
        frame.extend_from_slice(&tag);
        write_frame(&mut self.stream, &frame)
    }
}

impl<S: Read> Session<S> {
    pub fn receive<T: DeserializeOwned>(&mut self) -> Result<T, LinkError> {
        let frame = read_frame(&mut self.stream)?;
        if frame.len() < TAG_BYTES {
            return Err(LinkError::Protocol("frame without a tag".into()));
        }
        let (body, tag) = frame.split_at(frame.len() - TAG_BYTES);
        let other = if self.me == b'a' { b'e' } else { b'a' };
        let expected = self.tag(other, self.received, body);
        if !constant_time_eq(&expected, tag) {
            return Err(LinkError::Protocol(
                "a frame's tag does not match: altered, replayed or out of order".into(),
            ));
        }
        self.received += 1;
        serde_json::from_slice(body).map_err(|e| LinkError::Protocol(e.to_string()))
    }
}

impl<S> Session<S> {
    pub fn stream(&self) -> &S {
        &self.stream
    }

    fn tag(&self, direction: u8, seq: u64, body: &[u8]) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("any key length");
        mac.update(&[direction]);
        mac.update(&seq.to_be_bytes());
        mac.update(body);
        mac.finalize().into_bytes().into()
    }
}

/// The appliance's side of the handshake.
pub fn connect<S: Read + Write>(mut stream: S, secret: &[u8]) -> Result<Session<S>, LinkError> {
    let nonce_a = nonce();
    send_plain(
        &mut stream,
        &Handshake::Hello {
            version: VERSION,
            nonce: crate::token::hex(&nonce_a),
        },
    )?;
    let nonce_e = match receive_plain(&mut stream)? {
        Handshake::Challenge { version, nonce } if version == VERSION => unhex_nonce(&nonce)?,
        Handshake::Challenge { version, .. } => {
            return Err(LinkError::Protocol(format!(
                "the endpoint speaks link version {version}, this agent {VERSION}"
            )))
        }
        other => return Err(unexpected(&other)),
    };
    let mac_a = proof(secret, b"appliance", &nonce_a, &nonce_e);
    send_plain(
        &mut stream,
        &Handshake::Auth {
            mac: crate::token::hex(&mac_a),
        },
    )?;
    match receive_plain(&mut stream) {
        Ok(Handshake::Welcome { mac }) => {
            let expected = proof(secret, b"endpoint", &nonce_a, &nonce_e);
            if !constant_time_eq(crate::token::hex(&expected).as_bytes(), mac.as_bytes()) {
                return Err(LinkError::AuthFailed(
                    "the endpoint does not know the secret".into(),
                ));
            }
        }
        Ok(Handshake::Refused { message, .. }) => return Err(LinkError::AuthFailed(message)),
        Ok(other) => return Err(unexpected(&other)),
        Err(LinkError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(LinkError::AuthFailed(
                "the endpoint closed the link after our proof".into(),
            ))
        }
        Err(e) => return Err(e),
    }
    Ok(Session {
        stream,
        key: session_key(secret, &nonce_a, &nonce_e),
        me: b'a',
        sent: 0,
        received: 0,
    })
}

/// The endpoint's side of the handshake. On a wrong proof it says so and fails; the caller closes.
pub fn accept<S: Read + Write>(mut stream: S, secret: &[u8]) -> Result<Session<S>, LinkError> {
    let nonce_a = match receive_plain(&mut stream)? {
        Handshake::Hello { version, nonce } if version == VERSION => unhex_nonce(&nonce)?,
        Handshake::Hello { version, .. } => {
            return Err(LinkError::Protocol(format!(
                "the appliance speaks link version {version}, this endpoint {VERSION}"
            )))
        }
        other => return Err(unexpected(&other)),
    };
    let nonce_e = nonce();
    send_plain(
        &mut stream,
        &Handshake::Challenge {
            version: VERSION,
            nonce: crate::token::hex(&nonce_e),
        },
    )?;
    let mac = match receive_plain(&mut stream)? {
        Handshake::Auth { mac } => mac,
        other => return Err(unexpected(&other)),
    };
    let expected = proof(secret, b"appliance", &nonce_a, &nonce_e);
    if !constant_time_eq(crate::token::hex(&expected).as_bytes(), mac.as_bytes()) {
        let _ = send_plain(
            &mut stream,
            &Handshake::Refused {
                code: codes::AUTH_FAILED.into(),
                message: "the endpoint refused the appliance's proof: the secrets differ".into(),
            },
        );
        return Err(LinkError::AuthFailed(
            "the appliance does not know the secret".into(),
        ));
    }
    let mac_e = proof(secret, b"endpoint", &nonce_a, &nonce_e);
    send_plain(
        &mut stream,
        &Handshake::Welcome {
            mac: crate::token::hex(&mac_e),
        },
    )?;
    Ok(Session {
        stream,
        key: session_key(secret, &nonce_a, &nonce_e),
        me: b'e',
        sent: 0,
        received: 0,
    })
}

fn unexpected(message: &Handshake) -> LinkError {
    match message {
        Handshake::Refused { message, .. } => LinkError::AuthFailed(message.clone()),
        other => LinkError::Protocol(format!("unexpected handshake message {other:?}")),
    }
}

fn proof(secret: &[u8], role: &[u8], nonce_a: &[u8], nonce_e: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(b"kernex-vm-link/1 ");
    mac.update(role);
    mac.update(nonce_a);
    mac.update(nonce_e);
    mac.finalize().into_bytes().into()
}

fn session_key(secret: &[u8], nonce_a: &[u8], nonce_e: &[u8]) -> [u8; 32] {
    proof(secret, b"session", nonce_a, nonce_e)
}

fn nonce() -> [u8; NONCE_BYTES] {
    let mut nonce = [0u8; NONCE_BYTES];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
    nonce
}

fn unhex_nonce(text: &str) -> Result<Vec<u8>, LinkError> {
    let bytes = crate::token::unhex(text)
        .ok_or_else(|| LinkError::Protocol("a nonce is not hex".into()))?;
    if bytes.len() != NONCE_BYTES {
        return Err(LinkError::Protocol(format!(
            "a nonce has {} bytes, not {NONCE_BYTES}",
            bytes.len()
        )));
    }
    Ok(bytes)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn send_plain<W: Write>(stream: &mut W, message: &Handshake) -> Result<(), LinkError> {
    let body = serde_json::to_vec(message).map_err(|e| LinkError::Protocol(e.to_string()))?;
    write_frame(stream, &body)
}

fn receive_plain<R: Read>(stream: &mut R) -> Result<Handshake, LinkError> {
    let body = read_frame(stream)?;
    serde_json::from_slice(&body).map_err(|e| LinkError::Protocol(e.to_string()))
}

fn write_frame<W: Write>(stream: &mut W, body: &[u8]) -> Result<(), LinkError> {
    if body.len() > MAX_FRAME {
        return Err(LinkError::Protocol(format!(
            "a frame of {} bytes is over the limit of {MAX_FRAME}",
            body.len()
        )));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(body);
    stream.write_all(&frame)?;
    stream.flush()?;
    Ok(())
}

fn read_frame<R: Read>(stream: &mut R) -> Result<Vec<u8>, LinkError> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(LinkError::Protocol(format!(
            "a frame of {len} bytes is over the limit of {MAX_FRAME}"
        )));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn pair(
        secret_a: &'static [u8],
        secret_e: &'static [u8],
    ) -> (
        Result<Session<UnixStream>, LinkError>,
        Result<Session<UnixStream>, LinkError>,
    ) {
        let (a, e) = UnixStream::pair().unwrap();
        let endpoint = std::thread::spawn(move || accept(e, secret_e));
        let appliance = connect(a, secret_a);
        (appliance, endpoint.join().unwrap())
    }

    #[test]
    fn both_sides_prove_the_secret_then_exchange_tagged_frames() {
        let (appliance, endpoint) = pair(b"0123456789abcdef", b"0123456789abcdef");
        let (mut appliance, mut endpoint) = (appliance.unwrap(), endpoint.unwrap());
        let request = Request {
            id: 7,
            method: Method::Call(CallParams {
                action: "hostname".into(),
                args: vec![],
                timeout_ms: 1000,
                max_output_bytes: 100,
            }),
        };
        appliance.send(&request).unwrap();
        assert_eq!(endpoint.receive::<Request>().unwrap(), request);
        let response = Response {
            id: 7,
            result: Outcome::Health { uptime_s: 3 },
        };
        endpoint.send(&response).unwrap();
        assert_eq!(appliance.receive::<Response>().unwrap(), response);
    }

    #[test]
    fn a_wrong_secret_fails_on_both_sides_with_the_reason() {
        let (appliance, endpoint) = pair(b"0123456789abcdef", b"fedcba9876543210");
        let err = appliance.unwrap_err();
        assert_eq!(err.code(), codes::AUTH_FAILED, "{err}");
        assert!(err.to_string().contains("secrets differ"), "{err}");
        assert!(matches!(endpoint.unwrap_err(), LinkError::AuthFailed(_)));
    }

    #[test]
    fn replayed_or_altered_frames_are_refused() {
        let (a, e) = UnixStream::pair().unwrap();
        let endpoint = std::thread::spawn(move || accept(e, b"0123456789abcdef").unwrap());
        let mut appliance = connect(a, b"0123456789abcdef").unwrap();
        let mut endpoint = endpoint.join().unwrap();
        // A frame sent by the endpoint, captured, then fed back to the endpoint: wrong direction.
        let mut raw = Vec::new();
        {
            let mut capture = Session {
                stream: &mut raw,
                key: endpoint.key,
                me: b'e',
                sent: 0,
                received: 0,
            };
            capture
                .send(&Response {
                    id: 1,
                    result: Outcome::Health { uptime_s: 1 },
                })
                .unwrap();
        }
        appliance.stream.write_all(&raw).unwrap();
        let err = endpoint.receive::<Request>().unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        // A frame with one body byte changed.
        let mut raw = Vec::new();
        {
            let mut capture = Session {
                stream: &mut raw,
                key: appliance.key,
                me: b'a',
                sent: appliance.sent,
                received: 0,
            };
            capture
                .send(&Request {
                    id: 2,
                    method: Method::Health,
                })
                .unwrap();
        }
        raw[8] ^= 1;
        appliance.stream.write_all(&raw).unwrap();
        assert!(endpoint.receive::<Request>().is_err());
    }

    #[test]
    fn oversized_frames_are_refused_before_reading_them() {
        let mut input: &[u8] = &((MAX_FRAME as u32) + 1).to_be_bytes();
        let err = read_frame(&mut input).unwrap_err();
        assert!(err.to_string().contains("over the limit"), "{err}");
    }
}
