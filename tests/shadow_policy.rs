//! `serve --shadow-policy`: every call decided a second time under a candidate,
//! with no effect on the answer; disagreements recorded and counted.

mod common;

use std::time::Duration;

use common::{
    Api, OPERATOR_TOKEN, ServerProcess, audit_records, high_rate_limit_policy_path, wait_until,
    write_policy,
};
use proxi::canonical::canonical_digest;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// The test policy with restart_service allowed in NORMAL.
fn candidate() -> Value {
    let text = std::fs::read_to_string(high_rate_limit_policy_path()).expect("policy readable");
    let mut policy: Value = serde_json::from_str(&text).expect("policy is JSON");
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

    // Queued without waiting, so it may land just after the answer.
    let records = wait_until("the shadow record", Duration::from_secs(10), || {
        let records = audit_records(&data_dir);
        records
            .iter()
            .any(|r| r.kind == "shadow_decision")
            .then_some(records)
    });
    let shadowed: Vec<_> = records
        .iter()
        .filter(|r| r.kind == "shadow_decision")
        .collect();
    assert_eq!(shadowed.len(), 1, "{records:#?}");
    let record = shadowed[0];
    let call = records
        .iter()
        .find(|r| json!(r.seq) == record.detail["call_seq"])
        .expect("the shadow record names the call's record");
    assert_eq!(call.tool.as_deref(), Some("restart_service"));
    assert_eq!(call.decision, "denied");
    assert_eq!(
        record.detail["decision"],
        json!({"decision": "denied", "reason_code": "blocked_in_mode"})
    );
    assert_eq!(
        record.detail["shadow_decision"],
        json!({"decision": "allowed", "reason_code": null})
    );
    assert_eq!(
        record.policy_hash.as_deref(),
        Some(canonical_digest(&shadow).as_str())
    );
    assert_eq!(record.principal, "agent");
}
