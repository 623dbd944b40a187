//! `POST /policy/reload` (operator only): reads the server's policy file again.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::auth::Operator;
use super::error::ApiError;
use crate::gateway::{ReloadError, ReloadTrigger};

/// The answer to a refused reload: the message and every problem, one per entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadRefused {
    /// What happened, with the problems listed.
    pub error: String,
    /// The problems the new file has (never its path).
    pub problems: Vec<String>,
}

/// `POST /policy/reload`: 200 with a [`crate::gateway::ReloadReport`]; 400 with the
/// problems when the new file fails its checks (the old policy stays in force); 409
/// when the server runs the built-in policy, which has no file; 503 when the audit
/// trail cannot record.
pub async fn reload(State(state): State<AppState>, Operator(principal): Operator) -> Response {
    match state
        .gateway
        .reload_policy(&principal, ReloadTrigger::Request)
        .await
    {
        Ok(report) => Json(report).into_response(),
        Err(error) => reload_error_response(error),
    }
}

fn reload_error_response(error: ReloadError) -> Response {
    let message = error.to_string();
    match error {
        ReloadError::Refused { problems } => (
            StatusCode::BAD_REQUEST,
            Json(ReloadRefused {
                error: message,
                problems,
            }),
        )
            .into_response(),
        ReloadError::NoPolicyFile => ApiError::new(StatusCode::CONFLICT, message).into_response(),
        ReloadError::NotOperator => ApiError::new(StatusCode::FORBIDDEN, message).into_response(),
        ReloadError::AuditUnavailable => ApiError::audit_unavailable().into_response(),
    }
}
