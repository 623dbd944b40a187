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

use super::{Gateway, GatewayError, ModeState};
use crate::audit::{AuditError, SharedMode};
use crate::mode::drain;

/// How often an instance reads the shared mode row between calls. Only latency
/// depends on it: a decision under a stale epoch is refused whenever it commits.
pub(super) const WATCH_INTERVAL: Duration = Duration::from_millis(100);

impl Gateway {
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

/// Reads the shared mode row every [`WATCH_INTERVAL`] until the gateway is dropped.
pub(super) fn spawn_watcher(gateway: Weak<Gateway>) {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(WATCH_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let Some(gateway) = gateway.upgrade() else {
                return;
            };
            if let Err(error) = gateway.sync_shared_mode().await {
                tracing::debug!(%error, "cannot read the shared mode");
            }
        }
    });
}
