//! Attack: a policy file with a repeated key (issue 8, item 11). serde_json keeps
//! the last of two equal keys, so a second `NORMAL` block allowing
//! `restart_service`, or a second `scale_fleet` constraint without `max`, passed
//! `policy check` ("valid", exit 0) and the later one was enforced. Now any
//! duplicate key is a load error naming the key and its line, and `policy check`
//! prints the constraints in force.

mod common;

use std::process::{Command, Output};

use common::{AGENT_TOKEN, OPERATOR_TOKEN, policy_path, write_policy};

fn proxi(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(args)
        .env("PROXI_OPERATOR_TOKEN", OPERATOR_TOKEN)
        .env("PROXI_AGENT_TOKEN", AGENT_TOKEN)
        .env("RUST_LOG", "warn")
        .output()
        .expect("proxi runs")
}

const SECOND_NORMAL: &str = r#"{
  "default_mode": "NORMAL",
  "modes": {
    "NORMAL": {"allowed_tools": ["list_services"], "blocked_tools": ["restart_service"]},
    "EMERGENCY": {"allowed_tools": ["restart_service"]},
    "NORMAL": {"allowed_tools": ["list_services", "restart_service"]}
  }
}"#;

const SECOND_CONSTRAINT: &str = r#"{
  "modes": {
    "NORMAL": {"allowed_tools": ["list_services"]},
    "EMERGENCY": {
      "allowed_tools": ["scale_fleet"],
      "constraints": {
        "scale_fleet": {"count": {"min": 1, "max": 10}},
        "scale_fleet": {"count": {"min": 1}}
      }
    }
  }
}"#;

#[test]
fn policy_check_refuses_duplicate_keys_naming_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text, key, within, line) in [
        ("second-normal.json", SECOND_NORMAL, "NORMAL", "`modes`", 6),
        (
            "second-constraint.json",
            SECOND_CONSTRAINT,
            "scale_fleet",
            "`modes.EMERGENCY.constraints`",
            8,
        ),
    ] {
        let path = write_policy(dir.path(), name, text);
        let output = proxi(&["policy", "check", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{name} passed policy check");
        assert!(output.stdout.is_empty(), "nothing reads as valid");
        for expected in [
            name.to_owned(),
            format!("duplicate key `{key}` in {within}"),
            format!("line {line}"),
        ] {
            assert!(
                stderr.contains(&expected),
                "missing {expected:?} in {stderr}"
            );
        }
    }
}

#[test]
fn serve_refuses_to_start_with_a_duplicate_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_policy(dir.path(), "second-normal.json", SECOND_NORMAL);
    let data = dir.path().join("data");
    let output = proxi(&[
        "serve",
        "--bind",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--policy",
        path.to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("duplicate key `NORMAL`"), "{stderr}");
}

#[test]
fn policy_check_prints_the_effective_constraints_and_limits() {
    let output = proxi(&["policy", "check", policy_path().to_str().unwrap()]);
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    for expected in [
        "EMERGENCY: allows list_services, get_service_status, read_logs, restart_service, scale_fleet",
        "scale_fleet.count must be between 1 and 10",
        "NORMAL (default): allows list_services, get_service_status, read_logs",
        "blocks: restart_service, scale_fleet, delete_database",
        "argument constraints: none",
        "rate limits:",
        "each principal, all tools: 50/s, burst 100",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in {stdout}"
        );
    }

    // Without rate_limits, the built-in default is shown as such.
    let dir = tempfile::tempdir().unwrap();
    let path = write_policy(
        dir.path(),
        "no-limits.json",
        r#"{"modes": {"NORMAL": {"allowed_tools": ["read_logs"],
            "constraints": {"read_logs": {"lines": {"max": 50}}}}}}"#,
    );
    let output = proxi(&["policy", "check", path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("read_logs.lines must be at most 50"),
        "{stdout}"
    );
    assert!(
        stdout.contains("rate limits (built-in default: the policy has no rate_limits):"),
        "{stdout}"
    );
}
