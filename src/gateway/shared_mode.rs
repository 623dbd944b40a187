//! One mode for several instances on a shared store (docs/scale-out.md).
//!
//! The store's mode row is the truth: every mode record bumps its epoch in the
//! transaction that writes the record, and every decision that depends on the
//! mode carries the epoch the gateway believed in when it decided; the store
//! records a decision whose epoch is stale as refused, so no instance acts on a
//! mode another instance has left. This module keeps the in-memory state close
//! to the row: it adopts the row when the store refuses a stale decision and,
//! between calls, from a watcher that reads the row every [`WATCH_INTERVAL`].
//! Adopting a mode drains this instance's calls that the new mode denies, as a
//! local switch does.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError, Weak};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::{Gateway, GatewayError, ModeState, PolicyStatus};
use crate::audit::{AuditError, SharedMode};
use crate::mode::drain;

/// How often an instance reads the shared mode row between calls. Only latency
/// depends on it: a decision under a stale epoch is refused whenever it commits.
pub(super) const WATCH_INTERVAL: Duration = Duration::from_millis(100);

impl Gateway {
    /// The policy status, after reading the shared mode row on a shared store: so
    /// once a switch on any instance has returned, every instance reports it
    /// (its watcher would otherwise lag by up to a tick). An unreachable store is
    /// an error rather than a possibly stale answer.
    pub async fn current_status(self: &Arc<Self>) -> Result<PolicyStatus, GatewayError> {
        if self.audit.store().shares_mode() {
            self.sync_shared_mode().await?;
        }
        Ok(self.status())
    }

    /// Reads the shared mode row and adopts it if it is newer than the state in
    /// memory. Blocking store I/O runs off the async workers.
    pub(super) async fn sync_shared_mode(self: &Arc<Self>) -> Result<(), GatewayError> {
        let store = Arc::clone(self.audit.store());
        let known = self.shared_epoch.load(Ordering::Acquire);
        let read = tokio::task::spawn_blocking(move || -> Result<_, AuditError> {
            let Some(row) = store.shared_mode()?.filter(|row| row.epoch > known) else {
                return Ok(None);
            };
            // The record that set the row says who set it and why.
            let mut record = None;
            store.scan_from(row.seq, &mut |found| {
                record = Some(found.into_record());
                false
            })?;
            Ok(Some((row, record)))
        })
        .await
        .map_err(|_| GatewayError::AuditUnavailable)??;
        if let Some((row, record)) = read {
            self.adopt_shared_mode(row, record).await;
        }
        Ok(())
    }

    /// Puts the mode of `row` in force here, unless the state already reflects
    /// its epoch (or a later one of this instance's own, not yet committed), then
    /// drains this instance's calls that the adopted mode denies.
    async fn adopt_shared_mode(
        self: &Arc<Self>,
        row: SharedMode,
        record: Option<crate::audit::AuditRecord>,
    ) {
        if row.epoch <= self.shared_epoch.load(Ordering::Acquire) {
            return;
        }
        // Not in the middle of a local change: it would then be adopted over.
        let _one_change_at_a_time = self.mode_changes.lock().await;
        let policy = self.policy();
        let now = Utc::now();
        let expires_at = row
            .expires_at
            .as_deref()
            .and_then(|text| DateTime::parse_from_rfc3339(text).ok())
            .map(|time| time.to_utc());
        // A mode this policy lacks, or one already lapsed, means the default mode:
        // the restrictive side.
        let (mode, expires) = match (policy.mode_id(&row.mode), expires_at) {
            (Some(mode), None) => (mode, None),
            (Some(mode), Some(at)) => match (at - now).to_std() {
                Ok(left) if !left.is_zero() => (mode, Some((Instant::now() + left, at))),
                _ => (policy.default_mode(), None),
            },
            (None, _) => (policy.default_mode(), None),
        };
        let reason = record
            .as_ref()
            .and_then(|record| record.detail.get("reason"))
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned);
        let changed_by = record.as_ref().map_or_else(
            || Arc::from("another instance"),
            |r| Arc::from(r.principal.as_str()),
        );
        let changed_at = record
            .as_ref()
            .and_then(|record| DateTime::parse_from_rfc3339(&record.time).ok())
            .map_or(now, |time| time.to_utc());
        let to_drain = {
            let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
            if row.epoch <= self.shared_epoch.load(Ordering::Acquire) {
                return;
            }
            state.switch(ModeState {
                mode,
                expires,
                reason,
                changed_by,
                changed_at,
                epoch: 0,
            });
            self.shared_epoch.store(row.epoch, Ordering::Release);
            self.in_flight.to_drain(state.epoch, |tool, arguments| {
                self.would_allow(mode, tool, arguments)
            })
        };
        tracing::info!(mode = %row.mode, epoch = row.epoch, "adopted the shared mode");
        self.mode_events.send_replace(self.status());
        self.metrics.mode_changed();
        if !to_drain.is_empty() {
            // Each drained call records its own outcome; the switch's instance
            // records the summary of the whole drain.
            let timeout = policy.drain_timeout();
            tokio::spawn(drain(to_drain, timeout));
        }
    }
}

/// Reads the shared mode row every [`WATCH_INTERVAL`], and sends this instance's
/// heartbeat every [`HEARTBEAT_TICKS`] of them, until the gateway is dropped.
pub(super) fn spawn_watcher(gateway: Weak<Gateway>) {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(WATCH_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for tick in 0u64.. {
            ticks.tick().await;
            let Some(gateway) = gateway.upgrade() else {
                return;
            };
            if let Err(error) = gateway.sync_shared_mode().await {
                tracing::debug!(%error, "cannot read the shared mode");
            }
            if tick.is_multiple_of(HEARTBEAT_TICKS) {
                let store = Arc::clone(gateway.audit.store());
                match tokio::task::spawn_blocking(move || store.heartbeat()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => tracing::debug!(%error, "cannot send the heartbeat"),
                    Err(error) => tracing::debug!(%error, "the heartbeat task failed"),
                }
            }
        }
    });
}

/// Heartbeats every this many watcher ticks (1 s): the store counts an instance
/// dead after 3 s without one.
const HEARTBEAT_TICKS: u64 = 10;
/// How often a switch's drain reads what the other instances have in flight.
const REMOTE_POLL: Duration = Duration::from_millis(20);
/// Beyond `drain_timeout_seconds`, how long a switch waits for the other
/// instances: they learn of the switch within a watcher tick, cancel what is left
/// at their own drain timeout, and take up to the cancel grace to record it.
const REMOTE_DRAIN_MARGIN: Duration =
    Duration::from_millis(2 * WATCH_INTERVAL.as_millis() as u64 + 1000)
        .saturating_add(super::CANCEL_GRACE);

/// What a switch found in flight on other instances and waited for.
#[derive(Debug, Default, serde::Serialize)]
pub(super) struct RemoteDrain {
    /// Calls that recorded their outcome while the switch waited.
    pub finished: Vec<RemoteCall>,
    /// Calls of instances known dead: their outcome will never be recorded.
    pub on_dead_instances: Vec<RemoteCall>,
    /// Calls still unresolved when the wait ran out.
    pub unresolved: Vec<RemoteCall>,
}

/// One call a switch waited for on another instance.
#[derive(Clone, Debug, serde::Serialize)]
pub(super) struct RemoteCall {
    intent_seq: u64,
    instance: String,
    tool: String,
}

impl RemoteDrain {
    fn is_empty(&self) -> bool {
        self.finished.is_empty() && self.on_dead_instances.is_empty() && self.unresolved.is_empty()
    }
}

impl Gateway {
    /// After a switch to `target` recorded at `change_seq`: waits until no call
    /// that `target` denies, decided (on any instance) before the switch, is still
    /// running, bounded by the drain timeout (plus [`REMOTE_DRAIN_MARGIN`]); a call
    /// of an instance known dead does not hold the switch. Records what it waited
    /// for (`mode_drained`, `remote`), when anything.
    pub(super) async fn drain_other_instances(
        &self,
        principal: &crate::principal::Principal,
        mode_name: &Arc<str>,
        target: crate::policy::ModeId,
        change_seq: u64,
    ) {
        let deadline =
            tokio::time::Instant::now() + self.policy().drain_timeout() + REMOTE_DRAIN_MARGIN;
        let mut seen: std::collections::BTreeMap<u64, RemoteCall> =
            std::collections::BTreeMap::new();
        let mut report = RemoteDrain::default();
        loop {
            let store = Arc::clone(self.audit.store());
            let listed =
                tokio::task::spawn_blocking(move || store.in_flight_before(change_seq)).await;
            let Ok(Ok(rows)) = listed else {
                tracing::warn!(
                    "cannot read the calls in flight on other instances; the switch does not wait for them"
                );
                report.unresolved = seen.into_values().collect();
                break;
            };
            let denied: Vec<_> = rows
                .into_iter()
                .filter(|row| {
                    let arguments = row
                        .arguments
                        .as_deref()
                        .and_then(|text| serde_json::from_str(text).ok())
                        .unwrap_or(serde_json::Value::Null);
                    !self.would_allow(target, &row.tool, &arguments)
                })
                .collect();
            let running: Vec<u64> = denied
                .iter()
                .filter(|row| row.alive)
                .map(|row| row.intent_seq)
                .collect();
            for row in denied {
                seen.entry(row.intent_seq).or_insert(RemoteCall {
                    intent_seq: row.intent_seq,
                    instance: row.instance.clone(),
                    tool: row.tool.clone(),
                });
                if !row.alive {
                    // Listed once; such a call never resolves.
                    if let Some(call) = seen.remove(&row.intent_seq) {
                        report.on_dead_instances.push(call);
                    }
                }
            }
            let out_of_time = tokio::time::Instant::now() >= deadline;
            if running.is_empty() || out_of_time {
                for (seq, call) in seen {
                    if running.contains(&seq) {
                        report.unresolved.push(call);
                    } else {
                        report.finished.push(call);
                    }
                }
                break;
            }
            tokio::time::sleep(REMOTE_POLL).await;
        }
        report.on_dead_instances.sort_by_key(|call| call.intent_seq);
        report
            .on_dead_instances
            .dedup_by_key(|call| call.intent_seq);
        if report.is_empty() {
            return;
        }
        if !report.unresolved.is_empty() {
            tracing::warn!(
                calls = report.unresolved.len(),
                "calls on other instances were still unresolved when the switch stopped waiting"
            );
        }
        let entry = crate::audit::AuditEntry {
            time: Utc::now(),
            principal: principal.clone(),
            kind: crate::audit::EntryKind::ModeDrained,
            tool: None,
            arguments: None,
            mode: mode_name.clone(),
            decision: crate::audit::AuditDecision::Allowed,
            reason_code: None,
            outcome: if report.unresolved.is_empty() {
                "drained"
            } else {
                "unresolved"
            },
            detail: serde_json::json!({"change_seq": change_seq, "remote": report}),
            expires_at: None,
            context: None,
            policy_hash: self.policy_version(),
        };
        if let Err(error) = self
            .audit
            .append_with(entry, crate::audit::Priority::Essential)
            .await
        {
            tracing::error!(%error, "could not record the calls a mode switch waited for on other instances");
        }
    }
}
