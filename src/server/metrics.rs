//! `GET /metrics`: the Prometheus scrape endpoint, with the operator token on the
//! main listener and without one on the optional `--metrics-bind` listener.

use std::future::Future;
use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::task::JoinHandle;

use super::auth::Operator;
use super::limits::EdgeLimits;
use super::{AppState, BoundServer, ServerError};
use crate::metrics;

/// `GET /metrics` on the main listener (operator only).
pub async fn metrics(State(state): State<AppState>, _operator: Operator) -> Response {
    render(&state)
}

/// `GET /metrics` on the scrape listener: no token, nothing else served.
async fn open_metrics(State(state): State<AppState>) -> Response {
    render(&state)
}

fn render(state: &AppState) -> Response {
    (
        [(CONTENT_TYPE, metrics::CONTENT_TYPE)],
        state.gateway.render_metrics(),
    )
        .into_response()
}

/// The scrape listener's app: `/metrics` only, every other path 404.
///
/// Unlike the main listener it takes any Host: scrapers name it by whatever
/// address they reach it at, and what it serves (aggregate counts, the mode) is
/// what anyone who can reach the port may read anyway.
pub fn scrape_app(state: AppState) -> Router {
    super::finish(Router::new().route("/metrics", get(open_metrics)), state)
}

/// Binds `address` and serves [`scrape_app`] behind the same connection loop
/// (header timeout, connection cap) as the main listener, until `shutdown`
/// resolves; returns the bound address (port 0 picks one) and the serving task.
pub async fn spawn_scrape_listener(
    state: AppState,
    address: SocketAddr,
    limits: EdgeLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, JoinHandle<Result<(), ServerError>>), ServerError> {
    let server = BoundServer::bind(address).await?.with_limits(limits);
    let bound = server.local_addr();
    let app = scrape_app(state);
    Ok((bound, tokio::spawn(server.serve(app, shutdown))))
}
