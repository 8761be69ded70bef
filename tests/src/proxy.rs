//! A TCP proxy between agents and the server that sees the HTTP requests going through it and can
//! misbehave on bundle downloads: cut a download after some bytes, or hold it (stop forwarding)
//! until released. Real sockets, real agent, real server: only the wire in between is scripted.
//!
//! Requests are parsed from the client's side of each connection (request line, headers, then
//! `content-length` bytes of body skipped); the agent neither pipelines nor uses chunked bodies.
//! Responses are forwarded untouched except when a rule for downloads applies.

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What happens to the next bundle download (`GET …/bundles/{id}/content`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Download {
    /// Forwarded as it comes.
    Pass,
    /// The connection is cut after this many response bytes, once; then back to `Pass`.
    CutAfter(u64),
    /// Forwarding stops after this many response bytes until [`Proxy::release`].
    HoldAfter(u64),
    /// The response byte at this offset (headers included) is flipped, once; then `Pass`.
    FlipByteAt(u64),
}

/// One request seen by the proxy.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn is_download(&self) -> bool {
        self.method == "GET" && self.path.contains("/bundles/") && self.path.ends_with("/content")
    }
}

#[derive(Debug)]
struct Shared {
    target: String,
    rule: Mutex<Download>,
    released: AtomicBool,
    seen: Mutex<Vec<Seen>>,
    /// Bytes of download responses forwarded so far, over all connections.
    downloaded: Mutex<u64>,
}

/// The proxy; listens until dropped (its threads end with their connections).
#[derive(Debug)]
pub struct Proxy {
    pub url: String,
    shared: Arc<Shared>,
}

impl Proxy {
    /// A proxy on a free loopback port forwarding to `target` (`http://127.0.0.1:PORT`).
    pub fn start(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shared = Arc::new(Shared {
            target: target.trim_start_matches("http://").to_owned(),
            rule: Mutex::new(Download::Pass),
            released: AtomicBool::new(false),
            seen: Mutex::new(Vec::new()),
            downloaded: Mutex::new(0),
        });
        let accept = shared.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let shared = accept.clone();
                std::thread::spawn(move || connection(client, shared));
            }
        });
        Proxy { url, shared }
    }

    pub fn set(&self, rule: Download) {
        self.shared.released.store(false, Ordering::SeqCst);
        *self.shared.rule.lock().unwrap() = rule;
    }

    /// Lets a held download go on (and every later one).
    pub fn release(&self) {
        *self.shared.rule.lock().unwrap() = Download::Pass;
        self.shared.released.store(true, Ordering::SeqCst);
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    pub fn downloads(&self) -> Vec<Seen> {
        self.seen().into_iter().filter(Seen::is_download).collect()
    }

    /// Download response bytes forwarded so far.
    pub fn downloaded(&self) -> u64 {
        *self.shared.downloaded.lock().unwrap()
    }
}

/// Per connection: whether the response now flowing answers a download, and how much of it went.
#[derive(Debug, Default)]
struct Flow {
    downloading: AtomicBool,
    sent: AtomicU64,
}

fn connection(client: TcpStream, shared: Arc<Shared>) {
    let Ok(server) = TcpStream::connect(&shared.target) else {
        return;
    };
    let flow = Arc::new(Flow::default());
    let (client_read, server_write) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let requests = {
        let (shared, flow) = (shared.clone(), flow.clone());
        std::thread::spawn(move || requests(client_read, server_write, &shared, &flow))
    };
    responses(server, client, &shared, &flow);
    let _ = requests.join();
}

/// Client → server: forwards everything, records each request.
fn requests(mut from: TcpStream, mut to: TcpStream, shared: &Shared, flow: &Flow) {
    let mut parser = RequestParser::default();
    let mut buffer = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Parsed before forwarding, so the rule for a response is in place when it comes back.
        for seen in parser.feed(&buffer[..n]) {
            flow.downloading.store(seen.is_download(), Ordering::SeqCst);
            flow.sent.store(0, Ordering::SeqCst);
            shared.seen.lock().unwrap().push(seen);
        }
        if to.write_all(&buffer[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Splits a client's byte stream into request heads, skipping bodies by `content-length`.
#[derive(Debug, Default)]
struct RequestParser {
    head: Vec<u8>,
    body_left: usize,
}

impl RequestParser {
    fn feed(&mut self, bytes: &[u8]) -> Vec<Seen> {
        let mut found = Vec::new();
        let mut input = bytes.to_vec();
        loop {
            let skip = self.body_left.min(input.len());
            self.body_left -= skip;
            input.drain(..skip);
            if input.is_empty() {
                return found;
            }
            self.head.append(&mut input);
            let Some(end) = self.head.windows(4).position(|w| w == b"\r\n\r\n") else {
                return found;
            };
            input = self.head.split_off(end + 4);
            let seen = parse(&String::from_utf8_lossy(&self.head[..end]));
            self.head.clear();
            self.body_left = seen
                .header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            found.push(seen);
        }
    }
}

fn parse(head: &str) -> Seen {
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let method = first.next().unwrap_or("").to_owned();
    let path = first.next().unwrap_or("").to_owned();
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Seen {
        method,
        path,
        headers,
    }
}

/// Server → client: forwards, applying the download rule.
fn responses(mut from: TcpStream, mut to: TcpStream, shared: &Shared, flow: &Flow) {
    let mut buffer = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut chunk = &buffer[..n];
        if flow.downloading.load(Ordering::SeqCst) {
            let sent = flow.sent.load(Ordering::SeqCst);
            let rule = *shared.rule.lock().unwrap();
            match rule {
                Download::CutAfter(limit) if sent + chunk.len() as u64 > limit => {
                    let keep = limit.saturating_sub(sent) as usize;
                    let _ = to.write_all(&chunk[..keep]);
                    *shared.downloaded.lock().unwrap() += keep as u64;
                    *shared.rule.lock().unwrap() = Download::Pass;
                    let _ = to.shutdown(Shutdown::Both);
                    let _ = from.shutdown(Shutdown::Both);
                    return;
                }
                Download::HoldAfter(limit) if sent + chunk.len() as u64 > limit => {
                    let keep = limit.saturating_sub(sent) as usize;
                    if to.write_all(&chunk[..keep]).is_err() {
                        break;
                    }
                    flow.sent.fetch_add(keep as u64, Ordering::SeqCst);
                    *shared.downloaded.lock().unwrap() += keep as u64;
                    chunk = &chunk[keep..];
                    while !shared.released.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                Download::FlipByteAt(at) if sent + chunk.len() as u64 > at => {
                    let mut flipped = chunk.to_vec();
                    flipped[(at - sent) as usize] ^= 0x01;
                    *shared.rule.lock().unwrap() = Download::Pass;
                    flow.sent.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                    *shared.downloaded.lock().unwrap() += chunk.len() as u64;
                    if to.write_all(&flipped).is_err() {
                        break;
                    }
                    continue;
                }
                _ => {}
            }
            flow.sent.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            *shared.downloaded.lock().unwrap() += chunk.len() as u64;
        }
        if to.write_all(chunk).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
}
