//! Issue 8, item 7: the operator CLI trusted `server.json`.
//!
//! Anyone who can write the data dir (under `proxi mcp`, the agent) can write
//! `server.json`; before the fix the CLI sent the operator token to whatever listener
//! it named. Now the CLI follows it only to a loopback URL whose pid is alive, and
//! otherwise asks for `--server`.

mod common;

use std::io::ErrorKind;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};

use common::{OPERATOR_TOKEN, ServerProcess};
use proxi::server::SERVER_FILE;

fn mode_status(data_dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(["mode", "status", "--data-dir"])
        .arg(data_dir)
        .env("PROXI_OPERATOR_TOKEN", OPERATOR_TOKEN)
        .env_remove("PROXI_SERVER")
        .output()
        .expect("proxi runs")
}

fn forge(data_dir: &Path, url: &str, pid: u32) {
    std::fs::write(
        data_dir.join(SERVER_FILE),
        serde_json::json!({"url": url, "pid": pid}).to_string(),
    )
    .unwrap();
}

fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().expect("`true` runs");
    let pid = child.id();
    child.wait().unwrap();
    pid
}

#[test]
fn a_listener_named_with_a_dead_pid_gets_no_token() {
    let data = tempfile::tempdir().unwrap();
    let fake = TcpListener::bind("127.0.0.1:0").unwrap();
    forge(
        data.path(),
        &format!("http://{}", fake.local_addr().unwrap()),
        dead_pid(),
    );
    let output = mode_status(data.path());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("is not running") && stderr.contains("--server"),
        "{stderr}"
    );
    // The CLI has exited: any connection it made would be waiting in the backlog.
    fake.set_nonblocking(true).unwrap();
    match fake.accept() {
        Err(error) if error.kind() == ErrorKind::WouldBlock => {}
        Ok(_) => panic!("the CLI connected to the forged listener"),
        Err(error) => panic!("accept failed: {error}"),
    }
}

#[test]
fn a_non_loopback_url_is_refused_even_with_a_live_pid() {
    let data = tempfile::tempdir().unwrap();
    forge(data.path(), "http://192.0.2.1:80", std::process::id());
    let output = mode_status(data.path());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("not a loopback URL") && stderr.contains("--server"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("cannot reach"),
        "it tried to connect: {stderr}"
    );
}

#[test]
fn a_real_server_is_still_found_through_its_server_json() {
    let data = tempfile::tempdir().unwrap();
    let _server = ServerProcess::start(data.path(), &[]);
    let output = mode_status(data.path());
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("mode: NORMAL"));
}
