//! The seed's REST API, on top of the gateway.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;

use super::AppState;
use super::auth::{Caller, Operator};
use super::error::{ApiError, ApiJson, ApiQuery, NamedJson};
use crate::api::{
    AuditPage, Catalog, DEFAULT_AUDIT_LIMIT, ExecuteRequest, Health, IncidentRequest,
    IncidentResponse, MAX_AUDIT_LIMIT, SetModeRequest, SetModeResponse, ToolResponse,
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
pub async fn policy_status(State(state): State<AppState>, _caller: Caller) -> Response {
    Json(state.gateway.status()).into_response()
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
        status: switch.status,
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

/// The HTTP status the issue assigns to each outcome.
pub fn execution_status(outcome: &Outcome) -> StatusCode {
    match outcome {
        Outcome::Executed(_) => StatusCode::OK,
        Outcome::Denied { .. } | Outcome::UnknownTool { .. } => StatusCode::FORBIDDEN,
        Outcome::InvalidArguments(_) => StatusCode::UNPROCESSABLE_ENTITY,
        Outcome::InvalidToolName(_) => StatusCode::BAD_REQUEST,
        Outcome::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        Outcome::Failed { .. } => StatusCode::CONFLICT,
        Outcome::Forwarded(result) if result.is_error == Some(true) => StatusCode::CONFLICT,
        Outcome::Forwarded(_) => StatusCode::OK,
        Outcome::UpstreamFailed { failure, .. } => match failure {
            UpstreamFailure::Unavailable | UpstreamFailure::Refused => StatusCode::BAD_GATEWAY,
            UpstreamFailure::Timeout => StatusCode::GATEWAY_TIMEOUT,
            UpstreamFailure::Cancelled => StatusCode::CONFLICT,
        },
    }
}

/// Renders an execution in the seed's response shape.
pub fn tool_response(execution: Execution) -> ToolResponse {
    let reason_code = execution.outcome.reason_code().map(str::to_owned);
    let retry_after_seconds = execution.outcome.retry_after_seconds();
    let policy_violation = execution.outcome.is_policy_violation();
    let mut response = ToolResponse {
        success: false,
        result: None,
        error: None,
        policy_violation,
        blocked_reason: None,
        reason_code,
        tool: execution.tool,
        mode: execution.mode.to_string(),
        how_to_proceed: None,
        known_tools: None,
        audit_seq: execution.audit_seq,
        retry_after_seconds,
    };
    match execution.outcome {
        Outcome::Executed(result) => {
            response.success = true;
            response.result = Some(result);
        }
        Outcome::Denied {
            message,
            how_to_proceed,
            ..
        } => {
            response.error = Some(format!("Policy violation: {message}"));
            response.blocked_reason = Some(message);
            response.how_to_proceed = Some(how_to_proceed);
        }
        Outcome::UnknownTool { message } => {
            response.error = Some(message.clone());
            response.blocked_reason = Some(message);
            response.known_tools = Some(
                ToolName::ALL
                    .iter()
                    .map(|tool| tool.as_str().to_owned())
                    .collect(),
            );
            response.how_to_proceed =
                Some("Use one of the tools listed in known_tools.".to_owned());
        }
        Outcome::InvalidArguments(message)
        | Outcome::InvalidToolName(message)
        | Outcome::Failed { message, .. } => {
            response.error = Some(message);
        }
        Outcome::RateLimited { .. } => {
            response.error = Some(rate_limited_message(retry_after_seconds));
            response.how_to_proceed =
                Some("Slow down: wait retry_after_seconds, then send the call again.".to_owned());
        }
        // The upstream's result as MCP defines it (content blocks,
        // structuredContent); an isError result is a failure of the tool.
        Outcome::Forwarded(result) => {
            response.success = result.is_error != Some(true);
            if !response.success {
                response.error = Some(format!(
                    "the upstream tool reported an error: {}",
                    first_text(&result)
                ));
            }
            response.result = serde_json::to_value(&result).ok();
        }
        Outcome::UpstreamFailed { failure, message } => {
            response.error = Some(message);
            response.how_to_proceed = Some(crate::mcp::upstream_how_to_proceed(failure).to_owned());
        }
    }
    response
}

/// The first text block of an upstream result, cut to 1 KiB, for the `error` field.
fn first_text(result: &rmcp::model::CallToolResult) -> String {
    let text = result
        .content
        .iter()
        .find_map(|block| block.as_text().map(|text| text.text.as_str()))
        .unwrap_or("(no text)");
    crate::gateway::truncate(text, 1024).to_owned()
}

/// What a rate-limited caller is told; the REST and MCP answers share it.
pub fn rate_limited_message(retry_after_seconds: Option<u64>) -> String {
    format!(
        "Rate limit exceeded: too many tool calls from this principal. Retry after {} s.",
        retry_after_seconds.unwrap_or(1)
    )
}

/// `GET /tools/catalog`.
pub async fn catalog(State(state): State<AppState>, _caller: Caller) -> Json<Catalog> {
    Json(Catalog {
        mode: state.gateway.status().mode,
        tools: state.gateway.catalog(),
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

/// Query of `GET /audit`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    limit: Option<u32>,
}

/// `GET /audit?limit=N` (operator only).
pub async fn audit(
    State(state): State<AppState>,
    _operator: Operator,
    ApiQuery(query): ApiQuery<AuditQuery>,
) -> Result<Json<AuditPage>, ApiError> {
    let limit = query.limit.unwrap_or(DEFAULT_AUDIT_LIMIT);
    if !(1..=MAX_AUDIT_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_AUDIT_LIMIT}"
        )));
    }
    let gateway = state.gateway.clone();
    let records = tokio::task::spawn_blocking(move || gateway.audit().recent(limit))
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error"))?
        .map_err(|error| {
            tracing::error!(%error, "reading the audit trail failed");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the audit trail could not be read",
            )
        })?;
    let in_flight = state.gateway.in_flight_intents();
    let outcome_unknown = crate::audit_view::unresolved_intents(&records)
        .into_iter()
        .filter(|seq| !in_flight.contains(seq))
        .collect();
    Ok(Json(AuditPage {
        count: records.len(),
        records,
        outcome_unknown,
    }))
}
