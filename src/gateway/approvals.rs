//! The approval step of a tool call, the operators' decisions, and the expiry
//! task (see [`crate::approval`] for the life cycle). A child of `gateway`, so
//! it works on the gateway's own state.
//!
//! A call a `require_approval` rule selects is first decided as usual; only an
//! allowed call reaches this step. It then runs only with an approval consumed
//! for it: bound to the same principal (name and role), tool, canonical-arguments
//! digest and policy hash, unexpired. The consumption is one conditional update,
//! so of many identical calls at most one runs; the call is then decided again
//! under the current mode before it runs.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::{Gateway, GatewayError, audit_priority, truncate};
use crate::approval::{
    Approval, ApprovalAnswer, ApprovalError, ApprovalKind, ApprovalStatus, ApprovalStore, Binding,
    MAX_APPROVAL_REASON_CHARS, MAX_PENDING_APPROVALS, NewApproval, Verdict as ApprovalVerdict,
    arguments_digest,
};
use crate::audit::{
    AuditDecision, AuditEntry, EntryKind, Priority, STORED_PREFIX_BYTES, json_digest,
};
use crate::decision::{ParsedCall, Verdict};
use crate::policy::{ModeId, PolicyEngine};
use crate::principal::{Principal, Role};
use crate::reason::Reason;

/// The gateway's approvals: the store and a tick on every change.
pub(super) struct Approvals {
    pub(super) store: Arc<dyn ApprovalStore>,
    /// Ticks after every new request, decision, consumption and expiry: wakes
    /// callers waiting for a decision and the expiry task.
    pub(super) changed: watch::Sender<u64>,
}

impl Approvals {
    pub(super) fn new(store: Arc<dyn ApprovalStore>) -> Approvals {
        Approvals {
            store,
            changed: watch::Sender::new(0),
        }
    }
}

/// How long a decision may stay unconfirmed on a shared store before any
/// instance takes it back. A live instance confirms within the time its record
/// takes to commit (milliseconds), so only a stopped instance's decision is this old.
const STRANDED_DECISION_AGE: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

/// Why a stranded decision was taken back, as its record says.
const STRANDED_DECISION_REASON: &str = "this decision never took effect: Proxi stopped after the store took it and before its record was durable; the approval is pending again";

/// What the approval step found for one call.
pub(super) enum Gate {
    /// No rule asks for approval in the current mode.
    NotNeeded,
    /// An approval for exactly this call was consumed: it may run (decided again).
    Consumed(Box<Approval>),
    /// It may not run; tell the caller this, decided in this mode.
    Answer(ApprovalAnswer, ModeId),
}

/// Why an operator's decision on an approval was refused.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalDecisionError {
    /// Only operators decide approvals.
    #[error("only an operator may decide approvals")]
    NotOperator,
    /// The approver made the call (or request) itself.
    #[error("an operator cannot approve or deny a request it made itself")]
    OwnRequest,
    /// The reason is missing, invisible or too long.
    #[error("a reason is required: 1 to {MAX_APPROVAL_REASON_CHARS} characters with visible text")]
    BadReason,
    /// The approval's state does not allow it.
    #[error(transparent)]
    State(ApprovalError),
    /// The mode change an elevation request asked for was refused.
    #[error("the requested mode change was refused: {0}")]
    ModeChange(#[from] crate::mode::ModeChangeError),
    /// The store or the audit trail failed.
    #[error(transparent)]
    Gateway(#[from] GatewayError),
}

/// Why an agent's elevation request was refused.
#[derive(Debug, thiserror::Error)]
pub enum ElevationError {
    /// The policy does not set `"elevation_requests": true`.
    #[error("this policy does not accept elevation requests (\"elevation_requests\" is not true)")]
    Disabled,
    /// Operators change the mode themselves.
    #[error(
        "operators change the mode with POST /policy/set-mode; elevation requests are for agents"
    )]
    NotAgent,
    /// The request breaks a mode-change rule (unknown mode, reason, TTL).
    #[error(transparent)]
    Invalid(#[from] crate::mode::ModeChangeError),
    /// Too many approvals are pending.
    #[error("too many approvals are pending (at most {0}); wait for operators to decide")]
    TooManyPending(usize),
    /// The store or the audit trail failed.
    #[error(transparent)]
    Gateway(#[from] GatewayError),
}

/// The holder of a principal's token, without the MCP client label: the
/// operator `operator` and the MCP session `operator (mcp:x)` are one holder.
fn holder(name: &str) -> &str {
    name.split_once(" (mcp:").map_or(name, |(holder, _)| holder)
}

/// A call's arguments as an approval keeps them for operators: whole when small.
fn shown_arguments(arguments: &Value) -> Value {
    match serde_json::to_string(arguments) {
        Ok(text) if text.len() <= STORED_PREFIX_BYTES => arguments.clone(),
        _ => json_digest(arguments),
    }
}

impl Gateway {
    /// Runs `work` on the approval store off the async workers (SQLite blocks).
    pub(super) async fn on_approval_store<T: Send + 'static>(
        &self,
        work: impl FnOnce(&dyn ApprovalStore) -> Result<T, ApprovalError> + Send + 'static,
    ) -> Result<T, ApprovalError> {
        let store = Arc::clone(&self.approvals.store);
        tokio::task::spawn_blocking(move || work(store.as_ref()))
            .await
            .unwrap_or_else(|_| Err(ApprovalError::Corrupt("the store task panicked".to_owned())))
    }

    /// After a change: wake waiters and the expiry task, update the gauge.
    pub(super) async fn approvals_changed(&self) {
        self.approvals
            .changed
            .send_modify(|count| *count = count.wrapping_add(1));
        if let Ok(pending) = self.on_approval_store(|store| store.count_pending()).await {
            self.metrics.set_approvals_pending(pending);
        }
    }

    /// The approval step for an allowed call that a rule selects; see the module
    /// documentation. `shown_name` is the tool name as records show it.
    pub(super) async fn approval_gate(
        &self,
        principal: &Principal,
        policy: &Arc<PolicyEngine>,
        parsed: &ParsedCall,
        shown_name: &str,
        arguments: &Value,
    ) -> Result<Gate, GatewayError> {
        let mode = {
            let state = self.read_state();
            let mode = state.effective_mode(std::time::Instant::now(), policy.default_mode());
            if !needs_approval(policy, mode, parsed.clone()) {
                return Ok(Gate::NotNeeded);
            }
            mode
        };
        let binding = Binding {
            kind: ApprovalKind::ToolCall,
            principal: principal.name().to_string(),
            role: principal.role().as_str().to_owned(),
            target: shown_name.to_owned(),
            arguments_digest: arguments_digest(arguments),
            policy_hash: policy.policy_hash().to_owned(),
        };
        let now = Utc::now();
        let lookup = binding.clone();
        let latest = self
            .on_approval_store(move |store| store.latest_for(&lookup))
            .await
            .map_err(store_failed)?;
        let live = |found: &Approval| {
            matches!(
                found.status,
                ApprovalStatus::Pending | ApprovalStatus::Approved
            ) && !found.is_expired_at(now)
        };
        let reason = match latest {
            Some(found) if live(&found) && found.binding.policy_hash != binding.policy_hash => {
                Reason::ApprovalMismatch
            }
            // Still pending: the call waits for this one. Answered here rather than by
            // `create` (which would return it too), because an operator may decide it
            // in between, and `create` would then open a second approval for the
            // same call that nobody asked for, and the caller would wait on it
            // instead of hearing the decision.
            Some(found) if found.status == ApprovalStatus::Pending && live(&found) => {
                return Ok(Gate::Answer(
                    ApprovalAnswer::waiting(Reason::ApprovalRequired, &found),
                    mode,
                ));
            }
            // Decided, but its record is not durable yet (and may fail, which takes
            // the decision back): not in effect, so the call waits as for a pending one.
            Some(found)
                if !found.decision_recorded
                    && matches!(
                        found.status,
                        ApprovalStatus::Approved | ApprovalStatus::Denied
                    )
                    && !found.is_expired_at(now) =>
            {
                return Ok(Gate::Answer(
                    ApprovalAnswer::waiting(Reason::ApprovalRequired, &found),
                    mode,
                ));
            }
            Some(found) if found.status == ApprovalStatus::Approved && live(&found) => {
                let id = found.id.clone();
                let consumed = self
                    .on_approval_store(move |store| store.consume(&id, now))
                    .await;
                match consumed {
                    Ok(Some(consumed)) => {
                        self.approvals_changed().await;
                        return Ok(Gate::Consumed(Box::new(consumed)));
                    }
                    // An identical call consumed it first: this one needs its own.
                    Ok(None) => Reason::ApprovalRequired,
                    // Marked approved outside Proxi: never used; a real one is asked for.
                    Err(ApprovalError::Untrusted(id)) => {
                        tracing::warn!(
                            approval_id = %id,
                            "an approved row's decision seal does not verify; it is not used"
                        );
                        Reason::ApprovalMismatch
                    }
                    Err(error) => return Err(store_failed(error)),
                }
            }
            Some(found) if found.status == ApprovalStatus::Denied && !found.is_expired_at(now) => {
                return Ok(Gate::Answer(ApprovalAnswer::denied(&found), mode));
            }
            // Expired, whether or not the expiry task has recorded it yet.
            Some(found)
                if !live(&found)
                    && matches!(
                        found.status,
                        ApprovalStatus::Expired
                            | ApprovalStatus::Pending
                            | ApprovalStatus::Approved
                    ) =>
            {
                Reason::ApprovalExpired
            }
            _ => Reason::ApprovalRequired,
        };
        let ttl = policy.mode(mode).approval_ttl();
        let request = NewApproval {
            binding,
            arguments: shown_arguments(arguments),
            mode: self.mode_name(mode).to_string(),
            reason: None,
            created_at: now,
            expires_at: now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::zero()),
        };
        let created = self
            .on_approval_store(move |store| store.create(request, MAX_PENDING_APPROVALS))
            .await;
        match created {
            Ok((approval, fresh)) => {
                if fresh {
                    self.approvals_changed().await;
                }
                Ok(Gate::Answer(
                    ApprovalAnswer::waiting(reason, &approval),
                    mode,
                ))
            }
            Err(ApprovalError::TooManyPending(max)) => {
                Ok(Gate::Answer(ApprovalAnswer::queue_full(max), mode))
            }
            Err(error) => Err(store_failed(error)),
        }
    }

    /// An agent asks for a mode change (`"elevation_requests": true`): a pending
    /// approval of kind `mode_change`, recorded (kind `approval`, outcome
    /// `requested`). Only an operator's approval changes the mode; the agent never can.
    pub async fn request_mode_change(
        &self,
        principal: &Principal,
        change: crate::mode::ModeChange,
    ) -> Result<Approval, ElevationError> {
        let policy = self.policy();
        if !policy.elevation_requests() {
            return Err(ElevationError::Disabled);
        }
        if principal.role() != Role::Agent {
            return Err(ElevationError::NotAgent);
        }
        let valid = crate::mode::validate_change(&policy, change)?;
        self.audit
            .admit(audit_priority(principal))
            .map_err(|_| GatewayError::AuditUnavailable)?;
        let mode = self.mode_name(valid.target).to_string();
        let arguments = json!({"mode": mode, "ttl_seconds": valid.ttl.map(|ttl| ttl.as_secs())});
        let current = self
            .read_state()
            .effective_mode(std::time::Instant::now(), policy.default_mode());
        let now = Utc::now();
        let ttl = policy.mode(current).approval_ttl();
        let request = NewApproval {
            binding: Binding {
                kind: ApprovalKind::ModeChange,
                principal: principal.name().to_string(),
                role: principal.role().as_str().to_owned(),
                target: mode,
                arguments_digest: arguments_digest(&arguments),
                policy_hash: policy.policy_hash().to_owned(),
            },
            arguments,
            mode: self.mode_name(current).to_string(),
            reason: valid.reason,
            created_at: now,
            expires_at: now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::zero()),
        };
        let (approval, fresh) = self
            .on_approval_store(move |store| store.create(request, MAX_PENDING_APPROVALS))
            .await
            .map_err(|error| match error {
                ApprovalError::TooManyPending(max) => ElevationError::TooManyPending(max),
                other => ElevationError::Gateway(store_failed(other)),
            })?;
        if fresh {
            let reason = approval.reason.clone();
            self.record_approval_event(principal, &approval, "requested", reason.as_deref())
                .await?;
            self.approvals_changed().await;
        }
        Ok(approval)
    }

    /// An approved elevation request takes effect: consumed, then the mode is
    /// changed by the approver, the record naming the requester too.
    async fn apply_mode_change(
        &self,
        approver: &Principal,
        approval: &Approval,
    ) -> Result<(), ApprovalDecisionError> {
        let id = approval.id.clone();
        let now = Utc::now();
        let consumed = self
            .on_approval_store(move |store| store.consume(&id, now))
            .await
            .map_err(|error| ApprovalDecisionError::Gateway(store_failed(error)))?;
        let Some(consumed) = consumed else {
            return Err(ApprovalDecisionError::State(ApprovalError::Expired));
        };
        let ttl = consumed.arguments["ttl_seconds"]
            .as_u64()
            .map(Duration::from_secs);
        let reason = format!(
            "elevation request {} by {}: {}",
            consumed.id,
            consumed.binding.principal,
            consumed.reason.as_deref().unwrap_or("")
        );
        let change = crate::mode::ModeChange {
            mode: consumed.binding.target.clone(),
            reason: Some(truncate(&reason, crate::mode::MAX_REASON_LEN).to_owned()),
            ttl,
        };
        self.switch_mode(approver, change).await?;
        Ok(())
    }

    /// Approvals with `status` (all when `None`), newest first, at most `limit`.
    pub async fn list_approvals(
        &self,
        status: Option<ApprovalStatus>,
        limit: usize,
    ) -> Result<Vec<Approval>, GatewayError> {
        let limit = limit.min(crate::approval::MAX_APPROVAL_LIST);
        self.on_approval_store(move |store| store.list(status, limit))
            .await
            .map_err(store_failed)
    }

    /// An operator approves or denies a pending approval, and the decision is
    /// recorded (kind `approval`, with the approver's and the requester's names)
    /// before this returns. An operator cannot decide its own request.
    pub async fn decide_approval(
        &self,
        approver: &Principal,
        id: &str,
        verdict: ApprovalVerdict,
        reason: &str,
    ) -> Result<Approval, ApprovalDecisionError> {
        if approver.role() != Role::Operator {
            return Err(ApprovalDecisionError::NotOperator);
        }
        if reason.chars().count() > MAX_APPROVAL_REASON_CHARS
            || !crate::text::has_visible_text(reason)
        {
            return Err(ApprovalDecisionError::BadReason);
        }
        if !crate::approval::is_approval_id(id) {
            return Err(ApprovalDecisionError::State(ApprovalError::NotFound));
        }
        // Nothing is decided that could not be recorded.
        if self.audit.admit(Priority::Essential).is_err() {
            return Err(GatewayError::AuditUnavailable.into());
        }
        let lookup = id.to_owned();
        let current = self
            .on_approval_store(move |store| store.get(&lookup))
            .await
            .map_err(|error| ApprovalDecisionError::Gateway(store_failed(error)))?
            .ok_or(ApprovalDecisionError::State(ApprovalError::NotFound))?;
        if holder(&current.binding.principal) == approver.identity().name() {
            return Err(ApprovalDecisionError::OwnRequest);
        }
        let (id, approver_name, reason_text) = (
            id.to_owned(),
            approver.name().to_string(),
            reason.to_owned(),
        );
        let now = Utc::now();
        let decided = self
            .on_approval_store(move |store| {
                store.decide(&id, verdict, &approver_name, &reason_text, now)
            })
            .await
            .map_err(|error| match error {
                ApprovalError::NotFound | ApprovalError::NotPending(_) | ApprovalError::Expired => {
                    ApprovalDecisionError::State(error)
                }
                other => ApprovalDecisionError::Gateway(store_failed(other)),
            })?;
        // The decision is in the store but not in effect (nothing can consume it)
        // until its record is durable; if the record fails it is taken back, so
        // the trail shows every decision that ever took effect.
        let recorded = self
            .record_approval_event(approver, &decided, decided.status.as_str(), Some(reason))
            .await;
        if let Err(error) = recorded {
            self.revert_unrecorded_decision(&decided).await;
            return Err(error.into());
        }
        let lookup = decided.id.clone();
        let confirmed = self
            .on_approval_store(move |store| store.confirm_decision(&lookup))
            .await
            .map_err(|error| ApprovalDecisionError::Gateway(store_failed(error)))?;
        self.approvals_changed().await;
        if !confirmed {
            // It lapsed between the decision and now: recorded, but never in
            // effect; the expiry task records the lapse.
            return Err(ApprovalDecisionError::State(ApprovalError::Expired));
        }
        let decided = Approval {
            decision_recorded: true,
            ..decided
        };
        if decided.binding.kind == ApprovalKind::ModeChange && verdict == ApprovalVerdict::Approve {
            self.apply_mode_change(approver, &decided).await?;
            self.approvals_changed().await;
        }
        Ok(decided)
    }

    /// A decision whose record failed never took effect: back to pending, so
    /// the operator (told that it failed) can decide again once the trail
    /// works. If even that fails, the decision stays unconfirmed, which no call
    /// and no mode change can use, until it expires (fail closed).
    async fn revert_unrecorded_decision(&self, decided: &Approval) {
        let (id, status) = (decided.id.clone(), decided.status);
        let reverted = self
            .on_approval_store(move |store| store.revert_decision(&id, status))
            .await;
        match reverted {
            Ok(true) => {
                tracing::warn!(approval_id = %decided.id, "an approval decision could not be recorded; it was taken back and the approval is pending again");
            }
            Ok(false) => {
                tracing::warn!(approval_id = %decided.id, "an approval decision could not be recorded and was not in effect; it had lapsed already");
            }
            Err(error) => {
                tracing::error!(%error, approval_id = %decided.id, "an approval decision could not be recorded nor taken back; it stays unusable until it expires");
            }
        }
        self.approvals_changed().await;
    }

    /// Records one step of an approval's life (decided, expired) as an essential
    /// record of kind `approval`: who acted, whose request it was, on what.
    pub(super) async fn record_approval_event(
        &self,
        actor: &Principal,
        approval: &Approval,
        outcome: &'static str,
        reason: Option<&str>,
    ) -> Result<u64, GatewayError> {
        let mode = self
            .read_state()
            .effective_mode(std::time::Instant::now(), self.policy().default_mode());
        let entry = AuditEntry {
            time: Utc::now(),
            principal: actor.clone(),
            kind: EntryKind::Approval,
            tool: Some(
                truncate(&approval.binding.target, crate::tools::MAX_TOOL_NAME_LEN).to_owned(),
            ),
            arguments: Some(approval.arguments.clone()),
            mode: self.mode_name(mode).clone(),
            decision: AuditDecision::Allowed,
            reason_code: None,
            outcome,
            detail: json!({
                "approval_id": approval.id,
                "approval_kind": approval.binding.kind.as_str(),
                "requested_by": approval.binding.principal,
                "requested_in_mode": approval.mode,
                "arguments_digest": approval.binding.arguments_digest,
                "reason": reason,
            }),
            expires_at: Some(approval.expires_at),
            context: None,
            policy_hash: Some(Arc::from(approval.binding.policy_hash.as_str())),
        };
        self.audit
            .append_with(entry, audit_priority(actor))
            .await
            .map_err(|_| GatewayError::AuditUnavailable)
    }

    /// Takes back every decision that a stopped process took but never put in
    /// effect (it stopped between the store's decision and its confirmation), and
    /// records each as `decision_reverted`, so the approval is pending again for
    /// an operator to decide anew instead of being listed as decided but unusable.
    /// On Proxi's own store this runs at start and takes back every unconfirmed
    /// decision (the data dir lock means no other process decides there); on a
    /// shared store it also runs with each expiry pass, and takes back only those
    /// older than [`STRANDED_DECISION_AGE`], so as not to race a live instance.
    pub(super) async fn revert_stranded_decisions(&self, at_start: bool) {
        let shared = self.audit.store().shares_mode();
        if !shared && !at_start {
            return;
        }
        let cutoff = if shared {
            Utc::now() - STRANDED_DECISION_AGE
        } else {
            Utc::now()
        };
        let stranded = match self
            .on_approval_store(move |store| {
                store.unconfirmed_decisions(cutoff, crate::approval::MAX_APPROVAL_LIST)
            })
            .await
        {
            Ok(stranded) => stranded,
            Err(error) => {
                tracing::error!(%error, "could not look for approval decisions that never took effect");
                return;
            }
        };
        if stranded.is_empty() {
            return;
        }
        for approval in &stranded {
            let (id, status) = (approval.id.clone(), approval.status);
            match self
                .on_approval_store(move |store| store.revert_decision(&id, status))
                .await
            {
                Ok(true) => {}
                // Confirmed or taken back by its own instance meanwhile.
                Ok(false) => continue,
                Err(error) => {
                    tracing::error!(%error, approval_id = %approval.id, "could not take back an approval decision that never took effect");
                    continue;
                }
            }
            tracing::warn!(approval_id = %approval.id, "an approval decision never took effect (Proxi stopped before recording it); the approval is pending again");
            if let Err(error) = self
                .record_approval_event(
                    &Principal::system(),
                    approval,
                    "decision_reverted",
                    Some(STRANDED_DECISION_REASON),
                )
                .await
            {
                tracing::error!(%error, approval_id = %approval.id, "could not record that an approval decision was taken back");
            }
        }
        self.approvals_changed().await;
    }

    /// Expires every approval whose time ran out and records each expiry once.
    pub(super) async fn expire_due_approvals(&self) {
        let now = Utc::now();
        let expired = match self
            .on_approval_store(move |store| store.expire_due(now))
            .await
        {
            Ok(expired) => expired,
            Err(error) => {
                tracing::error!(%error, "could not expire approvals");
                return;
            }
        };
        if expired.is_empty() {
            return;
        }
        for approval in &expired {
            if let Err(error) = self
                .record_approval_event(&Principal::system(), approval, "expired", None)
                .await
            {
                tracing::error!(%error, id = %approval.id, "could not record an approval's expiry");
            }
        }
        self.approvals_changed().await;
    }

    /// Watches approval changes (new requests, decisions, expiries).
    pub fn approvals_changed_events(&self) -> watch::Receiver<u64> {
        self.approvals.changed.subscribe()
    }

    /// The approval with this id.
    pub async fn approval(&self, id: &str) -> Result<Option<Approval>, GatewayError> {
        if !crate::approval::is_approval_id(id) {
            return Ok(None);
        }
        let id = id.to_owned();
        self.on_approval_store(move |store| store.get(&id))
            .await
            .map_err(store_failed)
    }

    /// Waits until approval `id` is no longer pending, or `timeout` passes;
    /// returns it as it is then. Wakes on every approval change, never polls.
    pub async fn wait_for_decision(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<Option<Approval>, GatewayError> {
        let mut changes = self.approvals.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Marked seen before reading, so a change after the read wakes us.
            changes.borrow_and_update();
            let approval = self.approval(id).await?;
            // A decision whose record is not durable yet is not one (it may be taken back).
            let waiting = approval.as_ref().is_some_and(|approval| {
                (approval.status == ApprovalStatus::Pending || !approval.decision_recorded)
                    && !approval.is_expired_at(Utc::now())
            });
            if !waiting {
                return Ok(approval);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => return Ok(approval),
            }
        }
    }
}

fn store_failed(error: ApprovalError) -> GatewayError {
    tracing::error!(%error, "the approval store failed");
    GatewayError::ApprovalsUnavailable
}

/// Whether `parsed` is allowed in `mode` and a rule asks for approval of it.
pub(super) fn needs_approval(policy: &PolicyEngine, mode: ModeId, parsed: ParsedCall) -> bool {
    let ParsedCall::Known { tool, .. } = &parsed else {
        return false;
    };
    let tool = *tool;
    match parsed.decide(policy, mode) {
        Verdict::Allow(call) => policy.requires_approval(mode, tool, call.arguments()),
        _ => false,
    }
}

/// Adds the approval a call ran under to its record's detail.
pub(super) fn with_approval(detail: Value, approval: &Approval) -> Value {
    let id = Value::String(approval.id.clone());
    let by = approval
        .decided_by
        .clone()
        .map_or(Value::Null, Value::String);
    match detail {
        Value::Object(mut object) => {
            object.insert("approval_id".to_owned(), id);
            object.insert("approved_by".to_owned(), by);
            Value::Object(object)
        }
        other => json!({"approval_id": id, "approved_by": by, "detail": other}),
    }
}

/// Wakes at the next approval's expiry (or on any change) and expires what is due.
/// Holds only a weak reference, so dropping the last `Arc<Gateway>` ends it.
pub(super) fn spawn_approval_expiry_task(gateway: std::sync::Weak<Gateway>) {
    tokio::spawn(async move {
        let Some(mut changes) = gateway.upgrade().map(|g| g.approvals.changed.subscribe()) else {
            return;
        };
        loop {
            changes.borrow_and_update();
            let next = {
                let Some(gateway) = gateway.upgrade() else {
                    return;
                };
                gateway.revert_stranded_decisions(false).await;
                gateway.expire_due_approvals().await;
                gateway
                    .on_approval_store(|store| store.next_expiry())
                    .await
                    .unwrap_or(None)
            };
            let sleep = next.map(until);
            tokio::select! {
                () = async {
                    match sleep {
                        Some(duration) => tokio::time::sleep(duration).await,
                        None => std::future::pending().await,
                    }
                } => {}
                changed = changes.changed() => if changed.is_err() { return },
            }
        }
    });
}

/// How long from now until `when` (zero if past), plus a millisecond so the
/// expiry is due when the task wakes.
fn until(when: DateTime<Utc>) -> Duration {
    (when - Utc::now())
        .to_std()
        .unwrap_or(Duration::ZERO)
        .saturating_add(Duration::from_millis(1))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::approval::sqlite::SqliteApprovals;
    use crate::approval::{DecisionSeal, Verdict};
    use crate::audit::{Durability, SqliteStore};
    use crate::gateway::{Execution, GatewayConfig, Outcome, StartupTrust};
    use crate::mode::ModeChange;

    /// The SQLite store, except that one `latest_for` (once armed) has an operator
    /// deny every pending approval, unconfirmed, just after it answers: a decision
    /// landing in the instant after the gate's lookup.
    #[derive(Debug)]
    struct DecidesAfterLookup {
        inner: SqliteApprovals,
        armed: AtomicBool,
    }

    impl ApprovalStore for DecidesAfterLookup {
        fn create(
            &self,
            request: NewApproval,
            max_pending: usize,
        ) -> Result<(Approval, bool), ApprovalError> {
            self.inner.create(request, max_pending)
        }
        fn get(&self, id: &str) -> Result<Option<Approval>, ApprovalError> {
            self.inner.get(id)
        }
        fn latest_for(&self, binding: &Binding) -> Result<Option<Approval>, ApprovalError> {
            let found = self.inner.latest_for(binding)?;
            if self.armed.swap(false, Ordering::SeqCst) {
                for pending in self.inner.list(Some(ApprovalStatus::Pending), 10)? {
                    self.inner.decide(
                        &pending.id,
                        ApprovalVerdict::Deny,
                        "operator",
                        "no",
                        Utc::now(),
                    )?;
                }
            }
            Ok(found)
        }
        fn list(
            &self,
            status: Option<ApprovalStatus>,
            limit: usize,
        ) -> Result<Vec<Approval>, ApprovalError> {
            self.inner.list(status, limit)
        }
        fn decide(
            &self,
            id: &str,
            verdict: Verdict,
            approver: &str,
            reason: &str,
            now: DateTime<Utc>,
        ) -> Result<Approval, ApprovalError> {
            self.inner.decide(id, verdict, approver, reason, now)
        }
        fn confirm_decision(&self, id: &str) -> Result<bool, ApprovalError> {
            self.inner.confirm_decision(id)
        }
        fn revert_decision(
            &self,
            id: &str,
            decided: ApprovalStatus,
        ) -> Result<bool, ApprovalError> {
            self.inner.revert_decision(id, decided)
        }
        fn consume(&self, id: &str, now: DateTime<Utc>) -> Result<Option<Approval>, ApprovalError> {
            self.inner.consume(id, now)
        }
        fn expire_due(&self, now: DateTime<Utc>) -> Result<Vec<Approval>, ApprovalError> {
            self.inner.expire_due(now)
        }
        fn unconfirmed_decisions(
            &self,
            decided_before: DateTime<Utc>,
            limit: usize,
        ) -> Result<Vec<Approval>, ApprovalError> {
            self.inner.unconfirmed_decisions(decided_before, limit)
        }
        fn next_expiry(&self) -> Result<Option<DateTime<Utc>>, ApprovalError> {
            self.inner.next_expiry()
        }
        fn count_pending(&self) -> Result<usize, ApprovalError> {
            self.inner.count_pending()
        }
    }

    fn answer(execution: &Execution) -> &ApprovalAnswer {
        match &execution.outcome {
            Outcome::Approval(answer) => answer,
            other => panic!("not an approval answer: {other:?}"),
        }
    }

    /// Before, an identical call whose pending approval was decided in that
    /// instant got a second approval opened for it, and waited on that one
    /// instead of hearing the decision (the agent then reported "other").
    #[tokio::test]
    async fn a_decision_between_the_lookup_and_create_opens_no_second_approval() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let mut policy: Value =
            serde_json::from_str(include_str!("../../policies/ops_policy.json")).unwrap();
        policy["modes"]["EMERGENCY"]["require_approval"] = json!({"scale_fleet": {}});
        let policy = PolicyEngine::from_json(&policy.to_string(), "test policy").unwrap();
        let config = GatewayConfig {
            data_dir: data_dir.clone(),
            durability: Durability::Process,
            audit_reserve_bytes: Some(0),
        };
        crate::audit::create_private_dir(&data_dir).unwrap();
        let trust = StartupTrust {
            anchoring: crate::anchor::Anchoring::in_data_dir(&data_dir).unwrap(),
            restore_elevated: true,
        };
        let audit = Arc::new(SqliteStore::open(&data_dir, Durability::Process).unwrap());
        let seal = DecisionSeal::Keyed(crate::anchor::AuditKey::from_bytes([7; 32]));
        let approvals = Arc::new(DecidesAfterLookup {
            inner: SqliteApprovals::open(&data_dir, seal).unwrap(),
            armed: AtomicBool::new(false),
        });
        let gateway = Gateway::open_with_store(policy, config, trust, audit, approvals.clone())
            .await
            .unwrap();
        let change = ModeChange {
            mode: "EMERGENCY".into(),
            reason: Some("incident".into()),
            ttl: None,
        };
        gateway
            .set_mode(&Principal::operator(), change)
            .await
            .unwrap();
        let agent = Principal::agent();
        let call = || gateway.execute(&agent, "scale_fleet", json!({"count": 4}));
        let first = call().await.unwrap();
        let id = answer(&first).approval_id.clone().expect("an approval id");

        approvals.armed.store(true, Ordering::SeqCst);
        let again = call().await.unwrap();
        assert_eq!(answer(&again).reason, Reason::ApprovalRequired);
        assert_eq!(answer(&again).approval_id.as_deref(), Some(id.as_str()));
        let all = approvals.list(None, 10).unwrap();
        assert_eq!(all.len(), 1, "no second approval: {all:?}");

        // Once the denial is in effect, the identical call hears it.
        assert!(approvals.confirm_decision(&id).unwrap());
        let denied = call().await.unwrap();
        assert_eq!(answer(&denied).reason, Reason::ApprovalDenied);
    }
}
