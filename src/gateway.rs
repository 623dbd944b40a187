//! The one execution path every front end uses:
//! rate limit → decide (tool rules → arguments → constraints, [`crate::decision`]) → execute → audit.
//!
//! The mode lives behind a read-write lock ([`crate::mode`] holds the state
//! machine). A built-in tool call holds the read side from its decision until its
//! audit entry is queued, and a mode change holds the write side while it switches
//! and queues its own entry, so the audit trail's order is the order in which
//! decisions took effect. An upstream call is decided and registered as in flight
//! under the read side, its intent record is queued there too, and the lock is
//! released before the upstream is called: a switch to a mode that denies it waits
//! for it (up to `drain_timeout_seconds`) and then cancels it, so once a switch has
//! returned, nothing the new mode denies runs. No lock is held across I/O.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rmcp::model::CallToolResult;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::anchor::Anchoring;
use crate::audit::{
    AuditDecision, AuditEntry, AuditError, AuditLog, AuditRecord, DATA_FILE_MODE, Durability,
    EntryKind, Priority, Recovered, STORED_PREFIX_BYTES, create_private_dir, format_time,
    json_digest,
};
use crate::decision::{AllowedCall, ParsedCall, Verdict, decide_call};
use crate::infra::{CloudInfrastructure, InfraError, InfrastructureStatus, ServiceHealth};
pub use crate::mode::{DEFAULT_ELEVATED_TTL, MAX_REASON_LEN, ModeChange, ModeChangeError};
use crate::mode::{
    DrainReport, InFlightCall, InFlightCalls, ModeState, Restore, drain, validate_change,
};
use crate::policy::{Denial, ModeId, PolicyEngine, SharedPolicy};
use crate::principal::{Principal, Role};
use crate::rate_limit::RateLimiter;
use crate::reason::Reason;
use crate::text;
use crate::tools::{MAX_TOOL_NAME_LEN, ToolName};
use crate::upstream::call::{CallContext, UpstreamCalls};
use crate::upstream::client::UpstreamError;

mod guard_trail;
mod reload;
mod shadow;
pub use reload::{ModeFallback, ReloadError, ReloadReport, ReloadTrigger};
mod approvals;
pub use approvals::{ApprovalDecisionError, ElevationError};
mod shared_mode;

/// Name of the lock file that keeps two processes off one data dir.
pub const LOCK_FILE: &str = "proxi.lock";
/// Longest refusal message a tool-call record keeps, in bytes (messages may quote the caller's input).
const MAX_RECORDED_MESSAGE_BYTES: usize = 1024;

/// Failures of the gateway as a whole (not of one tool call).
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The audit trail cannot record, so nothing may run.
    #[error("the audit trail is unavailable; refusing to act without a record")]
    AuditUnavailable,
    /// The approval store failed, so a call that needs approval cannot run.
    #[error("the approval store is unavailable; calls that need approval are refused")]
    ApprovalsUnavailable,
    /// The approval store could not be opened.
    #[error(transparent)]
    Approvals(#[from] crate::approval::ApprovalError),
    /// Free disk space is below the reserve kept for operators, so agent calls are refused.
    #[error(
        "free disk space for the audit trail is below the operators' reserve; agent calls are refused until space is freed"
    )]
    AuditLowSpace,
    /// Opening the audit trail failed.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// Another process holds the data dir.
    #[error(
        "data dir {0} is in use by another proxi process (two writers would fork the audit chain)"
    )]
    DataDirBusy(PathBuf),
    /// The data dir or its lock file could not be opened.
    #[error("cannot use data dir {path}: {error}")]
    DataDir {
        /// The data dir.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
}

/// What happened to one tool call.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The tool ran and returned this result.
    Executed(Value),
    /// The policy refused the call.
    Denied {
        /// The decision.
        denial: Denial,
        /// Why, in words.
        message: String,
        /// What the caller could do instead.
        how_to_proceed: String,
    },
    /// No tool has the requested name.
    UnknownTool {
        /// Why, in words, listing the real tools.
        message: String,
    },
    /// The arguments do not match the tool's schema.
    InvalidArguments(String),
    /// The tool name contains control, bidi, zero-width or separator characters;
    /// nothing was looked up. The message shows the name escaped.
    InvalidToolName(String),
    /// The policy allowed the call but one of the mode's stateful guards refused it
    /// (cooldown, step too large, missing prior call); nothing ran.
    Guarded(crate::guards::GuardRefusal),
    /// The caller is over one of the policy's `rate_limits`; nothing was looked at.
    RateLimited {
        /// How long until the refusing bucket has room again.
        retry_after: Duration,
    },
    /// The tool ran and failed (e.g. an unknown service); nothing changed.
    Failed {
        /// Machine-readable error code.
        code: Reason,
        /// What went wrong.
        message: String,
    },
    /// An upstream ran the call and answered with this result, exactly as MCP
    /// defines it; an `isError` result is the upstream's own failure.
    Forwarded(CallToolResult),
    /// Several instances share the mode and it changed (on another instance)
    /// between this call's decision and its record: the call was recorded as
    /// refused and did not run.
    ModeChanged {
        /// What happened, naming the mode the call was decided in.
        message: String,
    },
    /// The call was allowed but no upstream result came back.
    UpstreamFailed {
        /// Why there is no result.
        failure: UpstreamFailure,
        /// What went wrong, naming the upstream, never a secret.
        message: String,
    },
    /// The policy allows the call only with a human's approval, and there is none
    /// to use (yet); it did not run.
    Approval(crate::approval::ApprovalAnswer),
}

/// Why an allowed upstream call has no result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// The upstream is down, could not be started, or its connection broke.
    Unavailable,
    /// The upstream did not answer within its `call_timeout_seconds`.
    Timeout,
    /// The upstream refused the request with a JSON-RPC error.
    Refused,
    /// The caller went away or cancelled, or a mode switch that denies the call
    /// ran out of `drain_timeout_seconds`.
    Cancelled,
}

impl UpstreamFailure {
    /// The reason code callers see.
    pub fn reason_code(self) -> Reason {
        match self {
            UpstreamFailure::Unavailable => Reason::UpstreamUnavailable,
            UpstreamFailure::Timeout => Reason::UpstreamTimeout,
            UpstreamFailure::Refused => Reason::UpstreamError,
            UpstreamFailure::Cancelled => Reason::Cancelled,
        }
    }

    /// The outcome its record carries: the reason's name where they agree,
    /// shorter names (kept as already in trails) for the other two.
    pub fn recorded_outcome(self) -> &'static str {
        match self {
            UpstreamFailure::Unavailable => "unavailable",
            UpstreamFailure::Timeout => "timeout",
            UpstreamFailure::Refused | UpstreamFailure::Cancelled => self.reason_code().as_str(),
        }
    }
}

impl Outcome {
    /// The reason code the API reports, if any.
    pub fn reason_code(&self) -> Option<Reason> {
        match self {
            Outcome::Executed(_) => None,
            Outcome::Denied { denial, .. } => Some(denial.reason),
            Outcome::UnknownTool { .. } => Some(Reason::UnknownTool),
            Outcome::InvalidArguments(_) => Some(Reason::InvalidArguments),
            Outcome::InvalidToolName(_) => Some(Reason::InvalidToolName),
            Outcome::RateLimited { .. } => Some(Reason::RateLimited),
            Outcome::Guarded(refusal) => Some(refusal.reason()),
            Outcome::Failed { code, .. } => Some(*code),
            Outcome::Forwarded(result) if result.is_error == Some(true) => {
                Some(UpstreamFailure::Refused.reason_code())
            }
            Outcome::Forwarded(_) => None,
            Outcome::UpstreamFailed { failure, .. } => Some(failure.reason_code()),
            Outcome::Approval(answer) => Some(answer.reason),
            Outcome::ModeChanged { .. } => Some(Reason::ModeChanged),
        }
    }

    /// For a rate-limited call or a guard's cooldown, the whole seconds to wait
    /// before retrying (at least 1), as `Retry-After` and `retry_after_seconds` report it.
    pub fn retry_after_seconds(&self) -> Option<u64> {
        let retry_after = match self {
            Outcome::RateLimited { retry_after } => Some(*retry_after),
            Outcome::Guarded(refusal) => refusal.retry_after(),
            _ => None,
        };
        retry_after.map(|retry_after| {
            retry_after
                .as_secs()
                .saturating_add(u64::from(retry_after.subsec_nanos() > 0))
                .max(1)
        })
    }

    /// Whether the policy refused the call (unknown tools included, as in the API).
    pub fn is_policy_violation(&self) -> bool {
        matches!(
            self,
            Outcome::Denied { .. } | Outcome::UnknownTool { .. } | Outcome::Guarded(_)
        )
    }
}

/// The full answer to one tool call.
#[derive(Clone, Debug, PartialEq)]
pub struct Execution {
    /// The tool name as requested.
    pub tool: String,
    /// The mode the call was decided in.
    pub mode: Arc<str>,
    /// What happened.
    pub outcome: Outcome,
    /// The call's position in the audit trail.
    pub audit_seq: u64,
}

/// The policy state: the mode in force, what it allows and blocks, and who
/// entered it when. Watched by the expiry task, the console and MCP; clients get
/// it as [`crate::api::PolicyStatus`].
#[derive(Clone, Debug, PartialEq)]
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
    /// ([`PolicyEngine::policy_hash`]).
    pub policy_hash: String,
}

/// Where the gateway keeps its state and how it records it.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Directory for the audit database, tokens and lock file.
    pub data_dir: PathBuf,
    /// How hard audit commits push to disk.
    pub durability: Durability,
    /// Free space (bytes) on the data dir's filesystem kept for operators; below it
    /// agent calls are refused. `None`: the audit log's scaled default.
    pub audit_reserve_bytes: Option<u64>,
}

/// The policy enforcement point shared by REST, MCP, the agent and the demo.
pub struct Gateway {
    /// The policy's rules bound to the current catalog; re-bound when an
    /// upstream's tools change. A call is decided wholly under one binding.
    policy: SharedPolicy,
    /// The policy's mode names, by `ModeId`; replaced with the policy on a reload,
    /// under the mode lock's write side.
    mode_names: RwLock<Arc<[Arc<str>]>>,
    state: RwLock<ModeState>,
    infra: Mutex<CloudInfrastructure>,
    audit: AuditLog,
    mode_events: watch::Sender<PolicyStatus>,
    /// Counts re-bindings of the policy to a new catalog, so the MCP front end can
    /// announce `notifications/tools/list_changed` after the list it serves changed.
    tools_changed: watch::Sender<u64>,
    /// Ticks whenever an upstream's health is reported (a start, a restart, a
    /// crash, a new listing), so the console shows it without being asked.
    upstream_health_changed: watch::Sender<u64>,
    /// The policy's `rate_limits`; rebuilt on a reload that changes them.
    rate_limiter: RwLock<RateLimiter>,
    metrics: crate::metrics::Metrics,
    data_dir: PathBuf,
    _data_dir_lock: File,
    /// Held by `set_mode` until its record is durable, so that a change whose
    /// record failed can be undone without undoing a later one.
    mode_changes: tokio::sync::Mutex<()>,
    /// Upstream calls decided but not yet recorded, for the drain on a mode switch.
    in_flight: Arc<InFlightCalls>,
    /// On a store whose mode row several instances share: the row's epoch that
    /// the in-memory state reflects (see `shared_mode.rs`). Moved only under the
    /// state's write lock, read under its read side.
    shared_epoch: AtomicU64,
    /// Where allowed upstream calls go; unset until the upstreams are attached
    /// (and then every upstream call is `upstream_unavailable`). A reload that
    /// changes the upstreams replaces it under the mode lock's write side, with the
    /// policy; a call takes it under the read side, with its decision.
    upstreams: RwLock<Option<Arc<dyn UpstreamCalls>>>,
    /// Starts and stops upstreams on a reload; unset: a reload that changes the
    /// upstreams is refused.
    upstream_manager: OnceLock<Arc<crate::upstream::attach::UpstreamManager>>,
    /// The file the policy was loaded from, for reloads (unset: nothing to reload).
    policy_source: OnceLock<crate::policy_source::PolicySource>,
    /// What ran, when and for whom, for the policy's stateful guards.
    guard_state: Mutex<crate::guards::GuardState>,
    /// `--shadow-policy`: decides every call a second time, for comparison only.
    shadow: OnceLock<SharedPolicy>,
    /// Requests for a human's approval (`require_approval`, elevation requests).
    approvals: approvals::Approvals,
}

/// What a mode change did: the policy state after it, and the in-flight upstream
/// calls it had to wait for or cancel.
#[derive(Clone, Debug, PartialEq)]
pub struct ModeSwitch {
    /// The policy state after the change.
    pub status: PolicyStatus,
    /// The calls decided under the previous mode that the new one denies.
    pub drain: DrainReport,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

fn lock_data_dir(data_dir: &Path) -> Result<File, GatewayError> {
    let io_error = |error| GatewayError::DataDir {
        path: data_dir.to_owned(),
        error,
    };
    create_private_dir(data_dir).map_err(io_error)?;
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(DATA_FILE_MODE)
        .open(data_dir.join(LOCK_FILE))
        .map_err(io_error)?;
    // A lock file left by an older version may be world-readable.
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(DATA_FILE_MODE))
        .map_err(io_error)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(GatewayError::DataDirBusy(data_dir.to_owned()))
        }
        Err(std::fs::TryLockError::Error(error)) => Err(io_error(error)),
    }
}

/// What the gateway may trust at startup: where the audit key and anchor live, and
/// whether an elevated mode found in the trail may be restored at all.
#[derive(Clone, Debug)]
pub struct StartupTrust {
    /// The audit key and anchor (see [`crate::anchor`]).
    pub anchoring: Anchoring,
    /// False when no operator could have declared an elevated mode in this
    /// configuration (`proxi mcp` without an operator credential): then an elevated
    /// mode in the trail is never restored, however valid it looks.
    pub restore_elevated: bool,
}

impl Gateway {
    /// Opens the data dir, restores the mode from the audit trail and starts the expiry task.
    /// The audit key and anchor live in the data dir (see [`Gateway::open_with`]).
    ///
    /// Must be called inside a Tokio runtime.
    pub async fn open(
        policy: PolicyEngine,
        config: GatewayConfig,
    ) -> Result<Arc<Gateway>, GatewayError> {
        let lock = lock_data_dir(&config.data_dir)?;
        let anchoring = Anchoring::in_data_dir(&config.data_dir).map_err(AuditError::from)?;
        let trust = StartupTrust {
            anchoring,
            restore_elevated: true,
        };
        Gateway::open_locked(policy, config, trust, lock, None).await
    }

    /// Like [`Gateway::open`], with the audit key, anchor and restore rule given.
    pub async fn open_with(
        policy: PolicyEngine,
        config: GatewayConfig,
        trust: StartupTrust,
    ) -> Result<Arc<Gateway>, GatewayError> {
        let lock = lock_data_dir(&config.data_dir)?;
        Gateway::open_locked(policy, config, trust, lock, None).await
    }

    /// Like [`Gateway::open_with`], with the audit trail kept in `store` (a shared
    /// PostgreSQL store) rather than in the data dir's SQLite database, and the
    /// approvals in `approvals` (the same shared store, so that an approval given on
    /// one instance is consumed once on any).
    pub async fn open_with_store(
        policy: PolicyEngine,
        config: GatewayConfig,
        trust: StartupTrust,
        store: Arc<dyn crate::audit::AuditStore>,
        approvals: Arc<dyn crate::approval::ApprovalStore>,
    ) -> Result<Arc<Gateway>, GatewayError> {
        let lock = lock_data_dir(&config.data_dir)?;
        Gateway::open_locked(policy, config, trust, lock, Some((store, approvals))).await
    }

    async fn open_locked(
        policy: PolicyEngine,
        config: GatewayConfig,
        trust: StartupTrust,
        lock: File,
        shared: Option<(
            Arc<dyn crate::audit::AuditStore>,
            Arc<dyn crate::approval::ApprovalStore>,
        )>,
    ) -> Result<Arc<Gateway>, GatewayError> {
        let ((audit, recovered), approval_store) = match shared {
            Some((store, approvals)) => (AuditLog::open_store(store, trust.anchoring)?, approvals),
            None => {
                // The data dir may be the agent's to write (`proxi mcp`): decisions
                // are sealed with the audit key, and where no operator can decide
                // (no credential under `proxi mcp`) no approved row is trusted.
                let seal = if trust.restore_elevated {
                    crate::approval::DecisionSeal::Keyed(trust.anchoring.key().clone())
                } else {
                    crate::approval::DecisionSeal::NoOperator
                };
                let local: Arc<dyn crate::approval::ApprovalStore> = Arc::new(
                    crate::approval::sqlite::SqliteApprovals::open(&config.data_dir, seal)?,
                );
                (
                    AuditLog::open_anchored(&config.data_dir, config.durability, trust.anchoring)?,
                    local,
                )
            }
        };
        if let Some(bytes) = config.audit_reserve_bytes {
            audit.set_space_reserve(bytes);
        }
        let mode_names = mode_names_of(&policy);
        let now = Utc::now();
        let initial = ModeState::initial(
            policy.default_mode(),
            Principal::system().name().clone(),
            now,
        );
        let (mode_events, _) = watch::channel(PolicyStatus {
            mode: String::new(),
            description: String::new(),
            allowed_tools: Vec::new(),
            blocked_tools: Vec::new(),
            always_blocked: Vec::new(),
            emergency_expires_at: None,
            default_mode: String::new(),
            available_modes: Vec::new(),
            reason: None,
            changed_by: String::new(),
            changed_at: String::new(),
            policy_hash: String::new(),
        });
        let rate_limiter = RateLimiter::new(policy.rate_limits());
        let metrics = crate::metrics::Metrics::new(audit.metrics());
        let gateway = Arc::new(Gateway {
            policy: SharedPolicy::new(policy),
            mode_names: RwLock::new(mode_names),
            state: RwLock::new(initial),
            infra: Mutex::new(CloudInfrastructure::new()),
            audit,
            mode_events,
            tools_changed: watch::Sender::new(0),
            upstream_health_changed: watch::Sender::new(0),
            rate_limiter: RwLock::new(rate_limiter),
            metrics,
            data_dir: config.data_dir,
            _data_dir_lock: lock,
            mode_changes: tokio::sync::Mutex::new(()),
            in_flight: Arc::new(InFlightCalls::default()),
            shared_epoch: AtomicU64::new(0),
            upstreams: RwLock::new(None),
            upstream_manager: OnceLock::new(),
            policy_source: OnceLock::new(),
            shadow: OnceLock::new(),
            guard_state: Mutex::new(crate::guards::GuardState::default()),
            approvals: approvals::Approvals::new(approval_store),
        });
        gateway
            .restore_mode(recovered, trust.restore_elevated)
            .await?;
        gateway.rebuild_guard_state()?;
        if gateway.audit.store().shares_mode() {
            // The row, not the restored record, is the truth on a shared store.
            gateway.sync_shared_mode().await?;
            shared_mode::spawn_watcher(Arc::downgrade(&gateway));
        }
        gateway.mode_events.send_replace(gateway.status());
        spawn_expiry_task(Arc::downgrade(&gateway), gateway.mode_events.subscribe());
        // Takes back decisions a crash left half-made, then expires (and records)
        // what lapsed while Proxi was down, then each on time.
        gateway.revert_stranded_decisions(true).await;
        gateway.expire_due_approvals().await;
        gateway.approvals_changed().await;
        approvals::spawn_approval_expiry_task(Arc::downgrade(&gateway));
        Ok(gateway)
    }

    /// Puts back the mode the trail last recorded, unless it has lapsed meanwhile.
    ///
    /// An elevated mode is restored only from a record that checks out (its hash and
    /// MAC, and the chain from it to the newest record), only if `restore_elevated`,
    /// and for at most the policy's current `max_emergency_ttl_seconds`. Otherwise the
    /// gateway starts in the default mode and records why.
    async fn restore_mode(
        &self,
        recovered: Recovered,
        restore_elevated: bool,
    ) -> Result<(), GatewayError> {
        let Some(record) = recovered.last_mode_event else {
            return Ok(());
        };
        let decision = crate::mode::restore_decision(
            &self.policy(),
            &record,
            recovered.mode_event_problem.as_deref(),
            restore_elevated,
            Utc::now(),
        );
        let state = match decision {
            Restore::Refused(why) => {
                tracing::warn!(%why, "the recorded elevated mode is not restored; starting in the default mode");
                return self.record_restore_refusal(&record, &why).await;
            }
            Restore::Lapsed(why) => {
                tracing::info!(%why, "the recorded mode has lapsed; starting in the default mode");
                return self.record_restore_lapse(&record, why).await;
            }
            Restore::Capped {
                state,
                capped_at,
                cap,
            } => {
                // Recorded, so that later restarts start from the capped deadline.
                self.record_restore_cap(&record, &state, capped_at, cap)
                    .await?;
                state
            }
            Restore::Restored(state) => state,
        };
        self.state
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .switch(state);
        Ok(())
    }

    /// Records that an elevated mode was not restored, and why; the gateway stays in the default mode.
    async fn record_restore_refusal(
        &self,
        record: &AuditRecord,
        why: &str,
    ) -> Result<(), GatewayError> {
        let default = self.policy().default_mode();
        let detail = json!({"from": record.mode, "restore_from_seq": record.seq, "reason": why});
        self.append_system_mode_record(
            EntryKind::ModeExpired,
            default,
            "not_restored",
            detail,
            None,
        )
        .await
    }

    /// Records an elevated mode restored with its time left cut to the policy's cap.
    async fn record_restore_cap(
        &self,
        record: &AuditRecord,
        state: &ModeState,
        capped_at: DateTime<Utc>,
        cap: Duration,
    ) -> Result<(), GatewayError> {
        let detail = json!({
            "from": record.mode,
            "reason": state.reason,
            "ttl_seconds": cap.as_secs(),
            "restore_from_seq": record.seq,
            "note": "time left cut to the policy's max_emergency_ttl_seconds at restart",
        });
        self.append_system_mode_record(
            EntryKind::ModeChange,
            state.mode,
            "restored_capped",
            detail,
            Some(capped_at),
        )
        .await
    }

    async fn record_restore_lapse(
        &self,
        record: &AuditRecord,
        why: &str,
    ) -> Result<(), GatewayError> {
        if record.mode == self.mode_name(self.policy().default_mode()).as_ref() {
            return Ok(());
        }
        let default = self.policy().default_mode();
        let detail = json!({"from": record.mode, "reason": why});
        self.append_system_mode_record(EntryKind::ModeExpired, default, "expired", detail, None)
            .await
    }

    /// Records a mode event the system itself caused at startup (a restore
    /// refused, capped or lapsed), as an essential record, and waits until it is durable.
    async fn append_system_mode_record(
        &self,
        kind: EntryKind,
        mode: ModeId,
        outcome: &'static str,
        detail: Value,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<(), GatewayError> {
        let entry = AuditEntry {
            time: Utc::now(),
            principal: Principal::system(),
            kind,
            tool: None,
            arguments: None,
            mode: self.mode_name(mode).clone(),
            decision: AuditDecision::Allowed,
            reason_code: None,
            outcome,
            detail,
            expires_at,
            context: None,
            policy_hash: self.policy_version(),
        };
        self.append(entry, Priority::Essential).await
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<PolicyEngine> {
        self.policy.current()
    }

    /// Binds the policy's rules to `catalog` (an upstream's tools changed, or an
    /// upstream listed them for the first time); calls decided from now on see it.
    pub fn rebind(&self, catalog: Arc<crate::catalog::Catalog>) {
        if let Some(shadow) = self.shadow.get() {
            shadow.rebind(Arc::clone(&catalog));
        }
        self.policy.rebind(catalog);
        self.mode_events.send_replace(self.status());
        // After the swap: whoever hears of the change and re-lists sees the new tools.
        self.tools_changed
            .send_modify(|count| *count = count.wrapping_add(1));
    }

    /// Sets `proxi_upstream_up{upstream}` (1 up, 0 down) for the metrics scrape,
    /// and ticks [`Gateway::upstream_health_changes`].
    pub fn set_upstream_up(&self, upstream: &str, up: bool) {
        self.metrics.set_upstream_up(upstream, up);
        self.upstream_health_changed
            .send_modify(|count| *count = count.wrapping_add(1));
    }

    /// Ticks after every report of an upstream's health; read the health itself
    /// with [`Gateway::upstream_health`].
    pub fn upstream_health_changes(&self) -> watch::Receiver<u64> {
        self.upstream_health_changed.subscribe()
    }

    /// Ticks after every [`Gateway::rebind`]: the catalog (hence `tools/list` and
    /// `/tools/catalog`) may have changed.
    pub fn tools_changed(&self) -> watch::Receiver<u64> {
        self.tools_changed.subscribe()
    }

    /// The data dir this gateway owns.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The audit trail.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// The name of `mode`, a `ModeId` of the policy in force. Both are replaced
    /// together under the mode lock's write side, so a caller holding the read side
    /// gets the right name; a stale id (never expected) gets the default mode's.
    fn mode_name(&self, mode: ModeId) -> Arc<str> {
        let names = self
            .mode_names
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        names
            .get(mode.index())
            .or_else(|| names.first())
            .cloned()
            .unwrap_or_else(|| Arc::from(""))
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, ModeState> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Validates, decides, runs and records one tool call, for a caller with no
    /// MCP peer and no way to cancel ([`CallContext::detached`]).
    pub async fn execute(
        self: &Arc<Self>,
        principal: &Principal,
        tool_name: &str,
        arguments: Value,
    ) -> Result<Execution, GatewayError> {
        self.execute_call(
            principal,
            tool_name,
            arguments,
            None,
            &CallContext::detached(),
        )
        .await
    }

    /// [`Gateway::execute`], recording the caller's free-form `context` (bounded) too.
    pub async fn execute_with_context(
        self: &Arc<Self>,
        principal: &Principal,
        tool_name: &str,
        arguments: Value,
        context: Option<Value>,
    ) -> Result<Execution, GatewayError> {
        self.execute_call(
            principal,
            tool_name,
            arguments,
            context,
            &CallContext::detached(),
        )
        .await
    }

    /// Validates, decides, runs and records one tool call on behalf of the caller
    /// described by `call_context`: an upstream call is cancelled when its
    /// `cancel` fires, and the upstream's traffic during the call goes to its peer.
    ///
    /// A built-in tool runs under the mode lock and gets one record. An upstream
    /// call is registered as in flight under the mode's epoch and gets an intent
    /// record (`allowed`, outcome `pending`) that is durable before anything is
    /// forwarded; the lock is released before the upstream is called, and a second
    /// record with the outcome refers to the intent by seq.
    pub async fn execute_call(
        self: &Arc<Self>,
        principal: &Principal,
        tool_name: &str,
        arguments: Value,
        context: Option<Value>,
        call_context: &CallContext,
    ) -> Result<Execution, GatewayError> {
        self.execute_routed(principal, tool_name, arguments, context, call_context, None)
            .await
    }

    /// The one execution path. `upstream_route`, when given, sends a call the
    /// decision allows to that upstream instead of the simulated cloud: the seam
    /// through which the in-process tests drive the upstream branch with the
    /// built-in tools' decisions.
    async fn execute_routed(
        self: &Arc<Self>,
        principal: &Principal,
        tool_name: &str,
        arguments: Value,
        context: Option<Value>,
        call_context: &CallContext,
        upstream_route: Option<UpstreamCall>,
    ) -> Result<Execution, GatewayError> {
        let started = Instant::now();
        let tool = ToolName::parse(tool_name);
        let metric_label = self.metric_label(tool, tool_name);
        let priority = audit_priority(principal);
        // Before anything runs: a call whose record were refused would act unrecorded.
        self.audit.admit(priority).map_err(|error| match error {
            AuditError::LowSpace => GatewayError::AuditLowSpace,
            _ => GatewayError::AuditUnavailable,
        })?;
        // The rate limit comes before any other work, so a flood costs one bucket
        // check and one small record per call.
        let limited = self
            .rate_limiter
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .check(principal, tool);
        if let Err(retry_after) = limited {
            let refused = self
                .refuse_rate_limited(principal, tool_name, retry_after)
                .await;
            if let Ok(execution) = &refused {
                self.metrics.tool_call_labelled(
                    metric_label,
                    &execution.outcome,
                    started.elapsed(),
                );
            }
            return refused;
        }
        let invalid_name = tool_name.chars().any(text::needs_escape);
        let shown_name = shown_tool_name(tool_name);
        // Argument checks need no lock: they depend on the call alone.
        let parsed_under = self.policy();
        let parsed_early = ParsedCall::parse(&parsed_under, tool_name, &arguments);
        // The approval step, only when some mode asks for approvals at all.
        let mut approval = None;
        if parsed_under.has_approval_rules() {
            match self
                .approval_gate(
                    principal,
                    &parsed_under,
                    &parsed_early,
                    &shown_name,
                    &arguments,
                )
                .await?
            {
                approvals::Gate::NotNeeded => {}
                approvals::Gate::Consumed(consumed) => approval = Some(consumed),
                approvals::Gate::Answer(answer, mode_id) => {
                    let outcome = Outcome::Approval(answer);
                    let mode = self.mode_name(mode_id).clone();
                    let pending = {
                        // Queued under the mode lock, like every decision.
                        let _state = self.read_state();
                        let mut entry = tool_call_entry(
                            principal,
                            &shown_name,
                            arguments,
                            &mode,
                            &outcome,
                            Utc::now(),
                        );
                        entry.context = context;
                        entry.policy_hash = Some(Arc::from(parsed_under.policy_hash()));
                        self.audit.submit_with(entry, priority)
                    };
                    let audit_seq = pending
                        .durable()
                        .await
                        .map_err(|_| GatewayError::AuditUnavailable)?;
                    self.metrics
                        .tool_call_labelled(metric_label, &outcome, started.elapsed());
                    return Ok(Execution {
                        tool: shown_name,
                        mode,
                        outcome,
                        audit_seq,
                    });
                }
            }
        }
        // On a shared store a decision that depends on the mode is checked against
        // the shared mode row when its record commits; before that, it must not act.
        let shared = self.audit.store().shares_mode();
        let now = Utc::now();
        let (pending, mode, step, disagreed) = {
            let state = self.read_state();
            // A reload swaps the policy under the write side: if one came between the
            // parse and here, parse again, so the call is decided wholly under the
            // policy in force (and its ModeIds match the state's).
            let current = self.policy();
            let (policy, parsed) = if current.same_rules(&parsed_under) {
                (parsed_under, parsed_early)
            } else {
                let reparsed = ParsedCall::parse(&current, tool_name, &arguments);
                (current, reparsed)
            };
            let epoch_checked = shared && !allowed_in_every_mode(&policy, tool_name, &arguments);
            let decided_epoch = epoch_checked.then(|| self.shared_epoch.load(Ordering::Acquire));
            let mode_id = state.effective_mode(Instant::now(), policy.default_mode());
            // Decided again under the lock: a call that needs approval and has none
            // (the mode changed since the approval step) does not run.
            let missed_approval = approval.is_none()
                && policy.has_approval_rules()
                && approvals::needs_approval(&policy, mode_id, parsed.clone());
            let verdict = parsed.decide(&policy, mode_id);
            let decided = shadow::DecisionClass::of(&verdict);
            // Checked and noted under one lock, so two calls cannot both pass a
            // cooldown; taken only when the policy has guards.
            let mut guard_state = policy.has_guards().then(|| {
                self.guard_state
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
            });
            let guard_refusal = match (&verdict, &guard_state) {
                (Verdict::Allow(_), Some(state)) => state
                    .check(
                        policy.guards(mode_id),
                        principal.name(),
                        tool_name,
                        &arguments,
                        now,
                        || self.infrastructure_status().fleet_size,
                    )
                    .err(),
                _ => None,
            };
            let step = match verdict {
                Verdict::Allow(_) if missed_approval => Step::Done(Outcome::Approval(
                    crate::approval::ApprovalAnswer::changed_meanwhile(),
                )),
                Verdict::Allow(_) if let Some(refusal) = guard_refusal => {
                    Step::Done(Outcome::Guarded(refusal))
                }
                Verdict::UnknownTool if invalid_name => {
                    Step::Done(Outcome::InvalidToolName(format!(
                        "Tool name '{}' contains control, bidi, zero-width or line-separator characters; no tool has such a name. Known tools: {}",
                        text::escape(truncate(tool_name, MAX_TOOL_NAME_LEN)),
                        crate::catalog::listed_names(&policy).join(", ")
                    )))
                }
                Verdict::UnknownTool => Step::Done(Outcome::UnknownTool {
                    message: format!(
                        "Tool '{}' does not exist. Known tools: {}",
                        truncate(tool_name, MAX_TOOL_NAME_LEN),
                        crate::catalog::listed_names(&policy).join(", ")
                    ),
                }),
                Verdict::InvalidArguments(error) => {
                    Step::Done(Outcome::InvalidArguments(error.to_string()))
                }
                Verdict::Deny(denial) => Step::Done(Outcome::Denied {
                    message: policy.explain(&denial),
                    how_to_proceed: policy.how_to_proceed(&denial),
                    denial,
                }),
                // Registered under the lock, so no switch slips in between.
                Verdict::Allow(_) if let Some(route) = upstream_route => Step::Forward(
                    route,
                    self.in_flight.register(state.epoch, tool_name, &arguments),
                    self.upstream_routes(),
                ),
                Verdict::Allow(AllowedCall::Upstream {
                    upstream,
                    tool,
                    arguments: checked,
                }) => Step::Forward(
                    UpstreamCall {
                        upstream,
                        tool,
                        arguments: checked,
                    },
                    self.in_flight.register(state.epoch, tool_name, &arguments),
                    self.upstream_routes(),
                ),
                // Write-ahead: run only once the intent committed under this epoch.
                Verdict::Allow(AllowedCall::Builtin(call)) if decided_epoch.is_some() => {
                    Step::RunAfterIntent(
                        call,
                        self.in_flight.register(state.epoch, tool_name, &arguments),
                    )
                }
                Verdict::Allow(AllowedCall::Builtin(call)) => {
                    let result = self
                        .infra
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .execute(&call, now);
                    Step::Done(match result {
                        Ok(result) => Outcome::Executed(result),
                        Err(error) => Outcome::Failed {
                            code: error.reason(),
                            message: error.to_string(),
                        },
                    })
                }
            };
            if let Some(state) = guard_state.as_mut()
                && matches!(step, Step::Done(Outcome::Executed(_)) | Step::Forward(..))
            {
                state.note_run(
                    policy.all_guards(),
                    principal.name(),
                    tool_name,
                    &arguments,
                    now,
                );
            }
            drop(guard_state);
            let mode = self.mode_name(mode_id).clone();
            // Decided under the shadow too before the record exists, so that the
            // record that decided carries a disagreement (pure; no shadow: skipped).
            let shadow_decision = self.shadow_disagreement(&mode, tool_name, &arguments, decided);
            let mut entry = match &step {
                Step::Done(outcome) => {
                    tool_call_entry(principal, &shown_name, arguments, &mode, outcome, now)
                }
                Step::Forward(route, ..) => {
                    upstream_intent_entry(principal, &shown_name, arguments, &mode, route, now)
                }
                Step::RunAfterIntent(..) => {
                    builtin_intent_entry(principal, &shown_name, arguments, &mode, now)
                }
            };
            entry.context = context;
            // The hash of the very engine that decided, not of a later reload.
            entry.policy_hash = Some(Arc::from(policy.policy_hash()));
            if let Some(approval) = &approval {
                entry.detail = approvals::with_approval(entry.detail, approval);
            }
            let disagreed = shadow_decision.is_some();
            if let Some(shadowed) = shadow_decision {
                entry.detail = shadow::with_shadow_decision(entry.detail, shadowed);
            }
            let decided_epoch = decided_epoch.filter(|_| !matches!(step, Step::Done(_)));
            if let (Some(epoch), Some(detail)) = (decided_epoch, entry.detail.as_object_mut()) {
                detail.insert("decided_epoch".to_owned(), json!(epoch));
            }
            (
                self.audit.submit_decided(entry, priority, decided_epoch),
                mode,
                step,
                disagreed,
            )
        };
        let audit_seq = match pending.durable().await {
            Ok(seq) => seq,
            Err(AuditError::ModeChanged(seq)) => {
                // Nothing ran; learn the mode that is in force now.
                let gateway = self.clone();
                tokio::spawn(async move {
                    if let Err(error) = gateway.sync_shared_mode().await {
                        tracing::warn!(%error, "cannot read the shared mode");
                    }
                });
                let outcome = Outcome::ModeChanged {
                    message: format!(
                        "the mode changed on another Proxi instance after this call was decided in {mode} mode; it was refused and did not run"
                    ),
                };
                self.metrics
                    .tool_call_labelled(metric_label, &outcome, started.elapsed());
                return Ok(Execution {
                    tool: shown_name,
                    mode,
                    outcome,
                    audit_seq: seq,
                });
            }
            Err(_) => return Err(GatewayError::AuditUnavailable),
        };
        if disagreed {
            self.metrics.shadow_disagreement();
        }
        match step {
            Step::Done(outcome) => {
                // After the durable record and off the mode lock; allocation-free.
                self.metrics
                    .tool_call_labelled(metric_label, &outcome, started.elapsed());
                Ok(Execution {
                    tool: shown_name,
                    mode,
                    outcome,
                    audit_seq,
                })
            }
            Step::RunAfterIntent(call, in_flight) => {
                in_flight.set_intent_seq(audit_seq);
                let execution = self
                    .run_after_intent(principal, shown_name, mode, audit_seq, call, in_flight)
                    .await?;
                self.metrics.tool_call_labelled(
                    metric_label,
                    &execution.outcome,
                    started.elapsed(),
                );
                Ok(execution)
            }
            Step::Forward(route, in_flight, routes) => {
                in_flight.set_intent_seq(audit_seq);
                let execution = self
                    .forward(
                        principal,
                        shown_name,
                        mode,
                        audit_seq,
                        (route, routes),
                        in_flight,
                        call_context,
                    )
                    .await?;
                self.metrics.tool_call_labelled(
                    metric_label,
                    &execution.outcome,
                    started.elapsed(),
                );
                Ok(execution)
            }
        }
    }

    /// The `tool` label of a call's metrics: a built-in's name, an upstream tool's
    /// exposed name when the catalog lists it (bounded by the policy and the
    /// upstreams' listings, and capped), else `other`.
    fn metric_label(&self, tool: Option<ToolName>, tool_name: &str) -> &'static str {
        match tool {
            Some(tool) => tool.as_str(),
            None if self.policy().catalog().lookup(tool_name).is_some() => {
                self.metrics.upstream_tool_label(tool_name)
            }
            None => crate::metrics::OTHER_TOOL,
        }
    }

    /// Forwards an allowed upstream call whose intent is durable, and records its
    /// outcome. The call runs in a task of its own: if the caller goes away (its
    /// request future dropped, which fires its cancellation), the call is still
    /// cancelled upstream and its outcome recorded.
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        self: &Arc<Self>,
        principal: &Principal,
        tool: String,
        mode: Arc<str>,
        intent_seq: u64,
        (route, routes): (UpstreamCall, Option<Arc<dyn UpstreamCalls>>),
        in_flight: InFlightCall,
        call_context: &CallContext,
    ) -> Result<Execution, GatewayError> {
        let gateway = self.clone();
        let principal = principal.clone();
        let upstream_context = CallContext {
            cancel: call_context.cancel.child_token(),
            caller: call_context.caller.clone(),
        };
        let task = tokio::spawn(async move {
            let outcome =
                call_upstream(routes.as_deref(), &route, &in_flight, &upstream_context).await;
            in_flight.set_outcome(recorded_outcome(&outcome));
            let entry = upstream_outcome_entry(&principal, &tool, &mode, intent_seq, &outcome);
            // Essential: the intent was admitted, so its outcome must not be refused.
            let recorded = gateway.audit.append_with(entry, Priority::Essential).await;
            // Only now may a switch waiting for this call go on.
            drop(in_flight);
            let audit_seq = recorded.map_err(|_| GatewayError::AuditUnavailable)?;
            Ok(Execution {
                tool,
                mode,
                outcome,
                audit_seq,
            })
        });
        task.await.unwrap_or(Err(GatewayError::AuditUnavailable))
    }

    /// Runs an allowed built-in whose intent record is durable (on a shared store:
    /// committed under the epoch it was decided in), then records its outcome, which
    /// refers to the intent by seq. A switch that cancelled it meanwhile stops it
    /// before it runs.
    async fn run_after_intent(
        &self,
        principal: &Principal,
        tool: String,
        mode: Arc<str>,
        intent_seq: u64,
        call: crate::tools::ToolCall,
        in_flight: InFlightCall,
    ) -> Result<Execution, GatewayError> {
        let now = Utc::now();
        let outcome = if in_flight.cancelled().is_cancelled() {
            Outcome::Failed {
                code: Reason::Cancelled,
                message: "cancelled: the mode changed to one that denies this call before it ran"
                    .to_owned(),
            }
        } else {
            let result = self
                .infra
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .execute(&call, now);
            match result {
                Ok(result) => Outcome::Executed(result),
                Err(error) => Outcome::Failed {
                    code: error.reason(),
                    message: error.to_string(),
                },
            }
        };
        let mut entry = tool_call_entry(principal, &tool, Value::Null, &mode, &outcome, now);
        entry.arguments = None;
        entry.detail = json!({
            crate::audit_view::INTENT_SEQ: intent_seq,
            "result": entry.detail,
        });
        in_flight.set_outcome(entry.outcome);
        // Essential: the intent was admitted, so its outcome must not be refused.
        let recorded = self.audit.append_with(entry, Priority::Essential).await;
        // Only now may a switch waiting for this call go on.
        drop(in_flight);
        let audit_seq = recorded.map_err(|_| GatewayError::AuditUnavailable)?;
        Ok(Execution {
            tool,
            mode,
            outcome,
            audit_seq,
        })
    }

    /// The intent seqs of the upstream calls in flight (their outcome is not yet recorded).
    pub fn in_flight_intents(&self) -> Vec<u64> {
        self.in_flight.intent_seqs()
    }

    /// The attached upstreams' state (see [`UpstreamCalls::health`]), in name
    /// order; empty when the policy declares none.
    pub fn upstream_health(&self) -> Vec<crate::upstream::set::UpstreamStatus> {
        self.upstream_routes()
            .map(|upstreams| upstreams.health())
            .unwrap_or_default()
    }

    /// Sends allowed upstream calls to `upstreams` from now on. Returns false (and
    /// changes nothing) if upstreams were attached already.
    pub fn attach_upstreams(&self, upstreams: Arc<dyn UpstreamCalls>) -> bool {
        let mut attached = self
            .upstreams
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if attached.is_some() {
            return false;
        }
        *attached = Some(upstreams);
        true
    }

    /// Lets reloads start, stop and restart upstreams through `manager` (see
    /// `gateway/reload.rs`). Returns false (and changes nothing) if one was set already.
    pub fn manage_upstreams(&self, manager: Arc<crate::upstream::attach::UpstreamManager>) -> bool {
        self.upstream_manager.set(manager).is_ok()
    }

    /// The upstream routes in force; taken under the mode lock's read side with
    /// the decision, so a call goes to the upstreams its catalog was listed from.
    fn upstream_routes(&self) -> Option<Arc<dyn UpstreamCalls>> {
        self.upstreams
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Records and answers a call refused by a rate limit.
    ///
    /// The record is small whatever the request was: the tool name bounded and
    /// escaped, no arguments, a fixed detail. A flood of refusals cannot fill the
    /// disk faster than a flood of the smallest valid calls.
    async fn refuse_rate_limited(
        &self,
        principal: &Principal,
        tool_name: &str,
        retry_after: Duration,
    ) -> Result<Execution, GatewayError> {
        let shown_name = shown_tool_name(tool_name);
        let outcome = Outcome::RateLimited { retry_after };
        // Queued under the mode lock like any call, so the trail's order stays the
        // order in which modes took effect.
        let (pending, mode) = {
            let state = self.read_state();
            let mode_id = state.effective_mode(Instant::now(), self.policy().default_mode());
            let mode = self.mode_name(mode_id).clone();
            let mut entry = tool_call_entry(
                principal,
                &shown_name,
                Value::Null,
                &mode,
                &outcome,
                Utc::now(),
            );
            entry.arguments = None;
            entry.policy_hash = self.policy_version();
            (
                self.audit.submit_with(entry, audit_priority(principal)),
                mode,
            )
        };
        let audit_seq = pending
            .durable()
            .await
            .map_err(|_| GatewayError::AuditUnavailable)?;
        Ok(Execution {
            tool: shown_name,
            mode,
            outcome,
            audit_seq,
        })
    }

    /// Changes the mode on an operator's behalf and records it; see
    /// [`Gateway::switch_mode`] for the calls it waits for.
    pub async fn set_mode(
        &self,
        principal: &Principal,
        change: ModeChange,
    ) -> Result<PolicyStatus, ModeChangeError> {
        self.switch_mode(principal, change)
            .await
            .map(|switch| switch.status)
    }

    /// Changes the mode on an operator's behalf, records it, then waits for the
    /// upstream calls decided under the previous mode that the new one denies: up to
    /// the policy's `drain_timeout_seconds`, after which it cancels the rest and
    /// waits until their `cancelled` outcome is recorded. When there were such
    /// calls, a `mode_drained` record lists them. Returns only after that, so once
    /// it has returned no call the new mode denies is running or will start.
    pub async fn switch_mode(
        &self,
        principal: &Principal,
        change: ModeChange,
    ) -> Result<ModeSwitch, ModeChangeError> {
        if principal.role() != Role::Operator {
            return Err(ModeChangeError::NotOperator);
        }
        // Validated under the lock a reload also takes, so the target's ModeId is the
        // policy's in force.
        let _one_change_at_a_time = self.mode_changes.lock().await;
        let change = validate_change(&self.policy(), change)?;
        let (target, reason, ttl) = (change.target, change.reason, change.ttl);
        let target_name = self.mode_name(target).clone();
        if self.audit.admit(Priority::Essential).is_err() {
            return Err(ModeChangeError::AuditUnavailable);
        }
        let now = Utc::now();
        let (pending, replaced, to_drain) = {
            let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
            let previous = state.effective_mode(Instant::now(), self.policy().default_mode());
            let expires = ttl.map(|ttl| {
                let wall =
                    now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::zero());
                (Instant::now() + ttl, wall)
            });
            let replaced = state.switch(ModeState {
                mode: target,
                expires,
                reason: reason.clone(),
                changed_by: principal.name().clone(),
                changed_at: now,
                epoch: 0,
            });
            // Its record bumps the shared row's epoch; decisions queued behind it carry the next one.
            let replaced_shared_epoch = self.shared_epoch.fetch_add(1, Ordering::AcqRel);
            let to_drain = self.in_flight.to_drain(state.epoch, |tool, arguments| {
                self.would_allow(target, tool, arguments)
            });
            let pending = self.audit.submit_with(
                AuditEntry {
                    time: now,
                    principal: principal.clone(),
                    kind: EntryKind::ModeChange,
                    tool: None,
                    arguments: None,
                    mode: target_name.clone(),
                    decision: AuditDecision::Allowed,
                    reason_code: None,
                    outcome: "changed",
                    detail: json!({
                        "from": self.mode_name(previous).as_ref(),
                        "reason": reason,
                        "ttl_seconds": ttl.map(|ttl| ttl.as_secs()),
                    }),
                    expires_at: expires.map(|(_, wall)| wall),
                    context: None,
                    policy_hash: self.policy_version(),
                },
                Priority::Essential,
            );
            (pending, (replaced, replaced_shared_epoch), to_drain)
        };
        let change_seq = match pending.durable().await {
            Ok(seq) => seq,
            Err(_) => {
                self.undo_unrecorded_mode_change(principal, now, replaced);
                return Err(ModeChangeError::AuditUnavailable);
            }
        };
        self.mode_events.send_replace(self.status());
        self.metrics.mode_changed();
        let drain = self
            .drain_and_record(principal, &target_name, change_seq, to_drain)
            .await;
        if self.audit.store().shares_mode() {
            self.drain_other_instances(principal, &target_name, target, change_seq)
                .await;
        }
        Ok(ModeSwitch {
            status: self.status(),
            drain,
        })
    }

    /// Whether `mode` would allow `tool(arguments)`: the test a mode switch applies
    /// to each call in flight, with the decision function every call goes through.
    fn would_allow(&self, mode: ModeId, tool: &str, arguments: &Value) -> bool {
        matches!(
            decide_call(&self.policy(), mode, tool, arguments),
            Verdict::Allow(_)
        )
    }

    /// Drains the calls a switch must wait for and, if there were any, records
    /// what became of them (`mode_drained`, referring to the switch's record).
    async fn drain_and_record(
        &self,
        principal: &Principal,
        mode: &Arc<str>,
        change_seq: u64,
        to_drain: Vec<crate::mode::DrainTarget>,
    ) -> DrainReport {
        if to_drain.is_empty() {
            return DrainReport::default();
        }
        let report = drain(to_drain, self.policy().drain_timeout()).await;
        let entry = AuditEntry {
            time: Utc::now(),
            principal: principal.clone(),
            kind: EntryKind::ModeDrained,
            tool: None,
            arguments: None,
            mode: mode.clone(),
            decision: AuditDecision::Allowed,
            reason_code: None,
            outcome: if report.cancelled.is_empty() {
                "drained"
            } else {
                Reason::Cancelled.as_str()
            },
            detail: json!({
                "change_seq": change_seq,
                "drained": report.drained,
                "cancelled": report.cancelled,
            }),
            expires_at: None,
            context: None,
            policy_hash: self.policy_version(),
        };
        // The switch itself is recorded and in force; a failure here loses only the
        // summary (each drained call has its own outcome record).
        if let Err(error) = self.audit.append_with(entry, Priority::Essential).await {
            tracing::error!(%error, "could not record the calls a mode switch drained");
        }
        report
    }

    /// Returns to the default mode if the elevated mode's deadline has passed, then
    /// drains the calls the default mode denies, as [`Gateway::switch_mode`] does.
    async fn expire_if_due(&self) {
        let (pending, to_drain, default_name) = {
            let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
            if !state.is_due(Instant::now()) {
                return;
            }
            // Under the write side, which a reload also needs: the policy's own default.
            let default = self.policy().default_mode();
            let default_name = self.mode_name(default);
            let from = self.mode_name(state.mode).clone();
            let now = Utc::now();
            state.switch(ModeState {
                mode: default,
                expires: None,
                reason: Some(format!("{from} mode lapsed")),
                changed_by: Principal::system().name().clone(),
                changed_at: now,
                epoch: 0,
            });
            // Its record bumps the shared row (or finds the lapse recorded already).
            self.shared_epoch.fetch_add(1, Ordering::AcqRel);
            let to_drain = self.in_flight.to_drain(state.epoch, |tool, arguments| {
                self.would_allow(default, tool, arguments)
            });
            let pending = self.audit.submit_with(
                AuditEntry {
                    time: now,
                    principal: Principal::system(),
                    kind: EntryKind::ModeExpired,
                    tool: None,
                    arguments: None,
                    mode: default_name.clone(),
                    decision: AuditDecision::Allowed,
                    reason_code: None,
                    outcome: "expired",
                    detail: json!({"from": from.as_ref(), "reason": "the time limit lapsed"}),
                    expires_at: None,
                    context: None,
                    policy_hash: self.policy_version(),
                },
                Priority::Essential,
            );
            (pending, to_drain, default_name)
        };
        let change_seq = match pending.durable().await {
            Ok(seq) => seq,
            Err(error) => {
                tracing::error!(%error, "could not record the end of an elevated mode");
                0
            }
        };
        tracing::info!("elevated mode lapsed; back to the default mode");
        self.mode_events.send_replace(self.status());
        self.metrics.mode_changed();
        self.drain_and_record(&Principal::system(), &default_name, change_seq, to_drain)
            .await;
    }

    /// The version of the policy in force, as records carry it.
    fn policy_version(&self) -> Option<Arc<str>> {
        Some(Arc::from(self.policy().policy_hash()))
    }

    /// The current policy state.
    pub fn status(&self) -> PolicyStatus {
        // State, policy and names read under one read guard: a reload replaces them together.
        let (state, policy, mode_names) = {
            let state = self.read_state();
            let names = self
                .mode_names
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            (state.clone(), self.policy(), names)
        };
        let default = policy.default_mode();
        let now = Instant::now();
        let mode_id = state.effective_mode(now, default);
        let lapsed = mode_id != state.mode;
        let mode = policy.mode(mode_id);
        PolicyStatus {
            mode: mode.name().to_owned(),
            description: mode.description().to_owned(),
            allowed_tools: names(mode.allowed().names()),
            blocked_tools: names(mode.blocked().names()),
            always_blocked: names(policy.always_blocked().names()),
            emergency_expires_at: if lapsed {
                None
            } else {
                state.expires.map(|(_, wall)| format_time(wall))
            },
            default_mode: policy.mode(default).name().to_owned(),
            available_modes: mode_names.iter().map(|n| n.to_string()).collect(),
            reason: if lapsed { None } else { state.reason },
            changed_by: state.changed_by.to_string(),
            changed_at: format_time(state.changed_at),
            policy_hash: policy.policy_hash().to_owned(),
        }
    }

    /// The metrics in the Prometheus text format, the mode gauge read now.
    pub fn render_metrics(&self) -> String {
        let current = self.status().mode;
        let mode_names = self
            .mode_names
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        self.metrics
            .render(mode_names.iter().map(|name| name.as_ref()), &current)
    }

    /// Watches policy-status changes (mode changes and expiries).
    pub fn subscribe(&self) -> watch::Receiver<PolicyStatus> {
        self.mode_events.subscribe()
    }

    /// Every tool some mode allows (and every built-in, as before), its schema,
    /// and whether the current mode allows it. An upstream tool no mode allows is
    /// left out; a call to it is still decided and audited.
    pub fn catalog(&self) -> Vec<crate::catalog::CatalogEntry> {
        let (policy, mode) = {
            let state = self.read_state();
            let policy = self.policy();
            let mode = state.effective_mode(Instant::now(), policy.default_mode());
            (policy, mode)
        };
        crate::catalog::listing(&policy, mode)
    }

    /// Services and fleet size.
    pub fn infrastructure_status(&self) -> InfrastructureStatus {
        self.infra
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .status()
    }

    /// Puts a service into a bad state (operators only) and records it.
    pub async fn simulate_incident(
        &self,
        principal: &Principal,
        service: &str,
        health: ServiceHealth,
    ) -> Result<Result<InfrastructureStatus, InfraError>, GatewayError> {
        if self.audit.admit(Priority::Essential).is_err() {
            return Err(GatewayError::AuditUnavailable);
        }
        let now = Utc::now();
        let (pending, result) = {
            let mode = self
                .read_state()
                .effective_mode(Instant::now(), self.policy().default_mode());
            let mut infra = self.infra.lock().unwrap_or_else(PoisonError::into_inner);
            let result = infra
                .simulate_incident(service, health, now)
                .map(|()| infra.status());
            let entry = AuditEntry {
                time: now,
                principal: principal.clone(),
                kind: EntryKind::Incident,
                tool: None,
                arguments: Some(json!({"service": truncate(service, 128), "status": health})),
                mode: self.mode_name(mode).clone(),
                decision: AuditDecision::Allowed,
                reason_code: result.as_ref().err().map(InfraError::reason),
                outcome: if result.is_ok() {
                    "simulated"
                } else {
                    "failed"
                },
                detail: match &result {
                    Ok(_) => json!(format!("{service} set to {health}")),
                    Err(error) => json!(error.to_string()),
                },
                expires_at: None,
                context: None,
                policy_hash: self.policy_version(),
            };
            (self.audit.submit_with(entry, Priority::Essential), result)
        };
        pending
            .durable()
            .await
            .map_err(|_| GatewayError::AuditUnavailable)?;
        Ok(result)
    }

    /// Records a refused authentication; `what` names the request. Used where no
    /// edge tally aggregates refusals (a router served without `BoundServer`).
    pub async fn record_auth_refusal(
        &self,
        principal: &Principal,
        what: &str,
        reason_code: Reason,
    ) -> Result<(), GatewayError> {
        let detail = Value::String(truncate(what, 200).to_owned());
        self.record_edge_refusal(principal, reason_code, detail)
            .await
    }
}

impl Gateway {
    /// Records one refusal at the edge (or a summary of many, see
    /// `server::refusals`); `detail` names the source and the count.
    pub async fn record_edge_refusal(
        &self,
        principal: &Principal,
        reason_code: Reason,
        detail: Value,
    ) -> Result<(), GatewayError> {
        let mode = self.current_mode_name();
        let entry = AuditEntry {
            time: Utc::now(),
            principal: principal.clone(),
            kind: EntryKind::AuthRefused,
            tool: None,
            arguments: None,
            mode,
            decision: AuditDecision::Denied,
            reason_code: Some(reason_code),
            outcome: "refused",
            detail,
            expires_at: None,
            context: None,
            policy_hash: self.policy_version(),
        };
        self.append(entry, audit_priority(principal)).await
    }

    /// Records a console login or logout (`console_login` / `console_logout`) by
    /// `principal` from `source` (the peer address), and waits until it is durable,
    /// so a session is never opened without its record.
    pub async fn record_console_session(
        &self,
        principal: &Principal,
        kind: EntryKind,
        source: &str,
    ) -> Result<(), GatewayError> {
        let mode = self
            .read_state()
            .effective_mode(Instant::now(), self.policy().default_mode());
        let outcome = match kind {
            EntryKind::ConsoleLogout => "logged_out",
            _ => "logged_in",
        };
        let entry = AuditEntry {
            time: Utc::now(),
            principal: principal.clone(),
            kind,
            tool: None,
            arguments: None,
            mode: self.mode_name(mode).clone(),
            decision: AuditDecision::Allowed,
            reason_code: None,
            outcome,
            detail: json!({"source": truncate(source, 64)}),
            expires_at: None,
            context: None,
            policy_hash: None,
        };
        self.append(entry, audit_priority(principal)).await
    }

    /// Records a tool request refused before it reached the policy (a malformed
    /// body, an oversized name): `rejected`, with the name cut to a bounded prefix.
    pub async fn record_malformed_request(
        &self,
        principal: &Principal,
        tool_name: &str,
        problem: &str,
    ) -> Result<(), GatewayError> {
        let mode = self.current_mode_name();
        let entry = AuditEntry {
            time: Utc::now(),
            principal: principal.clone(),
            kind: EntryKind::ToolCall,
            tool: Some(truncate(tool_name, MAX_TOOL_NAME_LEN).to_owned()),
            arguments: None,
            mode,
            decision: AuditDecision::Rejected,
            reason_code: Some(Reason::MalformedRequest),
            outcome: Reason::MalformedRequest.as_str(),
            detail: json!({
                "problem": truncate(problem, 200),
                "tool_name_bytes": tool_name.len(),
            }),
            expires_at: None,
            context: None,
            policy_hash: self.policy_version(),
        };
        self.append(entry, audit_priority(principal)).await
    }

    /// The name of the mode in force, read under the mode lock.
    fn current_mode_name(&self) -> Arc<str> {
        let state = self.read_state();
        self.mode_name(state.effective_mode(Instant::now(), self.policy().default_mode()))
    }

    /// Records an entry that no mode decision depends on, and waits until it is durable.
    async fn append(&self, entry: AuditEntry, priority: Priority) -> Result<(), GatewayError> {
        self.audit.admit(priority).map_err(|error| match error {
            AuditError::LowSpace => GatewayError::AuditLowSpace,
            _ => GatewayError::AuditUnavailable,
        })?;
        self.audit
            .append_with(entry, priority)
            .await
            .map(|_| ())
            .map_err(|_| GatewayError::AuditUnavailable)
    }

    /// A mode change whose record failed never happened: put back the state it
    /// replaced, unless the expiry task has replaced it meanwhile (mode changes
    /// are serialized). Calls decided under it were queued behind its record and
    /// are refused with it.
    fn undo_unrecorded_mode_change(
        &self,
        principal: &Principal,
        changed_at: DateTime<Utc>,
        (replaced, replaced_shared_epoch): (ModeState, u64),
    ) {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        if state.changed_at == changed_at && Arc::ptr_eq(&state.changed_by, principal.name()) {
            state.switch(replaced);
            self.shared_epoch
                .store(replaced_shared_epoch, Ordering::Release);
        }
    }
}

/// The mode names of `policy`, indexed by `ModeId`.
fn mode_names_of(policy: &PolicyEngine) -> Arc<[Arc<str>]> {
    policy
        .modes()
        .map(|(_, mode)| Arc::from(mode.name()))
        .collect()
}

fn names(names: Vec<&str>) -> Vec<String> {
    names.into_iter().map(str::to_owned).collect()
}

/// A requested tool name as records and answers show it: at most
/// [`MAX_TOOL_NAME_LEN`] bytes, with control, bidi and zero-width characters escaped.
fn shown_tool_name(tool_name: &str) -> String {
    text::escape(truncate(tool_name, MAX_TOOL_NAME_LEN)).into_owned()
}

/// Cuts `text` to at most `max` bytes on a character boundary.
pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Operators' and Proxi's own records may use the disk-space reserve; the rest may not.
fn audit_priority(principal: &Principal) -> Priority {
    match principal.role() {
        Role::Operator | Role::System => Priority::Essential,
        Role::Agent | Role::Anonymous => Priority::Agent,
    }
}

/// A refusal message as a bounded record field.
fn recorded_message(message: &str) -> Value {
    Value::String(truncate(message, MAX_RECORDED_MESSAGE_BYTES).to_owned())
}

/// The record of one tool call. A rejected call (unknown tool, invalid arguments)
/// stores only a digest of its arguments ([`json_digest`]): nothing bounds what an
/// unparsed body holds, and storing it whole would let the agent fill the disk.
fn tool_call_entry(
    principal: &Principal,
    tool_name: &str,
    arguments: Value,
    mode: &Arc<str>,
    outcome: &Outcome,
    now: DateTime<Utc>,
) -> AuditEntry {
    // A refusal's outcome is named after its reason, as the trail always had it.
    let (decision, outcome_name, detail) = match outcome {
        Outcome::Executed(result) => (AuditDecision::Allowed, "executed", result.clone()),
        Outcome::Denied { message, .. } => {
            (AuditDecision::Denied, "denied", recorded_message(message))
        }
        Outcome::UnknownTool { .. } => (
            AuditDecision::Rejected,
            Reason::UnknownTool.as_str(),
            Value::String("no such tool".to_owned()),
        ),
        Outcome::InvalidArguments(message) => (
            AuditDecision::Rejected,
            Reason::InvalidArguments.as_str(),
            recorded_message(message),
        ),
        Outcome::InvalidToolName(_) => (
            AuditDecision::Rejected,
            Reason::InvalidToolName.as_str(),
            Value::String(
                "the tool name contains control, bidi or zero-width characters".to_owned(),
            ),
        ),
        Outcome::Guarded(refusal) => (
            AuditDecision::Denied,
            "denied",
            recorded_message(&refusal.message()),
        ),
        Outcome::RateLimited { retry_after } => (
            AuditDecision::Denied,
            Reason::RateLimited.as_str(),
            json!({"retry_after_ms": u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX)}),
        ),
        Outcome::Failed { message, .. } => {
            (AuditDecision::Allowed, "failed", recorded_message(message))
        }
        Outcome::Approval(answer) => (
            AuditDecision::Denied,
            answer.reason.as_str(),
            json!({
                "approval_id": answer.approval_id,
                "expires_at": answer.expires_at.map(format_time),
                "message": truncate(&answer.message, MAX_RECORDED_MESSAGE_BYTES),
            }),
        ),
        // Recorded by the shared store itself (`AuditEntry::refused_as_stale`).
        Outcome::ModeChanged { message } => (
            AuditDecision::Denied,
            crate::audit::STALE_OUTCOME,
            recorded_message(message),
        ),
        // Upstream calls get an intent and an outcome record instead
        // (`upstream_intent_entry`, `upstream_outcome_entry`); kept total here.
        Outcome::Forwarded(_) | Outcome::UpstreamFailed { .. } => (
            AuditDecision::Allowed,
            recorded_outcome(outcome),
            Value::Null,
        ),
    };
    let arguments = match decision {
        AuditDecision::Rejected => json_digest(&arguments),
        // A call denied by a tool-level rule never had its arguments validated, so
        // they may be anything: keep them whole only while they are small.
        AuditDecision::Denied
            if serde_json::to_string(&arguments)
                .map_or(true, |text| text.len() > STORED_PREFIX_BYTES) =>
        {
            json_digest(&arguments)
        }
        AuditDecision::Allowed | AuditDecision::Denied => arguments,
    };
    AuditEntry {
        time: now,
        principal: principal.clone(),
        kind: EntryKind::ToolCall,
        tool: Some(truncate(tool_name, MAX_TOOL_NAME_LEN).to_owned()),
        arguments: Some(arguments),
        mode: mode.clone(),
        decision,
        reason_code: outcome.reason_code(),
        outcome: outcome_name,
        detail,
        expires_at: None,
        context: None,
        // Set by the caller, which knows the deciding policy.
        policy_hash: None,
    }
}

/// An allowed call bound for an upstream: which upstream, the upstream's own tool
/// name, and the arguments as checked against the tool's schema.
#[derive(Clone, Debug, PartialEq)]
pub struct UpstreamCall {
    /// The upstream's name in the policy.
    pub upstream: Arc<str>,
    /// The tool's name on the upstream (not its exposed `<upstream>__<tool>`).
    pub tool: Arc<str>,
    /// The arguments, as a JSON object (MCP has no other kind).
    pub arguments: rmcp::model::JsonObject,
}

/// What the decision left to do once its record is queued.
enum Step {
    /// Nothing: the outcome is known (a built-in ran, or the call was refused).
    Done(Outcome),
    /// Run this built-in once its intent record committed (on a shared store,
    /// under the epoch it was decided in), as this in-flight call.
    RunAfterIntent(crate::tools::ToolCall, InFlightCall),
    /// Forward to an upstream, as this in-flight call, through the routes in force
    /// when it was decided.
    Forward(UpstreamCall, InFlightCall, Option<Arc<dyn UpstreamCalls>>),
}

/// Calls the upstream, unless the call is cancelled first; never fails, since
/// every way it can end is an outcome to record.
async fn call_upstream(
    upstreams: Option<&dyn UpstreamCalls>,
    route: &UpstreamCall,
    in_flight: &InFlightCall,
    context: &CallContext,
) -> Outcome {
    let Some(upstreams) = upstreams else {
        return Outcome::UpstreamFailed {
            failure: UpstreamFailure::Unavailable,
            message: format!("upstream {:?} is not running", route.upstream),
        };
    };
    let forwarded = upstreams.call(
        &route.upstream,
        &route.tool,
        Some(route.arguments.clone()),
        context,
    );
    tokio::pin!(forwarded);
    // Cancellations first: a call cancelled while its intent was being written
    // is never sent.
    let by_switch = tokio::select! {
        biased;
        () = in_flight.cancelled().cancelled() => true,
        () = context.cancel.cancelled() => false,
        result = &mut forwarded => return forwarded_outcome(result),
    };
    // The upstream client sees `context.cancel`, sends notifications/cancelled
    // for this request alone and ends it; give it a moment to, then let go.
    context.cancel.cancel();
    let message = if by_switch {
        "cancelled: the mode changed to one that denies this call, or a reload stopped its upstream, and it did not finish within drain_timeout_seconds"
    } else {
        "cancelled by the caller"
    };
    match tokio::time::timeout(CANCEL_GRACE, &mut forwarded).await {
        // It finished after all: record what happened, not what was asked.
        Ok(Ok(result)) => Outcome::Forwarded(result),
        _ => Outcome::UpstreamFailed {
            failure: UpstreamFailure::Cancelled,
            message: message.to_owned(),
        },
    }
}

/// How long a cancelled upstream call may take to send its cancellation and end.
const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// The outcome of an upstream call that ran to its end.
fn forwarded_outcome(result: Result<CallToolResult, UpstreamError>) -> Outcome {
    match result {
        Ok(result) => Outcome::Forwarded(result),
        Err(error) => upstream_failure(error),
    }
}

/// An upstream's failure as the caller sees it: safe messages that name the
/// upstream; the details (which may hold paths) go to the log only.
fn upstream_failure(error: UpstreamError) -> Outcome {
    let (failure, message) = match &error {
        UpstreamError::Unavailable { upstream, .. } => {
            tracing::warn!(%error, "upstream call failed");
            (
                UpstreamFailure::Unavailable,
                format!("upstream {upstream:?} is unavailable; try again later"),
            )
        }
        UpstreamError::Timeout { upstream, after } => (
            UpstreamFailure::Timeout,
            format!(
                "upstream {upstream:?} did not answer within {} s; the call was cancelled",
                after.as_secs()
            ),
        ),
        UpstreamError::Cancelled { upstream } => (
            UpstreamFailure::Cancelled,
            format!("the call to upstream {upstream:?} was cancelled"),
        ),
        UpstreamError::Rejected {
            upstream,
            code,
            message,
        } => (
            UpstreamFailure::Refused,
            format!(
                "upstream {upstream:?} refused the request: {} (code {code})",
                truncate(message, MAX_RECORDED_MESSAGE_BYTES)
            ),
        ),
    };
    Outcome::UpstreamFailed { failure, message }
}

/// The `outcome` column of an upstream call's second record.
fn recorded_outcome(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Forwarded(result) if result.is_error == Some(true) => {
            Reason::UpstreamError.as_str()
        }
        Outcome::UpstreamFailed { failure, .. } => failure.recorded_outcome(),
        _ => "executed",
    }
}

/// Whether every mode of `policy` allows `tool_name(arguments)`: then no mode
/// change can make its decision stale, and it needs no epoch check.
fn allowed_in_every_mode(policy: &PolicyEngine, tool_name: &str, arguments: &Value) -> bool {
    policy.modes().all(|(mode, _)| {
        matches!(
            decide_call(policy, mode, tool_name, arguments),
            Verdict::Allow(_)
        )
    })
}

/// The write-ahead record of an allowed built-in call on a shared store:
/// `allowed`, outcome `pending`; the call runs only once it committed.
fn builtin_intent_entry(
    principal: &Principal,
    tool_name: &str,
    arguments: Value,
    mode: &Arc<str>,
    now: DateTime<Utc>,
) -> AuditEntry {
    AuditEntry {
        time: now,
        principal: principal.clone(),
        kind: EntryKind::ToolCall,
        tool: Some(truncate(tool_name, MAX_TOOL_NAME_LEN).to_owned()),
        arguments: Some(arguments),
        mode: mode.clone(),
        decision: AuditDecision::Allowed,
        reason_code: None,
        outcome: crate::audit_view::PENDING,
        detail: json!({}),
        expires_at: None,
        context: None,
        // Set by the caller, which knows the deciding policy.
        policy_hash: None,
    }
}

/// The write-ahead record of an allowed upstream call: `allowed`, outcome
/// `pending`, durable before the call is forwarded.
fn upstream_intent_entry(
    principal: &Principal,
    tool_name: &str,
    arguments: Value,
    mode: &Arc<str>,
    route: &UpstreamCall,
    now: DateTime<Utc>,
) -> AuditEntry {
    AuditEntry {
        detail: json!({"upstream": &*route.upstream, "upstream_tool": &*route.tool}),
        ..builtin_intent_entry(principal, tool_name, arguments, mode, now)
    }
}

/// The second record of an upstream call: its outcome, referring to the intent by
/// seq (`detail.intent_seq`, hashed with the rest). The mode is the intent's: the
/// mode the call was decided under.
fn upstream_outcome_entry(
    principal: &Principal,
    tool_name: &str,
    mode: &Arc<str>,
    intent_seq: u64,
    outcome: &Outcome,
) -> AuditEntry {
    let detail = match outcome {
        Outcome::Forwarded(result) => json!({
            crate::audit_view::INTENT_SEQ: intent_seq,
            "result": result,
        }),
        Outcome::UpstreamFailed { message, .. } => json!({
            crate::audit_view::INTENT_SEQ: intent_seq,
            "message": truncate(message, MAX_RECORDED_MESSAGE_BYTES),
        }),
        _ => json!({crate::audit_view::INTENT_SEQ: intent_seq}),
    };
    AuditEntry {
        time: Utc::now(),
        principal: principal.clone(),
        kind: EntryKind::ToolCall,
        tool: Some(tool_name.to_owned()),
        arguments: None,
        mode: mode.clone(),
        decision: AuditDecision::Allowed,
        reason_code: outcome.reason_code(),
        outcome: recorded_outcome(outcome),
        detail,
        expires_at: None,
        context: None,
        // Not a decision: its intent record names the policy.
        policy_hash: None,
    }
}

/// Wakes at each elevated mode's deadline and returns to the default mode.
///
/// Holds only a weak reference, so dropping the last `Arc<Gateway>` ends it.
fn spawn_expiry_task(gateway: Weak<Gateway>, mut events: watch::Receiver<PolicyStatus>) {
    tokio::spawn(async move {
        loop {
            events.borrow_and_update();
            let deadline = {
                let Some(gateway) = gateway.upgrade() else {
                    return;
                };
                let state = gateway.read_state();
                state.expires.map(|(deadline, _)| deadline)
            };
            let changed = match deadline {
                Some(deadline) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => {
                            let Some(gateway) = gateway.upgrade() else { return };
                            gateway.expire_if_due().await;
                            Ok(())
                        }
                        changed = events.changed() => changed,
                    }
                }
                None => events.changed().await,
            };
            if changed.is_err() {
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    //! The upstream branch of the execution path, in process: the built-in tools'
    //! decisions (restart_service is active, list_services read-only) routed to a
    //! fake upstream, so that the drain and the write-ahead records are tested
    //! without HTTP or a child process.

    use super::*;
    use rmcp::model::{ContentBlock, JsonObject};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::Notify;

    /// How the fake upstream answers each of its tools.
    #[derive(Default)]
    struct FakeUpstream {
        /// Calls received (the fake counts before it answers).
        received: AtomicUsize,
        /// Calls whose future was dropped before they answered.
        abandoned: AtomicUsize,
        /// Calls that saw their `CallContext.cancel` fire.
        cancelled: AtomicUsize,
        /// Signalled when a `held` call has started.
        started: Notify,
        /// Releases every `held` call.
        release: Notify,
    }

    struct CountsAbandoned<'a>(&'a AtomicUsize, bool);
    impl Drop for CountsAbandoned<'_> {
        fn drop(&mut self) {
            if !self.1 {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    impl UpstreamCalls for FakeUpstream {
        fn call<'a>(
            &'a self,
            upstream: &'a str,
            tool: &'a str,
            _arguments: Option<JsonObject>,
            context: &'a CallContext,
        ) -> futures::future::BoxFuture<'a, Result<CallToolResult, UpstreamError>> {
            Box::pin(async move {
                self.received.fetch_add(1, Ordering::SeqCst);
                let mut guard = CountsAbandoned(&self.abandoned, false);
                let answer = match tool {
                    "held" => {
                        let released = self.release.notified();
                        self.started.notify_one();
                        released.await;
                        Ok(CallToolResult::success(vec![ContentBlock::text("done")]))
                    }
                    // Ends only when cancelled, as the upstream client does.
                    "hang" => {
                        self.started.notify_one();
                        context.cancel.cancelled().await;
                        self.cancelled.fetch_add(1, Ordering::SeqCst);
                        Err(UpstreamError::Cancelled {
                            upstream: upstream.to_owned(),
                        })
                    }
                    "fails" => Ok(CallToolResult::error(vec![ContentBlock::text(
                        "no such file",
                    )])),
                    "down" => Err(UpstreamError::Unavailable {
                        upstream: upstream.to_owned(),
                        reason: "cannot start \"/opt/secret/path\"".to_owned(),
                    }),
                    "slowpoke" => Err(UpstreamError::Timeout {
                        upstream: upstream.to_owned(),
                        after: Duration::from_secs(60),
                    }),
                    _ => Ok(CallToolResult::success(vec![ContentBlock::text("echo")])),
                };
                guard.1 = true;
                answer
            })
        }
    }

    async fn gateway_with(
        drain_timeout_seconds: u64,
    ) -> (Arc<Gateway>, Arc<FakeUpstream>, tempfile::TempDir) {
        let mut policy: Value =
            serde_json::from_str(include_str!("../policies/ops_policy.json")).unwrap();
        policy["drain_timeout_seconds"] = json!(drain_timeout_seconds);
        let policy = PolicyEngine::from_json(&policy.to_string(), "test policy").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = GatewayConfig {
            data_dir: dir.path().join("data"),
            durability: Durability::Process,
            audit_reserve_bytes: Some(0),
        };
        let gateway = Gateway::open(policy, config).await.unwrap();
        let fake = Arc::new(FakeUpstream::default());
        assert!(gateway.attach_upstreams(fake.clone()));
        (gateway, fake, dir)
    }

    fn route(tool: &str) -> Option<UpstreamCall> {
        Some(UpstreamCall {
            upstream: "fake".into(),
            tool: tool.into(),
            arguments: JsonObject::new(),
        })
    }

    async fn call(gateway: &Arc<Gateway>, tool: &str, upstream_tool: &str) -> Execution {
        let arguments = match tool {
            "restart_service" => json!({"service_name": "web-server"}),
            _ => json!({}),
        };
        gateway
            .execute_routed(
                &Principal::agent(),
                tool,
                arguments,
                None,
                &CallContext::detached(),
                route(upstream_tool),
            )
            .await
            .unwrap()
    }

    async fn emergency(gateway: &Gateway) {
        let change = ModeChange {
            mode: "EMERGENCY".into(),
            reason: Some("incident".into()),
            ttl: None,
        };
        gateway
            .set_mode(&Principal::operator(), change)
            .await
            .unwrap();
    }

    fn normal() -> ModeChange {
        ModeChange {
            mode: "NORMAL".into(),
            ..ModeChange::default()
        }
    }

    fn trail(gateway: &Gateway) -> Vec<AuditRecord> {
        gateway.audit().recent(1000).unwrap()
    }

    #[tokio::test]
    async fn an_upstream_call_has_a_durable_intent_and_an_outcome_that_refers_to_it() {
        let (gateway, fake, _dir) = gateway_with(10).await;
        let execution = call(&gateway, "list_services", "echo").await;
        assert!(
            matches!(&execution.outcome, Outcome::Forwarded(result) if result.is_error != Some(true))
        );
        assert_eq!(fake.received.load(Ordering::SeqCst), 1);
        let records = trail(&gateway);
        let [intent, outcome] = &records[..] else {
            panic!("two records: {records:#?}")
        };
        assert_eq!(
            (intent.decision.as_str(), intent.outcome.as_str()),
            ("allowed", "pending")
        );
        assert_eq!(outcome.outcome, "executed");
        assert_eq!(outcome.detail["intent_seq"], json!(intent.seq));
        assert_eq!(outcome.detail["result"]["content"][0]["text"], "echo");
        assert_eq!(execution.audit_seq, outcome.seq);
        assert!(crate::audit_view::unresolved_intents(&records).is_empty());
        // A denial is one record and never reaches the upstream.
        let denied = call(&gateway, "restart_service", "echo").await;
        assert!(matches!(denied.outcome, Outcome::Denied { .. }));
        assert_eq!(fake.received.load(Ordering::SeqCst), 1);
        assert_eq!(trail(&gateway).len(), 3);
    }

    #[tokio::test]
    async fn a_shadow_disagreement_is_on_the_intent_of_an_upstream_call_not_its_outcome() {
        let (gateway, _fake, _dir) = gateway_with(10).await;
        let mut shadow: Value =
            serde_json::from_str(include_str!("../policies/ops_policy.json")).unwrap();
        shadow["modes"]["NORMAL"]["allowed_tools"] = json!(["get_service_status"]);
        let shadow = PolicyEngine::from_json(&shadow.to_string(), "shadow").unwrap();
        let shadow_hash = shadow.policy_hash().to_owned();
        assert!(gateway.set_shadow_policy(&shadow));
        call(&gateway, "list_services", "echo").await;
        // Both refuse it for the same reason: nothing added.
        call(&gateway, "delete_database", "echo").await;
        let records = trail(&gateway);
        let [intent, outcome, agreed] = &records[..] else {
            panic!("three records: {records:#?}")
        };
        assert_eq!(
            intent.detail["shadow_decision"],
            json!({
                "decision": "denied",
                "reason_code": Reason::NotAllowed.as_str(),
                "policy_hash": shadow_hash,
                "mode": "NORMAL",
            })
        );
        assert_eq!(intent.detail["upstream"], json!("fake"));
        assert_eq!(agreed.reason(), Some(Reason::AlwaysBlocked));
        for record in [outcome, agreed] {
            assert!(
                record.detail.get("shadow_decision").is_none(),
                "{record:#?}"
            );
        }
        assert!(records.iter().all(|record| record.kind == "tool_call"));
        assert!(
            gateway
                .render_metrics()
                .lines()
                .any(|line| line == "proxi_shadow_disagreements_total 1")
        );
    }

    #[tokio::test]
    async fn upstream_failures_are_recorded_with_safe_messages() {
        let (gateway, _fake, _dir) = gateway_with(10).await;
        let cases = [
            (
                "fails",
                Reason::UpstreamError.as_str(),
                Reason::UpstreamError,
            ),
            ("down", "unavailable", Reason::UpstreamUnavailable),
            ("slowpoke", "timeout", Reason::UpstreamTimeout),
        ];
        for (tool, recorded, reason_code) in cases {
            let execution = call(&gateway, "list_services", tool).await;
            assert_eq!(execution.outcome.reason_code(), Some(reason_code), "{tool}");
            if let Outcome::UpstreamFailed { message, .. } = &execution.outcome {
                assert!(!message.contains("/opt/secret"), "{message}");
            }
            let last = trail(&gateway).pop().unwrap();
            assert_eq!(last.outcome, recorded, "{tool}");
            assert_eq!(last.reason(), Some(reason_code), "{tool}");
        }
        assert!(audit_verifies(&gateway));
    }

    fn audit_verifies(gateway: &Gateway) -> bool {
        gateway
            .audit()
            .store()
            .verify(None)
            .unwrap()
            .first_bad
            .is_none()
    }

    #[tokio::test]
    async fn a_switch_to_normal_waits_for_an_active_call_decided_in_emergency() {
        let (gateway, fake, _dir) = gateway_with(10).await;
        emergency(&gateway).await;
        let started = fake.started.notified();
        let running = tokio::spawn({
            let gateway = gateway.clone();
            async move { call(&gateway, "restart_service", "held").await }
        });
        started.await;
        // Released only once the switch is recorded and in force, so the switch
        // must have waited for the call to return.
        let mut events = gateway.subscribe();
        let switching = tokio::spawn({
            let gateway = gateway.clone();
            async move { gateway.switch_mode(&Principal::operator(), normal()).await }
        });
        events
            .wait_for(|status| status.mode == "NORMAL")
            .await
            .unwrap();
        fake.release.notify_one();
        let switch = switching.await.unwrap().unwrap();
        let execution = running.await.unwrap();
        assert!(matches!(execution.outcome, Outcome::Forwarded(_)));
        assert_eq!(switch.drain.drained.len(), 1, "{:?}", switch.drain);
        assert_eq!(switch.drain.drained[0].outcome, "executed");
        assert!(switch.drain.cancelled.is_empty());
        let records = trail(&gateway);
        let kinds: Vec<_> = records
            .iter()
            .map(|r| (r.kind.as_str(), r.outcome.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("mode_change", "changed"),
                ("tool_call", "pending"),
                ("mode_change", "changed"),
                ("tool_call", "executed"),
                ("mode_drained", "drained"),
            ]
        );
        assert_eq!(
            records[4].detail["drained"][0]["intent_seq"],
            json!(records[1].seq)
        );
        assert_eq!(records[4].detail["change_seq"], json!(records[2].seq));
        assert!(gateway.in_flight.is_empty());
    }

    #[tokio::test]
    async fn a_call_still_running_at_the_drain_timeout_is_cancelled_upstream() {
        let (gateway, fake, _dir) = gateway_with(0).await;
        emergency(&gateway).await;
        let started = fake.started.notified();
        let running = tokio::spawn({
            let gateway = gateway.clone();
            async move { call(&gateway, "restart_service", "hang").await }
        });
        started.await;
        let switch = gateway
            .switch_mode(&Principal::operator(), normal())
            .await
            .unwrap();
        assert_eq!(switch.drain.cancelled.len(), 1, "{:?}", switch.drain);
        assert_eq!(
            switch.drain.cancelled[0].outcome,
            Reason::Cancelled.as_str()
        );
        // The upstream request saw the cancellation (and would send notifications/cancelled).
        assert_eq!(fake.cancelled.load(Ordering::SeqCst), 1);
        assert_eq!(fake.abandoned.load(Ordering::SeqCst), 0);
        let execution = running.await.unwrap();
        assert_eq!(execution.outcome.reason_code(), Some(Reason::Cancelled));
        let last = trail(&gateway).pop().unwrap();
        assert_eq!(
            (last.kind.as_str(), last.outcome.as_str()),
            ("mode_drained", Reason::Cancelled.as_str())
        );
        assert!(audit_verifies(&gateway));
    }

    #[tokio::test]
    async fn a_switch_does_not_wait_for_calls_the_new_mode_allows() {
        let (gateway, fake, _dir) = gateway_with(10).await;
        emergency(&gateway).await;
        let started = fake.started.notified();
        let running = tokio::spawn({
            let gateway = gateway.clone();
            async move { call(&gateway, "list_services", "held").await }
        });
        started.await;
        let switch = gateway
            .switch_mode(&Principal::operator(), normal())
            .await
            .unwrap();
        assert!(switch.drain.is_empty());
        fake.release.notify_one();
        running.await.unwrap();
    }

    #[tokio::test]
    async fn a_caller_that_cancels_gets_its_call_cancelled_and_recorded() {
        let (gateway, fake, _dir) = gateway_with(10).await;
        let context = CallContext::detached();
        let started = fake.started.notified();
        let running = tokio::spawn({
            let gateway = gateway.clone();
            let context = context.clone();
            async move {
                gateway
                    .execute_routed(
                        &Principal::agent(),
                        "list_services",
                        json!({}),
                        None,
                        &context,
                        route("hang"),
                    )
                    .await
                    .unwrap()
            }
        });
        started.await;
        context.cancel.cancel();
        let execution = running.await.unwrap();
        assert_eq!(execution.outcome.reason_code(), Some(Reason::Cancelled));
        assert_eq!(fake.cancelled.load(Ordering::SeqCst), 1);
        assert_eq!(
            trail(&gateway).pop().unwrap().outcome,
            Reason::Cancelled.as_str()
        );
    }

    #[tokio::test]
    async fn without_upstreams_attached_an_upstream_call_is_unavailable() {
        let (gateway, _fake, _dir) = gateway_with(10).await;
        let detached = Gateway::open(
            (*gateway.policy()).clone(),
            GatewayConfig {
                data_dir: _dir.path().join("other"),
                durability: Durability::Process,
                audit_reserve_bytes: Some(0),
            },
        )
        .await
        .unwrap();
        let execution = call(&detached, "list_services", "echo").await;
        assert_eq!(
            execution.outcome.reason_code(),
            Some(Reason::UpstreamUnavailable)
        );
    }
}
