//! Error responses and the JSON/query extractors that turn bad input into them.
//!
//! Every rejection becomes `{"error": "..."}` with a 4xx status. Messages describe
//! what was wrong with the request and never carry paths, SQL or backtraces.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

use crate::api::{ErrorBody, MAX_BODY_BYTES};
use crate::gateway::{GatewayError, ModeChangeError};

/// An error answer: a status and a safe message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The message for the client.
    pub message: String,
}

impl ApiError {
    /// An error with this status and message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    /// 400 Bad Request.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    /// 503, for when the audit trail cannot record: Proxi refuses to act unrecorded.
    pub fn audit_unavailable() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the audit trail is unavailable; Proxi refuses to act without a record",
        )
    }

    /// 503: free disk space is below the operators' reserve, so agent calls wait.
    pub fn audit_low_space() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "disk space for the audit trail is low: agent calls are refused until an operator frees space (operator actions still work)",
        )
    }
}

/// A gateway failure as the caller sees it: 503 when the audit trail cannot
/// record (nothing runs unrecorded), otherwise a 500 with no details.
impl From<GatewayError> for ApiError {
    fn from(error: GatewayError) -> ApiError {
        match error {
            GatewayError::AuditUnavailable => ApiError::audit_unavailable(),
            GatewayError::AuditLowSpace => ApiError::audit_low_space(),
            GatewayError::ApprovalsUnavailable => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the approval store is unavailable; calls that need approval are refused",
            ),
            other => {
                tracing::error!(error = %other, "request failed inside the gateway");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
            }
        }
    }
}

/// A refused mode change: 503 when it could not be recorded, 403 for a caller
/// who is not an operator, 400 for a change the rules refuse.
impl From<ModeChangeError> for ApiError {
    fn from(error: ModeChangeError) -> ApiError {
        match error {
            ModeChangeError::AuditUnavailable => ApiError::audit_unavailable(),
            ModeChangeError::NotOperator => ApiError::new(StatusCode::FORBIDDEN, error.to_string()),
            other => ApiError::bad_request(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}

/// `Json<T>` whose rejections are [`ApiError`]s.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "expected a JSON body with Content-Type: application/json",
        ),
        JsonRejection::JsonSyntaxError(error) => ApiError::bad_request(format!(
            "malformed JSON: {}",
            serde_cause(&error.body_text())
        )),
        JsonRejection::JsonDataError(error) => ApiError::bad_request(format!(
            "invalid request body: {}",
            serde_cause(&error.body_text())
        )),
        JsonRejection::BytesRejection(error) if error.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "request body exceeds the {} KiB limit",
                    MAX_BODY_BYTES / 1024
                ),
            )
        }
        _ => ApiError::bad_request("could not read the request body"),
    }
}

/// A JSON body that either parsed into `T`, or did not and may still name a tool.
///
/// `POST /tools/execute` uses it so that a malformed request which names a tool
/// (an extra field, a wrong type) can be audited as `rejected` under that name.
pub enum NamedJson<T> {
    /// The body parsed.
    Parsed(T),
    /// It did not: the error to answer with, and the body's `tool_name` if it has one.
    Malformed {
        /// The 4xx to answer.
        error: ApiError,
        /// The string in the body's top-level `tool_name`, if any.
        tool_name: Option<String>,
    },
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for NamedJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let (parts, body) = request.into_parts();
        let bytes = match Bytes::from_request(Request::from_parts(parts.clone(), body), state).await
        {
            Ok(bytes) => bytes,
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "request body exceeds the {} KiB limit",
                        MAX_BODY_BYTES / 1024
                    ),
                ));
            }
            Err(_) => return Err(ApiError::bad_request("could not read the request body")),
        };
        // axum's own extractor decides, content type included, on the bytes read.
        let replay = Request::from_parts(parts, axum::body::Body::from(bytes.clone()));
        match Json::<T>::from_request(replay, state).await {
            Ok(Json(value)) => Ok(NamedJson::Parsed(value)),
            Err(rejection) => Ok(NamedJson::Malformed {
                error: json_rejection(rejection),
                tool_name: named_tool(&bytes),
            }),
        }
    }
}

/// The top-level `tool_name` string of a JSON object body, if there is one.
fn named_tool(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Named {
        tool_name: String,
    }
    serde_json::from_slice::<Named>(body)
        .ok()
        .map(|named| named.tool_name)
}

/// axum prefixes serde's message with its own sentence; keep serde's part.
fn serde_cause(text: &str) -> &str {
    text.split_once(": ").map_or(text, |(_, cause)| cause)
}

/// `Query<T>` whose rejections are [`ApiError`]s.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(ApiQuery(value)),
            Err(QueryRejection::FailedToDeserializeQueryString(error)) => {
                Err(ApiError::bad_request(format!(
                    "invalid query string: {}",
                    serde_cause(&error.body_text())
                )))
            }
            Err(_) => Err(ApiError::bad_request("invalid query string")),
        }
    }
}
