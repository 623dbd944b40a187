//! The policy's tool-level rules come before argument checks (issue 11, item 8):
//! a tool blocked in the mode, called with wrong arguments, is `denied
//! blocked_in_mode`, not `invalid_arguments`. The model hears the truth first, and
//! a caller who may not use a tool learns nothing about its schema. Argument
//! constraints still come after schema validation. Before: 422
//! `invalid_arguments` for `restart_service {"service_name": 5}` in NORMAL.

mod common;

use common::{McpStdio, TestServer, policy_path};
use proxi::reason::Reason;
use reqwest::StatusCode;
use serde_json::{Value, json};

#[tokio::test]
async fn tool_level_denials_come_before_schema_errors() {
    let server = TestServer::start().await;
    let api = server.api();
    let cases: [(&str, Value, StatusCode, &str); 4] = [
        (
            "restart_service",
            json!({"service_name": 5}),
            StatusCode::FORBIDDEN,
            Reason::BlockedInMode.as_str(),
        ),
        (
            "restart_service",
            json!({"unexpected": true}),
            StatusCode::FORBIDDEN,
            Reason::BlockedInMode.as_str(),
        ),
        (
            "delete_database",
            json!({}),
            StatusCode::FORBIDDEN,
            Reason::AlwaysBlocked.as_str(),
        ),
        (
            "read_logs",
            json!({"lines": "ten"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Reason::InvalidArguments.as_str(),
        ),
    ];
    for (tool, arguments, status, reason) in cases {
        let (actual, body) = api.execute(tool, arguments.clone()).await;
        assert_eq!(actual, status, "{tool} {arguments} in NORMAL: {body}");
        assert_eq!(body["reason_code"], reason, "{body}");
        if status == StatusCode::FORBIDDEN {
            let text = body.to_string();
            assert!(
                !text.contains("service_name") && !text.contains("schema"),
                "a denial says nothing about the arguments: {text}"
            );
        }
    }
    let records = server.tool_calls().await;
    assert_eq!(records[0].decision, "denied");
    assert_eq!(
        records[0].reason_code.as_deref(),
        Some(Reason::BlockedInMode.as_str())
    );

    api.emergency().await;
    let cases: [(&str, Value, StatusCode, &str); 3] = [
        // Allowed in EMERGENCY: now the schema speaks ...
        (
            "restart_service",
            json!({"service_name": 5}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Reason::InvalidArguments.as_str(),
        ),
        (
            "scale_fleet",
            json!({"count": "50"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Reason::InvalidArguments.as_str(),
        ),
        // ... and constraints only judge schema-valid arguments.
        (
            "scale_fleet",
            json!({"count": 50}),
            StatusCode::FORBIDDEN,
            Reason::ConstraintViolated.as_str(),
        ),
    ];
    for (tool, arguments, status, reason) in cases {
        let (actual, body) = api.execute(tool, arguments.clone()).await;
        assert_eq!(actual, status, "{tool} {arguments} in EMERGENCY: {body}");
        assert_eq!(body["reason_code"], reason, "{body}");
    }
}

#[test]
fn mcp_reports_the_same_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut mcp = McpStdio::start(&dir.path().join("data"), &policy_path(), "order-test");
    let result = mcp.call_tool("restart_service", json!({"service_name": 5}));
    assert_eq!(result["isError"], true);
    assert_eq!(
        result["structuredContent"]["reason_code"],
        Reason::BlockedInMode.as_str(),
        "{result}"
    );
    assert_eq!(result["structuredContent"]["policy_violation"], true);
    mcp.close();
}
