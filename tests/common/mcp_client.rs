//! rmcp's own client against a running Proxi over Streamable HTTP (`{url}/mcp`),
//! for tests that speak MCP as a client library does rather than raw JSON-RPC
//! (for that, see `mcp_post`).

use rmcp::model::{
    CallToolRequest, CallToolRequestParams, CallToolResult, ClientCapabilities, ClientConfig,
    ClientRequest, Implementation, ServerResult,
};
use rmcp::service::{Peer, PeerRequestOptions, RequestHandle, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{ClientHandler, RoleClient, ServiceExt};
use serde_json::Value;

/// The Streamable HTTP transport to `{url}/mcp` with `token` as bearer; loopback
/// traffic never goes through a configured proxy.
pub fn transport(url: &str, token: &str) -> StreamableHttpClientTransport<reqwest::Client> {
    proxi::tls::install_crypto_provider();
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("http client");
    let config =
        StreamableHttpClientTransportConfig::with_uri(format!("{url}/mcp")).auth_header(token);
    StreamableHttpClientTransport::with_client(http, config)
}

/// Opens an MCP session with `handler`, which names the client, declares its
/// capabilities and receives what the server sends it.
pub async fn connect_with<H: ClientHandler>(
    handler: H,
    url: &str,
    token: &str,
) -> RunningService<RoleClient, H> {
    handler
        .serve(transport(url, token))
        .await
        .expect("initialize over Streamable HTTP")
}

/// Opens an MCP session as a client named `client_name` that declares nothing.
pub async fn connect(
    url: &str,
    token: &str,
    client_name: &str,
) -> RunningService<RoleClient, ClientConfig> {
    let handler = ClientConfig::new(
        ClientCapabilities::default(),
        Implementation::new(client_name, "1.0"),
    );
    connect_with(handler, url, token).await
}

/// `tools/call` parameters for `tool` with `arguments`, which must be a JSON object.
pub fn call_params(tool: &str, arguments: Value) -> CallToolRequestParams {
    let Value::Object(arguments) = arguments else {
        panic!("tool arguments must be a JSON object, not {arguments}");
    };
    CallToolRequestParams::new(tool.to_owned()).with_arguments(arguments)
}

/// Calls `tool` with `arguments`; panics unless the server answers with a tool
/// result (which may still be an `isError` refusal).
pub async fn call_tool(peer: &Peer<RoleClient>, tool: &str, arguments: Value) -> CallToolResult {
    peer.call_tool(call_params(tool, arguments))
        .await
        .unwrap_or_else(|error| panic!("tools/call {tool} is answered with a result: {error}"))
}

/// Sends `tools/call` without waiting for the answer: the handle can cancel the
/// request or await its result (see [`result_of`]).
pub async fn send_call(
    peer: &Peer<RoleClient>,
    tool: &str,
    arguments: Value,
) -> RequestHandle<RoleClient> {
    peer.send_request_with_option(
        ClientRequest::CallToolRequest(CallToolRequest::new(call_params(tool, arguments))),
        PeerRequestOptions::no_options(),
    )
    .await
    .expect("send tools/call")
}

/// The tool result a [`send_call`] request is answered with.
pub async fn result_of(handle: RequestHandle<RoleClient>) -> CallToolResult {
    match handle.await_response().await.expect("a response") {
        ServerResult::CallToolResult(result) => result,
        other => panic!("not a tool result: {other:?}"),
    }
}
