//! Per-call human approval over MCP (Streamable HTTP on loopback, rmcp's client):
//! the refusal tells the model to wait and retry, the identical call runs after an
//! operator's approval, and a client that sends a progress token is held, with
//! progress notifications, until the operator decides.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::approvals::{decide, listed, write_approval_policy};
use common::{AGENT_TOKEN, Api, TestServer};
use reqwest::StatusCode;
use rmcp::model::{
    CallToolRequest, CallToolRequestParams, ClientCapabilities, ClientConfig, ClientRequest,
    Implementation, ProgressNotificationParam, ServerResult,
};
use rmcp::service::{NotificationContext, PeerRequestOptions, RoleClient, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{ClientHandler, ServiceExt};
use serde_json::{Value, json};

#[derive(Clone, Default)]
struct Client {
    progress: Arc<Mutex<Vec<ProgressNotificationParam>>>,
}

impl ClientHandler for Client {
    fn get_info(&self) -> ClientConfig {
        ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new("approval-test", "1.0"),
        )
    }

    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        self.progress.lock().unwrap().push(params);
    }
}

async fn connect(server: &TestServer) -> (RunningService<RoleClient, Client>, Client) {
    proxi::tls::install_crypto_provider();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let config = StreamableHttpClientTransportConfig::with_uri(format!("{}/mcp", server.url))
        .auth_header(AGENT_TOKEN);
    let handler = Client::default();
    let client = handler
        .clone()
        .serve(StreamableHttpClientTransport::with_client(http, config))
        .await
        .expect("initialize over Streamable HTTP");
    (client, handler)
}

fn params(tool: &str, arguments: Value) -> CallToolRequestParams {
    let mut params = CallToolRequestParams::new(tool.to_owned());
    params.arguments = arguments.as_object().cloned();
    params
}

async fn server() -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let server =
        TestServer::start_with_policy(&write_approval_policy(dir.path(), 600, "mcp")).await;
    server.api().emergency().await;
    (server, dir)
}

/// A client without progress tokens (raw JSON-RPC over Streamable HTTP): it is
/// answered at once and retries.
struct RawClient {
    http: reqwest::Client,
    url: String,
    session: String,
    next_id: u64,
}

impl RawClient {
    async fn connect(server: &TestServer) -> RawClient {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let (status, session, _) = common::mcp_post(
            &http,
            &server.url,
            AGENT_TOKEN,
            None,
            common::mcp_initialize_body("approval-test"),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let session = session.expect("a session id");
        let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        common::mcp_post(&http, &server.url, AGENT_TOKEN, Some(&session), initialized).await;
        RawClient {
            http,
            url: server.url.clone(),
            session,
            next_id: 2,
        }
    }

    /// `tools/call` without `_meta.progressToken`; the JSON-RPC result.
    async fn call(&mut self, tool: &str, arguments: Value) -> Value {
        self.next_id += 1;
        let request = json!({"jsonrpc": "2.0", "id": self.next_id, "method": "tools/call",
            "params": {"name": tool, "arguments": arguments}});
        let (_, _, body) = common::mcp_post(
            &self.http,
            &self.url,
            AGENT_TOKEN,
            Some(&self.session),
            request,
        )
        .await;
        let message = body
            .lines()
            .filter_map(|line| line.strip_prefix("data:"))
            .filter_map(|data| serde_json::from_str::<Value>(data.trim()).ok())
            .find(|message| message.get("result").is_some())
            .or_else(|| serde_json::from_str(&body).ok())
            .unwrap_or_else(|| panic!("no result in {body}"));
        message["result"].clone()
    }
}

fn result_text(result: &Value) -> String {
    result["content"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|block| block["text"].as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn the_model_is_told_to_wait_and_the_identical_call_runs_after_approval() {
    let (server, _dir) = server().await;
    let api = server.api();
    let mut client = RawClient::connect(&server).await;
    let refused = client.call("scale_fleet", json!({"count": 8})).await;
    assert_eq!(refused["isError"], true, "{refused}");
    let structured = &refused["structuredContent"];
    assert_eq!(structured["approval_required"], true, "{structured}");
    assert_eq!(structured["reason_code"], "approval_required");
    assert!(structured["expires_at"].is_string());
    let id = structured["approval_id"].as_str().unwrap().to_owned();
    let said = result_text(&refused);
    assert!(
        said.contains("wait") && said.contains("retry the identical call"),
        "{said}"
    );

    // The same call over REST is another principal's: it does not share the approval.
    let (status, body) = api.execute("scale_fleet", json!({"count": 8})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_ne!(body["approval_id"], id.as_str());

    let (status, approved) = decide(&api, &id, "approve", "ok for the model").await;
    assert_eq!(status, StatusCode::OK, "{approved}");
    assert_eq!(approved["principal"], "agent (mcp:approval-test)");
    let ran = client.call("scale_fleet", json!({"count": 8})).await;
    assert_ne!(ran["isError"], true, "{ran}");
    let records = api.audit(100).await;
    let executed = records
        .iter()
        .find(|r| r["outcome"] == "executed" && r["tool"] == "scale_fleet")
        .expect("the approved call's record");
    assert_eq!(executed["principal"], "agent (mcp:approval-test)");
    assert_eq!(executed["detail"]["approval_id"], id.as_str());
    assert_eq!(executed["detail"]["approved_by"], "operator");
    // Once only.
    let again = client.call("scale_fleet", json!({"count": 8})).await;
    assert_eq!(again["isError"], true);
}

#[tokio::test]
async fn a_call_with_a_progress_token_is_held_until_an_operator_decides() {
    let (server, _dir) = server().await;
    let api = server.api();
    let (client, handler) = connect(&server).await;
    let handle = client
        .peer()
        .send_request_with_option(
            ClientRequest::CallToolRequest(CallToolRequest::new(params(
                "restart_service",
                json!({"service_name": "database"}),
            ))),
            PeerRequestOptions::no_options(),
        )
        .await
        .expect("tools/call is sent");
    let pending = wait_for_pending(&api).await;
    // Held: progress says so, and the call has not answered.
    wait_for(|| !handler.progress.lock().unwrap().is_empty()).await;
    let first = handler.progress.lock().unwrap()[0].clone();
    assert_eq!(first.progress_token, handle.progress_token);
    assert!(
        first.message.unwrap_or_default().contains(&pending),
        "names the approval"
    );
    let (status, _) = decide(&api, &pending, "approve", "restart it").await;
    assert_eq!(status, StatusCode::OK);
    let result = match tokio::time::timeout(Duration::from_secs(30), handle.await_response())
        .await
        .expect("answered after the decision")
        .expect("a response")
    {
        ServerResult::CallToolResult(result) => result,
        other => panic!("not a tool result: {other:?}"),
    };
    assert_ne!(result.is_error, Some(true), "{result:?}");
    assert_eq!(listed(&api, "consumed").await, vec![pending]);
    client.cancel().await.unwrap();
}

async fn wait_for_pending(api: &Api) -> String {
    for _ in 0..1000 {
        if let Some(id) = listed(api, "pending").await.into_iter().next() {
            return id;
        }
        tokio::task::yield_now().await;
    }
    panic!("no approval was requested");
}

async fn wait_for(mut condition: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !condition() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the condition holds in time");
}

/// A server under the approval policy (`"elevation_requests": true`), in NORMAL.
async fn elevation_server() -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let server =
        TestServer::start_with_policy(&write_approval_policy(dir.path(), 600, "elevation")).await;
    (server, dir)
}

async fn tool_names(server: &TestServer) -> Vec<String> {
    let (client, _) = connect(server).await;
    let tools = client.list_all_tools().await.expect("tools/list");
    client.cancel().await.unwrap();
    tools
        .into_iter()
        .map(|tool| tool.name.to_string())
        .collect()
}

#[tokio::test]
async fn request_mode_change_is_offered_only_when_the_policy_enables_elevation_requests() {
    let (enabled, _dir) = elevation_server().await;
    let listed = tool_names(&enabled).await;
    assert!(
        listed.iter().any(|name| name == "request_mode_change"),
        "{listed:?}"
    );
    // The shipped policy does not set elevation_requests: not offered, and a
    // call is an unknown tool like any other (refused and audited).
    let disabled = TestServer::start().await;
    let listed = tool_names(&disabled).await;
    assert!(
        !listed.iter().any(|name| name == "request_mode_change"),
        "{listed:?}"
    );
    let mut client = RawClient::connect(&disabled).await;
    let refused = client
        .call(
            "request_mode_change",
            json!({"mode": "EMERGENCY", "reason": "please"}),
        )
        .await;
    assert_eq!(refused["isError"], true, "{refused}");
    assert_eq!(refused["structuredContent"]["reason_code"], "unknown_tool");
    let status = disabled
        .api()
        .get("/policy/status", Some(AGENT_TOKEN))
        .await
        .1;
    assert_eq!(status["mode"], "NORMAL");
    let records = disabled.api().audit(20).await;
    assert!(
        records
            .iter()
            .any(|r| r["tool"] == "request_mode_change" && r["reason_code"] == "unknown_tool"),
        "the refused call is audited"
    );
}

#[tokio::test]
async fn request_mode_change_files_a_pending_approval_that_only_an_operator_can_grant() {
    let (server, _dir) = elevation_server().await;
    let api = server.api();
    let mut client = RawClient::connect(&server).await;
    let answer = client
        .call(
            "request_mode_change",
            json!({"mode": "EMERGENCY", "reason": "web-server is down", "ttl_seconds": 600}),
        )
        .await;
    assert_ne!(answer["isError"], true, "{answer}");
    let structured = &answer["structuredContent"];
    assert_eq!(structured["mode_changed"], false, "{structured}");
    assert_eq!(structured["requested_mode"], "EMERGENCY");
    let id = structured["approval_id"].as_str().unwrap().to_owned();
    let said = result_text(&answer);
    assert!(
        said.contains("operator must approve") && said.contains(&id),
        "{said}"
    );

    // Pending on GET /approvals, as a mode_change; the mode has not moved.
    let (status, listing) = api
        .get("/approvals?status=pending", Some(common::OPERATOR_TOKEN))
        .await;
    assert_eq!(status, StatusCode::OK);
    let pending = listing["approvals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|approval| approval["id"] == id.as_str())
        .expect("the request is pending")
        .clone();
    assert_eq!(pending["kind"], "mode_change", "{pending}");
    assert_eq!(pending["principal"], "agent (mcp:approval-test)");
    let mode = |api: Api| async move {
        api.get("/policy/status", Some(AGENT_TOKEN)).await.1["mode"].clone()
    };
    assert_eq!(mode(server.api()).await, "NORMAL");

    // The agent cannot approve it: not with its token over REST, and MCP offers
    // no tool that decides approvals. Asking again changes nothing either.
    let (status, _) = api
        .post(
            &format!("/approvals/{id}/approve"),
            Some(AGENT_TOKEN),
            json!({"reason": "self-approval"}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let refused = client
        .call("approve", json!({"approval_id": id, "reason": "self"}))
        .await;
    assert_eq!(refused["structuredContent"]["reason_code"], "unknown_tool");
    let again = client
        .call(
            "request_mode_change",
            json!({"mode": "EMERGENCY", "reason": "web-server is down", "ttl_seconds": 600}),
        )
        .await;
    assert_eq!(again["structuredContent"]["approval_id"], id.as_str());
    assert_eq!(mode(server.api()).await, "NORMAL");
    assert_eq!(listed(&api, "pending").await, vec![id.clone()]);

    // An operator's approval changes the mode; the record names both.
    let (status, decided) = decide(&api, &id, "approve", "confirmed the outage").await;
    assert_eq!(status, StatusCode::OK, "{decided}");
    assert_eq!(mode(server.api()).await, "EMERGENCY");
    let records = api.audit(50).await;
    let change = records
        .iter()
        .rev()
        .find(|r| r["kind"] == "mode_change")
        .expect("a mode_change record");
    assert_eq!(change["principal"], "operator", "{change}");
    assert_eq!(change["mode"], "EMERGENCY", "{change}");
    let reason = change.to_string();
    assert!(
        reason.contains(&id) && reason.contains("agent (mcp:approval-test)"),
        "{change}"
    );
    let approved = records
        .iter()
        .find(|r| r["kind"] == "approval" && r["outcome"] == "approved")
        .expect("the approval record");
    assert_eq!(approved["principal"], "operator");
    assert_eq!(
        approved["detail"]["requested_by"],
        "agent (mcp:approval-test)"
    );
}
