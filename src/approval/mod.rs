//! Per-call human approval: the requests a `require_approval` rule or an agent's
//! elevation request creates, their life cycle, and the store that keeps them.
//!
//! An approval is bound to the requesting principal (name and role), the tool,
//! the SHA-256 of the arguments' canonical JSON ([`crate::canonical`]), the
//! policy's hash and an expiry. Its states:
//!
//! ```text
//! pending ──approve──► approved ──consume (once)──► consumed
//!    │  └────deny────► denied
//!    └──(expires_at)──► expired ◄──(expires_at)── approved
//! ```
//!
//! Every transition is one conditional update in the store, so an approval is
//! consumed at most once however many identical calls race for it. A decision
//! takes effect only once its audit record is durable
//! ([`ApprovalStore::confirm_decision`]); until then nothing consumes it, and if
//! the record fails it is taken back to pending
//! ([`ApprovalStore::revert_decision`]), so no call ever runs on a decision the
//! trail does not show. The store is
//! a trait ([`ApprovalStore`]); [`sqlite::SqliteApprovals`] keeps it in the data
//! dir, so pending and approved requests survive a restart, and
//! [`postgres::PostgresApprovals`] in the PostgreSQL store every instance shares
//! ([`open_store`] picks one).

pub mod postgres;
pub mod sqlite;

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Most approvals that may be pending at once; one more is refused (429), so an
/// agent cannot flood the operators' queue or the store.
pub const MAX_PENDING_APPROVALS: usize = 100;
/// Longest reason an operator (or an elevation request) may give, in characters.
pub const MAX_APPROVAL_REASON_CHARS: usize = 500;
/// Most approvals one `GET /approvals` returns.
pub const MAX_APPROVAL_LIST: usize = 500;
/// Approvals `GET /approvals` returns when no limit is given.
pub const DEFAULT_APPROVAL_LIST: usize = 100;
/// Longest an approval id may be; anything longer is not an id.
pub const MAX_APPROVAL_ID_LEN: usize = 64;

/// Where an approval is in its life cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalStatus {
    /// Waiting for an operator.
    Pending,
    /// An operator approved it; the identical call may run once.
    Approved,
    /// An operator refused it.
    Denied,
    /// Its time ran out before it was decided or used.
    Expired,
    /// The approved call ran (or the approved mode change took effect).
    Consumed,
}

impl ApprovalStatus {
    /// Every status, for parsing.
    pub const ALL: [ApprovalStatus; 5] = [
        ApprovalStatus::Pending,
        ApprovalStatus::Approved,
        ApprovalStatus::Denied,
        ApprovalStatus::Expired,
        ApprovalStatus::Consumed,
    ];

    /// The stored and wire form.
    pub const fn as_str(self) -> &'static str {
        match self {
            ApprovalStatus::Pending => "pending",
            ApprovalStatus::Approved => "approved",
            ApprovalStatus::Denied => "denied",
            ApprovalStatus::Expired => "expired",
            ApprovalStatus::Consumed => "consumed",
        }
    }

    /// The status with this wire name.
    pub fn parse(text: &str) -> Option<ApprovalStatus> {
        ApprovalStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == text)
    }
}

impl fmt::Display for ApprovalStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an approval would allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalKind {
    /// One tool call, with these exact arguments.
    ToolCall,
    /// A change of mode an agent asked for (an elevation request).
    ModeChange,
}

impl ApprovalKind {
    /// The stored and wire form.
    pub const fn as_str(self) -> &'static str {
        match self {
            ApprovalKind::ToolCall => "tool_call",
            ApprovalKind::ModeChange => "mode_change",
        }
    }

    fn parse(text: &str) -> Option<ApprovalKind> {
        [ApprovalKind::ToolCall, ApprovalKind::ModeChange]
            .into_iter()
            .find(|kind| kind.as_str() == text)
    }
}

/// What an approval is bound to: a later call matches it only if every field is equal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    /// A tool call or a mode change.
    pub kind: ApprovalKind,
    /// The requesting principal's name, as audit records show it.
    pub principal: String,
    /// The requesting principal's role (`agent`, `operator`).
    pub role: String,
    /// The tool (for a mode change: the requested mode).
    pub target: String,
    /// SHA-256 of the canonical JSON of the arguments (for a mode change: of
    /// `{"mode", "ttl_seconds"}`).
    pub arguments_digest: String,
    /// The version of the policy the request was decided under.
    pub policy_hash: String,
}

/// A request for approval, before the store gives it an id.
#[derive(Clone, Debug, PartialEq)]
pub struct NewApproval {
    /// What it is bound to.
    pub binding: Binding,
    /// The arguments as operators see them (bounded: a digest when large).
    pub arguments: Value,
    /// The mode the call was decided in.
    pub mode: String,
    /// The requester's reason (elevation requests), bounded.
    pub reason: Option<String>,
    /// When it was asked.
    pub created_at: DateTime<Utc>,
    /// When it lapses if not decided, or not used once approved.
    pub expires_at: DateTime<Utc>,
}

/// One approval as stored and as `GET /approvals` lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Approval {
    /// Opaque id, `apr_` and 32 hex digits.
    pub id: String,
    /// Where it is in its life cycle.
    pub status: ApprovalStatus,
    /// What it is bound to.
    #[serde(flatten)]
    pub binding: Binding,
    /// The arguments as operators see them.
    pub arguments: Value,
    /// The mode the request was made in.
    pub mode: String,
    /// The requester's reason, if any.
    pub reason: Option<String>,
    /// When it was asked.
    pub created_at: DateTime<Utc>,
    /// When it lapses.
    pub expires_at: DateTime<Utc>,
    /// The operator who approved or denied it.
    pub decided_by: Option<String>,
    /// When.
    pub decided_at: Option<DateTime<Utc>>,
    /// The operator's reason.
    pub decision_reason: Option<String>,
    /// Whether the decision's audit record is durable. A decision takes effect
    /// (an approval can be consumed, a denial answers calls) only once it is:
    /// until then it may still be reverted to pending because its record failed.
    /// True for an undecided approval. Not on the wire: readers see the status.
    #[serde(skip, default = "undecided_is_recorded")]
    pub decision_recorded: bool,
}

/// What a deserialized approval (which never carries the flag) assumes.
fn undecided_is_recorded() -> bool {
    true
}

impl Approval {
    /// Whether its time has run out at `now`, whatever the store says yet.
    pub fn is_expired_at(&self, now: DateTime<Utc>) -> bool {
        now >= self.expires_at
    }
}

/// An operator's decision on a pending approval.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The identical call may run once.
    Approve,
    /// It may not.
    Deny,
}

/// Why an approval could not be created, decided or read.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    /// No approval has that id.
    #[error("no approval has this id")]
    NotFound,
    /// The approval was decided, used or expired already.
    #[error("the approval is {0}, not pending")]
    NotPending(ApprovalStatus),
    /// The approval's time ran out.
    #[error("the approval has expired")]
    Expired,
    /// Too many approvals are pending.
    #[error("too many approvals are pending (at most {0}); wait for operators to decide")]
    TooManyPending(usize),
    /// The SQLite store failed.
    #[error("approval store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The PostgreSQL store failed or could not be reached (the SQLSTATE or what
    /// failed, never the statement).
    #[error("approval store (PostgreSQL): {0}")]
    Postgres(String),
    /// `--store` names something other than a PostgreSQL URL.
    #[error("the approval store must be a postgres:// URL or the data dir")]
    UnsupportedStore,
    /// The data dir could not be used.
    #[error("approval store {path}: {error}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// A stored row could not be read back (edited by hand?).
    #[error("approval store holds an unreadable row: {0}")]
    Corrupt(String),
    /// The operating system gave no randomness for an id.
    #[error("no randomness for an approval id: {0}")]
    Random(String),
    /// An approved row whose decision seal does not verify: it was written
    /// outside Proxi (or no operator could have decided it), so it is not used.
    #[error("approval {0} carries no valid operator decision")]
    Untrusted(String),
}

/// How a store that an agent may be able to write (the data dir's SQLite file
/// under `proxi mcp`) tells an operator's decision from a forged row.
#[derive(Clone)]
pub enum DecisionSeal {
    /// Every decision carries an HMAC under the audit key (held with the operator
    /// credential, or in the operator's own data dir under `proxi serve`); an
    /// approved row is consumed only if its seal verifies.
    Keyed(crate::anchor::AuditKey),
    /// No operator can decide anything in this process (`proxi mcp` without an
    /// operator credential has no operator endpoint): every approved row is forged.
    NoOperator,
}

impl fmt::Debug for DecisionSeal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecisionSeal::Keyed(key) => write!(f, "DecisionSeal::Keyed({})", key.id()),
            DecisionSeal::NoOperator => f.write_str("DecisionSeal::NoOperator"),
        }
    }
}

impl DecisionSeal {
    /// The seal of a decision: an HMAC over every field a consumer relies on
    /// (id, status, binding, expiry, decider), or `None` when nothing can seal.
    pub fn seal(&self, approval: &Approval) -> Option<String> {
        let DecisionSeal::Keyed(key) = self else {
            return None;
        };
        let fields = serde_json::json!([
            approval.id,
            approval.status.as_str(),
            approval.binding.kind.as_str(),
            approval.binding.principal,
            approval.binding.role,
            approval.binding.target,
            approval.binding.arguments_digest,
            approval.binding.policy_hash,
            approval.expires_at.timestamp_millis(),
            approval.decided_by,
        ]);
        // Domain-separated from record hashes, which are bare hex.
        let digest = crate::canonical::canonical_digest(&fields);
        Some(key.record_mac(&format!("approval-decision-v1:{digest}")))
    }

    /// Whether `stored` is the seal of `approval`'s decision.
    pub fn verifies(&self, approval: &Approval, stored: Option<&str>) -> bool {
        match (self.seal(approval), stored) {
            (Some(expected), Some(stored)) => crate::anchor::constant_time_eq(&expected, stored),
            _ => false,
        }
    }
}

/// Where approvals live. Every method is one transaction; every state change is
/// conditional on the state it leaves, so concurrent callers cannot both win.
pub trait ApprovalStore: Send + Sync + fmt::Debug {
    /// Records a pending approval, or returns the pending one already bound to the
    /// same [`Binding`] (and `false`), so identical calls ask once. Refuses with
    /// [`ApprovalError::TooManyPending`] when `max_pending` are pending.
    fn create(
        &self,
        request: NewApproval,
        max_pending: usize,
    ) -> Result<(Approval, bool), ApprovalError>;

    /// The approval with this id.
    fn get(&self, id: &str) -> Result<Option<Approval>, ApprovalError>;

    /// The newest approval whose binding equals `binding` in everything but the
    /// policy hash (so a changed policy is recognised as a mismatch), any status.
    fn latest_for(&self, binding: &Binding) -> Result<Option<Approval>, ApprovalError>;

    /// Approvals with `status` (all when `None`), newest first, at most `limit`.
    fn list(
        &self,
        status: Option<ApprovalStatus>,
        limit: usize,
    ) -> Result<Vec<Approval>, ApprovalError>;

    /// Approves or denies a pending, unexpired approval. The decision is not in
    /// effect yet ([`Approval::decision_recorded`] is false): the approval cannot
    /// be consumed until [`ApprovalStore::confirm_decision`] says its audit record
    /// is durable, so no call can use a decision the trail may never show.
    fn decide(
        &self,
        id: &str,
        verdict: Verdict,
        approver: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<Approval, ApprovalError>;

    /// The decision on `id` is in the audit trail: it takes effect. False when
    /// there is no unconfirmed decision on it (it lapsed meanwhile).
    fn confirm_decision(&self, id: &str) -> Result<bool, ApprovalError>;

    /// The decision on `id` (whose status was `decided`) could not be recorded:
    /// back to pending, as if it never happened. Conditional on that decision
    /// being still unconfirmed, so it never undoes a recorded decision (nor,
    /// since only a confirmed approval is consumed, a consumption); false when
    /// nothing was reverted.
    fn revert_decision(&self, id: &str, decided: ApprovalStatus) -> Result<bool, ApprovalError>;

    /// Marks an approved, unexpired approval whose decision is recorded consumed;
    /// `None` when it is not (another call consumed it first, it lapsed, or its
    /// decision is not in the trail yet). At most one caller ever gets `Some`
    /// for an id.
    fn consume(&self, id: &str, now: DateTime<Utc>) -> Result<Option<Approval>, ApprovalError>;

    /// Moves every pending or approved approval whose time ran out by `now` to
    /// expired, and returns them (each exactly once, across restarts too).
    fn expire_due(&self, now: DateTime<Utc>) -> Result<Vec<Approval>, ApprovalError>;

    /// Decisions taken before `decided_before` that never took effect (approved
    /// or denied, not confirmed): the process that took them stopped between the
    /// store's decision and its audit record. Oldest first, at most `limit`; the
    /// gateway takes each back with [`ApprovalStore::revert_decision`].
    fn unconfirmed_decisions(
        &self,
        decided_before: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Approval>, ApprovalError>;

    /// The earliest expiry among pending and approved approvals.
    fn next_expiry(&self) -> Result<Option<DateTime<Utc>>, ApprovalError>;

    /// How many approvals are pending.
    fn count_pending(&self) -> Result<usize, ApprovalError>;
}

/// What a caller is told about a call that needs, or had, an approval and did
/// not run: the reason code, the approval to wait for, and what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApprovalAnswer {
    /// `approval_required`, `approval_mismatch`, `approval_expired` or `approval_denied`.
    pub reason: crate::reason::Reason,
    /// The pending approval the identical call waits for; `None` when none could
    /// be created (too many pending) or the call was denied.
    pub approval_id: Option<String>,
    /// When that approval lapses.
    pub expires_at: Option<DateTime<Utc>>,
    /// Why, in words.
    pub message: String,
    /// A concrete next step.
    pub how_to_proceed: String,
}

impl ApprovalAnswer {
    /// A pending approval for the call: `reason` says whether it is the first
    /// request, or replaces an approval that expired or no longer matches.
    pub fn waiting(reason: crate::reason::Reason, approval: &Approval) -> ApprovalAnswer {
        let why = match reason {
            crate::reason::Reason::ApprovalMismatch => {
                "The approval given for this call was granted under another policy version, so it no longer applies; a new approval was requested. "
            }
            crate::reason::Reason::ApprovalExpired => {
                "The approval for this call expired before it was used; a new approval was requested. "
            }
            _ => "",
        };
        ApprovalAnswer {
            reason,
            approval_id: Some(approval.id.clone()),
            expires_at: Some(approval.expires_at),
            message: format!(
                "{why}Tool '{}' needs a human operator's approval in {} mode before it runs; it did not run. Approval id: {}.",
                approval.binding.target, approval.mode, approval.id
            ),
            how_to_proceed: format!(
                "Wait for an operator to approve {id} (proxi approvals approve {id} --reason ...), then retry the identical call (same tool, same arguments) before {expires}. Do not change the arguments: that needs a new approval.",
                id = approval.id,
                expires = crate::audit::format_time(approval.expires_at)
            ),
        }
    }

    /// An operator refused the approval for this exact call.
    pub fn denied(approval: &Approval) -> ApprovalAnswer {
        ApprovalAnswer {
            reason: crate::reason::Reason::ApprovalDenied,
            approval_id: None,
            expires_at: None,
            message: format!(
                "An operator ({}) denied approval {} for this exact call: {}",
                approval.decided_by.as_deref().unwrap_or("unknown"),
                approval.id,
                approval.decision_reason.as_deref().unwrap_or("no reason given")
            ),
            how_to_proceed: "Do not retry this call: a human refused it. Use read-only tools to diagnose, or ask the operator what to do instead.".to_owned(),
        }
    }

    /// No approval could be requested: too many are pending already.
    pub fn queue_full(max_pending: usize) -> ApprovalAnswer {
        ApprovalAnswer {
            reason: crate::reason::Reason::ApprovalRequired,
            approval_id: None,
            expires_at: None,
            message: format!(
                "This call needs a human operator's approval, but {max_pending} approvals are pending already, so no new one was requested."
            ),
            how_to_proceed:
                "Wait for operators to decide the pending approvals, then retry the call."
                    .to_owned(),
        }
    }

    /// The call needed no approval when it was checked, but did by the time it
    /// was decided (the mode or policy changed in between).
    pub fn changed_meanwhile() -> ApprovalAnswer {
        ApprovalAnswer {
            reason: crate::reason::Reason::ApprovalRequired,
            approval_id: None,
            expires_at: None,
            message: "The mode or policy changed while this call was decided, and it now needs a human operator's approval; it did not run.".to_owned(),
            how_to_proceed: "Retry the identical call: it will request an approval.".to_owned(),
        }
    }

    /// Whether the caller should wait for an operator's decision on `approval_id`.
    pub fn awaits_decision(&self) -> bool {
        self.approval_id.is_some()
    }
}

/// The approval store for a server: PostgreSQL when `store` (the `--store` /
/// `PROXI_STORE` value) is a `postgres://` URL, so every instance on it sees the
/// same approvals; else `approvals.db` in `data_dir`, whose decisions `seal`
/// authenticates (the agent's user may be able to write that file; the PostgreSQL
/// store relies on the database's access control, whose credentials the agent never
/// holds). Migrations run here.
pub fn open_store(
    store: Option<&str>,
    data_dir: &std::path::Path,
    seal: DecisionSeal,
) -> Result<std::sync::Arc<dyn ApprovalStore>, ApprovalError> {
    match store {
        Some(url) if crate::audit::is_postgres_url(url) => Ok(std::sync::Arc::new(
            postgres::PostgresApprovals::connect(url)?,
        )),
        Some(_) => Err(ApprovalError::UnsupportedStore),
        None => Ok(std::sync::Arc::new(sqlite::SqliteApprovals::open(
            data_dir, seal,
        )?)),
    }
}

/// A fresh approval id: `apr_` and 16 random bytes in hex.
pub fn new_id() -> Result<String, ApprovalError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|error| ApprovalError::Random(error.to_string()))?;
    Ok(format!("apr_{}", hex::encode(bytes)))
}

/// Whether `text` has the shape of an approval id (so nothing else reaches the store).
pub fn is_approval_id(text: &str) -> bool {
    text.len() <= MAX_APPROVAL_ID_LEN
        && text
            .strip_prefix("apr_")
            .is_some_and(|hex| !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The digest an approval binds a call's arguments by: SHA-256 of their
/// canonical JSON, with no arguments read as `{}` (as the tools read them).
pub fn arguments_digest(arguments: &Value) -> String {
    match arguments {
        Value::Null => crate::canonical::canonical_digest(&Value::Object(Default::default())),
        other => crate::canonical::canonical_digest(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn statuses_round_trip_and_ids_have_one_shape() {
        for status in ApprovalStatus::ALL {
            assert_eq!(ApprovalStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(ApprovalStatus::parse("PENDING"), None);
        let id = new_id().unwrap();
        assert!(is_approval_id(&id), "{id}");
        assert_eq!(id.len(), 36);
        assert_ne!(id, new_id().unwrap());
        for not_id in [
            "",
            "apr_",
            "apr_xyz",
            "../etc",
            "apr_12 34",
            &"apr_0".repeat(20),
        ] {
            assert!(!is_approval_id(not_id), "{not_id}");
        }
    }

    #[test]
    fn the_arguments_digest_ignores_key_order_and_null_means_empty() {
        assert_eq!(
            arguments_digest(&json!({"a": 1, "b": [1, 2]})),
            arguments_digest(&serde_json::from_str::<Value>("{ \"b\": [1,2], \"a\": 1 }").unwrap())
        );
        assert_ne!(
            arguments_digest(&json!({"count": 6})),
            arguments_digest(&json!({"count": 7}))
        );
        assert_eq!(arguments_digest(&Value::Null), arguments_digest(&json!({})));
    }
}
