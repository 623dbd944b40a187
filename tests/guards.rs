//! Stateful SRE guards, end to end: cooldown per service, `requires_prior`,
//! `max_step` against the fleet size, the state rebuilt after a restart, and
//! `policy check` refusing bad guards.

mod common;

use std::process::Command;

use common::{Api, ServerProcess, high_rate_limit_policy_path, write_policy};
use reqwest::StatusCode;
use serde_json::{Value, json};

fn guarded_policy() -> Value {
    let text = std::fs::read_to_string(high_rate_limit_policy_path()).expect("policy readable");
    let mut policy: Value = serde_json::from_str(&text).expect("policy is JSON");
    policy["modes"]["EMERGENCY"]["guards"] = json!({
        "restart_service": {
            "cooldown_seconds": 120,
            "per": "service_name",
            "requires_prior": {"tool": "get_service_status", "same": "service_name", "within_seconds": 300}
        },
        "scale_fleet": {"max_step": 2}
    });
    policy
}

fn restart(service: &str) -> (&'static str, Value) {
    ("restart_service", json!({"service_name": service}))
}

async fn call(api: &Api, (tool, arguments): (&str, Value)) -> (StatusCode, Value) {
    api.execute(tool, arguments).await
}

#[tokio::test]
async fn guards_refuse_with_a_hint_and_their_state_survives_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let policy = write_policy(dir.path(), "guarded.json", &guarded_policy().to_string());
    let data_dir = dir.path().join("data");
    let server = ServerProcess::start_with_policy(&data_dir, &policy, &[]);
    let api = Api::new(&server.url);
    api.emergency().await;

    // requires_prior: nobody looked at web-server yet.
    let (status, body) = call(&api, restart("web-server")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["reason_code"], "requires_prior");
    assert_eq!(body["policy_violation"], true);
    assert!(
        body["how_to_proceed"]
            .as_str()
            .expect("hint")
            .contains("get_service_status"),
        "{body}"
    );

    let (status, _) = call(
        &api,
        ("get_service_status", json!({"service_name": "web-server"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = call(&api, restart("web-server")).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // cooldown: the same service again is refused, with the time left.
    let (status, body) = call(&api, restart("web-server")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["reason_code"], "cooldown");
    let left = body["retry_after_seconds"]
        .as_u64()
        .expect("retry_after_seconds");
    assert!((100..=120).contains(&left), "{body}");
    assert!(
        body["error"].as_str().expect("error").contains("s left"),
        "{body}"
    );
    // Another service has its own cooldown (after its own look).
    let (status, _) = call(
        &api,
        ("get_service_status", json!({"service_name": "database"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = call(&api, restart("database")).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // max_step: the fleet is 3; 6 is a step of 3, 5 a step of 2.
    let (status, body) = call(&api, ("scale_fleet", json!({"count": 6}))).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["reason_code"], "step_too_large");
    assert!(
        body["how_to_proceed"]
            .as_str()
            .expect("hint")
            .contains("between 1 and 5"),
        "{body}"
    );
    let (status, body) = call(&api, ("scale_fleet", json!({"count": 5}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // After a restart the cooldown still holds: the state is rebuilt from the trail.
    assert!(server.terminate().success());
    let server = ServerProcess::start_with_policy(&data_dir, &policy, &[]);
    let api = Api::new(&server.url);
    let (_, status) = api.get("/policy/status", Some(common::AGENT_TOKEN)).await;
    assert_eq!(status["mode"], "EMERGENCY", "the mode is restored too");
    let (status, body) = call(&api, restart("web-server")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["reason_code"], "cooldown");
    // And the prior look at cache was never made, before or after.
    let (status, body) = call(&api, restart("cache")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["reason_code"], "requires_prior");
}

#[test]
fn policy_check_refuses_bad_guards() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut policy = guarded_policy();
    policy["modes"]["EMERGENCY"]["guards"]["restart_service"]["max_step"] = json!(1);
    policy["modes"]["NORMAL"]["guards"] = json!({"no_such_tool": {"cooldown_seconds": 5}});
    let path = write_policy(dir.path(), "bad.json", &policy.to_string());
    let output = Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(["policy", "check"])
        .arg(&path)
        .output()
        .expect("proxi runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "modes.EMERGENCY.guards.restart_service: max_step needs the tool's current value"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("modes.NORMAL.guards"), "{stderr}");
}

/// Before, `policy check` listed a mode's constraints and approval rules but not
/// its guards, so a reader could not see them without reading the file.
#[test]
fn policy_check_lists_each_modes_guards() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write_policy(dir.path(), "guarded.json", &guarded_policy().to_string());
    let output = Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(["policy", "check"])
        .arg(&path)
        .output()
        .expect("proxi runs");
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    let emergency = stdout
        .split("  NORMAL")
        .find(|part| part.contains("EMERGENCY: allows"))
        .expect("an EMERGENCY section");
    assert!(
        emergency.contains(
            "    guard: restart_service: cooldown 120 s per service_name, requires_prior get_service_status (same service_name) within 300 s\n"
        ),
        "{stdout}"
    );
    assert!(
        emergency.contains("    guard: scale_fleet: max_step 2\n"),
        "{stdout}"
    );
    assert_eq!(
        stdout.matches("guard:").count(),
        2,
        "NORMAL has none: {stdout}"
    );
}

#[test]
fn policy_diff_shows_guard_changes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let guarded = write_policy(dir.path(), "guarded.json", &guarded_policy().to_string());
    let output = Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(["policy", "diff"])
        .arg(high_rate_limit_policy_path())
        .arg(&guarded)
        .output()
        .expect("proxi runs");
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "modes.EMERGENCY.guards: + restart_service: cooldown 120 s per service_name, requires_prior get_service_status (same service_name) within 300 s\n\
         modes.EMERGENCY.guards: + scale_fleet: max_step 2\n\
         2 changes\n"
    );
}
