//! The gateway tool `request_mode_change`: over MCP, the agent's way to ask an
//! operator for another mode, the same request as REST `POST /policy/request-mode`
//! (both call [`Gateway::request_mode_change`]).
//!
//! It is offered in `tools/list` only when the policy sets top-level
//! `"elevation_requests": true`; otherwise the name is an unknown tool like any
//! other (refused and audited by the gateway). It is a gateway tool, not a cloud
//! tool: no mode's `allowed_tools` names it and no `blocked_tools` or
//! `require_approval` rule applies to it, because it runs nothing and changes
//! nothing. Its only effect is a pending `mode_change` approval (recorded as kind
//! `approval`, outcome `requested`); the mode changes only when an operator other
//! than the requester approves it.

use std::sync::Arc;

use rmcp::model::{CallToolResult, ContentBlock, Tool, ToolAnnotations};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::Refusal;
use crate::gateway::{ElevationError, Gateway, GatewayError, ModeChange};
use crate::principal::Principal;
use crate::reason::Reason;

/// The tool's name in `tools/list` and `tools/call`.
pub const REQUEST_MODE_CHANGE_TOOL: &str = "request_mode_change";

/// The tool's arguments, as `POST /policy/request-mode` takes them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Arguments {
    mode: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    ttl_seconds: Option<u64>,
}

/// The tool's definition, when `gateway`'s policy accepts elevation requests.
pub(super) fn definition(gateway: &Gateway) -> Option<Tool> {
    let policy = gateway.policy();
    if !policy.elevation_requests() {
        return None;
    }
    let modes: Vec<String> = gateway
        .status()
        .available_modes
        .into_iter()
        .map(|mode| mode.to_string())
        .collect();
    let schema = json!({
        "type": "object",
        "properties": {
            "mode": {"type": "string", "description": "The mode to ask for, e.g. EMERGENCY.", "enum": modes},
            "reason": {"type": "string", "description": "Why the mode is needed; operators read it, and elevated modes require it."},
            "ttl_seconds": {"type": "integer", "minimum": 1, "description": "How long the elevated mode should last (capped by the policy)."}
        },
        "required": ["mode", "reason"],
        "additionalProperties": false
    });
    let Value::Object(schema) = schema else {
        return None;
    };
    let description = "Ask a human operator to switch Proxi to another mode (e.g. EMERGENCY). \
        This does NOT change the mode: it files a pending mode_change approval, and the mode \
        changes only if an operator approves it. The answer carries the approval_id. A gateway \
        tool, not an infrastructure tool: allowed in every mode.";
    let annotations = ToolAnnotations::new()
        .read_only(false)
        .destructive(false)
        .idempotent(true);
    Some(Tool::new(REQUEST_MODE_CHANGE_TOOL, description, Arc::new(schema)).annotate(annotations))
}

/// Whether `name` is this tool and `gateway`'s policy offers it now.
pub(super) fn is_offered(gateway: &Gateway, name: &str) -> bool {
    name == REQUEST_MODE_CHANGE_TOOL && gateway.policy().elevation_requests()
}

/// Files the request for `principal`. A pending approval is a success result
/// (structuredContent with `approval_id`, `mode_changed: false`); a refused
/// request is an `isError` result. `Err` only when the gateway failed.
pub(super) async fn call(
    gateway: &Gateway,
    principal: &Principal,
    arguments: Map<String, Value>,
) -> Result<CallToolResult, GatewayError> {
    let mode = gateway.status().mode;
    let refusal = |reason: Reason, message: String, how_to_proceed: &str| {
        Ok(Refusal {
            policy_violation: false,
            reason_code: reason.as_str().to_owned(),
            mode: mode.clone(),
            tool: REQUEST_MODE_CHANGE_TOOL.to_owned(),
            how_to_proceed: how_to_proceed.to_owned(),
            message,
            audit_seq: None,
            known_tools: None,
            retry_after_seconds: None,
            approval_required: false,
            approval_id: None,
            expires_at: None,
        }
        .into_result())
    };
    let arguments: Arguments = match serde_json::from_value(Value::Object(arguments)) {
        Ok(arguments) => arguments,
        Err(error) => {
            return refusal(
                Reason::InvalidArguments,
                format!("invalid arguments: {error}"),
                "Send {\"mode\": \"EMERGENCY\", \"reason\": \"...\"} and optionally \"ttl_seconds\".",
            );
        }
    };
    let change = ModeChange {
        mode: arguments.mode,
        reason: arguments.reason,
        ttl: arguments.ttl_seconds.map(std::time::Duration::from_secs),
    };
    let approval = match gateway.request_mode_change(principal, change).await {
        Ok(approval) => approval,
        Err(ElevationError::Gateway(error)) => return Err(error),
        Err(error @ ElevationError::Disabled) => {
            return refusal(
                Reason::UnknownTool,
                error.to_string(),
                "Ask an operator to change the mode.",
            );
        }
        Err(error @ ElevationError::NotAgent) => {
            return refusal(
                Reason::Forbidden,
                error.to_string(),
                "Change the mode with POST /policy/set-mode.",
            );
        }
        Err(error @ ElevationError::TooManyPending(_)) => {
            return refusal(
                Reason::RateLimited,
                error.to_string(),
                "Wait for operators to decide the pending approvals.",
            );
        }
        Err(ElevationError::Invalid(error)) => {
            return refusal(
                Reason::InvalidArguments,
                error.to_string(),
                "Fix the request (a mode the policy has, a visible reason, a TTL within the cap).",
            );
        }
    };
    let how_to_proceed = format!(
        "An operator must approve {id} (proxi approvals approve {id} --reason ...); the mode changes only then. \
         Until then only what {mode} mode allows runs. Watch proxi://policy/status.",
        id = approval.id
    );
    let text = format!(
        "Requested a switch to {target} mode: approval {id} is pending. The mode has NOT changed; \
         it is still {mode}. An operator must approve the request first.\nHow to proceed: {how_to_proceed}",
        target = approval.binding.target,
        id = approval.id
    );
    let mut result = CallToolResult::success(vec![ContentBlock::text(text)]);
    result.structured_content = Some(json!({
        "approval_required": true,
        "approval_id": approval.id,
        "kind": approval.binding.kind,
        "requested_mode": approval.binding.target,
        "mode": mode,
        "mode_changed": false,
        "expires_at": crate::audit::format_time(approval.expires_at),
        "how_to_proceed": how_to_proceed,
    }));
    Ok(result)
}
