//! The HTTP server: the REST API and MCP's Streamable HTTP (`/mcp`) over one shared [`Gateway`].

pub mod approvals_api;
pub mod audit_api;
pub mod auth;
pub mod connections;
pub mod console;
pub mod error;
pub mod limits;
pub mod metrics;
pub mod refusals;
pub mod reload;
pub mod rest;

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::TimeoutLayer;

use crate::api::MAX_BODY_BYTES;
use crate::gateway::Gateway;
use crate::mcp;
use crate::mcp::http::AllowedAuthorities;
use crate::tokens::Tokens;
use connections::ConnectionTable;
use error::ApiError;
use limits::EdgeLimits;
use refusals::RefusalTally;

/// File in the data dir that tells local clients where the server listens.
pub const SERVER_FILE: &str = "server.json";
/// Longest a request may take before the server gives up on it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Server start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The address could not be bound.
    #[error("cannot listen on {address}: {error}")]
    Bind {
        /// The requested address.
        address: SocketAddr,
        /// The I/O error.
        error: std::io::Error,
    },
    /// Serving failed.
    #[error("server error: {0}")]
    Serve(std::io::Error),
}

/// What every handler shares.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The enforcement point.
    pub gateway: Arc<Gateway>,
    /// The accepted tokens.
    pub tokens: Arc<Tokens>,
}

/// Contents of `<data-dir>/server.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    /// Base URL, e.g. `http://127.0.0.1:8000`.
    pub url: String,
    /// The server's process id.
    pub pid: u32,
}

impl ServerInfo {
    /// Reads `<data_dir>/server.json`, if a server wrote one.
    pub fn read(data_dir: &Path) -> Option<ServerInfo> {
        let text = std::fs::read_to_string(data_dir.join(SERVER_FILE)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Whether the process named by `pid` is running (Linux `/proc`; a zombie counts as gone).
    pub fn process_is_alive(&self) -> bool {
        if self.pid == 0 {
            return false;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) else {
            return false;
        };
        // The state follows the command name, which is in parentheses and may contain spaces.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next());
        !matches!(state, None | Some('Z' | 'X'))
    }
}

/// The REST routes, before state is attached; `/mcp` is merged by the caller.
pub fn rest_routes() -> Router<AppState> {
    Router::new()
        .route("/", get(rest::health))
        .route("/policy/status", get(rest::policy_status))
        .route("/policy/set-mode", post(rest::set_mode))
        .route("/policy/reload", post(reload::reload))
        .route("/tools/execute", post(rest::execute))
        .route("/tools/catalog", get(rest::catalog))
        .route("/infrastructure/status", get(rest::infrastructure_status))
        .route(
            "/infrastructure/simulate-incident",
            post(rest::simulate_incident),
        )
        .route("/approvals", get(approvals_api::list))
        .route("/policy/request-mode", post(approvals_api::request_mode))
        .route("/approvals/{id}/approve", post(approvals_api::approve))
        .route("/approvals/{id}/deny", post(approvals_api::deny))
        .route("/audit", get(audit_api::audit))
        .route("/audit/stream", get(audit_api::audit_stream))
        .route("/metrics", get(metrics::metrics))
}

/// Adds the layers every route shares: body limit, timeout, panic guard, JSON fallbacks.
pub fn finish(router: Router<AppState>, state: AppState) -> Router {
    let service = ServiceBuilder::new()
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .service(with_fallbacks(router, state));
    once_around(service)
}

/// The router with its JSON 404/405 answers and its state, before any layer.
fn with_fallbacks(router: Router<AppState>, state: AppState) -> Router {
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// A router that hands every request to `service`, the layers stacked once
/// around the whole router. `Router::layer` would instead wrap every route in
/// each layer, each as a boxed service that is cloned, and dropped, once per layer
/// on every request: with eight layers that was a tenth of the CPU of a request.
fn once_around<S>(service: S) -> Router
where
    S: tower::Service<axum::extract::Request, Error = std::convert::Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Response: IntoResponse + 'static,
    S::Future: Send + 'static,
{
    Router::new().fallback_service(service)
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// What the edge shares across requests: its limits and the tally that audits
/// refusals in aggregate. Every request carries it as an extension.
#[derive(Clone, Debug)]
pub struct Edge {
    /// The limits in force.
    pub limits: EdgeLimits,
    /// Refusals (authentication, sessions) counted per source and window.
    pub refusals: Arc<RefusalTally>,
}

/// A listening server, not yet serving.
pub struct BoundServer {
    listener: TcpListener,
    address: SocketAddr,
    limits: EdgeLimits,
}

impl BoundServer {
    /// Binds `address` (port 0 picks a free port).
    pub async fn bind(address: SocketAddr) -> Result<BoundServer, ServerError> {
        let listener = TcpListener::bind(address)
            .await
            .map_err(|error| ServerError::Bind { address, error })?;
        let address = listener
            .local_addr()
            .map_err(|error| ServerError::Bind { address, error })?;
        Ok(BoundServer {
            listener,
            address,
            limits: EdgeLimits::default(),
        })
    }

    /// Serves with these edge limits instead of the defaults.
    pub fn with_limits(mut self, limits: EdgeLimits) -> BoundServer {
        self.limits = limits;
        self
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }

    /// `http://<address>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Records the URL in `<data_dir>/server.json` (mode 0600) for local clients.
    pub fn advertise(&self, data_dir: &Path) -> std::io::Result<()> {
        let info = ServerInfo {
            url: self.url(),
            pid: std::process::id(),
        };
        let temporary = data_dir.join(format!("{SERVER_FILE}.tmp"));
        let _ = std::fs::remove_file(&temporary);
        let mut file = std::fs::File::options()
            .write(true)
            .create_new(true)
            .mode(crate::audit::DATA_FILE_MODE)
            .open(&temporary)?;
        file.write_all(&serde_json::to_vec_pretty(&info).unwrap_or_default())?;
        drop(file);
        std::fs::rename(temporary, data_dir.join(SERVER_FILE))
    }

    /// Serves the full application (REST and `/mcp`) until `shutdown` resolves;
    /// then writes the refusal summaries still pending.
    pub async fn serve_app(
        self,
        state: AppState,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let stop_mcp = CancellationToken::new();
        let stop_flusher = CancellationToken::new();
        let refusals = Arc::new(RefusalTally::new(
            state.gateway.clone(),
            self.limits.refusal_window,
            self.limits.max_refusal_sources,
        ));
        // The flusher runs in this future, not a task of its own, so aborting the
        // serving task also drops the gateway it holds.
        let flushing = refusals.clone().flush_until(stop_flusher.clone());
        let edge = Edge {
            limits: self.limits.clone(),
            refusals,
        };
        let app = app(state, self.address, stop_mcp.clone(), edge);
        let serving = async {
            let served = self
                .serve(app, async move {
                    shutdown.await;
                    stop_mcp.cancel();
                })
                .await;
            stop_flusher.cancel();
            served
        };
        let (served, ()) = tokio::join!(serving, flushing);
        served
    }

    /// Serves `app` until `shutdown` resolves, within this server's connection limits.
    pub async fn serve(
        self,
        app: Router,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let table = ConnectionTable::new(self.limits.max_connections);
        connections::serve(self.listener, app, &self.limits, table, shutdown).await;
        Ok(())
    }
}

/// Builds the full application: REST routes plus `/mcp`, sharing one gateway.
///
/// `bound` is the address the server listens on: every route (REST and `/mcp`)
/// accepts only requests whose Host/Origin name it, and refuses others with 403
/// before authentication, unaudited. Cancelling `shutdown` closes every MCP
/// session and stream, which graceful shutdown would otherwise wait for forever.
pub fn app(state: AppState, bound: SocketAddr, shutdown: CancellationToken, edge: Edge) -> Router {
    let streams = audit_api::StreamShutdown(shutdown.clone());
    let routes = rest_routes()
        .merge(console::routes())
        .merge(mcp::http::routes(state.clone(), bound, shutdown, &edge));
    let allowed = Arc::new(AllowedAuthorities::for_address(bound));
    let sessions = Arc::new(console::ConsoleSessions::default());
    let share = OperatorReserve::new(state.clone(), edge.limits.max_connections, sessions.clone());
    // Outermost first: the same order as the `.layer` calls this replaces, reversed.
    let service = ServiceBuilder::new()
        .layer(axum::middleware::from_fn_with_state(
            allowed,
            check_authority,
        ))
        .layer(axum::middleware::from_fn_with_state(
            share,
            reserve_for_operators,
        ))
        .layer(Extension(sessions))
        .layer(Extension(streams))
        .layer(Extension(edge))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .service(with_fallbacks(routes, state));
    once_around(service)
}

/// Keeps part of the connection cap for operators: requests without the
/// operator token may occupy at most `max_connections - reserve` connections at
/// once, until their response (a stream included) ends. Connections busy with a
/// request are never evicted, so without this an agent dripping request bodies,
/// or holding streams, on every connection could lock operators out; with it, at
/// least `reserve` connections stay idle (evictable) or the operator's.
#[derive(Clone)]
struct OperatorReserve {
    state: AppState,
    /// A logged-in console is the operator too.
    sessions: Arc<console::ConsoleSessions>,
    others: Arc<tokio::sync::Semaphore>,
}

impl OperatorReserve {
    fn new(
        state: AppState,
        max_connections: usize,
        sessions: Arc<console::ConsoleSessions>,
    ) -> OperatorReserve {
        let reserve = (max_connections / 8).max(1);
        OperatorReserve {
            state,
            sessions,
            others: Arc::new(tokio::sync::Semaphore::new(
                max_connections.saturating_sub(reserve).max(1),
            )),
        }
    }
}

async fn reserve_for_operators(
    axum::extract::State(share): axum::extract::State<OperatorReserve>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if auth::presents_operator_token(request.headers(), &share.state)
        || share.sessions.presents_operator_session(request.headers())
    {
        return next.run(request).await;
    }
    match share.others.clone().try_acquire_owned() {
        Ok(permit) => next
            .run(request)
            .await
            .map(|body| connections::Holding::wrap(body, permit)),
        Err(_) => {
            let mut response = error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is busy with other requests; retry shortly",
            );
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
            response
        }
    }
}

/// DNS-rebinding protection for every route: a browser tricked into sending a
/// request under a foreign name (or from a foreign page) gets 403.
async fn check_authority(
    axum::extract::State(allowed): axum::extract::State<Arc<AllowedAuthorities>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match allowed.check(request.uri(), request.headers()) {
        Ok(()) => next.run(request).await,
        Err(reason) => {
            tracing::debug!(
                host = ?request.headers().get(axum::http::header::HOST),
                "refused a request: {reason}"
            );
            error_response(StatusCode::FORBIDDEN, reason)
        }
    }
}

/// Convenience for tests and the demo: binds, then serves in a background task.
pub async fn spawn(
    state: AppState,
    address: SocketAddr,
) -> Result<(SocketAddr, tokio::task::JoinHandle<Result<(), ServerError>>), ServerError> {
    let server = BoundServer::bind(address).await?;
    let local = server.local_addr();
    let handle = tokio::spawn(server.serve_app(state, std::future::pending()));
    Ok((local, handle))
}

/// Answers a response with this status and message (used by middleware).
pub fn error_response(status: StatusCode, message: &str) -> Response {
    ApiError::new(status, message).into_response()
}
