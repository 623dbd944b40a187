//! `/mcp`: rmcp's Streamable HTTP service behind Proxi's guard.
//!
//! Every request passes the guard before rmcp sees it, in this order:
//! 1. Host and Origin must name this server (loopback names or the bound address,
//!    with the bound port): DNS-rebinding protection, answered with 403;
//! 2. the bearer token, exactly as REST checks it (401, audited);
//! 3. a POST body is read up to the REST limit (413) and must be a JSON-RPC
//!    message, else the answer is a JSON-RPC error (rmcp itself would answer
//!    malformed bodies with plain text).
//!
//! 4. a request naming a session (`Mcp-Session-Id`) must come with the token that
//!    opened it, else 404 as for an unknown session (audited in aggregate);
//! 5. an `initialize` must fit the session limits of [`super::sessions`]
//!    (429/503 with a JSON-RPC error, audited in aggregate), and the session id
//!    rmcp answers with is bound to the caller's principal.
//!
//! The token's principal travels to the handler in the request's extensions,
//! which rmcp hands over as `http::request::Parts` in the `RequestContext`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::header::{CONTENT_TYPE, HOST, ORIGIN};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use rmcp::model::{
    ClientJsonRpcMessage, ClientRequest, ErrorData, RequestId, ServerJsonRpcMessage,
};
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::sessions::{BoundSessions, SessionRefusal, SessionRegistry};
use super::{McpShared, Transport, misparsed_standard_request};
use crate::api::MAX_BODY_BYTES;
use crate::reason::Reason;
use crate::server::auth::{authenticate, peer_source};
use crate::server::refusals::RefusalTally;
use crate::server::{AppState, Edge, error_response};

/// Where `/mcp` is mounted.
pub const MCP_PATH: &str = "/mcp";
/// The header naming a legacy session.
const SESSION_HEADER: &str = "mcp-session-id";
/// JSON-RPC error code of a refused session (implementation-defined range).
pub const SESSION_REFUSED_CODE: i32 = -32001;

/// The `/mcp` route with its guard, ready to merge into the REST router.
///
/// `bound` is the listening address (for the Host/Origin check); cancelling
/// `shutdown` ends every MCP session and stream, so the server can stop. `edge`
/// gives the session limits and the tally that audits refusals.
pub fn routes(
    state: AppState,
    bound: SocketAddr,
    shutdown: CancellationToken,
    edge: &Edge,
) -> Router<AppState> {
    let allowed = Arc::new(AllowedAuthorities::for_address(bound));
    let config = StreamableHttpServerConfig::default()
        // The guard is authoritative; rmcp gets the same lists as a second line.
        .with_allowed_hosts(allowed.host_entries())
        .with_allowed_origins(allowed.origin_entries())
        .enforce_origin_validation()
        .with_max_request_body_bytes(MAX_BODY_BYTES)
        .with_cancellation_token(shutdown);
    let shared = McpShared::new(state.gateway.clone());
    let sessions = SessionRegistry::new(&edge.limits);
    let service = StreamableHttpService::new(
        move || Ok(shared.handler(Transport::Http)),
        Arc::new(BoundSessions::new(
            sessions.clone(),
            edge.limits.session_idle_timeout,
        )),
        config,
    );
    let guard = Guard {
        state,
        allowed,
        sessions,
        refusals: edge.refusals.clone(),
    };
    Router::new()
        .route_service(MCP_PATH, service)
        .layer(from_fn_with_state(guard, guard_mcp))
}

#[derive(Clone)]
struct Guard {
    state: AppState,
    allowed: Arc<AllowedAuthorities>,
    sessions: Arc<SessionRegistry>,
    refusals: Arc<RefusalTally>,
}

/// The host names and port under which this server may be addressed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowedAuthorities {
    hosts: Vec<String>,
    port: u16,
}

impl AllowedAuthorities {
    /// Loopback names plus the bound IP, all with the bound port.
    pub fn for_address(bound: SocketAddr) -> AllowedAuthorities {
        let mut hosts = vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        let own = bound.ip().to_string();
        if !hosts.contains(&own) {
            hosts.push(own);
        }
        AllowedAuthorities {
            hosts,
            port: bound.port(),
        }
    }

    fn authority(host: &str, port: u16) -> String {
        if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        }
    }

    fn host_entries(&self) -> Vec<String> {
        self.hosts
            .iter()
            .map(|host| Self::authority(host, self.port))
            .collect()
    }

    fn origin_entries(&self) -> Vec<String> {
        self.hosts
            .iter()
            .flat_map(|host| {
                let authority = Self::authority(host, self.port);
                [
                    format!("http://{authority}"),
                    format!("https://{authority}"),
                ]
            })
            .collect()
    }

    fn allows(&self, host: &str, port: u16) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        port == self.port
            && self
                .hosts
                .iter()
                .any(|allowed| allowed.eq_ignore_ascii_case(host))
    }

    /// Checks the Host (or HTTP/2 `:authority`) and, if present, the Origin header.
    pub fn check(&self, uri: &Uri, headers: &HeaderMap) -> Result<(), &'static str> {
        let host = match headers.get(HOST) {
            Some(value) => value.to_str().ok(),
            None => uri.authority().map(|authority| authority.as_str()),
        }
        .ok_or("a Host header naming this server is required")?;
        let (host, port) = split_authority(host, 80).ok_or("malformed Host header")?;
        if !self.allows(host, port) {
            return Err("the Host header does not name this server (DNS-rebinding protection)");
        }
        let Some(origin) = headers.get(ORIGIN) else {
            return Ok(());
        };
        let origin = origin.to_str().map_err(|_| "malformed Origin header")?;
        let (scheme, authority) = origin
            .split_once("://")
            .ok_or("the Origin header does not name this server")?;
        let default_port = match scheme.to_ascii_lowercase().as_str() {
            "http" => 80,
            "https" => 443,
            _ => return Err("the Origin header does not name this server"),
        };
        match split_authority(authority, default_port) {
            Some((host, port)) if self.allows(host, port) => Ok(()),
            _ => Err("the Origin header does not name this server (DNS-rebinding protection)"),
        }
    }
}

/// Splits `host[:port]` (IPv6 in brackets); `None` if it is not an authority.
fn split_authority(authority: &str, default_port: u16) -> Option<(&str, u16)> {
    if authority.is_empty() || authority.contains(['/', '@', ' ']) {
        return None;
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':')?)),
        }
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return None;
    }
    let port = match port {
        Some(port) => port.parse().ok()?,
        None => default_port,
    };
    Some((host, port))
}

async fn guard_mcp(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    if let Err(reason) = guard.allowed.check(request.uri(), request.headers()) {
        tracing::warn!(
            host = ?request.headers().get(HOST),
            origin = ?request.headers().get(ORIGIN),
            "refused an /mcp request: {reason}"
        );
        return error_response(StatusCode::FORBIDDEN, reason);
    }
    let (mut parts, body) = request.into_parts();
    let principal = match authenticate(&parts, &guard.state).await {
        Ok(principal) => principal,
        Err(refusal) => return refusal,
    };
    let owner = principal.name().clone();
    let session = parts
        .headers
        .get(SESSION_HEADER)
        .map(|value| value.to_str().unwrap_or_default().to_owned());
    if let Some(id) = &session {
        match guard.sessions.owner(id) {
            Some(holder) if holder == owner => {}
            holder => {
                // Unknown and foreign ids get the same answer, so another token's
                // session ids are not confirmed; only the foreign use is audited.
                if holder.is_some() {
                    let request = format!("{} {MCP_PATH}", parts.method);
                    let source = peer_source(&parts);
                    if guard
                        .refusals
                        .refuse(&principal, &source, &request, Reason::ForeignSession)
                        .await
                        .is_err()
                    {
                        return error_response(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "the audit trail is unavailable; Proxi refuses to act without a record",
                        );
                    }
                }
                return error_response(
                    StatusCode::NOT_FOUND,
                    "no such MCP session for this token; start a new one with initialize",
                );
            }
        }
    }
    parts.extensions.insert(principal.clone());
    if parts.method == Method::DELETE {
        let mut response = next.run(Request::from_parts(parts, body)).await;
        // rmcp acknowledges a session's end with 202; clients such as the Python
        // SDK expect 200 or 204 and log anything else as a failed termination.
        if response.status() == StatusCode::ACCEPTED {
            *response.status_mut() = StatusCode::NO_CONTENT;
        }
        return response;
    }
    if parts.method != Method::POST || !is_json(parts.headers.get(CONTENT_TYPE)) {
        // rmcp answers these itself (405, 406, 415, SSE streams).
        return next.run(Request::from_parts(parts, body)).await;
    }
    let bytes = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.is::<LengthLimitError>() => {
            return error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!(
                    "request body exceeds the {} KiB limit",
                    MAX_BODY_BYTES / 1024
                ),
            );
        }
        Err(_) => {
            return error_response(StatusCode::BAD_REQUEST, "could not read the request body");
        }
    };
    if let Some((id, error)) = json_rpc_problem(&bytes) {
        return json_rpc_error(id, error);
    }
    let reservation = match (session, initialize_id(&bytes)) {
        (None, Some(id)) => match guard.sessions.reserve(&owner) {
            Ok(reservation) => Some(reservation),
            Err(refusal) => {
                let source = peer_source(&parts);
                let request = format!("POST {MCP_PATH} initialize");
                if guard
                    .refusals
                    .refuse(&principal, &source, &request, refusal.reason_code())
                    .await
                    .is_err()
                {
                    return error_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the audit trail is unavailable; Proxi refuses to act without a record",
                    );
                }
                return session_refused(id, refusal);
            }
        },
        _ => None,
    };
    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    if let Some(reservation) = reservation
        && let Some(id) = response
            .headers()
            .get(SESSION_HEADER)
            .and_then(|value| value.to_str().ok())
    {
        reservation.bind(Arc::from(id));
    }
    response
}

/// The id of an `initialize` request, which opens a legacy session; `None` otherwise.
fn initialize_id(body: &Bytes) -> Option<RequestId> {
    #[derive(serde::Deserialize)]
    struct Head {
        method: Option<String>,
        id: Option<RequestId>,
    }
    let head: Head = serde_json::from_slice(body).ok()?;
    match head.method.as_deref() {
        Some("initialize") => head.id,
        _ => None,
    }
}

fn session_refused(id: RequestId, refusal: SessionRefusal) -> Response {
    let error = ErrorData::new(
        rmcp::model::ErrorCode(SESSION_REFUSED_CODE),
        refusal.message(),
        Some(serde_json::json!({"reason_code": refusal.reason_code().as_str()})),
    );
    let mut response = json_rpc_error(Some(id), error);
    *response.status_mut() = refusal.status();
    response
        .headers_mut()
        .insert("retry-after", HeaderValue::from_static("10"));
    response
}

fn is_json(content_type: Option<&HeaderValue>) -> bool {
    content_type
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// `None` for a body rmcp can serve; otherwise the JSON-RPC error to answer with.
fn json_rpc_problem(body: &Bytes) -> Option<(Option<RequestId>, ErrorData)> {
    match serde_json::from_slice::<ClientJsonRpcMessage>(body) {
        Ok(ClientJsonRpcMessage::Request(request)) => {
            // Answered here too: without a session rmcp would not reach the handler.
            if let ClientRequest::CustomRequest(custom) = &request.request
                && let Some(error) = misparsed_standard_request(&custom.method)
            {
                return Some((Some(request.id), error));
            }
            return None;
        }
        Ok(_) => return None,
        Err(_) => {}
    }
    let value: Value = match serde_json::from_slice(body) {
        Ok(value) => value,
        Err(error) => {
            let message = format!("Parse error: {error}");
            return Some((None, ErrorData::parse_error(message, None)));
        }
    };
    let id = value
        .get("id")
        .and_then(|id| serde_json::from_value::<RequestId>(id.clone()).ok());
    let is_request = value.get("jsonrpc").and_then(Value::as_str) == Some("2.0")
        && value.get("method").is_some_and(Value::is_string)
        && id.is_some();
    // Unknown methods parse fine (rmcp answers them "method not found"), so a
    // well-formed request that still fails must have unusable params.
    let error = if is_request {
        let method = value
            .get("method")
            .and_then(Value::as_str)
            .unwrap_or_default();
        ErrorData::invalid_params(format!("Invalid params for method '{method}'"), None)
    } else {
        ErrorData::invalid_request(
            "Invalid Request: expected one JSON-RPC 2.0 request, notification or response",
            None,
        )
    };
    Some((id, error))
}

fn json_rpc_error(id: Option<RequestId>, error: ErrorData) -> Response {
    let message = ServerJsonRpcMessage::error(error, id);
    match serde_json::to_vec(&message) {
        Ok(body) => (
            StatusCode::BAD_REQUEST,
            [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            body,
        )
            .into_response(),
        Err(_) => error_response(StatusCode::BAD_REQUEST, "malformed JSON-RPC message"),
    }
}

#[cfg(test)]
mod tests {
    use rmcp::model::ErrorCode;

    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(*name, HeaderValue::from_str(value).expect("valid header"));
        }
        headers
    }

    fn allowed() -> AllowedAuthorities {
        AllowedAuthorities::for_address(SocketAddr::from(([127, 0, 0, 1], 8123)))
    }

    #[test]
    fn loopback_hosts_on_the_bound_port_pass() {
        let uri = Uri::from_static("/mcp");
        for host in [
            "localhost:8123",
            "127.0.0.1:8123",
            "[::1]:8123",
            "LOCALHOST:8123",
        ] {
            assert_eq!(
                allowed().check(&uri, &headers(&[("host", host)])),
                Ok(()),
                "{host}"
            );
        }
        let with_origin = headers(&[
            ("host", "localhost:8123"),
            ("origin", "http://127.0.0.1:8123"),
        ]);
        assert_eq!(allowed().check(&uri, &with_origin), Ok(()));
    }

    #[test]
    fn foreign_hosts_ports_and_origins_are_refused() {
        let uri = Uri::from_static("/mcp");
        for host in [
            "evil.example.com",
            "evil.example.com:8123",
            "localhost:9999",
            "localhost",
            "127.0.0.1:8123@evil",
            "::1:8123",
            "",
        ] {
            assert!(
                allowed().check(&uri, &headers(&[("host", host)])).is_err(),
                "{host}"
            );
        }
        for origin in [
            "http://evil.example.com",
            "http://localhost:9999",
            "null",
            "file://localhost:8123",
            "http://localhost",
        ] {
            let request = headers(&[("host", "localhost:8123"), ("origin", origin)]);
            assert!(allowed().check(&uri, &request).is_err(), "{origin}");
        }
        assert!(allowed().check(&uri, &HeaderMap::new()).is_err());
    }

    #[test]
    fn the_bound_address_is_allowed_too() {
        let allowed = AllowedAuthorities::for_address(SocketAddr::from(([10, 1, 2, 3], 80)));
        let uri = Uri::from_static("/mcp");
        assert_eq!(
            allowed.check(&uri, &headers(&[("host", "10.1.2.3")])),
            Ok(())
        );
        assert!(allowed.host_entries().contains(&"[::1]:80".to_owned()));
        assert!(
            allowed
                .origin_entries()
                .contains(&"http://10.1.2.3:80".to_owned())
        );
    }

    #[test]
    fn malformed_bodies_get_json_rpc_errors() {
        let parse = json_rpc_problem(&Bytes::from_static(b"{not json"));
        assert_eq!(
            parse.map(|(_, error)| error.code),
            Some(ErrorCode::PARSE_ERROR)
        );
        assert!(json_rpc_problem(&Bytes::from_static(b"[]")).is_some());
        assert!(json_rpc_problem(&Bytes::from_static(br#"{"hello":1}"#)).is_some());
        let ping = br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
        assert!(json_rpc_problem(&Bytes::from_static(ping)).is_none());
        let unknown = br#"{"jsonrpc":"2.0","id":1,"method":"server/whatever","params":{}}"#;
        assert!(json_rpc_problem(&Bytes::from_static(unknown)).is_none());
        let bad_params = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":5}}"#;
        let invalid = json_rpc_problem(&Bytes::from_static(bad_params));
        assert_eq!(
            invalid.map(|(_, error)| error.code),
            Some(ErrorCode::INVALID_PARAMS)
        );
    }
}
