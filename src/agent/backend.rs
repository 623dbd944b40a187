//! Where the agent's tool calls go: the Proxi server, over REST or MCP.
//!
//! Both transports reduce the server's answer to one [`ToolOutcome`], so the loop
//! and the planner never care which one carried the call. Policy refusals, bad
//! arguments and tool failures are outcomes; only transport failures are errors.

use std::borrow::Cow;

use futures::future::BoxFuture;
use rmcp::ServiceExt;
use rmcp::model::{
    CallToolRequestParams, CallToolResult, ClientCapabilities, ClientConfig, ErrorCode,
    Implementation,
};
use rmcp::service::{RoleClient, RunningService, ServiceError};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::RwLock;

use super::provider::ToolSpec;
use crate::api::{MCP_META_AUDIT_SEQ, MCP_META_MODE, PolicyStatus, Reason, ToolResponse};
use crate::client::{ClientError, ProxiClient};

/// Reason code the server gives a tool that does not exist.
pub const UNKNOWN_TOOL: &str = Reason::UnknownTool.as_str();
/// Reason code the server gives arguments that fail the tool's schema.
pub const INVALID_ARGUMENTS: &str = Reason::InvalidArguments.as_str();

/// How the server decided one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// The policy allowed the call and the tool ran.
    Allowed,
    /// The policy refused the call (unknown tools included).
    Denied,
    /// The arguments did not fit the tool's schema; nothing ran.
    Rejected,
    /// The policy allowed the call but the tool failed (e.g. unknown service).
    Failed,
}

impl Decision {
    /// Lowercase name for transcripts.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allowed => "allowed",
            Decision::Denied => "denied",
            Decision::Rejected => "rejected",
            Decision::Failed => "failed",
        }
    }
}

/// The server's answer to one call, whatever carried it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolOutcome {
    /// How the call was decided.
    pub decision: Decision,
    /// Machine-readable reason for anything but success.
    pub reason_code: Option<String>,
    /// Why, in words, for anything but success.
    pub message: Option<String>,
    /// The tool's result when it ran.
    pub result: Option<Value>,
    /// The server's suggested next step after a refusal.
    pub how_to_proceed: Option<String>,
    /// For an unknown tool, the tools that exist.
    pub known_tools: Option<Vec<String>>,
    /// The mode the call was decided in, when the server says.
    pub mode: Option<String>,
    /// The call's sequence number in the audit trail, when the server says.
    pub audit_seq: Option<u64>,
    /// For a call that waits for a human's approval, the pending approval the
    /// identical call needs (`approval_required`, `approval_expired`, `approval_mismatch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<String>,
}

impl ToolOutcome {
    /// Reduces a REST answer (`POST /tools/execute`).
    pub fn from_rest(response: ToolResponse) -> ToolOutcome {
        let decision = if response.success {
            Decision::Allowed
        } else if response.policy_violation {
            Decision::Denied
        } else if response.reason_code.as_deref() == Some(INVALID_ARGUMENTS) {
            Decision::Rejected
        } else {
            Decision::Failed
        };
        ToolOutcome {
            decision,
            reason_code: response.reason_code,
            message: response.blocked_reason.or(response.error),
            result: response.result,
            how_to_proceed: response.how_to_proceed,
            known_tools: response.known_tools,
            mode: Some(response.mode),
            audit_seq: Some(response.audit_seq),
            approval_id: response.approval_id,
        }
    }

    /// Reduces an MCP `tools/call` result.
    ///
    /// Success carries the tool result as `structuredContent` (or JSON text);
    /// a refusal is `isError: true` with `structuredContent` holding
    /// `policy_violation`, `reason_code`, `mode` and `how_to_proceed`.
    pub fn from_mcp(result: CallToolResult) -> ToolOutcome {
        let text = result
            .content
            .iter()
            .filter_map(|block| block.as_text().map(|text| text.text.as_str()))
            .collect::<Vec<_>>()
            .join("\n");
        let parsed_text = || serde_json::from_str::<Value>(&text).ok();
        if result.is_error != Some(true) {
            let meta = |key: &str| {
                result
                    .meta
                    .as_ref()
                    .and_then(|meta| meta.0.get(key))
                    .cloned()
            };
            let mode = meta(MCP_META_MODE).and_then(|mode| mode.as_str().map(str::to_owned));
            let audit_seq = meta(MCP_META_AUDIT_SEQ).and_then(|seq| seq.as_u64());
            let value = result
                .structured_content
                .filter(|value| !value.is_null())
                .or_else(parsed_text)
                .unwrap_or(Value::String(text.clone()));
            return ToolOutcome {
                decision: Decision::Allowed,
                reason_code: None,
                message: None,
                mode,
                result: Some(value),
                how_to_proceed: None,
                known_tools: None,
                audit_seq,
                approval_id: None,
            };
        }
        let details = result
            .structured_content
            .filter(Value::is_object)
            .or_else(|| parsed_text().filter(Value::is_object))
            .unwrap_or_default();
        let field = |name: &str| details.get(name).and_then(Value::as_str).map(str::to_owned);
        let reason_code = field("reason_code");
        let decision = if details.get("policy_violation").and_then(Value::as_bool) == Some(true)
            || reason_code.as_deref() == Some(UNKNOWN_TOOL)
        {
            Decision::Denied
        } else if reason_code.as_deref() == Some(INVALID_ARGUMENTS) {
            Decision::Rejected
        } else {
            Decision::Failed
        };
        let message = field("blocked_reason")
            .or_else(|| field("error"))
            .or_else(|| field("message"))
            .or_else(|| (!text.is_empty()).then(|| text.clone()));
        ToolOutcome {
            decision,
            reason_code,
            message,
            result: None,
            how_to_proceed: field("how_to_proceed"),
            known_tools: details
                .get("known_tools")
                .and_then(|value| serde_json::from_value::<Vec<String>>(value.clone()).ok()),
            mode: field("mode"),
            audit_seq: details.get("audit_seq").and_then(Value::as_u64),
            approval_id: field("approval_id"),
        }
    }
}

/// A transport failure: the server could not be asked at all.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The REST API failed.
    #[error(transparent)]
    Rest(#[from] ClientError),
    /// The MCP session could not be set up.
    #[error("cannot open an MCP session with {url}: {message}")]
    McpConnect {
        /// The MCP endpoint.
        url: String,
        /// Why.
        message: String,
    },
    /// An MCP request failed at the transport or protocol level.
    #[error("MCP request failed: {0}")]
    Mcp(String),
}

/// The governed tools, as the agent reaches them.
pub trait ToolBackend: Send + Sync {
    /// `rest` or `mcp`, for output.
    fn transport(&self) -> &'static str;

    /// The tools the server offers, with their schemas.
    fn catalog(&self) -> BoxFuture<'_, Result<Vec<ToolSpec>, BackendError>>;

    /// The current mode and what it allows.
    fn policy_status(&self) -> BoxFuture<'_, Result<PolicyStatus, BackendError>>;

    /// Sends one call through the policy engine.
    fn call_tool<'a>(
        &'a self,
        name: &'a str,
        arguments: Value,
    ) -> BoxFuture<'a, Result<ToolOutcome, BackendError>>;

    /// Sends the identical call again while it waits for a human's approval,
    /// asking the server to hold it for up to `hold` until an operator decides
    /// (an approved call then runs once). The answer may still be the pending
    /// approval when the hold ends. The default sends a plain [`Self::call_tool`],
    /// which suits transports whose server holds every such call on its own (MCP
    /// with a progress token, which rmcp's client always sends); the agent bounds
    /// the whole wait either way.
    fn call_tool_held<'a>(
        &'a self,
        name: &'a str,
        arguments: Value,
        hold: std::time::Duration,
    ) -> BoxFuture<'a, Result<ToolOutcome, BackendError>> {
        let _ = hold;
        self.call_tool(name, arguments)
    }
}

/// Tools over `POST /tools/execute` with the agent token.
#[derive(Clone, Debug)]
pub struct RestBackend {
    client: ProxiClient,
}

impl RestBackend {
    /// Uses `client` (which should carry the agent token).
    pub fn new(client: ProxiClient) -> RestBackend {
        RestBackend { client }
    }
}

impl ToolBackend for RestBackend {
    fn transport(&self) -> &'static str {
        "rest"
    }

    fn catalog(&self) -> BoxFuture<'_, Result<Vec<ToolSpec>, BackendError>> {
        Box::pin(async move {
            let catalog = self.client.catalog().await?;
            Ok(catalog
                .tools
                .into_iter()
                .map(|entry| ToolSpec {
                    name: entry.name,
                    description: entry.description,
                    input_schema: entry.input_schema,
                    category: Some(entry.category.as_str().to_owned()),
                    allowed_modes: Some(entry.allowed_modes),
                })
                .collect())
        })
    }

    fn policy_status(&self) -> BoxFuture<'_, Result<PolicyStatus, BackendError>> {
        Box::pin(async move { Ok(self.client.policy_status().await?) })
    }

    fn call_tool<'a>(
        &'a self,
        name: &'a str,
        arguments: Value,
    ) -> BoxFuture<'a, Result<ToolOutcome, BackendError>> {
        Box::pin(async move {
            let response = self.client.execute(name, arguments).await?;
            Ok(ToolOutcome::from_rest(response))
        })
    }

    fn call_tool_held<'a>(
        &'a self,
        name: &'a str,
        arguments: Value,
        hold: std::time::Duration,
    ) -> BoxFuture<'a, Result<ToolOutcome, BackendError>> {
        Box::pin(async move {
            let seconds = hold.as_secs().max(1);
            let response = self.client.execute_held(name, arguments, seconds).await?;
            Ok(ToolOutcome::from_rest(response))
        })
    }
}

/// Tools over MCP (Streamable HTTP at `<server>/mcp`) with the agent token.
///
/// The policy status has no MCP method, so it is read over REST from the same
/// server with the same token, as are the tools' modes and categories when
/// `tools/list` does not carry them. Every tool call goes over MCP.
pub struct McpBackend {
    session: RunningService<RoleClient, ClientConfig>,
    rest: ProxiClient,
    /// Tool names from the last `tools/list`, to recognise unknown-tool errors.
    known: RwLock<Vec<String>>,
}

impl std::fmt::Debug for McpBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpBackend")
            .field("rest", &self.rest.base_url())
            .finish_non_exhaustive()
    }
}

impl McpBackend {
    /// Opens an MCP session with `<server_url>/mcp`, sending `token` as a bearer token.
    pub async fn connect(
        server_url: &str,
        token: Option<String>,
    ) -> Result<McpBackend, BackendError> {
        let base = server_url.trim_end_matches('/');
        let url = format!("{base}/mcp");
        let mut config = StreamableHttpClientTransportConfig::with_uri(url.clone());
        if let Some(token) = &token {
            config = config.auth_header(token.clone());
        }
        crate::tls::install_crypto_provider();
        let transport = StreamableHttpClientTransport::from_config(config);
        let client_config = ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new("proxi-agent", env!("CARGO_PKG_VERSION")),
        );
        let session = client_config.serve(transport).await.map_err(|error| {
            let text = error.to_string();
            let message = if text.contains("404") {
                "the server has no MCP endpoint (HTTP 404); use --via rest or a server with /mcp"
                    .to_owned()
            } else if text.contains("401") || text.contains("Auth required") {
                // rmcp reports a 401 with its transport's type names; say what it means instead.
                "the server refused the agent token (HTTP 401); check PROXI_AGENT_TOKEN or the data dir's tokens.json"
                    .to_owned()
            } else if text.contains("403") {
                format!("the server refused the request (HTTP 403): {text}")
            } else {
                text
            };
            BackendError::McpConnect {
                url: url.clone(),
                message,
            }
        })?;
        Ok(McpBackend {
            session,
            rest: ProxiClient::new(base, token)?,
            known: RwLock::new(Vec::new()),
        })
    }

    /// Ends the MCP session politely.
    pub async fn close(self) {
        let _ = self.session.cancel().await;
    }

    /// Turns a JSON-RPC error into an outcome: servers may answer an unknown
    /// tool or bad arguments with an error instead of an `isError` result.
    async fn outcome_from_error(
        &self,
        name: &str,
        error: ServiceError,
    ) -> Result<ToolOutcome, BackendError> {
        let ServiceError::McpError(data) = error else {
            return Err(BackendError::Mcp(error.to_string()));
        };
        let known = self.known.read().await.clone();
        let unknown = !known.is_empty() && !known.iter().any(|tool| tool == name);
        let (decision, reason_code, known_tools) = if unknown {
            (Decision::Denied, UNKNOWN_TOOL, Some(known))
        } else if data.code == ErrorCode::INVALID_PARAMS {
            (Decision::Rejected, INVALID_ARGUMENTS, None)
        } else {
            (Decision::Failed, "mcp_error", None)
        };
        Ok(ToolOutcome {
            decision,
            reason_code: Some(reason_code.to_owned()),
            message: Some(data.message.to_string()),
            result: None,
            how_to_proceed: None,
            known_tools,
            mode: None,
            audit_seq: None,
            approval_id: None,
        })
    }
}

/// Reads a tool's category from its MCP annotations.
fn mcp_category(tool: &rmcp::model::Tool) -> Option<String> {
    let annotations = tool.annotations.as_ref()?;
    let category = if annotations.read_only_hint == Some(true) {
        "read_only"
    } else if annotations.destructive_hint == Some(true) {
        "destructive"
    } else {
        "active"
    };
    Some(category.to_owned())
}

/// Reads `allowed_modes` from a tool's `_meta`, if the server publishes it.
fn mcp_allowed_modes(tool: &rmcp::model::Tool) -> Option<Vec<String>> {
    let meta = tool.meta.as_ref()?;
    ["allowed_modes", "proxi/allowed_modes"]
        .iter()
        .find_map(|key| meta.0.get(*key))
        .and_then(|value| serde_json::from_value(value.clone()).ok())
}

impl ToolBackend for McpBackend {
    fn transport(&self) -> &'static str {
        "mcp"
    }

    fn catalog(&self) -> BoxFuture<'_, Result<Vec<ToolSpec>, BackendError>> {
        Box::pin(async move {
            let tools = self
                .session
                .list_all_tools()
                .await
                .map_err(|error| BackendError::Mcp(error.to_string()))?;
            let specs: Vec<ToolSpec> = tools
                .iter()
                .map(|tool| ToolSpec {
                    name: tool.name.to_string(),
                    description: tool
                        .description
                        .as_deref()
                        .map(str::to_owned)
                        .unwrap_or_default(),
                    input_schema: Value::Object(Map::clone(&tool.input_schema)),
                    category: mcp_category(tool),
                    allowed_modes: mcp_allowed_modes(tool),
                })
                .collect();
            let mut specs = specs;
            if specs
                .iter()
                .any(|spec| spec.allowed_modes.is_none() || spec.category.is_none())
            {
                // tools/list need not carry policy metadata; the REST catalog of the
                // same server does. Names and schemas stay MCP's.
                if let Ok(catalog) = self.rest.catalog().await {
                    for spec in &mut specs {
                        if let Some(entry) = catalog.tools.iter().find(|e| e.name == spec.name) {
                            // MCP descriptions append the allowed modes, which the
                            // prompt already states from `allowed_modes`.
                            if spec.description.len() > entry.description.len()
                                && spec.description.starts_with(&entry.description)
                            {
                                spec.description = entry.description.clone();
                            }
                            spec.category
                                .get_or_insert_with(|| entry.category.as_str().to_owned());
                            spec.allowed_modes
                                .get_or_insert_with(|| entry.allowed_modes.clone());
                        }
                    }
                }
            }
            *self.known.write().await = specs.iter().map(|spec| spec.name.clone()).collect();
            Ok(specs)
        })
    }

    fn policy_status(&self) -> BoxFuture<'_, Result<PolicyStatus, BackendError>> {
        Box::pin(async move { Ok(self.rest.policy_status().await?) })
    }

    fn call_tool<'a>(
        &'a self,
        name: &'a str,
        arguments: Value,
    ) -> BoxFuture<'a, Result<ToolOutcome, BackendError>> {
        Box::pin(async move {
            let mut params = CallToolRequestParams::new(Cow::Owned(name.to_owned()));
            match arguments {
                Value::Object(object) => params = params.with_arguments(object),
                Value::Null => {}
                // MCP can carry only an object. Such arguments (e.g. a model's text
                // that is not JSON) go over REST with the same token instead, so
                // the server still rejects and audits the attempt.
                other => {
                    let response = self.rest.execute(name, other).await?;
                    return Ok(ToolOutcome::from_rest(response));
                }
            }
            match self.session.call_tool(params).await {
                Ok(result) => Ok(ToolOutcome::from_mcp(result)),
                Err(error) => self.outcome_from_error(name, error).await,
            }
        })
    }
}
