//! `serve --shadow-policy FILE`: every tool call is decided a second time, under
//! a candidate policy, without any effect on the call. When the two decisions
//! differ (allowed/denied/rejected, or the reason), the call's own record (the
//! one that decided: an upstream call's intent) carries the shadow's decision in
//! `detail.shadow_decision`, and `proxi_shadow_disagreements_total` counts it once
//! that record is durable.

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
            Verdict::Deny(denial) => Some(denial.reason),
            Verdict::UnknownTool => Some(Reason::UnknownTool),
            Verdict::InvalidArguments(_) => Some(Reason::InvalidArguments),
        };
        DecisionClass {
            decision: verdict.audit_decision(),
            reason,
        }
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

    /// The shadow's decision on a call when it differs from `decided` (the
    /// decision, or the reason), as the call's own record carries it in
    /// `detail.shadow_decision`: `decision`, `reason_code`, `policy_hash` (the
    /// shadow's) and `mode` (the shadow's mode of the same name as `mode`, else its
    /// default). `None` when no shadow is set (checked first, so a gateway without
    /// one pays nothing more) or the two agree. Pure: no I/O, and no lock but the
    /// shadow binding's read side, taken and released here.
    pub(super) fn shadow_disagreement(
        &self,
        mode: &str,
        tool_name: &str,
        arguments: &Value,
        decided: DecisionClass,
    ) -> Option<Value> {
        let shadow = self.shadow.get()?.current();
        let shadow_mode = shadow.mode_id(mode).unwrap_or(shadow.default_mode());
        let verdict = decide_call(&shadow, shadow_mode, tool_name, arguments);
        let shadowed = DecisionClass::of(&verdict);
        (shadowed != decided).then(|| {
            json!({
                "decision": shadowed.decision,
                "reason_code": shadowed.reason.map(Reason::as_str),
                "policy_hash": shadow.policy_hash(),
                "mode": shadow.mode(shadow_mode).name(),
            })
        })
    }
}

/// `detail` with `shadow_decision` added: into the object, or around a detail
/// that is not one (`{"detail": ..., "shadow_decision": ...}`), as an approval's
/// id is added.
pub(super) fn with_shadow_decision(detail: Value, shadowed: Value) -> Value {
    match detail {
        Value::Object(mut object) => {
            object.insert("shadow_decision".to_owned(), shadowed);
            Value::Object(object)
        }
        other => json!({"detail": other, "shadow_decision": shadowed}),
    }
}
