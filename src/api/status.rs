//! `GET /policy/status` (and the console's and MCP's view of the same state):
//! the wire shape of [`crate::gateway::PolicyStatus`].

use serde::{Deserialize, Serialize};

/// The policy state as clients see it: the mode in force, what it allows and
/// blocks, and who entered it when. Field order is the JSON order clients have
/// always received; `src/client.rs` and the agent parse it back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyStatus {
    /// The mode in force.
    pub mode: String,
    /// The mode's description.
    pub description: String,
    /// Tools the mode allows.
    pub allowed_tools: Vec<String>,
    /// Tools the mode explicitly blocks.
    pub blocked_tools: Vec<String>,
    /// Tools blocked in every mode.
    pub always_blocked: Vec<String>,
    /// When an elevated mode lapses (RFC 3339), or null.
    pub emergency_expires_at: Option<String>,
    /// The mode Proxi returns to.
    pub default_mode: String,
    /// Every mode the policy defines.
    pub available_modes: Vec<String>,
    /// Why the current mode was entered.
    pub reason: Option<String>,
    /// Who entered it.
    pub changed_by: String,
    /// When.
    pub changed_at: String,
    /// The version of the policy in force: SHA-256 of its canonical JSON
    /// ([`crate::policy::PolicyEngine::policy_hash`]). Empty from a server that
    /// predates it, hence the default when parsing.
    #[serde(default)]
    pub policy_hash: String,
}

impl From<&crate::gateway::PolicyStatus> for PolicyStatus {
    fn from(status: &crate::gateway::PolicyStatus) -> PolicyStatus {
        PolicyStatus {
            mode: status.mode.clone(),
            description: status.description.clone(),
            allowed_tools: status.allowed_tools.clone(),
            blocked_tools: status.blocked_tools.clone(),
            always_blocked: status.always_blocked.clone(),
            emergency_expires_at: status.emergency_expires_at.clone(),
            default_mode: status.default_mode.clone(),
            available_modes: status.available_modes.clone(),
            reason: status.reason.clone(),
            changed_by: status.changed_by.clone(),
            changed_at: status.changed_at.clone(),
            policy_hash: status.policy_hash.clone(),
        }
    }
}

impl From<crate::gateway::PolicyStatus> for PolicyStatus {
    fn from(status: crate::gateway::PolicyStatus) -> PolicyStatus {
        PolicyStatus {
            mode: status.mode,
            description: status.description,
            allowed_tools: status.allowed_tools,
            blocked_tools: status.blocked_tools,
            always_blocked: status.always_blocked,
            emergency_expires_at: status.emergency_expires_at,
            default_mode: status.default_mode,
            available_modes: status.available_modes,
            reason: status.reason,
            changed_by: status.changed_by,
            changed_at: status.changed_at,
            policy_hash: status.policy_hash,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn domain() -> crate::gateway::PolicyStatus {
        crate::gateway::PolicyStatus {
            mode: "EMERGENCY".into(),
            description: "corrective actions".into(),
            allowed_tools: vec!["list_services".into(), "restart_service".into()],
            blocked_tools: vec!["scale_fleet".into()],
            always_blocked: vec!["delete_database".into()],
            emergency_expires_at: Some("2026-01-01T00:15:00.000000Z".into()),
            default_mode: "NORMAL".into(),
            available_modes: vec!["NORMAL".into(), "EMERGENCY".into()],
            reason: Some("incident".into()),
            changed_by: "operator".into(),
            changed_at: "2026-01-01T00:00:00.000000Z".into(),
            policy_hash: "ab".repeat(32),
        }
    }

    #[test]
    fn the_wire_shape_is_pinned() {
        let wire = PolicyStatus::from(&domain());
        let text = serde_json::to_string(&wire).unwrap();
        let expected = json!({
            "mode": "EMERGENCY",
            "description": "corrective actions",
            "allowed_tools": ["list_services", "restart_service"],
            "blocked_tools": ["scale_fleet"],
            "always_blocked": ["delete_database"],
            "emergency_expires_at": "2026-01-01T00:15:00.000000Z",
            "default_mode": "NORMAL",
            "available_modes": ["NORMAL", "EMERGENCY"],
            "reason": "incident",
            "changed_by": "operator",
            "changed_at": "2026-01-01T00:00:00.000000Z",
            "policy_hash": "ab".repeat(32),
        });
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&text).unwrap(),
            expected
        );
        assert_eq!(
            super::super::wire_tests::keys_in_order(&text),
            [
                "mode",
                "description",
                "allowed_tools",
                "blocked_tools",
                "always_blocked",
                "emergency_expires_at",
                "default_mode",
                "available_modes",
                "reason",
                "changed_by",
                "changed_at",
                "policy_hash",
            ]
        );
        assert_eq!(PolicyStatus::from(domain()), wire);
        assert_eq!(serde_json::from_str::<PolicyStatus>(&text).unwrap(), wire);
    }

    #[test]
    fn absent_values_are_null_and_an_old_server_has_no_policy_hash() {
        let mut status = domain();
        status.emergency_expires_at = None;
        status.reason = None;
        let value = serde_json::to_value(PolicyStatus::from(&status)).unwrap();
        assert_eq!(value["emergency_expires_at"], json!(null));
        assert_eq!(value["reason"], json!(null));
        let mut old = value.as_object().unwrap().clone();
        old.remove("policy_hash");
        let parsed: PolicyStatus = serde_json::from_value(old.into()).unwrap();
        assert_eq!(parsed.policy_hash, "");
    }
}
