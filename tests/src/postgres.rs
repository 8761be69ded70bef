//! A PostgreSQL server of a test's own (Debian's binaries, run as the `postgres` user), for tests
//! that stop and start the database: the shared cluster of the suite cannot be stopped under
//! the other tests.

use std::path::PathBuf;
use std::process::Command;

#[derive(Debug)]
pub struct PrivatePostgres {
    /// Owned by `postgres`: the data directory, the socket and the log live in it.
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

impl PrivatePostgres {
    /// Initializes and starts a server on a free loopback port, with database `kernex` owned by
    /// role `kernex` (trust authentication, loopback only).
    pub fn start() -> PrivatePostgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL is not installed (/usr/lib/postgresql)")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("initdb").exists())
            .max()
            .expect("no initdb under /usr/lib/postgresql/*/bin");
        let dir = tempfile::tempdir().unwrap();
        run(Command::new("chown")
            .arg("postgres:postgres")
            .arg(dir.path()));
        let port = {
            let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            socket.local_addr().unwrap().port()
        };
        let postgres = PrivatePostgres { dir, bin, port };
        postgres.as_postgres(
            "initdb",
            &[
                "-D",
                &postgres.data(),
                "-U",
                "kernex",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
        );
        postgres.start_again();
        postgres.as_postgres(
            "createdb",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "kernex",
                "kernex",
            ],
        );
        postgres
    }

    pub fn url(&self) -> String {
        format!("postgres://kernex@127.0.0.1:{}/kernex", self.port)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn as_postgres(&self, tool: &str, args: &[&str]) {
        run(Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(tool))
            .args(args));
    }

    /// Stops the server at once, as a crash or a lost machine would (`-m immediate`: no
    /// checkpoint, clients cut).
    pub fn stop(&self) {
        self.as_postgres(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
    }

    /// Starts the (stopped) server again on the same port and data.
    pub fn start_again(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("postgres.log").display().to_string();
        self.as_postgres(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-o",
                &options,
                "-l",
                &log,
                "-w",
                "start",
            ],
        );
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", &self.data(), "-m", "immediate", "stop"])
            .output();
    }
}

fn run(command: &mut Command) {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{command:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
