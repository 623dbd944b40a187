//! The seed's REST API, on top of the gateway.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::AppState;
use super::auth::{Caller, Operator};
use super::error::{ApiError, ApiJson, NamedJson};
use crate::answer::answer;
use crate::api::{
    Catalog, ExecuteRequest, Health, IncidentRequest, IncidentResponse, SetModeRequest,
    SetModeResponse, ToolResponse,
};
use crate::gateway::{Execution, GatewayError, ModeChange, Outcome, UpstreamFailure};
use crate::infra::ServiceHealth;
use crate::tools::{MAX_TOOL_NAME_LEN, ToolName};
use crate::upstream::call::CallContext;

/// `GET /`: liveness, unauthenticated so that probes need no secret.
pub async fn health(State(state): State<AppState>) -> Json<Health> {
    Json(Health {
        status: "ok".to_owned(),
        mode: state.gateway.status().mode,
        version: env!("CARGO_PKG_VERSION").to_owned(),
    })
}

/// `GET /policy/status`.
pub async fn policy_status(
    State(state): State<AppState>,
    _caller: Caller,
) -> Result<Response, ApiError> {
    Ok(Json(crate::api::PolicyStatus::from(
        state.gateway.current_status().await?,
    ))
    .into_response())
}

/// `POST /policy/set-mode` (operator only).
pub async fn set_mode(
    State(state): State<AppState>,
    Operator(principal): Operator,
    ApiJson(request): ApiJson<SetModeRequest>,
) -> Result<Response, ApiError> {
    let change = ModeChange {
        mode: request.mode,
        reason: request.reason,
        ttl: request.ttl_seconds.map(Duration::from_secs),
    };
    let switch = state.gateway.switch_mode(&principal, change).await?;
    Ok(Json(SetModeResponse {
        status: switch.status.into(),
        drained: switch.drain.drained,
        cancelled: switch.drain.cancelled,
    })
    .into_response())
}

/// `POST /tools/execute`: the governed path.
///
/// A request from a valid token that names a tool but cannot be run as sent (a
/// malformed body, an oversized name) is audited as `rejected` before the 4xx.
pub async fn execute(
    State(state): State<AppState>,
    Caller(principal): Caller,
    body: NamedJson<ExecuteRequest>,
) -> Result<Response, ApiError> {
    let request = match body {
        NamedJson::Parsed(request) => request,
        NamedJson::Malformed { error, tool_name } => {
            if let Some(tool_name) = tool_name {
                record_malformed(&state, &principal, &tool_name, &error.message).await?;
            }
            return Err(error);
        }
    };
    if request.tool_name.len() > MAX_TOOL_NAME_LEN {
        let error = ApiError::bad_request(format!(
            "tool_name must be at most {MAX_TOOL_NAME_LEN} bytes"
        ));
        record_malformed(&state, &principal, &request.tool_name, &error.message).await?;
        return Err(error);
    }
    let wait = match request.wait_for_approval_seconds {
        Some(seconds) if seconds > crate::api::MAX_APPROVAL_WAIT_SECONDS => {
            let error = ApiError::bad_request(format!(
                "wait_for_approval_seconds must be at most {}",
                crate::api::MAX_APPROVAL_WAIT_SECONDS
            ));
            record_malformed(&state, &principal, &request.tool_name, &error.message).await?;
            return Err(error);
        }
        // The server's request timeout ends every request: hold a little less, so
        // a still-pending approval is answered 202 rather than cut off.
        Some(seconds) if seconds > 0 => Some(
            Duration::from_secs(seconds)
                .min(super::REQUEST_TIMEOUT.saturating_sub(Duration::from_secs(5))),
        ),
        _ => None,
    };
    let retry_arguments = wait.map(|_| request.arguments.clone());
    let context = (!request.context.is_empty()).then(|| Value::Object(request.context));
    // A client that goes away drops this future, and with it the guard, which
    // cancels an upstream call in flight (its outcome is still recorded).
    let call_context = CallContext::detached();
    let _cancel_when_dropped = call_context.cancel.clone().drop_guard();
    let execution = state
        .gateway
        .execute_call(
            &principal,
            &request.tool_name,
            request.arguments,
            context,
            &call_context,
        )
        .await?;
    let execution = match (wait, retry_arguments, &execution.outcome) {
        (Some(wait), Some(arguments), Outcome::Approval(answer)) if answer.awaits_decision() => {
            wait_and_retry(
                &state,
                &principal,
                &request.tool_name,
                arguments,
                &call_context,
                answer,
                wait,
            )
            .await?
            .unwrap_or(execution)
        }
        _ => execution,
    };
    let status = execution_status(&execution.outcome);
    let retry_after = execution.outcome.retry_after_seconds();
    let mut response = (status, Json(tool_response(execution))).into_response();
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert(axum::http::header::RETRY_AFTER, seconds.into());
    }
    Ok(response)
}

/// Holds a call that waits for approval until an operator decides (or `wait`
/// passes, or the approval lapses), then makes the identical call once more.
/// `None`: still undecided, answer as before.
async fn wait_and_retry(
    state: &AppState,
    principal: &crate::principal::Principal,
    tool_name: &str,
    arguments: Value,
    call_context: &CallContext,
    answer: &crate::approval::ApprovalAnswer,
    wait: Duration,
) -> Result<Option<Execution>, ApiError> {
    let Some(id) = &answer.approval_id else {
        return Ok(None);
    };
    let decided = state.gateway.wait_for_decision(id, wait).await?;
    if decided.is_none_or(|approval| approval.status == crate::approval::ApprovalStatus::Pending) {
        return Ok(None);
    }
    let execution = state
        .gateway
        .execute_call(principal, tool_name, arguments, None, call_context)
        .await?;
    Ok(Some(execution))
}

async fn record_malformed(
    state: &AppState,
    principal: &crate::principal::Principal,
    tool_name: &str,
    problem: &str,
) -> Result<(), ApiError> {
    state
        .gateway
        .record_malformed_request(principal, tool_name, problem)
        .await
        .map_err(|error| match error {
            GatewayError::AuditLowSpace => ApiError::audit_low_space(),
            _ => ApiError::audit_unavailable(),
        })
}

/// The HTTP status each outcome is answered with: 200 for a result, 403 for a
/// refusal or an unknown tool, 422 for arguments off the schema, 400 for a bad
/// tool name, 429 over a rate limit, 409 for a call that ran and failed (or was
/// cancelled), 502/504 when the upstream is unavailable or too slow.
pub fn execution_status(outcome: &Outcome) -> StatusCode {
    match outcome {
        Outcome::Executed(_) => StatusCode::OK,
        Outcome::Denied { .. } | Outcome::UnknownTool { .. } | Outcome::Guarded(_) => {
            StatusCode::FORBIDDEN
        }
        Outcome::InvalidArguments(_) => StatusCode::UNPROCESSABLE_ENTITY,
        Outcome::InvalidToolName(_) => StatusCode::BAD_REQUEST,
        Outcome::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        Outcome::Failed { .. } | Outcome::ModeChanged { .. } => StatusCode::CONFLICT,
        Outcome::Forwarded(result) if result.is_error == Some(true) => StatusCode::CONFLICT,
        Outcome::Forwarded(_) => StatusCode::OK,
        Outcome::Approval(answer) if answer.reason == crate::reason::Reason::ApprovalDenied => {
            StatusCode::FORBIDDEN
        }
        Outcome::Approval(answer) if answer.awaits_decision() => StatusCode::ACCEPTED,
        // None could be requested: too many are pending.
        Outcome::Approval(_) => StatusCode::TOO_MANY_REQUESTS,
        Outcome::UpstreamFailed { failure, .. } => match failure {
            UpstreamFailure::Unavailable | UpstreamFailure::Refused => StatusCode::BAD_GATEWAY,
            UpstreamFailure::Timeout => StatusCode::GATEWAY_TIMEOUT,
            UpstreamFailure::Cancelled => StatusCode::CONFLICT,
        },
    }
}

/// Renders an execution in the response shape of the original Python prototype,
/// from the same [`answer`] MCP renders.
pub fn tool_response(execution: Execution) -> ToolResponse {
    let answer = answer(&execution.outcome, known_tool_names);
    let mut response = ToolResponse {
        success: answer.is_none(),
        result: None,
        error: None,
        policy_violation: false,
        blocked_reason: None,
        reason_code: None,
        tool: execution.tool,
        mode: execution.mode.to_string(),
        how_to_proceed: None,
        known_tools: None,
        audit_seq: execution.audit_seq,
        retry_after_seconds: None,
        approval_required: false,
        approval_id: None,
        expires_at: None,
    };
    match execution.outcome {
        Outcome::Executed(result) => response.result = Some(result),
        // The upstream's result as MCP defines it (content blocks,
        // structuredContent), an isError result included.
        Outcome::Forwarded(result) => response.result = serde_json::to_value(&result).ok(),
        _ => {}
    }
    if let Some(answer) = answer {
        response.policy_violation = answer.policy_violation;
        response.reason_code = Some(answer.reason_code.to_string());
        response.retry_after_seconds = answer.retry_after_seconds;
        response.known_tools = answer.known_tools;
        response.how_to_proceed = Some(answer.how_to_proceed);
        response.approval_required = answer.reason_code.is_approval();
        if let Some((id, expires_at)) = answer.approval {
            response.approval_id = Some(id);
            response.expires_at = Some(expires_at);
        }
        if answer.policy_violation {
            response.blocked_reason = Some(answer.message.clone());
        }
        response.error = Some(
            match (answer.policy_violation, response.known_tools.is_some()) {
                (true, false) => format!("Policy violation: {}", answer.message),
                _ => answer.message,
            },
        );
    }
    response
}

/// The tools that exist, for an unknown tool's `known_tools`.
pub fn known_tool_names() -> Vec<String> {
    ToolName::ALL
        .iter()
        .map(|tool| tool.as_str().to_owned())
        .collect()
}

/// `GET /tools/catalog`.
pub async fn catalog(State(state): State<AppState>, _caller: Caller) -> Json<Catalog> {
    Json(Catalog {
        mode: state.gateway.status().mode,
        tools: state
            .gateway
            .catalog()
            .into_iter()
            .map(Into::into)
            .collect(),
    })
}

/// `GET /infrastructure/status`.
pub async fn infrastructure_status(State(state): State<AppState>, _caller: Caller) -> Response {
    Json(state.gateway.infrastructure_status()).into_response()
}

/// `POST /infrastructure/simulate-incident` (operator only).
pub async fn simulate_incident(
    State(state): State<AppState>,
    Operator(principal): Operator,
    ApiJson(request): ApiJson<IncidentRequest>,
) -> Result<Json<IncidentResponse>, ApiError> {
    let health = match request.status.to_ascii_lowercase().as_str() {
        "degraded" => ServiceHealth::Degraded,
        "critical" => ServiceHealth::Critical,
        _ => {
            return Err(ApiError::bad_request(
                "status must be \"degraded\" or \"critical\"",
            ));
        }
    };
    if request.service.len() > 128 {
        return Err(ApiError::bad_request("service must be at most 128 bytes"));
    }
    match state
        .gateway
        .simulate_incident(&principal, &request.service, health)
        .await
    {
        Ok(Ok(infrastructure)) => Ok(Json(IncidentResponse {
            success: true,
            message: format!("Simulated incident: {} is now {health}", request.service),
            infrastructure,
        })),
        Ok(Err(error)) => Err(ApiError::new(StatusCode::NOT_FOUND, error.to_string())),
        Err(_) => Err(ApiError::audit_unavailable()),
    }
}
