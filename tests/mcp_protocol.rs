//! The MCP server in Rust alone: rmcp's own client over Streamable HTTP against an
//! in-process server, raw HTTP for the guard (token, Host/Origin, malformed
//! JSON-RPC, body limit), and the `proxi mcp` binary for stdio hygiene.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use proxi::gateway::Gateway;
use proxi::tools::ToolName;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HOST, ORIGIN};
use rmcp::RoleClient;
use rmcp::model::{
    CallToolResult, ClientCapabilities, ClientConfig, Implementation, ReadResourceRequestParams,
};
use rmcp::service::RunningService;
use serde_json::{Value, json};

use common::mcp_client::{call_params, connect, connect_with};
use common::mcp_harness::DEADLINE;
use common::{AGENT_TOKEN, OPERATOR_TOKEN};
use proxi::reason::Reason;

const CLIENT_NAME: &str = "rust-protocol-test";

/// The in-process server of tests/common, with the MCP requests these tests make.
struct TestServer {
    inner: common::TestServer,
    address: SocketAddr,
    gateway: Arc<Gateway>,
}

impl TestServer {
    async fn start() -> TestServer {
        let inner = common::TestServer::start().await;
        let address = inner
            .url
            .trim_start_matches("http://")
            .parse()
            .expect("the server's address");
        TestServer {
            gateway: inner.gateway(),
            address,
            inner,
        }
    }

    fn mcp_url(&self) -> String {
        format!("{}/mcp", self.inner.url)
    }

    async fn client(&self) -> RunningService<RoleClient, ClientConfig> {
        connect(&self.inner.url, AGENT_TOKEN, CLIENT_NAME).await
    }

    /// A raw POST to /mcp with the headers a Streamable HTTP client sends.
    fn post(&self, body: impl Into<reqwest::Body>) -> reqwest::RequestBuilder {
        raw_client()
            .post(self.mcp_url())
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json, text/event-stream")
            .bearer_auth(AGENT_TOKEN)
            .body(body)
    }
}

fn raw_client() -> reqwest::Client {
    proxi::tls::install_crypto_provider();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(DEADLINE)
        .build()
        .expect("http client")
}

fn initialize_body() -> String {
    json!({
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": CLIENT_NAME, "version": "1.0"}
        }
    })
    .to_string()
}

async fn call(
    client: &RunningService<RoleClient, ClientConfig>,
    tool: &str,
    arguments: Value,
) -> CallToolResult {
    client
        .call_tool(call_params(tool, arguments))
        .await
        .unwrap_or_else(|error| panic!("tools/call {tool} is answered with a result: {error}"))
}

fn structured(result: &CallToolResult) -> &Value {
    result
        .structured_content
        .as_ref()
        .expect("the result has structuredContent")
}

#[tokio::test]
async fn tools_list_gives_the_six_tools_with_schemas_annotations_and_modes() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let info = client.peer_info().expect("server info after initialize");
    let implementation = info.server_info.clone().expect("serverInfo");
    assert_eq!(implementation.name, "proxi");
    assert_eq!(implementation.version, env!("CARGO_PKG_VERSION"));
    let capabilities = &info.capabilities;
    assert!(capabilities.tools.is_some());
    assert_eq!(
        capabilities.resources.as_ref().and_then(|r| r.subscribe),
        Some(true)
    );

    let tools = client.list_all_tools().await.expect("tools/list");
    assert_eq!(tools.len(), ToolName::ALL.len());
    for (tool, listed) in ToolName::ALL.into_iter().zip(&tools) {
        assert_eq!(listed.name, tool.as_str());
        assert_eq!(listed.input_schema.as_ref(), tool.input_schema().as_ref());
        let annotations = listed.annotations.clone().expect("annotations");
        let description = listed.description.clone().unwrap_or_default();
        assert!(description.starts_with(tool.description()), "{description}");
        match tool {
            ToolName::ListServices | ToolName::GetServiceStatus | ToolName::ReadLogs => {
                assert_eq!(annotations.read_only_hint, Some(true));
                assert!(description.ends_with("Allowed in modes: EMERGENCY, NORMAL."));
            }
            ToolName::RestartService | ToolName::ScaleFleet => {
                assert_eq!(annotations.read_only_hint, Some(false));
                assert_eq!(annotations.destructive_hint, Some(false));
                assert_eq!(annotations.idempotent_hint, Some(true));
                assert!(description.ends_with("Allowed in modes: EMERGENCY."));
            }
            ToolName::DeleteDatabase => {
                assert_eq!(annotations.destructive_hint, Some(true));
                assert!(description.ends_with("Blocked in every mode by policy."));
            }
        }
    }
    client.cancel().await.expect("close the client");
}

#[tokio::test]
async fn tools_call_takes_the_governed_path_and_refusals_are_tool_results() {
    let server = TestServer::start().await;
    let client = server.client().await;

    let ok = call(
        &client,
        "get_service_status",
        json!({"service_name": "web-server"}),
    )
    .await;
    assert_eq!(ok.is_error, Some(false));
    assert_eq!(structured(&ok)["service"], "web-server");

    let denied = call(
        &client,
        "restart_service",
        json!({"service_name": "web-server"}),
    )
    .await;
    assert_eq!(denied.is_error, Some(true));
    let refusal = structured(&denied);
    assert_eq!(refusal["policy_violation"], true);
    assert_eq!(refusal["reason_code"], Reason::BlockedInMode.as_str());
    assert_eq!(refusal["mode"], "NORMAL");
    assert_eq!(refusal["tool"], "restart_service");
    let hint = refusal["how_to_proceed"].as_str().unwrap_or_default();
    assert!(
        hint.contains("Ask an operator to declare EMERGENCY"),
        "{hint}"
    );
    let text = denied.content[0]
        .as_text()
        .map(|text| text.text.clone())
        .unwrap_or_default();
    assert!(
        text.contains("blocked in NORMAL mode") && text.contains(hint),
        "{text}"
    );

    // A tool the mode allows, so the schema's verdict is the answer (a blocked
    // tool would be denied before its arguments are looked at).
    let invalid = call(&client, "read_logs", json!({"lines": "ten"})).await;
    assert_eq!(invalid.is_error, Some(true));
    assert_eq!(
        structured(&invalid)["reason_code"],
        Reason::InvalidArguments.as_str()
    );
    assert_eq!(structured(&invalid)["policy_violation"], false);

    let missing = call(&client, "get_service_status", json!({})).await;
    assert_eq!(
        structured(&missing)["reason_code"],
        Reason::InvalidArguments.as_str()
    );

    let failed = call(
        &client,
        "get_service_status",
        json!({"service_name": "nope"}),
    )
    .await;
    assert_eq!(failed.is_error, Some(true));
    assert_eq!(
        structured(&failed)["reason_code"],
        Reason::UnknownService.as_str()
    );

    // No MCP tool or method changes the mode: an agent cannot escalate itself.
    let escalate = call(&client, "set_mode", json!({"mode": "EMERGENCY"})).await;
    assert_eq!(
        structured(&escalate)["reason_code"],
        Reason::UnknownTool.as_str()
    );
    assert_eq!(server.gateway.status().mode, "NORMAL");

    let always = call(&client, "delete_database", json!({"db_name": "database"})).await;
    assert_eq!(
        structured(&always)["reason_code"],
        Reason::AlwaysBlocked.as_str()
    );

    let records = server.gateway.audit().recent(20).expect("read the audit");
    let calls: Vec<_> = records
        .iter()
        .filter(|record| record.kind == "tool_call")
        .collect();
    assert_eq!(calls.len(), 7);
    let principal = format!("agent (mcp:{CLIENT_NAME})");
    assert!(calls.iter().all(|record| record.principal == principal));
    client.cancel().await.expect("close the client");
}

#[tokio::test]
async fn resources_are_readable_json() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let listed = client.list_all_resources().await.expect("resources/list");
    let uris: Vec<_> = listed
        .iter()
        .map(|resource| resource.uri.as_str())
        .collect();
    assert_eq!(
        uris,
        ["proxi://policy/status", "proxi://infrastructure/status"]
    );

    for (uri, field) in [
        ("proxi://policy/status", "mode"),
        ("proxi://infrastructure/status", "services"),
    ] {
        let read = client
            .read_resource(ReadResourceRequestParams::new(uri))
            .await
            .expect("resources/read");
        let json = serde_json::to_value(&read.contents[0]).expect("contents serialize");
        assert_eq!(json["mimeType"], "application/json");
        let body: Value =
            serde_json::from_str(json["text"].as_str().unwrap_or_default()).expect("JSON text");
        assert!(body.get(field).is_some(), "{uri}: {body}");
    }
    let missing = client
        .read_resource(ReadResourceRequestParams::new("proxi://nope"))
        .await;
    assert!(missing.is_err(), "an unknown resource is a protocol error");
    client.cancel().await.expect("close the client");
}

#[tokio::test]
async fn a_missing_or_wrong_token_is_refused_with_401_and_audited() {
    let server = TestServer::start().await;
    let none = raw_client()
        .post(server.mcp_url())
        .header(CONTENT_TYPE, "application/json")
        .body(initialize_body())
        .send()
        .await
        .expect("request");
    assert_eq!(none.status(), StatusCode::UNAUTHORIZED);
    let body: Value = none.json().await.expect("JSON error");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("Bearer")));

    let wrong = raw_client()
        .post(server.mcp_url())
        .header(CONTENT_TYPE, "application/json")
        .bearer_auth("not-the-token-at-all")
        .body(initialize_body())
        .send()
        .await
        .expect("request");
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);

    let records = server.gateway.audit().recent(10).expect("read the audit");
    let refusals: Vec<_> = records
        .iter()
        .filter(|record| record.kind == "auth_refused")
        .filter_map(|record| record.reason_code.as_deref())
        .collect();
    assert_eq!(
        refusals,
        [Reason::MissingToken.as_str(), Reason::InvalidToken.as_str()]
    );
}

#[tokio::test]
async fn foreign_host_or_origin_is_refused_with_403() {
    let server = TestServer::start().await;
    let port = server.address.port();
    let rebound = server
        .post(initialize_body())
        .header(HOST, "evil.example.com")
        .send()
        .await
        .expect("request");
    assert_eq!(rebound.status(), StatusCode::FORBIDDEN);
    let body: Value = rebound.json().await.expect("JSON error");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("Host")));

    let other_port = server
        .post(initialize_body())
        .header(HOST, format!("localhost:{}", port.wrapping_add(1)))
        .send()
        .await
        .expect("request");
    assert_eq!(other_port.status(), StatusCode::FORBIDDEN);

    let evil_origin = server
        .post(initialize_body())
        .header(ORIGIN, "http://evil.example.com")
        .send()
        .await
        .expect("request");
    assert_eq!(evil_origin.status(), StatusCode::FORBIDDEN);

    let own_origin = server
        .post(initialize_body())
        .header(HOST, format!("localhost:{port}"))
        .header(ORIGIN, format!("http://localhost:{port}"))
        .send()
        .await
        .expect("request");
    assert_eq!(own_origin.status(), StatusCode::OK);
}

#[tokio::test]
async fn malformed_json_rpc_gets_a_json_rpc_error_and_the_server_stays_up() {
    let server = TestServer::start().await;
    let cases = [
        ("{not json", -32700, Value::Null),
        (r#"{"hello": "world"}"#, -32600, Value::Null),
        (r#"[1, 2]"#, -32600, Value::Null),
        (
            r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":5}}"#,
            -32602,
            json!(7),
        ),
    ];
    for (body, code, id) in cases {
        let response = server.post(body).send().await.expect("request");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
        let error: Value = response.json().await.expect("a JSON-RPC error body");
        assert_eq!(error["jsonrpc"], "2.0", "{body}");
        assert_eq!(error["error"]["code"], code, "{body}");
        assert_eq!(error["id"], id, "{body}");
    }
    let huge = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"ping","params":{{"pad":"{}"}}}}"#,
        "x".repeat(70 * 1024)
    );
    let too_big = server.post(huge).send().await.expect("request");
    assert_eq!(too_big.status(), StatusCode::PAYLOAD_TOO_LARGE);

    let still_up = server
        .post(initialize_body())
        .send()
        .await
        .expect("request");
    assert_eq!(still_up.status(), StatusCode::OK);
    assert!(still_up.headers().contains_key("mcp-session-id"));
}

/// Spawns a reader thread so that every line read has a deadline.
fn lines_of(stdout: std::process::ChildStdout) -> mpsc::Receiver<String> {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    receiver
}

#[test]
fn proxi_mcp_speaks_only_protocol_on_stdout() {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(common::mcp_harness::proxi_bin())
        .args(["mcp", "--durability", "process"])
        .arg("--policy")
        .arg(common::policy_path())
        .arg("--data-dir")
        .arg(data_dir.path())
        .env("PROXI_AGENT_TOKEN", AGENT_TOKEN)
        .env("PROXI_OPERATOR_TOKEN", OPERATOR_TOKEN)
        .env("RUST_LOG", "debug")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start proxi mcp");
    let lines = lines_of(child.stdout.take().expect("stdout"));
    let mut stdin = child.stdin.take().expect("stdin");
    let messages = [
        initialize_body(),
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}).to_string(),
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}).to_string(),
        json!({"jsonrpc": "2.0", "id": 3, "method": "no/such/method"}).to_string(),
        json!({"jsonrpc": "2.0", "id": 4, "method": "tools/call",
               "params": {"name": "delete_database", "arguments": {"db_name": "database"}}})
        .to_string(),
        json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": 5}})
            .to_string(),
    ];
    for message in &messages {
        writeln!(stdin, "{message}").expect("write to proxi mcp");
    }
    stdin.flush().expect("flush");
    // Requests run concurrently, so answers are matched by id, not by order.
    let mut answers = std::collections::HashMap::new();
    for _ in 0..5 {
        let line = lines
            .recv_timeout(DEADLINE)
            .expect("an answer on stdout in time");
        let message: Value = serde_json::from_str(&line)
            .unwrap_or_else(|_| panic!("stdout carries only JSON-RPC, got: {line}"));
        assert_eq!(message["jsonrpc"], "2.0", "{line}");
        answers.insert(message["id"].as_i64().unwrap_or_default(), message);
    }
    assert_eq!(answers[&1]["result"]["serverInfo"]["name"], "proxi");
    assert_eq!(
        answers[&2]["result"]["tools"].as_array().map(Vec::len),
        Some(6)
    );
    assert_eq!(
        answers[&3]["error"]["code"], -32601,
        "unknown methods are errors"
    );
    assert_eq!(answers[&4]["result"]["isError"], true);
    assert_eq!(
        answers[&4]["result"]["structuredContent"]["reason_code"],
        Reason::AlwaysBlocked.as_str()
    );
    assert_eq!(
        answers[&5]["error"]["code"], -32602,
        "bad params are invalid params"
    );

    drop(stdin);
    let deadline = std::time::Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "proxi mcp must exit when stdin closes"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "proxi mcp exits cleanly: {status}");
    assert!(
        lines.recv_timeout(Duration::from_secs(5)).is_err(),
        "nothing else on stdout"
    );
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("read stderr");
    assert!(stderr.contains("serving MCP on stdio"), "{stderr}");
    // The audit records the stdio client by the name it gave.
    let records = proxi::audit::read_recent(&data_dir.path().join(proxi::audit::AUDIT_DB_FILE), 10)
        .expect("read the audit");
    assert!(
        records
            .iter()
            .any(|record| record.principal == format!("agent (mcp:{CLIENT_NAME})"))
    );
}

/// Forwards `notifications/resources/updated` URIs to the test.
#[derive(Clone)]
struct UpdateListener {
    info: ClientConfig,
    updates: tokio::sync::mpsc::UnboundedSender<String>,
}

impl rmcp::ClientHandler for UpdateListener {
    async fn on_resource_updated(
        &self,
        params: rmcp::model::ResourceUpdatedNotificationParam,
        _context: rmcp::service::NotificationContext<RoleClient>,
    ) {
        let _ = self.updates.send(params.uri);
    }

    fn get_info(&self) -> ClientConfig {
        self.info.clone()
    }
}

#[tokio::test]
async fn a_subscribed_session_hears_of_a_mode_change_made_over_rest() {
    let server = TestServer::start().await;
    let (sender, mut updates) = tokio::sync::mpsc::unbounded_channel();
    let listener = UpdateListener {
        info: ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new(CLIENT_NAME, "1.0"),
        ),
        updates: sender,
    };
    let client = connect_with(listener, &server.inner.url, AGENT_TOKEN).await;
    #[allow(deprecated)] // resources/subscribe is how 2025-era sessions subscribe
    client
        .subscribe(rmcp::model::SubscribeRequestParams::new(
            "proxi://policy/status",
        ))
        .await
        .expect("resources/subscribe");
    #[allow(deprecated)]
    let refused = client
        .subscribe(rmcp::model::SubscribeRequestParams::new("proxi://nope"))
        .await;
    assert!(refused.is_err(), "only Proxi's resources can be subscribed");

    let changed = raw_client()
        .post(format!("http://{}/policy/set-mode", server.address))
        .bearer_auth(OPERATOR_TOKEN)
        .json(&json!({"mode": "EMERGENCY", "reason": "subscription test"}))
        .send()
        .await
        .expect("set-mode");
    assert_eq!(changed.status(), StatusCode::OK);
    let uri = tokio::time::timeout(DEADLINE, updates.recv())
        .await
        .expect("the update arrives in time")
        .expect("an update");
    assert_eq!(uri, "proxi://policy/status");
    client.cancel().await.expect("close the client");
}
