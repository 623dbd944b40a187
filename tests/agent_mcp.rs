//! The agent over MCP (`--via mcp`), against Proxi's own `/mcp` endpoint.

mod common;

use serde_json::json;

use common::{AGENT_TOKEN, TestServer};
use proxi::agent::backend::{Decision, McpBackend, ToolBackend};
use proxi::agent::mock::MockPlanner;
use proxi::agent::{Agent, RunOutcome};
use proxi::reason::Reason;
use proxi::tools::ToolName;

#[tokio::test]
async fn the_mcp_backend_lists_tools_and_maps_outcomes() {
    let server = TestServer::start().await;
    let backend = McpBackend::connect(&server.url, Some(AGENT_TOKEN.to_owned()))
        .await
        .expect("MCP session opens");
    assert_eq!(backend.transport(), "mcp");

    let catalog = backend.catalog().await.unwrap();
    let names: Vec<&str> = catalog.iter().map(|spec| spec.name.as_str()).collect();
    assert_eq!(names, ToolName::ALL.map(ToolName::as_str));
    let restart = catalog
        .iter()
        .find(|s| s.name == "restart_service")
        .unwrap();
    assert_eq!(restart.category.as_deref(), Some("active"));
    assert_eq!(restart.allowed_modes, Some(vec!["EMERGENCY".to_owned()]));
    assert_eq!(restart.input_schema["required"], json!(["service_name"]));
    let status = backend.policy_status().await.unwrap();
    assert_eq!(status.mode, "NORMAL");
    // The prompt states each tool's modes once, although MCP descriptions append them too.
    let rest = proxi::agent::backend::RestBackend::new(server.agent.clone());
    assert_eq!(
        proxi::agent::system_prompt(&status, &catalog),
        proxi::agent::system_prompt(&status, &rest.catalog().await.unwrap()),
        "over MCP the agent tells the model exactly what it tells it over REST"
    );
    assert!(
        !restart.description.contains("Allowed in modes"),
        "{}",
        restart.description
    );

    let allowed = backend.call_tool("list_services", json!({})).await.unwrap();
    assert_eq!(allowed.decision, Decision::Allowed);
    assert_eq!(allowed.mode.as_deref(), Some("NORMAL"));
    assert!(
        allowed.audit_seq.is_some(),
        "successes carry their audit seq in _meta"
    );
    assert_eq!(allowed.result.unwrap()["fleet_size"], 3);

    let denied = backend
        .call_tool("restart_service", json!({"service_name": "web-server"}))
        .await
        .unwrap();
    assert_eq!(denied.decision, Decision::Denied);
    assert_eq!(
        denied.reason_code.as_deref(),
        Some(Reason::BlockedInMode.as_str())
    );
    assert_eq!(denied.mode.as_deref(), Some("NORMAL"));
    assert!(denied.how_to_proceed.unwrap().contains("EMERGENCY"));

    // read_logs, which NORMAL allows: a tool NORMAL blocks is denied whatever its arguments.
    let rejected = backend
        .call_tool("read_logs", json!({"lines": "ten"}))
        .await
        .unwrap();
    assert_eq!(rejected.decision, Decision::Rejected);

    let unknown = backend.call_tool("magic_fix", json!({})).await.unwrap();
    assert_eq!(unknown.decision, Decision::Denied);
    assert_eq!(
        unknown.reason_code.as_deref(),
        Some(Reason::UnknownTool.as_str())
    );
    assert!(
        unknown
            .known_tools
            .unwrap()
            .contains(&"read_logs".to_owned())
    );

    let audit = server.tool_calls().await;
    assert_eq!(audit.len(), 4);
    assert!(
        audit
            .iter()
            .all(|record| record.principal == "agent (mcp:proxi-agent)")
    );
    backend.close().await;
}

#[tokio::test]
async fn the_mock_agent_gives_the_same_answer_over_mcp() {
    let server = TestServer::start().await;
    let backend = McpBackend::connect(&server.url, Some(AGENT_TOKEN.to_owned()))
        .await
        .unwrap();
    let planner = MockPlanner::new();
    let record = Agent::new(&planner, &backend)
        .run("Restart the web server")
        .await
        .unwrap();
    assert_eq!(record.transport, "mcp");
    assert_eq!(record.outcome, RunOutcome::Answered);
    assert_eq!(
        record.final_answer,
        "❌ I cannot restart the web server in NORMAL mode. Policy only allows read-only operations. Switch to EMERGENCY mode for corrective actions."
    );

    server.emergency().await;
    server.incident("web-server", "critical").await;
    let record = Agent::new(&planner, &backend)
        .run("Fix the critical web server issue")
        .await
        .unwrap();
    let decisions: Vec<(&str, Decision)> = record
        .tool_calls()
        .map(|call| (call.tool.as_str(), call.decision))
        .collect();
    assert_eq!(
        decisions,
        [
            ("get_service_status", Decision::Allowed),
            ("restart_service", Decision::Allowed)
        ]
    );
    assert!(
        record
            .final_answer
            .contains("✓ Service restored successfully.")
    );
    backend.close().await;
}

#[tokio::test]
async fn a_wrong_token_is_refused_when_the_session_opens() {
    let server = TestServer::start().await;
    let error = McpBackend::connect(&server.url, Some("wrong-token-0123456789".to_owned()))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("401"), "{error}");
}

/// The full mock loop against Proxi's own `/mcp`.
#[tokio::test]
async fn the_mock_agent_runs_over_proxi_mcp() {
    let server = TestServer::start().await;
    let backend = McpBackend::connect(&server.url, Some(AGENT_TOKEN.to_owned()))
        .await
        .expect("Proxi serves MCP at /mcp");
    let planner = MockPlanner::new();

    let record = Agent::new(&planner, &backend)
        .run("Restart the web server")
        .await
        .unwrap();
    let call = record.tool_calls().next().unwrap().clone();
    assert_eq!(call.tool, "restart_service");
    assert_eq!(call.decision, Decision::Denied);
    assert_eq!(
        call.reason_code.as_deref(),
        Some(Reason::BlockedInMode.as_str())
    );
    assert!(
        record
            .final_answer
            .starts_with("❌ I cannot restart the web server in NORMAL mode."),
        "{}",
        record.final_answer
    );

    let record = Agent::new(&planner, &backend)
        .run("Use the magic_fix tool on the web server")
        .await
        .unwrap();
    let call = record.tool_calls().next().unwrap().clone();
    assert_eq!(call.decision, Decision::Denied);
    assert_eq!(
        call.reason_code.as_deref(),
        Some(Reason::UnknownTool.as_str())
    );
    assert!(
        record
            .final_answer
            .starts_with("❌ There is no tool named magic_fix.")
    );

    server.emergency().await;
    server.incident("web-server", "critical").await;
    let record = Agent::new(&planner, &backend)
        .run("Fix the critical web server issue")
        .await
        .unwrap();
    assert!(record.final_answer.contains("✓ Restarting web-server..."));

    let audit = server.tool_calls().await;
    assert_eq!(audit.len(), 4);
    assert!(
        audit
            .iter()
            .all(|record| record.principal == "agent (mcp:proxi-agent)"),
        "MCP calls are audited under the agent's identity"
    );
    backend.close().await;
}

#[tokio::test]
async fn arguments_mcp_cannot_carry_are_still_rejected_and_audited() {
    let server = TestServer::start().await;
    let backend = McpBackend::connect(&server.url, Some(AGENT_TOKEN.to_owned()))
        .await
        .expect("MCP session opens");
    // A model's truncated arguments, kept as text: MCP carries only objects, so the
    // backend sends this one over REST, where the server rejects and audits it.
    let outcome = backend
        .call_tool("list_services", json!("{\"lines\": 5"))
        .await
        .unwrap();
    assert_eq!(outcome.decision, Decision::Rejected);
    assert_eq!(
        outcome.reason_code.as_deref(),
        Some(Reason::InvalidArguments.as_str())
    );
    let audit = server.tool_calls().await;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].decision, "rejected");
    // A rejected call's record keeps a digest whose prefix is the text itself.
    assert_eq!(
        audit[0].arguments,
        Some(proxi::audit::json_digest(&json!("{\"lines\": 5")))
    );
    backend.close().await;
}
