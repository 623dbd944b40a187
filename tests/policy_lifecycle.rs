//! Policy versions, `proxi policy diff` and `proxi policy replay`, end to end:
//! the real binary against policy files and a trail written by a real server.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{AGENT_TOKEN, TestServer, policy_path, write_policy};
use proxi::api::AuditRecord;
use proxi::canonical::canonical_digest;
use proxi::reason::Reason;
use reqwest::StatusCode;
use serde_json::{Value, json};

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

fn json_report(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|error| panic!("not JSON ({error}): {}", stdout(output)))
}

fn path(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

const SHIPPED: &str = include_str!("../policies/ops_policy.json");

/// The shipped policy with restart_service allowed in NORMAL and scale_fleet
/// capped at 5 in EMERGENCY.
fn candidate_text() -> String {
    let text = SHIPPED
        .replace(
            r#""allowed_tools": ["list_services", "get_service_status", "read_logs"],
      "blocked_tools": ["restart_service", "scale_fleet", "delete_database"]"#,
            r#""allowed_tools": ["list_services", "get_service_status", "read_logs", "restart_service"],
      "blocked_tools": ["scale_fleet", "delete_database"]"#,
        )
        .replace(r#"{"min": 1, "max": 10}"#, r#"{"min": 1, "max": 5}"#);
    assert_ne!(
        text, SHIPPED,
        "the candidate differs from the shipped policy"
    );
    text
}

#[tokio::test]
async fn status_and_policy_check_show_the_same_policy_hash() {
    let server = TestServer::start().await;
    let (status, body) = server.api().get("/policy/status", Some(AGENT_TOKEN)).await;
    assert_eq!(status, StatusCode::OK);
    let document: Value = serde_json::from_str(SHIPPED).expect("the shipped policy is JSON");
    let expected = canonical_digest(&document);
    assert_eq!(body["policy_hash"], json!(expected));

    let output = proxi(&["policy", "check", path(&policy_path())]);
    assert!(output.status.success(), "{}", stdout(&output));
    assert!(
        stdout(&output).contains(&format!("\n  policy_hash: {expected}\n")),
        "{}",
        stdout(&output)
    );

    // Reformatting the file (key order, whitespace) keeps the version.
    let dir = tempfile::tempdir().expect("temp dir");
    let compact = write_policy(
        dir.path(),
        "compact.json",
        &serde_json::to_string(&document).expect("serializable"),
    );
    let output = proxi(&["policy", "check", path(&compact)]);
    assert!(stdout(&output).contains(&format!("  policy_hash: {expected}\n")));
}

#[test]
fn policy_diff_lists_each_changed_decision_and_exits_1() {
    let dir = tempfile::tempdir().expect("temp dir");
    let candidate = write_policy(dir.path(), "candidate.json", &candidate_text());
    let output = proxi(&["policy", "diff", path(&policy_path()), path(&candidate)]);
    assert_eq!(
        stdout(&output),
        "EMERGENCY scale_fleet: constraints changed\n\
         \x20   - `count` must be between 1 and 10\n\
         \x20   + `count` must be between 1 and 5\n\
         NORMAL restart_service: newly allowed (was blocked_in_mode)\n\
         2 changes\n"
    );
    assert_eq!(output.status.code(), Some(1));

    let output = proxi(&[
        "policy",
        "diff",
        path(&policy_path()),
        path(&candidate),
        "--json",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let report: Value = json_report(&output);
    assert_eq!(
        report["decisions"][1],
        json!({
            "mode": "NORMAL",
            "tool": "restart_service",
            "change": "newly_allowed",
            "old": {"allowed": false, "reason": Reason::BlockedInMode.as_str(), "constraints": []},
            "new": {"allowed": true, "reason": null, "constraints": []},
        })
    );

    let output = proxi(&["policy", "diff", path(&policy_path()), path(&policy_path())]);
    assert_eq!(stdout(&output), "no changes\n");
    assert_eq!(output.status.code(), Some(0));
}

#[test]
fn policy_diff_of_an_invalid_policy_fails_with_its_problem() {
    let dir = tempfile::tempdir().expect("temp dir");
    let broken = write_policy(dir.path(), "broken.json", r#"{"modes": {}}"#);
    let output = proxi(&["policy", "diff", path(&policy_path()), path(&broken)]);
    assert!(!output.status.success());
    assert!(output.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("at least one mode"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Seven calls: three in NORMAL, then four in EMERGENCY. Returns the tool-call
/// records the server wrote.
async fn known_trail(server: &TestServer) -> Vec<AuditRecord> {
    let api = server.api();
    api.execute("list_services", json!({})).await;
    api.execute("restart_service", json!({"service_name": "web-server"}))
        .await;
    api.execute("scale_fleet", json!({"count": 3})).await;
    server.emergency().await;
    api.execute("scale_fleet", json!({"count": 8})).await;
    api.execute("restart_service", json!({"service_name": "web-server"}))
        .await;
    api.execute("delete_database", json!({"db_name": "orders"}))
        .await;
    api.execute("no_such_tool", json!({})).await;
    let calls = server.tool_calls().await;
    // Every decision names the policy that made it.
    let version = canonical_digest(&serde_json::from_str(SHIPPED).expect("JSON"));
    assert!(
        calls
            .iter()
            .all(|record| record.policy_hash.as_deref() == Some(version.as_str())),
        "{calls:?}"
    );
    let decisions: Vec<(&str, &str, &str)> = calls
        .iter()
        .map(|record| {
            (
                record.tool.as_deref().unwrap_or("-"),
                record.mode.as_str(),
                record.decision.as_str(),
            )
        })
        .collect();
    assert_eq!(
        decisions,
        [
            ("list_services", "NORMAL", "allowed"),
            ("restart_service", "NORMAL", "denied"),
            ("scale_fleet", "NORMAL", "denied"),
            ("scale_fleet", "EMERGENCY", "allowed"),
            ("restart_service", "EMERGENCY", "allowed"),
            ("delete_database", "EMERGENCY", "denied"),
            ("no_such_tool", "EMERGENCY", "rejected"),
        ]
    );
    calls
}

#[tokio::test]
async fn replay_decides_the_trail_again_in_the_recorded_modes() {
    let server = TestServer::start().await;
    let calls = known_trail(&server).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let candidate = write_policy(dir.path(), "candidate.json", &candidate_text());
    let data_dir = path(server.data_dir());

    let output = proxi(&[
        "policy",
        "replay",
        "--candidate",
        path(&candidate),
        "--data-dir",
        data_dir,
    ]);
    assert!(output.status.success(), "{}", stdout(&output));
    let (restart, scale) = (&calls[1], &calls[3]);
    assert_eq!(
        stdout(&output),
        format!(
            "replayed 7 tool calls\n\
             recorded:  allowed 3, denied 3, rejected 1\n\
             candidate: allowed 3, denied 3, rejected 1\n\
             newly denied: 1\n\
             \x20 #{} {} agent scale_fleet in EMERGENCY: allowed -> denied (constraint_violated)\n\
             newly allowed: 1\n\
             \x20 #{} {} agent restart_service in NORMAL: denied (blocked_in_mode) -> allowed\n",
            scale.seq, scale.time, restart.seq, restart.time
        )
    );

    // --since keeps only the EMERGENCY calls; --json carries the same report.
    let output = proxi(&[
        "policy",
        "replay",
        "--candidate",
        path(&candidate),
        "--data-dir",
        data_dir,
        "--since",
        &scale.time,
        "--json",
    ]);
    assert!(output.status.success(), "{}", stdout(&output));
    let report: Value = json_report(&output);
    assert_eq!(report["replayed"], 4);
    assert_eq!(
        report["recorded"],
        json!({"allowed": 2, "denied": 1, "rejected": 1})
    );
    assert_eq!(report["newly_allowed_count"], 0);
    assert_eq!(report["newly_denied"][0]["seq"], scale.seq);
    assert_eq!(
        report["newly_denied"][0]["candidate"],
        "denied (constraint_violated)"
    );
}

#[tokio::test]
async fn replay_under_a_policy_without_the_recorded_mode_uses_its_default_mode() {
    let server = TestServer::start().await;
    known_trail(&server).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let normal_only = write_policy(
        dir.path(),
        "normal_only.json",
        r#"{"modes": {"NORMAL": {"allowed_tools": ["list_services", "scale_fleet"]}}}"#,
    );
    let output = proxi(&[
        "policy",
        "replay",
        "--candidate",
        path(&normal_only),
        "--data-dir",
        path(server.data_dir()),
        "--json",
    ]);
    assert!(output.status.success(), "{}", stdout(&output));
    let report: Value = json_report(&output);
    assert_eq!(report["mode_missing"], 4);
    assert_eq!(
        report["candidate"],
        json!({"allowed": 3, "denied": 3, "rejected": 1})
    );
    // scale_fleet(3) in NORMAL is newly allowed; the EMERGENCY restart newly denied.
    let tools = |list: &Value| -> Vec<(String, String)> {
        list.as_array()
            .expect("a list")
            .iter()
            .map(|call| {
                (
                    call["tool"].as_str().unwrap_or_default().to_owned(),
                    call["mode"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    };
    assert_eq!(
        tools(&report["newly_allowed"]),
        [("scale_fleet".to_owned(), "NORMAL".to_owned())]
    );
    assert_eq!(
        tools(&report["newly_denied"]),
        [("restart_service".to_owned(), "EMERGENCY".to_owned())]
    );
}
