//! Attack: the agent floods tool calls (issue 8, item 1) to fill the audit trail
//! and starve everyone else. Before the fix every call ran and was recorded in
//! full: 1,000 calls from 4 clients in 0.7 s, all 200. Now each principal has
//! its own buckets; a call over the limit is refused with 429 `rate_limited`
//! before anything else happens, and its record is small.

mod common;

use std::process::Command;

use common::mcp_client::{call_tool, connect};
use common::{
    AGENT_TOKEN, Api, McpStdio, OPERATOR_TOKEN, ServerProcess, shipped_policy_with_rate_limits,
    write_policy,
};
use proxi::reason::Reason;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Five calls per agent, then one an hour: the refusals are deterministic.
fn tight_policy(dir: &std::path::Path) -> std::path::PathBuf {
    write_policy(
        dir,
        "tight.json",
        &shipped_policy_with_rate_limits(json!([
            {"principal": "*", "tools": "*", "rate": "1/h", "burst": 5},
            {"principal": "agent", "tools": "read_logs", "rate": "1/h", "burst": 1}
        ])),
    )
}

#[tokio::test]
async fn a_flood_is_refused_with_429_and_small_records() {
    let dir = tempfile::tempdir().unwrap();
    let policy = tight_policy(dir.path());
    let data = dir.path().join("data");
    let server = ServerProcess::start_with_policy(&data, &policy, &["--durability", "process"]);
    let api = Api::new(&server.url);

    let big = "x".repeat(60 * 1024);
    let mut statuses = Vec::new();
    let mut refusal = None;
    for call in 0..20 {
        let response = api
            .http
            .post(format!("{}/tools/execute", api.url))
            .bearer_auth(AGENT_TOKEN)
            .json(&json!({"tool_name": "get_service_status", "arguments": {"service_name": big}}))
            .send()
            .await
            .unwrap();
        statuses.push(response.status());
        if response.status() == StatusCode::TOO_MANY_REQUESTS && refusal.is_none() {
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.parse::<u64>().ok());
            refusal = Some((call, retry_after, response.json::<Value>().await.unwrap()));
        }
    }
    let refused = statuses
        .iter()
        .filter(|status| **status == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!(
        refused, 15,
        "burst 5, then nothing for an hour: {statuses:?}"
    );
    let (first_refused, retry_after, body) = refusal.expect("a refusal");
    assert_eq!(first_refused, 5);
    assert_eq!(body["reason_code"], Reason::RateLimited.as_str(), "{body}");
    assert_eq!(body["success"], false);
    let seconds = body["retry_after_seconds"]
        .as_u64()
        .expect("retry_after_seconds");
    assert!((3000..=3600).contains(&seconds), "{body}");
    assert_eq!(retry_after, Some(seconds), "Retry-After matches the body");

    // Every refusal is recorded, small: the tool name, no arguments.
    let records = api.audit(100).await;
    let limited: Vec<&Value> = records
        .iter()
        .filter(|record| record["reason_code"] == Reason::RateLimited.as_str())
        .collect();
    assert_eq!(limited.len(), 15);
    for record in &limited {
        assert_eq!(record["tool"], "get_service_status");
        assert_eq!(record["arguments"], Value::Null, "{record}");
        assert_eq!(record["decision"], "denied");
        assert_eq!(record["principal"], "agent");
        assert!(record.to_string().len() < 1024, "{record}");
    }
}

#[tokio::test]
async fn the_operator_keeps_its_own_bucket_and_its_mode_changes() {
    let dir = tempfile::tempdir().unwrap();
    let policy = tight_policy(dir.path());
    let data = dir.path().join("data");
    let server = ServerProcess::start_with_policy(&data, &policy, &["--durability", "process"]);
    let api = Api::new(&server.url);
    for _ in 0..6 {
        api.execute("list_services", json!({})).await;
    }
    let (status, _) = api.execute("list_services", json!({})).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);

    let (status, body) = api
        .post(
            "/tools/execute",
            Some(OPERATOR_TOKEN),
            json!({"tool_name": "list_services", "arguments": {}}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the operator is not starved: {body}"
    );
    api.emergency().await;
    api.normal().await;
}

#[tokio::test]
async fn tool_rules_limit_only_their_tool() {
    let dir = tempfile::tempdir().unwrap();
    let policy = tight_policy(dir.path());
    let data = dir.path().join("data");
    let server = ServerProcess::start_with_policy(&data, &policy, &["--durability", "process"]);
    let api = Api::new(&server.url);
    let (status, _) = api.execute("read_logs", json!({"lines": 5})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = api.execute("read_logs", json!({"lines": 5})).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    let (status, _) = api.execute("list_services", json!({})).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the read_logs rule leaves other tools alone"
    );
}

#[tokio::test]
async fn the_shipped_limit_lets_a_burst_of_100_through() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &["--durability", "process"]);
    let api = Api::new(&server.url);
    // The bucket starts full and only refills, so the first 100 calls all pass,
    // however fast or slow this machine is.
    for call in 0..100 {
        let (status, body) = api.execute("list_services", json!({})).await;
        assert_eq!(status, StatusCode::OK, "call {call}: {body}");
    }
}

#[tokio::test]
async fn mcp_client_names_and_transports_do_not_buy_fresh_buckets() {
    let dir = tempfile::tempdir().unwrap();
    let policy = tight_policy(dir.path());
    let data = dir.path().join("data");
    let server = ServerProcess::start_with_policy(&data, &policy, &["--durability", "process"]);
    // The agent opens a session under a new client name for each pair of calls,
    // and mixes in REST: the buckets belong to the token holder, not to names.
    let mut results = Vec::new();
    for name in ["a", "b", "c", "d"] {
        let session = connect(&server.url, AGENT_TOKEN, name).await;
        for _ in 0..2 {
            let result = call_tool(&session, "list_services", json!({})).await;
            results.push(serde_json::to_value(&result).unwrap());
        }
        let _ = session.cancel().await;
    }
    let limited: Vec<&Value> = results
        .iter()
        .filter(|result| result["isError"] == true)
        .collect();
    assert_eq!(limited.len(), 3, "burst 5 of 8 calls: {results:?}");
    for result in &limited {
        let refusal = &result["structuredContent"];
        assert_eq!(
            refusal["reason_code"],
            Reason::RateLimited.as_str(),
            "{result}"
        );
        assert!(
            refusal["retry_after_seconds"].as_u64() >= Some(3000),
            "{result}"
        );
    }
    let (status, _) = Api::new(&server.url)
        .execute("list_services", json!({}))
        .await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "REST shares the agent's bucket"
    );
}

#[test]
fn stdio_mcp_calls_over_the_limit_get_an_is_error_result() {
    let dir = tempfile::tempdir().unwrap();
    let policy = tight_policy(dir.path());
    let mut mcp = McpStdio::start(&dir.path().join("data"), &policy, "flood");
    let results: Vec<Value> = (0..8)
        .map(|_| mcp.call_tool("list_services", json!({})))
        .collect();
    let limited = results
        .iter()
        .filter(|result| {
            result["isError"] == true
                && result["structuredContent"]["reason_code"] == Reason::RateLimited.as_str()
        })
        .count();
    assert_eq!(limited, 3, "burst 5 of 8: {results:?}");
    mcp.close();
}

#[test]
fn bad_rate_strings_are_load_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(
        dir.path(),
        "bad-rate.json",
        &shipped_policy_with_rate_limits(json!([
            {"principal": "agent", "tools": "*", "rate": "20 per second", "burst": 40}
        ])),
    );
    for args in [
        vec!["policy", "check", policy.to_str().unwrap()],
        vec![
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--data-dir",
            dir.path().join("data").to_str().unwrap(),
            "--policy",
            policy.to_str().unwrap(),
        ],
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_proxi"))
            .args(&args)
            .env("PROXI_OPERATOR_TOKEN", OPERATOR_TOKEN)
            .env("PROXI_AGENT_TOKEN", AGENT_TOKEN)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{args:?} accepted a bad rate");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("bad-rate.json") && stderr.contains("rate_limits[0].rate"),
            "{stderr}"
        );
    }
}
