//! Helpers for the MCP end-to-end tests against third-party clients (tests/mcp_*.rs):
//! the real binary, a server whose log can be shown, and the clients that
//! `scripts/mcp-harness.sh` installs.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use super::{ServerProcess, policy_path};

/// How long a server may take to start or a client to finish: a deadline, never a sleep.
pub const DEADLINE: Duration = Duration::from_secs(120);

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `proxi` binary cargo built for this test run.
pub fn proxi_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_proxi"))
}

/// Where `scripts/mcp-harness.sh` installs the pinned clients.
pub fn harness_dir() -> PathBuf {
    std::env::var_os("PROXI_MCP_HARNESS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/mcp-harness"))
}

/// A harness file, or a failure telling how to install it: these tests never skip.
pub fn harness_file(relative: &str) -> PathBuf {
    let path = harness_dir().join(relative);
    assert!(
        path.exists(),
        "{} is missing: run scripts/mcp-harness.sh first (it installs the pinned MCP Python SDK, \
         conformance suite and Inspector into target/mcp-harness/)",
        path.display()
    );
    path
}

/// The harness's Python (a venv with the pinned `mcp` package).
pub fn python() -> PathBuf {
    harness_file("venv/bin/python")
}

/// Environment that keeps loopback traffic away from any configured HTTP proxy.
pub fn loopback_env(command: &mut Command) -> &mut Command {
    command
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
}

/// A `proxi serve` process on a fresh data dir and a free loopback port, its
/// stderr kept in a file for [`ProxiServer::log`]; killed on drop.
pub struct ProxiServer {
    // Declared first so that it is killed before its data dir is removed.
    server: ServerProcess,
    /// The data dir (removed on drop).
    pub data_dir: tempfile::TempDir,
    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub url: String,
}

impl ProxiServer {
    /// Starts `proxi serve` with the shipped policy and waits until it answers.
    pub fn start() -> ProxiServer {
        let data_dir = tempfile::tempdir().expect("temp dir");
        let mut command = ServerProcess::command(data_dir.path(), Some(&policy_path()));
        command
            .args(["--durability", "process"])
            .stdin(Stdio::null())
            .stderr(log_file(data_dir.path()));
        let server = ServerProcess::spawn(command, data_dir.path());
        ProxiServer {
            url: server.url.clone(),
            server,
            data_dir,
        }
    }

    /// What the server wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.path().join(LOG_FILE)).unwrap_or_default()
    }

    /// `host:port` of the server.
    pub fn authority(&self) -> &str {
        self.url.trim_start_matches("http://")
    }
}

/// Where a test server's stderr goes, inside its data dir.
pub const LOG_FILE: &str = "proxi.log";

fn log_file(data_dir: &Path) -> Stdio {
    std::fs::File::create(data_dir.join(LOG_FILE))
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::inherit())
}

/// Runs `command` to completion within [`DEADLINE`], killing it if it overruns.
pub fn run_with_deadline(command: &mut Command) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start {command:?}: {error}"));
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + DEADLINE;
    let status: ExitStatus = loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{command:?} did not finish within {DEADLINE:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&stdout.join().unwrap_or_default()),
                String::from_utf8_lossy(&stderr.join().unwrap_or_default())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buffer = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buffer);
        }
        buffer
    })
}

/// Panics with both streams unless `output` succeeded.
pub fn assert_success(what: &str, output: &Output) {
    assert!(
        output.status.success(),
        "{what} failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
