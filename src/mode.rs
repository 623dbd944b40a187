//! The operational mode as a state machine: the state in force, the rules an
//! operator's change must pass, when an elevated mode lapses, and which calls are
//! still in flight under an earlier mode.
//!
//! Every switch increments the state's **epoch**. A call that goes to an upstream
//! registers itself in [`InFlightCalls`] with the epoch it was decided under and
//! stays registered until its outcome is recorded. A switch to a mode that would
//! deny such a call waits for it ([`drain`]) and cancels it when the wait runs out,
//! so the gateway never holds the mode lock across upstream I/O and still keeps
//! "once a switch has returned, nothing the new mode denies is running".
//! Built-in tools run in memory under the lock and never register.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::audit::AuditRecord;
use crate::policy::{ModeId, PolicyEngine};
use crate::text;

/// Emergency TTL when the operator does not give one.
pub const DEFAULT_ELEVATED_TTL: Duration = Duration::from_secs(900);
/// Longest accepted mode-change reason, in characters.
pub const MAX_REASON_LEN: usize = 500;

/// Why an operator's mode change was refused.
#[derive(Debug, thiserror::Error)]
pub enum ModeChangeError {
    /// Only operators may change the mode.
    #[error("only an operator may change the mode")]
    NotOperator,
    /// The policy has no such mode.
    #[error("unknown mode '{requested}'; available modes: {available}")]
    UnknownMode {
        /// What was asked for.
        requested: String,
        /// The policy's modes.
        available: String,
    },
    /// Elevated modes need a reason for the audit trail.
    #[error("a reason is required to enter {0} mode")]
    ReasonRequired(String),
    /// The reason is too long.
    #[error("the reason must be at most {MAX_REASON_LEN} characters")]
    ReasonTooLong,
    /// The reason has no visible character: only spaces, zero-width, bidi or control characters.
    #[error(
        "the reason must contain visible characters (spaces, zero-width and control characters alone do not count)"
    )]
    ReasonInvisible,
    /// The TTL is zero or above the policy's cap.
    #[error(
        "ttl_seconds must be between 1 and {max} (the policy's max_emergency_ttl_seconds), got {requested}"
    )]
    TtlOutOfRange {
        /// What was asked for.
        requested: u64,
        /// The policy's cap.
        max: u64,
    },
    /// The default mode does not lapse.
    #[error(
        "ttl_seconds applies only to elevated modes; {0} is the default mode and does not expire"
    )]
    TtlOnDefaultMode(String),
    /// The change could not be recorded.
    #[error("the audit trail is unavailable; the mode change was not recorded")]
    AuditUnavailable,
}

/// A request to change the mode.
#[derive(Clone, Debug, Default)]
pub struct ModeChange {
    /// The target mode's name (any case).
    pub mode: String,
    /// Why; required for elevated modes.
    pub reason: Option<String>,
    /// How long an elevated mode lasts; defaults to 15 minutes (capped by policy).
    pub ttl: Option<Duration>,
}

/// A mode change that passed every rule: the target, its trimmed reason and its TTL
/// (`None` for the default mode, which never lapses).
#[derive(Clone, Debug, PartialEq)]
pub struct ValidChange {
    /// The mode to switch to.
    pub target: ModeId,
    /// The reason, trimmed; `None` when blank.
    pub reason: Option<String>,
    /// How long the target lasts, for an elevated mode.
    pub ttl: Option<Duration>,
}

/// Checks `change` against the policy's rules: a known mode, a visible reason of
/// bounded length for elevated modes, a TTL within the policy's cap and none for
/// the default mode. Who asks is checked by the caller.
pub fn validate_change(
    policy: &PolicyEngine,
    change: ModeChange,
) -> Result<ValidChange, ModeChangeError> {
    let target =
        policy
            .mode_id(change.mode.trim())
            .ok_or_else(|| ModeChangeError::UnknownMode {
                requested: truncate(&change.mode, 64).to_owned(),
                available: policy
                    .modes()
                    .map(|(_, mode)| mode.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
    let target_name = policy.mode(target).name();
    let reason = change
        .reason
        .map(|reason| reason.trim().to_owned())
        .filter(|reason| !reason.is_empty());
    // A reason made of zero-width or control characters only looks given.
    if reason
        .as_deref()
        .is_some_and(|r| !text::has_visible_text(r))
    {
        return Err(ModeChangeError::ReasonInvisible);
    }
    if reason
        .as_ref()
        .is_some_and(|r| r.chars().count() > MAX_REASON_LEN)
    {
        return Err(ModeChangeError::ReasonTooLong);
    }
    let ttl = if target == policy.default_mode() {
        if change.ttl.is_some() {
            return Err(ModeChangeError::TtlOnDefaultMode(target_name.to_owned()));
        }
        None
    } else {
        if reason.is_none() {
            return Err(ModeChangeError::ReasonRequired(target_name.to_owned()));
        }
        let max = policy.max_elevated_ttl();
        let ttl = change.ttl.unwrap_or(DEFAULT_ELEVATED_TTL.min(max));
        if ttl.is_zero() || ttl > max {
            return Err(ModeChangeError::TtlOutOfRange {
                requested: ttl.as_secs(),
                max: max.as_secs(),
            });
        }
        Some(ttl)
    };
    Ok(ValidChange {
        target,
        reason,
        ttl,
    })
}

/// The mode in force and how it came to be.
#[derive(Clone, Debug)]
pub struct ModeState {
    /// The mode last switched to.
    pub mode: ModeId,
    /// Monotonic deadline for decisions, wall-clock time for display and restarts.
    pub expires: Option<(Instant, DateTime<Utc>)>,
    /// Why it was entered.
    pub reason: Option<String>,
    /// Who entered it.
    pub changed_by: Arc<str>,
    /// When.
    pub changed_at: DateTime<Utc>,
    /// How many switches preceded this state; only [`ModeState::switch`] changes it,
    /// and always upwards, so a call decided under epoch E knows that any state with
    /// a higher epoch came after its decision.
    pub epoch: u64,
}

impl ModeState {
    /// The state at startup: `mode`, set by `changed_by` at `changed_at`, epoch 0.
    pub fn initial(mode: ModeId, changed_by: Arc<str>, changed_at: DateTime<Utc>) -> ModeState {
        ModeState {
            mode,
            expires: None,
            reason: None,
            changed_by,
            changed_at,
            epoch: 0,
        }
    }

    /// The mode decisions use: an elevated mode past its deadline counts as lapsed
    /// even before the expiry task has recorded it.
    pub fn effective_mode(&self, now: Instant, default: ModeId) -> ModeId {
        match self.expires {
            Some((deadline, _)) if now >= deadline => default,
            _ => self.mode,
        }
    }

    /// Whether an elevated mode's deadline has passed at `now`.
    pub fn is_due(&self, now: Instant) -> bool {
        self.expires.is_some_and(|(deadline, _)| now >= deadline)
    }

    /// Replaces the state with `next` (whatever epoch it carries) and moves the
    /// epoch on by one; returns the state replaced. Undoing a change goes through
    /// here too, so epochs never repeat.
    pub fn switch(&mut self, mut next: ModeState) -> ModeState {
        next.epoch = self.epoch + 1;
        std::mem::replace(self, next)
    }
}

/// What to do at startup with the mode the trail last recorded.
#[derive(Clone, Debug)]
pub enum Restore {
    /// Put back this state (the default mode, or an elevated one with time left).
    Restored(ModeState),
    /// Put back this elevated state, whose time left was cut to the policy's cap
    /// at `capped_at`; the cut is recorded.
    Capped {
        /// The state, expiring at the cap.
        state: ModeState,
        /// When the capped mode lapses.
        capped_at: DateTime<Utc>,
        /// The policy's `max_emergency_ttl_seconds`.
        cap: Duration,
    },
    /// Start in the default mode: the record may not be trusted or used; why, for the trail.
    Refused(String),
    /// Start in the default mode: the recorded mode is over (or gone); why, for the trail.
    Lapsed(&'static str),
}

/// Decides whether the mode in `record` (the trail's last mode event) comes back
/// at startup. An elevated mode is restored only when the chain from its record
/// verified (`problem` is `None`), when `restore_elevated`, while it has time left,
/// and for at most the policy's current `max_emergency_ttl_seconds`.
pub fn restore_decision(
    policy: &PolicyEngine,
    record: &AuditRecord,
    problem: Option<&str>,
    restore_elevated: bool,
    now: DateTime<Utc>,
) -> Restore {
    let default = policy.default_mode();
    if record.mode != policy.mode(default).name() {
        if let Some(problem) = problem {
            return Restore::Refused(format!(
                "the recorded mode change does not verify, so it was not restored ({problem})"
            ));
        }
        if !restore_elevated {
            return Restore::Refused(
                "no operator credential is configured, so no elevated mode is restored".to_owned(),
            );
        }
    }
    let Some(mode) = policy.mode_id(&record.mode) else {
        return Restore::Lapsed("the recorded mode no longer exists in the policy");
    };
    let changed_at = DateTime::parse_from_rfc3339(&record.time)
        .map(|time| time.with_timezone(&Utc))
        .unwrap_or(now);
    let mut state = ModeState {
        mode,
        expires: None,
        reason: record
            .detail
            .get("reason")
            .and_then(Value::as_str)
            .map(str::to_owned),
        changed_by: Arc::from(record.principal.as_str()),
        changed_at,
        epoch: 0,
    };
    if mode == default {
        return Restore::Restored(state);
    }
    let expires_at = record
        .expires_at
        .as_deref()
        .and_then(|text| DateTime::parse_from_rfc3339(text).ok())
        .map(|time| time.with_timezone(&Utc));
    let remaining = expires_at.and_then(|at| (at - now).to_std().ok());
    match (expires_at, remaining) {
        (Some(at), Some(remaining)) if !remaining.is_zero() => {
            let cap = policy.max_elevated_ttl();
            if remaining > cap {
                let capped_at =
                    now + chrono::Duration::from_std(cap).unwrap_or(chrono::Duration::zero());
                state.expires = Some((Instant::now() + cap, capped_at));
                state.changed_by = Arc::from("system");
                state.changed_at = now;
                Restore::Capped {
                    state,
                    capped_at,
                    cap,
                }
            } else {
                state.expires = Some((Instant::now() + remaining, at));
                Restore::Restored(state)
            }
        }
        _ => Restore::Lapsed("the mode lapsed while Proxi was not running"),
    }
}

/// What became of one upstream call that a mode switch had to wait for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainedCall {
    /// The seq of the call's intent record (0 if it was switched away before its
    /// intent was durable).
    pub intent_seq: u64,
    /// The tool, as requested.
    pub tool: String,
    /// The outcome recorded for it (`executed`, `cancelled`, ...).
    pub outcome: String,
}

/// The calls a mode switch waited for: those that ended by themselves within
/// `drain_timeout_seconds`, and those it cancelled.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DrainReport {
    /// Finished within the drain timeout.
    pub drained: Vec<DrainedCall>,
    /// Still running at the timeout, so cancelled (their upstream got `notifications/cancelled`).
    pub cancelled: Vec<DrainedCall>,
}

impl DrainReport {
    /// Whether the switch had nothing to wait for.
    pub fn is_empty(&self) -> bool {
        self.drained.is_empty() && self.cancelled.is_empty()
    }
}

/// What the registry knows of one call in flight.
#[derive(Debug)]
struct CallSlot {
    epoch: u64,
    tool: String,
    arguments: Value,
    intent_seq: AtomicU64,
    outcome: OnceLock<&'static str>,
    cancel: CancellationToken,
    finished: CancellationToken,
}

/// Upstream calls decided but whose outcome is not yet recorded, by the mode epoch
/// they were decided under. Bounded by the callers' own limits (connections,
/// sessions, rate limits): each entry belongs to one request being served.
#[derive(Debug, Default)]
pub struct InFlightCalls {
    calls: Mutex<HashMap<u64, Arc<CallSlot>>>,
    next_id: AtomicU64,
}

/// One call's place in [`InFlightCalls`]; dropping it removes the call and wakes a
/// switch waiting for it, however the call ended.
#[derive(Debug)]
pub struct InFlightCall {
    registry: Arc<InFlightCalls>,
    id: u64,
    slot: Arc<CallSlot>,
}

impl InFlightCall {
    /// Fires when a mode switch gives up waiting and cancels this call.
    pub fn cancelled(&self) -> &CancellationToken {
        &self.slot.cancel
    }

    /// Notes the seq of the call's durable intent record, for the drain report.
    pub fn set_intent_seq(&self, seq: u64) {
        self.slot.intent_seq.store(seq, Ordering::Release);
    }

    /// Notes the outcome about to be recorded, for the drain report.
    pub fn set_outcome(&self, outcome: &'static str) {
        let _ = self.slot.outcome.set(outcome);
    }
}

impl Drop for InFlightCall {
    fn drop(&mut self) {
        self.registry
            .calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
        self.slot.finished.cancel();
    }
}

/// A call a switch must wait for, as [`InFlightCalls::to_drain`] found it.
#[derive(Debug)]
pub struct DrainTarget(Arc<CallSlot>);

impl InFlightCalls {
    /// Registers a call decided under `epoch`. Call it while holding the mode
    /// lock's read side, so that no switch can slip between the decision and the
    /// registration.
    pub fn register(self: &Arc<Self>, epoch: u64, tool: &str, arguments: &Value) -> InFlightCall {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(CallSlot {
            epoch,
            tool: tool.to_owned(),
            arguments: arguments.clone(),
            intent_seq: AtomicU64::new(0),
            outcome: OnceLock::new(),
            cancel: CancellationToken::new(),
            finished: CancellationToken::new(),
        });
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, slot.clone());
        InFlightCall {
            registry: self.clone(),
            id,
            slot,
        }
    }

    /// How many calls are in flight.
    pub fn len(&self) -> usize {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// The intent seqs of the calls in flight whose intent is durable.
    pub fn intent_seqs(&self) -> Vec<u64> {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|slot| slot.intent_seq.load(Ordering::Acquire))
            .filter(|&seq| seq != 0)
            .collect()
    }

    /// Whether no call is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The calls decided before `epoch` that `still_allowed(tool, arguments)` says
    /// the new mode would refuse. Call it under the mode lock's write side, right
    /// after the switch to `epoch`.
    pub fn to_drain(
        &self,
        epoch: u64,
        still_allowed: impl Fn(&str, &Value) -> bool,
    ) -> Vec<DrainTarget> {
        let calls = self.calls.lock().unwrap_or_else(PoisonError::into_inner);
        let mut targets: Vec<DrainTarget> = calls
            .values()
            .filter(|slot| slot.epoch < epoch && !still_allowed(&slot.tool, &slot.arguments))
            .map(|slot| DrainTarget(slot.clone()))
            .collect();
        targets.sort_by_key(|target| target.0.intent_seq.load(Ordering::Acquire));
        targets
    }
}

/// Waits up to `timeout` for every target to finish, then cancels the rest and
/// waits until their outcome (`cancelled`, normally) is recorded too.
pub async fn drain(targets: Vec<DrainTarget>, timeout: Duration) -> DrainReport {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut report = DrainReport::default();
    let mut late = Vec::new();
    for target in targets {
        let finished = tokio::time::timeout_at(deadline, target.0.finished.cancelled())
            .await
            .is_ok();
        if finished {
            report.drained.push(describe(&target));
        } else {
            late.push(target);
        }
    }
    for target in &late {
        target.0.cancel.cancel();
    }
    for target in late {
        target.0.finished.cancelled().await;
        report.cancelled.push(describe(&target));
    }
    report
}

fn describe(target: &DrainTarget) -> DrainedCall {
    DrainedCall {
        intent_seq: target.0.intent_seq.load(Ordering::Acquire),
        tool: target.0.tool.clone(),
        outcome: target
            .0
            .outcome
            .get()
            .copied()
            .unwrap_or("unknown")
            .to_owned(),
    }
}

/// Cuts `text` to at most `max` bytes on a character boundary.
fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy() -> PolicyEngine {
        PolicyEngine::from_json(
            include_str!("../policies/ops_policy.json"),
            "ops_policy.json",
        )
        .expect("the shipped policy loads")
    }

    fn change(mode: &str, reason: Option<&str>, ttl: Option<u64>) -> ModeChange {
        ModeChange {
            mode: mode.to_owned(),
            reason: reason.map(str::to_owned),
            ttl: ttl.map(Duration::from_secs),
        }
    }

    #[test]
    fn change_rules_are_checked_in_order() {
        let policy = policy();
        assert!(matches!(
            validate_change(&policy, change("PANIC", None, None)),
            Err(ModeChangeError::UnknownMode { .. })
        ));
        assert!(matches!(
            validate_change(&policy, change("EMERGENCY", Some("  "), None)),
            Err(ModeChangeError::ReasonRequired(_))
        ));
        assert!(matches!(
            validate_change(&policy, change("EMERGENCY", Some("\u{200b}"), None)),
            Err(ModeChangeError::ReasonInvisible)
        ));
        let long = "x".repeat(MAX_REASON_LEN + 1);
        assert!(matches!(
            validate_change(&policy, change("EMERGENCY", Some(&long), None)),
            Err(ModeChangeError::ReasonTooLong)
        ));
        assert!(matches!(
            validate_change(&policy, change("EMERGENCY", Some("db down"), Some(0))),
            Err(ModeChangeError::TtlOutOfRange { .. })
        ));
        assert!(matches!(
            validate_change(&policy, change("NORMAL", None, Some(60))),
            Err(ModeChangeError::TtlOnDefaultMode(_))
        ));
        let valid = validate_change(&policy, change(" emergency ", Some(" db down "), None))
            .expect("valid");
        assert_eq!(valid.reason.as_deref(), Some("db down"));
        assert_eq!(
            valid.ttl,
            Some(DEFAULT_ELEVATED_TTL.min(policy.max_elevated_ttl()))
        );
        let back = validate_change(&policy, change("NORMAL", None, None)).expect("valid");
        assert_eq!(back.target, policy.default_mode());
        assert_eq!(back.ttl, None);
    }

    #[test]
    fn a_lapsed_mode_counts_as_the_default_and_every_switch_moves_the_epoch() {
        let policy = policy();
        let default = policy.default_mode();
        let emergency = policy.mode_id("EMERGENCY").expect("shipped mode");
        let mut state = ModeState::initial(default, Arc::from("system"), Utc::now());
        let now = Instant::now();
        let elevated = ModeState {
            mode: emergency,
            expires: Some((now + Duration::from_secs(5), Utc::now())),
            reason: Some("incident".into()),
            changed_by: Arc::from("operator"),
            changed_at: Utc::now(),
            epoch: 0,
        };
        let replaced = state.switch(elevated);
        assert_eq!((replaced.epoch, state.epoch), (0, 1));
        assert_eq!(state.effective_mode(now, default), emergency);
        assert!(!state.is_due(now));
        let later = now + Duration::from_secs(5);
        assert_eq!(state.effective_mode(later, default), default);
        assert!(state.is_due(later));
        // Undoing goes forward too: the replaced state comes back under a new epoch.
        state.switch(replaced);
        assert_eq!((state.mode, state.epoch), (default, 2));
    }

    fn mode_record(mode: &str, expires_at: Option<DateTime<Utc>>) -> AuditRecord {
        AuditRecord {
            seq: 1,
            time: Utc::now().to_rfc3339(),
            principal: "operator".into(),
            kind: "mode_change".into(),
            tool: None,
            arguments: None,
            mode: mode.into(),
            decision: "allowed".into(),
            reason_code: None,
            outcome: "changed".into(),
            detail: json!({"reason": "incident"}),
            expires_at: expires_at.map(|at| at.to_rfc3339()),
            prev_hash: String::new(),
            hash: String::new(),
            context: None,
            mac: None,
            policy_hash: None,
            role: None,
        }
    }

    #[test]
    fn an_elevated_mode_is_restored_only_when_trusted_in_time_and_within_the_cap() {
        let policy = policy();
        let now = Utc::now();
        let soon = Some(now + chrono::Duration::seconds(60));
        let record = mode_record("EMERGENCY", soon);
        assert!(matches!(
            restore_decision(&policy, &record, None, true, now),
            Restore::Restored(state) if state.reason.as_deref() == Some("incident")
        ));
        assert!(matches!(
            restore_decision(&policy, &record, Some("bad MAC"), true, now),
            Restore::Refused(why) if why.contains("bad MAC")
        ));
        assert!(matches!(
            restore_decision(&policy, &record, None, false, now),
            Restore::Refused(_)
        ));
        let past = mode_record("EMERGENCY", Some(now - chrono::Duration::seconds(1)));
        assert!(matches!(
            restore_decision(&policy, &past, None, true, now),
            Restore::Lapsed(_)
        ));
        let far = mode_record("EMERGENCY", Some(now + chrono::Duration::days(6)));
        assert!(matches!(
            restore_decision(&policy, &far, None, true, now),
            Restore::Capped { cap, .. } if cap == policy.max_elevated_ttl()
        ));
        assert!(matches!(
            restore_decision(&policy, &mode_record("GONE", soon), None, true, now),
            Restore::Lapsed(_)
        ));
        // The default mode comes back whatever the chain says about it.
        assert!(matches!(
            restore_decision(
                &policy,
                &mode_record("NORMAL", None),
                Some("bad"),
                false,
                now
            ),
            Restore::Restored(_)
        ));
    }

    #[tokio::test]
    async fn only_calls_from_earlier_epochs_that_the_new_mode_refuses_are_drained() {
        let registry = Arc::new(InFlightCalls::default());
        let old_active = registry.register(1, "restart_service", &json!({}));
        let _old_read = registry.register(1, "list_services", &json!({}));
        let _new_active = registry.register(2, "restart_service", &json!({}));
        assert_eq!(registry.len(), 3);
        let targets = registry.to_drain(2, |tool, _| tool == "list_services");
        assert_eq!(targets.len(), 1);
        old_active.set_intent_seq(7);
        old_active.set_outcome("executed");
        drop(old_active);
        let report = drain(targets, Duration::from_secs(10)).await;
        assert_eq!(
            report.drained,
            vec![DrainedCall {
                intent_seq: 7,
                tool: "restart_service".into(),
                outcome: "executed".into()
            }]
        );
        assert!(report.cancelled.is_empty());
        assert_eq!(registry.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_still_running_at_the_timeout_is_cancelled_and_waited_for() {
        let registry = Arc::new(InFlightCalls::default());
        let call = registry.register(0, "scale_fleet", &json!({"count": 3}));
        let targets = registry.to_drain(1, |_, _| false);
        // The call ends only once cancelled, as an upstream call does.
        let running = tokio::spawn(async move {
            call.cancelled().cancelled().await;
            call.set_outcome("cancelled");
            drop(call);
        });
        let report = drain(targets, Duration::from_secs(10)).await;
        running.await.expect("the call task ends");
        assert!(report.drained.is_empty());
        assert_eq!(report.cancelled.len(), 1);
        assert_eq!(report.cancelled[0].outcome, "cancelled");
        assert!(registry.is_empty());
    }
}
