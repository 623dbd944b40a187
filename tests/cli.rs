//! The `proxi` command line: policy checks, explanations, audit tools and mode control.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{ServerProcess, policy_path};
use proxi::reason::Reason;

fn proxi(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(args)
        .env_remove("PROXI_OPERATOR_TOKEN")
        .env_remove("PROXI_AGENT_TOKEN")
        .env_remove("PROXI_SERVER")
        .output()
        .expect("proxi runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn path(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

#[test]
fn policy_check_accepts_the_shipped_policy() {
    let output = proxi(&["policy", "check", path(&policy_path())]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("valid"), "{text}");
    assert!(text.contains("NORMAL (default): allows list_services, get_service_status, read_logs"));
    assert!(text.contains("always blocked: delete_database"));
}

#[test]
fn policy_check_names_the_file_and_the_problems() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.json");
    std::fs::write(
        &file,
        r#"{"default_mode": "CALM", "modes": {"NORMAL": {"allowed_tools": ["reboot_everything"]}}}"#,
    )
    .unwrap();
    let output = proxi(&["policy", "check", path(&file)]);
    assert!(!output.status.success());
    let text = stderr(&output);
    assert!(text.contains(path(&file)), "{text}");
    assert!(
        text.contains("no tool is named 'reboot_everything'"),
        "{text}"
    );
    assert!(
        text.contains("default_mode 'CALM' is not a defined mode"),
        "{text}"
    );

    std::fs::write(&file, "{ not json").unwrap();
    let output = proxi(&["policy", "check", path(&file)]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("not a valid policy document"));

    let output = proxi(&["policy", "check", "/no/such/policy.json"]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("cannot read the policy file"));
}

#[test]
fn policy_explain_prints_the_decision_and_why() {
    let policy = policy_path();
    let output = proxi(&[
        "policy",
        "explain",
        "restart_service",
        "--mode",
        "NORMAL",
        "--policy",
        path(&policy),
        "--args",
        r#"{"service_name":"web-server"}"#,
    ]);
    assert_eq!(output.status.code(), Some(1));
    let text = stdout(&output);
    assert!(
        text.contains("DENIED") && text.contains(Reason::BlockedInMode.as_str()),
        "{text}"
    );
    assert!(text.contains("EMERGENCY"), "{text}");

    let output = proxi(&[
        "policy",
        "explain",
        "restart_service",
        "--mode",
        "emergency",
        "--policy",
        path(&policy),
        "--args",
        r#"{"service_name":"web-server"}"#,
    ]);
    assert!(output.status.success(), "{}", stdout(&output));
    assert!(stdout(&output).contains("ALLOWED"));

    let output = proxi(&[
        "policy",
        "explain",
        "scale_fleet",
        "--mode",
        "EMERGENCY",
        "--policy",
        path(&policy),
        "--args",
        r#"{"count": 50}"#,
    ]);
    assert!(
        stdout(&output).contains(Reason::ConstraintViolated.as_str()),
        "{}",
        stdout(&output)
    );
    let output = proxi(&[
        "policy",
        "explain",
        "scale_fleet",
        "--mode",
        "EMERGENCY",
        "--policy",
        path(&policy),
        "--args",
        r#"{"count": -1}"#,
    ]);
    assert!(
        stdout(&output).contains(Reason::InvalidArguments.as_str()),
        "{}",
        stdout(&output)
    );
    let output = proxi(&[
        "policy",
        "explain",
        "delete_database",
        "--mode",
        "EMERGENCY",
        "--policy",
        path(&policy),
        "--args",
        r#"{"db_name": "database"}"#,
    ]);
    assert!(stdout(&output).contains(Reason::AlwaysBlocked.as_str()));
    let output = proxi(&[
        "policy",
        "explain",
        "summon_root",
        "--policy",
        path(&policy),
    ]);
    assert!(stdout(&output).contains(Reason::UnknownTool.as_str()));
    let output = proxi(&[
        "policy",
        "explain",
        "list_services",
        "--mode",
        "PANIC",
        "--policy",
        path(&policy),
    ]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("unknown mode 'PANIC'"));
}

#[tokio::test]
async fn mode_commands_drive_a_running_server_and_audit_tools_read_its_trail() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = path(dir.path()).to_owned();
    // No tokens configured: the server generates them and the CLI finds them in the data dir.
    let mut child = Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args([
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--data-dir",
            &data_dir,
            "--policy",
            path(&policy_path()),
        ])
        .env_remove("PROXI_OPERATOR_TOKEN")
        .env_remove("PROXI_AGENT_TOKEN")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    common::wait_until("server.json", std::time::Duration::from_secs(30), || {
        proxi::server::ServerInfo::read(dir.path()).filter(|info| info.pid == pid)
    });

    let output = proxi(&["mode", "status", "--data-dir", &data_dir]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("mode: NORMAL"));

    let output = proxi(&[
        "mode",
        "set",
        "EMERGENCY",
        "--reason",
        "cli drill",
        "--ttl",
        "15m",
        "--data-dir",
        &data_dir,
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(
        text.contains("mode: EMERGENCY") && text.contains("expires at:"),
        "{text}"
    );

    let output = proxi(&[
        "mode",
        "set",
        "EMERGENCY",
        "--reason",
        "too long",
        "--ttl",
        "2h",
        "--data-dir",
        &data_dir,
    ]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("3600"), "{}", stderr(&output));
    let output = proxi(&[
        "mode",
        "set",
        "EMERGENCY",
        "--ttl",
        "soon",
        "--data-dir",
        &data_dir,
    ]);
    assert!(!output.status.success());

    let output = proxi(&["mode", "set", "NORMAL", "--data-dir", &data_dir]);
    assert!(output.status.success(), "{}", stderr(&output));

    let output = proxi(&["audit", "tail", "--data-dir", &data_dir, "-n", "5"]);
    assert!(output.status.success());
    let text = stdout(&output);
    assert!(
        text.contains("mode_change") && text.contains("operator"),
        "{text}"
    );
    let output = proxi(&[
        "audit",
        "tail",
        "--data-dir",
        &data_dir,
        "-n",
        "1",
        "--json",
    ]);
    let record: serde_json::Value = serde_json::from_str(stdout(&output).trim()).unwrap();
    assert_eq!(record["mode"], "NORMAL");
    assert_eq!(record["kind"], "mode_change");
    // A kind no record can have is an error, not an empty (and reassuring) answer.
    let output = proxi(&[
        "audit",
        "tail",
        "--data-dir",
        &data_dir,
        "--kind",
        "mode-change",
    ]);
    assert!(!output.status.success(), "{}", stdout(&output));
    assert!(
        stderr(&output).contains("unknown kind \"mode-change\"; the kinds are tool_call"),
        "{}",
        stderr(&output)
    );

    let output = proxi(&["audit", "verify", "--data-dir", &data_dir]);
    assert!(output.status.success(), "{}", stdout(&output));
    assert!(stdout(&output).contains("audit trail OK: 2 records"));
    // The JSON report is one valid document (its pretty-printing layout was once
    // escaped into `\u000a`, which no JSON parser accepts).
    let output = proxi(&["audit", "verify", "--data-dir", &data_dir, "--json"]);
    assert!(output.status.success(), "{}", stdout(&output));
    let report: serde_json::Value = serde_json::from_str(stdout(&output).trim())
        .unwrap_or_else(|e| panic!("audit verify --json is not JSON ({e}): {}", stdout(&output)));
    assert_eq!(report["records"], 2);
    assert_eq!(report["first_bad"], serde_json::Value::Null);
    child.kill().unwrap();
    child.wait().unwrap();

    // Tampering is caught and the first bad record is named.
    rusqlite::Connection::open(dir.path().join("audit.db"))
        .unwrap()
        .execute("UPDATE audit_log SET principal = 'agent' WHERE seq = 1", [])
        .unwrap();
    let output = proxi(&["audit", "verify", "--data-dir", &data_dir]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stdout(&output).contains("BROKEN at record 1"),
        "{}",
        stdout(&output)
    );
}

#[test]
fn mode_commands_fail_clearly_without_a_server_or_token() {
    let dir = tempfile::tempdir().unwrap();
    let output = proxi(&["mode", "status", "--data-dir", path(dir.path())]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("no operator token"),
        "{}",
        stderr(&output)
    );

    let server = ServerProcess::start(dir.path(), &[]);
    let output = Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(["mode", "status", "--server", &server.url])
        .env("PROXI_OPERATOR_TOKEN", "wrong-token-but-long-enough")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(stderr(&output).contains("401"), "{}", stderr(&output));
    server.kill();
    let output = Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(["mode", "status", "--server", "http://127.0.0.1:9"])
        .env("PROXI_OPERATOR_TOKEN", "any-token-long-enough-123")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("cannot reach"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn audit_commands_report_a_missing_trail() {
    let dir = tempfile::tempdir().unwrap();
    let output = proxi(&["audit", "verify", "--data-dir", path(dir.path())]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("no audit database"),
        "{}",
        stderr(&output)
    );
}
