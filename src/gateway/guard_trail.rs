//! Guard state survives a restart: at start it is rebuilt from the audit trail,
//! from the tool calls that ran within the policy's longest guard window.

use super::*;
use crate::audit::{AuditQuery, MAX_QUERY_LIMIT};

impl Gateway {
    /// Notes every tool call of the trail that ran (a built-in `executed`, an
    /// upstream call's `allowed` intent) within the longest guard window of the
    /// policy, as the guards would have noted it live. Nothing to do without guards.
    pub(super) fn rebuild_guard_state(&self) -> Result<(), GatewayError> {
        let policy = self.policy();
        let Some(window) = policy
            .all_guards()
            .filter_map(crate::guards::ModeGuards::longest_window)
            .max()
        else {
            return Ok(());
        };
        let since = Utc::now() - chrono::Duration::from_std(window).unwrap_or_default();
        let mut state = self
            .guard_state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut after_seq = 0;
        loop {
            let page = self.audit.store().query(&AuditQuery {
                kind: Some(EntryKind::ToolCall.as_str().to_owned()),
                decision: Some("allowed".to_owned()),
                since: Some(since),
                after_seq: Some(after_seq),
                limit: MAX_QUERY_LIMIT,
                ..AuditQuery::default()
            })?;
            for record in &page.records {
                let ran = record.outcome == "executed" && record.arguments.is_some()
                    || record.outcome == crate::audit_view::PENDING;
                let (Some(tool), Some(arguments), Ok(time)) = (
                    record.tool.as_deref(),
                    record.arguments.as_ref(),
                    DateTime::parse_from_rfc3339(&record.time),
                ) else {
                    continue;
                };
                if ran {
                    let principal: Arc<str> = Arc::from(record.principal.as_str());
                    state.note_run(
                        policy.all_guards(),
                        &principal,
                        tool,
                        arguments,
                        time.to_utc(),
                    );
                }
            }
            match page.next_after_seq {
                Some(next) => after_seq = next,
                None => return Ok(()),
            }
        }
    }
}
