//! `GET /audit` and `GET /audit/stream`: the wire shape of
//! [`crate::audit::AuditRecord`] and the page that carries them.
//!
//! This is what clients read, not what is stored or hashed: the stores keep
//! [`crate::audit::StoredRecord`] columns and the chain digests those, so this
//! shape can only change with the API, never with the trail.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One audit record as clients see it (also `proxi audit tail --json`). Field
/// order is the JSON order clients have always received; the columns added
/// after the first release (`context`, `mac`, `policy_hash`, `role`) are omitted,
/// not null, when a record lacks them, as older records do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the chain, from 1.
    pub seq: u64,
    /// RFC 3339 time, microsecond precision.
    pub time: String,
    /// Who asked.
    pub principal: String,
    /// `tool_call`, `mode_change`, `mode_expired`, `auth_refused`, `incident`, ...
    pub kind: String,
    /// The tool named, if any.
    pub tool: Option<String>,
    /// The arguments given, if any (or their digest, when too large to store).
    pub arguments: Option<Value>,
    /// The mode in force (for mode changes: the new mode).
    pub mode: String,
    /// `allowed`, `denied` or `rejected`.
    pub decision: String,
    /// Reason code of a refusal, as stored (see [`AuditRecord::reason`]).
    pub reason_code: Option<String>,
    /// What happened.
    pub outcome: String,
    /// Result, error or explanation.
    pub detail: Value,
    /// For mode changes, when the mode lapses.
    pub expires_at: Option<String>,
    /// Hash of the previous record.
    pub prev_hash: String,
    /// SHA-256 over `prev_hash` and this record's fields.
    pub hash: String,
    /// The caller's context, bounded like `arguments`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<Value>,
    /// `<key id>:<HMAC-SHA-256 of hash>` under the audit key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The version of the policy that decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_hash: Option<String>,
    /// The principal's role (`operator`, `agent`, `system`, `anonymous`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

impl AuditRecord {
    /// The reason code as a [`crate::reason::Reason`]; `None` without one, or for
    /// a name no reason has (a record from another version, or forged), so
    /// clients compare reasons, not strings.
    pub fn reason(&self) -> Option<crate::reason::Reason> {
        self.reason_code
            .as_deref()
            .and_then(crate::reason::Reason::parse)
    }
}

impl From<&crate::audit::AuditRecord> for AuditRecord {
    fn from(record: &crate::audit::AuditRecord) -> AuditRecord {
        AuditRecord {
            seq: record.seq,
            time: record.time.clone(),
            principal: record.principal.clone(),
            kind: record.kind.clone(),
            tool: record.tool.clone(),
            arguments: record.arguments.clone(),
            mode: record.mode.clone(),
            decision: record.decision.clone(),
            reason_code: record.reason_code.clone(),
            outcome: record.outcome.clone(),
            detail: record.detail.clone(),
            expires_at: record.expires_at.clone(),
            prev_hash: record.prev_hash.clone(),
            hash: record.hash.clone(),
            context: record.context.clone(),
            mac: record.mac.clone(),
            policy_hash: record.policy_hash.clone(),
            role: record.role.clone(),
        }
    }
}

impl From<crate::audit::AuditRecord> for AuditRecord {
    fn from(record: crate::audit::AuditRecord) -> AuditRecord {
        AuditRecord {
            seq: record.seq,
            time: record.time,
            principal: record.principal,
            kind: record.kind,
            tool: record.tool,
            arguments: record.arguments,
            mode: record.mode,
            decision: record.decision,
            reason_code: record.reason_code,
            outcome: record.outcome,
            detail: record.detail,
            expires_at: record.expires_at,
            prev_hash: record.prev_hash,
            hash: record.hash,
            context: record.context,
            mac: record.mac,
            policy_hash: record.policy_hash,
            role: record.role,
        }
    }
}

/// `GET /audit` answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditPage {
    /// Number of records returned.
    pub count: usize,
    /// The records, oldest first: the newest matching ones, or those after `after_seq`.
    pub records: Vec<AuditRecord>,
    /// Seqs of upstream-call intents among `records` whose outcome is unknown: no
    /// record resolves them and the server is not running them (a crash cut them
    /// short). Absent when there are none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outcome_unknown: Vec<u64>,
    /// With `after_seq`: the seq of the last record returned, when more match
    /// (pass it as the next `after_seq`); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_after_seq: Option<u64>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::wire_tests::keys_in_order;
    use super::*;
    use crate::reason::Reason;

    fn full() -> crate::audit::AuditRecord {
        crate::audit::AuditRecord {
            seq: 7,
            time: "2026-01-01T00:00:00.000000Z".into(),
            principal: "agent".into(),
            kind: "tool_call".into(),
            tool: Some("restart_service".into()),
            arguments: Some(json!({"service_name": "web-server"})),
            mode: "NORMAL".into(),
            decision: "denied".into(),
            reason_code: Some(Reason::BlockedInMode.to_string()),
            outcome: "denied".into(),
            detail: json!({"message": "blocked"}),
            expires_at: None,
            prev_hash: "0".repeat(64),
            hash: "f".repeat(64),
            context: Some(json!({"ticket": "INC-1"})),
            mac: Some("k1:ab".into()),
            policy_hash: Some("c".repeat(64)),
            role: Some("agent".into()),
        }
    }

    #[test]
    fn the_wire_shape_is_pinned() {
        let wire = AuditRecord::from(&full());
        let text = serde_json::to_string(&wire).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap(),
            json!({
                "seq": 7,
                "time": "2026-01-01T00:00:00.000000Z",
                "principal": "agent",
                "kind": "tool_call",
                "tool": "restart_service",
                "arguments": {"service_name": "web-server"},
                "mode": "NORMAL",
                "decision": "denied",
                "reason_code": "blocked_in_mode",
                "outcome": "denied",
                "detail": {"message": "blocked"},
                "expires_at": null,
                "prev_hash": "0".repeat(64),
                "hash": "f".repeat(64),
                "context": {"ticket": "INC-1"},
                "mac": "k1:ab",
                "policy_hash": "c".repeat(64),
                "role": "agent",
            })
        );
        assert_eq!(
            keys_in_order(&text),
            [
                "seq",
                "time",
                "principal",
                "kind",
                "tool",
                "arguments",
                "mode",
                "decision",
                "reason_code",
                "outcome",
                "detail",
                "expires_at",
                "prev_hash",
                "hash",
                "context",
                "mac",
                "policy_hash",
                "role",
            ]
        );
        assert_eq!(serde_json::from_str::<AuditRecord>(&text).unwrap(), wire);
        assert_eq!(AuditRecord::from(full()), wire);
        assert_eq!(wire.reason(), Some(Reason::BlockedInMode));
    }

    #[test]
    fn later_columns_are_omitted_when_absent_and_the_rest_are_null() {
        let old = crate::audit::AuditRecord {
            tool: None,
            arguments: None,
            reason_code: None,
            context: None,
            mac: None,
            policy_hash: None,
            role: None,
            ..full()
        };
        let text = serde_json::to_string(&AuditRecord::from(&old)).unwrap();
        let value: Value = serde_json::from_str(&text).unwrap();
        for key in ["tool", "arguments", "reason_code", "expires_at"] {
            assert_eq!(value[key], json!(null), "{key}");
        }
        for key in ["context", "mac", "policy_hash", "role"] {
            assert!(value.get(key).is_none(), "{key} in {text}");
        }
        // What an older server sent parses back.
        assert_eq!(
            serde_json::from_str::<AuditRecord>(&text).unwrap(),
            AuditRecord::from(old)
        );
    }

    #[test]
    fn a_page_omits_empty_extras() {
        let page = AuditPage {
            count: 1,
            records: vec![AuditRecord::from(full())],
            outcome_unknown: Vec::new(),
            next_after_seq: None,
        };
        let text = serde_json::to_string(&page).unwrap();
        assert_eq!(keys_in_order(&text), ["count", "records"]);
        let page = AuditPage {
            outcome_unknown: vec![7],
            next_after_seq: Some(7),
            ..page
        };
        let text = serde_json::to_string(&page).unwrap();
        assert_eq!(
            keys_in_order(&text),
            ["count", "records", "outcome_unknown", "next_after_seq"]
        );
        let value: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["outcome_unknown"], json!([7]));
        assert_eq!(value["next_after_seq"], json!(7));
    }
}
