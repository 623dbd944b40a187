//! `serve --shadow-policy FILE`: every tool call is decided a second time, under
//! a candidate policy, without any effect on the call. When the two decisions
//! differ (allowed/denied/rejected, or the reason), a `shadow_decision` record
//! refers to the call's record by seq and `proxi_shadow_disagreements_total`
//! counts it.

use super::*;

/// A decision reduced to what a shadow comparison looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct DecisionClass {
    decision: AuditDecision,
    reason: Option<Reason>,
}

impl DecisionClass {
    /// The class of `verdict`.
    pub(super) fn of(verdict: &Verdict) -> DecisionClass {
        let reason = match verdict {
            Verdict::Allow(_) => None,
            Verdict::Deny(denial) => Some(denial.reason.into()),
            Verdict::UnknownTool => Some(Reason::UnknownTool),
            Verdict::InvalidArguments(_) => Some(Reason::InvalidArguments),
        };
        DecisionClass {
            decision: verdict.audit_decision(),
            reason,
        }
    }

    fn to_json(self) -> Value {
        json!({
            "decision": self.decision,
            "reason_code": self.reason.map(Reason::as_str),
        })
    }
}

impl Gateway {
    /// Decides every call under `shadow` as well from now on (bound to the
    /// catalog in force, and re-bound with it). Returns false if a shadow policy
    /// was set already.
    pub fn set_shadow_policy(&self, shadow: &PolicyEngine) -> bool {
        let bound = shadow.bind(Arc::clone(self.policy().catalog()));
        self.shadow.set(SharedPolicy::new(bound)).is_ok()
    }

    /// The shadow policy in force, if any.
    pub fn shadow_policy(&self) -> Option<Arc<PolicyEngine>> {
        self.shadow.get().map(SharedPolicy::current)
    }

    /// Decides the call recorded at `call_seq` again under the shadow policy, in
    /// the mode of the same name (else the shadow's default), and records a
    /// disagreement. Queues the record without waiting: the call's answer does
    /// not depend on it.
    pub(super) fn compare_with_shadow(
        &self,
        principal: &Principal,
        tool_name: &str,
        mode: &Arc<str>,
        arguments: &Value,
        decided: DecisionClass,
        call_seq: u64,
    ) {
        let Some(shadow) = self.shadow_policy() else {
            return;
        };
        let shadow_mode = shadow.mode_id(mode).unwrap_or(shadow.default_mode());
        let verdict = decide_call(&shadow, shadow_mode, tool_name, arguments);
        let shadowed = DecisionClass::of(&verdict);
        if shadowed == decided {
            return;
        }
        self.metrics.shadow_disagreement();
        let entry = AuditEntry {
            time: Utc::now(),
            principal: principal.clone(),
            kind: EntryKind::ShadowDecision,
            tool: Some(truncate(tool_name, MAX_TOOL_NAME_LEN).to_owned()),
            arguments: None,
            mode: mode.clone(),
            decision: shadowed.decision,
            reason_code: shadowed.reason,
            outcome: "disagrees",
            detail: json!({
                "call_seq": call_seq,
                "decision": decided.to_json(),
                "shadow_decision": shadowed.to_json(),
                "shadow_mode": shadow.mode(shadow_mode).name(),
            }),
            expires_at: None,
            context: None,
            policy_hash: Some(Arc::from(shadow.policy_hash())),
        };
        drop(self.audit.submit_with(entry, audit_priority(principal)));
    }
}
