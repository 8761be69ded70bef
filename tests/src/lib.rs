//! Harness for end-to-end tests: real `kernex-server` and `kernex-agent` processes on loopback ports,
//! on SQLite or on a fresh PostgreSQL database per test.
//!
//! Binaries come from `target/<profile>/` next to the test executable (build them first: `just
//! test` does), or from `KERNEX_SERVER_BIN` / `KERNEX_AGENT_BIN` (CI points the latter at the static
//! musl build, so the tested agent is the shipped one). Setting `KERNEX_TEST_POSTGRES` to an admin
//! URL (`postgres://user:pw@127.0.0.1/postgres`) runs every test against PostgreSQL instead.
//! Setting `KERNEX_TEST_S3` (with the other variables `scripts/garage.sh` prints) keeps every
//! server's bundles in that S3 bucket, under a prefix of the test's own, instead of a directory.
//! Every wait is bounded; processes are killed when their handle drops.

#![allow(clippy::unwrap_used)]

pub mod bundle;
pub mod postgres;
pub mod proxy;
pub mod receiver;
mod s3;
pub mod webdriver;

pub use s3::{S3Bucket, S3Tap, TappedRequest};

use serde_json::Value;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Path of a workspace binary.
pub fn binary(name: &str) -> PathBuf {
    let var = format!(
        "KERNEX_{}_BIN",
        name.trim_start_matches("kernex-").to_uppercase()
    );
    if let Some(path) = std::env::var_os(&var) {
        return PathBuf::from(path);
    }
    // target/<profile>/deps/<test exe> → target/<profile>/<name>
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        path.exists(),
        "{} not found: build it first (`cargo build --workspace`) or set {var}",
        path.display()
    );
    path
}

/// Polls `check` every 100 ms until it returns `Some`, or panics naming `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Where a test's server keeps its state.
#[derive(Debug)]
pub enum Storage {
    Sqlite,
    /// A database created for this test, dropped afterwards.
    Postgres {
        admin_url: String,
        url: String,
        name: String,
    },
    /// A database and data directory owned by someone else: another server (a replica), or a
    /// test's own PostgreSQL.
    External {
        url: String,
        data_dir: PathBuf,
    },
}

impl Storage {
    /// SQLite, or a fresh PostgreSQL database when `KERNEX_TEST_POSTGRES` is set.
    pub fn for_test() -> Storage {
        let Ok(admin_url) = std::env::var("KERNEX_TEST_POSTGRES") else {
            return Storage::Sqlite;
        };
        let name = format!("kx_test_{:016x}", rand::random::<u64>());
        psql(&admin_url, &format!("CREATE DATABASE {name}"));
        let (base, _) = admin_url.rsplit_once('/').unwrap();
        Storage::Postgres {
            url: format!("{base}/{name}"),
            admin_url,
            name,
        }
    }

    fn args(&self, data_dir: &Path) -> Vec<String> {
        let mut args = vec!["--data-dir".to_owned(), data_dir.display().to_string()];
        if let Storage::Postgres { url, .. } | Storage::External { url, .. } = self {
            args.extend(["--database".to_owned(), url.clone()]);
        }
        args
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        if let Storage::Postgres {
            admin_url, name, ..
        } = self
        {
            let _ = Command::new("psql")
                .args([
                    admin_url.as_str(),
                    "-qc",
                    &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
                ])
                .output();
        }
    }
}

/// Where a test's server keeps bundle files.
#[derive(Debug, Clone)]
pub enum BundleStore {
    /// `<data dir>/bundles`.
    Local,
    S3(S3Bucket),
}

impl BundleStore {
    /// The local directory, or a fresh prefix in the test bucket when `KERNEX_TEST_S3` is set.
    pub fn for_test() -> BundleStore {
        S3Bucket::from_env().map_or(BundleStore::Local, BundleStore::S3)
    }
}

/// Runs `sql` through psql at `url`; panics with psql's error when it fails.
pub fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([url, "-v", "ON_ERROR_STOP=1", "-tAqc", sql])
        .output()
        .expect("running psql");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A running `kernex-server serve` and the admin commands against its storage.
#[derive(Debug)]
pub struct Server {
    pub dir: tempfile::TempDir,
    pub storage: Storage,
    pub bundles: BundleStore,
    pub url: String,
    pub port: u16,
    extra: Vec<String>,
    /// Where stderr goes when the test reads the server's log (`start_logged`).
    log: Option<PathBuf>,
    /// Extra environment of the server process.
    env: Vec<(String, String)>,
    child: Option<Child>,
}

/// How a test's server is set up; the `Server::start*` functions cover the common cases.
#[derive(Debug, Default)]
pub struct ServerSetup<'a> {
    /// `serve` options.
    pub extra: &'a [&'a str],
    /// Extra environment of the server process.
    pub env: &'a [(&'a str, &'a str)],
    /// Where bundles go (default: the test's choice, see [`BundleStore::for_test`]).
    pub bundles: Option<BundleStore>,
    /// A PostgreSQL URL owned by the test (default: the test's choice, see [`Storage::for_test`]).
    pub database: Option<&'a str>,
    /// Log at `info` into a file the test reads with [`Server::log`], instead of `warn` to the
    /// test's output.
    pub logged: bool,
}

impl Server {
    pub fn launch(setup: ServerSetup<'_>) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let storage = match setup.database {
            Some(url) => Storage::External {
                url: url.to_owned(),
                data_dir: dir.path().join("data"),
            },
            None => Storage::for_test(),
        };
        let mut server = Server {
            log: setup.logged.then(|| dir.path().join("server.log")),
            env: setup
                .env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            dir,
            storage,
            bundles: setup.bundles.unwrap_or_else(BundleStore::for_test),
            url: String::new(),
            port: 0,
            extra: setup.extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        server.spawn(0);
        server
    }

    /// Starts a server logging at `info` in its production format (JSON lines) into a file the
    /// test reads with [`Server::log`].
    pub fn start_logged(extra: &[&str]) -> Server {
        Server::launch(ServerSetup {
            extra,
            logged: true,
            ..ServerSetup::default()
        })
    }

    /// What the server wrote to stderr (servers from `start_logged` only).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.as_ref().expect("started with start_logged")).unwrap()
    }

    /// Starts a server on the PostgreSQL database at `url` (e.g. a [`postgres::PrivatePostgres`]),
    /// with `serve` options `extra`.
    pub fn start_on_database(url: &str, extra: &[&str]) -> Server {
        Server::launch(ServerSetup {
            extra,
            database: Some(url),
            bundles: Some(BundleStore::Local),
            ..ServerSetup::default()
        })
    }

    /// Starts a server with extra environment variables (e.g. `OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Server {
        Server::launch(ServerSetup {
            extra,
            env,
            ..ServerSetup::default()
        })
    }

    /// Starts a server with a 1 s heartbeat interval on a free loopback port.
    pub fn start() -> Server {
        Server::start_with(&["--heartbeat-interval", "1s"])
    }

    pub fn start_with(extra: &[&str]) -> Server {
        Server::launch(ServerSetup {
            extra,
            ..ServerSetup::default()
        })
    }

    /// Starts a server that keeps bundles in `bundles`, with `serve` options `extra`.
    pub fn start_with_bundles(bundles: BundleStore, extra: &[&str]) -> Server {
        Server::launch(ServerSetup {
            extra,
            bundles: Some(bundles),
            ..ServerSetup::default()
        })
    }

    /// `count` devices of `tenant` registered without hardware (`device preauthorize`): their ids
    /// and bearer tokens.
    pub fn preauthorize(&self, tenant: &str, count: u32) -> Vec<(String, String)> {
        let list = self
            .dir
            .path()
            .join(format!("preauthorized-{}.txt", rand::random::<u32>()));
        self.admin(&[
            "device",
            "preauthorize",
            "--tenant",
            tenant,
            "--count",
            &count.to_string(),
            "--out",
            list.to_str().unwrap(),
        ]);
        std::fs::read_to_string(&list)
            .unwrap()
            .lines()
            .map(|line| {
                let (id, token) = line.split_once(' ').unwrap();
                (id.to_owned(), token.to_owned())
            })
            .collect()
    }

    pub fn data_dir(&self) -> PathBuf {
        match &self.storage {
            Storage::External { data_dir, .. } => data_dir.clone(),
            _ => self.dir.path().join("data"),
        }
    }

    /// Another `kernex-server serve` on the same PostgreSQL database and bundle directory (a
    /// replica behind a load balancer); None on SQLite, which is one process's database.
    pub fn replica(&self) -> Option<Server> {
        let Storage::Postgres { url, .. } = &self.storage else {
            return None;
        };
        let mut replica = Server {
            dir: tempfile::tempdir().unwrap(),
            storage: Storage::External {
                url: url.clone(),
                data_dir: self.data_dir(),
            },
            bundles: self.bundles.clone(),
            url: String::new(),
            port: 0,
            extra: self.extra.clone(),
            log: None,
            env: self.env.clone(),
            child: None,
        };
        replica.spawn(0);
        Some(replica)
    }

    fn spawn(&mut self, port: u16) {
        let mut cmd = Command::new(binary("kernex-server"));
        cmd.args(self.storage.args(&self.data_dir()))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped());
        match &self.log {
            Some(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .unwrap();
                cmd.env("KERNEX_LOG", "info").stderr(file);
            }
            None => {
                cmd.env("KERNEX_LOG", "warn").stderr(Stdio::inherit());
            }
        }
        if let BundleStore::S3(bucket) = &self.bundles {
            cmd.args(bucket.serve_args()).envs(bucket.env());
        }
        let mut child = cmd.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://") || w.starts_with("https://"))
            .unwrap_or_else(|| {
                panic!("kernex-server did not announce its address; it printed {line:?}")
            })
            .to_owned();
        self.port = url.rsplit(':').next().unwrap().parse().unwrap();
        self.url = url;
        self.child = Some(child);
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    /// Stops the server (SIGKILL: the harshest case for the agent).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and storage.
    pub fn restart(&mut self) {
        self.stop();
        let port = self.port;
        self.spawn(port);
    }

    /// Runs `kernex-server <args>` against this server's storage; returns stdout, panics on failure.
    pub fn admin(&self, args: &[&str]) -> String {
        let out = self.admin_output(args);
        assert!(
            out.status.success(),
            "kernex-server {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn admin_output(&self, args: &[&str]) -> std::process::Output {
        Command::new(binary("kernex-server"))
            .args(self.storage.args(&self.data_dir()))
            .args(args)
            .env("KERNEX_LOG", "warn")
            .output()
            .unwrap()
    }

    /// Creates a tenant with an admin API key; returns a REST client for it.
    pub fn tenant(&self, name: &str) -> Api {
        self.admin(&["tenant", "create", name]);
        let key = self
            .admin(&["apikey", "create", "--tenant", name, "--role", "admin"])
            .trim()
            .to_owned();
        Api {
            base: self.url.clone(),
            key,
        }
    }

    /// A bootstrap token for `tenant`, e.g. `&["--uses", "1"]`.
    pub fn token(&self, tenant: &str, extra: &[&str]) -> String {
        let mut args = vec!["token", "create", "--tenant", tenant];
        args.extend_from_slice(extra);
        self.admin(&args).trim().to_owned()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
        if let BundleStore::S3(bucket) = &self.bundles {
            bucket.clear();
        }
    }
}

/// The REST API with one API key.
#[derive(Debug, Clone)]
pub struct Api {
    pub base: String,
    pub key: String,
}

/// Status and JSON body of a response, whatever the status.
pub type Reply = (u16, Value);

impl Api {
    /// The same key against another server (a replica).
    pub fn at(&self, base: &str) -> Api {
        Api {
            base: base.to_owned(),
            key: self.key.clone(),
        }
    }

    pub fn with_key(&self, key: &str) -> Api {
        Api {
            base: self.base.clone(),
            key: key.to_owned(),
        }
    }

    pub fn get(&self, path: &str) -> Reply {
        self.send(ureq::get(&self.url(path)), None)
    }

    pub fn post(&self, path: &str, body: Value) -> Reply {
        self.send(ureq::post(&self.url(path)), Some(body))
    }

    pub fn delete(&self, path: &str) -> Reply {
        self.send(ureq::delete(&self.url(path)), None)
    }

    /// Any method, with an optional JSON body.
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> Reply {
        self.send(ureq::request(method, &self.url(path)), body)
    }

    /// Any method, with raw bytes as the body.
    pub fn call_raw(&self, method: &str, path: &str, body: &[u8]) -> Reply {
        into_reply(
            ureq::request(method, &self.url(path))
                .set("authorization", &format!("Bearer {}", self.key))
                .send_bytes(body),
        )
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base)
    }

    fn send(&self, request: ureq::Request, body: Option<Value>) -> Reply {
        let request = request.set("authorization", &format!("Bearer {}", self.key));
        let result = match body {
            Some(body) => request.send_json(body),
            None => request.call(),
        };
        into_reply(result)
    }

    /// The device list.
    pub fn devices(&self) -> Vec<Value> {
        let (status, body) = self.get("/devices");
        assert_eq!(status, 200, "{body}");
        body.as_array().unwrap().clone()
    }

    /// The one device, once there is exactly one and `accept` likes it.
    pub fn wait_device(&self, what: &str, accept: impl Fn(&Value) -> bool) -> Value {
        wait_for(what, Duration::from_secs(90), || {
            let devices = self.devices();
            (devices.len() == 1 && accept(&devices[0])).then(|| devices[0].clone())
        })
    }
}

pub fn into_reply(result: Result<ureq::Response, ureq::Error>) -> Reply {
    let response = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("request failed: {e}"),
    };
    let status = response.status();
    let text = response.into_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// A running `kernex-agent run` with its own bootstrap file and state directory.
#[derive(Debug)]
pub struct Agent {
    pub dir: tempfile::TempDir,
    pub hardware_id: String,
    child: Option<Child>,
}

impl Agent {
    /// Writes a bootstrap file for `server_url` and starts the agent.
    pub fn start(server_url: &str, tenant: &str, token: &str) -> Agent {
        Agent::start_with_bootstrap(&format!(
            "server_url = \"{server_url}\"\ntenant = \"{tenant}\"\ntoken = \"{token}\"\n"
        ))
    }

    pub fn start_with_bootstrap(bootstrap: &str) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bootstrap.toml"), bootstrap).unwrap();
        let mut agent = Agent {
            dir,
            hardware_id: format!("hw-{:016x}", rand::random::<u64>()),
            child: None,
        };
        agent.spawn();
        agent
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn spawn(&mut self) {
        self.spawn_with_env(&[]);
    }

    /// Starts the agent again with extra environment variables (e.g. `KERNEX_AGENT_FAILPOINT`).
    pub fn spawn_with_env(&mut self, env: &[(&str, &str)]) {
        let child = Command::new(binary("kernex-agent"))
            .envs(env.iter().copied())
            .args([
                "run",
                "--max-backoff",
                "2s",
                "--hardware-id",
                &self.hardware_id,
                "--bootstrap",
            ])
            .arg(self.dir.path().join("bootstrap.toml"))
            .arg("--state-dir")
            .arg(self.state_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the agent to exit by itself; its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> i32 {
        let child = self.child.as_mut().expect("agent running");
        let status = wait_for("the agent to exit", timeout, || child.try_wait().unwrap());
        self.child = None;
        status.code().unwrap_or(-1)
    }

    /// `kernex-agent status --json`.
    pub fn status(&self) -> Value {
        let out = Command::new(binary("kernex-agent"))
            .args(["status", "--json", "--state-dir"])
            .arg(self.state_dir())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kernex-agent status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `kernex-agent vm-endpoint` process (the agent inside a user VM) on a loopback port.
#[derive(Debug)]
pub struct VmEndpoint {
    pub dir: tempfile::TempDir,
    pub port: u16,
    args: Vec<String>,
    child: Option<Child>,
}

impl VmEndpoint {
    /// Starts an endpoint with `secret` and extra arguments (`--action NAME=CMD`…) on a free port.
    pub fn start(secret: &str, extra: &[&str]) -> VmEndpoint {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), secret).unwrap();
        let mut endpoint = VmEndpoint {
            dir,
            port: 0,
            args: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        endpoint.spawn();
        endpoint
    }

    /// `tcp://127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    /// Starts it (again, on the same port once it had one).
    pub fn spawn(&mut self) {
        let mut child = Command::new(binary("kernex-agent"))
            .args(["vm-endpoint", "--listen"])
            .arg(format!("tcp://127.0.0.1:{}", self.port))
            .arg("--secret-file")
            .arg(self.dir.path().join("secret"))
            .args(&self.args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("vm-endpoint did not announce its address: {line:?}"));
        self.port = port;
        self.child = Some(child);
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for VmEndpoint {
    fn drop(&mut self) {
        self.kill();
    }
}
