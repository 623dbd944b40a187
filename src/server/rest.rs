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
use crate::api::{
    Catalog, ExecuteRequest, Health, IncidentRequest, IncidentResponse, SetModeRequest,
    ToolResponse,
};
use crate::gateway::{Execution, GatewayError, ModeChange, ModeChangeError, Outcome};
use crate::infra::ServiceHealth;
use crate::tools::{MAX_TOOL_NAME_LEN, ToolName};

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
    match state.gateway.set_mode(&principal, change).await {
        Ok(status) => Ok(Json(status).into_response()),
        Err(ModeChangeError::AuditUnavailable) => Err(ApiError::audit_unavailable()),
        Err(ModeChangeError::NotOperator) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ModeChangeError::NotOperator.to_string(),
        )),
        Err(error) => Err(ApiError::bad_request(error.to_string())),
    }
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
    let execution = state
        .gateway
        .execute_with_context(&principal, &request.tool_name, request.arguments, context)
        .await
        .map_err(|error| match error {
            GatewayError::AuditUnavailable => ApiError::audit_unavailable(),
            GatewayError::AuditLowSpace => ApiError::audit_low_space(),
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
        })?;
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
    }
    response
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
