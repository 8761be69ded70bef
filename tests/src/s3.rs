//! The S3 side of the harness: a test's own prefix in the bucket `scripts/garage.sh` prepares, a
//! SigV4-signed listing to see what the server left there, and [`S3Tap`], a proxy in front of the
//! endpoint that records what devices send after a redirect and can cut a download short.

use hmac::{Hmac, Mac as _};
use sha2::{Digest as _, Sha256};
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// A prefix of its own in the test bucket, and the key to reach it.
#[derive(Debug, Clone)]
pub struct S3Bucket {
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    /// `test-<random>/`: tests sharing the bucket never see each other's objects.
    pub prefix: String,
    pub key_id: String,
    secret: String,
}

impl S3Bucket {
    /// The bucket named by `KERNEX_TEST_S3` (the endpoint), `KERNEX_TEST_S3_BUCKET`,
    /// `KERNEX_TEST_S3_REGION`, `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (as printed by
    /// `scripts/garage.sh`) under a fresh prefix; `None` when `KERNEX_TEST_S3` is not set.
    pub fn from_env() -> Option<S3Bucket> {
        let endpoint = std::env::var("KERNEX_TEST_S3").ok()?;
        let var = |name: &str| {
            std::env::var(name)
                .unwrap_or_else(|_| panic!("KERNEX_TEST_S3 is set but {name} is not"))
        };
        Some(S3Bucket {
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            bucket: var("KERNEX_TEST_S3_BUCKET"),
            region: var("KERNEX_TEST_S3_REGION"),
            prefix: format!("test-{:016x}/", rand::random::<u64>()),
            key_id: var("AWS_ACCESS_KEY_ID"),
            secret: var("AWS_SECRET_ACCESS_KEY"),
        })
    }

    /// The same bucket and prefix reached through another endpoint (an [`S3Tap`]).
    pub fn via(&self, endpoint: &str) -> S3Bucket {
        S3Bucket {
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            ..self.clone()
        }
    }

    /// `kernex-server serve` options for this bucket.
    pub fn serve_args(&self) -> Vec<String> {
        [
            "--bundle-store",
            "s3",
            "--s3-endpoint",
            &self.endpoint,
            "--s3-bucket",
            &self.bucket,
            "--s3-region",
            &self.region,
            "--s3-prefix",
            &self.prefix,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// The environment the server reads the key from.
    pub fn env(&self) -> [(&'static str, &str); 2] {
        [
            ("AWS_ACCESS_KEY_ID", &self.key_id),
            ("AWS_SECRET_ACCESS_KEY", &self.secret),
        ]
    }

    /// Keys of the objects under the prefix.
    pub fn objects(&self) -> Vec<String> {
        let listing = self.signed("GET", "", &[("list-type", "2"), ("prefix", &self.prefix)]);
        tag_values(&listing.unwrap_or_else(|e| panic!("{e}")), "Key")
    }

    /// Keys of the multipart uploads begun and neither completed nor aborted under the prefix.
    pub fn multipart_uploads(&self) -> Vec<String> {
        let listing = self.signed("GET", "", &[("uploads", ""), ("prefix", &self.prefix)]);
        tag_values(&listing.unwrap_or_else(|e| panic!("{e}")), "Key")
    }

    /// Deletes the objects under the prefix, as far as it can (called when a test's server drops).
    pub fn clear(&self) {
        let Ok(listing) = self.signed("GET", "", &[("list-type", "2"), ("prefix", &self.prefix)])
        else {
            return;
        };
        for key in tag_values(&listing, "Key") {
            let _ = self.signed("DELETE", &key, &[]);
        }
    }

    /// A request on the bucket (`key` empty) or on an object, signed with AWS Signature Version 4
    /// (header form); the response body, or an error naming the request and the store's answer.
    fn signed(&self, method: &str, key: &str, query: &[(&str, &str)]) -> Result<String, String> {
        let now = time::OffsetDateTime::now_utc();
        let date = format!("{:04}{:02}{:02}", now.year(), now.month() as u8, now.day());
        let stamp = format!(
            "{date}T{:02}{:02}{:02}Z",
            now.hour(),
            now.minute(),
            now.second()
        );
        let host = self
            .endpoint
            .split_once("://")
            .map_or(self.endpoint.as_str(), |(_, rest)| rest);
        let mut pairs: Vec<(String, String)> = query
            .iter()
            .map(|(k, v)| (uri_encode(k), uri_encode(v)))
            .collect();
        pairs.sort();
        let query = pairs
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&");
        let payload = sha256_hex(b"");
        let signed_headers = "host;x-amz-content-sha256;x-amz-date";
        let path = match key {
            "" => format!("/{}", self.bucket),
            key => format!(
                "/{}/{}",
                self.bucket,
                key.split('/').map(uri_encode).collect::<Vec<_>>().join("/")
            ),
        };
        let canonical = format!(
            "{method}\n{path}\n{query}\nhost:{host}\nx-amz-content-sha256:{payload}\nx-amz-date:{stamp}\n\n{signed_headers}\n{payload}"
        );
        let scope = format!("{date}/{}/s3/aws4_request", self.region);
        let to_sign = format!(
            "AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{}",
            sha256_hex(canonical.as_bytes())
        );
        let mut key = hmac(format!("AWS4{}", self.secret).as_bytes(), date.as_bytes());
        for part in [self.region.as_str(), "s3", "aws4_request"] {
            key = hmac(&key, part.as_bytes());
        }
        let signature = kernex_protocol::token::hex(&hmac(&key, to_sign.as_bytes()));
        let url = format!("{}{path}?{query}", self.endpoint);
        let response = ureq::request(method, &url)
            .set("x-amz-date", &stamp)
            .set("x-amz-content-sha256", &payload)
            .set(
                "authorization",
                &format!(
                    "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
                    self.key_id
                ),
            )
            .call();
        match response {
            Ok(response) => response
                .into_string()
                .map_err(|e| format!("{method} {url}: {e}")),
            Err(ureq::Error::Status(status, response)) => Err(format!(
                "{method} {url}: HTTP {status}: {}",
                response.into_string().unwrap_or_default()
            )),
            Err(e) => Err(format!("{method} {url}: {e}")),
        }
    }
}

fn sha256_hex(data: &[u8]) -> String {
    kernex_protocol::token::hex(&Sha256::digest(data))
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// Percent-encoding as SigV4 wants it: everything but `A-Za-z0-9-_.~`.
fn uri_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The text of every `<tag>` element in `xml` (enough for S3's listings).
fn tag_values(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut values = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find(&open) {
        rest = &rest[start + open.len()..];
        let end = rest.find(&close).expect("closed element");
        values.push(rest[..end].to_owned());
        rest = &rest[end..];
    }
    values
}

/// One presigned GET that went through an [`S3Tap`] (a device following a redirect).
#[derive(Debug, Clone)]
pub struct TappedRequest {
    /// Method and target, e.g. `GET /bucket/key?X-Amz-...`.
    pub request_line: String,
    pub headers: Vec<(String, String)>,
    /// What the store answered.
    pub status: u16,
    pub response_headers: Vec<(String, String)>,
    /// Whether the tap cut this response short.
    pub cut: bool,
}

impl TappedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    pub fn response_header(&self, name: &str) -> Option<&str> {
        find_header(&self.response_headers, name)
    }
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A TCP proxy in front of an S3 endpoint. Connections pass through untouched, except those
/// whose first request is a presigned GET (`X-Amz-Signature` in the query: a device following a
/// redirect): those are recorded, answered on a connection of their own, and the first one's
/// response is cut after `cut_first_after` bytes, as a dropped link would.
#[derive(Debug)]
pub struct S3Tap {
    pub url: String,
    seen: Arc<Mutex<Vec<TappedRequest>>>,
}

impl S3Tap {
    pub fn start(upstream: &str, cut_first_after: u64) -> S3Tap {
        let upstream = upstream
            .split_once("://")
            .map_or(upstream, |(_, rest)| rest)
            .trim_end_matches('/')
            .to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let cut_pending = Arc::new(AtomicBool::new(true));
        {
            let seen = seen.clone();
            std::thread::spawn(move || {
                for client in listener.incoming().flatten() {
                    let (upstream, seen, cut_pending) =
                        (upstream.clone(), seen.clone(), cut_pending.clone());
                    std::thread::spawn(move || {
                        let _ = relay(client, &upstream, &seen, &cut_pending, cut_first_after);
                    });
                }
            });
        }
        S3Tap { url, seen }
    }

    /// The presigned GETs so far, in order.
    pub fn presigned(&self) -> Vec<TappedRequest> {
        self.seen.lock().unwrap().clone()
    }
}

fn relay(
    client: TcpStream,
    upstream: &str,
    seen: &Mutex<Vec<TappedRequest>>,
    cut_pending: &AtomicBool,
    cut_after: u64,
) -> std::io::Result<()> {
    let mut server = TcpStream::connect(upstream)?;
    let mut from_client = BufReader::new(client.try_clone()?);
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        if from_client.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let end = line == "\r\n";
        head.push(line);
        if end {
            break;
        }
    }
    let request_line = head[0].trim_end().to_owned();
    if !(request_line.starts_with("GET ") && request_line.contains("X-Amz-Signature=")) {
        // The server's own traffic: pass everything through, both ways.
        server.write_all(head.concat().as_bytes())?;
        let mut to_server = server.try_clone()?;
        let mut to_client = client.try_clone()?;
        let mut from_server = server;
        let upload = std::thread::spawn(move || {
            let _ = std::io::copy(&mut from_client, &mut to_server);
            let _ = to_server.shutdown(Shutdown::Write);
        });
        let _ = std::io::copy(&mut from_server, &mut to_client);
        let _ = to_client.shutdown(Shutdown::Both);
        let _ = upload.join();
        return Ok(());
    }
    let headers = parse_headers(&head[1..]);
    // One request on this connection: the response then ends where the store closes it.
    let mut forwarded = request_line.clone() + "\r\n";
    for (name, value) in headers
        .iter()
        .filter(|(n, _)| !n.eq_ignore_ascii_case("connection"))
    {
        forwarded += &format!("{name}: {value}\r\n");
    }
    forwarded += "connection: close\r\n\r\n";
    server.write_all(forwarded.as_bytes())?;

    let mut from_server = BufReader::new(server);
    let mut response_head = Vec::new();
    loop {
        let mut line = String::new();
        if from_server.read_line(&mut line)? == 0 {
            break;
        }
        let end = line == "\r\n";
        response_head.push(line);
        if end {
            break;
        }
    }
    let status = response_head
        .first()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let cut = cut_pending.swap(false, Ordering::SeqCst);
    seen.lock().unwrap().push(TappedRequest {
        request_line,
        headers,
        status,
        response_headers: parse_headers(response_head.get(1..).unwrap_or_default()),
        cut,
    });
    let mut to_client = client;
    to_client.write_all(response_head.concat().as_bytes())?;
    let limit = if cut { cut_after } else { u64::MAX };
    std::io::copy(&mut from_server.take(limit), &mut to_client)?;
    to_client.flush()?;
    to_client.shutdown(Shutdown::Both)
}

fn parse_headers(lines: &[String]) -> Vec<(String, String)> {
    lines
        .iter()
        .filter_map(|line| line.trim_end().split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect()
}
