//! Issue 8, item 10: startup restored a mode from a record that did not verify, and
//! for longer than the policy allows.
//!
//! Before the fix, an old mode-change record edited to expire in 6 days (under a cap
//! of 3600 s) came back as a 6-day EMERGENCY, although `audit verify` called it broken;
//! and lowering the cap did not shorten a live emergency. Now startup checks the chain
//! from the record it restores to the end, falls back to the default mode and records
//! why; and the time left is capped at the current `max_emergency_ttl_seconds`.

mod common;

use std::path::Path;
use std::process::Command;

use chrono::{DateTime, Utc};
use common::{AGENT_TOKEN, Api, ServerProcess, policy_path};
use proxi::audit::AUDIT_DB_FILE;
use reqwest::StatusCode;
use serde_json::{Value, json};

fn verify(data_dir: &Path) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(["audit", "verify", "--data-dir"])
        .arg(data_dir)
        .output()
        .expect("proxi runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

fn expires_at(status: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(status["emergency_expires_at"].as_str().expect("an expiry"))
        .expect("RFC 3339")
        .with_timezone(&Utc)
}

#[tokio::test]
async fn an_old_mode_change_edited_to_last_six_days_is_not_restored() {
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(data.path(), &[]);
    let api = Api::new(&server.url);
    let (status, _) = api.set_mode("EMERGENCY", Some("incident"), Some(600)).await;
    assert_eq!(status, StatusCode::OK);
    api.execute("list_services", json!({})).await;
    server.kill();

    let six_days = (Utc::now() + chrono::Duration::days(6)).format("%Y-%m-%dT%H:%M:%S%.6fZ");
    rusqlite::Connection::open(data.path().join(AUDIT_DB_FILE))
        .unwrap()
        .execute(
            &format!("UPDATE audit_log SET expires_at = '{six_days}' WHERE kind = 'mode_change'"),
            [],
        )
        .unwrap();
    let (ok, output) = verify(data.path());
    assert!(!ok, "{output}");

    let server = ServerProcess::start(data.path(), &[]);
    let api = Api::new(&server.url);
    let (_, status) = api.get("/policy/status", Some(AGENT_TOKEN)).await;
    assert_eq!(
        status["mode"], "NORMAL",
        "restored from a forged record: {status}"
    );
    let (code, _) = api
        .execute("restart_service", json!({"service_name": "web-server"}))
        .await;
    assert_eq!(code, StatusCode::FORBIDDEN);
    let refusal = api
        .audit(10)
        .await
        .into_iter()
        .find(|record| record["outcome"] == "not_restored")
        .expect("the refusal to restore is recorded");
    assert_eq!(refusal["principal"], "system");
    assert_eq!(refusal["mode"], "NORMAL");
    let reason = refusal["detail"]["reason"].as_str().unwrap();
    assert!(reason.contains("does not verify"), "{reason}");
}

#[tokio::test]
async fn lowering_the_cap_and_restarting_shortens_a_live_emergency() {
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(data.path(), &[]);
    let api = Api::new(&server.url);
    let (status, before) = api
        .set_mode("EMERGENCY", Some("long incident"), Some(3600))
        .await;
    assert_eq!(status, StatusCode::OK);
    server.kill();

    let policies = tempfile::tempdir().unwrap();
    let capped = policies.path().join("cap60.json");
    let text = std::fs::read_to_string(policy_path()).unwrap();
    assert!(text.contains("\"max_emergency_ttl_seconds\": 3600"));
    std::fs::write(
        &capped,
        text.replace(
            "\"max_emergency_ttl_seconds\": 3600",
            "\"max_emergency_ttl_seconds\": 60",
        ),
    )
    .unwrap();
    let capped = capped.to_str().unwrap();

    let restarted_at = Utc::now();
    let server = ServerProcess::start(data.path(), &["--policy", capped]);
    let api = Api::new(&server.url);
    let (_, after) = api.get("/policy/status", Some(AGENT_TOKEN)).await;
    assert_eq!(after["mode"], "EMERGENCY");
    assert_eq!(after["reason"], "long incident");
    let deadline = expires_at(&after);
    assert!(deadline < expires_at(&before));
    assert!(
        deadline <= Utc::now() + chrono::Duration::seconds(60)
            && deadline >= restarted_at + chrono::Duration::seconds(59),
        "capped to 60 s from the restart, got {deadline}"
    );
    server.kill();

    // The cap is recorded, so another restart does not hand out a fresh 60 s.
    let server = ServerProcess::start(data.path(), &["--policy", capped]);
    let api = Api::new(&server.url);
    let (_, again) = api.get("/policy/status", Some(AGENT_TOKEN)).await;
    assert_eq!(again["mode"], "EMERGENCY");
    assert_eq!(expires_at(&again), deadline);
    let capped_records = api
        .audit(20)
        .await
        .into_iter()
        .filter(|record| record["outcome"] == "restored_capped")
        .count();
    assert_eq!(capped_records, 1);
    let (ok, output) = verify(data.path());
    assert!(ok, "{output}");
}
