//! Helpers for the approval tests: a policy whose EMERGENCY mode asks for
//! approvals, and the operator's side of the approval endpoints.

use std::path::{Path, PathBuf};

use reqwest::StatusCode;
use serde_json::{Value, json};

use super::{Api, OPERATOR_TOKEN};

/// The shipped policy, with EMERGENCY asking for approval of `scale_fleet` with
/// `count` ≥ 6 and of every `restart_service`, approvals lasting `ttl_seconds`,
/// elevation requests on, and rate limits no test reaches.
pub fn approval_policy_text(ttl_seconds: u64, description: &str) -> String {
    let text = std::fs::read_to_string(super::policy_path()).expect("read the shipped policy");
    let mut policy: Value = serde_json::from_str(&text).expect("the shipped policy is JSON");
    policy["description"] = description.into();
    policy["elevation_requests"] = true.into();
    policy["rate_limits"] =
        json!([{"principal": "*", "tools": "*", "rate": "10000/s", "burst": 10000}]);
    let emergency = &mut policy["modes"]["EMERGENCY"];
    emergency["require_approval"] = json!({
        "scale_fleet": {"count": {"min": 6}},
        "restart_service": {}
    });
    emergency["approval_ttl_seconds"] = ttl_seconds.into();
    policy.to_string()
}

/// Writes [`approval_policy_text`] into `dir` and returns its path.
pub fn write_approval_policy(dir: &Path, ttl_seconds: u64, description: &str) -> PathBuf {
    super::write_policy(
        dir,
        "approval_policy.json",
        &approval_policy_text(ttl_seconds, description),
    )
}

/// `POST /approvals/{id}/{verdict}` with the operator token.
pub async fn decide(api: &Api, id: &str, verdict: &str, reason: &str) -> (StatusCode, Value) {
    api.post(
        &format!("/approvals/{id}/{verdict}"),
        Some(OPERATOR_TOKEN),
        json!({ "reason": reason }),
    )
    .await
}

/// The ids `GET /approvals?status=<status>` lists (operator token).
pub async fn listed(api: &Api, status: &str) -> Vec<String> {
    let (code, body) = api
        .get(&format!("/approvals?status={status}"), Some(OPERATOR_TOKEN))
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    body["approvals"]
        .as_array()
        .expect("approvals")
        .iter()
        .map(|approval| approval["id"].as_str().expect("id").to_owned())
        .collect()
}

/// Asks for `scale_fleet` with `count` as the agent and expects a 202 that
/// waits for approval; returns the approval id.
pub async fn request_scale(api: &Api, count: u64) -> String {
    let (status, body) = api.execute("scale_fleet", json!({ "count": count })).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["success"], false, "{body}");
    assert_eq!(body["approval_required"], true, "{body}");
    assert_eq!(body["reason_code"], "approval_required", "{body}");
    body["approval_id"]
        .as_str()
        .expect("approval_id")
        .to_owned()
}
