//! Logs on stderr: no ANSI colour codes when stderr is a pipe or a file, and
//! `--log-format json` gives one JSON object per line for log shippers.

mod common;

use std::io::Read;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Api, ServerProcess, policy_path, wait_until};
use reqwest::StatusCode;
use serde_json::Value;

/// Starts `proxi serve` with stderr to a pipe and info logging, plus `extra` flags.
fn serve(data_dir: &std::path::Path, extra: &[&str]) -> ServerProcess {
    let mut command = ServerProcess::command(data_dir, Some(&policy_path()));
    command
        .args(["--durability", "process"])
        .args(extra)
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR");
    ServerProcess::spawn(command, data_dir)
}

/// Makes the server log at run time (an elevated mode lapsing is an info event),
/// stops it with SIGTERM, and returns everything it wrote to stderr.
async fn run_and_collect_stderr(extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut server = serve(dir.path(), extra);
    let collected = Arc::new(Mutex::new(String::new()));
    let reader = {
        let mut pipe = server.child.stderr.take().expect("stderr is piped");
        let collected = collected.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(read @ 1..) = pipe.read(&mut chunk) {
                let text = String::from_utf8_lossy(&chunk[..read]).into_owned();
                collected.lock().unwrap().push_str(&text);
            }
        })
    };
    let api = Api::new(&server.url);
    let (status, body) = api.set_mode("EMERGENCY", Some("log test"), Some(1)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_until("the lapse to be logged", Duration::from_secs(30), || {
        collected
            .lock()
            .unwrap()
            .contains("elevated mode lapsed")
            .then_some(())
    });
    let status = server.terminate();
    reader.join().expect("the reader ends with the pipe");
    let stderr = collected.lock().unwrap().clone();
    assert!(
        status.success(),
        "proxi serve ended with {status}:\n{stderr}"
    );
    stderr
}

#[tokio::test]
async fn logs_to_a_pipe_carry_no_colour_codes() {
    let stderr = run_and_collect_stderr(&[]).await;
    assert!(stderr.contains("elevated mode lapsed"), "{stderr}");
    assert!(stderr.contains("shutting down"), "{stderr}");
    assert!(
        !stderr.contains('\u{1b}'),
        "stderr is a pipe, yet it has ANSI escapes:\n{stderr:?}"
    );
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let stderr = run_and_collect_stderr(&["--log-format", "json"]).await;
    let events: Vec<Value> = stderr
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|error| panic!("not JSON ({error}): {line:?}\n{stderr}"))
        })
        .collect();
    let message = |event: &Value| event["fields"]["message"].as_str().map(str::to_owned);
    let banner = events
        .iter()
        .find(|event| message(event).is_some_and(|m| m.contains("listening")))
        .unwrap_or_else(|| panic!("no banner event:\n{stderr}"));
    assert_eq!(banner["level"], "INFO");
    assert_eq!(banner["fields"]["mode"], "NORMAL");
    assert!(banner["fields"]["policy"].is_string(), "{banner}");
    for expected in ["elevated mode lapsed", "shutting down"] {
        assert!(
            events
                .iter()
                .any(|event| message(event).is_some_and(|m| m.contains(expected))),
            "no {expected:?} event:\n{stderr}"
        );
    }
}

#[test]
fn a_failing_command_reports_its_error_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(["--log-format", "json", "serve", "--policy", "no-such.json"])
        .arg("--data-dir")
        .arg(dir.path())
        .env_remove("RUST_LOG")
        .output()
        .expect("proxi runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "nothing on stderr");
    for line in lines {
        let event: Value = serde_json::from_str(line)
            .unwrap_or_else(|error| panic!("not JSON ({error}): {line:?}"));
        assert_eq!(event["level"], "ERROR", "{event}");
        assert!(
            event["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("cannot read the policy file")),
            "{event}"
        );
    }
}
