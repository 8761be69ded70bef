//! HTTP to the control plane: blocking `ureq` over rustls, trusting only the CA (or certificate pin)
//! from the bootstrap config when one is given. Every error names the URL; error bodies are decoded
//! into the server's stable `code`.

use kernex_protocol::wire::ErrorBody;
use kernex_protocol::{BootstrapConfig, DeviceKey};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{url}: {message}")]
    Transport { url: String, message: String },
    #[error("{url}: HTTP {status} {code}: {message} (request {request_id})")]
    Status {
        url: String,
        status: u16,
        code: String,
        message: String,
        retry_after: Option<Duration>,
        /// The `x-request-id` this request carried: the server's log lines for it carry the same.
        request_id: String,
    },
    #[error("{url}: unreadable response: {message}")]
    Decode { url: String, message: String },
}

impl ClientError {
    /// The server's error code, if the server answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Status { code, .. } => Some(code),
            _ => None,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

#[derive(Debug)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
    /// Server clock minus ours, in seconds, learned from `Date` headers: an appliance that boots with
    /// a wrong clock still signs requests the server accepts.
    clock_offset_s: Cell<i64>,
}

/// A fresh id for one request (16 hex digits), sent as `x-request-id`.
fn new_request_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl Client {
    pub fn new(config: &BootstrapConfig) -> anyhow::Result<Client> {
        let mut builder = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .timeout(Duration::from_secs(30))
            // A bundle download may be redirected to a presigned object-store URL: follow it
            // (GET keeps its headers, so `Range` and `If-Range` reach the store) but never send
            // the device's bearer token to another host.
            .redirects(3)
            .redirect_auth_headers(ureq::RedirectAuthHeaders::Never)
            .user_agent(&format!("kernex-agent/{}", crate::VERSION));
        if let Some(tls) = tls_config(config)? {
            builder = builder.tls_config(Arc::new(tls));
        }
        Ok(Client {
            agent: builder.build(),
            base: config.server_url.trim_end_matches('/').to_owned(),
            clock_offset_s: Cell::new(0),
        })
    }

    /// Unix seconds on the server's clock, as far as we know it.
    pub fn server_now_s(&self) -> i64 {
        unix_now() + self.clock_offset_s.get()
    }

    /// POSTs `body` signed with the device key (enrollment, authentication).
    pub fn post_signed<Q: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &Q,
        key: &DeviceKey,
    ) -> Result<R, ClientError> {
        let bytes = serde_json::to_vec(body).expect("request bodies serialize");
        let signature = key.sign(&bytes);
        self.post(path, &bytes, |req| {
            req.set(kernex_protocol::SIGNATURE_HEADER, &signature)
        })
    }

    /// POSTs `body` with a device bearer token (heartbeats).
    pub fn post_bearer<Q: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &Q,
        token: &str,
    ) -> Result<R, ClientError> {
        let bytes = serde_json::to_vec(body).expect("request bodies serialize");
        let auth = format!("Bearer {token}");
        self.post(path, &bytes, |req| req.set("authorization", &auth))
    }

    /// GETs `path` (under the API prefix, or absolute on the server when it starts with the
    /// prefix) into `file`, resuming from the file's current length: `Range` from there with
    /// `If-Range: etag`. Returns the ETag of whoever answered last (the server, or the object
    /// store it redirected to). A `200` (no resume, or the file changed) truncates and starts
    /// over. Bytes already written stay written whatever happens, so a dropped connection costs
    /// only what was in flight.
    pub fn download(
        &self,
        path: &str,
        token: &str,
        file: &mut std::fs::File,
        etag: Option<&str>,
    ) -> Result<Option<String>, ClientError> {
        use std::io::{Seek as _, Write as _};
        let url = if path.starts_with(kernex_protocol::API_PREFIX) {
            format!("{}{path}", self.base)
        } else {
            format!("{}{}{path}", self.base, kernex_protocol::API_PREFIX)
        };
        let io = |e: std::io::Error| ClientError::Transport {
            url: url.clone(),
            message: format!("writing the download: {e}"),
        };
        let have = file.metadata().map_err(io)?.len();
        let request_id = new_request_id();
        let mut request = self
            .agent
            .get(&url)
            .timeout(Duration::from_secs(3600))
            .set("authorization", &format!("Bearer {token}"))
            .set(kernex_protocol::REQUEST_ID_HEADER, &request_id);
        if have > 0 {
            request = request.set("range", &format!("bytes={have}-"));
            if let Some(etag) = etag {
                request = request.set("if-range", etag);
            }
        }
        let response = match request.call() {
            Ok(response) => response,
            Err(ureq::Error::Status(416, _)) if have > 0 => {
                // Already complete (or longer than the object): let the caller's checks decide.
                return Ok(etag.map(str::to_owned));
            }
            Err(e) => return Err(self.error(url.clone(), request_id, e)),
        };
        let etag = response.header("etag").map(str::to_owned);
        if response.status() == 200 {
            file.set_len(0).map_err(io)?;
        }
        file.seek(std::io::SeekFrom::End(0)).map_err(io)?;
        let mut reader = response.into_reader();
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = match std::io::Read::read(&mut reader, &mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = file.flush();
                    return Err(ClientError::Transport {
                        url,
                        message: format!("download interrupted: {e}"),
                    });
                }
            };
            file.write_all(&buffer[..n]).map_err(io)?;
        }
        file.sync_all().map_err(io)?;
        Ok(etag)
    }

    fn error(&self, url: String, request_id: String, e: ureq::Error) -> ClientError {
        match e {
            ureq::Error::Status(status, response) => {
                let retry_after = response
                    .header("retry-after")
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let text = response.into_string().unwrap_or_default();
                let (code, message) = match serde_json::from_str::<ErrorBody>(&text) {
                    Ok(body) => (body.error.code, body.error.message),
                    Err(_) => ("http_error".to_owned(), text.chars().take(200).collect()),
                };
                ClientError::Status {
                    url,
                    status,
                    code,
                    message,
                    retry_after,
                    request_id,
                }
            }
            ureq::Error::Transport(t) => ClientError::Transport {
                url,
                message: format!("{t} (request {request_id})"),
            },
        }
    }

    fn post<R: DeserializeOwned>(
        &self,
        path: &str,
        bytes: &[u8],
        decorate: impl FnOnce(ureq::Request) -> ureq::Request,
    ) -> Result<R, ClientError> {
        let url = format!("{}{}{path}", self.base, kernex_protocol::API_PREFIX);
        let request_id = new_request_id();
        let request = decorate(
            self.agent
                .post(&url)
                .set("content-type", "application/json")
                .set(kernex_protocol::REQUEST_ID_HEADER, &request_id),
        );
        match request.send_bytes(bytes) {
            Ok(response) => {
                self.learn_clock(&response);
                let text = response.into_string().map_err(|e| ClientError::Decode {
                    url: url.clone(),
                    message: e.to_string(),
                })?;
                serde_json::from_str(&text).map_err(|e| ClientError::Decode {
                    url,
                    message: e.to_string(),
                })
            }
            Err(ureq::Error::Status(status, response)) => {
                self.learn_clock(&response);
                Err(self.error(url, request_id, ureq::Error::Status(status, response)))
            }
            Err(e) => Err(self.error(url, request_id, e)),
        }
    }

    fn learn_clock(&self, response: &ureq::Response) {
        let Some(server) = response
            .header("date")
            .and_then(|d| httpdate::parse_http_date(d).ok())
        else {
            return;
        };
        let server_s = server
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let offset = server_s - unix_now();
        // Date has one-second resolution: ignore differences that are only rounding.
        self.clock_offset_s
            .set(if offset.abs() > 2 { offset } else { 0 });
    }
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The TLS settings the bootstrap config asks for; `None` means the built-in web PKI roots.
fn tls_config(config: &BootstrapConfig) -> anyhow::Result<Option<rustls::ClientConfig>> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    if let Some(pem) = &config.ca_cert {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert
                .map_err(|e| anyhow::anyhow!("bootstrap ca_cert: not a PEM certificate: {e:?}"))?;
            roots
                .add(cert)
                .map_err(|e| anyhow::anyhow!("bootstrap ca_cert: unusable certificate: {e}"))?;
        }
        if roots.is_empty() {
            anyhow::bail!("bootstrap ca_cert: no certificate found");
        }
        return Ok(Some(
            builder.with_root_certificates(roots).with_no_client_auth(),
        ));
    }
    if let Some(pin) = &config.ca_sha256 {
        let verifier = PinnedCertificate {
            sha256_hex: pin.to_ascii_lowercase(),
            provider: provider(),
        };
        return Ok(Some(
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth(),
        ));
    }
    Ok(None)
}

/// Trusts exactly one server certificate, by the SHA-256 of its DER (the bootstrap `ca_sha256`).
/// Handshake signatures are still verified, so only the holder of that certificate's key passes.
#[derive(Debug)]
struct PinnedCertificate {
    sha256_hex: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen = kernex_protocol::token::hex(&Sha256::digest(end_entity.as_ref()));
        if seen == self.sha256_hex {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "server certificate sha256 {seen} does not match the pinned ca_sha256"
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
