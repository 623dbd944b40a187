//! `proxi policy replay`: every tool call of the audit trail decided again under
//! a candidate policy, to learn what the candidate would have changed.
//!
//! Each call is decided with [`crate::decision::decide_call`], the gateway's own
//! decision function, in the mode recorded with it (the mode in force when it
//! was decided); a mode the candidate lacks falls back to the candidate's default
//! mode, as a reload would. Records are read through the [`AuditStore`], a page
//! at a time, so a long trail is never held in memory.
//!
//! Upstream schemas are unknown offline: the candidate is bound to a catalog of
//! its built-ins plus every upstream tool the trail names under an upstream the
//! candidate declares, each accepting any object. Some records cannot be
//! decided again and are counted apart, never guessed: refusals that did not
//! come from the policy (rate limits, malformed requests) and calls whose
//! arguments were too large to be stored whole. An upstream call is decided
//! once, on its intent record; the outcome record that follows it is skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::audit::{AuditError, AuditQuery, AuditRecord, AuditStore, EntryKind, MAX_QUERY_LIMIT};
use crate::decision::decide_call;
use crate::policy::PolicyEngine;
use crate::policy_diff::offline_catalog;
use crate::reason::Reason;
use crate::upstream::names::SEPARATOR;

/// Most changed calls listed per direction; the counts stay exact beyond it.
pub const MAX_LISTED_CHANGES: usize = 1000;
/// Most distinct upstream tool names taken from the trail into the catalog.
pub const MAX_UPSTREAM_NAMES: usize = 10_000;

/// Reason codes of refusals the policy did not make: replaying them under any
/// policy says nothing about the policy.
const NOT_POLICY_REFUSALS: [Reason; 3] = [
    Reason::RateLimited,
    Reason::MalformedRequest,
    Reason::InvalidToolName,
];

/// What replaying the trail under a candidate found.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ReplayReport {
    /// The candidate's version ([`PolicyEngine::policy_hash`]).
    pub candidate_hash: String,
    /// Tool-call records decided again.
    pub replayed: u64,
    /// Tool-call records left out, by why: `rate_limited`, `malformed_request`,
    /// `invalid_tool_name`, `arguments_not_stored`.
    pub not_replayed: BTreeMap<String, u64>,
    /// Replayed calls whose recorded mode the candidate lacks (decided in its default mode).
    pub mode_missing: u64,
    /// The replayed calls by recorded decision (`allowed`, `denied`, `rejected`).
    pub recorded: BTreeMap<String, u64>,
    /// The replayed calls by the candidate's decision.
    pub candidate: BTreeMap<String, u64>,
    /// How many calls the candidate would refuse that ran.
    pub newly_denied_count: u64,
    /// How many calls the candidate would allow that were refused.
    pub newly_allowed_count: u64,
    /// The first [`MAX_LISTED_CHANGES`] newly refused calls, oldest first.
    pub newly_denied: Vec<ReplayedCall>,
    /// The first [`MAX_LISTED_CHANGES`] newly allowed calls, oldest first.
    pub newly_allowed: Vec<ReplayedCall>,
}

/// One call whose outcome the candidate changes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReplayedCall {
    /// The record's position in the trail.
    pub seq: u64,
    /// When it was decided.
    pub time: String,
    /// Who asked.
    pub principal: String,
    /// The tool asked for.
    pub tool: String,
    /// The mode it was decided in.
    pub mode: String,
    /// The recorded decision and reason code.
    pub recorded: String,
    /// The candidate's decision and reason code.
    pub candidate: String,
}

/// Why a replay could not run.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The store could not be read.
    #[error("cannot read the audit trail: {0}")]
    Audit(#[from] AuditError),
}

/// Replays every tool-call record at or after `since` (all when `None`) under
/// `candidate`. Two passes over the store: one to learn the upstream tool names,
/// one to decide.
pub fn replay(
    store: &dyn AuditStore,
    candidate: &PolicyEngine,
    since: Option<DateTime<Utc>>,
) -> Result<ReplayReport, ReplayError> {
    let mut upstream_names = BTreeSet::new();
    // Only a candidate with upstreams needs their names; the built-ins are known.
    if !candidate.upstreams().is_empty() {
        let upstream_tools = format!("*{SEPARATOR}*");
        for_each_tool_call(store, since, Some(&upstream_tools), &mut |record| {
            if let Some(tool) = &record.tool
                && upstream_names.len() < MAX_UPSTREAM_NAMES
                && tool
                    .split_once(SEPARATOR)
                    .is_some_and(|(upstream, _)| candidate.upstreams().contains_key(upstream))
            {
                upstream_names.insert(tool.clone());
            }
        })?;
    }
    let catalog = offline_catalog(
        candidate.catalog().has_builtins(),
        upstream_names.iter().map(String::as_str),
    );
    let bound = candidate.bind(Arc::new(catalog));
    let mut report = ReplayReport {
        candidate_hash: candidate.policy_hash().to_owned(),
        ..ReplayReport::default()
    };
    for_each_tool_call(store, since, None, &mut |record| {
        replay_one(&bound, record, &mut report)
    })?;
    Ok(report)
}

/// Visits the tool-call records at or after `since`, oldest first; with `tool`,
/// only those whose tool matches that glob.
fn for_each_tool_call(
    store: &dyn AuditStore,
    since: Option<DateTime<Utc>>,
    tool: Option<&str>,
    visit: &mut dyn FnMut(AuditRecord),
) -> Result<(), AuditError> {
    let mut after_seq = 0;
    loop {
        let page = store.query(&AuditQuery {
            kind: Some(EntryKind::ToolCall.as_str().to_owned()),
            tool: tool.map(str::to_owned),
            since,
            after_seq: Some(after_seq),
            limit: MAX_QUERY_LIMIT,
            ..AuditQuery::default()
        })?;
        for record in page.records {
            visit(record);
        }
        match page.next_after_seq {
            Some(next) => after_seq = next,
            None => return Ok(()),
        }
    }
}

fn replay_one(policy: &PolicyEngine, mut record: AuditRecord, report: &mut ReplayReport) {
    // An upstream call's outcome record follows its intent, which is the decision.
    if crate::audit_view::resolved_intent(&record).is_some() {
        return;
    }
    let not_replayed = match record.reason() {
        Some(reason) if NOT_POLICY_REFUSALS.contains(&reason) => Some(reason.as_str()),
        _ if record.tool.is_none() => Some(Reason::MalformedRequest.as_str()),
        _ if record.arguments.as_ref().is_some_and(is_stored_digest) => {
            Some("arguments_not_stored")
        }
        _ => None,
    };
    if let Some(why) = not_replayed {
        *report.not_replayed.entry(why.to_owned()).or_default() += 1;
        return;
    }
    let tool = record.tool.as_deref().unwrap_or_default();
    let mode = policy.mode_id(&record.mode).unwrap_or_else(|| {
        report.mode_missing += 1;
        policy.default_mode()
    });
    let arguments = match record.arguments.take() {
        // Rejected calls (and large denied ones) keep a digest whose prefix is
        // the whole text when it was short enough: decide on that text.
        Some(Value::Object(digest)) if is_whole_digest(&digest) => digest
            .get("prefix")
            .and_then(Value::as_str)
            .and_then(|text| serde_json::from_str(text).ok())
            .unwrap_or(Value::Null),
        Some(arguments) => arguments,
        None => Value::Null,
    };
    let verdict = decide_call(policy, mode, tool, &arguments);
    let decision = verdict.audit_decision().as_str();
    report.replayed += 1;
    *report.recorded.entry(record.decision.clone()).or_default() += 1;
    *report.candidate.entry(decision.to_owned()).or_default() += 1;
    let was_allowed = record.decision == "allowed";
    let is_allowed = decision == "allowed";
    if was_allowed == is_allowed {
        return;
    }
    let with_reason = |decision: &str, reason: Option<&str>| match reason {
        Some(reason) => format!("{decision} ({reason})"),
        None => decision.to_owned(),
    };
    let call = ReplayedCall {
        seq: record.seq,
        time: record.time,
        principal: record.principal,
        tool: tool.to_owned(),
        mode: record.mode,
        recorded: with_reason(&record.decision, record.reason_code.as_deref()),
        candidate: with_reason(decision, verdict.reason_code().map(Reason::as_str)),
    };
    let (count, list) = if was_allowed {
        (&mut report.newly_denied_count, &mut report.newly_denied)
    } else {
        (&mut report.newly_allowed_count, &mut report.newly_allowed)
    };
    *count += 1;
    if list.len() < MAX_LISTED_CHANGES {
        list.push(call);
    }
}

/// Whether `arguments` is the digest the store keeps in place of a text too
/// large to store whole (see [`crate::audit::json_digest`]).
fn is_stored_digest(arguments: &Value) -> bool {
    arguments.as_object().is_some_and(|object| {
        is_digest(object) && object.get("truncated") == Some(&Value::Bool(true))
    })
}

/// Whether `object` is a digest whose prefix holds the whole text.
fn is_whole_digest(object: &serde_json::Map<String, Value>) -> bool {
    is_digest(object) && object.get("truncated") == Some(&Value::Bool(false))
}

fn is_digest(object: &serde_json::Map<String, Value>) -> bool {
    object.len() == 4
        && ["truncated", "prefix", "sha256", "bytes"]
            .iter()
            .all(|key| object.contains_key(*key))
}

impl std::fmt::Display for ReplayReport {
    /// The text report: totals, counts by decision, then the changed calls.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let counts = |counts: &BTreeMap<String, u64>| -> String {
            if counts.is_empty() {
                return "none".to_owned();
            }
            counts
                .iter()
                .map(|(decision, count)| format!("{decision} {count}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(f, "replayed {} tool calls", self.replayed)?;
        if !self.not_replayed.is_empty() {
            writeln!(f, "not replayed: {}", counts(&self.not_replayed))?;
        }
        if self.mode_missing > 0 {
            writeln!(
                f,
                "decided in the candidate's default mode (recorded mode missing): {}",
                self.mode_missing
            )?;
        }
        writeln!(f, "recorded:  {}", counts(&self.recorded))?;
        writeln!(f, "candidate: {}", counts(&self.candidate))?;
        let calls = |f: &mut std::fmt::Formatter<'_>,
                     title: &str,
                     count: u64,
                     list: &[ReplayedCall]|
         -> std::fmt::Result {
            writeln!(f, "{title}: {count}")?;
            for call in list {
                writeln!(
                    f,
                    "  #{} {} {} {} in {}: {} -> {}",
                    call.seq,
                    call.time,
                    call.principal,
                    call.tool,
                    call.mode,
                    call.recorded,
                    call.candidate
                )?;
            }
            if (list.len() as u64) < count {
                writeln!(f, "  ... and {} more", count - list.len() as u64)?;
            }
            Ok(())
        };
        calls(
            f,
            "newly denied",
            self.newly_denied_count,
            &self.newly_denied,
        )?;
        calls(
            f,
            "newly allowed",
            self.newly_allowed_count,
            &self.newly_allowed,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::anchor::AuditKey;
    use crate::audit::{AuditDecision, AuditEntry, Durability, SqliteStore};
    use serde_json::json;

    fn call(tool: &str, arguments: Value, mode: &str, decision: AuditDecision) -> AuditEntry {
        AuditEntry {
            time: Utc::now(),
            principal: crate::principal::Principal::mcp_stdio_agent("claude"),
            kind: EntryKind::ToolCall,
            tool: Some(tool.to_owned()),
            arguments: Some(arguments),
            mode: Arc::from(mode),
            decision,
            reason_code: match decision {
                AuditDecision::Allowed => None,
                _ => Some(Reason::NotAllowed),
            },
            outcome: "executed",
            detail: json!(null),
            expires_at: None,
            context: None,
            policy_hash: None,
        }
    }

    #[test]
    fn short_arguments_kept_as_a_digest_are_decided_on_their_text() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(dir.path(), Durability::Process).expect("store opens");
        let digest = |arguments: Value| crate::audit::json_digest(&arguments);
        let entries = [
            // Rejected for a wrong type: still rejected, never allowed on the digest.
            call(
                "restart_service",
                digest(json!({"service_name": 5})),
                "NORMAL",
                AuditDecision::Rejected,
            ),
            // Denied in NORMAL with valid arguments: the candidate allows it.
            call(
                "restart_service",
                digest(json!({"service_name": "web-server"})),
                "NORMAL",
                AuditDecision::Denied,
            ),
        ];
        let refs: Vec<&AuditEntry> = entries.iter().collect();
        store
            .append(&refs, &AuditKey::from_bytes([1; 32]))
            .expect("appended");
        let candidate = PolicyEngine::from_json(
            r#"{"modes": {"NORMAL": {"allowed_tools": ["restart_service"]}}}"#,
            "candidate",
        )
        .expect("valid candidate");
        let report = replay(&store, &candidate, None).expect("replay runs");
        assert_eq!(report.replayed, 2, "{report}");
        assert_eq!(
            report.candidate,
            BTreeMap::from([("allowed".to_owned(), 1), ("rejected".to_owned(), 1)])
        );
        assert_eq!(report.newly_allowed.len(), 1);
        assert_eq!(report.newly_allowed[0].seq, 2);
    }

    #[test]
    fn upstream_calls_are_decided_against_the_tools_the_trail_names() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(dir.path(), Durability::Process).expect("store opens");
        let mut outcome = call("git__push", json!(null), "NORMAL", AuditDecision::Allowed);
        outcome.arguments = None;
        outcome.detail = json!({"intent_seq": 2});
        let mut rate_limited = call("git__push", json!({}), "NORMAL", AuditDecision::Denied);
        rate_limited.reason_code = Some(Reason::RateLimited);
        let entries = [
            call(
                "git__status",
                json!({"path": "."}),
                "NORMAL",
                AuditDecision::Denied,
            ),
            call("git__push", json!({}), "NORMAL", AuditDecision::Allowed),
            outcome,
            call("other__tool", json!({}), "NORMAL", AuditDecision::Rejected),
            call("git__log", json!({}), "GONE", AuditDecision::Allowed),
            rate_limited,
            call(
                "git__status",
                crate::audit::json_digest(&json!({"blob": "x".repeat(9000)})),
                "NORMAL",
                AuditDecision::Allowed,
            ),
        ];
        let refs: Vec<&AuditEntry> = entries.iter().collect();
        store
            .append(&refs, &AuditKey::from_bytes([1; 32]))
            .expect("appended");
        let candidate = PolicyEngine::from_json(
            r#"{"upstreams": {"git": {"command": "git-mcp"}},
                "modes": {"NORMAL": {"allowed_tools": ["git__s*", "git__log"]}}}"#,
            "candidate",
        )
        .expect("valid candidate");
        let report = replay(&store, &candidate, None).expect("replay runs");
        assert_eq!(report.replayed, 4);
        assert_eq!(
            report.not_replayed,
            BTreeMap::from([
                ("arguments_not_stored".to_owned(), 1),
                (Reason::RateLimited.to_string(), 1)
            ])
        );
        assert_eq!(report.mode_missing, 1);
        let seqs = |calls: &[ReplayedCall]| calls.iter().map(|call| call.seq).collect::<Vec<_>>();
        // git__status is allowed by the glob; git__push is not; other__ is undeclared.
        assert_eq!(seqs(&report.newly_allowed), [1]);
        assert_eq!(seqs(&report.newly_denied), [2]);
        assert_eq!(
            report.newly_denied[0].candidate, "denied (not_allowed)",
            "{report}"
        );
        assert_eq!(
            report.candidate,
            BTreeMap::from([
                ("allowed".to_owned(), 2),
                ("denied".to_owned(), 1),
                ("rejected".to_owned(), 1)
            ])
        );
    }

    #[test]
    fn the_stored_digest_shape_is_recognised_and_ordinary_arguments_are_not() {
        let digest = crate::audit::json_digest(&json!({"blob": "x".repeat(9000)}));
        assert!(is_stored_digest(&digest));
        assert!(!is_stored_digest(&json!({"service_name": "web"})));
        assert!(!is_stored_digest(&json!({
            "truncated": false, "prefix": "", "sha256": "", "bytes": 0
        })));
    }
}
