//! The agent over MCP (`--via mcp`).
//!
//! The first tests run the MCP backend against a small stand-in MCP server
//! (rmcp, Streamable HTTP, bearer token) that follows the contract Proxi's MCP
//! endpoint documents: `tools/list` with JSON Schemas, `tools/call` returning
//! `isError: true` with `structuredContent {policy_violation, reason_code, mode,
//! tool, how_to_proceed}` for refusals. The last test runs the full mock loop
//! against the real `server::app` and needs `/mcp`, which arrives with the MCP
//! branch; it is ignored until then.

mod common;

use std::sync::Arc;

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, Implementation, ListToolsResult,
    PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool, ToolAnnotations,
};
use rmcp::service::RequestContext;
use rmcp::transport::StreamableHttpService;
use rmcp::transport::streamable_http_server::StreamableHttpServerConfig;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde_json::{Value, json};

use common::{AGENT_TOKEN, TestServer};
use proxi::agent::backend::{Decision, McpBackend, ToolBackend};
use proxi::agent::mock::MockPlanner;
use proxi::agent::{Agent, RunOutcome};
use proxi::gateway::Gateway;
use proxi::principal::Principal;
use proxi::server::rest::tool_response;
use proxi::tools::{ToolCategory, ToolName};

/// Name that the stand-in answers with a JSON-RPC error instead of a result.
const RPC_ERROR_TOOL: &str = "rpc_error_tool";

/// A stand-in for Proxi's MCP endpoint, forwarding to a real gateway.
#[derive(Clone)]
struct StandIn {
    gateway: Arc<Gateway>,
}

impl ServerHandler for StandIn {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("proxi-stand-in", "0"))
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let tools = ToolName::ALL
            .iter()
            .map(|tool| {
                let mut annotations = ToolAnnotations::new();
                annotations.read_only_hint = Some(tool.category() == ToolCategory::ReadOnly);
                annotations.destructive_hint = Some(tool.category() == ToolCategory::Destructive);
                Tool::new(
                    tool.as_str(),
                    tool.description(),
                    Arc::new(tool.input_schema().as_ref().clone()),
                )
                .with_annotations(annotations)
            })
            .collect();
        Ok(ListToolsResult::with_all_items(tools))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        if request.name == RPC_ERROR_TOOL {
            return Err(ErrorData::invalid_params(
                format!("tool '{}' not found", request.name),
                None,
            ));
        }
        let arguments = request.arguments.map(Value::Object).unwrap_or(json!({}));
        let execution = self
            .gateway
            .execute(
                &Principal::mcp_client("proxi-agent"),
                &request.name,
                arguments,
            )
            .await
            .map_err(|error| ErrorData::internal_error(error.to_string(), None))?;
        let response = tool_response(execution);
        let result = if response.success {
            CallToolResult::structured(response.result.unwrap_or(Value::Null))
        } else {
            CallToolResult::structured_error(json!({
                "policy_violation": response.policy_violation,
                "reason_code": response.reason_code,
                "mode": response.mode,
                "tool": response.tool,
                "how_to_proceed": response.how_to_proceed,
                "error": response.blocked_reason.or(response.error),
                "known_tools": response.known_tools,
                "audit_seq": response.audit_seq,
            }))
        };
        Ok(result.into())
    }
}

async fn require_agent_token(request: Request, next: Next) -> Response {
    let expected = format!("Bearer {AGENT_TOKEN}");
    let presented = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    if presented == Some(expected.as_str()) {
        next.run(request).await
    } else {
        (StatusCode::UNAUTHORIZED, "missing or wrong bearer token").into_response()
    }
}

/// Serves the stand-in at `/mcp` and the real REST API at `/`, both over `server`'s gateway.
async fn stand_in(
    server: &TestServer,
    gateway: Arc<Gateway>,
) -> (String, tokio::task::JoinHandle<()>) {
    let service = StreamableHttpService::new(
        move || {
            Ok(StandIn {
                gateway: gateway.clone(),
            })
        },
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default(),
    );
    // REST requests (policy status, catalog metadata) go to the real server.
    let rest = server.url.clone();
    let app = axum::Router::new()
        .nest_service("/mcp", service)
        .layer(axum::middleware::from_fn(require_agent_token))
        .fallback(move |request: Request| {
            let rest = rest.clone();
            async move { proxy(&rest, request).await }
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let handle = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, handle)
}

/// Forwards a REST GET to the real server (the stand-in only speaks MCP).
async fn proxy(base: &str, request: Request) -> Response {
    let url = format!("{base}{}", request.uri());
    let mut forwarded = reqwest::Client::new().get(url);
    if let Some(value) = request.headers().get(axum::http::header::AUTHORIZATION) {
        forwarded = forwarded.header("authorization", value.as_bytes());
    }
    match forwarded.send().await {
        Ok(answer) => {
            let status = StatusCode::from_u16(answer.status().as_u16()).unwrap();
            let body = answer.bytes().await.unwrap_or_default();
            (status, [("content-type", "application/json")], body).into_response()
        }
        Err(_) => StatusCode::BAD_GATEWAY.into_response(),
    }
}

/// A real server, plus the stand-in MCP endpoint sharing its gateway.
async fn servers() -> (
    TestServer,
    String,
    tokio::task::JoinHandle<()>,
    Arc<Gateway>,
) {
    let server = TestServer::start().await;
    let gateway = server.gateway();
    let (url, handle) = stand_in(&server, gateway.clone()).await;
    (server, url, handle, gateway)
}

#[tokio::test]
async fn the_mcp_backend_lists_tools_and_maps_outcomes() {
    let (server, url, handle, _gateway) = servers().await;
    let backend = McpBackend::connect(&url, Some(AGENT_TOKEN.to_owned()))
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
    assert_eq!(backend.policy_status().await.unwrap().mode, "NORMAL");

    let allowed = backend.call_tool("list_services", json!({})).await.unwrap();
    assert_eq!(allowed.decision, Decision::Allowed);
    assert_eq!(allowed.result.unwrap()["fleet_size"], 3);

    let denied = backend
        .call_tool("restart_service", json!({"service_name": "web-server"}))
        .await
        .unwrap();
    assert_eq!(denied.decision, Decision::Denied);
    assert_eq!(denied.reason_code.as_deref(), Some("blocked_in_mode"));
    assert_eq!(denied.mode.as_deref(), Some("NORMAL"));
    assert!(denied.how_to_proceed.unwrap().contains("EMERGENCY"));

    let rejected = backend
        .call_tool("scale_fleet", json!({"count": -1}))
        .await
        .unwrap();
    assert_eq!(rejected.decision, Decision::Rejected);

    let unknown = backend.call_tool("magic_fix", json!({})).await.unwrap();
    assert_eq!(unknown.decision, Decision::Denied);
    assert_eq!(unknown.reason_code.as_deref(), Some("unknown_tool"));
    assert!(
        unknown
            .known_tools
            .unwrap()
            .contains(&"read_logs".to_owned())
    );

    // A server may answer an unknown tool with a JSON-RPC error instead.
    let rpc = backend.call_tool(RPC_ERROR_TOOL, json!({})).await.unwrap();
    assert_eq!(rpc.decision, Decision::Denied);
    assert_eq!(rpc.reason_code.as_deref(), Some("unknown_tool"));
    assert!(
        rpc.known_tools
            .unwrap()
            .contains(&"list_services".to_owned())
    );

    let audit = server.tool_calls().await;
    assert_eq!(audit.len(), 4);
    assert!(
        audit
            .iter()
            .all(|record| record.principal == "mcp:proxi-agent")
    );
    backend.close().await;
    handle.abort();
}

#[tokio::test]
async fn the_mock_agent_gives_the_same_answer_over_mcp() {
    let (server, url, handle, _gateway) = servers().await;
    let backend = McpBackend::connect(&url, Some(AGENT_TOKEN.to_owned()))
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
    handle.abort();
}

#[tokio::test]
async fn a_wrong_token_is_refused_when_the_session_opens() {
    let (_server, url, handle, _gateway) = servers().await;
    let error = McpBackend::connect(&url, Some("wrong-token-0123456789".to_owned()))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("401"), "{error}");
    handle.abort();
}

/// The full mock loop against Proxi's own `/mcp` (from the MCP branch).
#[tokio::test]
#[ignore = "needs /mcp from the mcp branch"]
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
    assert_eq!(call.reason_code.as_deref(), Some("blocked_in_mode"));
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
    assert_eq!(call.reason_code.as_deref(), Some("unknown_tool"));
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
            .all(|record| record.principal == "agent" || record.principal.starts_with("mcp:")),
        "MCP calls are audited under the agent's identity"
    );
    backend.close().await;
}
