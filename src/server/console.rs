//! The operator console at `/console`: one page served from the binary (HTML, CSS
//! and JS embedded with `include_str!`, no third-party code), a login that trades
//! the operator token for a session cookie, and the JSON/SSE endpoints the page uses.
//!
//! The console's endpoints live under `/console/api/` and accept only the session
//! cookie, never a bearer token, so the REST API keeps its own rules; the cookie
//! is `HttpOnly` and `SameSite=Strict`, every state-changing request must carry
//! the session's CSRF token and an `Origin` header, and the Host/Origin check of
//! every route (DNS-rebinding protection) applies here as well.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, FromRequestParts, Path, State};
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, COOKIE, LOCATION, ORIGIN,
    REFERRER_POLICY, SET_COOKIE, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Json, Router};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::audit_api::{self, AuditFilters, StreamShutdown};
use super::error::{ApiError, ApiJson, ApiQuery};
use super::{AppState, Edge};
use crate::api::{ApprovalDecisionRequest, ApprovalList};
use crate::approval::{ApprovalStatus, MAX_PENDING_APPROVALS, Verdict};
use crate::audit::EntryKind;
use crate::gateway::{Gateway, ModeChange, ModeChangeError, PolicyStatus};
use crate::infra::InfrastructureStatus;
use crate::principal::{Principal, Role};
use crate::reason::Reason;
use crate::tokens::Authentication;

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "proxi_console";
/// Header that carries the CSRF token on `fetch` requests.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a session lasts after login, whatever its use.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(8 * 60 * 60);
/// Most sessions at once; a login at the cap ends the oldest session.
pub const MAX_SESSIONS: usize = 64;

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const LOGIN_HTML: &str = include_str!("../../assets/console/login.html");
const APP_HTML: &str = include_str!("../../assets/console/app.html");
const APP_JS: &str = include_str!("../../assets/console/app.js");
const APP_CSS: &str = include_str!("../../assets/console/app.css");

/// One logged-in browser.
#[derive(Clone, Debug)]
struct Session {
    principal: Principal,
    /// SHA-256 of the token the session was opened with: checked again on every
    /// request, so a revoked token ends its sessions too.
    token_digest: [u8; 32],
    csrf: String,
    created: Instant,
}

/// The bounded table of console sessions, keyed by the SHA-256 of the cookie
/// value (a lookup reveals nothing about other sessions through timing).
#[derive(Debug)]
pub struct ConsoleSessions {
    table: Mutex<HashMap<[u8; 32], Session>>,
    lifetime: Duration,
    max: usize,
}

impl Default for ConsoleSessions {
    fn default() -> ConsoleSessions {
        ConsoleSessions::new(SESSION_LIFETIME, MAX_SESSIONS)
    }
}

impl ConsoleSessions {
    /// A table of at most `max` sessions, each valid for `lifetime`.
    pub fn new(lifetime: Duration, max: usize) -> ConsoleSessions {
        ConsoleSessions {
            table: Mutex::new(HashMap::new()),
            lifetime,
            max: max.max(1),
        }
    }

    /// Opens a session for `principal`: its cookie value and CSRF token.
    fn open(&self, principal: Principal, token_digest: [u8; 32]) -> Option<(String, String)> {
        let id = crate::tokens::generate_token().ok()?;
        let csrf = crate::tokens::generate_token().ok()?;
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let lifetime = self.lifetime;
        table.retain(|_, session| session.created.elapsed() < lifetime);
        if table.len() >= self.max
            && let Some(oldest) = table
                .iter()
                .min_by_key(|(_, session)| session.created)
                .map(|(key, _)| *key)
        {
            table.remove(&oldest);
        }
        table.insert(
            key_of(&id),
            Session {
                principal,
                token_digest,
                csrf: csrf.clone(),
                created: Instant::now(),
            },
        );
        Some((id, csrf))
    }

    fn find(&self, id: &str) -> Option<Session> {
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let key = key_of(id);
        match table.get(&key) {
            Some(session) if session.created.elapsed() < self.lifetime => Some(session.clone()),
            Some(_) => {
                table.remove(&key);
                None
            }
            None => None,
        }
    }

    fn close(&self, id: &str) {
        self.table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&key_of(id));
    }

    /// Whether the request carries the cookie of a live operator session (it may
    /// then use the connections kept for operators).
    pub fn presents_operator_session(&self, headers: &HeaderMap) -> bool {
        session_cookie(headers)
            .and_then(|id| self.find(id))
            .is_some_and(|session| session.principal.role() == Role::Operator)
    }

    /// Sessions open now (expired ones included until the next login sweeps them).
    pub fn len(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether no session is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn key_of(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

fn constant_time_eq(left: &str, right: &str) -> bool {
    left.len() == right.len()
        && left
            .bytes()
            .zip(right.bytes())
            .fold(0u8, |difference, (a, b)| difference | (a ^ b))
            == 0
}

/// The console's routes; the session table comes as an `Extension<Arc<ConsoleSessions>>`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/console", get(page))
        .route("/console/app.js", get(script))
        .route("/console/app.css", get(stylesheet))
        .route("/console/login", post(login))
        .route("/console/logout", post(logout))
        .route("/console/api/overview", get(overview))
        .route("/console/api/mode", post(set_mode))
        .route("/console/api/audit", get(audit))
        .route("/console/api/audit/stream", get(audit_stream))
        .route("/console/api/status/stream", get(status_stream))
        .route("/console/api/approvals", get(pending_approvals))
        .route("/console/api/approvals/stream", get(approvals_stream))
        .route("/console/api/approvals/{id}/approve", post(approve))
        .route("/console/api/approvals/{id}/deny", post(deny))
}

/// Headers every console answer carries: no caching, no framing, no sniffing, and
/// a CSP that allows only this server's own script and style.
fn hardened(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    // Not `no-referrer`: under it Chromium sends `Origin: null` with form posts,
    // which the Origin check (rightly) refuses.
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn html(status: StatusCode, body: String) -> Response {
    hardened((status, [(CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response())
}

fn login_page(status: StatusCode, message: &str) -> Response {
    html(
        status,
        LOGIN_HTML.replace("{{MESSAGE}}", &escape_html(message)),
    )
}

fn escape_html(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            other => escaped.push(other),
        }
    }
    escaped
}

/// The session cookie's value, if the request has one.
fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.trim())
        .filter(|value| !value.is_empty() && value.len() <= 128)
}

fn sessions(parts: &Parts) -> Option<Arc<ConsoleSessions>> {
    parts
        .extensions
        .get::<Arc<ConsoleSessions>>()
        .map(Arc::clone)
}

/// A request from a logged-in console.
pub struct ConsoleSession {
    principal: Principal,
    csrf: String,
}

impl FromRequestParts<AppState> for ConsoleSession {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let table = sessions(parts);
        let cookie = session_cookie(&parts.headers);
        let session = table
            .as_ref()
            .zip(cookie)
            .and_then(|(table, id)| table.find(id))
            .filter(|session| {
                // The token behind the session still holds the operator role (not revoked).
                let still = matches!(
                    state.tokens.check_digest(&session.token_digest),
                    Authentication::Accepted(ref principal) if principal.role() == Role::Operator
                );
                if !still && let Some((table, id)) = table.as_ref().zip(cookie) {
                    table.close(id);
                }
                still
            });
        match session {
            Some(session) => Ok(ConsoleSession {
                principal: session.principal,
                csrf: session.csrf,
            }),
            None => Err(hardened(
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "not logged in to the console (or the session expired)",
                )
                .into_response(),
            )),
        }
    }
}

/// A state-changing request from a logged-in console: the CSRF token in the
/// `X-CSRF-Token` header and an `Origin` header (checked against this server by
/// the Host/Origin guard) are required.
pub struct ConsoleWrite(ConsoleSession);

impl FromRequestParts<AppState> for ConsoleWrite {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let session = ConsoleSession::from_request_parts(parts, state).await?;
        let presented = parts
            .headers
            .get(CSRF_HEADER)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default();
        if !parts.headers.contains_key(ORIGIN) || !constant_time_eq(presented, &session.csrf) {
            return Err(csrf_refused());
        }
        Ok(ConsoleWrite(session))
    }
}

fn csrf_refused() -> Response {
    hardened(
        ApiError::new(
            StatusCode::FORBIDDEN,
            "missing or wrong CSRF token; reload the console",
        )
        .into_response(),
    )
}

/// `GET /console`: the console for a session, else the login form.
async fn page(Extension(table): Extension<Arc<ConsoleSessions>>, headers: HeaderMap) -> Response {
    let session = session_cookie(&headers).and_then(|id| table.find(id));
    match session {
        Some(session) => html(
            StatusCode::OK,
            APP_HTML
                .replace("{{CSRF}}", &escape_html(&session.csrf))
                .replace("{{PRINCIPAL}}", &escape_html(session.principal.name())),
        ),
        None => login_page(StatusCode::OK, ""),
    }
}

async fn script() -> Response {
    hardened(([(CONTENT_TYPE, "text/javascript; charset=utf-8")], APP_JS).into_response())
}

async fn stylesheet() -> Response {
    hardened(([(CONTENT_TYPE, "text/css; charset=utf-8")], APP_CSS).into_response())
}

/// The login form's fields.
#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

/// `POST /console/login`: an operator token in, a session cookie out. An agent
/// token, or any other, is refused and audited like a refused bearer token.
async fn login(
    State(state): State<AppState>,
    Extension(table): Extension<Arc<ConsoleSessions>>,
    edge: Option<Extension<Edge>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let token = form.token.trim();
    let token_digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    let verdict = if token.is_empty() || token.len() > crate::tokens::MAX_TOKEN_LEN {
        Authentication::Invalid
    } else {
        state.tokens.check_digest(&token_digest)
    };
    let refusal = match &verdict {
        Authentication::Accepted(principal) if principal.role() == Role::Operator => None,
        Authentication::Accepted(principal) => Some((
            principal.clone(),
            Reason::Forbidden,
            StatusCode::FORBIDDEN,
            "only an operator token opens the console",
        )),
        refused => Some((
            Principal::anonymous(),
            refused.refusal_reason().unwrap_or(Reason::InvalidToken),
            StatusCode::UNAUTHORIZED,
            "that token is not valid",
        )),
    };
    let source = peer.map_or_else(
        || "unknown".to_owned(),
        |Extension(ConnectInfo(address))| address.ip().to_string(),
    );
    if let Some((who, reason, status, message)) = refusal {
        let edge = edge.map(|Extension(edge)| edge);
        if record_refusal(&state, edge.as_ref(), &source, &who, reason)
            .await
            .is_err()
        {
            return login_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "the audit trail is unavailable",
            );
        }
        return login_page(status, message);
    }
    let Authentication::Accepted(principal) = verdict else {
        return login_page(StatusCode::UNAUTHORIZED, "that token is not valid");
    };
    if state
        .gateway
        .record_console_session(&principal, EntryKind::ConsoleLogin, &source)
        .await
        .is_err()
    {
        return login_page(
            StatusCode::SERVICE_UNAVAILABLE,
            "the audit trail is unavailable",
        );
    }
    let Some((id, _csrf)) = table.open(principal, token_digest) else {
        return login_page(
            StatusCode::SERVICE_UNAVAILABLE,
            "no session could be opened; try again",
        );
    };
    let secure = served_over_tls(&headers);
    let cookie = format!(
        "{SESSION_COOKIE}={id}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}{}",
        SESSION_LIFETIME.as_secs(),
        if secure { "; Secure" } else { "" }
    );
    redirect_with_cookie(&cookie)
}

/// Whether the browser reached this page over TLS (a terminating proxy in front):
/// its `Origin` says so. Proxi itself listens on plain HTTP.
fn served_over_tls(headers: &HeaderMap) -> bool {
    headers
        .get(ORIGIN)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|origin| origin.to_ascii_lowercase().starts_with("https://"))
}

fn redirect_with_cookie(cookie: &str) -> Response {
    let mut response = hardened(StatusCode::SEE_OTHER.into_response());
    let headers = response.headers_mut();
    headers.insert(LOCATION, HeaderValue::from_static("/console"));
    if let Ok(value) = HeaderValue::from_str(cookie) {
        headers.insert(SET_COOKIE, value);
    }
    response
}

/// Audits a refused login through the edge's refusal tally, so a flood of wrong
/// tokens costs one record per source and window.
async fn record_refusal(
    state: &AppState,
    edge: Option<&Edge>,
    source: &str,
    principal: &Principal,
    reason: Reason,
) -> Result<(), crate::gateway::GatewayError> {
    let what = "POST /console/login";
    match edge {
        Some(edge) => edge.refusals.refuse(principal, source, what, reason).await,
        None => {
            state
                .gateway
                .record_auth_refusal(principal, what, reason)
                .await
        }
    }
}

/// The logout form's fields.
#[derive(Deserialize)]
struct LogoutForm {
    csrf: String,
}

/// `POST /console/logout`: ends the session (CSRF token in the form) and clears the cookie.
async fn logout(
    State(state): State<AppState>,
    Extension(table): Extension<Arc<ConsoleSessions>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    session: ConsoleSession,
    headers: HeaderMap,
    Form(form): Form<LogoutForm>,
) -> Response {
    if !constant_time_eq(&form.csrf, &session.csrf) {
        return csrf_refused();
    }
    if let Some(id) = session_cookie(&headers) {
        table.close(id);
    }
    let source = peer.map_or_else(
        || "unknown".to_owned(),
        |Extension(ConnectInfo(address))| address.ip().to_string(),
    );
    // The session is closed whatever happens; a failed record is logged, not hidden.
    if let Err(error) = state
        .gateway
        .record_console_session(&session.principal, EntryKind::ConsoleLogout, &source)
        .await
    {
        tracing::warn!("a console logout could not be recorded: {error}");
    }
    redirect_with_cookie(&format!(
        "{SESSION_COOKIE}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0"
    ))
}

/// What the console shows besides the audit table.
#[derive(Serialize)]
struct Overview {
    status: crate::api::PolicyStatus,
    /// The simulated cloud.
    infrastructure: InfrastructureStatus,
    /// The policy's upstream MCP servers and their health, in name order.
    upstreams: Vec<UpstreamHealth>,
    /// Who is logged in.
    principal: String,
}

/// One upstream's health as the console lists it.
#[derive(Serialize)]
struct UpstreamHealth {
    name: String,
    /// `stdio` or `http`.
    transport: &'static str,
    up: bool,
    /// Tools it exposes, once listed.
    tools: Option<usize>,
    /// Why it is down, while it is (safe for operators).
    last_error: Option<String>,
    /// Whether Proxi refuses to start without it.
    required: bool,
}

/// Every upstream's health, in name order.
fn upstream_health(gateway: &Gateway) -> Vec<UpstreamHealth> {
    gateway
        .upstream_health()
        .into_iter()
        .map(|status| UpstreamHealth {
            name: status.name,
            transport: status.transport.as_str(),
            up: status.up,
            tools: status.tools,
            last_error: status.last_error,
            required: status.required,
        })
        .collect()
}

/// `GET /console/api/overview`.
async fn overview(State(state): State<AppState>, session: ConsoleSession) -> Response {
    hardened(
        Json(Overview {
            status: state.gateway.status().into(),
            infrastructure: state.gateway.infrastructure_status(),
            upstreams: upstream_health(&state.gateway),
            principal: session.principal.name().to_string(),
        })
        .into_response(),
    )
}

/// The mode form's fields.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModeForm {
    mode: String,
    reason: Option<String>,
    ttl_seconds: Option<u64>,
}

/// `POST /console/api/mode`: the mode form, as `POST /policy/set-mode` on the session's behalf.
async fn set_mode(
    State(state): State<AppState>,
    ConsoleWrite(session): ConsoleWrite,
    ApiJson(form): ApiJson<ModeForm>,
) -> Response {
    let change = ModeChange {
        mode: form.mode,
        reason: form.reason,
        ttl: form.ttl_seconds.map(Duration::from_secs),
    };
    let answer = match state.gateway.set_mode(&session.principal, change).await {
        Ok(status) => Json(crate::api::PolicyStatus::from(status)).into_response(),
        Err(ModeChangeError::AuditUnavailable) => ApiError::audit_unavailable().into_response(),
        Err(error @ ModeChangeError::NotOperator) => {
            ApiError::new(StatusCode::FORBIDDEN, error.to_string()).into_response()
        }
        Err(error) => ApiError::bad_request(error.to_string()).into_response(),
    };
    hardened(answer)
}

/// `GET /console/api/audit`: `GET /audit` for the session.
async fn audit(
    State(state): State<AppState>,
    _session: ConsoleSession,
    ApiQuery(filters): ApiQuery<AuditFilters>,
) -> Response {
    hardened(audit_api::page(&state, filters).await)
}

/// `GET /console/api/audit/stream`: `GET /audit/stream` for the session.
async fn audit_stream(
    State(state): State<AppState>,
    _session: ConsoleSession,
    headers: HeaderMap,
    shutdown: Option<Extension<StreamShutdown>>,
    ApiQuery(filters): ApiQuery<AuditFilters>,
) -> Response {
    let shutdown = shutdown.map(|Extension(shutdown)| shutdown);
    hardened(audit_api::stream(
        &state,
        filters,
        &headers,
        shutdown.unwrap_or_default(),
    ))
}

/// `GET /console/api/status/stream`: the policy status now and after every change
/// (`status` events), and the upstreams' health after every change of it
/// (`upstreams` events), so a crashed upstream shows without a reload or a call.
async fn status_stream(
    State(state): State<AppState>,
    _session: ConsoleSession,
    shutdown: Option<Extension<StreamShutdown>>,
) -> Response {
    let receiver = state.gateway.subscribe();
    let stop = shutdown
        .map(|Extension(shutdown)| shutdown)
        .unwrap_or_default()
        .0;
    let events = futures::stream::select(
        status_events(receiver),
        upstream_events(state.gateway.clone()),
    );
    hardened(
        Sse::new(events.take_until(stop.cancelled_owned()))
            .keep_alive(KeepAlive::default())
            .into_response(),
    )
}

/// An `upstreams` event (every upstream's health) after each report of it; the
/// health of that moment, so a burst of reports gives one event.
fn upstream_events(gateway: Arc<Gateway>) -> impl Stream<Item = Result<Event, Infallible>> {
    let receiver = gateway.upstream_health_changes();
    futures::stream::unfold(
        (Arc::downgrade(&gateway), receiver),
        |(gateway, mut receiver)| async move {
            receiver.changed().await.ok()?;
            receiver.borrow_and_update();
            let health = upstream_health(&*gateway.upgrade()?);
            let event = Event::default()
                .event("upstreams")
                .json_data(&health)
                .unwrap_or_else(|_| Event::default().event("upstreams").data("[]"));
            Some((Ok(event), (gateway, receiver)))
        },
    )
}

fn status_events(
    receiver: tokio::sync::watch::Receiver<PolicyStatus>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold((receiver, true), |(mut receiver, first)| async move {
        if !first && receiver.changed().await.is_err() {
            return None;
        }
        let status = crate::api::PolicyStatus::from(&*receiver.borrow_and_update());
        let event = Event::default()
            .event("status")
            .json_data(&status)
            .unwrap_or_else(|_| Event::default().event("status").data("{}"));
        Some((Ok(event), (receiver, false)))
    })
}

/// The pending approvals, newest first: all of them, since at most
/// [`MAX_PENDING_APPROVALS`] may be pending at once.
async fn pending_list(gateway: &Gateway) -> Result<ApprovalList, ApiError> {
    let approvals = gateway
        .list_approvals(Some(ApprovalStatus::Pending), MAX_PENDING_APPROVALS)
        .await?;
    Ok(ApprovalList {
        count: approvals.len(),
        approvals,
    })
}

/// `GET /console/api/approvals`: the pending approvals, as `GET /approvals?status=pending`.
async fn pending_approvals(State(state): State<AppState>, _session: ConsoleSession) -> Response {
    hardened(match pending_list(&state.gateway).await {
        Ok(list) => Json(list).into_response(),
        Err(error) => error.into_response(),
    })
}

/// `GET /console/api/approvals/stream`: the pending approvals now and after every
/// change this server makes or sees (a new request, a decision from the page, the
/// CLI or REST, a consumption, an expiry). The gateway's change tick is a watch,
/// so a burst of changes costs one list per client, not one per change.
async fn approvals_stream(
    State(state): State<AppState>,
    _session: ConsoleSession,
    shutdown: Option<Extension<StreamShutdown>>,
) -> Response {
    let receiver = state.gateway.approvals_changed_events();
    let stop = shutdown
        .map(|Extension(shutdown)| shutdown)
        .unwrap_or_default()
        .0;
    hardened(
        Sse::new(
            approval_events(Arc::clone(&state.gateway), receiver)
                .take_until(stop.cancelled_owned()),
        )
        .keep_alive(KeepAlive::default())
        .into_response(),
    )
}

fn approval_events(
    gateway: Arc<Gateway>,
    receiver: tokio::sync::watch::Receiver<u64>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold(
        (gateway, receiver, true),
        |(gateway, mut receiver, first)| async move {
            if !first && receiver.changed().await.is_err() {
                return None;
            }
            // Marked seen before the read, so a change during it sends another list.
            receiver.borrow_and_update();
            let event = match pending_list(&gateway).await {
                Ok(list) => Event::default().event("approvals").json_data(&list).ok(),
                Err(_) => None,
            }
            .unwrap_or_else(|| {
                Event::default()
                    .event("approvals_unavailable")
                    .data("the approval store is unavailable")
            });
            Some((Ok(event), (gateway, receiver, false)))
        },
    )
}

/// `POST /console/api/approvals/{id}/approve {"reason"}`: the session's operator
/// approves, as `POST /approvals/{id}/approve`; the record names that operator.
async fn approve(
    State(state): State<AppState>,
    ConsoleWrite(session): ConsoleWrite,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<ApprovalDecisionRequest>,
) -> Response {
    decide(&state, &session, &id, Verdict::Approve, &request.reason).await
}

/// `POST /console/api/approvals/{id}/deny {"reason"}`: as `approve`, denying.
async fn deny(
    State(state): State<AppState>,
    ConsoleWrite(session): ConsoleWrite,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<ApprovalDecisionRequest>,
) -> Response {
    decide(&state, &session, &id, Verdict::Deny, &request.reason).await
}

async fn decide(
    state: &AppState,
    session: &ConsoleSession,
    id: &str,
    verdict: Verdict,
    reason: &str,
) -> Response {
    // A malformed id is the page's (or a forger's) mistake, not a missing approval.
    if !crate::approval::is_approval_id(id) {
        return hardened(
            ApiError::bad_request("not an approval id (apr_ followed by hex digits)")
                .into_response(),
        );
    }
    hardened(
        match state
            .gateway
            .decide_approval(&session.principal, id, verdict, reason)
            .await
        {
            Ok(approval) => Json(approval).into_response(),
            Err(error) => ApiError::from(error).into_response(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_table_is_bounded_and_sessions_expire() {
        let table = ConsoleSessions::new(Duration::from_secs(3600), 2);
        let (first, _) = table.open(Principal::operator(), [0; 32]).expect("opens");
        let (second, _) = table.open(Principal::operator(), [0; 32]).expect("opens");
        let (third, _) = table.open(Principal::operator(), [0; 32]).expect("opens");
        assert_eq!(table.len(), 2);
        assert!(table.find(&first).is_none(), "the oldest session made room");
        assert!(table.find(&second).is_some());
        assert!(table.find(&third).is_some());
        table.close(&third);
        assert!(table.find(&third).is_none());

        let expired = ConsoleSessions::new(Duration::ZERO, 2);
        let (id, _) = expired.open(Principal::operator(), [0; 32]).expect("opens");
        assert!(expired.find(&id).is_none());
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(
            COOKIE,
            HeaderValue::from_static("a=1; proxi_console=abc ; b=2"),
        );
        assert_eq!(session_cookie(&headers), Some("abc"));
        headers.insert(COOKIE, HeaderValue::from_static("proxi_console="));
        assert_eq!(session_cookie(&headers), None);
    }

    #[test]
    fn html_is_escaped() {
        assert_eq!(
            escape_html(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }
}
