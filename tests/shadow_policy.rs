//! `serve --shadow-policy`: every call decided a second time under a candidate,
//! with no effect on the answer; disagreements recorded and counted.

mod common;

use common::{
    Api, OPERATOR_TOKEN, ServerProcess, audit_records, high_rate_limit_policy_path, write_policy,
};
use proxi::canonical::canonical_digest;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// The test policy the server runs.
fn base() -> Value {
    let text = std::fs::read_to_string(high_rate_limit_policy_path()).expect("policy readable");
    serde_json::from_str(&text).expect("policy is JSON")
}

/// The test policy with restart_service allowed in NORMAL.
fn candidate() -> Value {
    let mut policy = base();
    policy["modes"]["NORMAL"]["allowed_tools"]
        .as_array_mut()
        .expect("allowed_tools")
        .push(json!("restart_service"));
    policy["modes"]["NORMAL"]["blocked_tools"] = json!(["scale_fleet", "delete_database"]);
    policy
}

#[tokio::test]
async fn a_shadow_policy_records_and_counts_disagreements_without_changing_answers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let shadow = candidate();
    let shadow_path = write_policy(dir.path(), "shadow.json", &shadow.to_string());
    let data_dir = dir.path().join("data");
    let server = ServerProcess::start_with_policy(
        &data_dir,
        &high_rate_limit_policy_path(),
        &["--shadow-policy", shadow_path.to_str().expect("utf-8")],
    );
    let api = Api::new(&server.url);

    // Both policies allow it: no disagreement.
    let (status, body) = api.execute("list_services", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Denied in force, allowed in the shadow: still denied.
    let (status, body) = api
        .execute("restart_service", json!({"service_name": "web-server"}))
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "the answer is the policy's in force: {body}"
    );
    // Both refuse it (always blocked): no disagreement.
    let (status, _) = api
        .execute("delete_database", json!({"database_name": "users"}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let (status, metrics) = api.get("/metrics", Some(OPERATOR_TOKEN)).await;
    assert_eq!(status, StatusCode::OK);
    let metrics = metrics.as_str().expect("text").to_owned();
    assert!(
        metrics
            .lines()
            .any(|line| line == "proxi_shadow_disagreements_total 1"),
        "{metrics}"
    );

    // On the call's own record, durable before the answer: no record of its own.
    let records = audit_records(&data_dir);
    assert!(
        records.iter().all(|r| r.kind == "tool_call"),
        "{records:#?}"
    );
    let shadowed: Vec<_> = records
        .iter()
        .filter(|r| r.detail.get("shadow_decision").is_some())
        .collect();
    assert_eq!(shadowed.len(), 1, "{records:#?}");
    let call = shadowed[0];
    assert_eq!(call.tool.as_deref(), Some("restart_service"));
    assert_eq!(
        (call.decision.as_str(), call.reason_code.as_deref()),
        ("denied", Some("blocked_in_mode"))
    );
    assert_eq!(
        call.detail["shadow_decision"],
        json!({
            "decision": "allowed",
            "reason_code": null,
            "policy_hash": canonical_digest(&shadow),
            "mode": "NORMAL",
        })
    );
    // A denial's detail is its message: kept beside the shadow's decision.
    assert!(call.detail["detail"].is_string(), "{:#?}", call.detail);
    // The call's own hash stays the policy in force.
    assert_eq!(
        call.policy_hash.as_deref(),
        Some(canonical_digest(&base()).as_str())
    );
    assert_eq!(call.principal, "agent");
}
