//! The operators' approval endpoints: `GET /approvals`, `POST /approvals/{id}/approve`
//! and `POST /approvals/{id}/deny` (operator token only).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;

use super::AppState;
use super::auth::{Caller, Operator};
use super::error::{ApiError, ApiJson, ApiQuery};
use crate::api::{ApprovalDecisionRequest, ApprovalList};
use crate::approval::{
    Approval, ApprovalError, ApprovalStatus, DEFAULT_APPROVAL_LIST, MAX_APPROVAL_LIST, Verdict,
};
use crate::gateway::{ApprovalDecisionError, ElevationError};

/// `GET /approvals` filters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalFilters {
    /// `pending`, `approved`, `denied`, `expired` or `consumed`; all when absent.
    #[serde(default)]
    status: Option<String>,
    /// At most this many (default 100, at most 500).
    #[serde(default)]
    limit: Option<usize>,
}

/// `GET /approvals?status=...&limit=...`, newest first.
pub async fn list(
    State(state): State<AppState>,
    _operator: Operator,
    ApiQuery(filters): ApiQuery<ApprovalFilters>,
) -> Result<Json<ApprovalList>, ApiError> {
    let status = match filters.status.as_deref() {
        None => None,
        Some(text) => Some(ApprovalStatus::parse(text).ok_or_else(|| {
            ApiError::bad_request(
                "status must be one of pending, approved, denied, expired, consumed",
            )
        })?),
    };
    let limit = filters.limit.unwrap_or(DEFAULT_APPROVAL_LIST);
    if limit == 0 || limit > MAX_APPROVAL_LIST {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_APPROVAL_LIST}"
        )));
    }
    let approvals = state.gateway.list_approvals(status, limit).await?;
    Ok(Json(ApprovalList {
        count: approvals.len(),
        approvals,
    }))
}

/// `POST /policy/request-mode {"mode", "reason", "ttl_seconds"}` with the agent
/// token: 202 and the id of a pending `mode_change` approval. The mode changes
/// only when an operator approves it.
pub async fn request_mode(
    State(state): State<AppState>,
    Caller(principal): Caller,
    ApiJson(request): ApiJson<crate::api::SetModeRequest>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let change = crate::gateway::ModeChange {
        mode: request.mode,
        reason: request.reason,
        ttl: request.ttl_seconds.map(std::time::Duration::from_secs),
    };
    let approval = state
        .gateway
        .request_mode_change(&principal, change)
        .await
        .map_err(|error| match error {
            ElevationError::Disabled | ElevationError::NotAgent => {
                ApiError::new(StatusCode::FORBIDDEN, error.to_string())
            }
            ElevationError::TooManyPending(_) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, error.to_string())
            }
            ElevationError::Invalid(error) => ApiError::from(error),
            ElevationError::Gateway(error) => ApiError::from(error),
        })?;
    let body = serde_json::json!({
        "success": false,
        "approval_required": true,
        "approval_id": approval.id,
        "kind": approval.binding.kind,
        "mode": approval.binding.target,
        "expires_at": crate::audit::format_time(approval.expires_at),
        "how_to_proceed": format!(
            "An operator must approve {} (proxi approvals approve {} --reason ...); the mode changes only then. Watch /policy/status.",
            approval.id, approval.id
        ),
    });
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// `POST /approvals/{id}/approve {"reason"}`.
pub async fn approve(
    State(state): State<AppState>,
    Operator(principal): Operator,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<ApprovalDecisionRequest>,
) -> Result<Json<Approval>, ApiError> {
    decide(&state, &principal, &id, Verdict::Approve, &request.reason).await
}

/// `POST /approvals/{id}/deny {"reason"}`.
pub async fn deny(
    State(state): State<AppState>,
    Operator(principal): Operator,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<ApprovalDecisionRequest>,
) -> Result<Json<Approval>, ApiError> {
    decide(&state, &principal, &id, Verdict::Deny, &request.reason).await
}

async fn decide(
    state: &AppState,
    principal: &crate::principal::Principal,
    id: &str,
    verdict: Verdict,
    reason: &str,
) -> Result<Json<Approval>, ApiError> {
    state
        .gateway
        .decide_approval(principal, id, verdict, reason)
        .await
        .map(Json)
        .map_err(ApiError::from)
}

impl From<ApprovalDecisionError> for ApiError {
    fn from(error: ApprovalDecisionError) -> ApiError {
        let message = error.to_string();
        match error {
            ApprovalDecisionError::NotOperator | ApprovalDecisionError::OwnRequest => {
                ApiError::new(StatusCode::FORBIDDEN, message)
            }
            ApprovalDecisionError::BadReason => ApiError::bad_request(message),
            ApprovalDecisionError::State(ApprovalError::NotFound) => {
                ApiError::new(StatusCode::NOT_FOUND, message)
            }
            ApprovalDecisionError::State(_) => ApiError::new(StatusCode::CONFLICT, message),
            ApprovalDecisionError::ModeChange(error) => ApiError::from(error),
            ApprovalDecisionError::Gateway(error) => ApiError::from(error),
        }
    }
}
