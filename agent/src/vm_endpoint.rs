//! `kernex-agent vm-endpoint`: the agent inside a user VM. It answers its appliance, and only its
//! appliance: health, info about the VM, and `call` for the actions it was started with. Every
//! connection must complete the mutual handshake of [`kernex_protocol::vmlink`] first.

use crate::process::run_bounded;
use crate::{info, warn};
use kernex_protocol::vmlink::{
    self, codes, CallParams, CallResult, LinkError, LinkFault, Method, Outcome, Request, Response,
    VmInfo,
};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Longest a `call` may run, whatever the appliance asks.
const MAX_CALL_TIME: Duration = Duration::from_secs(600);
/// A connection that says nothing for this long is dropped (the appliance pings every few seconds).
const IDLE: Duration = Duration::from_secs(120);
/// The handshake must be done within this.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// Where the endpoint listens, parsed from `tcp://HOST:PORT` or `vsock://CID:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp(String),
    Vsock { cid: u32, port: u32 },
}

impl std::str::FromStr for Address {
    type Err = String;
    fn from_str(s: &str) -> Result<Address, String> {
        let wrong = || format!("`{s}`: expected tcp://HOST:PORT or vsock://CID:PORT");
        let (scheme, rest) = s.split_once("://").ok_or_else(wrong)?;
        let (host, port) = rest.rsplit_once(':').ok_or_else(wrong)?;
        match scheme {
            "tcp" if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(Address::Tcp(rest.to_owned()))
            }
            "vsock" => Ok(Address::Vsock {
                cid: host.parse().map_err(|_| wrong())?,
                port: port.parse().map_err(|_| wrong())?,
            }),
            _ => Err(wrong()),
        }
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Tcp(hostport) => write!(f, "tcp://{hostport}"),
            Address::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
        }
    }
}

/// A connected byte stream of either kind.
#[derive(Debug)]
pub enum Stream {
    Tcp(std::net::TcpStream),
    Vsock(vsock::VsockStream),
}

impl Stream {
    /// Connects with a deadline (TCP; vsock connects are local and immediate or refused).
    pub fn connect(address: &Address, timeout: Duration) -> std::io::Result<Stream> {
        match address {
            Address::Tcp(hostport) => {
                use std::net::ToSocketAddrs as _;
                let mut last = std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{hostport} resolves to no address"),
                );
                for addr in hostport.to_socket_addrs()? {
                    match std::net::TcpStream::connect_timeout(&addr, timeout) {
                        Ok(stream) => {
                            let _ = stream.set_nodelay(true);
                            return Ok(Stream::Tcp(stream));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
            Address::Vsock { cid, port } => {
                vsock::VsockStream::connect_with_cid_port(*cid, *port).map(Stream::Vsock)
            }
        }
    }

    pub fn set_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
            Stream::Vsock(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Vsock(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Vsock(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Vsock(s) => s.flush(),
        }
    }
}

/// What `vm-endpoint` was started with.
#[derive(Debug, Clone)]
pub struct EndpointOptions {
    pub listen: Address,
    pub secret: Vec<u8>,
    /// Allowed actions: name → shell command (`sh -c COMMAND sh ARGS…`). `hostname` is built in.
    pub actions: BTreeMap<String, String>,
    pub max_connections: usize,
}

/// Reads the secret file: trimmed, at least 16 bytes.
pub fn read_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading the secret file {}: {e}", path.display()))?;
    let secret = text.trim().as_bytes().to_vec();
    anyhow::ensure!(
        secret.len() >= 16,
        "the secret in {} has {} bytes; at least 16 are needed",
        path.display(),
        secret.len()
    );
    Ok(secret)
}

/// Serves until the process is stopped. Prints `vm-endpoint listening on ADDR` once bound.
pub fn serve(options: EndpointOptions) -> anyhow::Result<()> {
    let options = Arc::new(options);
    let active = Arc::new(AtomicUsize::new(0));
    let accept = |stream: Stream, peer: String| {
        if active.fetch_add(1, Ordering::SeqCst) >= options.max_connections {
            active.fetch_sub(1, Ordering::SeqCst);
            warn!("refusing {peer}: {} links already", options.max_connections);
            return;
        }
        let (options, active) = (options.clone(), active.clone());
        std::thread::spawn(move || {
            match connection(stream, &options) {
                Ok(()) => info!("{peer}: link closed"),
                Err(e) => warn!("{peer}: {e}"),
            }
            active.fetch_sub(1, Ordering::SeqCst);
        });
    };
    match &options.listen {
        Address::Tcp(hostport) => {
            let listener = std::net::TcpListener::bind(hostport)
                .map_err(|e| anyhow::anyhow!("listening on tcp://{hostport}: {e}"))?;
            announce(&format!("tcp://{}", listener.local_addr()?));
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        let peer = stream
                            .peer_addr()
                            .map(|a| a.to_string())
                            .unwrap_or_default();
                        let _ = stream.set_nodelay(true);
                        accept(Stream::Tcp(stream), peer);
                    }
                    Err(e) => warn!("accepting a link: {e}"),
                }
            }
        }
        Address::Vsock { cid, port } => {
            let listener = vsock::VsockListener::bind_with_cid_port(*cid, *port)
                .map_err(|e| anyhow::anyhow!("listening on vsock://{cid}:{port}: {e}"))?;
            announce(&format!("vsock://{cid}:{port}"));
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        let peer = stream
                            .peer_addr()
                            .map(|a| format!("{a:?}"))
                            .unwrap_or_default();
                        accept(Stream::Vsock(stream), peer);
                    }
                    Err(e) => warn!("accepting a link: {e}"),
                }
            }
        }
    }
    Ok(())
}

fn announce(address: &str) {
    println!("vm-endpoint listening on {address}");
    let _ = std::io::stdout().flush();
    info!("vm-endpoint {} listening on {address}", crate::VERSION);
}

fn connection(stream: Stream, options: &EndpointOptions) -> Result<(), LinkError> {
    stream.set_timeout(Some(HANDSHAKE))?;
    let mut session = vmlink::accept(stream, &options.secret)?;
    session.stream().set_timeout(Some(IDLE))?;
    loop {
        let request: Request = match session.receive() {
            Ok(request) => request,
            Err(LinkError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        let result = match request.method {
            Method::Health => Outcome::Health {
                uptime_s: vm_info().uptime_s,
            },
            Method::Info => Outcome::Info(vm_info()),
            Method::Call(params) => match call(&params, options) {
                Ok(result) => Outcome::Call(result),
                Err(fault) => Outcome::Error(fault),
            },
        };
        session.send(&Response {
            id: request.id,
            result,
        })?;
    }
}

fn call(params: &CallParams, options: &EndpointOptions) -> Result<CallResult, LinkFault> {
    let started = std::time::Instant::now();
    if params.action == "hostname" && !options.actions.contains_key("hostname") {
        return Ok(CallResult {
            exit_code: 0,
            stdout: format!("{}\n", vm_info().hostname),
            stderr: String::new(),
            duration_ms: started.elapsed().as_millis() as u64,
        });
    }
    let Some(script) = options.actions.get(&params.action) else {
        let allowed: Vec<&str> = std::iter::once("hostname")
            .chain(options.actions.keys().map(String::as_str))
            .collect();
        return Err(LinkFault::new(
            codes::ACTION_NOT_ALLOWED,
            format!(
                "action `{}` is not allowed here (allowed: {})",
                params.action,
                allowed.join(", ")
            ),
        ));
    };
    let timeout = Duration::from_millis(params.timeout_ms).min(MAX_CALL_TIME);
    let max_output = (params.max_output_bytes as usize).min(vmlink::MAX_CALL_OUTPUT);
    let mut command = std::process::Command::new("/bin/sh");
    command.arg("-c").arg(script).arg("sh").args(&params.args);
    let done = run_bounded(command, timeout, max_output).map_err(|e| {
        LinkFault::new(
            codes::CALL_FAILED,
            format!("action `{}` could not start: {e}", params.action),
        )
    })?;
    if done.timed_out {
        return Err(LinkFault::new(
            codes::TIMEOUT,
            format!(
                "action `{}` ran past its {timeout:?} and was killed",
                params.action
            ),
        ));
    }
    if done.overflowed {
        return Err(LinkFault::new(
            codes::OUTPUT_TOO_LARGE,
            format!(
                "action `{}` wrote more than {max_output} bytes and was killed",
                params.action
            ),
        ));
    }
    Ok(CallResult {
        exit_code: done.exit_code.unwrap_or(-1),
        stdout: String::from_utf8_lossy(&done.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&done.stderr).into_owned(),
        duration_ms: done.elapsed.as_millis() as u64,
    })
}

/// This VM, from `/proc` and `/etc/os-release`.
pub fn vm_info() -> VmInfo {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let hostname = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    let os = read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap_or_default();
    let kernel = rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned();
    let uptime_s = read("/proc/uptime")
        .split_whitespace()
        .next()
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0) as u64;
    let loads: Vec<f64> = read("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .filter_map(|v| v.parse().ok())
        .collect();
    let meminfo = read("/proc/meminfo");
    let kib = |key: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    VmInfo {
        hostname,
        os,
        kernel,
        uptime_s,
        load1: loads.first().copied().unwrap_or(0.0),
        load5: loads.get(1).copied().unwrap_or(0.0),
        load15: loads.get(2).copied().unwrap_or(0.0),
        mem_total_bytes: kib("MemTotal:"),
        mem_available_bytes: kib("MemAvailable:"),
        endpoint_version: crate::VERSION.to_owned(),
    }
}
