//! Attack: use, and end, an MCP session that another token opened.
//!
//! Before the fix the agent token could send requests on, and DELETE, a session
//! opened with the operator token (plain build: 200 and 204, after which the
//! operator's own session answered 404). Now a session answers only the token
//! that opened it; any other token gets the same 404 as for an unknown session,
//! and the attempt is audited (in aggregate).

mod common;

use std::time::Duration;

use common::{
    AGENT_TOKEN, OPERATOR_TOKEN, ServerProcess, audit_records, mcp_initialize_body, mcp_post,
};
use proxi::reason::Reason;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn a_session_answers_only_the_token_that_opened_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = ServerProcess::start(dir.path(), &["--durability", "process"]);
    proxi::tls::install_crypto_provider();
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client builds");
    let (status, session, _) = mcp_post(
        &http,
        &server.url,
        OPERATOR_TOKEN,
        None,
        mcp_initialize_body("console"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let session = session.expect("a session id");
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let (status, _, _) = mcp_post(
        &http,
        &server.url,
        OPERATOR_TOKEN,
        Some(&session),
        initialized,
    )
    .await;
    assert!(status.is_success(), "{status}");

    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"});
    let (status, _, _) = mcp_post(
        &http,
        &server.url,
        AGENT_TOKEN,
        Some(&session),
        list.clone(),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "the agent may not use the operator's session"
    );

    let deleted = http
        .delete(format!("{}/mcp", server.url))
        .bearer_auth(AGENT_TOKEN)
        .header("mcp-session-id", &session)
        .header("mcp-protocol-version", "2025-06-18")
        .send()
        .await
        .expect("request is sent");
    assert_eq!(deleted.status(), StatusCode::NOT_FOUND, "nor end it");

    let (status, _, body) =
        mcp_post(&http, &server.url, OPERATOR_TOKEN, Some(&session), list).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the operator's session survives: {body}"
    );
    assert!(body.contains("get_service_status"), "{body}");

    let foreign: Vec<_> = audit_records(&server.data_dir)
        .into_iter()
        .filter(|record| record.reason_code.as_deref() == Some(Reason::ForeignSession.as_str()))
        .collect();
    assert_eq!(foreign.len(), 1, "the first attempt is recorded at once");
    assert_eq!(foreign[0].principal, "agent");

    // The owner may end its own session.
    let deleted = http
        .delete(format!("{}/mcp", server.url))
        .bearer_auth(OPERATOR_TOKEN)
        .header("mcp-session-id", &session)
        .header("mcp-protocol-version", "2025-06-18")
        .send()
        .await
        .expect("request is sent");
    assert!(deleted.status().is_success(), "{}", deleted.status());
}
