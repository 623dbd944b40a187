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
