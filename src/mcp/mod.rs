//! The governed tools over the Model Context Protocol, with rmcp (the official Rust SDK).
//!
//! One [`ProxiMcp`] handler serves both transports: stdio ([`stdio`]) and Streamable
//! HTTP at `/mcp` ([`http`]). It has no tool logic of its own: `tools/call` goes
//! through [`Gateway::execute`], exactly as `POST /tools/execute` does, so MCP
//! clients get the same argument checks, policy decisions and audit records.
//! A refusal is a tool result with `isError: true` (the model reads it and adapts),
//! never a protocol error.
//!
//! Both lifecycles rmcp speaks are served: the `initialize` handshake (2025-era
//! protocol versions, sessions, `resources/subscribe`) and the stateless 2026-07-28
//! protocol (`server/discover`, `subscriptions/listen`) that the Python SDK 2.x
//! picks by default.

mod approval_wait;
pub mod elevation;
pub mod http;
pub mod sessions;
pub mod stdio;
pub mod tool_changes;

use std::sync::{Arc, Mutex, PoisonError};

use rmcp::model::{
    CallToolRequestMethod, CompleteRequestMethod, ConstString, CustomRequest, CustomResult,
    DiscoverRequestMethod, ErrorCode, GetPromptRequestMethod, InitializeResultMethod,
    ListPromptsRequestMethod, ListResourceTemplatesRequestMethod, ListResourcesRequestMethod,
    ListToolsRequestMethod, PingRequestMethod, ReadResourceRequestMethod, SubscribeRequestMethod,
    SubscriptionsListenRequestMethod, UnsubscribeRequestMethod,
};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    ListResourcesResult, ListToolsResult, PaginatedRequestParams, ReadResourceRequestParams,
    ReadResourceResponse, ReadResourceResult, Resource, ResourceContents,
    ResourceUpdatedNotificationParam, ServerCapabilities, ServerConfig, SubscribeRequestParams,
    SubscriptionFilter, Tool, ToolAnnotations, UnsubscribeRequestParams,
};
// Logging is deprecated by SEP-2577 but still part of the 2025-era protocol versions.
#[allow(deprecated)]
use rmcp::model::{SetLevelRequestMethod, SetLevelRequestParams};
use rmcp::service::{NotificationContext, RequestContext, SubscriptionContext};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde::Serialize;
use serde_json::{Map, Value, json};
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::gateway::{Execution, Gateway, GatewayError, Outcome, PolicyStatus};
use crate::principal::Principal;
use crate::tools::{MAX_TOOL_NAME_LEN, ToolCategory};
use crate::upstream::call::{CallContext, CallerPeer};

/// `serverInfo.name` in `initialize` and `server/discover`.
pub const SERVER_NAME: &str = "proxi";
/// The readable (and subscribable) policy state.
pub const POLICY_STATUS_URI: &str = "proxi://policy/status";
/// The readable infrastructure state.
pub const INFRASTRUCTURE_STATUS_URI: &str = "proxi://infrastructure/status";
/// Reason code of a call refused because the audit trail cannot record it.
pub const AUDIT_UNAVAILABLE: &str = crate::reason::Reason::AuditUnavailable.as_str();

const INSTRUCTIONS: &str = "Proxi governs these infrastructure tools. Every call is checked against \
the policy's current mode and recorded in an audit trail. Read proxi://policy/status to see the mode \
and which tools it allows. A refused call returns isError with structuredContent.reason_code and \
structuredContent.how_to_proceed: follow that hint instead of retrying. Agents cannot change the mode; \
an operator does.";

/// Which transport a handler serves; it decides where the caller's identity comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// stdio: the caller is the client named in `clientInfo`, with the agent role.
    Stdio,
    /// Streamable HTTP: the caller is the bearer token's holder, which the `/mcp`
    /// guard put into the request's extensions.
    Http,
}

/// What every handler of one server shares; built once, cloned per session.
#[derive(Clone, Debug)]
pub struct McpShared {
    gateway: Arc<Gateway>,
    info: Arc<ServerConfig>,
}

impl McpShared {
    /// The server info; the tool list is built from the gateway's catalog at each
    /// `tools/list`, because upstream tools come and go.
    pub fn new(gateway: Arc<Gateway>) -> McpShared {
        McpShared {
            gateway,
            info: Arc::new(server_config()),
        }
    }

    /// A handler for one session (HTTP) or the whole process (stdio).
    pub fn handler(&self, transport: Transport) -> ProxiMcp {
        ProxiMcp {
            updates: self.gateway.subscribe(),
            shared: self.clone(),
            transport,
            subscription: LegacySubscription::default(),
            tool_changes: LegacySubscription::default(),
        }
    }
}

/// The rmcp server handler over the gateway.
#[derive(Debug)]
pub struct ProxiMcp {
    shared: McpShared,
    transport: Transport,
    /// Taken when the handler is made, which for stateless HTTP requests is before
    /// `subscriptions/listen` is acknowledged, so no mode change falls in between.
    /// (A stdio handler lives for the whole process, so its first listener may hear
    /// of a change made before it listened: a spurious "refetch", never a lost one.)
    updates: watch::Receiver<PolicyStatus>,
    subscription: LegacySubscription,
    /// The `notifications/tools/list_changed` forwarder of one legacy session,
    /// started when the client is initialized; stops with the session.
    tool_changes: LegacySubscription,
}

/// The `resources/subscribe` watcher of one legacy session; stops when the session ends.
#[derive(Debug, Default)]
struct LegacySubscription {
    watcher: Mutex<Option<AbortHandle>>,
}

impl LegacySubscription {
    fn replace(&self, watcher: Option<AbortHandle>) {
        let previous = std::mem::replace(
            &mut *self.watcher.lock().unwrap_or_else(PoisonError::into_inner),
            watcher,
        );
        if let Some(previous) = previous {
            previous.abort();
        }
    }
}

impl Drop for LegacySubscription {
    fn drop(&mut self) {
        self.replace(None);
    }
}

fn server_config() -> ServerConfig {
    // logging/setLevel is deprecated by SEP-2577 but still part of the 2025-era
    // protocol versions that most clients (and the conformance suite) speak.
    #[allow(deprecated)]
    let capabilities = ServerCapabilities::builder()
        .enable_logging()
        .enable_resources()
        .enable_resources_subscribe()
        .enable_tools()
        .enable_tool_list_changed()
        .build();
    ServerConfig::new(capabilities)
        .with_server_info(
            Implementation::new(SERVER_NAME, env!("CARGO_PKG_VERSION"))
                .with_title("Proxi policy guard"),
        )
        .with_instructions(INSTRUCTIONS)
}

/// The tools as MCP advertises them, from the gateway's catalog listing, plus
/// the gateway tool [`elevation::REQUEST_MODE_CHANGE_TOOL`] when the policy sets
/// `"elevation_requests": true`.
pub fn tool_definitions(gateway: &Gateway) -> Vec<Tool> {
    let mut tools: Vec<Tool> = gateway
        .catalog()
        .into_iter()
        .map(|entry| {
            let availability = if entry.allowed_modes.is_empty() {
                "Blocked in every mode by policy.".to_owned()
            } else {
                format!("Allowed in modes: {}.", entry.allowed_modes.join(", "))
            };
            let schema = match entry.input_schema {
                Value::Object(schema) => schema,
                _ => Map::new(),
            };
            // An upstream tool keeps its server's annotations; a built-in's follow
            // from its category.
            let annotations = entry
                .annotations
                .and_then(|listed| serde_json::from_value(listed).ok())
                .unwrap_or_else(|| annotations(entry.category));
            let description = if entry.description.is_empty() {
                availability
            } else {
                format!("{} {availability}", entry.description)
            };
            Tool::new(entry.name, description, schema).annotate(annotations)
        })
        .collect();
    tools.extend(elevation::definition(gateway));
    tools
}

fn annotations(category: ToolCategory) -> ToolAnnotations {
    match category {
        ToolCategory::ReadOnly => ToolAnnotations::new().read_only(true),
        // The active tools (restart, scale) converge on a target state.
        ToolCategory::Active => ToolAnnotations::new()
            .read_only(false)
            .destructive(false)
            .idempotent(true),
        ToolCategory::Destructive => ToolAnnotations::new()
            .read_only(false)
            .destructive(true)
            .idempotent(false),
    }
}

/// `structuredContent` of a call that did not succeed.
#[derive(Debug, Serialize)]
pub struct Refusal {
    /// Whether the policy refused the call (unknown tools included).
    pub policy_violation: bool,
    /// `blocked_in_mode`, `always_blocked`, `invalid_arguments`, `unknown_service`, ...
    pub reason_code: String,
    /// The mode the call was decided in.
    pub mode: String,
    /// The tool as requested.
    pub tool: String,
    /// A concrete next step for the model.
    pub how_to_proceed: String,
    /// Why, in words.
    pub message: String,
    /// The call's position in the audit trail, if it was recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_seq: Option<u64>,
    /// For an unknown tool, the tools that exist.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub known_tools: Option<Vec<String>>,
    /// For a rate-limited call, the seconds to wait before calling again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u64>,
    /// Whether the call needs a human's approval (`reason_code` `approval_*`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub approval_required: bool,
    /// The pending approval the identical call waits for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<String>,
    /// When that approval lapses (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

impl Refusal {
    fn into_result(self) -> CallToolResult {
        let label = if self.policy_violation {
            "Policy violation"
        } else if self.approval_id.is_some() {
            "Waiting for a human's approval: wait, then retry the identical call"
        } else {
            "Tool call failed"
        };
        let text = format!(
            "{label} ({}): {}\nHow to proceed: {}",
            self.reason_code, self.message, self.how_to_proceed
        );
        let mut result = CallToolResult::error(vec![ContentBlock::text(text)]);
        result.structured_content = serde_json::to_value(&self).ok();
        result
    }
}

/// `_meta` key of a successful call's mode.
pub const META_MODE: &str = "dev.proxi/mode";
/// `_meta` key of a successful call's audit sequence number.
pub const META_AUDIT_SEQ: &str = "dev.proxi/audit_seq";

/// Turns the gateway's answer into an MCP tool result: a success with the mode
/// and audit seq in `_meta`, an upstream's result unchanged, or an `isError`
/// refusal rendered from the same [`crate::answer::answer`] REST renders.
pub fn tool_result(execution: Execution) -> CallToolResult {
    let Execution {
        tool,
        mode,
        outcome,
        audit_seq,
    } = execution;
    let answer = crate::answer::answer(&outcome, crate::server::rest::known_tool_names);
    match (outcome, answer) {
        // The upstream's answer, every content block, structuredContent and
        // isError, exactly as it came.
        (Outcome::Forwarded(result), _) => result,
        (Outcome::Executed(result), _) => {
            let text = result.to_string();
            let mut success = CallToolResult::success(vec![ContentBlock::text(text)]);
            success.structured_content = Some(result);
            // The result object is the tool's own; the decision's context travels in _meta.
            let mut meta = Map::new();
            meta.insert(META_MODE.to_owned(), Value::from(mode.as_ref()));
            meta.insert(META_AUDIT_SEQ.to_owned(), Value::from(audit_seq));
            success.meta = Some(rmcp::model::MetaObject(meta));
            success
        }
        (_, Some(answer)) => Refusal {
            policy_violation: answer.policy_violation,
            reason_code: answer.reason_code.to_string(),
            mode: mode.to_string(),
            tool,
            how_to_proceed: answer.how_to_proceed,
            message: answer.message,
            audit_seq: Some(audit_seq),
            known_tools: answer.known_tools,
            retry_after_seconds: answer.retry_after_seconds,
            approval_required: answer.reason_code.is_approval(),
            approval_id: answer.approval.as_ref().map(|(id, _)| id.clone()),
            expires_at: answer.approval.map(|(_, expires_at)| expires_at),
        }
        .into_result(),
        // answer() is None only for Executed and a successful Forwarded.
        (_, None) => CallToolResult::error(vec![ContentBlock::text("internal error")]),
    }
}

/// Standard methods whose params rmcp failed to parse fall back to a custom
/// request, which would be answered "method not found"; they get -32602 instead.
const STANDARD_METHODS: [&str; 15] = [
    InitializeResultMethod::VALUE,
    PingRequestMethod::VALUE,
    DiscoverRequestMethod::VALUE,
    ListToolsRequestMethod::VALUE,
    CallToolRequestMethod::VALUE,
    ListResourcesRequestMethod::VALUE,
    ListResourceTemplatesRequestMethod::VALUE,
    ReadResourceRequestMethod::VALUE,
    SubscribeRequestMethod::VALUE,
    UnsubscribeRequestMethod::VALUE,
    SubscriptionsListenRequestMethod::VALUE,
    SetLevelRequestMethod::VALUE,
    ListPromptsRequestMethod::VALUE,
    GetPromptRequestMethod::VALUE,
    CompleteRequestMethod::VALUE,
];

/// The error for a standard method that reached rmcp as a custom request, which
/// happens when its params do not parse; `None` for genuinely unknown methods.
pub(crate) fn misparsed_standard_request(method: &str) -> Option<ErrorData> {
    STANDARD_METHODS
        .contains(&method)
        .then(|| ErrorData::invalid_params(format!("Invalid params for method '{method}'"), None))
}

fn audit_unavailable(tool: &str, mode: String) -> CallToolResult {
    Refusal {
        policy_violation: false,
        reason_code: AUDIT_UNAVAILABLE.to_owned(),
        mode,
        tool: tool.to_owned(),
        how_to_proceed: "Do not retry now; ask an operator to restore the audit trail.".to_owned(),
        message: "The audit trail is unavailable, so Proxi refuses to act without a record."
            .to_owned(),
        audit_seq: None,
        known_tools: None,
        retry_after_seconds: None,
        approval_required: false,
        approval_id: None,
        expires_at: None,
    }
    .into_result()
}

fn json_resource(uri: &str, value: &impl Serialize) -> Result<ReadResourceResponse, ErrorData> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|error| ErrorData::internal_error(error.to_string(), None))?;
    let contents = ResourceContents::text(text, uri).with_mime_type("application/json");
    Ok(ReadResourceResult::new(vec![contents]).into())
}

fn not_a_resource(uri: &str) -> ErrorData {
    ErrorData::resource_not_found(
        format!(
            "no resource '{uri}'; Proxi serves {POLICY_STATUS_URI} and {INFRASTRUCTURE_STATUS_URI}"
        ),
        Some(json!({ "uri": uri })),
    )
}

impl ProxiMcp {
    /// Who is calling: the audit trail and the policy's authority checks use it.
    fn principal(&self, context: &RequestContext<RoleServer>) -> Result<Principal, ErrorData> {
        let client = context
            .client_info()
            .map(|info| info.name)
            .unwrap_or_default();
        match self.transport {
            Transport::Stdio => Ok(Principal::mcp_stdio_agent(&client)),
            Transport::Http => context
                .extensions
                .get::<axum::http::request::Parts>()
                .and_then(|parts| parts.extensions.get::<Principal>())
                .map(|holder| holder.via_mcp(&client))
                // Only reachable if the guard was bypassed: fail closed.
                .ok_or_else(|| {
                    ErrorData::internal_error("the request was not authenticated", None)
                }),
        }
    }
}

impl ServerHandler for ProxiMcp {
    fn get_info(&self) -> ServerConfig {
        self.shared.info.as_ref().clone()
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(tool_definitions(
            &self.shared.gateway,
        )))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let principal = self.principal(&context)?;
        if request.name.len() > MAX_TOOL_NAME_LEN {
            let problem = format!("tool name must be at most {MAX_TOOL_NAME_LEN} bytes");
            // Recorded (name cut short) so that oversized names leave a trace too.
            if let Err(error) = self
                .shared
                .gateway
                .record_malformed_request(&principal, &request.name, &problem)
                .await
            {
                tracing::error!(%error, "could not record a malformed tool call");
                return Ok(
                    audit_unavailable(&request.name, self.shared.gateway.status().mode).into(),
                );
            }
            return Err(ErrorData::invalid_params(problem, None));
        }
        if elevation::is_offered(&self.shared.gateway, &request.name) {
            let arguments = request.arguments.unwrap_or_default();
            return match elevation::call(&self.shared.gateway, &principal, arguments).await {
                Ok(result) => Ok(result.into()),
                Err(GatewayError::AuditUnavailable | GatewayError::AuditLowSpace) => {
                    Ok(audit_unavailable(&request.name, self.shared.gateway.status().mode).into())
                }
                Err(error) => {
                    tracing::error!(%error, "an elevation request failed inside the gateway");
                    Err(ErrorData::internal_error("internal error", None))
                }
            };
        }
        let arguments = Value::Object(request.arguments.unwrap_or_default());
        let progress_token = context.meta.get_progress_token();
        // Kept only to repeat a call held for approval.
        let held_arguments = progress_token.as_ref().map(|_| arguments.clone());
        // The client's cancellation (context.ct) cancels this call, and only it;
        // the upstream's traffic during the call goes to this client alone.
        let call_context = CallContext {
            cancel: context.ct.clone(),
            caller: Some(CallerPeer {
                peer: context.peer.clone(),
                progress_token: context.meta.get_progress_token(),
            }),
        };
        match self
            .shared
            .gateway
            .execute_call(&principal, &request.name, arguments, None, &call_context)
            .await
        {
            Ok(execution)
                if let (Some(token), Some(arguments)) = (progress_token, held_arguments) =>
            {
                let hold = approval_wait::Hold {
                    gateway: &self.shared.gateway,
                    principal: &principal,
                    tool: &request.name,
                    arguments,
                    call_context: &call_context,
                    peer: &context.peer,
                    token,
                };
                match approval_wait::hold(hold, execution).await {
                    Ok(execution) => Ok(tool_result(execution).into()),
                    Err(GatewayError::AuditUnavailable | GatewayError::AuditLowSpace) => Ok(
                        audit_unavailable(&request.name, self.shared.gateway.status().mode).into(),
                    ),
                    Err(error) => {
                        tracing::error!(%error, "tool call failed inside the gateway");
                        Err(ErrorData::internal_error("internal error", None))
                    }
                }
            }
            Ok(execution) => Ok(tool_result(execution).into()),
            Err(GatewayError::AuditUnavailable | GatewayError::AuditLowSpace) => {
                Ok(audit_unavailable(&request.name, self.shared.gateway.status().mode).into())
            }
            Err(error) => {
                tracing::error!(%error, "tool call failed inside the gateway");
                Err(ErrorData::internal_error("internal error", None))
            }
        }
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        Ok(ListResourcesResult::with_all_items(vec![
            Resource::new(POLICY_STATUS_URI, "policy-status")
                .with_title("Policy status")
                .with_description(
                    "The mode in force, the tools it allows, and when an emergency lapses. \
                     Subscribe to hear about mode changes.",
                )
                .with_mime_type("application/json"),
            Resource::new(INFRASTRUCTURE_STATUS_URI, "infrastructure-status")
                .with_title("Infrastructure status")
                .with_description("Every service's health and the fleet size.")
                .with_mime_type("application/json"),
        ]))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        match request.uri.as_str() {
            POLICY_STATUS_URI => json_resource(
                POLICY_STATUS_URI,
                &crate::api::PolicyStatus::from(self.shared.gateway.status()),
            ),
            INFRASTRUCTURE_STATUS_URI => json_resource(
                INFRASTRUCTURE_STATUS_URI,
                &self.shared.gateway.infrastructure_status(),
            ),
            other => Err(not_a_resource(other)),
        }
    }

    async fn subscribe(
        &self,
        request: SubscribeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        match request.uri.as_str() {
            POLICY_STATUS_URI => {}
            INFRASTRUCTURE_STATUS_URI => {
                return Err(ErrorData::invalid_params(
                    format!("only {POLICY_STATUS_URI} supports subscriptions"),
                    None,
                ));
            }
            other => return Err(not_a_resource(other)),
        }
        // Marked seen before answering, so every later mode change is announced.
        let mut updates = self.shared.gateway.subscribe();
        updates.borrow_and_update();
        let peer = context.peer;
        let watcher = tokio::spawn(async move {
            while updates.changed().await.is_ok() {
                let updated = ResourceUpdatedNotificationParam::new(POLICY_STATUS_URI);
                if peer.notify_resource_updated(updated).await.is_err() {
                    break;
                }
            }
        });
        self.subscription.replace(Some(watcher.abort_handle()));
        Ok(())
    }

    async fn unsubscribe(
        &self,
        request: UnsubscribeRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        if request.uri == POLICY_STATUS_URI {
            self.subscription.replace(None);
        }
        Ok(())
    }

    fn accepted_subscription_filter(
        &self,
        requested: &SubscriptionFilter,
    ) -> Option<SubscriptionFilter> {
        let mut accepted = requested.supported_by(&self.shared.info.capabilities);
        accepted.resource_subscriptions = accepted.resource_subscriptions.map(|uris| {
            uris.into_iter()
                .filter(|uri| uri == POLICY_STATUS_URI)
                .collect()
        });
        Some(accepted)
    }

    async fn on_initialized(&self, context: NotificationContext<RoleServer>) {
        self.tool_changes
            .replace(Some(tool_changes::forward_to_session(
                context.peer,
                self.shared.gateway.tools_changed(),
            )));
    }

    async fn listen(&self, context: SubscriptionContext) -> Result<(), ErrorData> {
        // Tool list changes and policy updates share the stream; each forwarder
        // returns when the client cancels it.
        let tools =
            tool_changes::forward_to_listener(&context, self.shared.gateway.tools_changed());
        let policy = self.listen_for_policy(&context);
        if tool_changes::wants_tool_changes(&context) {
            let ((), result) = tokio::join!(tools, policy);
            result
        } else {
            policy.await
        }
    }

    async fn on_custom_request(
        &self,
        request: CustomRequest,
        _context: RequestContext<RoleServer>,
    ) -> Result<CustomResult, ErrorData> {
        Err(misparsed_standard_request(&request.method)
            .unwrap_or_else(|| ErrorData::new(ErrorCode::METHOD_NOT_FOUND, request.method, None)))
    }

    #[allow(deprecated)]
    async fn set_level(
        &self,
        request: SetLevelRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        // Proxi sends no log notifications (its logs go to stderr and the audit
        // trail), so any level is accepted and nothing more is needed.
        tracing::debug!(level = ?request.level, "MCP client set its log level");
        Ok(())
    }
}

impl ProxiMcp {
    /// The policy-status half of [`ServerHandler::listen`].
    async fn listen_for_policy(&self, context: &SubscriptionContext) -> Result<(), ErrorData> {
        let wants_policy = context
            .accepted()
            .resource_subscriptions
            .as_ref()
            .is_some_and(|uris| uris.iter().any(|uri| uri == POLICY_STATUS_URI));
        if !wants_policy {
            context.cancelled().await;
            return Ok(());
        }
        let mut updates = self.updates.clone();
        loop {
            tokio::select! {
                () = context.cancelled() => return Ok(()),
                changed = updates.changed() => {
                    if changed.is_err()
                        || context.sink().notify_resource_updated(POLICY_STATUS_URI).await.is_err()
                    {
                        return Ok(());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::policy::{Decision, PolicyEngine};
    use crate::tools::{ToolCall, ToolName};

    fn execution(outcome: Outcome) -> Execution {
        Execution {
            tool: "restart_service".to_owned(),
            mode: Arc::from("NORMAL"),
            outcome,
            audit_seq: 7,
        }
    }

    #[test]
    fn a_success_carries_the_result_as_text_and_structured_content() {
        let result = tool_result(execution(Outcome::Executed(json!({"status": "healthy"}))));
        assert_eq!(result.is_error, Some(false));
        assert_eq!(
            result.structured_content,
            Some(json!({"status": "healthy"}))
        );
        let text = result.content[0].as_text().map(|text| text.text.clone());
        assert_eq!(text.as_deref(), Some(r#"{"status":"healthy"}"#));
        let meta = result.meta.expect("a success carries _meta").0;
        assert_eq!(meta[META_MODE], "NORMAL");
        assert_eq!(meta[META_AUDIT_SEQ], 7);
    }

    #[test]
    fn a_denial_is_an_error_result_with_the_policy_fields() {
        let policy =
            PolicyEngine::from_json(include_str!("../../policies/ops_policy.json"), "test")
                .expect("the shipped policy is valid");
        let call = ToolCall::parse(ToolName::RestartService, &json!({"service_name": "web"}))
            .expect("valid arguments");
        let Some(Decision::Deny(denial)) = policy.decide_builtin(policy.default_mode(), &call)
        else {
            panic!("NORMAL must refuse restart_service");
        };
        let result = tool_result(execution(Outcome::Denied {
            denial,
            message: "Tool 'restart_service' is blocked in NORMAL mode".to_owned(),
            how_to_proceed: "Ask an operator to declare EMERGENCY".to_owned(),
        }));
        assert_eq!(result.is_error, Some(true));
        let structured = result.structured_content.unwrap_or_default();
        assert_eq!(structured["policy_violation"], true);
        assert_eq!(
            structured["reason_code"],
            crate::reason::Reason::BlockedInMode.as_str()
        );
        assert_eq!(structured["mode"], "NORMAL");
        assert_eq!(structured["tool"], "restart_service");
        assert_eq!(
            structured["how_to_proceed"],
            "Ask an operator to declare EMERGENCY"
        );
        let text = result.content[0]
            .as_text()
            .map(|text| text.text.clone())
            .unwrap_or_default();
        assert!(text.contains("blocked in NORMAL mode"), "{text}");
        assert!(text.contains("declare EMERGENCY"), "{text}");
    }

    #[test]
    fn invalid_arguments_and_unknown_tools_are_error_results() {
        let invalid = tool_result(execution(Outcome::InvalidArguments(
            "missing field `service_name`".to_owned(),
        )));
        assert_eq!(invalid.is_error, Some(true));
        let structured = invalid.structured_content.unwrap_or_default();
        assert_eq!(
            structured["reason_code"],
            crate::reason::Reason::InvalidArguments.as_str()
        );
        assert_eq!(structured["policy_violation"], false);

        let unknown = tool_result(execution(Outcome::UnknownTool {
            message: "Tool 'x' does not exist".to_owned(),
        }));
        let structured = unknown.structured_content.unwrap_or_default();
        assert_eq!(
            structured["reason_code"],
            crate::reason::Reason::UnknownTool.as_str()
        );
        assert_eq!(structured["known_tools"].as_array().map(Vec::len), Some(6));
    }

    #[test]
    fn annotations_follow_the_tool_category() {
        let read = annotations(ToolCategory::ReadOnly);
        assert_eq!(read.read_only_hint, Some(true));
        let active = annotations(ToolCategory::Active);
        assert_eq!(
            (
                active.read_only_hint,
                active.destructive_hint,
                active.idempotent_hint
            ),
            (Some(false), Some(false), Some(true))
        );
        assert_eq!(
            annotations(ToolCategory::Destructive).destructive_hint,
            Some(true)
        );
    }
}
