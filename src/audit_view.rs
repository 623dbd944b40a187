//! How readers of the trail pair the two records of an upstream call.
//!
//! An allowed upstream call is recorded twice: its intent (`decision: allowed`,
//! outcome [`PENDING`]), durable before the call is forwarded, and its outcome, a
//! later `tool_call` record whose `detail` names the intent's seq under
//! [`INTENT_SEQ`] (hashed like every other column). An intent that no later record
//! resolves is a call whose outcome is unknown: still in flight, or cut short by a
//! crash. `proxi audit tail` and `GET /audit` say so.

use std::collections::HashSet;

use serde_json::Value;

use crate::audit::AuditRecord;

/// The outcome of an upstream call's intent record.
pub const PENDING: &str = "pending";
/// The `detail` key by which an outcome record refers to its intent.
pub const INTENT_SEQ: &str = "intent_seq";
/// How `audit tail` shows an intent that no record in view resolves.
pub const OUTCOME_UNKNOWN: &str = "pending: outcome unknown";

/// Whether `record` is the intent of an upstream call.
pub fn is_intent(record: &AuditRecord) -> bool {
    record.kind == "tool_call" && record.outcome == PENDING
}

/// The intent an outcome record resolves, if `record` is one.
pub fn resolved_intent(record: &AuditRecord) -> Option<u64> {
    if record.kind != "tool_call" {
        return None;
    }
    record.detail.get(INTENT_SEQ).and_then(Value::as_u64)
}

/// The seqs of the intents in `records` that no record in `records` resolves,
/// in order. An outcome always comes after its intent, so for a window of the
/// newest records this is exact.
pub fn unresolved_intents(records: &[AuditRecord]) -> Vec<u64> {
    let resolved: HashSet<u64> = records.iter().filter_map(resolved_intent).collect();
    records
        .iter()
        .filter(|record| is_intent(record) && !resolved.contains(&record.seq))
        .map(|record| record.seq)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(seq: u64, outcome: &str, detail: Value) -> AuditRecord {
        AuditRecord {
            seq,
            time: String::new(),
            principal: "agent".into(),
            kind: "tool_call".into(),
            tool: Some("fs__read_file".into()),
            arguments: None,
            mode: "NORMAL".into(),
            decision: "allowed".into(),
            reason_code: None,
            outcome: outcome.into(),
            detail,
            expires_at: None,
            prev_hash: String::new(),
            hash: String::new(),
            context: None,
            mac: None,
            policy_hash: None,
            role: None,
        }
    }

    #[test]
    fn an_intent_without_its_outcome_is_unresolved() {
        let records = [
            record(1, PENDING, json!({"upstream": "fs"})),
            record(2, PENDING, json!({"upstream": "fs"})),
            record(3, "executed", json!({INTENT_SEQ: 1, "result": {}})),
            record(4, "executed", json!({"result": "a built-in"})),
        ];
        assert_eq!(unresolved_intents(&records), vec![2]);
        assert_eq!(resolved_intent(&records[2]), Some(1));
        assert!(is_intent(&records[0]) && !is_intent(&records[3]));
    }
}
