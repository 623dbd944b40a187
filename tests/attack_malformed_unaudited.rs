//! Attack: name a tool in a request the server cannot parse, and leave no trace.
//!
//! Before the fix `delete_database` with an extra field, or a 200-byte tool name,
//! got a 400 and no audit record (plain build: 0 records for both). Now a request
//! from a valid token that names a tool is recorded as `rejected`, with the name
//! cut to a bounded prefix. Unauthenticated garbage stays an aggregated refusal.

mod common;

use common::{AGENT_TOKEN, Api, ServerProcess, audit_records};
use proxi::tools::MAX_TOOL_NAME_LEN;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn malformed_requests_that_name_a_tool_are_audited_as_rejected() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = ServerProcess::start(dir.path(), &["--durability", "process"]);
    let api = Api::new(&server.url);

    let (status, _) = api
        .post(
            "/tools/execute",
            Some(AGENT_TOKEN),
            json!({"tool_name": "delete_database", "arguments": {"database_name": "prod"}, "sneaky": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let long_name = "d".repeat(200);
    let (status, _) = api
        .post(
            "/tools/execute",
            Some(AGENT_TOKEN),
            json!({"tool_name": long_name, "arguments": {}}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = api
        .post(
            "/tools/execute",
            Some(AGENT_TOKEN),
            json!({"tool_name": "restart_service", "arguments": "not an object", "context": 5}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = api
        .post(
            "/tools/execute",
            None,
            json!({"tool_name": "delete_database", "extra": true}),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let rejected: Vec<_> = audit_records(&server.data_dir)
        .into_iter()
        .filter(|record| record.kind == "tool_call")
        .collect();
    let tools: Vec<&str> = rejected
        .iter()
        .map(|record| record.tool.as_deref().unwrap_or_default())
        .collect();
    assert_eq!(
        tools,
        [
            "delete_database",
            &long_name[..MAX_TOOL_NAME_LEN],
            "restart_service"
        ],
        "three authenticated requests, three records; none for the anonymous one"
    );
    for record in &rejected {
        assert_eq!(record.principal, "agent");
        assert_eq!(record.outcome, "malformed_request");
        assert_eq!(record.decision, "rejected");
    }
    assert_eq!(rejected[1].detail["tool_name_bytes"], 200);
}

#[tokio::test]
async fn an_oversized_tool_name_over_mcp_is_audited_as_rejected() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = ServerProcess::start(dir.path(), &["--durability", "process"]);
    proxi::tls::install_crypto_provider();
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .expect("client builds");
    let (status, session, _) = common::mcp_post(
        &http,
        &server.url,
        AGENT_TOKEN,
        None,
        common::mcp_initialize_body("long-names"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let session = session.expect("a session id");
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    common::mcp_post(&http, &server.url, AGENT_TOKEN, Some(&session), initialized).await;
    let long_name = "x".repeat(200);
    let call = json!({
        "jsonrpc": "2.0",
        "id": 2,
        "method": "tools/call",
        "params": {"name": long_name, "arguments": {}}
    });
    let (_, _, body) =
        common::mcp_post(&http, &server.url, AGENT_TOKEN, Some(&session), call).await;
    assert!(body.contains("at most 128 bytes"), "{body}");
    let records: Vec<_> = audit_records(&server.data_dir)
        .into_iter()
        .filter(|record| record.kind == "tool_call")
        .collect();
    assert_eq!(records.len(), 1);
    assert_eq!(
        records[0].tool.as_deref(),
        Some(&long_name[..MAX_TOOL_NAME_LEN])
    );
    assert_eq!(records[0].outcome, "malformed_request");
    assert_eq!(records[0].principal, "agent (mcp:long-names)");
}
