//! Bearer-token authentication for REST and `/mcp`, with refusals audited.
//!
//! Refusals go through the server's [`RefusalTally`]: the first of a window per
//! (principal, peer address, reason) is recorded before the answer goes out, the
//! rest are counted into one summary record, so a flood of bad tokens cannot
//! flood the audit trail.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::refusals::RefusalTally;
use super::{AppState, Edge};
use crate::principal::{Principal, Role};
use crate::tokens::Authentication;

/// Any caller holding a valid token (agent or operator).
pub struct Caller(pub Principal);

/// A caller holding the operator token.
pub struct Operator(pub Principal);

impl FromRequestParts<AppState> for Caller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        authenticate(parts, state).await.map(Caller)
    }
}

impl FromRequestParts<AppState> for Operator {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let principal = authenticate(parts, state).await?;
        if principal.role() == Role::Operator {
            return Ok(Operator(principal));
        }
        if refuse(parts, state, &principal, "forbidden").await.is_err() {
            return Err(ApiError::audit_unavailable().into_response());
        }
        let message = if state.tokens.has_operator() {
            "this endpoint requires the operator token; the agent token may not use it"
        } else {
            "this server has no operator endpoint: `proxi mcp` was started without an operator credential (--operator-credential), so the mode cannot be changed here"
        };
        Err(ApiError::new(StatusCode::FORBIDDEN, message).into_response())
    }
}

/// Checks the `Authorization: Bearer` header; a refusal is audited before the 401 goes out.
pub async fn authenticate(parts: &Parts, state: &AppState) -> Result<Principal, Response> {
    let presented = parts
        .headers
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(bearer_token);
    let (reason, message) = match presented {
        Some(token) => match state.tokens.check(token) {
            Authentication::Accepted(principal) => return Ok(principal),
            refused => (
                refused.refusal_reason().unwrap_or("invalid_token"),
                "the bearer token is not valid",
            ),
        },
        None => (
            "missing_token",
            "missing credentials: send Authorization: Bearer <token>",
        ),
    };
    if refuse(parts, state, &Principal::anonymous(), reason)
        .await
        .is_err()
    {
        return Err(ApiError::audit_unavailable().into_response());
    }
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, message).into_response();
    response
        .headers_mut()
        .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    Err(response)
}

/// Whether the request carries the operator token (checked again, and audited,
/// by the extractors; this only decides which share of the server it may use).
pub fn presents_operator_token(parts_headers: &axum::http::HeaderMap, state: &AppState) -> bool {
    parts_headers
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(bearer_token)
        .and_then(|token| state.tokens.authenticate(token))
        .is_some_and(|principal| principal.role() == Role::Operator)
}

fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|token| !token.is_empty())
}

/// Audits one refusal: through the server's tally when there is one (every
/// request served by `BoundServer` has it), else as a record of its own.
async fn refuse(
    parts: &Parts,
    state: &AppState,
    principal: &Principal,
    reason: &'static str,
) -> Result<(), crate::gateway::GatewayError> {
    let what = describe(parts);
    match parts.extensions.get::<Edge>() {
        Some(edge) => {
            let tally: &RefusalTally = &edge.refusals;
            tally
                .refuse(principal, &peer_source(parts), &what, reason)
                .await
        }
        None => {
            state
                .gateway
                .record_auth_refusal(principal, &what, reason)
                .await
        }
    }
}

/// The peer's IP address as refusal records name the source, or `unknown`.
pub fn peer_source(parts: &Parts) -> String {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "unknown".to_owned(), |info| info.0.ip().to_string())
}

fn describe(parts: &Parts) -> String {
    format!("{} {}", parts.method, parts.uri.path())
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

    #[test]
    fn bearer_tokens_are_parsed_leniently_but_exactly() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer   abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("abc"), None);
    }
}
