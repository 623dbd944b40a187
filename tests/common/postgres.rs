//! A throwaway PostgreSQL cluster per test: `initdb` in a temporary directory (as
//! the `postgres` user when the tests run as root), started on a free loopback
//! port. Never a system cluster. The server binaries come from
//! `scripts/postgres-harness.sh` (Debian `postgresql`); without them a test fails
//! with a message that says so, it is never skipped.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A running cluster; stopped (immediately) when dropped.
pub struct PostgresServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_postgres_user: bool,
}

/// The directory with `initdb`, `pg_ctl` and `postgres`.
fn server_binaries() -> PathBuf {
    if let Some(dir) = std::env::var_os("PROXI_POSTGRES_BIN") {
        return PathBuf::from(dir);
    }
    let recorded = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/postgres-harness/bin-dir");
    if let Ok(text) = std::fs::read_to_string(&recorded) {
        return PathBuf::from(text.trim());
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!(
            "PostgreSQL server binaries not found (no initdb under /usr/lib/postgresql/*/bin, \
             PROXI_POSTGRES_BIN unset): run scripts/postgres-harness.sh, which installs Debian `postgresql`"
        )
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free loopback port")
}

impl PostgresServer {
    /// Creates and starts a new cluster with a database `proxi` owned by user `proxi`.
    pub fn start() -> PostgresServer {
        let bin = server_binaries();
        let dir = tempfile::tempdir().expect("temp dir");
        // initdb refuses to run as root: the cluster belongs to `postgres` then.
        let as_postgres_user = rustix::process::geteuid().is_root();
        if as_postgres_user {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown runs");
            assert!(status.success(), "cannot hand the cluster dir to postgres");
        }
        let server = PostgresServer {
            dir,
            bin,
            port: free_port(),
            as_postgres_user,
        };
        server.run(
            "initdb",
            &[
                "-D",
                &server.data().display().to_string(),
                "-U",
                "proxi",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        );
        server.start_again();
        server.run(
            "createdb",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &server.port.to_string(),
                "-U",
                "proxi",
                "proxi",
            ],
        );
        server
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run(&self, program: &str, args: &[&str]) {
        let path = self.bin.join(program);
        let mut command = if self.as_postgres_user {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&path);
            command
        } else {
            Command::new(&path)
        };
        let output = command
            .args(args)
            .output()
            .unwrap_or_else(|error| panic!("{} does not run: {error}", path.display()));
        assert!(
            output.status.success(),
            "{program} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The connection URL for `--store`.
    pub fn url(&self) -> String {
        format!("postgres://proxi@127.0.0.1:{}/proxi", self.port)
    }

    /// Stops the server (fast shutdown: connections are cut) and waits until it is down.
    pub fn stop(&self) {
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
    }

    /// Starts the server (again) on the same port and waits until it accepts connections.
    pub fn start_again(&self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {}",
            self.port,
            self.dir.path().display()
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-o",
                &options,
                "-l",
                &self.dir.path().join("server.log").display().to_string(),
                "-w",
                "start",
            ],
        );
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        let path = self.bin.join("pg_ctl");
        let data = self.data();
        let mut command = if self.as_postgres_user {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&path);
            command
        } else {
            Command::new(&path)
        };
        let _ = command
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "stop"])
            .output();
    }
}
