//! The audit trail as an API: `GET /audit` (filters and a cursor) and
//! `GET /audit/stream` (Server-Sent Events, one event per new record, `id:` = seq).
//!
//! The stream never sits between the audit writer and the disk: a feeder task
//! wakes on [`crate::audit::AuditLog::committed`] (a watch of the newest durable
//! seq, which coalesces) and reads what its client has not seen from the store.
//! It hands events to the response through a bounded buffer; a client that leaves
//! the buffer full for [`SLOW_CLIENT`] is dropped (its stream ends) and resumes
//! with `Last-Event-ID`, losing nothing, while the writer never waits for anyone.

use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::AppState;
use super::auth::Operator;
use super::error::{ApiError, ApiQuery};
use crate::api::{AuditPage, DEFAULT_AUDIT_LIMIT, MAX_AUDIT_LIMIT};
use crate::audit::AuditQuery;
use crate::gateway::Gateway;

/// Events buffered for one stream client; a client this far behind is dropped.
pub const STREAM_BUFFER: usize = 256;
/// How long a full buffer may wait for its client before the client is dropped.
pub const SLOW_CLIENT: std::time::Duration = std::time::Duration::from_secs(10);
/// Records one store read of the stream fetches.
const STREAM_PAGE: u32 = 200;
/// Longest filter value accepted (tool names are at most 128 bytes).
const MAX_FILTER_LEN: usize = 256;

/// Cancelled when the server shuts down: every stream ends, so that graceful
/// shutdown does not wait for clients that would listen forever.
#[derive(Clone, Debug, Default)]
pub struct StreamShutdown(pub CancellationToken);

/// The query string of `GET /audit` and `GET /audit/stream`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditFilters {
    /// Exact principal (`agent`, `operator`, `agent (mcp:<client>)`, ...).
    pub principal: Option<String>,
    /// Exact kind (`tool_call`, `mode_change`, ...).
    pub kind: Option<String>,
    /// Tool name, exact or a glob with `*`.
    pub tool: Option<String>,
    /// `allowed`, `denied` or `rejected`.
    pub decision: Option<String>,
    /// Exact reason code.
    pub reason_code: Option<String>,
    /// RFC 3339: records at or after this time.
    pub since: Option<String>,
    /// RFC 3339: records before this time.
    pub until: Option<String>,
    /// The cursor: records with a greater seq, oldest first.
    pub after_seq: Option<u64>,
    /// Most records (1 to 1000, default 50).
    pub limit: Option<u32>,
}

impl AuditFilters {
    /// Checks every filter and turns them into a store query.
    pub fn into_query(self) -> Result<AuditQuery, ApiError> {
        let limit = self.limit.unwrap_or(DEFAULT_AUDIT_LIMIT);
        if !(1..=MAX_AUDIT_LIMIT).contains(&limit) {
            return Err(ApiError::bad_request(format!(
                "limit must be between 1 and {MAX_AUDIT_LIMIT}"
            )));
        }
        let text = |name: &str, value: Option<String>| match value {
            Some(value) if value.is_empty() => Ok(None),
            Some(value) if value.len() > MAX_FILTER_LEN => Err(ApiError::bad_request(format!(
                "{name} must be at most {MAX_FILTER_LEN} bytes"
            ))),
            other => Ok(other),
        };
        let time = |name: &str, value: Option<String>| -> Result<Option<DateTime<Utc>>, ApiError> {
            match value.filter(|value| !value.is_empty()) {
                None => Ok(None),
                Some(value) => DateTime::parse_from_rfc3339(&value)
                    .map(|time| Some(time.to_utc()))
                    .map_err(|_| {
                        ApiError::bad_request(format!(
                            "{name} must be an RFC 3339 time, e.g. 2026-01-31T12:00:00Z"
                        ))
                    }),
            }
        };
        let query = AuditQuery {
            principal: text("principal", self.principal)?,
            kind: text("kind", self.kind)?,
            tool: text("tool", self.tool)?,
            decision: text("decision", self.decision)?,
            reason_code: text("reason_code", self.reason_code)?,
            since: time("since", self.since)?,
            until: time("until", self.until)?,
            after_seq: self.after_seq,
            limit,
        };
        query
            .check()
            .map_err(|error| ApiError::bad_request(error.to_string()))?;
        Ok(query)
    }
}

/// `GET /audit` (operator only): filters, and `after_seq` for paging.
pub async fn audit(
    State(state): State<AppState>,
    _operator: Operator,
    ApiQuery(filters): ApiQuery<AuditFilters>,
) -> Response {
    page(&state, filters).await
}

/// One page of the trail as JSON, for `GET /audit` and the console.
pub async fn page(state: &AppState, filters: AuditFilters) -> Response {
    let query = match filters.into_query() {
        Ok(query) => query,
        Err(error) => return error.into_response(),
    };
    match read(&state.gateway, query).await {
        Ok(page) => {
            // Intents among these records that no record resolves and the server
            // is not running: a crash cut them short, so their outcome is unknown.
            let in_flight = state.gateway.in_flight_intents();
            let outcome_unknown = crate::audit_view::unresolved_intents(&page.records)
                .into_iter()
                .filter(|seq| !in_flight.contains(seq))
                .collect();
            Json(AuditPage {
                count: page.records.len(),
                records: page.records.into_iter().map(Into::into).collect(),
                outcome_unknown,
                next_after_seq: page.next_after_seq,
            })
            .into_response()
        }
        Err(error) => error.into_response(),
    }
}

async fn read(
    gateway: &Arc<Gateway>,
    query: AuditQuery,
) -> Result<crate::audit::AuditPage, ApiError> {
    let gateway = gateway.clone();
    tokio::task::spawn_blocking(move || gateway.audit().query(&query))
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error"))?
        .map_err(|error| {
            tracing::error!(%error, "reading the audit trail failed");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the audit trail could not be read",
            )
        })
}

/// `GET /audit/stream` (operator only).
pub async fn audit_stream(
    State(state): State<AppState>,
    _operator: Operator,
    headers: HeaderMap,
    shutdown: Option<axum::Extension<StreamShutdown>>,
    ApiQuery(filters): ApiQuery<AuditFilters>,
) -> Response {
    let shutdown = shutdown.map(|axum::Extension(shutdown)| shutdown);
    stream(&state, filters, &headers, shutdown.unwrap_or_default())
}

/// The stream of new records matching `filters`, as SSE. It starts after
/// `Last-Event-ID` if the client sends one (a reconnect), else after `after_seq`,
/// else at the newest record now.
pub fn stream(
    state: &AppState,
    filters: AuditFilters,
    headers: &HeaderMap,
    shutdown: StreamShutdown,
) -> Response {
    let last_event_id = match headers.get("last-event-id") {
        None => None,
        Some(value) => match value.to_str().ok().and_then(|id| id.trim().parse().ok()) {
            Some(seq) => Some(seq),
            None => {
                return ApiError::bad_request("Last-Event-ID must be a record's seq")
                    .into_response();
            }
        },
    };
    let mut query = match filters.into_query() {
        Ok(query) => query,
        Err(error) => return error.into_response(),
    };
    let committed = state.gateway.audit().committed();
    let start = last_event_id
        .or(query.after_seq)
        .unwrap_or_else(|| *committed.borrow());
    query.limit = STREAM_PAGE;
    let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(feed(
        state.gateway.clone(),
        query,
        start,
        committed,
        sender,
        shutdown.0,
    ));
    let events = futures::stream::unfold(receiver, |mut receiver| async move {
        let event = receiver.recv().await?;
        Some((Ok::<Event, Infallible>(event), receiver))
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Reads records after `cursor` whenever the committed seq moves, and queues
/// them for the client; returns when the client is gone, too slow, the server
/// shuts down or the store cannot be read.
async fn feed(
    gateway: Arc<Gateway>,
    mut query: AuditQuery,
    mut cursor: u64,
    mut committed: tokio::sync::watch::Receiver<u64>,
    sender: mpsc::Sender<Event>,
    shutdown: CancellationToken,
) {
    loop {
        let head = *committed.borrow_and_update();
        while cursor < head {
            query.after_seq = Some(cursor);
            let page = match read(&gateway, query.clone()).await {
                Ok(page) => page,
                Err(_) => return,
            };
            for record in page.records {
                // Visible in the store but not yet durable: sent once it is.
                if record.seq > head {
                    break;
                }
                let event = match Event::default()
                    .id(record.seq.to_string())
                    .event("record")
                    .json_data(crate::api::AuditRecord::from(&record))
                {
                    Ok(event) => event,
                    Err(_) => return,
                };
                match tokio::time::timeout(SLOW_CLIENT, sender.send(event)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return,
                    Err(_) => {
                        tracing::info!(
                            "an audit stream client took no event for {SLOW_CLIENT:?} with {STREAM_BUFFER} waiting; dropping it"
                        );
                        return;
                    }
                }
            }
            cursor = match page.next_after_seq {
                Some(next) if next < head => next,
                _ => head,
            };
        }
        tokio::select! {
            changed = committed.changed() => if changed.is_err() { return },
            () = sender.closed() => return,
            () = shutdown.cancelled() => return,
        }
    }
}
