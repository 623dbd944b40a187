//! Refusals at the edge, audited in aggregate.
//!
//! A refused authentication, a refused MCP session or a foreign session id costs
//! the caller one request, so recording each one durably would let anyone on
//! loopback fill the disk and slow real calls. Instead the first refusal of a
//! (principal, source, reason) within a window is recorded at once, and the rest
//! are counted and written as one summary record when the window closes. The
//! table of sources is bounded: past `max_sources`, new sources share one
//! `other` bucket per reason, so the table cannot grow with the flood either.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::audit::format_time;
use crate::gateway::{Gateway, GatewayError, truncate};
use crate::principal::Principal;
use crate::reason::Reason;

/// The source name shared by refusals from sources past the table's bound.
pub const OVERFLOW_SOURCE: &str = "other";
/// Longest request description kept in a refusal record.
const MAX_REQUEST_LEN: usize = 200;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    principal: Arc<str>,
    source: Arc<str>,
    reason: Reason,
}

#[derive(Debug)]
struct Tally {
    principal: Principal,
    opened: Instant,
    opened_at: DateTime<Utc>,
    /// Refusals counted but not yet recorded.
    suppressed: u64,
    last_request: String,
}

/// Counts refusals per principal, source and reason, and records them in aggregate.
#[derive(Debug)]
pub struct RefusalTally {
    gateway: Arc<Gateway>,
    window: Duration,
    max_sources: usize,
    table: Mutex<HashMap<Key, Tally>>,
}

impl RefusalTally {
    /// A tally recording through `gateway`, with this window and bound on sources.
    pub fn new(gateway: Arc<Gateway>, window: Duration, max_sources: usize) -> RefusalTally {
        RefusalTally {
            gateway,
            window: window.max(Duration::from_millis(100)),
            max_sources: max_sources.max(1),
            table: Mutex::new(HashMap::new()),
        }
    }

    /// Notes one refusal. The first of its window is recorded before this returns
    /// (an audit failure is an error, so the caller answers 503); later ones are
    /// only counted.
    pub async fn refuse(
        &self,
        principal: &Principal,
        source: &str,
        request: &str,
        reason: Reason,
    ) -> Result<(), GatewayError> {
        let request = truncate(request, MAX_REQUEST_LEN);
        let source = {
            let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
            let mut key = Key {
                principal: principal.name().clone(),
                source: Arc::from(truncate(source, 64)),
                reason,
            };
            if !table.contains_key(&key) && table.len() >= self.max_sources {
                key.source = Arc::from(OVERFLOW_SOURCE);
            }
            match table.get_mut(&key) {
                Some(tally) => {
                    tally.suppressed += 1;
                    request.clone_into(&mut tally.last_request);
                    return Ok(());
                }
                None => {
                    let source = key.source.clone();
                    table.insert(
                        key,
                        Tally {
                            principal: principal.clone(),
                            opened: Instant::now(),
                            opened_at: Utc::now(),
                            suppressed: 0,
                            last_request: request.to_owned(),
                        },
                    );
                    source
                }
            }
        };
        let detail = json!({
            "source": source.as_ref(),
            "request": request,
            "count": 1,
            "window_seconds": self.window.as_secs_f64(),
        });
        self.gateway
            .record_edge_refusal(principal, reason, detail)
            .await
    }

    /// Writes one summary record for every window that has closed (every window,
    /// if `all`), for the refusals counted in it, and forgets those windows.
    pub async fn flush(&self, all: bool) {
        let closed: Vec<(Key, Tally)> = {
            let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            let due: Vec<Key> = table
                .iter()
                .filter(|(_, tally)| all || now.duration_since(tally.opened) >= self.window)
                .map(|(key, _)| key.clone())
                .collect();
            due.into_iter()
                .filter_map(|key| table.remove_entry(&key))
                .collect()
        };
        let until = format_time(Utc::now());
        for (key, tally) in closed {
            if tally.suppressed == 0 {
                continue;
            }
            let detail = json!({
                "source": key.source.as_ref(),
                "request": tally.last_request,
                "count": tally.suppressed,
                "summary": true,
                "since": format_time(tally.opened_at),
                "until": until,
            });
            if let Err(error) = self
                .gateway
                .record_edge_refusal(&tally.principal, key.reason, detail)
                .await
            {
                tracing::error!(%error, "could not record a summary of refused requests");
            }
        }
    }

    /// Flushes closed windows until `stop` fires, then flushes everything left.
    pub async fn flush_until(self: Arc<Self>, stop: CancellationToken) {
        let period = (self.window / 4).max(Duration::from_millis(50));
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = ticks.tick() => self.flush(false).await,
            }
        }
        self.flush(true).await;
    }

    /// How many (principal, source, reason) windows are open.
    pub fn open_windows(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Durability;
    use crate::gateway::GatewayConfig;
    use crate::policy::PolicyEngine;

    async fn gateway(dir: &std::path::Path) -> Arc<Gateway> {
        let policy =
            PolicyEngine::from_json(include_str!("../../policies/ops_policy.json"), "test")
                .expect("the shipped policy is valid");
        Gateway::open(
            policy,
            GatewayConfig {
                data_dir: dir.to_owned(),
                durability: Durability::Process,
                audit_reserve_bytes: None,
            },
        )
        .await
        .expect("gateway opens")
    }

    fn refusals(gateway: &Gateway) -> Vec<crate::audit::AuditRecord> {
        gateway
            .audit()
            .recent(1000)
            .expect("audit reads")
            .into_iter()
            .filter(|record| record.kind == "auth_refused")
            .collect()
    }

    #[tokio::test]
    async fn a_flood_from_one_source_is_one_record_then_one_summary() {
        let dir = tempfile::tempdir().expect("temp dir");
        let gateway = gateway(dir.path()).await;
        let tally = RefusalTally::new(gateway.clone(), Duration::from_secs(3600), 4);
        for _ in 0..500 {
            tally
                .refuse(
                    &Principal::anonymous(),
                    "127.0.0.1",
                    "GET /audit",
                    Reason::MissingToken,
                )
                .await
                .expect("recorded");
        }
        assert_eq!(refusals(&gateway).len(), 1);
        tally.flush(false).await;
        assert_eq!(refusals(&gateway).len(), 1, "the window is still open");
        tally.flush(true).await;
        let records = refusals(&gateway);
        assert_eq!(records.len(), 2);
        assert_eq!(records[1].detail["count"], 499);
        assert_eq!(records[1].detail["summary"], true);
        assert_eq!(tally.open_windows(), 0);
    }

    #[tokio::test]
    async fn the_table_of_sources_is_bounded() {
        let dir = tempfile::tempdir().expect("temp dir");
        let gateway = gateway(dir.path()).await;
        let tally = RefusalTally::new(gateway.clone(), Duration::from_secs(3600), 4);
        for source in 0..100 {
            tally
                .refuse(
                    &Principal::anonymous(),
                    &format!("10.0.0.{source}"),
                    "GET /",
                    Reason::InvalidToken,
                )
                .await
                .expect("recorded");
        }
        assert_eq!(tally.open_windows(), 5, "4 sources and the overflow bucket");
        assert_eq!(refusals(&gateway).len(), 5);
        tally.flush(true).await;
        let records = refusals(&gateway);
        let overflow = records
            .iter()
            .find(|record| record.detail["summary"] == true)
            .expect("a summary for the overflow bucket");
        assert_eq!(overflow.detail["source"], OVERFLOW_SOURCE);
        assert_eq!(overflow.detail["count"], 95);
    }
}
