//! What the trail records: entries before they are chained, stored records, and the
//! bounds and digests that keep every record small.

use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::AuditError;

/// Bytes of a JSON text kept when the whole text is not stored.
pub const STORED_PREFIX_BYTES: usize = 1024;
/// Largest `arguments` or `detail` JSON text stored whole; longer ones become a digest.
pub const MAX_STORED_JSON_BYTES: usize = 8 * 1024;
/// Largest `context` JSON text stored whole; longer ones become a digest.
pub const MAX_STORED_CONTEXT_BYTES: usize = 2 * 1024;
/// Longest stored `policy_hash`: a SHA-256 in hex.
pub const MAX_STORED_POLICY_HASH_BYTES: usize = 64;
/// Longest stored `principal`, `tool` or `mode`, in bytes.
pub const MAX_STORED_NAME_BYTES: usize = 256;
/// Upper bound of one record's stored text: the capped fields plus the fixed-size
/// ones (times, hashes, the policy hash, static outcome and reason codes), with room to spare.
pub const MAX_RECORD_BYTES: usize =
    3 * MAX_STORED_NAME_BYTES + 2 * MAX_STORED_JSON_BYTES + MAX_STORED_CONTEXT_BYTES + 512;

/// What kind of event a record describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A tool-execution request, whatever became of it.
    ToolCall,
    /// An operator changed the mode.
    ModeChange,
    /// An elevated mode lapsed and the system returned to the default mode.
    ModeExpired,
    /// A request was refused for a missing, wrong or insufficient token.
    AuthRefused,
    /// An operator simulated an incident.
    Incident,
    /// A mode switch waited for, or cancelled, upstream calls the new mode denies.
    ModeDrained,
    /// The policy file was reloaded (old hash → new hash), or a reload was refused.
    PolicyReload,
    /// A step in a human approval's life: approved, denied or expired.
    Approval,
    /// An operator logged in to the console.
    ConsoleLogin,
    /// An operator logged out of the console.
    ConsoleLogout,
}

impl EntryKind {
    /// Every kind this version writes, in declaration order (a kind no longer
    /// written moves to [`super::RETIRED_KINDS`]).
    pub const ALL: [EntryKind; 10] = [
        EntryKind::ToolCall,
        EntryKind::ModeChange,
        EntryKind::ModeExpired,
        EntryKind::AuthRefused,
        EntryKind::Incident,
        EntryKind::ModeDrained,
        EntryKind::PolicyReload,
        EntryKind::Approval,
        EntryKind::ConsoleLogin,
        EntryKind::ConsoleLogout,
    ];

    /// The snake_case stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::ToolCall => "tool_call",
            EntryKind::ModeChange => "mode_change",
            EntryKind::ModeExpired => "mode_expired",
            EntryKind::AuthRefused => "auth_refused",
            EntryKind::Incident => "incident",
            EntryKind::ModeDrained => "mode_drained",
            EntryKind::PolicyReload => "policy_reload",
            EntryKind::Approval => "approval",
            EntryKind::ConsoleLogin => "console_login",
            EntryKind::ConsoleLogout => "console_logout",
        }
    }
}

/// The policy verdict a record carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditDecision {
    /// The policy (or the operator's authority) allowed it.
    Allowed,
    /// The policy or authentication refused it.
    Denied,
    /// Refused before the policy was consulted: unknown tool or invalid arguments.
    Rejected,
}

impl AuditDecision {
    /// Every decision.
    pub const ALL: [AuditDecision; 3] = [
        AuditDecision::Allowed,
        AuditDecision::Denied,
        AuditDecision::Rejected,
    ];

    /// The snake_case stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditDecision::Allowed => "allowed",
            AuditDecision::Denied => "denied",
            AuditDecision::Rejected => "rejected",
        }
    }
}

/// An event to record, before it has a place in the chain.
#[derive(Clone, Debug)]
pub struct AuditEntry {
    /// When it happened.
    pub time: DateTime<Utc>,
    /// Who asked: `operator`, `agent`, a registered name such as `alice`, each
    /// perhaps with an MCP label (`deploy-bot (mcp:claude-code)`), `system` or
    /// `anonymous`; recorded with its role.
    pub principal: crate::principal::Principal,
    /// What kind of event.
    pub kind: EntryKind,
    /// The tool named in the request, if any.
    pub tool: Option<String>,
    /// The request's arguments, if any.
    pub arguments: Option<Value>,
    /// The mode the decision was made in (for mode changes: the new mode).
    pub mode: Arc<str>,
    /// The verdict.
    pub decision: AuditDecision,
    /// Machine-readable reason for a refusal.
    pub reason_code: Option<crate::reason::Reason>,
    /// What happened: `executed`, `denied`, `invalid_arguments`, `failed`, `changed`, ...
    pub outcome: &'static str,
    /// Result, error message or explanation.
    pub detail: Value,
    /// For mode changes, when the new mode lapses.
    pub expires_at: Option<DateTime<Utc>>,
    /// The caller's free-form context (REST `context`), if it gave one.
    pub context: Option<Value>,
    /// The version ([`crate::policy::PolicyEngine::policy_hash`]) of the policy
    /// that decided, for records of decisions.
    pub policy_hash: Option<Arc<str>>,
}

/// The `outcome` of a decision recorded as refused because the shared mode had
/// moved on since it was taken: named after its reason, as refusals are.
pub const STALE_OUTCOME: &str = crate::reason::Reason::ModeChanged.as_str();

impl AuditEntry {
    /// What a shared store records instead of this allowed decision when it was
    /// taken under `decided_epoch` but the shared mode row is at `epoch` (mode
    /// `mode`): the same call, refused with [`crate::reason::Reason::ModeChanged`],
    /// in the mode in force. Nothing ran for it.
    pub fn refused_as_stale(&self, decided_epoch: u64, epoch: u64, mode: &str) -> AuditEntry {
        let mut refused = self.clone();
        refused.decision = AuditDecision::Denied;
        refused.reason_code = Some(crate::reason::Reason::ModeChanged);
        refused.outcome = STALE_OUTCOME;
        refused.mode = Arc::from(mode);
        refused.detail = serde_json::json!({
            "message": format!(
                "the mode changed (to {mode}) after this call was decided in {}; it was refused and did not run",
                self.mode
            ),
            "decided_epoch": decided_epoch,
            "epoch": epoch,
        });
        refused
    }
}

/// A stored, chained record, its JSON columns parsed back into values: what the
/// stores' readers return. Clients get it as [`crate::api::AuditRecord`]; the
/// chain hashes the [`StoredRecord`] columns, not a serialization of this.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditRecord {
    /// Position in the chain, from 1.
    pub seq: u64,
    /// RFC 3339 time, microsecond precision.
    pub time: String,
    /// Who asked.
    pub principal: String,
    /// `tool_call`, `mode_change`, `mode_expired`, `auth_refused` or `incident`.
    pub kind: String,
    /// The tool named, if any.
    pub tool: Option<String>,
    /// The arguments given, if any.
    pub arguments: Option<Value>,
    /// The mode in force (for mode changes: the new mode).
    pub mode: String,
    /// `allowed`, `denied` or `rejected`.
    pub decision: String,
    /// Reason code of a refusal, as stored: the text the chain hashed, kept even
    /// when it names no [`crate::reason::Reason`] (see [`AuditRecord::reason`]).
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
    /// The caller's context, bounded like `arguments` (absent in records without one).
    pub context: Option<Value>,
    /// `<key id>:<HMAC-SHA-256 of hash>` under the audit key (see [`crate::anchor`]).
    pub mac: Option<String>,
    /// The version of the policy that decided (absent in records without one).
    pub policy_hash: Option<String>,
    /// The principal's role (`operator`, `agent`, `system`, `anonymous`) the request
    /// was made in; absent in records written before roles were recorded.
    pub role: Option<String>,
}

#[cfg(test)]
impl AuditRecord {
    /// A record for unit tests to adjust with struct update syntax: seq 1, an
    /// allowed `tool_call` of `agent` in NORMAL, everything optional absent.
    pub(crate) fn sample() -> AuditRecord {
        AuditRecord {
            seq: 1,
            time: String::new(),
            principal: "agent".into(),
            kind: "tool_call".into(),
            tool: None,
            arguments: None,
            mode: "NORMAL".into(),
            decision: "allowed".into(),
            reason_code: None,
            outcome: "executed".into(),
            detail: Value::Null,
            expires_at: None,
            prev_hash: String::new(),
            hash: String::new(),
            context: None,
            mac: None,
            policy_hash: None,
            role: None,
        }
    }
}

impl AuditRecord {
    /// The reason code as a [`crate::reason::Reason`]; `None` without one, or for
    /// a stored name no reason has (a record from another version, or forged).
    pub fn reason(&self) -> Option<crate::reason::Reason> {
        self.reason_code
            .as_deref()
            .and_then(crate::reason::Reason::parse)
    }
}

/// One record's columns exactly as a store keeps them and as the chain hashes them
/// (JSON fields as their bounded text). What stores append and read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRecord {
    /// Position in the chain, from 1.
    pub seq: u64,
    /// RFC 3339 time, microsecond precision (see [`format_time`]).
    pub time: String,
    /// Who asked, cut to [`MAX_STORED_NAME_BYTES`].
    pub principal: String,
    /// The [`EntryKind`] stored form.
    pub kind: String,
    /// The tool named, cut to [`MAX_STORED_NAME_BYTES`].
    pub tool: Option<String>,
    /// Bounded JSON text of the arguments.
    pub arguments: Option<String>,
    /// The mode in force, cut to [`MAX_STORED_NAME_BYTES`].
    pub mode: String,
    /// The [`AuditDecision`] stored form.
    pub decision: String,
    /// Reason code of a refusal.
    pub reason_code: Option<String>,
    /// What happened.
    pub outcome: String,
    /// Bounded JSON text of the detail.
    pub detail: String,
    /// For mode changes, when the mode lapses.
    pub expires_at: Option<String>,
    /// Hash of the previous record.
    pub prev_hash: String,
    /// This record's hash (see [`crate::audit::seal`]).
    pub hash: String,
    /// Bounded JSON text of the caller's context.
    pub context: Option<String>,
    /// `<key id>:<HMAC>` of `hash` under the audit key.
    pub mac: Option<String>,
    /// The deciding policy's version, cut to [`MAX_STORED_POLICY_HASH_BYTES`].
    pub policy_hash: Option<String>,
    /// The principal's role ([`crate::principal::Role::as_str`]); `None` in older records.
    pub role: Option<String>,
}

impl StoredRecord {
    /// The record as callers see it: JSON fields parsed back into values.
    pub fn into_record(self) -> AuditRecord {
        let parse = |text: &str| {
            serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
        };
        AuditRecord {
            seq: self.seq,
            arguments: self.arguments.as_deref().map(parse),
            context: self.context.as_deref().map(parse),
            detail: parse(&self.detail),
            time: self.time,
            principal: self.principal,
            kind: self.kind,
            tool: self.tool,
            mode: self.mode,
            decision: self.decision,
            reason_code: self.reason_code,
            outcome: self.outcome,
            expires_at: self.expires_at,
            prev_hash: self.prev_hash,
            hash: self.hash,
            mac: self.mac,
            policy_hash: self.policy_hash,
            role: self.role,
        }
    }
}

/// Formats a time the way records store it.
pub fn format_time(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// The stored form of a JSON value whose text is not kept whole: a bounded prefix
/// of its compact text, the SHA-256 of the whole text and its length in bytes.
///
/// Shape: `{"truncated": bool, "prefix": "...", "sha256": "<hex>", "bytes": N}`;
/// `truncated` is false when the prefix is the whole text.
pub fn json_digest(value: &Value) -> Value {
    digest_text(&serde_json::to_string(value).unwrap_or_default())
}

pub(super) fn digest_text(text: &str) -> Value {
    let prefix = cut(text, STORED_PREFIX_BYTES);
    serde_json::json!({
        "truncated": prefix.len() < text.len(),
        "prefix": prefix,
        "sha256": hex::encode(Sha256::digest(text.as_bytes())),
        "bytes": text.len(),
    })
}

/// Cuts `text` to at most `max` bytes on a character boundary.
pub(super) fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Serializes `value` into `buffer`; a text longer than `max` is replaced by its digest.
pub(super) fn write_bounded(
    buffer: &mut Vec<u8>,
    value: &Value,
    max: usize,
) -> Result<(), AuditError> {
    buffer.clear();
    serde_json::to_writer(&mut *buffer, value).map_err(json_error)?;
    if buffer.len() > max {
        let digest = digest_text(utf8(buffer)?);
        buffer.clear();
        serde_json::to_writer(&mut *buffer, &digest).map_err(json_error)?;
    }
    Ok(())
}

pub(super) fn json_error(error: serde_json::Error) -> AuditError {
    AuditError::Encoding(error.to_string())
}

/// serde_json and hex emit UTF-8 only; a failure here is a bug, reported rather than panicking.
pub(super) fn utf8(bytes: &[u8]) -> Result<&str, AuditError> {
    std::str::from_utf8(bytes).map_err(|error| AuditError::Encoding(error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reason::Reason;

    /// `ALL` lists each kind once, in declaration order. The match has no
    /// wildcard, so a new kind does not compile here until it has a place in `ALL`.
    #[test]
    fn every_kind_is_listed_once_and_round_trips() {
        let position = |kind: EntryKind| match kind {
            EntryKind::ToolCall => 0,
            EntryKind::ModeChange => 1,
            EntryKind::ModeExpired => 2,
            EntryKind::AuthRefused => 3,
            EntryKind::Incident => 4,
            EntryKind::ModeDrained => 5,
            EntryKind::PolicyReload => 6,
            EntryKind::Approval => 7,
            EntryKind::ConsoleLogin => 8,
            EntryKind::ConsoleLogout => 9,
        };
        assert_eq!(EntryKind::ALL.len(), 10, "one entry per arm above");
        for (index, kind) in EntryKind::ALL.into_iter().enumerate() {
            assert_eq!(position(kind), index, "{kind:?}");
            let stored = serde_json::to_value(kind).unwrap();
            assert_eq!(stored, serde_json::Value::from(kind.as_str()));
            assert!(!super::super::RETIRED_KINDS.contains(&kind.as_str()));
        }
        for (index, decision) in AuditDecision::ALL.into_iter().enumerate() {
            let position = match decision {
                AuditDecision::Allowed => 0,
                AuditDecision::Denied => 1,
                AuditDecision::Rejected => 2,
            };
            assert_eq!(position, index, "{decision:?}");
            assert_eq!(
                serde_json::to_value(decision).unwrap(),
                serde_json::Value::from(decision.as_str())
            );
        }
    }

    fn record_with_reason(reason_code: Option<&str>) -> AuditRecord {
        AuditRecord {
            decision: "denied".to_owned(),
            reason_code: reason_code.map(str::to_owned),
            outcome: "denied".to_owned(),
            ..AuditRecord::sample()
        }
    }

    #[test]
    fn a_stored_reason_reads_back_as_its_reason_and_an_unknown_name_as_none() {
        let known = record_with_reason(Some(Reason::BlockedInMode.as_str()));
        assert_eq!(known.reason(), Some(Reason::BlockedInMode));
        // A name from another version (or written by hand) is kept as stored, so
        // the chain still verifies, and simply names no reason.
        let unknown = record_with_reason(Some("reason_from_the_future"));
        assert_eq!(unknown.reason(), None);
        assert_eq!(
            unknown.reason_code.as_deref(),
            Some("reason_from_the_future")
        );
        assert_eq!(record_with_reason(None).reason(), None);
    }
}
